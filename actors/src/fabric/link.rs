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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use super::wire::{CallOutcome, FabricBody, FabricMessage, NodeId, NodeInfo, PeerFrame};
use super::{FabricGossip, LinkClosed, LinkOpened, PeerFrameReceived};
use crate::function::{CallArgs, FunctionIdentity};
use crate::protocol::{encode, FrameKind, PubSubMessage};
use crate::pubsub::{self, OutFrame, PubSub};
use crate::registry::TableHandle;
use crate::supervisor::Slot;

/// Identifies one link (either direction) on this node.
pub type LinkId = u64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A fresh link id.
pub fn next_link_id() -> LinkId {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

/// Where frames for a link go.
pub type LinkSender = mpsc::Sender<OutFrame>;

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
    pending: Mutex<HashMap<String, PendingCall>>,
    /// Outbound links still open: shutdown waits for them, so a GOODBYE queued on a link we
    /// dialled is flushed and acknowledged before the process exits.
    writers: tokio::sync::watch::Sender<usize>,
    in_flight: Mutex<HashMap<NodeId, usize>>,
    seen: Mutex<SeenIds>,
    next_id: AtomicU64,
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
            pending: Mutex::new(HashMap::new()),
            writers: tokio::sync::watch::channel(0).0,
            in_flight: Mutex::new(HashMap::new()),
            seen: Mutex::new(SeenIds { order: VecDeque::new(), set: HashSet::new(), capacity: 65_536 }),
            next_id: AtomicU64::new(1),
        }
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

    fn fresh_id(&self) -> String {
        format!("{}:{}:{}", self.me.node, self.me.instance_id, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `identity` on `node` and waits for the outcome; a node or link that goes away
    /// before answering is `Unreachable`, never a wait for the request timeout.
    pub async fn call(&self, node: &str, command: &str, identity: &FunctionIdentity, call: CallArgs) -> CallOutcome {
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
            body: FabricBody::Call {
                command: command.to_owned(),
                identity: identity.clone(),
                args: call.args,
                kwargs: call.kwargs,
            },
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

    /// Publishes a message to every node (each delivers it to its local subscribers once).
    pub fn broadcast_publish(&self, message: &PubSubMessage) {
        if !self.seen.lock().map(|mut s| s.first_time(&message.message_id)).unwrap_or(true) {
            return;
        }
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

    fn flood(&self, message: &FabricMessage, except: Option<LinkId>) {
        let bytes = frame(&PeerFrame::FabricMessage(message.clone()));
        for (link, sender) in self.view.load().links.values() {
            if Some(*link) != except && sender.try_send(bytes.clone()).is_err() {
                warn!(link, "peer link queue full; dropped a flooded message");
            }
        }
    }

    /// Fails every call waiting on `link` (it closed).
    pub fn link_closed(&self, link: LinkId) {
        let Ok(mut pending) = self.pending.lock() else { return };
        let gone: Vec<String> = pending.iter().filter(|(_, p)| p.via == link).map(|(id, _)| id.clone()).collect();
        for id in gone {
            // Dropping the sender wakes the caller with `Gone`.
            pending.remove(&id);
        }
    }

    /// Handles a frame read from a link: routed messages here, the rest to the actor.
    pub fn on_frame(self: &Arc<Self>, link: LinkId, frame: PeerFrame) {
        match frame {
            PeerFrame::FabricMessage(message) => self.route(link, message),
            other => match self.gossip.get() {
                Some(gossip) => gossip.do_send(PeerFrameReceived { link, frame: other }),
                None => debug!(link, "fabric restarting; dropped a gossip frame"),
            },
        }
    }

    fn route(self: &Arc<Self>, link: LinkId, mut message: FabricMessage) {
        if message.target == BROADCAST {
            let FabricBody::Publish { message: published } = &message.body else { return };
            if !self.seen.lock().map(|mut s| s.first_time(&published.message_id)).unwrap_or(false) {
                return;
            }
            if let Some(pubsub) = self.pubsub.get() {
                pubsub.do_send(pubsub::Publish { message: published.clone() });
            }
            if message.hops_left > 0 && !message.path.contains(&self.me.node) {
                message.hops_left -= 1;
                message.path.push(self.me.node.clone());
                self.flood(&message, Some(link));
            }
            return;
        }
        if message.target != self.me.node {
            self.forward(link, message);
            return;
        }
        match message.body {
            FabricBody::Reply { outcome } => {
                let waiter = self.pending.lock().ok().and_then(|mut p| p.remove(&message.id));
                if let Some(waiter) = waiter {
                    let _ = waiter.reply.send(outcome);
                }
            }
            FabricBody::Call { command, identity, args, kwargs } => {
                let shared = self.clone();
                let (id, source) = (message.id, message.source);
                let forwards = message.path.len().saturating_sub(1);
                tokio::spawn(async move {
                    let outcome = shared.serve_call(&command, &identity, CallArgs { args, kwargs }).await;
                    shared.reply(link, id, source, outcome, forwards);
                });
            }
            FabricBody::Publish { .. } => {}
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
            Err(error) => CallOutcome::Failed { error, node: self.me.node.clone() },
        }
    }

    /// Answers a call that took `forwards` forwards to get here: the reply may need as
    /// many on the way back, whatever this node's own budget (else it dies on the way and
    /// the caller waits for its whole-request timeout).
    fn reply(&self, arrived_on: LinkId, id: String, target: NodeId, outcome: CallOutcome, forwards: usize) {
        let message = FabricMessage {
            id,
            source: self.me.node.clone(),
            target: target.clone(),
            path: vec![self.me.node.clone()],
            hops_left: self.hop_budget.max(u32::try_from(forwards).unwrap_or(u32::MAX)),
            body: FabricBody::Reply { outcome },
        };
        let view = self.view.load();
        // Prefer the current route; fall back to the link the call came in on.
        let sender = view
            .next_hops
            .get(&target)
            .and_then(|hop| view.links.get(hop))
            .or_else(|| view.links.values().find(|(l, _)| *l == arrived_on))
            .map(|(_, s)| s.clone());
        match sender {
            Some(sender) => {
                if sender.try_send(frame(&PeerFrame::FabricMessage(message))).is_err() {
                    warn!(target = %target, "reply dropped: peer link queue full or closed");
                }
            }
            None => warn!(target = %target, "reply dropped: no route back"),
        }
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
        let next = view.next_hops.get(&message.target).and_then(|hop| view.links.get(hop)).map(|(_, s)| s.clone());
        let refusal = refusal
            .or_else(|| next.is_none().then(|| format!("no route from {} to node {}", self.me.node, message.target)));
        if let Some(reason) = refusal {
            warn!(id = %message.id, source = %message.source, target = %message.target, reason = %reason, "fabric message refused");
            if matches!(message.body, FabricBody::Call { .. }) {
                let forwards = message.path.len().saturating_sub(1);
                self.reply(arrived_on, message.id, message.source, CallOutcome::Unreachable { reason }, forwards);
            }
            return;
        }
        message.hops_left -= 1;
        message.path.push(self.me.node.clone());
        if let Some(sender) = next {
            if sender.try_send(frame(&PeerFrame::FabricMessage(message))).is_err() {
                warn!("forward dropped: peer link queue full or closed");
            }
        }
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

/// Dials `url`, registers the link with the actor, and pumps frames until it closes.
pub async fn dial(url: String, shared: Arc<FabricShared>, timeout: Duration, queue: usize) -> Result<(), String> {
    // Nagle off: a call is one small frame that must not wait for the previous ACK.
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true);
    let (socket, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("connect timed out after {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let Some(gossip) = shared.gossip.get() else { return Err("fabric not running".into()) };
    let link = next_link_id();
    let (mut sink, mut stream) = socket.split();
    let (sender, mut frames) = mpsc::channel::<OutFrame>(queue);
    let (close, closed) = oneshot::channel::<()>();
    gossip.do_send(LinkOpened { link, sender, outbound_url: Some(url.clone()), close: Some(close) });
    // Counted until the peer has acknowledged our close (the reader ends): closing a socket
    // with unread input makes the kernel reset it, dropping what was still unsent.
    shared.writers.send_modify(|n| *n += 1);
    let _done = WriterDone(shared.clone());
    let writer = tokio::spawn(async move {
        let mut closed = closed;
        loop {
            tokio::select! {
                biased;
                next = frames.recv() => {
                    let Some(out) = next else { break };
                    if sink.send(Message::Binary(out.bytes.to_vec())).await.is_err() {
                        break;
                    }
                }
                _ = &mut closed => break,
            }
        }
        let _ = sink.close().await;
    });
    while let Some(message) = stream.next().await {
        let bytes = match message {
            Ok(Message::Binary(bytes)) => bytes,
            Ok(Message::Text(text)) => text.into_bytes(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        match serde_json::from_slice::<PeerFrame>(&bytes) {
            Ok(frame) => shared.on_frame(link, frame),
            Err(e) => warn!(peer = %url, cause = %e, "undecodable frame from peer; ignored"),
        }
    }
    writer.abort();
    shared.link_closed(link);
    if let Some(gossip) = shared.gossip.get() {
        gossip.do_send(LinkClosed { link });
    }
    Ok(())
}
