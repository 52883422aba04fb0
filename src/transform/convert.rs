//! Objects between JSON and Rhai: `serde_json::Value` ⇄ `Dynamic`.
//!
//! Integers stay integers, `null` is `()`. Rhai's maps are sorted by key,
//! so an object coming back from a script is given the key order of the
//! object it came from: output stays readable and diffs stay small.

use rhai::{Array, Dynamic, Map};
use serde_json::{Number, Value};

pub(crate) fn to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            // Beyond i64 (or not an integer): Rhai's float, as its serde does.
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => Dynamic::from_array(items.iter().map(to_dynamic).collect()),
        Value::Object(map) => {
            // Inserting one by one is cheaper than collecting, which
            // buffers and sorts the entries first.
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.as_str().into(), to_dynamic(v));
            }
            Dynamic::from_map(out)
        }
    }
}

/// Converts a script's value to JSON; fails on values JSON cannot hold
/// (function pointers, NaN, ...), naming the JSON pointer where. Maps get
/// the key order of `like` (the object the value came from): its keys
/// first, in its order, then new keys, sorted.
pub(crate) fn from_dynamic(value: Dynamic, like: Option<&Value>) -> Result<Value, String> {
    from_dynamic_at(value, like, "")
}

/// [`from_dynamic`] for a value at `path` (a JSON pointer) of an object.
pub(crate) fn from_dynamic_at(
    value: Dynamic,
    like: Option<&Value>,
    path: &str,
) -> Result<Value, String> {
    let mut path = path.to_string();
    convert(value, like, &mut path)
}

fn convert(value: Dynamic, like: Option<&Value>, path: &mut String) -> Result<Value, String> {
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::Number(i.into()));
    }
    if let Ok(f) = value.as_float() {
        return Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("{} is {f}, which JSON cannot represent", shown_path(path)));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if value.is_string() {
        return Ok(Value::String(
            value.into_string().expect("checked to be a string"),
        ));
    }
    if value.is_array() {
        let like = like.and_then(Value::as_array);
        let items = value.cast::<Array>();
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let len = path.len();
            path.push('/');
            path.push_str(&i.to_string());
            out.push(convert(item, like.and_then(|l| l.get(i)), path)?);
            path.truncate(len);
        }
        return Ok(Value::Array(out));
    }
    if value.is_map() {
        let mut map = value.cast::<Map>();
        let mut out = serde_json::Map::with_capacity(map.len());
        let mut entry = |key: &str, v: Dynamic, like: Option<&Value>| -> Result<(), String> {
            let len = path.len();
            path.push('/');
            path.push_str(&super::trace::escape_pointer(key));
            let v = convert(v, like, path)?;
            path.truncate(len);
            out.insert(key.to_string(), v);
            Ok(())
        };
        if let Some(Value::Object(like)) = like {
            for (key, like_v) in like {
                if let Some(v) = map.remove(key.as_str()) {
                    entry(key, v, Some(like_v))?;
                }
            }
        }
        for (key, v) in map {
            entry(&key, v, None)?;
        }
        return Ok(Value::Object(out));
    }
    Err(format!(
        "{} is a {}, which JSON cannot represent",
        shown_path(path),
        value.type_name()
    ))
}

fn shown_path(path: &str) -> String {
    if path.is_empty() {
        "the value".to_string()
    } else {
        format!("the value at {path}")
    }
}

/// Whether a script's value is the JSON value, without converting it:
/// most objects come back from most rule sets unchanged.
pub(crate) fn same(value: &Dynamic, json: &Value) -> bool {
    if value.is_shared() {
        return same(&value.flatten_clone(), json);
    }
    match json {
        Value::Null => value.is_unit(),
        Value::Bool(b) => value.as_bool() == Ok(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => value.as_int() == Ok(i),
            None => n.as_f64().is_some_and(|f| value.as_float() == Ok(f)),
        },
        Value::String(s) => value
            .read_lock::<rhai::ImmutableString>()
            .is_some_and(|v| v.as_str() == s),
        Value::Array(items) => value.read_lock::<Array>().is_some_and(|v| {
            v.len() == items.len() && v.iter().zip(items).all(|(a, b)| same(a, b))
        }),
        Value::Object(map) => value.read_lock::<Map>().is_some_and(|v| {
            v.len() == map.len()
                && map
                    .iter()
                    .all(|(k, j)| v.get(k.as_str()).is_some_and(|d| same(d, j)))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_round_trip_and_integers_stay_integers() {
        let v = json!({"kind": "ConfigMap", "n": 3, "f": 1.5, "b": true, "z": null, "a": [1, "x", {"k": "v"}]});
        let d = to_dynamic(&v);
        assert!(same(&d, &v));
        let back = from_dynamic(d, None).unwrap();
        assert_eq!(back, v);
        assert!(back["n"].is_i64());
    }

    #[test]
    fn key_order_of_the_original_is_kept() {
        let like = json!({"kind": "X", "apiVersion": "v1", "metadata": {"name": "a", "labels": {"z": "1", "b": "2"}}, "list": [{"y": 1, "x": 2}]});
        let mut d = to_dynamic(&like).cast::<Map>();
        d.insert(
            "annotations".into(),
            to_dynamic(&json!({"new": "1", "a": "2"})),
        );
        let v = from_dynamic(Dynamic::from_map(d), Some(&like)).unwrap();
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"X","apiVersion":"v1","metadata":{"name":"a","labels":{"z":"1","b":"2"}},"list":[{"y":1,"x":2}],"annotations":{"a":"2","new":"1"}}"#
        );
    }

    #[test]
    fn changes_are_noticed_without_converting() {
        let v = json!({"a": {"b": [1, 2.5, "x", null, true]}});
        assert!(same(&to_dynamic(&v), &v));
        for other in [
            json!({"a": {"b": [1, 2.5, "x", null, false]}}),
            json!({"a": {"b": [1, 2.5, "x", null]}}),
            json!({"a": {"b": [1.0, 2.5, "x", null, true]}}),
            json!({"a": {"c": [1, 2.5, "x", null, true]}}),
            json!({"a": {"b": [1, 2.5, "x", null, true]}, "d": 1}),
        ] {
            assert!(!same(&to_dynamic(&other), &v), "{other}");
        }
    }

    #[test]
    fn values_json_cannot_hold_are_named() {
        let mut m = Map::new();
        m.insert("x".into(), Dynamic::from_float(f64::NAN));
        let err = from_dynamic(Dynamic::from_map(m), None).unwrap_err();
        assert!(err.contains("/x"), "{err}");
    }
}
