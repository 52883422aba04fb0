//! `ferry restore`: load ─▶ (transform) ─▶ validate ─▶ plan ─▶ apply.
//!
//! - [`load`] reads the snapshot's catalog and stored graph, selects, and
//!   closes over dependencies on the graph, before any body is read.
//! - A transform (the namespace mapping is one) rewrites the bodies; it
//!   sees them all at once, so they are held in memory only then.
//! - One pass over the bodies, in pack order and a batch at a time, takes
//!   what [`validate`] and [`plan`] need of each object and compares it
//!   with the target's live object; [`validate`] checks the set against
//!   the target's profile (or a saved one, offline), [`target`] the
//!   permissions.
//! - [`plan`] is a pure, serializable value; [`apply`] carries it out wave
//!   by wave, reading the bodies again a batch at a time, and reports
//!   through one [`Observer`].
//!
//! Nothing is written unless every check passes. Apply uses a plain create
//! or a server-side apply with field manager `ferry`, so a rerun converges
//! and a restore interrupted half-way finishes the job when run again.

pub mod apply;
pub mod bodies;
pub mod diff;
mod dry_run;
pub mod load;
pub mod managed;
pub mod mapping;
pub mod observer;
pub mod order;
pub mod plan;
mod prepare;
pub mod target;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::discovery::discover;
use crate::cluster::{ClusterError, Connection};
use crate::model::ObjectRef;
use crate::profile::ClusterProfile;
use crate::repo::{IoStats, RepoError, Repository};
use crate::transform::TransformPlan;
pub use apply::AfterWave;
use bodies::Bodies;
pub use load::Subset;
use mapping::NamespaceMapping;
pub use observer::{Event, Observer, Progress, Silent};
use plan::PLAN_FORMAT;
pub use plan::{Action, PlanHeader, PlanItem, RestorePlan, TransformSource, Wave};

/// The field manager every write of ferry uses.
pub const FIELD_MANAGER: &str = "ferry";

/// What to do with an object that already exists in the target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExistingPolicy {
    /// Leave it as it is.
    Skip,
    /// Server-side apply the backed-up fields onto it (no change when equal).
    #[default]
    Update,
    /// Refuse the restore in preflight.
    Fail,
    /// Delete it (orphaning what it owns) and create it anew. Objects whose
    /// deletion cascades beyond the snapshot ([`CASCADING_KINDS`]) are
    /// updated instead unless `recreate_cascading` is set.
    Recreate,
}

/// Kinds whose deletion deletes other things, whatever the propagation
/// policy: a Namespace its objects, a CRD its custom resources, a claim or
/// volume the data. `--existing recreate` leaves them alone unless
/// `--recreate-cascading` asks for exactly that.
pub const CASCADING_KINDS: &[(&str, &str, &str)] = &[
    ("", "Namespace", "every object in the namespace"),
    (
        "apiextensions.k8s.io",
        "CustomResourceDefinition",
        "every custom resource of the definition",
    ),
    ("", "PersistentVolumeClaim", "the volume's data"),
    ("", "PersistentVolume", "the volume's data"),
];

/// What deleting an object of this kind also deletes, for cascading kinds.
fn cascades(object: &ObjectRef) -> Option<&'static str> {
    CASCADING_KINDS
        .iter()
        .find(|(g, k, _)| *g == object.group && *k == object.kind)
        .map(|(_, _, what)| *what)
}

/// On a claim a restore created and has not finished filling with its
/// volume data: a restore run again (after a failed mover, a kill) fills
/// it again before the workloads, instead of taking it for a claim that
/// was there before. Removed once the data is in.
pub const ANNOTATION_FILLING: &str = "restore.ferry.dev/volume-data";

/// What a restore keeps of an existing PersistentVolumeClaim: the data
/// source it was made from (the source only says how a new claim is
/// filled, a restore that fills it from the backup drops it or names a
/// kept snapshot, and a claim's spec cannot change) and the mark of a fill
/// still to finish. Neither is a difference to plan or a field to write.
pub(crate) fn keep_claim_restore_state(object: &ObjectRef, desired: &mut Value, live: &Value) {
    if object.kind != "PersistentVolumeClaim" || !object.group.is_empty() {
        return;
    }
    if let Some(spec) = desired.get_mut("spec").and_then(Value::as_object_mut) {
        for field in ["dataSource", "dataSourceRef"] {
            match live.pointer(&format!("/spec/{field}")) {
                Some(source) => {
                    spec.insert(field.into(), source.clone());
                }
                None => {
                    spec.remove(field);
                }
            }
        }
    }
    let filling = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_FILLING));
    if let (Some(mark), Some(meta)) = (
        filling,
        desired.get_mut("metadata").and_then(Value::as_object_mut),
    ) {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(ANNOTATION_FILLING.into(), mark.clone());
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub subset: Subset,
    /// Compiled to a first transform step with the `namespace` rule set.
    pub namespace_mapping: NamespaceMapping,
    /// Rewrites the objects on the way in, with the target's profile.
    pub transform: Option<TransformSource>,
    pub existing: ExistingPolicy,
    /// With `Recreate`: also delete and recreate objects of [`CASCADING_KINDS`].
    pub recreate_cascading: bool,
    pub concurrency: usize,
    /// Stop after the plan (and a server-side dry run).
    pub dry_run: bool,
    /// Mover Pods that fill restored claims with their volume data.
    pub mover: Option<crate::mover::MoverSettings>,
    /// Restore claims without their data.
    pub skip_volume_data: bool,
    /// The target's profile, read beforehand by a reader with wider rights
    /// than the restore's own credentials (a namespace user may not list
    /// StorageClasses; the controller may). Read through the restore's
    /// connection when unset.
    pub target_profile: Option<ClusterProfile>,
}

/// What fills the restored claims of `snapshot`, if it has volume data;
/// refuses, before anything is written, volume data `plan` cannot restore
/// into this target.
async fn volume_filler(
    conn: &Connection,
    repo: &Repository,
    plan: &RestorePlan,
    snapshot: &str,
    mapping: &NamespaceMapping,
    mover: Option<&crate::mover::MoverSettings>,
    observer: &dyn Observer,
) -> Result<Option<crate::mover::VolumeFiller>, RestoreError> {
    let (_, found) = repo.find_snapshot(snapshot).await?;
    let report = crate::snapshot::load_report(repo, &found).await?;
    if report.volumes.is_empty() {
        return Ok(None);
    }
    let filler = crate::mover::VolumeFiller {
        entries: report.volumes,
        namespaces: mapping.0.clone(),
        mover: mover.cloned(),
        label: found.name,
        progress: observer.mover_progress(),
    };
    let claims: Vec<(&ObjectRef, Action)> = plan.items().map(|i| (&i.object, i.action)).collect();
    let problems = filler.preflight(conn, &claims);
    if !problems.is_empty() {
        return Err(RestoreError::VolumeData(problems));
    }
    Ok(Some(filler))
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<Failure>,
    pub warnings: Vec<String>,
    /// Requests the restore made to the repository's storage.
    pub repository: IoStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub object: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("object {object} in the snapshot is unreadable: {message}")]
    BadObject { object: String, message: String },
    #[error("nothing to restore: the selection matches no object of snapshot {0}")]
    NothingSelected(String),
    #[error("preflight found {} problem(s); nothing was written:\n  - {}", .0.len(), .0.join("\n  - "))]
    Preflight(Vec<String>),
    #[error("the transform plan failed; nothing was written: {0}")]
    Transform(#[from] crate::transform::TransformError),
    #[error("an object the transform plan returned is not a Kubernetes object: {0}")]
    TransformedObject(String),
    #[error("the target changed since the plan was made; nothing was written. Make a new plan. Changed ({}):\n  - {}", .0.len(), .0.join("\n  - "))]
    TargetChanged(Vec<String>),
    #[error("the plan does not match the snapshot any more; nothing was written ({}):\n  - {}", .0.len(), .0.join("\n  - "))]
    PlanMismatch(Vec<String>),
    #[error("the plan is unusable: {0}")]
    BadPlan(String),
    #[error("nothing was written: {}", .0.join("; "))]
    VolumeData(Vec<String>),
}

/// Where planning learns about the target: the cluster itself, or a saved
/// profile (offline: nothing of the target is read, objects are planned as
/// absent and permissions are not checked).
pub enum TargetView<'a> {
    Cluster(&'a Connection),
    Profile(Box<ClusterProfile>),
}

/// The transform a restore runs: the namespace mapping, then the plan.
pub fn effective_transform(
    mapping: &NamespaceMapping,
    source: Option<&TransformSource>,
) -> Result<Option<TransformPlan>, RestoreError> {
    let mapped = if mapping.is_empty() {
        None
    } else {
        Some(TransformPlan::from_yaml(
            &mapping.transform_yaml(),
            "--namespace-mapping",
            None,
        )?)
    };
    let given = source
        .map(|s| TransformPlan::from_yaml(&s.text, &s.name, s.base_dir.as_deref()))
        .transpose()?;
    Ok(match (mapped, given) {
        (Some(m), Some(g)) => Some(m.then(g)),
        (m, g) => m.or(g),
    })
}

/// Runs a restore: plan and preflight, then (unless a dry run) apply.
pub async fn run(
    conn: &Connection,
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
    observer: &dyn Observer,
) -> Result<(RestorePlan, RestoreReport), RestoreError> {
    // Bodies are read until the end: prune waits meanwhile.
    let lock = repo.lock_shared().await?;
    let result = async {
        let (plan, bodies, discovery) =
            prepare::prepare(&TargetView::Cluster(conn), repo, snapshot, opts).await?;
        let mut report = RestoreReport {
            warnings: plan.warnings.clone(),
            ..Default::default()
        };
        // Volume data the restore cannot bring here is refused before any
        // write, by a dry run too.
        let filler = if opts.skip_volume_data {
            None
        } else {
            volume_filler(
                conn,
                repo,
                &plan,
                snapshot,
                &opts.namespace_mapping,
                opts.mover.as_ref(),
                observer,
            )
            .await?
        };
        if opts.dry_run {
            // The claims that would be left without their data, said now.
            if let Some(filler) = &filler {
                let items: Vec<(&ObjectRef, Action)> =
                    plan.items().map(|i| (&i.object, i.action)).collect();
                let warnings = filler
                    .dry_run_warnings(conn, &items)
                    .await
                    .map_err(|e| RestoreError::VolumeData(vec![e]))?;
                report.warnings.extend(warnings);
            }
            dry_run::server_dry_run(conn, &plan, &bodies, &mut report, discovery).await?;
        } else {
            let apply_options = apply::ApplyOptions {
                concurrency: opts.concurrency,
                saved: false,
                observer,
                after_wave: filler.as_ref().map(|f| f as &dyn AfterWave),
            };
            report = apply::apply(conn, &plan, &bodies, &apply_options, discovery).await?;
        }
        Ok::<_, RestoreError>((plan, report))
    }
    .await;
    lock.release().await?;
    let (plan, mut report) = result?;
    report.repository = repo.io_stats();
    Ok((plan, report))
}

/// The plan of a restore against the live target, after its preflight
/// (permissions included); nothing is written. [`run_saved`] applies it.
pub async fn plan(
    conn: &Connection,
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<RestorePlan, RestoreError> {
    let lock = repo.lock_shared().await?;
    let result = prepare::prepare(&TargetView::Cluster(conn), repo, snapshot, opts).await;
    lock.release().await?;
    Ok(result?.0)
}

/// The plan of a restore, made against a saved profile of the target.
pub async fn plan_offline(
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
    profile: ClusterProfile,
) -> Result<RestorePlan, RestoreError> {
    let lock = repo.lock_shared().await?;
    let result = prepare::prepare(
        &TargetView::Profile(Box::new(profile)),
        repo,
        snapshot,
        opts,
    )
    .await;
    lock.release().await?;
    Ok(result?.0)
}

/// Applies a saved plan: exactly its objects and actions, onto a target
/// that did not change since it was made.
pub async fn run_saved(
    conn: &Connection,
    repo: &Repository,
    plan: &RestorePlan,
    concurrency: usize,
    observer: &dyn Observer,
    mover: Option<&crate::mover::MoverSettings>,
) -> Result<RestoreReport, RestoreError> {
    let header = &plan.header;
    if header.format != PLAN_FORMAT {
        return Err(RestoreError::BadPlan(format!(
            "format {} is not readable by this version of ferry (it reads {PLAN_FORMAT})",
            header.format
        )));
    }
    if header.repository != repo.id() {
        return Err(RestoreError::BadPlan(format!(
            "it was made from repository {}, not from {} ({})",
            header.repository,
            repo.id(),
            repo.location()
        )));
    }
    let lock = repo.lock_shared().await?;
    let result = async {
        let loaded = load::load(repo, &header.snapshot_id, &header.subset).await?;
        let mapping = NamespaceMapping(header.namespace_mapping.clone());
        let transform = effective_transform(&mapping, header.transform.as_ref())?;
        let bodies = match transform {
            None => {
                let stored: HashMap<&ObjectRef, String> = loaded
                    .entries
                    .iter()
                    .map(|e| (&e.object, e.blob.to_string()))
                    .collect();
                let differs: Vec<String> = plan
                    .items()
                    .filter(|i| stored.get(&i.object) != i.blob.as_ref())
                    .map(|i| format!("{}: not in the snapshot as planned", i.object))
                    .collect();
                if !differs.is_empty() {
                    return Err(RestoreError::PlanMismatch(differs));
                }
                Bodies::Stored(repo.clone())
            }
            Some(transform) => {
                let discovery = discover(&conn.client).await?;
                let profile = crate::cluster::profile::read_profile(conn, &discovery).await?;
                let (held, _) = transformed(repo, &loaded.entries, transform, profile).await?;
                let planned: std::collections::BTreeSet<&ObjectRef> =
                    plan.items().map(|i| &i.object).collect();
                let produced: std::collections::BTreeSet<&ObjectRef> = held.keys().collect();
                let mut differs: Vec<String> = planned
                    .symmetric_difference(&produced)
                    .map(|o| format!("{o}: the transform now yields a different set of objects"))
                    .collect();
                // Every body is checked before the first write.
                differs.extend(
                    plan.items()
                        .filter(|i| {
                            held.get(&i.object).map(bodies::digest).as_ref() != i.digest.as_ref()
                        })
                        .filter(|i| produced.contains(&i.object))
                        .map(|i| {
                            format!(
                                "{}: the transform now yields another object than the plan shows",
                                i.object
                            )
                        }),
                );
                if !differs.is_empty() {
                    return Err(RestoreError::PlanMismatch(differs));
                }
                Bodies::Held(held)
            }
        };
        let filler = volume_filler(
            conn,
            repo,
            plan,
            &header.snapshot_id,
            &mapping,
            mover,
            observer,
        )
        .await?;
        let options = apply::ApplyOptions {
            concurrency,
            saved: true,
            observer,
            after_wave: filler.as_ref().map(|f| f as &dyn AfterWave),
        };
        apply::apply(conn, plan, &bodies, &options, None).await
    }
    .await;
    lock.release().await?;
    let mut report = result?;
    report.repository = repo.io_stats();
    Ok(report)
}

/// The selected objects of a snapshot as stored, for offline transforms.
pub async fn load_selected(
    repo: &Repository,
    snapshot: &str,
    subset: &Subset,
) -> Result<Vec<Value>, RestoreError> {
    let lock = repo.lock_shared().await?;
    let result = async {
        let loaded = load::load(repo, snapshot, subset).await?;
        read_all(repo, &loaded.entries).await
    }
    .await;
    lock.release().await?;
    result
}

/// Every body of `entries`, in their order.
async fn read_all(
    repo: &Repository,
    entries: &[crate::backup::CatalogEntry],
) -> Result<Vec<Value>, RestoreError> {
    let mut out = Vec::with_capacity(entries.len());
    bodies::for_each_stored(repo, entries, |_, value| out.push(value)).await?;
    Ok(out)
}

/// Runs the transform over every selected body, on the CPU pool.
pub(crate) async fn transformed(
    repo: &Repository,
    entries: &[crate::backup::CatalogEntry],
    transform: TransformPlan,
    profile: ClusterProfile,
) -> Result<(HashMap<ObjectRef, Value>, crate::transform::TransformOutput), RestoreError> {
    let values = read_all(repo, entries).await?;
    let transform = Arc::new(transform);
    let mut output =
        tokio::task::spawn_blocking(move || crate::transform::run(&transform, values, &profile))
            .await
            .map_err(|e| {
                RestoreError::TransformedObject(format!("the transform stopped: {e}"))
            })??;
    let mut held = HashMap::with_capacity(output.objects.len());
    for value in std::mem::take(&mut output.objects) {
        let object = ObjectRef::from_object(&value)
            .map_err(|e| RestoreError::TransformedObject(e.to_string()))?;
        held.insert(object, value);
    }
    Ok((held, output))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_existing_claim_keeps_its_data_source_and_its_fill_mark() {
        use serde_json::json;
        let claim = crate::model::ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "PersistentVolumeClaim".into(),
            namespace: Some("shop".into()),
            name: "data".into(),
        };
        let source = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"});
        let desired = json!({
            "metadata": {"name": "data", "labels": {"app": "shop"}},
            "spec": {"dataSource": source, "dataSourceRef": source, "storageClassName": "fast"}
        });
        // Filled by a restore (no source), a fill still to finish.
        let live = json!({
            "metadata": {"name": "data", "annotations": {super::ANNOTATION_FILLING: "pending"}},
            "spec": {"storageClassName": "fast", "volumeName": "pv-1"}
        });
        let mut kept = desired.clone();
        super::keep_claim_restore_state(&claim, &mut kept, &live);
        assert_eq!(
            kept,
            json!({
                "metadata": {"name": "data", "labels": {"app": "shop"},
                             "annotations": {super::ANNOTATION_FILLING: "pending"}},
                "spec": {"storageClassName": "fast"}
            })
        );
        // Made from a kept snapshot: that source stays.
        let from_kept = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "ferry-1"});
        let live = json!({"metadata": {"name": "data"}, "spec": {"dataSource": from_kept}});
        let mut kept = desired.clone();
        super::keep_claim_restore_state(&claim, &mut kept, &live);
        assert_eq!(kept["spec"]["dataSource"], from_kept);
        assert!(kept["spec"].get("dataSourceRef").is_none());
        assert!(kept["metadata"].get("annotations").is_none());
        // Other kinds are left alone.
        let config = crate::model::ObjectRef {
            kind: "ConfigMap".into(),
            ..claim
        };
        let mut untouched = desired.clone();
        super::keep_claim_restore_state(&config, &mut untouched, &live);
        assert_eq!(untouched, desired);
    }

    #[test]
    fn deleting_namespaces_crds_and_volumes_cascades_and_other_kinds_do_not() {
        let object = |group: &str, kind: &str| crate::model::ObjectRef {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            namespace: None,
            name: "x".into(),
        };
        assert!(super::cascades(&object("", "Namespace")).is_some());
        assert!(
            super::cascades(&object("apiextensions.k8s.io", "CustomResourceDefinition")).is_some()
        );
        assert!(super::cascades(&object("", "PersistentVolumeClaim")).is_some());
        assert!(super::cascades(&object("", "ConfigMap")).is_none());
        assert!(super::cascades(&object("apps", "Deployment")).is_none());
    }
}
