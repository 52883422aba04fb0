//! `ferry backup`: discover ─▶ capture ─▶ normalize ─▶ graph ─▶ select ─▶ store.
//!
//! Objects stream from paginated LISTs through normalization straight into
//! the repository's pack writer; only object identities, labels and
//! references stay in memory (for the application graph). Dependencies
//! outside the selection (a RoleBinding's ClusterRole, a PVC's StorageClass,
//! a CR's CRD…) are then fetched one by one until the graph is closed. The
//! snapshot manifest is written last, so an interrupted backup leaves no
//! snapshot behind, only unreferenced data that `prune` reclaims.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cluster::capture::{DEFAULT_PAGE_SIZE, Pager, get_object};
use crate::cluster::discovery::{Discovery, ServedResource, discover};
use crate::cluster::profile::read_profile;
use crate::cluster::{ClusterError, Connection, status_code};
use crate::incremental::{CaptureCache, ObjectSource, SourceObject, Version, version_of};
use crate::model::ObjectRef;
use crate::model::edges::{EdgeKind, Reference, Target, references};
use crate::model::graph::{AppGraph, Node};
use crate::model::normalize::{NormalizeOptions, Verdict, normalize};
use crate::model::select::Selection;
use crate::repo::{BlobId, RepoError, Repository, Snapshot, SnapshotId, WriteStats, encode_refs};
use crate::snapshot::StoredContent;
pub use crate::snapshot::{
    CatalogEntry, SNAPSHOT_FORMAT, SnapshotContent, SourceInfo, load_catalog, load_content,
    open_snapshot,
};

/// Label on snapshots that records which tool version wrote them.
pub const LABEL_WRITER: &str = "ferry.dev/writer";

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub name: String,
    pub selection: Selection,
    /// The label selector exactly as the user gave it, sent to the API
    /// server so that unselected objects never cross the wire.
    pub label_selector: Option<String>,
    pub normalize: NormalizeOptions,
    pub concurrency: usize,
    pub page_size: u32,
    pub ttl: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    /// Store a snapshot even when the selection matches no object.
    pub allow_empty: bool,
    /// Protect the data of the selection's PersistentVolumeClaims.
    pub volumes: Option<VolumeSettings>,
    /// What earlier backups made of object versions; reused, not redone.
    /// Its owner marks runs ([`CaptureCache::begin_run`]): one run may be
    /// several backups (a policy's namespaces).
    pub cache: Option<Arc<CaptureCache>>,
    /// Where collections come from instead of LISTs (a watch journal).
    pub source: Option<Arc<dyn ObjectSource>>,
    /// Discovery and profile read earlier, instead of reading them again.
    pub discovered: Option<Arc<(Discovery, crate::profile::ClusterProfile)>>,
    /// A transform plan recorded in the snapshot, for restores at the
    /// disaster-recovery site (`ferry restore --recorded-transform`).
    pub restore_transform: Option<String>,
}

/// How a backup protects volume data.
#[derive(Debug, Clone, Default)]
pub struct VolumeSettings {
    pub policy: crate::mover::VolumePolicy,
    /// Mover Pods; `None` when the repository is not reachable from Pods.
    pub mover: Option<crate::mover::MoverSettings>,
}

impl BackupOptions {
    pub fn new(name: impl Into<String>, selection: Selection) -> Self {
        BackupOptions {
            name: name.into(),
            selection,
            label_selector: None,
            normalize: NormalizeOptions::default(),
            concurrency: 8,
            page_size: DEFAULT_PAGE_SIZE,
            ttl: None,
            labels: BTreeMap::new(),
            allow_empty: false,
            volumes: None,
            cache: None,
            source: None,
            discovered: None,
            restore_transform: None,
        }
    }
}

/// What a snapshot holds, stored as its root blob.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    /// Objects stored, per `group/Kind` (`Kind` for the core group).
    pub counts: BTreeMap<String, usize>,
    pub skipped: Vec<SkippedObject>,
    /// Dependencies not stored because every cluster provides them
    /// (bootstrap RBAC roles and the like); restore checks they exist.
    pub provided_by_cluster: Vec<String>,
    /// Collections or objects the credentials were not allowed to read.
    pub forbidden: Vec<String>,
    pub warnings: Vec<String>,
    /// Objects outside the selection stored because the application needs
    /// them, each with the reasons (which object needs it, and how).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dependencies: BTreeMap<String, Vec<String>>,
    /// The persistent volumes of the selection: how each was protected
    /// (or why not), and where its data is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::mover::VolumeEntry>,
    pub stats: BackupStats,
}

impl BackupReport {
    /// A backup that could not read everything it was asked for is partial.
    pub fn is_partial(&self) -> bool {
        !self.forbidden.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkippedObject {
    pub object: String,
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStats {
    pub objects: usize,
    pub collections_listed: usize,
    pub bytes_plaintext: u64,
    pub bytes_stored: u64,
    pub blobs_added: u64,
    pub blobs_deduplicated: u64,
    pub packs_written: u64,
    pub duration_ms: u64,
}

/// Live counters the CLI renders as a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub collections_total: AtomicUsize,
    pub collections_done: AtomicUsize,
    pub objects: AtomicUsize,
    pub bytes: AtomicU64,
    /// Volume data moved by mover Pods.
    pub volumes: crate::mover::MoverProgress,
}

#[derive(Debug)]
pub struct BackupOutcome {
    pub snapshot: SnapshotId,
    /// What the snapshot holds, except the graph (`content.graph` is null:
    /// it went to the repository as bytes; `snapshot::load_content` reads
    /// it back).
    pub content: SnapshotContent,
    pub write: WriteStats,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(
        "a snapshot named '{0}' already exists in the repository; pick another name or delete it first"
    )]
    NameTaken(String),
    #[error(
        "cannot list namespaces to expand {patterns:?}: {source}. Name the namespaces literally with -n"
    )]
    NamespaceList {
        patterns: Vec<String>,
        #[source]
        source: ClusterError,
    },
    #[error("nothing selected: no namespace matches {0:?}")]
    NothingSelected(Vec<String>),
    #[error(
        "the selection matches no object{}; no snapshot was written. Check the namespace names and selectors (`kubectl get namespaces`), or pass --allow-empty to store an empty snapshot",
        if .0.is_empty() { String::new() } else { format!(" (namespaces that do not exist: {})", .0.join(", ")) }
    )]
    EmptySelection(Vec<String>),
    #[error("object {object} could not be encoded: {source}")]
    Encode {
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the snapshot writer stopped unexpectedly: {0}")]
    Writer(String),
    // Not a `source`: the message is the mover's error, and a chain would
    // print it twice.
    #[error("{0}")]
    Volumes(crate::mover::MoverError),
    #[error("the journal and capture cache are out of step with the repository ({}); no snapshot was written. A full backup heals it", .0.join("; "))]
    Stale(Vec<String>),
    #[error("{0}")]
    Sweep(String),
}

impl From<crate::mover::MoverError> for BackupError {
    fn from(e: crate::mover::MoverError) -> Self {
        BackupError::Volumes(e)
    }
}

/// Kinds whose objects are all skipped by normalization: not listing them
/// at all saves the most expensive requests of a busy cluster.
const NEVER_CAPTURED: &[(&str, &str)] = &[
    ("", "Event"),
    ("events.k8s.io", "Event"),
    ("coordination.k8s.io", "Lease"),
    ("", "Binding"),
    ("", "ComponentStatus"),
    ("metrics.k8s.io", "PodMetrics"),
    ("metrics.k8s.io", "NodeMetrics"),
    // Ferry's own requests: restored, a Backup or Restore would run again.
    ("ferry.dev", "Backup"),
    ("ferry.dev", "Restore"),
];

/// The same objects served under two groups: capture them once, through the
/// group that survives.
const ALIASED_GROUPS: &[(&str, &str, &str)] = &[("extensions", "Ingress", "networking.k8s.io")];

/// Namespaced resource types to list for this selection.
pub fn collections_to_capture<'a>(
    discovery: &'a Discovery,
    selection: &Selection,
) -> Vec<&'a ServedResource> {
    discovery
        .resources
        .iter()
        .filter(|r| r.namespaced && r.can("list") && r.can("get"))
        .filter(|r| !NEVER_CAPTURED.contains(&(r.group.as_str(), r.kind.as_str())))
        .filter(|r| {
            !ALIASED_GROUPS.iter().any(|(old, kind, new)| {
                r.group == *old && r.kind == *kind && discovery.by_group_kind(new, kind).is_some()
            })
        })
        .filter(|r| selection.kind_selected(&r.group, &r.kind, &r.plural))
        .collect()
}

/// What determines a snapshot's catalog and graph blobs: its entries (each
/// object and its blob, which fixes the object's graph node and
/// references), and what the graph marks as provided by the cluster or
/// skipped. Equal fingerprints, equal blobs.
fn parts_fingerprint(catalog: &[CatalogEntry], report: &BackupReport) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for entry in catalog {
        let o = &entry.object;
        for part in [&o.group, &o.version, &o.kind, &o.name] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        hasher.update(o.namespace.as_deref().unwrap_or("\u{1}").as_bytes());
        hasher.update(&[0]);
        hasher.update(&entry.blob.0);
        hasher.update(&entry.size.to_le_bytes());
    }
    hasher.update(b"\x01provided by the cluster\x01");
    for provided in &report.provided_by_cluster {
        hasher.update(provided.as_bytes());
        hasher.update(&[0]);
    }
    hasher.update(b"\x01skipped\x01");
    for skipped in &report.skipped {
        hasher.update(skipped.object.as_bytes());
        hasher.update(&[0]);
    }
    *hasher.finalize().as_bytes()
}

/// Cluster-scoped kinds whose objects can point into a namespace: the
/// dependency closure takes those that point into the selection.
const POINTING_IN: [(&str, &str); 4] = [
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    (
        "admissionregistration.k8s.io",
        "ValidatingWebhookConfiguration",
    ),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
    ),
    ("apiregistration.k8s.io", "APIService"),
];

/// The cluster-scoped collections a namespaced backup reads whole, besides
/// single objects it GETs: Namespaces, the kinds that point into
/// namespaces, and CRDs. A source that follows them (the controller's
/// journal) spares every backup those LISTs.
pub fn cluster_collections_read(discovery: &Discovery) -> Vec<&ServedResource> {
    [("", "Namespace")]
        .into_iter()
        .chain(POINTING_IN)
        .chain([("apiextensions.k8s.io", "CustomResourceDefinition")])
        .filter_map(|(group, kind)| discovery.by_group_kind(group, kind))
        .filter(|r| r.can("list"))
        .collect()
}

/// A normalized object on its way to the repository.
struct Captured {
    object: ObjectRef,
    value: Value,
    bytes: Vec<u8>,
    /// Uid and resourceVersion, under which the capture cache keeps it.
    version: Option<Version>,
}

enum Item {
    Object(Box<Captured>),
    /// An object version the capture cache has: nothing to redo.
    Cached(Arc<crate::incremental::Captured>),
    Skipped(SkippedObject),
    Forbidden(String),
    Warning(String),
    /// The source named an object version the cache no longer has, or the
    /// repository lost a blob the cache names: this backup cannot be made
    /// incrementally.
    Stale(String),
}

/// Runs a whole backup and returns what it stored. A partial backup (some
/// collections forbidden) still produces a snapshot whose report says so.
pub async fn run(
    conn: &Connection,
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupOutcome, BackupError> {
    let started = Instant::now();
    // Lock first, then read: the index the writer deduplicates against is
    // loaded by taking the lock (see the module docs of `repo`).
    let lock = repo.lock_shared().await?;
    if repo
        .list_snapshots()
        .await?
        .iter()
        .any(|(_, s)| s.name == opts.name)
    {
        lock.release().await?;
        return Err(BackupError::NameTaken(opts.name.clone()));
    }

    let (discovery, profile) = match &opts.discovered {
        Some(known) => (known.0.clone(), known.1.clone()),
        None => {
            let discovery = discover(&conn.client).await?;
            let profile = read_profile(conn, &discovery).await?;
            (discovery, profile)
        }
    };

    let mut report = BackupReport::default();
    for (gv, why) in &discovery.failures {
        report.warnings.push(format!(
            "discovery of {gv} failed ({why}); its resources are not backed up"
        ));
    }

    let namespaces = resolve_namespaces(conn, &discovery, &opts.selection).await?;
    let mut missing_namespaces: Vec<String> = Vec::new();
    let collections = collections_to_capture(&discovery, &opts.selection);
    // One cluster-wide LIST per type beats one per namespace when many
    // namespaces are selected, if the credentials allow it.
    let cluster_wide = opts.selection.all_namespaces || namespaces.len() > 4;
    let namespace_set: BTreeSet<String> = namespaces.iter().cloned().collect();

    let (tx, mut rx) = mpsc::channel::<Item>(1024);
    let mut jobs: Vec<(&ServedResource, Option<String>)> = Vec::new();
    for r in &collections {
        if cluster_wide {
            jobs.push((r, None));
        } else {
            for ns in &namespaces {
                jobs.push((r, Some(ns.clone())));
            }
        }
    }
    progress
        .collections_total
        .store(jobs.len(), Ordering::Relaxed);

    let pack_writer = repo.writer(&lock);
    let writer_progress = progress.clone();
    let writer_cache = opts.cache.clone();
    // The writer owns the pack writer and the graph: each object is encoded
    // into a pack and reduced to its graph node right away, so memory holds
    // identities and references, not objects.
    let writer = tokio::spawn(async move {
        let mut writer = pack_writer;
        let mut graph = AppGraph::new();
        let mut catalog: Vec<CatalogEntry> = Vec::new();
        let mut others = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Item::Object(c) => {
                    let blob = writer.add(&c.bytes).await?;
                    writer_progress.objects.fetch_add(1, Ordering::Relaxed);
                    writer_progress
                        .bytes
                        .fetch_add(c.bytes.len() as u64, Ordering::Relaxed);
                    if graph.contains(&c.object) {
                        continue;
                    }
                    let node = Node::from_value(c.object.clone(), &c.value, Some(blob.to_string()));
                    let refs = references(&c.value);
                    if let (Some(cache), Some(version)) = (&writer_cache, c.version) {
                        cache.insert(
                            version,
                            crate::incremental::Captured::Stored {
                                object: c.object.clone(),
                                blob,
                                size: c.bytes.len() as u64,
                                node: node.clone(),
                                references: refs.clone(),
                            },
                        );
                    }
                    graph.add_node(node);
                    graph.add_references(&c.object, refs);
                    catalog.push(CatalogEntry {
                        object: c.object,
                        blob,
                        size: c.bytes.len() as u64,
                    });
                }
                Item::Cached(cached) => match &*cached {
                    crate::incremental::Captured::Stored {
                        object,
                        blob,
                        size,
                        node,
                        references,
                    } => {
                        if !writer.has_existing(blob, *size) {
                            others.push(Item::Stale(format!(
                                "{object}: the repository no longer has its blob {blob}"
                            )));
                            continue;
                        }
                        writer_progress.objects.fetch_add(1, Ordering::Relaxed);
                        if graph.contains(object) {
                            continue;
                        }
                        graph.add_node(node.clone());
                        graph.add_references(object, references.clone());
                        catalog.push(CatalogEntry {
                            object: object.clone(),
                            blob: *blob,
                            size: *size,
                        });
                    }
                    crate::incremental::Captured::Skipped(skipped) => {
                        others.push(Item::Skipped(skipped.clone()))
                    }
                },
                other => others.push(other),
            }
        }
        Ok::<_, RepoError>((writer, graph, catalog, others))
    });

    let capture = futures::stream::iter(jobs)
        .map(|(resource, namespace)| {
            let tx = tx.clone();
            let namespace_set = &namespace_set;
            let progress = progress.clone();
            async move {
                let result = capture_collection(
                    conn,
                    resource,
                    namespace.as_deref(),
                    namespace_set,
                    opts,
                    &tx,
                )
                .await;
                progress.collections_done.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    let scope = namespace
                        .map(|n| format!(" in namespace {n}"))
                        .unwrap_or_default();
                    let what = format!("{}{scope}", resource.qualified_plural());
                    let item = match &e {
                        ClusterError::List { source, .. } if status_code(source) == Some(403) => {
                            Item::Forbidden(what)
                        }
                        ClusterError::List { source, .. } if status_code(source) == Some(404) => {
                            return Ok(());
                        }
                        _ => return Err(e),
                    };
                    let _ = tx.send(item).await;
                }
                Ok::<_, ClusterError>(())
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    report.stats.collections_listed = capture.len();
    let capture_error = capture.into_iter().find_map(Result::err);

    // Namespaces themselves are part of the application.
    if let Some(ns_resource) = discovery.by_group_kind("", "Namespace") {
        // The source's Namespaces, when it follows them: no GET each.
        let mut followed: Option<BTreeMap<String, SourceObject>> = opts
            .source
            .as_ref()
            .and_then(|s| s.objects(ns_resource, None))
            .map(|objects| {
                objects
                    .into_iter()
                    .filter_map(|o| {
                        let name = o
                            .selectable()
                            .pointer("/metadata/name")?
                            .as_str()?
                            .to_string();
                        namespace_set.contains(&name).then_some((name, o))
                    })
                    .collect()
            });
        for ns in &namespaces {
            if let Some(followed) = followed.as_mut() {
                match followed.remove(ns) {
                    Some(object) => {
                        let _ = tx.send(source_item(object, opts)).await;
                    }
                    None => {
                        missing_namespaces.push(ns.clone());
                        report.warnings.push(format!(
                            "namespace {ns} does not exist (or disappeared during the backup)"
                        ));
                    }
                }
                continue;
            }
            match get_object(&conn.client, ns_resource, None, ns).await {
                Ok(Some(mut obj)) => {
                    // As the journal holds it: one blob either way.
                    crate::cluster::capture::as_list_item(
                        &mut obj,
                        &ns_resource.api_version(),
                        &ns_resource.kind,
                    );
                    let _ = tx.send(normalize_item(obj, &opts.normalize)?).await;
                }
                Ok(None) => {
                    missing_namespaces.push(ns.clone());
                    report.warnings.push(format!(
                        "namespace {ns} does not exist (or disappeared during the backup)"
                    ))
                }
                Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => {
                    report.forbidden.push(format!("Namespace/{ns}"))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    drop(tx);
    let (mut writer, mut graph, mut catalog, others) = writer
        .await
        .map_err(|e| BackupError::Writer(e.to_string()))??;
    if let Some(e) = capture_error {
        // The pack writer is dropped unfinished: its packs are unreferenced
        // and no snapshot exists, so the backup does not look complete.
        return Err(e.into());
    }
    let stale: Vec<String> = others
        .iter()
        .filter_map(|i| match i {
            Item::Stale(why) => Some(why.clone()),
            _ => None,
        })
        .collect();
    if !stale.is_empty() {
        return Err(BackupError::Stale(stale));
    }
    absorb(&mut report, others);

    let selected = catalog.len();
    if opts.selection.include_deps {
        close_dependencies(
            conn,
            &discovery,
            &namespace_set,
            opts,
            &mut graph,
            &mut writer,
            &mut catalog,
            &mut report,
        )
        .await?;
    }
    for dangling in graph.resolve() {
        report
            .warnings
            .push(format!("dangling reference: {dangling}"));
    }
    for entry in &catalog[selected..] {
        report
            .dependencies
            .insert(entry.object.to_string(), graph.why_included(&entry.object));
    }

    if catalog.is_empty() && !opts.allow_empty {
        // The pack writer is dropped unfinished: nothing becomes visible.
        return Err(BackupError::EmptySelection(missing_namespaces));
    }
    for entry in &catalog {
        *report.counts.entry(count_key(&entry.object)).or_default() += 1;
    }
    report.stats.objects = catalog.len();
    // Volume data: mover Pods store it; the snapshot written below
    // references it. The shared lock held since the start keeps prune from
    // deleting the movers' packs until then.
    let mut volume_blobs: Vec<BlobId> = Vec::new();
    let mut previous = Vec::new();
    if let Some(settings) = &opts.volumes {
        let claims: Vec<(String, String)> = catalog
            .iter()
            .filter(|e| e.object.group.is_empty() && e.object.kind == "PersistentVolumeClaim")
            .filter_map(|e| Some((e.object.namespace.clone()?, e.object.name.clone())))
            .collect();
        if !claims.is_empty() {
            previous = previous_volumes(repo, &claims).await;
            report.volumes = crate::mover::backup_volumes(
                conn,
                &claims,
                &previous,
                &settings.policy,
                settings.mover.as_ref(),
                &crate::mover::VolumeRun {
                    label: &opts.name,
                    repository_id: repo.id(),
                    progress: Some(&progress.volumes),
                },
                &mut report.warnings,
            )
            .await?;
            if report.volumes.iter().any(|v| v.root.is_some()) {
                // The movers' index files are new since the lock was taken.
                repo.reload_index().await?;
            }
            for volume in &report.volumes {
                let Some(root_blob) = volume.root else {
                    continue;
                };
                let root = crate::volume::read_root(repo, &root_blob)
                    .await
                    .map_err(|e| {
                        BackupError::Writer(format!(
                            "volume {}/{}: the mover's data is unreadable: {e}",
                            volume.namespace, volume.claim
                        ))
                    })?;
                let refs = repo.read_blob(&root.refs).await?;
                volume_blobs.push(root_blob);
                volume_blobs.push(root.refs);
                volume_blobs.extend(crate::repo::decode_refs(&refs).map_err(|message| {
                    RepoError::Corrupt {
                        what: format!(
                            "reference list of volume {}/{}",
                            volume.namespace, volume.claim
                        ),
                        message,
                    }
                })?);
            }
        }
    }
    report.skipped.sort_by(|a, b| a.object.cmp(&b.object));
    report.forbidden.sort();
    report.forbidden.dedup();
    report.warnings.sort();
    report.warnings.dedup();
    report.provided_by_cluster.sort();
    report.provided_by_cluster.dedup();
    catalog.sort_by(|a, b| a.object.cmp(&b.object));

    let mut content = SnapshotContent {
        format: SNAPSHOT_FORMAT,
        name: opts.name.clone(),
        source: SourceInfo {
            server: conn.server.clone(),
            context: conn.context.clone(),
            namespaces,
        },
        profile,
        selection: serde_json::to_value(&opts.selection).unwrap_or(Value::Null),
        objects: catalog,
        // Stored below straight from the graph, not built as a value.
        graph: Value::Null,
        report,
        restore_transform: opts.restore_transform.clone(),
    };
    // The large, usually unchanged parts (profile, catalog, graph) are blobs
    // of their own, so an unchanged application deduplicates them and a
    // re-backup writes little more than the small root.
    let encode = |what: &str, value: &dyn erased::Encode| {
        value.encode().map_err(|source| BackupError::Encode {
            object: what.to_string(),
            source,
        })
    };
    let profile_blob = writer
        .add(&encode("cluster profile", &content.profile)?)
        .await?;
    // An unchanged namespace's catalog and graph come out byte for byte
    // as in the policy's previous run: their blobs are reused instead of
    // encoded again, while the repository still lets them be reused.
    let fingerprint = opts
        .cache
        .as_ref()
        .map(|_| parts_fingerprint(&content.objects, &content.report));
    let reused = opts
        .cache
        .as_ref()
        .zip(fingerprint.as_ref())
        .and_then(|(cache, f)| cache.parts(f))
        .filter(|(catalog, graph)| repo.has_blob(catalog) && repo.has_blob(graph));
    let (objects_blob, graph_blob) = match reused {
        Some(ids) => ids,
        None => {
            let objects_blob = writer
                .add(&encode("object catalog", &content.objects)?)
                .await?;
            let graph_bytes = graph
                .to_json_bytes()
                .map_err(|source| BackupError::Encode {
                    object: "application graph".into(),
                    source,
                })?;
            let graph_blob = writer.add(&graph_bytes).await?;
            if let (Some(cache), Some(f)) = (&opts.cache, fingerprint) {
                cache.remember_parts(f, objects_blob, graph_blob);
            }
            (objects_blob, graph_blob)
        }
    };
    let mut all_blobs: Vec<BlobId> = content.objects.iter().map(|e| e.blob).collect();
    all_blobs.extend([profile_blob, objects_blob, graph_blob]);
    all_blobs.extend(volume_blobs);
    content.report.stats.bytes_plaintext = writer.stats().bytes_plaintext;
    content.report.stats.duration_ms = started.elapsed().as_millis() as u64;
    let root = StoredContent {
        format: SNAPSHOT_FORMAT,
        // A reader that does not know volume data would restore empty
        // claims: such snapshots need this format.
        readable_by: Some(
            if content
                .report
                .volumes
                .iter()
                .any(|v| v.root.is_some() || v.snapshot.is_some())
            {
                SNAPSHOT_FORMAT
            } else {
                1
            },
        ),
        name: content.name.clone(),
        source: content.source.clone(),
        selection: content.selection.clone(),
        profile: profile_blob,
        objects: objects_blob,
        graph: graph_blob,
        report: content.report.clone(),
        restore_transform: content.restore_transform.clone(),
    };
    let content_blob = writer.add(&encode("snapshot content", &root)?).await?;
    let refs_blob = writer.add(&encode_refs(&all_blobs)).await?;
    let write = writer.finish().await?;
    content.report.stats.bytes_stored = write.bytes_stored;
    content.report.stats.blobs_added = write.blobs_added;
    content.report.stats.blobs_deduplicated = write.blobs_deduplicated;
    content.report.stats.packs_written = write.packs_written;

    let created = SystemTime::now();
    let snapshot = Snapshot {
        name: opts.name.clone(),
        created: humantime::format_rfc3339_seconds(created).to_string(),
        expires: opts
            .ttl
            .map(|ttl| humantime::format_rfc3339_seconds(created + ttl).to_string()),
        labels: {
            let mut labels = opts.labels.clone();
            labels.insert(
                LABEL_WRITER.into(),
                format!("ferry/{}", env!("CARGO_PKG_VERSION")),
            );
            labels
        },
        content: content_blob,
        refs: refs_blob,
        summary: serde_json::json!({
            "objects": content.report.stats.objects,
            "namespaces": content.source.namespaces,
            "cluster": content.profile.version,
            "server": content.source.server,
            "partial": content.report.is_partial(),
            "warnings": content.report.warnings.len(),
            "bytesPlaintext": content.report.stats.bytes_plaintext,
            "bytesStored": write.bytes_stored,
            "volumes": content.report.volumes.len(),
            // The size of the volume data the movers read (kept CSI
            // snapshots and skipped volumes count none).
            "volumeBytes": content
                .report
                .volumes
                .iter()
                .filter_map(|v| v.stats.as_ref())
                .map(|s| s.bytes)
                .sum::<u64>(),
        }),
    };
    // Tests kill the process here: every pack and index is stored, the
    // snapshot that makes the backup exist is not.
    crate::failpoint::stop_here("backup-before-snapshot").await;
    let id = repo.save_snapshot(&snapshot).await?;
    lock.release().await?;
    let mut content = content;
    // The new snapshot names the new changed-block bases: the ones they
    // replace go (told to the caller; the saved report cannot say it).
    content.report.warnings.extend(
        crate::mover::release_replaced_bases(conn, &previous, &content.report.volumes).await,
    );
    Ok(BackupOutcome {
        snapshot: id,
        content,
        write,
    })
}

/// The volumes of the newest snapshot that protected any of `claims`: the
/// parents of this backup's volume data. Unreadable snapshots are passed
/// over (their volumes are then read in full).
async fn previous_volumes(
    repo: &Repository,
    claims: &[(String, String)],
) -> Vec<crate::mover::VolumeEntry> {
    let Ok(snapshots) = repo.list_snapshots().await else {
        return Vec::new();
    };
    for (_, snapshot) in snapshots.iter().rev() {
        if crate::volume::is_volume_snapshot(snapshot) {
            continue;
        }
        let Ok(content) = load_catalog(repo, snapshot).await else {
            continue;
        };
        let volumes: Vec<_> = content
            .report
            .volumes
            .into_iter()
            .filter(|v| {
                v.root.is_some() && claims.contains(&(v.namespace.clone(), v.claim.clone()))
            })
            .collect();
        if !volumes.is_empty() {
            return volumes;
        }
    }
    Vec::new()
}

fn absorb(report: &mut BackupReport, items: Vec<Item>) {
    for item in items {
        match item {
            Item::Skipped(s) => report.skipped.push(s),
            Item::Forbidden(f) => report.forbidden.push(f),
            Item::Warning(w) => report.warnings.push(w),
            Item::Object(_) | Item::Cached(_) | Item::Stale(_) => {}
        }
    }
}

fn count_key(object: &ObjectRef) -> String {
    if object.group.is_empty() {
        object.kind.clone()
    } else {
        format!("{}/{}", object.group, object.kind)
    }
}

fn object_label(value: &Value) -> String {
    match ObjectRef::from_object(value) {
        Ok(r) => r.to_string(),
        Err(_) => value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_string(),
    }
}

fn normalize_item(obj: Value, opts: &NormalizeOptions) -> Result<Item, BackupError> {
    let label = object_label(&obj);
    let version = version_of(&obj);
    match normalize(obj, opts) {
        Verdict::Skip { rule, reason } => Ok(Item::Skipped(SkippedObject {
            object: label,
            rule: rule.to_string(),
            reason,
        })),
        Verdict::Keep { object, .. } => {
            let object_ref = match ObjectRef::from_object(&object) {
                Ok(r) => r,
                Err(e) => {
                    return Ok(Item::Warning(format!(
                        "{label} is malformed and was not backed up: {e}"
                    )));
                }
            };
            let bytes = serde_json::to_vec(&object).map_err(|source| BackupError::Encode {
                object: label,
                source,
            })?;
            Ok(Item::Object(Box::new(Captured {
                object: object_ref,
                value: object,
                bytes,
                version,
            })))
        }
    }
}

async fn capture_collection(
    conn: &Connection,
    resource: &ServedResource,
    namespace: Option<&str>,
    namespaces: &BTreeSet<String>,
    opts: &BackupOptions,
    tx: &mpsc::Sender<Item>,
) -> Result<(), ClusterError> {
    if let Some(objects) = opts
        .source
        .as_ref()
        .and_then(|s| s.objects(resource, namespace))
    {
        for obj in objects {
            let selectable = obj.selectable();
            let ns = selectable
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !namespaces.contains(ns) || !opts.selection.object_selected(selectable) {
                continue;
            }
            if tx.send(source_item(obj, opts)).await.is_err() {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut pager = Pager::new(
        &conn.client,
        resource,
        namespace,
        opts.label_selector.as_deref(),
        opts.page_size,
    );
    while let Some(page) = pager.next_page().await? {
        for obj in page {
            let ns = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !namespaces.contains(ns) || !opts.selection.object_selected(&obj) {
                continue;
            }
            if tx.send(capture_one(obj, opts)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One object the source handed over: its body captured (through the
/// cache), or a version only the cache can supply.
fn source_item(obj: SourceObject, opts: &BackupOptions) -> Item {
    match obj {
        SourceObject::Raw(value) => capture_one((*value).clone(), opts),
        SourceObject::Known { version, stub } => {
            match opts.cache.as_ref().and_then(|c| c.get(&version)) {
                Some(cached) => Item::Cached(cached),
                None => Item::Stale(format!(
                    "{} (resourceVersion {}) is not in the capture cache",
                    object_label(&stub),
                    version.1
                )),
            }
        }
    }
}

/// One object of a collection: from the capture cache when it has this
/// version, else normalized (and a skip remembered).
fn capture_one(obj: Value, opts: &BackupOptions) -> Item {
    let version = version_of(&obj);
    if let (Some(cache), Some(version)) = (&opts.cache, &version)
        && let Some(cached) = cache.get(version)
    {
        return Item::Cached(cached);
    }
    match normalize_item(obj, &opts.normalize) {
        Ok(Item::Skipped(skipped)) => {
            if let (Some(cache), Some(version)) = (&opts.cache, version) {
                cache.insert(
                    version,
                    crate::incremental::Captured::Skipped(skipped.clone()),
                );
            }
            Item::Skipped(skipped)
        }
        Ok(item) => item,
        Err(e) => Item::Warning(e.to_string()),
    }
}

fn add_to_graph(graph: &mut AppGraph, object: &ObjectRef, value: &Value, blob: Option<&BlobId>) {
    graph.add_object_value(object.clone(), value, blob.map(|b| b.to_string()));
    graph.add_references(object, references(value));
}

/// The namespaces a selection names, expanding globs and `--all-namespaces`
/// through a LIST of namespaces.
async fn resolve_namespaces(
    conn: &Connection,
    discovery: &Discovery,
    selection: &Selection,
) -> Result<Vec<String>, BackupError> {
    let literal = selection
        .namespaces
        .iter()
        .all(|p| !p.contains(['*', '?', '[']));
    if !selection.all_namespaces && literal {
        let mut names: Vec<String> = selection
            .namespaces
            .iter()
            .filter(|n| selection.namespace_selected(n))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(BackupError::NothingSelected(selection.namespaces.clone()));
        }
        return Ok(names);
    }
    let resource = discovery
        .by_group_kind("", "Namespace")
        .expect("every API server serves v1 Namespace");
    let list = crate::cluster::capture::list_collection(
        &conn.client,
        resource,
        None,
        None,
        DEFAULT_PAGE_SIZE,
    )
    .await
    .map_err(|source| BackupError::NamespaceList {
        patterns: selection.namespaces.clone(),
        source,
    })?;
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|ns| ns.pointer("/metadata/name").and_then(Value::as_str))
        .filter(|n| selection.namespace_selected(n))
        .map(String::from)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(BackupError::NothingSelected(selection.namespaces.clone()));
    }
    Ok(names)
}

/// Fetches what the selected objects depend on but the capture did not
/// include, until nothing new turns up: cluster-scoped dependencies (roles,
/// storage classes, persistent volumes, CRDs, priority/runtime/ingress
/// classes) and namespaced ones in the selected namespaces (a ConfigMap a
/// labelled Deployment mounts without carrying the label). ClusterRoleBindings
/// that grant something to a selected ServiceAccount, and webhook
/// configurations and APIServices served by a selected Service, are pulled
/// in as well, and so are the CRDs the application needs without holding
/// any of their resources (see [`fetch_matching_crds`]).
#[allow(clippy::too_many_arguments)]
async fn close_dependencies(
    conn: &Connection,
    discovery: &Discovery,
    namespaces: &BTreeSet<String>,
    opts: &BackupOptions,
    graph: &mut AppGraph,
    writer: &mut crate::repo::PackWriter,
    catalog: &mut Vec<CatalogEntry>,
    report: &mut BackupReport,
) -> Result<(), BackupError> {
    // Cluster-scoped objects that point into the selected namespaces:
    // ClusterRoleBindings granting something to a selected ServiceAccount,
    // and webhook configurations and APIServices served by a selected
    // Service.
    let in_selection = |obj: &Value| {
        references(obj).iter().any(|r| match &r.target {
            Target::Object {
                kind, namespace, ..
            } => {
                matches!(r.kind, EdgeKind::Binds | EdgeKind::Serves)
                    && matches!(kind.as_str(), "ServiceAccount" | "Service")
                    && namespace.as_ref().is_some_and(|n| namespaces.contains(n))
            }
            _ => false,
        })
    };
    for (group, kind) in POINTING_IN {
        let Some(resource) = discovery.by_group_kind(group, kind) else {
            continue;
        };
        let mut pager = DependencyPages::new(conn, resource, opts)?;
        loop {
            match pager.next_page().await {
                Ok(Some(items)) => {
                    for obj in items.into_iter().filter(|o| in_selection(o)) {
                        store_dependency(obj, opts, graph, writer, catalog, report).await?;
                    }
                }
                Ok(None) => break,
                Err(ClusterError::List { source, .. }) if status_code(&source) == Some(403) => {
                    report
                        .forbidden
                        .push(format!("{} (cluster-wide)", resource.qualified_plural()));
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    let mut attempted: BTreeSet<String> = BTreeSet::new();
    loop {
        fetch_references(
            conn,
            discovery,
            namespaces,
            opts,
            graph,
            writer,
            catalog,
            report,
            &mut attempted,
        )
        .await?;
        if !fetch_matching_crds(
            conn, discovery, namespaces, opts, graph, writer, catalog, report,
        )
        .await?
        {
            return Ok(());
        }
    }
}

/// The pages of a cluster-wide collection the dependency closure reads:
/// the backup's source (the controller's journal) when it follows that
/// collection, else a paginated LIST. The journal holds these bodies:
/// dependencies never enter the capture cache, so it never drops them.
enum DependencyPages<'a> {
    Source(Option<Vec<Value>>),
    List(Pager<'a>),
}

impl<'a> DependencyPages<'a> {
    fn new(
        conn: &'a Connection,
        resource: &'a ServedResource,
        opts: &BackupOptions,
    ) -> Result<Self, BackupError> {
        let Some(objects) = opts.source.as_ref().and_then(|s| s.objects(resource, None)) else {
            return Ok(Self::List(Pager::new(
                &conn.client,
                resource,
                None,
                None,
                DEFAULT_PAGE_SIZE,
            )));
        };
        let mut bodies = Vec::with_capacity(objects.len());
        for object in objects {
            match object {
                SourceObject::Raw(value) => bodies.push((*value).clone()),
                SourceObject::Known { version, stub } => {
                    return Err(BackupError::Stale(vec![format!(
                        "{} (resourceVersion {}) has no body in the journal",
                        object_label(&stub),
                        version.1
                    )]));
                }
            }
        }
        Ok(Self::Source(Some(bodies)))
    }

    async fn next_page(&mut self) -> Result<Option<Vec<Value>>, ClusterError> {
        match self {
            Self::Source(bodies) => Ok(bodies.take()),
            Self::List(pager) => pager.next_page().await,
        }
    }
}

/// CRDs the application needs without holding one of their resources: those
/// its roles grant verbs on, its webhooks or APIServices serve, that carry
/// its application labels, or whose conversion webhook a selected Service
/// serves. One paginated LIST of CRDs; `true` when any was stored.
#[allow(clippy::too_many_arguments)]
async fn fetch_matching_crds(
    conn: &Connection,
    discovery: &Discovery,
    namespaces: &BTreeSet<String>,
    opts: &BackupOptions,
    graph: &mut AppGraph,
    writer: &mut crate::repo::PackWriter,
    catalog: &mut Vec<CatalogEntry>,
    report: &mut BackupReport,
) -> Result<bool, BackupError> {
    let Some(resource) =
        discovery.by_group_kind("apiextensions.k8s.io", "CustomResourceDefinition")
    else {
        return Ok(false);
    };
    let patterns = graph.crd_patterns();
    let converted_here = |crd: &Value| {
        references(crd).iter().any(|r| {
            r.kind == EdgeKind::Serves
                && matches!(&r.target, Target::Object { namespace: Some(n), .. } if namespaces.contains(n))
        })
    };
    let mut stored = false;
    let mut pager = DependencyPages::new(conn, resource, opts)?;
    loop {
        let page = match pager.next_page().await {
            Ok(Some(page)) => page,
            Ok(None) => return Ok(stored),
            Err(ClusterError::List { source, .. }) if status_code(&source) == Some(403) => {
                report.forbidden.push(format!(
                    "{} (cluster-wide; CRDs of the application's roles, webhooks and labels)",
                    resource.qualified_plural()
                ));
                return Ok(stored);
            }
            Err(e) => return Err(e.into()),
        };
        for crd in page {
            let wanted = patterns.iter().any(|p| p.matches_crd(&crd)) || converted_here(&crd);
            let known = ObjectRef::from_object(&crd).is_ok_and(|o| graph.contains(&o));
            if wanted && !known {
                stored |= store_dependency(crd, opts, graph, writer, catalog, report).await?;
            }
        }
    }
}

/// Fetches every object the graph refers to by name and does not hold yet,
/// until nothing new turns up.
#[allow(clippy::too_many_arguments)]
async fn fetch_references(
    conn: &Connection,
    discovery: &Discovery,
    namespaces: &BTreeSet<String>,
    opts: &BackupOptions,
    graph: &mut AppGraph,
    writer: &mut crate::repo::PackWriter,
    catalog: &mut Vec<CatalogEntry>,
    report: &mut BackupReport,
    attempted: &mut BTreeSet<String>,
) -> Result<(), BackupError> {
    loop {
        let wanted: Vec<Reference> = graph.unresolved();
        let mut fetched_any = false;
        for reference in wanted {
            let (resource, namespace, name) = match &reference.target {
                Target::Object {
                    group,
                    kind,
                    namespace,
                    name,
                } => {
                    let Some(resource) = discovery.by_group_kind(group, kind) else {
                        continue;
                    };
                    if let Some(ns) = namespace
                        && !namespaces.contains(ns)
                    {
                        continue;
                    }
                    (resource, namespace.clone(), name.clone())
                }
                Target::Crd { group, kind } => {
                    let Some(served) = discovery.by_group_kind(group, kind) else {
                        continue;
                    };
                    let Some(crd) =
                        discovery.by_group_kind("apiextensions.k8s.io", "CustomResourceDefinition")
                    else {
                        continue;
                    };
                    (crd, None, format!("{}.{}", served.plural, served.group))
                }
                _ => continue,
            };
            let key = format!(
                "{}/{}/{}/{}",
                resource.group,
                resource.kind,
                namespace.clone().unwrap_or_default(),
                name
            );
            if !attempted.insert(key) {
                continue;
            }
            match get_object(&conn.client, resource, namespace.as_deref(), &name).await {
                Ok(Some(obj)) => {
                    fetched_any |=
                        store_dependency(obj, opts, graph, writer, catalog, report).await?;
                }
                Ok(None) => {}
                Err(ClusterError::Get { object, source }) if status_code(&source) == Some(403) => {
                    report.forbidden.push(format!("{object} (dependency)"))
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !fetched_any {
            return Ok(());
        }
    }
}

/// Normalizes and stores one dependency; `true` when it was stored.
async fn store_dependency(
    obj: Value,
    opts: &BackupOptions,
    graph: &mut AppGraph,
    writer: &mut crate::repo::PackWriter,
    catalog: &mut Vec<CatalogEntry>,
    report: &mut BackupReport,
) -> Result<bool, BackupError> {
    let original = ObjectRef::from_object(&obj).ok();
    match normalize_item(obj, &opts.normalize)? {
        Item::Object(c) => {
            if graph.contains(&c.object) {
                return Ok(false);
            }
            let blob = writer.add(&c.bytes).await?;
            add_to_graph(graph, &c.object, &c.value, Some(&blob));
            catalog.push(CatalogEntry {
                object: c.object,
                blob,
                size: c.bytes.len() as u64,
            });
            Ok(true)
        }
        Item::Skipped(s) => {
            // It exists in the cluster; references to it are not dangling.
            if let Some(object) = original {
                graph.mark_external(&object);
            }
            report
                .provided_by_cluster
                .push(format!("{} ({})", s.object, s.reason));
            Ok(false)
        }
        Item::Warning(w) => {
            report.warnings.push(w);
            Ok(false)
        }
        Item::Forbidden(f) => {
            report.forbidden.push(f);
            Ok(false)
        }
        Item::Cached(_) | Item::Stale(_) => Ok(false),
    }
}

mod erased {
    /// Object-safe JSON encoding, so one closure can encode every part.
    pub trait Encode {
        fn encode(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

/// What `ferry backup verify` found.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyOutcome {
    pub snapshots: usize,
    pub objects: usize,
    /// With `--read-data`: the packs and blobs read back (volume data
    /// included), every one of the repository's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_read: Option<DataRead>,
    /// One line per damaged or missing item, naming the snapshot and object.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataRead {
    pub packs: usize,
    pub blobs: usize,
}

/// Whether every blob `snapshot` references (its reference list: objects,
/// volume trees and chunks) is in the index, without reading the blobs:
/// a lost index file or pack shows even without `--read-data`. Lists
/// found complete are noted in `complete`: an unchanged backup shares its
/// parent's list, which is then read once.
async fn unindexed_references(
    repo: &Repository,
    snapshot: &Snapshot,
    complete: &mut HashSet<BlobId>,
) -> Option<String> {
    let ids = if complete.contains(&snapshot.refs) {
        Vec::new()
    } else {
        let ids = match repo.read_blob(&snapshot.refs).await {
            Ok(bytes) => crate::repo::decode_refs(&bytes),
            Err(e) => Err(e.to_string()),
        };
        match ids {
            Ok(ids) => ids,
            Err(e) => {
                return Some(format!(
                    "snapshot {}: its reference list is unreadable: {e}",
                    snapshot.name
                ));
            }
        }
    };
    let missing: Vec<&BlobId> = std::iter::once(&snapshot.content)
        .chain(&ids)
        .filter(|id| repo.raw_length(id).is_none())
        .collect();
    let Some(first) = missing.first() else {
        complete.insert(snapshot.refs);
        return None;
    };
    Some(format!(
        "snapshot {}: {} blob(s) it uses are in no index (the first: {first}); \
         `ferry repo repair` indexes what the packs still hold",
        snapshot.name,
        missing.len(),
    ))
}

/// Checks that every object of the chosen snapshots (or all) reads back
/// intact; with `read_data`, also checks every pack of the repository and
/// maps damaged blobs to the objects that use them.
pub async fn verify(
    repo: &Repository,
    name: Option<&str>,
    read_data: bool,
) -> Result<VerifyOutcome, RepoError> {
    let lock = repo.lock_shared().await?;
    let result = verify_locked(repo, name, read_data).await;
    lock.release().await?;
    result
}

async fn verify_locked(
    repo: &Repository,
    name: Option<&str>,
    read_data: bool,
) -> Result<VerifyOutcome, RepoError> {
    let mut outcome = VerifyOutcome::default();
    let snapshots = match name {
        Some(name) => vec![repo.find_snapshot(name).await?],
        None => {
            let listing = repo.snapshot_listing().await?;
            for damaged in &listing.damaged {
                outcome.problems.push(format!(
                    "snapshots/{}: {}; remove it with `ferry backup delete {}` or `ferry repo repair`",
                    damaged.id, damaged.message, damaged.id
                ));
            }
            listing.snapshots
        }
    };
    outcome.snapshots = snapshots.len();
    // blob → objects using it, to name objects when a pack is damaged.
    let mut users: std::collections::HashMap<BlobId, Vec<String>> =
        std::collections::HashMap::new();
    let mut complete_lists = HashSet::new();
    for (_, snapshot) in &snapshots {
        if let Some(problem) = unindexed_references(repo, snapshot, &mut complete_lists).await {
            outcome.problems.push(problem);
        }
        if crate::volume::is_volume_snapshot(snapshot) {
            continue;
        }
        let content = match load_content(repo, snapshot).await {
            Ok(c) => c,
            Err(e) => {
                outcome.problems.push(format!(
                    "snapshot {}: its content is unreadable: {e}",
                    snapshot.name
                ));
                continue;
            }
        };
        for entry in &content.objects {
            outcome.objects += 1;
            users
                .entry(entry.blob)
                .or_default()
                .push(format!("{} in snapshot {}", entry.object, snapshot.name));
            if !read_data && let Err(e) = repo.read_blob(&entry.blob).await {
                outcome.problems.push(format!(
                    "{} in snapshot {}: {e}",
                    entry.object, snapshot.name
                ));
            }
        }
    }
    if read_data {
        let report = repo.verify(true).await?;
        outcome.data_read = Some(DataRead {
            packs: report.packs_checked,
            blobs: report.blobs_checked,
        });
        // Volume data: name the files and directories that use a damaged blob.
        let damaged: HashSet<BlobId> = report
            .problems()
            .filter_map(|d| d.blob().copied())
            .collect();
        if !damaged.is_empty() {
            for (_, snapshot) in &snapshots {
                let volumes: Vec<(String, BlobId)> = if crate::volume::is_volume_snapshot(snapshot)
                {
                    vec![(
                        format!("volume snapshot {}", snapshot.name),
                        snapshot.content,
                    )]
                } else {
                    match crate::snapshot::load_report(repo, snapshot).await {
                        Ok(r) => r
                            .volumes
                            .iter()
                            .filter_map(|v| {
                                Some((
                                    format!(
                                        "volume {}/{} in snapshot {}",
                                        v.namespace, v.claim, snapshot.name
                                    ),
                                    v.root?,
                                ))
                            })
                            .collect(),
                        Err(_) => Vec::new(),
                    }
                };
                for (what, root_blob) in volumes {
                    if damaged.contains(&root_blob) {
                        outcome
                            .problems
                            .push(format!("{what}: its root is damaged"));
                        continue;
                    }
                    let Ok(root) = crate::volume::read_root(repo, &root_blob).await else {
                        outcome
                            .problems
                            .push(format!("{what}: its root is unreadable"));
                        continue;
                    };
                    for found in crate::volume::locate(repo, &root, &damaged).await {
                        outcome.problems.push(format!(
                            "{what}: {} uses damaged data (blob {})",
                            found.path.display(),
                            found.blob
                        ));
                    }
                }
            }
        }
        for damage in report.problems() {
            match damage.blob().and_then(|b| users.get(b)) {
                Some(objects) => {
                    for object in objects {
                        outcome.problems.push(format!("{object}: {damage}"));
                    }
                }
                None => outcome.problems.push(damage.to_string()),
            }
        }
    }
    Ok(outcome)
}

/// What retention deleted (or would delete).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionOutcome {
    pub deleted: Vec<String>,
    pub bytes_freed: u64,
    /// What prune did with the data: deleted now, marked for a later prune.
    pub prune: crate::repo::PruneReport,
    /// Volumes of the deleted snapshots kept as CSI snapshots in a cluster,
    /// for the caller to release there (see
    /// [`crate::mover::release_kept_snapshots`]).
    #[serde(skip)]
    pub kept_volume_snapshots: Vec<crate::mover::VolumeEntry>,
    /// Kept CSI snapshots of this repository that no snapshot names (a
    /// backup or delete killed midway), released by the sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swept_volume_snapshots: Option<crate::mover::SweepOutcome>,
    /// Deleted snapshots whose report could not be read: CSI snapshots they
    /// kept, if any, are not known.
    #[serde(skip)]
    pub unreadable_reports: Vec<String>,
}

/// Deletes expired snapshots and all but the newest `keep_last`, then
/// prunes: frees the data no remaining snapshot references (also that of
/// snapshots deleted earlier), in two phases.
pub async fn apply_retention(
    repo: &Repository,
    keep_last: Option<usize>,
    dry_run: bool,
) -> Result<RetentionOutcome, RepoError> {
    let mut snapshots = repo.list_snapshots().await?;
    snapshots.sort_by(|a, b| b.1.created.cmp(&a.1.created));
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut outcome = RetentionOutcome::default();
    let mut kept = 0;
    for (id, snapshot) in snapshots {
        let expired = snapshot.expires.as_ref().is_some_and(|e| *e <= now);
        // Keep-last counts application snapshots; `ferry volume backup`
        // snapshots are kept apart.
        let beyond =
            !crate::volume::is_volume_snapshot(&snapshot) && keep_last.is_some_and(|n| kept >= n);
        if expired || beyond {
            if !dry_run {
                match crate::snapshot::kept_volume_snapshots(repo, &snapshot).await {
                    Ok(kept) => outcome.kept_volume_snapshots.extend(kept),
                    Err(e) => outcome
                        .unreadable_reports
                        .push(format!("{}: {e}", snapshot.name)),
                }
                repo.delete_snapshot(&id).await?;
            }
            outcome.deleted.push(snapshot.name);
        } else {
            kept += 1;
        }
    }
    let report = repo.prune(dry_run).await?;
    outcome.bytes_freed = report.bytes_removed;
    outcome.prune = report;
    Ok(outcome)
}

/// Releases the kept CSI snapshots in the cluster of `conn` that are
/// labelled for this repository but named by none of its snapshots (see
/// [`crate::mover::sweep_kept_snapshots`]). Holds the exclusive lock from
/// reading the snapshots to the last release, so that no backup keeps a
/// snapshot it has not yet recorded meanwhile.
pub async fn sweep_kept_snapshots(
    repo: &Repository,
    conn: &Connection,
    dry_run: bool,
) -> Result<crate::mover::SweepOutcome, BackupError> {
    // Cheap first look, without the lock: what is labelled only later
    // belongs to a backup that is running, not to a leak.
    if !crate::mover::has_kept_snapshots(conn, repo.id())
        .await
        .map_err(BackupError::Sweep)?
    {
        return Ok(Default::default());
    }
    let lock = repo.lock_exclusive().await?;
    let result = async {
        let referenced = crate::snapshot::kept_contents_locked(repo).await?;
        crate::mover::sweep_kept_snapshots(conn, repo.id(), &referenced, dry_run)
            .await
            .map_err(BackupError::Sweep)
    }
    .await;
    lock.release().await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, name: &str, blob: u8) -> CatalogEntry {
        CatalogEntry {
            object: ObjectRef {
                group: String::new(),
                version: "v1".into(),
                kind: kind.into(),
                namespace: Some("a".into()),
                name: name.into(),
            },
            blob: BlobId([blob; 32]),
            size: 10,
        }
    }

    #[test]
    fn the_parts_fingerprint_changes_with_whatever_shapes_catalog_and_graph() {
        let catalog = vec![entry("ConfigMap", "c", 1), entry("Secret", "s", 2)];
        let report = BackupReport::default();
        let base = parts_fingerprint(&catalog, &report);
        assert_eq!(base, parts_fingerprint(&catalog.clone(), &report));
        let mut changed = catalog.clone();
        changed[1].blob = BlobId([3; 32]);
        assert_ne!(base, parts_fingerprint(&changed, &report));
        let mut moved = catalog.clone();
        moved[0].object.namespace = Some("b".into());
        assert_ne!(base, parts_fingerprint(&moved, &report));
        let mut provided = BackupReport::default();
        provided
            .provided_by_cluster
            .push("ServiceAccount/a/default (created by the cluster)".into());
        assert_ne!(base, parts_fingerprint(&catalog, &provided));
        assert_ne!(base, parts_fingerprint(&catalog[..1], &report));
    }
}
