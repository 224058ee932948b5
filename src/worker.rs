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
    ws: Ws,
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

    /// Connects and registers.
    async fn register(&self) -> Result<Registered, WorkerError> {
        // Nagle off: an answer written while earlier ones are unacknowledged must not wait.
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&self.url, None, true)
            .await
            .map_err(|e| WorkerError::Connection(e.to_string()))?;
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
        ws.send(Message::text(register.to_string())).await.map_err(|e| WorkerError::Connection(e.to_string()))?;
        let registered = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
                Some(Ok(Message::Binary(bytes))) => {
                    break serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(WorkerError::Connection(e.to_string())),
                None => return Err(WorkerError::Connection("closed before worker-registered".to_owned())),
            }
        };
        if let Some(error) = registered.get("error") {
            return Err(WorkerError::Refused(error.clone()));
        }
        let worker_id = registered["worker_id"].as_str().unwrap_or_default().to_owned();
        let heartbeat = Duration::from_secs_f64(registered["heartbeat_s"].as_f64().unwrap_or(5.0).max(0.05));
        Ok(Registered { ws, worker_id, heartbeat })
    }

    /// Serves on `registered`, then on each new registration after a lost connection.
    async fn run(self, mut registered: Registered, ids: watch::Sender<String>, mut stopped: oneshot::Receiver<Stop>) {
        let functions: HashMap<(String, String), FunctionSpec> = self
            .functions
            .iter()
            .map(|f| ((f.identity().name.clone(), f.identity().version.to_string()), f.clone()))
            .collect();
        loop {
            if let Ended::Stopped = serve(registered.ws, &functions, registered.heartbeat, &mut stopped).await {
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

/// The websocket close handshake: the node's close frame is awaited (for at most a few
/// seconds), so the socket is not torn down with frames unread — a TCP reset then could
/// discard the goodbye before the node read it.
async fn close(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    mut stream: futures_util::stream::SplitStream<Ws>,
) {
    let _ = sink.close().await;
    let drain = async { while let Some(Ok(_)) = stream.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// The worker's loop: calls in, results out, heartbeats, until stopped or disconnected
/// (then the calls in flight are dropped: nobody can take their answers).
async fn serve(
    ws: Ws,
    functions: &HashMap<(String, String), FunctionSpec>,
    heartbeat: Duration,
    stopped: &mut oneshot::Receiver<Stop>,
) -> Ended {
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let ended = serve_calls(ws, functions, heartbeat, stopped, &mut running).await;
    for task in running.values() {
        task.abort();
    }
    ended
}

async fn serve_calls(
    ws: Ws,
    functions: &HashMap<(String, String), FunctionSpec>,
    heartbeat: Duration,
    stopped: &mut oneshot::Receiver<Stop>,
    running: &mut HashMap<String, JoinHandle<()>>,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    let (results, mut outgoing) = mpsc::unbounded_channel::<(String, Option<String>)>();
    let mut beat = tokio::time::interval(heartbeat);
    let mut leaving = false;
    loop {
        tokio::select! {
            stop = &mut *stopped, if !leaving => match stop {
                Ok(Stop::Goodbye) | Err(_) => {
                    leaving = true;
                    if sink.send(Message::text(json!({"role": "worker-goodbye"}).to_string())).await.is_err() {
                        return Ended::Stopped;
                    }
                    if running.is_empty() {
                        close(sink, stream).await;
                        return Ended::Stopped;
                    }
                }
                Ok(Stop::Abort) => return Ended::Stopped,
            },
            _ = beat.tick() => {
                if sink.send(Message::text(json!({"role": "worker-heartbeat"}).to_string())).await.is_err() {
                    return lost(leaving);
                }
            }
            Some((id, frame)) = outgoing.recv() => {
                running.remove(&id);
                if let Some(frame) = frame {
                    if sink.send(Message::text(frame)).await.is_err() {
                        return lost(leaving);
                    }
                }
                if leaving && running.is_empty() {
                    close(sink, stream).await;
                    return Ended::Stopped;
                }
            }
            message = stream.next() => {
                let mut message = message;
                // The frames already received are all handled before the answers are
                // flushed: one write for a burst of calls.
                loop {
                    let frame = match message {
                        Some(Ok(Message::Text(text))) => NodeFrame::parse(text.as_bytes()),
                        Some(Ok(Message::Binary(bytes))) => NodeFrame::parse(&bytes),
                        Some(Ok(_)) => None,
                        Some(Err(_)) | None => return lost(leaving),
                    };
                    if let Some(frame) = frame {
                        if on_frame(frame, functions, &mut sink, running, &results).await.is_err() {
                            return lost(leaving);
                        }
                    }
                    match stream.next().now_or_never() {
                        Some(next) => message = next,
                        None => break,
                    }
                }
                if sink.flush().await.is_err() {
                    return lost(leaving);
                }
                if leaving && running.is_empty() {
                    close(sink, stream).await;
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

/// Handles one frame from the node. An inline function's answer is queued on `sink`
/// (the caller flushes); any other call runs as a task. `Err` when the websocket broke.
async fn on_frame(
    frame: NodeFrame,
    functions: &HashMap<(String, String), FunctionSpec>,
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    running: &mut HashMap<String, JoinHandle<()>>,
    results: &mpsc::UnboundedSender<(String, Option<String>)>,
) -> Result<(), ()> {
    let NodeFrame { role, id, fun, version, args, kwargs, timeout_ms } = frame;
    match role.as_str() {
        "worker-call" => {
            let call = CallArgs::new(args, kwargs);
            let spec = functions.get(&(fun, version)).cloned();
            // Cheap functions answer in place: no task, no hop through the channel.
            if let Some(spec) = spec.as_ref().filter(|spec| spec.is_inline()) {
                let outcome = spec
                    .invoke_inline(call)
                    .unwrap_or_else(|| Err(crate::FunctionError::new("Internal", "not inline")));
                return sink.feed(Message::text(result_frame(&id, &outcome))).await.map_err(drop);
            }
            let timeout = Duration::from_millis(timeout_ms.unwrap_or(30_000));
            running.insert(id.clone(), tokio::spawn(call_task(spec, call, id, timeout, results.clone())));
        }
        "worker-cancel" => {
            if let Some(task) = running.remove(&id) {
                task.abort();
            }
        }
        _ => {}
    }
    Ok(())
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
