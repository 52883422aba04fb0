//! `--namespace-mapping old=new`: moves objects to other namespaces and makes
//! every reference follow. The flag is a shorthand for a first transform
//! step with the built-in `namespace` rule set and `map: {old: new}`, so
//! there is one implementation of what a namespace move rewrites (see
//! `transforms/namespace.rhai`: bindings, webhooks, Service DNS names in
//! env and ConfigMaps, pod affinity, CRD conversion webhooks, ExternalName
//! Services, namespace fields of custom resources…).

use std::collections::BTreeMap;

/// Old namespace → new namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceMapping(pub BTreeMap<String, String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("namespace mapping '{0}' is not OLD=NEW")]
    Syntax(String),
    #[error("namespace {0} is mapped twice")]
    Duplicate(String),
    #[error("namespaces {0} and {1} are both mapped to {2}; a mapping must not merge namespaces")]
    Merge(String, String, String),
    #[error("namespace mapping '{item}': '{name}' is not a valid namespace name: {why}")]
    InvalidName {
        item: String,
        name: String,
        why: String,
    },
}

impl NamespaceMapping {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, MappingError> {
        let mut map = BTreeMap::new();
        let mut targets: BTreeMap<String, String> = BTreeMap::new();
        for item in items {
            let item = item.as_ref();
            let (old, new) = item
                .split_once('=')
                .filter(|(o, n)| !o.is_empty() && !n.is_empty())
                .ok_or_else(|| MappingError::Syntax(item.to_string()))?;
            crate::model::names::NameRule::Dns1123Label
                .check(new)
                .map_err(|why| MappingError::InvalidName {
                    item: item.to_string(),
                    name: new.to_string(),
                    why,
                })?;
            if map.insert(old.to_string(), new.to_string()).is_some() {
                return Err(MappingError::Duplicate(old.to_string()));
            }
            if let Some(other) = targets.insert(new.to_string(), old.to_string()) {
                return Err(MappingError::Merge(other, old.to_string(), new.to_string()));
            }
        }
        Ok(NamespaceMapping(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The namespace `ns` lands in.
    pub fn map<'a>(&'a self, ns: &'a str) -> &'a str {
        self.0.get(ns).map(String::as_str).unwrap_or(ns)
    }

    /// The transform plan the mapping stands for.
    pub fn transform_yaml(&self) -> String {
        let plan = serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "TransformPlan",
            "metadata": {"name": "namespace-mapping"},
            "spec": {"steps": [{"ruleSet": "namespace", "params": {"map": self.0}}]},
        });
        // JSON is YAML.
        plan.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::{TransformPlan, run};
    use serde_json::{Value, json};

    #[test]
    fn parse_rejects_bad_syntax_duplicates_and_merges() {
        assert_eq!(
            NamespaceMapping::parse(&["prod"]),
            Err(MappingError::Syntax("prod".into()))
        );
        assert_eq!(
            NamespaceMapping::parse(&["=x"]),
            Err(MappingError::Syntax("=x".into()))
        );
        assert_eq!(
            NamespaceMapping::parse(&["a=b", "a=c"]),
            Err(MappingError::Duplicate("a".into()))
        );
        assert!(matches!(
            NamespaceMapping::parse(&["a=c", "b=c"]),
            Err(MappingError::Merge(..))
        ));
    }

    #[test]
    fn parse_rejects_targets_that_are_not_namespace_names() {
        for bad in ["a=Shop", "a=shop_test", "a=-x"] {
            let err = NamespaceMapping::parse(&[bad]).unwrap_err();
            assert!(
                matches!(err, MappingError::InvalidName { .. }),
                "{bad}: {err:?}"
            );
        }
        assert!(NamespaceMapping::parse(&["shop=shop-test"]).is_ok());
    }

    fn mapped(objects: Vec<Value>) -> Vec<Value> {
        let mapping = NamespaceMapping::parse(&["prod=staging"]).expect("mapping");
        let plan = TransformPlan::from_yaml(&mapping.transform_yaml(), "--namespace-mapping", None)
            .expect("the mapping compiles");
        run(&plan, objects, &Default::default())
            .expect("runs")
            .objects
    }

    #[test]
    fn the_flag_rewrites_what_the_namespace_rule_set_rewrites() {
        let out = mapped(vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "prod"},
                   "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web",
                       "env": [{"name": "DB", "value": "postgres://db.prod.svc.cluster.local:5432/app"},
                               {"name": "CACHE", "value": "cache.prod:6379"}]}]}}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "prod"},
                   "data": {"url": "http://api.prod.svc:8080"}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "prod"},
                   "spec": {"type": "ExternalName", "externalName": "db.prod.svc.cluster.local"}}),
        ]);
        assert_eq!(out[0]["metadata"]["name"], "staging");
        let env = &out[1]["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(out[1]["metadata"]["namespace"], "staging");
        assert_eq!(
            env[0]["value"],
            "postgres://db.staging.svc.cluster.local:5432/app"
        );
        assert_eq!(env[1]["value"], "cache.staging:6379");
        assert_eq!(out[2]["data"]["url"], "http://api.staging.svc:8080");
        assert_eq!(
            out[3]["spec"]["externalName"],
            "db.staging.svc.cluster.local"
        );
    }
}
