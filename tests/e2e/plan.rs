//! Restore subsets, saved plans and offline plans against real clusters.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

use crate::support::{
    TestNamespace, apply_manifests, env, ferry, init_repo, run_json, unique_name,
};

fn listed(report: &Value, key: &str) -> BTreeSet<String> {
    report[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A namespace in the primary cluster holding `manifests` (given the
/// namespace's name), backed up as snapshot `app` into a fresh repository.
async fn backed_up(
    prefix: &str,
    manifests: impl Fn(&str) -> String,
) -> (tempfile::TempDir, TestNamespace, String) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, prefix).await;
    apply_manifests(&client, &manifests(&ns.name)).await;
    let repo = init_repo(&cluster.kubeconfig, dir.path());
    ferry(&cluster.kubeconfig)
        .args(["backup", "create", "app", "-n", &ns.name, "--repo", &repo])
        .assert()
        .success();
    (dir, ns, repo)
}

/// Deletes cluster-scoped test objects when the test ends, on every cluster.
struct ClusterRoles(Vec<String>);

impl Drop for ClusterRoles {
    fn drop(&mut self) {
        let names = self.0.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for cluster in [env().primary(), env().secondary()] {
                    let api: Api<ClusterRole> = Api::all(cluster.client().await);
                    for name in &names {
                        let _ = api.delete(name, &DeleteParams::default()).await;
                    }
                }
            });
        }
    }
}

#[tokio::test]
async fn a_namespace_subset_writes_only_the_cluster_objects_it_depends_on() {
    let dir = tempfile::tempdir().unwrap();
    let source = env().primary();
    let client = source.client().await;
    let team_a = TestNamespace::create(&client, "t-sub-a").await;
    let team_b = TestNamespace::create(&client, "t-sub-b").await;
    let role_a = unique_name("t-sub-reader-a");
    let role_b = unique_name("t-sub-reader-b");
    let _roles = ClusterRoles(vec![role_a.clone(), role_b.clone()]);
    for (ns, role) in [(&team_a.name, &role_a), (&team_b.name, &role_b)] {
        apply_manifests(
            &client,
            &format!(
                r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {role}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: [get]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: read, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}
subjects: [{{kind: ServiceAccount, name: default, namespace: {ns}}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings, namespace: {ns}}}
data: {{a: "1"}}
"#
            ),
        )
        .await;
    }
    let repo = init_repo(&source.kubeconfig, dir.path());
    ferry(&source.kubeconfig)
        .args([
            "backup",
            "create",
            "both",
            "-n",
            &team_a.name,
            "-n",
            &team_b.name,
        ])
        .args(["--repo", &repo])
        .assert()
        .success();

    let target = env().secondary();
    let target_client = target.client().await;
    let _cleanup = [
        TestNamespace::adopt(&target_client, &team_a.name),
        TestNamespace::adopt(&target_client, &team_b.name),
    ];
    let (ok, out, stderr) = run_json(
        &target.kubeconfig,
        &["restore", "both", "-n", &team_a.name, "--repo", &repo],
    );
    assert!(ok, "{stderr}\n{out}");
    let created = listed(&out["report"], "created");
    let expected: BTreeSet<String> = [
        format!("Namespace/{}", team_a.name),
        format!("ClusterRole/{role_a}"),
        format!("RoleBinding/{}/read", team_a.name),
        format!("ConfigMap/{}/settings", team_a.name),
    ]
    .into_iter()
    .collect();
    assert_eq!(created, expected, "{out}");
    // Nothing of team-b reached the target: not its Namespace, not its ClusterRole.
    let namespaces: Api<Namespace> = Api::all(target_client.clone());
    assert!(namespaces.get_opt(&team_b.name).await.unwrap().is_none());
    let roles: Api<ClusterRole> = Api::all(target_client.clone());
    assert!(roles.get_opt(&role_b).await.unwrap().is_none());
    assert!(roles.get_opt(&role_a).await.unwrap().is_some());
}

#[tokio::test]
async fn a_key_dropped_from_a_newer_snapshot_alone_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-drop1").await;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let settings = |data: Value| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": data})).unwrap()
    };
    configmaps
        .create(
            &PostParams::default(),
            &settings(json!({"a": "1", "b": "2"})),
        )
        .await
        .unwrap();
    let repo = init_repo(&cluster.kubeconfig, dir.path());
    let backup = |name: &str| {
        ferry(&cluster.kubeconfig)
            .args(["backup", "create", name, "-n", &ns.name, "--repo", &repo])
            .assert()
            .success();
    };
    backup("v1");
    let target = env().secondary();
    let target_client = target.client().await;
    let _cleanup = TestNamespace::adopt(&target_client, &ns.name);
    let (ok, out, stderr) = run_json(&target.kubeconfig, &["restore", "v1", "--repo", &repo]);
    assert!(ok, "{stderr}\n{out}");

    // Only a key goes away: every field the new snapshot has already
    // matches the target, and still the restore must remove the key.
    configmaps
        .replace(
            "settings",
            &PostParams::default(),
            &settings(json!({"a": "1"})),
        )
        .await
        .unwrap();
    backup("v2");
    let (ok, plan, stderr) = run_json(
        &target.kubeconfig,
        &["restore", "v2", "--repo", &repo, "--dry-run"],
    );
    assert!(ok, "{stderr}\n{plan}");
    let item = plan["plan"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["items"].as_array().unwrap())
        .find(|i| i["object"]["kind"] == "ConfigMap")
        .cloned()
        .unwrap();
    assert_eq!(item["action"], "update", "{item}");
    assert_eq!(item["changes"][0]["path"], "data.b", "{item}");
    assert_eq!(item["changes"][0]["desired"], Value::Null, "{item}");

    let (ok, out, stderr) = run_json(&target.kubeconfig, &["restore", "v2", "--repo", &repo]);
    assert!(ok, "{stderr}\n{out}");
    let restored = Api::<ConfigMap>::namespaced(target_client, &ns.name)
        .get("settings")
        .await
        .unwrap();
    let data = restored.data.unwrap_or_default();
    assert_eq!(data.get("a").map(String::as_str), Some("1"));
    assert!(
        !data.contains_key("b"),
        "the dropped key is removed: {data:?}"
    );
}

#[tokio::test]
async fn a_saved_plan_is_applied_exactly_and_refused_when_the_target_changed() {
    let (dir, ns, repo) = backed_up("t-plan", |ns| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: one, namespace: {ns}}}\ndata: {{k: \"1\"}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: two, namespace: {ns}}}\ndata: {{k: \"2\"}}\n"
        )
    })
    .await;
    let target = env().secondary();
    let target_client = target.client().await;

    // Planned against an empty target, then saved.
    let (ok, planned, stderr) = run_json(
        &target.kubeconfig,
        &["restore", "app", "--repo", &repo, "--dry-run"],
    );
    assert!(ok, "{stderr}\n{planned}");
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(&planned).unwrap()).unwrap();
    let planned_objects: BTreeSet<String> = planned["plan"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["items"].as_array().unwrap())
        .map(|i| {
            assert_eq!(i["action"], "create", "{i}");
            format!(
                "{}/{}/{}",
                i["object"]["kind"].as_str().unwrap(),
                ns.name,
                i["object"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(planned_objects.len(), 3, "{planned}");

    // Someone creates one of the planned objects meanwhile: the plan is
    // refused, naming it, and nothing is written.
    let _created = TestNamespace::create_named(&target_client, &ns.name).await;
    let plan_path = plan_file.to_str().unwrap();
    let out = ferry(&target.kubeconfig)
        .args(["restore", "--plan", plan_path, "--repo", &repo])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the target changed since the plan was made")
            && stderr.contains(&format!(
                "Namespace/{}: planned absent, now resourceVersion",
                ns.name
            )),
        "{stderr}"
    );
    let configmaps = Api::<ConfigMap>::namespaced(target_client.clone(), &ns.name);
    assert!(configmaps.get_opt("one").await.unwrap().is_none());

    // A plan made now applies, and writes exactly what it shows.
    let (ok, planned, stderr) = run_json(
        &target.kubeconfig,
        &["restore", "app", "--repo", &repo, "--dry-run"],
    );
    assert!(ok, "{stderr}\n{planned}");
    std::fs::write(&plan_file, serde_json::to_vec(&planned["plan"]).unwrap()).unwrap();
    let (ok, out, stderr) = run_json(
        &target.kubeconfig,
        &["restore", "--plan", plan_path, "--repo", &repo],
    );
    assert!(ok, "{stderr}\n{out}");
    let created = listed(&out["report"], "created");
    let expected: BTreeSet<String> = ["one", "two"]
        .iter()
        .map(|n| format!("ConfigMap/{}/{n}", ns.name))
        .collect();
    assert_eq!(created, expected, "{out}");
    assert_eq!(
        listed(&out["report"], "unchanged"),
        BTreeSet::from([format!("Namespace/{}", ns.name)])
    );
    assert_eq!(configmaps.get("two").await.unwrap().data.unwrap()["k"], "2");
    // Applied once, the same plan no longer matches the target.
    let out = ferry(&target.kubeconfig)
        .args(["restore", "--plan", plan_path, "--repo", &repo])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("ConfigMap/{}/one: planned absent", ns.name))
    );
}

#[tokio::test]
async fn a_restore_is_planned_offline_against_a_saved_profile() {
    let (dir, ns, repo) = backed_up("t-offline", |ns| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c, namespace: {ns}}}\ndata: {{k: v}}\n")
    })
    .await;
    let profile = ferry(&env().secondary().kubeconfig)
        .args(["cluster", "profile"])
        .output()
        .unwrap();
    assert!(profile.status.success());
    let profile_path = dir.path().join("target.json");
    std::fs::write(&profile_path, &profile.stdout).unwrap();

    // No cluster at all: the kubeconfig does not exist.
    let nowhere = dir.path().join("no-such-kubeconfig");
    let plan_offline = || {
        run_json(
            &nowhere,
            &[
                "restore",
                "app",
                "--repo",
                &repo,
                "--dry-run",
                "--target-profile",
                profile_path.to_str().unwrap(),
            ],
        )
    };
    let (ok, out, stderr) = plan_offline();
    assert!(ok, "{stderr}\n{out}");
    assert_eq!(out["plan"]["offline"], true, "{out}");
    let items: Vec<&Value> = out["plan"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["items"].as_array().unwrap())
        .collect();
    assert_eq!(items.len(), 2, "{out}");
    assert!(items.iter().all(|i| i["action"] == "create"));

    // The saved profile lacks a storage class the snapshot needs: refused offline too.
    let mut lacking: Value = serde_json::from_slice(&profile.stdout).unwrap();
    lacking["servedKinds"] = json!([]);
    std::fs::write(&profile_path, serde_json::to_vec(&lacking).unwrap()).unwrap();
    let (ok, _, stderr) = plan_offline();
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "ConfigMap/{}/c: the target does not serve v1 ConfigMap",
            ns.name
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_namespace_mapping_flag_moves_service_names_as_the_rule_set_does() {
    let (_dir, ns, repo) = backed_up("t-nsmap", |ns| {
        format!(
            r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: endpoints, namespace: {ns}}}
data: {{db: "postgres://db.{ns}.svc.cluster.local:5432/app", cache: "cache.{ns}:6379"}}
---
apiVersion: v1
kind: Service
metadata: {{name: upstream, namespace: {ns}}}
spec: {{type: ExternalName, externalName: "api.{ns}.svc.cluster.local"}}
"#
        )
    })
    .await;
    let cluster = env().primary();
    let client = cluster.client().await;
    let clone = unique_name("t-nsmap-clone");
    let _cleanup = TestNamespace::adopt(&client, &clone);
    let mapping = format!("{}={clone}", ns.name);
    let (ok, out, stderr) = run_json(
        &cluster.kubeconfig,
        &[
            "restore",
            "app",
            "--repo",
            &repo,
            "--namespace-mapping",
            &mapping,
        ],
    );
    assert!(ok, "{stderr}\n{out}");
    let endpoints = Api::<ConfigMap>::namespaced(client.clone(), &clone)
        .get("endpoints")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        endpoints["db"],
        format!("postgres://db.{clone}.svc.cluster.local:5432/app")
    );
    assert_eq!(endpoints["cache"], format!("cache.{clone}:6379"));
    let upstream = crate::support::live(
        &client,
        &crate::support::object_ref("v1", "Service", Some(&clone), "upstream"),
    )
    .await
    .unwrap();
    assert_eq!(
        upstream["spec"]["externalName"],
        format!("api.{clone}.svc.cluster.local")
    );
}

#[tokio::test]
async fn a_saved_plan_with_a_namespace_mapping_applies_its_transformed_objects() {
    let (dir, ns, repo) = backed_up("t-planmap", |ns| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c, namespace: {ns}}}\ndata: {{url: \"http://api.{ns}.svc:80\"}}\n"
        )
    })
    .await;
    let cluster = env().primary();
    let client = cluster.client().await;
    let clone = unique_name("t-planmap-clone");
    let _cleanup = TestNamespace::adopt(&client, &clone);
    let mapping = format!("{}={clone}", ns.name);
    let (ok, planned, stderr) = run_json(
        &cluster.kubeconfig,
        &[
            "restore",
            "app",
            "--repo",
            &repo,
            "--namespace-mapping",
            &mapping,
            "--dry-run",
        ],
    );
    assert!(ok, "{stderr}\n{planned}");
    assert!(
        planned["plan"]["waves"][0]["items"][0]["digest"].is_string(),
        "transformed objects carry a digest: {planned}"
    );
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(&planned).unwrap()).unwrap();
    let (ok, out, stderr) = run_json(
        &cluster.kubeconfig,
        &[
            "restore",
            "--plan",
            plan_file.to_str().unwrap(),
            "--repo",
            &repo,
        ],
    );
    assert!(ok, "{stderr}\n{out}");
    assert_eq!(
        listed(&out["report"], "created"),
        BTreeSet::from([format!("Namespace/{clone}"), format!("ConfigMap/{clone}/c")])
    );
    let data = Api::<ConfigMap>::namespaced(client, &clone)
        .get("c")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(data["url"], format!("http://api.{clone}.svc:80"));
}
