//! PubSub: topic subscriptions with AMQP wildcards, delivery, backlog replay.
//!
//! Who sends to it: connections (`Subscribe`, `ContinueReplay`, `Unsubscribe`, `Publish`,
//! `ConnectionClosed`), the planner (intermediate-result callback topics) and the fabric
//! (messages published on other nodes). Whom it calls: nobody — it pushes notifications
//! straight into each subscriber's [`Outbox`], without waiting, so one slow subscriber
//! never stalls a publisher. A subscriber that falls behind loses notifications: an
//! outbox over its frame or byte bound drops that notification and counts it in `/metrics`
//! (`mpreg_pubsub_notifications_dropped_total`); nothing is buffered for it here.
//!
//! Topics are words separated by `.`; in a pattern `*` matches exactly one word and `#`
//! zero or more (matching is bounded by pattern words × topic words, see [`topic`]). Each
//! subscription receives at most one notification per message, even when several of its
//! patterns match.
//!
//! Every input is bounded ([`PubSubLimits`]): words and bytes per topic and pattern,
//! patterns per subscription, subscriptions per connection, and pattern words in the
//! node's whole index. A refused subscribe or publish gets a failed `pubsub-ack` naming
//! the setting, and counts in `mpreg_limit_exceeded_total{limit=...}`.
//!
//! The backlog ([`backlog`]) keeps the messages published *through this node* (by its
//! clients and its planner), bounded in count, age and bytes; a message arriving from
//! another node is delivered to local subscribers but not kept, since its origin keeps
//! it. So a flood reaching every node costs memory on one, each node's backlog bound holds
//! whatever its peers do, and a subscriber asking for `get_backlog` replays what was
//! published through the node it is connected to. Replay comes after the ack, in pages
//! (see [`ContinueReplay`]), each put into the subscriber's outbox before the next is
//! read: a big backlog neither holds the actor nor piles up in memory.
//!
//! What a restart loses: every subscription and the backlog (clients re-subscribe).

pub mod backlog;
pub mod topic;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, MessageResponse};
use bytes::Bytes;

use self::backlog::{Backlog, PageBudget, ReplayCursor};
pub use self::backlog::{BacklogLimits, Retention};
pub use self::topic::{TopicIndex, TopicPattern};
use crate::mailbox::MailboxTicket;
use crate::metrics::Metrics;
use crate::protocol::{encode, FrameKind, PubSubMessage, Subscription};
use crate::supervisor::ChildGuard;
use crate::unix_now;

/// Identifies one websocket connection on this node.
pub type ConnectionId = u64;

/// Connection ids that stand for something other than a websocket, each kind in its own
/// quarter of the id space (the top two bits); real connections count up from 1 and
/// never reach them.
#[derive(Debug, Clone, Copy)]
pub enum PseudoConnection {
    /// Queue operations from another cluster (one per origin cluster, on the bridge node
    /// that runs them).
    RemoteCluster = 1,
    /// A client connection of another node using a queue this node owns.
    RemoteQueueClient = 2,
    /// The pub/sub bindings of one queue.
    QueueBindings = 3,
}

impl PseudoConnection {
    /// The id of this kind for `key`: distinct per key (62 bits of its hash).
    pub fn id(self, key: impl std::hash::Hash) -> ConnectionId {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        ((self as u64) << 62) | (h.finish() >> 2)
    }
}

pub use crate::outbox::{OutFrame, Outbox};

/// A subscription: its connection and its client-chosen id (shared by every index entry).
type SubscriptionKey = (ConnectionId, Arc<str>);

/// What one replay page may do before the subscriber's next page is asked for.
const REPLAY_PAGE: PageBudget = PageBudget { steps: 50_000, bytes: 512 * 1024 };

/// Bounds on subscriptions and topics, from the node's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubSubLimits {
    /// Words in a topic or pattern.
    pub max_topic_words: usize,
    /// Bytes in a topic, a pattern or a subscription id.
    pub max_topic_bytes: usize,
    /// Patterns in one subscription.
    pub max_patterns_per_subscription: usize,
    /// Subscriptions of one connection.
    pub max_subscriptions_per_connection: usize,
    /// Pattern words indexed on this node, all subscriptions together.
    pub max_index_words: usize,
}

impl Default for PubSubLimits {
    fn default() -> Self {
        PubSubLimits {
            max_topic_words: 32,
            max_topic_bytes: 256,
            max_patterns_per_subscription: 64,
            max_subscriptions_per_connection: 1024,
            max_index_words: 262_144,
        }
    }
}

/// A request refused because it exceeds a configured bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: over the limit {limit} = {max}")]
pub struct LimitExceeded {
    /// The setting's name (also the `limit` label of the counter).
    pub limit: &'static str,
    /// Its value.
    pub max: usize,
    /// What exceeded it, e.g. `topic has 40 words`.
    pub what: String,
}

/// Where a published message entered the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Published through this node (a client or the planner): delivered and kept.
    Local,
    /// Forwarded by another node, which keeps it: delivered only.
    Peer,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Notifications queued.
    pub queued: usize,
    /// Notifications dropped (subscriber outbox full).
    pub dropped: usize,
    /// Whether the backlog kept the message.
    pub retention: Retention,
}

/// Where a replay stands; opaque to connections, handed back in [`ContinueReplay`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayToken {
    key: SubscriptionKey,
    /// The subscription this replay is for: a replaced one stops it.
    generation: u64,
    cursor: ReplayCursor,
}

/// One page of backlog replay: notification frames to queue, in order, and the token of
/// the next page if there is more.
#[derive(Debug, Default, MessageResponse)]
pub struct Replay {
    /// Notifications, oldest first.
    pub frames: Vec<OutFrame>,
    /// Ask for the rest with this, once `frames` are queued.
    pub next: Option<ReplayToken>,
}

#[derive(Debug)]
enum CompiledPattern {
    Exact(Box<str>),
    Wildcard(TopicPattern),
}

struct Subscriber {
    patterns: Vec<CompiledPattern>,
    /// Pattern words it holds in the index.
    words: usize,
    generation: u64,
    outbox: Outbox,
    kind: FrameKind,
}

impl Subscriber {
    /// Whether any pattern matches `topic`, and the matching steps it took.
    fn matches(&self, topic: &str) -> (bool, usize) {
        let words: Vec<&str> = topic.split('.').collect();
        let mut steps = 0;
        for pattern in &self.patterns {
            let (matched, cost) = match pattern {
                CompiledPattern::Exact(exact) => (**exact == *topic, 1),
                CompiledPattern::Wildcard(pattern) => pattern.matches_words(&words),
            };
            steps += cost;
            if matched {
                return (true, steps);
            }
        }
        (false, steps)
    }
}

/// The subscription index and backlog: no actix, no I/O, time passed in.
pub struct PubSubCore {
    index: TopicIndex<SubscriptionKey>,
    exact: HashMap<Box<str>, HashSet<SubscriptionKey>>,
    subscribers: HashMap<SubscriptionKey, Subscriber>,
    by_connection: HashMap<ConnectionId, HashSet<Arc<str>>>,
    /// Pattern words of every subscription (bounded by `max_index_words`).
    index_words: usize,
    generation: u64,
    backlog: Backlog,
    limits: PubSubLimits,
}

impl PubSubCore {
    /// An empty index with these bounds.
    pub fn new(limits: PubSubLimits, backlog: BacklogLimits) -> Self {
        PubSubCore {
            index: TopicIndex::default(),
            exact: HashMap::new(),
            subscribers: HashMap::new(),
            by_connection: HashMap::new(),
            index_words: 0,
            generation: 0,
            backlog: Backlog::new(backlog),
            limits,
        }
    }

    /// Messages and encoded bytes in the backlog.
    pub fn backlog_size(&self) -> (usize, usize) {
        (self.backlog.len(), self.backlog.bytes())
    }

    fn refuse(&self, limit: &'static str, max: usize, what: String) -> LimitExceeded {
        LimitExceeded { limit, max, what }
    }

    /// Checks a topic or pattern's size; its words.
    fn check_topic<'t>(&self, text: &'t str, what: &dyn Fn() -> String) -> Result<Vec<&'t str>, LimitExceeded> {
        let limits = &self.limits;
        if text.len() > limits.max_topic_bytes {
            let what = format!("{} is {} bytes", what(), text.len());
            return Err(self.refuse("pubsub_max_topic_bytes", limits.max_topic_bytes, what));
        }
        let words: Vec<&str> = text.split('.').collect();
        if words.len() > limits.max_topic_words {
            let what = format!("{} has {} words", what(), words.len());
            return Err(self.refuse("pubsub_max_topic_words", limits.max_topic_words, what));
        }
        Ok(words)
    }

    /// Adds (or replaces) a subscription, unless it exceeds a bound (then nothing
    /// changes, a replaced subscription included); returns where the replay of the backlog
    /// it asked for starts (its pages: [`Self::continue_replay`]), fixed now.
    pub fn subscribe(
        &mut self,
        conn: ConnectionId,
        subscription: &Subscription,
        outbox: Outbox,
        kind: FrameKind,
        now: f64,
    ) -> Result<Option<ReplayToken>, LimitExceeded> {
        let limits = &self.limits;
        if subscription.patterns.len() > limits.max_patterns_per_subscription {
            let what = format!("subscription has {} patterns", subscription.patterns.len());
            return Err(self.refuse(
                "pubsub_max_patterns_per_subscription",
                limits.max_patterns_per_subscription,
                what,
            ));
        }
        if subscription.subscription_id.len() > limits.max_topic_bytes {
            let what = format!("subscription_id is {} bytes", subscription.subscription_id.len());
            return Err(self.refuse("pubsub_max_topic_bytes", limits.max_topic_bytes, what));
        }
        let mut patterns = Vec::with_capacity(subscription.patterns.len());
        let mut words = 0;
        for (i, spec) in subscription.patterns.iter().enumerate() {
            words += self.check_topic(&spec.pattern, &|| format!("pattern {i}"))?.len();
            patterns.push(if spec.exact_match {
                CompiledPattern::Exact(spec.pattern.as_str().into())
            } else {
                CompiledPattern::Wildcard(TopicPattern::new(&spec.pattern))
            });
        }
        let id: Arc<str> = subscription.subscription_id.as_str().into();
        let key = (conn, id.clone());
        let replaced_words = self.subscribers.get(&key).map(|s| s.words);
        if replaced_words.is_none() {
            let held = self.by_connection.get(&conn).map_or(0, HashSet::len);
            if held >= limits.max_subscriptions_per_connection {
                let what = format!("connection has {held} subscriptions");
                let max = limits.max_subscriptions_per_connection;
                return Err(self.refuse("pubsub_max_subscriptions_per_connection", max, what));
            }
        }
        let index_words = self.index_words - replaced_words.unwrap_or(0) + words;
        if index_words > limits.max_index_words {
            let what = format!("the node's pattern index would hold {index_words} words");
            return Err(self.refuse("pubsub_max_index_words", limits.max_index_words, what));
        }

        self.remove(&key);
        for pattern in &patterns {
            match pattern {
                CompiledPattern::Exact(topic) => {
                    self.exact.entry(topic.clone()).or_default().insert(key.clone());
                }
                CompiledPattern::Wildcard(pattern) => self.index.insert(pattern, key.clone()),
            }
        }
        self.index_words += words;
        self.by_connection.entry(conn).or_default().insert(id);
        self.generation += 1;
        let generation = self.generation;
        self.subscribers.insert(key.clone(), Subscriber { patterns, words, generation, outbox, kind });
        if !subscription.get_backlog {
            return Ok(None);
        }
        self.backlog.expire(now);
        let since = now - subscription.backlog_seconds.max(0.0);
        Ok(Some(ReplayToken { key, generation, cursor: self.backlog.cursor(since) }))
    }

    /// The next page of a replay; empty and final if its subscription is gone or replaced.
    pub fn continue_replay(&self, token: ReplayToken) -> Replay {
        let Some(subscriber) = self.subscribers.get(&token.key) else { return Replay::default() };
        if subscriber.generation != token.generation {
            return Replay::default();
        }
        let (found, next) = self.backlog.page(&token.cursor, REPLAY_PAGE, |topic| subscriber.matches(topic));
        let frames = found
            .iter()
            .map(|m| notification_frame(&m.encoded, &m.message_id, &token.key.1, subscriber.kind))
            .collect();
        Replay { frames, next: next.map(|cursor| ReplayToken { cursor, ..token }) }
    }

    /// Removes a subscription; whether it existed.
    pub fn unsubscribe(&mut self, conn: ConnectionId, subscription_id: &str) -> bool {
        self.remove(&(conn, subscription_id.into()))
    }

    fn remove(&mut self, key: &SubscriptionKey) -> bool {
        let Some(old) = self.subscribers.remove(key) else {
            return false;
        };
        for pattern in &old.patterns {
            match pattern {
                CompiledPattern::Exact(topic) => {
                    if let Some(set) = self.exact.get_mut(topic) {
                        set.remove(key);
                        if set.is_empty() {
                            self.exact.remove(topic);
                        }
                    }
                }
                CompiledPattern::Wildcard(pattern) => self.index.remove(pattern, key),
            }
        }
        self.index_words -= old.words;
        if let Some(ids) = self.by_connection.get_mut(&key.0) {
            ids.remove(&key.1);
            if ids.is_empty() {
                self.by_connection.remove(&key.0);
            }
        }
        true
    }

    /// Drops every subscription of a closed connection.
    pub fn connection_closed(&mut self, conn: ConnectionId) {
        for id in self.by_connection.remove(&conn).unwrap_or_default() {
            self.remove(&(conn, id));
        }
    }

    /// The subscriptions matching the topic's `words`, each once.
    fn matching(&self, topic: &str, words: &[&str]) -> HashSet<SubscriptionKey> {
        let mut out = HashSet::new();
        self.index.collect(words, &mut out);
        if let Some(exact) = self.exact.get(topic) {
            out.extend(exact.iter().cloned());
        }
        out
    }

    /// Queues one notification per matching subscription and, for a message published
    /// here, keeps it in the backlog. The message is encoded once, only if someone gets
    /// or keeps it; its encoded length is its size for the backlog's bounds.
    pub fn publish(&mut self, message: &PubSubMessage, origin: Origin, now: f64) -> Result<Delivery, LimitExceeded> {
        let words = self.check_topic(&message.topic, &|| "topic".to_owned())?;
        let keys = self.matching(&message.topic, &words);
        let mut delivery = Delivery { queued: 0, dropped: 0, retention: Retention::NotOrigin };
        if keys.is_empty() && origin == Origin::Peer {
            self.backlog.expire(now);
            return Ok(delivery);
        }
        let encoded = Bytes::from(encode(message));
        for key in keys {
            let Some(subscriber) = self.subscribers.get(&key) else { continue };
            let frame = notification_frame(&encoded, &message.message_id, &key.1, subscriber.kind);
            if subscriber.outbox.try_send(frame).is_ok() {
                delivery.queued += 1;
            } else {
                delivery.dropped += 1;
            }
        }
        delivery.retention = match origin {
            Origin::Local => self.backlog.retain(&message.topic, &message.message_id, encoded, now),
            Origin::Peer => {
                self.backlog.expire(now);
                Retention::NotOrigin
            }
        };
        Ok(delivery)
    }
}

/// The notification of a message (`encoded`: its JSON) for one subscription, built around
/// the message's bytes: the same JSON as encoding a `PubSubNotification`, without
/// re-encoding the message for every subscriber.
pub fn notification_frame(encoded: &[u8], message_id: &str, subscription_id: &str, kind: FrameKind) -> OutFrame {
    let u = format!("notification_{message_id}_{subscription_id}");
    let mut bytes = Vec::with_capacity(encoded.len() + 2 * subscription_id.len() + u.len() + 72);
    bytes.extend_from_slice(br#"{"role":"pubsub-notification","message":"#);
    bytes.extend_from_slice(encoded);
    bytes.extend_from_slice(br#","subscription_id":"#);
    bytes.extend_from_slice(&encode(&subscription_id));
    bytes.extend_from_slice(br#","u":"#);
    bytes.extend_from_slice(&encode(&u));
    bytes.push(b'}');
    OutFrame { bytes: Bytes::from(bytes), kind }
}

/// Subscribe; the result is where the replay of the backlog asked for starts (its pages
/// are asked for with [`ContinueReplay`], after the ack), or the bound the subscription
/// exceeds.
#[derive(Message)]
#[rtype(result = "Result<Option<ReplayToken>, LimitExceeded>")]
pub struct Subscribe {
    /// The subscribing connection.
    pub conn: ConnectionId,
    /// What to subscribe to.
    pub subscription: Arc<Subscription>,
    /// Where notifications go.
    pub outbox: Outbox,
    /// Frame type for notifications.
    pub kind: FrameKind,
}

/// The next page of a backlog replay; send it once the previous page is queued.
#[derive(Message)]
#[rtype(result = "Replay")]
pub struct ContinueReplay {
    /// From the previous page.
    pub token: ReplayToken,
}

/// Unsubscribe; the result says whether the subscription existed.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Unsubscribe {
    /// The connection that subscribed.
    pub conn: ConnectionId,
    /// Its subscription id.
    pub subscription_id: String,
}

/// Publish; returns once every notification is queued (so a reply sent afterwards on the
/// same connection arrives after them), or the bound the message exceeds.
#[derive(Message)]
#[rtype(result = "Result<(), LimitExceeded>")]
pub struct Publish {
    /// The message.
    pub message: Arc<PubSubMessage>,
    /// Where it entered the cluster.
    pub origin: Origin,
    /// A message a peer link read: its place in that link's share of this mailbox, given
    /// back once handled (see [`crate::mailbox`]).
    pub ticket: Option<MailboxTicket>,
}

/// A connection closed: forget its subscriptions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionClosed {
    /// The connection.
    pub conn: ConnectionId,
}

/// The PubSub actor.
pub struct PubSub {
    core: PubSubCore,
    metrics: Arc<Metrics>,
    _guard: ChildGuard,
}

impl PubSub {
    /// A PubSub with these bounds.
    pub fn new(limits: PubSubLimits, backlog: BacklogLimits, metrics: Arc<Metrics>, guard: ChildGuard) -> Self {
        PubSub { core: PubSubCore::new(limits, backlog), metrics, _guard: guard }
    }

    fn counted<T>(&self, result: Result<T, LimitExceeded>) -> Result<T, LimitExceeded> {
        if let Err(refused) = &result {
            self.metrics.limit_exceeded(refused.limit);
        }
        result
    }

    fn report_backlog(&self) {
        let (messages, bytes) = self.core.backlog_size();
        self.metrics.set_pubsub_backlog(messages, bytes);
    }
}

impl Actor for PubSub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        // A restart starts with an empty backlog.
        self.report_backlog();
    }
}

crate::supervised_child!(PubSub, "pubsub");

impl Handler<Subscribe> for PubSub {
    type Result = Result<Option<ReplayToken>, LimitExceeded>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        let result = self.core.subscribe(msg.conn, &msg.subscription, msg.outbox, msg.kind, unix_now());
        self.report_backlog();
        self.counted(result)
    }
}

impl Handler<ContinueReplay> for PubSub {
    type Result = Replay;

    fn handle(&mut self, msg: ContinueReplay, _: &mut Context<Self>) -> Replay {
        self.core.continue_replay(msg.token)
    }
}

impl Handler<Unsubscribe> for PubSub {
    type Result = bool;

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) -> bool {
        self.core.unsubscribe(msg.conn, &msg.subscription_id)
    }
}

impl Handler<Publish> for PubSub {
    type Result = Result<(), LimitExceeded>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let result = self.core.publish(&msg.message, msg.origin, unix_now());
        let delivery = self.counted(result)?;
        self.metrics.record_notifications(delivery.queued, delivery.dropped);
        if delivery.retention == Retention::TooLarge {
            self.metrics.limit_exceeded("pubsub_backlog_max_message_bytes");
        }
        self.report_backlog();
        Ok(())
    }
}

impl Handler<ConnectionClosed> for PubSub {
    type Result = ();

    fn handle(&mut self, msg: ConnectionClosed, _: &mut Context<Self>) {
        self.core.connection_closed(msg.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PubSubNotification, TopicPatternSpec};
    use proptest::prelude::*;

    fn sub(id: &str, patterns: &[&str]) -> Subscription {
        Subscription {
            subscription_id: id.into(),
            patterns: patterns.iter().map(|p| TopicPatternSpec { pattern: (*p).into(), exact_match: false }).collect(),
            subscriber: "t".into(),
            created_at: None,
            get_backlog: true,
            backlog_seconds: 60.0,
        }
    }

    fn msg(topic: &str) -> PubSubMessage {
        serde_json::from_value(serde_json::json!({"topic": topic, "payload": 1, "message_id": topic})).unwrap()
    }

    fn backlog_limits() -> BacklogLimits {
        BacklogLimits { seconds: 60.0, max_messages: 100, max_bytes: 1 << 20, max_message_bytes: 1 << 16 }
    }

    fn core() -> PubSubCore {
        PubSubCore::new(PubSubLimits::default(), backlog_limits())
    }

    fn replayed(replay: &Replay) -> Vec<String> {
        replay
            .frames
            .iter()
            .map(|f| serde_json::from_slice::<PubSubNotification>(&f.bytes).unwrap().message.topic)
            .collect()
    }

    #[test]
    fn one_notification_per_subscription_and_backlog() {
        let mut core = core();
        let (tx, mut rx) = Outbox::channel(10, usize::MAX);
        core.subscribe(1, &sub("s", &["a.*", "a.#", "#"]), tx.clone(), FrameKind::Binary, 0.0).unwrap();
        let delivery = core.publish(&msg("a.b"), Origin::Local, 1.0).unwrap();
        assert_eq!((delivery.queued, delivery.dropped, delivery.retention), (1, 0, Retention::Kept));
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_err());
        let start = core.subscribe(2, &sub("late", &["a.#"]), tx, FrameKind::Binary, 2.0).unwrap();
        let replay = core.continue_replay(start.expect("a backlog was asked for"));
        assert_eq!((replayed(&replay), replay.next), (vec!["a.b".to_owned()], None));
        core.connection_closed(1);
        core.connection_closed(2);
        assert!(core.matching("a.b", &["a", "b"]).is_empty());
        assert!(core.index.is_empty() && core.exact.is_empty() && core.by_connection.is_empty());
        assert_eq!(core.index_words, 0);
    }

    #[test]
    fn notification_frame_is_the_encoded_notification() {
        let mut message = msg("t.x");
        message.message_id = "id \"quoted\" é".into();
        let encoded = encode(&message);
        let frame = notification_frame(&encoded, &message.message_id, "sub\\1", FrameKind::Text);
        assert_eq!(frame.bytes, encode(&PubSubNotification::new(message, "sub\\1")));
    }

    #[test]
    fn messages_from_peers_are_delivered_not_kept() {
        let mut core = core();
        let (tx, mut rx) = Outbox::channel(10, usize::MAX);
        core.subscribe(1, &sub("s", &["p.#"]), tx.clone(), FrameKind::Binary, 0.0).unwrap();
        let delivery = core.publish(&msg("p.remote"), Origin::Peer, 1.0).unwrap();
        assert_eq!((delivery.queued, delivery.retention), (1, Retention::NotOrigin));
        assert!(rx.try_recv().is_ok());
        assert_eq!(core.backlog_size(), (0, 0));
    }

    /// A subscriber that does not keep up loses notifications (counted as dropped); the
    /// publisher never waits and nothing is buffered for it here.
    #[test]
    fn a_full_outbox_drops_and_counts() {
        let mut core = core();
        let (tx, mut rx) = Outbox::channel(1, usize::MAX);
        core.subscribe(1, &sub("slow", &["s.#"]), tx, FrameKind::Binary, 0.0).unwrap();
        let first = core.publish(&msg("s.1"), Origin::Local, 1.0).unwrap();
        let second = core.publish(&msg("s.2"), Origin::Local, 1.0).unwrap();
        assert_eq!(((first.queued, first.dropped), (second.queued, second.dropped)), ((1, 0), (0, 1)));
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_err());
    }

    #[test]
    fn every_bound_refuses_and_names_its_setting() {
        let limits = PubSubLimits {
            max_topic_words: 4,
            max_topic_bytes: 16,
            max_patterns_per_subscription: 3,
            max_subscriptions_per_connection: 2,
            max_index_words: 10,
        };
        let mut core = PubSubCore::new(limits, backlog_limits());
        let (tx, _rx) = Outbox::channel(10, usize::MAX);
        let refused = |core: &mut PubSubCore, s: Subscription| {
            core.subscribe(1, &s, tx.clone(), FrameKind::Binary, 0.0).map(|_| ()).map_err(|e| e.limit)
        };
        assert_eq!(refused(&mut core, sub("a", &["x", "y", "z", "w"])), Err("pubsub_max_patterns_per_subscription"));
        assert_eq!(refused(&mut core, sub("a", &["a.b.c.d.e"])), Err("pubsub_max_topic_words"));
        assert_eq!(refused(&mut core, sub("a", &["abcdefghijklmnopq"])), Err("pubsub_max_topic_bytes"));
        assert_eq!(refused(&mut core, sub(&"i".repeat(17), &["a"])), Err("pubsub_max_topic_bytes"));
        assert_eq!(refused(&mut core, sub("a", &["a.b.c.d", "a.b.c"])), Ok(()));
        assert_eq!(refused(&mut core, sub("b", &["a.b.c.d"])), Err("pubsub_max_index_words"));
        // Replacing a subscription counts its new words instead of its old ones.
        assert_eq!(refused(&mut core, sub("a", &["a.b.c.d", "a.b.c.d"])), Ok(()));
        assert_eq!(refused(&mut core, sub("b", &["a"])), Ok(()));
        assert_eq!(refused(&mut core, sub("c", &["a"])), Err("pubsub_max_subscriptions_per_connection"));
        // A refused replacement leaves the old subscription in place.
        assert_eq!(refused(&mut core, sub("b", &["a.b.c.d.e"])), Err("pubsub_max_topic_words"));
        assert_eq!(core.matching("a", &["a"]).len(), 1);
        let refused = core.publish(&msg("a.b.c.d.e"), Origin::Local, 0.0).unwrap_err();
        assert_eq!(refused.limit, "pubsub_max_topic_words");
        assert_eq!(refused.to_string(), "topic has 5 words: over the limit pubsub_max_topic_words = 4");
        assert_eq!(core.backlog_size(), (0, 0));
    }

    #[test]
    fn big_backlog_replays_in_bounded_pages() {
        let mut core = core();
        let (tx, _rx) = Outbox::channel(10, usize::MAX);
        for i in 0..100 {
            core.publish(&msg(&format!("h.a.a.a.a.a.a.{i}")), Origin::Local, 1.0).unwrap();
        }
        // 64 hostile patterns that never match: each message costs the subscriber many
        // matching steps, so the replay takes several pages.
        let hostile = format!("{}z", "#.a.".repeat(15));
        let mut patterns: Vec<&str> = vec![hostile.as_str(); 63];
        patterns.push("h.#");
        let start = core.subscribe(1, &sub("s", &patterns), tx, FrameKind::Binary, 2.0).unwrap();
        let mut replay = core.continue_replay(start.expect("a backlog was asked for"));
        let (mut topics, mut pages) = (Vec::new(), 1);
        loop {
            topics.extend(replayed(&replay));
            let Some(token) = replay.next.take() else { break };
            replay = core.continue_replay(token);
            pages += 1;
        }
        assert!(pages > 1, "one page did it all");
        assert_eq!(topics, (0..100).map(|i| format!("h.a.a.a.a.a.a.{i}")).collect::<Vec<_>>());
        // A replay of an unsubscribed subscription ends.
        let start =
            core.subscribe(1, &sub("s2", &patterns), Outbox::channel(1, usize::MAX).0, FrameKind::Binary, 2.0).unwrap();
        let replay = core.continue_replay(start.expect("a backlog was asked for"));
        assert!(core.unsubscribe(1, "s2"));
        assert!(core.continue_replay(replay.next.expect("paged")).frames.is_empty());
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())]
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![word(), Just("*".to_owned()), Just("#".to_owned())]
    }

    proptest! {
        /// A notification built around the encoded message is byte for byte the encoded
        /// `PubSubNotification`, whatever the ids hold.
        #[test]
        fn notification_frame_matches_encoding(message_id in ".{0,12}", subscription_id in ".{0,12}") {
            let mut message = msg("t");
            message.message_id = message_id;
            let frame = notification_frame(&encode(&message), &message.message_id, &subscription_id, FrameKind::Binary);
            prop_assert_eq!(frame.bytes, encode(&PubSubNotification::new(message, &subscription_id)));
        }

        /// The index finds exactly the subscriptions whose pattern matches.
        #[test]
        fn index_agrees_with_matcher(
            patterns in proptest::collection::vec(proptest::collection::vec(pattern_word(), 1..5), 1..8),
            topic in proptest::collection::vec(word(), 1..6),
        ) {
            let mut core = core();
            let (tx, _rx) = Outbox::channel(1, usize::MAX);
            let words: Vec<&str> = topic.iter().map(String::as_str).collect();
            let topic = topic.join(".");
            let mut expected = HashSet::new();
            for (i, p) in patterns.iter().enumerate() {
                let p = p.join(".");
                core.subscribe(1, &sub(&i.to_string(), &[&p]), tx.clone(), FrameKind::Binary, 0.0).unwrap();
                if TopicPattern::new(&p).matches(&topic) {
                    expected.insert((1, Arc::from(i.to_string())));
                }
            }
            prop_assert_eq!(core.matching(&topic, &words), expected);
        }
    }
}
