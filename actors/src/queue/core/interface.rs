//! The values that cross the core's boundary: ids, the queue's config, what a send
//! carries, what a consumer gets, the durable records and writes, errors and stats. All
//! of them are plain data; the config, records, writes, errors and stats are serde types
//! because they travel on the wire or go to disk.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most messages one `receive` hands out, whatever `max` it asks for.
pub const MAX_RECEIVE_BATCH: usize = 1000;
/// Suffix of a queue's dead-letter queue name (`NAME.dlq`); refused in queue names.
pub const DLQ_SUFFIX: &str = ".dlq";

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s.into())
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                String::deserialize(d).map(Self::from)
            }
        }
    };
}

string_newtype!(
    /// A message's id, chosen by the actor (unique per queue; it survives restarts).
    MessageId
);
string_newtype!(
    /// A consumer, opaque to the core (the actor maps connections and nodes to these).
    ConsumerId
);
string_newtype!(
    /// A message's body: JSON text, validated by the caller; the core never parses it.
    Payload
);

/// What went wrong, by what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum QueueError {
    /// The queue holds `max_messages` (dead letters included): retry later.
    #[error("queue full: {max} messages")]
    Full {
        /// The queue's `max_messages`.
        max: usize,
    },
    /// The node's queues together hold their bound (`queue_max_bytes`): retry later.
    #[error("the node's queues hold {max_bytes} bytes of messages (queue_max_bytes): retry later")]
    NodeFull {
        /// The node's `queue_max_bytes`.
        max_bytes: u64,
    },
    /// The payload is larger than `max_message_bytes`.
    #[error("message too large: {bytes} bytes > max {max}")]
    TooLarge {
        /// The payload's size.
        bytes: usize,
        /// The queue's `max_message_bytes`.
        max: usize,
    },
    /// No message with this id is in the queue (acked, expired, or never sent).
    #[error("unknown message {0}")]
    UnknownMessage(String),
    /// The message exists but this consumer holds no lease on it (it expired, or another
    /// consumer holds it, or it is a dead letter).
    #[error("no lease on message {id} for consumer {consumer}")]
    UnknownLease {
        /// The message.
        id: String,
        /// The consumer that asked.
        consumer: String,
    },
    /// A queue configuration was refused.
    #[error("bad queue config: {0}")]
    BadConfig(String),
    /// A request's arguments were refused (negative delay, quorum(0), an id in use...).
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, QueueError>;

/// A queue's settings; travels on the wire (`queue-declare`) and is persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// The queue's name: 1..=200 bytes of `[A-Za-z0-9_.-]`, not ending in `.dlq`.
    pub name: String,
    /// Persist messages (false: in memory only, no writes at all).
    pub durable: bool,
    /// Most messages held, dead letters included.
    pub max_messages: usize,
    /// Largest payload, in bytes of JSON text.
    pub max_message_bytes: usize,
    /// Seconds a delivered message stays leased before it is visible again.
    pub visibility_timeout: f64,
    /// Deliveries without an ack before a message is dead-lettered (>= 1).
    pub max_receives: u32,
    /// Seconds during which a send with the same dedup key is a duplicate (0 = off).
    pub dedup_window: f64,
    /// Seconds a message lives before it is removed unread (None = forever).
    pub message_ttl: Option<f64>,
    /// Seconds a quorum message waits for enough subscribers before it is dead-lettered.
    pub quorum_wait: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            durable: true,
            max_messages: 100_000,
            max_message_bytes: 256 * 1024,
            visibility_timeout: 30.0,
            max_receives: 5,
            dedup_window: 300.0,
            message_ttl: None,
            quorum_wait: 30.0,
        }
    }
}

/// Upper bound of every duration setting: a week.
pub(super) const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

impl QueueConfig {
    /// A config with defaults and this name.
    pub fn named(name: &str) -> Self {
        Self { name: name.to_owned(), ..Self::default() }
    }

    /// Checks every field; the error names the first one refused.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(QueueError::BadConfig(m));
        let n = &self.name;
        if n.is_empty() || n.len() > 200 {
            return bad(format!("name must be 1..=200 bytes, got {}", n.len()));
        }
        if let Some(c) = n.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
            return bad(format!("name {n:?}: character {c:?} not allowed (use A-Z a-z 0-9 _ . -)"));
        }
        if n.ends_with(DLQ_SUFFIX) {
            return bad(format!("name {n:?}: the suffix {DLQ_SUFFIX} names dead-letter queues"));
        }
        if !(1..=10_000_000).contains(&self.max_messages) {
            return bad(format!("max_messages must be 1..=10000000, got {}", self.max_messages));
        }
        if !(1..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return bad(format!("max_message_bytes must be 1..=67108864, got {}", self.max_message_bytes));
        }
        if self.max_receives == 0 {
            return bad("max_receives must be at least 1".into());
        }
        let seconds = |field: &str, v: f64, zero_ok: bool| -> Result<()> {
            if !v.is_finite() || v < 0.0 || (v == 0.0 && !zero_ok) || v > MAX_SECONDS {
                let low = if zero_ok { "0" } else { "more than 0" };
                return bad(format!("{field} must be {low} and at most {MAX_SECONDS} seconds, got {v}"));
            }
            Ok(())
        };
        seconds("visibility_timeout", self.visibility_timeout, false)?;
        seconds("dedup_window", self.dedup_window, true)?;
        seconds("quorum_wait", self.quorum_wait, true)?;
        if let Some(ttl) = self.message_ttl {
            seconds("message_ttl", ttl, false)?;
        }
        Ok(())
    }
}

/// How a message is delivered and when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// One consumer, no ack, no redelivery, never persisted.
    FireAndForget,
    /// One consumer at a time; redelivered until acked or dead-lettered.
    #[default]
    AtLeastOnce,
    /// Every subscriber present at delivery; done when each acked.
    Broadcast,
    /// Done after this many distinct subscribers acked.
    Quorum(u32),
}

impl Guarantee {
    /// Delivered in rounds to every subscriber (broadcast, quorum).
    pub(super) fn is_group(self) -> bool {
        matches!(self, Guarantee::Broadcast | Guarantee::Quorum(_))
    }
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Its id (the actor makes it unique, e.g. node instance + counter).
    pub id: MessageId,
    /// Its body (JSON text).
    pub payload: Payload,
    /// How it is delivered.
    pub guarantee: Guarantee,
    /// Higher first; FIFO within a priority.
    pub priority: i32,
    /// Seconds before it becomes visible.
    pub delay: f64,
    /// Dedup key; None: the payload's SHA-256.
    pub dedup_id: Option<String>,
}

impl NewMessage {
    /// An at-least-once message with priority 0, no delay, content dedup.
    pub fn new(id: impl Into<MessageId>, payload: impl Into<Payload>) -> Self {
        Self {
            id: id.into(),
            payload: payload.into(),
            guarantee: Guarantee::AtLeastOnce,
            priority: 0,
            delay: 0.0,
            dedup_id: None,
        }
    }
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Accepted.
    Enqueued,
    /// A duplicate within the dedup window of this earlier message: nothing changed.
    Duplicate(MessageId),
}

/// A message handed to a consumer: the reply to a `receive`, or a push to a subscriber.
/// The pair (consumer, id) is the lease: ack and nack name it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Who gets it.
    pub consumer: ConsumerId,
    /// The message.
    pub id: MessageId,
    /// Its body.
    pub payload: Payload,
    /// Its guarantee (fire-and-forget needs no ack).
    pub guarantee: Guarantee,
    /// Its priority.
    pub priority: i32,
    /// Deliveries so far, this one included (for broadcast/quorum: rounds so far).
    pub receive_count: u32,
    /// When the lease ends (None for fire-and-forget).
    pub lease_until: Option<f64>,
    /// Why it was dead-lettered, for a delivery from the dead-letter queue (`NAME.dlq`).
    pub dead: Option<DeadLetterInfo>,
}

/// Why and when a message was dead-lettered (persisted with it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterInfo {
    /// Why, e.g. `max receives (5) reached`.
    pub reason: String,
    /// When (Unix seconds).
    pub at: f64,
}

/// The record that survives a restart (one per message, key = its id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its id.
    pub id: MessageId,
    /// Its body.
    pub payload: Payload,
    /// Its guarantee.
    pub guarantee: Guarantee,
    /// Its priority.
    pub priority: i32,
    /// Order of arrival (FIFO within a priority); kept across restarts.
    pub seq: u64,
    /// When it was sent.
    pub enqueued_at: f64,
    /// When it is (or was) visible.
    pub visible_at: f64,
    /// When its TTL ends.
    pub expires_at: Option<f64>,
    /// Deliveries so far.
    pub receive_count: u32,
    /// Its dedup key.
    pub dedup_key: Option<String>,
    /// Set when it is a dead letter.
    pub dead: Option<DeadLetterInfo>,
}

/// One write the actor must make durable, in order, before acknowledging the call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueWrite {
    /// Insert or replace the record of this message.
    Upsert(StoredMessage),
    /// Delete the record of this message.
    Remove(MessageId),
    /// Insert or replace the queue's config.
    Config(QueueConfig),
}

/// What a call returns: its value, the writes to persist, the pushes to make. Writes and
/// pushes are valid even when the value is an error (timers that came due).
#[derive(Debug, Clone, PartialEq)]
pub struct Step<T> {
    /// The answer.
    pub value: T,
    /// Persist these, in order, before answering the caller.
    pub writes: Vec<QueueWrite>,
    /// Push these to their subscribers.
    pub pushes: Vec<Delivery>,
}

/// A dead letter, as `dlq NAME` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message.
    pub id: MessageId,
    /// Its body.
    pub payload: Payload,
    /// Its guarantee.
    pub guarantee: Guarantee,
    /// Deliveries it had.
    pub receive_count: u32,
    /// Why and when.
    pub info: DeadLetterInfo,
}

/// Gauges and counters for `stats` and `/metrics` (counters restart at zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Visible messages, ready for a consumer (the queue's depth).
    pub visible: usize,
    /// Messages waiting for their delay.
    pub delayed: usize,
    /// Quorum messages waiting for enough subscribers.
    pub waiting_quorum: usize,
    /// At-least-once messages leased to a consumer.
    pub leased: usize,
    /// Broadcast and quorum messages in a delivery round.
    pub in_round: usize,
    /// Dead letters.
    pub dead_letters: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Messages accepted.
    pub sent_total: u64,
    /// Sends answered as duplicates.
    pub duplicates_total: u64,
    /// Deliveries made (each copy and each redelivery counts).
    pub delivered_total: u64,
    /// Messages completed by acks.
    pub acked_total: u64,
    /// Messages made visible again after a lease or round ended without completion.
    pub redelivered_total: u64,
    /// Messages dead-lettered.
    pub dead_lettered_total: u64,
    /// Messages removed by their TTL.
    pub expired_total: u64,
}
