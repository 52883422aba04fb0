//! Mover Pods: the Ferry image running `ferry volume backup|restore` on a
//! mounted claim, with the repository's location and key from a Secret
//! that is owned by the Pod (deleted with it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::{Value, json};

use super::{LABEL_MOVER, LABEL_MOVER_SLOT, MoverSettings, PROGRESS_ENV, read_progress, suffix};
use crate::cluster::api_message;
use crate::volume::VolumeProgress;

/// Where the repository key is mounted, when it is a key file.
const KEY_DIR: &str = "/var/run/ferry-key";
/// The claim's mount point in the mover.
pub(super) const DATA: &str = "/data";
/// Where a block-mode claim's device appears in the mover.
pub(super) const DEVICE: &str = "/dev/ferry-volume";
/// Where this process starts looking for a slot, moved on for each mover:
/// among equally used slots, the next in turn.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

pub(super) struct MoverJob<'a> {
    pub namespace: &'a str,
    pub claim: &'a str,
    pub read_only: bool,
    /// The claim is in block mode: it is attached as a device at
    /// [`DEVICE`], not mounted.
    pub block: bool,
    /// Run on this node (a live ReadWriteOnce volume is mounted where its
    /// workload runs).
    pub node: Option<String>,
    /// Arguments of `ferry` in the image.
    pub args: Vec<String>,
    /// Value of the mover label (the backup or restore it serves).
    pub label: &'a str,
    /// Where the mover's progress lines go, read from its log while it runs.
    pub progress: Option<Arc<VolumeProgress>>,
    /// Environment of this mover only, besides the settings'.
    pub env: Vec<(String, String)>,
    /// Secret environment of this mover only (a token), in its Secret.
    pub secret: Vec<(String, Vec<u8>)>,
}

/// Runs one mover to completion and returns the JSON it wrote as its
/// termination message; an error carries its output.
pub(super) async fn run(
    client: &kube::Client,
    settings: &MoverSettings,
    job: MoverJob<'_>,
) -> Result<Value, String> {
    let base = format!("ferry-mover-{}", suffix(&[job.namespace, job.claim]));
    let pods: Api<Pod> = Api::namespaced(client.clone(), job.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), job.namespace);
    let started = Instant::now();
    let mut slot = if settings.per_node > 0 {
        let turn = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        let used = slots_in_use(&pods, settings.per_node, job.node.as_deref()).await;
        least_used_slot(&used, turn)
    } else {
        0
    };
    for attempt in 0.. {
        // A mover moved to another slot is a new Pod: the old name may
        // still be taken while its deletion completes.
        let name = match attempt {
            0 => base.clone(),
            n => format!("{base}-{n}"),
        };
        let ran = run_named(settings, &job, &name, slot, started, &pods, &secrets)
            .await
            .unwrap_or_else(|e| Ran::Done(Err(e)));
        // Deleting the Pod deletes its Secret (owner reference); both are
        // deleted here too so that nothing waits for the garbage collector.
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        let _ = pods.delete(&name, &now).await;
        let _ = secrets.delete(&name, &DeleteParams::default()).await;
        match ran {
            Ran::Done(result) => return result,
            Ran::MoveTo(free) => {
                tracing::debug!(mover = %name, from = slot, to = free, "mover Pending for its slot moves to a free one");
                slot = free;
            }
        }
    }
    unreachable!("the attempts only end by returning")
}

/// How one mover Pod ended.
enum Ran {
    Done(Result<Value, String>),
    /// Still Pending for its slot while slot `.0` became free on its
    /// node: it is made again there.
    MoveTo(usize),
}

/// How often a mover Pending for its slot looks for a free one: a slot
/// chosen while every slot was busy may be held by a long mover while
/// another frees up.
const RESLOT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the scheduler could not place the Pod.
fn unschedulable(status: &k8s_openapi::api::core::v1::PodStatus) -> bool {
    status.conditions.as_ref().is_some_and(|conditions| {
        conditions.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    })
}

/// A slot other than `current` that no live mover holds.
fn free_slot(used: &[usize], current: usize) -> Option<usize> {
    (0..used.len()).find(|&s| s != current && used[s] == 0)
}

fn pod_spec(settings: &MoverSettings, job: &MoverJob<'_>, name: &str, slot: usize) -> Value {
    let mut args = job.args.clone();
    args.extend(["--result-file".into(), "/dev/termination-log".into()]);
    let mut env: Vec<Value> = settings
        .env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    let mut mounts = Vec::new();
    let mut devices = Vec::new();
    if job.block {
        devices.push(json!({"name": "data", "devicePath": DEVICE}));
    } else {
        mounts.push(json!({"name": "data", "mountPath": DATA, "readOnly": job.read_only}));
    }
    let mut volumes = vec![json!({
        "name": "data",
        "persistentVolumeClaim": {"claimName": job.claim, "readOnly": job.read_only}
    })];
    if job.progress.is_some() {
        env.push(json!({"name": PROGRESS_ENV, "value": "1"}));
    }
    env.extend(job.env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    let secret_keys = settings
        .secret
        .keys()
        .chain(job.secret.iter().map(|(k, _)| k));
    for key in secret_keys.filter(|k| *k != "FERRY_KEY") {
        env.push(json!({"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}));
    }
    if settings.secret.contains_key("FERRY_KEY") {
        env.push(json!({"name": "FERRY_KEY_FILE", "value": format!("{KEY_DIR}/key")}));
        mounts.push(json!({"name": "key", "mountPath": KEY_DIR, "readOnly": true}));
        volumes.push(json!({"name": "key", "secret": {
            "secretName": name, "items": [{"key": "FERRY_KEY", "path": "key"}], "defaultMode": 0o400
        }}));
    }
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "activeDeadlineSeconds": settings.timeout.as_secs().max(60),
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "containers": [{
            "name": "mover",
            "image": settings.image,
            "imagePullPolicy": "IfNotPresent",
            "args": args,
            "env": env,
            "volumeMounts": mounts,
            "volumeDevices": devices,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "resources": settings.resources.to_json(),
            // Files of every owner are read and restored with their owners.
            "securityContext": {"runAsUser": 0, "runAsGroup": 0}
        }],
        "volumes": volumes
    });
    let mut labels = json!({LABEL_MOVER: job.label, "app.kubernetes.io/managed-by": "ferry"});
    if settings.per_node > 0 {
        // At most `per_node` movers on a node: each takes one of that many
        // slots, and no two Pods of a slot share a node (required
        // anti-affinity over every namespace). The scheduler keeps a mover
        // Pending until its slot is free on a node that can mount the
        // claim. A live claim's node is required by affinity, not
        // nodeName, so that the scheduler sees it too.
        let slot = slot.to_string();
        labels[LABEL_MOVER_SLOT] = json!(slot);
        spec["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {LABEL_MOVER_SLOT: slot}},
            "namespaceSelector": {},
            "topologyKey": "kubernetes.io/hostname"
        }]}});
        if let Some(node) = &job.node {
            spec["affinity"]["nodeAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [node]}
                ]}]
            }});
        }
    } else if let Some(node) = &job.node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": spec
    })
}

/// Why a mover killed for memory was, and what gives it more.
fn out_of_memory(name: &str, limit: Option<&str>) -> String {
    let limit = match limit {
        Some(limit) => format!(
            "its memory limit, {limit}, from --mover-limits (moverResources of a Repository) \
             or, where that sets none, the namespace's LimitRange"
        ),
        None => "its memory limit".to_string(),
    };
    format!(
        "mover Pod {name} was killed for using more than {limit} (OOMKilled); \
         give movers more, for example --mover-limits memory=2Gi"
    )
}

/// How many live mover Pods hold each slot: on `node` when the mover must
/// run there, else anywhere. Every backup and restore, of this process or
/// another, counts, so that a second command's mover takes a free slot
/// instead of queueing behind the first one's. Without permission to list
/// Pods in every namespace, only those of the mover's own namespace count.
async fn slots_in_use(pods: &Api<Pod>, per_node: usize, node: Option<&str>) -> Vec<usize> {
    let params = ListParams::default().labels(LABEL_MOVER_SLOT);
    let everywhere: Api<Pod> = Api::all(pods.clone().into_client());
    let listed = match everywhere.list(&params).await {
        Ok(list) => list.items,
        Err(_) => pods
            .list(&params)
            .await
            .map(|l| l.items)
            .unwrap_or_default(),
    };
    let mut used = vec![0; per_node];
    for pod in listed {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let live = pod.metadata.deletion_timestamp.is_none()
            && !matches!(phase, Some("Succeeded" | "Failed"));
        let here = match (node, on) {
            (Some(node), Some(on)) => node == on,
            _ => true,
        };
        let slot = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MOVER_SLOT))
            .and_then(|s| s.parse::<usize>().ok());
        if let Some(slot) = slot.filter(|s| *s < per_node && live && here) {
            used[slot] += 1;
        }
    }
    used
}

/// The slot with the fewest movers; among equals, the first from `turn`
/// on (round robin).
fn least_used_slot(used: &[usize], turn: usize) -> usize {
    let slots = used.len().max(1);
    (0..slots)
        .map(|i| (turn + i) % slots)
        .min_by_key(|slot| used.get(*slot).copied().unwrap_or(0))
        .unwrap_or(0)
}

/// Creates the mover Pod `name` in `slot` with its Secret and follows it
/// until it ends, or until it should move to a free slot.
async fn run_named(
    settings: &MoverSettings,
    job: &MoverJob<'_>,
    name: &str,
    slot: usize,
    started: Instant,
    pods: &Api<Pod>,
    secrets: &Api<Secret>,
) -> Result<Ran, String> {
    let pod: Pod = serde_json::from_value(pod_spec(settings, job, name, slot))
        .map_err(|e| format!("mover Pod spec: {e}"))?;
    let mut slots_checked = Instant::now();
    // A namespace restored a moment ago may not have its default
    // ServiceAccount yet; admission refuses Pods until it does.
    let created = loop {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(p) => break p,
            Err(kube::Error::Api(e))
                if e.code == 403
                    && e.message.contains("serviceaccount")
                    && started.elapsed() < settings.timeout =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("creating mover Pod {name}: {}", api_message(&e))),
        }
    };
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                LABEL_MOVER.to_string(),
                job.label.to_string(),
            )])),
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: name.to_string(),
                    uid,
                    ..Default::default()
                },
            ]),
            ..Default::default()
        },
        data: Some(
            settings
                .secret
                .iter()
                .chain(job.secret.iter().map(|(k, v)| (k, v)))
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| format!("creating the mover's Secret {name}: {}", api_message(&e)))?;
    loop {
        let mut pod = match pods.get_opt(name).await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(format!("mover Pod {name} was deleted before it finished")),
            Err(e) => return Err(format!("reading mover Pod {name}: {}", api_message(&e))),
        };
        let status = pod.status.take().unwrap_or_default();
        let terminated = status
            .container_statuses
            .as_ref()
            .and_then(|s| s.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone());
        match status.phase.as_deref() {
            Some("Succeeded") => {
                let message = terminated.and_then(|t| t.message).unwrap_or_default();
                return Ok(Ran::Done(serde_json::from_str(&message).map_err(|e| {
                    format!(
                        "mover Pod {name} succeeded but its result is unreadable ({e}): {message}"
                    )
                })));
            }
            Some("Failed") => {
                let message = terminated
                    .map(|t| {
                        t.message
                            .or(t.reason)
                            .unwrap_or_else(|| format!("exit code {}", t.exit_code))
                    })
                    .or(status.message)
                    .unwrap_or_else(|| "failed".into());
                let message = message.trim();
                if message == "OOMKilled" {
                    // The limit the Pod got: ours, or a LimitRange's default.
                    let limit = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.containers.first())
                        .and_then(|c| c.resources.as_ref())
                        .and_then(|r| r.limits.as_ref())
                        .and_then(|l| l.get("memory"));
                    return Err(out_of_memory(name, limit.map(|q| q.0.as_str())));
                }
                return Err(format!("mover Pod {name} failed: {message}"));
            }
            Some("Running") => {
                if let Some(progress) = &job.progress {
                    // The last lines of the log hold the newest progress;
                    // a log not readable yet is read on the next round.
                    let params = LogParams {
                        tail_lines: Some(4),
                        ..Default::default()
                    };
                    if let Ok(log) = pods.logs(name, &params).await {
                        read_progress(&log, progress);
                    }
                }
            }
            Some("Pending")
                if settings.per_node > 0
                    && unschedulable(&status)
                    && slots_checked.elapsed() >= RESLOT_EVERY =>
            {
                slots_checked = Instant::now();
                let used = slots_in_use(pods, settings.per_node, job.node.as_deref()).await;
                if let Some(free) = free_slot(&used, slot) {
                    return Ok(Ran::MoveTo(free));
                }
            }
            _ => {}
        }
        if started.elapsed() > settings.timeout {
            let why = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .filter(|c| c.status != "True")
                .filter_map(|c| c.message.map(|m| format!("{}: {m}", c.type_)))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(format!(
                "mover Pod {name} did not finish within {} ({})",
                humantime::format_duration(settings.timeout),
                if why.is_empty() {
                    "still running".to_string()
                } else {
                    why
                }
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mover::MoverResources;

    fn settings(per_node: usize) -> MoverSettings {
        MoverSettings {
            image: "ferry:test".into(),
            env: BTreeMap::new(),
            secret: BTreeMap::new(),
            unreachable: None,
            timeout: std::time::Duration::from_secs(60),
            concurrency: 4,
            per_node,
            snapshot_metadata_account: None,
            resources: MoverResources::default(),
        }
    }

    fn job(node: Option<&str>) -> MoverJob<'static> {
        MoverJob {
            namespace: "shop",
            claim: "data",
            read_only: true,
            block: false,
            env: Vec::new(),
            secret: Vec::new(),
            node: node.map(String::from),
            args: Vec::new(),
            label: "nightly",
            progress: None,
        }
    }

    #[test]
    fn movers_ask_for_their_resources_and_an_out_of_memory_kill_says_what_to_raise() {
        let spec = pod_spec(&settings(0), &job(None), "m", 0);
        assert_eq!(
            spec["spec"]["containers"][0]["resources"],
            json!({"requests": {"memory": "256Mi"}, "limits": {"memory": "1Gi"}})
        );
        let mut none = settings(0);
        none.resources = MoverResources {
            requests: BTreeMap::new(),
            limits: BTreeMap::new(),
        };
        let spec = pod_spec(&none, &job(None), "m", 0);
        assert_eq!(spec["spec"]["containers"][0]["resources"], json!({}));
        let said = out_of_memory("ferry-mover-1", Some("24Mi"));
        assert!(
            said.contains("24Mi")
                && said.contains("LimitRange")
                && said.contains("--mover-limits memory="),
            "{said}"
        );
    }

    #[test]
    fn a_pending_mover_moves_only_to_a_slot_no_mover_holds() {
        // Its own slot (1) counts itself; slot 2 is free.
        assert_eq!(free_slot(&[1, 2, 0], 1), Some(2));
        assert_eq!(free_slot(&[1, 1], 1), None);
        // Its own slot emptied meanwhile is not a move.
        assert_eq!(free_slot(&[0, 1], 0), None);
        assert_eq!(free_slot(&[1], 0), None);
    }

    #[test]
    fn movers_take_per_node_slots_the_scheduler_enforces() {
        let slots: std::collections::BTreeSet<String> = (0..2)
            .map(|slot| {
                let spec = pod_spec(&settings(2), &job(Some("node-1")), "m", slot);
                let slot = spec["metadata"]["labels"][LABEL_MOVER_SLOT]
                    .as_str()
                    .unwrap()
                    .to_string();
                let term = &spec["spec"]["affinity"]["podAntiAffinity"]
                    ["requiredDuringSchedulingIgnoredDuringExecution"][0];
                assert_eq!(term["labelSelector"]["matchLabels"][LABEL_MOVER_SLOT], slot.as_str());
                assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
                assert_eq!(term["namespaceSelector"], json!({}), "every namespace's movers count");
                // The live claim's node is required through the scheduler.
                assert!(spec["spec"]["nodeName"].is_null());
                assert_eq!(
                    spec["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                        ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
                    "node-1"
                );
                slot
            })
            .collect();
        assert_eq!(slots, ["0", "1"].into_iter().map(String::from).collect());

        // Without a bound: no slots, and a live claim's node by name.
        let spec = pod_spec(&settings(0), &job(Some("node-1")), "m", 0);
        assert!(spec["spec"]["affinity"].is_null());
        assert_eq!(spec["spec"]["nodeName"], "node-1");
        assert!(spec["metadata"]["labels"][LABEL_MOVER_SLOT].is_null());
        let spec = pod_spec(&settings(2), &job(None), "m", 1);
        assert!(spec["spec"]["affinity"]["nodeAffinity"].is_null());
    }

    #[test]
    fn a_mover_takes_the_least_used_slot_and_equals_in_turn() {
        assert_eq!(
            least_used_slot(&[1, 0], 0),
            1,
            "another command's mover holds 0"
        );
        assert_eq!(least_used_slot(&[0, 1], 7), 0);
        assert_eq!(
            least_used_slot(&[0, 0, 0], 4),
            1,
            "equals: the next in turn"
        );
        assert_eq!(least_used_slot(&[2, 1, 1], 0), 1);
        assert_eq!(least_used_slot(&[2, 1, 1], 2), 2);
        assert_eq!(least_used_slot(&[], 3), 0);
    }
}
