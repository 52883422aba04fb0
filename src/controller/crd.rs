//! The custom resources of `ferry.dev/v1alpha1`: their Rust types are the
//! source of the CRDs (`ferry controller manifests` prints them).

// Printer columns repeat `type_ = ...`; the lint reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "ferry.dev";
pub const VERSION: &str = "v1alpha1";

/// A Secret the controller reads, in its own namespace unless `namespace`
/// says otherwise. Namespace users never see it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Where snapshots are kept: a directory the controller's Pod mounts (for
/// example a PersistentVolumeClaim) or an S3 bucket and prefix.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Repository",
    status = "RepositoryStatus",
    shortname = "frepo",
    category = "ferry",
    printcolumn(name = "Location", type_ = "string", json_path = ".spec.location"),
    printcolumn(name = "Reachable", type_ = "string", json_path = ".status.reachable"),
    printcolumn(name = "Snapshots", type_ = "integer", json_path = ".status.snapshots"),
    printcolumn(name = "Checked", type_ = "date", json_path = ".status.lastCheckTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// `s3://bucket/prefix`, or an absolute directory path inside the
    /// controller's Pod.
    pub location: String,
    /// S3 endpoint of an S3-compatible store (MinIO, Ceph, ...); AWS when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Secret with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally
    /// `AWS_SESSION_TOKEN`. Without it the cloud's own credential chain is
    /// used (environment, web identity, instance metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretRef>,
    /// Secret whose key `password` (or `key`, a key file's bytes) unlocks
    /// the repository.
    pub key_secret: SecretRef,
    /// Create the repository when the location holds none.
    #[serde(default)]
    pub initialize: bool,
    /// Endpoint through which mover Pods reach the S3 store, when it is
    /// not the one the controller uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover_s3_endpoint: Option<String>,
    /// Mover Pods one backup or restore runs at once (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover_concurrency: Option<u32>,
    /// Mover Pods on one node at once, counting those of every backup and
    /// restore (default 2; 0: no bound). The scheduler holds the others
    /// Pending until a slot of the node is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover_concurrency_per_node: Option<u32>,
    /// Compute resources of mover Pods (default: requests memory 256Mi,
    /// limits memory 1Gi); a mover killed for memory
    /// (OOMKilled) needs a higher `limits.memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover_resources: Option<crate::mover::MoverResources>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<i64>,
    /// Bytes of the repository's packs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
}

/// Protects applications on a schedule: every namespace the policy selects
/// (now or later) gets its own snapshot at each run.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "BackupPolicy",
    status = "BackupPolicyStatus",
    shortname = "bpol",
    category = "ferry",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Repository", type_ = "string", json_path = ".spec.repository"),
    printcolumn(
        name = "Namespaces",
        type_ = "integer",
        json_path = ".status.protectedNamespaces"
    ),
    printcolumn(
        name = "Last success",
        type_ = "date",
        json_path = ".status.lastSuccessTime"
    ),
    printcolumn(name = "Next", type_ = "date", json_path = ".status.nextScheduleTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicySpec {
    /// Name of the Repository the snapshots go to.
    pub repository: String,
    /// Namespaces protected by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces protected by their labels, including namespaces created
    /// after the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Within each namespace, only objects with these labels
    /// (`app.kubernetes.io/part-of=shop`); all objects when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Cron schedule, five fields or six with seconds first
    /// (`0 2 * * *`, `*/30 * * * * *`), or `@daily` and friends.
    pub schedule: String,
    /// IANA time zone the schedule is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub retention: Retention,
    /// How volume data is protected: auto (the default: snapshot-move where
    /// the claim's driver has a VolumeSnapshotClass, else copy), snapshot,
    /// snapshot-move, copy or skip. A claim's or StorageClass's annotation
    /// `backup.ferry.dev/volume-method` overrides it; skipped claims are
    /// listed in the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_method: Option<String>,
    /// A transform plan (YAML, as a Restore's `transform`: built-in rule
    /// sets, inline scripts and patches) for restores of these snapshots at
    /// the disaster-recovery site: its storage classes, registries, zones.
    /// Checked before each run and recorded in every snapshot;
    /// `ferry restore SNAPSHOT --recorded-transform` applies it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
    /// No runs while set.
    #[serde(default)]
    pub suspend: bool,
    /// Between full backups (which LIST every collection), runs read the
    /// controller's watch journal and redo only what changed. Every Nth
    /// run is full (default 24), which heals anything a watch missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub full_backup_every: Option<i32>,
}

/// Which snapshots of each namespace a policy keeps: the union of the
/// newest `keepLast` and the newest of each of the last N hours, days,
/// ISO weeks and months. Nothing set keeps everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_last: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub hourly: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub daily: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub weekly: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub monthly: Option<i32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_namespaces: Option<i32>,
    /// `Full` (every collection LISTed) or `Journaled` (read from the
    /// watch journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_kind: Option<String>,
    /// Per protected namespace: its last snapshot and last success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceRun>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceRun {
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Who asked for a Backup or Restore, as the API server authenticated
/// them. Written at admission (the `ferry-requester` admission policy
/// overwrites whatever the request carried) and immutable after: the
/// controller acts with exactly this identity's permissions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Requester {
    pub username: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// A one-off backup of this namespace. Backups a policy made appear here
/// too, so `kubectl get backups -n NS` lists a namespace's snapshots.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "fbk",
    category = "ferry",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Snapshot", type_ = "string", json_path = ".status.snapshot"),
    printcolumn(name = "Objects", type_ = "integer", json_path = ".status.objects"),
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policy"),
    printcolumn(
        name = "Completed",
        type_ = "date",
        json_path = ".status.completionTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Name of the Repository the snapshot goes to.
    pub repository: String,
    /// Only objects with these labels; the whole namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// auto (the default), snapshot, snapshot-move, copy or skip, as in a
    /// BackupPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_method: Option<String>,
    /// Set on the records of policy runs; the controller never runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "immutable_requester")]
    pub requester: Option<Requester>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Pending, Running, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The snapshot's id in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_stored: Option<i64>,
    /// Objects per kind.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A restore into this namespace, of a Backup of this namespace.
#[derive(CustomResource, Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Restore",
    namespaced,
    status = "RestoreStatus",
    shortname = "frs",
    category = "ferry",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".spec.backup"),
    printcolumn(name = "Objects", type_ = "integer", json_path = ".status.planned"),
    printcolumn(
        name = "Completed",
        type_ = "date",
        json_path = ".status.completionTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// A Backup in this namespace whose snapshot is restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Or a snapshot (id or name) of `repository`; only its objects of
    /// this namespace are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Source namespace → target namespace. Both must be this namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_mapping: BTreeMap<String, String>,
    /// A transform plan (YAML) run on the way in; built-in rule sets,
    /// inline scripts and patches only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
    /// What to do with objects that exist: skip, update (default) or fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<String>,
    /// Restore the claims without their volume data.
    #[serde(default)]
    pub skip_volume_data: bool,
    /// false: stop once the plan is made (phase Planned); setting it to
    /// true later applies exactly that plan.
    #[serde(default = "yes")]
    pub approve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "immutable_requester")]
    pub requester: Option<Requester>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// Pending, Planned, Running, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Objects in the plan, and what it does with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub actions: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<i64>,
    /// ConfigMap (in the controller's namespace) holding the plan that an
    /// approval applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_config_map: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The requester's schema, with the API server keeping it as admission
/// wrote it: a later update cannot change whose permissions a request uses.
fn immutable_requester(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Requester>();
    let inner = generator
        .definitions()
        .get("Requester")
        .cloned()
        .and_then(|v| v.as_object().cloned());
    // Inline the definition: CRD schemas have no $ref.
    let mut object = inner.unwrap_or_else(|| schema.as_object().cloned().unwrap_or_default());
    object.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "self == oldSelf",
            "message": "requester is written at admission and cannot change"
        }]),
    );
    object.insert("nullable".into(), serde_json::Value::Bool(true));
    schema = schemars::Schema::from(object);
    schema
}

/// Every CRD of the group, in the order they are installed.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        Repository::crd(),
        BackupPolicy::crd(),
        Backup::crd(),
        Restore::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_are_structural_with_printer_columns_and_an_immutable_requester() {
        for crd in crds() {
            let text = serde_json::to_string(&crd).unwrap();
            assert!(
                !text.contains("$ref"),
                "{}: $ref in schema",
                crd.spec.names.kind
            );
            let version = &crd.spec.versions[0];
            assert!(version.subresources.as_ref().unwrap().status.is_some());
            assert!(
                !version
                    .additional_printer_columns
                    .as_ref()
                    .unwrap()
                    .is_empty()
            );
        }
        let backup = serde_json::to_value(Backup::crd()).unwrap();
        let requester = &backup["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["requester"];
        assert_eq!(
            requester["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
        assert_eq!(requester["properties"]["username"]["type"], "string");
    }

    #[test]
    fn a_restore_is_approved_unless_it_says_otherwise() {
        let spec: RestoreSpec = serde_json::from_value(serde_json::json!({"backup": "b"})).unwrap();
        assert!(spec.approve);
    }
}
