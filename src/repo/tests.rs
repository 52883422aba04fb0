use std::sync::Arc;

use super::*;

async fn new_repo() -> (tempfile::TempDir, Repository, Arc<dyn Backend>) {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let repo = Repository::init(backend.clone(), &password("pw"))
        .await
        .unwrap();
    (dir, repo, backend)
}

fn password(p: &str) -> KeySource {
    KeySource::Password(Zeroizing::new(p.to_string()))
}

async fn files(backend: &Arc<dyn Backend>, prefix: &str) -> Vec<String> {
    backend
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect()
}

async fn snapshot(
    repo: &Repository,
    name: &str,
    blobs: &[&[u8]],
) -> (SnapshotId, Vec<BlobId>, WriteStats) {
    let lock = repo.lock_shared().await.unwrap();
    let mut w = repo.writer(&lock);
    let mut ids = Vec::new();
    for b in blobs {
        ids.push(w.add(b).await.unwrap());
    }
    let content = w.add(format!("root of {name}").as_bytes()).await.unwrap();
    // The root is named by the manifest itself; leaving it out of the list
    // lets an unchanged snapshot reuse the previous list.
    let refs = w.add(&encode_refs(&ids)).await.unwrap();
    let stats = w.finish().await.unwrap();
    let snap = Snapshot {
        name: name.into(),
        created: format!("2026-11-25T00:00:{:02}Z", ids.len() % 60),
        expires: None,
        labels: Default::default(),
        content,
        refs,
        summary: serde_json::json!({}),
    };
    let id = repo.save_snapshot(&snap).await.unwrap();
    lock.release().await.unwrap();
    (id, ids, stats)
}

#[tokio::test]
async fn init_open_and_wrong_password() {
    let (_dir, repo, backend) = new_repo().await;
    assert!(matches!(
        Repository::init(backend.clone(), &password("pw")).await,
        Err(RepoError::AlreadyInitialized { .. })
    ));
    let before = files(&backend, "").await;
    let reopened = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    assert_eq!(reopened.id(), repo.id());
    let err = Repository::open(backend.clone(), &password("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("wrong password"));
    assert_eq!(
        files(&backend, "").await,
        before,
        "a failed open writes nothing"
    );
    let empty: Arc<dyn Backend> = Arc::new(LocalBackend::new(_dir.path().join("nothing")));
    assert!(matches!(
        Repository::open(empty, &password("pw")).await,
        Err(RepoError::NotInitialized { .. })
    ));
}

#[tokio::test]
async fn a_repository_keeps_its_cipher_and_reads_back_what_it_sealed() {
    let (_dir, default, _) = new_repo().await;
    assert_eq!(default.cipher(), Cipher::preferred());
    for cipher in Cipher::ALL {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
        let repo = Repository::init_with(backend.clone(), &password("pw"), cipher)
            .await
            .unwrap();
        assert_eq!(repo.cipher(), cipher);
        let chunk = crate::test_data::pseudo_random(300_000, 5);
        let (id, ids, _) = snapshot(&repo, "s", &[b"manifest", &chunk]).await;
        let reopened = Repository::open(backend.clone(), &password("pw"))
            .await
            .unwrap();
        assert_eq!(reopened.cipher(), cipher);
        let _lock = reopened.lock_shared().await.unwrap();
        assert_eq!(reopened.read_blob(&ids[1]).await.unwrap(), chunk);
        let snapshots = reopened.list_snapshots().await.unwrap();
        assert_eq!(snapshots.len(), 1);
        assert_eq!(snapshots[0].0, id, "{cipher}");
    }
}

#[tokio::test]
async fn key_files_unlock_repositories() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [7u8; 64]).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    Repository::init(backend.clone(), &KeySource::KeyFile(key.clone()))
        .await
        .unwrap();
    Repository::open(backend.clone(), &KeySource::KeyFile(key))
        .await
        .unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, b"too short").unwrap();
    assert!(matches!(
        Repository::open(backend, &KeySource::KeyFile(short)).await,
        Err(RepoError::KeySource { .. })
    ));
}

#[tokio::test]
async fn blobs_round_trip_and_deduplicate_across_sessions() {
    let (_dir, repo, backend) = new_repo().await;
    let objects: Vec<Vec<u8>> = (0..500)
        .map(|i| {
            format!(
                "{{\"kind\":\"ConfigMap\",\"name\":\"c{i}\",\"data\":\"{}\"}}",
                "x".repeat(i)
            )
            .into_bytes()
        })
        .collect();
    let refs: Vec<&[u8]> = objects.iter().map(Vec::as_slice).collect();
    let (_, ids, first) = snapshot(&repo, "one", &refs).await;
    assert_eq!(first.blobs_added, 502);
    assert_eq!(
        files(&backend, "data/").await.len(),
        1,
        "500 objects fit one pack"
    );
    for (id, plain) in ids.iter().zip(&objects) {
        assert_eq!(&repo.read_blob(id).await.unwrap(), plain);
    }
    let reopened = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let (_, _, second) = snapshot(&reopened, "two", &refs).await;
    assert_eq!(
        second.blobs_deduplicated, 501,
        "the objects and the unchanged reference list"
    );
    assert_eq!(second.blobs_added, 1, "only the new root");
    assert!(
        second.bytes_stored * 20 < first.bytes_stored,
        "{second:?} vs {first:?}"
    );
    assert_eq!(reopened.list_snapshots().await.unwrap().len(), 2);
    assert_eq!(reopened.find_snapshot("two").await.unwrap().1.name, "two");
}

#[tokio::test]
async fn damage_is_detected_and_named() {
    let (_dir, repo, backend) = new_repo().await;
    let (_, ids, _) = snapshot(&repo, "s", &[b"first object", b"second object"]).await;
    assert!(repo.verify(true).await.unwrap().is_ok());
    let pack = files(&backend, "data/").await.remove(0);
    let mut bytes = backend.get(&pack).await.unwrap().to_vec();
    bytes[30] ^= 0x01;
    backend
        .put(&pack, Bytes::from(bytes.clone()))
        .await
        .unwrap();
    let err = repo.read_blob(&ids[0]).await.unwrap_err();
    assert!(
        matches!(&err, RepoError::Damaged { blob, .. } if *blob == ids[0]),
        "{err}"
    );
    let report = repo.verify(true).await.unwrap();
    assert!(
        report.problems().any(|d| d.blob() == Some(&ids[0])),
        "{report:?}"
    );
    assert!(
        report
            .problems()
            .any(|d| d.message.contains("does not match its name"))
    );
    // Truncated pack.
    backend
        .put(&pack, Bytes::from(bytes[..20].to_vec()))
        .await
        .unwrap();
    let report = repo.verify(false).await.unwrap();
    assert!(
        report
            .problems()
            .any(|d| d.blob() == Some(&ids[1]) && d.message.contains("truncated")),
        "{report:?}"
    );
    // Missing pack.
    backend.delete(&pack).await.unwrap();
    let report = repo.verify(false).await.unwrap();
    assert!(
        report
            .problems()
            .filter(|d| d.message.contains("missing"))
            .count()
            >= 2,
        "{report:?}"
    );
}

#[tokio::test]
async fn an_interrupted_session_leaves_a_valid_repository() {
    let (_dir, repo, backend) = new_repo().await;
    let lock = repo.lock_shared().await.unwrap();
    let mut w = repo.writer(&lock).with_pack_target(64);
    for i in 0..20 {
        w.add(format!("object {i} {}", "y".repeat(100)).as_bytes())
            .await
            .unwrap();
    }
    drop(w); // killed: packs may exist, no index names them
    lock.release().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let repo = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    assert!(repo.list_snapshots().await.unwrap().is_empty());
    assert!(repo.verify(true).await.unwrap().is_ok());
    let (_, ids, stats) = snapshot(&repo, "after", &[b"object 0 again"]).await;
    assert_eq!(stats.blobs_added, 3, "object, root and reference list");
    assert_eq!(repo.read_blob(&ids[0]).await.unwrap(), b"object 0 again");
    let marked = repo.prune(false).await.unwrap();
    assert!(
        marked.packs_marked >= 1,
        "orphan packs are marked: {marked:?}"
    );
    let report = repo.prune(false).await.unwrap();
    assert_eq!(
        report.packs_removed, marked.packs_marked,
        "and reclaimed by the next prune: {report:?}"
    );
    assert!(repo.verify(true).await.unwrap().is_ok());
    assert_eq!(repo.read_blob(&ids[0]).await.unwrap(), b"object 0 again");
}

#[tokio::test]
async fn packs_built_in_reused_buffers_keep_every_blob() {
    // Packs above the direct-write size, of odd lengths: written from
    // their aligned buffers in place plus a copied tail, in buffers the
    // writer takes back from finished uploads.
    let (_dir, repo, _backend) = new_repo().await;
    let lock = repo.lock_shared().await.unwrap();
    let mut w = repo.writer(&lock).with_pack_target(2 << 20);
    let blobs: Vec<Vec<u8>> = (0..14u32)
        .map(|i| {
            let len = (1 << 20) + 1000 * i as usize + 7;
            let mut blob: Vec<u8> = (0..len.div_ceil(32) as u32)
                .flat_map(|block| {
                    *blake3::hash(&[block.to_le_bytes(), i.to_le_bytes()].concat()).as_bytes()
                })
                .collect();
            blob.truncate(len);
            blob
        })
        .collect();
    let mut ids = Vec::new();
    for blob in &blobs {
        ids.push(w.add(blob).await.unwrap());
    }
    let stats = w.finish().await.unwrap();
    assert!(stats.packs_written >= 6, "{stats:?}");
    lock.release().await.unwrap();
    for (id, blob) in ids.iter().zip(&blobs) {
        assert_eq!(&repo.read_blob(id).await.unwrap()[..], &blob[..]);
    }
    assert!(repo.verify(true).await.unwrap().is_ok());
}

#[tokio::test]
async fn concurrent_writers_both_succeed() {
    let (_dir, repo, backend) = new_repo().await;
    let a = repo.clone();
    let b = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(
        async { snapshot(&a, "a", &[b"shared", b"only a"]).await },
        async { snapshot(&b, "b", &[b"shared", b"only b"]).await }
    );
    let fresh = Repository::open(backend, &password("pw")).await.unwrap();
    assert_eq!(fresh.list_snapshots().await.unwrap().len(), 2);
    let _lock = fresh.lock_shared().await.unwrap();
    for id in ra.1.iter().chain(&rb.1) {
        fresh.read_blob(id).await.unwrap();
    }
    assert!(fresh.verify(true).await.unwrap().is_ok());
}

#[tokio::test]
async fn prune_frees_unreferenced_data_and_keeps_the_rest() {
    let (_dir, repo, backend) = new_repo().await;
    let big: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("old {i} {}", "z".repeat(2000)).into_bytes())
        .collect();
    let refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
    let (old, _, _) = snapshot(&repo, "old", &refs).await;
    let (_, kept, _) = snapshot(&repo, "new", &[b"keep me"]).await;
    let before = repo.stats().await.unwrap();
    repo.delete_snapshot(&old).await.unwrap();
    let dry = repo.prune(true).await.unwrap();
    assert_eq!(
        repo.stats().await.unwrap().bytes,
        before.bytes,
        "a dry run deletes nothing"
    );
    let marked = repo.prune(false).await.unwrap();
    assert_eq!(marked.bytes_marked, dry.bytes_marked);
    assert!(marked.bytes_marked > 0);
    assert_eq!(
        repo.stats().await.unwrap().bytes,
        before.bytes,
        "the first prune only marks"
    );
    let report = repo.prune(false).await.unwrap();
    assert_eq!(report.bytes_removed, marked.bytes_marked);
    assert!(repo.stats().await.unwrap().bytes < before.bytes);
    assert_eq!(repo.read_blob(&kept[0]).await.unwrap(), b"keep me");
    let fresh = Repository::open(backend, &password("pw")).await.unwrap();
    let _lock = fresh.lock_shared().await.unwrap();
    assert!(fresh.verify(true).await.unwrap().is_ok());
    assert_eq!(fresh.read_blob(&kept[0]).await.unwrap(), b"keep me");
}

#[tokio::test]
async fn exclusive_lock_is_refused_while_a_shared_lock_is_held() {
    let (_dir, repo, _) = new_repo().await;
    let shared = repo.lock_shared().await.unwrap();
    let second = repo.lock_shared().await.unwrap();
    assert!(matches!(
        repo.lock_exclusive().await,
        Err(RepoError::Locked { .. })
    ));
    assert!(matches!(
        repo.prune(false).await,
        Err(RepoError::Locked { .. })
    ));
    shared.release().await.unwrap();
    second.release().await.unwrap();
    let exclusive = repo.lock_exclusive().await.unwrap();
    assert!(matches!(
        repo.lock_shared().await,
        Err(RepoError::Locked { .. })
    ));
    exclusive.release().await.unwrap();
}

#[test]
fn reference_lists_round_trip() {
    let ids = vec![BlobId([2; 32]), BlobId([1; 32]), BlobId([2; 32])];
    assert_eq!(
        decode_refs(&encode_refs(&ids)).unwrap(),
        vec![BlobId([1; 32]), BlobId([2; 32])]
    );
    assert!(decode_refs(&[0; 33]).is_err());
    let id: BlobId = BlobId([0xab; 32]).to_string().parse().unwrap();
    assert_eq!(id, BlobId([0xab; 32]));
}

/// Stores `blobs` as snapshot `name` the way a backup does: lock first,
/// then write, then the manifest.
async fn locked_snapshot(repo: &Repository, name: &str, blobs: &[&[u8]]) -> Vec<BlobId> {
    snapshot(repo, name, blobs).await.1
}

fn objects(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix} {i} {}", "q".repeat(300)).into_bytes())
        .collect()
}

#[tokio::test]
async fn a_backup_opened_before_a_prune_stores_what_the_prune_deleted() {
    let (_dir, repo, backend) = new_repo().await;
    let data = objects("object", 50);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    locked_snapshot(&repo, "old", &refs).await;
    let (old, _) = repo.find_snapshot("old").await.unwrap();
    repo.delete_snapshot(&old).await.unwrap();
    // The backup opens the repository; prune runs to the end meanwhile.
    let backup = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    for _ in 0..3 {
        repo.prune(false).await.unwrap();
    }
    let ids = locked_snapshot(&backup, "new", &refs).await;
    let fresh = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let lock = fresh.lock_shared().await.unwrap();
    for (id, plain) in ids.iter().zip(&data) {
        assert_eq!(&fresh.read_blob(id).await.unwrap(), plain);
    }
    assert!(fresh.verify(true).await.unwrap().is_ok());
    lock.release().await.unwrap();
}

#[tokio::test]
async fn prune_deletes_nothing_while_an_index_file_is_unreadable() {
    let (_dir, repo, backend) = new_repo().await;
    let data = objects("kept", 20);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    locked_snapshot(&repo, "kept", &refs).await;
    locked_snapshot(&repo, "gone", &[b"garbage one", b"garbage two"]).await;
    let (gone, _) = repo.find_snapshot("gone").await.unwrap();
    repo.delete_snapshot(&gone).await.unwrap();
    let index_file = files(&backend, "index/").await.remove(0);
    let mut bytes = backend.get(&index_file).await.unwrap().to_vec();
    bytes[40] ^= 0x01;
    backend.put(&index_file, Bytes::from(bytes)).await.unwrap();
    let packs = files(&backend, "data/").await;
    let err = repo.prune(false).await.unwrap_err();
    assert!(err.to_string().contains(&index_file), "{err}");
    assert!(err.to_string().contains("repo repair"), "{err}");
    assert_eq!(files(&backend, "data/").await, packs, "nothing deleted");
}

#[tokio::test]
async fn a_stray_file_among_the_snapshots_breaks_nothing_else() {
    let (_dir, repo, backend) = new_repo().await;
    locked_snapshot(&repo, "good", &[b"good object"]).await;
    backend
        .put("snapshots/notes.txt", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let listed = repo.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.name, "good");
    assert_eq!(repo.find_snapshot("good").await.unwrap().1.name, "good");
    let (id, snapshot) = repo.resolve_snapshot("notes.txt").await.unwrap();
    assert!(snapshot.is_none(), "found as a damaged manifest");
    repo.delete_snapshot(&id).await.unwrap();
    assert!(files(&backend, "snapshots/notes.txt").await.is_empty());
}

#[tokio::test]
async fn a_damaged_snapshot_is_reported_and_skipped_and_can_be_removed() {
    let (_dir, repo, backend) = new_repo().await;
    locked_snapshot(&repo, "good", &[b"good object"]).await;
    let bad_ids = locked_snapshot(&repo, "bad", &[b"bad object"]).await;
    let (bad, _) = repo.find_snapshot("bad").await.unwrap();
    let path = format!("snapshots/{}", bad.0);
    let mut bytes = backend.get(&path).await.unwrap().to_vec();
    bytes[30] ^= 0x01;
    backend.put(&path, Bytes::from(bytes)).await.unwrap();

    let listing = repo.snapshot_listing().await.unwrap();
    assert_eq!(listing.snapshots.len(), 1);
    assert_eq!(listing.damaged.len(), 1);
    assert_eq!(listing.damaged[0].id, bad);
    assert!(!listing.damaged[0].read_error);
    let err = repo.find_snapshot(&bad.0[..12]).await.unwrap_err();
    assert!(
        matches!(err, RepoError::SnapshotDamaged { .. })
            && err.to_string().contains("backup delete"),
        "{err}"
    );
    // Other snapshots keep working, also for writing.
    locked_snapshot(&repo, "after", &[b"another object"]).await;
    assert_eq!(repo.find_snapshot("good").await.unwrap().1.name, "good");
    let lock = repo.lock_shared().await.unwrap();
    repo.read_blob(&bad_ids[0]).await.unwrap();
    lock.release().await.unwrap();
    // Prune refuses while it is there; repair removes it.
    let err = repo.prune(false).await.unwrap_err();
    assert!(err.to_string().contains(&path), "{err}");
    let report = repo.repair(false).await.unwrap();
    assert_eq!(report.damaged_snapshots_removed.len(), 1, "{report:?}");
    assert!(report.unrecoverable.is_empty(), "{report:?}");
    assert!(repo.snapshot_listing().await.unwrap().damaged.is_empty());
    repo.prune(false).await.unwrap();
}

#[tokio::test]
async fn an_empty_password_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let err = Repository::init(backend.clone(), &password(""))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    assert!(files(&backend, "").await.is_empty());
}

#[tokio::test]
async fn short_id_prefixes_do_not_identify_snapshots() {
    let (_dir, repo, _) = new_repo().await;
    locked_snapshot(&repo, "one", &[b"x"]).await;
    let (id, _) = repo.find_snapshot("one").await.unwrap();
    for short in [&id.0[..1], &id.0[..7]] {
        let err = repo.find_snapshot(short).await.unwrap_err();
        assert!(err.to_string().contains("at least 8"), "{err}");
    }
    let err = repo.resolve_snapshot(&id.0[..1]).await.unwrap_err();
    assert!(
        matches!(err, RepoError::IdPrefixTooShort(_)),
        "delete too: {err}"
    );
    assert_eq!(repo.resolve_snapshot(&id.0[..8]).await.unwrap().0, id);
    assert_eq!(repo.find_snapshot(&id.0[..8]).await.unwrap().0, id);
    assert_eq!(repo.find_snapshot(&id.0).await.unwrap().0, id);
}

#[tokio::test]
async fn a_damaged_key_file_is_named_as_damaged_not_as_a_wrong_password() {
    let (_dir, _repo, backend) = new_repo().await;
    let key = files(&backend, "keys/").await.remove(0);
    let mut file: serde_json::Value =
        serde_json::from_slice(&backend.get(&key).await.unwrap()).unwrap();
    let wrapped = file["wrapped"].as_str().unwrap().to_string();
    let flipped = if wrapped.ends_with('0') { "1" } else { "0" };
    file["wrapped"] =
        serde_json::Value::from(format!("{}{flipped}", &wrapped[..wrapped.len() - 1]));
    backend
        .put(&key, Bytes::from(serde_json::to_vec(&file).unwrap()))
        .await
        .unwrap();
    let err = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&key), "{text}");
    assert!(text.contains("failed authentication"), "{text}");
    assert!(!text.contains("wrong password"), "{text}");
}

#[tokio::test]
async fn retention_without_keep_last_frees_deleted_snapshots() {
    let (_dir, repo, backend) = new_repo().await;
    let data = objects("deleted later", 30);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    locked_snapshot(&repo, "old", &refs).await;
    let kept = locked_snapshot(&repo, "kept", &[b"kept object"]).await;
    let (old, _) = repo.find_snapshot("old").await.unwrap();
    repo.delete_snapshot(&old).await.unwrap();
    let before = repo.stats().await.unwrap().bytes;
    for _ in 0..2 {
        crate::backup::apply_retention(&repo, None, false)
            .await
            .unwrap();
    }
    assert!(repo.stats().await.unwrap().bytes < before);
    let fresh = Repository::open(backend, &password("pw")).await.unwrap();
    let lock = fresh.lock_shared().await.unwrap();
    assert_eq!(fresh.read_blob(&kept[0]).await.unwrap(), b"kept object");
    lock.release().await.unwrap();
}

/// A backend whose reads of chosen paths fail, as a store with a transient
/// error does.
#[derive(Debug)]
struct FlakyBackend {
    inner: Arc<dyn Backend>,
    failing: std::sync::Mutex<Vec<String>>,
}

impl FlakyBackend {
    fn check(&self, path: &str) -> Result<(), BackendError> {
        if self.failing.lock().unwrap().iter().any(|p| p == path) {
            return Err(BackendError::Io {
                location: self.inner.location(),
                op: "read",
                path: path.to_string(),
                message: "503 Slow Down".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for FlakyBackend {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), BackendError> {
        self.inner.put(path, data).await
    }
    async fn get(&self, path: &str) -> Result<Bytes, BackendError> {
        self.check(path)?;
        self.inner.get(path).await
    }
    async fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        self.check(path)?;
        self.inner.get_range(path, offset, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.inner.delete(path).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[tokio::test]
async fn repair_rebuilds_a_damaged_index_from_the_pack_headers_and_loses_nothing() {
    let (_dir, repo, backend) = new_repo().await;
    let data = objects("precious", 40);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let kept = locked_snapshot(&repo, "kept", &refs).await;
    locked_snapshot(&repo, "gone", &[b"garbage"]).await;
    let (gone, _) = repo.find_snapshot("gone").await.unwrap();
    repo.delete_snapshot(&gone).await.unwrap();
    for index_file in files(&backend, "index/").await {
        let mut bytes = backend.get(&index_file).await.unwrap().to_vec();
        bytes[40] ^= 0x01;
        backend.put(&index_file, Bytes::from(bytes)).await.unwrap();
    }
    let packs = files(&backend, "data/").await;
    for _ in 0..2 {
        assert!(matches!(
            repo.prune(false).await,
            Err(RepoError::Unreadable(_))
        ));
    }
    assert_eq!(files(&backend, "data/").await, packs);

    let report = repo.repair(false).await.unwrap();
    assert_eq!(report.damaged_index_files.len(), 2, "{report:?}");
    assert_eq!(report.packs_indexed, packs.len());
    assert!(report.unrecoverable.is_empty(), "{report:?}");
    for _ in 0..2 {
        repo.prune(false).await.unwrap();
    }
    let fresh = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let lock = fresh.lock_shared().await.unwrap();
    for (id, plain) in kept.iter().zip(&data) {
        assert_eq!(&fresh.read_blob(id).await.unwrap(), plain);
    }
    assert!(fresh.verify(true).await.unwrap().is_ok());
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_read_error_stops_prune_and_repair_before_they_change_anything() {
    let (dir, repo, _) = new_repo().await;
    let data = objects("precious", 10);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    locked_snapshot(&repo, "kept", &refs).await;
    locked_snapshot(&repo, "gone", &[b"garbage"]).await;
    let (gone, _) = repo.find_snapshot("gone").await.unwrap();
    repo.delete_snapshot(&gone).await.unwrap();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let index_file = files(&local, "index/").await.remove(0);
    let flaky: Arc<dyn Backend> = Arc::new(FlakyBackend {
        inner: local.clone(),
        failing: std::sync::Mutex::new(vec![index_file.clone()]),
    });
    let repo = Repository::open(flaky, &password("pw")).await.unwrap();
    let before: Vec<String> = files(&local, "").await;
    let err = repo.prune(false).await.unwrap_err();
    assert!(err.to_string().contains(&index_file), "{err}");
    let err = repo.repair(false).await.unwrap_err();
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    let after: Vec<String> = files(&local, "")
        .await
        .into_iter()
        .filter(|p| !p.starts_with("locks/"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|p| !p.starts_with("locks/"))
        .collect();
    assert_eq!(after, before);
}

#[tokio::test]
async fn repair_lists_what_cannot_be_recovered() {
    let (_dir, repo, backend) = new_repo().await;
    let lock = repo.lock_shared().await.unwrap();
    let mut w = repo.writer(&lock).with_pack_target(1);
    let lost = w.add(b"lost object").await.unwrap();
    let fine = w.add(b"fine object").await.unwrap();
    let content = w.add(b"root").await.unwrap();
    let refs = w.add(&encode_refs(&[lost, fine])).await.unwrap();
    w.finish().await.unwrap();
    let snap = Snapshot {
        name: "partly".into(),
        created: "2026-11-25T00:00:00Z".into(),
        expires: None,
        labels: Default::default(),
        content,
        refs,
        summary: serde_json::json!({}),
    };
    repo.save_snapshot(&snap).await.unwrap();
    lock.release().await.unwrap();
    // The pack of the lost object disappears; another pack's header and
    // every index file are damaged.
    let lost_pack = {
        let index = repo.inner.index.read().unwrap();
        index.packs[index.blobs[&lost].pack as usize].clone()
    };
    let fine_pack = {
        let index = repo.inner.index.read().unwrap();
        index.packs[index.blobs[&fine].pack as usize].clone()
    };
    backend.delete(&pack_path(&lost_pack)).await.unwrap();
    let mut bytes = backend.get(&pack_path(&fine_pack)).await.unwrap().to_vec();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    backend
        .put(&pack_path(&fine_pack), Bytes::from(bytes))
        .await
        .unwrap();
    for f in files(&backend, "index/").await {
        backend
            .put(&f, Bytes::from_static(b"garbage"))
            .await
            .unwrap();
    }
    let report = repo.repair(false).await.unwrap();
    let text = report.unrecoverable.join("\n");
    assert!(
        text.contains(&fine_pack) && text.contains("header"),
        "{text}"
    );
    assert!(text.contains("snapshot partly"), "{text}");
    assert_eq!(report.unrecoverable.len(), 2, "{text}");
}

/// One backup, step by step, with a pause point between its steps. With
/// `stale`, its lock looks abandoned once taken, as that of a process
/// stopped for hours does: prune then runs while the backup is not over.
async fn backup_steps(
    repo: Repository,
    blobs: Vec<Vec<u8>>,
    stale: bool,
) -> Result<Vec<BlobId>, RepoError> {
    repo.pauses().at("backup:opened").await;
    let mut lock = repo.lock_shared().await?;
    if stale {
        lock.make_stale().await;
    }
    let mut w = repo.writer(&lock);
    let mut ids = Vec::new();
    for b in &blobs {
        ids.push(w.add(b).await?);
    }
    repo.pauses().at("backup:added").await;
    let content = w.add(b"root of new").await?;
    let refs = w.add(&encode_refs(&ids)).await?;
    w.finish().await?;
    repo.pauses().at("backup:indexed").await;
    let snap = Snapshot {
        name: "new".into(),
        created: "2026-11-26T00:00:00Z".into(),
        expires: None,
        labels: Default::default(),
        content,
        refs,
        summary: serde_json::json!({}),
    };
    repo.save_snapshot(&snap).await?;
    repo.pauses().at("backup:saved").await;
    lock.release().await?;
    Ok(ids)
}

/// Waits until `task` stops at its armed pause point.
async fn until_paused<T: std::fmt::Debug>(
    reached: tokio::sync::oneshot::Receiver<()>,
    task: &mut tokio::task::JoinHandle<T>,
    point: &str,
) {
    tokio::select! {
        r = reached => r.unwrap(),
        done = task => panic!("finished without reaching {point}: {done:?}"),
    }
}

/// A prune that may find the repository locked: anything else is a failure.
async fn prune_allowing_locked(repo: &Repository) {
    match repo.prune(false).await {
        Ok(_) | Err(RepoError::Locked { .. }) => {}
        Err(e) => panic!("prune failed: {e}"),
    }
}

/// The repository after a scenario: every snapshot readable and intact.
/// A snapshot a scenario expects: its name, plaintexts and their ids.
type Expected<'a> = (&'a str, &'a [Vec<u8>], &'a [BlobId]);

async fn assert_intact(backend: &Arc<dyn Backend>, expect: &[Expected<'_>]) {
    let fresh = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let lock = fresh.lock_shared().await.unwrap();
    let names: Vec<String> = fresh
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, s)| s.name)
        .collect();
    for (name, data, ids) in expect {
        assert!(names.contains(&name.to_string()), "{name} in {names:?}");
        for (id, plain) in ids.iter().zip(data.iter()) {
            assert_eq!(
                &fresh
                    .read_blob(id)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
                plain
            );
        }
    }
    let report = fresh.verify(true).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    lock.release().await.unwrap();
}

/// A repository with a kept snapshot and the data of a deleted one, which
/// the backup stores again (`new`); with `premarked`, a prune already
/// marked that data.
struct Scenario {
    _dir: tempfile::TempDir,
    repo: Repository,
    backend: Arc<dyn Backend>,
    kept: Vec<Vec<u8>>,
    kept_ids: Vec<BlobId>,
    new: Vec<Vec<u8>>,
}

async fn scenario(premarked: bool) -> Scenario {
    let (dir, repo, backend) = new_repo().await;
    let kept = objects("kept", 5);
    let kept_refs: Vec<&[u8]> = kept.iter().map(Vec::as_slice).collect();
    let kept_ids = locked_snapshot(&repo, "kept", &kept_refs).await;
    let old = objects("shared", 20);
    let old_refs: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
    locked_snapshot(&repo, "old", &old_refs).await;
    let (id, _) = repo.find_snapshot("old").await.unwrap();
    repo.delete_snapshot(&id).await.unwrap();
    if premarked {
        let report = repo.prune(false).await.unwrap();
        assert!(report.packs_marked > 0);
    }
    let mut new = old.clone();
    new.extend(objects("new", 5));
    Scenario {
        _dir: dir,
        repo,
        backend,
        kept,
        kept_ids,
        new,
    }
}

#[tokio::test]
async fn prunes_at_every_step_of_a_backup_lose_nothing() {
    let points = [
        "backup:opened",
        "lock:checked",
        "lock:loaded",
        "backup:added",
        "writer:uploaded",
        "backup:indexed",
        "backup:saved",
    ];
    for point in points {
        for stale in [false, true] {
            for premarked in [false, true] {
                let case = format!("{point}, stale lock {stale}, premarked {premarked}");
                let Scenario {
                    _dir,
                    repo,
                    backend,
                    kept,
                    kept_ids,
                    new,
                } = scenario(premarked).await;
                let backup = Repository::open(backend.clone(), &password("pw"))
                    .await
                    .unwrap();
                let armed = backup.pauses().arm(point);
                let mut task = tokio::spawn(backup_steps(backup.clone(), new.clone(), stale));
                until_paused(armed.reached, &mut task, point).await;
                // Two prunes: one marks, the next may delete.
                prune_allowing_locked(&repo).await;
                prune_allowing_locked(&repo).await;
                armed.resume.send(()).unwrap();
                let ids = task
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{case}: the backup failed: {e}"));
                for _ in 0..3 {
                    repo.prune(false)
                        .await
                        .unwrap_or_else(|e| panic!("{case}: {e}"));
                }
                assert_intact(&backend, &[("kept", &kept, &kept_ids), ("new", &new, &ids)]).await;
                // Everything unreferenced is gone in the end.
                let report = repo.prune(true).await.unwrap();
                assert_eq!(report.packs_marked, 0, "{case}: {report:?}");
            }
        }
    }
}

#[tokio::test]
async fn backups_at_every_step_of_a_prune_lose_nothing() {
    let points = [
        "lock:checked",
        "lock:loaded",
        "prune:rewritten",
        "prune:swept",
        "prune:marked",
    ];
    for point in points {
        for premarked in [false, true] {
            let case = format!("{point}, premarked {premarked}");
            let Scenario {
                _dir,
                repo,
                backend,
                kept,
                kept_ids,
                new,
            } = scenario(premarked).await;
            let backup = Repository::open(backend.clone(), &password("pw"))
                .await
                .unwrap();
            let armed = repo.pauses().arm(point);
            let pruner = repo.clone();
            let mut task = tokio::spawn(async move { pruner.prune(false).await });
            until_paused(armed.reached, &mut task, point).await;
            // A whole backup meanwhile: refused while prune holds its lock.
            let stored = match backup_steps(backup, new.clone(), false).await {
                Ok(ids) => Some(ids),
                Err(RepoError::Locked { .. }) => None,
                Err(e) => panic!("{case}: {e}"),
            };
            armed.resume.send(()).unwrap();
            match task.await.unwrap() {
                Ok(_) | Err(RepoError::Locked { .. }) => {}
                Err(e) => panic!("{case}: prune failed: {e}"),
            }
            for _ in 0..3 {
                repo.prune(false)
                    .await
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
            }
            match &stored {
                Some(ids) => {
                    assert_intact(&backend, &[("kept", &kept, &kept_ids), ("new", &new, ids)]).await
                }
                None => assert_intact(&backend, &[("kept", &kept, &kept_ids)]).await,
            }
        }
    }
}

/// A prune killed at each of its steps (it never resumes; its lock file
/// stays until the lock is removed, as `repo unlock` does once the process
/// is gone): the repository stays valid, later prunes finish the job, and a
/// backup afterwards is stored whole.
#[tokio::test]
async fn a_prune_killed_at_every_step_loses_nothing() {
    for point in [
        "lock:loaded",
        "prune:rewritten",
        "prune:swept",
        "prune:marked",
    ] {
        for premarked in [false, true] {
            let case = format!("killed at {point}, premarked {premarked}");
            let Scenario {
                _dir,
                repo,
                backend,
                kept,
                kept_ids,
                new,
            } = scenario(premarked).await;
            let armed = repo.pauses().arm(point);
            let pruner = repo.clone();
            let mut task = tokio::spawn(async move { pruner.prune(false).await });
            until_paused(armed.reached, &mut task, point).await;
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled(), "{case}");
            for lock in backend.list("locks/").await.unwrap() {
                backend.delete(&lock.path).await.unwrap();
            }
            assert_intact(&backend, &[("kept", &kept, &kept_ids)]).await;
            for _ in 0..3 {
                repo.prune(false)
                    .await
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
            }
            let backup = Repository::open(backend.clone(), &password("pw"))
                .await
                .unwrap();
            let ids = backup_steps(backup, new.clone(), false)
                .await
                .unwrap_or_else(|e| panic!("{case}: backup: {e}"));
            repo.prune(false)
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_intact(&backend, &[("kept", &kept, &kept_ids), ("new", &new, &ids)]).await;
        }
    }
}

#[tokio::test]
async fn a_backup_does_not_reuse_blobs_marked_for_deletion() {
    let Scenario {
        _dir, repo, new, ..
    } = scenario(true).await;
    let lock = repo.lock_shared().await.unwrap();
    let mut w = repo.writer(&lock);
    w.add(&new[0]).await.unwrap();
    assert_eq!(w.stats().blobs_added, 1, "stored again, not deduplicated");
    drop(w);
    lock.release().await.unwrap();
    // Whereas an unmarked blob is reused.
    let Scenario {
        _dir: _dir2,
        repo: repo2,
        new: new2,
        ..
    } = scenario(false).await;
    let lock = repo2.lock_shared().await.unwrap();
    let mut w = repo2.writer(&lock);
    w.add(&new2[0]).await.unwrap();
    assert_eq!(w.stats().blobs_deduplicated, 1);
    drop(w);
    lock.release().await.unwrap();
}

#[tokio::test]
async fn restores_and_other_readers_keep_prune_away() {
    let (_dir, repo, backend) = new_repo().await;
    let reader = Repository::open(backend, &password("pw")).await.unwrap();
    let lock = reader.lock_shared().await.unwrap();
    assert!(matches!(
        repo.prune(false).await,
        Err(RepoError::Locked { .. })
    ));
    lock.release().await.unwrap();
    repo.prune(false).await.unwrap();
    let unlocked = Repository::open(repo.inner.backend.clone(), &password("pw"))
        .await
        .unwrap();
    assert!(matches!(
        unlocked.read_blob(&BlobId([1; 32])).await,
        Err(RepoError::NotLocked)
    ));
}

#[tokio::test]
async fn marked_packs_wait_for_a_stale_lock_until_it_is_removed() {
    let Scenario {
        _dir,
        repo,
        backend,
        ..
    } = scenario(false).await;
    let other = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let live = other.lock_shared().await.unwrap();
    let mut stale = other.lock_shared().await.unwrap();
    stale.make_stale().await;
    live.release().await.unwrap();
    let marked = repo.prune(false).await.unwrap();
    assert!(marked.packs_marked > 0);
    let waiting = repo.prune(false).await.unwrap();
    assert_eq!(waiting.packs_removed, 0);
    assert_eq!(waiting.packs_waiting, marked.packs_marked);
    assert!(
        waiting.waiting_for.iter().any(|w| w.contains(stale.path())),
        "{waiting:?}"
    );
    // Live locks stay; the stale one goes, and the packs with it.
    let held = other.lock_shared().await.unwrap();
    assert_eq!(
        repo.remove_stale_locks().await.unwrap(),
        vec![stale.path().to_string()]
    );
    held.release().await.unwrap();
    let swept = repo.prune(false).await.unwrap();
    assert_eq!(swept.packs_removed, marked.packs_marked, "{swept:?}");
    stale.release().await.unwrap();
}

#[tokio::test]
async fn many_blobs_are_read_with_one_request_per_region_and_damage_stays_local() {
    let (_dir, repo, backend) = new_repo().await;
    let bodies: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("object {i} {}", "x".repeat(i % 97)).into_bytes())
        .collect();
    let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let (_, ids, _) = snapshot(&repo, "s", &refs).await;
    let lock = repo.lock_shared().await.unwrap();
    // Asked in reverse: answered in the order asked, with one ranged read
    // of the pack (everything fits in one region).
    let wanted: Vec<BlobId> = ids.iter().rev().copied().collect();
    let before = repo.io_stats();
    let read = repo.read_blobs(&wanted).await;
    let requests = repo.io_stats().get_requests - before.get_requests;
    assert_eq!(requests, 1, "one request for 500 neighbouring blobs");
    for (got, expected) in read.iter().zip(bodies.iter().rev()) {
        assert_eq!(got.as_ref().unwrap(), expected);
    }
    // One damaged blob fails alone, named; an unknown id is not found.
    let pack = files(&backend, "data/").await.remove(0);
    let mut bytes = backend.get(&pack).await.unwrap().to_vec();
    bytes[30] ^= 0x01;
    backend.put(&pack, Bytes::from(bytes)).await.unwrap();
    let unknown = BlobId([7; 32]);
    let read = repo.read_blobs(&[ids[0], ids[1], unknown]).await;
    assert!(matches!(&read[0], Err(RepoError::Damaged { blob, .. }) if *blob == ids[0]));
    assert_eq!(read[1].as_ref().unwrap(), &bodies[1]);
    assert!(matches!(&read[2], Err(RepoError::BlobNotFound { blob }) if *blob == unknown));
    lock.release().await.unwrap();
}

/// The blobs and index files of a handle's index.
fn view(r: &Repository) -> (Vec<String>, Vec<String>) {
    let index = r.inner.index.read().unwrap();
    let mut blobs: Vec<String> = index.blobs.keys().map(|b| b.to_string()).collect();
    blobs.sort();
    (blobs, index.files.clone())
}

/// A long-lived handle (the controller's) adds only new index files on
/// reload, and ends with the index a fresh read gives, also after a prune
/// rewrote the index files under it.
#[tokio::test]
async fn a_remembering_handle_extends_its_index_and_matches_a_full_read() {
    let (_dir, repo, backend) = new_repo().await;
    repo.remember_written_files();
    let other = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    let (_, mine, _) = snapshot(&repo, "mine", &[b"a", b"b"]).await;
    let (gone, _, _) = snapshot(&other, "theirs", &[b"c", b"d"]).await;
    let (_, later, _) = snapshot(&other, "later", &[b"e"]).await;
    let full_view = |r: Repository| async move {
        let fresh = Repository::open(r.backend().clone(), &password("pw"))
            .await
            .unwrap();
        let lock = fresh.lock_shared().await.unwrap();
        let seen = view(&fresh);
        lock.release().await.unwrap();
        seen
    };
    // Extended: the other handle's two index files are added.
    let lock = repo.lock_shared().await.unwrap();
    assert!(repo.has_blob(&later[0]) && repo.has_blob(&mine[0]));
    assert_eq!(view(&repo), full_view(repo.clone()).await);
    lock.release().await.unwrap();
    // A prune rewrites index files: the next reload is a full one.
    other.delete_snapshot(&gone).await.unwrap();
    other.prune(false).await.unwrap();
    other.prune(false).await.unwrap();
    let lock = repo.lock_shared().await.unwrap();
    assert_eq!(view(&repo), full_view(repo.clone()).await);
    lock.release().await.unwrap();
}

#[test]
fn blob_ids_read_and_write_as_64_hex_digits() {
    let id = BlobId(std::array::from_fn(|i| (i * 37 + 5) as u8));
    let text = id.to_string();
    assert_eq!(text, hex::encode(id.0));
    assert_eq!(text.parse::<BlobId>().unwrap(), id);
    assert_eq!(text.to_uppercase().parse::<BlobId>().unwrap(), id);
    assert_eq!(format!("{id:?}"), format!("BlobId({})", &text[..12]));
    let json = serde_json::to_string(&vec![id, id]).unwrap();
    assert_eq!(json, format!("[\"{text}\",\"{text}\"]"));
    assert_eq!(
        serde_json::from_str::<Vec<BlobId>>(&json).unwrap(),
        [id, id]
    );
    // An escaped string is not borrowed from the input: still read.
    let escaped = format!("\"\\u0030{}\"", &text[1..]);
    let mut expected = text.clone();
    expected.replace_range(..1, "0");
    assert_eq!(
        serde_json::from_str::<BlobId>(&escaped).unwrap(),
        expected.parse::<BlobId>().unwrap()
    );
    for bad in [
        "",
        &text[..63],
        &format!("{text}0"),
        &format!("g{}", &text[1..]),
    ] {
        assert!(bad.parse::<BlobId>().is_err(), "{bad:?}");
        assert!(serde_json::from_str::<BlobId>(&format!("\"{bad}\"")).is_err());
    }
    assert!(serde_json::from_str::<BlobId>("7").is_err());
    // Every byte that is not a hex digit, first, in the middle and last.
    for c in 0..=255u8 {
        if c.is_ascii_hexdigit() || !c.is_ascii() {
            continue;
        }
        for at in [0, 31, 63] {
            let mut bad = text.clone().into_bytes();
            bad[at] = c;
            let bad = String::from_utf8(bad).unwrap();
            assert!(bad.parse::<BlobId>().is_err(), "{c:#x} at {at}");
        }
    }
}

#[test]
fn maps_of_ids_find_every_id_and_only_those() {
    let ids: Vec<BlobId> = (0..10_000u32)
        .map(|i| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    let mut map = IdMap::default();
    for (n, id) in ids.iter().enumerate() {
        map.insert(*id, n);
    }
    assert_eq!(map.len(), ids.len());
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(map.get(id), Some(&n));
    }
    // Ids that share their first 8 bytes are still told apart.
    let mut twin = ids[0];
    twin.0[31] ^= 1;
    assert_eq!(map.get(&twin), None);
    map.insert(twin, usize::MAX);
    assert_eq!(map.get(&ids[0]), Some(&0));
}

#[test]
fn chunks_are_sealed_compressed_or_as_raw_frames_and_open_to_their_bytes() {
    let key = MasterKey::random();
    let repo_key = key.clone();
    let random = crate::test_data::pseudo_random;
    let text = |len: usize| -> Vec<u8> {
        b"a line of a log that repeats, more or less; "
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect()
    };
    let mut half = text(20_000);
    half.extend(random(20_000, 3));
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (Vec::new(), false),
        (random(1_000, 1), true),
        (random(2 * SAMPLE, 2), true),
        (random(2 * SAMPLE + 1, 4), true),
        (random(100_000, 5), true),
        (random(300_000, 6), true),
        (text(2 * SAMPLE + 1), false),
        (text(300_000), false),
        (half, false),
    ];
    for (data, raw) in cases {
        let sealed = encode_chunk_with(&repo_key, &data);
        let frame = key.open(&sealed).expect("sealed with the key");
        assert_eq!(
            zstd::bulk::decompress(&frame, data.len()).unwrap(),
            data,
            "{} bytes",
            data.len()
        );
        if raw {
            assert_eq!(
                frame,
                zstd_raw_frame(&data),
                "{} bytes stored raw",
                data.len()
            );
        } else if !data.is_empty() {
            assert!(
                frame.len() < data.len() * 3 / 4,
                "{} bytes compress",
                data.len()
            );
        }
        assert_eq!(zstd_raw_frame(&data).len(), zstd_raw_frame_len(data.len()));
    }
}

fn sample_index() -> IndexFile {
    IndexFile {
        packs: (0..3u8)
            .map(|p| PackEntries {
                id: format!("{p:02x}{}", "ab".repeat(31)),
                blobs: (0..p as u32 * 2)
                    .map(|b| BlobEntry {
                        id: BlobId([p.wrapping_mul(31).wrapping_add(b as u8); 32]),
                        offset: b * 1000,
                        length: 900 + b,
                        raw_length: u32::MAX - b,
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[test]
fn binary_index_files_round_trip_and_json_ones_are_still_read() {
    let file = sample_index();
    assert_eq!(IndexFile::from_plain(&file.to_binary()).unwrap(), file);
    assert_eq!(
        IndexFile::from_plain(&serde_json::to_vec(&file).unwrap()).unwrap(),
        file
    );
    let empty = IndexFile::default();
    assert_eq!(IndexFile::from_plain(&empty.to_binary()).unwrap(), empty);
}

#[test]
fn a_damaged_binary_index_is_an_error_never_a_shorter_index() {
    let binary = sample_index().to_binary();
    for cut in [8, 11, 12, 13, 20, binary.len() - 1] {
        let err = IndexFile::from_plain(&binary[..cut]).unwrap_err();
        assert!(err.contains("ends early"), "cut at {cut}: {err}");
    }
    let mut longer = binary.clone();
    longer.push(0);
    assert!(
        IndexFile::from_plain(&longer)
            .unwrap_err()
            .contains("1 bytes after")
    );
    // A binary index of these parts; counts of 2^32-1 packs or blobs are
    // refused without allocating for them.
    let index_of = |parts: &[&[u8]]| {
        let mut all = INDEX_MAGIC.to_vec();
        all.extend(parts.iter().flat_map(|p| p.iter()));
        all
    };
    let error_of = |parts: &[&[u8]]| IndexFile::from_plain(&index_of(parts)).unwrap_err();
    let (one, huge) = (1u32.to_le_bytes(), u32::MAX.to_le_bytes());
    let one_char_id = [&1u16.to_le_bytes()[..], b"p"].concat();
    assert!(error_of(&[&huge]).contains("ends early"));
    assert!(error_of(&[&one, &one_char_id, &huge]).contains("ends early"));
    let non_utf8_id = [&1u16.to_le_bytes()[..], &[0xff]].concat();
    assert!(error_of(&[&one, &non_utf8_id, &0u32.to_le_bytes()]).contains("UTF-8"));
}

/// Rewrites the config's format version, as an older or newer ferry
/// would have written it.
async fn set_format(backend: &Arc<dyn Backend>, version: u32) {
    let mut config: serde_json::Value =
        serde_json::from_slice(&backend.get("config").await.unwrap()).unwrap();
    config["version"] = version.into();
    backend
        .put("config", Bytes::from(serde_json::to_vec(&config).unwrap()))
        .await
        .unwrap();
}

/// The plaintext of every index file, decrypted and decompressed.
async fn index_plaintexts(repo: &Repository, backend: &Arc<dyn Backend>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for path in files(backend, "index/").await {
        let sealed = backend.get(&path).await.unwrap();
        let compressed = repo.key().open(&sealed).unwrap();
        out.push(zstd::stream::decode_all(&compressed[..]).unwrap());
    }
    out
}

#[tokio::test]
async fn a_format_1_repository_keeps_json_index_files_and_a_new_one_writes_binary() {
    let (_dir, repo, backend) = new_repo().await;
    assert_eq!(repo.format_version(), FORMAT_VERSION);
    let (_, ids, _) = snapshot(&repo, "binary", &[b"one", b"two"]).await;
    let plain = index_plaintexts(&repo, &backend).await;
    assert!(plain.iter().all(|p| p.starts_with(INDEX_MAGIC)));

    // The same store as a format-1 repository: its existing (binary) index
    // is read, and what it writes is JSON, which a format-1 ferry reads.
    set_format(&backend, 1).await;
    let old = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    assert_eq!(old.format_version(), 1);
    let (_, more, _) = snapshot(&old, "json", &[b"three"]).await;
    let plain = index_plaintexts(&old, &backend).await;
    assert_eq!(plain.iter().filter(|p| p.starts_with(b"{")).count(), 1);
    let lock = old.lock_shared().await.unwrap();
    for id in ids.iter().chain(&more) {
        assert!(old.has_blob(id), "{id} is indexed");
    }
    assert_eq!(old.read_blob(&more[0]).await.unwrap(), b"three");
    lock.release().await.unwrap();
    // A prune of the format-1 repository rewrites its index as JSON.
    old.prune(false).await.unwrap();
    let plain = index_plaintexts(&old, &backend).await;
    assert!(
        plain.iter().all(|p| p.starts_with(b"{")),
        "format 1 stays JSON"
    );

    // A format this version does not know is refused, naming it.
    set_format(&backend, FORMAT_VERSION + 1).await;
    let err = Repository::open(backend.clone(), &password("pw"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, RepoError::UnsupportedFormat { found } if found == FORMAT_VERSION + 1));
    assert!(err.to_string().contains("upgrade ferry"), "{err}");
}
