//! Compiling a transform plan: every rule set is read, compiled once and
//! asked once for its kinds and for the names it looks for; every selector
//! and patch is checked. All problems are collected before the plan is
//! refused.
//!
//! What a rule set may declare, besides `fn transform(obj, params, target)`,
//! so that Ferry hands it only the objects it can change (all are
//! optional, and an object must pass every one declared):
//! - `fn kinds()` or `fn kinds(params)`, evaluated once: an array of kinds
//!   (`Kind`, `group/Kind`, `/Kind` for the core group), or `()` for every
//!   kind.
//! - `fn mentions()` or `fn mentions(params)`, evaluated once: an array of
//!   names, or `()` for no such condition. The rule set then sees only
//!   objects with a string value (at any depth; map keys do not count) that
//!   contains one of the names as a whole name, not directly preceded or
//!   followed by an ASCII letter, digit, `-` or `_` (see [`Mentions`]). It
//!   suits a rule set that changes only what refers to given names, such
//!   as `namespace`: everything it rewrites holds the old name.
//! - `fn applies_to(api_version, kind, params, target)`, evaluated once per
//!   apiVersion and kind in each step (by each of the step's threads): `false`
//!   when `transform` neither changes nor warns about any object of that
//!   apiVersion and kind on this target. It may call `serves`,
//!   `serves_kind` and the graph functions (which see the step's input);
//!   its warnings are discarded, and when it fails or returns anything but
//!   `false` the objects go to `transform` as usual. It suits a rule set
//!   whose work depends on an object's version, such as `api-versions`.
//!
//! And, to do per-plan work once instead of per object:
//! - `fn prepare(params)`, evaluated once: its value is what `transform`
//!   receives as `params` (the other functions still get the plan's
//!   parameters). When it fails, `transform` gets the plan's parameters
//!   instead, so that a rule set that checks them in `transform` reports
//!   the problem on each object as before.

use std::path::{Path, PathBuf};

use json_patch::PatchOperation;
use rhai::{AST, Dynamic, Scope};
use serde_json::Value;

use super::builtin::{builtin, builtin_rule_sets, builtin_source_name};
use super::config::{OnError, StepConfig, TransformPlanConfig, step_location};
use super::convert::to_dynamic;
use super::engine::{self, SCRIPT_STACK_SIZE, engine};
use super::select::{KindMatcher, Mentions, Selector, kind_matches};
use super::{Diagnostic, TransformError, patch};

/// A compiled transform plan, ready to run on any number of snapshots.
pub struct TransformPlan {
    pub(crate) name: Option<String>,
    pub(crate) on_error: OnError,
    pub(crate) steps: Vec<Step>,
}

impl std::fmt::Debug for TransformPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformPlan")
            .field("name", &self.name)
            .field("on_error", &self.on_error)
            .field("steps", &self.rule_set_names())
            .finish()
    }
}

/// One compiled step.
pub(crate) struct Step {
    /// How traces, warnings and errors name the step: the built-in's name,
    /// the rule set path, or the step's `name`.
    pub name: String,
    /// Where the step's code is, for error locations: a rule set file
    /// (`transforms/registry.rhai`) or the step in the plan (`plan.yaml#steps[2]`).
    pub source: String,
    pub action: Action,
}

pub(crate) enum Action {
    Script {
        ast: AST,
        /// `None`: the rule set sees every kind.
        kinds: Option<Vec<KindMatcher>>,
        /// `None`: the rule set sees objects whatever they mention.
        mentions: Option<Mentions>,
        /// Whether the rule set has `fn applies_to(api_version, kind, params, target)`.
        applies_to: bool,
        params: Dynamic,
        /// What `transform` gets as `params`: the value of `prepare(params)`,
        /// or `params` itself.
        transform_params: Dynamic,
    },
    Patch {
        selector: Selector,
        operations: Vec<PatchOperation>,
    },
}

impl Step {
    /// Whether the step looks at `object` at all; the kinds dispatch and
    /// the search for mentioned names happen here, in Rust, before any
    /// conversion. (A rule set's `applies_to` is asked when the step runs.)
    pub fn selects(&self, object: &Value) -> bool {
        match &self.action {
            Action::Script {
                kinds, mentions, ..
            } => {
                kinds.as_ref().is_none_or(|k| kind_matches(k, object))
                    && mentions.as_ref().is_none_or(|m| m.found_in(object))
            }
            Action::Patch { selector, .. } => selector.matches(object),
        }
    }
}

/// Runs `f` on a thread with a stack deep enough for the sandbox's limits.
pub(crate) fn on_script_stack<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ferry-transform".to_string())
            .stack_size(SCRIPT_STACK_SIZE)
            .spawn_scoped(s, f)
            .expect("the system refused to start a transform thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl TransformPlan {
    /// Parses and compiles a plan. `source_name` names the plan in
    /// diagnostics; `base_dir` resolves relative rule set paths (the
    /// current directory when `None`).
    pub fn from_yaml(
        text: &str,
        source_name: &str,
        base_dir: Option<&Path>,
    ) -> Result<Self, TransformError> {
        on_script_stack(|| compile(text, source_name, base_dir))
    }

    /// Reads and compiles a plan file; rule set paths are relative to it.
    pub fn load(path: &Path) -> Result<Self, TransformError> {
        let text = std::fs::read_to_string(path).map_err(|source| TransformError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string(), path.parent())
    }

    /// This plan's steps, then `next`'s (with `next`'s name and error policy).
    pub fn then(mut self, next: TransformPlan) -> TransformPlan {
        self.steps.extend(next.steps);
        TransformPlan {
            name: next.name.or(self.name),
            on_error: next.on_error,
            steps: self.steps,
        }
    }

    /// The plan's `metadata.name`, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// How each step is named in traces, in order.
    pub fn rule_set_names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name.clone()).collect()
    }
}

fn compile(
    text: &str,
    source_name: &str,
    base_dir: Option<&Path>,
) -> Result<TransformPlan, TransformError> {
    let partial = TransformPlanConfig::parse_partial(text, source_name);
    let mut diagnostics = partial.diagnostics;
    let Some(config) = partial.config else {
        return Err(TransformError::Plan(diagnostics));
    };
    let mut steps = Vec::with_capacity(config.spec.steps.len());
    for (i, step) in config.spec.steps.iter().enumerate() {
        if partial.unreadable_steps.contains(&i) {
            continue;
        }
        match compile_step(step, &step_location(source_name, i), base_dir) {
            Ok(s) => steps.push(s),
            Err(mut d) => diagnostics.append(&mut d),
        }
    }
    if !diagnostics.is_empty() {
        return Err(TransformError::Plan(diagnostics));
    }
    Ok(TransformPlan {
        name: config.metadata.name,
        on_error: config.spec.on_error,
        steps,
    })
}

fn compile_step(
    step: &StepConfig,
    at: &str,
    base_dir: Option<&Path>,
) -> Result<Step, Vec<Diagnostic>> {
    let problem = |message: String| Diagnostic::new(at.to_string(), message);
    let mut diagnostics = Vec::new();
    let given: Vec<&str> = [
        ("ruleSet", step.rule_set.is_some()),
        ("script", step.script.is_some()),
        ("patch", step.patch.is_some()),
    ]
    .iter()
    .filter(|(_, present)| *present)
    .map(|(field, _)| *field)
    .collect();
    match given.len() {
        0 => diagnostics.push(problem(
            "a step needs one of ruleSet, script or patch".to_string(),
        )),
        1 => {}
        _ => diagnostics.push(problem(format!(
            "a step has exactly one of ruleSet, script or patch; this one has {}",
            given.join(" and ")
        ))),
    }
    if step.select.is_some() && step.patch.is_none() {
        diagnostics.push(problem(
            "select applies to patch steps; rule sets choose their kinds with fn kinds()"
                .to_string(),
        ));
    }
    if step.params.is_some() && step.patch.is_some() {
        diagnostics.push(problem(
            "params apply to rule sets and scripts; a patch takes none".to_string(),
        ));
    }
    let params = match &step.params {
        None | Some(Value::Null) => Dynamic::from_map(rhai::Map::new()),
        Some(p @ Value::Object(_)) => to_dynamic(p),
        Some(other) => {
            diagnostics.push(problem(format!(
                "params is {other}; expected a mapping of parameter names to values"
            )));
            Dynamic::UNIT
        }
    };
    if given.len() != 1 {
        return Err(diagnostics);
    }
    let step_name = |default: &str| step.name.clone().unwrap_or_else(|| default.to_string());

    let compiled = if let Some(rule_set) = &step.rule_set {
        let (text, source) = match rule_set_source(rule_set, base_dir) {
            Ok(found) => found,
            Err(message) => {
                diagnostics.push(problem(message));
                return Err(diagnostics);
            }
        };
        compile_script_with(&text, &source, &params).map(|c| Step {
            name: step_name(rule_set),
            source,
            action: c.into_action(params),
        })
    } else if let Some(script) = &step.script {
        let default_name = at.rsplit_once('#').map_or(at, |(_, s)| s);
        compile_script_with(script, at, &params).map(|c| Step {
            name: step_name(default_name),
            source: at.to_string(),
            action: c.into_action(params),
        })
    } else {
        let default_name = at.rsplit_once('#').map_or(at, |(_, s)| s);
        let operations = step.patch.as_deref().unwrap_or_default();
        let selector = Selector::compile(&step.select.clone().unwrap_or_default());
        let operations = patch::compile(operations);
        match (selector, operations) {
            (Ok(selector), Ok(operations)) => Ok(Step {
                name: step_name(default_name),
                source: at.to_string(),
                action: Action::Patch {
                    selector,
                    operations,
                },
            }),
            (selector, operations) => Err(selector
                .err()
                .into_iter()
                .flatten()
                .chain(operations.err().into_iter().flatten())
                .map(|m| Diagnostic::new(at.to_string(), m))
                .collect()),
        }
    };
    match compiled {
        Ok(step) if diagnostics.is_empty() => Ok(step),
        Ok(_) => Err(diagnostics),
        Err(mut more) => {
            diagnostics.append(&mut more);
            Err(diagnostics)
        }
    }
}

/// The text of a rule set and the name errors give its source.
fn rule_set_source(rule_set: &str, base_dir: Option<&Path>) -> Result<(String, String), String> {
    if let Some(text) = builtin(rule_set) {
        return Ok((text.to_string(), builtin_source_name(rule_set)));
    }
    let is_path = rule_set.ends_with(".rhai") || rule_set.contains(['/', '\\']);
    if !is_path {
        let names: Vec<&str> = builtin_rule_sets().iter().map(|(n, _)| *n).collect();
        let close = names
            .iter()
            .map(|n| (edit_distance(n, rule_set), *n))
            .filter(|(d, _)| *d <= 2)
            .min();
        return Err(match close {
            Some((_, name)) => {
                format!("unknown built-in rule set '{rule_set}'; did you mean {name}?")
            }
            None => format!(
                "unknown built-in rule set '{rule_set}'; the built-ins are {}, and a rule set file is a path ending in .rhai",
                names.join(", ")
            ),
        });
    }
    let path: PathBuf = match base_dir {
        Some(dir) if Path::new(rule_set).is_relative() => dir.join(rule_set),
        _ => PathBuf::from(rule_set),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read rule set {}: {e}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// Levenshtein distance, for suggesting the built-in a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A compiled rule set and what it declared about the objects it sees.
pub(crate) struct CompiledScript {
    pub ast: AST,
    pub kinds: Option<Vec<KindMatcher>>,
    pub mentions: Option<Mentions>,
    pub applies_to: bool,
    /// The value of `prepare(params)`, when the rule set has it and it succeeded.
    pub prepared: Option<Dynamic>,
}

impl CompiledScript {
    fn into_action(self, params: Dynamic) -> Action {
        Action::Script {
            ast: self.ast,
            kinds: self.kinds,
            mentions: self.mentions,
            applies_to: self.applies_to,
            transform_params: self.prepared.unwrap_or_else(|| params.clone()),
            params,
        }
    }
}

/// Compiles a rule set without parameters and evaluates its `kinds()` and
/// `mentions()` once.
#[cfg(test)]
pub(crate) fn compile_script(text: &str, source: &str) -> Result<CompiledScript, Vec<Diagnostic>> {
    compile_script_with(text, source, &Dynamic::from_map(rhai::Map::new()))
}

/// Compiles a rule set and evaluates its `kinds()` or `kinds(params)`, and
/// its `mentions()` or `mentions(params)`, once: a rule set whose reach
/// depends on its parameters (the kinds of custom resources to look into,
/// the namespaces to move) still gets only the objects it can change.
pub(crate) fn compile_script_with(
    text: &str,
    source: &str,
    params: &Dynamic,
) -> Result<CompiledScript, Vec<Diagnostic>> {
    let engine = engine();
    let mut ast = engine.compile(text).map_err(|e| {
        let e = engine::parse_error(&e);
        vec![Diagnostic::new(e.location(source), e.message)]
    })?;
    ast.set_source(source);
    let mut diagnostics = Vec::new();
    let transforms: Vec<usize> = ast
        .iter_functions()
        .filter(|f| f.name == "transform")
        .map(|f| f.params.len())
        .collect();
    if !transforms.contains(&3) {
        let found = if transforms.is_empty() {
            String::new()
        } else {
            format!(
                " (it has transform with {} parameters)",
                transforms
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        diagnostics.push(Diagnostic::new(
            source.to_string(),
            format!("a rule set defines fn transform(obj, params, target){found}"),
        ));
    }
    let kinds = declaration(&ast, "kinds", params, source, &mut diagnostics);
    let mentions = declaration(&ast, "mentions", params, source, &mut diagnostics);
    // `()` from kinds(): every kind (the parameters reach every object);
    // from mentions(): objects are not chosen by what they mention.
    let kinds = declared(kinds, parse_kinds, source, &mut diagnostics);
    let mentions = declared(mentions, parse_mentions, source, &mut diagnostics).map(Mentions::new);
    let applies_to = ast
        .iter_functions()
        .any(|f| f.name == "applies_to" && f.params.len() == 4);
    let prepared = prepare(&ast, params);
    if diagnostics.is_empty() {
        Ok(CompiledScript {
            ast,
            kinds,
            mentions,
            applies_to,
            prepared,
        })
    } else {
        Err(diagnostics)
    }
}

/// The value of the rule set's `prepare(params)`, called once; `None` when
/// it has none or the call failed (then `transform` meets the same problem
/// with the plan's parameters and reports it per object).
fn prepare(ast: &AST, params: &Dynamic) -> Option<Dynamic> {
    if !ast
        .iter_functions()
        .any(|f| f.name == "prepare" && f.params.len() == 1)
    {
        return None;
    }
    engine::begin_object();
    let result = engine().call_fn::<Dynamic>(&mut Scope::new(), ast, "prepare", (params.clone(),));
    engine::end_object();
    result.ok()
}

/// The value of the rule set's `name()` or `name(params)`, called once;
/// `None` when it has neither or the call failed (a diagnostic says so).
fn declaration(
    ast: &AST,
    name: &str,
    params: &Dynamic,
    source: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Dynamic> {
    let arity = ast
        .iter_functions()
        .find(|f| f.name == name && f.params.len() <= 1)
        .map(|f| f.params.len())?;
    let engine = engine();
    engine::begin_object();
    let result = if arity == 0 {
        engine.call_fn::<Dynamic>(&mut Scope::new(), ast, name, ())
    } else {
        engine.call_fn::<Dynamic>(&mut Scope::new(), ast, name, (params.clone(),))
    };
    engine::end_object();
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            let e = engine::eval_error(&e);
            diagnostics.push(Diagnostic::new(
                e.location(source),
                format!("{name}() failed: {}", e.message),
            ));
            None
        }
    }
}

/// What a declaration's value says, or `None` for `()`, for no
/// declaration, and for a value that is not valid (a diagnostic says why).
fn declared<T>(
    value: Option<Dynamic>,
    parse: impl FnOnce(Dynamic) -> Result<T, Vec<String>>,
    source: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<T> {
    let value = value.filter(|v| !v.is_unit())?;
    match parse(value) {
        Ok(parsed) => Some(parsed),
        Err(messages) => {
            diagnostics.extend(
                messages
                    .into_iter()
                    .map(|m| Diagnostic::new(source.to_string(), m)),
            );
            None
        }
    }
}

/// The strings of the array a declaration (`kinds()`, `mentions()`)
/// returned, and a message for each element that is not one.
fn declared_strings(
    value: Dynamic,
    name: &str,
    example: &str,
) -> Result<(Vec<String>, Vec<String>), Vec<String>> {
    let Some(items) = value.clone().try_cast::<rhai::Array>() else {
        return Err(vec![format!(
            "{name}() returned {} ({}); expected an array {example}",
            value,
            value.type_name()
        )]);
    };
    let mut errors = Vec::new();
    let mut strings = Vec::new();
    for item in items {
        match item.clone().into_immutable_string() {
            Ok(text) => strings.push(text.to_string()),
            Err(_) => errors.push(format!("{name}(): {item} is not a string")),
        }
    }
    Ok((strings, errors))
}

fn parse_mentions(value: Dynamic) -> Result<Vec<String>, Vec<String>> {
    match declared_strings(value, "mentions", "of names such as [\"prod\"], or ()")? {
        (names, errors) if errors.is_empty() => Ok(names),
        (_, errors) => Err(errors),
    }
}

fn parse_kinds(value: Dynamic) -> Result<Vec<KindMatcher>, Vec<String>> {
    let mut kinds = Vec::new();
    let (texts, mut errors) = declared_strings(
        value,
        "kinds",
        "of kinds such as [\"Deployment\", \"/Service\"]",
    )?;
    for text in texts {
        match KindMatcher::parse(&text) {
            Ok(k) => kinds.push(k),
            Err(e) => errors.push(format!("kinds(): {e}")),
        }
    }
    if errors.is_empty() {
        Ok(kinds)
    } else {
        Err(errors)
    }
}
