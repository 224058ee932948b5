//! One cluster's federation state machine: what a bridge node does with route updates,
//! without actix and without I/O (time is passed in).
//!
//! ```text
//! link to a node of cluster N opens ──► link_up(N)
//! update from N ──► receive(N, signed) ──► open (size, advertiser = N, signature under the
//!     keys chained to N's pinned authority) ──► table import (policy of N) ──► changed?
//! key chain from N ──► learn_keys(N, chain): records chained to N's pinned authority only
//! every announce interval, and after a change ──► outgoing(now): per linked neighbour,
//!     this cluster's signed announcements (itself, best routes), withdrawals of what it
//!     no longer announces
//! last link to N drops ──► link_down(N): every route through N goes; the next
//!     outgoing() withdraws them from the other neighbours
//! ```
//!
//! Every refusal is counted by reason in [`FederationCore::rejections`]; `receive` says
//! when a reason is seen for the first time so the shell logs it once.
//!
//! **Snapshots.** [`FederationCore::snapshot`] holds the route table, the key chains
//! learned for every pinned cluster and the epoch floor; [`FederationCore::restore`]
//! keeps the records still valid at restore time and the chains that still verify under
//! the authorities pinned now, so a restarted bridge routes across clusters before the
//! first announcement arrives.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::keys::{KeyError, RouteKeyRing, RouteSigner, SignedKeyRecord};
use super::policy::{ExportPolicies, ImportPolicies};
use super::table::{RouteRecord, RouteTable, Stamp, TableConfig};
use super::update::{EpochClock, RouteMetrics, RouteUpdate, SignedRouteUpdate};
use super::{ClusterId, RejectionLog, RouteRejection};

/// The `format` of a federation snapshot.
pub const SNAPSHOT_FORMAT: &str = "mpreg-federation-snapshot/1";

/// Settings of one cluster's federation.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// Table bounds, stability, score weights (and this cluster's id).
    pub table: TableConfig,
    /// Import policy per neighbour.
    pub import: ImportPolicies,
    /// Export policies.
    pub export: ExportPolicies,
    /// Tags on this cluster's own announcement.
    pub tags: BTreeSet<String>,
    /// Time to live of announcements.
    pub ttl_ms: u64,
}

impl FederationConfig {
    /// Defaults for cluster `local`: table defaults, open import and export policies, no
    /// tags, announcements valid for 30 s.
    pub fn new(local: &str) -> Self {
        FederationConfig {
            table: TableConfig::new(local),
            import: ImportPolicies::default(),
            export: ExportPolicies::default(),
            tags: BTreeSet::new(),
            ttl_ms: 30_000,
        }
    }
}

/// What a neighbour sent that was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub reason: RouteRejection,
    /// The first refusal for this reason (log it).
    pub first: bool,
}

/// A saved federation state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationSnapshot {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// The cluster that saved it.
    pub cluster_id: ClusterId,
    /// Route records.
    pub routes: Vec<RouteRecord>,
    /// Key chains learned, by cluster.
    pub keys: BTreeMap<ClusterId, Vec<SignedKeyRecord>>,
    /// The last epoch this cluster emitted.
    pub epoch_floor: u64,
}

/// One cluster's federation: pinned keys, route table, policies, links per neighbour.
#[derive(Debug)]
pub struct FederationCore {
    config: FederationConfig,
    signer: RouteSigner,
    ring: RouteKeyRing,
    table: RouteTable,
    epochs: EpochClock,
    links: BTreeMap<ClusterId, usize>,
    announced: BTreeMap<ClusterId, BTreeSet<ClusterId>>,
    rejections: RejectionLog,
}

impl FederationCore {
    /// A cluster that signs with `signer` and trusts the clusters pinned in `ring`.
    pub fn new(config: FederationConfig, signer: RouteSigner, ring: RouteKeyRing) -> Self {
        let table = RouteTable::new(config.table.clone());
        FederationCore {
            config,
            signer,
            ring,
            table,
            epochs: EpochClock::default(),
            links: BTreeMap::new(),
            announced: BTreeMap::new(),
            rejections: RejectionLog::default(),
        }
    }

    /// This cluster.
    pub fn local(&self) -> &str {
        self.table.local()
    }

    /// The route table (selection, explanations, next hops).
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// The keys trusted per cluster.
    pub fn ring(&self) -> &RouteKeyRing {
        &self.ring
    }

    /// Refusals so far, by reason.
    pub fn rejections(&self) -> &RejectionLog {
        &self.rejections
    }

    /// Neighbour clusters with at least one open link.
    pub fn neighbors(&self) -> impl Iterator<Item = &ClusterId> {
        self.links.keys()
    }

    /// A link to a node of `neighbor` opened.
    pub fn link_up(&mut self, neighbor: &str) {
        *self.links.entry(neighbor.to_owned()).or_insert(0) += 1;
    }

    /// A link to a node of `neighbor` closed; when it was the last one, every route
    /// through `neighbor` is dropped. `true` when the table changed.
    pub fn link_down(&mut self, neighbor: &str, now_ms: u64) -> bool {
        let Some(count) = self.links.get_mut(neighbor) else { return false };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.links.remove(neighbor);
        self.announced.remove(neighbor);
        !self.table.neighbor_lost(neighbor, now_ms).is_empty()
    }

    /// An update delivered by a node of `neighbor`. `Ok(true)` when the table changed.
    pub fn receive(&mut self, neighbor: &str, signed: &SignedRouteUpdate, now_ms: u64) -> Result<bool, Refused> {
        let opened = signed.open(neighbor, &self.ring, now_ms / 1000);
        self.accept(neighbor, opened, now_ms)
    }

    /// The route keys trusted now: a copy, so that updates can be opened (their signatures
    /// checked) without holding whatever guards this core.
    pub fn key_ring(&self) -> RouteKeyRing {
        self.ring.clone()
    }

    /// An update of `neighbor` already opened with [`SignedRouteUpdate::open`] (or why it
    /// could not be): applied under the import policies, or its refusal recorded.
    /// `Ok(true)` when the table changed.
    pub fn accept(
        &mut self,
        neighbor: &str,
        opened: Result<RouteUpdate, RouteRejection>,
        now_ms: u64,
    ) -> Result<bool, Refused> {
        let result = opened.and_then(|update| {
            let import = self.config.import.for_neighbor(neighbor);
            self.table.apply(neighbor, &update, &RouteMetrics::default(), import, now_ms)
        });
        result.map_err(|reason| Refused { reason, first: self.rejections.record(reason) })
    }

    /// A key chain delivered by a node of `neighbor`: only `neighbor`'s own chain is
    /// taken, and only records chained to its pinned authority.
    pub fn learn_keys(&mut self, neighbor: &str, chain: &[SignedKeyRecord]) -> Result<bool, KeyError> {
        for record in chain {
            if record.parse()?.cluster_id != neighbor {
                return Err(KeyError::Malformed(format!("{neighbor} sent a key record of another cluster")));
            }
        }
        self.ring.learn_chain(chain)
    }

    /// This cluster's key chain, to send to a neighbour when a link opens and after a
    /// rotation.
    pub fn own_chain(&self) -> &[SignedKeyRecord] {
        self.signer.chain()
    }

    /// Switches to a rotated key (from a reloaded route key file) without a restart.
    pub fn rotate_to(&mut self, signer: RouteSigner) {
        self.signer = signer;
    }

    /// Replaces the policies (reload) and drops the routes held that the new import
    /// policies refuse; `true` when the table changed (the next `outgoing` withdraws them
    /// from the neighbours, and applies the new export policies).
    pub fn set_policies(&mut self, import: ImportPolicies, export: ExportPolicies) -> bool {
        self.config.import = import;
        self.config.export = export;
        !self.table.drop_refused(&self.config.import).is_empty()
    }

    /// Drops expired records; `true` when the table changed.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        !self.table.expire(now_ms).is_empty()
    }

    /// Signed updates for every linked neighbour: announcements of this cluster and its
    /// best routes, withdrawals of what is no longer announced.
    pub fn outgoing(&mut self, now_ms: u64) -> Vec<(ClusterId, Vec<SignedRouteUpdate>)> {
        let epoch = self.epochs.next(now_ms);
        let neighbors: Vec<ClusterId> = self.links.keys().cloned().collect();
        neighbors
            .into_iter()
            .map(|neighbor| {
                let before = self.announced.get(&neighbor).cloned().unwrap_or_default();
                let stamp = Stamp { tags: &self.config.tags, epoch, ttl_ms: self.config.ttl_ms, now_ms };
                let updates = self.table.updates_for(&neighbor, &before, &self.config.export, stamp);
                let now_announced = updates
                    .iter()
                    .filter(|u| matches!(u, RouteUpdate::Announce(_)))
                    .map(|u| u.destination().to_owned())
                    .collect();
                self.announced.insert(neighbor.clone(), now_announced);
                let signed = updates.iter().map(|u| u.sign(&self.signer)).collect();
                (neighbor, signed)
            })
            .collect()
    }

    /// The state to save.
    pub fn snapshot(&self) -> FederationSnapshot {
        let keys = self
            .table
            .records()
            .map(|r| r.next_hop.clone())
            .chain(self.links.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|cluster| {
                let chain = self.ring.chain(&cluster);
                (cluster, chain)
            })
            .filter(|(_, chain)| !chain.is_empty())
            .collect();
        FederationSnapshot {
            format: SNAPSHOT_FORMAT.into(),
            cluster_id: self.local().to_owned(),
            routes: self.table.records().cloned().collect(),
            keys,
            epoch_floor: self.epochs.last(),
        }
    }

    /// Restores a snapshot of this cluster: key chains that verify under the authorities
    /// pinned now, route records still valid at `now_ms` (their next hop's link comes back
    /// by itself). Returns how many records were restored.
    pub fn restore(&mut self, snapshot: &FederationSnapshot, now_ms: u64) -> Result<usize, String> {
        if snapshot.format != SNAPSHOT_FORMAT || snapshot.cluster_id != self.local() {
            return Err(format!("not a {SNAPSHOT_FORMAT} of cluster {}", self.local()));
        }
        for (cluster, chain) in &snapshot.keys {
            if self.ring.authority(cluster).is_some() {
                // A chain that no longer verifies (authority re-pinned) is dropped, not fatal.
                let _ = self.ring.learn_chain(chain);
            }
        }
        self.epochs.raise_to(snapshot.epoch_floor);
        Ok(self.table.restore(&snapshot.routes, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::policy::RoutePolicy;
    use crate::federation::simulation::Simulation;
    use crate::federation::table::NoRoute;

    fn clusters(names: &[&str], unpinned: &[&str]) -> Simulation {
        Simulation::new(names, unpinned, T0 / 1000)
    }

    fn exchange(c: &mut Simulation, now: u64) -> Vec<(String, String, RouteRejection)> {
        c.exchange(now).refused
    }

    const T0: u64 = 1_800_000_000_000;

    fn p(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_line_routes_end_to_end_withdraws_on_cut_and_heals() {
        let mut c = clusters(&["a", "b", "c"], &[]);
        c.link("a", "b");
        c.link("b", "c");
        assert!(exchange(&mut c, T0).is_empty());
        assert_eq!(c.path("a", "c", T0), p(&["a", "b", "c"]));
        assert_eq!(c.path("c", "a", T0), p(&["c", "b", "a"]));
        assert_eq!(c.cores["a"].table().next_hop("c", &[], 5, T0).unwrap().next_hop, "b");
        // Cut B–C: B loses C at once, A after the next exchange (a withdrawal).
        c.cut("b", "c", T0 + 1);
        assert_eq!(c.path("b", "c", T0 + 1), None);
        assert!(exchange(&mut c, T0 + 1).is_empty());
        assert_eq!(c.path("a", "c", T0 + 1), None);
        assert_eq!(c.cores["a"].table().next_hop("c", &[], 5, T0 + 1).unwrap_err(), NoRoute::Unknown("c".into()));
        // Heal.
        c.link("b", "c");
        assert!(exchange(&mut c, T0 + 2).is_empty());
        assert_eq!(c.path("a", "c", T0 + 2), p(&["a", "b", "c"]));
    }

    #[test]
    fn a_ring_of_four_never_loops() {
        let mut c = clusters(&["a", "b", "c", "d"], &[]);
        for (x, y) in [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")] {
            c.link(x, y);
        }
        let refused = exchange(&mut c, T0);
        assert!(refused.iter().all(|(_, _, r)| *r == RouteRejection::Loop), "{refused:?}");
        assert_eq!(c.path("a", "c", T0), p(&["a", "b", "c"]), "two equal paths: the smaller next hop");
        for core in c.cores.values() {
            for r in core.table().records() {
                assert!(!r.path.contains(&core.local().to_string()));
            }
        }
        // Cut A–B: A now reaches B the long way round, and nothing loops.
        c.cut("a", "b", T0 + 1);
        exchange(&mut c, T0 + 1);
        assert_eq!(c.path("a", "b", T0 + 1), p(&["a", "d", "c", "b"]));
    }

    #[test]
    fn an_unpinned_cluster_is_refused() {
        let mut c = clusters(&["a", "x"], &["x"]);
        c.link("a", "x");
        let refused = exchange(&mut c, T0);
        assert!(refused.contains(&("x".into(), "a".into(), RouteRejection::NotPinned)), "{refused:?}");
        assert_eq!(c.path("a", "x", T0), None);
        assert_eq!(c.path("x", "a", T0), p(&["x", "a"]), "x pins a, so it learns a");
        let counts: Vec<_> = c.cores["a"].rejections().counts().collect();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].0, "not_pinned");
    }

    #[test]
    fn live_rotation_then_the_retired_key_is_refused() {
        let mut c = clusters(&["a", "b"], &[]);
        c.link("a", "b");
        exchange(&mut c, T0);
        let old = c.cores["b"].signer.clone();
        let new = old.rotate(T0 / 1000 + 10, 20).unwrap();
        let chain = new.chain().to_vec();
        assert!(c.core("a").learn_keys("b", &chain).unwrap(), "learned over the link, no restart");
        c.core("b").rotate_to(new);
        assert!(exchange(&mut c, T0 + 15_000).is_empty());
        // Within the overlap, something signed by the old key still verifies.
        let stale_signer = |core: &mut FederationCore, now| {
            let mut updates = core.outgoing(now);
            let (_, updates) = updates.remove(0);
            updates
        };
        let mut b_old = FederationCore::new(FederationConfig::new("b"), old.clone(), RouteKeyRing::default());
        b_old.link_up("a");
        let by_old = stale_signer(&mut b_old, T0 + 25_000);
        assert_eq!(c.core("a").receive("b", &by_old[0], T0 + 25_000), Ok(false));
        // After it, not.
        let by_old = stale_signer(&mut b_old, T0 + 31_000);
        assert_eq!(c.core("a").receive("b", &by_old[0], T0 + 31_000).unwrap_err().reason, RouteRejection::RetiredKey);
        // Another cluster's records are not taken from b.
        let foreign = RouteSigner::first(&c.authorities["a"], "a", T0 / 1000);
        assert!(c.core("a").learn_keys("b", foreign.chain()).is_err());
    }

    #[test]
    fn a_neighbor_policy_hides_d_from_a() {
        let mut c = clusters(&["a", "b", "d"], &[]);
        let hide: RoutePolicy = serde_json::from_str(r#"{"allowed_destinations": ["b"]}"#).unwrap();
        c.core("a").set_policies(
            ImportPolicies { neighbors: [("b".to_string(), hide)].into(), ..ImportPolicies::default() },
            ExportPolicies::default(),
        );
        c.link("a", "b");
        c.link("b", "d");
        let refused = exchange(&mut c, T0);
        assert!(refused.contains(&("b".into(), "a".into(), RouteRejection::Policy)));
        assert_eq!(c.path("a", "b", T0), p(&["a", "b"]));
        assert_eq!(c.path("a", "d", T0), None);
        assert_eq!(c.path("d", "a", T0), p(&["d", "b", "a"]), "the other direction is not filtered");
    }

    #[test]
    fn a_reloaded_import_policy_drops_held_routes_and_withdraws_them() {
        let mut c = clusters(&["a", "b", "d", "e"], &[]);
        c.link("e", "a");
        c.link("a", "b");
        c.link("b", "d");
        exchange(&mut c, T0);
        assert_eq!(c.path("a", "d", T0), p(&["a", "b", "d"]));
        assert_eq!(c.path("e", "d", T0), p(&["e", "a", "b", "d"]));
        let hide: RoutePolicy = serde_json::from_str(r#"{"allowed_destinations": ["b"]}"#).unwrap();
        let import = ImportPolicies { neighbors: [("b".to_string(), hide)].into(), ..ImportPolicies::default() };
        assert!(c.core("a").set_policies(import.clone(), ExportPolicies::default()));
        assert_eq!(c.path("a", "d", T0 + 1), None);
        assert_eq!(c.path("a", "b", T0 + 1), p(&["a", "b"]));
        assert!(!c.core("a").set_policies(import, ExportPolicies::default()), "nothing more to drop");
        // The withdrawal reaches e; b's next refresh of d is refused by policy.
        let refused = exchange(&mut c, T0 + 2);
        assert_eq!(c.path("e", "d", T0 + 2), None);
        assert!(refused.contains(&("b".into(), "a".into(), RouteRejection::Policy)), "{refused:?}");
    }

    #[test]
    fn a_snapshot_restores_routes_and_keys_and_drops_what_expired() {
        let mut c = clusters(&["a", "b", "c"], &[]);
        c.link("a", "b");
        c.link("b", "c");
        exchange(&mut c, T0);
        let snapshot = c.cores["a"].snapshot();
        let text = serde_json::to_string(&snapshot).unwrap();
        let back: FederationSnapshot = serde_json::from_str(&text).unwrap();
        // A restarted A: same pins, fresh state.
        let mut ring = RouteKeyRing::default();
        for n in ["b", "c"] {
            ring.pin(n, c.authorities[n].public_key());
        }
        let fresh = || {
            FederationCore::new(
                FederationConfig::new("a"),
                RouteSigner::first(&c.authorities["a"], "a", T0 / 1000),
                ring.clone(),
            )
        };
        let mut restarted = fresh();
        assert_eq!(restarted.restore(&back, T0 + 1_000), Ok(2));
        assert_eq!(restarted.table().explain("c", &[], T0 + 1_000).selected, p(&["a", "b", "c"]));
        assert_eq!(restarted.ring().chain("b"), c.cores["a"].ring().chain("b"));
        // It keeps refusing replays of what it had, and its own epochs stay ahead.
        let mut late = fresh();
        assert_eq!(late.restore(&back, T0 + 31_000), Ok(0), "expired records are dropped");
        let mut other = back.clone();
        other.cluster_id = "b".into();
        assert!(fresh().restore(&other, T0).is_err());
        assert!(restarted.outgoing(T0).is_empty(), "no links yet");
        restarted.link_up("b");
        let out = restarted.outgoing(0);
        let body: serde_json::Value = serde_json::from_str(&out[0].1[0].body).unwrap();
        assert!(body["epoch"].as_u64().unwrap() > back.epoch_floor);
    }
}
