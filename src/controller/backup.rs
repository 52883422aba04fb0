//! Backup resources: a backup of the resource's own namespace, made with
//! the permissions of the user who created it.
//!
//! A Backup is Completed only once its snapshot is in the repository (the
//! snapshot manifest is written last). A controller that died while one
//! was Running finds it Running again: it completes it from the snapshot if
//! that was written, and runs it again if not.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::crd::{Backup, BackupStatus, Requester};
use super::repository::Opened;
use super::{
    Context, ControllerError, LABEL_NAMESPACE, LABEL_REQUEST, condition, now_rfc3339, patch_status,
};
use crate::backup::{BackupOptions, Progress, VolumeSettings};
use crate::cluster::Connection;
use crate::model::select::{LabelSelector, Selection};
use crate::repo::Snapshot;

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_COMPLETED: &str = "Completed";
pub const PHASE_FAILED: &str = "Failed";

/// One namespace's backup, as a policy or a Backup asks for it.
pub struct NamespaceBackup<'a> {
    pub namespace: &'a str,
    pub snapshot_name: String,
    pub labels: BTreeMap<String, String>,
    pub selector: Option<&'a str>,
    pub volume_method: Option<&'a str>,
    /// Recorded in the snapshot for restores at the disaster-recovery site.
    pub restore_transform: Option<&'a str>,
    /// The policy's capture cache, and its journal when this run reads
    /// collections from it.
    pub incremental: Option<Incremental>,
}

/// What makes a policy's scheduled backup cheap (see [`super::journal`]).
#[derive(Clone)]
pub struct Incremental {
    pub cache: Arc<crate::incremental::CaptureCache>,
    pub journal: Option<Arc<super::journal::Journal>>,
    pub discovered: Option<
        Arc<(
            crate::cluster::discovery::Discovery,
            crate::profile::ClusterProfile,
        )>,
    >,
}

/// What a finished namespace backup stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub snapshot: String,
    pub snapshot_name: String,
    pub objects: i64,
    pub bytes_stored: i64,
    pub counts: BTreeMap<String, i64>,
    pub warnings: Vec<String>,
}

/// Backs up one namespace (and the cluster-scoped objects it depends on)
/// through `conn`, whose identity decides what can be read.
pub async fn backup_namespace(
    conn: &Connection,
    opened: &Opened,
    request: &NamespaceBackup<'_>,
) -> Result<Stored, ControllerError> {
    let selector = match request.selector {
        Some(s) if !s.trim().is_empty() => Some(
            LabelSelector::parse(s)
                .map_err(|e| ControllerError::Other(format!("selector '{s}': {e}")))?,
        ),
        _ => None,
    };
    let selection = Selection {
        namespaces: vec![request.namespace.to_string()],
        selector,
        include_deps: true,
        ..Default::default()
    };
    let mut options = BackupOptions::new(&request.snapshot_name, selection);
    options.label_selector = request.selector.map(str::to_string);
    options.labels = request.labels.clone();
    options.allow_empty = true;
    options.restore_transform = request.restore_transform.map(String::from);
    // As the CLI: every claim's data is protected unless asked otherwise,
    // and a skipped claim is still recorded in the report.
    let method = request.volume_method.unwrap_or("auto");
    let method: crate::mover::VolumeMethod = method
        .parse()
        .map_err(|e: String| ControllerError::Other(format!("volumeMethod: {e}")))?;
    if let Some(incremental) = &request.incremental {
        options.cache = Some(incremental.cache.clone());
        if let Some(journal) = &incremental.journal {
            options.source = Some(journal.clone());
            options.discovered = incremental.discovered.clone();
        }
    }
    options.volumes = Some(VolumeSettings {
        policy: crate::mover::VolumePolicy {
            default: method,
            per_class: BTreeMap::new(),
            hooks: true,
            extra_hooks: Vec::new(),
            auto_groups: true,
        },
        mover: Some(opened.mover.clone()),
    });
    let (conn, repo) = (conn.clone(), opened.repo.clone());
    let outcome = super::on_own_thread(move || async move {
        crate::backup::run(&conn, &repo, &options, Arc::new(Progress::default())).await
    })
    .await?
    .map_err(|e| match e {
        crate::backup::BackupError::Stale(why) => ControllerError::Stale(why.join("; ")),
        other => ControllerError::Other(crate::cluster::connect::error_chain(&other)),
    })?;
    let report = &outcome.content.report;
    let mut warnings = report.warnings.clone();
    warnings.extend(
        report
            .forbidden
            .iter()
            .map(|f| format!("not readable with the requester's permissions: {f}")),
    );
    let mut stored = Stored::of(
        outcome.snapshot.to_string(),
        request.snapshot_name.clone(),
        report,
    );
    stored.bytes_stored = outcome.write.bytes_stored as i64;
    stored.warnings = warnings;
    Ok(stored)
}

impl Stored {
    /// What a snapshot's report says was stored.
    fn of(snapshot: String, snapshot_name: String, report: &crate::backup::BackupReport) -> Self {
        Stored {
            snapshot,
            snapshot_name,
            objects: report.stats.objects as i64,
            bytes_stored: report.stats.bytes_stored as i64,
            counts: report
                .counts
                .iter()
                .map(|(k, v)| (k.clone(), *v as i64))
                .collect(),
            warnings: report.warnings.clone(),
        }
    }
}

/// The snapshot a request wrote, if it got that far.
pub async fn written_by(
    opened: &Opened,
    request_uid: &str,
) -> Result<Option<(String, Snapshot)>, ControllerError> {
    let snapshots = opened
        .repo
        .list_snapshots()
        .await
        .map_err(|e| ControllerError::Other(e.to_string()))?;
    Ok(snapshots
        .into_iter()
        .find(|(_, s)| s.labels.get(LABEL_REQUEST).map(String::as_str) == Some(request_uid))
        .map(|(id, s)| (id.to_string(), s)))
}

/// Status of a Backup whose snapshot is stored.
pub fn completed(
    stored: &Stored,
    started: Option<String>,
    generation: Option<i64>,
) -> BackupStatus {
    const MAX_WARNINGS: usize = 50;
    let mut warnings = stored.warnings.clone();
    if warnings.len() > MAX_WARNINGS {
        let more = warnings.len() - MAX_WARNINGS;
        warnings.truncate(MAX_WARNINGS);
        warnings.push(format!("… and {more} more"));
    }
    BackupStatus {
        phase: Some(PHASE_COMPLETED.into()),
        snapshot: Some(stored.snapshot.clone()),
        snapshot_name: Some(stored.snapshot_name.clone()),
        start_time: started,
        completion_time: Some(now_rfc3339()),
        objects: Some(stored.objects),
        bytes_stored: Some(stored.bytes_stored),
        counts: stored.counts.clone(),
        message: Some(format!(
            "snapshot {} with {} object(s)",
            stored.snapshot_name, stored.objects
        )),
        warnings,
        conditions: vec![condition(
            "Completed",
            true,
            "SnapshotStored",
            "the snapshot is in the repository",
            generation,
        )],
    }
}

pub async fn reconcile(backup: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let namespace = backup.namespace().unwrap_or_default();
    let name = backup.name_any();
    let api: Api<Backup> = Api::namespaced(ctx.conn.client.clone(), &namespace);
    let status = backup.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or(PHASE_PENDING);
    if phase == PHASE_COMPLETED || phase == PHASE_FAILED || backup.spec.policy.is_some() {
        // Done, or the record of a policy run (written whole by the controller).
        return Ok(Action::await_change());
    }
    let generation = backup.metadata.generation;
    let uid = backup.uid().unwrap_or_default();
    let fail = |message: String, reason: &str| BackupStatus {
        phase: Some(PHASE_FAILED.into()),
        completion_time: Some(now_rfc3339()),
        start_time: status.start_time.clone(),
        message: Some(message.clone()),
        conditions: vec![condition("Completed", false, reason, &message, generation)],
        ..Default::default()
    };
    let Some(requester) = backup.spec.requester.clone() else {
        let failed = fail(
            "the Backup has no requester: the ferry-requester admission policy is not installed (`ferry controller manifests`), so the controller cannot tell whose permissions to use".into(),
            "NoRequester",
        );
        patch_status(&api, &name, &failed).await?;
        ctx.metrics.request("Backup", "refused");
        ctx.event(
            &*backup,
            true,
            "Refused",
            failed.message.unwrap_or_default(),
        )
        .await;
        return Ok(Action::await_change());
    };

    let opened = match super::repository::open(&ctx, &backup.spec.repository).await {
        Ok(opened) => opened,
        Err(e) => {
            let failed = fail(e.to_string(), "RepositoryUnavailable");
            patch_status(&api, &name, &failed).await?;
            ctx.metrics.request("Backup", "failed");
            ctx.event(&*backup, true, "Failed", e.to_string()).await;
            return Ok(Action::await_change());
        }
    };
    // Interrupted while Running: the snapshot may be stored already.
    if phase == PHASE_RUNNING
        && let Some((id, snapshot)) = written_by(&opened, &uid).await?
    {
        let report = crate::snapshot::load_report(&opened.repo, &snapshot)
            .await
            .map_err(|e| ControllerError::Other(e.to_string()))?;
        let stored = Stored::of(id, snapshot.name.clone(), &report);
        patch_status(
            &api,
            &name,
            &completed(&stored, status.start_time.clone(), generation),
        )
        .await?;
        ctx.metrics.request("Backup", "completed");
        return Ok(Action::await_change());
    }

    let started = status.start_time.clone().unwrap_or_else(now_rfc3339);
    let running = BackupStatus {
        phase: Some(PHASE_RUNNING.into()),
        start_time: Some(started.clone()),
        message: Some(format!(
            "backing up namespace {namespace} as {}",
            requester.username
        )),
        ..Default::default()
    };
    patch_status(&api, &name, &running).await?;
    let result = run_as(&ctx, &requester, &opened, &backup, &namespace, &uid).await;
    match result {
        Ok(stored) => {
            patch_status(&api, &name, &completed(&stored, Some(started), generation)).await?;
            ctx.metrics.request("Backup", "completed");
            ctx.event(
                &*backup,
                false,
                "Completed",
                format!(
                    "snapshot {} with {} object(s)",
                    stored.snapshot_name, stored.objects
                ),
            )
            .await;
        }
        Err(e) => {
            let failed = fail(e.to_string(), "BackupFailed");
            patch_status(&api, &name, &failed).await?;
            ctx.metrics.request("Backup", "failed");
            ctx.event(&*backup, true, "Failed", e.to_string()).await;
        }
    }
    Ok(Action::await_change())
}

async fn run_as(
    ctx: &Context,
    requester: &Requester,
    opened: &Opened,
    backup: &Backup,
    namespace: &str,
    uid: &str,
) -> Result<Stored, ControllerError> {
    let conn = ctx.connect_as(requester).await?;
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_NAMESPACE.to_string(), namespace.to_string());
    labels.insert(LABEL_REQUEST.to_string(), uid.to_string());
    labels.insert(
        "ferry.dev/backup".to_string(),
        format!("{namespace}/{}", backup.name_any()),
    );
    // Unique in the repository, and readable in `ferry backup list`.
    let short_uid: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    let request = NamespaceBackup {
        namespace,
        snapshot_name: format!("{namespace}-{}-{short_uid}", backup.name_any()),
        labels,
        selector: backup.spec.selector.as_deref(),
        volume_method: backup.spec.volume_method.as_deref(),
        restore_transform: None,
        incremental: None,
    };
    backup_namespace(&conn, opened, &request).await
}
