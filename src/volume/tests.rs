//! The data mover on real directories and a local repository.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::repo::{Backend, KeySource, LocalBackend, RepoLock};

async fn new_repo(dir: &Path) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.join("repo")));
    Repository::init(backend, &KeySource::Password("pw".to_string().into()))
        .await
        .unwrap()
}

fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A new temporary directory holding the empty directory `source`.
fn empty_source() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    (dir, source)
}

/// A directory with every kind of entry the mover keeps.
fn fixture(root: &Path) {
    std::fs::create_dir_all(root.join("nested/deeper")).unwrap();
    std::fs::write(root.join("small.txt"), b"hello volume\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("nested/random.bin"), pseudo_random(9_000_000, 1)).unwrap();
    let text: Vec<u8> = b"a compressible line of text\n".repeat(100_000);
    std::fs::write(root.join("nested/deeper/text.log"), &text).unwrap();
    // Sparse: a hole, some data, a hole.
    let sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.set_len(64 * 1024 * 1024).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 32 * 1024 * 1024).unwrap();
    std::fs::hard_link(root.join("small.txt"), root.join("nested/hard-link.txt")).unwrap();
    std::os::unix::fs::symlink("../small.txt", root.join("nested/link")).unwrap();
    let odd = root.join(OsString::from_vec(b"caf\xe9".to_vec()));
    std::fs::write(&odd, b"latin-1 name").unwrap();
    std::fs::set_permissions(
        root.join("nested/deeper"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("small.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let _ = xattr::set(root.join("small.txt"), "user.origin", b"test");
}

/// [`fixture`] in `source` of a new temporary directory, backed up into a
/// new repository there: the directory, the source, the repository, the
/// lock the backup took and the backup.
async fn fixture_backup() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Repository,
    RepoLock,
    VolumeBackup,
) {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fixture(&source);
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, &source, None).await;
    (dir, source, repo, lock, done)
}

async fn backup(
    repo: &Repository,
    lock: &RepoLock,
    dir: &Path,
    parent: Option<VolumeRoot>,
) -> VolumeBackup {
    backup_dir(
        repo,
        lock,
        dir,
        VolumeBackupOptions {
            source: "test".into(),
            parent,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// `source` backed up into a new repository in `dir` and restored into
/// `dir/restored`, which is returned.
async fn backed_up_and_restored(dir: &Path, source: &Path) -> PathBuf {
    let repo = new_repo(dir).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, source, None).await;
    let target = dir.join("restored");
    restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    lock.release().await.unwrap();
    target
}

/// Every entry under `root` with what the mover promises to keep.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let content = if m.is_file() {
                blake3::hash(&std::fs::read(&path).unwrap())
                    .to_hex()
                    .to_string()
            } else if m.is_symlink() {
                std::fs::read_link(&path).unwrap().display().to_string()
            } else {
                String::new()
            };
            if m.is_dir() {
                pending.push(path.clone());
            }
            let xattrs: Vec<_> = if m.is_symlink() {
                Vec::new()
            } else {
                xattr::list(&path).map(|l| l.collect()).unwrap_or_default()
            };
            out.push(format!(
                "{rel:?} mode={:o} uid={} size={} mtime={}.{} links={} {content} {xattrs:?}",
                m.mode(),
                m.uid(),
                m.size(),
                m.mtime(),
                if m.is_symlink() { 0 } else { m.mtime_nsec() },
                m.nlink(),
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_directory_comes_back_with_its_content_and_metadata() {
    let (dir, source, repo, lock, done) = fixture_backup().await;
    assert_eq!(done.root.stats.files, 7, "{:?}", done.root.stats);
    assert_eq!(done.root.stats.others, 1, "the symlink");
    // The hard link's content is read once.
    assert_eq!(done.root.stats.files_read, 5, "{:?}", done.root.stats);
    let target = dir.path().join("restored");
    let stats = restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    assert_eq!(stats.hard_links, 1);
    assert_eq!(listing(&target), listing(&source));
    let sparse = std::fs::metadata(target.join("sparse.img")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1024 * 1024,
        "a sparse file stays sparse: {} blocks",
        sparse.blocks()
    );
    // One file of the snapshot alone.
    let one = dir.path().join("one");
    restore_dir(
        &repo,
        &done.root,
        &one,
        VolumeRestoreOptions {
            subpath: Some("/nested/deeper/text.log".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(one.join("text.log")).unwrap(),
        std::fs::read(source.join("nested/deeper/text.log")).unwrap()
    );
    let missing = restore_dir(
        &repo,
        &done.root,
        &one,
        VolumeRestoreOptions {
            subpath: Some("/no/such".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(missing.to_string().contains("/no/such"), "{missing}");
    lock.release().await.unwrap();
}

#[tokio::test]
async fn an_unchanged_tree_is_not_read_again_and_a_changed_file_stores_only_its_chunks() {
    let (dir, source, repo, lock, first) = fixture_backup().await;
    let again = backup(&repo, &lock, &source, Some(first.root.clone())).await;
    assert_eq!(again.root.stats.files_read, 0, "{:?}", again.root.stats);
    assert_eq!(again.root.stats.files_unchanged, 7);
    assert_eq!(again.root.tree, first.root.tree, "the same trees");
    assert_eq!(again.root.refs, first.root.refs, "the same reference list");
    assert!(
        again.write.bytes_stored < 4096,
        "an unchanged backup stores its root only: {:?}",
        again.write
    );
    // Append to the large random file: its first chunks stay the same.
    let big = source.join("nested/random.bin");
    let mut data = std::fs::read(&big).unwrap();
    // The cut points depend on the repository's seed: the only chunk that
    // changes is the file's last, whatever its length. 9 MB is more than two
    // of the longest chunks, so the file always has chunks before its last.
    let mut last_chunk = 0;
    crate::volume::chunker::Chunker::new(repo.chunker_seed())
        .chunks(
            &data[..],
            |chunk| {
                last_chunk = chunk.len();
                Ok::<(), std::io::Error>(())
            },
            |e| e,
        )
        .unwrap();
    data.extend_from_slice(b"appended");
    std::fs::write(&big, &data).unwrap();
    let changed = backup(&repo, &lock, &source, Some(again.root.clone())).await;
    let s = &changed.root.stats;
    assert_eq!(s.files_read, 1, "{s:?}");
    assert!(
        s.chunks_new >= 1 && s.chunks_new < 3 && s.chunks_deduplicated >= 1,
        "only the changed chunk is new: {s:?}"
    );
    assert!(
        changed.write.bytes_stored < last_chunk as u64 + 64 * 1024,
        "only the last chunk ({last_chunk} bytes) and the trees are stored: {:?}",
        changed.write
    );
    // The directory beside the change keeps its listing; those above the
    // changed file are listed anew.
    let before = read_trees(&repo, again.root.tree).await.unwrap();
    let after = read_trees(&repo, changed.root.tree).await.unwrap();
    let subtree = |trees: &BTreeMap<PathBuf, Tree>, dir: &str, name: &str| {
        let listing = &trees[Path::new(dir)];
        listing
            .entries
            .iter()
            .find(|n| n.name.as_os_str() == name)
            .and_then(|n| n.subtree)
            .unwrap()
    };
    assert_eq!(
        subtree(&before, "nested", "deeper"),
        subtree(&after, "nested", "deeper")
    );
    assert_ne!(
        subtree(&before, "", "nested"),
        subtree(&after, "", "nested")
    );
    assert_ne!(changed.root.refs, again.root.refs);
    // A change two levels down: "nested" lists the same entries, but its
    // subdirectory's tree is new, so its own tree is new too, and so on up.
    let deep = source.join("nested/deeper/text.log");
    let mut text = std::fs::read(&deep).unwrap();
    text.extend_from_slice(b"one more line\n");
    std::fs::write(&deep, &text).unwrap();
    let deeper = backup(&repo, &lock, &source, Some(changed.root.clone())).await;
    assert_eq!(deeper.root.stats.files_read, 1);
    let deepest = read_trees(&repo, deeper.root.tree).await.unwrap();
    assert_ne!(
        subtree(&after, "nested", "deeper"),
        subtree(&deepest, "nested", "deeper")
    );
    assert_ne!(
        subtree(&after, "", "nested"),
        subtree(&deepest, "", "nested")
    );
    assert_ne!(deeper.root.tree, changed.root.tree);
    assert_ne!(deeper.root.refs, changed.root.refs);
    let target = dir.path().join("restored");
    restore_dir(
        &repo,
        &deeper.root,
        &target,
        VolumeRestoreOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(listing(&target), listing(&source));
    // The reference list names every blob the backup needs.
    let refs = crate::repo::decode_refs(&repo.read_blob(&deeper.root.refs).await.unwrap()).unwrap();
    let refs: HashSet<BlobId> = refs.into_iter().collect();
    for tree in deepest.values() {
        for node in &tree.entries {
            for piece in &node.content {
                if let Piece::Chunk(id) = piece {
                    assert!(refs.contains(id), "{:?} is referenced", node.name);
                }
            }
            if let Some(sub) = node.subtree {
                assert!(
                    refs.contains(&sub),
                    "the tree of {:?} is referenced",
                    node.name
                );
            }
        }
    }
    lock.release().await.unwrap();
}

/// The xattrs a backup recorded for `rel`, values in hex.
async fn recorded_xattrs(repo: &Repository, root: &VolumeRoot, rel: &str) -> Vec<(String, String)> {
    let trees = read_trees(repo, root.tree).await.unwrap();
    let path = Path::new(rel);
    let dir = path.parent().unwrap_or(Path::new(""));
    let name = path.file_name().unwrap();
    let node = trees[dir]
        .entries
        .iter()
        .find(|n| n.name.as_os_str() == name)
        .unwrap_or_else(|| panic!("{rel} is in the backup"));
    node.xattrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::test]
async fn xattrs_are_taken_from_the_parent_only_while_inode_and_change_time_are_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fixture(&source);
    if xattr::set(source.join("nested"), "user.kind", b"dir").is_err() {
        eprintln!("this file system keeps no user xattrs: nothing to check");
        return;
    }
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let hex = |v: &str| hex::encode(v);
    let first = backup(&repo, &lock, &source, None).await;
    assert_eq!(
        recorded_xattrs(&repo, &first.root, "small.txt").await,
        [("user.origin".to_string(), hex("test"))]
    );
    let unchanged = backup(&repo, &lock, &source, Some(first.root.clone())).await;
    assert_eq!(unchanged.root.tree, first.root.tree, "the same trees");
    // Changing an xattr changes nothing else of the file: its change time
    // tells.
    xattr::set(source.join("small.txt"), "user.origin", b"second").unwrap();
    xattr::set(source.join("small.txt"), "user.added", b"new").unwrap();
    xattr::remove(source.join("nested"), "user.kind").unwrap();
    let changed = backup(&repo, &lock, &source, Some(unchanged.root.clone())).await;
    assert_eq!(
        recorded_xattrs(&repo, &changed.root, "small.txt").await,
        [
            ("user.added".to_string(), hex("new")),
            ("user.origin".to_string(), hex("second"))
        ]
    );
    assert_eq!(recorded_xattrs(&repo, &first.root, "nested").await.len(), 1);
    assert!(
        recorded_xattrs(&repo, &changed.root, "nested")
            .await
            .is_empty()
    );
    // Its change time is new, so the file is read again too.
    assert_eq!(changed.root.stats.files_read, 1);
    // A copy with new inodes and change times (a volume made from a
    // snapshot) is compared by size and time only: its xattrs are read.
    let copy = backup_dir(
        &repo,
        &lock,
        &source,
        VolumeBackupOptions {
            source: "test".into(),
            parent: Some(first.root.clone()),
            ignore_inode: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        recorded_xattrs(&repo, &copy.root, "small.txt").await,
        recorded_xattrs(&repo, &changed.root, "small.txt").await
    );
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_damaged_chunk_fails_the_restore_and_verify_names_the_file() {
    let (dir, _source, repo, lock, done) = fixture_backup().await;
    // The chunk of text.log: compressible, so alone in its bytes.
    let trees = read_trees(&repo, done.root.tree).await.unwrap();
    let text = trees[Path::new("nested/deeper")]
        .entries
        .iter()
        .find(|e| e.name.0 == "text.log")
        .unwrap();
    let Piece::Chunk(chunk) = text.content[0] else {
        panic!("a chunk")
    };
    lock.release().await.unwrap();
    // Flip a byte of the chunk where its pack stores it.
    let (pack, offset) = repo.blob_position(&chunk).unwrap();
    let pack_name = repo.pack_name(pack);
    let path = dir
        .path()
        .join("repo/data")
        .join(&pack_name[..2])
        .join(&pack_name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize + 40] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let lock = repo.lock_shared().await.unwrap();
    let target = dir.path().join("restored");
    let error = restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, VolumeError::Damaged { path, .. } if path == Path::new("/nested/deeper/text.log")),
        "{error}"
    );
    let report = repo.verify(true).await.unwrap();
    let damaged: HashSet<BlobId> = report
        .problems()
        .filter_map(|d| d.blob().copied())
        .collect();
    assert!(damaged.contains(&chunk));
    let named = locate(&repo, &done.root, &damaged).await;
    assert_eq!(
        named,
        vec![DamagedPath {
            path: "/nested/deeper/text.log".into(),
            blob: chunk
        }]
    );
    lock.release().await.unwrap();
}

#[tokio::test]
async fn verify_without_reading_data_finds_a_volume_snapshot_whose_blobs_lost_their_index() {
    let (dir, source, repo, lock, first) = fixture_backup().await;
    save_snapshot(&repo, "first", &first, BTreeMap::new())
        .await
        .unwrap();
    let indexes = |dir: &Path| -> HashSet<PathBuf> {
        std::fs::read_dir(dir.join("repo/index"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let before = indexes(dir.path());
    std::fs::write(source.join("small.txt"), b"a change for a second backup").unwrap();
    let second = backup(&repo, &lock, &source, Some(first.root.clone())).await;
    save_snapshot(&repo, "second", &second, BTreeMap::new())
        .await
        .unwrap();
    lock.release().await.unwrap();
    let outcome = crate::backup::verify(&repo, None, false).await.unwrap();
    assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);

    // The second backup's index file is lost: its new chunk and trees are
    // in no index any more, though their pack is still there.
    for lost in indexes(dir.path()).difference(&before) {
        std::fs::remove_file(lost).unwrap();
    }
    let reopened = open_as_format(dir.path(), 2).await;
    let outcome = crate::backup::verify(&reopened, None, false).await.unwrap();
    assert_eq!(outcome.problems.len(), 1, "{:?}", outcome.problems);
    assert!(
        outcome.problems[0].starts_with("snapshot second: "),
        "{:?}",
        outcome.problems
    );
}

/// A disk image: random data, a zeroed stretch, text, zeros at the end.
fn disk_image(path: &Path) -> Vec<u8> {
    let mut image = pseudo_random(3 << 20, 7);
    image.extend(std::iter::repeat_n(0u8, 9 << 20));
    image.extend(b"a block of a file system inode table\n".repeat(50_000));
    // More than twice the largest chunk: whatever the repository's chunker
    // seed, the chunk holding the text's end is cut within MAX_CHUNK of
    // it, and a read of the allocated ranges only gets back in step with
    // at least MAX_CHUNK zeros after that cut.
    image.extend(std::iter::repeat_n(0u8, 9 << 20));
    std::fs::write(path, &image).unwrap();
    image
}

#[tokio::test]
async fn a_disk_image_is_backed_up_whole_and_restored_into_an_image_or_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("disk.img");
    let image = disk_image(&source);
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let options = || VolumeBackupOptions {
        source: "vm/disk".into(),
        ..Default::default()
    };
    let done = backup_device(&repo, &lock, &source, options())
        .await
        .unwrap();
    assert!(done.root.block);
    assert_eq!(done.root.stats.files, 1);
    assert_eq!(done.root.stats.bytes, image.len() as u64);
    let trees = read_trees(&repo, done.root.tree).await.unwrap();
    let entry = &trees[Path::new("")].entries[0];
    assert_eq!(entry.name.0, DEVICE_ENTRY);
    assert!(
        entry
            .content
            .iter()
            .any(|p| matches!(p, Piece::Zeros(n) if *n >= 4 << 20)),
        "the zeroed stretch is a hole: {:?}",
        entry.content
    );

    // Into an image file: the same bytes, the zeros left as holes.
    let restored = dir.path().join("restored.img");
    std::fs::write(&restored, b"an older, shorter file").unwrap();
    let stats = restore_image(&repo, &done.root, &restored, Default::default())
        .await
        .unwrap();
    assert_eq!(stats.bytes, image.len() as u64);
    assert!(
        std::fs::read(&restored).unwrap() == image,
        "the image differs"
    );
    let on_disk = std::fs::metadata(&restored).unwrap().blocks() * 512;
    assert!(
        on_disk < image.len() as u64 - (8 << 20),
        "sparse: {on_disk}"
    );
    // Into a directory: the file `device`.
    let into_dir = dir.path().join("as-dir");
    restore_dir(&repo, &done.root, &into_dir, Default::default())
        .await
        .unwrap();
    assert!(std::fs::read(into_dir.join(DEVICE_ENTRY)).unwrap() == image);
    let refused = restore_image(&repo, &done.root, &into_dir, Default::default())
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("block device or an image file"),
        "{refused}"
    );

    // Unchanged: read again, nothing new stored.
    let again = backup_device(&repo, &lock, &source, options())
        .await
        .unwrap();
    assert_eq!(again.root.stats.chunks_new, 0, "{:?}", again.root.stats);

    // The restored image is sparse: read only where it holds data, it
    // gives the pieces of the full read.
    let sparse = backup_device(&repo, &lock, &restored, options())
        .await
        .unwrap();
    let pieces = |root: &VolumeRoot| {
        let repo = repo.clone();
        let tree = root.tree;
        async move {
            let tree = Tree::decode(&repo.read_blob(&tree).await.unwrap()).unwrap();
            tree.entries[0].content.clone()
        }
    };
    assert_eq!(pieces(&sparse.root).await, pieces(&done.root).await);
    assert!(
        sparse.root.stats.bytes_read < image.len() as u64,
        "read {} of {}",
        sparse.root.stats.bytes_read,
        image.len()
    );
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_device_read_only_where_it_changed_is_stored_as_a_full_read_would_store_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("disk.img");
    let mut image = disk_image(&source);
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let options =
        |parent: Option<VolumeRoot>, changed: Option<Vec<(u64, u64)>>| VolumeBackupOptions {
            source: "vm/disk".into(),
            parent,
            changed_blocks: changed,
            ..Default::default()
        };
    let first = backup_device(&repo, &lock, &source, options(None, None))
        .await
        .unwrap();
    assert_eq!(first.root.stats.bytes_changed, None);

    // 8 KiB rewritten in the random part, one byte in the zeroed stretch.
    image[1_000_000..1_008_192].fill(0x5a);
    image[(5 << 20) + 17] = 1;
    std::fs::write(&source, &image).unwrap();
    let changed = vec![(1_000_000, 8192), ((5 << 20) + 16, 4)];
    let delta = backup_device(
        &repo,
        &lock,
        &source,
        options(Some(first.root.clone()), Some(changed)),
    )
    .await
    .unwrap();
    assert!(delta.warnings.is_empty(), "{:?}", delta.warnings);
    let stats = &delta.root.stats;
    assert_eq!(stats.bytes_changed, Some(8196));
    assert!(
        stats.bytes_read < image.len() as u64 / 2,
        "read {} of {} bytes",
        stats.bytes_read,
        image.len()
    );
    assert!(stats.chunks_deduplicated > 0, "{stats:?}");
    // The same tree as reading every byte.
    let full = backup_device(&repo, &lock, &source, options(None, None))
        .await
        .unwrap();
    assert_eq!(delta.root.tree, full.root.tree);
    let restored = dir.path().join("restored.img");
    restore_image(&repo, &delta.root, &restored, Default::default())
        .await
        .unwrap();
    assert!(
        std::fs::read(&restored).unwrap() == image,
        "the image differs"
    );

    // Without a parent the ranges are where the device holds data (the
    // rest reads as zeros): only they are read, and the tree is the same.
    let text = b"a block of a file system inode table\n".len() as u64 * 50_000;
    let allocated = vec![(0, 3 << 20), (5 << 20, 4096), (12 << 20, text)];
    let first_only = backup_device(&repo, &lock, &source, options(None, Some(allocated)))
        .await
        .unwrap();
    assert!(first_only.warnings.is_empty(), "{:?}", first_only.warnings);
    assert_eq!(first_only.root.tree, full.root.tree);
    assert!(
        first_only.root.stats.bytes_read < image.len() as u64,
        "read {} of {} bytes",
        first_only.root.stats.bytes_read,
        image.len()
    );

    // A parent of another size is not a base: read whole, and said so.
    let mut grown = image.clone();
    grown.extend(std::iter::repeat_n(7u8, 1 << 20));
    std::fs::write(&source, &grown).unwrap();
    let whole = backup_device(
        &repo,
        &lock,
        &source,
        options(Some(delta.root.clone()), Some(vec![(0, 1)])),
    )
    .await
    .unwrap();
    assert_eq!(whole.root.stats.bytes_read, grown.len() as u64);
    assert_eq!(whole.root.stats.bytes_changed, None);
    assert!(
        whole
            .warnings
            .iter()
            .any(|w| w.contains("whole device was read")),
        "{:?}",
        whole.warnings
    );
    lock.release().await.unwrap();
}

#[test]
fn zeroing_a_range_clears_exactly_that_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device");
    std::fs::write(&path, vec![0xffu8; 64 * 1024]).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Unaligned at both ends, with aligned blocks between.
    super::restore::zero_range(&file, 1000, 20_000).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 64 * 1024, "the length is kept");
    assert!(bytes[..1000].iter().all(|b| *b == 0xff));
    assert!(bytes[1000..21_000].iter().all(|b| *b == 0));
    assert!(bytes[21_000..].iter().all(|b| *b == 0xff));
}

#[test]
fn raw_zstd_frames_decode_with_any_zstd_decoder() {
    for len in [0, 1, 128 * 1024, 128 * 1024 + 1, 1_000_000] {
        let data = pseudo_random(len, len as u64 + 1);
        let frame = crate::repo::zstd_raw_frame(&data);
        assert_eq!(zstd::decode_all(&frame[..]).unwrap(), data, "{len} bytes");
        assert_eq!(zstd::bulk::decompress(&frame, len).unwrap(), data);
    }
    let text = b"compressible ".repeat(50_000);
    assert!(crate::repo::compress_chunk(&text).len() < text.len() / 10);
    let random = pseudo_random(1 << 20, 9);
    assert!(crate::repo::compress_chunk(&random).len() <= random.len() + 64);
}

#[tokio::test]
async fn files_ending_in_zeros_come_back_at_their_length_with_their_zeros_as_holes() {
    let (dir, source) = empty_source();
    // One chunk each: data then zero blocks; zero blocks between data; only
    // zeros; data ending in a partial block.
    let mut tail = pseudo_random(5000, 3);
    tail.resize(5000 + 3 * 4096, 0);
    std::fs::write(source.join("tail-zeros"), &tail).unwrap();
    let mut middle = pseudo_random(3 * 4096 + 100, 4);
    middle[4096..8192].fill(0);
    std::fs::write(source.join("middle-zeros"), &middle).unwrap();
    std::fs::write(source.join("all-zeros"), vec![0u8; 20_000]).unwrap();
    std::fs::write(source.join("data"), pseudo_random(4096 + 7, 5)).unwrap();
    let target = backed_up_and_restored(dir.path(), &source).await;
    for name in ["tail-zeros", "middle-zeros", "all-zeros", "data"] {
        assert_eq!(
            std::fs::read(target.join(name)).unwrap(),
            std::fs::read(source.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(listing(&target), listing(&source));
    let blocks = |name: &str| std::fs::metadata(target.join(name)).unwrap().blocks() * 512;
    assert!(blocks("tail-zeros") <= 8192, "{}", blocks("tail-zeros"));
    assert_eq!(blocks("all-zeros"), 0);
}

#[tokio::test]
async fn a_sparse_file_is_read_only_where_it_holds_data_and_stored_as_a_full_read_stores_it() {
    let (dir, source) = empty_source();
    // Data at the start, in the middle at an odd offset, and a hole up to
    // the end; the same bytes written out in full, zeros included.
    let size: u64 = 128 << 20;
    let parts: [(u64, Vec<u8>); 3] = [
        (0, pseudo_random(3_000_000, 21)),
        ((20 << 20) + 12_345, pseudo_random(100_000, 22)),
        (120 << 20, b"a compressible line\n".repeat(100_000)),
    ];
    let sparse = std::fs::File::create(source.join("holes.img")).unwrap();
    sparse.set_len(size).unwrap();
    let mut dense = vec![0u8; size as usize];
    for (offset, bytes) in &parts {
        std::os::unix::fs::FileExt::write_all_at(&sparse, bytes, *offset).unwrap();
        dense[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
    }
    sparse.sync_all().unwrap();
    std::fs::write(source.join("dense.img"), &dense).unwrap();
    let allocated = |name: &str| std::fs::metadata(source.join(name)).unwrap().blocks() * 512;
    assert!(
        allocated("holes.img") < 16 << 20,
        "the file system made no holes"
    );
    assert!(allocated("dense.img") >= size);

    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, &source, None).await;
    let stats = &done.root.stats;
    assert_eq!(stats.files_read, 2);
    // The dense copy is read whole; of the sparse one, its 5 MB of data
    // and what the chunker looks at around each range: from the largest
    // chunk (4 MiB) before it to two after it, and to the end for the last.
    assert!(
        stats.bytes_read < size + (48 << 20),
        "read {} bytes of two {size}-byte files",
        stats.bytes_read
    );
    let trees = read_trees(&repo, done.root.tree).await.unwrap();
    let content = |name: &str| {
        trees[Path::new("")]
            .entries
            .iter()
            .find(|n| n.name.as_os_str() == name)
            .unwrap()
            .content
            .clone()
    };
    assert_eq!(content("holes.img"), content("dense.img"));
    assert!(
        content("holes.img")
            .iter()
            .any(|p| matches!(p, Piece::Zeros(_)))
    );

    let target = dir.path().join("restored");
    restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(target.join("holes.img")).unwrap(), dense);
    let restored = std::fs::metadata(target.join("holes.img"))
        .unwrap()
        .blocks()
        * 512;
    assert!(restored < 16 << 20, "{restored} bytes allocated");
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_sparse_file_cut_shorter_after_its_holes_were_found_is_read_whole_as_it_is_then() {
    let (dir, source) = empty_source();
    let path = source.join("shrinking.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &pseudo_random(3_000_000, 31), 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"far", 40 << 20).unwrap();
    drop(file);
    // A live volume: the file is truncated between finding its holes and
    // reading its data.
    backup::tests_hooks::on_holes_found(&path, |path| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(1_000_000)
            .unwrap();
    });
    let target = backed_up_and_restored(dir.path(), &source).await;
    assert_eq!(
        std::fs::read(target.join("shrinking.img")).unwrap(),
        std::fs::read(&path).unwrap()
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), 1_000_000);
}

#[tokio::test]
async fn owners_and_modes_come_back_whether_or_not_they_differ_from_a_new_files() {
    let (dir, source) = empty_source();
    let root = unsafe { libc::geteuid() } == 0;
    for (name, mode, owner) in [
        ("plain", 0o644, None),
        ("private", 0o600, None),
        ("setuid", 0o4755, None),
        ("owned", 0o644, Some(1234)),
        ("owned-setgid", 0o2750, Some(1234)),
    ] {
        let path = source.join(name);
        std::fs::write(&path, name).unwrap();
        if let Some(id) = owner.filter(|_| root) {
            std::os::unix::fs::lchown(&path, Some(id), Some(id)).unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, &source, None).await;
    let target = dir.path().join("restored");
    // Into an empty directory, then over files whose owners and modes all
    // differ from the backup's.
    for _ in 0..2 {
        let options = VolumeRestoreOptions {
            owners: root,
            ..Default::default()
        };
        restore_dir(&repo, &done.root, &target, options)
            .await
            .unwrap();
        assert_eq!(listing(&target), listing(&source));
        for name in ["plain", "private", "setuid", "owned", "owned-setgid"] {
            let path = target.join(name);
            if root {
                std::os::unix::fs::lchown(&path, Some(4321), Some(4321)).unwrap();
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o6777)).unwrap();
        }
    }
}

/// How many of the file's pages are in the page cache.
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a read-only shared mapping of an open file, unmapped below;
    // mincore writes one byte per page into a vector of that many.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut pages = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, pages.as_mut_ptr()), 0);
        libc::munmap(map, len);
        pages.iter().filter(|p| *p & 1 == 1).count()
    }
}

#[tokio::test]
async fn large_files_come_back_exactly_when_written_past_the_page_cache() {
    let (dir, source) = empty_source();
    // Several batches long, an unaligned length, with zero blocks and text.
    let mut big = pseudo_random(21 * 1024 * 1024 + 123, 7);
    big[5_000_000..5_300_000].fill(0);
    big[9_000_001..12_000_000].copy_from_slice(&b"a line of text\n".repeat(200_000)[..2_999_999]);
    std::fs::write(source.join("big.bin"), &big).unwrap();
    // Data at an unaligned offset, a long hole, data, and a hole at the end.
    let sparse = std::fs::File::create(source.join("sparse.img")).unwrap();
    sparse.set_len(40 * 1024 * 1024 + 5).unwrap();
    let head = pseudo_random(3 * 1024 * 1024 + 17, 8);
    std::os::unix::fs::FileExt::write_all_at(&sparse, &head, 1000).unwrap();
    let tail = pseudo_random(2 * 1024 * 1024 + 3, 9);
    std::os::unix::fs::FileExt::write_all_at(&sparse, &tail, 30 * 1024 * 1024 + 77).unwrap();
    drop(sparse);
    // Hard links: the first is created before the contents are written.
    std::fs::write(
        source.join("linked.bin"),
        pseudo_random(5 * 1024 * 1024 + 1, 10),
    )
    .unwrap();
    std::fs::hard_link(source.join("linked.bin"), source.join("linked-too.bin")).unwrap();
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, &source, None).await;
    // Into a new directory, and over files of the same names holding more.
    let fresh = dir.path().join("fresh");
    let over = dir.path().join("over");
    std::fs::create_dir_all(&over).unwrap();
    for name in ["big.bin", "sparse.img", "linked.bin"] {
        std::fs::write(over.join(name), vec![0xffu8; 42 * 1024 * 1024]).unwrap();
    }
    for target in [&fresh, &over] {
        restore_dir(&repo, &done.root, target, VolumeRestoreOptions::default())
            .await
            .unwrap();
        for name in ["big.bin", "sparse.img", "linked.bin", "linked-too.bin"] {
            assert!(
                std::fs::read(target.join(name)).unwrap()
                    == std::fs::read(source.join(name)).unwrap(),
                "{}: {name} differs",
                target.display()
            );
        }
        assert_eq!(listing(target), listing(&source));
        let stored = std::fs::metadata(target.join("sparse.img"))
            .unwrap()
            .blocks()
            * 512;
        assert!(
            stored <= (head.len() + tail.len()) as u64 + 4 * 4096,
            "the hole stays a hole: {stored} bytes stored"
        );
    }
    // Written past the cache where the file system takes direct writes
    // (reading the files above cached them: a new restore is checked).
    let probe = dir.path().join("probe");
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok()
    };
    let again = dir.path().join("again");
    restore_dir(&repo, &done.root, &again, VolumeRestoreOptions::default())
        .await
        .unwrap();
    let mut statfs: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(again.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path and a statfs to fill.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut statfs) }, 0);
    // tmpfs keeps every file in the cache, however it is written.
    if direct && statfs.f_type != libc::TMPFS_MAGIC {
        let pages = resident_pages(&again.join("big.bin"));
        assert!(pages <= 2, "{pages} pages of big.bin are cached");
    }
}

#[tokio::test]
async fn links_and_fifos_in_the_way_are_replaced_never_written_through() {
    let (dir, source, repo, _lock, done) = fixture_backup().await;
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, b"keep").unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("nested/deeper")).unwrap();
    // A small file (written through the cache) and a large one (written
    // directly), each where a link to a file outside the target is.
    let small = target.join(OsString::from_vec(b"caf\xe9".to_vec()));
    std::os::unix::fs::symlink(&outside, &small).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("nested/random.bin")).unwrap();
    let fifo = std::ffi::CString::new(
        target
            .join("nested/deeper/text.log")
            .as_os_str()
            .as_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    assert_eq!(listing(&target), listing(&source));
}

#[tokio::test]
async fn a_fifo_comes_back_and_a_socket_is_counted_as_skipped_without_warnings() {
    let (dir, source) = empty_source();
    std::fs::write(source.join("data"), b"kept").unwrap();
    let fifo = std::ffi::CString::new(source.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let _listener = std::os::unix::net::UnixListener::bind(source.join("app.sock")).unwrap();
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    let done = backup(&repo, &lock, &source, None).await;
    assert!(done.warnings.is_empty(), "{:?}", done.warnings);

    let target = dir.path().join("target");
    let stats = restore_dir(&repo, &done.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    assert_eq!(
        (stats.files, stats.others, stats.sockets_skipped),
        (1, 1, 1)
    );
    let pipe = std::fs::symlink_metadata(target.join("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&pipe.file_type()));
    assert_eq!(pipe.mode() & 0o7777, 0o640);
    assert!(!target.join("app.sock").exists());
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"kept");
}

/// Opens the repository in `dir` as format `version`, as a ferry of that
/// format would have created it.
async fn open_as_format(dir: &Path, version: u32) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.join("repo")));
    let mut config: serde_json::Value =
        serde_json::from_slice(&backend.get("config").await.unwrap()).unwrap();
    config["version"] = version.into();
    backend
        .put(
            "config",
            bytes::Bytes::from(serde_json::to_vec(&config).unwrap()),
        )
        .await
        .unwrap();
    Repository::open(backend, &KeySource::Password("pw".to_string().into()))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_format_1_repository_gets_json_trees_and_its_backups_are_parents_in_format_2() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fixture(&source);
    new_repo(dir.path()).await;
    let old = open_as_format(dir.path(), 1).await;
    let lock = old.lock_shared().await.unwrap();
    let first = backup(&old, &lock, &source, None).await;
    let top = old.read_blob(&first.root.tree).await.unwrap();
    assert!(top.starts_with(b"{"), "a format-1 ferry reads this tree");
    lock.release().await.unwrap();

    // The same repository upgraded: the JSON trees are parents, unchanged
    // directories keep them, changed ones are written in binary.
    let new = open_as_format(dir.path(), 2).await;
    let lock = new.lock_shared().await.unwrap();
    std::fs::write(source.join("empty"), b"now with content").unwrap();
    let second = backup(&new, &lock, &source, Some(first.root.clone())).await;
    assert_eq!(second.root.stats.files_read, 1, "{:?}", second.root.stats);
    let top = new.read_blob(&second.root.tree).await.unwrap();
    assert!(
        !top.starts_with(b"{"),
        "the changed top directory is binary"
    );
    let nested = |root: &VolumeRoot| {
        let repo = new.clone();
        let tree = root.tree;
        async move {
            let top = Tree::decode(&repo.read_blob(&tree).await.unwrap()).unwrap();
            top.entries
                .iter()
                .find(|n| n.name.as_os_str() == "nested")
                .and_then(|n| n.subtree)
                .unwrap()
        }
    };
    assert_eq!(
        nested(&first.root).await,
        nested(&second.root).await,
        "an unchanged directory keeps its JSON tree"
    );
    for (root, name) in [(&first.root, "first"), (&second.root, "second")] {
        let target = dir.path().join(name);
        restore_dir(&new, root, &target, VolumeRestoreOptions::default())
            .await
            .unwrap();
        if name == "second" {
            assert_eq!(listing(&target), listing(&source));
        }
    }
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_volume_snapshot_keeps_no_csi_snapshot_and_its_deletion_reads_no_report() {
    // `ferry backup delete` of a volume snapshot asks what CSI snapshots it
    // kept: its content is a volume root, not an application report, and
    // must not be taken for a damaged one.
    let (_dir, _source, repo, lock, done) = fixture_backup().await;
    let id = save_snapshot(&repo, "vol", &done, BTreeMap::new())
        .await
        .unwrap();
    lock.release().await.unwrap();
    let (_, snapshot) = repo
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .find(|(listed, _)| *listed == id)
        .unwrap();
    assert!(is_volume_snapshot(&snapshot));
    let kept = crate::snapshot::kept_volume_snapshots(&repo, &snapshot)
        .await
        .unwrap();
    assert!(kept.is_empty());
}

#[tokio::test]
async fn latest_is_the_newest_volume_snapshot_unless_a_snapshot_has_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    fixture(&source);
    let repo = new_repo(dir.path()).await;
    let lock = repo.lock_shared().await.unwrap();
    assert!(matches!(
        open_snapshot(&repo, LATEST).await,
        Err(VolumeError::NoVolumeSnapshot)
    ));
    let first = backup(&repo, &lock, &source, None).await;
    save_snapshot(&repo, "first", &first, BTreeMap::new())
        .await
        .unwrap();
    std::fs::write(source.join("small.txt"), b"changed").unwrap();
    let second = backup(&repo, &lock, &source, Some(first.root.clone())).await;
    let newest = save_snapshot(&repo, "second", &second, BTreeMap::new())
        .await
        .unwrap();
    // An application snapshot made after them is not a volume's.
    repo.save_snapshot(&crate::repo::Snapshot {
        name: "app".into(),
        created: "9999-01-01T00:00:00Z".into(),
        expires: None,
        labels: BTreeMap::new(),
        content: second.root_blob,
        refs: second.root.refs,
        summary: serde_json::Value::Null,
    })
    .await
    .unwrap();
    let (id, snapshot, root) = open_snapshot(&repo, LATEST).await.unwrap();
    assert_eq!((id, snapshot.name.as_str()), (newest, "second"));
    assert_eq!(root.tree, second.root.tree);

    let named = save_snapshot(&repo, LATEST, &first, BTreeMap::new())
        .await
        .unwrap();
    let (id, _, root) = open_snapshot(&repo, LATEST).await.unwrap();
    assert_eq!(id, named, "a snapshot named latest is found by its name");
    assert_eq!(root.tree, first.root.tree);
    lock.release().await.unwrap();
}

#[tokio::test]
async fn an_unchanged_backup_of_a_parent_marked_for_deletion_stores_its_trees_and_references_again()
{
    // The parent's data is unreferenced (no snapshot names it), and a
    // prune marked its packs. A backup that still has the parent's root
    // takes nothing from those packs, the reference list included, so the
    // prune that deletes them takes nothing it needs.
    let (dir, source, repo, lock, first) = fixture_backup().await;
    lock.release().await.unwrap();
    let marked = repo.prune(false).await.unwrap();
    assert!(marked.packs_marked >= 1, "{marked:?}");
    let lock = repo.lock_shared().await.unwrap();
    let again = backup(&repo, &lock, &source, Some(first.root.clone())).await;
    save_snapshot(&repo, "again", &again, BTreeMap::new())
        .await
        .unwrap();
    lock.release().await.unwrap();
    assert_eq!(again.root.tree, first.root.tree, "the same content");
    assert!(again.root.stats.files_read > 0, "{:?}", again.root.stats);
    // Stored anew, outside the marked packs.
    assert!(repo.has_blob(&again.root.tree));
    assert!(repo.has_blob(&again.root.refs));
    let freed = repo.prune(false).await.unwrap();
    assert!(freed.packs_removed >= 1, "{freed:?}");
    assert!(repo.verify(true).await.unwrap().is_ok());
    let target = dir.path().join("restored");
    restore_dir(&repo, &again.root, &target, VolumeRestoreOptions::default())
        .await
        .unwrap();
    assert_eq!(listing(&target), listing(&source));
    let refs = crate::repo::decode_refs(&repo.read_blob(&again.root.refs).await.unwrap()).unwrap();
    assert!(refs.contains(&again.root.tree));
}
