//! Transforms: rule sets (Rhai scripts, built-ins in `transforms/`),
//! inline scripts and JSON patches, run in the order a transform plan
//! lists them, over the objects of a snapshot before they are restored.
//!
//! A plan is compiled once ([`TransformPlan::from_yaml`]): every rule set
//! is compiled, asked for its kinds and the names it looks for (`kinds()`,
//! `mentions()`; see the `plan` module), and every problem of the plan is
//! reported together. [`run`] then applies the steps; each step sees the
//! output of the previous one, and every change is traced.
//!
//! ```
//! use ferry::profile::ClusterProfile;
//! use ferry::transform::{TransformPlan, run};
//! use serde_json::json;
//!
//! let plan = TransformPlan::from_yaml(r#"
//! apiVersion: ferry.dev/v1alpha1
//! kind: TransformPlan
//! spec:
//!   steps:
//!   - name: label-test
//!     script: |
//!       fn kinds() { ["ConfigMap"] }
//!       fn transform(obj, params, target) { obj.data.env = "test"; obj }
//! "#, "plan.yaml", None).unwrap();
//! let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
//!                 "metadata": {"name": "cfg", "namespace": "shop"}, "data": {"env": "prod"}});
//! let out = run(&plan, vec![cm], &ClusterProfile::default()).unwrap();
//! assert_eq!(out.objects[0]["data"]["env"], "test");
//! assert_eq!(out.trace[0].to_string(), r#"label-test: ConfigMap/shop/cfg: /data/env "prod" -> "test""#);
//! ```

mod builtin;
mod config;
mod convert;
mod edit;
mod engine;
mod lookup;
mod patch;
mod plan;
mod run;
mod select;
mod trace;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::profile::ClusterProfile;

pub use builtin::builtin_rule_sets;
pub use config::{
    API_VERSION, KIND, OnError, PlanMetadata, PlanSpec, SelectConfig, StepConfig,
    TransformPlanConfig,
};
pub use plan::TransformPlan;
pub use trace::Change;

/// A problem in a transform plan or one of its rule sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// `plan.yaml`, `plan.yaml#steps[2]`, `rules/x.rhai:12:5`, ...
    pub location: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: String, message: String) -> Self {
        Diagnostic { location, message }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The value at `keys` in nested objects. Unlike `Value::pointer`, it
/// allocates nothing: this runs for every object of every step.
pub(crate) fn field<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(value, |v, k| v.get(*k))
}

/// The string at `keys`, or `""`.
pub(crate) fn text<'a>(value: &'a Value, keys: &[&str]) -> &'a str {
    field(value, keys).and_then(Value::as_str).unwrap_or("")
}

fn list(diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str("\n  ");
        out.push_str(&d.to_string());
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error("the transform plan is not valid ({} problem{}):{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, list(.0))]
    Plan(Vec<Diagnostic>),
    #[error("cannot read the transform plan {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object {index} of the input is not a Kubernetes object: {message}")]
    InvalidObject { index: usize, message: String },
    #[error("rule set {rule_set} failed on {object} at {location}: {message}")]
    Rule {
        rule_set: String,
        /// `file:line:col` of the failure (or the step, for patches).
        location: String,
        object: String,
        message: String,
    },
}

/// A warning a rule set attached to an object (`warn(...)`, `print`), or
/// one the engine raised about a step's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleWarning {
    pub rule_set: String,
    pub object: String,
    pub message: String,
}

impl fmt::Display for RuleWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.rule_set, self.object, self.message)
    }
}

/// An object left out because a step failed on it (`onError: skip`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedObject {
    pub rule_set: String,
    pub object: String,
    /// `file:line:col` of the failure (or the step, for patches).
    pub location: String,
    pub error: String,
}

impl fmt::Display for SkippedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} skipped: rule set {} failed at {}: {}",
            self.object, self.rule_set, self.location, self.error
        )
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransformOutput {
    /// In input order; objects a step added follow the object that added them.
    pub objects: Vec<Value>,
    /// Every change, step by step, object by object.
    pub trace: Vec<Change>,
    pub warnings: Vec<RuleWarning>,
    pub skipped: Vec<SkippedObject>,
}

/// Runs every step of `plan` over `objects` for the `target` cluster (an
/// empty profile when the target is unknown).
pub fn run(
    plan: &TransformPlan,
    objects: Vec<Value>,
    target: &ClusterProfile,
) -> Result<TransformOutput, TransformError> {
    run::run(plan, objects, target)
}
