//! The route table: routes to other clusters learned from neighbour clusters, the import
//! pipeline, best-path selection and explanations.
//!
//! A neighbour announces at most one route per destination (its own best), so the table
//! keeps one record per `(destination, neighbour)`. An announcement that passed its
//! signature check ([`super::update::SignedRouteUpdate::open`]) goes through, in order:
//! `expired` → `empty_path` → `advertiser_mismatch` (path does not start with the
//! advertiser) → `destination_mismatch` (path does not end with the destination) →
//! `loop` (the path holds this cluster, or a cluster twice) → `path_too_long` →
//! `stale_epoch` (not newer than the last epoch from that neighbour for that destination)
//! → `policy` (the neighbour's import policy, on the extended hop count) → `hold_down` →
//! `suppressed` → `table_full`, then replaces the neighbour's record.
//!
//! **Selection.** Lower score wins:
//! `score = latency_ms·1 + hop_count·10 + cost·1 + (1 − reliability)·50 − bandwidth_mbps·0.05`
//! (weights in [`ScoreWeights`]), with the metrics as seen from this cluster (the
//! advertised ones extended by the link to the neighbour). Equal scores are broken by,
//! in order: fewer hops, lower latency, higher reliability, the lexicographically
//! smaller next hop, the lexicographically smaller path — so selection never depends on
//! insertion order. Expired records and paths through avoided clusters are candidates
//! in explanations but never selected.
//!
//! **Stability.** When a record is withdrawn, lost with its neighbour or expires, the
//! `(destination, neighbour)` pair is held down for `hold_down_ms` (re-announcements
//! refused) and counts a flap; `flap_threshold` flaps, each within
//! `suppression_window_ms` of the previous one, suppress the pair for one window. Both
//! are off by default (0).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::policy::{ExportPolicies, ImportPolicies, RoutePolicy};
use super::update::{RouteAnnouncement, RouteMetrics, RouteUpdate, RouteWithdrawal};
use super::{ClusterId, RouteRejection};

/// Weights of the selection score (lower score wins).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoreWeights {
    /// Per millisecond of latency.
    pub latency: f64,
    /// Per hop.
    pub hops: f64,
    /// Per unit of cost.
    pub cost: f64,
    /// Times `1 − reliability`.
    pub unreliability: f64,
    /// Subtracted per Mbit/s of bandwidth.
    pub bandwidth: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights { latency: 1.0, hops: 10.0, cost: 1.0, unreliability: 50.0, bandwidth: 0.05 }
    }
}

impl ScoreWeights {
    /// The score of `metrics`.
    pub fn score(&self, m: &RouteMetrics) -> f64 {
        m.latency_ms * self.latency
            + f64::from(m.hop_count) * self.hops
            + m.cost * self.cost
            + (1.0 - m.reliability) * self.unreliability
            - m.bandwidth_mbps as f64 * self.bandwidth
    }
}

/// Hold-down and flap suppression (0 = off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stability {
    /// After a route goes away, refuse it again for this long.
    pub hold_down_ms: u64,
    /// Flaps (each within the window of the previous) that suppress a route.
    pub flap_threshold: u32,
    /// How long a suppression lasts, and how close flaps must be to count together.
    pub suppression_window_ms: u64,
}

/// A table's fixed settings.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// This cluster.
    pub local: ClusterId,
    /// Longest path accepted, counting this cluster.
    pub max_path_len: usize,
    /// Most destinations held (new ones beyond are refused: `table_full`).
    pub max_destinations: usize,
    /// Longest time to live honoured; larger TTLs are cut to it.
    pub max_ttl_ms: u64,
    /// Hold-down and flap suppression.
    pub stability: Stability,
    /// Selection score.
    pub weights: ScoreWeights,
}

impl TableConfig {
    /// Defaults for cluster `local`: paths up to 16 clusters, 4096 destinations, TTL up to
    /// 5 minutes, no hold-down, default weights.
    pub fn new(local: &str) -> Self {
        TableConfig {
            local: local.into(),
            max_path_len: 16,
            max_destinations: 4096,
            max_ttl_ms: 300_000,
            stability: Stability::default(),
            weights: ScoreWeights::default(),
        }
    }
}

/// A route held in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// The cluster it reaches.
    pub destination: ClusterId,
    /// The neighbour cluster that announced it (and that a call goes to first).
    pub next_hop: ClusterId,
    /// The path as announced: next hop first, destination last.
    pub path: Vec<ClusterId>,
    /// Metrics from this cluster (advertised metrics extended by the link).
    pub metrics: RouteMetrics,
    /// The announcement's epoch.
    pub epoch: u64,
    /// Labels from the announcement.
    pub tags: BTreeSet<String>,
    /// When this node stops using it (this node's clock).
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct PairState {
    last_epoch: u64,
    /// When this node last changed it (its own clock): idle states are forgotten.
    touched_ms: u64,
    hold_down_until_ms: u64,
    flaps: u32,
    last_flap_ms: u64,
    suppressed_until_ms: u64,
}

/// One candidate in an explanation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// The neighbour it goes through.
    pub next_hop: ClusterId,
    /// This cluster, then the announced path.
    pub path: Vec<ClusterId>,
    /// Metrics from this cluster.
    pub metrics: RouteMetrics,
    /// The epoch of the announcement it came from (Unix ms when the neighbour emitted it).
    pub epoch: u64,
    /// Selection score (lower wins).
    pub score: f64,
    /// Tie-breakers in the order they apply.
    pub tiebreakers: Vec<(String, serde_json::Value)>,
    /// Why it cannot be selected (`expired`, `avoided`), if so.
    pub filtered: Option<String>,
    /// Whether it is the selected route.
    pub selected: bool,
}

/// Why a destination is routed the way it is: every candidate, why each was filtered,
/// which was selected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// The destination cluster.
    pub destination: ClusterId,
    /// The time of evaluation (Unix milliseconds).
    pub evaluated_at_ms: u64,
    /// Clusters the caller asked to avoid.
    pub avoid: Vec<ClusterId>,
    /// How scores are computed and ties broken.
    pub rule: &'static str,
    /// Candidates, best first.
    pub candidates: Vec<Candidate>,
    /// The selected path (this cluster first), if any.
    pub selected: Option<Vec<ClusterId>>,
}

/// Why a call to a cluster cannot go anywhere (error 1005's reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// The target is this cluster: run it here.
    Local,
    /// This cluster is already on the call's path.
    Loop,
    /// The hop budget is spent, or the best route needs more hops than remain.
    HopBudget,
    /// No route to that cluster (or only through clusters the call already visited).
    Unknown(ClusterId),
}

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoRoute::Local => f.write_str("target cluster is local"),
            NoRoute::Loop => f.write_str("loop detected: this cluster is already on the call's path"),
            NoRoute::HopBudget => f.write_str("hop budget exhausted"),
            NoRoute::Unknown(cluster) => write!(f, "no route to cluster {cluster}"),
        }
    }
}

const RULE: &str = "score = latency_ms*w_latency + hop_count*w_hops + cost*w_cost + (1-reliability)*w_unreliability \
    - bandwidth_mbps*w_bandwidth, lower wins; ties: fewer hops, lower latency, higher reliability, smaller next_hop, smaller path";

/// How this cluster stamps the updates it emits now.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// Tags on this cluster's own announcement.
    pub tags: &'a BTreeSet<String>,
    /// The epoch every update of this round carries.
    pub epoch: u64,
    /// Time to live of the announcements.
    pub ttl_ms: u64,
    /// Now (Unix milliseconds).
    pub now_ms: u64,
}

/// Routes to other clusters. Pure: time is passed in (Unix milliseconds).
#[derive(Debug, Clone)]
pub struct RouteTable {
    config: TableConfig,
    routes: BTreeMap<(ClusterId, ClusterId), RouteRecord>,
    pairs: BTreeMap<(ClusterId, ClusterId), PairState>,
}

impl RouteTable {
    /// An empty table for `config.local`.
    pub fn new(config: TableConfig) -> Self {
        RouteTable { config, routes: BTreeMap::new(), pairs: BTreeMap::new() }
    }

    /// This cluster.
    pub fn local(&self) -> &str {
        &self.config.local
    }

    /// Every record, by destination then next hop.
    pub fn records(&self) -> impl Iterator<Item = &RouteRecord> {
        self.routes.values()
    }

    /// Imports an announcement delivered (and signed) by neighbour `neighbor` over a link
    /// with metrics `link`. `Ok(true)` when the table changed.
    pub fn announce(
        &mut self,
        neighbor: &str,
        ann: &RouteAnnouncement,
        link: &RouteMetrics,
        import: &RoutePolicy,
        now_ms: u64,
    ) -> Result<bool, RouteRejection> {
        if ann.advertised_at_ms.saturating_add(ann.ttl_ms) <= now_ms {
            return Err(RouteRejection::Expired);
        }
        self.check_path(&ann.path, &ann.advertiser, &ann.destination)?;
        if ann.advertiser != neighbor {
            return Err(RouteRejection::AdvertiserMismatch);
        }
        let key = (ann.destination.clone(), neighbor.to_owned());
        let new_destination = !self.pairs.keys().any(|(d, _)| *d == ann.destination);
        if new_destination && self.destination_count() >= self.config.max_destinations {
            return Err(RouteRejection::TableFull);
        }
        let pair = self.pairs.entry(key.clone()).or_default();
        if ann.epoch <= pair.last_epoch {
            return Err(RouteRejection::StaleEpoch);
        }
        pair.last_epoch = ann.epoch;
        pair.touched_ms = now_ms;
        let metrics = ann.metrics.extend(link);
        if import.check(&ann.destination, &ann.advertiser, &ann.tags, metrics.hop_count).is_err() {
            return Err(RouteRejection::Policy);
        }
        if now_ms < pair.hold_down_until_ms {
            return Err(RouteRejection::HoldDown);
        }
        if now_ms < pair.suppressed_until_ms {
            return Err(RouteRejection::Suppressed);
        }
        let record = RouteRecord {
            destination: ann.destination.clone(),
            next_hop: neighbor.to_owned(),
            path: ann.path.clone(),
            metrics,
            epoch: ann.epoch,
            tags: ann.tags.clone(),
            expires_at_ms: now_ms.saturating_add(ann.ttl_ms.min(self.config.max_ttl_ms)),
        };
        let changed = self.routes.get(&key).is_none_or(|old| old.path != record.path || old.metrics != record.metrics);
        self.routes.insert(key, record);
        Ok(changed)
    }

    /// Imports a withdrawal from `neighbor`: `Ok(true)` when a record was removed.
    pub fn withdraw(&mut self, neighbor: &str, w: &RouteWithdrawal, now_ms: u64) -> Result<bool, RouteRejection> {
        self.check_path(&w.path, &w.advertiser, &w.destination)?;
        if w.advertiser != neighbor {
            return Err(RouteRejection::AdvertiserMismatch);
        }
        let key = (w.destination.clone(), neighbor.to_owned());
        let Some(pair) = self.pairs.get_mut(&key) else {
            return Ok(false);
        };
        if w.epoch <= pair.last_epoch {
            return Err(RouteRejection::StaleEpoch);
        }
        pair.last_epoch = w.epoch;
        pair.touched_ms = now_ms;
        Ok(self.remove(&key, now_ms))
    }

    /// Applies an opened update from `neighbor` (see [`Self::announce`], [`Self::withdraw`]).
    pub fn apply(
        &mut self,
        neighbor: &str,
        update: &RouteUpdate,
        link: &RouteMetrics,
        import: &RoutePolicy,
        now_ms: u64,
    ) -> Result<bool, RouteRejection> {
        match update {
            RouteUpdate::Announce(a) => self.announce(neighbor, a, link, import, now_ms),
            RouteUpdate::Withdraw(w) => self.withdraw(neighbor, w, now_ms),
        }
    }

    /// The last link to `neighbor` dropped: forget every route through it. Returns the
    /// destinations that lost a route.
    pub fn neighbor_lost(&mut self, neighbor: &str, now_ms: u64) -> Vec<ClusterId> {
        let keys: Vec<_> = self.routes.keys().filter(|(_, n)| n == neighbor).cloned().collect();
        keys.into_iter().filter(|key| self.remove(key, now_ms)).map(|(destination, _)| destination).collect()
    }

    /// Drops expired records; returns the destinations that lost a route. Also forgets
    /// the epochs, hold-downs and flap counts of pairs without a route that have been
    /// idle for `max_ttl_ms` (so the destination bound counts live destinations): a
    /// replay older than that is refused as expired anyway, unless its own TTL is longer.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ClusterId> {
        let keys: Vec<_> =
            self.routes.iter().filter(|(_, r)| r.expires_at_ms <= now_ms).map(|(k, _)| k.clone()).collect();
        let lost =
            keys.into_iter().filter(|key| self.remove(key, now_ms)).map(|(destination, _)| destination).collect();
        let (routes, idle_ms) = (&self.routes, self.config.max_ttl_ms);
        self.pairs.retain(|key, p| {
            routes.contains_key(key)
                || now_ms < p.hold_down_until_ms
                || now_ms < p.suppressed_until_ms
                || now_ms < p.touched_ms.saturating_add(idle_ms)
        });
        lost
    }

    /// The best usable route to `destination` whose path avoids `avoid`.
    pub fn select(&self, destination: &str, avoid: &[ClusterId], now_ms: u64) -> Option<&RouteRecord> {
        self.candidates(destination)
            .filter(|r| self.filtered(r, avoid, now_ms).is_none())
            .min_by(|a, b| self.compare(a, b))
    }

    /// Every candidate for `destination`, best first, with its score, tie-breakers, and
    /// why it was filtered; and the selected one.
    pub fn explain(&self, destination: &str, avoid: &[ClusterId], now_ms: u64) -> Explanation {
        let mut records: Vec<&RouteRecord> = self.candidates(destination).collect();
        records.sort_by(|a, b| self.compare(a, b));
        let selected = self.select(destination, avoid, now_ms);
        let candidates = records
            .into_iter()
            .map(|r| Candidate {
                next_hop: r.next_hop.clone(),
                path: self.full_path(r),
                metrics: r.metrics,
                epoch: r.epoch,
                score: self.config.weights.score(&r.metrics),
                tiebreakers: vec![
                    ("hop_count".into(), r.metrics.hop_count.into()),
                    ("latency_ms".into(), r.metrics.latency_ms.into()),
                    ("reliability".into(), r.metrics.reliability.into()),
                    ("next_hop".into(), r.next_hop.clone().into()),
                    ("path".into(), r.path.clone().into()),
                ],
                filtered: self.filtered(r, avoid, now_ms).map(str::to_owned),
                selected: selected.is_some_and(|s| std::ptr::eq(s, r)),
            })
            .collect();
        Explanation {
            destination: destination.into(),
            evaluated_at_ms: now_ms,
            avoid: avoid.to_vec(),
            rule: RULE,
            candidates,
            selected: selected.map(|r| self.full_path(r)),
        }
    }

    /// The neighbour cluster a call for `target` goes to next. `visited` is the clusters
    /// the call has crossed; `budget` the hops it may still take.
    pub fn next_hop(
        &self,
        target: &str,
        visited: &[ClusterId],
        budget: u32,
        now_ms: u64,
    ) -> Result<&RouteRecord, NoRoute> {
        if target == self.config.local {
            return Err(NoRoute::Local);
        }
        if visited.contains(&self.config.local) {
            return Err(NoRoute::Loop);
        }
        if budget == 0 {
            return Err(NoRoute::HopBudget);
        }
        let route = self.select(target, visited, now_ms).ok_or_else(|| NoRoute::Unknown(target.into()))?;
        if route.metrics.hop_count > budget {
            return Err(NoRoute::HopBudget);
        }
        Ok(route)
    }

    /// What this cluster announces to `neighbor` now: itself, then its best route to every
    /// other destination that passes the export policies and does not go back through
    /// `neighbor` (split horizon); plus a withdrawal for each destination in
    /// `announced_before` that is no longer announced. All carry `stamp.epoch`.
    pub fn updates_for(
        &self,
        neighbor: &str,
        announced_before: &BTreeSet<ClusterId>,
        export: &ExportPolicies,
        stamp: Stamp<'_>,
    ) -> Vec<RouteUpdate> {
        let Stamp { tags: local_tags, epoch, ttl_ms, now_ms } = stamp;
        let local = &self.config.local;
        let mut announcements = Vec::new();
        if export.allows(neighbor, local, local, local_tags, 0) {
            announcements.push(RouteAnnouncement {
                destination: local.clone(),
                path: vec![local.clone()],
                metrics: RouteMetrics::default(),
                advertiser: local.clone(),
                epoch,
                advertised_at_ms: now_ms,
                ttl_ms,
                tags: local_tags.clone(),
            });
        }
        let destinations: BTreeSet<&ClusterId> = self.routes.keys().map(|(d, _)| d).collect();
        for destination in destinations {
            let Some(best) = self.select(destination, &[], now_ms) else { continue };
            let path = self.full_path(best);
            if path.iter().any(|c| c == neighbor)
                || path.len() >= self.config.max_path_len
                || !export.allows(neighbor, destination, local, &best.tags, best.metrics.hop_count)
            {
                continue;
            }
            announcements.push(RouteAnnouncement {
                destination: destination.clone(),
                path,
                metrics: best.metrics,
                advertiser: local.clone(),
                epoch,
                advertised_at_ms: now_ms,
                ttl_ms: ttl_ms.min(best.expires_at_ms.saturating_sub(now_ms)),
                tags: best.tags.clone(),
            });
        }
        let now_announced: BTreeSet<&ClusterId> = announcements.iter().map(|a| &a.destination).collect();
        let withdrawals = announced_before.iter().filter(|d| !now_announced.contains(d)).map(|d| {
            RouteUpdate::Withdraw(RouteWithdrawal {
                destination: d.clone(),
                path: if d == local { vec![local.clone()] } else { vec![local.clone(), d.clone()] },
                advertiser: local.clone(),
                epoch,
                withdrawn_at_ms: now_ms,
            })
        });
        withdrawals
            .collect::<Vec<_>>()
            .into_iter()
            .chain(announcements.into_iter().map(RouteUpdate::Announce))
            .collect()
    }

    /// Puts back records saved earlier (a snapshot of this cluster's table): those still
    /// valid at `now_ms` whose path passes today's checks. Returns how many.
    pub fn restore(&mut self, records: &[RouteRecord], now_ms: u64) -> usize {
        let mut restored = 0;
        for r in records {
            let valid = r.expires_at_ms > now_ms
                && self.check_path(&r.path, &r.next_hop, &r.destination).is_ok()
                && self.destination_count() < self.config.max_destinations;
            if valid {
                let key = (r.destination.clone(), r.next_hop.clone());
                let pair = self.pairs.entry(key.clone()).or_default();
                pair.last_epoch = pair.last_epoch.max(r.epoch);
                pair.touched_ms = now_ms;
                self.routes.insert(key, r.clone());
                restored += 1;
            }
        }
        restored
    }

    /// Destinations with at least one record.
    pub fn destinations(&self) -> BTreeSet<&ClusterId> {
        self.routes.keys().map(|(d, _)| d).collect()
    }

    fn destination_count(&self) -> usize {
        self.pairs.keys().map(|(d, _)| d).collect::<BTreeSet<_>>().len()
    }

    fn check_path(&self, path: &[ClusterId], advertiser: &str, destination: &str) -> Result<(), RouteRejection> {
        let (Some(first), Some(last)) = (path.first(), path.last()) else {
            return Err(RouteRejection::EmptyPath);
        };
        if first != advertiser {
            return Err(RouteRejection::AdvertiserMismatch);
        }
        if last != destination {
            return Err(RouteRejection::DestinationMismatch);
        }
        let distinct: BTreeSet<&ClusterId> = path.iter().collect();
        if distinct.contains(&self.config.local) || distinct.len() != path.len() {
            return Err(RouteRejection::Loop);
        }
        if path.len() + 1 > self.config.max_path_len {
            return Err(RouteRejection::PathTooLong);
        }
        Ok(())
    }

    /// Removes a record, with hold-down and flap accounting; `true` if there was one.
    /// Drops the records `import` refuses now (policies reloaded); the destinations that
    /// lost a route. Not a flap: no hold-down, the route comes back with the next
    /// announcement a later policy allows.
    pub fn drop_refused(&mut self, import: &ImportPolicies) -> Vec<ClusterId> {
        let refused: Vec<(ClusterId, ClusterId)> = self
            .routes
            .iter()
            .filter(|((_, neighbor), r)| {
                import.for_neighbor(neighbor).check(&r.destination, neighbor, &r.tags, r.metrics.hop_count).is_err()
            })
            .map(|(key, _)| key.clone())
            .collect();
        refused.into_iter().filter_map(|key| self.routes.remove(&key).map(|r| r.destination)).collect()
    }

    fn remove(&mut self, key: &(ClusterId, ClusterId), now_ms: u64) -> bool {
        if self.routes.remove(key).is_none() {
            return false;
        }
        let s = self.config.stability;
        let pair = self.pairs.entry(key.clone()).or_default();
        pair.touched_ms = now_ms;
        pair.hold_down_until_ms = now_ms.saturating_add(s.hold_down_ms);
        if s.flap_threshold > 0 {
            let recent = pair.flaps > 0 && now_ms.saturating_sub(pair.last_flap_ms) <= s.suppression_window_ms;
            pair.flaps = if recent { pair.flaps + 1 } else { 1 };
            pair.last_flap_ms = now_ms;
            if pair.flaps >= s.flap_threshold {
                pair.suppressed_until_ms = now_ms.saturating_add(s.suppression_window_ms);
            }
        }
        true
    }

    fn candidates<'a, 'b>(&'a self, destination: &'b str) -> impl Iterator<Item = &'a RouteRecord> + use<'a, 'b> {
        self.routes.values().filter(move |r| r.destination == destination)
    }

    fn filtered(&self, r: &RouteRecord, avoid: &[ClusterId], now_ms: u64) -> Option<&'static str> {
        if r.expires_at_ms <= now_ms {
            Some("expired")
        } else if r.path.iter().any(|c| avoid.contains(c)) {
            Some("avoided")
        } else {
            None
        }
    }

    fn compare(&self, a: &RouteRecord, b: &RouteRecord) -> std::cmp::Ordering {
        let w = &self.config.weights;
        w.score(&a.metrics)
            .total_cmp(&w.score(&b.metrics))
            .then(a.metrics.hop_count.cmp(&b.metrics.hop_count))
            .then(a.metrics.latency_ms.total_cmp(&b.metrics.latency_ms))
            .then(b.metrics.reliability.total_cmp(&a.metrics.reliability))
            .then_with(|| a.next_hop.cmp(&b.next_hop))
            .then_with(|| a.path.cmp(&b.path))
    }

    fn full_path(&self, r: &RouteRecord) -> Vec<ClusterId> {
        std::iter::once(self.config.local.clone()).chain(r.path.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn ann(advertiser: &str, path: &[&str], epoch: u64) -> RouteAnnouncement {
        RouteAnnouncement {
            destination: path.last().map(|s| s.to_string()).unwrap_or_default(),
            path: path.iter().map(|c| c.to_string()).collect(),
            metrics: RouteMetrics { hop_count: path.len() as u32 - 1, ..RouteMetrics::default() },
            advertiser: advertiser.into(),
            epoch,
            advertised_at_ms: T0,
            ttl_ms: 30_000,
            tags: BTreeSet::new(),
        }
    }

    fn with_latency(mut a: RouteAnnouncement, latency_ms: f64) -> RouteAnnouncement {
        a.metrics.latency_ms = latency_ms;
        a
    }

    fn link() -> RouteMetrics {
        RouteMetrics::default()
    }

    fn open() -> RoutePolicy {
        RoutePolicy::default()
    }

    fn withdrawal(advertiser: &str, path: &[&str], epoch: u64) -> RouteWithdrawal {
        RouteWithdrawal {
            destination: path.last().map(|s| s.to_string()).unwrap_or_default(),
            path: path.iter().map(|c| c.to_string()).collect(),
            advertiser: advertiser.into(),
            epoch,
            withdrawn_at_ms: T0,
        }
    }

    fn table(local: &str) -> RouteTable {
        RouteTable::new(TableConfig::new(local))
    }

    fn stamp(tags: &BTreeSet<String>, epoch: u64) -> Stamp<'_> {
        Stamp { tags, epoch, ttl_ms: 60_000, now_ms: T0 }
    }

    #[test]
    fn the_reference_edge_cases_are_refused_with_their_reason() {
        let mut t = table("a");
        let r = |t: &mut RouteTable, a: RouteAnnouncement| t.announce(&a.advertiser.clone(), &a, &link(), &open(), T0);
        assert_eq!(r(&mut t, ann("b", &["b", "a", "c"], 1)), Err(RouteRejection::Loop));
        assert_eq!(r(&mut t, ann("b", &["b", "c", "b", "d"], 1)), Err(RouteRejection::Loop));
        assert_eq!(r(&mut t, ann("b", &["x", "c"], 1)), Err(RouteRejection::AdvertiserMismatch));
        let mut mismatch = ann("b", &["b", "c"], 1);
        mismatch.destination = "d".into();
        assert_eq!(r(&mut t, mismatch), Err(RouteRejection::DestinationMismatch));
        let mut empty = ann("b", &["b"], 1);
        empty.path.clear();
        assert_eq!(r(&mut t, empty), Err(RouteRejection::EmptyPath));
        let mut expired = ann("b", &["b", "c"], 1);
        expired.advertised_at_ms = T0 - 30_000;
        assert_eq!(r(&mut t, expired), Err(RouteRejection::Expired));
        let long: Vec<String> = std::iter::once("b".to_string()).chain((0..20).map(|i| format!("c{i}"))).collect();
        let long: Vec<&str> = long.iter().map(String::as_str).collect();
        assert_eq!(r(&mut t, ann("b", &long, 1)), Err(RouteRejection::PathTooLong));
        // Delivered by another neighbour than the advertiser.
        let a = ann("b", &["b", "c"], 1);
        assert_eq!(t.announce("x", &a, &link(), &open(), T0), Err(RouteRejection::AdvertiserMismatch));
        // Accepted, then a replay of the same epoch and an older one are stale.
        assert_eq!(r(&mut t, ann("b", &["b", "c"], 5)), Ok(true));
        assert_eq!(r(&mut t, ann("b", &["b", "c"], 5)), Err(RouteRejection::StaleEpoch));
        assert_eq!(r(&mut t, ann("b", &["b", "c"], 4)), Err(RouteRejection::StaleEpoch));
        assert_eq!(r(&mut t, ann("b", &["b", "c"], 6)), Ok(false), "a refresh changes nothing");
        // An empty allow-set denies all.
        let deny_all = RoutePolicy { allowed_destinations: Some(BTreeSet::new()), ..RoutePolicy::default() };
        let d = ann("b", &["b", "d"], 7);
        assert_eq!(t.announce("b", &d, &link(), &deny_all, T0), Err(RouteRejection::Policy));
        // Hops count from this cluster: a -> b -> e is 2.
        let max2 = RoutePolicy { max_hops: Some(2), ..RoutePolicy::default() };
        assert_eq!(t.announce("b", &ann("b", &["b", "e", "f"], 8), &link(), &max2, T0), Err(RouteRejection::Policy));
        assert_eq!(t.announce("b", &ann("b", &["b", "e"], 9), &link(), &max2, T0), Ok(true));
    }

    #[test]
    fn a_restarted_cluster_with_a_time_based_epoch_is_accepted_at_once() {
        let mut t = table("a");
        assert_eq!(t.announce("b", &ann("b", &["b"], T0), &link(), &open(), T0), Ok(true));
        let mut after_restart = ann("b", &["b"], T0 + 1500);
        after_restart.metrics.latency_ms = 3.0;
        assert_eq!(t.announce("b", &after_restart, &link(), &open(), T0 + 1500), Ok(true));
        assert_eq!(t.select("b", &[], T0 + 1500).unwrap().metrics.latency_ms, 3.0);
    }

    #[test]
    fn selection_prefers_the_lowest_score_and_respects_avoid() {
        let mut t = table("a");
        t.announce("b", &with_latency(ann("b", &["b", "d"], 1), 50.0), &link(), &open(), T0).unwrap();
        t.announce("c", &with_latency(ann("c", &["c", "d"], 1), 5.0), &link(), &open(), T0).unwrap();
        assert_eq!(t.select("d", &[], T0).unwrap().next_hop, "c");
        assert_eq!(t.select("d", &["c".into()], T0).unwrap().next_hop, "b");
        let e = t.explain("d", &["c".into()], T0);
        assert_eq!(e.candidates.len(), 2);
        assert_eq!(e.candidates[0].next_hop, "c");
        assert_eq!(e.candidates[0].filtered.as_deref(), Some("avoided"));
        assert!(e.candidates[1].selected);
        assert_eq!(e.selected, Some(vec!["a".to_string(), "b".into(), "d".into()]));
        assert_eq!(e.candidates[0].tiebreakers[0].0, "hop_count");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["candidates"][1]["score"], 70.0);
    }

    #[test]
    fn ties_break_on_hops_latency_reliability_then_next_hop() {
        // Zero weights: everything ties on score.
        let mut config = TableConfig::new("a");
        config.weights = ScoreWeights { latency: 0.0, hops: 0.0, cost: 0.0, unreliability: 0.0, bandwidth: 0.0 };
        let mut t = RouteTable::new(config);
        t.announce("y", &ann("y", &["y", "d"], 1), &link(), &open(), T0).unwrap();
        t.announce("x", &ann("x", &["x", "d"], 1), &link(), &open(), T0).unwrap();
        assert_eq!(t.select("d", &[], T0).unwrap().next_hop, "x", "equal: smaller next hop");
        let mut flaky = ann("x", &["x", "d"], 2);
        flaky.metrics.reliability = 0.5;
        t.announce("x", &flaky, &link(), &open(), T0).unwrap();
        assert_eq!(t.select("d", &[], T0).unwrap().next_hop, "y", "higher reliability before name");
        t.announce("v", &with_latency(ann("v", &["v", "k", "d"], 1), 0.0), &link(), &open(), T0).unwrap();
        assert_eq!(t.select("d", &[], T0).unwrap().next_hop, "y", "fewer hops first");
    }

    #[test]
    fn withdrawal_hold_down_and_flap_suppression() {
        let mut config = TableConfig::new("a");
        config.stability = Stability { hold_down_ms: 5_000, flap_threshold: 2, suppression_window_ms: 10_000 };
        let mut t = RouteTable::new(config);
        t.announce("b", &ann("b", &["b", "c"], 1), &link(), &open(), T0).unwrap();
        // A withdrawal for a path that does not end at its destination is refused.
        let mut bad = withdrawal("b", &["b", "c"], 2);
        bad.destination = "x".into();
        assert_eq!(t.withdraw("b", &bad, T0), Err(RouteRejection::DestinationMismatch));
        assert_eq!(t.withdraw("b", &withdrawal("b", &["b", "c"], 2), T0), Ok(true));
        assert_eq!(t.withdraw("b", &withdrawal("b", &["b", "c"], 2), T0), Err(RouteRejection::StaleEpoch), "replayed");
        let again = |epoch, at| {
            let mut a = ann("b", &["b", "c"], epoch);
            a.advertised_at_ms = at;
            a
        };
        assert_eq!(t.announce("b", &again(3, T0 + 2_000), &link(), &open(), T0 + 2_000), Err(RouteRejection::HoldDown));
        assert_eq!(t.announce("b", &again(4, T0 + 6_000), &link(), &open(), T0 + 6_000), Ok(true));
        // Second flap within the window: suppressed for the window (past the hold-down).
        assert!(t.neighbor_lost("b", T0 + 7_000).contains(&"c".to_string()));
        assert_eq!(
            t.announce("b", &again(5, T0 + 13_000), &link(), &open(), T0 + 13_000),
            Err(RouteRejection::Suppressed)
        );
        assert_eq!(t.announce("b", &again(6, T0 + 17_001), &link(), &open(), T0 + 17_001), Ok(true));
    }

    #[test]
    fn records_expire() {
        let mut t = table("a");
        let mut a = ann("b", &["b", "c"], 1);
        a.ttl_ms = 1_000;
        t.announce("b", &a, &link(), &open(), T0).unwrap();
        assert!(t.select("c", &[], T0 + 500).is_some());
        assert!(t.select("c", &[], T0 + 1_000).is_none());
        assert_eq!(t.explain("c", &[], T0 + 1_000).candidates[0].filtered.as_deref(), Some("expired"));
        assert_eq!(t.expire(T0 + 2_000), vec!["c".to_string()]);
        assert_eq!(t.records().count(), 0);
    }

    #[test]
    fn neighbor_loss_removes_only_its_routes() {
        let mut t = table("c");
        t.announce("b", &ann("b", &["b"], 1), &link(), &open(), T0).unwrap();
        t.announce("a", &ann("a", &["a", "b"], 1), &link(), &open(), T0).unwrap();
        t.announce("a", &ann("a", &["a"], 2), &link(), &open(), T0).unwrap();
        assert_eq!(t.neighbor_lost("a", T0), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(t.select("b", &[], T0).unwrap().next_hop, "b");
        assert!(t.select("a", &[], T0).is_none());
    }

    #[test]
    fn next_hop_reasons() {
        let mut t = table("a");
        t.announce("b", &ann("b", &["b", "c"], 1), &link(), &open(), T0).unwrap();
        assert_eq!(t.next_hop("c", &[], 5, T0).unwrap().next_hop, "b");
        assert_eq!(t.next_hop("a", &[], 5, T0).unwrap_err(), NoRoute::Local);
        assert_eq!(t.next_hop("c", &["a".into()], 5, T0).unwrap_err(), NoRoute::Loop);
        assert_eq!(t.next_hop("c", &[], 0, T0).unwrap_err(), NoRoute::HopBudget);
        assert_eq!(t.next_hop("c", &[], 1, T0).unwrap_err(), NoRoute::HopBudget, "needs 2 hops");
        assert_eq!(t.next_hop("c", &["b".into()], 5, T0).unwrap_err(), NoRoute::Unknown("c".into()));
        assert_eq!(t.next_hop("z", &[], 5, T0).unwrap_err().to_string(), "no route to cluster z");
    }

    #[test]
    fn updates_split_horizon_export_policy_and_withdrawals() {
        let mut t = table("b");
        t.announce("c", &ann("c", &["c"], 1), &link(), &open(), T0).unwrap();
        t.announce("c", &ann("c", &["c", "d"], 2), &link(), &open(), T0).unwrap();
        t.announce("a", &ann("a", &["a"], 1), &link(), &open(), T0).unwrap();
        let none = BTreeSet::new();
        let dests = |u: &[RouteUpdate]| -> Vec<(bool, String)> {
            u.iter().map(|u| (matches!(u, RouteUpdate::Announce(_)), u.destination().to_string())).collect()
        };
        let to_a = t.updates_for("a", &none, &ExportPolicies::default(), stamp(&none, 9));
        assert_eq!(dests(&to_a), vec![(true, "b".into()), (true, "c".into()), (true, "d".into())]);
        assert_eq!(to_a[2].path(), ["b", "c", "d"]);
        // Split horizon: nothing through C goes back to C.
        let to_c = t.updates_for("c", &none, &ExportPolicies::default(), stamp(&none, 9));
        assert_eq!(dests(&to_c), vec![(true, "b".into()), (true, "a".into())], "itself first");
        // Hide D from A; what was announced before and no longer is gets withdrawn.
        let hide: ExportPolicies =
            serde_json::from_str(r#"{"neighbors": {"a": {"allowed_destinations": ["b", "c"]}}}"#).unwrap();
        let before: BTreeSet<ClusterId> = ["b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let to_a = t.updates_for("a", &before, &hide, stamp(&none, 10));
        assert_eq!(dests(&to_a), vec![(false, "d".into()), (true, "b".into()), (true, "c".into())]);
        // The receiving side accepts them in sequence.
        let mut a = table("a");
        for u in &to_a {
            a.apply("b", u, &link(), &open(), T0).unwrap();
        }
        assert!(a.select("d", &[], T0).is_none());
        assert_eq!(a.select("c", &[], T0).unwrap().path, vec!["b".to_string(), "c".into()]);
    }

    #[test]
    fn the_table_is_bounded_in_destinations() {
        let mut config = TableConfig::new("a");
        config.max_destinations = 2;
        let mut t = RouteTable::new(config);
        t.announce("b", &ann("b", &["b"], 1), &link(), &open(), T0).unwrap();
        t.announce("b", &ann("b", &["b", "c"], 1), &link(), &open(), T0).unwrap();
        assert_eq!(t.announce("b", &ann("b", &["b", "d"], 1), &link(), &open(), T0), Err(RouteRejection::TableFull));
        assert_eq!(t.announce("b", &ann("b", &["b", "c"], 2), &link(), &open(), T0), Ok(false));
        // Once C is withdrawn and its state idle for the longest TTL, D fits.
        t.withdraw("b", &withdrawal("b", &["b", "c"], 3), T0).unwrap();
        t.expire(T0 + 299_999);
        assert_eq!(t.announce("b", &ann("b", &["b", "d"], 4), &link(), &open(), T0), Err(RouteRejection::TableFull));
        t.expire(T0 + 300_000);
        let mut d = ann("b", &["b", "d"], 5);
        d.advertised_at_ms = T0 + 300_000;
        assert_eq!(t.announce("b", &d, &link(), &open(), T0 + 300_000), Ok(true));
    }

    /// Clusters in a ring exchange updates until nothing changes: every cluster reaches
    /// every other, no stored path has a loop, and the exchange terminates.
    fn converge(names: &[String]) -> Vec<RouteTable> {
        let mut tables: Vec<RouteTable> = names.iter().map(|n| table(n)).collect();
        let n = names.len();
        let mut announced: BTreeMap<(usize, usize), BTreeSet<ClusterId>> = BTreeMap::new();
        for round in 1..=(4 * n as u64) {
            let mut changed = false;
            for i in 0..n {
                for j in [(i + 1) % n, (i + n - 1) % n] {
                    if i == j {
                        continue;
                    }
                    let before = announced.get(&(i, j)).cloned().unwrap_or_default();
                    let none = BTreeSet::new();
                    let updates =
                        tables[i].updates_for(&names[j], &before, &ExportPolicies::default(), stamp(&none, round));
                    let now: BTreeSet<ClusterId> = updates
                        .iter()
                        .filter(|u| matches!(u, RouteUpdate::Announce(_)))
                        .map(|u| u.destination().to_string())
                        .collect();
                    announced.insert((i, j), now);
                    for u in &updates {
                        if let Ok(true) = tables[j].apply(&names[i], u, &link(), &open(), T0) {
                            changed = true;
                        }
                    }
                }
            }
            if !changed && round > 1 {
                break;
            }
        }
        tables
    }

    /// Every stored path: no cluster twice, not through this cluster, from the next hop
    /// to the destination.
    fn sound(t: &RouteTable) -> Result<(), TestCaseError> {
        for r in t.records() {
            let distinct: BTreeSet<_> = r.path.iter().collect();
            prop_assert_eq!(distinct.len(), r.path.len());
            prop_assert!(!r.path.iter().any(|c| c == t.local()));
            prop_assert_eq!(r.path.first(), Some(&r.next_hop));
            prop_assert_eq!(r.path.last(), Some(&r.destination));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn a_ring_converges_without_loops(n in 3usize..7) {
            let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            let tables = converge(&names);
            for (i, t) in tables.iter().enumerate() {
                for (j, other) in names.iter().enumerate() {
                    if i != j {
                        let route = t.select(other, &[], T0).expect("every cluster reaches every other");
                        let ring_distance = (i as i64 - j as i64).unsigned_abs() as usize;
                        prop_assert_eq!(route.path.len(), ring_distance.min(n - ring_distance));
                    }
                }
                sound(t)?;
            }
        }

        #[test]
        fn any_sequence_of_updates_keeps_the_table_sound(
            ops in proptest::collection::vec((0u8..3, 0usize..3, proptest::collection::vec(0usize..6, 0..5), 0u64..40), 0..60),
        ) {
            // Hostile neighbours send whatever they like, in any order: the table never
            // panics, never stores a loop or a path through itself, and stays in bounds.
            let names = ["a", "b", "c", "d", "e", "f"];
            let mut config = TableConfig::new("a");
            config.max_destinations = 3;
            config.stability = Stability { hold_down_ms: 3, flap_threshold: 2, suppression_window_ms: 5 };
            let mut t = RouteTable::new(config);
            for (op, neighbor, rest, time) in ops {
                let neighbor = ["b", "c", "d"][neighbor];
                let path: Vec<&str> = std::iter::once(neighbor).chain(rest.iter().map(|i| names[*i])).collect();
                let now = T0 + time;
                match op {
                    0 => {
                        let mut a = ann(neighbor, &path, time + 1);
                        a.advertised_at_ms = now;
                        let _ = t.announce(neighbor, &a, &link(), &open(), now);
                    }
                    1 => {
                        let _ = t.withdraw(neighbor, &withdrawal(neighbor, &path, time + 1), now);
                    }
                    _ => {
                        t.neighbor_lost(neighbor, now);
                    }
                }
                prop_assert!(t.destinations().len() <= 3);
                sound(&t)?;
            }
        }

        #[test]
        fn selection_does_not_depend_on_insertion_order(
            latencies in proptest::collection::vec(0u8..4, 2..6),
            seed in any::<u64>(),
        ) {
            let anns: Vec<RouteAnnouncement> = latencies.iter().enumerate()
                .map(|(i, l)| with_latency(ann(&format!("n{i}"), &[&format!("n{i}"), "d"], 1), f64::from(*l)))
                .collect();
            let mut forward = table("a");
            for a in &anns {
                forward.announce(&a.advertiser, a, &link(), &open(), T0).unwrap();
            }
            let mut shuffled = anns.clone();
            shuffled.rotate_left((seed % anns.len() as u64) as usize);
            shuffled.reverse();
            let mut backward = table("a");
            for a in &shuffled {
                backward.announce(&a.advertiser, a, &link(), &open(), T0).unwrap();
            }
            prop_assert_eq!(forward.select("d", &[], T0), backward.select("d", &[], T0));
            prop_assert_eq!(forward.explain("d", &[], T0), backward.explain("d", &[], T0));
        }
    }
}
