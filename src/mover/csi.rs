//! CSI snapshots through the snapshot.storage.k8s.io API: the class for a
//! driver, taking a VolumeSnapshot and waiting for it, and a claim made
//! from one for a mover to read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use super::{KeptGroup, KeptSnapshot, LABEL_KEPT_BY, LABEL_MOVER};

/// How long an error in a snapshot's status may last before the wait
/// gives up: the error is the controller's last failed attempt, and it
/// retries (a conflicting status update, say, is gone a moment later).
const ERROR_GRACE: Duration = Duration::from_secs(30);

/// Tells a passing error in a snapshot's status from a lasting one.
#[derive(Default)]
struct StatusError {
    since: Option<Instant>,
}

impl StatusError {
    /// The error of `status`, once it has lasted [`ERROR_GRACE`].
    fn lasting(&mut self, status: &Value) -> Option<String> {
        match status["error"]["message"].as_str() {
            None => {
                self.since = None;
                None
            }
            Some(message) => {
                let since = *self.since.get_or_insert_with(Instant::now);
                (since.elapsed() > ERROR_GRACE).then(|| message.to_string())
            }
        }
    }
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

fn group_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "groupsnapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

/// The VolumeSnapshotClass for `driver`: the default one of the driver if
/// marked, else the first. `None` when the cluster has none (or no
/// snapshot API at all).
pub(super) async fn class_for(client: &kube::Client, driver: &str) -> Option<String> {
    pick_class(
        client,
        &resource("VolumeSnapshotClass"),
        driver,
        "snapshot.storage.kubernetes.io/is-default-class",
    )
    .await
}

/// The class of `driver` among the objects of `classes`: the one marked
/// default by `default_annotation`, else the first by name.
async fn pick_class(
    client: &kube::Client,
    classes: &ApiResource,
    driver: &str,
    default_annotation: &str,
) -> Option<String> {
    let list = Api::<DynamicObject>::all_with(client.clone(), classes)
        .list(&Default::default())
        .await
        .ok()?;
    let mut matching: Vec<&DynamicObject> = list
        .items
        .iter()
        .filter(|c| c.data["driver"] == json!(driver))
        .collect();
    matching.sort_by_key(|c| {
        let default = c
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(default_annotation))
            .is_some_and(|v| v == "true");
        (!default, c.metadata.name.clone())
    });
    matching.first().and_then(|c| c.metadata.name.clone())
}

/// Takes a VolumeSnapshot of `claim` and waits until it is ready to use.
pub(super) async fn take(
    client: &kube::Client,
    namespace: &str,
    claim: &str,
    class: &str,
    name: &str,
    label: &str,
    timeout: Duration,
) -> Result<KeptSnapshot, String> {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "labels": {LABEL_MOVER: label, "app.kubernetes.io/managed-by": "ferry"}},
        "spec": {"volumeSnapshotClassName": class, "source": {"persistentVolumeClaimName": claim}}
    }))
    .expect("a VolumeSnapshot");
    snapshots
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| format!("creating VolumeSnapshot {name}: {e}"))?;
    let started = Instant::now();
    let mut error = StatusError::default();
    let ready = loop {
        let current = snapshots
            .get(name)
            .await
            .map_err(|e| format!("reading VolumeSnapshot {name}: {e}"))?;
        let status = &current.data["status"];
        if status["readyToUse"] == json!(true) {
            break current;
        }
        if let Some(message) = error.lasting(status) {
            return Err(format!("VolumeSnapshot {name} failed: {message}"));
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "VolumeSnapshot {name} was not ready within {}",
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let content_name = ready.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let content = contents
        .get(&content_name)
        .await
        .map_err(|e| format!("reading VolumeSnapshotContent {content_name}: {e}"))?;
    Ok(KeptSnapshot {
        server: String::new(),
        volume_snapshot: format!("{namespace}/{name}"),
        content: content_name,
        driver: content.data["spec"]["driver"]
            .as_str()
            .unwrap_or_default()
            .into(),
        handle: content.data["status"]["snapshotHandle"]
            .as_str()
            .unwrap_or_default()
            .into(),
        class: Some(class.to_string()),
        restore_size: ready.data["status"]["restoreSize"]
            .as_str()
            .map(String::from),
        group: None,
    })
}

/// Keeps the snapshot's data when its VolumeSnapshot is deleted (with its
/// namespace, say): the kept snapshot is a recovery point of the backup.
/// The label names the repository that keeps it (see [`kept_patch`]).
pub(super) async fn retain(
    client: &kube::Client,
    content: &str,
    repository_id: &str,
) -> Result<(), String> {
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    contents
        .patch(
            content,
            &PatchParams::default(),
            &Patch::Merge(kept_patch(repository_id)),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!("setting deletionPolicy Retain on VolumeSnapshotContent {content}: {e}")
        })
}

/// The CSI volume a VolumeSnapshotContent was taken of (its
/// `spec.source.volumeHandle`); `None` when it is gone or was
/// pre-provisioned from a snapshot handle.
pub(super) async fn source_volume(client: &kube::Client, content: &str) -> Option<String> {
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let object = contents.get_opt(content).await.ok()??;
    object.data["spec"]["source"]["volumeHandle"]
        .as_str()
        .map(String::from)
}

pub(super) async fn delete(client: &kube::Client, namespace: &str, name: &str) {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    let _ = snapshots.delete(name, &DeleteParams::default()).await;
}

/// Retain, and the label `ferry.dev/kept-by=REPOSITORY-ID`: a content of a
/// repository that no snapshot of it references is a leak its prune
/// releases ([`kept_by`]).
fn kept_patch(repository_id: &str) -> Value {
    json!({
        "metadata": {"labels": {LABEL_KEPT_BY: repository_id}},
        "spec": {"deletionPolicy": "Retain"}
    })
}

/// Drops the `ferry.dev/kept-by` label of a kept content (of
/// `VolumeSnapshotContent` or, with `group`, `VolumeGroupSnapshotContent`):
/// the user keeps it, and no sweep takes it for a leak.
pub(super) async fn disown(
    client: &kube::Client,
    content: &str,
    group: bool,
) -> Result<(), String> {
    let kind = if group {
        group_resource("VolumeGroupSnapshotContent")
    } else {
        resource("VolumeSnapshotContent")
    };
    match Api::<DynamicObject>::all_with(client.clone(), &kind)
        .patch(
            content,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {LABEL_KEPT_BY: null}}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(format!(
            "removing label {LABEL_KEPT_BY} from {} {content}: {e}",
            kind.kind
        )),
    }
}

/// The kept snapshot and group snapshot contents labelled for the
/// repository `repository_id`, as records [`release`] and
/// [`release_group`] take.
pub(super) async fn kept_by(
    client: &kube::Client,
    repository_id: &str,
) -> Result<(Vec<KeptSnapshot>, Vec<KeptGroup>), String> {
    let selector = format!("{LABEL_KEPT_BY}={repository_id}");
    let params = kube::api::ListParams::default().labels(&selector);
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    // A cluster that serves no snapshots has none to leak.
    let listed = match contents.list(&params).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => return Err(format!("listing VolumeSnapshotContents ({selector}): {e}")),
    };
    let singles = listed
        .into_iter()
        .map(|c| {
            let reference = &c.data["spec"]["volumeSnapshotRef"];
            KeptSnapshot {
                server: String::new(),
                volume_snapshot: format!(
                    "{}/{}",
                    reference["namespace"].as_str().unwrap_or_default(),
                    reference["name"].as_str().unwrap_or_default()
                ),
                content: c.metadata.name.clone().unwrap_or_default(),
                driver: c.data["spec"]["driver"].as_str().unwrap_or_default().into(),
                handle: c.data["status"]["snapshotHandle"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                class: None,
                restore_size: None,
                group: None,
            }
        })
        .collect();
    let groups = match Api::<DynamicObject>::all_with(
        client.clone(),
        &group_resource("VolumeGroupSnapshotContent"),
    )
    .list(&params)
    .await
    {
        Ok(list) => list
            .items
            .into_iter()
            .map(|c| {
                let reference = &c.data["spec"]["volumeGroupSnapshotRef"];
                KeptGroup {
                    volume_group_snapshot: format!(
                        "{}/{}",
                        reference["namespace"].as_str().unwrap_or_default(),
                        reference["name"].as_str().unwrap_or_default()
                    ),
                    content: c.metadata.name.clone().unwrap_or_default(),
                    handle: c.data["status"]["volumeGroupSnapshotHandle"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                }
            })
            .collect(),
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => {
            return Err(format!(
                "listing VolumeGroupSnapshotContents ({selector}): {e}"
            ));
        }
    };
    Ok((singles, groups))
}

/// A claim made from a VolumeSnapshot, of the source claim's class and
/// access modes, for a mover to read.
pub(super) async fn claim_from_snapshot(
    client: &kube::Client,
    namespace: &str,
    source: &PersistentVolumeClaim,
    snapshot: &str,
    restore_size: Option<&str>,
    name: &str,
    label: &str,
) -> Result<(), String> {
    let spec = source.spec.clone().unwrap_or_default();
    let requested = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone());
    let size = restore_size
        .map(String::from)
        .or(requested)
        .unwrap_or_else(|| "1Gi".into());
    let mut claim_spec = json!({
        "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
        "resources": {"requests": {"storage": size}},
        "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}
    });
    if let Some(class) = spec.storage_class_name {
        claim_spec["storageClassName"] = Value::String(class);
    }
    if let Some(mode) = spec.volume_mode {
        claim_spec["volumeMode"] = Value::String(mode);
    }
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": {LABEL_MOVER: label, "app.kubernetes.io/managed-by": "ferry"}},
        "spec": claim_spec
    }))
    .expect("a claim");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &claim)
        .await
        .map(|_| ())
        .map_err(|e| format!("creating claim {name} from VolumeSnapshot {snapshot}: {e}"))
}

pub(super) async fn delete_claim(client: &kube::Client, namespace: &str, name: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let _ = claims.delete(name, &DeleteParams::default()).await;
}

/// A VolumeSnapshot in `namespace` bound to a kept snapshot (through a
/// pre-provisioned VolumeSnapshotContent naming its handle), ready to be a
/// claim's data source. The content keeps the data when deleted (Retain).
pub(super) async fn bind_kept(
    client: &kube::Client,
    kept: &KeptSnapshot,
    namespace: &str,
    name: &str,
    label: &str,
    timeout: Duration,
) -> Result<(), String> {
    let labels = json!({LABEL_MOVER: label, "app.kubernetes.io/managed-by": "ferry"});
    let mut content_spec = json!({
        "deletionPolicy": "Retain",
        "driver": kept.driver,
        "source": {"snapshotHandle": kept.handle},
        "volumeSnapshotRef": {"namespace": namespace, "name": name}
    });
    if let Some(class) = &kept.class {
        content_spec["volumeSnapshotClassName"] = json!(class);
    }
    let content: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": {"name": name, "labels": labels}, "spec": content_spec
    }))
    .expect("a VolumeSnapshotContent");
    Api::<DynamicObject>::all_with(client.clone(), &resource("VolumeSnapshotContent"))
        .create(&PostParams::default(), &content)
        .await
        .map_err(|e| {
            format!(
                "creating VolumeSnapshotContent {name} for snapshot {}: {e}",
                kept.handle
            )
        })?;
    let snapshot: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "labels": labels},
        "spec": {"source": {"volumeSnapshotContentName": name}}
    }))
    .expect("a VolumeSnapshot");
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .map_err(|e| format!("creating VolumeSnapshot {namespace}/{name}: {e}"))?;
    let started = Instant::now();
    let mut error = StatusError::default();
    loop {
        let current = snapshots
            .get(name)
            .await
            .map_err(|e| format!("reading VolumeSnapshot {namespace}/{name}: {e}"))?;
        if current.data["status"]["readyToUse"] == json!(true) {
            return Ok(());
        }
        if let Some(message) = error.lasting(&current.data["status"]) {
            return Err(format!(
                "VolumeSnapshot {namespace}/{name} failed: {message}"
            ));
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "VolumeSnapshot {namespace}/{name} of kept snapshot {} was not ready within {}",
                kept.handle,
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes a kept snapshot for good: its content's deletionPolicy becomes
/// Delete, so the driver deletes the data, then the VolumeSnapshot (if it
/// is still there and still bound to that content) and the content go.
/// What is already gone counts as released.
pub(super) async fn release(client: &kube::Client, kept: &KeptSnapshot) -> Result<(), String> {
    release_kept(
        client,
        &KeptKind {
            content: resource("VolumeSnapshotContent"),
            object: resource("VolumeSnapshot"),
            handle_field: "snapshotHandle",
            bound_field: "boundVolumeSnapshotContentName",
        },
        &kept.content,
        &kept.handle,
        &kept.volume_snapshot,
    )
    .await
}

/// The two objects of a kept snapshot or group snapshot.
struct KeptKind {
    content: ApiResource,
    object: ApiResource,
    /// The driver's id in the content's status (and spec.source).
    handle_field: &'static str,
    /// The object's status field naming its content.
    bound_field: &'static str,
}

/// Releases the content `content_name` (holding `handle`) and its object
/// `namespace/name`, as [`release`] describes.
async fn release_kept(
    client: &kube::Client,
    kind: &KeptKind,
    content_name: &str,
    handle: &str,
    object: &str,
) -> Result<(), String> {
    let content_kind = &kind.content.kind;
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &kind.content);
    let content = contents
        .get_opt(content_name)
        .await
        .map_err(|e| format!("reading {content_kind} {content_name}: {e}"))?;
    if let Some(content) = &content {
        // A content of the same name that holds another snapshot is not ours.
        let current = content.data["status"][kind.handle_field]
            .as_str()
            .or_else(|| content.data["spec"]["source"][kind.handle_field].as_str());
        if !handle.is_empty() && current.is_some_and(|h| h != handle) {
            return Err(format!(
                "{content_kind} {content_name} now holds snapshot {}, not {handle}: left alone",
                current.unwrap_or_default(),
            ));
        }
        // A member of a released group may be going already.
        match contents
            .patch(
                content_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "setting deletionPolicy Delete on {content_kind} {content_name}: {e}"
                ));
            }
        }
    }
    if let Some((namespace, name)) = object.split_once('/') {
        let object_kind = &kind.object.kind;
        let objects: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &kind.object);
        match objects.get_opt(name).await {
            Ok(Some(current))
                if current.data["status"][kind.bound_field] == json!(content_name) =>
            {
                objects
                    .delete(name, &DeleteParams::default())
                    .await
                    .map_err(|e| format!("deleting {object_kind} {object}: {e}"))?;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("reading {object_kind} {object}: {e}")),
        }
    }
    if content.is_some() {
        match contents
            .delete(content_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(format!("deleting {content_kind} {content_name}: {e}")),
        }
    }
    Ok(())
}

/// The VolumeGroupSnapshotClass for `driver`, chosen as [`class_for`]
/// chooses. `None` when the cluster has none, or does not serve group
/// snapshots at all.
pub(super) async fn group_class_for(client: &kube::Client, driver: &str) -> Option<String> {
    pick_class(
        client,
        &group_resource("VolumeGroupSnapshotClass"),
        driver,
        "groupsnapshot.storage.kubernetes.io/is-default-class",
    )
    .await
}

/// A volume group snapshot to take: every claim of `namespace` labelled
/// `key=value`, snapshotted by the driver at one instant.
pub(super) struct GroupRequest<'a> {
    pub namespace: &'a str,
    /// The labels that select the group's claims.
    pub selector: &'a BTreeMap<String, String>,
    pub class: &'a str,
    /// The claims of the backup in the group; each must get a member.
    pub claims: &'a [String],
}

/// Labels as a label selector: `k1=v1,k2=v2`.
pub(super) fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Takes a VolumeGroupSnapshot and waits until it and its members are
/// ready; returns each claim's member snapshot, keyed by claim name. On
/// failure the group snapshot is deleted again.
pub(super) async fn take_group(
    client: &kube::Client,
    request: &GroupRequest<'_>,
    name: &str,
    label: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, KeptSnapshot>, String> {
    let namespace = request.namespace;
    let groups: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &group_resource("VolumeGroupSnapshot"),
    );
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
        "metadata": {"name": name, "labels": {LABEL_MOVER: label, "app.kubernetes.io/managed-by": "ferry"}},
        "spec": {
            "volumeGroupSnapshotClassName": request.class,
            "source": {"selector": {"matchLabels": request.selector}}
        }
    }))
    .expect("a VolumeGroupSnapshot");
    groups
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| format!("creating VolumeGroupSnapshot {namespace}/{name}: {e}"))?;
    let result = wait_for_members(client, request, name, timeout).await;
    if result.is_err() {
        delete_group(client, namespace, name).await;
    }
    result
}

async fn wait_for_members(
    client: &kube::Client,
    request: &GroupRequest<'_>,
    name: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, KeptSnapshot>, String> {
    let namespace = request.namespace;
    let groups: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &group_resource("VolumeGroupSnapshot"),
    );
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let started = Instant::now();
    let mut error = StatusError::default();
    let too_late = |what: &str| {
        format!(
            "VolumeGroupSnapshot {namespace}/{name}: {what} within {}",
            humantime::format_duration(timeout)
        )
    };
    loop {
        let group = groups
            .get(name)
            .await
            .map_err(|e| format!("reading VolumeGroupSnapshot {namespace}/{name}: {e}"))?;
        let status = &group.data["status"];
        if status["readyToUse"] != json!(true)
            && let Some(message) = error.lasting(status)
        {
            return Err(format!(
                "VolumeGroupSnapshot {namespace}/{name} failed: {message}"
            ));
        }
        if status["readyToUse"] == json!(true) {
            let group_content = status["boundVolumeGroupSnapshotContentName"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let uid = group.metadata.uid.clone().unwrap_or_default();
            let members = snapshots
                .list(&Default::default())
                .await
                .map_err(|e| format!("listing VolumeSnapshots of {namespace}: {e}"))?;
            let group_handle = status_handle(&group_content, client).await;
            let mut found = BTreeMap::new();
            for member in members.items.iter().filter(|s| {
                s.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|r| r.uid == uid))
            }) {
                let Some(claim) = member.data["spec"]["source"]["persistentVolumeClaimName"]
                    .as_str()
                    .filter(|c| request.claims.iter().any(|w| w == c))
                else {
                    continue;
                };
                let content_name = member.data["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .unwrap_or_default();
                if member.data["status"]["readyToUse"] != json!(true) || content_name.is_empty() {
                    continue;
                }
                let Some(content) = contents
                    .get_opt(content_name)
                    .await
                    .map_err(|e| format!("reading VolumeSnapshotContent {content_name}: {e}"))?
                else {
                    continue;
                };
                let Some(handle) = content.data["status"]["snapshotHandle"].as_str() else {
                    continue;
                };
                found.insert(
                    claim.to_string(),
                    KeptSnapshot {
                        server: String::new(),
                        volume_snapshot: format!(
                            "{namespace}/{}",
                            member.metadata.name.as_deref().unwrap_or_default()
                        ),
                        content: content_name.to_string(),
                        driver: content.data["spec"]["driver"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                        handle: handle.into(),
                        class: None,
                        restore_size: member.data["status"]["restoreSize"]
                            .as_str()
                            .map(String::from),
                        group: Some(KeptGroup {
                            volume_group_snapshot: format!("{namespace}/{name}"),
                            content: group_content.clone(),
                            handle: group_handle.clone(),
                        }),
                    },
                );
            }
            if found.len() == request.claims.len() {
                return Ok(found);
            }
            if started.elapsed() > timeout {
                let missing: Vec<&str> = request
                    .claims
                    .iter()
                    .filter(|c| !found.contains_key(*c))
                    .map(String::as_str)
                    .collect();
                return Err(too_late(&format!(
                    "no ready member snapshot of claim(s) {} (are they labelled {}?)",
                    missing.join(", "),
                    label_selector(request.selector)
                )));
            }
        } else if started.elapsed() > timeout {
            return Err(too_late("not ready"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The driver's handle of a group snapshot, from its content.
async fn status_handle(group_content: &str, client: &kube::Client) -> String {
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &group_resource("VolumeGroupSnapshotContent"),
    );
    match contents.get_opt(group_content).await {
        Ok(Some(c)) => c.data["status"]["volumeGroupSnapshotHandle"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// Deletes a group snapshot; its members go with it (the controller
/// removes them; they cannot be deleted one by one while it exists).
pub(super) async fn delete_group(client: &kube::Client, namespace: &str, name: &str) {
    let groups: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &group_resource("VolumeGroupSnapshot"),
    );
    let _ = groups.delete(name, &DeleteParams::default()).await;
}

/// Keeps a group snapshot's data when its VolumeGroupSnapshot is deleted.
pub(super) async fn retain_group(
    client: &kube::Client,
    content: &str,
    repository_id: &str,
) -> Result<(), String> {
    Api::<DynamicObject>::all_with(
        client.clone(),
        &group_resource("VolumeGroupSnapshotContent"),
    )
    .patch(
        content,
        &PatchParams::default(),
        &Patch::Merge(kept_patch(repository_id)),
    )
    .await
    .map(|_| ())
    .map_err(|e| {
        format!("setting deletionPolicy Retain on VolumeGroupSnapshotContent {content}: {e}")
    })
}

/// Deletes a kept group snapshot for good, as [`release`] does a single
/// one; the driver deletes the group with its members.
pub(super) async fn release_group(client: &kube::Client, kept: &KeptGroup) -> Result<(), String> {
    release_kept(
        client,
        &KeptKind {
            content: group_resource("VolumeGroupSnapshotContent"),
            object: group_resource("VolumeGroupSnapshot"),
            handle_field: "volumeGroupSnapshotHandle",
            bound_field: "boundVolumeGroupSnapshotContentName",
        },
        &kept.content,
        &kept.handle,
        &kept.volume_group_snapshot,
    )
    .await
}
