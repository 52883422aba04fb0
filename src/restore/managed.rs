//! The fields Ferry manages on a live object, from its `managedFields`.
//!
//! Server-side apply removes a field that the applier owned and no longer
//! sends. A restore must therefore see such a field as a change: a field
//! dropped from a newer snapshot is a difference even though every field
//! the snapshot has already matches. [`removals`] finds them; the
//! [`adopted_managed_fields`] step makes the fields Ferry created with a
//! plain create owned by its applies, so that the apply does remove them.

use serde_json::{Map, Value};

use super::FIELD_MANAGER;
use super::diff::{Change, is_empty};

/// Fields Ferry set on `live` (any operation of manager `ferry`) that
/// `desired` no longer has: an apply of `desired` removes them.
///
/// The entry of a plain create also lists the fields the API server
/// defaulted (a Service's `type`, a port's `protocol`…), which a backup
/// leaves out. So fields are compared on the live object as a backup
/// would store it: what normalization strips was never the snapshot's.
pub fn removals(desired: &Value, live: &Value) -> Vec<Change> {
    let normalized = match crate::model::normalize::normalize(live.clone(), &Default::default()) {
        crate::model::normalize::Verdict::Keep { object, .. } => object,
        crate::model::normalize::Verdict::Skip { .. } => live.clone(),
    };
    let Some(entries) = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let mut owned = Value::Object(Map::new());
    for entry in entries {
        if entry["manager"] == FIELD_MANAGER && entry["subresource"].is_null() {
            merge_fields(&mut owned, &entry["fieldsV1"]);
        }
    }
    let mut out = Vec::new();
    if let Some(fields) = owned.as_object() {
        walk("", fields, Some(desired), &normalized, &mut out);
    }
    out
}

/// Paths whose removal is not the snapshot's doing: owner references get
/// their UIDs at apply time, and are written whatever the diff says.
const NOT_COMPARED: &[&str] = &["metadata.ownerReferences"];

fn walk(
    path: &str,
    fields: &Map<String, Value>,
    desired: Option<&Value>,
    live: &Value,
    out: &mut Vec<Change>,
) {
    for (key, sub) in fields {
        if let Some(name) = key.strip_prefix("f:") {
            let p = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            if NOT_COMPARED.contains(&p.as_str()) {
                continue;
            }
            let Some(l) = live.get(name) else { continue };
            match desired.and_then(|d| d.get(name)) {
                None if !is_empty(l) => out.push(removed(p, l)),
                None => {}
                Some(d) => {
                    if let Some(children) = sub.as_object() {
                        walk(&p, children, Some(d), l, out);
                    }
                }
            }
        } else if let Some(key_text) = key.strip_prefix("k:") {
            // A list item identified by its key fields (containers by
            // name, ports by port and protocol…).
            let Ok(Value::Object(item_key)) = serde_json::from_str::<Value>(key_text) else {
                continue;
            };
            // A key field may be missing where it was defaulted (a
            // port's protocol): the others must match.
            let find = |list: &Value| {
                list.as_array()?
                    .iter()
                    .find(|item| {
                        item_key.iter().any(|(k, v)| item.get(k) == Some(v))
                            && item_key
                                .iter()
                                .all(|(k, v)| item.get(k).is_none_or(|x| x == v))
                    })
                    .cloned()
            };
            let Some(l) = find(live) else { continue };
            let p = format!("{path}[{key_text}]");
            match desired.and_then(find) {
                None => out.push(removed(p, &l)),
                Some(d) => {
                    if let Some(children) = sub.as_object() {
                        walk(&p, children, Some(&d), &l, out);
                    }
                }
            }
        }
        // `v:` (set items) and `i:` (positions) are compared as part of
        // their list by the diff of desired values.
    }
}

fn removed(path: String, live: &Value) -> Change {
    Change {
        path,
        live: Some(live.clone()),
        desired: Value::Null,
    }
}

/// The managed fields of `live` with the entry of Ferry's create
/// (manager `ferry`, operation `Update`) turned into Ferry's apply entry,
/// merged into an existing one; `None` when there is no such entry. As
/// `kubectl` does when moving to server-side apply, this makes the fields
/// Ferry created owned by its applies, so that an apply that no longer
/// sets a field removes it.
pub fn adopted_managed_fields(live: &Value) -> Option<(Value, String)> {
    let entries = live.pointer("/metadata/managedFields")?.as_array()?;
    let resource_version = live.pointer("/metadata/resourceVersion")?.as_str()?;
    let is = |e: &Value, operation: &str| {
        e["manager"] == FIELD_MANAGER && e["operation"] == operation && e["subresource"].is_null()
    };
    let created = entries.iter().position(|e| is(e, "Update"))?;
    let mut adopted: Vec<Value> = entries.clone();
    let mut entry = adopted.remove(created);
    match adopted.iter_mut().find(|e| is(e, "Apply")) {
        Some(applied) => merge_fields(&mut applied["fieldsV1"], &entry["fieldsV1"]),
        None => {
            entry["operation"] = Value::from("Apply");
            adopted.push(entry);
        }
    }
    Some((Value::Array(adopted), resource_version.to_string()))
}

/// Union of two `fieldsV1` trees (maps of `f:`/`k:`/`v:` keys).
fn merge_fields(into: &mut Value, from: &Value) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) else {
        return;
    };
    for (key, value) in from {
        match into.get_mut(key) {
            Some(existing) => merge_fields(existing, value),
            None => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn live_with(fields: Value, data: Value) -> Value {
        json!({"metadata": {"name": "c", "resourceVersion": "9", "managedFields": [
            {"manager": "ferry", "operation": "Update", "fieldsV1": fields},
            {"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:data": {"f:theirs": {}}}},
        ]}, "data": data})
    }

    #[test]
    fn a_field_ferry_set_and_the_snapshot_dropped_is_a_removal() {
        let live = live_with(
            json!({"f:data": {".": {}, "f:a": {}, "f:b": {}}}),
            json!({"a": "1", "b": "2", "theirs": "x"}),
        );
        let desired = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        let got = removals(&desired, &live);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].path, "data.b");
        assert_eq!(got[0].desired, Value::Null);
        assert_eq!(got[0].to_string(), "data.b: \"2\" → (removed)");
    }

    #[test]
    fn fields_of_other_managers_and_kept_fields_are_no_removal() {
        let live = live_with(
            json!({"f:data": {"f:a": {}}, "f:metadata": {"f:ownerReferences": {}}}),
            json!({"a": "1", "theirs": "x"}),
        );
        let desired = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        assert!(removals(&desired, &live).is_empty());
    }

    #[test]
    fn a_dropped_list_item_is_found_by_its_key() {
        let live = json!({"metadata": {"managedFields": [{"manager": "ferry", "operation": "Apply", "fieldsV1":
            {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {"f:image": {}, "f:args": {}}, "k:{\"name\":\"sidecar\"}": {"f:image": {}}}}}}]},
            "spec": {"containers": [{"name": "web", "image": "a", "args": ["x"]}, {"name": "sidecar", "image": "b"}]}});
        let desired = json!({"spec": {"containers": [{"name": "web", "image": "a"}]}});
        let mut paths: Vec<String> = removals(&desired, &live)
            .into_iter()
            .map(|c| c.path)
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "spec.containers[{\"name\":\"sidecar\"}]".to_string(),
                "spec.containers[{\"name\":\"web\"}].args".to_string()
            ]
        );
    }

    #[test]
    fn a_create_entry_becomes_the_apply_entry() {
        let live = json!({"metadata": {"resourceVersion": "42", "managedFields": [
            {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
            {"manager": "ferry", "operation": "Update", "fieldsV1": {"f:data": {"f:a": {}}}},
        ]}});
        let (fields, rv) = adopted_managed_fields(&live).expect("ferry created it");
        assert_eq!(rv, "42");
        assert_eq!(
            fields,
            json!([
                {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
                {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:a": {}}}},
            ])
        );
    }

    #[test]
    fn a_create_entry_merges_into_an_existing_apply_entry() {
        let live = json!({"metadata": {"resourceVersion": "7", "managedFields": [
            {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:b": {}}}},
            {"manager": "ferry", "operation": "Update", "fieldsV1": {"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {}}}},
        ]}});
        let (fields, _) = adopted_managed_fields(&live).expect("ferry created it");
        assert_eq!(
            fields,
            json!([
                {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:b": {}, "f:a": {}}, "f:metadata": {"f:labels": {}}}},
            ])
        );
    }

    #[test]
    fn objects_ferry_did_not_create_are_left_alone() {
        let applied = json!({"metadata": {"resourceVersion": "1", "managedFields": [
            {"manager": "ferry", "operation": "Apply", "fieldsV1": {}},
            {"manager": "kubectl", "operation": "Update", "fieldsV1": {}},
        ]}});
        assert_eq!(adopted_managed_fields(&applied), None);
        assert_eq!(adopted_managed_fields(&json!({"metadata": {}})), None);
    }
}
