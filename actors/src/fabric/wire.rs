//! Inter-node frames: `server` (STATUS, GOODBYE), `fabric-gossip`, `fabric-message`.
//!
//! These are ours (the reference's shapes are a guide, not a contract). Every frame is one
//! JSON object in a binary websocket frame, dispatched on `role` like client frames, with
//! `kind` selecting the variant. All three travel on the same websocket as client traffic,
//! so a node needs one port.
//!
//! # The handshake
//!
//! A connection becomes a peer link only through `server`/`status`; until the link is
//! admitted, `fabric-gossip` and `fabric-message` frames are refused (1004 on a connection
//! that never sent STATUS, dropped on a link whose handshake is still running).
//!
//! Open mode (no credentials on either side): the dialer sends STATUS, the acceptor
//! admits it and answers with its own STATUS, the dialer admits that. Neither carries
//! `auth`.
//!
//! With credentials (see [`super::trust`]), three frames:
//! ```text
//! dialer   ── status {info, auth: {nonce: Nd, certificate: Cd, catalog}} ──────────► acceptor
//!          (acceptor checks Cd against its pinned authority, expiry, name and cluster)
//! dialer   ◄── status {info, auth: {nonce: Na, certificate: Ca, proof: sig_a(T_acceptor), catalog}}
//!          (dialer checks Ca, then sig_a over T_acceptor; admits the acceptor)
//! dialer   ── proof {signature: sig_d(T_dialer)} ──────────────────────────────────► acceptor
//!          (acceptor checks sig_d with Cd's key; admits the dialer)
//! ```
//! `T_side` is [`super::trust::link_transcript`]: side, cluster, both names, both
//! instances and both nonces. Frames the dialer sends after `proof` reach the acceptor's
//! fabric after it (one ordered mailbox), so nothing sent on an admitted link is lost to
//! the handshake. A node with credentials refuses a STATUS without `auth`; a node without
//! refuses one with `auth`: mixed links never form.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::swim::SwimMessage;
use super::trust::{Certificate, StatementProof};
use crate::function::{FunctionError, FunctionIdentity};
use crate::protocol::PubSubMessage;
use crate::version::Version;

/// A node's configured name (default `host:port`).
pub type NodeId = String;
/// A random id chosen per process start; a restarted node has a new one.
pub type InstanceId = String;
/// A cluster's id.
pub type ClusterId = String;

/// Who a node is, as told in STATUS and in membership gossip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub node: NodeId,
    /// This process's instance.
    pub instance_id: InstanceId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// The URL other nodes dial (the port really bound, for port 0).
    pub url: String,
}

/// `role: "server"` — link lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServerFrame {
    /// The handshake: the dialer sends it first, the acceptor answers with its own.
    Status {
        /// Who is speaking.
        info: NodeInfo,
        /// Its function catalog entries (so the peer can route at once).
        functions: Vec<FunctionIdentity>,
        /// Version of that entry set.
        catalog_version: u64,
        /// The queues it owns (absent when none, so older peers' frames still decode).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        queues: Vec<String>,
        /// Parameters and documentation of its functions (absent when none).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        about: Vec<FunctionAbout>,
        /// The credentialed handshake; absent in open mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<Box<StatusAuth>>,
    },
    /// The dialer's proof of possession, the third frame of a credentialed handshake.
    Proof {
        /// The dialer's signature (hex) over the dialer transcript
        /// ([`super::trust::link_transcript`] with side `dialer`).
        signature: String,
    },
    /// A refusal (other cluster, departed instance, a node holding its most inbound
    /// links); the sender closes the link after it.
    Refused {
        /// Why.
        reason: String,
        /// A node at `max_inbound_links`: URLs of other members the dialer may dial instead
        /// (absent otherwise).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        try_instead: Vec<String>,
    },
    /// Clean shutdown: remove me now, do not redial this instance for a grace period.
    Goodbye {
        /// The departing node.
        node: NodeId,
        /// Its instance.
        instance_id: InstanceId,
        /// With credentials: the node's signature over `{"statement":"goodbye",...}`
        /// ([`goodbye_text`]), so the GOODBYE can be relayed as `departed` and checked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<StatementProof>,
    },
}

/// The credentialed part of a STATUS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAuth {
    /// 32 fresh random bytes (hex) the sender chose for this link; the other side signs it.
    pub nonce: String,
    /// The sender's certificate; it must chain to the receiver's pinned authority and name
    /// the `info.node` and `info.cluster_id` of this STATUS.
    pub certificate: Certificate,
    /// Acceptor only: its signature (hex) over the acceptor transcript, which binds the
    /// dialer's nonce (from the dialer's STATUS) and its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// The sender's own catalog entries, signed ([`CatalogDelta::proof`]); used instead of
    /// `functions`/`catalog_version`, which stay for open-mode peers.
    pub catalog: CatalogDelta,
}

/// The exact text a node signs to say GOODBYE.
pub fn goodbye_text(cluster_id: &str, node: &str, instance_id: &str) -> String {
    serde_json::json!({"statement": "goodbye", "cluster_id": cluster_id, "node": node, "instance_id": instance_id})
        .to_string()
}

/// One node as seen in membership gossip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberDigest {
    /// Identity and URL.
    pub info: NodeInfo,
    /// The node's own heartbeat counter; a higher value means it was alive more recently.
    pub heartbeat: u64,
    /// The version of its function entries.
    pub catalog_version: u64,
    /// Nodes it has a live link to (for multi-hop next-hop choice).
    pub neighbours: Vec<NodeId>,
}

/// The function entries of one node at one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogDelta {
    /// The owning node.
    pub node: NodeId,
    /// Its instance (entries of an older instance are dropped).
    pub instance_id: InstanceId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// Monotonic per instance; a receiver keeps only the highest.
    pub version: u64,
    /// Owner's clock when advertised (informational; expiry uses the receiver's clock).
    pub advertised_at: f64,
    /// Seconds the entries stay valid without a refresh.
    pub ttl_s: f64,
    /// The complete entry set (a full replacement, so applying twice is harmless).
    pub functions: Vec<FunctionIdentity>,
    /// The queues the node owns (names; part of the signed text). Absent when none, so
    /// older frames still decode and their signatures still verify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    /// Declared parameters and documentation of some of `functions` (signed with the
    /// rest; absent when none, so older frames still decode and verify).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub about: Vec<FunctionAbout>,
    /// Clusters the node reaches over its federation bridges: the other nodes of its
    /// cluster send `target_cluster` commands for them through it (signed with the rest;
    /// absent when none, so older frames still decode and verify).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterId>,
    /// With credentials: the owner's signature over this delta's JSON (without `proof`).
    /// A receiver acts on the signed text, never on the outer fields, so a relay cannot
    /// change a node's entries; a delta without a valid proof is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<StatementProof>,
}

/// What a node says about one of its functions beyond its identity, for `rpc_describe`
/// on other nodes: its declared parameters (Python's syntax) and its documentation, each
/// at most [`MAX_ABOUT_BYTES`] (a longer documentation is cut; longer parameters are not
/// sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionAbout {
    /// The function's name.
    pub name: String,
    /// Its id.
    pub function_id: String,
    /// Its version.
    pub version: Version,
    /// Its declared parameters, as `Signature` prints them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// Its documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// Served by a worker process connected to the node, not by the node's own code
    /// (absent when false, so older frames still decode and verify).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub worker: bool,
}

/// The longest parameter text or documentation a catalog entry carries.
pub const MAX_ABOUT_BYTES: usize = 1024;

impl FunctionAbout {
    /// Whether it describes `identity`.
    pub fn describes(&self, identity: &FunctionIdentity) -> bool {
        self.name == identity.name && self.function_id == identity.function_id && self.version == identity.version
    }

    /// Whether both texts are within [`MAX_ABOUT_BYTES`].
    pub fn within_bounds(&self) -> bool {
        self.params.as_ref().is_none_or(|p| p.len() <= MAX_ABOUT_BYTES)
            && self.doc.as_ref().is_none_or(|d| d.len() <= MAX_ABOUT_BYTES)
    }
}

/// `role: "fabric-gossip"` — membership and catalog dissemination (between direct peers, or
/// routed in a `fabric-message` when there is no link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GossipFrame {
    /// The sender's view of every member, sent once on a link just admitted (SWIM's
    /// push-pull repairs what is missed later).
    Members {
        /// Sender.
        from: NodeId,
        /// Its view.
        members: Vec<MemberDigest>,
    },
    /// Entry sets, pushed on change (flooded with de-duplication) or on request.
    Catalog {
        /// Sender.
        from: NodeId,
        /// One delta per node.
        deltas: Vec<CatalogDelta>,
    },
    /// "Send me the entry sets of these nodes": the digest showed I am behind.
    CatalogRequest {
        /// Sender.
        from: NodeId,
        /// Nodes whose entries are wanted.
        nodes: Vec<NodeId>,
    },
    /// SWIM traffic ([`super::swim`]): a probe, an indirect probe, an ack or a push-pull,
    /// with member records and catalog entry sets piggybacked. Sent on the link to the
    /// receiver's node, or routed to it (`fabric-message` body `gossip`) when there is no
    /// link.
    Swim {
        /// The sender's member id, `node#instance`.
        from: String,
        /// The receiver's member id; a frame for another instance of its node is dropped.
        to: String,
        /// The SWIM message (its rumors: at most `max_piggyback` are read).
        message: SwimMessage,
        /// Member records that changed lately (each sent about λ·log n times), or the
        /// sender's whole list in a push-pull (at most `max_push_pull_members` are read).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        records: Vec<MemberDigest>,
        /// Catalog entry sets refreshed or changed lately, signed by their owners like
        /// `catalog` deltas.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deltas: Vec<CatalogDelta>,
    },
    /// A node left cleanly (relayed GOODBYE).
    Departed {
        /// Sender.
        from: NodeId,
        /// Who left.
        node: NodeId,
        /// Which instance.
        instance_id: InstanceId,
        /// With credentials: the departed node's own signed GOODBYE, relayed unchanged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<StatementProof>,
    },
}

/// A routed message: travels hop by hop from `source` to `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FabricMessage {
    /// Unique per source and unpredictable (a counter plus 64 random bits); replies carry
    /// the call's id, and are accepted only on the link the call left on.
    pub id: String,
    /// Originating node.
    pub source: NodeId,
    /// Destination node.
    pub target: NodeId,
    /// Nodes passed so far, source first; a node already on it refuses (loop).
    pub path: Vec<NodeId>,
    /// Forwards left; 0 means the next forward is refused.
    pub hops_left: u32,
    /// What it carries.
    pub body: FabricBody,
}

/// What a `fabric-message` carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FabricBody {
    /// Run a function with exactly this identity on the target.
    Call {
        /// The command's name (for error details).
        command: String,
        /// Which function.
        identity: FunctionIdentity,
        /// Positional arguments (references already substituted).
        args: Vec<Value>,
        /// Keyword arguments.
        kwargs: Map<String, Value>,
        /// Milliseconds the caller still waits, when it has a deadline (absent from older
        /// frames): a function served by a worker is told when to stop.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// The answer to a call.
    Reply {
        /// How it went.
        outcome: CallOutcome,
    },
    /// Work for another cluster (a command, a queue operation or a cache read), to a node
    /// of this cluster that bridges to it (it answers with the cluster's result, or
    /// `refused`).
    ClusterCall {
        /// The destination cluster.
        cluster: ClusterId,
        /// What to run there: `command`, `queue` or `cache`.
        #[serde(flatten)]
        work: super::bridge::Work,
        /// Milliseconds the caller still waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// A queue operation for a queue the target owns: `request` is the client's
    /// `role: "queue"` frame (its `u` included); answered by a `reply` whose outcome is
    /// `ok` with `value` = the owner's `queue-reply` frame.
    QueueOp {
        /// The QueueRequest JSON.
        request: Value,
        /// The client's connection on the source node (the owner binds the operation's
        /// consumer and subscriptions to it; see [`super::queue_sessions`]).
        #[serde(default)]
        conn: u64,
    },
    /// One-way, owner to source: a `queue-message` push for a subscription of client
    /// connection `conn` of the target.
    QueuePush {
        /// The subscribing connection on the target.
        conn: u64,
        /// The push frame, as the client receives it.
        frame: Value,
    },
    /// One-way, source to owner: client connection `conn` of the source closed; the owner
    /// releases its leases and subscriptions.
    QueueGone {
        /// The connection that closed.
        conn: u64,
    },
    /// A cache operation for the target's levels: `request` is a `role: "cache"` frame;
    /// `duty` says how the target runs it: `primary` (as the key's primary owner: it
    /// assigns the version and tells the other nodes) or `local` (on its own L1 and L2
    /// only: a replica's versioned write, a dropped copy, a read, an invalidation).
    /// Answered like `queue-op`, with the target's `cache-reply` as the `ok` value.
    CacheOp {
        /// `primary` or `local`.
        duty: String,
        /// The CacheRequest JSON.
        request: Value,
    },
    /// One-way: a `fabric-gossip` frame for a node this node has no link to (SWIM
    /// probes, acks and push-pulls, catalog requests and answers).
    Gossip {
        /// The frame; the receiver takes `source` as its sender.
        frame: GossipFrame,
    },
    /// A pub/sub message flooding the cluster (de-duplicated by `message_id`).
    Publish {
        /// The message.
        message: PubSubMessage,
    },
}

/// The result of a remote call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum CallOutcome {
    /// The function returned.
    Ok {
        /// Its result.
        value: Value,
    },
    /// The function ran and failed.
    Failed {
        /// Its error.
        error: FunctionError,
        /// The node it ran on.
        node: NodeId,
    },
    /// The function is not (or no longer) there.
    NotFound {
        /// The node that looked.
        node: NodeId,
    },
    /// The message could not be delivered (loop, hop budget, no route).
    Unreachable {
        /// Why, naming the node that gave up.
        reason: String,
    },
    /// The node (or a node on the way) refused the call because one of its in-flight
    /// bounds is reached (`max_in_flight_per_link`, `max_in_flight`, forwarded calls):
    /// the caller should back off and retry, as for a 1006.
    Overloaded {
        /// Which bound, naming the node that refused.
        reason: String,
    },
    /// A cross-cluster command's error, as the cluster that ran it (or a bridge on the
    /// way) gave it.
    Refused {
        /// The error.
        error: crate::protocol::RpcError,
    },
}

/// The `result`/`error` of a `queue-reply` or `cache-reply` (its other fields ignored).
#[derive(Deserialize)]
struct OpReply {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<crate::protocol::RpcError>,
}

impl CallOutcome {
    /// The outcome of a queue or cache operation (`what`) run on `node`, whose `ok` value
    /// is its `queue-reply` / `cache-reply`: the reply's result or error; a lost node or
    /// link is 1005.
    pub fn into_op_result(self, what: &str, node: &str) -> Result<Value, crate::protocol::RpcError> {
        use crate::protocol::RpcError;
        match self {
            CallOutcome::Ok { value } => match serde_json::from_value::<OpReply>(value) {
                Ok(OpReply { error: Some(error), .. }) => Err(error),
                Ok(OpReply { result, .. }) => Ok(result.unwrap_or(Value::Null)),
                Err(e) => Err(RpcError::unreachable(format!("undecodable {what} reply from {node}: {e}"))),
            },
            CallOutcome::Overloaded { reason } => Err(RpcError::peer_overloaded(reason)),
            CallOutcome::Unreachable { reason } => Err(RpcError::unreachable(reason)),
            CallOutcome::Refused { error } => Err(error),
            CallOutcome::NotFound { node } => Err(RpcError::unreachable(format!("no {what} service on {node}"))),
            CallOutcome::Failed { error, node } => {
                Err(RpcError::unreachable(format!("{what} operation failed on {node}: {error:?}")))
            }
        }
    }
}

/// Any inter-node frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case")]
pub enum PeerFrame {
    /// `server`
    Server(ServerFrame),
    /// `fabric-gossip`
    FabricGossip(GossipFrame),
    /// `fabric-message`
    FabricMessage(FabricMessage),
    /// Between nodes of different clusters, on a federation bridge only (see
    /// [`super::bridge`]).
    Federation(super::bridge::FederationFrame),
}

impl PeerFrame {
    /// Decodes a frame whose role the wire layer found to be a peer role.
    pub fn decode(bytes: &[u8]) -> Result<PeerFrame, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_carry_role_and_kind() {
        let frame = PeerFrame::Server(ServerFrame::Goodbye { node: "a".into(), instance_id: "i".into(), proof: None });
        let json = serde_json::to_value(&frame).unwrap();
        assert_eq!(json["role"], "server");
        assert_eq!(json["kind"], "goodbye");
        assert_eq!(serde_json::from_value::<PeerFrame>(json).unwrap(), frame);
    }

    #[test]
    fn open_mode_frames_carry_no_trust_fields() {
        // Open-mode peers send exactly what they did before credentials existed.
        let status = PeerFrame::Server(ServerFrame::Status {
            info: NodeInfo { node: "a".into(), instance_id: "i".into(), cluster_id: "c".into(), url: "ws://x".into() },
            functions: vec![],
            catalog_version: 1,
            queues: vec![],
            about: vec![],
            auth: None,
        });
        let json = serde_json::to_value(&status).unwrap();
        assert!(json.get("auth").is_none(), "{json}");
        let departed = PeerFrame::FabricGossip(GossipFrame::Departed {
            from: "a".into(),
            node: "b".into(),
            instance_id: "i".into(),
            proof: None,
        });
        assert!(serde_json::to_value(&departed).unwrap().get("proof").is_none());
        // And a frame without them still decodes.
        let old = serde_json::json!({"role": "server", "kind": "goodbye", "node": "a", "instance_id": "i"});
        assert!(matches!(
            serde_json::from_value::<PeerFrame>(old).unwrap(),
            PeerFrame::Server(ServerFrame::Goodbye { proof: None, .. })
        ));
    }

    #[test]
    fn the_goodbye_text_names_cluster_node_and_instance() {
        let text = goodbye_text("c", "a", "i");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"statement": "goodbye", "cluster_id": "c", "node": "a", "instance_id": "i"})
        );
        assert_ne!(goodbye_text("c", "a", "i2"), text);
    }

    proptest! {
        #[test]
        fn fabric_messages_round_trip(id in "[a-z0-9]{1,8}", hops in 0u32..10, path in proptest::collection::vec("[a-z]{1,4}", 0..5), n in any::<i64>()) {
            let frame = PeerFrame::FabricMessage(FabricMessage {
                id, source: "s".into(), target: "t".into(), path, hops_left: hops,
                body: FabricBody::Reply { outcome: CallOutcome::Ok { value: Value::from(n) } },
            });
            let bytes = serde_json::to_vec(&frame).unwrap();
            prop_assert_eq!(serde_json::from_slice::<PeerFrame>(&bytes).unwrap(), frame);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = serde_json::from_slice::<PeerFrame>(&bytes);
        }
    }
}
