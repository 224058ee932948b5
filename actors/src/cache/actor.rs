//! The supervised `Cache` actor: the cache's housekeeping.
//!
//! Who sends to it: its own timer and the supervisor; nobody on the request path. Reads
//! and writes go straight to the shared [`LocalCache`] from the connection's thread (no
//! mailbox round trip: see DESIGN.md §4); what needs a clock runs here, every
//! `cache_sweep_interval_s`:
//!
//! - **sweep**: expired L1 entries are dropped and up to [`SWEEP_BATCH`] L2 records are
//!   examined (a cursor walks the tree across ticks), expired ones deleted. A read never
//!   serves an expired entry whether or not the sweep has reached it;
//! - **sync**: if L2 was written since the last tick, one group-commit sync makes those
//!   writes durable, so a restart (even `kill -9`) loses at most one interval of writes.
//!
//! **What a restart of the actor loses:** the sweep cursor (it starts over). The cache
//! itself belongs to the node, created before the supervision tree, like the store.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, WrapFuture};
use tracing::warn;

use super::local::LocalCache;
use crate::supervisor::ChildGuard;
use crate::unix_now;

/// L2 records examined per sweep tick.
pub const SWEEP_BATCH: usize = 4096;

/// The supervised housekeeper of the node's cache.
pub struct Cache {
    cache: Arc<LocalCache>,
    interval: Duration,
    cursor: Option<Vec<u8>>,
    _guard: ChildGuard,
}

impl Cache {
    /// A housekeeper for `cache`, ticking every `interval`.
    pub fn new(cache: Arc<LocalCache>, interval: Duration, guard: ChildGuard) -> Self {
        Cache { cache, interval, cursor: None, _guard: guard }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        match self.cache.sweep(self.cursor.take(), SWEEP_BATCH, unix_now()) {
            Ok(cursor) => self.cursor = cursor,
            Err(e) => warn!(cause = %e, "cache sweep failed"),
        }
        let cache = self.cache.clone();
        ctx.spawn(async move { cache.sync().await }.into_actor(self));
    }
}

impl Actor for Cache {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.tick(ctx));
    }
}

crate::supervised_child!(Cache, "cache");
