//! A backup session's writer: deduplicates blobs against the index loaded
//! when the session took its lock (never against blobs marked for
//! deletion), packs new ones into ~8 MiB packs uploaded in the background (a
//! bounded number at a time), and writes the session's index file when
//! finished. A writer dropped without `finish` leaves only packs no index
//! names: invisible to readers, reclaimed by prune.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::aligned::AlignedVec;

use super::{
    BlobEntry, BlobId, IdSet, IndexFile, PackEntries, RepoError, Repository, encode_blob, pack_path,
};

/// Target size of a pack.
pub const PACK_TARGET: usize = 8 * 1024 * 1024;
/// Uploads in flight at once; each holds one pack in memory.
const MAX_UPLOADS: usize = 2;

/// Pack buffers back from finished uploads. A backup writes hundreds of
/// packs: reusing a few keeps their memory faulted in, instead of the
/// kernel zeroing fresh pages for every pack.
type PackPool = Arc<Mutex<Vec<AlignedVec>>>;

/// A pack handed to the store. It is built in block-aligned memory, so a
/// local repository writes it past the page cache without copying it;
/// its buffer returns to the writer's pool once the store is done with it.
struct PackBytes {
    pack: Option<AlignedVec>,
    pool: PackPool,
}

impl AsRef<[u8]> for PackBytes {
    fn as_ref(&self) -> &[u8] {
        self.pack.as_ref().map_or(&[], AlignedVec::as_slice)
    }
}

impl Drop for PackBytes {
    fn drop(&mut self) {
        if let Some(mut pack) = self.pack.take() {
            pack.clear();
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < MAX_UPLOADS {
                pool.push(pack);
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteStats {
    pub blobs_added: u64,
    pub blobs_deduplicated: u64,
    /// Plaintext bytes offered to the writer (new and deduplicated).
    pub bytes_plaintext: u64,
    /// Bytes written to the store: packs and the index file.
    pub bytes_stored: u64,
    pub packs_written: u64,
}

pub struct PackWriter {
    repo: Repository,
    pack_target: usize,
    buffer: Option<AlignedVec>,
    pool: PackPool,
    entries: Vec<BlobEntry>,
    session: IdSet,
    written: Vec<PackEntries>,
    uploads: JoinSet<Result<(), RepoError>>,
    stats: WriteStats,
}

impl PackWriter {
    pub(crate) fn new(repo: Repository) -> Self {
        PackWriter {
            repo,
            pack_target: PACK_TARGET,
            buffer: None,
            pool: PackPool::default(),
            entries: Vec::new(),
            session: IdSet::default(),
            written: Vec::new(),
            uploads: JoinSet::new(),
            stats: WriteStats::default(),
        }
    }

    /// Changes the pack size (tests use small packs to get many of them).
    pub fn with_pack_target(mut self, bytes: usize) -> Self {
        self.pack_target = bytes.max(1);
        self
    }

    pub fn stats(&self) -> WriteStats {
        self.stats.clone()
    }

    /// Stores a blob unless the repository already has it; returns its id.
    pub async fn add(&mut self, plaintext: &[u8]) -> Result<BlobId, RepoError> {
        self.add_inner(plaintext, true).await
    }

    /// Stores a blob even if the index has it: prune moves live blobs out of
    /// packs it is about to delete.
    pub(crate) async fn force_add(&mut self, plaintext: &[u8]) -> Result<BlobId, RepoError> {
        self.add_inner(plaintext, false).await
    }

    async fn add_inner(
        &mut self,
        plaintext: &[u8],
        dedup_with_index: bool,
    ) -> Result<BlobId, RepoError> {
        let id = self.repo.blob_id(plaintext);
        self.stats.bytes_plaintext += plaintext.len() as u64;
        if self.session.contains(&id) || (dedup_with_index && self.repo.has_blob(&id)) {
            self.stats.blobs_deduplicated += 1;
            return Ok(id);
        }
        let stored = encode_blob(self.repo.key(), plaintext);
        self.append(id, &stored, plaintext.len() as u32).await?;
        Ok(id)
    }

    /// Counts a blob the caller knows by id (an unchanged object) as
    /// deduplicated; `false` when neither this session nor the index has
    /// it, so the caller must store it.
    pub fn has_existing(&mut self, id: &BlobId, plaintext_length: u64) -> bool {
        if self.session.contains(id) || self.repo.has_blob(id) {
            self.stats.blobs_deduplicated += 1;
            self.stats.bytes_plaintext += plaintext_length;
            true
        } else {
            false
        }
    }

    /// Stores a blob encoded elsewhere (by [`Repository::encode_chunk`] on
    /// another thread). The caller decided it is new; a blob this session
    /// already stored is counted as deduplicated and dropped.
    pub(crate) async fn add_encoded(
        &mut self,
        id: BlobId,
        stored: &[u8],
        raw_length: u32,
    ) -> Result<(), RepoError> {
        self.stats.bytes_plaintext += raw_length as u64;
        if self.session.contains(&id) {
            self.stats.blobs_deduplicated += 1;
            return Ok(());
        }
        self.append(id, stored, raw_length).await
    }

    async fn append(
        &mut self,
        id: BlobId,
        stored: &[u8],
        raw_length: u32,
    ) -> Result<(), RepoError> {
        let buffer = self.buffer.get_or_insert_with(|| {
            // Sized once: grown by doubling, a pack would be copied several
            // times over into newly faulted memory. The header (a JSON
            // entry per blob) gets a sixty-fourth.
            let target = self.pack_target.min(PACK_TARGET);
            let reused = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            reused.unwrap_or_else(|| AlignedVec::with_capacity(target + target / 64 + stored.len()))
        });
        self.entries.push(BlobEntry {
            id,
            offset: buffer.len() as u32,
            length: stored.len() as u32,
            raw_length,
        });
        buffer.extend_from_slice(stored);
        let full = buffer.len() >= self.pack_target;
        self.session.insert(id);
        self.stats.blobs_added += 1;
        if full {
            self.flush().await?;
        }
        Ok(())
    }

    /// Seals the current pack and starts its upload.
    async fn flush(&mut self) -> Result<(), RepoError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= MAX_UPLOADS {
            if let Some(done) = self.uploads.join_next().await {
                done.expect("upload task")?;
            }
        }
        let mut pack = self
            .buffer
            .take()
            .expect("a pack with entries has a buffer");
        let entries = std::mem::take(&mut self.entries);
        // The header repeats the index entries so a pack can be understood
        // on its own (e.g. to rebuild a lost index).
        let header = self
            .repo
            .key()
            .seal(&serde_json::to_vec(&entries).expect("entries serialize"));
        pack.extend_from_slice(&header);
        pack.extend_from_slice(&(header.len() as u32).to_le_bytes());
        let id = blake3::hash(pack.as_slice()).to_hex().to_string();
        self.stats.bytes_stored += pack.len() as u64;
        self.stats.packs_written += 1;
        self.written.push(PackEntries {
            id: id.clone(),
            blobs: entries,
        });
        let backend = self.repo.backend().clone();
        let pack = Bytes::from_owner(PackBytes {
            pack: Some(pack),
            pool: self.pool.clone(),
        });
        self.uploads
            .spawn(async move { Ok(backend.put(&pack_path(&id), pack).await?) });
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), RepoError> {
        self.flush().await?;
        while let Some(done) = self.uploads.join_next().await {
            done.expect("upload task")?;
        }
        Ok(())
    }

    /// Uploads what is left and writes the index file: from here on, the
    /// session's blobs are visible to readers.
    pub async fn finish(mut self) -> Result<WriteStats, RepoError> {
        self.drain().await?;
        self.repo.inner.pauses.at("writer:uploaded").await;
        if !self.written.is_empty() {
            let file = IndexFile {
                packs: std::mem::take(&mut self.written),
            };
            let bytes = self.repo.encode_index(&file);
            self.stats.bytes_stored += bytes.len() as u64;
            let name = hex::encode(rand::random::<[u8; 32]>());
            self.repo
                .backend()
                .put(&format!("index/{name}"), bytes)
                .await?;
            self.repo.add_to_index(&file.packs);
        }
        Ok(self.stats)
    }
}
