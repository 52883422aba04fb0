//! Backing up a directory tree: walk, read and chunk, encode, pack.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use tokio::sync::mpsc as async_mpsc;

use super::chunker::Chunker;
use super::delta::{BlockDelta, push_piece, read_changed};
use super::tree::{DEVICE_ENTRY, Name, Node, NodeKind, Piece, Tree, VOLUME_FORMAT, VolumeRoot};
use super::{VolumeError, VolumeProgress, VolumeStats, read_trees};
use crate::repo::{BlobId, IdSet, PackWriter, RepoLock, Repository, WriteStats, encode_refs};

/// How to back up a directory.
#[derive(Debug, Clone, Default)]
pub struct VolumeBackupOptions {
    /// What is backed up, as recorded in the volume root.
    pub source: String,
    /// The previous backup of the same source: unchanged files are taken
    /// over from it without being read.
    pub parent: Option<VolumeRoot>,
    /// Compare only size and modification time with the parent (for a
    /// source that is a fresh copy each time, such as a volume made from a
    /// snapshot, whose inodes and change times are new).
    pub ignore_inode: bool,
    /// Threads that compress and seal chunks (default: one per core).
    pub workers: Option<usize>,
    pub progress: Option<Arc<VolumeProgress>>,
    /// For a device: the byte ranges (offset, length) that changed since
    /// the snapshot the parent read, from the storage system's
    /// changed-block tracking; without a parent, the ranges that may hold
    /// data (the storage system's allocated blocks: the rest reads as
    /// zeros). Only they are read.
    pub changed_blocks: Option<Vec<(u64, u64)>>,
}

/// A finished volume backup: its root blob, stored but not yet referenced
/// by any snapshot.
#[derive(Debug, Clone)]
pub struct VolumeBackup {
    pub root_blob: BlobId,
    pub root: VolumeRoot,
    /// Every blob the volume uses, the root and its reference list included.
    pub blobs: Vec<BlobId>,
    pub write: WriteStats,
    /// Files that vanished between the walk and their reading.
    pub warnings: Vec<String>,
}

/// A directory as walked.
struct WalkedDir {
    entries: Vec<Node>,
    /// The directory's own entry in its parent (dir index, entry index).
    parent: Option<(usize, usize)>,
    /// The id of the parent backup's tree of this directory.
    before: Option<BlobId>,
    /// Every entry is the parent's, subtrees aside (those are known only
    /// bottom up, when the subdirectories are stored).
    listed_as_before: bool,
    /// A subdirectory's tree is not the one the parent backup has.
    subtree_changed: bool,
}

/// A file to read.
struct FileJob {
    dir: usize,
    entry: usize,
    path: PathBuf,
    /// The file has holes worth skipping (see [`SPARSE_MIN_HOLES`]).
    sparse: bool,
}

/// A file with at least this many bytes of its length not allocated is
/// read only where the file system says it holds data: a disk image or a
/// preallocated database file is mostly holes, and reading its zeros would
/// cost as much as reading data. Below this, the extra seeks cost more
/// than the zeros.
const SPARSE_MIN_HOLES: u64 = 1024 * 1024;

struct Walk {
    top: Node,
    dirs: Vec<WalkedDir>,
    jobs: Vec<FileJob>,
    /// Hard links after the first: (dir, entry, job whose content they share).
    aliases: Vec<(usize, usize, usize)>,
    /// Taken over from the parent: their chunks are referenced, not read.
    reused_chunks: Vec<BlobId>,
    stats: VolumeStats,
    /// A device read only where it changed since the parent.
    delta: Option<Arc<BlockDelta>>,
}

/// Backs up the directory `dir` into the repository. The caller holds a
/// shared lock (`lock`) for as long as the result is not referenced by a
/// saved snapshot.
pub async fn backup_dir(
    repo: &Repository,
    lock: &RepoLock,
    dir: &Path,
    options: VolumeBackupOptions,
) -> Result<VolumeBackup, VolumeError> {
    backup_scanned(repo, lock, DirScan::start(dir), options).await
}

/// [`backup_dir`] of a directory whose scan the caller started.
pub async fn backup_scanned(
    repo: &Repository,
    lock: &RepoLock,
    scan: DirScan,
    options: VolumeBackupOptions,
) -> Result<VolumeBackup, VolumeError> {
    let started = Instant::now();
    let parent_trees = match &options.parent {
        Some(parent) => read_trees(repo, parent.tree).await?,
        None => BTreeMap::new(),
    };
    let parent_root = options.parent.as_ref().map(|p| p.tree);
    tracing::debug!(
        dirs = parent_trees.len(),
        "volume backup: parent's trees read"
    );
    // The walk takes each directory as the scan finishes it: it compares
    // the first directories with the parent while the scan lists the rest.
    let walk = {
        let repo = repo.clone();
        let DirScan { top, dirs } = scan;
        let ignore_inode = options.ignore_inode;
        tokio::task::spawn_blocking(move || {
            walk(&repo, &top, dirs, parent_trees, parent_root, ignore_inode)
        })
        .await
        .expect("walk task")?
    };
    store_walk(repo, lock, walk, &options, started, false).await
}

/// Backs up the whole content of the block device (or disk image file)
/// `device`: a tree of one file, [`DEVICE_ENTRY`], read like any file, so
/// its chunks deduplicate against earlier backups and zeroed regions are
/// stored as holes. Without changed-block tracking every byte of a device
/// is read, and of an image file every byte where it holds data; an
/// unchanged device stores no new chunk. The caller holds a shared lock.
pub async fn backup_device(
    repo: &Repository,
    lock: &RepoLock,
    device: &Path,
    options: VolumeBackupOptions,
) -> Result<VolumeBackup, VolumeError> {
    let started = Instant::now();
    let mut walk = {
        let device = device.to_path_buf();
        tokio::task::spawn_blocking(move || walk_device(&device))
            .await
            .expect("walk task")?
    };
    let mut unused_delta = None;
    if let Some(changed) = &options.changed_blocks {
        let size = walk.dirs[0].entries[0].size;
        let delta = match &options.parent {
            Some(parent) => device_delta(repo, parent, size, changed).await,
            // Without a parent the device is compared with an all-zero
            // one: the ranges are where it may hold data.
            None => BlockDelta::new(
                &[Piece::Zeros(size)],
                |_| None,
                &Chunker::new(repo.chunker_seed()),
                size,
                changed,
            ),
        };
        match delta {
            Ok(delta) => {
                walk.stats.bytes_changed = Some(delta.changed_bytes());
                walk.delta = Some(Arc::new(delta));
            }
            Err(why) => {
                unused_delta = Some(format!(
                    "the changed blocks were not used ({why}): the whole device was read"
                ))
            }
        }
    }
    let mut backup = store_walk(repo, lock, walk, &options, started, true).await?;
    backup.warnings.extend(unused_delta);
    Ok(backup)
}

/// The parent's device content as the base of a read of `changed` only.
async fn device_delta(
    repo: &Repository,
    parent: &VolumeRoot,
    size: u64,
    changed: &[(u64, u64)],
) -> Result<BlockDelta, String> {
    if !parent.block {
        return Err("the parent is a backup of a directory, not of a device".into());
    }
    let bytes = repo
        .read_blob(&parent.tree)
        .await
        .map_err(|e| format!("the parent's tree is unreadable: {e}"))?;
    let tree = Tree::decode(&bytes).map_err(|e| format!("the parent's tree is unreadable: {e}"))?;
    let node = tree
        .entries
        .iter()
        .find(|n| n.name.as_os_str() == DEVICE_ENTRY)
        .ok_or("the parent holds no device")?;
    BlockDelta::new(
        &node.content,
        |id| {
            repo.has_blob(id)
                .then(|| repo.raw_length(id))
                .flatten()
                .map(u64::from)
        },
        &Chunker::new(repo.chunker_seed()),
        size,
        changed,
    )
}

/// The size of a block device or file: where its end is.
pub(super) fn content_size(path: &Path) -> Result<u64, VolumeError> {
    use std::io::Seek;
    let mut file = File::open(path).map_err(|e| VolumeError::io(path, e))?;
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|e| VolumeError::io(path, e))
}

/// The walk of a device: a top directory made up from the device's owner
/// and times, holding one file with the device's content.
fn walk_device(device: &Path) -> Result<Walk, VolumeError> {
    // A device is often named by a symbolic link (/dev/disk/by-id/...).
    let device = std::fs::canonicalize(device).map_err(|e| VolumeError::io(device, e))?;
    let metadata = std::fs::metadata(&device).map_err(|e| VolumeError::io(&device, e))?;
    let kind = metadata.file_type();
    if !kind.is_block_device() && !kind.is_file() {
        return Err(VolumeError::io(
            &device,
            "not a block device or disk image file",
        ));
    }
    let size = content_size(&device)?;
    let mtime = timestamp(metadata.mtime(), metadata.mtime_nsec());
    let node = |name: &str, kind: NodeKind, mode: u32, size: u64| Node {
        name: Name(name.into()),
        kind,
        mode,
        uid: metadata.uid(),
        gid: metadata.gid(),
        size,
        mtime,
        // A device node's change time and inode say nothing of its
        // content: it is always read.
        ctime: mtime,
        inode: 0,
        links: 1,
        content: Vec::new(),
        subtree: None,
        target: None,
        rdev: 0,
        xattrs: Vec::new(),
    };
    Ok(Walk {
        top: node("", NodeKind::Dir, 0o755, 0),
        dirs: vec![WalkedDir {
            entries: vec![node(
                DEVICE_ENTRY,
                NodeKind::File,
                metadata.mode() & 0o777,
                size,
            )],
            parent: None,
            before: None,
            listed_as_before: false,
            subtree_changed: false,
        }],
        jobs: if size > 0 {
            vec![FileJob {
                dir: 0,
                entry: 0,
                // A disk image file is read where it holds data, unless
                // changed-block tracking says more (see `backup_device`).
                sparse: kind.is_file()
                    && size.saturating_sub(metadata.blocks().saturating_mul(512))
                        >= SPARSE_MIN_HOLES,
                path: device,
            }]
        } else {
            Vec::new()
        },
        aliases: Vec::new(),
        reused_chunks: Vec::new(),
        stats: VolumeStats {
            files: 1,
            bytes: size,
            ..Default::default()
        },
        delta: None,
    })
}

/// Reads, encodes and stores what a walk found, then the trees and root.
async fn store_walk(
    repo: &Repository,
    lock: &RepoLock,
    walk: Walk,
    options: &VolumeBackupOptions,
    started: Instant,
    block: bool,
) -> Result<VolumeBackup, VolumeError> {
    let progress = options.progress.clone().unwrap_or_default();
    progress.bytes_total.store(
        walk.jobs
            .iter()
            .map(|j| walk.dirs[j.dir].entries[j.entry].size)
            .sum(),
        Ordering::Relaxed,
    );
    let workers = options.workers.unwrap_or_else(crate::cores).max(1);
    tracing::debug!(
        files = walk.jobs.len(),
        "volume backup: compared with the parent, files to read"
    );
    let writer = repo.writer(lock);
    let (read, writer) = read_files(repo, writer, &walk, workers, progress).await?;
    tracing::debug!("volume backup: files read");
    assemble(repo, writer, walk, read, options, started, block).await
}

fn timestamp(seconds: i64, nanos: i64) -> (i64, u32) {
    (seconds, nanos.clamp(0, 999_999_999) as u32)
}

fn kind_of(metadata: &Metadata) -> NodeKind {
    let t = metadata.file_type();
    if t.is_dir() {
        NodeKind::Dir
    } else if t.is_symlink() {
        NodeKind::Symlink
    } else if t.is_fifo() {
        NodeKind::Fifo
    } else if t.is_socket() {
        NodeKind::Socket
    } else if t.is_char_device() {
        NodeKind::Char
    } else if t.is_block_device() {
        NodeKind::Block
    } else {
        NodeKind::File
    }
}

/// The extended attributes of `path`, sorted, values in hex.
fn xattrs_of(path: &Path) -> Vec<(Name, String)> {
    let mut xattrs = Vec::new();
    if let Ok(names) = xattr::list(path) {
        for attr in names {
            if let Ok(Some(value)) = xattr::get(path, &attr) {
                xattrs.push((Name(attr), hex::encode(value)));
            }
        }
        xattrs.sort();
    }
    xattrs
}

/// The node of an entry from its lstat, link target and xattrs.
fn node_of(
    name: Name,
    metadata: &Metadata,
    target: Option<std::ffi::OsString>,
    xattrs: Vec<(Name, String)>,
) -> Node {
    let kind = kind_of(metadata);
    Node {
        name,
        kind,
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        size: if kind == NodeKind::File {
            metadata.size()
        } else {
            0
        },
        mtime: timestamp(metadata.mtime(), metadata.mtime_nsec()),
        ctime: timestamp(metadata.ctime(), metadata.ctime_nsec()),
        inode: metadata.ino(),
        links: if kind == NodeKind::File {
            metadata.nlink()
        } else {
            1
        },
        content: Vec::new(),
        subtree: None,
        target: target.map(Name),
        rdev: match kind {
            NodeKind::Char | NodeKind::Block => metadata.rdev(),
            _ => 0,
        },
        xattrs,
    }
}

/// Whether a file can be taken over from its parent entry without reading.
fn unchanged(now: &Node, before: &Node, ignore_inode: bool) -> bool {
    before.kind == NodeKind::File
        && now.size == before.size
        && now.mtime == before.mtime
        && (ignore_inode || same_inode(now, before))
        && (now.size == 0 || !before.content.is_empty())
}

/// Whether an entry is the parent's inode, unchanged in anything but its
/// access time (the change time moves with content, mode, owner, links and
/// xattrs).
fn same_inode(now: &Node, before: &Node) -> bool {
    now.inode == before.inode && now.ctime == before.ctime
}

/// A directory as scanned: its entries sorted by name.
struct ScannedDir {
    /// Relative to the top.
    rel: PathBuf,
    entries: Vec<ScannedEntry>,
    /// The directory's own entry in its parent (dir index, entry index).
    parent: Option<(usize, usize)>,
}

struct ScannedEntry {
    name: std::ffi::OsString,
    metadata: Metadata,
    /// A symbolic link's target.
    target: Option<std::ffi::OsString>,
}

/// The file system part of a walk, which needs no repository: every
/// entry's lstat, read relative to its directory. Extended attributes are
/// read afterwards, only where the parent backup cannot tell them.
pub struct DirScan {
    top: PathBuf,
    /// What the scan found, in order: the top directory's lstat, each
    /// directory as it is finished (breadth first, the walk's order), then
    /// `Done`; or an error, which ends it.
    dirs: std::sync::mpsc::Receiver<Result<Scanned, VolumeError>>,
}

enum Scanned {
    Top(Metadata),
    Dir(ScannedDir),
    /// Every directory was sent: a scan that stops without it (its thread
    /// gone) is an error, never a shorter listing.
    Done,
}

impl DirScan {
    /// Starts scanning `top` on a thread of its own: a caller starts it
    /// before opening the repository (deriving the key, loading the index,
    /// reading the parent), so the two overlap.
    pub fn start(top: &Path) -> DirScan {
        let top = top.to_path_buf();
        let (found, dirs) = std::sync::mpsc::channel();
        {
            let top = top.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = scan(&top, &found) {
                    let _ = found.send(Err(e));
                }
            });
        }
        DirScan { top, dirs }
    }
}

/// Scans the tree under `top`, never leaving its file system, sending each
/// directory as it is done. Stops early, without an error, when nobody
/// takes what it sends any more.
fn scan(
    top: &Path,
    found: &std::sync::mpsc::Sender<Result<Scanned, VolumeError>>,
) -> Result<(), VolumeError> {
    let top_metadata = std::fs::symlink_metadata(top).map_err(|e| VolumeError::io(top, e))?;
    if !top_metadata.is_dir() {
        return Err(VolumeError::io(top, "not a directory"));
    }
    let device = top_metadata.dev();
    if found.send(Ok(Scanned::Top(top_metadata))).is_err() {
        return Ok(());
    }
    // Directories still to list: path relative to the top, and their own
    // entry in their parent (dir index, entry index).
    let mut pending: std::collections::VecDeque<(PathBuf, Option<(usize, usize)>)> =
        [(PathBuf::new(), None)].into();
    let mut index = 0;
    while let Some((rel, parent)) = pending.pop_front() {
        let path = top.join(&rel);
        // Each name is copied out once: sorting by `file_name()` would
        // allocate two names per comparison.
        let mut listed: Vec<(std::ffi::OsString, std::fs::DirEntry)> = std::fs::read_dir(&path)
            .map_err(|e| VolumeError::io(&path, e))?
            .map(|e| e.map(|e| (e.file_name(), e)))
            .collect::<Result<_, _>>()
            .map_err(|e| VolumeError::io(&path, e))?;
        listed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut entries = Vec::with_capacity(listed.len());
        for (name, listed) in listed {
            // lstat relative to the open directory: no path lookup.
            let metadata = match listed.metadata() {
                Ok(m) => m,
                // Removed since the directory was listed: a live volume.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(VolumeError::io(&path.join(&name), e)),
            };
            let target = if metadata.file_type().is_symlink() {
                let child = path.join(&name);
                Some(
                    std::fs::read_link(&child)
                        .map_err(|e| VolumeError::io(&child, e))?
                        .into_os_string(),
                )
            } else {
                None
            };
            if metadata.is_dir() && metadata.dev() == device {
                pending.push_back((rel.join(&name), Some((index, entries.len()))));
            }
            entries.push(ScannedEntry {
                name,
                metadata,
                target,
            });
        }
        let dir = ScannedDir {
            rel,
            entries,
            parent,
        };
        if found.send(Ok(Scanned::Dir(dir))).is_err() {
            return Ok(());
        }
        index += 1;
    }
    let _ = found.send(Ok(Scanned::Done));
    Ok(())
}

/// Compares a scan with the parent's trees, noting what must be read.
fn walk(
    repo: &Repository,
    top: &Path,
    scan: std::sync::mpsc::Receiver<Result<Scanned, VolumeError>>,
    parent: BTreeMap<PathBuf, Tree>,
    parent_root: Option<BlobId>,
    ignore_inode: bool,
) -> Result<Walk, VolumeError> {
    let stopped = || VolumeError::io(top, "the directory scan stopped before it was done");
    let top_metadata = match scan.recv() {
        Ok(Ok(Scanned::Top(metadata))) => metadata,
        Ok(Err(e)) => return Err(e),
        _ => return Err(stopped()),
    };
    let mut out = Walk {
        top: node_of(
            Name(Default::default()),
            &top_metadata,
            None,
            xattrs_of(top),
        ),
        dirs: Vec::with_capacity(parent.len()),
        jobs: Vec::new(),
        aliases: Vec::new(),
        reused_chunks: Vec::new(),
        stats: VolumeStats::default(),
        delta: None,
    };
    let mut first_link: HashMap<u64, usize> = HashMap::new();
    let mut reused_links: HashMap<u64, Vec<Piece>> = HashMap::new();
    let reusable = repo.reusable_blobs();
    let mut index = 0;
    loop {
        let dir = match scan.recv() {
            Ok(Ok(Scanned::Dir(dir))) => dir,
            Ok(Ok(Scanned::Done)) => break,
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Scanned::Top(_))) | Err(_) => return Err(stopped()),
        };
        let path = top.join(&dir.rel);
        let before = parent.get(&dir.rel);
        let mut entries = Vec::with_capacity(dir.entries.len());
        for scanned in dir.entries {
            let previous = before.and_then(|t| {
                t.entries
                    .binary_search_by(|e| e.name.as_os_str().cmp(&scanned.name))
                    .ok()
                    .map(|i| &t.entries[i])
            });
            let mut node = node_of(
                Name(scanned.name),
                &scanned.metadata,
                scanned.target,
                Vec::new(),
            );
            // Setting or removing an xattr changes the inode's ctime: an
            // entry whose inode and ctime are the parent's has its xattrs.
            // Links carry no user xattrs on Linux; reading them follows
            // nothing.
            node.xattrs = match previous {
                _ if node.kind == NodeKind::Symlink => Vec::new(),
                Some(p) if !ignore_inode && p.kind == node.kind && same_inode(&node, p) => {
                    p.xattrs.clone()
                }
                _ => xattrs_of(&path.join(node.name.as_os_str())),
            };
            let entry = entries.len();
            match node.kind {
                // Its entries, if it is not a mount point inside the
                // volume, are a directory of the scan of their own.
                NodeKind::Dir => out.stats.dirs += 1,
                NodeKind::File => {
                    out.stats.files += 1;
                    out.stats.bytes += node.size;
                    let linked = node.links > 1;
                    if linked && let Some(pieces) = reused_links.get(&node.inode) {
                        node.content = pieces.clone();
                        out.stats.files_unchanged += 1;
                    } else if linked && let Some(job) = first_link.get(&node.inode) {
                        out.aliases.push((index, entry, *job));
                    } else if let Some(previous) = previous.filter(|p| {
                        unchanged(&node, p, ignore_inode)
                            && p.content.iter().all(|piece| match piece {
                                Piece::Chunk(id) => reusable.contains(id),
                                Piece::Zeros(_) => true,
                            })
                    }) {
                        node.content = previous.content.clone();
                        out.reused_chunks
                            .extend(node.content.iter().filter_map(|p| match p {
                                Piece::Chunk(id) => Some(*id),
                                Piece::Zeros(_) => None,
                            }));
                        out.stats.files_unchanged += 1;
                        if linked {
                            reused_links.insert(node.inode, node.content.clone());
                        }
                    } else if node.size > 0 {
                        if linked {
                            first_link.insert(node.inode, out.jobs.len());
                        }
                        let allocated = scanned.metadata.blocks().saturating_mul(512);
                        out.jobs.push(FileJob {
                            dir: index,
                            entry,
                            path: path.join(node.name.as_os_str()),
                            sparse: node.size.saturating_sub(allocated) >= SPARSE_MIN_HOLES,
                        });
                    }
                }
                _ => out.stats.others += 1,
            }
            entries.push(node);
        }
        let listed_as_before = before.is_some_and(|t| same_listing(&mut entries, t));
        let before = before.and_then(|_| match (dir.rel.parent(), dir.rel.file_name()) {
            (Some(up), Some(name)) => {
                let listing = parent.get(up)?;
                let i = listing
                    .entries
                    .binary_search_by(|e| e.name.as_os_str().cmp(name))
                    .ok()?;
                listing.entries[i].subtree
            }
            _ => parent_root,
        });
        out.dirs.push(WalkedDir {
            entries,
            parent: dir.parent,
            before,
            listed_as_before,
            subtree_changed: false,
        });
        index += 1;
    }
    tracing::debug!(
        dirs = index,
        "volume backup: directory scanned and compared"
    );
    drop_elsewhere(parent);
    Ok(out)
}

/// Whether `entries` are `before`'s, subtrees aside: those are known only
/// bottom up, when the subdirectories are stored.
fn same_listing(entries: &mut [Node], before: &Tree) -> bool {
    entries.len() == before.entries.len()
        && entries
            .iter_mut()
            .zip(&before.entries)
            .all(|(node, previous)| {
                let subtree = std::mem::replace(&mut node.subtree, previous.subtree);
                let same = *node == *previous;
                node.subtree = subtree;
                same
            })
}

/// Drops `value` on a thread of its own. Freeing the listings of tens of
/// thousands of files takes milliseconds that a backup need not wait for.
fn drop_elsewhere<T: Send + 'static>(value: T) {
    // Without a thread to be had, the value is dropped here, with the closure.
    let _ = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(value));
}

/// A file as read: its pieces and its length.
type FileContent = (Vec<Piece>, u64);

/// A chunk to encode.
type Raw = Vec<(BlobId, Vec<u8>)>;
/// An encoded chunk: id, sealed bytes, plaintext length.
type Sealed = Vec<(BlobId, Vec<u8>, u32)>;

/// What reading the files produced: each job's content and the counts.
struct ReadOutcome {
    /// Per job: the pieces and the bytes read, or `None` if it vanished.
    contents: Vec<Option<FileContent>>,
    stats: VolumeStats,
    warnings: Vec<String>,
}

/// Runs the pipeline over the walk's jobs: this reader thread, `workers`
/// encoder threads and the pack writer task.
async fn read_files(
    repo: &Repository,
    mut writer: PackWriter,
    walk: &Walk,
    workers: usize,
    progress: Arc<VolumeProgress>,
) -> Result<(ReadOutcome, PackWriter), VolumeError> {
    let (raw_tx, raw_rx) = mpsc::sync_channel::<Raw>(2 * workers);
    let raw_rx = Arc::new(Mutex::new(raw_rx));
    let (sealed_tx, mut sealed_rx) = async_mpsc::channel::<Sealed>(2 * workers);
    let encoders: Vec<std::thread::JoinHandle<()>> = (0..workers)
        .map(|_| {
            let rx = raw_rx.clone();
            let tx = sealed_tx.clone();
            let repo = repo.clone();
            std::thread::spawn(move || {
                loop {
                    let next = rx.lock().expect("chunk queue").recv();
                    let Ok(batch) = next else { return };
                    let sealed: Sealed = batch
                        .into_iter()
                        .map(|(id, data)| (id, repo.encode_chunk(&data), data.len() as u32))
                        .collect();
                    if tx.blocking_send(sealed).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // Only the encoders hold the queues' other ends: if they all stop, the
    // reader's and their own sends fail instead of waiting forever.
    drop(raw_rx);
    drop(sealed_tx);
    let pause_after_pack = crate::failpoint::armed("volume-after-first-pack");
    let writing = tokio::spawn(async move {
        while let Some(batch) = sealed_rx.recv().await {
            for (id, sealed, length) in batch {
                writer.add_encoded(id, &sealed, length).await?;
                if pause_after_pack && writer.stats().packs_written > 0 {
                    // Tests kill the process here: packs are stored, no
                    // index or snapshot names them yet.
                    eprintln!("failpoint volume-after-first-pack reached");
                    std::future::pending::<()>().await;
                }
            }
        }
        Ok::<_, crate::repo::RepoError>(writer)
    });
    let jobs: Vec<ReadJob> = walk
        .jobs
        .iter()
        .map(|j| ReadJob {
            path: j.path.clone(),
            delta: walk.delta.clone(),
            sparse: j.sparse,
        })
        .collect();
    let repo_for_readers = repo.clone();
    let reading = tokio::task::spawn_blocking(move || {
        read_all(&repo_for_readers, &jobs, raw_tx, &progress, READERS)
    });
    let read = reading.await.expect("reader task");
    // The writer ends once every encoder has ended (they hold its queue),
    // so waiting for it first never blocks this thread on a join.
    let writer = writing.await.expect("writer task");
    for encoder in encoders {
        encoder.join().expect("encoder thread");
    }
    // The writer's failure explains the reader's (its queue closed).
    let writer = writer?;
    Ok((read?, writer))
}

fn open_for_reading(path: &Path) -> std::io::Result<File> {
    // O_NOATIME keeps a backup from touching access times; only the owner
    // (or root) may ask for it.
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME | libc::O_NOFOLLOW)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path),
        other => other,
    }
}

/// A file for the readers: read whole, or (a device) only where it changed.
struct ReadJob {
    path: PathBuf,
    delta: Option<Arc<BlockDelta>>,
    /// Read only the ranges that hold data (see [`SPARSE_MIN_HOLES`]).
    sparse: bool,
}

/// Threads reading files: two keep the encoders fed while one waits on
/// opening and reading a small file.
const READERS: usize = 2;
/// A batch of new chunks is handed to an encoder at this size...
const BATCH_BYTES: usize = 1024 * 1024;
/// ...or at this many chunks.
const BATCH_CHUNKS: usize = 64;

/// The readers: each takes the next file, reads it once, cuts it into
/// chunks, names them and queues the new ones for encoding. A chunk is
/// queued by the first reader that sees it.
fn read_all(
    repo: &Repository,
    jobs: &[ReadJob],
    queue: mpsc::SyncSender<Raw>,
    progress: &VolumeProgress,
    readers: usize,
) -> Result<ReadOutcome, VolumeError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let seen: Mutex<IdSet> = Mutex::new(IdSet::default());
    let shares: Vec<Result<ReadShare, VolumeError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..readers.max(1))
            .map(|_| {
                let queue = queue.clone();
                let (next, seen) = (&next, &seen);
                scope.spawn(move || {
                    let share = read_share(repo, jobs, next, seen, queue, progress);
                    if share.is_err() {
                        // The backup fails: the other readers stop too.
                        next.store(jobs.len(), Ordering::Relaxed);
                    }
                    share
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect()
    });
    drop(queue);
    let mut outcome = ReadOutcome {
        contents: vec![None; jobs.len()],
        stats: VolumeStats::default(),
        warnings: Vec::new(),
    };
    for share in shares {
        let share = share?;
        for (job, content) in share.contents {
            outcome.contents[job] = content;
        }
        outcome.stats.files_read += share.stats.files_read;
        outcome.stats.bytes_read += share.stats.bytes_read;
        outcome.stats.chunks_new += share.stats.chunks_new;
        outcome.stats.chunks_deduplicated += share.stats.chunks_deduplicated;
        outcome.warnings.extend(share.warnings);
    }
    outcome.warnings.sort();
    Ok(outcome)
}

/// What one reader read: (job, content) pairs and its counts.
#[derive(Default)]
struct ReadShare {
    contents: Vec<(usize, Option<FileContent>)>,
    stats: VolumeStats,
    warnings: Vec<String>,
}

fn read_share(
    repo: &Repository,
    jobs: &[ReadJob],
    next: &std::sync::atomic::AtomicUsize,
    seen: &Mutex<IdSet>,
    queue: mpsc::SyncSender<Raw>,
    progress: &VolumeProgress,
) -> Result<ReadShare, VolumeError> {
    let mut chunker = Chunker::new(repo.chunker_seed());
    // Reads only up to each cut, for sparse files (see `read_least`).
    let mut sparse_chunker: Option<Chunker> = None;
    let mut share = ReadShare::default();
    // New chunks go to the encoders in batches: one hand-over per batch,
    // not per chunk of a small file.
    let mut batch: Raw = Vec::new();
    let mut batch_bytes = 0;
    loop {
        let job = next.fetch_add(1, Ordering::Relaxed);
        let Some(ReadJob {
            path,
            delta,
            sparse,
        }) = jobs.get(job)
        else {
            if !batch.is_empty() {
                queue.send(batch).map_err(|_| {
                    VolumeError::io(Path::new("/"), "the repository writer stopped")
                })?;
            }
            return Ok(share);
        };
        let file = match open_for_reading(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                share
                    .warnings
                    .push(format!("{}: removed while the backup ran", path.display()));
                share.contents.push((job, None));
                continue;
            }
            Err(e) => return Err(VolumeError::io(path, e)),
        };
        let stats = &mut share.stats;
        // Names a chunk read; queues it for storing if it is new.
        let mut name_chunk = |chunk: &[u8]| -> Result<Piece, VolumeError> {
            progress
                .bytes_done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if chunk[0] == 0 && chunk.iter().all(|b| *b == 0) {
                return Ok(Piece::Zeros(chunk.len() as u64));
            }
            let id = repo.blob_id(chunk);
            let first = seen.lock().expect("seen chunks").insert(id);
            if first && !repo.has_blob(&id) {
                stats.chunks_new += 1;
                batch.push((id, chunk.to_vec()));
                batch_bytes += chunk.len();
                if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_CHUNKS {
                    batch_bytes = 0;
                    queue
                        .send(std::mem::take(&mut batch))
                        .map_err(|_| VolumeError::io(path, "the repository writer stopped"))?;
                }
            } else {
                stats.chunks_deduplicated += 1;
            }
            Ok(Piece::Chunk(id))
        };
        // A sparse file is read where it holds data, its holes taken as
        // zeros: the pieces a full read would give, as for a device whose
        // allocated blocks are known.
        let holes = match (delta, sparse) {
            (None, true) => file
                .metadata()
                .ok()
                .and_then(|m| sparse_delta(&file, m.len(), &chunker)),
            _ => None,
        };
        #[cfg(test)]
        if holes.is_some() {
            tests_hooks::holes_found(path);
        }
        let (pieces, read, size) = match (delta, holes) {
            (None, Some(holes)) => {
                let ended_early = std::cell::Cell::new(false);
                let sparse_chunker = sparse_chunker.get_or_insert_with(|| {
                    let mut chunker = Chunker::new(repo.chunker_seed());
                    chunker.read_least();
                    chunker
                });
                let read = read_changed(
                    &file,
                    &holes,
                    sparse_chunker,
                    &mut name_chunk,
                    |bytes| {
                        progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
                    },
                    |e| {
                        ended_early.set(e.kind() == std::io::ErrorKind::UnexpectedEof);
                        VolumeError::io(path, e)
                    },
                );
                match read {
                    Ok(read) => (read.pieces, read.bytes_read, holes.size()),
                    // Cut shorter since its holes were looked up (a live
                    // volume): read as it is now, whole.
                    Err(_) if ended_early.get() => {
                        use std::io::Seek;
                        (&file).rewind().map_err(|e| VolumeError::io(path, e))?;
                        read_whole(&file, &mut chunker, &mut name_chunk, path)?
                    }
                    Err(e) => return Err(e),
                }
            }
            (None, None) => read_whole(&file, &mut chunker, &mut name_chunk, path)?,
            (Some(delta), _) => {
                chunker.read_least();
                let reused = read_changed(
                    &file,
                    delta,
                    &mut chunker,
                    name_chunk,
                    |bytes| {
                        progress.bytes_done.fetch_add(bytes, Ordering::Relaxed);
                    },
                    |e| VolumeError::io(path, e),
                )?;
                share.stats.chunks_deduplicated += reused.chunks_reused;
                (reused.pieces, reused.bytes_read, delta.size())
            }
        };
        share.stats.files_read += 1;
        share.stats.bytes_read += read;
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        share.contents.push((job, Some((pieces, size))));
    }
}

/// What tests do at exact steps of a backup, to force what a live volume
/// does at random: change a file between two looks at it.
#[cfg(test)]
pub(super) mod tests_hooks {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    type Hook = (PathBuf, fn(&Path));

    static HOLES_FOUND: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

    /// Runs `hook` once the holes of the file at `path` are known, before
    /// its data is read.
    pub fn on_holes_found(path: &Path, hook: fn(&Path)) {
        HOLES_FOUND.lock().unwrap().push((path.to_path_buf(), hook));
    }

    pub(super) fn holes_found(path: &Path) {
        let hooks = HOLES_FOUND.lock().unwrap();
        for (wanted, hook) in hooks.iter() {
            if wanted == path {
                hook(path);
            }
        }
    }
}

/// Reads `file` from where it is to its end, cutting it into chunks that
/// `name_chunk` names: (pieces, bytes read, size).
fn read_whole(
    file: &File,
    chunker: &mut Chunker,
    name_chunk: &mut impl FnMut(&[u8]) -> Result<Piece, VolumeError>,
    path: &Path,
) -> Result<(Vec<Piece>, u64, u64), VolumeError> {
    let mut pieces: Vec<Piece> = Vec::new();
    let read = chunker.chunks(
        file,
        |chunk| {
            let piece = name_chunk(chunk)?;
            push_piece(&mut pieces, piece);
            Ok(())
        },
        |e| VolumeError::io(path, e),
    )?;
    Ok((pieces, read, read))
}

/// The holes of a file of `size` bytes as a [`BlockDelta`] against an
/// empty parent: only its data ranges are read. `None` when the file
/// system cannot tell (no `SEEK_DATA`) or the file has no hole after all.
fn sparse_delta(file: &File, size: u64, chunker: &Chunker) -> Option<BlockDelta> {
    use std::io::Seek;
    let ranges = data_ranges(file, size);
    // Looking for data moved the file's offset: a full read starts at 0.
    let mut file = file;
    file.rewind().ok()?;
    let ranges = ranges?;
    if ranges.iter().map(|(_, len)| len).sum::<u64>() >= size {
        return None;
    }
    BlockDelta::new(&[Piece::Zeros(size)], |_| None, chunker, size, &ranges).ok()
}

/// The (offset, length) ranges of the first `size` bytes of `file` that
/// hold data, as `SEEK_DATA` and `SEEK_HOLE` report them; `None` if the
/// file system does not answer. Moves the file's offset.
fn data_ranges(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor this function borrows open.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from `pos` to the end.
            return (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
                .then_some(ranges);
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let hole = (hole as u64).clamp(data + 1, size);
        ranges.push((data, hole - data));
        pos = hole;
    }
    Some(ranges)
}

/// Puts the read contents into the walked trees, stores the trees bottom
/// up, the reference list and the root, and finishes the writer.
async fn assemble(
    repo: &Repository,
    mut writer: PackWriter,
    mut walk: Walk,
    read: ReadOutcome,
    options: &VolumeBackupOptions,
    started: Instant,
    block: bool,
) -> Result<VolumeBackup, VolumeError> {
    let mut vanished: Vec<(usize, usize)> = Vec::new();
    let mut all_chunks: Vec<BlobId> = std::mem::take(&mut walk.reused_chunks);
    for (job, content) in walk.jobs.iter().zip(&read.contents) {
        match content {
            Some((pieces, size)) => {
                let node = &mut walk.dirs[job.dir].entries[job.entry];
                // The size as read: a live file may have changed since the walk.
                node.size = *size;
                node.content = pieces.clone();
                all_chunks.extend(pieces.iter().filter_map(|p| match p {
                    Piece::Chunk(id) => Some(*id),
                    Piece::Zeros(_) => None,
                }));
            }
            None => vanished.push((job.dir, job.entry)),
        }
    }
    for (dir, entry, job) in std::mem::take(&mut walk.aliases) {
        let source = &walk.jobs[job];
        let first = &walk.dirs[source.dir].entries[source.entry];
        let (content, size) = (first.content.clone(), first.size);
        let node = &mut walk.dirs[dir].entries[entry];
        node.content = content;
        node.size = size;
    }
    if block && !vanished.is_empty() {
        return Err(VolumeError::io(
            Path::new(&options.source),
            "the device was removed while it was read",
        ));
    }
    walk.stats.files -= vanished.len() as u64;
    let vanished: HashSet<(usize, usize)> = vanished.into_iter().collect();
    let mut trees: Vec<BlobId> = Vec::with_capacity(walk.dirs.len());
    let mut top_tree = None;
    for index in (0..walk.dirs.len()).rev() {
        // Children come after their parents in the walk: going backwards,
        // every subtree is stored before the directory that names it.
        let dir = &mut walk.dirs[index];
        // A directory listed as in the parent backup, whose subdirectories
        // are the parent's too, is the parent's tree: it is neither encoded
        // nor hashed again. (Its files were all taken over from the parent,
        // so none of them vanished while being read.)
        let same = dir
            .before
            .filter(|id| dir.listed_as_before && !dir.subtree_changed && repo.has_blob(id));
        let id = match same {
            Some(id) => id,
            None => {
                let tree = Tree {
                    entries: std::mem::take(&mut dir.entries)
                        .into_iter()
                        .enumerate()
                        .filter(|(entry, _)| !vanished.contains(&(index, *entry)))
                        .map(|(_, node)| node)
                        .collect(),
                };
                writer.add(&super::encode_tree(repo, &tree)).await?
            }
        };
        trees.push(id);
        let changed = dir.before != Some(id);
        match dir.parent {
            Some((up, entry)) => {
                walk.dirs[up].entries[entry].subtree = Some(id);
                walk.dirs[up].subtree_changed |= changed;
            }
            None => top_tree = Some(id),
        }
    }
    let top_tree = top_tree.expect("the top directory is walked");
    drop_elsewhere(std::mem::take(&mut walk.dirs));
    let mut blobs = trees;
    blobs.extend(all_chunks);
    // The same top tree is the same content: the parent's reference list
    // is this backup's.
    let refs = match options
        .parent
        .as_ref()
        .filter(|p| p.tree == top_tree && repo.has_blob(&p.refs))
    {
        Some(parent) => parent.refs,
        None => writer.add(&encode_refs(&blobs)).await?,
    };
    let mut stats = walk.stats;
    stats.files_read = read.stats.files_read;
    stats.bytes_read = read.stats.bytes_read;
    stats.chunks_new = read.stats.chunks_new;
    stats.chunks_deduplicated = read.stats.chunks_deduplicated;
    let mut root = VolumeRoot {
        format: VOLUME_FORMAT,
        source: options.source.clone(),
        // Nanoseconds: the newest backup of a source is its next parent,
        // even when two are made within a second.
        created: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        tree: top_tree,
        top: walk.top,
        block,
        refs,
        stats,
    };
    root.stats.bytes_stored = writer.stats().bytes_stored;
    root.stats.duration_ms = started.elapsed().as_millis() as u64;
    let root_blob = writer
        .add(&serde_json::to_vec(&root).expect("roots serialize"))
        .await?;
    let write = writer.finish().await?;
    // The stored root counts the packs uploaded before it was written; the
    // report counts all of them.
    root.stats.bytes_stored = write.bytes_stored;
    blobs.push(refs);
    blobs.push(root_blob);
    Ok(VolumeBackup {
        root_blob,
        root,
        blobs,
        write,
        warnings: read.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn repo_in(dir: &Path) -> Repository {
        let backend: Arc<dyn crate::repo::Backend> =
            Arc::new(crate::repo::LocalBackend::new(dir.join("repo")));
        Repository::init(
            backend,
            &crate::repo::KeySource::Password("pw".to_string().into()),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_scan_that_stops_before_it_is_done_fails_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_in(dir.path()).await;
        let lock = repo.lock_shared().await.unwrap();
        let top_metadata = std::fs::symlink_metadata(dir.path()).unwrap();
        let root = || ScannedDir {
            rel: PathBuf::new(),
            entries: Vec::new(),
            parent: None,
        };
        let walk_of = |messages: Vec<Result<Scanned, VolumeError>>| {
            let (found, dirs) = std::sync::mpsc::channel();
            for m in messages {
                found.send(m).unwrap();
            }
            // The scan's thread is gone: nothing more will come.
            drop(found);
            walk(&repo, dir.path(), dirs, BTreeMap::new(), None, false)
        };
        let done = walk_of(vec![
            Ok(Scanned::Top(top_metadata.clone())),
            Ok(Scanned::Dir(root())),
            Ok(Scanned::Done),
        ])
        .unwrap();
        assert_eq!(done.dirs.len(), 1);
        for cut in [
            vec![],
            vec![Ok(Scanned::Top(top_metadata.clone()))],
            vec![
                Ok(Scanned::Top(top_metadata.clone())),
                Ok(Scanned::Dir(root())),
            ],
        ] {
            let err = walk_of(cut).err().expect("an unfinished scan is an error");
            assert!(
                err.to_string().contains("stopped before it was done"),
                "{err}"
            );
        }
        let err = walk_of(vec![
            Ok(Scanned::Top(top_metadata)),
            Err(VolumeError::io(Path::new("/x/y"), "permission denied")),
        ])
        .err()
        .unwrap();
        assert!(err.to_string().contains("/x/y"), "{err}");
        lock.release().await.unwrap();
    }
}
