//! Typed references between objects: what an object needs (a ConfigMap it
//! mounts, the Role a binding grants, the CRD of a custom resource…), read
//! from the object alone. The graph turns them into edges. Direction: from
//! the object that refers to the object it needs, so restore order follows
//! the edges backwards.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::object::split_api_version;
use super::select::LabelSelector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeKind {
    /// ownerReferences: the owned object points at its owner.
    Owns,
    /// Volumes: ConfigMap, Secret, PVC and projected sources.
    Mounts,
    /// env valueFrom and envFrom.
    Env,
    UsesServiceAccount,
    PullsWith,
    /// RoleBinding/ClusterRoleBinding → role and subjects.
    Binds,
    /// PVC → PV → StorageClass; claim templates → StorageClass.
    Claims,
    /// Service/PDB/NetworkPolicy/HPA → workloads.
    Selects,
    /// Ingress → Service, Secret, IngressClass.
    Routes,
    /// Custom resource → its CRD.
    InstanceOf,
    /// Webhook configuration / APIService → the Service that serves it and
    /// the CRDs whose resources it handles; a CRD → its conversion webhook's Service.
    Serves,
    /// Role/ClusterRole → the CRDs whose resources its rules grant verbs on.
    Grants,
    /// A workload → the CRDs labelled as part of the same application
    /// (`app.kubernetes.io/instance`, `part-of`, the Helm release).
    PartOf,
    /// PriorityClass, RuntimeClass.
    ScheduledWith,
    /// A namespaced object → its Namespace.
    InNamespace,
}

impl EdgeKind {
    /// Whether the target must exist before the referring object is written.
    /// `selects` is informational: a Service can exist before its pods.
    pub fn orders_restore(self) -> bool {
        !matches!(self, EdgeKind::Selects)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Owns => "owns",
            EdgeKind::Mounts => "mounts",
            EdgeKind::Env => "env",
            EdgeKind::UsesServiceAccount => "uses-service-account",
            EdgeKind::PullsWith => "pulls-with",
            EdgeKind::Binds => "binds",
            EdgeKind::Claims => "claims",
            EdgeKind::Selects => "selects",
            EdgeKind::Routes => "routes",
            EdgeKind::InstanceOf => "instance-of",
            EdgeKind::Serves => "serves",
            EdgeKind::Grants => "grants",
            EdgeKind::PartOf => "part-of",
            EdgeKind::ScheduledWith => "scheduled-with",
            EdgeKind::InNamespace => "in-namespace",
        }
    }
}

/// What a reference points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Target {
    Object {
        group: String,
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// Workloads (or pods) in `namespace` whose pod labels match.
    Selector {
        namespace: String,
        selector: LabelSelector,
    },
    /// The CRD that defines `group`/`kind`.
    Crd { group: String, kind: String },
    /// The CRDs of `group` whose plural is `resource` (`*`: every CRD of the group).
    CrdResources { group: String, resource: String },
    /// The CRDs labelled (or, for the Helm release, annotated) `key`=`value`.
    CrdsLabelled { key: String, value: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub kind: EdgeKind,
    pub target: Target,
    /// Where in the object the reference was found.
    pub path: String,
    /// The object works without the target (optional env/volume sources).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Object {
                kind,
                namespace: Some(ns),
                name,
                ..
            } => write!(f, "{kind}/{ns}/{name}"),
            Target::Object {
                kind,
                namespace: None,
                name,
                ..
            } => write!(f, "{kind}/{name}"),
            Target::Selector {
                namespace,
                selector,
            } => write!(f, "pods matching {selector} in {namespace}"),
            Target::Crd { group, kind } => write!(f, "the CRD of {kind}.{group}"),
            Target::CrdResources { group, resource } => {
                write!(f, "the CRDs of {resource}.{group}")
            }
            Target::CrdsLabelled { key, value } => write!(f, "the CRDs with {key}={value}"),
        }
    }
}

/// API groups built into Kubernetes: objects of other groups are custom
/// resources and need their CRD.
pub fn is_builtin_group(group: &str) -> bool {
    group.is_empty()
        || !group.contains('.')
        || group.ends_with(".k8s.io") && !group.ends_with(".x-k8s.io")
        || group == "apiextensions.k8s.io"
}

/// Labels (and the Helm annotation) that name the application an object
/// belongs to; CRDs carrying the same value belong to it too.
pub const APPLICATION_KEYS: &[&str] = &[
    "app.kubernetes.io/instance",
    "app.kubernetes.io/part-of",
    "meta.helm.sh/release-name",
];

impl Target {
    /// Whether `crd` (a CustomResourceDefinition) is one this target means.
    pub fn matches_crd(&self, crd: &Value) -> bool {
        let text = |p: &str| crd.pointer(p).and_then(Value::as_str);
        match self {
            Target::Crd { group, kind } => {
                text("/spec/group") == Some(group) && text("/spec/names/kind") == Some(kind)
            }
            Target::CrdResources { group, resource } => {
                text("/spec/group") == Some(group)
                    && (resource == "*" || text("/spec/names/plural") == Some(resource))
            }
            Target::CrdsLabelled { key, value } => {
                let place = if key.starts_with("meta.helm.sh/") {
                    "annotations"
                } else {
                    "labels"
                };
                crd.pointer(&format!("/metadata/{place}"))
                    .and_then(|m| m.get(key))
                    .and_then(Value::as_str)
                    == Some(value)
            }
            Target::Object { .. } | Target::Selector { .. } => false,
        }
    }

    /// Targets that stand for any number of CRDs, found by listing them.
    pub fn is_crd_pattern(&self) -> bool {
        matches!(
            self,
            Target::CrdResources { .. } | Target::CrdsLabelled { .. }
        )
    }
}

/// The custom resources named by RBAC or admission `rules`: one
/// (group, plural or `*`) per pair, without built-in groups, the `*` group
/// or subresources.
fn custom_resources_of_rules<'a>(
    rules: impl Iterator<Item = (String, &'a Value)>,
    kind: EdgeKind,
    out: &mut Vec<Reference>,
) {
    let strings = |v: &'a Value, key: &str| -> Vec<&'a str> {
        v.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    for (at, rule) in rules {
        if kind == EdgeKind::Grants && strings(rule, "verbs").is_empty() {
            continue;
        }
        for group in strings(rule, "apiGroups") {
            if group == "*" || is_builtin_group(group) {
                continue;
            }
            for resource in strings(rule, "resources") {
                let resource = resource.split('/').next().unwrap_or_default();
                if resource.is_empty() || !seen.insert((group, resource)) {
                    continue;
                }
                out.push(Reference {
                    kind,
                    target: Target::CrdResources {
                        group: group.into(),
                        resource: resource.into(),
                    },
                    path: at.clone(),
                    optional: true,
                });
            }
        }
    }
}

struct Collector<'a> {
    namespace: Option<&'a str>,
    out: Vec<Reference>,
}

impl Collector<'_> {
    #[allow(clippy::too_many_arguments)]
    fn object(
        &mut self,
        kind: EdgeKind,
        group: &str,
        target_kind: &str,
        namespaced: bool,
        name: Option<&str>,
        path: String,
        optional: bool,
    ) {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return;
        };
        let namespace = if namespaced {
            self.namespace.map(String::from)
        } else {
            None
        };
        self.out.push(Reference {
            kind,
            target: Target::Object {
                group: group.into(),
                kind: target_kind.into(),
                namespace,
                name: name.into(),
            },
            path,
            optional,
        });
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn array<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = (usize, &'a Value)> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

/// Where the pod template of a workload kind lives.
pub fn pod_spec_pointer(group: &str, kind: &str) -> Option<&'static str> {
    match (group, kind) {
        ("", "Pod") => Some("/spec"),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
        | ("batch", "Job")
        | ("", "ReplicationController") => Some("/spec/template/spec"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

fn pointer_to_path(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

fn pod_spec_references(c: &mut Collector, spec: &Value, base: &str) {
    for (i, volume) in array(spec, "/volumes") {
        let at = format!("{base}.volumes[{i}]");
        if let Some(cm) = volume.get("configMap") {
            let optional = cm.get("optional").and_then(Value::as_bool).unwrap_or(false);
            c.object(
                EdgeKind::Mounts,
                "",
                "ConfigMap",
                true,
                str_at(cm, "name"),
                format!("{at}.configMap.name"),
                optional,
            );
        }
        if let Some(secret) = volume.get("secret") {
            let optional = secret
                .get("optional")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            c.object(
                EdgeKind::Mounts,
                "",
                "Secret",
                true,
                str_at(secret, "secretName"),
                format!("{at}.secret.secretName"),
                optional,
            );
        }
        if let Some(pvc) = volume.get("persistentVolumeClaim") {
            c.object(
                EdgeKind::Mounts,
                "",
                "PersistentVolumeClaim",
                true,
                str_at(pvc, "claimName"),
                format!("{at}.persistentVolumeClaim.claimName"),
                false,
            );
        }
        for (j, source) in array(volume, "/projected/sources") {
            for (key, kind) in [("configMap", "ConfigMap"), ("secret", "Secret")] {
                if let Some(s) = source.get(key) {
                    let optional = s.get("optional").and_then(Value::as_bool).unwrap_or(false);
                    c.object(
                        EdgeKind::Mounts,
                        "",
                        kind,
                        true,
                        str_at(s, "name"),
                        format!("{at}.projected.sources[{j}].{key}.name"),
                        optional,
                    );
                }
            }
        }
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for (i, container) in array(spec, &format!("/{list}")) {
            let at = format!("{base}.{list}[{i}]");
            for (j, env) in array(container, "/env") {
                for (key, kind) in [("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")] {
                    if let Some(r) = env.pointer(&format!("/valueFrom/{key}")) {
                        let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                        c.object(
                            EdgeKind::Env,
                            "",
                            kind,
                            true,
                            str_at(r, "name"),
                            format!("{at}.env[{j}].valueFrom.{key}.name"),
                            optional,
                        );
                    }
                }
            }
            for (j, from) in array(container, "/envFrom") {
                for (key, kind) in [("configMapRef", "ConfigMap"), ("secretRef", "Secret")] {
                    if let Some(r) = from.get(key) {
                        let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                        c.object(
                            EdgeKind::Env,
                            "",
                            kind,
                            true,
                            str_at(r, "name"),
                            format!("{at}.envFrom[{j}].{key}.name"),
                            optional,
                        );
                    }
                }
            }
        }
    }
    let sa = str_at(spec, "serviceAccountName").or_else(|| str_at(spec, "serviceAccount"));
    if sa != Some("default") {
        c.object(
            EdgeKind::UsesServiceAccount,
            "",
            "ServiceAccount",
            true,
            sa,
            format!("{base}.serviceAccountName"),
            false,
        );
    }
    for (i, secret) in array(spec, "/imagePullSecrets") {
        c.object(
            EdgeKind::PullsWith,
            "",
            "Secret",
            true,
            str_at(secret, "name"),
            format!("{base}.imagePullSecrets[{i}].name"),
            false,
        );
    }
    c.object(
        EdgeKind::ScheduledWith,
        "scheduling.k8s.io",
        "PriorityClass",
        false,
        str_at(spec, "priorityClassName").filter(|n| !n.starts_with("system-")),
        format!("{base}.priorityClassName"),
        false,
    );
    c.object(
        EdgeKind::ScheduledWith,
        "node.k8s.io",
        "RuntimeClass",
        false,
        str_at(spec, "runtimeClassName"),
        format!("{base}.runtimeClassName"),
        false,
    );
}

/// The workload kinds a selector-based reference may match.
fn selector_reference(
    c: &mut Collector,
    kind: EdgeKind,
    selector: Option<LabelSelector>,
    path: &str,
) {
    if let (Some(ns), Some(selector)) = (c.namespace, selector)
        && !selector.is_empty()
    {
        c.out.push(Reference {
            kind,
            target: Target::Selector {
                namespace: ns.to_string(),
                selector,
            },
            path: path.into(),
            optional: false,
        });
    }
}

/// Every reference one (normalized) object makes.
pub fn references(obj: &Value) -> Vec<Reference> {
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (group, _) = split_api_version(api_version);
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str);
    let mut c = Collector {
        namespace,
        out: Vec::new(),
    };

    if let Some(ns) = namespace {
        c.object(
            EdgeKind::InNamespace,
            "",
            "Namespace",
            false,
            Some(ns),
            "metadata.namespace".into(),
            false,
        );
    }
    for (i, owner) in array(obj, "/metadata/ownerReferences") {
        let (owner_group, _) = split_api_version(str_at(owner, "apiVersion").unwrap_or_default());
        let owner_kind = str_at(owner, "kind").unwrap_or_default();
        // Owners are namespaced exactly when the owned object is, except for
        // cluster-scoped owners of namespaced objects (rare: treat the owner
        // as in the same scope, which is what the API server allows).
        c.object(
            EdgeKind::Owns,
            owner_group,
            owner_kind,
            namespace.is_some(),
            str_at(owner, "name"),
            format!("metadata.ownerReferences[{i}]"),
            false,
        );
    }
    if !is_builtin_group(group) {
        c.out.push(Reference {
            kind: EdgeKind::InstanceOf,
            target: Target::Crd {
                group: group.into(),
                kind: kind.into(),
            },
            path: "apiVersion".into(),
            optional: false,
        });
    }
    if let Some(pointer) = pod_spec_pointer(group, kind)
        && let Some(spec) = obj.pointer(pointer)
    {
        pod_spec_references(&mut c, spec, &pointer_to_path(pointer));
        for key in APPLICATION_KEYS {
            let place = if key.starts_with("meta.helm.sh/") {
                "annotations"
            } else {
                "labels"
            };
            if let Some(value) = obj
                .pointer(&format!("/metadata/{place}"))
                .and_then(|m| m.get(*key))
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
            {
                c.out.push(Reference {
                    kind: EdgeKind::PartOf,
                    target: Target::CrdsLabelled {
                        key: key.to_string(),
                        value: value.into(),
                    },
                    path: format!("metadata.{place}.{key}"),
                    optional: true,
                });
            }
        }
    }

    match (group, kind) {
        ("apps", "StatefulSet") => {
            for (i, t) in array(obj, "/spec/volumeClaimTemplates") {
                c.object(
                    EdgeKind::Claims,
                    "storage.k8s.io",
                    "StorageClass",
                    false,
                    t.pointer("/spec/storageClassName").and_then(Value::as_str),
                    format!("spec.volumeClaimTemplates[{i}].spec.storageClassName"),
                    false,
                );
            }
        }
        ("", "PersistentVolumeClaim") => {
            c.object(
                EdgeKind::Claims,
                "storage.k8s.io",
                "StorageClass",
                false,
                obj.pointer("/spec/storageClassName")
                    .and_then(Value::as_str),
                "spec.storageClassName".into(),
                false,
            );
            c.object(
                EdgeKind::Claims,
                "",
                "PersistentVolume",
                false,
                obj.pointer("/spec/volumeName").and_then(Value::as_str),
                "spec.volumeName".into(),
                false,
            );
        }
        ("", "PersistentVolume") => {
            c.object(
                EdgeKind::Claims,
                "storage.k8s.io",
                "StorageClass",
                false,
                obj.pointer("/spec/storageClassName")
                    .and_then(Value::as_str),
                "spec.storageClassName".into(),
                false,
            );
            if let Some(claim) = obj.pointer("/spec/claimRef") {
                let mut claim_collector = Collector {
                    namespace: str_at(claim, "namespace"),
                    out: Vec::new(),
                };
                claim_collector.object(
                    EdgeKind::Claims,
                    "",
                    "PersistentVolumeClaim",
                    true,
                    str_at(claim, "name"),
                    "spec.claimRef".into(),
                    true,
                );
                c.out.extend(claim_collector.out);
            }
        }
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => {
            if let Some(role) = obj.get("roleRef") {
                let role_kind = str_at(role, "kind").unwrap_or("ClusterRole");
                c.object(
                    EdgeKind::Binds,
                    "rbac.authorization.k8s.io",
                    role_kind,
                    role_kind == "Role",
                    str_at(role, "name"),
                    "roleRef".into(),
                    false,
                );
            }
            for (i, subject) in array(obj, "/subjects") {
                if str_at(subject, "kind") == Some("ServiceAccount") {
                    let mut sub = Collector {
                        namespace: str_at(subject, "namespace").or(namespace),
                        out: Vec::new(),
                    };
                    sub.object(
                        EdgeKind::Binds,
                        "",
                        "ServiceAccount",
                        true,
                        str_at(subject, "name"),
                        format!("subjects[{i}]"),
                        true,
                    );
                    c.out.extend(sub.out);
                }
            }
        }
        ("rbac.authorization.k8s.io", "Role" | "ClusterRole") => {
            custom_resources_of_rules(
                array(obj, "/rules").map(|(i, r)| (format!("rules[{i}]"), r)),
                EdgeKind::Grants,
                &mut c.out,
            );
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if let Some(service) = obj.pointer("/spec/conversion/webhook/clientConfig/service") {
                let mut s = Collector {
                    namespace: str_at(service, "namespace"),
                    out: Vec::new(),
                };
                s.object(
                    EdgeKind::Serves,
                    "",
                    "Service",
                    true,
                    str_at(service, "name"),
                    "spec.conversion.webhook.clientConfig.service".into(),
                    false,
                );
                c.out.extend(s.out);
            }
        }
        ("", "Service") => {
            let selector = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(LabelSelector::from_match_labels);
            selector_reference(&mut c, EdgeKind::Selects, selector, "spec.selector");
        }
        ("policy", "PodDisruptionBudget") => {
            let selector = obj
                .pointer("/spec/selector")
                .and_then(LabelSelector::from_object);
            selector_reference(&mut c, EdgeKind::Selects, selector, "spec.selector");
        }
        ("networking.k8s.io", "NetworkPolicy") => {
            let selector = obj
                .pointer("/spec/podSelector")
                .and_then(LabelSelector::from_object);
            selector_reference(&mut c, EdgeKind::Selects, selector, "spec.podSelector");
        }
        ("autoscaling", "HorizontalPodAutoscaler") => {
            if let Some(target) = obj.pointer("/spec/scaleTargetRef") {
                let (g, _) = split_api_version(str_at(target, "apiVersion").unwrap_or_default());
                c.object(
                    EdgeKind::Selects,
                    g,
                    str_at(target, "kind").unwrap_or_default(),
                    true,
                    str_at(target, "name"),
                    "spec.scaleTargetRef".into(),
                    false,
                );
            }
        }
        ("networking.k8s.io" | "extensions", "Ingress") => {
            c.object(
                EdgeKind::Routes,
                "networking.k8s.io",
                "IngressClass",
                false,
                obj.pointer("/spec/ingressClassName")
                    .and_then(Value::as_str),
                "spec.ingressClassName".into(),
                false,
            );
            for (i, tls) in array(obj, "/spec/tls") {
                c.object(
                    EdgeKind::Routes,
                    "",
                    "Secret",
                    true,
                    str_at(tls, "secretName"),
                    format!("spec.tls[{i}].secretName"),
                    false,
                );
            }
            let mut backends: Vec<(String, &Value)> = Vec::new();
            for key in ["defaultBackend", "backend"] {
                if let Some(b) = obj.pointer(&format!("/spec/{key}")) {
                    backends.push((format!("spec.{key}"), b));
                }
            }
            for (i, rule) in array(obj, "/spec/rules") {
                for (j, path) in array(rule, "/http/paths") {
                    if let Some(b) = path.get("backend") {
                        backends.push((format!("spec.rules[{i}].http.paths[{j}].backend"), b));
                    }
                }
            }
            for (at, backend) in backends {
                let name = backend
                    .pointer("/service/name")
                    .and_then(Value::as_str)
                    .or_else(|| str_at(backend, "serviceName"));
                c.object(EdgeKind::Routes, "", "Service", true, name, at, false);
            }
        }
        (
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration",
        ) => {
            for (i, hook) in array(obj, "/webhooks") {
                if let Some(service) = hook.pointer("/clientConfig/service") {
                    let mut s = Collector {
                        namespace: str_at(service, "namespace"),
                        out: Vec::new(),
                    };
                    s.object(
                        EdgeKind::Serves,
                        "",
                        "Service",
                        true,
                        str_at(service, "name"),
                        format!("webhooks[{i}].clientConfig.service"),
                        false,
                    );
                    c.out.extend(s.out);
                }
                let rules: Vec<(String, &Value)> = array(hook, "/rules")
                    .map(|(j, r)| (format!("webhooks[{i}].rules[{j}]"), r))
                    .collect();
                custom_resources_of_rules(rules.into_iter(), EdgeKind::Serves, &mut c.out);
            }
        }
        ("apiregistration.k8s.io", "APIService") => {
            if let Some(service) = obj.pointer("/spec/service").filter(|s| !s.is_null()) {
                let mut s = Collector {
                    namespace: str_at(service, "namespace"),
                    out: Vec::new(),
                };
                s.object(
                    EdgeKind::Serves,
                    "",
                    "Service",
                    true,
                    str_at(service, "name"),
                    "spec.service".into(),
                    false,
                );
                c.out.extend(s.out);
            }
            if let Some(group) = obj
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .filter(|g| !is_builtin_group(g))
            {
                c.out.push(Reference {
                    kind: EdgeKind::Serves,
                    target: Target::CrdResources {
                        group: group.into(),
                        resource: "*".into(),
                    },
                    path: "spec.group".into(),
                    optional: true,
                });
            }
        }
        _ => {}
    }
    c.out
}

/// Pod labels of a workload's template, or of a Pod.
pub fn pod_template_labels(obj: &Value) -> Option<&serde_json::Map<String, Value>> {
    let (group, _) = split_api_version(
        obj.get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let pointer = match pod_spec_pointer(group, kind)? {
        "/spec" => "/metadata/labels",
        "/spec/template/spec" => "/spec/template/metadata/labels",
        _ => "/spec/jobTemplate/spec/template/metadata/labels",
    };
    obj.pointer(pointer).and_then(Value::as_object)
}

/// The group/kind of workloads a selector matches against.
pub fn selectable(group: &str, kind: &str) -> bool {
    pod_spec_pointer(group, kind).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn found(refs: &[Reference], kind: EdgeKind, target: &str) -> bool {
        refs.iter()
            .any(|r| r.kind == kind && r.target.to_string() == target)
    }

    #[test]
    fn pod_templates_yield_mounts_env_accounts_pull_secrets_and_classes() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "a"},
            "spec": {"template": {"spec": {
                "serviceAccountName": "web", "priorityClassName": "high", "runtimeClassName": "gvisor",
                "imagePullSecrets": [{"name": "pull"}],
                "volumes": [{"name": "c", "configMap": {"name": "cfg"}}, {"name": "s", "secret": {"secretName": "tls", "optional": true}},
                            {"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
                            {"name": "p", "projected": {"sources": [{"configMap": {"name": "proj-cm"}}, {"secret": {"name": "proj-s"}}]}}],
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "init-env"}}]}],
                "containers": [{"name": "w", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}},
                                                   {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "flags", "key": "f", "optional": true}}}],
                                "envFrom": [{"configMapRef": {"name": "env-cm"}}]}]}}}});
        let refs = references(&d);
        for (kind, target) in [
            (EdgeKind::Mounts, "ConfigMap/a/cfg"),
            (EdgeKind::Mounts, "Secret/a/tls"),
            (EdgeKind::Mounts, "PersistentVolumeClaim/a/data"),
            (EdgeKind::Mounts, "ConfigMap/a/proj-cm"),
            (EdgeKind::Mounts, "Secret/a/proj-s"),
            (EdgeKind::Env, "Secret/a/db"),
            (EdgeKind::Env, "ConfigMap/a/flags"),
            (EdgeKind::Env, "ConfigMap/a/env-cm"),
            (EdgeKind::Env, "Secret/a/init-env"),
            (EdgeKind::UsesServiceAccount, "ServiceAccount/a/web"),
            (EdgeKind::PullsWith, "Secret/a/pull"),
            (EdgeKind::ScheduledWith, "PriorityClass/high"),
            (EdgeKind::ScheduledWith, "RuntimeClass/gvisor"),
            (EdgeKind::InNamespace, "Namespace/a"),
        ] {
            assert!(found(&refs, kind, target), "{kind:?} {target} in {refs:#?}");
        }
        let optional = refs
            .iter()
            .find(|r| r.target.to_string() == "Secret/a/tls")
            .unwrap();
        assert!(optional.optional);
        assert_eq!(
            optional.path,
            "spec.template.spec.volumes[1].secret.secretName"
        );
    }

    #[test]
    fn cronjobs_reach_their_pod_template() {
        let cj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c", "namespace": "a"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "x", "envFrom": [{"secretRef": {"name": "creds"}}]}]}}}}}});
        assert!(found(&references(&cj), EdgeKind::Env, "Secret/a/creds"));
    }

    #[test]
    fn storage_references_chain_claims_volumes_and_classes() {
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "a"},
            "spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"storageClassName": "fast"}}]}});
        assert!(found(
            &references(&sts),
            EdgeKind::Claims,
            "StorageClass/fast"
        ));
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d", "namespace": "a"}, "spec": {"storageClassName": "fast", "volumeName": "pv-1"}});
        let refs = references(&pvc);
        assert!(
            found(&refs, EdgeKind::Claims, "StorageClass/fast")
                && found(&refs, EdgeKind::Claims, "PersistentVolume/pv-1")
        );
        let pv = json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-1"}, "spec": {"storageClassName": "fast", "claimRef": {"namespace": "a", "name": "d"}}});
        let refs = references(&pv);
        assert!(found(&refs, EdgeKind::Claims, "PersistentVolumeClaim/a/d"));
        assert!(
            !found(&refs, EdgeKind::InNamespace, "Namespace/a"),
            "cluster-scoped objects have no namespace edge"
        );
    }

    #[test]
    fn bindings_point_at_roles_and_service_account_subjects() {
        let rb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "web"}, {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"}, {"kind": "User", "name": "alice"}]});
        let refs = references(&rb);
        assert!(found(&refs, EdgeKind::Binds, "Role/a/reader"));
        assert!(found(&refs, EdgeKind::Binds, "ServiceAccount/a/web"));
        assert!(found(&refs, EdgeKind::Binds, "ServiceAccount/tools/ci"));
        let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "b"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}, "subjects": []});
        assert!(found(
            &references(&crb),
            EdgeKind::Binds,
            "ClusterRole/view"
        ));
    }

    #[test]
    fn services_policies_and_autoscalers_select_workloads() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"}, "spec": {"selector": {"app": "web"}}});
        let refs = references(&svc);
        assert!(refs.iter().any(|r| r.kind == EdgeKind::Selects
            && matches!(&r.target, Target::Selector { namespace, .. } if namespace == "a")));
        let no_selector = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "a"}, "spec": {"type": "ExternalName"}});
        assert!(
            !references(&no_selector)
                .iter()
                .any(|r| r.kind == EdgeKind::Selects)
        );
        let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h", "namespace": "a"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}});
        assert!(found(
            &references(&hpa),
            EdgeKind::Selects,
            "Deployment/a/web"
        ));
        let pdb = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "p", "namespace": "a"}, "spec": {"selector": {"matchLabels": {"app": "web"}}}});
        assert!(references(&pdb).iter().any(|r| r.kind == EdgeKind::Selects));
    }

    #[test]
    fn ingresses_route_to_services_secrets_and_classes_in_both_schemas() {
        let v1 = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i", "namespace": "a"},
            "spec": {"ingressClassName": "nginx", "tls": [{"secretName": "tls"}], "defaultBackend": {"service": {"name": "fallback"}},
                     "rules": [{"http": {"paths": [{"backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}});
        let refs = references(&v1);
        for t in [
            "IngressClass/nginx",
            "Secret/a/tls",
            "Service/a/fallback",
            "Service/a/web",
        ] {
            assert!(found(&refs, EdgeKind::Routes, t), "{t}");
        }
        let beta = json!({"apiVersion": "extensions/v1beta1", "kind": "Ingress", "metadata": {"name": "i", "namespace": "a"},
            "spec": {"rules": [{"http": {"paths": [{"backend": {"serviceName": "old", "servicePort": 80}}]}}]}});
        assert!(found(&references(&beta), EdgeKind::Routes, "Service/a/old"));
    }

    #[test]
    fn custom_resources_need_their_crd_and_owned_objects_their_owner() {
        let cr = json!({"apiVersion": "demo.ferry.dev/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "a",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}]}});
        let refs = references(&cr);
        assert!(refs.iter().any(|r| r.kind == EdgeKind::InstanceOf
            && r.target
                == Target::Crd {
                    group: "demo.ferry.dev".into(),
                    kind: "Widget".into()
                }));
        assert!(found(&refs, EdgeKind::Owns, "Deployment/a/web"));
        let builtin = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n", "namespace": "a"}, "spec": {}});
        assert!(
            !references(&builtin)
                .iter()
                .any(|r| r.kind == EdgeKind::InstanceOf)
        );
        assert!(
            is_builtin_group("apps")
                && is_builtin_group("")
                && is_builtin_group("rbac.authorization.k8s.io")
        );
        assert!(
            !is_builtin_group("cert-manager.io")
                && !is_builtin_group("gateway.networking.x-k8s.io")
        );
    }

    #[test]
    fn roles_webhooks_and_labelled_workloads_point_at_the_crds_they_need() {
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "op"},
        "rules": [
            {"apiGroups": ["demo.io"], "resources": ["widgets", "widgets/status", "*"], "verbs": ["get", "list"]},
            {"apiGroups": ["", "apps", "*"], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": ["other.io"], "resources": ["gadgets"], "verbs": []},
        ]});
        let targets: Vec<String> = references(&role)
            .iter()
            .filter(|r| r.kind == EdgeKind::Grants)
            .map(|r| format!("{} {}", r.target, r.path))
            .collect();
        assert_eq!(
            targets,
            vec![
                "the CRDs of widgets.demo.io rules[0]",
                "the CRDs of *.demo.io rules[0]"
            ],
            "subresources fold into their resource; built-in groups, `*` groups and rules without verbs name no CRD"
        );
        assert!(references(&role).iter().all(|r| r.optional));

        let hook = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "v"},
            "webhooks": [{"name": "x", "clientConfig": {"service": {"name": "hook", "namespace": "op"}},
                          "rules": [{"apiGroups": ["demo.io"], "resources": ["gizmos"], "operations": ["CREATE"]}]}]});
        assert!(found(
            &references(&hook),
            EdgeKind::Serves,
            "the CRDs of gizmos.demo.io"
        ));

        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "op", "namespace": "op", "labels": {"app.kubernetes.io/part-of": "demo"},
                         "annotations": {"meta.helm.sh/release-name": "demo-release"}},
            "spec": {"template": {"spec": {"containers": []}}}});
        let refs = references(&deployment);
        assert!(found(
            &refs,
            EdgeKind::PartOf,
            "the CRDs with app.kubernetes.io/part-of=demo"
        ));
        assert!(found(
            &refs,
            EdgeKind::PartOf,
            "the CRDs with meta.helm.sh/release-name=demo-release"
        ));

        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "gizmos.demo.io", "labels": {"app.kubernetes.io/part-of": "demo"},
                         "annotations": {"meta.helm.sh/release-name": "demo-release"}},
            "spec": {"group": "demo.io", "names": {"kind": "Gizmo", "plural": "gizmos"},
                     "conversion": {"strategy": "Webhook", "webhook": {"clientConfig": {"service": {"name": "hook", "namespace": "op"}}}}}});
        let pattern = |group: &str, resource: &str| Target::CrdResources {
            group: group.into(),
            resource: resource.into(),
        };
        assert!(pattern("demo.io", "gizmos").matches_crd(&crd));
        assert!(pattern("demo.io", "*").matches_crd(&crd));
        assert!(!pattern("demo.io", "widgets").matches_crd(&crd));
        assert!(!pattern("other.io", "gizmos").matches_crd(&crd));
        let labelled = |key: &str, value: &str| Target::CrdsLabelled {
            key: key.into(),
            value: value.into(),
        };
        assert!(labelled("app.kubernetes.io/part-of", "demo").matches_crd(&crd));
        assert!(labelled("meta.helm.sh/release-name", "demo-release").matches_crd(&crd));
        assert!(!labelled("app.kubernetes.io/instance", "demo").matches_crd(&crd));
        assert!(found(
            &references(&crd),
            EdgeKind::Serves,
            "Service/op/hook"
        ));
    }

    #[test]
    fn webhooks_and_api_services_serve_through_services() {
        let hook = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "v"},
            "webhooks": [{"name": "x", "clientConfig": {"service": {"name": "hook", "namespace": "sys"}}}]});
        assert!(found(
            &references(&hook),
            EdgeKind::Serves,
            "Service/sys/hook"
        ));
        let api = json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1beta1.metrics.k8s.io"},
            "spec": {"service": {"name": "metrics-server", "namespace": "kube-system"}}});
        assert!(found(
            &references(&api),
            EdgeKind::Serves,
            "Service/kube-system/metrics-server"
        ));
    }
}
