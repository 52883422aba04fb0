//! What a user asked for: label selectors (kubectl syntax and the
//! matchLabels/matchExpressions form of objects) and the selection of
//! namespaces, kinds, labels and applications a backup or restore covers.

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::object::ModelError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op")]
pub enum Requirement {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    DoesNotExist { key: String },
}

/// A conjunction of label requirements; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<&str, &str>) -> bool {
        match self {
            Requirement::Equals { key, value } => labels.get(key.as_str()) == Some(&value.as_str()),
            Requirement::NotEquals { key, value } => {
                labels.get(key.as_str()) != Some(&value.as_str())
            }
            Requirement::In { key, values } => labels
                .get(key.as_str())
                .is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn { key, values } => labels
                .get(key.as_str())
                .is_none_or(|v| !values.iter().any(|x| x == v)),
            Requirement::Exists { key } => labels.contains_key(key.as_str()),
            Requirement::DoesNotExist { key } => !labels.contains_key(key.as_str()),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(",")),
            Requirement::NotIn { key, values } => write!(f, "{key} notin ({})", values.join(",")),
            Requirement::Exists { key } => write!(f, "{key}"),
            Requirement::DoesNotExist { key } => write!(f, "!{key}"),
        }
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.requirements.iter().map(ToString::to_string).collect();
        write!(f, "{}", parts.join(","))
    }
}

fn labels_of(map: Option<&Map<String, Value>>) -> BTreeMap<&str, &str> {
    map.into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)))
        .collect()
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses kubectl's selector syntax: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(input: &str) -> Result<Self, ModelError> {
        let err = |position: usize, message: &str| ModelError::Selector {
            input: input.to_string(),
            position,
            message: message.to_string(),
        };
        let bytes = input.as_bytes();
        let mut pos = 0;
        let mut requirements = Vec::new();
        let skip_ws = |pos: &mut usize| {
            while *pos < bytes.len() && bytes[*pos].is_ascii_whitespace() {
                *pos += 1;
            }
        };
        let is_key_char =
            |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/');
        let read_word = |pos: &mut usize| {
            let start = *pos;
            while *pos < bytes.len() && is_key_char(bytes[*pos]) {
                *pos += 1;
            }
            input[start..*pos].to_string()
        };
        loop {
            skip_ws(&mut pos);
            if pos >= bytes.len() {
                if requirements.is_empty() && !input.trim().is_empty() {
                    return Err(err(pos, "expected a requirement"));
                }
                break;
            }
            let negated = bytes[pos] == b'!';
            if negated {
                pos += 1;
                skip_ws(&mut pos);
            }
            let key_at = pos;
            let key = read_word(&mut pos);
            if key.is_empty() {
                return Err(err(key_at, "expected a label key"));
            }
            skip_ws(&mut pos);
            let requirement = if negated {
                Requirement::DoesNotExist { key }
            } else if input[pos..].starts_with("!=") {
                pos += 2;
                skip_ws(&mut pos);
                Requirement::NotEquals {
                    key,
                    value: read_word(&mut pos),
                }
            } else if input[pos..].starts_with("==") || input[pos..].starts_with('=') {
                pos += if input[pos..].starts_with("==") { 2 } else { 1 };
                skip_ws(&mut pos);
                Requirement::Equals {
                    key,
                    value: read_word(&mut pos),
                }
            } else if input[pos..].starts_with("in") || input[pos..].starts_with("notin") {
                let not = input[pos..].starts_with("notin");
                pos += if not { 5 } else { 2 };
                skip_ws(&mut pos);
                if pos >= bytes.len() || bytes[pos] != b'(' {
                    return Err(err(pos, "expected '(' after in/notin"));
                }
                pos += 1;
                let mut values = Vec::new();
                loop {
                    skip_ws(&mut pos);
                    values.push(read_word(&mut pos));
                    skip_ws(&mut pos);
                    match bytes.get(pos) {
                        Some(b',') => pos += 1,
                        Some(b')') => {
                            pos += 1;
                            break;
                        }
                        _ => return Err(err(pos, "expected ',' or ')' in value list")),
                    }
                }
                if not {
                    Requirement::NotIn { key, values }
                } else {
                    Requirement::In { key, values }
                }
            } else {
                Requirement::Exists { key }
            };
            requirements.push(requirement);
            skip_ws(&mut pos);
            match bytes.get(pos) {
                None => break,
                Some(b',') => pos += 1,
                Some(_) => return Err(err(pos, "expected ',' between requirements")),
            }
        }
        Ok(LabelSelector { requirements })
    }

    pub fn from_match_labels(map: &Map<String, Value>) -> Self {
        LabelSelector {
            requirements: map
                .iter()
                .filter_map(|(k, v)| {
                    v.as_str().map(|v| Requirement::Equals {
                        key: k.clone(),
                        value: v.to_string(),
                    })
                })
                .collect(),
        }
    }

    /// From a `{matchLabels, matchExpressions}` object.
    pub fn from_object(obj: &Value) -> Option<Self> {
        let obj = obj.as_object()?;
        let mut selector = obj
            .get("matchLabels")
            .and_then(Value::as_object)
            .map(Self::from_match_labels)
            .unwrap_or_default();
        for expr in obj
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = expr.get("key").and_then(Value::as_str)?.to_string();
            let values: Vec<String> = expr
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            selector
                .requirements
                .push(match expr.get("operator").and_then(Value::as_str)? {
                    "In" => Requirement::In { key, values },
                    "NotIn" => Requirement::NotIn { key, values },
                    "Exists" => Requirement::Exists { key },
                    "DoesNotExist" => Requirement::DoesNotExist { key },
                    _ => return None,
                });
        }
        Some(selector)
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let labels = labels_of(labels);
        self.requirements.iter().all(|r| r.matches(&labels))
    }
}

/// Namespaces left out of `--all-namespaces` unless named explicitly.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// What a backup (or restore) covers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    pub namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub all_namespaces: bool,
    pub selector: Option<LabelSelector>,
    pub include_kinds: Vec<String>,
    pub exclude_kinds: Vec<String>,
    pub application: Option<String>,
    pub include_deps: bool,
}

fn glob(pattern: &str) -> Result<GlobMatcher, ModelError> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| ModelError::Glob {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })
}

/// The plural resource name of a kind, as the API server derives it for
/// most kinds; used where no discovery data is at hand (restoring offline).
pub fn guess_plural(kind: &str) -> String {
    let k = kind.to_ascii_lowercase();
    if k.ends_with('s') || k.ends_with('x') || k.ends_with("ch") || k.ends_with("sh") {
        format!("{k}es")
    } else if let Some(stem) = k
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'i', 'o', 'u']))
    {
        format!("{stem}ies")
    } else {
        format!("{k}s")
    }
}

fn kind_matches(pattern: &str, group: &str, kind: &str, plural: &str) -> bool {
    let guessed;
    let plural = if plural.is_empty() {
        guessed = guess_plural(kind);
        guessed.as_str()
    } else {
        plural
    };
    let p = pattern.to_ascii_lowercase();
    let (name, pattern_group) = match p.split_once('.') {
        Some((n, g)) => (n.to_string(), Some(g.to_string())),
        None => (p.clone(), None),
    };
    if let Some(g) = pattern_group
        && g != group.to_ascii_lowercase()
    {
        return false;
    }
    name == kind.to_ascii_lowercase() || (!plural.is_empty() && name == plural.to_ascii_lowercase())
}

impl Selection {
    /// Checks patterns up front so that errors name the bad input.
    pub fn validate(&self) -> Result<(), ModelError> {
        for p in self.namespaces.iter().chain(&self.exclude_namespaces) {
            glob(p)?;
        }
        Ok(())
    }

    pub fn namespace_selected(&self, ns: &str) -> bool {
        let matches = |patterns: &[String]| {
            patterns
                .iter()
                .any(|p| glob(p).is_ok_and(|g| g.is_match(ns)))
        };
        if matches(&self.exclude_namespaces) {
            return false;
        }
        if self.namespaces.iter().any(|p| p == ns) {
            return true;
        }
        if self.all_namespaces {
            return !SYSTEM_NAMESPACES.contains(&ns);
        }
        matches(&self.namespaces)
    }

    /// Whether `--exclude-kind` names the kind (dependencies of a subset
    /// are taken whatever `--include-kind` says, but never excluded kinds).
    pub fn kind_excluded(&self, group: &str, kind: &str, plural: &str) -> bool {
        self.exclude_kinds
            .iter()
            .any(|p| kind_matches(p, group, kind, plural))
    }

    /// Kinds match by Kind, plural, `plural.group` or `Kind.group`, case-insensitively.
    pub fn kind_selected(&self, group: &str, kind: &str, plural: &str) -> bool {
        if self
            .exclude_kinds
            .iter()
            .any(|p| kind_matches(p, group, kind, plural))
        {
            return false;
        }
        self.include_kinds.is_empty()
            || self
                .include_kinds
                .iter()
                .any(|p| kind_matches(p, group, kind, plural))
    }

    /// Labels and application membership of one object.
    pub fn object_selected(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        if let Some(selector) = &self.selector
            && !selector.matches(labels)
        {
            return false;
        }
        match &self.application {
            None => true,
            Some(app) => in_application(obj, app),
        }
    }
}

/// Whether an object belongs to application `app`: the recommended labels,
/// or the Helm release of that name (its objects and its release Secrets).
pub fn in_application(obj: &Value, app: &str) -> bool {
    let label = |k: &str| {
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
    };
    let annotation = |k: &str| {
        obj.pointer("/metadata/annotations")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
    };
    if label("app.kubernetes.io/instance") == Some(app)
        || label("app.kubernetes.io/part-of") == Some(app)
    {
        return true;
    }
    if annotation("meta.helm.sh/release-name") == Some(app) {
        return true;
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    obj.get("type").and_then(Value::as_str) == Some("helm.sh/release.v1")
        && name.starts_with(&format!("sh.helm.release.v1.{app}.v"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn kubectl_selector_syntax_parses_and_matches() {
        let s = LabelSelector::parse(
            "app=web, tier!=cache,env in (prod, stage),zone notin (x),team,!legacy",
        )
        .unwrap();
        assert_eq!(s.requirements.len(), 6);
        assert_eq!(
            s.to_string(),
            "app=web,tier!=cache,env in (prod,stage),zone notin (x),team,!legacy"
        );
        assert!(s.matches(Some(&labels(
            json!({"app": "web", "env": "prod", "team": "a"})
        ))));
        assert!(!s.matches(Some(&labels(
            json!({"app": "web", "env": "dev", "team": "a"})
        ))));
        assert!(!s.matches(Some(&labels(
            json!({"app": "web", "env": "prod", "team": "a", "legacy": "1"})
        ))));
        assert!(
            LabelSelector::parse("app==web")
                .unwrap()
                .matches(Some(&labels(json!({"app": "web"}))))
        );
        assert!(LabelSelector::parse("").unwrap().is_empty());
    }

    #[test]
    fn selector_errors_name_input_and_position() {
        let e = LabelSelector::parse("app=web,,x").unwrap_err();
        assert!(e.to_string().contains("'app=web,,x' at position 8"), "{e}");
        let e = LabelSelector::parse("env in prod").unwrap_err();
        assert!(e.to_string().contains("expected '('"), "{e}");
        let e = LabelSelector::parse("a=b c=d").unwrap_err();
        assert!(e.to_string().contains("expected ','"), "{e}");
    }

    #[test]
    fn object_selectors_support_match_expressions() {
        let s = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "old", "operator": "DoesNotExist"}]})).unwrap();
        assert!(s.matches(Some(&labels(json!({"app": "web", "tier": "b"})))));
        assert!(!s.matches(Some(&labels(json!({"app": "web", "tier": "c"})))));
        assert!(!s.matches(None));
    }

    #[test]
    fn namespaces_match_globs_exclusions_and_skip_system_namespaces_under_all() {
        let s = Selection {
            namespaces: vec!["team-*".into(), "kube-system".into()],
            exclude_namespaces: vec!["team-old".into()],
            ..Default::default()
        };
        assert!(s.namespace_selected("team-a"));
        assert!(!s.namespace_selected("team-old"));
        assert!(s.namespace_selected("kube-system"), "named explicitly");
        assert!(!s.namespace_selected("default"));
        let all = Selection {
            all_namespaces: true,
            ..Default::default()
        };
        assert!(all.namespace_selected("default"));
        assert!(!all.namespace_selected("kube-system"));
        let bad = Selection {
            namespaces: vec!["[".into()],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("'['"));
    }

    #[test]
    fn kinds_match_by_kind_plural_and_group() {
        let s = Selection {
            include_kinds: vec!["deployments.apps".into(), "ConfigMap".into()],
            exclude_kinds: vec!["secrets".into()],
            ..Default::default()
        };
        assert!(s.kind_selected("apps", "Deployment", "deployments"));
        assert!(s.kind_selected("", "ConfigMap", "configmaps"));
        assert!(!s.kind_selected("extensions", "Deployment", "deployments"));
        assert!(!s.kind_selected("", "Service", "services"));
        let ex = Selection {
            exclude_kinds: vec!["secrets".into()],
            ..Default::default()
        };
        assert!(!ex.kind_selected("", "Secret", "secrets"));
        assert!(ex.kind_selected("", "ConfigMap", "configmaps"));
    }

    #[test]
    fn plurals_are_guessed_like_the_api_server_does() {
        assert_eq!(guess_plural("StorageClass"), "storageclasses");
        assert_eq!(guess_plural("NetworkPolicy"), "networkpolicies");
        assert_eq!(guess_plural("Ingress"), "ingresses");
        assert_eq!(guess_plural("Deployment"), "deployments");
        assert_eq!(guess_plural("Gateway"), "gateways");
        let s = Selection {
            exclude_kinds: vec!["storageclasses".into()],
            ..Default::default()
        };
        assert!(!s.kind_selected("storage.k8s.io", "StorageClass", ""));
    }

    #[test]
    fn applications_match_recommended_labels_and_helm_releases() {
        let s = Selection {
            application: Some("shop".into()),
            ..Default::default()
        };
        assert!(s.object_selected(
            &json!({"metadata": {"labels": {"app.kubernetes.io/instance": "shop"}}})
        ));
        assert!(s.object_selected(
            &json!({"metadata": {"labels": {"app.kubernetes.io/part-of": "shop"}}})
        ));
        assert!(s.object_selected(
            &json!({"metadata": {"annotations": {"meta.helm.sh/release-name": "shop"}}})
        ));
        assert!(s.object_selected(&json!({"type": "helm.sh/release.v1", "metadata": {"name": "sh.helm.release.v1.shop.v3"}})));
        assert!(!s.object_selected(
            &json!({"metadata": {"labels": {"app.kubernetes.io/instance": "blog"}}})
        ));
        assert!(!s.object_selected(&json!({"type": "helm.sh/release.v1", "metadata": {"name": "sh.helm.release.v1.shopping.v1"}})));
    }
}
