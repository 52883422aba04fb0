//! `ferry backup` against real clusters and MinIO.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim};
use kube::api::{Api, ListParams, PostParams};
use serde_json::Value;

use crate::support::{
    TestNamespace, apply_manifests, env, eventually, ferry, fresh_bucket, multitier_app,
    unique_name, with_s3,
};

/// Deploys the multi-tier app and waits until the controller-manager has
/// generated what a backup must leave out (ReplicaSets, Pods, StatefulSet
/// PVCs, the root CA ConfigMap).
async fn deploy_multitier(client: &kube::Client, prefix: &str) -> TestNamespace {
    let ns = TestNamespace::create(client, prefix).await;
    apply_manifests(client, &multitier_app(&ns.name)).await;
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "a ReplicaSet for deployment web",
        Duration::from_secs(30),
        || async { (!rs.list(&ListParams::default()).await.ok()?.items.is_empty()).then_some(()) },
    )
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "the StatefulSet's claim data-db-0",
        Duration::from_secs(30),
        || async { pvcs.get_opt("data-db-0").await.ok()?.map(|_| ()) },
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("kube-root-ca.crt", Duration::from_secs(30), || async {
        cms.get_opt("kube-root-ca.crt").await.ok()?.map(|_| ())
    })
    .await;
    ns
}

/// The objects the multi-tier app's snapshot must hold, exactly.
fn expected_objects(ns: &str) -> BTreeSet<String> {
    let namespaced = [
        "ServiceAccount/web",
        "Role/config-reader",
        "RoleBinding/web-config-reader",
        "RoleBinding/web-view",
        "ConfigMap/web-config",
        "ConfigMap/db-init",
        "Secret/db-credentials",
        "Secret/web-tls",
        "Secret/registry-pull",
        "Deployment/web",
        "PersistentVolumeClaim/uploads",
        "PersistentVolumeClaim/data-db-0",
        "StatefulSet/db",
        "Service/db",
        "Service/web",
        "Service/web-nodeport",
        "Service/web-public",
        "Ingress/web",
        "HorizontalPodAutoscaler/web",
        "PodDisruptionBudget/web",
        "NetworkPolicy/db-from-web",
        "CronJob/db-backup",
        "Widget/blue",
    ];
    let mut set: BTreeSet<String> = namespaced
        .iter()
        .map(|s| {
            let (kind, name) = s.split_once('/').unwrap();
            format!("{kind}/{ns}/{name}")
        })
        .collect();
    for cluster_scoped in [
        format!("Namespace/{ns}"),
        "CustomResourceDefinition/widgets.demo.ferry.dev".to_string(),
        format!("StorageClass/{ns}-fast"),
        format!("PriorityClass/{ns}-high"),
        format!("IngressClass/{ns}-nginx"),
        format!("ClusterRole/{ns}-node-reader"),
        format!("ClusterRoleBinding/{ns}-node-reader"),
    ] {
        set.insert(cluster_scoped);
    }
    set
}

fn init_repo(kubeconfig: &Path, repo: &str, s3: bool) {
    let mut cmd = ferry(kubeconfig);
    if s3 {
        with_s3(&mut cmd);
    }
    cmd.args(["repo", "init", "--repo", repo])
        .assert()
        .success();
}

fn backup(kubeconfig: &Path, repo: &str, s3: bool, name: &str, ns: &str) -> Value {
    let mut cmd = ferry(kubeconfig);
    if s3 {
        with_s3(&mut cmd);
    }
    let out = cmd
        .args([
            "backup", "create", name, "-n", ns, "--repo", repo, "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("backup -o json prints JSON")
}

fn describe(kubeconfig: &Path, repo: &str, s3: bool, name: &str) -> Value {
    let mut cmd = ferry(kubeconfig);
    if s3 {
        with_s3(&mut cmd);
    }
    let out = cmd
        .args(["backup", "describe", name, "--repo", repo, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "describe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn object_names(described: &Value) -> BTreeSet<String> {
    described["content"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| match o["namespace"].as_str() {
            Some(ns) => format!(
                "{}/{ns}/{}",
                o["kind"].as_str().unwrap(),
                o["name"].as_str().unwrap()
            ),
            None => format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["name"].as_str().unwrap()
            ),
        })
        .collect()
}

/// Reads one stored object back through the library.
async fn stored_object(repo_dir: &Path, snapshot: &str, object: &str) -> Value {
    let backend = std::sync::Arc::new(ferry::repo::LocalBackend::new(repo_dir.to_path_buf()));
    let key = ferry::repo::KeySource::Password("correct horse battery staple".to_string().into());
    let repo = ferry::repo::Repository::open(backend, &key).await.unwrap();
    let _lock = repo.lock_shared().await.unwrap();
    let (_, snap) = repo.find_snapshot(snapshot).await.unwrap();
    let content = ferry::backup::load_content(&repo, &snap).await.unwrap();
    let entry = content
        .objects
        .iter()
        .find(|e| e.object.to_string() == object)
        .unwrap_or_else(|| panic!("{object} is not in snapshot {snapshot}"));
    serde_json::from_slice(&repo.read_blob(&entry.blob).await.unwrap()).unwrap()
}

fn has_edge(graph: &Value, from: &str, to: &str, kind: &str) -> bool {
    let nodes: Vec<String> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let r = n.get("object").unwrap_or(n);
            match r["namespace"].as_str() {
                Some(ns) => format!(
                    "{}/{ns}/{}",
                    r["kind"].as_str().unwrap(),
                    r["name"].as_str().unwrap()
                ),
                None => format!(
                    "{}/{}",
                    r["kind"].as_str().unwrap(),
                    r["name"].as_str().unwrap()
                ),
            }
        })
        .collect();
    graph["edges"].as_array().unwrap().iter().any(|e| {
        let f = e["from"].as_u64().unwrap() as usize;
        let t = e["to"].as_u64().unwrap() as usize;
        nodes[f] == from && nodes[t] == to && e["kind"] == kind
    })
}

#[tokio::test]
async fn multitier_app_is_captured_as_a_normalized_graph_in_a_local_repository() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = deploy_multitier(&client, "t-bk").await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    init_repo(&cluster.kubeconfig, repo, false);
    let result = backup(&cluster.kubeconfig, repo, false, "shop", &ns.name);
    let report = &result["report"];

    let described = describe(&cluster.kubeconfig, repo, false, "shop");
    let got = object_names(&described);
    let want = expected_objects(&ns.name);
    assert_eq!(
        got,
        want,
        "\nunexpected: {:?}\nmissing: {:?}",
        got.difference(&want).collect::<Vec<_>>(),
        want.difference(&got).collect::<Vec<_>>()
    );

    // Skipped with reasons: the controller-owned ReplicaSet and Pods, the root CA.
    let skipped: Vec<String> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["object"].as_str().unwrap().to_string())
        .collect();
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with(&format!("ReplicaSet/{}/web-", ns.name))),
        "{skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|s| s.starts_with(&format!("Pod/{}/web-", ns.name))),
        "{skipped:?}"
    );
    assert!(
        skipped.contains(&format!("ConfigMap/{}/kube-root-ca.crt", ns.name)),
        "{skipped:?}"
    );
    assert!(
        report["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["reason"].as_str().unwrap().is_empty())
    );
    // The bootstrap 'view' ClusterRole is a dependency every cluster provides.
    let provided = report["providedByCluster"].to_string();
    assert!(provided.contains("ClusterRole/view"), "{provided}");
    assert!(
        report["forbidden"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(report["counts"]["apps/Deployment"], 1);
    assert_eq!(report["counts"]["Service"], 4);

    // Normalized as the table says.
    let dir_path = dir.path().join("repo");
    let web = stored_object(&dir_path, "shop", &format!("Deployment/{}/web", ns.name)).await;
    assert!(web.get("status").is_none());
    for field in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
    ] {
        assert!(
            web["metadata"].get(field).is_none(),
            "metadata.{field} must be stripped: {web}"
        );
    }
    assert!(
        web["metadata"]["annotations"]
            .get("deployment.kubernetes.io/revision")
            .is_none()
    );
    assert_eq!(
        web["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );
    let svc = stored_object(&dir_path, "shop", &format!("Service/{}/web", ns.name)).await;
    assert!(
        svc["spec"].get("clusterIP").is_none() && svc["spec"].get("clusterIPs").is_none(),
        "{svc}"
    );
    let headless = stored_object(&dir_path, "shop", &format!("Service/{}/db", ns.name)).await;
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "headless services stay headless"
    );
    let node_port = stored_object(
        &dir_path,
        "shop",
        &format!("Service/{}/web-nodeport", ns.name),
    )
    .await;
    assert!(
        node_port["spec"]["ports"][0].get("nodePort").is_none(),
        "allocated nodePort stripped: {node_port}"
    );
    let secret = stored_object(
        &dir_path,
        "shop",
        &format!("Secret/{}/db-credentials", ns.name),
    )
    .await;
    assert!(secret["data"]["password"].is_string());
    let namespace = stored_object(&dir_path, "shop", &format!("Namespace/{}", ns.name)).await;
    assert!(
        namespace
            .get("spec")
            .and_then(|s| s.get("finalizers"))
            .is_none()
    );

    // Typed edges.
    let graph = described["content"]["graph"].clone();
    let n = &ns.name;
    let edges = [
        (
            format!("Deployment/{n}/web"),
            format!("ConfigMap/{n}/web-config"),
            "mounts",
        ),
        (
            format!("Deployment/{n}/web"),
            format!("PersistentVolumeClaim/{n}/uploads"),
            "mounts",
        ),
        (
            format!("Deployment/{n}/web"),
            format!("Secret/{n}/db-credentials"),
            "env",
        ),
        (
            format!("Deployment/{n}/web"),
            format!("ServiceAccount/{n}/web"),
            "uses-service-account",
        ),
        (
            format!("Deployment/{n}/web"),
            format!("Secret/{n}/registry-pull"),
            "pulls-with",
        ),
        (
            format!("Deployment/{n}/web"),
            format!("PriorityClass/{n}-high"),
            "scheduled-with",
        ),
        (
            format!("RoleBinding/{n}/web-config-reader"),
            format!("Role/{n}/config-reader"),
            "binds",
        ),
        (
            format!("RoleBinding/{n}/web-config-reader"),
            format!("ServiceAccount/{n}/web"),
            "binds",
        ),
        (
            format!("ClusterRoleBinding/{n}-node-reader"),
            format!("ClusterRole/{n}-node-reader"),
            "binds",
        ),
        (
            format!("PersistentVolumeClaim/{n}/uploads"),
            format!("StorageClass/{n}-fast"),
            "claims",
        ),
        (
            format!("StatefulSet/{n}/db"),
            format!("StorageClass/{n}-fast"),
            "claims",
        ),
        (
            format!("Service/{n}/web"),
            format!("Deployment/{n}/web"),
            "selects",
        ),
        (
            format!("HorizontalPodAutoscaler/{n}/web"),
            format!("Deployment/{n}/web"),
            "selects",
        ),
        (
            format!("Ingress/{n}/web"),
            format!("Service/{n}/web"),
            "routes",
        ),
        (
            format!("Ingress/{n}/web"),
            format!("Secret/{n}/web-tls"),
            "routes",
        ),
        (
            format!("Ingress/{n}/web"),
            format!("IngressClass/{n}-nginx"),
            "routes",
        ),
        (
            format!("Widget/{n}/blue"),
            "CustomResourceDefinition/widgets.demo.ferry.dev".into(),
            "instance-of",
        ),
    ];
    for (from, to, kind) in edges {
        assert!(
            has_edge(&graph, &from, &to, kind),
            "missing edge {from} -[{kind}]-> {to}"
        );
    }

    // The graph renders as DOT.
    let dot = ferry(&cluster.kubeconfig)
        .args(["backup", "graph", "shop", "--repo", repo])
        .output()
        .unwrap();
    assert!(dot.status.success());
    let dot = String::from_utf8(dot.stdout).unwrap();
    assert!(dot.starts_with("digraph"), "{dot}");
}

#[tokio::test]
async fn repo_init_creates_a_missing_bucket_only_when_asked() {
    let cluster = env().primary();
    let bucket = unique_name("t-mkbucket");
    let init = |prefix: &str, create: bool| {
        let mut cmd = ferry(&cluster.kubeconfig);
        with_s3(&mut cmd);
        cmd.args(["repo", "init", "--repo", &format!("s3://{bucket}/{prefix}")]);
        if create {
            cmd.arg("--create-bucket");
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = init("one", false);
    assert!(!ok, "a missing bucket is an error without --create-bucket");
    assert!(
        stderr.contains("does not exist") && stderr.contains("--create-bucket"),
        "{stderr}"
    );
    let (ok, stderr) = init("one", true);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("created bucket {bucket}")),
        "{stderr}"
    );
    // The bucket is there now: a second repository in it needs no creation.
    let (ok, stderr) = init("two", true);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("created bucket"), "{stderr}");
    for prefix in ["one", "two"] {
        let mut stats = ferry(&cluster.kubeconfig);
        with_s3(&mut stats);
        stats
            .args([
                "repo",
                "stats",
                "--repo",
                &format!("s3://{bucket}/{prefix}"),
            ])
            .assert()
            .success();
    }
    // A local directory has no bucket.
    let dir = tempfile::tempdir().unwrap();
    let mut local = ferry(&cluster.kubeconfig);
    let out = local
        .args(["repo", "init", "--create-bucket", "--repo"])
        .arg(dir.path().join("repo"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--create-bucket is for s3://"),
        "{out:?}"
    );
}

#[tokio::test]
async fn multitier_app_backs_up_to_minio_and_an_unchanged_rebackup_stores_almost_nothing() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = deploy_multitier(&client, "t-bks3").await;
    let bucket = fresh_bucket("t-bks3").await;
    let repo = format!("s3://{bucket}/team/prod");
    // The other repositories of these tests take this CPU's preferred
    // cipher (XAES-256-GCM on x86-64); this one XChaCha20-Poly1305.
    let mut init = ferry(&cluster.kubeconfig);
    with_s3(&mut init);
    init.args([
        "repo",
        "init",
        "--repo",
        &repo,
        "--cipher",
        "xchacha20-poly1305",
    ])
    .assert()
    .success();
    let mut stats = ferry(&cluster.kubeconfig);
    with_s3(&mut stats);
    let stats = stats
        .args(["repo", "stats", "--repo", &repo, "-o", "json"])
        .output()
        .unwrap();
    assert!(stats.status.success(), "{stats:?}");
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["cipher"], "xchacha20-poly1305", "{stats}");
    let first = backup(&cluster.kubeconfig, &repo, true, "first", &ns.name);
    let described = describe(&cluster.kubeconfig, &repo, true, "first");
    assert_eq!(object_names(&described), expected_objects(&ns.name));

    let second = backup(&cluster.kubeconfig, &repo, true, "second", &ns.name);
    let s1 = &first["report"]["stats"];
    let s2 = &second["report"]["stats"];
    let objects = s1["objects"].as_u64().unwrap();
    assert_eq!(s2["objects"].as_u64().unwrap(), objects);
    // No object is stored again. Only the snapshot's root is always new;
    // the cluster profile (and with it at most the catalog and graph) may
    // change too while tests running in parallel add cluster-scoped classes.
    assert!(
        s2["blobsAdded"].as_u64().unwrap() <= 4,
        "second backup added blobs: {s2}"
    );
    assert!(s2["blobsDeduplicated"].as_u64().unwrap() >= objects, "{s2}");
    let (b1, b2) = (
        s1["bytesStored"].as_u64().unwrap(),
        s2["bytesStored"].as_u64().unwrap(),
    );
    eprintln!("first backup stored {b1} bytes, unchanged re-backup {b2} bytes");
    assert!(
        b2 * 4 < b1,
        "an unchanged re-backup stored {b2} bytes against {b1} for the first"
    );

    let listed = with_s3(&mut ferry(&cluster.kubeconfig))
        .args(["backup", "list", "--repo", &repo, "-o", "json"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    // The store holds packs, not one object per Kubernetes object.
    let s3 = crate::support::s3_client().await;
    let keys = s3
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("team/prod/data/")
        .send()
        .await
        .unwrap();
    assert!(
        keys.key_count().unwrap_or(0) <= 4,
        "{objects} objects took {:?} packs",
        keys.key_count()
    );
}

#[tokio::test]
async fn a_flipped_byte_fails_verify_naming_the_object_and_a_wrong_password_fails_cleanly() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-bkv").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..5 {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("settings-{i}")},
            "data": {"payload": "x".repeat(2000 + i)}
        }))
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = repo_path.to_str().unwrap();
    init_repo(&cluster.kubeconfig, repo, false);
    backup(&cluster.kubeconfig, repo, false, "v", &ns.name);
    ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "--repo", repo, "--read-data"])
        .assert()
        .success();

    // Wrong password: one clear error, nothing written.
    let before = list_files(&repo_path);
    let out = ferry(&cluster.kubeconfig)
        .env("FERRY_PASSWORD", "not the password")
        .args(["backup", "list", "--repo", repo])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong password"), "{stderr}");
    assert_eq!(
        list_files(&repo_path),
        before,
        "a wrong password must write nothing"
    );

    // Flip one byte early in the pack: inside the first blob.
    let pack = before
        .iter()
        .find(|p| p.contains("/data/"))
        .expect("a pack")
        .clone();
    let path = repo_path.join(pack.trim_start_matches('/'));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "--repo", repo, "--read-data"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify must fail on a damaged pack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("/{}/", ns.name)) || stdout.contains("snapshot v"),
        "verify must name the damaged object: {stdout}"
    );
    // Reading the snapshot's objects refuses the damaged data too.
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "v", "--repo", repo])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn list_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                out.push(
                    entry
                        .path()
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out.into_iter().map(|p| format!("/{p}")).collect()
}

#[tokio::test]
async fn edit_only_user_backs_up_its_namespace_and_is_told_what_it_could_not_read() {
    let cluster = env().primary();
    let admin = cluster.client().await;
    let ns = deploy_multitier(&admin, "t-bkrbac").await;
    // user-1 gets nothing but 'edit' in this namespace.
    crate::support::grant_edit(&admin, &ns.name, "user-1").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = cluster.kubeconfig_for("user-1", dir.path());
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    init_repo(&kubeconfig, repo, false);
    let out = ferry(&kubeconfig)
        .args([
            "backup", "create", "mine", "-n", &ns.name, "--repo", repo, "-o", "json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a partial backup exits 3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let forbidden = result["report"]["forbidden"].to_string();
    assert!(
        forbidden.contains(&format!(
            "roles.rbac.authorization.k8s.io in namespace {}",
            ns.name
        )),
        "{forbidden}"
    );
    // 'edit' grants nothing on custom resources: the Widget is reported, not silently missing.
    assert!(
        forbidden.contains(&format!("widgets.demo.ferry.dev in namespace {}", ns.name)),
        "{forbidden}"
    );
    assert!(
        forbidden.contains(&format!(
            "rolebindings.rbac.authorization.k8s.io in namespace {}",
            ns.name
        )),
        "{forbidden}"
    );
    let got = object_names(&describe(&kubeconfig, repo, false, "mine"));
    for readable in [
        "Deployment/web",
        "StatefulSet/db",
        "ConfigMap/web-config",
        "Secret/db-credentials",
        "Ingress/web",
    ] {
        let (kind, name) = readable.split_once('/').unwrap();
        assert!(
            got.contains(&format!("{kind}/{}/{name}", ns.name)),
            "{readable} missing from {got:?}"
        );
    }
    assert!(
        !got.iter()
            .any(|o| o.starts_with("Role/") || o.starts_with("RoleBinding/"))
    );
    let listed = ferry(&kubeconfig)
        .args(["backup", "list", "--repo", repo])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("partial"),
        "the listing marks the backup partial"
    );
}

#[tokio::test]
async fn a_backup_killed_midway_leaves_a_valid_repository_and_the_next_backup_works() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-bkkill").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..300 {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("c-{i:04}")},
            "data": {"v": format!("{i}").repeat(500)}
        }))
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = repo_path.to_str().unwrap();
    init_repo(&cluster.kubeconfig, repo, false);

    let bin = assert_cmd::cargo::cargo_bin("ferry");
    let mut child = std::process::Command::new(bin)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("FERRY_PASSWORD", "correct horse battery staple")
        .args([
            "backup",
            "create",
            "killed",
            "-n",
            &ns.name,
            "--repo",
            repo,
            "--page-size",
            "5",
            "--concurrency",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it holds its lock, i.e. while it is working.
    eventually(
        "the backup to take its lock",
        Duration::from_secs(30),
        || async {
            std::fs::read_dir(repo_path.join("locks"))
                .ok()?
                .next()
                .map(|_| ())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let listed = ferry(&cluster.kubeconfig)
        .args(["backup", "list", "--repo", repo, "-o", "json"])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    for snap in listed.as_array().unwrap() {
        // Either it finished before the kill, complete, or it left nothing.
        assert_eq!(snap["summary"]["objects"].as_u64(), Some(301));
    }
    ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "--repo", repo, "--read-data"])
        .assert()
        .success();
    let next = backup(&cluster.kubeconfig, repo, false, "after-kill", &ns.name);
    assert_eq!(next["report"]["stats"]["objects"].as_u64(), Some(301));
    ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "--repo", repo, "--read-data"])
        .assert()
        .success();
    ferry(&cluster.kubeconfig)
        .args(["backup", "prune", "--repo", repo])
        .assert()
        .success();
    ferry(&cluster.kubeconfig)
        .args(["backup", "verify", "after-kill", "--repo", repo])
        .assert()
        .success();
}

#[tokio::test]
async fn unreachable_cluster_and_rejected_credentials_fail_cleanly_and_write_nothing() {
    let cluster = env().primary();
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let repo = repo_path.to_str().unwrap();
    init_repo(&cluster.kubeconfig, repo, false);
    let before = list_files(&repo_path);

    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let unreachable = dir.path().join("unreachable.kubeconfig");
    std::fs::write(
        &unreachable,
        text.replace(&cluster.server, &format!("https://127.0.0.1:{closed}")),
    )
    .unwrap();
    let out = ferry(&unreachable)
        .args(["backup", "create", "x", "-n", "default", "--repo", repo])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "one clear error: {stderr}"
    );

    // An expired or revoked token.
    let expired = dir.path().join("expired.kubeconfig");
    std::fs::write(
        &expired,
        text.replace(&cluster.admin_token, "expired-token-0000"),
    )
    .unwrap();
    let out = ferry(&expired)
        .args(["backup", "create", "x", "-n", "default", "--repo", repo])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused our credentials"), "{stderr}");

    assert_eq!(
        list_files(&repo_path),
        before,
        "failed backups must write nothing"
    );
}

#[tokio::test]
async fn a_backup_that_selects_nothing_fails_unless_allowed() {
    let cluster = env().primary();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").to_str().unwrap().to_string();
    init_repo(&cluster.kubeconfig, &repo, false);
    let missing = crate::support::unique_name("t-bkempty");
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "create", "typo", "-n", &missing, "--repo", &repo])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("matches no object"), "{stderr}");
    assert!(stderr.contains(&missing), "names the namespace: {stderr}");
    assert!(stderr.contains("--allow-empty"), "{stderr}");
    let list = |repo: &str| -> Value {
        let out = ferry(&cluster.kubeconfig)
            .args(["backup", "list", "--repo", repo, "-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(
        list(&repo),
        serde_json::json!([]),
        "no snapshot was written"
    );

    ferry(&cluster.kubeconfig)
        .args([
            "backup",
            "create",
            "empty",
            "-n",
            &missing,
            "--repo",
            &repo,
            "--allow-empty",
        ])
        .assert()
        .success();
    assert_eq!(list(&repo)[0]["summary"]["objects"], 0);
}

#[tokio::test]
async fn an_empty_password_creates_no_repository() {
    let cluster = env().primary();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let out = ferry(&cluster.kubeconfig)
        .env("FERRY_PASSWORD", "")
        .args(["repo", "init", "--repo", repo.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("FERRY_PASSWORD is set but empty"),
        "{stderr}"
    );
    assert!(!repo.exists(), "nothing was created");
}
