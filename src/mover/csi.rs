//! CSI snapshots through the snapshot.storage.k8s.io API: the class for a
//! driver, taking a VolumeSnapshot and waiting for it, and a claim made
//! from one for a mover to read.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use super::{KeptSnapshot, LABEL_MOVER};

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

/// The VolumeSnapshotClass for `driver`: the default one of the driver if
/// marked, else the first. `None` when the cluster has none (or no
/// snapshot API at all).
pub(super) async fn class_for(client: &kube::Client, driver: &str) -> Option<String> {
    let classes: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotClass"));
    let list = classes.list(&Default::default()).await.ok()?;
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
            .and_then(|a| a.get("snapshot.storage.kubernetes.io/is-default-class"))
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
    let ready = loop {
        let current = snapshots
            .get(name)
            .await
            .map_err(|e| format!("reading VolumeSnapshot {name}: {e}"))?;
        let status = &current.data["status"];
        if status["readyToUse"] == json!(true) {
            break current;
        }
        if let Some(message) = status["error"]["message"].as_str() {
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
    })
}

/// Keeps the snapshot's data when its VolumeSnapshot is deleted (with its
/// namespace, say): the kept snapshot is a recovery point of the backup.
pub(super) async fn retain(client: &kube::Client, content: &str) -> Result<(), String> {
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    contents
        .patch(
            content,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "Retain"}})),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!("setting deletionPolicy Retain on VolumeSnapshotContent {content}: {e}")
        })
}

pub(super) async fn delete(client: &kube::Client, namespace: &str, name: &str) {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    let _ = snapshots.delete(name, &DeleteParams::default()).await;
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
    loop {
        let current = snapshots
            .get(name)
            .await
            .map_err(|e| format!("reading VolumeSnapshot {namespace}/{name}: {e}"))?;
        if current.data["status"]["readyToUse"] == json!(true) {
            return Ok(());
        }
        if let Some(message) = current.data["status"]["error"]["message"].as_str() {
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
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let content = match contents.get_opt(&kept.content).await {
        Ok(content) => content,
        Err(e) => {
            return Err(format!(
                "reading VolumeSnapshotContent {}: {e}",
                kept.content
            ));
        }
    };
    if let Some(content) = &content {
        // A content of the same name that holds another snapshot is not ours.
        let handle = content.data["status"]["snapshotHandle"]
            .as_str()
            .or_else(|| content.data["spec"]["source"]["snapshotHandle"].as_str());
        if handle.is_some_and(|h| h != kept.handle) {
            return Err(format!(
                "VolumeSnapshotContent {} now holds snapshot {}, not {}: left alone",
                kept.content,
                handle.unwrap_or_default(),
                kept.handle
            ));
        }
        contents
            .patch(
                &kept.content,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
            )
            .await
            .map_err(|e| {
                format!(
                    "setting deletionPolicy Delete on VolumeSnapshotContent {}: {e}",
                    kept.content
                )
            })?;
    }
    if let Some((namespace, name)) = kept.volume_snapshot.split_once('/') {
        let snapshots: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
        match snapshots.get_opt(name).await {
            Ok(Some(snapshot))
                if snapshot.data["status"]["boundVolumeSnapshotContentName"]
                    == json!(kept.content) =>
            {
                snapshots
                    .delete(name, &DeleteParams::default())
                    .await
                    .map_err(|e| {
                        format!("deleting VolumeSnapshot {}: {e}", kept.volume_snapshot)
                    })?;
            }
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "reading VolumeSnapshot {}: {e}",
                    kept.volume_snapshot
                ));
            }
        }
    }
    if content.is_some() {
        match contents
            .delete(&kept.content, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "deleting VolumeSnapshotContent {}: {e}",
                    kept.content
                ));
            }
        }
    }
    Ok(())
}
