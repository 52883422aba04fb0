//! `ferry restore`: load ─▶ (transform) ─▶ validate ─▶ plan ─▶ apply ─▶ report.
//!
//! The restore plan is a value: waves of objects in dependency order, each
//! with the action it will get (create, update, unchanged, skip, recreate)
//! and why. Preflight checks the target before anything is written: served
//! API versions, referenced classes and CRDs, permissions for every verb the
//! plan uses (SelfSubjectAccessReview), and name collisions under the
//! existing-object policy; it reports every problem at once. Apply uses
//! server-side apply with field manager `ferry`, so a rerun converges and a
//! restore interrupted half-way finishes the job when run again.

pub mod diff;
pub mod mapping;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, PartialObjectMeta};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backup::{SnapshotContent, load_content};
use crate::cluster::capture::get_object;
use crate::cluster::discovery::{Discovery, ServedResource, discover};
use crate::cluster::{ClusterError, Connection, status_code};
use crate::model::ObjectRef;
use crate::model::edges::{Target, references};
use crate::model::select::Selection;
use crate::repo::{RepoError, Repository};
use mapping::NamespaceMapping;

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

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub selection: Selection,
    /// Single objects to restore (`Kind/namespace/name` or `Kind/name`); empty = all selected.
    pub objects: Vec<String>,
    pub mapping: NamespaceMapping,
    pub existing: ExistingPolicy,
    /// With `Recreate`: also delete and recreate objects of [`CASCADING_KINDS`].
    pub recreate_cascading: bool,
    pub concurrency: usize,
    /// Stop after the plan (and a server-side dry run).
    pub dry_run: bool,
    /// Rewrites the objects on the way in, with the target's profile.
    pub transform: Option<std::sync::Arc<crate::transform::TransformPlan>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Unchanged,
    Skip,
    Recreate,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanItem {
    /// The object as it will be named in the target.
    pub object: ObjectRef,
    pub action: Action,
    pub reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<diff::Change>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Wave {
    pub index: usize,
    pub items: Vec<PlanItem>,
}

/// The whole restore, decided before anything is written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    pub snapshot: String,
    pub target: String,
    pub waves: Vec<Wave>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cycles: Vec<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Every change the transform plan made (rule set, object, path, old → new).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<crate::transform::Change>,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub object: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicUsize,
    pub done: AtomicUsize,
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
}

/// One object on its way into the target.
#[derive(Debug, Clone)]
struct Desired {
    object: ObjectRef,
    value: Value,
    /// For an object Ferry created earlier and now updates: its managed
    /// fields with Ferry's create entry turned into an apply entry (see
    /// [`adopted_managed_fields`]), and the resourceVersion they belong to.
    adopt: Option<(Value, String)>,
}

fn gk_key(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!("{group}/{kind}/{}/{name}", namespace.unwrap_or_default())
}

/// Loads, selects and maps the snapshot's objects.
async fn load_objects(
    repo: &Repository,
    content: &SnapshotContent,
    opts: &RestoreOptions,
) -> Result<Vec<Desired>, RestoreError> {
    let wanted: BTreeSet<String> = opts
        .objects
        .iter()
        .map(|o| o.to_ascii_lowercase())
        .collect();
    let entries: Vec<_> = content
        .objects
        .iter()
        .filter(|e| {
            let o = &e.object;
            match &o.namespace {
                Some(ns) => opts.selection.namespace_selected(ns),
                None => true,
            }
        })
        .filter(|e| {
            opts.selection
                .kind_selected(&e.object.group, &e.object.kind, "")
        })
        .filter(|e| {
            wanted.is_empty() || wanted.contains(&e.object.to_string().to_ascii_lowercase())
        })
        .collect();
    let loaded: Vec<Result<Desired, RestoreError>> = futures::stream::iter(entries)
        .map(|entry| async move {
            let bytes = repo
                .read_blob(&entry.blob)
                .await
                .map_err(|e| RestoreError::BadObject {
                    object: entry.object.to_string(),
                    message: e.to_string(),
                })?;
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|e| RestoreError::BadObject {
                    object: entry.object.to_string(),
                    message: e.to_string(),
                })?;
            Ok(Desired {
                object: entry.object.clone(),
                value,
                adopt: None,
            })
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut out = Vec::with_capacity(loaded.len());
    for d in loaded {
        let mut d = d?;
        if !opts.selection.object_selected(&d.value)
            && d.object.kind != "Namespace"
            && d.object.namespace.is_some()
        {
            continue;
        }
        opts.mapping.apply(&mut d.value);
        d.object = ObjectRef::from_object(&d.value).map_err(|e| RestoreError::BadObject {
            object: d.object.to_string(),
            message: e.to_string(),
        })?;
        out.push(d);
    }
    // Keep namespaces only if something is restored into them (or they
    // were asked for), and cluster-scoped objects only as dependencies
    // of what is restored or when nothing narrows the selection.
    out.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(out)
}

/// Runs a transform plan on the CPU pool, off the async runtime.
async fn run_transform(
    plan: std::sync::Arc<crate::transform::TransformPlan>,
    objects: Vec<Desired>,
    profile: crate::profile::ClusterProfile,
) -> Result<crate::transform::TransformOutput, RestoreError> {
    let values: Vec<Value> = objects.into_iter().map(|d| d.value).collect();
    let output =
        tokio::task::spawn_blocking(move || crate::transform::run(&plan, values, &profile))
            .await
            .map_err(|e| {
                RestoreError::TransformedObject(format!("the transform stopped: {e}"))
            })??;
    Ok(output)
}

/// The selected objects of a snapshot as a restore would see them (namespace
/// mapping applied, no transform), for offline transforms.
pub async fn load_selected(
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<Vec<Value>, RestoreError> {
    let (_, objects, _) = load_snapshot(repo, snapshot, opts).await?;
    Ok(objects.into_iter().map(|d| d.value).collect())
}

/// The snapshot's name and its selected, mapped objects; never empty.
async fn load_snapshot(
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<(String, Vec<Desired>, crate::profile::ClusterProfile), RestoreError> {
    // Every body is read here, under a shared lock: prune waits meanwhile.
    let lock = repo.lock_shared().await?;
    let loaded = async {
        let (_, snap) = repo.find_snapshot(snapshot).await?;
        let content = load_content(repo, &snap).await?;
        let objects = load_objects(repo, &content, opts).await?;
        Ok::<_, RestoreError>((snap, objects, content.profile))
    }
    .await;
    lock.release().await?;
    let (snap, objects, profile) = loaded?;
    if objects.is_empty() {
        return Err(RestoreError::NothingSelected(snap.name));
    }
    Ok((snap.name, objects, profile))
}

/// Whether the caller may `verb` the resource in `namespace` (`None`: in
/// every namespace, or cluster-wide for cluster-scoped resources).
async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> Result<bool, kube::Error> {
    let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace}}
    }))
    .expect("static review");
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = api.create(&PostParams::default(), &review).await?;
    Ok(review.status.is_some_and(|s| s.allowed))
}

/// The permissions in `needed` (verb, group, resource, namespace) that the
/// caller lacks, as problems. A grant in every namespace covers each one:
/// each verb and resource is asked once without a namespace, and per
/// namespace only where that is denied, so that restoring thousands of
/// namespaces costs a few reviews, not thousands.
async fn denied(
    conn: &Connection,
    needed: BTreeSet<(String, String, String, Option<String>)>,
) -> Vec<String> {
    const AT_ONCE: usize = 16;
    let mut by_resource: BTreeMap<(String, String, String), Vec<Option<String>>> = BTreeMap::new();
    for (verb, group, resource, namespace) in needed {
        by_resource
            .entry((verb, group, resource))
            .or_default()
            .push(namespace);
    }
    let describe = |group: &str, resource: &str, namespace: Option<&str>| {
        let what = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        let scope = namespace.map_or_else(
            || " (cluster-wide)".to_string(),
            |n| format!(" in namespace {n}"),
        );
        (what, scope)
    };
    let everywhere: Vec<_> = futures::stream::iter(by_resource)
        .map(|((verb, group, resource), namespaces)| async move {
            let result = allowed(&conn.client, &verb, &group, &resource, None).await;
            (verb, group, resource, namespaces, result)
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut problems = Vec::new();
    let mut per_namespace = Vec::new();
    for (verb, group, resource, namespaces, result) in everywhere {
        match result {
            Ok(true) => {}
            Ok(false) => {
                for namespace in namespaces {
                    match namespace {
                        Some(ns) => {
                            per_namespace.push((verb.clone(), group.clone(), resource.clone(), ns))
                        }
                        None => {
                            let (what, scope) = describe(&group, &resource, None);
                            problems.push(format!("not allowed to {verb} {what}{scope}"));
                        }
                    }
                }
            }
            Err(e) => {
                let (what, _) = describe(&group, &resource, None);
                problems.push(format!("cannot check permission to {verb} {what}: {e}"));
            }
        }
    }
    let answers: Vec<Option<String>> = futures::stream::iter(per_namespace)
        .map(|(verb, group, resource, ns)| async move {
            let (what, scope) = describe(&group, &resource, Some(&ns));
            match allowed(&conn.client, &verb, &group, &resource, Some(&ns)).await {
                Ok(true) => None,
                Ok(false) => Some(format!("not allowed to {verb} {what}{scope}")),
                Err(e) => Some(format!(
                    "cannot check permission to {verb} {what}{scope}: {e}"
                )),
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    problems.extend(answers.into_iter().flatten());
    problems.sort();
    problems
}

/// Namespaces of the restore that the target does not have. A namespace
/// that does not exist holds no objects (it is removed only once it is
/// empty), so restoring into new namespaces needs one GET per namespace
/// instead of one per object. Namespaces that cannot be read count as
/// present, so that their objects are still looked up one by one.
async fn absent_namespaces(
    conn: &Connection,
    discovery: &Discovery,
    objects: &[Desired],
) -> Result<BTreeSet<String>, RestoreError> {
    let Some(resource) = discovery.by_group_kind("", "Namespace") else {
        return Ok(BTreeSet::new());
    };
    let namespaces: BTreeSet<&str> = objects
        .iter()
        .filter_map(|d| d.object.namespace.as_deref())
        .collect();
    let found: Vec<(&str, Result<Option<Value>, ClusterError>)> = futures::stream::iter(namespaces)
        .map(|ns| async move { (ns, get_object(&conn.client, resource, None, ns).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut absent = BTreeSet::new();
    for (ns, result) in found {
        match result {
            Ok(None) => {
                absent.insert(ns.to_string());
            }
            Ok(Some(_)) => {}
            Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(absent)
}

/// The first few of `items` and how many more there are: a preflight
/// message about thousands of objects must stay readable.
fn some_of(items: &[String]) -> String {
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

/// What each object needs first, within the restore set.
fn dependencies(objects: &[Desired]) -> Vec<plan::PlanInput> {
    let mut by_key: HashMap<String, &ObjectRef> = HashMap::new();
    let mut crds: HashMap<(String, String), &ObjectRef> = HashMap::new();
    for d in objects {
        by_key.insert(
            gk_key(
                &d.object.group,
                &d.object.kind,
                d.object.namespace.as_deref(),
                &d.object.name,
            ),
            &d.object,
        );
        if d.object.kind == "CustomResourceDefinition" {
            let group = d
                .value
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = d
                .value
                .pointer("/spec/names/kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            crds.insert((group.to_string(), kind.to_string()), &d.object);
        }
    }
    objects
        .iter()
        .map(|d| {
            let mut needs: Vec<ObjectRef> = Vec::new();
            if let Some(ns) = &d.object.namespace
                && let Some(n) = by_key.get(&gk_key("", "Namespace", None, ns))
            {
                needs.push((*n).clone());
            }
            if let Some(crd) = crds.get(&(d.object.group.clone(), d.object.kind.clone())) {
                needs.push((*crd).clone());
            }
            for reference in references(&d.value) {
                if !reference.kind.orders_restore() {
                    continue;
                }
                if let Target::Object {
                    group,
                    kind,
                    namespace,
                    name,
                } = &reference.target
                    && let Some(target) =
                        by_key.get(&gk_key(group, kind, namespace.as_deref(), name))
                    && **target != d.object
                {
                    needs.push((*target).clone());
                }
            }
            plan::PlanInput {
                object: d.object.clone(),
                needs,
            }
        })
        .collect()
}

fn api_resource(served: &ServedResource) -> ApiResource {
    ApiResource {
        group: served.group.clone(),
        version: served.version.clone(),
        api_version: served.api_version(),
        kind: served.kind.clone(),
        plural: served.plural.clone(),
    }
}

/// The target's resource for an object at the object's own version.
fn resource_for(discovery: &Discovery, object: &ObjectRef) -> Option<ServedResource> {
    discovery
        .by_group_kind(&object.group, &object.kind)
        .map(|r| ServedResource {
            version: object.version.clone(),
            ..r.clone()
        })
}

fn served_exactly(discovery: &Discovery, object: &ObjectRef) -> bool {
    discovery.serves(&object.api_version(), &object.kind)
}

/// Cluster-scoped classes objects refer to by name, checked in preflight.
const CLASS_REFERENCES: &[(&str, &str, &str)] = &[
    ("storage.k8s.io", "StorageClass", "storage class"),
    ("networking.k8s.io", "IngressClass", "ingress class"),
    ("scheduling.k8s.io", "PriorityClass", "priority class"),
    ("node.k8s.io", "RuntimeClass", "runtime class"),
];

struct Checked {
    plan: RestorePlan,
    desired: Vec<Vec<Desired>>,
    discovery: Discovery,
}

/// Builds the plan and runs preflight against the target. Writes nothing.
pub async fn prepare(
    conn: &Connection,
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<RestorePlan, RestoreError> {
    Ok(check(conn, repo, snapshot, opts).await?.plan)
}

async fn check(
    conn: &Connection,
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<Checked, RestoreError> {
    let (snapshot_name, mut objects, source_profile) = load_snapshot(repo, snapshot, opts).await?;
    let discovery = discover(&conn.client).await?;
    let mut problems: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut transforms = Vec::new();
    if let Some(transform) = &opts.transform {
        let profile = crate::cluster::profile::read_profile(conn, &discovery).await?;
        let output = run_transform(transform.clone(), objects, profile).await?;
        warnings.extend(output.warnings.iter().map(ToString::to_string));
        warnings.extend(output.skipped.iter().map(|s| format!("not restored: {s}")));
        transforms = output.trace;
        objects = output
            .objects
            .into_iter()
            .map(|value| {
                let object = ObjectRef::from_object(&value)
                    .map_err(|e| RestoreError::TransformedObject(e.to_string()))?;
                Ok(Desired {
                    object,
                    value,
                    adopt: None,
                })
            })
            .collect::<Result<_, RestoreError>>()?;
        objects.sort_by(|a, b| a.object.cmp(&b.object));
        if objects.is_empty() {
            return Err(RestoreError::NothingSelected(snapshot_name));
        }
    }
    // Names a mapping or transform produced: the API server would refuse
    // them one by one, after other objects were written.
    for d in &objects {
        problems.extend(crate::model::names::problems(&d.value));
    }
    let ordering = plan::order(&dependencies(&objects));
    for cycle in &ordering.cycles {
        warnings.push(format!(
            "dependency cycle {} broken",
            cycle
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" → ")
        ));
    }

    // API versions: served by the target, or a CRD in this restore serves them.
    let restored_crds: BTreeSet<(String, String, Vec<String>)> = objects
        .iter()
        .filter(|d| d.object.kind == "CustomResourceDefinition")
        .map(|d| {
            let versions = d
                .value
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .map(|vs| {
                    vs.iter()
                        .filter_map(|v| v["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (
                d.value
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                d.value
                    .pointer("/spec/names/kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                versions,
            )
        })
        .collect();
    for d in &objects {
        let o = &d.object;
        if served_exactly(&discovery, o) {
            continue;
        }
        let by_crd = restored_crds
            .iter()
            .any(|(g, k, vs)| *g == o.group && *k == o.kind && vs.contains(&o.version));
        if !by_crd {
            let served_other = discovery
                .by_group_kind(&o.group, &o.kind)
                .map(|r| r.api_version());
            problems.push(match served_other {
                Some(other) => format!(
                    "{o}: the target does not serve {} (it serves {other}); convert it with a transform (api-versions)",
                    o.api_version()
                ),
                None => format!(
                    "{o}: the target does not serve {} {} and the restore brings no CRD for it",
                    o.api_version(),
                    o.kind
                ),
            });
        }
    }

    // Referenced classes: present in the target or in the restore.
    let in_restore: BTreeSet<String> = objects
        .iter()
        .map(|d| gk_key(&d.object.group, &d.object.kind, None, &d.object.name))
        .collect();
    let mut class_checks: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    for d in &objects {
        for reference in references(&d.value) {
            if let Target::Object {
                group,
                kind,
                namespace: None,
                name,
            } = &reference.target
                && CLASS_REFERENCES
                    .iter()
                    .any(|(g, k, _)| g == group && k == kind)
                && !in_restore.contains(&gk_key(group, kind, None, name))
            {
                class_checks
                    .entry((group.clone(), kind.clone(), name.clone()))
                    .or_default()
                    .push(d.object.to_string());
            }
        }
    }
    for ((group, kind, name), users) in class_checks {
        let label = CLASS_REFERENCES
            .iter()
            .find(|(g, k, _)| *g == group && *k == kind)
            .map(|c| c.2)
            .unwrap_or("class");
        let Some(resource) = discovery.by_group_kind(&group, &kind) else {
            problems.push(format!(
                "{label} {name} (used by {}) cannot exist: the target does not serve {kind}",
                some_of(&users)
            ));
            continue;
        };
        match get_object(&conn.client, resource, None, &name).await {
            Ok(Some(_)) => {}
            // Already unresolved where the snapshot was taken: restoring
            // reproduces the source, so it is no reason to refuse.
            Ok(None) if source_profile.has_class(&kind, &name) == Some(false) => warnings.push(format!(
                "{label} {name} (used by {}) exists neither on the target nor on the source cluster of the snapshot; restored with the same unresolved reference as on the source",
                some_of(&users)
            )),
            Ok(None) => problems.push(format!(
                "{label} {name} is missing on the target (used by {}); create it, include it in the restore, or map it with a transform{}",
                some_of(&users),
                if kind == "StorageClass" { " (storage-class)" } else { "" }
            )),
            Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => {
                warnings.push(format!("cannot check that {label} {name} exists: forbidden"))
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Permissions for every verb and resource the plan uses.
    let mut needed: BTreeSet<(String, String, String, Option<String>)> = BTreeSet::new();
    // Resources of the CRDs in this restore, which the target serves only later.
    let crd_plurals: HashMap<(&str, &str), &str> = objects
        .iter()
        .filter(|c| c.object.kind == "CustomResourceDefinition")
        .filter_map(|c| {
            let text = |p: &str| c.value.pointer(p).and_then(Value::as_str);
            Some((
                (text("/spec/group")?, text("/spec/names/kind")?),
                text("/spec/names/plural")?,
            ))
        })
        .collect();
    for d in &objects {
        let plural = resource_for(&discovery, &d.object)
            .map(|r| r.plural)
            .or_else(|| {
                crd_plurals
                    .get(&(d.object.group.as_str(), d.object.kind.as_str()))
                    .map(|p| p.to_string())
            });
        let Some(plural) = plural else { continue };
        let mut verbs = vec!["get", "create", "patch"];
        if opts.existing == ExistingPolicy::Recreate {
            verbs.push("delete");
        }
        for verb in verbs {
            needed.insert((
                verb.to_string(),
                d.object.group.clone(),
                plural.clone(),
                d.object.namespace.clone(),
            ));
        }
    }
    problems.extend(denied(conn, needed).await);

    // What the target already holds.
    let absent = absent_namespaces(conn, &discovery, &objects).await?;
    let lives: Vec<Result<Option<Value>, ClusterError>> = futures::stream::iter(&objects)
        .map(|d| {
            let discovery = &discovery;
            let absent = &absent;
            async move {
                let in_absent_namespace = match &d.object.namespace {
                    Some(ns) => absent.contains(ns),
                    None => d.object.kind == "Namespace" && absent.contains(&d.object.name),
                };
                match resource_for(discovery, &d.object) {
                    Some(_) if in_absent_namespace => Ok(None),
                    Some(r) => {
                        get_object(
                            &conn.client,
                            &r,
                            d.object.namespace.as_deref(),
                            &d.object.name,
                        )
                        .await
                    }
                    None => Ok(None),
                }
            }
        })
        .buffered(16)
        .collect()
        .await;
    let mut live_by_object: HashMap<ObjectRef, Value> = HashMap::new();
    for (d, live) in objects.iter().zip(lives) {
        match live {
            Ok(Some(v)) => {
                live_by_object.insert(d.object.clone(), v);
            }
            Ok(None) => {}
            Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => {}
            Err(e) => return Err(e.into()),
        }
    }

    let mut by_object: HashMap<ObjectRef, Desired> =
        objects.into_iter().map(|d| (d.object.clone(), d)).collect();
    let mut waves = Vec::new();
    let mut desired_waves = Vec::new();
    for (index, wave) in ordering.waves.iter().enumerate() {
        let mut items = Vec::new();
        let mut desired = Vec::new();
        for object in wave {
            let mut d = by_object
                .remove(object)
                .expect("planned objects come from the set");
            let (action, reason, changes) = match (live_by_object.get(object), opts.existing) {
                (None, _) => (Action::Create, "not in the target".to_string(), Vec::new()),
                (Some(_), ExistingPolicy::Skip) => {
                    (Action::Skip, "exists; --existing skip".into(), Vec::new())
                }
                (Some(_), ExistingPolicy::Fail) => {
                    problems.push(format!(
                        "{object} already exists in the target (--existing fail)"
                    ));
                    (Action::Skip, "exists; --existing fail".into(), Vec::new())
                }
                (Some(_), ExistingPolicy::Recreate)
                    if cascades(object).is_none() || opts.recreate_cascading =>
                {
                    let reason = match cascades(object) {
                        Some(what) => {
                            warnings.push(format!(
                                "{object} will be deleted and recreated (--recreate-cascading): this deletes {what}, also what is not in the snapshot"
                            ));
                            format!(
                                "exists; --existing recreate --recreate-cascading: deletes {what}"
                            )
                        }
                        None => "exists; --existing recreate (objects it owns are kept)".into(),
                    };
                    (Action::Recreate, reason, Vec::new())
                }
                (Some(live), ExistingPolicy::Update | ExistingPolicy::Recreate) => {
                    let changes = diff::changes(&comparable(&d.value), live);
                    // A cascading object under --existing recreate is kept.
                    let kept = match cascades(object) {
                        Some(what) if opts.existing == ExistingPolicy::Recreate => format!(
                            "; kept, not recreated: deleting it would delete {what} (--recreate-cascading to delete it)"
                        ),
                        _ => String::new(),
                    };
                    if changes.is_empty() {
                        (
                            Action::Unchanged,
                            format!("the target already matches{kept}"),
                            changes,
                        )
                    } else {
                        d.adopt = adopted_managed_fields(live);
                        (
                            Action::Update,
                            format!("{} field(s) differ{kept}", changes.len()),
                            changes,
                        )
                    }
                }
            };
            items.push(PlanItem {
                object: object.clone(),
                action,
                reason,
                changes,
            });
            desired.push(d);
        }
        waves.push(Wave { index, items });
        desired_waves.push(desired);
    }
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(RestoreError::Preflight(problems));
    }
    let plan = RestorePlan {
        snapshot: snapshot_name,
        target: conn.server.clone(),
        waves,
        cycles: ordering
            .cycles
            .iter()
            .map(|c| c.iter().map(ToString::to_string).collect())
            .collect(),
        warnings,
        transforms,
    };
    Ok(Checked {
        plan,
        desired: desired_waves,
        discovery,
    })
}

/// The desired object as it compares against a live one: owner references
/// get their UIDs only at apply time, so they are left out of the diff.
fn comparable(value: &Value) -> Value {
    let mut v = value.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("ownerReferences");
    }
    v
}

/// Runs a restore: plan and preflight, then (unless a dry run) apply wave by wave.
pub async fn run(
    conn: &Connection,
    repo: &Repository,
    snapshot: &str,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<(RestorePlan, RestoreReport), RestoreError> {
    let Checked {
        plan,
        desired,
        mut discovery,
    } = check(conn, repo, snapshot, opts).await?;
    let mut report = RestoreReport {
        warnings: plan.warnings.clone(),
        ..Default::default()
    };
    if opts.dry_run {
        server_dry_run(conn, &discovery, &plan, &desired, &mut report).await;
        return Ok((plan, report));
    }
    progress.total.store(
        plan.waves.iter().map(|w| w.items.len()).sum(),
        Ordering::Relaxed,
    );
    let mut uids: HashMap<String, String> = HashMap::new();
    for (wave, objects) in plan.waves.iter().zip(desired) {
        let results: Vec<(PlanItem, Result<Option<String>, String>)> =
            futures::stream::iter(wave.items.iter().cloned().zip(objects))
                .map(|(item, d)| {
                    let discovery = &discovery;
                    let uids = &uids;
                    let progress = progress.clone();
                    async move {
                        let result = apply_one(conn, discovery, &item, d, uids).await;
                        progress.done.fetch_add(1, Ordering::Relaxed);
                        (item, result)
                    }
                })
                .buffer_unordered(opts.concurrency.max(1))
                .collect()
                .await;
        let mut gates = Vec::new();
        for (item, result) in results {
            let name = item.object.to_string();
            match result {
                Ok(uid) => {
                    if let Some(uid) = uid {
                        let o = &item.object;
                        uids.insert(
                            gk_key(&o.group, &o.kind, o.namespace.as_deref(), &o.name),
                            uid,
                        );
                    }
                    match item.action {
                        Action::Create => report.created.push(name),
                        Action::Update | Action::Recreate => report.updated.push(name),
                        Action::Unchanged => report.unchanged.push(name),
                        Action::Skip => report.skipped.push(name),
                    }
                    if matches!(
                        item.object.kind.as_str(),
                        "CustomResourceDefinition" | "Namespace"
                    ) {
                        gates.push(item.object.clone());
                    }
                }
                Err(message) => report.failed.push(Failure {
                    object: name,
                    message,
                }),
            }
        }
        if !gates.is_empty() {
            wait_ready(conn, &gates, &mut report).await;
            if gates.iter().any(|g| g.kind == "CustomResourceDefinition") {
                discovery = discover(&conn.client).await?;
            }
        }
    }
    Ok((plan, report))
}

/// Applies one object; returns its UID in the target when it was written.
async fn apply_one(
    conn: &Connection,
    discovery: &Discovery,
    item: &PlanItem,
    d: Desired,
    uids: &HashMap<String, String>,
) -> Result<Option<String>, String> {
    if matches!(item.action, Action::Skip | Action::Unchanged) {
        return Ok(None);
    }
    let Some(served) = resource_for(discovery, &d.object) else {
        return Err(format!(
            "the target does not serve {} {}",
            d.object.api_version(),
            d.object.kind
        ));
    };
    let resource = api_resource(&served);
    let api: Api<DynamicObject> = match &d.object.namespace {
        Some(ns) => Api::namespaced_with(conn.client.clone(), ns, &resource),
        None => Api::all_with(conn.client.clone(), &resource),
    };
    let mut value = d.value;
    repoint_owners(
        conn,
        discovery,
        &mut value,
        d.object.namespace.as_deref(),
        uids,
    )
    .await;
    if item.action == Action::Recreate {
        // Objects it owns are orphaned, not deleted: a recreate replaces the
        // snapshot's objects only. (Cascading kinds get here only when the
        // user asked for exactly that; their deletion cascades regardless.)
        let params = if cascades(&d.object).is_some() {
            DeleteParams::foreground()
        } else {
            DeleteParams::orphan()
        };
        match api.delete(&d.object.name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("delete before recreate: {}", api_message(&e))),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while matches!(api.get_opt(&d.object.name).await, Ok(Some(_))) {
            if tokio::time::Instant::now() > deadline {
                return Err("the old object was not deleted within 120s".into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let retry = crate::cluster::retry::RetryPolicy::default();
    let collection = served.url_path(d.object.namespace.as_deref());
    if item.action == Action::Create {
        // A plain create costs the API server about half of what an apply
        // that creates does (measured: docs/benchmarks.md). The server
        // records Ferry's fields as an update; a later restore that changes
        // the object turns that entry into an apply entry first, so that
        // fields dropped from a newer snapshot are still removed.
        // The object goes out as it is, without a copy into a typed object.
        let url = format!("{collection}?fieldManager={FIELD_MANAGER}");
        let body = serde_json::to_vec(&value).map_err(|e| format!("cannot encode: {e}"))?;
        let created = retry
            .run(|| async {
                let request = http::Request::post(&url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .map_err(kube::Error::HttpError)?;
                conn.client.request::<PartialObjectMeta>(request).await
            })
            .await;
        match created {
            Ok(o) => return Ok(o.metadata.uid),
            // Created since the plan was made: apply onto it as an update does.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api_message(&e)),
        }
    }
    if let Some((managed_fields, resource_version)) = &d.adopt {
        let patch = serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
            {"op": "replace", "path": "/metadata/managedFields", "value": managed_fields},
        ]);
        let request = http::Request::patch(format!("{collection}/{}", d.object.name))
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(patch.to_string().into_bytes())
            .map_err(|e| e.to_string())?;
        // Best effort: if the object changed meanwhile, the apply below
        // still sets every field; only a dropped field may stay behind.
        if let Err(e) = conn.client.request_text(request).await {
            tracing::info!(object = %d.object, error = %api_message(&e), "managed fields not adopted");
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&value);
    retry
        .run(|| api.patch(&d.object.name, &params, &patch))
        .await
        .map(|o| o.metadata.uid)
        .map_err(|e| api_message(&e))
}

/// The managed fields of `live` with the entry of Ferry's create
/// (manager `ferry`, operation `Update`) turned into Ferry's apply entry,
/// merged into an existing one; `None` when there is no such entry. As
/// `kubectl` does when moving to server-side apply, this makes the fields
/// Ferry created owned by its applies, so that an apply that no longer
/// sets a field removes it.
fn adopted_managed_fields(live: &Value) -> Option<(Value, String)> {
    let entries = live.pointer("/metadata/managedFields")?.as_array()?;
    let resource_version = live.pointer("/metadata/resourceVersion")?.as_str()?;
    let is = |e: &Value, operation: &str| {
        e["manager"] == FIELD_MANAGER && e["operation"] == operation && e["subresource"].is_null()
    };
    let created = entries.iter().position(|e| is(e, "Update"))?;
    let mut adopted: Vec<Value> = entries.clone();
    let mut entry = adopted.remove(created);
    match adopted.iter_mut().find(|e| is(e, "Apply")) {
        Some(applied) => merge_fields(&mut applied["fieldsV1"], &entry["fieldsV1"]),
        None => {
            entry["operation"] = Value::from("Apply");
            adopted.push(entry);
        }
    }
    Some((Value::Array(adopted), resource_version.to_string()))
}

/// Union of two `fieldsV1` trees (maps of `f:`/`k:`/`v:` keys).
fn merge_fields(into: &mut Value, from: &Value) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) else {
        return;
    };
    for (key, value) in from {
        match into.get_mut(key) {
            Some(existing) => merge_fields(existing, value),
            None => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => crate::cluster::connect::error_chain(other),
    }
}

/// Owner references carry the owner's UID, which differs in the target: use
/// the UID the owner got there, or drop the reference when the owner is not
/// in the target (the object then stands on its own, which is reported).
async fn repoint_owners(
    conn: &Connection,
    discovery: &Discovery,
    value: &mut Value,
    namespace: Option<&str>,
    uids: &HashMap<String, String>,
) {
    let Some(owners) = value
        .pointer_mut("/metadata/ownerReferences")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let mut kept = Vec::new();
    for mut owner in owners.drain(..) {
        let api_version = owner["apiVersion"].as_str().unwrap_or_default();
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let kind = owner["kind"].as_str().unwrap_or_default();
        let name = owner["name"].as_str().unwrap_or_default();
        let scoped_ns = discovery
            .by_group_kind(group, kind)
            .filter(|r| r.namespaced)
            .and(namespace);
        let uid = match uids.get(&gk_key(group, kind, scoped_ns, name)) {
            Some(uid) => Some(uid.clone()),
            None => match discovery.by_group_kind(group, kind) {
                Some(r) => get_object(&conn.client, r, scoped_ns, name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|o| {
                        o.pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .map(String::from)
                    }),
                None => None,
            },
        };
        if let Some(uid) = uid {
            owner["uid"] = Value::String(uid);
            kept.push(owner);
        }
    }
    *owners = kept;
    if owners.is_empty()
        && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.remove("ownerReferences");
    }
}

/// Waits until CRDs are Established and Namespaces Active.
async fn wait_ready(conn: &Connection, objects: &[ObjectRef], report: &mut RestoreReport) {
    let discovery = match discover(&conn.client).await {
        Ok(d) => d,
        Err(e) => {
            report
                .warnings
                .push(format!("cannot wait for readiness: {e}"));
            return;
        }
    };
    // Thousands of namespaces are checked a few at a time, not one by one.
    let not_ready: Vec<Option<String>> = futures::stream::iter(objects)
        .map(|o| {
            let discovery = &discovery;
            async move {
                let r = discovery.by_group_kind(&o.group, &o.kind)?;
                wait_until_ready(conn, r, o).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    report.warnings.extend(not_ready.into_iter().flatten());
}

/// Waits until a Namespace is Active or a CRD Established; a warning when
/// it is not after a minute.
async fn wait_until_ready(conn: &Connection, r: &ServedResource, o: &ObjectRef) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match get_object(&conn.client, r, None, &o.name).await {
            Ok(Some(v)) if o.kind == "Namespace" => {
                v.pointer("/status/phase").and_then(Value::as_str) == Some("Active")
            }
            Ok(Some(v)) => v
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                }),
            _ => false,
        };
        if ready {
            return None;
        }
        if tokio::time::Instant::now() > deadline {
            return Some(format!("{o} was not ready after 60s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks the API server to validate every write of the plan without
/// persisting it (`dryRun=All`). Objects whose namespace or CRD the restore
/// would create first cannot be checked this way and are noted.
async fn server_dry_run(
    conn: &Connection,
    discovery: &Discovery,
    plan: &RestorePlan,
    desired: &[Vec<Desired>],
    report: &mut RestoreReport,
) {
    let creates_namespaces: BTreeSet<String> = plan
        .waves
        .iter()
        .flat_map(|w| &w.items)
        .filter(|i| i.object.kind == "Namespace" && i.action == Action::Create)
        .map(|i| i.object.name.clone())
        .collect();
    for (wave, objects) in plan.waves.iter().zip(desired) {
        for (item, d) in wave.items.iter().zip(objects) {
            if !matches!(
                item.action,
                Action::Create | Action::Update | Action::Recreate
            ) {
                continue;
            }
            let waits = d
                .object
                .namespace
                .as_ref()
                .is_some_and(|n| creates_namespaces.contains(n));
            let Some(served) = resource_for(discovery, &d.object).filter(|_| !waits) else {
                continue;
            };
            let resource = api_resource(&served);
            let api: Api<DynamicObject> = match &d.object.namespace {
                Some(ns) => Api::namespaced_with(conn.client.clone(), ns, &resource),
                None => Api::all_with(conn.client.clone(), &resource),
            };
            let mut value = comparable(&d.value);
            if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("ownerReferences");
            }
            let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
            if let Err(e) = api
                .patch(&d.object.name, &params, &Patch::Apply(&value))
                .await
            {
                report.failed.push(Failure {
                    object: item.object.to_string(),
                    message: format!("server-side dry run: {}", api_message(&e)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{adopted_managed_fields, some_of};
    use serde_json::json;

    #[test]
    fn a_create_entry_becomes_the_apply_entry() {
        let live = json!({"metadata": {"resourceVersion": "42", "managedFields": [
            {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
            {"manager": "ferry", "operation": "Update", "fieldsV1": {"f:data": {"f:a": {}}}},
        ]}});
        let (fields, rv) = adopted_managed_fields(&live).expect("ferry created it");
        assert_eq!(rv, "42");
        assert_eq!(
            fields,
            json!([
                {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
                {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:a": {}}}},
            ])
        );
    }

    #[test]
    fn a_create_entry_merges_into_an_existing_apply_entry() {
        let live = json!({"metadata": {"resourceVersion": "7", "managedFields": [
            {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:b": {}}}},
            {"manager": "ferry", "operation": "Update", "fieldsV1": {"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {}}}},
        ]}});
        let (fields, _) = adopted_managed_fields(&live).expect("ferry created it");
        assert_eq!(
            fields,
            json!([
                {"manager": "ferry", "operation": "Apply", "fieldsV1": {"f:data": {"f:b": {}, "f:a": {}}, "f:metadata": {"f:labels": {}}}},
            ])
        );
    }

    #[test]
    fn objects_ferry_did_not_create_are_left_alone() {
        let applied = json!({"metadata": {"resourceVersion": "1", "managedFields": [
            {"manager": "ferry", "operation": "Apply", "fieldsV1": {}},
            {"manager": "kubectl", "operation": "Update", "fieldsV1": {}},
        ]}});
        assert_eq!(adopted_managed_fields(&applied), None);
        assert_eq!(adopted_managed_fields(&json!({"metadata": {}})), None);
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
