//! The cache (DESIGN.md §9, issue 8): L1 memory, L2 sled, L3 the cluster.
//!
//! - [`core`] — keys, entries and versions, the bounded L1, the L2 record format,
//!   rendezvous ownership and canonical JSON. No actix, no I/O, no clock.

pub mod core;
