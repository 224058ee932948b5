//! The worker protocol: the frames a worker and a node exchange on one websocket.
//!
//! ```text
//! worker                                   node
//!   worker-register {u, name, functions}  ──►  registry + catalog
//!                                         ◄──  worker-registered {u, worker_id, heartbeat_s}
//!                                         ◄──  worker-call {id, fun, ..., args, kwargs, timeout_ms}
//!   worker-result {id, result | error}    ──►
//!                                         ◄──  worker-cancel {id}   (the caller stopped waiting)
//!   worker-heartbeat {}                   ──►  (every heartbeat_s; any frame counts)
//!   worker-goodbye {}                     ──►  no new calls; in-flight ones may still answer
//!
//! lane (another websocket of the same worker, optional)
//!   worker-lane {u, worker_id, lane_key}  ──►  joins the worker
//!                                         ◄──  worker-registered {u, worker_id, heartbeat_s}
//!                                         ◄──  worker-call / worker-cancel, as above
//!   worker-result                         ──►  as above
//! ```
//!
//! Lanes: `worker-registered` offers `lanes` extra connections (the node's listener
//! threads but one) and a `lane_key`. The node serves each websocket on one of its
//! threads; a call goes out on the worker's websocket served by the caller's thread when
//! there is one, so the call and its answer need no hand-off between the node's threads.
//!
//! Every frame is one JSON object with a `role`. Unknown fields are ignored, so a worker
//! written against a newer node keeps working. Numbers in `args` travel as JSON numbers.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::function::{FunctionError, FunctionIdentity};
use crate::protocol::RpcError;
use crate::version::Version;

/// A frame a worker sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "role")]
pub enum WorkerInbound {
    /// `worker-register`: become a worker serving these functions (once per connection).
    #[serde(rename = "worker-register")]
    Register(RegisterFrame),
    /// `worker-result`: the answer to one `worker-call`.
    #[serde(rename = "worker-result")]
    Result(ResultFrame),
    /// `worker-heartbeat`: still alive (any frame counts as well).
    #[serde(rename = "worker-heartbeat")]
    Heartbeat {},
    /// `worker-goodbye`: leaving; its functions leave the catalog now, no new calls come,
    /// results of calls in flight are still accepted until the websocket closes.
    #[serde(rename = "worker-goodbye")]
    Goodbye {},
    /// `worker-lane`: this websocket is one more lane of a registered worker.
    #[serde(rename = "worker-lane")]
    Lane(LaneFrame),
}

impl WorkerInbound {
    /// Decodes a worker frame's bytes. A `worker-result` (the hot path) is parsed straight
    /// into its type; other frames go through the tagged enum, which buffers the frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        if crate::protocol::sniff_role(bytes) == Some(b"worker-result") {
            return serde_json::from_slice(bytes).map(WorkerInbound::Result);
        }
        serde_json::from_slice(bytes)
    }
}

/// `worker-register`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegisterFrame {
    /// Correlation id, echoed in `worker-registered`.
    pub u: String,
    /// The worker's name, shown in errors (`worker=NAME`), `/catalog` and `/metrics`.
    pub name: String,
    /// The node's worker token, required when the node has credentials.
    #[serde(default)]
    pub token: Option<String>,
    /// Calls this worker runs at once (all its functions together); the node's
    /// `worker_max_concurrency` when absent, and at most that.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// What it serves.
    pub functions: Vec<WorkerFunction>,
}

/// One function a worker serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkerFunction {
    /// The name commands call (`fun`).
    pub name: String,
    /// Stable id; the name when absent.
    #[serde(default)]
    pub function_id: Option<String>,
    /// Version (`1.2.0`); 1.0.0 when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// Resources it has; a command's `locs` must be a subset.
    #[serde(default)]
    pub resources: BTreeSet<String>,
}

/// `worker-lane`: joins the registered worker `worker_id` as one more websocket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LaneFrame {
    /// Correlation id, echoed in `worker-registered`.
    pub u: String,
    /// The id `worker-registered` gave the worker.
    pub worker_id: String,
    /// The key `worker-registered` gave the worker: only its holder adds lanes.
    pub lane_key: String,
}

/// `worker-result`: exactly one of `result` (any JSON, `null` included) and `error`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultFrame {
    /// The call's id.
    pub id: String,
    /// The function's return value.
    #[serde(default)]
    pub result: Value,
    /// The function's failure: `{kind, message}` (e.g. `ValueError`, `bad input`).
    #[serde(default)]
    pub error: Option<FunctionError>,
}

/// `worker-registered`: the answer to `worker-register`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisteredFrame {
    /// Always `worker-registered`.
    pub role: &'static str,
    /// The register frame's `u`.
    pub u: String,
    /// This worker's id on this node (absent when refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Send a frame at least this often (seconds); silent past `worker_timeout_s`, the
    /// worker is disconnected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_s: Option<f64>,
    /// The concurrency the node grants (after capping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// Extra websockets (`worker-lane`) the worker may open; absent when none would help.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lanes: Option<usize>,
    /// What a `worker-lane` must present (with `lanes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane_key: Option<String>,
    /// Why the registration was refused (1002 invalid, 1006 too many workers); nothing
    /// was registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl RegisteredFrame {
    /// A refused registration.
    pub fn refused(u: String, error: RpcError) -> Self {
        RegisteredFrame {
            role: "worker-registered",
            u,
            worker_id: None,
            heartbeat_s: None,
            max_concurrency: None,
            lanes: None,
            lane_key: None,
            error: Some(error),
        }
    }
}

/// `worker-call`: run `fun` (exactly this identity) with these arguments. Encoded from
/// borrowed parts: the call's arguments are not copied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallFrame<'a> {
    /// Always `worker-call`.
    pub role: &'static str,
    /// Unique on this connection; the `worker-result` carries it back.
    pub id: &'a str,
    /// Function name.
    pub fun: &'a str,
    /// Function id.
    pub function_id: &'a str,
    /// Version.
    pub version: Version,
    /// Positional arguments.
    pub args: &'a [Value],
    /// Keyword arguments.
    pub kwargs: &'a Map<String, Value>,
    /// Milliseconds until the caller stops waiting: the worker may stop then.
    pub timeout_ms: u64,
}

impl<'a> CallFrame<'a> {
    /// The call frame for `identity`.
    pub fn new(
        id: &'a str,
        identity: &'a FunctionIdentity,
        args: &'a [Value],
        kwargs: &'a Map<String, Value>,
        timeout_ms: u64,
    ) -> Self {
        CallFrame {
            role: "worker-call",
            id,
            fun: &identity.name,
            function_id: &identity.function_id,
            version: identity.version,
            args,
            kwargs,
            timeout_ms,
        }
    }
}

/// `worker-cancel`: the caller stopped waiting for call `id` (timeout, or another command
/// of the request failed); a late `worker-result` for it is ignored.
pub fn cancel_frame(id: &str) -> Value {
    serde_json::json!({"role": "worker-cancel", "id": id})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_decode_from_their_documented_shapes() {
        let register = json!({"role": "worker-register", "u": "1", "name": "ml", "max_concurrency": 2,
            "functions": [{"name": "score", "function_id": "ml.score", "version": "1.2.0", "resources": ["gpu"]},
                          {"name": "plain"}], "future_field": true});
        let WorkerInbound::Register(frame) = WorkerInbound::decode(register.to_string().as_bytes()).unwrap() else {
            panic!("not a register frame")
        };
        assert_eq!(frame.functions.len(), 2);
        assert_eq!(frame.functions[1].function_id, None);
        let ok = json!({"role": "worker-result", "id": "7", "result": null});
        let WorkerInbound::Result(result) = WorkerInbound::decode(ok.to_string().as_bytes()).unwrap() else {
            panic!("not a result")
        };
        assert_eq!((result.result, result.error), (Value::Null, None));
        let failed = json!({"role": "worker-result", "id": "7", "error": {"kind": "ValueError", "message": "no"}});
        let WorkerInbound::Result(result) = WorkerInbound::decode(failed.to_string().as_bytes()).unwrap() else {
            panic!("not a result")
        };
        assert_eq!(result.error, Some(FunctionError::value_error("no")));
        assert_eq!(WorkerInbound::decode(br#"{"role":"worker-heartbeat"}"#).unwrap(), WorkerInbound::Heartbeat {});
        assert_eq!(WorkerInbound::decode(br#"{"role":"worker-goodbye"}"#).unwrap(), WorkerInbound::Goodbye {});
        let lane = br#"{"role":"worker-lane","u":"2","worker_id":"7","lane_key":"k"}"#;
        let WorkerInbound::Lane(lane) = WorkerInbound::decode(lane).unwrap() else { panic!("not a lane") };
        assert_eq!((lane.worker_id.as_str(), lane.lane_key.as_str()), ("7", "k"));
        for garbage in [
            &br#"{"role":"worker-result"}"#[..],
            b"[1,2]",
            br#"{"role":"worker-nonsense"}"#,
            br#"{"role":"worker-lane","u":"2","worker_id":"7"}"#,
            b"\xff",
        ] {
            assert!(WorkerInbound::decode(garbage).is_err(), "{}", String::from_utf8_lossy(garbage));
        }
    }
}
