//! `ferry restore` and `ferry migrate` against real clusters.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::Value;

use crate::support::{
    TestNamespace, apply_manifests, env, eventually, ferry, live, multitier_app, unique_name,
};

const PASSWORD: &str = "correct horse battery staple";

async fn open_repo(dir: &Path) -> ferry::repo::Repository {
    let backend = std::sync::Arc::new(ferry::repo::LocalBackend::new(dir.to_path_buf()));
    let key = ferry::repo::KeySource::Password(PASSWORD.to_string().into());
    ferry::repo::Repository::open(backend, &key).await.unwrap()
}

/// Every stored object of a snapshot.
async fn snapshot_objects(dir: &Path, snapshot: &str) -> Vec<(ferry::model::ObjectRef, Value)> {
    let repo = open_repo(dir).await;
    let _lock = repo.lock_shared().await.unwrap();
    let (_, snap) = repo.find_snapshot(snapshot).await.unwrap();
    let content = ferry::backup::load_content(&repo, &snap).await.unwrap();
    let mut out = Vec::new();
    for entry in content.objects {
        let value = serde_json::from_slice(&repo.read_blob(&entry.blob).await.unwrap()).unwrap();
        out.push((entry.object, value));
    }
    out
}

/// Deploys the app in A, with one object owned by the Deployment, and backs it up.
async fn backed_up_app(prefix: &str, dir: &Path) -> (TestNamespace, String) {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, prefix).await;
    apply_manifests(&client, &multitier_app(&ns.name)).await;
    let web = Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .get("web")
        .await
        .unwrap();
    let owned: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-owned", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": web.metadata.uid.unwrap()}]},
        "data": {"k": "v"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();
    let repo = dir.join("repo");
    let repo = repo.to_str().unwrap().to_string();
    ferry(&cluster.kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "create", "app", "-n", &ns.name, "--repo", &repo])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (ns, repo)
}

fn restore_json(kubeconfig: &Path, args: &[&str]) -> (bool, Value, String) {
    let mut all = vec!["restore"];
    all.extend_from_slice(args);
    crate::support::run_json(kubeconfig, &all)
}

fn names(report: &Value, key: &str) -> BTreeSet<String> {
    report[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn app_backed_up_in_one_cluster_is_restored_into_another_and_reruns_are_no_ops() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, repo) = backed_up_app("t-rsx", dir.path()).await;
    let target = env().secondary();
    let client = target.client().await;
    let (ok, result, stderr) = restore_json(&target.kubeconfig, &["app", "--repo", &repo]);
    assert!(ok, "restore failed: {stderr}\n{result}");
    let report = &result["report"];
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");

    // Every object exists in B and carries every field of the normalized backup.
    let stored = snapshot_objects(Path::new(&repo), "app").await;
    let web_uid = live(
        &client,
        &stored
            .iter()
            .find(|(o, _)| o.kind == "Deployment")
            .unwrap()
            .0,
    )
    .await
    .unwrap()["metadata"]["uid"]
        .clone();
    for (object, mut value) in stored.clone() {
        let got = live(&client, &object)
            .await
            .unwrap_or_else(|| panic!("{object} was not restored"));
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("ownerReferences");
        }
        let changes = ferry::restore::diff::changes(&value, &got);
        assert!(
            changes.is_empty(),
            "{object} differs from the backup: {changes:?}"
        );
    }
    // The owned ConfigMap points at the new Deployment's UID.
    let owned = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("web-owned")
        .await
        .unwrap();
    let owner = &owned.metadata.owner_references.unwrap()[0];
    assert_eq!(
        Value::String(owner.uid.clone()),
        web_uid,
        "owner reference re-pointed at the live UID"
    );
    // The controller-manager of B takes over: ReplicaSets for the Deployment.
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "B's deployment controller to create a ReplicaSet",
        Duration::from_secs(30),
        || async { (!rs.list(&ListParams::default()).await.ok()?.items.is_empty()).then_some(()) },
    )
    .await;
    // The custom resource came with its CRD, in one command.
    assert!(names(report, "created").contains(&format!("Widget/{}/blue", ns.name)));

    // Running it again changes nothing.
    let (ok, again, stderr) = restore_json(&target.kubeconfig, &["app", "--repo", &repo]);
    assert!(ok, "{stderr}");
    let again = &again["report"];
    assert!(
        names(again, "created").is_empty() && names(again, "updated").is_empty(),
        "second run must be a no-op: {again}"
    );
    assert_eq!(names(again, "unchanged").len(), stored.len());
    Api::<Namespace>::all(client)
        .delete(&ns.name, &DeleteParams::background())
        .await
        .ok();
}

#[tokio::test]
async fn same_cluster_restore_after_namespace_deletion_and_namespace_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, repo) = backed_up_app("t-rss", dir.path()).await;
    let cluster = env().primary();
    let client = cluster.client().await;

    // Into a new namespace on the same cluster: every namespaced reference follows.
    let staging = unique_name("t-rss-staging");
    let mapping = format!("{}={staging}", ns.name);
    let (ok, result, stderr) = restore_json(
        &cluster.kubeconfig,
        &["app", "--repo", &repo, "--namespace-mapping", &mapping],
    );
    assert!(ok, "{stderr}\n{result}");
    let _staging_ns = TestNamespace::adopt(&client, &staging);
    let rb: Value = live(
        &client,
        &ferry::model::ObjectRef {
            group: "rbac.authorization.k8s.io".into(),
            version: "v1".into(),
            kind: "RoleBinding".into(),
            namespace: Some(staging.clone()),
            name: "web-config-reader".into(),
        },
    )
    .await
    .expect("the RoleBinding is in the mapped namespace");
    assert_eq!(rb["subjects"][0]["namespace"], staging.as_str());
    let crb_named = |name: String| ferry::model::ObjectRef {
        group: "rbac.authorization.k8s.io".into(),
        version: "v1".into(),
        kind: "ClusterRoleBinding".into(),
        namespace: None,
        name,
    };
    let subjects_of = |crb: &Value| -> Vec<String> {
        crb["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["namespace"].as_str().unwrap().to_string())
            .collect()
    };
    let copy = live(&client, &crb_named(format!("{staging}-node-reader")))
        .await
        .expect("a copy of the cluster role binding, named for the new namespace");
    assert_eq!(
        subjects_of(&copy),
        vec![staging.clone()],
        "the copy grants to the mapped namespace"
    );
    let original = live(&client, &crb_named(format!("{}-node-reader", ns.name)))
        .await
        .unwrap();
    assert_eq!(
        subjects_of(&original),
        vec![ns.name.clone()],
        "the original namespace keeps its binding"
    );
    // The copy is cluster-scoped: remove it with the test.
    let crbs: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> = Api::all(client.clone());
    crbs.delete(&format!("{staging}-node-reader"), &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        live(
            &client,
            &ferry::model::ObjectRef {
                group: "".into(),
                version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: Some(staging.clone()),
                name: "web-config".into()
            }
        )
        .await
        .is_some()
    );

    // Delete the original namespace, restore it in place.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the namespace to be gone",
        Duration::from_secs(90),
        || async { matches!(namespaces.get_opt(&ns.name).await, Ok(None)).then_some(()) },
    )
    .await;
    let (ok, result, stderr) = restore_json(
        &cluster.kubeconfig,
        &["app", "--repo", &repo, "-n", &ns.name],
    );
    assert!(ok, "{stderr}\n{result}");
    assert!(names(&result["report"], "created").contains(&format!("Deployment/{}/web", ns.name)));
    let (ok, again, _) = restore_json(
        &cluster.kubeconfig,
        &["app", "--repo", &repo, "-n", &ns.name],
    );
    assert!(ok);
    assert!(
        names(&again["report"], "created").is_empty()
            && names(&again["report"], "updated").is_empty(),
        "{again}"
    );
}

#[tokio::test]
async fn an_interrupted_restore_converges_when_run_again() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-rsk").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..200 {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": format!("c-{i:03}")}, "data": {"i": i.to_string()}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    ferry(&cluster.kubeconfig)
        .args(["repo", "init", "--repo", repo])
        .assert()
        .success();
    ferry(&cluster.kubeconfig)
        .args(["backup", "create", "cms", "-n", &ns.name, "--repo", repo])
        .assert()
        .success();

    let target = env().secondary();
    let target_client = target.client().await;
    let bin = assert_cmd::cargo::cargo_bin("ferry");
    let mut child = std::process::Command::new(bin)
        .env("KUBECONFIG", &target.kubeconfig)
        .env("FERRY_PASSWORD", PASSWORD)
        .args([
            "restore",
            "cms",
            "--repo",
            repo,
            "--restore-concurrency",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target_cms: Api<ConfigMap> = Api::namespaced(target_client.clone(), &ns.name);
    eventually(
        "the restore to have written some objects",
        Duration::from_secs(60),
        || async {
            (target_cms
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .len()
                >= 20)
                .then_some(())
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = target_cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    let (ok, result, stderr) = restore_json(&target.kubeconfig, &["cms", "--repo", repo]);
    assert!(ok, "{stderr}");
    let report = &result["report"];
    assert!(report["failed"].as_array().unwrap().is_empty());
    let restored: BTreeSet<String> = target_cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    for i in 0..200 {
        assert!(
            restored.contains(&format!("c-{i:03}")),
            "c-{i:03} missing after the rerun"
        );
    }
    eprintln!(
        "killed after {partial} ConfigMaps; the rerun created {} and found {} unchanged",
        names(report, "created").len(),
        names(report, "unchanged").len()
    );
    assert!(
        !names(report, "unchanged").is_empty(),
        "what the first run wrote is recognised"
    );
    Api::<Namespace>::all(target_client)
        .delete(&ns.name, &DeleteParams::background())
        .await
        .ok();
}

#[tokio::test]
async fn preflight_failures_are_reported_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, repo) = backed_up_app("t-rsp", dir.path()).await;
    let target = env().secondary();
    let client = target.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());

    // A storage class missing on the target (left out of the restore).
    let (ok, _, stderr) = restore_json(
        &target.kubeconfig,
        &[
            "app",
            "--repo",
            &repo,
            "--exclude-kind",
            "storageclasses,priorityclasses",
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "storage class {}-fast is missing on the target",
            ns.name
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("priority class {}-high is missing", ns.name)),
        "every problem at once: {stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(
        namespaces.get_opt(&ns.name).await.unwrap().is_none(),
        "the target is unchanged"
    );

    // A user without rights on the target.
    let dir2 = tempfile::tempdir().unwrap();
    let nobody = target.kubeconfig_for("user-2", dir2.path());
    let (ok, _, stderr) = restore_json(&nobody, &["app", "--repo", &repo]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "not allowed to create deployments.apps in namespace {}",
            ns.name
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "not allowed to create customresourcedefinitions.apiextensions.k8s.io (cluster-wide)"
        ),
        "{stderr}"
    );
    assert!(
        namespaces.get_opt(&ns.name).await.unwrap().is_none(),
        "the target is unchanged"
    );

    // --existing fail with objects present.
    let (ok, _, stderr) = restore_json(
        &env().primary().kubeconfig,
        &["app", "--repo", &repo, "--existing", "fail"],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "Deployment/{}/web already exists in the target",
            ns.name
        )),
        "{stderr}"
    );
}

fn gizmo_crd(group: &str, version: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: gizmos.{group}}}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: gizmos, singular: gizmo, kind: Gizmo}}\n  versions:\n  - name: {version}\n    served: true\n    storage: true\n    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n"
    )
}

#[tokio::test]
async fn an_api_version_the_target_does_not_serve_fails_preflight() {
    let source = env().primary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-rsv").await;
    let group = format!("{}.ferry.dev", ns.name);
    apply_manifests(&client, &gizmo_crd(&group, "v1")).await;
    apply_manifests(&client, &format!("apiVersion: {group}/v1\nkind: Gizmo\nmetadata: {{name: g, namespace: {}}}\nspec: {{size: 1}}\n", ns.name)).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    ferry(&source.kubeconfig)
        .args(["repo", "init", "--repo", repo])
        .assert()
        .success();
    ferry(&source.kubeconfig)
        .args(["backup", "create", "gizmos", "-n", &ns.name, "--repo", repo])
        .assert()
        .success();

    // The target's CRD serves only v2.
    let target = env().secondary();
    let target_client = target.client().await;
    apply_manifests(&target_client, &gizmo_crd(&group, "v2")).await;
    let (ok, _, stderr) = restore_json(
        &target.kubeconfig,
        &[
            "gizmos",
            "--repo",
            repo,
            "--exclude-kind",
            "customresourcedefinitions",
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "Gizmo/{}/g: the target does not serve {group}/v1 (it serves {group}/v2)",
            ns.name
        )),
        "{stderr}"
    );
    let namespaces: Api<Namespace> = Api::all(target_client);
    assert!(
        namespaces.get_opt(&ns.name).await.unwrap().is_none(),
        "the target is unchanged"
    );
}

#[tokio::test]
async fn kinds_served_only_at_a_non_preferred_version_are_discovered() {
    let profile = |kubeconfig: &Path| -> Value {
        let out = ferry(kubeconfig)
            .args(["cluster", "profile", "-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let old = profile(&env().old().kubeconfig);
    let new = profile(&env().primary().kubeconfig);
    let served = |p: &Value, k: &str| p["servedKinds"].as_array().unwrap().iter().any(|v| v == k);
    // policy's preferred version in v1.24 is v1, which has no PodSecurityPolicy.
    assert!(served(&old, "policy/v1beta1/PodSecurityPolicy"));
    assert!(served(&old, "batch/v1beta1/CronJob") && served(&old, "batch/v1/CronJob"));
    assert!(!served(&new, "policy/v1beta1/PodSecurityPolicy"));
    assert_eq!(old["minor"], 24);
    assert_eq!(new["version"], env().primary().version.as_str());
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_a_diff_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, repo) = backed_up_app("t-rsd", dir.path()).await;
    let cluster = env().primary();
    let client = cluster.client().await;
    // Change something the restore would put back.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let mut cm = cms.get("web-config").await.unwrap();
    cm.data
        .as_mut()
        .unwrap()
        .insert("DATABASE_HOST".into(), "elsewhere".into());
    cms.replace("web-config", &PostParams::default(), &cm)
        .await
        .unwrap();
    let out = ferry(&cluster.kubeconfig)
        .args(["restore", "app", "--repo", &repo, "--dry-run"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Wave 1"), "{text}");
    assert!(
        text.contains(&format!("update     ConfigMap/{}/web-config", ns.name)),
        "{text}"
    );
    assert!(
        text.contains("data.DATABASE_HOST: \"elsewhere\" →"),
        "{text}"
    );
    assert!(
        text.contains(&format!("unchanged  Deployment/{}/web", ns.name)),
        "{text}"
    );
    assert_eq!(
        cms.get("web-config").await.unwrap().data.unwrap()["DATABASE_HOST"],
        "elsewhere",
        "a dry run writes nothing"
    );
    // JSON plan: waves in dependency order.
    let (ok, plan, _) = restore_json(&cluster.kubeconfig, &["app", "--repo", &repo, "--dry-run"]);
    assert!(ok);
    let waves = plan["plan"]["waves"].as_array().unwrap();
    let wave_of = |kind: &str| {
        waves
            .iter()
            .position(|w| {
                w["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["object"]["kind"] == kind)
            })
            .unwrap()
    };
    assert!(wave_of("Namespace") < wave_of("ConfigMap"));
    assert!(wave_of("CustomResourceDefinition") < wave_of("Widget"));
    assert!(wave_of("ConfigMap") < wave_of("Deployment"));
    assert!(wave_of("Deployment") < wave_of("HorizontalPodAutoscaler"));
}

#[tokio::test]
async fn migrate_moves_an_application_between_clusters_in_one_command() {
    let source = env().primary();
    let target = env().secondary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-mig").await;
    apply_manifests(&client, &multitier_app(&ns.name)).await;
    // Both clusters' kubeconfigs, merged as kubectl does.
    let kubeconfig = std::env::join_paths([&source.kubeconfig, &target.kubeconfig]).unwrap();
    let out = ferry(&source.kubeconfig)
        .env("KUBECONFIG", &kubeconfig)
        .args([
            "migrate", "--from", "a-admin", "--to", "b-admin", "-n", &ns.name,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let target_client = target.client().await;
    let deployments: Api<Deployment> = Api::namespaced(target_client.clone(), &ns.name);
    assert!(deployments.get_opt("web").await.unwrap().is_some());
    Api::<Namespace>::all(target_client)
        .delete(&ns.name, &DeleteParams::background())
        .await
        .ok();
}

/// Ferry creates objects with plain creates; a later restore of a newer
/// snapshot still owns every field it set, so a field the newer snapshot
/// no longer has is removed, as with server-side apply throughout.
#[tokio::test]
async fn a_field_dropped_from_a_newer_backup_is_removed_by_the_next_restore() {
    let dir = tempfile::tempdir().unwrap();
    let source = env().primary();
    let source_client = source.client().await;
    let ns = TestNamespace::create(&source_client, "t-rsdrop").await;
    let settings = |data: Value, labels: Value| -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "settings", "labels": labels}, "data": data
        }))
        .unwrap()
    };
    let configmaps = Api::<ConfigMap>::namespaced(source_client.clone(), &ns.name);
    configmaps
        .create(
            &PostParams::default(),
            &settings(
                serde_json::json!({"a": "1", "b": "2"}),
                serde_json::json!({"tier": "gold"}),
            ),
        )
        .await
        .unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap().to_string();
    ferry(&source.kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    let backup = |name: &str| {
        ferry(&source.kubeconfig)
            .args(["backup", "create", name, "-n", &ns.name, "--repo", &repo])
            .assert()
            .success();
    };
    backup("v1");
    let target = env().secondary();
    let (ok, first, stderr) = restore_json(&target.kubeconfig, &["v1", "--repo", &repo]);
    assert!(ok, "{stderr}\n{first}");
    assert!(
        names(&first["report"], "created").contains(&format!("ConfigMap/{}/settings", ns.name))
    );

    // The application changes a key and drops a key and a label; the next
    // backup has neither of those two.
    configmaps
        .delete("settings", &DeleteParams::default())
        .await
        .unwrap();
    configmaps
        .create(
            &PostParams::default(),
            &settings(serde_json::json!({"a": "3"}), serde_json::json!({})),
        )
        .await
        .unwrap();
    backup("v2");
    let (ok, second, stderr) = restore_json(&target.kubeconfig, &["v2", "--repo", &repo]);
    assert!(ok, "{stderr}\n{second}");
    assert!(
        names(&second["report"], "updated").contains(&format!("ConfigMap/{}/settings", ns.name))
    );

    let target_client = target.client().await;
    let restored = Api::<ConfigMap>::namespaced(target_client.clone(), &ns.name)
        .get("settings")
        .await
        .unwrap();
    let data = restored.data.clone().unwrap_or_default();
    assert_eq!(data.get("a").map(String::as_str), Some("3"));
    assert!(
        !data.contains_key("b"),
        "the dropped key is removed: {data:?}"
    );
    let labels = restored.metadata.labels.clone().unwrap_or_default();
    assert!(
        !labels.contains_key("tier"),
        "the dropped label is removed: {labels:?}"
    );
    let managers: Vec<(String, String)> = restored
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("ferry".to_string(), "Apply".to_string()))
            && !managers.contains(&("ferry".to_string(), "Update".to_string())),
        "ferry's create entry became its apply entry: {managers:?}"
    );
    Api::<Namespace>::all(target_client)
        .delete(&ns.name, &DeleteParams::background())
        .await
        .ok();
}

fn config_map(name: &str, data: &str, owner: Option<(&str, &str)>) -> ConfigMap {
    let mut value = serde_json::json!({"metadata": {"name": name}, "data": {"v": data}});
    if let Some((owner, uid)) = owner {
        value["metadata"]["ownerReferences"] = serde_json::json!([{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid}]);
    }
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn recreate_replaces_the_snapshots_objects_and_deletes_nothing_else() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-rsrec").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    cms.create(
        &PostParams::default(),
        &config_map("in-snapshot", "1", None),
    )
    .await
    .unwrap();
    let owner = cms
        .create(&PostParams::default(), &config_map("owner", "1", None))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").to_str().unwrap().to_string();
    ferry(&cluster.kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    ferry(&cluster.kubeconfig)
        .args(["backup", "create", "app", "-n", &ns.name, "--repo", &repo])
        .assert()
        .success();

    // After the backup: an object the snapshot does not have, one owned by
    // an object of the snapshot, and a change to an object of the snapshot.
    cms.create(
        &PostParams::default(),
        &config_map("added-later", "x", None),
    )
    .await
    .unwrap();
    let owner_uid = owner.metadata.uid.clone().unwrap();
    cms.create(
        &PostParams::default(),
        &config_map("owned-later", "x", Some(("owner", &owner_uid))),
    )
    .await
    .unwrap();
    let mut changed = cms.get("in-snapshot").await.unwrap();
    changed.data = Some([("v".to_string(), "2".to_string())].into());
    let changed = cms
        .replace("in-snapshot", &PostParams::default(), &changed)
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns_uid = namespaces.get(&ns.name).await.unwrap().metadata.uid;

    // The plan says the namespace is kept, and why.
    let (ok, planned, stderr) = restore_json(
        &cluster.kubeconfig,
        &[
            "app",
            "--repo",
            &repo,
            "--existing",
            "recreate",
            "--dry-run",
        ],
    );
    assert!(ok, "{stderr}");
    let items: Vec<&Value> = planned["plan"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["items"].as_array().unwrap())
        .collect();
    let namespace_item = items
        .iter()
        .find(|i| i["object"]["kind"] == "Namespace")
        .expect("the namespace is in the plan");
    assert_ne!(namespace_item["action"], "recreate", "{namespace_item}");
    assert!(
        namespace_item["reason"]
            .as_str()
            .unwrap()
            .contains("deleting it would delete every object in the namespace"),
        "{namespace_item}"
    );
    let cm_item = items
        .iter()
        .find(|i| i["object"]["name"] == "in-snapshot")
        .unwrap();
    assert_eq!(cm_item["action"], "recreate", "{cm_item}");

    let (ok, result, stderr) = restore_json(
        &cluster.kubeconfig,
        &["app", "--repo", &repo, "--existing", "recreate"],
    );
    assert!(ok, "{stderr}\n{result}");
    assert_eq!(
        namespaces.get(&ns.name).await.unwrap().metadata.uid,
        ns_uid,
        "the namespace was not deleted"
    );
    for kept in ["added-later", "owned-later"] {
        assert!(
            cms.get_opt(kept).await.unwrap().is_some(),
            "{kept} is not in the snapshot and must survive"
        );
    }
    let recreated = cms.get("in-snapshot").await.unwrap();
    assert_ne!(recreated.metadata.uid, changed.metadata.uid, "recreated");
    assert_eq!(recreated.data.unwrap()["v"], "1", "as in the snapshot");

    // One kind, with --recreate-cascading: the Namespace comes only because
    // the ConfigMaps need it, so it is not deleted (with what the restore
    // did not select) to be made again.
    let (ok, result, stderr) = restore_json(
        &cluster.kubeconfig,
        &[
            "app",
            "--repo",
            &repo,
            "--include-kind",
            "ConfigMap",
            "--existing",
            "recreate",
            "--recreate-cascading",
        ],
    );
    assert!(ok, "{stderr}\n{result}");
    assert_eq!(
        namespaces.get(&ns.name).await.unwrap().metadata.uid,
        ns_uid,
        "the namespace, a dependency only, was not deleted: {result}"
    );
    for kept in ["added-later", "owned-later"] {
        assert!(
            cms.get_opt(kept).await.unwrap().is_some(),
            "{kept} is not in the snapshot and must survive"
        );
    }
    let again = cms.get("in-snapshot").await.unwrap();
    assert_ne!(again.metadata.uid, recreated.metadata.uid, "recreated");
}

#[tokio::test]
async fn an_invalid_namespace_mapping_or_transformed_name_writes_nothing() {
    let source = env().primary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-rsbad").await;
    apply_manifests(
        &client,
        &format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reader, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {ns}-reader}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{kind: ServiceAccount, name: reader, namespace: {ns}}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings, namespace: {ns}}}
data: {{a: b}}
"#,
            ns = ns.name
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").to_str().unwrap().to_string();
    ferry(&source.kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    ferry(&source.kubeconfig)
        .args(["backup", "create", "app", "-n", &ns.name, "--repo", &repo])
        .assert()
        .success();
    let target = env().secondary();
    let target_client = target.client().await;
    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
        Api::all(target_client.clone());
    let namespaces: Api<Namespace> = Api::all(target_client.clone());
    // Not a namespace name (uppercase, '_'), and unique to this run.
    let invalid = format!("Bad_{}", &ns.name[ns.name.len() - 8..]);
    let written = || async {
        let bindings = bindings.list(&ListParams::default()).await.unwrap();
        let touched: Vec<String> = bindings
            .items
            .into_iter()
            .filter_map(|b| b.metadata.name)
            .filter(|n| n.contains(&invalid) || n.contains(&ns.name))
            .collect();
        let namespace = namespaces.get_opt(&ns.name).await.unwrap();
        (touched, namespace.is_some())
    };

    let bad = format!("{}={invalid}", ns.name);
    let (ok, _, stderr) = restore_json(
        &target.kubeconfig,
        &["app", "--repo", &repo, "--namespace-mapping", &bad],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!("'{invalid}' is not a valid namespace name")),
        "{stderr}"
    );
    assert_eq!(written().await, (Vec::new(), false), "nothing was written");

    let plan = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {name: bad-name}\nspec:\n  steps:\n  - name: rename\n    select: {kinds: [ConfigMap]}\n    patch:\n    - {op: replace, path: /metadata/name, value: Bad_Name}\n",
    )
    .unwrap();
    let (ok, _, stderr) = restore_json(
        &target.kubeconfig,
        &[
            "app",
            "--repo",
            &repo,
            "--transform",
            plan.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("'Bad_Name' is not a valid ConfigMap name"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(written().await, (Vec::new(), false), "nothing was written");
}
