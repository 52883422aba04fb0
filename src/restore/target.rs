//! The target as planning sees it: which namespaces it lacks, the live
//! objects a restore would overwrite, and whether the caller may write what
//! the plan writes (SelfSubjectAccessReview). Reads only.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::Value;

use super::bodies::Desired;
use super::plan::Live;
use super::{ExistingPolicy, RestoreError};
use crate::cluster::capture::get_object;
use crate::cluster::discovery::{Discovery, ServedResource};
use crate::cluster::{ClusterError, Connection, status_code};
use crate::model::ObjectRef;

/// The target's resource for an object at the object's own version.
pub fn resource_for(discovery: &Discovery, object: &ObjectRef) -> Option<ServedResource> {
    discovery
        .by_group_kind(&object.group, &object.kind)
        .map(|r| ServedResource {
            version: object.version.clone(),
            ..r.clone()
        })
}

/// The live object, `None` when absent (or unreadable: forbidden reads are
/// reported by the permission check).
pub async fn live(
    conn: &Connection,
    discovery: &Discovery,
    object: &ObjectRef,
) -> Result<Option<Value>, RestoreError> {
    let Some(r) = resource_for(discovery, object) else {
        return Ok(None);
    };
    match get_object(&conn.client, &r, object.namespace.as_deref(), &object.name).await {
        Ok(v) => Ok(v),
        Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The permissions a restore needs for each object given what the target
/// holds of it: get (a forbidden read looks like an absent object), create
/// when absent, patch when it differs, delete to recreate. An identical
/// object needs only get. `plural_of` names the resource of kinds the
/// target does not serve yet (their CRD is in the restore).
///
/// A Namespace is authorized in itself, as the API server does it: a user
/// who may get or patch namespaces in `team-a` may get or patch Namespace
/// `team-a`; creating one is cluster-wide.
pub fn needed_permissions(
    objects: &[(ObjectRef, &Live)],
    discovery: &Discovery,
    plural_of: impl Fn(&str, &str) -> Option<String>,
    existing: ExistingPolicy,
) -> BTreeSet<(String, String, String, Option<String>)> {
    let mut needed = BTreeSet::new();
    for (o, live) in objects {
        let plural = resource_for(discovery, o)
            .map(|r| r.plural)
            .or_else(|| plural_of(&o.group, &o.kind));
        let Some(plural) = plural else { continue };
        let mut verbs = vec!["get"];
        match live {
            Live::Absent => verbs.push("create"),
            Live::Present { changes, .. } => match existing {
                ExistingPolicy::Skip | ExistingPolicy::Fail => {}
                ExistingPolicy::Update if changes.is_empty() => {}
                ExistingPolicy::Update => verbs.push("patch"),
                ExistingPolicy::Recreate => verbs.extend(["delete", "create", "patch"]),
            },
            Live::Unknown => {
                verbs.extend(["create", "patch"]);
                if existing == ExistingPolicy::Recreate {
                    verbs.push("delete");
                }
            }
        }
        let is_namespace = o.group.is_empty() && o.kind == "Namespace";
        for verb in verbs {
            let namespace = if is_namespace && verb != "create" {
                Some(o.name.clone())
            } else {
                o.namespace.clone()
            };
            needed.insert((verb.to_string(), o.group.clone(), plural.clone(), namespace));
        }
    }
    needed
}

/// Whether the caller may `verb` the resource in `namespace` (`None`: in
/// every namespace, or cluster-wide for cluster-scoped resources).
async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> Result<bool, kube::Error> {
    let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace}}
    }))
    .expect("static review");
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = api.create(&PostParams::default(), &review).await?;
    Ok(review.status.is_some_and(|s| s.allowed))
}

/// The permissions in `needed` (verb, group, resource, namespace) that the
/// caller lacks, as problems. A grant in every namespace covers each one:
/// each verb and resource is asked once without a namespace, and per
/// namespace only where that is denied, so that restoring thousands of
/// namespaces costs a few reviews, not thousands.
pub async fn denied(
    conn: &Connection,
    needed: BTreeSet<(String, String, String, Option<String>)>,
) -> Vec<String> {
    const AT_ONCE: usize = 16;
    let mut by_resource: BTreeMap<(String, String, String), Vec<Option<String>>> = BTreeMap::new();
    for (verb, group, resource, namespace) in needed {
        by_resource
            .entry((verb, group, resource))
            .or_default()
            .push(namespace);
    }
    let describe = |group: &str, resource: &str, namespace: Option<&str>| {
        let what = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        let scope = namespace.map_or_else(
            || " (cluster-wide)".to_string(),
            |n| format!(" in namespace {n}"),
        );
        (what, scope)
    };
    let everywhere: Vec<_> = futures::stream::iter(by_resource)
        .map(|((verb, group, resource), namespaces)| async move {
            let result = allowed(&conn.client, &verb, &group, &resource, None).await;
            (verb, group, resource, namespaces, result)
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut problems = Vec::new();
    let mut per_namespace = Vec::new();
    for (verb, group, resource, namespaces, result) in everywhere {
        match result {
            Ok(true) => {}
            Ok(false) => {
                for namespace in namespaces {
                    match namespace {
                        Some(ns) => {
                            per_namespace.push((verb.clone(), group.clone(), resource.clone(), ns))
                        }
                        None => {
                            let (what, scope) = describe(&group, &resource, None);
                            problems.push(format!("not allowed to {verb} {what}{scope}"));
                        }
                    }
                }
            }
            Err(e) => {
                let (what, _) = describe(&group, &resource, None);
                problems.push(format!("cannot check permission to {verb} {what}: {e}"));
            }
        }
    }
    let answers: Vec<Option<String>> = futures::stream::iter(per_namespace)
        .map(|(verb, group, resource, ns)| async move {
            let (what, scope) = describe(&group, &resource, Some(&ns));
            match allowed(&conn.client, &verb, &group, &resource, Some(&ns)).await {
                Ok(true) => None,
                Ok(false) => Some(format!("not allowed to {verb} {what}{scope}")),
                Err(e) => Some(format!(
                    "cannot check permission to {verb} {what}{scope}: {e}"
                )),
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    problems.extend(answers.into_iter().flatten());
    problems.sort();
    problems
}

/// Namespaces of the restore that the target does not have. A namespace
/// that does not exist holds no objects (it is removed only once it is
/// empty), so restoring into new namespaces needs one GET per namespace
/// instead of one per object. Namespaces that cannot be read count as
/// present, so that their objects are still looked up one by one.
pub async fn absent_namespaces(
    conn: &Connection,
    discovery: &Discovery,
    objects: &[Desired],
) -> Result<BTreeSet<String>, RestoreError> {
    let Some(resource) = discovery.by_group_kind("", "Namespace") else {
        return Ok(BTreeSet::new());
    };
    let namespaces: BTreeSet<&str> = objects
        .iter()
        .filter_map(|d| d.object.namespace.as_deref())
        .collect();
    let found: Vec<(&str, Result<Option<Value>, ClusterError>)> = futures::stream::iter(namespaces)
        .map(|ns| async move { (ns, get_object(&conn.client, resource, None, ns).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut absent = BTreeSet::new();
    for (ns, result) in found {
        match result {
            Ok(None) => {
                absent.insert(ns.to_string());
            }
            Ok(Some(_)) => {}
            Err(ClusterError::Get { source, .. }) if status_code(&source) == Some(403) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(absent)
}

/// Why recreating these claims cannot work now: a claim a Pod mounts is
/// only marked for deletion (`kubernetes.io/pvc-protection`) and goes when
/// that Pod does, so the restore would wait and then fail, leaving the
/// claim to vanish, with its data, whenever the workload stops. Pods that
/// cannot be listed are not counted (the delete is then tried as planned).
pub async fn claims_in_use<'a>(
    conn: &Connection,
    claims: impl Iterator<Item = &'a ObjectRef>,
) -> Vec<String> {
    let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for claim in claims {
        if let Some(ns) = claim.namespace.as_deref() {
            by_namespace.entry(ns).or_default().push(&claim.name);
        }
    }
    let mut problems = Vec::new();
    for (namespace, names) in by_namespace {
        let pods: Api<Pod> = Api::namespaced(conn.client.clone(), namespace);
        let Ok(pods) = pods.list(&Default::default()).await else {
            continue;
        };
        for name in names {
            let users: Vec<&str> = crate::mover::holders(&pods.items, name).collect();
            if !users.is_empty() {
                problems.push(format!(
                    "PersistentVolumeClaim/{namespace}/{name} is in use by Pod {}: --existing recreate \
                     cannot delete it while it is mounted (kubernetes.io/pvc-protection); scale the \
                     workload down first, or restore into another namespace with --namespace-mapping",
                    users.join(", ")
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::discovery::ServedResource;
    use crate::restore::diff::Change;

    fn served(group: &str, kind: &str, plural: &str, namespaced: bool) -> ServedResource {
        ServedResource {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            verbs: vec!["get".into(), "create".into(), "patch".into()],
        }
    }

    fn object(kind: &str, namespace: Option<&str>, name: &str) -> ObjectRef {
        ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: kind.into(),
            namespace: namespace.map(String::from),
            name: name.into(),
        }
    }

    #[test]
    fn permissions_follow_what_each_object_needs_and_a_namespace_is_its_own_scope() {
        let discovery = Discovery {
            resources: vec![
                served("", "ConfigMap", "configmaps", true),
                served("", "Namespace", "namespaces", false),
            ],
            ..Default::default()
        };
        let present = |changes: Vec<Change>| Live::Present {
            resource_version: "1".into(),
            changes,
        };
        let same = present(Vec::new());
        let differs = present(vec![Change {
            path: "/data/a".into(),
            live: None,
            desired: serde_json::json!("b"),
        }]);
        let absent = Live::Absent;
        let objects = vec![
            (object("Namespace", None, "team-a"), &same),
            (object("ConfigMap", Some("team-a"), "same"), &same),
            (object("ConfigMap", Some("team-a"), "changed"), &differs),
            (object("ConfigMap", Some("team-b"), "new"), &absent),
        ];
        let needed = needed_permissions(&objects, &discovery, |_, _| None, ExistingPolicy::Update);
        let expect = |verb: &str, resource: &str, ns: &str| {
            (
                verb.to_string(),
                String::new(),
                resource.to_string(),
                Some(ns.to_string()),
            )
        };
        let wanted: BTreeSet<_> = [
            // The unchanged Namespace: read in its own scope, never created.
            expect("get", "namespaces", "team-a"),
            expect("get", "configmaps", "team-a"),
            expect("patch", "configmaps", "team-a"),
            expect("get", "configmaps", "team-b"),
            expect("create", "configmaps", "team-b"),
        ]
        .into();
        assert_eq!(needed, wanted);
    }
}
