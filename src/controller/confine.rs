//! What a namespaced Restore may do, checked before anything is written.
//! The API server has the last word (the restore is carried out as its
//! requester), but these checks refuse early and name the cause:
//!
//! - it reads only its own namespace of the snapshot, and maps it nowhere
//!   else;
//! - its transform plan names only built-in rule sets (a path would read
//!   the controller's files);
//! - every namespaced object its plan writes is in its own namespace.
//!
//! Pure: no cluster, no repository.

use std::collections::BTreeMap;

use crate::restore::RestorePlan;

/// Problems of a Restore's request in namespace `namespace`.
pub fn check_request(
    namespace: &str,
    mapping: &BTreeMap<String, String>,
    transform: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (from, to) in mapping {
        if from != namespace {
            problems.push(format!(
                "namespaceMapping reads namespace {from}: a Restore in {namespace} reads only snapshots' objects of {namespace}"
            ));
        }
        if to != namespace {
            problems.push(format!(
                "namespaceMapping writes into namespace {to}: a Restore in {namespace} writes only into {namespace}"
            ));
        }
    }
    if let Some(text) = transform {
        problems.extend(transform_problems(text, "a Restore"));
    }
    problems
}

/// What is wrong with a transform plan a resource carries: not a plan, a
/// rule set other than the built-in ones (a path would be read from the
/// controller's own files, and would not travel with a plan recorded in a
/// snapshot), or a rule that does not compile. `who` names the resource
/// kind in the messages.
pub fn transform_problems(text: &str, who: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let plan = match serde_yaml_ng::from_str::<crate::transform::TransformPlanConfig>(text) {
        Ok(plan) => plan,
        Err(e) => return vec![format!("transform is not a transform plan: {e}")],
    };
    let builtins: Vec<&str> = crate::transform::builtin_rule_sets()
        .iter()
        .map(|(name, _)| *name)
        .collect();
    for (i, step) in plan.spec.steps.iter().enumerate() {
        if let Some(rule_set) = &step.rule_set
            && !builtins.contains(&rule_set.as_str())
        {
            problems.push(format!(
                "transform steps[{i}] names rule set '{rule_set}': {who} may use the built-in rule sets ({}), inline scripts and patches",
                builtins.join(", ")
            ));
        }
    }
    if problems.is_empty()
        && let Err(e) = crate::transform::TransformPlan::from_yaml(text, "transform", None)
    {
        problems.push(format!("transform does not compile: {e}"));
    }
    problems
}

/// Objects of `plan` that a Restore in `namespace` must not write: those
/// in other namespaces. Cluster-scoped objects are left to the requester's
/// permissions, checked in preflight.
pub fn check_plan(namespace: &str, plan: &RestorePlan) -> Vec<String> {
    plan.items()
        .filter(|item| {
            matches!(
                item.action,
                crate::restore::Action::Create
                    | crate::restore::Action::Update
                    | crate::restore::Action::Recreate
            )
        })
        .filter_map(|item| {
            let ns = item.object.namespace.as_deref()?;
            (ns != namespace).then(|| {
                format!(
                    "{} is in namespace {ns}: a Restore in {namespace} writes only into {namespace}",
                    item.object
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_may_only_name_the_restores_own_namespace() {
        let own: BTreeMap<String, String> = [("team-a".into(), "team-a".into())].into();
        assert!(check_request("team-a", &own, None).is_empty());
        let out: BTreeMap<String, String> = [("team-a".into(), "team-b".into())].into();
        let problems = check_request("team-a", &out, None);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("writes into namespace team-b"),
            "{problems:?}"
        );
        let other: BTreeMap<String, String> = [("team-b".into(), "team-a".into())].into();
        assert!(check_request("team-a", &other, None)[0].contains("reads namespace team-b"));
    }

    #[test]
    fn transform_plans_may_not_name_rule_set_files() {
        let plan = |rule_set: &str| {
            format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: x}}\nspec:\n  steps:\n  - ruleSet: {rule_set}\n"
            )
        };
        let builtin = crate::transform::builtin_rule_sets()[0].0;
        assert!(check_request("a", &BTreeMap::new(), Some(&plan(builtin))).is_empty());
        let problems = check_request("a", &BTreeMap::new(), Some(&plan("/etc/passwd.rhai")));
        assert!(problems[0].contains("'/etc/passwd.rhai'"), "{problems:?}");
        assert!(!check_request("a", &BTreeMap::new(), Some("- not a plan")).is_empty());
    }

    #[test]
    fn a_policys_transform_must_compile() {
        let script = |body: &str| {
            format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {{name: dr}}\nspec:\n  steps:\n  - script: |\n      fn kinds() {{ [\"ConfigMap\"] }}\n      fn transform(obj, params, target) {{ {body} }}\n"
            )
        };
        assert_eq!(
            transform_problems(
                &script("obj.metadata.labels = #{site: \"dr\"}; obj"),
                "a BackupPolicy"
            ),
            Vec::<String>::new()
        );
        let broken = transform_problems(&script("obj.metadata.labels = ; obj"), "a BackupPolicy");
        assert!(
            broken.len() == 1 && broken[0].starts_with("transform does not compile"),
            "{broken:?}"
        );
        let file = transform_problems(
            "apiVersion: ferry.dev/v1alpha1\nkind: TransformPlan\nmetadata: {name: x}\nspec:\n  steps:\n  - ruleSet: ./mine.rhai\n",
            "a BackupPolicy",
        );
        assert!(
            file[0].contains("a BackupPolicy may use the built-in rule sets"),
            "{file:?}"
        );
    }
}
