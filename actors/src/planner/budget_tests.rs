//! Budget tests: the amplification attacks end with the 1002 naming their bound, after
//! work proportional to the bound; a run paused in place and resumed elsewhere gives the
//! same answer as one run straight through; properties over random amplifying plans.

use std::sync::Arc;

use futures_util::FutureExt;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::tests::request;
use super::*;
use crate::function::{CallArgs, FunctionSpec};
use crate::metrics::Metrics;
use crate::protocol::RpcCommand;
use crate::registry::FunctionTable;

fn table() -> Arc<FunctionTable> {
    let mut table = FunctionTable::default();
    let specs = [
        FunctionSpec::raw("echo", |mut call: CallArgs| Ok(call.args.pop().unwrap_or_default())).inline(),
        FunctionSpec::raw("echos", |call: CallArgs| Ok(Value::Array(call.args))).inline(),
        FunctionSpec::asynchronous("echos_async", |a: Value, b: Value| async move { json!([a, b]) }),
    ];
    for spec in specs {
        table.register(spec).unwrap();
    }
    Arc::new(table)
}

fn plan(cmds: Vec<RpcCommand>) -> Plan {
    Plan::build(request(cmds), Routing::local(table(), "local")).unwrap()
}

/// `c0 = echo("x")`, `c_i = echos(c_{i-1}, c_{i-1})`: the value doubles per command.
fn doubling(levels: usize, fun: &str) -> Vec<RpcCommand> {
    let mut cmds = vec![RpcCommand::new("c0", "echo", vec![json!("x")])];
    for i in 1..=levels {
        let prev = json!(format!("c{}", i - 1));
        cmds.push(RpcCommand::new(format!("c{i}"), fun, vec![prev.clone(), prev]));
    }
    cmds
}

/// `c_i = echos(c_{i-1})`: one level of nesting per command.
fn nesting(levels: usize) -> Vec<RpcCommand> {
    let mut cmds = vec![RpcCommand::new("c0", "echo", vec![json!(1)])];
    for i in 1..=levels {
        cmds.push(RpcCommand::new(format!("c{i}"), "echos", vec![json!(format!("c{}", i - 1))]));
    }
    cmds
}

/// `c_i = echo(c_{i-1})`: a long chain of small values.
fn chain(levels: usize) -> Vec<RpcCommand> {
    let mut cmds = vec![RpcCommand::new("c0", "echo", vec![json!("payload-of-some-length")])];
    for i in 1..=levels {
        cmds.push(RpcCommand::new(format!("c{i}"), "echo", vec![json!(format!("c{}", i - 1))]));
    }
    cmds
}

/// Runs to the end on this thread, with no pausing.
fn run(plan: Plan, options: ReportOptions, limits: Limits, metrics: Option<Arc<Metrics>>) -> Result<Outcome, RpcError> {
    let execution = Execution::new(plan, options, limits, metrics);
    match runtime().block_on(execution.run(&mut NoObserver, Placement::Offloaded)) {
        Step::Finished(result) => result,
        Step::Paused(_) => panic!("an offloaded run paused"),
    }
}

/// Runs in place with `pause_above`, resuming (offloaded, as the Planner does) when paused.
fn run_pausing(
    plan: Plan,
    options: ReportOptions,
    limits: Limits,
    pause_above: u64,
) -> (Result<Outcome, RpcError>, bool) {
    let execution = Execution::new(plan, options, limits, None);
    let rt = runtime();
    match rt.block_on(execution.run(&mut NoObserver, Placement::InPlace { pause_above })) {
        Step::Finished(result) => (result, false),
        Step::Paused(execution) => match rt.block_on(execution.run(&mut NoObserver, Placement::Offloaded)) {
            Step::Finished(result) => (result, true),
            Step::Paused(_) => panic!("an offloaded run paused"),
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn details(result: Result<Outcome, RpcError>) -> String {
    let error = result.expect_err("expected a refusal");
    assert_eq!(error.code, 1002, "{error}");
    error.details_text()
}

// No timing is asserted here (a loaded machine would make it flaky): the unbounded
// versions of these attacks take minutes or all memory, so a lost bound shows as a test
// that never ends; tests/hostile_rpc.rs measures the latency others see meanwhile.

#[test]
fn doubling_stops_at_the_substitution_budget() {
    let metrics = Arc::new(Metrics::default());
    let text =
        details(run(plan(doubling(40, "echos")), ReportOptions::default(), Limits::default(), Some(metrics.clone())));
    assert!(text.contains("max_substitution_bytes (16777216)"), "{text}");
    assert_eq!(metrics.limit_exceeded_count("max_substitution_bytes"), 1);
    // Within the budget, the same shape runs.
    let outcome = run(plan(doubling(10, "echos")), ReportOptions::default(), Limits::default(), None).unwrap();
    // |c0| = 8 (`"x"`, at the floor), |c_i| = 2 |c_{i-1}| + 8.
    assert_eq!(footprint(&outcome.r["c10"]).bytes, 16 * 1024 - 8);
}

#[test]
fn a_big_reply_stops_at_the_reply_budget() {
    let limits = Limits { max_reply_bytes: 100_000, ..Limits::default() };
    let text = details(run(plan(doubling(16, "echos")), ReportOptions::default(), limits, None));
    assert!(text.contains("max_reply_bytes (100000)") && text.contains("command c16"), "{text}");
}

#[test]
fn repeated_intermediate_results_count_toward_the_reply() {
    let options = ReportOptions { intermediate_results: true, ..ReportOptions::default() };
    let text = details(run(plan(chain(4000)), options, Limits::default(), None));
    assert!(text.contains("max_reply_bytes") && text.contains("intermediate result of level"), "{text}");
    // Without intermediate results the chain is small.
    assert!(run(plan(chain(4000)), ReportOptions::default(), Limits::default(), None).is_ok());
}

#[test]
fn deep_nesting_stops_at_the_depth_bound() {
    let text = details(run(plan(nesting(10_000)), ReportOptions::default(), Limits::default(), None));
    assert!(text.contains("result of command c129 is nested 129 deep, over max_value_depth (128)"), "{text}");
}

#[test]
fn an_inline_run_pauses_in_place_and_finishes_elsewhere_with_the_same_answer() {
    let options = ReportOptions { intermediate_results: true, ..ReportOptions::default() };
    let straight = run(plan(doubling(12, "echos")), options, Limits::default(), None).unwrap();
    let (resumed, paused) = run_pausing(plan(doubling(12, "echos")), options, Limits::default(), 1000);
    assert!(paused);
    let resumed = resumed.unwrap();
    assert_eq!(resumed.r, straight.r);
    let levels = |o: &Outcome| o.intermediate_results.iter().map(|r| r["level_results"].clone()).collect::<Vec<_>>();
    assert_eq!(levels(&resumed), levels(&straight));
    // Small runs never pause.
    let (_, paused) = run_pausing(plan(doubling(3, "echos")), ReportOptions::default(), Limits::default(), 1000);
    assert!(!paused);
}

#[test]
fn a_run_waiting_on_tasks_pauses_only_when_nothing_is_running() {
    let (result, paused) =
        run_pausing(plan(doubling(12, "echos_async")), ReportOptions::default(), Limits::default(), 1000);
    assert!(paused);
    assert_eq!(footprint(&result.unwrap().r["c12"]).depth, 12);
}

#[test]
fn paths_that_cannot_be_followed_stay_literal_and_cost_nothing() {
    // `b.c` references `b` (an edge), but 1 has no key `c`: the string stays as it is.
    let cmds = vec![RpcCommand::new("a", "echo", vec![json!("b.c")]), RpcCommand::new("b", "echo", vec![json!(1)])];
    let outcome = execute(plan(cmds), ReportOptions::default(), &mut NoObserver).now_or_never().unwrap().unwrap();
    assert_eq!(outcome.r, json!({"a": "b.c"}));
}

/// A random plan of echo/echos commands referencing earlier ones (possibly several times,
/// possibly through a path), which may amplify.
fn amplifying() -> impl Strategy<Value = Vec<RpcCommand>> {
    let command = (prop::collection::vec((any::<prop::sample::Index>(), 0..3u8), 0..4), any::<bool>());
    (1usize..4, prop::collection::vec(command, 1..14)).prop_map(|(literal, commands)| {
        let mut cmds = vec![RpcCommand::new("c0", "echo", vec![json!({"k": "x".repeat(literal * 8)})])];
        for (i, (refs, wrap)) in commands.into_iter().enumerate() {
            let i = i + 1;
            let args: Vec<Value> = refs
                .iter()
                .map(|(target, how)| {
                    let t = target.index(i);
                    match how {
                        0 => json!(format!("c{t}")),
                        1 => json!([format!("c{t}"), 7]),
                        _ => json!(format!("c{t}.k")),
                    }
                })
                .collect();
            let fun = if wrap { "echos" } else { "echo" };
            let args = if fun == "echo" { vec![Value::Array(args)] } else { args };
            cmds.push(RpcCommand::new(format!("c{i}"), fun, args));
        }
        cmds
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Under any bounds a run either answers within them or fails with a 1002 naming one;
    /// pausing at any threshold changes nothing but where it runs.
    #[test]
    fn bounds_hold_and_pausing_is_invisible(
        cmds in amplifying(),
        reply in 64u64..20_000,
        substitution in 64u64..20_000,
        depth in 1usize..8,
        pause_above in 0u64..5_000,
        intermediate in any::<bool>(),
    ) {
        let limits = Limits { max_reply_bytes: reply, max_substitution_bytes: substitution, max_value_depth: depth };
        let options = ReportOptions { intermediate_results: intermediate, ..ReportOptions::default() };
        let straight = run(plan(cmds.clone()), options, limits, None);
        match &straight {
            Ok(outcome) => {
                let mut size = footprint(&outcome.r).bytes;
                size += outcome.intermediate_results.iter().map(|r| footprint(r).bytes).sum::<u64>();
                // The reports' timestamps and timings are not in the estimate; 256 bytes
                // per report are set aside for them.
                prop_assert!(size <= reply + 64, "reply of {} bytes over {}", size, reply);
                prop_assert!(footprint(&outcome.r).depth <= depth + 1);
                // More room never changes an answer.
                let bigger = Limits { max_reply_bytes: reply * 2, max_substitution_bytes: substitution * 2, max_value_depth: depth + 1 };
                prop_assert_eq!(&run(plan(cmds.clone()), options, bigger, None).unwrap().r, &outcome.r);
            }
            Err(error) => {
                prop_assert_eq!(error.code, 1002);
                prop_assert!(error.details_text().contains("max_"), "{}", error);
            }
        }
        let (paused, _) = run_pausing(plan(cmds), options, limits, pause_above);
        match (&straight, &paused) {
            (Ok(a), Ok(b)) => prop_assert_eq!(&a.r, &b.r),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            _ => prop_assert!(false, "straight {:?} but paused {:?}", straight.is_ok(), paused.is_ok()),
        }
    }
}
