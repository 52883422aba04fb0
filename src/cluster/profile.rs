//! Reads a [`ClusterProfile`] from a live cluster. Parts the caller may not
//! read (a namespace-bound user cannot list nodes or storage classes) are
//! named in `incomplete` instead of failing the whole profile.

use std::collections::BTreeSet;

use serde_json::Value;

use super::discovery::Discovery;
use super::{ClusterError, Connection};
use crate::profile::{
    ClusterProfile, IngressClassInfo, StorageClassInfo, guess_distribution, parse_minor,
};

const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const REGION_LABELS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];
const DEFAULT_CLASS_ANNOTATIONS: [&str; 2] = [
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];

pub async fn read_profile(
    conn: &Connection,
    discovery: &Discovery,
) -> Result<ClusterProfile, ClusterError> {
    let mut profile = ClusterProfile {
        version: conn.version.git_version.clone(),
        major: conn
            .version
            .major
            .trim_end_matches('+')
            .parse()
            .unwrap_or(1),
        minor: parse_minor(&conn.version.minor, &conn.version.git_version),
        served_group_versions: discovery.group_versions.iter().cloned().collect(),
        served_kinds: discovery.served_kinds.clone(),
        ..Default::default()
    };
    for (gv, why) in &discovery.failures {
        profile.incomplete.push(format!("discovery of {gv}: {why}"));
    }

    let mut node_label_keys = BTreeSet::new();
    match list_all(conn, discovery, "", "Node").await {
        Ok(nodes) => {
            for node in nodes {
                if let Some(labels) = node.pointer("/metadata/labels").and_then(Value::as_object) {
                    for (k, v) in labels {
                        node_label_keys.insert(k.clone());
                        let v = v.as_str().unwrap_or_default().to_string();
                        if ZONE_LABELS.contains(&k.as_str()) {
                            profile.zones.insert(v);
                        } else if REGION_LABELS.contains(&k.as_str()) {
                            profile.regions.insert(v);
                        }
                    }
                }
            }
        }
        Err(why) => profile.incomplete.push(format!("nodes: {why}")),
    }
    profile.distribution = guess_distribution(&profile.version, &node_label_keys);

    match list_all(conn, discovery, "storage.k8s.io", "StorageClass").await {
        Ok(items) => {
            for sc in items {
                profile.storage_classes.push(StorageClassInfo {
                    name: str_at(&sc, "/metadata/name"),
                    provisioner: str_at(&sc, "/provisioner"),
                    default: DEFAULT_CLASS_ANNOTATIONS
                        .iter()
                        .any(|a| annotation(&sc, a) == Some("true")),
                    volume_binding_mode: sc
                        .get("volumeBindingMode")
                        .and_then(Value::as_str)
                        .map(String::from),
                    allow_volume_expansion: sc.get("allowVolumeExpansion").and_then(Value::as_bool),
                });
            }
        }
        Err(why) => profile.incomplete.push(format!("storage classes: {why}")),
    }
    match list_all(conn, discovery, "networking.k8s.io", "IngressClass").await {
        Ok(items) => {
            for ic in items {
                profile.ingress_classes.push(IngressClassInfo {
                    name: str_at(&ic, "/metadata/name"),
                    controller: str_at(&ic, "/spec/controller"),
                    default: annotation(&ic, "ingressclass.kubernetes.io/is-default-class")
                        == Some("true"),
                });
            }
        }
        Err(why) => profile.incomplete.push(format!("ingress classes: {why}")),
    }
    match list_all(conn, discovery, "scheduling.k8s.io", "PriorityClass").await {
        Ok(items) => {
            profile.priority_classes = items.iter().map(|o| str_at(o, "/metadata/name")).collect()
        }
        Err(why) => profile.incomplete.push(format!("priority classes: {why}")),
    }
    match list_all(conn, discovery, "node.k8s.io", "RuntimeClass").await {
        Ok(items) => {
            profile.runtime_classes = items.iter().map(|o| str_at(o, "/metadata/name")).collect()
        }
        Err(why) => profile.incomplete.push(format!("runtime classes: {why}")),
    }
    profile.storage_classes.sort_by(|a, b| a.name.cmp(&b.name));
    profile.ingress_classes.sort_by(|a, b| a.name.cmp(&b.name));
    profile.priority_classes.sort();
    profile.runtime_classes.sort();
    Ok(profile)
}

fn str_at(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

/// Lists every object of a small cluster-scoped kind, or says why it could not.
async fn list_all(
    conn: &Connection,
    discovery: &Discovery,
    group: &str,
    kind: &str,
) -> Result<Vec<Value>, String> {
    let Some(resource) = discovery.by_group_kind(group, kind) else {
        return Ok(Vec::new());
    };
    super::capture::list_collection(&conn.client, resource, None, None, 500)
        .await
        .map_err(|e| super::connect::error_chain(&e))
}
