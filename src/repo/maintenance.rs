//! Repository maintenance: `verify` (every problem, never only the first),
//! `prune` (free what no snapshot references) and `stats`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::{
    BlobEntry, BlobId, IndexFile, PackEntries, RepoError, Repository, decode_blob, pack_path,
};

/// One damaged or missing piece.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    pub message: String,
}

impl Damage {
    pub fn blob(&self) -> Option<&BlobId> {
        self.blob.as_ref()
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.blob, &self.pack) {
            (Some(b), Some(p)) => write!(f, "blob {b} in pack {p}: {}", self.message),
            (None, Some(p)) => write!(f, "pack {p}: {}", self.message),
            (Some(b), None) => write!(f, "blob {b}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub packs_checked: usize,
    pub blobs_checked: usize,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn problems(&self) -> impl Iterator<Item = &Damage> {
        self.damage.iter()
    }

    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    pub packs_removed: usize,
    pub packs_rewritten: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoStats {
    pub packs: usize,
    pub blobs: usize,
    pub bytes: u64,
}

impl Repository {
    pub async fn stats(&self) -> Result<RepoStats, RepoError> {
        let packs = self.backend().list("data/").await?;
        let blobs = self.inner.index.read().expect("index lock").blobs.len();
        Ok(RepoStats {
            packs: packs.len(),
            blobs,
            bytes: packs.iter().map(|p| p.size).sum(),
        })
    }

    /// Checks the structure (every indexed pack exists and is long enough)
    /// and, with `read_data`, reads every pack: its hash must match its name
    /// and every blob in it must decrypt to its id.
    pub async fn verify(&self, read_data: bool) -> Result<VerifyReport, RepoError> {
        let mut report = VerifyReport::default();
        let index = self.read_index_files().await?;
        for (file, message) in &index.damaged_files {
            report.damage.push(Damage {
                blob: None,
                pack: None,
                message: format!("index file {file} is unreadable: {message}"),
            });
        }
        let present: HashMap<String, u64> = self
            .backend()
            .list("data/")
            .await?
            .into_iter()
            .map(|o| {
                (
                    o.path.rsplit('/').next().unwrap_or_default().to_string(),
                    o.size,
                )
            })
            .collect();
        let mut by_pack: BTreeMap<u32, Vec<(BlobId, super::IndexEntry)>> = BTreeMap::new();
        for (id, entry) in &index.blobs {
            by_pack.entry(entry.pack).or_default().push((*id, *entry));
        }
        let mut to_read = Vec::new();
        for (number, mut blobs) in by_pack {
            blobs.sort_by_key(|(_, e)| e.offset);
            let pack = index.packs[number as usize].clone();
            report.blobs_checked += blobs.len();
            match present.get(&pack) {
                None => {
                    for (id, _) in &blobs {
                        report.damage.push(Damage {
                            blob: Some(*id),
                            pack: Some(pack.clone()),
                            message: "its pack is missing".into(),
                        });
                    }
                }
                Some(size) => {
                    for (id, e) in &blobs {
                        if e.offset as u64 + e.length as u64 > *size {
                            report.damage.push(Damage {
                                blob: Some(*id),
                                pack: Some(pack.clone()),
                                message: format!("the pack is truncated ({size} bytes)"),
                            });
                        }
                    }
                    if read_data {
                        to_read.push((pack, blobs));
                    }
                }
            }
        }
        report.packs_checked = present.len();
        let key = self.key().clone();
        let results: Vec<Vec<Damage>> = futures::stream::iter(to_read)
            .map(|(pack, blobs)| {
                let key = key.clone();
                async move {
                    let bytes = match self.backend().get(&pack_path(&pack)).await {
                        Ok(b) => b,
                        Err(e) => {
                            return vec![Damage {
                                blob: None,
                                pack: Some(pack),
                                message: e.to_string(),
                            }];
                        }
                    };
                    tokio::task::spawn_blocking(move || check_pack(&key, &pack, &bytes, &blobs))
                        .await
                        .expect("verify task")
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        report.damage.extend(results.into_iter().flatten());
        Ok(report)
    }

    /// Deletes packs no snapshot needs and repacks mostly-dead ones. Needs
    /// the repository to itself (exclusive lock).
    pub async fn prune(&self, dry_run: bool) -> Result<PruneReport, RepoError> {
        let lock = self.lock_exclusive().await?;
        let result = self.prune_locked(dry_run).await;
        lock.release().await?;
        result
    }

    async fn prune_locked(&self, dry_run: bool) -> Result<PruneReport, RepoError> {
        let live = self.live_blobs().await?;
        let index = self.read_index_files().await?;
        let present = self.backend().list("data/").await?;
        let mut report = PruneReport::default();

        let mut by_pack: HashMap<u32, Vec<(BlobId, super::IndexEntry)>> = HashMap::new();
        for (id, entry) in &index.blobs {
            by_pack.entry(entry.pack).or_default().push((*id, *entry));
        }
        let mut keep: Vec<PackEntries> = Vec::new();
        let mut delete: HashSet<String> = HashSet::new();
        let mut rewrite: Vec<BlobId> = Vec::new();
        for (number, blobs) in &by_pack {
            let pack = &index.packs[*number as usize];
            let live_count = blobs.iter().filter(|(id, _)| live.contains(id)).count();
            if live_count == 0 {
                delete.insert(pack.clone());
                report.blobs_removed += blobs.len();
            } else if live_count * 2 < blobs.len() {
                delete.insert(pack.clone());
                report.packs_rewritten += 1;
                report.blobs_removed += blobs.len() - live_count;
                rewrite.extend(
                    blobs
                        .iter()
                        .filter(|(id, _)| live.contains(id))
                        .map(|(id, _)| *id),
                );
            } else {
                let mut entries: Vec<BlobEntry> = blobs
                    .iter()
                    .map(|(id, e)| BlobEntry {
                        id: *id,
                        offset: e.offset,
                        length: e.length,
                        raw_length: e.raw_length,
                    })
                    .collect();
                entries.sort_by_key(|e| e.offset);
                keep.push(PackEntries {
                    id: pack.clone(),
                    blobs: entries,
                });
            }
        }
        // Packs no index names: left by interrupted backups.
        let indexed: HashSet<&String> = index.packs.iter().collect();
        for object in &present {
            let name = object
                .path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            if !indexed.contains(&name) {
                delete.insert(name);
            }
        }
        for object in &present {
            let name = object.path.rsplit('/').next().unwrap_or_default();
            if delete.contains(name) {
                report.bytes_removed += object.size;
            }
        }
        report.packs_removed = delete.len();
        if dry_run || (delete.is_empty() && index.files.len() <= 1) {
            return Ok(report);
        }

        // Live blobs of rewritten packs go into new packs first...
        let mut writer = self.writer();
        for id in rewrite {
            let plain = self.read_blob(&id).await?;
            writer.force_add(&plain).await?;
        }
        let new_packs = writer.finish_packs().await?;
        keep.extend(new_packs);
        // ...then one index replaces all old ones, and only then is old data deleted.
        let file = IndexFile { packs: keep };
        let name = hex::encode(rand::random::<[u8; 32]>());
        self.backend()
            .put(&format!("index/{name}"), self.encode_json(&file))
            .await?;
        for old in &index.files {
            self.backend().delete(old).await?;
        }
        for pack in &delete {
            self.backend().delete(&pack_path(pack)).await?;
        }
        let mut fresh = super::Index::default();
        for p in &file.packs {
            fresh.add_pack(p);
        }
        fresh.files.push(format!("index/{name}"));
        *self.inner.index.write().expect("index lock") = fresh;
        Ok(report)
    }
}

fn check_pack(
    key: &super::crypto::MasterKey,
    pack: &str,
    bytes: &Bytes,
    blobs: &[(BlobId, super::IndexEntry)],
) -> Vec<Damage> {
    let mut damage = Vec::new();
    if blake3::hash(bytes).to_hex().as_str() != pack {
        damage.push(Damage {
            blob: None,
            pack: Some(pack.to_string()),
            message: "its content does not match its name (altered or truncated)".into(),
        });
    }
    for (id, e) in blobs {
        let end = e.offset as usize + e.length as usize;
        let Some(stored) = bytes.get(e.offset as usize..end) else {
            damage.push(Damage {
                blob: Some(*id),
                pack: Some(pack.to_string()),
                message: "the pack is truncated".into(),
            });
            continue;
        };
        if let Err(message) = decode_blob(key, id, stored, e.raw_length) {
            damage.push(Damage {
                blob: Some(*id),
                pack: Some(pack.to_string()),
                message,
            });
        }
    }
    damage
}
