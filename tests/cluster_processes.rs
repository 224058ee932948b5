//! Cluster tests with the built binary: real `mpreg` processes on 127.0.0.1 (port 0),
//! killed for real. What an in-process test cannot do: `kill -9` a node in the middle of
//! a request (no GOODBYE, the kernel just closes its sockets), and send SIGTERM to watch
//! the clean path.
//!
//! Every process is started through [`replay::ServerProcess`] (waits for `MPREG_URL=`,
//! kills and reaps on drop). Readiness is a call that starts to succeed or a
//! `cluster-status` answer that shows the expected view, never a fixed sleep. Each test
//! uses its own cluster id, so nodes of different tests never admit each other.
//!
//! Run: `cargo test --test cluster_processes`.

mod common;
#[path = "common/conformance_replay.rs"]
mod replay;

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{cluster_id, poll_until_async, rpc_error, TempFile};
use mpreg::{Client, ClientError, RpcCommand};
use mpreg_actors::protocol::{ErrorCode, RpcRequest, RpcResponse};
use replay::ServerProcess;
use serde_json::{json, Value};

/// Bound for a process to print its URL (a cold start of a debug binary included).
const READY: Duration = Duration::from_secs(30);
/// Upper bound for anything that should happen "soon"; far below the 30 s request timeout.
const SOON: Duration = Duration::from_secs(10);

/// Starts `mpreg args...` and waits for its URL.
async fn start(args: Vec<String>) -> ServerProcess {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), &args, READY)
    })
    .await
    .expect("start task")
    .unwrap_or_else(|e| panic!("node does not start: {e}"))
}

/// `mpreg server start` for node `name` serving `functions`, joined to `peers`.
fn node_args(name: &str, cluster: &str, functions: &str, peers: &[&ServerProcess]) -> Vec<String> {
    let mut args: Vec<String> = [
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--monitoring-port",
        "0",
        "--name",
        name,
        "--cluster-id",
        cluster,
        "--functions",
        functions,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for peer in peers {
        args.extend(["--peer".to_owned(), peer.url.clone()]);
    }
    args
}

/// Sends `signal` (`-KILL`, `-TERM`) to the process.
fn signal(process: &ServerProcess, signal: &str) {
    let status = Command::new("kill").args([signal, &process.pid().to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill {signal} {}", process.pid());
}

/// Probes until `probe` returns `Some`, at most [`SOON`]; panics naming `what` otherwise.
async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until_async(what, SOON, probe).await
}

async fn connect(process: &ServerProcess) -> Client {
    Client::connect(&process.url).await.expect("client connects")
}

/// Calls `fun(args)` until it answers `expected`.
async fn wait_answer(client: &Client, fun: &str, args: Vec<Value>, expected: Value) {
    let (args, expected) = (&args, &expected);
    wait_until(&format!("{fun}({args:?}) == {expected}"), move || async move {
        (client.call(fun, args.clone()).await.ok().as_ref() == Some(expected)).then_some(())
    })
    .await;
}

/// `node`'s entry in the topology of a `cluster-status` answer.
fn member<'a>(status: &'a Value, node: &str) -> Option<&'a Value> {
    status["topology"]["nodes"].as_array()?.iter().find(|n| n["node"] == node)
}

/// A request whose completed levels are published on `topic`.
fn watched(cmds: Vec<RpcCommand>, topic: &str) -> RpcRequest {
    RpcRequest {
        u: String::new(),
        cmds,
        return_intermediate_results: false,
        intermediate_result_callback_topic: Some(topic.to_owned()),
        include_execution_summary: false,
        debug_mode: false,
        timeout: None,
    }
}

/// `add(x, y)` then `slow` for that many seconds: the first level completes at once, the
/// second runs for `x + y` seconds on whichever node serves `slow`.
fn add_then_slow(x: i64, y: i64) -> Vec<RpcCommand> {
    vec![RpcCommand::new("a", "add", vec![json!(x), json!(y)]), RpcCommand::new("s", "slow", vec![json!("a")])]
}

/// Sends `request` in a task; returns once its level 0 is published, i.e. once `slow` is
/// being dispatched.
async fn start_watched(
    client: &Client,
    request: RpcRequest,
) -> tokio::task::JoinHandle<Result<RpcResponse, ClientError>> {
    let topic = request.intermediate_result_callback_topic.clone().expect("a callback topic");
    let mut progress = client.subscribe(&[&topic], None).await.expect("subscribed");
    let task = tokio::spawn({
        let client = client.clone();
        async move { client.send_request(request).await }
    });
    let level = tokio::time::timeout(SOON, progress.next()).await.expect("level 0 completes").expect("open");
    assert_eq!(level.payload["level_index"], 0, "{level:?}");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_only_provider_mid_dag_fails_fast_with_1005() {
    let cluster = cluster_id("sigkill-dag");
    let a = start(node_args("A", &cluster, "add", &[])).await;
    let b = start(node_args("B", &cluster, "slow", &[&a])).await;
    let c = start(node_args("C", &cluster, "tpu_square", &[&a])).await;
    let client = connect(&a).await;
    wait_answer(&client, "tpu_square", vec![json!(2)], json!(4)).await;
    wait_answer(&client, "slow", vec![json!(0)], json!(0)).await;

    // add (A) -> slow for 20 s (B only) -> tpu_square (C).
    let mut cmds = add_then_slow(15, 5);
    cmds.push(RpcCommand::new("sq", "tpu_square", vec![json!("s")]));
    let request = start_watched(&client, watched(cmds, "progress.sigkill")).await;

    signal(&b, "-KILL");
    let killed = Instant::now();
    let response = tokio::time::timeout(SOON, request)
        .await
        .expect("answered long before the 30 s request timeout")
        .expect("task")
        .expect("a response");
    eprintln!("answer {:.0?} after kill -9", killed.elapsed());
    let error = response.error.unwrap_or_else(|| panic!("the request fails: {:?}", response.r));
    assert_eq!(error.kind(), Some(ErrorCode::Unreachable), "{error:?}");
    assert!(error.details_text().starts_with("command=s fun=slow node=B: "), "{error:?}");

    // The survivors go on: A -> C still routes.
    let r = client
        .request(vec![
            RpcCommand::new("a", "add", vec![json!(2), json!(3)]),
            RpcCommand::new("sq", "tpu_square", vec![json!("a")]),
        ])
        .await
        .expect("A and C still serve");
    assert_eq!(r, json!({"sq": 25}));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_of_two_providers_mid_call_is_retried_on_the_other() {
    let cluster = cluster_id("sigkill-retry");
    let a = start(node_args("A", &cluster, "add", &[])).await;
    let b = start(node_args("B", &cluster, "slow", &[&a])).await;
    let c = start(node_args("C", &cluster, "slow", &[&a])).await;
    let client = connect(&a).await;
    wait_answer(&client, "add", vec![json!(1), json!(1)], json!(2)).await;
    wait_until("A to know slow on B and C", || async {
        let status = client.cluster_status().await.ok()?;
        let nodes = status["catalog"]["nodes"].as_array()?;
        let serves_slow = |node: &str| {
            nodes.iter().any(|n| {
                n["node"] == node && n["functions"].as_array().is_some_and(|f| f.iter().any(|f| f["name"] == "slow"))
            })
        };
        (serves_slow("B") && serves_slow("C")).then_some(())
    })
    .await;

    // Two requests in flight: A picks the least loaded provider for each, so one runs on
    // B and one on C (whichever way round); killing B must not fail either.
    let first = start_watched(&client, watched(add_then_slow(1, 2), "progress.first")).await;
    let second = start_watched(&client, watched(add_then_slow(1, 2), "progress.second")).await;
    signal(&b, "-KILL");
    for request in [first, second] {
        let response = tokio::time::timeout(SOON, request)
            .await
            .expect("answered long before the 30 s request timeout")
            .expect("task")
            .expect("a response");
        assert_eq!(response.error, None, "{response:?}");
        assert_eq!(response.r, Some(json!({"s": 3})));
    }
    drop(c);
}

/// A settings file for node `name`: slow failure detection (a minute), fast gossip, at
/// most `fanout` links dialled to nodes learned through gossip and `fanout` dialled to it
/// by others (`max_inbound_links`), and a hop budget for the long paths of a cluster with
/// so few links a node.
fn slow_detection_config(
    name: &str,
    cluster: &str,
    functions: &str,
    peers: &[&ServerProcess],
    fanout: usize,
) -> TempFile {
    let peers: Vec<String> = peers.iter().map(|p| format!("{:?}", p.url)).collect();
    let toml = format!(
        "[mpreg]\nname = {name:?}\nhost = \"127.0.0.1\"\nport = 0\nmonitoring_port = 0\ncluster_id = {cluster:?}\n\
         functions = [{functions:?}]\npeers = [{}]\ngossip_interval_s = 0.1\nsuspect_after_s = 1.0\n\
         remove_after_s = 60.0\ndeparted_grace_s = 60.0\npeer_fanout = {fanout}\nmax_inbound_links = {fanout}\nhop_budget = 16\n",
        peers.join(", ")
    );
    TempFile::new(&format!("{cluster}-{name}.toml"), &toml)
}

async fn start_config(config: &TempFile) -> ServerProcess {
    start(vec!["server".into(), "start-config".into(), config.arg().to_owned()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_and_sigkill_leaves_a_suspect() {
    let cluster = cluster_id("signals");
    // B is dialled by A (see `sigterm_goodbye_reaches_the_peers_a_node_dialled` for why
    // that matters); C dials A.
    let config_b = slow_detection_config("B", &cluster, "slow", &[], 32);
    let b = start_config(&config_b).await;
    let config_a = slow_detection_config("A", &cluster, "add", &[&b], 32);
    let a = start_config(&config_a).await;
    let config_c = slow_detection_config("C", &cluster, "tpu_square", &[&a], 32);
    let c = start_config(&config_c).await;
    let client = connect(&a).await;
    wait_answer(&client, "tpu_square", vec![json!(3)], json!(9)).await;
    wait_answer(&client, "slow", vec![json!(0)], json!(0)).await;

    // SIGTERM: the node says GOODBYE; A forgets it at once (removal would take 60 s).
    signal(&b, "-TERM");
    wait_until("A to forget B after its GOODBYE", || async {
        let status = client.cluster_status().await.ok()?;
        member(&status, "B").is_none().then_some(())
    })
    .await;
    let error = rpc_error(client.call("slow", vec![json!(0)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "B's functions left with it: {error:?}");

    // SIGKILL: no GOODBYE; the closed link makes C a suspect, still listed, not routed to.
    signal(&c, "-KILL");
    let status = wait_until("A to suspect C", || async {
        let status = client.cluster_status().await.ok()?;
        member(&status, "C").is_some_and(|m| m["state"] == "suspect").then_some(status)
    })
    .await;
    assert_eq!(member(&status, "C").expect("C is listed")["linked"], false, "{status:#}");
    let error = tokio::time::timeout(SOON, client.call("tpu_square", vec![json!(2)]))
        .await
        .map(rpc_error)
        .expect("answered at once");
    assert_eq!(error.kind(), Some(ErrorCode::Unreachable), "C is suspected, not gone: {error:?}");
    assert_eq!(client.call("add", vec![json!(1), json!(2)]).await.unwrap(), json!(3));
}

/// A GOODBYE queued on a link the departing node dialled reaches the peer even when
/// nothing else delays the exit: `Node::shutdown` waits for its outbound links to flush
/// and close. Otherwise the peer would see a crash (a suspect for `remove_after_s`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_goodbye_reaches_the_peers_a_node_dialled() {
    let cluster = cluster_id("goodbye-outbound");
    let config_a = slow_detection_config("A", &cluster, "add", &[], 32);
    let a = start_config(&config_a).await;
    let config_b = slow_detection_config("B", &cluster, "slow", &[&a], 32);
    let b = start_config(&config_b).await;
    let client = connect(&a).await;
    wait_answer(&client, "slow", vec![json!(0)], json!(0)).await;

    signal(&b, "-TERM");
    wait_until("A to forget B after its GOODBYE", || async {
        let status = client.cluster_status().await.ok()?;
        member(&status, "B").is_none().then_some(())
    })
    .await;
}

/// SWIM end to end over real processes, 8 of them with links capped at a fan-out of 2 so
/// that many probes and answers travel routed: see [`silent_node_scenario`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_suspected_everywhere_and_refutes_when_it_resumes() {
    silent_node_scenario(8, 2, Duration::from_secs(46)).await;
}

/// The same with 64 node processes and a fan-out of 8: issue 10's process test. Not run by
/// CI: 64 debug processes do not make a function routable within 120 s on the 2-core
/// machine (release processes pass in about a minute). By hand, alone:
/// `cargo test --release --test cluster_processes -- --ignored --test-threads 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "64 node processes: run by hand, alone, with --release --ignored"]
async fn sixty_four_nodes_route_suspect_a_silent_node_and_see_it_refute() {
    let whole = Duration::from_secs(240);
    tokio::time::timeout(whole, silent_node_scenario(64, 8, Duration::from_secs(120)))
        .await
        .unwrap_or_else(|_| panic!("64 nodes took longer than {whole:?}"));
}

/// `n` node processes, at most `fanout` links each: every node names `s0` as its peer,
/// which accepts `fanout` and sends the others to members with room; a function registered
/// on the last node is routable from all; a SIGSTOPped node (links open, nothing answered)
/// is suspected by every other node; after SIGCONT it refutes (its incarnation rises) and
/// is alive everywhere again. Each step is bounded by `slow` (debug processes on 2 loaded
/// cores: generous).
async fn silent_node_scenario(n: usize, fanout: usize, slow: Duration) {
    let cluster = cluster_id("swim");
    let mut configs = Vec::with_capacity(n);
    let mut nodes: Vec<ServerProcess> = Vec::with_capacity(n);
    for i in 0..n {
        let functions = if i == n - 1 { "tpu_square" } else { "add" };
        let seed: Vec<&ServerProcess> = nodes.first().into_iter().collect();
        let config = slow_detection_config(&format!("s{i}"), &cluster, functions, &seed, fanout);
        nodes.push(start_config(&config).await);
        configs.push(config);
    }
    let mut clients = Vec::with_capacity(n);
    for node in &nodes {
        clients.push(connect(node).await);
    }
    for (i, client) in clients.iter().enumerate() {
        poll_until_async(&format!("tpu_square routable from s{i}"), slow, || async {
            (client.call("tpu_square", vec![json!(3)]).await.ok() == Some(json!(9))).then_some(())
        })
        .await;
    }
    let seed = clients[0].cluster_status().await.expect("s0 answers");
    let inbound = seed["topology"]["links"].as_array().expect("links").iter().filter(|l| l[2] == "inbound").count();
    assert!(inbound <= fanout, "s0 holds {inbound} inbound links, more than max_inbound_links: {:#}", seed["topology"]);
    let state_of = |status: &Value, node: &str| member(status, node).map(|m| m["state"].clone());
    let watched = "s1";
    signal(&nodes[1], "-STOP");
    for (i, client) in clients.iter().enumerate().filter(|(i, _)| *i != 1) {
        poll_until_async(&format!("s{i} to suspect the stopped {watched}"), slow, || async {
            let status = client.cluster_status_brief().await.ok()?;
            (state_of(&status, watched) != Some(json!("alive"))).then_some(())
        })
        .await;
    }
    signal(&nodes[1], "-CONT");
    for (i, client) in clients.iter().enumerate().filter(|(i, _)| *i != 1) {
        poll_until_async(&format!("s{i} to see {watched} alive again"), slow, || async {
            let status = client.cluster_status_brief().await.ok()?;
            (state_of(&status, watched) == Some(json!("alive"))).then_some(())
        })
        .await;
    }
    let status = clients[1].cluster_status_brief().await.expect("the resumed node answers");
    assert!(status["topology"]["incarnation"].as_u64() >= Some(1), "it refuted: {:#}", status["topology"]);
    // The brief answer the polls above used: names and states, no links, no catalog.
    assert!(status.get("catalog").is_none() && status["topology"].get("links").is_none(), "{status:#}");
    let nodes = status["topology"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), n, "{status:#}");
    for node in nodes {
        let fields: Vec<&str> = node.as_object().expect("an object").keys().map(String::as_str).collect();
        assert_eq!(fields, ["node", "state"], "{status:#}");
    }
    // With few links a node, the stopped relay may have cut s0 off from the last node (its
    // silent links were closed); the links form again once it is back.
    poll_until_async("tpu_square routable from s0 again", slow, || async {
        (clients[0].call("tpu_square", vec![json!(4)]).await.ok() == Some(json!(16))).then_some(())
    })
    .await;
}
