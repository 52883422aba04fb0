//! Object identity: `ObjectRef` = group, version, kind, namespace, name.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("object has no {field}{}", name.as_ref().map(|n| format!(" (metadata.name {n})")).unwrap_or_default())]
    MissingField {
        field: &'static str,
        name: Option<String>,
    },
    #[error("invalid label selector '{input}' at position {position}: {message}")]
    Selector {
        input: String,
        position: usize,
        message: String,
    },
    #[error("invalid namespace pattern '{pattern}': {message}")]
    Glob { pattern: String, message: String },
    #[error("the graph document is not valid: {0}")]
    Graph(String),
}

/// Identifies one Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

/// A kind independent of its version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupKind {
    pub group: String,
    pub kind: String,
}

impl GroupKind {
    pub fn new(group: &str, kind: &str) -> Self {
        GroupKind {
            group: group.to_string(),
            kind: kind.to_string(),
        }
    }
}

/// Splits `apps/v1` into (`apps`, `v1`) and `v1` into (``, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

impl ObjectRef {
    pub fn from_object(obj: &Value) -> Result<ObjectRef, ModelError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let missing = |field| ModelError::MissingField {
            field,
            name: name.map(String::from),
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("apiVersion"))?;
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| missing("kind"))?;
        let name = name.ok_or_else(|| missing("metadata.name"))?;
        let (group, version) = split_api_version(api_version);
        Ok(ObjectRef {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            namespace: obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(String::from),
            name: name.to_string(),
        })
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_kind(&self) -> GroupKind {
        GroupKind::new(&self.group, &self.kind)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refs_parse_group_version_scope_and_display_kubectl_style() {
        let r = ObjectRef::from_object(&json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}})).unwrap();
        assert_eq!((r.group.as_str(), r.version.as_str()), ("apps", "v1"));
        assert_eq!(r.to_string(), "Deployment/shop/web");
        assert_eq!(r.api_version(), "apps/v1");
        let ns = ObjectRef::from_object(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        )
        .unwrap();
        assert_eq!(ns.group, "");
        assert_eq!(ns.to_string(), "Namespace/shop");
    }

    #[test]
    fn missing_fields_are_named() {
        let e = ObjectRef::from_object(&json!({"kind": "ConfigMap", "metadata": {"name": "x"}}))
            .unwrap_err();
        assert_eq!(e.to_string(), "object has no apiVersion (metadata.name x)");
        let e = ObjectRef::from_object(
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "object has no metadata.name");
    }
}
