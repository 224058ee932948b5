//! Describer: the one way clients' questions about the cluster reach the FabricGossip actor
//! (`cluster-status`, the discovery built-ins, the monitor's `/topology` and `/catalog`).
//!
//! Why a gate: a status request is a few dozen bytes, but its answer is built in the
//! fabric's mailbox, the same mailbox that answers probes and gossip. Without a bound, a
//! client pipelining thousands of them (or thousands of clients polling at once) queues
//! that many descriptions ahead of the probe acks, the node answers its peers late, and
//! they suspect it. With it, at most [`DESCRIBES_AT_ONCE`] descriptions are in the
//! fabric's mailbox at any time; the others wait here, in arrival order (the semaphore is
//! fair), holding no answer yet. A waiting `cluster-status` or discovery call is counted in
//! its connection's and the node's in-flight bounds, and the monitor's HTTP server
//! answers one request at a time per connection, so the waiting line is bounded too.

use std::sync::Arc;

use actix::{Handler, Message};
use tokio::sync::Semaphore;

use super::FabricGossip;
use crate::metrics::Metrics;
use crate::supervisor::Slot;

/// Descriptions in the fabric's mailbox at once (the rest wait their turn).
pub const DESCRIBES_AT_ONCE: usize = 2;

/// Asks the fabric to describe itself, at most [`DESCRIBES_AT_ONCE`] at a time node-wide;
/// cheap to clone (every clone shares the gate).
#[derive(Clone)]
pub struct Describer {
    fabric: Slot<FabricGossip>,
    gate: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Describer {
    /// A gate in front of `fabric`; waits are counted in `metrics`.
    pub fn new(fabric: Slot<FabricGossip>, metrics: Arc<Metrics>) -> Self {
        Describer { fabric, gate: Arc::new(Semaphore::new(DESCRIBES_AT_ONCE)), metrics }
    }

    /// The fabric's answer to the message `make` builds, once a place at the gate is free.
    /// `Err` when the fabric is not running.
    pub async fn ask<M>(&self, make: impl Fn() -> M) -> Result<M::Result, actix::MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        FabricGossip: Handler<M>,
    {
        let permit = match self.gate.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                self.metrics.describe_waited();
                // The semaphore is never closed.
                self.gate.acquire().await.map_err(|_| actix::MailboxError::Closed)?
            }
        };
        let answer = self.fabric.send(make).await;
        drop(permit);
        answer
    }

    /// Whether the fabric is running (its address is published).
    pub fn is_running(&self) -> bool {
        self.fabric.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn asks_beyond_the_gate_wait_and_are_counted_and_a_stopped_fabric_is_an_error() {
        let metrics = Arc::new(Metrics::default());
        let describer = Describer::new(Slot::default(), metrics.clone());
        assert!(!describer.is_running());
        // Hold every place: the next ask waits (and is counted) instead of reaching the fabric.
        let held = describer.gate.clone().acquire_many_owned(DESCRIBES_AT_ONCE as u32).await.unwrap();
        let waiting = {
            let describer = describer.clone();
            tokio::spawn(async move { describer.ask(|| super::super::DescribeCatalog).await.is_err() })
        };
        while metrics.describes_waited() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        drop(held);
        assert!(waiting.await.unwrap(), "no fabric: the ask fails once let through");
        assert_eq!(describer.gate.available_permits(), DESCRIBES_AT_ONCE);
    }
}
