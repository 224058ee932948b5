//! FabricGossip: peer links, membership, catalog dissemination, GOODBYE (DESIGN.md §8).
//!
//! Who sends to it: link readers and peer connections (`LinkOpened`, `PeerFrameReceived`,
//! `LinkClosed`), the Registry (`LocalFunctionsChanged`), the node (`SayGoodbye`), the
//! monitor (`DescribeTopology`, `DescribeCatalog`), its own timer. Whom it calls: peers,
//! through link queues; nobody synchronously.
//!
//! ```text
//!  dial (peers + discovered) ──► link ──STATUS──► admit (cluster, departed) ──► snapshot
//!  every gossip interval: heartbeat+1, Members digest to every link, suspect/remove,
//!                         close silent links, redial with backoff, refresh catalog at ttl/2
//!  catalog change ──► Catalog delta flooded (de-duplicated by version)
//!  digest shows a newer version ──► CatalogRequest ──► Catalog
//! ```
//!
//! It owns MUTATION and publishes an immutable [`FabricView`] (links, next hops, remote
//! functions) in [`FabricShared`], which the request path reads without a mailbox.
//!
//! What a restart loses: links (closed and redialled), membership and remote catalog
//! (rebuilt from the peers' snapshots within a gossip round or two). Calls in flight
//! over a closed link fail over (retry on another provider) or answer 1005.

pub mod link;
pub mod membership;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Message, MessageResponse, Recipient};
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

pub use link::{FabricShared, FabricView, LinkId, LinkSender, RemoteFunction};
use membership::{MemberState, MembershipCore, MembershipEvent, MembershipTiming};
use wire::{CatalogDelta, GossipFrame, NodeId, NodeInfo, PeerFrame, ServerFrame};

use crate::function::FunctionIdentity;
use crate::supervisor::ChildGuard;
use crate::unix_now;

/// Fabric settings.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// URLs to dial at start and keep dialling.
    pub peers: Vec<String>,
    /// At most this many links to nodes learned through gossip (0: only `peers`).
    pub fanout: usize,
    /// Gossip round length.
    pub gossip_interval: Duration,
    /// Failure detection and catalog timing.
    pub timing: MembershipTiming,
    /// How long a dial may take.
    pub dial_timeout: Duration,
    /// Longest wait between dials of an unreachable peer.
    pub max_backoff: Duration,
    /// Frames queued per link.
    pub link_queue: usize,
}

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
    /// Closes it (dropped or fired): outbound links.
    pub close: Option<oneshot::Sender<()>>,
}

/// Closes an inbound link's connection.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct CloseLink;

/// Registers how to close an inbound link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InboundCloser {
    /// The link.
    pub link: LinkId,
    /// Its connection.
    pub closer: Recipient<CloseLink>,
}

/// A gossip or lifecycle frame arrived on a link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerFrameReceived {
    /// The link.
    pub link: LinkId,
    /// The frame.
    pub frame: PeerFrame,
}

/// A link closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkClosed {
    /// The link.
    pub link: LinkId,
}

/// The local function table changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LocalFunctionsChanged {
    /// Every local function.
    pub functions: Vec<FunctionIdentity>,
}

/// Tell every peer we are leaving; resolves once the frames are queued.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SayGoodbye;

/// One node in `/topology`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Name.
    pub node: String,
    /// Instance.
    pub instance_id: String,
    /// URL.
    pub url: String,
    /// `self`, `alive` or `suspect`.
    pub state: String,
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
    /// Links: (link id, peer or null before the handshake, direction).
    pub links: Vec<(LinkId, Option<String>, &'static str)>,
}

/// Ask for `/topology`.
#[derive(Message)]
#[rtype(result = "Topology")]
pub struct DescribeTopology;

/// `/catalog`: every node's function entries.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct CatalogListing {
    /// One entry set per node.
    pub nodes: Vec<CatalogDelta>,
}

/// Ask for `/catalog`.
#[derive(Message)]
#[rtype(result = "CatalogListing")]
pub struct DescribeCatalog;

struct Link {
    sender: LinkSender,
    node: Option<NodeId>,
    outbound_url: Option<String>,
    close: Option<oneshot::Sender<()>>,
    closer: Option<Recipient<CloseLink>>,
    last_heard: Instant,
}

struct DialState {
    in_progress: bool,
    next_at: Instant,
    backoff: Duration,
}

/// The FabricGossip actor.
pub struct FabricGossip {
    shared: Arc<FabricShared>,
    config: FabricConfig,
    core: MembershipCore,
    links: HashMap<LinkId, Link>,
    dials: HashMap<String, DialState>,
    epoch: Instant,
    last_refresh: Instant,
    /// Set by GOODBYE: links closing now are expected, not failures.
    leaving: bool,
    _guard: ChildGuard,
}

impl FabricGossip {
    /// A fabric for `shared.me`, serving the local functions `functions`.
    pub fn new(shared: Arc<FabricShared>, config: FabricConfig, guard: ChildGuard) -> Self {
        let functions = shared.table.current().identities();
        let core = MembershipCore::new(shared.me.clone(), config.timing, functions);
        let dials = config
            .peers
            .iter()
            .filter(|url| **url != shared.me.url)
            .map(|url| {
                (url.clone(), DialState { in_progress: false, next_at: Instant::now(), backoff: Duration::ZERO })
            })
            .collect();
        let now = Instant::now();
        FabricGossip {
            shared,
            config,
            core,
            links: HashMap::new(),
            dials,
            epoch: now,
            last_refresh: now,
            leaving: false,
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

    fn status_frame(&self) -> PeerFrame {
        let local = self.core.local_catalog(unix_now());
        PeerFrame::Server(ServerFrame::Status {
            info: self.shared.me.clone(),
            functions: local.functions,
            catalog_version: local.version,
        })
    }

    fn members_frame(&self) -> PeerFrame {
        PeerFrame::FabricGossip(GossipFrame::Members { from: self.shared.me.node.clone(), members: self.core.digest() })
    }

    fn log_events(&self, events: &[MembershipEvent]) {
        let me = &self.shared.me.node;
        for event in events {
            match event {
                MembershipEvent::Joined(node, instance) => {
                    info!(node = %me, peer = %node, instance = %instance, "peer joined")
                }
                MembershipEvent::Suspected(node) => warn!(node = %me, peer = %node, "peer suspected"),
                MembershipEvent::Recovered(node) => info!(node = %me, peer = %node, "peer recovered"),
                MembershipEvent::Removed(node) => warn!(node = %me, peer = %node, "peer removed"),
                MembershipEvent::Departed(node) => info!(node = %me, peer = %node, "peer goodbye"),
            }
        }
    }

    fn direct_nodes(&self) -> HashSet<NodeId> {
        self.links.values().filter_map(|l| l.node.clone()).collect()
    }

    /// Publishes a new routing snapshot.
    fn rebuild_view(&mut self) {
        let direct = self.direct_nodes();
        let mut neighbours: Vec<NodeId> = direct.iter().cloned().collect();
        neighbours.sort();
        self.core.set_neighbours(neighbours);
        let mut links = HashMap::new();
        let mut ids: Vec<&LinkId> = self.links.keys().collect();
        ids.sort(); // the oldest link to a node wins, deterministically
        for id in ids {
            let l = &self.links[id];
            if let Some(node) = &l.node {
                links.entry(node.clone()).or_insert_with(|| (*id, l.sender.clone()));
            }
        }
        let mut next_hops = HashMap::new();
        for m in self.core.members() {
            if m.state == MemberState::Alive || direct.contains(&m.info.node) {
                if let Some(hop) = self.core.next_hop(&m.info.node, &direct) {
                    next_hops.insert(m.info.node.clone(), hop);
                }
            }
        }
        let remote = |(node, cluster_id, identity)| RemoteFunction { node, cluster_id, identity };
        let (functions, unreachable): (Vec<_>, Vec<_>) = self
            .core
            .functions_of(MemberState::Alive)
            .into_iter()
            .map(remote)
            .partition(|f| next_hops.contains_key(&f.node));
        let suspected = self.core.functions_of(MemberState::Suspect).into_iter().map(remote);
        let unreachable = unreachable.into_iter().chain(suspected).collect();
        self.shared.view.store(Arc::new(FabricView { links, next_hops, functions, unreachable }));
    }

    fn close_link(&mut self, link: LinkId) {
        if let Some(mut l) = self.links.remove(&link) {
            if let Some(close) = l.close.take() {
                let _ = close.send(());
            }
            if let Some(closer) = l.closer.take() {
                closer.do_send(CloseLink);
            }
            self.link_gone(link, l);
        }
    }

    fn link_gone(&mut self, link: LinkId, l: Link) {
        self.shared.link_closed(link);
        if let Some(url) = &l.outbound_url {
            if let Some(dial) = self.dials.get_mut(url) {
                dial.in_progress = false;
            }
        }
        if let Some(node) = l.node.as_ref().filter(|_| !self.leaving) {
            let still_linked = self.links.values().any(|o| o.node.as_ref() == Some(node));
            if !still_linked {
                info!(node = %self.shared.me.node, peer = %node, link, "link lost");
                if let Some(event) = self.core.link_lost(node) {
                    self.log_events(&[event]);
                }
            }
        }
        self.rebuild_view();
    }

    fn on_status(&mut self, link: LinkId, info: NodeInfo, functions: Vec<FunctionIdentity>, version: u64) {
        let now = self.now();
        match self.core.admit(&info, now) {
            Err(refusal) => {
                warn!(node = %self.shared.me.node, peer = %info.node, peer_cluster = %info.cluster_id,
                    reason = %refusal, "peer refused");
                self.send(link, &PeerFrame::Server(ServerFrame::Refused { reason: refusal.to_string() }));
                self.close_link(link);
            }
            Ok(events) => {
                let Some(l) = self.links.get_mut(&link) else { return };
                let first = l.node.is_none();
                l.node = Some(info.node.clone());
                let inbound = l.outbound_url.is_none();
                self.log_events(&events);
                if first && inbound {
                    self.send(link, &self.status_frame());
                }
                let delta = CatalogDelta {
                    node: info.node.clone(),
                    instance_id: info.instance_id.clone(),
                    cluster_id: info.cluster_id.clone(),
                    version,
                    advertised_at: unix_now(),
                    ttl_s: self.config.timing.catalog_ttl,
                    functions,
                };
                let news = self.core.apply_catalog(&delta, now);
                if first {
                    let snapshot = self.core.all_catalogs(unix_now());
                    let from = self.shared.me.node.clone();
                    self.send(link, &PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: snapshot }));
                    self.send(link, &self.members_frame());
                }
                if news {
                    let from = self.shared.me.node.clone();
                    let frame = PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] });
                    self.broadcast(&frame, Some(link));
                }
                self.rebuild_view();
            }
        }
    }

    fn on_departed(&mut self, link: Option<LinkId>, node: &str, instance: &str) {
        let now = self.now();
        let known = self.core.members().any(|m| m.info.node == node && m.info.instance_id == instance);
        if !self.core.depart(node, instance, now) {
            return;
        }
        if known {
            self.log_events(&[MembershipEvent::Departed(node.to_owned())]);
        }
        let frame = PeerFrame::FabricGossip(GossipFrame::Departed {
            from: self.shared.me.node.clone(),
            node: node.to_owned(),
            instance_id: instance.to_owned(),
        });
        self.broadcast(&frame, link);
        let to_close: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.node.as_deref() == Some(node)).map(|(id, _)| *id).collect();
        for id in to_close {
            self.close_link(id);
        }
        self.rebuild_view();
    }

    fn on_gossip(&mut self, link: LinkId, frame: GossipFrame) {
        let now = self.now();
        match frame {
            GossipFrame::Members { members, .. } => {
                let (events, wanted) = self.core.apply_digest(&members, now);
                self.log_events(&events);
                if !wanted.is_empty() {
                    let from = self.shared.me.node.clone();
                    self.send(link, &PeerFrame::FabricGossip(GossipFrame::CatalogRequest { from, nodes: wanted }));
                }
                self.rebuild_view();
            }
            GossipFrame::Catalog { deltas, .. } => {
                let news: Vec<CatalogDelta> = deltas.into_iter().filter(|d| self.core.apply_catalog(d, now)).collect();
                if !news.is_empty() {
                    let from = self.shared.me.node.clone();
                    self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: news }), Some(link));
                    self.rebuild_view();
                }
            }
            GossipFrame::CatalogRequest { nodes, .. } => {
                let deltas = self.core.catalogs_of(&nodes, unix_now());
                let from = self.shared.me.node.clone();
                self.send(link, &PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas }));
            }
            GossipFrame::Departed { node, instance_id, .. } => self.on_departed(Some(link), &node, &instance_id),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        let events = self.core.tick(now);
        self.log_events(&events);
        // A link that has been silent past suspicion is dead even if TCP has not noticed.
        let silent_limit = Duration::from_secs_f64(self.config.timing.suspect_after);
        let stale: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.last_heard.elapsed() > silent_limit).map(|(id, _)| *id).collect();
        for link in stale {
            warn!(node = %self.shared.me.node, link, "peer link silent; closing");
            self.close_link(link);
        }
        if self.last_refresh.elapsed().as_secs_f64() > self.config.timing.catalog_ttl / 2.0 {
            self.last_refresh = Instant::now();
            let delta = self.core.refresh_local(unix_now());
            let from = self.shared.me.node.clone();
            self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] }), None);
        }
        self.broadcast(&self.members_frame(), None);
        self.dial_due(ctx);
        self.rebuild_view();
    }

    fn dial_due(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        // Discovered nodes: dial those we have no link to, up to the fan-out.
        let direct = self.direct_nodes();
        let discovered: Vec<String> = self
            .core
            .members()
            .filter(|m| m.state == MemberState::Alive && !direct.contains(&m.info.node))
            .filter(|m| self.core.may_dial(&m.info.node, &m.info.instance_id, now))
            .map(|m| m.info.url.clone())
            .collect();
        let discovered_links = self
            .links
            .values()
            .filter(|l| l.outbound_url.as_ref().is_some_and(|u| !self.config.peers.contains(u)))
            .count();
        let budget = self.config.fanout.saturating_sub(discovered_links);
        for url in discovered.into_iter().take(budget) {
            self.dials.entry(url).or_insert(DialState {
                in_progress: false,
                next_at: Instant::now(),
                backoff: Duration::ZERO,
            });
        }
        // Forget discovered URLs that are linked or gone; keep configured peers forever.
        let linked_urls: HashSet<String> = self.links.values().filter_map(|l| l.outbound_url.clone()).collect();
        let member_urls: HashSet<String> = self.core.members().map(|m| m.info.url.clone()).collect();
        let peers = &self.config.peers;
        self.dials.retain(|url, d| {
            peers.contains(url) || d.in_progress || (member_urls.contains(url) && !linked_urls.contains(url))
        });
        let due: Vec<String> = self
            .dials
            .iter()
            .filter(|(url, d)| !d.in_progress && d.next_at <= Instant::now() && !linked_urls.contains(*url))
            .map(|(url, _)| url.clone())
            .collect();
        for url in due {
            // A configured URL may be the same node we already reach through an inbound link.
            let known_node = self.core.members().find(|m| m.info.url == url).map(|m| m.info.node.clone());
            if known_node.is_some_and(|n| direct.contains(&n)) {
                continue;
            }
            let Some(dial) = self.dials.get_mut(&url) else { continue };
            dial.in_progress = true;
            dial.backoff = (dial.backoff * 2).clamp(Duration::from_millis(200), self.config.max_backoff);
            // Up to 25% jitter so nodes restarted together do not dial in lock step.
            let jitter = dial.backoff.mul_f64(rand::random::<f64>() * 0.25);
            dial.next_at = Instant::now() + dial.backoff + jitter;
            let shared = self.shared.clone();
            let (timeout, queue) = (self.config.dial_timeout, self.config.link_queue);
            let addr = ctx.address();
            let target = url.clone();
            actix_rt::spawn(async move {
                let result = link::dial(target.clone(), shared, timeout, queue).await;
                addr.do_send(DialEnded { url: target, error: result.err() });
            });
        }
    }
}

/// A dial task ended (its link closed, or it never opened).
#[derive(Message)]
#[rtype(result = "()")]
struct DialEnded {
    url: String,
    error: Option<String>,
}

impl Actor for FabricGossip {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.rebuild_view();
        self.dial_due(ctx);
        ctx.run_interval(self.config.gossip_interval, |act, ctx| act.tick(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for (_, mut l) in self.links.drain() {
            if let Some(close) = l.close.take() {
                let _ = close.send(());
            }
            if let Some(closer) = l.closer.take() {
                closer.do_send(CloseLink);
            }
        }
    }
}

crate::supervised_child!(FabricGossip, "fabric");

impl Handler<LinkOpened> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LinkOpened, _: &mut Context<Self>) {
        let outbound = msg.outbound_url.is_some();
        if let Some(url) = &msg.outbound_url {
            if let Some(dial) = self.dials.get_mut(url) {
                dial.backoff = Duration::ZERO;
            }
        }
        self.links.insert(
            msg.link,
            Link {
                sender: msg.sender,
                node: None,
                outbound_url: msg.outbound_url,
                close: msg.close,
                closer: None,
                last_heard: Instant::now(),
            },
        );
        if outbound {
            self.send(msg.link, &self.status_frame());
        }
    }
}

impl Handler<InboundCloser> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: InboundCloser, _: &mut Context<Self>) {
        if let Some(l) = self.links.get_mut(&msg.link) {
            l.closer = Some(msg.closer);
        }
    }
}

impl Handler<PeerFrameReceived> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: PeerFrameReceived, _: &mut Context<Self>) {
        let Some(l) = self.links.get_mut(&msg.link) else { return };
        l.last_heard = Instant::now();
        let handshaken = l.node.is_some();
        let linked_node = l.node.clone();
        match msg.frame {
            PeerFrame::Server(ServerFrame::Status { info, functions, catalog_version }) => {
                self.on_status(msg.link, info, functions, catalog_version)
            }
            PeerFrame::Server(ServerFrame::Refused { reason }) => {
                warn!(node = %self.shared.me.node, link = msg.link, reason = %reason, "refused by peer");
                if let Some(url) = self.links.get(&msg.link).and_then(|l| l.outbound_url.clone()) {
                    if let Some(dial) = self.dials.get_mut(&url) {
                        // The next dial was scheduled before the refusal; push it back too.
                        dial.backoff = self.config.max_backoff;
                        dial.next_at = Instant::now() + self.config.max_backoff;
                    }
                }
                self.close_link(msg.link);
            }
            // Only a node itself says GOODBYE, on its own link; others relay `Departed`.
            PeerFrame::Server(ServerFrame::Goodbye { node, instance_id }) if linked_node.as_ref() == Some(&node) => {
                self.on_departed(Some(msg.link), &node, &instance_id)
            }
            PeerFrame::Server(ServerFrame::Goodbye { node, .. }) => {
                warn!(node = %self.shared.me.node, link = msg.link, claimed = %node, "GOODBYE not from that node ignored")
            }
            PeerFrame::FabricGossip(frame) if handshaken => self.on_gossip(msg.link, frame),
            PeerFrame::FabricGossip(_) => debug!(link = msg.link, "gossip before STATUS ignored"),
            PeerFrame::FabricMessage(_) => {}
        }
    }
}

impl Handler<LinkClosed> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: LinkClosed, _: &mut Context<Self>) {
        if let Some(l) = self.links.remove(&msg.link) {
            self.link_gone(msg.link, l);
        }
    }
}

impl Handler<DialEnded> for FabricGossip {
    type Result = ();

    fn handle(&mut self, msg: DialEnded, _: &mut Context<Self>) {
        if let Some(dial) = self.dials.get_mut(&msg.url) {
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
        let delta = self.core.set_local_functions(msg.functions, unix_now());
        let from = self.shared.me.node.clone();
        self.broadcast(&PeerFrame::FabricGossip(GossipFrame::Catalog { from, deltas: vec![delta] }), None);
    }
}

impl Handler<SayGoodbye> for FabricGossip {
    type Result = ();

    fn handle(&mut self, _: SayGoodbye, _: &mut Context<Self>) {
        let me = &self.shared.me;
        info!(node = %me.node, links = self.links.len(), "saying goodbye to peers");
        let frame =
            PeerFrame::Server(ServerFrame::Goodbye { node: me.node.clone(), instance_id: me.instance_id.clone() });
        self.broadcast(&frame, None);
        // Stop dialling; the links close when the supervisor stops this actor.
        self.leaving = true;
        self.dials.clear();
        self.config.peers.clear();
        self.config.fanout = 0;
    }
}

impl Handler<DescribeTopology> for FabricGossip {
    type Result = Topology;

    fn handle(&mut self, _: DescribeTopology, _: &mut Context<Self>) -> Topology {
        let now = self.now();
        let view = self.shared.view.load();
        let me = &self.shared.me;
        let mut nodes = vec![NodeStatus {
            node: me.node.clone(),
            instance_id: me.instance_id.clone(),
            url: me.url.clone(),
            state: "self".into(),
            linked: false,
            next_hop: None,
            silent_s: 0.0,
            neighbours: self.direct_nodes().into_iter().collect(),
        }];
        let mut others: Vec<NodeStatus> = self
            .core
            .members()
            .map(|m| NodeStatus {
                node: m.info.node.clone(),
                instance_id: m.info.instance_id.clone(),
                url: m.info.url.clone(),
                state: format!("{:?}", m.state).to_lowercase(),
                linked: view.links.contains_key(&m.info.node),
                next_hop: view.next_hops.get(&m.info.node).cloned(),
                silent_s: (now - m.heard_at).max(0.0),
                neighbours: m.neighbours.clone(),
            })
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.extend(others);
        let mut links: Vec<_> = self
            .links
            .iter()
            .map(|(id, l)| (*id, l.node.clone(), if l.outbound_url.is_some() { "outbound" } else { "inbound" }))
            .collect();
        links.sort();
        Topology { node: me.node.clone(), cluster_id: me.cluster_id.clone(), nodes, links }
    }
}

impl Handler<DescribeCatalog> for FabricGossip {
    type Result = CatalogListing;

    fn handle(&mut self, _: DescribeCatalog, _: &mut Context<Self>) -> CatalogListing {
        let mut nodes: Vec<CatalogDelta> = std::iter::once(self.core.local_catalog(unix_now()))
            .chain(self.core.catalog_entries().into_iter().map(|(d, _)| d))
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        CatalogListing { nodes }
    }
}
