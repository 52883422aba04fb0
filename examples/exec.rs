//! Runs a command in a Pod once the Pod is ready, prints what it writes to
//! standard output and fails when the command fails: what the demo uses to
//! write into and read from a database.
//!
//! ```sh
//! cargo run --example exec -- --kubeconfig ~/.kube/config -n orders db-0 -- psql -c 'select 1'
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::AttachParams;
use tokio::io::AsyncReadExt;

#[path = "support/cluster.rs"]
mod cluster;

/// Run a command in a Pod once it is ready.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    #[arg(short, long)]
    namespace: String,
    /// Container (default: the Pod's first).
    #[arg(short, long)]
    container: Option<String>,
    /// Longest wait for the Pod to be ready, e.g. 3m.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    wait: Duration,
    pod: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pods: Api<Pod> = Api::namespaced(args.cluster.client().await?, &args.namespace);
    let name = format!("{}/{}", args.namespace, args.pod);
    let deadline = Instant::now() + args.wait;
    loop {
        match pods.get_opt(&args.pod).await? {
            Some(pod) if ready(&pod) => break,
            _ if Instant::now() >= deadline => {
                bail!(
                    "Pod {name} is not ready after {}",
                    humantime::format_duration(args.wait)
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let mut params = AttachParams::default().stderr(false);
    if let Some(container) = &args.container {
        params = params.container(container.clone());
    }
    let mut process = pods
        .exec(&args.pod, args.command.clone(), &params)
        .await
        .with_context(|| format!("running {:?} in {name}", args.command))?;
    let mut out = String::new();
    process
        .stdout()
        .context("the command's output")?
        .read_to_string(&mut out)
        .await?;
    let status = process
        .take_status()
        .context("the command's status")?
        .await
        .context("the command's status")?;
    print!("{out}");
    if status.status.as_deref() != Some("Success") {
        bail!(
            "{:?} in {name} failed: {}",
            args.command,
            status.message.unwrap_or_default()
        );
    }
    Ok(())
}
