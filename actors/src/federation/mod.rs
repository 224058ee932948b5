//! Federation: clusters bridged by signed path-vector routes (DESIGN.md §8, "Federation",
//! "Route security", "Route policies").
//!
//! Destinations are **clusters**. Each cluster announces itself to its neighbour clusters
//! and re-announces, hop by hop, the best route it holds to every other cluster, with its
//! own cluster prepended to the path; a receiver drops any path that already contains it
//! (loop prevention). Every announcement and withdrawal is signed by the cluster that
//! emits it, with a route key that chains to that cluster's pinned authority; nothing is
//! trusted because a message carries its own key.
//!
//! This module is the pure core (no actix, no I/O, time passed in), in the order an update
//! flows through it:
//!
//! - [`keys`] — route keys, rotation records signed by the previous key, the ring of keys
//!   trusted per cluster with the overlap window, the route key file.
//! - [`update`] — announcements and withdrawals, their canonical encoding, signing and
//!   opening (size, shape, advertiser, signature), time-based epochs.
//! - [`policy`] — import policies per neighbour, global and per-neighbour export.
//! - [`table`] — the route table: the import pipeline (expiry, loop, path checks, stale
//!   epoch, policy, hold-down, flap suppression), best-path selection by a documented
//!   score, explanations, what to announce to each neighbour, next hops for calls.
//! - [`core`] — one cluster's federation state machine tying them together: links per
//!   neighbour cluster, receiving updates and key chains, what to send each neighbour,
//!   withdrawal when the last link to a neighbour drops, snapshots.
//! - [`simulation`] — several clusters' cores wired in memory (tests, `mpreg bench
//!   federation --simulate N`).
//!
//! Every refusal has a [`RouteRejection`] reason; [`RejectionLog`] counts them and says
//! when a reason is seen for the first time, so the node logs each reason once and
//! exports the counts in `/metrics`.

pub mod core;
pub mod keys;
pub mod policy;
pub mod simulation;
pub mod table;
pub mod update;

use std::collections::BTreeMap;

/// A cluster's id (`cluster_id` in settings).
pub type ClusterId = String;

/// Why a route update was refused. [`RouteRejection::as_str`] is its metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteRejection {
    /// Not the documented shape, or over a size bound.
    Malformed,
    /// No signature.
    Unsigned,
    /// The sending cluster has no pinned authority.
    NotPinned,
    /// Signed by a key not chained to the sender's authority.
    UnknownKey,
    /// Signed by a rotated-out key after its overlap window.
    RetiredKey,
    /// The signature does not verify (forged or altered).
    BadSignature,
    /// The advertiser is not the neighbour cluster that delivered it.
    WrongAdvertiser,
    /// Its time to live has run out.
    Expired,
    /// The path is empty.
    EmptyPath,
    /// The path does not start with the advertiser.
    AdvertiserMismatch,
    /// The path does not end with the destination.
    DestinationMismatch,
    /// The path already contains this cluster, or a cluster twice.
    Loop,
    /// The path is longer than `max_path_len`.
    PathTooLong,
    /// Its epoch is not newer than the last one from that neighbour for that destination
    /// (a replay or a reordering).
    StaleEpoch,
    /// The import policy refuses it.
    Policy,
    /// The route was withdrawn recently and is held down.
    HoldDown,
    /// The route flapped too often and is suppressed.
    Suppressed,
    /// The table holds `max_destinations` already.
    TableFull,
}

impl RouteRejection {
    /// The `reason` label in `/metrics` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRejection::Malformed => "malformed",
            RouteRejection::Unsigned => "unsigned",
            RouteRejection::NotPinned => "not_pinned",
            RouteRejection::UnknownKey => "unknown_key",
            RouteRejection::RetiredKey => "retired_key",
            RouteRejection::BadSignature => "bad_signature",
            RouteRejection::WrongAdvertiser => "wrong_advertiser",
            RouteRejection::Expired => "expired",
            RouteRejection::EmptyPath => "empty_path",
            RouteRejection::AdvertiserMismatch => "advertiser_mismatch",
            RouteRejection::DestinationMismatch => "destination_mismatch",
            RouteRejection::Loop => "loop",
            RouteRejection::PathTooLong => "path_too_long",
            RouteRejection::StaleEpoch => "stale_epoch",
            RouteRejection::Policy => "policy",
            RouteRejection::HoldDown => "hold_down",
            RouteRejection::Suppressed => "suppressed",
            RouteRejection::TableFull => "table_full",
        }
    }
}

impl std::fmt::Display for RouteRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts refusals by reason.
#[derive(Debug, Clone, Default)]
pub struct RejectionLog {
    counts: BTreeMap<RouteRejection, u64>,
}

impl RejectionLog {
    /// Counts one refusal; `true` the first time this reason is seen (log it then).
    pub fn record(&mut self, reason: RouteRejection) -> bool {
        let count = self.counts.entry(reason).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// `(label, count)` for every reason seen, in a stable order.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().map(|(reason, count)| (reason.as_str(), *count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_is_first_once_and_counted() {
        let mut log = RejectionLog::default();
        assert!(log.record(RouteRejection::Loop));
        assert!(!log.record(RouteRejection::Loop));
        assert!(log.record(RouteRejection::BadSignature));
        let counts: Vec<_> = log.counts().collect();
        assert_eq!(counts, vec![("bad_signature", 1), ("loop", 2)]);
    }
}
