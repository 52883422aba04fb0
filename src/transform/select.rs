//! Which objects a step sees: kinds (`Kind` or `group/Kind`, from a rule
//! set's `kinds()` or a patch's selector), the names a rule set's
//! `mentions()` looks for, and the declarative selectors of patch steps
//! (namespace and name globs, a kubectl label selector, a JSONPath query).

use globset::{Glob, GlobSet, GlobSetBuilder};
use jsonpath_rust::parser::model::{JpQuery, Segment, Selector as JpSelector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;

use crate::model::object::split_api_version;
use crate::model::select::LabelSelector;

use super::config::SelectConfig;
use super::{field, text};

/// `(group, kind)` of an object, from its `apiVersion` and `kind`.
pub(crate) fn group_kind(object: &Value) -> (&str, &str) {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    (split_api_version(api_version).0, kind)
}

/// `Kind` (any group), `group/Kind`, or `/Kind` (the core group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KindMatcher {
    pub group: Option<String>,
    pub kind: String,
}

impl KindMatcher {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (group, kind) = match text.split_once('/') {
            Some((group, kind)) => (Some(group.to_string()), kind),
            None => (None, text),
        };
        let valid = !kind.is_empty() && !kind.contains('/') && !kind.contains(char::is_whitespace);
        if !valid {
            return Err(format!(
                "'{text}' is not a kind: write Kind, group/Kind, or /Kind for the core group"
            ));
        }
        Ok(KindMatcher {
            group,
            kind: kind.to_string(),
        })
    }

    pub fn matches(&self, group: &str, kind: &str) -> bool {
        self.kind == kind && self.group.as_deref().is_none_or(|g| g == group)
    }
}

/// Whether an object is of one of `kinds`.
pub(crate) fn kind_matches(kinds: &[KindMatcher], object: &Value) -> bool {
    let (group, kind) = group_kind(object);
    kinds.iter().any(|k| k.matches(group, kind))
}

/// The names of a rule set's `mentions()`: the rule set sees an object only
/// when one of the object's string values (at any depth; map keys are not
/// looked at) contains one of the names as a whole name, that is not
/// directly preceded or followed by an ASCII letter, digit, `-` or `_`.
/// `prod` is mentioned by `prod`, `db.prod`, `db.prod.svc:5432` and
/// `(prod)`, but not by `production`, `prod-db` or `db.preprod`. Matching is
/// case-sensitive. An empty name is mentioned by every object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mentions {
    names: Vec<String>,
    /// The shortest name's length: shorter strings mention none.
    shortest: usize,
}

impl Mentions {
    pub fn new(names: Vec<String>) -> Self {
        let shortest = names.iter().map(String::len).min().unwrap_or(0);
        Mentions { names, shortest }
    }

    /// Whether `object` mentions one of the names; walks the object
    /// without allocating.
    pub fn found_in(&self, object: &Value) -> bool {
        if self.names.is_empty() {
            return false;
        }
        if self.shortest == 0 {
            return true;
        }
        any_string(object, &|text| {
            text.len() >= self.shortest && self.names.iter().any(|name| mentions_name(text, name))
        })
    }
}

/// Whether some string value at any depth of `value` satisfies `f`.
fn any_string(value: &Value, f: &impl Fn(&str) -> bool) -> bool {
    match value {
        Value::String(text) => f(text),
        Value::Array(items) => items.iter().any(|v| any_string(v, f)),
        Value::Object(map) => map.values().any(|v| any_string(v, f)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn continues_name(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// Whether `name` (not empty) occurs in `text` as a whole name; every
/// occurrence is tried, overlapping ones included.
fn mentions_name(text: &str, name: &str) -> bool {
    let bytes = text.as_bytes();
    let step = name.chars().next().map_or(1, char::len_utf8);
    let mut from = 0;
    while let Some(found) = text[from..].find(name) {
        let at = from + found;
        let end = at + name.len();
        if (at == 0 || !continues_name(bytes[at - 1]))
            && (end == bytes.len() || !continues_name(bytes[end]))
        {
            return true;
        }
        from = at + step;
    }
    false
}

/// A compiled `select:` of a patch step; every given condition must hold.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    pub kinds: Vec<KindMatcher>,
    namespaces: Option<GlobSet>,
    names: Option<GlobSet>,
    labels: Option<LabelSelector>,
    json_path: Option<JsonPathQuery>,
}

/// A JSONPath query that selects an object when it finds anything.
///
/// RFC 9535 applies a filter to the children of a node, so
/// `$.spec[?(@.replicas > 1)]` would test the members of `spec`, not
/// `spec`. Users (and kubectl habits) mean `spec` itself; so a trailing
/// filter also tests the nodes it is applied to.
#[derive(Debug)]
struct JsonPathQuery {
    query: JpQuery,
    /// The query without its trailing filter, and `$[?filter]`.
    trailing_filter: Option<(JpQuery, JpQuery)>,
}

impl JsonPathQuery {
    fn parse(text: &str) -> Result<Self, String> {
        let query = parse_json_path(text).map_err(|e| e.to_string())?;
        let trailing_filter = match query.segments.split_last() {
            Some((last @ Segment::Selector(JpSelector::Filter(_)), prefix)) => Some((
                JpQuery::new(prefix.to_vec()),
                JpQuery::new(vec![last.clone()]),
            )),
            _ => None,
        };
        Ok(JsonPathQuery {
            query,
            trailing_filter,
        })
    }

    /// A query that cannot be evaluated on an object selects nothing.
    fn finds_anything(&self, object: &Value) -> bool {
        if js_path_process(&self.query, object).is_ok_and(|found| !found.is_empty()) {
            return true;
        }
        let Some((prefix, filter)) = &self.trailing_filter else {
            return false;
        };
        let Ok(nodes) = js_path_process(prefix, object) else {
            return false;
        };
        nodes.into_iter().any(|node| {
            let node = node.val();
            node.is_object()
                && js_path_process(filter, &Value::Array(vec![node.clone()]))
                    .is_ok_and(|found| !found.is_empty())
        })
    }
}

fn globs(field: &str, patterns: &[String], errors: &mut Vec<String>) -> Option<GlobSet> {
    if patterns.is_empty() {
        return None;
    }
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        match Glob::new(p) {
            Ok(g) => {
                builder.add(g);
            }
            Err(e) => errors.push(format!("select.{field}: invalid glob '{p}': {e}")),
        }
    }
    match builder.build() {
        Ok(set) => Some(set),
        Err(e) => {
            errors.push(format!("select.{field}: {e}"));
            None
        }
    }
}

impl Selector {
    /// Compiles a selector, collecting every problem.
    pub fn compile(config: &SelectConfig) -> Result<Selector, Vec<String>> {
        let mut errors = Vec::new();
        let mut kinds = Vec::new();
        for k in &config.kinds {
            match KindMatcher::parse(k) {
                Ok(m) => kinds.push(m),
                Err(e) => errors.push(format!("select.kinds: {e}")),
            }
        }
        let namespaces = globs("namespaces", &config.namespaces, &mut errors);
        let names = globs("names", &config.names, &mut errors);
        let labels = match config.labels.as_deref() {
            None => None,
            Some(text) => match LabelSelector::parse(text) {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.push(format!("select.labels: {e}"));
                    None
                }
            },
        };
        let json_path = match config.json_path.as_deref() {
            None => None,
            Some(text) => match JsonPathQuery::parse(text) {
                Ok(q) => Some(q),
                Err(e) => {
                    errors.push(format!("select.jsonPath: invalid JSONPath '{text}': {e}"));
                    None
                }
            },
        };
        if errors.is_empty() {
            Ok(Selector {
                kinds,
                namespaces,
                names,
                labels,
                json_path,
            })
        } else {
            Err(errors)
        }
    }

    pub fn matches(&self, object: &Value) -> bool {
        (self.kinds.is_empty() || kind_matches(&self.kinds, object))
            && self.namespaces.as_ref().is_none_or(|namespaces| {
                // Cluster-scoped objects have no namespace to match.
                let ns = text(object, &["metadata", "namespace"]);
                !ns.is_empty() && namespaces.is_match(ns)
            })
            && self
                .names
                .as_ref()
                .is_none_or(|names| names.is_match(text(object, &["metadata", "name"])))
            && self.labels.as_ref().is_none_or(|labels| {
                labels.matches(field(object, &["metadata", "labels"]).and_then(Value::as_object))
            })
            && self
                .json_path
                .as_ref()
                .is_none_or(|query| query.finds_anything(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(ns: &str, name: &str, replicas: i64, tier: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": {"tier": tier}},
            "spec": {"replicas": replicas}})
    }

    fn select(yaml: &str) -> Selector {
        let config: SelectConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Selector::compile(&config).unwrap()
    }

    #[test]
    fn kinds_match_with_and_without_group() {
        let any = KindMatcher::parse("Deployment").unwrap();
        let apps = KindMatcher::parse("apps/Deployment").unwrap();
        let core = KindMatcher::parse("/Service").unwrap();
        assert!(any.matches("apps", "Deployment") && any.matches("extensions", "Deployment"));
        assert!(apps.matches("apps", "Deployment") && !apps.matches("extensions", "Deployment"));
        assert!(core.matches("", "Service") && !core.matches("serving.knative.dev", "Service"));
        for bad in ["", "apps/", "apps/v1/Deployment", "Deploy ment"] {
            assert!(KindMatcher::parse(bad).is_err(), "{bad}");
        }
        let s = select("kinds: [extensions/Deployment]");
        assert!(!s.matches(&deployment("shop", "web", 1, "a")));
    }

    #[test]
    fn namespace_and_name_globs() {
        let s = select("namespaces: [shop, 'team-*']\nnames: ['web*']");
        assert!(s.matches(&deployment("shop", "web", 1, "a")));
        assert!(s.matches(&deployment("team-red", "web-2", 1, "a")));
        assert!(!s.matches(&deployment("other", "web", 1, "a")));
        assert!(!s.matches(&deployment("shop", "api", 1, "a")));
        let cluster_scoped =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}});
        assert!(!s.matches(&cluster_scoped));
        assert!(select("names: ['web']").matches(&cluster_scoped));
    }

    #[test]
    fn label_selectors_use_kubectl_syntax() {
        let s = select("labels: 'tier in (frontend, edge),!canary'");
        assert!(s.matches(&deployment("shop", "web", 1, "frontend")));
        assert!(!s.matches(&deployment("shop", "web", 1, "backend")));
    }

    #[test]
    fn json_path_selects_when_it_finds_anything() {
        let s = select("jsonPath: '$.spec[?(@.replicas > 1)]'");
        assert!(s.matches(&deployment("shop", "web", 3, "a")));
        assert!(!s.matches(&deployment("shop", "web", 1, "a")));
        let s = select("jsonPath: '$[?(@.replicas > 1)]'");
        assert!(s.matches(&deployment("shop", "web", 3, "a")));
        assert!(!s.matches(&deployment("shop", "web", 1, "a")));
        let s = select("jsonPath: '$.spec.template.spec.containers[?(@.image == \"nginx\")]'");
        let mut d = deployment("shop", "web", 1, "a");
        assert!(!s.matches(&d));
        d["spec"]["template"] =
            json!({"spec": {"containers": [{"image": "redis"}, {"image": "nginx"}]}});
        assert!(s.matches(&d));
        let s = select("jsonPath: '$.metadata.labels.tier'");
        assert!(s.matches(&deployment("shop", "web", 1, "a")));
        assert!(
            !s.matches(
                &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
            )
        );
    }

    #[test]
    fn every_selector_error_is_reported() {
        let config: SelectConfig = serde_yaml_ng::from_str(
            "kinds: ['a/b/C']\nnamespaces: ['[x']\nlabels: 'a in b'\njsonPath: '$[?'",
        )
        .unwrap();
        let errors = Selector::compile(&config).unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:#?}");
    }

    #[test]
    fn mentions_are_whole_names_in_string_values_at_any_depth() {
        let m = Mentions::new(vec!["prod".to_string()]);
        let deep = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "shop"},
            "data": {"settings": "a: 1\nurl: http://db.prod.svc:5432/x\n"}});
        assert!(
            m.found_in(&deep),
            "a Service name deep inside a ConfigMap value"
        );
        for text in [
            "prod",
            "db.prod",
            "x.prod.svc.cluster.local.",
            "(prod)",
            "a prod",
        ] {
            assert!(m.found_in(&json!({"a": [{"b": text}]})), "{text}");
        }
        for text in [
            "production",
            "prod-db",
            "db.preprod",
            "prod_x",
            "PROD",
            "pro",
        ] {
            assert!(!m.found_in(&json!({"a": [{"b": text}]})), "{text}");
        }
        let unrelated = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "production", "labels": {"prod": "yes"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [
                {"name": "web", "env": [{"name": "DB", "value": "db.production.svc"}]}]}}}});
        assert!(
            !m.found_in(&unrelated),
            "map keys and longer names do not count"
        );
        let overlapping = Mentions::new(vec!["a.a".to_string()]);
        assert!(
            overlapping.found_in(&json!("xa.a.a")),
            "the second occurrence is whole"
        );
        assert!(!Mentions::new(vec![]).found_in(&deep));
        assert!(Mentions::new(vec![String::new()]).found_in(&json!({})));
        let two = Mentions::new(vec!["blue".to_string(), "ü".to_string()]);
        assert!(two.found_in(&json!({"x": "é ü"})) && !two.found_in(&json!({"x": "üx"})));
    }

    #[test]
    fn an_empty_selector_selects_everything() {
        assert!(select("{}").matches(&deployment("shop", "web", 1, "a")));
    }
}
