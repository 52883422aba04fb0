//! `--dry-run`: the API server validates every write of the plan
//! (admission, schemas, immutable fields) without persisting it.

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::apply::{api_resource, desired_of};
use super::bodies::{Bodies, Body};
use super::plan::{Action, PlanItem, RestorePlan};
use super::target::resource_for;
use super::{FIELD_MANAGER, Failure, RestoreError, RestoreReport};
use crate::cluster::Connection;
use crate::cluster::api_message;
use crate::cluster::discovery::{Discovery, discover};

/// Asks the API server to validate every write of the plan without
/// persisting it (`dryRun=All`). Objects whose namespace the restore would
/// create first cannot be checked this way and are left out.
pub async fn server_dry_run(
    conn: &Connection,
    plan: &RestorePlan,
    bodies: &Bodies,
    report: &mut RestoreReport,
    discovery: Option<Discovery>,
) -> Result<(), RestoreError> {
    let discovery = match discovery {
        Some(d) => d,
        None => discover(&conn.client).await?,
    };
    let creates_namespaces: BTreeSet<&str> = plan
        .items()
        .filter(|i| i.object.kind == "Namespace" && i.action == Action::Create)
        .map(|i| i.object.name.as_str())
        .collect();
    let checked: Vec<&PlanItem> = plan
        .items()
        .filter(|i| matches!(i.action, Action::Create | Action::Update | Action::Recreate))
        .filter(|i| {
            !i.object
                .namespace
                .as_deref()
                .is_some_and(|n| creates_namespaces.contains(n))
        })
        .filter(|i| resource_for(&discovery, &i.object).is_some())
        .collect();
    let failures: Vec<Option<Failure>> = bodies
        .stream(checked, |i| desired_of(i))
        .map(|(item, body)| {
            let discovery = &discovery;
            async move {
                let message = match body.and_then(Body::decode) {
                    Err(e) => Some(format!("unreadable in the snapshot: {e}")),
                    Ok(mut value) => {
                        let served = resource_for(discovery, &item.object)?;
                        let resource = api_resource(&served);
                        let api: Api<DynamicObject> = match &item.object.namespace {
                            Some(ns) => Api::namespaced_with(conn.client.clone(), ns, &resource),
                            None => Api::all_with(conn.client.clone(), &resource),
                        };
                        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
                        {
                            meta.remove("ownerReferences");
                        }
                        let params = PatchParams::apply(FIELD_MANAGER).force().dry_run();
                        api.patch(&item.object.name, &params, &Patch::Apply(&value))
                            .await
                            .err()
                            .map(|e| format!("server-side dry run: {}", api_message(&e)))
                    }
                };
                message.map(|message| Failure {
                    object: item.object.to_string(),
                    message,
                })
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    report.failed.extend(failures.into_iter().flatten());
    Ok(())
}
