//! Durable, SQS-like message queues (DESIGN.md §9, issue 7).
//!
//! - [`core`] — one queue as a pure state machine: leases, redelivery, dead letters,
//!   priority, delay, dedup, TTL, broadcast and quorum delivery. No actix, no I/O, no
//!   clock: time is passed in and every mutation returns what to persist and what to push.
//!
//! The actor that owns the queues of a node, their wire roles and their persistence are
//! built on [`core::QueueCore`].

pub mod core;
