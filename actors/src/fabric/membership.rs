//! Membership and catalog: who is in the cluster, alive or suspected, and which functions
//! each node serves. Plain state, no actix, no I/O; time (seconds, monotonic) is passed in.
//!
//! Liveness is decided by SWIM ([`super::swim`]), which the fabric runs beside this core
//! and whose transitions it applies here: [`MembershipCore::mark_suspect`] (a failed
//! probe, or the direct link dropped), [`MembershipCore::mark_alive`] (refuted),
//! [`MembershipCore::remove_dead`] (suspicion ran out). This core keeps what SWIM does
//! not: each member's record (identity, URL, links, catalog version), versioned by the
//! member's own `heartbeat` counter, which it raises only when its record changes; the
//! records travel piggybacked on SWIM's messages and in its push-pull, so an idle cluster
//! sends none of them.
//!
//! Removed and replaced instances leave a tombstone, so gossip still carrying an old
//! counter cannot resurrect them; a GOODBYE also forbids redialling the instance for
//! `departed_grace`, while a restarted node (new instance) is accepted at once.
//!
//! Members restored from a snapshot ([`MembershipCore::restore`]) start `Unconfirmed`:
//! routed to and dialled, but neither suspected nor gossiped on, until their STATUS or a
//! live peer's digest (a heartbeat) or catalog (a newer version) names the same instance.
//! Unconfirmed members nobody confirms are removed when their entries' TTL runs out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use super::snapshot::{SnapshotCatalog, SnapshotMember};
use super::wire::{CatalogDelta, ClusterId, FunctionAbout, InstanceId, MemberDigest, NodeId, NodeInfo};
use crate::function::FunctionIdentity;

/// Members one node tracks at most (the rest are refused, counted, and learned when
/// there is room): bounds what invented records can make a node hold.
pub const MAX_MEMBERS: usize = 4096;

/// Neighbours kept of one member's record (a node has at most `peer_fanout` plus
/// `max_inbound_links` links; the rest of a longer list is cut).
pub const MAX_NEIGHBOURS: usize = 1024;

/// A record's neighbour list, cut at [`MAX_NEIGHBOURS`].
fn bounded_neighbours(neighbours: &[NodeId]) -> Vec<NodeId> {
    neighbours.iter().take(MAX_NEIGHBOURS).cloned().collect()
}

/// Timing of failure detection and catalog freshness (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MembershipTiming {
    /// A member silent this long is suspected.
    pub suspect_after: f64,
    /// ... and removed after this long.
    pub remove_after: f64,
    /// A departed instance is not redialled (nor accepted) for this long.
    pub departed_grace: f64,
    /// Restored entries and members nobody confirms expire this long after they were last
    /// received or heard of; a member's entries otherwise stay while it is a member.
    pub catalog_ttl: f64,
}

impl Default for MembershipTiming {
    fn default() -> Self {
        MembershipTiming { suspect_after: 2.0, remove_after: 6.0, departed_grace: 5.0, catalog_ttl: 60.0 }
    }
}

/// Liveness as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from recently.
    Alive,
    /// Silent, or its direct link dropped: not routed to.
    Suspect,
    /// Restored from a snapshot and not yet confirmed by the node or a live peer: routed
    /// to and dialled, not gossiped on.
    Unconfirmed,
}

/// One known node.
#[derive(Debug, Clone)]
pub struct Member {
    /// Identity and URL.
    pub info: NodeInfo,
    /// Highest heartbeat seen.
    pub heartbeat: u64,
    /// When the heartbeat last rose (local clock).
    pub heard_at: f64,
    /// Alive or suspected.
    pub state: MemberState,
    /// Its direct links, as it reported them.
    pub neighbours: Vec<NodeId>,
    /// Version of its catalog it advertised.
    pub catalog_version: u64,
}

/// Something that changed, for logging and for the routing snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node (instance) became known.
    Joined(NodeId, String),
    /// A node went silent or lost its link.
    Suspected(NodeId),
    /// A suspected node was heard from again.
    Recovered(NodeId),
    /// A node was dropped after `remove_after` of silence.
    Removed(NodeId),
    /// A node said GOODBYE.
    Departed(NodeId),
    /// A member restored from a snapshot was confirmed by it or by a live peer.
    Confirmed(NodeId),
}

/// What [`MembershipCore::restore`] kept and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Members restored (unconfirmed).
    pub members: usize,
    /// Function entries restored with them.
    pub entries: usize,
    /// Members or entry sets dropped: past their TTL, ours, another cluster's.
    pub dropped: usize,
}

/// Why a peer's STATUS was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This node tracks [`MAX_MEMBERS`] members already.
    Full,
    /// It belongs to another cluster (strict isolation).
    OtherCluster(ClusterId),
    /// That instance said GOODBYE moments ago.
    Departed,
    /// It claims to be us.
    SelfLink,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full => write!(f, "this node tracks {MAX_MEMBERS} members already"),
            Refusal::OtherCluster(c) => write!(f, "peer belongs to cluster {c}; this cluster admits no other"),
            Refusal::Departed => write!(f, "peer instance departed (GOODBYE) and is within its grace period"),
            Refusal::SelfLink => write!(f, "peer is this node"),
        }
    }
}

/// What a membership digest changed.
#[derive(Debug, Default)]
pub struct DigestOutcome {
    /// Joins, suspicions cleared.
    pub events: Vec<MembershipEvent>,
    /// Nodes whose entries we lack or hold at an older version.
    pub wanted: Vec<NodeId>,
    /// New nodes ignored because the digest named more than allowed.
    pub refused: usize,
}

struct StoredCatalog {
    delta: CatalogDelta,
    received_at: f64,
}

/// The membership and catalog state machine.
pub struct MembershipCore {
    me: NodeInfo,
    timing: MembershipTiming,
    heartbeat: u64,
    catalog_version: u64,
    functions: Vec<FunctionIdentity>,
    queues: Vec<String>,
    about: Vec<FunctionAbout>,
    /// Clusters this node bridges to (advertised in its catalog).
    clusters: Vec<String>,
    members: HashMap<NodeId, Member>,
    catalogs: HashMap<NodeId, StoredCatalog>,
    /// (node, instance) -> (highest heartbeat seen, until).
    tombstones: HashMap<(NodeId, InstanceId), (u64, f64)>,
    departed: HashMap<(NodeId, InstanceId), f64>,
    neighbours: Vec<NodeId>,
}

impl MembershipCore {
    /// The state of a node that knows only itself.
    pub fn new(me: NodeInfo, timing: MembershipTiming, functions: Vec<FunctionIdentity>) -> Self {
        MembershipCore {
            me,
            timing,
            heartbeat: 0,
            catalog_version: 1,
            functions,
            queues: Vec::new(),
            about: Vec::new(),
            clusters: Vec::new(),
            members: HashMap::new(),
            catalogs: HashMap::new(),
            tombstones: HashMap::new(),
            departed: HashMap::new(),
            neighbours: Vec::new(),
        }
    }

    /// This node.
    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// Our function entries and their version.
    pub fn local_catalog(&self, now_unix: f64) -> CatalogDelta {
        CatalogDelta {
            node: self.me.node.clone(),
            instance_id: self.me.instance_id.clone(),
            cluster_id: self.me.cluster_id.clone(),
            version: self.catalog_version,
            advertised_at: now_unix,
            ttl_s: self.timing.catalog_ttl,
            functions: self.functions.clone(),
            queues: self.queues.clone(),
            about: self.about.clone(),
            clusters: self.clusters.clone(),
            proof: None,
        }
    }

    /// What we tell about our functions (parameters, documentation); advertised with the
    /// next version.
    pub fn set_local_about(&mut self, about: Vec<FunctionAbout>) {
        self.about = about;
    }

    /// Our functions changed: a new version to flood.
    pub fn set_local_functions(&mut self, functions: Vec<FunctionIdentity>, now_unix: f64) -> CatalogDelta {
        self.functions = functions;
        self.catalog_version += 1;
        self.local_catalog(now_unix)
    }

    /// Our queues changed: a new version to flood.
    pub fn set_local_queues(&mut self, queues: Vec<String>, now_unix: f64) -> CatalogDelta {
        self.queues = queues;
        self.catalog_version += 1;
        self.local_catalog(now_unix)
    }

    /// The clusters we reach over federation bridges changed: a new version to flood.
    pub fn set_local_clusters(&mut self, clusters: Vec<String>, now_unix: f64) -> CatalogDelta {
        self.clusters = clusters;
        self.catalog_version += 1;
        self.local_catalog(now_unix)
    }

    /// The clusters we advertise as reachable through us.
    pub fn local_clusters(&self) -> &[String] {
        &self.clusters
    }

    /// Records which nodes we have live links to (reported in our digest).
    pub fn set_neighbours(&mut self, neighbours: Vec<NodeId>) {
        self.neighbours = neighbours;
    }

    /// Checks a peer's STATUS without learning anything; `Err` means refuse the link.
    pub fn check(&self, info: &NodeInfo, now: f64) -> Result<(), Refusal> {
        if info.cluster_id != self.me.cluster_id {
            return Err(Refusal::OtherCluster(info.cluster_id.clone()));
        }
        if info.node == self.me.node {
            return Err(Refusal::SelfLink);
        }
        if self.is_departed(&info.node, &info.instance_id, now) {
            return Err(Refusal::Departed);
        }
        Ok(())
    }

    /// Checks a peer's STATUS and learns it; `Err` means refuse the link.
    pub fn admit(&mut self, info: &NodeInfo, now: f64) -> Result<Vec<MembershipEvent>, Refusal> {
        self.check(info, now)?;
        if !self.has_room_for(&info.node) {
            return Err(Refusal::Full);
        }
        let digest = MemberDigest { info: info.clone(), heartbeat: 0, catalog_version: 0, neighbours: Vec::new() };
        let mut events = Vec::new();
        self.observe(&digest, now, true, &mut events);
        Ok(events)
    }

    /// Whether `node` is known, or a new member still fits under [`MAX_MEMBERS`].
    fn has_room_for(&self, node: &str) -> bool {
        self.members.len() < MAX_MEMBERS || self.members.contains_key(node)
    }

    fn is_departed(&self, node: &str, instance: &str, now: f64) -> bool {
        self.departed.get(&(node.to_owned(), instance.to_owned())).is_some_and(|until| *until > now)
    }

    fn observe(&mut self, d: &MemberDigest, now: f64, direct: bool, events: &mut Vec<MembershipEvent>) {
        let node = &d.info.node;
        if *node == self.me.node || d.info.cluster_id != self.me.cluster_id {
            return;
        }
        let key = (node.clone(), d.info.instance_id.clone());
        if self.is_departed(node, &d.info.instance_id, now) {
            return;
        }
        if let Some((hb, until)) = self.tombstones.get(&key) {
            if *until > now && d.heartbeat <= *hb && !direct {
                return;
            }
        }
        match self.members.get_mut(node) {
            Some(m) if m.info.instance_id == d.info.instance_id => {
                // A digest relayed along a slower path can be older than what we hold: its
                // neighbour list must not replace a newer one (routes would flap).
                let at_least_as_fresh = d.heartbeat >= m.heartbeat;
                if d.heartbeat > m.heartbeat || direct {
                    m.heartbeat = m.heartbeat.max(d.heartbeat);
                    m.heard_at = now;
                    match m.state {
                        // A newer record is no proof of life (SWIM decides): only the
                        // node's own STATUS on a fresh link is.
                        MemberState::Suspect if direct => {
                            events.push(MembershipEvent::Recovered(node.clone()));
                            m.state = MemberState::Alive;
                        }
                        MemberState::Suspect | MemberState::Alive => {}
                        // Restored members have heartbeat 0: any heartbeat from a live
                        // peer, or the node's own STATUS, confirms them.
                        MemberState::Unconfirmed => {
                            events.push(MembershipEvent::Confirmed(node.clone()));
                            m.state = MemberState::Alive;
                        }
                    }
                }
                if at_least_as_fresh && (!d.neighbours.is_empty() || d.heartbeat > 0) {
                    m.neighbours = bounded_neighbours(&d.neighbours);
                }
                m.catalog_version = m.catalog_version.max(d.catalog_version);
                m.info.url = d.info.url.clone();
            }
            existing => {
                if let Some(old) = existing {
                    // A new instance replaces the old one; the old one must not come back.
                    let old_key = (node.clone(), old.info.instance_id.clone());
                    self.tombstones.insert(old_key, (old.heartbeat, now + self.timing.remove_after * 2.0));
                    self.catalogs.remove(node);
                }
                self.members.insert(
                    node.clone(),
                    Member {
                        info: d.info.clone(),
                        heartbeat: d.heartbeat,
                        heard_at: now,
                        state: MemberState::Alive,
                        neighbours: bounded_neighbours(&d.neighbours),
                        catalog_version: d.catalog_version,
                    },
                );
                events.push(MembershipEvent::Joined(node.clone(), d.info.instance_id.clone()));
            }
        }
    }

    /// Applies a peer's membership digest; returns events and the nodes whose catalog we
    /// lack or hold at an older version (to request from that peer).
    pub fn apply_digest(&mut self, digests: &[MemberDigest], now: f64) -> (Vec<MembershipEvent>, Vec<NodeId>) {
        let outcome = self.apply_digest_bounded(digests, now, usize::MAX);
        (outcome.events, outcome.wanted)
    }

    /// [`MembershipCore::apply_digest`], learning at most `max_new` nodes not known
    /// before from this one digest (the rest are ignored and counted in `refused`), so a
    /// digest naming thousands of invented nodes cannot make this node track, or dial,
    /// them all. Genuine nodes beyond the cap are learned from the next digests.
    pub fn apply_digest_bounded(&mut self, digests: &[MemberDigest], now: f64, max_new: usize) -> DigestOutcome {
        let mut events = Vec::new();
        let mut wanted = Vec::new();
        let (mut learned, mut refused) = (0usize, 0usize);
        for d in digests {
            let known = d.info.node == self.me.node || self.members.contains_key(&d.info.node);
            if !known {
                if learned >= max_new || !self.has_room_for(&d.info.node) {
                    refused += 1;
                    continue;
                }
                learned += 1;
            }
            self.observe(d, now, false, &mut events);
            let Some(member) = self.members.get(&d.info.node) else { continue };
            if member.info.instance_id != d.info.instance_id || d.catalog_version == 0 {
                continue;
            }
            let have = self.catalogs.get(&d.info.node).map(|c| c.delta.version);
            if have.is_none_or(|v| v < d.catalog_version) {
                wanted.push(d.info.node.clone());
            }
        }
        DigestOutcome { events, wanted, refused }
    }

    /// Applies an entry set; whether it was news (and should be flooded on).
    pub fn apply_catalog(&mut self, delta: &CatalogDelta, now: f64) -> bool {
        if !self.catalog_is_news(delta, now) {
            return false;
        }
        self.catalogs.insert(delta.node.clone(), StoredCatalog { delta: delta.clone(), received_at: now });
        // A newer version of a restored member's entries: it advertised since.
        if let Some(m) = self.members.get_mut(&delta.node).filter(|m| m.state == MemberState::Unconfirmed) {
            m.state = MemberState::Alive;
            m.heard_at = now;
        }
        true
    }

    /// Whether [`Self::apply_catalog`] would store `delta`: a newer entry set of a member's
    /// current instance. Cheap, so a frame's entry sets are sorted out by their outer
    /// fields before their signatures are checked; an honest sender's outer fields are the
    /// signed ones, so only a set that lies about them can be skipped unchecked.
    pub fn catalog_is_news(&self, delta: &CatalogDelta, now: f64) -> bool {
        if delta.node == self.me.node || delta.cluster_id != self.me.cluster_id {
            return false;
        }
        if self.is_departed(&delta.node, &delta.instance_id, now) {
            return false;
        }
        if self.members.get(&delta.node).is_none_or(|m| m.info.instance_id != delta.instance_id) {
            // Not a member (yet), or an older or not yet known newer instance: entries are
            // kept only for members, so a frame naming invented nodes stores nothing. The
            // digest that makes a node a member also asks for its entries.
            return false;
        }
        self.catalogs
            .get(&delta.node)
            .is_none_or(|stored| stored.delta.instance_id != delta.instance_id || stored.delta.version < delta.version)
    }

    /// The entry sets of `nodes` that we hold (answering a catalog request).
    pub fn catalogs_of(&self, nodes: &[NodeId], now_unix: f64) -> Vec<CatalogDelta> {
        nodes
            .iter()
            .filter_map(|n| {
                if *n == self.me.node {
                    Some(self.local_catalog(now_unix))
                } else {
                    self.catalogs.get(n).filter(|_| self.is_confirmed(n)).map(|c| c.delta.clone())
                }
            })
            .collect()
    }

    /// Every entry set we hold, ours included (the snapshot sent when a link opens).
    pub fn all_catalogs(&self, now_unix: f64) -> Vec<CatalogDelta> {
        let confirmed = self.catalogs.iter().filter(|(n, _)| self.is_confirmed(n)).map(|(_, c)| c.delta.clone());
        std::iter::once(self.local_catalog(now_unix)).chain(confirmed).collect()
    }

    /// Whether `node` is a member that is not merely restored (its entries may be passed on).
    fn is_confirmed(&self, node: &str) -> bool {
        self.members.get(node).is_some_and(|m| m.state != MemberState::Unconfirmed)
    }

    /// A node said GOODBYE (directly or relayed); whether it was news.
    pub fn depart(&mut self, node: &str, instance: &str, now: f64) -> bool {
        let key = (node.to_owned(), instance.to_owned());
        let news = !self.is_departed(node, instance, now);
        self.departed.insert(key, now + self.timing.departed_grace);
        if self.members.get(node).is_some_and(|m| m.info.instance_id == instance) {
            self.members.remove(node);
            self.catalogs.remove(node);
        }
        news
    }

    /// SWIM suspects `node` (this `instance`): not routed to until it refutes.
    pub fn mark_suspect(&mut self, node: &str, instance: &str) -> Option<MembershipEvent> {
        let m = self.members.get_mut(node).filter(|m| m.info.instance_id == instance)?;
        (m.state == MemberState::Alive).then(|| {
            m.state = MemberState::Suspect;
            MembershipEvent::Suspected(node.to_owned())
        })
    }

    /// SWIM heard `node` (this `instance`) refute its suspicion.
    pub fn mark_alive(&mut self, node: &str, instance: &str, now: f64) -> Option<MembershipEvent> {
        let m = self.members.get_mut(node).filter(|m| m.info.instance_id == instance)?;
        m.heard_at = now;
        (m.state == MemberState::Suspect).then(|| {
            m.state = MemberState::Alive;
            MembershipEvent::Recovered(node.to_owned())
        })
    }

    /// SWIM declared `node` (this `instance`) dead: removed with its entries; a
    /// tombstone keeps records of that instance at its last heartbeat from bringing it
    /// back (it returns with a newer record, after refuting).
    pub fn remove_dead(&mut self, node: &str, instance: &str, now: f64) -> Option<MembershipEvent> {
        self.members.get(node).filter(|m| m.info.instance_id == instance)?;
        let m = self.members.remove(node)?;
        self.tombstones
            .insert((node.to_owned(), instance.to_owned()), (m.heartbeat, now + self.timing.remove_after * 2.0));
        self.catalogs.remove(node);
        Some(MembershipEvent::Removed(node.to_owned()))
    }

    /// Our record changed (links, catalog version, SWIM incarnation): a newer heartbeat,
    /// so that records relayed from others replace the older one.
    pub fn bump_heartbeat(&mut self) {
        self.heartbeat += 1;
    }

    /// The version of our function entries.
    pub fn catalog_version(&self) -> u64 {
        self.catalog_version
    }

    /// The version of `node`'s entries held (0: none).
    pub fn catalog_version_of(&self, node: &str) -> u64 {
        self.catalogs.get(node).map_or(0, |c| c.delta.version)
    }

    /// The highest heartbeat of `node`'s record held, with its instance.
    pub fn record_of(&self, node: &str) -> Option<(&str, u64)> {
        self.members.get(node).map(|m| (m.info.instance_id.as_str(), m.heartbeat))
    }

    /// Housekeeping: restored members nobody confirmed are removed when their entries
    /// would expire; their expired entries, tombstones and departures are dropped. The
    /// entries of a confirmed member are not refreshed and do not expire: they go when SWIM
    /// declares it dead or it leaves (a refresh of every node's entries would cost each
    /// node O(N log N) messages per TTL).
    pub fn tick(&mut self, now: f64) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        let unconfirmed_limit = self.timing.remove_after.max(self.timing.catalog_ttl);
        let expired: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.state == MemberState::Unconfirmed && now - m.heard_at > unconfirmed_limit)
            .map(|(node, _)| node.clone())
            .collect();
        for node in expired {
            self.members.remove(&node);
            self.catalogs.remove(&node);
            events.push(MembershipEvent::Removed(node));
        }
        let ttl = self.timing.catalog_ttl;
        let members = &self.members;
        self.catalogs.retain(|node, c| {
            members.get(node).is_some_and(|m| m.state != MemberState::Unconfirmed) || now - c.received_at <= ttl
        });
        self.tombstones.retain(|_, (_, until)| *until > now);
        self.departed.retain(|_, until| *until > now);
        events
    }

    /// Our own record.
    pub fn own_digest(&self) -> MemberDigest {
        MemberDigest {
            info: self.me.clone(),
            heartbeat: self.heartbeat,
            catalog_version: self.catalog_version,
            neighbours: self.neighbours.clone(),
        }
    }

    /// Our view, to gossip: ourselves and every member.
    pub fn digest(&self) -> Vec<MemberDigest> {
        let me = self.own_digest();
        // Restored members are claims: not passed on until confirmed.
        let confirmed = self.members.values().filter(|m| m.state != MemberState::Unconfirmed);
        std::iter::once(me)
            .chain(confirmed.map(|m| MemberDigest {
                info: m.info.clone(),
                heartbeat: m.heartbeat,
                catalog_version: m.catalog_version,
                neighbours: m.neighbours.clone(),
            }))
            .collect()
    }

    /// Every member and the entries held, for a snapshot: times converted from the local
    /// clock (`now`) to Unix seconds (`now_unix`). A member SWIM holds alive, and its
    /// entries, are current: saved as heard of and received now.
    pub fn snapshot(&self, now: f64, now_unix: f64) -> Vec<SnapshotMember> {
        let to_unix = |t: f64| now_unix - (now - t).max(0.0);
        let mut out: Vec<SnapshotMember> = self
            .members
            .values()
            .map(|m| {
                let current = |t: f64| if m.state == MemberState::Alive { now_unix } else { to_unix(t) };
                SnapshotMember {
                    info: m.info.clone(),
                    heard_at: current(m.heard_at),
                    catalog: self
                        .catalogs
                        .get(&m.info.node)
                        .filter(|c| c.delta.instance_id == m.info.instance_id)
                        .map(|c| SnapshotCatalog { delta: c.delta.clone(), received_at: current(c.received_at) }),
                }
            })
            .collect();
        out.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        out
    }

    /// Restores members and entries from a snapshot, as `Unconfirmed`: skips this node's
    /// own entries (a restarted node is a new instance), other clusters, nodes already
    /// known, members last heard of and entries last received longer ago than the catalog
    /// TTL (the entry set's own `ttl_s` when shorter). Signatures are the caller's to check.
    pub fn restore(&mut self, members: Vec<SnapshotMember>, now: f64, now_unix: f64) -> RestoreOutcome {
        let mut outcome = RestoreOutcome::default();
        let ttl = self.timing.catalog_ttl;
        for saved in members {
            let info = saved.info;
            let age = (now_unix - saved.heard_at).max(0.0);
            if info.node == self.me.node
                || info.cluster_id != self.me.cluster_id
                || self.members.contains_key(&info.node)
                || self.is_departed(&info.node, &info.instance_id, now)
                || age > ttl
            {
                outcome.dropped += 1;
                continue;
            }
            let catalog = saved.catalog.filter(|c| {
                let fresh = (now_unix - c.received_at).max(0.0) <= c.delta.ttl_s.min(ttl);
                let same = c.delta.node == info.node
                    && c.delta.instance_id == info.instance_id
                    && c.delta.cluster_id == info.cluster_id;
                if !(fresh && same) {
                    outcome.dropped += 1;
                }
                fresh && same
            });
            let mut member = Member {
                info: info.clone(),
                heartbeat: 0,
                heard_at: now - age,
                state: MemberState::Unconfirmed,
                neighbours: Vec::new(),
                catalog_version: 0,
            };
            if let Some(c) = catalog {
                member.catalog_version = c.delta.version;
                outcome.entries += c.delta.functions.len();
                let received_at = now - (now_unix - c.received_at).max(0.0);
                self.catalogs.insert(info.node.clone(), StoredCatalog { delta: c.delta, received_at });
            }
            self.members.insert(info.node, member);
            outcome.members += 1;
        }
        outcome
    }

    /// Every member.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Function entries of members in `state`: (node, cluster, identity).
    pub fn functions_of(&self, state: MemberState) -> Vec<(NodeId, ClusterId, FunctionIdentity)> {
        let mut out = Vec::new();
        for (node, stored) in &self.catalogs {
            let Some(m) = self.members.get(node) else { continue };
            if m.state != state || m.info.instance_id != stored.delta.instance_id {
                continue;
            }
            out.extend(
                stored.delta.functions.iter().map(|f| (node.clone(), stored.delta.cluster_id.clone(), f.clone())),
            );
        }
        out
    }

    /// Clusters reached through members in `state` (their bridges): (cluster, node).
    pub fn clusters_of(&self, state: MemberState) -> Vec<(String, NodeId)> {
        let mut out = Vec::new();
        for (node, stored) in &self.catalogs {
            let Some(m) = self.members.get(node) else { continue };
            if m.state != state || m.info.instance_id != stored.delta.instance_id {
                continue;
            }
            out.extend(stored.delta.clusters.iter().map(|c| (c.clone(), node.clone())));
        }
        out
    }

    /// Queues owned by members in `state`: (queue, owner, owner's url).
    pub fn queues_of(&self, state: MemberState) -> Vec<(String, NodeId, String)> {
        let mut out = Vec::new();
        for (node, stored) in &self.catalogs {
            let Some(m) = self.members.get(node) else { continue };
            if m.state != state || m.info.instance_id != stored.delta.instance_id {
                continue;
            }
            out.extend(stored.delta.queues.iter().map(|q| (q.clone(), node.clone(), m.info.url.clone())));
        }
        out
    }

    /// A cheap fingerprint of what discovery shows: it changes when this node's catalog
    /// version, or a member's instance, state or catalog version changes (so the full
    /// view is compared only then, not on every gossip round).
    pub fn discovery_fingerprint(&self) -> u64 {
        let mut members: Vec<(&str, &str, u8, u64)> = self
            .members
            .values()
            .map(|m| {
                let state = match m.state {
                    MemberState::Alive => 0,
                    MemberState::Suspect => 1,
                    MemberState::Unconfirmed => 2,
                };
                let version = self.catalogs.get(&m.info.node).map_or(0, |c| c.delta.version);
                (m.info.node.as_str(), m.info.instance_id.as_str(), state, version)
            })
            .collect();
        members.sort_unstable();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.catalog_version, members).hash(&mut hasher);
        hasher.finish()
    }

    /// Every catalog entry with its owner, for `/catalog`.
    pub fn catalog_entries(&self) -> Vec<(CatalogDelta, f64)> {
        self.catalogs.values().map(|c| (c.delta.clone(), c.received_at)).collect()
    }

    /// Whether `node` (this instance) may be dialled now.
    pub fn may_dial(&self, node: &str, instance: &str, now: f64) -> bool {
        node != self.me.node && !self.is_departed(node, instance, now)
    }

    /// The next hop towards every node reachable from our `direct` links: the first node
    /// of a shortest path over the reported neighbour graph (one breadth-first search for
    /// all targets). A direct node is its own next hop; suspected nodes are not used as
    /// intermediates.
    pub fn next_hops(&self, direct: &HashSet<NodeId>) -> HashMap<NodeId, NodeId> {
        let mut first_hop: HashMap<NodeId, NodeId> = direct.iter().map(|n| (n.clone(), n.clone())).collect();
        let alive = |n: &str| self.members.get(n).is_some_and(|m| m.state == MemberState::Alive);
        // Ties are broken in an order that is stable for this node but differs between
        // nodes, so that paths of equal length spread over the relays instead of all
        // crossing the node whose name sorts first (in a cluster joined through one seed,
        // every node's neighbour).
        let rank = |n: &NodeId| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (&self.me.node, n).hash(&mut hasher);
            (hasher.finish(), n.clone())
        };
        let mut starts: Vec<&NodeId> = direct.iter().filter(|n| alive(n)).collect();
        starts.sort_by_cached_key(|n| rank(n));
        let mut queue: VecDeque<NodeId> = starts.into_iter().cloned().collect();
        while let Some(at) = queue.pop_front() {
            let hop = first_hop[&at].clone();
            let Some(m) = self.members.get(&at) else { continue };
            let mut next: Vec<&NodeId> = m.neighbours.iter().collect();
            next.sort_by_cached_key(|n| rank(n));
            for n in next {
                if *n == self.me.node || first_hop.contains_key(n) || !self.members.contains_key(n) {
                    continue;
                }
                first_hop.insert(n.clone(), hop.clone());
                if alive(n) {
                    queue.push_back(n.clone());
                }
            }
        }
        first_hop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node: &str, instance: &str) -> NodeInfo {
        NodeInfo {
            node: node.into(),
            instance_id: instance.into(),
            cluster_id: "c".into(),
            url: format!("ws://{node}"),
        }
    }

    fn digest(node: &str, instance: &str, heartbeat: u64, neighbours: &[&str]) -> MemberDigest {
        MemberDigest {
            info: info(node, instance),
            heartbeat,
            catalog_version: 1,
            neighbours: neighbours.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Version 1 of `node`'s catalog in cluster `c`: no functions, advertised at 0.
    fn catalog(node: &str, instance: &str) -> CatalogDelta {
        CatalogDelta {
            node: node.into(),
            instance_id: instance.into(),
            cluster_id: "c".into(),
            version: 1,
            advertised_at: 0.0,
            ttl_s: 60.0,
            functions: vec![],
            queues: vec![],
            about: vec![],
            clusters: Vec::new(),
            proof: None,
        }
    }

    fn core() -> MembershipCore {
        MembershipCore::new(info("a", "a1"), MembershipTiming::default(), Vec::new())
    }

    #[test]
    fn members_are_bounded_in_number_and_neighbour_lists_in_length() {
        let mut m = core();
        let long: Vec<String> = (0..MAX_NEIGHBOURS + 10).map(|i| format!("n{i}")).collect();
        let long: Vec<&str> = long.iter().map(String::as_str).collect();
        let digests: Vec<MemberDigest> =
            (0..MAX_MEMBERS + 5).map(|i| digest(&format!("m{i}"), "x", 1, if i == 0 { &long } else { &[] })).collect();
        let outcome = m.apply_digest_bounded(&digests, 0.0, usize::MAX);
        assert_eq!(m.members().count(), MAX_MEMBERS);
        assert_eq!(outcome.refused, 5);
        assert_eq!(m.members().find(|x| x.info.node == "m0").unwrap().neighbours.len(), MAX_NEIGHBOURS);
        // Full: a new node is refused a link, a known one (a new instance included) is not.
        assert_eq!(m.admit(&info("newcomer", "n1"), 1.0), Err(Refusal::Full));
        assert!(m.admit(&info("m7", "y"), 1.0).is_ok());
        assert!(m.apply_digest_bounded(&[digest("m8", "x", 2, &[])], 1.0, 16).refused == 0);
    }

    #[test]
    fn other_clusters_and_departed_instances_are_refused() {
        let mut m = core();
        let mut foreign = info("b", "b1");
        foreign.cluster_id = "other".into();
        assert_eq!(m.admit(&foreign, 0.0), Err(Refusal::OtherCluster("other".into())));
        assert!(m.admit(&info("b", "b1"), 0.0).is_ok());
        assert!(m.depart("b", "b1", 1.0));
        assert_eq!(m.admit(&info("b", "b1"), 2.0), Err(Refusal::Departed));
        // A restarted node is a new instance: welcome at once.
        assert!(m.admit(&info("b", "b2"), 2.0).is_ok());
        // After the grace period, the old instance could come back too.
        assert!(!m.is_departed("b", "b1", 100.0));
    }

    #[test]
    fn swim_suspects_and_removes_and_tombstones_block_resurrection() {
        let mut m = core();
        m.apply_digest(&[digest("b", "b1", 5, &[])], 0.0);
        assert!(m.tick(100.0).is_empty(), "silence alone suspects nobody: SWIM does");
        assert_eq!(m.mark_suspect("b", "b0"), None, "another instance");
        assert_eq!(m.mark_suspect("b", "b1"), Some(MembershipEvent::Suspected("b".into())));
        // A newer record relayed by others is no proof of life...
        let (events, _) = m.apply_digest(&[digest("b", "b1", 6, &[])], 100.5);
        assert!(events.is_empty());
        // ...its refutation is.
        assert_eq!(m.mark_alive("b", "b1", 101.0), Some(MembershipEvent::Recovered("b".into())));
        assert_eq!(m.remove_dead("b", "b1", 102.0), Some(MembershipEvent::Removed("b".into())));
        // Stale gossip with the same heartbeat cannot bring it back...
        let (events, _) = m.apply_digest(&[digest("b", "b1", 6, &[])], 102.5);
        assert!(events.is_empty());
        // ...but a higher heartbeat (it refuted, and its record changed) does.
        let (events, _) = m.apply_digest(&[digest("b", "b1", 7, &[])], 103.0);
        assert_eq!(events, vec![MembershipEvent::Joined("b".into(), "b1".into())]);
    }

    #[test]
    fn an_older_digest_does_not_replace_newer_neighbours() {
        let mut m = core();
        m.apply_digest(&[digest("d", "d1", 5, &["c"])], 0.0);
        // The same node as an older digest relayed along a slower path saw it.
        m.apply_digest(&[digest("d", "d1", 3, &[])], 0.1);
        let d = m.members().find(|x| x.info.node == "d").expect("d is a member");
        assert_eq!(d.neighbours, vec!["c".to_owned()]);
        m.apply_digest(&[digest("d", "d1", 6, &["b", "c"])], 0.2);
        let d = m.members().find(|x| x.info.node == "d").expect("d is a member");
        assert_eq!(d.neighbours, vec!["b".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn catalog_versions_and_requests() {
        let mut m = core();
        let (_, wanted) = m.apply_digest(&[digest("b", "b1", 1, &[])], 0.0);
        assert_eq!(wanted, vec!["b".to_owned()]);
        let delta = catalog("b", "b1");
        assert!(m.apply_catalog(&delta, 0.0));
        assert!(!m.apply_catalog(&delta, 0.1), "the same version twice is not news");
        let (_, wanted) = m.apply_digest(&[digest("b", "b1", 2, &[])], 0.2);
        assert!(wanted.is_empty());
    }

    #[test]
    fn a_digest_teaches_a_bounded_number_of_new_nodes_and_catalogs_need_membership() {
        let mut m = core();
        let many: Vec<MemberDigest> = (0..100).map(|i| digest(&format!("n{i}"), "i", 1, &[])).collect();
        let outcome = m.apply_digest_bounded(&many, 0.0, 4);
        assert_eq!((m.members().count(), outcome.refused), (4, 96));
        // Known nodes are not counted against the bound.
        let outcome = m.apply_digest_bounded(&many[..4], 0.1, 0);
        assert_eq!(outcome.refused, 0);
        let stranger = catalog("zz", "z1");
        assert!(!m.apply_catalog(&stranger, 0.2), "entries of a non-member are not stored");
        assert!(m.catalog_entries().is_empty());
    }

    fn saved(node: &str, instance: &str, heard_at: f64, received_at: Option<f64>) -> SnapshotMember {
        SnapshotMember {
            info: info(node, instance),
            heard_at,
            catalog: received_at.map(|received_at| SnapshotCatalog {
                delta: CatalogDelta {
                    node: node.into(),
                    instance_id: instance.into(),
                    cluster_id: "c".into(),
                    version: 7,
                    advertised_at: received_at,
                    ttl_s: 60.0,
                    functions: vec![FunctionIdentity {
                        name: format!("only_{node}"),
                        function_id: format!("only_{node}"),
                        version: Default::default(),
                        resources: Default::default(),
                    }],
                    queues: vec![],
                    about: vec![],
                    clusters: Vec::new(),
                    proof: None,
                },
                received_at,
            }),
        }
    }

    #[test]
    fn restore_drops_our_own_entries_other_clusters_and_expired_ones() {
        let mut m = core();
        let mut foreign = saved("f", "f1", 1000.0, Some(1000.0));
        foreign.info.cluster_id = "other".into();
        let members = vec![
            saved("a", "a0", 1000.0, Some(1000.0)), // our own previous instance
            foreign,
            saved("b", "b1", 990.0, Some(990.0)), // fresh
            saved("c", "c1", 900.0, Some(900.0)), // heard of 100 s ago: past the 60 s TTL
            saved("d", "d1", 990.0, Some(930.0)), // alive, but its entries are 70 s old
            saved("e", "e1", 995.0, None),        // known, entries not held
        ];
        let outcome = m.restore(members, 5.0, 1000.0);
        assert_eq!(outcome, RestoreOutcome { members: 3, entries: 1, dropped: 4 });
        let mut restored: Vec<&str> = m.members().map(|m| m.info.node.as_str()).collect();
        restored.sort();
        assert_eq!(restored, ["b", "d", "e"]);
        assert!(m.members().all(|m| m.state == MemberState::Unconfirmed));
        // Routed to at once, but not gossiped on.
        let functions = m.functions_of(MemberState::Unconfirmed);
        assert_eq!(functions.len(), 1);
        assert_eq!(functions[0].2.name, "only_b");
        assert_eq!(m.digest().len(), 1, "only ourselves");
        assert_eq!(m.all_catalogs(1000.0).len(), 1, "only our own entries");
        // The receive time carries over: b's entries expire 60 s after 990, i.e. at local 55.
        m.tick(54.0);
        assert_eq!(m.catalog_entries().len(), 1);
        assert_eq!(m.members().count(), 3, "unconfirmed members are neither suspected nor removed early");
        m.tick(56.0);
        assert!(m.catalog_entries().is_empty());
    }

    #[test]
    fn a_snapshot_of_the_core_restores_into_another() {
        let mut m = core();
        m.apply_digest(&[digest("b", "b1", 3, &[])], 10.0);
        let delta = saved("b", "b1", 0.0, Some(0.0)).catalog.unwrap().delta;
        assert!(m.apply_catalog(&delta, 12.0));
        // Alive: the member and its entries are current (not refreshed, they do not expire).
        let snapshot = m.snapshot(20.0, 1020.0);
        assert_eq!(snapshot.len(), 1);
        assert_eq!((snapshot[0].heard_at, snapshot[0].catalog.as_ref().unwrap().received_at), (1020.0, 1020.0));
        // Suspected: as last heard of and received.
        m.mark_suspect("b", "b1");
        let snapshot = m.snapshot(20.0, 1020.0);
        assert_eq!((snapshot[0].heard_at, snapshot[0].catalog.as_ref().unwrap().received_at), (1010.0, 1012.0));
        let mut restarted = MembershipCore::new(info("a", "a2"), MembershipTiming::default(), Vec::new());
        let outcome = restarted.restore(snapshot, 0.0, 1030.0);
        assert_eq!((outcome.members, outcome.entries), (1, 1));
        assert_eq!(restarted.catalog_entries()[0].0, delta);
    }

    #[test]
    fn restored_members_are_confirmed_by_status_digest_or_newer_entries_only() {
        let mut m = core();
        m.restore(vec![saved("b", "b1", 1000.0, Some(1000.0)), saved("c", "c1", 1000.0, Some(1000.0))], 0.0, 1000.0);
        let state = |m: &MembershipCore, node: &str| m.members().find(|x| x.info.node == node).map(|x| x.state);
        // Another node's unconfirmed claim (heartbeat 0) confirms nothing.
        let (events, _) = m.apply_digest(&[digest("b", "b1", 0, &[])], 0.5);
        assert!(events.is_empty());
        assert_eq!(state(&m, "b"), Some(MemberState::Unconfirmed));
        // A live peer's heartbeat for the same instance does.
        let (events, _) = m.apply_digest(&[digest("b", "b1", 4, &[])], 1.0);
        assert_eq!(events, vec![MembershipEvent::Confirmed("b".into())]);
        assert_eq!(state(&m, "b"), Some(MemberState::Alive));
        // Its own STATUS does too.
        assert_eq!(m.admit(&info("c", "c1"), 1.5), Ok(vec![MembershipEvent::Confirmed("c".into())]));
        // A newer instance replaces a restored one (joined, alive).
        let mut m = core();
        m.restore(vec![saved("b", "b1", 1000.0, Some(1000.0))], 0.0, 1000.0);
        let (events, _) = m.apply_digest(&[digest("b", "b2", 1, &[])], 0.1);
        assert_eq!(events, vec![MembershipEvent::Joined("b".into(), "b2".into())]);
        assert!(m.catalog_entries().is_empty(), "the old instance's entries are gone");
        // Entries at a newer version from a live peer confirm as well; the same version does not.
        let mut m = core();
        m.restore(vec![saved("b", "b1", 1000.0, Some(1000.0))], 0.0, 1000.0);
        let mut delta = saved("b", "b1", 0.0, Some(0.0)).catalog.unwrap().delta;
        assert!(!m.apply_catalog(&delta, 0.1));
        assert_eq!(state(&m, "b"), Some(MemberState::Unconfirmed));
        delta.version += 1;
        assert!(m.apply_catalog(&delta, 0.2));
        assert_eq!(state(&m, "b"), Some(MemberState::Alive));
    }

    #[test]
    fn a_members_entries_stay_while_it_is_a_member_and_go_with_it() {
        let mut m = core();
        m.apply_digest(&[digest("b", "b1", 1, &[])], 0.0);
        assert!(m.apply_catalog(&catalog("b", "b1"), 0.0));
        m.tick(1000.0);
        assert_eq!(m.catalog_entries().len(), 1, "not refreshed for far longer than the TTL, still current");
        m.mark_suspect("b", "b1");
        m.tick(2000.0);
        assert_eq!(m.catalog_entries().len(), 1, "a suspect keeps its entries until SWIM declares it dead");
        m.remove_dead("b", "b1", 2001.0);
        assert!(m.catalog_entries().is_empty());
    }

    #[test]
    fn unconfirmed_members_nobody_confirms_are_removed_after_the_ttl() {
        let mut m = core();
        m.restore(vec![saved("b", "b1", 1000.0, Some(1000.0))], 0.0, 1000.0);
        assert!(m.tick(30.0).is_empty());
        assert_eq!(m.tick(61.0), vec![MembershipEvent::Removed("b".into())]);
    }

    #[test]
    fn next_hop_follows_the_neighbour_graph() {
        let mut m = core();
        // a - b - c - d, a links only to b.
        m.apply_digest(
            &[digest("b", "b1", 1, &["a", "c"]), digest("c", "c1", 1, &["b", "d"]), digest("d", "d1", 1, &["c"])],
            0.0,
        );
        let direct: HashSet<NodeId> = ["b".to_owned()].into();
        let hops = m.next_hops(&direct);
        assert_eq!(hops.get("d").map(String::as_str), Some("b"));
        assert_eq!(hops.get("b").map(String::as_str), Some("b"));
        assert_eq!(hops.get("zzz"), None);
        // A suspected intermediate is not routed through; a suspected target still is.
        m.mark_suspect("c", "c1");
        let hops = m.next_hops(&direct);
        assert_eq!((hops.get("c").map(String::as_str), hops.get("d")), (Some("b"), None));
    }

    /// The links of an `n`-node cluster as the fabric forms them: node `k` dials the seed
    /// `n0`; a node holding `max_inbound` inbound links refuses and names members, those
    /// with fewer links than the cap first, each group in random order, dialled next; then
    /// `k` dials the members it learnt, in random order, while it holds fewer than `fanout`
    /// links (a node at its inbound cap refuses).
    fn joined_links(n: usize, fanout: usize, max_inbound: usize, rng: &mut impl rand::Rng) -> Vec<HashSet<usize>> {
        use rand::seq::SliceRandom;
        let mut links: Vec<HashSet<usize>> = vec![HashSet::new(); n];
        let mut inbound = vec![0usize; n];
        for k in 1..n {
            let mut order = vec![0];
            if inbound[0] >= max_inbound {
                let mut named: Vec<usize> = (1..k).collect();
                named.shuffle(rng);
                named.sort_by_key(|&t| links[t].len() >= max_inbound);
                order.extend(named.into_iter().take(fanout));
            }
            let mut rest: Vec<usize> = (0..k).collect();
            rest.shuffle(rng);
            order.extend(rest);
            for t in order {
                if links[k].len() >= fanout {
                    break;
                }
                if inbound[t] < max_inbound && links[k].insert(t) {
                    links[t].insert(k);
                    inbound[t] += 1;
                }
            }
            assert!(!links[k].is_empty(), "n{k} found no node to link to");
        }
        links
    }

    /// Hops from `from` over `links` (breadth-first), skipping `gone`; `None`: no path.
    fn distances(links: &[HashSet<usize>], from: usize, gone: Option<usize>) -> Vec<Option<usize>> {
        let mut dist = vec![None; links.len()];
        dist[from] = Some(0);
        let mut queue = VecDeque::from([from]);
        while let Some(at) = queue.pop_front() {
            for &next in &links[at] {
                if dist[next].is_none() && Some(next) != gone {
                    dist[next] = dist[at].map(|d| d + 1);
                    queue.push_back(next);
                }
            }
        }
        dist
    }

    /// Every node's membership, each knowing every other node's record (its links).
    fn cores_of(links: &[HashSet<usize>]) -> Vec<MembershipCore> {
        let name = |i: usize| format!("n{i}");
        let records: Vec<MemberDigest> = (0..links.len())
            .map(|i| MemberDigest {
                info: info(&name(i), "1"),
                heartbeat: 1,
                catalog_version: 1,
                neighbours: links[i].iter().map(|&t| name(t)).collect(),
            })
            .collect();
        (0..links.len())
            .map(|i| {
                let mut m = MembershipCore::new(info(&name(i), "1"), MembershipTiming::default(), Vec::new());
                m.apply_digest(&records, 0.0);
                m
            })
            .collect()
    }

    /// Follows each node's own next hop from `from` towards `to`; asserts every hop is a
    /// link that exists and is not `avoid`, and returns the path's length (`None`: no route).
    fn follow(
        links: &[HashSet<usize>],
        hops: &[HashMap<NodeId, NodeId>],
        (from, to): (usize, usize),
        avoid: Option<usize>,
    ) -> Option<usize> {
        let index = |n: &str| n[1..].parse::<usize>().expect("a node name");
        let target = format!("n{to}");
        let (mut at, mut length) = (from, 0);
        while at != to {
            let next = index(hops[at].get(&target)?);
            assert!(links[at].contains(&next), "n{at} routes to n{to} over n{next}, which is not its link");
            assert_ne!(Some(next), avoid, "n{at} routes to n{to} through the suspected n{next}");
            (at, length) = (next, length + 1);
            assert!(length <= links.len(), "the route from n{from} to n{to} loops");
        }
        Some(length)
    }

    /// The 48-node failure of issue 10 (a route through a node that was not a link, or
    /// that had gone) cannot happen: in clusters of many nodes joined through one seed with
    /// links far fewer than nodes, every node routes to every other along links that
    /// exist, over a shortest path (so within the hop budget); with the busiest relay
    /// suspected everywhere, every node still reachable without it is routed around it.
    #[test]
    fn many_nodes_with_few_links_route_to_every_node_over_existing_links() {
        use rand::SeedableRng;
        for (n, fanout, max_inbound, seed) in [(64, 8, 16, 1), (64, 3, 6, 2), (200, 4, 8, 3)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let links = joined_links(n, fanout, max_inbound, &mut rng);
            assert!(links.iter().all(|l| l.len() <= fanout + max_inbound), "{n} nodes: links past the caps");
            let mut cores = cores_of(&links);
            let direct =
                |i: usize| -> HashSet<NodeId> { links[i].iter().map(|t| format!("n{t}")).collect::<HashSet<_>>() };
            let hops: Vec<_> = (0..n).map(|i| cores[i].next_hops(&direct(i))).collect();
            for from in 0..n {
                let dist = distances(&links, from, None);
                for to in (0..n).filter(|&to| to != from) {
                    let length = follow(&links, &hops, (from, to), None);
                    assert_eq!(length, dist[to], "{n} nodes, fan-out {fanout}: n{from} to n{to}");
                }
            }
            if n == 64 && fanout == 8 {
                let longest = (0..n).filter_map(|f| distances(&links, f, None).into_iter().flatten().max()).max();
                assert!(longest <= Some(5), "64 nodes at fan-out 8 fit the default hop budget: {longest:?}");
            }

            let relay = (0..n).max_by_key(|&i| links[i].len()).expect("nodes");
            for core in &mut cores {
                core.mark_suspect(&format!("n{relay}"), "1");
            }
            let hops: Vec<_> = (0..n).map(|i| cores[i].next_hops(&direct(i))).collect();
            for from in (0..n).filter(|&f| f != relay) {
                let dist = distances(&links, from, Some(relay));
                for to in (0..n).filter(|&to| to != from && to != relay) {
                    let length = follow(&links, &hops, (from, to), Some(relay));
                    assert_eq!(length, dist[to], "{n} nodes without n{relay}: n{from} to n{to}");
                }
            }
        }
    }
}
