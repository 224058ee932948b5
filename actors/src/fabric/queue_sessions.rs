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

use bytes::Bytes;
use serde_json::Value;
use tracing::{debug, warn};

use super::link::FabricShared;
use super::wire::{CallOutcome, FabricBody, NodeId};
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
            if !self.send_one_way(&owner, FabricBody::QueueGone { conn }) {
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
                self.send_one_way(source, FabricBody::QueueGone { conn });
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
        let Some(queue) = self.queue.get() else {
            return reply(Err(RpcError::unreachable(format!("queue service of {} restarting; retry", self.me.node))));
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
        let call = QueueCall { conn: pseudo, outbox, kind: FrameKind::Binary, request: Arc::new(request) };
        match queue.send(call).await {
            Ok(outcome) => reply(outcome),
            Err(e) => reply(Err(RpcError::unreachable(format!("queue service unavailable: {e}; retry")))),
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
