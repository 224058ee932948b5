//! Durable, SQS-like message queues (DESIGN.md §9, issue 7).
//!
//! - [`core`] — one queue as a pure state machine: leases, redelivery, dead letters,
//!   priority, delay, dedup, TTL, broadcast and quorum delivery. No actix, no I/O, no
//!   clock: time is passed in and every mutation returns what to persist and what to push.
//! - [`actor`] — the supervised `Queue` actor: every queue of the node, its persistence
//!   (group commit, acks after the commit), consumers, subscriptions, long-polls, timers.

pub mod actor;
pub mod core;

pub use actor::{ConnectionGone, Queue, QueueBoard, QueueCall, QueueLimits, QueueSummary};
