//! Protecting the volumes of a backup: decide each claim's method, run the
//! pre-backup hooks, snapshot or copy, run the post-backup hooks, then move
//! snapshots into the repository.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;

use super::hooks::{self, Hook, HookPhase};
use super::metadata::{self, MetadataService};
use super::pods::{self, DATA, DEVICE, MoverJob};
use super::{
    ANNOTATION_METHOD, LABEL_VOLUME_GROUP, LABEL_VOLUME_GROUP_VELERO, MoverError, MoverSettings,
    VolumeEntry, VolumeMethod, VolumePolicy, VolumeRun, csi, suffix,
};
use crate::cluster::Connection;
use crate::volume::VolumeStats;

/// A claim and what was found out about it.
struct Claim {
    namespace: String,
    name: String,
    object: PersistentVolumeClaim,
    method: VolumeMethod,
    snapshot_class: Option<String>,
    /// The CSI driver of its volume.
    driver: Option<String>,
    /// Node of a running Pod that mounts it.
    node: Option<String>,
    /// The snapshot metadata service of its driver, for a block-mode claim
    /// whose snapshot is moved: only changed blocks are read.
    metadata: Option<MetadataService>,
}

impl Claim {
    /// Whether the claim's data is taken by a CSI snapshot (and so may be
    /// part of a group snapshot).
    fn snapshotted(&self) -> bool {
        matches!(
            self.method,
            VolumeMethod::Snapshot | VolumeMethod::SnapshotMove
        )
    }
}

/// Claims of one namespace labelled into the same volume group, to be
/// snapshotted together by one VolumeGroupSnapshot.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    namespace: String,
    /// The labels that select the group's claims (and only them).
    selector: BTreeMap<String, String>,
    /// What made the group, for messages: `volume group KEY=VALUE` or
    /// `StatefulSet NAME`.
    origin: String,
    /// Made by Ferry for a StatefulSet, not asked for by a label: if the
    /// group snapshot fails, its claims are snapshotted one by one.
    automatic: bool,
    class: String,
    /// Indexes of the member claims in the protected list.
    members: Vec<usize>,
}

impl Group {
    fn describe(&self, claims: &[Claim]) -> String {
        let names: Vec<&str> = self
            .members
            .iter()
            .map(|&i| claims[i].name.as_str())
            .collect();
        format!("{}/{} ({})", self.namespace, names.join(","), self.origin)
    }
}

/// The group label of a claim: Ferry's, else Velero's.
fn group_label(claim: &PersistentVolumeClaim) -> Option<(&'static str, String)> {
    let labels = claim.metadata.labels.as_ref()?;
    [LABEL_VOLUME_GROUP, LABEL_VOLUME_GROUP_VELERO]
        .into_iter()
        .find_map(|key| {
            labels
                .get(key)
                .filter(|v| !v.is_empty())
                .map(|v| (key, v.clone()))
        })
}

/// Groups the snapshotted claims that carry a group label. A group whose
/// claims use different drivers, or whose driver has no
/// VolumeGroupSnapshotClass (`group_classes`, by driver), falls back to one
/// snapshot per claim with a warning: never silently.
fn plan_groups(
    claims: &[Claim],
    group_classes: &BTreeMap<String, Option<String>>,
    warnings: &mut Vec<String>,
) -> Vec<Group> {
    let mut by_label: BTreeMap<(String, &'static str, String), Vec<usize>> = BTreeMap::new();
    for (index, claim) in claims.iter().enumerate() {
        if !claim.snapshotted() {
            continue;
        }
        if let Some((key, value)) = group_label(&claim.object) {
            by_label
                .entry((claim.namespace.clone(), key, value))
                .or_default()
                .push(index);
        }
    }
    let mut groups = Vec::new();
    for ((namespace, key, value), members) in by_label {
        let drivers: HashSet<Option<&String>> =
            members.iter().map(|&i| claims[i].driver.as_ref()).collect();
        let class = match drivers.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(driver)] => group_classes.get(*driver).cloned().flatten().ok_or_else(|| {
                format!("CSI driver {driver} has no VolumeGroupSnapshotClass (or the cluster serves no group snapshots)")
            }),
            _ => Err("its claims use different CSI drivers".to_string()),
        };
        match class {
            Ok(class) => groups.push(Group {
                namespace,
                selector: BTreeMap::from([(key.to_string(), value.clone())]),
                origin: format!("volume group {key}={value}"),
                automatic: false,
                class,
                members,
            }),
            Err(why) => {
                let names: Vec<&str> = members.iter().map(|&i| claims[i].name.as_str()).collect();
                warnings.push(format!(
                    "volume group {key}={value} in {namespace}: {why}; claims {} are snapshotted one by one, not at one instant",
                    names.join(", ")
                ));
            }
        }
    }
    groups
}

/// A StatefulSet as far as grouping its claims goes.
struct StatefulSetClaims {
    namespace: String,
    name: String,
    /// Its selector's matchLabels: the StatefulSet controller puts them on
    /// every claim it makes from a template.
    selector: BTreeMap<String, String>,
    /// The names of its claim templates.
    templates: Vec<String>,
}

/// Whether `claim` is one a StatefulSet made from one of its templates:
/// named TEMPLATE-STATEFULSET-ORDINAL and carrying the selector's labels.
fn made_by(set: &StatefulSetClaims, claim: &Claim) -> bool {
    let labels = claim.object.metadata.labels.as_ref();
    claim.namespace == set.namespace
        && set
            .selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        && set.templates.iter().any(|template| {
            claim
                .name
                .strip_prefix(&format!("{template}-{}-", set.name))
                .is_some_and(|ordinal| {
                    !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit())
                })
        })
}

/// Groups of the snapshotted claims of each StatefulSet (two or more, one
/// driver with a group class), made without labelling anything: the group
/// snapshot selects by the StatefulSet's own selector. Claims already in a
/// labelled group (`taken`) stay there. Whether the selector selects
/// exactly these claims in the namespace is checked against the cluster
/// before a group is used.
fn plan_statefulset_groups(
    claims: &[Claim],
    sets: &[StatefulSetClaims],
    group_classes: &BTreeMap<String, Option<String>>,
    taken: &HashSet<usize>,
) -> Vec<Group> {
    let mut groups = Vec::new();
    for set in sets.iter().filter(|s| !s.selector.is_empty()) {
        let members: Vec<usize> = claims
            .iter()
            .enumerate()
            .filter(|(index, claim)| {
                !taken.contains(index) && claim.snapshotted() && made_by(set, claim)
            })
            .map(|(index, _)| index)
            .collect();
        if members.len() < 2 {
            continue;
        }
        let drivers: HashSet<Option<&String>> =
            members.iter().map(|&i| claims[i].driver.as_ref()).collect();
        let [Some(driver)] = drivers.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let Some(class) = group_classes.get(driver).cloned().flatten() else {
            continue;
        };
        groups.push(Group {
            namespace: set.namespace.clone(),
            selector: set.selector.clone(),
            origin: format!("StatefulSet {}", set.name),
            automatic: true,
            class,
            members,
        });
    }
    groups
}

/// The StatefulSets of the namespaces of `protected` whose snapshotted
/// claims may be grouped, and the group classes of their drivers; each
/// group kept only if its selector selects exactly its members in the
/// namespace (a group snapshot takes every claim its selector selects).
async fn statefulset_groups(
    client: &kube::Client,
    protected: &[Claim],
    group_classes: &mut BTreeMap<String, Option<String>>,
    taken: &HashSet<usize>,
) -> Vec<Group> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let namespaces: std::collections::BTreeSet<&String> = protected
        .iter()
        .filter(|c| c.snapshotted())
        .map(|c| &c.namespace)
        .collect();
    let mut sets = Vec::new();
    for namespace in namespaces {
        // Without permission to list StatefulSets there are no automatic
        // groups: each claim is snapshotted alone, as without this feature.
        let Ok(list) = Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .list(&Default::default())
            .await
        else {
            continue;
        };
        for set in list.items {
            let spec = set.spec;
            if spec
                .selector
                .match_expressions
                .is_some_and(|e| !e.is_empty())
            {
                continue;
            }
            sets.push(StatefulSetClaims {
                namespace: namespace.clone(),
                name: set.metadata.name.unwrap_or_default(),
                selector: spec.selector.match_labels.unwrap_or_default(),
                templates: spec
                    .volume_claim_templates
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|t| t.metadata.name)
                    .collect(),
            });
        }
    }
    for claim in protected {
        if let Some(driver) = &claim.driver
            && sets.iter().any(|s| made_by(s, claim))
            && !group_classes.contains_key(driver)
        {
            let class = csi::group_class_for(client, driver).await;
            group_classes.insert(driver.clone(), class);
        }
    }
    let mut exact = Vec::new();
    for group in plan_statefulset_groups(protected, &sets, group_classes, taken) {
        let selector = csi::label_selector(&group.selector);
        let selected = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &group.namespace)
            .list(&kube::api::ListParams::default().labels(&selector))
            .await;
        let Ok(selected) = selected else { continue };
        let mut selected: Vec<String> = selected
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        let mut members: Vec<String> = group
            .members
            .iter()
            .map(|&i| protected[i].name.clone())
            .collect();
        selected.sort();
        members.sort();
        if selected == members {
            exact.push(group);
        }
    }
    exact
}

/// Protects the data of `claims` by the policy; returns one entry per claim.
/// `previous` are the volume entries of the previous backup, whose data are
/// the parents of this one's (unchanged files are not read again).
pub async fn backup_volumes(
    conn: &Connection,
    claims: &[(String, String)],
    previous: &[VolumeEntry],
    policy: &VolumePolicy,
    mover: Option<&MoverSettings>,
    run: &VolumeRun<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<VolumeEntry>, MoverError> {
    let client = &conn.client;
    let label = run.label;
    let mut entries: Vec<VolumeEntry> = Vec::new();
    let mut protected: Vec<Claim> = Vec::new();
    let mut services: HashMap<String, Option<MetadataService>> = HashMap::new();
    let mut pods_by_namespace: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for (namespace, name) in claims {
        if !pods_by_namespace.contains_key(namespace) {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let list = pods.list(&Default::default()).await?;
            pods_by_namespace.insert(namespace.clone(), list.items);
        }
        let skipped = |method: VolumeMethod, class: Option<String>, why: String| VolumeEntry {
            namespace: namespace.clone(),
            claim: name.clone(),
            method,
            storage_class: class,
            root: None,
            snapshot: None,
            skipped: Some(why),
            stats: None,
            group: None,
            block: false,
            change_base: None,
        };
        let object = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
            .get(name)
            .await?;
        let spec = object.spec.clone().unwrap_or_default();
        let class = spec.storage_class_name.clone();
        let phase = object
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase != "Bound" {
            entries.push(skipped(
                VolumeMethod::Skip,
                class,
                format!("the claim is not bound (phase {phase}): it holds no data yet"),
            ));
            continue;
        }
        let volume = match &spec.volume_name {
            Some(v) => {
                Api::<PersistentVolume>::all(client.clone())
                    .get_opt(v)
                    .await?
            }
            None => None,
        };
        let driver = volume
            .as_ref()
            .and_then(|v| v.spec.as_ref())
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.driver.clone());
        let chosen = chosen_method(client, &object, class.as_deref(), policy).await?;
        let snapshot_class = match &driver {
            Some(d) => csi::class_for(client, d).await,
            None => None,
        };
        let unreachable = match mover {
            None => Some("no mover is configured".to_string()),
            Some(m) => m.unreachable.clone(),
        };
        let holder = exclusive_holder(&object, &pods_by_namespace[namespace]);
        let method = match resolve(
            chosen,
            snapshot_class.is_some(),
            unreachable.is_none(),
            holder.as_deref(),
        ) {
            Ok(m) => m,
            Err(why) => {
                let why = match (&unreachable, chosen) {
                    (
                        Some(u),
                        VolumeMethod::Copy | VolumeMethod::SnapshotMove | VolumeMethod::Auto,
                    ) => {
                        format!("{why} ({u})")
                    }
                    _ => why,
                };
                if chosen == VolumeMethod::Auto {
                    warnings.push(format!("volume {namespace}/{name} is not protected: {why}"));
                    entries.push(skipped(VolumeMethod::Skip, class, why));
                    continue;
                }
                return Err(MoverError::volume(namespace, name, why));
            }
        };
        if method == VolumeMethod::Skip {
            entries.push(skipped(
                VolumeMethod::Skip,
                class,
                format!("the policy says skip ({ANNOTATION_METHOD} or --volume-method)"),
            ));
            continue;
        }
        let node = pods_by_namespace[namespace]
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .find(|p| super::mounts(p, name))
            .and_then(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()));
        let metadata = match &driver {
            Some(d) if method == VolumeMethod::SnapshotMove && is_block(&object) => {
                metadata_service(client, d, mover, &mut services, warnings).await
            }
            _ => None,
        };
        protected.push(Claim {
            namespace: namespace.clone(),
            name: name.clone(),
            object,
            method,
            snapshot_class,
            driver,
            node,
            metadata,
        });
    }
    if protected.is_empty() {
        return Ok(entries);
    }

    // Hooks of the Pods that mount a protected claim.
    let mut hooked: Vec<(String, String, Vec<Hook>)> = Vec::new();
    for (namespace, pods) in &pods_by_namespace {
        for pod in pods {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let uses = protected
                .iter()
                .any(|c| &c.namespace == namespace && super::mounts(pod, &c.name));
            if !running || !uses {
                continue;
            }
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let annotations = pod.metadata.annotations.clone().unwrap_or_default();
            let mut declared =
                hooks::hooks_of(&annotations).map_err(|message| MoverError::Hook {
                    pod: format!("{namespace}/{pod_name}"),
                    hook: "annotations".into(),
                    message,
                })?;
            declared.extend(policy.extra_hooks.iter().cloned());
            if policy.hooks && !declared.is_empty() {
                hooked.push((namespace.clone(), pod_name, declared));
            }
        }
    }
    let mover = mover.cloned();
    let parents: Parents = previous
        .iter()
        .filter(|e| e.root.is_some())
        .map(|e| ((e.namespace.clone(), e.claim.clone()), e.clone()))
        .collect();

    let mut group_classes: BTreeMap<String, Option<String>> = BTreeMap::new();
    for claim in &protected {
        if let Some(driver) = &claim.driver
            && group_label(&claim.object).is_some()
            && !group_classes.contains_key(driver)
        {
            let class = csi::group_class_for(client, driver).await;
            group_classes.insert(driver.clone(), class);
        }
    }
    let mut groups = plan_groups(&protected, &group_classes, warnings);
    if policy.auto_groups {
        let labelled: HashSet<usize> = groups
            .iter()
            .flat_map(|g| g.members.iter().copied())
            .collect();
        groups.extend(statefulset_groups(client, &protected, &mut group_classes, &labelled).await);
    }
    if let Some(progress) = run.progress {
        let moved = protected
            .iter()
            .filter(|c| matches!(c.method, VolumeMethod::Copy | VolumeMethod::SnapshotMove))
            .count();
        progress.volumes_total.fetch_add(moved, Ordering::Relaxed);
    }
    let mut grouped: HashSet<usize> = groups
        .iter()
        .flat_map(|g| g.members.iter().copied())
        .collect();
    let timeout = mover
        .as_ref()
        .map_or(std::time::Duration::from_secs(600), |m| m.timeout);

    run_hooks(client, &hooked, HookPhase::Pre, warnings).await?;
    // Snapshots and live copies happen while the application is quiesced;
    // each group first, at one instant for all its claims.
    let mut taken: Vec<Option<Taken>> = (0..protected.len()).map(|_| None).collect();
    let mut failure = None;
    let mut taken_groups: Vec<(&Group, String)> = Vec::new();
    for group in &groups {
        let names: Vec<String> = group
            .members
            .iter()
            .map(|&i| protected[i].name.clone())
            .collect();
        let name = format!(
            "ferry-{}",
            suffix(&[label, &group.namespace, &group.origin])
        );
        let request = csi::GroupRequest {
            namespace: &group.namespace,
            selector: &group.selector,
            class: &group.class,
            claims: &names,
        };
        match csi::take_group(client, &request, &name, label, timeout).await {
            Ok(mut members) => {
                for &index in &group.members {
                    let mut kept = members
                        .remove(&protected[index].name)
                        .expect("take_group returns every claim");
                    kept.server = conn.server.clone();
                    taken[index] = Some(Taken::Snapshot(Box::new(kept)));
                }
                taken_groups.push((group, name));
            }
            Err(message) if group.automatic => {
                // Ferry chose this group: its claims still get their
                // snapshots, one by one.
                warnings.push(format!(
                    "volume group of {}: {message}; its claims are snapshotted one by one, not at one instant",
                    group.describe(&protected)
                ));
                for index in &group.members {
                    grouped.remove(index);
                }
            }
            Err(message) => {
                failure = Some(MoverError::Volume {
                    volume: group.describe(&protected),
                    message,
                });
                break;
            }
        }
    }
    let first: Vec<Result<(usize, Taken), MoverError>> = if failure.is_some() {
        Vec::new()
    } else {
        futures::stream::iter(
            protected
                .iter()
                .enumerate()
                .filter(|(index, _)| !grouped.contains(index)),
        )
        .map(|(index, claim)| {
            let mover = mover.as_ref();
            let parents = &parents;
            async move {
                let taken = first_step(conn, claim, mover, parents, run).await;
                taken.map(|t| (index, t))
            }
        })
        .buffer_unordered(mover.as_ref().map_or(4, |m| m.concurrency.max(1)))
        .collect()
        .await
    };
    // The application resumes even if a snapshot failed.
    let post = run_hooks(client, &hooked, HookPhase::Post, warnings).await;
    for result in first {
        match result {
            Ok((index, t)) => taken[index] = Some(t),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        for t in taken.iter().flatten() {
            if let Taken::Snapshot(s) = t
                && s.group.is_none()
                && let Some((ns, name)) = s.volume_snapshot.split_once('/')
            {
                csi::delete(client, ns, name).await;
            }
        }
        for (group, name) in &taken_groups {
            csi::delete_group(client, &group.namespace, name).await;
        }
        return Err(e);
    }
    post?;

    let moved: Vec<Result<(VolumeEntry, Vec<String>), MoverError>> =
        futures::stream::iter(protected.iter().zip(taken))
            .map(|(claim, taken)| {
                let mover = mover.as_ref();
                let parents = &parents;
                async move {
                    second_step(
                        conn,
                        claim,
                        taken.expect("every claim was taken"),
                        mover,
                        parents,
                        run,
                    )
                    .await
                }
            })
            .buffer_unordered(mover.as_ref().map_or(4, |m| m.concurrency.max(1)))
            .collect()
            .await;
    // A group whose members were all moved is deleted whole (members cannot
    // go one by one); one with a kept member stays as the recovery point.
    for (group, name) in &taken_groups {
        let kept = group
            .members
            .iter()
            .any(|&i| protected[i].method == VolumeMethod::Snapshot);
        if !kept {
            csi::delete_group(client, &group.namespace, name).await;
        }
    }
    if moved.iter().any(|m| m.is_err()) {
        // No snapshot will name the bases kept so far: release them now
        // rather than leave them to a sweep.
        let bases: Vec<super::KeptSnapshot> = moved
            .iter()
            .flatten()
            .filter_map(|(entry, _)| entry.change_base.clone())
            .collect();
        for base in &bases {
            let _ = csi::release(client, base).await;
        }
    }
    for result in moved {
        let (entry, said) = result?;
        warnings.extend(said);
        entries.push(entry);
    }
    entries.sort_by(|a, b| (&a.namespace, &a.claim).cmp(&(&b.namespace, &b.claim)));
    Ok(entries)
}

/// The method asked for: the claim's annotation, its class's annotation,
/// the per-class policy, the default.
async fn chosen_method(
    client: &kube::Client,
    claim: &PersistentVolumeClaim,
    class: Option<&str>,
    policy: &VolumePolicy,
) -> Result<VolumeMethod, MoverError> {
    let name = format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    );
    let parse = |value: &str, on: &str| {
        value
            .parse::<VolumeMethod>()
            .map_err(|e| MoverError::Volume {
                volume: name.clone(),
                message: format!("annotation {ANNOTATION_METHOD} on {on}: {e}"),
            })
    };
    if let Some(v) = claim
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_METHOD))
    {
        return parse(v, "the claim");
    }
    if let Some(class) = class {
        if let Some(sc) = Api::<StorageClass>::all(client.clone())
            .get_opt(class)
            .await?
            && let Some(v) = sc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_METHOD))
        {
            return parse(v, &format!("StorageClass {class}"));
        }
        if let Some(m) = policy.per_class.get(class) {
            return Ok(*m);
        }
    }
    Ok(policy.default)
}

/// The Pod that holds a `ReadWriteOncePod` claim ([`super::holders`]). No
/// other Pod (a mover included) can mount the claim while it runs; the
/// scheduler would hold a mover Pending until the mover's timeout.
fn exclusive_holder(claim: &PersistentVolumeClaim, pods: &[Pod]) -> Option<String> {
    let exclusive = claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|modes| modes.iter().any(|m| m == "ReadWriteOncePod"));
    if !exclusive {
        return None;
    }
    let name = claim.metadata.name.as_deref()?;
    super::holders(pods, name).next().map(str::to_string)
}

/// The method to use, given what the cluster and the repository allow.
/// `holder` is the Pod that holds the claim alone (`ReadWriteOncePod`),
/// which rules out copying it live.
pub(super) fn resolve(
    chosen: VolumeMethod,
    has_snapshot_class: bool,
    repository_reachable: bool,
    holder: Option<&str>,
) -> Result<VolumeMethod, String> {
    let no_class = "its CSI driver has no VolumeSnapshotClass";
    let unreachable = "mover Pods cannot reach the repository";
    let held = |pod: &str| {
        let instead = if has_snapshot_class {
            "method snapshot-move copies a snapshot of it instead"
        } else {
            "scale the workload down for the backup, or give the CSI driver a VolumeSnapshotClass"
        };
        format!(
            "the claim is ReadWriteOncePod and Pod {pod} holds it, so no mover Pod can mount it \
             to copy it live; {instead}"
        )
    };
    match chosen {
        VolumeMethod::Auto => match (has_snapshot_class, repository_reachable, holder) {
            (true, true, _) => Ok(VolumeMethod::SnapshotMove),
            (true, false, _) => Ok(VolumeMethod::Snapshot),
            (false, true, Some(pod)) => Err(format!("{no_class}, and {}", held(pod))),
            (false, true, None) => Ok(VolumeMethod::Copy),
            (false, false, _) => Err(format!("{no_class} and {unreachable}")),
        },
        VolumeMethod::Snapshot if !has_snapshot_class => Err(no_class.into()),
        VolumeMethod::SnapshotMove if !has_snapshot_class => Err(no_class.into()),
        VolumeMethod::SnapshotMove | VolumeMethod::Copy if !repository_reachable => {
            Err(unreachable.into())
        }
        VolumeMethod::Copy if holder.is_some() => Err(held(holder.unwrap_or_default())),
        other => Ok(other),
    }
}

async fn run_hooks(
    client: &kube::Client,
    hooked: &[(String, String, Vec<Hook>)],
    phase: HookPhase,
    warnings: &mut Vec<String>,
) -> Result<(), MoverError> {
    for (namespace, pod, hooks) in hooked {
        for hook in hooks.iter().filter(|h| h.phase == phase) {
            if let Some(warning) = hooks::run(client, namespace, pod, hook).await? {
                warnings.push(warning);
            }
        }
    }
    Ok(())
}

enum Taken {
    Snapshot(Box<super::KeptSnapshot>),
    Copied(Box<VolumeEntry>),
}

async fn first_step(
    conn: &Connection,
    claim: &Claim,
    mover: Option<&MoverSettings>,
    parents: &Parents,
    run: &VolumeRun<'_>,
) -> Result<Taken, MoverError> {
    let label = run.label;
    let fail = |m: String| MoverError::volume(&claim.namespace, &claim.name, m);
    match claim.method {
        VolumeMethod::Snapshot | VolumeMethod::SnapshotMove => {
            let name = format!("ferry-{}", suffix(&[label, &claim.namespace, &claim.name]));
            let timeout = mover.map_or(std::time::Duration::from_secs(600), |m| m.timeout);
            let mut kept = csi::take(
                &conn.client,
                &claim.namespace,
                &claim.name,
                claim.snapshot_class.as_deref().expect("a class was found"),
                &name,
                label,
                timeout,
            )
            .await
            .map_err(fail)?;
            kept.server = conn.server.clone();
            Ok(Taken::Snapshot(Box::new(kept)))
        }
        VolumeMethod::Copy => {
            let mover = mover.expect("copy needs a mover");
            let (entry, _) = move_claim(
                conn,
                claim,
                &claim.name,
                claim.node.clone(),
                false,
                mover,
                parents,
                run,
                None,
            )
            .await
            .map_err(fail)?;
            Ok(Taken::Copied(Box::new(entry)))
        }
        VolumeMethod::Auto | VolumeMethod::Skip => unreachable!("resolved before"),
    }
}

async fn second_step(
    conn: &Connection,
    claim: &Claim,
    taken: Taken,
    mover: Option<&MoverSettings>,
    parents: &Parents,
    run: &VolumeRun<'_>,
) -> Result<(VolumeEntry, Vec<String>), MoverError> {
    let (label, repository_id) = (run.label, run.repository_id);
    let fail = |m: String| MoverError::volume(&claim.namespace, &claim.name, m);
    let kept = match taken {
        Taken::Copied(entry) => return Ok((*entry, Vec::new())),
        Taken::Snapshot(kept) => *kept,
    };
    let (_, snapshot_name) = kept
        .volume_snapshot
        .split_once('/')
        .expect("namespace/name");
    let snapshot_name = snapshot_name.to_string();
    if claim.method == VolumeMethod::Snapshot {
        if let Some(group) = &kept.group {
            csi::retain_group(&conn.client, &group.content, repository_id)
                .await
                .map_err(fail)?;
        }
        csi::retain(&conn.client, &kept.content, repository_id)
            .await
            .map_err(fail)?;
        return Ok((
            VolumeEntry {
                namespace: claim.namespace.clone(),
                claim: claim.name.clone(),
                method: VolumeMethod::Snapshot,
                storage_class: class_of(&claim.object),
                root: None,
                group: kept.group.as_ref().map(|g| g.volume_group_snapshot.clone()),
                snapshot: Some(kept),
                skipped: None,
                stats: None,
                block: is_block(&claim.object),
                change_base: None,
            },
            Vec::new(),
        ));
    }
    let mover = mover.expect("snapshot-move needs a mover");
    let clone = format!("ferry-{}", suffix(&[label, &claim.name, "clone"]));
    // A single snapshot of a block volume whose driver tracks changed
    // blocks is kept as the next backup's base (a group's members cannot
    // outlive their group).
    let tracked = claim
        .metadata
        .as_ref()
        .filter(|_| kept.group.is_none())
        .map(|service| Tracked {
            service: service.clone(),
            snapshot: snapshot_name.clone(),
            content: kept.content.clone(),
            driver: kept.driver.clone(),
            server: conn.server.clone(),
        });
    let result = async {
        csi::claim_from_snapshot(
            &conn.client,
            &claim.namespace,
            &claim.object,
            &snapshot_name,
            kept.restore_size.as_deref(),
            &clone,
            label,
        )
        .await?;
        move_claim(
            conn,
            claim,
            &clone,
            None,
            true,
            mover,
            parents,
            run,
            tracked.as_ref(),
        )
        .await
    }
    .await;
    csi::delete_claim(&conn.client, &claim.namespace, &clone).await;
    let mut base = None;
    let mut said = Vec::new();
    if result.is_ok() && tracked.is_some() {
        match csi::retain(&conn.client, &kept.content, repository_id).await {
            Ok(()) => base = Some(kept.clone()),
            Err(e) => said.push(format!(
                "volume {}/{}: its snapshot is not kept as the base of the next backup's changed-block tracking: {e}",
                claim.namespace, claim.name
            )),
        }
    }
    if kept.group.is_none() && base.is_none() {
        csi::delete(&conn.client, &claim.namespace, &snapshot_name).await;
    }
    let (mut entry, mover_said) = result.map_err(fail)?;
    said.extend(mover_said);
    entry.method = VolumeMethod::SnapshotMove;
    entry.group = kept.group.map(|g| g.volume_group_snapshot);
    entry.change_base = base;
    Ok((entry, said))
}

/// The previous backup's volumes, by namespace and claim.
type Parents = HashMap<(String, String), VolumeEntry>;

/// A block volume's snapshot whose changes the driver's snapshot metadata
/// service reports.
struct Tracked {
    service: MetadataService,
    /// The VolumeSnapshot the mover's device was made from, and its
    /// VolumeSnapshotContent.
    snapshot: String,
    content: String,
    driver: String,
    /// The API server of the cluster.
    server: String,
}

/// The snapshot metadata service of `driver`, looked up once per backup;
/// `None` (with a warning saying why, where there is one) when the
/// driver has none or movers cannot use it.
async fn metadata_service(
    client: &kube::Client,
    driver: &str,
    mover: Option<&MoverSettings>,
    services: &mut HashMap<String, Option<MetadataService>>,
    warnings: &mut Vec<String>,
) -> Option<MetadataService> {
    if let Some(known) = services.get(driver) {
        return known.clone();
    }
    let found = match metadata::service_for(client, driver).await {
        Ok(found) => found,
        Err(e) => {
            warnings.push(format!(
                "changed-block tracking is not used for driver {driver}: {e}"
            ));
            None
        }
    };
    let usable = match (
        found,
        mover.and_then(|m| m.snapshot_metadata_account.as_ref()),
    ) {
        (Some(_), None) => {
            warnings.push(format!(
                "CSI driver {driver} reports changed blocks (SnapshotMetadataService), but no ServiceAccount is set to ask it with: block volumes are read whole; set --snapshot-metadata-account NAMESPACE/NAME (one that may get VolumeSnapshots)"
            ));
            None
        }
        (found, _) => found,
    };
    services.insert(driver.to_string(), usable.clone());
    usable
}

fn is_block(claim: &PersistentVolumeClaim) -> bool {
    claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

fn class_of(claim: &PersistentVolumeClaim) -> Option<String> {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
}

/// Runs a mover Pod over `mount` (the claim itself, or a claim made from
/// its snapshot) and returns the volume's entry.
#[allow(clippy::too_many_arguments)]
async fn move_claim(
    conn: &Connection,
    claim: &Claim,
    mount: &str,
    node: Option<String>,
    from_snapshot: bool,
    mover: &MoverSettings,
    parents: &Parents,
    run: &VolumeRun<'_>,
    tracked: Option<&Tracked>,
) -> Result<(VolumeEntry, Vec<String>), String> {
    let block = is_block(&claim.object);
    let mut args: Vec<String> = [
        "volume",
        "backup",
        if block { DEVICE } else { DATA },
        "--root-only",
        "--source",
        &format!("{}/{}", claim.namespace, claim.name),
        "-o",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if from_snapshot && !block {
        // A volume made from a snapshot has new inodes and change times.
        args.push("--ignore-inode".into());
    }
    let parent = parents.get(&(claim.namespace.clone(), claim.name.clone()));
    let mut env = Vec::new();
    let mut secret = Vec::new();
    let mut said = Vec::new();
    if !block {
        if let Some(root) = parent.and_then(|p| p.root) {
            args.extend(["--parent-root".into(), root.to_string()]);
        }
    } else if let Some(tracked) = tracked {
        // A device is read whole (its chunks deduplicate), unless the
        // driver reports what changed since the parent's kept snapshot,
        // or, for the first backup, which blocks hold data.
        match changed_block_args(conn, mover, tracked, parent, &claim.namespace).await {
            Ok((more_args, token, note)) => {
                args.extend(more_args);
                said.extend(
                    note.map(|n| format!("volume {}/{}: {n}", claim.namespace, claim.name)),
                );
                env.push((
                    metadata::CA_ENV.to_string(),
                    String::from_utf8_lossy(&tracked.service.ca_cert).into_owned(),
                ));
                secret.push((metadata::TOKEN_ENV.to_string(), token.into_bytes()));
            }
            Err(e) => said.push(format!(
                "volume {}/{}: changed-block tracking is not used, the whole device is read: {e}",
                claim.namespace, claim.name
            )),
        }
    }
    let result = pods::run(
        &conn.client,
        mover,
        MoverJob {
            namespace: &claim.namespace,
            claim: mount,
            read_only: true,
            block,
            node,
            args,
            label: run.label,
            progress: run.progress.map(|p| p.track()),
            env,
            secret,
        },
    )
    .await;
    if let Some(progress) = run.progress {
        progress.volumes_done.fetch_add(1, Ordering::Relaxed);
    }
    let result = result?;
    let root = result["root"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| format!("the mover's result names no volume root: {result}"))?;
    let stats: Option<VolumeStats> = serde_json::from_value(result["stats"].clone()).ok();
    let volume = format!("volume {}/{}", claim.namespace, claim.name);
    said.extend(
        result["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str())
            .map(|w| format!("{volume}: {w}")),
    );
    Ok((
        VolumeEntry {
            namespace: claim.namespace.clone(),
            claim: claim.name.clone(),
            method: VolumeMethod::Copy,
            storage_class: class_of(&claim.object),
            root: Some(root),
            snapshot: None,
            skipped: None,
            stats,
            group: None,
            block,
            change_base: None,
        },
        said,
    ))
}

/// Whether two snapshot contents are of the same volume. A claim deleted
/// and made again (a restore, say) has a new volume: the base of the old
/// one says nothing of what changed in it, whatever a driver would answer.
async fn same_volume(client: &kube::Client, base: &str, current: &str) -> bool {
    let (Some(a), Some(b)) = (
        csi::source_volume(client, base).await,
        csi::source_volume(client, current).await,
    ) else {
        return false;
    };
    a == b
}

/// The mover's arguments and token to ask the snapshot metadata service
/// which blocks to read: those changed since the parent's kept snapshot
/// where it kept one of this volume here, else those that hold data (and
/// then a note why, when the parent's base could not serve).
async fn changed_block_args(
    conn: &Connection,
    mover: &MoverSettings,
    tracked: &Tracked,
    parent: Option<&VolumeEntry>,
    namespace: &str,
) -> Result<(Vec<String>, String, Option<String>), String> {
    let account = mover
        .snapshot_metadata_account
        .as_ref()
        .ok_or("no ServiceAccount is set to ask the driver with")?;
    let token = metadata::token(&conn.client, account, &tracked.service.audience).await?;
    let mut args = vec![
        "--snapshot-metadata".to_string(),
        tracked.service.address.clone(),
        "--target-snapshot".into(),
        format!("{namespace}/{}", tracked.snapshot),
    ];
    let mut note = None;
    if let Some(parent) = parent
        && let (Some(base), Some(root)) = (&parent.change_base, parent.root)
        && base.server == tracked.server
        && base.driver == tracked.driver
        && !base.handle.is_empty()
    {
        if same_volume(&conn.client, &base.content, &tracked.content).await {
            args.extend([
                "--parent-root".into(),
                root.to_string(),
                "--base-snapshot-handle".into(),
                base.handle.clone(),
            ]);
        } else {
            note = Some(format!(
                "the previous backup's base snapshot (VolumeSnapshotContent {}) is gone or of another volume: the blocks in use are read instead",
                base.content
            ));
        }
    }
    Ok((args, token, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, method: VolumeMethod, driver: &str, labels: &[(&str, &str)]) -> Claim {
        let object: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                             .collect::<BTreeMap<_, _>>()}
        }))
        .unwrap();
        Claim {
            namespace: "shop".into(),
            name: name.into(),
            object,
            method,
            snapshot_class: Some("snap".into()),
            driver: Some(driver.into()),
            node: None,
            metadata: None,
        }
    }

    #[test]
    fn labelled_snapshotted_claims_form_groups_and_every_fallback_is_said() {
        use VolumeMethod::*;
        let claims = vec![
            claim("a", SnapshotMove, "csi-1", &[(LABEL_VOLUME_GROUP, "db")]),
            claim("b", Snapshot, "csi-1", &[(LABEL_VOLUME_GROUP, "db")]),
            // Velero's label makes its own group.
            claim(
                "c",
                SnapshotMove,
                "csi-1",
                &[(LABEL_VOLUME_GROUP_VELERO, "db")],
            ),
            // A copied claim is never part of a snapshot group.
            claim("d", Copy, "csi-1", &[(LABEL_VOLUME_GROUP, "db")]),
            claim("e", SnapshotMove, "csi-1", &[]),
            // A group across drivers cannot be one group snapshot.
            claim("f", SnapshotMove, "csi-1", &[(LABEL_VOLUME_GROUP, "mixed")]),
            claim("g", SnapshotMove, "csi-2", &[(LABEL_VOLUME_GROUP, "mixed")]),
            // A driver without a group class.
            claim("h", SnapshotMove, "csi-3", &[(LABEL_VOLUME_GROUP, "logs")]),
        ];
        let classes: BTreeMap<String, Option<String>> = [
            ("csi-1".to_string(), Some("group".to_string())),
            ("csi-2".to_string(), Some("group".to_string())),
            ("csi-3".to_string(), None),
        ]
        .into();
        let mut warnings = Vec::new();
        let groups = plan_groups(&claims, &classes, &mut warnings);
        let members: Vec<(&str, Vec<usize>)> = groups
            .iter()
            .map(|g| (g.origin.as_str(), g.members.clone()))
            .collect();
        assert_eq!(
            members,
            vec![
                ("volume group ferry.dev/volume-group=db", vec![0, 1]),
                ("volume group velero.io/volume-group=db", vec![2]),
            ]
        );
        assert_eq!(
            groups[1].selector,
            BTreeMap::from([(LABEL_VOLUME_GROUP_VELERO.to_string(), "db".to_string())])
        );
        assert_eq!(groups[0].class, "group");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("different CSI drivers") && w.contains("claims f, g")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("csi-3 has no VolumeGroupSnapshotClass")
                    && w.contains("claims h")),
            "{warnings:?}"
        );
        assert_eq!(
            groups[0].describe(&claims),
            "shop/a,b (volume group ferry.dev/volume-group=db)"
        );
    }

    #[test]
    fn a_statefulsets_snapshotted_claims_form_a_group_by_its_own_selector() {
        use VolumeMethod::*;
        let app = [("app", "db")];
        let claims = vec![
            claim("data-db-0", SnapshotMove, "csi-1", &app),
            claim("wal-db-0", SnapshotMove, "csi-1", &app),
            claim("data-db-1", Snapshot, "csi-1", &app),
            // Copied, not snapshotted: not in the group.
            claim("logs-db-0", Copy, "csi-1", &app),
            // Not made by the StatefulSet: another name, or no selector labels.
            claim("data-db-x", SnapshotMove, "csi-1", &app),
            claim("wal-db-1", SnapshotMove, "csi-1", &[]),
            // Another StatefulSet with one claim only: no group.
            claim("data-cache-0", SnapshotMove, "csi-1", &[("app", "cache")]),
            // A StatefulSet whose claims span drivers: no group.
            claim("a-web-0", SnapshotMove, "csi-1", &[("app", "web")]),
            claim("b-web-0", SnapshotMove, "csi-2", &[("app", "web")]),
        ];
        let set = |name: &str, app: &str, templates: &[&str]| StatefulSetClaims {
            namespace: "shop".into(),
            name: name.into(),
            selector: BTreeMap::from([("app".to_string(), app.to_string())]),
            templates: templates.iter().map(|t| t.to_string()).collect(),
        };
        let sets = [
            set("db", "db", &["data", "wal", "logs"]),
            set("cache", "cache", &["data"]),
            set("web", "web", &["a", "b"]),
        ];
        let classes: BTreeMap<String, Option<String>> = [
            ("csi-1".to_string(), Some("group".to_string())),
            ("csi-2".to_string(), Some("group".to_string())),
        ]
        .into();
        let groups = plan_statefulset_groups(&claims, &sets, &classes, &HashSet::new());
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(groups[0].members, vec![0, 1, 2]);
        assert!(groups[0].automatic);
        assert_eq!(
            groups[0].describe(&claims),
            "shop/data-db-0,wal-db-0,data-db-1 (StatefulSet db)"
        );
        // Claims in a labelled group stay there.
        let labelled = HashSet::from([1, 2]);
        assert!(plan_statefulset_groups(&claims, &sets, &classes, &labelled).is_empty());
        // No group class for the driver: no group.
        let none: BTreeMap<String, Option<String>> = [("csi-1".to_string(), None)].into();
        assert!(plan_statefulset_groups(&claims, &sets, &none, &HashSet::new()).is_empty());
    }

    #[test]
    fn auto_prefers_moving_a_snapshot_and_never_silently_skips_an_explicit_choice() {
        use VolumeMethod::*;
        assert_eq!(resolve(Auto, true, true, None), Ok(SnapshotMove));
        assert_eq!(resolve(Auto, true, false, None), Ok(Snapshot));
        assert_eq!(resolve(Auto, false, true, None), Ok(Copy));
        assert!(resolve(Auto, false, false, None).is_err());
        assert!(
            resolve(SnapshotMove, false, true, None)
                .unwrap_err()
                .contains("VolumeSnapshotClass")
        );
        assert!(
            resolve(Copy, true, false, None)
                .unwrap_err()
                .contains("cannot reach")
        );
        assert_eq!(resolve(Copy, false, true, None), Ok(Copy));
        assert_eq!(resolve(Skip, false, false, None), Ok(Skip));
    }

    #[test]
    fn a_claim_one_pod_holds_alone_is_never_copied_live() {
        use VolumeMethod::*;
        // A snapshot does not need the claim mounted.
        assert_eq!(resolve(Auto, true, true, Some("db-0")), Ok(SnapshotMove));
        assert_eq!(
            resolve(SnapshotMove, true, true, Some("db-0")),
            Ok(SnapshotMove)
        );
        let asked = resolve(Copy, true, true, Some("db-0")).unwrap_err();
        assert!(
            asked.contains("ReadWriteOncePod") && asked.contains("Pod db-0"),
            "{asked}"
        );
        assert!(asked.contains("snapshot-move"), "{asked}");
        let auto = resolve(Auto, false, true, Some("db-0")).unwrap_err();
        assert!(
            auto.contains("no VolumeSnapshotClass") && auto.contains("scale the workload down"),
            "{auto}"
        );
        assert_eq!(resolve(Copy, false, true, None), Ok(Copy));
    }

    fn pod_mounting(name: &str, claim: &str, node: Option<&str>, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "main", "image": "busybox"}],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}],
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn the_holder_of_a_read_write_once_pod_claim_is_a_placed_unfinished_pod() {
        let claim = |modes: &[&str]| -> PersistentVolumeClaim {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "data", "namespace": "shop"},
                "spec": {"accessModes": modes},
            }))
            .unwrap()
        };
        let pods = vec![
            pod_mounting("done", "data", Some("n1"), "Succeeded"),
            pod_mounting("unplaced", "data", None, "Pending"),
            pod_mounting("other", "logs", Some("n1"), "Running"),
            pod_mounting("db-0", "data", Some("n1"), "Running"),
        ];
        let exclusive = claim(&["ReadWriteOncePod"]);
        assert_eq!(exclusive_holder(&exclusive, &pods).as_deref(), Some("db-0"));
        assert_eq!(exclusive_holder(&exclusive, &pods[..3]), None);
        // A starting Pod already placed on its node holds the claim too.
        let starting = vec![pod_mounting("db-0", "data", Some("n1"), "Pending")];
        assert_eq!(
            exclusive_holder(&exclusive, &starting).as_deref(),
            Some("db-0")
        );
        assert_eq!(exclusive_holder(&claim(&["ReadWriteOnce"]), &pods), None);
    }
}
