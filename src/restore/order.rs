//! Restore order: a pure function of the objects to restore and their
//! dependencies. Objects are grouped into **waves**; every object's
//! dependencies are in earlier waves, and kind tiers (CRDs and Namespaces
//! first, then classes, configuration, RBAC, workloads, networking,
//! autoscaling, admission webhooks last) order objects that do not depend on
//! each other. Dependency cycles are broken deterministically (the edge that
//! closes the cycle, in sorted order, is ignored) and reported.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::ObjectRef;

/// Ordering tier of a kind: lower tiers are restored first.
pub fn kind_tier(group: &str, kind: &str) -> u32 {
    match (group, kind) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") | ("", "Namespace") => 0,
        ("storage.k8s.io", "StorageClass")
        | ("scheduling.k8s.io", "PriorityClass")
        | ("node.k8s.io", "RuntimeClass")
        | ("networking.k8s.io", "IngressClass")
        | ("rbac.authorization.k8s.io", "ClusterRole")
        | ("", "PersistentVolume") => 1,
        ("", "ServiceAccount")
        | ("", "Secret")
        | ("", "ConfigMap")
        | ("", "PersistentVolumeClaim")
        | ("", "LimitRange")
        | ("", "ResourceQuota") => 2,
        ("rbac.authorization.k8s.io", "Role")
        | ("rbac.authorization.k8s.io", "RoleBinding")
        | ("rbac.authorization.k8s.io", "ClusterRoleBinding") => 3,
        ("apps", _)
        | ("batch", _)
        | ("", "Pod")
        | ("", "ReplicationController")
        | ("", "PodTemplate") => 4,
        ("", "Service")
        | ("networking.k8s.io", _)
        | ("extensions", _)
        | ("", "Endpoints")
        | ("discovery.k8s.io", _) => 5,
        ("autoscaling", _) | ("policy", _) => 6,
        ("admissionregistration.k8s.io", _) | ("apiregistration.k8s.io", _) => 8,
        // Custom resources and anything else: after the built-in application
        // objects they usually configure, before admission webhooks.
        _ => 7,
    }
}

/// One object's place in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInput {
    pub object: ObjectRef,
    /// Objects (in the restore set or not) this one needs first.
    pub needs: Vec<ObjectRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ordering {
    /// Waves in order; objects sorted within a wave.
    pub waves: Vec<Vec<ObjectRef>>,
    /// Cycles found, each as the objects on it; the last edge was ignored.
    pub cycles: Vec<Vec<ObjectRef>>,
}

/// Orders objects into waves.
pub fn order(inputs: &[OrderInput]) -> Ordering {
    let index: BTreeMap<&ObjectRef, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.object, i))
        .collect();
    let objects: Vec<&ObjectRef> = inputs.iter().map(|p| &p.object).collect();
    let needs: Vec<Vec<usize>> = inputs
        .iter()
        .map(|p| {
            p.needs
                .iter()
                .filter_map(|n| index.get(n).copied())
                .collect()
        })
        .collect();
    let (waves, cycles) = order_indexed(&objects, needs);
    let named = |ids: Vec<usize>| ids.into_iter().map(|i| objects[i].clone()).collect();
    Ordering {
        waves: waves.into_iter().map(named).collect(),
        cycles: cycles.into_iter().map(named).collect(),
    }
}

/// [`order`] on positions: `needs[i]` lists the positions object `i` needs
/// first. Waves and cycles come back as positions, waves sorted by object;
/// a restore of 100,000 objects orders them without copying one.
pub fn order_indexed(
    objects: &[&ObjectRef],
    needs: Vec<Vec<usize>>,
) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    // Sorted, deduplicated dependency lists: deterministic.
    let needs: Vec<Vec<usize>> = needs
        .into_iter()
        .map(|n| {
            n.into_iter()
                .collect::<BTreeSet<usize>>()
                .into_iter()
                .collect()
        })
        .collect();
    // Visit in sorted object order so cycle breaking does not depend on input order.
    let mut order_of_visit: Vec<usize> = (0..objects.len()).collect();
    order_of_visit.sort_by(|a, b| objects[*a].cmp(objects[*b]));

    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Active,
        Done,
    }
    let mut state = vec![State::New; objects.len()];
    let mut level = vec![0u32; objects.len()];
    let mut cycles = Vec::new();
    // Levels: tier * STRIDE bounds how deep dependencies within a tier go
    // before they would overtake the next tier; the stride is large enough
    // for any real application.
    const STRIDE: u32 = 1000;

    for &root in &order_of_visit {
        if state[root] != State::New {
            continue;
        }
        // Iterative DFS: (node, next dependency position).
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = State::Active;
        while let Some(&mut (node, ref mut pos)) = stack.last_mut() {
            if *pos < needs[node].len() {
                let dep = needs[node][*pos];
                *pos += 1;
                match state[dep] {
                    State::New => {
                        state[dep] = State::Active;
                        stack.push((dep, 0));
                    }
                    State::Active => {
                        // A back edge closes a cycle: record it and ignore the edge.
                        let start = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        cycles.push(stack[start..].iter().map(|(n, _)| *n).collect());
                    }
                    State::Done => {}
                }
            } else {
                let o = objects[node];
                let mut l = kind_tier(&o.group, &o.kind) * STRIDE;
                for &dep in &needs[node] {
                    if state[dep] == State::Done {
                        l = l.max(level[dep] + 1);
                    }
                }
                level[node] = l;
                state[node] = State::Done;
                stack.pop();
            }
        }
    }

    let mut by_level: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, l) in level.iter().enumerate() {
        by_level.entry(*l).or_default().push(i);
    }
    let waves = by_level
        .into_values()
        .map(|mut wave| {
            wave.sort_by(|a, b| objects[*a].cmp(objects[*b]));
            wave
        })
        .collect();
    (waves, cycles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(kind: &str, name: &str) -> ObjectRef {
        let group = match kind {
            "Deployment" | "StatefulSet" => "apps",
            "Role" | "RoleBinding" | "ClusterRole" => "rbac.authorization.k8s.io",
            "CustomResourceDefinition" => "apiextensions.k8s.io",
            "StorageClass" => "storage.k8s.io",
            "Widget" => "demo.ferry.dev",
            "HorizontalPodAutoscaler" => "autoscaling",
            _ => "",
        };
        let namespaced = !matches!(
            kind,
            "Namespace" | "ClusterRole" | "CustomResourceDefinition" | "StorageClass"
        );
        ObjectRef {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            namespace: namespaced.then(|| "prod".to_string()),
            name: name.into(),
        }
    }

    fn input(object: ObjectRef, needs: &[ObjectRef]) -> OrderInput {
        OrderInput {
            object,
            needs: needs.to_vec(),
        }
    }

    fn wave_of(ordering: &Ordering, o: &ObjectRef) -> usize {
        ordering
            .waves
            .iter()
            .position(|w| w.contains(o))
            .expect("object is planned")
    }

    #[test]
    fn dependencies_come_in_earlier_waves_and_tiers_order_the_rest() {
        let ns = r("Namespace", "prod");
        let crd = r("CustomResourceDefinition", "widgets.demo.ferry.dev");
        let sc = r("StorageClass", "fast");
        let cm = r("ConfigMap", "cfg");
        let pvc = r("PersistentVolumeClaim", "data");
        let dep = r("Deployment", "web");
        let svc = r("Service", "web");
        let hpa = r("HorizontalPodAutoscaler", "web");
        let widget = r("Widget", "blue");
        let inputs = vec![
            input(widget.clone(), &[crd.clone(), ns.clone()]),
            input(hpa.clone(), &[dep.clone(), ns.clone()]),
            input(svc.clone(), std::slice::from_ref(&ns)),
            input(dep.clone(), &[cm.clone(), pvc.clone(), ns.clone()]),
            input(pvc.clone(), &[sc.clone(), ns.clone()]),
            input(cm.clone(), std::slice::from_ref(&ns)),
            input(sc.clone(), &[]),
            input(crd.clone(), &[]),
            input(ns.clone(), &[]),
        ];
        let o = order(&inputs);
        assert!(o.cycles.is_empty());
        assert_eq!(wave_of(&o, &ns), 0);
        assert_eq!(wave_of(&o, &crd), 0);
        assert!(wave_of(&o, &sc) < wave_of(&o, &pvc));
        assert!(wave_of(&o, &cm) < wave_of(&o, &dep));
        assert!(wave_of(&o, &pvc) < wave_of(&o, &dep));
        assert!(wave_of(&o, &dep) < wave_of(&o, &svc));
        assert!(wave_of(&o, &dep) < wave_of(&o, &hpa));
        assert!(wave_of(&o, &crd) < wave_of(&o, &widget));
        assert_eq!(o.waves.iter().map(Vec::len).sum::<usize>(), inputs.len());
    }

    #[test]
    fn dependencies_outside_the_set_are_ignored() {
        let dep = r("Deployment", "web");
        let o = order(&[input(dep.clone(), &[r("ConfigMap", "not-restored")])]);
        assert_eq!(o.waves, vec![vec![dep]]);
    }

    #[test]
    fn cycles_are_broken_deterministically_and_reported() {
        let a = r("ConfigMap", "a");
        let b = r("ConfigMap", "b");
        let c = r("ConfigMap", "c");
        let forward = vec![
            input(a.clone(), std::slice::from_ref(&b)),
            input(b.clone(), std::slice::from_ref(&c)),
            input(c.clone(), std::slice::from_ref(&a)),
        ];
        let mut backward = forward.clone();
        backward.reverse();
        let o1 = order(&forward);
        let o2 = order(&backward);
        assert_eq!(
            o1, o2,
            "the same graph gives the same plan whatever the input order"
        );
        assert_eq!(o1.cycles.len(), 1);
        assert_eq!(o1.cycles[0].len(), 3);
        assert_eq!(o1.waves.iter().map(Vec::len).sum::<usize>(), 3);
    }

    #[test]
    fn objects_within_a_wave_are_sorted() {
        let x = r("ConfigMap", "x");
        let y = r("ConfigMap", "y");
        let o = order(&[input(y.clone(), &[]), input(x.clone(), &[])]);
        assert_eq!(o.waves, vec![vec![x, y]]);
    }
}
