//! Comparing what a restore would write with what the target holds.
//!
//! Server-side apply only touches the fields it sends, so an object is
//! unchanged when every field of the desired object already has that value
//! on the live one; fields the cluster added (defaults, status, metadata) do
//! not count. `changes` lists the differences as `path: live → desired`.

use serde_json::Value;

/// Whether applying `desired` onto `live` would change nothing.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            // An empty desired value matches an absent live one (the API
            // server drops empty maps and lists).
            None => is_empty(dv),
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => desired == live,
    }
}

/// Whether a value is empty as the API server sees it (it drops empty
/// maps and lists).
pub(crate) fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// One difference: where, what the target has, what the restore writes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Value>,
    /// `null` for a field the restore removes.
    pub desired: Value,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Value| {
            let s = v.to_string();
            if s.len() > 80 {
                format!("{}…", &s[..s.floor_char_boundary(77)])
            } else {
                s
            }
        };
        match &self.live {
            Some(live) if self.desired.is_null() => {
                write!(f, "{}: {} → (removed)", self.path, show(live))
            }
            Some(live) => write!(f, "{}: {} → {}", self.path, show(live), show(&self.desired)),
            None => write!(f, "{}: (absent) → {}", self.path, show(&self.desired)),
        }
    }
}

/// The changes applying `desired` onto `live` would make.
pub fn changes(desired: &Value, live: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk("", desired, Some(live), &mut out);
    out
}

fn walk(path: &str, desired: &Value, live: Option<&Value>, out: &mut Vec<Change>) {
    match (desired, live) {
        (Value::Object(d), Some(Value::Object(l))) => {
            for (k, dv) in d {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match l.get(k) {
                    Some(lv) => walk(&p, dv, Some(lv), out),
                    None if is_empty(dv) => {}
                    None => out.push(Change {
                        path: p,
                        live: None,
                        desired: dv.clone(),
                    }),
                }
            }
        }
        (Value::Array(d), Some(Value::Array(l))) if d.len() == l.len() => {
            for (i, (dv, lv)) in d.iter().zip(l).enumerate() {
                walk(&format!("{path}[{i}]"), dv, Some(lv), out);
            }
        }
        (d, Some(l)) if is_subset(d, l) => {}
        (d, l) => out.push(Change {
            path: path.to_string(),
            live: l.cloned(),
            desired: d.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_added_by_the_cluster_do_not_count_as_changes() {
        let desired = json!({"metadata": {"name": "web", "labels": {}}, "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "nginx"}]}}}});
        let live = json!({"metadata": {"name": "web", "uid": "x", "resourceVersion": "9"},
            "spec": {"replicas": 2, "strategy": {"type": "RollingUpdate"}, "template": {"spec": {"containers": [{"name": "web", "image": "nginx", "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"replicas": 0}});
        assert!(is_subset(&desired, &live));
        assert!(changes(&desired, &live).is_empty());
    }

    #[test]
    fn changed_and_missing_fields_are_listed_with_paths() {
        let desired = json!({"spec": {"replicas": 3, "paused": true, "template": {"spec": {"containers": [{"image": "nginx:2"}]}}}});
        let live = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"image": "nginx:1"}]}}}});
        assert!(!is_subset(&desired, &live));
        let list: Vec<String> = changes(&desired, &live)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            list,
            vec![
                "spec.replicas: 2 → 3".to_string(),
                "spec.paused: (absent) → true".to_string(),
                "spec.template.spec.containers[0].image: \"nginx:1\" → \"nginx:2\"".to_string(),
            ]
        );
    }

    #[test]
    fn lists_of_different_length_differ_as_a_whole() {
        let desired = json!({"ports": [{"port": 80}, {"port": 443}]});
        let live = json!({"ports": [{"port": 80}]});
        let c = changes(&desired, &live);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].path, "ports");
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(is_subset(&json!({"a": 1.0}), &json!({"a": 1})));
    }
}
