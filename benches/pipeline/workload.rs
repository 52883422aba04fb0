//! The benchmark's application estate: `N` objects spread over namespaces
//! the way a multi-tenant cluster holds them. Each namespace holds one
//! application of 26 objects (workloads, services, config, secrets of a few
//! KB, RBAC, claims, an ingress, a network policy and custom resources of
//! one CRD); the CRD is the one cluster-scoped object. The estate is
//! deterministic: the same `N` always gives the same objects.

use serde_json::{Value, json};

/// Objects in one namespace, the Namespace object included.
pub const PER_NAMESPACE: usize = 26;
pub const CRD_GROUP: &str = "bench.ferry.dev";

/// `N` objects (at least one namespace's worth plus the CRD): the CRD
/// first, then each namespace followed by its application.
pub fn estate(n: usize) -> Vec<Value> {
    let namespaces = namespaces_for(n);
    let mut objects = Vec::with_capacity(namespaces * PER_NAMESPACE + 1);
    objects.push(widget_crd());
    for i in 0..namespaces {
        objects.extend(application(&namespace_name(i), i));
    }
    objects
}

/// What every cluster of the benchmark provides before any application
/// arrives (as a cloud cluster does): the storage and ingress classes the
/// estate uses. Not counted in `N`.
pub fn platform() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "gp3"},
            "provisioner": "ebs.csi.aws.com", "volumeBindingMode": "WaitForFirstConsumer",
            "parameters": {"type": "gp3"}
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": "nginx"},
            "spec": {"controller": "k8s.io/ingress-nginx"}
        }),
    ]
}

pub fn namespaces_for(n: usize) -> usize {
    n.saturating_sub(1).div_ceil(PER_NAMESPACE).max(1)
}

pub fn namespace_name(i: usize) -> String {
    format!("bench-{i:05}")
}

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{CRD_GROUP}")},
        "spec": {
            "group": CRD_GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
                }}
            }]
        }
    })
}

/// Deterministic filler that does not compress to nothing: secrets and
/// config of a real estate are mostly distinct bytes.
fn filler(seed: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ALPHABET[(x >> 58) as usize] as char
        })
        .collect()
}

fn labels(app: &str, component: &str) -> Value {
    json!({"app.kubernetes.io/name": app, "app.kubernetes.io/component": component, "team": "bench"})
}

fn pod_template(ns: &str, component: &str, image: &str, seed: usize) -> Value {
    json!({
        "metadata": {"labels": labels("shop", component)},
        "spec": {
            "serviceAccountName": "app",
            "nodeSelector": {"topology.kubernetes.io/zone": "us-east-1a"},
            "containers": [{
                "name": component,
                "image": image,
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": [
                    {"name": "DATABASE_URL", "value": format!("postgres://db.{ns}.svc:5432/shop")},
                    {"name": "CACHE_TTL", "value": format!("{}", 30 + seed % 90)},
                    {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "secret-0", "key": "api-key"}}}
                ],
                "envFrom": [{"configMapRef": {"name": "config-0"}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [
                    {"name": "settings", "mountPath": "/etc/shop"},
                    {"name": "uploads", "mountPath": "/var/uploads"}
                ],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10}
            }],
            "volumes": [
                {"name": "settings", "configMap": {"name": "config-1"}},
                {"name": "uploads", "persistentVolumeClaim": {"claimName": "uploads"}}
            ]
        }
    })
}

/// One namespace and its application: 26 objects.
fn application(ns: &str, i: usize) -> Vec<Value> {
    let meta = |name: &str, component: &str| json!({"name": name, "namespace": ns, "labels": labels("shop", component)});
    let mut out = Vec::with_capacity(PER_NAMESPACE);
    out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"team": "bench"}}}));
    out.push(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("app", "rbac")}),
    );
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("app", "rbac"),
        "rules": [{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]}]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("app", "rbac"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "app"},
        "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": ns}]
    }));
    for k in 0..5 {
        out.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(&format!("config-{k}"), "config"),
            "data": {
                "settings.yaml": format!("database: db.{ns}.svc:5432\ncache: redis.{ns}.svc:6379\nworkers: {}\n", 2 + k),
                "feature-flags": filler(i * 100 + k, 768),
            }
        }));
    }
    for k in 0..5 {
        let seed = i * 100 + 50 + k;
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": meta(&format!("secret-{k}"), "secrets"),
            "type": "Opaque",
            // 2 to 4 KiB of base64 per secret.
            "data": {"api-key": filler(seed, 64), "tls.key": filler(seed + 7, 2048 + 512 * k)}
        }));
    }
    for (name, image) in [
        ("web", "docker.io/library/nginx:1.27"),
        ("worker", "quay.io/shop/worker:2.4.1"),
    ] {
        out.push(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name, name),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": "shop", "app.kubernetes.io/component": name}},
                "template": pod_template(ns, name, image, i)
            }
        }));
    }
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("db", "db"),
        "spec": {
            "replicas": 1, "serviceName": "db",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "shop", "app.kubernetes.io/component": "db"}},
            "template": {
                "metadata": {"labels": labels("shop", "db")},
                "spec": {"containers": [{
                    "name": "postgres", "image": "docker.io/library/postgres:17",
                    "ports": [{"name": "pg", "containerPort": 5432}],
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
                }]}
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3", "resources": {"requests": {"storage": "10Gi"}}}
            }]
        }
    }));
    for (name, port, headless) in [
        ("web", 80, false),
        ("worker", 8080, false),
        ("db", 5432, true),
    ] {
        let mut spec = json!({
            "selector": {"app.kubernetes.io/name": "shop", "app.kubernetes.io/component": name},
            "ports": [{"name": "main", "port": port, "targetPort": port}]
        });
        if headless {
            spec["clusterIP"] = json!("None");
        }
        out.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(name, name), "spec": spec}));
    }
    for (name, size) in [("uploads", "20Gi"), ("cache", "5Gi")] {
        out.push(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(name, "storage"),
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3", "resources": {"requests": {"storage": size}}}
        }));
    }
    out.push(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta("web", "web"),
        "spec": {
            "ingressClassName": "nginx",
            "rules": [{"host": format!("{ns}.shop.example.com"), "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}
            }]}}]
        }
    }));
    out.push(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("db-from-app", "db"),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "shop"}}}]}],
            "policyTypes": ["Ingress"]
        }
    }));
    for k in 0..2 {
        out.push(json!({
            "apiVersion": format!("{CRD_GROUP}/v1"), "kind": "Widget", "metadata": meta(&format!("widget-{k}"), "widgets"),
            "spec": {"size": k + 1, "color": if k == 0 { "blue" } else { "green" }, "notes": filler(i * 100 + 90 + k, 256)}
        }));
    }
    debug_assert_eq!(out.len(), PER_NAMESPACE);
    out
}
