//! Node-wide counters: plain atomics updated lock-free by every actor and connection,
//! rendered as Prometheus text by the monitor.
//!
//! This module sits below the actors that count into it (connection, pubsub, fabric,
//! supervisor) and depends on none of them, so the monitor reads it without the actors
//! and the monitor importing each other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::ErrorCode;

const LATENCY_BUCKETS_S: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

/// Node-wide counters, updated lock-free from every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    requests_ok: AtomicU64,
    requests_failed: [AtomicU64; 6],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    latency_sum_us: AtomicU64,
    /// Requests waiting on this node (the `mpreg_requests_in_flight` gauge), capped.
    admission: Arc<Admission>,
    connections: AtomicI64,
    actor_restarts: AtomicU64,
    notifications_delivered: AtomicU64,
    notifications_dropped: AtomicU64,
    /// Messages and encoded bytes in the pub/sub backlog (gauges).
    pubsub_backlog_messages: AtomicI64,
    pubsub_backlog_bytes: AtomicI64,
    /// Inputs refused by a configured bound, by the limit's settings name.
    limits_exceeded: LabelledCounter,
    /// Peer links refused, by reason.
    peers_refused: LabelledCounter,
    /// Fabric frames and statements dropped (unauthenticated, forged, stray), by reason.
    fabric_dropped: LabelledCounter,
    /// Federation route updates refused, by reason.
    route_rejected: LabelledCounter,
    /// Peers this node began to suspect (silent past `suspect_after_s`, or link lost).
    peers_suspected: AtomicU64,
    /// Peers this node removed for silence (not GOODBYEs).
    peers_removed: AtomicU64,
    /// Questions to the fabric (status, discovery) that waited for the describe gate.
    describes_waited: AtomicU64,
    /// Durable batches acknowledged, syncs, failed syncs, time in syncs, store durability.
    persistence_commits: AtomicU64,
    persistence_syncs: AtomicU64,
    persistence_sync_failures: AtomicU64,
    persistence_sync_us: AtomicU64,
    persistence_durable: AtomicI64,
    /// Catalog snapshots: when saved and restored, what was restored, failures.
    snapshots: SnapshotMetrics,
}

/// Catalog snapshot facts (times as `f64` bits: Unix seconds, 0 = never).
#[derive(Debug, Default)]
struct SnapshotMetrics {
    saved_at: AtomicU64,
    restored_at: AtomicU64,
    entries_restored: AtomicU64,
    members_restored: AtomicU64,
    corrupt: AtomicU64,
    save_failures: AtomicU64,
}

/// A counter family with one label, for events that are rare by nature (refusals): a
/// mutex-guarded map costs nothing on the hot path, which never touches it, and new
/// labels need no change here.
#[derive(Debug, Default)]
struct LabelledCounter(Mutex<BTreeMap<&'static str, u64>>);

impl LabelledCounter {
    fn add(&self, label: &'static str) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(label).or_default() += 1;
        }
    }

    fn get(&self, label: &str) -> u64 {
        self.0.lock().ok().and_then(|m| m.get(label).copied()).unwrap_or(0)
    }

    fn render(&self, out: &mut String, node: &str, name: &str, label: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(map) = self.0.lock() {
            for (value, n) in map.iter() {
                let _ = writeln!(out, "{name}{{node=\"{node}\",{label}=\"{value}\"}} {n}");
            }
        }
    }
}

/// The node-wide bound on requests in flight: whoever starts work that waits (a request
/// run as a task, a call served for a peer) asks for an [`InFlight`] permit first and is
/// refused (1006) when `limit` permits are out. The permit gives its place back when
/// dropped, so a request abandoned anywhere — its connection closed, its task cancelled —
/// leaves the count true.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { in_flight: AtomicUsize::new(0), limit: AtomicUsize::new(usize::MAX) }
    }
}

impl Admission {
    /// At most `limit` permits at once.
    pub fn new(limit: usize) -> Self {
        Admission { in_flight: AtomicUsize::new(0), limit: AtomicUsize::new(limit) }
    }

    /// A permit, or `None` when `limit` are already out (the caller answers 1006 and
    /// counts the refusal under `max_in_flight`).
    pub fn try_admit(self: &Arc<Self>) -> Option<InFlight> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| InFlight(self.clone()))
    }

    /// Permits out now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the bound (permits already out stay valid).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// One request in flight: counted from [`Admission::try_admit`] until dropped.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while its permit lives"]
pub struct InFlight(Arc<Admission>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Metrics {
    /// Counters for a node that admits at most `max_in_flight` waiting requests.
    pub fn with_max_in_flight(max_in_flight: usize) -> Self {
        Metrics { admission: Arc::new(Admission::new(max_in_flight)), ..Default::default() }
    }

    /// The node-wide in-flight bound; its permits make the `mpreg_requests_in_flight`
    /// gauge. Requests answered in place never wait and take no permit.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// A request was answered after `elapsed`, successfully or with `error`.
    pub fn request_finished(&self, elapsed: Duration, error: Option<ErrorCode>) {
        self.record_outcome(error);
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS_S.iter().position(|&b| seconds <= b) {
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A frame was answered without running anything (rejected before it started).
    pub fn record_outcome(&self, error: Option<ErrorCode>) {
        match error {
            None => self.requests_ok.fetch_add(1, Ordering::Relaxed),
            Some(code) => self.requests_failed[code as usize].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connections_changed(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// The supervisor restarted a child.
    pub fn record_restart(&self) {
        self.actor_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish queued `delivered` notifications to subscribers and dropped `dropped`
    /// because those subscribers' outboxes were full.
    pub fn record_notifications(&self, delivered: usize, dropped: usize) {
        self.notifications_delivered.fetch_add(delivered as u64, Ordering::Relaxed);
        self.notifications_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// The pub/sub backlog now holds `messages` messages of `bytes` encoded bytes.
    pub fn set_pubsub_backlog(&self, messages: usize, bytes: usize) {
        self.pubsub_backlog_messages.store(i64::try_from(messages).unwrap_or(i64::MAX), Ordering::Relaxed);
        self.pubsub_backlog_bytes.store(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// An input was refused because it exceeded `limit` (the setting's name).
    pub fn limit_exceeded(&self, limit: &'static str) {
        self.limits_exceeded.add(limit);
    }

    /// Refusals so far for `limit`.
    pub fn limit_exceeded_count(&self, limit: &str) -> u64 {
        self.limits_exceeded.get(limit)
    }

    /// A peer link was refused for `reason` (a short fixed label, e.g. `untrusted`).
    pub fn peer_refused(&self, reason: &'static str) {
        self.peers_refused.add(reason);
    }

    /// A federation route update was refused for `reason` ([`crate::federation::RouteRejection`]'s label).
    pub fn route_rejected(&self, reason: &'static str) {
        self.route_rejected.add(reason);
    }

    /// A fabric frame or relayed statement was dropped for `reason` (a short fixed label,
    /// e.g. `forged_statement`, `reply_wrong_link`).
    pub fn fabric_dropped(&self, reason: &'static str) {
        self.fabric_dropped.add(reason);
    }

    /// Peer links refused so far for `reason`.
    pub fn peer_refused_count(&self, reason: &str) -> u64 {
        self.peers_refused.get(reason)
    }

    /// Fabric frames dropped so far for `reason`.
    pub fn fabric_dropped_count(&self, reason: &str) -> u64 {
        self.fabric_dropped.get(reason)
    }

    /// This node began to suspect a peer (its link dropped, or it fell silent).
    pub fn peer_suspected(&self) {
        self.peers_suspected.fetch_add(1, Ordering::Relaxed);
    }

    /// This node removed a peer that stayed silent (a GOODBYE is not counted).
    pub fn peer_removed(&self) {
        self.peers_removed.fetch_add(1, Ordering::Relaxed);
    }

    /// A question to the fabric waited for the describe gate (see [`crate::fabric::describe`]).
    pub fn describe_waited(&self) {
        self.describes_waited.fetch_add(1, Ordering::Relaxed);
    }

    /// Questions that waited for the describe gate so far.
    pub fn describes_waited(&self) -> u64 {
        self.describes_waited.load(Ordering::Relaxed)
    }

    /// Suspicions so far.
    pub fn peers_suspected(&self) -> u64 {
        self.peers_suspected.load(Ordering::Relaxed)
    }

    /// Removals for silence so far.
    pub fn peers_removed(&self) -> u64 {
        self.peers_removed.load(Ordering::Relaxed)
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.actor_restarts.load(Ordering::Relaxed)
    }

    /// One group commit: `batches` acknowledged by one sync that took `took` (`ok`
    /// false: it failed, and none was acknowledged).
    pub fn record_persistence_sync(&self, batches: u64, took: std::time::Duration, ok: bool) {
        if ok {
            self.persistence_commits.fetch_add(batches, Ordering::Relaxed);
            self.persistence_syncs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.persistence_sync_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.persistence_sync_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Whether the node's store reaches stable storage (1) or is memory only (0).
    pub fn set_persistence_durable(&self, durable: bool) {
        self.persistence_durable.store(i64::from(durable), Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, node: &str) -> String {
        use std::fmt::Write;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP mpreg_requests_total RPC requests answered, by outcome.");
        let _ = writeln!(out, "# TYPE mpreg_requests_total counter");
        let _ = writeln!(out, "mpreg_requests_total{{node=\"{node}\",code=\"ok\"}} {}", load(&self.requests_ok));
        for code in ErrorCode::ALL {
            let n = load(&self.requests_failed[code as usize]);
            let _ = writeln!(out, "mpreg_requests_total{{node=\"{node}\",code=\"{}\"}} {n}", code.as_u16());
        }
        let _ = writeln!(out, "# HELP mpreg_request_duration_seconds Whole-request latency.");
        let _ = writeln!(out, "# TYPE mpreg_request_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
            cumulative += load(&self.latency_buckets[i]);
            let _ =
                writeln!(out, "mpreg_request_duration_seconds_bucket{{node=\"{node}\",le=\"{bound}\"}} {cumulative}");
        }
        let count = load(&self.requests_ok) + self.requests_failed.iter().map(load).sum::<u64>();
        let _ = writeln!(out, "mpreg_request_duration_seconds_bucket{{node=\"{node}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "mpreg_request_duration_seconds_sum{{node=\"{node}\"}} {}",
            load(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "mpreg_request_duration_seconds_count{{node=\"{node}\"}} {count}");
        let gauges = [
            ("mpreg_requests_in_flight", "Requests being executed.", self.admission.in_flight() as i64),
            ("mpreg_connections", "Open websocket connections.", self.connections.load(Ordering::Relaxed)),
            (
                "mpreg_pubsub_backlog_messages",
                "Messages kept for backlog replay.",
                self.pubsub_backlog_messages.load(Ordering::Relaxed),
            ),
            (
                "mpreg_pubsub_backlog_bytes",
                "Encoded bytes kept for backlog replay.",
                self.pubsub_backlog_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{node}\"}} {value}");
        }
        let counters = [
            ("mpreg_actor_restarts_total", "Supervised actor restarts.", load(&self.actor_restarts)),
            (
                "mpreg_pubsub_notifications_total",
                "Notifications queued to subscribers.",
                load(&self.notifications_delivered),
            ),
            (
                "mpreg_pubsub_notifications_dropped_total",
                "Notifications dropped: subscriber outbox full.",
                load(&self.notifications_dropped),
            ),
            (
                "mpreg_peer_suspected_total",
                "Peers this node began to suspect (link lost or silent past suspect_after_s).",
                load(&self.peers_suspected),
            ),
            (
                "mpreg_peer_removed_total",
                "Peers this node removed after silence (GOODBYEs not counted).",
                load(&self.peers_removed),
            ),
            (
                "mpreg_fabric_describes_waited_total",
                "Status and discovery questions that waited because the fabric was answering others.",
                load(&self.describes_waited),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {value}");
        }
        self.limits_exceeded.render(
            &mut out,
            node,
            "mpreg_limit_exceeded_total",
            "limit",
            "Inputs refused by a configured bound, by limit.",
        );
        self.peers_refused.render(
            &mut out,
            node,
            "mpreg_peer_refused_total",
            "reason",
            "Peer links refused, by reason.",
        );
        self.fabric_dropped.render(
            &mut out,
            node,
            "mpreg_fabric_dropped_total",
            "reason",
            "Fabric frames and relayed statements dropped (unauthenticated, forged, stray), by reason.",
        );
        self.route_rejected.render(
            &mut out,
            node,
            "mpreg_federation_route_rejected_total",
            "reason",
            "Federation route updates refused (unsigned, forged, replayed, wrong advertiser, policy...), by reason.",
        );
        let persistence = [
            ("mpreg_persistence_commits_total", "Durable batches acknowledged.", load(&self.persistence_commits)),
            (
                "mpreg_persistence_syncs_total",
                "Group commits: one flush + fdatasync each.",
                load(&self.persistence_syncs),
            ),
            (
                "mpreg_persistence_sync_failures_total",
                "Syncs that failed; every waiter of the group got an error.",
                load(&self.persistence_sync_failures),
            ),
        ];
        for (name, help, value) in persistence {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP mpreg_persistence_sync_seconds_total Time spent in syncs (divide by syncs for the mean).\n\
             # TYPE mpreg_persistence_sync_seconds_total counter\n\
             mpreg_persistence_sync_seconds_total{{node=\"{node}\"}} {}",
            load(&self.persistence_sync_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP mpreg_persistence_durable 1 when the store is on disk, 0 when memory only.\n\
             # TYPE mpreg_persistence_durable gauge\nmpreg_persistence_durable{{node=\"{node}\"}} {}",
            self.persistence_durable.load(Ordering::Relaxed)
        );
        self.render_snapshots(&mut out, node);
        out
    }
}

/// Catalog snapshots (the fabric's `snapshot` module).
impl Metrics {
    /// A catalog snapshot built at `at` (Unix seconds) is on disk.
    pub fn catalog_snapshot_saved(&self, at: f64) {
        self.snapshots.saved_at.store(at.to_bits(), Ordering::Relaxed);
    }

    /// A catalog snapshot was restored at `at`: `entries` function entries of `members` nodes.
    pub fn catalog_snapshot_restored(&self, at: f64, entries: u64, members: u64) {
        self.snapshots.restored_at.store(at.to_bits(), Ordering::Relaxed);
        self.snapshots.entries_restored.store(entries, Ordering::Relaxed);
        self.snapshots.members_restored.store(members, Ordering::Relaxed);
    }

    /// A stored catalog snapshot could not be read; the node started without it.
    pub fn catalog_snapshot_corrupt(&self) {
        self.snapshots.corrupt.fetch_add(1, Ordering::Relaxed);
    }

    /// A catalog snapshot could not be saved.
    pub fn catalog_snapshot_save_failed(&self) {
        self.snapshots.save_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Unreadable catalog snapshots seen at start.
    pub fn catalog_snapshots_corrupt(&self) -> u64 {
        self.snapshots.corrupt.load(Ordering::Relaxed)
    }

    fn render_snapshots(&self, out: &mut String, node: &str) {
        use std::fmt::Write;
        let s = &self.snapshots;
        let time = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let metrics = [
            (
                "mpreg_catalog_snapshot_saved_timestamp_seconds",
                "gauge",
                "Unix time of the last catalog snapshot saved (0: never).",
                time(&s.saved_at),
            ),
            (
                "mpreg_catalog_snapshot_restored_timestamp_seconds",
                "gauge",
                "Unix time the catalog snapshot was restored at start (0: none).",
                time(&s.restored_at),
            ),
            (
                "mpreg_catalog_snapshot_entries_restored",
                "gauge",
                "Function entries restored from the catalog snapshot (unconfirmed until a peer confirms).",
                count(&s.entries_restored),
            ),
            (
                "mpreg_catalog_snapshot_members_restored",
                "gauge",
                "Members restored from the catalog snapshot.",
                count(&s.members_restored),
            ),
            (
                "mpreg_catalog_snapshot_corrupt_total",
                "counter",
                "Stored catalog snapshots that could not be read (the node started without).",
                count(&s.corrupt),
            ),
            (
                "mpreg_catalog_snapshot_save_failures_total",
                "counter",
                "Catalog snapshots that could not be saved.",
                count(&s.save_failures),
            ),
        ];
        for (name, kind, help, value) in metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {value}");
        }
    }
}

/// A Prometheus label value: functions and workers are named by their owners, so
/// backslashes, `"` and newlines are escaped as the text format requires.
pub fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_rendered_by_label() {
        let metrics = Metrics::default();
        metrics.limit_exceeded("max_reply_bytes");
        metrics.limit_exceeded("max_reply_bytes");
        metrics.peer_refused("untrusted");
        assert_eq!(metrics.limit_exceeded_count("max_reply_bytes"), 2);
        let text = metrics.render("n1");
        assert!(text.contains("mpreg_limit_exceeded_total{node=\"n1\",limit=\"max_reply_bytes\"} 2"), "{text}");
        assert!(text.contains("mpreg_peer_refused_total{node=\"n1\",reason=\"untrusted\"} 1"), "{text}");
    }

    #[test]
    fn suspicions_and_removals_are_counted_from_zero() {
        let metrics = Metrics::default();
        assert!(metrics.render("n1").contains("mpreg_peer_suspected_total{node=\"n1\"} 0"));
        metrics.peer_suspected();
        metrics.peer_removed();
        metrics.peer_suspected();
        assert_eq!((metrics.peers_suspected(), metrics.peers_removed()), (2, 1));
        let text = metrics.render("n1");
        assert!(text.contains("mpreg_peer_suspected_total{node=\"n1\"} 2"), "{text}");
        assert!(text.contains("mpreg_peer_removed_total{node=\"n1\"} 1"), "{text}");
    }

    #[test]
    fn catalog_snapshot_facts_are_rendered() {
        let metrics = Metrics::default();
        assert!(metrics.render("n1").contains("mpreg_catalog_snapshot_saved_timestamp_seconds{node=\"n1\"} 0\n"));
        metrics.catalog_snapshot_saved(1700000000.5);
        metrics.catalog_snapshot_restored(1700000001.0, 12, 2);
        metrics.catalog_snapshot_corrupt();
        let text = metrics.render("n1");
        for line in [
            "mpreg_catalog_snapshot_saved_timestamp_seconds{node=\"n1\"} 1700000000.5",
            "mpreg_catalog_snapshot_restored_timestamp_seconds{node=\"n1\"} 1700000001",
            "mpreg_catalog_snapshot_entries_restored{node=\"n1\"} 12",
            "mpreg_catalog_snapshot_corrupt_total{node=\"n1\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn admission_refuses_past_its_limit_and_permits_give_back_on_drop() {
        let metrics = Metrics::with_max_in_flight(2);
        let admission = metrics.admission();
        let first = admission.try_admit().expect("first admitted");
        let second = admission.try_admit().expect("second admitted");
        assert!(admission.try_admit().is_none(), "a third is over the limit");
        assert!(metrics.render("n1").contains("mpreg_requests_in_flight{node=\"n1\"} 2"));
        drop(first);
        let third = admission.try_admit().expect("room again after a drop");
        drop((second, third));
        assert_eq!(admission.in_flight(), 0);
        assert!(metrics.render("n1").contains("mpreg_requests_in_flight{node=\"n1\"} 0"));
    }
}
