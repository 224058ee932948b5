//! Catalog snapshots: the fabric's view of the cluster, saved to the store and restored at
//! start, so a restarted node can route before its first gossip round (DESIGN.md §8, §10).
//!
//! ```text
//! FabricGossip ── every catalog_snapshot_interval_s, if the view changed ──► encode ──►
//!     PersistenceHandle::commit (the committer thread does the I/O) ──► tree `catalog`,
//!     key `snapshot`
//! SayGoodbye (clean shutdown) ──► the same, awaited: the last view is durable
//! start (before the first gossip round and the first dial) ──► decode ──► drop our own
//!     entries, other clusters, entries past their TTL; re-verify signed entries ──►
//!     MembershipCore::restore: members `unconfirmed` until a live peer confirms them
//! ```
//!
//! **Format.** One JSON document, versioned: `{"format": "mpreg-catalog-snapshot",
//! "version": 1, "node", "instance_id", "cluster_id", "saved_at", "members": [{"info":
//! NodeInfo, "heard_at", "catalog": {"delta": CatalogDelta, "received_at"} | null}]}`.
//! Times are Unix seconds of the saving node's clock: `heard_at` is when the member's
//! heartbeat last rose, `received_at` when its entries were last received. The delta is
//! kept exactly as received, with its owner's signature (`proof`) when the cluster has
//! credentials, so a restoring node checks it again against its own trust before use.
//!
//! **What is not trusted.** A snapshot that does not parse, or has another format or
//! version, is ignored with a WARN and counted (`mpreg_catalog_snapshot_corrupt_total`):
//! the node starts with an empty catalog, as without a snapshot. Restored members are
//! claims, not facts: they are routed to at once (a call that finds no route is retried
//! on another provider or answered 1005, as for any dead node) and dialled, but shown as
//! `unconfirmed` and not gossiped on until a live peer confirms them.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use super::wire::{CatalogDelta, ClusterId, InstanceId, NodeId, NodeInfo};

/// The tree snapshots are stored in.
pub const SNAPSHOT_TREE: &str = "catalog";
/// The key of the one snapshot in [`SNAPSHOT_TREE`].
pub const SNAPSHOT_KEY: &[u8] = b"snapshot";
/// The `format` field of every snapshot.
pub const SNAPSHOT_FORMAT: &str = "mpreg-catalog-snapshot";
/// The version this code writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The saved view of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// [`SNAPSHOT_VERSION`] when written by this code.
    pub version: u32,
    /// The node that saved it.
    pub node: NodeId,
    /// Its instance then (a restarted node has a new one).
    pub instance_id: InstanceId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// Unix seconds when it was built.
    pub saved_at: f64,
    /// Every known member, with its entries when held.
    pub members: Vec<SnapshotMember>,
}

/// One known member in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMember {
    /// Identity and URL (dialled on restore).
    pub info: NodeInfo,
    /// Unix seconds when its heartbeat last rose.
    pub heard_at: f64,
    /// Its latest entries, when held.
    pub catalog: Option<SnapshotCatalog>,
}

/// A member's entries in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCatalog {
    /// The delta as received (with its owner's signature when signed).
    pub delta: CatalogDelta,
    /// Unix seconds when it was last received.
    pub received_at: f64,
}

/// Why a stored snapshot was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not JSON of the snapshot's shape.
    #[error("not a catalog snapshot: {0}")]
    Corrupt(String),
    /// Another format or a version this code does not read.
    #[error("unsupported catalog snapshot {format:?} version {version}")]
    Unsupported {
        /// The `format` found.
        format: String,
        /// The `version` found.
        version: u32,
    },
}

impl CatalogSnapshot {
    /// A snapshot of `members` saved by `me` at `saved_at`.
    pub fn new(me: &NodeInfo, saved_at: f64, members: Vec<SnapshotMember>) -> Self {
        CatalogSnapshot {
            format: SNAPSHOT_FORMAT.to_owned(),
            version: SNAPSHOT_VERSION,
            node: me.node.clone(),
            instance_id: me.instance_id.clone(),
            cluster_id: me.cluster_id.clone(),
            saved_at,
            members,
        }
    }

    /// The stored bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(|e| SnapshotError::Corrupt(e.to_string()))
    }

    /// Reads stored bytes; anything but a well-formed snapshot of this version is an error.
    pub fn decode(bytes: &[u8]) -> Result<CatalogSnapshot, SnapshotError> {
        let snapshot: CatalogSnapshot =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
        if snapshot.format != SNAPSHOT_FORMAT || snapshot.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Unsupported { format: snapshot.format, version: snapshot.version });
        }
        Ok(snapshot)
    }

    /// What makes two snapshots different enough to save again: members (node, instance,
    /// URL) and the versions of their entries. Times are left out, or every heartbeat would
    /// count as a change; entry versions rise at least every ttl/2 (owners refresh), which
    /// keeps the saved receive times within a TTL.
    pub fn fingerprint(&self) -> u64 {
        let mut keys: Vec<(&str, &str, &str, Option<u64>)> = self
            .members
            .iter()
            .map(|m| {
                let version = m.catalog.as_ref().map(|c| c.delta.version);
                (m.info.node.as_str(), m.info.instance_id.as_str(), m.info.url.as_str(), version)
            })
            .collect();
        keys.sort_unstable();
        let mut hasher = DefaultHasher::new();
        keys.hash(&mut hasher);
        hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, version: u64) -> SnapshotMember {
        let info = NodeInfo {
            node: node.into(),
            instance_id: format!("{node}1"),
            cluster_id: "c".into(),
            url: format!("ws://{node}"),
        };
        let delta = CatalogDelta {
            node: node.into(),
            instance_id: info.instance_id.clone(),
            cluster_id: "c".into(),
            version,
            advertised_at: 100.0,
            ttl_s: 60.0,
            functions: vec![],
            queues: vec![],
            about: vec![],
            clusters: Vec::new(),
            proof: None,
        };
        SnapshotMember { info, heard_at: 100.0, catalog: Some(SnapshotCatalog { delta, received_at: 100.0 }) }
    }

    fn me() -> NodeInfo {
        NodeInfo { node: "a".into(), instance_id: "a1".into(), cluster_id: "c".into(), url: "ws://a".into() }
    }

    #[test]
    fn a_snapshot_round_trips() {
        let snapshot = CatalogSnapshot::new(&me(), 123.5, vec![member("b", 3), member("c", 1)]);
        let bytes = snapshot.encode().unwrap();
        assert_eq!(CatalogSnapshot::decode(&bytes).unwrap(), snapshot);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with(r#"{"format":"mpreg-catalog-snapshot","version":1,"#), "{text}");
    }

    #[test]
    fn garbage_and_other_versions_are_errors() {
        assert!(matches!(CatalogSnapshot::decode(b"\x00\xffnot json"), Err(SnapshotError::Corrupt(_))));
        assert!(matches!(CatalogSnapshot::decode(br#"{"format":"x"}"#), Err(SnapshotError::Corrupt(_))));
        let mut future = CatalogSnapshot::new(&me(), 1.0, vec![]);
        future.version = 2;
        let bytes = serde_json::to_vec(&future).unwrap();
        assert!(matches!(CatalogSnapshot::decode(&bytes), Err(SnapshotError::Unsupported { version: 2, .. })));
    }

    #[test]
    fn the_fingerprint_ignores_times_and_order_but_not_versions() {
        let one = CatalogSnapshot::new(&me(), 1.0, vec![member("b", 3), member("c", 1)]);
        let mut later = CatalogSnapshot::new(&me(), 9.0, vec![member("c", 1), member("b", 3)]);
        later.members[0].heard_at = 999.0;
        assert_eq!(one.fingerprint(), later.fingerprint());
        let newer = CatalogSnapshot::new(&me(), 1.0, vec![member("b", 4), member("c", 1)]);
        assert_ne!(one.fingerprint(), newer.fingerprint());
    }
}
