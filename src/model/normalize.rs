//! Normalization: remove what the cluster generates, keep what the user
//! declared, and skip objects the cluster recreates by itself.
//!
//! The rules are one table, [`RULES`], applied in order: skip rules first
//! (they look at fields that stripping removes), then the strip rules. The
//! table is printable (`ferry rules`), so it is also the documentation.

use serde_json::{Map, Value};

/// How normalization may be tuned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    /// Keep `kubectl.kubernetes.io/last-applied-configuration`.
    pub keep_last_applied: bool,
}

/// What normalization decided for one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Keep the (normalized) object; `applied` names the rules that changed it.
    Keep {
        object: Value,
        applied: Vec<&'static str>,
    },
    /// Do not back the object up, for `reason`.
    Skip { rule: &'static str, reason: String },
}

enum Outcome {
    Unchanged,
    Changed,
    Skip(String),
}

/// One row of the normalization table.
pub struct Rule {
    pub name: &'static str,
    /// Which objects it looks at.
    pub matches: &'static str,
    /// What it does, and why.
    pub description: &'static str,
    apply: fn(&mut Value, &NormalizeOptions) -> Outcome,
}

pub static RULES: &[Rule] = &[
    Rule {
        name: "skip-controller-owned",
        matches: "objects with a controller owner that recreates them",
        description: "skip ReplicaSets of Deployments, Pods of ReplicaSets/StatefulSets/DaemonSets/Jobs, Jobs of CronJobs, ControllerRevisions, EndpointSlices of Services: their controller recreates them from the captured owner",
        apply: skip_controller_owned,
    },
    Rule {
        name: "skip-root-ca",
        matches: "ConfigMap kube-root-ca.crt",
        description: "skip: the root-CA publisher creates it in every namespace with the target cluster's CA",
        apply: skip_root_ca,
    },
    Rule {
        name: "skip-token-secrets",
        matches: "Secret of type kubernetes.io/service-account-token",
        description: "skip: the token controller issues tokens signed by the target cluster",
        apply: skip_token_secrets,
    },
    Rule {
        name: "skip-events-and-leases",
        matches: "Event (core and events.k8s.io), Lease, CertificateSigningRequest",
        description: "skip: records of the source cluster's activity, meaningless elsewhere",
        apply: skip_events_and_leases,
    },
    Rule {
        name: "skip-ferry-requests",
        matches: "Backup and Restore of group ferry.dev",
        description: "skip: requests to Ferry's controller; restored, they would run again",
        apply: skip_ferry_requests,
    },
    Rule {
        name: "skip-ferry-movers",
        matches: "objects labelled ferry.dev/mover",
        description: "skip: Ferry's own volume-data objects (mover Pods and Secrets, claims made from snapshots, the VolumeSnapshots it takes); the backup's volume entries record the snapshots it keeps",
        apply: skip_ferry_movers,
    },
    Rule {
        name: "skip-managed-endpoints",
        matches: "Endpoints and EndpointSlices maintained by controllers",
        description: "skip: the endpoint controllers rebuild them from Services and Pods",
        apply: skip_managed_endpoints,
    },
    Rule {
        name: "skip-cluster-defaults",
        matches: "bootstrap RBAC (kubernetes.io/bootstrapping=rbac-defaults), system- PriorityClasses, local APIServices, auto-updated flow-control objects, Service default/kubernetes",
        description: "skip: every cluster provides its own; restore checks they exist",
        apply: skip_cluster_defaults,
    },
    Rule {
        name: "skip-default-service-account",
        matches: "ServiceAccount default without user settings",
        description: "skip: created in every namespace; kept when it carries image pull secrets, labels or annotations",
        apply: skip_default_service_account,
    },
    Rule {
        name: "service-allocated-fields",
        matches: "Service",
        description: "drop clusterIP/clusterIPs (headless 'None' stays), healthCheckNodePort, and nodePorts the API server allocated (kept when managedFields or last-applied show a user set them)",
        apply: service_allocated_fields,
    },
    Rule {
        name: "server-metadata",
        matches: "every object",
        description: "drop metadata.uid, resourceVersion, generation, creationTimestamp, deletionTimestamp, deletionGracePeriodSeconds, managedFields, selfLink",
        apply: server_metadata,
    },
    Rule {
        name: "status",
        matches: "every object",
        description: "drop status (and volumeClaimTemplates[].status): the target cluster reports its own",
        apply: status,
    },
    Rule {
        name: "owner-uids",
        matches: "objects with ownerReferences",
        description: "drop ownerReferences[].uid: the owner edge is in the graph and restore re-points it at the new owner's UID",
        apply: owner_uids,
    },
    Rule {
        name: "last-applied-configuration",
        matches: "objects annotated by kubectl apply",
        description: "drop kubectl.kubernetes.io/last-applied-configuration (kept with --keep-last-applied)",
        apply: last_applied,
    },
    Rule {
        name: "claim-binding",
        matches: "PersistentVolumeClaim, PersistentVolume",
        description: "drop a dynamically provisioned claim's volumeName and the binding annotations; drop claimRef uid/resourceVersion of volumes",
        apply: claim_binding,
    },
    Rule {
        name: "pod-node",
        matches: "Pod",
        description: "drop spec.nodeName: the target's scheduler places the pod",
        apply: pod_node,
    },
    Rule {
        name: "job-generated-selector",
        matches: "Job without manualSelector",
        description: "drop spec.selector and the controller-uid/job-name template labels the API server generates",
        apply: job_generated_selector,
    },
    Rule {
        name: "deployment-revision",
        matches: "Deployment",
        description: "drop the deployment.kubernetes.io/revision annotation the controller maintains",
        apply: deployment_revision,
    },
    Rule {
        name: "namespace-generated",
        matches: "Namespace",
        description: "drop spec.finalizers and the automatic kubernetes.io/metadata.name label",
        apply: namespace_generated,
    },
    Rule {
        name: "legacy-token-references",
        matches: "ServiceAccount",
        description: "drop secrets[] entries naming generated token Secrets (<sa>-token-xxxxx)",
        apply: legacy_token_references,
    },
    Rule {
        name: "aggregated-rules",
        matches: "ClusterRole with aggregationRule",
        description: "drop rules: the aggregation controller fills them from the selected roles",
        apply: aggregated_rules,
    },
    Rule {
        name: "protection-finalizers",
        matches: "PersistentVolumeClaims and PersistentVolumes",
        description: "drop the kubernetes.io/pvc-protection and pv-protection finalizers: the target's protection controllers add them",
        apply: protection_finalizers,
    },
    Rule {
        name: "server-defaults",
        matches: "Services, workloads and their pod templates, Jobs, CronJobs, PVCs, Secrets, NetworkPolicies, webhook configurations, CRDs",
        description: "drop fields equal to the value the API server fills in when they are left out (Service ipFamilies/ipFamilyPolicy/sessionAffinity/internalTrafficPolicy/type, container terminationMessagePath/terminationMessagePolicy/imagePullPolicy, probe timings, volume defaultMode, rollout strategies, history limits…): the target applies its own defaults, so snapshots diff cleanly and do not pin the source's",
        apply: server_defaults,
    },
    Rule {
        name: "empty-metadata",
        matches: "every object",
        description: "drop labels, annotations and ownerReferences left empty",
        apply: empty_metadata,
    },
];

/// Normalizes one object as captured from the API server.
pub fn normalize(mut obj: Value, opts: &NormalizeOptions) -> Verdict {
    let mut applied = Vec::new();
    for rule in RULES {
        match (rule.apply)(&mut obj, opts) {
            Outcome::Unchanged => {}
            Outcome::Changed => applied.push(rule.name),
            Outcome::Skip(reason) => {
                return Verdict::Skip {
                    rule: rule.name,
                    reason,
                };
            }
        }
    }
    Verdict::Keep {
        object: obj,
        applied,
    }
}

// ---- helpers ---------------------------------------------------------------

fn kind(obj: &Value) -> &str {
    obj.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn group(obj: &Value) -> &str {
    obj.get("apiVersion")
        .and_then(Value::as_str)
        .and_then(|v| v.rsplit_once('/'))
        .map(|(g, _)| g)
        .unwrap_or("")
}

fn is(obj: &Value, g: &str, k: &str) -> bool {
    group(obj) == g && kind(obj) == k
}

fn name(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn label<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/labels")
        .and_then(|l| l.get(key))
        .and_then(Value::as_str)
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/annotations")
        .and_then(|l| l.get(key))
        .and_then(Value::as_str)
}

fn map_at<'a>(obj: &'a mut Value, pointer: &str) -> Option<&'a mut Map<String, Value>> {
    obj.pointer_mut(pointer).and_then(Value::as_object_mut)
}

/// Removes `keys` from the map at `pointer`; whether anything was removed.
fn remove_keys(obj: &mut Value, pointer: &str, keys: &[&str]) -> bool {
    match map_at(obj, pointer) {
        Some(map) => {
            let mut removed = false;
            for k in keys {
                removed |= map.remove(*k).is_some();
            }
            removed
        }
        None => false,
    }
}

fn changed(c: bool) -> Outcome {
    if c {
        Outcome::Changed
    } else {
        Outcome::Unchanged
    }
}

// ---- skip rules ------------------------------------------------------------

/// (owner group, owner kind, owned group, owned kind) pairs whose owner recreates the owned object.
const RECREATED_BY_OWNER: &[(&str, &str, &str, &str)] = &[
    ("apps", "Deployment", "apps", "ReplicaSet"),
    ("apps", "ReplicaSet", "", "Pod"),
    ("apps", "StatefulSet", "", "Pod"),
    ("apps", "DaemonSet", "", "Pod"),
    ("batch", "Job", "", "Pod"),
    ("", "ReplicationController", "", "Pod"),
    ("batch", "CronJob", "batch", "Job"),
    ("apps", "StatefulSet", "apps", "ControllerRevision"),
    ("apps", "DaemonSet", "apps", "ControllerRevision"),
    ("", "Service", "discovery.k8s.io", "EndpointSlice"),
    ("", "Endpoints", "discovery.k8s.io", "EndpointSlice"),
];

fn skip_controller_owned(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let Some(owners) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    else {
        return Outcome::Unchanged;
    };
    for owner in owners {
        if owner.get("controller").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let owner_group = owner
            .get("apiVersion")
            .and_then(Value::as_str)
            .and_then(|v| v.rsplit_once('/'))
            .map(|(g, _)| g)
            .unwrap_or("");
        let owner_kind = owner
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if RECREATED_BY_OWNER
            .iter()
            .any(|(og, ok, g, k)| *og == owner_group && *ok == owner_kind && is(obj, g, k))
        {
            let owner_name = owner
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Outcome::Skip(format!(
                "created by {owner_kind} {owner_name}, which recreates it"
            ));
        }
    }
    Outcome::Unchanged
}

fn skip_root_ca(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "", "ConfigMap") && name(obj) == "kube-root-ca.crt" {
        return Outcome::Skip("published by the cluster in every namespace".into());
    }
    Outcome::Unchanged
}

fn skip_token_secrets(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "", "Secret")
        && obj.get("type").and_then(Value::as_str) == Some("kubernetes.io/service-account-token")
    {
        return Outcome::Skip("service-account token; the target cluster issues its own".into());
    }
    Outcome::Unchanged
}

fn skip_events_and_leases(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "", "Event") || is(obj, "events.k8s.io", "Event") {
        return Outcome::Skip("event of the source cluster".into());
    }
    if is(obj, "coordination.k8s.io", "Lease") {
        return Outcome::Skip("lease held by a process of the source cluster".into());
    }
    if is(obj, "certificates.k8s.io", "CertificateSigningRequest") {
        return Outcome::Skip("certificate request of the source cluster".into());
    }
    Outcome::Unchanged
}

fn skip_ferry_requests(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "ferry.dev", "Backup") || is(obj, "ferry.dev", "Restore") {
        return Outcome::Skip(
            "a request to Ferry's controller, not part of the application".into(),
        );
    }
    Outcome::Unchanged
}

fn skip_ferry_movers(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if label(obj, crate::mover::LABEL_MOVER).is_some() {
        return Outcome::Skip(
            "made by Ferry to move volume data; restored, it would snapshot or copy again".into(),
        );
    }
    Outcome::Unchanged
}

fn skip_managed_endpoints(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "", "Endpoints")
        && (annotation(obj, "endpoints.kubernetes.io/last-change-trigger-time").is_some()
            || label(obj, "endpoints.kubernetes.io/managed-by").is_some())
    {
        return Outcome::Skip("maintained by the endpoints controller".into());
    }
    if is(obj, "discovery.k8s.io", "EndpointSlice")
        && matches!(
            label(obj, "endpointslice.kubernetes.io/managed-by"),
            Some("endpointslice-controller.k8s.io" | "endpointslicemirroring-controller.k8s.io")
        )
    {
        return Outcome::Skip("maintained by the endpoint slice controller".into());
    }
    Outcome::Unchanged
}

fn skip_cluster_defaults(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if group(obj) == "rbac.authorization.k8s.io"
        && label(obj, "kubernetes.io/bootstrapping") == Some("rbac-defaults")
    {
        return Outcome::Skip("default RBAC object every cluster provides".into());
    }
    if is(obj, "scheduling.k8s.io", "PriorityClass") && name(obj).starts_with("system-") {
        return Outcome::Skip("system priority class every cluster provides".into());
    }
    if is(obj, "apiregistration.k8s.io", "APIService")
        && obj.pointer("/spec/service").is_none_or(Value::is_null)
    {
        return Outcome::Skip("API group served by the API server itself".into());
    }
    if group(obj) == "flowcontrol.apiserver.k8s.io"
        && annotation(obj, "apf.kubernetes.io/autoupdate-spec") == Some("true")
    {
        return Outcome::Skip("flow-control default maintained by the API server".into());
    }
    if is(obj, "", "Service")
        && name(obj) == "kubernetes"
        && obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some("default")
    {
        return Outcome::Skip("the API server's own Service, which it maintains".into());
    }
    Outcome::Unchanged
}

fn skip_default_service_account(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "", "ServiceAccount") || name(obj) != "default" {
        return Outcome::Unchanged;
    }
    let non_empty = |p: &str| {
        obj.pointer(p).is_some_and(|v| {
            v.as_object().is_some_and(|m| !m.is_empty())
                || v.as_array().is_some_and(|a| !a.is_empty())
        })
    };
    let user_annotations = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| {
            a.keys()
                .any(|k| k != "kubectl.kubernetes.io/last-applied-configuration")
        });
    if non_empty("/imagePullSecrets")
        || obj.get("automountServiceAccountToken").is_some()
        || non_empty("/metadata/labels")
        || user_annotations
    {
        return Outcome::Unchanged;
    }
    Outcome::Skip("created by the cluster in every namespace".into())
}

// ---- strip rules -----------------------------------------------------------

/// Whether a user set the nodePort of the port `key` (`{"port":80,"protocol":"TCP"}`):
/// the API server attributes allocated node ports to no field manager, so
/// ownership of `f:nodePort` by any manager means a user asked for it.
fn node_port_user_set(service: &Value, port: &Value) -> bool {
    let number = port.get("port").and_then(Value::as_i64).unwrap_or_default();
    let protocol = port
        .get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP");
    let key = format!("k:{{\"port\":{number},\"protocol\":\"{protocol}\"}}");
    let by_managed_fields = service
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .is_some_and(|entries| {
            entries.iter().any(|e| {
                e.pointer("/fieldsV1/f:spec/f:ports")
                    .and_then(|p| p.get(&key))
                    .and_then(|p| p.get("f:nodePort"))
                    .is_some()
            })
        });
    let by_last_applied = annotation(service, "kubectl.kubernetes.io/last-applied-configuration")
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|applied| {
            applied
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
        })
        .is_some_and(|ports| {
            ports.iter().any(|p| {
                p.get("port").and_then(Value::as_i64) == Some(number) && p.get("nodePort").is_some()
            })
        });
    by_managed_fields || by_last_applied
}

fn service_allocated_fields(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "", "Service") {
        return Outcome::Unchanged;
    }
    let keep_port: Vec<bool> = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ports| ports.iter().map(|p| node_port_user_set(obj, p)).collect())
        .unwrap_or_default();
    let Some(spec) = map_at(obj, "/spec") else {
        return Outcome::Unchanged;
    };
    let mut c = false;
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if !headless {
        c |= spec.remove("clusterIP").is_some();
        c |= spec.remove("clusterIPs").is_some();
    }
    c |= spec.remove("healthCheckNodePort").is_some();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for (port, keep) in ports.iter_mut().zip(keep_port) {
            if !keep && let Some(p) = port.as_object_mut() {
                c |= p.remove("nodePort").is_some();
            }
        }
    }
    changed(c)
}

fn server_metadata(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    changed(remove_keys(
        obj,
        "/metadata",
        &[
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ],
    ))
}

fn status(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let mut c = obj
        .as_object_mut()
        .is_some_and(|m| m.remove("status").is_some());
    if let Some(templates) = obj
        .pointer_mut("/spec/volumeClaimTemplates")
        .and_then(Value::as_array_mut)
    {
        for t in templates {
            c |= t
                .as_object_mut()
                .is_some_and(|m| m.remove("status").is_some());
        }
    }
    changed(c)
}

fn owner_uids(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let mut c = false;
    if let Some(owners) = obj
        .pointer_mut("/metadata/ownerReferences")
        .and_then(Value::as_array_mut)
    {
        for owner in owners {
            c |= owner
                .as_object_mut()
                .is_some_and(|m| m.remove("uid").is_some());
        }
    }
    changed(c)
}

fn last_applied(obj: &mut Value, opts: &NormalizeOptions) -> Outcome {
    if opts.keep_last_applied {
        return Outcome::Unchanged;
    }
    changed(remove_keys(
        obj,
        "/metadata/annotations",
        &["kubectl.kubernetes.io/last-applied-configuration"],
    ))
}

const BINDING_ANNOTATIONS: &[&str] = &[
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

fn claim_binding(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if is(obj, "", "PersistentVolumeClaim") {
        let dynamic = annotation(obj, "pv.kubernetes.io/bind-completed").is_some()
            || annotation(obj, "pv.kubernetes.io/bound-by-controller").is_some();
        let mut c = false;
        if dynamic {
            c |= remove_keys(obj, "/spec", &["volumeName"]);
        }
        c |= remove_keys(obj, "/metadata/annotations", BINDING_ANNOTATIONS);
        return changed(c);
    }
    if is(obj, "", "PersistentVolume") {
        let mut c = remove_keys(obj, "/spec/claimRef", &["uid", "resourceVersion"]);
        c |= remove_keys(
            obj,
            "/metadata/annotations",
            &["pv.kubernetes.io/bound-by-controller"],
        );
        return changed(c);
    }
    Outcome::Unchanged
}

fn pod_node(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "", "Pod") {
        return Outcome::Unchanged;
    }
    changed(remove_keys(obj, "/spec", &["nodeName"]))
}

fn job_generated_selector(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "batch", "Job")
        || obj.pointer("/spec/manualSelector").and_then(Value::as_bool) == Some(true)
    {
        return Outcome::Unchanged;
    }
    let mut c = remove_keys(obj, "/spec", &["selector"]);
    c |= remove_keys(
        obj,
        "/spec/template/metadata/labels",
        &[
            "controller-uid",
            "batch.kubernetes.io/controller-uid",
            "job-name",
            "batch.kubernetes.io/job-name",
        ],
    );
    changed(c)
}

fn deployment_revision(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "apps", "Deployment") {
        return Outcome::Unchanged;
    }
    changed(remove_keys(
        obj,
        "/metadata/annotations",
        &["deployment.kubernetes.io/revision"],
    ))
}

fn namespace_generated(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "", "Namespace") {
        return Outcome::Unchanged;
    }
    let mut c = remove_keys(obj, "/spec", &["finalizers"]);
    if obj
        .get("spec")
        .and_then(Value::as_object)
        .is_some_and(Map::is_empty)
    {
        obj.as_object_mut().map(|m| m.remove("spec"));
        c = true;
    }
    c |= remove_keys(obj, "/metadata/labels", &["kubernetes.io/metadata.name"]);
    changed(c)
}

fn legacy_token_references(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "", "ServiceAccount") {
        return Outcome::Unchanged;
    }
    let prefix = format!("{}-token-", name(obj));
    let Some(secrets) = obj.get_mut("secrets").and_then(Value::as_array_mut) else {
        return Outcome::Unchanged;
    };
    let before = secrets.len();
    secrets.retain(|s| {
        let n = s.get("name").and_then(Value::as_str).unwrap_or_default();
        !(n.starts_with(&prefix) && n.len() == prefix.len() + 5)
    });
    let c = secrets.len() != before;
    if secrets.is_empty() {
        obj.as_object_mut().map(|m| m.remove("secrets"));
    }
    changed(c)
}

fn aggregated_rules(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    if !is(obj, "rbac.authorization.k8s.io", "ClusterRole")
        || obj.get("aggregationRule").is_none_or(Value::is_null)
    {
        return Outcome::Unchanged;
    }
    changed(
        obj.as_object_mut()
            .is_some_and(|m| m.remove("rules").is_some()),
    )
}

/// Finalizers the cluster's protection controllers add by themselves.
const PROTECTION_FINALIZERS: [&str; 2] = [
    "kubernetes.io/pvc-protection",
    "kubernetes.io/pv-protection",
];

fn protection_finalizers(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let Some(finalizers) = obj
        .pointer_mut("/metadata/finalizers")
        .and_then(Value::as_array_mut)
    else {
        return Outcome::Unchanged;
    };
    let before = finalizers.len();
    finalizers.retain(|f| {
        !f.as_str()
            .is_some_and(|f| PROTECTION_FINALIZERS.contains(&f))
    });
    changed(finalizers.len() != before)
}

/// Removes `key` from `map` when it holds exactly `default`.
fn strip_default(map: &mut Map<String, Value>, key: &str, default: Value) -> bool {
    if map.get(key) == Some(&default) {
        // Keeps the order of the other fields.
        map.shift_remove(key);
        true
    } else {
        false
    }
}

/// Strips each `(key, default)` of `defaults` from the map at `pointer`.
fn strip_defaults(obj: &mut Value, pointer: &str, defaults: &[(&str, Value)]) -> bool {
    let Some(map) = map_at(obj, pointer) else {
        return false;
    };
    let mut c = false;
    for (key, default) in defaults {
        c |= strip_default(map, key, default.clone());
    }
    c
}

/// The pull policy the API server gives a container without one: `Always`
/// for an image without tag or tagged `latest` (and no digest), else `IfNotPresent`.
pub fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

fn strip_probe_defaults(probe: &mut Value) -> bool {
    let mut c = strip_defaults(
        probe,
        "",
        &[
            ("timeoutSeconds", Value::from(1)),
            ("periodSeconds", Value::from(10)),
            ("successThreshold", Value::from(1)),
            ("failureThreshold", Value::from(3)),
        ],
    );
    c |= strip_defaults(probe, "/httpGet", &[("scheme", Value::from("HTTP"))]);
    c
}

fn strip_container_defaults(container: &mut Value) -> bool {
    let image = container
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut c = strip_defaults(
        container,
        "",
        &[
            (
                "terminationMessagePath",
                Value::from("/dev/termination-log"),
            ),
            ("terminationMessagePolicy", Value::from("File")),
            ("imagePullPolicy", Value::from(default_pull_policy(&image))),
            ("resources", serde_json::json!({})),
        ],
    );
    if let Some(ports) = container.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports {
            c |= strip_defaults(port, "", &[("protocol", Value::from("TCP"))]);
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = container.get_mut(probe) {
            c |= strip_probe_defaults(p);
        }
    }
    if let Some(env) = container.get_mut("env").and_then(Value::as_array_mut) {
        for e in env {
            c |= strip_defaults(
                e,
                "/valueFrom/fieldRef",
                &[("apiVersion", Value::from("v1"))],
            );
        }
    }
    c
}

fn strip_pod_spec_defaults(spec: &mut Value) -> bool {
    let mut c = strip_defaults(
        spec,
        "",
        &[
            ("restartPolicy", Value::from("Always")),
            ("dnsPolicy", Value::from("ClusterFirst")),
            ("schedulerName", Value::from("default-scheduler")),
            ("securityContext", serde_json::json!({})),
            ("terminationGracePeriodSeconds", Value::from(30)),
            ("enableServiceLinks", Value::from(true)),
        ],
    );
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for container in containers {
                c |= strip_container_defaults(container);
            }
        }
    }
    if let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        for volume in volumes {
            for source in ["configMap", "secret", "projected", "downwardAPI"] {
                c |= strip_defaults(
                    volume,
                    &format!("/{source}"),
                    &[("defaultMode", Value::from(420))],
                );
            }
            if let Some(items) = volume
                .pointer_mut("/downwardAPI/items")
                .and_then(Value::as_array_mut)
            {
                for item in items {
                    c |= strip_defaults(item, "/fieldRef", &[("apiVersion", Value::from("v1"))]);
                }
            }
        }
    }
    c
}

/// A template's metadata: `creationTimestamp: null` is how the API server
/// writes a template timestamp nobody set, and it returns an empty
/// `metadata: {}` for templates without one.
fn strip_template_metadata(obj: &mut Value, template: &str) -> bool {
    let Some(template) = map_at(obj, template) else {
        return false;
    };
    let Some(meta) = template.get_mut("metadata").and_then(Value::as_object_mut) else {
        return false;
    };
    let mut c = strip_default(meta, "creationTimestamp", Value::Null);
    if meta.is_empty() {
        template.shift_remove("metadata");
        c = true;
    }
    c
}

fn rolling_update(extra: Value) -> Value {
    serde_json::json!({"type": "RollingUpdate", "rollingUpdate": extra})
}

fn server_defaults(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let (g, k) = (group(obj).to_string(), kind(obj).to_string());
    let mut c = false;
    if let Some(pointer) = super::edges::pod_spec_pointer(&g, &k)
        && let Some(spec) = obj.pointer_mut(pointer)
    {
        c |= strip_pod_spec_defaults(spec);
        if let Some(template) = pointer.strip_suffix("/spec") {
            c |= strip_template_metadata(obj, template);
        }
    }
    let history = ("revisionHistoryLimit", Value::from(10));
    match (g.as_str(), k.as_str()) {
        ("", "Service") => {
            let single_family = obj
                .pointer("/spec/ipFamilies")
                .and_then(Value::as_array)
                .is_some_and(|f| f.len() == 1);
            let single_stack = obj
                .pointer("/spec/ipFamilyPolicy")
                .is_none_or(|p| p == "SingleStack");
            if let Some(spec) = map_at(obj, "/spec") {
                // A single family under SingleStack is the cluster's primary
                // family: the target chooses its own.
                if single_family && single_stack {
                    c |= spec.shift_remove("ipFamilies").is_some();
                }
                if !spec.contains_key("ipFamilies") {
                    c |= strip_default(spec, "ipFamilyPolicy", Value::from("SingleStack"));
                }
                for (key, default) in [
                    ("sessionAffinity", Value::from("None")),
                    ("type", Value::from("ClusterIP")),
                    ("internalTrafficPolicy", Value::from("Cluster")),
                    ("externalTrafficPolicy", Value::from("Cluster")),
                    ("allocateLoadBalancerNodePorts", Value::from(true)),
                ] {
                    c |= strip_default(spec, key, default);
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for port in ports {
                        let number = port.get("port").cloned();
                        if let Some(p) = port.as_object_mut() {
                            c |= strip_default(p, "protocol", Value::from("TCP"));
                            if let Some(number) = number {
                                c |= strip_default(p, "targetPort", number);
                            }
                        }
                    }
                }
            }
        }
        ("apps", "Deployment") => {
            c |= strip_defaults(
                obj,
                "/spec",
                &[
                    ("replicas", Value::from(1)),
                    history.clone(),
                    ("progressDeadlineSeconds", Value::from(600)),
                    (
                        "strategy",
                        rolling_update(
                            serde_json::json!({"maxSurge": "25%", "maxUnavailable": "25%"}),
                        ),
                    ),
                ],
            );
        }
        ("apps", "StatefulSet") => {
            c |= strip_defaults(
                obj,
                "/spec",
                &[
                    ("replicas", Value::from(1)),
                    history.clone(),
                    ("podManagementPolicy", Value::from("OrderedReady")),
                    (
                        "updateStrategy",
                        rolling_update(serde_json::json!({"partition": 0})),
                    ),
                    // Where the MaxUnavailableStatefulSet feature is on (newer releases).
                    (
                        "updateStrategy",
                        rolling_update(serde_json::json!({"partition": 0, "maxUnavailable": 1})),
                    ),
                    (
                        "persistentVolumeClaimRetentionPolicy",
                        serde_json::json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                    ),
                ],
            );
            if let Some(templates) = obj
                .pointer_mut("/spec/volumeClaimTemplates")
                .and_then(Value::as_array_mut)
            {
                for t in templates {
                    c |= strip_defaults(
                        t,
                        "",
                        &[
                            ("apiVersion", Value::from("v1")),
                            ("kind", Value::from("PersistentVolumeClaim")),
                        ],
                    );
                    c |= strip_defaults(t, "/spec", &[("volumeMode", Value::from("Filesystem"))]);
                    c |= strip_template_metadata(t, "");
                }
            }
        }
        ("apps", "DaemonSet") => {
            // Set by the API server on create, for old clients.
            c |= remove_keys(
                obj,
                "/metadata/annotations",
                &["deprecated.daemonset.template.generation"],
            );
            c |= strip_defaults(
                obj,
                "/spec",
                &[
                    history.clone(),
                    (
                        "updateStrategy",
                        rolling_update(serde_json::json!({"maxUnavailable": 1, "maxSurge": 0})),
                    ),
                ],
            );
        }
        ("batch", "Job") => {
            c |= strip_job_defaults(obj, "/spec");
        }
        ("batch", "CronJob") => {
            c |= strip_defaults(
                obj,
                "/spec",
                &[
                    ("concurrencyPolicy", Value::from("Allow")),
                    ("suspend", Value::from(false)),
                    ("successfulJobsHistoryLimit", Value::from(3)),
                    ("failedJobsHistoryLimit", Value::from(1)),
                ],
            );
            c |= strip_job_defaults(obj, "/spec/jobTemplate/spec");
            c |= strip_template_metadata(obj, "/spec/jobTemplate");
        }
        ("", "PersistentVolumeClaim") => {
            c |= strip_defaults(obj, "/spec", &[("volumeMode", Value::from("Filesystem"))]);
        }
        (
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration",
        ) => {
            if let Some(hooks) = obj.get_mut("webhooks").and_then(Value::as_array_mut) {
                for hook in hooks {
                    c |= strip_defaults(
                        hook,
                        "",
                        &[
                            ("failurePolicy", Value::from("Fail")),
                            ("matchPolicy", Value::from("Equivalent")),
                            ("namespaceSelector", serde_json::json!({})),
                            ("objectSelector", serde_json::json!({})),
                            ("timeoutSeconds", Value::from(10)),
                            ("reinvocationPolicy", Value::from("Never")),
                        ],
                    );
                    c |= strip_defaults(
                        hook,
                        "/clientConfig/service",
                        &[("port", Value::from(443))],
                    );
                    if let Some(rules) = hook.get_mut("rules").and_then(Value::as_array_mut) {
                        for rule in rules {
                            c |= strip_defaults(rule, "", &[("scope", Value::from("*"))]);
                        }
                    }
                }
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            let kind = obj
                .pointer("/spec/names/kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            c |= strip_defaults(
                obj,
                "/spec",
                &[("conversion", serde_json::json!({"strategy": "None"}))],
            );
            c |= strip_defaults(
                obj,
                "/spec/names",
                &[
                    ("listKind", Value::from(format!("{kind}List"))),
                    ("singular", Value::from(kind.to_ascii_lowercase())),
                ],
            );
        }
        ("", "Secret") => {
            c |= strip_defaults(obj, "", &[("type", Value::from("Opaque"))]);
        }
        ("networking.k8s.io", "NetworkPolicy") => {
            let mut default = vec![Value::from("Ingress")];
            if obj.pointer("/spec/egress").is_some() {
                default.push(Value::from("Egress"));
            }
            c |= strip_defaults(obj, "/spec", &[("policyTypes", Value::Array(default))]);
        }
        _ => {}
    }
    changed(c)
}

fn strip_job_defaults(obj: &mut Value, spec: &str) -> bool {
    // completions: 1 is the default only of a Job with parallelism 1: with
    // more, a Job without completions is a work queue.
    let parallel = obj
        .pointer(&format!("{spec}/completionMode"))
        .is_none_or(|m| m == "NonIndexed")
        && obj
            .pointer(&format!("{spec}/parallelism"))
            .is_none_or(|p| p == 1);
    let mut defaults = vec![
        ("backoffLimit", Value::from(6)),
        ("parallelism", Value::from(1)),
        ("completionMode", Value::from("NonIndexed")),
        ("suspend", Value::from(false)),
        ("podReplacementPolicy", Value::from("TerminatingOrFailed")),
        ("manualSelector", Value::from(false)),
    ];
    if parallel {
        defaults.push(("completions", Value::from(1)));
    }
    strip_defaults(obj, spec, &defaults)
}

fn empty_metadata(obj: &mut Value, _: &NormalizeOptions) -> Outcome {
    let Some(meta) = map_at(obj, "/metadata") else {
        return Outcome::Unchanged;
    };
    let mut c = false;
    for key in ["labels", "annotations", "ownerReferences", "finalizers"] {
        let empty = meta.get(key).is_some_and(|v| {
            v.as_object().is_some_and(Map::is_empty)
                || v.as_array().is_some_and(Vec::is_empty)
                || v.is_null()
        });
        if empty {
            meta.remove(key);
            c = true;
        }
    }
    changed(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keep(obj: Value) -> (Value, Vec<&'static str>) {
        match normalize(obj, &NormalizeOptions::default()) {
            Verdict::Keep { object, applied } => (object, applied),
            Verdict::Skip { rule, reason } => panic!("unexpectedly skipped by {rule}: {reason}"),
        }
    }

    fn skipped_by(obj: Value) -> &'static str {
        match normalize(obj, &NormalizeOptions::default()) {
            Verdict::Skip { rule, reason } => {
                assert!(!reason.is_empty());
                rule
            }
            Verdict::Keep { object, .. } => panic!("unexpectedly kept: {object}"),
        }
    }

    #[test]
    fn ferrys_own_volume_objects_are_not_part_of_the_application() {
        let snapshot = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "ferry-3f2a", "namespace": "shop", "labels": {"ferry.dev/mover": "nightly"}},
            "spec": {"source": {"persistentVolumeClaimName": "data"}}
        });
        assert_eq!(skipped_by(snapshot), "skip-ferry-movers");
        let users = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "before-upgrade", "namespace": "shop"},
            "spec": {"source": {"persistentVolumeClaimName": "data"}}
        });
        keep(users);
    }

    /// A Deployment the way the API server returns it.
    fn live_deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "0a1b", "resourceVersion": "4711", "generation": 3,
                "creationTimestamp": "2026-11-25T05:00:00Z", "selfLink": "/apis/apps/v1/namespaces/shop/deployments/web",
                "labels": {"app": "web"},
                "annotations": {"deployment.kubernetes.io/revision": "3", "kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}},
            "status": {"replicas": 2, "readyReplicas": 0}
        })
    }

    #[test]
    fn server_metadata_status_revision_and_last_applied_are_stripped() {
        let (d, applied) = keep(live_deployment());
        let meta = d["metadata"].as_object().unwrap();
        for gone in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "selfLink",
            "managedFields",
        ] {
            assert!(!meta.contains_key(gone), "{gone} must be stripped");
        }
        assert!(d.get("status").is_none());
        assert_eq!(d["metadata"]["annotations"], json!({"team": "a"}));
        assert_eq!(d["spec"]["replicas"], 2);
        for rule in [
            "server-metadata",
            "status",
            "deployment-revision",
            "last-applied-configuration",
        ] {
            assert!(applied.contains(&rule), "{rule} in {applied:?}");
        }
    }

    #[test]
    fn last_applied_is_kept_on_request() {
        let opts = NormalizeOptions {
            keep_last_applied: true,
        };
        let Verdict::Keep { object, .. } = normalize(live_deployment(), &opts) else {
            panic!()
        };
        assert!(
            object["metadata"]["annotations"]
                .get("kubectl.kubernetes.io/last-applied-configuration")
                .is_some()
        );
    }

    #[test]
    fn controller_owned_objects_are_skipped_but_other_owned_objects_kept() {
        let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-5d8", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "1", "controller": true}]}});
        assert_eq!(skipped_by(rs), "skip-controller-owned");
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "2", "controller": true}]}});
        assert_eq!(skipped_by(pod), "skip-controller-owned");
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "nightly-29", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": "3", "controller": true}]}});
        assert_eq!(skipped_by(job), "skip-controller-owned");
        // A Deployment an operator created (owned by a custom resource) is kept, owner uid dropped.
        let (kept, _) = keep(
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "demo.io/v1", "kind": "App", "name": "x", "uid": "4", "controller": true}]}}),
        );
        assert_eq!(
            kept["metadata"]["ownerReferences"],
            json!([{"apiVersion": "demo.io/v1", "kind": "App", "name": "x", "controller": true}])
        );
        // A StatefulSet's claims are not owned by it and stay.
        keep(
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data-db-0", "namespace": "shop"}}),
        );
    }

    #[test]
    fn root_ca_token_secrets_events_and_leases_are_skipped() {
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt", "namespace": "a"}})
            ),
            "skip-root-ca"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token", "metadata": {"name": "t", "namespace": "a"}})
            ),
            "skip-token-secrets"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e", "namespace": "a"}})
            ),
            "skip-events-and-leases"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "a"}})
            ),
            "skip-events-and-leases"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l", "namespace": "a"}})
            ),
            "skip-events-and-leases"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"name": "c"}})
            ),
            "skip-events-and-leases"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "Restore", "metadata": {"name": "r", "namespace": "a"}})
            ),
            "skip-ferry-requests"
        );
        keep(
            json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "BackupPolicy", "metadata": {"name": "p"}}),
        );
        keep(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config", "namespace": "a"}}),
        );
        keep(
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "s", "namespace": "a"}}),
        );
    }

    #[test]
    fn controller_maintained_endpoints_are_skipped_manual_ones_kept() {
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web", "namespace": "a",
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-25T05:00:00Z"}}})
            ),
            "skip-managed-endpoints"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-x", "namespace": "a",
                "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}}})
            ),
            "skip-managed-endpoints"
        );
        keep(
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "external-db", "namespace": "a"}, "subsets": []}),
        );
    }

    #[test]
    fn cluster_defaults_are_skipped() {
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "view", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}}})
            ),
            "skip-cluster-defaults"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "system-node-critical"}, "value": 2000001000})
            ),
            "skip-cluster-defaults"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1.apps"}, "spec": {"service": null}})
            ),
            "skip-cluster-defaults"
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema", "metadata": {"name": "exempt", "annotations": {"apf.kubernetes.io/autoupdate-spec": "true"}}})
            ),
            "skip-cluster-defaults"
        );
        keep(
            json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1beta1.metrics.k8s.io"}, "spec": {"service": {"name": "metrics", "namespace": "kube-system"}}}),
        );
        keep(
            json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "high"}, "value": 1000}),
        );
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "default"}, "spec": {"ports": [{"port": 443}]}})
            ),
            "skip-cluster-defaults"
        );
        keep(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "shop"}, "spec": {"ports": [{"port": 443}]}}),
        );
    }

    #[test]
    fn the_default_service_account_is_skipped_unless_customized() {
        assert_eq!(
            skipped_by(
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "a", "uid": "x"}})
            ),
            "skip-default-service-account"
        );
        keep(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "a"}, "imagePullSecrets": [{"name": "pull"}]}),
        );
        keep(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "a"}}),
        );
    }

    fn service(ports: Value, managed: Value, cluster_ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "a", "managedFields": managed},
            "spec": {"type": "NodePort", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "healthCheckNodePort": 32000, "ports": ports}})
    }

    #[test]
    fn allocated_service_fields_are_dropped_and_user_set_node_ports_kept() {
        let managed = json!([{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:ports": {"k:{\"port\":443,\"protocol\":\"TCP\"}": {".": {}, "f:nodePort": {}, "f:port": {}}}}}}]);
        let ports = json!([{"port": 80, "protocol": "TCP", "nodePort": 31902}, {"port": 443, "protocol": "TCP", "nodePort": 30443}]);
        let (svc, applied) = keep(service(ports, managed, "10.96.3.4"));
        assert!(applied.contains(&"service-allocated-fields"));
        assert!(svc["spec"].get("clusterIP").is_none() && svc["spec"].get("clusterIPs").is_none());
        assert!(svc["spec"].get("healthCheckNodePort").is_none());
        assert!(
            svc["spec"]["ports"][0].get("nodePort").is_none(),
            "allocated node port dropped"
        );
        assert_eq!(
            svc["spec"]["ports"][1]["nodePort"], 30443,
            "user-set node port kept"
        );
    }

    #[test]
    fn headless_services_stay_headless() {
        let (svc, _) = keep(service(
            json!([{"port": 5432, "protocol": "TCP"}]),
            json!([]),
            "None",
        ));
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["clusterIPs"], json!(["None"]));
    }

    #[test]
    fn node_ports_in_last_applied_configuration_count_as_user_set() {
        let mut svc = service(
            json!([{"port": 80, "protocol": "TCP", "nodePort": 30080}]),
            json!([]),
            "10.0.0.1",
        );
        svc["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{\"ports\":[{\"port\":80,\"nodePort\":30080}]}}"});
        let (svc, _) = keep(svc);
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30080);
    }

    #[test]
    fn dynamically_bound_claims_lose_volume_name_and_binding_annotations() {
        let (pvc, _) = keep(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "a", "annotations": {"pv.kubernetes.io/bind-completed": "yes", "volume.kubernetes.io/storage-provisioner": "ebs.csi.aws.com", "keep": "me"}},
            "spec": {"volumeName": "pvc-123", "storageClassName": "gp3"}}));
        assert!(pvc["spec"].get("volumeName").is_none());
        assert_eq!(pvc["metadata"]["annotations"], json!({"keep": "me"}));
        // A claim pre-bound by the user to a named volume keeps it.
        let (pre, _) = keep(
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d", "namespace": "a"}, "spec": {"volumeName": "nfs-1"}}),
        );
        assert_eq!(pre["spec"]["volumeName"], "nfs-1");
        let (pv, _) = keep(
            json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv1"},
            "spec": {"claimRef": {"kind": "PersistentVolumeClaim", "namespace": "a", "name": "data", "uid": "u", "resourceVersion": "9"}}}),
        );
        assert_eq!(
            pv["spec"]["claimRef"],
            json!({"kind": "PersistentVolumeClaim", "namespace": "a", "name": "data"})
        );
    }

    #[test]
    fn pods_lose_their_node() {
        let (pod, _) = keep(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a"}, "spec": {"nodeName": "n1", "containers": []}}),
        );
        assert!(pod["spec"].get("nodeName").is_none());
    }

    #[test]
    fn generated_job_selectors_are_dropped_manual_ones_kept() {
        let (job, _) = keep(
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "a"},
            "spec": {"selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "u"}},
                     "template": {"metadata": {"labels": {"batch.kubernetes.io/controller-uid": "u", "controller-uid": "u", "job-name": "j", "batch.kubernetes.io/job-name": "j", "app": "x"}}}}}),
        );
        assert!(job["spec"].get("selector").is_none());
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"],
            json!({"app": "x"})
        );
        let (manual, _) = keep(
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "a"},
            "spec": {"manualSelector": true, "selector": {"matchLabels": {"app": "x"}}}}),
        );
        assert!(manual["spec"].get("selector").is_some());
    }

    #[test]
    fn protection_finalizers_are_left_to_the_target() {
        let (pvc, applied) = keep(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "a", "finalizers": ["kubernetes.io/pvc-protection"]},
            "spec": {"accessModes": ["ReadWriteOnce"]}}));
        assert!(pvc["metadata"].get("finalizers").is_none());
        assert!(applied.contains(&"protection-finalizers"));
        let (custom, _) = keep(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "a", "finalizers": ["kubernetes.io/pvc-protection", "example.com/backup"]}}));
        assert_eq!(
            custom["metadata"]["finalizers"],
            json!(["example.com/backup"])
        );
    }

    #[test]
    fn namespaces_lose_finalizers_and_the_automatic_name_label() {
        let (ns, _) = keep(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}));
        assert_eq!(
            ns,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}})
        );
    }

    #[test]
    fn legacy_token_references_are_dropped_from_service_accounts() {
        let (sa, _) = keep(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "a"},
            "secrets": [{"name": "web-token-x7k2p"}, {"name": "web-extra"}]}),
        );
        assert_eq!(sa["secrets"], json!([{"name": "web-extra"}]));
    }

    #[test]
    fn aggregated_cluster_roles_lose_their_filled_rules() {
        let (role, _) = keep(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "monitoring"},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"rbac.example.com/aggregate-to-monitoring": "true"}}]},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
        );
        assert!(role.get("rules").is_none());
        let (plain, _) = keep(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}, "rules": []}),
        );
        assert!(plain.get("rules").is_some());
    }

    #[test]
    fn statefulset_claim_template_status_is_dropped_and_empty_maps_removed() {
        let (sts, applied) = keep(
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "a", "labels": {}, "annotations": {}},
            "spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {}, "status": {"phase": "Pending"}}]}}),
        );
        assert!(
            sts["spec"]["volumeClaimTemplates"][0]
                .get("status")
                .is_none()
        );
        assert_eq!(sts["metadata"], json!({"name": "db", "namespace": "a"}));
        assert!(applied.contains(&"empty-metadata"));
    }

    #[test]
    fn server_defaults_are_stripped_and_other_values_kept() {
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "a"},
            "spec": {"type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                     "internalTrafficPolicy": "Cluster", "clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"],
                     "selector": {"app": "db"},
                     "ports": [{"port": 5432, "targetPort": 5432, "protocol": "TCP"}, {"port": 53, "targetPort": "dns", "protocol": "UDP"}]}});
        let (svc, applied) = keep(service);
        assert!(applied.contains(&"server-defaults"));
        assert_eq!(
            svc["spec"],
            json!({"selector": {"app": "db"}, "ports": [{"port": 5432}, {"port": 53, "targetPort": "dns", "protocol": "UDP"}]})
        );
        let dual = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "d", "namespace": "a"},
            "spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack", "type": "NodePort", "externalTrafficPolicy": "Local"}});
        let (dual, _) = keep(dual);
        assert_eq!(
            dual["spec"],
            json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack", "type": "NodePort", "externalTrafficPolicy": "Local"})
        );

        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w", "namespace": "a"},
            "spec": {"replicas": 1, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                     "selector": {"matchLabels": {"app": "w"}},
                     "template": {"metadata": {"creationTimestamp": null, "labels": {"app": "w"}}, "spec": {
                         "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                         "securityContext": {}, "terminationGracePeriodSeconds": 30,
                         "volumes": [{"name": "c", "configMap": {"name": "c", "defaultMode": 420}}, {"name": "s", "secret": {"secretName": "s", "defaultMode": 256}}],
                         "containers": [
                            {"name": "a", "image": "redis:7", "imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log",
                             "terminationMessagePolicy": "File", "resources": {}, "ports": [{"containerPort": 6379, "protocol": "TCP"}],
                             "readinessProbe": {"tcpSocket": {"port": 6379}, "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                             "env": [{"name": "N", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}]},
                            {"name": "b", "image": "busybox", "imagePullPolicy": "IfNotPresent", "terminationMessagePolicy": "FallbackToLogsOnError"},
                            {"name": "c", "image": "busybox:latest", "imagePullPolicy": "Always"}]}}}});
        let (d, _) = keep(deployment);
        assert_eq!(
            d["spec"],
            json!({"selector": {"matchLabels": {"app": "w"}},
                   "template": {"metadata": {"labels": {"app": "w"}}, "spec": {
                       "volumes": [{"name": "c", "configMap": {"name": "c"}}, {"name": "s", "secret": {"secretName": "s", "defaultMode": 256}}],
                       "containers": [
                          {"name": "a", "image": "redis:7", "ports": [{"containerPort": 6379}], "readinessProbe": {"tcpSocket": {"port": 6379}},
                           "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
                          {"name": "b", "image": "busybox", "imagePullPolicy": "IfNotPresent", "terminationMessagePolicy": "FallbackToLogsOnError"},
                          {"name": "c", "image": "busybox:latest"}]}}}),
            "non-default values (a pull policy other than the image's default, a mode of 256) stay"
        );

        let work_queue = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "q", "namespace": "a"},
            "spec": {"parallelism": 3, "completions": 1, "backoffLimit": 6, "template": {"spec": {"restartPolicy": "Never", "containers": []}}}});
        let (q, _) = keep(work_queue);
        assert_eq!(
            q["spec"],
            json!({"parallelism": 3, "completions": 1, "template": {"spec": {"restartPolicy": "Never", "containers": []}}})
        );
    }

    #[test]
    fn newer_server_defaults_and_empty_templates_are_stripped() {
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "a"},
            "spec": {"serviceName": "db", "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0, "maxUnavailable": 1}},
                     "template": {"spec": {"containers": []}},
                     "volumeClaimTemplates": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "metadata": {"name": "data", "creationTimestamp": null}, "spec": {"volumeMode": "Filesystem"}}]}});
        let (sts, _) = keep(sts);
        assert_eq!(
            sts["spec"],
            json!({"serviceName": "db", "template": {"spec": {"containers": []}},
                   "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {}}]})
        );
        let partitioned = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "a"},
            "spec": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}}});
        let (partitioned, _) = keep(partitioned);
        assert_eq!(
            partitioned["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
            2
        );

        let ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "a", "annotations": {"deprecated.daemonset.template.generation": "1"}},
            "spec": {"template": {"metadata": {}, "spec": {"containers": []}}}});
        let (ds, _) = keep(ds);
        assert!(ds["metadata"].get("annotations").is_none(), "{ds}");
        assert_eq!(
            ds["spec"],
            json!({"template": {"spec": {"containers": []}}})
        );

        let cj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c", "namespace": "a"},
            "spec": {"schedule": "@daily", "concurrencyPolicy": "Allow", "jobTemplate": {"metadata": {},
                "spec": {"template": {"metadata": {"creationTimestamp": null}, "spec": {"restartPolicy": "OnFailure"}}}}}});
        let (cj, _) = keep(cj);
        assert_eq!(
            cj["spec"],
            json!({"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}}})
        );

        let hook = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": "m"},
            "webhooks": [{"name": "m.example.com", "clientConfig": {"service": {"name": "s", "namespace": "a", "port": 443}},
                "rules": [{"apiGroups": ["example.com"], "resources": ["things"], "scope": "*"}],
                "failurePolicy": "Ignore", "matchPolicy": "Equivalent", "namespaceSelector": {}, "objectSelector": {},
                "timeoutSeconds": 10, "reinvocationPolicy": "Never", "sideEffects": "None"}]});
        let (hook, _) = keep(hook);
        assert_eq!(
            hook["webhooks"],
            json!([{"name": "m.example.com", "clientConfig": {"service": {"name": "s", "namespace": "a"}},
                    "rules": [{"apiGroups": ["example.com"], "resources": ["things"]}],
                    "failurePolicy": "Ignore", "sideEffects": "None"}])
        );
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "things.example.com"},
            "spec": {"group": "example.com", "names": {"plural": "things", "singular": "thing", "kind": "Thing", "listKind": "ThingList"},
                     "conversion": {"strategy": "None"}}});
        let (crd, _) = keep(crd);
        assert_eq!(
            crd["spec"],
            json!({"group": "example.com", "names": {"plural": "things", "kind": "Thing"}})
        );
    }

    #[test]
    fn pull_policy_defaults_follow_the_image_reference() {
        assert_eq!(default_pull_policy("nginx"), "Always");
        assert_eq!(default_pull_policy("nginx:latest"), "Always");
        assert_eq!(default_pull_policy("nginx:1.27"), "IfNotPresent");
        assert_eq!(default_pull_policy("registry:5000/team/app"), "Always");
        assert_eq!(
            default_pull_policy("registry:5000/team/app:v2"),
            "IfNotPresent"
        );
        assert_eq!(default_pull_policy("nginx@sha256:abcd"), "IfNotPresent");
    }

    #[test]
    fn every_rule_is_documented() {
        for rule in RULES {
            assert!(
                !rule.name.is_empty() && !rule.matches.is_empty() && !rule.description.is_empty()
            );
        }
        let mut names: Vec<_> = RULES.iter().map(|r| r.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RULES.len(), "rule names are unique");
    }
}
