//! `ferry controller` and `ferry policy`: the CLI side of Ferry as a service.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::ListParams;

use super::args::GlobalArgs;
use super::output::{OutputFormat, emit, table};
use crate::controller::crd::BackupPolicy;
use crate::controller::manifests::Install;
use crate::controller::{ControllerOptions, manifests, policy};

/// Run Ferry as a controller that reconciles Repositories, BackupPolicies,
/// Backups and Restores (`ferry.dev/v1alpha1`), or print what installs it.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Without a subcommand the controller runs until SIGTERM or SIGINT, against the \
cluster of --kubeconfig/--context (in a Pod: its ServiceAccount).\n\n\
Only the replica that holds the Lease ferry-controller (in --namespace) works; the others wait. \
On SIGTERM it stops taking work, lets backups and restores in progress finish (every repository \
stays valid), hands the Lease back and exits. A replica killed outright leaves no half-done \
state behind: a snapshot is complete or absent, a Backup or Restore found Running is finished \
or run again by the next leader.\n\n\
Backups and Restores in a namespace are carried out as the user who created them (recorded by \
the ferry-requester admission policy, which `manifests` prints): a user who may edit team-a \
can back up and restore team-a, and nothing else.\n\n\
Serves /metrics (Prometheus), /healthz and /readyz on --metrics-address.\n\n\
Examples:\n  \
  ferry controller manifests --image registry.example/ferry:0.1.0 | kubectl apply -f -\n  \
  ferry controller --kubeconfig ~/.kube/dev --namespace ferry-system --no-leader-election"
)]
pub struct ControllerArgs {
    #[command(subcommand)]
    pub command: Option<ControllerCommand>,
    #[command(flatten)]
    pub run: ControllerRunArgs,
}

#[derive(Debug, Args)]
pub struct ControllerRunArgs {
    /// Namespace of the controller's Secrets, plans and Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferry-system")]
    pub namespace: String,
    /// This replica's name in the Lease (default: the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub metrics_address: SocketAddr,
    /// Work without taking the Lease (one replica only, e.g. in development).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Backups and restores of each kind at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// Image of mover Pods (volume data).
    #[arg(long, env = "FERRY_MOVER_IMAGE", default_value = concat!("ghcr.io/ferry-dev/ferry:", env!("CARGO_PKG_VERSION")))]
    pub mover_image: String,
    /// How often Repositories are checked and unprotected namespaces reported.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,
    /// Reconcile only resources labelled ferry.dev/controller=INSTANCE
    /// (several controllers in one cluster, e.g. one per team). Without it,
    /// only resources without that label.
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Print the CRDs, the admission policy, the RBAC and the Deployment
    /// that install the controller (`| kubectl apply --server-side -f -`).
    Manifests {
        /// Namespace the controller runs in.
        #[arg(long, default_value = "ferry-system")]
        namespace: String,
        /// The Ferry image.
        #[arg(long, default_value = concat!("ghcr.io/ferry-dev/ferry:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Controller replicas (one works, the others stand by).
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        /// Only the CRDs and the admission policy (to run the controller
        /// outside the cluster).
        #[arg(long)]
        crds_only: bool,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: ManifestFormat,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ManifestFormat {
    Yaml,
    Json,
}

/// Inspect BackupPolicies.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List namespaces with the policies that protect them and when each
    /// was last backed up; unprotected namespaces first.
    #[command(
        after_help = "Namespaces kube-* are left out. Exit status 0 even when some \
namespaces are unprotected; use -o json to script on it."
    )]
    Coverage {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

pub async fn run(global: &GlobalArgs, args: ControllerArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(ControllerCommand::Manifests {
            namespace,
            image,
            replicas,
            crds_only,
            output,
        }) => {
            let install = Install {
                namespace,
                image,
                replicas,
            };
            let manifests = if crds_only {
                let mut m: Vec<serde_json::Value> = crate::controller::crd::crds()
                    .into_iter()
                    .map(|c| serde_json::to_value(c).expect("CRDs serialize"))
                    .collect();
                m.extend(manifests::requester_policy());
                m
            } else {
                manifests::all(&install)
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match output {
                ManifestFormat::Yaml => {
                    for manifest in &manifests {
                        writeln!(out, "---")?;
                        crate::yaml::to_writer(&mut out, manifest)?;
                    }
                }
                ManifestFormat::Json => {
                    let list =
                        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": manifests});
                    serde_json::to_writer_pretty(&mut out, &list)?;
                    writeln!(out)?;
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let run = args.run;
            let identity = run.identity.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "ferry".into());
                format!("{host}-{}", std::process::id())
            });
            let options = ControllerOptions {
                connect: crate::cluster::ConnectOptions {
                    kubeconfig: global.kubeconfig.clone(),
                    context: global.context.clone(),
                    timeout: Some(global.request_timeout),
                    impersonate: None,
                },
                namespace: run.namespace,
                identity,
                metrics_address: run.metrics_address,
                leader_election: !run.no_leader_election,
                concurrency: run.concurrency.max(1),
                mover_image: run.mover_image,
                check_interval: run.check_interval,
                instance: run.instance,
            };
            crate::controller::run(options, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing the work in progress");
}

pub async fn policy(global: &GlobalArgs, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Coverage { output } => {
            let conn = super::connect(global).await?;
            let namespaces = Api::<Namespace>::all(conn.client.clone())
                .list(&ListParams::default())
                .await?
                .items;
            let policies = match Api::<BackupPolicy>::all(conn.client.clone())
                .list(&ListParams::default())
                .await
            {
                Ok(list) => list.items,
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    anyhow::bail!(
                        "the cluster has no BackupPolicy resource; install the controller's CRDs (`ferry controller manifests --crds-only | kubectl apply -f -`)"
                    )
                }
                Err(e) => return Err(e.into()),
            };
            let mut rows = policy::coverage(&namespaces, &policies);
            rows.sort_by_key(|r| (!r.policies.is_empty(), r.namespace.clone()));
            emit(output, &rows, |out| {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.namespace.clone(),
                            if r.policies.is_empty() {
                                "UNPROTECTED".into()
                            } else {
                                r.policies.join(",")
                            },
                            r.last_success.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                table(out, &["NAMESPACE", "POLICIES", "LAST SUCCESS"], &cells)
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
