//! Deploys an example application: applies manifests with server-side
//! apply, replacing `${KEY}` placeholders given with `--set KEY=VALUE`.
//!
//! ```sh
//! cargo run --example deploy -- --kubeconfig ~/.kube/config --set NS=shop examples/shop/app.yaml
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[path = "support/cluster.rs"]
mod cluster;

/// Apply example manifests to a cluster.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    /// Replace ${KEY} with VALUE in the manifests; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Manifest files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = args.cluster.client().await?;
    for file in &args.files {
        let mut text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for pair in &args.set {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--set {pair}: expected KEY=VALUE"))?;
            text = text.replace(&format!("${{{key}}}"), value);
        }
        let applied = ferry::cluster::apply::apply_manifests(&client, &text, "ferry-example")
            .await
            .with_context(|| format!("applying {}", file.display()))?;
        eprintln!("applied {} objects from {}", applied.len(), file.display());
    }
    Ok(())
}
