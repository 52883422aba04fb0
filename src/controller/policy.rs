//! BackupPolicy resources: on schedule, one snapshot per protected
//! namespace, a record of it as a Backup in that namespace, then retention.
//! Also coverage: which namespaces no policy protects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::backup::{Incremental, NamespaceBackup, backup_namespace, completed};
use super::crd::{Backup, BackupPolicy, BackupSpec, NamespaceRun};
use super::journal::Journal;
use super::schedule::{Schedule, kept};
use super::{
    Context, ControllerError, LABEL_NAMESPACE, LABEL_POLICY, condition, now_rfc3339, patch_status,
};
use crate::cluster::discovery::Discovery;
use crate::incremental::CaptureCache;

/// Namespaces no policy is expected to protect.
pub fn is_system_namespace(name: &str) -> bool {
    name.starts_with("kube-")
}

/// Whether `labels` match a Kubernetes label selector (`matchLabels` and
/// `matchExpressions` with In, NotIn, Exists, DoesNotExist).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Whether a policy protects namespace `name` with `labels`.
pub fn protects(policy: &BackupPolicy, name: &str, labels: &BTreeMap<String, String>) -> bool {
    policy.spec.namespaces.iter().any(|n| n == name)
        || policy
            .spec
            .namespace_selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, labels))
}

/// One namespace in the coverage report.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    pub namespace: String,
    pub policies: Vec<String>,
    /// The newest success of any protecting policy in this namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
}

/// Every namespace with the policies that protect it (none: unprotected).
pub fn coverage(namespaces: &[Namespace], policies: &[BackupPolicy]) -> Vec<Coverage> {
    let mut rows: Vec<Coverage> = namespaces
        .iter()
        .filter(|ns| !is_system_namespace(&ns.name_any()))
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .map(|ns| {
            let name = ns.name_any();
            let labels = ns.labels().clone();
            let protecting: Vec<&BackupPolicy> = policies
                .iter()
                .filter(|p| !p.spec.suspend && protects(p, &name, &labels))
                .collect();
            let last_success = protecting
                .iter()
                .filter_map(|p| {
                    p.status
                        .as_ref()?
                        .namespaces
                        .iter()
                        .find(|r| r.namespace == name)?
                        .last_success_time
                        .clone()
                })
                .max();
            Coverage {
                namespace: name,
                policies: protecting.iter().map(|p| p.name_any()).collect(),
                last_success,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    rows
}

/// Namespaces `policy` protects now, by name and by labels.
async fn protected_namespaces(
    ctx: &Context,
    policy: &BackupPolicy,
) -> Result<Vec<String>, ControllerError> {
    let api: Api<Namespace> = Api::all(ctx.conn.client.clone());
    let mut names = BTreeSet::new();
    for ns in api.list(&ListParams::default()).await?.items {
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = ns.name_any();
        if protects(policy, &name, ns.labels()) {
            names.insert(name);
        }
    }
    Ok(names.into_iter().collect())
}

fn parse_time(text: &Option<String>) -> Option<DateTime<Utc>> {
    text.as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

pub async fn reconcile(
    policy: Arc<BackupPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let name = policy.name_any();
    let api: Api<BackupPolicy> = Api::all(ctx.conn.client.clone());
    let mut status = policy.status.clone().unwrap_or_default();
    let schedule = match Schedule::parse(&policy.spec.schedule, policy.spec.time_zone.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            status.conditions = vec![condition(
                "Ready",
                false,
                "InvalidSchedule",
                &e.to_string(),
                policy.metadata.generation,
            )];
            patch_status(&api, &name, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let now = Utc::now();
    let created = policy
        .meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| DateTime::parse_from_rfc3339(&t.0.to_string()).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    // A run that was interrupted (the controller died) runs again now.
    let interrupted = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Running" && c.status == "True");
    let (due, next) = schedule
        .due(parse_time(&status.last_schedule_time), created, now)
        .map_err(|e| ControllerError::Other(e.to_string()))?;
    let next_text = next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if policy.spec.suspend || !(due || interrupted) {
        if status.next_schedule_time.as_deref() != Some(next_text.as_str()) {
            status.next_schedule_time = Some(next_text);
            patch_status(&api, &name, &status).await?;
        }
        let wait = (next - now).to_std().unwrap_or(Duration::from_secs(1));
        return Ok(Action::requeue(wait.min(Duration::from_secs(3600))));
    }

    let started = Instant::now();
    status.last_schedule_time = Some(now_rfc3339());
    status.next_schedule_time = Some(next_text);
    status.conditions = vec![condition(
        "Running",
        true,
        if interrupted { "Resumed" } else { "Scheduled" },
        "backing up the protected namespaces",
        policy.metadata.generation,
    )];
    patch_status(&api, &name, &status).await?;

    let outcome = run(&ctx, &policy).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut runs: BTreeMap<String, NamespaceRun> = status
        .namespaces
        .iter()
        .map(|r| (r.namespace.clone(), r.clone()))
        .collect();
    let journaled = outcome.as_ref().is_ok_and(|r| r.journaled);
    status.last_run_kind = Some(if journaled { "Journaled" } else { "Full" }.into());
    let (failures, objects, bytes, message) = match &outcome {
        Ok(run) => {
            for (namespace, result) in &run.namespaces {
                let entry = runs
                    .entry(namespace.clone())
                    .or_insert_with(|| NamespaceRun {
                        namespace: namespace.clone(),
                        ..Default::default()
                    });
                match result {
                    Ok(stored) => {
                        entry.last_snapshot = Some(stored.snapshot_name.clone());
                        entry.last_success_time = Some(now_rfc3339());
                        entry.last_error = None;
                    }
                    Err(e) => entry.last_error = Some(e.clone()),
                }
            }
            // Namespaces no longer protected leave the status (their
            // snapshots stay in the repository).
            runs.retain(|ns, _| run.namespaces.contains_key(ns));
            let failures = run.namespaces.values().filter(|r| r.is_err()).count();
            let objects: i64 = run.namespaces.values().flatten().map(|s| s.objects).sum();
            let bytes: i64 = run
                .namespaces
                .values()
                .flatten()
                .map(|s| s.bytes_stored)
                .sum();
            let mut message = format!(
                "{} namespace(s) backed up, {failures} failed; retention deleted {} snapshot(s)",
                run.namespaces.len() - failures,
                run.deleted
            );
            if let Some(w) = &run.retention_warning {
                message.push_str("; ");
                message.push_str(w);
            }
            (failures, objects, bytes, message)
        }
        Err(e) => (1, 0, 0, e.to_string()),
    };
    status.namespaces = runs.into_values().collect();
    status.protected_namespaces = Some(status.namespaces.len() as i32);
    let ok = failures == 0;
    if ok {
        status.last_success_time = Some(now_rfc3339());
    }
    status.conditions = vec![
        condition(
            "Running",
            false,
            "Finished",
            "no run in progress",
            policy.metadata.generation,
        ),
        condition(
            "LastRunSucceeded",
            ok,
            if ok { "Succeeded" } else { "Failed" },
            &message,
            policy.metadata.generation,
        ),
    ];
    patch_status(&api, &name, &status).await?;
    ctx.metrics.policy_run(&name, |m| {
        m.runs_total += 1;
        m.last_journaled = journaled;
        m.last_duration_seconds = elapsed;
        m.last_objects = objects as u64;
        m.last_bytes = bytes as u64;
        if ok {
            m.last_success_timestamp = Some(Utc::now().timestamp_millis() as f64 / 1000.0);
        } else {
            m.failures_total += 1;
        }
    });
    ctx.event(
        &*policy,
        !ok,
        if ok { "RunSucceeded" } else { "RunFailed" },
        message,
    )
    .await;
    let wait = (next - Utc::now())
        .to_std()
        .unwrap_or(Duration::from_secs(1));
    Ok(Action::requeue(wait.min(Duration::from_secs(3600))))
}

/// What a policy keeps between runs: the watch journal of every
/// collection, the capture cache, and the discovery of its last full run.
#[derive(Clone)]
pub struct PolicyJournal {
    pub journal: Arc<Journal>,
    pub cache: Arc<CaptureCache>,
    pub discovered: Arc<(Discovery, crate::profile::ClusterProfile)>,
    pub runs_since_full: i32,
}

struct Run {
    namespaces: BTreeMap<String, Result<super::backup::Stored, String>>,
    deleted: usize,
    retention_warning: Option<String>,
    journaled: bool,
}

async fn run(ctx: &Context, policy: &BackupPolicy) -> Result<Run, ControllerError> {
    let policy_name = policy.name_any();
    let uid = policy.uid().unwrap_or_default();
    if let Some(text) = &policy.spec.transform {
        let problems = super::confine::transform_problems(text, "a BackupPolicy");
        if !problems.is_empty() {
            return Err(ControllerError::Other(format!(
                "spec.transform: {}",
                problems.join("; ")
            )));
        }
    }
    let opened = super::repository::open(ctx, &policy.spec.repository).await?;
    let namespaces = protected_namespaces(ctx, policy).await?;
    let stamp = Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let full_every = policy.spec.full_backup_every.unwrap_or(24).max(1);
    let state = ctx.journals.lock().await.get(&uid).cloned();
    // Journaled when the journal follows everything and no full run is due;
    // the first run, and every `fullBackupEvery`th, LIST.
    // A changed CRD may serve a new kind the journal does not follow.
    let crds_changed = state.as_ref().is_some_and(|s| {
        s.journal
            .changes_in("apiextensions.k8s.io", "customresourcedefinitions")
            .is_none_or(|n| n > 0)
    });
    let mut journaled = !crds_changed
        && state
            .as_ref()
            .is_some_and(|s| s.runs_since_full + 1 < full_every && s.journal.synced());
    let cache = state
        .as_ref()
        .map(|s| s.cache.clone())
        .unwrap_or_else(|| Arc::new(CaptureCache::new()));
    let mut results = BTreeMap::new();
    cache.begin_run();
    for namespace in &namespaces {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_POLICY.to_string(), policy_name.clone());
        labels.insert(LABEL_NAMESPACE.to_string(), namespace.clone());
        let mut request = NamespaceBackup {
            namespace,
            snapshot_name: format!("{policy_name}-{namespace}-{stamp}"),
            labels,
            selector: policy.spec.selector.as_deref(),
            volume_method: policy.spec.volume_method.as_deref(),
            restore_transform: policy.spec.transform.as_deref(),
            incremental: Some(Incremental {
                cache: cache.clone(),
                journal: state
                    .as_ref()
                    .filter(|_| journaled)
                    .map(|s| s.journal.clone()),
                discovered: state
                    .as_ref()
                    .filter(|_| journaled)
                    .map(|s| s.discovered.clone()),
            }),
        };
        let mut result = backup_namespace(&ctx.conn, &opened, &request).await;
        if let Err(ControllerError::Stale(why)) = &result {
            // The journal cannot be trusted with this: LIST, and start a
            // new journal after this run.
            tracing::warn!(policy = %policy_name, namespace, %why, "journal out of step; backing up in full");
            cache.clear();
            journaled = false;
            request.incremental = Some(Incremental {
                cache: cache.clone(),
                journal: None,
                discovered: None,
            });
            result = backup_namespace(&ctx.conn, &opened, &request).await;
        }
        let result = match result {
            Ok(stored) => {
                if let Err(e) = record(ctx, policy, namespace, &stamp, &stored).await {
                    tracing::warn!(namespace, error = %e, "could not write the Backup record");
                }
                Ok(stored)
            }
            Err(e) => {
                let reference = Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                }
                .object_ref(&());
                ctx.event_on(
                    &reference,
                    true,
                    "BackupFailed",
                    format!("BackupPolicy {policy_name}: {e}"),
                )
                .await;
                Err(e.to_string())
            }
        };
        results.insert(namespace.clone(), result);
    }
    if results.values().all(|r| r.is_ok()) {
        // What no namespace of this run used is gone from the cluster.
        cache.finish_run();
    }
    let (deleted, retention_warning) = retention(ctx, policy, &opened, &namespaces).await?;
    let interest: BTreeSet<String> = namespaces.iter().cloned().collect();
    match state {
        Some(mut state) if journaled => {
            state.journal.keep_namespaces(Some(interest));
            state.journal.compact();
            state.runs_since_full += 1;
            ctx.journals.lock().await.insert(uid, state);
        }
        previous => {
            // After a full run: a new journal from the current discovery
            // (new CRDs included), sharing the cache the run filled.
            if let Some(previous) = previous {
                previous.journal.stop();
            }
            match follow_everything(ctx, cache, interest).await {
                Ok(state) => {
                    ctx.journals.lock().await.insert(uid, state);
                }
                Err(e) => {
                    tracing::warn!(policy = %policy_name, error = %e, "cannot start the watch journal; the next run LISTs");
                    ctx.journals.lock().await.remove(&uid);
                }
            }
        }
    }
    Ok(Run {
        namespaces: results,
        deleted,
        retention_warning,
        journaled,
    })
}

/// A journal of every namespaced collection a backup captures.
async fn follow_everything(
    ctx: &Context,
    cache: Arc<CaptureCache>,
    interest: BTreeSet<String>,
) -> Result<PolicyJournal, ControllerError> {
    let discovery = crate::cluster::discovery::discover(&ctx.conn.client).await?;
    let profile = crate::cluster::profile::read_profile(&ctx.conn, &discovery).await?;
    let everything = crate::model::select::Selection {
        all_namespaces: true,
        include_deps: true,
        ..Default::default()
    };
    let journal = Journal::new(ctx.conn.client.clone(), cache.clone());
    journal.keep_namespaces(Some(interest));
    let mut followed = crate::backup::collections_to_capture(&discovery, &everything);
    // And what backups read cluster-wide (Namespaces, ClusterRoleBindings,
    // webhooks, APIServices, CRDs): no backup LISTs them. A changed CRD
    // also makes the next run full, with a new discovery.
    followed.extend(crate::backup::cluster_collections_read(&discovery));
    journal.follow(&followed);
    Ok(PolicyJournal {
        journal,
        cache,
        discovered: Arc::new((discovery, profile)),
        runs_since_full: 0,
    })
}

/// The Backup in `namespace` that lists the policy's snapshot there.
async fn record(
    ctx: &Context,
    policy: &BackupPolicy,
    namespace: &str,
    stamp: &str,
    stored: &super::backup::Stored,
) -> Result<(), kube::Error> {
    let api: Api<Backup> = Api::namespaced(ctx.conn.client.clone(), namespace);
    let name = format!("{}-{stamp}", policy.name_any());
    let backup = Backup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some({
                let mut labels: BTreeMap<String, String> =
                    [(LABEL_POLICY.to_string(), policy.name_any())].into();
                if let Some(instance) = &ctx.options.instance {
                    labels.insert(super::LABEL_INSTANCE.to_string(), instance.clone());
                }
                labels
            }),
            ..Default::default()
        },
        spec: BackupSpec {
            repository: policy.spec.repository.clone(),
            selector: policy.spec.selector.clone(),
            volume_method: policy.spec.volume_method.clone(),
            policy: Some(policy.name_any()),
            requester: None,
        },
        status: None,
    };
    match api.create(&PostParams::default(), &backup).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e),
    }
    patch_status(&api, &name, &completed(stored, None, None)).await
}

/// Applies the policy's retention to its snapshots of each protected
/// namespace; deletes the records of deleted snapshots and the CSI
/// snapshots they kept; prunes. Returns what was deleted and, joined, what
/// was left for later or by hand.
async fn retention(
    ctx: &Context,
    policy: &BackupPolicy,
    opened: &super::repository::Opened,
    namespaces: &[String],
) -> Result<(usize, Option<String>), ControllerError> {
    let policy_name = policy.name_any();
    let snapshots = opened
        .repo
        .list_snapshots()
        .await
        .map_err(|e| ControllerError::Other(e.to_string()))?;
    let mut deleted = 0;
    let mut warnings = Vec::new();
    for namespace in namespaces {
        let listed: BTreeMap<String, &crate::repo::Snapshot> = snapshots
            .iter()
            .map(|(id, s)| (id.to_string(), s))
            .collect();
        let mine: Vec<(String, DateTime<Utc>)> = snapshots
            .iter()
            .filter(|(_, s)| {
                s.labels.get(LABEL_POLICY) == Some(&policy_name)
                    && s.labels.get(LABEL_NAMESPACE) == Some(namespace)
            })
            .filter_map(|(id, s)| {
                let created = DateTime::parse_from_rfc3339(&s.created).ok()?;
                Some((id.to_string(), created.with_timezone(&Utc)))
            })
            .collect();
        let keep = kept(&mine, &policy.spec.retention);
        let doomed: BTreeSet<String> = mine
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| !keep.contains(id))
            .collect();
        for id in &doomed {
            // CSI snapshots the backup kept go with it, read before the
            // delete and released after it (a failure leaks, never breaks).
            let snapshot = listed[id];
            let kept = crate::snapshot::kept_volume_snapshots(&opened.repo, snapshot)
                .await
                .unwrap_or_else(|e| {
                    warnings.push(format!(
                        "the report of {} is unreadable, CSI snapshots it kept stay: {e}",
                        snapshot.name
                    ));
                    Vec::new()
                });
            opened
                .repo
                .delete_snapshot(&crate::repo::SnapshotId(id.clone()))
                .await
                .map_err(|e| ControllerError::Other(e.to_string()))?;
            warnings.extend(crate::mover::release_kept_snapshots(&ctx.conn, &kept).await);
            deleted += 1;
        }
        if doomed.is_empty() {
            continue;
        }
        let api: Api<Backup> = Api::namespaced(ctx.conn.client.clone(), namespace);
        let records = api
            .list(&ListParams::default().labels(&format!("{LABEL_POLICY}={policy_name}")))
            .await?;
        for record in records.items {
            let snapshot = record.status.as_ref().and_then(|s| s.snapshot.clone());
            if snapshot.is_some_and(|s| doomed.contains(&s)) {
                let _ = api
                    .delete(&record.name_any(), &DeleteParams::default())
                    .await;
            }
        }
    }
    // Prune waits for no one: if another backup or restore holds the
    // repository, the data is freed by a later run.
    if deleted > 0
        && let Err(e) = opened.repo.prune(false).await
    {
        warnings.push(format!("prune postponed: {e}"));
    }
    // Kept CSI snapshots that no snapshot of the repository names (a
    // backup or delete killed midway) are released; while another session
    // holds the repository, a later run looks.
    match crate::backup::sweep_kept_snapshots(&opened.repo, &ctx.conn, false).await {
        Ok(swept) => {
            for what in &swept.released {
                tracing::info!(policy = %policy_name, "released leaked kept CSI {what}");
            }
            warnings.extend(swept.failed.iter().map(|f| format!("leaked kept CSI {f}")));
        }
        Err(crate::backup::BackupError::Repo(crate::repo::RepoError::Locked { .. })) => {}
        Err(e) => warnings.push(e.to_string()),
    }
    Ok((deleted, (!warnings.is_empty()).then(|| warnings.join("; "))))
}

/// Every `check_interval`: counts the namespaces no policy protects and
/// puts a Warning Event on each.
pub async fn coverage_loop(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = report_coverage(&ctx).await {
            tracing::warn!(error = %e, "coverage");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(ctx.options.check_interval) => {}
        }
    }
}

async fn report_coverage(ctx: &Context) -> Result<(), ControllerError> {
    let namespaces = Api::<Namespace>::all(ctx.conn.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let policies = Api::<BackupPolicy>::all(ctx.conn.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let rows = coverage(&namespaces, &policies);
    let unprotected: Vec<&Coverage> = rows.iter().filter(|r| r.policies.is_empty()).collect();
    ctx.metrics.set_unprotected(unprotected.len() as u64);
    // Coverage is the cluster's, whichever controller protects what: only
    // the default controller reports it as Events, so they come once.
    if ctx.options.instance.is_some() {
        return Ok(());
    }
    for row in unprotected {
        if let Some(ns) = namespaces.iter().find(|n| n.name_any() == row.namespace) {
            ctx.event(
                ns,
                true,
                "Unprotected",
                format!(
                    "no BackupPolicy protects namespace {}; label it to match a policy's namespaceSelector or name it in spec.namespaces",
                    row.namespace
                ),
            )
            .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_match_like_the_api_server() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("protect", "daily")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["scratch".into()]),
            }]),
        };
        assert!(selector_matches(
            &selector,
            &labels(&[("protect", "daily")])
        ));
        assert!(!selector_matches(
            &selector,
            &labels(&[("protect", "daily"), ("tier", "scratch")])
        ));
        assert!(!selector_matches(
            &selector,
            &labels(&[("protect", "weekly")])
        ));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(pairs)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn policy(name: &str, spec: serde_json::Value) -> BackupPolicy {
        let mut policy: BackupPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "BackupPolicy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        policy.status = None;
        policy
    }

    #[test]
    fn coverage_lists_unprotected_namespaces_and_skips_system_ones() {
        let namespaces = [
            namespace("shop", &[("protect", "daily")]),
            namespace("blog", &[]),
            namespace("billing", &[]),
            namespace("kube-system", &[]),
        ];
        let policies = [
            policy(
                "daily",
                serde_json::json!({"repository": "r", "schedule": "@daily",
                    "namespaceSelector": {"matchLabels": {"protect": "daily"}}}),
            ),
            policy(
                "billing",
                serde_json::json!({"repository": "r", "schedule": "@daily",
                    "namespaces": ["billing"]}),
            ),
            policy(
                "off",
                serde_json::json!({"repository": "r", "schedule": "@daily",
                    "namespaces": ["blog"], "suspend": true}),
            ),
        ];
        let rows = coverage(&namespaces, &policies);
        let summary: Vec<(&str, Vec<&str>)> = rows
            .iter()
            .map(|r| {
                (
                    r.namespace.as_str(),
                    r.policies.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("billing", vec!["billing"]),
                ("blog", vec![]),
                ("shop", vec!["daily"]),
            ]
        );
    }
}
