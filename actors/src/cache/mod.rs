//! The cache (DESIGN.md §9, issue 8): L1 memory, L2 sled, L3 the cluster.
//!
//! ```text
//! connection (role "cache") ──► cluster::route ──► LocalCache ──► L1 (quick_cache, S3-FIFO)
//!        no mailbox on the way        │                  └──────► L2 (store tree "cache")
//!                                     └─► cluster::execute (task) ──► fabric "cache-op" ──► owners
//! Cache actor (supervised): timer ──► sweep expired, sync L2 writes (group commit)
//! ```
//!
//! - [`core`] — keys, entries and versions, the bounded L1, the L2 record format,
//!   rendezvous ownership and canonical JSON. No actix, no I/O, no clock.
//! - [`local`] — this node's L1 and L2 behind striped write locks; bounds, counters.
//! - [`ops`] — one wire operation on this node's levels.
//! - [`cluster`] — L3: rendezvous owners, writes on the primary, replicas, copies and
//!   their invalidation everywhere, reads that fall back to the owners.
//! - [`rpc`] — RPC result caching: the call key, single flight.
//! - [`actor`] — the supervised housekeeper: sweeps and syncs.

pub mod actor;
pub mod cluster;
pub mod core;
pub mod local;
pub mod ops;
pub mod rpc;

pub use actor::Cache;
pub use local::{CacheLimits, Level, Levels, LocalCache};
