//! The backlog: recent messages kept for `get_backlog` replay, bounded in count, age and
//! bytes, replayed in pages.
//!
//! A message is kept as its encoded JSON (measured once, when it is encoded for delivery),
//! so what the bound counts is what the backlog holds: a `serde_json::Value` tree costs
//! several times its text. Messages larger than `max_message_bytes` are delivered but not
//! kept; when a new message would exceed `max_bytes` or `max_messages`, the oldest go
//! first, as do messages older than `seconds`.
//!
//! Replay is paged: a subscriber's replay scans a bounded number of messages per page (the
//! PubSub actor is never busy with one replay for long), and the next page is asked for
//! only once the previous one is in the subscriber's outbox (a replay holds at most one
//! page, whatever the backlog's size). A cursor names messages by sequence number, so
//! messages evicted between pages are skipped, never replayed twice.

use std::collections::VecDeque;

use bytes::Bytes;

/// The backlog's bounds, from the node's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogLimits {
    /// Oldest message kept (seconds).
    pub seconds: f64,
    /// Messages kept.
    pub max_messages: usize,
    /// Encoded bytes kept, all messages together.
    pub max_bytes: usize,
    /// Largest message kept (encoded bytes); larger ones are delivered, not kept.
    pub max_message_bytes: usize,
}

/// A kept message.
#[derive(Debug)]
pub struct Retained {
    seq: u64,
    at: f64,
    /// The topic (matched against the replaying subscription).
    pub topic: Box<str>,
    /// The message id (part of each notification's `u`).
    pub message_id: Box<str>,
    /// The message, encoded as JSON.
    pub encoded: Bytes,
}

/// What happened to a message offered to the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept.
    Kept,
    /// Not kept: larger than `max_message_bytes` (or than `max_bytes`).
    TooLarge,
    /// Not offered: this node does not keep messages it did not originate.
    NotOrigin,
}

/// Where a replay stands: the next sequence number to look at, the first it must not
/// (the backlog's end when the subscription was made: later messages went live), and the
/// oldest timestamp the subscriber asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayCursor {
    next: u64,
    end: u64,
    since: f64,
}

/// How much one replay page may do.
#[derive(Debug, Clone, Copy)]
pub struct PageBudget {
    /// Matching steps (see [`crate::pubsub::topic`]) before the page ends.
    pub steps: usize,
    /// Encoded bytes of matched messages before the page ends (a page always takes at
    /// least one message, so it may exceed this by one message).
    pub bytes: usize,
}

/// The retained messages, oldest first.
#[derive(Debug)]
pub struct Backlog {
    entries: VecDeque<Retained>,
    bytes: usize,
    next_seq: u64,
    limits: BacklogLimits,
}

impl Backlog {
    /// An empty backlog with these bounds.
    pub fn new(limits: BacklogLimits) -> Self {
        Backlog { entries: VecDeque::new(), bytes: 0, next_seq: 0, limits }
    }

    /// Messages kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encoded bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps a message (evicting the oldest as needed), unless it is too large.
    pub fn retain(&mut self, topic: &str, message_id: &str, encoded: Bytes, now: f64) -> Retention {
        let size = encoded.len();
        if size > self.limits.max_message_bytes || size > self.limits.max_bytes {
            self.expire(now);
            return Retention::TooLarge;
        }
        self.bytes += size;
        self.entries.push_back(Retained {
            seq: self.next_seq,
            at: now,
            topic: topic.into(),
            message_id: message_id.into(),
            encoded,
        });
        self.next_seq += 1;
        while self.entries.len() > self.limits.max_messages || self.bytes > self.limits.max_bytes {
            self.pop_oldest();
        }
        self.expire(now);
        Retention::Kept
    }

    /// Drops messages older than the retention window.
    pub fn expire(&mut self, now: f64) {
        while self.entries.front().is_some_and(|m| now - m.at > self.limits.seconds) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.entries.pop_front() {
            self.bytes -= old.encoded.len();
        }
    }

    /// A replay of everything kept since `since` (Unix seconds), up to now.
    pub fn cursor(&self, since: f64) -> ReplayCursor {
        let next = self.entries.front().map_or(self.next_seq, |m| m.seq);
        ReplayCursor { next, end: self.next_seq, since }
    }

    /// One page of a replay: the messages `wanted` (called with each topic, returning
    /// whether it matches and the steps that took) and the cursor of the next page, if
    /// any. Messages evicted since the last page are skipped.
    pub fn page(
        &self,
        cursor: &ReplayCursor,
        budget: PageBudget,
        mut wanted: impl FnMut(&str) -> (bool, usize),
    ) -> (Vec<&Retained>, Option<ReplayCursor>) {
        let first = self.entries.front().map_or(self.next_seq, |m| m.seq);
        let start = cursor.next.max(first);
        let skip = usize::try_from(start - first).unwrap_or(usize::MAX);
        let (mut found, mut steps, mut bytes) = (Vec::new(), 0, 0);
        for message in self.entries.iter().skip(skip) {
            if message.seq >= cursor.end {
                return (found, None);
            }
            if steps >= budget.steps || bytes >= budget.bytes {
                return (found, Some(ReplayCursor { next: message.seq, ..cursor.clone() }));
            }
            steps += 1;
            if message.at < cursor.since {
                continue;
            }
            let (matched, cost) = wanted(&message.topic);
            steps += cost;
            if matched {
                bytes += message.encoded.len();
                found.push(message);
            }
        }
        (found, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_messages: usize, max_bytes: usize, max_message_bytes: usize) -> BacklogLimits {
        BacklogLimits { seconds: 60.0, max_messages, max_bytes, max_message_bytes }
    }

    fn keep(backlog: &mut Backlog, topic: &str, size: usize, now: f64) -> Retention {
        backlog.retain(topic, topic, Bytes::from(vec![b'x'; size]), now)
    }

    fn topics(found: &[&Retained]) -> Vec<String> {
        found.iter().map(|m| m.topic.to_string()).collect()
    }

    const ALL: PageBudget = PageBudget { steps: usize::MAX, bytes: usize::MAX };

    #[test]
    fn bytes_count_and_age_bound_the_backlog_oldest_first() {
        let mut backlog = Backlog::new(limits(3, 100, 60));
        assert_eq!(keep(&mut backlog, "a", 40, 0.0), Retention::Kept);
        assert_eq!(keep(&mut backlog, "b", 40, 1.0), Retention::Kept);
        // Over the byte bound: the oldest goes.
        assert_eq!(keep(&mut backlog, "c", 40, 2.0), Retention::Kept);
        assert_eq!((backlog.len(), backlog.bytes()), (2, 80));
        // Larger than one message may be: delivered elsewhere, not kept, nothing evicted.
        assert_eq!(keep(&mut backlog, "big", 61, 3.0), Retention::TooLarge);
        assert_eq!((backlog.len(), backlog.bytes()), (2, 80));
        // Over the count bound.
        for (i, topic) in ["d", "e", "f"].iter().enumerate() {
            keep(&mut backlog, topic, 1, 4.0 + i as f64);
        }
        let (found, next) = backlog.page(&backlog.cursor(0.0), ALL, |_| (true, 1));
        assert_eq!((topics(&found), next), (vec!["d".into(), "e".into(), "f".into()], None));
        // Too old.
        backlog.expire(64.5);
        assert_eq!((backlog.len(), backlog.bytes()), (2, 2));
    }

    #[test]
    fn replay_pages_within_budget_and_skip_evicted_messages() {
        let mut backlog = Backlog::new(limits(100, 1000, 400));
        for (i, topic) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            keep(&mut backlog, topic, 10, i as f64);
        }
        let cursor = backlog.cursor(1.0);
        // Published after the cursor: live, not replayed.
        keep(&mut backlog, "late", 10, 9.0);
        let budget = PageBudget { steps: 4, bytes: usize::MAX };
        let (found, next) = backlog.page(&cursor, budget, |t| (t != "c", 1));
        assert_eq!(topics(&found), ["b"]);
        let next = next.expect("more to come");
        // Evictions between pages are skipped.
        for topic in ["x", "y", "z"] {
            keep(&mut backlog, topic, 330, 9.0);
        }
        let (found, next) = backlog.page(&next, ALL, |_| (true, 1));
        assert!(found.is_empty() && next.is_none(), "{:?}", topics(&found));
        // A byte budget ends a page after the message that crossed it.
        let cursor = backlog.cursor(0.0);
        let (found, next) = backlog.page(&cursor, PageBudget { steps: usize::MAX, bytes: 1 }, |_| (true, 1));
        assert_eq!((topics(&found), next.is_some()), (vec!["late".to_owned()], true));
    }
}
