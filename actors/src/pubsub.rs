//! PubSub: topic subscriptions with AMQP wildcards, delivery, backlog replay.
//!
//! Who sends to it: connections (`Subscribe`, `Unsubscribe`, `Publish`,
//! `ConnectionClosed`) and the planner (intermediate-result callback topics). Whom it
//! calls: nobody — it pushes notifications straight into each subscriber's [`Outbox`],
//! without waiting, so one slow subscriber never stalls a publisher (an outbox over its
//! frame or byte bound drops that notification and counts it in `/metrics`).
//!
//! Topics are words separated by `.`; in a pattern `*` matches exactly one word and `#`
//! zero or more. Each subscription receives at most one notification per message, even
//! when several of its patterns match. Published messages are retained for
//! `backlog_seconds` (bounded by `backlog_max`) so a subscriber asking for
//! `get_backlog` receives the matching recent ones right after its ack.
//!
//! What a restart loses: every subscription and the backlog (clients re-subscribe).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};
use bytes::Bytes;

use crate::metrics::Metrics;
use crate::protocol::{encode, FrameKind, PubSubMessage, PubSubNotification, Subscription};
use crate::supervisor::ChildGuard;
use crate::unix_now;

/// Identifies one websocket connection on this node.
pub type ConnectionId = u64;

pub use crate::outbox::{OutFrame, Outbox};

type SubscriptionKey = (ConnectionId, String);

/// A compiled topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<String>,
}

impl TopicPattern {
    /// Splits a pattern on `.`.
    pub fn new(pattern: &str) -> Self {
        TopicPattern { words: pattern.split('.').map(str::to_owned).collect() }
    }

    /// Whether `topic` matches (`*` one word, `#` zero or more).
    pub fn matches(&self, topic: &str) -> bool {
        let topic: Vec<&str> = topic.split('.').collect();
        match_words(&self.words, &topic)
    }
}

fn match_words(pattern: &[String], topic: &[&str]) -> bool {
    match pattern.split_first() {
        None => topic.is_empty(),
        Some((word, rest)) if word == "#" => (0..=topic.len()).any(|skip| match_words(rest, &topic[skip..])),
        Some((word, rest)) => match topic.split_first() {
            Some((first, tail)) => (word == "*" || word == first) && match_words(rest, tail),
            None => false,
        },
    }
}

/// A trie of patterns: one level per word, with `*` and `#` edges.
#[derive(Debug, Default)]
struct TrieNode {
    children: HashMap<String, TrieNode>,
    subscribers: HashSet<SubscriptionKey>,
}

impl TrieNode {
    fn insert(&mut self, words: &[String], key: SubscriptionKey) {
        match words.split_first() {
            None => {
                self.subscribers.insert(key);
            }
            Some((word, rest)) => self.children.entry(word.clone()).or_default().insert(rest, key),
        }
    }

    fn remove(&mut self, words: &[String], key: &SubscriptionKey) {
        match words.split_first() {
            None => {
                self.subscribers.remove(key);
            }
            Some((word, rest)) => {
                if let Some(child) = self.children.get_mut(word) {
                    child.remove(rest, key);
                    if child.subscribers.is_empty() && child.children.is_empty() {
                        self.children.remove(word);
                    }
                }
            }
        }
    }

    fn collect(&self, topic: &[&str], out: &mut HashSet<SubscriptionKey>) {
        if let Some(hash) = self.children.get("#") {
            // `#` swallows zero or more words.
            for skip in 0..=topic.len() {
                hash.collect(&topic[skip..], out);
            }
        }
        match topic.split_first() {
            None => out.extend(self.subscribers.iter().cloned()),
            Some((first, rest)) => {
                if let Some(child) = self.children.get(*first) {
                    child.collect(rest, out);
                }
                if let Some(star) = self.children.get("*") {
                    star.collect(rest, out);
                }
            }
        }
    }
}

struct Subscriber {
    subscription: Subscription,
    outbox: Outbox,
    kind: FrameKind,
}

/// The subscription index and backlog: no actix, no I/O, time passed in.
#[derive(Default)]
pub struct PubSubCore {
    trie: TrieNode,
    exact: HashMap<String, HashSet<SubscriptionKey>>,
    subscribers: HashMap<SubscriptionKey, Subscriber>,
    backlog: VecDeque<(f64, PubSubMessage)>,
    backlog_seconds: f64,
    backlog_max: usize,
}

impl PubSubCore {
    /// An empty index retaining up to `backlog_max` messages for `backlog_seconds`.
    pub fn new(backlog_seconds: f64, backlog_max: usize) -> Self {
        PubSubCore { backlog_seconds, backlog_max, ..Default::default() }
    }

    /// Adds (or replaces) a subscription; returns the backlog it asked for.
    pub fn subscribe(
        &mut self,
        conn: ConnectionId,
        subscription: Subscription,
        outbox: Outbox,
        kind: FrameKind,
        now: f64,
    ) -> Vec<PubSubMessage> {
        let key = (conn, subscription.subscription_id.clone());
        self.unsubscribe(&key);
        for p in &subscription.patterns {
            if p.exact_match {
                self.exact.entry(p.pattern.clone()).or_default().insert(key.clone());
            } else {
                self.trie.insert(&TopicPattern::new(&p.pattern).words, key.clone());
            }
        }
        let backlog = if subscription.get_backlog {
            let since = now - subscription.backlog_seconds.max(0.0);
            self.backlog
                .iter()
                .filter(|(at, m)| *at >= since && matches_any(&subscription, &m.topic))
                .map(|(_, m)| m.clone())
                .collect()
        } else {
            Vec::new()
        };
        self.subscribers.insert(key, Subscriber { subscription, outbox, kind });
        backlog
    }

    /// Removes a subscription; whether it existed.
    pub fn unsubscribe(&mut self, key: &SubscriptionKey) -> bool {
        let Some(old) = self.subscribers.remove(key) else {
            return false;
        };
        for p in &old.subscription.patterns {
            if p.exact_match {
                if let Some(set) = self.exact.get_mut(&p.pattern) {
                    set.remove(key);
                    if set.is_empty() {
                        self.exact.remove(&p.pattern);
                    }
                }
            } else {
                self.trie.remove(&TopicPattern::new(&p.pattern).words, key);
            }
        }
        true
    }

    /// Drops every subscription of a closed connection.
    pub fn connection_closed(&mut self, conn: ConnectionId) {
        let keys: Vec<_> = self.subscribers.keys().filter(|(c, _)| *c == conn).cloned().collect();
        for key in keys {
            self.unsubscribe(&key);
        }
    }

    /// The subscriptions matching `topic`, each once.
    pub fn matching(&self, topic: &str) -> HashSet<SubscriptionKey> {
        let words: Vec<&str> = topic.split('.').collect();
        let mut out = HashSet::new();
        self.trie.collect(&words, &mut out);
        if let Some(exact) = self.exact.get(topic) {
            out.extend(exact.iter().cloned());
        }
        out
    }

    /// Retains `message` and queues one notification per matching subscription; returns
    /// (queued, dropped).
    pub fn publish(&mut self, message: PubSubMessage, now: f64) -> (usize, usize) {
        let (mut queued, mut dropped) = (0, 0);
        for key in self.matching(&message.topic) {
            let Some(sub) = self.subscribers.get(&key) else { continue };
            let frame = notification_frame(message.clone(), &key.1, sub.kind);
            if sub.outbox.try_send(frame).is_ok() {
                queued += 1;
            } else {
                dropped += 1;
            }
        }
        self.retain(message, now);
        (queued, dropped)
    }

    fn retain(&mut self, message: PubSubMessage, now: f64) {
        self.backlog.push_back((now, message));
        while self.backlog.len() > self.backlog_max
            || self.backlog.front().is_some_and(|(at, _)| now - at > self.backlog_seconds)
        {
            self.backlog.pop_front();
        }
    }
}

fn matches_any(subscription: &Subscription, topic: &str) -> bool {
    subscription.patterns.iter().any(|p| {
        if p.exact_match {
            p.pattern == topic
        } else {
            TopicPattern::new(&p.pattern).matches(topic)
        }
    })
}

/// Encodes the notification of `message` for one subscription.
pub fn notification_frame(message: PubSubMessage, subscription_id: &str, kind: FrameKind) -> OutFrame {
    OutFrame { bytes: Bytes::from(encode(&PubSubNotification::new(message, subscription_id))), kind }
}

/// Subscribe; the result is the backlog to deliver after the ack.
#[derive(Message)]
#[rtype(result = "Vec<PubSubMessage>")]
pub struct Subscribe {
    /// The subscribing connection.
    pub conn: ConnectionId,
    /// What to subscribe to.
    pub subscription: Subscription,
    /// Where notifications go.
    pub outbox: Outbox,
    /// Frame type for notifications.
    pub kind: FrameKind,
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
/// same connection arrives after them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// The message.
    pub message: PubSubMessage,
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
    /// A PubSub retaining a backlog as configured.
    pub fn new(backlog_seconds: f64, backlog_max: usize, metrics: Arc<Metrics>, guard: ChildGuard) -> Self {
        PubSub { core: PubSubCore::new(backlog_seconds, backlog_max), metrics, _guard: guard }
    }
}

impl Actor for PubSub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
    }
}

crate::supervised_child!(PubSub, "pubsub");

impl Handler<Subscribe> for PubSub {
    type Result = Vec<PubSubMessage>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Vec<PubSubMessage> {
        self.core.subscribe(msg.conn, msg.subscription, msg.outbox, msg.kind, unix_now())
    }
}

impl Handler<Unsubscribe> for PubSub {
    type Result = bool;

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) -> bool {
        self.core.unsubscribe(&(msg.conn, msg.subscription_id))
    }
}

impl Handler<Publish> for PubSub {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        let (queued, dropped) = self.core.publish(msg.message, unix_now());
        self.metrics.record_notifications(queued, dropped);
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
    use crate::protocol::TopicPatternSpec;
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

    #[test]
    fn wildcards() {
        let m = |p: &str, t: &str| TopicPattern::new(p).matches(t);
        assert!(m("demo.*", "demo.x") && !m("demo.*", "demo.x.y") && !m("demo.*", "demo"));
        assert!(m("demo.#", "demo") && m("demo.#", "demo.x.y") && m("#", "a.b"));
        assert!(m("a.#.z", "a.z") && m("a.#.z", "a.b.c.z") && !m("a.#.z", "a.b"));
        assert!(m("*.b.#", "a.b") && !m("*.b.#", "b"));
    }

    #[test]
    fn one_notification_per_subscription_and_backlog() {
        let mut core = PubSubCore::new(60.0, 100);
        let (tx, mut rx) = Outbox::channel(10, usize::MAX);
        core.subscribe(1, sub("s", &["a.*", "a.#", "#"]), tx.clone(), FrameKind::Binary, 0.0);
        assert_eq!(core.publish(msg("a.b"), 1.0), (1, 0));
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_err());
        let backlog = core.subscribe(2, sub("late", &["a.#"]), tx, FrameKind::Binary, 2.0);
        assert_eq!(backlog, vec![msg("a.b")]);
        core.connection_closed(1);
        core.connection_closed(2);
        assert!(core.matching("a.b").is_empty());
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())]
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![word(), Just("*".to_owned()), Just("#".to_owned())]
    }

    proptest! {
        /// The trie finds exactly the subscriptions whose pattern matches by the plain
        /// recursive definition.
        #[test]
        fn trie_agrees_with_matcher(
            patterns in proptest::collection::vec(proptest::collection::vec(pattern_word(), 1..5), 1..8),
            topic in proptest::collection::vec(word(), 1..6),
        ) {
            let mut core = PubSubCore::new(0.0, 0);
            let (tx, _rx) = Outbox::channel(1, usize::MAX);
            let topic = topic.join(".");
            let mut expected = HashSet::new();
            for (i, p) in patterns.iter().enumerate() {
                let p = p.join(".");
                core.subscribe(1, sub(&i.to_string(), &[&p]), tx.clone(), FrameKind::Binary, 0.0);
                if TopicPattern::new(&p).matches(&topic) {
                    expected.insert((1, i.to_string()));
                }
            }
            prop_assert_eq!(core.matching(&topic), expected);
        }
    }
}
