//! Route announcements and withdrawals, their canonical encoding and their signatures.
//!
//! An update travels as a [`SignedRouteUpdate`]: `body` is the JSON text of a
//! [`RouteUpdate`] exactly as the emitting cluster signed it (struct fields in declaration
//! order, no whitespace, tags sorted — serde's output for these types, so the same update
//! always encodes to the same bytes), `key_id` names the route key that signed it and
//! `signature` is ed25519 over `body`'s bytes. A receiver checks the signature against
//! the keys it trusts for the cluster that sent it ([`super::keys::RouteKeyRing`]), before
//! it looks at anything else the body says; nothing is re-serialised before verifying.
//!
//! Epochs are time-based ([`EpochClock`]: Unix milliseconds, strictly increasing per
//! emitter), so a restarted cluster's first announcement is newer than anything it sent
//! before and is accepted at once, while a replayed older one is refused as stale.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::keys::{KeyRejection, RouteKeyRing, RouteSigner};
use super::{ClusterId, RouteRejection};

/// Largest signed update body, in bytes.
pub const MAX_UPDATE_BYTES: usize = 16 * 1024;
/// Most clusters in a path on the wire (the table's `max_path_len` may be smaller).
pub const MAX_WIRE_PATH: usize = 64;
/// Most tags on one announcement.
pub const MAX_TAGS: usize = 32;
/// Longest cluster id or tag, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A path's quality. Accumulated hop by hop: hops and latency and cost add up, bandwidth
/// and reliability take the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RouteMetrics {
    /// Links crossed from the receiver to the destination.
    pub hop_count: u32,
    /// Sum of link latencies.
    pub latency_ms: f64,
    /// Narrowest link (0 = unknown).
    pub bandwidth_mbps: u64,
    /// Least reliable link, 0..=1.
    pub reliability: f64,
    /// Sum of link costs.
    pub cost: f64,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        RouteMetrics { hop_count: 0, latency_ms: 0.0, bandwidth_mbps: 0, reliability: 1.0, cost: 0.0 }
    }
}

impl RouteMetrics {
    /// These metrics one link further away.
    pub fn extend(&self, link: &RouteMetrics) -> RouteMetrics {
        let bandwidth_mbps = match (self.bandwidth_mbps, link.bandwidth_mbps) {
            (0, b) | (b, 0) => b,
            (a, b) => a.min(b),
        };
        RouteMetrics {
            hop_count: self.hop_count.saturating_add(1),
            latency_ms: self.latency_ms + link.latency_ms,
            bandwidth_mbps,
            reliability: self.reliability.min(link.reliability),
            cost: self.cost + link.cost,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_non_negative(self.latency_ms) || !finite_non_negative(self.cost) {
            return Err("latency_ms and cost must be finite and not negative".into());
        }
        if !(0.0..=1.0).contains(&self.reliability) {
            return Err("reliability must be within 0..=1".into());
        }
        Ok(())
    }
}

/// "Cluster `destination` is reachable through me along `path`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteAnnouncement {
    /// The cluster this route reaches.
    pub destination: ClusterId,
    /// Clusters from the advertiser (first) to the destination (last).
    pub path: Vec<ClusterId>,
    /// Quality of the path as seen by the advertiser.
    pub metrics: RouteMetrics,
    /// The cluster that emitted (and signed) this announcement.
    pub advertiser: ClusterId,
    /// Time-based, strictly increasing per advertiser ([`EpochClock`]).
    pub epoch: u64,
    /// When it was emitted (Unix milliseconds).
    pub advertised_at_ms: u64,
    /// How long it stays valid after `advertised_at_ms`.
    pub ttl_ms: u64,
    /// Labels import and export policies filter on.
    pub tags: BTreeSet<String>,
}

/// "Forget the route to `destination` I announced."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteWithdrawal {
    /// The cluster no longer reachable through the advertiser.
    pub destination: ClusterId,
    /// The withdrawn path, advertiser first.
    pub path: Vec<ClusterId>,
    /// The cluster that emitted (and signed) it.
    pub advertiser: ClusterId,
    /// Time-based, strictly increasing per advertiser.
    pub epoch: u64,
    /// When (Unix milliseconds).
    pub withdrawn_at_ms: u64,
}

/// One update between clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouteUpdate {
    /// A route is (still) available.
    Announce(RouteAnnouncement),
    /// A route went away.
    Withdraw(RouteWithdrawal),
}

impl RouteUpdate {
    /// Who emitted it.
    pub fn advertiser(&self) -> &str {
        match self {
            RouteUpdate::Announce(a) => &a.advertiser,
            RouteUpdate::Withdraw(w) => &w.advertiser,
        }
    }

    /// Which destination it is about.
    pub fn destination(&self) -> &str {
        match self {
            RouteUpdate::Announce(a) => &a.destination,
            RouteUpdate::Withdraw(w) => &w.destination,
        }
    }

    /// Its epoch.
    pub fn epoch(&self) -> u64 {
        match self {
            RouteUpdate::Announce(a) => a.epoch,
            RouteUpdate::Withdraw(w) => w.epoch,
        }
    }

    /// Its path, advertiser first.
    pub fn path(&self) -> &[ClusterId] {
        match self {
            RouteUpdate::Announce(a) => &a.path,
            RouteUpdate::Withdraw(w) => &w.path,
        }
    }

    /// The canonical bytes that are signed and sent.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Signs this update with the emitting cluster's current route key.
    pub fn sign(&self, signer: &RouteSigner) -> SignedRouteUpdate {
        let body = self.encode();
        let signature = signer.sign_hex(body.as_bytes());
        SignedRouteUpdate { body, key_id: signer.key_id().to_owned(), signature }
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = |n: &str| !n.is_empty() && n.len() <= MAX_NAME_BYTES;
        if self.path().len() > MAX_WIRE_PATH {
            return Err(format!("path longer than {MAX_WIRE_PATH}"));
        }
        if !name_ok(self.advertiser()) || !name_ok(self.destination()) || !self.path().iter().all(|c| name_ok(c)) {
            return Err(format!("cluster ids must be 1..={MAX_NAME_BYTES} bytes"));
        }
        if let RouteUpdate::Announce(a) = self {
            a.metrics.validate()?;
            if a.tags.len() > MAX_TAGS || !a.tags.iter().all(|t| name_ok(t)) {
                return Err(format!("at most {MAX_TAGS} tags of 1..={MAX_NAME_BYTES} bytes"));
            }
        }
        Ok(())
    }
}

/// An update as it travels between clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedRouteUpdate {
    /// JSON text of a [`RouteUpdate`], exactly as signed.
    pub body: String,
    /// The route key that signed it (empty = unsigned).
    #[serde(default)]
    pub key_id: String,
    /// ed25519 signature over `body` (hex; empty = unsigned).
    #[serde(default)]
    pub signature: String,
}

impl SignedRouteUpdate {
    /// Checks and parses an update received from a neighbour in cluster `neighbor`: size
    /// and shape, that `neighbor` emitted it (advertiser), and its signature under the
    /// keys `ring` trusts for `neighbor` at `now_s`.
    pub fn open(&self, neighbor: &str, ring: &RouteKeyRing, now_s: u64) -> Result<RouteUpdate, RouteRejection> {
        if self.body.len() > MAX_UPDATE_BYTES {
            return Err(RouteRejection::Malformed);
        }
        if self.signature.is_empty() || self.key_id.is_empty() {
            return Err(RouteRejection::Unsigned);
        }
        let update: RouteUpdate = serde_json::from_str(&self.body).map_err(|_| RouteRejection::Malformed)?;
        update.validate().map_err(|_| RouteRejection::Malformed)?;
        if update.advertiser() != neighbor {
            return Err(RouteRejection::WrongAdvertiser);
        }
        ring.verify(neighbor, &self.key_id, self.body.as_bytes(), &self.signature, now_s).map_err(|e| match e {
            KeyRejection::NotPinned => RouteRejection::NotPinned,
            KeyRejection::UnknownKey => RouteRejection::UnknownKey,
            KeyRejection::RetiredKey => RouteRejection::RetiredKey,
            KeyRejection::BadSignature => RouteRejection::BadSignature,
        })?;
        Ok(update)
    }
}

/// Time-based epochs: Unix milliseconds, but always one more than the last when the clock
/// has not moved (or moved back).
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochClock {
    last: u64,
}

impl EpochClock {
    /// The next epoch at `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        self.last = now_ms.max(self.last.saturating_add(1));
        self.last
    }

    /// The last epoch handed out.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Never hands out `epoch` or anything below it again (restored from a snapshot).
    pub fn raise_to(&mut self, epoch: u64) {
        self.last = self.last.max(epoch);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fabric::trust::Authority;

    const NOW_S: u64 = 1_800_000_000;

    fn announcement(advertiser: &str, path: &[&str]) -> RouteAnnouncement {
        RouteAnnouncement {
            destination: path.last().unwrap_or(&"x").to_string(),
            path: path.iter().map(|c| c.to_string()).collect(),
            metrics: RouteMetrics::default(),
            advertiser: advertiser.into(),
            epoch: 7,
            advertised_at_ms: NOW_S * 1000,
            ttl_ms: 30_000,
            tags: ["gold".to_string()].into(),
        }
    }

    fn keyed(cluster: &str) -> (RouteSigner, RouteKeyRing) {
        let authority = Authority::generate();
        let signer = RouteSigner::first(&authority, cluster, NOW_S);
        let mut ring = RouteKeyRing::default();
        ring.pin(cluster, authority.public_key());
        ring.learn_chain(signer.chain()).unwrap();
        (signer, ring)
    }

    #[test]
    fn canonical_encoding_is_stable() {
        let update = RouteUpdate::Announce(announcement("b", &["b", "c"]));
        assert_eq!(
            update.encode(),
            r#"{"kind":"announce","destination":"c","path":["b","c"],"metrics":{"hop_count":0,"latency_ms":0.0,"bandwidth_mbps":0,"reliability":1.0,"cost":0.0},"advertiser":"b","epoch":7,"advertised_at_ms":1800000000000,"ttl_ms":30000,"tags":["gold"]}"#
        );
        let withdrawal = RouteUpdate::Withdraw(RouteWithdrawal {
            destination: "c".into(),
            path: vec!["b".into(), "c".into()],
            advertiser: "b".into(),
            epoch: 8,
            withdrawn_at_ms: 5,
        });
        assert_eq!(
            withdrawal.encode(),
            r#"{"kind":"withdraw","destination":"c","path":["b","c"],"advertiser":"b","epoch":8,"withdrawn_at_ms":5}"#
        );
    }

    #[test]
    fn signed_updates_open_only_from_their_advertiser_with_a_trusted_key() {
        let (signer, ring) = keyed("b");
        let signed = RouteUpdate::Announce(announcement("b", &["b", "c"])).sign(&signer);
        assert!(signed.open("b", &ring, NOW_S).is_ok());
        // Relayed by someone else, or claimed by another cluster.
        assert_eq!(signed.open("c", &ring, NOW_S), Err(RouteRejection::WrongAdvertiser));
        // Unsigned.
        let unsigned = SignedRouteUpdate { signature: String::new(), ..signed.clone() };
        assert_eq!(unsigned.open("b", &ring, NOW_S), Err(RouteRejection::Unsigned));
        // Forged: the body changed after signing.
        let forged = SignedRouteUpdate { body: signed.body.replace("\"epoch\":7", "\"epoch\":9"), ..signed.clone() };
        assert_eq!(forged.open("b", &ring, NOW_S), Err(RouteRejection::BadSignature));
        // A key the ring does not know (self-made, not chained to the authority).
        let (stranger, _) = keyed("b");
        let other = RouteUpdate::Announce(announcement("b", &["b"])).sign(&stranger);
        assert_eq!(other.open("b", &ring, NOW_S), Err(RouteRejection::UnknownKey));
        // Not pinned at all.
        let (c_signer, _) = keyed("c");
        let from_c = RouteUpdate::Announce(announcement("c", &["c"])).sign(&c_signer);
        assert_eq!(from_c.open("c", &ring, NOW_S), Err(RouteRejection::NotPinned));
    }

    #[test]
    fn hostile_bodies_are_malformed_not_panics() {
        let (signer, ring) = keyed("b");
        let sign = |body: String| SignedRouteUpdate {
            signature: signer.sign_hex(body.as_bytes()),
            key_id: signer.key_id().into(),
            body,
        };
        let huge = sign("x".repeat(MAX_UPDATE_BYTES + 1));
        assert_eq!(huge.open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
        let long_path: Vec<String> = (0..=MAX_WIRE_PATH).map(|i| format!("c{i}")).collect();
        let mut a = announcement("b", &["b"]);
        a.path = long_path;
        assert_eq!(sign(RouteUpdate::Announce(a).encode()).open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
        let mut a = announcement("b", &["b", "c"]);
        a.metrics.reliability = 2.0;
        assert_eq!(sign(RouteUpdate::Announce(a).encode()).open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
        let mut a = announcement("b", &["b", "c"]);
        a.tags = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert_eq!(sign(RouteUpdate::Announce(a).encode()).open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
        assert_eq!(sign("{\"kind\":\"nope\"}".into()).open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
        let mut a = announcement("b", &["b", ""]);
        a.destination = String::new();
        assert_eq!(sign(RouteUpdate::Announce(a).encode()).open("b", &ring, NOW_S), Err(RouteRejection::Malformed));
    }

    #[test]
    fn epochs_increase_even_when_the_clock_does_not() {
        let mut clock = EpochClock::default();
        assert_eq!(clock.next(1000), 1000);
        assert_eq!(clock.next(1000), 1001);
        assert_eq!(clock.next(900), 1002);
        assert_eq!(clock.next(5000), 5000);
        clock.raise_to(9000);
        assert_eq!(clock.next(5001), 9001);
        assert_eq!(clock.last(), 9001);
    }

    #[test]
    fn metrics_extend_adds_and_takes_minimums() {
        let route = RouteMetrics { hop_count: 1, latency_ms: 5.0, bandwidth_mbps: 100, reliability: 0.9, cost: 1.0 };
        let link = RouteMetrics { hop_count: 0, latency_ms: 2.0, bandwidth_mbps: 0, reliability: 0.95, cost: 0.5 };
        let out = route.extend(&link);
        assert_eq!(
            out,
            RouteMetrics { hop_count: 2, latency_ms: 7.0, bandwidth_mbps: 100, reliability: 0.9, cost: 1.5 }
        );
        let narrower = RouteMetrics { bandwidth_mbps: 10, ..link };
        assert_eq!(route.extend(&narrower).bandwidth_mbps, 10);
    }

    proptest! {
        #[test]
        fn any_update_round_trips_and_verifies(
            path in proptest::collection::vec("[a-z]{1,8}", 1..10),
            epoch in any::<u64>(),
            latency in 0.0f64..1e6,
            reliability in 0.0f64..=1.0,
            tags in proptest::collection::btree_set("[a-z]{1,6}", 0..5),
            withdraw in any::<bool>(),
        ) {
            let (signer, ring) = keyed(&path[0]);
            let update = if withdraw {
                RouteUpdate::Withdraw(RouteWithdrawal {
                    destination: path.last().unwrap().clone(),
                    path: path.clone(),
                    advertiser: path[0].clone(),
                    epoch,
                    withdrawn_at_ms: 1,
                })
            } else {
                RouteUpdate::Announce(RouteAnnouncement {
                    destination: path.last().unwrap().clone(),
                    path: path.clone(),
                    metrics: RouteMetrics { latency_ms: latency, reliability, ..RouteMetrics::default() },
                    advertiser: path[0].clone(),
                    epoch,
                    advertised_at_ms: 1,
                    ttl_ms: 2,
                    tags,
                })
            };
            let signed = update.sign(&signer);
            let wire = serde_json::to_string(&signed).unwrap();
            let back: SignedRouteUpdate = serde_json::from_str(&wire).unwrap();
            prop_assert_eq!(back.open(&path[0], &ring, NOW_S), Ok(update.clone()));
            prop_assert_eq!(update.encode(), back.body);
        }

        #[test]
        fn any_single_byte_flip_is_refused(flip in 0usize..200, bit in 0u8..8) {
            let (signer, ring) = keyed("b");
            let signed = RouteUpdate::Announce(announcement("b", &["b", "c"])).sign(&signer);
            let mut bytes = signed.body.clone().into_bytes();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            if let Ok(body) = String::from_utf8(bytes) {
                let tampered = SignedRouteUpdate { body, ..signed };
                prop_assert!(tampered.open("b", &ring, NOW_S).is_err());
            }
        }
    }
}
