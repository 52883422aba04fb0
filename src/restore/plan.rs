//! plan: a pure, serializable value made from what load, the body pass and
//! validate found. Waves of objects in dependency order; each object with
//! its action (create, update, unchanged, skip, recreate) and why, the
//! differences an update makes, the resourceVersion it saw in the target,
//! and what identifies the body it writes. `ferry restore --dry-run -o json`
//! prints it; `ferry restore --plan` applies exactly it, and a controller
//! can show it for approval first.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::bodies::Desired;
use super::diff::Change;
use super::load::Subset;
use super::order::order_indexed;
use super::validate::Facts;
use super::{ExistingPolicy, cascades};
use crate::model::ObjectRef;

/// The version of the plan's serialized form.
pub const PLAN_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Unchanged,
    Skip,
    Recreate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanItem {
    /// The object as it will be named in the target.
    pub object: ObjectRef,
    pub action: Action,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// The stored object it writes, as stored (hex blob id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// Digest of the body it writes, for objects a transform produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The target's resourceVersion of the object when planned; none when
    /// it was absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub index: usize,
    pub items: Vec<PlanItem>,
}

/// Where a transform plan comes from, so that a saved restore plan can run
/// it again and check that it yields the same objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransformSource {
    /// The plan's YAML.
    pub text: String,
    /// How diagnostics name it (its path).
    pub name: String,
    /// Where relative rule set paths are resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dir: Option<std::path::PathBuf>,
}

/// What the plan is about, besides its items.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanHeader {
    pub format: u32,
    /// Id of the repository the snapshot is in.
    pub repository: String,
    pub snapshot: String,
    pub snapshot_id: String,
    /// The target's API server.
    pub target: String,
    /// Planned against a saved profile, without reading the target: every
    /// object is planned as absent.
    #[serde(default)]
    pub offline: bool,
    pub subset: Subset,
    pub existing: ExistingPolicy,
    #[serde(default)]
    pub recreate_cascading: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_mapping: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<TransformSource>,
}

/// The whole restore, decided before anything is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    #[serde(flatten)]
    pub header: PlanHeader,
    pub waves: Vec<Wave>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycles: Vec<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Every change the transform plan made (rule set, object, path, old → new).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<crate::transform::Change>,
}

impl RestorePlan {
    pub fn items(&self) -> impl Iterator<Item = &PlanItem> {
        self.waves.iter().flat_map(|w| &w.items)
    }
}

/// What the target holds of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Live {
    Absent,
    /// Not read (an offline plan).
    Unknown,
    Present {
        resource_version: String,
        /// What applying the object would change, removals included.
        changes: Vec<Change>,
    },
}

/// One object, with everything planning needs to know of it.
#[derive(Debug, Clone)]
pub struct Planned {
    pub desired: Desired,
    pub facts: Facts,
    pub digest: Option<String>,
    pub live: Live,
    /// Taken only because selected objects need it: created where it is
    /// missing, never deleted to be recreated.
    pub dependency: bool,
}

/// The plan, and the problems that refuse it (objects that exist under
/// `--existing fail`).
pub fn build(
    header: PlanHeader,
    planned: Vec<Planned>,
    warnings: Vec<String>,
    transforms: Vec<crate::transform::Change>,
) -> (RestorePlan, Vec<String>) {
    let needs = dependencies(&planned);
    let (wave_positions, cycle_positions) = {
        let objects: Vec<&ObjectRef> = planned.iter().map(|p| &p.desired.object).collect();
        order_indexed(&objects, needs)
    };
    let mut warnings = warnings;
    let cycles: Vec<Vec<String>> = cycle_positions
        .iter()
        .map(|c| {
            c.iter()
                .map(|i| planned[*i].desired.object.to_string())
                .collect()
        })
        .collect();
    for cycle in &cycles {
        warnings.push(format!("dependency cycle {} broken", cycle.join(" → ")));
    }
    let mut problems = Vec::new();
    let mut slots: Vec<Option<Planned>> = planned.into_iter().map(Some).collect();
    let mut waves = Vec::with_capacity(wave_positions.len());
    for (index, wave) in wave_positions.into_iter().enumerate() {
        let mut items = Vec::with_capacity(wave.len());
        for position in wave {
            let p = slots[position].take().expect("each object is in one wave");
            let object = p.desired.object;
            let (action, reason, changes, live) = decide(
                &object,
                p.live,
                p.dependency,
                &header,
                &mut warnings,
                &mut problems,
            );
            items.push(PlanItem {
                object,
                action,
                reason,
                changes,
                blob: p.desired.blob.map(|b| b.to_string()),
                digest: p.digest,
                live,
            });
        }
        waves.push(Wave { index, items });
    }
    let plan = RestorePlan {
        header,
        waves,
        cycles,
        warnings,
        transforms,
    };
    problems.sort();
    (plan, problems)
}

type Decision = (Action, String, Vec<Change>, Option<String>);

fn decide(
    object: &ObjectRef,
    live: Live,
    dependency: bool,
    header: &PlanHeader,
    warnings: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Decision {
    let (resource_version, changes) = match live {
        Live::Absent => return (Action::Create, "not in the target".into(), Vec::new(), None),
        Live::Unknown => {
            return (
                Action::Create,
                "planned offline: assumed absent from the target".into(),
                Vec::new(),
                None,
            );
        }
        Live::Present {
            resource_version,
            changes,
        } => (resource_version, changes),
    };
    let rv = Some(resource_version);
    match header.existing {
        ExistingPolicy::Skip => (
            Action::Skip,
            "exists; --existing skip".into(),
            Vec::new(),
            rv,
        ),
        ExistingPolicy::Fail => {
            problems.push(format!(
                "{object} already exists in the target (--existing fail)"
            ));
            (
                Action::Skip,
                "exists; --existing fail".into(),
                Vec::new(),
                rv,
            )
        }
        ExistingPolicy::Recreate if dependency => {
            // Deleting what the subset did not select could delete what
            // it did not restore either: a Namespace with its other
            // objects, a CRD with every custom resource of the kind.
            let reason = "exists; not selected, only needed by what is: kept, not recreated";
            if changes.is_empty() {
                (Action::Unchanged, reason.into(), changes, rv)
            } else {
                (
                    Action::Update,
                    format!("{reason} ({} field(s) differ)", changes.len()),
                    changes,
                    rv,
                )
            }
        }
        ExistingPolicy::Recreate if cascades(object).is_none() || header.recreate_cascading => {
            let reason = match cascades(object) {
                Some(what) => {
                    warnings.push(format!(
                        "{object} will be deleted and recreated (--recreate-cascading): this deletes {what}, also what is not in the snapshot"
                    ));
                    format!("exists; --existing recreate --recreate-cascading: deletes {what}")
                }
                None => "exists; --existing recreate (objects it owns are kept)".into(),
            };
            (Action::Recreate, reason, Vec::new(), rv)
        }
        ExistingPolicy::Update | ExistingPolicy::Recreate => {
            // A cascading object under --existing recreate is kept.
            let kept = match cascades(object) {
                Some(what) if header.existing == ExistingPolicy::Recreate => format!(
                    "; kept, not recreated: deleting it would delete {what} (--recreate-cascading to delete it)"
                ),
                _ => String::new(),
            };
            if changes.is_empty() {
                (
                    Action::Unchanged,
                    format!("the target already matches{kept}"),
                    changes,
                    rv,
                )
            } else {
                (
                    Action::Update,
                    format!("{} field(s) differ{kept}", changes.len()),
                    changes,
                    rv,
                )
            }
        }
    }
}

/// Plans objects held in memory (manifests, a transform's output) against
/// a target's profile, as a restore of them would: validate, then
/// [`build`]. `live` says what the target holds of each. Pure: the golden
/// plan tests and offline tools use it; a restore from a repository takes
/// the streaming path that ends in the same two calls.
pub fn plan_values(
    header: PlanHeader,
    objects: Vec<serde_json::Value>,
    live: impl Fn(&ObjectRef) -> Live,
    target: &crate::profile::ClusterProfile,
    source: &crate::profile::ClusterProfile,
    transforms: Vec<crate::transform::Change>,
) -> Result<RestorePlan, Vec<String>> {
    let mut planned = Vec::with_capacity(objects.len());
    for value in objects {
        let object = ObjectRef::from_object(&value).map_err(|e| vec![e.to_string()])?;
        planned.push(Planned {
            facts: Facts::of(&object, &value),
            digest: Some(super::bodies::digest(&value)),
            live: live(&object),
            desired: Desired { object, blob: None },
            dependency: false,
        });
    }
    check_and_build(
        header,
        planned,
        Vec::new(),
        transforms,
        target,
        source,
        Vec::new(),
    )
}

/// Validates the planned objects against the target's profile, then
/// [`build`]s the plan: the ending every planning path shares. `problems`
/// holds what the caller found already (permissions); any problem refuses
/// the plan, and all of them are returned, sorted.
pub fn check_and_build(
    header: PlanHeader,
    mut planned: Vec<Planned>,
    mut warnings: Vec<String>,
    transforms: Vec<crate::transform::Change>,
    target: &crate::profile::ClusterProfile,
    source: &crate::profile::ClusterProfile,
    mut problems: Vec<String>,
) -> Result<RestorePlan, Vec<String>> {
    planned.sort_by(|a, b| a.desired.object.cmp(&b.desired.object));
    let facts: Vec<(&ObjectRef, &Facts)> = planned
        .iter()
        .map(|p| (&p.desired.object, &p.facts))
        .collect();
    let found = super::validate::check(&facts, target, source);
    problems.extend(found.problems);
    warnings.extend(found.warnings);
    let (plan, refused) = build(header, planned, warnings, transforms);
    problems.extend(refused);
    if problems.is_empty() {
        Ok(plan)
    } else {
        problems.sort();
        problems.dedup();
        Err(problems)
    }
}

/// What each object needs first, within the restore set, as positions in
/// `planned`: its Namespace, its CRD, and what it refers to.
fn dependencies(planned: &[Planned]) -> Vec<Vec<usize>> {
    type Key<'a> = (&'a str, &'a str, Option<&'a str>, &'a str);
    let mut by_key: HashMap<Key<'_>, usize> = HashMap::with_capacity(planned.len());
    let mut crds: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, p) in planned.iter().enumerate() {
        let o = &p.desired.object;
        by_key.insert((&o.group, &o.kind, o.namespace.as_deref(), &o.name), i);
        if let Some(crd) = &p.facts.crd {
            crds.insert((&crd.group, &crd.kind), i);
        }
    }
    planned
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let o = &p.desired.object;
            let mut needs = Vec::new();
            if let Some(ns) = &o.namespace
                && let Some(n) = by_key.get(&("", "Namespace", None, ns.as_str()))
            {
                needs.push(*n);
            }
            if let Some(crd) = crds.get(&(o.group.as_str(), o.kind.as_str())) {
                needs.push(*crd);
            }
            for (group, kind, namespace, name) in &p.facts.needs {
                if let Some(target) = by_key.get(&(group, kind, namespace.as_deref(), name))
                    && *target != i
                {
                    needs.push(*target);
                }
            }
            needs
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn present(value: serde_json::Value, dependency: bool) -> Planned {
        let object = ObjectRef::from_object(&value).unwrap();
        Planned {
            facts: Facts::of(&object, &value),
            digest: None,
            live: Live::Present {
                resource_version: "7".into(),
                changes: vec![Change {
                    path: "/metadata/labels/team".into(),
                    live: None,
                    desired: json!("a"),
                }],
            },
            desired: Desired { object, blob: None },
            dependency,
        }
    }

    #[test]
    fn recreating_never_deletes_what_only_came_as_a_dependency() {
        let header = PlanHeader {
            format: PLAN_FORMAT,
            repository: "r".into(),
            snapshot: "s".into(),
            snapshot_id: "s-id".into(),
            target: "t".into(),
            offline: false,
            subset: Subset::default(),
            existing: ExistingPolicy::Recreate,
            recreate_cascading: true,
            namespace_mapping: Default::default(),
            transform: None,
        };
        let namespace =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                         "metadata": {"name": "widgets.example.com"},
                         "spec": {"group": "example.com", "scope": "Namespaced",
                                  "names": {"kind": "Widget", "plural": "widgets"},
                                  "versions": [{"name": "v1", "served": true, "storage": true}]}});
        let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": "data", "namespace": "shop"}});
        let (plan, problems) = build(
            header,
            vec![
                present(namespace.clone(), true),
                present(crd, true),
                present(claim, false),
            ],
            Vec::new(),
            Vec::new(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        let action = |kind: &str| {
            let item = plan.items().find(|i| i.object.kind == kind).unwrap();
            (item.action, item.reason.clone())
        };
        for kind in ["Namespace", "CustomResourceDefinition"] {
            let (action, reason) = action(kind);
            assert_eq!(action, Action::Update, "{kind}: {reason}");
            assert!(reason.contains("not recreated"), "{kind}: {reason}");
        }
        // What the subset selected is recreated as asked, with the warning.
        assert_eq!(action("PersistentVolumeClaim").0, Action::Recreate);
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(plan.warnings[0].contains("PersistentVolumeClaim/shop/data"));

        // Selected for its own sake, the Namespace is recreated too.
        let mut header = plan.header.clone();
        header.recreate_cascading = true;
        let (plan, _) = build(
            header,
            vec![present(namespace, false)],
            Vec::new(),
            Vec::new(),
        );
        assert_eq!(plan.items().next().unwrap().action, Action::Recreate);
    }
}
