//! Volume data in the cluster: which method protects each
//! PersistentVolumeClaim, application-consistency hooks, CSI snapshots, and
//! mover Pods (the Ferry image running `ferry volume`) that copy a volume's
//! files into the repository and back.
//!
//! Mover Pods write to the repository themselves, so the repository must be
//! one the cluster reaches (S3); its location and key reach them through a
//! Secret that lives only as long as the Pod. The CLI never reads volume
//! data: it references what the movers stored (their volume roots) in the
//! application snapshot, which it writes last, while holding a lock that
//! keeps prune from deleting the movers' packs in between.

mod backup;
mod csi;
mod hooks;
pub mod metadata;
mod pods;
mod restore;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use serde_json::json;

use crate::repo::BlobId;
use crate::volume::{VolumeProgress, VolumeStats};

pub use backup::backup_volumes;
pub use hooks::{Hook, HookPhase, OnError, hooks_of};
pub use restore::VolumeFiller;

/// Whether `pod` mounts the claim `claim` of its namespace.
pub(crate) fn mounts(pod: &k8s_openapi::api::core::v1::Pod, claim: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|volumes| {
            volumes.iter().any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
            })
        })
}

/// The Pods that hold the claim `claim`: placed on a node, not finished,
/// mounting it. A `ReadWriteOncePod` claim admits no other Pod while one
/// holds it, and a claim being deleted waits for them
/// (`kubernetes.io/pvc-protection`); an unplaced Pod holds nothing (the
/// kubelet never starts a Pod on a claim being deleted).
pub(crate) fn holders<'a>(
    pods: &'a [k8s_openapi::api::core::v1::Pod],
    claim: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    pods.iter()
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(move |p| mounts(p, claim))
        .filter_map(|p| p.metadata.name.as_deref())
}

/// Annotation on a PersistentVolumeClaim or StorageClass choosing the method.
pub const ANNOTATION_METHOD: &str = "backup.ferry.dev/volume-method";
/// Label on everything Ferry creates to move data.
pub const LABEL_MOVER: &str = "ferry.dev/mover";
/// Label of a mover Pod's slot on its node: no two mover Pods of the same
/// slot share a node, so a node runs at most as many movers as there are
/// slots.
pub const LABEL_MOVER_SLOT: &str = "ferry.dev/mover-slot";
/// Label on the VolumeSnapshotContents (and group contents) of kept CSI
/// snapshots: the id of the repository whose snapshots reference them.
pub const LABEL_KEPT_BY: &str = "ferry.dev/kept-by";
/// Label on PersistentVolumeClaims whose snapshots must be crash-consistent
/// together: claims of a namespace with the same value are snapshotted by
/// one VolumeGroupSnapshot where the driver serves them.
pub const LABEL_VOLUME_GROUP: &str = "ferry.dev/volume-group";
/// Velero's label of the same meaning, honoured so that applications
/// labelled for Velero keep their groups.
pub const LABEL_VOLUME_GROUP_VELERO: &str = "velero.io/volume-group";

/// How a volume's data is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeMethod {
    /// snapshot-move where the driver has a VolumeSnapshotClass, else copy
    /// (or snapshot / skip when the repository is not reachable from Pods).
    #[default]
    Auto,
    /// A CSI VolumeSnapshot kept in the cluster.
    Snapshot,
    /// A CSI VolumeSnapshot copied into the repository, then deleted.
    SnapshotMove,
    /// The live volume copied into the repository, between the hooks.
    Copy,
    /// Not protected (recorded in the report).
    Skip,
}

impl std::str::FromStr for VolumeMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            format!("'{s}' is not a volume method (auto, snapshot, snapshot-move, copy, skip)")
        })
    }
}

impl std::fmt::Display for VolumeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeMethod::Auto => "auto",
            VolumeMethod::Snapshot => "snapshot",
            VolumeMethod::SnapshotMove => "snapshot-move",
            VolumeMethod::Copy => "copy",
            VolumeMethod::Skip => "skip",
        })
    }
}

/// Which method each volume gets: the claim's annotation, then its
/// StorageClass's annotation, then `per_class`, then `default`.
#[derive(Debug, Clone, Default)]
pub struct VolumePolicy {
    pub default: VolumeMethod,
    pub per_class: BTreeMap<String, VolumeMethod>,
    /// Run hooks declared on Pods (Ferry's and Velero's annotations).
    pub hooks: bool,
    /// Pre-backup hooks from the request, for every Pod that mounts a volume.
    pub extra_hooks: Vec<Hook>,
    /// Snapshot the claims of each StatefulSet together, by one
    /// VolumeGroupSnapshot, where its selector selects exactly them.
    pub auto_groups: bool,
}

/// How mover Pods are made and reach the repository.
#[derive(Debug, Clone)]
pub struct MoverSettings {
    /// The Ferry image.
    pub image: String,
    /// Environment of the mover (repository location, endpoint…).
    pub env: BTreeMap<String, String>,
    /// Secret environment (password, cloud credentials); `FERRY_KEY` is
    /// mounted as a key file instead.
    pub secret: BTreeMap<String, Vec<u8>>,
    /// Why mover Pods cannot reach the repository, if they cannot.
    pub unreachable: Option<String>,
    /// Longest wait for a snapshot or a mover Pod.
    pub timeout: Duration,
    /// Movers at once.
    pub concurrency: usize,
    /// Movers at once on one node, over every run of every Ferry (0: no
    /// bound); the scheduler enforces it (see [`pods`]).
    pub per_node: usize,
    /// The ServiceAccount whose tokens movers show a CSI driver's snapshot
    /// metadata service (changed-block tracking of block volumes); none:
    /// block volumes are read whole.
    pub snapshot_metadata_account: Option<metadata::ServiceAccountRef>,
    /// The mover container's compute resources.
    pub resources: MoverResources,
}

/// Compute resources of a mover container. Explicit by default: without
/// them a namespace's LimitRange gives movers its default limits (often a
/// few dozen MiB, which a mover outgrows), and a ResourceQuota on compute
/// refuses Pods that name none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoverResources {
    /// What the scheduler reserves (`cpu`, `memory`, `ephemeral-storage`).
    #[serde(default = "default_requests")]
    pub requests: BTreeMap<String, String>,
    /// The most the mover may use; no CPU limit by default, since
    /// throttling a mover only makes the copy slower.
    #[serde(default = "default_limits")]
    pub limits: BTreeMap<String, String>,
}

fn default_requests() -> BTreeMap<String, String> {
    parse_resource_list(DEFAULT_MOVER_REQUESTS).expect("valid default")
}

fn default_limits() -> BTreeMap<String, String> {
    parse_resource_list(DEFAULT_MOVER_LIMITS).expect("valid default")
}

/// `--mover-requests`'s default. No CPU: a request above the CPU limit a
/// namespace's LimitRange sets by default (often 100m or less) makes the
/// Pod invalid there; memory has its own limit below.
pub const DEFAULT_MOVER_REQUESTS: &str = "memory=256Mi";
/// `--mover-limits`'s default: several times the most a mover was
/// measured to hold (about 150 MiB).
pub const DEFAULT_MOVER_LIMITS: &str = "memory=1Gi";

impl Default for MoverResources {
    fn default() -> Self {
        MoverResources {
            requests: default_requests(),
            limits: default_limits(),
        }
    }
}

impl MoverResources {
    /// The container's `resources`.
    fn to_json(&self) -> serde_json::Value {
        let mut out = json!({});
        if !self.requests.is_empty() {
            out["requests"] = json!(self.requests);
        }
        if !self.limits.is_empty() {
            out["limits"] = json!(self.limits);
        }
        out
    }
}

/// `cpu=250m,memory=256Mi` as a resource list; empty (or `none`) for none.
pub fn parse_resource_list(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(out);
    }
    for item in text.split(',') {
        let (name, quantity) = item
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not RESOURCE=QUANTITY (cpu=250m, memory=1Gi)"))?;
        if !["cpu", "memory", "ephemeral-storage"].contains(&name) {
            return Err(format!(
                "'{name}' is not a mover resource: use cpu, memory or ephemeral-storage"
            ));
        }
        if !is_quantity(quantity) {
            return Err(format!(
                "'{quantity}' is not a Kubernetes quantity for {name} (like 500m, 2, 256Mi, 1Gi)"
            ));
        }
        out.insert(name.to_string(), quantity.to_string());
    }
    Ok(out)
}

/// A quantity as Kubernetes writes them: a decimal number and an optional
/// suffix (binary `Ki`…`Ei`, decimal `m`, `k`…`E`, or an exponent).
fn is_quantity(text: &str) -> bool {
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

/// Set in a mover Pod's environment: `ferry volume backup|restore` then
/// prints its progress to stderr every second as a line
/// `PROGRESS_PREFIX{"bytesDone":…,"bytesTotal":…,"filesDone":…}`, which
/// the CLI reads from the Pod's log. (An environment variable, not a flag:
/// an older image ignores it.)
pub const PROGRESS_ENV: &str = "FERRY_PROGRESS_LINES";
pub const PROGRESS_PREFIX: &str = "ferry-progress ";

/// The progress line of a mover's counters.
pub fn progress_line(progress: &VolumeProgress) -> String {
    format!(
        "{PROGRESS_PREFIX}{}",
        json!({
            "bytesDone": progress.bytes_done.load(Ordering::Relaxed),
            "bytesTotal": progress.bytes_total.load(Ordering::Relaxed),
            "filesDone": progress.files_done.load(Ordering::Relaxed),
        })
    )
}

/// Reads the last progress line of a mover's log into `progress`.
pub fn read_progress(log: &str, progress: &VolumeProgress) -> bool {
    let Some(line) = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(PROGRESS_PREFIX))
    else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    let field = |name: &str| value[name].as_u64().unwrap_or_default();
    progress
        .bytes_done
        .store(field("bytesDone"), Ordering::Relaxed);
    progress
        .bytes_total
        .store(field("bytesTotal"), Ordering::Relaxed);
    progress
        .files_done
        .store(field("filesDone"), Ordering::Relaxed);
    true
}

/// Live counters of the movers of one backup or restore, for its progress
/// bar: volumes to move and moved, and the bytes of each mover so far.
#[derive(Debug, Default)]
pub struct MoverProgress {
    pub volumes_total: AtomicUsize,
    pub volumes_done: AtomicUsize,
    movers: Mutex<Vec<Arc<VolumeProgress>>>,
}

impl MoverProgress {
    /// Counters for one more mover.
    pub(crate) fn track(&self) -> Arc<VolumeProgress> {
        let progress = Arc::new(VolumeProgress::default());
        self.movers
            .lock()
            .expect("mover progress lock")
            .push(progress.clone());
        progress
    }

    /// Bytes done and to do, over every mover so far.
    pub fn bytes(&self) -> (u64, u64) {
        let movers = self.movers.lock().expect("mover progress lock");
        movers.iter().fold((0, 0), |(done, total), p| {
            (
                done + p.bytes_done.load(Ordering::Relaxed),
                total + p.bytes_total.load(Ordering::Relaxed),
            )
        })
    }
}

/// What a backup's volume step needs besides the claims: the run's mover
/// label, the repository whose label kept snapshots get, and where
/// progress goes.
pub struct VolumeRun<'a> {
    /// Value of the mover label (the backup's name).
    pub label: &'a str,
    /// Kept CSI snapshots are labelled with it, so that one the repository
    /// never came to reference is found and released by the next prune.
    pub repository_id: &'a str,
    pub progress: Option<&'a MoverProgress>,
}

/// A CSI snapshot kept in the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptSnapshot {
    /// The API server of the cluster that holds it.
    pub server: String,
    pub volume_snapshot: String,
    pub content: String,
    pub driver: String,
    pub handle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// The group snapshot this one is a member of: it is kept and released
    /// with the whole group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<KeptGroup>,
}

/// A CSI volume group snapshot kept in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptGroup {
    /// `namespace/name` of the VolumeGroupSnapshot.
    pub volume_group_snapshot: String,
    /// The VolumeGroupSnapshotContent.
    pub content: String,
    /// The driver's group snapshot id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handle: String,
}

/// Deletes the CSI snapshots that `entries` kept in the cluster of `conn`,
/// when their application snapshot is deleted. Returns one line per kept
/// snapshot that was not deleted: held by another cluster, or an error;
/// each names what to delete by hand. Callers delete the application
/// snapshot first, so a failure here leaks a CSI snapshot but never leaves
/// a backup that names one that is gone.
pub async fn release_kept_snapshots(
    conn: &crate::cluster::connect::Connection,
    entries: &[VolumeEntry],
) -> Vec<String> {
    let mut left = Vec::new();
    // A group goes first and whole: its members cannot be deleted one by
    // one while it exists; then each member's own objects are released.
    let groups: std::collections::BTreeSet<&KeptGroup> = entries
        .iter()
        .flat_map(|e| e.kept())
        .filter(|k| k.server == conn.server)
        .filter_map(|k| k.group.as_ref())
        .collect();
    for group in groups {
        if let Err(e) = csi::release_group(&conn.client, group).await {
            left.push(format!(
                "kept group snapshot {} (VolumeGroupSnapshotContent {}) was not deleted: {e}",
                group.volume_group_snapshot, group.content
            ));
        }
    }
    let kept_snapshots: Vec<(&VolumeEntry, &KeptSnapshot)> = entries
        .iter()
        .flat_map(|e| e.kept().map(move |k| (e, k)))
        .collect();
    for (entry, kept) in kept_snapshots {
        let by_hand = format!(
            "kept snapshot of {}/{} (VolumeSnapshotContent {}, VolumeSnapshot {})",
            entry.namespace, entry.claim, kept.content, kept.volume_snapshot
        );
        if kept.server != conn.server {
            left.push(format!(
                "{by_hand} lives in the cluster at {}: delete it there",
                kept.server
            ));
            continue;
        }
        if let Err(e) = csi::release(&conn.client, kept).await {
            left.push(format!("{by_hand} was not deleted: {e}"));
        }
    }
    left
}

/// Releases the changed-block tracking bases of `previous` (the parents'
/// volumes) that the newly saved backup's `current` volumes replaced:
/// only the newest backup of a volume keeps its snapshot as a base. The
/// older backup still names its base; releasing it again later finds it
/// gone, which counts as released. Returns a line per base left behind.
pub async fn release_replaced_bases(
    conn: &crate::cluster::connect::Connection,
    previous: &[VolumeEntry],
    current: &[VolumeEntry],
) -> Vec<String> {
    let mut left = Vec::new();
    for old in previous {
        let Some(base) = &old.change_base else {
            continue;
        };
        let replaced = current.iter().any(|new| {
            new.namespace == old.namespace
                && new.claim == old.claim
                && new.root.is_some()
                && new.change_base.as_ref().map(|b| &b.content) != Some(&base.content)
        });
        if !replaced || base.server != conn.server {
            continue;
        }
        if let Err(e) = csi::release(&conn.client, base).await {
            left.push(format!(
                "the earlier changed-block tracking base of {}/{} (VolumeSnapshot {}) was not released: {e}; it goes when its backup is deleted",
                old.namespace, old.claim, base.volume_snapshot
            ));
        }
    }
    left
}

/// What a sweep of leaked kept CSI snapshots found.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepOutcome {
    /// Kept snapshots and group snapshots no snapshot of the repository
    /// references: released (or, in a dry run, to be released).
    pub released: Vec<String>,
    /// Those that could not be released, with the reason.
    pub failed: Vec<String>,
}

/// Releases the kept CSI snapshots of the cluster of `conn` that are
/// labelled for the repository `repository_id` but whose content is not in
/// `referenced` (the contents its snapshots name): left behind by a backup
/// killed before its snapshot was written, or a delete killed before it
/// released them. The caller holds the repository's exclusive lock, so no
/// backup is between keeping a snapshot and writing the snapshot that
/// names it.
pub async fn sweep_kept_snapshots(
    conn: &crate::cluster::connect::Connection,
    repository_id: &str,
    referenced: &std::collections::BTreeSet<String>,
    dry_run: bool,
) -> Result<SweepOutcome, String> {
    let (singles, groups) = csi::kept_by(&conn.client, repository_id).await?;
    let mut outcome = SweepOutcome::default();
    for group in groups.iter().filter(|g| !referenced.contains(&g.content)) {
        let what = format!(
            "group snapshot {} (VolumeGroupSnapshotContent {})",
            group.volume_group_snapshot, group.content
        );
        settle(
            &mut outcome,
            what,
            dry_run,
            csi::release_group(&conn.client, group),
        )
        .await;
    }
    for kept in singles.iter().filter(|k| !referenced.contains(&k.content)) {
        let what = format!(
            "snapshot {} (VolumeSnapshotContent {})",
            kept.volume_snapshot, kept.content
        );
        settle(
            &mut outcome,
            what,
            dry_run,
            csi::release(&conn.client, kept),
        )
        .await;
    }
    Ok(outcome)
}

/// Hands the CSI snapshots that `entries` kept over to the user: their
/// contents lose the label that ties them to the repository, so no sweep
/// releases them once their backup is gone. Returns a line per content
/// that kept its label.
pub async fn disown_kept_snapshots(
    conn: &crate::cluster::connect::Connection,
    entries: &[VolumeEntry],
) -> Vec<String> {
    let mut contents: std::collections::BTreeSet<(String, bool)> = Default::default();
    for kept in entries
        .iter()
        .flat_map(|e| e.kept())
        .filter(|k| k.server == conn.server)
    {
        contents.insert((kept.content.clone(), false));
        if let Some(group) = &kept.group {
            contents.insert((group.content.clone(), true));
        }
    }
    let mut left = Vec::new();
    for (content, group) in contents {
        if let Err(e) = csi::disown(&conn.client, &content, group).await {
            left.push(e);
        }
    }
    left
}

/// Whether the cluster of `conn` holds any kept CSI snapshot labelled for
/// the repository `repository_id`: a sweep has nothing to look at without.
pub async fn has_kept_snapshots(
    conn: &crate::cluster::connect::Connection,
    repository_id: &str,
) -> Result<bool, String> {
    let (singles, groups) = csi::kept_by(&conn.client, repository_id).await?;
    Ok(!singles.is_empty() || !groups.is_empty())
}

/// Records `what` as released: in a dry run without running `release`
/// (a future does nothing until awaited), else by its outcome.
async fn settle(
    outcome: &mut SweepOutcome,
    what: String,
    dry_run: bool,
    release: impl std::future::Future<Output = Result<(), String>>,
) {
    if dry_run {
        outcome.released.push(what);
        return;
    }
    match release.await {
        Ok(()) => outcome.released.push(what),
        Err(e) => outcome.failed.push(format!("{what}: {e}")),
    }
}

/// One volume of an application snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeEntry {
    pub namespace: String,
    pub claim: String,
    /// The method used (never `auto`).
    pub method: VolumeMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// The volume's data in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<BlobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<KeptSnapshot>,
    /// Why the volume was not protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<VolumeStats>,
    /// `namespace/name` of the VolumeGroupSnapshot that took this volume's
    /// snapshot at one instant with the rest of its group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A block-mode claim: its data is the device's content, and a mover
    /// attaches the restored claim as a device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block: bool,
    /// The CSI snapshot this backup read a block volume from, kept in the
    /// cluster as the base of the next backup's changed-block tracking;
    /// released when a newer backup of the volume keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_base: Option<KeptSnapshot>,
}

impl VolumeEntry {
    /// The CSI snapshots this volume keeps in a cluster: its recovery
    /// point and its changed-block tracking base.
    pub fn kept(&self) -> impl Iterator<Item = &KeptSnapshot> {
        self.snapshot.iter().chain(self.change_base.iter())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MoverError {
    #[error("volume {volume}: {message}")]
    Volume { volume: String, message: String },
    #[error("hook {hook} in Pod {pod} failed: {message}")]
    Hook {
        pod: String,
        hook: String,
        message: String,
    },
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl MoverError {
    fn volume(namespace: &str, claim: &str, message: impl std::fmt::Display) -> Self {
        MoverError::Volume {
            volume: format!("{namespace}/{claim}"),
            message: message.to_string(),
        }
    }
}

/// A short name suffix unique to this run: mover objects of two backups
/// never collide.
fn suffix(parts: &[&str]) -> String {
    let mut hasher = blake3::Hasher::new();
    for p in parts {
        hasher.update(p.as_bytes());
        hasher.update(&[0]);
    }
    hasher.update(&rand::random::<[u8; 8]>());
    hasher.finalize().to_hex()[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_in_use_by_the_unfinished_pods_that_mount_it() {
        let pod = |name: &str, claim: &str, phase: &str| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "c"}], "nodeName": (name != "unplaced").then_some("n1"),
                         "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let pods = vec![
            pod("web-1", "data", "Running"),
            pod("web-2", "data", "Pending"),
            pod("job", "data", "Succeeded"),
            pod("other", "logs", "Running"),
            pod("unplaced", "data", "Pending"),
        ];
        assert_eq!(
            holders(&pods, "data").collect::<Vec<_>>(),
            vec!["web-1", "web-2"]
        );
        assert_eq!(holders(&pods, "cache").count(), 0);
    }

    #[test]
    fn resource_lists_take_kubernetes_quantities_and_name_what_is_wrong() {
        assert_eq!(
            parse_resource_list("cpu=500m, memory=1.5Gi,ephemeral-storage=2G").unwrap(),
            BTreeMap::from([
                ("cpu".to_string(), "500m".to_string()),
                ("memory".to_string(), "1.5Gi".to_string()),
                ("ephemeral-storage".to_string(), "2G".to_string()),
            ])
        );
        assert!(parse_resource_list("none").unwrap().is_empty());
        assert!(parse_resource_list("").unwrap().is_empty());
        assert_eq!(parse_resource_list("cpu=1e3").unwrap()["cpu"], "1e3");
        let wrong = |text: &str| parse_resource_list(text).unwrap_err();
        assert!(wrong("gpu=1").contains("'gpu' is not a mover resource"));
        assert!(wrong("memory=1GB").contains("'1GB' is not a Kubernetes quantity"));
        assert!(wrong("memory=").contains("quantity"));
        assert!(wrong("memory=1..5Gi").contains("quantity"));
        assert!(wrong("memory").contains("RESOURCE=QUANTITY"));
    }

    #[test]
    fn a_movers_progress_line_is_read_back_from_the_end_of_its_log() {
        let sent = VolumeProgress::default();
        sent.bytes_done.store(7 << 20, Ordering::Relaxed);
        sent.bytes_total.store(9 << 20, Ordering::Relaxed);
        sent.files_done.store(42, Ordering::Relaxed);
        let older = VolumeProgress::default();
        let log = format!(
            "{}\nwarning: something\n{}\n",
            progress_line(&older),
            progress_line(&sent)
        );
        let read = VolumeProgress::default();
        assert!(read_progress(&log, &read));
        assert_eq!(read.bytes_done.load(Ordering::Relaxed), 7 << 20);
        assert_eq!(read.bytes_total.load(Ordering::Relaxed), 9 << 20);
        assert_eq!(read.files_done.load(Ordering::Relaxed), 42);
        assert!(!read_progress("no progress yet\n", &read));
        assert!(!read_progress("ferry-progress {broken\n", &read));

        let movers = MoverProgress::default();
        let (a, b) = (movers.track(), movers.track());
        a.bytes_done.store(1, Ordering::Relaxed);
        b.bytes_done.store(2, Ordering::Relaxed);
        b.bytes_total.store(5, Ordering::Relaxed);
        assert_eq!(movers.bytes(), (3, 5));
    }
}
