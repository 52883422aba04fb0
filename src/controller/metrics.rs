//! The controller's Prometheus metrics, rendered in the text exposition
//! format. A handful of gauges and counters keyed by policy: no registry
//! crate needed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What one policy's runs produced.
#[derive(Debug, Clone, Default)]
pub struct PolicyRun {
    pub last_success_timestamp: Option<f64>,
    pub last_duration_seconds: f64,
    pub last_objects: u64,
    pub last_bytes: u64,
    pub failures_total: u64,
    pub runs_total: u64,
    /// Whether the last run read the watch journal instead of LISTs.
    pub last_journaled: bool,
}

#[derive(Debug, Default)]
struct Inner {
    policies: BTreeMap<String, PolicyRun>,
    /// (kind, result) → count, for one-off Backups and Restores.
    requests: BTreeMap<(String, String), u64>,
    unprotected_namespaces: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
    leader: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn policy_run(&self, policy: &str, update: impl FnOnce(&mut PolicyRun)) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        update(inner.policies.entry(policy.to_string()).or_default());
    }

    pub fn request(&self, kind: &str, result: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner
            .requests
            .entry((kind.to_string(), result.to_string()))
            .or_default() += 1;
    }

    pub fn set_unprotected(&self, count: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.unprotected_namespaces = Some(count);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let per_policy = |value: &dyn Fn(&PolicyRun) -> Option<String>| -> Vec<(String, String)> {
            inner
                .policies
                .iter()
                .filter_map(|(p, run)| {
                    value(run).map(|v| (format!("{{policy=\"{}\"}}", escape(p)), v))
                })
                .collect()
        };
        family(
            "ferry_policy_last_success_timestamp_seconds",
            "gauge",
            "When the policy last backed up all its namespaces (Unix time).",
            per_policy(&|r| r.last_success_timestamp.map(|t| format!("{t:.3}"))),
        );
        family(
            "ferry_policy_last_run_duration_seconds",
            "gauge",
            "How long the policy's last run took.",
            per_policy(&|r| Some(format!("{:.3}", r.last_duration_seconds))),
        );
        family(
            "ferry_policy_last_run_objects",
            "gauge",
            "Objects the policy's last run stored.",
            per_policy(&|r| Some(r.last_objects.to_string())),
        );
        family(
            "ferry_policy_last_run_bytes",
            "gauge",
            "Bytes the policy's last run added to the repository.",
            per_policy(&|r| Some(r.last_bytes.to_string())),
        );
        family(
            "ferry_policy_last_run_journaled",
            "gauge",
            "1 when the policy's last run read the watch journal instead of LISTing.",
            per_policy(&|r| Some(u8::from(r.last_journaled).to_string())),
        );
        family(
            "ferry_policy_runs_total",
            "counter",
            "Runs of the policy.",
            per_policy(&|r| Some(r.runs_total.to_string())),
        );
        family(
            "ferry_policy_failures_total",
            "counter",
            "Runs of the policy in which a namespace failed.",
            per_policy(&|r| Some(r.failures_total.to_string())),
        );
        family(
            "ferry_requests_total",
            "counter",
            "One-off Backups and Restores by result.",
            inner
                .requests
                .iter()
                .map(|((kind, result), n)| {
                    (
                        format!(
                            "{{kind=\"{}\",result=\"{}\"}}",
                            escape(kind),
                            escape(result)
                        ),
                        n.to_string(),
                    )
                })
                .collect(),
        );
        if let Some(n) = inner.unprotected_namespaces {
            family(
                "ferry_unprotected_namespaces",
                "gauge",
                "Namespaces no BackupPolicy protects.",
                vec![(String::new(), n.to_string())],
            );
        }
        family(
            "ferry_leader",
            "gauge",
            "1 when this replica holds the Lease and works.",
            vec![(
                String::new(),
                u8::from(self.leader.load(Ordering::Relaxed)).to_string(),
            )],
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_policy_samples_in_the_exposition_format() {
        let metrics = Metrics::default();
        metrics.policy_run("daily \"prod\"", |r| {
            r.last_success_timestamp = Some(1_700_000_000.5);
            r.last_objects = 12;
            r.runs_total += 1;
        });
        metrics.request("Restore", "failed");
        let text = metrics.render();
        assert!(text.contains(
            "ferry_policy_last_success_timestamp_seconds{policy=\"daily \\\"prod\\\"\"} 1700000000.500"
        ), "{text}");
        assert!(text.contains("ferry_policy_last_run_objects{policy=\"daily \\\"prod\\\"\"} 12"));
        assert!(text.contains("ferry_requests_total{kind=\"Restore\",result=\"failed\"} 1"));
        assert!(text.contains("# TYPE ferry_policy_failures_total counter"));
        assert!(text.contains("ferry_leader 0"));
    }
}
