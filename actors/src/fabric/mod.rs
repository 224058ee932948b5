//! FabricGossip: peer links, membership, catalog dissemination, GOODBYE (DESIGN.md §8).
//!
//! Who sends to it: link readers and peer connections (`LinkOpened`, `PeerFrameReceived`,
//! `LinkClosed`), the Registry (`LocalFunctionsChanged`), the node (`SayGoodbye`),
//! `cluster-status`, the discovery built-ins and the monitor (`DescribeTopology`,
//! `DescribeCatalog`, `DescribeDiscovery`, two at a time through the [`describe`] gate),
//! its own timer. Whom it calls: peers, through link queues; nobody synchronously.
//!
//! ```text
//!  dial (peers + discovered) ──► link ──STATUS──► admit (cluster, departed) ──► snapshot
//!  every gossip interval: heartbeat+1, Members digest to every link, suspect/remove,
//!                         close silent links, redial with backoff, refresh catalog at ttl/2
//!  catalog change ──► Catalog delta flooded (de-duplicated by version)
//!  digest shows a newer version ──► CatalogRequest ──► Catalog
//! ```
//!
//! Trust (DESIGN.md §8): with credentials, a link is admitted only after the three-frame
//! handshake in [`wire`] (certificate chains to the pinned authority, both sides sign the
//! other's nonce); without, after the open STATUS exchange. Gossip and routed messages
//! count only on admitted links. GOODBYE/`departed` and catalog entries carry their
//! node's signature and are dropped (counted in `mpreg_fabric_dropped_total`) when it is
//! missing or wrong; refusals are one `peer refused` WARN line each and counted in
//! `mpreg_peer_refused_total` by reason. Suspicions and removals are WARN lines too, and
//! counted in `mpreg_peer_suspected_total` and `mpreg_peer_removed_total`.
//!
//! It owns MUTATION and publishes an immutable [`FabricView`] (links, next hops, remote
//! functions) in [`FabricShared`], which the request path reads without a mailbox.
//!
//! Catalog snapshots ([`snapshot`]): with `snapshots` configured, the view of members and
//! their entries is restored from the store when the actor starts, before the first dial
//! and gossip round (restored members are `unconfirmed` until confirmed), saved every
//! `interval` when it changed (the committer thread does the I/O), and saved durably on
//! `SayGoodbye`.
//!
//! What a restart loses: links (closed and redialled, handshakes in progress included),
//! membership and remote catalog (restored from the last snapshot, unconfirmed, and
//! rebuilt from the peers' snapshots within a gossip round or two). Calls in flight
//! over a closed link fail over (retry on another provider) or answer 1005.

pub mod bridge;
pub mod describe;
mod lanes;
pub mod link;
pub mod membership;
pub mod queue_sessions;
pub mod snapshot;
pub mod swim;
pub mod trust;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, MessageResponse, ResponseFuture, WrapFuture,
};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

pub use link::{FabricShared, FabricView, LinkId, LinkLimits, LinkQueue, LinkSender, RemoteFunction, RemoteQueue};
use membership::{MemberState, MembershipCore, MembershipEvent, MembershipTiming, Refusal};
use snapshot::{CatalogSnapshot, SNAPSHOT_KEY, SNAPSHOT_TREE};
use swim::{Liveness, RetransmitQueue, Rumor, Swim, SwimConfig, SwimMessage, Transition};
use trust::{link_transcript, LinkEnd, LinkSide, StatementProof, TrustError};
use wire::{
    goodbye_text, CatalogDelta, FabricBody, FunctionAbout, GossipFrame, MemberDigest, NodeId, NodeInfo, PeerFrame,
    ServerFrame, StatusAuth,
};

use crate::discovery::{self, DescribeDiscovery, DiscoveryView, LocalFunction, NodeEntry};
use crate::function::FunctionIdentity;
use crate::mailbox::MailboxTicket;
use crate::persistence::{Batch, PersistenceHandle};
use crate::protocol::PubSubMessage;
use crate::pubsub::{Origin, Publish};
use crate::supervisor::ChildGuard;
use crate::unix_now;

/// Fabric settings.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// URLs to dial at start and keep dialling.
    pub peers: Vec<String>,
    /// Those of `peers` that are nodes of other clusters (federation bridges): our STATUS
    /// to them names no functions, queues or clusters.
    pub federation_peers: Vec<String>,
    /// Nodes learned through gossip are dialled while this node holds fewer links than
    /// this in all (0: only `peers`).
    pub fanout: usize,
    /// Links other nodes dialled to this one (admitted or mid-handshake); a further dialer
    /// is refused with the URLs of a few other members to dial instead.
    pub max_inbound_links: usize,
    /// Gossip round length.
    pub gossip_interval: Duration,
    /// Catalog timing and grace periods.
    pub timing: MembershipTiming,
    /// SWIM: probe period and timeout, indirect probes, suspicion, piggyback bounds.
    pub swim: SwimConfig,
    /// How long a dial may take.
    pub dial_timeout: Duration,
    /// Longest wait between dials of an unreachable peer.
    pub max_backoff: Duration,
    /// The bounds of each link's queue of outgoing frames.
    pub link_queue: LinkQueue,
    /// Function entries one node may have; a larger entry set is refused.
    pub max_catalog_entries_per_node: usize,
    /// Nodes not known before that one membership digest may teach.
    pub max_new_members_per_frame: usize,
    /// Dials started per gossip round.
    pub max_dials_per_round: usize,
    /// Catalog snapshots: restored at start, saved periodically and at GOODBYE; `None`:
    /// none saved, none restored.
    pub snapshots: Option<SnapshotConfig>,
}

/// Where catalog snapshots are kept and how often they are saved.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// The node's store (tree [`snapshot::SNAPSHOT_TREE`]).
    pub store: PersistenceHandle,
    /// Save this often, when the view changed since the last save.
    pub interval: Duration,
}

/// A delta's `about` reduced to what describes one of its functions, within bounds, at
/// most one per function (the rest of a peer's statement is not ours to keep).
fn prune_about(mut delta: CatalogDelta) -> CatalogDelta {
    let functions = &delta.functions;
    delta.about.retain(|a| a.within_bounds() && functions.iter().any(|f| a.describes(f)));
    delta.about.truncate(delta.functions.len());
    delta
}

/// Members a gossip round sends waiting news to (memberlist's `GossipNodes`).
const GOSSIP_FANOUT: usize = 3;
/// Member records piggybacked on one SWIM message, at most.
const RECORDS_PER_MESSAGE: usize = 8;
/// Catalog entry sets piggybacked on one SWIM message, at most.
const DELTAS_PER_MESSAGE: usize = 2;

/// A node instance's SWIM member id: `node#instance` (a restarted node is a new member).
fn member_id(info: &NodeInfo) -> String {
    format!("{}#{}", info.node, info.instance_id)
}

/// The node and instance of a SWIM member id.
fn split_member(member: &str) -> Option<(&str, &str)> {
    member.rsplit_once('#')
}

/// The longest a clean shutdown waits for its final snapshot to be durable.
const FINAL_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// A link quiet this long when a newer link to the same node is admitted is taken for one
/// the peer lost, and closed: longer than the handshakes of two nodes that dial each other
/// at once, shorter than any partition that makes a peer dial again.
const REPLACED_LINK_QUIET: Duration = Duration::from_secs(1);

/// A link was established (outbound: dialled by us; inbound: a connection spoke a peer
/// frame).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkOpened {
    /// The link.
    pub link: LinkId,
    /// Its queue.
    pub sender: LinkSender,
    /// The URL we dialled, for outbound links.
    pub outbound_url: Option<String>,
    /// Closes it: outbound links. Fired: closed on purpose (with [`link::CLOSED_ON_PURPOSE`]);
    /// dropped: the fabric is stopping (a plain close).
    pub close: Option<oneshot::Sender<()>>,
    /// The other end's address (for logs): the dialled URL or the remote socket address.
    pub peer: String,
    /// The thread serving it (a call goes out on a bridge served by its own thread when
    /// there is one).
    pub thread: std::thread::ThreadId,
    /// A lane of a bridge we dialled: the index of the listener thread it runs on.
    pub lane: Option<usize>,
    /// The fabric that dialled it (each fabric, restarted or not, draws its own number);
    /// `None`: accepted.
    pub incarnation: Option<u64>,
}

/// Closes an inbound link's connection.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CloseLink {
    /// Closed on purpose by a running fabric (with [`link::CLOSED_ON_PURPOSE`]), or because
    /// the fabric is stopping.
    pub on_purpose: bool,
}

/// A gossip or lifecycle frame arrived on a link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerFrameReceived {
    /// The link.
    pub link: LinkId,
    /// The frame.
    pub frame: PeerFrame,
    /// Its place in the link's share of this actor's mailbox.
    pub ticket: MailboxTicket,
}

/// A gossip frame routed to this node by `source`, which has no link to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoutedGossip {
    /// The node that sent it (the routed message's source).
    pub source: NodeId,
    /// The frame.
    pub frame: GossipFrame,
    /// Its place in the share of this actor's mailbox of the link it came in on.
    pub ticket: MailboxTicket,
}

/// A link closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkClosed {
    /// The link.
    pub link: LinkId,
    /// The peer closed it on purpose ([`link::CLOSED_ON_PURPOSE`]): its fabric is running,
    /// so it is not suspected for it. Any other end (a crash, a reset, a fabric stopping)
    /// suspects it at once.
    pub on_purpose: bool,
}

/// The local function table changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LocalFunctionsChanged {
    /// Every local function.
    pub functions: Vec<FunctionIdentity>,
    /// Their parameters and documentation.
    pub about: Vec<FunctionAbout>,
}

/// The local queues changed (sent by the Queue actor): advertise them in our catalog.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LocalQueuesChanged {
    /// Every local queue's name.
    pub queues: Vec<String>,
}

/// Tell every peer we are leaving; resolves once the frames are queued and the final
/// catalog snapshot is durable (or failed, or took longer than 5 s).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SayGoodbye;

/// One node in `/topology`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Name.
    pub node: String,
    /// `self`, `alive`, `suspect` or `unconfirmed` (restored from a snapshot, not yet
    /// confirmed by the node or a live peer).
    pub state: String,
    /// The rest, left out of a brief answer.
    #[serde(flatten)]
    pub detail: Option<NodeDetail>,
}

/// What `/topology` says of a node besides its state.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDetail {
    /// Instance.
    pub instance_id: String,
    /// URL.
    pub url: String,
    /// Whether this node has a live link to it.
    pub linked: bool,
    /// Next hop from here, if reachable.
    pub next_hop: Option<String>,
    /// Seconds since its heartbeat last rose.
    pub silent_s: f64,
    /// Its links, as it reports them.
    pub neighbours: Vec<String>,
}

/// `/topology`.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct Topology {
    /// This node.
    pub node: String,
    /// Its cluster.
    pub cluster_id: String,
    /// Every known node, this one first.
    pub nodes: Vec<NodeStatus>,
    /// Links: (link id, peer or null before the handshake, direction); left out of a brief
    /// answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<Vec<(LinkId, Option<String>, &'static str)>>,
    /// Peers this node began to suspect since it started (`mpreg_peer_suspected_total`).
    pub suspicions: u64,
    /// SWIM: this node's incarnation (raised each time it refutes a suspicion of itself)
    /// and local health multiplier (0: healthy; higher stretches its timeouts).
    pub incarnation: u64,
    /// See `incarnation`.
    pub local_health: u32,
    /// Updates this node still has to pass on (SWIM rumors, member records, catalog entry
    /// sets, each retransmitted a bounded number of times): 0 once all it learned is spread.
    pub pending_updates: usize,
}

/// Ask for `/topology`; `brief`: each node's name and state only, and no links (what a
/// poller of every node of a large cluster needs, at a fraction of the bytes).
#[derive(Message)]
#[rtype(result = "Topology")]
pub struct DescribeTopology {
    /// See above.
    pub brief: bool,
}

/// `/catalog`: every node's function entries.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct CatalogListing {
    /// One entry set per node.
    pub nodes: Vec<CatalogDelta>,
    /// Nodes whose entries were restored from a snapshot and are not yet confirmed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<NodeId>,
}

/// Ask for `/catalog`.
#[derive(Message)]
#[rtype(result = "CatalogListing")]
pub struct DescribeCatalog;

struct Link {
    sender: LinkSender,
    /// Set when the link is admitted (handshake complete).
    node: Option<NodeId>,
    outbound_url: Option<String>,
    close: Option<oneshot::Sender<()>>,
    /// When a frame last arrived: a gossip frame (seen here), or a routed message (counted
    /// in `routed` by the link's reader, noticed at the next tick).
    last_heard: Instant,
    /// Routed messages read on the link, shared with the view's `admitted`; on a bridge,
    /// every federation frame read on it (counted by the bridges).
    routed: Arc<AtomicU64>,
    /// `routed` as of the last tick.
    routed_seen: u64,
    /// The other end's address, for logs.
    peer: String,
    /// Our fresh nonce for this link's handshake.
    nonce: String,
    /// Acceptor with credentials: the dialer's checked STATUS, waiting for its proof.
    awaiting_proof: Option<Box<PendingPeer>>,
    /// An admitted federation bridge: the other cluster (never a member link).
    bridge: Option<String>,
    /// The thread serving it.
    thread: std::thread::ThreadId,
    /// A lane of a bridge we dialled (`outbound_url`'s): the listener thread's index.
    lane: Option<usize>,
}

/// A dialer whose STATUS and certificate checked out, before its proof of possession.
struct PendingPeer {
    info: NodeInfo,
    key: VerifyingKey,
    nonce: String,
    catalog: CatalogDelta,
    /// A node of another cluster asking for a federation bridge.
    bridge: bool,
}

/// Why a link is refused: a fixed label for `/metrics` and the words for the log and the
/// peer.
struct LinkRefusal {
    label: &'static str,
    reason: String,
}

impl LinkRefusal {
    fn new(label: &'static str, reason: impl Into<String>) -> Self {
        LinkRefusal { label, reason: reason.into() }
    }

    fn untrusted(error: TrustError) -> Self {
        let label = match error {
            TrustError::Expired { .. } => "expired_certificate",
            TrustError::Mismatch(_) => "identity_mismatch",
            _ => "untrusted",
        };
        LinkRefusal::new(label, error.to_string())
    }
}

impl From<Refusal> for LinkRefusal {
    fn from(refusal: Refusal) -> Self {
        let label = match refusal {
            Refusal::Full => "too_many_members",
            Refusal::OtherCluster(_) => "other_cluster",
            Refusal::Departed => "departed",
            Refusal::SelfLink => "self",
        };
        LinkRefusal::new(label, refusal.to_string())
    }
}

struct DialState {
    in_progress: bool,
    next_at: Instant,
    backoff: Duration,
    /// Named by a node at its inbound cap: dialled once even before it is a member.
    hinted: bool,
    /// Refused by a node at its inbound cap: not dialled again while other links exist.
    full: bool,
}

impl DialState {
    fn due_now(hinted: bool) -> Self {
        DialState { in_progress: false, next_at: Instant::now(), backoff: Duration::ZERO, hinted, full: false }
    }

    /// A dial starts: the wait before the next one doubles (200 ms at least, `max` at
    /// most), and is returned.
    fn double_backoff(&mut self, max: Duration) -> Duration {
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(200), max);
        self.backoff
    }
}

/// The FabricGossip actor.
pub struct FabricGossip {
    shared: Arc<FabricShared>,
    config: FabricConfig,
    core: MembershipCore,
    links: HashMap<LinkId, Link>,
    dials: HashMap<String, DialState>,
    /// Lanes of the bridges we dial, by URL and listener thread ([`lanes`]).
    lanes: HashMap<(String, usize), DialState>,
    /// Tells this fabric's dial tasks from those of an earlier one (restarted).
    incarnation: u64,
    epoch: Instant,
    /// Set by GOODBYE: links closing now are expected, not failures.
    leaving: bool,
    /// Fingerprint of the last snapshot saved (or restored): unchanged views are not saved.
    last_snapshot: Option<u64>,
    /// When a snapshot was last saved (or restored): an unchanged view is saved again after
    /// half the catalog TTL, so the times it records (live members heard of now) stay
    /// within the TTL that restoring checks.
    last_snapshot_at: Instant,
    /// Queues whose owner left the cluster, by name (reported unreachable, not unknown).
    departed_queues: HashMap<String, RemoteQueue>,
    /// The catalog fingerprint the discovery change log last saw.
    discovery_seen: Option<u64>,
    /// The view changed since the discovery change log last looked: it looks next round
    /// (or when asked), not on every gossip message (at 64 nodes, looking on each one
    /// was most of a node's CPU while the mesh formed).
    discovery_dirty: bool,
    /// Gossip changed what the view is built from: it is rebuilt once the messages
    /// waiting are handled (at 64 nodes forming a mesh, rebuilding after each one was a
    /// tenth of all the CPU spent), and before anything reads it here.
    view_dirty: bool,
    /// A rebuild of the view is scheduled (`view_dirty`).
    view_flush_scheduled: bool,
    /// The failure detector and liveness dissemination (pure; driven from here).
    swim: Swim,
    /// Member records to piggyback on SWIM messages, by node.
    records: RetransmitQueue<MemberDigest>,
    /// Catalog entry sets to piggyback on SWIM messages, by node.
    deltas: RetransmitQueue<CatalogDelta>,
    /// What our record last said: (links, catalog version, incarnation).
    own_record: Option<(Vec<NodeId>, u64, u64)>,
    /// Gossip rounds so far (the view is rebuilt every few even when nothing changed).
    rounds: u64,
    /// When SWIM's timers last ran (seconds since `epoch`), to notice a stalled loop.
    last_swim_tick: f64,
    /// A node whose records named more new members than one frame may teach: the rest
    /// are pulled from it next round (one push-pull a round at most).
    pull_more_from: Option<NodeId>,
    _guard: ChildGuard,
}

impl FabricGossip {
    /// A fabric for `shared.me`, serving the local functions `functions`.
    pub fn new(shared: Arc<FabricShared>, config: FabricConfig, guard: ChildGuard) -> Self {
        let table = shared.table.current();
        let mut core = MembershipCore::new(shared.me.clone(), config.timing, table.identities());
        core.set_local_about(table.about());
        let queues = shared.local_queues.lock().map(|q| q.clone()).unwrap_or_default();
        if !queues.is_empty() {
            core.set_local_queues(queues, unix_now());
        }
        let dials = config
            .peers
            .iter()
            .filter(|url| **url != shared.me.url)
            .map(|url| (url.clone(), DialState::due_now(false)))
            .collect();
        let now = Instant::now();
        // `self.now()` counts from `now`; Unix time is the clock the probe targets rotate on.
        let swim = Swim::new(member_id(&shared.me), config.swim.clone(), 0.0, rand::random()).share_clock(unix_now());
        FabricGossip {
            shared,
            config,
            core,
            links: HashMap::new(),
            dials,
            lanes: HashMap::new(),
            incarnation: rand::random(),
            epoch: now,
            leaving: false,
            last_snapshot: None,
            last_snapshot_at: now,
            departed_queues: HashMap::new(),
            discovery_seen: None,
            discovery_dirty: false,
            view_dirty: false,
            view_flush_scheduled: false,
            swim,
            records: RetransmitQueue::default(),
            deltas: RetransmitQueue::default(),
            own_record: None,
            rounds: 0,
            last_swim_tick: 0.0,
            pull_more_from: None,
            _guard: guard,
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn send(&self, link: LinkId, frame: &PeerFrame) {
        if let Some(l) = self.links.get(&link) {
            if l.sender.try_send(link::frame(frame)).is_err() {
                debug!(link, "peer link queue full or closed; gossip frame dropped");
            }
        }
    }

    fn broadcast(&self, frame: &PeerFrame, except: Option<LinkId>) {
        let out = link::frame(frame);
        for (id, l) in &self.links {
            if Some(*id) != except && l.node.is_some() && l.sender.try_send(out.clone()).is_err() {
                debug!(link = id, "peer link queue full or closed; gossip frame dropped");
            }
        }
    }

    /// Our STATUS for `link`; with credentials it carries our nonce, certificate, signed
    /// catalog and (acceptor) `proof`.
    fn status_frame(&self, link: LinkId, proof: Option<String>, bridge: bool) -> PeerFrame {
        let mut local = self.core.local_catalog(unix_now());
        if bridge {
            // Another cluster: nothing of ours beyond who we are (signed, as always).
            local.functions.clear();
            local.queues.clear();
            local.about.clear();
            local.clusters.clear();
        }
        let auth = match (&self.shared.trust, self.links.get(&link)) {
            (Some(trust), Some(l)) => Some(Box::new(StatusAuth {
                nonce: l.nonce.clone(),
                certificate: trust.certificate().clone(),
                proof,
                catalog: self.seal(local.clone()),
            })),
            _ => None,
        };
        PeerFrame::Server(ServerFrame::Status {
            info: self.shared.me.clone(),
            functions: local.functions,
            catalog_version: local.version,
            queues: local.queues,
            about: local.about,
            auth,
        })
    }

    /// Signs our own catalog entries (with credentials); others' pass unchanged.
    fn seal(&self, mut delta: CatalogDelta) -> CatalogDelta {
        if let Some(trust) = self.shared.trust.as_ref().filter(|_| delta.node == self.shared.me.node) {
            delta.proof = None;
            match serde_json::to_string(&delta) {
                Ok(text) => delta.proof = Some(trust.seal(text)),
                Err(e) => warn!(cause = %e, "catalog entries not signed"),
            }
        }
        delta
    }

    fn seal_all(&self, deltas: Vec<CatalogDelta>) -> Vec<CatalogDelta> {
        deltas.into_iter().map(|d| self.seal(d)).collect()
    }

    /// A relayed catalog delta as its owner signed it (with credentials), within bounds;
    /// `None` (dropped and counted) otherwise.
    fn checked_delta(&self, delta: CatalogDelta) -> Option<CatalogDelta> {
        let owner = delta.node.clone();
        let delta = match self.signed_delta(delta) {
            Ok(delta) => delta,
            Err(reason @ "unsigned_statement") => {
                debug!(node = %self.shared.me.node, owner = %owner, "unsigned catalog entries dropped");
                self.shared.metrics.fabric_dropped(reason);
                return None;
            }
            Err(reason) => {
                warn!(node = %self.shared.me.node, owner = %owner, "forged catalog entries dropped");
                self.shared.metrics.fabric_dropped(reason);
                return None;
            }
        };
        let delta = prune_about(delta);
        self.within_catalog_bound(&delta).then_some(delta)
    }

    /// With credentials: the entries as their owner signed them (the signed text, never
    /// the outer fields), or why not (`unsigned_statement`, `forged_statement`). Without:
    /// the delta unchanged.
    fn signed_delta(&self, delta: CatalogDelta) -> Result<CatalogDelta, &'static str> {
        let Some(trust) = &self.shared.trust else { return Ok(delta) };
        let Some(proof) = delta.proof.clone() else { return Err("unsigned_statement") };
        let signed = trust
            .open(&proof, &delta.node, trust::unix_seconds())
            .ok()
            .and_then(|text| serde_json::from_str::<CatalogDelta>(text).ok())
            .filter(|signed| signed.node == delta.node && signed.proof.is_none());
        let Some(mut signed) = signed else { return Err("forged_statement") };
        signed.proof = Some(proof);
        Ok(signed)
    }

    /// Restores the last snapshot, before the first dial and gossip round. A snapshot that
    /// cannot be read is a WARN and a counter, never a failed start.
    fn restore_snapshot(&mut self) {
        let Some(config) = &self.config.snapshots else { return };
        let me = &self.shared.me.node;
        let bytes = match config.store.get(SNAPSHOT_TREE, SNAPSHOT_KEY) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return debug!(node = %me, "no catalog snapshot to restore"),
            Err(e) => {
                warn!(node = %me, cause = %e, "catalog snapshot unreadable; starting without it");
                return self.shared.metrics.catalog_snapshot_corrupt();
            }
        };
        let snapshot = match CatalogSnapshot::decode(&bytes) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                warn!(node = %me, cause = %e, bytes = bytes.len(), "catalog snapshot corrupt; starting without it");
                return self.shared.metrics.catalog_snapshot_corrupt();
            }
        };
        let saved_at = snapshot.saved_at;
        let mut unverified = 0;
        let members = snapshot
            .members
            .into_iter()
            .map(|mut member| {
                // Signed entries are checked against this node's trust, as if just received.
                member.catalog = member.catalog.take().and_then(|mut c| {
                    let checked = self.signed_delta(c.delta).ok().filter(|d| self.within_catalog_bound(d));
                    unverified += usize::from(checked.is_none());
                    c.delta = checked?;
                    Some(c)
                });
                member
            })
            .collect();
        let outcome = self.core.restore(members, self.now(), unix_now());
        if unverified > 0 {
            warn!(node = %self.shared.me.node, entry_sets = unverified,
                "restored catalog entries that fail this node's trust dropped");
        }
        info!(node = %self.shared.me.node, members = outcome.members, entries = outcome.entries,
            dropped = outcome.dropped + unverified, saved_at, "catalog snapshot restored (members unconfirmed)");
        self.shared.metrics.catalog_snapshot_restored(unix_now(), outcome.entries as u64, outcome.members as u64);
        self.last_snapshot = Some(self.build_snapshot().fingerprint());
    }

    /// Restores the federation snapshot (route table, keys learned), so a restarted bridge
    /// node routes as soon as its bridges are back, before the first announcements.
    fn restore_federation_snapshot(&mut self) {
        let (Some(config), Some(bridges)) = (&self.config.snapshots, &self.shared.bridges) else { return };
        let me = &self.shared.me.node;
        match config.store.get(bridge::SNAPSHOT_TREE, bridge::SNAPSHOT_KEY) {
            Ok(Some(bytes)) => match bridges.restore(&bytes) {
                Ok(routes) => info!(node = %me, routes, "federation snapshot restored"),
                Err(e) => warn!(node = %me, cause = %e, "federation snapshot unusable; starting without it"),
            },
            Ok(None) => debug!(node = %me, "no federation snapshot to restore"),
            Err(e) => warn!(node = %me, cause = %e, "federation snapshot unreadable; starting without it"),
        }
    }

    /// Saves the federation state (the committer thread does the I/O).
    fn save_federation_snapshot(&mut self, ctx: &mut Context<Self>) {
        let (Some(config), Some(bridges)) = (&self.config.snapshots, &self.shared.bridges) else { return };
        let Some(bytes) = bridges.snapshot_bytes() else { return };
        let batch = Batch::new().put(bridge::SNAPSHOT_TREE, bridge::SNAPSHOT_KEY, bytes);
        let store = config.store.clone();
        ctx.spawn(async move { store.commit(batch).await }.into_actor(self).map(|result, act, _| {
            if let Err(e) = result {
                warn!(node = %act.shared.me.node, cause = %e, "federation snapshot not saved; will retry");
            }
        }));
    }

    fn build_snapshot(&self) -> CatalogSnapshot {
        let now_unix = unix_now();
        CatalogSnapshot::new(&self.shared.me, now_unix, self.core.snapshot(self.now(), now_unix))
    }

    /// Saves the view if it changed since the last save. The store's committer thread does
    /// the I/O; a failed save is retried at the next interval.
    fn save_snapshot_if_changed(&mut self, ctx: &mut Context<Self>) {
        let Some(config) = &self.config.snapshots else { return };
        let snapshot = self.build_snapshot();
        let fingerprint = snapshot.fingerprint();
        let recent = self.last_snapshot_at.elapsed().as_secs_f64() < self.config.timing.catalog_ttl / 2.0;
        if self.last_snapshot == Some(fingerprint) && recent {
            return;
        }
        let batch = match snapshot.encode() {
            Ok(bytes) => Batch::new().put(SNAPSHOT_TREE, SNAPSHOT_KEY, bytes),
            Err(e) => return warn!(node = %self.shared.me.node, cause = %e, "catalog snapshot not encoded"),
        };
        self.last_snapshot = Some(fingerprint);
        self.last_snapshot_at = Instant::now();
        let store = config.store.clone();
        let saved_at = snapshot.saved_at;
        ctx.spawn(async move { store.commit(batch).await }.into_actor(self).map(move |result, act, _| match result {
            Ok(()) => act.shared.metrics.catalog_snapshot_saved(saved_at),
            Err(e) => {
                warn!(node = %act.shared.me.node, cause = %e, "catalog snapshot not saved; will retry");
                act.shared.metrics.catalog_snapshot_save_failed();
                act.last_snapshot = None;
            }
        }));
    }

    /// Whether an entry set is within `max_catalog_entries_per_node` (refusals counted).
    fn within_catalog_bound(&self, delta: &CatalogDelta) -> bool {
        let limit = self.config.max_catalog_entries_per_node;
        if delta.functions.len() <= limit {
            return true;
        }
        warn!(node = %self.shared.me.node, owner = %delta.node, entries = delta.functions.len(), limit,
            "catalog entries over max_catalog_entries_per_node refused");
        self.shared.metrics.limit_exceeded("max_catalog_entries_per_node");
        false
    }

    /// A GOODBYE or `departed` for `node`/`instance`: with credentials, only with that
    /// node's own signature over the exact GOODBYE text.
    fn checked_goodbye(&self, node: &str, instance: &str, proof: Option<&StatementProof>) -> bool {
        let Some(trust) = &self.shared.trust else { return true };
        let Some(proof) = proof else {
            debug!(node = %self.shared.me.node, peer = %node, "unsigned departure dropped");
            self.shared.metrics.fabric_dropped("unsigned_statement");
            return false;
        };
        let expected = goodbye_text(&self.shared.me.cluster_id, node, instance);
        match trust.open(proof, node, trust::unix_seconds()) {
            Ok(text) if text == expected => true,
            _ => {
                warn!(node = %self.shared.me.node, peer = %node, "forged departure dropped");
                self.shared.metrics.fabric_dropped("forged_statement");
                false
            }
        }
    }

    /// Refuses a link: one WARN line, a counter, the reason to the peer, then close.
    fn refuse(&mut self, link: LinkId, claimed: &str, refusal: LinkRefusal) {
        let addr = self.links.get(&link).map(|l| l.peer.clone()).unwrap_or_default();
        warn!(node = %self.shared.me.node, peer = %claimed, addr = %addr, reason = %refusal.reason,
            label = refusal.label, "peer refused");
        self.shared.metrics.peer_refused(refusal.label);
        self.send(link, &PeerFrame::Server(ServerFrame::Refused { reason: refusal.reason, try_instead: Vec::new() }));
        self.close_link(link);
    }

    /// Links other nodes dialled to this one, admitted or mid-handshake, besides `link`.
    fn inbound_links(&self, link: LinkId) -> usize {
        self.links
            .iter()
            .filter(|(id, l)| **id != link && l.outbound_url.is_none())
            .filter(|(_, l)| l.node.is_some() || l.awaiting_proof.is_some())
            .count()
    }

    /// Refuses a dialer because this node holds `max_inbound_links` inbound links, naming
    /// up to `fanout` other alive members to dial instead, counted as
    /// `mpreg_peer_refused_total{reason="full"}`. Members whose records list fewer links
    /// than the cap (sure to have room) come first, each group in random order: preferring
    /// the members with the fewest links would send every joiner to the newest ones and
    /// grow the cluster into a chain, whose paths outrun the hop budget.
    fn refuse_full(&mut self, link: LinkId, dialer: &NodeInfo) {
        let cap = self.config.max_inbound_links;
        let mut others: Vec<(bool, u64, String)> = self
            .core
            .members()
            .filter(|m| m.state == MemberState::Alive && m.info.node != dialer.node && m.info.url != dialer.url)
            .map(|m| (m.neighbours.len() >= cap, rand::random::<u64>(), m.info.url.clone()))
            .collect();
        others.sort_unstable();
        let try_instead: Vec<String> =
            others.into_iter().take(self.config.fanout.max(1)).map(|(_, _, url)| url).collect();
        debug!(node = %self.shared.me.node, peer = %dialer.node, others = try_instead.len(),
            "inbound links at max_inbound_links; dialer refused");
        self.shared.metrics.peer_refused("full");
        let reason = format!("this node holds its most inbound links ({})", self.config.max_inbound_links);
        self.send(link, &PeerFrame::Server(ServerFrame::Refused { reason, try_instead }));
        self.close_link(link);
    }

    /// Dials, once each, URLs a node at its inbound cap named (a few at most; never our own).
    fn dial_instead(&mut self, urls: Vec<String>) {
        let limit = self.config.fanout.max(1);
        for url in urls.into_iter().filter(|u| *u != self.shared.me.url).take(limit) {
            self.dials.entry(url).or_insert_with(|| DialState::due_now(true));
        }
    }

    fn members_frame(&self) -> PeerFrame {
        PeerFrame::FabricGossip(GossipFrame::Members { from: self.shared.me.node.clone(), members: self.core.digest() })
    }

    /// Logs and counts membership events, and releases what a removed node held in this
    /// node's queues.
    fn log_events(&self, events: &[MembershipEvent]) {
        let me = &self.shared.me.node;
        for event in events {
            match event {
                MembershipEvent::Joined(node, instance) => {
                    info!(node = %me, peer = %node, instance = %instance, "peer joined")
                }
                MembershipEvent::Suspected(node) => {
                    self.shared.metrics.peer_suspected();
                    warn!(node = %me, peer = %node, "peer suspected")
                }
                MembershipEvent::Recovered(node) => info!(node = %me, peer = %node, "peer recovered"),
                MembershipEvent::Removed(node) => {
                    self.shared.metrics.peer_removed();
                    self.shared.queue_source_gone(node);
                    warn!(node = %me, peer = %node, "peer removed")
                }
                MembershipEvent::Departed(node) => info!(node = %me, peer = %node, "peer goodbye"),
                MembershipEvent::Confirmed(node) => info!(node = %me, peer = %node, "restored peer confirmed"),
            }
        }
    }

    fn direct_nodes(&self) -> HashSet<NodeId> {
        self.links.values().filter_map(|l| l.node.clone()).collect()
    }

    /// Rebuilds the view if gossip changed it (`view_dirty`).
    fn flush_view(&mut self) {
        if self.view_dirty {
            self.rebuild_view();
        }
    }

    /// Lets the discovery change log look at a view that changed since it last did.
    fn flush_discovery(&mut self) {
        if self.discovery_dirty {
            self.observe_catalog();
        }
    }

    /// Schedules the rebuild of a view gossip changed, after the messages waiting now.
    fn schedule_view_flush(&mut self, ctx: &mut Context<Self>) {
        if self.view_dirty && !self.view_flush_scheduled {
            self.view_flush_scheduled = true;
            ctx.run_later(Duration::ZERO, |act, _| {
                act.view_flush_scheduled = false;
                act.flush_view();
            });
        }
    }

    /// Publishes a new routing snapshot.
    fn rebuild_view(&mut self) {
        self.view_dirty = false;
        let direct = self.direct_nodes();
        let mut neighbours: Vec<NodeId> = direct.iter().cloned().collect();
        neighbours.sort();
        self.refresh_own_record(neighbours);
        let mut links = HashMap::new();
        let mut admitted = HashMap::new();
        // The newest link to a node wins: a peer dials again only once it has lost its
        // older link, which may still look open here (a partition resets nothing).
        let mut ids: Vec<&LinkId> = self.links.keys().collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids {
            let l = &self.links[id];
            if let Some(node) = &l.node {
                links.entry(node.clone()).or_insert_with(|| (*id, l.sender.clone()));
                admitted.insert(*id, (node.clone(), l.sender.clone(), l.routed.clone()));
            }
        }
        let mut next_hops = self.core.next_hops(&direct);
        let suspects: HashSet<&str> =
            self.core.members().filter(|m| m.state == MemberState::Suspect).map(|m| m.info.node.as_str()).collect();
        next_hops.retain(|node, _| !suspects.contains(node.as_str()) || direct.contains(node));
        let remote = |(node, cluster_id, identity)| RemoteFunction { node, cluster_id, identity };
        // Restored (unconfirmed) members are routed like alive ones: called when a route
        // exists, else known but unreachable (1005, or another provider).
        let (functions, unreachable): (Vec<_>, Vec<_>) = self
            .core
            .functions_of(MemberState::Alive)
            .into_iter()
            .chain(self.core.functions_of(MemberState::Unconfirmed))
            .map(remote)
            .partition(|f| next_hops.contains_key(&f.node));
        let suspected = self.core.functions_of(MemberState::Suspect).into_iter().map(remote);
        let unreachable = unreachable.into_iter().chain(suspected).collect();
        let mut queues = HashMap::new();
        let mut unreachable_queues = HashMap::new();
        for state in [MemberState::Alive, MemberState::Unconfirmed, MemberState::Suspect] {
            for (name, node, url) in self.core.queues_of(state) {
                let remote = RemoteQueue { node, url };
                if state != MemberState::Suspect && next_hops.contains_key(&remote.node) {
                    queues.insert(name, remote);
                } else {
                    unreachable_queues.insert(name, remote);
                }
            }
        }
        // A queue whose owner left (GOODBYE) or was removed is still its owner's: its
        // operations fail with 1005 (owner down), not 1001, until the owner is back.
        let members: HashSet<NodeId> = self.core.members().map(|m| m.info.node.clone()).collect();
        let previous = self.shared.view.load();
        for (name, owner) in previous.queues.iter().chain(previous.unreachable_queues.iter()) {
            if !members.contains(&owner.node) && !queues.contains_key(name) && !unreachable_queues.contains_key(name) {
                self.departed_queues.insert(name.clone(), owner.clone());
            }
        }
        drop(previous);
        self.departed_queues.retain(|name, owner| {
            !members.contains(&owner.node) && !queues.contains_key(name) && !unreachable_queues.contains_key(name)
        });
        for (name, owner) in &self.departed_queues {
            unreachable_queues.insert(name.clone(), owner.clone());
        }
        let mut clusters: HashMap<String, Vec<NodeId>> = HashMap::new();
        for state in [MemberState::Alive, MemberState::Unconfirmed] {
            for (cluster, node) in self.core.clusters_of(state) {
                if next_hops.contains_key(&node) {
                    clusters.entry(cluster).or_default().push(node);
                }
            }
        }
        for nodes in clusters.values_mut() {
            nodes.sort();
        }
        self.shared.view.store(Arc::new(FabricView {
            links,
            next_hops,
            functions,
            unreachable,
            admitted,
            queues,
            unreachable_queues,
            clusters,
        }));
        self.discovery_dirty = true;
    }

    /// This node and every member that is called (alive, or restored and not yet
    /// confirmed), with their catalog entries, as discovery shows them.
    fn discovery_nodes(&self) -> Vec<NodeEntry> {
        let (unix, now) = (unix_now(), self.now());
        let local = self.core.local_catalog(unix);
        let mut nodes = vec![NodeEntry {
            info: self.shared.me.clone(),
            status: "ok",
            last_seen: unix,
            advertised_at: local.advertised_at,
            ttl_s: local.ttl_s,
            functions: local.functions,
            queues: local.queues,
            about: local.about,
        }];
        let catalogs: HashMap<NodeId, CatalogDelta> =
            self.core.catalog_entries().into_iter().map(|(d, _)| (d.node.clone(), d)).collect();
        let mut members: Vec<NodeEntry> = self
            .core
            .members()
            .filter(|m| m.state != MemberState::Suspect)
            .map(|m| {
                let catalog = catalogs.get(&m.info.node).filter(|c| c.instance_id == m.info.instance_id);
                NodeEntry {
                    info: m.info.clone(),
                    status: if m.state == MemberState::Unconfirmed { "unconfirmed" } else { "ok" },
                    last_seen: unix - (now - m.heard_at).max(0.0),
                    advertised_at: catalog.map_or(0.0, |c| c.advertised_at),
                    ttl_s: catalog.map_or(0.0, |c| c.ttl_s),
                    functions: catalog.map(|c| c.functions.clone()).unwrap_or_default(),
                    queues: catalog.map(|c| c.queues.clone()).unwrap_or_default(),
                    about: catalog.map(|c| c.about.clone()).unwrap_or_default(),
                }
            })
            .collect();
        members.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        nodes.extend(members);
        nodes
    }

    /// Records a catalog change for `catalog_watch` and publishes it, with the new service
    /// summaries, to this node's subscribers of the discovery topics (delivered here only:
    /// every node publishes its own view).
    fn observe_catalog(&mut self) {
        self.discovery_dirty = false;
        let fingerprint = self.core.discovery_fingerprint();
        if self.discovery_seen.replace(fingerprint) == Some(fingerprint) {
            return;
        }
        let nodes = self.discovery_nodes();
        let now = unix_now();
        let change = match self.shared.discovery_log.lock() {
            Ok(mut log) => log.observe(now, discovery::catalog_entries(&nodes)),
            Err(_) => None,
        };
        let (Some(change), Some(pubsub)) = (change, self.shared.pubsub.get()) else { return };
        let me = &self.shared.me;
        let publish = |topic: &str, event: &str, payload: serde_json::Value| {
            let mut headers = serde_json::Map::new();
            headers.insert("event".into(), event.into());
            headers.insert("cluster_id".into(), me.cluster_id.clone().into());
            let message = PubSubMessage {
                topic: topic.to_owned(),
                payload,
                timestamp: now,
                message_id: format!("{}-{}-{topic}-{}", me.node, me.instance_id, change.version),
                publisher: me.node.clone(),
                headers,
                routing_path: None,
                current_hop: None,
            };
            pubsub.do_send(Publish { message: Arc::new(message), origin: Origin::Peer, ticket: None });
        };
        let summaries = discovery::summaries_of(me, &nodes, now);
        publish(
            discovery::DELTA_TOPIC,
            "discovery.catalog_delta",
            serde_json::json!({"change": change, "source_node": me.node, "source_cluster": me.cluster_id}),
        );
        publish(
            discovery::SUMMARY_TOPIC,
            "discovery.summary",
            serde_json::json!({"summaries": summaries, "source_node": me.node, "source_cluster": me.cluster_id,
                "published_at": now, "version": change.version}),
        );
    }

    fn close_link(&mut self, link: LinkId) {
        if let Some(mut l) = self.links.remove(&link) {
            if let Some(close) = l.close.take() {
                let _ = close.send(());
            }
            self.shared.close_inbound(link, true);
            self.link_gone(link, l, true);
        }
    }

    /// `link` is gone; its node, when no other link to it is left and `suspect`, is
    /// suspected at once.
    fn link_gone(&mut self, link: LinkId, l: Link, suspect: bool) {
        self.shared.link_closed(link);
        if let Some(url) = &l.outbound_url {
            if let Some(dial) = self.dial_state(url, l.lane) {
                dial.in_progress = false;
            }
            if l.lane.is_none() && l.bridge.is_some() {
                self.close_lanes(url);
            }
        }
        if let Some(node) = l.node.as_ref().filter(|_| !self.leaving) {
            let still_linked = self.links.values().any(|o| o.node.as_ref() == Some(node));
            if !still_linked {
                info!(node = %self.shared.me.node, peer = %node, link, suspected = suspect, "link lost");
                // Suspected at once (a crash closes the link); it refutes if it is alive.
                let member = self.core.record_of(node).map(|(instance, _)| format!("{node}#{instance}"));
                if let Some(member) = member.filter(|_| suspect) {
                    let changes = self.swim.suspect(&member, self.now());
                    self.apply_transitions(changes);
                }
            }
        }
        self.rebuild_view();
    }

    /// A STATUS on `link`. Open mode: admit (the acceptor answers with its own STATUS).
    /// With credentials: check the certificate; the dialer then checks the acceptor's
    /// proof, sends its own and admits; the acceptor answers with its STATUS and proof
    /// and waits for the dialer's.
    fn on_status(
        &mut self,
        link: LinkId,
        info: NodeInfo,
        (functions, queues, about): (Vec<FunctionIdentity>, Vec<String>, Vec<FunctionAbout>),
        version: u64,
        auth: Option<Box<StatusAuth>>,
    ) {
        let Some(l) = self.links.get(&link) else { return };
        if l.node.is_some() || l.awaiting_proof.is_some() || l.bridge.is_some() {
            // One handshake per link: a second STATUS cannot change who the link is.
            debug!(node = %self.shared.me.node, link, claimed = %info.node, "STATUS on a link already introduced ignored");
            return;
        }
        let outbound = l.outbound_url.is_some();
        let my_nonce = l.nonce.clone();
        if info.cluster_id != self.shared.me.cluster_id {
            if let Some(bridges) = self.shared.bridges.clone() {
                return self.on_bridge_status(link, info, auth, &bridges, my_nonce);
            }
        }
        if let Err(refusal) = self.core.check(&info, self.now()) {
            return self.refuse(link, &info.node, refusal.into());
        }
        // A dialer is refused for our inbound cap only once its certificate chains to our
        // authority (with credentials), so the members named to it are not told to a
        // process without one; in open mode anyone may join anyway.
        let full = !outbound && self.inbound_links(link) >= self.config.max_inbound_links;
        let (trust, auth) = match (self.shared.trust.clone(), auth) {
            (None, None) if full => return self.refuse_full(link, &info),
            (None, None) => {
                let delta = CatalogDelta {
                    node: info.node.clone(),
                    instance_id: info.instance_id.clone(),
                    cluster_id: info.cluster_id.clone(),
                    version,
                    advertised_at: unix_now(),
                    ttl_s: self.config.timing.catalog_ttl,
                    functions,
                    queues,
                    about,
                    clusters: Vec::new(),
                    proof: None,
                };
                return self.admit(link, info, prune_about(delta), !outbound);
            }
            (None, Some(_)) => {
                let refusal = LinkRefusal::new(
                    "unexpected_credentials",
                    "peer presents credentials but this node has none (open mode); links between the two never form",
                );
                return self.refuse(link, &info.node, refusal);
            }
            (Some(_), None) => {
                let refusal =
                    LinkRefusal::new("no_credentials", "peer presents no credentials; this cluster requires them");
                return self.refuse(link, &info.node, refusal);
            }
            (Some(trust), Some(auth)) => (trust, auth),
        };
        let now_s = trust::unix_seconds();
        let key = match trust.check_peer(&auth.certificate, &info.node, now_s) {
            Ok(key) => key,
            Err(e) => return self.refuse(link, &info.node, LinkRefusal::untrusted(e)),
        };
        let catalog = match self.checked_delta(auth.catalog) {
            Some(c) if c.node == info.node && c.instance_id == info.instance_id => c,
            _ => {
                let refusal = LinkRefusal::new("bad_catalog", "the STATUS catalog is not the peer's own, signed");
                return self.refuse(link, &info.node, refusal);
            }
        };
        if full {
            return self.refuse_full(link, &info);
        }
        let me = &self.shared.me;
        let mine = LinkEnd { node: &me.node, instance_id: &me.instance_id, nonce: &my_nonce };
        let theirs = LinkEnd { node: &info.node, instance_id: &info.instance_id, nonce: &auth.nonce };
        if outbound {
            // We dialled: this is the acceptor's answer, and it must prove possession.
            let transcript = link_transcript(LinkSide::Acceptor, &me.cluster_id, mine, theirs);
            let proven = auth.proof.as_deref().is_some_and(|p| trust::verify_hex(&key, &transcript, p).is_ok());
            if !proven {
                let refusal = LinkRefusal::new("bad_proof", "the acceptor's handshake proof does not verify");
                return self.refuse(link, &info.node, refusal);
            }
            let signature = trust.sign_hex(&link_transcript(LinkSide::Dialer, &me.cluster_id, mine, theirs));
            self.send(link, &PeerFrame::Server(ServerFrame::Proof { signature }));
            self.admit(link, info, catalog, false);
        } else {
            let transcript = link_transcript(LinkSide::Acceptor, &me.cluster_id, theirs, mine);
            let proof = trust.sign_hex(&transcript);
            let status = self.status_frame(link, Some(proof), false);
            self.send(link, &status);
            if let Some(l) = self.links.get_mut(&link) {
                l.awaiting_proof = Some(Box::new(PendingPeer { info, key, nonce: auth.nonce, catalog, bridge: false }));
            }
        }
    }

    /// The dialer's proof of possession, on a link we accepted.
    fn on_proof(&mut self, link: LinkId, signature: &str) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let Some(pending) = l.awaiting_proof.take() else {
            let claimed = l.node.clone().unwrap_or_default();
            let refusal = LinkRefusal::new("protocol", "handshake proof out of turn");
            return self.refuse(link, &claimed, refusal);
        };
        let me = &self.shared.me;
        let dialer =
            LinkEnd { node: &pending.info.node, instance_id: &pending.info.instance_id, nonce: &pending.nonce };
        let acceptor = LinkEnd { node: &me.node, instance_id: &me.instance_id, nonce: &l.nonce };
        let label = if pending.bridge {
            trust::bridge_label(&pending.info.cluster_id, &me.cluster_id)
        } else {
            me.cluster_id.clone()
        };
        let transcript = link_transcript(LinkSide::Dialer, &label, dialer, acceptor);
        if trust::verify_hex(&pending.key, &transcript, signature).is_err() {
            let refusal = LinkRefusal::new("bad_proof", "the dialer's handshake proof does not verify");
            return self.refuse(link, &pending.info.node, refusal);
        }
        let PendingPeer { info, catalog, bridge, .. } = *pending;
        if bridge {
            self.bridge_admit(link, &info);
        } else {
            self.admit(link, info, catalog, false);
        }
    }

    /// A STATUS from a node of another cluster, on a node with federation bridges: the
    /// same credentialed handshake, but the certificate must chain to the authority pinned
    /// for that cluster (which must be allowed), and the transcripts name both clusters.
    /// Admitted, the link is a bridge: federation frames only, never a member.
    fn on_bridge_status(
        &mut self,
        link: LinkId,
        info: NodeInfo,
        auth: Option<Box<StatusAuth>>,
        bridges: &bridge::Bridges,
        my_nonce: String,
    ) {
        let outbound = self.links.get(&link).is_some_and(|l| l.outbound_url.is_some());
        let (Some(trust), Some(auth)) = (self.shared.trust.clone(), auth) else {
            let refusal =
                LinkRefusal::new("federation_no_credentials", "a federation bridge needs credentials on both sides");
            return self.refuse(link, &info.node, refusal);
        };
        let authority = match bridges.authority_for(&info.cluster_id) {
            Ok(authority) => *authority,
            Err(reason) => return self.refuse(link, &info.node, LinkRefusal::new("federation_refused", reason)),
        };
        let now_s = trust::unix_seconds();
        let key = match trust::check_certificate(&authority, &auth.certificate, &info.node, &info.cluster_id, now_s) {
            Ok(key) => key,
            Err(e) => return self.refuse(link, &info.node, LinkRefusal::untrusted(e)),
        };
        let me = &self.shared.me;
        let mine = LinkEnd { node: &me.node, instance_id: &me.instance_id, nonce: &my_nonce };
        let theirs = LinkEnd { node: &info.node, instance_id: &info.instance_id, nonce: &auth.nonce };
        if outbound {
            let label = trust::bridge_label(&me.cluster_id, &info.cluster_id);
            let transcript = link_transcript(LinkSide::Acceptor, &label, mine, theirs);
            let proven = auth.proof.as_deref().is_some_and(|p| trust::verify_hex(&key, &transcript, p).is_ok());
            if !proven {
                let refusal = LinkRefusal::new("bad_proof", "the acceptor's handshake proof does not verify");
                return self.refuse(link, &info.node, refusal);
            }
            let signature = trust.sign_hex(&link_transcript(LinkSide::Dialer, &label, mine, theirs));
            self.send(link, &PeerFrame::Server(ServerFrame::Proof { signature }));
            self.bridge_admit(link, &info);
        } else {
            let label = trust::bridge_label(&info.cluster_id, &me.cluster_id);
            let proof = trust.sign_hex(&link_transcript(LinkSide::Acceptor, &label, theirs, mine));
            let status = self.status_frame(link, Some(proof), true);
            self.send(link, &status);
            let pending = PendingPeer { info, key, nonce: auth.nonce, catalog: auth.catalog, bridge: true };
            if let Some(l) = self.links.get_mut(&link) {
                l.awaiting_proof = Some(Box::new(pending));
            }
        }
    }

    /// A bridge's handshake completed: the bridges take it over.
    fn bridge_admit(&mut self, link: LinkId, info: &NodeInfo) {
        let Some(bridges) = self.shared.bridges.clone() else { return };
        if self.orphan_lane(link) {
            // Its bridge closed while it was dialled: it goes too, never used.
            return self.close_link(link);
        }
        if bridges.links_to(&info.cluster_id, &info.node) >= lanes::MAX_BRIDGE_LINKS_PER_NODE {
            let reason = format!(
                "{} bridge links to node {} are open already, the most a node may hold (its bridge and a lane per listener thread)",
                lanes::MAX_BRIDGE_LINKS_PER_NODE,
                info.node
            );
            self.back_off(link);
            return self.refuse(link, &info.node, LinkRefusal::new("bridge_links", reason));
        }
        let Some(l) = self.links.get_mut(&link) else { return };
        l.bridge = Some(info.cluster_id.clone());
        let peer = bridge::BridgePeer { cluster: &info.cluster_id, node: &info.node, thread: l.thread };
        bridges.bridge_up(link, peer, l.sender.clone(), l.routed.clone());
        if l.lane.is_none() && l.outbound_url.is_some() {
            // A bridge we dialled: its lanes at once (calls may follow right away).
            self.dial_lanes();
        }
    }

    /// Admits a peer whose handshake completed: learns it, sends it our view, floods its
    /// entries. `answer_status`: open-mode acceptor, which answers with its own STATUS.
    fn admit(&mut self, link: LinkId, info: NodeInfo, delta: CatalogDelta, answer_status: bool) {
        let now = self.now();
        match self.core.admit(&info, now) {
            Err(refusal) => self.refuse(link, &info.node, refusal.into()),
            Ok(events) => {
                let Some(l) = self.links.get_mut(&link) else { return };
                let first = l.node.is_none();
                l.node = Some(info.node.clone());
                self.log_events(&events);
                let member = member_id(&info);
                let changes =
                    self.swim.learn(Rumor { member: member.clone(), incarnation: 0, liveness: Liveness::Alive }, now);
                self.apply_transitions(changes);
                if first && answer_status {
                    self.send(link, &self.status_frame(link, None, false));
                }
                if first {
                    self.close_replaced_links(link, &info.node);
                }
                let news = self.within_catalog_bound(&delta) && self.core.apply_catalog(&delta, now);
                // Publish the link as admitted before anything else goes out on it.
                self.rebuild_view();
                if first {
                    let from = self.shared.me.node.clone();
                    // Membership first: catalogs are stored only for members.
                    self.send(link, &self.members_frame());
                    let snapshot = self.seal_all(self.core.all_catalogs(unix_now()));
                    self.send(link, &PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: snapshot }));
                    // SWIM's lists both ways: a suspicion of the peer reaches it (it refutes).
                    let out = self.swim.join(&member);
                    self.swim_send(out);
                }
                if news {
                    let from = self.shared.me.node.clone();
                    let frame = PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] });
                    self.broadcast(&frame, Some(link));
                }
            }
        }
    }

    fn on_departed(&mut self, link: Option<LinkId>, node: &str, instance: &str, proof: Option<StatementProof>) {
        if !self.checked_goodbye(node, instance, proof.as_ref()) {
            return;
        }
        let now = self.now();
        let known = self.core.members().any(|m| m.info.node == node && m.info.instance_id == instance);
        if !self.core.depart(node, instance, now) {
            return;
        }
        // Its clients may have used our queues through a route even if we never heard of
        // it as a member (a GOODBYE soon after it joined): release what they hold.
        self.shared.queue_source_gone(node);
        if known {
            self.log_events(&[MembershipEvent::Departed(node.to_owned())]);
        }
        // Never probed again, and no stale rumor brings it back.
        let member = format!("{node}#{instance}");
        let incarnation = self.swim.incarnation_of(&member).unwrap_or(0);
        self.swim.learn(Rumor { member, incarnation, liveness: Liveness::Left }, now);
        let frame = PeerFrame::FabricGossip(GossipFrame::Departed {
            from: self.shared.me.node.clone(),
            node: node.to_owned(),
            instance_id: instance.to_owned(),
            proof,
        });
        self.broadcast(&frame, link);
        let to_close: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.node.as_deref() == Some(node)).map(|(id, _)| *id).collect();
        for id in to_close {
            self.close_link(id);
        }
        self.rebuild_view();
    }

    /// A gossip frame from `sender`: on its admitted `link`, or routed (`None`).
    fn on_gossip(&mut self, link: Option<LinkId>, sender: &NodeId, frame: GossipFrame) {
        let now = self.now();
        match frame {
            GossipFrame::Members { members, .. } => {
                if self.apply_records(link, sender, members) {
                    self.view_dirty = true;
                }
            }
            GossipFrame::Catalog { deltas, .. } => {
                // One entry set per member at most: the first for each node, and only those
                // that would be news, have their signatures checked.
                let mut seen = HashSet::new();
                let candidates: Vec<CatalogDelta> = deltas
                    .into_iter()
                    .take(self.config.swim.max_push_pull_members)
                    .filter(|d| seen.insert(d.node.clone()) && self.core.catalog_is_news(d, now))
                    .collect();
                let checked: Vec<CatalogDelta> = candidates.into_iter().filter_map(|d| self.checked_delta(d)).collect();
                let news: Vec<CatalogDelta> = checked.into_iter().filter(|d| self.core.apply_catalog(d, now)).collect();
                if !news.is_empty() {
                    let from = self.shared.me.node.clone();
                    self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: news }), link);
                    self.view_dirty = true;
                }
            }
            GossipFrame::CatalogRequest { nodes, .. } => {
                // Each node once: a request naming one node thousands of times would have its
                // entry set copied (and ours signed) as many times.
                let mut seen = HashSet::new();
                let nodes: Vec<NodeId> = nodes
                    .into_iter()
                    .take(self.config.swim.max_push_pull_members)
                    .filter(|n| seen.insert(n.clone()))
                    .collect();
                let deltas = self.seal_all(self.core.catalogs_of(&nodes, unix_now()));
                let from = self.shared.me.node.clone();
                self.gossip_to(link, sender, GossipFrame::Catalog { from, deltas });
            }
            GossipFrame::Departed { node, instance_id, proof, .. } => {
                self.on_departed(link, &node, &instance_id, proof)
            }
            GossipFrame::Swim { from, to, message, records, deltas } => {
                self.on_swim(link, sender, (from, to, message), records, deltas)
            }
        }
    }

    /// A SWIM message from `sender`, with its piggybacked records and entry sets.
    fn on_swim(
        &mut self,
        link: Option<LinkId>,
        sender: &NodeId,
        (from, to, message): (String, String, SwimMessage),
        records: Vec<MemberDigest>,
        deltas: Vec<CatalogDelta>,
    ) {
        if to != member_id(&self.shared.me) || split_member(&from).is_none_or(|(node, _)| node != sender) {
            // For an earlier instance of this node, or not from the node that sent it.
            debug!(node = %self.shared.me.node, sender = %sender, from = %from, to = %to, "SWIM message not for us dropped");
            self.shared.metrics.fabric_dropped("swim_misaddressed");
            return;
        }
        let now = self.now();
        let bound = self.config.swim.max_push_pull_members;
        let mut changed = self.apply_records(link, sender, records.into_iter().take(bound).collect());
        for delta in deltas.into_iter().take(DELTAS_PER_MESSAGE) {
            if !self.core.catalog_is_news(&delta, now) {
                continue;
            }
            let Some(delta) = self.checked_delta(delta) else { continue };
            if self.core.apply_catalog(&delta, now) {
                changed = true;
                let owner = delta.node.clone();
                self.deltas.push(&owner, delta, self.config.swim.max_pending_rumors);
            }
        }
        if !self.knows_member(&from) {
            // An instance of the sender we hold no record of (invented, or its record has
            // not reached us yet): SWIM would start tracking it, and pass it on. A ping is
            // still acked, bare (a joiner whose record is on its way is not left to probe
            // us indirectly), and the sender's records are pulled next round.
            debug!(node = %self.shared.me.node, sender = %sender, from = %from, "SWIM message from an unknown instance dropped");
            self.shared.metrics.fabric_dropped("swim_unknown_member");
            if let SwimMessage::Ping { seq, .. } = message {
                let ack = SwimMessage::Ack { seq, rumors: Vec::new() };
                self.swim_send(vec![swim::Outgoing { to: from, message: ack }]);
            }
            self.pull_more_from = Some(sender.clone());
            if changed {
                self.view_dirty = true;
            }
            return;
        }
        let (out, transitions) = self.swim.receive(&from, self.sanitized(message), now);
        changed |= !transitions.is_empty();
        // A member back alive (it refuted a death) whose record we dropped with it: its
        // record is pulled from the sender next round, instead of waiting for a push-pull.
        let lacking = transitions.iter().any(|t| {
            t.liveness == Liveness::Alive
                && split_member(&t.member)
                    .is_some_and(|(node, instance)| self.core.record_of(node).is_none_or(|(i, _)| i != instance))
        });
        if lacking {
            self.pull_more_from = Some(sender.clone());
        }
        self.apply_transitions(transitions);
        self.swim_send(out);
        if changed {
            self.view_dirty = true;
        }
    }

    /// Whether SWIM tracks `member` already, or the membership holds a record of that
    /// instance (so SWIM may start to): SWIM learns of no member the membership has not
    /// admitted within its bounds ([`membership::MAX_MEMBERS`], new members per frame).
    fn knows_member(&self, member: &str) -> bool {
        member == self.swim.me()
            || self.swim.liveness_of(member).is_some()
            || split_member(member)
                .is_some_and(|(node, instance)| self.core.record_of(node).is_some_and(|(i, _)| i == instance))
    }

    /// A peer's SWIM message within bounds, without `left` rumors (a departure counts only
    /// as the node's own GOODBYE, signed with credentials, never as hearsay) and without
    /// rumors about members we do not know (see [`Self::knows_member`]).
    fn sanitized(&self, message: SwimMessage) -> SwimMessage {
        let max = self.config.swim.max_piggyback;
        let keep = |rumors: Vec<Rumor>, max: usize| -> Vec<Rumor> {
            rumors
                .into_iter()
                .take(max)
                .filter(|r| r.liveness != Liveness::Left && self.knows_member(&r.member))
                .collect()
        };
        match message {
            SwimMessage::Ping { seq, rumors } => SwimMessage::Ping { seq, rumors: keep(rumors, max) },
            SwimMessage::Ack { seq, rumors } => SwimMessage::Ack { seq, rumors: keep(rumors, max) },
            SwimMessage::Gossip { rumors } => SwimMessage::Gossip { rumors: keep(rumors, max) },
            SwimMessage::PingReq { seq, target, rumors } => {
                SwimMessage::PingReq { seq, target, rumors: keep(rumors, max) }
            }
            SwimMessage::PushPull { members, reply } => {
                SwimMessage::PushPull { members: keep(members, self.config.swim.max_push_pull_members), reply }
            }
        }
    }

    /// Applies member records from `sender` (piggybacked, pushed in a push-pull, or sent
    /// on a new link): newer ones are passed on, members SWIM does not know are probed,
    /// and entry sets we lack are asked of the sender. Whether anything changed.
    fn apply_records(&mut self, link: Option<LinkId>, sender: &NodeId, records: Vec<MemberDigest>) -> bool {
        let now = self.now();
        // Records of instances SWIM knows dead or gone are stale: never resurrected.
        let records: Vec<MemberDigest> = records
            .into_iter()
            .filter(|d| !self.swim.liveness_of(&member_id(&d.info)).is_some_and(Liveness::is_gone))
            .collect();
        let before: Vec<Option<u64>> = records
            .iter()
            .map(|d| self.core.record_of(&d.info.node).filter(|(i, _)| *i == d.info.instance_id).map(|(_, hb)| hb))
            .collect();
        let outcome = self.core.apply_digest_bounded(&records, now, self.config.max_new_members_per_frame);
        if outcome.refused > 0 {
            debug!(node = %self.shared.me.node, sender = %sender, ignored = outcome.refused,
                "records named more new nodes than max_new_members_per_frame");
            self.shared.metrics.limit_exceeded("max_new_members_per_frame");
            self.pull_more_from = Some(sender.clone());
        }
        let mut changed = !outcome.events.is_empty();
        self.log_events(&outcome.events);
        for (d, before) in records.into_iter().zip(before) {
            let now_held = self.core.record_of(&d.info.node).filter(|(i, _)| *i == d.info.instance_id);
            let fresher = now_held.is_some_and(|(_, hb)| hb == d.heartbeat && before.is_none_or(|b| b < hb));
            if !fresher {
                continue;
            }
            changed = true;
            let rumor = Rumor { member: member_id(&d.info), incarnation: 0, liveness: Liveness::Alive };
            let transitions = self.swim.learn(rumor, now);
            self.apply_transitions(transitions);
            let node = d.info.node.clone();
            self.records.push(&node, d, self.config.swim.max_pending_rumors);
        }
        // Entries arriving with the records (piggybacked) are not asked for again.
        let wanted: Vec<NodeId> = outcome
            .wanted
            .into_iter()
            .filter(|n| {
                let advertised = self.core.members().find(|m| m.info.node == *n).map_or(0, |m| m.catalog_version);
                self.core.catalog_version_of(n) < advertised
            })
            .collect();
        if !wanted.is_empty() {
            let from = self.shared.me.node.clone();
            self.gossip_to(link, sender, GossipFrame::CatalogRequest { from, nodes: wanted });
        }
        changed
    }

    /// Applies SWIM's verdicts to the membership: suspected, refuted, dead.
    fn apply_transitions(&mut self, transitions: Vec<Transition>) {
        let now = self.now();
        for t in transitions {
            let Some((node, instance)) = split_member(&t.member) else { continue };
            let event = match t.liveness {
                Liveness::Alive => self.core.mark_alive(node, instance, now),
                Liveness::Suspect => self.core.mark_suspect(node, instance),
                Liveness::Dead => self.core.remove_dead(node, instance, now),
                // Applied by `on_departed`, which is the only way in.
                Liveness::Left => None,
            };
            let Some(event) = event else { continue };
            self.log_events(std::slice::from_ref(&event));
            if matches!(event, MembershipEvent::Removed(_)) {
                let node = node.to_owned();
                let to_close: Vec<LinkId> =
                    self.links.iter().filter(|(_, l)| l.node.as_ref() == Some(&node)).map(|(id, _)| *id).collect();
                for id in to_close {
                    self.close_link(id);
                }
            }
        }
    }

    /// Sends SWIM's messages, each with records and entry sets piggybacked (a push-pull
    /// carries our whole list of records instead).
    fn swim_send(&mut self, out: Vec<swim::Outgoing>) {
        let from = member_id(&self.shared.me);
        let limit = self.swim.retransmits();
        for swim::Outgoing { to, message } in out {
            let Some((node, _)) = split_member(&to) else { continue };
            let node = node.to_owned();
            let (records, deltas) = match &message {
                SwimMessage::PushPull { .. } => {
                    let mut all = self.core.digest();
                    all.truncate(self.config.swim.max_push_pull_members);
                    (all, Vec::new())
                }
                _ => (self.records.take(RECORDS_PER_MESSAGE, limit), self.deltas.take(DELTAS_PER_MESSAGE, limit)),
            };
            let frame = GossipFrame::Swim { from: from.clone(), to, message, records, deltas };
            self.gossip_to(None, &node, frame);
        }
    }

    /// Sends `frame` to `node`: on `link` when given (an answer goes back the way the
    /// question came), else on our link to it, else routed over the next hop.
    fn gossip_to(&self, link: Option<LinkId>, node: &NodeId, frame: GossipFrame) {
        let link = link.or_else(|| self.shared.view.load().links.get(node).map(|(id, _)| *id));
        match link {
            Some(link) => self.send(link, &PeerFrame::FabricGossip(frame)),
            None => {
                if !self.shared.send_one_way(node, FabricBody::Gossip { frame }) {
                    debug!(node = %self.shared.me.node, peer = %node, "no route for a gossip frame; dropped");
                }
            }
        }
    }

    /// Records our links and, when our record changed (links, catalog version, SWIM
    /// incarnation after a refutation), raises its heartbeat and piggybacks it.
    fn refresh_own_record(&mut self, neighbours: Vec<NodeId>) {
        let now = (neighbours.clone(), self.core.catalog_version(), self.swim.incarnation());
        self.core.set_neighbours(neighbours);
        if self.own_record.as_ref() == Some(&now) {
            return;
        }
        self.own_record = Some(now);
        self.core.bump_heartbeat();
        let me = self.shared.me.node.clone();
        self.records.push(&me, self.core.own_digest(), self.config.swim.max_pending_rumors);
    }

    /// SWIM's timers: the probe's indirect stage, the end of a period, suspicions. A
    /// timer that fires late by more than its own interval means this node's loop
    /// stalled (a busy machine, a burst of work): SWIM does not count that time against
    /// the members it is probing, whose answers may be waiting unread behind the timer.
    fn swim_tick(&mut self) {
        let now = self.now();
        let interval = self.swim_tick_interval().as_secs_f64();
        let late = now - self.last_swim_tick - interval;
        self.last_swim_tick = now;
        if late > interval {
            debug!(node = %self.shared.me.node, late_ms = late * 1000.0, "event loop stalled; SWIM timers pushed back");
            self.swim.stalled(late);
        }
        let (out, transitions) = self.swim.tick(now);
        let changed = !transitions.is_empty();
        self.apply_transitions(transitions);
        self.swim_send(out);
        if changed {
            self.rebuild_view();
        }
    }

    /// A quarter of the probe timeout: the indirect stage and the period's end are
    /// noticed within that of their time.
    fn swim_tick_interval(&self) -> Duration {
        Duration::from_secs_f64((self.config.swim.probe_timeout / 4.0).max(0.01))
    }

    fn tick(&mut self) {
        let now = self.now();
        let events = self.core.tick(now);
        self.log_events(&events);
        self.close_silent_links_to_suspects();
        // News waiting (SWIM's rumors, records, entry sets) goes to a few random members
        // at once rather than one probe a period.
        let news = !self.records.is_empty() || !self.deltas.is_empty();
        let mut out = self.swim.gossip(GOSSIP_FANOUT, news);
        // A joiner learns a large cluster `max_new_members_per_frame` members a round.
        let member = self
            .pull_more_from
            .take()
            .and_then(|node| self.core.record_of(&node).map(|(instance, _)| format!("{node}#{instance}")));
        if let Some(member) = member {
            out.extend(self.swim.join(&member));
        }
        self.swim_send(out);
        self.shared.expire_forwarded();
        if let Some(bridges) = self.shared.bridges.clone() {
            bridges.tick();
            self.advertise_clusters(&bridges.reachable());
        }
        self.dial_due();
        self.dial_lanes();
        self.rounds += 1;
        // Expired entries and restored members change nothing SWIM reports: rebuilt every
        // few rounds, and on every change elsewhere (once here, if gossip marked it).
        if !events.is_empty() || self.rounds % 4 == 0 {
            self.view_dirty = true;
        }
        self.flush_view();
        self.flush_discovery();
    }

    /// The clusters this node's bridges reach, when they changed: a new catalog version,
    /// so the other nodes of the cluster send their `target_cluster` commands through us.
    fn advertise_clusters(&mut self, reachable: &[String]) {
        if self.core.local_clusters() == reachable {
            return;
        }
        let delta = self.core.set_local_clusters(reachable.to_vec(), unix_now());
        let delta = self.seal(delta);
        let from = self.shared.me.node.clone();
        self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] }), None);
    }

    /// A link to a member SWIM suspects that has carried nothing (no gossip frame, no routed
    /// message) for `suspect_after` is dead even if TCP has not noticed: a partition drops packets and resets nothing, and
    /// after it heals the old connection may wait out TCP's retransmission backoff for tens
    /// of seconds. Closing it lets the configured peer be dialled afresh as soon as the path
    /// is back. Idle links to alive members are left alone: with SWIM most links are quiet.
    /// A bridge silent for longer than [`bridge::Bridges::silent_limit`] is closed too.
    fn close_silent_links_to_suspects(&mut self) {
        self.note_routed();
        let silent_limit = Duration::from_secs_f64(self.config.timing.suspect_after);
        let suspects: HashSet<&NodeId> =
            self.core.members().filter(|m| m.state == MemberState::Suspect).map(|m| &m.info.node).collect();
        let stale: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.last_heard.elapsed() > silent_limit)
            .filter(|(_, l)| l.node.as_ref().is_some_and(|n| suspects.contains(n)))
            .map(|(id, _)| *id)
            .collect();
        for link in stale {
            warn!(node = %self.shared.me.node, link, "link to a suspected peer silent; closing");
            self.close_link(link);
        }
        // A bridge is never a member, so SWIM never suspects it: announcements cross it
        // every interval, and one silent for longer is dead.
        let Some(bridge_limit) = self.shared.bridges.as_ref().map(|b| b.silent_limit()) else { return };
        let silent_bridges: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.bridge.is_some() && l.last_heard.elapsed() > bridge_limit)
            .map(|(id, _)| *id)
            .collect();
        for link in silent_bridges {
            warn!(node = %self.shared.me.node, link, "federation bridge silent; closing");
            self.close_link(link);
        }
    }

    /// Counts the routed messages the links' readers saw as hearing from the link.
    fn note_routed(&mut self) {
        let now = Instant::now();
        for l in self.links.values_mut() {
            let routed = l.routed.load(Ordering::Relaxed);
            if routed != l.routed_seen {
                l.routed_seen = routed;
                l.last_heard = now;
            }
        }
    }

    /// `link` to `node` was just admitted: an older link to the same node that has carried
    /// nothing for [`REPLACED_LINK_QUIET`] is one the peer has lost (it dialled again, or
    /// answered our dial, over a path that works now) and is closed. Links heard from
    /// recently stay (two nodes that dial each other at once keep both), and so do links
    /// with a call on them (quiet while a function runs long).
    fn close_replaced_links(&mut self, link: LinkId, node: &NodeId) {
        self.note_routed();
        let replaced: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(id, l)| {
                **id != link && l.node.as_ref() == Some(node) && l.last_heard.elapsed() > REPLACED_LINK_QUIET
            })
            .filter(|(id, _)| !self.shared.link_busy(**id))
            .map(|(id, _)| *id)
            .collect();
        for old in replaced {
            info!(node = %self.shared.me.node, peer = %node, link = old, "older quiet link replaced by a new one; closing");
            self.close_link(old);
        }
    }

    fn dial_due(&mut self) {
        let now = self.now();
        // Discovered nodes: dial those we have no link to, up to the fan-out.
        let direct = self.direct_nodes();
        let discovered: Vec<String> = self
            .core
            .members()
            .filter(|m| m.state != MemberState::Suspect && !direct.contains(&m.info.node))
            .filter(|m| self.core.may_dial(&m.info.node, &m.info.instance_id, now))
            .map(|m| m.info.url.clone())
            .collect();
        // The fan-out bounds the links a node holds in all (configured, dialled, accepted):
        // nodes beyond it are reached over the next hops, not over a link of their own.
        let linked_urls: HashSet<String> =
            self.links.values().filter(|l| l.lane.is_none()).filter_map(|l| l.outbound_url.clone()).collect();
        let peers = &self.config.peers;
        let room = self.config.fanout.saturating_sub(direct.len());
        let pending = self.dials.keys().filter(|u| !peers.contains(*u) && !linked_urls.contains(*u)).count();
        for url in discovered.into_iter().take(room.saturating_sub(pending)) {
            self.dials.entry(url).or_insert(DialState::due_now(false));
        }
        // Forget discovered URLs that are linked or gone, or once there is no room; keep
        // configured peers forever, and URLs a full node named until they are tried.
        let member_urls: HashSet<String> = self.core.members().map(|m| m.info.url.clone()).collect();
        self.dials.retain(|url, d| {
            peers.contains(url)
                || d.in_progress
                || (d.hinted && room > 0 && !linked_urls.contains(url))
                || (room > 0 && member_urls.contains(url) && !linked_urls.contains(url))
        });
        // A peer that refused us for holding its most inbound links waits while we have
        // other links (it is dialled again when we have none).
        let linked = !direct.is_empty();
        let due: Vec<String> = self
            .dials
            .iter()
            .filter(|(url, d)| !d.in_progress && d.next_at <= Instant::now() && !linked_urls.contains(*url))
            .filter(|(_, d)| !(d.full && linked))
            .map(|(url, _)| url.clone())
            .collect();
        let mut started = 0;
        for url in due {
            if started >= self.config.max_dials_per_round {
                // The rest wait for the next round: a digest naming many nodes cannot make
                // this node open many connections at once.
                self.shared.metrics.limit_exceeded("max_dials_per_round");
                break;
            }
            // A configured URL may be the same node we already reach through an inbound link.
            let known_node = self.core.members().find(|m| m.info.url == url).map(|m| m.info.node.clone());
            if known_node.is_some_and(|n| direct.contains(&n)) {
                continue;
            }
            let Some(dial) = self.dials.get_mut(&url) else { continue };
            started += 1;
            dial.in_progress = true;
            dial.hinted = false;
            let backoff = dial.double_backoff(self.config.max_backoff);
            // Up to 25% jitter so nodes restarted together do not dial in lock step.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.25);
            dial.next_at = Instant::now() + backoff + jitter;
            // A bridge is served by a listener thread when one has started (see `lanes`).
            let bridge = self.config.federation_peers.contains(&url);
            let thread = self.shared.listener_threads().into_iter().next().filter(|_| bridge);
            // A listener thread that stopped takes no task: the fabric's thread serves it.
            let on_listener = thread.is_some_and(|(_, thread)| thread.spawn(self.dial_task(url.clone(), None)));
            if !on_listener {
                actix_rt::spawn(self.dial_task(url, None));
            }
        }
    }
}

/// A dial task ended (its link closed, or it never opened).
#[derive(Message)]
#[rtype(result = "()")]
struct DialEnded {
    /// The fabric that started the dial ([`FabricGossip::incarnation`]).
    incarnation: u64,
    url: String,
    /// A lane's listener thread index.
    lane: Option<usize>,
    error: Option<String>,
}

impl Actor for FabricGossip {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.restore_snapshot();
        self.restore_federation_snapshot();
        self.rebuild_view();
        self.dial_due();
        ctx.run_interval(self.config.gossip_interval, |act, _| act.tick());
        self.last_swim_tick = self.now();
        ctx.run_interval(self.swim_tick_interval(), |act, _| act.swim_tick());
        if let Some(config) = &self.config.snapshots {
            ctx.run_interval(config.interval, |act, ctx| {
                act.save_snapshot_if_changed(ctx);
                act.save_federation_snapshot(ctx);
            });
        }
    }

    /// Every link closes, as a crash would close it: its peer suspects this node until
    /// the restarted fabric links up again (its `close` is dropped, not fired). Runs after
    /// a panic too (actix stops an actor whose context is dropped); each link's end
    /// ([`FabricShared::link_closed`]) clears what the bridges held of it.
    fn stopped(&mut self, _: &mut Context<Self>) {
        for (link, l) in self.links.drain() {
            self.shared.close_inbound(link, false);
            // Its end clears it too; this also covers a link that ended while its
            // handshake's last frame waited here (its end found no bridge to clear).
            if let (Some(bridges), Some(_)) = (&self.shared.bridges, &l.bridge) {
                bridges.link_closed(link);
            }
        }
    }
}

crate::supervised_child!(FabricGossip, "fabric");

impl Handler<LinkOpened> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LinkOpened, _: &mut Context<Self>) {
        if msg.incarnation.is_some_and(|i| i != self.incarnation) {
            // Dialled by the fabric before a restart: this one dials its own.
            if let Some(close) = msg.close {
                let _ = close.send(());
            }
            return;
        }
        let outbound = msg.outbound_url.is_some();
        let bridge = msg.outbound_url.as_ref().is_some_and(|url| self.config.federation_peers.contains(url));
        if let Some(dial) = msg.outbound_url.as_ref().and_then(|url| self.dial_state(url, msg.lane)) {
            dial.backoff = Duration::ZERO;
            dial.full = false;
        }
        self.links.insert(
            msg.link,
            Link {
                sender: msg.sender,
                node: None,
                outbound_url: msg.outbound_url,
                close: msg.close,
                last_heard: Instant::now(),
                routed: Arc::default(),
                routed_seen: 0,
                peer: msg.peer,
                nonce: trust::fresh_nonce(),
                awaiting_proof: None,
                bridge: None,
                thread: msg.thread,
                lane: msg.lane,
            },
        );
        if outbound {
            self.send(msg.link, &self.status_frame(msg.link, None, bridge));
        }
    }
}

impl Handler<PeerFrameReceived> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: PeerFrameReceived, ctx: &mut Context<Self>) {
        self.on_peer_frame(msg);
        self.schedule_view_flush(ctx);
    }
}

impl FabricGossip {
    fn on_peer_frame(&mut self, msg: PeerFrameReceived) {
        let Some(l) = self.links.get_mut(&msg.link) else {
            // A link this fabric does not know: one the fabric before a restart opened
            // (its LinkOpened went there), or one closed already. Closed, so its peer
            // dials again rather than wait on a link nobody reads.
            return self.shared.close_inbound(msg.link, false);
        };
        l.last_heard = Instant::now();
        let handshaken = l.node.is_some();
        let is_bridge = l.bridge.is_some();
        let linked_node = l.node.clone();
        match msg.frame {
            PeerFrame::Server(ServerFrame::Status { info, functions, catalog_version, queues, about, auth }) => {
                self.on_status(msg.link, info, (functions, queues, about), catalog_version, auth)
            }
            PeerFrame::Server(ServerFrame::Proof { signature }) => self.on_proof(msg.link, &signature),
            PeerFrame::Server(ServerFrame::Refused { reason, try_instead }) => {
                let full = !try_instead.is_empty();
                if full {
                    info!(node = %self.shared.me.node, link = msg.link, reason = %reason, "peer full; dialling others");
                } else {
                    warn!(node = %self.shared.me.node, link = msg.link, reason = %reason, "refused by peer");
                }
                if self.links.get(&msg.link).is_some_and(|l| l.outbound_url.is_some()) {
                    // The next dial was scheduled before the refusal; push it back too.
                    if let Some(dial) = self.back_off(msg.link) {
                        dial.full = full;
                    }
                    // Only the node we dialled may point us elsewhere.
                    self.dial_instead(try_instead);
                }
                self.close_link(msg.link);
            }
            // Only a node itself says GOODBYE, on its own link; others relay `Departed`.
            PeerFrame::Server(ServerFrame::Goodbye { node, instance_id, proof })
                if linked_node.as_ref() == Some(&node) =>
            {
                self.on_departed(Some(msg.link), &node, &instance_id, proof)
            }
            PeerFrame::Server(ServerFrame::Goodbye { node, .. }) => {
                warn!(node = %self.shared.me.node, link = msg.link, claimed = %node, "GOODBYE not from that node ignored")
            }
            PeerFrame::FabricGossip(frame) if handshaken => {
                let sender = linked_node.unwrap_or_default();
                self.on_gossip(Some(msg.link), &sender, frame)
            }
            PeerFrame::FabricGossip(_) => {
                debug!(link = msg.link, "gossip before the handshake completed dropped");
                self.shared.metrics.fabric_dropped("no_handshake");
            }
            // Routed messages that reached the actor because the link was not admitted
            // when they were read: admitted now (the handshake came first), or dropped.
            PeerFrame::FabricMessage(message) if handshaken => self.shared.route(msg.link, message, 0),
            PeerFrame::FabricMessage(_) => {
                debug!(link = msg.link, "routed message before the handshake completed dropped");
                self.shared.metrics.fabric_dropped("no_handshake");
            }
            // Read before the bridge's handshake completed: judged after it.
            PeerFrame::Federation(message) => match &self.shared.bridges {
                Some(bridges) if is_bridge => bridges.on_frame(&self.shared, msg.link, message, 0),
                _ => {
                    debug!(link = msg.link, "federation frame on a link that is no bridge dropped");
                    self.shared.metrics.fabric_dropped("not_a_bridge");
                }
            },
        }
    }
}

impl Handler<RoutedGossip> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: RoutedGossip, ctx: &mut Context<Self>) {
        self.on_gossip(None, &msg.source, msg.frame);
        self.schedule_view_flush(ctx);
    }
}

impl Handler<LinkClosed> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LinkClosed, _: &mut Context<Self>) {
        if let Some(l) = self.links.remove(&msg.link) {
            self.link_gone(msg.link, l, !msg.on_purpose);
        }
    }
}

impl Handler<DialEnded> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: DialEnded, _: &mut Context<Self>) {
        if msg.incarnation != self.incarnation {
            return; // a dial of the fabric before a restart
        }
        if let Some(dial) = self.dial_state(&msg.url, msg.lane) {
            dial.in_progress = false;
        }
        if let Some(error) = msg.error {
            debug!(node = %self.shared.me.node, peer = %msg.url, cause = %error, "dial failed; will retry");
        }
    }
}

impl Handler<LocalFunctionsChanged> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LocalFunctionsChanged, _: &mut Context<Self>) {
        self.core.set_local_about(msg.about);
        let delta = self.core.set_local_functions(msg.functions, unix_now());
        let delta = self.seal(delta);
        let from = self.shared.me.node.clone();
        self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] }), None);
        self.observe_catalog();
    }
}

impl Handler<LocalQueuesChanged> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LocalQueuesChanged, _: &mut Context<Self>) {
        let delta = self.core.set_local_queues(msg.queues, unix_now());
        let delta = self.seal(delta);
        let from = self.shared.me.node.clone();
        self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] }), None);
        self.observe_catalog();
    }
}

impl Handler<DescribeDiscovery> for FabricGossip {
    type Result = DiscoveryView;

    fn handle(&mut self, msg: DescribeDiscovery, _: &mut Context<Self>) -> DiscoveryView {
        let table = self.shared.table.current();
        let local = table
            .specs()
            .filter(|s| !s.is_local_only())
            .map(|s| LocalFunction {
                identity: s.identity().clone(),
                signature: s.declared_signature().cloned(),
                doc: s.documentation().map(str::to_owned),
            })
            .collect();
        self.flush_view();
        self.flush_discovery();
        let changes = msg.since.and_then(|since| self.shared.discovery_log.lock().ok().map(|log| log.since(since)));
        DiscoveryView {
            generated_at: unix_now(),
            me: self.shared.me.clone(),
            nodes: self.discovery_nodes(),
            local,
            changes,
        }
    }
}

impl Handler<SayGoodbye> for FabricGossip {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: SayGoodbye, _: &mut Context<Self>) -> ResponseFuture<()> {
        let me = &self.shared.me;
        info!(node = %me.node, links = self.links.len(), "saying goodbye to peers");
        let proof = self.shared.trust.as_ref().map(|t| t.seal(goodbye_text(&me.cluster_id, &me.node, &me.instance_id)));
        let frame = PeerFrame::Server(ServerFrame::Goodbye {
            node: me.node.clone(),
            instance_id: me.instance_id.clone(),
            proof,
        });
        self.broadcast(&frame, None);
        // Stop dialling; the links close when the supervisor stops this actor.
        self.leaving = true;
        self.dials.clear();
        self.lanes.clear();
        self.config.peers.clear();
        self.config.fanout = 0;
        self.final_snapshot()
    }
}

impl FabricGossip {
    /// The last view, saved durably whether or not it changed (clean shutdown).
    fn final_snapshot(&mut self) -> ResponseFuture<()> {
        let Some(config) = &self.config.snapshots else { return Box::pin(async {}) };
        let snapshot = self.build_snapshot();
        let (node, metrics, store) = (self.shared.me.node.clone(), self.shared.metrics.clone(), config.store.clone());
        let members = snapshot.members.len();
        let federation = self.shared.bridges.as_ref().and_then(|b| b.snapshot_bytes());
        Box::pin(async move {
            let bytes = match snapshot.encode() {
                Ok(bytes) => bytes,
                Err(e) => return warn!(node = %node, cause = %e, "final catalog snapshot not encoded"),
            };
            let mut batch = Batch::new().put(SNAPSHOT_TREE, SNAPSHOT_KEY, bytes);
            if let Some(federation) = federation {
                batch = batch.put(bridge::SNAPSHOT_TREE, bridge::SNAPSHOT_KEY, federation);
            }
            match tokio::time::timeout(FINAL_SNAPSHOT_TIMEOUT, store.commit(batch)).await {
                Ok(Ok(())) => {
                    metrics.catalog_snapshot_saved(snapshot.saved_at);
                    info!(node = %node, members, "final catalog snapshot saved");
                }
                Ok(Err(e)) => {
                    metrics.catalog_snapshot_save_failed();
                    warn!(node = %node, cause = %e, "final catalog snapshot not saved");
                }
                Err(_) => {
                    metrics.catalog_snapshot_save_failed();
                    warn!(node = %node, "final catalog snapshot not durable within 5 s; shutting down anyway");
                }
            }
        })
    }
}

impl Handler<DescribeTopology> for FabricGossip {
    type Result = Topology;

    fn handle(&mut self, ask: DescribeTopology, _: &mut Context<Self>) -> Topology {
        self.flush_view();
        let now = self.now();
        let view = self.shared.view.load();
        let me = &self.shared.me;
        let mut nodes = vec![NodeStatus {
            node: me.node.clone(),
            state: "self".into(),
            detail: (!ask.brief).then(|| NodeDetail {
                instance_id: me.instance_id.clone(),
                url: me.url.clone(),
                linked: false,
                next_hop: None,
                silent_s: 0.0,
                neighbours: self.direct_nodes().into_iter().collect(),
            }),
        }];
        let mut others: Vec<NodeStatus> = self
            .core
            .members()
            .map(|m| NodeStatus {
                node: m.info.node.clone(),
                state: format!("{:?}", m.state).to_lowercase(),
                detail: (!ask.brief).then(|| NodeDetail {
                    instance_id: m.info.instance_id.clone(),
                    url: m.info.url.clone(),
                    linked: view.links.contains_key(&m.info.node),
                    next_hop: view.next_hops.get(&m.info.node).cloned(),
                    silent_s: (now - m.heard_at).max(0.0),
                    neighbours: m.neighbours.clone(),
                }),
            })
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.extend(others);
        let links = (!ask.brief).then(|| {
            let mut links: Vec<_> = self
                .links
                .iter()
                .map(|(id, l)| (*id, l.node.clone(), if l.outbound_url.is_some() { "outbound" } else { "inbound" }))
                .collect();
            links.sort();
            links
        });
        Topology {
            node: me.node.clone(),
            cluster_id: me.cluster_id.clone(),
            nodes,
            links,
            suspicions: self.shared.metrics.peers_suspected(),
            incarnation: self.swim.incarnation(),
            local_health: self.swim.local_health(),
            pending_updates: self.swim.pending_rumors() + self.records.len() + self.deltas.len(),
        }
    }
}

impl Handler<DescribeCatalog> for FabricGossip {
    type Result = CatalogListing;

    fn handle(&mut self, _: DescribeCatalog, _: &mut Context<Self>) -> CatalogListing {
        let mut nodes: Vec<CatalogDelta> = std::iter::once(self.core.local_catalog(unix_now()))
            .chain(self.core.catalog_entries().into_iter().map(|(d, _)| d))
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let mut unconfirmed: Vec<NodeId> =
            self.core.members().filter(|m| m.state == MemberState::Unconfirmed).map(|m| m.info.node.clone()).collect();
        unconfirmed.sort();
        CatalogListing { nodes, unconfirmed }
    }
}
