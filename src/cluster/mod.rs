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
    #[error(
        "could not load kubeconfig{}: {message}. Point --kubeconfig or KUBECONFIG at a kubeconfig file, pick a --context, or run inside a cluster",
        context.as_ref().map(|c| format!(" (context {c})")).unwrap_or_default()
    )]
    Kubeconfig {
        context: Option<String>,
        /// The cause, its chain flattened ([`connect::error_chain`]).
        message: String,
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

/// An API error as a person reads it: the server's message and status,
/// not the whole response; other errors with their causes.
pub fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => connect::error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::connect::error_chain;
    use super::*;

    #[derive(Debug)]
    struct Layer {
        message: String,
        cause: Option<Box<Layer>>,
    }

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.cause.as_deref().map(|c| c as _)
        }
    }

    fn layer(message: &str, cause: Option<Layer>) -> Layer {
        Layer {
            message: message.into(),
            cause: cause.map(Box::new),
        }
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        // As kube's errors do: each message quotes its cause already.
        let io = layer("No such file or directory (os error 2)", None);
        let read = layer(
            "failed to read kubeconfig from '/root/.kube/config': No such file or directory (os error 2)",
            Some(io),
        );
        let infer = layer(
            "failed to infer config: kubeconfig: (failed to read kubeconfig from '/root/.kube/config': No such file or directory (os error 2))",
            Some(read),
        );
        assert_eq!(error_chain(&infer), infer.message);
        // Causes that are not quoted are added, in order.
        let chained = layer("outer", Some(layer("middle", Some(layer("inner", None)))));
        assert_eq!(error_chain(&chained), "outer: middle: inner");
        let error = ClusterError::Kubeconfig {
            context: Some("prod".into()),
            message: error_chain(&infer),
        };
        let shown = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
        assert!(
            shown.contains("(context prod)") && shown.contains("--kubeconfig"),
            "{shown}"
        );
    }
}
