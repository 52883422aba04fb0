//! The repository: an encrypted, content-addressed store of snapshots.
//!
//! Layout under a backend root:
//! - `config`: plaintext JSON, format version and repository id;
//! - `keys/<id>`: the master key wrapped by a password or key file;
//! - `data/<xx>/<pack-id>`: packs of encrypted blobs followed by an encrypted
//!   header; the pack id is the BLAKE3 hash of its bytes;
//! - `index/<id>`: encrypted lists of which blob is where;
//! - `snapshots/<id>`: encrypted snapshot manifests, written last;
//! - `locks/<id>`: who is using the repository.
//!
//! Blobs are zstd-compressed, encrypted (XChaCha20-Poly1305) and named by a
//! keyed BLAKE3 hash of their plaintext, so identical content is stored once
//! across all backups. Every read verifies the tag and the hash.
//!
//! Concurrency is lock-free for writers: packs and index files get names
//! nobody else can produce and are never rewritten, so two backups may run
//! at once. Each takes a *shared* lock only to keep `prune` away; `prune`
//! takes an *exclusive* lock and refuses to start while a live shared lock
//! exists. Locks of dead processes (same host) or not refreshed for 30
//! minutes are stale and ignored.

pub mod backend;
pub mod crypto;
mod lock;
mod maintenance;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use backend::{
    Backend, BackendError, LocalBackend, Location, ObjectInfo, S3Backend, S3Location,
    parse_location,
};
pub use lock::RepoLock;
pub use maintenance::{Damage, PruneReport, RepoStats, VerifyReport};
pub use writer::{PackWriter, WriteStats};

use crypto::{KeyFile, MasterKey, Tampered};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{location} is not a ferry repository (no config); create one with `ferry repo init`")]
    NotInitialized { location: String },
    #[error("{location} already holds a repository")]
    AlreadyInitialized { location: String },
    #[error(
        "wrong password or key for the repository at {location}: none of its {keys} key file(s) could be unlocked"
    )]
    WrongKey { location: String, keys: usize },
    #[error("repository location '{location}' is not valid: {message}")]
    BadLocation { location: String, message: String },
    #[error("cannot read key file {path}: {message}")]
    KeySource { path: String, message: String },
    #[error(
        "repository format {found} is not supported by this version of ferry (it reads {FORMAT_VERSION}); upgrade ferry"
    )]
    UnsupportedFormat { found: u32 },
    #[error("blob {blob} is not in the repository index (was it pruned, or is the index damaged?)")]
    BlobNotFound { blob: BlobId },
    #[error("blob {blob} in pack {pack} is damaged: {message}")]
    Damaged {
        blob: BlobId,
        pack: String,
        message: String,
    },
    #[error("{what} is damaged: {message}")]
    Corrupt { what: String, message: String },
    #[error("no snapshot named or identified by '{0}'")]
    SnapshotNotFound(String),
    #[error("'{0}' matches several snapshot ids; give more characters")]
    AmbiguousSnapshot(String),
    #[error("the repository is locked by {holder}; {hint}")]
    Locked { holder: String, hint: String },
}

/// The keyed hash naming a blob, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &hex::encode(self.0)[..12])
    }
}

impl FromStr for BlobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s).map_err(|e| format!("blob id '{s}': {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("blob id '{s}' is not 32 bytes"))?;
        Ok(BlobId(arr))
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Identifies a snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub String);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot manifest: small, listed without reading any blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The root blob, defined by the writer.
    pub content: BlobId,
    /// Blob holding the ids of every other blob the snapshot references
    /// (`content` is named here already, so an unchanged snapshot's list
    /// deduplicates against the previous one).
    pub refs: BlobId,
    #[serde(default)]
    pub summary: serde_json::Value,
}

/// How to unlock the repository.
pub enum KeySource {
    Password(Zeroizing<String>),
    /// A file whose contents (at least 32 bytes) are the secret.
    KeyFile(std::path::PathBuf),
}

impl KeySource {
    fn secret(&self) -> Result<(&'static str, Zeroizing<Vec<u8>>), RepoError> {
        match self {
            KeySource::Password(p) => Ok(("argon2id", Zeroizing::new(p.as_bytes().to_vec()))),
            KeySource::KeyFile(path) => {
                let bytes =
                    Zeroizing::new(std::fs::read(path).map_err(|e| RepoError::KeySource {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?);
                if bytes.len() < 32 {
                    return Err(RepoError::KeySource {
                        path: path.display().to_string(),
                        message: format!(
                            "{} bytes is too short; a key file needs at least 32 random bytes (e.g. head -c 64 /dev/urandom > key)",
                            bytes.len()
                        ),
                    });
                }
                Ok(("keyfile", bytes))
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Config {
    version: u32,
    id: String,
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexEntry {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// One pack's entries, as index files and pack headers store them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PackEntries {
    pub id: String,
    pub blobs: Vec<BlobEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BlobEntry {
    pub id: BlobId,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct IndexFile {
    pub packs: Vec<PackEntries>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    packs: Vec<String>,
    pack_numbers: HashMap<String, u32>,
    blobs: HashMap<BlobId, IndexEntry>,
    /// Index files read, and those that could not be.
    files: Vec<String>,
    damaged_files: Vec<(String, String)>,
}

impl Index {
    fn add_pack(&mut self, pack: &PackEntries) {
        let number = *self.pack_numbers.entry(pack.id.clone()).or_insert_with(|| {
            self.packs.push(pack.id.clone());
            (self.packs.len() - 1) as u32
        });
        for b in &pack.blobs {
            self.blobs.insert(
                b.id,
                IndexEntry {
                    pack: number,
                    offset: b.offset,
                    length: b.length,
                    raw_length: b.raw_length,
                },
            );
        }
    }
}

pub(crate) fn pack_path(id: &str) -> String {
    format!("data/{}/{id}", &id[..2.min(id.len())])
}

pub(crate) struct Inner {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    id: String,
    index: RwLock<Index>,
}

/// An open repository. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.backend.location())
            .field("id", &self.inner.id)
            .finish()
    }
}

/// zstd level of stored blobs: most are single objects of a few KB, where
/// higher levels gain little.
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    // A zstd context costs more to set up than to compress one object with
    // (level 3 allocates its tables anew each time): one per thread, reused.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd of `plaintext`, with this thread's compression context.
pub(crate) fn compress(plaintext: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = cell.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("a zstd context can be created")
        });
        compressor
            .compress(plaintext)
            .expect("compressing in memory cannot fail")
    })
}

/// The plaintext of a zstd frame of `raw_length` bytes, with this thread's context.
fn decompress(compressed: &[u8], raw_length: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(compressed, raw_length)
    })
}

/// Encodes plaintext as stored: zstd, then sealed.
pub(crate) fn encode_blob(key: &MasterKey, plaintext: &[u8]) -> Vec<u8> {
    key.seal(&compress(plaintext))
}

fn decode_blob(
    key: &MasterKey,
    id: &BlobId,
    stored: &[u8],
    raw_length: u32,
) -> Result<Vec<u8>, String> {
    let compressed = key
        .open(stored)
        .map_err(|Tampered| "authentication failed (the data was altered)".to_string())?;
    let plaintext = decompress(&compressed, raw_length as usize)
        .map_err(|e| format!("decompression failed: {e}"))?;
    if key.blob_hash(&plaintext) != id.0 {
        return Err("content does not match its id".into());
    }
    Ok(plaintext)
}

/// A list of blob ids, as stored in a snapshot's `refs` blob.
pub fn encode_refs(ids: &[BlobId]) -> Vec<u8> {
    let mut sorted: Vec<&BlobId> = ids.iter().collect();
    sorted.sort();
    sorted.dedup();
    sorted.iter().flat_map(|id| id.0).collect()
}

pub fn decode_refs(bytes: &[u8]) -> Result<Vec<BlobId>, String> {
    if !bytes.len().is_multiple_of(32) {
        return Err(format!(
            "a reference list of {} bytes is not a multiple of 32",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| BlobId(c.try_into().expect("32 bytes")))
        .collect())
}

impl Repository {
    /// Creates a repository with a fresh random master key.
    pub async fn init(backend: Arc<dyn Backend>, key: &KeySource) -> Result<Self, RepoError> {
        match backend.get("config").await {
            Ok(_) => {
                return Err(RepoError::AlreadyInitialized {
                    location: backend.location(),
                });
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let (kdf, secret) = key.secret()?;
        let master = MasterKey::random();
        let key_file = KeyFile::wrap(&master, kdf, &secret);
        let key_id = hex::encode(rand::random::<[u8; 16]>());
        backend
            .put(
                &format!("keys/{key_id}"),
                Bytes::from(serde_json::to_vec_pretty(&key_file).expect("key file serializes")),
            )
            .await?;
        let config = Config {
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
        };
        // The config is written last: a repository is initialized once it exists.
        backend
            .put(
                "config",
                Bytes::from(serde_json::to_vec_pretty(&config).expect("config serializes")),
            )
            .await?;
        Ok(Repository {
            inner: Arc::new(Inner {
                backend,
                key: master,
                id: config.id,
                index: RwLock::new(Index::default()),
            }),
        })
    }

    /// Opens a repository: checks the key, then loads the index.
    pub async fn open(backend: Arc<dyn Backend>, key: &KeySource) -> Result<Self, RepoError> {
        let config_bytes = match backend.get("config").await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NotInitialized {
                    location: backend.location(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let config: Config =
            serde_json::from_slice(&config_bytes).map_err(|e| RepoError::Corrupt {
                what: "config".into(),
                message: e.to_string(),
            })?;
        if config.version != FORMAT_VERSION {
            return Err(RepoError::UnsupportedFormat {
                found: config.version,
            });
        }
        let (kdf, secret) = key.secret()?;
        let key_files = backend.list("keys/").await?;
        let mut master = None;
        for info in &key_files {
            let bytes = backend.get(&info.path).await?;
            let Ok(file) = serde_json::from_slice::<KeyFile>(&bytes) else {
                continue;
            };
            if file.kdf != kdf {
                continue;
            }
            let file_clone = file.clone();
            let secret = secret.clone();
            if let Some(k) = tokio::task::spawn_blocking(move || file_clone.unwrap(&secret))
                .await
                .expect("key derivation task")
            {
                master = Some(k);
                break;
            }
        }
        let Some(master) = master else {
            return Err(RepoError::WrongKey {
                location: backend.location(),
                keys: key_files.len(),
            });
        };
        let repo = Repository {
            inner: Arc::new(Inner {
                backend,
                key: master,
                id: config.id,
                index: RwLock::new(Index::default()),
            }),
        };
        repo.reload_index().await?;
        Ok(repo)
    }

    pub(crate) async fn read_index_files(&self) -> Result<Index, RepoError> {
        let files = self.inner.backend.list("index/").await?;
        let loaded: Vec<(String, Result<IndexFile, String>)> = futures::stream::iter(files)
            .map(|f| async move {
                let result = match self.inner.backend.get(&f.path).await {
                    Ok(bytes) => self.decode_json::<IndexFile>(&bytes),
                    Err(e) => Err(e.to_string()),
                };
                (f.path, result)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut index = Index::default();
        for (path, file) in loaded {
            match file {
                Ok(file) => {
                    for pack in &file.packs {
                        index.add_pack(pack);
                    }
                    index.files.push(path);
                }
                Err(message) => index.damaged_files.push((path, message)),
            }
        }
        index.files.sort();
        Ok(index)
    }

    async fn reload_index(&self) -> Result<(), RepoError> {
        let index = self.read_index_files().await?;
        *self.inner.index.write().expect("index lock") = index;
        Ok(())
    }

    fn decode_json<T: serde::de::DeserializeOwned>(&self, sealed: &[u8]) -> Result<T, String> {
        let compressed = self.inner.key.open(sealed).map_err(|_| {
            "authentication failed (altered, or written with another key)".to_string()
        })?;
        let plain = zstd::stream::decode_all(&compressed[..])
            .map_err(|e| format!("decompression failed: {e}"))?;
        serde_json::from_slice(&plain).map_err(|e| format!("not valid: {e}"))
    }

    pub(crate) fn encode_json<T: Serialize>(&self, value: &T) -> Bytes {
        let plain = serde_json::to_vec(value).expect("repository records serialize");
        let compressed = compress(&plain);
        Bytes::from(self.inner.key.seal(&compressed))
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn location(&self) -> String {
        self.inner.backend.location()
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    pub(crate) fn key(&self) -> &MasterKey {
        &self.inner.key
    }

    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(self.inner.key.blob_hash(plaintext))
    }

    pub(crate) fn has_blob(&self, id: &BlobId) -> bool {
        self.inner
            .index
            .read()
            .expect("index lock")
            .blobs
            .contains_key(id)
    }

    pub(crate) fn add_to_index(&self, packs: &[PackEntries]) {
        let mut index = self.inner.index.write().expect("index lock");
        for p in packs {
            index.add_pack(p);
        }
    }

    /// Starts a backup session's writer.
    pub fn writer(&self) -> PackWriter {
        PackWriter::new(self.clone())
    }

    /// Reads and verifies one blob.
    pub async fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>, RepoError> {
        let (pack, entry) = {
            let index = self.inner.index.read().expect("index lock");
            let entry = *index
                .blobs
                .get(id)
                .ok_or(RepoError::BlobNotFound { blob: *id })?;
            (index.packs[entry.pack as usize].clone(), entry)
        };
        let stored = self
            .inner
            .backend
            .get_range(&pack_path(&pack), entry.offset as u64, entry.length as u64)
            .await
            .map_err(|e| RepoError::Damaged {
                blob: *id,
                pack: pack.clone(),
                message: e.to_string(),
            })?;
        let key = self.inner.key.clone();
        let blob = *id;
        tokio::task::spawn_blocking(move || decode_blob(&key, &blob, &stored, entry.raw_length))
            .await
            .expect("decode task")
            .map_err(|message| RepoError::Damaged {
                blob: *id,
                pack,
                message,
            })
    }

    /// Writes a snapshot manifest: the step that makes a backup exist.
    pub async fn save_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId, RepoError> {
        let id = hex::encode(rand::random::<[u8; 32]>());
        self.inner
            .backend
            .put(&format!("snapshots/{id}"), self.encode_json(snap))
            .await?;
        Ok(SnapshotId(id))
    }

    pub async fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
        let files = self.inner.backend.list("snapshots/").await?;
        let loaded: Vec<Result<(SnapshotId, Snapshot), RepoError>> = futures::stream::iter(files)
            .map(|f| async move {
                let id = f.path.trim_start_matches("snapshots/").to_string();
                let bytes = self.inner.backend.get(&f.path).await?;
                let snap =
                    self.decode_json::<Snapshot>(&bytes)
                        .map_err(|message| RepoError::Corrupt {
                            what: format!("snapshot manifest {id}"),
                            message,
                        })?;
                Ok((SnapshotId(id), snap))
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut out = loaded.into_iter().collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (&a.1.created, &a.0).cmp(&(&b.1.created, &b.0)));
        Ok(out)
    }

    /// By name (the newest with that name) or by a unique id prefix.
    pub async fn find_snapshot(
        &self,
        name_or_id: &str,
    ) -> Result<(SnapshotId, Snapshot), RepoError> {
        let all = self.list_snapshots().await?;
        if let Some(found) = all.iter().rev().find(|(_, s)| s.name == name_or_id) {
            return Ok(found.clone());
        }
        let by_id: Vec<_> = all
            .iter()
            .filter(|(id, _)| !name_or_id.is_empty() && id.0.starts_with(name_or_id))
            .collect();
        match by_id.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(RepoError::SnapshotNotFound(name_or_id.to_string())),
            _ => Err(RepoError::AmbiguousSnapshot(name_or_id.to_string())),
        }
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self
            .inner
            .backend
            .delete(&format!("snapshots/{}", id.0))
            .await?)
    }

    pub async fn lock_shared(&self) -> Result<RepoLock, RepoError> {
        lock::acquire(self.inner.backend.clone(), false).await
    }

    pub async fn lock_exclusive(&self) -> Result<RepoLock, RepoError> {
        lock::acquire(self.inner.backend.clone(), true).await
    }

    /// Every blob id the snapshots reference.
    pub(crate) async fn live_blobs(&self) -> Result<std::collections::HashSet<BlobId>, RepoError> {
        let mut live = std::collections::HashSet::new();
        for (id, snap) in self.list_snapshots().await? {
            live.insert(snap.content);
            live.insert(snap.refs);
            let refs = self.read_blob(&snap.refs).await?;
            let ids = decode_refs(&refs).map_err(|message| RepoError::Corrupt {
                what: format!("reference list of snapshot {} ({id})", snap.name),
                message,
            })?;
            live.extend(ids);
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests;
