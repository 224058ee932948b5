//! Workers over real sockets: a Rust worker ([`mpreg::worker::Worker`]) and raw protocol
//! workers (tungstenite, every frame by hand) against nodes on port 0.
//!
//! Register and call (also inside a DAG with the node's own functions); a worker's error
//! is a 1003 naming it; two workers share the load within their max concurrency; a
//! worker gone mid-call has its call retried on another worker, or answered 1005 (not a
//! timeout); its functions leave the catalog; garbage disconnects the worker and the node
//! stays healthy; the deadline travels with the call and a late call is cancelled;
//! a silent worker is disconnected; with credentials a worker needs the token; a call
//! on node A is served by a worker on node B; a worker whose connection breaks
//! reconnects and registers again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mpreg::client::CallOptions;
use mpreg::worker::{Backoff, RunningWorker, Worker, WorkerError};
use mpreg::{FunctionError, FunctionSpec, RpcCommand, Settings};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::keys::Keys;
use common::metrics::metric_value;
use common::node::{cluster_settings, TestNode};
use common::proxy::Proxy;
use common::ws::{raw_connect, raw_next, Ws};
use common::{cluster_id, get_ok, poll_until_async, rpc_error, TempFile};

const SOON: Duration = Duration::from_secs(10);

fn settings(name: &str) -> Settings {
    cluster_settings(name, &cluster_id(name))
}

async fn node(settings: Settings) -> TestNode {
    TestNode::start(settings, Vec::new()).await
}

async fn monitor(node: &TestNode, path: &str) -> String {
    let url = format!("{}{path}", node.monitoring_url().expect("monitoring is enabled"));
    get_ok(&url).await.expect("monitoring answers")
}

/// Polls until `fun` is (or is no longer) in the catalog `node` serves at `/catalog`.
async fn wait_for_function(node: &TestNode, fun: &str, present: bool) {
    poll_until_async(&format!("{fun} present={present} on {}", node.name()), SOON, || async {
        let catalog: Value = serde_json::from_str(&monitor(node, "/catalog").await).ok()?;
        let found = catalog["nodes"]
            .as_array()?
            .iter()
            .flat_map(|n| n["functions"].as_array().into_iter().flatten())
            .any(|f| f["name"] == fun);
        (found == present).then_some(())
    })
    .await;
}

/// A worker serving `double` and `fail` (a ValueError naming its argument).
async fn doubler(node: &TestNode, name: &str) -> RunningWorker {
    Worker::new(node.url(), name)
        .function(FunctionSpec::sync("double", |x: i64| x * 2).resources(["cpu"]).version("1.2.0".parse().unwrap()))
        .function(FunctionSpec::sync("fail", |x: i64| -> Result<i64, FunctionError> {
            Err(FunctionError::value_error(format!("bad {x}")))
        }))
        .start()
        .await
        .expect("worker registers")
}

/// Says goodbye for `worker` (the node's only one so far to do so): `fun` leaves the
/// catalog and the goodbye is counted once.
async fn leaves_with_goodbye(worker: RunningWorker, node: &TestNode, fun: &str) {
    worker.goodbye().await;
    wait_for_function(node, fun, false).await;
    poll_until_async("the goodbye counted", SOON, || async {
        let metrics = monitor(node, "/metrics").await;
        (metric_value(&metrics, "mpreg_workers_left_total", "reason=\"goodbye\"") == Some(1.0)).then_some(())
    })
    .await;
}

/// A raw worker: registered, with its `worker-registered` frame.
async fn raw_worker(url: &str, name: &str, functions: Value, extra: Value) -> (Ws, Value) {
    let mut ws = raw_connect(url).await;
    let mut register = json!({"role": "worker-register", "u": "r1", "name": name, "functions": functions});
    if let (Some(fields), Some(more)) = (register.as_object_mut(), extra.as_object()) {
        fields.extend(more.clone());
    }
    ws.send(Message::text(register.to_string())).await.expect("register sent");
    let reply = raw_next(&mut ws, SOON).await.expect("worker-registered");
    assert_eq!(reply["role"], "worker-registered", "{reply}");
    (ws, reply)
}

/// The next frame with `role` (heartbeat-free: raw workers send none unless told).
async fn next_role(ws: &mut Ws, role: &str) -> Value {
    loop {
        let frame = raw_next(ws, SOON).await.unwrap_or_else(|| panic!("closed before a {role}"));
        if frame["role"] == role {
            return frame;
        }
    }
}

/// Reads until the node closes the websocket; the close reason.
async fn close_reason(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(SOON, ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.reason.to_string()).unwrap_or_default(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return e.to_string(),
            None => return String::new(),
        }
    }
}

#[actix_rt::test]
async fn a_worker_serves_calls_like_the_nodes_own_functions() {
    let n = node(settings("worker-basic")).await;
    let worker = doubler(&n, "w1").await;
    let c = n.client().await;
    assert_eq!(c.call("double", vec![json!(21)]).await.unwrap(), json!(42));
    // Routed by resources and version like any function.
    let options =
        CallOptions { locs: vec!["cpu".into()], version_constraint: Some(">=1.2,<2".into()), ..Default::default() };
    assert_eq!(c.call_with("double", vec![json!(5)], options).await.unwrap(), json!(10));
    let missing = CallOptions { locs: vec!["gpu".into()], ..Default::default() };
    assert_eq!(rpc_error(c.call_with("double", vec![json!(5)], missing).await).code, 1001);
    // In a DAG with the node's own echo.
    let r = c
        .request(vec![RpcCommand::new("a", "echo", vec![json!(4)]), RpcCommand::new("b", "double", vec![json!("a")])])
        .await
        .unwrap();
    assert_eq!(r, json!({"b": 8}));
    // A worker's failure: the usual one-line 1003, naming the worker.
    let error = rpc_error(c.call("fail", vec![json!(3)]).await);
    assert_eq!(error.code, 1003);
    let details = error.details_text();
    assert!(details.contains("fun=fail") && details.contains("ValueError: bad 3 (worker=w1)"), "{details}");
    assert!(details.contains("args_types=[int]"), "{details}");
    // Marked as served by a worker in /catalog and /metrics.
    let catalog: Value = serde_json::from_str(&monitor(&n, "/catalog").await).unwrap();
    let workers = catalog["workers"].as_array().expect("workers listed");
    assert_eq!(workers.len(), 1, "{catalog}");
    assert_eq!(workers[0]["name"], "w1");
    let served: Vec<&str> =
        workers[0]["functions"].as_array().unwrap().iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(served, ["double", "fail"]);
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_workers", ""), Some(1.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "mpreg_worker_function_workers", "fun=\"double\""), Some(1.0));
    assert_eq!(metric_value(&metrics, "mpreg_worker_calls_total", "outcome=\"error\""), Some(1.0));
    // Counted per function too: three calls of double ran, one of fail failed.
    let calls = |labels: &str| metric_value(&metrics, "mpreg_function_calls_total", labels);
    assert_eq!(calls(r#"fun="double",version="1.2.0",outcome="ok""#), Some(3.0), "{metrics}");
    assert_eq!(calls(r#"fun="double",version="1.2.0",outcome="error""#), Some(0.0));
    assert_eq!(calls(r#"fun="fail",version="1.0.0",outcome="error""#), Some(1.0));
    assert!(metric_value(&metrics, "mpreg_function_seconds_total", r#"fun="double""#).is_some_and(|s| s > 0.0));
    // A clean goodbye takes its functions out at once.
    leaves_with_goodbye(worker, &n, "double").await;
}

/// A function that records how many of its calls run at once, per worker.
fn who(name: &'static str, running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>) -> FunctionSpec {
    FunctionSpec::asynchronous("who", move || {
        let (running, peak) = (running.clone(), peak.clone());
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            name
        }
    })
}

#[actix_rt::test]
async fn two_workers_share_the_load_within_their_max_concurrency() {
    let n = node(settings("worker-share")).await;
    let (peaks, mut workers) = (vec![Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))], Vec::new());
    for (i, name) in ["left", "right"].into_iter().enumerate() {
        let spec = who(name, Arc::new(AtomicUsize::new(0)), peaks[i].clone());
        workers.push(Worker::new(n.url(), name).max_concurrency(2).function(spec).start().await.expect("registers"));
    }
    let c = n.client().await;
    // Twelve calls at once against 2 + 2 slots: the rest wait for a free slot.
    let calls = (0..12).map(|_| c.call("who", vec![]));
    let answers = futures_util::future::join_all(calls).await;
    let names: Vec<String> = answers.into_iter().map(|a| a.expect("served").as_str().unwrap().to_owned()).collect();
    for name in ["left", "right"] {
        assert!(names.iter().any(|n| n == name), "{name} served nothing: {names:?}");
    }
    for (i, peak) in peaks.iter().enumerate() {
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=2).contains(&peak), "worker {i} ran {peak} calls at once (max_concurrency 2)");
    }
    // Two registrations of one function: one registry entry, two workers.
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_worker_function_workers", "fun=\"who\""), Some(2.0), "{metrics}");
}

#[actix_rt::test]
async fn a_worker_gone_mid_call_is_retried_on_another_or_answered_1005() {
    let n = node(settings("worker-gone")).await;
    let functions = json!([{"name": "slow"}]);
    // A raw worker takes the call and dies without answering; a Rust worker serves too.
    let (mut dying, _) = raw_worker(n.url(), "dying", functions.clone(), json!({"max_concurrency": 1})).await;
    let c = n.client().await;
    let call = {
        let c = n.client().await;
        tokio::spawn(async move { c.call("slow", vec![json!(7)]).await })
    };
    let frame = next_role(&mut dying, "worker-call").await;
    assert_eq!(frame["args"], json!([7]));
    let backup = Worker::new(n.url(), "backup")
        .function(FunctionSpec::sync("slow", |x: i64| x + 1))
        .start()
        .await
        .expect("backup registers");
    drop(dying);
    assert_eq!(call.await.unwrap().expect("retried on the backup"), json!(8));
    // Alone this time: the call is lost, 1005 — not a timeout.
    let (mut dying, _) = raw_worker(n.url(), "dying-again", functions, json!({})).await;
    backup.abort().await;
    let call = {
        let c = n.client().await;
        tokio::spawn(async move { c.call("slow", vec![json!(1)]).await })
    };
    next_role(&mut dying, "worker-call").await;
    drop(dying);
    let error = rpc_error(call.await.unwrap());
    assert_eq!(error.code, 1005, "{error:?}");
    assert!(error.details_text().contains("dying-again"), "{error:?}");
    // Its functions left with it.
    wait_for_function(&n, "slow", false).await;
    assert_eq!(c.call("echo", vec![json!("still here")]).await.unwrap(), json!("still here"));
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_worker_calls_total", "outcome=\"lost\""), Some(1.0), "{metrics}");
}

#[actix_rt::test]
async fn garbage_disconnects_the_worker_and_the_node_stays_healthy() {
    let n = node(settings("worker-garbage")).await;
    let c = n.client().await;
    let garbage: [&[u8]; 4] = [
        br#"{"role":"worker-result"}"#,
        b"not json at all",
        br#"{"role":"worker-nonsense"}"#,
        br#"{"role":"worker-register","u":"again","name":"x","functions":[{"name":"g"}]}"#,
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let fun = format!("g{i}");
        let (mut ws, _) = raw_worker(n.url(), "bad", json!([{"name": fun}]), json!({})).await;
        wait_for_function(&n, &fun, true).await;
        ws.send(Message::binary(bytes.to_vec())).await.expect("sent");
        let reason = close_reason(&mut ws).await;
        assert!(reason.starts_with("worker protocol error"), "{reason}");
        wait_for_function(&n, &fun, false).await;
    }
    // Not a worker yet: a bad worker frame is answered, the connection stays.
    let mut ws = raw_connect(n.url()).await;
    ws.send(Message::text(r#"{"role":"worker-result","id":"1","u":"q"}"#)).await.unwrap();
    let reply = raw_next(&mut ws, SOON).await.expect("answered");
    assert_eq!(reply["error"]["code"], 1002, "{reply}");
    // Registrations refused for their content register nothing.
    for (functions, extra) in [
        (json!([]), json!({})),
        (json!([{"name": "v", "version": "not-a-version"}]), json!({})),
        (json!([{"name": "echo"}]), json!({})),
        (json!([{"name": "z"}]), json!({"max_concurrency": 0})),
    ] {
        let (_ws, reply) = raw_worker(n.url(), "refused", functions.clone(), extra).await;
        assert_eq!(reply["error"]["code"], 1002, "{functions}: {reply}");
    }
    assert_eq!(c.call("echo", vec![json!(1)]).await.unwrap(), json!(1));
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_workers_left_total", "reason=\"protocol_error\""), Some(4.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "mpreg_workers", ""), Some(0.0), "{metrics}");
}

#[actix_rt::test]
async fn the_deadline_travels_with_the_call_and_a_late_call_is_cancelled() {
    let n = node(settings("worker-deadline")).await;
    let (mut ws, _) = raw_worker(n.url(), "sleepy", json!([{"name": "nap"}]), json!({})).await;
    let call = {
        let c = n.client().await;
        let options = CallOptions { timeout: Some(Duration::from_secs(1)), ..Default::default() };
        tokio::spawn(async move { c.call_with("nap", vec![], options).await })
    };
    let frame = next_role(&mut ws, "worker-call").await;
    let timeout_ms = frame["timeout_ms"].as_u64().expect("timeout_ms");
    assert!((1..=1000).contains(&timeout_ms), "{frame}");
    // No answer: the client gets the request's timeout, the worker a cancel.
    assert_eq!(rpc_error(call.await.unwrap()).code, 1004);
    let cancel = next_role(&mut ws, "worker-cancel").await;
    assert_eq!(cancel["id"], frame["id"]);
    // A late result for it is ignored, not garbage.
    let late = json!({"role": "worker-result", "id": frame["id"], "result": 1});
    ws.send(Message::text(late.to_string())).await.unwrap();
    let c = n.client().await;
    let call = tokio::spawn(async move { c.call("nap", vec![json!(2)]).await });
    let frame = next_role(&mut ws, "worker-call").await;
    let answer = json!({"role": "worker-result", "id": frame["id"], "result": "rested"});
    ws.send(Message::text(answer.to_string())).await.unwrap();
    assert_eq!(call.await.unwrap().unwrap(), json!("rested"));
}

#[actix_rt::test]
async fn a_silent_worker_is_disconnected() {
    let settings = Settings { worker_heartbeat_s: 0.1, worker_timeout_s: 0.3, ..settings("worker-silent") };
    let n = node(settings).await;
    let (mut ws, reply) = raw_worker(n.url(), "mute", json!([{"name": "quiet"}]), json!({})).await;
    assert_eq!(reply["heartbeat_s"], 0.1);
    assert_eq!(close_reason(&mut ws).await, "worker missed heartbeats");
    wait_for_function(&n, "quiet", false).await;
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_workers_left_total", "reason=\"missed_heartbeats\""), Some(1.0));
    // A worker that keeps its heartbeat stays (the Rust worker beats every heartbeat_s).
    let worker = doubler(&n, "lively").await;
    let c = n.client().await;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(c.call("double", vec![json!(i)]).await.unwrap(), json!(i * 2));
    }
    worker.goodbye().await;
}

#[actix_rt::test]
async fn with_credentials_a_worker_needs_the_token() {
    let cluster = cluster_id("worker-token");
    let keys = Keys::new(&cluster);
    let token = TempFile::new("worker-token", "s3cret-token\n");
    let with_token = Settings {
        credentials: Some(keys.issue("A")),
        worker_token_file: Some(token.path().to_owned()),
        ..cluster_settings("A", &cluster)
    };
    let n = node(with_token).await;
    let spec = || FunctionSpec::sync("guarded", |x: i64| x);
    for bad in [None, Some("wrong")] {
        let worker = Worker::new(n.url(), "intruder").function(spec());
        let worker = match bad {
            Some(t) => worker.token(t),
            None => worker,
        };
        match worker.start().await {
            Err(WorkerError::Refused(error)) => assert_eq!(error["code"], 1002, "{error}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }
    let worker =
        Worker::new(n.url(), "trusted").token("s3cret-token").function(spec()).start().await.expect("accepted");
    assert_eq!(n.client().await.call("guarded", vec![json!(3)]).await.unwrap(), json!(3));
    worker.goodbye().await;
    // Credentials without a token file: no worker at all.
    let keys_b = Keys::new(&cluster);
    let no_token = Settings { credentials: Some(keys_b.issue("B")), ..cluster_settings("B", &cluster) };
    let b = node(no_token).await;
    let refused = Worker::new(b.url(), "w").token("anything").function(spec()).start().await;
    assert!(matches!(refused, Err(WorkerError::Refused(_))), "{:?}", refused.err());
}

#[actix_rt::test]
async fn max_workers_is_a_counted_refusal() {
    let n = node(Settings { max_workers: 1, ..settings("worker-max") }).await;
    let first = doubler(&n, "first").await;
    let (_ws, reply) = raw_worker(n.url(), "second", json!([{"name": "other"}]), json!({})).await;
    assert_eq!(reply["error"]["code"], 1006, "{reply}");
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_limit_exceeded_total", "limit=\"max_workers\""), Some(1.0));
    first.goodbye().await;
}

#[actix_rt::test]
async fn a_call_on_node_a_is_served_by_a_worker_on_node_b() {
    let cluster = cluster_id("worker-two-nodes");
    let a = node(cluster_settings("A", &cluster)).await;
    let b = node(Settings { peers: vec![a.url().to_owned()], ..cluster_settings("B", &cluster) }).await;
    let worker = doubler(&b, "on-b").await;
    wait_for_function(&a, "double", true).await;
    // A's /catalog marks B's entry as served by a worker (and B's own echo as not). Both of
    // the worker's functions are there as soon as one is: they arrive in one catalog update.
    let catalog: Value = serde_json::from_str(&monitor(&a, "/catalog").await).unwrap();
    let b_entry = catalog["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "B").unwrap();
    let by_worker: Vec<&str> = b_entry["about"]
        .as_array()
        .map(|about| about.iter().filter(|f| f["worker"] == true).filter_map(|f| f["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(by_worker, ["double", "fail"], "{b_entry}");
    let c = a.client().await;
    let r = c
        .request(vec![
            RpcCommand::new("a", "echo", vec![json!(5)]),
            RpcCommand::new("b", "double", vec![json!("a")]),
            RpcCommand::new("c", "echo", vec![json!("b")]),
        ])
        .await
        .unwrap();
    assert_eq!(r, json!({"c": 10}));
    let error = rpc_error(c.call("fail", vec![json!(1)]).await);
    assert_eq!(error.code, 1003);
    assert!(error.details_text().contains("node=B") && error.details_text().contains("worker=on-b"), "{error:?}");
    // The worker leaves: its functions leave the cluster's catalog too.
    worker.abort().await;
    wait_for_function(&a, "double", false).await;
    // A worker on A dies mid-call and A has no other: the call goes to B's worker.
    let on_b = Worker::new(b.url(), "hop-b").function(FunctionSpec::sync("hop", |x: i64| x + 100)).start().await;
    let _on_b = on_b.expect("registers on B");
    poll_until_async("A to know B's hop", SOON, || async {
        let catalog: Value = serde_json::from_str(&monitor(&a, "/catalog").await).ok()?;
        let b_entry = catalog["nodes"].as_array()?.iter().find(|n| n["node"] == "B")?.clone();
        b_entry["functions"].as_array()?.iter().any(|f| f["name"] == "hop").then_some(())
    })
    .await;
    let (mut dying, _) = raw_worker(a.url(), "hop-a", json!([{"name": "hop"}]), json!({})).await;
    let call = tokio::spawn(async move { c.call("hop", vec![json!(1)]).await });
    next_role(&mut dying, "worker-call").await;
    drop(dying);
    assert_eq!(call.await.unwrap().expect("retried on B"), json!(101));
}

#[actix_rt::test]
async fn a_worker_whose_connection_breaks_reconnects_and_registers_again() {
    let n = node(settings("worker-reconnect")).await;
    let proxy = Proxy::to(n.url()).await;
    let worker = Worker::new(&proxy.url, "phoenix")
        .backoff(Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) })
        .function(FunctionSpec::sync("triple", |x: i64| x * 3))
        .start()
        .await
        .expect("worker registers");
    let first = worker.worker_id();
    let c = n.client().await;
    assert_eq!(c.call("triple", vec![json!(2)]).await.unwrap(), json!(6));
    for round in 0..2 {
        let before = worker.worker_id();
        proxy.cut();
        poll_until_async(&format!("registration {round} replaced"), SOON, || async {
            (worker.worker_id() != before).then_some(())
        })
        .await;
        poll_until_async("triple served again", SOON, || async {
            c.call("triple", vec![json!(5)]).await.ok().filter(|v| *v == json!(15))
        })
        .await;
    }
    assert_ne!(worker.worker_id(), first);
    // The node dropped each broken registration: one worker is left.
    poll_until_async("one worker left", SOON, || async {
        (metric_value(&monitor(&n, "/metrics").await, "mpreg_workers", "") == Some(1.0)).then_some(())
    })
    .await;
    worker.goodbye().await;
    wait_for_function(&n, "triple", false).await;
}

/// The next `worker-call` on either of a worker's two websockets: which one (0 or 1) and
/// the call.
async fn next_call_on_either(main: &mut Ws, lane: &mut Ws) -> (usize, Value) {
    tokio::select! {
        call = next_role(main, "worker-call") => (0, call),
        call = next_role(lane, "worker-call") => (1, call),
    }
}

#[actix_rt::test]
async fn lanes_carry_calls_need_their_key_and_fall_with_the_worker() {
    // Two listener threads: a worker is offered one lane.
    let n = node(Settings { workers: 2, ..settings("worker-lanes") }).await;
    let (mut main, reply) = raw_worker(n.url(), "laned", json!([{"name": "lane_fn"}]), json!({})).await;
    assert_eq!(reply["lanes"], 1, "{reply}");
    let key = reply["lane_key"].as_str().expect("a lane key").to_owned();
    let worker_id = reply["worker_id"].clone();
    let lane_frame = |u: &str, id: &Value, key: &str| {
        Message::text(json!({"role": "worker-lane", "u": u, "worker_id": id, "lane_key": key}).to_string())
    };
    // Only the key's holder adds a lane, and only to a worker this node has.
    for (u, id, key) in [("bad-key", &worker_id, "0".repeat(32)), ("no-worker", &json!("999"), key.clone())] {
        let mut ws = raw_connect(n.url()).await;
        ws.send(lane_frame(u, id, &key)).await.unwrap();
        let refused = raw_next(&mut ws, SOON).await.expect("answered");
        assert_eq!((refused["u"].as_str(), &refused["error"]["code"]), (Some(u), &json!(1002)), "{refused}");
    }
    let mut lane = raw_connect(n.url()).await;
    lane.send(lane_frame("l1", &worker_id, &key)).await.unwrap();
    let joined = raw_next(&mut lane, SOON).await.expect("answered");
    assert_eq!((&joined["role"], &joined["worker_id"]), (&json!("worker-registered"), &worker_id), "{joined}");
    // One lane per extra listener thread: a second is a counted refusal.
    let mut extra = raw_connect(n.url()).await;
    extra.send(lane_frame("l2", &worker_id, &key)).await.unwrap();
    assert_eq!(raw_next(&mut extra, SOON).await.expect("answered")["error"]["code"], 1002);
    // Clients are spread over both threads: the calls of those on the lane's thread come
    // on the lane, the others on the registering websocket; each is answered where it came.
    let mut came_on = [0, 0];
    for i in 0..4 {
        let c = n.client().await;
        let call = tokio::spawn(async move { c.call("lane_fn", vec![json!(i)]).await });
        let (on, frame) = next_call_on_either(&mut main, &mut lane).await;
        came_on[on] += 1;
        let answer =
            Message::text(json!({"role": "worker-result", "id": frame["id"], "result": frame["args"][0]}).to_string());
        [&mut main, &mut lane][on].send(answer).await.unwrap();
        assert_eq!(call.await.unwrap().unwrap(), json!(i));
    }
    assert!(came_on[0] > 0 && came_on[1] > 0, "calls per websocket: {came_on:?}");
    let catalog: Value = serde_json::from_str(&monitor(&n, "/catalog").await).unwrap();
    assert_eq!(catalog["workers"].as_array().map(Vec::len), Some(1), "one worker, two websockets: {catalog}");
    // Losing the lane loses the worker: its functions leave, its other websocket is closed.
    drop(lane);
    assert!(close_reason(&mut main).await.starts_with("worker left (disconnected)"));
    wait_for_function(&n, "lane_fn", false).await;
    let metrics = monitor(&n, "/metrics").await;
    assert_eq!(metric_value(&metrics, "mpreg_limit_exceeded_total", "limit=\"worker_lanes\""), Some(1.0));
    assert_eq!(metric_value(&metrics, "mpreg_peer_refused_total", "reason=\"worker_lane_key\""), Some(1.0));
    // The Rust worker opens its lane; calls from either thread are answered, and its
    // goodbye counts once, as one worker's.
    let worker = doubler(&n, "rusty").await;
    for i in 0..4 {
        assert_eq!(n.client().await.call("double", vec![json!(i)]).await.unwrap(), json!(i * 2));
    }
    leaves_with_goodbye(worker, &n, "double").await;
}
