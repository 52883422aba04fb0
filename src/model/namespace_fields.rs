//! Fields of custom resources that name a namespace: where a GitOps
//! Application deploys to, the namespace an operator watches, the namespace
//! of a referenced source. Moving or cloning an application must follow
//! them, or the copy keeps pointing at the original.
//!
//! A field names a namespace when the CRD's schema says so: a string (or a
//! list of strings) whose property is called `namespace`, `namespaces` or
//! ends in `Namespace`/`Namespaces` (the Kubernetes API convention for
//! object references, `targetNamespace`, `sourceNamespaces`…), or whose
//! description starts by calling it a namespace ("Namespace to deploy
//! into", "The namespace of…"). Parts of an object the schema does not
//! describe (no CRD in the snapshot, `x-kubernetes-preserve-unknown-fields`)
//! follow the naming convention alone.

use serde_json::Value;

use super::edges::is_builtin_group;
use super::object::split_api_version;

/// One step of a path into an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A path as text, e.g. `spec.destinations[1].namespace`.
pub fn path_text(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The value at `path` in `object`, to change it.
pub fn value_at_mut<'a>(object: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(object, |v, step| match step {
        Step::Key(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

fn named_like_namespace(key: &str) -> bool {
    key == "namespace" || key.ends_with("Namespace")
}

fn named_like_namespaces(key: &str) -> bool {
    key == "namespaces" || key.ends_with("Namespaces")
}

fn described_as_namespace(schema: Option<&Value>) -> bool {
    let Some(description) = schema
        .and_then(|s| s.get("description"))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let d = description.trim_start().to_ascii_lowercase();
    [
        "namespace ",
        "namespace,",
        "namespace.",
        "namespaces ",
        "the namespace ",
        "the namespaces ",
        "name of the namespace",
        "the name of the namespace",
    ]
    .iter()
    .any(|p| d.starts_with(p))
}

/// The schema of the object's version in a CRD (v1 `versions[].schema`, or
/// v1beta1's `validation` for every version).
pub fn crd_schema<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    crd.pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(version))
        .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
        .or_else(|| crd.pointer("/spec/validation/openAPIV3Schema"))
}

/// Paths of every field of the custom resource `object` that names a
/// namespace (none for built-in kinds and CRDs themselves); `crd` is the
/// object's CRD when known. `metadata` and `status` are not looked at.
pub fn namespace_fields(object: &Value, crd: Option<&Value>) -> Vec<Vec<Step>> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (group, version) = split_api_version(api_version);
    if is_builtin_group(group) {
        return Vec::new();
    }
    let schema = crd.and_then(|c| crd_schema(c, version));
    let mut out = Vec::new();
    let Some(map) = object.as_object() else {
        return out;
    };
    for (key, value) in map {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
            continue;
        }
        let mut path = vec![Step::Key(key.clone())];
        visit(key, value, property(schema, key), &mut path, &mut out);
    }
    out
}

fn property<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let schema = schema?;
    schema
        .pointer("/properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

/// Collects the namespace fields at and below `value` (the field `key`),
/// described by `schema` when the CRD describes it.
fn visit(
    key: &str,
    value: &Value,
    schema: Option<&Value>,
    path: &mut Vec<Step>,
    out: &mut Vec<Vec<Step>>,
) {
    match value {
        Value::String(_) if named_like_namespace(key) || described_as_namespace(schema) => {
            out.push(path.clone());
        }
        Value::Array(items) => {
            let strings = !items.is_empty() && items.iter().all(Value::is_string);
            if strings {
                if named_like_namespaces(key) || described_as_namespace(schema) {
                    out.push(path.clone());
                }
                return;
            }
            let item_schema = schema.and_then(|s| s.get("items"));
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                visit(key, item, item_schema, path, out);
                path.pop();
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                path.push(Step::Key(k.clone()));
                visit(k, v, property(schema, k), path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(object: &Value, crd: Option<&Value>) -> Vec<String> {
        namespace_fields(object, crd)
            .iter()
            .map(|p| path_text(p))
            .collect()
    }

    #[test]
    fn conventional_names_are_followed_without_a_crd() {
        let app = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "shop", "namespace": "argocd"},
            "spec": {"destination": {"server": "https://kubernetes.default.svc", "namespace": "prod"},
                     "source": {"repoURL": "https://git.example.com/shop.git", "path": "deploy"},
                     "targets": [{"targetNamespace": "prod"}, {"name": "x"}],
                     "sourceNamespaces": ["prod", "prod-extra"],
                     "replicas": 2},
            "status": {"sync": {"namespace": "prod"}}});
        assert_eq!(
            paths(&app, None),
            vec![
                "spec.destination.namespace",
                "spec.targets[0].targetNamespace",
                "spec.sourceNamespaces"
            ]
        );
        let builtin = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "b", "namespace": "a"}, "subjects": [{"namespace": "a"}]});
        assert!(
            paths(&builtin, None).is_empty(),
            "built-in kinds have their own rules"
        );
    }

    #[test]
    fn the_crd_schema_names_namespace_fields_by_description() {
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "watchers.ops.example.com"},
        "spec": {"group": "ops.example.com", "names": {"kind": "Watcher", "plural": "watchers"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {
                    "watch": {"type": "string", "description": "Namespace the operator watches."},
                    "deployTo": {"type": "array", "items": {"type": "string"}, "description": "The namespaces it deploys into."},
                    "label": {"type": "string", "description": "A label."},
                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                }}}}}}]}});
        let watcher = json!({"apiVersion": "ops.example.com/v1", "kind": "Watcher",
            "metadata": {"name": "w", "namespace": "ops"},
            "spec": {"watch": "prod", "deployTo": ["prod"], "label": "prod", "extra": {"namespace": "prod"}}});
        assert_eq!(
            paths(&watcher, Some(&crd)),
            vec!["spec.watch", "spec.deployTo", "spec.extra.namespace"]
        );
        assert_eq!(
            paths(&watcher, None),
            vec!["spec.extra.namespace"],
            "without the schema only the naming convention is known"
        );
    }
}
