//! In-process cluster tests: several nodes (`NodeBuilder`, port 0 on 127.0.0.1) in the
//! test's actix System, linked by real loopback websockets, driven by the
//! `mpreg::Client` SDK and, for malformed peer frames, by a raw websocket.
//!
//! What they pin down (DESIGN.md §4, §7, §8): discovery into a full mesh through gossip,
//! catalog propagation, routing by resources across nodes, concurrent branches on
//! different nodes, remote failures (1003 naming the node), multi-hop forwarding and the
//! hop budget, a provider leaving mid-call (1005, or a retry on another provider),
//! GOODBYE, cluster isolation, pub/sub flooding without duplicates, and garbage on the
//! peer protocol.
//!
//! Readiness is always observed — `GET /topology`, `GET /catalog`, or a call that starts
//! to succeed — never assumed after a fixed sleep; the short pause between two probes is
//! politeness, not synchronisation. Concurrency is proved with barriers and signals
//! inside the registered functions, never with timings. Every cluster gets a cluster id
//! unique to the test and the process, so nodes of different tests can never admit each
//! other. Nodes are stopped when their [`TestNode`] drops.
//!
//! Run: `cargo test --test cluster`.

mod common;

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use mpreg::client::CallOptions;
use mpreg::functions::demo_pack;
use mpreg::{Client, FunctionError, FunctionSpec, RpcCommand, Settings};
use mpreg_actors::protocol::ErrorCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Barrier, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use common::node::{cluster_settings, TestNode};
use common::proxy::Proxy;
use common::ws::{peer_status, raw_connect, raw_next, raw_send};
use common::{cluster_id, get_ok, poll_until_async, rpc_error};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Nodes

/// [`cluster_settings`] joining `peers`. No test here waits for suspicion or removal;
/// departures are GOODBYEs or closed links, both immediate.
fn settings(name: &str, cluster: &str, peers: &[&TestNode]) -> Settings {
    Settings { peers: peers.iter().map(|p| p.url().to_owned()).collect(), ..cluster_settings(name, cluster) }
}

impl TestNode {
    /// `GET {monitoring_url}{path}` as JSON.
    async fn monitor(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.node.monitoring_url().expect("monitoring is enabled"));
        let body = get_ok(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    async fn topology(&self) -> Value {
        self.monitor("/topology").await
    }

    async fn catalog(&self) -> Value {
        self.monitor("/catalog").await
    }
}

/// The demo functions named (from `mpreg::functions::demo_pack`).
fn demo(names: &[&str]) -> Vec<FunctionSpec> {
    demo_pack().into_iter().filter(|f| names.contains(&f.identity().name.as_str())).collect()
}

// ---------------------------------------------------------------------------------------
// Observing the cluster

/// Probes until `probe` returns `Some`, at most [`SOON`]; panics naming `what` otherwise.
async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until_async(what, SOON, probe).await
}

/// `node`'s entry in a `/topology` answer.
fn member<'a>(topology: &'a Value, node: &str) -> Option<&'a Value> {
    topology["nodes"].as_array()?.iter().find(|n| n["node"] == node)
}

/// Whether a `/topology` answer shows a live, direct link to `node`.
fn linked(topology: &Value, node: &str) -> bool {
    member(topology, node).is_some_and(|m| m["linked"] == true && m["state"] == "alive")
}

/// Waits until every node has a live link to every other one.
async fn wait_full_mesh(nodes: &[&TestNode]) {
    for &node in nodes {
        let others: Vec<&str> = nodes.iter().map(|n| n.name()).filter(|n| *n != node.name()).collect();
        let others = &others;
        wait_until(&format!("{} to link to {others:?}", node.name()), move || async move {
            let topology = node.topology().await;
            others.iter().all(|o| linked(&topology, o)).then_some(())
        })
        .await;
    }
}

/// Whether a `/catalog` answer lists `fun` under `node`.
fn catalog_lists(catalog: &Value, node: &str, fun: &str) -> bool {
    catalog["nodes"].as_array().is_some_and(|nodes| {
        nodes.iter().any(|entry| {
            entry["node"] == node && entry["functions"].as_array().is_some_and(|fs| fs.iter().any(|f| f["name"] == fun))
        })
    })
}

/// Waits until `observer`'s catalog lists `fun` under each of `owners`.
async fn wait_catalog(observer: &TestNode, fun: &str, owners: &[&str]) {
    wait_until(&format!("{}'s catalog to list {fun} on {owners:?}", observer.name()), || async {
        let catalog = observer.catalog().await;
        owners.iter().all(|owner| catalog_lists(&catalog, owner, fun)).then_some(())
    })
    .await;
}

/// Calls `fun(args)` through `client` until it succeeds; its result.
async fn wait_callable(client: &Client, fun: &str, args: Vec<Value>) -> Value {
    let args = &args;
    wait_until(&format!("{fun}({args:?}) to succeed"), move || async move { client.call(fun, args.clone()).await.ok() })
        .await
}

// ---------------------------------------------------------------------------------------
// Membership and the catalog

#[actix_rt::test]
async fn nodes_introduced_by_gossip_form_a_full_mesh_and_route_to_each_other() {
    let cluster = cluster_id("discovery");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![]).await;
    let only_on_c = FunctionSpec::sync("only_on_c", |x: i64| x * 2).inline();
    let c = TestNode::start(settings("C", &cluster, &[&a]), vec![only_on_c]).await;

    // B and C only know A; they learn of each other from A's membership gossip.
    wait_full_mesh(&[&a, &b, &c]).await;
    let from_b = b.topology().await;
    assert_eq!(from_b["cluster_id"], json!(cluster));
    assert_eq!(member(&from_b, "B").expect("B lists itself")["state"], "self");
    assert_eq!(member(&from_b, "C").expect("B knows C")["next_hop"], "C", "{from_b:#}");

    // A function only C has is callable from a client of B.
    let client = b.client().await;
    assert_eq!(wait_callable(&client, "only_on_c", vec![json!(21)]).await, json!(42));
    wait_catalog(&a, "only_on_c", &["C"]).await;
    assert!(!catalog_lists(&a.catalog().await, "A", "only_on_c"));
}

#[actix_rt::test]
async fn a_function_registered_after_start_becomes_callable_across_the_cluster() {
    let cluster = cluster_id("late-registration");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![]).await;
    let c = TestNode::start(settings("C", &cluster, &[&b]), vec![]).await;
    wait_full_mesh(&[&a, &b, &c]).await;

    let client = a.client().await;
    let before = rpc_error(client.call("late", vec![json!(1)]).await);
    assert_eq!(before.kind(), Some(ErrorCode::NotFound), "{before:?}");

    c.register(FunctionSpec::sync("late", |x: i64| x + 1000).inline().resources(["late-res"]))
        .await
        .expect("registration succeeds");
    assert_eq!(wait_callable(&client, "late", vec![json!(1)]).await, json!(1001));
    wait_catalog(&a, "late", &["C"]).await;
    wait_catalog(&b, "late", &["C"]).await;
    // The catalog carries the resources, so routing by them works remotely too.
    let with_locs = mpreg::client::CallOptions { locs: vec!["late-res".into()], ..Default::default() };
    assert_eq!(client.call_with("late", vec![json!(2)], with_locs).await.unwrap(), json!(1002));
}

// ---------------------------------------------------------------------------------------
// Routing and execution across nodes

#[actix_rt::test]
async fn a_chain_is_routed_by_resources_across_two_nodes() {
    let cluster = cluster_id("resources");
    let cpu = TestNode::start(settings("cpu-node", &cluster, &[]), demo(&["add", "multiply"])).await;
    let gpu = TestNode::start(settings("gpu-node", &cluster, &[&cpu]), demo(&["model_score"])).await;
    let client = gpu.client().await;
    assert_eq!(wait_callable(&client, "add", vec![json!(1), json!(2)]).await, json!(3));

    let mut sum = RpcCommand::new("sum", "add", vec![json!(20), json!(22)]);
    sum.locs = vec!["cpu".into(), "math".into()];
    let mut scaled = RpcCommand::new("scaled", "multiply", vec![json!("sum"), json!(3)]);
    scaled.locs = vec!["cpu".into()];
    let mut scored = RpcCommand::new("scored", "model_score", vec![json!("scaled")]);
    scored.locs = vec!["gpu".into()];
    let r = client.request(vec![sum, scaled, scored]).await.expect("the chain runs");
    assert_eq!(r, json!({"scored": {"score": 1.26, "model": "demo", "nested": {"deep": [1, 2, 3]}}}));

    // Resources the providers lack match nothing, here or there.
    let mut wrong = RpcCommand::new("sum", "add", vec![json!(1), json!(2)]);
    wrong.locs = vec!["gpu".into()];
    let error = rpc_error(client.request(vec![wrong]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "{error:?}");
}

/// An async function that records its start, then waits until `barrier` sees the other
/// branch started too: run one after the other, the first would time out and fail.
fn branch(name: &'static str, barrier: Arc<Barrier>, log: Arc<Mutex<Vec<String>>>, f: fn(i64) -> i64) -> FunctionSpec {
    FunctionSpec::asynchronous(name, move |x: i64| {
        let (barrier, log) = (barrier.clone(), log.clone());
        async move {
            log.lock().unwrap().push(format!("{name} started"));
            tokio::time::timeout(SOON, barrier.wait())
                .await
                .map_err(|_| FunctionError::new("Timeout", format!("{name}: the other branch never started")))?;
            log.lock().unwrap().push(format!("{name} finished"));
            Ok::<_, FunctionError>(f(x))
        }
    })
}

#[actix_rt::test]
async fn independent_branches_on_different_nodes_run_concurrently() {
    let cluster = cluster_id("dag");
    let barrier = Arc::new(Barrier::new(2));
    let log = Arc::new(Mutex::new(Vec::new()));
    let seed = FunctionSpec::sync("seed", |x: i64| x + 1).inline();
    let a = TestNode::start(settings("A", &cluster, &[]), vec![seed]).await;
    let left = branch("left", barrier.clone(), log.clone(), |x| x * 10);
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![left]).await;
    let right = branch("right", barrier.clone(), log.clone(), |x| x + 100);
    let c = TestNode::start(settings("C", &cluster, &[&a]), vec![right]).await;
    wait_catalog(&a, "left", &["B"]).await;
    wait_catalog(&a, "right", &["C"]).await;
    wait_until("A to route to B and C", || async {
        let topology = a.topology().await;
        (linked(&topology, "B") && linked(&topology, "C")).then_some(())
    })
    .await;

    // seed (A) -> left (B) and right (C) -> both (echos, local to A).
    let client = a.client().await;
    let r = client
        .request(vec![
            RpcCommand::new("seed", "seed", vec![json!(4)]),
            RpcCommand::new("left", "left", vec![json!("seed")]),
            RpcCommand::new("right", "right", vec![json!("seed")]),
            RpcCommand::new("both", "echos", vec![json!("left"), json!("right")]),
        ])
        .await
        .expect("the DAG runs");
    assert_eq!(r, json!({"both": [50, 105]}));

    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log[..2].iter().all(|e| e.ends_with("started")), "both branches start before either ends: {log:?}");
    assert!(log[2..].iter().all(|e| e.ends_with("finished")), "{log:?}");
    drop((b, c));
}

#[actix_rt::test]
async fn a_remote_failure_fails_the_request_with_1003_naming_the_node() {
    let cluster = cluster_id("remote-failure");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let fails = FunctionSpec::sync("fails_on_b", |x: i64| -> Result<i64, FunctionError> {
        Err(FunctionError::value_error(format!("no good: {x}")))
    })
    .inline();
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![fails]).await;
    wait_catalog(&a, "fails_on_b", &["B"]).await;

    let client = a.client().await;
    let request = || {
        client.request(vec![
            RpcCommand::new("x", "fails_on_b", vec![json!(7)]),
            RpcCommand::new("after", "echo", vec![json!("x")]),
        ])
    };
    // The catalog may list it a moment before the route is in A's routing snapshot.
    let error = wait_until("A to route fails_on_b to B", || async {
        let error = rpc_error(request().await);
        (error.kind() != Some(ErrorCode::NotFound)).then_some(error)
    })
    .await;
    assert_eq!(error.kind(), Some(ErrorCode::ExecutionFailed), "{error:?}");
    assert_eq!(error.message, "RPC execution failed");
    assert_eq!(
        error.details_text(),
        "Function execution failed: command=x fun=fails_on_b node=B error=ValueError: no good: 7 args_types=[int]"
    );
    // The failure is the request's, not the cluster's.
    assert_eq!(client.call("echo", vec![json!("still here")]).await.unwrap(), json!("still here"));
    assert!(linked(&a.topology().await, "B"));
    drop(b);
}

#[actix_rt::test]
async fn messages_travel_several_hops_within_the_hop_budget() {
    // A line, no links beyond the configured peers: A <- B <- C <- D.
    let cluster = cluster_id("multi-hop");
    let line = |name: &str, peers: &[&TestNode], budget: u32| Settings {
        peer_fanout: 0,
        hop_budget: budget,
        ..settings(name, &cluster, peers)
    };
    let a_only = FunctionSpec::sync("a_only", |x: i64| x + 1).inline();
    // A lets a message it originates be forwarded once.
    let a = TestNode::start(line("A", &[], 1), vec![a_only]).await;
    let b = TestNode::start(line("B", &[&a], 5), vec![]).await;
    let c_only = FunctionSpec::sync("c_only", |x: i64| x * 3).inline();
    let c = TestNode::start(line("C", &[&b], 5), vec![c_only]).await;
    let d_only = FunctionSpec::sync("d_only", |x: i64| x - 1).inline();
    let d = TestNode::start(line("D", &[&c], 5), vec![d_only]).await;

    let topology = wait_until("A to reach D through B", || async {
        let topology = a.topology().await;
        member(&topology, "D").is_some_and(|m| m["next_hop"] == "B" && m["state"] == "alive").then_some(topology)
    })
    .await;
    assert!(linked(&topology, "B"), "{topology:#}");
    for far in ["C", "D"] {
        let m = member(&topology, far).unwrap_or_else(|| panic!("A knows {far}: {topology:#}"));
        assert_eq!(m["linked"], false, "A has no link to {far}: {topology:#}");
        assert_eq!(m["next_hop"], "B", "{topology:#}");
    }
    wait_until("D to reach A through C", || async {
        let topology = d.topology().await;
        member(&topology, "A").is_some_and(|m| m["next_hop"] == "C" && m["state"] == "alive").then_some(())
    })
    .await;

    // A -> B -> C: one forward (at B), within A's budget of 1.
    let client_a = a.client().await;
    assert_eq!(wait_callable(&client_a, "c_only", vec![json!(5)]).await, json!(15));

    // A -> B -> C -> D needs a second forward (at C): refused there, reported back to A.
    wait_catalog(&a, "d_only", &["D"]).await;
    let error = wait_until("A to route d_only", || async {
        let error = rpc_error(client_a.call("d_only", vec![json!(5)]).await);
        (error.kind() != Some(ErrorCode::NotFound)).then_some(error)
    })
    .await;
    assert_eq!(error.kind(), Some(ErrorCode::Unreachable), "{error:?}");
    let text = error.details_text();
    assert!(text.starts_with("command=d_only fun=d_only node=D: "), "{text}");
    assert!(text.contains("hop budget exhausted at C"), "{text}");

    // D's own budget (5) carries its calls over the same three hops the other way.
    let client_d = d.client().await;
    assert_eq!(wait_callable(&client_d, "a_only", vec![json!(41)]).await, json!(42));
}

// ---------------------------------------------------------------------------------------
// Nodes leaving

#[actix_rt::test]
async fn a_call_in_flight_on_a_node_that_leaves_fails_fast_with_1005() {
    let cluster = cluster_id("leave-mid-call");
    let (started, mut started_rx) = mpsc::unbounded_channel::<()>();
    let hang = FunctionSpec::asynchronous("hang", move || {
        let started = started.clone();
        async move {
            let _ = started.send(());
            tokio::time::sleep(SOON * 6).await;
            "too late"
        }
    });
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![hang]).await;
    wait_catalog(&a, "hang", &["B"]).await;
    wait_until("A to link to B", || async { linked(&a.topology().await, "B").then_some(()) }).await;

    let client = a.client().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("hang", vec![]).await }
    });
    tokio::time::timeout(SOON, started_rx.recv()).await.expect("hang starts on B").expect("B is running");

    b.shutdown().await;
    // The client's own deadline is 45 s and the node's request timeout 30 s: an answer
    // within SOON can only be the fabric noticing that B left.
    let result = tokio::time::timeout(SOON, call).await.expect("the call is answered at once").expect("task");
    let error = rpc_error(result);
    assert_eq!(error.kind(), Some(ErrorCode::Unreachable), "{error:?}");
    assert!(error.details_text().starts_with("command=hang fun=hang node=B: "), "{error:?}");
    // A goes on serving.
    assert_eq!(client.call("echo", vec![json!(1)]).await.unwrap(), json!(1));
}

#[actix_rt::test]
async fn a_call_in_flight_on_a_node_that_leaves_is_retried_on_another_provider() {
    let cluster = cluster_id("retry");
    let (started, mut started_rx) = mpsc::unbounded_channel::<&'static str>();
    let release = Arc::new(Notify::new());

    // B's hang2 never answers in time; C's answers at once.
    let hang_on_b = FunctionSpec::asynchronous("hang2", {
        let started = started.clone();
        move || {
            let started = started.clone();
            async move {
                let _ = started.send("hang2 on B");
                tokio::time::sleep(SOON * 6).await;
                "B"
            }
        }
    });
    let hang_on_c = FunctionSpec::asynchronous("hang2", || async { "C" });
    // Holds one call to C open, so A's least-loaded choice for hang2 is B.
    let hold_c = FunctionSpec::asynchronous("hold_c", {
        let release = release.clone();
        move || {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send("hold_c");
                release.notified().await;
                "released"
            }
        }
    });

    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![hang_on_b]).await;
    let c = TestNode::start(settings("C", &cluster, &[&a]), vec![hang_on_c, hold_c]).await;
    wait_catalog(&a, "hang2", &["B", "C"]).await;
    wait_catalog(&a, "hold_c", &["C"]).await;
    wait_until("A to link to B and C", || async {
        let topology = a.topology().await;
        (linked(&topology, "B") && linked(&topology, "C")).then_some(())
    })
    .await;

    let client = a.client().await;
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.call("hold_c", vec![]).await }
    });
    let first = tokio::time::timeout(SOON, started_rx.recv()).await.expect("hold_c starts on C");
    assert_eq!(first, Some("hold_c"));

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("hang2", vec![]).await }
    });
    let second = tokio::time::timeout(SOON, started_rx.recv()).await;
    assert_eq!(second, Ok(Some("hang2 on B")), "with one call open on C, A picks B (least in flight) for hang2");

    b.shutdown().await;
    let result = tokio::time::timeout(SOON, call).await.expect("the call is answered at once").expect("task");
    assert_eq!(result.expect("retried on C"), json!("C"));

    release.notify_one();
    let held = tokio::time::timeout(SOON, held).await.expect("hold_c answers once released").expect("task");
    assert_eq!(held.expect("hold_c succeeds"), json!("released"));
    drop(c);
}

#[actix_rt::test]
async fn goodbye_removes_a_node_at_once_and_its_new_instance_is_welcome() {
    let cluster = cluster_id("goodbye");
    // Failure detection would take 30 s: anything faster is the GOODBYE. The departed
    // instance is barred for 30 s too, which must not bar its successor.
    let slow_detection = |name: &str, peers: &[&TestNode]| Settings {
        remove_after_s: 30.0,
        departed_grace_s: 30.0,
        ..settings(name, &cluster, peers)
    };
    let b_fun = || FunctionSpec::sync("b_fun", |x: i64| x * 7).inline();
    let a = TestNode::start(slow_detection("A", &[]), vec![]).await;
    let b = TestNode::start(slow_detection("B", &[&a]), vec![b_fun()]).await;
    let c = TestNode::start(slow_detection("C", &[&a]), vec![]).await;
    wait_full_mesh(&[&a, &b, &c]).await;
    let client_a = a.client().await;
    let client_c = c.client().await;
    assert_eq!(wait_callable(&client_a, "b_fun", vec![json!(6)]).await, json!(42));
    assert_eq!(wait_callable(&client_c, "b_fun", vec![json!(6)]).await, json!(42));
    let old_instance = member(&a.topology().await, "B").expect("A knows B")["instance_id"].clone();

    b.shutdown().await;
    drop(b);
    for observer in [&a, &c] {
        wait_until(&format!("{} to forget B", observer.name()), || async {
            member(&observer.topology().await, "B").is_none().then_some(())
        })
        .await;
        assert!(!catalog_lists(&observer.catalog().await, "B", "b_fun"));
    }
    // B's functions are gone with it: a plain "no such function", answered at once.
    let error = tokio::time::timeout(SOON, client_a.call("b_fun", vec![json!(1)]))
        .await
        .map(rpc_error)
        .expect("answered at once");
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "{error:?}");

    // A new process with the same name is a new instance: admitted within the grace.
    let b2 = TestNode::start(slow_detection("B", &[&a]), vec![b_fun()]).await;
    wait_full_mesh(&[&a, &b2, &c]).await;
    let new_instance = member(&a.topology().await, "B").expect("A knows the new B")["instance_id"].clone();
    assert_ne!(new_instance, old_instance);
    assert_eq!(wait_callable(&client_a, "b_fun", vec![json!(2)]).await, json!(14));
    assert_eq!(wait_callable(&client_c, "b_fun", vec![json!(3)]).await, json!(21));
}

// ---------------------------------------------------------------------------------------
// Isolation

/// Log lines written on this thread (where the in-process nodes' fabric actors run).
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Lines containing every one of `parts`.
    fn count(&self, parts: &[&str]) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|line| parts.iter().all(|p| line.contains(p))).count()
    }
}

#[actix_rt::test]
async fn a_node_of_another_cluster_is_refused() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let _logs = tracing::subscriber::set_default(subscriber);

    let cluster = cluster_id("isolation");
    let foreign = cluster_id("other");
    let a_fun = FunctionSpec::sync("a_fun", |x: i64| x).inline();
    let a = TestNode::start(settings("A", &cluster, &[]), vec![a_fun]).await;
    let x_fun = FunctionSpec::sync("x_fun", |x: i64| x).inline();
    let x = TestNode::start(settings("X", &foreign, &[&a]), vec![x_fun]).await;

    // X keeps dialling its configured peer; wait for two refusals, each seen by both ends.
    wait_until("A to refuse X twice", || async {
        let refused = capture.count(&["peer refused", "node=A", "peer=X"]);
        let told = capture.count(&["refused by peer", "node=X"]);
        (refused >= 2 && told >= 2).then_some(())
    })
    .await;
    let from_a = a.topology().await;
    assert!(member(&from_a, "X").is_none(), "A never lists X: {from_a:#}");
    assert!(!catalog_lists(&a.catalog().await, "X", "x_fun"));
    let from_x = x.topology().await;
    assert!(member(&from_x, "A").is_none(), "X never lists A: {from_x:#}");

    let error = rpc_error(x.client().await.call("a_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "X cannot route to A's functions: {error:?}");
    let error = rpc_error(a.client().await.call("x_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "nor A to X's: {error:?}");

    // The same STATUS from a raw socket gets the refusal in words, then the link closes.
    let mut ws = raw_connect(a.url()).await;
    raw_send(&mut ws, &peer_status("spy", "spy-1", &foreign)).await;
    let refusal = raw_next(&mut ws, SOON).await.expect("a refusal before the close");
    assert_eq!(refusal["role"], "server", "{refusal}");
    assert_eq!(refusal["kind"], "refused", "{refusal}");
    assert!(refusal["reason"].as_str().is_some_and(|r| r.contains(&foreign)), "{refusal}");
    assert_eq!(raw_next(&mut ws, SOON).await, None, "the refused link is closed");
    assert!(member(&a.topology().await, "spy").is_none());
}

/// A peer that closes its link on purpose (close code 4000, as a running fabric does when
/// it drops a silent link or refuses one) is not suspected for it; a peer whose link just
/// ends (a crash) is suspected at once.
#[actix_rt::test]
async fn a_link_closed_on_purpose_suspects_nobody_and_a_broken_one_suspects_at_once() {
    let cluster = cluster_id("close-code");
    // SWIM's own probes would suspect the raw peers (they answer none) after a period; a
    // long period keeps them out of this test.
    let quiet = Settings {
        probe_interval_s: 30.0,
        suspect_after_s: 60.0,
        remove_after_s: 120.0,
        ..settings("A", &cluster, &[])
    };
    let a = TestNode::start(quiet, vec![]).await;
    let mut peers = Vec::new();
    for name in ["polite", "broken"] {
        let mut ws = raw_connect(a.url()).await;
        raw_send(&mut ws, &peer_status(name, &format!("{name}-1"), &cluster)).await;
        let answer = raw_next(&mut ws, SOON).await.expect("A's STATUS");
        assert_eq!(answer["kind"], "status", "{answer}");
        peers.push(ws);
    }
    let state = |topology: &Value, node: &str| member(topology, node).map(|m| m["state"].clone());
    poll_until_async("A to list both peers alive and linked", SOON, || async {
        let topology = a.topology().await;
        ["polite", "broken"]
            .iter()
            .all(|n| state(&topology, n) == Some(json!("alive")) && member(&topology, n).unwrap()["linked"] == true)
            .then_some(())
    })
    .await;
    let (mut polite, broken) = (peers.remove(0), peers.remove(0));

    let on_purpose = CloseFrame { code: CloseCode::from(4000), reason: "link closed by fabric".into() };
    polite.close(Some(on_purpose)).await.expect("close frame sent");
    poll_until_async("A to drop the polite peer's link", SOON, || async {
        (member(&a.topology().await, "polite").unwrap()["linked"] == false).then_some(())
    })
    .await;
    // The TCP connection ends without a close frame.
    drop(broken);
    poll_until_async("A to suspect the broken peer at once", SOON, || async {
        (state(&a.topology().await, "broken") == Some(json!("suspect"))).then_some(())
    })
    .await;
    let topology = a.topology().await;
    assert_eq!(state(&topology, "polite"), Some(json!("alive")), "{topology:#}");
    assert_eq!(a.node.metrics().peers_suspected(), 1, "{topology:#}");
}

/// The ids of `observer`'s links to `node`, from `/topology`.
async fn link_ids(observer: &TestNode, node: &str) -> Vec<u64> {
    let topology = observer.topology().await;
    let links = topology["links"].as_array().cloned().unwrap_or_default();
    links.iter().filter(|l| l[1] == node).filter_map(|l| l[0].as_u64()).collect()
}

#[actix_rt::test]
async fn a_peer_that_dials_again_replaces_the_link_a_partition_left_half_open() {
    let cluster = cluster_id("half-open");
    // Slow SWIM: neither node suspects the other within the test, so only the new link
    // can tell A that its old one is gone.
    let quiet = |name: &str, peers: Vec<String>| Settings {
        peers,
        probe_interval_s: 30.0,
        suspect_after_s: 60.0,
        remove_after_s: 120.0,
        ..cluster_settings(name, &cluster)
    };
    let a = TestNode::start(quiet("A", vec![]), vec![]).await;
    let proxy = Proxy::to(a.url()).await;
    let only_c = FunctionSpec::sync("only_c", |x: i64| x + 1).inline();
    let c = TestNode::start(quiet("C", vec![proxy.url.clone()]), vec![only_c]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "only_c", vec![json!(1)]).await, json!(2));
    let old = link_ids(&a, "C").await;
    assert_eq!(old.len(), 1, "{:#}", a.topology().await);

    // C's end of the link drops; A's end stays open and hears nothing more. C cannot dial
    // again until the proxy opens, by when A's old link has been quiet for over a second.
    proxy.set_open(false);
    proxy.half_cut();
    wait_until("C to lose its link to A", || async { (!linked(&c.topology().await, "A")).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_open(true);

    let new = wait_until("A to hold only C's new link", || async {
        let ids = link_ids(&a, "C").await;
        (ids.len() == 1 && ids != old).then_some(ids)
    })
    .await;
    let timeout = CallOptions { timeout: Some(SOON), ..CallOptions::default() };
    assert_eq!(client.call_with("only_c", vec![json!(2)], timeout.clone()).await.unwrap(), json!(3), "over {new:?}");

    // Again, but C dials again at once: A heard from the old link a moment ago (the reply
    // above), so it keeps it for now, and sends over the newest.
    proxy.half_cut();
    let newest = wait_until("A to admit C's newest link", || async {
        let ids = link_ids(&a, "C").await;
        ids.iter().any(|id| !new.contains(id)).then_some(ids)
    })
    .await;
    assert_eq!(client.call_with("only_c", vec![json!(3)], timeout).await.unwrap(), json!(4), "over {newest:?}");
    assert_eq!(a.node.metrics().peers_suspected(), 0, "{:#}", a.topology().await);
}

// ---------------------------------------------------------------------------------------
// Pub/sub across nodes

#[actix_rt::test]
async fn a_publish_reaches_every_subscriber_in_the_cluster_exactly_once() {
    let cluster = cluster_id("pubsub");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![]).await;
    let c = TestNode::start(settings("C", &cluster, &[&a]), vec![]).await;
    wait_full_mesh(&[&a, &b, &c]).await;

    let clients = [a.client().await, b.client().await, c.client().await];
    let mut subscriptions = Vec::new();
    for client in &clients {
        subscriptions.push(client.subscribe(&["news.#"], None).await.expect("subscribed"));
    }

    clients[1].publish("news.first", json!({"n": 1})).await.expect("published on B");
    for (node, subscription) in ["A", "B", "C"].iter().zip(&mut subscriptions) {
        let message = tokio::time::timeout(SOON, subscription.next())
            .await
            .unwrap_or_else(|_| panic!("the subscriber on {node} gets the message"))
            .expect("subscription open");
        assert_eq!((message.topic.as_str(), &message.payload), ("news.first", &json!({"n": 1})), "on {node}");
    }

    // A duplicate would have been forwarded by some node before that node forwards a
    // message published there later, on the same link. So publish a marker on every node:
    // each subscriber must see the three markers, and nothing else, next.
    for (client, node) in clients.iter().zip(["A", "B", "C"]) {
        client.publish("news.marker", json!({"from": node})).await.expect("marker published");
    }
    for (node, subscription) in ["A", "B", "C"].iter().zip(&mut subscriptions) {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let message = tokio::time::timeout(SOON, subscription.next())
                .await
                .unwrap_or_else(|_| panic!("the subscriber on {node} gets every marker; got {seen:?}"))
                .expect("subscription open");
            assert_eq!(message.topic, "news.marker", "on {node}, after {seen:?}: {message:?}");
            seen.push(message.payload["from"].as_str().unwrap_or_default().to_owned());
        }
        seen.sort();
        assert_eq!(seen, ["A", "B", "C"], "on {node}");
    }
}

/// Each node keeps the messages published through it; a message from another node is
/// delivered to local subscribers but not kept there (its origin keeps it), so a flood
/// costs memory on one node and a backlog replays what was published where it is read.
#[actix_rt::test]
async fn the_backlog_is_kept_by_the_node_a_message_was_published_on() {
    let cluster = cluster_id("backlog");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![]).await;
    wait_full_mesh(&[&a, &b]).await;
    let (on_a, on_b) = (a.client().await, b.client().await);

    let mut live_on_b = on_b.subscribe(&["kept.#"], None).await.expect("subscribed");
    on_a.publish("kept.from_a", json!(1)).await.expect("published on A");
    let delivered = tokio::time::timeout(SOON, live_on_b.next()).await.expect("delivered to B").expect("open");
    assert_eq!(delivered.topic, "kept.from_a");
    let backlog_gauge = |node: &TestNode, name: &str| {
        let text = node.metrics().render(name);
        let line = text.lines().find(|l| l.starts_with("mpreg_pubsub_backlog_messages{")).map(str::to_owned);
        line.and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
    };
    assert_eq!((backlog_gauge(&a, "A"), backlog_gauge(&b, "B")), (Some(1), Some(0)));

    let mut replay_on_a = on_a.subscribe(&["kept.#"], Some(60.0)).await.expect("subscribed");
    let replayed = tokio::time::timeout(SOON, replay_on_a.next()).await.expect("replayed on A").expect("open");
    assert_eq!(replayed.topic, "kept.from_a");
    let mut replay_on_b = on_b.subscribe(&["kept.#"], Some(60.0)).await.expect("subscribed");
    on_b.publish("kept.marker", json!(2)).await.expect("published on B");
    let first = tokio::time::timeout(SOON, replay_on_b.next()).await.expect("marker on B").expect("open");
    assert_eq!(first.topic, "kept.marker", "B replays nothing it did not originate");
}

// ---------------------------------------------------------------------------------------
// Garbage on the peer protocol

#[actix_rt::test]
async fn garbage_and_silence_from_a_connection_do_not_disturb_the_cluster() {
    let cluster = cluster_id("garbage");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b_fun = FunctionSpec::sync("b_fun", |x: i64| x + 1).inline();
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![b_fun]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(1)]).await, json!(2));

    // Connections that never say anything: one websocket, one bare TCP socket.
    let _silent_ws = raw_connect(a.url()).await;
    let _silent_tcp = TcpStream::connect(a.url().trim_start_matches("ws://")).await.expect("tcp connects");

    let mut ws = raw_connect(a.url()).await;
    let garbage = [
        json!({"role": "fabric-gossip", "kind": "nonsense"}),
        json!({"role": "server", "kind": "status"}),
        json!({"role": "fabric-message"}),
        json!({"role": "fabric-gossip", "kind": "members"}),
    ];
    for frame in &garbage {
        ws.send(Message::Text(frame.to_string())).await.unwrap();
        let reply = raw_next(&mut ws, SOON).await.unwrap_or_else(|| panic!("{frame} closed the connection"));
        assert_eq!(reply["error"]["code"], 1002, "{frame} -> {reply}");
        assert_eq!(reply["u"], Value::Null, "{frame} -> {reply}");
    }
    // The same connection still serves requests, remote ones included.
    let rpc = json!({"role": "rpc", "u": "after-garbage", "cmds": [{"name": "r", "fun": "b_fun", "args": [41]}]});
    ws.send(Message::Text(rpc.to_string())).await.unwrap();
    let reply = raw_next(&mut ws, SOON).await.expect("an answer");
    assert_eq!((&reply["u"], &reply["r"]), (&json!("after-garbage"), &json!({"r": 42})), "{reply}");

    // A and B still see each other and route; the silent connections are still open.
    let topology = a.topology().await;
    assert!(linked(&topology, "B"), "{topology:#}");
    assert!(linked(&b.topology().await, "A"));
    assert_eq!(client.call("b_fun", vec![json!(9)]).await.unwrap(), json!(10));
    let fresh = a.client().await;
    assert_eq!(fresh.call("b_fun", vec![json!(0)]).await.unwrap(), json!(1));
}

#[actix_rt::test]
async fn a_connection_that_never_introduced_itself_cannot_make_a_node_leave() {
    let cluster = cluster_id("spoofed-goodbye");
    let a = TestNode::start(settings("A", &cluster, &[]), vec![]).await;
    let b_fun = FunctionSpec::sync("b_fun", |x: i64| x + 1).inline();
    let b = TestNode::start(settings("B", &cluster, &[&a]), vec![b_fun]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(1)]).await, json!(2));
    let topology = a.topology().await;
    let instance = member(&topology, "B").expect("A knows B")["instance_id"].clone();

    // A GOODBYE for B, with B's real instance id, from a socket that is not B.
    let mut ws = raw_connect(a.url()).await;
    let goodbye = json!({"role": "server", "kind": "goodbye", "node": "B", "instance_id": instance});
    ws.send(Message::Text(goodbye.to_string())).await.unwrap();
    // A peer frame before the handshake is refused in words (1004), changing nothing.
    let refusal = raw_next(&mut ws, SOON).await.expect("a refusal");
    assert_eq!(refusal["error"]["code"], 1004, "{refusal}");
    // Requests on one connection are handled in order: once this one is answered, the
    // GOODBYE has reached A's fabric.
    let probe = json!({"role": "rpc", "u": "probe", "cmds": [{"name": "t", "fun": "echo", "args": [1]}]});
    ws.send(Message::Text(probe.to_string())).await.unwrap();
    let reply = raw_next(&mut ws, SOON).await.expect("an answer");
    assert_eq!(reply["u"], "probe", "{reply}");
    // Topology questions queue behind the GOODBYE in the fabric's mailbox.
    let topology = a.topology().await;
    assert!(linked(&topology, "B"), "A still has B: {topology:#}");
    assert_eq!(client.call("b_fun", vec![json!(2)]).await.unwrap(), json!(3));
    drop(b);
}
