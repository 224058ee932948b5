//! Planner tests: examples of each DESIGN.md §6 rule, then properties over random DAGs.
//!
//! The workhorse is a recording function: it appends what it ran on to a shared log, so a
//! test can check both the values that flowed and the order things ran in.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::function::{CallArgs, FunctionError, FunctionResult, FunctionSpec};
use crate::protocol::{RpcCommand, RpcError, RpcRequest};
use crate::registry::FunctionTable;

/// What the recording functions and observers saw, in order.
type Log = Arc<Mutex<Vec<String>>>;

/// A request of `cmds` with every option off (shared with `budget_tests`).
pub(super) fn request(cmds: Vec<RpcCommand>) -> RpcRequest {
    RpcRequest {
        u: "req-1".to_owned(),
        cmds,
        return_intermediate_results: false,
        intermediate_result_callback_topic: None,
        include_execution_summary: false,
        debug_mode: false,
        timeout: None,
    }
}

fn cmd(name: &str, fun: &str, args: Value) -> RpcCommand {
    let Value::Array(args) = args else { panic!("args must be an array") };
    RpcCommand::new(name, fun, args)
}

fn with_kwargs(mut command: RpcCommand, kwargs: Value) -> RpcCommand {
    let Value::Object(kwargs) = kwargs else { panic!("kwargs must be an object") };
    command.kwargs = kwargs;
    command
}

/// Sets the flag when dropped: shows that a cancelled function's future was dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Lets two blocking calls prove they ran at the same time: each waits (bounded) for the other.
#[derive(Default)]
struct Rendezvous {
    arrived: Mutex<usize>,
    all_here: Condvar,
}

impl Rendezvous {
    fn meet(&self) -> bool {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all_here.notify_all();
        let (_arrived, wait) = self.all_here.wait_timeout_while(arrived, Duration::from_secs(5), |n| *n < 2).unwrap();
        !wait.timed_out()
    }
}

/// Every function the examples use. `record` logs its first argument, a label such as
/// `"@a"` (a bare `"a"` would reference command `a`), and returns all its arguments;
/// `record_pool` does the same on the blocking pool.
struct Fixture {
    table: FunctionTable,
    log: Log,
    cancelled: Arc<AtomicBool>,
}

fn fixture() -> Fixture {
    let log: Log = Arc::default();
    let cancelled = Arc::new(AtomicBool::new(false));
    let rendezvous = Arc::new(Rendezvous::default());
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut table = FunctionTable::default();
    let record = |log: &Log| {
        let log = log.clone();
        move |call: CallArgs| -> FunctionResult {
            let label = call.args.first().and_then(Value::as_str).unwrap_or("?").to_owned();
            log.lock().unwrap().push(label);
            Ok(json!({"args": call.args, "kwargs": call.kwargs}))
        }
    };
    let dropped = cancelled.clone();
    let specs = [
        FunctionSpec::sync("echo", |v: Value| v).inline(),
        FunctionSpec::sync("add", |a: i64, b: i64| a + b),
        FunctionSpec::sync("add_inline", |a: i64, b: i64| a + b).inline(),
        FunctionSpec::sync("text", || "x").inline(),
        FunctionSpec::sync("point", || json!({"a": {"b": 7}, "c": [1, 2]})).inline(),
        FunctionSpec::sync("boom", |x: i64| -> Result<i64, FunctionError> {
            Err(FunctionError::value_error(format!("boom on {x}")))
        }),
        FunctionSpec::asynchronous("sleepy", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        }),
        FunctionSpec::asynchronous("hold", move |ms: u64| {
            let guard = SetOnDrop(dropped.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                drop(guard);
                ms
            }
        }),
        FunctionSpec::sync("meet_pool", move |_: Value| rendezvous.meet()),
        FunctionSpec::asynchronous("meet_async", move |_: Value| {
            let barrier = barrier.clone();
            async move { tokio::time::timeout(Duration::from_secs(5), barrier.wait()).await.is_ok() }
        }),
        FunctionSpec::raw("record", record(&log)).inline(),
        FunctionSpec::raw("record_pool", record(&log)),
        FunctionSpec::raw("kwargs", |call: CallArgs| Ok(Value::Object(call.kwargs))).inline(),
    ];
    for spec in specs {
        table.register(spec).unwrap();
    }
    Fixture { table, log, cancelled }
}

impl Fixture {
    fn build(&self, cmds: Vec<RpcCommand>) -> Result<Plan, RpcError> {
        Plan::build(request(cmds), Routing::local(Arc::new(self.table.clone()), "local"))
    }

    async fn run(&self, cmds: Vec<RpcCommand>) -> Result<Outcome, RpcError> {
        execute(self.build(cmds)?, ReportOptions::default(), &mut NoObserver).await
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn diamond() -> Vec<RpcCommand> {
    vec![
        cmd("a", "echo", json!([1])),
        cmd("b", "add", json!(["a", 10])),
        cmd("c", "add_inline", json!(["a", 100])),
        cmd("d", "add", json!(["b", "c"])),
    ]
}

/// Records every level report, and notes it in the shared log as `level:<index>`.
struct Recorder {
    reports: Vec<Value>,
    log: Log,
}

impl LevelObserver for Recorder {
    async fn level_completed(&mut self, report: &LevelReport) {
        self.log.lock().unwrap().push(format!("level:{}", report["level_index"]));
        self.reports.push(report.clone());
    }
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value.as_object().expect("an object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn diamond_runs_and_returns_only_the_sink() {
    let f = fixture();
    let plan = f.build(diamond()).unwrap();
    assert_eq!(plan.levels(), [0, 1, 1, 2]);
    assert_eq!(plan.level_count(), 3);
    assert_eq!(plan.sinks().collect::<Vec<_>>(), ["d"]);
    let outcome = execute(plan, ReportOptions::default(), &mut NoObserver).await.unwrap();
    assert_eq!(outcome.r, json!({"d": 112}));
    assert!(outcome.intermediate_results.is_empty());
    assert!(outcome.execution_summary.is_none());
}

#[tokio::test]
async fn every_independent_command_is_a_sink() {
    let f = fixture();
    let outcome = f.run(vec![cmd("x", "echo", json!(["hi"])), cmd("y", "add", json!([1, 2]))]).await.unwrap();
    assert_eq!(outcome.r, json!({"x": "hi", "y": 3}));
}

#[tokio::test]
async fn references_inside_arrays_and_object_values_are_substituted_but_keys_are_not() {
    let f = fixture();
    let cmds =
        vec![cmd("p", "point", json!([])), cmd("n", "echo", json!([[["p", {"k": ["p.a.b"]}], {"p": "literal"}]]))];
    let plan = f.build(cmds.clone()).unwrap();
    assert_eq!(plan.levels(), [0, 1]);
    let outcome = f.run(cmds).await.unwrap();
    let point = json!({"a": {"b": 7}, "c": [1, 2]});
    assert_eq!(outcome.r, json!({"n": [[point, {"k": [7]}], {"p": "literal"}]}));
}

#[tokio::test]
async fn an_object_key_naming_a_command_is_no_reference() {
    let f = fixture();
    let cmds = vec![cmd("a", "echo", json!([1])), cmd("k", "echo", json!([{"a": 2}]))];
    let plan = f.build(cmds.clone()).unwrap();
    assert_eq!(plan.levels(), [0, 0]);
    let outcome = f.run(cmds).await.unwrap();
    assert_eq!(outcome.r, json!({"a": 1, "k": {"a": 2}}));
}

#[tokio::test]
async fn dotted_paths_follow_object_keys_and_unresolvable_ones_pass_through_literally() {
    let f = fixture();
    let probes = json!([
        "p.a.b", // followed: 7
        "p.a",   // followed: {"b": 7}
        "p",     // the whole result
        "p.missing",
        "p.c.0",   // arrays are not indexed
        "p.a.b.c", // 7 has no keys
        "q.x",     // q is no command
        "3.14",
        "p."
    ]);
    let cmds = vec![cmd("p", "point", json!([])), cmd("n", "echo", json!([probes]))];
    let plan = f.build(cmds.clone()).unwrap();
    assert_eq!(plan.levels(), [0, 1], "a dotted path references its base command");
    let outcome = f.run(cmds).await.unwrap();
    assert_eq!(
        outcome.r["n"],
        json!([7, {"b": 7}, {"a": {"b": 7}, "c": [1, 2]}, "p.missing", "p.c.0", "p.a.b.c", "q.x", "3.14", "p."])
    );
}

/// Reference captures `e10` and `e11`: a reference may name a later-listed command; a
/// command name containing a dot is read as `base.path`, so it is passed literally.
#[tokio::test]
async fn reference_cases_later_listed_and_dotted_names() {
    let f = fixture();
    let later = vec![cmd("b", "echo", json!(["a"])), cmd("a", "echo", json!(["A"]))];
    assert_eq!(f.run(later).await.unwrap().r, json!({"b": "A"}));
    let dotted = vec![cmd("x.y", "echo", json!([1])), cmd("b", "echo", json!(["x.y"]))];
    assert_eq!(f.run(dotted).await.unwrap().r, json!({"b": "x.y"}));
}

#[tokio::test]
async fn kwargs_references_create_edges_and_are_substituted() {
    let f = fixture();
    // The dependant is listed first: only the edge can make `a` run before it.
    let cmds = vec![
        with_kwargs(cmd("b", "record", json!(["@b"])), json!({"x": "a", "y": {"deep": ["a.args"]}, "a": 0})),
        cmd("a", "record", json!(["@a"])),
    ];
    let plan = f.build(cmds.clone()).unwrap();
    assert_eq!(plan.levels(), [1, 0]);
    assert_eq!(plan.sinks().collect::<Vec<_>>(), ["b"]);
    let outcome = f.run(cmds).await.unwrap();
    assert_eq!(f.log(), ["@a", "@b"]);
    let a = json!({"args": ["@a"], "kwargs": {}});
    assert_eq!(outcome.r, json!({"b": {"args": ["@b"], "kwargs": {"x": a, "y": {"deep": [["@a"]]}, "a": 0}}}));
}

#[tokio::test]
async fn kwargs_only_function_receives_substituted_values() {
    let f = fixture();
    let cmds = vec![cmd("a", "add", json!([2, 3])), with_kwargs(cmd("k", "kwargs", json!([])), json!({"sum": "a"}))];
    assert_eq!(f.run(cmds).await.unwrap().r, json!({"k": {"sum": 5}}));
}

#[tokio::test]
async fn ready_commands_start_in_listing_order() {
    let f = fixture();
    let cmds = vec![
        cmd("c", "record", json!(["@c"])),
        cmd("z", "record", json!(["@z", "c", "a"])),
        cmd("a", "record", json!(["@a"])),
        cmd("y", "record", json!(["@y", "c"])),
        cmd("b", "record", json!(["@b"])),
    ];
    f.run(cmds).await.unwrap();
    // c, a, b are ready at once and start in listing order; y (ready when c is done) and
    // z (when a is) queue behind them.
    assert_eq!(f.log(), ["@c", "@a", "@b", "@y", "@z"]);
}

#[tokio::test]
async fn pool_and_async_commands_of_one_level_run_concurrently() {
    let f = fixture();
    // Each call waits (up to 5 s) for its twin: false means they ran one after the other.
    let cmds = vec![
        cmd("p1", "meet_pool", json!([1])),
        cmd("p2", "meet_pool", json!([2])),
        cmd("a1", "meet_async", json!([1])),
        cmd("a2", "meet_async", json!([2])),
    ];
    assert_eq!(f.run(cmds).await.unwrap().r, json!({"p1": true, "p2": true, "a1": true, "a2": true}));
}

#[tokio::test]
async fn duplicate_names_are_invalid() {
    let f = fixture();
    let err = f.build(vec![cmd("a", "echo", json!([1])), cmd("a", "echo", json!([2]))]).unwrap_err();
    assert_eq!(err.code, 1002);
    assert_eq!(err.message, "Invalid request");
    assert_eq!(err.details_text(), "duplicate command name: a");
}

#[test]
fn cycles_are_invalid_and_named_in_data_flow_order() {
    let f = fixture();
    let cases = [
        (vec![cmd("a", "echo", json!(["b"])), cmd("b", "echo", json!(["a"]))], "a -> b -> a"),
        (vec![cmd("a", "echo", json!(["a"]))], "a -> a"),
        (vec![cmd("a", "echo", json!([["a.x"]]))], "a -> a"),
        // a uses c, b uses a, c uses b: data flows a -> b -> c -> a.
        (
            vec![cmd("a", "echo", json!(["c"])), cmd("b", "echo", json!(["a"])), cmd("c", "echo", json!(["b"]))],
            "a -> b -> c -> a",
        ),
        // A cycle through kwargs, behind a command that only waits on it.
        (
            vec![
                cmd("w", "echo", json!(["a"])),
                with_kwargs(cmd("a", "kwargs", json!([])), json!({"v": "b"})),
                with_kwargs(cmd("b", "kwargs", json!([])), json!({"v": {"x": "a.y"}})),
            ],
            "a -> b -> a",
        ),
    ];
    for (cmds, cycle) in cases {
        let err = f.build(cmds).unwrap_err();
        assert_eq!(err.code, 1002, "{err}");
        assert_eq!(err.details_text(), format!("dependency cycle: {cycle}"));
    }
}

#[test]
fn an_unparsable_version_constraint_is_invalid_not_not_found() {
    let f = fixture();
    let mut c = cmd("a", "echo", json!([1]));
    c.version_constraint = Some("~1.2".to_owned());
    let err = f.build(vec![c.clone()]).unwrap_err();
    assert_eq!(err.code, 1002);
    assert_eq!(err.details_text(), "invalid version constraint: ~1.2");
    // A constraint that parses but matches nothing is a 1001.
    c.version_constraint = Some(">=2".to_owned());
    assert_eq!(f.build(vec![c]).unwrap_err().code, 1001);
}

#[test]
fn an_unknown_function_fails_the_plan_before_anything_runs() {
    let f = fixture();
    let err = f.build(vec![cmd("a", "record", json!(["@a"])), cmd("b", "f", json!([]))]).unwrap_err();
    assert_eq!(err.code, 1001);
    assert_eq!(err.message, "Command not found");
    assert_eq!(err.details_text(), "Command not found: f");
    assert!(f.log().is_empty());
}

#[tokio::test]
async fn empty_cmds_give_an_empty_r() {
    let f = fixture();
    let plan = f.build(vec![]).unwrap();
    assert_eq!(plan.level_count(), 0);
    let options = ReportOptions { intermediate_results: true, observe_levels: true, execution_summary: true };
    let outcome = execute(plan, options, &mut NoObserver).await.unwrap();
    assert_eq!(outcome.r, json!({}));
    assert!(outcome.intermediate_results.is_empty());
    let summary = outcome.execution_summary.unwrap();
    assert_eq!(summary["total_levels"], 0);
    assert_eq!(summary["level_execution_times"], json!([]));
    assert_eq!(summary["parallel_commands_executed"], 0);
}

#[tokio::test]
async fn a_failure_mid_chain_fails_the_request_and_its_dependant_never_runs() {
    let f = fixture();
    let cmds = vec![
        cmd("start", "record", json!(["@start"])),
        cmd("a", "boom", json!([1])),
        cmd("b", "record", json!(["@b", "a", "start"])),
    ];
    let err = f.run(cmds).await.unwrap_err();
    assert_eq!(err.code, 1003);
    assert_eq!(err.message, "RPC execution failed");
    assert_eq!(
        err.details_text(),
        "Function execution failed: command=a fun=boom error=ValueError: boom on 1 args_types=[int]"
    );
    assert_eq!(f.log(), ["@start"]);
}

#[tokio::test]
async fn argument_types_are_reported_after_substitution() {
    let f = fixture();
    let err = f.run(vec![cmd("t", "text", json!([])), cmd("b", "add", json!(["t", 1]))]).await.unwrap_err();
    assert_eq!(err.code, 1003);
    let details = err.details_text();
    assert!(
        details.starts_with("Function execution failed: command=b fun=add error=TypeError: add() argument 1"),
        "{details}"
    );
    assert!(details.ends_with(" args_types=[str,int]"), "{details}");
}

#[tokio::test]
async fn a_failure_cancels_commands_still_running() {
    let f = fixture();
    let cmds = vec![cmd("slow", "hold", json!([60_000])), cmd("a", "boom", json!([1]))];
    let err = tokio::time::timeout(Duration::from_secs(10), f.run(cmds)).await.expect("the failure ends the request");
    assert_eq!(err.unwrap_err().code, 1003);
    // The slow command's future is dropped (its task aborted), not left running.
    for _ in 0..500 {
        if f.cancelled.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the running command was not cancelled");
}

#[tokio::test]
async fn intermediate_results_have_one_entry_per_level_in_the_reference_shape() {
    let f = fixture();
    let options = ReportOptions { intermediate_results: true, ..ReportOptions::default() };
    let plan = f.build(diamond()).unwrap();
    let outcome = execute(plan, options, &mut NoObserver).await.unwrap();
    let reports = &outcome.intermediate_results;
    assert_eq!(reports.len(), 3);
    let expected_level = [json!({"a": 1}), json!({"b": 11, "c": 101}), json!({"d": 112})];
    let expected_accumulated =
        [json!({"a": 1}), json!({"a": 1, "b": 11, "c": 101}), json!({"a": 1, "b": 11, "c": 101, "d": 112})];
    for (k, report) in reports.iter().enumerate() {
        assert_eq!(
            keys(report),
            [
                "accumulated_results",
                "completed_levels",
                "execution_time_ms",
                "level_index",
                "level_results",
                "request_id",
                "timestamp",
                "total_levels"
            ]
        );
        assert_eq!(report["request_id"], "req-1");
        assert_eq!(report["level_index"], k);
        assert_eq!(report["completed_levels"], k + 1);
        assert_eq!(report["total_levels"], 3);
        assert_eq!(report["level_results"], expected_level[k]);
        assert_eq!(report["accumulated_results"], expected_accumulated[k]);
        assert!(report["timestamp"].as_f64().unwrap() > 1.0e9);
        assert!(report["execution_time_ms"].as_f64().unwrap() >= 0.0);
    }
}

#[tokio::test]
async fn observed_levels_arrive_in_order_as_each_level_completes() {
    let f = fixture();
    let cmds = vec![
        cmd("c", "record_pool", json!(["@c", "b"])),
        cmd("b", "record_pool", json!(["@b", "a"])),
        cmd("a", "record_pool", json!(["@a"])),
    ];
    let mut observer = Recorder { reports: Vec::new(), log: f.log.clone() };
    // Observed but not returned.
    let options = ReportOptions { observe_levels: true, ..ReportOptions::default() };
    let outcome = execute(f.build(cmds).unwrap(), options, &mut observer).await.unwrap();
    assert!(outcome.intermediate_results.is_empty());
    assert_eq!(f.log(), ["@a", "level:0", "@b", "level:1", "@c", "level:2"]);
    let levels: Vec<&Value> = observer.reports.iter().map(|r| &r["level_index"]).collect();
    assert_eq!(levels, [0, 1, 2]);
}

#[tokio::test]
async fn a_later_level_finishing_first_is_still_reported_after_the_earlier_one() {
    let f = fixture();
    // `fast` (level 1) completes long before `slow` (level 0) does.
    let cmds = vec![
        cmd("slow", "sleepy", json!([30])),
        cmd("quick", "echo", json!([1])),
        cmd("fast", "echo", json!(["quick"])),
    ];
    let mut observer = Recorder { reports: Vec::new(), log: f.log.clone() };
    let options = ReportOptions { intermediate_results: true, observe_levels: true, ..ReportOptions::default() };
    let outcome = execute(f.build(cmds).unwrap(), options, &mut observer).await.unwrap();
    assert_eq!(f.log(), ["level:0", "level:1"]);
    assert_eq!(observer.reports, outcome.intermediate_results);
    assert_eq!(outcome.intermediate_results[0]["level_results"], json!({"slow": 30, "quick": 1}));
    assert_eq!(outcome.intermediate_results[1]["accumulated_results"], json!({"slow": 30, "quick": 1, "fast": 1}));
}

#[tokio::test]
async fn execution_summary_times_each_level() {
    let f = fixture();
    let cmds = vec![
        cmd("a", "echo", json!([30])),
        cmd("b", "sleepy", json!(["a"])),
        cmd("c", "echo", json!(["b"])),
        cmd("d", "echo", json!(["a"])),
    ];
    let options = ReportOptions { execution_summary: true, ..ReportOptions::default() };
    let outcome = execute(f.build(cmds).unwrap(), options, &mut NoObserver).await.unwrap();
    assert_eq!(outcome.r, json!({"c": 30, "d": 30}));
    assert!(outcome.intermediate_results.is_empty());
    let summary = outcome.execution_summary.unwrap();
    assert_eq!(
        keys(&summary),
        [
            "average_level_time_ms",
            "bottleneck_level_index",
            "cross_cluster_hops",
            "level_execution_times",
            "parallel_commands_executed",
            "request_id",
            "total_execution_time_ms",
            "total_levels"
        ]
    );
    assert_eq!(summary["request_id"], "req-1");
    assert_eq!(summary["total_levels"], 3);
    assert_eq!(summary["parallel_commands_executed"], 4);
    assert_eq!(summary["cross_cluster_hops"], 0);
    let times: Vec<f64> =
        summary["level_execution_times"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert_eq!(times.len(), 3);
    // Level 1 holds the 30 ms sleep; the others are inline echoes.
    assert_eq!(summary["bottleneck_level_index"], 1);
    assert!(times[1] >= 30.0, "{times:?}");
    let average = summary["average_level_time_ms"].as_f64().unwrap();
    assert!((average - times.iter().sum::<f64>() / 3.0).abs() < 1e-9);
    let total = summary["total_execution_time_ms"].as_f64().unwrap();
    assert!(total >= times.iter().sum::<f64>() - 1e-9, "total {total} < sum of {times:?}");
}

// ---- Properties over random DAGs ----

/// A random DAG: command `c{i}` references a subset of `c{j}`, `j < i`; `order` is the
/// listing order (a permutation), so a reference may point to a later-listed command.
#[derive(Debug, Clone)]
struct Dag {
    deps: Vec<BTreeSet<usize>>,
    /// How each reference is written: 0 `"cj"`, 1 `{"v": "cj"}`, 2 `["cj"]`.
    shapes: Vec<Vec<u8>>,
    /// Which recording function each command calls.
    modes: Vec<u8>,
    order: Vec<usize>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (1usize..12).prop_flat_map(|n| {
        let edges = proptest::collection::vec(proptest::collection::vec(prop::bool::weighted(0.35), n), n);
        let shapes = proptest::collection::vec(proptest::collection::vec(0u8..3, n), n);
        let modes = proptest::collection::vec(0u8..3, n);
        let order = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
        (edges, shapes, modes, order).prop_map(|(edges, shapes, modes, order)| Dag {
            deps: edges.iter().enumerate().map(|(i, row)| (0..i).filter(|&j| row[j]).collect()).collect(),
            shapes,
            modes,
            order,
        })
    })
}

fn name(i: usize) -> String {
    format!("c{i}")
}

/// What the recording function of `c{i}` logs and returns as its name.
fn label(i: usize) -> String {
    format!("@c{i}")
}

const RECORDERS: [&str; 3] = ["rec_inline", "rec_pool", "rec_async"];

/// What a recording function logs: its own name and the names of the results it got.
type DagLog = Arc<Mutex<Vec<(String, BTreeSet<String>)>>>;

/// Each recorder takes `[label, ref...]`, logs the label and the names of the results it
/// received, and returns `{name, inputs, paths}` where `paths` counts the paths from
/// sources to it (1 + the inputs' paths), so a wrong input changes the value.
fn recording(items: Vec<Value>, log: &DagLog) -> Value {
    let mut items = items.into_iter();
    let label = items.next().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let inputs: Vec<Value> = items
        .map(|item| match item {
            Value::Object(mut wrapper) if wrapper.contains_key("v") => wrapper.remove("v").unwrap_or(Value::Null),
            Value::Array(mut wrapper) if wrapper.len() == 1 => wrapper.remove(0),
            other => other,
        })
        .collect();
    let names: BTreeSet<String> = inputs.iter().map(|v| v["name"].as_str().unwrap_or("?").to_owned()).collect();
    let paths = 1 + inputs.iter().map(|v| v["paths"].as_u64().unwrap_or(1_000_000)).sum::<u64>();
    log.lock().unwrap().push((label.clone(), names.clone()));
    json!({"name": label, "inputs": names, "paths": paths})
}

fn dag_table(log: &DagLog) -> FunctionTable {
    let mut table = FunctionTable::default();
    let l = log.clone();
    table.register(FunctionSpec::sync("rec_inline", move |items: Vec<Value>| recording(items, &l)).inline()).unwrap();
    let l = log.clone();
    table.register(FunctionSpec::sync("rec_pool", move |items: Vec<Value>| recording(items, &l))).unwrap();
    let l = log.clone();
    table
        .register(FunctionSpec::asynchronous("rec_async", move |items: Vec<Value>| {
            let l = l.clone();
            async move {
                tokio::task::yield_now().await;
                let value = recording(items, &l);
                tokio::task::yield_now().await;
                value
            }
        }))
        .unwrap();
    table
}

fn reference(j: usize, shape: u8) -> Value {
    match shape {
        0 => Value::String(name(j)),
        1 => json!({"v": name(j)}),
        _ => json!([name(j)]),
    }
}

/// The request for `dag`, listed in `dag.order`, with `extra[i]` references added to `c{i}`.
fn dag_commands(dag: &Dag, extra: &HashMap<usize, Vec<usize>>) -> Vec<RpcCommand> {
    dag.order
        .iter()
        .map(|&i| {
            // The label is tagged: the bare name inside the argument would be a self reference.
            let mut items = vec![Value::String(label(i))];
            items.extend(dag.deps[i].iter().map(|&j| reference(j, dag.shapes[i][j])));
            items.extend(extra.get(&i).into_iter().flatten().map(|&j| reference(j, 0)));
            RpcCommand::new(name(i), RECORDERS[dag.modes[i] as usize], vec![Value::Array(items)])
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Longest-path level of each command, in construction order.
fn expected_levels(deps: &[BTreeSet<usize>]) -> Vec<usize> {
    let mut levels: Vec<usize> = Vec::with_capacity(deps.len());
    for ds in deps {
        let level = ds.iter().map(|&j| levels[j] + 1).max().unwrap_or(0);
        levels.push(level);
    }
    levels
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the DAG and listing order: every command runs once, after its
    /// dependencies, on their results; `r` holds exactly the sinks with the right values.
    #[test]
    fn random_dags_run_correctly(dag in dag()) {
        let n = dag.deps.len();
        let log: DagLog = Arc::default();
        let table = dag_table(&log);
        let plan = Plan::build(request(dag_commands(&dag, &HashMap::new())), Routing::local(Arc::new(table.clone()), "local")).unwrap();

        let levels = expected_levels(&dag.deps);
        let listed_levels: Vec<usize> = dag.order.iter().map(|&i| levels[i]).collect();
        prop_assert_eq!(plan.levels(), &listed_levels[..]);
        prop_assert_eq!(plan.level_count(), levels.iter().max().unwrap() + 1);
        let referenced: BTreeSet<usize> = dag.deps.iter().flatten().copied().collect();
        let sinks: BTreeSet<String> = (0..n).filter(|i| !referenced.contains(i)).map(name).collect();
        prop_assert_eq!(&plan.sinks().map(str::to_owned).collect::<BTreeSet<_>>(), &sinks);

        let options = ReportOptions { intermediate_results: true, ..ReportOptions::default() };
        let outcome = runtime().block_on(execute(plan, options, &mut NoObserver)).unwrap();

        // Every command ran exactly once, after all its dependencies, on their results.
        let log = log.lock().unwrap().clone();
        prop_assert_eq!(log.len(), n);
        let position: HashMap<&str, usize> = log.iter().enumerate().map(|(p, (label, _))| (label.as_str(), p)).collect();
        prop_assert_eq!(position.len(), n, "a command ran twice: {:?}", log);
        for i in 0..n {
            let at = position[label(i).as_str()];
            let received: BTreeSet<String> = dag.deps[i].iter().map(|&j| label(j)).collect();
            prop_assert_eq!(&log[at].1, &received, "inputs of {}", name(i));
            for &j in &dag.deps[i] {
                prop_assert!(position[label(j).as_str()] < at, "{} ran before its dependency {}", name(i), name(j));
            }
        }

        // r: exactly the sinks, with values recomputed from the DAG.
        let mut paths = vec![0u64; n];
        for i in 0..n {
            paths[i] = 1 + dag.deps[i].iter().map(|&j| paths[j]).sum::<u64>();
        }
        let expected: Map<String, Value> = (0..n)
            .filter(|i| !referenced.contains(i))
            .map(|i| {
                let inputs: BTreeSet<String> = dag.deps[i].iter().map(|&j| label(j)).collect();
                (name(i), json!({"name": label(i), "inputs": inputs, "paths": paths[i]}))
            })
            .collect();
        prop_assert_eq!(&outcome.r, &Value::Object(expected));

        // One report per level, in order, each level holding exactly its commands.
        prop_assert_eq!(outcome.intermediate_results.len(), levels.iter().max().unwrap() + 1);
        for (k, report) in outcome.intermediate_results.iter().enumerate() {
            prop_assert_eq!(&report["level_index"], &json!(k));
            let at_level: BTreeSet<String> = (0..n).filter(|&i| levels[i] == k).map(name).collect();
            let got: BTreeSet<String> = report["level_results"].as_object().unwrap().keys().cloned().collect();
            prop_assert_eq!(got, at_level);
        }
    }

    /// Closing a cycle (a back edge from `x` to something that depends on it, or a self
    /// reference) fails the plan with a 1002 naming a real cycle.
    #[test]
    fn a_back_edge_is_a_cycle(dag in dag(), pick in any::<(prop::sample::Index, prop::sample::Index)>()) {
        let n = dag.deps.len();
        let (a, b) = (pick.0.index(n), pick.1.index(n));
        let (x, y) = (a.min(b), a.max(b));
        let mut dag = dag;
        let mut extra: HashMap<usize, Vec<usize>> = HashMap::new();
        if x != y {
            dag.deps[y].insert(x); // y uses x ...
        }
        extra.entry(x).or_default().push(y); // ... and x uses y (or itself).
        let table = dag_table(&Arc::default());
        let err = Plan::build(request(dag_commands(&dag, &extra)), Routing::local(Arc::new(table.clone()), "local")).unwrap_err();
        prop_assert_eq!(err.code, 1002);
        let details = err.details_text();
        let cycle = details.strip_prefix("dependency cycle: ");
        prop_assert!(cycle.is_some(), "{}", details);
        let names: Vec<&str> = cycle.unwrap_or_default().split(" -> ").collect();
        prop_assert!(names.len() >= 2 && names.first() == names.last(), "{}", details);
        let distinct: BTreeSet<&str> = names[1..].iter().copied().collect();
        prop_assert_eq!(distinct.len(), names.len() - 1, "{}", details);
        // Each arrow is a real edge: the right-hand command uses the left-hand one.
        let index = |s: &str| s.strip_prefix('c').and_then(|i| i.parse::<usize>().ok()).unwrap();
        for pair in names.windows(2) {
            let (from, to) = (index(pair[0]), index(pair[1]));
            let uses = dag.deps[to].contains(&from) || extra.get(&to).is_some_and(|e| e.contains(&from));
            prop_assert!(uses, "{} does not use {} in {}", pair[1], pair[0], details);
        }
    }
}

/// The labels the DAG tests use never collide with command names.
#[test]
fn dag_labels_are_not_references() {
    let dag = Dag { deps: vec![BTreeSet::new()], shapes: vec![vec![0]], modes: vec![0], order: vec![0] };
    let cmds = dag_commands(&dag, &HashMap::new());
    assert_eq!(cmds[0].args, [json!(["@c0"])]);
}
