//! The transform plan as users write it (YAML), before it is compiled.
//!
//! Parsing reports every problem it finds, not only the first one: the
//! document is read as plain data, then each part is checked on its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Diagnostic;

pub const API_VERSION: &str = "ferry.dev/v1alpha1";
pub const KIND: &str = "TransformPlan";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransformPlanConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: PlanMetadata,
    pub spec: PlanSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanSpec {
    #[serde(default)]
    pub on_error: OnError,
    pub steps: Vec<StepConfig>,
}

/// What happens when a rule set fails on an object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop: the run fails and produces no objects.
    #[default]
    Fail,
    /// Leave the object out, report it, and go on.
    Skip,
}

/// One step: exactly one of `ruleSet`, `script` or `patch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepConfig {
    /// A built-in rule set's name, or a path to a `.rhai` file relative to
    /// the plan file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_set: Option<String>,
    /// An inline rule set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// RFC 6902 operations applied to the selected objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Vec<Value>>,
    /// Names inline scripts and patches in traces and errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parameters of a rule set or script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    /// Which objects a patch applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<SelectConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectConfig {
    /// `Kind` or `group/Kind`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    /// Namespace globs; cluster-scoped objects never match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Name globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// A kubectl label selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// Selects the object when the query finds anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_path: Option<String>,
}

/// Where step `i` of a plan is, for diagnostics.
pub(crate) fn step_location(source: &str, i: usize) -> String {
    format!("{source}#steps[{i}]")
}

/// A plan read as far as possible: compilation goes on with the steps
/// that could be read, so that one run reports every problem.
pub(crate) struct Partial {
    pub config: Option<TransformPlanConfig>,
    /// Steps that could not be read (their place in `config` holds a default).
    pub unreadable_steps: Vec<usize>,
    pub diagnostics: Vec<Diagnostic>,
}

impl TransformPlanConfig {
    /// Parses a plan, reporting every structural problem.
    pub fn parse(text: &str, source: &str) -> Result<TransformPlanConfig, Vec<Diagnostic>> {
        let partial = Self::parse_partial(text, source);
        match partial.config {
            Some(config) if partial.diagnostics.is_empty() => Ok(config),
            _ => Err(partial.diagnostics),
        }
    }

    pub(crate) fn parse_partial(text: &str, source: &str) -> Partial {
        let doc: Value = match serde_yaml_ng::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                let location = match e.location() {
                    Some(l) => format!("{source}:{}:{}", l.line(), l.column()),
                    None => source.to_string(),
                };
                return Partial {
                    config: None,
                    unreadable_steps: Vec::new(),
                    diagnostics: vec![Diagnostic::new(location, format!("not valid YAML: {e}"))],
                };
            }
        };
        let mut diagnostics = Vec::new();
        let mut unreadable_steps = Vec::new();
        let mut problem = |location: String, message: String| {
            diagnostics.push(Diagnostic::new(location, message))
        };
        let Some(top) = doc.as_object() else {
            problem(
                source.to_string(),
                "a transform plan is a mapping with apiVersion, kind, metadata and spec"
                    .to_string(),
            );
            return Partial {
                config: None,
                unreadable_steps,
                diagnostics,
            };
        };
        unknown_fields(top, &["apiVersion", "kind", "metadata", "spec"], |k| {
            problem(
                source.to_string(),
                format!(
                    "unknown field '{k}'; a transform plan has apiVersion, kind, metadata and spec"
                ),
            )
        });
        let mut expect = |field: &str, expected: &str| -> String {
            match top.get(field) {
                Some(Value::String(s)) if s == expected => s.clone(),
                Some(other) => {
                    problem(
                        source.to_string(),
                        format!("{field} is {other}; expected {expected}"),
                    );
                    String::new()
                }
                None => {
                    problem(
                        source.to_string(),
                        format!("{field} is missing; expected {expected}"),
                    );
                    String::new()
                }
            }
        };
        let api_version = expect("apiVersion", API_VERSION);
        let kind = expect("kind", KIND);
        let metadata = match top.get("metadata") {
            None | Some(Value::Null) => PlanMetadata::default(),
            Some(m) => serde_json::from_value(m.clone()).unwrap_or_else(|e| {
                problem(source.to_string(), format!("metadata: {e}"));
                PlanMetadata::default()
            }),
        };
        let mut spec = PlanSpec::default();
        match top.get("spec") {
            Some(Value::Object(s)) => {
                unknown_fields(s, &["onError", "steps"], |k| {
                    problem(
                        source.to_string(),
                        format!("spec: unknown field '{k}'; spec has onError and steps"),
                    )
                });
                if let Some(on_error) = s.get("onError") {
                    match serde_json::from_value(on_error.clone()) {
                        Ok(o) => spec.on_error = o,
                        Err(_) => problem(
                            source.to_string(),
                            format!("spec.onError is {on_error}; expected fail or skip"),
                        ),
                    }
                }
                match s.get("steps") {
                    Some(Value::Array(steps)) => {
                        for (i, step) in steps.iter().enumerate() {
                            match serde_json::from_value::<StepConfig>(step.clone()) {
                                Ok(step) => spec.steps.push(step),
                                Err(e) => {
                                    problem(step_location(source, i), e.to_string());
                                    unreadable_steps.push(i);
                                    spec.steps.push(StepConfig::default());
                                }
                            }
                        }
                    }
                    Some(other) => problem(
                        source.to_string(),
                        format!("spec.steps is {other}; expected a list of steps"),
                    ),
                    None => problem(
                        source.to_string(),
                        "spec.steps is missing; list the rule sets, scripts and patches to run"
                            .to_string(),
                    ),
                }
            }
            Some(other) => problem(
                source.to_string(),
                format!("spec is {other}; expected a mapping with steps"),
            ),
            None => problem(
                source.to_string(),
                "spec is missing; a transform plan lists its steps in spec.steps".to_string(),
            ),
        }
        Partial {
            config: Some(TransformPlanConfig {
                api_version,
                kind,
                metadata,
                spec,
            }),
            unreadable_steps,
            diagnostics,
        }
    }
}

fn unknown_fields(map: &Map<String, Value>, known: &[&str], mut report: impl FnMut(&str)) {
    for k in map.keys() {
        if !known.contains(&k.as_str()) {
            report(k);
        }
    }
}
