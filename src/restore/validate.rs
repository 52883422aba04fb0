//! validate: pure checks of what a restore would write against the target's
//! cluster profile, before anything is written. The profile comes from the
//! target or from a file, so the same checks run offline
//! (`ferry restore --dry-run --target-profile`). Permissions, which only the
//! target can answer, are checked in [`super::target`].

use std::collections::BTreeSet;

use serde_json::Value;

use crate::model::ObjectRef;
use crate::model::edges::{Target, references};
use crate::profile::ClusterProfile;

/// Cluster-scoped classes objects refer to by name.
const CLASS_REFERENCES: &[(&str, &str, &str)] = &[
    ("storage.k8s.io", "StorageClass", "storage class"),
    ("networking.k8s.io", "IngressClass", "ingress class"),
    ("scheduling.k8s.io", "PriorityClass", "priority class"),
    ("node.k8s.io", "RuntimeClass", "runtime class"),
];

/// What the checks need to know of one object, taken from its body once.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Objects it refers to that must exist before it (group, kind,
    /// namespace, name), wherever they are.
    pub needs: Vec<(String, String, Option<String>, String)>,
    /// Classes it uses: (group, kind, name).
    pub classes: Vec<(String, String, String)>,
    /// Boxed: few objects are CRDs, and every object carries the field.
    pub crd: Option<Box<CrdFacts>>,
    /// Names the API server would refuse.
    pub name_problems: Vec<String>,
}

/// What a CRD in the restore defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrdFacts {
    pub group: String,
    pub kind: String,
    pub plural: String,
    pub versions: Vec<String>,
}

impl Facts {
    pub fn of(object: &ObjectRef, value: &Value) -> Facts {
        let mut facts = Facts {
            needs: Vec::new(),
            classes: Vec::new(),
            crd: None,
            name_problems: crate::model::names::problems(value),
        };
        for reference in references(value) {
            let Target::Object {
                group,
                kind,
                namespace,
                name,
            } = reference.target
            else {
                continue;
            };
            if namespace.is_none()
                && CLASS_REFERENCES
                    .iter()
                    .any(|(g, k, _)| *g == group && *k == kind)
            {
                facts
                    .classes
                    .push((group.clone(), kind.clone(), name.clone()));
            }
            if reference.kind.orders_restore() {
                facts.needs.push((group, kind, namespace, name));
            }
        }
        if object.kind == "CustomResourceDefinition" {
            let text = |p: &str| {
                value
                    .pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            facts.crd = Some(Box::new(CrdFacts {
                group: text("/spec/group"),
                kind: text("/spec/names/kind"),
                plural: text("/spec/names/plural"),
                versions: value
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .map(|vs| {
                        vs.iter()
                            .filter_map(|v| v["name"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            }));
        }
        facts
    }
}

/// Problems refuse the restore; warnings are reported with the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// The first few of `items` and how many more there are: a preflight
/// message about thousands of objects must stay readable.
pub fn some_of(items: &[String]) -> String {
    const SHOWN: usize = 5;
    if items.len() <= SHOWN {
        return items.join(", ");
    }
    format!(
        "{} and {} more",
        items[..SHOWN].join(", "),
        items.len() - SHOWN
    )
}

/// The apiVersion at which the target serves a kind, if any.
fn served_version(target: &ClusterProfile, group: &str, kind: &str) -> Option<String> {
    target
        .served_kinds
        .iter()
        .find_map(|k| match k.split('/').collect::<Vec<_>>().as_slice() {
            [g, v, k] if *g == group && *k == kind => Some(format!("{g}/{v}")),
            [v, k] if group.is_empty() && *k == kind => Some(v.to_string()),
            _ => None,
        })
}

/// Checks the objects against the target's profile (`source`: the profile
/// of the cluster the snapshot was taken from).
pub fn check(
    facts: &[(&ObjectRef, &Facts)],
    target: &ClusterProfile,
    source: &ClusterProfile,
) -> Findings {
    let mut found = Findings::default();
    for (_, f) in facts {
        found.problems.extend(f.name_problems.iter().cloned());
    }
    let crds: Vec<&CrdFacts> = facts.iter().filter_map(|(_, f)| f.crd.as_deref()).collect();

    // API versions: served by the target, or by a CRD in this restore.
    for (o, _) in facts {
        let api_version = o.api_version();
        if target.serves_kind(&api_version, &o.kind)
            || crds
                .iter()
                .any(|c| c.group == o.group && c.kind == o.kind && c.versions.contains(&o.version))
        {
            continue;
        }
        let other = served_version(target, &o.group, &o.kind);
        found.problems.push(match other {
            Some(other) => format!(
                "{o}: the target does not serve {api_version} (it serves {other}); convert it with a transform (api-versions)"
            ),
            None => format!(
                "{o}: the target does not serve {api_version} {} and the restore brings no CRD for it",
                o.kind
            ),
        });
    }

    // Referenced classes: in the restore or in the target.
    let in_restore: BTreeSet<(&str, &str, &str)> = facts
        .iter()
        .filter(|(o, _)| o.namespace.is_none())
        .map(|(o, _)| (o.group.as_str(), o.kind.as_str(), o.name.as_str()))
        .collect();
    let mut users: std::collections::BTreeMap<(&str, &str, &str), Vec<String>> = Default::default();
    for (o, f) in facts {
        for (group, kind, name) in &f.classes {
            if !in_restore.contains(&(group.as_str(), kind.as_str(), name.as_str())) {
                users
                    .entry((group.as_str(), kind.as_str(), name.as_str()))
                    .or_default()
                    .push(o.to_string());
            }
        }
    }
    for ((_, kind, name), users) in users {
        let label = CLASS_REFERENCES
            .iter()
            .find(|(_, k, _)| *k == kind)
            .map_or("class", |c| c.2);
        match target.has_class(kind, name) {
            Some(true) => {}
            // Already unresolved where the snapshot was taken: restoring
            // reproduces the source, so it is no reason to refuse.
            Some(false) if source.has_class(kind, name) == Some(false) => found.warnings.push(format!(
                "{label} {name} (used by {}) exists neither on the target nor on the source cluster of the snapshot; restored with the same unresolved reference as on the source",
                some_of(&users)
            )),
            Some(false) => found.problems.push(format!(
                "{label} {name} is missing on the target (used by {}); create it, include it in the restore, or map it with a transform{}",
                some_of(&users),
                if kind == "StorageClass" { " (storage-class)" } else { "" }
            )),
            None => found.warnings.push(format!(
                "cannot check that {label} {name} exists on the target (used by {}): the target's profile does not list its {label}es",
                some_of(&users)
            )),
        }
    }
    found.problems.sort();
    found.problems.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::StorageClassInfo;
    use serde_json::json;

    fn facts_of(values: &[Value]) -> Vec<(ObjectRef, Facts)> {
        values
            .iter()
            .map(|v| {
                let o = ObjectRef::from_object(v).expect("object");
                let f = Facts::of(&o, v);
                (o, f)
            })
            .collect()
    }

    fn check(
        facts: &[(ObjectRef, Facts)],
        target: &ClusterProfile,
        source: &ClusterProfile,
    ) -> Findings {
        let pairs: Vec<(&ObjectRef, &Facts)> = facts.iter().map(|(o, f)| (o, f)).collect();
        super::check(&pairs, target, source)
    }

    fn profile(kinds: &[&str], classes: &[&str]) -> ClusterProfile {
        ClusterProfile {
            version: "v1.37.2".into(),
            served_kinds: kinds.iter().map(|k| k.to_string()).collect(),
            storage_classes: classes
                .iter()
                .map(|c| StorageClassInfo {
                    name: c.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_unserved_version_and_a_missing_class_are_problems() {
        let facts = facts_of(&[
            json!({"apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": "j", "namespace": "a"}}),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": "a"},
                   "spec": {"storageClassName": "fast"}}),
        ]);
        let target = profile(
            &["batch/v1/CronJob", "v1/PersistentVolumeClaim"],
            &["standard"],
        );
        let source = profile(&[], &["fast"]);
        let found = check(&facts, &target, &source);
        assert_eq!(found.problems.len(), 2, "{found:?}");
        assert!(
            found.problems[0].contains("does not serve batch/v1beta1 (it serves batch/v1)"),
            "{found:?}"
        );
        assert!(
            found.problems[1].starts_with(
                "storage class fast is missing on the target (used by PersistentVolumeClaim/a/data)"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn a_crd_in_the_restore_serves_its_resources() {
        let facts = facts_of(&[
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.example.com"},
                   "spec": {"group": "example.com", "names": {"kind": "Widget", "plural": "widgets"}, "versions": [{"name": "v1"}]}}),
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "a"}}),
        ]);
        let target = profile(&["apiextensions.k8s.io/v1/CustomResourceDefinition"], &[]);
        let found = check(&facts, &target, &ClusterProfile::default());
        assert_eq!(found, Findings::default());
    }

    #[test]
    fn a_class_missing_on_both_sides_is_a_warning() {
        let facts = facts_of(
            &[json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "a"}, "spec": {"storageClassName": "gone"}})],
        );
        let target = profile(&["v1/PersistentVolumeClaim"], &["standard"]);
        let found = check(&facts, &target, &profile(&[], &["other"]));
        assert!(found.problems.is_empty(), "{found:?}");
        assert!(found.warnings[0].contains("exists neither on the target nor on the source"));
    }

    #[test]
    fn long_lists_of_objects_are_cut_to_the_first_few() {
        let items: Vec<String> = (0..8)
            .map(|i| format!("PersistentVolumeClaim/ns/c{i}"))
            .collect();
        assert_eq!(
            some_of(&items[..2]),
            "PersistentVolumeClaim/ns/c0, PersistentVolumeClaim/ns/c1"
        );
        let text = some_of(&items);
        assert!(
            text.ends_with("PersistentVolumeClaim/ns/c4 and 3 more"),
            "{text}"
        );
        assert!(!text.contains("c5"));
    }
}
