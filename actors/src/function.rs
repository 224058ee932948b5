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

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::version::Version;

/// The arguments of one call, after references were substituted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallArgs {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
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
    /// Results cached for this long (seconds) by default when called on this node.
    cache_ttl: Option<f64>,
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
            cache_ttl: None,
        }
    }

    /// A synchronous function with typed arguments, run on the blocking pool.
    pub fn sync<Args, F: TypedFn<Args>>(name: &str, f: F) -> Self {
        let fname = name.to_owned();
        Self::with_body(name, Body::Sync(Arc::new(move |call| f.call_typed(&fname, call)), ExecMode::Blocking))
    }

    /// A synchronous function over raw JSON arguments (variadic, keyword arguments).
    pub fn raw(name: &str, f: impl Fn(CallArgs) -> FunctionResult + Send + Sync + 'static) -> Self {
        Self::with_body(name, Body::Sync(Arc::new(f), ExecMode::Blocking))
    }

    /// An async function with typed arguments, run as its own task.
    pub fn asynchronous<Args, F: TypedAsyncFn<Args>>(name: &str, f: F) -> Self {
        let fname = name.to_owned();
        let f = Arc::new(f);
        Self::with_body(name, Body::Async(Arc::new(move |call| f.call_typed(&fname, call))))
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
        match &self.body {
            Body::Sync(f, ExecMode::Inline) => run_guarded(f, call),
            Body::Sync(f, ExecMode::Blocking) => {
                let f = f.clone();
                join(tokio::task::spawn_blocking(move || run_guarded(&f, call))).await
            }
            Body::Async(f) => join(tokio::spawn(f(call))).await,
        }
    }

    /// Runs an inline function now; `None` when it is not inline.
    pub fn invoke_inline(&self, call: CallArgs) -> Option<FunctionResult> {
        match &self.body {
            Body::Sync(f, ExecMode::Inline) => Some(run_guarded(f, call)),
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
    /// Decodes the arguments, calls, encodes the result.
    fn call_typed(&self, fname: &str, call: CallArgs) -> FunctionResult;
}

/// An async closure with typed positional arguments.
pub trait TypedAsyncFn<Args>: Send + Sync + 'static {
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
        CallArgs { args, kwargs: Map::new() }
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
    async fn panics_become_errors_in_every_mode() {
        let inline = FunctionSpec::sync("p", |_: i64| -> i64 { panic!("kaboom") }).inline();
        let pooled = FunctionSpec::sync("p", |_: i64| -> i64 { panic!("kaboom") });
        let asynchronous = FunctionSpec::asynchronous("p", |_: i64| async { panic!("kaboom") as i64 });
        for f in [inline, pooled, asynchronous] {
            assert_eq!(f.invoke(call(vec![json!(1)])).await, Err(FunctionError::new("Panic", "kaboom")));
        }
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
