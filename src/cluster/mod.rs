//! Kubernetes I/O: connecting through kubeconfig contexts, discovering what
//! the API server serves, reading the cluster profile, and capturing objects
//! with paginated, retried, concurrent LISTs.
//!
//! Everything here talks to an API server; the decisions about what the
//! objects mean live in [`crate::model`].

pub mod apply;
pub mod capture;
pub mod connect;
pub mod discovery;
pub mod profile;
pub mod retry;

pub use connect::{ConnectOptions, Connection};
pub use discovery::{Discovery, ServedResource};

/// Errors of the cluster I/O layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("could not load kubeconfig{}: {source}", context.as_ref().map(|c| format!(" (context {c})")).unwrap_or_default())]
    Kubeconfig {
        context: Option<String>,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "cluster at {server} is unreachable: {message}. Check that the API server runs and that --context/--kubeconfig point at it"
    )]
    Unreachable { server: String, message: String },
    #[error(
        "the API server at {server} refused our credentials (HTTP {code}: {message}). Log in again or pick another --context"
    )]
    Unauthorized {
        server: String,
        code: u16,
        message: String,
    },
    #[error("discovery of {group_version} failed: {source}")]
    Discovery {
        group_version: String,
        #[source]
        source: kube::Error,
    },
    #[error("listing {resource}{} failed: {source}", namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    List {
        resource: String,
        namespace: Option<String>,
        #[source]
        source: kube::Error,
    },
    #[error("reading {object} failed: {source}")]
    Get {
        object: String,
        #[source]
        source: kube::Error,
    },
}

/// HTTP status of an API error, if the error came from the API server.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
