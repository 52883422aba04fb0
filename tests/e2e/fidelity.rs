//! What a snapshot must not leave out and what output must not change:
//! operators' CRDs without instances, YAML that every reader reads back as
//! written, classes unresolved on the source, migrate's backup report,
//! namespace references inside custom resources, server defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

use crate::support::{
    TestNamespace, apply_manifests, env, eventually, ferry, init_repo, live, object_ref,
};

/// The operator example for namespace `ns`.
fn operator_app(ns: &str) -> String {
    include_str!("../../examples/operator/app.yaml").replace("${NS}", ns)
}

/// Objects as a multi-document manifest (JSON is YAML).
fn manifest(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// `ferry backup create NAME -n NS -o json`: the command's JSON.
fn backup_json(kubeconfig: &Path, repo: &str, name: &str, ns: &str) -> Value {
    let out = ferry(kubeconfig)
        .args([
            "backup", "create", name, "-n", ns, "--repo", repo, "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Both test clusters' kubeconfigs, merged as kubectl does.
fn both_clusters() -> std::ffi::OsString {
    std::env::join_paths([&env().primary().kubeconfig, &env().secondary().kubeconfig]).unwrap()
}

/// `ferry migrate -n NS` from cluster a to cluster b, with `extra` flags.
fn migrate_a_to_b(ns: &str, extra: &[&str]) -> std::process::Output {
    ferry(&env().primary().kubeconfig)
        .env("KUBECONFIG", both_clusters())
        .args(["migrate", "--from", "a-admin", "--to", "b-admin", "-n", ns])
        .args(extra)
        .output()
        .unwrap()
}

async fn delete_namespace(client: &kube::Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await
        .ok();
}

fn crd_ref(name: &str) -> ferry::model::ObjectRef {
    object_ref(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
        name,
    )
}

#[tokio::test]
async fn an_operators_crds_without_instances_are_backed_up_and_the_report_says_why() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-fop").await;
    let n = &ns.name;
    apply_manifests(&client, &operator_app(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&cluster.kubeconfig, dir.path());
    let result = backup_json(&cluster.kubeconfig, &repo, "op", n);
    let report = &result["report"];
    assert_eq!(
        report["counts"]["apiextensions.k8s.io/CustomResourceDefinition"], 4,
        "every CRD of the operator: {report:#}"
    );
    assert_eq!(
        report["counts"]["admissionregistration.k8s.io/ValidatingWebhookConfiguration"], 1,
        "the webhook configuration served by the operator's Service: {report:#}"
    );
    let dependencies = &report["dependencies"];
    for (crd, reason) in [
        (
            "databases",
            format!("Database/{n}/main is an instance of it"),
        ),
        (
            "databasebackups",
            format!("ClusterRole/{n}-dbop grants access to its resources (rules[0])"),
        ),
        (
            "databaseusers",
            format!(
                "Deployment/{n}/dbop belongs to the same application (metadata.labels.app.kubernetes.io/instance)"
            ),
        ),
        (
            "databaseclusters",
            format!(
                "ValidatingWebhookConfiguration/{n}-dbop serves its resources (webhooks[0].rules[0])"
            ),
        ),
    ] {
        let key = format!("CustomResourceDefinition/{crd}.{n}.ferry.dev");
        let reasons = dependencies[&key].to_string();
        assert!(
            reasons.contains(&reason),
            "{key} must be included because {reason}: {dependencies:#}"
        );
    }
    assert!(
        dependencies[format!("ValidatingWebhookConfiguration/{n}-dbop")]
            .to_string()
            .contains(&format!("it is served by Service/{n}/dbop-webhook")),
        "{dependencies:#}"
    );
    assert!(
        dependencies[format!("ClusterRoleBinding/{n}-dbop")]
            .to_string()
            .contains(&format!("it binds ServiceAccount/{n}/dbop")),
        "{dependencies:#}"
    );

    // The text report names the reasons too.
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "describe", "op", "--repo", &repo])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Dependencies outside the selection")
            && text.contains(&format!(
                "because ClusterRole/{n}-dbop grants access to its resources"
            )),
        "{text}"
    );
}

#[tokio::test]
async fn the_operator_example_migrates_between_clusters_with_every_crd() {
    let source = env().primary();
    let target = env().secondary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-fopm").await;
    let n = ns.name.clone();
    apply_manifests(&client, &operator_app(&n)).await;
    let out = migrate_a_to_b(&n, &["-o", "json"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let target_client = target.client().await;
    for crd in [
        "databases",
        "databasebackups",
        "databaseusers",
        "databaseclusters",
    ] {
        let name = format!("{crd}.{n}.ferry.dev");
        eventually(
            &format!("CRD {name} established on cluster b"),
            Duration::from_secs(30),
            || async {
                let crd = live(&target_client, &crd_ref(&name)).await?;
                crd["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
                    .then_some(())
            },
        )
        .await;
    }
    for object in [
        object_ref(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
            None,
            &format!("{n}-dbop"),
        ),
        object_ref(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            None,
            &format!("{n}-dbop"),
        ),
        object_ref("apps/v1", "Deployment", Some(&n), "dbop"),
        object_ref(&format!("{n}.ferry.dev/v1"), "Database", Some(&n), "main"),
    ] {
        assert!(
            live(&target_client, &object).await.is_some(),
            "{object} must arrive on cluster b"
        );
    }
    delete_namespace(&target_client, &n).await;
}

#[tokio::test]
async fn migrate_shows_what_the_backup_reported() {
    let source = env().primary();
    let target = env().secondary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-fmig").await;
    let n = ns.name.clone();
    apply_manifests(
        &client,
        &manifest(&[json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": n},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}],
                         "volumes": [{"name": "cfg", "configMap": {"name": "absent-config"}}]}}}
        })]),
    )
    .await;
    let root_ca = object_ref("v1", "ConfigMap", Some(&n), "kube-root-ca.crt");
    eventually("kube-root-ca.crt", Duration::from_secs(30), || async {
        live(&client, &root_ca).await.map(|_| ())
    })
    .await;
    let dangling =
        format!("dangling reference: Deployment/{n}/web refers to ConfigMap/{n}/absent-config");

    let out = migrate_a_to_b(&n, &["-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let backup = &result["backup"]["report"];
    assert!(
        backup["warnings"].to_string().contains(&dangling),
        "the backup's warnings in -o json: {result:#}"
    );
    assert!(
        backup["skipped"]
            .to_string()
            .contains(&format!("ConfigMap/{n}/kube-root-ca.crt")),
        "{result:#}"
    );
    assert!(backup["forbidden"].is_array(), "{result:#}");
    assert!(
        !result["report"]["created"].as_array().unwrap().is_empty()
            || !result["report"]["unchanged"].as_array().unwrap().is_empty(),
        "the restore report is there as before: {result:#}"
    );

    // The text form shows the backup report as `backup create` does.
    let out = migrate_a_to_b(&n, &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "Skipped (",
        &format!("ConfigMap/{n}/kube-root-ca.crt"),
        "Warnings (",
        &dangling,
        "Restore:",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    delete_namespace(&target.client().await, &n).await;
}

/// Reads every YAML document of `files` with PyYAML (a YAML 1.1 reader,
/// like kubectl and the API server) and returns them as JSON.
fn read_with_yaml_1_1(files: &[PathBuf]) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = []\n\
                  for path in sys.argv[1:]:\n\
                  \x20   with open(path) as f:\n\
                  \x20       docs.extend(d for d in yaml.safe_load_all(f) if d is not None)\n\
                  print(json.dumps(docs))\n";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .expect("python3 with PyYAML runs the YAML 1.1 reader of this test");
    assert!(
        out.status.success(),
        "PyYAML could not read {files:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn by_identity(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|o| {
            (
                ferry::model::ObjectRef::from_object(&o)
                    .unwrap()
                    .to_string(),
                o,
            )
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn yaml_manifests_read_back_identically_with_a_yaml_1_1_reader() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-fyaml").await;
    let n = ns.name.clone();
    let tricky = json!({
        "appendonly": "no", "enabled": "on", "off": "OFF", "yes": "Y", "mode": "0755",
        "octal": "0o17", "hex": "0x1F", "time": "1:30", "date": "2024-01-01", "float": "1e3",
        "dot": ".5", "null": "null", "tilde": "~", "empty": "", "true": "True",
        "script": "#!/bin/sh\necho yes\n", "quote": "it's \"quoted\": yes",
    });
    apply_manifests(
        &client,
        &manifest(&[
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "flags", "namespace": n, "labels": {"enabled": "true", "on": "no"}},
                   "data": tricky}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "redis", "namespace": n, "annotations": {"version": "7.0", "n": "n"}},
                   "spec": {"selector": {"matchLabels": {"app": "redis"}}, "template": {
                       "metadata": {"labels": {"app": "redis"}},
                       "spec": {"containers": [{"name": "redis", "image": "redis:7.2",
                           "args": ["--appendonly", "no", "--save", "", "--port", "6379"],
                           "env": [{"name": "DEBUG", "value": "false"}, {"name": "LEVEL", "value": "010"}]}]}}}}),
        ]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&cluster.kubeconfig, dir.path());
    backup_json(&cluster.kubeconfig, &repo, "yaml", &n);
    let plan = dir.path().join("plan.yaml");
    std::fs::write(
        &plan,
        "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {name: as-is}\nspec:\n  steps:\n  - ruleSet: namespace\n",
    )
    .unwrap();
    let transform = |args: &[&str]| {
        let out = ferry(&cluster.kubeconfig)
            .args(["transform", "yaml", "--repo", &repo, "--plan"])
            .arg(&plan)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let list: Value = serde_json::from_slice(&transform(&["-o", "json"])).unwrap();
    let expected = by_identity(list["items"].as_array().unwrap().clone());
    assert!(
        expected.contains_key(&format!("ConfigMap/{n}/flags")),
        "{expected:#?}"
    );

    let stdout_file = dir.path().join("stdout.yaml");
    std::fs::write(&stdout_file, transform(&["-o", "yaml"])).unwrap();
    let from_stdout = by_identity(read_with_yaml_1_1(&[stdout_file]));
    assert_eq!(from_stdout, expected, "-o yaml read by a YAML 1.1 reader");

    for format in ["dir", "kustomize"] {
        let out_dir = dir.path().join(format);
        transform(&["-o", format, "--output-dir", out_dir.to_str().unwrap()]);
        let files: Vec<PathBuf> = yaml_files(&out_dir)
            .into_iter()
            .filter(|p| !p.ends_with("kustomization.yaml"))
            .collect();
        let read = by_identity(read_with_yaml_1_1(&files));
        assert_eq!(read, expected, "-o {format} read by a YAML 1.1 reader");
        if format == "kustomize" {
            let kustomization = read_with_yaml_1_1(&[out_dir.join("kustomization.yaml")]);
            assert_eq!(
                kustomization[0]["resources"].as_array().unwrap().len(),
                files.len()
            );
        }
    }
    // The reports are YAML too.
    let out = ferry(&cluster.kubeconfig)
        .args(["backup", "describe", "yaml", "--repo", &repo, "-o", "yaml"])
        .output()
        .unwrap();
    let report_file = dir.path().join("describe.yaml");
    std::fs::write(&report_file, &out.stdout).unwrap();
    let out_json = ferry(&cluster.kubeconfig)
        .args(["backup", "describe", "yaml", "--repo", &repo, "-o", "json"])
        .output()
        .unwrap();
    let described: Value = serde_json::from_slice(&out_json.stdout).unwrap();
    assert_eq!(read_with_yaml_1_1(&[report_file])[0], described);
}

#[tokio::test]
async fn an_ingress_class_missing_on_both_clusters_does_not_block_the_restore() {
    let source = env().primary();
    let target = env().secondary();
    let client = source.client().await;
    let ns = TestNamespace::create(&client, "t-fcls").await;
    let n = ns.name.clone();
    let ingress = |name: &str, class: &str| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": name, "namespace": n},
               "spec": {"ingressClassName": class, "rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix",
                   "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}})
    };
    apply_manifests(
        &client,
        &manifest(&[
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                   "metadata": {"name": format!("{n}-on-a")}, "spec": {"controller": "example.com/ingress"}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": n},
                   "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
            ingress("nowhere", &format!("{n}-nowhere")),
            ingress("on-a", &format!("{n}-on-a")),
        ]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&source.kubeconfig, dir.path());
    let backup = backup_json(&source.kubeconfig, &repo, "classes", &n);
    assert!(
        backup["report"]["warnings"]
            .to_string()
            .contains(&format!("IngressClass/{n}-nowhere")),
        "the source already lacks it: {backup:#}"
    );
    let restore = |extra: &[&str]| {
        let out = ferry(&target.kubeconfig)
            .args(["restore", "classes", "--repo", &repo, "-o", "json"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // A class the source had and the target lacks still blocks; the one
    // the source lacked too is not among the problems.
    let (ok, _, stderr) = restore(&["--exclude-kind", "ingressclasses"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("ingress class {n}-on-a is missing on the target")),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&format!("{n}-nowhere is missing")),
        "{stderr}"
    );

    // Without it the restore goes through, and the plan says why.
    let (ok, result, stderr) = restore(&[]);
    assert!(ok, "{stderr}");
    let warning = format!(
        "ingress class {n}-nowhere (used by Ingress/{n}/nowhere) exists neither on the target nor on the source cluster"
    );
    assert!(
        result["plan"]["warnings"].to_string().contains(&warning),
        "{result:#}"
    );
    let target_client = target.client().await;
    let restored = object_ref("networking.k8s.io/v1", "Ingress", Some(&n), "nowhere");
    assert!(live(&target_client, &restored).await.is_some());
    delete_namespace(&target_client, &n).await;
}

#[tokio::test]
async fn clone_for_test_follows_namespace_fields_of_custom_resources_and_warns_about_the_rest() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-fcr").await;
    let n = ns.name.clone();
    let clone = format!("{n}-test");
    let _clone_ns = TestNamespace::adopt(&client, &clone);
    let group = format!("{n}.gitops.ferry.dev");
    let crd = |plural: &str, kind: &str, schema: Value| {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": format!("{plural}.{group}")},
               "spec": {"group": group, "scope": "Namespaced",
                        "names": {"plural": plural, "singular": kind.to_ascii_lowercase(), "kind": kind},
                        "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": schema}}]}})
    };
    apply_manifests(
        &client,
        &manifest(&[
            crd(
                "watchers",
                "Watcher",
                json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
                    "watch": {"type": "string", "description": "Namespace the operator watches."},
                    "targetNamespace": {"type": "string"},
                    "label": {"type": "string", "description": "A label value."}}}}}),
            ),
            crd(
                "applications",
                "Application",
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            ),
            json!({"apiVersion": format!("{group}/v1"), "kind": "Watcher",
                   "metadata": {"name": "orders", "namespace": n},
                   "spec": {"watch": n, "targetNamespace": n, "label": n}}),
            json!({"apiVersion": format!("{group}/v1"), "kind": "Application",
                   "metadata": {"name": "shop", "namespace": n},
                   "spec": {"destination": {"server": "https://kubernetes.default.svc", "namespace": n},
                            "source": {"repoURL": "https://git.example.com/shop.git", "path": "deploy"}}}),
        ]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&cluster.kubeconfig, dir.path());
    backup_json(&cluster.kubeconfig, &repo, "crs", &n);
    let plan = dir.path().join("clone.yaml");
    std::fs::write(
        &plan,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: clone}}\nspec:\n  steps:\n  - ruleSet: namespace\n    params:\n      map: {{{n}: {clone}}}\n  - ruleSet: clone-for-test\n"
        ),
    )
    .unwrap();
    let out = ferry(&cluster.kubeconfig)
        .args(["restore", "crs", "--repo", &repo, "--transform"])
        .arg(&plan)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();

    let object = |kind: &str, name: &str| ferry::model::ObjectRef {
        group: group.clone(),
        version: "v1".into(),
        kind: kind.into(),
        namespace: Some(clone.clone()),
        name: name.into(),
    };
    let watcher = live(&client, &object("Watcher", "orders"))
        .await
        .expect("the cloned Watcher");
    assert_eq!(
        watcher["spec"],
        json!({"watch": clone, "targetNamespace": clone, "label": n}),
        "the schema's namespace fields follow the clone; other strings do not"
    );
    let application = live(&client, &object("Application", "shop"))
        .await
        .expect("the cloned Application");
    assert_eq!(application["spec"]["destination"]["namespace"], clone);

    let warnings = result["plan"]["warnings"].to_string();
    assert!(
        warnings.contains(&format!(
            "Application/{clone}/shop: cannot prove the clone is safe"
        )) && warnings
            .contains("spec.destination.server is the URL https://kubernetes.default.svc"),
        "{result:#}"
    );
    assert!(
        !warnings.contains(&format!("Watcher/{clone}/orders")),
        "the Watcher points only at its own namespace: {warnings}"
    );
    // The original is untouched.
    let mut original = object("Watcher", "orders");
    original.namespace = Some(n.clone());
    let original = live(&client, &original).await.unwrap();
    assert_eq!(original["spec"]["watch"], n.as_str());
}

#[tokio::test]
async fn server_defaulted_fields_are_stripped_back_to_the_minimal_object() {
    let cluster = env().primary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-fdef").await;
    let n = ns.name.clone();
    let template = |app: &str| {
        json!({"metadata": {"labels": {"app": app}}, "spec": {
            "containers": [{"name": "main", "image": "nginx:1.27",
                "ports": [{"containerPort": 80}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 80}},
                "livenessProbe": {"tcpSocket": {"port": 80}},
                "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "key", "mountPath": "/etc/key"}]},
                {"name": "sidecar", "image": "busybox"}],
            "initContainers": [{"name": "init", "image": "busybox:1.36"}],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "key", "secret": {"secretName": "key"}}]}})
    };
    let meta = |name: &str| json!({"name": name, "namespace": n});
    let minimal = vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("web"),
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("web-nodeport"),
               "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("key"), "data": {"k": "dg=="}}),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta("data"),
               "spec": {"storageClassName": format!("{n}-none"), "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("web"),
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template("web")}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("db"),
               "spec": {"serviceName": "web", "selector": {"matchLabels": {"app": "db"}}, "template": template("db"),
                        "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                            "storageClassName": format!("{n}-none"), "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}}}}]}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta("agent"),
               "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template("agent")}}),
        json!({"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": "once", "namespace": n, "labels": {"app": "once"}},
               "spec": {"template": {"metadata": {"labels": {"app": "once"}},
                        "spec": {"restartPolicy": "Never", "containers": [{"name": "once", "image": "busybox:1.36"}]}}}}),
        json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta("nightly"),
               "spec": {"schedule": "0 3 * * *", "suspend": true, "jobTemplate": {"spec": {"template": {
                   "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "job", "image": "busybox:1.36"}]}}}}}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("web"),
               "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                        "ingress": [{"from": [{"podSelector": {}}]}]}}),
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": format!("things.{n}.ferry.dev")},
               "spec": {"group": format!("{n}.ferry.dev"), "scope": "Namespaced",
                        "names": {"plural": "things", "kind": "Thing"},
                        "versions": [{"name": "v1", "served": true, "storage": true,
                                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}}),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": {"name": format!("{n}-things")},
               "webhooks": [{"name": format!("things.{n}.ferry.dev"),
                             "clientConfig": {"service": {"name": "web", "namespace": n}},
                             "rules": [{"apiGroups": [format!("{n}.ferry.dev")], "apiVersions": ["v1"],
                                        "operations": ["CREATE"], "resources": ["things"]}],
                             "sideEffects": "None", "admissionReviewVersions": ["v1"]}]}),
    ];
    apply_manifests(&client, &manifest(&minimal)).await;
    let mut differences = Vec::new();
    for object in &minimal {
        let reference = ferry::model::ObjectRef::from_object(object).unwrap();
        let stored = live(&client, &reference)
            .await
            .unwrap_or_else(|| panic!("{reference} was created"));
        let normalized = match ferry::model::normalize::normalize(
            stored.clone(),
            &ferry::model::normalize::NormalizeOptions::default(),
        ) {
            ferry::model::normalize::Verdict::Keep { object, .. } => object,
            other => panic!("{reference} must be kept: {other:?}"),
        };
        if &normalized != object {
            differences.push(format!(
                "{reference}\n  created: {object}\n  API server: {stored}\n  normalized: {normalized}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "normalizing what the API server returns must give back the minimal object:\n{}",
        differences.join("\n")
    );
}

/// Every CRD that `project` (prometheus-operator, argo-cd) publishes, as one
/// manifest.
fn public_crds(project: &str) -> String {
    let dir = env().public_crds.get(project).unwrap_or_else(|| {
        panic!(
            "the test environment has no CRDs of {project}: fetch them with \
             `scripts/testenv build crds`, then restart it"
        )
    });
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A monitoring stack and a GitOps application as their users write them:
/// one resource of every kind prometheus-operator serves and the three of
/// Argo CD, with the Service and ServiceAccount they name.
fn monitored_app(ns: &str) -> Vec<Value> {
    let monitoring = |version: &str, kind: &str, name: &str, spec: Value| {
        json!({"apiVersion": format!("monitoring.coreos.com/{version}"), "kind": kind,
               "metadata": {"name": name, "namespace": ns, "labels": {"team": "shop"}}, "spec": spec})
    };
    let argo = |kind: &str, name: &str, spec: Value| {
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": kind,
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };
    let destination = json!({"server": "https://kubernetes.default.svc", "namespace": ns});
    let source = json!({"repoURL": "https://git.example.invalid/shop.git", "path": "deploy",
                        "targetRevision": "HEAD"});
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "prometheus", "namespace": ns}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "shop", "namespace": ns, "labels": {"app": "shop"}},
               "spec": {"selector": {"app": "shop"}, "ports": [{"name": "metrics", "port": 8080}]}}),
        monitoring(
            "v1",
            "Prometheus",
            "main",
            json!({
                "replicas": 2, "serviceAccountName": "prometheus", "retention": "15d",
                "serviceMonitorSelector": {"matchLabels": {"team": "shop"}},
                "ruleSelector": {"matchLabels": {"team": "shop"}},
                "resources": {"requests": {"memory": "400Mi"}},
                "storage": {"volumeClaimTemplate": {"spec": {"resources": {"requests": {"storage": "10Gi"}}}}},
                "alerting": {"alertmanagers": [{"namespace": ns, "name": "alertmanager-operated", "port": "web"}]}
            }),
        ),
        monitoring("v1", "Alertmanager", "main", json!({"replicas": 1})),
        monitoring(
            "v1",
            "ServiceMonitor",
            "shop",
            json!({
                "selector": {"matchLabels": {"app": "shop"}},
                "endpoints": [{"port": "metrics", "interval": "30s", "path": "/metrics"}]
            }),
        ),
        monitoring(
            "v1",
            "PodMonitor",
            "workers",
            json!({
                "selector": {"matchLabels": {"app": "worker"}},
                "podMetricsEndpoints": [{"port": "metrics"}]
            }),
        ),
        monitoring(
            "v1",
            "PrometheusRule",
            "shop-alerts",
            json!({"groups": [{"name": "shop", "rules": [{
                "alert": "HighErrorRate",
                "expr": "sum(rate(http_requests_total{code=~\"5..\"}[5m])) / sum(rate(http_requests_total[5m])) > 0.05",
                "for": "10m", "labels": {"severity": "page"},
                "annotations": {"summary": "More than 5% of requests fail"}
            }]}]}),
        ),
        monitoring(
            "v1",
            "Probe",
            "homepage",
            json!({
                "prober": {"url": "blackbox-exporter:9115"}, "module": "http_2xx",
                "targets": {"staticConfig": {"static": ["https://shop.example.invalid"]}}
            }),
        ),
        monitoring(
            "v1",
            "ThanosRuler",
            "rules",
            json!({"queryEndpoints": ["thanos-query:9090"]}),
        ),
        monitoring(
            "v1alpha1",
            "AlertmanagerConfig",
            "routing",
            json!({
                "route": {"receiver": "team", "groupBy": ["job"]}, "receivers": [{"name": "team"}]
            }),
        ),
        monitoring(
            "v1alpha1",
            "ScrapeConfig",
            "static",
            json!({
                "staticConfigs": [{"targets": ["shop:8080"]}]
            }),
        ),
        monitoring(
            "v1alpha1",
            "PrometheusAgent",
            "agent",
            json!({"serviceAccountName": "prometheus"}),
        ),
        argo(
            "AppProject",
            "shop",
            json!({
                "sourceRepos": ["*"], "destinations": [destination.clone()]
            }),
        ),
        argo(
            "Application",
            "shop",
            json!({
                "project": "shop", "source": source.clone(), "destination": destination.clone(),
                "syncPolicy": {"automated": {"prune": true, "selfHeal": true}}
            }),
        ),
        argo(
            "ApplicationSet",
            "environments",
            json!({
                "generators": [{"list": {"elements": [{"env": "test"}, {"env": "staging"}]}}],
                "template": {"metadata": {"name": "{{env}}-shop"},
                             "spec": {"project": "shop", "source": source, "destination": destination}}
            }),
        ),
    ]
}

/// The CRDs (by name) of `objects`' custom resources.
fn crd_names(objects: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = objects
        .iter()
        .filter_map(|o| {
            let (group, _) = o["apiVersion"].as_str()?.split_once('/')?;
            let kind = o["kind"].as_str()?.to_lowercase();
            let plural = if kind.ends_with('s') {
                format!("{kind}es")
            } else {
                format!("{kind}s")
            };
            Some(format!("{plural}.{group}"))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn real_operators_resources_migrate_with_their_published_crds_into_a_cluster_without_them() {
    let (source, target) = (env().primary(), env().secondary());
    let (client, target_client) = (source.client().await, target.client().await);
    let ns = TestNamespace::create(&client, "t-fpub").await;
    let n = &ns.name;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(target_client.clone());
    let objects = monitored_app(n);
    let names = crd_names(&objects);
    assert_eq!(names.len(), 13, "{names:?}");
    // The target has none of the operators' CRDs (a run before may have
    // left them): the restore must bring them.
    for name in &names {
        let _ = crds.delete(name, &DeleteParams::default()).await;
    }
    eventually(
        "the target to have none of the CRDs",
        Duration::from_secs(120),
        || async {
            for name in &names {
                if crds.get_opt(name).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    apply_manifests(&client, &public_crds("prometheus-operator")).await;
    apply_manifests(&client, &public_crds("argo-cd")).await;
    apply_manifests(&client, &manifest(&objects)).await;

    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&source.kubeconfig, dir.path());
    let result = backup_json(&source.kubeconfig, &repo, "monitoring", n);
    let report = &result["report"];
    assert_eq!(
        report["counts"]["apiextensions.k8s.io/CustomResourceDefinition"], 13,
        "the CRD of every resource, and no other: {report:#}"
    );
    for name in &names {
        assert!(
            report["dependencies"][format!("CustomResourceDefinition/{name}")]
                .to_string()
                .contains("is an instance of it"),
            "{name}: {:#}",
            report["dependencies"]
        );
    }

    let _target_ns = TestNamespace::adopt(&target_client, n);
    let out = ferry(&target.kubeconfig)
        .args(["restore", "monitoring", "--repo", &repo, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore into a cluster without the CRDs: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    for name in &names {
        let source_crd = live(&client, &crd_ref(name)).await.unwrap();
        let target_crd = live(&target_client, &crd_ref(name))
            .await
            .unwrap_or_else(|| panic!("CRD {name} was not restored"));
        assert_eq!(
            target_crd["spec"], source_crd["spec"],
            "CRD {name} comes back as published (schemas, versions, subresources)"
        );
    }
    for object in &objects {
        let api_version = object["apiVersion"].as_str().unwrap();
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let reference = object_ref(api_version, kind, Some(n), name);
        let before = live(&client, &reference).await.unwrap();
        let after = live(&target_client, &reference)
            .await
            .unwrap_or_else(|| panic!("{kind}/{name} was not restored"));
        match kind {
            "ServiceAccount" => continue,
            // Addresses are the target cluster's own.
            "Service" => {
                assert_eq!(after["spec"]["ports"], before["spec"]["ports"]);
                assert_eq!(after["spec"]["selector"], before["spec"]["selector"]);
                continue;
            }
            _ => {}
        }
        assert_eq!(
            after["spec"], before["spec"],
            "{kind}/{name} comes back with every field"
        );
        assert_eq!(
            after["metadata"]["labels"], before["metadata"]["labels"],
            "{kind}/{name}"
        );
    }
    delete_namespace(&target_client, n).await;
}
