//! What the graph functions of a rule set see: the objects a step starts
//! from (every rule set sees the output of the previous step, never a
//! half-transformed state), indexed on first use, and the target profile.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rhai::{Array, Dynamic, Map};
use serde_json::Value;

use crate::model::ObjectRef;
use crate::model::edges::references;
use crate::model::graph::AppGraph;
use crate::model::namespace_fields::{Step, namespace_fields};
use crate::model::object::split_api_version;
use crate::profile::ClusterProfile;

use super::convert::to_dynamic;
use super::select::{KindMatcher, group_kind};
use super::text;

/// The read-only input of one step, shared by every thread running it.
pub(crate) struct StepInput {
    pub objects: Vec<Value>,
    target: Arc<ClusterProfile>,
    /// Built by the first `graph_get`/`graph_find` of the step: steps that
    /// never look at other objects never pay for it.
    index: OnceLock<Index>,
    /// Built by the first `referrers` of the step.
    graph: OnceLock<AppGraph>,
    /// CRDs by the (group, kind) they define, built by the first `namespace_fields`.
    crds: OnceLock<HashMap<(String, String), usize>>,
}

#[derive(Default)]
struct Index {
    /// `kind \0 namespace \0 name` → positions (several when groups differ).
    by_id: HashMap<String, Vec<usize>>,
    by_kind: HashMap<String, Vec<usize>>,
}

fn id_key(kind: &str, namespace: &str, name: &str) -> String {
    let mut key = String::with_capacity(kind.len() + namespace.len() + name.len() + 2);
    key.push_str(kind);
    key.push('\0');
    key.push_str(namespace);
    key.push('\0');
    key.push_str(name);
    key
}

impl StepInput {
    pub fn new(objects: Vec<Value>, target: Arc<ClusterProfile>) -> Self {
        StepInput {
            objects,
            target,
            index: OnceLock::new(),
            graph: OnceLock::new(),
            crds: OnceLock::new(),
        }
    }

    pub fn into_objects(self) -> Vec<Value> {
        self.objects
    }

    fn index(&self) -> &Index {
        self.index.get_or_init(|| {
            let mut index = Index::default();
            for (i, o) in self.objects.iter().enumerate() {
                let kind = text(o, &["kind"]);
                index
                    .by_id
                    .entry(id_key(
                        kind,
                        text(o, &["metadata", "namespace"]),
                        text(o, &["metadata", "name"]),
                    ))
                    .or_default()
                    .push(i);
                index.by_kind.entry(kind.to_string()).or_default().push(i);
            }
            index
        })
    }

    fn graph(&self) -> &AppGraph {
        self.graph.get_or_init(|| {
            let mut graph = AppGraph::new();
            for o in &self.objects {
                // Every input object has an identity: `run` checks inputs
                // and every step checks what it returns.
                if let Ok(r) = ObjectRef::from_object(o) {
                    graph.add_object_value(r.clone(), o, None);
                    graph.add_references(&r, references(o));
                }
            }
            graph.resolve();
            graph
        })
    }

    fn matching<'a>(
        &'a self,
        positions: Option<&'a Vec<usize>>,
        matcher: &'a KindMatcher,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        positions
            .into_iter()
            .flatten()
            .map(|i| &self.objects[*i])
            .filter(move |o| {
                let (group, kind) = group_kind(o);
                matcher.matches(group, kind)
            })
    }

    /// `graph_get(kind, namespace, name)`: `kind` is `Kind` or `group/Kind`.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Dynamic {
        let Ok(matcher) = KindMatcher::parse(kind) else {
            return Dynamic::UNIT;
        };
        let index = self.index();
        let positions = index.by_id.get(&id_key(&matcher.kind, namespace, name));
        self.matching(positions, &matcher)
            .next()
            .map_or(Dynamic::UNIT, to_dynamic)
    }

    /// `graph_find(kind)`: every object of that kind, in input order.
    pub fn find(&self, kind: &str) -> Array {
        let Ok(matcher) = KindMatcher::parse(kind) else {
            return Array::new();
        };
        let index = self.index();
        self.matching(index.by_kind.get(&matcher.kind), &matcher)
            .map(to_dynamic)
            .collect()
    }

    /// `referrers(obj)`: who refers to the object, as `#{kind, namespace, name, edge}`.
    pub fn referrers(&self, object: &Map) -> Array {
        let Some(target) = map_object_ref(object) else {
            return Array::new();
        };
        self.graph()
            .referrers(&target)
            .into_iter()
            .map(|(from, edge)| {
                let mut m = Map::new();
                m.insert("kind".into(), from.kind.as_str().into());
                m.insert(
                    "namespace".into(),
                    from.namespace.as_deref().unwrap_or("").into(),
                );
                m.insert("name".into(), from.name.as_str().into());
                m.insert("edge".into(), edge.as_str().into());
                Dynamic::from_map(m)
            })
            .collect()
    }

    /// `namespace_fields(obj)`: the paths (arrays of keys and indices) of the
    /// fields of a custom resource that name a namespace, by its CRD's
    /// schema when the CRD is among the objects, else by naming convention.
    pub fn namespace_fields(&self, object: &Map) -> Array {
        let Some(target) = map_object_ref(object) else {
            return Array::new();
        };
        if crate::model::edges::is_builtin_group(&target.group) {
            return Array::new();
        }
        let Ok(value) = super::convert::from_dynamic(Dynamic::from_map(object.clone()), None)
        else {
            return Array::new();
        };
        let crds = self.crds.get_or_init(|| {
            self.objects
                .iter()
                .enumerate()
                .filter(|(_, o)| {
                    group_kind(o) == ("apiextensions.k8s.io", "CustomResourceDefinition")
                })
                .map(|(i, o)| {
                    (
                        (
                            text(o, &["spec", "group"]).to_string(),
                            text(o, &["spec", "names", "kind"]).to_string(),
                        ),
                        i,
                    )
                })
                .collect()
        });
        let crd = crds
            .get(&(target.group.clone(), target.kind.clone()))
            .map(|i| &self.objects[*i]);
        namespace_fields(&value, crd)
            .into_iter()
            .map(|path| {
                let steps: Array = path
                    .into_iter()
                    .map(|step| match step {
                        Step::Key(k) => Dynamic::from(k),
                        Step::Index(i) => Dynamic::from(i as rhai::INT),
                    })
                    .collect();
                Dynamic::from_array(steps)
            })
            .collect()
    }

    /// `serves(api_version)`: true when the target is unknown.
    pub fn serves(&self, api_version: &str) -> bool {
        self.target.served_group_versions.is_empty() || self.target.serves(api_version)
    }

    /// `serves_kind(api_version, kind)`: by served kinds when the profile
    /// lists them, else by groupVersion; true when the target is unknown.
    pub fn serves_kind(&self, api_version: &str, kind: &str) -> bool {
        if self.target.served_kinds.is_empty() {
            self.serves(api_version)
        } else {
            self.target.serves_kind(api_version, kind)
        }
    }
}

/// The identity of an object map, if it has one.
fn map_object_ref(object: &Map) -> Option<ObjectRef> {
    let text = |map: &Map, key: &str| -> Option<String> {
        map.get(key)
            .and_then(|v| v.clone().into_immutable_string().ok())
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
    };
    let api_version = text(object, "apiVersion")?;
    let kind = text(object, "kind")?;
    let metadata = object.get("metadata")?.read_lock::<Map>()?;
    let name = text(&metadata, "name")?;
    let namespace = text(&metadata, "namespace");
    let (group, version) = split_api_version(&api_version);
    Some(ObjectRef {
        group: group.to_string(),
        version: version.to_string(),
        kind,
        namespace,
        name,
    })
}
