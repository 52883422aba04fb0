//! load: a snapshot's catalog and stored graph, the selection made on them,
//! and the dependency closure, before any object body is read (bodies are
//! read here only to match labels).
//!
//! A restore of a subset (some namespaces, kinds, labels or objects) writes
//! the selected objects plus exactly the cluster-scoped objects they depend
//! on through the stored graph (their Namespaces, the ClusterRoles their
//! bindings grant, the CRDs of their custom resources, the classes they
//! use…), and nothing else: not the other Namespaces, ClusterRoles or CRDs
//! a snapshot of a whole cluster holds. A restore that narrows nothing
//! writes the whole snapshot.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::RestoreError;
use crate::backup::{CatalogEntry, SnapshotContent, load_catalog, load_content};
use crate::model::ObjectRef;
use crate::model::edges::EdgeKind;
use crate::model::graph::AppGraph;
use crate::model::select::Selection;
use crate::profile::ClusterProfile;
use crate::repo::Repository;

/// What a restore takes from its snapshot: kept in the plan, so that a
/// saved plan selects the same objects when it is applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub selection: Selection,
    /// Single objects (`Kind/namespace/name` or `Kind/name`); empty = all selected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
    /// Restore no cluster-scoped object but the selected Namespaces: what
    /// the objects need of the cluster (a StorageClass, a ClusterRole)
    /// must already be there, which validation checks. A namespace user's
    /// restore is of this kind: the cluster is not theirs to write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub namespaced_only: bool,
}

impl Subset {
    /// Whether anything narrows the restore below the whole snapshot.
    pub fn narrows(&self) -> bool {
        let s = &self.selection;
        !s.all_namespaces
            || s.selector.is_some()
            || s.application.is_some()
            || !s.include_kinds.is_empty()
            || !s.exclude_kinds.is_empty()
            || !s.exclude_namespaces.is_empty()
            || !self.objects.is_empty()
    }

    fn named(&self, object: &ObjectRef) -> bool {
        let name = object.to_string().to_ascii_lowercase();
        self.objects.iter().any(|o| o.to_ascii_lowercase() == name)
    }

    fn needs_labels(&self) -> bool {
        self.selection.selector.is_some() || self.selection.application.is_some()
    }

    /// Whether the object is selected for its own sake (before the closure);
    /// `labels_match` answers for selectors, when there is one.
    fn seed(&self, object: &ObjectRef, labels_match: impl Fn() -> bool) -> bool {
        let s = &self.selection;
        if !self.objects.is_empty() {
            return self.named(object);
        }
        if !s.kind_selected(&object.group, &object.kind, "") {
            return false;
        }
        let in_scope = match (&object.namespace, object.kind.as_str()) {
            (Some(ns), _) => s.namespace_selected(ns),
            (None, "Namespace") if object.group.is_empty() => s.namespace_selected(&object.name),
            // Other cluster-scoped objects are chosen for their own sake
            // only when no namespace narrows the restore.
            (None, _) => s.all_namespaces,
        };
        in_scope && (!self.needs_labels() || labels_match())
    }
}

/// A snapshot as the restore sees it.
pub struct Loaded {
    pub snapshot_id: String,
    pub snapshot_name: String,
    /// The profile of the cluster the snapshot was taken from.
    pub source_profile: ClusterProfile,
    /// The selected objects and their closure, sorted by object.
    pub entries: Vec<CatalogEntry>,
    /// Those of `entries` taken only because selected objects need them.
    pub dependencies: BTreeSet<ObjectRef>,
}

/// Reads the snapshot's catalog (and its graph, for a subset) and selects.
/// The caller holds a shared lock on the repository.
pub async fn load(
    repo: &Repository,
    snapshot: &str,
    subset: &Subset,
) -> Result<Loaded, RestoreError> {
    let (id, snap) = repo.find_snapshot(snapshot).await?;
    let narrows = subset.narrows();
    let content = if narrows {
        load_content(repo, &snap).await?
    } else {
        load_catalog(repo, &snap).await?
    };
    let labelled = if subset.needs_labels() {
        Some(labelled(repo, &content, subset).await?)
    } else {
        None
    };
    let graph = if narrows {
        Some(
            AppGraph::from_json(&content.graph).map_err(|e| RestoreError::BadObject {
                object: format!("graph of snapshot {}", snap.name),
                message: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let SnapshotContent {
        objects, profile, ..
    } = content;
    let Selected {
        entries,
        dependencies,
    } = select(objects, graph.as_ref(), subset, labelled.as_ref());
    if entries.is_empty() {
        return Err(RestoreError::NothingSelected(snap.name));
    }
    Ok(Loaded {
        snapshot_id: id.0,
        snapshot_name: snap.name,
        source_profile: profile,
        entries,
        dependencies,
    })
}

/// The objects whose labels (or application membership) the selection
/// accepts, among those it could select otherwise: their bodies are read
/// in pack order, a bounded number at a time, and dropped.
async fn labelled(
    repo: &Repository,
    content: &SnapshotContent,
    subset: &Subset,
) -> Result<HashSet<ObjectRef>, RestoreError> {
    let mut candidates: Vec<&CatalogEntry> = content
        .objects
        .iter()
        .filter(|e| subset.seed(&e.object, || true))
        .collect();
    candidates.sort_by_key(|e| repo.blob_position(&e.blob));
    let mut out = HashSet::new();
    super::bodies::for_each_stored(repo, candidates, |entry, value| {
        if subset.selection.object_selected(&value) {
            out.insert(entry.object.clone());
        }
    })
    .await?;
    Ok(out)
}

/// What a subset takes from a snapshot.
#[derive(Debug, Default)]
pub struct Selected {
    /// The selected objects and their closure, sorted by object.
    pub entries: Vec<CatalogEntry>,
    /// Those of `entries` the subset did not select for their own sake
    /// (a Namespace, CRD or ClusterRole that selected objects need): a
    /// restore may create them, never delete them.
    pub dependencies: BTreeSet<ObjectRef>,
}

/// Pure selection: the seeds, then what they depend on through the graph,
/// cluster-scoped objects only (a subset never writes into namespaces it
/// did not select). Without a graph (nothing narrows) every entry is kept.
pub fn select(
    entries: Vec<CatalogEntry>,
    graph: Option<&AppGraph>,
    subset: &Subset,
    labelled: Option<&HashSet<ObjectRef>>,
) -> Selected {
    let namespace_or_namespaced =
        |o: &ObjectRef| o.namespace.is_some() || (o.kind == "Namespace" && o.group.is_empty());
    let Some(graph) = graph else {
        let mut all = entries;
        if subset.namespaced_only {
            all.retain(|e| namespace_or_namespaced(&e.object));
        }
        all.sort_by(|a, b| a.object.cmp(&b.object));
        return Selected {
            entries: all,
            dependencies: BTreeSet::new(),
        };
    };
    let seeds: Vec<ObjectRef> = entries
        .iter()
        .filter(|e| {
            subset.seed(&e.object, || {
                labelled.is_some_and(|l| l.contains(&e.object))
            })
        })
        .map(|e| e.object.clone())
        .collect();
    let excluded = |o: &ObjectRef| subset.selection.kind_excluded(&o.group, &o.kind, "");
    let mut wanted: BTreeSet<ObjectRef> = graph.closure_where(&seeds, |edge, target| {
        !subset.namespaced_only
            && edge.kind != EdgeKind::Selects
            && target.namespace.is_none()
            && !excluded(target)
    });
    if subset.namespaced_only {
        wanted.retain(namespace_or_namespaced);
    }
    // The Namespace of every selected object, also where a graph lacks the edge.
    let namespaces: BTreeSet<String> = wanted.iter().filter_map(|o| o.namespace.clone()).collect();
    let mut out: Vec<CatalogEntry> = entries
        .into_iter()
        .filter(|e| {
            wanted.remove(&e.object)
                || (e.object.kind == "Namespace"
                    && e.object.group.is_empty()
                    && namespaces.contains(&e.object.name)
                    && !excluded(&e.object))
        })
        .collect();
    out.sort_by(|a, b| a.object.cmp(&b.object));
    let seeds: HashSet<&ObjectRef> = seeds.iter().collect();
    let dependencies = out
        .iter()
        .filter(|e| !seeds.contains(&e.object))
        .map(|e| e.object.clone())
        .collect();
    Selected {
        entries: out,
        dependencies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::select::LabelSelector;
    use serde_json::json;

    /// A snapshot of two namespaces and the cluster-scoped objects of both.
    fn estate() -> (Vec<CatalogEntry>, AppGraph) {
        let objects = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "reader-a"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "reader-b"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "everyone"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader-b"}}),
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.example.com"},
                   "spec": {"group": "example.com", "names": {"kind": "Widget", "plural": "widgets"}, "scope": "Namespaced",
                            "versions": [{"name": "v1", "served": true, "storage": true}]}}),
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "gadgets.example.com"},
                   "spec": {"group": "example.com", "names": {"kind": "Gadget", "plural": "gadgets"}, "scope": "Namespaced",
                            "versions": [{"name": "v1", "served": true, "storage": true}]}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "read", "namespace": "team-a"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader-a"}}),
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "team-a", "labels": {"tier": "front"}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team-a"}}),
            json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g", "namespace": "team-b"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team-b"}}),
        ];
        let mut graph = AppGraph::new();
        let mut entries = Vec::new();
        for value in &objects {
            let object = ObjectRef::from_object(value).expect("object");
            graph.add_object_value(object.clone(), value, None);
            graph.add_references(&object, crate::model::edges::references(value));
            entries.push(CatalogEntry {
                object,
                blob: crate::repo::BlobId([0; 32]),
                size: 0,
            });
        }
        graph.resolve();
        (entries, graph)
    }

    fn names(selected: &[CatalogEntry]) -> Vec<String> {
        let mut names: Vec<String> = selected.iter().map(|e| e.object.to_string()).collect();
        names.sort();
        names
    }

    fn subset(namespaces: &[&str]) -> Subset {
        Subset {
            selection: Selection {
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                all_namespaces: namespaces.is_empty(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_namespace_subset_takes_only_the_cluster_objects_it_depends_on() {
        let (entries, graph) = estate();
        let s = subset(&["team-a"]);
        assert!(s.narrows());
        let got = names(&select(entries, Some(&graph), &s, None).entries);
        assert_eq!(
            got,
            vec![
                "ClusterRole/reader-a",
                "ConfigMap/team-a/c",
                "CustomResourceDefinition/widgets.example.com",
                "Namespace/team-a",
                "RoleBinding/team-a/read",
                "Widget/team-a/w",
            ]
        );
    }

    #[test]
    fn a_namespaced_only_subset_leaves_the_cluster_objects_it_depends_on() {
        let (entries, graph) = estate();
        let mut s = subset(&["team-a"]);
        s.namespaced_only = true;
        let got = names(&select(entries.clone(), Some(&graph), &s, None).entries);
        assert_eq!(
            got,
            vec![
                "ConfigMap/team-a/c",
                "Namespace/team-a",
                "RoleBinding/team-a/read",
                "Widget/team-a/w",
            ]
        );
        // Without a graph too.
        let mut everything = subset(&[]);
        everything.namespaced_only = true;
        let got = names(&select(entries, None, &everything, None).entries);
        assert!(
            got.iter()
                .all(|o| !o.starts_with("Cluster") && !o.starts_with("CustomResource")),
            "{got:?}"
        );
    }

    #[test]
    fn restoring_everything_takes_every_object() {
        let (entries, _) = estate();
        let s = subset(&[]);
        assert!(!s.narrows());
        assert_eq!(
            select(entries.clone(), None, &s, None).entries.len(),
            entries.len()
        );
    }

    #[test]
    fn a_label_subset_takes_the_matching_objects_and_their_dependencies() {
        let (entries, graph) = estate();
        let mut s = subset(&[]);
        s.selection.selector = Some(LabelSelector::parse("tier=front").expect("selector"));
        let labelled: HashSet<ObjectRef> = entries
            .iter()
            .filter(|e| e.object.kind == "Widget")
            .map(|e| e.object.clone())
            .collect();
        let got = names(&select(entries, Some(&graph), &s, Some(&labelled)).entries);
        assert_eq!(
            got,
            vec![
                "CustomResourceDefinition/widgets.example.com",
                "Namespace/team-a",
                "Widget/team-a/w",
            ]
        );
    }

    #[test]
    fn a_single_object_comes_with_its_namespace_only() {
        let (entries, graph) = estate();
        let mut s = subset(&[]);
        s.objects = vec!["configmap/team-b/c".into()];
        let got = names(&select(entries, Some(&graph), &s, None).entries);
        assert_eq!(got, vec!["ConfigMap/team-b/c", "Namespace/team-b"]);
    }

    #[test]
    fn what_a_subset_only_needs_is_told_apart_from_what_it_selects() {
        let (entries, graph) = estate();
        let dependencies = |s: &Subset| -> Vec<String> {
            let mut names: Vec<String> = select(entries.clone(), Some(&graph), s, None)
                .dependencies
                .iter()
                .map(ToString::to_string)
                .collect();
            names.sort();
            names
        };
        // A namespace is selected for its own sake; what it needs is not.
        assert_eq!(
            dependencies(&subset(&["team-a"])),
            vec![
                "ClusterRole/reader-a",
                "CustomResourceDefinition/widgets.example.com"
            ]
        );
        // One kind of a namespace: the Namespace only comes with it.
        let mut kinds = subset(&["team-a"]);
        kinds.selection.include_kinds = vec!["widgets".into()];
        assert_eq!(
            dependencies(&kinds),
            vec![
                "CustomResourceDefinition/widgets.example.com",
                "Namespace/team-a"
            ]
        );
        let mut one = subset(&[]);
        one.objects = vec!["configmap/team-b/c".into()];
        assert_eq!(dependencies(&one), vec!["Namespace/team-b"]);
        // Restoring everything selects everything.
        assert!(
            select(entries.clone(), None, &subset(&[]), None)
                .dependencies
                .is_empty()
        );
    }
}
