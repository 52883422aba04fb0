//! The watch journal against the real API server: a backup made from the
//! journal and the capture cache equals a full backup made at the same
//! moment, object for object and edge for edge, after changes, deletions,
//! and a disconnection long enough that the WATCH expired (410 Gone).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplate, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use ferry::backup::{BackupOptions, Progress, collections_to_capture};
use ferry::cluster::discovery::{Discovery, ServedResource, discover};
use ferry::controller::journal::Journal;
use ferry::incremental::{CaptureCache, ObjectSource, SourceObject};
use ferry::model::select::Selection;
use ferry::repo::{KeySource, LocalBackend, Repository};

use crate::support::*;

struct Fixture {
    conn: ferry::cluster::Connection,
    repo: Repository,
    selection: Selection,
    discovered: Arc<(Discovery, ferry::profile::ClusterProfile)>,
    journal: Arc<Journal>,
    runs: usize,
}

impl Fixture {
    async fn backup(&mut self, journaled: bool) -> (String, ferry::backup::BackupOutcome) {
        self.runs += 1;
        let name = format!(
            "{}-{}",
            if journaled { "journal" } else { "full" },
            self.runs
        );
        let mut options = BackupOptions::new(&name, self.selection.clone());
        if journaled {
            self.journal.cache().begin_run();
            options.cache = Some(self.journal.cache().clone());
            options.source = Some(self.journal.clone());
            options.discovered = Some(self.discovered.clone());
        }
        let outcome = ferry::backup::run(
            &self.conn,
            &self.repo,
            &options,
            Arc::new(Progress::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("backup {name}: {e}"));
        if journaled {
            self.journal.cache().finish_run();
            self.journal.compact();
        }
        (name, outcome)
    }

    /// Waits until the controllers are done with the workloads (their
    /// ReplicaSets and Pods exist), then until the journal holds exactly
    /// the live version of every object of the namespace: both backups
    /// then see the same state.
    async fn settle(&self) {
        let ns = self.selection.namespaces[0].clone();
        let client = self.conn.client.clone();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        eventually(
            "the workloads to settle",
            Duration::from_secs(60),
            || async {
                let web = deployments.get("web").await.ok()?;
                let db = stateful_sets.get("db").await.ok()?;
                let settled = |generation: Option<i64>,
                               observed: Option<i64>,
                               want: Option<i32>,
                               have: Option<i32>| {
                    generation == observed && want.unwrap_or(1) == have.unwrap_or(0)
                };
                let web_status = web.status.clone()?;
                let db_status = db.status.clone()?;
                (settled(
                    web.metadata.generation,
                    web_status.observed_generation,
                    web.spec.replicas,
                    web_status.replicas,
                ) && settled(
                    db.metadata.generation,
                    db_status.observed_generation,
                    db.spec.replicas,
                    Some(db_status.replicas),
                ))
                .then_some(())
            },
        )
        .await;
        for resource in collections_to_capture(&self.discovered.0, &self.selection) {
            let ar = kube::api::ApiResource {
                group: resource.group.clone(),
                version: resource.version.clone(),
                api_version: resource.api_version(),
                kind: resource.kind.clone(),
                plural: resource.plural.clone(),
            };
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
            let journal = self.journal.clone();
            eventually(
                &format!("the journal to hold the live {}", resource.plural),
                Duration::from_secs(60),
                || async {
                    let mut live: Vec<(String, String)> = api
                        .list(&Default::default())
                        .await
                        .ok()?
                        .items
                        .iter()
                        .map(|o| version(&o.metadata))
                        .collect();
                    live.sort();
                    let mut mirrored: Vec<(String, String)> = journal
                        .objects(resource, Some(&ns))?
                        .iter()
                        .filter_map(|o| match o {
                            SourceObject::Raw(v) => ferry::incremental::version_of(v),
                            SourceObject::Known { version, .. } => Some(version.clone()),
                        })
                        .collect();
                    mirrored.sort();
                    (live == mirrored).then_some(())
                },
            )
            .await;
        }
    }

    /// A journaled and a full backup of the same state must agree on every
    /// object (and its blob, that is its normalized content) and edge.
    async fn assert_journal_equals_full(&mut self) -> ferry::backup::BackupOutcome {
        self.settle().await;
        let served = self
            .journal
            .counters
            .served
            .load(std::sync::atomic::Ordering::SeqCst);
        let (_, journaled) = self.backup(true).await;
        assert!(
            self.journal
                .counters
                .served
                .load(std::sync::atomic::Ordering::SeqCst)
                > served,
            "the journaled backup read its collections from the journal"
        );
        let (_, full) = self.backup(false).await;
        let catalog = |o: &ferry::backup::BackupOutcome| -> BTreeMap<String, String> {
            o.content
                .objects
                .iter()
                .map(|e| (e.object.to_string(), e.blob.to_string()))
                .collect()
        };
        let (j, f) = (catalog(&journaled), catalog(&full));
        let only_journal: Vec<&String> = j.keys().filter(|k| !f.contains_key(*k)).collect();
        let only_full: Vec<&String> = f.keys().filter(|k| !j.contains_key(*k)).collect();
        let differ: Vec<&String> = j
            .iter()
            .filter(|(k, v)| f.get(*k).is_some_and(|w| w != *v))
            .map(|(k, _)| k)
            .collect();
        for name in &differ {
            for (which, blob) in [("journal", &j[*name]), ("full", &f[*name])] {
                let id: ferry::repo::BlobId = blob.parse().unwrap();
                let bytes = self.repo.read_blob(&id).await.unwrap();
                eprintln!("{which} {name}: {}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(
            only_journal.is_empty() && only_full.is_empty() && differ.is_empty(),
            "journal vs full: only in journal {only_journal:?}, only in full {only_full:?}, different {differ:?}"
        );
        let graph = |o: &ferry::backup::BackupOutcome| {
            let (repo, id) = (self.repo.clone(), o.snapshot.to_string());
            async move {
                let (_, snapshot) = repo.find_snapshot(&id).await.unwrap();
                ferry::snapshot::load_content(&repo, &snapshot)
                    .await
                    .unwrap()
                    .graph
            }
        };
        let (journaled_graph, full_graph) = (graph(&journaled).await, graph(&full).await);
        assert!(
            journaled_graph["nodes"]
                .as_array()
                .is_some_and(|n| !n.is_empty())
        );
        assert_eq!(journaled_graph, full_graph, "the same graph");
        let skipped = |o: &ferry::backup::BackupOutcome| -> Vec<String> {
            let mut s: Vec<String> = o
                .content
                .report
                .skipped
                .iter()
                .map(|s| s.object.clone())
                .collect();
            s.sort();
            s
        };
        assert_eq!(skipped(&journaled), skipped(&full), "the same skips");
        journaled
    }

    fn resource(&self, group: &str, kind: &str) -> ServedResource {
        self.discovered
            .0
            .by_group_kind(group, kind)
            .unwrap_or_else(|| panic!("{group}/{kind} is served"))
            .clone()
    }

    /// Waits until the journal has exactly this version of an object
    /// (`None`: has no object of that uid).
    async fn caught_up(&self, resource: &ServedResource, ns: &str, uid: &str, rv: Option<&str>) {
        let journal = self.journal.clone();
        eventually(
            &format!("the journal to see {} {uid} at {rv:?}", resource.kind),
            Duration::from_secs(60),
            || {
                let found = journal.objects(resource, Some(ns)).and_then(|objects| {
                    let version = objects.iter().find_map(|o| {
                        let (u, v) = match o {
                            SourceObject::Raw(value) => ferry::incremental::version_of(value)?,
                            SourceObject::Known { version, .. } => version.clone(),
                        };
                        (u == uid).then_some(v)
                    });
                    (version.as_deref() == rv).then_some(())
                });
                async move { found }
            },
        )
        .await;
    }
}

fn version(meta: &kube::api::ObjectMeta) -> (String, String) {
    (
        meta.uid.clone().unwrap(),
        meta.resource_version.clone().unwrap(),
    )
}

#[tokio::test]
async fn a_journaled_backup_equals_a_full_one_after_changes_deletions_and_an_expired_watch() {
    let cluster = env().primary();
    let admin = cluster.client().await;
    let ns = TestNamespace::create(&admin, "t-journal").await;
    apply_manifests(&admin, &multitier_app(&ns.name)).await;

    let dir = tempfile::tempdir().unwrap();
    let key = KeySource::Password(zeroize::Zeroizing::new("journal test".to_string()));
    let repo = Repository::init(Arc::new(LocalBackend::new(dir.path().join("repo"))), &key)
        .await
        .unwrap();
    let conn = ferry::cluster::ConnectOptions {
        kubeconfig: Some(cluster.kubeconfig.clone()),
        ..Default::default()
    }
    .connect()
    .await
    .unwrap();
    let discovery = discover(&conn.client).await.unwrap();
    let profile = ferry::cluster::profile::read_profile(&conn, &discovery)
        .await
        .unwrap();
    let selection = Selection {
        namespaces: vec![ns.name.clone()],
        include_deps: true,
        ..Default::default()
    };
    let journal = Journal::new(conn.client.clone(), Arc::new(CaptureCache::new()));
    // As the controller does: the namespaced collections, and what a
    // backup reads cluster-wide (Namespaces, ClusterRoleBindings, CRDs...).
    let mut followed = collections_to_capture(&discovery, &selection);
    followed.extend(ferry::backup::cluster_collections_read(&discovery));
    journal.follow(&followed);
    assert!(
        journal.wait_synced(Duration::from_secs(60)).await,
        "journal synced"
    );
    let mut fixture = Fixture {
        conn,
        repo,
        selection,
        discovered: Arc::new((discovery, profile)),
        journal: journal.clone(),
        runs: 0,
    };

    // 1. Everything new: the first journaled backup normalizes it all.
    let first = fixture.assert_journal_equals_full().await;
    assert!(
        first.content.objects.len() > 20,
        "the shop app is backed up"
    );

    // 2. Unchanged: (almost) nothing to redo; controllers may still have
    // touched a status or two.
    let unchanged = fixture.assert_journal_equals_full().await;
    let (hits, misses) = fixture.journal.cache().hits_and_misses();
    assert!(
        misses <= 3 && hits as usize + 3 >= unchanged.content.objects.len() / 2,
        "an unchanged backup redoes nothing: {hits} hits, {misses} misses"
    );
    assert!(
        unchanged.write.blobs_added < 8,
        "only the snapshot's own parts are new: {:?}",
        unchanged.write
    );

    // 3. Changes: a modified ConfigMap, a new one, a deleted Secret, a
    // scaled Deployment.
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns.name);
    let changed = config_maps
        .patch(
            "web-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"added": "by the journal test"}})),
        )
        .await
        .unwrap();
    let created: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "journal-new"}, "data": {"k": "v"},
    }))
    .unwrap();
    let created = config_maps
        .create(&PostParams::default(), &created)
        .await
        .unwrap();
    let deleted = secrets.get("registry-pull").await.unwrap();
    secrets
        .delete("registry-pull", &DeleteParams::default())
        .await
        .unwrap();
    let scaled = deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let cm = fixture.resource("", "ConfigMap");
    let secret = fixture.resource("", "Secret");
    for (resource, meta) in [(&cm, &changed.metadata), (&cm, &created.metadata)] {
        let (uid, rv) = version(meta);
        fixture.caught_up(resource, &ns.name, &uid, Some(&rv)).await;
    }
    let (deleted_uid, _) = version(&deleted.metadata);
    fixture
        .caught_up(&secret, &ns.name, &deleted_uid, None)
        .await;
    // The Deployment's status keeps changing for a while: `settle` waits
    // for the journal to hold whatever version is live then.
    assert_eq!(scaled.spec.replicas, Some(3));
    let after_changes = fixture.assert_journal_equals_full().await;
    let names: Vec<String> = after_changes
        .content
        .objects
        .iter()
        .map(|e| e.object.to_string())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("/journal-new")));
    assert!(!names.iter().any(|n| n.ends_with("/registry-pull")));
    let (hits, misses) = fixture.journal.cache().hits_and_misses();
    assert!(
        hits > 2 * misses,
        "unchanged objects come from the cache: {hits} hits, {misses} misses"
    );

    // 4. A disconnection: the watches are dropped, changes happen that no
    // watch sees (a deletion among them) and etcd is compacted past them.
    // On reconnection the PodTemplate WATCH (served by etcd, not from a
    // watch cache: see scripts/testenv) resumes from a forgotten
    // resourceVersion, gets 410 Gone and LISTs again.
    let templates: Api<PodTemplate> = Api::namespaced(admin.clone(), &ns.name);
    let template = |name: &str| -> PodTemplate {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}},
        }))
        .unwrap()
    };
    let doomed = templates
        .create(&PostParams::default(), &template("doomed"))
        .await
        .unwrap();
    let kept = templates
        .create(&PostParams::default(), &template("kept"))
        .await
        .unwrap();
    let pod_template = fixture.resource("", "PodTemplate");
    for meta in [&doomed.metadata, &kept.metadata] {
        let (uid, rv) = version(meta);
        fixture
            .caught_up(&pod_template, &ns.name, &uid, Some(&rv))
            .await;
    }
    let expired_before = fixture
        .journal
        .counters
        .expired
        .load(std::sync::atomic::Ordering::SeqCst);
    fixture.journal.disconnect();
    let collections = fixture.journal.len() as u64;
    let counters = fixture.journal.counters.clone();
    eventually("every watch to be dropped", Duration::from_secs(60), || {
        let held = counters.held.load(std::sync::atomic::Ordering::SeqCst);
        async move { (held == collections).then_some(()) }
    })
    .await;
    templates
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let relabelled = templates
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"changed": "while-disconnected"}}})),
        )
        .await
        .unwrap();
    let gone = config_maps.get("journal-new").await.unwrap();
    config_maps
        .delete("journal-new", &DeleteParams::default())
        .await
        .unwrap();
    compact_etcd(
        cluster
            .etcd
            .as_deref()
            .expect("the test environment names etcd"),
    )
    .await;
    fixture.journal.reconnect();
    let counters = fixture.journal.counters.clone();
    eventually(
        "the PodTemplate watch to be answered with 410 Gone",
        Duration::from_secs(60),
        || {
            let expired = counters.expired.load(std::sync::atomic::Ordering::SeqCst);
            async move { (expired > expired_before).then_some(()) }
        },
    )
    .await;
    assert!(fixture.journal.wait_synced(Duration::from_secs(60)).await);
    let (doomed_uid, _) = version(&doomed.metadata);
    fixture
        .caught_up(&pod_template, &ns.name, &doomed_uid, None)
        .await;
    let (uid, rv) = version(&relabelled.metadata);
    fixture
        .caught_up(&pod_template, &ns.name, &uid, Some(&rv))
        .await;
    let (gone_uid, _) = version(&gone.metadata);
    fixture.caught_up(&cm, &ns.name, &gone_uid, None).await;
    let after_expiry = fixture.assert_journal_equals_full().await;
    let names: Vec<String> = after_expiry
        .content
        .objects
        .iter()
        .map(|e| e.object.to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with("/doomed")),
        "a deletion no watch saw is gone after the LIST: {names:?}"
    );
    assert!(names.iter().any(|n| n.ends_with("/kept")));
    assert!(!names.iter().any(|n| n.ends_with("/journal-new")));
    fixture.journal.stop();
}

/// Compacts etcd at its current revision (physically): every older
/// revision is gone, as after a long time.
async fn compact_etcd(endpoint: &str) {
    let revision =
        etcd_post(endpoint, "/v3/kv/range", r#"{"key": "AA=="}"#).await["header"]["revision"]
            .as_str()
            .expect("etcd revision")
            .to_string();
    let answer = etcd_post(
        endpoint,
        "/v3/kv/compaction",
        &format!(r#"{{"revision": "{revision}", "physical": true}}"#),
    )
    .await;
    assert!(answer.get("header").is_some(), "compaction: {answer}");
}

/// One call of etcd's JSON gateway, over plain HTTP/1.1.
async fn etcd_post(endpoint: &str, path: &str, body: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = endpoint.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (start, end) = (response.find('{'), response.rfind('}'));
    match (start, end) {
        (Some(s), Some(e)) => serde_json::from_str(&response[s..=e]).unwrap(),
        _ => panic!("etcd answered {response}"),
    }
}
