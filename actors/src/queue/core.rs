//! One queue as a pure state machine: `QueueCore`.
//!
//! The core holds every message of one queue and decides who gets what, when. It does no
//! I/O and reads no clock: each call takes `now` (Unix seconds, `f64`, as everywhere in
//! this crate) and returns a [`Step`]: the value asked for, the [`QueueWrite`]s the actor
//! must make durable (in order) before it acknowledges the caller, and the [`Delivery`]s
//! it must push to subscribers. Every call first runs the timers that are due, so the
//! actor's timer ([`QueueCore::next_deadline`] + [`QueueCore::tick`]) only matters when
//! the queue is otherwise idle. A call that can be refused returns `Step<Result<T>>`:
//! even a refused call may carry writes and pushes (from timers that came due), and the
//! actor applies them whatever the answer.
//!
//! A lease is named by the pair (consumer, message id): only its holder may ack or nack
//! it, so a stale holder whose lease expired and went to someone else is refused. A pull
//! consumer that acks from another connection (the CLI) needs a stable consumer id, and
//! [`QueueCore::consumer_gone`] is for consumers bound to a connection or node.
//!
//! # A message's life
//!
//! ```text
//!  send ──► Delayed ──(visible_at)──► Visible ──receive/push──► Leased ──ack──► gone
//!              ▲                         ▲  ▲                     │
//!              └──── nack with delay ────┼──┴── nack / lease expired / consumer gone
//!                                        │                         │ (receive_count >= max_receives)
//!                        redrive ────────┴───────── Dead ◄──────────┘
//! ```
//! - `at_least_once` (default): one consumer at a time holds a lease for the visibility
//!   timeout; ack deletes. `receive_count` counts deliveries; a lease that ends without an
//!   ack (nack, expiry, consumer gone) once the count has reached `max_receives` moves the
//!   message to the dead letters, with the reason.
//! - `fire_and_forget`: handed to one consumer and forgotten at once (no lease, no ack, no
//!   redelivery, never persisted).
//! - `broadcast`: pushed to every subscriber present at delivery (a *round*); done when
//!   every one of them acked. A subscriber that goes away is no longer waited for. Pull
//!   receivers never see broadcast or quorum messages: only subscribers are counted.
//! - `quorum(n)`: pushed, in a round, to the present subscribers once there are enough of
//!   them to reach n acks; done after n distinct subscribers acked. While fewer
//!   subscribers exist it waits up to the queue's `quorum_wait`, then is dead-lettered with
//!   that reason. Acks are kept across rounds (in memory): a retry goes to those who have
//!   not acked yet.
//!
//! A round that ends without completion (its visibility timeout passed, a nack, or for a
//! quorum too few targets left) counts as one receive, like a lease.
//!
//! # Flow control
//!
//! A subscriber has a prefetch credit: at most `prefetch` at-least-once and
//! fire-and-forget messages leased to it at once; an ack, nack or expiry returns credit.
//! Broadcast and quorum copies are pushed regardless of credit (holding them back would
//! need a backlog per subscriber) but count as in flight, so they delay that
//! subscriber's other deliveries until acked.
//!
//! # Dead letters
//!
//! Dead letters stay inside the core (`Dead` state, with reason and time), so `dlq NAME`
//! is [`QueueCore::dead_letters`] and `redrive NAME` is [`QueueCore::redrive`] (back to
//! visible with `receive_count = 0`). They count towards `max_messages` — memory stays
//! bounded and nothing is dropped in silence — so a queue whose dead letters fill it
//! refuses sends until they are redriven or purged ([`QueueCore::purge_dead_letters`]).
//! They are also a queue of their own, `NAME.dlq`: [`QueueCore::receive_dead`] leases
//! them (oldest first, each with its reason) to one consumer at a time,
//! [`QueueCore::ack_dead`] deletes one, a nack or an ended lease puts it back. Redrive and
//! purge take only the dead letters nobody holds.
//!
//! # Durability
//!
//! A durable queue persists its at-least-once, broadcast and quorum messages as
//! [`StoredMessage`] records (key: the message id), written on send, on each delivery
//! (`receive_count` grew), on a delay, on dead-lettering and redrive, and removed on
//! completion or TTL expiry. `receive_count` is persisted at delivery so that
//! `max_receives` also bounds a message that crashes the node while leased: on
//! [`QueueCore::recover`], a live record whose `receive_count` has reached `max_receives`
//! can only have been leased at the crash, and is dead-lettered. Leases, rounds, quorum
//! acks, the quorum wait, dedup entries of completed messages and the counters are not
//! persisted: after a restart leased messages are visible again, a round starts afresh,
//! a quorum wait starts again, and a duplicate of a message completed before the restart
//! is accepted. The actor may batch writes (group commit); it should make a delivery's
//! write durable before the push if a crash loop must be bounded by `max_receives`.
//!
//! # Dedup
//!
//! A send carries a dedup id, or else its key is the SHA-256 of its payload text. Within
//! `dedup_window` seconds of the first send, a send with the same key is answered with the
//! first message's id ([`Sent::Duplicate`]) and changes nothing. The key is recorded only
//! when the message is accepted (a refused send does not block its retry). Entries are
//! bounded by the window and by `max_messages`.
//!
//! # Cost
//!
//! Send, receive (per message), ack, nack and each timer are O(log n): visible messages
//! sit in ordered sets keyed by (priority descending, sequence), deadlines in ordered sets
//! keyed by time. Listing and redriving dead letters take a `limit`. Subscribing does
//! O(k log n) work for the k parked quorum messages it makes deliverable.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

mod interface;

use interface::MAX_SECONDS;
pub use interface::{
    ConsumerId, DeadLetter, DeadLetterInfo, Delivery, Guarantee, MessageId, NewMessage, Payload, QueueConfig,
    QueueError, QueueStats, QueueWrite, Result, Sent, Step, StoredMessage, DLQ_SUFFIX, MAX_RECEIVE_BATCH,
};

/// What a held message costs beyond its payload (its id, dedup key and index entries).
pub const MESSAGE_OVERHEAD: u64 = 256;

/// The bytes of messages the queues of one node hold together, against the node's bound
/// (`queue_max_bytes`); shared by the node's queue cores. A send that would take the total
/// past the bound is refused (`NodeFull`), so no queue's `max_messages` can make a node
/// hold more than that in memory.
#[derive(Debug, Clone)]
pub struct HeldBytes {
    held: Arc<AtomicU64>,
    max: u64,
}

impl HeldBytes {
    /// A bound of `max` bytes.
    pub fn new(max: u64) -> Self {
        HeldBytes { held: Arc::default(), max }
    }

    /// Bytes held now, by every queue sharing this bound.
    pub fn held(&self) -> u64 {
        self.held.load(AtomicOrdering::Acquire)
    }

    /// Counts `bytes` if they fit under the bound.
    fn try_take(&self, bytes: u64) -> bool {
        let mut held = self.held();
        loop {
            if held.saturating_add(bytes) > self.max {
                return false;
            }
            match self.held.compare_exchange_weak(held, held + bytes, AtomicOrdering::AcqRel, AtomicOrdering::Acquire) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
    }

    /// Counts `bytes` whatever the bound (messages restored at start were accepted before).
    fn take(&self, bytes: u64) {
        self.held.fetch_add(bytes, AtomicOrdering::AcqRel);
    }

    fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, AtomicOrdering::AcqRel);
    }
}

impl Default for HeldBytes {
    /// No bound (a queue on its own, in tests).
    fn default() -> Self {
        HeldBytes::new(u64::MAX)
    }
}

/// What a message with `payload` counts in [`HeldBytes`].
fn cost(payload: &Payload) -> u64 {
    payload.as_str().len() as u64 + MESSAGE_OVERHEAD
}

/// What a dedup record costs beyond its key and the first message's id.
pub const DEDUP_OVERHEAD: u64 = 128;

/// How late an idle queue drops its dedup records whose window ended (seconds).
const DEDUP_SWEEP_DELAY: f64 = 1.0;

/// The longest `dedup_id`, in bytes (a dedup record outlives its message by the window).
pub const MAX_DEDUP_ID_BYTES: usize = 256;

/// What the dedup record of `key` (first sent as `id`) counts in [`HeldBytes`].
fn dedup_cost(key: &str, id: &MessageId) -> u64 {
    (key.len() + id.as_str().len()) as u64 + DEDUP_OVERHEAD
}

/// A time as an ordered key (`now` values are finite).
#[derive(Debug, Clone, Copy, PartialEq)]
struct At(f64);
impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for At {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Order among visible messages: priority descending, then sequence.
type Rank = (Reverse<i32>, u64);

#[derive(Debug, Clone, PartialEq)]
enum State {
    Delayed,
    Visible,
    /// A quorum message with too few subscribers; keyed in `parked` by how many it needs.
    Parked {
        needed: usize,
    },
    Leased {
        consumer: ConsumerId,
        until: f64,
    },
    Round {
        targets: BTreeSet<ConsumerId>,
        until: f64,
    },
    Dead(DeadLetterInfo),
    /// A dead letter received from the dead-letter queue (`NAME.dlq`), not yet acked.
    DeadLeased {
        info: DeadLetterInfo,
        consumer: ConsumerId,
        until: f64,
    },
}

#[derive(Debug)]
struct Message {
    id: MessageId,
    payload: Payload,
    guarantee: Guarantee,
    priority: i32,
    seq: u64,
    enqueued_at: f64,
    visible_at: f64,
    expires_at: Option<f64>,
    receive_count: u32,
    dedup_key: Option<String>,
    state: State,
    /// Subscribers that acked this (broadcast and quorum), across rounds.
    acked: BTreeSet<ConsumerId>,
    /// When a waiting quorum message is dead-lettered.
    quorum_deadline: Option<f64>,
}

impl Message {
    fn rank(&self) -> Rank {
        (Reverse(self.priority), self.seq)
    }

    /// This message handed to `consumer`, as it stands now.
    fn delivery(&self, consumer: &ConsumerId, lease_until: Option<f64>) -> Delivery {
        Delivery {
            consumer: consumer.clone(),
            id: self.id.clone(),
            payload: self.payload.clone(),
            guarantee: self.guarantee,
            priority: self.priority,
            receive_count: self.receive_count,
            lease_until,
            dead: None,
        }
    }

    fn stored(&self) -> StoredMessage {
        StoredMessage {
            id: self.id.clone(),
            payload: self.payload.clone(),
            guarantee: self.guarantee,
            priority: self.priority,
            seq: self.seq,
            enqueued_at: self.enqueued_at,
            visible_at: self.visible_at,
            expires_at: self.expires_at,
            receive_count: self.receive_count,
            dedup_key: self.dedup_key.clone(),
            dead: match &self.state {
                State::Dead(info) | State::DeadLeased { info, .. } => Some(info.clone()),
                _ => None,
            },
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    prefetch: usize,
    /// In `ready` already.
    queued: bool,
}

#[derive(Debug, Default)]
struct Effects {
    writes: Vec<QueueWrite>,
    pushes: Vec<Delivery>,
}

impl Effects {
    fn into_step<T>(self, value: T) -> Step<T> {
        Step { value, writes: self.writes, pushes: self.pushes }
    }
}

/// One queue's messages, consumers and timers.
#[derive(Debug)]
pub struct QueueCore {
    config: QueueConfig,
    next_seq: u64,
    messages: HashMap<u64, Message>,
    ids: HashMap<MessageId, u64>,
    /// Visible at-least-once and fire-and-forget messages.
    visible_single: BTreeSet<Rank>,
    /// Visible broadcast and quorum messages.
    visible_group: BTreeSet<Rank>,
    /// Quorum messages waiting for `needed` subscribers.
    parked: BTreeSet<(usize, Rank)>,
    /// Dead letters nobody holds, oldest first.
    dead: BTreeSet<u64>,
    /// Ends of leases on dead letters (received from `NAME.dlq`).
    dead_leases: BTreeSet<(At, u64)>,
    delayed: BTreeSet<(At, u64)>,
    /// Ends of at-least-once leases.
    leases: BTreeSet<(At, u64)>,
    /// Ends of broadcast/quorum rounds.
    rounds: BTreeSet<(At, u64)>,
    ttl: BTreeSet<(At, u64)>,
    quorum_deadlines: BTreeSet<(At, u64)>,
    /// Dedup key -> (window end, seq that recorded it, first message id).
    dedup: HashMap<String, (f64, u64, MessageId)>,
    dedup_order: BTreeMap<(At, u64), String>,
    subscribers: HashMap<ConsumerId, Subscriber>,
    /// Subscribers that may have credit, in round-robin order.
    ready: VecDeque<ConsumerId>,
    /// What each consumer holds (leases and round copies), by seq.
    held: HashMap<ConsumerId, BTreeSet<u64>>,
    stats: QueueStats,
    /// The node-wide bound this queue's messages count in, and what they count now.
    bytes: HeldBytes,
    counted: u64,
}

impl Drop for QueueCore {
    fn drop(&mut self) {
        self.bytes.release(self.counted);
    }
}

impl QueueCore {
    /// An empty queue; the writes persist its config (none when in memory).
    pub fn new(config: QueueConfig) -> Result<(Self, Vec<QueueWrite>)> {
        config.validate()?;
        let writes = if config.durable { vec![QueueWrite::Config(config.clone())] } else { Vec::new() };
        Ok((Self::empty(config), writes))
    }

    fn empty(config: QueueConfig) -> Self {
        Self {
            config,
            next_seq: 1,
            messages: HashMap::new(),
            ids: HashMap::new(),
            visible_single: BTreeSet::new(),
            visible_group: BTreeSet::new(),
            parked: BTreeSet::new(),
            dead: BTreeSet::new(),
            dead_leases: BTreeSet::new(),
            delayed: BTreeSet::new(),
            leases: BTreeSet::new(),
            rounds: BTreeSet::new(),
            ttl: BTreeSet::new(),
            quorum_deadlines: BTreeSet::new(),
            dedup: HashMap::new(),
            dedup_order: BTreeMap::new(),
            subscribers: HashMap::new(),
            ready: VecDeque::new(),
            held: HashMap::new(),
            stats: QueueStats::default(),
            bytes: HeldBytes::default(),
            counted: 0,
        }
    }

    /// Counts `bytes` held (whatever the bound: what a restart restores was accepted).
    fn count(&mut self, bytes: u64) {
        self.bytes.take(bytes);
        self.counted += bytes;
    }

    /// No longer counts `bytes`.
    fn uncount(&mut self, bytes: u64) {
        self.bytes.release(bytes);
        self.counted -= bytes;
    }

    /// Counts this queue's messages, now and from now on, in the node-wide `bytes`.
    pub fn count_in(&mut self, bytes: HeldBytes) {
        self.bytes.release(self.counted);
        bytes.take(self.counted);
        self.bytes = bytes;
    }

    /// Rebuilds a queue after a restart from its config and stored records: pending,
    /// delayed and dead-lettered messages come back; messages that were leased are visible
    /// again; those past their TTL are removed; a live record whose `receive_count`
    /// reached `max_receives` (leased at the crash) is dead-lettered. The writes record
    /// those changes.
    pub fn recover(
        config: QueueConfig,
        stored: impl IntoIterator<Item = StoredMessage>,
        now: f64,
    ) -> Result<(Self, Vec<QueueWrite>)> {
        config.validate()?;
        let mut core = Self::empty(config);
        let mut fx = Effects::default();
        let mut records: Vec<StoredMessage> = stored.into_iter().collect();
        records.sort_by_key(|r| r.seq);
        for r in records {
            // A repeated id or sequence number (a damaged store) keeps the first record.
            if core.ids.contains_key(&r.id) || core.messages.contains_key(&r.seq) {
                continue;
            }
            core.next_seq = core.next_seq.max(r.seq + 1);
            let seq = r.seq;
            let was_dead = r.dead.is_some();
            let m = Message {
                id: r.id.clone(),
                payload: r.payload,
                guarantee: r.guarantee,
                priority: r.priority,
                seq,
                enqueued_at: r.enqueued_at,
                visible_at: r.visible_at,
                expires_at: r.expires_at,
                receive_count: r.receive_count,
                dedup_key: r.dedup_key,
                state: match r.dead {
                    Some(info) => State::Dead(info),
                    None => State::Delayed,
                },
                acked: BTreeSet::new(),
                quorum_deadline: None,
            };
            core.ids.insert(r.id, seq);
            if let Some(key) = &m.dedup_key {
                let until = m.enqueued_at + core.config.dedup_window;
                if until > now {
                    core.count(dedup_cost(key, &m.id));
                    core.record_dedup(key.clone(), until, seq, m.id.clone());
                }
            }
            let expires_at = m.expires_at;
            let spent = m.receive_count >= core.config.max_receives;
            let count = m.receive_count;
            core.count(cost(&m.payload));
            core.messages.insert(seq, m);
            if was_dead {
                core.dead.insert(seq);
            } else if expires_at.is_some_and(|t| t <= now) {
                core.stats.expired_total += 1;
                core.remove(seq, &mut fx);
            } else if spent {
                core.kill(seq, format!("max receives ({count}) reached; lease lost in a restart"), now, &mut fx);
            } else {
                if let Some(t) = expires_at {
                    core.ttl.insert((At(t), seq));
                }
                core.place(seq, now);
            }
        }
        Ok((core, fx.writes))
    }

    /// The queue's config.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Gauges and counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            visible: self.visible_single.len() + self.visible_group.len(),
            delayed: self.delayed.len(),
            waiting_quorum: self.parked.len(),
            leased: self.leases.len(),
            in_round: self.rounds.len(),
            dead_letters: self.dead.len() + self.dead_leases.len(),
            subscribers: self.subscribers.len(),
            ..self.stats
        }
    }

    /// The earliest time at which [`QueueCore::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<f64> {
        // Dedup records count in the node's bytes, so an idle queue drops them too: at
        // most a second late, so that a stream of them wakes the queue once a second.
        let dedup = self.dedup_order.first_key_value().map(|((at, _), _)| at.0 + DEDUP_SWEEP_DELAY);
        [&self.delayed, &self.leases, &self.rounds, &self.ttl, &self.quorum_deadlines, &self.dead_leases]
            .into_iter()
            .filter_map(|set| set.first().map(|(at, _)| at.0))
            .chain(dedup)
            .min_by(f64::total_cmp)
    }

    /// Runs the timers due at `now`: ended leases and rounds (visible again or dead
    /// letters), delays over, TTLs over, quorum waits over; pushes what became deliverable.
    pub fn tick(&mut self, now: f64) -> Step<()> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        self.dispatch(now, &mut fx);
        fx.into_step(())
    }

    /// Accepts a message (or recognises a duplicate). Errors: `TooLarge`, `Full`,
    /// `BadRequest` (id in use, bad delay, quorum(0)). Writes: its record (durable queue,
    /// not fire-and-forget). Pushes: to a subscriber with credit, or a round.
    pub fn send(&mut self, msg: NewMessage, now: f64) -> Step<Result<Sent>> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let value = self.send_in(msg, now, &mut fx);
        self.dispatch(now, &mut fx);
        fx.into_step(value)
    }

    fn send_in(&mut self, msg: NewMessage, now: f64, fx: &mut Effects) -> Result<Sent> {
        let bytes = msg.payload.as_str().len();
        if bytes > self.config.max_message_bytes {
            return Err(QueueError::TooLarge { bytes, max: self.config.max_message_bytes });
        }
        if !msg.delay.is_finite() || !(0.0..=MAX_SECONDS).contains(&msg.delay) {
            return Err(QueueError::BadRequest(format!("delay must be 0..={MAX_SECONDS} seconds, got {}", msg.delay)));
        }
        if msg.guarantee == Guarantee::Quorum(0) {
            return Err(QueueError::BadRequest("quorum needs at least 1 ack".into()));
        }
        if let Some(d) = msg.dedup_id.as_ref().filter(|d| d.len() > MAX_DEDUP_ID_BYTES) {
            return Err(QueueError::BadRequest(format!("dedup_id of {} bytes: at most {MAX_DEDUP_ID_BYTES}", d.len())));
        }
        let key = match &msg.dedup_id {
            Some(d) => format!("id:{d}"),
            None => format!("sha256:{:x}", Sha256::digest(msg.payload.as_str().as_bytes())),
        };
        if self.config.dedup_window > 0.0 {
            if let Some((_, _, first)) = self.dedup.get(&key) {
                self.stats.duplicates_total += 1;
                let first = first.clone();
                return Ok(Sent::Duplicate(first));
            }
        }
        if self.ids.contains_key(&msg.id) {
            return Err(QueueError::BadRequest(format!("message id {} is in use", msg.id)));
        }
        if self.messages.len() >= self.config.max_messages {
            return Err(QueueError::Full { max: self.config.max_messages });
        }
        // The message and, for the dedup window, its dedup record.
        let dedup = if self.config.dedup_window > 0.0 { dedup_cost(&key, &msg.id) } else { 0 };
        let bytes = cost(&msg.payload) + dedup;
        if !self.bytes.try_take(bytes) {
            return Err(QueueError::NodeFull { max_bytes: self.bytes.max });
        }
        self.counted += bytes;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.config.dedup_window > 0.0 {
            self.record_dedup(key.clone(), now + self.config.dedup_window, seq, msg.id.clone());
        }
        let expires_at = self.config.message_ttl.map(|t| now + t);
        let m = Message {
            id: msg.id.clone(),
            payload: msg.payload,
            guarantee: msg.guarantee,
            priority: msg.priority,
            seq,
            enqueued_at: now,
            visible_at: now + msg.delay,
            expires_at,
            receive_count: 0,
            dedup_key: Some(key),
            state: State::Delayed,
            acked: BTreeSet::new(),
            quorum_deadline: None,
        };
        self.ids.insert(msg.id, seq);
        if let Some(t) = expires_at {
            self.ttl.insert((At(t), seq));
        }
        self.messages.insert(seq, m);
        self.persist(seq, fx);
        self.place(seq, now);
        self.stats.sent_total += 1;
        Ok(Sent::Enqueued)
    }

    /// Pull: leases up to `max` (at most [`MAX_RECEIVE_BATCH`]) visible at-least-once and
    /// fire-and-forget messages to `consumer`, highest priority first, for `visibility`
    /// seconds (default: the queue's). Writes: each leased message's new receive count.
    pub fn receive(
        &mut self,
        consumer: &ConsumerId,
        max: usize,
        visibility: Option<f64>,
        now: f64,
    ) -> Step<Result<Vec<Delivery>>> {
        let visibility = match self.visibility(visibility) {
            Ok(v) => v,
            Err(refused) => return Effects::default().into_step(Err(refused)),
        };
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let mut got = Vec::new();
        while got.len() < max.min(MAX_RECEIVE_BATCH) {
            let Some(&(_, seq)) = self.visible_single.first() else { break };
            got.push(self.lease(seq, consumer, visibility, now, &mut fx));
        }
        self.dispatch(now, &mut fx);
        fx.into_step(Ok(got))
    }

    /// Push: makes `consumer` a subscriber with `prefetch` credit (again: updates it) and
    /// returns what it gets at once. Parked quorum messages it makes reachable go out.
    pub fn subscribe(&mut self, consumer: &ConsumerId, prefetch: usize, now: f64) -> Step<()> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let sub = self.subscribers.entry(consumer.clone()).or_insert(Subscriber { prefetch, queued: false });
        sub.prefetch = prefetch;
        self.make_ready(consumer);
        let count = self.subscribers.len();
        while let Some(&(needed, rank)) = self.parked.first() {
            if needed > count {
                break;
            }
            self.parked.remove(&(needed, rank));
            if let Some(m) = self.messages.get_mut(&rank.1) {
                m.state = State::Visible;
            }
            self.visible_group.insert(rank);
        }
        self.dispatch(now, &mut fx);
        fx.into_step(())
    }

    /// Stops pushes to `consumer` without taking back what it holds: its leases and round
    /// copies stay until acked, nacked or timed out. No effect on a non-subscriber.
    pub fn unsubscribe(&mut self, consumer: &ConsumerId, now: f64) -> Step<()> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        self.subscribers.remove(consumer);
        self.dispatch(now, &mut fx);
        fx.into_step(())
    }

    /// The consumer left (connection closed, node gone): it is no longer a
    /// subscriber, its leases end at once (visible again, or dead letters past
    /// `max_receives`), and rounds stop waiting for it.
    pub fn consumer_gone(&mut self, consumer: &ConsumerId, now: f64) -> Step<()> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        self.subscribers.remove(consumer);
        for seq in self.held.remove(consumer).unwrap_or_default() {
            let Some(m) = self.messages.get_mut(&seq) else { continue };
            match &mut m.state {
                State::Leased { until, .. } => {
                    let until = *until;
                    self.leases.remove(&(At(until), seq));
                    self.lease_ended(seq, 0.0, now, &mut fx);
                }
                State::Round { targets, .. } => {
                    targets.remove(consumer);
                    self.check_round(seq, now, &mut fx);
                }
                State::DeadLeased { until, .. } => {
                    let until = *until;
                    self.dead_leases.remove(&(At(until), seq));
                    self.dead_lease_ended(seq);
                }
                _ => {}
            }
        }
        self.dispatch(now, &mut fx);
        fx.into_step(())
    }

    /// `consumer` processed message `id`. At-least-once: deleted. Broadcast/quorum: one
    /// more ack; deleted once complete (a repeated ack is accepted and changes nothing).
    /// Errors: `UnknownMessage`, `UnknownLease`. Writes: the removal on completion.
    pub fn ack(&mut self, consumer: &ConsumerId, id: &MessageId, now: f64) -> Step<Result<()>> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let value = self.ack_in(consumer, id, now, &mut fx);
        self.dispatch(now, &mut fx);
        fx.into_step(value)
    }

    fn ack_in(&mut self, consumer: &ConsumerId, id: &MessageId, now: f64, fx: &mut Effects) -> Result<()> {
        let seq = self.lookup(id)?;
        let m = self.messages.get_mut(&seq).ok_or_else(|| QueueError::UnknownMessage(id.to_string()))?;
        match &mut m.state {
            State::Leased { consumer: holder, until } if holder == consumer => {
                let until = *until;
                self.leases.remove(&(At(until), seq));
                self.release(consumer, seq);
                self.stats.acked_total += 1;
                self.remove(seq, fx);
            }
            State::Round { targets, .. } if targets.contains(consumer) => {
                targets.remove(consumer);
                m.acked.insert(consumer.clone());
                self.release(consumer, seq);
                self.check_round(seq, now, fx);
            }
            _ if m.guarantee.is_group() && m.acked.contains(consumer) => {}
            _ => return Err(QueueError::UnknownLease { id: id.to_string(), consumer: consumer.to_string() }),
        }
        Ok(())
    }

    /// `consumer` gives message `id` back: visible again after `delay` seconds (or a dead
    /// letter past `max_receives`). For a broadcast/quorum copy the round ends now.
    /// Errors: `UnknownMessage`, `UnknownLease`, `BadRequest` (bad delay).
    pub fn nack(&mut self, consumer: &ConsumerId, id: &MessageId, delay: f64, now: f64) -> Step<Result<()>> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let value = self.nack_in(consumer, id, delay, now, &mut fx);
        self.dispatch(now, &mut fx);
        fx.into_step(value)
    }

    fn nack_in(&mut self, consumer: &ConsumerId, id: &MessageId, delay: f64, now: f64, fx: &mut Effects) -> Result<()> {
        if !delay.is_finite() || !(0.0..=MAX_SECONDS).contains(&delay) {
            return Err(QueueError::BadRequest(format!("delay must be 0..={MAX_SECONDS} seconds, got {delay}")));
        }
        let seq = self.lookup(id)?;
        let m = self.messages.get(&seq).ok_or_else(|| QueueError::UnknownMessage(id.to_string()))?;
        match &m.state {
            State::Leased { consumer: holder, until } if holder == consumer => {
                let until = *until;
                self.leases.remove(&(At(until), seq));
                self.release(consumer, seq);
                self.lease_ended(seq, delay, now, fx);
            }
            State::Round { targets, until } if targets.contains(consumer) => {
                let until = *until;
                self.rounds.remove(&(At(until), seq));
                self.end_round(seq, delay, now, fx);
            }
            _ => return Err(QueueError::UnknownLease { id: id.to_string(), consumer: consumer.to_string() }),
        }
        Ok(())
    }

    /// Up to `limit` dead letters, oldest message first (`dlq NAME`).
    pub fn dead_letters(&self, limit: usize) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .take(limit)
            .filter_map(|seq| self.messages.get(seq))
            .filter_map(|m| match &m.state {
                State::Dead(info) => Some(DeadLetter {
                    id: m.id.clone(),
                    payload: m.payload.clone(),
                    guarantee: m.guarantee,
                    receive_count: m.receive_count,
                    info: info.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Moves up to `limit` dead letters, oldest first, back to visible with
    /// `receive_count = 0` (`redrive NAME`; call again while it returns `limit`). A
    /// broadcast/quorum message keeps the acks it had: its acker is not asked again.
    /// The value is how many moved.
    pub fn redrive(&mut self, limit: usize, now: f64) -> Step<usize> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let seqs: Vec<u64> = self.dead.iter().take(limit).copied().collect();
        for &seq in &seqs {
            self.dead.remove(&seq);
            if let Some(m) = self.messages.get_mut(&seq) {
                m.receive_count = 0;
                m.visible_at = now;
                m.state = State::Delayed;
                if let Some(t) = m.expires_at {
                    // A redriven message gets a fresh TTL: it was not lost by its own age.
                    let fresh = self.config.message_ttl.map_or(t, |ttl| now + ttl);
                    m.expires_at = Some(fresh);
                    self.ttl.insert((At(fresh), seq));
                }
            }
            self.persist(seq, &mut fx);
            self.place(seq, now);
        }
        self.dispatch(now, &mut fx);
        fx.into_step(seqs.len())
    }

    /// Deletes up to `limit` dead letters, oldest first (frees room in a full queue).
    /// The value is how many were deleted.
    pub fn purge_dead_letters(&mut self, limit: usize) -> Step<usize> {
        let mut fx = Effects::default();
        let seqs: Vec<u64> = self.dead.iter().take(limit).copied().collect();
        for &seq in &seqs {
            self.remove(seq, &mut fx);
        }
        fx.into_step(seqs.len())
    }

    /// The dead-letter queue `NAME.dlq`, as a queue of its own: leases up to `max` dead
    /// letters nobody holds, oldest first, to `consumer` for `visibility` seconds (default:
    /// the queue's). Each delivery carries its dead-letter reason. [`Self::ack_dead`]
    /// deletes one; a nack, the lease's end or the consumer leaving puts it back. These
    /// leases are not persisted: after a restart every dead letter is available again.
    pub fn receive_dead(
        &mut self,
        consumer: &ConsumerId,
        max: usize,
        visibility: Option<f64>,
        now: f64,
    ) -> Step<Result<Vec<Delivery>>> {
        let visibility = match self.visibility(visibility) {
            Ok(v) => v,
            Err(refused) => return Effects::default().into_step(Err(refused)),
        };
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let mut got = Vec::new();
        while got.len() < max.min(MAX_RECEIVE_BATCH) {
            let Some(seq) = self.dead.pop_first() else { break };
            let Some(m) = self.messages.get_mut(&seq) else { continue };
            let State::Dead(info) = std::mem::replace(&mut m.state, State::Delayed) else { continue };
            let until = now + visibility;
            got.push(Delivery { dead: Some(info.clone()), ..m.delivery(consumer, Some(until)) });
            m.state = State::DeadLeased { info, consumer: consumer.clone(), until };
            self.dead_leases.insert((At(until), seq));
            self.held.entry(consumer.clone()).or_default().insert(seq);
        }
        self.dispatch(now, &mut fx);
        fx.into_step(Ok(got))
    }

    /// `consumer` is done with dead letter `id` (received from `NAME.dlq`): deleted.
    /// Errors: `UnknownMessage`, `UnknownLease`. Writes: the removal.
    pub fn ack_dead(&mut self, consumer: &ConsumerId, id: &MessageId, now: f64) -> Step<Result<()>> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let value = self.held_dead(consumer, id).map(|seq| {
            self.release(consumer, seq);
            self.stats.acked_total += 1;
            self.remove(seq, &mut fx);
        });
        self.dispatch(now, &mut fx);
        fx.into_step(value)
    }

    /// `consumer` gives dead letter `id` back to the dead-letter queue (available again
    /// at once). Errors: `UnknownMessage`, `UnknownLease`.
    pub fn nack_dead(&mut self, consumer: &ConsumerId, id: &MessageId, now: f64) -> Step<Result<()>> {
        let mut fx = Effects::default();
        self.advance(now, &mut fx);
        let value = self.held_dead(consumer, id).map(|seq| self.dead_lease_ended(seq));
        fx.into_step(value)
    }

    /// The dead-letter queue's own gauges: `visible` are the dead letters nobody holds,
    /// `leased` those received and not yet acked.
    pub fn dead_stats(&self) -> QueueStats {
        QueueStats { visible: self.dead.len(), leased: self.dead_leases.len(), ..QueueStats::default() }
    }

    // ---- internals ----

    /// A lease's length: `asked`, or the queue's visibility timeout.
    fn visibility(&self, asked: Option<f64>) -> Result<f64> {
        let visibility = asked.unwrap_or(self.config.visibility_timeout);
        if !visibility.is_finite() || visibility <= 0.0 || visibility > MAX_SECONDS {
            return Err(QueueError::BadRequest(format!("visibility must be in (0, {MAX_SECONDS}], got {visibility}")));
        }
        Ok(visibility)
    }

    /// The seq of dead letter `id` if `consumer` holds it, taken out of `dead_leases`.
    fn held_dead(&mut self, consumer: &ConsumerId, id: &MessageId) -> Result<u64> {
        let seq = self.lookup(id)?;
        let m = self.messages.get(&seq).ok_or_else(|| QueueError::UnknownMessage(id.to_string()))?;
        match &m.state {
            State::DeadLeased { consumer: holder, until, .. } if holder == consumer => {
                self.dead_leases.remove(&(At(*until), seq));
                Ok(seq)
            }
            _ => Err(QueueError::UnknownLease { id: id.to_string(), consumer: consumer.to_string() }),
        }
    }

    /// A lease on a dead letter ended (already out of `dead_leases`): a dead letter again.
    fn dead_lease_ended(&mut self, seq: u64) {
        let Some(m) = self.messages.get_mut(&seq) else { return };
        let State::DeadLeased { info, consumer, .. } = std::mem::replace(&mut m.state, State::Delayed) else { return };
        m.state = State::Dead(info);
        self.dead.insert(seq);
        self.release(&consumer, seq);
    }

    fn lookup(&self, id: &MessageId) -> Result<u64> {
        self.ids.get(id).copied().ok_or_else(|| QueueError::UnknownMessage(id.to_string()))
    }

    fn durable(&self, m: &Message) -> bool {
        self.config.durable && m.guarantee != Guarantee::FireAndForget
    }

    fn persist(&self, seq: u64, fx: &mut Effects) {
        if let Some(m) = self.messages.get(&seq).filter(|m| self.durable(m)) {
            fx.writes.push(QueueWrite::Upsert(m.stored()));
        }
    }

    /// Drops the dedup record of `key`, and its bytes.
    fn forget_dedup(&mut self, key: &str) {
        if let Some((_, _, first)) = self.dedup.remove(key) {
            self.uncount(dedup_cost(key, &first));
        }
    }

    /// Records `key` for the dedup window (its bytes already counted by the caller).
    fn record_dedup(&mut self, key: String, until: f64, seq: u64, id: MessageId) {
        // Bounded by max_messages: the oldest entries go first.
        while self.dedup.len() >= self.config.max_messages {
            let Some((_, old)) = self.dedup_order.pop_first() else { break };
            self.forget_dedup(&old);
        }
        if let Some((old_until, old_seq, first)) = self.dedup.insert(key.clone(), (until, seq, id)) {
            self.dedup_order.remove(&(At(old_until), old_seq));
            self.uncount(dedup_cost(&key, &first));
        }
        self.dedup_order.insert((At(until), seq), key);
    }

    /// Puts a live, unleased message where `now` says it belongs: delayed or visible.
    fn place(&mut self, seq: u64, now: f64) {
        let wait = self.config.quorum_wait;
        let Some(m) = self.messages.get_mut(&seq) else { return };
        if m.visible_at > now {
            m.state = State::Delayed;
            self.delayed.insert((At(m.visible_at), seq));
            return;
        }
        m.state = State::Visible;
        if m.guarantee.is_group() {
            self.visible_group.insert(m.rank());
        } else {
            self.visible_single.insert(m.rank());
        }
        if matches!(m.guarantee, Guarantee::Quorum(_)) && m.quorum_deadline.is_none() {
            let until = now + wait;
            m.quorum_deadline = Some(until);
            self.quorum_deadlines.insert((At(until), seq));
        }
    }

    /// Takes a message out of the waiting indexes (delayed, visible, parked, quorum wait).
    fn unplace(&mut self, seq: u64) {
        let Some(m) = self.messages.get_mut(&seq) else { return };
        match m.state {
            State::Delayed => {
                self.delayed.remove(&(At(m.visible_at), seq));
            }
            State::Visible => {
                self.visible_single.remove(&m.rank());
                self.visible_group.remove(&m.rank());
            }
            State::Parked { needed } => {
                self.parked.remove(&(needed, m.rank()));
            }
            _ => {}
        }
        if let Some(until) = m.quorum_deadline.take() {
            self.quorum_deadlines.remove(&(At(until), seq));
        }
    }

    /// Deletes a message that no consumer holds (completed, expired, purged).
    fn remove(&mut self, seq: u64, fx: &mut Effects) {
        self.unplace(seq);
        self.dead.remove(&seq);
        let Some(m) = self.messages.remove(&seq) else { return };
        self.uncount(cost(&m.payload));
        if let Some(t) = m.expires_at {
            self.ttl.remove(&(At(t), seq));
        }
        self.ids.remove(&m.id);
        if self.durable(&m) {
            fx.writes.push(QueueWrite::Remove(m.id));
        }
    }

    /// Dead-letters a message that no consumer holds.
    fn kill(&mut self, seq: u64, reason: String, now: f64, fx: &mut Effects) {
        self.unplace(seq);
        let Some(m) = self.messages.get_mut(&seq) else { return };
        if let Some(t) = m.expires_at {
            self.ttl.remove(&(At(t), seq));
        }
        m.state = State::Dead(DeadLetterInfo { reason, at: now });
        self.dead.insert(seq);
        self.stats.dead_lettered_total += 1;
        self.persist(seq, fx);
    }

    fn release(&mut self, consumer: &ConsumerId, seq: u64) {
        if let Some(set) = self.held.get_mut(consumer) {
            set.remove(&seq);
            if set.is_empty() {
                self.held.remove(consumer);
            }
        }
        self.make_ready(consumer);
    }

    fn make_ready(&mut self, consumer: &ConsumerId) {
        if let Some(sub) = self.subscribers.get_mut(consumer) {
            if !sub.queued {
                sub.queued = true;
                self.ready.push_back(consumer.clone());
            }
        }
    }

    fn credit(&self, consumer: &ConsumerId) -> usize {
        let held = self.held.get(consumer).map_or(0, BTreeSet::len);
        self.subscribers.get(consumer).map_or(0, |s| s.prefetch.saturating_sub(held))
    }

    /// A single lease or a round ended without completion: counts as a receive.
    fn give_back(&mut self, seq: u64, delay: f64, reason: String, now: f64, fx: &mut Effects) {
        let max = self.config.max_receives;
        let Some(m) = self.messages.get_mut(&seq) else { return };
        m.state = State::Delayed;
        if m.expires_at.is_some_and(|t| t <= now) {
            self.stats.expired_total += 1;
            self.remove(seq, fx);
        } else if m.receive_count >= max {
            self.kill(seq, reason, now, fx);
        } else {
            self.stats.redelivered_total += 1;
            if delay > 0.0 {
                m.visible_at = now + delay;
                self.persist(seq, fx);
            }
            self.place(seq, now);
        }
    }

    /// An at-least-once lease ended (already out of `leases` and `held`).
    fn lease_ended(&mut self, seq: u64, delay: f64, now: f64, fx: &mut Effects) {
        let reason = format!("max receives ({}) reached", self.config.max_receives);
        self.give_back(seq, delay, reason, now, fx);
    }

    /// A round ended without completion (already out of `leases`): its remaining targets
    /// are released.
    fn end_round(&mut self, seq: u64, delay: f64, now: f64, fx: &mut Effects) {
        let Some(m) = self.messages.get_mut(&seq) else { return };
        let State::Round { targets, .. } = std::mem::replace(&mut m.state, State::Delayed) else { return };
        let reason = match m.guarantee {
            Guarantee::Quorum(n) => {
                format!("quorum({n}) not reached: {} acks after {} receives", m.acked.len(), m.receive_count)
            }
            _ => format!("broadcast: {} subscribers did not ack after {} receives", targets.len(), m.receive_count),
        };
        for t in &targets {
            self.release(t, seq);
        }
        self.give_back(seq, delay, reason, now, fx);
    }

    /// After an ack or a departure in a round: complete it, end it if it cannot
    /// complete, or keep waiting.
    fn check_round(&mut self, seq: u64, now: f64, fx: &mut Effects) {
        let Some(m) = self.messages.get(&seq) else { return };
        let State::Round { targets, until } = &m.state else { return };
        let until = *until;
        let acked = m.acked.len();
        let (done, hopeless) = match m.guarantee {
            Guarantee::Quorum(n) => (acked >= n as usize, acked + targets.len() < n as usize),
            _ => (targets.is_empty() && acked > 0, targets.is_empty()),
        };
        if done {
            self.rounds.remove(&(At(until), seq));
            let targets = targets.clone();
            for t in &targets {
                self.release(t, seq);
            }
            self.stats.acked_total += 1;
            self.remove(seq, fx);
        } else if hopeless {
            self.rounds.remove(&(At(until), seq));
            self.end_round(seq, 0.0, now, fx);
        }
    }

    /// Leases a visible single message to `consumer` (fire-and-forget: hands it over and
    /// forgets it).
    fn lease(&mut self, seq: u64, consumer: &ConsumerId, visibility: f64, now: f64, fx: &mut Effects) -> Delivery {
        self.unplace(seq);
        self.stats.delivered_total += 1;
        let m = self.messages.get_mut(&seq).expect("a visible message exists");
        m.receive_count += 1;
        let mut d = m.delivery(consumer, None);
        if m.guarantee == Guarantee::FireAndForget {
            self.remove(seq, fx);
            return d;
        }
        let until = now + visibility;
        m.state = State::Leased { consumer: consumer.clone(), until };
        d.lease_until = Some(until);
        self.leases.insert((At(until), seq));
        self.held.entry(consumer.clone()).or_default().insert(seq);
        self.persist(seq, fx);
        d
    }

    /// Pushes what can go: every visible broadcast/quorum message to the subscribers
    /// (parking quorum messages that lack subscribers), then single messages round-robin
    /// to subscribers with credit.
    fn dispatch(&mut self, now: f64, fx: &mut Effects) {
        if self.subscribers.is_empty() {
            return;
        }
        while let Some(&rank) = self.visible_group.first() {
            self.start_round(rank, now, fx);
        }
        while !self.visible_single.is_empty() {
            let Some(consumer) = self.ready.pop_front() else { break };
            if self.credit(&consumer) == 0 {
                if let Some(sub) = self.subscribers.get_mut(&consumer) {
                    sub.queued = false;
                }
                continue;
            }
            let Some(&(_, seq)) = self.visible_single.first() else { break };
            let d = self.lease(seq, &consumer, self.config.visibility_timeout, now, fx);
            fx.pushes.push(d);
            self.ready.push_back(consumer);
        }
    }

    fn start_round(&mut self, rank: Rank, now: f64, fx: &mut Effects) {
        let seq = rank.1;
        let visibility = self.config.visibility_timeout;
        let Some(m) = self.messages.get(&seq) else {
            self.visible_group.remove(&rank);
            return;
        };
        let targets: BTreeSet<ConsumerId> =
            self.subscribers.keys().filter(|c| !m.acked.contains(*c)).cloned().collect();
        if let Guarantee::Quorum(n) = m.guarantee {
            let needed = (n as usize).saturating_sub(m.acked.len());
            if targets.len() < needed {
                // Each new subscriber adds one target: park until the count can reach it.
                let parked_at = self.subscribers.len() + needed - targets.len();
                self.visible_group.remove(&rank);
                self.parked.insert((parked_at, rank));
                if let Some(m) = self.messages.get_mut(&seq) {
                    m.state = State::Parked { needed: parked_at };
                }
                return;
            }
        }
        self.unplace(seq);
        let Some(m) = self.messages.get_mut(&seq) else { return };
        if targets.is_empty() {
            // Every present subscriber acked in an earlier round: broadcast is done.
            self.stats.acked_total += 1;
            self.remove(seq, fx);
            return;
        }
        m.receive_count += 1;
        let until = now + visibility;
        for t in &targets {
            fx.pushes.push(m.delivery(t, Some(until)));
            self.held.entry(t.clone()).or_default().insert(seq);
        }
        self.stats.delivered_total += targets.len() as u64;
        m.state = State::Round { targets, until };
        self.rounds.insert((At(until), seq));
        self.persist(seq, fx);
    }

    /// Runs every timer due at `now`.
    fn advance(&mut self, now: f64, fx: &mut Effects) {
        while let Some(&(at, seq)) = self.leases.first() {
            if at.0 > now {
                break;
            }
            self.leases.remove(&(at, seq));
            if let Some(State::Leased { consumer, .. }) = self.messages.get(&seq).map(|m| &m.state) {
                let consumer = consumer.clone();
                self.release(&consumer, seq);
                self.lease_ended(seq, 0.0, now, fx);
            }
        }
        while let Some(&(at, seq)) = self.rounds.first() {
            if at.0 > now {
                break;
            }
            self.rounds.remove(&(at, seq));
            self.end_round(seq, 0.0, now, fx);
        }
        while let Some(&(at, seq)) = self.dead_leases.first() {
            if at.0 > now {
                break;
            }
            self.dead_leases.remove(&(at, seq));
            self.dead_lease_ended(seq);
        }
        while let Some(&(at, seq)) = self.delayed.first() {
            if at.0 > now {
                break;
            }
            self.delayed.remove(&(at, seq));
            self.place(seq, now);
        }
        while let Some(&(at, seq)) = self.ttl.first() {
            if at.0 > now {
                break;
            }
            self.ttl.remove(&(at, seq));
            // A held message expires when its lease or round ends (see `give_back`).
            let held =
                matches!(self.messages.get(&seq).map(|m| &m.state), Some(State::Leased { .. } | State::Round { .. }));
            if !held {
                self.stats.expired_total += 1;
                self.remove(seq, fx);
            }
        }
        while let Some(&(at, seq)) = self.quorum_deadlines.first() {
            if at.0 > now {
                break;
            }
            let Some(m) = self.messages.get(&seq) else {
                self.quorum_deadlines.remove(&(at, seq));
                continue;
            };
            let reason = format!(
                "quorum({}) not reached: {} subscriber(s) within {}s",
                match m.guarantee {
                    Guarantee::Quorum(n) => n,
                    _ => 0,
                },
                self.subscribers.len(),
                self.config.quorum_wait
            );
            self.kill(seq, reason, now, fx);
        }
        while let Some((&(at, seq), _)) = self.dedup_order.first_key_value() {
            if at.0 > now {
                break;
            }
            if let Some(key) = self.dedup_order.remove(&(at, seq)) {
                if self.dedup.get(&key).is_some_and(|e| e.1 == seq) {
                    self.forget_dedup(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
