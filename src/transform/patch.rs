//! Declarative steps: RFC 6902 JSON patches applied to the objects a
//! selector picks.

use json_patch::PatchOperation;
use serde_json::Value;

/// Reads the operations of a patch step, reporting each one that is not
/// a valid RFC 6902 operation.
pub(crate) fn compile(operations: &[Value]) -> Result<Vec<PatchOperation>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(operations.len());
    for (i, op) in operations.iter().enumerate() {
        match serde_json::from_value::<PatchOperation>(op.clone()) {
            Ok(op) => out.push(op),
            Err(e) => errors.push(format!("patch[{i}]: not an RFC 6902 operation ({e}): {op}")),
        }
    }
    if operations.is_empty() {
        errors.push("patch has no operations".to_string());
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Applies the operations to a copy of `object`; all or nothing.
pub(crate) fn apply(object: &Value, operations: &[PatchOperation]) -> Result<Value, String> {
    let mut out = object.clone();
    json_patch::patch(&mut out, operations).map_err(|e| {
        let op = operations
            .get(e.operation)
            .map(ToString::to_string)
            .unwrap_or_default();
        format!("patch[{}] {op} failed: {}", e.operation, e.kind)
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn operations_apply_in_order_and_failures_name_the_operation() {
        let ops = compile(&[
            json!({"op": "replace", "path": "/spec/replicas", "value": 1}),
            json!({"op": "add", "path": "/metadata/labels/env", "value": "test"}),
        ])
        .unwrap();
        let obj = json!({"metadata": {"name": "web", "labels": {}}, "spec": {"replicas": 3}});
        let out = apply(&obj, &ops).unwrap();
        assert_eq!(out["spec"]["replicas"], 1);
        assert_eq!(out["metadata"]["labels"]["env"], "test");
        let err = apply(&json!({"metadata": {"name": "web"}}), &ops).unwrap_err();
        assert!(err.starts_with("patch[0] "), "{err}");
        assert!(err.contains("/spec/replicas"), "{err}");
    }

    #[test]
    fn invalid_operations_are_all_reported() {
        let errors = compile(&[
            json!({"op": "replce", "path": "/a", "value": 1}),
            json!({"op": "add", "value": 1}),
            json!({"op": "remove", "path": "/b"}),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("patch[0]") && errors[1].starts_with("patch[1]"));
        assert!(compile(&[]).is_err());
    }
}
