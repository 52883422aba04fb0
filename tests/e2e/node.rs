//! The test node (`scripts/testenv up --clusters NAME=new+node`): real Pods
//! on a real kubelet with containerd, volumes of the CSI driver, snapshots
//! through the upstream provisioner and snapshotter, logs and exec through
//! the API server. Every test here needs a cluster with a node.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, ApiResource, AttachParams, DynamicObject, LogParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::support::{
    NodeInfo, TestNamespace, env, eventually, ferry, fresh_bucket, unique_name, with_s3,
};

pub(crate) const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// A test namespace whose `default` ServiceAccount exists: until the
/// controller-manager has made it, admission refuses every Pod.
pub(crate) async fn namespace_for_pods(client: &kube::Client, prefix: &str) -> TestNamespace {
    let ns = TestNamespace::create(client, prefix).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    eventually("the default ServiceAccount", POD_TIMEOUT, || async {
        accounts.get_opt("default").await.ok().flatten()
    })
    .await;
    ns
}

/// Takes VolumeSnapshot `snap` of `claim` through the upstream
/// snapshot-controller and csi-snapshotter and waits until it is ready.
pub(crate) async fn snapshot_ready(
    client: &kube::Client,
    ns: &str,
    claim: &str,
    class: Option<&str>,
) {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
    let mut spec = json!({"source": {"persistentVolumeClaimName": claim}});
    if let Some(class) = class {
        spec["volumeSnapshotClassName"] = json!(class);
    }
    let snapshot: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap"}, "spec": spec
    }))
    .unwrap();
    snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .expect("create VolumeSnapshot");
    eventually("VolumeSnapshot snap to be ready", POD_TIMEOUT, || async {
        let snap = snapshots.get("snap").await.ok()?;
        (snap.data["status"]["readyToUse"] == json!(true)).then_some(())
    })
    .await;
}

pub(crate) async fn create<K>(api: &Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid fixture");
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create fixture: {e}"))
}

/// A Pod of the busybox image that runs `script` once, with claim `claim`
/// mounted at /data.
fn busybox_pod(node: &NodeInfo, name: &str, claim: &str, script: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        }
    })
}

fn claim(name: &str, class: &str, data_source: Option<serde_json::Value>) -> serde_json::Value {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": class,
        "resources": {"requests": {"storage": "16Mi"}}
    });
    if let Some(source) = data_source {
        spec["dataSource"] = source;
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})
}

/// A Pod of the Ferry image that runs `ferry ARGS` once, with `env`.
fn ferry_pod(
    node: &NodeInfo,
    name: &str,
    args: &[&str],
    env: serde_json::Value,
) -> serde_json::Value {
    let image = node.images.get("ferry").unwrap_or_else(|| {
        panic!("the test node has no Ferry image: start the environment after `cargo build` (or with --ferry-binary)")
    });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "ferry", "image": image, "imagePullPolicy": "Never", "args": args, "env": env
        }]}
    })
}

/// Waits for a Pod to finish and returns its phase and what it printed.
pub(crate) async fn finished(pods: &Api<Pod>, name: &str) -> (String, String) {
    let phase = eventually(&format!("Pod {name} to finish"), POD_TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        let phase = pod.status?.phase?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    })
    .await;
    let logs = pods
        .logs(name, &LogParams::default())
        .await
        .unwrap_or_else(|e| panic!("logs of Pod {name} through the API server: {e}"));
    (phase, logs)
}

pub(crate) async fn pod_ready(pods: &Api<Pod>, name: &str) {
    eventually(&format!("Pod {name} to be Ready"), POD_TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        pod.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await
}

#[tokio::test]
async fn node_csi_volume_survives_snapshot_and_restore_and_pods_answer_logs_and_exec() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-csi").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let token = unique_name("written-by-the-first-pod");

    // The driver registered itself with the kubelet, which published it.
    let csi_nodes: Api<CSINode> = Api::all(client.clone());
    let registered = csi_nodes
        .get(&node.name)
        .await
        .expect("CSINode of the node");
    assert!(
        registered
            .spec
            .drivers
            .iter()
            .any(|d| d.name == node.csi_driver),
        "CSINode {} lists {}",
        node.name,
        node.csi_driver
    );

    create(&claims, claim("source", &node.storage_class, None)).await;
    create(
        &pods,
        busybox_pod(
            node,
            "writer",
            "source",
            &format!("echo {token} > /data/hello.txt && sync && echo wrote"),
        ),
    )
    .await;
    let (phase, logs) = finished(&pods, "writer").await;
    assert_eq!(
        (phase.as_str(), logs.trim()),
        ("Succeeded", "wrote"),
        "the writer Pod"
    );

    snapshot_ready(&client, &ns.name, "source", Some(&node.snapshot_class)).await;

    // The source changes after the snapshot; the restored claim must not see it.
    create(
        &pods,
        busybox_pod(
            node,
            "overwriter",
            "source",
            "echo changed > /data/hello.txt",
        ),
    )
    .await;
    assert_eq!(finished(&pods, "overwriter").await.0, "Succeeded");

    create(
        &claims,
        claim(
            "restored",
            &node.storage_class,
            Some(json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"})),
        ),
    )
    .await;
    eventually("claim restored to be Bound", POD_TIMEOUT, || async {
        let pvc = claims.get("restored").await.ok()?;
        (pvc.status?.phase? == "Bound").then_some(())
    })
    .await;
    create(
        &pods,
        busybox_pod(node, "reader", "restored", "cat /data/hello.txt"),
    )
    .await;
    let (phase, logs) = finished(&pods, "reader").await;
    assert_eq!(phase, "Succeeded", "the reader Pod: {logs}");
    assert_eq!(
        logs.trim(),
        token,
        "the volume restored from the snapshot holds what was written before it"
    );

    // Exec through the API server into a running Pod that mounts the source.
    create(
        &pods,
        busybox_pod(node, "shell", "source", "exec sleep 3600"),
    )
    .await;
    pod_ready(&pods, "shell").await;
    let mut attached = pods
        .exec(
            "shell",
            ["sh", "-c", "cat /data/hello.txt; id -u"],
            &AttachParams::default().stdout(true).stderr(false),
        )
        .await
        .expect("exec through the API server");
    let mut out = String::new();
    attached
        .stdout()
        .expect("stdout of exec")
        .read_to_string(&mut out)
        .await
        .unwrap();
    attached.join().await.unwrap();
    assert_eq!(out, "changed\n0\n", "exec output");
}

#[tokio::test]
async fn node_block_volume_survives_snapshot_and_restore() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-block").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let token = unique_name("block");
    let mut source = claim("source", &node.storage_class, None);
    source["spec"]["volumeMode"] = json!("Block");
    create(&claims, source).await;

    // A raw device in the Pod: the token in the first sector, 1 MiB in.
    let block_pod = |name: &str, claim: &str, script: &str| {
        let mut pod = busybox_pod(node, name, claim, script);
        let container = &mut pod["spec"]["containers"][0];
        container.as_object_mut().unwrap().remove("volumeMounts");
        container["volumeDevices"] = json!([{"name": "data", "devicePath": "/dev/data"}]);
        pod
    };
    create(
        &pods,
        block_pod(
            "writer",
            "source",
            &format!("echo {token} | dd of=/dev/data bs=512 seek=2048 conv=sync,fsync 2>/dev/null && echo wrote"),
        ),
    )
    .await;
    let (phase, logs) = finished(&pods, "writer").await;
    assert_eq!((phase.as_str(), logs.trim()), ("Succeeded", "wrote"));

    // No class named: the node's class is the default.
    snapshot_ready(&client, &ns.name, "source", None).await;

    let mut restored = claim(
        "restored",
        &node.storage_class,
        Some(
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}),
        ),
    );
    restored["spec"]["volumeMode"] = json!("Block");
    create(&claims, restored).await;
    create(
        &pods,
        block_pod(
            "reader",
            "restored",
            "dd if=/dev/data bs=512 skip=2048 count=1 2>/dev/null | head -n 1",
        ),
    )
    .await;
    let (phase, logs) = finished(&pods, "reader").await;
    assert_eq!(phase, "Succeeded", "the reader Pod: {logs}");
    assert_eq!(logs.trim_end_matches(['\0', '\n']), token);
}

#[tokio::test]
async fn node_runs_a_static_pod_and_a_deployment_to_ready() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-ready").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // A static Pod: the kubelet runs it from a file and mirrors it in the API.
    let name = unique_name("static");
    let manifest = node.static_pod_dir.join(format!("{name}.json"));
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = RemoveOnDrop(manifest.clone());
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns.name},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
            "command": ["sleep", "3600"]
        }]}
    });
    std::fs::write(&manifest, pod.to_string()).expect("write static Pod manifest");
    pod_ready(&pods, &format!("{name}-{}", node.name)).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    create(
        &deployments,
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                        "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "touch /tmp/ready && exec sleep 3600"],
                        "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1}
                    }]}
                }
            }
        }),
    )
    .await;
    eventually(
        "Deployment web to have 2 ready replicas",
        POD_TIMEOUT,
        || async {
            let d = deployments.get("web").await.ok()?;
            (d.status?.ready_replicas? == 2).then_some(())
        },
    )
    .await;
    let scheduled = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("web-"))
        })
        .map(|p| p.spec.and_then(|s| s.node_name))
        .collect::<Vec<_>>();
    assert_eq!(
        scheduled,
        vec![Some(node.name.clone()), Some(node.name.clone())],
        "the scheduler placed both replicas on the node"
    );
    // Pod addresses come from the node's own bridge subnet.
    let subnet = node.ip.rsplit_once('.').unwrap().0.to_string() + ".";
    for pod in pods.list(&Default::default()).await.unwrap().items {
        let ip = pod.status.and_then(|s| s.pod_ip).unwrap_or_default();
        assert!(
            ip.starts_with(&subnet),
            "Pod {:?} has address {ip:?}, outside the node's bridge {subnet}0/24",
            pod.metadata.name
        );
    }
}

#[tokio::test]
async fn node_binds_a_statefulset_claim_template_to_a_provisioned_volume() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-sts").await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    // No storageClassName: the node's class is the cluster default.
    create(
        &sets,
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {
                "replicas": 1,
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                        "name": "main", "image": node.images["busybox"], "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "echo row-1 >> /var/lib/db/table && exec sleep 3600"],
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}]
                    }]}
                },
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Mi"}}}
                }]
            }
        }),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let pvc = eventually("claim data-db-0 to be Bound", POD_TIMEOUT, || async {
        let pvc = claims.get("data-db-0").await.ok()?;
        (pvc.status.as_ref()?.phase.as_deref()? == "Bound").then_some(pvc)
    })
    .await;
    let spec = pvc.spec.unwrap();
    assert_eq!(
        spec.storage_class_name.as_deref(),
        Some(node.storage_class.as_str())
    );
    assert!(
        spec.volume_name.is_some_and(|v| v.starts_with("pvc-")),
        "bound to a provisioned volume"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pod_ready(&pods, "db-0").await;
}

#[tokio::test]
async fn node_runs_the_ferry_image() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-ferry").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    create(&pods, ferry_pod(node, "ferry", &["--version"], json!([]))).await;
    let (phase, logs) = finished(&pods, "ferry").await;
    assert_eq!(phase, "Succeeded", "ferry --version in its image: {logs}");
    assert!(
        logs.contains(env!("CARGO_PKG_VERSION")),
        "ferry --version printed {logs:?}"
    );
}

/// The kubelet's own API as a caller with `token` (or none) would reach it.
async fn kubelet_status(
    cluster: &crate::support::ClusterInfo,
    address: &str,
    token: Option<&str>,
) -> u16 {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.cluster_url = address.parse().unwrap();
    config.auth_info.token = token.map(|t| t.to_string().into());
    let client = kube::Client::try_from(config).unwrap();
    let request = http::Request::get("/pods").body(Vec::new()).unwrap();
    match client.request_text(request).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("calling the kubelet at {address}: {e}"),
    }
}

#[tokio::test]
async fn node_kubelet_refuses_anonymous_and_unauthorized_callers() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let status = nodes.get(&node.name).await.unwrap().status.unwrap();
    let port = status
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    let internal_ip = status
        .addresses
        .unwrap()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .expect("the node reports an InternalIP")
        .address;
    assert_eq!(internal_ip, node.ip, "the node's address is its bridge's");
    // The kubelet's serving certificate is the cluster CA's, for that address.
    let address = format!("https://{internal_ip}:{port}");
    assert_eq!(
        kubelet_status(cluster, &address, None).await,
        401,
        "anonymous request to the kubelet"
    );
    assert_eq!(
        kubelet_status(cluster, &address, Some(&cluster.users["user-1"].token)).await,
        403,
        "a user without nodes/proxy rights, authorized by the API server"
    );
    assert_eq!(
        kubelet_status(cluster, &address, Some(&cluster.admin_token)).await,
        200,
        "the cluster admin, authorized by the API server"
    );
}

#[tokio::test]
async fn node_pods_reach_the_api_server_with_in_cluster_configuration() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-in-cluster").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // No kubeconfig in the image: ferry uses the Pod's ServiceAccount token
    // and the 'kubernetes' Service address the kubelet puts in its
    // environment, as a controller running in the cluster would.
    create(
        &pods,
        ferry_pod(
            node,
            "profile",
            &["cluster", "profile", "-o", "json"],
            json!([]),
        ),
    )
    .await;
    let (phase, logs) = finished(&pods, "profile").await;
    assert_eq!(phase, "Succeeded", "ferry cluster profile in a Pod: {logs}");
    assert!(
        logs.contains(&cluster.version),
        "the profile read in the cluster names its version {}: {logs}",
        cluster.version
    );
}

#[tokio::test]
async fn node_pods_write_a_repository_to_the_environments_s3() {
    let (cluster, node) = env().with_node();
    let client = cluster.client().await;
    let ns = namespace_for_pods(&client, "node-s3").await;
    let bucket = fresh_bucket("node-s3").await;
    let s3 = &env().s3;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // A Pod creates a repository in MinIO, as a mover Pod writes one.
    let repo = format!("s3://{bucket}/from-a-pod");
    let credentials = json!([
        {"name": "FERRY_S3_ENDPOINT", "value": node.s3_endpoint},
        {"name": "AWS_ACCESS_KEY_ID", "value": s3.access_key},
        {"name": "AWS_SECRET_ACCESS_KEY", "value": s3.secret_key},
        {"name": "AWS_REGION", "value": s3.region},
        {"name": "FERRY_PASSWORD", "value": "correct horse battery staple"}
    ]);
    create(
        &pods,
        ferry_pod(
            node,
            "init",
            &["repo", "init", "--repo", &repo],
            credentials,
        ),
    )
    .await;
    let (phase, logs) = finished(&pods, "init").await;
    assert_eq!(phase, "Succeeded", "ferry repo init in a Pod: {logs}");
    // The repository the Pod wrote opens from this machine.
    let dir = tempfile::tempdir().unwrap();
    let mut stats = ferry(&cluster.kubeconfig_for("user-1", dir.path()));
    with_s3(&mut stats)
        .args([
            "repo",
            "stats",
            "--repo",
            &format!("s3://{bucket}/from-a-pod"),
        ])
        .assert()
        .success();
}
