//! The controller as users run it: installed by its Helm chart into a
//! cluster with a node, from the Ferry image of this build, with the chart's
//! own RBAC and admission policy. A scheduled policy backs up a namespace
//! with a volume (and a block volume read by the blocks its driver
//! reports), and a namespace user restores it through a Restore.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use ferry::controller::crd::{Backup, BackupPolicy, Repository, Restore};
use ferry::controller::{CONTROLLER_NAME, LABEL_INSTANCE, LABEL_POLICY};

use crate::node::{POD_TIMEOUT, create, namespace_for_pods};
use crate::support::*;
use crate::volumes::{app_output, clean_up, files_deployment, line};

const PASSWORD: &str = "correct horse battery staple";

/// A Helm release of this test; uninstalled when dropped, so the chart's
/// cluster-scoped objects do not outlive it.
struct Release {
    helm: PathBuf,
    kubeconfig: PathBuf,
    namespace: String,
    home: tempfile::TempDir,
}

impl Release {
    fn helm(&self) -> Command {
        let mut command = Command::new(&self.helm);
        let home = self.home.path();
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .args(["--namespace", &self.namespace]);
        command
    }

    fn install(&self, chart: &Path, settings: &[String]) {
        let out = self
            .helm()
            .args(["install", "ferry"])
            .arg(chart)
            .args(["--wait", "--timeout", "4m"])
            .args(settings.iter().flat_map(|s| ["--set", s.as_str()]))
            .output()
            .expect("run helm");
        assert!(
            out.status.success(),
            "helm install: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.helm().args(["uninstall", "ferry", "--wait"]).output();
    }
}

async fn create_secret(client: &kube::Client, ns: &str, name: &str, data: Value) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

#[tokio::test]
async fn node_the_controller_installed_by_its_helm_chart_backs_up_on_schedule_and_restores_for_a_namespace_user()
 {
    let (cluster, node) = env().with_node();
    let helm = env().tools.get("helm").cloned().unwrap_or_else(|| {
        panic!("the test environment has no helm: `scripts/testenv build` builds it with the node stack")
    });
    let image = node.images.get("ferry").unwrap_or_else(|| {
        panic!("the node has no Ferry image: start the environment with --ferry-binary")
    });
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let admin = cluster.client().await;
    let system = namespace_for_pods(&admin, "t-helm").await;
    let app = namespace_for_pods(&admin, "t-helm-app").await;
    let protect = unique_name("nightly");
    Api::<Namespace>::all(admin.clone())
        .patch(
            &app.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"protect": protect}}})),
        )
        .await
        .unwrap();

    // The application: a Deployment writing known data into its claim, and
    // a ConfigMap.
    files_deployment(&admin, node, &app.name, json!({}), json!({})).await;
    let (_, fresh) = app_output(&admin, &app.name, "files").await;
    assert!(fresh.contains("FRESH"), "{fresh}");
    let sums = line(&fresh, "SUMS").to_string();
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &app.name);
    let settings: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))
            .unwrap();
    config_maps
        .create(&PostParams::default(), &settings)
        .await
        .unwrap();
    // A block-mode claim: the driver reports its blocks (changed-block
    // tracking), which the controller asks for with its own token.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &app.name);
    create(
        &claims,
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "disk", "namespace": app.name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": node.storage_class,
                     "volumeMode": "Block", "resources": {"requests": {"storage": "16Mi"}}}
        }),
    )
    .await;

    // The chart, from this checkout, with the image of this build. One
    // replica: the Lease test lives elsewhere.
    let release = Release {
        helm,
        kubeconfig: cluster.kubeconfig.clone(),
        namespace: system.name.clone(),
        home: tempfile::tempdir().unwrap(),
    };
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/ferry");
    release.install(
        &chart,
        &[
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".into(),
            "replicas=1".into(),
            format!("instance={}", system.name),
            "checkInterval=1h".into(),
            "logFormat=text".into(),
        ],
    );

    // A repository in MinIO, reached from the Pod through the node, created
    // by the controller itself.
    let bucket = fresh_bucket("t-helm").await;
    let s3 = &env().s3;
    create_secret(
        &admin,
        &system.name,
        "repo-key",
        json!({"password": PASSWORD}),
    )
    .await;
    create_secret(
        &admin,
        &system.name,
        "s3",
        json!({"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}),
    )
    .await;
    let instance = json!({LABEL_INSTANCE: system.name});
    let repositories: Api<Repository> = Api::all(admin.clone());
    create(
        &repositories,
        json!({
                "apiVersion": "ferry.dev/v1alpha1", "kind": "Repository",
                "metadata": {"name": system.name, "labels": instance},
                "spec": {
                    "location": format!("s3://{bucket}/repo"),
                    "s3Endpoint": node.s3_endpoint, "s3Region": s3.region,
                    "credentialsSecret": {"name": "s3", "namespace": system.name},
                    "keySecret": {"name": "repo-key", "namespace": system.name},
                    "initialize": true,
                    // One mover at a time, and one per node.
                    "moverConcurrency": 1, "moverConcurrencyPerNode": 1,
                },
        }),
    )
    .await;

    // A policy on a short schedule protects the labelled namespace.
    let policies: Api<BackupPolicy> = Api::all(admin.clone());
    create(
        &policies,
        json!({
                "apiVersion": "ferry.dev/v1alpha1", "kind": "BackupPolicy",
                "metadata": {"name": system.name, "labels": instance},
                "spec": {
                    "repository": system.name,
                    "schedule": "*/5 * * * * *",
                    "namespaceSelector": {"matchLabels": {"protect": protect}},
                    "retention": {"keepLast": 3},
                },
        }),
    )
    .await;
    let snapshot = eventually(
        "a scheduled backup of the application",
        Duration::from_secs(240),
        || async {
            let status = policies.get(&system.name).await.ok()?.status?;
            let run = status.namespaces.iter().find(|r| r.namespace == app.name)?;
            run.last_success_time.as_ref()?;
            run.last_snapshot.clone()
        },
    )
    .await;
    // Nothing runs while users restore: retention must not remove what the
    // restore reads.
    policies
        .patch(
            &system.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();

    // The work was done by the chart's Pod: it holds the Lease.
    let lease = Api::<Lease>::namespaced(admin.clone(), &system.name)
        .get(&format!("{CONTROLLER_NAME}-{}", system.name))
        .await
        .expect("the controller's Lease");
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &system.name);
    let pod = pods.get(&holder).await.expect("the Lease holder is a Pod");
    assert_eq!(
        pod.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "{holder}"
    );

    // The policy's record of that snapshot, in the application's namespace,
    // with the volume's data moved into the repository.
    let backups: Api<Backup> = Api::namespaced(admin.clone(), &app.name);
    let records = backups
        .list(&ListParams::default().labels(&format!("{LABEL_POLICY}={}", system.name)))
        .await
        .unwrap();
    let record = records
        .items
        .iter()
        .find(|b| {
            b.status.as_ref().and_then(|s| s.snapshot_name.as_deref()) == Some(snapshot.as_str())
        })
        .unwrap_or_else(|| panic!("no Backup record of {snapshot} in {}", app.name));
    let record_name = record.metadata.name.clone().unwrap();
    let record_status = serde_json::to_value(record.status.as_ref().unwrap()).unwrap();
    assert_eq!(record_status["phase"], "Completed", "{record_status}");
    let repo_url = format!("s3://{bucket}/repo");
    let (ok, described, stderr) = output_json(
        with_s3(&mut ferry(&cluster.kubeconfig))
            .args(["backup", "describe", &snapshot, "--repo", &repo_url]),
    );
    assert!(ok, "{stderr}");
    let report = &described["content"]["report"];
    let volume = |claim: &str| {
        report["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|e| e["claim"] == claim))
            .unwrap_or_else(|| panic!("no volume {claim}: {report}"))
    };
    assert_eq!(
        volume("files")["method"],
        "snapshot-move",
        "the policy moved the claim's data by default: {report}"
    );
    // The block claim was read by the blocks the driver reported, with
    // the controller's own token, and its snapshot kept as the next base.
    let disk = volume("disk");
    assert_eq!(disk["block"], true, "{disk}");
    assert!(
        disk["stats"]["bytesChanged"].is_u64(),
        "{disk}
{report}"
    );
    assert!(disk["changeBase"]["volumeSnapshot"].is_string(), "{disk}");
    let warnings = report["warnings"].to_string();
    assert!(!warnings.contains("changed-block"), "{warnings}");

    // Disaster in the application's namespace.
    Api::<Deployment>::namespaced(admin.clone(), &app.name)
        .delete("files", &Default::default())
        .await
        .unwrap();
    config_maps
        .delete("settings", &Default::default())
        .await
        .unwrap();
    eventually("the Pod of files to be gone", POD_TIMEOUT, || async {
        let list = Api::<Pod>::namespaced(admin.clone(), &app.name)
            .list(&ListParams::default().labels("app=files"))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    for claim in ["files", "disk"] {
        claims.delete(claim, &Default::default()).await.unwrap();
        eventually("the claim to be gone", POD_TIMEOUT, || async {
            matches!(claims.get_opt(claim).await, Ok(None)).then_some(())
        })
        .await;
    }

    // A user with `edit` in the namespace, and nothing else, restores it.
    grant_edit(&admin, &app.name, "user-6").await;
    let user = cluster.client_as("user-6").await;
    let restores: Api<Restore> = Api::namespaced(user.clone(), &app.name);
    let restore: Restore = serde_json::from_value(json!({
        "apiVersion": "ferry.dev/v1alpha1", "kind": "Restore",
        "metadata": {"name": "back", "labels": instance},
        "spec": {"backup": record_name},
    }))
    .unwrap();
    let created = restores
        .create(&PostParams::default(), &restore)
        .await
        .expect("a namespace user creates a Restore");
    assert_eq!(created.spec.requester.unwrap().username, "user-6");
    let status = eventually(
        "the restore to finish",
        Duration::from_secs(240),
        || async {
            let status =
                serde_json::to_value(restores.get("back").await.ok()?).ok()?["status"].clone();
            matches!(status["phase"].as_str(), Some("Completed" | "Failed")).then_some(status)
        },
    )
    .await;
    assert_eq!(status["phase"], "Completed", "{status}");

    // The workload started on its restored data, and the ConfigMap is back.
    let (_, restored) = app_output(&admin, &app.name, "files").await;
    assert!(
        restored.contains("FOUND"),
        "{restored}\nbackup: {record_status}\nrestore: {status}"
    );
    assert_eq!(line(&restored, "SUMS"), sums);
    assert!(config_maps.get_opt("settings").await.unwrap().is_some());
    assert!(claims.get_opt("disk").await.unwrap().is_some());

    let _ = policies.delete(&system.name, &Default::default()).await;
    let _ = repositories.delete(&system.name, &Default::default()).await;
    drop(release);
    clean_up(&admin, &[&app.name, &system.name]).await;
}
