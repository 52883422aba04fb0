//! Shared support for the end-to-end tests: the running test environment
//! (real kube-apiservers, controller-managers and MinIO started by
//! `scripts/testenv up`), clients for its users, and per-test namespaces and
//! buckets so tests run in parallel without seeing each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Env {
    pub clusters: BTreeMap<String, ClusterInfo>,
    pub s3: S3Info,
    /// Client tools built with the components, by name (`helm`).
    #[serde(default)]
    pub tools: BTreeMap<String, PathBuf>,
    /// Directories of public operators' CRDs, by project
    /// (`scripts/testenv build crds`).
    #[serde(default)]
    pub public_crds: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub version: String,
    pub server: String,
    pub kubeconfig: PathBuf,
    pub admin_token: String,
    pub users: BTreeMap<String, UserInfo>,
    /// The cluster's real node (`NAME=new+node`), if it has one.
    #[serde(default)]
    pub node: Option<NodeInfo>,
    /// The client URL of the cluster's etcd (tests compact it).
    #[serde(default)]
    pub etcd: Option<String>,
}

/// The one node of a `new+node` cluster: a kubelet with containerd on this
/// machine, a CSI driver with snapshots, and locally built images.
#[derive(Debug, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub ip: String,
    /// Manifests here become static Pods of the node.
    pub static_pod_dir: PathBuf,
    pub storage_class: String,
    pub snapshot_class: String,
    pub csi_driver: String,
    /// MinIO as Pods on the node reach it.
    pub s3_endpoint: String,
    /// Image references by role: `pause`, `busybox` and, when the
    /// environment was started with a ferry binary, `ferry`.
    pub images: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub struct UserInfo {
    pub token: String,
    /// The one namespace where the user has `edit`, if any.
    pub edit_namespace: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct S3Info {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

/// Where `scripts/testenv` keeps the description of the running environment.
fn env_file() -> PathBuf {
    if let Ok(path) = std::env::var("FERRY_TESTENV") {
        return PathBuf::from(path);
    }
    let state = std::env::var("FERRY_TESTENV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from("/tmp"))
                .join("ferry-testenv")
        });
    state.join("env.json")
}

/// The running test environment. Panics with instructions when none runs:
/// these tests exist to prove behaviour on real API servers, so they never
/// quietly pass without one.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        ferry::cluster::connect::install_crypto_provider();
        let path = env_file();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "no Ferry test environment at {} ({e}).\n\
                 Start one with `scripts/testenv build && scripts/testenv up` \
                 (or run everything with `scripts/test`).",
                path.display()
            )
        });
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{} is not a test environment description: {e}",
                path.display()
            )
        })
    })
}

/// The pinned versions the environment was built from.
pub fn pinned_versions() -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testenv-versions.env");
    std::fs::read_to_string(&path)
        .expect("scripts/testenv-versions.env")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

impl Env {
    pub fn cluster(&self, name: &str) -> &ClusterInfo {
        self.clusters.get(name).unwrap_or_else(|| {
            panic!(
                "the test environment has no cluster '{name}' (it has {:?}); start it with \
                 `scripts/testenv up --clusters a=new,b=new,old=old`",
                self.clusters.keys().collect::<Vec<_>>()
            )
        })
    }

    /// Cluster 'a': the newest Kubernetes.
    pub fn primary(&self) -> &ClusterInfo {
        self.cluster("a")
    }

    /// A second cluster of the newest version, for cross-cluster tests.
    pub fn secondary(&self) -> &ClusterInfo {
        self.cluster("b")
    }

    /// The v1.24 cluster, for version-upgrade tests.
    pub fn old(&self) -> &ClusterInfo {
        self.cluster("old")
    }

    /// The first cluster with a real node, for tests of Pods and volume data.
    pub fn with_node(&self) -> (&ClusterInfo, &NodeInfo) {
        self.clusters
            .values()
            .find_map(|c| c.node.as_ref().map(|n| (c, n)))
            .unwrap_or_else(|| {
                panic!(
                    "the test environment has no cluster with a node (it has {:?}); start one with \
                     `scripts/testenv up --clusters a=new,b=new,old=old,node=new+node`",
                    self.clusters.keys().collect::<Vec<_>>()
                )
            })
    }
}

impl ClusterInfo {
    pub async fn client(&self) -> kube::Client {
        self.client_with_token(&self.admin_token).await
    }

    pub async fn client_as(&self, user: &str) -> kube::Client {
        let info = self
            .users
            .get(user)
            .unwrap_or_else(|| panic!("no test user '{user}'"));
        self.client_with_token(&info.token).await
    }

    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig of the test cluster");
        config.auth_info.token = Some(token.to_string().into());
        kube::Client::try_from(config).expect("client for the test cluster")
    }

    /// A kubeconfig file for `user` (for running the `ferry` binary as that user).
    pub fn kubeconfig_for(&self, user: &str, dir: &Path) -> PathBuf {
        let token = &self
            .users
            .get(user)
            .unwrap_or_else(|| panic!("no test user '{user}'"))
            .token;
        let text = std::fs::read_to_string(&self.kubeconfig).expect("read kubeconfig");
        let text = text.replace(&self.admin_token, token);
        let path = dir.join(format!("{}-{user}.kubeconfig", self.name));
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

/// A unique name for a test's namespace or bucket: readable prefix plus random suffix.
pub fn unique_name(prefix: &str) -> String {
    let suffix: u32 = rand::random();
    format!("{prefix}-{suffix:08x}")
}

/// A namespace that belongs to one test; deleted (in the background) when dropped.
pub struct TestNamespace {
    pub name: String,
    client: kube::Client,
}

impl TestNamespace {
    pub async fn create(client: &kube::Client, prefix: &str) -> Self {
        Self::create_named(client, &unique_name(prefix)).await
    }

    /// Takes ownership of a namespace something else created, so the test cleans it up.
    pub fn adopt(client: &kube::Client, name: &str) -> Self {
        TestNamespace {
            name: name.to_string(),
            client: client.clone(),
        }
    }

    pub async fn create_named(client: &kube::Client, name: &str) -> Self {
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ferry.dev/test": "true"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        TestNamespace {
            name: name.to_string(),
            client: client.clone(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn s3_client() -> aws_sdk_s3::Client {
    let s3 = &env().s3;
    let creds = aws_sdk_s3::config::Credentials::new(
        &s3.access_key,
        &s3.secret_key,
        None,
        None,
        "ferry-testenv",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(s3.region.clone()))
        .endpoint_url(&s3.endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// A bucket that belongs to one test.
pub async fn fresh_bucket(prefix: &str) -> String {
    let name = unique_name(prefix);
    s3_client()
        .await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create bucket {name}: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
    name
}

/// Gives token user `user` the built-in `edit` role in `namespace`, and
/// nothing else.
pub async fn grant_edit(admin: &kube::Client, namespace: &str, user: &str) {
    let binding: k8s_openapi::api::rbac::v1::RoleBinding =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{user}-edit")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }))
        .expect("a RoleBinding");
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap_or_else(|e| panic!("binding {user} to edit in {namespace}: {e}"));
}

/// Applies a multi-document YAML manifest with server-side apply.
pub async fn apply_manifests(client: &kube::Client, yaml: &str) {
    ferry::cluster::apply::apply_manifests(client, yaml, "ferry-test")
        .await
        .unwrap_or_else(|e| panic!("applying the fixture: {e}"));
}

/// The multi-tier fixture application for namespace `ns`.
pub fn multitier_app(ns: &str) -> String {
    include_str!("../../examples/shop/app.yaml").replace("${NS}", ns)
}

/// The `ferry` binary, pointed at a cluster's kubeconfig and a repository password.
pub fn ferry(kubeconfig: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("ferry").expect("ferry binary");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        )
        .env("KUBECONFIG", kubeconfig)
        .env("FERRY_PASSWORD", "correct horse battery staple")
        .timeout(Duration::from_secs(300));
    cmd
}

/// S3 settings for `ferry` against the test MinIO.
pub fn with_s3(cmd: &mut assert_cmd::Command) -> &mut assert_cmd::Command {
    let s3 = &env().s3;
    cmd.env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_REGION", &s3.region)
        .env("FERRY_S3_ENDPOINT", &s3.endpoint)
}

/// The reference of an object by apiVersion, kind, namespace and name.
pub fn object_ref(
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> ferry::model::ObjectRef {
    let (group, version) = ferry::model::object::split_api_version(api_version);
    ferry::model::ObjectRef {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        namespace: namespace.map(String::from),
        name: name.into(),
    }
}

/// The object as the cluster holds it now, or None.
pub async fn live(
    client: &kube::Client,
    object: &ferry::model::ObjectRef,
) -> Option<serde_json::Value> {
    let gvk = kube::core::GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await.ok()?;
    let api: Api<kube::api::DynamicObject> = match &object.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.get_opt(&object.name)
        .await
        .ok()?
        .map(|o| serde_json::to_value(o).unwrap())
}

/// A fresh local repository in `dir`.
pub fn init_repo(kubeconfig: &Path, dir: &Path) -> String {
    let repo = dir.join("repo").to_str().unwrap().to_string();
    ferry(kubeconfig)
        .args(["repo", "init", "--repo", &repo])
        .assert()
        .success();
    repo
}

/// `ferry ARGS -o json`: whether it succeeded, its JSON and its stderr.
/// `ferry ARGS`, which must succeed; returns its stdout and stderr.
pub fn run_ok(kubeconfig: &Path, args: &[&str]) -> (String, String) {
    let out = ferry(kubeconfig).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ferry {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

pub fn run_json(kubeconfig: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    output_json(ferry(kubeconfig).args(args))
}

/// Runs `cmd -o json`: whether it succeeded, its JSON and its stderr.
pub fn output_json(cmd: &mut assert_cmd::Command) -> (bool, serde_json::Value, String) {
    let out = cmd.args(["-o", "json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), value, stderr)
}
