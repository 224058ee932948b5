//! Built-in functions (`echo`, `echos`) and the demo pack used by the examples, the
//! conformance cases and the benchmarks.
//!
//! | function | resources | behaviour |
//! |---|---|---|
//! | `echo(arg)` | — | returns `arg` (built in) |
//! | `echos(*args)` | — | returns its arguments as a list (built in) |
//! | `add(a, b)` | cpu, math | `a + b` |
//! | `multiply(x, factor)` | cpu, math | `x * factor` |
//! | `model_score(x)` | gpu | `{"score": x/100, "model": "demo", "nested": {"deep": [1,2,3]}}` |
//! | `boom(x)` | — | always fails: `ValueError: boom on x` |
//! | `slow(sec)` | — | sleeps `sec` seconds (async, no thread held), returns `sec` |
//! | `ver()` ×3 | — | id `demo.ver`, versions 1.0.0 / 1.5.0 / 2.0.0, returns `"v<version>"` |
//! | `kw(a, b=0, *, c=None)` | — | `{"a": a, "b": b, "c": c}` |
//! | `ident(*args, **kwargs)` | — | `{"args": [...], "kwargs": {...}}` |
//! | `tpu_square(x)` | tpu | `x * x` — not in the `demo` pack, named on its own (routing tests) |

use std::time::Duration;

use mpreg_actors::function::{float_result, CallArgs, FunctionError, FunctionResult, FunctionSpec, IntoFunctionResult};
use mpreg_actors::version::Version;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A JSON number kept as an integer when it is one, so `add(20, 22)` is `42`, not `42.0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Num {
    /// An integer.
    Int(i64),
    /// Anything else.
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn combine(self, other: Num, int: fn(i64, i64) -> Option<i64>, float: fn(f64, f64) -> f64) -> Num {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => int(a, b).map_or_else(|| Num::Float(float(a as f64, b as f64)), Num::Int),
            (a, b) => Num::Float(float(a.as_f64(), b.as_f64())),
        }
    }
}

impl IntoFunctionResult for Num {
    fn into_function_result(self) -> FunctionResult {
        match self {
            Num::Int(i) => Ok(json!(i)),
            // `multiply(1e308, 10)` is infinite: an error naming the command, never a null.
            Num::Float(f) => float_result(f),
        }
    }
}

/// The functions every node has.
pub fn builtins() -> Vec<FunctionSpec> {
    vec![
        // Raw rather than typed: the argument is returned as is, never re-encoded. The
        // declared parameter binds it to exactly one value.
        FunctionSpec::raw("echo", |mut call: CallArgs| Ok(call.args.pop().unwrap_or_default()))
            .inline()
            .params(["arg"])
            .doc("Returns its argument unchanged."),
        FunctionSpec::raw("echos", |mut call: CallArgs| Ok(call.args.pop().unwrap_or_default()))
            .inline()
            .signature("*args")
            .doc("Returns its arguments as a list."),
    ]
}

/// Python's `repr` for the values `boom` reports.
fn repr(value: &Value) -> String {
    match value {
        Value::String(s) => format!("'{s}'"),
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        other => other.to_string(),
    }
}

fn ver(version: Version) -> FunctionSpec {
    let text = format!("v{version}");
    FunctionSpec::sync("ver", move || text.clone())
        .inline()
        .function_id("demo.ver")
        .version(version)
        .params(Vec::<String>::new())
        .doc("Returns its own version as \"v<version>\".")
}

/// `tpu_square(x)`, on `tpu`.
pub fn tpu_square() -> FunctionSpec {
    FunctionSpec::sync("tpu_square", |x: Num| x.combine(x, i64::checked_mul, |a, b| a * b))
        .inline()
        .resources(["tpu"])
        .params(["x"])
        .doc("Returns x * x.")
}

/// The `demo` pack.
pub fn demo_pack() -> Vec<FunctionSpec> {
    vec![
        FunctionSpec::sync("add", |a: Num, b: Num| a.combine(b, i64::checked_add, |a, b| a + b))
            .inline()
            .resources(["cpu", "math"])
            .params(["a", "b"])
            .doc("Returns a + b."),
        FunctionSpec::sync("multiply", |x: Num, factor: Num| x.combine(factor, i64::checked_mul, |a, b| a * b))
            .inline()
            .resources(["cpu", "math"])
            .params(["x", "factor"])
            .doc("Returns x * factor."),
        FunctionSpec::sync(
            "model_score",
            |x: Num| json!({"score": x.as_f64() / 100.0, "model": "demo", "nested": {"deep": [1, 2, 3]}}),
        )
        .inline()
        .resources(["gpu"])
        .params(["x"])
        .doc("Scores x: {\"score\": x/100, \"model\": \"demo\", ...}."),
        FunctionSpec::sync("boom", |x: Value| -> Result<Value, FunctionError> {
            Err(FunctionError::value_error(format!("boom on {}", repr(&x))))
        })
        .inline()
        .params(["x"])
        .doc("Always fails with ValueError: boom on x."),
        FunctionSpec::asynchronous("slow", |sec: Num| async move {
            let wait = sec.as_f64();
            if !(wait.is_finite() && wait >= 0.0) {
                return Err(FunctionError::value_error(format!("sleep length must be non-negative, got {wait}")));
            }
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            Ok::<_, FunctionError>(sec)
        })
        .params(["sec"])
        .doc("Sleeps sec seconds without holding a thread; returns sec."),
        ver(Version::new(1, 0, 0)),
        ver(Version::new(1, 5, 0)),
        ver(Version::new(2, 0, 0)),
        FunctionSpec::sync("kw", |a: Value, b: Value, c: Value| json!({"a": a, "b": b, "c": c}))
            .inline()
            .signature("a, b=0, *, c=None")
            .doc("Returns its parameters as {\"a\": a, \"b\": b, \"c\": c}."),
        FunctionSpec::sync(
            "ident",
            |args: Vec<Value>, kwargs: Map<String, Value>| json!({"args": args, "kwargs": kwargs}),
        )
        .inline()
        .signature("*args, **kwargs")
        .doc("Returns {\"args\": [...], \"kwargs\": {...}} exactly as received."),
    ]
}

/// Resolves `--functions` names: packs (`demo`) or single functions (`tpu_square`, or one
/// of the demo pack's by name).
pub fn by_names(names: &[String]) -> Result<Vec<FunctionSpec>, String> {
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        match name {
            "demo" => out.extend(demo_pack()),
            "tpu_square" => out.push(tpu_square()),
            other => {
                let found: Vec<_> = demo_pack().into_iter().filter(|f| f.identity().name == other).collect();
                if found.is_empty() {
                    return Err(format!(
                        "unknown function or pack `{other}` (known: demo, tpu_square, add, multiply, model_score, boom, slow, ver, kw, ident)"
                    ));
                }
                out.extend(found);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: Value) -> CallArgs {
        CallArgs::new(args.as_array().cloned().unwrap_or_default(), Map::new())
    }

    #[tokio::test]
    async fn arithmetic_keeps_integers() {
        let pack = demo_pack();
        let add = pack.iter().find(|f| f.identity().name == "add").unwrap();
        assert_eq!(add.invoke(call(json!([20, 22]))).await, Ok(json!(42)));
        let mul = pack.iter().find(|f| f.identity().name == "multiply").unwrap();
        assert_eq!(mul.invoke(call(json!([1.5, 1e308]))).await, Ok(json!(1.5e308)));
        assert_eq!(mul.invoke(call(json!([i64::MAX, 2]))).await, Ok(json!(i64::MAX as f64 * 2.0)));
    }

    fn named(name: &str) -> FunctionSpec {
        demo_pack().into_iter().chain(builtins()).find(|f| f.identity().name == name).unwrap()
    }

    #[tokio::test]
    async fn keyword_arguments_bind_by_the_documented_names() {
        let kwargs = |pairs: Value| pairs.as_object().cloned().unwrap_or_default();
        let with = |args: Value, kw: Value| CallArgs::new(args.as_array().cloned().unwrap_or_default(), kwargs(kw));
        assert_eq!(named("multiply").invoke(with(json!([6]), json!({"factor": 7}))).await, Ok(json!(42)));
        assert_eq!(named("add").invoke(with(json!([]), json!({"a": 1, "b": 2}))).await, Ok(json!(3)));
        assert_eq!(named("echo").invoke(with(json!([]), json!({"arg": "v"}))).await, Ok(json!("v")));
        assert_eq!(named("echos").invoke(with(json!([1, 2]), json!({}))).await, Ok(json!([1, 2])));
        assert_eq!(named("kw").invoke(with(json!([1]), json!({"c": 3}))).await, Ok(json!({"a": 1, "b": 0, "c": 3})));
        assert_eq!(
            named("ident").invoke(with(json!([1]), json!({"k": 2}))).await,
            Ok(json!({"args": [1], "kwargs": {"k": 2}}))
        );
        let err = named("echo").invoke(with(json!([1, 2]), json!({}))).await.unwrap_err();
        assert_eq!(err.to_string(), "TypeError: echo() takes 1 positional argument but 2 were given");
        let err = named("add").invoke(with(json!([1]), json!({}))).await.unwrap_err();
        assert_eq!(err.to_string(), "TypeError: add() missing 1 required positional argument: 'b'");
        let err = named("echos").invoke(with(json!([]), json!({"k": 1}))).await.unwrap_err();
        assert_eq!(err.to_string(), "TypeError: echos() got an unexpected keyword argument 'k'");
    }

    #[test]
    fn unknown_names_are_refused() {
        assert!(by_names(&["demo".into(), "tpu_square".into()]).is_ok());
        assert!(by_names(&["nope".into()]).unwrap_err().contains("nope"));
    }
}
