//! Golden tests of transforms, no cluster needed.
//!
//! Every directory `tests/golden/<rule-set>/<case>/` holds:
//! - `input.yaml`: the objects (multi-document YAML);
//! - `plan.yaml`: a TransformPlan (rule set paths relative to the case);
//! - `target.json` (optional): the target's ClusterProfile, else an empty one;
//! - `expected.yaml`: the objects after the run, in order; or
//!   `expected-error.txt`: text the error message must contain;
//! - `expected-warnings.txt` (optional): one line per warning the run must
//!   give, in order, each a substring of the warning's message; an empty
//!   file means no warning at all.
//!
//! `FERRY_BLESS=1 cargo test --test golden` rewrites `expected.yaml` from
//! the actual output (cases expecting an error are left alone).

use std::path::{Path, PathBuf};

use ferry::profile::ClusterProfile;
use ferry::transform::{TransformPlan, run};
use serde::Deserialize;
use serde_json::Value;

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

fn cases() -> Vec<PathBuf> {
    subdirectories(&golden_root())
        .iter()
        .flat_map(|rule_set| subdirectories(rule_set))
        .filter(|case| case.join("input.yaml").is_file())
        .collect()
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Every document of a multi-document YAML file; empty documents are skipped.
fn documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path)?;
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)
            .map_err(|e| format!("{} is not valid YAML: {e}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).expect("JSON values serialize to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn check(case: &Path, bless: bool) -> Result<(), String> {
    let input = documents(&case.join("input.yaml"))?;
    let target_path = case.join("target.json");
    let target: ClusterProfile = if target_path.is_file() {
        serde_json::from_str(&read(&target_path)?)
            .map_err(|e| format!("{} is not a cluster profile: {e}", target_path.display()))?
    } else {
        ClusterProfile::default()
    };
    let plan_text = read(&case.join("plan.yaml"))?;
    let result = TransformPlan::from_yaml(&plan_text, "plan.yaml", Some(case))
        .and_then(|plan| run(&plan, input, &target));

    let error_path = case.join("expected-error.txt");
    if error_path.is_file() {
        let wanted = read(&error_path)?.trim().to_string();
        return match result {
            Err(e) if e.to_string().contains(&wanted) => Ok(()),
            Err(e) => Err(format!(
                "expected an error containing\n  {wanted}\ngot\n  {}",
                e.to_string().replace('\n', "\n  ")
            )),
            Ok(out) => Err(format!(
                "expected an error containing\n  {wanted}\nbut the run succeeded with\n{}",
                to_yaml(&out.objects)
            )),
        };
    }

    let out = result.map_err(|e| format!("the run failed: {e}"))?;
    let expected_path = case.join("expected.yaml");
    if bless {
        return std::fs::write(&expected_path, to_yaml(&out.objects))
            .map_err(|e| format!("cannot write {}: {e}", expected_path.display()));
    }
    if !expected_path.is_file() {
        return Err(
            "has neither expected.yaml nor expected-error.txt (FERRY_BLESS=1 writes expected.yaml)"
                .to_string(),
        );
    }
    let warnings_path = case.join("expected-warnings.txt");
    if warnings_path.is_file() {
        let wanted: Vec<String> = read(&warnings_path)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let got: Vec<&str> = out.warnings.iter().map(|w| w.message.as_str()).collect();
        let matches = wanted.len() == got.len()
            && wanted.iter().zip(&got).all(|(w, g)| g.contains(w.as_str()));
        if !matches {
            return Err(format!(
                "the warnings differ from expected-warnings.txt\n--- expected (substrings)\n{}\n--- actual\n{}",
                wanted.join("\n"),
                got.join("\n")
            ));
        }
    }
    let expected = documents(&expected_path)?;
    if expected != out.objects {
        return Err(format!(
            "the output differs from expected.yaml\n--- expected\n{}--- actual\n{}",
            to_yaml(&expected),
            to_yaml(&out.objects)
        ));
    }
    Ok(())
}

#[test]
fn golden_cases() {
    let cases = cases();
    assert!(
        !cases.is_empty(),
        "no golden cases under {}",
        golden_root().display()
    );
    let bless = std::env::var("FERRY_BLESS").is_ok_and(|v| v == "1");
    let root = golden_root();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            check(case, bless).err().map(|e| {
                let name = case.strip_prefix(&root).unwrap_or(case).display();
                format!("{name}: {e}")
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
