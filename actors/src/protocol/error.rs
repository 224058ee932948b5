//! The error object of an RPC response and its codes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Error codes, grouped by what the caller should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1001: no function, resources, version or cluster matches — fix the request or wait
    /// for a provider.
    NotFound,
    /// 1002: the request itself is wrong (bad JSON, missing field, cycle) — fix it.
    InvalidRequest,
    /// 1003: a function ran and failed — look at `details`.
    ExecutionFailed,
    /// 1004: timeout or unknown role.
    Timeout,
    /// 1005: no route to the node that has the function — retry later.
    Unreachable,
    /// 1006: too many requests in flight — back off and retry.
    Overloaded,
}

impl ErrorCode {
    /// Every code, in numeric order (for metrics).
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::NotFound,
        ErrorCode::InvalidRequest,
        ErrorCode::ExecutionFailed,
        ErrorCode::Timeout,
        ErrorCode::Unreachable,
        ErrorCode::Overloaded,
    ];

    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotFound => 1001,
            ErrorCode::InvalidRequest => 1002,
            ErrorCode::ExecutionFailed => 1003,
            ErrorCode::Timeout => 1004,
            ErrorCode::Unreachable => 1005,
            ErrorCode::Overloaded => 1006,
        }
    }

    /// The code for a wire number, if it is one of ours.
    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == code)
    }
}

/// `{code, message, details}` as sent in `RpcResponse::error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// Numeric code (1001..1006).
    pub code: u16,
    /// Short fixed text per kind of failure.
    pub message: String,
    /// The specifics: which function, which command, which field.
    pub details: Option<Value>,
}

impl RpcError {
    fn with(code: ErrorCode, message: impl Into<String>, details: impl Into<String>) -> Self {
        RpcError { code: code.as_u16(), message: message.into(), details: Some(Value::String(details.into())) }
    }

    /// 1001 for the function `fun` (the reference names the function, not the command).
    pub fn not_found(fun: &str) -> Self {
        Self::with(ErrorCode::NotFound, "Command not found", format!("Command not found: {fun}"))
    }

    /// 1001 for what another cluster may not use: `name` is not in `cluster`'s federation
    /// export list `list` (`functions`, `queues` or `cache`).
    pub fn not_exported(cluster: &str, list: &str, name: &str) -> Self {
        let (message, what) = match list {
            "queues" => ("Queue not exported", "queue "),
            "cache" => ("Cache namespace not exported", "cache namespace "),
            _ => ("Function not exported", ""),
        };
        Self::with(
            ErrorCode::NotFound,
            message,
            format!("cluster {cluster} does not export {what}{name} to other clusters (federation exports.{list})"),
        )
    }

    /// 1001 for a queue that does not exist.
    pub fn queue_not_found(queue: &str) -> Self {
        Self::with(ErrorCode::NotFound, "Queue not found", format!("unknown queue: {queue}"))
    }

    /// 1006 for a queue (or a node's queue table) that is full.
    pub fn queue_full(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::Overloaded, "Queue full", details)
    }

    /// 1003 for a queue write that could not be made durable: the operation is NOT
    /// acknowledged (details `not durable: <cause>`).
    pub fn not_durable(cause: impl std::fmt::Display) -> Self {
        Self::with(ErrorCode::ExecutionFailed, "Queue write failed", format!("not durable: {cause}"))
    }

    /// 1002 with a description of what is wrong.
    pub fn invalid(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::InvalidRequest, "Invalid request", details)
    }

    /// 1003: `Function execution failed: command=.. fun=.. error=.. args_types=[..]`.
    pub fn execution_failed(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::ExecutionFailed, "RPC execution failed", details)
    }

    /// 1004 for a whole request that ran past its timeout.
    pub fn timeout(seconds: f64) -> Self {
        Self::with(
            ErrorCode::Timeout,
            format!("RPC execution timed out after {seconds:.1} seconds"),
            "The RPC workflow took too long to complete",
        )
    }

    /// 1004 for one call that ran past the request's deadline (a worker that did not
    /// answer in time), with what was waited for.
    pub fn deadline_passed(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::Timeout, "RPC execution timed out", details)
    }

    /// 1004 for a frame whose role we do not serve (`None`: no role at all).
    pub fn unknown_role(role: Option<&str>) -> Self {
        let shown = role.map_or_else(|| "null".to_owned(), str::to_owned);
        Self::with(ErrorCode::Timeout, "Unknown role", format!("Unknown role: {shown}"))
    }

    /// 1004 for a peer frame (`fabric-gossip`, `fabric-message`, a `server` frame other
    /// than STATUS) on a connection that has not completed the peer handshake.
    pub fn peer_handshake_required(role: &str) -> Self {
        Self::with(
            ErrorCode::Timeout,
            "Unknown role",
            format!(
                "Unknown role on this connection: {role} frames need a completed peer handshake \
                 (server STATUS first); nothing was changed"
            ),
        )
    }

    /// 1005 with the reason the target could not be reached.
    pub fn unreachable(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::Unreachable, "Target unreachable", details)
    }

    /// 1006 when a connection has too many requests in flight.
    pub fn overloaded(limit: usize) -> Self {
        Self::with(
            ErrorCode::Overloaded,
            "Server overloaded",
            format!("too many requests in flight on this connection (limit {limit}); retry later"),
        )
    }

    /// 1006: the node's `max_in_flight` is reached (all connections and peers together).
    pub fn node_overloaded(limit: usize) -> Self {
        Self::with(
            ErrorCode::Overloaded,
            "Server overloaded",
            format!("too many requests in flight on this node (max_in_flight {limit}); retry later"),
        )
    }

    /// 1006: another node refused a call this request routed to it, at one of its
    /// in-flight bounds; `details` name the command, the node and the bound.
    pub fn peer_overloaded(details: impl Into<String>) -> Self {
        Self::with(ErrorCode::Overloaded, "Server overloaded", details)
    }

    /// The code as an enum, if known.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }

    /// `details` as text, for logs and CLI output.
    pub fn details_text(&self) -> String {
        match &self.details {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The details restate the message for most errors; show the specific one.
        match self.details_text() {
            details if details.is_empty() => write!(f, "{} {}", self.code, self.message),
            details => write!(f, "{} {}", self.code, details),
        }
    }
}

impl std::error::Error for RpcError {}
