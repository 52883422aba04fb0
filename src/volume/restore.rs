//! Restoring a volume snapshot into a directory: the entries first, then
//! the file contents a batch of chunks at a time (read with few requests,
//! written at their offsets, holes left as holes), then the metadata,
//! directories last so that writing into them does not change their times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use super::direct::{ASSEMBLY_BYTES, BlockAssembler, DIRECT_MIN};
use super::tree::{DEVICE_ENTRY, Node, NodeKind, Piece, Tree, VolumeRoot};
use super::{VolumeError, VolumeProgress, read_trees};
use crate::aligned::{AlignedBuf, O_DIRECT, open_direct};
use crate::repo::{BlobId, IdMap, Repository};

/// Chunks read and written together: large enough for few requests, small
/// enough to bound memory (four batches are in memory at once: two being
/// read, one queued, one written).
const BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// Zero blocks of this size inside chunks are not written.
const HOLE_BLOCK: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct VolumeRestoreOptions {
    /// Restore only this path of the volume (a directory or a file).
    pub subpath: Option<PathBuf>,
    /// Give files their stored owners (needs root; default when running as root).
    pub owners: bool,
    pub progress: Option<Arc<VolumeProgress>>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Sockets in the snapshot, not made again: a socket file belongs to
    /// the process that listened on it, and a stale one can keep the
    /// restored application from binding its address.
    pub sockets_skipped: u64,
    pub hard_links: u64,
    pub bytes: u64,
    pub chunks_read: u64,
    pub duration_ms: u64,
    /// Entries restored without some of their metadata, and why.
    pub warnings: Vec<String>,
}

/// One entry to restore: its path relative to the target and its node.
struct Item {
    rel: PathBuf,
    node: Node,
}

/// The entries under `subpath` (all of them by default), parents first,
/// with paths relative to the subpath; and the node the target takes its
/// own metadata from, if the subpath is a directory.
fn select(
    root: &VolumeRoot,
    trees: &BTreeMap<PathBuf, Tree>,
    subpath: Option<&Path>,
) -> Result<(Vec<Item>, Option<Node>), VolumeError> {
    let prefix: PathBuf = subpath
        .map(|p| {
            p.components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect()
        })
        .unwrap_or_default();
    let mut top = Some(root.top.clone());
    if !prefix.as_os_str().is_empty() {
        let parent = prefix.parent().unwrap_or(Path::new(""));
        let name = prefix.file_name().expect("a normal component");
        let node = trees
            .get(parent)
            .and_then(|t| t.entries.iter().find(|e| e.name.as_os_str() == name))
            .ok_or_else(|| VolumeError::NoSuchPath {
                path: Path::new("/").join(&prefix),
            })?;
        if node.kind != NodeKind::Dir {
            return Ok((
                vec![Item {
                    rel: PathBuf::from(name),
                    node: node.clone(),
                }],
                None,
            ));
        }
        top = Some(node.clone());
    }
    let mut items = Vec::new();
    let mut pending = vec![prefix.clone()];
    while let Some(dir) = pending.pop() {
        let Some(tree) = trees.get(&dir) else {
            continue;
        };
        let rel_dir = dir
            .strip_prefix(&prefix)
            .expect("under the prefix")
            .to_path_buf();
        // Reverse onto the stack so that directories come out in name order.
        for node in tree.entries.iter().rev() {
            if node.kind == NodeKind::Dir {
                pending.push(dir.join(node.name.as_os_str()));
            }
        }
        for node in &tree.entries {
            items.push(Item {
                rel: rel_dir.join(node.name.as_os_str()),
                node: node.clone(),
            });
        }
    }
    // Parents before children: a path sorts after its parent.
    items.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((items, top))
}

/// Restores the volume `root` (or a path of it) into `target`, which is
/// created if needed. Existing files of the same names are overwritten;
/// other files in `target` are left alone.
pub async fn restore_dir(
    repo: &Repository,
    root: &VolumeRoot,
    target: &Path,
    options: VolumeRestoreOptions,
) -> Result<RestoreStats, VolumeError> {
    let started = Instant::now();
    let trees = read_trees(repo, root.tree).await?;
    let (items, top) = select(root, &trees, options.subpath.as_deref())?;
    drop(trees);
    let progress = options.progress.clone().unwrap_or_default();
    progress
        .bytes_total
        .store(items.iter().map(|i| i.node.size).sum(), Ordering::Relaxed);
    std::fs::create_dir_all(target).map_err(|e| VolumeError::io(target, e))?;
    let items = Arc::new(items);
    let (mut stats, linked, deferred) = {
        let items = items.clone();
        let target = target.to_path_buf();
        tokio::task::spawn_blocking(move || create_entries(&target, &items))
            .await
            .expect("restore task")?
    };
    let sink = Arc::new(Sink::new(
        items.iter().map(|i| target.join(&i.rel)).collect(),
        items.iter().map(|i| Path::new("/").join(&i.rel)).collect(),
        true,
        deferred,
        items.iter().map(|i| i.node.size).collect(),
    ));
    let files = items
        .iter()
        .enumerate()
        .filter(|(index, item)| item.node.kind == NodeKind::File && !linked.contains(index))
        .map(|(index, item)| (index, item.node.content.as_slice()));
    stats.chunks_read = write_contents(repo, sink, files, &progress).await?;
    let items_for_metadata = items.clone();
    let target_for_metadata = target.to_path_buf();
    let owners = options.owners;
    let warnings = tokio::task::spawn_blocking(move || {
        let mut warnings = Vec::new();
        for item in items_for_metadata.iter().rev() {
            if item.node.kind == NodeKind::Socket {
                continue;
            }
            let path = target_for_metadata.join(&item.rel);
            apply_metadata(&path, &item.node, owners, &mut warnings);
        }
        if let Some(top) = &top {
            apply_metadata(&target_for_metadata, top, owners, &mut warnings);
        }
        warnings
    })
    .await
    .expect("metadata task");
    stats.warnings.extend(warnings);
    stats.duration_ms = started.elapsed().as_millis() as u64;
    stats.bytes = items
        .iter()
        .filter(|i| i.node.kind == NodeKind::File)
        .map(|i| i.node.size)
        .sum();
    Ok(stats)
}

fn c_path(path: &Path) -> Result<CString, VolumeError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| VolumeError::io(path, e))
}

/// Makes every entry: directories, empty files of the right length (holes
/// until their chunks are written), links and special files. Returns the
/// items made as hard links to an earlier file (they get no content of
/// their own) and the files left to the writer to create when it writes
/// their first chunk: one open per file instead of two, which is most of
/// the cost of restoring small files.
#[allow(clippy::type_complexity)]
fn create_entries(
    target: &Path,
    items: &[Item],
) -> Result<(RestoreStats, HashSet<usize>, HashSet<usize>), VolumeError> {
    let mut stats = RestoreStats::default();
    let mut first_of_inode: HashMap<u64, PathBuf> = HashMap::new();
    let mut linked = HashSet::new();
    let mut deferred = HashSet::new();
    for (index, item) in items.iter().enumerate() {
        let path = target.join(&item.rel);
        let node = &item.node;
        match node.kind {
            NodeKind::Dir => {
                stats.dirs += 1;
                match std::fs::create_dir(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    other => other.map_err(|e| VolumeError::io(&path, e))?,
                }
            }
            NodeKind::File => {
                stats.files += 1;
                if node.links > 1 {
                    if let Some(first) = first_of_inode.get(&node.inode) {
                        remove_existing(&path)?;
                        std::fs::hard_link(first, &path).map_err(|e| VolumeError::io(&path, e))?;
                        stats.hard_links += 1;
                        linked.insert(index);
                        continue;
                    }
                    first_of_inode.insert(node.inode, path.clone());
                } else if node.content.iter().any(|p| matches!(p, Piece::Chunk(_))) {
                    deferred.insert(index);
                    continue;
                }
                remove_if_not_file(&path)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| VolumeError::io(&path, e))?;
                file.set_len(node.size)
                    .map_err(|e| VolumeError::io(&path, e))?;
            }
            NodeKind::Symlink => {
                stats.others += 1;
                remove_existing(&path)?;
                let target = node
                    .target
                    .as_ref()
                    .ok_or_else(|| VolumeError::io(&path, "a symbolic link without a target"))?;
                std::os::unix::fs::symlink(target.as_os_str(), &path)
                    .map_err(|e| VolumeError::io(&path, e))?;
            }
            NodeKind::Fifo | NodeKind::Char | NodeKind::Block => {
                stats.others += 1;
                remove_existing(&path)?;
                let kind = match node.kind {
                    NodeKind::Fifo => libc::S_IFIFO,
                    NodeKind::Char => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = c_path(&path)?;
                // SAFETY: a valid NUL-terminated path; mknod reads nothing else.
                let made =
                    unsafe { libc::mknod(c.as_ptr(), kind | 0o600, node.rdev as libc::dev_t) };
                if made != 0 {
                    stats.warnings.push(format!(
                        "{}: not created: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    ));
                }
            }
            NodeKind::Socket => stats.sockets_skipped += 1,
        }
    }
    Ok((stats, linked, deferred))
}

fn remove_existing(path: &Path) -> Result<(), VolumeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(VolumeError::io(path, "a directory is in the way")),
        Ok(_) => std::fs::remove_file(path).map_err(|e| VolumeError::io(path, e)),
        Err(_) => Ok(()),
    }
}

fn remove_if_not_file(path: &Path) -> Result<(), VolumeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => remove_existing(path),
        Err(_) => Ok(()),
    }
}

/// Where the contents of a restore go.
struct Sink {
    /// The path of each content, by index.
    paths: Vec<PathBuf>,
    /// Its path as errors name it (in the volume).
    shown: Vec<PathBuf>,
    /// Files created at full length and sparse: zeros are left as holes.
    /// Otherwise (a device, whose old blocks are not zero) every zero run
    /// is zeroed and every byte of a chunk written.
    holes: bool,
    /// Files not created yet: made (at their full length) when their first
    /// chunk is written.
    deferred: HashSet<usize>,
    /// The length of each content.
    sizes: Vec<u64>,
    /// Files being written past the page cache, between batches.
    direct: std::sync::Mutex<HashMap<usize, DirectFile>>,
    /// Assembly buffers of files done, for the next ones.
    spare: std::sync::Mutex<Vec<AlignedBuf>>,
}

impl Sink {
    fn new(
        paths: Vec<PathBuf>,
        shown: Vec<PathBuf>,
        holes: bool,
        deferred: HashSet<usize>,
        sizes: Vec<u64>,
    ) -> Self {
        Sink {
            paths,
            shown,
            holes,
            deferred,
            sizes,
            direct: Default::default(),
            spare: Default::default(),
        }
    }

    /// Whether content `index` is written past the page cache: a large
    /// file, new and empty (zeros are left as holes).
    fn is_direct(&self, index: usize) -> bool {
        cfg!(target_os = "linux") && self.holes && self.sizes[index] >= DIRECT_MIN
    }
}

/// A file written past the page cache: its descriptor and the bytes not
/// yet written in whole blocks.
struct DirectFile {
    file: std::fs::File,
    assembler: BlockAssembler,
    /// Whether the descriptor has `O_DIRECT`: cleared where the file system
    /// refuses a direct write, which is then made through the cache.
    direct: bool,
}

impl DirectFile {
    /// Opens content `index` for direct writes (created, empty, for its
    /// first chunk), or through the cache where the file system refuses.
    fn open(sink: &Sink, index: usize, create: bool) -> Result<Self, VolumeError> {
        let path = &sink.paths[index];
        let io = |e| VolumeError::io(path, e);
        let options = |exclusive: bool| {
            let mut options = OpenOptions::new();
            options
                .write(true)
                .create_new(create && exclusive)
                .create(create)
                .truncate(create && !exclusive);
            options
        };
        if create {
            // As in `create_file`: an exclusive open where nothing is in
            // the way, the checks only where something is. A refusal of
            // direct I/O is told apart by the open below.
            match open_direct(&mut options(true), path) {
                Ok(Some(file)) => return Ok(Self::with(sink, file, true)),
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
            remove_if_not_file(path)?;
        }
        let (file, direct) = match open_direct(&mut options(false), path).map_err(io)? {
            Some(file) => (file, true),
            None => (options(false).open(path).map_err(io)?, false),
        };
        Ok(Self::with(sink, file, direct))
    }

    fn with(sink: &Sink, file: std::fs::File, direct: bool) -> Self {
        let buf = sink
            .spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(ASSEMBLY_BYTES));
        DirectFile {
            file,
            assembler: BlockAssembler::new(buf),
            direct,
        }
    }

    /// The assembler, and how it writes whole blocks: positionally, falling
    /// back to the cache (for this file) if a direct write is refused.
    fn parts(
        &mut self,
    ) -> (
        &mut BlockAssembler,
        impl FnMut(u64, &[u8]) -> std::io::Result<()> + '_,
    ) {
        let (file, direct) = (&self.file, &mut self.direct);
        let write = move |offset: u64, blocks: &[u8]| match file.write_all_at(blocks, offset) {
            Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
                clear_direct(file)?;
                *direct = false;
                file.write_all_at(blocks, offset)
            }
            other => other,
        };
        (&mut self.assembler, write)
    }
}

/// Takes `O_DIRECT` off a descriptor.
fn clear_direct(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; F_GETFL and F_SETFL read nothing else.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A chunk to write.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WritePiece {
    /// The content it belongs to (index into the sink).
    index: usize,
    /// Its offset there.
    offset: u64,
    id: BlobId,
    /// The first chunk of a deferred file: it creates the file.
    create: bool,
    /// The content's last chunk: if the content does not end with written
    /// bytes (zeros left as holes), its writer sets the length.
    last: bool,
}

/// Writes the contents `files` (index into `sink`, pieces) a batch of
/// chunks at a time: each batch read with few requests while the one
/// before it is written. Returns the chunks read.
async fn write_contents<'a>(
    repo: &Repository,
    sink: Arc<Sink>,
    files: impl Iterator<Item = (usize, &'a [Piece])>,
    progress: &Arc<VolumeProgress>,
) -> Result<u64, VolumeError> {
    // The pieces to write, in file order: (content, offset, chunk).
    let mut batches: Vec<Vec<WritePiece>> = Vec::new();
    let mut zeros: Vec<(usize, u64, u64)> = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0;
    for (index, pieces) in files {
        let mut offset = 0;
        let mut create = sink.deferred.contains(&index);
        let mut queued = false;
        for piece in pieces {
            match piece {
                Piece::Zeros(n) => {
                    if !sink.holes {
                        zeros.push((index, offset, *n));
                    }
                    offset += n;
                }
                Piece::Chunk(id) => {
                    let length = repo.raw_length(id).unwrap_or(0) as u64;
                    current.push(WritePiece {
                        index,
                        offset,
                        id: *id,
                        create,
                        last: false,
                    });
                    queued = true;
                    create = false;
                    current_bytes += length;
                    offset += length;
                    if current_bytes >= BATCH_BYTES {
                        batches.push(std::mem::take(&mut current));
                        current_bytes = 0;
                    }
                }
            }
        }
        // The file's chunks were queued last: its last one ends the
        // current batch, or the batch just closed.
        if queued
            && let Some(piece) = current
                .last_mut()
                .or_else(|| batches.last_mut().and_then(|b| b.last_mut()))
        {
            piece.last = true;
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    if !zeros.is_empty() {
        let sink = sink.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let mut open = OpenContent::default();
            for (index, offset, length) in zeros {
                let path = &sink.paths[index];
                let file = open.get(index, path)?;
                zero_range(file, offset, length).map_err(|e| VolumeError::io(path, e))?;
                progress.bytes_done.fetch_add(length, Ordering::Relaxed);
            }
            Ok::<_, VolumeError>(())
        })
        .await
        .expect("zeroing task")?;
    }
    let mut chunks_read = 0;
    let (expected, mut received) = (batches.len(), 0);
    // Reading (and decrypting) runs in a task of its own, so that the next
    // batches are fetched and decoded while this one is written: a stream
    // polled only between writes would leave the reads idle meanwhile. Two
    // batches in the reader (one fetched from the disk while the other is
    // decoded) and one queued bound the memory.
    let (read_tx, mut read_rx) = tokio::sync::mpsc::channel(1);
    let reader = {
        let repo = repo.clone();
        tokio::spawn(async move {
            let mut reads = futures::stream::iter(batches)
                .map(|batch| {
                    let repo = repo.clone();
                    async move {
                        let mut unique: Vec<BlobId> = batch.iter().map(|piece| piece.id).collect();
                        unique.sort();
                        unique.dedup();
                        let data = repo.read_blobs(&unique).await;
                        (batch, unique, data)
                    }
                })
                .buffered(2);
            while let Some(read) = reads.next().await {
                if read_tx.send(read).await.is_err() {
                    return;
                }
            }
        })
    };
    // A failed write ends the reads too.
    let _stop_reading = AbortOnDrop(reader);
    while let Some((batch, unique, data)) = read_rx.recv().await {
        received += 1;
        let mut chunks: IdMap<Vec<u8>> =
            IdMap::with_capacity_and_hasher(unique.len(), Default::default());
        for (id, result) in unique.into_iter().zip(data) {
            match result {
                Ok(bytes) => {
                    chunks.insert(id, bytes);
                }
                Err(e) => {
                    let piece = batch
                        .iter()
                        .find(|piece| piece.id == id)
                        .expect("the batch names the chunk");
                    return Err(VolumeError::Damaged {
                        path: sink.shown[piece.index].clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
        chunks_read += chunks.len() as u64;
        let sink = sink.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || write_batch(&sink, &batch, &chunks, &progress))
            .await
            .expect("write task")?;
    }
    if received < expected {
        // Only a panic ends the reads early; never report a partial restore
        // as done.
        return Err(VolumeError::io(
            &sink.paths[0],
            "reading the volume's data stopped before its end",
        ));
    }
    Ok(chunks_read)
}

/// Aborts a task when dropped: work that no one waits for any more.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes a batch: the pieces of large files past the page cache (see
/// [`write_direct`]), the others through it (see [`write_cached`]).
fn write_batch(
    sink: &Sink,
    batch: &[WritePiece],
    chunks: &IdMap<Vec<u8>>,
    progress: &VolumeProgress,
) -> Result<(), VolumeError> {
    let (direct, cached): (Vec<WritePiece>, Vec<WritePiece>) =
        batch.iter().partition(|piece| sink.is_direct(piece.index));
    if !direct.is_empty() {
        write_direct(sink, &direct, chunks, progress)?;
    }
    if !cached.is_empty() {
        write_cached(sink, &cached, chunks, progress)?;
    }
    Ok(())
}

/// Writes the pieces of files written past the page cache, a file at a
/// time: whole blocks are written, the partial block at the end of the
/// batch waits for the next one, and the file's last chunk writes the rest
/// and sets its length.
fn write_direct(
    sink: &Sink,
    pieces: &[WritePiece],
    chunks: &IdMap<Vec<u8>>,
    progress: &VolumeProgress,
) -> Result<(), VolumeError> {
    for group in pieces.chunk_by(|a, b| a.index == b.index) {
        let index = group[0].index;
        let path = &sink.paths[index];
        let carried = sink
            .direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
        let mut file = match carried {
            Some(file) => file,
            None => DirectFile::open(sink, index, group[0].create)?,
        };
        let (assembler, mut write) = file.parts();
        for piece in group {
            let data = &chunks[&piece.id];
            assembler
                .put(piece.offset, data, &mut write)
                .map_err(|e| VolumeError::io(path, e))?;
            progress
                .bytes_done
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        if group.last().is_some_and(|piece| piece.last) {
            assembler
                .finish(&mut write)
                .map_err(|e| VolumeError::io(path, e))?;
            drop(write);
            // The last block was padded, or the file ends in a hole.
            file.file
                .set_len(sink.sizes[index])
                .map_err(|e| VolumeError::io(path, e))?;
            sink.spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(file.assembler.into_buffer());
        } else {
            assembler
                .write_whole_blocks(&mut write)
                .map_err(|e| VolumeError::io(path, e))?;
            drop(write);
            sink.direct
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(index, file);
        }
    }
    Ok(())
}

/// Writes pieces through the page cache. A batch of a few large files is
/// written on every core, in contiguous parts, one per thread (the writes
/// are positional, so two parts may share a file; the files are created
/// first). A batch of many files is written on every core too, but split
/// only where the directory changes: creating files in one directory from
/// several threads would only contend for the directory, and each file
/// stays with one thread.
fn write_cached(
    sink: &Sink,
    batch: &[WritePiece],
    chunks: &IdMap<Vec<u8>>,
    progress: &VolumeProgress,
) -> Result<(), VolumeError> {
    let writers = crate::cores();
    let mut files: Vec<usize> = batch.iter().map(|piece| piece.index).collect();
    files.dedup();
    if writers < 2 || batch.len() < 2 {
        return write_part(sink, batch, chunks, progress);
    }
    if files.len() > writers {
        let parts = directory_parts(batch, writers, |index| sink.paths[index].parent());
        if parts.len() < 2 {
            return write_part(sink, batch, chunks, progress);
        }
        return write_parts(sink, &parts, chunks, progress);
    }
    for piece in batch.iter().filter(|piece| piece.create) {
        create_file(&sink.paths[piece.index])?;
    }
    let batch: Vec<WritePiece> = batch
        .iter()
        .map(|&piece| WritePiece {
            create: false,
            ..piece
        })
        .collect();
    let parts: Vec<&[WritePiece]> = batch.chunks(batch.len().div_ceil(writers)).collect();
    write_parts(sink, &parts, chunks, progress)
}

/// Writes each part on a thread of its own.
fn write_parts(
    sink: &Sink,
    parts: &[&[WritePiece]],
    chunks: &IdMap<Vec<u8>>,
    progress: &VolumeProgress,
) -> Result<(), VolumeError> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = parts
            .iter()
            .map(|&part| scope.spawn(move || write_part(sink, part, chunks, progress)))
            .collect();
        threads
            .into_iter()
            .try_for_each(|thread| thread.join().expect("writer thread"))
    })
}

/// Splits `batch` into at most `parts` contiguous parts of about equal
/// numbers of pieces, cutting only where the directory (`dir_of` a piece's
/// content) changes: no directory, and so no file, is in two parts.
fn directory_parts<D: PartialEq>(
    batch: &[WritePiece],
    parts: usize,
    dir_of: impl Fn(usize) -> D,
) -> Vec<&[WritePiece]> {
    let target = batch.len().div_ceil(parts.max(1)).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut rest = batch;
    while out.len() + 1 < parts && rest.len() > target {
        let mut cut = target;
        while cut < rest.len() && dir_of(rest[cut].index) == dir_of(rest[cut - 1].index) {
            cut += 1;
        }
        if cut == rest.len() {
            break;
        }
        let (part, after) = rest.split_at(cut);
        out.push(part);
        rest = after;
    }
    out.push(rest);
    out
}

/// The content last written to, kept open: consecutive pieces of one file
/// (or device) are written through one descriptor.
#[derive(Default)]
struct OpenContent(Option<(usize, std::fs::File)>);

impl OpenContent {
    fn get(&mut self, index: usize, path: &Path) -> Result<&std::fs::File, VolumeError> {
        if self.0.as_ref().map(|(i, _)| *i) != Some(index) {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| VolumeError::io(path, e))?;
            self.0 = Some((index, file));
        }
        Ok(&self.0.as_ref().expect("opened above").1)
    }
}

/// Creates (or replaces) a file, empty: its writes give it its length (the
/// writer of its last chunk sets it where the file ends in a hole), so a
/// file written whole costs no truncate.
fn create_file(path: &Path) -> Result<std::fs::File, VolumeError> {
    // Into a new directory, nothing is in the way: one exclusive open (it
    // never follows a link, never opens what was there) instead of an
    // lstat first.
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(VolumeError::io(path, e)),
    }
    remove_if_not_file(path)?;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| VolumeError::io(path, e))
}

/// The runs of `data` to write, as (start, end): its [`HOLE_BLOCK`]s that
/// are not all zeros, adjacent ones merged.
fn data_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in data.chunks(HOLE_BLOCK).enumerate() {
        if block[0] == 0 && block.iter().all(|b| *b == 0) {
            continue;
        }
        let (start, end) = (i * HOLE_BLOCK, i * HOLE_BLOCK + block.len());
        match runs.last_mut() {
            Some(run) if run.1 == start => run.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn write_part(
    sink: &Sink,
    batch: &[WritePiece],
    chunks: &IdMap<Vec<u8>>,
    progress: &VolumeProgress,
) -> Result<(), VolumeError> {
    let mut open = OpenContent::default();
    for piece in batch {
        let path = &sink.paths[piece.index];
        if piece.create {
            open.0 = Some((piece.index, create_file(path)?));
        }
        let file = open.get(piece.index, path)?;
        let data = &chunks[&piece.id];
        if sink.holes {
            // Blocks of zeros inside a chunk stay holes, as they were in a
            // sparse file; each run of other blocks is one write.
            let mut written_end = piece.offset;
            for (start, end) in data_runs(data) {
                let at = piece.offset + start as u64;
                file.write_all_at(&data[start..end], at)
                    .map_err(|e| VolumeError::io(path, e))?;
                written_end = at + (end - start) as u64;
            }
            // A file that ends in a hole gets its length from its last
            // chunk's writer; every other file gets it from its last write.
            let size = sink.sizes[piece.index];
            if piece.last && written_end < size {
                file.set_len(size).map_err(|e| VolumeError::io(path, e))?;
            }
        } else {
            file.write_all_at(data, piece.offset)
                .map_err(|e| VolumeError::io(path, e))?;
        }
        progress
            .bytes_done
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Zeroes `length` bytes of `file` from `offset`: the aligned middle by
/// fallocate (a device's write-zeroes, nothing written where the storage
/// supports it), the rest, or all of it where fallocate is refused, by
/// writing zeros.
pub(super) fn zero_range(file: &std::fs::File, offset: u64, length: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const ALIGN: u64 = 4096;
    let end = offset + length;
    let (start_aligned, end_aligned) = (offset.div_ceil(ALIGN) * ALIGN, end / ALIGN * ALIGN);
    let write_zeros = |from: u64, to: u64| -> std::io::Result<()> {
        let zeros = vec![0u8; (to - from).min(1 << 20) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    };
    if end_aligned > start_aligned {
        // SAFETY: a valid open descriptor; fallocate reads nothing else.
        let done = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                start_aligned as libc::off_t,
                (end_aligned - start_aligned) as libc::off_t,
            )
        } == 0;
        if done {
            write_zeros(offset, start_aligned)?;
            return write_zeros(end_aligned, end);
        }
    }
    write_zeros(offset, end)
}

/// Restores a block volume (see [`DEVICE_ENTRY`]) into `target`: a block
/// device of at least the volume's size, whose every byte up to that size
/// is written or zeroed (the rest is left alone), or an image file, created
/// or replaced, with its zeros left as holes.
pub async fn restore_image(
    repo: &Repository,
    root: &VolumeRoot,
    target: &Path,
    options: VolumeRestoreOptions,
) -> Result<RestoreStats, VolumeError> {
    let started = Instant::now();
    let trees = read_trees(repo, root.tree).await?;
    let node = trees
        .get(Path::new(""))
        .and_then(|t| {
            t.entries
                .iter()
                .find(|e| e.name.as_os_str() == DEVICE_ENTRY && e.kind == NodeKind::File)
        })
        .cloned()
        .ok_or_else(|| VolumeError::Corrupt {
            what: format!("volume {}", root.source),
            message: format!("a block volume without its '{DEVICE_ENTRY}' entry"),
        })?;
    drop(trees);
    let device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if device {
        let size = super::backup::content_size(target)?;
        if size < node.size {
            return Err(VolumeError::io(
                target,
                format!(
                    "the device holds {size} bytes and the volume {}: restore into a device at least as large",
                    node.size
                ),
            ));
        }
    } else {
        if target.is_dir() {
            return Err(VolumeError::io(
                target,
                "a directory: a block volume is restored into a block device or an image file",
            ));
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(target)
            .map_err(|e| VolumeError::io(target, e))?;
        file.set_len(node.size)
            .map_err(|e| VolumeError::io(target, e))?;
    }
    let progress = options.progress.clone().unwrap_or_default();
    progress.bytes_total.store(node.size, Ordering::Relaxed);
    let sink = Arc::new(Sink::new(
        vec![target.to_path_buf()],
        vec![Path::new("/").join(DEVICE_ENTRY)],
        !device,
        HashSet::new(),
        vec![node.size],
    ));
    let chunks_read = write_contents(
        repo,
        sink,
        std::iter::once((0, node.content.as_slice())),
        &progress,
    )
    .await?;
    // The data is on the device (or in the file) before the restore says
    // it is done: a mover Pod's end is not a flush.
    let target_owned = target.to_path_buf();
    tokio::task::spawn_blocking(move || {
        OpenOptions::new()
            .write(true)
            .open(&target_owned)
            .and_then(|f| f.sync_all())
            .map_err(|e| VolumeError::io(&target_owned, e))
    })
    .await
    .expect("sync task")?;
    progress.files_done.store(1, Ordering::Relaxed);
    Ok(RestoreStats {
        files: 1,
        bytes: node.size,
        chunks_read,
        duration_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    })
}

/// Owner, mode, extended attributes and times, in that order (changing the
/// owner clears setuid bits; the times go last because the others change
/// the change time only).
///
/// An owner or mode the entry already has is not set again: each change is
/// a metadata write (a journal entry on most file systems), and a restore
/// by the files' owner of files with default modes would otherwise make two
/// per file for nothing.
fn apply_metadata(path: &Path, node: &Node, owners: bool, warnings: &mut Vec<String>) {
    let Ok(c) = c_path(path) else { return };
    let current = std::fs::symlink_metadata(path).ok();
    let chown = owners
        && current
            .as_ref()
            .is_none_or(|m| m.uid() != node.uid || m.gid() != node.gid);
    // A new owner clears setuid and setgid: those are set again after it.
    let chmod = current
        .as_ref()
        .is_none_or(|m| m.mode() & 0o7777 != node.mode)
        || (chown && node.mode & 0o7000 != 0);
    if chown {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::lchown(c.as_ptr(), node.uid, node.gid) } != 0 {
            warnings.push(format!(
                "{}: owner {}:{} not set: {}",
                path.display(),
                node.uid,
                node.gid,
                std::io::Error::last_os_error()
            ));
        }
    }
    if node.kind != NodeKind::Symlink {
        use std::os::unix::fs::PermissionsExt;
        if chmod
            && let Err(e) =
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode))
        {
            warnings.push(format!("{}: mode not set: {e}", path.display()));
        }
        for (name, value) in &node.xattrs {
            let Ok(value) = hex::decode(value) else {
                continue;
            };
            if let Err(e) = xattr::set(path, name.as_os_str(), &value) {
                warnings.push(format!(
                    "{}: extended attribute {name} not set: {e}",
                    path.display()
                ));
            }
        }
    }
    let times = [
        // Access times are not stored: left as they are.
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: node.mtime.0 as libc::time_t,
            tv_nsec: node.mtime.1 as libc::c_long,
        },
    ];
    // SAFETY: a valid path and two timespecs, as utimensat requires.
    let set = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if set != 0 {
        warnings.push(format!(
            "{}: times not set: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_many_files_is_split_only_where_the_directory_changes() {
        let piece = |index: usize| WritePiece {
            index,
            offset: 0,
            id: BlobId([index as u8; 32]),
            create: true,
            last: true,
        };
        // Content i is in directory dirs[i]; content 3 has three pieces.
        let dirs = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3];
        let mut batch: Vec<WritePiece> = (0..dirs.len()).map(piece).collect();
        batch.splice(3..4, [piece(3), piece(3), piece(3)]);
        for parts in 1..=6 {
            let split = directory_parts(&batch, parts, |i| dirs[i]);
            assert!(
                !split.is_empty() && split.len() <= parts,
                "{parts}: {split:?}"
            );
            let joined: Vec<WritePiece> = split.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(joined, batch, "{parts}: every piece once, in order");
            for pair in split.windows(2) {
                let (before, after) = (pair[0].last().unwrap(), pair[1][0]);
                assert_ne!(dirs[before.index], dirs[after.index], "{parts}: {split:?}");
            }
            assert!(split.iter().all(|p| !p.is_empty()));
        }
        assert_eq!(directory_parts(&batch, 2, |i| dirs[i]).len(), 2);
        // One directory: one part.
        assert_eq!(directory_parts(&batch, 4, |_| 0).len(), 1);
    }

    #[test]
    fn a_refused_direct_write_is_made_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let sink = Sink::new(
            vec![path.clone()],
            vec![PathBuf::from("/file")],
            true,
            HashSet::new(),
            vec![DIRECT_MIN],
        );
        let mut file = DirectFile::open(&sink, 0, true).unwrap();
        let (_, mut write) = file.parts();
        // An unaligned length and address: refused by O_DIRECT with EINVAL.
        let data = crate::test_data::pseudo_random(5001, 3);
        write(0, &data[1..]).unwrap();
        write(5000, b"end").unwrap();
        drop(write);
        assert!(!file.direct, "the descriptor no longer writes directly");
        let mut expected = data[1..].to_vec();
        expected.extend_from_slice(b"end");
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn data_runs_merge_adjacent_blocks_and_skip_zero_blocks() {
        let mut data = vec![1u8; 2 * HOLE_BLOCK];
        data.extend(vec![0u8; HOLE_BLOCK]);
        data.extend(vec![2u8; 100]);
        assert_eq!(
            data_runs(&data),
            vec![(0, 2 * HOLE_BLOCK), (3 * HOLE_BLOCK, 3 * HOLE_BLOCK + 100)]
        );
        assert!(data_runs(&vec![0u8; 3 * HOLE_BLOCK + 5]).is_empty());
        assert!(data_runs(&[]).is_empty());
    }
}
