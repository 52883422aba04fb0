//! What a script changed in an object, found by walking the map it
//! returned alongside the original.
//!
//! Only changed values are converted back to JSON; once the step is done
//! (and the originals are no longer shared), the edits are applied to the
//! originals in place. An unchanged object costs one walk, a changed one
//! little more, and key order stays as it was.

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use super::convert::{from_dynamic_at, same};
use super::trace::{self, Change, escape_pointer};

/// One step of a path into an object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Key {
    Field(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Edit {
    /// Replace the value at the path, or add it to its object.
    Set { path: Vec<Key>, value: Value },
    /// Remove the field at the path from its object.
    Remove { path: Vec<Key> },
}

/// A path being walked; borrows the original's keys until an edit needs them.
#[derive(Clone, Copy)]
enum Step<'a> {
    Field(&'a str),
    Index(usize),
}

fn owned(path: &[Step<'_>]) -> Vec<Key> {
    path.iter()
        .map(|s| match s {
            Step::Field(k) => Key::Field(k.to_string()),
            Step::Index(i) => Key::Index(*i),
        })
        .collect()
}

pub(crate) fn pointer(path: &[Key]) -> String {
    let mut out = String::new();
    for key in path {
        out.push('/');
        match key {
            Key::Field(k) => out.push_str(&escape_pointer(k)),
            Key::Index(i) => out.push_str(&i.to_string()),
        }
    }
    out
}

/// The edits that turn `original` into `value`. Arrays of the same length
/// are compared element by element; an array that changed length is set
/// whole (its trace still lists elements).
pub(crate) fn edits(value: &Dynamic, original: &Value) -> Result<Vec<Edit>, String> {
    let mut out = Vec::new();
    walk(value, original, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn walk<'a>(
    value: &Dynamic,
    original: &'a Value,
    path: &mut Vec<Step<'a>>,
    out: &mut Vec<Edit>,
) -> Result<(), String> {
    if value.is_shared() {
        return walk(&value.flatten_clone(), original, path, out);
    }
    match original {
        Value::Object(fields) if value.is_map() => {
            let map = value.read_lock::<Map>().expect("checked to be a map");
            for (k, old) in fields {
                path.push(Step::Field(k));
                match map.get(k.as_str()) {
                    Some(v) => walk(v, old, path, out)?,
                    None => out.push(Edit::Remove { path: owned(path) }),
                }
                path.pop();
            }
            for (k, v) in map.iter() {
                if !fields.contains_key(k.as_str()) {
                    let mut at = owned(path);
                    at.push(Key::Field(k.to_string()));
                    let value = from_dynamic_at(v.clone(), None, &pointer(&at))?;
                    out.push(Edit::Set { path: at, value });
                }
            }
        }
        Value::Array(items)
            if value
                .read_lock::<Array>()
                .is_some_and(|a| a.len() == items.len()) =>
        {
            let array = value.read_lock::<Array>().expect("checked to be an array");
            for (i, (v, old)) in array.iter().zip(items).enumerate() {
                path.push(Step::Index(i));
                walk(v, old, path, out)?;
                path.pop();
            }
        }
        _ if same(value, original) => {}
        _ => {
            let at = owned(path);
            let value = from_dynamic_at(value.clone(), Some(original), &pointer(&at))?;
            out.push(Edit::Set { path: at, value });
        }
    }
    Ok(())
}

fn get<'a>(value: &'a Value, path: &[Key]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| match key {
        Key::Field(k) => v.get(k.as_str()),
        Key::Index(i) => v.get(*i),
    })
}

fn get_mut<'a>(value: &'a mut Value, path: &[Key]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, key| match key {
        Key::Field(k) => v.get_mut(k.as_str()),
        Key::Index(i) => v.get_mut(*i),
    })
}

/// The trace of `edits` made to `original`.
pub(crate) fn changes(
    rule_set: &str,
    object: &str,
    original: &Value,
    edits: &[Edit],
) -> Vec<Change> {
    let mut out = Vec::with_capacity(edits.len());
    for edit in edits {
        let change = |path: &[Key], old: Option<&Value>, new: Option<&Value>| Change {
            rule_set: rule_set.to_string(),
            object: object.to_string(),
            path: pointer(path),
            old: old.cloned(),
            new: new.cloned(),
        };
        match edit {
            Edit::Remove { path } => out.push(change(path, get(original, path), None)),
            Edit::Set { path, value } => match get(original, path) {
                Some(old @ Value::Array(_)) if value.is_array() => {
                    out.extend(trace::diff_at(rule_set, object, old, value, &pointer(path)))
                }
                old => out.push(change(path, old, Some(value))),
            },
        }
    }
    out
}

/// Applies edits made by [`edits`] to the object they were computed from.
pub(crate) fn apply(object: &mut Value, edits: Vec<Edit>) {
    for edit in edits {
        match edit {
            Edit::Set { path, value } => match path.split_last() {
                None => *object = value,
                Some((last, parent)) => match (get_mut(object, parent), last) {
                    (Some(Value::Object(fields)), Key::Field(k)) => {
                        fields.insert(k.clone(), value);
                    }
                    (Some(Value::Array(items)), Key::Index(i)) if *i < items.len() => {
                        items[*i] = value;
                    }
                    _ => unreachable!("edits apply to the object they were computed from"),
                },
            },
            Edit::Remove { path } => {
                if let Some((Key::Field(k), parent)) = path.split_last()
                    && let Some(Value::Object(fields)) = get_mut(object, parent)
                {
                    fields.shift_remove(k.as_str());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::convert::{from_dynamic, to_dynamic};
    use serde_json::json;

    /// Edits `original` as a script would, through Rhai values.
    fn check(original: Value, change: impl FnOnce(&mut Value)) {
        let mut expected = original.clone();
        change(&mut expected);
        let returned = to_dynamic(&expected);
        let found = edits(&returned, &original).unwrap();
        let mut applied = original.clone();
        apply(&mut applied, found.clone());
        let converted = from_dynamic(returned, Some(&original)).unwrap();
        assert_eq!(applied, converted);
        assert_eq!(
            serde_json::to_string(&applied).unwrap(),
            serde_json::to_string(&converted).unwrap(),
            "key order"
        );
        assert_eq!(
            changes("r", "o", &original, &found),
            trace::diff("r", "o", &original, &converted)
        );
    }

    #[test]
    fn edits_reproduce_the_returned_object_and_its_trace() {
        let original = json!({"kind": "X", "metadata": {"name": "a", "labels": {"z": "1", "b": "2"}},
            "spec": {"list": [1, {"k": "v"}, 3], "s": "x", "gone": true, "n": null}});
        check(original.clone(), |_| {});
        check(original.clone(), |v| v["spec"]["s"] = json!("y"));
        check(original.clone(), |v| {
            v["metadata"]["labels"]["a"] = json!("new");
            v["metadata"]["annotations"] = json!({"y": 1, "x": 2});
        });
        check(original.clone(), |v| {
            v["spec"].as_object_mut().unwrap().remove("gone");
        });
        check(original.clone(), |v| v["spec"]["list"][1]["k"] = json!("w"));
        check(original.clone(), |v| v["spec"]["list"] = json!([1]));
        check(original.clone(), |v| {
            v["spec"]["list"] = json!([1, {"k": "v"}, 3, 4])
        });
        check(original.clone(), |v| {
            v["spec"]["n"] = json!({"now": "a map"})
        });
        check(original, |v| v["spec"] = json!("scalar"));
        assert!(
            edits(&to_dynamic(&json!({"a": 1})), &json!({"a": 1}))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn values_json_cannot_hold_are_named_with_their_path() {
        let mut map = to_dynamic(&json!({"a": {"b": 1}})).cast::<Map>();
        let mut inner = Map::new();
        inner.insert("b".into(), Dynamic::from_float(f64::INFINITY));
        map.insert("a".into(), Dynamic::from_map(inner));
        let err = edits(&Dynamic::from_map(map), &json!({"a": {"b": 1}})).unwrap_err();
        assert!(err.contains("/a/b"), "{err}");
    }
}
