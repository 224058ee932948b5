//! The `Queue` actor: every queue of this node, reachable over the wire (`role: "queue"`).
//!
//! Who sends to it: connections ([`QueueCall`], [`ConnectionGone`]), its own timer, the
//! supervisor. Whom it calls: the store, through its [`PersistenceHandle`]; subscribers'
//! outboxes (pushes). It owns one [`QueueCore`] per queue and is a thin shell around them:
//! every handler applies a core step synchronously, then hands the step's writes to the
//! commit pipeline and answers from a future that waits for the commit.
//!
//! # Ordering and the commit pipeline
//!
//! ```text
//! handler: core step ──► pipeline (unbounded, FIFO) ──► one task: submit() ──► committer
//!   │                                                     (enqueue only)       (group commit:
//!   └─► ResponseFuture: await the commit's answer ─► push deliveries ─► reply    N batches, 1 sync)
//! ```
//! Batches reach the committer in the order the actor produced them (one task submits
//! them one after another), so an upsert and a later delete of the same record are applied
//! in that order. The actor never waits for a sync: 64 sends in flight are 64 steps
//! queued behind one another, and they share the committer's next sync.
//!
//! # What a durable acknowledgement promises
//!
//! A `send` to a durable queue (guarantees other than `fire_and_forget`) is answered only
//! after its record was applied, flushed and fdatasync'ed (see [`crate::persistence`]). A
//! commit that fails answers the sender 1003 `not durable: <cause>`. The message is not
//! rolled back: it stays in the queue's memory and may be delivered (its record may even
//! have reached the disk before the sync failed), so the outcome of a refused send is
//! "unknown, maybe delivered" — a sender that retries may cause one extra delivery, which
//! at-least-once allows. A retry with the same `dedup_id` is answered as a duplicate only
//! after a barrier commit behind the first send, so it is never acknowledged while the
//! first is not durable.
//! Nothing acknowledged is lost. After a failed sync the store refuses every durable commit until the node
//! restarts (the persistence module's rule), so every later durable send fails the same way.
//!
//! Deliveries (pushes, and long-poll answers) go out after the step that leased them is
//! committed, so `max_receives` bounds a message that crashes consumers even across
//! restarts. A push that does not fit in the subscriber's outbox stays leased and is
//! redelivered after the visibility timeout.
//!
//! # Consumers
//!
//! A pull `receive` without `consumer` uses one consumer per connection (`conn:<id>`),
//! whose leases are released when the connection closes. With `consumer` the id is the
//! client's own (`c:<consumer>`), is not tied to a connection, and its leases end only by
//! ack, nack or visibility timeout: that is what lets `mpreg client queue receive` and
//! `ack` run in two processes (the CLI uses `cli` unless told otherwise). A subscription
//! is the consumer `sub:<conn>:<subscription_id>` and ends with its connection. An `ack`
//! without `consumer` tries the connection's consumer, then its subscriptions on the queue.
//!
//! # Restart
//!
//! On start the actor recovers every queue recorded in the store (tree `queues`: config and
//! bindings; tree `queue/<name>`: one record per message, key = its id): pending, delayed
//! and dead-lettered messages come back, leased ones are visible again. A restart after a
//! panic (fault injection) therefore loses nothing acknowledged. In-memory queues
//! (`durable: false`) have no records and are gone after any restart. A node without a
//! data dir keeps its store in memory: its queues survive a restart of this actor, not of
//! the process. Message ids are
//! `<instance>-<counter>` with a random 64-bit instance chosen at each start, so they stay
//! unique across restarts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message, ResponseFuture, SpawnHandle};
use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::core::{
    ConsumerId, Delivery, Guarantee, HeldBytes, MessageId, NewMessage, QueueConfig, QueueCore, QueueError, QueueStats,
    QueueWrite, Sent, Step, StoredMessage, DLQ_SUFFIX, MAX_RECEIVE_BATCH,
};
use crate::metrics::Metrics;
use crate::outbox::{OutFrame, Outbox};
use crate::persistence::{Batch, KeyRange, PendingCommit, PersistenceError, PersistenceHandle};
use crate::protocol::{encode, FrameKind, PubSubNotification, QueueRequest, RpcError, Subscription, TopicPatternSpec};
use crate::pubsub::{self, ConnectionId, PubSub};
use crate::supervisor::{ChildGuard, Slot};
use crate::unix_now;

mod dead_letters;

/// Tree holding one meta record per queue (key: its name).
pub const META_TREE: &str = "queues";
/// Records scanned per page at recovery.
const SCAN_PAGE: usize = 10_000;

/// The tree of a queue's messages.
pub fn message_tree(queue: &str) -> String {
    format!("queue/{queue}")
}

/// Bounds of the queue service, from the node's settings.
#[derive(Debug, Clone)]
pub struct QueueLimits {
    /// Most queues on this node (`queue_max_queues`).
    pub max_queues: usize,
    /// Longest long-poll `wait`, seconds (longer waits are capped).
    pub max_wait: f64,
    /// Largest payload any queue accepts (`max_frame_bytes`): a config above it is refused.
    pub max_message_bytes: usize,
    /// Bytes of messages all queues of this node hold together (`queue_max_bytes`); a
    /// send beyond it is refused with 1006.
    pub max_bytes: u64,
    /// This node's name (the `owner` of its queues in `stats` and `list`).
    pub node: String,
    /// Most bindings of one queue (`pubsub_max_subscriptions_per_connection`: a queue's
    /// bindings are one pub/sub connection).
    pub max_bindings_per_queue: usize,
    /// Most queue subscriptions of one connection (`pubsub_max_subscriptions_per_connection`
    /// too: one bound for both kinds of subscription).
    pub max_subscriptions_per_connection: usize,
}

/// Longest `subscription_id` of a queue subscription, in bytes.
pub const MAX_SUBSCRIPTION_ID_BYTES: usize = 256;

/// The consumer a subscription `sid` of connection `conn` receives as.
fn subscription_consumer(conn: ConnectionId, sid: &str) -> ConsumerId {
    ConsumerId::from(format!("sub:{conn}:{sid}"))
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_queues: 1000,
            max_wait: 20.0,
            max_message_bytes: 1024 * 1024,
            max_bytes: 256 * 1024 * 1024,
            node: String::new(),
            max_bindings_per_queue: 1024,
            max_subscriptions_per_connection: 1024,
        }
    }
}

/// One queue as `/queues` and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSummary {
    /// Its name.
    pub name: String,
    /// Whether it is persisted.
    pub durable: bool,
    /// Gauges and counters.
    pub stats: QueueStats,
}

/// The latest summaries, published by the actor for the monitor (read without a message).
#[derive(Clone, Default)]
pub struct QueueBoard(Arc<ArcSwap<Vec<QueueSummary>>>);

impl QueueBoard {
    /// The summaries, by name.
    pub fn load(&self) -> Arc<Vec<QueueSummary>> {
        self.0.load_full()
    }

    fn publish(&self, summaries: Vec<QueueSummary>) {
        self.0.store(Arc::new(summaries));
    }
}

/// The persisted meta record of a queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QueueMeta {
    config: QueueConfig,
    #[serde(default)]
    bindings: Vec<String>,
}

/// One queue operation from a client connection; the answer is the reply's `result`.
#[derive(Message)]
#[rtype(result = "Result<Value, RpcError>")]
pub struct QueueCall {
    /// The connection (consumers and subscriptions are bound to it).
    pub conn: ConnectionId,
    /// Where pushes for its subscriptions go.
    pub outbox: Outbox,
    /// Frame type of the pushes.
    pub kind: FrameKind,
    /// The request.
    pub request: Arc<QueueRequest>,
}

/// A connection closed: release its consumers' leases and end its subscriptions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionGone {
    /// The connection.
    pub conn: ConnectionId,
}

/// A subscription's push target.
struct Subscriber {
    queue: String,
    subscription_id: String,
    outbox: Outbox,
    kind: FrameKind,
}

/// A long-poll `receive` waiting for messages.
struct Waiter {
    consumer: ConsumerId,
    max: usize,
    visibility: Option<f64>,
    done: oneshot::Sender<Result<Value, RpcError>>,
}

/// One hosted queue.
struct Hosted {
    core: QueueCore,
    bindings: Vec<String>,
    waiters: VecDeque<Waiter>,
}

type Durable = Pin<Box<dyn Future<Output = Result<(), PersistenceError>>>>;
type Submission = (Batch, oneshot::Sender<Result<PendingCommit, PersistenceError>>);

/// The Queue actor.
pub struct Queue {
    store: PersistenceHandle,
    metrics: Arc<Metrics>,
    limits: QueueLimits,
    board: QueueBoard,
    queues: BTreeMap<String, Hosted>,
    /// What the queues' messages hold together, against `limits.max_bytes`.
    held: HeldBytes,
    pipeline: Option<mpsc::UnboundedSender<Submission>>,
    instance: String,
    next_id: u64,
    subscribers: HashMap<ConsumerId, Subscriber>,
    /// Consumers bound to a connection, by queue.
    by_conn: HashMap<ConnectionId, HashSet<(String, ConsumerId)>>,
    timer: Option<(f64, SpawnHandle)>,
    /// PubSub, for bindings; the address the bindings were subscribed at.
    pubsub: Option<Slot<PubSub>>,
    bound_at: Option<Addr<PubSub>>,
    /// Where PubSub delivers the publishes that match a binding.
    binding_outbox: Option<Outbox>,
    /// The fabric, told when the set of queues changes (it advertises them).
    fabric: Option<Arc<crate::fabric::FabricShared>>,
    _guard: ChildGuard,
}

/// The pub/sub "connection" of the bindings of `queue`: one per queue, so that pub/sub's
/// per-connection bound is a bound per queue (and one queue's bindings cannot use up
/// another's).
fn binding_conn(queue: &str) -> ConnectionId {
    pubsub::PseudoConnection::QueueBindings.id(queue)
}
/// Subscription id of a binding: `queue-bind <queue> <pattern>` (neither has a space).
fn binding_id(queue: &str, pattern: &str) -> String {
    format!("queue-bind {queue} {pattern}")
}

/// A publish matched a binding of `queue`: enqueue it (at least once, dedup id = the
/// pub/sub message id).
#[derive(Message)]
#[rtype(result = "()")]
struct BoundPublish {
    queue: String,
    message_id: String,
    payload: Value,
}

impl Queue {
    /// Advertises this node's queues in the fabric's catalog.
    pub fn with_fabric(mut self, fabric: Arc<crate::fabric::FabricShared>) -> Self {
        self.fabric = Some(fabric);
        self
    }

    /// Lets bindings subscribe to pub/sub (without it `bind` is recorded but inert).
    pub fn with_pubsub(mut self, pubsub: Slot<PubSub>) -> Self {
        self.pubsub = Some(pubsub);
        self
    }

    /// Subscribes `pattern` for `queue` at the current PubSub.
    fn subscribe_binding(&self, queue: &str, pattern: &str, ctx: &mut Context<Self>) {
        let (Some(addr), Some(outbox)) = (self.bound_at.clone(), self.binding_outbox.clone()) else { return };
        let subscription = Arc::new(Subscription {
            subscription_id: binding_id(queue, pattern),
            patterns: vec![TopicPatternSpec { pattern: pattern.to_owned(), exact_match: false }],
            subscriber: format!("queue {queue}"),
            created_at: Some(unix_now()),
            get_backlog: false,
            backlog_seconds: 0.0,
        });
        let (queue, pattern) = (queue.to_owned(), pattern.to_owned());
        let conn = binding_conn(&queue);
        let subscribe = pubsub::Subscribe { conn, subscription, outbox, kind: FrameKind::Text };
        ctx.spawn(actix::fut::wrap_future(async move {
            match addr.send(subscribe).await {
                Ok(Ok(_)) => info!(queue = %queue, pattern = %pattern, "binding subscribed"),
                Ok(Err(e)) => warn!(queue = %queue, pattern = %pattern, cause = %e, "binding refused by pubsub"),
                Err(e) => warn!(queue = %queue, pattern = %pattern, cause = %e, "pubsub unavailable for a binding"),
            }
        }));
    }

    /// (Re)subscribes every binding when PubSub's address changed (first start, or a
    /// PubSub restart, which loses its subscriptions).
    fn refresh_bindings(&mut self, ctx: &mut Context<Self>) {
        let Some(current) = self.pubsub.as_ref().and_then(Slot::get) else { return };
        if self.bound_at.as_ref() == Some(&current) {
            return;
        }
        // Subscriptions of an earlier incarnation of this actor end first.
        for queue in self.queues.keys() {
            current.do_send(pubsub::ConnectionClosed { conn: binding_conn(queue) });
        }
        self.bound_at = Some(current);
        let all: Vec<(String, String)> =
            self.queues.iter().flat_map(|(q, h)| h.bindings.iter().map(move |p| (q.clone(), p.clone()))).collect();
        for (queue, pattern) in all {
            self.subscribe_binding(&queue, &pattern, ctx);
        }
    }

    /// Reads what PubSub delivers to the bindings and hands it to this actor.
    fn start_binding_reader(&mut self, ctx: &mut Context<Self>) {
        let (outbox, mut frames) = Outbox::channel(1024, 16 * 1024 * 1024);
        self.binding_outbox = Some(outbox);
        let me = ctx.address();
        ctx.spawn(actix::fut::wrap_future(async move {
            while let Some(frame) = frames.recv().await {
                frames.written(&frame);
                let Ok(note) = serde_json::from_slice::<PubSubNotification>(&frame.bytes) else { continue };
                let mut parts = note.subscription_id.splitn(3, ' ');
                let (Some("queue-bind"), Some(queue)) = (parts.next(), parts.next()) else { continue };
                let bound = BoundPublish {
                    queue: queue.to_owned(),
                    message_id: note.message.message_id,
                    payload: note.message.payload,
                };
                if me.send(bound).await.is_err() {
                    return;
                }
            }
        }));
    }

    /// The actor; it recovers the queues recorded in `store` when it starts.
    pub fn new(
        store: PersistenceHandle,
        metrics: Arc<Metrics>,
        limits: QueueLimits,
        board: QueueBoard,
        guard: ChildGuard,
    ) -> Self {
        Queue {
            store,
            metrics,
            held: HeldBytes::new(limits.max_bytes),
            limits,
            board,
            queues: BTreeMap::new(),
            pipeline: None,
            instance: format!("{:016x}", rand::random::<u64>()),
            next_id: 0,
            subscribers: HashMap::new(),
            by_conn: HashMap::new(),
            timer: None,
            pubsub: None,
            bound_at: None,
            binding_outbox: None,
            fabric: None,
            _guard: guard,
        }
    }

    /// Rebuilds every queue recorded in the store.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        let now = unix_now();
        let metas = match self.store.scan(META_TREE, &KeyRange::all(), usize::MAX) {
            Ok(metas) => metas,
            Err(e) => {
                error!(cause = %e, "cannot read the queue table; starting without queues");
                return;
            }
        };
        for (key, value) in metas {
            let name = String::from_utf8_lossy(&key).into_owned();
            let meta: QueueMeta = match serde_json::from_slice(&value) {
                Ok(meta) => meta,
                Err(e) => {
                    error!(queue = %name, cause = %e, "unreadable queue config; queue skipped");
                    continue;
                }
            };
            let records = match self.read_records(&name) {
                Ok(records) => records,
                Err(e) => {
                    error!(queue = %name, cause = %e, "cannot read the queue's messages; queue skipped");
                    continue;
                }
            };
            let count = records.len();
            match QueueCore::recover(meta.config, records, now) {
                Ok((mut core, writes)) => {
                    core.count_in(self.held.clone());
                    info!(queue = %name, messages = count, "queue recovered");
                    self.queues
                        .insert(name.clone(), Hosted { core, bindings: meta.bindings, waiters: VecDeque::new() });
                    Self::background(self.persist(&name, writes), ctx);
                }
                Err(e) => error!(queue = %name, cause = %e, "stored queue refused; queue skipped"),
            }
        }
    }

    fn read_records(&self, name: &str) -> Result<Vec<StoredMessage>, PersistenceError> {
        let tree = message_tree(name);
        let mut records = Vec::new();
        let mut range = KeyRange::all();
        loop {
            let page = self.store.scan(&tree, &range, SCAN_PAGE)?;
            let full = page.len() == SCAN_PAGE;
            let last = page.last().map(|(k, _)| k.clone());
            for (key, value) in page {
                match serde_json::from_slice::<StoredMessage>(&value) {
                    Ok(record) => records.push(record),
                    Err(e) => warn!(queue = %name, key = %String::from_utf8_lossy(&key), cause = %e,
                        "unreadable message record skipped"),
                }
            }
            match (full, last) {
                (true, Some(last)) => range = range.resume_after(last),
                _ => return Ok(records),
            }
        }
    }

    /// Queues the writes of a step for the committer, in order; the future resolves when
    /// they are durable (at once when there are none).
    fn persist(&self, name: &str, writes: Vec<QueueWrite>) -> Durable {
        if writes.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let tree = message_tree(name);
        let mut batch = Batch::new();
        for write in writes {
            batch = match write {
                QueueWrite::Upsert(record) => match serde_json::to_vec(&record) {
                    Ok(value) => batch.put(tree.clone(), record.id.as_str().as_bytes().to_vec(), value),
                    Err(e) => return Box::pin(async move { Err(PersistenceError::Io(e.to_string())) }),
                },
                QueueWrite::Remove(id) => batch.delete(tree.clone(), id.as_str().as_bytes().to_vec()),
                QueueWrite::Config(config) => {
                    let bindings = self.queues.get(name).map(|h| h.bindings.clone()).unwrap_or_default();
                    match serde_json::to_vec(&QueueMeta { config, bindings }) {
                        Ok(value) => batch.put(META_TREE, name.as_bytes().to_vec(), value),
                        Err(e) => return Box::pin(async move { Err(PersistenceError::Io(e.to_string())) }),
                    }
                }
            };
        }
        self.submit(batch)
    }

    fn submit(&self, batch: Batch) -> Durable {
        let (tx, rx) = oneshot::channel();
        if let Some(pipeline) = &self.pipeline {
            let _ = pipeline.send((batch, tx));
        }
        Box::pin(async move {
            let pending = rx.await.map_err(|_| PersistenceError::Unavailable)??;
            pending.await.unwrap_or(Err(PersistenceError::Unavailable))
        })
    }

    /// Persists the meta record (config + bindings) of `name`.
    fn persist_meta(&self, name: &str) -> Durable {
        let Some(hosted) = self.queues.get(name) else { return Box::pin(async { Ok(()) }) };
        if !hosted.core.config().durable {
            return Box::pin(async { Ok(()) });
        }
        self.persist(name, vec![QueueWrite::Config(hosted.core.config().clone())])
    }

    fn new_id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId::from(format!("{}-{:x}", self.instance, self.next_id))
    }

    /// Applies a step's side effects: writes to the pipeline, pushes once they are durable.
    /// Returns the durability future; the caller answers after it.
    fn effects<T>(&mut self, name: &str, step: Step<T>) -> (T, Durable) {
        let Step { value, writes, pushes } = step;
        let durable = self.persist(name, writes);
        let frames = self.push_frames(name, pushes);
        let durable: Durable = if frames.is_empty() {
            durable
        } else {
            Box::pin(async move {
                let outcome = durable.await;
                if outcome.is_ok() {
                    for (outbox, frame) in frames {
                        // Does not fit: stays leased, redelivered after the visibility timeout.
                        let _ = outbox.try_send(frame);
                    }
                }
                outcome
            })
        };
        (value, durable)
    }

    fn push_frames(&self, name: &str, pushes: Vec<Delivery>) -> Vec<(Outbox, OutFrame)> {
        let mut frames = Vec::with_capacity(pushes.len());
        for delivery in pushes {
            let Some(sub) = self.subscribers.get(&delivery.consumer) else { continue };
            let frame = json!({
                "role": "queue-message",
                "subscription_id": sub.subscription_id,
                "queue": name,
                "message": message_json(&delivery),
            });
            frames.push((sub.outbox.clone(), OutFrame { bytes: Bytes::from(encode(&frame)), kind: sub.kind }));
        }
        frames
    }

    /// Runs `durable` in the background (timer steps, recovery writes).
    fn background(durable: Durable, ctx: &mut Context<Self>) {
        ctx.spawn(actix::fut::wrap_future(async move {
            if let Err(e) = durable.await {
                warn!(cause = %e, "queue write not durable");
            }
        }));
    }

    /// Hands visible messages to waiting long-polls of `name`.
    fn serve_waiters(&mut self, name: &str, ctx: &mut Context<Self>) {
        loop {
            let Some(hosted) = self.queues.get_mut(name) else { return };
            let Some(waiter) = hosted.waiters.pop_front() else { return };
            if waiter.done.is_closed() {
                continue;
            }
            let step = hosted.core.receive(&waiter.consumer, waiter.max, waiter.visibility, unix_now());
            let got_some = matches!(&step.value, Ok(d) if !d.is_empty());
            let (value, durable) = self.effects(name, step);
            if !got_some {
                Self::background(durable, ctx);
                if let Some(hosted) = self.queues.get_mut(name) {
                    hosted.waiters.push_front(waiter);
                }
                return;
            }
            ctx.spawn(actix::fut::wrap_future(async move {
                let answer = match durable.await {
                    Ok(()) => value.map(|d| deliveries_json(&d)).map_err(core_error),
                    Err(e) => Err(RpcError::not_durable(e)),
                };
                let _ = waiter.done.send(answer);
            }));
        }
    }

    /// Arms the timer for the earliest deadline of any queue.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let next = self.queues.values().filter_map(|h| h.core.next_deadline()).reduce(f64::min);
        let Some(at) = next else { return };
        if let Some((armed, _)) = self.timer {
            if armed <= at {
                return;
            }
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        let wait = Duration::from_secs_f64((at - unix_now()).clamp(0.0, 3600.0));
        let handle = ctx.run_later(wait, |act, ctx| {
            act.timer = None;
            act.tick(ctx);
        });
        self.timer = Some((at, handle));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = unix_now();
        let due: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, h)| h.core.next_deadline().is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(hosted) = self.queues.get_mut(&name) else { continue };
            let step = hosted.core.tick(now);
            let ((), durable) = self.effects(&name, step);
            Self::background(durable, ctx);
            self.serve_waiters(&name, ctx);
        }
        self.schedule(ctx);
    }

    fn publish_board(&self) {
        if let Some(fabric) = &self.fabric {
            fabric.set_local_queues(self.queues.keys().cloned().collect());
        }
        let summaries = self
            .queues
            .iter()
            .map(|(name, h)| QueueSummary {
                name: name.clone(),
                durable: h.core.config().durable,
                stats: h.core.stats(),
            })
            .collect();
        self.board.publish(summaries);
    }

    fn hosted(&mut self, name: &str) -> Result<&mut Hosted, RpcError> {
        self.queues.get_mut(name).ok_or_else(|| RpcError::queue_not_found(name))
    }

    /// Dispatches one op. Immediate answers are `Ready`; the rest wait for durability.
    fn call(&mut self, msg: QueueCall, ctx: &mut Context<Self>) -> Answer {
        let req = msg.request.clone();
        let f = &req.fields;
        if req.op == "list" {
            return Answer::Ready(Ok(self.list()));
        }
        let Some(name) = req.queue.clone() else {
            return Answer::Ready(Err(RpcError::invalid(format!("op {:?} needs the field \"queue\"", req.op))));
        };
        if let Some(base) = name.strip_suffix(DLQ_SUFFIX).filter(|base| self.queues.contains_key(*base)) {
            return self.dead_letter_op(msg.conn, base, &req.op, f, ctx);
        }
        let now = unix_now();
        match req.op.as_str() {
            "create" => self.create(&name, f),
            "delete" => {
                let Some(hosted) = self.queues.remove(&name) else {
                    return Answer::Ready(Ok(json!({"deleted": false})));
                };
                let mut batch = Batch::new().delete(META_TREE, name.as_bytes().to_vec());
                if let Ok(records) = self.store.scan(&message_tree(&name), &KeyRange::all(), usize::MAX) {
                    for (key, _) in records {
                        batch = batch.delete(message_tree(&name), key);
                    }
                }
                if let Some(addr) = &self.bound_at {
                    for pattern in &hosted.bindings {
                        let subscription_id = binding_id(&name, pattern);
                        addr.do_send(pubsub::Unsubscribe { conn: binding_conn(&name), subscription_id });
                    }
                }
                drop(hosted);
                self.subscribers.retain(|_, s| s.queue != name);
                // Its consumers no longer count against their connections' bounds.
                for held in self.by_conn.values_mut() {
                    held.retain(|(queue, _)| *queue != name);
                }
                self.by_conn.retain(|_, held| !held.is_empty());
                self.publish_board();
                Answer::after(self.submit(batch), json!({"deleted": true}))
            }
            "send" => self.send(&name, f, now),
            "receive" => self.receive(msg.conn, &name, f, now, ctx),
            "ack" | "nack" => self.settle(msg.conn, &name, &req.op, f, now, Lane::Main),
            "subscribe" => {
                let Some(sid) = f.get("subscription_id").and_then(Value::as_str) else {
                    return Answer::Ready(Err(RpcError::invalid("subscribe needs \"subscription_id\" (a string)")));
                };
                if let Err(e) = self.may_subscribe(msg.conn, &name, sid) {
                    return Answer::Ready(Err(e));
                }
                let prefetch = match opt_u64(f, "prefetch") {
                    Ok(p) => p.unwrap_or(16).clamp(1, MAX_RECEIVE_BATCH as u64) as usize,
                    Err(e) => return Answer::Ready(Err(e)),
                };
                if let Err(e) = self.hosted(&name) {
                    return Answer::Ready(Err(e));
                }
                let consumer = subscription_consumer(msg.conn, sid);
                self.subscribers.insert(
                    consumer.clone(),
                    Subscriber {
                        queue: name.clone(),
                        subscription_id: sid.to_owned(),
                        outbox: msg.outbox,
                        kind: msg.kind,
                    },
                );
                self.by_conn.entry(msg.conn).or_default().insert((name.clone(), consumer.clone()));
                let Ok(hosted) = self.hosted(&name) else {
                    return Answer::Ready(Err(RpcError::queue_not_found(&name)));
                };
                let step = hosted.core.subscribe(&consumer, prefetch, now);
                let ((), durable) = self.effects(&name, step);
                Answer::after(durable, json!({"subscribed": true}))
            }
            "unsubscribe" => {
                let Some(sid) = f.get("subscription_id").and_then(Value::as_str) else {
                    return Answer::Ready(Err(RpcError::invalid("unsubscribe needs \"subscription_id\" (a string)")));
                };
                let consumer = subscription_consumer(msg.conn, sid);
                let known = self.subscribers.remove(&consumer).is_some();
                if let Some(set) = self.by_conn.get_mut(&msg.conn) {
                    set.remove(&(name.clone(), consumer.clone()));
                }
                let Ok(hosted) = self.hosted(&name) else {
                    return Answer::Ready(Err(RpcError::queue_not_found(&name)));
                };
                let step = hosted.core.unsubscribe(&consumer, now);
                let ((), durable) = self.effects(&name, step);
                Answer::after(durable, json!({"unsubscribed": known}))
            }
            "stats" => match self.queues.get(&name) {
                Some(h) => {
                    let mut stats = serde_json::to_value(h.core.stats()).unwrap_or(Value::Null);
                    if let Value::Object(map) = &mut stats {
                        map.insert("queue".into(), json!(name));
                        map.insert("config".into(), serde_json::to_value(h.core.config()).unwrap_or(Value::Null));
                        map.insert("bindings".into(), json!(h.bindings));
                        map.insert("owner".into(), json!(self.limits.node));
                    }
                    Answer::Ready(Ok(stats))
                }
                None => Answer::Ready(Err(RpcError::queue_not_found(&name))),
            },
            "dlq" | "redrive" => self.base_op(&name, &req.op, f, ctx),
            "bind" | "unbind" => {
                let Some(pattern) = f.get("pattern").and_then(Value::as_str).map(str::to_owned) else {
                    return Answer::Ready(Err(RpcError::invalid(format!("{} needs \"pattern\" (a string)", req.op))));
                };
                if pattern.is_empty() || pattern.contains(char::is_whitespace) || pattern.len() > 1024 {
                    return Answer::Ready(Err(RpcError::invalid(format!(
                        "bad pattern {pattern:?}: 1..=1024 bytes without spaces"
                    ))));
                }
                let max = self.limits.max_bindings_per_queue;
                let hosted = match self.hosted(&name) {
                    Ok(h) => h,
                    Err(e) => return Answer::Ready(Err(e)),
                };
                let bind = req.op == "bind";
                if bind && !hosted.bindings.contains(&pattern) && hosted.bindings.len() >= max {
                    self.metrics.limit_exceeded("pubsub_max_subscriptions_per_connection");
                    return Answer::Ready(Err(RpcError::queue_full(format!(
                        "queue {name} has {max} bindings already (pubsub_max_subscriptions_per_connection)"
                    ))));
                }
                let changed = if bind {
                    if hosted.bindings.contains(&pattern) {
                        false
                    } else {
                        hosted.bindings.push(pattern.clone());
                        true
                    }
                } else {
                    let before = hosted.bindings.len();
                    hosted.bindings.retain(|p| p != &pattern);
                    before != hosted.bindings.len()
                };
                if changed && bind {
                    self.subscribe_binding(&name, &pattern, ctx);
                } else if changed {
                    if let Some(addr) = &self.bound_at {
                        let subscription_id = binding_id(&name, &pattern);
                        addr.do_send(pubsub::Unsubscribe { conn: binding_conn(&name), subscription_id });
                    }
                }
                let durable = self.persist_meta(&name);
                let result = if bind { json!({"bound": true}) } else { json!({ "unbound": changed }) };
                Answer::after(durable, result)
            }
            other => Answer::Ready(Err(RpcError::invalid(format!(
                "unknown queue op {other:?} (create, delete, send, receive, ack, nack, subscribe, unsubscribe, \
                 stats, list, dlq, redrive, bind, unbind)"
            )))),
        }
    }

    /// `dlq` (list dead letters) and `redrive` (move them back) on queue `name`.
    fn base_op(&mut self, name: &str, op: &str, f: &Map<String, Value>, ctx: &mut Context<Self>) -> Answer {
        let now = unix_now();
        match op {
            "dlq" => {
                let limit = match opt_u64(f, "limit") {
                    Ok(l) => l.unwrap_or(100).min(10_000) as usize,
                    Err(e) => return Answer::Ready(Err(e)),
                };
                match self.queues.get(name) {
                    Some(h) => {
                        let messages: Vec<Value> = h
                            .core
                            .dead_letters(limit)
                            .into_iter()
                            .map(|d| {
                                json!({"id": d.id, "payload": payload_value(d.payload.as_str()),
                                    "reason": d.info.reason, "at": d.info.at, "receive_count": d.receive_count,
                                    "guarantee": d.guarantee})
                            })
                            .collect();
                        Answer::Ready(Ok(json!({ "messages": messages })))
                    }
                    None => Answer::Ready(Err(RpcError::queue_not_found(name))),
                }
            }
            "redrive" => {
                let limit = match opt_u64(f, "limit") {
                    Ok(l) => l.unwrap_or(u64::MAX).min(usize::MAX as u64) as usize,
                    Err(e) => return Answer::Ready(Err(e)),
                };
                let hosted = match self.hosted(name) {
                    Ok(h) => h,
                    Err(e) => return Answer::Ready(Err(e)),
                };
                let step = hosted.core.redrive(limit, now);
                let (n, durable) = self.effects(name, step);
                self.serve_waiters(name, ctx);
                Answer::after(durable, json!({ "redriven": n }))
            }
            _ => Answer::Ready(Err(RpcError::invalid(format!("not a dead-letter op: {op:?}")))),
        }
    }

    fn list(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .map(|(name, h)| {
                let mut v = serde_json::to_value(h.core.stats()).unwrap_or(Value::Null);
                if let Value::Object(map) = &mut v {
                    map.insert("name".into(), json!(name));
                    map.insert("durable".into(), json!(h.core.config().durable));
                    map.insert("owner".into(), json!(self.limits.node));
                }
                v
            })
            .collect();
        json!({ "queues": queues })
    }

    fn create(&mut self, name: &str, f: &Map<String, Value>) -> Answer {
        let mut config = match f.get("config") {
            None | Some(Value::Null) => QueueConfig::default(),
            Some(v) => {
                let mut v = v.clone();
                if let Value::Object(map) = &mut v {
                    map.insert("name".into(), json!(name));
                }
                match serde_json::from_value::<QueueConfig>(v) {
                    Ok(c) => c,
                    Err(e) => return Answer::Ready(Err(RpcError::invalid(format!("bad queue config: {e}")))),
                }
            }
        };
        config.name = name.to_owned();
        if config.max_message_bytes > self.limits.max_message_bytes {
            self.metrics.limit_exceeded("max_frame_bytes");
            return Answer::Ready(Err(RpcError::invalid(format!(
                "bad queue config: max_message_bytes {} is over the node's max_frame_bytes ({})",
                config.max_message_bytes, self.limits.max_message_bytes
            ))));
        }
        if let Some(existing) = self.queues.get(name) {
            let existing = existing.core.config().clone();
            if existing == config {
                return Answer::Ready(Ok(json!({"queue": name, "created": false, "config": existing})));
            }
            return Answer::Ready(Err(RpcError::invalid(format!(
                "queue {name} exists with a different config: {}",
                serde_json::to_string(&existing).unwrap_or_default()
            ))));
        }
        if self.queues.len() >= self.limits.max_queues {
            self.metrics.limit_exceeded("queue_max_queues");
            return Answer::Ready(Err(RpcError::queue_full(format!(
                "too many queues on this node (queue_max_queues {})",
                self.limits.max_queues
            ))));
        }
        let (mut core, writes) = match QueueCore::new(config.clone()) {
            Ok(made) => made,
            Err(e) => return Answer::Ready(Err(core_error(e))),
        };
        core.count_in(self.held.clone());
        self.queues.insert(name.to_owned(), Hosted { core, bindings: Vec::new(), waiters: VecDeque::new() });
        let durable = self.persist(name, writes);
        self.publish_board();
        Answer::after(durable, json!({"queue": name, "created": true, "config": config}))
    }

    fn send(&mut self, name: &str, f: &Map<String, Value>, now: f64) -> Answer {
        let Some(payload) = f.get("payload") else {
            return Answer::Ready(Err(RpcError::invalid("send needs \"payload\" (any JSON)")));
        };
        let parsed = (|| -> Result<NewMessage, RpcError> {
            let guarantee = match f.get("guarantee") {
                None | Some(Value::Null) => Guarantee::AtLeastOnce,
                Some(g) => serde_json::from_value(g.clone()).map_err(|e| {
                    RpcError::invalid(format!(
                        "bad guarantee {g}: {e} (at_least_once, fire_and_forget, broadcast, {{\"quorum\": n}})"
                    ))
                })?,
            };
            let priority = match f.get("priority") {
                None | Some(Value::Null) => 0,
                Some(p) => p
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                    .ok_or_else(|| RpcError::invalid(format!("bad priority {p}: an integer in i32")))?,
            };
            let delay = opt_f64(f, "delay")?.unwrap_or(0.0);
            let dedup_id = match f.get("dedup_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(RpcError::invalid(format!("bad dedup_id {other}: a string"))),
            };
            let text = serde_json::to_string(payload).map_err(|e| RpcError::invalid(e.to_string()))?;
            Ok(NewMessage { id: MessageId::from(""), payload: text.into(), guarantee, priority, delay, dedup_id })
        })();
        let mut message = match parsed {
            Ok(m) => m,
            Err(e) => return Answer::Ready(Err(e)),
        };
        message.id = self.new_id();
        let id = message.id.clone();
        let hosted = match self.hosted(name) {
            Ok(h) => h,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let step = hosted.core.send(message, now);
        if let Err(QueueError::TooLarge { .. }) = &step.value {
            self.metrics.limit_exceeded("max_message_bytes");
        }
        match &step.value {
            Err(QueueError::Full { .. }) => self.metrics.limit_exceeded("max_messages"),
            Err(QueueError::NodeFull { .. }) => self.metrics.limit_exceeded("queue_max_bytes"),
            _ => {}
        }
        let (sent, durable) = self.effects(name, step);
        let result = match sent {
            Ok(Sent::Enqueued) => json!({"id": id, "duplicate": false}),
            Ok(Sent::Duplicate(first)) => {
                // The first send may still be committing, or may have failed: a barrier
                // commit behind it answers the duplicate only once the first is durable
                // (after a failed sync the store refuses it, so the retry is refused too).
                let durable_queue = self.queues.get(name).is_some_and(|h| h.core.config().durable);
                let result = json!({"id": first, "duplicate": true});
                if durable_queue {
                    return Answer::after(self.submit(Batch::new()), result);
                }
                result
            }
            Err(e) => {
                return Answer::Waiting(Box::pin(async move {
                    durable.await.ok();
                    Err(core_error(e))
                }))
            }
        };
        Answer::after(durable, result)
    }

    fn consumer_of(conn: ConnectionId, f: &Map<String, Value>) -> Result<Option<ConsumerId>, RpcError> {
        match f.get("consumer") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(c)) if !c.is_empty() && c.len() <= 200 => Ok(Some(ConsumerId::from(format!("c:{c}")))),
            Some(other) => {
                let _ = conn;
                Err(RpcError::invalid(format!("bad consumer {other}: a string of 1..=200 bytes")))
            }
        }
    }

    /// Whether connection `conn` may (still) subscribe to `queue` as `sid`: ids are short,
    /// and a connection holds at most `max_subscriptions_per_connection`, all queues
    /// together (renewing one it holds on this queue is always allowed).
    fn may_subscribe(&self, conn: ConnectionId, queue: &str, sid: &str) -> Result<(), RpcError> {
        if sid.is_empty() || sid.len() > MAX_SUBSCRIPTION_ID_BYTES {
            return Err(RpcError::invalid(format!(
                "subscription_id must be 1..={MAX_SUBSCRIPTION_ID_BYTES} bytes, got {}",
                sid.len()
            )));
        }
        let held = self.by_conn.get(&conn);
        let consumer = subscription_consumer(conn, sid);
        let renewing = held.is_some_and(|set| set.contains(&(queue.to_owned(), consumer)));
        let count = held.map_or(0, |set| set.iter().filter(|(_, c)| c.as_str().starts_with("sub:")).count());
        let max = self.limits.max_subscriptions_per_connection;
        if !renewing && count >= max {
            self.metrics.limit_exceeded("pubsub_max_subscriptions_per_connection");
            return Err(RpcError::queue_full(format!(
                "this connection holds {max} queue subscriptions already (pubsub_max_subscriptions_per_connection)"
            )));
        }
        Ok(())
    }

    fn receive(
        &mut self,
        conn: ConnectionId,
        name: &str,
        f: &Map<String, Value>,
        now: f64,
        ctx: &mut Context<Self>,
    ) -> Answer {
        let parsed = (|| -> Result<_, RpcError> {
            let consumer = Self::consumer_of(conn, f)?;
            let max = opt_u64(f, "max")?.unwrap_or(1).clamp(1, MAX_RECEIVE_BATCH as u64) as usize;
            let wait = opt_f64(f, "wait")?.unwrap_or(0.0);
            let visibility = opt_f64(f, "visibility")?;
            Ok((consumer, max, wait, visibility))
        })();
        let (consumer, max, wait, visibility) = match parsed {
            Ok(p) => p,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let wait = if wait > self.limits.max_wait {
            self.metrics.limit_exceeded("queue_max_wait_s");
            self.limits.max_wait
        } else {
            wait.max(0.0)
        };
        let consumer = match consumer {
            Some(c) => c,
            None => {
                let c = ConsumerId::from(format!("conn:{conn}"));
                self.by_conn.entry(conn).or_default().insert((name.to_owned(), c.clone()));
                c
            }
        };
        let hosted = match self.hosted(name) {
            Ok(h) => h,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let step = hosted.core.receive(&consumer, max, visibility, now);
        let empty = matches!(&step.value, Ok(d) if d.is_empty());
        let (value, durable) = self.effects(name, step);
        if empty && wait > 0.0 {
            Self::background(durable, ctx);
            let (done, answer) = oneshot::channel();
            if let Some(hosted) = self.queues.get_mut(name) {
                hosted.waiters.push_back(Waiter { consumer, max, visibility, done });
            }
            return Answer::Waiting(Box::pin(async move {
                match tokio::time::timeout(Duration::from_secs_f64(wait), answer).await {
                    Ok(Ok(answer)) => answer,
                    _ => Ok(json!({"messages": []})),
                }
            }));
        }
        Answer::Waiting(Box::pin(async move {
            match durable.await {
                Ok(()) => value.map(|d| deliveries_json(&d)).map_err(core_error),
                Err(e) => Err(RpcError::not_durable(e)),
            }
        }))
    }

    fn settle(
        &mut self,
        conn: ConnectionId,
        name: &str,
        op: &str,
        f: &Map<String, Value>,
        now: f64,
        lane: Lane,
    ) -> Answer {
        let parsed = (|| -> Result<_, RpcError> {
            let consumer = Self::consumer_of(conn, f)?;
            let ids: Vec<String> = match f.get("ids") {
                Some(Value::Array(ids)) => ids
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| RpcError::invalid(format!("bad id {v}"))))
                    .collect::<Result<_, _>>()?,
                _ => return Err(RpcError::invalid(format!("{op} needs \"ids\" (a list of message ids)"))),
            };
            let delay = opt_f64(f, "delay")?.unwrap_or(0.0);
            Ok((consumer, ids, delay))
        })();
        let (consumer, ids, delay) = match parsed {
            Ok(p) => p,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let candidates: Vec<ConsumerId> = match consumer {
            Some(c) => vec![c],
            None => {
                let mut c = vec![ConsumerId::from(format!("conn:{conn}"))];
                if let Some(set) = self.by_conn.get(&conn) {
                    c.extend(
                        set.iter()
                            .filter(|(q, id)| q == name && id.as_str().starts_with("sub:"))
                            .map(|(_, id)| id.clone()),
                    );
                }
                c
            }
        };
        let hosted = match self.hosted(name) {
            Ok(h) => h,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let (mut done, mut unknown) = (Vec::new(), Vec::new());
        let mut writes = Vec::new();
        let mut pushes = Vec::new();
        for id in ids {
            let mid = MessageId::from(id.as_str());
            let mut settled = false;
            for consumer in &candidates {
                let step = match (lane, op == "ack") {
                    (Lane::Main, true) => hosted.core.ack(consumer, &mid, now),
                    (Lane::Main, false) => hosted.core.nack(consumer, &mid, delay, now),
                    (Lane::Dead, true) => hosted.core.ack_dead(consumer, &mid, now),
                    (Lane::Dead, false) => hosted.core.nack_dead(consumer, &mid, now),
                };
                writes.extend(step.writes);
                pushes.extend(step.pushes);
                match step.value {
                    Ok(()) => {
                        settled = true;
                        break;
                    }
                    Err(QueueError::UnknownLease { .. }) => continue,
                    Err(QueueError::BadRequest(e)) => return Answer::Ready(Err(RpcError::invalid(e))),
                    Err(_) => break,
                }
            }
            if settled {
                done.push(id);
            } else {
                unknown.push(id);
            }
        }
        let (_, durable) = self.effects(name, Step { value: (), writes, pushes });
        let key = if op == "ack" { "acked" } else { "nacked" };
        let mut result = Map::new();
        result.insert(key.into(), json!(done));
        result.insert("unknown".into(), json!(unknown));
        Answer::after(durable, Value::Object(result))
    }

    fn connection_gone(&mut self, conn: ConnectionId, ctx: &mut Context<Self>) {
        let Some(consumers) = self.by_conn.remove(&conn) else { return };
        let now = unix_now();
        for (queue, consumer) in consumers {
            self.subscribers.remove(&consumer);
            let Some(hosted) = self.queues.get_mut(&queue) else { continue };
            let step = hosted.core.consumer_gone(&consumer, now);
            let ((), durable) = self.effects(&queue, step);
            Self::background(durable, ctx);
            self.serve_waiters(&queue, ctx);
        }
    }
}

/// Which messages of a queue an ack or nack is about.
#[derive(Debug, Clone, Copy)]
enum Lane {
    /// The queue's own (`NAME`).
    Main,
    /// Its dead letters (`NAME.dlq`).
    Dead,
}

/// How a call is answered.
enum Answer {
    /// Now (nothing to make durable).
    Ready(Result<Value, RpcError>),
    /// When the future resolves.
    Waiting(Pin<Box<dyn Future<Output = Result<Value, RpcError>>>>),
}

impl Answer {
    /// `result` once `durable` resolved; `not durable` if it failed.
    fn after(durable: Durable, result: Value) -> Answer {
        Answer::Waiting(Box::pin(async move {
            match durable.await {
                Ok(()) => Ok(result),
                Err(e) => Err(RpcError::not_durable(e)),
            }
        }))
    }
}

fn opt_f64(f: &Map<String, Value>, key: &str) -> Result<Option<f64>, RpcError> {
    match f.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(RpcError::invalid(format!("bad {key} {v}: a number of seconds"))),
        },
    }
}

fn opt_u64(f: &Map<String, Value>, key: &str) -> Result<Option<u64>, RpcError> {
    match f.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| RpcError::invalid(format!("bad {key} {v}: a count"))),
    }
}

fn payload_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn message_json(d: &Delivery) -> Value {
    let mut message = json!({
        "id": d.id,
        "payload": payload_value(d.payload.as_str()),
        "receive_count": d.receive_count,
        "guarantee": d.guarantee,
        "priority": d.priority,
    });
    if let (Some(dead), Value::Object(fields)) = (&d.dead, &mut message) {
        fields.insert("reason".into(), json!(dead.reason));
        fields.insert("dead_at".into(), json!(dead.at));
    }
    message
}

fn deliveries_json(deliveries: &[Delivery]) -> Value {
    json!({ "messages": deliveries.iter().map(message_json).collect::<Vec<_>>() })
}

/// The wire error of a refused core call.
pub fn core_error(e: QueueError) -> RpcError {
    match e {
        QueueError::Full { .. } | QueueError::NodeFull { .. } => RpcError::queue_full(e.to_string()),
        other => RpcError::invalid(other.to_string()),
    }
}

/// Submits batches to the committer one after another, so they are applied in the order
/// the actor produced them; the answers are awaited by the callers.
async fn run_pipeline(store: PersistenceHandle, mut rx: mpsc::UnboundedReceiver<Submission>) {
    while let Some((batch, done)) = rx.recv().await {
        let _ = done.send(store.submit(batch).await);
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pipeline = Some(tx);
        ctx.spawn(actix::fut::wrap_future(run_pipeline(self.store.clone(), rx)));
        self.recover(ctx);
        self.publish_board();
        self.start_binding_reader(ctx);
        self.refresh_bindings(ctx);
        ctx.run_interval(Duration::from_millis(500), |act, ctx| {
            act.publish_board();
            act.refresh_bindings(ctx);
        });
        self.schedule(ctx);
    }
}

crate::supervised_child!(Queue, "queue");

impl Handler<QueueCall> for Queue {
    type Result = ResponseFuture<Result<Value, RpcError>>;

    fn handle(&mut self, msg: QueueCall, ctx: &mut Context<Self>) -> Self::Result {
        let name = msg.request.queue.clone();
        let answer = self.call(msg, ctx);
        if let Some(name) = name {
            if self.queues.contains_key(&name) {
                self.serve_waiters(&name, ctx);
            }
        }
        self.schedule(ctx);
        match answer {
            Answer::Ready(result) => Box::pin(async move { result }),
            Answer::Waiting(future) => future,
        }
    }
}

impl Handler<BoundPublish> for Queue {
    type Result = ();

    fn handle(&mut self, msg: BoundPublish, ctx: &mut Context<Self>) {
        let Ok(text) = serde_json::to_string(&msg.payload) else { return };
        let id = self.new_id();
        let Some(hosted) = self.queues.get_mut(&msg.queue) else { return };
        let message = NewMessage { dedup_id: Some(msg.message_id), ..NewMessage::new(id, text) };
        let step = hosted.core.send(message, unix_now());
        if let Err(e) = &step.value {
            warn!(queue = %msg.queue, cause = %e, "a bound publish was refused");
        }
        let (_, durable) = self.effects(&msg.queue, step);
        Self::background(durable, ctx);
        self.serve_waiters(&msg.queue, ctx);
        self.schedule(ctx);
    }
}

impl Handler<ConnectionGone> for Queue {
    type Result = ();

    fn handle(&mut self, msg: ConnectionGone, ctx: &mut Context<Self>) {
        self.connection_gone(msg.conn, ctx);
        self.schedule(ctx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::watch;

    use super::*;
    use crate::persistence::{Bytes as KvBytes, KvStore, MemoryStore, TreeName};
    use crate::supervisor::{ChildHandles, ChildSpec, NodeExit, NodeSupervisor, RestartPolicy, Slot};

    /// A memory store whose syncs fail once `full` is set (a disk that filled up).
    #[derive(Default)]
    struct FillingStore {
        inner: MemoryStore,
        full: AtomicBool,
    }

    impl KvStore for FillingStore {
        fn get(&self, tree: &str, key: &[u8]) -> crate::persistence::Result<Option<KvBytes>> {
            self.inner.get(tree, key)
        }
        fn scan(
            &self,
            tree: &str,
            range: &KeyRange,
            limit: usize,
        ) -> crate::persistence::Result<Vec<(KvBytes, KvBytes)>> {
            self.inner.scan(tree, range, limit)
        }
        fn apply(&self, batch: &Batch) -> crate::persistence::Result<()> {
            self.inner.apply(batch)
        }
        fn sync(&self) -> crate::persistence::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                return Err(PersistenceError::Io("No space left on device (os error 28)".to_owned()));
            }
            Ok(())
        }
        fn tree_names(&self) -> crate::persistence::Result<Vec<TreeName>> {
            self.inner.tree_names()
        }
        fn is_durable(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "filling".to_owned()
        }
    }

    fn call(op: &str, fields: Value) -> QueueCall {
        let Value::Object(fields) = fields else { panic!("fields must be an object") };
        let (outbox, _frames) = Outbox::channel(16, 1 << 20);
        QueueCall {
            conn: 1,
            outbox,
            kind: FrameKind::Binary,
            request: Arc::new(QueueRequest { u: "t".into(), op: op.into(), queue: Some("q".into()), fields }),
        }
    }

    #[actix_rt::test]
    async fn a_send_whose_commit_fails_is_refused_and_nothing_acknowledged_is_lost() {
        let store = Arc::new(FillingStore::default());
        let handle = PersistenceHandle::start(store.clone(), 64, None).unwrap();
        let slot: Slot<Queue> = Slot::default();
        let children = vec![ChildSpec::new("queue", {
            let (slot, handle) = (slot.clone(), handle.clone());
            move |guard| {
                let metrics = Arc::new(Metrics::default());
                let addr =
                    Queue::new(handle.clone(), metrics, QueueLimits::default(), QueueBoard::default(), guard).start();
                slot.set(addr.clone());
                ChildHandles::of(&addr)
            }
        })];
        let (exit, _exit_rx) = watch::channel(NodeExit::Running);
        let _supervisor =
            NodeSupervisor::new("t".into(), RestartPolicy::default(), children, exit, Arc::new(Metrics::default()))
                .start();
        let send = |slot: Slot<Queue>, op: &'static str, fields: Value| async move {
            slot.send(|| call(op, fields.clone())).await.expect("the queue actor answers")
        };
        send(slot.clone(), "create", json!({})).await.unwrap();
        let ok = send(slot.clone(), "send", json!({"payload": "kept"})).await.unwrap();
        store.full.store(true, Ordering::SeqCst);
        let refused = send(slot.clone(), "send", json!({"payload": "lost"})).await.unwrap_err();
        assert_eq!(refused.code, 1003, "{refused}");
        assert!(refused.details_text().starts_with("not durable:"), "{refused}");
        assert!(refused.details_text().contains("No space left"), "{refused}");
        // Every later durable write is refused too (the store is poisoned until restart),
        // and so is a retry that the dedup window would call a duplicate.
        let again = send(slot.clone(), "send", json!({"payload": "later"})).await.unwrap_err();
        assert_eq!(again.code, 1003);
        let retry = send(slot.clone(), "send", json!({"payload": "lost"})).await.unwrap_err();
        assert_eq!(retry.code, 1003, "a duplicate of a refused send is not acknowledged");
        // What was acknowledged is in the store.
        let records = handle.scan(&message_tree("q"), &KeyRange::all(), 100).unwrap();
        let id = ok["id"].as_str().unwrap();
        assert!(records.iter().any(|(k, _)| k == id.as_bytes()), "the acknowledged message is stored");
    }
}
