//! Peer links: outbound websockets we dial, and the shared state the request path uses to
//! reach other nodes without a mailbox round trip.
//!
//! A link carries [`PeerFrame`]s both ways, whichever side dialled. Outbound links are a
//! tokio-tungstenite socket with a reader and a writer task; inbound links are ordinary
//! [`crate::connection::Connection`]s that spoke a peer frame. Either way, sending is
//! pushing an [`OutFrame`] into the link's bounded queue.
//!
//! Hot path: a remote call reads the routing snapshot ([`FabricView`], swapped by the
//! FabricGossip actor on every change), registers a pending reply, and pushes the frame
//! straight into the link's queue; the link's reader resolves the reply. Gossip and
//! lifecycle frames go to the FabricGossip actor.
//!
//! Link-bound frames (DESIGN.md §8, "Trust"):
//! - A `fabric-message` is routed here only if it arrived on an admitted link (handshake
//!   complete); on any other link it goes to the actor, which processes it after the
//!   handshake frames that preceded it, or drops it.
//! - A reply resolves a pending call only if it arrived on the link the call left on.
//!   Replies retrace the call's path: a forwarding node remembers, per forwarded call,
//!   the link it came from and the link it went on (`ForwardTable`, bounded, cleaned on
//!   reply, link close and expiry); the serving node answers on the link the call
//!   arrived on.
//! - Calls served for other nodes count in the node's in-flight gauge, at most
//!   `max_in_flight_per_link` per link (beyond that, or past the node-wide
//!   `max_in_flight`: `Overloaded`, which the caller's client sees as 1006), and are
//!   cancelled when their link closes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Recipient;
use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use super::queue_sessions::QueueSessions;
use super::trust::Credentials;
use super::wire::{CallOutcome, FabricBody, FabricMessage, NodeId, NodeInfo, PeerFrame};
use super::{CloseLink, FabricGossip, LinkClosed, LinkOpened, PeerFrameReceived};
use crate::cache::LocalCache;
use crate::discovery::log::CatalogLog;
use crate::function::{CallArgs, FunctionIdentity};
use crate::mailbox::{MailboxShares, MailboxTicket};
use crate::metrics::{self, Metrics};
use crate::outbox::Outbox;
use crate::protocol::{encode, sniff_role, FrameKind, PubSubMessage};
use crate::pubsub::{self, OutFrame, PubSub};
use crate::queue::Queue;
use crate::registry::TableHandle;
use crate::supervisor::Slot;
use serde_json::Value;

/// The close code of a link closed on purpose by a running fabric (a silent link to a
/// suspect, a refused or departed peer): the peer knows the closer is alive and does not
/// suspect it for the close. Any other end of a link — a crash, a reset, a fabric
/// stopping — suspects the node at once. Without it, a node resumed after a pause (SIGSTOP,
/// a stalled VM) found every link the others had closed meanwhile gone, suspected all of
/// those peers at once, and started a storm of thousands of false suspicions at 64 nodes.
/// (4000–4999: private use, RFC 6455 §7.4.2.)
pub const CLOSED_ON_PURPOSE: u16 = 4000;

/// Listener threads a bridge opens lanes on, at most (the first that start).
pub const MAX_LISTENER_THREADS: usize = 64;

/// Identifies one link (either direction) on this node.
pub type LinkId = u64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A fresh link id.
pub fn next_link_id() -> LinkId {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

/// Where frames for a link go: bounded in frames and in bytes. Best-effort frames (gossip,
/// flooded publishes, one-way messages) are refused past either bound (`try_send`), so a
/// peer that reads slowly or not at all costs at most the byte bound of them; frames that
/// must not be lost (calls, replies, forwarded calls) are held to the frame bound only
/// ([`Parking`], `send`), and those are bounded by the in-flight limits.
pub type LinkSender = Outbox;

/// The bounds of a link's queue of outgoing frames.
#[derive(Debug, Clone, Copy)]
pub struct LinkQueue {
    /// Frames (`outbox_capacity`).
    pub frames: usize,
    /// Bytes of best-effort frames (`max_outbound_bytes_per_connection`).
    pub bytes: usize,
}

/// A function on another node, as the routing snapshot knows it.
#[derive(Debug, Clone)]
pub struct RemoteFunction {
    /// The node serving it.
    pub node: NodeId,
    /// Its cluster.
    pub cluster_id: String,
    /// What it is.
    pub identity: FunctionIdentity,
}

/// A queue owned by another node, as the routing snapshot knows it.
#[derive(Debug, Clone)]
pub struct RemoteQueue {
    /// The owner.
    pub node: NodeId,
    /// The owner's URL (named in errors: `subscribe` is served on the owner only).
    pub url: String,
}

/// The routing snapshot: immutable, swapped whole by the FabricGossip actor.
#[derive(Debug, Default)]
pub struct FabricView {
    /// One live, handshaken link per directly connected node.
    pub links: HashMap<NodeId, (LinkId, LinkSender)>,
    /// Next hop for every reachable node (itself when directly linked).
    pub next_hops: HashMap<NodeId, NodeId>,
    /// Functions of alive, reachable nodes.
    pub functions: Vec<RemoteFunction>,
    /// Functions of nodes that are suspected or have no route: not called, but a command
    /// that only they could serve fails with 1005 (unreachable), not 1001 (not found).
    pub unreachable: Vec<RemoteFunction>,
    /// Every admitted link (handshake complete), with its node, its queue and the count of
    /// routed messages read on it: the only links routed messages are accepted from and
    /// replies are sent back on. Routed messages never reach the actor, so the count is how
    /// it knows that a link busy with calls is alive.
    pub admitted: HashMap<LinkId, (NodeId, LinkSender, Arc<AtomicU64>)>,
    /// Queues of alive, reachable nodes, by name.
    pub queues: HashMap<String, RemoteQueue>,
    /// Queues of suspected or unroutable nodes: operations on them fail with 1005 at once.
    pub unreachable_queues: HashMap<String, RemoteQueue>,
    /// Other clusters, with the reachable nodes of this cluster that bridge to them (as
    /// their catalogs advertise).
    pub clusters: HashMap<String, Vec<NodeId>>,
}

/// Catalog change log size unless the settings say otherwise.
const DEFAULT_DISCOVERY_LOG_ITEMS: usize = 10_000;

/// Limits of the link layer.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    /// Calls served at once for one link; beyond: `Overloaded`.
    pub max_in_flight_per_link: usize,
    /// Forwarded calls remembered at once (for replies to retrace their path).
    pub max_forwarded_calls: usize,
    /// A forwarded call whose reply has not come back after this long is forgotten.
    pub forwarded_ttl: Duration,
    /// Client connections of one peer that may hold queue sessions here at once (see
    /// [`super::queue_sessions`]).
    pub max_queue_sessions_per_peer: usize,
    /// Replies and forwarded messages waiting for room on a full link queue at once;
    /// beyond: a forwarded call is refused as `Overloaded`, anything else is dropped and
    /// counted (`mpreg_fabric_dropped_total{reason="link_queue_full"}`).
    pub max_parked_frames: usize,
    /// The longest a call served for a peer may run (its `timeout_ms` counts up to this;
    /// none means this): at its deadline it is stopped, unanswered, for its caller has
    /// stopped waiting. The node's longest request time (`max_request_timeout_s`, or
    /// `request_timeout_s` if larger).
    pub max_served_call: Duration,
}

impl Default for LinkLimits {
    fn default() -> Self {
        LinkLimits {
            max_in_flight_per_link: 4096,
            max_forwarded_calls: 65_536,
            forwarded_ttl: Duration::from_secs(300),
            max_queue_sessions_per_peer: 65_536,
            max_parked_frames: 4096,
            max_served_call: Duration::from_secs(300),
        }
    }
}

/// A call this node forwarded: where it came from and where it went, so its reply is
/// accepted only from `to` and passed back only to `from`.
struct Forwarded {
    from: LinkId,
    to: LinkId,
    at: std::time::Instant,
}

/// Forwarded calls by (source node, call id). Bounded: when full, expired entries are
/// dropped, and if it is still full the call is refused rather than forwarded blind.
#[derive(Default)]
struct ForwardTable {
    calls: HashMap<(NodeId, String), Forwarded>,
}

impl ForwardTable {
    fn insert(&mut self, key: (NodeId, String), entry: Forwarded, limits: &LinkLimits) -> bool {
        if self.calls.len() >= limits.max_forwarded_calls {
            let ttl = limits.forwarded_ttl;
            self.calls.retain(|_, f| f.at.elapsed() < ttl);
            if self.calls.len() >= limits.max_forwarded_calls {
                return false;
            }
        }
        self.calls.insert(key, entry);
        true
    }
}

/// Calls being served for other nodes, per link, so a closing link cancels them.
#[derive(Default)]
struct Serving {
    per_link: HashMap<LinkId, HashMap<u64, tokio::task::AbortHandle>>,
    next: u64,
}

struct PendingCall {
    reply: oneshot::Sender<CallOutcome>,
    via: LinkId,
}

/// Message ids recently seen, to flood each published message exactly once.
struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl SeenIds {
    fn first_time(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
        true
    }
}

/// State shared by the request path, link readers and the FabricGossip actor.
pub struct FabricShared {
    /// This node.
    pub me: NodeInfo,
    /// The routing snapshot.
    pub view: ArcSwap<FabricView>,
    /// Forwards allowed for a message we originate.
    pub hop_budget: u32,
    /// Local functions (to serve calls from other nodes).
    pub table: TableHandle,
    /// Local pub/sub (to deliver messages from other nodes).
    pub pubsub: Slot<PubSub>,
    /// The FabricGossip actor (gossip and lifecycle frames go there).
    pub gossip: Slot<FabricGossip>,
    /// Local queues (to serve queue operations from other nodes).
    pub queue: Slot<Queue>,
    /// The names of the local queues as last advertised (kept here so a restarted
    /// FabricGossip advertises them at once).
    pub local_queues: Mutex<Vec<String>>,
    /// This node's cache (to serve cache operations from other nodes).
    pub cache: Option<Arc<LocalCache>>,
    pending: Mutex<HashMap<String, PendingCall>>,
    /// This node's credentials; `None` runs open (development).
    pub trust: Option<Arc<Credentials>>,
    /// Federation bridges to other clusters; `None`: this node bridges to none.
    pub bridges: Option<Arc<super::bridge::Bridges>>,
    /// Counters (in-flight gauge, refusals, drops).
    pub metrics: Arc<Metrics>,
    /// Catalog changes for `catalog_watch` (kept here, so a restarted FabricGossip
    /// continues the numbering).
    pub discovery_log: Mutex<CatalogLog>,
    pub(super) limits: LinkLimits,
    pub(super) queue_sessions: QueueSessions,
    forwarded: Mutex<ForwardTable>,
    serving: Mutex<Serving>,
    /// Outbound links still open: shutdown waits for them, so a GOODBYE queued on a link we
    /// dialled is flushed and acknowledged before the process exits.
    writers: tokio::sync::watch::Sender<usize>,
    in_flight: Mutex<HashMap<NodeId, usize>>,
    seen: Mutex<SeenIds>,
    next_id: AtomicU64,
    /// Puts replies and forwarded calls on link queues without losing them to a full one.
    pub(super) parking: Parking,
    /// Each link's share of the FabricGossip actor's mailbox.
    pub(super) mailbox: MailboxShares,
    /// Each link's share of the PubSub actor's mailbox (messages published elsewhere).
    pubsub_mailbox: MailboxShares,
    /// The threads of the node's websocket listener, as they start: a federation bridge
    /// opens a lane on each ([`super::lanes`]).
    listener_threads: Mutex<Vec<(std::thread::ThreadId, actix_rt::ArbiterHandle)>>,
    /// How to close each open link other nodes dialled (its connection).
    inbound: Mutex<HashMap<LinkId, Recipient<CloseLink>>>,
}

/// Queues frames on links. A full queue is not a reason to lose a reply or a forwarded
/// call, whose caller would wait for its timeout: the frame waits for room in a task of its
/// own, at most `max_parked_frames` of them on the node (one `Parking` per node, cloned
/// where frames are sent: the fabric's links and the federation bridges).
#[derive(Clone)]
pub struct Parking {
    slots: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

impl Parking {
    /// At most `max_parked_frames` frames waiting at once; drops counted in `metrics`.
    pub fn new(max_parked_frames: usize, metrics: Arc<Metrics>) -> Self {
        Parking { slots: Arc::new(tokio::sync::Semaphore::new(max_parked_frames)), metrics }
    }

    /// Queues `bytes` on `sender`'s link, or parks it until there is room; dropped (and
    /// said why) when the link closed or too many frames wait already.
    pub(super) fn send(&self, sender: &LinkSender, bytes: OutFrame) -> Result<(), Dropped> {
        let bytes = match sender.queue(bytes) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Dropped::Closed),
            Err(mpsc::error::TrySendError::Full(bytes)) => bytes,
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            warn!("frame dropped: peer link queue full and max_parked_frames waiting already");
            self.metrics.fabric_dropped("link_queue_full");
            return Err(Dropped::Full);
        };
        let sender = sender.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if sender.send(bytes).await.is_err() {
                debug!("parked frame not sent: the link closed");
            }
        });
        Ok(())
    }
}

/// Decrements a node's in-flight count when the call ends, however it ends.
struct InFlight<'a> {
    shared: &'a FabricShared,
    node: NodeId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.in_flight.lock() {
            if let Some(n) = map.get_mut(&self.node) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl FabricShared {
    /// Shared state for node `me`.
    pub fn new(
        me: NodeInfo,
        hop_budget: u32,
        table: TableHandle,
        pubsub: Slot<PubSub>,
        gossip: Slot<FabricGossip>,
    ) -> Self {
        FabricShared {
            me,
            view: ArcSwap::from_pointee(FabricView::default()),
            hop_budget,
            table,
            pubsub,
            gossip,
            queue: Slot::default(),
            local_queues: Mutex::new(Vec::new()),
            cache: None,
            pending: Mutex::new(HashMap::new()),
            trust: None,
            bridges: None,
            metrics: Arc::new(Metrics::default()),
            discovery_log: Mutex::new(CatalogLog::new(DEFAULT_DISCOVERY_LOG_ITEMS)),
            limits: LinkLimits::default(),
            queue_sessions: QueueSessions::default(),
            forwarded: Mutex::new(ForwardTable::default()),
            serving: Mutex::new(Serving::default()),
            writers: tokio::sync::watch::channel(0).0,
            in_flight: Mutex::new(HashMap::new()),
            seen: Mutex::new(SeenIds { order: VecDeque::new(), set: HashSet::new(), capacity: 65_536 }),
            next_id: AtomicU64::new(1),
            parking: Parking::new(LinkLimits::default().max_parked_frames, Arc::new(Metrics::default())),
            mailbox: MailboxShares::default(),
            pubsub_mailbox: MailboxShares::default(),
            listener_threads: Mutex::new(Vec::new()),
            inbound: Mutex::new(HashMap::new()),
        }
    }

    /// The calling thread serves websockets (the node's listener): bridges open a lane
    /// here. Called by each listener thread as it starts (at most
    /// [`MAX_LISTENER_THREADS`] are kept).
    pub fn add_listener_thread(&self) {
        let (Some(arbiter), Ok(mut threads)) = (actix_rt::Arbiter::try_current(), self.listener_threads.lock()) else {
            return;
        };
        let id = std::thread::current().id();
        // A thread that builds its service again (actix does, after a failed start) keeps
        // its place (lanes are numbered by it); a listener restarted on a new thread is
        // another.
        if let Some(place) = threads.iter().position(|(known, _)| *known == id) {
            threads[place].1 = arbiter;
        } else if threads.len() < MAX_LISTENER_THREADS {
            threads.push((id, arbiter));
        }
    }

    /// The listener threads known so far, in the order they started.
    pub(super) fn listener_threads(&self) -> Vec<(std::thread::ThreadId, actix_rt::ArbiterHandle)> {
        self.listener_threads.lock().map(|threads| threads.clone()).unwrap_or_default()
    }

    /// `link`, which another node dialled, is open; `closer` closes its connection.
    pub fn inbound_opened(&self, link: LinkId, closer: Recipient<CloseLink>) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.insert(link, closer);
        }
    }

    /// Closes the inbound `link` (on purpose: see [`CLOSED_ON_PURPOSE`]), if it is one.
    pub(super) fn close_inbound(&self, link: LinkId, on_purpose: bool) {
        let closer = self.inbound.lock().ok().and_then(|mut inbound| inbound.remove(&link));
        if let Some(closer) = closer {
            closer.do_send(CloseLink { on_purpose });
        }
    }

    /// A websocket ping or pong was read on `link`: on a bridge, it counts as hearing from
    /// it (a lane carries no announcements; its keepalive shows it is alive).
    pub fn heard_on(&self, link: LinkId) {
        if let Some(bridges) = &self.bridges {
            bridges.note_heard(link);
        }
    }

    /// With credentials: every link must authenticate (see [`super::wire`]).
    pub fn with_trust(mut self, trust: Option<Arc<Credentials>>) -> Self {
        self.trust = trust;
        self
    }

    /// Bridges this node to other clusters (see [`super::bridge`]).
    pub fn with_bridges(mut self, bridges: Option<Arc<super::bridge::Bridges>>) -> Self {
        self.bridges = bridges;
        self
    }

    /// Serves queue operations from other nodes with this Queue actor.
    pub fn with_queue(mut self, queue: Slot<Queue>) -> Self {
        self.queue = queue;
        self
    }

    /// Keeps at most `items` entries in the catalog change log (`catalog_watch`).
    pub fn with_discovery_log(mut self, items: usize) -> Self {
        self.discovery_log = Mutex::new(CatalogLog::new(items));
        self
    }

    /// Serves cache operations from other nodes with this cache.
    pub fn with_cache(mut self, cache: Arc<LocalCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Runs a cache operation on `node` (`duty`: see [`FabricBody::CacheOp`]); the
    /// outcome's `ok` value is the node's `cache-reply`. A lost link or node is
    /// `Unreachable` at once.
    pub async fn cache_op(&self, node: &str, duty: &str, request: Value) -> CallOutcome {
        self.request(node, FabricBody::CacheOp { duty: duty.to_owned(), request }).await
    }

    /// Counts into the node's metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.parking.metrics = metrics.clone();
        self.metrics = metrics;
        self
    }

    /// Link-layer limits.
    pub fn with_limits(mut self, limits: LinkLimits) -> Self {
        self.limits = limits;
        self.parking = Parking::new(limits.max_parked_frames, self.metrics.clone());
        self
    }

    /// Waits (at most `limit`) until every outbound link has flushed and closed.
    pub async fn writers_done(&self, limit: Duration) {
        let mut writers = self.writers.subscribe();
        let _ = tokio::time::timeout(limit, writers.wait_for(|n| *n == 0)).await;
    }

    /// Calls currently outstanding to `node` from this node.
    pub fn load_of(&self, node: &str) -> usize {
        self.in_flight.lock().ok().and_then(|m| m.get(node).copied()).unwrap_or(0)
    }

    /// A call id nobody can guess: a counter (unique) plus 64 random bits (unpredictable).
    fn fresh_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}:{}:{n}:{:016x}", self.me.node, self.me.instance_id, rand::random::<u64>())
    }

    /// Runs `identity` on `node` and waits for the outcome; a node or link that goes away
    /// before answering is `Unreachable`, never a wait for the request timeout.
    pub async fn call(&self, node: &str, command: &str, identity: &FunctionIdentity, call: CallArgs) -> CallOutcome {
        let timeout_ms = call.deadline.map(|d| millis_left(d, std::time::Instant::now()));
        let body = FabricBody::Call {
            command: command.to_owned(),
            identity: identity.clone(),
            args: call.args,
            kwargs: call.kwargs,
            timeout_ms,
        };
        self.request(node, body).await
    }

    /// Runs `work` in cluster `cluster` through `node`, a node of this cluster that
    /// bridges to it ([`super::bridge`]).
    pub async fn cluster_call(
        &self,
        node: &str,
        cluster: &str,
        work: super::bridge::Work,
        deadline: Option<std::time::Instant>,
    ) -> CallOutcome {
        let timeout_ms = deadline.map(|d| millis_left(d, std::time::Instant::now()));
        let body = FabricBody::ClusterCall { cluster: cluster.to_owned(), work, timeout_ms };
        self.request(node, body).await
    }

    /// Runs a queue operation (`request`, the client's `role: "queue"` frame, from client
    /// connection `conn`) on the queue's owner `node`; the outcome's `ok` value is the
    /// owner's `queue-reply`. Same guarantees as [`Self::call`]: a lost link or owner is
    /// `Unreachable` at once.
    pub async fn queue_op(&self, node: &str, request: Value, conn: u64) -> CallOutcome {
        self.request(node, FabricBody::QueueOp { request, conn }).await
    }

    /// Sends a message that is not answered to `node` over the next hop, if there is room
    /// on that link now (within its byte bound: best effort); false when it could not be
    /// sent.
    pub(super) fn send_one_way(&self, node: &str, body: FabricBody) -> bool {
        self.one_way(node, body, |sender, frame| sender.try_send(frame).is_ok())
    }

    /// Like [`FabricShared::send_one_way`], for a small message that must not be lost to
    /// the byte bound bulk frames filled (a session's end): bounded in frames only.
    pub(super) fn send_control(&self, node: &str, body: FabricBody) -> bool {
        self.one_way(node, body, |sender, frame| sender.queue(frame).is_ok())
    }

    fn one_way(&self, node: &str, body: FabricBody, send: impl FnOnce(&LinkSender, OutFrame) -> bool) -> bool {
        let view = self.view.load();
        let Some((_, sender)) = view.next_hops.get(node).and_then(|hop| view.links.get(hop)) else { return false };
        let message = FabricMessage {
            id: self.fresh_id(),
            source: self.me.node.clone(),
            target: node.to_owned(),
            path: vec![self.me.node.clone()],
            hops_left: self.hop_budget,
            body,
        };
        send(sender, frame(&PeerFrame::FabricMessage(message)))
    }

    async fn request(&self, node: &str, body: FabricBody) -> CallOutcome {
        let view = self.view.load();
        let Some(hop) = view.next_hops.get(node).cloned() else {
            return CallOutcome::Unreachable { reason: format!("no route from {} to node {node}", self.me.node) };
        };
        let Some((link, sender)) = view.links.get(&hop).cloned() else {
            return CallOutcome::Unreachable { reason: format!("link to {hop} closed") };
        };
        drop(view);
        let id = self.fresh_id();
        let (reply, answer) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id.clone(), PendingCall { reply, via: link });
        }
        if let Ok(mut map) = self.in_flight.lock() {
            *map.entry(node.to_owned()).or_default() += 1;
        }
        let _load = InFlight { shared: self, node: node.to_owned() };
        let message = FabricMessage {
            id: id.clone(),
            source: self.me.node.clone(),
            target: node.to_owned(),
            path: vec![self.me.node.clone()],
            hops_left: self.hop_budget,
            body,
        };
        // Removes the pending entry if this future is dropped (timeout, failed sibling).
        let _cleanup = PendingCleanup { shared: self, id: &id };
        if sender.send(frame(&PeerFrame::FabricMessage(message))).await.is_err() {
            return CallOutcome::Unreachable { reason: format!("link to {hop} closed") };
        }
        match answer.await {
            Ok(outcome) => outcome,
            Err(_) => {
                CallOutcome::Unreachable { reason: format!("node {node} (via {hop}) went away before answering") }
            }
        }
    }

    /// Publishes a message to every node (each delivers it to its local subscribers once),
    /// and over the bridges to other clusters when this cluster's export list shares its
    /// topic.
    pub fn broadcast_publish(&self, message: &PubSubMessage) {
        if self.bridges.is_none() && self.view.load().links.is_empty() {
            // Nobody to tell: skip copying and encoding the message (it may be large).
            return;
        }
        // Marked seen even on a bridge node alone in its cluster: a copy that comes back
        // over another bridge (a ring of clusters) is not delivered again.
        if !self.seen.lock().map(|mut s| s.first_time(&message.message_id)).unwrap_or(true) {
            return;
        }
        if let Some(bridges) = &self.bridges {
            bridges.publish_out(message, Vec::new());
        }
        self.flood_publish(message);
    }

    /// A message published in another cluster, read on a bridge: delivered here and flooded
    /// to this cluster like one of its own, the first time its id is seen (false: seen
    /// before, nothing done).
    pub(super) fn publish_from_bridge(&self, link: LinkId, bytes: usize, message: &PubSubMessage) -> bool {
        if !self.seen.lock().map(|mut s| s.first_time(&message.message_id)).unwrap_or(false) {
            return false;
        }
        self.deliver_here(link, bytes, message);
        self.flood_publish(message);
        true
    }

    /// Hands a message published elsewhere, read on `link` (`bytes` as read), to the local
    /// subscribers, within the link's share of PubSub's mailbox: dropped and counted
    /// (`pubsub_mailbox_full`) beyond it.
    fn deliver_here(&self, link: LinkId, bytes: usize, message: &PubSubMessage) {
        let Some(pubsub) = self.pubsub.get() else { return };
        let Some(ticket) = self.pubsub_mailbox.take(link, bytes) else {
            debug!(link, bytes, "link's share of the pubsub mailbox used up; published message not delivered here");
            self.metrics.fabric_dropped("pubsub_mailbox_full");
            return;
        };
        let message = Arc::new(message.clone());
        pubsub.do_send(pubsub::Publish { message, origin: pubsub::Origin::Peer, ticket: Some(ticket) });
    }

    fn flood_publish(&self, message: &PubSubMessage) {
        let out = FabricMessage {
            id: message.message_id.clone(),
            source: self.me.node.clone(),
            target: BROADCAST.to_owned(),
            path: vec![self.me.node.clone()],
            hops_left: self.hop_budget,
            body: FabricBody::Publish { message: message.clone() },
        };
        self.flood(&out, None);
    }

    /// Best effort, as bulk: a link with half its byte bound queued (a peer that reads
    /// slowly) misses the message, counted under `link_queue_full`.
    fn flood(&self, message: &FabricMessage, except: Option<LinkId>) {
        let bytes = frame(&PeerFrame::FabricMessage(message.clone()));
        for (link, sender) in self.view.load().links.values() {
            if Some(*link) != except && sender.try_send_bulk(bytes.clone()).is_err() {
                debug!(link, "peer link queue full; dropped a flooded message");
                self.metrics.fabric_dropped("link_queue_full");
            }
        }
    }

    /// Whether a call sent on `link` waits for its answer, or one read on it is being
    /// served: a link quiet only because a function runs long.
    pub(super) fn link_busy(&self, link: LinkId) -> bool {
        let waiting = self.pending.lock().is_ok_and(|p| p.values().any(|call| call.via == link));
        waiting || self.serving.lock().is_ok_and(|s| s.per_link.get(&link).is_some_and(|calls| !calls.is_empty()))
    }

    /// Fails every call waiting on `link`, cancels the calls served for it, and tells the
    /// sources of calls forwarded over it (it closed).
    pub fn link_closed(&self, link: LinkId) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.remove(&link);
        }
        if let Some(bridges) = &self.bridges {
            bridges.link_closed(link);
        }
        if let Ok(mut pending) = self.pending.lock() {
            // Dropping the sender wakes the caller with `Gone`.
            pending.retain(|_, p| p.via != link);
        }
        let cancelled = self.serving.lock().ok().and_then(|mut s| s.per_link.remove(&link));
        for (_, handle) in cancelled.into_iter().flatten() {
            handle.abort();
        }
        let mut stranded = Vec::new();
        if let Ok(mut forwarded) = self.forwarded.lock() {
            forwarded.calls.retain(|(source, id), f| {
                if f.to == link && f.from != link {
                    stranded.push((f.from, source.clone(), id.clone()));
                }
                f.to != link && f.from != link
            });
        }
        for (from, source, id) in stranded {
            let reason = format!("link from {} to the next hop closed before the reply", self.me.node);
            self.reply(from, id, source, CallOutcome::Unreachable { reason }, self.hop_budget as usize);
        }
    }

    /// Drops forwarded calls older than their time to live (their caller gave up).
    pub fn expire_forwarded(&self) {
        let ttl = self.limits.forwarded_ttl;
        if let Ok(mut forwarded) = self.forwarded.lock() {
            forwarded.calls.retain(|_, f| f.at.elapsed() < ttl);
        }
    }

    /// Handles a federation frame read from `link` that only passes through this node
    /// ([`super::bridge::Bridges::pass_through`]) without decoding it: `true` when it did (the reader
    /// decodes any other frame and hands it to [`Self::on_frame`]).
    pub fn pass_through(self: &Arc<Self>, link: LinkId, bytes: &[u8]) -> bool {
        match &self.bridges {
            Some(bridges) if sniff_role(bytes) == Some(&b"federation"[..]) => bridges.pass_through(self, link, bytes),
            _ => false,
        }
    }

    /// Handles a frame read from a link: routed messages on admitted links here, the rest
    /// to the actor (which also takes routed messages that arrive while the handshake is
    /// still in its mailbox, so they are judged after it).
    pub fn on_frame(self: &Arc<Self>, link: LinkId, frame: PeerFrame, bytes: usize) {
        // Counted on its link: the actor reads the count to know the link is alive.
        let admitted = matches!(frame, PeerFrame::FabricMessage(_))
            && self
                .view
                .load()
                .admitted
                .get(&link)
                .map(|(_, _, routed)| routed.fetch_add(1, Ordering::Relaxed))
                .is_some();
        let frame = match (frame, &self.bridges) {
            (PeerFrame::Federation(message), Some(bridges)) if bridges.is_bridge(link) => {
                bridges.on_frame(self, link, message, bytes);
                return;
            }
            (frame, _) => frame,
        };
        match frame {
            PeerFrame::FabricMessage(message) if admitted => self.route(link, message, bytes),
            other => self.to_actor(link, bytes, |ticket| PeerFrameReceived { link, frame: other, ticket }),
        }
    }

    /// Hands the message `make` builds to the FabricGossip actor, within `link`'s share of
    /// its mailbox (see [`MailboxShares`]): dropped and counted beyond it.
    fn to_actor<M>(&self, link: LinkId, bytes: usize, make: impl FnOnce(MailboxTicket) -> M)
    where
        M: actix::Message<Result = ()> + Send + 'static,
        FabricGossip: actix::Handler<M>,
    {
        let Some(gossip) = self.gossip.get() else {
            debug!(link, "fabric restarting; dropped a gossip frame");
            return;
        };
        match self.mailbox.take(link, bytes) {
            Some(ticket) => gossip.do_send(make(ticket)),
            None => {
                debug!(link, bytes, "link's share of the fabric's mailbox used up; gossip frame dropped");
                self.metrics.fabric_dropped("link_mailbox_full");
            }
        }
    }

    /// Routes a message that arrived on the admitted link `link`.
    /// `bytes`: the frame as read (0 when the actor passes on one it holds already).
    pub fn route(self: &Arc<Self>, link: LinkId, mut message: FabricMessage, bytes: usize) {
        if message.target == BROADCAST {
            let FabricBody::Publish { message: published } = &message.body else { return };
            if !self.seen.lock().map(|mut s| s.first_time(&published.message_id)).unwrap_or(false) {
                return;
            }
            self.deliver_here(link, bytes, published);
            if let Some(bridges) = &self.bridges {
                bridges.publish_out(published, Vec::new());
            }
            if message.hops_left > 0 && !message.path.contains(&self.me.node) {
                message.hops_left -= 1;
                message.path.push(self.me.node.clone());
                self.flood(&message, Some(link));
            }
            return;
        }
        if message.target != self.me.node {
            match message.body {
                FabricBody::Reply { .. } => self.pass_reply_back(link, message),
                _ => self.forward(link, message),
            }
            return;
        }
        match message.body {
            FabricBody::Reply { outcome } => {
                let waiter = self.pending.lock().ok().and_then(|mut p| match p.get(&message.id) {
                    Some(call) if call.via == link => p.remove(&message.id),
                    _ => None,
                });
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.reply.send(outcome);
                    }
                    None => {
                        debug!(link, id = %message.id, "reply for no call in flight on this link; dropped");
                        self.metrics.fabric_dropped("stray_reply");
                    }
                }
            }
            body @ (FabricBody::Call { .. }
            | FabricBody::QueueOp { .. }
            | FabricBody::CacheOp { .. }
            | FabricBody::ClusterCall { .. }) => {
                let (id, source) = (message.id, message.source);
                let forwards = message.path.len().saturating_sub(1);
                let Ok(mut serving) = self.serving.lock() else { return };
                let calls = serving.per_link.entry(link).or_default();
                let limit = self.limits.max_in_flight_per_link;
                if calls.len() >= limit {
                    drop(serving);
                    self.metrics.limit_exceeded("max_in_flight_per_link");
                    let reason = format!(
                        "overloaded: {} is serving {limit} calls for this link (max_in_flight_per_link)",
                        self.me.node
                    );
                    self.reply(link, id, source, CallOutcome::Overloaded { reason }, forwards);
                    return;
                }
                // Calls served for peers count toward the node-wide in-flight limit too.
                let Some(permit) = self.metrics.admission().try_admit() else {
                    drop(serving);
                    self.metrics.limit_exceeded("max_in_flight");
                    let reason = format!("overloaded: {} is at its max_in_flight", self.me.node);
                    self.reply(link, id, source, CallOutcome::Overloaded { reason }, forwards);
                    return;
                };
                serving.next += 1;
                let key = serving.next;
                // The guard is created before the task can run, and removes the entry
                // under the same lock this insertion holds, so it never outlives it.
                let guard = ServingGuard { shared: self.clone(), link, key, _permit: permit };
                // The caller's time (a peer's number, so capped: never unbounded, never a
                // panic), or the longest any call may take.
                let longest = self.limits.max_served_call;
                let asked = match &body {
                    FabricBody::Call { timeout_ms, .. } | FabricBody::ClusterCall { timeout_ms, .. } => {
                        timeout_ms.map(Duration::from_millis)
                    }
                    _ => None,
                };
                let capped = asked.is_none_or(|time| time > longest);
                let time = asked.map_or(longest, |time| time.min(longest));
                let deadline = std::time::Instant::now() + time;
                let handle = tokio::spawn(async move {
                    let guard = guard;
                    let shared = &guard.shared;
                    let serve = async {
                        match body {
                            FabricBody::Call { command, identity, args, kwargs, .. } => {
                                let call = CallArgs { args, kwargs, deadline: Some(deadline) };
                                Some(shared.serve_call(&command, &identity, call).await)
                            }
                            FabricBody::QueueOp { request, conn } => {
                                Some(shared.serve_queue_op(&source, request, conn).await)
                            }
                            FabricBody::ClusterCall { cluster, work, .. } => Some(match shared.bridges.clone() {
                                Some(bridges) => match bridges.call_cluster(&cluster, work, Some(deadline)).await {
                                    Ok(value) => CallOutcome::Ok { value },
                                    Err(error) => CallOutcome::Refused { error },
                                },
                                None => CallOutcome::Unreachable {
                                    reason: format!("node {} has no federation bridges", shared.me.node),
                                },
                            }),
                            FabricBody::CacheOp { duty, request } => Some(match shared.cache.clone() {
                                Some(cache) => crate::cache::cluster::serve(shared, &cache, &duty, request).await,
                                None => CallOutcome::NotFound { node: shared.me.node.clone() },
                            }),
                            _ => None,
                        }
                    };
                    let outcome = match tokio::time::timeout_at(deadline.into(), serve).await {
                        Ok(Some(outcome)) => outcome,
                        Ok(None) => return,
                        Err(_) => {
                            debug!(link, id = %id, capped, "call served for a peer stopped at its deadline");
                            if capped {
                                shared.metrics.limit_exceeded("max_request_timeout_s");
                            }
                            return;
                        }
                    };
                    // Waits for room on a full link queue: the call keeps its place in the
                    // in-flight limits until its reply is queued, so a busy link slows its
                    // callers down instead of losing their replies.
                    if let Some((sender, bytes)) = shared.reply_frame(link, id, source, outcome, forwards) {
                        if sender.send(bytes).await.is_err() {
                            debug!(link, "reply not sent: the link closed");
                        }
                    }
                });
                if let Some(calls) = serving.per_link.get_mut(&link) {
                    calls.insert(key, handle.abort_handle());
                }
            }
            FabricBody::QueuePush { conn, frame } => self.deliver_queue_push(&message.source, conn, frame),
            FabricBody::QueueGone { conn } => self.remote_connection_gone(&message.source, conn),
            FabricBody::Gossip { frame } => {
                let source = message.source;
                self.to_actor(link, bytes, |ticket| super::RoutedGossip { source, frame, ticket });
            }
            FabricBody::Publish { .. } => {}
        }
    }

    /// A reply passing through: accepted only from the link the call was forwarded on,
    /// and passed back only on the link the call came from.
    fn pass_reply_back(&self, link: LinkId, message: FabricMessage) {
        let key = (message.target.clone(), message.id.clone());
        let back = self.forwarded.lock().ok().and_then(|mut f| match f.calls.get(&key) {
            Some(entry) if entry.to == link => f.calls.remove(&key).map(|e| e.from),
            _ => None,
        });
        let sender = back.and_then(|from| self.view.load().admitted.get(&from).map(|(_, s, _)| s.clone()));
        match sender {
            Some(sender) => {
                let _ = self.parking.send(&sender, frame(&PeerFrame::FabricMessage(message)));
            }
            None => {
                debug!(link, id = %message.id, "reply for no call forwarded on this link; dropped");
                self.metrics.fabric_dropped("stray_reply");
            }
        }
    }

    /// The Queue actor's set of queues is now `names`: advertise it if it changed.
    pub fn set_local_queues(&self, names: Vec<String>) {
        let Ok(mut current) = self.local_queues.lock() else { return };
        if *current == names {
            return;
        }
        current.clone_from(&names);
        drop(current);
        if let Some(gossip) = self.gossip.get() {
            gossip.do_send(super::LocalQueuesChanged { queues: names });
        }
    }

    async fn serve_call(&self, command: &str, identity: &FunctionIdentity, call: CallArgs) -> CallOutcome {
        let table = self.table.current();
        let Some(spec) = table.find_exact(identity) else {
            return CallOutcome::NotFound { node: self.me.node.clone() };
        };
        debug!(command, fun = %identity.name, "serving a call from another node");
        match spec.invoke(call).await {
            Ok(value) => CallOutcome::Ok { value },
            // A worker that went away: the caller may retry on another node.
            Err(error) if error.is_unreachable() => {
                CallOutcome::Unreachable { reason: format!("on node {}: {}", self.me.node, error.message) }
            }
            Err(error) => CallOutcome::Failed { error, node: self.me.node.clone() },
        }
    }

    /// Answers a call that took `forwards` forwards to get here, on the link it arrived on
    /// (the reply retraces the call's path): the reply may need as many forwards on the
    /// way back, whatever this node's own budget.
    fn reply(&self, arrived_on: LinkId, id: String, target: NodeId, outcome: CallOutcome, forwards: usize) {
        if let Some((sender, bytes)) = self.reply_frame(arrived_on, id, target, outcome, forwards) {
            let _ = self.parking.send(&sender, bytes);
        }
    }

    /// A reply (see [`Self::reply`]) and the queue of the link it goes back on; `None`
    /// (logged) when that link is gone.
    fn reply_frame(
        &self,
        arrived_on: LinkId,
        id: String,
        target: NodeId,
        outcome: CallOutcome,
        forwards: usize,
    ) -> Option<(LinkSender, OutFrame)> {
        let Some(sender) = self.view.load().admitted.get(&arrived_on).map(|(_, s, _)| s.clone()) else {
            warn!(target = %target, "reply dropped: no route back");
            return None;
        };
        let message = FabricMessage {
            id,
            source: self.me.node.clone(),
            target,
            path: vec![self.me.node.clone()],
            hops_left: self.hop_budget.max(u32::try_from(forwards).unwrap_or(u32::MAX)),
            body: FabricBody::Reply { outcome },
        };
        Some((sender, frame(&PeerFrame::FabricMessage(message))))
    }

    fn forward(&self, arrived_on: LinkId, mut message: FabricMessage) {
        let refusal = if message.path.contains(&self.me.node) {
            Some(format!("routing loop: {} already on path {:?}", self.me.node, message.path))
        } else if message.hops_left == 0 {
            Some(format!("hop budget exhausted at {} (path {:?})", self.me.node, message.path))
        } else {
            None
        };
        let view = self.view.load();
        let next = view.next_hops.get(&message.target).and_then(|hop| view.links.get(hop)).cloned();
        let refusal = refusal
            .or_else(|| next.is_none().then(|| format!("no route from {} to node {}", self.me.node, message.target)));
        if let Some(reason) = refusal {
            warn!(id = %message.id, source = %message.source, target = %message.target, reason = %reason, "fabric message refused");
            if message.body.is_request() {
                let forwards = message.path.len().saturating_sub(1);
                self.reply(arrived_on, message.id, message.source, CallOutcome::Unreachable { reason }, forwards);
            }
            return;
        }
        let Some((next_link, sender)) = next else { return };
        let request = message.body.is_request().then(|| (message.source.clone(), message.id.clone()));
        let forwards = message.path.len().saturating_sub(1);
        if let Some(key) = &request {
            let entry = Forwarded { from: arrived_on, to: next_link, at: std::time::Instant::now() };
            let remembered = self.forwarded.lock().is_ok_and(|mut f| f.insert(key.clone(), entry, &self.limits));
            if !remembered {
                self.metrics.limit_exceeded("max_forwarded_calls");
                let reason = format!("overloaded: {} is forwarding too many calls (max_forwarded_calls)", self.me.node);
                self.reply(arrived_on, message.id, message.source, CallOutcome::Overloaded { reason }, forwards);
                return;
            }
        }
        message.hops_left -= 1;
        message.path.push(self.me.node.clone());
        let Err(dropped) = self.parking.send(&sender, frame(&PeerFrame::FabricMessage(message))) else { return };
        // Not sent: the caller hears so now rather than at its timeout.
        if let Some((source, id)) = request {
            if let Ok(mut forwarded) = self.forwarded.lock() {
                forwarded.calls.remove(&(source.clone(), id.clone()));
            }
            let me = &self.me.node;
            let outcome = match dropped {
                Dropped::Closed => CallOutcome::Unreachable { reason: format!("{me}'s link to the next hop closed") },
                Dropped::Full => CallOutcome::Overloaded {
                    reason: format!("overloaded: {me}'s link to the next hop is full (max_parked_frames)"),
                },
            };
            self.reply(arrived_on, id, source, outcome, forwards);
        }
    }
}

/// Why [`Parking::send`] dropped a frame.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dropped {
    /// The link closed.
    Closed,
    /// The link's queue is full and `max_parked_frames` frames wait already.
    Full,
}

/// Ends a served call's accounting however the call ends (finished, or aborted because
/// its link closed).
struct ServingGuard {
    shared: Arc<FabricShared>,
    link: LinkId,
    key: u64,
    /// The call's place in the node-wide in-flight count, given back with the guard.
    _permit: metrics::InFlight,
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.shared.serving.lock() {
            if let Some(calls) = serving.per_link.get_mut(&self.link) {
                calls.remove(&self.key);
                if calls.is_empty() {
                    serving.per_link.remove(&self.link);
                }
            }
        }
    }
}

impl FabricBody {
    /// A call, queue or cache operation: answered, so forwarded with a way back.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            FabricBody::Call { .. }
                | FabricBody::QueueOp { .. }
                | FabricBody::CacheOp { .. }
                | FabricBody::ClusterCall { .. }
        )
    }
}

/// The target of a flooded message.
pub const BROADCAST: &str = "*";

struct PendingCleanup<'a> {
    shared: &'a FabricShared,
    id: &'a str,
}

impl Drop for PendingCleanup<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.remove(self.id);
        }
    }
}

/// Encodes a peer frame for a link queue.
pub fn frame(frame: &PeerFrame) -> OutFrame {
    OutFrame { bytes: Bytes::from(encode(frame)), kind: FrameKind::Binary }
}

/// Counts an outbound link out when it ends, however it ends.
struct WriterDone(Arc<FabricShared>);

impl Drop for WriterDone {
    fn drop(&mut self) {
        self.0.writers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What to dial, and how to keep the link.
pub struct DialSpec {
    pub url: String,
    /// How long the connect and upgrade may take.
    pub timeout: Duration,
    /// The bounds of the link's queue.
    pub queue: LinkQueue,
    /// A bridge's lane (the listener thread's index it runs on), or `None`.
    pub lane: Option<usize>,
    /// Send a websocket ping this often (bridges: the other end counts it as hearing from
    /// the link, so a lane that carries no announcements is not closed as silent).
    pub keepalive: Option<Duration>,
    /// The fabric dialling ([`LinkOpened::incarnation`]).
    pub incarnation: u64,
}

/// Dials `spec.url`, registers the link with the actor, and pumps frames until it closes.
/// The link is served by the calling thread.
pub async fn dial(spec: DialSpec, shared: Arc<FabricShared>) -> Result<(), String> {
    let DialSpec { url, timeout, queue, lane, keepalive, incarnation } = spec;
    // Nagle off: a call is one small frame that must not wait for the previous ACK.
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true);
    let (socket, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("connect timed out after {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let Some(gossip) = shared.gossip.get() else { return Err("fabric not running".into()) };
    let link = next_link_id();
    let (mut sink, mut stream) = socket.split();
    let (sender, mut frames) = Outbox::channel(queue.frames, queue.bytes);
    let (close, closed) = oneshot::channel::<()>();
    gossip.do_send(LinkOpened {
        link,
        sender,
        outbound_url: Some(url.clone()),
        close: Some(close),
        peer: url.clone(),
        thread: std::thread::current().id(),
        lane,
        incarnation: Some(incarnation),
    });
    // Counted until the peer has acknowledged our close (the reader ends): closing a socket
    // with unread input makes the kernel reset it, dropping what was still unsent.
    shared.writers.send_modify(|n| *n += 1);
    let _done = WriterDone(shared.clone());
    let writer = tokio::spawn(async move {
        let mut closed = closed;
        let mut ping = keepalive.map(|every| {
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping
        });
        let on_purpose = loop {
            tokio::select! {
                biased;
                next = frames.recv() => {
                    let Some(out) = next else { break false };
                    if sink.send(Message::Binary(out.bytes.to_vec())).await.is_err() {
                        break false;
                    }
                    frames.written(&out);
                }
                fired = &mut closed => break fired.is_ok(),
                Some(_) = async { Some(ping.as_mut()?.tick().await) }, if ping.is_some() => {
                    if sink.send(Message::Ping(Vec::new())).await.is_err() {
                        break false;
                    }
                }
            }
        };
        if on_purpose {
            let frame = CloseFrame { code: CLOSED_ON_PURPOSE.into(), reason: "link closed by fabric".into() };
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    });
    let mut on_purpose = false;
    while let Some(message) = stream.next().await {
        let bytes = match message {
            Ok(Message::Binary(bytes)) => bytes,
            Ok(Message::Text(text)) => text.into_bytes(),
            Ok(Message::Close(frame)) => {
                on_purpose = frame.is_some_and(|f| u16::from(f.code) == CLOSED_ON_PURPOSE);
                break;
            }
            Err(_) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => {
                shared.heard_on(link);
                continue;
            }
            Ok(_) => continue,
        };
        if shared.pass_through(link, &bytes) {
            continue;
        }
        match serde_json::from_slice::<PeerFrame>(&bytes) {
            Ok(frame) => shared.on_frame(link, frame, bytes.len()),
            Err(e) => warn!(peer = %url, cause = %e, "undecodable frame from peer; ignored"),
        }
    }
    writer.abort();
    shared.link_closed(link);
    if let Some(gossip) = shared.gossip.get() {
        gossip.do_send(LinkClosed { link, on_purpose });
    }
    Ok(())
}

/// Whole milliseconds from `now` until `deadline` (0 once it passed).
pub fn millis_left(deadline: std::time::Instant, now: std::time::Instant) -> u64 {
    u64::try_from(deadline.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use actix::Actor;

    use super::*;
    use crate::mailbox::MAX_MAILBOX_FRAMES_PER_LINK;
    use crate::pubsub::{BacklogLimits, PubSubLimits};
    use crate::supervisor::ChildGuard;

    fn message(i: usize) -> PubSubMessage {
        PubSubMessage {
            topic: "t".into(),
            payload: Value::from(i),
            timestamp: 0.0,
            message_id: format!("m{i}"),
            publisher: "b1".into(),
            headers: Default::default(),
            routing_path: None,
            current_hop: None,
        }
    }

    /// `message(i)` published on node b1, as a link reads it.
    fn published(i: usize) -> FabricMessage {
        FabricMessage {
            id: format!("f{i}"),
            source: "b1".into(),
            target: BROADCAST.into(),
            path: vec!["b1".into()],
            hops_left: 0,
            body: FabricBody::Publish { message: message(i) },
        }
    }

    #[actix_rt::test]
    async fn messages_a_link_hands_to_pubsub_wait_within_the_links_share_of_its_mailbox() {
        let backlog =
            BacklogLimits { seconds: 60.0, max_messages: 100, max_bytes: 1 << 20, max_message_bytes: 1 << 16 };
        let pubsub = PubSub::new(PubSubLimits::default(), backlog, Arc::default(), ChildGuard::unwatched()).start();
        let slot = Slot::default();
        slot.set(pubsub.clone());
        let me = NodeInfo { node: "a1".into(), instance_id: "i".into(), cluster_id: "a".into(), url: "ws://a1".into() };
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(
            FabricShared::new(me, 4, TableHandle::default(), slot, Default::default()).with_metrics(metrics.clone()),
        );
        // The test holds the thread: PubSub handles none of them until it awaits.
        let extra = 100;
        for i in 0..MAX_MAILBOX_FRAMES_PER_LINK + extra {
            shared.route(7, published(i), 10);
        }
        assert_eq!(metrics.fabric_dropped_count("pubsub_mailbox_full"), extra as u64);
        shared.route(8, published(1_000_000), 10);
        assert_eq!(metrics.fabric_dropped_count("pubsub_mailbox_full"), extra as u64, "another link has its own share");
        // Handled in order: once a later message is answered, the share is given back.
        let last = Arc::new(message(3_000_000));
        pubsub
            .send(pubsub::Publish { message: last, origin: pubsub::Origin::Local, ticket: None })
            .await
            .unwrap()
            .unwrap();
        shared.route(7, published(2_000_000), 10);
        assert_eq!(metrics.fabric_dropped_count("pubsub_mailbox_full"), extra as u64, "the share is given back");
    }
}
