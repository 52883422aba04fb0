//! `ferry controller`: Ferry as a service. Reconciles the `ferry.dev`
//! resources with the same library the CLI uses:
//!
//! - [`crd::Repository`]: opens it, reports reachability and size;
//! - [`crd::BackupPolicy`]: on its schedule, one snapshot per selected
//!   namespace (namespaces labelled later included), then retention;
//! - [`crd::Backup`] and [`crd::Restore`]: one-off requests in a namespace,
//!   carried out *as the user who created them* (their identity is written
//!   at admission by the `ferry-requester` policy and impersonated), and
//!   confined to their namespace, so the controller never lends its own
//!   power to a namespace user.
//!
//! Only the holder of the Lease works ([`lease`]); `/metrics`, `/healthz`
//! and `/readyz` are served on the metrics address ([`http`]).

pub mod backup;
pub mod confine;
pub mod crd;
pub mod http;
pub mod journal;
pub mod lease;
pub mod manifests;
pub mod metrics;
pub mod policy;
pub mod repository;
pub mod restore;
pub mod schedule;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::{ConnectOptions, Connection};

/// Name of the controller in Events, Leases and field managers.
pub const CONTROLLER_NAME: &str = "ferry-controller";

/// Labels the controller puts on snapshots and on policy records.
pub const LABEL_POLICY: &str = "ferry.dev/policy";
pub const LABEL_NAMESPACE: &str = "ferry.dev/namespace";
pub const LABEL_REQUEST: &str = "ferry.dev/request-uid";
/// Resources with this label are reconciled only by the controller started
/// with `--instance` of that value; the others only by one without.
pub const LABEL_INSTANCE: &str = "ferry.dev/controller";

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub connect: ConnectOptions,
    /// Where the controller's Secrets, plan ConfigMaps and Lease live.
    pub namespace: String,
    /// Who this replica is in the Lease (the Pod's name).
    pub identity: String,
    pub metrics_address: SocketAddr,
    pub leader_election: bool,
    /// Backups and restores at once.
    pub concurrency: u16,
    /// Image of mover Pods for volume data.
    pub mover_image: String,
    /// How often Repositories are checked and coverage Events refreshed.
    pub check_interval: Duration,
    /// Reconcile only resources labelled `ferry.dev/controller=INSTANCE`.
    pub instance: Option<String>,
}

impl ControllerOptions {
    /// The label selector of the resources this controller reconciles.
    pub fn selector(&self) -> String {
        match &self.instance {
            Some(instance) => format!("{LABEL_INSTANCE}={instance}"),
            None => format!("!{LABEL_INSTANCE}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Other(String),
    /// The journal or capture cache disagreed with the repository; a full
    /// backup is needed.
    #[error("{0}")]
    Stale(String),
}

/// What every reconciler shares.
pub struct Context {
    pub conn: Connection,
    pub options: ControllerOptions,
    pub recorder: Recorder,
    pub metrics: metrics::Metrics,
    /// Repositories opened so far.
    pub repositories: repository::OpenedCache,
    /// Per policy (by uid): its watch journal and capture cache.
    pub journals: tokio::sync::Mutex<std::collections::HashMap<String, policy::PolicyJournal>>,
}

impl Context {
    /// A connection that acts as `requester`: the API server authorizes
    /// every request as theirs.
    pub async fn connect_as(
        &self,
        requester: &crd::Requester,
    ) -> Result<Connection, ControllerError> {
        let mut options = self.options.connect.clone();
        options.impersonate = Some((requester.username.clone(), requester.groups.clone()));
        Ok(options.connect().await?)
    }

    /// Publishes an Event on `object`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let reference = object.object_ref(&());
        self.event_on(&reference, warning, reason, note).await
    }

    pub async fn event_on(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        mut note: String,
    ) {
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: reason.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// Runs the future `make` builds on a thread of its own, driven by the
/// controller's runtime. The backup and restore pipelines borrow across
/// their awaits in ways the compiler cannot prove `Send` for the spawned
/// reconcilers; built and polled on one thread, they need not be.
pub async fn on_own_thread<F, Fut, T>(make: F) -> Result<T, ControllerError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make()))
        .await
        .map_err(|e| ControllerError::Other(format!("the worker thread failed: {e}")))
}

/// Now, as RFC 3339 with seconds (the form status timestamps take).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A Kubernetes condition.
pub fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: kind.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.chars().take(32_000).collect(),
        observed_generation: generation,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ),
    }
}

/// Replaces the status of `object` with `status` (merge patch of the
/// status subresource).
pub async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Runs the controller until `shutdown` resolves: waits for the Lease,
/// then reconciles until shut down or the Lease is lost. Work in progress
/// finishes before it returns, so every repository is left valid.
pub async fn run(
    options: ControllerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let conn = options.connect.connect().await?;
    let metrics = metrics::Metrics::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let server = http::serve(options.metrics_address, metrics.clone()).await?;
    tracing::info!(address = %server, "serving /metrics, /healthz and /readyz");
    // Ready once connected, leading or standing by: a standby that never
    // became ready would stall every rolling update.
    metrics.set_ready(true);

    let lease = if options.leader_election {
        let lease_name = match &options.instance {
            Some(instance) => format!("{CONTROLLER_NAME}-{instance}"),
            None => CONTROLLER_NAME.to_string(),
        };
        let lease = lease::Lease::new(
            conn.client.clone(),
            &options.namespace,
            &lease_name,
            &options.identity,
        );
        let mut stop = stop_rx.clone();
        tokio::select! {
            acquired = lease.acquire() => acquired?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        tracing::info!(identity = %options.identity, "leading");
        Some(lease)
    } else {
        None
    };
    metrics.set_leader(true);

    let recorder = Recorder::new(
        conn.client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(options.identity.clone()),
        },
    );
    let context = Arc::new(Context {
        conn: conn.clone(),
        options: options.clone(),
        recorder,
        metrics: metrics.clone(),
        journals: Default::default(),
        repositories: Default::default(),
    });

    // Stop when asked, or when the Lease is lost (another replica leads).
    // The Lease is renewed until the work in progress has finished.
    let (work_stop_tx, work_stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let renewal = lease.map(|lease| {
        let work_stop = work_stop_tx.clone();
        tokio::spawn(async move { lease.keep(done_rx, work_stop).await })
    });
    {
        let mut stop = stop_rx.clone();
        let work_stop = work_stop_tx.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = work_stop.send(true);
        });
    }

    let reconciling = || Reconciling {
        client: conn.client.clone(),
        selector: options.selector(),
        config: kube::runtime::controller::Config::default().concurrency(options.concurrency),
        stop: work_stop_rx.clone(),
        context: context.clone(),
    };
    let backups = reconciling().run(|o, c| backup::reconcile(o, c).boxed());
    let restores = reconciling().run(|o, c| restore::reconcile(o, c).boxed());
    let policies = reconciling().run(|o, c| policy::reconcile(o, c).boxed());
    let repositories = reconciling().run(|o, c| repository::reconcile(o, c).boxed());
    let coverage = policy::coverage_loop(context.clone(), work_stop_rx.clone());
    tokio::join!(backups, restores, policies, repositories, coverage);
    metrics.set_leader(false);
    let _ = done_tx.send(true);
    if let Some(renewal) = renewal {
        // Hands the Lease back so that another replica takes over at once.
        match renewal.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease"),
            Err(e) => tracing::warn!(error = %e, "the Lease keeper failed"),
        }
    }
    if *work_stop_rx.borrow() && !*stop_rx.borrow() {
        anyhow::bail!("lost the Lease to another replica; stopped");
    }
    tracing::info!("stopped; all work in progress finished");
    Ok(())
}

/// What the four controllers share: the client, the label selector of
/// this instance, the concurrency, and when to stop.
struct Reconciling {
    client: kube::Client,
    selector: String,
    config: kube::runtime::controller::Config,
    stop: watch::Receiver<bool>,
    context: Arc<Context>,
}

impl Reconciling {
    /// A controller of every `K` this instance reconciles, until stopped;
    /// work in progress finishes first.
    fn run<K>(
        self,
        reconcile: impl FnMut(
            Arc<K>,
            Arc<Context>,
        )
            -> futures::future::BoxFuture<'static, Result<Action, ControllerError>>
        + Send
        + 'static,
    ) -> impl std::future::Future<Output = ()>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let mut stop = self.stop;
        Controller::new(
            Api::<K>::all(self.client),
            watcher::Config::default().labels(&self.selector),
        )
        .with_config(self.config)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, self.context)
        .for_each(log_result)
    }
}

fn error_policy<K: ResourceExt>(
    object: Arc<K>,
    error: &ControllerError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(object = %object.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

async fn log_result<K: Resource, E: std::fmt::Display>(
    result: Result<(kube::runtime::reflector::ObjectRef<K>, Action), E>,
) where
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    if let Err(e) = result {
        tracing::debug!(error = %e, "reconcile");
    }
}
