//! The trace: every change a step made, as rule set, object, JSON pointer,
//! old value and new value. Changes are found by comparing each object
//! before and after a step, so rule sets need not report anything.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One change made by one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// The rule set, script or patch (by name) that made the change.
    pub rule_set: String,
    /// `Kind/namespace/name` of the object as it was before the step (of
    /// the new object, for objects the step added).
    pub object: String,
    /// JSON pointer of the changed value; `""` for a whole object added or dropped.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// Values longer than this are shortened in the one-line form.
const SHOWN_VALUE_LEN: usize = 80;

fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= SHOWN_VALUE_LEN {
        text
    } else {
        let short: String = text.chars().take(SHOWN_VALUE_LEN - 1).collect();
        format!("{short}…")
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: ", self.rule_set, self.object)?;
        match (&self.old, &self.new, self.path.is_empty()) {
            (None, Some(_), true) => write!(f, "added"),
            (Some(_), None, true) => write!(f, "dropped"),
            (Some(old), Some(new), _) => {
                write!(f, "{} {} -> {}", self.path, shown(old), shown(new))
            }
            (None, Some(new), false) => write!(f, "{} added {}", self.path, shown(new)),
            (Some(old), None, false) => write!(f, "{} removed {}", self.path, shown(old)),
            (None, None, _) => write!(f, "{} unchanged", self.path),
        }
    }
}

/// Escapes a key for a JSON pointer (RFC 6901).
pub(crate) fn escape_pointer(key: &str) -> std::borrow::Cow<'_, str> {
    if key.contains(['~', '/']) {
        key.replace('~', "~0").replace('/', "~1").into()
    } else {
        key.into()
    }
}

/// The changes that turn `old` into `new`. Paths of removed values point
/// into `old`, paths of added values into `new`; array elements are
/// compared by position.
pub(crate) fn diff(rule_set: &str, object: &str, old: &Value, new: &Value) -> Vec<Change> {
    diff_at(rule_set, object, old, new, "")
}

/// [`diff`] of values at `path` (a JSON pointer) of an object.
pub(crate) fn diff_at(
    rule_set: &str,
    object: &str,
    old: &Value,
    new: &Value,
    path: &str,
) -> Vec<Change> {
    let mut out = Vec::new();
    let mut path = path.to_string();
    walk(old, new, &mut path, &mut |path, old, new| {
        out.push(Change {
            rule_set: rule_set.to_string(),
            object: object.to_string(),
            path: path.to_string(),
            old: old.cloned(),
            new: new.cloned(),
        })
    });
    out
}

fn walk(
    old: &Value,
    new: &Value,
    path: &mut String,
    emit: &mut impl FnMut(&str, Option<&Value>, Option<&Value>),
) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, old_v) in a {
                let len = path.len();
                path.push('/');
                path.push_str(&escape_pointer(k));
                match b.get(k) {
                    Some(new_v) => walk(old_v, new_v, path, emit),
                    None => emit(path, Some(old_v), None),
                }
                path.truncate(len);
            }
            for (k, new_v) in b {
                if !a.contains_key(k) {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&escape_pointer(k));
                    emit(path, None, Some(new_v));
                    path.truncate(len);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => walk(x, y, path, emit),
                    (Some(x), None) => emit(path, Some(x), None),
                    (None, Some(y)) => emit(path, None, Some(y)),
                    (None, None) => {}
                }
                path.truncate(len);
            }
        }
        (a, b) if a != b => emit(path, Some(a), Some(b)),
        _ => {}
    }
}

/// A whole object added by a step.
pub(crate) fn added(rule_set: &str, object: &str, value: &Value) -> Change {
    Change {
        rule_set: rule_set.to_string(),
        object: object.to_string(),
        path: String::new(),
        old: None,
        new: Some(value.clone()),
    }
}

/// A whole object dropped by a step.
pub(crate) fn dropped(rule_set: &str, object: &str, value: &Value) -> Change {
    Change {
        rule_set: rule_set.to_string(),
        object: object.to_string(),
        path: String::new(),
        old: Some(value.clone()),
        new: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn replaced_added_and_removed_values_have_pointers_and_values() {
        let old =
            json!({"spec": {"storageClassName": "gp2", "a/b": 1, "gone": true, "list": [1, 2, 3]}});
        let new = json!({"spec": {"storageClassName": "standard-rwo", "a/b": 2, "list": [1, 5], "extra": {"x": "y"}}});
        let changes = diff(
            "storage-class",
            "PersistentVolumeClaim/shop/data",
            &old,
            &new,
        );
        assert_eq!(
            lines(&changes),
            vec![
                r#"storage-class: PersistentVolumeClaim/shop/data: /spec/storageClassName "gp2" -> "standard-rwo""#,
                "storage-class: PersistentVolumeClaim/shop/data: /spec/a~1b 1 -> 2",
                "storage-class: PersistentVolumeClaim/shop/data: /spec/gone removed true",
                "storage-class: PersistentVolumeClaim/shop/data: /spec/list/1 2 -> 5",
                "storage-class: PersistentVolumeClaim/shop/data: /spec/list/2 removed 3",
                r#"storage-class: PersistentVolumeClaim/shop/data: /spec/extra added {"x":"y"}"#,
            ]
        );
        assert_eq!(changes[0].old, Some(json!("gp2")));
        assert_eq!(changes[0].new, Some(json!("standard-rwo")));
        assert!(diff("r", "o", &old, &old).is_empty());
    }

    #[test]
    fn whole_objects_and_long_values_display_briefly() {
        let v = json!({"data": "x".repeat(200)});
        assert_eq!(
            added("r", "ConfigMap/a/b", &v).to_string(),
            "r: ConfigMap/a/b: added"
        );
        assert_eq!(
            dropped("r", "ConfigMap/a/b", &v).to_string(),
            "r: ConfigMap/a/b: dropped"
        );
        let c = &diff("r", "o", &v, &json!({"data": "y"}))[0];
        assert!(c.to_string().contains("…\" -> \"y\"") || c.to_string().contains('…'));
        let json = serde_json::to_value(added("r", "o", &v)).unwrap();
        assert_eq!(json["ruleSet"], "r");
        assert!(json.get("old").is_none());
    }
}
