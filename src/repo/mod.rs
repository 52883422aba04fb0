//! The repository: an encrypted, content-addressed store of snapshots.
//!
//! Layout under a backend root:
//! - `config`: plaintext JSON, format version and repository id;
//! - `keys/<id>`: the master key wrapped by a password or key file;
//! - `data/<xx>/<pack-id>`: packs of encrypted blobs followed by an encrypted
//!   header; the pack id is the BLAKE3 hash of its bytes;
//! - `index/<id>`: encrypted lists of which blob is where;
//! - `snapshots/<id>`: encrypted snapshot manifests, written last;
//! - `deletions/<id>`: deletion marks, packs that prune will delete;
//! - `locks/<id>`: who is using the repository.
//!
//! Blobs are zstd-compressed, encrypted (the repository's [`Cipher`]:
//! XAES-256-GCM or XChaCha20-Poly1305) and named by a
//! keyed BLAKE3 hash of their plaintext, so identical content is stored once
//! across all backups. Every read verifies the tag and the hash.
//!
//! # Concurrency and deletion
//!
//! No sequence of commands, run one after another or at the same time, may
//! lose data a snapshot references. Four rules make sure of it:
//!
//! 1. **Lock first, then read.** Every session that reads or writes data
//!    (backup, restore, transform, verify, describe) takes a *shared* lock
//!    and only then loads the index ([`Repository::lock_shared`] loads it;
//!    [`Repository::open`] only checks the key). Prune and repair take an
//!    *exclusive* lock. Taking a lock writes the lock file and then checks
//!    again for conflicting ones, so of two sessions that start at once at
//!    least one sees the other and backs off. A lock is refreshed every 5
//!    minutes; one not refreshed for 30 minutes, or held by a process of
//!    this host that no longer runs, no longer blocks others.
//! 2. **Prune deletes in two phases.** A prune *marks* the packs no snapshot
//!    needs: it writes a deletion mark naming the packs and every lock file
//!    that exists at that moment, its own included. A later prune *deletes*
//!    the packs of a mark only once every lock the mark names is gone, so
//!    every session that could have read the index before the mark was
//!    written has ended, and only the packs that are still unneeded: a pack
//!    holding a blob that a snapshot references, with no copy in a pack that
//!    stays, is kept and unmarked. Lock files of dead processes of this host
//!    are removed by prune; a lock that is merely stale (not refreshed for 30
//!    minutes) delays deletion until `ferry repo unlock` removes it.
//! 3. **Writers never reuse condemned blobs.** A backup does not deduplicate
//!    against a blob whose only copies are in marked packs (nor against
//!    anything while a deletion mark cannot be read): it stores a new copy.
//!    So a snapshot written after a mark never needs a marked pack, and one
//!    written by a session that read the index before the mark (whose lock
//!    the mark names) is seen when the mark is swept.
//! 4. **Nothing is deleted on a guess.** Prune refuses to mark or delete
//!    anything while an index file, a deletion mark or a snapshot manifest
//!    cannot be read (damaged, or a read error of the store), and names
//!    each: an unreadable index would make its packs look unreferenced.
//!    `ferry repo repair` rebuilds the index from the pack headers (every
//!    pack repeats its own index entries) and lists what it cannot recover.
//!
//! Packs and index files get names nobody else can produce and are never
//! rewritten, so backups run in parallel without coordination; a backup
//! that dies leaves packs no index names, which prune marks and deletes
//! like any other unreferenced pack.

pub mod backend;
pub mod crypto;
mod lock;
mod maintenance;
mod pause;
mod read;
mod stats;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use backend::{
    Backend, BackendError, LocalBackend, Location, ObjectInfo, S3Backend, S3Credentials,
    S3Location, parse_location,
};
pub use lock::RepoLock;
pub use maintenance::{Damage, PruneReport, RepairReport, RepoStats, VerifyReport};
pub use stats::IoStats;
pub use writer::{PackWriter, WriteStats};

pub use crypto::Cipher;
use crypto::{KeyFile, MasterKey, Tampered};

/// The repository format `ferry repo init` writes. Format 2 stores index
/// files in a binary encoding (format 1 in JSON); both are read, and a
/// repository keeps writing the encoding of its own format, so a ferry
/// that reads only format 1 never meets a file it cannot decode.
pub const FORMAT_VERSION: u32 = 2;
/// The repository formats this version opens.
pub const FORMATS_READ: std::ops::RangeInclusive<u32> = 1..=FORMAT_VERSION;

/// The fewest characters of a snapshot id that identify it.
pub const MIN_ID_PREFIX: usize = 8;

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
    #[error(
        "key file {path} of the repository at {location} failed authentication: it is damaged ({message}), so no password can unlock it; restore it from a copy of the repository (the password itself was not the problem)"
    )]
    DamagedKeyFile {
        location: String,
        path: String,
        message: String,
    },
    #[error(
        "an empty password protects nothing: give a password (FERRY_PASSWORD, --password-file or the prompt) or a key file"
    )]
    EmptyPassword,
    #[error("repository location '{location}' is not valid: {message}")]
    BadLocation { location: String, message: String },
    #[error("cannot read key file {path}: {message}")]
    KeySource { path: String, message: String },
    #[error(
        "repository format {found} is not supported by this version of ferry (it reads formats 1 to {FORMAT_VERSION}); upgrade ferry"
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
    #[error(
        "'{0}' is too short to identify a snapshot: give its name, or at least {MIN_ID_PREFIX} characters of its id (see `ferry backup list`)"
    )]
    IdPrefixTooShort(String),
    #[error(
        "snapshot {id} is damaged ({message}); remove it with `ferry backup delete {id}` or `ferry repo repair`"
    )]
    SnapshotDamaged { id: String, message: String },
    #[error(
        "refusing to delete anything: {} file(s) of the repository cannot be read, and the data they name would look unreferenced:\n  - {}\nRun `ferry repo repair`: it rebuilds the index from the packs and removes damaged manifests (or retry if the store had a transient error)",
        .0.len(),
        .0.join("\n  - ")
    )]
    Unreadable(Vec<String>),
    #[error(
        "the repository's index is read only under a lock: take one (Repository::lock_shared) before reading data"
    )]
    NotLocked,
    #[error("the repository is locked by {holder}; {hint}")]
    Locked { holder: String, hint: String },
}

/// The keyed hash naming a blob, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

/// An id is hashed as its first 8 bytes: they are already uniformly
/// random, and unpredictable without the repository's key (so they cannot
/// be chosen to collide), which [`IdHasher`] relies on.
impl std::hash::Hash for BlobId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")));
    }
}

/// A hasher for [`BlobId`] keys: takes the id's own random bits instead of
/// hashing them again (the index of a large repository is millions of
/// lookups per backup and restore).
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    /// Other keys are folded in, a byte at a time (not used by ids).
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
}

/// A map keyed by blob ids, hashed with [`IdHasher`].
pub type IdMap<V> = HashMap<BlobId, V, std::hash::BuildHasherDefault<IdHasher>>;
/// A set of blob ids, hashed with [`IdHasher`].
pub type IdSet = HashSet<BlobId, std::hash::BuildHasherDefault<IdHasher>>;

impl BlobId {
    /// Its hex form, without allocating: trees and index files hold
    /// hundreds of thousands of ids, and they are written and read as hex.
    fn hex(&self) -> [u8; 64] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, byte) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[(byte >> 4) as usize];
            out[2 * i + 1] = DIGITS[(byte & 0xf) as usize];
        }
        out
    }

    fn hex_str(buffer: &[u8; 64]) -> &str {
        std::str::from_utf8(buffer).expect("hex digits are ASCII")
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(BlobId::hex_str(&self.hex()))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &BlobId::hex_str(&self.hex())[..12])
    }
}

impl FromStr for BlobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        /// Each byte's value as a hex digit, 0xff where it is none.
        const NIBBLE: [u8; 256] = {
            let mut table = [0xffu8; 256];
            let mut c = 0;
            while c < 256 {
                table[c] = match c as u8 {
                    b'0'..=b'9' => c as u8 - b'0',
                    b'a'..=b'f' => c as u8 - b'a' + 10,
                    b'A'..=b'F' => c as u8 - b'A' + 10,
                    _ => 0xff,
                };
                c += 1;
            }
            table
        };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(format!(
                "blob id '{s}' is not 32 bytes in hex (64 digits; it has {})",
                digits.len()
            ));
        }
        let mut id = [0u8; 32];
        let mut invalid = 0u8;
        for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
            let (high, low) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
            // 0xff has its high bits set, which no digit has.
            invalid |= high | low;
            *byte = high << 4 | low;
        }
        if invalid & 0xf0 != 0 {
            return Err(format!("blob id '{s}': not a hex digit in it"));
        }
        Ok(BlobId(id))
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(BlobId::hex_str(&self.hex()))
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Takes the id as a borrowed string where the input allows:
        /// no allocation per id.
        struct HexId;
        impl serde::de::Visitor<'_> for HexId {
            type Value = BlobId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a blob id (64 hex digits)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<BlobId, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(HexId)
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
    /// A key file's contents, as a Secret holds them; `origin` names the
    /// Secret in errors.
    KeyBytes {
        bytes: Zeroizing<Vec<u8>>,
        origin: String,
    },
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
            KeySource::KeyBytes { bytes, origin } => {
                if bytes.len() < 32 {
                    return Err(RepoError::KeySource {
                        path: origin.clone(),
                        message: format!(
                            "{} bytes is too short; a key needs at least 32 random bytes",
                            bytes.len()
                        ),
                    });
                }
                Ok(("keyfile", bytes.clone()))
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PackEntries {
    pub id: String,
    pub blobs: Vec<BlobEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BlobEntry {
    pub id: BlobId,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct IndexFile {
    pub packs: Vec<PackEntries>,
}

/// The next `n` bytes of `rest`, which moves past them; `None` where fewer
/// are left. What the binary decoders (index files, trees) read with.
pub(crate) fn take_bytes<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// The first bytes of a binary index file's plaintext. (A JSON one starts
/// with `{`.)
const INDEX_MAGIC: &[u8; 8] = b"FRYIDX\x00\x02";

impl IndexFile {
    /// The binary encoding: the magic, then the packs, each its id
    /// (u16 length, UTF-8) and its blobs (u32 count; per blob the 32-byte
    /// id and offset, length and plaintext length as u32), little-endian.
    /// Decoding it is a copy, where JSON spends most of a repository's
    /// opening on hex ids.
    fn to_binary(&self) -> Vec<u8> {
        let blobs: usize = self.packs.iter().map(|p| p.blobs.len()).sum();
        let mut out = Vec::with_capacity(12 + self.packs.len() * 72 + blobs * 44);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for pack in &self.packs {
            let id = pack.id.as_bytes();
            out.extend_from_slice(&(id.len() as u16).to_le_bytes());
            out.extend_from_slice(id);
            out.extend_from_slice(&(pack.blobs.len() as u32).to_le_bytes());
            for blob in &pack.blobs {
                out.extend_from_slice(&blob.id.0);
                out.extend_from_slice(&blob.offset.to_le_bytes());
                out.extend_from_slice(&blob.length.to_le_bytes());
                out.extend_from_slice(&blob.raw_length.to_le_bytes());
            }
        }
        out
    }

    /// Either encoding, told apart by the magic.
    fn from_plain(plain: &[u8]) -> Result<IndexFile, String> {
        let Some(mut rest) = plain.strip_prefix(INDEX_MAGIC.as_slice()) else {
            return serde_json::from_slice(plain).map_err(|e| format!("not valid: {e}"));
        };
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            take_bytes(rest, n).ok_or_else(|| "not valid: the binary index ends early".into())
        }
        fn u32_of(rest: &mut &[u8]) -> Result<u32, String> {
            Ok(u32::from_le_bytes(
                take(rest, 4)?.try_into().expect("4 bytes"),
            ))
        }
        let packs = u32_of(&mut rest)? as usize;
        // Counts are checked against the bytes left before anything is
        // allocated for them: a damaged count cannot ask for gigabytes.
        let mut file = IndexFile {
            packs: Vec::with_capacity(packs.min(rest.len() / 6)),
        };
        for _ in 0..packs {
            let id_len = u16::from_le_bytes(take(&mut rest, 2)?.try_into().expect("2 bytes"));
            let id = std::str::from_utf8(take(&mut rest, id_len.into())?)
                .map_err(|_| "not valid: a pack id is not UTF-8".to_string())?
                .to_string();
            let count = u32_of(&mut rest)? as usize;
            let entries = take(
                &mut rest,
                count.checked_mul(44).ok_or("not valid: too many blobs")?,
            )?;
            let blobs = entries
                .chunks_exact(44)
                .map(|e| BlobEntry {
                    id: BlobId(e[..32].try_into().expect("32 bytes")),
                    offset: u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")),
                    length: u32::from_le_bytes(e[36..40].try_into().expect("4 bytes")),
                    raw_length: u32::from_le_bytes(e[40..44].try_into().expect("4 bytes")),
                })
                .collect();
            file.packs.push(PackEntries { id, blobs });
        }
        if !rest.is_empty() {
            return Err(format!(
                "not valid: {} bytes after the binary index",
                rest.len()
            ));
        }
        Ok(file)
    }
}

/// Packs a prune found unreferenced, to be deleted by a later prune once
/// every lock named here is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DeletionMark {
    pub created: String,
    pub packs: Vec<String>,
    /// Lock files that existed when the mark was written.
    pub locks: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    packs: Vec<String>,
    pack_numbers: HashMap<String, u32>,
    /// Each pack's entries, as first read.
    pack_entries: Vec<Vec<BlobEntry>>,
    /// Whether the pack is marked for deletion.
    pack_condemned: Vec<bool>,
    /// Where each blob is read from: a copy in a pack that is not marked
    /// for deletion when there is one.
    blobs: IdMap<IndexEntry>,
    /// Packs named by deletion marks.
    condemned: HashSet<String>,
    /// Deletion marks read: path and content.
    marks: Vec<(String, DeletionMark)>,
    /// Index files read.
    files: Vec<String>,
    /// Index files and deletion marks that could not be read, and why.
    damaged_files: Vec<(String, String)>,
    /// Whether this is an index read from the store (by taking a lock).
    loaded: bool,
}

impl Index {
    fn add_pack(&mut self, pack: &PackEntries) {
        let condemned = self.condemned.contains(&pack.id);
        let number = match self.pack_numbers.get(&pack.id) {
            Some(n) => *n,
            None => {
                self.packs.push(pack.id.clone());
                self.pack_entries.push(pack.blobs.clone());
                self.pack_condemned.push(condemned);
                let n = (self.packs.len() - 1) as u32;
                self.pack_numbers.insert(pack.id.clone(), n);
                n
            }
        };
        for b in &pack.blobs {
            let entry = IndexEntry {
                pack: number,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
            };
            match self.blobs.get(&b.id) {
                Some(existing) if condemned || !self.pack_condemned[existing.pack as usize] => {}
                _ => {
                    self.blobs.insert(b.id, entry);
                }
            }
        }
    }

    /// Whether a writer may reuse the stored blob instead of storing it again.
    fn reusable(&self, id: &BlobId) -> bool {
        !self.marks_unknown() && self.stored_outside_condemned_packs(id)
    }

    /// With a deletion mark unreadable, any pack may be about to go.
    fn marks_unknown(&self) -> bool {
        self.damaged_files
            .iter()
            .any(|(path, _)| path.starts_with("deletions/"))
    }

    fn stored_outside_condemned_packs(&self, id: &BlobId) -> bool {
        self.blobs
            .get(id)
            .is_some_and(|e| !self.pack_condemned[e.pack as usize])
    }
}

/// [`Repository::has_blob`] for many ids under one read of the index: a
/// walk over a volume's files asks for hundreds of thousands. Held only
/// where nothing awaits.
pub(crate) struct ReusableBlobs<'a> {
    index: std::sync::RwLockReadGuard<'a, Index>,
    marks_unknown: bool,
}

impl ReusableBlobs<'_> {
    pub(crate) fn contains(&self, id: &BlobId) -> bool {
        !self.marks_unknown && self.index.stored_outside_condemned_packs(id)
    }
}

/// Snapshot manifests as listed: readable ones, and the others with why.
#[derive(Debug, Default)]
pub struct SnapshotListing {
    pub snapshots: Vec<(SnapshotId, Snapshot)>,
    pub damaged: Vec<DamagedSnapshot>,
}

/// A file under `snapshots/` that is not a readable manifest.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedSnapshot {
    pub id: SnapshotId,
    pub message: String,
    /// The store could not read it (perhaps a transient error), as opposed
    /// to a file that was read and is not a valid manifest.
    pub read_error: bool,
}

pub(crate) fn pack_path(id: &str) -> String {
    format!("data/{}/{id}", &id[..2.min(id.len())])
}

pub(crate) struct Inner {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    id: String,
    /// The repository's format (its config's version).
    version: u32,
    index: RwLock<Index>,
    pauses: pause::PausePoints,
    io: Arc<stats::Counters>,
    /// Snapshot manifests and index files read so far, by path, when
    /// remembered (see [`Repository::remember_written_files`]).
    manifests: std::sync::Mutex<HashMap<String, Snapshot>>,
    index_files: std::sync::Mutex<HashMap<String, Arc<IndexFile>>>,
    remember: std::sync::atomic::AtomicBool,
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

/// zstd level of volume data chunks: throughput matters more there than
/// the last few percent of size.
const CHUNK_ZSTD_LEVEL: i32 = 1;
/// A chunk whose sample compresses to more than this share of its size is
/// stored uncompressed.
const INCOMPRESSIBLE: f64 = 0.97;
/// Bytes of a chunk compressed to decide whether it compresses. Smaller
/// chunks are compressed whole: zstd gives up on random data quickly, and
/// a sample of them costs compressible data more than it saves.
const SAMPLE: usize = 64 * 1024;

thread_local! {
    static CHUNK_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Bytes of the raw frame of `length` bytes.
fn zstd_raw_frame_len(length: usize) -> usize {
    const BLOCK: usize = 128 * 1024;
    4 + 1 + 8 + length + 3 * length.div_ceil(BLOCK).max(1)
}

/// A zstd frame holding `data` in raw (stored) blocks: what any zstd
/// decoder reads back, made with one copy. Incompressible data goes this
/// way instead of through the compressor.
#[cfg(test)]
pub(crate) fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(zstd_raw_frame_len(data.len()));
    push_zstd_raw_frame(&mut out, data);
    out
}

/// Appends the raw frame of `data` to `out`.
fn push_zstd_raw_frame(out: &mut Vec<u8>, data: &[u8]) {
    const BLOCK: usize = 128 * 1024;
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame header: single segment, 8-byte content size, no checksum.
    out.push(0b1110_0000);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut blocks = data.chunks(BLOCK).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]);
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none() as u32;
        // Block header: last flag, type 0 (raw), size.
        let header = last | ((block.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
}

/// zstd of a chunk of volume data: a fast level, and a raw frame when a
/// sample shows the data does not compress (media, archives, encrypted
/// files), which saves most of the compressor's time on such data.
/// `None` stands for the raw frame, so that the caller writes it where it
/// is needed instead of copying it there.
fn compress_chunk_or_raw(data: &[u8]) -> Option<Vec<u8>> {
    CHUNK_COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = cell.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(CHUNK_ZSTD_LEVEL).expect("a zstd context can be created")
        });
        if data.len() > 2 * SAMPLE {
            let middle = data.len() / 2;
            let sample = &data[middle..middle + SAMPLE];
            let packed = compressor
                .compress(sample)
                .expect("compressing in memory cannot fail");
            if packed.len() as f64 > INCOMPRESSIBLE * SAMPLE as f64 {
                return None;
            }
        }
        let packed = compressor
            .compress(data)
            .expect("compressing in memory cannot fail");
        (packed.len() <= data.len()).then_some(packed)
    })
}

/// [`compress_chunk_or_raw`], the raw frame made.
#[cfg(test)]
pub(crate) fn compress_chunk(data: &[u8]) -> Vec<u8> {
    compress_chunk_or_raw(data).unwrap_or_else(|| zstd_raw_frame(data))
}

/// A chunk of volume data as stored: compressed or a raw frame, sealed.
fn encode_chunk_with(key: &MasterKey, data: &[u8]) -> Vec<u8> {
    match compress_chunk_or_raw(data) {
        Some(packed) => key.seal(&packed),
        None => key.seal_built(zstd_raw_frame_len(data.len()), |out| {
            push_zstd_raw_frame(out, data)
        }),
    }
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
    /// Creates a repository with a fresh random master key, sealing with
    /// the cipher this CPU runs fastest.
    pub async fn init(backend: Arc<dyn Backend>, key: &KeySource) -> Result<Self, RepoError> {
        Self::init_with(backend, key, Cipher::preferred()).await
    }

    /// [`Repository::init`] with a chosen cipher.
    pub async fn init_with(
        backend: Arc<dyn Backend>,
        key: &KeySource,
        cipher: Cipher,
    ) -> Result<Self, RepoError> {
        match backend.get("config").await {
            Ok(_) => {
                return Err(RepoError::AlreadyInitialized {
                    location: backend.location(),
                });
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if matches!(key, KeySource::Password(p) if p.is_empty()) {
            return Err(RepoError::EmptyPassword);
        }
        let (kdf, secret) = key.secret()?;
        let master = MasterKey::random_with(cipher);
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
        let (backend, io) = stats::Counted::wrap(backend);
        Ok(Repository {
            inner: Arc::new(Inner {
                backend,
                key: master,
                version: config.version,
                id: config.id,
                index: RwLock::new(Index::default()),
                pauses: Default::default(),
                io,
                manifests: Default::default(),
                index_files: Default::default(),
                remember: Default::default(),
            }),
        })
    }

    /// Opens a repository: checks the key. The index is loaded by taking a
    /// lock ([`Repository::lock_shared`]), never before.
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
        if !FORMATS_READ.contains(&config.version) {
            return Err(RepoError::UnsupportedFormat {
                found: config.version,
            });
        }
        let (kdf, secret) = key.secret()?;
        let key_files = backend.list("keys/").await?;
        let mut master = None;
        let mut damaged = Vec::new();
        for info in &key_files {
            let bytes = backend.get(&info.path).await?;
            let file = match serde_json::from_slice::<KeyFile>(&bytes) {
                Ok(file) => file,
                Err(e) => {
                    damaged.push((info.path.clone(), format!("not a valid key file: {e}")));
                    continue;
                }
            };
            if let Some(message) = file.damage() {
                damaged.push((info.path.clone(), message));
                continue;
            }
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
            if let Some((path, message)) = damaged.into_iter().next() {
                return Err(RepoError::DamagedKeyFile {
                    location: backend.location(),
                    path,
                    message,
                });
            }
            return Err(RepoError::WrongKey {
                location: backend.location(),
                keys: key_files.len(),
            });
        };
        let (backend, io) = stats::Counted::wrap(backend);
        Ok(Repository {
            inner: Arc::new(Inner {
                backend,
                key: master,
                version: config.version,
                id: config.id,
                index: RwLock::new(Index::default()),
                pauses: Default::default(),
                io,
                manifests: Default::default(),
                index_files: Default::default(),
                remember: Default::default(),
            }),
        })
    }

    #[cfg(test)]
    pub(crate) fn pauses(&self) -> &pause::PausePoints {
        &self.inner.pauses
    }

    /// Reads every deletion mark; unreadable ones are returned apart.
    async fn read_marks(
        &self,
    ) -> Result<(Vec<(String, DeletionMark)>, Vec<(String, String)>), RepoError> {
        let mut marks = Vec::new();
        let mut damaged = Vec::new();
        for info in self.inner.backend.list("deletions/").await? {
            let result = match self.inner.backend.get(&info.path).await {
                Ok(bytes) => self.decode_json::<DeletionMark>(&bytes),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(mark) => marks.push((info.path, mark)),
                Err(message) => damaged.push((info.path, message)),
            }
        }
        Ok((marks, damaged))
    }

    /// Reads the deletion marks, then every index file.
    pub(crate) async fn read_index_files(&self) -> Result<Index, RepoError> {
        let (marks, damaged_marks) = self.read_marks().await?;
        let files = self.inner.backend.list("index/").await?;
        let remember = self.remembers();
        let known: HashMap<String, Arc<IndexFile>> = if remember {
            let mut cached = self
                .inner
                .index_files
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let listed: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
            cached.retain(|path, _| listed.contains(path.as_str()));
            cached.clone()
        } else {
            HashMap::new()
        };
        let loaded: Vec<(String, Result<Arc<IndexFile>, String>)> = futures::stream::iter(files)
            .map(|f| {
                let known = &known;
                async move {
                    if let Some(file) = known.get(&f.path) {
                        return (f.path, Ok(file.clone()));
                    }
                    let result = match self.inner.backend.get(&f.path).await {
                        // Decoded on a thread of its own: the files of a
                        // repository are decoded on every core.
                        Ok(bytes) => {
                            let repo = self.clone();
                            tokio::task::spawn_blocking(move || {
                                repo.decode_index(&bytes).map(Arc::new)
                            })
                            .await
                            .expect("index decoding task")
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    if remember && let Ok(file) = &result {
                        self.inner
                            .index_files
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(f.path.clone(), file.clone());
                    }
                    (f.path, result)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut index = Index {
            loaded: true,
            condemned: marks
                .iter()
                .flat_map(|(_, m)| m.packs.iter().cloned())
                .collect(),
            marks,
            damaged_files: damaged_marks,
            ..Index::default()
        };
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
        index.damaged_files.sort();
        Ok(index)
    }

    pub(crate) async fn reload_index(&self) -> Result<(), RepoError> {
        if self.remembers() && self.extend_index().await? {
            return Ok(());
        }
        let index = self.read_index_files().await?;
        *self.inner.index.write().expect("index lock") = index;
        Ok(())
    }

    /// A long-lived handle's reload when the store only gained index files
    /// since the index was read (the usual case between backups): their
    /// packs are added to the index in memory, instead of rebuilding it
    /// from every file, which grows with the repository. `false` (and
    /// nothing changed) when anything else changed: a file gone (a prune
    /// rewrote it), other deletion marks, damage; the caller rebuilds then.
    async fn extend_index(&self) -> Result<bool, RepoError> {
        let (marks, damaged_marks) = self.read_marks().await?;
        let listed = self.inner.backend.list("index/").await?;
        let marks_key = |marks: &[(String, DeletionMark)]| serde_json::to_vec(marks).ok();
        let known: Vec<String> = {
            let index = self.inner.index.read().expect("index lock");
            let unchanged_marks = marks_key(&index.marks) == marks_key(&marks);
            if !index.loaded
                || !index.damaged_files.is_empty()
                || !damaged_marks.is_empty()
                || !unchanged_marks
            {
                return Ok(false);
            }
            index.files.clone()
        };
        let listed_paths: HashSet<&str> = listed.iter().map(|f| f.path.as_str()).collect();
        if !known.iter().all(|p| listed_paths.contains(p.as_str())) {
            return Ok(false);
        }
        let known_set: HashSet<&str> = known.iter().map(String::as_str).collect();
        let mut new_files = Vec::new();
        for info in listed
            .iter()
            .filter(|f| !known_set.contains(f.path.as_str()))
        {
            let cached = self
                .inner
                .index_files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&info.path)
                .cloned();
            let file = match cached {
                Some(file) => file,
                None => {
                    let bytes = self.inner.backend.get(&info.path).await?;
                    let Ok(file) = self.decode_index(&bytes).map(Arc::new) else {
                        // Damaged: the full read reports it.
                        return Ok(false);
                    };
                    self.inner
                        .index_files
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(info.path.clone(), file.clone());
                    file
                }
            };
            new_files.push((info.path.clone(), file));
        }
        let mut index = self.inner.index.write().expect("index lock");
        // Another reload of this handle got here first: start over.
        if index.files != known {
            return Ok(false);
        }
        for (path, file) in new_files {
            for pack in &file.packs {
                index.add_pack(pack);
            }
            index.files.push(path);
        }
        index.files.sort();
        Ok(true)
    }

    fn decode_json<T: serde::de::DeserializeOwned>(&self, sealed: &[u8]) -> Result<T, String> {
        let plain = self.open_plain(sealed)?;
        serde_json::from_slice(&plain).map_err(|e| format!("not valid: {e}"))
    }

    /// A sealed record's plain bytes: authenticated, then decompressed.
    fn open_plain(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let compressed = self.inner.key.open(sealed).map_err(|_| {
            "authentication failed (altered, or written with another key)".to_string()
        })?;
        zstd::stream::decode_all(&compressed[..]).map_err(|e| format!("decompression failed: {e}"))
    }

    /// An index file as stored: binary in a format-2 repository, JSON in
    /// a format-1 one.
    pub(crate) fn encode_index(&self, file: &IndexFile) -> Bytes {
        if self.inner.version >= 2 {
            Bytes::from(self.inner.key.seal(&compress(&file.to_binary())))
        } else {
            self.encode_json(file)
        }
    }

    /// An index file in either encoding.
    pub(crate) fn decode_index(&self, sealed: &[u8]) -> Result<IndexFile, String> {
        IndexFile::from_plain(&self.open_plain(sealed)?)
    }

    /// The repository's format version.
    pub fn format_version(&self) -> u32 {
        self.inner.version
    }

    pub(crate) fn encode_json<T: Serialize>(&self, value: &T) -> Bytes {
        let plain = serde_json::to_vec(value).expect("repository records serialize");
        let compressed = compress(&plain);
        Bytes::from(self.inner.key.seal(&compressed))
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The storage requests made through this repository so far.
    pub fn io_stats(&self) -> IoStats {
        self.inner.io.snapshot()
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

    /// The seed of the content-defined chunker, derived from the key: cut
    /// points then depend on the key, so chunk sizes in the store reveal
    /// nothing about which known files it holds.
    /// The cipher that seals this repository's blobs.
    pub fn cipher(&self) -> Cipher {
        self.inner.key.cipher()
    }

    pub(crate) fn chunker_seed(&self) -> u64 {
        let hash = self.inner.key.blob_hash(b"ferry volume chunker seed");
        u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
    }

    /// A chunk of volume data as stored: its id and sealed bytes. Safe to
    /// call from many threads at once.
    pub(crate) fn encode_chunk(&self, data: &[u8]) -> Vec<u8> {
        encode_chunk_with(&self.inner.key, data)
    }

    /// The name of pack number `pack` (as `blob_position` gives it).
    #[cfg(test)]
    pub(crate) fn pack_name(&self, pack: u32) -> String {
        self.inner.index.read().expect("index lock").packs[pack as usize].clone()
    }

    /// The plaintext length of a stored blob.
    pub(crate) fn raw_length(&self, id: &BlobId) -> Option<u32> {
        let index = self.inner.index.read().expect("index lock");
        index.blobs.get(id).map(|e| e.raw_length)
    }

    /// Whether a writer may reuse the stored copy of a blob (see rule 3 of
    /// the module docs).
    pub(crate) fn has_blob(&self, id: &BlobId) -> bool {
        self.inner.index.read().expect("index lock").reusable(id)
    }

    pub(crate) fn reusable_blobs(&self) -> ReusableBlobs<'_> {
        let index = self.inner.index.read().expect("index lock");
        ReusableBlobs {
            marks_unknown: index.marks_unknown(),
            index,
        }
    }

    pub(crate) fn add_to_index(&self, packs: &[PackEntries]) {
        let mut index = self.inner.index.write().expect("index lock");
        for p in packs {
            index.add_pack(p);
        }
    }

    /// Starts a backup session's writer. It deduplicates against the index
    /// loaded when `lock` was taken.
    pub fn writer(&self, lock: &RepoLock) -> PackWriter {
        let _ = lock;
        PackWriter::new(self.clone())
    }

    /// Reads and verifies one blob.
    pub async fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>, RepoError> {
        let (pack, entry) = {
            let index = self.inner.index.read().expect("index lock");
            if !index.loaded {
                return Err(RepoError::NotLocked);
            }
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

    /// Every snapshot manifest, readable or not. One damaged or stray file
    /// does not hide the others.
    pub async fn snapshot_listing(&self) -> Result<SnapshotListing, RepoError> {
        let files = self.inner.backend.list("snapshots/").await?;
        let remember = self.remembers();
        let known: HashMap<String, Snapshot> = if !remember {
            HashMap::new()
        } else {
            let mut manifests = self
                .inner
                .manifests
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let listed: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
            manifests.retain(|path, _| listed.contains(path.as_str()));
            manifests.clone()
        };
        let loaded: Vec<Result<(SnapshotId, Snapshot), DamagedSnapshot>> =
            futures::stream::iter(files)
                .map(|f| {
                    let known = &known;
                    async move {
                        let id = SnapshotId(f.path.trim_start_matches("snapshots/").to_string());
                        if let Some(snapshot) = known.get(&f.path) {
                            return Ok((id, snapshot.clone()));
                        }
                        let bytes = match self.inner.backend.get(&f.path).await {
                            Ok(bytes) => bytes,
                            Err(e) => {
                                return Err(DamagedSnapshot {
                                    id,
                                    message: format!("cannot be read: {e}"),
                                    read_error: true,
                                });
                            }
                        };
                        match self.decode_json::<Snapshot>(&bytes) {
                            Ok(snap) => {
                                if remember {
                                    self.inner
                                        .manifests
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .insert(f.path.clone(), snap.clone());
                                }
                                Ok((id, snap))
                            }
                            Err(message) => Err(DamagedSnapshot {
                                id,
                                message,
                                read_error: false,
                            }),
                        }
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        let mut listing = SnapshotListing::default();
        for item in loaded {
            match item {
                Ok(found) => listing.snapshots.push(found),
                Err(damaged) => listing.damaged.push(damaged),
            }
        }
        listing
            .snapshots
            .sort_by(|a, b| (&a.1.created, &a.0).cmp(&(&b.1.created, &b.0)));
        listing.damaged.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listing)
    }

    /// The readable snapshots, oldest first; damaged manifests are skipped
    /// with a warning (`snapshot_listing` returns them).
    /// Remember snapshot manifests and index files once read: each is
    /// written once under a name of its own and never changed, so a
    /// long-lived process (the controller, which lists snapshots and
    /// reloads the index before every backup) then reads only new ones.
    /// Damage done to a file after it was read goes unseen by this handle;
    /// `verify` and other processes still see it.
    pub fn remember_written_files(&self) {
        self.inner
            .remember
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn remembers(&self) -> bool {
        self.inner
            .remember
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
        let listing = self.snapshot_listing().await?;
        for damaged in &listing.damaged {
            tracing::warn!(
                "snapshot {} is damaged and skipped ({}); remove it with `ferry backup delete {}` or `ferry repo repair`",
                damaged.id,
                damaged.message,
                damaged.id
            );
        }
        Ok(listing.snapshots)
    }

    /// The snapshot file `name_or_id` names: a snapshot name (the newest of
    /// that name), a full id, or an unambiguous id prefix of at least
    /// [`MIN_ID_PREFIX`] characters. Damaged manifests are found by id too
    /// (`None` as the snapshot), so that they can be deleted.
    pub async fn resolve_snapshot(
        &self,
        name_or_id: &str,
    ) -> Result<(SnapshotId, Option<Snapshot>), RepoError> {
        let listing = self.snapshot_listing().await?;
        if let Some((id, snap)) = listing
            .snapshots
            .iter()
            .rev()
            .find(|(_, s)| s.name == name_or_id)
        {
            return Ok((id.clone(), Some(snap.clone())));
        }
        let exact = |id: &SnapshotId| id.0 == name_or_id;
        if let Some((id, snap)) = listing.snapshots.iter().find(|(id, _)| exact(id)) {
            return Ok((id.clone(), Some(snap.clone())));
        }
        if let Some(d) = listing.damaged.iter().find(|d| exact(&d.id)) {
            return Ok((d.id.clone(), None));
        }
        if name_or_id.chars().count() < MIN_ID_PREFIX {
            let is_prefix = listing
                .snapshots
                .iter()
                .map(|(id, _)| id)
                .chain(listing.damaged.iter().map(|d| &d.id))
                .any(|id| !name_or_id.is_empty() && id.0.starts_with(name_or_id));
            return Err(if is_prefix {
                RepoError::IdPrefixTooShort(name_or_id.to_string())
            } else {
                RepoError::SnapshotNotFound(name_or_id.to_string())
            });
        }
        let mut found: Vec<(SnapshotId, Option<Snapshot>)> = listing
            .snapshots
            .iter()
            .filter(|(id, _)| id.0.starts_with(name_or_id))
            .map(|(id, s)| (id.clone(), Some(s.clone())))
            .collect();
        found.extend(
            listing
                .damaged
                .iter()
                .filter(|d| d.id.0.starts_with(name_or_id))
                .map(|d| (d.id.clone(), None)),
        );
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(RepoError::SnapshotNotFound(name_or_id.to_string())),
            _ => Err(RepoError::AmbiguousSnapshot(name_or_id.to_string())),
        }
    }

    /// A readable snapshot by name or id (see [`Repository::resolve_snapshot`]).
    pub async fn find_snapshot(
        &self,
        name_or_id: &str,
    ) -> Result<(SnapshotId, Snapshot), RepoError> {
        let (id, snapshot) = self.resolve_snapshot(name_or_id).await?;
        match snapshot {
            Some(snapshot) => Ok((id, snapshot)),
            None => {
                let listing = self.snapshot_listing().await?;
                let message = listing
                    .damaged
                    .into_iter()
                    .find(|d| d.id == id)
                    .map(|d| d.message)
                    .unwrap_or_else(|| "unreadable".into());
                Err(RepoError::SnapshotDamaged { id: id.0, message })
            }
        }
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), RepoError> {
        Ok(self
            .inner
            .backend
            .delete(&format!("snapshots/{}", id.0))
            .await?)
    }

    /// Takes a shared lock, then loads the index: what every session that
    /// reads or writes data does first. Prune cannot run while it is held.
    pub async fn lock_shared(&self) -> Result<RepoLock, RepoError> {
        self.lock_and_load(false).await
    }

    /// Takes the exclusive lock (no other session runs), then loads the index.
    pub async fn lock_exclusive(&self) -> Result<RepoLock, RepoError> {
        self.lock_and_load(true).await
    }

    /// Removes stale locks: those of processes of this host that no longer
    /// run, and those not refreshed for 30 minutes. Returns their paths.
    /// Live locks are never removed.
    pub async fn remove_stale_locks(&self) -> Result<Vec<String>, RepoError> {
        lock::remove_stale(&self.inner.backend).await
    }

    async fn lock_and_load(&self, exclusive: bool) -> Result<RepoLock, RepoError> {
        let lock = lock::acquire(self.inner.backend.clone(), exclusive, &self.inner.pauses).await?;
        if let Err(e) = self.reload_index().await {
            let _ = lock.release().await;
            return Err(e);
        }
        self.inner.pauses.at("lock:loaded").await;
        Ok(lock)
    }

    /// Every blob id the snapshots reference; an unreadable reference list
    /// is an error naming the snapshot.
    pub(crate) async fn live_blobs(
        &self,
        snapshots: &[(SnapshotId, Snapshot)],
    ) -> Result<HashSet<BlobId>, RepoError> {
        let mut live = HashSet::new();
        for (id, snap) in snapshots {
            live.insert(snap.content);
            live.insert(snap.refs);
            let unreadable = |message: String| {
                RepoError::Unreadable(vec![format!(
                    "reference list of snapshot {} ({id}): {message}",
                    snap.name
                )])
            };
            let refs = self
                .read_blob(&snap.refs)
                .await
                .map_err(|e| unreadable(e.to_string()))?;
            let ids = decode_refs(&refs).map_err(unreadable)?;
            live.extend(ids);
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests;
