//! Every object Ferry writes as YAML reads back, with a YAML 1.1 reader
//! (PyYAML, which resolves types like kubectl, kustomize and the API
//! server), as the identical JSON. The objects are every manifest of the
//! golden cases and examples, plus strings chosen to look like other types.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

fn manifests(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            manifests(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn objects() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    manifests(&root.join("tests/golden"), &mut files);
    manifests(&root.join("examples"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        // Examples are templates for a namespace.
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("${NS}", "demo");
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                out.push(value);
            }
        }
    }
    let words = [
        "no",
        "No",
        "NO",
        "yes",
        "y",
        "n",
        "on",
        "Off",
        "true",
        "False",
        "null",
        "~",
        "",
        "0755",
        "0o17",
        "0x1f",
        "0b11",
        "1_000",
        "1:30",
        "-1:30:00",
        "1.5",
        ".5",
        "1e3",
        "-.inf",
        ".NaN",
        "2024-01-01",
        "2024-01-01T10:00:00Z",
        "=",
        "<<",
        "- x",
        "key: value",
        "# no",
        "a #b",
        "trailing ",
        " leading",
        "tab\t",
        "quote\"",
        "back\\slash",
        "bell\u{7}",
        "nel\u{85}",
        "line\u{2028}sep",
        "\u{feff}bom",
        "multi\nline\n",
        "multi\nline",
        "kept\n\n",
        "\nleading newline",
        "\n  indented\n",
        "trailing spaces \nline",
        "é",
        "日本",
        "🚀",
    ];
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "words", "labels": {"on": "yes", "y": "n"}},
        "data": words.iter().enumerate().map(|(i, w)| (format!("k{i}"), json!(w))).collect::<serde_json::Map<_, _>>(),
        "list": words.to_vec(),
        "keys": words.iter().map(|w| (w.to_string(), json!(w))).collect::<serde_json::Map<_, _>>(),
        "numbers": [0, -1, 1.5, 1e20, -2.5e-8, 3.0, 12345678901234i64],
        "nested": [[[]], [{}], [["a"], {"b": [null, true, false]}]],
    }));
    out
}

#[test]
fn every_object_written_as_yaml_reads_back_identically_in_yaml_1_1() {
    let objects = objects();
    assert!(objects.len() > 100, "{} objects", objects.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    let mut text = String::new();
    for object in &objects {
        text.push_str("---\n");
        text.push_str(&ferry::yaml::to_string(object));
    }
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             with open(sys.argv[1]) as f:\n\
             \x20   print(json.dumps(list(yaml.safe_load_all(f))))\n",
        )
        .arg(&path)
        .output()
        .expect("python3 with PyYAML is the YAML 1.1 reader of this test");
    assert!(
        out.status.success(),
        "PyYAML could not read what Ferry wrote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read.len(), objects.len());
    for (written, read) in objects.iter().zip(&read) {
        assert_eq!(
            read,
            written,
            "read back differently:\n{}",
            ferry::yaml::to_string(written)
        );
    }
}
