//! The inside of an MPREG node: one actor per file, each a thin actix shell around a
//! plain core that unit tests drive directly.
//!
//! - [`protocol`] — wire types and codec.
//! - [`supervisor`] — restarts crashed children, escalates, logs every lifecycle event.
//! - [`connection`] — one actor per websocket; runs each request as a task on its thread.
//! - [`registry`] — the function table, published as a lock-free snapshot.
//! - [`planner`] — request -> DAG -> dispatch -> response.
//! - [`fabric`] — peer links, gossip membership and catalog, multi-hop messages.
//! - [`federation`] — clusters bridged by signed path-vector routes: keys, policies, route table.
//! - [`routing`] — which function on which node a command runs on.
//! - [`pubsub`] — AMQP-style topics with backlog replay, flooded across nodes.
//! - [`outbox`] — a connection's outgoing queue, bounded in bytes; backpressure on reads.
//! - [`queue`] — SQS-like queues: leases, redelivery, dead letters, durable records.
//! - [`cache`] — L1 memory, L2 sled, L3 the cluster (rendezvous owners, invalidation everywhere).
//! - [`persistence`] — the node's key-value store (sled or memory), durable group commit.
//! - [`metrics`] — node-wide counters every actor updates and the monitor renders.
//! - [`monitor`] — `/health`, `/metrics`, `/actors`, `/topology`, `/catalog`.
//! - [`worker`] — processes in any language serving functions over the websocket.
//! - [`function`], [`version`] — what a registered function is, and version matching.

pub mod cache;
pub mod connection;
pub mod discovery;
pub mod fabric;
pub mod federation;
pub mod function;
pub mod mailbox;
pub mod metrics;
pub mod monitor;
pub mod outbox;
pub mod persistence;
pub mod planner;
pub mod protocol;
pub mod pubsub;
pub mod queue;
pub mod registry;
pub mod routing;
pub mod supervisor;
pub mod version;
pub mod worker;

/// Wall-clock Unix time in seconds: timestamps on the wire (not for measuring durations).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Wall-clock Unix time in whole milliseconds (federation route epochs and expiry).
pub fn unix_now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
