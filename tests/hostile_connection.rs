//! Hostile clients against a real in-process node (`NodeBuilder`, port 0): clients that
//! never read, ping floods, malformed websocket frames, requests left waiting.
//!
//! The hostile side speaks the websocket protocol by hand over a plain TCP socket with a
//! small receive buffer ([`RawWs`]), so a test decides exactly when it stops and resumes
//! reading. A bystander client, on its own thread and runtime, times echo calls while an
//! attack runs (paced, one call per 2 ms at most). Memory is the growth of the process's
//! VmRSS (the node is in this process) over the attack; the attacks that measure it run
//! one after another in one test so that they do not blur each other's numbers (the other
//! tests here allocate little). Every attack is bounded in count and time; "the server
//! stopped reading" is observed as a write that makes no progress for 1.5 s, never
//! assumed after a sleep.
//!
//! Run: `cargo test --test hostile_connection -- --nocapture` (prints the numbers);
//! `MPREG_HOSTILE_FULL=1` runs the subscriber attack at full size.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use mpreg::{Client, FunctionSpec, Node, NodeBuilder, Settings};
use mpreg_actors::connection::RESERVED_PLACE_GRACE;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;

use common::latency::p99;
use common::memory::rss_kib;
use common::metrics::metric_value;
use common::ws::{
    masked_frame, peer_status, raw_connect, raw_next, raw_send, BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT,
};
use common::{http_async, poll_until_async};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(20);
/// A write that makes no progress for this long means the server stopped reading.
const STALL: Duration = Duration::from_millis(1500);
/// The bystander's latency bound while an attack runs.
const BYSTANDER_P99: Duration = Duration::from_millis(50);
/// One bystander call per this interval at most.
const BYSTANDER_PACE: Duration = Duration::from_millis(2);

fn settings() -> Settings {
    Settings { port: 0, monitoring_port: 0, ..Settings::default() }
}

/// A running node, stopped on drop.
struct TestNode(Node);

impl TestNode {
    async fn start(settings: Settings) -> TestNode {
        let slow = FunctionSpec::asynchronous("slow", |seconds: f64| async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            seconds
        });
        TestNode(NodeBuilder::new(settings).function(slow).start().await.expect("node starts"))
    }

    fn addr(&self) -> SocketAddr {
        self.0.url().trim_start_matches("ws://").parse().expect("ws://ip:port")
    }

    async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.0.monitoring_url().expect("monitoring is enabled"));
        http_async("GET", &url).await.expect("metrics answer").body
    }

    async fn metric(&self, metric: &str, labels: &str) -> f64 {
        metric_value(&self.metrics().await, metric, labels).unwrap_or(0.0)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.0.shutdown().now_or_never();
    }
}

/// This process's resident memory, in bytes.
fn rss_bytes() -> u64 {
    rss_kib().expect("VmRSS in /proc/self/status") * 1024
}

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// A websocket client by hand

/// A client websocket over a raw TCP socket (4 KiB receive buffer): frames are written
/// and read by hand, so the test controls reading exactly.
struct RawWs {
    reader: FrameReader,
    writer: OwnedWriteHalf,
}

/// The reading half of a [`RawWs`].
struct FrameReader(BufReader<OwnedReadHalf>);

/// One frame as read from the server.
#[derive(Debug)]
struct Frame {
    opcode: u8,
    fin: bool,
    payload: Vec<u8>,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("data frames are JSON")
    }

    fn close_code(&self) -> Option<u16> {
        (self.opcode == CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

fn echo_request(u: &str, payload_len: usize) -> Vec<u8> {
    let arg = "x".repeat(payload_len);
    json!({"role": "rpc", "u": u, "cmds": [{"name": "e", "fun": "echo", "args": [arg]}]}).to_string().into_bytes()
}

impl FrameReader {
    /// The next frame, whatever it is.
    async fn frame(&mut self) -> Frame {
        let reader = &mut self.0;
        let read = async {
            let first = reader.read_u8().await?;
            let second = reader.read_u8().await?;
            let len = match second & 0x7F {
                126 => reader.read_u16().await? as usize,
                127 => reader.read_u64().await? as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            reader.read_exact(&mut payload).await?;
            Ok::<_, std::io::Error>(Frame { opcode: first & 0x0F, fin: first & 0x80 != 0, payload })
        };
        tokio::time::timeout(SOON, read).await.expect("a frame in time").expect("a frame")
    }

    /// The next data message (its fragments joined) or close frame; pings and pongs are
    /// skipped.
    async fn data(&mut self) -> Frame {
        let mut message: Option<Frame> = None;
        loop {
            let frame = self.frame().await;
            match (frame.opcode, message.as_mut()) {
                (PING | PONG, _) => continue,
                (CONTINUATION, Some(started)) => {
                    started.payload.extend_from_slice(&frame.payload);
                    started.fin = frame.fin;
                }
                (CONTINUATION, None) => panic!("a continuation frame outside a message"),
                (_, Some(_)) => panic!("a new message inside a fragmented one: {frame:?}"),
                (_, None) => message = Some(frame),
            }
            if message.as_ref().is_some_and(|m| m.fin) {
                return message.take().expect("a message");
            }
        }
    }
}

impl RawWs {
    async fn connect(addr: SocketAddr) -> RawWs {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small receive buffer");
        let mut stream = socket.connect(addr).await.expect("tcp connects");
        stream.set_nodelay(true).expect("nodelay");
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("handshake sent");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("handshake answer"));
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (reader, writer) = stream.into_split();
        RawWs { reader: FrameReader(BufReader::new(reader)), writer }
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.writer.write_all(&masked_frame(opcode, true, payload)).await.expect("frame written");
    }

    async fn send_json(&mut self, value: Value) {
        self.send(BINARY, value.to_string().as_bytes()).await;
    }

    /// Writes `frames` until the server stops taking bytes (no progress for [`STALL`]) or
    /// all are written. Returns how many frames were started and what is left unwritten of
    /// the last one.
    async fn write_until_stalled(&mut self, frames: impl Iterator<Item = Vec<u8>>) -> (usize, Vec<u8>) {
        let mut started = 0;
        for bytes in frames {
            started += 1;
            let mut written = 0;
            while written < bytes.len() {
                match tokio::time::timeout(STALL, self.writer.write(&bytes[written..])).await {
                    Ok(Ok(n)) => written += n,
                    Ok(Err(e)) => panic!("write failed: {e}"),
                    Err(_) => return (started, bytes[written..].to_vec()),
                }
            }
        }
        (started, Vec::new())
    }
}

// ---------------------------------------------------------------------------------------
// The bystander

/// Times echo calls from its own thread and runtime until stopped; the latencies.
struct Bystander {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl Bystander {
    /// Connected and warmed up when this returns.
    async fn start(url: &str) -> Bystander {
        let (url, stop, calls) = (url.to_owned(), Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stopped, counted) = (stop.clone(), calls.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let client = Client::connect(&url).await.expect("bystander connects");
                client.call("echo", vec![json!("warm")]).await.expect("warm-up echo");
                let _ = ready_tx.send(());
                let mut latencies = Vec::new();
                // Paced like a client with work of its own, so the bystander measures the
                // node without competing with it for the two cores.
                let mut pace = tokio::time::interval(BYSTANDER_PACE);
                while !stopped.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let started = Instant::now();
                    let reply = tokio::time::timeout(SOON, client.call("echo", vec![json!("bystander")])).await;
                    assert_eq!(reply.expect("bystander answered in time").expect("echo"), json!("bystander"));
                    latencies.push(started.elapsed());
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                latencies
            })
        });
        tokio::time::timeout(SOON, ready_rx).await.expect("bystander ready in time").expect("bystander ready");
        Bystander { stop, calls, thread }
    }

    /// Waits (on its progress, not on a clock) until it made `more` calls from now, so its
    /// p99 covers the attack.
    async fn make_calls(&self, more: usize) {
        let target = self.calls.load(Ordering::Relaxed) + more;
        poll_until_async("bystander calls during the attack", SOON, || async {
            (self.calls.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops it; the p99 of its calls (at least `min_calls` of them).
    fn p99(self, min_calls: usize) -> (Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies = self.thread.join().expect("bystander thread");
        assert!(latencies.len() >= min_calls, "only {} bystander calls", latencies.len());
        (p99(&mut latencies), latencies.len())
    }
}

// ---------------------------------------------------------------------------------------
// Memory: the attacks that fill buffers, one after another

/// A client that never reads sends up to `requests` echo requests of `payload` bytes: the
/// node stops reading it once its outbox is full, memory grows less than `rss_bound`, the
/// bystander keeps its latency, and every reply arrives once the client reads.
async fn non_reading_echo_flood(node: &TestNode, bystander_url: &str, requests: usize, payload: usize, rss_bound: u64) {
    let before = rss_bytes();
    let bystander = Bystander::start(bystander_url).await;

    let mut attacker = RawWs::connect(node.addr()).await;
    let frames = (0..requests).map(|i| masked_frame(BINARY, true, &echo_request(&format!("f{i}"), payload)));
    let (started, rest) = attacker.write_until_stalled(frames).await;
    assert!(started < requests, "the node kept reading a client that does not read ({started} requests taken)");
    let pauses = node.metric("mpreg_limit_exceeded_total", r#"limit="max_outbound_bytes_per_connection""#).await;
    assert!(pauses >= 1.0, "the pause is counted: {pauses}");
    bystander.make_calls(200).await;
    let grown = rss_bytes().saturating_sub(before);
    let (p99, calls) = bystander.p99(100);
    println!(
        "echo flood: node stopped reading after {started} requests of {} KiB; RSS +{} MiB (bound {}); \
         bystander p99 {p99:?} over {calls} calls",
        payload / 1024,
        grown / MIB,
        rss_bound / MIB
    );
    assert!(grown < rss_bound, "RSS grew {} MiB", grown / MIB);
    assert!(p99 < BYSTANDER_P99, "bystander p99 {p99:?}");

    // The client reads again: every request it started is answered, the last one included.
    let RawWs { mut reader, mut writer } = attacker;
    let finish = tokio::spawn(async move {
        writer.write_all(&rest).await.expect("rest of the last request");
        writer
    });
    let mut seen = HashSet::new();
    while seen.len() < started {
        let reply = reader.data().await.json();
        assert_eq!(reply["r"]["e"].as_str().map(str::len), Some(payload), "an echo reply: {}", reply["error"]);
        seen.insert(reply["u"].as_str().expect("u").to_owned());
    }
    drop(finish.await.expect("writer task"));
}

/// A client sends 200,000 pings and does not read the pongs: at most one pong waits, new
/// clients are served at once, the bystander keeps its latency, memory stays bounded.
async fn ping_flood(node: &TestNode, bystander_url: &str) {
    const PINGS: usize = 200_000;
    const RSS_BOUND: u64 = 64 * MIB;
    let before = rss_bytes();
    let bystander = Bystander::start(bystander_url).await;
    let mut attacker = RawWs::connect(node.addr()).await;
    // 1,000 pings per write, each with the largest payload a ping may carry (125 bytes), so
    // that their pongs (25 MB) overflow every socket buffer on the way back.
    let batch: Vec<u8> = (0..1000).flat_map(|_| masked_frame(PING, true, &[b'p'; 125])).collect();
    let (started, rest) = attacker.write_until_stalled(std::iter::repeat_n(batch, PINGS / 1000)).await;
    bystander.make_calls(200).await;
    // A newcomer is served at once.
    let newcomer = Instant::now();
    let client =
        tokio::time::timeout(SOON, Client::connect(node.0.url())).await.expect("connects in time").expect("connects");
    assert_eq!(client.call("echo", vec![json!("new")]).await.expect("echo"), json!("new"));
    let newcomer = newcomer.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    let (p99, calls) = bystander.p99(200);
    println!(
        "ping flood: {} pings written{}; RSS +{} MiB (bound {}); new client served in {newcomer:?}; \
         bystander p99 {p99:?} over {calls} calls",
        started * 1000,
        if rest.is_empty() { "" } else { " (then the node stopped reading)" },
        grown / MIB,
        RSS_BOUND / MIB
    );
    assert!(grown < RSS_BOUND, "RSS grew {} MiB", grown / MIB);
    assert!(p99 < BYSTANDER_P99, "bystander p99 {p99:?}");
    assert!(newcomer < Duration::from_secs(2), "a new client waited {newcomer:?}");

    // It reads again: pongs, then the connection still serves a request.
    let RawWs { mut reader, mut writer } = attacker;
    let finish = tokio::spawn(async move {
        writer.write_all(&rest).await.expect("rest of the pings");
        writer.write_all(&masked_frame(BINARY, true, &echo_request("after-pings", 10))).await.expect("request");
        writer
    });
    let mut pongs = 0usize;
    loop {
        let frame = reader.frame().await;
        match frame.opcode {
            PONG => pongs += 1,
            BINARY => {
                assert_eq!(frame.json()["u"], json!("after-pings"), "{}", frame.json());
                break;
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    println!("ping flood: {pongs} pongs for {PINGS} pings");
    assert!((1..PINGS).contains(&pongs), "{pongs} pongs: the pongs were not coalesced");
    drop(finish.await.expect("writer task"));
}

/// A subscriber with 10 subscriptions stops reading; 40 messages of 1 MB are published
/// (400 MB of notifications; 40 rather than 100 keeps the debug-built test near 15 s;
/// `MPREG_HOSTILE_FULL=1` publishes 100):
/// the notifications that do not fit its outbox are dropped and counted, memory stays
/// bounded, the publisher and the bystander are not slowed.
async fn non_reading_subscriber(node: &TestNode, bystander_url: &str) {
    const SUBSCRIPTIONS: usize = 10;
    // `MPREG_HOSTILE_FULL=1` runs the attack at the size the issue reported (100 publishes).
    let publishes: usize = if std::env::var_os("MPREG_HOSTILE_FULL").is_some() { 100 } else { 40 };
    const RSS_BOUND: u64 = 96 * MIB;
    let mut subscriber = RawWs::connect(node.addr()).await;
    for i in 0..SUBSCRIPTIONS {
        let subscription = json!({"subscription_id": format!("s{i}"), "patterns": [{"pattern": "big.#"}]});
        subscriber
            .send_json(json!({"role": "pubsub-subscribe", "u": format!("sub{i}"), "subscription": subscription}))
            .await;
    }
    for _ in 0..SUBSCRIPTIONS {
        assert_eq!(subscriber.reader.data().await.json()["success"], json!(true));
    }
    // From here on the subscriber reads nothing.
    let dropped_before = node.metric("mpreg_pubsub_notifications_dropped_total", "node=").await;
    let before = rss_bytes();
    let bystander = Bystander::start(bystander_url).await;
    let publisher = Client::connect(node.0.url()).await.expect("publisher connects");
    let payload = json!("p".repeat(1_000_000));
    let publishing = Instant::now();
    for _ in 0..publishes {
        tokio::time::timeout(SOON, publisher.publish("big.data", payload.clone()))
            .await
            .expect("publish acknowledged in time")
            .expect("publish");
    }
    let publishing = publishing.elapsed();
    bystander.make_calls(100).await;
    let grown = rss_bytes().saturating_sub(before);
    let (p99, calls) = bystander.p99(100);
    let dropped = node.metric("mpreg_pubsub_notifications_dropped_total", "node=").await - dropped_before;
    println!(
        "subscriber flood: {publishes} x 1 MB to {SUBSCRIPTIONS} subscriptions in {publishing:?}; {dropped} \
         notifications dropped; RSS +{} MiB (bound {}); bystander p99 {p99:?} over {calls} calls",
        grown / MIB,
        RSS_BOUND / MIB
    );
    assert!(grown < RSS_BOUND, "RSS grew {} MiB", grown / MIB);
    assert!(dropped >= (publishes * SUBSCRIPTIONS / 2) as f64, "only {dropped} notifications dropped");
    assert!(p99 < BYSTANDER_P99, "bystander p99 {p99:?}");
}

/// 16 messages of 1 MB are kept in the backlog; a client that never reads asks for 20
/// replays of it (320 MB of notifications) in one write: the acks come at once, the
/// replays wait for room in its outbox, one at a time, so memory stays bounded; once it
/// reads, every ack and every replayed message arrives.
async fn non_reading_backlog_replays() {
    const KEPT: usize = 16;
    const REPLAYS: usize = 20;
    const RSS_BOUND: u64 = 96 * MIB;
    // The attacker is silent while it does not read: a slow run must not see it closed.
    let node = TestNode::start(Settings { client_timeout_s: 600.0, ..settings() }).await;
    let publisher = Client::connect(node.0.url()).await.expect("publisher connects");
    let payload = json!("r".repeat(1_000_000));
    for _ in 0..KEPT {
        tokio::time::timeout(SOON, publisher.publish("replay.big", payload.clone()))
            .await
            .expect("publish acknowledged in time")
            .expect("publish");
    }
    drop(payload);
    let before = rss_bytes();
    let bystander = Bystander::start(node.0.url()).await;
    let mut attacker = RawWs::connect(node.addr()).await;
    let subscribes: Vec<u8> = (0..REPLAYS)
        .flat_map(|i| {
            let subscription = json!({"subscription_id": format!("r{i}"), "patterns": [{"pattern": "replay.#"}],
                "get_backlog": true, "backlog_seconds": 300.0});
            let frame = json!({"role": "pubsub-subscribe", "u": format!("sub{i}"), "subscription": subscription});
            masked_frame(BINARY, true, frame.to_string().as_bytes())
        })
        .collect();
    attacker.writer.write_all(&subscribes).await.expect("subscribes written");
    // The node counts a pause when it next looks for a frame from the client while its
    // outbox is over the bound: the client keeps sending small pings until it does.
    let deadline = Instant::now() + SOON;
    loop {
        attacker.send(PING, b"p").await;
        let pauses = node.metric("mpreg_limit_exceeded_total", r#"limit="max_outbound_bytes_per_connection""#).await;
        if pauses >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the node never stopped reading the client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bystander.make_calls(200).await;
    let grown = rss_bytes().saturating_sub(before);
    let (p99, calls) = bystander.p99(100);
    println!(
        "replay flood: {REPLAYS} replays of {KEPT} x 1 MB asked by a client that does not read; RSS +{} MiB \
         (bound {}); bystander p99 {p99:?} over {calls} calls",
        grown / MIB,
        RSS_BOUND / MIB
    );
    assert!(grown < RSS_BOUND, "RSS grew {} MiB", grown / MIB);
    assert!(p99 < BYSTANDER_P99, "bystander p99 {p99:?}");

    // It reads: every ack, and every subscription's whole replay.
    let (mut acks, mut replayed) = (0, vec![0usize; REPLAYS]);
    while acks < REPLAYS || replayed.iter().sum::<usize>() < REPLAYS * KEPT {
        let frame = attacker.reader.data().await;
        if frame.payload.len() < 4096 {
            let ack = frame.json();
            assert_eq!((&ack["role"], &ack["success"]), (&json!("pubsub-ack"), &json!(true)), "{ack}");
            acks += 1;
        } else {
            let head = String::from_utf8_lossy(&frame.payload[..200]);
            assert!(head.contains("pubsub-notification") && head.contains("replay.big"), "{head}");
            let tail = String::from_utf8_lossy(&frame.payload[frame.payload.len() - 200..]);
            let id = tail.split(r#""subscription_id":"r"#).nth(1).and_then(|t| t.split('"').next()).expect("id");
            replayed[id.parse::<usize>().expect("r<i>")] += 1;
        }
    }
    assert_eq!(replayed, vec![KEPT; REPLAYS]);
}

#[actix_rt::test]
async fn clients_that_do_not_read_cost_bounded_memory_and_nobody_else_waits() {
    // A one-message backlog: this test measures delivery, not retention.
    let node = TestNode::start(Settings { pubsub_backlog_max: 1, ..settings() }).await;
    let url = node.0.url().to_owned();
    // The issue's attack: 10,000 requests of 100 KiB (1 GB held before backpressure).
    non_reading_echo_flood(&node, &url, 10_000, 100 * 1024, 96 * MIB).await;
    // Large replies: 200 of 4 MiB. Each is handed to actix-ws in 64 KiB fragments, so what
    // actix-ws holds stays small too.
    non_reading_echo_flood(&node, &url, 200, 4 * 1024 * 1024, 96 * MIB).await;
    ping_flood(&node, &url).await;
    non_reading_subscriber(&node, &url).await;
    drop(node);
    non_reading_backlog_replays().await;
}

// ---------------------------------------------------------------------------------------
// Websocket edges

#[actix_rt::test]
async fn invalid_utf8_in_a_text_frame_closes_1007() {
    let node = TestNode::start(settings()).await;
    let mut ws = RawWs::connect(node.addr()).await;
    ws.send(TEXT, b"{\"role\":\"rpc\",\"u\":\"\xff\xfe\"}").await;
    let mut frame = ws.reader.data().await;
    if frame.opcode != CLOSE {
        frame = ws.reader.data().await; // the error reply may come first
    }
    assert_eq!(frame.close_code(), Some(1007), "{frame:?}");
}

/// A client's close is answered with its own code, after the replies already due, and the
/// server then ends the TCP connection itself (the client sees EOF without hanging up
/// first: a websocket client waits for the server to close, RFC 6455 §7.1.1).
#[actix_rt::test]
async fn a_close_is_answered_with_its_own_code_and_the_server_ends_the_connection() {
    let node = TestNode::start(settings()).await;
    for (sent, echoed) in [(Some(1000u16), Some(1000u16)), (Some(4001), Some(4001)), (None, None)] {
        let mut ws = RawWs::connect(node.addr()).await;
        ws.send_json(json!({"role": "rpc", "u": "before-close", "cmds": [{"name": "e", "fun": "echo", "args": [1]}]}))
            .await;
        let payload = sent.map(|code| code.to_be_bytes().to_vec()).unwrap_or_default();
        ws.send(CLOSE, &payload).await;
        let reply = ws.reader.data().await;
        assert_eq!(reply.json()["u"], json!("before-close"), "{reply:?}");
        let close = ws.reader.data().await;
        assert_eq!(close.opcode, CLOSE, "{close:?}");
        assert_eq!(close.close_code(), echoed, "{close:?}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(SOON, ws.reader.0.read_to_end(&mut rest)).await;
        let read = read.expect("the server ends the connection").expect("a clean end, not a reset");
        assert_eq!(read, 0, "nothing after the close frame: {rest:?}");
    }
}

#[actix_rt::test]
async fn over_limit_frames_are_answered_under_their_u_or_closed_1009() {
    let node = TestNode::start(Settings { max_frame_bytes: 64 * 1024, ..settings() }).await;

    // Over max_frame_bytes, under twice it: a 1002 that carries the request's u.
    let mut ws = RawWs::connect(node.addr()).await;
    ws.send(BINARY, &echo_request("too-big", 100 * 1024)).await;
    let reply = ws.reader.data().await.json();
    assert_eq!(reply["u"], json!("too-big"), "{reply}");
    assert_eq!(reply["error"]["code"], json!(1002), "{reply}");
    ws.send(BINARY, &echo_request("still-here", 10)).await;
    assert_eq!(ws.reader.data().await.json()["u"], json!("still-here"));

    // One frame over twice the limit: closed 1009.
    let mut ws = RawWs::connect(node.addr()).await;
    ws.send(BINARY, &echo_request("huge", 200 * 1024)).await;
    let close = loop {
        let frame = ws.reader.data().await;
        if frame.opcode == CLOSE {
            break frame;
        }
    };
    assert_eq!(close.close_code(), Some(1009), "{close:?}");

    // Continuations that add up to over twice the limit: closed 1009.
    let mut ws = RawWs::connect(node.addr()).await;
    let chunk = vec![b' '; 50 * 1024];
    ws.writer.write_all(&masked_frame(TEXT, false, b"{\"role\":\"rpc\",\"u\":\"parts\",\"pad\":\"")).await.unwrap();
    for _ in 0..3 {
        ws.writer.write_all(&masked_frame(CONTINUATION, false, &chunk)).await.unwrap();
    }
    ws.writer.write_all(&masked_frame(CONTINUATION, true, b"\"}")).await.unwrap();
    let close = loop {
        let frame = ws.reader.data().await;
        if frame.opcode == CLOSE {
            break frame;
        }
    };
    assert_eq!(close.close_code(), Some(1009), "{close:?}");
    let refused = node.metric("mpreg_limit_exceeded_total", r#"limit="max_frame_bytes""#).await;
    assert!(refused >= 3.0, "{refused}");
}

// ---------------------------------------------------------------------------------------
// In-flight accounting

#[actix_rt::test]
async fn the_in_flight_gauge_comes_back_when_a_connection_with_waiting_requests_closes() {
    const WAITING: usize = 200;
    let node = TestNode::start(settings()).await;
    let mut ws = RawWs::connect(node.addr()).await;
    for i in 0..WAITING {
        let request =
            json!({"role": "rpc", "u": format!("w{i}"), "cmds": [{"name": "s", "fun": "slow", "args": [60.0]}]});
        ws.send_json(request).await;
    }
    poll_until_async("requests in flight", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == WAITING as f64).then_some(())
    })
    .await;
    drop(ws);
    poll_until_async("the gauge back at 0", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == 0.0).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn past_max_connections_only_peers_get_the_reserved_places_and_then_503() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    // Two places for anyone, one more kept for a peer; SWIM slow enough that the raw peer
    // (which answers no probe) stays unsuspected.
    let cluster = "max-connections";
    let node = TestNode::start(Settings {
        max_connections: 2,
        max_inbound_links: 1,
        cluster_id: cluster.into(),
        probe_interval_s: 30.0,
        suspect_after_s: 60.0,
        remove_after_s: 120.0,
        ..settings()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(Client::connect(node.0.url()).await.expect("within max_connections"));
    }
    // A third connection gets the place kept for peers, and loses it when it does not
    // speak as one.
    let mut squatter = raw_connect(node.0.url()).await;
    let close = tokio::time::timeout(SOON, async {
        loop {
            match squatter.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed after the grace");
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Again, "{close:?}");
    assert!(close.reason.contains("max_connections (2)"), "{close:?}");
    drop(squatter);
    // A peer in that place stays past the grace.
    let mut peer = poll_until_async("the reserved place to free up", SOON, || async {
        tokio_tungstenite::connect_async(node.0.url()).await.ok().map(|(ws, _)| ws)
    })
    .await;
    raw_send(&mut peer, &peer_status("peer", "p1", cluster)).await;
    let answer = raw_next(&mut peer, SOON).await.expect("the node's STATUS");
    assert_eq!(answer["kind"], "status", "{answer}");
    // Now every place is taken: an upgrade is answered 503.
    match tokio_tungstenite::connect_async(node.0.url()).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("max_connections (2)"), "{body}");
        }
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| "a websocket")),
    }
    tokio::time::sleep(RESERVED_PLACE_GRACE + Duration::from_millis(500)).await;
    let topology = http_async("GET", &format!("{}/topology", node.0.monitoring_url().unwrap())).await.unwrap().body;
    let topology: Value = serde_json::from_str(&topology).unwrap();
    let linked = topology["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "peer" && n["linked"] == true);
    assert!(linked, "the peer kept its place: {topology:#}");
    assert_eq!(node.metric("mpreg_limit_exceeded_total", r#"limit="max_connections""#).await, 2.0);
    // The open ones are served; once the peer and a client leave (dropping a client closes
    // its websocket), a new client is welcome within max_connections again.
    assert_eq!(open[0].call("echo", vec![json!(1)]).await.unwrap(), json!(1));
    drop(peer);
    drop(open.pop());
    let client =
        poll_until_async("a place to free up", SOON, || async { Client::connect(node.0.url()).await.ok() }).await;
    assert_eq!(client.call("echo", vec![json!(2)]).await.unwrap(), json!(2));
}

#[actix_rt::test]
async fn past_the_node_wide_max_in_flight_requests_get_1006() {
    let node = TestNode::start(Settings { max_in_flight: 8, ..settings() }).await;
    let (first, second) = (Client::connect(node.0.url()).await.unwrap(), Client::connect(node.0.url()).await.unwrap());
    let mut waiting = Vec::new();
    for _ in 0..8 {
        let client = first.clone();
        waiting.push(tokio::spawn(async move { client.call("slow", vec![json!(60.0)]).await }));
    }
    poll_until_async("8 requests in flight", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == 8.0).then_some(())
    })
    .await;
    // Another connection's waiting request is refused; requests answered in place still run.
    let error = common::rpc_error(second.call("slow", vec![json!(0.01)]).await);
    assert_eq!(error.code, 1006, "{error}");
    assert!(error.details_text().contains("max_in_flight 8"), "{error}");
    assert_eq!(second.call("echo", vec![json!("inline")]).await.unwrap(), json!("inline"));
    let refused = node.metric("mpreg_limit_exceeded_total", r#"limit="max_in_flight""#).await;
    assert_eq!(refused, 1.0);
    for task in waiting {
        task.abort();
    }
}

/// Status and pub/sub requests wait like calls do, so they count like calls: past the
/// connection's `max_in_flight_per_connection` or the node's `max_in_flight` they are
/// refused with 1006, each in its own role's reply, and served again once calls end.
#[actix_rt::test]
async fn status_and_pubsub_requests_count_in_flight_like_calls() {
    let node = TestNode::start(Settings { max_in_flight_per_connection: 2, max_in_flight: 3, ..settings() }).await;
    let (busy, other) = (Client::connect(node.0.url()).await.unwrap(), Client::connect(node.0.url()).await.unwrap());
    let slow = |client: &Client| {
        let client = client.clone();
        tokio::spawn(async move { client.call("slow", vec![json!(60.0)]).await })
    };
    let mut waiting = vec![slow(&busy), slow(&busy)];
    poll_until_async("2 calls in flight", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == 2.0).then_some(())
    })
    .await;
    // The busy connection is at its own bound; the node is not.
    let refused = busy.cluster_status_brief().await.expect_err("past max_in_flight_per_connection");
    assert!(refused.to_string().contains("1006") && refused.to_string().contains("limit 2"), "{refused}");
    let refused = busy.publish("t.x", json!(1)).await.expect_err("past max_in_flight_per_connection");
    assert!(refused.to_string().contains("limit 2"), "{refused}");
    assert!(other.cluster_status_brief().await.is_ok());
    other.publish("t.x", json!(1)).await.expect("publish on the other connection");
    assert_eq!(node.metric("mpreg_limit_exceeded_total", r#"limit="max_in_flight_per_connection""#).await, 2.0);

    // A third call fills the node: the other connection's status and publish are refused.
    waiting.push(slow(&other));
    poll_until_async("3 calls in flight", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == 3.0).then_some(())
    })
    .await;
    let refused = other.cluster_status().await.expect_err("past max_in_flight");
    assert!(refused.to_string().contains("max_in_flight 3"), "{refused}");
    let refused = other.publish("t.x", json!(1)).await.expect_err("past max_in_flight");
    assert!(refused.to_string().contains("max_in_flight 3"), "{refused}");
    assert_eq!(node.metric("mpreg_limit_exceeded_total", r#"limit="max_in_flight""#).await, 2.0);

    // Their connections close: the calls waiting on them end, and the node has room again.
    busy.close().await;
    other.close().await;
    for task in waiting {
        assert!(task.await.expect("call task").is_err(), "a closed connection's call fails");
    }
    poll_until_async("the calls gone", SOON, || async {
        (node.metric("mpreg_requests_in_flight", "node=").await == 0.0).then_some(())
    })
    .await;
    let fresh = Client::connect(node.0.url()).await.unwrap();
    assert!(fresh.cluster_status().await.is_ok());
    fresh.publish("t.x", json!(1)).await.expect("publish once the node has room");
}

/// A client pipelines 1,000 full `cluster-status` requests (40 bytes each, each answered
/// by the fabric's mailbox, which also answers the peers' probes): every one is answered,
/// but at most two at a time reach the fabric; the rest wait their turn (counted).
#[actix_rt::test]
async fn a_status_flood_reaches_the_fabric_two_at_a_time() {
    const REQUESTS: usize = 1000;
    let node = TestNode::start(settings()).await;
    let mut ws = RawWs::connect(node.addr()).await;
    let flood: Vec<u8> = (0..REQUESTS)
        .flat_map(|i| {
            let request = json!({"role": "cluster-status", "u": format!("s{i}")}).to_string();
            masked_frame(BINARY, true, request.as_bytes())
        })
        .collect();
    ws.writer.write_all(&flood).await.expect("flood written");
    let mut answered = HashSet::new();
    while answered.len() < REQUESTS {
        let answer = ws.reader.data().await.json();
        assert!(answer["topology"]["nodes"].is_array() && answer["catalog"].is_object(), "{answer}");
        answered.insert(answer["u"].as_str().expect("u").to_owned());
    }
    let waited = node.metric("mpreg_fabric_describes_waited_total", "node=").await;
    println!("status flood: {REQUESTS} answered, {waited} waited for the gate");
    assert!(waited > 0.0, "no request waited: the gate was never reached");
}
