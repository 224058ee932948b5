//! Conformance test: replays every single-node case of `tests/data/rpc_cases.json`
//! (copied from the shared conformance data, `../shared/conformance/rpc_cases.json`;
//! rules in ../shared/conformance/README.md) against the real `mpreg` binary over a real
//! websocket.
//!
//! One server process serves all cases. Each case has its own connection, so cases run
//! concurrently (the 30 s whole-request timeout case dominates the wall time), except
//! the cases that touch pub/sub: those could see each other's publishes and backlog,
//! so they run one after another in a single task (concurrently with the rest, which
//! never publish). Cases with `"topology": "two-node"` run in their own test against
//! node A joined by node B (`servers.B`: `ref-B`, serving `tpu_square`).
//!
//! Run: `cargo test --test conformance -- --nocapture` (one `ok - ` / `FAIL - ` line per
//! case on stderr).

#[path = "common/conformance_replay.rs"]
mod replay;

use std::time::Duration;

use serde_json::Value;

/// Arguments for node A of the data file (`servers.A`).
const NODE_A_ARGS: &[&str] = &[
    "server",
    "start",
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--monitoring-port",
    "0",
    "--name",
    "ref-A",
    "--cluster-id",
    "default-cluster",
    "--functions",
    "demo",
];

const EXPECTED_CASES: usize = 92;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Cases with their index in the file.
type Indexed = Vec<(usize, Value)>;

/// The single-node cases split into (run concurrently, run one after another in this
/// order), each with its index in the file.
fn plan(cases: &[Value]) -> (Indexed, Indexed) {
    let (isolated, concurrent): (Vec<_>, Vec<_>) = cases
        .iter()
        .cloned()
        .enumerate()
        .filter(|(_, c)| replay::is_single_node(c))
        .partition(|(_, c)| replay::needs_isolation(c));
    (concurrent, replay::isolated_run_order(isolated))
}

/// The two-node cases, each with its index in the file.
fn two_node_plan(cases: &[Value]) -> Indexed {
    cases.iter().cloned().enumerate().filter(|(_, c)| replay::topology(c) == Some("two-node")).collect()
}

/// Arguments for node B of the data file (`servers.B`), joined to node A at `peer`.
fn node_b_args(peer: &str) -> Vec<String> {
    let args = [
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--monitoring-port",
        "0",
        "--name",
        "ref-B",
        "--cluster-id",
        "default-cluster",
        "--functions",
        "tpu_square",
        "--peer",
        peer,
    ];
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// One case with an outer safety timeout; the result is `(file index, name, outcome)`.
async fn run_one(url: String, idx: usize, case: Value) -> (usize, String, Result<(), String>) {
    let name = replay::case_name(&case).to_string();
    let budget = replay::case_budget(&case);
    let started = std::time::Instant::now();
    let outcome = match tokio::time::timeout(budget, replay::replay_case(&url, &case)).await {
        Ok(r) => r,
        Err(_) => Err(format!("case did not finish within {budget:?}")),
    };
    let outcome = outcome.map_err(|e| format!("{e}\n    (after {:.1?})", started.elapsed()));
    (idx, name, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_conformance_cases() {
    let cases = replay::load_cases();
    let (concurrent, isolated) = plan(&cases);

    let server = tokio::task::spawn_blocking(|| {
        replay::ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), NODE_A_ARGS, READY_TIMEOUT)
    })
    .await
    .expect("server start task")
    .unwrap_or_else(|e| panic!("could not start node A: {e}"));
    eprintln!("node A (pid {}) listening at {}", server.pid(), server.url);

    let started = std::time::Instant::now();
    // Longest cases first, so they are not queued behind the quick ones.
    let mut concurrent = concurrent;
    concurrent.sort_by_key(|(_, case)| std::cmp::Reverse(replay::case_budget(case)));

    let mut tasks = Vec::new();
    let mut names_by_task = Vec::new();
    {
        let url = server.url.clone();
        names_by_task.push(format!("the sequential pub/sub cases ({} of them)", isolated.len()));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (idx, case) in isolated {
                out.push(run_one(url.clone(), idx, case).await);
            }
            out
        }));
    }
    for (idx, case) in concurrent {
        let url = server.url.clone();
        names_by_task.push(replay::case_name(&case).to_string());
        tasks.push(tokio::spawn(async move { vec![run_one(url, idx, case).await] }));
    }

    let mut results = Vec::new();
    for (task, what) in tasks.into_iter().zip(names_by_task) {
        match task.await {
            Ok(r) => results.extend(r),
            Err(e) => results.push((usize::MAX, what, Err(format!("replay task panicked: {e}")))),
        }
    }
    results.sort_by_key(|r| r.0);

    let mut failures = Vec::new();
    for (_, name, outcome) in &results {
        match outcome {
            Ok(()) => eprintln!("ok - {name}"),
            Err(why) => {
                eprintln!("FAIL - {name}: {why}");
                failures.push(format!("FAIL - {name}: {why}"));
            }
        }
    }
    let expected_runs = cases.iter().filter(|c| replay::is_single_node(c)).count();
    eprintln!(
        "{} case(s) run, {} passed, {} failed, in {:.1?}",
        results.len(),
        results.len() - failures.len(),
        failures.len(),
        started.elapsed()
    );
    assert_eq!(results.len(), expected_runs, "not every single-node case produced a result");

    let mut server = server;
    let alive = server.is_running();
    if !failures.is_empty() || !alive {
        panic!(
            "{} of {} single-node conformance case(s) failed{}:\n{}\n{}",
            failures.len(),
            results.len(),
            if alive { "" } else { " and the server process has exited" },
            failures.join("\n"),
            server.stderr_tail()
        );
    }
}

/// The `"topology": "two-node"` cases, replayed one after another against node A once A
/// routes to node B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_conformance_cases() {
    let cases = replay::load_cases();
    let selected = two_node_plan(&cases);

    let node_a = tokio::task::spawn_blocking(|| {
        replay::ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), NODE_A_ARGS, READY_TIMEOUT)
    })
    .await
    .expect("server start task")
    .unwrap_or_else(|e| panic!("could not start node A: {e}"));
    let b_args = node_b_args(&node_a.url);
    let node_b = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = b_args.iter().map(String::as_str).collect();
        replay::ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), &args, READY_TIMEOUT)
    })
    .await
    .expect("server start task")
    .unwrap_or_else(|e| panic!("could not start node B: {e}"));
    eprintln!("node A (pid {}) at {}, node B (pid {}) at {}", node_a.pid(), node_a.url, node_b.pid(), node_b.url);

    // Ready when A routes tpu_square (only B has it) — observed, not assumed.
    let client = mpreg::Client::connect(&node_a.url).await.expect("client connects to node A");
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        match client.call("tpu_square", vec![serde_json::json!(2)]).await {
            Ok(v) if v == serde_json::json!(4) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "node A cannot route tpu_square to node B after {READY_TIMEOUT:?}: {other:?}\n{}\n{}",
                node_a.stderr_tail(),
                node_b.stderr_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    client.close().await;

    let mut results = Vec::new();
    for (idx, case) in selected {
        results.push(run_one(node_a.url.clone(), idx, case).await);
    }
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(_, name, outcome)| match outcome {
            Ok(()) => {
                eprintln!("ok - {name}");
                None
            }
            Err(why) => {
                eprintln!("FAIL - {name}: {why}");
                Some(format!("FAIL - {name}: {why}"))
            }
        })
        .collect();
    assert_eq!(results.len(), 3, "the three two-node cases run");

    let (mut node_a, mut node_b) = (node_a, node_b);
    let alive = node_a.is_running() && node_b.is_running();
    if !failures.is_empty() || !alive {
        panic!(
            "{} of {} two-node conformance case(s) failed{}:\n{}\n{}\n{}",
            failures.len(),
            results.len(),
            if alive { "" } else { " and a server process has exited" },
            failures.join("\n"),
            node_a.stderr_tail(),
            node_b.stderr_tail()
        );
    }
}

/// Sanity of the data file and of the case selection; needs no server.
#[test]
fn every_case_is_accounted_for() {
    let cases = replay::load_cases();
    assert_eq!(cases.len(), EXPECTED_CASES, "number of cases in {}", replay::cases_path().display());

    let mut names: Vec<&str> = cases.iter().map(replay::case_name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "case names must be unique (results are reported by name)");

    for c in &cases {
        let name = replay::case_name(c);
        assert!(c["frames_in"].as_array().is_some_and(|a| !a.is_empty()), "{name}: frames_in");
        assert!(c["expected_out"].as_array().is_some_and(|a| !a.is_empty()), "{name}: expected_out");
        // anything other than single-node or two-node would be silently skipped
        assert!(
            matches!(replay::topology(c), None | Some("two-node")),
            "{name}: unknown topology {:?}",
            c.get("topology")
        );
    }

    // The single-node test runs exactly the cases without a topology, each once.
    let (concurrent, isolated) = plan(&cases);
    let mut run: Vec<usize> = concurrent.iter().chain(&isolated).map(|(i, _)| *i).collect();
    run.sort_unstable();
    let without_topology: Vec<usize> = (0..cases.len()).filter(|i| cases[*i].get("topology").is_none()).collect();
    assert_eq!(run, without_topology, "single-node selection");
    assert_eq!(run.len(), EXPECTED_CASES - 3, "three two-node cases are left to the cluster test");

    // The two-node test runs exactly the three two-node cases; together, every case once.
    let two_node: Vec<usize> = two_node_plan(&cases).iter().map(|(i, _)| *i).collect();
    let with_two_node: Vec<usize> =
        (0..cases.len()).filter(|i| cases[*i].get("topology").and_then(Value::as_str) == Some("two-node")).collect();
    assert_eq!(two_node, with_two_node, "two-node selection");
    assert_eq!(two_node.len(), 3, "three two-node cases");
    let mut all: Vec<usize> = run.iter().chain(&two_node).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..cases.len()).collect::<Vec<_>>(), "every case runs in exactly one test");
    for (_, c) in two_node_plan(&cases) {
        assert!(!replay::needs_isolation(&c), "{} touches pub/sub", replay::case_name(&c));
    }

    // Concurrent cases must not touch pub/sub at all.
    for (_, c) in &concurrent {
        let name = replay::case_name(c);
        assert!(replay::published_topics(c).is_empty(), "{name} publishes but runs concurrently");
        assert!(replay::subscribed_patterns(c).is_empty(), "{name} subscribes but runs concurrently");
    }
    assert_eq!(isolated.len(), 7, "the seven pub/sub cases run one after another");

    // A backlog reader must only see retained messages of its own publishes: no case
    // before it in the sequential order publishes on a topic it subscribes to.
    for (pos, (_, c)) in isolated.iter().enumerate() {
        if !replay::requests_backlog(c) {
            continue;
        }
        let patterns = replay::subscribed_patterns(c);
        for (_, earlier) in &isolated[..pos] {
            for topic in replay::published_topics(earlier) {
                assert!(
                    !patterns.iter().any(|p| replay::topic_matches(p, &topic)),
                    "{} publishes {topic} before the backlog case {} runs",
                    replay::case_name(earlier),
                    replay::case_name(c)
                );
            }
        }
    }
    assert!(
        isolated.iter().any(|(_, c)| replay::requests_backlog(c)),
        "the backlog case should be among the isolated cases"
    );
}
