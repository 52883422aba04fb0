//! The sandbox rule sets run in: a raw Rhai engine with only pure
//! packages, the functions Ferry registers for rule sets, and hard limits.
//!
//! One engine serves every plan and every thread (Rhai's `sync` feature
//! makes it `Send + Sync`). What a call needs besides its arguments (the
//! objects of the step for `graph_get`, the target profile for `serves`,
//! the warnings of the current object, the time budget) lives in a
//! thread-local frame: the engine's callbacks are `'static`, and each
//! object is transformed entirely on one thread.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::module_resolvers::DummyModuleResolver;
use rhai::packages::{
    BasicArrayPackage, BasicMapPackage, BasicMathPackage, BitFieldPackage, CorePackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Map, ParseError, Position};

use super::lookup::StepInput;

/// Operations one call of a rule set may perform on one object.
pub(crate) const MAX_OPERATIONS: u64 = 1_000_000;
/// Nesting of function calls.
pub(crate) const MAX_CALL_LEVELS: usize = 64;
/// Nesting of expressions, at top level and in functions.
pub(crate) const MAX_EXPR_DEPTH: usize = 128;
/// Bytes in one string.
pub(crate) const MAX_STRING_SIZE: usize = 1 << 20;
/// Elements of one array.
pub(crate) const MAX_ARRAY_SIZE: usize = 100_000;
/// Entries of one object map.
pub(crate) const MAX_MAP_SIZE: usize = 100_000;
/// Wall-clock time one call may take.
pub(crate) const TIME_BUDGET: Duration = Duration::from_secs(2);

/// Deep recursion inside Rhai uses the native stack generously, more so
/// in debug builds; scripts run (and compile) on threads with this much
/// stack so that the sandbox's own limits are what stops a script.
pub(crate) const SCRIPT_STACK_SIZE: usize = 64 << 20;

/// The time budget is checked every this many operations: reading the
/// clock on every operation would cost more than the operations.
const CLOCK_EVERY: u64 = 1024;

/// What `on_progress` returns when the time budget is exhausted; also how
/// the error is recognised afterwards.
const TIME_BUDGET_MARK: &str = "ferry: time budget exhausted";

/// The shared, fully configured engine.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(build)
}

fn build() -> Engine {
    let mut engine = Engine::new_raw();
    // Pure packages only: no time (BasicTimePackage), no blobs, no I/O.
    // `print` and `debug` are language keywords and reach the callbacks below.
    CorePackage::new().register_into_engine(&mut engine);
    LogicPackage::new().register_into_engine(&mut engine);
    BitFieldPackage::new().register_into_engine(&mut engine);
    BasicMathPackage::new().register_into_engine(&mut engine);
    BasicArrayPackage::new().register_into_engine(&mut engine);
    BasicMapPackage::new().register_into_engine(&mut engine);
    MoreStringPackage::new().register_into_engine(&mut engine);

    engine.disable_symbol("eval");
    engine.disable_symbol("import");
    engine.set_module_resolver(DummyModuleResolver::new());

    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_expr_depths(MAX_EXPR_DEPTH, MAX_EXPR_DEPTH);
    engine.set_max_string_size(MAX_STRING_SIZE);
    engine.set_max_array_size(MAX_ARRAY_SIZE);
    engine.set_max_map_size(MAX_MAP_SIZE);
    engine.on_progress(|operations| {
        if operations % CLOCK_EVERY == 0
            && DEADLINE.with(Cell::get).is_some_and(|d| Instant::now() > d)
        {
            Some(Dynamic::from(TIME_BUDGET_MARK))
        } else {
            None
        }
    });
    engine.on_print(|text| push_warning(text.to_string()));
    engine.on_debug(|text, _, _| push_warning(text.to_string()));

    register_functions(&mut engine);
    engine
}

fn register_functions(engine: &mut Engine) {
    engine.register_fn("warn", |message: Dynamic| push_warning(message.to_string()));
    engine.register_fn(
        "fail",
        |message: Dynamic| -> Result<Dynamic, Box<EvalAltResult>> {
            Err(EvalAltResult::ErrorRuntime(message, Position::NONE).into())
        },
    );
    engine.register_fn("serves", |api_version: &str| {
        with_input(|input| input.is_none_or(|i| i.serves(api_version)))
    });
    engine.register_fn("serves_kind", |api_version: &str, kind: &str| {
        with_input(|input| input.is_none_or(|i| i.serves_kind(api_version, kind)))
    });
    engine.register_fn("graph_get", |kind: &str, namespace: &str, name: &str| {
        graph(|input| input.get(kind, namespace, name))
    });
    engine.register_fn("graph_get", |kind: &str, _: (), name: &str| {
        graph(|input| input.get(kind, "", name))
    });
    engine.register_fn("graph_find", |kind: &str| graph(|input| input.find(kind)));
    engine.register_fn("referrers", |object: &mut Map| {
        graph(|input| input.referrers(object))
    });
    engine.register_fn("object_id", |object: &mut Map| map_object_id(object));
    engine.register_fn("namespace_fields", |object: &mut Map| {
        graph(|input| input.namespace_fields(object))
    });

    // The core package's `sleep` would hold the thread past the time
    // budget, which is only checked between operations. Functions
    // registered on the engine take precedence over packages.
    let no_sleep = || -> Result<(), Box<EvalAltResult>> {
        Err(EvalAltResult::ErrorRuntime(
            "sleep is not available: rule sets run in a sandbox with a time budget".into(),
            Position::NONE,
        )
        .into())
    };
    engine.register_fn("sleep", move |_: rhai::INT| no_sleep());
    engine.register_fn("sleep", move |_: rhai::FLOAT| no_sleep());
}

/// `Kind/namespace/name` or `Kind/name` of an object map.
pub(crate) fn map_object_id(object: &Map) -> String {
    let text = |value: Option<&Dynamic>| {
        value
            .and_then(|v| v.clone().into_immutable_string().ok())
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    let kind = text(object.get("kind"));
    let metadata = object.get("metadata").and_then(|m| m.read_lock::<Map>());
    let (namespace, name) = match metadata {
        Some(m) => (text(m.get("namespace")), text(m.get("name"))),
        None => (String::new(), String::new()),
    };
    if namespace.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}

#[derive(Default)]
struct Frame {
    input: Option<Arc<StepInput>>,
    warnings: Vec<String>,
}

thread_local! {
    static FRAME: RefCell<Frame> = RefCell::new(Frame::default());
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn push_warning(message: String) {
    FRAME.with(|f| f.borrow_mut().warnings.push(message));
}

fn with_input<R>(f: impl FnOnce(Option<&StepInput>) -> R) -> R {
    // Borrowed, not cloned: cloning the `Arc` would make every thread
    // write to the same reference count on every call.
    FRAME.with(|frame| f(frame.borrow().input.as_deref()))
}

fn graph<R>(f: impl FnOnce(&StepInput) -> R) -> Result<R, Box<EvalAltResult>> {
    with_input(|input| match input {
        Some(input) => Ok(timed(|| f(input))),
        None => Err(EvalAltResult::ErrorRuntime(
            "the object graph is only available while transforming objects".into(),
            Position::NONE,
        )
        .into()),
    })
}

/// Runs `f`, not counting its time against the object's budget: building
/// the index of a large step (or waiting for another thread to build it)
/// is the engine's work, not the script's.
fn timed<R>(f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let result = f();
    let spent = start.elapsed();
    if spent > Duration::from_millis(1) {
        DEADLINE.with(|d| d.set(d.get().map(|deadline| deadline + spent)));
    }
    result
}

/// Makes the step's objects and target visible to the calling thread's
/// scripts until dropped.
pub(crate) struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        FRAME.with(|f| *f.borrow_mut() = Frame::default());
        DEADLINE.with(|d| d.set(None));
    }
}

pub(crate) fn install(input: Arc<StepInput>) -> Installed {
    FRAME.with(|f| {
        *f.borrow_mut() = Frame {
            input: Some(input),
            warnings: Vec::new(),
        }
    });
    Installed(())
}

/// Starts the time budget of one object and clears its warnings.
pub(crate) fn begin_object() {
    FRAME.with(|f| f.borrow_mut().warnings.clear());
    DEADLINE.with(|d| d.set(Some(Instant::now() + TIME_BUDGET)));
}

/// Ends the object's budget; returns its warnings.
pub(crate) fn end_object() -> Vec<String> {
    DEADLINE.with(|d| d.set(None));
    FRAME.with(|f| std::mem::take(&mut f.borrow_mut().warnings))
}

/// Spends the current object's time budget.
#[cfg(test)]
pub(crate) fn expire_budget() {
    DEADLINE.with(|d| d.set(Some(Instant::now())));
}

/// A script error reduced to what a user needs: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ScriptError {
    pub fn at(position: Position, message: String) -> Self {
        ScriptError {
            line: position.line(),
            column: position.position(),
            message,
        }
    }

    /// `source:line:col`, or `source` alone when the position is unknown.
    pub fn location(&self, source: &str) -> String {
        match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{source}:{l}:{c}"),
            (Some(l), None) => format!("{source}:{l}"),
            _ => source.to_string(),
        }
    }
}

/// Describes a compile error.
pub(crate) fn parse_error(err: &ParseError) -> ScriptError {
    let mut message = err.err_type().to_string();
    if ["eval", "import"].iter().any(|k| message.contains(k)) {
        message.push_str(" (rule sets run in a sandbox without eval and import)");
    }
    ScriptError::at(err.position(), message)
}

/// Describes a runtime error by its innermost cause: errors inside called
/// functions arrive wrapped once per call level.
pub(crate) fn eval_error(err: &EvalAltResult) -> ScriptError {
    let mut position = err.position();
    let mut cause = err;
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
    | EvalAltResult::ErrorInModule(_, inner, _) = cause
    {
        cause = inner;
        if !cause.position().is_none() {
            position = cause.position();
        }
    }
    let message = match cause {
        EvalAltResult::ErrorRuntime(value, _) => {
            let text = value.to_string();
            if text.is_empty() {
                "the rule set threw an error without a message".to_string()
            } else {
                text
            }
        }
        EvalAltResult::ErrorTooManyOperations(_) => format!(
            "stopped after {MAX_OPERATIONS} operations on one object, the sandbox limit (an endless loop?); the limit cannot be raised"
        ),
        EvalAltResult::ErrorStackOverflow(_) => format!(
            "stopped at {MAX_CALL_LEVELS} nested function calls, the sandbox limit on call depth (endless recursion?); the limit cannot be raised"
        ),
        EvalAltResult::ErrorDataTooLarge(what, _) => format!(
            "{what} exceeds the sandbox limit (strings {} KiB, arrays and maps {MAX_ARRAY_SIZE} elements); the limit cannot be raised",
            MAX_STRING_SIZE / 1024
        ),
        EvalAltResult::ErrorTerminated(value, _)
            if value.clone().into_immutable_string().ok().as_deref() == Some(TIME_BUDGET_MARK) =>
        {
            format!(
                "ran longer than {} s on one object, the sandbox time budget; the limit cannot be raised",
                TIME_BUDGET.as_secs()
            )
        }
        EvalAltResult::ErrorFunctionNotFound(signature, _) => format!(
            "function not found: {signature} (rule sets run in a sandbox: only Rhai's standard functions and Ferry's warn, fail, serves, serves_kind, graph_get, graph_find, referrers, object_id and namespace_fields exist; there is no file, network or environment access)"
        ),
        EvalAltResult::ErrorAssignmentToConstant(name, _) if name == "target" => {
            "the target profile is read-only; to change a copy, write let t = target;".to_string()
        }
        EvalAltResult::ErrorAssignmentToConstant(..)
        | EvalAltResult::ErrorNonPureMethodCallOnConstant(..) => {
            let text = cause.to_string();
            let text = text
                .strip_suffix(&format!(" ({})", cause.position()))
                .unwrap_or(&text)
                .to_string();
            format!(
                "{text}: constants and the target profile are read-only; to change a copy of the target, write let t = target;"
            )
        }
        EvalAltResult::ErrorModuleNotFound(module, _) => {
            format!("cannot import {module}: rule sets run in a sandbox without modules")
        }
        other => {
            // The location is reported separately, in the user's terms.
            let text = other.to_string();
            let position = format!(" ({})", other.position());
            match text.strip_suffix(&position) {
                Some(short) if !other.position().is_none() => short.to_string(),
                _ => text,
            }
        }
    };
    ScriptError::at(position, message)
}
