//! `--namespace-mapping old=new`: moves objects to other namespaces and makes
//! every namespaced reference follow (RoleBinding and ClusterRoleBinding
//! subjects, PersistentVolume claimRefs, webhook and APIService service
//! references, NetworkPolicy selectors on `kubernetes.io/metadata.name`,
//! fields of custom resources named like namespaces).
//!
//! A cluster-scoped object that follows a mapped namespace (a
//! ClusterRoleBinding granting to its service accounts, a webhook
//! configuration calling its Service) is restored as a copy named for the
//! new namespace: on a shared cluster the original namespace keeps its
//! binding or webhook, and a clone never takes them over. The copy's name is
//! the original's with the old namespace replaced by the new one, or with
//! `-<new namespace>` appended when the name does not contain it.
//!
//! Pure: values in, values out.

use std::collections::BTreeMap;

use serde_json::Value;

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

    fn remap_at(&self, value: &mut Value) {
        if let Some(ns) = value.as_str()
            && let Some(new) = self.0.get(ns)
        {
            *value = Value::String(new.clone());
        }
    }

    /// The name of the copy of cluster-scoped object `name` that follows
    /// namespace `old` to `new`.
    fn copy_name(name: &str, old: &str, new: &str) -> String {
        if name.contains(old) {
            name.replacen(old, new, 1)
        } else {
            format!("{name}-{new}")
        }
    }

    /// Rewrites one object in place.
    pub fn apply(&self, obj: &mut Value) {
        if self.is_empty() {
            return;
        }
        let before = obj.clone();
        self.apply_references(obj);
        let follows = |o: &Value| {
            let kind = o.get("kind").and_then(Value::as_str).unwrap_or_default();
            matches!(
                kind,
                "ClusterRoleBinding"
                    | "ValidatingWebhookConfiguration"
                    | "MutatingWebhookConfiguration"
            )
        };
        if follows(obj) && *obj != before {
            // The first namespace reference that moved names the copy.
            let referenced = before
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| s.get("namespace"))
                .chain(
                    before
                        .get("webhooks")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|h| h.pointer("/clientConfig/service/namespace")),
                )
                .filter_map(Value::as_str);
            let moved = referenced.filter_map(|ns| self.0.get_key_value(ns)).next();
            if let (Some((old, new)), Some(name)) = (moved, obj.pointer_mut("/metadata/name"))
                && let Some(current) = name.as_str()
            {
                *name = Value::String(Self::copy_name(current, old, new));
            }
        }
    }

    fn apply_references(&self, obj: &mut Value) {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let group = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .and_then(|v| v.rsplit_once('/').map(|(g, _)| g.to_string()))
            .unwrap_or_default();
        if let Some(ns) = obj.pointer_mut("/metadata/namespace") {
            self.remap_at(ns);
        }
        match (group.as_str(), kind.as_str()) {
            ("", "Namespace") => {
                if let Some(name) = obj.pointer_mut("/metadata/name") {
                    self.remap_at(name);
                }
                if let Some(label) =
                    obj.pointer_mut("/metadata/labels/kubernetes.io~1metadata.name")
                {
                    self.remap_at(label);
                }
            }
            ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => {
                if let Some(subjects) = obj.get_mut("subjects").and_then(Value::as_array_mut) {
                    for subject in subjects {
                        if let Some(ns) = subject.get_mut("namespace") {
                            self.remap_at(ns);
                        }
                    }
                }
            }
            ("", "PersistentVolume") => {
                if let Some(ns) = obj.pointer_mut("/spec/claimRef/namespace") {
                    self.remap_at(ns);
                }
            }
            (
                "admissionregistration.k8s.io",
                "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration",
            ) => {
                if let Some(hooks) = obj.get_mut("webhooks").and_then(Value::as_array_mut) {
                    for hook in hooks {
                        if let Some(ns) = hook.pointer_mut("/clientConfig/service/namespace") {
                            self.remap_at(ns);
                        }
                    }
                }
            }
            ("apiregistration.k8s.io", "APIService") => {
                if let Some(ns) = obj.pointer_mut("/spec/service/namespace") {
                    self.remap_at(ns);
                }
            }
            ("networking.k8s.io", "NetworkPolicy") => {
                for direction in ["ingress", "egress"] {
                    let peers_key = if direction == "ingress" { "from" } else { "to" };
                    let Some(rules) = obj
                        .pointer_mut(&format!("/spec/{direction}"))
                        .and_then(Value::as_array_mut)
                    else {
                        continue;
                    };
                    for rule in rules {
                        let Some(peers) = rule.get_mut(peers_key).and_then(Value::as_array_mut)
                        else {
                            continue;
                        };
                        for peer in peers {
                            if let Some(label) = peer.pointer_mut(
                                "/namespaceSelector/matchLabels/kubernetes.io~1metadata.name",
                            ) {
                                self.remap_at(label);
                            }
                            if let Some(exprs) = peer
                                .pointer_mut("/namespaceSelector/matchExpressions")
                                .and_then(Value::as_array_mut)
                            {
                                for expr in exprs {
                                    if expr.get("key").and_then(Value::as_str)
                                        == Some("kubernetes.io/metadata.name")
                                        && let Some(values) =
                                            expr.get_mut("values").and_then(Value::as_array_mut)
                                    {
                                        values.iter_mut().for_each(|v| self.remap_at(v));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        // Custom resources: fields named like namespaces (`namespace`,
        // `targetNamespace`, `watchNamespaces`…).
        use crate::model::namespace_fields::{namespace_fields, value_at_mut};
        for path in namespace_fields(obj, None) {
            match value_at_mut(obj, &path) {
                Some(Value::Array(items)) => items.iter_mut().for_each(|i| self.remap_at(i)),
                Some(value) => self.remap_at(value),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prod_to_staging() -> NamespaceMapping {
        NamespaceMapping::parse(&["prod=staging"]).unwrap()
    }

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
        for bad in ["shop=Bad_2", "shop=../x", "shop=a.b", "shop=-x"] {
            let err = NamespaceMapping::parse(&[bad]).unwrap_err();
            assert!(
                matches!(err, MappingError::InvalidName { .. }),
                "{bad}: {err}"
            );
        }
        assert!(NamespaceMapping::parse(&["shop=shop-test"]).is_ok());
    }

    #[test]
    fn namespaced_objects_move_and_others_stay() {
        let m = prod_to_staging();
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "prod"}});
        m.apply(&mut cm);
        assert_eq!(cm["metadata"]["namespace"], "staging");
        let mut other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "dev"}});
        m.apply(&mut other);
        assert_eq!(other["metadata"]["namespace"], "dev");
    }

    #[test]
    fn the_namespace_object_is_renamed_with_its_name_label() {
        let mut ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "prod", "labels": {"kubernetes.io/metadata.name": "prod", "team": "a"}}});
        prod_to_staging().apply(&mut ns);
        assert_eq!(ns["metadata"]["name"], "staging");
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "staging"
        );
        assert_eq!(ns["metadata"]["labels"]["team"], "a");
    }

    #[test]
    fn binding_subjects_follow() {
        let mut rb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "x"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "web", "namespace": "prod"},
                         {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"},
                         {"kind": "User", "name": "alice"}]});
        prod_to_staging().apply(&mut rb);
        assert_eq!(
            rb["metadata"]["name"], "x-staging",
            "a copy, the original stays"
        );
        assert_eq!(rb["subjects"][0]["namespace"], "staging");
        assert_eq!(rb["subjects"][1]["namespace"], "tools");
        assert!(rb["subjects"][2].get("namespace").is_none());
    }

    #[test]
    fn service_references_claim_refs_and_policy_selectors_follow() {
        let m = prod_to_staging();
        let mut hook = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "v"}, "webhooks": [{"name": "a", "clientConfig": {"service": {"name": "hook", "namespace": "prod"}}}]});
        m.apply(&mut hook);
        assert_eq!(hook["metadata"]["name"], "v-staging");
        assert_eq!(
            hook["webhooks"][0]["clientConfig"]["service"]["namespace"],
            "staging"
        );
        let mut pv = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv"},
            "spec": {"claimRef": {"name": "data", "namespace": "prod"}}});
        m.apply(&mut pv);
        assert_eq!(pv["spec"]["claimRef"]["namespace"], "staging");
        let mut np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "n", "namespace": "prod"},
        "spec": {"ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}}},
            {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["prod", "ops"]}]}}
        ]}]}});
        m.apply(&mut np);
        assert_eq!(
            np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "staging"
        );
        assert_eq!(
            np["spec"]["ingress"][0]["from"][1]["namespaceSelector"]["matchExpressions"][0]["values"],
            json!(["staging", "ops"])
        );
    }

    #[test]
    fn namespace_fields_of_custom_resources_follow() {
        let mut app = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "shop", "namespace": "prod"},
            "spec": {"destination": {"namespace": "prod", "server": "https://kubernetes.default.svc"},
                     "watchNamespaces": ["prod", "other"], "note": "prod"}});
        prod_to_staging().apply(&mut app);
        assert_eq!(app["metadata"]["namespace"], "staging");
        assert_eq!(app["spec"]["destination"]["namespace"], "staging");
        assert_eq!(app["spec"]["watchNamespaces"], json!(["staging", "other"]));
        assert_eq!(app["spec"]["note"], "prod");
    }

    #[test]
    fn cluster_scoped_copies_are_named_for_the_new_namespace() {
        let mut crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "prod-node-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "prod-node-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "web", "namespace": "prod"}]});
        prod_to_staging().apply(&mut crb);
        assert_eq!(crb["metadata"]["name"], "staging-node-reader");
        assert_eq!(
            crb["roleRef"]["name"], "prod-node-reader",
            "the role is shared"
        );
        let mut untouched = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "ops"}, "subjects": [{"kind": "Group", "name": "ops"}]});
        prod_to_staging().apply(&mut untouched);
        assert_eq!(untouched["metadata"]["name"], "ops");
    }
}
