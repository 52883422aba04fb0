//! YAML output that every reader reads back as the same JSON.
//!
//! Kubernetes tools read YAML with different rules: the API server and
//! kubectl (go-yaml), kustomize and PyYAML follow YAML 1.1, where `no`, `on`,
//! `y`, `0755`, `1:30` and `2024-01-01` are a boolean, numbers and a date;
//! YAML 1.2 readers see some of those as strings. A plain scalar is written
//! only when no reader of either version can take it for anything but a
//! string; every other string is double-quoted. Multi-line strings without
//! special characters are literal blocks, so scripts and configuration files
//! stay readable. Floats always carry a decimal point and a signed exponent,
//! which YAML 1.1 needs to see a float.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// The YAML form of one JSON value, as a block-style document.
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0, false),
        other => {
            out.push_str(&inline_scalar(other));
            out.push('\n');
        }
    }
    out
}

/// Writes `value` as one YAML document (without a `---` separator).
pub fn to_writer<W: std::io::Write>(mut writer: W, value: &Value) -> std::io::Result<()> {
    writer.write_all(to_string(value).as_bytes())
}

/// Words some YAML reader resolves to a boolean, a null, infinity, NaN, a
/// merge key or YAML 1.1's value key; compared case-insensitively.
const RESERVED_WORDS: &[&str] = &[
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "=", "<<", ".inf", "+.inf",
    "-.inf", ".nan",
];

/// Whether a YAML 1.1 or 1.2 reader could resolve the plain scalar `s` to
/// something other than a string: booleans, nulls, integers in any base
/// (with `_` separators, `0o`, `0x`, `0b`, leading-zero octal, sexagesimal
/// `1:30`), floats (`.5`, `1e3`, `.inf`, `.nan`) and dates or timestamps.
pub fn resolves_to_non_string(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let lower = s.to_ascii_lowercase();
    if RESERVED_WORDS.contains(&lower.as_str()) {
        return true;
    }
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let bytes = unsigned.as_bytes();
    let starts_numeric = match bytes {
        [first, ..] if first.is_ascii_digit() => true,
        [b'.', second, ..] => second.is_ascii_digit(),
        _ => false,
    };
    if starts_numeric
        && unsigned
            .chars()
            .all(|c| c.is_ascii_hexdigit() || "xXoObB_.:eE+-".contains(c))
    {
        return true;
    }
    // YYYY-MM-DD, alone or starting a timestamp.
    let b = s.as_bytes();
    b.len() >= 8 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// Characters a plain scalar may contain after its first one.
fn plain_char(c: char) -> bool {
    c.is_alphanumeric() || " -_./:=+@~()$^;<>?%,!&*'".contains(c)
}

/// Whether `s` can be written as a plain scalar and read back as the same string.
pub fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let last = s.chars().next_back().unwrap_or(first);
    (first.is_alphanumeric() || "/._".contains(first))
        && !last.is_whitespace()
        && last != ':'
        && s.chars().all(plain_char)
        && !s.contains(": ")
        && !resolves_to_non_string(s)
}

/// `s` as a double-quoted scalar with every character a reader could
/// mangle escaped.
pub fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn scalar_string(s: &str) -> String {
    if plain_is_safe(s) {
        s.to_string()
    } else {
        double_quoted(s)
    }
}

/// A JSON number in a form YAML 1.1 and 1.2 both read as that number.
fn number(n: &serde_json::Number) -> String {
    let text = n.to_string();
    if !n.is_f64() {
        return text;
    }
    match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let mantissa = if mantissa.contains('.') {
                mantissa.to_string()
            } else {
                format!("{mantissa}.0")
            };
            let exponent = if exponent.starts_with(['+', '-']) {
                exponent.to_string()
            } else {
                format!("+{exponent}")
            };
            format!("{mantissa}e{exponent}")
        }
        None if text.contains('.') => text,
        None => format!("{text}.0"),
    }
}

/// A scalar or empty collection on one line.
fn inline_scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => scalar_string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// Whether `s` is written as a literal block (`|`): several lines, no
/// character that needs escaping, no line break a reader would fold.
fn literal_block(s: &str) -> bool {
    s.contains('\n')
        && s.chars().any(|c| c != '\n')
        && !s.trim_start_matches('\n').starts_with([' ', '\t'])
        && s.lines().all(|l| !l.ends_with([' ', '\t']))
        && s.chars().all(|c| {
            c == '\n'
                || !(c.is_control()
                    || matches!(
                        c,
                        '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                    ))
        })
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Writes a value that follows `key:` or `- ` on the current line, whose
/// parent sits at column `column`.
fn write_after_indicator(out: &mut String, value: &Value, column: usize, in_seq: bool) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if in_seq {
                write_map(out, map, column + 2, true);
            } else {
                out.push('\n');
                write_map(out, map, column + 2, false);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            if in_seq {
                write_seq(out, items, column + 2, true);
            } else {
                out.push('\n');
                write_seq(out, items, column, false);
            }
        }
        Value::String(s) if literal_block(s) => {
            let trailing = s.len() - s.trim_end_matches('\n').len();
            out.push_str(match trailing {
                0 => "|-",
                1 => "|",
                _ => "|+",
            });
            out.push('\n');
            let body = s.strip_suffix('\n').unwrap_or(s);
            for line in body.split('\n') {
                if !line.is_empty() {
                    indent(out, column + 2);
                    out.push_str(line);
                }
                out.push('\n');
            }
        }
        other => {
            out.push_str(&inline_scalar(other));
            out.push('\n');
        }
    }
}

/// A mapping at `column`; with `continued`, the cursor already stands at
/// the column of its first key (after `- `).
fn write_map(out: &mut String, map: &Map<String, Value>, column: usize, continued: bool) {
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 || !continued {
            indent(out, column);
        }
        out.push_str(&scalar_string(key));
        out.push(':');
        let inline = match value {
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => true,
        };
        if inline {
            out.push(' ');
        }
        write_after_indicator(out, value, column, false);
    }
}

/// A sequence whose dashes sit at `column`; with `continued`, the cursor
/// already stands there.
fn write_seq(out: &mut String, items: &[Value], column: usize, continued: bool) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 || !continued {
            indent(out, column);
        }
        out.push_str("- ");
        write_after_indicator(out, item, column, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Strings YAML 1.1 (kubectl, kustomize, PyYAML, the API server) or 1.2
    /// readers resolve to another type when written plain.
    const AMBIGUOUS: &[&str] = &[
        "no",
        "No",
        "NO",
        "nO",
        "yes",
        "Yes",
        "y",
        "Y",
        "n",
        "N",
        "on",
        "On",
        "OFF",
        "off",
        "true",
        "True",
        "FALSE",
        "null",
        "Null",
        "NULL",
        "~",
        "",
        "0",
        "-1",
        "+1",
        "0755",
        "0o17",
        "0x1F",
        "0b101",
        "1_000",
        "1.5",
        ".5",
        "-.5",
        "1e3",
        "1E-3",
        "6.02e+23",
        "1:30",
        "190:20:30",
        "-1:30",
        ".inf",
        "-.Inf",
        "+.INF",
        ".NaN",
        "2024-01-01",
        "2001-12-14t21:59:43.10-05:00",
        "2001-12-14 21:59:43.10 -5",
        "=",
        "<<",
    ];

    #[test]
    fn strings_any_reader_could_take_for_another_type_are_quoted() {
        for s in AMBIGUOUS {
            let yaml = to_string(&json!({ "k": s }));
            assert_eq!(yaml, format!("k: {}\n", double_quoted(s)), "{s:?}");
            let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(back, json!({ "k": s }), "{s:?}");
        }
    }

    #[test]
    fn ordinary_strings_stay_plain() {
        for s in [
            "nginx:1.27",
            "--appendonly",
            "http://web.shop.svc:8080/path?q=1",
            "app.kubernetes.io/name",
            "hello world",
            "/dev/termination-log",
            "noisy",
            "yes-please",
            "v1.2.3",
            "éclair",
        ] {
            let expected_plain = !s.starts_with('-');
            let yaml = to_string(&json!({ "k": s }));
            assert_eq!(yaml == format!("k: {s}\n"), expected_plain, "{s:?}: {yaml}");
            let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(back, json!({ "k": s }));
        }
    }

    #[test]
    fn special_characters_are_escaped_in_double_quotes() {
        for s in [
            "a: b",
            "# comment",
            "trailing ",
            " leading",
            "tab\there",
            "quote \" and \\ backslash",
            "bell \u{7}",
            "next line \u{85}",
            "separator \u{2028}",
            "bom \u{feff}",
            "- item",
            "key:",
            "&anchor",
            "*alias",
            "!tag",
            "{flow}",
            "[flow]",
            "'single'",
            "%directive",
            "@reserved",
            "`reserved",
            "|literal",
            ">folded",
            "?complex",
        ] {
            let yaml = to_string(&json!({ "k": s }));
            assert!(yaml.starts_with("k: \""), "{s:?}: {yaml}");
            let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(back, json!({ "k": s }), "{yaml}");
        }
    }

    #[test]
    fn multi_line_strings_become_literal_blocks_with_the_right_chomping() {
        let value = json!({"data": {
            "script": "#!/bin/sh\necho no\n",
            "bare": "a\nb",
            "kept": "a\n\n\n",
            "gap": "\nfirst line empty\n\nlast\n",
            "spaces": "  indented first\nsecond\n",
            "late": "\n  indented after an empty line\n",
        }});
        let yaml = to_string(&value);
        assert!(
            yaml.contains("  script: |\n    #!/bin/sh\n    echo no\n"),
            "{yaml}"
        );
        assert!(yaml.contains("  bare: |-\n    a\n    b\n"), "{yaml}");
        assert!(yaml.contains("  kept: |+\n    a\n\n\n"), "{yaml}");
        assert!(yaml.contains("  spaces: \"  indented"), "{yaml}");
        assert!(yaml.contains("  late: \"\\n  indented"), "{yaml}");
        let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn nesting_numbers_and_empty_collections_round_trip() {
        let value = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "redis", "labels": {"on": "off", "1": "2"}, "annotations": {}},
            "spec": {
                "replicas": 1,
                "ratio": 0.25,
                "big": 1e20,
                "small": -1.5e-7,
                "whole": 3.0,
                "template": {"spec": {"containers": [{
                    "name": "redis",
                    "args": ["--appendonly", "no", "--save", ""],
                    "ports": [{"containerPort": 6379}],
                    "env": [],
                    "nested": [["a", {"b": null}], []],
                }]}},
            },
        });
        let yaml = to_string(&value);
        assert!(yaml.contains("  - \"no\"\n"), "{yaml}");
        assert!(yaml.contains("big: 1.0e+20\n"), "{yaml}");
        assert!(yaml.contains("small: -1.5e-7\n"), "{yaml}");
        assert!(yaml.contains("\"on\": \"off\"\n"), "{yaml}");
        let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, value, "{yaml}");
        assert_eq!(to_string(&json!([])), "[]\n");
        assert_eq!(to_string(&json!("no")), "\"no\"\n");
    }
}
