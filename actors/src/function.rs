//! Functions a node serves: identity, resources, and the code that runs.
//!
//! Users register plain Rust closures; arguments arrive as JSON and are decoded through
//! serde, so `FunctionSpec::sync("add", |a: i64, b: i64| a + b)` is a complete function.
//! How the code runs is part of its registration (DESIGN.md §3):
//! - [`ExecMode::Blocking`] (the default for sync code) runs on tokio's blocking pool, so
//!   slow user code never stalls a connection;
//! - [`ExecMode::Inline`] runs in place on the connection's thread — for cheap,
//!   non-blocking functions such as `echo`, where a pool hop would cost more than the call;
//! - async functions run as their own task.
//!
//! Every kind runs under a panic guard: a panic or error becomes a [`FunctionError`] and,
//! on the wire, a 1003 for that request only.
//!
//! Keyword arguments: a function that declares its parameters ([`FunctionSpec::params`],
//! [`FunctionSpec::signature`]) is called as Python would call it — any mix of positional
//! and keyword arguments, defaults, keyword-only parameters, `*args`, `**kwargs` (see
//! [`signature`]); its code then receives one value per parameter, in order. One that
//! declares nothing takes positional arguments only.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::version::Version;

pub mod signature;

pub use signature::{Param, ParamKind, Signature};

/// The arguments of one call, after references were substituted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallArgs {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// When the request stops waiting for this call, if known: code served outside the
    /// node (a worker) is told, so it can stop early.
    pub deadline: Option<Instant>,
}

impl CallArgs {
    /// Positional and keyword arguments, without a deadline.
    pub fn new(args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        CallArgs { args, kwargs, deadline: None }
    }
}

/// A failure inside a function: a kind (`TypeError`, `ValueError`, `Panic`...) and a text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FunctionError {
    /// The kind of failure, shown before the colon.
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl FunctionError {
    /// An error of any kind.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        FunctionError { kind: kind.into(), message: message.into() }
    }

    /// Wrong number or type of arguments.
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::new("TypeError", message)
    }

    /// A bad argument value.
    pub fn value_error(message: impl Into<String>) -> Self {
        Self::new("ValueError", message)
    }

    /// The process serving the function went away before answering (a worker that
    /// disconnected): the call did not fail, it was lost, so it is answered 1005 (or
    /// retried elsewhere), never 1003.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(Self::UNREACHABLE, message)
    }

    /// Whether this is [`Self::unreachable`].
    pub fn is_unreachable(&self) -> bool {
        self.kind == Self::UNREACHABLE
    }

    /// The call's deadline passed before an answer came (a worker that did not answer in
    /// time): a 1004, like the request's own timeout.
    pub fn deadline_passed(message: impl Into<String>) -> Self {
        Self::new(Self::DEADLINE, message)
    }

    /// Whether this is [`Self::deadline_passed`].
    pub fn is_deadline_passed(&self) -> bool {
        self.kind == Self::DEADLINE
    }

    const UNREACHABLE: &'static str = "Unreachable";
    const DEADLINE: &'static str = "DeadlinePassed";
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for FunctionError {}

/// What a function returns.
pub type FunctionResult = Result<Value, FunctionError>;
/// A boxed future of a function's result.
pub type BoxFunctionFuture = Pin<Box<dyn Future<Output = FunctionResult> + Send>>;
type SyncBody = Arc<dyn Fn(CallArgs) -> FunctionResult + Send + Sync>;
type AsyncBody = Arc<dyn Fn(CallArgs) -> BoxFunctionFuture + Send + Sync>;

/// Where a synchronous function runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// In place, on the caller's thread: only for cheap, non-blocking code.
    Inline,
    /// On the blocking thread pool.
    Blocking,
}

#[derive(Clone)]
enum Body {
    Sync(SyncBody, ExecMode),
    Async(AsyncBody),
    /// Served outside the node: the future only waits for an answer, so it is polled in
    /// place instead of spawned (and dropping it abandons the call).
    External(AsyncBody),
}

/// A function's identity and requirements: what the catalog knows about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct FunctionIdentity {
    /// The name commands call (`fun`).
    pub name: String,
    /// A stable id; defaults to the name. One id per name per cluster.
    pub function_id: String,
    /// The version, for `version_constraint` matching.
    pub version: Version,
    /// Resources this function has; a command's `locs` must be a subset.
    pub resources: BTreeSet<String>,
}

/// A registrable function: identity plus code.
#[derive(Clone)]
pub struct FunctionSpec {
    // Shared: a plan clones the spec of every command it resolves.
    identity: Arc<FunctionIdentity>,
    body: Body,
    /// How many arguments typed code takes (`None`: raw code, any number).
    arity: Option<usize>,
    /// Served to this node's own clients only: never advertised, so never forwarded.
    local_only: bool,
    /// Declared parameters, what is wrong with them, and the function's documentation.
    about: Arc<About>,
    /// Results cached for this long (seconds) by default when called on this node.
    cache_ttl: Option<f64>,
    /// Calls this node ran (shared by every clone of the spec).
    stats: Arc<FunctionStats>,
}

/// Calls of one registered function run by this node: successes, errors and the time
/// they took (the function's own run, not the request around it). A few relaxed atomic
/// adds per call; read by `/metrics`.
#[derive(Debug, Default)]
pub struct FunctionStats {
    ok: AtomicU64,
    errors: AtomicU64,
    micros: AtomicU64,
}

/// A reading of [`FunctionStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FunctionCounts {
    /// Calls that returned a value.
    pub ok: u64,
    /// Calls that failed (the function's error, a panic, a bad argument, a lost worker).
    pub errors: u64,
    /// Their summed duration, in microseconds.
    pub micros: u64,
}

impl FunctionStats {
    fn record(&self, outcome: &FunctionResult, started: Instant) {
        let counter = if outcome.is_ok() { &self.ok } else { &self.errors };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> FunctionCounts {
        FunctionCounts {
            ok: self.ok.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            micros: self.micros.load(Ordering::Relaxed),
        }
    }
}

/// What a function says about itself: parameter names and documentation.
#[derive(Debug, Clone, Default)]
struct About {
    signature: Option<Signature>,
    /// Why the declared parameters cannot be used (reported when the function is registered).
    invalid: Option<String>,
    doc: Option<String>,
}

impl fmt::Debug for FunctionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionSpec").field("identity", &self.identity).finish()
    }
}

impl FunctionSpec {
    fn with_body(name: &str, body: Body) -> Self {
        FunctionSpec {
            identity: Arc::new(FunctionIdentity {
                name: name.to_owned(),
                function_id: name.to_owned(),
                version: Version::default(),
                resources: BTreeSet::new(),
            }),
            body,
            arity: None,
            local_only: false,
            about: Arc::default(),
            cache_ttl: None,
            stats: Arc::default(),
        }
    }

    /// The calls this node ran of this function.
    pub fn stats(&self) -> FunctionCounts {
        self.stats.counts()
    }

    /// A synchronous function with typed arguments, run on the blocking pool.
    pub fn sync<Args, F: TypedFn<Args>>(name: &str, f: F) -> Self {
        let fname = name.to_owned();
        let mut spec =
            Self::with_body(name, Body::Sync(Arc::new(move |call| f.call_typed(&fname, call)), ExecMode::Blocking));
        spec.arity = Some(F::ARITY);
        spec
    }

    /// A synchronous function over raw JSON arguments (variadic, keyword arguments).
    pub fn raw(name: &str, f: impl Fn(CallArgs) -> FunctionResult + Send + Sync + 'static) -> Self {
        Self::with_body(name, Body::Sync(Arc::new(f), ExecMode::Blocking))
    }

    /// An async function with typed arguments, run as its own task.
    pub fn asynchronous<Args, F: TypedAsyncFn<Args>>(name: &str, f: F) -> Self {
        let fname = name.to_owned();
        let f = Arc::new(f);
        let mut spec = Self::with_body(name, Body::Async(Arc::new(move |call| f.call_typed(&fname, call))));
        spec.arity = Some(F::ARITY);
        spec
    }

    /// Names the parameters, each taken by position or by name: `.params(["x", "factor"])`
    /// lets a call say `multiply(6, factor=7)`. Typed code must take as many arguments.
    pub fn params<I, S>(self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.declare(Signature::named(names))
    }

    /// Declares the parameters in Python's syntax, with defaults (JSON values, or `None`,
    /// `True`, `False`), keyword-only parameters, `*args` and `**kwargs`:
    /// `.signature("a, b=0, *, c=None")`. The code receives one value per parameter, in
    /// order (`*args` as a list, `**kwargs` as an object); typed code must take as many.
    pub fn signature(self, text: &str) -> Self {
        self.declare(Signature::parse(text))
    }

    fn declare(mut self, signature: Result<Signature, String>) -> Self {
        let about = Arc::make_mut(&mut self.about);
        match signature {
            Ok(signature) => match self.arity {
                Some(arity) if arity != signature.params().len() => {
                    about.invalid = Some(format!(
                        "{}({signature}) names {} parameters, but its code takes {arity}",
                        self.identity.name,
                        signature.params().len()
                    ));
                }
                _ => {
                    about.signature = Some(signature);
                    about.invalid = None;
                }
            },
            Err(e) => about.invalid = Some(format!("{}: {e}", self.identity.name)),
        }
        self
    }

    /// Documentation shown by `rpc_describe` and `rpc_list` (its first line is the summary).
    pub fn doc(mut self, text: &str) -> Self {
        Arc::make_mut(&mut self.about).doc = Some(text.to_owned());
        self
    }

    /// Serve this function to this node's own clients only: it is not advertised in the
    /// catalog, so no other node routes a command to it (the discovery built-ins).
    pub fn local_only(mut self) -> Self {
        self.local_only = true;
        self
    }

    /// Whether it is served to this node's own clients only.
    pub fn is_local_only(&self) -> bool {
        self.local_only
    }

    /// The declared parameters, if any.
    pub fn declared_signature(&self) -> Option<&Signature> {
        self.about.signature.as_ref()
    }

    /// The documentation, if any.
    pub fn documentation(&self) -> Option<&str> {
        self.about.doc.as_deref()
    }

    /// Why the declared parameters cannot be used, if they cannot (checked at registration).
    pub fn declaration_error(&self) -> Option<&str> {
        self.about.invalid.as_deref()
    }

    /// The call with its arguments bound to the declared parameters (one positional value
    /// per parameter), or as given when nothing is declared.
    fn bind(&self, call: CallArgs) -> Result<CallArgs, FunctionError> {
        match &self.about.signature {
            Some(signature) => {
                let deadline = call.deadline;
                Ok(CallArgs { args: signature.bind(&self.identity.name, call)?, kwargs: Map::new(), deadline })
            }
            None => Ok(call),
        }
    }

    /// A function served outside this process (by a worker): `f` sends the call and its
    /// future waits for the answer; it runs in the caller's task.
    pub fn external(
        identity: FunctionIdentity,
        f: impl Fn(CallArgs) -> BoxFunctionFuture + Send + Sync + 'static,
    ) -> Self {
        FunctionSpec { identity: Arc::new(identity), ..Self::with_body("", Body::External(Arc::new(f))) }
    }

    /// Whether a worker (not this process) serves it.
    pub fn is_external(&self) -> bool {
        matches!(self.body, Body::External(_))
    }

    /// Run this (synchronous) function in place instead of on the blocking pool.
    pub fn inline(mut self) -> Self {
        if let Body::Sync(_, mode) = &mut self.body {
            *mode = ExecMode::Inline;
        }
        self
    }

    /// Cache its results for `ttl_s` seconds (key: identity + canonical arguments) when a
    /// command calls it on this node, whether or not the command asks for it. Only for
    /// functions whose result depends on their arguments alone.
    pub fn cacheable(mut self, ttl_s: f64) -> Self {
        self.cache_ttl = Some(ttl_s);
        self
    }

    /// The default TTL of its cached results, when [`Self::cacheable`].
    pub fn cache_ttl(&self) -> Option<f64> {
        self.cache_ttl
    }

    /// Tag the function with resources (`["gpu", "model-a"]`).
    pub fn resources<I, S>(mut self, resources: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Arc::make_mut(&mut self.identity).resources = resources.into_iter().map(Into::into).collect();
        self
    }

    /// Set the function id (defaults to the name).
    pub fn function_id(mut self, id: &str) -> Self {
        Arc::make_mut(&mut self.identity).function_id = id.to_owned();
        self
    }

    /// Set the version (defaults to 1.0.0).
    pub fn version(mut self, version: Version) -> Self {
        Arc::make_mut(&mut self.identity).version = version;
        self
    }

    /// The function's identity.
    pub fn identity(&self) -> &FunctionIdentity {
        &self.identity
    }

    /// Whether calling it completes without leaving the caller's thread.
    pub fn is_inline(&self) -> bool {
        matches!(self.body, Body::Sync(_, ExecMode::Inline))
    }

    /// Runs the function, turning a panic into an error. Inline functions complete in the
    /// first poll.
    pub async fn invoke(&self, call: CallArgs) -> FunctionResult {
        let started = Instant::now();
        let outcome = self.run(call).await;
        self.stats.record(&outcome, started);
        outcome
    }

    async fn run(&self, call: CallArgs) -> FunctionResult {
        let call = self.bind(call)?;
        match &self.body {
            Body::Sync(f, ExecMode::Inline) => run_guarded(f, call),
            Body::Sync(f, ExecMode::Blocking) => {
                let f = f.clone();
                join(tokio::task::spawn_blocking(move || run_guarded(&f, call))).await
            }
            Body::Async(f) => join(tokio::spawn(f(call))).await,
            Body::External(f) => f(call).await,
        }
    }

    /// Runs an inline function now; `None` when it is not inline.
    pub fn invoke_inline(&self, call: CallArgs) -> Option<FunctionResult> {
        match &self.body {
            Body::Sync(f, ExecMode::Inline) => {
                let started = Instant::now();
                let outcome = self.bind(call).and_then(|call| run_guarded(f, call));
                self.stats.record(&outcome, started);
                Some(outcome)
            }
            _ => None,
        }
    }
}

/// Aborts the task when the caller stops waiting (request timeout or failure elsewhere).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn join(handle: tokio::task::JoinHandle<FunctionResult>) -> FunctionResult {
    let mut guard = AbortOnDrop(handle);
    match (&mut guard.0).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(panic_error(e.into_panic())),
        Err(e) => Err(FunctionError::new("Cancelled", e.to_string())),
    }
}

fn run_guarded(f: &SyncBody, call: CallArgs) -> FunctionResult {
    catch_unwind(AssertUnwindSafe(|| f(call))).unwrap_or_else(|payload| Err(panic_error(payload)))
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> FunctionError {
    FunctionError::new("Panic", panic_message(payload.as_ref()))
}

/// The text a panic was raised with (`"panicked"` when it was not a string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_owned())
}

/// The Python-style type names the 1003 details list (`args_types=[int,str]`).
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "None",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// A value a function can return.
pub trait IntoFunctionResult {
    /// Converts to the JSON result or the error.
    fn into_function_result(self) -> FunctionResult;
}

fn to_json<T: Serialize>(value: T) -> FunctionResult {
    serde_json::to_value(value).map_err(|e| FunctionError::new("SerializationError", e.to_string()))
}

impl<T: Serialize, E: Into<FunctionError>> IntoFunctionResult for Result<T, E> {
    fn into_function_result(self) -> FunctionResult {
        self.map_err(Into::into).and_then(to_json)
    }
}

macro_rules! plain_results {
    ($($t:ty),*) => {$(
        impl IntoFunctionResult for $t {
            fn into_function_result(self) -> FunctionResult { to_json(self) }
        }
    )*};
}
plain_results!((), bool, i8, i16, i32, i64, u8, u16, u32, u64, usize, String, &'static str, Value);

/// A float result as JSON. JSON has no infinity or NaN, and serde_json would turn them
/// into `null`, which the next command would silently consume: they fail the call instead.
pub fn float_result(value: f64) -> FunctionResult {
    if value.is_finite() {
        to_json(value)
    } else {
        Err(FunctionError::value_error(format!("result is not a finite number ({value}); JSON cannot carry it")))
    }
}

impl IntoFunctionResult for f64 {
    fn into_function_result(self) -> FunctionResult {
        float_result(self)
    }
}

impl IntoFunctionResult for f32 {
    fn into_function_result(self) -> FunctionResult {
        float_result(f64::from(self))
    }
}

impl<T: Serialize> IntoFunctionResult for Vec<T> {
    fn into_function_result(self) -> FunctionResult {
        to_json(self)
    }
}

impl<T: Serialize> IntoFunctionResult for Option<T> {
    fn into_function_result(self) -> FunctionResult {
        to_json(self)
    }
}

impl<K: Serialize + Ord, V: Serialize> IntoFunctionResult for std::collections::BTreeMap<K, V> {
    fn into_function_result(self) -> FunctionResult {
        to_json(self)
    }
}

/// Wraps any serialisable value as a function result.
pub struct Json<T>(pub T);

impl<T: Serialize> IntoFunctionResult for Json<T> {
    fn into_function_result(self) -> FunctionResult {
        to_json(self.0)
    }
}

/// A synchronous closure with typed positional arguments.
pub trait TypedFn<Args>: Send + Sync + 'static {
    /// How many arguments it takes.
    const ARITY: usize;
    /// Decodes the arguments, calls, encodes the result.
    fn call_typed(&self, fname: &str, call: CallArgs) -> FunctionResult;
}

/// An async closure with typed positional arguments.
pub trait TypedAsyncFn<Args>: Send + Sync + 'static {
    /// How many arguments it takes.
    const ARITY: usize;
    /// Decodes the arguments and starts the call.
    fn call_typed(&self, fname: &str, call: CallArgs) -> BoxFunctionFuture;
}

fn check_arity(fname: &str, call: &CallArgs, expected: usize) -> Result<(), FunctionError> {
    if let Some(key) = call.kwargs.keys().next() {
        return Err(FunctionError::type_error(format!("{fname}() got an unexpected keyword argument '{key}'")));
    }
    if call.args.len() != expected {
        let plural = if expected == 1 { "" } else { "s" };
        return Err(FunctionError::type_error(format!(
            "{fname}() takes {expected} positional argument{plural} but {} were given",
            call.args.len()
        )));
    }
    Ok(())
}

fn decode_arg<T: DeserializeOwned>(fname: &str, index: usize, value: Value) -> Result<T, FunctionError> {
    serde_json::from_value(value)
        .map_err(|e| FunctionError::type_error(format!("{fname}() argument {}: {e}", index + 1)))
}

macro_rules! typed_fn {
    ($n:expr; $($arg:ident),*) => {
        impl<Func, Out, $($arg),*> TypedFn<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Out + Send + Sync + 'static,
            Out: IntoFunctionResult,
            $($arg: DeserializeOwned,)*
        {
            const ARITY: usize = $n;

            #[allow(unused_variables, unused_mut, non_snake_case)]
            fn call_typed(&self, fname: &str, call: CallArgs) -> FunctionResult {
                check_arity(fname, &call, $n)?;
                let mut values = call.args.into_iter().enumerate();
                $(let $arg: $arg = {
                    let (i, v) = values.next().ok_or_else(|| FunctionError::type_error("missing argument"))?;
                    decode_arg(fname, i, v)?
                };)*
                (self)($($arg),*).into_function_result()
            }
        }

        impl<Func, Fut, Out, $($arg),*> TypedAsyncFn<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Out> + Send + 'static,
            Out: IntoFunctionResult,
            $($arg: DeserializeOwned,)*
        {
            const ARITY: usize = $n;

            #[allow(unused_variables, unused_mut, non_snake_case)]
            fn call_typed(&self, fname: &str, call: CallArgs) -> BoxFunctionFuture {
                let decoded = (|| {
                    check_arity(fname, &call, $n)?;
                    let mut values = call.args.into_iter().enumerate();
                    Ok::<_, FunctionError>(($({
                        let (i, v) = values.next().ok_or_else(|| FunctionError::type_error("missing argument"))?;
                        decode_arg::<$arg>(fname, i, v)?
                    },)*))
                })();
                match decoded {
                    Ok(($($arg,)*)) => {
                        let fut = (self)($($arg),*);
                        Box::pin(async move { fut.await.into_function_result() })
                    }
                    Err(e) => Box::pin(async move { Err(e) }),
                }
            }
        }
    };
}

typed_fn!(0;);
typed_fn!(1; A1);
typed_fn!(2; A1, A2);
typed_fn!(3; A1, A2, A3);
typed_fn!(4; A1, A2, A3, A4);
typed_fn!(5; A1, A2, A3, A4, A5);
typed_fn!(6; A1, A2, A3, A4, A5, A6);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(args: Vec<Value>) -> CallArgs {
        CallArgs::new(args, Map::new())
    }

    #[tokio::test]
    async fn typed_closure_decodes_and_checks_arity() {
        let add = FunctionSpec::sync("add", |a: i64, b: i64| a + b);
        assert_eq!(add.invoke(call(vec![json!(20), json!(22)])).await, Ok(json!(42)));
        let err = add.invoke(call(vec![json!(1)])).await.unwrap_err();
        assert_eq!(err.to_string(), "TypeError: add() takes 2 positional arguments but 1 were given");
        let err = add.invoke(call(vec![json!("x"), json!(1)])).await.unwrap_err();
        assert!(err.message.starts_with("add() argument 1: invalid type"), "{err}");
    }

    #[tokio::test]
    async fn declared_parameters_take_keyword_arguments_in_every_mode() {
        let inline = FunctionSpec::sync("multiply", |x: i64, factor: i64| x * factor).inline().params(["x", "factor"]);
        let pooled = FunctionSpec::sync("multiply", |x: i64, factor: i64| x * factor).params(["x", "factor"]);
        let asynchronous = FunctionSpec::asynchronous("multiply", |x: i64, factor: i64| async move { x * factor })
            .params(["x", "factor"]);
        for f in [inline, pooled, asynchronous] {
            let kwargs: Map<String, Value> = [("factor".to_owned(), json!(7))].into_iter().collect();
            assert_eq!(f.invoke(CallArgs::new(vec![json!(6)], kwargs)).await, Ok(json!(42)));
            let kwargs: Map<String, Value> = [("y".to_owned(), json!(7))].into_iter().collect();
            let err = f.invoke(CallArgs::new(vec![json!(6)], kwargs)).await.unwrap_err();
            assert_eq!(err.to_string(), "TypeError: multiply() got an unexpected keyword argument 'y'");
        }
        let kw =
            FunctionSpec::sync("kw", |a: Value, b: Value, c: Value| json!([a, b, c])).signature("a, b=0, *, c=None");
        let kwargs: Map<String, Value> = [("c".to_owned(), json!(3))].into_iter().collect();
        assert_eq!(kw.invoke(CallArgs::new(vec![json!(1)], kwargs)).await, Ok(json!([1, 0, 3])));
    }

    #[test]
    fn declarations_that_do_not_fit_the_code_are_reported() {
        let f = FunctionSpec::sync("add", |a: i64, b: i64| a + b).params(["a"]);
        assert_eq!(f.declaration_error(), Some("add(a) names 1 parameters, but its code takes 2"));
        assert!(f.declared_signature().is_none());
        let f = FunctionSpec::sync("add", |a: i64, b: i64| a + b).signature("a, a");
        assert!(f.declaration_error().is_some_and(|e| e.contains("duplicate")), "{:?}", f.declaration_error());
        let raw = FunctionSpec::raw("any", |call: CallArgs| Ok(Value::Array(call.args))).signature("*args, **kw");
        assert!(raw.declaration_error().is_none());
    }

    #[tokio::test]
    async fn panics_become_errors_in_every_mode() {
        let inline = FunctionSpec::sync("p", |_: i64| -> i64 { panic!("kaboom") }).inline();
        let pooled = FunctionSpec::sync("p", |_: i64| -> i64 { panic!("kaboom") });
        let asynchronous = FunctionSpec::asynchronous("p", |_: i64| async { panic!("kaboom") as i64 });
        for f in [inline, pooled, asynchronous] {
            assert_eq!(f.invoke(call(vec![json!(1)])).await, Err(FunctionError::new("Panic", "kaboom")));
        }
    }

    #[tokio::test]
    async fn every_clone_counts_into_the_same_stats_inline_or_not() {
        let inline = FunctionSpec::sync("half", |x: i64| -> Result<i64, FunctionError> {
            if x % 2 == 0 {
                Ok(x / 2)
            } else {
                Err(FunctionError::value_error("odd"))
            }
        })
        .inline();
        let clone = inline.clone();
        assert_eq!(inline.invoke_inline(call(vec![json!(4)])), Some(Ok(json!(2))));
        assert!(clone.invoke(call(vec![json!(3)])).await.is_err());
        assert!(inline.invoke(call(vec![])).await.is_err(), "a bad argument is an error too");
        let counts = inline.stats();
        assert_eq!((counts.ok, counts.errors), (1, 2));
        assert_eq!(clone.stats(), counts);
        let pooled = FunctionSpec::asynchronous("nap", |x: i64| async move {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            x
        });
        assert_eq!(pooled.invoke(call(vec![json!(1)])).await, Ok(json!(1)));
        assert!(pooled.stats().micros >= 2_000, "{:?}", pooled.stats());
        assert_eq!(FunctionSpec::sync("idle", || 1).stats(), FunctionCounts::default());
    }

    #[tokio::test]
    async fn fallible_functions_report_their_error() {
        let f = FunctionSpec::sync("boom", |x: i64| -> Result<i64, FunctionError> {
            Err(FunctionError::value_error(format!("boom on {x}")))
        });
        assert_eq!(f.invoke(call(vec![json!(3)])).await.unwrap_err().to_string(), "ValueError: boom on 3");
    }

    #[tokio::test]
    async fn non_finite_results_fail_instead_of_becoming_null() {
        let mul = FunctionSpec::sync("mul", |a: f64, b: f64| a * b).inline();
        let err = mul.invoke(call(vec![json!(1e308), json!(10)])).await.unwrap_err();
        assert_eq!(err.kind, "ValueError");
        assert!(err.message.contains("not a finite number (inf)"), "{err}");
        let nan = FunctionSpec::sync("nan", || f32::NAN);
        assert!(nan.invoke(call(vec![])).await.is_err());
        assert_eq!(mul.invoke(call(vec![json!(1.5), json!(2)])).await, Ok(json!(3.0)));
    }

    #[test]
    fn type_names_are_pythons() {
        let names: Vec<_> = [json!(1), json!(1.5), json!("s"), json!([]), json!({}), json!(null), json!(true)]
            .iter()
            .map(type_name)
            .collect();
        assert_eq!(names, ["int", "float", "str", "list", "dict", "None", "bool"]);
    }
}
