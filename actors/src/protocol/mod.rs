//! Wire types: every frame a client (or, later, a peer) sends or receives.
//!
//! One JSON object per websocket frame, text or binary. Inbound frames are dispatched on
//! `role`; the RPC response has no role (the reference client matches it by `u`). Shapes
//! follow the Python reference client exactly where a client can see them
//! (`rpc`, `pubsub-*`), so an unmodified MPREG client works against this server.
//!
//! Decoding is two-step on purpose: the frame is first read as a loose envelope (only
//! `role` and `u`, private to the codec), so a request that fails validation can still be
//! answered with the right `u`; then the role's own type is decoded from the same bytes.

mod codec;
mod error;

pub use codec::{decode_inbound, encode, is_peer_role, sniff_u, ClusterStatusRequest, Inbound, InboundError};
pub(crate) use codec::{sniff_role, sniff_str, top_level_raw};
pub use error::{ErrorCode, RpcError};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Correlation id chosen by the client and echoed back verbatim.
pub type RequestId = String;

/// Which websocket frame type carried a message; replies use the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A UTF-8 text frame.
    Text,
    /// A binary frame (the reference client's choice).
    Binary,
}

/// One command of an RPC request.
///
/// Only `name` and `fun` are required. `routing_topic` is accepted and ignored, as in the
/// reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcCommand {
    /// The name other commands use to reference this command's result.
    pub name: String,
    /// The registered function to call.
    pub fun: String,
    /// Positional arguments; strings naming other commands are references.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments; values naming other commands are references too.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Resources the executing function must have (subset match).
    #[serde(default)]
    pub locs: Vec<String>,
    /// Only match a function registered with this id.
    #[serde(default)]
    pub function_id: Option<String>,
    /// Only match a version satisfying this constraint (`>=1.0,<2`, `==1.0.0`, `1.5`).
    #[serde(default)]
    pub version_constraint: Option<String>,
    /// Only match functions of this cluster.
    #[serde(default)]
    pub target_cluster: Option<String>,
    /// Accepted for compatibility; unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_topic: Option<String>,
    /// Serve the result from the node's cache, and cache it (ours): `{"ttl": seconds}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CommandCache>,
}

/// `cache` of an [`RpcCommand`]: how long its result may be served from the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandCache {
    /// Seconds to live.
    pub ttl: f64,
}

impl RpcCommand {
    /// A command with only the required fields set.
    pub fn new(name: impl Into<String>, fun: impl Into<String>, args: Vec<Value>) -> Self {
        RpcCommand {
            name: name.into(),
            fun: fun.into(),
            args,
            kwargs: Map::new(),
            locs: Vec::new(),
            function_id: None,
            version_constraint: None,
            target_cluster: None,
            routing_topic: None,
            cache: None,
        }
    }
}

/// `role: "rpc"` — a batch of commands forming a dependency graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcRequest {
    /// Correlation id.
    pub u: RequestId,
    /// The commands; order matters only as a tie-break among ready commands.
    pub cmds: Vec<RpcCommand>,
    /// Add one entry per completed level to `intermediate_results`.
    #[serde(default)]
    pub return_intermediate_results: bool,
    /// Also publish each intermediate entry on this pub/sub topic as its level completes.
    #[serde(default)]
    pub intermediate_result_callback_topic: Option<String>,
    /// Add timing figures to the response.
    #[serde(default)]
    pub include_execution_summary: bool,
    /// Accepted for compatibility; adds nothing visible.
    #[serde(default)]
    pub debug_mode: bool,
    /// Ours: whole-request timeout in seconds, overriding the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

/// The RPC response. Field order is the reference's: `r, error, u, intermediate_results,
/// execution_summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcResponse {
    /// Results of the sink commands, keyed by command name; `null` on error.
    pub r: Option<Value>,
    /// Set when the request failed as a whole.
    pub error: Option<RpcError>,
    /// The request's correlation id (`null` when the request had none we could read).
    pub u: Option<RequestId>,
    /// One entry per completed level, when requested.
    #[serde(default)]
    pub intermediate_results: Vec<Value>,
    /// Timing figures, when requested.
    #[serde(default)]
    pub execution_summary: Option<Value>,
}

impl RpcResponse {
    /// A successful response.
    pub fn success(u: RequestId, r: Value) -> Self {
        RpcResponse { r: Some(r), error: None, u: Some(u), intermediate_results: Vec::new(), execution_summary: None }
    }

    /// A failed response.
    pub fn failure(u: Option<RequestId>, error: RpcError) -> Self {
        RpcResponse { r: None, error: Some(error), u, intermediate_results: Vec::new(), execution_summary: None }
    }
}

/// A topic pattern of a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicPatternSpec {
    /// Dot-separated words; `*` matches one word, `#` zero or more.
    pub pattern: String,
    /// When true the pattern is compared literally, wildcards included.
    #[serde(default)]
    pub exact_match: bool,
}

/// The `subscription` object of `pubsub-subscribe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Client-chosen id, echoed in every notification.
    pub subscription_id: String,
    /// Patterns; a message matching any of them is delivered once.
    pub patterns: Vec<TopicPatternSpec>,
    /// Free-form subscriber label.
    #[serde(default)]
    pub subscriber: String,
    /// Client timestamp (Unix seconds); informational.
    #[serde(default)]
    pub created_at: Option<f64>,
    /// Replay retained messages of the last `backlog_seconds` after the ack.
    #[serde(default)]
    pub get_backlog: bool,
    /// Backlog window in seconds.
    #[serde(default)]
    pub backlog_seconds: f64,
}

/// A pub/sub message as published and as delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PubSubMessage {
    /// Dot-separated topic (no wildcards).
    pub topic: String,
    /// Any JSON value.
    pub payload: Value,
    /// Publisher timestamp (Unix seconds).
    #[serde(default)]
    pub timestamp: f64,
    /// Unique id; used for de-duplication across nodes.
    pub message_id: String,
    /// Free-form publisher label.
    #[serde(default)]
    pub publisher: String,
    /// Free-form headers.
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// Nodes the message passed through (set by forwarding nodes).
    #[serde(default)]
    pub routing_path: Option<Vec<String>>,
    /// Hop count (set by forwarding nodes).
    #[serde(default)]
    pub current_hop: Option<u32>,
}

/// `role: "pubsub-subscribe"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// Correlation id; the ack's `operation_id`.
    pub u: RequestId,
    /// What to subscribe to.
    pub subscription: Subscription,
}

/// `role: "pubsub-publish"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// Correlation id; the ack's `operation_id`.
    pub u: RequestId,
    /// The message.
    pub message: PubSubMessage,
}

/// `role: "pubsub-unsubscribe"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnsubscribeRequest {
    /// Correlation id; the ack's `operation_id`.
    pub u: RequestId,
    /// The subscription to remove.
    pub subscription_id: String,
}

/// `role: "pubsub-ack"` — the answer to every pub/sub request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PubSubAck {
    /// Always `pubsub-ack`.
    pub role: String,
    /// The `u` of the request being acknowledged.
    pub operation_id: String,
    /// Whether the operation succeeded.
    pub success: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// `ack_<operation_id>`.
    pub u: String,
}

impl PubSubAck {
    /// An ack for the request `operation_id`.
    pub fn new(operation_id: &str, error: Option<String>) -> Self {
        PubSubAck {
            role: "pubsub-ack".to_owned(),
            operation_id: operation_id.to_owned(),
            success: error.is_none(),
            error,
            u: format!("ack_{operation_id}"),
        }
    }
}

/// `role: "pubsub-notification"` — a message delivered to one subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PubSubNotification {
    /// Always `pubsub-notification`.
    pub role: String,
    /// The delivered message.
    pub message: PubSubMessage,
    /// The subscription it matched.
    pub subscription_id: String,
    /// `notification_<message_id>_<subscription_id>`.
    pub u: String,
}

impl PubSubNotification {
    /// The notification of `message` for `subscription_id`.
    pub fn new(message: PubSubMessage, subscription_id: &str) -> Self {
        PubSubNotification {
            role: "pubsub-notification".to_owned(),
            u: format!("notification_{}_{}", message.message_id, subscription_id),
            subscription_id: subscription_id.to_owned(),
            message,
        }
    }
}

/// `role: "queue"` — one queue operation; answered with a [`QueueReply`].
///
/// `{"role": "queue", "u", "op", "queue", ...}`: `op` is one of `create`, `delete`, `send`,
/// `receive`, `ack`, `nack`, `subscribe`, `unsubscribe`, `stats`, `list`, `dlq`,
/// `redrive`, `bind`, `unbind`; the op's own fields (`payload`, `ids`, `max`, ...) stay in
/// `fields` and are read by the queue actor, which names a bad one in a 1002.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueRequest {
    /// Correlation id.
    pub u: RequestId,
    /// The operation.
    pub op: String,
    /// The queue (absent for `list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Every other field of the frame (`role` included).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// `role: "queue-reply"` — the answer to a [`QueueRequest`]: `result` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueReply {
    /// Always `queue-reply`.
    pub role: String,
    /// The request's `u`.
    pub u: Option<RequestId>,
    /// The op's result (`null` on error).
    pub result: Option<Value>,
    /// Why it failed.
    pub error: Option<RpcError>,
}

impl QueueReply {
    /// The reply to `u`.
    pub fn new(u: Option<RequestId>, outcome: Result<Value, RpcError>) -> Self {
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        QueueReply { role: "queue-reply".to_owned(), u, result, error }
    }
}

/// `role: "cache"` — one cache operation; answered with a [`CacheReply`].
///
/// `{"role": "cache", "u", "op", "namespace", "key", "value", "ttl", "levels", "version",
/// "by", "prefix"}`: `op` is one of `get`, `put`, `delete`, `invalidate`, `incr`, `cas`,
/// `stats`; which fields each op reads is in the README ("Cache"). `levels` lists the levels
/// an op may touch (`l1`, `l2`, `l3`, the default; and `l4` for a `get`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRequest {
    /// Correlation id.
    pub u: RequestId,
    /// The operation.
    pub op: String,
    /// The key's namespace (every op but `stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The key within the namespace (`get`, `put`, `delete`, `incr`, `cas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The JSON value (`put`, `cas`); `null` is not a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Time to live in seconds (`put`, `cas`, `incr`); default `cache_default_ttl_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<f64>,
    /// Levels the op may touch: any of `l1`, `l2`, `l3` (the default), `l4` (a `get`
    /// only: other clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<Vec<String>>,
    /// `cas`: the version the entry must have (0: the key must be absent). Between nodes:
    /// the version a replica stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `incr`: the amount (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<i64>,
    /// `invalidate`: only keys of the namespace starting with it (absent: the whole namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

impl CacheRequest {
    /// A request for `op` with every optional field absent.
    pub fn new(u: impl Into<RequestId>, op: impl Into<String>) -> Self {
        CacheRequest {
            u: u.into(),
            op: op.into(),
            namespace: None,
            key: None,
            value: None,
            ttl: None,
            levels: None,
            version: None,
            by: None,
            prefix: None,
        }
    }
}

/// `role: "cache-reply"` — the answer to a [`CacheRequest`]: `result` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheReply {
    /// Always `cache-reply`.
    pub role: String,
    /// The request's `u`.
    pub u: Option<RequestId>,
    /// The op's result (`null` on error).
    pub result: Option<Value>,
    /// Why it failed.
    pub error: Option<RpcError>,
}

impl CacheReply {
    /// The reply to `u`.
    pub fn new(u: Option<RequestId>, outcome: Result<Value, RpcError>) -> Self {
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        CacheReply { role: "cache-reply".to_owned(), u, result, error }
    }
}
