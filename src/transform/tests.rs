//! Tests of plans and runs as a whole: parsing, dispatch, the functions
//! rule sets call, traces, errors and the sandbox.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::profile::{ClusterProfile, StorageClassInfo};

fn plan(steps: &str) -> TransformPlan {
    TransformPlan::from_yaml(&with_header(steps, "fail"), "plan.yaml", None)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn plan_on_error(steps: &str, on_error: &str) -> TransformPlan {
    TransformPlan::from_yaml(&with_header(steps, on_error), "plan.yaml", None)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn with_header(steps: &str, on_error: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: test}}\nspec:\n  onError: {on_error}\n  steps:\n{steps}"
    )
}

/// An inline script step; `script` is indented under `script: |`.
fn script(name: &str, script: &str) -> String {
    let body: String = script
        .trim_matches('\n')
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    format!("  - name: {name}\n    script: |\n{body}")
}

fn diagnostics(yaml: &str) -> Vec<Diagnostic> {
    match TransformPlan::from_yaml(yaml, "plan.yaml", None) {
        Err(TransformError::Plan(d)) => d,
        other => panic!("expected plan diagnostics, got {other:?}"),
    }
}

fn object(api_version: &str, kind: &str, ns: &str, name: &str) -> Value {
    let mut v = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}});
    if !ns.is_empty() {
        v["metadata"]["namespace"] = json!(ns);
    }
    v
}

fn config_map(ns: &str, name: &str) -> Value {
    let mut v = object("v1", "ConfigMap", ns, name);
    v["data"] = json!({"env": "prod"});
    v
}

fn deployment(ns: &str, name: &str, config: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "docker.io/library/nginx:1.27"}],
                 "volumes": [{"name": "cfg", "configMap": {"name": config}}]}}}})
}

fn run_empty(plan: &TransformPlan, objects: Vec<Value>) -> Result<TransformOutput, TransformError> {
    run(plan, objects, &ClusterProfile::default())
}

fn ids(objects: &[Value]) -> Vec<String> {
    objects.iter().map(run::object_id).collect()
}

fn lines<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

fn rule_error(result: Result<TransformOutput, TransformError>) -> String {
    match result {
        Err(e @ TransformError::Rule { .. }) => e.to_string(),
        other => panic!("expected a rule error, got {other:?}"),
    }
}

// --- plans -----------------------------------------------------------------

#[test]
fn a_plan_with_every_kind_of_step_compiles() {
    let p = plan(
        r#"
  - ruleSet: storage-class
    params:
      map: {gp2: standard-rwo}
  - name: my-inline-rule
    script: |
      fn kinds() { ["ConfigMap"] }
      fn transform(obj, params, target) { obj.data.env = "test"; obj }
  - script: |
      fn transform(obj, params, target) { obj }
  - name: bump-replicas
    select:
      kinds: [Deployment]
      namespaces: [shop, "team-*"]
      names: [web]
      labels: "tier=frontend"
      jsonPath: "$.spec[?(@.replicas > 1)]"
    patch:
    - {op: replace, path: /spec/replicas, value: 1}
"#,
    );
    assert_eq!(
        p.rule_set_names(),
        vec![
            "storage-class",
            "my-inline-rule",
            "steps[2]",
            "bump-replicas"
        ]
    );
    assert_eq!(p.name(), Some("test"));
}

#[test]
fn every_problem_of_a_plan_is_reported_at_once() {
    let d = diagnostics(
        r#"apiVersion: ferry.dev/v1
kind: TransformPlan
spec:
  onError: maybe
  steps:
  - ruleSet: no-such-rules
  - ruleSet: registy
  - ruleSet: storage-class
    script: "fn transform(obj, params, target) { obj }"
  - name: broken
    script: |
      fn transform(obj, params, target) {
        let x = ;
      }
  - name: no-transform
    script: "fn kinds() { [\"ConfigMap\"] }"
  - name: bad-kinds
    script: |
      fn kinds() { ["apps/v1/Deployment", 3] }
      fn transform(obj, params, target) { obj }
  - name: bad-patch
    select: {labels: "a in"}
    patch:
    - {op: replce, path: /a}
  - scirpt: "typo"
"#,
    );
    let text = lines(&d).join("\n");
    let expect = [
        "plan.yaml: apiVersion is \"ferry.dev/v1\"; expected ferry.dev/v1alpha1",
        "plan.yaml: spec.onError is \"maybe\"; expected fail or skip",
        "plan.yaml#steps[0]: unknown built-in rule set 'no-such-rules'; the built-ins are storage-class, registry,",
        "plan.yaml#steps[1]: unknown built-in rule set 'registy'; did you mean registry?",
        "plan.yaml#steps[2]: a step has exactly one of ruleSet, script or patch; this one has ruleSet and script",
        "plan.yaml#steps[3]:2:11: ",
        "plan.yaml#steps[4]: a rule set defines fn transform(obj, params, target)",
        "plan.yaml#steps[5]: kinds(): 'apps/v1/Deployment' is not a kind",
        "plan.yaml#steps[5]: kinds(): 3 is not a string",
        "plan.yaml#steps[6]: select.labels: invalid label selector",
        "plan.yaml#steps[6]: patch[0]: not an RFC 6902 operation",
        "plan.yaml#steps[7]: unknown field `scirpt`",
    ];
    for e in expect {
        assert!(text.contains(e), "missing {e:?} in\n{text}");
    }
    assert_eq!(d.len(), expect.len(), "{text}");
    let whole = TransformPlan::from_yaml("kind: TransformPlan\n", "p.yaml", None)
        .unwrap_err()
        .to_string();
    assert!(
        whole.starts_with(
            "the transform plan is not valid (2 problems):\n  p.yaml: apiVersion is missing"
        ),
        "{whole}"
    );
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let d = diagnostics("apiVersion: [\n");
    assert_eq!(d.len(), 1);
    assert!(d[0].location.starts_with("plan.yaml:"), "{}", d[0]);
    assert!(d[0].message.starts_with("not valid YAML"), "{}", d[0]);
}

#[test]
fn rule_set_files_are_read_relative_to_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/mine.rhai"),
        "// Adds a label.\nfn transform(obj, params, target) {\n  obj.metadata.labels = #{team: params.team};\n  obj\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("rules/broken.rhai"),
        "fn transform(obj, params, target) {\n  obj.x = ;\n}\n",
    )
    .unwrap();
    let plan_path = dir.path().join("plan.yaml");
    std::fs::write(
        &plan_path,
        with_header(
            "  - ruleSet: rules/mine.rhai\n    params: {team: red}\n",
            "fail",
        ),
    )
    .unwrap();
    let p = TransformPlan::load(&plan_path).unwrap();
    let out = run_empty(&p, vec![config_map("a", "b")]).unwrap();
    assert_eq!(out.objects[0]["metadata"]["labels"]["team"], "red");
    assert_eq!(out.trace[0].rule_set, "rules/mine.rhai");

    std::fs::write(
        &plan_path,
        with_header(
            "  - ruleSet: rules/broken.rhai\n  - ruleSet: rules/missing.rhai\n",
            "fail",
        ),
    )
    .unwrap();
    let text = TransformPlan::load(&plan_path).unwrap_err().to_string();
    let broken = dir.path().join("rules/broken.rhai").display().to_string();
    assert!(text.contains(&format!("{broken}:2:")), "{text}");
    assert!(text.contains("cannot read rule set"), "{text}");
    assert!(matches!(
        TransformPlan::load(&dir.path().join("none.yaml")),
        Err(TransformError::Read { .. })
    ));
}

#[test]
fn every_builtin_compiles_documents_itself_and_declares_valid_kinds() {
    assert_eq!(
        builtin_rule_sets()
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>(),
        vec![
            "storage-class",
            "registry",
            "namespace",
            "zones",
            "api-versions",
            "clone-for-test"
        ]
    );
    for (name, source) in builtin_rule_sets() {
        assert!(
            source.trim_start().starts_with("//"),
            "{name} starts with its documentation"
        );
        plan::on_script_stack(|| plan::compile_script(source, name))
            .unwrap_or_else(|d| panic!("{name}: {}", lines(&d).join("\n")));
    }
    let names: Vec<String> = builtin_rule_sets()
        .iter()
        .map(|(n, _)| format!("  - ruleSet: {n}\n"))
        .collect();
    let p = plan(&names.concat());
    let out = run_empty(&p, vec![config_map("a", "b"), deployment("a", "web", "b")]).unwrap();
    assert_eq!(out.skipped, vec![]);
}

// --- dispatch and return values --------------------------------------------

#[test]
fn a_rule_set_only_sees_the_kinds_it_declares() {
    let p = plan(&script(
        "configmaps-only",
        r#"
fn kinds() { ["ConfigMap", "apps/Deployment"] }
fn transform(obj, params, target) {
    if obj.kind == "Secret" || obj.apiVersion == "extensions/v1beta1" { fail("saw " + object_id(obj)); }
    if obj.kind == "ConfigMap" { obj.data.seen = "yes"; }
    obj
}
"#,
    ));
    let secret = object("v1", "Secret", "a", "s");
    let old_deployment = object("extensions/v1beta1", "Deployment", "a", "old");
    let out = run_empty(
        &p,
        vec![secret.clone(), config_map("a", "c"), old_deployment.clone()],
    )
    .unwrap();
    assert_eq!(out.objects[0], secret);
    assert_eq!(out.objects[1]["data"]["seen"], "yes");
    assert_eq!(out.objects[2], old_deployment);
}

#[test]
fn returning_unit_drops_and_an_array_adds_after_the_object() {
    let p = plan(&script(
        "reshape",
        r#"
fn transform(obj, params, target) {
    if obj.kind == "Secret" { return (); }
    if obj.kind == "ConfigMap" {
        let copy = obj;
        copy.metadata.name = obj.metadata.name + "-copy";
        return [copy, obj];
    }
    obj
}
"#,
    ));
    let out = run_empty(
        &p,
        vec![
            object("v1", "Secret", "a", "s"),
            config_map("a", "c"),
            object("v1", "Service", "a", "svc"),
        ],
    )
    .unwrap();
    assert_eq!(
        ids(&out.objects),
        vec!["ConfigMap/a/c", "ConfigMap/a/c-copy", "Service/a/svc"]
    );
    assert_eq!(
        lines(&out.trace),
        vec![
            "reshape: Secret/a/s: dropped",
            "reshape: ConfigMap/a/c-copy: added"
        ]
    );
    assert_eq!(out.trace[0].old, Some(object("v1", "Secret", "a", "s")));
    assert_eq!(out.trace[0].path, "");
    assert_eq!(out.trace[1].new.as_ref(), Some(&out.objects[1]));
}

#[test]
fn a_renamed_object_in_an_array_is_a_drop_and_adds() {
    let p = plan(&script(
        "split",
        r#"
fn transform(obj, params, target) {
    let a = obj; a.metadata.name = "a";
    let b = obj; b.metadata.name = "b";
    [a, b]
}
"#,
    ));
    let out = run_empty(&p, vec![config_map("ns", "c")]).unwrap();
    assert_eq!(ids(&out.objects), vec!["ConfigMap/ns/a", "ConfigMap/ns/b"]);
    assert_eq!(
        lines(&out.trace),
        vec![
            "split: ConfigMap/ns/c: dropped",
            "split: ConfigMap/ns/a: added",
            "split: ConfigMap/ns/b: added"
        ]
    );
}

#[test]
fn added_duplicates_are_warned_about() {
    let p = plan(&script(
        "twice",
        "fn transform(obj, params, target) { [obj, obj] }",
    ));
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    assert_eq!(out.objects.len(), 2);
    assert_eq!(out.warnings.len(), 1);
    assert!(
        out.warnings[0]
            .message
            .contains("only one of them can exist"),
        "{}",
        out.warnings[0]
    );
}

#[test]
fn returned_values_must_be_objects_with_an_identity() {
    let p = plan(&script(
        "bad-return",
        r#"fn transform(obj, params, target) { if obj.kind == "Secret" { "oops" } else { obj.metadata.name = (); obj } }"#,
    ));
    let text = rule_error(run_empty(&p, vec![object("v1", "Secret", "a", "s")]));
    assert!(
        text.starts_with("rule set bad-return failed on Secret/a/s at plan.yaml#steps[0]: transform returned oops (string)"),
        "{text}"
    );
    let text = rule_error(run_empty(&p, vec![config_map("a", "c")]));
    assert!(text.contains("failed on ConfigMap/a/c"), "{text}");
    assert!(
        text.contains("the returned object is not a valid object: object has no metadata.name"),
        "{text}"
    );
    let p = plan(&script(
        "bad-array",
        "fn transform(obj, params, target) { [obj, 1] }",
    ));
    let text = rule_error(run_empty(&p, vec![config_map("a", "c")]));
    assert!(
        text.contains("element 1 of the returned array is 1 (i64), not an object map"),
        "{text}"
    );
}

#[test]
fn input_objects_must_have_an_identity() {
    let p = plan(&script("any", "fn transform(obj, params, target) { obj }"));
    let err = run_empty(&p, vec![config_map("a", "b"), json!({"kind": "ConfigMap"})]).unwrap_err();
    assert!(
        matches!(err, TransformError::InvalidObject { index: 1, .. }),
        "{err}"
    );
}

#[test]
fn steps_see_the_output_of_the_previous_step_and_keep_key_order() {
    let p = plan(&format!(
        "{}{}",
        script(
            "first",
            "fn transform(obj, params, target) { obj.metadata.name = \"renamed\"; obj }"
        ),
        script(
            "second",
            r#"fn transform(obj, params, target) {
    if graph_get("ConfigMap", "a", "renamed") == () { fail("not renamed"); }
    obj.zzz = 1;
    obj
}"#
        )
    ));
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    let keys: Vec<&String> = out.objects[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["apiVersion", "kind", "metadata", "data", "zzz"]);
    assert_eq!(
        lines(&out.trace),
        vec![
            r#"first: ConfigMap/a/c: /metadata/name "c" -> "renamed""#,
            "second: ConfigMap/a/renamed: /zzz added 1"
        ]
    );
}

#[test]
fn params_reach_the_script() {
    let p = plan(
        r#"
  - name: with-params
    params: {suffix: "-test", n: 2, nested: {list: [1, 2]}}
    script: |
      fn transform(obj, params, target) {
        obj.metadata.name += params.suffix;
        obj.data.n = params.n * params.nested.list.len();
        obj.data.missing = params.missing ?? "default";
        obj
      }
"#,
    );
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    assert_eq!(out.objects[0]["metadata"]["name"], "c-test");
    assert_eq!(out.objects[0]["data"]["n"], 4);
    assert_eq!(out.objects[0]["data"]["missing"], "default");
}

#[test]
fn prepare_runs_once_and_its_value_reaches_transform() {
    let p = plan(
        r#"
  - name: prepared
    params: {suffix: "-test"}
    script: |
      fn prepare(params) {
        let prepared = params;
        prepared.upper = params.suffix.to_upper();
        prepared
      }
      fn kinds(params) { if params.upper == () { ["ConfigMap"] } else { [] } }
      fn transform(obj, params, target) {
        obj.metadata.name += params.upper;
        obj
      }
"#,
    );
    let out = run_empty(&p, vec![config_map("a", "c"), config_map("a", "d")]).unwrap();
    assert_eq!(
        ids(&out.objects),
        ["ConfigMap/a/c-TEST", "ConfigMap/a/d-TEST"]
    );
}

#[test]
fn a_failing_prepare_leaves_transform_the_plan_parameters() {
    let p = plan_on_error(
        r#"
  - name: checked
    params: {suffix: 7}
    script: |
      fn prepare(params) {
        if type_of(params.suffix) != "string" { fail("params.suffix must be a string"); }
        params
      }
      fn transform(obj, params, target) {
        if type_of(params.suffix) != "string" { fail("params.suffix must be a string"); }
        obj
      }
"#,
        "skip",
    );
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    assert_eq!(
        out.skipped.len(),
        1,
        "the object reports the problem: {:?}",
        out.skipped
    );
    assert!(
        out.skipped[0]
            .error
            .contains("params.suffix must be a string"),
        "{:?}",
        out.skipped
    );
}

// --- patches ---------------------------------------------------------------

#[test]
fn patch_steps_change_selected_objects_only() {
    let p = plan(
        r#"
  - name: one-replica
    select: {kinds: [apps/Deployment], namespaces: ["team-*"], jsonPath: "$.spec[?(@.replicas > 1)]"}
    patch:
    - {op: replace, path: /spec/replicas, value: 1}
    - {op: add, path: /metadata/labels, value: {scaled: "true"}}
"#,
    );
    let out = run_empty(
        &p,
        vec![
            deployment("team-a", "web", "cfg"),
            deployment("other", "web", "cfg"),
            config_map("team-a", "cfg"),
        ],
    )
    .unwrap();
    assert_eq!(out.objects[0]["spec"]["replicas"], 1);
    assert_eq!(out.objects[1]["spec"]["replicas"], 3);
    assert_eq!(
        lines(&out.trace),
        vec![
            // In document order, not in the order of the operations.
            r#"one-replica: Deployment/team-a/web: /metadata/labels added {"scaled":"true"}"#,
            "one-replica: Deployment/team-a/web: /spec/replicas 3 -> 1",
        ]
    );
}

#[test]
fn a_failing_patch_names_the_operation_and_the_step() {
    let p = plan(
        r#"
  - name: needs-labels
    patch:
    - {op: replace, path: /metadata/labels/app, value: x}
"#,
    );
    let text = rule_error(run_empty(&p, vec![config_map("a", "c")]));
    assert!(
        text.starts_with(
            "rule set needs-labels failed on ConfigMap/a/c at plan.yaml#steps[0]: patch[0]"
        ),
        "{text}"
    );
}

// --- functions rule sets call ----------------------------------------------

#[test]
fn graph_functions_see_the_objects_of_the_step() {
    let p = plan(&script(
        "graph",
        r#"
fn kinds() { ["Deployment", "ConfigMap"] }
fn transform(obj, params, target) {
    if obj.kind == "Deployment" {
        let cfg = graph_get("ConfigMap", obj.metadata.namespace, "cfg");
        obj.metadata.annotations = #{
            "env": cfg.data.env,
            "configmaps": graph_find("ConfigMap").len().to_string(),
            "apps-configmaps": graph_find("apps/ConfigMap").len().to_string(),
            "missing": type_of(graph_get("ConfigMap", "a", "none")),
            "namespace": graph_get("Namespace", (), "a").metadata.name,
        };
    } else {
        let who = referrers(obj);
        obj.data.referrers = who.map(|r| r.kind + "/" + r.namespace + "/" + r.name + " " + r.edge);
    }
    obj
}
"#,
    ));
    let out = run_empty(
        &p,
        vec![
            object("v1", "Namespace", "", "a"),
            config_map("a", "cfg"),
            config_map("a", "other"),
            deployment("a", "web", "cfg"),
        ],
    )
    .unwrap();
    assert_eq!(
        out.objects[3]["metadata"]["annotations"],
        json!({"env": "prod", "configmaps": "2", "apps-configmaps": "0", "missing": "()", "namespace": "a"})
    );
    assert_eq!(
        out.objects[1]["data"]["referrers"],
        json!(["Deployment/a/web mounts"])
    );
    assert_eq!(out.objects[2]["data"]["referrers"], json!([]));
}

fn profile() -> ClusterProfile {
    ClusterProfile {
        version: "v1.37.2".into(),
        major: 1,
        minor: 37,
        distribution: "gke".into(),
        served_group_versions: BTreeSet::from(["v1".to_string(), "apps/v1".to_string()]),
        served_kinds: BTreeSet::from([
            "v1/ConfigMap".to_string(),
            "apps/v1/Deployment".to_string(),
        ]),
        storage_classes: vec![StorageClassInfo {
            name: "standard-rwo".into(),
            provisioner: "pd.csi.storage.gke.io".into(),
            default: true,
            ..Default::default()
        }],
        zones: BTreeSet::from(["europe-west1-b".to_string()]),
        ..Default::default()
    }
}

#[test]
fn serves_answers_from_the_profile_and_yes_when_it_is_unknown() {
    let p = plan(&script(
        "serves",
        r#"
fn transform(obj, params, target) {
    obj.data = #{
        "batch": serves("batch/v1beta1"),
        "apps": serves("apps/v1"),
        "cm": serves_kind("v1", "ConfigMap"),
        "secret": serves_kind("v1", "Secret"),
        "minor": target.minor,
        "classes": target.storageClasses.map(|c| c.name),
        "zones": target.zones,
    };
    obj
}
"#,
    ));
    let known = run(&p, vec![config_map("a", "c")], &profile()).unwrap();
    assert_eq!(
        known.objects[0]["data"],
        json!({"batch": false, "apps": true, "cm": true, "secret": false, "minor": 37,
               "classes": ["standard-rwo"], "zones": ["europe-west1-b"]})
    );
    let unknown = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    assert_eq!(
        unknown.objects[0]["data"],
        json!({"batch": true, "apps": true, "cm": true, "secret": true, "minor": 0,
               "classes": [], "zones": []})
    );
}

#[test]
fn changes_to_params_do_not_reach_the_next_object_and_the_target_is_read_only() {
    let p = plan(
        r#"
  - name: meddler
    params: {list: [1]}
    script: |
      fn transform(obj, params, target) {
        let t = target;
        t.minor = 99;
        t.storageClasses.push(#{name: "x"});
        obj.data.seen = `${params.list.len()} ${target.storageClasses.len()} ${target.servedKinds.len()} ${target.minor} ${t.minor} ${type_of(target)}`;
        params.list.push(2);
        obj
      }
"#,
    );
    let out = run(
        &p,
        vec![config_map("a", "1"), config_map("a", "2")],
        &profile(),
    )
    .unwrap();
    assert_eq!(out.objects[0]["data"]["seen"], "1 1 2 37 99 map");
    assert_eq!(out.objects[1]["data"]["seen"], "1 1 2 37 99 map");

    for change in [
        "target.minor = 1",
        "target.zones.push(\"z\")",
        "target.storageClasses[0].name = \"x\"",
    ] {
        let p = plan(&script(
            "meddler",
            &format!("fn transform(obj, params, target) {{ {change}; obj }}"),
        ));
        let text = rule_error(run(&p, vec![config_map("a", "c")], &profile()));
        assert!(
            text.contains("the target profile is read-only")
                || text.contains("the target profile are read-only"),
            "{change}: {text}"
        );
    }
}

#[test]
fn warnings_and_prints_are_attached_to_the_object() {
    let p = plan(&script(
        "chatty",
        r#"
fn transform(obj, params, target) {
    warn("no mapping for " + obj.metadata.name);
    print("printed");
    debug("debugged");
    obj
}
"#,
    ));
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    assert_eq!(
        lines(&out.warnings),
        vec![
            "chatty: ConfigMap/a/c: no mapping for c",
            "chatty: ConfigMap/a/c: printed",
            "chatty: ConfigMap/a/c: \"debugged\"",
        ]
    );
    assert!(out.trace.is_empty());
}

// --- errors ----------------------------------------------------------------

const FAILS_ON_B: &str = r#"
fn check(obj) {
    if obj.metadata.name == "b" {
        fail("b is not allowed");
    }
}
fn transform(obj, params, target) {
    check(obj);
    obj.data.ok = "yes";
    obj
}
"#;

#[test]
fn on_error_fail_stops_with_the_innermost_location() {
    let p = plan(&script("strict", FAILS_ON_B));
    let err = run_empty(&p, vec![config_map("x", "a"), config_map("x", "b")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rule set strict failed on ConfigMap/x/b at plan.yaml#steps[0]:3:9: b is not allowed"
    );
}

#[test]
fn on_error_skip_leaves_the_object_out_and_goes_on() {
    let p = plan_on_error(&script("lenient", FAILS_ON_B), "skip");
    let out = run_empty(
        &p,
        vec![
            config_map("x", "a"),
            config_map("x", "b"),
            config_map("x", "c"),
        ],
    )
    .unwrap();
    assert_eq!(ids(&out.objects), vec!["ConfigMap/x/a", "ConfigMap/x/c"]);
    assert_eq!(
        lines(&out.skipped),
        vec![
            "ConfigMap/x/b skipped: rule set lenient failed at plan.yaml#steps[0]:3:9: b is not allowed"
        ]
    );
    assert_eq!(out.trace.len(), 2);
}

#[test]
fn runtime_errors_of_rule_set_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("picky.rhai"),
        "// Refuses everything.\nfn transform(obj, params, target) {\n    obj.spec.x = 1;\n    obj\n}\n",
    )
    .unwrap();
    let p = TransformPlan::from_yaml(
        &with_header("  - ruleSet: ./picky.rhai\n", "fail"),
        "plan.yaml",
        Some(dir.path()),
    )
    .unwrap();
    let text = rule_error(run_empty(&p, vec![config_map("a", "c")]));
    let file = dir.path().join("./picky.rhai").display().to_string();
    assert!(
        text.starts_with(&format!(
            "rule set ./picky.rhai failed on ConfigMap/a/c at {file}:3:"
        )),
        "{text}"
    );
}

// --- the sandbox -----------------------------------------------------------

fn hostile(body: &str) -> String {
    let p = plan(&script("hostile", body));
    rule_error(run_empty(&p, vec![config_map("a", "c")]))
}

fn hostile_compile(body: &str) -> String {
    TransformPlan::from_yaml(
        &with_header(&script("hostile", body), "fail"),
        "plan.yaml",
        None,
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn an_endless_loop_stops_at_the_operations_limit() {
    let text = hostile("fn transform(obj, params, target) { loop {} }");
    assert!(text.contains("1000000 operations"), "{text}");
    assert!(text.contains("cannot be raised"), "{text}");
}

#[test]
fn endless_recursion_stops_at_the_call_depth_limit() {
    let text = hostile("fn f(x) { f(x + 1) }\nfn transform(obj, params, target) { f(0) }");
    assert!(text.contains("64 nested function calls"), "{text}");
}

#[test]
fn a_growing_string_stops_at_the_size_limit() {
    let text = hostile(r#"fn transform(obj, params, target) { let s = "x"; loop { s += s; } }"#);
    assert!(
        text.contains("Length of string exceeds the sandbox limit"),
        "{text}"
    );
    let text = hostile("fn transform(obj, params, target) { let a = [1]; loop { a += a; } }");
    assert!(
        text.contains("Size of array/BLOB exceeds the sandbox limit"),
        "{text}"
    );
}

#[test]
fn there_is_no_file_or_environment_access() {
    for call in [
        r#"open_file("/etc/passwd")"#,
        r#"read_file("/etc/passwd")"#,
        r#"env("HOME")"#,
        r#"system("ls")"#,
        "timestamp()",
    ] {
        let text = hostile(&format!("fn transform(obj, params, target) {{ {call} }}"));
        assert!(text.contains("function not found"), "{call}: {text}");
        assert!(
            text.contains("no file, network or environment access"),
            "{text}"
        );
    }
}

#[test]
fn sleeping_is_refused() {
    for call in ["sleep(100)", "sleep(100.0)"] {
        let text = hostile(&format!(
            "fn transform(obj, params, target) {{ {call}; obj }}"
        ));
        assert!(text.contains("sleep is not available"), "{call}: {text}");
    }
}

#[test]
fn eval_and_import_do_not_compile() {
    let text = hostile_compile(r#"fn transform(obj, params, target) { eval("obj") }"#);
    assert!(text.contains("eval"), "{text}");
    assert!(text.contains("plan.yaml#steps[0]:1:"), "{text}");
    let text = hostile_compile("import \"x\" as x;\nfn transform(obj, params, target) { obj }");
    assert!(text.contains("import"), "{text}");
}

#[test]
fn the_time_budget_stops_a_slow_script() {
    // The operations limit normally ends a loop first; a budget already
    // spent shows what happens when the clock runs out instead.
    let error = plan::on_script_stack(|| {
        let ast =
            plan::compile_script("fn transform(obj, params, target) { loop {} }", "slow.rhai")
                .unwrap()
                .ast;
        engine::begin_object();
        engine::expire_budget();
        let result = engine::engine().call_fn::<rhai::Dynamic>(
            &mut rhai::Scope::new(),
            &ast,
            "transform",
            ((), (), ()),
        );
        engine::end_object();
        engine::eval_error(&result.unwrap_err())
    });
    assert!(error.message.contains("time budget"), "{}", error.message);
    assert!(error.location("slow.rhai").starts_with("slow.rhai"));
}

// --- many objects ----------------------------------------------------------

#[test]
fn many_objects_keep_their_order_across_threads() {
    let p = plan(&script(
        "number",
        r#"
fn kinds() { ["ConfigMap"] }
fn transform(obj, params, target) {
    if obj.metadata.name.ends_with("7") { return (); }
    obj.data.n = obj.metadata.name;
    obj
}
"#,
    ));
    let objects: Vec<Value> = (0..5000)
        .map(|i| {
            if i % 3 == 0 {
                object("v1", "Secret", "a", &format!("s{i}"))
            } else {
                config_map("a", &format!("{i}"))
            }
        })
        .collect();
    let expected: Vec<String> = objects
        .iter()
        .map(run::object_id)
        .filter(|id| !(id.starts_with("ConfigMap") && id.ends_with('7')))
        .collect();
    let out = run_empty(&p, objects).unwrap();
    assert_eq!(ids(&out.objects), expected);
    let traced: Vec<&str> = out.trace.iter().map(|c| c.object.as_str()).collect();
    let mut sorted = traced.clone();
    sorted.sort_by_key(|id| id.rsplit('/').next().unwrap().parse::<usize>().unwrap());
    assert_eq!(traced, sorted);
}

#[test]
fn plans_and_outputs_can_cross_threads() {
    fn check<T: Send + Sync>() {}
    check::<TransformPlan>();
    check::<TransformOutput>();
    check::<TransformError>();
}

#[test]
fn output_serializes_in_camel_case() {
    let p = plan(&script(
        "ser",
        "fn transform(obj, params, target) { warn(\"w\"); obj.data.env = \"x\"; obj }",
    ));
    let out = run_empty(&p, vec![config_map("a", "c")]).unwrap();
    let json = serde_json::to_value(&out).unwrap();
    assert_eq!(json["trace"][0]["ruleSet"], "ser");
    assert_eq!(json["trace"][0]["path"], "/data/env");
    assert_eq!(json["warnings"][0]["ruleSet"], "ser");
    assert_eq!(json["skipped"], json!([]));
}

#[test]
fn kinds_may_depend_on_the_parameters_and_unit_means_every_kind() {
    let by_params = plan(
        r#"
  - name: label-what-params-say
    params: {kinds: [ConfigMap]}
    script: |
      fn kinds(params) { params.kinds }
      fn transform(obj, params, target) { obj.metadata.labels = #{seen: "yes"}; obj }
"#,
    );
    let out = run_empty(
        &by_params,
        vec![config_map("a", "c"), deployment("a", "d", "c")],
    )
    .unwrap();
    assert_eq!(out.objects[0]["metadata"]["labels"]["seen"], "yes");
    assert!(
        out.objects[1]["metadata"].get("labels").is_none(),
        "the Deployment is not dispatched"
    );

    let every = plan(
        r#"
  - name: label-everything
    script: |
      fn kinds(params) { () }
      fn transform(obj, params, target) { obj.metadata.labels = #{seen: "yes"}; obj }
"#,
    );
    let out = run_empty(
        &every,
        vec![config_map("a", "c"), deployment("a", "d", "c")],
    )
    .unwrap();
    assert!(
        out.objects
            .iter()
            .all(|o| o["metadata"]["labels"]["seen"] == "yes")
    );
}

// --- mentions() and applies_to() -------------------------------------------

#[test]
fn a_rule_set_with_mentions_sees_only_objects_that_mention_a_name() {
    let p = plan(
        r#"
  - name: label-what-mentions-prod
    params: {names: [prod]}
    script: |
      fn mentions(params) { params.names }
      fn transform(obj, params, target) { obj.metadata.labels = #{seen: "yes"}; obj }
"#,
    );
    let mut deep = config_map("shop", "settings");
    deep["data"]["app.yaml"] = json!("cache:\n  nodes:\n  - redis-0.redis.prod.svc:6379\n");
    let mut near_misses = config_map("shop", "near-misses");
    near_misses["data"] = json!({"a": "db.production.svc", "b": "prod-db", "prod": "x"});
    let moved = deployment("prod", "web", "cfg");
    let elsewhere = deployment("production", "web", "cfg");
    let out = run_empty(
        &p,
        vec![
            deep,
            near_misses.clone(),
            moved,
            elsewhere.clone(),
            object("v1", "Namespace", "", "prod"),
        ],
    )
    .unwrap();
    let seen: Vec<bool> = out
        .objects
        .iter()
        .map(|o| o["metadata"]["labels"]["seen"] == "yes")
        .collect();
    assert_eq!(seen, vec![true, false, true, false, true]);
    assert_eq!(out.objects[1], near_misses);
    assert_eq!(out.objects[3], elsewhere);
}

#[test]
fn kinds_and_mentions_must_both_hold() {
    let p = plan(&script(
        "both",
        r#"
fn kinds() { ["ConfigMap"] }
fn mentions() { ["prod"] }
fn transform(obj, params, target) { obj.metadata.labels = #{seen: "yes"}; obj }
"#,
    ));
    let out = run_empty(
        &p,
        vec![
            config_map("prod", "in-prod"),
            config_map("shop", "elsewhere"),
            deployment("prod", "web", "cfg"),
        ],
    )
    .unwrap();
    let seen: Vec<bool> = out
        .objects
        .iter()
        .map(|o| o["metadata"]["labels"]["seen"] == "yes")
        .collect();
    // config_map's data holds "prod" too: both ConfigMaps mention it.
    assert_eq!(seen, vec![true, true, false]);
    let mut other = config_map("shop", "other");
    other["data"]["env"] = json!("staging");
    assert!(!p.steps[0].selects(&other));
}

#[test]
fn mentions_unit_means_every_object_and_bad_values_are_plan_errors() {
    let p = plan(&script(
        "every",
        r#"
fn mentions(params) { () }
fn transform(obj, params, target) { obj.metadata.labels = #{seen: "yes"}; obj }
"#,
    ));
    let out = run_empty(&p, vec![object("v1", "Secret", "a", "s")]).unwrap();
    assert_eq!(out.objects[0]["metadata"]["labels"]["seen"], "yes");

    let d = diagnostics(&with_header(
        &[
            script(
                "not-an-array",
                "fn mentions() { \"prod\" }\nfn transform(obj, params, target) { obj }",
            ),
            script(
                "not-strings",
                "fn mentions() { [\"prod\", 3] }\nfn transform(obj, params, target) { obj }",
            ),
            script(
                "failing",
                "fn mentions(params) { fail(\"no\") }\nfn transform(obj, params, target) { obj }",
            ),
        ]
        .concat(),
        "fail",
    ));
    let text = lines(&d).join("\n");
    assert!(
        text.contains("steps[0]: mentions() returned prod (string)"),
        "{text}"
    );
    assert!(
        text.contains("steps[1]: mentions(): 3 is not a string"),
        "{text}"
    );
    assert!(text.contains("mentions() failed: no"), "{text}");
}

#[test]
fn the_namespace_rule_set_sees_only_objects_that_mention_a_mapped_namespace() {
    let p = plan("  - ruleSet: namespace\n    params: {map: {prod: staging}}\n");
    let mut deep = config_map("shop", "settings");
    deep["data"] = json!({"app.yaml": "db:\n  url: postgres://db.prod.svc.cluster.local:5432/x\n"});
    assert!(p.steps[0].selects(&deep));
    let mut unrelated = config_map("production", "settings");
    unrelated["data"] = json!({"url": "db.production.svc", "env": "preprod"});
    assert!(!p.steps[0].selects(&unrelated));
    assert!(p.steps[0].selects(&object("v1", "Namespace", "", "prod")));

    let out = run_empty(&p, vec![deep, unrelated.clone()]).unwrap();
    assert_eq!(
        out.objects[0]["data"]["app.yaml"],
        "db:\n  url: postgres://db.staging.svc.cluster.local:5432/x\n"
    );
    assert_eq!(out.objects[1], unrelated);

    // An invalid map is reported on every object, as before.
    let p = plan("  - ruleSet: namespace\n    params: {map: {a: c, b: c}}\n");
    assert!(p.steps[0].selects(&unrelated));
    assert!(rule_error(run_empty(&p, vec![unrelated])).contains("both mapped to c"));
    // Nothing to move: no object is handed to the rule set.
    let p = plan("  - ruleSet: namespace\n");
    assert!(!p.steps[0].selects(&object("v1", "Namespace", "", "prod")));
}

#[test]
fn applies_to_is_asked_per_api_version_and_kind_and_false_skips_them() {
    let p = plan(&script(
        "v1-configmaps",
        r#"
fn applies_to(api_version, kind, params, target) {
    warn("dropped");
    api_version == "v1" && kind == "ConfigMap"
}
fn transform(obj, params, target) {
    if obj.kind != "ConfigMap" { fail("saw " + object_id(obj)); }
    obj.metadata.labels = #{seen: "yes"};
    obj
}
"#,
    ));
    let secret = object("v1", "Secret", "a", "s");
    let old = object("extensions/v1beta1", "Deployment", "a", "d");
    let out = run_empty(
        &p,
        vec![
            secret.clone(),
            config_map("a", "c"),
            old.clone(),
            config_map("a", "d"),
        ],
    )
    .unwrap();
    assert_eq!(out.objects[0], secret);
    assert_eq!(out.objects[1]["metadata"]["labels"]["seen"], "yes");
    assert_eq!(out.objects[2], old);
    assert_eq!(out.objects[3]["metadata"]["labels"]["seen"], "yes");
    assert_eq!(out.warnings, vec![], "applies_to's warnings are dropped");

    // It sees the target; when it fails or answers anything but false,
    // transform gets the objects.
    let p = plan(&script(
        "unserved-only",
        r#"
fn applies_to(api_version, kind, params, target) {
    if kind == "Secret" { fail("cannot tell"); }
    if kind == "Service" { return "maybe"; }
    !serves_kind(api_version, kind)
}
fn transform(obj, params, target) { warn("saw it"); obj }
"#,
    ));
    let target = ClusterProfile {
        served_group_versions: BTreeSet::from(["v1".to_string(), "apps/v1".to_string()]),
        ..ClusterProfile::default()
    };
    let out = run(
        &p,
        vec![
            config_map("a", "c"),
            object("v1", "Secret", "a", "s"),
            object("v1", "Service", "a", "svc"),
            object("batch/v1beta1", "CronJob", "a", "j"),
            deployment("a", "d", "c"),
        ],
        &target,
    )
    .unwrap();
    let warned: Vec<&str> = out.warnings.iter().map(|w| w.object.as_str()).collect();
    assert_eq!(warned, vec!["Secret/a/s", "Service/a/svc", "CronJob/a/j"]);
}

#[test]
fn the_api_versions_rule_set_leaves_current_and_unknown_kinds_alone() {
    // A current object and a kind it does not know, on an unknown target:
    // nothing to convert or say.
    let p = plan("  - ruleSet: api-versions\n");
    let widget = object("example.com/v1", "Widget", "a", "w");
    let out = run_empty(&p, vec![deployment("a", "d", "c"), widget.clone()]).unwrap();
    assert_eq!(out.objects[1], widget);
    assert!(out.trace.is_empty() && out.warnings.is_empty());
    let out = run_empty(&p, vec![object("batch/v1beta1", "CronJob", "a", "j")]).unwrap();
    assert_eq!(out.objects[0]["apiVersion"], "batch/v1");
}
