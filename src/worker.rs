//! A worker in Rust: serve [`FunctionSpec`]s from a separate process over a node's
//! websocket, with the worker protocol (README "Workers"; frames in
//! `mpreg_actors::worker::wire`).
//!
//! ```no_run
//! # async fn run() -> Result<(), mpreg::worker::WorkerError> {
//! use mpreg::worker::Worker;
//! use mpreg::FunctionSpec;
//!
//! let worker = Worker::new("ws://127.0.0.1:6666", "adder")
//!     .function(FunctionSpec::sync("add", |a: i64, b: i64| a + b).resources(["cpu"]))
//!     .start()
//!     .await?;
//! // ... serve until done, then leave cleanly:
//! worker.goodbye().await;
//! # Ok(()) }
//! ```
//!
//! Calls run concurrently (each as a task; sync functions on the blocking pool, as in a
//! node); a call past its `timeout_ms`, or cancelled by the node, is dropped. The worker
//! sends a heartbeat as often as the node asks. When the connection is lost it drops the
//! calls in flight (the node retries them elsewhere), reconnects with exponential
//! backoff and jitter (0.1 s doubling up to 5 s by default, as the Python SDK) and
//! registers again; a refusal other than "node full" (1006) ends it, logged.
//!
//! It opens the extra websockets (lanes) the node offers, so that a call made on any of
//! the node's threads reaches it without a hand-off to another thread; a call is answered
//! on the websocket it came on.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use mpreg_actors::function::FunctionResult;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::{CallArgs, FunctionSpec};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The websocket could not be opened or broke during registration.
    #[error("worker connection: {0}")]
    Connection(String),
    /// The node refused the registration (its error frame).
    #[error("registration refused: {0}")]
    Refused(Value),
}

/// A worker being configured.
pub struct Worker {
    url: String,
    name: String,
    token: Option<String>,
    max_concurrency: Option<usize>,
    functions: Vec<FunctionSpec>,
    /// How to reconnect after a lost connection; `None`: stop instead.
    reconnect: Option<Backoff>,
}

/// Reconnection delays: `initial`, doubled after each failed attempt up to `max`, each
/// delay jittered to between 0.5× and 1.5×.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

/// A registration the node accepted.
struct Registered {
    /// The registering websocket first, then the lanes.
    conns: Vec<Ws>,
    worker_id: String,
    heartbeat: Duration,
}

/// Why the serving loop ended.
enum Ended {
    /// Told to stop (goodbye or abort), or the handle was dropped.
    Stopped,
    /// The connection broke.
    Lost,
}

/// How a running worker is told to stop.
enum Stop {
    /// Say goodbye, let calls in flight finish, close.
    Goodbye,
    /// Drop the connection at once (as a crash would).
    Abort,
}

/// A registered worker serving calls.
pub struct RunningWorker {
    /// The id of the current registration.
    worker_id: watch::Receiver<String>,
    stop: Option<oneshot::Sender<Stop>>,
    task: JoinHandle<()>,
}

impl Worker {
    /// A worker named `name` (shown in errors, `/catalog`, `/metrics`) for the node at `url`.
    pub fn new(url: &str, name: &str) -> Self {
        Worker {
            url: url.to_owned(),
            name: name.to_owned(),
            token: None,
            max_concurrency: None,
            functions: Vec::new(),
            reconnect: Some(Backoff::default()),
        }
    }

    /// Reconnection delays (the default is [`Backoff::default`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.reconnect = Some(backoff);
        self
    }

    /// Stops when the connection is lost, instead of reconnecting.
    pub fn no_reconnect(mut self) -> Self {
        self.reconnect = None;
        self
    }

    /// The node's worker token (needed when the node has credentials).
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Calls this worker runs at once (the node's `worker_max_concurrency` otherwise).
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = Some(n);
        self
    }

    /// Serves `spec` (its name, function_id, version and resources are registered).
    pub fn function(mut self, spec: FunctionSpec) -> Self {
        self.functions.push(spec);
        self
    }

    /// Connects, registers, and serves calls in a task until stopped (reconnecting after a
    /// lost connection). Fails when the first registration does.
    pub async fn start(self) -> Result<RunningWorker, WorkerError> {
        let first = self.register().await?;
        let (ids, worker_id) = watch::channel(first.worker_id.clone());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(self.run(first, ids, stopped));
        Ok(RunningWorker { worker_id, stop: Some(stop), task })
    }

    /// Connects and registers, then opens the lanes the node offers.
    async fn register(&self) -> Result<Registered, WorkerError> {
        let functions: Vec<Value> = self
            .functions
            .iter()
            .map(|f| {
                let id = f.identity();
                json!({"name": id.name, "function_id": id.function_id, "version": id.version.to_string(),
                       "resources": id.resources})
            })
            .collect();
        let mut register =
            json!({"role": "worker-register", "u": "register", "name": self.name, "functions": functions});
        if let Some(token) = &self.token {
            register["token"] = json!(token);
        }
        if let Some(n) = self.max_concurrency {
            register["max_concurrency"] = json!(n);
        }
        let (ws, registered) = self.handshake(&register).await?;
        if let Some(error) = registered.get("error") {
            return Err(WorkerError::Refused(error.clone()));
        }
        let worker_id = registered["worker_id"].as_str().unwrap_or_default().to_owned();
        let heartbeat = Duration::from_secs_f64(registered["heartbeat_s"].as_f64().unwrap_or(5.0).max(0.05));
        let mut conns = vec![ws];
        let lanes = registered["lanes"].as_u64().unwrap_or(0);
        if let Some(key) = registered["lane_key"].as_str().filter(|_| lanes > 0) {
            // A lane that fails to open fails the registration (dropping the others
            // disconnects the worker); one the node refuses is done without.
            for lane in 1..=lanes {
                let frame = json!({"role": "worker-lane", "u": format!("lane-{lane}"), "worker_id": worker_id,
                                   "lane_key": key});
                match self.handshake(&frame).await? {
                    (ws, reply) if reply.get("error").is_none() => conns.push(ws),
                    (_, reply) => tracing::warn!(worker = %self.name, error = %reply["error"], "lane refused"),
                }
            }
        }
        Ok(Registered { conns, worker_id, heartbeat })
    }

    /// Opens a websocket, sends `frame` and reads the node's first answer.
    async fn handshake(&self, frame: &Value) -> Result<(Ws, Value), WorkerError> {
        // Nagle off: an answer written while earlier ones are unacknowledged must not wait.
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&self.url, None, true)
            .await
            .map_err(|e| WorkerError::Connection(e.to_string()))?;
        ws.send(Message::text(frame.to_string())).await.map_err(|e| WorkerError::Connection(e.to_string()))?;
        loop {
            let reply = match ws.next().await {
                Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
                Some(Ok(Message::Binary(bytes))) => serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(WorkerError::Connection(e.to_string())),
                None => return Err(WorkerError::Connection("closed before worker-registered".to_owned())),
            };
            return Ok((ws, reply));
        }
    }

    /// Serves on `registered`, then on each new registration after a lost connection.
    async fn run(self, mut registered: Registered, ids: watch::Sender<String>, mut stopped: oneshot::Receiver<Stop>) {
        let functions: HashMap<(String, String), FunctionSpec> = self
            .functions
            .iter()
            .map(|f| ((f.identity().name.clone(), f.identity().version.to_string()), f.clone()))
            .collect();
        loop {
            if let Ended::Stopped = serve(registered.conns, &functions, registered.heartbeat, &mut stopped).await {
                return;
            }
            let Some(backoff) = self.reconnect else { return };
            tracing::warn!(worker = %self.name, url = %self.url, "worker connection lost; reconnecting");
            let mut delay = backoff.initial;
            registered = loop {
                tokio::select! {
                    () = tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>())) => {}
                    _ = &mut stopped => return,
                }
                match self.register().await {
                    Ok(registered) => break registered,
                    Err(WorkerError::Refused(error)) if error["code"] != 1006 => {
                        tracing::error!(worker = %self.name, %error, "the node refused the worker; it stops");
                        return;
                    }
                    Err(e) => tracing::info!(worker = %self.name, "reconnecting: {e}"),
                }
                delay = (delay * 2).min(backoff.max);
            };
            tracing::info!(worker = %self.name, worker_id = %registered.worker_id, "worker registered again");
            ids.send_replace(registered.worker_id.clone());
        }
    }
}

impl RunningWorker {
    /// The id the node gave this worker's current registration (a new one after each
    /// reconnection).
    pub fn worker_id(&self) -> String {
        self.worker_id.borrow().clone()
    }

    /// Says `worker-goodbye`, lets the calls in flight answer, then closes.
    pub async fn goodbye(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Goodbye);
        }
        let _ = (&mut self.task).await;
    }

    /// Drops the connection at once, without a goodbye (as if the process died).
    pub async fn abort(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Abort);
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

type Sink = futures_util::stream::SplitSink<Ws, Message>;

/// Every websocket's frames, tagged with its index; `None` once when it ends.
type Inbound = futures_util::stream::SelectAll<
    futures_util::stream::Chain<
        futures_util::stream::Map<
            futures_util::stream::SplitStream<Ws>,
            Box<dyn FnMut(Result<Message, WsError>) -> (usize, Option<Result<Message, WsError>>) + Send>,
        >,
        futures_util::stream::Once<futures_util::future::Ready<(usize, Option<Result<Message, WsError>>)>>,
    >,
>;

type WsError = tokio_tungstenite::tungstenite::Error;

/// Splits the worker's websockets into their sinks (by index) and one stream of all
/// their frames.
fn split(conns: Vec<Ws>) -> (Vec<Sink>, Inbound) {
    let mut sinks = Vec::with_capacity(conns.len());
    let mut streams = Vec::with_capacity(conns.len());
    for (i, ws) in conns.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        sinks.push(sink);
        let tag: Box<dyn FnMut(_) -> _ + Send> = Box::new(move |message| (i, Some(message)));
        streams.push(stream.map(tag).chain(futures_util::stream::once(futures_util::future::ready((i, None)))));
    }
    (sinks, futures_util::stream::select_all(streams))
}

/// The websocket close handshake: the node's close frames are awaited (for at most a few
/// seconds), so no socket is torn down with frames unread — a TCP reset then could
/// discard the goodbye before the node read it. The registering websocket closes first:
/// the node reads the goodbye before that close, so the worker leaves as one that said
/// goodbye, whichever of the node's threads serves its lanes (which the node closes then).
async fn close(sinks: Vec<Sink>, mut inbound: Inbound) {
    let drain = async {
        let mut sinks = sinks.into_iter();
        if let Some(mut main) = sinks.next() {
            let _ = main.close().await;
            while let Some((lane, message)) = inbound.next().await {
                if lane == 0 && message.is_none() {
                    break;
                }
            }
        }
        for mut lane in sinks {
            let _ = lane.close().await;
        }
        while inbound.next().await.is_some() {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// The worker's loop: calls in, results out, heartbeats, until stopped or disconnected
/// (then the calls in flight are dropped: nobody can take their answers).
async fn serve(
    conns: Vec<Ws>,
    functions: &HashMap<(String, String), FunctionSpec>,
    heartbeat: Duration,
    stopped: &mut oneshot::Receiver<Stop>,
) -> Ended {
    let mut running: Running = HashMap::new();
    let ended = serve_calls(conns, functions, heartbeat, stopped, &mut running).await;
    for (task, _) in running.values() {
        task.abort();
    }
    ended
}

/// The calls running as tasks, by id, with the websocket each came on (its answer goes
/// back there).
type Running = HashMap<String, (JoinHandle<()>, usize)>;

async fn serve_calls(
    conns: Vec<Ws>,
    functions: &HashMap<(String, String), FunctionSpec>,
    heartbeat: Duration,
    stopped: &mut oneshot::Receiver<Stop>,
    running: &mut Running,
) -> Ended {
    let (mut sinks, mut stream) = split(conns);
    // Heartbeats and the goodbye go on the registering websocket.
    let main = 0;
    let (results, mut outgoing) = mpsc::unbounded_channel::<(String, Option<String>)>();
    let mut beat = tokio::time::interval(heartbeat);
    let mut leaving = false;
    loop {
        tokio::select! {
            stop = &mut *stopped, if !leaving => match stop {
                Ok(Stop::Goodbye) | Err(_) => {
                    leaving = true;
                    let goodbye = Message::text(json!({"role": "worker-goodbye"}).to_string());
                    if sinks[main].send(goodbye).await.is_err() {
                        return Ended::Stopped;
                    }
                    if running.is_empty() {
                        close(sinks, stream).await;
                        return Ended::Stopped;
                    }
                }
                Ok(Stop::Abort) => return Ended::Stopped,
            },
            _ = beat.tick() => {
                if sinks[main].send(Message::text(json!({"role": "worker-heartbeat"}).to_string())).await.is_err() {
                    return lost(leaving);
                }
            }
            Some((id, frame)) = outgoing.recv() => {
                // A call no longer running was cancelled: nobody waits for its answer.
                if let (Some((_, lane)), Some(frame)) = (running.remove(&id), frame) {
                    if sinks[lane].send(Message::text(frame)).await.is_err() {
                        return lost(leaving);
                    }
                }
                if leaving && running.is_empty() {
                    close(sinks, stream).await;
                    return Ended::Stopped;
                }
            }
            message = stream.next() => {
                let mut next = message;
                // The frames already received are all handled before the answers are
                // flushed: one write per websocket for a burst of calls.
                let mut fed = vec![false; sinks.len()];
                loop {
                    // Any websocket lost is the worker lost: the node drops them all.
                    let Some((lane, Some(Ok(message)))) = next else { return lost(leaving) };
                    let frame = match message {
                        Message::Text(text) => NodeFrame::parse(text.as_bytes()),
                        Message::Binary(bytes) => NodeFrame::parse(&bytes),
                        _ => None,
                    };
                    if let Some(frame) = frame {
                        let call = Call { lane, functions, results: &results };
                        if call.on_frame(frame, &mut sinks[lane], running, &mut fed[lane]).await.is_err() {
                            return lost(leaving);
                        }
                    }
                    match stream.next().now_or_never() {
                        Some(message) => next = message,
                        None => break,
                    }
                }
                for (sink, _) in sinks.iter_mut().zip(&fed).filter(|(_, fed)| **fed) {
                    if sink.flush().await.is_err() {
                        return lost(leaving);
                    }
                }
                if leaving && running.is_empty() {
                    close(sinks, stream).await;
                    return Ended::Stopped;
                }
            }
        }
    }
}

/// The fields of the node's frames the worker reads (`worker-call`, `worker-cancel`);
/// absent ones are empty, unknown ones ignored.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct NodeFrame {
    role: String,
    id: String,
    fun: String,
    version: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    timeout_ms: Option<u64>,
}

impl NodeFrame {
    /// `None` for a frame that is not a JSON object of that shape (ignored).
    fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Where a frame from the node came from and what answers it.
struct Call<'a> {
    /// The websocket it came on.
    lane: usize,
    functions: &'a HashMap<(String, String), FunctionSpec>,
    results: &'a mpsc::UnboundedSender<(String, Option<String>)>,
}

impl Call<'_> {
    /// Handles one frame from the node. An inline function's answer is queued on `sink`
    /// (`fed` set: the caller flushes); any other call runs as a task. `Err` when the
    /// websocket broke.
    async fn on_frame(
        &self,
        frame: NodeFrame,
        sink: &mut Sink,
        running: &mut Running,
        fed: &mut bool,
    ) -> Result<(), ()> {
        let NodeFrame { role, id, fun, version, args, kwargs, timeout_ms } = frame;
        match role.as_str() {
            "worker-call" => {
                let call = CallArgs::new(args, kwargs);
                let spec = self.functions.get(&(fun, version)).cloned();
                // Cheap functions answer in place: no task, no hop through the channel.
                if let Some(spec) = spec.as_ref().filter(|spec| spec.is_inline()) {
                    let outcome = spec
                        .invoke_inline(call)
                        .unwrap_or_else(|| Err(crate::FunctionError::new("Internal", "not inline")));
                    *fed = true;
                    return sink.feed(Message::text(result_frame(&id, &outcome))).await.map_err(drop);
                }
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(30_000));
                let task = tokio::spawn(call_task(spec, call, id.clone(), timeout, self.results.clone()));
                running.insert(id, (task, self.lane));
            }
            "worker-cancel" => {
                if let Some((task, _)) = running.remove(&id) {
                    task.abort();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A broken connection: lost, unless the worker was leaving anyway.
fn lost(leaving: bool) -> Ended {
    if leaving {
        Ended::Stopped
    } else {
        Ended::Lost
    }
}

/// The `worker-result` frame of call `id`, encoded.
fn result_frame(id: &str, outcome: &FunctionResult) -> String {
    /// Exactly one of `result` and `error` (`{kind, message}`).
    #[derive(serde::Serialize)]
    struct ResultFrame<'a> {
        role: &'static str,
        id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a crate::FunctionError>,
    }
    let (result, error) = match outcome {
        Ok(value) => (Some(value), None),
        Err(e) => (None, Some(e)),
    };
    let frame = ResultFrame { role: "worker-result", id, result, error };
    // A tree of JSON values and strings always encodes.
    serde_json::to_string(&frame).unwrap_or_default()
}

/// Runs one call as a task; its frame (none past the deadline: nobody waits for it) goes
/// back to the loop.
async fn call_task(
    spec: Option<FunctionSpec>,
    call: CallArgs,
    id: String,
    timeout: Duration,
    results: mpsc::UnboundedSender<(String, Option<String>)>,
) {
    let outcome = match spec {
        Some(spec) => tokio::time::timeout(timeout, spec.invoke(call)).await.ok(),
        None => Some(Err(crate::FunctionError::new("NotFound", "no such function (name, version) on this worker"))),
    };
    let frame = outcome.map(|outcome| result_frame(&id, &outcome));
    let _ = results.send((id, frame));
}
