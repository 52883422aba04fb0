//! Volume data: Ferry's own data mover, which copies a directory tree (a
//! mounted PersistentVolume, or any directory) into the repository and back.
//!
//! Files are cut into content-defined chunks (FastCDC with a seed derived
//! from the key), each named by the keyed BLAKE3 hash of its plaintext,
//! compressed (zstd at a fast level; a raw frame when a sample shows the
//! data does not compress) and sealed like every other blob, so chunks
//! deduplicate across files, volumes and backups. A directory is a tree
//! blob listing its entries with their metadata (mode, owner, times,
//! symlink targets, device numbers, hard links, extended attributes) and,
//! for files, their chunks; runs of zeros are stored as holes, so sparse
//! files come back sparse.
//!
//! A backup given a parent (the previous backup of the same source) takes
//! over every file whose size, modification time, change time and inode
//! are unchanged without reading it; change time and inode are left out of
//! that comparison for sources that are fresh copies each time (a volume
//! made from a snapshot).
//!
//! A block device (or a disk image file) is backed up as a tree of one
//! file, [`DEVICE_ENTRY`], holding its whole content: the same chunks,
//! deduplication and holes (unwritten, zeroed regions store nothing), and
//! the same verify and locate. It is restored into a device of at least its
//! size, every byte written or zeroed, or into an image file.
//!
//! The work is a pipeline: one thread walks and reads the files, cuts and
//! hashes the chunks and decides which are new; a worker per core
//! compresses and seals the new ones; the pack writer uploads packs.
//! Memory is bounded by the queues between them, not by the data.

mod backup;
mod chunker;
mod delta;
mod direct;
pub mod limit;
mod restore;
mod tree;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};

use crate::repo::{BlobId, RepoError, Repository, Snapshot, SnapshotId};

pub use backup::{
    DirScan, VolumeBackup, VolumeBackupOptions, backup_device, backup_dir, backup_scanned,
};
pub use delta::BlockDelta;
pub use restore::{RestoreStats, VolumeRestoreOptions, restore_dir, restore_image};
pub use tree::{DEVICE_ENTRY, Name, Node, NodeKind, Piece, Tree, VOLUME_FORMAT, VolumeRoot};

/// Label of a snapshot that holds one volume's data (`ferry volume backup`).
pub const LABEL_KIND: &str = "ferry.dev/kind";
/// Value of [`LABEL_KIND`] for volume snapshots.
pub const KIND_VOLUME: &str = "volume";
/// Label naming what a volume snapshot was taken of.
pub const LABEL_SOURCE: &str = "ferry.dev/volume-source";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: its data in the repository is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error("{what} is not valid volume data: {message}")]
    Corrupt { what: String, message: String },
    #[error("no {path} in the volume snapshot")]
    NoSuchPath { path: PathBuf },
    #[error(
        "snapshot {0} does not hold volume data (it is an application snapshot: use `ferry restore`)"
    )]
    NotAVolume(String),
    #[error("the repository holds no volume snapshot yet (`ferry volume backup DIR` makes one)")]
    NoVolumeSnapshot,
}

impl VolumeError {
    pub(crate) fn io(path: &Path, error: impl std::fmt::Display) -> Self {
        VolumeError::Io {
            path: path.to_path_buf(),
            message: error.to_string(),
        }
    }
}

/// What a volume backup saw and stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStats {
    pub files: u64,
    pub dirs: u64,
    /// Symbolic links, devices, FIFOs and sockets.
    pub others: u64,
    /// Sum of the sizes of all files.
    pub bytes: u64,
    /// Files read (new or changed since the parent).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Files taken over from the parent without reading them.
    pub files_unchanged: u64,
    pub chunks_new: u64,
    pub chunks_deduplicated: u64,
    /// Bytes written to the repository (packs and index).
    pub bytes_stored: u64,
    pub duration_ms: u64,
    /// Bytes of a device that changed since its parent, as the storage
    /// system's changed-block tracking reported them: only they (and the
    /// chunks around them) were read. Absent when the device was read whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_changed: Option<u64>,
}

/// Counters a progress display reads while a backup or restore runs.
#[derive(Debug, Default)]
pub struct VolumeProgress {
    /// Bytes to read (known once the walk is done).
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_done: AtomicU64,
}

/// Reads a volume root blob.
pub async fn read_root(repo: &Repository, id: &BlobId) -> Result<VolumeRoot, VolumeError> {
    let bytes = repo.read_blob(id).await?;
    let root: VolumeRoot = serde_json::from_slice(&bytes).map_err(|e| VolumeError::Corrupt {
        what: format!("volume root {id}"),
        message: e.to_string(),
    })?;
    if root.format > VOLUME_FORMAT {
        return Err(VolumeError::Corrupt {
            what: format!("volume {}", root.source),
            message: format!(
                "it was written in volume format {}; this version of ferry reads format {VOLUME_FORMAT}: upgrade ferry",
                root.format
            ),
        });
    }
    Ok(root)
}

/// Every tree under `tree`, by directory path relative to it (`""` is the
/// top), read a batch at a time. A damaged tree is an error naming its
/// directory.
pub async fn read_trees(
    repo: &Repository,
    tree: BlobId,
) -> Result<BTreeMap<PathBuf, Tree>, VolumeError> {
    let mut trees = BTreeMap::new();
    let mut pending = vec![(PathBuf::new(), tree)];
    let threads = crate::cores();
    while !pending.is_empty() {
        let batch: Vec<(PathBuf, BlobId)> = pending.drain(..pending.len().min(256)).collect();
        let ids: Vec<BlobId> = batch.iter().map(|(_, id)| *id).collect();
        let read = repo.read_blobs(&ids).await;
        // Parsed on every core: a large volume has tens of thousands of
        // entries per batch.
        let per_thread = batch.len().div_ceil(threads).max(1);
        let mut listings = batch.into_iter().zip(read).peekable();
        let mut parsing = Vec::new();
        while listings.peek().is_some() {
            let group: Vec<_> = listings.by_ref().take(per_thread).collect();
            parsing.push(tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|((dir, id), bytes)| parse_tree(dir, id, bytes))
                    .collect::<Vec<_>>()
            }));
        }
        for group in parsing {
            for parsed in group.await.expect("tree parsing task") {
                let (dir, tree) = parsed?;
                for node in &tree.entries {
                    if let (NodeKind::Dir, Some(sub)) = (node.kind, node.subtree) {
                        pending.push((dir.join(node.name.as_os_str()), sub));
                    }
                }
                trees.insert(dir, tree);
            }
        }
    }
    Ok(trees)
}

/// A directory's listing as stored: binary in a format-2 repository, JSON
/// in a format-1 one (which an older ferry reads).
pub(crate) fn encode_tree(repo: &Repository, tree: &Tree) -> Vec<u8> {
    if repo.format_version() >= 2 {
        tree.to_binary()
    } else {
        serde_json::to_vec(tree).expect("trees serialize")
    }
}

/// One directory's listing, as read from the repository.
fn parse_tree(
    dir: PathBuf,
    id: BlobId,
    bytes: Result<Vec<u8>, crate::repo::RepoError>,
) -> Result<(PathBuf, Tree), VolumeError> {
    let shown = Path::new("/").join(&dir);
    let bytes = bytes.map_err(|e| VolumeError::Damaged {
        path: shown.clone(),
        message: format!("directory listing {id}: {e}"),
    })?;
    let tree = Tree::decode(&bytes).map_err(|message| VolumeError::Corrupt {
        what: format!("directory {}", shown.display()),
        message,
    })?;
    for node in &tree.entries {
        if !node.name.is_plain_component() {
            return Err(VolumeError::Corrupt {
                what: format!("directory {}", shown.display()),
                message: format!("entry name '{}' is not a file name", node.name),
            });
        }
    }
    Ok((dir, tree))
}

/// The volume snapshots of a repository (`ferry volume list`).
pub async fn list(repo: &Repository) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
    Ok(repo
        .list_snapshots()
        .await?
        .into_iter()
        .filter(|(_, s)| is_volume_snapshot(s))
        .collect())
}

pub fn is_volume_snapshot(snapshot: &Snapshot) -> bool {
    snapshot.labels.get(LABEL_KIND).map(String::as_str) == Some(KIND_VOLUME)
}

/// A file or directory of a volume that uses a damaged blob.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DamagedPath {
    pub path: PathBuf,
    pub blob: BlobId,
}

/// The files and directories of a volume that use any of `damaged`: what
/// `verify --read-data` names when a chunk is damaged. Trees that cannot
/// be read are named too.
pub async fn locate(
    repo: &Repository,
    root: &VolumeRoot,
    damaged: &HashSet<BlobId>,
) -> Vec<DamagedPath> {
    let mut found = Vec::new();
    if damaged.contains(&root.tree) {
        found.push(DamagedPath {
            path: PathBuf::from("/"),
            blob: root.tree,
        });
        return found;
    }
    let mut pending = vec![(PathBuf::from("/"), root.tree)];
    while let Some((dir, id)) = pending.pop() {
        let Ok(bytes) = repo.read_blob(&id).await else {
            found.push(DamagedPath {
                path: dir,
                blob: id,
            });
            continue;
        };
        let Ok(tree) = Tree::decode(&bytes) else {
            found.push(DamagedPath {
                path: dir,
                blob: id,
            });
            continue;
        };
        for node in tree.entries {
            let path = dir.join(node.name.as_os_str());
            if let Some(sub) = node.subtree {
                if damaged.contains(&sub) {
                    found.push(DamagedPath { path, blob: sub });
                } else {
                    pending.push((path, sub));
                }
                continue;
            }
            if let Some(Piece::Chunk(blob)) = node
                .content
                .iter()
                .find(|p| matches!(p, Piece::Chunk(b) if damaged.contains(b)))
            {
                found.push(DamagedPath { path, blob: *blob });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Records a volume backup as a snapshot of its own (`ferry volume backup`).
pub async fn save_snapshot(
    repo: &Repository,
    name: &str,
    backup: &VolumeBackup,
    mut labels: BTreeMap<String, String>,
) -> Result<SnapshotId, RepoError> {
    labels.insert(LABEL_KIND.into(), KIND_VOLUME.into());
    labels.insert(LABEL_SOURCE.into(), label_value(&backup.root.source));
    let snapshot = Snapshot {
        name: name.to_string(),
        created: backup.root.created.clone(),
        expires: None,
        labels,
        content: backup.root_blob,
        refs: backup.root.refs,
        summary: serde_json::to_value(&backup.root.stats).unwrap_or_default(),
    };
    repo.save_snapshot(&snapshot).await
}

/// A source as a label value: labels of snapshots are free text, but kept
/// to one line.
fn label_value(source: &str) -> String {
    source.replace('\n', " ")
}

/// The newest volume snapshot of `source`: the parent of its next backup.
pub async fn latest_of(
    repo: &Repository,
    source: &str,
) -> Result<Option<(SnapshotId, Snapshot)>, RepoError> {
    let wanted = label_value(source);
    Ok(list(repo)
        .await?
        .into_iter()
        .rev()
        .find(|(_, s)| s.labels.get(LABEL_SOURCE) == Some(&wanted)))
}

/// What `ferry volume restore latest` restores: the newest volume snapshot,
/// unless a snapshot has this name.
pub const LATEST: &str = "latest";

/// The root of a volume snapshot found by name or id, or the newest one
/// for [`LATEST`]. The caller holds a lock.
pub async fn open_snapshot(
    repo: &Repository,
    name_or_id: &str,
) -> Result<(SnapshotId, Snapshot, VolumeRoot), VolumeError> {
    let (id, snapshot) = match repo.find_snapshot(name_or_id).await {
        Err(RepoError::SnapshotNotFound(_)) if name_or_id == LATEST => list(repo)
            .await?
            .pop()
            .ok_or(VolumeError::NoVolumeSnapshot)?,
        found => found?,
    };
    if !is_volume_snapshot(&snapshot) {
        return Err(VolumeError::NotAVolume(snapshot.name));
    }
    let root = read_root(repo, &snapshot.content).await?;
    Ok((id, snapshot, root))
}

#[cfg(test)]
mod tests;
