//! Volume data on the test nodes: backups of PersistentVolumeClaims by
//! snapshot-move and copy, hooks, incremental moves, restores that fill the
//! claims before the workloads start (same namespace, another namespace,
//! another cluster with another storage class), damaged data and a mover
//! killed mid-copy. Every test needs clusters with nodes (`node`, `node2`).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use serde_json::{Value, json};

use crate::node::{POD_TIMEOUT, namespace_for_pods, pod_ready, snapshot_ready};
use crate::support::{
    ClusterInfo, NodeInfo, apply_manifests, env, eventually, ferry, fresh_bucket, with_s3,
};

/// Held by the tests that keep a mover of the test node in its slot on
/// purpose (stopped at a failpoint) or fill the node's slots: two of them
/// at once can take every slot of the node and wait on each other until
/// their movers time out Pending, so they run one at a time. Other tests'
/// movers are short and only queue behind them.
static SLOT_HOLDERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The container script: report whether the volume already holds data
/// (FOUND: restored before the workload started) or is new (FRESH, then
/// write it), then a checksum of the data and the file names.
const SCRIPT: &str = "if [ -f /data/ready ]; then echo FOUND; else echo FRESH; \
head -c 600000 /dev/urandom > /data/blob; echo hello > /data/hello; mkdir -p /data/sub; \
echo nested > /data/sub/file; ln -s hello /data/link; chown 1001:2002 /data/sub/file; \
chmod 640 /data/sub/file; touch -d '2020-01-02 03:04:05' /data/blob; touch /data/ready; fi; \
echo SUMS $(cat /data/blob /data/hello /data/sub/file | md5sum); \
echo META $(stat -c '%u:%g:%a:%Y' /data/sub/file /data/blob); echo FILES $(ls /data); \
exec sleep 3600";

fn pod_template(node: &NodeInfo, app: &str, claim_volume: Value, annotations: Value) -> Value {
    json!({
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                "command": ["sh", "-c", SCRIPT],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]
            }],
            "volumes": claim_volume
        }
    })
}

/// A StatefulSet `db` (claim template `data`, snapshot-move by default, a
/// pre-backup hook writing /data/hooked) and a Deployment `files` with the
/// claim `files` (annotated for copy).
async fn stateful_app(client: &kube::Client, node: &NodeInfo, ns: &str, files_annotations: Value) {
    let statefulset = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": ns},
        "spec": {
            "serviceName": "db", "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": pod_template(node, "db", json!([]), json!({
                "pre.hook.backup.ferry.dev/command": r#"["/bin/sh", "-c", "echo quiesced > /data/hooked"]"#
            })),
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                         "resources": {"requests": {"storage": "64Mi"}}}
            }]
        }
    });
    files_deployment(
        client,
        node,
        ns,
        files_annotations,
        json!({"backup.ferry.dev/volume-method": "copy"}),
    )
    .await;
    apply_manifests(client, &serde_yaml_ng::to_string(&statefulset).unwrap()).await;
}

pub(crate) async fn files_deployment(
    client: &kube::Client,
    node: &NodeInfo,
    ns: &str,
    pod_annotations: Value,
    claim_annotations: Value,
) {
    let claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "files", "namespace": ns, "annotations": claim_annotations},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                 "resources": {"requests": {"storage": "64Mi"}}}
    });
    let deployment = files_workload(node, ns, pod_annotations);
    let yaml = format!(
        "{}---\n{}",
        serde_yaml_ng::to_string(&claim).unwrap(),
        serde_yaml_ng::to_string(&deployment).unwrap()
    );
    apply_manifests(client, &yaml).await;
}

/// The Deployment `files` of [`SCRIPT`], mounting the claim `files`.
fn files_workload(node: &NodeInfo, ns: &str, pod_annotations: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "files", "namespace": ns},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "files"}},
            "template": pod_template(node, "files",
                json!([{"name": "data", "persistentVolumeClaim": {"claimName": "files"}}]),
                pod_annotations)
        }
    })
}

/// The running Pod of `app` once Ready, and the lines its script printed.
pub(crate) async fn app_output(client: &kube::Client, ns: &str, app: &str) -> (String, String) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = eventually(&format!("a Pod of {ns}/{app}"), POD_TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
            .and_then(|p| p.metadata.name)
    })
    .await;
    pod_ready(&pods, &name).await;
    let logs = eventually(
        &format!("the output of {ns}/{name}"),
        POD_TIMEOUT,
        || async {
            let logs = pods.logs(&name, &LogParams::default()).await.ok()?;
            logs.contains("FILES").then_some(logs)
        },
    )
    .await;
    (name, logs)
}

/// Asserts that a restore's `-o json` result created and updated nothing.
fn wrote_nothing(result: &Value) {
    for key in ["created", "updated"] {
        assert_eq!(
            result["report"][key].as_array().map(Vec::len),
            Some(0),
            "{key}: {result}"
        );
    }
}

pub(crate) fn line<'a>(logs: &'a str, prefix: &str) -> &'a str {
    logs.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in: {logs}"))
}

struct Repo {
    url: String,
    node_endpoint: String,
    image: String,
}

impl Repo {
    async fn new(node: &NodeInfo, prefix: &str) -> Self {
        let bucket = fresh_bucket(prefix).await;
        let repo = Repo {
            url: format!("s3://{bucket}/repo"),
            node_endpoint: node.s3_endpoint.clone(),
            image: node.images["ferry"].clone(),
        };
        let out = with_s3(&mut ferry(&env().with_node().0.kubeconfig))
            .args(["repo", "init", "--repo", &repo.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        repo
    }

    /// `ferry ARGS --repo … -o json` against `cluster`, with the movers set up.
    fn run(&self, cluster: &ClusterInfo, args: &[&str]) -> (bool, Value, String) {
        let mut cmd = ferry(&cluster.kubeconfig);
        with_s3(&mut cmd);
        let out = cmd
            .args(args)
            .args(["--repo", &self.url, "--mover-image", &self.image])
            .args([
                "--mover-s3-endpoint",
                &self.node_endpoint,
                "--mover-timeout",
                "3m",
            ])
            .args(["-o", "json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), value, stderr)
    }

    fn plain(&self, cluster: &ClusterInfo, args: &[&str]) -> (bool, String) {
        let mut cmd = ferry(&cluster.kubeconfig);
        with_s3(&mut cmd);
        let out = cmd.args(args).args(["--repo", &self.url]).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// `ferry restore ARGS` into the cluster `node2`, whose movers use that
/// node's Ferry image and S3 address. Returns a client of node2 and the
/// guard that deletes `ns` there.
async fn restore_into_node2(
    repo: &Repo,
    ns: &str,
    args: &[&str],
) -> (kube::Client, crate::support::TestNamespace) {
    let other = env().cluster("node2");
    let other_node = other.node.as_ref().expect("node2 has a node");
    let other_client = other.client().await;
    let guard = crate::support::TestNamespace::adopt(&other_client, ns);
    let other_repo = Repo {
        url: repo.url.clone(),
        node_endpoint: other_node.s3_endpoint.clone(),
        image: other_node.images["ferry"].clone(),
    };
    let restore: Vec<&str> = std::iter::once("restore")
        .chain(args.iter().copied())
        .collect();
    let (ok, _, stderr) = other_repo.run(other, &restore);
    assert!(ok, "restore {args:?} into node2: {stderr}");
    (other_client, guard)
}

/// Restores `backup` of namespace `ns` into `NS-clone` of the same
/// cluster. Returns the clone's name and the guard that deletes it.
async fn restore_clone(
    repo: &Repo,
    cluster: &ClusterInfo,
    ns: &str,
    backup: &str,
) -> (String, crate::support::TestNamespace) {
    restore_clone_named(repo, cluster, ns, backup, &format!("{ns}-clone")).await
}

/// Restores `backup` of namespace `ns` into the namespace `clone` of the
/// same cluster.
async fn restore_clone_named(
    repo: &Repo,
    cluster: &ClusterInfo,
    ns: &str,
    backup: &str,
    clone: &str,
) -> (String, crate::support::TestNamespace) {
    let clone = clone.to_string();
    let guard = crate::support::TestNamespace::adopt(&cluster.client().await, &clone);
    let mapping = format!("{ns}={clone}");
    let (ok, _, stderr) = repo.run(
        cluster,
        &["restore", backup, "--namespace-mapping", &mapping],
    );
    assert!(ok, "restore of {backup} into {clone}: {stderr}");
    (clone, guard)
}

fn volume<'a>(report: &'a Value, claim: &str) -> &'a Value {
    report["report"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["claim"] == claim))
        .unwrap_or_else(|| panic!("no volume {claim} in the report: {report}"))
}

/// Deletes namespaces without waiting: their Pods stop sleeping on the node
/// (a dropped TestNamespace deletes in the background only while the
/// runtime still runs).
pub(crate) async fn clean_up(client: &kube::Client, namespaces: &[&str]) {
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces {
        let _ = api.delete(ns, &DeleteParams::background()).await;
    }
}

async fn delete_namespace(client: &kube::Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    eventually(
        &format!("namespace {ns} to be gone"),
        Duration::from_secs(180),
        || async { matches!(namespaces.get_opt(ns).await, Ok(None)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn node_volume_data_comes_back_before_the_workloads_in_place_in_a_clone_and_in_another_cluster()
 {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-app").await;
    stateful_app(&client, node, &ns.name, json!({})).await;
    let (_, db_before) = app_output(&client, &ns.name, "db").await;
    let (_, files_before) = app_output(&client, &ns.name, "files").await;
    assert!(db_before.contains("FRESH") && files_before.contains("FRESH"));
    let repo = Repo::new(node, "vol-app").await;

    let (ok, first, stderr) = repo.run(cluster, &["backup", "create", "first", "-n", &ns.name]);
    assert!(ok, "backup with volumes: {stderr}");
    let db = volume(&first, "data-db-0");
    assert_eq!(db["method"], "snapshot-move", "{db}");
    assert!(
        db["root"].is_string() && db["stats"]["files"].as_u64() >= Some(5),
        "{db}"
    );
    let files = volume(&first, "files");
    assert_eq!(files["method"], "copy", "{files}");
    let (ok, listed) = repo.plain(cluster, &["backup", "list"]);
    assert!(ok, "{listed}");
    let row = listed.lines().find(|l| l.starts_with("first ")).unwrap();
    assert!(
        row.contains(" 2 ("),
        "the list says the backup holds two volumes: {listed}"
    );

    // Unchanged: nothing is read again. One changed file: only it is read.
    let (ok, again, stderr) = repo.run(cluster, &["backup", "create", "again", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    let unchanged = &volume(&again, "files")["stats"];
    assert_eq!(unchanged["filesRead"], 0, "{unchanged}");
    assert_eq!(unchanged["chunksNew"], 0, "{unchanged}");
    let moved = &volume(&again, "data-db-0")["stats"];
    assert!(
        moved["filesRead"].as_u64() <= Some(1) && moved["chunksNew"].as_u64() <= Some(1),
        "only the hook's file changed: {moved}"
    );
    let (files_pod, _) = app_output(&client, &ns.name, "files").await;
    exec(&client, &ns.name, &files_pod, "echo more >> /data/sub/file").await;
    let (ok, changed, stderr) = repo.run(cluster, &["backup", "create", "changed", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    let one = &volume(&changed, "files")["stats"];
    assert_eq!(one["filesRead"], 1, "{one}");
    assert_eq!(one["chunksNew"], 1, "{one}");

    // One file of one volume of the application snapshot, restored on this
    // machine with no cluster: the claim is named when there are several.
    let local = tempfile::tempdir().unwrap();
    let target = local.path().join("file");
    let target = target.to_str().unwrap();
    let (ok, stderr) = repo.plain(cluster, &["volume", "restore", "changed:/sub/file", target]);
    assert!(!ok, "two volumes and no --claim");
    assert!(
        stderr.contains("--claim") && stderr.contains(&format!("{}/files", ns.name)),
        "{stderr}"
    );
    let claim = format!("{}/files", ns.name);
    let (ok, stderr) = repo.plain(
        cluster,
        &[
            "volume",
            "restore",
            "changed:/sub/file",
            "--claim",
            &claim,
            target,
        ],
    );
    assert!(ok, "{stderr}");
    let in_pod = exec_output(&client, &ns.name, &files_pod, "cat /data/sub/file").await;
    assert_eq!(
        std::fs::read_to_string(local.path().join("file/file")).unwrap(),
        in_pod
    );

    // The namespace is lost; the restore brings back the first backup's
    // bytes before the workloads start (they print FOUND, not FRESH).
    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) = repo.run(cluster, &["restore", "first"]);
    assert!(ok, "restore with volumes: {stderr}\n{restored}");
    let (_, db_after) = app_output(&client, &ns.name, "db").await;
    let (_, files_after) = app_output(&client, &ns.name, "files").await;
    assert!(db_after.contains("FOUND"), "{db_after}");
    assert!(files_after.contains("FOUND"), "{files_after}");
    assert_eq!(line(&db_after, "SUMS"), line(&db_before, "SUMS"));
    assert_eq!(line(&files_after, "SUMS"), line(&files_before, "SUMS"));
    assert_eq!(
        line(&files_after, "META"),
        line(&files_before, "META"),
        "owners, modes and modification times come back"
    );
    assert!(
        line(&db_after, "FILES").contains("hooked"),
        "the pre-backup hook ran: {db_after}"
    );
    assert!(line(&db_after, "FILES").contains("link"), "{db_after}");

    // A clone into another namespace of the same cluster.
    let (clone, _clone_ns) = restore_clone(&repo, cluster, &ns.name, "first").await;
    let (_, cloned) = app_output(&client, &clone, "files").await;
    assert!(cloned.contains("FOUND"), "{cloned}");
    assert_eq!(line(&cloned, "SUMS"), line(&files_before, "SUMS"));

    // Another cluster, with the claims moved to another storage class.
    let other = env().cluster("node2");
    let other_node = other.node.as_ref().expect("node2 has a node");
    let other_client = other.client().await;
    let class = format!("{}-other", ns.name);
    apply_manifests(
        &other_client,
        &format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {class}}}\nprovisioner: {}\nvolumeBindingMode: WaitForFirstConsumer\n",
            other_node.csi_driver
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: move}}\nspec:\n  steps:\n  - ruleSet: storage-class\n    params:\n      map: {{{}: {class}}}\n",
            node.storage_class
        ),
    )
    .unwrap();
    let (_, _other_ns) = restore_into_node2(
        &repo,
        &ns.name,
        &["first", "--transform", plan.to_str().unwrap()],
    )
    .await;
    let (_, moved_db) = app_output(&other_client, &ns.name, "db").await;
    assert!(moved_db.contains("FOUND"), "{moved_db}");
    assert_eq!(line(&moved_db, "SUMS"), line(&db_before, "SUMS"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(other_client.clone(), &ns.name);
    let claim = claims.get("data-db-0").await.unwrap();
    assert_eq!(
        claim.spec.unwrap().storage_class_name.as_deref(),
        Some(class.as_str())
    );
    clean_up(&client, &[&ns.name, &clone]).await;
    clean_up(&other_client, &[&ns.name]).await;
}

/// Runs `script` in the Pod's container through the API server.
async fn exec(client: &kube::Client, ns: &str, pod: &str, script: &str) {
    exec_output(client, ns, pod, script).await;
}

/// Runs `script` in the Pod's container, asserts it succeeded and returns
/// what it printed.
async fn exec_output(client: &kube::Client, ns: &str, pod: &str, script: &str) -> String {
    use tokio::io::AsyncReadExt;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut process = pods
        .exec(
            pod,
            ["sh", "-c", script],
            &kube::api::AttachParams::default().stderr(false),
        )
        .await
        .unwrap();
    let mut out = String::new();
    process
        .stdout()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let status = process.take_status().unwrap().await.unwrap();
    assert_eq!(status.status.as_deref(), Some("Success"), "{script}: {out}");
    out
}

#[tokio::test]
async fn node_a_claim_its_pod_holds_alone_is_neither_copied_live_nor_recreated_under_it() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-rwop").await;
    let claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "files", "namespace": ns.name},
        "spec": {"accessModes": ["ReadWriteOncePod"], "storageClassName": node.storage_class,
                 "resources": {"requests": {"storage": "64Mi"}}}
    });
    let deployment = files_workload(node, &ns.name, json!({}));
    apply_manifests(
        &client,
        &format!(
            "{}---\n{}",
            serde_yaml_ng::to_string(&claim).unwrap(),
            serde_yaml_ng::to_string(&deployment).unwrap()
        ),
    )
    .await;
    let (pod, _) = app_output(&client, &ns.name, "files").await;
    let repo = Repo::new(node, "vol-rwop").await;

    // A mover cannot mount the claim beside its Pod: the backup says so at
    // once, before any mover Pod is made, instead of waiting it out Pending.
    let (ok, _, stderr) = repo.run(
        cluster,
        &[
            "backup",
            "create",
            "live",
            "-n",
            &ns.name,
            "--volume-method",
            "copy",
        ],
    );
    assert!(!ok, "copying the held claim live cannot work");
    assert!(
        stderr.contains(&format!("volume {}/files", ns.name))
            && stderr.contains("ReadWriteOncePod")
            && stderr.contains(&format!("Pod {pod} holds it"))
            && stderr.contains("snapshot-move"),
        "the claim, its holder and the way out are named: {stderr}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let movers = pods
        .list(&ListParams::default().labels("ferry.dev/mover"))
        .await
        .unwrap();
    assert!(movers.items.is_empty(), "no mover Pod was made");

    // A snapshot needs no second mount.
    let (ok, backup, stderr) = repo.run(cluster, &["backup", "create", "held", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    let volumes = backup["report"]["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["method"], "snapshot-move", "{volumes:?}");

    // Recreating the claim under its Pod would leave it Terminating until
    // the Pod goes, and then take its data: refused before any write.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let before = claims.get("files").await.unwrap().metadata.uid;
    let (ok, _, stderr) = repo.run(
        cluster,
        &[
            "restore",
            "held",
            "--include-kind",
            "PersistentVolumeClaim",
            "--existing",
            "recreate",
            "--recreate-cascading",
        ],
    );
    assert!(!ok, "the claim is in use");
    assert!(
        stderr.contains("nothing was written")
            && stderr.contains(&format!(
                "PersistentVolumeClaim/{}/files is in use by Pod {pod}",
                ns.name
            )),
        "{stderr}"
    );
    // A dry run says beforehand that the claim keeps the data it has.
    let (ok, planned, stderr) = repo.run(cluster, &["restore", "held", "--dry-run"]);
    assert!(ok, "{stderr}");
    assert!(
        planned["report"]["warnings"].to_string().contains(&format!(
            "PersistentVolumeClaim/{}/files: the claim exists in the target, so its data is not restored",
            ns.name
        )),
        "{planned}"
    );
    let after = claims.get("files").await.unwrap();
    assert_eq!(after.metadata.uid, before, "the claim is the same");
    assert!(
        after.metadata.deletion_timestamp.is_none(),
        "the claim is not being deleted"
    );
    clean_up(&client, &[&ns.name]).await;
}

#[tokio::test]
async fn node_a_restore_killed_before_its_claim_is_filled_fills_it_when_run_again() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-resume").await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    let (_, logs) = app_output(&client, &ns.name, "files").await;
    let sums = line(&logs, "SUMS").to_string();
    let repo = Repo::new(node, "vol-resume").await;
    let (ok, _, stderr) = repo.run(cluster, &["backup", "create", "resume", "-n", &ns.name]);
    assert!(ok, "{stderr}");

    // Killed once the claim is made, before any of its data is in.
    let clone = format!("{}-c", ns.name);
    let mapping = format!("{}={clone}", ns.name);
    let s3 = &env().s3;
    let mut restore = stop_at_with(
        &cluster.kubeconfig,
        "restore-before-fill",
        &[
            "restore",
            "resume",
            "--namespace-mapping",
            &mapping,
            "--repo",
            &repo.url,
            "--mover-image",
            &repo.image,
            "--mover-s3-endpoint",
            &repo.node_endpoint,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", &s3.access_key),
            ("AWS_SECRET_ACCESS_KEY", &s3.secret_key),
            ("AWS_REGION", &s3.region),
            ("FERRY_S3_ENDPOINT", &s3.endpoint),
        ],
    );
    restore.kill().unwrap();
    restore.wait().unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &clone);
    let marked = || async {
        claims
            .get("files")
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("restore.ferry.dev/volume-data")
    };
    assert!(marked().await, "the claim says its data is still to come");
    let restore_again = |extra: &[&str]| {
        let mut args = vec!["restore", "resume", "--namespace-mapping", &mapping];
        args.extend_from_slice(extra);
        repo.run(cluster, &args)
    };
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &clone);
    assert!(
        deployments.get_opt("files").await.unwrap().is_none(),
        "no workload before its data"
    );

    // A dry run sees the claim as one to fill, not as one that was there.
    let (ok, planned, stderr) = restore_again(&["--dry-run"]);
    assert!(ok, "{stderr}");
    assert!(
        !planned["report"]["warnings"]
            .to_string()
            .contains("is not restored"),
        "{planned}"
    );

    // Run again: the claim it made is filled before the workload starts,
    // not taken for a claim that was there before.
    let (ok, result, stderr) = restore_again(&[]);
    assert!(ok, "{stderr}\n{result}");
    let (_, logs) = app_output(&client, &clone, "files").await;
    assert!(logs.contains("FOUND"), "the data was there first: {logs}");
    assert_eq!(line(&logs, "SUMS"), sums, "the same bytes");
    assert!(!marked().await, "the mark is gone once the data is in");
    // And a third run finds nothing to do.
    let (ok, result, stderr) = restore_again(&[]);
    assert!(ok, "{stderr}");
    wrote_nothing(&result);
    clean_up(&client, &[&ns.name, &clone]).await;
}

#[tokio::test]
async fn node_a_claim_made_from_a_snapshot_comes_back_from_its_backup_elsewhere() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-source").await;
    let claim = |name: &str, source: Value| {
        let mut claim = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns.name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                     "resources": {"requests": {"storage": "64Mi"}}}
        });
        if !source.is_null() {
            claim["spec"]["dataSource"] = source;
        }
        serde_yaml_ng::to_string(&claim).unwrap()
    };
    apply_manifests(&client, &claim("seed", Value::Null)).await;
    snapshot_ready(&client, &ns.name, "seed", Some(&node.snapshot_class)).await;
    // `files` is made from the snapshot; its workload writes its data.
    let deployment = files_workload(node, &ns.name, json!({}));
    apply_manifests(
        &client,
        &format!(
            "{}---\n{}",
            claim(
                "files",
                json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"})
            ),
            serde_yaml_ng::to_string(&deployment).unwrap()
        ),
    )
    .await;
    let (_, logs) = app_output(&client, &ns.name, "files").await;
    let sums = line(&logs, "SUMS").to_string();
    let repo = Repo::new(node, "vol-source").await;
    let (ok, _, stderr) = repo.run(cluster, &["backup", "create", "sourced", "-n", &ns.name]);
    assert!(ok, "{stderr}");

    // In another namespace the snapshot it was made from does not exist
    // (its VolumeSnapshot object comes later, as a new snapshot): the
    // claim is filled from the backup, without the source.
    let clone = format!("{}-c", ns.name);
    let (ok, result, stderr) = repo.run(
        cluster,
        &[
            "restore",
            "sourced",
            "--namespace-mapping",
            &format!("{}={clone}", ns.name),
        ],
    );
    assert!(ok, "{stderr}\n{result}");
    let (_, logs) = app_output(&client, &clone, "files").await;
    assert!(logs.contains("FOUND"), "restored before it started: {logs}");
    assert_eq!(line(&logs, "SUMS"), sums, "the backed-up bytes");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &clone);
    let restored = claims.get("files").await.unwrap().spec.unwrap();
    assert!(
        restored.data_source.is_none() && restored.data_source_ref.is_none(),
        "{restored:?}"
    );

    // Run again: the claim's source is no difference (a claim's spec
    // cannot change), so nothing is written.
    let (ok, result, stderr) = repo.run(
        cluster,
        &[
            "restore",
            "sourced",
            "--namespace-mapping",
            &format!("{}={clone}", ns.name),
        ],
    );
    assert!(ok, "{stderr}\n{result}");
    wrote_nothing(&result);
    clean_up(&client, &[&ns.name, &clone]).await;
}

#[tokio::test]
async fn node_movers_bring_their_own_limits_into_a_namespace_whose_defaults_are_too_small() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-limits").await;
    // A tenant namespace's defaults: far below what a mover needs (opening
    // the repository alone takes 64 MiB for the password's key derivation).
    apply_manifests(
        &client,
        &format!(
            "apiVersion: v1\nkind: LimitRange\nmetadata: {{name: small, namespace: {}}}\n\
             spec:\n  limits:\n  - type: Container\n    default: {{memory: 32Mi, cpu: 500m}}\n    \
             defaultRequest: {{memory: 16Mi, cpu: 50m}}\n",
            ns.name
        ),
    )
    .await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    app_output(&client, &ns.name, "files").await;
    let repo = Repo::new(node, "vol-limits").await;
    let (ok, backup, stderr) = repo.run(cluster, &["backup", "create", "limits", "-n", &ns.name]);
    assert!(ok, "the movers' own limits hold: {stderr}");
    assert!(
        backup["report"]["volumes"][0]["root"].is_string(),
        "{:#}",
        backup["report"]["volumes"]
    );

    // Left to the namespace's defaults, a mover is killed for memory, and
    // the error says which limit and how to raise it.
    let (ok, _, stderr) = repo.run(
        cluster,
        &[
            "backup",
            "create",
            "defaults",
            "-n",
            &ns.name,
            "--mover-requests",
            "none",
            "--mover-limits",
            "none",
        ],
    );
    assert!(!ok, "a mover under a 32Mi limit cannot open the repository");
    assert!(
        stderr.contains("OOMKilled")
            && stderr.contains("its memory limit, 32Mi")
            && stderr.contains("--mover-limits memory="),
        "{stderr}"
    );
    clean_up(&client, &[&ns.name]).await;
}

#[tokio::test]
async fn node_a_failing_pre_backup_hook_fails_the_backup_with_its_output() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-hook").await;
    files_deployment(
        &client,
        node,
        &ns.name,
        json!({"pre.hook.backup.velero.io/command": r#"["/bin/sh", "-c", "echo cannot-flush; exit 3"]"#}),
        json!({}),
    )
    .await;
    app_output(&client, &ns.name, "files").await;
    let repo = Repo::new(node, "vol-hook").await;
    let (ok, _, stderr) = repo.run(cluster, &["backup", "create", "hooked", "-n", &ns.name]);
    assert!(!ok, "a failing hook with on-error Fail fails the backup");
    assert!(
        stderr.contains("cannot-flush") && stderr.contains("pre.hook.backup.velero.io"),
        "the hook's output and its annotation are named: {stderr}"
    );
    let (_, listed) = repo.plain(cluster, &["backup", "list"]);
    assert!(
        !listed.contains("hooked"),
        "no snapshot was written: {listed}"
    );
    clean_up(&client, &[&ns.name]).await;
}

#[tokio::test]
async fn node_damaged_volume_data_is_named_by_file_and_the_workload_is_not_restored() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-damage").await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    app_output(&client, &ns.name, "files").await;
    let repo = Repo::new(node, "vol-damage").await;
    let (ok, _, stderr) = repo.run(cluster, &["backup", "create", "one", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    // The mover's pack is the largest (600 KB of random data); its first
    // bytes are a chunk of one of the files (trees and roots are stored
    // after every chunk).
    let s3 = crate::support::s3_client().await;
    let bucket = repo
        .url
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap();
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix("repo/data/")
        .send()
        .await
        .unwrap();
    let largest = listed
        .contents()
        .iter()
        .max_by_key(|o| o.size().unwrap_or(0))
        .and_then(|o| o.key())
        .unwrap()
        .to_string();
    let body = s3
        .get_object()
        .bucket(bucket)
        .key(&largest)
        .send()
        .await
        .unwrap();
    let mut bytes = body.body.collect().await.unwrap().into_bytes().to_vec();
    bytes[100] ^= 0xff;
    s3.put_object()
        .bucket(bucket)
        .key(&largest)
        .body(bytes.into())
        .send()
        .await
        .unwrap();

    let (ok, verified) = repo.plain(cluster, &["backup", "verify", "--read-data"]);
    assert!(!ok, "verify finds the damage: {verified}");
    assert!(
        verified.contains(&format!("volume {}/files in snapshot one", ns.name))
            && ["/blob", "/hello", "/sub/file"]
                .iter()
                .any(|f| verified.contains(&format!(": {f} uses damaged data"))),
        "verify names the volume and the file: {verified}"
    );

    delete_namespace(&client, &ns.name).await;
    let _recreated = crate::support::TestNamespace::adopt(&client, &ns.name);
    let (ok, report, stderr) = repo.run(cluster, &["restore", "one"]);
    assert!(!ok, "the restore fails: {report}");
    let text = format!("{report}{stderr}");
    assert!(
        text.contains(&format!("{}/files", ns.name)) && text.contains("damaged"),
        "the failure names the volume and the damage: {text}"
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments.get_opt("files").await.unwrap().is_none(),
        "the workload is not created on partial data"
    );
    clean_up(&client, &[&ns.name]).await;
}

/// `ferry backup create NAME -n NS` in the background, its movers stopping
/// for good after their first pack is stored (failpoint
/// `volume-after-first-pack`).
fn backup_paused_after_first_pack(
    cluster: &ClusterInfo,
    repo: &Repo,
    ns: &str,
    name: &str,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    let s3 = &env().s3;
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("FERRY_PASSWORD", "correct horse battery staple")
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_REGION", &s3.region)
        .env("FERRY_S3_ENDPOINT", &s3.endpoint)
        .env("FERRY_FAILPOINTS", "volume-after-first-pack")
        .args(["backup", "create", name, "-n", ns, "--repo", &repo.url])
        .args([
            "--mover-image",
            &repo.image,
            "--mover-s3-endpoint",
            &repo.node_endpoint,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// The mover Pod of backup `name` once it has stopped at its failure point.
async fn mover_at_failpoint(pods: &Api<Pod>, name: &str) -> String {
    eventually(
        "the mover to stop at its failure point",
        POD_TIMEOUT,
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("ferry.dev/mover={name}")))
                .await
                .ok()?;
            for p in list.items {
                let name = p.metadata.name?;
                let logs = pods
                    .logs(&name, &LogParams::default())
                    .await
                    .unwrap_or_default();
                if logs.contains("failpoint volume-after-first-pack reached") {
                    return Some(name);
                }
            }
            None
        },
    )
    .await
}

#[tokio::test]
async fn node_a_second_commands_mover_takes_a_free_slot_instead_of_queueing_behind_the_first() {
    let _slots = SLOT_HOLDERS.lock().await;
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let first = namespace_for_pods(&client, "vol-slot-a").await;
    let second = namespace_for_pods(&client, "vol-slot-b").await;
    for ns in [&first.name, &second.name] {
        files_deployment(&client, node, ns, json!({}), json!({})).await;
    }
    let (pod, _) = app_output(&client, &first.name, "files").await;
    // More than one pack (8 MiB), so that the first mover reaches its stop.
    exec(
        &client,
        &first.name,
        &pod,
        "head -c 12000000 /dev/urandom > /data/big",
    )
    .await;
    app_output(&client, &second.name, "files").await;
    let repo = Repo::new(node, "vol-slot").await;

    // The first command's mover holds a slot of the node (2 by default) and
    // does not finish.
    let mut stopped = backup_paused_after_first_pack(cluster, &repo, &first.name, "held");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &first.name);
    let held = mover_at_failpoint(&pods, "held").await;
    let held_slot =
        pods.get(&held).await.unwrap().metadata.labels.unwrap()["ferry.dev/mover-slot"].clone();

    // Another command, its own process: its mover takes the free slot and
    // the backup completes while the first mover still runs (in the slot
    // the first one holds, it would wait Pending until that one ended).
    let (ok, report, stderr) =
        repo.run(cluster, &["backup", "create", "beside", "-n", &second.name]);
    assert!(ok, "a second backup beside a running mover: {stderr}");
    assert_eq!(
        volume(&report, "files")["method"],
        "snapshot-move",
        "{report}"
    );
    let still = pods.get(&held).await.unwrap();
    assert_eq!(
        still.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "the first mover (slot {held_slot}) was still running"
    );
    stopped.kill().unwrap();
    let _ = stopped.wait();
    clean_up(&client, &[&first.name, &second.name]).await;
}

#[tokio::test]
async fn node_a_mover_pending_behind_a_long_one_moves_to_the_slot_that_frees_up() {
    let _slots = SLOT_HOLDERS.lock().await;
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let mut namespaces = Vec::new();
    for prefix in ["vol-move-a", "vol-move-b", "vol-move-c"] {
        let ns = namespace_for_pods(&client, prefix).await;
        files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
        namespaces.push(ns);
    }
    for ns in &namespaces[..2] {
        let (pod, _) = app_output(&client, &ns.name, "files").await;
        // More than one pack (8 MiB), so that the mover reaches its stop.
        exec(
            &client,
            &ns.name,
            &pod,
            "head -c 12000000 /dev/urandom > /data/big",
        )
        .await;
    }
    app_output(&client, &namespaces[2].name, "files").await;
    let repo = Repo::new(node, "vol-move").await;

    // Both slots of the node held: `a` in slot 0, `b` in slot 1.
    let mut long = backup_paused_after_first_pack(cluster, &repo, &namespaces[0].name, "long");
    let long_pods: Api<Pod> = Api::namespaced(client.clone(), &namespaces[0].name);
    let long_mover = mover_at_failpoint(&long_pods, "long").await;
    let mut short = backup_paused_after_first_pack(cluster, &repo, &namespaces[1].name, "short");
    let short_pods: Api<Pod> = Api::namespaced(client.clone(), &namespaces[1].name);
    let short_mover = mover_at_failpoint(&short_pods, "short").await;
    let slot_of = |pod: Pod| pod.metadata.labels.unwrap()["ferry.dev/mover-slot"].clone();
    assert_ne!(
        slot_of(long_pods.get(&long_mover).await.unwrap()),
        slot_of(short_pods.get(&short_mover).await.unwrap())
    );

    // A third backup's mover finds both busy and waits in the first slot
    // (its first choice on a tie), behind the long mover.
    let third = namespaces[2].name.clone();
    let waiting = {
        let repo_url = repo.url.clone();
        let (image, endpoint) = (repo.image.clone(), repo.node_endpoint.clone());
        let kubeconfig = cluster.kubeconfig.clone();
        std::thread::spawn(move || {
            let mut cmd = ferry(&kubeconfig);
            with_s3(&mut cmd);
            cmd.args([
                "backup", "create", "third", "-n", &third, "--repo", &repo_url,
            ])
            .args(["--mover-image", &image, "--mover-s3-endpoint", &endpoint])
            .args(["--mover-timeout", "3m", "-o", "json"])
            .output()
            .unwrap()
        })
    };
    let third_pods: Api<Pod> = Api::namespaced(client.clone(), &namespaces[2].name);
    eventually(
        "the third mover to wait for a slot",
        POD_TIMEOUT,
        || async {
            let list = third_pods
                .list(&ListParams::default().labels("ferry.dev/mover=third"))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c.reason.as_deref() == Some("Unschedulable"))
                        })
                })
                .then_some(())
        },
    )
    .await;

    // The short one ends (its command and mover gone): the waiting mover
    // moves to the freed slot and the backup completes while the long
    // mover still holds the other.
    short.kill().unwrap();
    let _ = short.wait();
    let _ = short_pods
        .delete(
            &short_mover,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    let out = waiting.join().unwrap();
    assert!(
        out.status.success(),
        "the third backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        long_pods
            .get(&long_mover)
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            .as_deref(),
        Some("Running"),
        "the long mover still runs"
    );
    long.kill().unwrap();
    let _ = long.wait();
    let names: Vec<&str> = namespaces.iter().map(|n| n.name.as_str()).collect();
    clean_up(&client, &names).await;
}

#[tokio::test]
async fn node_a_mover_killed_mid_copy_fails_the_backup_and_leaves_the_repository_valid() {
    let _slots = SLOT_HOLDERS.lock().await;
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-kill").await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    let (pod, _) = app_output(&client, &ns.name, "files").await;
    // More than one pack (8 MiB) of data.
    exec(
        &client,
        &ns.name,
        &pod,
        "head -c 12000000 /dev/urandom > /data/big",
    )
    .await;
    let repo = Repo::new(node, "vol-kill").await;
    let child = backup_paused_after_first_pack(cluster, &repo, &ns.name, "killed");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let mover = mover_at_failpoint(&pods, "killed").await;
    // The mover reports its progress in its log every second, for the
    // CLI's progress bar: past the first pack, some bytes are done.
    eventually("the mover to report progress", POD_TIMEOUT, || async {
        let logs = pods.logs(&mover, &LogParams::default()).await.ok()?;
        let progress = ferry::volume::VolumeProgress::default();
        (ferry::mover::read_progress(&logs, &progress)
            && progress
                .bytes_done
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0)
        .then_some(())
    })
    .await;
    pods.delete(
        &mover,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the backup fails: {stderr}");
    assert!(
        stderr.contains(&format!("{}/files", ns.name))
            && stderr.contains("no snapshot was written"),
        "{stderr}"
    );
    let (_, listed) = repo.plain(cluster, &["backup", "list"]);
    assert!(!listed.contains("killed"), "{listed}");
    let (ok, verified) = repo.plain(cluster, &["backup", "verify", "--read-data"]);
    assert!(ok, "the repository stays valid: {verified}");
    // The next backup completes.
    let (ok, _, stderr) = repo.run(cluster, &["backup", "create", "retried", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    clean_up(&client, &[&ns.name]).await;
}

#[tokio::test]
async fn node_a_kept_csi_snapshot_brings_back_a_deleted_namespace_with_a_local_repository() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-kept").await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    let (_, before) = app_output(&client, &ns.name, "files").await;
    let dir = tempfile::tempdir().unwrap();
    let repo = crate::support::init_repo(&cluster.kubeconfig, dir.path());
    // A local repository is out of the movers' reach: auto keeps a CSI
    // snapshot in the cluster, and says so.
    let (ok, backup, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &["backup", "create", "kept", "-n", &ns.name, "--repo", &repo],
    );
    assert!(ok, "{stderr}");
    let entry = volume(&backup, "files");
    assert_eq!(entry["method"], "snapshot", "{entry}");
    assert!(
        entry["root"].is_null() && entry["snapshot"]["handle"].is_string(),
        "{entry}"
    );

    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) =
        crate::support::run_json(&cluster.kubeconfig, &["restore", "kept", "--repo", &repo]);
    assert!(ok, "{stderr}\n{restored}");
    let (_, after) = app_output(&client, &ns.name, "files").await;
    assert!(after.contains("FOUND"), "{after}");
    assert_eq!(line(&after, "SUMS"), line(&before, "SUMS"));

    // Another cluster cannot use this cluster's snapshot: refused by name.
    let other = env().cluster("node2");
    let (ok, report, stderr) =
        crate::support::run_json(&other.kubeconfig, &["restore", "kept", "--repo", &repo]);
    let text = format!("{report}{stderr}");
    assert!(!ok && text.contains("snapshot-move"), "{text}");
    let other_namespaces: Api<Namespace> = Api::all(other.client().await);
    assert!(
        other_namespaces.get_opt(&ns.name).await.unwrap().is_none(),
        "refused before anything is written"
    );

    // Deleting the backup deletes the CSI snapshot it kept: its content
    // (left with deletionPolicy Retain when the namespace went) is deleted
    // through the driver.
    let content = entry["snapshot"]["content"].as_str().unwrap().to_string();
    let (_, stderr) = crate::support::run_ok(
        &cluster.kubeconfig,
        &["backup", "delete", "kept", "--repo", &repo],
    );
    assert!(
        stderr.contains("deleted 1 kept CSI snapshot(s)"),
        "{stderr}"
    );
    let contents = snapshot_api(&client, None, "VolumeSnapshotContent");
    eventually(
        &format!("VolumeSnapshotContent {content} to be deleted"),
        POD_TIMEOUT,
        || async { matches!(contents.get_opt(&content).await, Ok(None)).then_some(()) },
    )
    .await;
    clean_up(&client, &[&ns.name]).await;
    clean_up(&other.client().await, &[&ns.name]).await;
}

/// The snapshot.storage.k8s.io (or, for `*Group*` kinds,
/// groupsnapshot.storage.k8s.io) objects of `kind`, in `ns` or cluster-wide.
fn snapshot_api(
    client: &kube::Client,
    ns: Option<&str>,
    kind: &str,
) -> Api<kube::api::DynamicObject> {
    let resource = kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
        if kind.contains("Group") {
            "groupsnapshot.storage.k8s.io"
        } else {
            "snapshot.storage.k8s.io"
        },
        "v1",
        kind,
    ));
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

#[tokio::test]
async fn node_claims_of_a_volume_group_are_snapshotted_together_moved_kept_and_released() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-group").await;
    // Two claims of one application labelled into one group.
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    let logs_claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "logs", "namespace": ns.name,
                     "labels": {"ferry.dev/volume-group": "app"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                 "resources": {"requests": {"storage": "64Mi"}}}
    });
    let logs_app = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "logs", "namespace": ns.name},
        "spec": {
            "replicas": 1, "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "logs"}},
            "template": pod_template(node, "logs",
                json!([{"name": "data", "persistentVolumeClaim": {"claimName": "logs"}}]), json!({}))
        }
    });
    let yaml = format!(
        "{}---\n{}",
        serde_yaml_ng::to_string(&logs_claim).unwrap(),
        serde_yaml_ng::to_string(&logs_app).unwrap()
    );
    apply_manifests(&client, &yaml).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    claims
        .patch(
            "files",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {"ferry.dev/volume-group": "app"}}}),
            ),
        )
        .await
        .unwrap();
    let (_, files_before) = app_output(&client, &ns.name, "files").await;
    let (_, logs_before) = app_output(&client, &ns.name, "logs").await;

    // snapshot-move: one VolumeGroupSnapshot for both claims, deleted whole
    // once both are in the repository.
    let repo = Repo::new(node, "vol-group").await;
    let (ok, moved, stderr) = repo.run(cluster, &["backup", "create", "moved", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    let (files, logs) = (volume(&moved, "files"), volume(&moved, "logs"));
    assert_eq!(files["method"], "snapshot-move", "{files}");
    assert_eq!(logs["method"], "snapshot-move", "{logs}");
    assert!(
        files["group"].is_string() && files["group"] == logs["group"],
        "one group took both: {files} {logs}"
    );
    let groups = snapshot_api(&client, Some(&ns.name), "VolumeGroupSnapshot");
    let snapshots = snapshot_api(&client, Some(&ns.name), "VolumeSnapshot");
    eventually(
        "the moved group snapshot and its members to be gone",
        POD_TIMEOUT,
        || async {
            let left = groups.list(&Default::default()).await.ok()?.items.len()
                + snapshots.list(&Default::default()).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;

    // A local repository: the group is kept in the cluster, its members
    // recorded with it.
    let dir = tempfile::tempdir().unwrap();
    let local = crate::support::init_repo(&cluster.kubeconfig, dir.path());
    let (ok, kept, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &["backup", "create", "kept", "-n", &ns.name, "--repo", &local],
    );
    assert!(ok, "{stderr}");
    let (files, logs) = (volume(&kept, "files"), volume(&kept, "logs"));
    assert_eq!(files["method"], "snapshot", "{files}");
    let group_content = files["snapshot"]["group"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("a kept member names its group: {files}"))
        .to_string();
    assert_eq!(logs["snapshot"]["group"]["content"], group_content.as_str());
    assert_ne!(files["snapshot"]["handle"], logs["snapshot"]["handle"]);
    let group_name = files["group"]
        .as_str()
        .unwrap()
        .split_once('/')
        .unwrap()
        .1
        .to_string();
    let group = groups.get(&group_name).await.unwrap();
    assert_eq!(group.data["status"]["readyToUse"], true, "{:?}", group.data);
    let (text, _) = crate::support::run_ok(
        &cluster.kubeconfig,
        &["backup", "describe", "kept", "--repo", &local],
    );
    assert!(
        text.contains(&format!("group {}", files["group"].as_str().unwrap())),
        "{text}"
    );

    // The namespace is lost: both claims come back from the kept members,
    // and from the moved data into a clone.
    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) =
        crate::support::run_json(&cluster.kubeconfig, &["restore", "kept", "--repo", &local]);
    assert!(ok, "{stderr}\n{restored}");
    for (app, before) in [("files", &files_before), ("logs", &logs_before)] {
        let (_, after) = app_output(&client, &ns.name, app).await;
        assert!(after.contains("FOUND"), "{app}: {after}");
        assert_eq!(line(&after, "SUMS"), line(before, "SUMS"), "{app}");
    }
    let (clone, _clone_ns) = restore_clone(&repo, cluster, &ns.name, "moved").await;
    for (app, before) in [("files", &files_before), ("logs", &logs_before)] {
        let (_, after) = app_output(&client, &clone, app).await;
        assert!(after.contains("FOUND"), "{app}: {after}");
        assert_eq!(line(&after, "SUMS"), line(before, "SUMS"), "{app}");
    }

    // Deleting the backup releases the group through the driver, and the
    // contents of its members.
    let member_contents: Vec<String> = [files, logs]
        .iter()
        .map(|v| v["snapshot"]["content"].as_str().unwrap().to_string())
        .collect();
    let (_, stderr) = crate::support::run_ok(
        &cluster.kubeconfig,
        &["backup", "delete", "kept", "--repo", &local],
    );
    assert!(
        stderr.contains("deleted 2 kept CSI snapshot(s)"),
        "{stderr}"
    );
    let group_contents = snapshot_api(&client, None, "VolumeGroupSnapshotContent");
    let contents = snapshot_api(&client, None, "VolumeSnapshotContent");
    eventually(
        "the kept group and its members to be deleted",
        POD_TIMEOUT,
        || async {
            let mut gone = matches!(group_contents.get_opt(&group_content).await, Ok(None));
            for content in &member_contents {
                gone &= matches!(contents.get_opt(content).await, Ok(None));
            }
            gone.then_some(())
        },
    )
    .await;
    clean_up(&client, &[&ns.name, &clone]).await;
}

/// Runs `ferry ARGS` with the failure point `point` armed and returns it
/// once it is stopped there, alive.
fn stop_at(kubeconfig: &std::path::Path, point: &str, args: &[&str]) -> std::process::Child {
    stop_at_with(kubeconfig, point, args, &[])
}

/// [`stop_at`] with more environment variables (`vars`).
fn stop_at_with(
    kubeconfig: &std::path::Path,
    point: &str,
    args: &[&str],
    vars: &[(&str, &str)],
) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
        .env("KUBECONFIG", kubeconfig)
        .env("FERRY_PASSWORD", "correct horse battery staple")
        .env("FERRY_FAILPOINTS", point)
        .envs(vars.iter().copied())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains(&format!("failpoint {point} reached")) {
            return child;
        }
        seen.push(line);
    }
    panic!(
        "ferry {args:?} ended before failpoint {point}: {:?}\n{}",
        child.wait(),
        seen.join("\n")
    );
}

/// [`stop_at`], then SIGKILL: no cleanup of any kind.
fn kill_at(kubeconfig: &std::path::Path, point: &str, args: &[&str]) {
    let mut child = stop_at(kubeconfig, point, args);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn node_kept_csi_snapshots_leaked_by_killed_commands_are_released_by_prune() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-leak").await;
    files_deployment(&client, node, &ns.name, json!({}), json!({})).await;
    app_output(&client, &ns.name, "files").await;
    let dir = tempfile::tempdir().unwrap();
    let repo = crate::support::init_repo(&cluster.kubeconfig, dir.path());
    let contents = snapshot_api(&client, None, "VolumeSnapshotContent");
    let labelled = || async {
        let mut names: Vec<String> = contents
            .list(&ListParams::default().labels("ferry.dev/kept-by"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|c| c.data["spec"]["volumeSnapshotRef"]["namespace"] == ns.name.as_str())
            .filter_map(|c| c.metadata.name)
            .collect();
        names.sort();
        names
    };

    // A backup stopped after it kept its CSI snapshot, before its snapshot
    // was written, and still running: a prune meanwhile must not take the
    // kept snapshot for a leak (the backup's lock keeps it out).
    let mut paused = stop_at(
        &cluster.kubeconfig,
        "backup-before-snapshot",
        &[
            "backup", "create", "killed", "-n", &ns.name, "--repo", &repo,
        ],
    );
    let leaked_by_backup = labelled().await;
    assert_eq!(leaked_by_backup.len(), 1, "{leaked_by_backup:?}");
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "prune", "--repo", &repo])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("released"),
        "{out:?}"
    );
    assert_eq!(
        labelled().await,
        leaked_by_backup,
        "a running backup's kept snapshot stays"
    );
    // Killed there, it leaves the kept snapshot named by nothing.
    paused.kill().unwrap();
    paused.wait().unwrap();
    // A delete killed after the snapshot went, before it released the CSI
    // snapshot.
    let (ok, deleted, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &[
            "backup", "create", "deleted", "-n", &ns.name, "--repo", &repo,
        ],
    );
    assert!(ok, "{stderr}");
    let deleted_content = volume(&deleted, "files")["snapshot"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    kill_at(
        &cluster.kubeconfig,
        "delete-before-release",
        &["backup", "delete", "deleted", "--repo", &repo],
    );
    // A live backup's kept snapshot is never taken for a leak.
    let (ok, live, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &["backup", "create", "live", "-n", &ns.name, "--repo", &repo],
    );
    assert!(ok, "{stderr}");
    let live_content = volume(&live, "files")["snapshot"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(labelled().await.len(), 3);
    // A snapshot the user keeps on delete is handed over, never swept.
    let (ok, handed, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &[
            "backup", "create", "handed", "-n", &ns.name, "--repo", &repo,
        ],
    );
    assert!(ok, "{stderr}");
    let handed_content = volume(&handed, "files")["snapshot"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    crate::support::run_ok(
        &cluster.kubeconfig,
        &[
            "backup",
            "delete",
            "handed",
            "--keep-volume-snapshots",
            "--repo",
            &repo,
        ],
    );
    assert_eq!(
        labelled().await.len(),
        3,
        "the handed-over content lost its label"
    );

    // The killed backup left its shared lock behind; prune removes a dead
    // process's lock of this host.
    let (ok, dry, stderr) = crate::support::run_json(
        &cluster.kubeconfig,
        &["backup", "prune", "--dry-run", "--repo", &repo],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        dry["sweptVolumeSnapshots"]["released"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{dry}"
    );
    assert_eq!(labelled().await.len(), 3, "a dry run releases nothing");
    let (ok, pruned, stderr) =
        crate::support::run_json(&cluster.kubeconfig, &["backup", "prune", "--repo", &repo]);
    assert!(ok, "{stderr}");
    let released = pruned["sweptVolumeSnapshots"]["released"].to_string();
    assert!(
        released.contains(&leaked_by_backup[0]) && released.contains(&deleted_content),
        "{pruned}"
    );
    assert!(!released.contains(&live_content), "{pruned}");
    eventually(
        "only the live backup's kept snapshot to remain",
        POD_TIMEOUT,
        || async { (labelled().await == vec![live_content.clone()]).then_some(()) },
    )
    .await;
    assert!(!released.contains(&handed_content), "{pruned}");
    let handed = contents.get(&handed_content).await.unwrap();
    assert_eq!(handed.data["spec"]["deletionPolicy"], "Retain");
    // The user deletes it.
    contents
        .patch(
            &handed_content,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
        )
        .await
        .unwrap();
    contents
        .delete(&handed_content, &DeleteParams::default())
        .await
        .unwrap();
    // The live backup still restores from it.
    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) =
        crate::support::run_json(&cluster.kubeconfig, &["restore", "live", "--repo", &repo]);
    assert!(ok, "{stderr}\n{restored}");
    let (_, after) = app_output(&client, &ns.name, "files").await;
    assert!(after.contains("FOUND"), "{after}");
    crate::support::run_ok(
        &cluster.kubeconfig,
        &["backup", "delete", "live", "--repo", &repo],
    );
    eventually("no kept snapshot to remain", POD_TIMEOUT, || async {
        labelled().await.is_empty().then_some(())
    })
    .await;
    clean_up(&client, &[&ns.name]).await;
}

// Two workers: the watcher runs while the test thread waits for `ferry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_movers_beyond_the_per_node_bound_wait_pending_for_a_slot() {
    let _slots = SLOT_HOLDERS.lock().await;
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-slots").await;
    let claims: Vec<String> = (0..3)
        .map(|i| {
            serde_yaml_ng::to_string(&json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("data-{i}"), "namespace": ns.name,
                             "annotations": {"backup.ferry.dev/volume-method": "copy"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                         "resources": {"requests": {"storage": "16Mi"}}}
            }))
            .unwrap()
        })
        .collect();
    apply_manifests(&client, &claims.join("---\n")).await;
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    eventually("the claims to be bound", POD_TIMEOUT, || async {
        let list = claims_api.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .then_some(())
    })
    .await;
    let repo = Repo::new(node, "vol-slots").await;

    // Watch the movers while the backup runs: how many ran at once on the
    // node, and whether the scheduler held one back for its slot.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        let done = done.clone();
        tokio::spawn(async move {
            let (mut most_running, mut held_back) = (0, false);
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = pods
                    .list(&ListParams::default().labels("ferry.dev/mover=slots"))
                    .await
                {
                    let running = list
                        .items
                        .iter()
                        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            !matches!(
                                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                                Some("Succeeded" | "Failed")
                            )
                        })
                        .count();
                    most_running = most_running.max(running);
                    for p in &list.items {
                        let status = p.status.clone().unwrap_or_default();
                        for c in status.conditions.unwrap_or_default() {
                            seen.insert(format!(
                                "{:?} {} {} {:?} {:?}",
                                status.phase, c.type_, c.status, c.reason, c.message
                            ));
                        }
                    }
                    held_back |= list.items.iter().any(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| {
                                    c.type_ == "PodScheduled"
                                        && c.reason.as_deref() == Some("Unschedulable")
                                        && c.message
                                            .as_deref()
                                            .is_some_and(|m| m.contains("anti-affinity"))
                                })
                            })
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (most_running, held_back, seen)
        })
    };
    let (ok, backup, stderr) = repo.run(
        cluster,
        &[
            "backup",
            "create",
            "slots",
            "-n",
            &ns.name,
            "--mover-concurrency",
            "3",
            "--mover-concurrency-per-node",
            "1",
        ],
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(ok, "{stderr}");
    for i in 0..3 {
        assert_eq!(volume(&backup, &format!("data-{i}"))["method"], "copy");
    }
    let (most_running, held_back, seen) = watcher.await.unwrap();
    assert!(
        most_running <= 1,
        "{most_running} movers were on the node at once: {seen:#?}"
    );
    assert!(
        held_back,
        "three movers at once, one slot: the scheduler held some back: {seen:#?}"
    );
    clean_up(&client, &[&ns.name]).await;
}

/// The container script of the block app: for each device, FOUND if it
/// holds the marker (restored before the workload started), else FRESH and
/// write 600 KiB of random data at 4 MiB and the marker at 1 MiB; then the
/// checksum of the device's first 64 MiB.
const BLOCK_SCRIPT: &str = "for d in data raw; do \
if [ \"$(dd if=/dev/$d bs=512 skip=2048 count=1 2>/dev/null | head -c 5)\" = READY ]; then echo FOUND $d; \
else echo FRESH $d; dd if=/dev/urandom of=/dev/$d bs=4096 seek=1024 count=150 conv=fsync 2>/dev/null; \
echo READY | dd of=/dev/$d bs=512 seek=2048 conv=sync,fsync 2>/dev/null; fi; \
echo SUMS-$d $(head -c 67108864 /dev/$d | md5sum); done; echo FILES; exec sleep 3600";

/// A Deployment `disk` with two block-mode claims attached as devices:
/// `data` (snapshot-move by default) and `raw` (annotated for copy).
async fn block_app(client: &kube::Client, node: &NodeInfo, ns: &str) {
    let claim = |name: &str, annotations: Value| {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                     "volumeMode": "Block", "resources": {"requests": {"storage": "64Mi"}}}
        })
    };
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "disk", "namespace": ns},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "disk"}},
            "template": {
                "metadata": {"labels": {"app": "disk"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                        "command": ["sh", "-c", BLOCK_SCRIPT],
                        "volumeDevices": [
                            {"name": "data", "devicePath": "/dev/data"},
                            {"name": "raw", "devicePath": "/dev/raw"}
                        ]
                    }],
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                        {"name": "raw", "persistentVolumeClaim": {"claimName": "raw"}}
                    ]
                }
            }
        }
    });
    let yaml = [
        claim("data", json!({})),
        claim("raw", json!({"backup.ferry.dev/volume-method": "copy"})),
        deployment,
    ]
    .iter()
    .map(|o| serde_yaml_ng::to_string(o).unwrap())
    .collect::<Vec<_>>()
    .join("---\n");
    apply_manifests(client, &yaml).await;
}

/// Both devices were filled before the workload started (FOUND) with the
/// bytes they held when backed up.
fn assert_devices_came_back(after: &str, before: &str) {
    assert!(
        after.contains("FOUND data") && after.contains("FOUND raw"),
        "{after}"
    );
    for device in ["SUMS-data", "SUMS-raw"] {
        assert_eq!(line(after, device), line(before, device));
    }
}

#[tokio::test]
async fn node_block_mode_claims_are_moved_and_restored_byte_for_byte_here_and_in_another_cluster() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-block").await;
    block_app(&client, node, &ns.name).await;
    let (_, before) = app_output(&client, &ns.name, "disk").await;
    assert!(
        before.contains("FRESH data") && before.contains("FRESH raw"),
        "{before}"
    );
    let repo = Repo::new(node, "vol-block").await;

    let (ok, first, stderr) = repo.run(cluster, &["backup", "create", "first", "-n", &ns.name]);
    assert!(ok, "backup of block claims: {stderr}");
    for (claim, method) in [("data", "snapshot-move"), ("raw", "copy")] {
        let entry = volume(&first, claim);
        assert_eq!(entry["method"], method, "{entry}");
        assert_eq!(entry["block"], true, "{entry}");
        assert!(entry["root"].is_string(), "{entry}");
        assert_eq!(
            entry["stats"]["bytes"],
            64 << 20,
            "the whole device: {entry}"
        );
        assert!(
            entry["stats"]["bytesStored"].as_u64() < Some(8 << 20),
            "zeroed blocks store nothing: {entry}"
        );
    }

    // Unchanged devices are read again (no changed-block tracking) but
    // store no new chunk.
    let (ok, again, stderr) = repo.run(cluster, &["backup", "create", "again", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    for claim in ["data", "raw"] {
        let stats = &volume(&again, claim)["stats"];
        assert_eq!(stats["chunksNew"], 0, "{claim}: {stats}");
    }

    // The namespace is lost: the devices come back before the workload.
    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) = repo.run(cluster, &["restore", "first"]);
    assert!(ok, "restore of block claims: {stderr}\n{restored}");
    let (_, after) = app_output(&client, &ns.name, "disk").await;
    assert_devices_came_back(&after, &before);

    // Another cluster.
    let (other_client, _other_ns) = restore_into_node2(&repo, &ns.name, &["first"]).await;
    let (_, moved) = app_output(&other_client, &ns.name, "disk").await;
    assert_devices_came_back(&moved, &before);
    clean_up(&client, &[&ns.name]).await;
    clean_up(&other_client, &[&ns.name]).await;
}

#[tokio::test]
async fn node_a_statefulsets_claims_are_snapshotted_together_without_labels() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-autogroup").await;
    let mut template = pod_template(node, "db", json!([]), json!({}));
    template["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "wal", "mountPath": "/wal"}));
    let claim_template = |name: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                     "resources": {"requests": {"storage": "64Mi"}}}
        })
    };
    let statefulset = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": ns.name},
        "spec": {
            "serviceName": "db", "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": template,
            "volumeClaimTemplates": [claim_template("data"), claim_template("wal")]
        }
    });
    apply_manifests(&client, &serde_yaml_ng::to_string(&statefulset).unwrap()).await;
    let (_, before) = app_output(&client, &ns.name, "db").await;
    let repo = Repo::new(node, "vol-autogroup").await;

    let (ok, report, stderr) = repo.run(cluster, &["backup", "create", "one", "-n", &ns.name]);
    assert!(ok, "{stderr}");
    let (data, wal) = (volume(&report, "data-db-0"), volume(&report, "wal-db-0"));
    assert_eq!(data["method"], "snapshot-move", "{data}");
    assert!(data["group"].is_string(), "one group snapshot: {data}");
    assert_eq!(data["group"], wal["group"], "{data}\n{wal}");
    // Nothing was labelled to make the group.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let labels = claims
        .get("data-db-0")
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        ["app"],
        "the claim's labels are its own"
    );
    // The moved group is gone once both members are in the repository.
    let groups = snapshot_api(&client, Some(&ns.name), "VolumeGroupSnapshot");
    eventually(
        "the moved group snapshot to be gone",
        POD_TIMEOUT,
        || async {
            let left = groups.list(&Default::default()).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;

    // --no-auto-volume-groups: one snapshot per claim.
    let (ok, report, stderr) = repo.run(
        cluster,
        &[
            "backup",
            "create",
            "two",
            "-n",
            &ns.name,
            "--no-auto-volume-groups",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(volume(&report, "data-db-0")["group"].is_null(), "{report}");

    // The grouped backup restores into another namespace with its data.
    let (clone, _clone_ns) = restore_clone(&repo, cluster, &ns.name, "one").await;
    let (_, cloned) = app_output(&client, &clone, "db").await;
    assert!(cloned.contains("FOUND"), "{cloned}");
    assert_eq!(line(&cloned, "SUMS"), line(&before, "SUMS"));
    clean_up(&client, &[&ns.name, &clone]).await;
}

/// The database's start script: a data directory is made (initdb) only when
/// the claim holds none, so a restored claim prints FOUND; then PostgreSQL
/// runs on a Unix socket.
const POSTGRES_SCRIPT: &str = "if [ -s \"$PGDATA/PG_VERSION\" ]; then echo FOUND; else echo FRESH; \
initdb -U postgres --locale=C -E UTF8 >/dev/null; fi; echo FILES $(ls $PGDATA); \
exec postgres -c listen_addresses= -c unix_socket_directories=/tmp -c jit=off";

/// A PostgreSQL StatefulSet `pg` (Debian's PostgreSQL 15) with its data on
/// the claim template `data`, a pre-backup CHECKPOINT hook and a readiness
/// probe that asks the server itself.
async fn postgres_app(client: &kube::Client, node: &NodeInfo, ns: &str) {
    let image = &node.images["postgres"];
    let statefulset = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "pg", "namespace": ns},
        "spec": {
            "serviceName": "pg", "replicas": 1,
            "selector": {"matchLabels": {"app": "pg"}},
            "template": {
                "metadata": {"labels": {"app": "pg"}, "annotations": {
                    "pre.hook.backup.ferry.dev/command":
                        r#"["/bin/sh", "-c", "psql -h /tmp -U postgres -c CHECKPOINT"]"#
                }},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "initContainers": [{
                        "name": "owner", "image": image, "imagePullPolicy": "Never",
                        "command": ["chown", "999:999", "/var/lib/postgresql/data"],
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
                    }],
                    "containers": [{
                        "name": "postgres", "image": image, "imagePullPolicy": "Never",
                        "command": ["sh", "-c", POSTGRES_SCRIPT],
                        "securityContext": {"runAsUser": 999, "runAsGroup": 999},
                        "readinessProbe": {
                            "exec": {"command": ["pg_isready", "-h", "/tmp", "-U", "postgres"]},
                            "periodSeconds": 1
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
                    }]
                }
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                         "resources": {"requests": {"storage": "256Mi"}}}
            }]
        }
    });
    apply_manifests(client, &serde_yaml_ng::to_string(&statefulset).unwrap()).await;
}

/// `psql` in the database's Pod, unaligned and tuples only.
async fn psql(client: &kube::Client, ns: &str, pod: &str, sql: &str) -> String {
    let script = format!("psql -h /tmp -U postgres -v ON_ERROR_STOP=1 -At -c \"{sql}\"");
    exec_output(client, ns, pod, &script)
        .await
        .trim()
        .to_string()
}

/// The rows of `orders` as the database sees them: their count and a
/// checksum of every row in key order.
const ORDERS_SUM: &str =
    "select count(*) || ' ' || md5(string_agg(id || ':' || note, ',' order by id)) from orders";

#[tokio::test]
async fn node_a_postgresql_database_comes_back_with_every_committed_row_here_and_in_another_cluster()
 {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-pg").await;
    postgres_app(&client, node, &ns.name).await;
    let (pod, started) = app_output(&client, &ns.name, "pg").await;
    assert!(started.contains("FRESH"), "{started}");
    psql(
        &client,
        &ns.name,
        &pod,
        "create table orders as select g as id, md5(g::text) as note from generate_series(1, 50000) g; \
         create index orders_note on orders(note)",
    )
    .await;
    let before = psql(&client, &ns.name, &pod, ORDERS_SUM).await;
    assert!(before.starts_with("50000 "), "{before}");
    let checkpoints = "select checkpoints_req from pg_stat_bgwriter";
    let checkpoints_before: u64 = psql(&client, &ns.name, &pod, checkpoints)
        .await
        .parse()
        .unwrap();

    // A backup of the running database: the hook checkpoints it, the CSI
    // snapshot takes its volume at one instant, and the data is moved.
    let repo = Repo::new(node, "vol-pg").await;
    let (ok, backup, stderr) = repo.run(cluster, &["backup", "create", "orders", "-n", &ns.name]);
    assert!(ok, "backup of the database: {stderr}");
    let data = volume(&backup, "data-pg-0");
    assert_eq!(data["method"], "snapshot-move", "{data}");
    assert!(
        data["stats"]["files"].as_u64() > Some(900),
        "the whole data directory: {data}"
    );
    let checkpoints_after: u64 = psql(&client, &ns.name, &pod, checkpoints)
        .await
        .parse()
        .unwrap();
    assert!(
        checkpoints_after > checkpoints_before,
        "the pre-backup hook checkpointed the database ({checkpoints_before} -> {checkpoints_after})"
    );
    // Rows written after the backup are not part of it.
    psql(
        &client,
        &ns.name,
        &pod,
        "insert into orders select g, 'late' from generate_series(50001, 50100) g",
    )
    .await;

    // The namespace is lost. The restored claim holds the data directory
    // (owner and mode as PostgreSQL demands) before the server starts; it
    // recovers and serves exactly the backed-up rows, through its index too.
    delete_namespace(&client, &ns.name).await;
    let (ok, restored, stderr) = repo.run(cluster, &["restore", "orders"]);
    assert!(ok, "restore of the database: {stderr}\n{restored}");
    let (pod, after) = app_output(&client, &ns.name, "pg").await;
    assert!(after.contains("FOUND"), "{after}");
    assert_eq!(psql(&client, &ns.name, &pod, ORDERS_SUM).await, before);
    let indexed = psql(
        &client,
        &ns.name,
        &pod,
        "set enable_seqscan = off; select id from orders where note = md5('4242')",
    )
    .await;
    assert_eq!(indexed.lines().last(), Some("4242"), "{indexed}");
    psql(
        &client,
        &ns.name,
        &pod,
        "insert into orders values (60000, 'after the restore')",
    )
    .await;

    // Prod cloned into a test namespace beside it: the clone holds the
    // backed-up rows, and what the restored database wrote since is its own.
    let (clone, _clone_ns) = restore_clone(&repo, cluster, &ns.name, "orders").await;
    let (clone_pod, cloned) = app_output(&client, &clone, "pg").await;
    assert!(cloned.contains("FOUND"), "{cloned}");
    assert_eq!(psql(&client, &clone, &clone_pod, ORDERS_SUM).await, before);
    assert_eq!(
        psql(&client, &ns.name, &pod, "select count(*) from orders").await,
        "50001",
        "the database it was cloned from is untouched"
    );

    // The same backup migrated into another cluster.
    let (other_client, _other_ns) = restore_into_node2(&repo, &ns.name, &["orders"]).await;
    let (other_pod, moved) = app_output(&other_client, &ns.name, "pg").await;
    assert!(moved.contains("FOUND"), "{moved}");
    assert_eq!(
        psql(&other_client, &ns.name, &other_pod, ORDERS_SUM).await,
        before
    );
    clean_up(&client, &[&ns.name, &clone]).await;
    clean_up(&other_client, &[&ns.name]).await;
}

/// The script of the tracked block app: FOUND if the device holds the
/// marker, else FRESH and 8 MiB of random data at 4 MiB and the marker at
/// 1 MiB; then the device's checksum.
const TRACKED_SCRIPT: &str = "if [ \"$(dd if=/dev/data bs=512 skip=2048 count=1 2>/dev/null | head -c 5)\" = READY ]; then echo FOUND; \
else echo FRESH; dd if=/dev/urandom of=/dev/data bs=65536 seek=64 count=128 conv=fsync 2>/dev/null; \
echo READY | dd of=/dev/data bs=512 seek=2048 conv=sync,fsync 2>/dev/null; fi; \
echo SUM $(md5sum < /dev/data); echo FILES; exec sleep 3600";

/// A Deployment `tracked` with the 64 MiB block claim `data`, and the
/// ServiceAccount `cbt-reader`, which may get the namespace's
/// VolumeSnapshots: what the snapshot metadata service checks.
async fn tracked_block_app(client: &kube::Client, node: &NodeInfo, ns: &str) {
    let objects = [
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "cbt-reader", "namespace": ns}
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "cbt-reader", "namespace": ns},
            "rules": [{"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["get"]}]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "cbt-reader", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cbt-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "cbt-reader", "namespace": ns}]
        }),
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                     "volumeMode": "Block", "resources": {"requests": {"storage": "64Mi"}}}
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "tracked", "namespace": ns},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app": "tracked"}},
                "template": {
                    "metadata": {"labels": {"app": "tracked"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{
                            "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                            "command": ["sh", "-c", TRACKED_SCRIPT],
                            "volumeDevices": [{"name": "data", "devicePath": "/dev/data"}]
                        }],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
                    }
                }
            }
        }),
    ];
    let yaml = objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    apply_manifests(client, &yaml).await;
}

/// Waits until the VolumeSnapshot `name` of `snapshots` is gone: a base
/// released.
async fn base_released(snapshots: &Api<kube::api::DynamicObject>, name: &str) {
    eventually(
        &format!("the base {name} released"),
        Duration::from_secs(60),
        || async {
            snapshots
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

/// The VolumeSnapshot (`NAMESPACE/NAME`) an entry keeps as its
/// changed-block tracking base.
fn change_base(entry: &Value) -> String {
    entry["changeBase"]["volumeSnapshot"]
        .as_str()
        .unwrap_or_else(|| panic!("no changed-block tracking base: {entry}"))
        .to_string()
}

#[tokio::test]
async fn node_a_block_volume_is_read_only_where_it_changed_since_the_last_backup() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "vol-cbt").await;
    tracked_block_app(&client, node, &ns.name).await;
    let (pod, before) = app_output(&client, &ns.name, "tracked").await;
    assert!(before.contains("FRESH"), "{before}");
    let repo = Repo::new(node, "vol-cbt").await;
    let account = format!("{}/cbt-reader", ns.name);
    let backup = |name: &str| {
        repo.run(
            cluster,
            &[
                "backup",
                "create",
                name,
                "-n",
                &ns.name,
                "--snapshot-metadata-account",
                &account,
            ],
        )
    };
    let snapshots = snapshot_api(&client, Some(&ns.name), "VolumeSnapshot");

    // The first backup reads only the blocks that hold data (the 8 MiB
    // written and the marker's block) and keeps its snapshot as the next
    // one's base.
    let (ok, first, stderr) = backup("first");
    assert!(ok, "first backup: {stderr}");
    let entry = volume(&first, "data");
    assert_eq!(entry["method"], "snapshot-move", "{entry}");
    let allocated = entry["stats"]["bytesChanged"].as_u64().unwrap_or_default();
    assert!(
        ((8 << 20) + 512..=9 << 20).contains(&allocated),
        "allocated: {entry}"
    );
    assert!(
        entry["stats"]["bytesRead"].as_u64().unwrap() <= 24 << 20,
        "{entry}"
    );
    let first_base = change_base(entry);
    let (_, first_base_name) = first_base.split_once('/').unwrap();
    assert!(snapshots.get_opt(first_base_name).await.unwrap().is_some());

    // 64 KiB rewritten at 20 MiB: only around them is read.
    exec(
        &client,
        &ns.name,
        &pod,
        "dd if=/dev/urandom of=/dev/data bs=65536 seek=320 count=1 conv=notrunc,fsync 2>/dev/null",
    )
    .await;
    let changed_sum = exec_output(&client, &ns.name, &pod, "md5sum < /dev/data").await;
    let (ok, second, stderr) = backup("second");
    assert!(ok, "second backup: {stderr}");
    let entry = volume(&second, "data");
    let stats = &entry["stats"];
    assert_eq!(stats["bytesChanged"], 65536, "{entry}");
    // Re-cutting starts at the first chunk the change touches (up to 4 MiB
    // before it) and goes on until a new cut lands on a parent's cut, most
    // often within a chunk or two (up to 4 MiB each) after it; where depends
    // on the repository's random chunker seed. A quarter of the 64 MiB
    // device bounds that neighbourhood whatever the seed: 9.1 MiB were read
    // in one run.
    assert!(
        stats["bytesRead"].as_u64().unwrap() <= 16 << 20,
        "a 64 KiB change read {} bytes: {entry}",
        stats["bytesRead"]
    );
    assert!(stats["chunksDeduplicated"].as_u64().unwrap() > 0, "{entry}");
    let second_base = change_base(entry);
    assert_ne!(second_base, first_base);
    // Only the newest backup keeps a base: the first one's is released.
    base_released(&snapshots, first_base_name).await;
    // The kept base is Ferry's, not the application's: later backups
    // leave it out of the namespace's objects.
    let objects = &second["report"]["counts"];
    assert!(
        objects
            .get("snapshot.storage.k8s.io/VolumeSnapshot")
            .is_none(),
        "{objects}"
    );

    // What was read and what was taken over make the device as it was.
    let (clone, _clone_guard) = restore_clone(&repo, cluster, &ns.name, "second").await;
    let (_, restored) = app_output(&client, &clone, "tracked").await;
    assert!(restored.contains("FOUND"), "{restored}");
    let sum = |text: &str| {
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        sum(line(&restored, "SUM").trim_start_matches("SUM ")),
        sum(&changed_sum),
        "{restored}"
    );

    // A base that is gone (deleted by hand) costs reading every block
    // that holds data, said in the report, never a wrong backup.
    let (_, second_base_name) = second_base.split_once('/').unwrap();
    snapshots
        .delete(second_base_name, &DeleteParams::default())
        .await
        .unwrap();
    let contents = snapshot_api(&client, None, "VolumeSnapshotContent");
    let content = entry["changeBase"]["content"].as_str().unwrap().to_string();
    contents
        .patch(
            &content,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
        )
        .await
        .unwrap();
    let _ = contents.delete(&content, &DeleteParams::default()).await;
    eventually("the second base gone", Duration::from_secs(60), || async {
        contents
            .get_opt(&content)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let (ok, third, stderr) = backup("third");
    assert!(ok, "third backup: {stderr}");
    let entry = volume(&third, "data");
    assert!(
        entry["stats"]["bytesRead"].as_u64().unwrap() <= 24 << 20,
        "{entry}"
    );
    let warnings = third["report"]["warnings"].to_string();
    assert!(warnings.contains("base snapshot"), "{warnings}");
    let third_base = change_base(entry);
    // The third backup restores to the same bytes too.
    let third_clone = format!("{}-third", ns.name);
    let (clone3, _clone3_guard) =
        restore_clone_named(&repo, cluster, &ns.name, "third", &third_clone).await;
    let (_, restored3) = app_output(&client, &clone3, "tracked").await;
    assert_eq!(
        sum(line(&restored3, "SUM").trim_start_matches("SUM ")),
        sum(&changed_sum),
        "{restored3}"
    );

    // The claim made again (deleted, then restored): a new volume, which
    // the old volume's base says nothing about.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns.name);
    deployments
        .delete("tracked", &DeleteParams::default())
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    claims
        .delete("data", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the claim to be gone", POD_TIMEOUT, || async {
        matches!(claims.get_opt("data").await, Ok(None)).then_some(())
    })
    .await;
    let (ok, _, stderr) = repo.run(cluster, &["restore", "third"]);
    assert!(ok, "restore of third in place: {stderr}");
    let (_, again) = app_output(&client, &ns.name, "tracked").await;
    assert!(again.contains("FOUND"), "{again}");
    let (ok, fourth, stderr) = backup("fourth");
    assert!(ok, "fourth backup: {stderr}");
    let warnings = fourth["report"]["warnings"].to_string();
    assert!(warnings.contains("of another volume"), "{warnings}");
    assert!(
        volume(&fourth, "data")["stats"]["bytesRead"]
            .as_u64()
            .unwrap()
            <= 24 << 20,
        "the blocks in use are read: {fourth}"
    );
    // The fourth backup replaced the third's base.
    let (_, third_base_name) = third_base.split_once('/').unwrap();
    base_released(&snapshots, third_base_name).await;

    // Deleting the newest backup releases its base.
    let fourth_base = change_base(volume(&fourth, "data"));
    let (ok, out) = repo.plain(cluster, &["backup", "delete", "fourth"]);
    assert!(ok, "{out}");
    let (_, fourth_base_name) = fourth_base.split_once('/').unwrap();
    base_released(&snapshots, fourth_base_name).await;
    clean_up(&client, &[&ns.name, &clone, &clone3]).await;
}
