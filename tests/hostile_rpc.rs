//! Hostile RPC requests against a real in-process node (port 0, the `demo` functions):
//! every amplification attack of issue 6 is answered with the 1002 naming its bound,
//! bounded in time, while a bystander connection keeps answering echo quickly and the
//! process's memory stays bounded; numbers come back exactly or are refused; a
//! structure-aware fuzz of rpc frames always gets an answer.
//!
//! The fuzz runs `MPREG_FUZZ_CASES` cases (default 24): `MPREG_FUZZ_CASES=5000 cargo test
//! --test hostile_rpc fuzz` for a long run.
//!
//! Run: `cargo test --test hostile_rpc`.

mod common;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use mpreg::{NodeBuilder, Settings};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::memory::rss_mib;
use common::node::TestNode;
use common::{http_async, poll_until_async, quiet_expected_panics};

/// Upper bound for one hostile request's answer on a loaded 2-core machine (debug build).
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// The bystander's 99th-percentile echo latency while attacks run.
const BYSTANDER_P99: Duration = Duration::from_millis(50);

/// How much the process's resident memory may grow during the attacks. Unbounded, the
/// doubling attack alone took 984 MiB and the intermediate-results chain 1.36 GB.
const RSS_GROWTH_MIB: u64 = 400;

fn settings() -> Settings {
    Settings { port: 0, monitoring_port: 0, functions: vec!["demo".to_owned()], ..Settings::default() }
}

/// A websocket speaking raw text frames, so a test controls every byte sent.
struct RawSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawSocket {
    async fn connect(url: &str) -> RawSocket {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        RawSocket { ws }
    }

    async fn send(&mut self, text: String) {
        self.ws.send(Message::Text(text)).await.expect("frame sent");
    }

    /// The next reply as text (pings skipped); panics if none comes in time.
    async fn next_text(&mut self, within: Duration) -> String {
        loop {
            let next = tokio::time::timeout(within, self.ws.next()).await.expect("a reply within the deadline");
            match next {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Binary(bytes))) => return String::from_utf8_lossy(&bytes).into_owned(),
                Some(Ok(Message::Close(frame))) => panic!("connection closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed: {e}"),
                None => panic!("connection ended"),
            }
        }
    }

    /// Sends `frame` and returns the reply whose `u` is `u` (replies to other requests,
    /// pipelined before, are skipped).
    async fn call(&mut self, u: &str, frame: String) -> Value {
        self.send(frame).await;
        self.reply_to(u).await
    }

    async fn reply_to(&mut self, u: &str) -> Value {
        loop {
            let reply: Value = serde_json::from_str(&self.next_text(ANSWER_WITHIN).await).expect("replies are JSON");
            if reply["u"] == json!(u) {
                return reply;
            }
        }
    }

    /// The reply to `u`, or one to a frame whose `u` could not be read.
    async fn reply_to_or_null(&mut self, u: &str) -> Value {
        loop {
            let reply: Value = serde_json::from_str(&self.next_text(ANSWER_WITHIN).await).expect("replies are JSON");
            if reply["u"] == json!(u) || reply["u"].is_null() {
                return reply;
            }
        }
    }
}

fn rpc(u: &str, cmds: Value) -> String {
    json!({"role": "rpc", "u": u, "cmds": cmds}).to_string()
}

/// Asserts a failed reply with `code` whose details contain `needle`.
fn assert_error(reply: &Value, code: u16, needle: &str) {
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    assert_eq!(reply["r"], Value::Null, "{reply}");
    let details = reply["error"]["details"].as_str().unwrap_or_default();
    assert!(details.contains(needle), "details {details:?} lack {needle:?}");
}

/// `c0 = echo("x")`, `c_i = echos(c_{i-1} × fan)`.
fn doubling(levels: usize, fan: usize) -> Value {
    let mut cmds = vec![json!({"name": "c0", "fun": "echo", "args": ["x"]})];
    for i in 1..=levels {
        let prev = format!("c{}", i - 1);
        cmds.push(json!({"name": format!("c{i}"), "fun": "echos", "args": vec![prev; fan]}));
    }
    Value::Array(cmds)
}

/// `c0 = echo(x)`, `c_i = fun(c_{i-1})`.
fn chain(levels: usize, fun: &str) -> Value {
    let mut cmds = vec![json!({"name": "c0", "fun": "echo", "args": ["some payload"]})];
    for i in 1..=levels {
        cmds.push(json!({"name": format!("c{i}"), "fun": fun, "args": [format!("c{}", i - 1)]}));
    }
    Value::Array(cmds)
}

/// Echo latencies on its own connection until told to stop, and the highest RSS seen.
async fn bystander(url: String, stop: Arc<AtomicBool>) -> (Vec<Duration>, u64) {
    let mut socket = RawSocket::connect(&url).await;
    let (mut latencies, mut peak) = (Vec::new(), rss_mib());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let u = format!("bystander-{n}");
        let started = Instant::now();
        let reply = socket.call(&u, rpc(&u, json!([{"name": "e", "fun": "echo", "args": [n]}]))).await;
        latencies.push(started.elapsed());
        assert_eq!(reply["r"]["e"], json!(n), "{reply}");
        peak = peak.max(rss_mib());
        // Paced like an interactive client, not a load generator.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (latencies, peak)
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort_unstable();
    latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
}

#[actix_rt::test]
async fn amplification_attacks_are_refused_quickly_while_a_bystander_keeps_its_latency() {
    let node = TestNode::start(settings(), vec![]).await;
    // Frames built before the clock starts: the test's own JSON work is not the node's.
    let attacks: Vec<(&str, Value, bool, &str)> = vec![
        // 1.9 KB frame, 984 MiB unbounded: runs on the Planner (23 commands).
        ("doubling", doubling(22, 2), false, "max_substitution_bytes"),
        // Few commands, so it starts in place; it pauses there and ends on the Planner.
        ("fan-out", doubling(12, 40), false, "max_substitution_bytes"),
        // 1.36 GB unbounded: each level repeats every earlier result.
        ("intermediate", chain(4000, "echo"), true, "max_reply_bytes"),
        // Blocked a worker 8.2 s unbounded.
        ("nesting", chain(9_999, "echos"), false, "max_value_depth"),
        ("too-many", chain(10_000, "echo"), false, "max_commands_per_request"),
    ];
    let frames: Vec<(String, String, &str)> = attacks
        .iter()
        .flat_map(|(name, cmds, intermediate, limit)| {
            (0..2).map(move |k| {
                let u = format!("{name}-{k}");
                let frame = json!({"role": "rpc", "u": u, "cmds": cmds, "return_intermediate_results": intermediate});
                (u, frame.to_string(), *limit)
            })
        })
        .collect();
    let baseline = rss_mib();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = actix_rt::spawn(bystander(node.url().to_owned(), stop.clone()));
    let mut attacker = RawSocket::connect(node.url()).await;
    // The timeout that used to panic the connection: its in-flight neighbour survives.
    attacker.send(rpc("slow", json!([{"name": "s", "fun": "slow", "args": [0.3]}]))).await;
    let huge_timeout = r#"{"role":"rpc","u":"t","timeout":1e300,"cmds":[{"name":"a","fun":"echo","args":[1]}]}"#;
    let reply = attacker.call("t", huge_timeout.to_owned()).await;
    assert_error(&reply, 1002, "max_request_timeout_s");
    assert_eq!(attacker.reply_to("slow").await["r"], json!({"s": 0.3}));

    for (u, frame, limit) in frames {
        let started = Instant::now();
        let reply = attacker.call(&u, frame).await;
        assert_error(&reply, 1002, limit);
        assert!(started.elapsed() < ANSWER_WITHIN, "{u} took {:?}", started.elapsed());
        eprintln!("{u}: 1002 {limit} after {:?}", started.elapsed());
    }
    let reply = attacker.call("after", rpc("after", json!([{"name": "e", "fun": "echo", "args": ["ok"]}]))).await;
    assert_eq!(reply["r"], json!({"e": "ok"}), "the attacker's connection still serves");

    stop.store(true, Ordering::Relaxed);
    let (mut latencies, peak) = watcher.await.expect("bystander ran");
    let p99 = percentile(&mut latencies, 0.99);
    eprintln!(
        "bystander: {} echoes, p50 {:?}, p99 {:?}; RSS {baseline} MiB -> peak {peak} MiB",
        latencies.len(),
        percentile(&mut latencies, 0.5),
        p99
    );
    assert!(latencies.len() >= 20, "the bystander ran only {} echoes", latencies.len());
    assert!(p99 < BYSTANDER_P99, "bystander p99 {p99:?}");
    assert!(peak.saturating_sub(baseline) < RSS_GROWTH_MIB, "RSS grew from {baseline} to {peak} MiB");
    for limit in ["max_substitution_bytes", "max_reply_bytes", "max_value_depth", "max_commands_per_request"] {
        assert!(node.metrics().limit_exceeded_count(limit) >= 2, "{limit} refusals are counted");
    }
    assert_eq!(node.metrics().limit_exceeded_count("max_request_timeout_s"), 1);
}

#[actix_rt::test]
async fn large_requests_within_bounds_run_on_the_planner_and_it_is_supervised() {
    quiet_expected_panics();
    let node = TestNode::start(settings(), vec![]).await;
    let mut socket = RawSocket::connect(node.url()).await;
    let monitoring = node.monitoring_url().expect("monitoring is on").to_owned();
    let planner = || async {
        let body = http_async("GET", &format!("{monitoring}/actors")).await.ok()?.body;
        let tree: Value = serde_json::from_str(&body).ok()?;
        tree["children"].as_array()?.iter().find(|c| c["name"] == json!("planner")).cloned()
    };
    assert_eq!(planner().await.expect("/actors lists the planner")["restarts"], json!(0));

    // 200 commands: over the offload threshold, within every bound.
    let reply = socket.call("long", rpc("long", chain(199, "echo"))).await;
    assert_eq!(reply["r"], json!({"c199": "some payload"}), "{reply}");
    // 15 commands start in place, build past planner_offload_bytes there, pause, and
    // finish on the Planner: the answer is whole.
    let reply = socket.call("grown", rpc("grown", doubling(14, 2))).await;
    let mut value = &reply["r"]["c14"];
    for _ in 0..14 {
        assert_eq!(value.as_array().map(Vec::len), Some(2), "{}", &reply.to_string()[..200]);
        value = &value[1];
    }
    assert_eq!(value, &json!("x"));

    assert!(node.crash_actor("planner").await);
    poll_until_async("the planner restarted", ANSWER_WITHIN, || async {
        let child = planner().await?;
        (child["restarts"] == json!(1) && child["state"] == json!("running")).then_some(())
    })
    .await;
    let reply = socket.call("again", rpc("again", chain(199, "echo"))).await;
    assert_eq!(reply["r"], json!({"c199": "some payload"}), "{reply}");
}

#[actix_rt::test]
async fn numbers_come_back_exactly_or_are_refused() {
    let node = TestNode::start(settings(), vec![]).await;
    let mut socket = RawSocket::connect(node.url()).await;
    let echo = |u: &str, literal: &str| {
        format!(r#"{{"role":"rpc","u":"{u}","cmds":[{{"name":"e","fun":"echo","args":[{literal}]}}]}}"#)
    };

    // Floats: the exact text comes back (it was 0.968864866122192 before).
    socket.send(echo("f", "0.9688648661221919")).await;
    let text = socket.next_text(ANSWER_WITHIN).await;
    assert!(text.contains(r#""e":0.9688648661221919"#), "{text}");
    // 64-bit integers at both ends are kept.
    for (u, literal) in [("max", "18446744073709551615"), ("min", "-9223372036854775808")] {
        socket.send(echo(u, literal)).await;
        let text = socket.next_text(ANSWER_WITHIN).await;
        assert!(text.contains(&format!(r#""e":{literal}"#)), "{text}");
    }
    // Wider integers are refused, never rounded.
    let reply = socket.call("big", echo("big", "123456789012345678901234567890")).await;
    assert_error(&reply, 1002, "does not fit in 64 bits");

    // A non-finite result is a 1003 naming the command, not a null the next one consumes.
    let cmds = json!([
        {"name": "m", "fun": "multiply", "args": [1e308, 10]},
        {"name": "n", "fun": "echo", "args": ["m"]},
    ]);
    let reply = socket.call("inf", rpc("inf", cmds)).await;
    assert_error(&reply, 1003, "command=m fun=multiply");
    assert_error(&reply, 1003, "not a finite number (inf)");
    let reply = socket.call("fine", rpc("fine", json!([{"name": "m", "fun": "multiply", "args": [1.5, 2]}]))).await;
    assert_eq!(reply["r"], json!({"m": 3.0}));
}

// ---------------------------------------------------------------------------------------
// Fuzz: random rpc frames, hostile values included, always answered.

/// Names commands use, and references to them (plain and through paths).
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const FUNS: [&str; 9] = ["echo", "echos", "add", "multiply", "boom", "kw", "ident", "model_score", "nope"];

fn hostile_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(5e-324)),
        Just(json!(0.9688648661221919)),
    ]
}

fn argument() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        hostile_number(),
        prop::sample::select(NAMES.to_vec()).prop_map(Value::from),
        prop::sample::select(vec!["a.k", "b.args", "c.score", "d.nested.deep", "e.x.y.z", "a."]).prop_map(Value::from),
        "[a-z .#*]{0,8}".prop_map(Value::from),
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-e]{1,2}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn command() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(NAMES.to_vec()),
        prop::sample::select(FUNS.to_vec()),
        prop::collection::vec(argument(), 0..4),
        prop::collection::btree_map("[abc]", argument(), 0..2),
        prop::option::of(prop::sample::select(vec![">=1.0", "==2.0.0", "1.5", "garbage", "<0"])),
        prop::option::of(prop::sample::select(vec!["cpu", "gpu", "tpu"])),
    )
        .prop_map(|(name, fun, args, kwargs, version, loc)| {
            let mut cmd = json!({"name": name, "fun": fun, "args": args, "kwargs": kwargs});
            if let Some(version) = version {
                cmd["version_constraint"] = json!(version);
            }
            if let Some(loc) = loc {
                cmd["locs"] = json!([loc]);
            }
            cmd
        })
}

/// A frame, as text: random commands and options, sometimes with raw hostile literals
/// no `Value` can hold (integers beyond 64 bits, a huge timeout).
fn frame() -> impl Strategy<Value = (Value, Option<&'static str>)> {
    let timeout = prop::option::of(prop_oneof![
        Just(json!(1e300)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(0.001)),
        Just(json!(2)),
        Just(json!("soon")),
        Just(json!(18446744073709551615u64)),
    ]);
    (
        prop::collection::vec(command(), 0..8),
        timeout,
        any::<(bool, bool, bool)>(),
        prop::option::of(Just("fuzz.levels")),
        prop::option::of(prop::sample::select(vec![
            "123456789012345678901234567890",
            "-99999999999999999999",
            "1e400",
        ])),
    )
        .prop_map(|(cmds, timeout, (intermediate, summary, debug), topic, raw)| {
            let mut frame = json!({
                "role": "rpc",
                "cmds": cmds,
                "return_intermediate_results": intermediate,
                "include_execution_summary": summary,
                "debug_mode": debug,
            });
            if let Some(timeout) = timeout {
                frame["timeout"] = timeout;
            }
            if let Some(topic) = topic {
                frame["intermediate_result_callback_topic"] = json!(topic);
            }
            (frame, raw)
        })
}

#[test]
fn fuzz_rpc_frames_always_get_an_answer() {
    let cases: u32 = std::env::var("MPREG_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let settings = Settings { request_timeout_s: 2.0, ..settings() };
            let node = NodeBuilder::new(settings).start().await.expect("node starts");
            url_tx.send(node.url().to_owned()).expect("test waits for the URL");
            let _ = stop_rx.await;
            node.shutdown().await;
        });
    });
    let url = url_rx.recv().expect("node started");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Taken out for each case and put back: no borrow is held across an await.
    let socket = RefCell::new(Some(runtime.block_on(RawSocket::connect(&url))));
    let n = Cell::new(0u32);
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    proptest::test_runner::TestRunner::new(config)
        .run(&frame(), |(mut frame, raw)| {
            n.set(n.get() + 1);
            let u = format!("fuzz-{}", n.get());
            frame["u"] = json!(u);
            let mut text = frame.to_string();
            if let Some(raw) = raw {
                // Put a literal no `Value` can hold where an argument would go.
                text = text.replacen(r#""args":["#, &format!(r#""args":[{raw},"#), 1);
            }
            let mut taken = socket.borrow_mut().take().expect("the socket is back after each case");
            let reply = runtime.block_on(async {
                taken.send(text.clone()).await;
                // A frame that is not JSON at all (`1e400` is out of range) is answered
                // without its `u`: frames go one at a time, so that answer is this one's.
                taken.reply_to_or_null(&u).await
            });
            *socket.borrow_mut() = Some(taken);
            let answered = reply.get("r").is_some() && reply.get("error").is_some();
            prop_assert!(answered, "not a response: {} for {}", reply, text);
            if let Some(code) = reply["error"]["code"].as_u64() {
                prop_assert!((1001..=1006).contains(&code), "{}", reply);
            }
            Ok(())
        })
        .unwrap();
    // The connection survived every frame.
    let last = rpc("last", json!([{"name": "e", "fun": "echo", "args": [1]}]));
    let mut socket = socket.into_inner().expect("the socket is back");
    let reply = runtime.block_on(socket.call("last", last));
    assert_eq!(reply["r"], json!({"e": 1}));
    let _ = stop_tx.send(());
    server.join().expect("node thread ends");
}
