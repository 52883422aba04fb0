//! Restore resources: a restore into the resource's own namespace, of that
//! namespace's objects in a snapshot, planned and carried out with the
//! permissions of the user who created it.
//!
//! The plan is made first (preflight included: the requester's permissions
//! for every write) and kept in a ConfigMap of the controller's namespace;
//! `spec.approve: false` stops there, and approving applies exactly that
//! plan. A controller that died while one was Running plans again against
//! the target as it is and applies: restores converge.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::backup::{PHASE_COMPLETED, PHASE_FAILED, PHASE_PENDING, PHASE_RUNNING};
use super::crd::{Backup, Restore, RestoreStatus};
use super::{
    CONTROLLER_NAME, Context, ControllerError, condition, confine, now_rfc3339, patch_status,
};
use crate::model::select::Selection;
use crate::restore::{
    ExistingPolicy, RestoreOptions, RestorePlan, Subset, TransformSource, mapping::NamespaceMapping,
};

pub const PHASE_PLANNED: &str = "Planned";
const PLAN_KEY: &str = "plan.json.zst";

/// Why a Restore did not run, and the condition reason that says so.
struct Refusal {
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

pub async fn reconcile(
    restore: Arc<Restore>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    let api: Api<Restore> = Api::namespaced(ctx.conn.client.clone(), &namespace);
    let status = restore.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_else(|| PHASE_PENDING.into());
    if phase == PHASE_COMPLETED || phase == PHASE_FAILED {
        return Ok(Action::await_change());
    }
    if phase == PHASE_PLANNED && !restore.spec.approve {
        return Ok(Action::await_change());
    }
    let outcome = match phase.as_str() {
        PHASE_PLANNED => apply_approved(&ctx, &restore, &api, &status).await,
        _ => plan_and_apply(&ctx, &restore, &api, &status, phase == PHASE_RUNNING).await,
    };
    if restore.spec.approve {
        // Finished one way or the other: the plan has served.
        let config_maps: Api<ConfigMap> =
            Api::namespaced(ctx.conn.client.clone(), &ctx.options.namespace);
        let _ = config_maps
            .delete(&plan_config_map_name(&restore), &Default::default())
            .await;
    }
    if let Err(refusal) = outcome {
        let failed = RestoreStatus {
            phase: Some(PHASE_FAILED.into()),
            completion_time: Some(now_rfc3339()),
            message: Some(refusal.message.clone()),
            conditions: vec![condition(
                "Completed",
                false,
                refusal.reason,
                &refusal.message,
                restore.metadata.generation,
            )],
            ..status.clone()
        };
        patch_status(&api, &name, &failed).await?;
        ctx.metrics.request("Restore", "failed");
        ctx.event(&*restore, true, refusal.reason, refusal.message)
            .await;
    }
    Ok(Action::await_change())
}

/// The snapshot and repository a Restore reads: its Backup's (in its own
/// namespace) or the ones it names.
async fn source(
    ctx: &Context,
    restore: &Restore,
    namespace: &str,
) -> Result<(String, String), Refusal> {
    match (&restore.spec.backup, &restore.spec.snapshot) {
        (Some(backup), None) => {
            let api: Api<Backup> = Api::namespaced(ctx.conn.client.clone(), namespace);
            let found = api
                .get_opt(backup)
                .await
                .map_err(|e| Refusal::new("BackupUnreadable", e.to_string()))?
                .ok_or_else(|| {
                    Refusal::new(
                        "BackupNotFound",
                        format!("Backup {backup} does not exist in namespace {namespace}; a Restore restores Backups of its own namespace"),
                    )
                })?;
            // Only the controller writes status: this snapshot is the one
            // the Backup stored.
            let snapshot = found.status.and_then(|s| s.snapshot).ok_or_else(|| {
                Refusal::new(
                    "BackupNotCompleted",
                    format!("Backup {backup} has no snapshot (it is not Completed)"),
                )
            })?;
            Ok((found.spec.repository, snapshot))
        }
        (None, Some(snapshot)) => {
            let repository = restore.spec.repository.clone().ok_or_else(|| {
                Refusal::new("InvalidSpec", "spec.snapshot needs spec.repository")
            })?;
            Ok((repository, snapshot.clone()))
        }
        _ => Err(Refusal::new(
            "InvalidSpec",
            "set exactly one of spec.backup and spec.snapshot",
        )),
    }
}

async fn target_profile(ctx: &Context) -> Result<crate::profile::ClusterProfile, String> {
    let discovery = crate::cluster::discovery::discover(&ctx.conn.client)
        .await
        .map_err(|e| format!("discovery of the target: {e}"))?;
    crate::cluster::profile::read_profile(&ctx.conn, &discovery)
        .await
        .map_err(|e| format!("reading the target's profile: {e}"))
}

fn options(restore: &Restore, namespace: &str) -> Result<RestoreOptions, Refusal> {
    let existing = match restore.spec.existing.as_deref() {
        None | Some("update") => ExistingPolicy::Update,
        Some("skip") => ExistingPolicy::Skip,
        Some("fail") => ExistingPolicy::Fail,
        Some(other) => {
            return Err(Refusal::new(
                "InvalidSpec",
                format!("existing: '{other}' is not one of skip, update, fail"),
            ));
        }
    };
    Ok(RestoreOptions {
        subset: Subset {
            selection: Selection {
                namespaces: vec![namespace.to_string()],
                include_deps: true,
                ..Default::default()
            },
            objects: Vec::new(),
            // The cluster is not the requester's to write: what their
            // objects need of it must exist, as validation checks.
            namespaced_only: true,
        },
        namespace_mapping: NamespaceMapping(restore.spec.namespace_mapping.clone()),
        transform: restore.spec.transform.as_ref().map(|text| TransformSource {
            text: text.clone(),
            name: format!("Restore {namespace}/{} spec.transform", restore.name_any()),
            base_dir: None,
        }),
        existing,
        concurrency: 8,
        skip_volume_data: restore.spec.skip_volume_data,
        ..Default::default()
    })
}

async fn plan_and_apply(
    ctx: &Context,
    restore: &Restore,
    api: &Api<Restore>,
    status: &RestoreStatus,
    interrupted: bool,
) -> Result<(), Refusal> {
    let namespace = restore.namespace().unwrap_or_default();
    let name = restore.name_any();
    let requester = restore.spec.requester.clone().ok_or_else(|| {
        Refusal::new(
            "NoRequester",
            "the Restore has no requester: the ferry-requester admission policy is not installed (`ferry controller manifests`), so the controller cannot tell whose permissions to use",
        )
    })?;
    let problems = confine::check_request(
        &namespace,
        &restore.spec.namespace_mapping,
        restore.spec.transform.as_deref(),
    );
    if !problems.is_empty() {
        return Err(Refusal::new("Refused", problems.join("; ")));
    }
    let (repository, snapshot) = source(ctx, restore, &namespace).await?;
    let mut opts = options(restore, &namespace)?;
    let opened = super::repository::open(ctx, &repository)
        .await
        .map_err(|e| Refusal::new("RepositoryUnavailable", e.to_string()))?;
    opts.mover = Some(opened.mover.clone());
    // The cluster's classes and versions as the controller sees them: the
    // requester may not list StorageClasses, yet their claims need one.
    opts.target_profile = Some(
        target_profile(ctx)
            .await
            .map_err(|e| Refusal::new("PlanFailed", e))?,
    );
    let conn = ctx
        .connect_as(&requester)
        .await
        .map_err(|e| Refusal::new("Unauthorized", e.to_string()))?;
    let planned = {
        let (conn, repo, snapshot, opts) = (
            conn.clone(),
            opened.repo.clone(),
            snapshot.clone(),
            opts.clone(),
        );
        super::on_own_thread(move || async move {
            crate::restore::plan(&conn, &repo, &snapshot, &opts).await
        })
        .await
        .map_err(|e| Refusal::new("PlanFailed", e.to_string()))?
    };
    let plan = planned.map_err(|e| match e {
            crate::restore::RestoreError::NothingSelected(_) => Refusal::new(
                "NothingToRestore",
                format!("snapshot {snapshot} holds no object of namespace {namespace}; a Restore reads only its own namespace"),
            ),
            crate::restore::RestoreError::Preflight(problems) => Refusal::new(
                "PreflightFailed",
                format!(
                    "preflight as {} found {} problem(s); nothing was written: {}",
                    requester.username,
                    problems.len(),
                    problems.join("; ")
                ),
            ),
            other => Refusal::new("PlanFailed", crate::cluster::connect::error_chain(&other)),
        })?;
    let outside = confine::check_plan(&namespace, &plan);
    if !outside.is_empty() {
        return Err(Refusal::new(
            "Refused",
            format!("nothing was written: {}", outside.join("; ")),
        ));
    }
    let config_map = save_plan(ctx, restore, &plan).await?;
    let mut actions: BTreeMap<String, i64> = BTreeMap::new();
    for item in plan.items() {
        *actions
            .entry(format!("{:?}", item.action).to_lowercase())
            .or_default() += 1;
    }
    let planned = RestoreStatus {
        phase: Some(
            if restore.spec.approve {
                PHASE_RUNNING
            } else {
                PHASE_PLANNED
            }
            .into(),
        ),
        snapshot: Some(snapshot.clone()),
        planned: Some(plan.items().count() as i64),
        actions,
        waves: Some(plan.waves.len() as i64),
        plan_config_map: Some(config_map),
        warnings: plan.warnings.clone(),
        start_time: status.start_time.clone().or_else(|| Some(now_rfc3339())),
        message: Some(if interrupted {
            "planned again after an interruption".into()
        } else if restore.spec.approve {
            format!(
                "restoring {} object(s) as {}",
                plan.items().count(),
                requester.username
            )
        } else {
            "planned; set spec.approve to true to apply this plan".into()
        }),
        ..Default::default()
    };
    patch_status(api, &name, &planned)
        .await
        .map_err(|e| Refusal::new("StatusUpdateFailed", e.to_string()))?;
    if !restore.spec.approve {
        ctx.event(
            restore,
            false,
            "Planned",
            planned.message.clone().unwrap_or_default(),
        )
        .await;
        return Ok(());
    }
    apply(ctx, restore, api, &conn, &opened, &plan, planned).await
}

async fn apply_approved(
    ctx: &Context,
    restore: &Restore,
    api: &Api<Restore>,
    status: &RestoreStatus,
) -> Result<(), Refusal> {
    let namespace = restore.namespace().unwrap_or_default();
    let requester = restore
        .spec
        .requester
        .clone()
        .ok_or_else(|| Refusal::new("NoRequester", "the Restore has no requester"))?;
    let plan = load_plan(ctx, status).await?;
    let outside = confine::check_plan(&namespace, &plan);
    if !outside.is_empty() {
        return Err(Refusal::new("Refused", outside.join("; ")));
    }
    let (repository, _) = source(ctx, restore, &namespace).await?;
    let opened = super::repository::open(ctx, &repository)
        .await
        .map_err(|e| Refusal::new("RepositoryUnavailable", e.to_string()))?;
    let conn = ctx
        .connect_as(&requester)
        .await
        .map_err(|e| Refusal::new("Unauthorized", e.to_string()))?;
    let running = RestoreStatus {
        phase: Some(PHASE_RUNNING.into()),
        message: Some(format!(
            "applying the approved plan as {}",
            requester.username
        )),
        ..status.clone()
    };
    patch_status(api, &restore.name_any(), &running)
        .await
        .map_err(|e| Refusal::new("StatusUpdateFailed", e.to_string()))?;
    apply(ctx, restore, api, &conn, &opened, &plan, running).await
}

async fn apply(
    ctx: &Context,
    restore: &Restore,
    api: &Api<Restore>,
    conn: &crate::cluster::Connection,
    opened: &super::repository::Opened,
    plan: &RestorePlan,
    mut status: RestoreStatus,
) -> Result<(), Refusal> {
    let mover = (!restore.spec.skip_volume_data).then(|| opened.mover.clone());
    let (conn, repo, plan) = (conn.clone(), opened.repo.clone(), plan.clone());
    let report = super::on_own_thread(move || async move {
        crate::restore::run_saved(
            &conn,
            &repo,
            &plan,
            8,
            &crate::restore::Silent,
            mover.as_ref(),
        )
        .await
    })
    .await
    .map_err(|e| Refusal::new("RestoreFailed", e.to_string()))?
    .map_err(|e| Refusal::new("RestoreFailed", crate::cluster::connect::error_chain(&e)))?;
    status.created = Some(report.created.len() as i64);
    status.updated = Some(report.updated.len() as i64);
    status.unchanged = Some(report.unchanged.len() as i64);
    status.failures = report
        .failed
        .iter()
        .map(|f| format!("{}: {}", f.object, f.message))
        .collect();
    status.warnings = report.warnings.clone();
    status.completion_time = Some(now_rfc3339());
    let ok = report.failed.is_empty();
    status.phase = Some(if ok { PHASE_COMPLETED } else { PHASE_FAILED }.into());
    let message = format!(
        "{} created, {} updated, {} unchanged, {} failed",
        report.created.len(),
        report.updated.len(),
        report.unchanged.len(),
        report.failed.len()
    );
    status.message = Some(message.clone());
    status.conditions = vec![condition(
        "Completed",
        ok,
        if ok { "Restored" } else { "ObjectsFailed" },
        &message,
        restore.metadata.generation,
    )];
    patch_status(api, &restore.name_any(), &status)
        .await
        .map_err(|e| Refusal::new("StatusUpdateFailed", e.to_string()))?;
    ctx.metrics
        .request("Restore", if ok { "completed" } else { "failed" });
    ctx.event(
        restore,
        !ok,
        if ok { "Completed" } else { "Failed" },
        message,
    )
    .await;
    Ok(())
}

fn plan_config_map_name(restore: &Restore) -> String {
    format!("ferry-plan-{}", restore.uid().unwrap_or_default())
}

async fn save_plan(
    ctx: &Context,
    restore: &Restore,
    plan: &RestorePlan,
) -> Result<String, Refusal> {
    let name = plan_config_map_name(restore);
    let json = serde_json::to_vec(plan).map_err(|e| Refusal::new("PlanFailed", e.to_string()))?;
    let compressed =
        zstd::bulk::compress(&json, 3).map_err(|e| Refusal::new("PlanFailed", e.to_string()))?;
    if compressed.len() > 900 * 1024 {
        return Err(Refusal::new(
            "PlanTooLarge",
            format!(
                "the plan is {} bytes compressed, more than a ConfigMap holds; restore with the CLI",
                compressed.len()
            ),
        ));
    }
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        CONTROLLER_NAME.to_string(),
                    ),
                    (
                        "ferry.dev/restore".to_string(),
                        format!(
                            "{}.{}",
                            restore.namespace().unwrap_or_default(),
                            restore.name_any()
                        ),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        binary_data: Some([(PLAN_KEY.to_string(), ByteString(compressed))].into()),
        ..Default::default()
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.conn.client.clone(), &ctx.options.namespace);
    api.patch(
        &name,
        &PatchParams::apply(CONTROLLER_NAME).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(|e| {
        Refusal::new(
            "PlanFailed",
            format!("saving the plan in ConfigMap {name}: {e}"),
        )
    })?;
    Ok(name)
}

async fn load_plan(ctx: &Context, status: &RestoreStatus) -> Result<RestorePlan, Refusal> {
    let name = status
        .plan_config_map
        .clone()
        .ok_or_else(|| Refusal::new("PlanMissing", "the Restore's status names no plan"))?;
    let api: Api<ConfigMap> = Api::namespaced(ctx.conn.client.clone(), &ctx.options.namespace);
    let config_map = api
        .get(&name)
        .await
        .map_err(|e| Refusal::new("PlanMissing", format!("reading ConfigMap {name}: {e}")))?;
    let bytes = config_map
        .binary_data
        .and_then(|d| d.get(PLAN_KEY).cloned())
        .ok_or_else(|| Refusal::new("PlanMissing", format!("ConfigMap {name} holds no plan")))?;
    let json = zstd::bulk::decompress(&bytes.0, 64 << 20)
        .map_err(|e| Refusal::new("PlanMissing", format!("ConfigMap {name}: {e}")))?;
    serde_json::from_slice(&json)
        .map_err(|e| Refusal::new("PlanMissing", format!("ConfigMap {name}: {e}")))
}
