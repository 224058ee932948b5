//! In-process node tests: a real node (`NodeBuilder`, port 0) inside the test's actix
//! System, driven over real sockets on 127.0.0.1 by the `mpreg::Client` SDK or, for
//! malformed input, by a raw websocket.
//!
//! Readiness is always observed (an answer, a poll of `/actors`), never waited for with a
//! fixed sleep. Each node is stopped when its [`TestNode`] drops.
//!
//! Run: `cargo test --test node`.

mod common;

use std::time::{Duration, Instant};

use futures_util::future::{join, join3, join_all};
use futures_util::{SinkExt, StreamExt};
use mpreg::client::{CallOptions, SubscriptionStream};
use mpreg::node::NodeError;
use mpreg::{Client, FunctionSpec, NodeBuilder, RpcCommand, Settings, Version};
use mpreg_actors::protocol::{ErrorCode, PubSubMessage};
use mpreg_actors::registry::RegistryError;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::metrics::metric_value;
use common::node::TestNode;
use common::{http_async, poll_until_async, quiet_expected_panics, rpc_error, EXPECTED_PANIC};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(10);

/// Settings of a test node: both ports chosen by the OS.
fn settings() -> Settings {
    Settings { port: 0, monitoring_port: 0, ..Settings::default() }
}

/// One function of each kind, plus the sleeping and hanging ones the timing tests need.
fn test_functions() -> Vec<FunctionSpec> {
    vec![
        // Sync, on the blocking pool (the default for sync code).
        FunctionSpec::sync("mul", |a: i64, b: i64| a * b),
        // Sync, run in place.
        FunctionSpec::sync("add", |a: i64, b: i64| a + b).inline(),
        // Async, its own task.
        FunctionSpec::asynchronous("greet", |name: String| async move {
            tokio::task::yield_now().await;
            format!("hello {name}")
        }),
        FunctionSpec::asynchronous("slow", |seconds: f64| async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            seconds
        }),
        FunctionSpec::asynchronous("hang", std::future::pending::<i64>),
        FunctionSpec::sync("nap", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms));
            ms
        }),
        FunctionSpec::sync("panic_inline", |_: i64| -> i64 { panic!("{EXPECTED_PANIC} inline kaboom") }).inline(),
        FunctionSpec::sync("panic_pool", |_: i64| -> i64 { panic!("{EXPECTED_PANIC} pool kaboom") }),
        FunctionSpec::asynchronous("panic_async", panic_async),
    ]
}

async fn panic_async(_: i64) -> i64 {
    panic!("{EXPECTED_PANIC} async kaboom")
}

impl TestNode {
    fn monitoring(&self, path: &str) -> String {
        format!("{}{path}", self.node.monitoring_url().expect("monitoring is enabled"))
    }
}

async fn assert_echo(client: &Client, tag: &str) {
    assert_eq!(client.call("echo", vec![json!(tag)]).await.expect("echo answers"), json!(tag));
}

// ---------------------------------------------------------------------------------------
// Functions and registration

#[actix_rt::test]
async fn typed_functions_of_every_kind_are_callable() {
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;

    assert_eq!(client.call("mul", vec![json!(6), json!(7)]).await.unwrap(), json!(42));
    assert_eq!(client.call("add", vec![json!(20), json!(22)]).await.unwrap(), json!(42));
    assert_eq!(client.call("greet", vec![json!("ada")]).await.unwrap(), json!("hello ada"));
    assert_eq!(client.call("echo", vec![json!({"k": [1, 2]})]).await.unwrap(), json!({"k": [1, 2]}));

    // A chain across the kinds: inline -> blocking pool -> async.
    let r = client
        .request(vec![
            RpcCommand::new("sum", "add", vec![json!(2), json!(3)]),
            RpcCommand::new("product", "mul", vec![json!("sum"), json!(4)]),
            RpcCommand::new("nap_ms", "nap", vec![json!("product")]),
        ])
        .await
        .unwrap();
    assert_eq!(r, json!({"nap_ms": 20}));

    // Typed arguments are checked: the wrong type is a 1003 naming the argument.
    let error = rpc_error(client.call("mul", vec![json!("six"), json!(7)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::ExecutionFailed));
    assert!(error.details_text().contains("mul() argument 1"), "{error}");
}

#[actix_rt::test]
async fn functions_registered_after_start_become_callable_and_identities_are_guarded() {
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;

    let error = rpc_error(client.call("late", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "{error}");

    node.register(FunctionSpec::sync("late", |x: i64| x + 1)).await.unwrap();
    assert_eq!(client.call("late", vec![json!(1)]).await.unwrap(), json!(2));

    // A second version: the highest wins unless a constraint says otherwise.
    node.register(FunctionSpec::sync("late", |x: i64| x + 100).inline().version(Version::new(2, 0, 0))).await.unwrap();
    assert_eq!(client.call("late", vec![json!(1)]).await.unwrap(), json!(101));
    let older = CallOptions { version_constraint: Some("<2".into()), ..CallOptions::default() };
    assert_eq!(client.call_with("late", vec![json!(1)], older).await.unwrap(), json!(2));

    // Identity conflicts are refused, and refusing them changes nothing.
    let same_name_other_id = node.register(FunctionSpec::sync("late", |x: i64| x).function_id("other.late")).await;
    assert!(matches!(same_name_other_id, Err(RegistryError::Conflict(_))), "{same_name_other_id:?}");
    let other_name_same_id = node.register(FunctionSpec::sync("impostor", |x: i64| x).function_id("mul")).await;
    assert!(matches!(other_name_same_id, Err(RegistryError::Conflict(_))), "{other_name_same_id:?}");
    let duplicate = node.register(FunctionSpec::sync("late", |x: i64| x)).await;
    assert!(matches!(duplicate, Err(RegistryError::Duplicate { .. })), "{duplicate:?}");
    assert_eq!(client.call("late", vec![json!(1)]).await.unwrap(), json!(101));
    assert_eq!(rpc_error(client.call("impostor", vec![json!(1)]).await).kind(), Some(ErrorCode::NotFound));
}

#[actix_rt::test]
async fn conflicting_functions_at_build_time_stop_the_start() {
    // `echo` is built in with function_id `echo`.
    let result = NodeBuilder::new(settings())
        .function(FunctionSpec::sync("echo", |x: Value| x).function_id("mine.echo"))
        .start()
        .await;
    assert!(matches!(result, Err(NodeError::Registry(RegistryError::Conflict(_)))), "{:?}", result.err());
}

// ---------------------------------------------------------------------------------------
// Concurrency, backpressure, timeouts, panics

#[actix_rt::test]
async fn one_client_shared_by_fifty_tasks() {
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;
    let tasks = (0..50i64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let (fun, args, expected) = match i % 4 {
                0 => ("mul", vec![json!(i), json!(3)], json!(i * 3)),
                1 => ("add", vec![json!(i), json!(1000)], json!(i + 1000)),
                2 => ("greet", vec![json!(format!("n{i}"))], json!(format!("hello n{i}"))),
                _ => ("echo", vec![json!({"i": i})], json!({"i": i})),
            };
            (i, client.call(fun, args).await, expected)
        })
    });
    let results = join_all(tasks).await;
    assert_eq!(results.len(), 50);
    for joined in results {
        let (i, result, expected) = joined.expect("task completes");
        assert_eq!(result.unwrap_or_else(|e| panic!("call {i} failed: {e}")), expected, "call {i}");
    }
}

#[actix_rt::test]
async fn a_fast_call_overtakes_a_slow_one_on_the_same_connection() {
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;
    let started = Instant::now();
    // `join` polls the slow call first, so its frame is written first.
    let slow = async { (client.call("slow", vec![json!(1.0)]).await, Instant::now()) };
    let fast = async { (client.call("echo", vec![json!("fast")]).await, Instant::now()) };
    let ((slow, slow_at), (fast, fast_at)) = join(slow, fast).await;
    assert_eq!(fast.unwrap(), json!("fast"));
    assert_eq!(slow.unwrap(), json!(1.0));
    assert!(fast_at < slow_at, "the fast answer came after the slow one");
    assert!(slow_at - started >= Duration::from_secs(1));
}

#[actix_rt::test]
async fn in_flight_limit_refuses_with_1006_and_the_connection_survives() {
    let node = TestNode::start(Settings { max_in_flight_per_connection: 2, ..settings() }, test_functions()).await;
    let client = node.client().await;
    let other = node.client().await;

    let three_slow = join_all((0..3).map(|_| client.call("slow", vec![json!(1.0)])));
    // The limit is per connection: another connection is served meanwhile.
    let (results, other_echo) = join(three_slow, other.call("echo", vec![json!("other")])).await;
    assert_eq!(other_echo.unwrap(), json!("other"));
    let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 2, "{ok:?} / {refused:?}");
    assert_eq!(refused.len(), 1, "{ok:?} / {refused:?}");
    for result in ok {
        assert_eq!(result.unwrap(), json!(1.0));
    }
    let error = refused.into_iter().next().unwrap().unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Overloaded), "{error}");

    // The connection is still usable, and its slots are free again.
    assert_echo(&client, "after overload").await;
    let again = join_all((0..2).map(|_| client.call("slow", vec![json!(0.05)]))).await;
    assert!(again.iter().all(Result::is_ok), "{again:?}");
}

#[actix_rt::test]
async fn per_request_timeout_gives_1004() {
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;
    let started = Instant::now();
    let slow = vec![RpcCommand::new("s", "slow", vec![json!(5.0)])];
    let error = rpc_error(client.request_with_timeout(slow, Some(Duration::from_millis(200))).await);
    assert_eq!(error.kind(), Some(ErrorCode::Timeout), "{error}");
    assert!(error.message.starts_with("RPC execution timed out after 0.2"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(4), "the timeout did not cut the call short");

    // Through `call_with` too, and the connection is fine afterwards.
    let options = CallOptions { timeout: Some(Duration::from_millis(100)), ..CallOptions::default() };
    let error = rpc_error(client.call_with("hang", vec![], options).await);
    assert!(error.message.starts_with("RPC execution timed out after 0.1"), "{error}");
    assert_echo(&client, "after timeouts").await;
}

#[actix_rt::test]
async fn node_timeout_gives_1004_and_hung_functions_block_nothing() {
    let node = TestNode::start(Settings { request_timeout_s: 0.3, ..settings() }, test_functions()).await;
    let client = node.client().await;

    // An async function that never ends and a sync one that outlives the timeout on the
    // blocking pool, with a fast call behind them on the same connection.
    let hang = async { (client.call("hang", vec![]).await, Instant::now()) };
    let nap = client.call("nap", vec![json!(1000)]);
    let fast = async { (client.call("echo", vec![json!("fast")]).await, Instant::now()) };
    let ((hang, hang_at), nap, (fast, fast_at)) = join3(hang, nap, fast).await;

    assert_eq!(fast.unwrap(), json!("fast"));
    assert!(fast_at < hang_at, "the fast call waited for the hung one");
    for error in [rpc_error(hang), rpc_error(nap)] {
        assert_eq!(error.kind(), Some(ErrorCode::Timeout), "{error}");
        assert_eq!(error.message, "RPC execution timed out after 0.3 seconds");
    }
    assert_eq!(client.call("mul", vec![json!(2), json!(21)]).await.unwrap(), json!(42));
    // A request's own timeout overrides the node's.
    let r = client.request_with_timeout(vec![RpcCommand::new("s", "slow", vec![json!(0.5)])], Some(SOON)).await;
    assert_eq!(r.unwrap(), json!({"s": 0.5}));
}

#[actix_rt::test]
async fn a_panicking_function_gives_1003_and_the_node_keeps_serving() {
    quiet_expected_panics();
    let node = TestNode::start(settings(), test_functions()).await;
    let client = node.client().await;
    for round in 0..2 {
        for (fun, what) in
            [("panic_inline", "inline kaboom"), ("panic_pool", "pool kaboom"), ("panic_async", "async kaboom")]
        {
            let error = rpc_error(client.call(fun, vec![json!(1)]).await);
            assert_eq!(error.kind(), Some(ErrorCode::ExecutionFailed), "{error}");
            let details = error.details_text();
            assert!(details.contains(&format!("fun={fun}")) && details.contains(what), "{details}");
            assert!(details.contains("args_types=[int]"), "{details}");
            assert_echo(&client, &format!("after {fun} #{round}")).await;
        }
    }
    // No actor died: the panics stayed inside their requests.
    let tree: Value =
        serde_json::from_str(&http_async("GET", &node.monitoring("/actors")).await.unwrap().body).unwrap();
    let children = tree["children"].as_array().expect("children");
    assert!(children.iter().all(|c| c["restarts"] == json!(0) && c["state"] == json!("running")), "{tree}");
}

// ---------------------------------------------------------------------------------------
// Bad input over a raw websocket

/// A websocket without the SDK, to send what the SDK never would.
struct RawSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    echoes: u32,
}

/// What came back on a raw socket.
#[derive(Debug)]
enum Received {
    Text(Value),
    Binary(Value),
    Closed(String),
}

impl RawSocket {
    async fn connect(url: &str) -> RawSocket {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("raw websocket connects");
        RawSocket { ws, echoes: 0 }
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        self.ws.send(Message::Text(text.into())).await.expect("frame sent");
    }

    async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    /// The next data frame or the end of the connection (pings are answered by the
    /// library and skipped here).
    async fn receive(&mut self) -> Received {
        loop {
            let next = tokio::time::timeout(SOON, self.ws.next()).await.expect("an answer within the deadline");
            let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).expect("replies are JSON");
            return match next {
                Some(Ok(Message::Text(text))) => Received::Text(parse(text.as_bytes())),
                Some(Ok(Message::Binary(bytes))) => Received::Binary(parse(&bytes)),
                Some(Ok(Message::Close(frame))) => Received::Closed(format!("close frame {frame:?}")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => Received::Closed(format!("error {e}")),
                None => Received::Closed("end of stream".into()),
            };
        }
    }

    /// The next text reply.
    async fn reply(&mut self) -> Value {
        match self.receive().await {
            Received::Text(value) => value,
            other => panic!("expected a text reply, got {other:?}"),
        }
    }

    /// Proves the connection still serves requests.
    async fn assert_usable(&mut self) {
        self.echoes += 1;
        let tag = format!("alive-{}", self.echoes);
        self.send_json(json!({"role": "rpc", "u": tag, "cmds": [{"name": "e", "fun": "echo", "args": [tag]}]})).await;
        let reply = self.reply().await;
        assert_eq!(reply["u"], json!(tag), "{reply}");
        assert_eq!(reply["r"], json!({"e": tag}), "{reply}");
    }
}

/// Asserts an RPC error reply with `code`, `u` and details containing `needle`.
fn assert_error_reply(reply: &Value, code: u16, u: Value, needle: &str) {
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    assert_eq!(reply["u"], u, "{reply}");
    assert_eq!(reply["r"], Value::Null, "{reply}");
    let details = reply["error"]["details"].as_str().unwrap_or_default();
    assert!(details.contains(needle), "details {details:?} lack {needle:?}: {reply}");
}

#[actix_rt::test]
async fn bad_input_is_answered_and_the_connection_stays_usable() {
    let node = TestNode::start(Settings { max_frame_bytes: 1024, ..settings() }, test_functions()).await;
    let mut raw = RawSocket::connect(node.url()).await;
    raw.assert_usable().await;

    let cases: Vec<(&str, String, u16, Value, &str)> = vec![
        ("invalid JSON", "this is not json".into(), 1002, Value::Null, "invalid JSON"),
        ("truncated JSON", r#"{"role":"rpc","u":"j1","cmds":["#.into(), 1002, Value::Null, "invalid JSON"),
        ("missing cmds", json!({"role": "rpc", "u": "m1"}).to_string(), 1002, json!("m1"), "cmds"),
        ("missing fun", json!({"role": "rpc", "u": "m2", "cmds": [{"name": "a"}]}).to_string(), 1002, json!("m2"), "fun"),
        ("cmds not a list", json!({"role": "rpc", "u": "t1", "cmds": "nope"}).to_string(), 1002, json!("t1"), "invalid type"),
        (
            "args not a list",
            json!({"role": "rpc", "u": "t2", "cmds": [{"name": "a", "fun": "echo", "args": {"x": 1}}]}).to_string(),
            1002,
            json!("t2"),
            "invalid type",
        ),
        ("unknown role", json!({"role": "bogus", "u": "r1"}).to_string(), 1004, json!("r1"), "Unknown role: bogus"),
        ("no role", json!({"u": "r2", "cmds": []}).to_string(), 1004, json!("r2"), "Unknown role: null"),
        (
            "unknown function",
            json!({"role": "rpc", "u": "n1", "cmds": [{"name": "a", "fun": "no_such_fun"}]}).to_string(),
            1001,
            json!("n1"),
            "no_such_fun",
        ),
        (
            "cycle",
            json!({"role": "rpc", "u": "c1", "cmds": [
                {"name": "a", "fun": "echo", "args": ["b"]},
                {"name": "b", "fun": "echo", "args": ["a"]},
            ]})
            .to_string(),
            1002,
            json!("c1"),
            "dependency cycle",
        ),
        (
            "self reference",
            json!({"role": "rpc", "u": "c2", "cmds": [{"name": "a", "fun": "echo", "args": ["a"]}]}).to_string(),
            1002,
            json!("c2"),
            "dependency cycle",
        ),
        (
            "duplicate names",
            json!({"role": "rpc", "u": "d1", "cmds": [
                {"name": "a", "fun": "echo", "args": [1]},
                {"name": "a", "fun": "echo", "args": [2]},
            ]})
            .to_string(),
            1002,
            json!("d1"),
            "",
        ),
        (
            "bad version constraint",
            json!({"role": "rpc", "u": "v1", "cmds": [{"name": "a", "fun": "echo", "args": [1], "version_constraint": "~1"}]})
                .to_string(),
            1002,
            json!("v1"),
            "",
        ),
        (
            "frame too large",
            // 1500 bytes: over max_frame_bytes (1024), under twice it; answered under its `u`.
            format!(r#"{{"role":"rpc","u":"big","cmds":[{{"name":"e","fun":"echo","args":["{}"]}}]}}"#, "x".repeat(1430)),
            1002,
            json!("big"),
            "frame too large",
        ),
    ];
    for (what, frame, code, u, needle) in cases {
        if what == "frame too large" {
            assert!((1025..2048).contains(&frame.len()), "{}", frame.len());
        }
        raw.send_text(frame).await;
        let reply = raw.reply().await;
        assert_error_reply(&reply, code, u, needle);
        raw.assert_usable().await;
    }

    // Binary frames are answered in binary.
    raw.ws.send(Message::Binary(b"not json either".to_vec())).await.unwrap();
    match raw.receive().await {
        Received::Binary(reply) => assert_error_reply(&reply, 1002, Value::Null, "invalid JSON"),
        other => panic!("expected a binary reply, got {other:?}"),
    }
    raw.assert_usable().await;

    // A broken pub/sub request gets a failed ack.
    raw.send_json(json!({"role": "pubsub-subscribe", "u": "ps1"})).await;
    let ack = raw.reply().await;
    assert_eq!(
        (&ack["role"], &ack["operation_id"], &ack["success"]),
        (&json!("pubsub-ack"), &json!("ps1"), &json!(false))
    );
    assert!(ack["error"].as_str().is_some_and(|e| e.contains("subscription")), "{ack}");
    raw.assert_usable().await;
}

#[actix_rt::test]
async fn a_frame_over_twice_the_limit_ends_only_its_connection() {
    let node = TestNode::start(Settings { max_frame_bytes: 1024, ..settings() }, test_functions()).await;
    let mut bystander = RawSocket::connect(node.url()).await;
    let mut offender = RawSocket::connect(node.url()).await;
    offender.assert_usable().await;

    let huge =
        format!(r#"{{"role":"rpc","u":"huge","cmds":[{{"name":"e","fun":"echo","args":["{}"]}}]}}"#, "y".repeat(3000));
    // The server may close before it has read the whole frame, so the send itself may fail.
    let _ = offender.ws.send(Message::Text(huge)).await;
    // An error reply and/or the end of the connection; never an answer to the request.
    let mut ending = None;
    for _ in 0..3 {
        match offender.receive().await {
            Received::Text(reply) | Received::Binary(reply) => {
                assert_eq!(reply["error"]["code"], json!(1002), "{reply}");
                assert_eq!(reply["r"], Value::Null, "{reply}");
            }
            Received::Closed(how) => {
                ending = Some(how);
                break;
            }
        }
    }
    let ending = ending.expect("the connection that sent an oversized frame was closed");
    assert!(!ending.is_empty());

    // The node still serves: the other connection and new ones.
    bystander.assert_usable().await;
    let mut fresh = RawSocket::connect(node.url()).await;
    fresh.assert_usable().await;
    assert_echo(&node.client().await, "after the oversized frame").await;
}

// ---------------------------------------------------------------------------------------
// Pub/sub through the SDK

/// The next message of a subscription, within the deadline.
async fn next_message(stream: &mut SubscriptionStream) -> PubSubMessage {
    tokio::time::timeout(SOON, stream.next()).await.expect("a notification in time").expect("subscription open")
}

/// Asserts the next messages are exactly these topics, in order.
async fn assert_topics(stream: &mut SubscriptionStream, topics: &[&str]) {
    for topic in topics {
        let message = next_message(stream).await;
        assert_eq!(&message.topic, topic, "subscription {} got {message:?}", stream.id);
    }
}

#[actix_rt::test]
async fn pubsub_wildcards_deliver_once_per_subscription() {
    let node = TestNode::start(settings(), test_functions()).await;
    let (subscriber, publisher) = (node.client().await, node.client().await);
    // Both patterns match `news.sport`: still one notification.
    let mut news = subscriber.subscribe(&["news.#", "news.*"], None).await.unwrap();
    let mut sport = subscriber.subscribe(&["*.sport"], None).await.unwrap();
    let mut weather = subscriber.subscribe(&["weather.#"], None).await.unwrap();

    // Notifications of one subscriber leave in publish order, so a later message that a
    // subscription does match shows what it received before: each assertion below also
    // proves there was no duplicate and no stray delivery ahead of it.
    for topic in ["news.sport", "news", "x.sport", "weather.today", "news.end"] {
        publisher.publish(topic, json!({"topic": topic})).await.unwrap();
    }
    assert_topics(&mut news, &["news.sport", "news", "news.end"]).await;
    assert_topics(&mut sport, &["news.sport", "x.sport"]).await;
    assert_topics(&mut weather, &["weather.today"]).await;

    let first = {
        publisher.publish("weather.later", json!({"n": 7})).await.unwrap();
        next_message(&mut weather).await
    };
    assert_eq!(first.payload, json!({"n": 7}));
    assert!(!first.message_id.is_empty());
}

#[actix_rt::test]
async fn pubsub_backlog_is_replayed_on_request() {
    let node = TestNode::start(settings(), test_functions()).await;
    let publisher = node.client().await;
    for (topic, n) in [("hist.a", 1), ("other.b", 2), ("hist.c", 3)] {
        publisher.publish(topic, json!(n)).await.unwrap();
    }
    let late = node.client().await;
    let mut with_backlog = late.subscribe(&["hist.*"], Some(60.0)).await.unwrap();
    let mut without = late.subscribe(&["hist.*"], None).await.unwrap();
    publisher.publish("hist.live", json!(4)).await.unwrap();

    let replayed = [next_message(&mut with_backlog).await, next_message(&mut with_backlog).await];
    assert_eq!(replayed.map(|m| (m.topic, m.payload)), [("hist.a".into(), json!(1)), ("hist.c".into(), json!(3))]);
    assert_topics(&mut with_backlog, &["hist.live"]).await;
    // Without a backlog request the first message is the live one.
    assert_topics(&mut without, &["hist.live"]).await;
}

#[actix_rt::test]
async fn unsubscribe_stops_delivery() {
    let node = TestNode::start(settings(), test_functions()).await;
    let (subscriber, publisher) = (node.client().await, node.client().await);

    // Through the SDK: the ended stream closes, the other keeps receiving.
    let mut gone = subscriber.subscribe(&["u.#"], None).await.unwrap();
    let mut kept = subscriber.subscribe(&["u.#"], None).await.unwrap();
    subscriber.unsubscribe(&gone).await.unwrap();
    publisher.publish("u.one", json!(1)).await.unwrap();
    assert_topics(&mut kept, &["u.one"]).await;
    assert!(tokio::time::timeout(SOON, gone.next()).await.expect("closed stream returns").is_none());
    // Unsubscribing twice: the server no longer knows the id.
    assert!(subscriber.unsubscribe(&gone).await.is_err());

    // On the wire: the server really stops sending to the removed subscription.
    let mut raw = RawSocket::connect(node.url()).await;
    for (u, id) in [("s1", "raw-gone"), ("s2", "raw-kept")] {
        raw.send_json(json!({"role": "pubsub-subscribe", "u": u,
            "subscription": {"subscription_id": id, "patterns": [{"pattern": "w.#"}]}}))
            .await;
        assert_eq!(raw.reply().await["success"], json!(true));
    }
    raw.send_json(json!({"role": "pubsub-unsubscribe", "u": "s3", "subscription_id": "raw-gone"})).await;
    assert_eq!(raw.reply().await["success"], json!(true));
    publisher.publish("w.first", json!(1)).await.unwrap();
    publisher.publish("w.second", json!(2)).await.unwrap();
    // Every notification of `w.first` is queued before any of `w.second`.
    let mut seen = Vec::new();
    while seen.last() != Some(&("raw-kept".to_owned(), "w.second".to_owned())) {
        let note = raw.reply().await;
        assert_eq!(note["role"], json!("pubsub-notification"), "{note}");
        let id = note["subscription_id"].as_str().unwrap_or_default().to_owned();
        seen.push((id, note["message"]["topic"].as_str().unwrap_or_default().to_owned()));
    }
    assert!(seen.iter().all(|(id, _)| id == "raw-kept"), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    raw.assert_usable().await;
}

// ---------------------------------------------------------------------------------------
// Supervision

/// `GET /actors`, then the named child's `restarts` and `state`.
async fn child_status(node: &TestNode, name: &str) -> Option<(u64, String)> {
    let reply = http_async("GET", &node.monitoring("/actors")).await.ok()?;
    let tree: Value = serde_json::from_str(&reply.body).ok()?;
    let child = tree["children"].as_array()?.iter().find(|c| c["name"] == json!(name))?.clone();
    Some((child["restarts"].as_u64()?, child["state"].as_str()?.to_owned()))
}

async fn wait_restarted(node: &TestNode, name: &str, restarts: u64) {
    poll_until_async(&format!("{name} restarted {restarts} time(s)"), SOON, || async move {
        let status = child_status(node, name).await?;
        (status == (restarts, "running".to_owned())).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn crashed_actors_are_restarted_and_keep_serving() {
    quiet_expected_panics();
    let node = TestNode::start(settings(), test_functions()).await;
    let (client, publisher) = (node.client().await, node.client().await);
    node.register(FunctionSpec::sync("before_crash", |x: i64| x * 10)).await.unwrap();

    let health = http_async("GET", &node.monitoring("/health")).await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(serde_json::from_str::<Value>(&health.body).unwrap()["status"], json!("ok"));
    for name in ["registry", "pubsub", "monitor"] {
        assert_eq!(child_status(&node, name).await, Some((0, "running".into())), "{name}");
    }
    assert!(!node.crash_actor("no_such_actor").await);

    // PubSub: restarted; its subscriptions are lost by design, new ones work.
    assert!(node.crash_actor("pubsub").await);
    wait_restarted(&node, "pubsub", 1).await;
    let mut stream = client.subscribe(&["after.#"], None).await.unwrap();
    publisher.publish("after.crash", json!("still here")).await.unwrap();
    assert_eq!(next_message(&mut stream).await.payload, json!("still here"));
    assert_echo(&client, "after pubsub crash").await;

    // Registry: restarted; the table survives, and registration works again.
    assert!(node.crash_actor("registry").await);
    wait_restarted(&node, "registry", 1).await;
    assert_eq!(client.call("add", vec![json!(1), json!(2)]).await.unwrap(), json!(3));
    assert_eq!(client.call("before_crash", vec![json!(4)]).await.unwrap(), json!(40));
    node.register(FunctionSpec::sync("after_crash", |x: i64| x - 1)).await.unwrap();
    assert_eq!(client.call("after_crash", vec![json!(4)]).await.unwrap(), json!(3));
    assert_eq!(child_status(&node, "pubsub").await, Some((1, "running".into())), "one_for_one");

    let metrics = http_async("GET", &node.monitoring("/metrics")).await.unwrap();
    assert_eq!(metrics.status, 200);
    let restarts = metric_value(&metrics.body, "mpreg_actor_restarts_total", "node=").unwrap_or(0.0);
    assert!(restarts >= 2.0, "{}", metrics.body);
    let ok = metric_value(&metrics.body, "mpreg_requests_total", r#"code="ok""#).unwrap_or(0.0);
    assert!(ok >= 4.0, "{}", metrics.body);
    assert!(metrics.body.contains("# TYPE mpreg_requests_total counter"), "{}", metrics.body);
}

/// The dashboard: one page, nothing fetched from elsewhere, every endpoint it polls served,
/// and still served by the monitor's next incarnation after a crash.
#[actix_rt::test]
async fn dashboard_is_one_self_contained_page_over_served_endpoints() {
    quiet_expected_panics();
    let node = TestNode::start(settings(), test_functions()).await;
    let page = http_async("GET", &node.monitoring("/")).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>MPREG node</title>"), "{}", page.body);
    for external in ["src=", "href=", "https://", "@import", "url("] {
        assert!(!page.body.contains(external), "the page loads something ({external})");
    }
    // The only absolute URL is the SVG namespace, an identifier that is never fetched.
    assert_eq!(page.body.matches("http://").count(), 1);
    for path in ["/health", "/topology", "/actors", "/metrics", "/queues"] {
        assert!(page.body.contains(&format!("\"{path}\"")), "the page no longer polls {path}");
        assert_eq!(http_async("GET", &node.monitoring(path)).await.unwrap().status, 200, "{path}");
    }
    assert!(node.crash_actor("monitor").await);
    wait_restarted(&node, "monitor", 1).await;
    assert_eq!(http_async("GET", &node.monitoring("/")).await.unwrap().body, page.body);
}
