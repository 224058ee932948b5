//! The async client SDK: one websocket, shared by any number of tasks.
//!
//! ```no_run
//! # async fn run() -> Result<(), mpreg::ClientError> {
//! use mpreg::{Client, RpcCommand};
//! use serde_json::json;
//! let client = Client::connect("ws://127.0.0.1:6666").await?;
//! assert_eq!(client.call("echo", vec![json!("hi")]).await?, json!("hi"));
//! let r = client
//!     .request(vec![
//!         RpcCommand::new("sum", "add", vec![json!(20), json!(22)]),
//!         RpcCommand::new("scaled", "multiply", vec![json!("sum"), json!(3)]),
//!     ])
//!     .await?;
//! assert_eq!(r["scaled"], json!(126));
//! # Ok(()) }
//! ```
//!
//! Requests are pipelined: each gets a fresh `u`, and a reader task hands every response
//! to the caller waiting on that `u`, so a slow call never blocks a fast one. `Client` is
//! cheap to clone; clones share the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mpreg_actors::protocol::{
    ErrorCode, PubSubAck, PubSubMessage, PubSubNotification, RpcCommand, RpcError, RpcRequest, RpcResponse,
    Subscription, TopicPatternSpec,
};
use mpreg_actors::unix_now;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

mod cache;
mod queue;

pub use cache::{CacheHit, CacheOptions, CasOutcome};
pub use queue::{QueueMessage, QueueSendOptions, QueueSubscription};

/// What can go wrong on the client side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (`code` 1001..1006).
    #[error("{0}")]
    Rpc(RpcError),
    /// The websocket could not be opened.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The connection closed before the answer came.
    #[error("connection closed")]
    Disconnected,
    /// No answer within the client-side deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server sent something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rpc(e) => e.kind(),
            _ => None,
        }
    }
}

/// Options of a single call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Resources the function must have.
    pub locs: Vec<String>,
    /// Only a function registered with this id.
    pub function_id: Option<String>,
    /// Only versions matching this constraint.
    pub version_constraint: Option<String>,
    /// Whole-request timeout, sent to the server.
    pub timeout: Option<Duration>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Serve the result from the node's cache and cache it for this many seconds
    /// (`"cache": {"ttl": S}` on the command).
    pub cache_ttl: Option<f64>,
    /// Run in this cluster, over the federation bridges when it is another.
    pub target_cluster: Option<String>,
}

type Waiters = Mutex<HashMap<String, oneshot::Sender<Value>>>;
type Subscribers = Mutex<HashMap<String, mpsc::UnboundedSender<PubSubMessage>>>;
type QueueSubscribers = Mutex<HashMap<String, mpsc::UnboundedSender<QueueMessage>>>;

struct Inner {
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    outgoing: mpsc::UnboundedSender<Message>,
    waiters: Waiters,
    subscribers: Subscribers,
    queue_subscribers: QueueSubscribers,
    next_id: AtomicU64,
    prefix: String,
    deadline: Duration,
}

/// A connection to one node.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A subscription's stream of messages.
pub struct SubscriptionStream {
    /// The subscription id.
    pub id: String,
    messages: mpsc::UnboundedReceiver<PubSubMessage>,
}

impl SubscriptionStream {
    /// The next message; `None` when the connection closed.
    pub async fn next(&mut self) -> Option<PubSubMessage> {
        self.messages.recv().await
    }
}

impl Client {
    /// Connects to `ws://host:port` (any path).
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        // Nagle off: a request is one small frame that must not wait for the previous ACK.
        let (socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .map_err(|e| ClientError::Connect { url: url.to_owned(), message: e.to_string() })?;
        let (mut sink, mut stream) = socket.split();
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Message>();
        let inner = Arc::new(Inner {
            writer: Mutex::new(None),
            outgoing,
            waiters: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            queue_subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            prefix: format!("{:08x}", rand::random::<u32>()),
            // Longer than the server's default request timeout, so the server's 1004
            // normally arrives first; this only guards against a vanished server.
            deadline: Duration::from_secs(45),
        });
        let writer = tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                // Batch whatever else is queued into one flush.
                let mut batch = vec![message];
                while let Ok(more) = queue.try_recv() {
                    batch.push(more);
                }
                for message in batch {
                    let closing = matches!(message, Message::Close(_));
                    if sink.feed(message).await.is_err() {
                        return;
                    }
                    if closing {
                        let _ = sink.flush().await;
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            // Every handle on the client is gone: close the websocket (the reader ends
            // with the server's answer) rather than leave it open until the server's
            // client_timeout.
            let _ = sink.send(Message::Close(None)).await;
        });
        inner.writer.lock().map(|mut w| *w = Some(writer)).ok();
        let reader = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let bytes = match message {
                    Message::Text(text) => text.into_bytes(),
                    Message::Binary(bytes) => bytes,
                    Message::Close(_) => break,
                    _ => continue,
                };
                let Some(inner) = reader.upgrade() else { break };
                inner.dispatch(&bytes);
            }
            if let Some(inner) = reader.upgrade() {
                // Dropping the senders wakes every waiter with `Disconnected`.
                inner.waiters.lock().map(|mut w| w.clear()).ok();
                inner.subscribers.lock().map(|mut s| s.clear()).ok();
                inner.queue_subscribers.lock().map(|mut s| s.clear()).ok();
            }
        });
        Ok(Client { inner })
    }

    /// Closes the connection politely (a websocket close frame) and waits, briefly, for it
    /// to be sent. Pending calls end with `Disconnected`.
    pub async fn close(&self) {
        let _ = self.inner.outgoing.send(Message::Close(None));
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        }
    }

    fn next_u(&self) -> String {
        format!("{}-{}", self.inner.prefix, self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    async fn roundtrip(&self, u: String, frame: Value, deadline: Duration) -> Result<Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().map_err(|_| ClientError::Disconnected)?.insert(u.clone(), tx);
        let bytes = serde_json::to_vec(&frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if self.inner.outgoing.send(Message::Binary(bytes)).is_err() {
            self.forget(&u);
            return Err(ClientError::Disconnected);
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Err(_) => {
                self.forget(&u);
                Err(ClientError::Timeout(deadline))
            }
        }
    }

    fn forget(&self, u: &str) {
        if let Ok(mut waiters) = self.inner.waiters.lock() {
            waiters.remove(u);
        }
    }

    /// Sends a full request and returns the full response (errors included).
    pub async fn send_request(&self, mut request: RpcRequest) -> Result<RpcResponse, ClientError> {
        if request.u.is_empty() {
            request.u = self.next_u();
        }
        let deadline =
            request.timeout.map_or(self.inner.deadline, |s| Duration::from_secs_f64(s) + Duration::from_secs(5));
        let mut frame = serde_json::to_value(&request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        frame["role"] = json!("rpc");
        let reply = self.roundtrip(request.u, frame, deadline).await?;
        serde_json::from_value(reply).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Runs a DAG of commands; returns `r` (the sink results by name).
    pub async fn request(&self, cmds: Vec<RpcCommand>) -> Result<Value, ClientError> {
        self.request_with_timeout(cmds, None).await
    }

    /// Like [`Client::request`], with a whole-request timeout.
    pub async fn request_with_timeout(
        &self,
        cmds: Vec<RpcCommand>,
        timeout: Option<Duration>,
    ) -> Result<Value, ClientError> {
        let request = RpcRequest {
            u: String::new(),
            cmds,
            return_intermediate_results: false,
            intermediate_result_callback_topic: None,
            include_execution_summary: false,
            debug_mode: false,
            timeout: timeout.map(|t| t.as_secs_f64()),
        };
        let response = self.send_request(request).await?;
        match (response.error, response.r) {
            (Some(error), _) => Err(ClientError::Rpc(error)),
            (None, Some(r)) => Ok(r),
            (None, None) => Err(ClientError::Protocol("response without r or error".into())),
        }
    }

    /// Calls one function with positional arguments.
    pub async fn call(&self, fun: &str, args: Vec<Value>) -> Result<Value, ClientError> {
        self.call_with(fun, args, CallOptions::default()).await
    }

    /// Calls one function with options (resources, identity, version, timeout, kwargs).
    pub async fn call_with(&self, fun: &str, args: Vec<Value>, options: CallOptions) -> Result<Value, ClientError> {
        let mut command = RpcCommand::new(fun, fun, args);
        command.locs = options.locs;
        command.function_id = options.function_id;
        command.version_constraint = options.version_constraint;
        command.kwargs = options.kwargs;
        command.cache = options.cache_ttl.map(|ttl| mpreg_actors::protocol::CommandCache { ttl });
        command.target_cluster = options.target_cluster;
        let mut r = self.request_with_timeout(vec![command], options.timeout).await?;
        r.get_mut(fun).map(Value::take).ok_or_else(|| ClientError::Protocol(format!("result has no `{fun}`")))
    }

    async fn pubsub(&self, role: &str, body: Value) -> Result<(), ClientError> {
        let u = self.next_u();
        let mut frame = body;
        frame["role"] = json!(role);
        frame["u"] = json!(u);
        let reply = self.roundtrip(u, frame, self.inner.deadline).await?;
        let ack: PubSubAck = serde_json::from_value(reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match ack.error {
            None if ack.success => Ok(()),
            error => Err(ClientError::Protocol(error.unwrap_or_else(|| "pub/sub operation failed".into()))),
        }
    }

    /// Subscribes to topic patterns (`*` one word, `#` any); with `backlog_seconds`, also
    /// receives the matching messages retained from that many seconds back.
    pub async fn subscribe(
        &self,
        patterns: &[&str],
        backlog_seconds: Option<f64>,
    ) -> Result<SubscriptionStream, ClientError> {
        let id = format!("sub-{}", self.next_u());
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.subscribers.lock().map_err(|_| ClientError::Disconnected)?.insert(id.clone(), tx);
        let subscription = Subscription {
            subscription_id: id.clone(),
            patterns: patterns
                .iter()
                .map(|p| TopicPatternSpec { pattern: (*p).to_owned(), exact_match: false })
                .collect(),
            subscriber: self.inner.prefix.clone(),
            created_at: Some(unix_now()),
            get_backlog: backlog_seconds.is_some(),
            backlog_seconds: backlog_seconds.unwrap_or(0.0),
        };
        let body = json!({ "subscription": subscription });
        if let Err(e) = self.pubsub("pubsub-subscribe", body).await {
            self.inner.subscribers.lock().map(|mut s| s.remove(&id)).ok();
            return Err(e);
        }
        Ok(SubscriptionStream { id, messages: rx })
    }

    /// Ends a subscription.
    pub async fn unsubscribe(&self, subscription: &SubscriptionStream) -> Result<(), ClientError> {
        self.inner.subscribers.lock().map(|mut s| s.remove(&subscription.id)).ok();
        self.pubsub("pubsub-unsubscribe", json!({ "subscription_id": subscription.id })).await
    }

    /// The node's view of the cluster: `{topology: {nodes, links, ...}, catalog: {nodes}}`.
    pub async fn cluster_status(&self) -> Result<Value, ClientError> {
        self.ask_cluster_status(false).await
    }

    /// The brief view: `{topology: {nodes: [{node, state}], suspicions, ...}}`, no links,
    /// no catalog — a few bytes a node, for polling every node of a large cluster.
    pub async fn cluster_status_brief(&self) -> Result<Value, ClientError> {
        self.ask_cluster_status(true).await
    }

    async fn ask_cluster_status(&self, brief: bool) -> Result<Value, ClientError> {
        let u = self.next_u();
        let request = json!({"role": "cluster-status", "u": u, "brief": brief});
        let reply = self.roundtrip(u.clone(), request, self.inner.deadline).await?;
        match reply.get("error").and_then(Value::as_str) {
            Some(error) => Err(ClientError::Protocol(error.to_owned())),
            None => Ok(reply),
        }
    }

    /// Publishes `payload` on `topic`.
    pub async fn publish(&self, topic: &str, payload: Value) -> Result<(), ClientError> {
        let message = PubSubMessage {
            topic: topic.to_owned(),
            payload,
            timestamp: unix_now(),
            message_id: format!("msg-{}", self.next_u()),
            publisher: self.inner.prefix.clone(),
            headers: Map::new(),
            routing_path: None,
            current_hop: None,
        };
        self.pubsub("pubsub-publish", json!({ "message": message })).await
    }
}

impl Inner {
    fn dispatch(&self, bytes: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(bytes) else { return };
        match value.get("role").and_then(Value::as_str) {
            Some("pubsub-notification") => {
                let Ok(note) = serde_json::from_value::<PubSubNotification>(value) else { return };
                if let Ok(subs) = self.subscribers.lock() {
                    if let Some(tx) = subs.get(&note.subscription_id) {
                        let _ = tx.send(note.message);
                    }
                }
            }
            Some("queue-message") => {
                let sid = value.get("subscription_id").and_then(Value::as_str).unwrap_or_default().to_owned();
                let Some(message) = value.get("message").cloned() else { return };
                let Ok(message) = serde_json::from_value::<QueueMessage>(message) else { return };
                if let Ok(subs) = self.queue_subscribers.lock() {
                    if let Some(tx) = subs.get(&sid) {
                        let _ = tx.send(message);
                    }
                }
            }
            Some("pubsub-ack") => {
                let key = value.get("operation_id").and_then(Value::as_str).map(str::to_owned);
                self.wake(key, value);
            }
            _ => {
                let key = value.get("u").and_then(Value::as_str).map(str::to_owned);
                self.wake(key, value);
            }
        }
    }

    fn wake(&self, key: Option<String>, value: Value) {
        let Some(key) = key else { return };
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&key));
        if let Some(tx) = waiter {
            let _ = tx.send(value);
        }
    }
}
