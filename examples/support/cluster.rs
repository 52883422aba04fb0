//! The cluster flags the example programs share.

use std::path::PathBuf;

/// Which cluster to talk to.
#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    context: Option<String>,
}

impl ClusterArgs {
    pub async fn client(self) -> anyhow::Result<kube::Client> {
        let conn = ferry::cluster::ConnectOptions {
            kubeconfig: self.kubeconfig,
            context: self.context,
            ..Default::default()
        }
        .connect()
        .await?;
        Ok(conn.client)
    }
}
