//! Everything the controller needs in a cluster, generated from the code so
//! that the CRDs, the admission policy and the RBAC never drift from what
//! the controller does. `ferry controller manifests` prints them; the
//! kustomize base and the Helm chart in `deploy/` are checked against them.

use serde_json::{Value, json};

use super::CONTROLLER_NAME;

/// What varies between installations.
#[derive(Debug, Clone)]
pub struct Install {
    pub namespace: String,
    pub image: String,
    pub replicas: u32,
}

impl Default for Install {
    fn default() -> Self {
        Install {
            namespace: "ferry-system".into(),
            image: concat!("ghcr.io/ferry-dev/ferry:", env!("CARGO_PKG_VERSION")).into(),
            replicas: 2,
        }
    }
}

/// The admission policy that records who creates a Backup or Restore.
/// It overwrites `spec.requester` with the authenticated user on every
/// create, so the field cannot be forged; the CRD keeps it immutable after.
pub fn requester_policy() -> Vec<Value> {
    let expression = "[JSONPatch{op: \"add\", path: \"/spec/requester\", value: Object.spec.requester{username: request.userInfo.username, groups: has(request.userInfo.groups) ? request.userInfo.groups : []}}]";
    vec![
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": "ferry-requester"},
            "spec": {
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "matchConstraints": {
                    "resourceRules": [{
                        "apiGroups": ["ferry.dev"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE"],
                        "resources": ["backups", "restores"],
                    }],
                },
                "mutations": [{
                    "patchType": "JSONPatch",
                    "jsonPatch": {"expression": expression},
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": "ferry-requester"},
            "spec": {"policyName": "ferry-requester"},
        }),
    ]
}

/// The controller's permissions. It reads everything (policies back up
/// whole namespaces), runs mover Pods, and writes only its own resources,
/// Events and, in its namespace, plans and its Lease. Requests of users
/// are carried out by impersonating them, so it needs no write access to
/// their objects; the `impersonate` verb is the power to guard.
pub fn controller_rbac(namespace: &str) -> Vec<Value> {
    let labels =
        json!({"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": "controller"});
    vec![
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": CONTROLLER_NAME, "namespace": namespace, "labels": labels},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": CONTROLLER_NAME, "labels": labels},
            "rules": [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["ferry.dev"],
                 "resources": ["backups", "backups/status", "restores/status",
                               "backuppolicies/status", "repositories/status"],
                 "verbs": ["create", "update", "patch", "delete"]},
                {"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"],
                 "verbs": ["impersonate"]},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
                 "verbs": ["create", "patch", "update"]},
                // Mover Pods, their Secrets and claims, hooks, CSI snapshots.
                {"apiGroups": [""],
                 "resources": ["pods", "secrets", "persistentvolumeclaims"],
                 "verbs": ["create", "delete"]},
                {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
                {"apiGroups": ["snapshot.storage.k8s.io"],
                 "resources": ["volumesnapshots", "volumesnapshotcontents"],
                 "verbs": ["create", "delete", "patch", "update"]},
                {"apiGroups": ["groupsnapshot.storage.k8s.io"],
                 "resources": ["volumegroupsnapshots", "volumegroupsnapshotcontents"],
                 "verbs": ["create", "delete", "patch", "update"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": CONTROLLER_NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLLER_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_NAME, "namespace": namespace}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": CONTROLLER_NAME, "namespace": namespace, "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"],
                 "verbs": ["create", "update", "patch", "delete"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "verbs": ["create", "update", "patch"]},
                // Its own tokens, for CSI snapshot metadata services
                // (changed-block tracking).
                {"apiGroups": [""], "resources": ["serviceaccounts/token"],
                 "resourceNames": [CONTROLLER_NAME], "verbs": ["create"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": CONTROLLER_NAME, "namespace": namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROLLER_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_NAME, "namespace": namespace}],
        }),
    ]
}

/// Roles aggregated into the built-in `admin`, `edit` and `view`: whoever
/// may edit a namespace may ask for its Backups and Restores there.
pub fn user_roles() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "ferry-edit", "labels": {
                "rbac.authorization.k8s.io/aggregate-to-admin": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
            }},
            "rules": [{"apiGroups": ["ferry.dev"], "resources": ["backups", "restores"],
                       "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "ferry-view", "labels": {
                "rbac.authorization.k8s.io/aggregate-to-view": "true",
            }},
            "rules": [{"apiGroups": ["ferry.dev"], "resources": ["backups", "restores"],
                       "verbs": ["get", "list", "watch"]}],
        }),
    ]
}

pub fn deployment(install: &Install) -> Value {
    let labels =
        json!({"app.kubernetes.io/name": "ferry", "app.kubernetes.io/component": "controller"});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CONTROLLER_NAME, "namespace": install.namespace, "labels": labels},
        "spec": {
            "replicas": install.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": CONTROLLER_NAME,
                    // Work in progress finishes on shutdown (see `ferry controller --help`).
                    "terminationGracePeriodSeconds": 3600,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "controller",
                        "image": install.image,
                        "args": ["controller", "--metrics-address=0.0.0.0:8080",
                                 format!("--mover-image={}", install.image)],
                        "env": [
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "FERRY_LOG_FORMAT", "value": "json"},
                        ],
                        "ports": [{"name": "metrics", "containerPort": 8080}],
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"memory": "1Gi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                },
            },
        },
    })
}

/// Every manifest of an installation, in the order to apply them.
pub fn all(install: &Install) -> Vec<Value> {
    let mut out: Vec<Value> = super::crd::crds()
        .into_iter()
        .map(|crd| serde_json::to_value(crd).expect("CRDs serialize"))
        .collect();
    out.extend(requester_policy());
    out.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": install.namespace},
    }));
    out.extend(controller_rbac(&install.namespace));
    out.extend(user_roles());
    out.push(deployment(install));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_is_not_bound_to_cluster_admin_and_writes_no_user_objects() {
        let rbac = controller_rbac("ferry-system");
        let text = serde_json::to_string(&rbac).unwrap();
        assert!(!text.contains("cluster-admin"));
        let role = &rbac[1];
        for rule in role["rules"].as_array().unwrap() {
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            if rule["resources"] == json!(["*"]) {
                assert_eq!(verbs, ["get", "list", "watch"], "wildcards are read-only");
            }
            assert!(!verbs.contains(&"*"), "{rule}");
        }
    }

    #[test]
    fn every_manifest_has_a_kind_and_a_name() {
        for manifest in all(&Install::default()) {
            assert!(manifest["kind"].is_string(), "{manifest}");
            assert!(manifest["metadata"]["name"].is_string(), "{manifest}");
        }
    }
}
