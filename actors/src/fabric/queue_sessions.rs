//! Queue sessions across the fabric: a client connected to one node using a queue that
//! another node owns.
//!
//! The owner sees each remote client connection as a connection of its own, a
//! pseudo-connection derived from (source node, connection id) ([`remote_conn`]). So a
//! remote client's default consumer, its leases and its subscriptions are bound to that
//! connection exactly as a local client's are, and end the same way:
//!
//! ```text
//! client ──queue op──► node A (source) ──queue-op {request, conn}──► node B (owner)
//!        ◄─queue-message── A: outbox of conn ◄──queue-push {conn, frame}── B: Queue actor
//! client closes ──► A ──queue-gone {conn}──► B: ConnectionGone(pseudo): leases released,
//!                                                subscriptions ended
//! A removed or departed ──────────────────► B: ConnectionGone for every pseudo of A
//! ```
//!
//! - **Source side** ([`QueueSessions`] `clients`): per client connection, the owners it
//!   has used and where pushes for it go. A push is accepted only from a node this
//!   connection sent queue operations to; a push for a connection that is gone is answered
//!   with `queue-gone`, so the owner releases what it still holds for it.
//! - **Owner side** (`remote`): per source node, the pseudo-connections in use, at most
//!   [`super::LinkLimits::max_queue_sessions_per_peer`] (beyond: 1006, counted).
//! - **Pushes** are best effort, as for a local subscriber whose outbox is full: the Queue
//!   actor pushes into a small per-subscription outbox whose frames go to the source node
//!   as one-way `queue-push` messages; a push that finds no room on the way stays leased
//!   and is delivered again after the visibility timeout.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tracing::{debug, warn};

use super::bridge::Work;
use super::link::{FabricShared, RemoteQueue};
use super::wire::{CallOutcome, ClusterId, FabricBody, NodeId};
use crate::outbox::{OutFrame, Outbox};
use crate::protocol::{FrameKind, QueueReply, QueueRequest, RpcError};
use crate::pubsub::{ConnectionId, PseudoConnection};
use crate::queue::{ConnectionGone, QueueCall};

/// Frames a remote subscription's push outbox holds on the owner before pushes wait for
/// redelivery.
const PUSH_FRAMES: usize = 64;
/// Bytes a remote subscription's push outbox holds on the owner.
const PUSH_BYTES: usize = 1 << 20;

/// Both sides' bookkeeping (see the module doc).
#[derive(Default)]
pub struct QueueSessions {
    clients: Mutex<HashMap<ConnectionId, ClientSession>>,
    remote: Mutex<HashMap<NodeId, HashSet<ConnectionId>>>,
}

/// A local client connection that used queues owned elsewhere.
struct ClientSession {
    owners: HashSet<NodeId>,
    pushes: Outbox,
    kind: FrameKind,
}

/// The pseudo-connection on the owner for connection `conn` of node `source`: distinct
/// per (source, conn), never a real connection's id.
pub fn remote_conn(source: &str, conn: ConnectionId) -> ConnectionId {
    PseudoConnection::RemoteQueueClient.id((source, conn))
}

/// Where a queue operation is served (see [`FabricShared::queue_route`]).
pub enum QueueRoute {
    /// By this node's Queue actor (a local queue, `list`, `create`, or an unknown name: 1001).
    Local,
    /// By the queue's owner, over the fabric.
    Remote(RemoteQueue),
    /// Not at all: the owner or the target cluster is out of reach (1005), or the op may
    /// not cross clusters (1002).
    Refused(RpcError),
    /// In other clusters ([`FabricShared::queue_elsewhere`]): the one `target_cluster`
    /// names (`targeted`), or those this node reaches, nearest first.
    Clusters {
        /// Each with the node of this cluster it goes through (`None`: this node's bridges).
        clusters: Vec<(ClusterId, Option<NodeId>)>,
        /// The operation as it crosses (without `target_cluster`).
        work: Work,
        /// Whether `target_cluster` named the one cluster.
        targeted: bool,
    },
}

/// A queue request as it crosses to another cluster: without its `target_cluster`.
fn crossing(request: &QueueRequest) -> Work {
    let mut request = request.clone();
    request.fields.remove("target_cluster");
    Work::Queue(Box::new(request))
}

impl FabricShared {
    /// Source side: connection `conn` is about to send a queue operation to `owner`; its
    /// pushes (if it subscribes) go to `pushes`.
    pub fn queue_session_used(&self, conn: ConnectionId, owner: &str, pushes: &Outbox, kind: FrameKind) {
        let Ok(mut clients) = self.queue_sessions.clients.lock() else { return };
        let session = clients.entry(conn).or_insert_with(|| ClientSession {
            owners: HashSet::new(),
            pushes: pushes.clone(),
            kind,
        });
        if !session.owners.contains(owner) {
            session.owners.insert(owner.to_owned());
        }
    }

    /// Source side: connection `conn` closed; every owner it used releases its leases and
    /// subscriptions.
    pub fn queue_connection_closed(&self, conn: ConnectionId) {
        let session = self.queue_sessions.clients.lock().ok().and_then(|mut c| c.remove(&conn));
        for owner in session.into_iter().flat_map(|s| s.owners) {
            if !self.send_control(&owner, FabricBody::QueueGone { conn }) {
                debug!(owner = %owner, conn, "queue-gone not sent (no route); the owner's leases expire instead");
            }
        }
    }

    /// Source side: a push from `source` for connection `conn`.
    pub(super) fn deliver_queue_push(&self, source: &str, conn: ConnectionId, frame: Value) {
        let target = self
            .queue_sessions
            .clients
            .lock()
            .ok()
            .and_then(|clients| clients.get(&conn).map(|s| (s.owners.contains(source), s.pushes.clone(), s.kind)));
        match target {
            Some((true, pushes, kind)) => {
                let Ok(bytes) = serde_json::to_vec(&frame) else { return };
                if pushes.try_send(OutFrame { bytes: Bytes::from(bytes), kind }).is_err() {
                    // Still leased on the owner: delivered again after its visibility timeout.
                    self.metrics.fabric_dropped("queue_push_full");
                }
            }
            Some((false, ..)) => {
                warn!(source = %source, conn, "queue push from a node this connection does not use; dropped");
                self.metrics.fabric_dropped("queue_push_foreign");
            }
            None => {
                self.metrics.fabric_dropped("queue_push_stray");
                self.send_control(source, FabricBody::QueueGone { conn });
            }
        }
    }

    /// Owner side: connection `conn` of `source` closed.
    pub(super) fn remote_connection_gone(&self, source: &str, conn: ConnectionId) {
        let pseudo = remote_conn(source, conn);
        let known = self.queue_sessions.remote.lock().is_ok_and(|mut remote| {
            let Some(sessions) = remote.get_mut(source) else { return false };
            let known = sessions.remove(&pseudo);
            if sessions.is_empty() {
                remote.remove(source);
            }
            known
        });
        if let (true, Some(queue)) = (known, self.queue.get()) {
            queue.do_send(ConnectionGone { conn: pseudo });
        }
    }

    /// Owner side: node `source` was removed or said GOODBYE; whatever its clients held
    /// here is released.
    pub fn queue_source_gone(&self, source: &str) {
        let pseudos = self.queue_sessions.remote.lock().ok().and_then(|mut r| r.remove(source));
        let Some(queue) = self.queue.get() else { return };
        for pseudo in pseudos.into_iter().flatten() {
            queue.do_send(ConnectionGone { conn: pseudo });
        }
    }

    /// Owner side: a queue operation from connection `conn` of `source` for a local queue.
    pub(super) async fn serve_queue_op(
        self: &Arc<Self>,
        source: &str,
        request: Value,
        conn: ConnectionId,
    ) -> CallOutcome {
        let u = request.get("u").cloned().unwrap_or(Value::Null);
        let reply = |outcome: Result<Value, RpcError>| {
            let u = serde_json::from_value(u.clone()).ok();
            CallOutcome::Ok { value: serde_json::to_value(QueueReply::new(u, outcome)).unwrap_or(Value::Null) }
        };
        let request: QueueRequest = match serde_json::from_value(request) {
            Ok(request) => request,
            Err(e) => return reply(Err(RpcError::invalid(format!("bad forwarded queue request: {e}")))),
        };
        let pseudo = remote_conn(source, conn);
        if !self.admit_remote_session(source, pseudo) {
            self.metrics.limit_exceeded("max_queue_sessions_per_peer");
            let reason = format!("{} holds queue sessions for too many connections of {source}", self.me.node);
            return CallOutcome::Overloaded { reason };
        }
        let outbox = if request.op == "subscribe" {
            self.push_outbox(source, conn)
        } else {
            // Nothing is pushed for other operations; the reply is this call's outcome.
            Outbox::channel(1, PUSH_BYTES).0
        };
        let request = Arc::new(request);
        reply(
            self.local_queue_op(|| QueueCall {
                conn: pseudo,
                outbox: outbox.clone(),
                kind: FrameKind::Binary,
                request: request.clone(),
            })
            .await,
        )
    }

    /// Runs a queue operation on this node's Queue actor (`make` makes the message again
    /// if the actor restarts on the way).
    pub async fn local_queue_op(&self, make: impl Fn() -> QueueCall) -> Result<Value, RpcError> {
        match self.queue.send(make).await {
            Ok(outcome) => outcome,
            Err(e) => Err(RpcError::unreachable(format!("queue service unavailable: {e}; retry"))),
        }
    }

    /// Where a queue operation from a client of this node is served: in another cluster
    /// when its `target_cluster` names one (a `send` or `stats` only), else in this
    /// cluster as `queue_route_within` says, else — a `send` or `stats` of a queue
    /// no node of this cluster has — in the clusters this node reaches, nearest first.
    pub fn queue_route(&self, request: &QueueRequest) -> QueueRoute {
        match request.fields.get("target_cluster") {
            None | Some(Value::Null) => {}
            Some(Value::String(cluster)) if *cluster == self.me.cluster_id => {}
            Some(Value::String(cluster)) => {
                let work = crossing(request);
                if let Err(error) = work.check() {
                    return QueueRoute::Refused(error);
                }
                return match self.cluster_route(cluster) {
                    Ok(via) => QueueRoute::Clusters { clusters: vec![(cluster.clone(), via)], work, targeted: true },
                    Err(reason) => QueueRoute::Refused(RpcError::unreachable(reason)),
                };
            }
            Some(other) => {
                return QueueRoute::Refused(RpcError::invalid(format!("target_cluster must be a string, got {other}")))
            }
        }
        if let Some(route) = self.queue_route_within(request) {
            return route;
        }
        let clusters = self.clusters_reached();
        if clusters.is_empty() {
            return QueueRoute::Local;
        }
        let work = crossing(request);
        if work.check().is_err() {
            return QueueRoute::Local;
        }
        QueueRoute::Clusters { clusters, work, targeted: false }
    }

    /// Where a queue operation is served in this cluster: by this node (a local queue,
    /// or an op without a queue), by the queue's owner, or refused (an owner that is
    /// unreachable); `None` when no node of this cluster has the queue.
    fn queue_route_within(&self, request: &QueueRequest) -> Option<QueueRoute> {
        let Some(name) = request.queue.as_deref().filter(|_| request.op != "list") else {
            return Some(QueueRoute::Local);
        };
        // `NAME.dlq` lives with `NAME`.
        let name = name.strip_suffix(crate::queue::core::DLQ_SUFFIX).unwrap_or(name);
        if self.local_queues.lock().is_ok_and(|local| local.iter().any(|q| q == name)) {
            return Some(QueueRoute::Local);
        }
        let view = self.view.load();
        if let Some(owner) = view.queues.get(name) {
            return Some(QueueRoute::Remote(owner.clone()));
        }
        if let Some(owner) = view.unreachable_queues.get(name) {
            let details = format!("queue {name:?} is owned by {} ({}), which is unreachable", owner.node, owner.url);
            return Some(QueueRoute::Refused(RpcError::unreachable(details)));
        }
        None
    }

    /// Runs a queue operation on its owner `owner`, for connection `conn` of this node,
    /// within `timeout`; a lost owner or link is 1005 at once.
    pub async fn forward_queue_op(
        &self,
        owner: &RemoteQueue,
        request: &QueueRequest,
        conn: ConnectionId,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let body = serde_json::to_value(request).map_err(|e| RpcError::invalid(e.to_string()))?;
        let outcome = match tokio::time::timeout(timeout, self.queue_op(&owner.node, body, conn)).await {
            Ok(outcome) => outcome,
            Err(_) => return Err(RpcError::timeout(timeout.as_secs_f64())),
        };
        outcome.into_op_result("queue", &owner.node)
    }

    /// Runs a queue operation [`Self::queue_route`] sent to other clusters, within
    /// `timeout`: in the one `target_cluster` named (its answer, errors included), or in
    /// the first of `clusters` that has the queue and exports it (1001 when none does).
    pub async fn queue_elsewhere(
        &self,
        clusters: &[(ClusterId, Option<NodeId>)],
        work: Work,
        targeted: bool,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let deadline = std::time::Instant::now().checked_add(timeout);
        match clusters {
            [(cluster, via)] if targeted => self.run_in_cluster(cluster, via.as_deref(), work, deadline).await,
            _ => {
                let none = match &work {
                    Work::Queue(request) => RpcError::queue_not_found(request.queue.as_deref().unwrap_or_default()),
                    _ => RpcError::invalid("not a queue operation"),
                };
                self.ask_clusters(clusters, work, deadline, none).await
            }
        }
    }

    /// Runs a queue operation that came from cluster `origin` (a `send` or `stats`): on
    /// the queue's owner in this cluster, as a client of this node would (one
    /// pseudo-connection per origin cluster); a queue no node has is 1001.
    pub async fn queue_for_cluster(&self, origin: &str, request: QueueRequest) -> Result<Value, RpcError> {
        let conn = PseudoConnection::RemoteCluster.id(origin);
        let request = Arc::new(request);
        match self.queue_route_within(&request) {
            Some(QueueRoute::Remote(owner)) => {
                self.forward_queue_op(&owner, &request, conn, self.limits.forwarded_ttl).await
            }
            Some(QueueRoute::Refused(error)) => Err(error),
            _ => {
                // Nothing is pushed for a send or stats; the reply is this call's outcome.
                let outbox = Outbox::channel(1, PUSH_BYTES).0;
                self.local_queue_op(|| QueueCall {
                    conn,
                    outbox: outbox.clone(),
                    kind: FrameKind::Binary,
                    request: request.clone(),
                })
                .await
            }
        }
    }

    fn admit_remote_session(&self, source: &str, pseudo: ConnectionId) -> bool {
        let Ok(mut remote) = self.queue_sessions.remote.lock() else { return false };
        let sessions = remote.entry(source.to_owned()).or_default();
        sessions.contains(&pseudo)
            || (sessions.len() < self.limits.max_queue_sessions_per_peer && sessions.insert(pseudo))
    }

    /// An outbox whose frames travel to `source` as pushes for its connection `conn`; the
    /// forwarding task ends when the Queue actor drops the subscription (and the outbox).
    fn push_outbox(self: &Arc<Self>, source: &str, conn: ConnectionId) -> Outbox {
        let (outbox, mut frames) = Outbox::channel(PUSH_FRAMES, PUSH_BYTES);
        let (shared, source) = (self.clone(), source.to_owned());
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                frames.written(&frame);
                let Ok(frame) = serde_json::from_slice::<Value>(&frame.bytes) else { continue };
                if !shared.send_one_way(&source, FabricBody::QueuePush { conn, frame }) {
                    // Still leased: delivered again after the visibility timeout.
                    shared.metrics.fabric_dropped("queue_push_full");
                }
            }
        });
        outbox
    }
}

#[cfg(test)]
mod tests {
    use super::remote_conn;

    #[test]
    fn pseudo_connections_are_distinct_per_source_and_connection_and_above_real_ids() {
        let ids = [remote_conn("a", 1), remote_conn("a", 2), remote_conn("b", 1), remote_conn("b", 2)];
        for (i, x) in ids.iter().enumerate() {
            assert!(*x >= 1 << 63 && *x < 3 << 62, "in the remote clients' quarter");
            for y in &ids[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(remote_conn("a", 1), remote_conn("a", 1));
    }
}
