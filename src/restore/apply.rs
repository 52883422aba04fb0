//! apply: carries out a plan wave by wave. Bodies are read from the packs
//! a batch at a time as the writes go (memory follows the batch, not the
//! snapshot); writes run concurrently within a wave, with retries on
//! throttling, server errors and conflicts; CRDs must be Established and
//! Namespaces Active before the next wave. Objects that do not exist are
//! created with a plain create (half the API server's work of an apply
//! that creates; Ferry's fields are recorded as an update and adopted into
//! its apply entry by a later update, see [`super::managed`]); existing
//! ones get a server-side apply with field manager `ferry`.
//!
//! A saved plan is applied only onto the target it was made for: every
//! object must still be as the plan saw it (absent, or at the same
//! resourceVersion), or nothing is written and the changed objects are
//! named; writes then carry the resourceVersion as a precondition.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::core::{ApiResource, PartialObjectMeta};
use serde_json::Value;

use super::bodies::{Bodies, Body, Desired, digest};
use super::managed::adopted_managed_fields;
use super::observer::{Event, Observer};
use super::plan::{Action, PlanItem, RestorePlan};
use super::target::{absent_namespaces, live, resource_for};
use super::{FIELD_MANAGER, Failure, RestoreError, RestoreReport, cascades};
use crate::cluster::capture::get_object;
use crate::cluster::discovery::{Discovery, ServedResource, discover};
use crate::cluster::{Connection, api_message};
use crate::model::ObjectRef;

/// How the plan is applied.
pub struct ApplyOptions<'a> {
    pub concurrency: usize,
    /// The plan was saved earlier: check that the target did not change
    /// since, and write with resourceVersion preconditions.
    pub saved: bool,
    pub observer: &'a dyn Observer,
    /// Runs after each wave, before the next starts (fills restored claims
    /// with their data before the workloads that mount them exist).
    pub after_wave: Option<&'a dyn AfterWave>,
}

/// Work around waves. An error stops the restore: later waves are not
/// written, and the error is reported as a failure.
#[async_trait::async_trait]
pub trait AfterWave: Send + Sync {
    /// Before a wave is written: JSON merge patches for objects it creates
    /// (a claim's `dataSource`, say), by object.
    async fn before_wave(
        &self,
        conn: &Connection,
        items: &[(crate::model::ObjectRef, Action)],
    ) -> Result<HashMap<crate::model::ObjectRef, serde_json::Value>, String> {
        let _ = (conn, items);
        Ok(HashMap::new())
    }

    /// `written` are the objects the wave wrote, with what was done.
    /// Returns warnings.
    async fn after_wave(
        &self,
        conn: &Connection,
        written: &[(crate::model::ObjectRef, Action)],
    ) -> Result<Vec<String>, String>;
}

/// The body an item writes.
pub(crate) fn desired_of(item: &PlanItem) -> Desired {
    Desired {
        object: item.object.clone(),
        blob: item.blob.as_deref().and_then(|b| b.parse().ok()),
    }
}

/// Objects of a saved plan that the target no longer has as planned.
pub async fn target_changes(
    conn: &Connection,
    discovery: &Discovery,
    plan: &RestorePlan,
) -> Result<Vec<String>, RestoreError> {
    let desired: Vec<Desired> = plan.items().map(desired_of).collect();
    let absent = absent_namespaces(conn, discovery, &desired).await?;
    let found: Vec<Result<Option<String>, RestoreError>> = futures::stream::iter(plan.items())
        .map(|item| {
            let absent = &absent;
            async move {
                let o = &item.object;
                let in_absent = match &o.namespace {
                    Some(ns) => absent.contains(ns),
                    None => o.kind == "Namespace" && absent.contains(&o.name),
                };
                let now = if in_absent {
                    None
                } else {
                    live(conn, discovery, o).await?.and_then(|v| {
                        v.pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .map(String::from)
                    })
                };
                Ok((now != item.live).then(|| {
                    let was = item
                        .live
                        .as_deref()
                        .map_or("absent".to_string(), |rv| format!("resourceVersion {rv}"));
                    let is = now
                        .as_deref()
                        .map_or("absent".to_string(), |rv| format!("resourceVersion {rv}"));
                    format!("{o}: planned {was}, now {is}")
                }))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut changed = Vec::new();
    for f in found {
        changed.extend(f?);
    }
    changed.sort();
    Ok(changed)
}

/// Applies `plan`; bodies come from `bodies`, the target's API from
/// `discovery` (read anew when `None`).
pub async fn apply(
    conn: &Connection,
    plan: &RestorePlan,
    bodies: &Bodies,
    opts: &ApplyOptions<'_>,
    discovery: Option<Discovery>,
) -> Result<RestoreReport, RestoreError> {
    // The planning's discovery when there was one: the target is read once.
    let mut discovery = match discovery {
        Some(d) => d,
        None => discover(&conn.client).await?,
    };
    if opts.saved {
        let changed = target_changes(conn, &discovery, plan).await?;
        if !changed.is_empty() {
            return Err(RestoreError::TargetChanged(changed));
        }
    }
    let mut report = RestoreReport {
        warnings: plan.warnings.clone(),
        ..Default::default()
    };
    opts.observer.event(Event::Planned {
        objects: plan.items().count(),
    });
    let mut uids: HashMap<String, String> = HashMap::new();
    for wave in &plan.waves {
        opts.observer.event(Event::Wave {
            index: wave.index,
            objects: wave.items.len(),
        });
        let (writes, kept): (Vec<&PlanItem>, Vec<&PlanItem>) = wave
            .items
            .iter()
            .partition(|i| matches!(i.action, Action::Create | Action::Update | Action::Recreate));
        for item in kept {
            record(&mut report, opts.observer, item, Ok(None), &mut uids);
        }
        let patches = match opts.after_wave {
            Some(hooks) => {
                let items: Vec<(crate::model::ObjectRef, Action)> = writes
                    .iter()
                    .map(|i| (i.object.clone(), i.action))
                    .collect();
                match hooks.before_wave(conn, &items).await {
                    Ok(p) => p,
                    Err(message) => {
                        report.failed.push(Failure {
                            object: format!("wave {}", wave.index),
                            message: format!(
                                "{message}; this and the later waves were not restored"
                            ),
                        });
                        return Ok(report);
                    }
                }
            }
            None => HashMap::new(),
        };
        let results: Vec<(&PlanItem, Result<Option<String>, String>)> = bodies
            .stream(writes, |i| desired_of(i))
            .map(|(item, body)| {
                let discovery = &discovery;
                let uids = &uids;
                let patch = patches.get(&item.object);
                async move {
                    let result = match body.and_then(Body::decode) {
                        Ok(value) => {
                            apply_one(conn, discovery, item, value, patch, uids, opts.saved).await
                        }
                        Err(e) => Err(format!("unreadable in the snapshot: {e}")),
                    };
                    (item, result)
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        let mut gates = Vec::new();
        let written: Vec<(crate::model::ObjectRef, Action)> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(item, _)| (item.object.clone(), item.action))
            .chain(
                wave.items
                    .iter()
                    .filter(|i| i.action == Action::Unchanged)
                    .map(|i| (i.object.clone(), i.action)),
            )
            .collect();
        for (item, result) in results {
            if result.is_ok()
                && matches!(
                    item.object.kind.as_str(),
                    "CustomResourceDefinition" | "Namespace"
                )
            {
                gates.push(item.object.clone());
            }
            record(&mut report, opts.observer, item, result, &mut uids);
        }
        if !gates.is_empty() {
            wait_ready(conn, &gates, &mut report).await;
            if gates.iter().any(|g| g.kind == "CustomResourceDefinition") {
                discovery = discover_serving(conn, &gates).await?;
            }
        }
        // Tests kill the process here: one wave is written, the rest not.
        crate::failpoint::stop_here("restore-after-first-wave").await;
        if let Some(after) = opts.after_wave {
            match after.after_wave(conn, &written).await {
                Ok(warnings) => report.warnings.extend(warnings),
                Err(message) => {
                    // Nothing that would mount a half-filled volume is written.
                    report.failed.push(Failure {
                        object: format!("wave {}", wave.index),
                        message: format!("{message}; the later waves were not restored"),
                    });
                    return Ok(report);
                }
            }
        }
    }
    Ok(report)
}

fn record(
    report: &mut RestoreReport,
    observer: &dyn Observer,
    item: &PlanItem,
    result: Result<Option<String>, String>,
    uids: &mut HashMap<String, String>,
) {
    let name = item.object.to_string();
    observer.event(Event::Object {
        object: &item.object,
        action: item.action,
        failed: result.is_err(),
    });
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
        }
        Err(message) => report.failed.push(Failure {
            object: name,
            message,
        }),
    }
}

fn gk_key(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!("{group}/{kind}/{}/{name}", namespace.unwrap_or_default())
}

/// Writes one object; returns its UID in the target.
async fn apply_one(
    conn: &Connection,
    discovery: &Discovery,
    item: &PlanItem,
    mut value: Value,
    patch: Option<&Value>,
    uids: &HashMap<String, String>,
    saved: bool,
) -> Result<Option<String>, String> {
    let o = &item.object;
    if let Some(planned) = &item.digest
        && *planned != digest(&value)
    {
        return Err(
            "the transform now yields another object than the plan shows; make a new plan".into(),
        );
    }
    // What the restore itself changes at write time (a claim's data source)
    // is not part of the planned object, so it comes after the check.
    if let Some(patch) = patch {
        json_patch::merge(&mut value, patch);
    }
    let Some(served) = resource_for(discovery, o) else {
        return Err(format!(
            "the target does not serve {} {}",
            o.api_version(),
            o.kind
        ));
    };
    let resource = api_resource(&served);
    let api: Api<DynamicObject> = match &o.namespace {
        Some(ns) => Api::namespaced_with(conn.client.clone(), ns, &resource),
        None => Api::all_with(conn.client.clone(), &resource),
    };
    repoint_owners(conn, discovery, &mut value, o.namespace.as_deref(), uids).await;
    let retry = crate::cluster::retry::RetryPolicy::default();
    if item.action == Action::Recreate {
        // Objects it owns are orphaned, not deleted: a recreate replaces the
        // snapshot's objects only. (Cascading kinds get here only when the
        // user asked for exactly that; their deletion cascades regardless.)
        let mut params = if cascades(o).is_some() {
            DeleteParams::foreground()
        } else {
            DeleteParams::orphan()
        };
        if saved {
            params.preconditions = Some(Preconditions {
                resource_version: item.live.clone(),
                uid: None,
            });
        }
        match retry.run(|| api.delete(&o.name, &params)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("delete before recreate: {}", api_message(&e))),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while matches!(api.get_opt(&o.name).await, Ok(Some(_))) {
            if tokio::time::Instant::now() > deadline {
                return Err("the old object was not deleted within 120s".into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let collection = served.url_path(o.namespace.as_deref());
    if matches!(item.action, Action::Create | Action::Recreate) {
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
            Ok(created) => return Ok(created.metadata.uid),
            Err(kube::Error::Api(s)) if s.code == 409 && saved => {
                return Err(
                    "created in the target since the plan was made; make a new plan".into(),
                );
            }
            // Created since the plan was made: apply onto it as an update does.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api_message(&e)),
        }
    }
    let current = live(conn, discovery, o).await.map_err(|e| e.to_string())?;
    let mut resource_version = current
        .as_ref()
        .and_then(|v| {
            v.pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
        })
        .map(String::from);
    if saved && item.action == Action::Update && resource_version != item.live {
        return Err(format!(
            "changed in the target since the plan was made (resourceVersion {}, planned {}); make a new plan",
            resource_version.as_deref().unwrap_or("absent"),
            item.live.as_deref().unwrap_or("absent")
        ));
    }
    if let Some(current) = &current {
        super::keep_claim_restore_state(o, &mut value, current);
    }
    if let Some((managed_fields, rv)) = current.as_ref().and_then(adopted_managed_fields) {
        let patch = serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "replace", "path": "/metadata/managedFields", "value": managed_fields},
        ]);
        let request = http::Request::patch(format!("{collection}/{}", o.name))
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(patch.to_string().into_bytes())
            .map_err(|e| e.to_string())?;
        match conn.client.request::<PartialObjectMeta>(request).await {
            Ok(adopted) => resource_version = adopted.metadata.resource_version,
            // Best effort: if the object changed meanwhile, the apply below
            // still sets every field; only a dropped field may stay behind.
            Err(e) => {
                tracing::info!(object = %o, error = %api_message(&e), "managed fields not adopted")
            }
        }
    }
    if saved
        && let (Some(rv), Some(meta)) = (
            resource_version,
            value.get_mut("metadata").and_then(Value::as_object_mut),
        )
    {
        meta.insert("resourceVersion".into(), Value::String(rv));
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&value);
    retry
        .run(|| api.patch(&o.name, &params, &patch))
        .await
        .map(|o| o.metadata.uid)
        .map_err(|e| api_message(&e))
}

pub(crate) fn api_resource(served: &ServedResource) -> ApiResource {
    ApiResource {
        group: served.group.clone(),
        version: served.version.clone(),
        api_version: served.api_version(),
        kind: served.kind.clone(),
        plural: served.plural.clone(),
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

/// The target's discovery once it lists the resources of the CRDs just
/// written: the API server's discovery follows an Established CRD a moment
/// later, and the custom resources of the next wave would fail as not
/// served. After 30 s the restore goes on; what is still missing fails by
/// name.
async fn discover_serving(
    conn: &Connection,
    gates: &[ObjectRef],
) -> Result<Discovery, RestoreError> {
    let crds: Vec<&str> = gates
        .iter()
        .filter(|g| g.kind == "CustomResourceDefinition" && g.group == "apiextensions.k8s.io")
        .map(|g| g.name.as_str())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let discovery = discover(&conn.client).await?;
        let all_served = crds.iter().all(|name| {
            discovery
                .resources
                .iter()
                .any(|r| r.qualified_plural() == *name)
        });
        if all_served || tokio::time::Instant::now() > deadline {
            return Ok(discovery);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
