//! The application graph: objects as nodes, typed references as edges
//! (petgraph). References are added as they are found and resolved once
//! every object is known; references to objects that are not in the graph
//! are reported as dangling, unless the cluster provides them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::edges::{EdgeKind, Reference, Target, pod_template_labels, selectable};
use super::object::{ModelError, ObjectRef};

/// A node: the object's identity plus what resolving references needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    #[serde(flatten)]
    pub object: ObjectRef,
    /// Id of the stored object in the repository, when stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    #[serde(skip)]
    labels: Map<String, Value>,
    /// Pod labels of workloads (and pods), matched by selectors.
    #[serde(skip)]
    pod_labels: Option<Map<String, Value>>,
    /// For CRDs: the group and kind they define.
    #[serde(skip)]
    defines: Option<(String, String)>,
    /// For CRDs: what pattern references match against (group, names,
    /// labels and the Helm release annotation).
    #[serde(skip)]
    crd: Option<Value>,
}

impl Node {
    /// The node of an object: its identity and what resolving references
    /// to it needs (labels, pod labels, what a CRD defines).
    pub fn from_value(object: ObjectRef, value: &Value, blob: Option<String>) -> Node {
        let labels = value
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let pod_labels = if selectable(&object.group, &object.kind) {
            pod_template_labels(value).cloned()
        } else {
            None
        };
        let defines = (object.kind == "CustomResourceDefinition").then(|| {
            (
                value
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                value
                    .pointer("/spec/names/kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        let crd = defines.is_some().then(|| {
            serde_json::json!({
                "spec": {"group": value.pointer("/spec/group"), "names": value.pointer("/spec/names")},
                "metadata": {"labels": value.pointer("/metadata/labels"), "annotations": value.pointer("/metadata/annotations")},
            })
        });
        Node {
            object,
            blob,
            labels,
            pod_labels,
            defines,
            crd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub kind: EdgeKind,
    pub path: String,
}

/// A reference whose target is not in the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Dangling {
    pub from: ObjectRef,
    pub reference: Reference,
}

impl fmt::Display for Dangling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} refers to {} ({} at {}), which is not in the backup",
            self.from,
            self.reference.target,
            self.reference.kind.as_str(),
            self.reference.path
        )
    }
}

type Key = (String, String, Option<String>, String);

fn key_of(o: &ObjectRef) -> Key {
    (
        o.group.clone(),
        o.kind.clone(),
        o.namespace.clone(),
        o.name.clone(),
    )
}

#[derive(Debug, Default, Clone)]
pub struct AppGraph {
    graph: DiGraph<Node, Edge>,
    index: HashMap<Key, NodeIndex>,
    pending: Vec<(NodeIndex, Reference)>,
    /// Objects that exist in the cluster but are not stored (every cluster
    /// provides them); references to them are not dangling.
    external: BTreeSet<Key>,
}

impl AppGraph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    pub fn contains(&self, object: &ObjectRef) -> bool {
        self.index.contains_key(&key_of(object))
    }

    pub fn get(&self, object: &ObjectRef) -> Option<&Node> {
        self.index.get(&key_of(object)).map(|i| &self.graph[*i])
    }

    /// Adds an object (once), keeping what reference resolution needs from it.
    pub fn add_object_value(
        &mut self,
        object: ObjectRef,
        value: &Value,
        blob: Option<String>,
    ) -> NodeIndex {
        if let Some(i) = self.index.get(&key_of(&object)) {
            return *i;
        }
        self.add_node(Node::from_value(object, value, blob))
    }

    /// Adds a node made earlier (once).
    pub fn add_node(&mut self, node: Node) -> NodeIndex {
        let key = key_of(&node.object);
        if let Some(i) = self.index.get(&key) {
            return *i;
        }
        let i = self.graph.add_node(node);
        self.index.insert(key, i);
        i
    }

    /// Marks an object as present in the cluster without being stored.
    pub fn mark_external(&mut self, object: &ObjectRef) {
        self.external.insert(key_of(object));
    }

    /// Records the references an object makes; they become edges in [`resolve`](Self::resolve).
    pub fn add_references(&mut self, from: &ObjectRef, references: Vec<Reference>) {
        if let Some(&i) = self.index.get(&key_of(from)) {
            self.pending.extend(references.into_iter().map(|r| (i, r)));
        }
    }

    fn target_key(target: &Target) -> Option<Key> {
        match target {
            Target::Object {
                group,
                kind,
                namespace,
                name,
            } => Some((group.clone(), kind.clone(), namespace.clone(), name.clone())),
            _ => None,
        }
    }

    /// Pending references whose target is neither in the graph nor known
    /// to the cluster: what a backup still has to fetch.
    pub fn unresolved(&self) -> Vec<Reference> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let crds: HashSet<(&str, &str)> = self
            .graph
            .node_weights()
            .filter_map(|n| n.defines.as_ref())
            .map(|(g, k)| (g.as_str(), k.as_str()))
            .collect();
        for (_, r) in &self.pending {
            let missing = match &r.target {
                Target::Object { .. } => {
                    let k = Self::target_key(&r.target).expect("object target");
                    !self.index.contains_key(&k) && !self.external.contains(&k)
                }
                Target::Crd { group, kind } => !crds.contains(&(group.as_str(), kind.as_str())),
                // Found by listing CRDs: see `crd_patterns`.
                Target::Selector { .. }
                | Target::CrdResources { .. }
                | Target::CrdsLabelled { .. } => false,
            };
            if missing && seen.insert(r.target.to_string()) {
                out.push(r.clone());
            }
        }
        out
    }

    /// Pending references that stand for any number of CRDs (the CRDs an
    /// application's roles grant access to, its webhooks serve, or that
    /// carry its labels), deduplicated; a backup lists CRDs to find them.
    pub fn crd_patterns(&self) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        for (_, r) in &self.pending {
            if r.target.is_crd_pattern() && !out.contains(&r.target) {
                out.push(r.target.clone());
            }
        }
        out
    }

    /// Why an object is in the graph, from the objects that need it: one
    /// line per edge, e.g. `Role/op/manager grants access to its resources (rules[0])`.
    pub fn why_included(&self, object: &ObjectRef) -> Vec<String> {
        let Some(&i) = self.index.get(&key_of(object)) else {
            return Vec::new();
        };
        let mut out: Vec<String> = self
            .graph
            .edges_directed(i, petgraph::Direction::Incoming)
            .map(|e| {
                let from = &self.graph[e.source()].object;
                let path = &e.weight().path;
                match e.weight().kind {
                    EdgeKind::Grants => format!("{from} grants access to its resources ({path})"),
                    EdgeKind::PartOf => {
                        format!("{from} belongs to the same application ({path})")
                    }
                    EdgeKind::Serves => format!("{from} serves its resources ({path})"),
                    EdgeKind::InstanceOf => format!("{from} is an instance of it"),
                    kind => format!("{from} refers to it ({} at {path})", kind.as_str()),
                }
            })
            .collect();
        // A cluster-scoped object that points into the application (a
        // binding of its ServiceAccount, a webhook served by its Service).
        out.extend(
            self.graph
                .edges_directed(i, petgraph::Direction::Outgoing)
                .filter(|e| {
                    matches!(e.weight().kind, EdgeKind::Serves | EdgeKind::Binds)
                        && object.namespace.is_none()
                        && self.graph[e.target()].object.namespace.is_some()
                })
                .map(|e| {
                    let to = &self.graph[e.target()].object;
                    let path = &e.weight().path;
                    match e.weight().kind {
                        EdgeKind::Serves => format!("it is served by {to} ({path})"),
                        _ => format!("it binds {to} ({path})"),
                    }
                }),
        );
        out.sort();
        out.dedup();
        out
    }

    /// Turns pending references into edges; returns those that point at
    /// nothing (optional references and selectors that match nothing are
    /// not reported).
    pub fn resolve(&mut self) -> Vec<Dangling> {
        let pending = std::mem::take(&mut self.pending);
        let mut dangling = Vec::new();
        let mut crds: HashMap<(String, String), NodeIndex> = HashMap::new();
        let crd_nodes: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|i| self.graph[*i].crd.is_some())
            .collect();
        // Selectors match pods of their own namespace only: index the nodes
        // that carry pod labels by namespace, so that each selector looks at
        // its namespace's workloads rather than at every node.
        let mut labelled: HashMap<String, Vec<NodeIndex>> = HashMap::new();
        for i in self.graph.node_indices() {
            let node = &self.graph[i];
            if let Some((g, k)) = &node.defines {
                crds.insert((g.clone(), k.clone()), i);
            }
            if let (Some(ns), Some(_)) = (&node.object.namespace, &node.pod_labels) {
                labelled.entry(ns.clone()).or_default().push(i);
            }
        }
        for (from, reference) in pending {
            let targets: Vec<NodeIndex> = match &reference.target {
                Target::Object { .. } => {
                    let k = Self::target_key(&reference.target).expect("object target");
                    match self.index.get(&k) {
                        Some(i) => vec![*i],
                        None => {
                            if !reference.optional && !self.external.contains(&k) {
                                dangling.push(Dangling {
                                    from: self.graph[from].object.clone(),
                                    reference: reference.clone(),
                                });
                            }
                            vec![]
                        }
                    }
                }
                Target::Crd { group, kind } => match crds.get(&(group.clone(), kind.clone())) {
                    Some(i) => vec![*i],
                    None => {
                        dangling.push(Dangling {
                            from: self.graph[from].object.clone(),
                            reference: reference.clone(),
                        });
                        vec![]
                    }
                },
                Target::CrdResources { .. } | Target::CrdsLabelled { .. } => crd_nodes
                    .iter()
                    .copied()
                    .filter(|i| {
                        self.graph[*i]
                            .crd
                            .as_ref()
                            .is_some_and(|crd| reference.target.matches_crd(crd))
                    })
                    .collect(),
                Target::Selector {
                    namespace,
                    selector,
                } => labelled
                    .get(namespace)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|i| {
                        self.graph[*i]
                            .pod_labels
                            .as_ref()
                            .is_some_and(|l| selector.matches(Some(l)))
                    })
                    .collect(),
            };
            for to in targets {
                if to != from {
                    self.graph.add_edge(
                        from,
                        to,
                        Edge {
                            kind: reference.kind,
                            path: reference.path.clone(),
                        },
                    );
                }
            }
        }
        dangling.sort_by(|a, b| {
            (a.from.to_string(), a.reference.target.to_string())
                .cmp(&(b.from.to_string(), b.reference.target.to_string()))
        });
        dangling
    }

    /// Nodes sorted by object.
    pub fn nodes(&self) -> Vec<&Node> {
        let mut nodes: Vec<&Node> = self.graph.node_weights().collect();
        nodes.sort_by(|a, b| a.object.cmp(&b.object));
        nodes
    }

    /// Edges as (from, to, edge), sorted.
    pub fn edges(&self) -> Vec<(&ObjectRef, &ObjectRef, &Edge)> {
        let mut edges: Vec<_> = self
            .graph
            .edge_references()
            .map(|e| {
                (
                    &self.graph[e.source()].object,
                    &self.graph[e.target()].object,
                    e.weight(),
                )
            })
            .collect();
        edges.sort_by(|a, b| (a.0, a.1, a.2.kind, &a.2.path).cmp(&(b.0, b.1, b.2.kind, &b.2.path)));
        edges
    }

    /// Objects that refer to `object`.
    pub fn referrers(&self, object: &ObjectRef) -> Vec<(&ObjectRef, EdgeKind)> {
        let Some(&i) = self.index.get(&key_of(object)) else {
            return Vec::new();
        };
        let mut out: Vec<_> = self
            .graph
            .edges_directed(i, petgraph::Direction::Incoming)
            .map(|e| (&self.graph[e.source()].object, e.weight().kind))
            .collect();
        out.sort();
        out
    }

    /// What `seeds` need, transitively (the seeds included).
    pub fn dependencies_closure(&self, seeds: &[ObjectRef]) -> BTreeSet<ObjectRef> {
        self.closure_where(seeds, |_, _| true)
    }

    /// The seeds and what they reach through edges `follow` accepts
    /// (given the edge and the object it points at), transitively.
    pub fn closure_where(
        &self,
        seeds: &[ObjectRef],
        follow: impl Fn(&Edge, &ObjectRef) -> bool,
    ) -> BTreeSet<ObjectRef> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<NodeIndex> = seeds
            .iter()
            .filter_map(|s| self.index.get(&key_of(s)).copied())
            .collect();
        while let Some(i) = stack.pop() {
            if !out.insert(self.graph[i].object.clone()) {
                continue;
            }
            for edge in self.graph.edges_directed(i, petgraph::Direction::Outgoing) {
                if follow(edge.weight(), &self.graph[edge.target()].object) {
                    stack.push(edge.target());
                }
            }
        }
        out
    }

    /// The compact, stable JSON form: sorted nodes, edges as index pairs.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.compact()).expect("a graph serializes")
    }

    /// The bytes of [`AppGraph::to_json`], written without building the
    /// JSON value first (a backup stores them as they are).
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&self.compact())
    }

    /// The compact serialized form: nodes sorted by object, edges by
    /// position of their ends.
    fn compact(&self) -> CompactGraph<'_> {
        let nodes = self.nodes();
        let position: HashMap<&ObjectRef, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (&n.object, i))
            .collect();
        let edges = self
            .edges()
            .into_iter()
            .map(|(from, to, e)| CompactEdge {
                from: position[from],
                to: position[to],
                kind: e.kind,
                path: &e.path,
            })
            .collect();
        CompactGraph { nodes, edges }
    }

    pub fn from_json(value: &Value) -> Result<AppGraph, ModelError> {
        #[derive(Deserialize)]
        struct RawEdge {
            from: usize,
            to: usize,
            kind: EdgeKind,
            path: String,
        }
        #[derive(Deserialize)]
        struct Raw {
            nodes: Vec<Node>,
            edges: Vec<RawEdge>,
        }
        let raw: Raw =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::Graph(e.to_string()))?;
        let mut g = AppGraph::new();
        let mut indices = Vec::with_capacity(raw.nodes.len());
        for node in raw.nodes {
            let key = key_of(&node.object);
            let i = g.graph.add_node(node);
            g.index.insert(key, i);
            indices.push(i);
        }
        for e in raw.edges {
            let (Some(&from), Some(&to)) = (indices.get(e.from), indices.get(e.to)) else {
                return Err(ModelError::Graph(format!(
                    "edge {} → {} points outside the node list",
                    e.from, e.to
                )));
            };
            g.graph.add_edge(
                from,
                to,
                Edge {
                    kind: e.kind,
                    path: e.path,
                },
            );
        }
        Ok(g)
    }

    /// Graphviz DOT, deterministic: namespaces as clusters, labelled edges.
    pub fn to_dot(&self) -> String {
        let nodes = self.nodes();
        let position: HashMap<&ObjectRef, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (&n.object, i))
            .collect();
        let mut by_namespace: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            by_namespace
                .entry(n.object.namespace.as_deref())
                .or_default()
                .push(i);
        }
        let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::from(
            "digraph application {\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
        );
        for (ns, members) in &by_namespace {
            let indent = if ns.is_some() { "    " } else { "  " };
            if let Some(ns) = ns {
                out.push_str(&format!(
                    "  subgraph \"cluster_{0}\" {{\n    label=\"namespace {0}\";\n",
                    quote(ns)
                ));
            }
            for i in members {
                let o = &nodes[*i].object;
                out.push_str(&format!(
                    "{indent}n{i} [label=\"{}\\n{}\"];\n",
                    quote(&o.kind),
                    quote(&o.name)
                ));
            }
            if ns.is_some() {
                out.push_str("  }\n");
            }
        }
        for (from, to, e) in self.edges() {
            out.push_str(&format!(
                "  n{} -> n{} [label=\"{}\"];\n",
                position[from],
                position[to],
                e.kind.as_str()
            ));
        }
        out.push_str("}\n");
        out
    }
}

/// [`AppGraph::to_json`]'s shape; field order is the stored byte order.
#[derive(Serialize)]
struct CompactGraph<'a> {
    nodes: Vec<&'a Node>,
    edges: Vec<CompactEdge<'a>>,
}

#[derive(Serialize)]
struct CompactEdge<'a> {
    from: usize,
    to: usize,
    kind: EdgeKind,
    path: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::edges::references;
    use serde_json::json;

    fn add(g: &mut AppGraph, v: Value) -> ObjectRef {
        let r = ObjectRef::from_object(&v).unwrap();
        g.add_object_value(r.clone(), &v, Some(format!("blob-{}", r.name)));
        g.add_references(&r, references(&v));
        r
    }

    fn app() -> (AppGraph, Vec<ObjectRef>) {
        let mut g = AppGraph::new();
        let ns = add(
            &mut g,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
        );
        let cm = add(
            &mut g,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "a"}}),
        );
        let dep = add(
            &mut g,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "a"},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"volumes": [{"name": "c", "configMap": {"name": "cfg"}}, {"name": "m", "configMap": {"name": "missing"}}]}}}}),
        );
        let svc = add(
            &mut g,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"}, "spec": {"selector": {"app": "web"}}}),
        );
        let crd = add(
            &mut g,
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.demo.io"},
            "spec": {"group": "demo.io", "names": {"kind": "Widget", "plural": "widgets"}}}),
        );
        let cr = add(
            &mut g,
            json!({"apiVersion": "demo.io/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "a"}}),
        );
        let rb = add(
            &mut g,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "v", "namespace": "a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}, "subjects": []}),
        );
        (g, vec![ns, cm, dep, svc, crd, cr, rb])
    }

    #[test]
    fn references_resolve_into_typed_edges_and_dangling_ones_are_reported() {
        let (mut g, objs) = app();
        let unresolved: Vec<String> = g
            .unresolved()
            .iter()
            .map(|r| r.target.to_string())
            .collect();
        assert_eq!(unresolved, vec!["ConfigMap/a/missing", "ClusterRole/view"]);
        g.mark_external(&ObjectRef {
            group: "rbac.authorization.k8s.io".into(),
            version: "v1".into(),
            kind: "ClusterRole".into(),
            namespace: None,
            name: "view".into(),
        });
        let dangling = g.resolve();
        assert_eq!(dangling.len(), 1, "{dangling:?}");
        assert!(dangling[0].to_string().starts_with("Deployment/a/web refers to ConfigMap/a/missing (mounts at spec.template.spec.volumes[1].configMap.name)"));
        let edges: Vec<String> = g
            .edges()
            .iter()
            .map(|(f, t, e)| format!("{f} -{}-> {t}", e.kind.as_str()))
            .collect();
        for expected in [
            "Deployment/a/web -mounts-> ConfigMap/a/cfg",
            "Service/a/web -selects-> Deployment/a/web",
            "Widget/a/w -instance-of-> CustomResourceDefinition/widgets.demo.io",
            "ConfigMap/a/cfg -in-namespace-> Namespace/a",
        ] {
            assert!(
                edges.contains(&expected.to_string()),
                "{expected} in {edges:#?}"
            );
        }
        assert_eq!(g.referrers(&objs[1]), vec![(&objs[2], EdgeKind::Mounts)]);
    }

    #[test]
    fn crds_without_instances_become_dependencies_with_reasons() {
        let mut g = AppGraph::new();
        add(
            &mut g,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
        );
        let role = add(
            &mut g,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "op", "namespace": "a"},
                "rules": [{"apiGroups": ["demo.io"], "resources": ["widgets"], "verbs": ["*"]}]}),
        );
        let dep = add(
            &mut g,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "op", "namespace": "a",
                "labels": {"app.kubernetes.io/instance": "demo"}}, "spec": {"template": {"spec": {"containers": []}}}}),
        );
        assert_eq!(
            g.crd_patterns()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![
                "the CRDs of widgets.demo.io",
                "the CRDs with app.kubernetes.io/instance=demo"
            ]
        );
        assert!(
            g.unresolved().iter().all(|r| !r.target.is_crd_pattern()),
            "patterns are found by listing CRDs, not fetched by name"
        );
        let widgets = add(
            &mut g,
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "widgets.demo.io"},
                "spec": {"group": "demo.io", "names": {"kind": "Widget", "plural": "widgets"}}}),
        );
        let gadgets = add(
            &mut g,
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "gadgets.demo.io",
                "labels": {"app.kubernetes.io/instance": "demo"}},
                "spec": {"group": "demo.io", "names": {"kind": "Gadget", "plural": "gadgets"}}}),
        );
        let dangling = g.resolve();
        assert!(
            dangling.is_empty(),
            "patterns are never dangling: {dangling:?}"
        );
        assert_eq!(
            g.why_included(&widgets),
            vec![format!("{role} grants access to its resources (rules[0])")]
        );
        assert_eq!(
            g.why_included(&gadgets),
            vec![format!(
                "{dep} belongs to the same application (metadata.labels.app.kubernetes.io/instance)"
            )]
        );
        let closure = g.dependencies_closure(&[dep]);
        assert!(closure.contains(&gadgets) && !closure.contains(&widgets));
    }

    #[test]
    fn closure_follows_dependencies() {
        let (mut g, objs) = app();
        g.resolve();
        let closure = g.dependencies_closure(&[objs[3].clone()]);
        let names: Vec<String> = closure.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            vec![
                "ConfigMap/a/cfg",
                "Namespace/a",
                "Service/a/web",
                "Deployment/a/web"
            ]
        );
    }

    #[test]
    fn stored_graph_bytes_are_those_of_the_json_form() {
        let (mut g, _) = app();
        g.resolve();
        // The form snapshots have always stored: an unchanged application
        // keeps deduplicating its graph blob.
        let nodes = g.nodes();
        let position: HashMap<&ObjectRef, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (&n.object, i))
            .collect();
        let edges: Vec<Value> = g
            .edges()
            .into_iter()
            .map(|(from, to, e)| serde_json::json!({"from": position[from], "to": position[to], "kind": e.kind, "path": e.path}))
            .collect();
        let stored =
            serde_json::to_vec(&serde_json::json!({"nodes": nodes, "edges": edges})).unwrap();
        assert!(!edges.is_empty());
        assert_eq!(g.to_json_bytes().unwrap(), stored);
        assert_eq!(serde_json::to_vec(&g.to_json()).unwrap(), stored);
    }

    #[test]
    fn json_form_round_trips_and_dot_is_deterministic() {
        let (mut g, _) = app();
        g.resolve();
        let json = g.to_json();
        let back = AppGraph::from_json(&json).unwrap();
        assert_eq!(back.to_json(), json);
        assert_eq!(back.to_dot(), g.to_dot());
        let (mut again, _) = app();
        again.resolve();
        assert_eq!(again.to_dot(), g.to_dot());
        assert!(g.to_dot().contains("subgraph \"cluster_a\""));
        assert!(g.to_dot().contains("[label=\"mounts\"]"));
        assert!(
            AppGraph::from_json(
                &json!({"nodes": [], "edges": [{"from": 0, "to": 1, "kind": "owns", "path": ""}]})
            )
            .is_err()
        );
    }
}
