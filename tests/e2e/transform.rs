//! Transforms on the way in: an upgrade rehearsal from the v1.24 cluster into
//! the newest release, a clone of production into a test namespace of the
//! same cluster, and hostile rules that must stop before anything is written.

use std::path::{Path, PathBuf};

use kube::api::{Api, DeleteParams, DynamicObject};
use kube::discovery::pinned_kind;
use serde_json::Value;

use crate::support::{TestNamespace, apply_manifests, env, ferry, live, multitier_app, object_ref};

const PASSWORD: &str = "correct horse battery staple";

async fn delete_cluster_scoped(client: &kube::Client, api_version: &str, kind: &str, name: &str) {
    let object = object_ref(api_version, kind, None, name);
    let gvk = kube::core::GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
    if let Ok((resource, _)) = pinned_kind(client, &gvk).await {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
}

/// A repository in `dir` with one backup `name` of namespace `ns`.
fn backup(kubeconfig: &Path, dir: &Path, name: &str, ns: &str) -> String {
    let repo = dir.join("repo").to_str().unwrap().to_string();
    ferry(kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    let out = ferry(kubeconfig)
        .args(["backup", "create", name, "-n", ns, "--repo", &repo])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo
}

/// An example's transform plan with `${NS}` replaced, written into `dir`.
fn example_plan(example: &str, ns: &str, dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(example)
        .join("plan.yaml");
    let text = std::fs::read_to_string(source)
        .unwrap()
        .replace("${NS}", ns);
    let path = dir.join(format!("{example}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Compares `actual` with a golden file in which `${NS}` stands for `ns`;
/// `FERRY_BLESS=1` rewrites the golden file.
fn assert_golden(golden: &Path, actual: &str, ns: &str) {
    let generic = actual.replace(ns, "${NS}");
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(golden, &generic).unwrap();
    }
    let expected = std::fs::read_to_string(golden)
        .unwrap_or_else(|e| panic!("{}: {e} (FERRY_BLESS=1 writes it)", golden.display()));
    let parse = |text: &str| -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| !v.is_null())
            .collect()
    };
    assert_eq!(
        parse(&generic),
        parse(&expected),
        "transformed objects differ from {}:\n{generic}",
        golden.display()
    );
}

#[tokio::test]
async fn a_v1_24_application_is_restored_into_the_newest_release_with_the_upgrade_plan() {
    let dir = tempfile::tempdir().unwrap();
    let old = env().old();
    let new = env().secondary();
    let old_client = old.client().await;
    let new_client = new.client().await;
    let ns = TestNamespace::create(&old_client, "t-tup").await;
    let n = ns.name.clone();
    let app = include_str!("../../examples/upgrade-rehearsal/app.yaml").replace("${NS}", &n);
    apply_manifests(&old_client, &app).await;
    let repo = backup(&old.kubeconfig, dir.path(), "ledger", &n);

    // The target's profile, saved for offline use.
    let profile = ferry(&new.kubeconfig)
        .args(["cluster", "profile", "-o", "json"])
        .output()
        .unwrap();
    assert!(profile.status.success());
    let profile_path = dir.path().join("target.json");
    std::fs::write(&profile_path, &profile.stdout).unwrap();
    let plan = example_plan("upgrade-rehearsal", &n, dir.path());

    // Offline: the transformed manifests match the golden form.
    let out = ferry(&old.kubeconfig)
        .args(["transform", "ledger", "--repo", &repo, "--plan"])
        .arg(&plan)
        .arg("--target-profile")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifests = String::from_utf8(out.stdout).unwrap();
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/upgrade-rehearsal/expected.yaml");
    assert_golden(&golden, &manifests, &n);

    // --diff names the rule set, the object and the path of each change.
    let diff = ferry(&old.kubeconfig)
        .args(["transform", "ledger", "--repo", &repo, "--diff", "--plan"])
        .arg(&plan)
        .arg("--target-profile")
        .arg(&profile_path)
        .output()
        .unwrap();
    let diff = String::from_utf8(diff.stdout).unwrap();
    // The v1.24 API server already serves these objects at their newest
    // versions (batch/v1, policy/v1, autoscaling/v2), so the backup holds
    // those; api-versions has nothing to convert here (see the next test).
    for expected in [
        format!(
            "storage-class: StatefulSet/{n}/ledger-db: /spec/volumeClaimTemplates/0/spec/storageClassName \"{n}-gp2\" -> \"{n}-standard-rwo\""
        ),
        format!(
            "registry: Deployment/{n}/ledger-api: /spec/template/spec/containers/0/image \"nginx:1.25\" -> \"mirror.example.com/dockerhub/library/nginx:1.25\""
        ),
        format!(
            "zones: StatefulSet/{n}/ledger-db: /spec/template/spec/nodeSelector/topology.kubernetes.io~1zone added \"europe-west1-b\""
        ),
    ] {
        assert!(diff.contains(&expected), "missing {expected} in\n{diff}");
    }

    // Restored into the newest release: every object accepted.
    let _target_ns = TestNamespace::adopt(&new_client, &n);
    let out = ferry(&new.kubeconfig)
        .args(["restore", "ledger", "--repo", &repo, "--transform"])
        .arg(&plan)
        .args(["-o", "json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(result["report"]["failed"].as_array().unwrap().is_empty());
    assert!(
        !result["plan"]["transforms"].as_array().unwrap().is_empty(),
        "the report carries the trace"
    );

    let cronjob = live(
        &new_client,
        &object_ref("batch/v1", "CronJob", Some(&n), "nightly-report"),
    )
    .await;
    assert!(cronjob.is_some(), "the CronJob is served as batch/v1");
    assert!(
        live(
            &new_client,
            &object_ref("policy/v1", "PodDisruptionBudget", Some(&n), "ledger-api")
        )
        .await
        .is_some()
    );
    let hpa = live(
        &new_client,
        &object_ref(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            Some(&n),
            "ledger-api",
        ),
    )
    .await
    .expect("the HPA is served as autoscaling/v2");
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    let sts = live(
        &new_client,
        &object_ref("apps/v1", "StatefulSet", Some(&n), "ledger-db"),
    )
    .await
    .unwrap();
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        format!("{n}-standard-rwo").as_str()
    );
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "mirror.example.com/dockerhub/library/postgres:16.4"
    );
    assert_eq!(
        sts["spec"]["template"]["spec"]["nodeSelector"]["topology.kubernetes.io/zone"],
        "europe-west1-b"
    );
    let class = live(
        &new_client,
        &object_ref(
            "storage.k8s.io/v1",
            "StorageClass",
            None,
            &format!("{n}-standard-rwo"),
        ),
    )
    .await
    .expect("the mapped storage class is restored");
    assert_eq!(class["provisioner"], "pd.csi.storage.gke.io");

    for (client, class) in [
        (&old_client, format!("{n}-gp2")),
        (&new_client, format!("{n}-standard-rwo")),
    ] {
        delete_cluster_scoped(client, "storage.k8s.io/v1", "StorageClass", &class).await;
    }
}

/// Every object of the snapshot as the cluster holds it now, resource
/// versions and managed fields included.
async fn live_state(
    client: &kube::Client,
    repo: &str,
    snapshot: &str,
) -> Vec<(String, Option<Value>)> {
    let backend = std::sync::Arc::new(ferry::repo::LocalBackend::new(PathBuf::from(repo)));
    let key = ferry::repo::KeySource::Password(PASSWORD.to_string().into());
    let repository = ferry::repo::Repository::open(backend, &key).await.unwrap();
    let _lock = repository.lock_shared().await.unwrap();
    let (_, snap) = repository.find_snapshot(snapshot).await.unwrap();
    let content = ferry::backup::load_content(&repository, &snap)
        .await
        .unwrap();
    let mut state = Vec::new();
    for entry in content.objects {
        state.push((entry.object.to_string(), live(client, &entry.object).await));
    }
    state
}

#[tokio::test]
async fn prod_is_cloned_into_a_test_namespace_and_prod_is_left_exactly_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = env().primary();
    let client = cluster.client().await;
    let prod = TestNamespace::create(&client, "t-tcl").await;
    let n = prod.name.clone();
    apply_manifests(&client, &multitier_app(&n)).await;
    let repo = backup(&cluster.kubeconfig, dir.path(), "prod", &n);
    let before = live_state(&client, &repo, "prod").await;
    assert!(before.iter().all(|(_, v)| v.is_some()));

    let test_ns = format!("{n}-test");
    let _clone = TestNamespace::adopt(&client, &test_ns);
    let plan = example_plan("clone-prod", &n, dir.path());
    let out = ferry(&cluster.kubeconfig)
        .args(["restore", "prod", "--repo", &repo, "--transform"])
        .arg(&plan)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );

    // prod: byte for byte what it was. Its cluster-scoped dependencies
    // have the same content; their managed fields and resource versions are
    // not compared because other tests apply the shared CRD concurrently.
    let after = live_state(&client, &repo, "prod").await;
    let content = |v: &Option<Value>| {
        let mut v = v.clone();
        if let Some(meta) = v.as_mut().and_then(|v| v["metadata"].as_object_mut()) {
            for generated in ["managedFields", "resourceVersion", "generation"] {
                meta.remove(generated);
            }
        }
        v
    };
    for ((object, was), (_, is)) in before.iter().zip(&after) {
        if object.matches('/').count() == 2 {
            assert_eq!(was, is, "{object} changed while cloning");
        } else {
            assert_eq!(content(was), content(is), "{object} changed while cloning");
        }
    }

    // The clone: references follow, workloads scaled down, no autoscaler,
    // no load balancer, no production secrets.
    let web = live(
        &client,
        &object_ref("apps/v1", "Deployment", Some(&test_ns), "web"),
    )
    .await
    .expect("the clone's Deployment");
    assert_eq!(web["spec"]["replicas"], 0);
    let config = live(
        &client,
        &object_ref("v1", "ConfigMap", Some(&test_ns), "web-config"),
    )
    .await
    .unwrap();
    assert_eq!(
        config["data"]["DATABASE_HOST"],
        format!("db.{test_ns}.svc.cluster.local").as_str()
    );
    let rb = live(
        &client,
        &object_ref(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            Some(&test_ns),
            "web-view",
        ),
    )
    .await
    .unwrap();
    assert_eq!(rb["subjects"][0]["namespace"], test_ns.as_str());
    let public = live(
        &client,
        &object_ref("v1", "Service", Some(&test_ns), "web-public"),
    )
    .await
    .unwrap();
    assert_eq!(public["spec"]["type"], "ClusterIP");
    assert!(
        live(
            &client,
            &object_ref(
                "autoscaling/v2",
                "HorizontalPodAutoscaler",
                Some(&test_ns),
                "web"
            )
        )
        .await
        .is_none()
    );
    let secret = live(
        &client,
        &object_ref("v1", "Secret", Some(&test_ns), "db-credentials"),
    )
    .await
    .unwrap();
    let prod_secret = live(
        &client,
        &object_ref("v1", "Secret", Some(&n), "db-credentials"),
    )
    .await
    .unwrap();
    assert_ne!(
        secret["data"], prod_secret["data"],
        "secret values are replaced"
    );

    // Cluster-scoped copies that follow the clone's namespace go with the test.
    delete_cluster_scoped(
        &client,
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        &format!("{test_ns}-node-reader"),
    )
    .await;
}

#[tokio::test]
async fn hostile_rules_stop_within_their_budget_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let source = env().primary();
    let target = env().secondary();
    let source_client = source.client().await;
    let target_client = target.client().await;
    let ns = TestNamespace::create(&source_client, "t-thost").await;
    apply_manifests(
        &source_client,
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {}}}\ndata: {{a: b}}\n", ns.name),
    )
    .await;
    let repo = backup(&source.kubeconfig, dir.path(), "small", &ns.name);
    let _guard = TestNamespace::adopt(&target_client, &ns.name);

    let hostile = [
        ("infinite-loop", "loop { }", "operations"),
        ("deep-recursion", "down(0);", "call"),
        ("huge-string", "let s = \"x\"; loop { s += s; }", "string"),
        ("read-a-file", "let text = open(\"/etc/passwd\");", "open"),
        ("read-the-environment", "let home = env(\"HOME\");", "env"),
    ];
    for (name, body, expected) in hostile {
        let script = format!(
            "fn down(n) {{ down(n + 1) }}\nfn transform(obj, params, target) {{\n    {body}\n    obj\n}}\n"
        );
        let plan = serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "TransformPlan",
            "metadata": {"name": name},
            "spec": {"steps": [{"name": name, "script": script}]}
        });
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, serde_yaml_ng::to_string(&plan).unwrap()).unwrap();
        let started = std::time::Instant::now();
        let out = ferry(&target.kubeconfig)
            .args(["restore", "small", "--repo", &repo, "--transform"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{name}: the restore must fail");
        assert!(
            stderr.contains(name),
            "{name}: the error names the rule: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: the error says why ({expected}): {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{name}: stopped within its budget"
        );
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
            Api::all(target_client.clone());
        assert!(
            namespaces.get_opt(&ns.name).await.unwrap().is_none(),
            "{name}: nothing was written to the target"
        );
    }
}

/// Objects as older releases served them, in the versions the newest
/// release no longer serves.
fn legacy_manifests(ns: &str, group: &str) -> String {
    format!(
        r#"
apiVersion: extensions/v1beta1
kind: Ingress
metadata: {{name: web, namespace: {ns}, annotations: {{kubernetes.io/ingress.class: nginx}}}}
spec:
  backend: {{serviceName: web, servicePort: 80}}
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /api
        backend: {{serviceName: api, servicePort: http}}
---
apiVersion: batch/v1beta1
kind: CronJob
metadata: {{name: report, namespace: {ns}}}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{{name: report, image: busybox:1.36}}]
---
apiVersion: policy/v1beta1
kind: PodDisruptionBudget
metadata: {{name: web, namespace: {ns}}}
spec:
  maxUnavailable: 1
  selector: {{matchLabels: {{app: web}}}}
---
apiVersion: autoscaling/v2beta1
kind: HorizontalPodAutoscaler
metadata: {{name: web, namespace: {ns}}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {{name: cpu, targetAverageUtilization: 60}}
  - type: Pods
    pods: {{metricName: requests_per_second, targetAverageValue: "100"}}
---
apiVersion: apiextensions.k8s.io/v1beta1
kind: CustomResourceDefinition
metadata: {{name: gadgets.{group}}}
spec:
  group: {group}
  version: v1
  scope: Namespaced
  names: {{plural: gadgets, singular: gadget, kind: Gadget}}
  validation:
    openAPIV3Schema:
      type: object
      properties:
        spec:
          type: object
          properties:
            size: {{type: integer}}
---
apiVersion: policy/v1beta1
kind: PodSecurityPolicy
metadata: {{name: {ns}-restricted}}
spec:
  privileged: false
  seLinux: {{rule: RunAsAny}}
  runAsUser: {{rule: MustRunAsNonRoot}}
  supplementalGroups: {{rule: RunAsAny}}
  fsGroup: {{rule: RunAsAny}}
  volumes: [configMap, secret]
"#
    )
}

#[tokio::test]
async fn objects_of_removed_api_versions_are_converted_and_accepted_by_the_newest_api_server() {
    let cluster = env().secondary();
    let client = cluster.client().await;
    let ns = TestNamespace::create(&client, "t-tapi").await;
    let group = format!("{}.legacy.ferry.dev", ns.name);
    let objects =
        ferry::cluster::apply::parse_manifests(&legacy_manifests(&ns.name, &group)).unwrap();

    // The newest release's profile, read from the live cluster.
    let conn = ferry::cluster::ConnectOptions {
        kubeconfig: Some(cluster.kubeconfig.clone()),
        context: None,
        timeout: None,
        impersonate: None,
    }
    .connect()
    .await
    .unwrap();
    let discovery = ferry::cluster::discovery::discover(&conn.client)
        .await
        .unwrap();
    let profile = ferry::cluster::profile::read_profile(&conn, &discovery)
        .await
        .unwrap();
    assert!(!profile.serves("batch/v1beta1") && !profile.serves("extensions/v1beta1"));

    let plan = ferry::transform::TransformPlan::from_yaml(
        "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {name: upgrade}\nspec:\n  steps:\n  - ruleSet: api-versions\n",
        "upgrade.yaml",
        None,
    )
    .unwrap();
    let output = ferry::transform::run(&plan, objects, &profile).unwrap();
    let versions: Vec<(String, String)> = output
        .objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["apiVersion"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("Ingress", "networking.k8s.io/v1"),
            ("CronJob", "batch/v1"),
            ("PodDisruptionBudget", "policy/v1"),
            ("HorizontalPodAutoscaler", "autoscaling/v2"),
            ("CustomResourceDefinition", "apiextensions.k8s.io/v1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert!(
        output
            .warnings
            .iter()
            .any(|w| w.message.contains("PodSecurityPolicy")
                && w.message.contains("pod-security.kubernetes.io")),
        "the PodSecurityPolicy is dropped with a pointer to Pod Security Admission: {:?}",
        output.warnings
    );

    // The newest API server accepts every converted object.
    let yaml: Vec<String> = output
        .objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect();
    ferry::cluster::apply::apply_manifests(&client, &yaml.join("---\n"), "ferry-test")
        .await
        .expect("the converted objects apply");
    let ingress = live(
        &client,
        &object_ref("networking.k8s.io/v1", "Ingress", Some(&ns.name), "web"),
    )
    .await
    .unwrap();
    assert_eq!(ingress["spec"]["defaultBackend"]["service"]["name"], "web");
    assert_eq!(
        ingress["spec"]["defaultBackend"]["service"]["port"]["number"],
        80
    );
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["name"],
        "http"
    );
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    let hpa = live(
        &client,
        &object_ref(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            Some(&ns.name),
            "web",
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        60
    );
    assert_eq!(
        hpa["spec"]["metrics"][1]["pods"]["metric"]["name"],
        "requests_per_second"
    );
    let crd = live(
        &client,
        &object_ref(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            &format!("gadgets.{group}"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["size"]["type"],
        "integer"
    );
    assert!(
        live(
            &client,
            &object_ref("batch/v1", "CronJob", Some(&ns.name), "report")
        )
        .await
        .is_some()
    );
    assert!(
        live(
            &client,
            &object_ref("policy/v1", "PodDisruptionBudget", Some(&ns.name), "web")
        )
        .await
        .is_some()
    );
    delete_cluster_scoped(
        &client,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        &format!("gadgets.{group}"),
    )
    .await;
}
