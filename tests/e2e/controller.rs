//! `ferry controller` on the real cluster: policies on a schedule with
//! retention, self-service Backups and Restores as the requesting user
//! (token users on real RBAC), and a controller killed mid-backup and
//! mid-restore. Each test runs its own controller, scoped with
//! `--instance` to the resources it labels, in its own namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use ferry::controller::crd::{Backup, BackupPolicy, Repository, Restore};
use ferry::controller::{LABEL_INSTANCE, LABEL_POLICY, manifests};

use crate::support::*;

const PASSWORD: &str = "correct horse battery staple";

/// A BackupPolicy's plan for restores at the DR site: labels ConfigMaps.
const DR_TRANSFORM: &str = "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {name: dr}\nspec:\n  steps:\n  - script: |\n      fn kinds() { [\"ConfigMap\"] }\n      fn transform(obj, params, target) { obj.metadata.labels = #{site: \"dr\"}; obj }\n";

/// CRDs, the requester admission policy and the user roles, applied once
/// per cluster (server-side apply: concurrent tests converge).
async fn install(client: &kube::Client) {
    let mut docs: Vec<Value> = ferry::controller::crd::crds()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    docs.extend(manifests::requester_policy());
    docs.extend(manifests::user_roles());
    let yaml: String = docs
        .iter()
        .map(|d| format!("---\n{}", ferry::yaml::to_string(d)))
        .collect();
    apply_manifests(client, &yaml).await;
}

/// A controller process of this test, killed when dropped.
struct Controller {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Controller {
    fn start(kubeconfig: &Path, namespace: &str, failpoints: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .args([
                "controller",
                "--namespace",
                namespace,
                "--instance",
                namespace,
                "--metrics-address",
                "127.0.0.1:0",
                "--check-interval",
                "1h",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("FERRY_LOG", "ferry=info")
            .env_remove("FERRY_FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(points) = failpoints {
            command.env("FERRY_FAILPOINTS", points);
        }
        let mut child = command.spawn().expect("start ferry controller");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[controller] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Controller { child, lines }
    }

    async fn wait_for_line(&self, needle: &str) {
        let lines = self.lines.clone();
        eventually(
            &format!("the controller to print '{needle}'"),
            Duration::from_secs(120),
            || {
                let found = lines.lock().unwrap().iter().any(|l| l.contains(needle));
                async move { found.then_some(()) }
            },
        )
        .await;
    }

    /// SIGKILL: no cleanup of any kind.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status once the work in progress finished.
    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's controller namespace, repository and Repository resource.
struct Setup {
    admin: kube::Client,
    namespace: TestNamespace,
    repository: String,
    repo_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(prefix: &str) -> Self {
        let cluster = env().primary();
        let admin = cluster.client().await;
        install(&admin).await;
        let namespace = TestNamespace::create(&admin, prefix).await;
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        ferry(&cluster.kubeconfig)
            .args(["repo", "init", "--repo", repo_dir.to_str().unwrap()])
            .assert()
            .success();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "repo-key"},
            "stringData": {"password": PASSWORD},
        }))
        .unwrap();
        Api::<Secret>::namespaced(admin.clone(), &namespace.name)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let repository: Repository = serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Repository",
            "metadata": {"name": namespace.name, "labels": {LABEL_INSTANCE: namespace.name}},
            "spec": {"location": repo_dir, "keySecret": {"name": "repo-key", "namespace": namespace.name}},
        }))
        .unwrap();
        Api::<Repository>::all(admin.clone())
            .create(&PostParams::default(), &repository)
            .await
            .unwrap();
        Setup {
            admin,
            repository: namespace.name.clone(),
            namespace,
            repo_dir,
            _dir: dir,
        }
    }

    fn controller(&self, failpoints: Option<&str>) -> Controller {
        Controller::start(
            &env().primary().kubeconfig,
            &self.namespace.name,
            failpoints,
        )
    }

    fn labels(&self) -> Value {
        json!({LABEL_INSTANCE: self.namespace.name})
    }

    /// The repository's snapshots, as `ferry backup list -o json` has them.
    fn snapshots(&self) -> Vec<Value> {
        let (ok, list, stderr) = run_json(
            &env().primary().kubeconfig,
            &["backup", "list", "--repo", self.repo_dir.to_str().unwrap()],
        );
        assert!(ok, "{stderr}");
        list.as_array().cloned().unwrap_or_default()
    }

    fn verify(&self) {
        ferry(&env().primary().kubeconfig)
            .args([
                "backup",
                "verify",
                "--read-data",
                "--repo",
                self.repo_dir.to_str().unwrap(),
            ])
            .assert()
            .success();
    }

    async fn cleanup(&self) {
        let _ = Api::<Repository>::all(self.admin.clone())
            .delete(&self.repository, &Default::default())
            .await;
    }
}

async fn namespace_with(admin: &kube::Client, prefix: &str, labels: Value) -> TestNamespace {
    let ns = TestNamespace::create(admin, prefix).await;
    Api::<Namespace>::all(admin.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap();
    ns
}

async fn config_map(client: &kube::Client, ns: &str, name: &str) {
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name}, "data": {"key": "value"},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
}

fn condition_reason(status: &Value) -> String {
    status["conditions"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn finished<K>(api: &Api<K>, name: &str) -> Value
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    eventually(
        &format!("{name} to finish"),
        Duration::from_secs(120),
        || async {
            let object = api.get(name).await.ok()?;
            let status = serde_json::to_value(&object).ok()?["status"].clone();
            matches!(status["phase"].as_str(), Some("Completed" | "Failed")).then_some(status)
        },
    )
    .await
}

#[tokio::test]
async fn a_policy_backs_up_labelled_namespaces_on_schedule_and_retention_keeps_exactly_the_newest()
{
    let setup = Setup::new("t-ctl-pol").await;
    let admin = setup.admin.clone();
    let protect = unique_name("daily");
    let first = namespace_with(&admin, "t-pol-1", json!({"protect": protect})).await;
    let second = namespace_with(&admin, "t-pol-2", json!({"protect": protect})).await;
    let later = namespace_with(&admin, "t-pol-3", json!({})).await;
    config_map(&admin, &first.name, "settings").await;
    // A snapshot the policy did not make: retention must leave it alone.
    ferry(&env().primary().kubeconfig)
        .args(["backup", "create", "by-hand", "-n", &first.name, "--repo"])
        .arg(&setup.repo_dir)
        .assert()
        .success();

    let policy_name = setup.namespace.name.clone();
    let policy: BackupPolicy = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "BackupPolicy",
        "metadata": {"name": policy_name, "labels": setup.labels()},
        "spec": {
            "repository": setup.repository,
            "schedule": "*/4 * * * * *",
            "namespaceSelector": {"matchLabels": {"protect": protect}},
            "retention": {"keepLast": 2},
            // For restores at the DR site: recorded in every snapshot.
            "transform": DR_TRANSFORM,
        },
    }))
    .unwrap();
    let policies: Api<BackupPolicy> = Api::all(admin.clone());
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let mut controller = setup.controller(None);

    // Every snapshot each namespace's entry has named, in order seen, and
    // whether a run read the watch journal instead of LISTing.
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
    let journaled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observe = |needed: Vec<(String, usize)>| {
        let policies = policies.clone();
        let policy_name = policy_name.clone();
        let seen = seen.clone();
        let journaled = journaled.clone();
        async move {
            eventually(
                &format!("policy runs covering {needed:?}"),
                Duration::from_secs(120),
                || async {
                    let policy = policies.get(&policy_name).await.ok()?;
                    let status = policy.status?;
                    if status.last_run_kind.as_deref() == Some("Journaled") {
                        journaled.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    let mut seen = seen.lock().unwrap();
                    for run in status.namespaces {
                        if let Some(snapshot) = run.last_snapshot {
                            seen.entry(run.namespace).or_default().insert(snapshot);
                        }
                    }
                    needed
                        .iter()
                        .all(|(ns, n)| seen.get(ns).is_some_and(|s| s.len() >= *n))
                        .then_some(())
                },
            )
            .await
        }
    };
    observe(vec![(first.name.clone(), 1), (second.name.clone(), 1)]).await;
    assert!(
        !seen.lock().unwrap().contains_key(&later.name),
        "an unlabelled namespace is not protected"
    );
    // Labelled later: protected from the next run, the policy untouched.
    Api::<Namespace>::all(admin.clone())
        .patch(
            &later.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"protect": protect}}})),
        )
        .await
        .unwrap();
    observe(vec![
        (first.name.clone(), 4),
        (second.name.clone(), 4),
        (later.name.clone(), 3),
    ])
    .await;
    assert!(
        journaled.load(std::sync::atomic::Ordering::SeqCst),
        "runs after the first read the watch journal"
    );
    // A graceful stop lets a run in progress finish: afterwards nothing
    // changes the repository.
    assert!(
        controller.terminate().success(),
        "graceful shutdown exits 0"
    );

    let snapshots = setup.snapshots();
    let names: Vec<&str> = snapshots
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"by-hand"),
        "retention kept others' snapshots: {names:?}"
    );
    for ns in [&first.name, &second.name, &later.name] {
        let mine: Vec<&Value> = snapshots
            .iter()
            .filter(|s| s["labels"][LABEL_POLICY] == json!(policy_name))
            .filter(|s| s["labels"]["ferry.dev/namespace"] == json!(ns))
            .collect();
        // Run names sort by time: the two newest of all that were made.
        let mut all_made: Vec<String> = seen.lock().unwrap()[ns].iter().cloned().collect();
        all_made.sort();
        let mut kept: Vec<String> = mine
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        kept.sort();
        assert_eq!(kept.len(), 2, "keepLast 2 in {ns}: {kept:?}");
        let newest_seen = all_made.last().unwrap();
        assert!(
            kept[0] >= all_made[all_made.len() - 2],
            "the older kept snapshot is among the two newest in {ns}: kept {kept:?}, seen {all_made:?}"
        );
        assert!(
            kept.last().unwrap() >= newest_seen,
            "the newest snapshot is kept in {ns}: kept {kept:?}, seen {all_made:?}"
        );
        // The records in the namespace list exactly the kept snapshots.
        let records = Api::<Backup>::namespaced(admin.clone(), ns)
            .list(&ListParams::default().labels(&format!("{LABEL_POLICY}={policy_name}")))
            .await
            .unwrap();
        let mut recorded: Vec<String> = records
            .items
            .iter()
            .filter_map(|b| b.status.as_ref()?.snapshot_name.clone())
            .collect();
        recorded.sort();
        assert_eq!(recorded, kept, "records of {ns}");
    }
    setup.verify();
    let status = policies.get(&policy_name).await.unwrap().status.unwrap();
    assert!(status.last_success_time.is_some());
    assert_eq!(status.protected_namespaces, Some(3));

    // At the DR site (here: another namespace), a snapshot's recorded
    // transform applies; a snapshot made by hand recorded none.
    let kept = status
        .namespaces
        .iter()
        .find(|r| r.namespace == first.name)
        .and_then(|r| r.last_snapshot.clone())
        .unwrap();
    let dr = TestNamespace::adopt(&admin, &format!("{}-dr", first.name));
    let repo = setup.repo_dir.to_str().unwrap();
    let mapping = format!("{}={}", first.name, dr.name);
    let (ok, _, stderr) = run_json(
        &env().primary().kubeconfig,
        &[
            "restore",
            &kept,
            "--repo",
            repo,
            "--recorded-transform",
            "--namespace-mapping",
            &mapping,
        ],
    );
    assert!(ok, "{stderr}");
    let restored = Api::<ConfigMap>::namespaced(admin.clone(), &dr.name)
        .get("settings")
        .await
        .unwrap();
    assert_eq!(
        restored
            .metadata
            .labels
            .unwrap_or_default()
            .get("site")
            .map(String::as_str),
        Some("dr"),
        "the recorded transform labelled the restored ConfigMap"
    );
    let (ok, _, stderr) = run_json(
        &env().primary().kubeconfig,
        &[
            "restore",
            "by-hand",
            "--repo",
            repo,
            "--recorded-transform",
            "--dry-run",
        ],
    );
    assert!(
        !ok && stderr.contains("recorded no transform plan"),
        "{stderr}"
    );
    let _ = policies.delete(&policy_name, &Default::default()).await;
    setup.cleanup().await;
}

#[tokio::test]
async fn namespace_users_back_up_and_restore_their_namespace_and_cannot_reach_beyond_it() {
    let setup = Setup::new("t-ctl-self").await;
    let admin = setup.admin.clone();
    let cluster = env().primary();
    let team_a = TestNamespace::create(&admin, "t-team-a").await;
    let team_b = TestNamespace::create(&admin, "t-team-b").await;
    // user-5 may edit team-a and nothing else.
    grant_edit(&admin, &team_a.name, "user-5").await;
    config_map(&admin, &team_a.name, "settings").await;
    config_map(&admin, &team_b.name, "theirs").await;
    let _controller = setup.controller(None);

    // team-b's own backup, made by the admin.
    let backups_b: Api<Backup> = Api::namespaced(admin.clone(), &team_b.name);
    let backup_b: Backup = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Backup",
        "metadata": {"name": "nightly", "labels": setup.labels()},
        "spec": {"repository": setup.repository},
    }))
    .unwrap();
    backups_b
        .create(&PostParams::default(), &backup_b)
        .await
        .unwrap();
    let status_b = finished(&backups_b, "nightly").await;
    assert_eq!(status_b["phase"], "Completed", "{status_b}");
    let snapshot_b = status_b["snapshot"].as_str().unwrap().to_string();

    let user = cluster.client_as("user-5").await;
    let backups: Api<Backup> = Api::namespaced(user.clone(), &team_a.name);
    let restores: Api<Restore> = Api::namespaced(user.clone(), &team_a.name);
    // A forged requester is overwritten at admission...
    let mine: Backup = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Backup",
        "metadata": {"name": "mine", "labels": setup.labels()},
        "spec": {"repository": setup.repository,
                 "requester": {"username": "admin", "groups": ["system:masters"]}},
    }))
    .unwrap();
    let created = backups.create(&PostParams::default(), &mine).await.unwrap();
    let requester = created.spec.requester.unwrap();
    assert_eq!(requester.username, "user-5");
    assert!(!requester.groups.contains(&"system:masters".to_string()));
    // ...and cannot be changed afterwards.
    let forged = backups
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"requester": {"username": "admin"}}})),
        )
        .await
        .unwrap_err();
    assert!(forged.to_string().contains("cannot change"), "{forged}");
    let status = finished(&backups, "mine").await;
    assert_eq!(status["phase"], "Completed", "{status}");
    assert!(
        status["counts"]["ConfigMap"].as_i64() >= Some(1),
        "{status}"
    );
    // The user lists team-a's backups, not team-b's.
    assert_eq!(
        backups
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let denied = Api::<Backup>::namespaced(user.clone(), &team_b.name)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("forbidden"), "{denied}");

    // Self-service restore of a deleted ConfigMap.
    Api::<ConfigMap>::namespaced(admin.clone(), &team_a.name)
        .delete("settings", &Default::default())
        .await
        .unwrap();
    let restore = |name: &str, spec: Value| -> Restore {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "Restore",
            "metadata": {"name": name, "labels": setup.labels()},
            "spec": spec,
        }))
        .unwrap()
    };
    // Planned first, applied once approved: exactly that plan.
    restores
        .create(
            &PostParams::default(),
            &restore("back", json!({"backup": "mine", "approve": false})),
        )
        .await
        .unwrap();
    let planned = eventually("the plan", Duration::from_secs(120), || async {
        let status = serde_json::to_value(restores.get("back").await.ok()?).ok()?["status"].clone();
        (status["phase"] == "Planned").then_some(status)
    })
    .await;
    assert_eq!(planned["actions"]["create"], 1, "{planned}");
    let config_maps_a: Api<ConfigMap> = Api::namespaced(admin.clone(), &team_a.name);
    assert!(
        config_maps_a.get_opt("settings").await.unwrap().is_none(),
        "nothing is written before the approval"
    );
    restores
        .patch(
            "back",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"approve": true}})),
        )
        .await
        .unwrap();
    let status = finished(&restores, "back").await;
    assert_eq!(status["phase"], "Completed", "{status}");
    assert_eq!(status["created"], 1, "{status}");
    assert!(config_maps_a.get_opt("settings").await.unwrap().is_some());

    // What lies outside team-a, before the attempts to reach it.
    let outside = |admin: kube::Client, ns: String| async move {
        let cms = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        let mut state: Vec<(String, String)> = cms
            .items
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    c.metadata.resource_version.clone().unwrap(),
                )
            })
            .collect();
        state.sort();
        state
    };
    let before = outside(admin.clone(), team_b.name.clone()).await;
    let binding_name = unique_name("t-steal");
    let escalate = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: escalate}}\nspec:\n  steps:\n  - script: |\n      fn kinds() {{ [\"ConfigMap\"] }}\n      fn transform(obj, params, target) {{\n        [obj, #{{apiVersion: \"rbac.authorization.k8s.io/v1\", kind: \"ClusterRoleBinding\", metadata: #{{name: \"{binding_name}\"}}, roleRef: #{{apiGroup: \"rbac.authorization.k8s.io\", kind: \"ClusterRole\", name: \"cluster-admin\"}}, subjects: [#{{kind: \"User\", name: \"user-5\", apiGroup: \"rbac.authorization.k8s.io\"}}]}}]\n      }}\n"
    );
    let attempts = [
        (
            "their-snapshot",
            json!({"snapshot": snapshot_b, "repository": setup.repository}),
            "NothingToRestore",
        ),
        (
            "into-b",
            json!({"backup": "mine", "namespaceMapping": {team_a.name.clone(): team_b.name.clone()}}),
            "Refused",
        ),
        (
            "their-backup",
            json!({"backup": "nightly"}),
            "BackupNotFound",
        ),
        (
            "escalate",
            json!({"backup": "mine", "transform": escalate}),
            "PreflightFailed",
        ),
    ];
    for (name, spec, _) in &attempts {
        restores
            .create(&PostParams::default(), &restore(name, spec.clone()))
            .await
            .unwrap();
    }
    for (name, _, reason) in &attempts {
        let status = finished(&restores, name).await;
        assert_eq!(status["phase"], "Failed", "{name}: {status}");
        assert_eq!(condition_reason(&status), *reason, "{name}: {status}");
        assert!(
            status["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: a clear message: {status}"
        );
    }
    let escalated = finished(&restores, "escalate").await;
    assert!(
        escalated["message"]
            .as_str()
            .unwrap()
            .contains("clusterrolebindings"),
        "{escalated}"
    );
    // Nothing outside team-a changed.
    assert_eq!(outside(admin.clone(), team_b.name.clone()).await, before);
    assert!(
        Api::<ClusterRoleBinding>::all(admin.clone())
            .get_opt(&binding_name)
            .await
            .unwrap()
            .is_none(),
        "no ClusterRoleBinding was created"
    );
    setup.cleanup().await;
}

#[tokio::test]
async fn a_controller_killed_mid_backup_and_mid_restore_leaves_the_repository_valid_and_finishes() {
    let setup = Setup::new("t-ctl-kill").await;
    let admin = setup.admin.clone();
    let app = TestNamespace::create(&admin, "t-kill-app").await;
    config_map(&admin, &app.name, "settings").await;
    config_map(&admin, &app.name, "more").await;

    // Killed after the packs are stored, before the snapshot is.
    let mut controller = setup.controller(Some("backup-before-snapshot"));
    let backups: Api<Backup> = Api::namespaced(admin.clone(), &app.name);
    let backup: Backup = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Backup",
        "metadata": {"name": "crash", "labels": setup.labels()},
        "spec": {"repository": setup.repository},
    }))
    .unwrap();
    backups
        .create(&PostParams::default(), &backup)
        .await
        .unwrap();
    controller
        .wait_for_line("failpoint backup-before-snapshot reached")
        .await;
    controller.kill();
    let status = backups.get("crash").await.unwrap().status.unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "not reported done"
    );
    assert!(setup.snapshots().is_empty(), "no snapshot yet");
    setup.verify();

    // The next leader (after the dead one's Lease expires) finishes it.
    let mut controller = setup.controller(Some("restore-after-first-wave"));
    let status = finished(&backups, "crash").await;
    assert_eq!(status["phase"], "Completed", "{status}");
    let snapshots = setup.snapshots();
    assert_eq!(snapshots.len(), 1, "one snapshot: {snapshots:?}");
    setup.verify();

    // Killed after the first wave of a restore.
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &app.name);
    config_maps
        .delete("settings", &Default::default())
        .await
        .unwrap();
    config_maps
        .delete("more", &Default::default())
        .await
        .unwrap();
    let restores: Api<Restore> = Api::namespaced(admin.clone(), &app.name);
    let restore: Restore = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Restore",
        "metadata": {"name": "crash", "labels": setup.labels()},
        "spec": {"backup": "crash"},
    }))
    .unwrap();
    restores
        .create(&PostParams::default(), &restore)
        .await
        .unwrap();
    controller
        .wait_for_line("failpoint restore-after-first-wave reached")
        .await;
    controller.kill();
    let status = restores.get("crash").await.unwrap().status.unwrap();
    assert_eq!(
        status.phase.as_deref(),
        Some("Running"),
        "not reported done"
    );

    let _controller = setup.controller(None);
    let status = finished(&restores, "crash").await;
    assert_eq!(status["phase"], "Completed", "{status}");
    for name in ["settings", "more"] {
        assert!(config_maps.get_opt(name).await.unwrap().is_some(), "{name}");
    }
    setup.verify();
    setup.cleanup().await;
}
