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
    let mut w = repo.writer();
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
    (repo.save_snapshot(&snap).await.unwrap(), ids, stats)
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
    let mut w = repo.writer().with_pack_target(64);
    for i in 0..20 {
        w.add(format!("object {i} {}", "y".repeat(100)).as_bytes())
            .await
            .unwrap();
    }
    drop(w); // killed: packs may exist, no index names them
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let repo = Repository::open(backend.clone(), &password("pw"))
        .await
        .unwrap();
    assert!(repo.list_snapshots().await.unwrap().is_empty());
    assert!(repo.verify(true).await.unwrap().is_ok());
    let (_, ids, stats) = snapshot(&repo, "after", &[b"object 0 again"]).await;
    assert_eq!(stats.blobs_added, 3, "object, root and reference list");
    assert_eq!(repo.read_blob(&ids[0]).await.unwrap(), b"object 0 again");
    let report = repo.prune(false).await.unwrap();
    assert!(
        report.packs_removed >= 1,
        "orphan packs are reclaimed: {report:?}"
    );
    assert!(repo.verify(true).await.unwrap().is_ok());
    assert_eq!(repo.read_blob(&ids[0]).await.unwrap(), b"object 0 again");
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
    let report = repo.prune(false).await.unwrap();
    assert_eq!(report.bytes_removed, dry.bytes_removed);
    assert!(report.bytes_removed > 0);
    assert!(repo.stats().await.unwrap().bytes < before.bytes);
    assert_eq!(repo.read_blob(&kept[0]).await.unwrap(), b"keep me");
    let fresh = Repository::open(backend, &password("pw")).await.unwrap();
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
