//! Running a compiled plan: steps in order, objects of a step across
//! threads.
//!
//! A step's input is shared read-only by its threads (the graph functions
//! see it whole); each thread claims blocks of objects, converts only the
//! objects the step selects, and reports only what changed, failed or
//! warned. The step's output is assembled in input order afterwards, so
//! results do not depend on scheduling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rhai::{AST, Array, CallFnOptions, Dynamic, ImmutableString, Scope};
use serde_json::Value;

use crate::model::ObjectRef;
use crate::profile::ClusterProfile;

use super::config::OnError;
use super::convert::{from_dynamic, to_dynamic};
use super::edit::{self, Edit};
use super::engine::{self, SCRIPT_STACK_SIZE, engine};
use super::lookup::StepInput;
use super::plan::{Action, Step, TransformPlan};
use super::trace::{self, Change};
use super::{RuleWarning, SkippedObject, TransformError, TransformOutput, field, patch, text};

/// Objects a thread claims at a time.
const BLOCK: usize = 64;
/// Below this many objects per thread, more threads cost more than they save.
const MIN_OBJECTS_PER_THREAD: usize = 256;

pub(crate) fn run(
    plan: &TransformPlan,
    objects: Vec<Value>,
    target: &ClusterProfile,
) -> Result<TransformOutput, TransformError> {
    for (index, object) in objects.iter().enumerate() {
        if !has_identity(object)
            && let Err(e) = ObjectRef::from_object(object)
        {
            return Err(TransformError::InvalidObject {
                index,
                message: e.to_string(),
            });
        }
    }
    let profile = Arc::new(target.clone());
    let target = serde_json::to_value(target).expect("a cluster profile serializes to JSON");
    let mut output = TransformOutput {
        objects,
        ..TransformOutput::default()
    };
    for step in &plan.steps {
        run_step(plan.on_error, step, &profile, &target, &mut output)?;
    }
    Ok(output)
}

/// What `ObjectRef::from_object` requires, checked on a script's map.
fn map_has_identity(value: &Dynamic) -> bool {
    let Some(map) = value.read_lock::<rhai::Map>() else {
        return false;
    };
    let text = |m: &rhai::Map, key: &str| {
        m.get(key)
            .and_then(|v| v.read_lock::<rhai::ImmutableString>())
            .is_some_and(|s| !s.is_empty())
    };
    text(&map, "apiVersion")
        && text(&map, "kind")
        && map
            .get("metadata")
            .and_then(|m| m.read_lock::<rhai::Map>())
            .is_some_and(|m| text(&m, "name"))
}

/// What `ObjectRef::from_object` requires, checked without allocating.
fn has_identity(object: &Value) -> bool {
    [&["apiVersion"][..], &["kind"], &["metadata", "name"]]
        .iter()
        .all(|keys| !text(object, keys).is_empty())
}

/// `Kind/namespace/name` of an object (of any object, valid or not).
pub(crate) fn object_id(object: &Value) -> String {
    let kind = text(object, &["kind"]);
    let name = text(object, &["metadata", "name"]);
    match text(object, &["metadata", "namespace"]) {
        "" => format!("{kind}/{name}"),
        ns => format!("{kind}/{ns}/{name}"),
    }
}

/// What a step did to one object it selected.
struct Processed {
    index: usize,
    outcome: Outcome,
    changes: Vec<Change>,
    warnings: Vec<RuleWarning>,
}

enum Outcome {
    Keep,
    /// The object with these edits.
    Edit(Vec<Edit>),
    /// The objects that take the object's place: none (dropped), the
    /// changed object, or the object followed by objects it added.
    Replace(Vec<Value>),
    Failed(SkippedObject),
}

fn thread_count(objects: usize) -> usize {
    let cores = crate::cores();
    cores.min(objects.div_ceil(MIN_OBJECTS_PER_THREAD)).max(1)
}

fn run_step(
    on_error: OnError,
    step: &Step,
    profile: &Arc<ClusterProfile>,
    target: &Value,
    output: &mut TransformOutput,
) -> Result<(), TransformError> {
    let objects = std::mem::take(&mut output.objects);
    let count = objects.len();
    if count == 0 {
        return Ok(());
    }
    let input = Arc::new(StepInput::new(objects, profile.clone()));
    let next = AtomicUsize::new(0);
    let mut processed: Vec<Processed> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..thread_count(count))
            .map(|_| {
                std::thread::Builder::new()
                    .name("ferry-transform".to_string())
                    .stack_size(SCRIPT_STACK_SIZE)
                    .spawn_scoped(s, || work(step, &input, target, &next))
                    .expect("the system refused to start a transform thread")
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    processed.sort_by_key(|p| p.index);
    let objects = Arc::into_inner(input)
        .expect("every thread of the step has finished")
        .into_objects();

    if on_error == OnError::Fail
        && let Some(failure) = processed.iter().find_map(|p| match &p.outcome {
            Outcome::Failed(f) => Some(f),
            _ => None,
        })
    {
        return Err(TransformError::Rule {
            rule_set: failure.rule_set.clone(),
            location: failure.location.clone(),
            object: failure.object.clone(),
            message: failure.error.clone(),
        });
    }

    let mut processed = processed.into_iter().peekable();
    let mut out = Vec::with_capacity(count);
    let mut replaced_originals = Vec::new();
    let mut added = false;
    for (i, object) in objects.into_iter().enumerate() {
        let Some(p) = processed.next_if(|p| p.index == i) else {
            out.push(object);
            continue;
        };
        output.trace.extend(p.changes);
        output.warnings.extend(p.warnings);
        match p.outcome {
            Outcome::Keep => out.push(object),
            Outcome::Edit(edits) => {
                let mut object = object;
                edit::apply(&mut object, edits);
                out.push(object);
            }
            Outcome::Replace(values) => {
                added |= values.len() > 1;
                out.extend(values);
                replaced_originals.push(object);
            }
            Outcome::Failed(f) => {
                output.skipped.push(f);
                replaced_originals.push(object);
            }
        }
    }
    drop_in_background(replaced_originals);
    if added {
        warn_about_duplicates(step, &out, &mut output.warnings);
    }
    output.objects = out;
    Ok(())
}

/// Freeing thousands of objects takes as long as changing them; the
/// caller need not wait for it.
fn drop_in_background(objects: Vec<Value>) {
    if objects.len() < MIN_OBJECTS_PER_THREAD {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("ferry-transform-free".to_string())
        .spawn(move || drop(objects));
    // When no thread can be started, the objects are dropped here instead.
    drop(spawned);
}

/// Two objects with one identity cannot both exist in a cluster: when a
/// step adds objects, say so if it made such a pair.
fn warn_about_duplicates(step: &Step, objects: &[Value], warnings: &mut Vec<RuleWarning>) {
    let mut seen = std::collections::HashMap::new();
    for o in objects {
        if let Ok(r) = ObjectRef::from_object(o) {
            *seen.entry(r).or_insert(0usize) += 1;
        }
    }
    let mut duplicates: Vec<(ObjectRef, usize)> =
        seen.into_iter().filter(|(_, n)| *n > 1).collect();
    duplicates.sort();
    for (r, n) in duplicates {
        warnings.push(RuleWarning {
            rule_set: step.name.clone(),
            object: r.to_string(),
            message: format!(
                "after this step there are {n} objects {r} ({}); only one of them can exist in a cluster",
                r.api_version()
            ),
        });
    }
}

fn work(step: &Step, input: &Arc<StepInput>, target: &Value, next: &AtomicUsize) -> Vec<Processed> {
    let _installed = engine::install(input.clone());
    let target = matches!(step.action, Action::Script { .. }).then(|| script_target(target));
    let objects = &input.objects;
    // One scope for all calls: each call rewinds it, and its storage is reused.
    let mut scope = Scope::new();
    let mut applies_to = AppliesTo::default();
    let mut out = Vec::new();
    loop {
        let start = next.fetch_add(BLOCK, Ordering::Relaxed);
        if start >= objects.len() {
            break;
        }
        for (i, object) in objects.iter().enumerate().skip(start).take(BLOCK) {
            if !step.selects(object) {
                continue;
            }
            if let Action::Script {
                ast,
                params,
                applies_to: true,
                ..
            } = &step.action
                && !applies_to.ask(
                    ast,
                    params,
                    target.as_ref().expect("converted for script steps"),
                    object,
                )
            {
                continue;
            }
            let processed = match &step.action {
                Action::Script {
                    ast,
                    transform_params,
                    ..
                } => run_script(
                    step,
                    ast,
                    (
                        transform_params,
                        target.as_ref().expect("converted for script steps"),
                    ),
                    &mut scope,
                    i,
                    object,
                ),
                Action::Patch { operations, .. } => run_patch(step, operations, i, object),
            };
            // Unchanged objects without warnings need no record: the
            // output keeps them where they are.
            if !(matches!(processed.outcome, Outcome::Keep) && processed.warnings.is_empty()) {
                out.push(processed);
            }
        }
    }
    out
}

/// The answers of a rule set's `applies_to(api_version, kind, params,
/// target)` in one thread's part of one step, by kind, then apiVersion
/// (a snapshot has few of each, so a short list per kind is enough).
#[derive(Default)]
struct AppliesTo(HashMap<String, Vec<(String, bool)>>);

impl AppliesTo {
    /// Whether the rule set wants objects of `object`'s apiVersion and
    /// kind; asks the rule set the first time only.
    fn ask(&mut self, ast: &AST, params: &Dynamic, target: &Dynamic, object: &Value) -> bool {
        let api_version = text(object, &["apiVersion"]);
        let kind = text(object, &["kind"]);
        if let Some(answer) = self.0.get(kind).and_then(|versions| {
            versions
                .iter()
                .find(|(v, _)| v == api_version)
                .map(|(_, answer)| *answer)
        }) {
            return answer;
        }
        engine::begin_object();
        let result = engine().call_fn::<Dynamic>(
            &mut Scope::new(),
            ast,
            "applies_to",
            (
                ImmutableString::from(api_version),
                ImmutableString::from(kind),
                params.clone(),
                target.clone(),
            ),
        );
        // Its warnings are not about any object: they are dropped.
        engine::end_object();
        // Only a plain `false` keeps objects from `transform`: when the
        // question fails, `transform` decides about each object as usual.
        let answer = !matches!(result.map(|v| v.as_bool()), Ok(Ok(false)));
        self.0
            .entry(kind.to_string())
            .or_default()
            .push((api_version.to_string(), answer));
        answer
    }
}

/// The target profile as scripts see it: one read-only value shared by
/// every call (a profile lists hundreds of served kinds; copying it per
/// call would cost more than most rule sets). A script that wants to
/// change it works on a copy (`let t = target;`). Each thread converts its
/// own, so that threads do not contend for the same reference counts.
fn script_target(target: &Value) -> Dynamic {
    to_dynamic(target).into_read_only().into_shared()
}

fn failed(step: &Step, index: usize, object: &Value, location: String, error: String) -> Processed {
    Processed {
        index,
        outcome: Outcome::Failed(SkippedObject {
            rule_set: step.name.clone(),
            object: object_id(object),
            location,
            error,
        }),
        changes: Vec::new(),
        warnings: Vec::new(),
    }
}

fn run_script(
    step: &Step,
    ast: &rhai::AST,
    (params, target): (&Dynamic, &Dynamic),
    scope: &mut Scope,
    index: usize,
    object: &Value,
) -> Processed {
    engine::begin_object();
    let result = engine().call_fn_with_options::<Dynamic>(
        CallFnOptions::new().rewind_scope(true),
        scope,
        ast,
        "transform",
        (to_dynamic(object), params.clone(), target.clone()),
    );
    let messages = engine::end_object();
    let mut processed = match result {
        Err(e) => {
            let e = engine::eval_error(&e);
            failed(step, index, object, e.location(&step.source), e.message)
        }
        // The usual case, the object itself comes back: compare it with the
        // original, and convert only what changed.
        Ok(value) if value.is_map() && map_has_identity(&value) => {
            match edit::edits(&value, object) {
                Err(message) => failed(
                    step,
                    index,
                    object,
                    step.source.clone(),
                    format!("the returned object: {message}"),
                ),
                Ok(edits) if edits.is_empty() => Processed {
                    index,
                    outcome: Outcome::Keep,
                    changes: Vec::new(),
                    warnings: Vec::new(),
                },
                Ok(edits) => Processed {
                    index,
                    changes: edit::changes(&step.name, &object_id(object), object, &edits),
                    outcome: Outcome::Edit(edits),
                    warnings: Vec::new(),
                },
            }
        }
        Ok(value) => match returned(value, object) {
            Err(message) => failed(step, index, object, step.source.clone(), message),
            Ok(values) => replaced(step, index, object, values),
        },
    };
    if !messages.is_empty() {
        let id = object_id(object);
        processed.warnings = messages
            .into_iter()
            .map(|message| RuleWarning {
                rule_set: step.name.clone(),
                object: id.clone(),
                message,
            })
            .collect();
    }
    processed
}

fn run_patch(
    step: &Step,
    operations: &[json_patch::PatchOperation],
    index: usize,
    object: &Value,
) -> Processed {
    let result = patch::apply(object, operations).and_then(|v| {
        ObjectRef::from_object(&v)
            .map(|_| v)
            .map_err(|e| format!("the patched object is not valid: {e}"))
    });
    match result {
        Err(message) => failed(step, index, object, step.source.clone(), message),
        Ok(value) => replaced(step, index, object, vec![value]),
    }
}

/// Reads what `transform` returned: the object, `()`, or an array of objects.
fn returned(value: Dynamic, original: &Value) -> Result<Vec<Value>, String> {
    let items = if value.is_unit() {
        Vec::new()
    } else if value.is_map() {
        vec![value]
    } else if value.is_array() {
        value.cast::<Array>()
    } else {
        return Err(format!(
            "transform returned {} ({}); return the object, () to drop it, or an array of objects",
            value,
            value.type_name()
        ));
    };
    let many = items.len() > 1;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let which = if many {
                format!("element {i} of the returned array")
            } else {
                "the returned object".to_string()
            };
            if !item.is_map() {
                return Err(format!(
                    "{which} is {} ({}), not an object map",
                    item,
                    item.type_name()
                ));
            }
            let v = from_dynamic(item, Some(original)).map_err(|e| format!("{which}: {e}"))?;
            ObjectRef::from_object(&v)
                .map_err(|e| format!("{which} is not a valid object: {e}"))?;
            Ok(v)
        })
        .collect()
}

fn same_identity(a: &Value, b: &Value) -> bool {
    [
        &["kind"][..],
        &["metadata", "namespace"],
        &["metadata", "name"],
    ]
    .iter()
    .all(|keys| field(a, keys) == field(b, keys))
}

/// The outcome of an object that became `values`, with its trace.
fn replaced(step: &Step, index: usize, object: &Value, mut values: Vec<Value>) -> Processed {
    let id = object_id(object);
    let mut changes = Vec::new();
    match values.len() {
        0 => changes.push(trace::dropped(&step.name, &id, object)),
        1 => {
            if values[0] == *object {
                return Processed {
                    index,
                    outcome: Outcome::Keep,
                    changes,
                    warnings: Vec::new(),
                };
            }
            changes = trace::diff(&step.name, &id, object, &values[0]);
        }
        _ => {
            // The object itself (by kind, namespace and name) comes first,
            // the objects it added right after it.
            match values.iter().position(|v| same_identity(v, object)) {
                Some(p) => {
                    let itself = values.remove(p);
                    changes = trace::diff(&step.name, &id, object, &itself);
                    values.insert(0, itself);
                    for v in &values[1..] {
                        changes.push(trace::added(&step.name, &object_id(v), v));
                    }
                }
                None => {
                    changes.push(trace::dropped(&step.name, &id, object));
                    for v in &values {
                        changes.push(trace::added(&step.name, &object_id(v), v));
                    }
                }
            }
        }
    }
    Processed {
        index,
        outcome: Outcome::Replace(values),
        changes,
        warnings: Vec::new(),
    }
}
