//! What lets a backup skip the work for objects that did not change since
//! the last one:
//!
//! - a [`CaptureCache`] remembers, by uid and resourceVersion, what a
//!   backup made of each object (its blob, graph node and references, or
//!   why it was skipped). An object with the same uid and resourceVersion
//!   has the same content, so it normalizes to the same blob.
//! - an [`ObjectSource`] hands a backup the objects of a collection instead
//!   of a LIST: the controller's journal, a mirror kept current by watches
//!   between scheduled runs.
//!
//! A backup that uses both reads no collection from the API server and
//! normalizes, encodes and stores only what changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::backup::SkippedObject;
use crate::cluster::discovery::ServedResource;
use crate::model::ObjectRef;
use crate::model::edges::Reference;
use crate::model::graph::Node;
use crate::repo::BlobId;

/// An object's identity in time: its uid and resourceVersion.
pub type Version = (String, String);

/// The uid and resourceVersion of a raw object, if it has both.
pub fn version_of(object: &Value) -> Option<Version> {
    let meta = object.get("metadata")?;
    Some((
        meta.get("uid")?.as_str()?.to_string(),
        meta.get("resourceVersion")?.as_str()?.to_string(),
    ))
}

/// What a backup made of one version of an object. Entries live behind
/// an `Arc` in the cache, so the variants' sizes do not matter.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Captured {
    Stored {
        object: ObjectRef,
        blob: BlobId,
        size: u64,
        node: Node,
        references: Vec<Reference>,
    },
    Skipped(SkippedObject),
}

#[derive(Debug)]
struct Entry {
    captured: Arc<Captured>,
    /// The run that last used it.
    run: u64,
}

/// What backups made of object versions, shared by the backups of one
/// policy. Entries no run used are dropped by [`CaptureCache::finish_run`].
#[derive(Debug, Default)]
pub struct CaptureCache {
    entries: Mutex<HashMap<Version, Entry>>,
    /// The catalog and graph blobs of snapshots, by a fingerprint of what
    /// determines them (see `backup::parts_fingerprint`), with the run that
    /// last used them: an unchanged namespace does not encode them again.
    parts: Mutex<HashMap<[u8; 32], (BlobId, BlobId, u64)>>,
    run: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CaptureCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a run: what it does not use is dropped when it finishes.
    pub fn begin_run(&self) {
        self.run.fetch_add(1, Ordering::Relaxed);
        self.hits.store(0, Ordering::Relaxed);
        self.misses.store(0, Ordering::Relaxed);
    }

    /// Drops the entries the run that just succeeded did not use.
    pub fn finish_run(&self) {
        let run = self.run.load(Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| e.run == run);
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        parts.retain(|_, (_, _, used)| *used == run);
    }

    /// The catalog and graph blobs stored for `fingerprint`, if a run made
    /// them.
    pub fn parts(&self, fingerprint: &[u8; 32]) -> Option<(BlobId, BlobId)> {
        let run = self.run.load(Ordering::Relaxed);
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let (catalog, graph, used) = parts.get_mut(fingerprint)?;
        *used = run;
        Some((*catalog, *graph))
    }

    pub fn remember_parts(&self, fingerprint: [u8; 32], catalog: BlobId, graph: BlobId) {
        let run = self.run.load(Ordering::Relaxed);
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fingerprint, (catalog, graph, run));
    }

    pub fn get(&self, version: &Version) -> Option<Arc<Captured>> {
        let run = self.run.load(Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get_mut(version) {
            Some(entry) => {
                entry.run = run;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.captured.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn contains(&self, version: &Version) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.contains_key(version)
    }

    pub fn insert(&self, version: Version, captured: Captured) {
        let run = self.run.load(Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(
            version,
            Entry {
                captured: Arc::new(captured),
                run,
            },
        );
    }

    /// Forgets everything (after the repository lost blobs the cache names).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Objects of the current run found in the cache, and not.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// One object of a collection, as an [`ObjectSource`] has it.
#[derive(Debug, Clone)]
pub enum SourceObject {
    /// The whole object, as the API server sent it.
    Raw(Arc<Value>),
    /// An object the source knows only by version, because the capture
    /// cache has it; `stub` holds its kind, name, namespace, labels and
    /// annotations, for the selection.
    Known { version: Version, stub: Arc<Value> },
}

impl SourceObject {
    /// What the selection looks at: the object or its stub.
    pub fn selectable(&self) -> &Value {
        match self {
            SourceObject::Raw(v) => v,
            SourceObject::Known { stub, .. } => stub,
        }
    }
}

/// Hands a backup the current objects of a collection, instead of a LIST.
pub trait ObjectSource: Send + Sync + std::fmt::Debug {
    /// The objects of `resource` (in `namespace`, or in every namespace),
    /// or `None` when the source does not follow that collection: the
    /// backup LISTs it then.
    fn objects(
        &self,
        resource: &ServedResource,
        namespace: Option<&str>,
    ) -> Option<Vec<SourceObject>>;
}

/// The stub of an object: what a selection looks at, without the rest.
pub fn stub_of(object: &Value) -> Value {
    let meta = object.get("metadata");
    let mut annotations = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    serde_json::json!({
        "apiVersion": object.get("apiVersion"),
        "kind": object.get("kind"),
        "type": object.get("type"),
        "metadata": {
            "name": meta.and_then(|m| m.get("name")),
            "namespace": meta.and_then(|m| m.get("namespace")),
            "labels": meta.and_then(|m| m.get("labels")),
            "annotations": annotations,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skipped(name: &str) -> Captured {
        Captured::Skipped(SkippedObject {
            object: name.into(),
            rule: "r".into(),
            reason: "why".into(),
        })
    }

    #[test]
    fn a_run_keeps_what_it_used_and_drops_the_rest() {
        let cache = CaptureCache::new();
        cache.begin_run();
        cache.insert(("u1".into(), "1".into()), skipped("a"));
        cache.insert(("u2".into(), "1".into()), skipped("b"));
        cache.finish_run();
        assert_eq!(cache.len(), 2);
        cache.begin_run();
        assert!(cache.get(&("u1".into(), "1".into())).is_some());
        assert!(
            cache.get(&("u2".into(), "2".into())).is_none(),
            "a new version is a miss"
        );
        cache.insert(("u2".into(), "2".into()), skipped("b"));
        assert_eq!(cache.hits_and_misses(), (1, 1));
        cache.finish_run();
        assert!(cache.contains(&("u1".into(), "1".into())));
        assert!(cache.contains(&("u2".into(), "2".into())));
        assert!(
            !cache.contains(&("u2".into(), "1".into())),
            "the old version is gone"
        );
    }

    #[test]
    fn stubs_keep_what_selections_look_at() {
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1",
            "metadata": {"name": "s", "namespace": "a", "uid": "u", "resourceVersion": "7",
                         "labels": {"owner": "helm"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "x": "y"}},
            "data": {"big": "..."},
        });
        let stub = stub_of(&object);
        assert_eq!(stub["metadata"]["labels"]["owner"], "helm");
        assert_eq!(
            stub["metadata"]["annotations"],
            serde_json::json!({"x": "y"})
        );
        assert!(stub.get("data").is_none());
        assert_eq!(version_of(&object), Some(("u".into(), "7".into())));
    }
}
