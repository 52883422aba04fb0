//! Repository maintenance: `verify` (every problem, never only the first),
//! `prune` (free what no snapshot references) and `stats`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::{
    BlobEntry, BlobId, DeletionMark, IndexFile, PackEntries, RepoError, Repository, decode_blob,
    pack_path,
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

/// What a prune did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    /// Packs deleted now: marked by an earlier prune, still unneeded, and
    /// every session that was running then has ended.
    pub packs_removed: usize,
    pub bytes_removed: u64,
    /// Packs found unreferenced now and marked; a later prune deletes them.
    pub packs_marked: usize,
    pub bytes_marked: u64,
    /// Unreferenced blobs in the packs marked now.
    pub blobs_removed: usize,
    /// Mostly unreferenced packs whose live blobs were copied to new packs
    /// (the old packs are among those marked).
    pub packs_rewritten: usize,
    /// Marked packs a snapshot turned out to need: kept and unmarked.
    pub packs_kept: usize,
    /// Marked packs that wait for the sessions in `waiting_for` to end.
    pub packs_waiting: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Lock files of processes of this host that no longer run, removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_locks_removed: Vec<String>,
}

/// What `repo repair` found and did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepairReport {
    /// Packs in the rebuilt index, and their blobs.
    pub packs_indexed: usize,
    pub blobs_indexed: usize,
    /// Index files replaced by the rebuilt one; the unreadable ones among them.
    pub index_files_replaced: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged_index_files: Vec<String>,
    /// Deletion marks that could not be read, removed (their packs are
    /// judged again by the next prune).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged_marks_removed: Vec<String>,
    /// Snapshot manifests that were read but are not valid, removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged_snapshots_removed: Vec<String>,
    /// What cannot be recovered: packs whose header is unreadable and that
    /// no readable index describes, and snapshots that need missing blobs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unrecoverable: Vec<String>,
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
        let blobs = self.read_index_files().await?.blobs.len();
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
                message: format!("{file} is unreadable: {message}; `ferry repo repair` rebuilds the index from the packs"),
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

    /// Frees what no snapshot needs, in two phases (see the module docs of
    /// `repo`): deletes the packs of earlier deletion marks whose sessions
    /// have all ended and that are still unneeded, then marks the packs that
    /// are unreferenced now. Needs the repository to itself (exclusive
    /// lock), and refuses to do anything while an index file, deletion mark
    /// or snapshot cannot be read.
    pub async fn prune(&self, dry_run: bool) -> Result<PruneReport, RepoError> {
        let lock = self.lock_exclusive().await?;
        let result = self.prune_locked(&lock, dry_run).await;
        lock.release().await?;
        result
    }

    async fn prune_locked(
        &self,
        lock: &super::RepoLock,
        dry_run: bool,
    ) -> Result<PruneReport, RepoError> {
        let mut report = PruneReport::default();
        if !dry_run {
            report.dead_locks_removed = super::lock::remove_dead(self.backend()).await?;
        }
        let index = self.read_index_files().await?;
        let listing = self.snapshot_listing().await?;
        let mut unreadable: Vec<String> = index
            .damaged_files
            .iter()
            .map(|(file, message)| format!("{file}: {message}"))
            .collect();
        unreadable.extend(
            listing
                .damaged
                .iter()
                .map(|d| format!("snapshots/{}: {}", d.id, d.message)),
        );
        if !unreadable.is_empty() {
            return Err(RepoError::Unreadable(unreadable));
        }
        let live = self.live_blobs(&listing.snapshots).await?;
        let present: HashMap<String, u64> = self
            .backend()
            .list("data/")
            .await?
            .into_iter()
            .map(|o| (pack_name(&o.path), o.size))
            .collect();
        let locks_now: Vec<String> = super::lock::paths(self.backend()).await?;
        let size = |pack: &str| present.get(pack).copied().unwrap_or(0);

        // Phase 2: delete the packs of marks whose sessions have all ended.
        let mut sweepable_marks = Vec::new();
        let mut waiting_packs: HashSet<&String> = HashSet::new();
        let mut waiting_locks: Vec<&String> = Vec::new();
        for (path, mark) in &index.marks {
            let blocking: Vec<&String> = mark
                .locks
                .iter()
                .filter(|l| locks_now.contains(*l))
                .collect();
            if blocking.is_empty() {
                sweepable_marks.push(path.clone());
            } else {
                waiting_packs.extend(&mark.packs);
                waiting_locks.extend(blocking);
            }
        }
        let mut candidates: Vec<&String> = index
            .marks
            .iter()
            .filter(|(path, _)| sweepable_marks.contains(path))
            .flat_map(|(_, m)| &m.packs)
            .filter(|p| !waiting_packs.contains(p))
            .collect();
        candidates.sort();
        candidates.dedup();
        // A marked pack is needed when it holds a live blob whose preferred
        // copy is in a marked pack (i.e. no unmarked pack has it).
        let needed = |number: usize| {
            index.pack_entries[number].iter().any(|e| {
                live.contains(&e.id)
                    && index
                        .blobs
                        .get(&e.id)
                        .is_some_and(|found| index.pack_condemned[found.pack as usize])
            })
        };
        let mut delete_now: HashSet<String> = HashSet::new();
        for pack in candidates {
            match index.pack_numbers.get(pack) {
                Some(n) if needed(*n as usize) => report.packs_kept += 1,
                _ => {
                    if present.contains_key(pack) {
                        report.packs_removed += 1;
                        report.bytes_removed += size(pack);
                    }
                    delete_now.insert(pack.clone());
                }
            }
        }
        report.packs_waiting = waiting_packs.len();
        waiting_locks.sort();
        waiting_locks.dedup();
        for lock_path in waiting_locks {
            report
                .waiting_for
                .push(super::lock::describe(self.backend(), lock_path).await);
        }

        // Phase 1: mark what is unreferenced now.
        let mut to_mark: Vec<String> = Vec::new();
        let mut rewrite: Vec<BlobId> = Vec::new();
        for (number, pack) in index.packs.iter().enumerate() {
            if index.pack_condemned[number] || !present.contains_key(pack) {
                continue;
            }
            let entries = &index.pack_entries[number];
            let live_here: Vec<&BlobEntry> =
                entries.iter().filter(|e| live.contains(&e.id)).collect();
            if live_here.is_empty() {
                to_mark.push(pack.clone());
                report.blobs_removed += entries.len();
            } else if live_here.len() * 2 < entries.len() {
                to_mark.push(pack.clone());
                report.packs_rewritten += 1;
                report.blobs_removed += entries.len() - live_here.len();
                // Copies needed only where this pack holds the copy read.
                rewrite.extend(
                    live_here
                        .iter()
                        .filter(|e| {
                            index
                                .blobs
                                .get(&e.id)
                                .is_some_and(|found| found.pack as usize == number)
                        })
                        .map(|e| e.id),
                );
            }
        }
        // Packs no index names: left by interrupted backups (or being
        // written by a backup whose lock looks stale: the mark waits for it).
        for pack in present.keys() {
            if !index.pack_numbers.contains_key(pack) && !index.condemned.contains(pack) {
                to_mark.push(pack.clone());
            }
        }
        to_mark.sort();
        to_mark.dedup();
        report.packs_marked = to_mark.len();
        report.bytes_marked = to_mark.iter().map(|p| size(p)).sum();
        if dry_run {
            return Ok(report);
        }

        // Every step below leaves a valid repository if the process stops
        // after it. Live blobs of rewritten packs go into new packs first...
        if !rewrite.is_empty() {
            let mut writer = self.writer(lock);
            for id in rewrite {
                let plain = self.read_blob(&id).await?;
                writer.force_add(&plain).await?;
            }
            writer.finish().await?;
        }
        self.inner.pauses.at("prune:rewritten").await;
        // ...then one index of what stays replaces the index files read,
        // then marked packs are deleted, then their marks...
        if !sweepable_marks.is_empty() || index.files.len() > 1 {
            let file = IndexFile {
                packs: index
                    .packs
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !delete_now.contains(*p))
                    .map(|(n, p)| PackEntries {
                        id: p.clone(),
                        blobs: index.pack_entries[n].clone(),
                    })
                    .collect(),
            };
            let name = hex::encode(rand::random::<[u8; 32]>());
            self.backend()
                .put(&format!("index/{name}"), self.encode_index(&file))
                .await?;
            for old in &index.files {
                self.backend().delete(old).await?;
            }
            for pack in &delete_now {
                self.backend().delete(&pack_path(pack)).await?;
            }
            for mark in &sweepable_marks {
                self.backend().delete(mark).await?;
            }
        }
        self.inner.pauses.at("prune:swept").await;
        // ...and last the new mark, naming every lock that exists now.
        if !to_mark.is_empty() {
            let mark = DeletionMark {
                created: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                packs: to_mark,
                locks: super::lock::paths(self.backend()).await?,
            };
            let name = hex::encode(rand::random::<[u8; 32]>());
            self.backend()
                .put(&format!("deletions/{name}"), self.encode_json(&mark))
                .await?;
        }
        self.inner.pauses.at("prune:marked").await;
        self.reload_index().await?;
        Ok(report)
    }

    /// Rebuilds the index from the pack headers (every pack repeats its own
    /// entries), removes deletion marks and snapshot manifests that were
    /// read and are not valid, and lists what cannot be recovered. Stops
    /// without changing anything when the store cannot read a file (which
    /// may be a transient error). Needs the exclusive lock.
    pub async fn repair(&self, dry_run: bool) -> Result<RepairReport, RepoError> {
        let lock = self.lock_exclusive().await?;
        let result = self.repair_locked(dry_run).await;
        lock.release().await?;
        result
    }

    async fn repair_locked(&self, dry_run: bool) -> Result<RepairReport, RepoError> {
        let mut report = RepairReport::default();
        let read_failure = |what: String, e: super::BackendError| {
            RepoError::Unreadable(vec![format!(
                "{what}: {e} (nothing was changed; retry when the store reads it)"
            )])
        };
        // Index files: readable ones are a second source of entries.
        let mut from_index: HashMap<String, Vec<BlobEntry>> = HashMap::new();
        let index_files = self.backend().list("index/").await?;
        for f in &index_files {
            let bytes = self
                .backend()
                .get(&f.path)
                .await
                .map_err(|e| read_failure(f.path.clone(), e))?;
            match self.decode_index(&bytes) {
                Ok(file) => {
                    for pack in file.packs {
                        from_index.entry(pack.id).or_insert(pack.blobs);
                    }
                }
                Err(message) => report
                    .damaged_index_files
                    .push(format!("{}: {message}", f.path)),
            }
        }
        report.index_files_replaced = index_files.len();
        // Pack headers.
        let packs = self.backend().list("data/").await?;
        let mut rebuilt = IndexFile::default();
        for object in &packs {
            let id = pack_name(&object.path);
            let header = self
                .pack_header(&object.path, object.size)
                .await
                .map_err(|e| read_failure(object.path.clone(), e))?;
            let entries = match header {
                Ok(entries) => entries,
                Err(message) => match from_index.get(&id) {
                    Some(entries) => entries.clone(),
                    None => {
                        report.unrecoverable.push(format!(
                            "pack {id}: its header is unreadable ({message}) and no index describes it; its blobs are lost"
                        ));
                        continue;
                    }
                },
            };
            rebuilt.packs.push(PackEntries { id, blobs: entries });
        }
        report.packs_indexed = rebuilt.packs.len();
        report.blobs_indexed = rebuilt.packs.iter().map(|p| p.blobs.len()).sum();
        // Deletion marks and snapshots.
        let (_, damaged_marks) = self.read_marks().await?;
        report.damaged_marks_removed = damaged_marks.iter().map(|(p, _)| p.clone()).collect();
        let listing = self.snapshot_listing().await?;
        for damaged in &listing.damaged {
            if damaged.read_error {
                report.unrecoverable.push(format!(
                    "snapshot {}: {} (left in place; retry when the store reads it)",
                    damaged.id, damaged.message
                ));
            } else {
                report
                    .damaged_snapshots_removed
                    .push(format!("{}: {}", damaged.id, damaged.message));
            }
        }
        if !dry_run {
            let name = hex::encode(rand::random::<[u8; 32]>());
            self.backend()
                .put(&format!("index/{name}"), self.encode_index(&rebuilt))
                .await?;
            for f in &index_files {
                self.backend().delete(&f.path).await?;
            }
            for (path, _) in &damaged_marks {
                self.backend().delete(path).await?;
            }
            for damaged in listing.damaged.iter().filter(|d| !d.read_error) {
                self.delete_snapshot(&damaged.id).await?;
            }
        }
        // What the snapshots need that no pack holds.
        let mut available: HashSet<BlobId> = HashSet::new();
        for pack in &rebuilt.packs {
            available.extend(pack.blobs.iter().map(|b| b.id));
        }
        let mut index = super::Index {
            loaded: true,
            ..Default::default()
        };
        for pack in &rebuilt.packs {
            index.add_pack(pack);
        }
        *self.inner.index.write().expect("index lock") = index;
        for (id, snap) in &listing.snapshots {
            let refs = match self.read_blob(&snap.refs).await {
                Ok(bytes) => super::decode_refs(&bytes),
                Err(e) => Err(e.to_string()),
            };
            let mut needed = vec![snap.content, snap.refs];
            match refs {
                Ok(ids) => needed.extend(ids),
                Err(message) => {
                    report.unrecoverable.push(format!(
                        "snapshot {} ({id}): its reference list is unreadable ({message}); delete it with `ferry backup delete {id}`",
                        snap.name
                    ));
                    continue;
                }
            }
            let missing = needed.iter().filter(|b| !available.contains(b)).count();
            if missing > 0 {
                report.unrecoverable.push(format!(
                    "snapshot {} ({id}): {missing} of its {} blobs are in no pack; restore what is left with `ferry restore`, or delete it with `ferry backup delete {id}`",
                    snap.name,
                    needed.len()
                ));
            }
        }
        if dry_run {
            self.reload_index().await?;
        }
        Ok(report)
    }

    /// A pack's own entries, from its encrypted header: the outer error is
    /// the store's, the inner one says why the header is not valid.
    async fn pack_header(
        &self,
        path: &str,
        size: u64,
    ) -> Result<Result<Vec<BlobEntry>, String>, super::BackendError> {
        if size < 4 {
            return Ok(Err(format!("the pack is {size} bytes long")));
        }
        let tail = self.backend().get_range(path, size - 4, 4).await?;
        let length = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
        if length + 4 > size {
            return Ok(Err(format!(
                "its header length {length} does not fit the pack"
            )));
        }
        let sealed = self
            .backend()
            .get_range(path, size - 4 - length, length)
            .await?;
        let Ok(plain) = self.key().open(&sealed) else {
            return Ok(Err("authentication failed".into()));
        };
        Ok(serde_json::from_slice(&plain).map_err(|e| format!("not valid: {e}")))
    }
}

/// The pack id of a path under `data/`.
fn pack_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
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
