//! Where the bodies of the objects a restore writes come from: the
//! repository's packs, read in pack order a bounded batch at a time (so
//! memory follows the batch, not the snapshot), or, after a transform,
//! the transformed objects held in memory.

use std::collections::HashMap;

use serde_json::Value;

use crate::model::ObjectRef;
use crate::repo::{BlobId, Repository};

/// Objects read per batch: a few MiB of packs, read with a request or two.
pub const BATCH: usize = 2048;

/// One object to write and where its body is.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The object as it is named in the target.
    pub object: ObjectRef,
    /// The stored object, when the restore writes it as stored.
    pub blob: Option<BlobId>,
}

/// A body as read. Stored bodies stay compact JSON until used, so a batch
/// in memory costs its bytes, not decoded values (several times larger);
/// only the objects being written are decoded.
pub enum Body {
    Stored(Vec<u8>),
    Held(Value),
}

impl Body {
    pub fn decode(self) -> Result<Value, String> {
        match self {
            Body::Stored(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))
            }
            Body::Held(value) => Ok(value),
        }
    }
}

pub enum Bodies {
    Stored(Repository),
    /// Transformed objects by name in the target.
    Held(HashMap<ObjectRef, Value>),
}

impl Bodies {
    /// The bodies of `objects`, in their order; an unreadable one fails alone.
    pub async fn fetch(&self, objects: &[&Desired]) -> Vec<Result<Body, String>> {
        match self {
            Bodies::Held(held) => objects
                .iter()
                .map(|d| {
                    held.get(&d.object)
                        .cloned()
                        .map(Body::Held)
                        .ok_or_else(|| "not among the transformed objects".to_string())
                })
                .collect(),
            Bodies::Stored(repo) => {
                let mut ids = Vec::with_capacity(objects.len());
                for d in objects {
                    ids.push(d.blob.unwrap_or(BlobId([0; 32])));
                }
                repo.read_blobs(&ids)
                    .await
                    .into_iter()
                    .map(|read| read.map(Body::Stored).map_err(|e| e.to_string()))
                    .collect()
            }
        }
    }

    /// Sorts `items` so that consecutive ones lie close together in the
    /// packs (a batch is then read with few requests).
    pub fn read_order<T>(&self, items: &mut [T], blob: impl Fn(&T) -> Option<BlobId>) {
        if let Bodies::Stored(repo) = self {
            items.sort_by_cached_key(|t| blob(t).and_then(|b| repo.blob_position(&b)));
        }
    }

    /// The bodies of `items` as a stream, read a batch at a time in pack
    /// order (the next batch is read while the current one is used).
    pub fn stream<'a, T: 'a>(
        &'a self,
        mut items: Vec<T>,
        desired: impl Fn(&T) -> Desired + 'a,
    ) -> impl futures::Stream<Item = (T, Result<Body, String>)> + 'a {
        use futures::StreamExt;
        self.read_order(&mut items, |t| desired(t).blob);
        let mut batches: Vec<Vec<T>> = Vec::new();
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            batches.push(items.by_ref().take(BATCH).collect());
        }
        let desired = std::sync::Arc::new(desired);
        futures::stream::iter(batches)
            .map(move |batch| {
                let desired = desired.clone();
                async move {
                    let wanted: Vec<Desired> = batch.iter().map(|t| desired(t)).collect();
                    let refs: Vec<&Desired> = wanted.iter().collect();
                    let bodies = self.fetch(&refs).await;
                    futures::stream::iter(batch.into_iter().zip(bodies))
                }
            })
            .buffered(2)
            .flatten()
    }
}

/// Reads the stored bodies of `entries` a batch at a time, in the order
/// given, and hands each to `each`; a body that cannot be read or decoded
/// stops the reading, naming its object.
pub async fn for_each_stored<'a>(
    repo: &Repository,
    entries: impl IntoIterator<Item = &'a crate::backup::CatalogEntry>,
    mut each: impl FnMut(&'a crate::backup::CatalogEntry, Value),
) -> Result<(), super::RestoreError> {
    let entries: Vec<&crate::backup::CatalogEntry> = entries.into_iter().collect();
    for chunk in entries.chunks(BATCH) {
        let ids: Vec<BlobId> = chunk.iter().map(|e| e.blob).collect();
        for (entry, body) in chunk.iter().zip(repo.read_blobs(&ids).await) {
            let unreadable = |message: String| super::RestoreError::BadObject {
                object: entry.object.to_string(),
                message,
            };
            let bytes = body.map_err(|e| unreadable(e.to_string()))?;
            let value = serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
            each(entry, value);
        }
    }
    Ok(())
}

/// Digest of a body as the restore will write it: a saved plan records it
/// for transformed objects, so that applying the plan later writes exactly
/// what was planned.
pub fn digest(value: &Value) -> String {
    let bytes = serde_json::to_vec(value).expect("a JSON value serializes");
    blake3::hash(&bytes).to_hex()[..32].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_digest_follows_the_content() {
        let a = json!({"kind": "ConfigMap", "data": {"a": "1"}});
        let b = json!({"kind": "ConfigMap", "data": {"a": "2"}});
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a).len(), 32);
    }
}
