//! Federation bridges: links to nodes of **other** clusters, driving this node's
//! [`FederationCore`] over the wire (DESIGN.md §8, "Federation").
//!
//! ```text
//! dial (federation peers) ──► STATUS handshake: the other cluster is allowed, its node
//!     certificate chains to the authority pinned for it, both sides sign the transcript
//!     ──► bridge up: send our route key chain, then our announcements
//! role "federation" frames on a bridge:
//!   keys {chain}      ──► learn_keys (only that cluster's, chained to its pinned authority)
//!   updates [signed]  ──► receive each (refusals counted by reason, logged once per reason)
//!                         ──► table changed? announce to every neighbour at once
//!   call {id, destination, visited, hops_left, command}
//!                     ──► destination is us: run the command like a local one
//!                         else: forward to the best next hop (one fewer hop), as the
//!                         text that came: only the routing header is parsed
//!                     ──► reply {id, value | error} on the link the call came on
//!                         (a relayed call's: its value or error passed back as text)
//!   publish {message, visited}
//!                     ──► first time its id is seen here: deliver, flood in the cluster,
//!                         and on to every neighbour not in visited (export list topics)
//! every announce interval, and on every change: signed announcements / withdrawals
//! last bridge to a cluster drops ──► its routes go, withdrawals go out at once
//! ```
//!
//! A bridge carries federation frames only: it is never admitted as a member link, so no
//! membership, gossip, catalog or routed message crosses it, and the clusters stay
//! separate. Work crosses as calls (with `target_cluster`, or without it for a function
//! nothing in the caller's cluster serves: asked of the clusters it reaches) and as
//! publishes on the topics a cluster's export list shares (`publish {message, visited}`:
//! delivered once per node by message id, never sent back to a cluster it crossed).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::link::{frame, FabricShared, LinkId, LinkSender, Parking};
use super::wire::{CallOutcome, NodeId, PeerFrame};
use crate::federation::core::{FederationConfig, FederationCore, FederationSnapshot};
use crate::federation::keys::{RouteKeyRing, RouteSigner, SignedKeyRecord};
use crate::federation::policy::{ExportPolicies, Exports, ImportPolicies};
use crate::federation::table::Explanation;
use crate::federation::update::SignedRouteUpdate;
use crate::federation::{ClusterId, RouteRejection};
use crate::metrics::{InFlight, Metrics};
use crate::planner::{execute, NoObserver, Plan, ReportOptions};
use crate::protocol::{
    encode, sniff_str, top_level_raw, CacheRequest, ErrorCode, FrameKind, PubSubMessage, QueueRequest, RpcCommand,
    RpcError, RpcRequest,
};
use crate::pubsub::OutFrame;
use crate::routing::Routing;
use crate::unix_now_ms;

/// `role: "federation"` — what crosses a bridge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FederationFrame {
    /// The sender cluster's route key chain (sent when the bridge opens).
    Keys {
        /// Records from the first route key to the current one.
        chain: Vec<SignedKeyRecord>,
    },
    /// Signed announcements and withdrawals.
    Updates {
        /// Each signed by the sending cluster's current route key.
        updates: Vec<SignedRouteUpdate>,
    },
    /// Work to run in cluster `destination`: a command, a queue operation or a cache read.
    Call {
        /// Unique per sender; the reply names it.
        id: String,
        /// The cluster that runs the command.
        destination: ClusterId,
        /// Clusters the call has crossed, the sender's included.
        visited: Vec<ClusterId>,
        /// Cluster hops it may still take after this one.
        hops_left: u32,
        /// What to run: `command`, `queue` or `cache` (one of the three keys).
        #[serde(flatten)]
        work: Work,
        /// Milliseconds the caller still waits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// A message published in cluster `visited[0]`, crossing to this one.
    Publish {
        /// The message (its id makes each node deliver it once).
        message: PubSubMessage,
        /// Clusters it has crossed, the sender's last; it never goes back to one.
        visited: Vec<ClusterId>,
    },
    /// The answer to a call, on the bridge the call came on.
    Reply {
        /// The call's id.
        id: String,
        /// The command's result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<Value>,
        /// Or why it failed (the error the destination cluster gave, or 1005).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<RpcError>,
    },
}

/// What a cross-cluster call carries, under one of three keys of the `call` frame (and of
/// a `cluster-call` inside the caller's cluster).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// An RPC command, its arguments already substituted.
    Command(Box<RpcCommand>),
    /// A queue operation (`send` or `stats`): the client's `role: "queue"` frame without
    /// its `target_cluster`.
    Queue(Box<QueueRequest>),
    /// A cache `get` (another cluster's L4): the client's `role: "cache"` frame.
    Cache(Box<CacheRequest>),
}

/// Queue operations that cross clusters. `receive`, `ack`, `nack` and `subscribe` hold
/// leases and subscriptions bound to a client connection, which a bridge does not carry;
/// `create`, `delete`, `redrive` and `bind` change another cluster's queues.
pub const CROSSING_QUEUE_OPS: [&str; 2] = ["send", "stats"];

/// The keys a `call` frame carries its work under, one of them per frame.
const WORK_KEYS: [&str; 3] = ["command", "queue", "cache"];

/// A call's work as the JSON text it travels as, under its key in the `call` frame: what a
/// cluster on the way passes on without decoding it.
#[derive(Clone, Copy)]
struct WorkText<'a> {
    key: &'static str,
    text: &'a [u8],
}

impl Work {
    /// The key this work travels under in a `call` frame ([`WORK_KEYS`]) and its JSON text.
    fn to_text(&self) -> (&'static str, Vec<u8>) {
        match self {
            Work::Command(command) => ("command", encode(command)),
            Work::Queue(request) => ("queue", encode(request)),
            Work::Cache(request) => ("cache", encode(request)),
        }
    }

    /// Whether this may cross clusters at all (checked where it starts and again where it
    /// arrives): any command; a queue `send` or `stats` naming a queue; a cache `get`.
    pub fn check(&self) -> Result<(), RpcError> {
        match self {
            Work::Command(_) => Ok(()),
            Work::Queue(request) if !CROSSING_QUEUE_OPS.contains(&request.op.as_str()) => Err(RpcError::invalid(
                format!("queue {} does not cross clusters (only {})", request.op, CROSSING_QUEUE_OPS.join(", ")),
            )),
            Work::Queue(request) if request.queue.is_none() => {
                Err(RpcError::invalid(format!("queue {} needs \"queue\"", request.op)))
            }
            Work::Cache(request) if request.op != "get" => {
                Err(RpcError::invalid(format!("cache {} does not cross clusters (only get, at level l4)", request.op)))
            }
            Work::Cache(request) if request.namespace.is_none() => {
                Err(RpcError::invalid("cache get needs \"namespace\"".to_owned()))
            }
            _ => Ok(()),
        }
    }
}

/// Route updates one frame may carry (a table holds at most 4096 destinations); a larger
/// frame is refused whole (counted as `malformed`).
pub const MAX_UPDATES_PER_FRAME: usize = 4096;

/// The store tree of the federation snapshot (route table, route keys learned, epoch).
pub const SNAPSHOT_TREE: &str = "federation";
/// Its key.
pub const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// A node's federation settings, resolved (keys loaded).
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Clusters this node bridges to; any other is refused.
    pub allowed: BTreeSet<ClusterId>,
    /// The authority pinned for each allowed cluster (node certificates and route keys
    /// must chain to it).
    pub pinned: BTreeMap<ClusterId, VerifyingKey>,
    /// This cluster's route key.
    pub signer: RouteSigner,
    /// Table, policies, tags, TTL.
    pub federation: FederationConfig,
    /// Announcements are re-sent this often even when nothing changed.
    pub announce_interval: Duration,
    /// Cluster hops a call may take.
    pub hop_budget: u32,
    /// The route key file and this cluster's authority: the file is read again when it
    /// changes (`mpreg keys rotate`), so a rotation takes effect without a restart.
    pub route_key: Option<(PathBuf, VerifyingKey)>,
    /// What of this cluster other clusters may use (functions a call arriving over a
    /// bridge may run).
    pub exports: Exports,
    /// A call sent over a bridge without a deadline of its own is given up after this long
    /// (1005), like a forwarded call inside the cluster (`LinkLimits::forwarded_ttl`).
    pub call_ttl: Duration,
    /// Calls that may wait on bridges at once (this node's and relayed ones); beyond, a
    /// call is refused with 1006.
    pub max_waiting_calls: usize,
}

/// Who is at the other end of a bridge, and which of this node's threads serves it.
pub struct BridgePeer<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub thread: ThreadId,
}

/// An open bridge.
#[derive(Debug, Clone)]
struct Bridge {
    cluster: ClusterId,
    node: NodeId,
    sender: LinkSender,
    /// Frames read on it, counted for the fabric, which closes a bridge silent for
    /// [`Bridges::silent_limit`] (it never sees these frames itself).
    heard: Arc<AtomicU64>,
    /// Calls read on the bridges to this node being served or relayed now
    /// (`max_in_flight_per_link`; a node's lanes share it).
    serving: Arc<AtomicUsize>,
    /// The thread serving it.
    thread: ThreadId,
}

/// A call read on a bridge, admitted: its places in the node's `max_in_flight` and in the
/// bridge's `max_in_flight_per_link`, given back when it drops (answered, or dropped).
struct Admitted {
    _node: InFlight,
    _bridge: BridgeSlot,
}

/// One of a bridge's `serving` places.
struct BridgeSlot(Arc<AtomicUsize>);

impl Drop for BridgeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct State {
    core: FederationCore,
    bridges: BTreeMap<LinkId, Bridge>,
    last_announce: Instant,
    /// The route key file's modification time when last read.
    route_key_modified: Option<std::time::SystemTime>,
    /// The export list (reloaded with the policies).
    exports: Exports,
}

/// A call sent over a bridge, waiting for its reply until `expires`.
struct Waiting {
    via: LinkId,
    waiter: Waiter,
    expires: Instant,
    /// Whether `expires` is the call's own deadline (1004 when it passes) or the TTL
    /// (1005).
    own_deadline: bool,
    /// Who it waits on (`node (cluster)`), for the reason given when it expires.
    on: String,
}

/// Who gets a call's reply.
enum Waiter {
    /// A task of this node (its own request's command).
    Task(oneshot::Sender<Result<Value, RpcError>>),
    /// A call relayed for another cluster.
    Relay(RelayBack),
}

/// Where the reply to a call relayed for another cluster goes: back on `back` (through the
/// node's `parking`: a full queue does not lose it) under the caller's `id` as soon as it
/// comes, with no task waiting; the permit holds the call's place in max_in_flight until
/// then.
struct RelayBack {
    back: LinkSender,
    parking: Parking,
    id: String,
    _permit: Admitted,
}

impl RelayBack {
    /// Sends the reply back with its value or error as the JSON text that came.
    fn send(self, value: Option<&[u8]>, error: Option<&[u8]>) {
        if self.parking.send(&self.back, reply_frame(&self.id, value, error)).is_err() {
            debug!("federation reply not relayed: the bridge back closed or too many frames wait");
        }
    }
}

impl Waiter {
    fn answer(self, result: Result<Value, RpcError>) {
        match self {
            Waiter::Task(reply) => {
                let _ = reply.send(result);
            }
            Waiter::Relay(relay) => match result {
                Ok(value) => relay.send(Some(&encode(&value)), None),
                Err(error) => relay.send(None, Some(&encode(&error))),
            },
        }
    }
}

/// A `reply` frame to the call `id` with its `value` or `error` as JSON text.
fn reply_frame(id: &str, value: Option<&[u8]>, error: Option<&[u8]>) -> OutFrame {
    #[derive(Serialize)]
    struct Head<'a> {
        role: &'static str,
        kind: &'static str,
        id: &'a str,
    }
    with_raw_fields(&Head { role: "federation", kind: "reply", id }, &[("value", value), ("error", error)])
}

/// The routing header of a `call` frame read: what a cluster on the way reads of it (the
/// command is passed on as text).
#[derive(Deserialize)]
struct CallHead {
    id: String,
    destination: ClusterId,
    visited: Vec<ClusterId>,
    hops_left: u32,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The routing header of a `call` frame sent (its command follows as text).
#[derive(Serialize)]
struct CallOut<'a> {
    role: &'static str,
    kind: &'static str,
    id: &'a str,
    destination: &'a str,
    visited: &'a [ClusterId],
    hops_left: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
}

/// The id of a `reply` frame.
#[derive(Deserialize)]
struct ReplyHead {
    id: String,
}

/// A frame of `head`'s fields then each present field of `raw` as the JSON text given:
/// what a cluster on the way passes on without decoding it.
fn with_raw_fields(head: &impl Serialize, raw: &[(&str, Option<&[u8]>)]) -> OutFrame {
    let mut bytes = encode(head);
    if bytes.last() == Some(&b'}') {
        bytes.pop();
        for (name, text) in raw {
            if let Some(text) = text {
                bytes.push(b',');
                bytes.extend_from_slice(&encode(name));
                bytes.push(b':');
                bytes.extend_from_slice(text);
            }
        }
        bytes.push(b'}');
    }
    OutFrame { bytes: bytes.into(), kind: FrameKind::Binary }
}

/// This node's bridges and federation state, shared by the fabric actor (handshakes,
/// ticks), link readers (frames) and the request path (calls).
pub struct Bridges {
    local: ClusterId,
    allowed: BTreeSet<ClusterId>,
    pinned: BTreeMap<ClusterId, VerifyingKey>,
    announce_interval: Duration,
    silent_limit: Duration,
    hop_budget: u32,
    route_key: Option<(PathBuf, VerifyingKey)>,
    call_ttl: Duration,
    max_waiting_calls: usize,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    waiting: Mutex<HashMap<String, Waiting>>,
    next_id: AtomicU64,
}

/// A file's modification time, if it can be read.
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Bridges {
    /// Bridges for cluster `local` (the federation config's) under `config`.
    pub fn new(config: BridgeConfig, metrics: Arc<Metrics>) -> Self {
        let mut ring = RouteKeyRing::default();
        for (cluster, key) in &config.pinned {
            ring.pin(cluster, *key);
        }
        let local = config.federation.table.local.clone();
        let route_key_modified = config.route_key.as_ref().and_then(|(path, _)| modified(path));
        let silent_limit = (config.announce_interval * 3).max(Duration::from_millis(config.federation.ttl_ms));
        let core = FederationCore::new(config.federation, config.signer, ring);
        Bridges {
            local,
            allowed: config.allowed,
            pinned: config.pinned,
            announce_interval: config.announce_interval,
            silent_limit,
            hop_budget: config.hop_budget,
            route_key: config.route_key,
            // At most a day: any Instant of this process's life plus it is representable.
            call_ttl: config.call_ttl.min(Duration::from_secs(86_400)),
            max_waiting_calls: config.max_waiting_calls,
            metrics,
            state: Mutex::new(State {
                core,
                bridges: BTreeMap::new(),
                last_announce: Instant::now(),
                route_key_modified,
                exports: config.exports,
            }),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The authority a node of `cluster` must chain to, or why a bridge to it is refused.
    pub fn authority_for(&self, cluster: &str) -> Result<&VerifyingKey, String> {
        if !self.allowed.contains(cluster) {
            return Err(format!("cluster {cluster} is not in this node's federation allowed_clusters"));
        }
        self.pinned.get(cluster).ok_or_else(|| format!("cluster {cluster} has no pinned authority (federation trust)"))
    }

    /// A bridge to `node` of `cluster` completed its handshake on `link`: it gets our key
    /// chain, then every neighbour our announcements. Every frame read on it is counted in
    /// `heard`.
    pub fn bridge_up(&self, link: LinkId, peer: BridgePeer<'_>, sender: LinkSender, heard: Arc<AtomicU64>) {
        let BridgePeer { cluster, node, thread } = peer;
        let Ok(mut state) = self.state.lock() else { return };
        state.core.link_up(cluster);
        // Every link gets the keys and an announcement round, a lane too: a link to a node
        // bridged already may come from a new process of it (restarted, its old links not
        // yet found dead), which knows neither.
        let chain = state.core.own_chain().to_vec();
        // Keys and route updates are few and must not be lost to a byte bound that bulk
        // frames (publishes) filled: they are bounded in frames only.
        let _ = sender.queue(frame(&PeerFrame::Federation(FederationFrame::Keys { chain })));
        // A node's bridges (its lanes) hold one max_in_flight_per_link between them.
        let serving = state
            .bridges
            .values()
            .find(|b| b.cluster == cluster && b.node == node)
            .map(|b| b.serving.clone())
            .unwrap_or_default();
        let bridge = Bridge { cluster: cluster.to_owned(), node: node.to_owned(), sender, heard, serving, thread };
        state.bridges.insert(link, bridge);
        info!(cluster = %self.local, peer_cluster = %cluster, peer = %node, link, "federation bridge up");
        Self::announce(&mut state);
    }

    /// The bridges open to `node` of `cluster` (its bridge and its lanes).
    pub fn links_to(&self, cluster: &str, node: &str) -> usize {
        let Ok(state) = self.state.lock() else { return 0 };
        state.bridges.values().filter(|b| b.cluster == cluster && b.node == node).count()
    }

    /// A ping or pong was read on `link`: counted as hearing from it, when it is a bridge.
    pub fn note_heard(&self, link: LinkId) {
        self.bridge(link);
    }

    /// `link` closed: when it was a bridge, its cluster loses a link (the last one: its
    /// routes go and withdrawals go out at once), and calls waiting on it fail (1005).
    pub fn link_closed(&self, link: LinkId) {
        let Ok(mut state) = self.state.lock() else { return };
        let Some(bridge) = state.bridges.remove(&link) else { return };
        info!(cluster = %self.local, peer_cluster = %bridge.cluster, peer = %bridge.node, link, "federation bridge down");
        if state.core.link_down(&bridge.cluster, unix_now_ms()) {
            Self::announce(&mut state);
        }
        drop(state);
        let lost: Vec<Waiting> = match self.waiting.lock() {
            Ok(mut waiting) => {
                let ids: Vec<String> =
                    waiting.iter().filter(|(_, w)| w.via == link).map(|(id, _)| id.clone()).collect();
                ids.into_iter().filter_map(|id| waiting.remove(&id)).collect()
            }
            Err(_) => Vec::new(),
        };
        for w in lost {
            let reason =
                format!("the bridge to {} ({}) closed before the call was answered", bridge.node, bridge.cluster);
            w.waiter.answer(Err(RpcError::unreachable(reason)));
        }
    }

    /// New import and export policies and export list (a reload): export applies from the
    /// announcement sent now, import to the updates received from now on (routes already
    /// held stay until refreshed or withdrawn), the export list to the next call.
    pub fn set_policies(&self, import: ImportPolicies, export: ExportPolicies, exports: Exports) {
        let Ok(mut state) = self.state.lock() else { return };
        state.core.set_policies(import, export);
        state.exports = exports;
        // At once: withdrawals of what the import policies now refuse, and announcements
        // under the new export policies.
        Self::announce(&mut state);
    }

    /// Sends `message` over one bridge to each neighbour cluster not in `visited` (the
    /// clusters it crossed) when this cluster's export list shares its topic, and it has
    /// crossed fewer than `hop_budget` clusters.
    pub fn publish_out(&self, message: &PubSubMessage, mut visited: Vec<ClusterId>) {
        let Ok(state) = self.state.lock() else { return };
        if state.bridges.is_empty() || !state.exports.shares_topic(&message.topic) {
            return;
        }
        if visited.len() >= self.hop_budget as usize {
            return;
        }
        visited.push(self.local.clone());
        let mut told = BTreeSet::new();
        let mut bytes = None;
        for bridge in state.bridges.values().filter(|b| !visited.contains(&b.cluster)) {
            if !told.insert(bridge.cluster.clone()) {
                continue;
            }
            let bytes = bytes.get_or_insert_with(|| {
                let publish = FederationFrame::Publish { message: message.clone(), visited: visited.clone() };
                frame(&PeerFrame::Federation(publish))
            });
            if bridge.sender.try_send_bulk(bytes.clone()).is_err() {
                self.metrics.fabric_dropped("bridge_queue_full");
                debug!(peer = %bridge.node, "bridge queue full; a publish did not cross");
            }
        }
    }

    /// Whether this cluster's export list lets another cluster run `work` here: its
    /// function, its queue or its cache namespace (else 1001 naming the list).
    fn exported(&self, work: &Work) -> Result<(), RpcError> {
        let state = self.state.lock().map_err(|_| RpcError::unreachable("federation state unavailable"))?;
        let exports = &state.exports;
        let (list, name, shared) = match work {
            Work::Command(command) => ("functions", command.fun.as_str(), exports.shares_function(&command.fun)),
            Work::Queue(request) => {
                let name = request.queue.as_deref().unwrap_or_default();
                ("queues", name, exports.shares_queue(name))
            }
            Work::Cache(request) => {
                let namespace = request.namespace.as_deref().unwrap_or_default();
                ("cache", namespace, exports.shares_cache(namespace))
            }
        };
        if shared {
            Ok(())
        } else {
            Err(RpcError::not_exported(&self.local, list, name))
        }
    }

    /// A bridge that carried nothing for this long (three announce intervals, at least a
    /// route TTL: its routes have expired) is dead even if TCP has not noticed, as after
    /// a partition; the fabric closes it so that it is dialled afresh.
    pub fn silent_limit(&self) -> Duration {
        self.silent_limit
    }

    /// Whether `link` is an open bridge.
    pub fn is_bridge(&self, link: LinkId) -> bool {
        self.state.lock().is_ok_and(|s| s.bridges.contains_key(&link))
    }

    /// Periodic work (from the fabric's tick): expiry, and re-announcement every
    /// `announce_interval`.
    pub fn tick(&self) {
        self.expire_calls(Instant::now());
        let Ok(mut state) = self.state.lock() else { return };
        let rotated = self.reload_route_key(&mut state);
        let expired = state.core.expire(unix_now_ms());
        if rotated || expired || state.last_announce.elapsed() >= self.announce_interval {
            Self::announce(&mut state);
        }
    }

    /// Answers every call still waiting on a bridge at `now` past its bound: 1004 when its
    /// own deadline passed, 1005 when the TTL did (the bridge is open but never answered).
    /// A relayed call's in-flight slot is freed with it.
    fn expire_calls(&self, now: Instant) {
        let expired: Vec<Waiting> = match self.waiting.lock() {
            Ok(mut waiting) => {
                let ids: Vec<String> =
                    waiting.iter().filter(|(_, w)| w.expires <= now).map(|(id, _)| id.clone()).collect();
                ids.into_iter().filter_map(|id| waiting.remove(&id)).collect()
            }
            Err(_) => Vec::new(),
        };
        for w in expired {
            let error = if w.own_deadline {
                RpcError::deadline_passed(format!(
                    "cluster {}: no reply from {} before the call's deadline",
                    self.local, w.on
                ))
            } else {
                RpcError::unreachable(format!(
                    "cluster {}: no reply from {} within {} ms (federation call TTL)",
                    self.local,
                    w.on,
                    self.call_ttl.as_millis()
                ))
            };
            w.waiter.answer(Err(error));
        }
    }

    /// Reads the route key file again when it changed; a new key is used from now on and
    /// its chain sent over every bridge first (the neighbours learn it without a restart).
    fn reload_route_key(&self, state: &mut State) -> bool {
        let Some((path, authority)) = &self.route_key else { return false };
        let now_modified = modified(path);
        if now_modified == state.route_key_modified {
            return false;
        }
        state.route_key_modified = now_modified;
        let signer = match RouteSigner::load(path, authority) {
            Ok(signer) if signer.cluster_id() == self.local => signer,
            Ok(signer) => {
                warn!(file = %path.display(), cluster = signer.cluster_id(), "route key file of another cluster ignored");
                return false;
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "route key file unreadable; the current key stays");
                return false;
            }
        };
        if state.core.own_chain() == signer.chain() {
            return false;
        }
        info!(cluster = %self.local, key_id = signer.key_id(), "route key rotated");
        let chain = signer.chain().to_vec();
        state.core.rotate_to(signer);
        let keys = frame(&PeerFrame::Federation(FederationFrame::Keys { chain }));
        for bridge in state.bridges.values() {
            let _ = bridge.sender.queue(keys.clone());
        }
        true
    }

    /// Sends every neighbour what the core says it should hear now (one bridge per
    /// neighbour node).
    fn announce(state: &mut State) {
        state.last_announce = Instant::now();
        let outgoing = state.core.outgoing(unix_now_ms());
        for (neighbor, updates) in outgoing {
            if updates.is_empty() {
                continue;
            }
            let bytes = frame(&PeerFrame::Federation(FederationFrame::Updates { updates }));
            let mut told = BTreeSet::new();
            for bridge in state.bridges.values().filter(|b| b.cluster == neighbor) {
                if told.insert(bridge.node.clone()) && bridge.sender.queue(bytes.clone()).is_err() {
                    debug!(peer = %bridge.node, "bridge queue full; announcements wait for the next round");
                }
            }
        }
    }

    /// A federation frame read on the bridge `link` (ignored when `link` is not one: frames
    /// read before the handshake completed go to the fabric actor, which judges them after
    /// it).
    pub fn on_frame(
        self: &Arc<Self>,
        fabric: &Arc<FabricShared>,
        link: LinkId,
        message: FederationFrame,
        bytes: usize,
    ) {
        let Some(bridge) = self.bridge(link) else { return };
        match message {
            FederationFrame::Keys { chain } => {
                let Ok(mut state) = self.state.lock() else { return };
                match state.core.learn_keys(&bridge.cluster, &chain) {
                    Ok(true) => info!(peer_cluster = %bridge.cluster, "federation: route keys learned"),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(peer_cluster = %bridge.cluster, peer = %bridge.node, error = %e, "federation: key chain refused")
                    }
                }
            }
            FederationFrame::Updates { updates } => self.receive(&bridge, &updates),
            FederationFrame::Call { id, destination, visited, hops_left, work, timeout_ms } => {
                if destination != self.local {
                    let head = CallHead { id, destination, visited, hops_left, timeout_ms };
                    let (key, text) = work.to_text();
                    return self.relay_from(fabric, &bridge, head, WorkText { key, text: &text });
                }
                // Only what may cross, and what this cluster exports, runs for another
                // cluster.
                if let Err(error) = work.check().and_then(|()| self.exported(&work)) {
                    debug!(peer_cluster = %bridge.cluster, error = ?error, "federation: call refused");
                    return refuse(fabric, &bridge, &id, error);
                }
                let permit = match self.admit(fabric, &bridge) {
                    Ok(permit) => permit,
                    Err(error) => return refuse(fabric, &bridge, &id, error),
                };
                // The cluster the call started in (queue operations from it share a
                // pseudo-connection on the queue's owner).
                let origin = visited.first().cloned().unwrap_or_else(|| bridge.cluster.clone());
                let (bridges, fabric) = (self.clone(), fabric.clone());
                // On this thread: a plan's futures are not Send (link readers run on
                // actix arbiters, which are local task sets).
                tokio::task::spawn_local(async move {
                    let _permit = permit;
                    // A peer's number: an overflowing one means no deadline, never a panic.
                    let deadline = timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
                    let result = run_here(&fabric, &bridges.local, &origin, work, deadline).await;
                    let (value, error) = match result {
                        Ok(value) => (Some(value), None),
                        Err(error) => (None, Some(error)),
                    };
                    let reply = frame(&PeerFrame::Federation(FederationFrame::Reply { id, value, error }));
                    if bridge.sender.send(reply).await.is_err() {
                        debug!(link, "federation reply not sent: the bridge closed");
                    }
                });
            }
            FederationFrame::Publish { message, mut visited } => {
                if visited.last() != Some(&bridge.cluster) {
                    visited.push(bridge.cluster.clone());
                }
                if fabric.publish_from_bridge(link, bytes, &message) {
                    self.publish_out(&message, visited);
                }
            }
            FederationFrame::Reply { id, value, error } => {
                let waiter = self.take_waiting(&id, link, |_| true);
                match (waiter, error) {
                    (Some(w), Some(error)) => w.waiter.answer(Err(error)),
                    (Some(w), None) => w.waiter.answer(Ok(value.unwrap_or(Value::Null))),
                    (None, _) => self.metrics.fabric_dropped("stray_reply"),
                }
            }
        }
    }

    /// A `call` for another cluster or the reply to a call relayed for one, read on the
    /// bridge `link`, passed on as the text that came: only its routing header is parsed,
    /// the command, value or error are neither decoded nor encoded again. `false` when it
    /// is none of these (the caller decodes the frame and hands it to [`Self::on_frame`]).
    pub fn pass_through(self: &Arc<Self>, fabric: &Arc<FabricShared>, link: LinkId, bytes: &[u8]) -> bool {
        let Some(bridge) = self.bridge(link) else { return false };
        match sniff_str(bytes, b"kind") {
            // A call for this cluster runs here: decoded.
            Some(b"call") if sniff_str(bytes, b"destination") != Some(self.local.as_bytes()) => {
                let Ok(head) = serde_json::from_slice::<CallHead>(bytes) else { return false };
                // Exactly one work key (else decoded, and refused as misshapen).
                let mut works = WORK_KEYS
                    .iter()
                    .filter_map(|&key| top_level_raw(bytes, key.as_bytes()).map(|text| WorkText { key, text }));
                let (Some(work), None) = (works.next(), works.next()) else { return false };
                if head.destination == self.local {
                    return false;
                }
                self.relay_from(fabric, &bridge, head, work);
                true
            }
            Some(b"reply") => {
                let Ok(head) = serde_json::from_slice::<ReplyHead>(bytes) else { return false };
                match self.take_waiting(&head.id, link, |w| matches!(w, Waiter::Relay(_))) {
                    Some(Waiting { waiter: Waiter::Relay(relay), .. }) => {
                        relay.send(top_level_raw(bytes, b"value"), top_level_raw(bytes, b"error"));
                        true
                    }
                    // Never: only a relayed call's entry is taken.
                    Some(Waiting { waiter: Waiter::Task(reply), .. }) => {
                        drop(reply);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// The open bridge `link`, a frame read on it counted ([`Bridge::heard`]).
    fn bridge(&self, link: LinkId) -> Option<Bridge> {
        let bridge = self.state.lock().ok().and_then(|s| s.bridges.get(&link).cloned())?;
        bridge.heard.fetch_add(1, Ordering::Relaxed);
        Some(bridge)
    }

    /// The call `id` waiting on `link` whose waiter passes `wanted`, taken out of the map.
    fn take_waiting(&self, id: &str, link: LinkId, wanted: impl Fn(&Waiter) -> bool) -> Option<Waiting> {
        let mut waiting = self.waiting.lock().ok()?;
        match waiting.get(id) {
            Some(call) if call.via == link && wanted(&call.waiter) => waiting.remove(id),
            _ => None,
        }
    }

    /// A place for a call read on `bridge` (to serve here or relay on), or the 1006 that
    /// refuses it: one bridge may hold `max_in_flight_per_link` of the node's
    /// `max_in_flight` at most, so another cluster cannot take all of it.
    fn admit(&self, fabric: &FabricShared, bridge: &Bridge) -> Result<Admitted, RpcError> {
        let limit = fabric.limits.max_in_flight_per_link;
        if bridge.serving.fetch_add(1, Ordering::AcqRel) >= limit {
            bridge.serving.fetch_sub(1, Ordering::AcqRel);
            fabric.metrics.limit_exceeded("max_in_flight_per_link");
            let reason = format!(
                "cluster {}: serving {limit} calls for the bridge from {} ({}) already (max_in_flight_per_link)",
                self.local, bridge.node, bridge.cluster
            );
            return Err(RpcError::peer_overloaded(reason));
        }
        let slot = BridgeSlot(bridge.serving.clone());
        let Some(node) = fabric.metrics.admission().try_admit() else {
            fabric.metrics.limit_exceeded("max_in_flight");
            return Err(RpcError::peer_overloaded(format!("cluster {}: at its max_in_flight", self.local)));
        };
        Ok(Admitted { _node: node, _bridge: slot })
    }

    fn receive(&self, bridge: &Bridge, updates: &[SignedRouteUpdate]) {
        if updates.len() > MAX_UPDATES_PER_FRAME {
            self.metrics.route_rejected(RouteRejection::Malformed.as_str());
            warn!(peer_cluster = %bridge.cluster, peer = %bridge.node, updates = updates.len(),
                "federation: frame with more than {MAX_UPDATES_PER_FRAME} updates refused");
            return;
        }
        // Signatures are checked without the state's lock (cross-cluster calls need it to
        // pick their next bridge), against a copy of the keys, and once per distinct update.
        let Some(ring) = self.state.lock().ok().map(|state| state.core.key_ring()) else { return };
        let now = unix_now_ms();
        let mut seen = HashSet::new();
        let opened: Vec<_> = updates
            .iter()
            .filter(|u| seen.insert((u.key_id.as_str(), u.signature.as_str(), u.body.as_str())))
            .map(|u| u.open(&bridge.cluster, &ring, now / 1000))
            .collect();
        let Ok(mut state) = self.state.lock() else { return };
        let mut changed = false;
        for opened in opened {
            match state.core.accept(&bridge.cluster, opened, now) {
                Ok(c) => changed |= c,
                Err(refused) => {
                    self.metrics.route_rejected(refused.reason.as_str());
                    if refused.first {
                        warn!(peer_cluster = %bridge.cluster, peer = %bridge.node, reason = %refused.reason,
                            "federation: route update refused (logged once per reason; counted in mpreg_federation_route_rejected_total)");
                    }
                }
            }
        }
        if changed {
            Self::announce(&mut state);
        }
    }

    /// The best next hop toward `destination` and an open bridge to it, or why there is
    /// none (1005's reason).
    fn next_bridge(&self, destination: &str, visited: &[ClusterId], hops: u32) -> Result<(LinkId, Bridge), String> {
        let state = self.state.lock().map_err(|_| "federation state unavailable".to_owned())?;
        let route = state
            .core
            .table()
            .next_hop(destination, visited, hops, unix_now_ms())
            .map_err(|e| format!("cluster {}: {e}", self.local))?;
        // The bridge served by this thread when there is one (a lane): the call, and its
        // reply read on the same bridge, wake no other thread of this node.
        let here = std::thread::current().id();
        let mut next = state.bridges.iter().filter(|(_, b)| b.cluster == route.next_hop);
        let first = next.clone().next();
        next.find(|(_, b)| b.thread == here)
            .or(first)
            .map(|(id, b)| (*id, b.clone()))
            .ok_or_else(|| format!("cluster {}: no open bridge to {}", self.local, route.next_hop))
    }

    /// The clusters this node routes to now (advertised in its catalog), sorted.
    pub fn reachable(&self) -> Vec<ClusterId> {
        let mut clusters = self.nearest();
        clusters.sort();
        clusters
    }

    /// The clusters this node routes to now, nearest first (fewest clusters on the selected
    /// path, then by name).
    pub fn nearest(&self) -> Vec<ClusterId> {
        let Ok(state) = self.state.lock() else { return Vec::new() };
        let (table, now) = (state.core.table(), unix_now_ms());
        let mut routed: Vec<(usize, ClusterId)> = table
            .destinations()
            .into_iter()
            .filter_map(|d| table.select(d, &[], now).map(|r| (r.path.len(), d.clone())))
            .collect();
        routed.sort();
        routed.into_iter().map(|(_, d)| d).collect()
    }

    /// Whether a call to `destination` has a route now (planning: 1005 at once if not).
    pub fn route_to(&self, destination: &str) -> Result<(), String> {
        self.next_bridge(destination, &[], self.hop_budget).map(|_| ())
    }

    /// Runs `work` in cluster `destination` (from this node's own request: the full hop
    /// budget).
    pub async fn call_cluster(
        &self,
        destination: &str,
        work: Work,
        deadline: Option<Instant>,
    ) -> Result<Value, RpcError> {
        let timeout_ms = deadline.map(|d| super::link::millis_left(d, Instant::now()));
        let (key, text) = work.to_text();
        let (link, bridge, id, message) = self
            .call_frame(destination, Vec::new(), self.hop_budget, WorkText { key, text: &text }, timeout_ms)
            .map_err(RpcError::unreachable)?;
        let (reply, answer) = oneshot::channel();
        self.wait(&id, link, &bridge, deadline, Waiter::Task(reply)).map_err(|refused| refused.1)?;
        let _cleanup = Forget { bridges: self, id: &id };
        if bridge.sender.send(message).await.is_err() {
            return Err(RpcError::unreachable(format!("the bridge to {} ({}) closed", bridge.node, bridge.cluster)));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(RpcError::unreachable(format!("the bridge to {} closed before answering", bridge.node))),
        }
    }

    /// Relays a call for another cluster (`head`, then its work as JSON text) that came on
    /// `bridge`, if the node's max_in_flight admits it (else 1006).
    fn relay_from(&self, fabric: &FabricShared, bridge: &Bridge, head: CallHead, work: WorkText<'_>) {
        // Calls from other clusters count toward the in-flight limits.
        let permit = match self.admit(fabric, bridge) {
            Ok(permit) => permit,
            Err(error) => return refuse(fabric, bridge, &head.id, error),
        };
        let CallHead { id, destination, visited, hops_left, timeout_ms } = head;
        let back = Waiter::Relay(RelayBack {
            back: bridge.sender.clone(),
            parking: fabric.parking.clone(),
            id,
            _permit: permit,
        });
        self.relay(back, &destination, visited, hops_left, work, timeout_ms);
    }

    /// Sends a call for another cluster (`work` as JSON text) on toward `destination`
    /// from the link reader that read it, with no task: its reply is relayed back by
    /// `back` when it comes (or a 1005 when there is no next hop, or the bridge to it
    /// closes or is full).
    fn relay(
        &self,
        back: Waiter,
        destination: &str,
        visited: Vec<ClusterId>,
        hops: u32,
        work: WorkText<'_>,
        timeout_ms: Option<u64>,
    ) {
        let (link, next, id, message) = match self.call_frame(destination, visited, hops, work, timeout_ms) {
            Ok(call) => call,
            Err(reason) => return back.answer(Err(RpcError::unreachable(reason))),
        };
        // A peer's number: an overflowing one means no deadline (the TTL), never a panic.
        let deadline = timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
        if let Err(refused) = self.wait(&id, link, &next, deadline, back) {
            let (back, error) = *refused;
            return back.answer(Err(error));
        }
        // Bounded by the in-flight limits, not by the bytes of bulk frames queued before it.
        if next.sender.queue(message).is_err() {
            let reason = format!("the bridge to {} ({}) closed or is full", next.node, next.cluster);
            if let Some(w) = self.waiting.lock().ok().and_then(|mut w| w.remove(&id)) {
                w.waiter.answer(Err(RpcError::unreachable(reason)));
            }
        }
    }

    /// The next bridge toward `destination` and a `call` frame for it under a new id (this
    /// cluster added to `visited`, one hop fewer), or why there is none.
    fn call_frame(
        &self,
        destination: &str,
        mut visited: Vec<ClusterId>,
        hops: u32,
        work: WorkText<'_>,
        timeout_ms: Option<u64>,
    ) -> Result<(LinkId, Bridge, String, OutFrame), String> {
        let (link, bridge) = self.next_bridge(destination, &visited, hops)?;
        visited.push(self.local.clone());
        let id =
            format!("{}:{}:{:016x}", self.local, self.next_id.fetch_add(1, Ordering::Relaxed), rand::random::<u64>());
        let head = CallOut {
            role: "federation",
            kind: "call",
            id: &id,
            destination,
            visited: &visited,
            hops_left: hops.saturating_sub(1),
            timeout_ms,
        };
        let message = with_raw_fields(&head, &[(work.key, Some(work.text))]);
        Ok((link, bridge, id, message))
    }

    /// `waiter` gets the reply to the call `id` sent on `via` to `bridge`, or an error once
    /// `deadline` (else the call TTL) passes; refused (1006, the waiter handed back) when
    /// `max_waiting_calls` already wait.
    fn wait(
        &self,
        id: &str,
        via: LinkId,
        bridge: &Bridge,
        deadline: Option<Instant>,
        waiter: Waiter,
    ) -> Result<(), Box<(Waiter, RpcError)>> {
        let Ok(mut waiting) = self.waiting.lock() else {
            return Err(Box::new((waiter, RpcError::unreachable("federation state unavailable"))));
        };
        if waiting.len() >= self.max_waiting_calls {
            self.metrics.limit_exceeded("max_waiting_bridge_calls");
            let reason = format!(
                "cluster {}: {} calls already wait on bridges, the most this node allows",
                self.local, self.max_waiting_calls
            );
            return Err(Box::new((waiter, RpcError::peer_overloaded(reason))));
        }
        let (expires, own_deadline) = match deadline {
            Some(deadline) => (deadline, true),
            None => (Instant::now().checked_add(self.call_ttl).unwrap_or_else(Instant::now), false),
        };
        let on = format!("{} ({})", bridge.node, bridge.cluster);
        waiting.insert(id.to_owned(), Waiting { via, waiter, expires, own_deadline, on });
        Ok(())
    }

    /// The state to save ([`FederationCore::snapshot`], JSON).
    pub fn snapshot_bytes(&self) -> Option<Vec<u8>> {
        let state = self.state.lock().ok()?;
        serde_json::to_vec(&state.core.snapshot()).ok()
    }

    /// Restores a saved state at start: route records still valid, key chains that verify
    /// under the authorities pinned now, the epoch floor. How many records came back.
    pub fn restore(&self, bytes: &[u8]) -> Result<usize, String> {
        let snapshot: FederationSnapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut state = self.state.lock().map_err(|_| "federation state unavailable".to_owned())?;
        state.core.restore(&snapshot, unix_now_ms())
    }

    /// Why calls to `destination` go where they go (`avoid`: clusters to route around).
    pub fn explain(&self, destination: &str, avoid: &[ClusterId]) -> Option<Explanation> {
        self.state.lock().ok().map(|s| s.core.table().explain(destination, avoid, unix_now_ms()))
    }

    /// `GET /routes`: this cluster, its open bridges, every destination with its
    /// explanation, the route keys trusted, refusals by reason.
    pub fn describe(&self) -> Value {
        let Ok(state) = self.state.lock() else { return Value::Null };
        let now = unix_now_ms();
        let table = state.core.table();
        let routes: Vec<Explanation> = table.destinations().into_iter().map(|d| table.explain(d, &[], now)).collect();
        let bridges: Vec<Value> = state
            .bridges
            .iter()
            .map(|(link, b)| serde_json::json!({"link": link, "cluster": b.cluster, "node": b.node}))
            .collect();
        let rejected: BTreeMap<&str, u64> = state.core.rejections().counts().collect();
        serde_json::json!({
            "cluster_id": self.local,
            "bridges": bridges,
            "routes": routes,
            "keys": state.core.ring().describe(now / 1000),
            "rejected": rejected,
        })
    }
}

/// Answers the call `id` that came on `bridge` with `error` (a `reply` frame).
fn refuse(fabric: &FabricShared, bridge: &Bridge, id: &str, error: RpcError) {
    let _ = fabric.parking.send(&bridge.sender, reply_frame(id, None, Some(&encode(&error))));
}

/// Forgets a call's waiting entry however the call ends.
struct Forget<'a> {
    bridges: &'a Bridges,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.bridges.waiting.lock() {
            waiting.remove(self.id);
        }
    }
}

/// Runs work that crossed bridges to reach this cluster (from cluster `origin`), within
/// the caller's deadline: a command as a one-command request of this node (its routing may
/// send it to another node of the cluster), a queue operation on the queue's owner, a
/// cache `get` on this cluster's levels (L1–L3, never on to another cluster).
async fn run_here(
    fabric: &Arc<FabricShared>,
    cluster: &str,
    origin: &str,
    work: Work,
    deadline: Option<Instant>,
) -> Result<Value, RpcError> {
    let run = async {
        match work {
            Work::Command(command) => run_command_here(fabric, cluster, *command).await,
            Work::Queue(request) => fabric.queue_for_cluster(origin, *request).await,
            Work::Cache(request) => match fabric.cache.clone() {
                Some(cache) => crate::cache::cluster::serve_for_cluster(fabric, &cache, *request).await,
                None => Err(RpcError::unreachable(format!("cluster {cluster}: node {} has no cache", fabric.me.node))),
            },
        }
    };
    match deadline {
        Some(deadline) => tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), run)
            .await
            .map_err(|_| RpcError::unreachable(format!("cluster {cluster}: the caller's deadline passed")))?,
        None => run.await,
    }
}

/// Runs a command from another cluster as a one-command request of this node.
async fn run_command_here(fabric: &Arc<FabricShared>, cluster: &str, command: RpcCommand) -> Result<Value, RpcError> {
    let name = command.name.clone();
    let request = RpcRequest {
        u: format!("federation:{name}"),
        cmds: vec![command],
        return_intermediate_results: false,
        intermediate_result_callback_topic: None,
        include_execution_summary: false,
        debug_mode: false,
        timeout: None,
    };
    let routing = Routing::with_fabric(fabric.table.current(), fabric.clone(), Arc::from(cluster)).within_cluster();
    let plan = Plan::build(request, routing)?;
    let mut observer = NoObserver;
    let outcome = execute(plan, ReportOptions::default(), &mut observer).await?;
    Ok(outcome.r.get(&name).cloned().unwrap_or(Value::Null))
}

/// Reaching other clusters from any node of this one: over its own bridges, or through a
/// node of its cluster that bridges (a `cluster-call`). Used by commands, queue
/// operations and the cache's L4 alike.
impl FabricShared {
    /// How this node reaches cluster `cluster`: over its own bridges (`None`), else
    /// through the least loaded node of its cluster whose catalog says it routes there, or
    /// why not (1005's reason).
    pub fn cluster_route(&self, cluster: &str) -> Result<Option<NodeId>, String> {
        let own = self.bridges.as_ref().map(|b| b.route_to(cluster));
        if let Some(Ok(())) = own {
            return Ok(None);
        }
        let view = self.view.load();
        if let Some(node) = view.clusters.get(cluster).and_then(|nodes| nodes.iter().min_by_key(|n| self.load_of(n))) {
            return Ok(Some(node.clone()));
        }
        Err(match own {
            Some(Err(reason)) => reason,
            _ => format!("no route to cluster {cluster}: no node of cluster {} bridges to it", self.me.cluster_id),
        })
    }

    /// The other clusters this node reaches, nearest first: over its own bridges (`None`),
    /// then through the least loaded node of this cluster that advertises a route.
    pub fn clusters_reached(&self) -> Vec<(ClusterId, Option<NodeId>)> {
        let mut found: Vec<(ClusterId, Option<NodeId>)> =
            self.bridges.iter().flat_map(|b| b.nearest()).map(|c| (c, None)).collect();
        let view = self.view.load();
        let mut through: Vec<(&String, &Vec<String>)> = view.clusters.iter().collect();
        through.sort();
        for (cluster, nodes) in through {
            let via = nodes.iter().min_by_key(|n| self.load_of(n));
            if let Some(node) = via.filter(|_| !found.iter().any(|(c, _)| c == cluster)) {
                found.push((cluster.clone(), Some(node.clone())));
            }
        }
        found
    }

    /// Runs `work` in cluster `cluster` over this node's bridges (`via: None`) or those of
    /// `via`; the error is the one the destination gave, or 1005 when the route or a
    /// bridge went away.
    pub async fn run_in_cluster(
        &self,
        cluster: &str,
        via: Option<&str>,
        work: Work,
        deadline: Option<Instant>,
    ) -> Result<Value, RpcError> {
        let Some(node) = via else {
            return match self.bridges.clone() {
                Some(bridges) => bridges.call_cluster(cluster, work, deadline).await,
                None => Err(RpcError::unreachable(format!("cluster={cluster}: this node has no federation bridges"))),
            };
        };
        let details = |reason: String| format!("cluster={cluster} via={node}: {reason}");
        match self.cluster_call(node, cluster, work, deadline).await {
            CallOutcome::Ok { value } => Ok(value),
            CallOutcome::Refused { error } => Err(error),
            CallOutcome::Failed { error, node } => {
                Err(RpcError::execution_failed(details(format!("failed on {node}: {error}"))))
            }
            CallOutcome::NotFound { node } => {
                Err(RpcError::unreachable(details(format!("{node} serves no cluster calls"))))
            }
            CallOutcome::Unreachable { reason } => Err(RpcError::unreachable(details(reason))),
            CallOutcome::Overloaded { reason } => Err(RpcError::peer_overloaded(details(reason))),
        }
    }

    /// Runs `work` in the first of `clusters` that has it: each is asked in turn; one that
    /// does not export (or have) it answers 1001, one out of reach 1005, and the next is
    /// asked. Any other answer is the work's. None ran it: 1005 if a cluster was out of
    /// reach (it may have it), else `none`.
    pub async fn ask_clusters(
        &self,
        clusters: &[(ClusterId, Option<NodeId>)],
        work: Work,
        deadline: Option<Instant>,
        none: RpcError,
    ) -> Result<Value, RpcError> {
        let mut unreachable = None;
        for (cluster, via) in clusters {
            match self.run_in_cluster(cluster, via.as_deref(), work.clone(), deadline).await {
                Err(e) if e.kind() == Some(ErrorCode::NotFound) => {}
                Err(e) if e.kind() == Some(ErrorCode::Unreachable) => unreachable = Some(e),
                other => return other,
            }
        }
        Err(unreachable.unwrap_or(none))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::trust::Authority;
    use crate::outbox::{Outbox, OutboxReceiver};

    /// A bridge peer served by the test's thread.
    fn peer<'a>(cluster: &'a str, node: &'a str) -> BridgePeer<'a> {
        BridgePeer { cluster, node, thread: std::thread::current().id() }
    }

    /// A link's queue of 16 frames, bounded in bytes far beyond what a test queues.
    fn link_queue() -> (Outbox, OutboxReceiver) {
        Outbox::channel(16, 1 << 30)
    }

    /// Bridges of cluster `a` pinning `b` and `c`, and the cores of `b` and `c` (which pin
    /// `a`), each with its own authority.
    fn clusters() -> (Bridges, FederationCore, FederationCore, Arc<Metrics>, BridgeConfig) {
        let now_s = unix_now_ms() / 1000;
        let authorities: BTreeMap<&str, Authority> =
            ["a", "b", "c"].into_iter().map(|n| (n, Authority::generate())).collect();
        let metrics = Arc::new(Metrics::default());
        let config = BridgeConfig {
            allowed: ["b".to_string(), "c".to_string()].into(),
            pinned: [
                ("b".to_string(), authorities["b"].public_key()),
                ("c".to_string(), authorities["c"].public_key()),
            ]
            .into(),
            signer: RouteSigner::first(&authorities["a"], "a", now_s),
            federation: FederationConfig::new("a"),
            announce_interval: Duration::from_secs(5),
            hop_budget: 4,
            route_key: None,
            exports: Exports::default(),
            call_ttl: Duration::from_secs(60),
            max_waiting_calls: 3,
        };
        let bridges = Bridges::new(config.clone(), metrics.clone());
        let neighbour = |name: &str| {
            let mut ring = RouteKeyRing::default();
            ring.pin("a", authorities["a"].public_key());
            let mut core = FederationCore::new(
                FederationConfig::new(name),
                RouteSigner::first(&authorities[name], name, now_s),
                ring,
            );
            core.link_up("a");
            bridges.state.lock().unwrap().core.learn_keys(name, core.own_chain()).unwrap();
            core
        };
        let (b, c) = (neighbour("b"), neighbour("c"));
        (bridges, b, c, metrics, config)
    }

    fn updates_for_a(core: &mut FederationCore) -> Vec<SignedRouteUpdate> {
        core.outgoing(unix_now_ms()).into_iter().find(|(n, _)| n == "a").map(|(_, u)| u).unwrap()
    }

    #[test]
    fn refused_updates_are_counted_by_reason_and_routes_follow_the_bridge() {
        let (bridges, mut b, mut c, metrics, config) = clusters();
        assert_eq!(bridges.authority_for("b").map(|_| ()), Ok(()));
        assert!(bridges.authority_for("x").unwrap_err().contains("not in this node's federation allowed_clusters"));
        let (sender, mut queue) = link_queue();
        bridges.bridge_up(7, peer("b", "b1"), sender.clone(), Arc::default());
        // The bridge got our key chain first.
        let first = queue.try_recv().unwrap();
        let first: Value = serde_json::from_slice(&first.bytes).unwrap();
        assert_eq!((first["role"].as_str(), first["kind"].as_str()), (Some("federation"), Some("keys")));
        let bridge = bridges.bridge(7).unwrap();

        let valid = updates_for_a(&mut b);
        let mut forged = valid[0].clone();
        assert!(forged.body.contains("\"ttl_ms\":30000"), "{}", forged.body);
        forged.body = forged.body.replace("\"ttl_ms\":30000", "\"ttl_ms\":300000");
        let unsigned = SignedRouteUpdate { signature: String::new(), ..valid[0].clone() };
        let from_c = updates_for_a(&mut c);
        bridges.receive(&bridge, &[forged, unsigned]);
        bridges.receive(&bridge, &from_c); // c's updates delivered by b
        assert_eq!(bridges.route_to("b").unwrap_err(), "cluster a: no route to cluster b");
        bridges.receive(&bridge, &valid);
        assert_eq!(bridges.route_to("b"), Ok(()));
        assert_eq!(bridges.reachable(), ["b"]);
        bridges.receive(&bridge, &valid); // replayed
        bridges.receive(&bridge, &vec![valid[0].clone(); MAX_UPDATES_PER_FRAME + 1]); // refused whole

        let text = metrics.render("n");
        for reason in ["bad_signature", "unsigned", "wrong_advertiser", "stale_epoch", "malformed"] {
            let line = format!("mpreg_federation_route_rejected_total{{node=\"n\",reason=\"{reason}\"}} 1");
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        assert_eq!(bridges.describe()["rejected"]["stale_epoch"], 1);
        assert_eq!(bridges.explain("b", &[]).unwrap().selected, Some(vec!["a".to_string(), "b".to_string()]));
        // 100 copies of one forged update in a frame: its signature is checked once.
        let mut copied = valid[0].clone();
        copied.body = copied.body.replace("\"ttl_ms\":30000", "\"ttl_ms\":200000");
        bridges.receive(&bridge, &vec![copied; 100]);
        let line = "mpreg_federation_route_rejected_total{node=\"n\",reason=\"bad_signature\"} 2";
        assert!(metrics.render("n").contains(line), "{line} not in\n{}", metrics.render("n"));

        // A restarted node restores the route and b's keys from the snapshot: routed as
        // soon as a bridge to b is back, before b announces anything.
        let saved = bridges.snapshot_bytes().unwrap();
        let restarted = Bridges::new(config, metrics.clone());
        assert_eq!(restarted.restore(&saved), Ok(1));
        assert_eq!(restarted.route_to("b").unwrap_err(), "cluster a: no open bridge to b");
        let (sender, _queue) = link_queue();
        restarted.bridge_up(8, peer("b", "b1"), sender, Arc::default());
        assert_eq!(restarted.route_to("b"), Ok(()));
        assert!(restarted.restore(b"not json").is_err());

        // The last bridge to b closes: its routes go at once.
        bridges.link_closed(7);
        assert!(bridges.route_to("b").is_err());
        assert!(bridges.reachable().is_empty());
    }

    /// The reply frame a relayed call's caller got on its bridge back: (code, details).
    fn relayed_error(queue: &mut OutboxReceiver) -> (u16, String) {
        let reply: Value = serde_json::from_slice(&queue.try_recv().unwrap().bytes).unwrap();
        assert_eq!(reply["kind"], "reply", "{reply}");
        let error = &reply["error"];
        (error["code"].as_u64().unwrap() as u16, error["details"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn a_call_leaves_on_the_bridge_its_own_thread_serves_and_a_nodes_lanes_share_one_in_flight_count() {
        let (bridges, mut b, _c, _metrics, _config) = clusters();
        let other = std::thread::spawn(|| std::thread::current().id()).join().unwrap();
        let (to_b1, _b1) = link_queue();
        let (lane, _lane) = link_queue();
        let (to_b2, _b2) = link_queue();
        // b1's bridge is served by another thread, its lane by this one; b2 by another.
        bridges.bridge_up(1, BridgePeer { cluster: "b", node: "b1", thread: other }, to_b1, Arc::default());
        bridges.bridge_up(2, peer("b", "b1"), lane, Arc::default());
        bridges.bridge_up(3, BridgePeer { cluster: "b", node: "b2", thread: other }, to_b2, Arc::default());
        bridges.receive(&bridges.bridge(1).unwrap(), &updates_for_a(&mut b));
        let next = |bridges: &Bridges| bridges.next_bridge("b", &[], 4).map(|(link, _)| link);
        assert_eq!(next(&bridges), Ok(2), "this thread's lane");
        // A thread that serves none of them takes the first.
        let from_elsewhere = std::thread::scope(|scope| scope.spawn(|| next(&bridges)).join().unwrap());
        assert_eq!(from_elsewhere, Ok(1));
        // The lane closes: this thread takes the first too.
        bridges.link_closed(2);
        assert_eq!(next(&bridges), Ok(1));
        // b1's bridges share one max_in_flight_per_link count; b2 has its own.
        let (lane, _lane) = link_queue();
        bridges.bridge_up(4, peer("b", "b1"), lane, Arc::default());
        let serving = |link| bridges.bridge(link).unwrap().serving;
        assert!(Arc::ptr_eq(&serving(1), &serving(4)));
        assert!(!Arc::ptr_eq(&serving(1), &serving(3)));
        // What the fabric bounds (MAX_BRIDGE_LINKS_PER_NODE): the links per node.
        assert_eq!((bridges.links_to("b", "b1"), bridges.links_to("b", "b2"), bridges.links_to("c", "b1")), (2, 1, 0));
    }

    #[tokio::test]
    async fn calls_waiting_on_a_silent_bridge_are_bounded_in_time_and_number() {
        let (bridges, mut b, _c, metrics, _config) = clusters();
        // b1 is up and routed to, but never answers anything sent to it.
        let (to_b1, mut b1_reads) = link_queue();
        bridges.bridge_up(7, peer("b", "b1"), to_b1.clone(), Arc::default());
        let bridge = bridges.bridge(7).unwrap();
        bridges.receive(&bridge, &updates_for_a(&mut b));
        assert_eq!(bridges.route_to("b"), Ok(()));
        // Calls relayed for another cluster (the caller's bridge back is `back`), each
        // holding an in-flight slot: no deadline, 1 s, 100 s left.
        let (back, mut caller) = link_queue();
        let admission = metrics.admission().clone();
        let relay = |id: &str, timeout_ms: Option<u64>| {
            let waiter = Waiter::Relay(RelayBack {
                back: back.clone(),
                parking: Parking::new(16, metrics.clone()),
                id: id.into(),
                _permit: Admitted {
                    _node: admission.try_admit().unwrap(),
                    _bridge: BridgeSlot(Arc::new(AtomicUsize::new(1))),
                },
            });
            let command = encode(&RpcCommand::new(id, "echo", vec![Value::from(1)]));
            bridges.relay(waiter, "b", vec!["x".into()], 4, WorkText { key: "command", text: &command }, timeout_ms);
        };
        relay("ttl", None);
        relay("short", Some(1_000));
        relay("long", Some(100_000));
        assert_eq!(admission.in_flight(), 3);
        // A fourth is refused at once (1006) and frees its slot.
        relay("fourth", None);
        assert_eq!(relayed_error(&mut caller).0, 1006);
        assert_eq!(admission.in_flight(), 3);
        assert_eq!(metrics.limit_exceeded_count("max_waiting_bridge_calls"), 1);
        let calls = std::iter::from_fn(|| b1_reads.try_recv().ok())
            .filter(|f| serde_json::from_slice::<Value>(&f.bytes).unwrap()["kind"] == "call")
            .count();
        assert_eq!(calls, 3);

        let start = Instant::now();
        bridges.expire_calls(start);
        assert!(caller.try_recv().is_err(), "nothing is due yet");
        // The own deadline passes: 1004; then the TTL: 1005 with the reason; each frees
        // its slot.
        bridges.expire_calls(start + Duration::from_secs(2));
        assert_eq!(relayed_error(&mut caller).0, 1004);
        assert_eq!(admission.in_flight(), 2);
        bridges.expire_calls(start + Duration::from_secs(61));
        let (code, details) = relayed_error(&mut caller);
        assert_eq!(code, 1005);
        assert!(details.contains("no reply from b1 (b) within 60000 ms"), "{details}");
        assert_eq!(admission.in_flight(), 1);
        bridges.expire_calls(start + Duration::from_secs(101));
        assert_eq!(relayed_error(&mut caller).0, 1004);
        assert_eq!(admission.in_flight(), 0);
        assert!(bridges.waiting.lock().unwrap().is_empty());

        // This node's own call without a deadline: answered 1005 once the TTL passes.
        let call = bridges.call_cluster("b", Work::Command(Box::new(RpcCommand::new("own", "echo", vec![]))), None);
        let expire = async {
            while bridges.waiting.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            bridges.expire_calls(Instant::now() + Duration::from_secs(61));
        };
        let (result, ()) = tokio::join!(call, expire);
        assert_eq!(result.unwrap_err().code, 1005);
        assert!(bridges.waiting.lock().unwrap().is_empty());
    }

    /// The clusters each federation frame in `queue` names as visited, per publish.
    fn publishes(queue: &mut OutboxReceiver) -> Vec<Vec<String>> {
        std::iter::from_fn(|| queue.try_recv().ok())
            .map(|f| serde_json::from_slice::<Value>(&f.bytes).unwrap())
            .filter(|f| f["kind"] == "publish")
            .map(|f| serde_json::from_value(f["visited"].clone()).unwrap())
            .collect()
    }

    #[test]
    fn publishes_cross_under_the_export_list_once_per_neighbour_and_never_back() {
        let (bridges, ..) = clusters();
        let list = crate::federation::policy::ExportList { topics: vec!["news.#".into()], ..Default::default() };
        bridges.state.lock().unwrap().exports = Exports::new(&list).unwrap();
        let channel = || link_queue();
        let ((to_b1, mut b1), (to_b2, mut b2), (to_c1, mut c1)) = (channel(), channel(), channel());
        bridges.bridge_up(1, peer("b", "b1"), to_b1, Arc::default());
        bridges.bridge_up(2, peer("b", "b2"), to_b2, Arc::default());
        bridges.bridge_up(3, peer("c", "c1"), to_c1, Arc::default());
        let message = |topic: &str| PubSubMessage {
            topic: topic.into(),
            payload: Value::from(1),
            timestamp: 0.0,
            message_id: format!("m-{topic}"),
            publisher: "a1".into(),
            headers: Default::default(),
            routing_path: None,
            current_hop: None,
        };
        // Published in a: one copy per neighbour cluster (b1 or b2, not both).
        bridges.publish_out(&message("news.x"), Vec::new());
        let to_b = [publishes(&mut b1), publishes(&mut b2)].concat();
        assert_eq!(to_b, [vec!["a".to_string()]]);
        assert_eq!(publishes(&mut c1), [vec!["a".to_string()]]);
        // Not exported: nothing crosses.
        bridges.publish_out(&message("secret.x"), Vec::new());
        assert!([publishes(&mut b1), publishes(&mut b2), publishes(&mut c1)].iter().all(Vec::is_empty));
        // Came from c: on to b only; from b and c, or past the hop budget (4): nowhere.
        bridges.publish_out(&message("news.y"), vec!["c".into()]);
        assert_eq!([publishes(&mut b1), publishes(&mut b2)].concat(), [vec!["c".to_string(), "a".to_string()]]);
        assert!(publishes(&mut c1).is_empty());
        bridges.publish_out(&message("news.z"), vec!["b".into(), "c".into()]);
        bridges.publish_out(&message("news.w"), vec!["x".into(), "y".into(), "z".into(), "w".into()]);
        assert!([publishes(&mut b1), publishes(&mut b2), publishes(&mut c1)].iter().all(Vec::is_empty));
    }

    fn queue_work(op: &str, queue: Option<&str>) -> Work {
        let mut frame = serde_json::json!({"role": "queue", "u": "q1", "op": op, "payload": {"n": 1}});
        if let Some(queue) = queue {
            frame["queue"] = Value::from(queue);
        }
        Work::Queue(Box::new(serde_json::from_value(frame).unwrap()))
    }

    fn cache_work(op: &str, namespace: &str) -> Work {
        let frame = serde_json::json!({"role": "cache", "u": "c1", "op": op, "namespace": namespace, "key": "k"});
        Work::Cache(Box::new(serde_json::from_value(frame).unwrap()))
    }

    #[test]
    fn only_sends_stats_and_cache_gets_cross_and_only_what_is_exported_runs() {
        let (bridges, ..) = clusters();
        let list = crate::federation::policy::ExportList {
            functions: vec!["echo".into()],
            queues: vec!["jobs.#".into()],
            cache: vec!["shared".into()],
            ..Default::default()
        };
        bridges.state.lock().unwrap().exports = Exports::new(&list).unwrap();
        let code = |r: Result<(), RpcError>| r.map_err(|e| (e.code, e.details_text()));
        for work in [queue_work("send", Some("jobs")), queue_work("stats", Some("jobs.x")), cache_work("get", "shared")]
        {
            assert_eq!(code(work.check().and_then(|()| bridges.exported(&work))), Ok(()), "{work:?}");
        }
        // Ops that hold leases, subscriptions or change queues, and cache writes, never cross.
        for op in ["receive", "ack", "nack", "subscribe", "create", "delete", "redrive", "bind", "list"] {
            let (c, details) = code(queue_work(op, Some("jobs")).check()).unwrap_err();
            assert_eq!(c, 1002, "{op}: {details}");
            assert!(details.contains("does not cross clusters"), "{details}");
        }
        assert_eq!(code(queue_work("send", None).check()).unwrap_err().0, 1002, "a send names its queue");
        for op in ["put", "delete", "incr", "cas", "invalidate", "stats"] {
            assert_eq!(code(cache_work(op, "shared").check()).unwrap_err().0, 1002, "{op}");
        }
        // Not in the export list: 1001 naming the cluster, the list and the name.
        let (c, details) = code(bridges.exported(&queue_work("send", Some("private")))).unwrap_err();
        assert_eq!(c, 1001);
        assert!(details.contains("cluster a does not export queue private") && details.contains("exports.queues"));
        let (c, details) = code(bridges.exported(&cache_work("get", "users"))).unwrap_err();
        assert_eq!(c, 1001);
        assert!(details.contains("does not export cache namespace users"), "{details}");
        let command = Work::Command(Box::new(RpcCommand::new("r", "add", vec![])));
        assert!(code(bridges.exported(&command)).unwrap_err().1.contains("does not export add"));
        // A reload that drops the queues shares none of them any more.
        bridges.set_policies(ImportPolicies::default(), ExportPolicies::default(), Exports::default());
        assert_eq!(code(bridges.exported(&queue_work("send", Some("jobs")))).unwrap_err().0, 1001);
    }

    #[test]
    fn queue_and_cache_calls_are_framed_under_their_own_key_and_misshapen_ones_refused() {
        let call = |work: Work| {
            let frame = PeerFrame::Federation(FederationFrame::Call {
                id: "a:1".into(),
                destination: "c".into(),
                visited: vec!["a".into()],
                hops_left: 3,
                work,
                timeout_ms: Some(500),
            });
            let json = serde_json::to_value(&frame).unwrap();
            assert_eq!(serde_json::from_value::<PeerFrame>(json.clone()).unwrap(), frame);
            json
        };
        let json = call(queue_work("send", Some("jobs")));
        assert_eq!((json["queue"]["op"].as_str(), json["queue"]["queue"].as_str()), (Some("send"), Some("jobs")));
        assert!(json.get("command").is_none() && json.get("cache").is_none());
        let json = call(cache_work("get", "shared"));
        assert_eq!(json["cache"]["namespace"], "shared");
        // Misshapen: no work, a work of the wrong shape, an unknown key: not a frame.
        let base = serde_json::json!({"role": "federation", "kind": "call", "id": "x", "destination": "c",
            "visited": ["a"], "hops_left": 1});
        let with = |key: &str, value: Value| {
            let mut frame = base.clone();
            frame[key] = value;
            serde_json::from_value::<PeerFrame>(frame)
        };
        assert!(serde_json::from_value::<PeerFrame>(base.clone()).is_err(), "a call carries work");
        assert!(with("queue", Value::from(5)).is_err());
        assert!(with("queue", serde_json::json!({"u": "q", "queue": "jobs"})).is_err(), "no op");
        assert!(with("cache", serde_json::json!({"u": "c", "op": "get", "key": 7})).is_err());
        assert!(with("mystery", serde_json::json!({})).is_err());
        // A queue send crossing a cluster's internal hop (`cluster-call`) has the same shape.
        let body = super::super::wire::FabricBody::ClusterCall {
            cluster: "c".into(),
            work: queue_work("stats", Some("jobs")),
            timeout_ms: None,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!((json["kind"].as_str(), json["queue"]["op"].as_str()), (Some("cluster-call"), Some("stats")));
        assert_eq!(serde_json::from_value::<super::super::wire::FabricBody>(json).unwrap(), body);
    }

    #[tokio::test]
    async fn a_queue_send_waiting_on_a_bridge_that_closes_fails_at_once_with_1005() {
        let (bridges, mut b, _c, _metrics, _config) = clusters();
        let (to_b1, mut b1_reads) = link_queue();
        bridges.bridge_up(7, peer("b", "b1"), to_b1.clone(), Arc::default());
        let bridge = bridges.bridge(7).unwrap();
        bridges.receive(&bridge, &updates_for_a(&mut b));
        // No route to an unknown cluster: 1005 at once, nothing sent.
        let nowhere = bridges.call_cluster("z", queue_work("send", Some("jobs")), None).await.unwrap_err();
        assert_eq!(nowhere.code, 1005);
        assert!(nowhere.details_text().contains("no route to cluster z"), "{nowhere:?}");
        let send = bridges.call_cluster("b", queue_work("send", Some("jobs")), None);
        let cut = async {
            // The send is on the bridge (its frame written), unanswered: cut it.
            loop {
                match b1_reads.try_recv() {
                    Ok(f) if serde_json::from_slice::<Value>(&f.bytes).unwrap()["kind"] == "call" => break,
                    _ => tokio::task::yield_now().await,
                }
            }
            bridges.link_closed(7);
        };
        let (result, ()) = tokio::join!(send, cut);
        let error = result.unwrap_err();
        assert_eq!(error.code, 1005);
        assert!(error.details_text().contains("closed before the call was answered"), "{error:?}");
        assert!(bridges.waiting.lock().unwrap().is_empty());
    }

    /// The fabric of node a1 of cluster `a`, bridged by `bridges`.
    fn fabric_of_a1(bridges: &Arc<Bridges>) -> FabricShared {
        let me = crate::fabric::wire::NodeInfo {
            node: "a1".into(),
            instance_id: "i".into(),
            cluster_id: "a".into(),
            url: "ws://a1".into(),
        };
        FabricShared::new(me, 4, crate::registry::TableHandle::default(), Default::default(), Default::default())
            .with_bridges(Some(bridges.clone()))
    }

    #[tokio::test]
    async fn a_call_for_another_cluster_and_its_reply_pass_through_as_text() {
        let (bridges, _b, mut c, _metrics, _config) = clusters();
        let bridges = Arc::new(bridges);
        let fabric = Arc::new(fabric_of_a1(&bridges));
        let channel = || link_queue();
        let ((to_b1, mut b1), (to_c1, mut c1)) = (channel(), channel());
        let heard = Arc::new(AtomicU64::new(0));
        bridges.bridge_up(1, peer("b", "b1"), to_b1, heard.clone());
        bridges.bridge_up(2, peer("c", "c1"), to_c1.clone(), Arc::default());
        let from_c1 = bridges.bridge(2).unwrap();
        bridges.receive(&from_c1, &updates_for_a(&mut c));
        let drain = |queue: &mut OutboxReceiver| while queue.try_recv().is_ok() {};
        drain(&mut b1);
        drain(&mut c1);

        // b1 sends a call for c: it goes on to c1 with its command exactly as it came.
        let command =
            String::from_utf8(encode(&RpcCommand::new("r", "echo", vec![serde_json::json!({"d": [1, "}"]})]))).unwrap();
        let call = format!(
            r#"{{"role":"federation","kind":"call","id":"b:1","destination":"c","visited":["b"],"hops_left":3,"command": {command} ,"timeout_ms":5000}}"#
        );
        assert!(fabric.pass_through(1, call.as_bytes()));
        // Counted as heard on b1's bridge: the fabric closes only a silent one.
        assert_eq!(heard.load(Ordering::Relaxed), 1);
        bridges.on_frame(&fabric, 1, FederationFrame::Keys { chain: Vec::new() }, 0);
        assert_eq!(heard.load(Ordering::Relaxed), 2);
        let sent = c1.try_recv().unwrap();
        assert!(std::str::from_utf8(&sent.bytes).unwrap().contains(&format!(r#""command":{command}}}"#)));
        let Ok(PeerFrame::Federation(FederationFrame::Call {
            id,
            destination,
            visited,
            hops_left,
            work: Work::Command(parsed),
            timeout_ms,
        })) = PeerFrame::decode(&sent.bytes)
        else {
            panic!("not a call: {sent:?}");
        };
        assert_eq!(
            (destination.as_str(), visited, hops_left, timeout_ms),
            ("c", vec!["b".into(), "a".into()], 2, Some(5000))
        );
        assert_eq!(encode(&*parsed), command.as_bytes());

        // c1's reply goes back to b1 under b1's id, its value as it came.
        let reply = format!(r#"{{"role":"federation","kind":"reply","id":"{id}","value":{{"n": [1.5, "x"]}}}}"#);
        assert!(fabric.pass_through(2, reply.as_bytes()));
        let back = b1.try_recv().unwrap();
        assert_eq!(
            std::str::from_utf8(&back.bytes).unwrap(),
            r#"{"role":"federation","kind":"reply","id":"b:1","value":{"n": [1.5, "x"]}}"#
        );
        assert!(bridges.waiting.lock().unwrap().is_empty());

        // Decoded instead: a second reply (no call waits), a call for this cluster, a call
        // on a link that is no bridge, anything else.
        assert!(!fabric.pass_through(2, reply.as_bytes()));
        assert!(!fabric.pass_through(1, call.replace(r#""destination":"c""#, r#""destination":"a""#).as_bytes()));
        assert!(!fabric.pass_through(9, call.as_bytes()));
        assert!(!fabric.pass_through(1, br#"{"role":"federation","kind":"keys","chain":[]}"#));
        assert!(!fabric.pass_through(1, br#"{"role":"federation","kind":"call","id":5}"#));
        // A call carrying two works (or none) is not passed on either: decoded, and refused.
        let two = call.replace(r#""timeout_ms""#, r#""queue":{"u":"q","op":"send","queue":"jobs"},"timeout_ms""#);
        assert!(!fabric.pass_through(1, two.as_bytes()));
        assert!(!fabric.pass_through(1, call.replace(r#""command""#, r#""mystery""#).as_bytes()));
        assert!(c1.try_recv().is_err() && b1.try_recv().is_err());

        // A queue send for c passes through under its own key, as the text that came.
        let queue = r#"{"u":"q","op":"send","queue":"jobs","payload":{"n": 1}}"#;
        let send = call.replace(&format!(r#""command": {command} "#), &format!(r#""queue":{queue}"#));
        assert!(fabric.pass_through(1, send.as_bytes()));
        let sent = String::from_utf8(c1.try_recv().unwrap().bytes.to_vec()).unwrap();
        assert!(sent.contains(&format!(r#""queue":{queue}}}"#)) && !sent.contains("command"), "{sent}");
    }

    #[tokio::test]
    async fn one_bridge_holds_at_most_max_in_flight_per_link_calls() {
        let (bridges, _b, mut c, metrics, _config) = clusters();
        let bridges = Arc::new(bridges);
        let limits = crate::fabric::LinkLimits { max_in_flight_per_link: 2, ..Default::default() };
        let fabric = Arc::new(fabric_of_a1(&bridges).with_metrics(metrics.clone()).with_limits(limits));
        let ((to_b1, mut b1), (to_c1, mut c1), (to_b2, mut b2)) = (link_queue(), link_queue(), link_queue());
        bridges.bridge_up(1, peer("b", "b1"), to_b1, Arc::default());
        bridges.bridge_up(2, peer("c", "c1"), to_c1.clone(), Arc::default());
        bridges.bridge_up(3, peer("b", "b2"), to_b2, Arc::default());
        bridges.receive(&bridges.bridge(2).unwrap(), &updates_for_a(&mut c));
        let drain = |queue: &mut OutboxReceiver| while queue.try_recv().is_ok() {};
        for queue in [&mut b1, &mut c1, &mut b2] {
            drain(queue);
        }
        // Calls for c that c1 never answers: b1 may have two waiting, not a third.
        let call = |id: &str| {
            let command = String::from_utf8(encode(&RpcCommand::new("r", "echo", vec![Value::from(1)]))).unwrap();
            format!(
                r#"{{"role":"federation","kind":"call","id":"{id}","destination":"c","visited":["b"],"hops_left":3,"command":{command},"timeout_ms":60000}}"#
            )
        };
        for (link, id) in [(1, "b:1"), (1, "b:2"), (1, "b:3"), (3, "b2:1")] {
            assert!(fabric.pass_through(link, call(id).as_bytes()));
        }
        let (code, details) = relayed_error(&mut b1);
        assert_eq!(code, 1006, "{details}");
        assert!(details.contains("max_in_flight_per_link") && details.contains("b1 (b)"), "{details}");
        assert!(b1.try_recv().is_err(), "only the third call was refused");
        assert_eq!(metrics.limit_exceeded_count("max_in_flight_per_link"), 1);
        // b2 is another bridge, with its own share: its call went on to c1.
        assert!(b2.try_recv().is_err(), "b2's call was not refused");
        assert_eq!(bridges.waiting.lock().unwrap().len(), 3);
        assert_eq!(metrics.admission().in_flight(), 3);
    }

    #[test]
    fn frames_carry_role_federation_and_round_trip() {
        let call = PeerFrame::Federation(FederationFrame::Call {
            id: "a:1".into(),
            destination: "c".into(),
            visited: vec!["a".into()],
            hops_left: 3,
            work: Work::Command(Box::new(RpcCommand::new("x", "echo", vec![Value::from(1)]))),
            timeout_ms: Some(500),
        });
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(json["role"], "federation");
        assert_eq!(json["kind"], "call");
        assert_eq!(serde_json::from_value::<PeerFrame>(json).unwrap(), call);
        let reply = PeerFrame::Federation(FederationFrame::Reply {
            id: "a:1".into(),
            value: None,
            error: Some(RpcError::unreachable("no route")),
        });
        let json = serde_json::to_value(&reply).unwrap();
        assert!(json.get("value").is_none());
        assert_eq!(serde_json::from_value::<PeerFrame>(json).unwrap(), reply);
    }
}
