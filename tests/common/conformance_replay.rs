//! Replays the conformance cases of `tests/data/rpc_cases.json` against a running
//! MPREG server over a real websocket, following the rules of
//! `../shared/conformance/README.md` ("How to replay a case").
//!
//! Shared by several integration-test crates: include it with
//! `#[path = "common/conformance_replay.rs"] mod replay;`.
//!
//! Contents:
//! * [`ServerProcess`]: starts the `mpreg` binary, waits for its `MPREG_URL=` line and
//!   kills it on drop.
//! * [`replay_case`]: one case on one fresh connection.
//! * [`match_json`] and friends: the structural comparison (`"<any>"`, details-prefix
//!   error objects, numbers by value).
//! * Case selection helpers ([`is_single_node`], [`needs_isolation`],
//!   [`isolated_run_order`]) used to decide what may run concurrently.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Number, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The placeholder token of the data file.
pub const ANY: &str = "<any>";
/// Default time to wait for the expected frames of a case (README step 4).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for opening a websocket.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Loading and selecting cases
// ---------------------------------------------------------------------------

/// Path of the case file, relative to the package root.
pub fn cases_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rpc_cases.json")
}

/// All cases of the data file (the `cases` array), in file order.
pub fn load_cases() -> Vec<Value> {
    let path = cases_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    doc.get("cases")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{} has no `cases` array", path.display()))
        .clone()
}

pub fn case_name(case: &Value) -> &str {
    case.get("name").and_then(Value::as_str).unwrap_or("<unnamed case>")
}

/// `topology` of a case (`None` = single node).
pub fn topology(case: &Value) -> Option<&str> {
    match case.get("topology") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().unwrap_or("<non-string topology>")),
    }
}

/// A case that needs only node A.
pub fn is_single_node(case: &Value) -> bool {
    topology(case).is_none()
}

fn frames_in(case: &Value) -> &[Value] {
    case.get("frames_in").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn role_of(frame: &Value) -> Option<&str> {
    frame.get("role").and_then(Value::as_str)
}

/// A case that touches pub/sub (a `pubsub-*` frame, or an rpc publishing its
/// intermediate results on a topic). Such cases can see each other's publishes
/// (and the retained backlog), so they run one after another, never concurrently.
pub fn needs_isolation(case: &Value) -> bool {
    frames_in(case).iter().any(|f| {
        role_of(f).is_some_and(|r| r.starts_with("pubsub-"))
            || f.get("intermediate_result_callback_topic").is_some_and(|t| !t.is_null())
    })
}

/// Whether a case subscribes with `get_backlog: true`.
pub fn requests_backlog(case: &Value) -> bool {
    frames_in(case).iter().any(|f| {
        role_of(f) == Some("pubsub-subscribe")
            && f.pointer("/subscription/get_backlog").and_then(Value::as_bool) == Some(true)
    })
}

/// Order for the isolated (pub/sub) cases: file order, except that cases reading the
/// backlog go first, so the retained messages they receive are only their own
/// publishes (the "publish with no matching subscriber" case publishes the very same
/// `bl.x` message that the backlog case expects exactly once).
pub fn isolated_run_order(cases: Vec<(usize, Value)>) -> Vec<(usize, Value)> {
    let mut cases = cases;
    cases.sort_by_key(|(idx, case)| (!requests_backlog(case), *idx));
    cases
}

/// Topics published by a case (pubsub-publish messages and callback topics).
pub fn published_topics(case: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for f in frames_in(case) {
        if role_of(f) == Some("pubsub-publish") {
            if let Some(t) = f.pointer("/message/topic").and_then(Value::as_str) {
                out.push(t.to_string());
            }
        }
        if let Some(t) = f.get("intermediate_result_callback_topic").and_then(Value::as_str) {
            out.push(t.to_string());
        }
    }
    out
}

/// Patterns subscribed by a case.
pub fn subscribed_patterns(case: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for f in frames_in(case) {
        if role_of(f) == Some("pubsub-subscribe") {
            if let Some(ps) = f.pointer("/subscription/patterns").and_then(Value::as_array) {
                for p in ps {
                    if let Some(s) = p.get("pattern").and_then(Value::as_str) {
                        out.push(s.to_string());
                    }
                }
            }
        }
    }
    out
}

/// AMQP-style topic match: `*` is exactly one dot-separated segment, `#` zero or more.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    fn go(p: &[&str], t: &[&str]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((&"#", rest)) => (0..=t.len()).any(|k| go(rest, &t[k..])),
            Some((&seg, rest)) => match t.split_first() {
                Some((&ts, trest)) => (seg == "*" || seg == ts) && go(rest, trest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    go(&p, &t)
}

// ---------------------------------------------------------------------------
// Structural comparison
// ---------------------------------------------------------------------------

/// Compares an expected frame (or part of one) with an actual one.
///
/// * object key order is ignored, but both sides must have the same keys;
/// * array order matters;
/// * numbers compare by value ([`numbers_equal`]);
/// * `"<any>"` in `expected` matches any value (the key must still be present);
/// * an expected object with `"match": "details-prefix"` requires the actual `details`
///   to be a string starting with `prefix`; `match`, `prefix` and `details` are then
///   left out and the rest is compared exactly.
///
/// The error names the JSON path of the first difference.
pub fn match_json(expected: &Value, actual: &Value) -> Result<(), String> {
    match_at(expected, actual, "$")
}

fn match_at(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    if expected.as_str() == Some(ANY) {
        return Ok(());
    }
    match (expected, actual) {
        (Value::Object(e), _) if e.get("match").and_then(Value::as_str) == Some("details-prefix") => {
            match_details_prefix(e, actual, path)
        }
        (Value::Object(e), Value::Object(a)) => match_objects(e, a, path),
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{path}: expected an array of {} elements, got {}: {}",
                    e.len(),
                    a.len(),
                    compact(actual)
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                match_at(ev, av, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) => {
            if numbers_equal(e, a) {
                Ok(())
            } else {
                Err(format!("{path}: expected {e}, got {a}"))
            }
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{path}: expected {}, got {}", compact(expected), compact(actual))),
    }
}

fn match_objects(e: &Map<String, Value>, a: &Map<String, Value>, path: &str) -> Result<(), String> {
    let missing: Vec<&str> = e.keys().filter(|k| !a.contains_key(*k)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(format!("{path}: missing key(s) {missing:?} in {}", compact_map(a)));
    }
    let extra: Vec<&str> = a.keys().filter(|k| !e.contains_key(*k)).map(String::as_str).collect();
    if !extra.is_empty() {
        return Err(format!("{path}: unexpected key(s) {extra:?} in {}", compact_map(a)));
    }
    for (k, ev) in e {
        match_at(ev, &a[k], &format!("{path}.{k}"))?;
    }
    Ok(())
}

fn match_details_prefix(e: &Map<String, Value>, actual: &Value, path: &str) -> Result<(), String> {
    let prefix = e
        .get("prefix")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{path}: malformed expected frame: details-prefix without a string `prefix`"))?;
    let a = actual.as_object().ok_or_else(|| format!("{path}: expected an error object, got {}", compact(actual)))?;
    match a.get("details") {
        Some(Value::String(d)) if d.starts_with(prefix) => {}
        Some(Value::String(d)) => {
            return Err(format!("{path}.details: expected a string starting with {prefix:?}, got {d:?}"))
        }
        Some(other) => {
            return Err(format!("{path}.details: expected a string starting with {prefix:?}, got {}", compact(other)))
        }
        None => return Err(format!("{path}: missing key \"details\" in {}", compact_map(a))),
    }
    let mut e = e.clone();
    for k in ["match", "prefix", "details"] {
        e.remove(k);
    }
    let mut a = a.clone();
    a.remove("details");
    match_objects(&e, &a, path)
}

/// Numbers by value. Two integers compare exactly (so `18446744073709551615` equals
/// only itself); an integer and a float are equal only when the float is exactly that
/// integer (`3` == `3.0`, but `18446744073709551615` != `1.8446744073709552e19`);
/// two floats compare as `f64` (`1.5e308` == `1.5e+308`, both parse to one value).
pub fn numbers_equal(a: &Number, b: &Number) -> bool {
    fn int_of(n: &Number) -> Option<i128> {
        n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
    }
    fn float_is_int(f: Option<f64>, i: i128) -> bool {
        match f {
            // |f| < 2^100 keeps the cast exact; all integral f64 in that range are exact
            Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1.0e30 => f as i128 == i,
            _ => false,
        }
    }
    match (int_of(a), int_of(b)) {
        (Some(x), Some(y)) => x == y,
        (Some(x), None) => float_is_int(b.as_f64(), x),
        (None, Some(y)) => float_is_int(a.as_f64(), y),
        (None, None) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    truncate(s, 600)
}

fn compact_map(m: &Map<String, Value>) -> String {
    compact(&Value::Object(m.clone()))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------
// frames_in preparation
// ---------------------------------------------------------------------------

static NEXT_U: AtomicU64 = AtomicU64::new(1);

/// A request id unique within this test process.
pub fn fresh_u() -> String {
    format!("conf-{}-{}", std::process::id(), NEXT_U.fetch_add(1, Ordering::Relaxed))
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock before 1970").as_secs_f64()
}

/// Replaces `"<any>"` in a frame to send: `timestamp`/`created_at` by the current Unix
/// time as a float, `u` by a fresh string. Other values are left as they are.
pub fn fill_placeholders(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    let x = if x.as_str() == Some(ANY) {
                        match k.as_str() {
                            "timestamp" | "created_at" => json!(unix_now()),
                            "u" => Value::String(fresh_u()),
                            _ => x.clone(),
                        }
                    } else {
                        fill_placeholders(x)
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(fill_placeholders).collect()),
        other => other.clone(),
    }
}

/// How to recognise the reply to a sent frame (README step 3).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// rpc (or any other non-pubsub object with a string `u`): the frame with the same `u`.
    SameU(String),
    /// pub/sub request: the `pubsub-ack` whose `operation_id` is its `u`.
    Ack(String),
    /// no usable `u` (not JSON, u missing or not a string): the next frame.
    NextFrame,
}

impl Reply {
    pub fn of(frame: &Value) -> Reply {
        match (role_of(frame), frame.get("u").and_then(Value::as_str)) {
            (Some(r), Some(u)) if r.starts_with("pubsub-") => Reply::Ack(u.to_string()),
            (_, Some(u)) => Reply::SameU(u.to_string()),
            _ => Reply::NextFrame,
        }
    }

    pub fn is_reply(&self, frame: &Value) -> bool {
        match self {
            Reply::SameU(u) => frame.get("u").and_then(Value::as_str) == Some(u),
            Reply::Ack(u) => {
                role_of(frame) == Some("pubsub-ack") && frame.get("operation_id").and_then(Value::as_str) == Some(u)
            }
            Reply::NextFrame => true,
        }
    }
}

// ---------------------------------------------------------------------------
// Ordered matching of the received frames
// ---------------------------------------------------------------------------

/// Consumes received frames in arrival order and checks them against `expected_out`
/// (README steps 4-7). Every frame must match the first expected frame not yet seen,
/// except that a `pubsub-notification` and the `pubsub-ack` of a publish sent in this
/// case, when listed next to each other, may arrive in either order.
pub struct Matcher {
    expected: Vec<Value>,
    matched: Vec<bool>,
    publish_us: Vec<String>,
    received: Vec<Value>,
}

impl Matcher {
    /// `publish_us`: the `u` of every `pubsub-publish` frame sent in the case.
    pub fn new(expected: Vec<Value>, publish_us: Vec<String>) -> Self {
        let matched = vec![false; expected.len()];
        Matcher { expected, matched, publish_us, received: Vec::new() }
    }

    pub fn complete(&self) -> bool {
        self.matched.iter().all(|m| *m)
    }

    fn first_unmatched(&self) -> Option<usize> {
        self.matched.iter().position(|m| !m)
    }

    fn is_publish_ack(&self, v: &Value) -> bool {
        role_of(v) == Some("pubsub-ack")
            && v.get("operation_id").and_then(Value::as_str).is_some_and(|op| self.publish_us.iter().any(|u| u == op))
    }

    /// Whether expected frames `i` and `j` may arrive in either order.
    fn swappable(&self, i: usize, j: usize) -> bool {
        let (a, b) = (&self.expected[i], &self.expected[j]);
        let notif = |v: &Value| role_of(v) == Some("pubsub-notification");
        (notif(a) && self.is_publish_ack(b)) || (self.is_publish_ack(a) && notif(b))
    }

    pub fn feed(&mut self, frame: &Value) -> Result<(), String> {
        self.received.push(frame.clone());
        let n = self.received.len() - 1;
        let Some(j) = self.first_unmatched() else {
            return Err(format!("received frame #{n} after all expected frames had arrived: {}", compact(frame)));
        };
        let first = match match_json(&self.expected[j], frame) {
            Ok(()) => {
                self.matched[j] = true;
                return Ok(());
            }
            Err(e) => e,
        };
        let k = j + 1;
        if k < self.expected.len()
            && !self.matched[k]
            && self.swappable(j, k)
            && match_json(&self.expected[k], frame).is_ok()
        {
            self.matched[k] = true;
            return Ok(());
        }
        Err(format!(
            "received frame #{n} does not match expected_out[{j}]: {first}\n    expected: {}\n    actual:   {}",
            compact(&self.expected[j]),
            compact(frame)
        ))
    }

    /// A description of what is still missing, for timeout messages.
    pub fn progress(&self) -> String {
        let missing: Vec<usize> = (0..self.expected.len()).filter(|i| !self.matched[*i]).collect();
        let mut s = format!(
            "{} of {} expected frames arrived; missing expected_out{missing:?}",
            self.expected.len() - missing.len(),
            self.expected.len()
        );
        if let Some(&j) = missing.first() {
            s.push_str(&format!("\n    next expected: {}", compact(&self.expected[j])));
        }
        for (i, r) in self.received.iter().enumerate() {
            s.push_str(&format!("\n    received #{i}: {}", compact(r)));
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Websocket client
// ---------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug)]
pub enum RecvError {
    Timeout,
    Closed(String),
    Bad(String),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Timeout => write!(f, "timed out"),
            RecvError::Closed(why) => write!(f, "connection closed: {why}"),
            RecvError::Bad(why) => write!(f, "{why}"),
        }
    }
}

pub struct Conn {
    ws: Ws,
}

impl Conn {
    pub async fn connect(url: &str) -> Result<Conn, String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _resp))) => Ok(Conn { ws }),
            Ok(Err(e)) => Err(format!("cannot connect to {url}: {e}")),
            Err(_) => Err(format!("cannot connect to {url}: timed out after {CONNECT_TIMEOUT:?}")),
        }
    }

    /// Sends one frames_in entry: an object as compact JSON (binary frame, or text
    /// frame when `as_text`), a string verbatim as the frame bytes.
    pub async fn send(&mut self, frame: &Value, as_text: bool) -> Result<(), String> {
        let payload = match frame {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // `.into()`: a no-op on tungstenite 0.24, needed from 0.26 (Utf8Bytes/Bytes)
        #[allow(clippy::useless_conversion)]
        let msg = if as_text { Message::Text(payload.into()) } else { Message::Binary(payload.into_bytes().into()) };
        self.ws.send(msg).await.map_err(|e| format!("send failed: {e}"))
    }

    /// The next data frame (text or binary) parsed as JSON, by `deadline`.
    pub async fn recv_until(&mut self, deadline: Instant) -> Result<Value, RecvError> {
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(RecvError::Timeout),
                Ok(None) => return Err(RecvError::Closed("stream ended".into())),
                Ok(Some(Err(e))) => return Err(RecvError::Closed(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            let bytes: Vec<u8> = match msg {
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Binary(b) => b[..].to_vec(),
                Message::Close(c) => return Err(RecvError::Closed(format!("close frame from server: {c:?}"))),
                _ => continue, // ping/pong/raw frames
            };
            return serde_json::from_slice(&bytes).map_err(|e| {
                RecvError::Bad(format!(
                    "server sent a frame that is not JSON ({e}): {:?}",
                    truncate(String::from_utf8_lossy(&bytes).into_owned(), 300)
                ))
            });
        }
    }

    /// Closes politely and waits (bounded) for the server's side of the close, so the
    /// server has dropped this connection's subscriptions before the next case starts.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ws.next()).await {}
    }
}

// ---------------------------------------------------------------------------
// Replaying one case
// ---------------------------------------------------------------------------

/// Time a case may take at most (for an outer safety timeout).
pub fn case_budget(case: &Value) -> Duration {
    let read = read_timeout(case);
    let quiet = case.get("quiet_s").and_then(Value::as_f64).unwrap_or(0.0);
    let frames = frames_in(case).len() as u32;
    read * (frames + 2) + Duration::from_secs_f64(quiet) + Duration::from_secs(15)
}

fn read_timeout(case: &Value) -> Duration {
    case.get("read_timeout_s").and_then(Value::as_f64).map(Duration::from_secs_f64).unwrap_or(DEFAULT_READ_TIMEOUT)
}

/// Replays one case on a fresh websocket connection to `url` and compares what the
/// server sends with `expected_out`. `Err` carries a human-readable reason.
pub async fn replay_case(url: &str, case: &Value) -> Result<(), String> {
    let frames =
        case.get("frames_in").and_then(Value::as_array).filter(|a| !a.is_empty()).ok_or("case has no frames_in")?;
    let expected = case.get("expected_out").and_then(Value::as_array).ok_or("case has no expected_out")?.clone();
    let as_text = case.get("send_as").and_then(Value::as_str) == Some("text");
    let pipelined = case.get("pipelined").and_then(Value::as_bool) == Some(true);
    let read_timeout = read_timeout(case);
    let quiet = case.get("quiet_s").and_then(Value::as_f64).map(Duration::from_secs_f64);
    let check_connection = case.get("connection").is_some_and(|c| !c.is_null());

    let prepared: Vec<Value> = frames.iter().map(fill_placeholders).collect();
    let publish_us: Vec<String> = prepared
        .iter()
        .filter(|f| role_of(f) == Some("pubsub-publish"))
        .filter_map(|f| f.get("u").and_then(Value::as_str).map(str::to_string))
        .collect();
    let mut matcher = Matcher::new(expected, publish_us);
    let mut conn = Conn::connect(url).await?;

    for (i, frame) in prepared.iter().enumerate() {
        conn.send(frame, as_text).await.map_err(|e| format!("frames_in[{i}]: {e}"))?;
        if pipelined || i + 1 == prepared.len() {
            continue;
        }
        // Wait for this frame's reply before sending the next one.
        let reply = Reply::of(frame);
        let deadline = Instant::now() + read_timeout;
        loop {
            let got = conn.recv_until(deadline).await.map_err(|e| {
                format!("waiting for the reply to frames_in[{i}] ({reply:?}): {e}\n    {}", matcher.progress())
            })?;
            matcher.feed(&got)?;
            if reply.is_reply(&got) {
                break;
            }
        }
    }

    let deadline = Instant::now() + read_timeout;
    while !matcher.complete() {
        let got = conn.recv_until(deadline).await.map_err(|e| {
            format!("reading expected frames ({read_timeout:?} limit): {e}\n    {}", matcher.progress())
        })?;
        matcher.feed(&got)?;
    }

    if let Some(quiet) = quiet {
        match conn.recv_until(Instant::now() + quiet).await {
            Err(RecvError::Timeout) => {}
            Ok(extra) => {
                return Err(format!("a frame arrived within the quiet period of {quiet:?}: {}", compact(&extra)))
            }
            Err(e) => return Err(format!("during the quiet period of {quiet:?}: {e}")),
        }
    }

    if check_connection {
        check_connection_open(&mut conn).await?;
    }

    conn.close().await;
    Ok(())
}

/// README step 8: the connection must still serve an `echo` rpc.
async fn check_connection_open(conn: &mut Conn) -> Result<(), String> {
    let u = fresh_u();
    let probe = json!({"role": "rpc", "u": u, "cmds": [{"name": "e", "fun": "echo", "args": ["still-open"]}]});
    let want = json!({
        "r": {"e": "still-open"}, "error": null, "u": u,
        "intermediate_results": [], "execution_summary": null
    });
    conn.send(&probe, false).await.map_err(|e| format!("connection check: cannot send the follow-up echo: {e}"))?;
    let got = conn
        .recv_until(Instant::now() + DEFAULT_READ_TIMEOUT)
        .await
        .map_err(|e| format!("connection check: no reply to the follow-up echo rpc: {e}"))?;
    match_json(&want, &got).map_err(|e| {
        format!("connection check: unexpected reply to the follow-up echo rpc: {e}\n    actual: {}", compact(&got))
    })
}

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

/// A running `mpreg` server. Killed (and reaped) on drop.
pub struct ServerProcess {
    child: Child,
    pub url: String,
    pub monitoring_url: Option<String>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

const STDERR_TAIL_LINES: usize = 200;

impl ServerProcess {
    /// Starts `bin args...` and waits (at most `ready_timeout`) for the `MPREG_URL=`
    /// line on its stdout. stderr (the logs) is kept; see [`ServerProcess::stderr_tail`].
    pub fn start(bin: &str, args: &[&str], ready_timeout: Duration) -> Result<ServerProcess, String> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");

        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut t = tail.lock().unwrap();
                if t.len() == STDERR_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });

        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout after readiness so the server never blocks on it.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });

        // From here on the guard owns the child: any early return kills it.
        let mut server = ServerProcess { child, url: String::new(), monitoring_url: None, stderr_tail };
        let deadline = std::time::Instant::now() + ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim();
                    if let Some(u) = line.strip_prefix("MPREG_MONITORING_URL=") {
                        server.monitoring_url = Some(u.to_string());
                    } else if let Some(u) = line.strip_prefix("MPREG_URL=") {
                        server.url = u.to_string();
                        return Ok(server);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{bin} printed no MPREG_URL= line within {ready_timeout:?}\n{}",
                        server.stderr_tail()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200)); // let stderr drain
                    let status = server.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{bin} closed stdout without printing MPREG_URL= (exit status {status:?})\n{}",
                        server.stderr_tail()
                    ));
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines the server wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.stderr_tail.lock().unwrap();
        let mut s = format!("--- last {} line(s) of server stderr ---\n", t.len());
        for l in t.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Tests of the helpers (no server needed)
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn ok(e: &str, a: &str) {
        if let Err(why) = match_json(&v(e), &v(a)) {
            panic!("expected {e} to match {a}: {why}");
        }
    }

    fn bad(e: &str, a: &str) -> String {
        match match_json(&v(e), &v(a)) {
            Ok(()) => panic!("expected {e} NOT to match {a}"),
            Err(why) => why,
        }
    }

    #[test]
    fn any_matches_every_value_but_needs_the_key() {
        for a in ["1", "1.5", "\"x\"", "null", "true", "[1,2]", "{\"k\":1}"] {
            ok("\"<any>\"", a);
            ok(r#"{"t":"<any>","u":1}"#, &format!(r#"{{"u":1,"t":{a}}}"#));
            ok(r#"["<any>",2]"#, &format!("[{a},2]"));
        }
        let why = bad(r#"{"t":"<any>","u":1}"#, r#"{"u":1}"#);
        assert!(why.contains("missing key"), "{why}");
        // "<any>" in the actual frame is only a string
        bad(r#"{"t":1}"#, r#"{"t":"<any>"}"#);
    }

    #[test]
    fn objects_ignore_key_order_but_not_extra_or_missing_keys() {
        ok(r#"{"a":1,"b":{"c":[1,2],"d":null}}"#, r#"{"b":{"d":null,"c":[1,2]},"a":1}"#);
        let why = bad(r#"{"a":1}"#, r#"{"a":1,"b":2}"#);
        assert!(why.contains("unexpected key") && why.contains("\"b\""), "{why}");
        let why = bad(r#"{"a":1,"b":2}"#, r#"{"a":1}"#);
        assert!(why.contains("missing key"), "{why}");
        // null is a value, not an absent key
        bad(r#"{"a":null}"#, r#"{}"#);
    }

    #[test]
    fn arrays_keep_order_and_length() {
        ok("[1,[2,3]]", "[1,[2,3]]");
        bad("[1,2]", "[2,1]");
        bad("[1,2]", "[1,2,3]");
        bad("[]", "{}");
        let why = bad(r#"{"r":{"x":[1,{"y":2}]}}"#, r#"{"r":{"x":[1,{"y":3}]}}"#);
        assert!(why.starts_with("$.r.x[1].y:"), "{why}");
    }

    #[test]
    fn numbers_compare_by_value() {
        ok("1.5e308", "1.5e+308");
        ok("1.5e+308", "1.5E308");
        ok("1.5e308", &format!("15{}.0", "0".repeat(307)));
        bad("1.5e308", &format!("15{}.0", "0".repeat(306)));
        ok("18446744073709551615", "18446744073709551615");
        bad("18446744073709551615", "18446744073709551614");
        bad("18446744073709551615", "1.8446744073709552e19"); // the nearest f64 is 2^64
        bad("18446744073709551615", "-1");
        ok("-9223372036854775808", "-9223372036854775808");
        ok("3", "3.0");
        ok("3.0", "3");
        ok("0", "-0.0");
        ok("1.26", "1.26");
        bad("1.26", "1.2600000000000002");
        bad("1", "1.0000001");
        bad("1", "\"1\"");
        bad("1", "true");
        bad("0", "null");
    }

    #[test]
    fn details_prefix_checks_prefix_and_the_rest_exactly() {
        let e = r#"{"r":null,"error":{"code":1002,"message":"Invalid request","details":"representative text","match":"details-prefix","prefix":"invalid JSON"},"u":null}"#;
        ok(
            e,
            r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":"invalid JSON: expected value at line 1 column 1"}}"#,
        );
        ok(e, r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":"invalid JSON"}}"#);
        let why =
            bad(e, r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":"Invalid JSON"}}"#);
        assert!(why.contains("$.error.details"), "{why}");
        bad(e, r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":null}}"#);
        bad(e, r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request"}}"#);
        bad(e, r#"{"u":null,"r":null,"error":{"code":1003,"message":"Invalid request","details":"invalid JSON"}}"#);
        bad(e, r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid","details":"invalid JSON"}}"#);
        bad(
            e,
            r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":"invalid JSON","extra":1}}"#,
        );
        // match/prefix must not be expected in the actual frame
        bad(
            e,
            r#"{"u":null,"r":null,"error":{"code":1002,"message":"Invalid request","details":"invalid JSON","match":"details-prefix","prefix":"invalid JSON"}}"#,
        );
        // actual is not an object
        bad(e, r#"{"u":null,"r":null,"error":"invalid JSON"}"#);
        // an object merely containing a "match" key of another value is literal
        ok(r#"{"match":"x"}"#, r#"{"match":"x"}"#);
    }

    #[test]
    fn every_details_prefix_in_the_data_accepts_its_own_details() {
        // The representative details of each expected error must pass its own prefix.
        fn walk(v: &Value, found: &mut usize) {
            match v {
                Value::Object(m) => {
                    if m.get("match").and_then(Value::as_str) == Some("details-prefix") {
                        *found += 1;
                        let actual: Map<String, Value> = m
                            .iter()
                            .filter(|(k, _)| *k != "match" && *k != "prefix")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        match_json(v, &Value::Object(actual)).unwrap();
                    }
                    m.values().for_each(|x| walk(x, found));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, found)),
                _ => {}
            }
        }
        let mut found = 0;
        for case in load_cases() {
            walk(&case["expected_out"], &mut found);
        }
        assert!(found > 10, "only {found} details-prefix objects found");
    }

    #[test]
    fn placeholders_in_frames_in_are_filled() {
        let f = v(
            r#"{"role":"pubsub-publish","u":"<any>","message":{"topic":"a","timestamp":"<any>","payload":"<any>"},"subscription":{"created_at":"<any>"}}"#,
        );
        let g = fill_placeholders(&f);
        let u = g["u"].as_str().unwrap();
        assert!(u != ANY && !u.is_empty());
        assert_ne!(fill_placeholders(&f)["u"], g["u"], "u must be fresh each time");
        let ts = g["message"]["timestamp"].as_f64().unwrap();
        assert!(g["message"]["timestamp"].is_f64() && ts > 1.6e9, "{ts}");
        assert!(g["subscription"]["created_at"].is_f64());
        assert_eq!(g["message"]["payload"], json!(ANY), "other keys keep the literal");
        assert_eq!(g["message"]["topic"], json!("a"));
        // a frame that is a JSON string stays verbatim
        assert_eq!(fill_placeholders(&json!("this is not json")), json!("this is not json"));
        // big integers survive untouched
        let big = v(r#"{"args":[18446744073709551615, 1e+308]}"#);
        let filled = fill_placeholders(&big);
        assert_eq!(filled["args"][0].as_u64(), Some(u64::MAX));
        assert_eq!(filled["args"][1].as_f64(), Some(1e308));
        let resent: Value = serde_json::from_str(&filled.to_string()).unwrap();
        assert_eq!(resent, big, "compact JSON round trip");
    }

    #[test]
    fn reply_recognition() {
        let rpc = Reply::of(&v(r#"{"role":"rpc","u":"x1"}"#));
        assert_eq!(rpc, Reply::SameU("x1".into()));
        assert!(rpc.is_reply(&v(r#"{"r":1,"u":"x1"}"#)));
        assert!(!rpc.is_reply(&v(r#"{"r":1,"u":"x2"}"#)));
        let sub = Reply::of(&v(r#"{"role":"pubsub-subscribe","u":"s1"}"#));
        assert_eq!(sub, Reply::Ack("s1".into()));
        assert!(sub.is_reply(&v(r#"{"role":"pubsub-ack","operation_id":"s1","u":"ack_s1"}"#)));
        assert!(!sub.is_reply(&v(r#"{"role":"pubsub-notification","u":"s1"}"#)));
        assert_eq!(Reply::of(&json!("not json")), Reply::NextFrame);
        assert_eq!(Reply::of(&v(r#"{"role":"rpc","u":123}"#)), Reply::NextFrame);
    }

    fn publish_case_matcher() -> Matcher {
        let c = load_cases()
            .into_iter()
            .find(|c| case_name(c) == "pubsub publish with a matching subscriber on the same connection")
            .unwrap();
        Matcher::new(c["expected_out"].as_array().unwrap().clone(), vec!["pub-req-1".into()])
    }

    fn frames() -> (Value, Value, Value) {
        let sub_ack =
            v(r#"{"role":"pubsub-ack","operation_id":"sub-req-1","success":true,"error":null,"u":"ack_sub-req-1"}"#);
        let notif = v(
            r#"{"role":"pubsub-notification","message":{"topic":"demo.x","payload":{"v":1},"timestamp":1.7e9,"message_id":"msg-1","publisher":"capture","headers":{},"routing_path":null,"current_hop":null},"subscription_id":"sub-1","u":"notification_msg-1_sub-1"}"#,
        );
        let pub_ack =
            v(r#"{"role":"pubsub-ack","operation_id":"pub-req-1","success":true,"error":null,"u":"ack_pub-req-1"}"#);
        (sub_ack, notif, pub_ack)
    }

    #[test]
    fn notification_and_publish_ack_may_swap() {
        let (sub_ack, notif, pub_ack) = frames();
        for order in [[&sub_ack, &notif, &pub_ack], [&sub_ack, &pub_ack, &notif]] {
            let mut m = publish_case_matcher();
            for f in order {
                assert!(!m.complete());
                m.feed(f).unwrap();
            }
            assert!(m.complete());
            assert!(m.feed(&sub_ack).unwrap_err().contains("after all expected"));
        }
    }

    #[test]
    fn other_reorderings_fail() {
        let (sub_ack, notif, pub_ack) = frames();
        // the subscribe ack is not the publish's ack: it must come first
        let mut m = publish_case_matcher();
        let why = m.feed(&notif).unwrap_err();
        assert!(why.contains("expected_out[0]"), "{why}");
        let mut m = publish_case_matcher();
        assert!(m.feed(&pub_ack).is_err());
        // duplicates are not accepted
        let mut m = publish_case_matcher();
        m.feed(&sub_ack).unwrap();
        m.feed(&notif).unwrap();
        assert!(m.feed(&notif).is_err());
        // without the publish's u the pair is strict
        let c = publish_case_matcher();
        let mut m = Matcher::new(c.expected.clone(), vec![]);
        m.feed(&sub_ack).unwrap();
        assert!(m.feed(&pub_ack).is_err());
    }

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("bl.#", "bl.x"));
        assert!(topic_matches("bl.#", "bl"));
        assert!(topic_matches("bl.#", "bl.x.y"));
        assert!(!topic_matches("bl.#", "blx"));
        assert!(topic_matches("demo.*", "demo.x"));
        assert!(!topic_matches("demo.*", "demo.x.y"));
        assert!(!topic_matches("demo.*", "demo"));
        assert!(topic_matches("debug.rpc.#", "debug.rpc.icb-1"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.b.d"));
    }

    #[test]
    fn isolated_order_puts_backlog_readers_first() {
        let cases: Vec<(usize, Value)> = vec![
            (
                3,
                json!({"name": "p", "frames_in": [{"role": "pubsub-publish", "u": "x", "message": {"topic": "bl.x"}}]}),
            ),
            (
                5,
                json!({"name": "s", "frames_in": [{"role": "pubsub-subscribe", "u": "y", "subscription": {"get_backlog": false}}]}),
            ),
            (
                7,
                json!({"name": "b", "frames_in": [{"role": "pubsub-subscribe", "u": "z", "subscription": {"get_backlog": true}}]}),
            ),
        ];
        let order: Vec<usize> = isolated_run_order(cases).into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, vec![7, 3, 5]);
    }

    // -- replay_case against a small scripted websocket server ---------------------

    #[derive(Clone, Copy, Default)]
    struct FakeConfig {
        /// send a publish's ack before its notification (the reference does the opposite)
        ack_first: bool,
        /// close the connection on a non-JSON frame (like the reference) instead of replying
        close_on_bad_json: bool,
        /// add 1 to every echo result
        wrong_echo: bool,
    }

    /// A tiny stand-in for MPREG: `echo`/`slow` rpcs (concurrently), subscribe/publish/
    /// unsubscribe with exact-topic or `prefix.#`/`prefix.*` patterns, and 1002 for
    /// frames that are not JSON. Returns its ws:// url.
    async fn fake_server(cfg: FakeConfig) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(fake_connection(tcp, cfg));
            }
        });
        format!("ws://{addr}/")
    }

    async fn fake_connection(tcp: tokio::net::TcpStream, cfg: FakeConfig) {
        let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else { return };
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Value>>();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                match out {
                    Some(v) =>
                    {
                        #[allow(clippy::useless_conversion)]
                        if sink.send(Message::Binary(v.to_string().into_bytes().into())).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        let _ = sink.close().await;
                        break;
                    }
                }
            }
        });
        let mut subs: Vec<(String, String)> = Vec::new(); // (subscription_id, pattern)
        while let Some(Ok(msg)) = stream.next().await {
            let bytes: Vec<u8> = match msg {
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Binary(b) => b[..].to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(req) = serde_json::from_slice::<Value>(&bytes) else {
                if cfg.close_on_bad_json {
                    let _ = tx.send(None);
                    break;
                }
                let _ = tx.send(Some(json!({"r": null, "error": {"code": 1002, "message": "Invalid request",
                    "details": "invalid JSON: nope"}, "u": null, "intermediate_results": [], "execution_summary": null})));
                continue;
            };
            let u = req["u"].clone();
            let ack = json!({"role": "pubsub-ack", "operation_id": u, "success": true, "error": null,
                "u": format!("ack_{}", u.as_str().unwrap_or(""))});
            match req["role"].as_str() {
                Some("rpc") => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut r = Map::new();
                        for c in req["cmds"].as_array().unwrap() {
                            let arg = c["args"][0].clone();
                            let val = match c["fun"].as_str().unwrap() {
                                "slow" => {
                                    tokio::time::sleep(Duration::from_secs_f64(arg.as_f64().unwrap())).await;
                                    arg
                                }
                                _ if cfg.wrong_echo => json!(arg.as_i64().unwrap_or(0) + 1),
                                _ => arg,
                            };
                            r.insert(c["name"].as_str().unwrap().to_string(), val);
                        }
                        let _ = tx.send(Some(json!({"r": r, "error": null, "u": u,
                            "intermediate_results": [], "execution_summary": null})));
                    });
                }
                Some("pubsub-subscribe") => {
                    let sid = req["subscription"]["subscription_id"].as_str().unwrap().to_string();
                    for p in req["subscription"]["patterns"].as_array().unwrap() {
                        subs.push((sid.clone(), p["pattern"].as_str().unwrap().to_string()));
                    }
                    let _ = tx.send(Some(ack));
                }
                Some("pubsub-unsubscribe") => {
                    let sid = req["subscription_id"].as_str().unwrap();
                    subs.retain(|(s, _)| s != sid);
                    let _ = tx.send(Some(ack));
                }
                Some("pubsub-publish") => {
                    let mut msg = req["message"].clone();
                    msg["routing_path"] = Value::Null;
                    msg["current_hop"] = Value::Null;
                    let topic = msg["topic"].as_str().unwrap().to_string();
                    let mid = msg["message_id"].as_str().unwrap().to_string();
                    let notes: Vec<Value> = subs
                        .iter()
                        .filter(|(_, p)| topic_matches(p, &topic))
                        .map(|(sid, _)| {
                            json!({"role": "pubsub-notification", "message": msg,
                            "subscription_id": sid, "u": format!("notification_{mid}_{sid}")})
                        })
                        .collect();
                    let mut out = notes;
                    if cfg.ack_first {
                        out.insert(0, ack);
                    } else {
                        out.push(ack);
                    }
                    for f in out {
                        let _ = tx.send(Some(f));
                    }
                }
                _ => {}
            }
        }
    }

    fn case(name: &str) -> Value {
        load_cases().into_iter().find(|c| case_name(c) == name).unwrap_or_else(|| panic!("no case {name:?}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_passes_against_a_conforming_fake() {
        let url = fake_server(FakeConfig::default()).await;
        for name in [
            "minimal echo sent as a text frame",
            "python-client-shaped single echo",
            "unsigned 64-bit maximum integer round trip",
            "not JSON",
            "pubsub subscribe",
            "pubsub publish with a matching subscriber on the same connection",
            "pubsub unsubscribe",
            "publish with no matching subscriber",
            "requests on one connection run concurrently",
        ] {
            replay_case(&url, &case(name)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let url = fake_server(FakeConfig { ack_first: true, ..Default::default() }).await;
        let name = "pubsub publish with a matching subscriber on the same connection";
        replay_case(&url, &case(name)).await.unwrap_or_else(|e| panic!("ack first: {name}: {e}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_reports_failures() {
        // wrong value
        let url = fake_server(FakeConfig { wrong_echo: true, ..Default::default() }).await;
        let why = replay_case(&url, &case("minimal echo sent as a text frame")).await.unwrap_err();
        assert!(why.contains("$.r.e"), "{why}");

        // connection closed instead of the 1002 reply
        let url = fake_server(FakeConfig { close_on_bad_json: true, ..Default::default() }).await;
        let why = replay_case(&url, &case("not JSON")).await.unwrap_err();
        assert!(why.contains("connection closed"), "{why}");

        let url = fake_server(FakeConfig::default()).await;

        // pipelined slow+fast against a server that answers in order: simulate by not pipelining
        let mut c = case("requests on one connection run concurrently");
        c["frames_in"][0]["cmds"][0]["args"][0] = json!(0.2);
        c["expected_out"][1]["r"]["s"] = json!(0.2);
        c.as_object_mut().unwrap().remove("pipelined");
        let why = replay_case(&url, &c).await.unwrap_err();
        assert!(why.contains("does not match expected_out[0]"), "{why}");

        // expected frame never arrives: timeout with progress
        let mut c = case("minimal echo sent as a text frame");
        c["expected_out"].as_array_mut().unwrap().push(json!({"never": true}));
        c["read_timeout_s"] = json!(0.5);
        let why = replay_case(&url, &c).await.unwrap_err();
        assert!(why.contains("timed out") && why.contains("missing expected_out[1]"), "{why}");

        // quiet period violated: two subscriptions on one pattern, only one expected;
        // with the ack first, the surplus notification comes after all expected frames
        let url = fake_server(FakeConfig { ack_first: true, ..Default::default() }).await;
        let mut c = case("pubsub publish with a matching subscriber on the same connection");
        let mut second = c["frames_in"][0].clone();
        second["u"] = json!("sub-req-2");
        second["subscription"]["subscription_id"] = json!("sub-2");
        c["frames_in"].as_array_mut().unwrap().insert(1, second);
        c["expected_out"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"role": "pubsub-ack", "operation_id": "sub-req-2", "success": true, "error": null, "u": "ack_sub-req-2"}));
        c["quiet_s"] = json!(0.5);
        let why = replay_case(&url, &c).await.unwrap_err();
        assert!(why.contains("quiet period") && why.contains("notification_msg-1_sub-2"), "{why}");
    }
}
