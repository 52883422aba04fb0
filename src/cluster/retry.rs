//! Retries with exponential backoff for requests that failed for reasons that
//! pass: throttling (429), server errors (5xx) and transport failures.
//! Everything else (403, 404, 410, 422…) is returned at once: retrying would
//! only hide it.

use std::future::Future;
use std::time::Duration;

/// How many times a request is tried in all, and the backoff bounds.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Whether an error is worth another try.
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || (500..=599).contains(&status.code),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

impl RetryPolicy {
    /// The pause before attempt `n` (1-based retry count), with full jitter so
    /// that many concurrent listers do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << retry.min(16));
        let cap = exp.min(self.max);
        let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
        cap.mul_f64(jitter)
    }

    pub async fn run<T, F, Fut>(&self, mut attempt: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut retry = 0;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(e) if retry + 1 < self.attempts && is_transient(&e) => {
                    retry += 1;
                    tracing::debug!(error = %e, retry, "transient API error, retrying");
                    tokio::time::sleep(self.backoff(retry)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: format!("HTTP {code}"),
            ..Default::default()
        }))
    }

    #[test]
    fn throttling_and_server_errors_are_transient_client_errors_are_not() {
        assert!(is_transient(&api_error(429)));
        assert!(is_transient(&api_error(503)));
        assert!(!is_transient(&api_error(403)));
        assert!(!is_transient(&api_error(410)));
        assert!(!is_transient(&api_error(404)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert!(p.backoff(1) <= Duration::from_millis(200));
        assert!(p.backoff(12) <= Duration::from_secs(1));
        assert!(p.backoff(12) >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let p = RetryPolicy {
            attempts: 5,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let result = p
            .run(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(api_error(429))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_and_exhausted_budgets_fail() {
        let calls = AtomicU32::new(0);
        let p = RetryPolicy {
            attempts: 3,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let forbidden: Result<(), _> = p
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(api_error(403))
            })
            .await;
        assert_eq!(
            super::super::status_code(&forbidden.unwrap_err()),
            Some(403)
        );
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1);
        let busy: Result<(), _> = p
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(api_error(503))
            })
            .await;
        assert!(busy.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
