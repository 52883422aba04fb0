//! Connecting to a cluster the way kubectl does: `--kubeconfig` or
//! `KUBECONFIG`, `~/.kube/config`, in-cluster service account; `--context`
//! picks a context.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::ClusterError;

/// How to reach a cluster, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Per-request timeout; long LISTs are paginated so each page is short.
    pub timeout: Option<Duration>,
    /// Act as this user with these groups (Kubernetes impersonation): every
    /// request is authorized as theirs, not ours.
    pub impersonate: Option<(String, Vec<String>)>,
}

/// A verified connection: the client plus what to call the cluster in messages.
#[derive(Clone)]
pub struct Connection {
    pub client: kube::Client,
    pub server: String,
    pub context: Option<String>,
    pub version: k8s_openapi::apimachinery::pkg::version::Info,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .field("context", &self.context)
            .finish()
    }
}

impl ConnectOptions {
    async fn config(&self) -> Result<kube::Config, ClusterError> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let err = |message: String| ClusterError::Kubeconfig {
            context: self.context.clone(),
            message,
        };
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| err(format!("{}: {}", path.display(), error_chain(&e))))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| err(error_chain(&e)))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| err(error_chain(&e)))?,
            None => kube::Config::infer()
                .await
                .map_err(|e| err(error_chain(&e)))?,
        };
        let timeout = self.timeout.unwrap_or(Duration::from_secs(60));
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        config.connect_timeout = Some(Duration::from_secs(10));
        if let Some((user, groups)) = &self.impersonate {
            config.auth_info.impersonate = Some(user.clone());
            config.auth_info.impersonate_groups = (!groups.is_empty()).then(|| groups.clone());
        }
        Ok(config)
    }

    /// Builds a client and proves the server answers and accepts us, so
    /// that every later failure is about a specific resource.
    pub async fn connect(&self) -> Result<Connection, ClusterError> {
        install_crypto_provider();
        let config = self.config().await?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| ClusterError::Kubeconfig {
            context: self.context.clone(),
            message: error_chain(&e),
        })?;
        let version = match client.apiserver_version().await {
            Ok(v) => v,
            Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
                return Err(ClusterError::Unauthorized {
                    server,
                    code: status.code,
                    message: status.message.clone(),
                });
            }
            Err(e) => {
                return Err(ClusterError::Unreachable {
                    server,
                    message: error_chain(&e),
                });
            }
        };
        Ok(Connection {
            client,
            server,
            context: self.context.clone(),
            version,
        })
    }
}

/// The whole cause chain of an error on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Several TLS backends are linked in (the Kubernetes client and the AWS SDK
/// each bring their own), so rustls cannot pick a process-wide default by
/// itself: choose one, once.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider was installed first, which is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}
