//! Golden restore plans, no cluster needed: the shop example and the
//! upgrade-rehearsal example (through its transform plan) are planned
//! against a saved profile of a Kubernetes 1.37 target, as
//! `ferry restore --dry-run --target-profile` would plan them, and the plan
//! (waves, actions and reasons, digests, the transform trace) is compared
//! with `tests/plans/<case>/expected-plan.json`.
//!
//! `FERRY_BLESS=1 cargo test --test restore_plans` rewrites the expected
//! files from the actual plans.

use std::path::{Path, PathBuf};

use ferry::model::ObjectRef;
use ferry::profile::ClusterProfile;
use ferry::restore::plan::{Live, PLAN_FORMAT, PlanHeader, plan_values};
use ferry::restore::{ExistingPolicy, Subset};
use ferry::transform::TransformPlan;
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The documents of an example manifest, `${NS}` set to `namespace`.
fn manifests(path: &Path, namespace: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .replace("${NS}", namespace);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn target() -> ClusterProfile {
    let path = root().join("tests/plans/target-v1.37.json");
    serde_json::from_slice(&std::fs::read(&path).expect("profile")).expect("a cluster profile")
}

fn header(snapshot: &str) -> PlanHeader {
    PlanHeader {
        format: PLAN_FORMAT,
        repository: "golden".into(),
        snapshot: snapshot.into(),
        snapshot_id: format!("{snapshot}-id"),
        target: "(offline: a saved profile of Kubernetes v1.37.2)".into(),
        offline: true,
        subset: Subset::default(),
        existing: ExistingPolicy::Update,
        recreate_cascading: false,
        namespace_mapping: Default::default(),
        transform: None,
    }
}

fn compare(case: &str, plan: &Value) {
    let path = root().join(format!("tests/plans/{case}/expected-plan.json"));
    let actual = serde_json::to_string_pretty(plan).unwrap() + "\n";
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} (FERRY_BLESS=1 writes it): {e}",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "the plan of {case} differs from {} from line {}:\nexpected: {}\nactual:   {}\n(FERRY_BLESS=1 rewrites it)",
            path.display(),
            first + 1,
            expected.lines().nth(first).unwrap_or("(end)"),
            actual.lines().nth(first).unwrap_or("(end)")
        );
    }
}

#[test]
fn the_shop_is_planned_in_dependency_waves() {
    let objects = manifests(&root().join("examples/shop/app.yaml"), "shop");
    let plan = plan_values(
        header("shop"),
        objects,
        |_| Live::Unknown,
        &target(),
        &ClusterProfile::default(),
        Vec::new(),
    )
    .unwrap_or_else(|problems| panic!("refused: {problems:#?}"));
    let first: Vec<String> = plan.waves[0]
        .items
        .iter()
        .map(|i| i.object.to_string())
        .collect();
    assert!(
        first.contains(&"Namespace/shop".to_string())
            && first.contains(&"CustomResourceDefinition/widgets.demo.ferry.dev".to_string()),
        "{first:?}"
    );
    compare("shop", &serde_json::to_value(&plan).unwrap());
}

#[test]
fn the_upgrade_rehearsal_is_transformed_then_planned() {
    let dir = root().join("examples/upgrade-rehearsal");
    let objects = manifests(&dir.join("app.yaml"), "ledger");
    let text = std::fs::read_to_string(dir.join("plan.yaml"))
        .unwrap()
        .replace("${NS}", "ledger");
    let transform =
        TransformPlan::from_yaml(&text, "plan.yaml", Some(&dir)).expect("plan compiles");
    let target = target();
    let output = ferry::transform::run(&transform, objects, &target).expect("transform runs");
    let plan = plan_values(
        header("ledger"),
        output.objects,
        |_| Live::Unknown,
        &target,
        &ClusterProfile::default(),
        output.trace,
    )
    .unwrap_or_else(|problems| panic!("refused: {problems:#?}"));
    // No object is left at an API version the target does not serve.
    for item in plan.items() {
        let api_version = item.object.api_version();
        assert!(
            target.serves_kind(&api_version, &item.object.kind) || item.object.kind == "Widget",
            "{} at {api_version}",
            item.object
        );
    }
    compare("upgrade-rehearsal", &serde_json::to_value(&plan).unwrap());
}

#[test]
fn an_existing_object_is_planned_with_its_differences() {
    let objects = manifests(&root().join("examples/shop/app.yaml"), "shop");
    let settings = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .cloned()
        .expect("the shop has a ConfigMap");
    let name = ObjectRef::from_object(&settings).unwrap();
    let plan = plan_values(
        header("shop"),
        vec![settings],
        |o| {
            assert_eq!(*o, name);
            Live::Present {
                resource_version: "7".into(),
                changes: vec![ferry::restore::diff::Change {
                    path: "data.removed".into(),
                    live: Some(Value::from("x")),
                    desired: Value::Null,
                }],
            }
        },
        &target(),
        &ClusterProfile::default(),
        Vec::new(),
    )
    .expect("planned");
    let item = &plan.waves[0].items[0];
    assert_eq!(item.action, ferry::restore::Action::Update);
    assert_eq!(item.live.as_deref(), Some("7"));
    assert_eq!(item.reason, "1 field(s) differ");
    // The plan survives a round trip through its file form.
    let text = serde_json::to_string(&plan).unwrap();
    let back: ferry::restore::RestorePlan = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
}
