//! Routing a command (DESIGN.md §7): which function, on which node.
//!
//! A command matches an endpoint when the name equals `fun`, `function_id` (if given)
//! equals the registered id, the version satisfies `version_constraint`, `locs` is a
//! subset of the function's resources, and `target_cluster` (if given) is the endpoint's
//! cluster. A command whose `target_cluster` is another cluster goes there over the
//! node's federation bridges ([`crate::fabric::bridge`]), or fails with 1005 at once when
//! there is no route. A command without `target_cluster` that nothing in this cluster
//! matches is asked of the other clusters this node reaches, nearest first; each runs it
//! only when its export list shares the function. Among matches the highest version
//! wins; among those: this node first, then the least calls in flight from here, then a
//! random pick.

use std::sync::Arc;

use rand::seq::SliceRandom;

use crate::fabric::{FabricShared, RemoteFunction};
use crate::function::FunctionSpec;
use crate::protocol::{RpcCommand, RpcError};
use crate::registry::{matches, FunctionTable};
use crate::version::VersionConstraint;

/// Where a command runs.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Here.
    Local(FunctionSpec),
    /// On another node (maybe several hops away).
    Remote(RemoteFunction),
    /// In another cluster (`target_cluster`), over federation bridges: this node's own
    /// (`via: None`), or those of `via`, a node of this cluster that advertises a route.
    Cluster {
        /// The destination cluster.
        cluster: String,
        /// The bridge node of this cluster it goes through, when not this node.
        via: Option<String>,
    },
    /// A command without `target_cluster` that nothing in this cluster matches: asked of
    /// these clusters in turn (nearest first, each with the bridge node it goes through, as
    /// in `Cluster`) until one runs it; a cluster that does not export the function
    /// answers 1001 and the next is asked.
    Clusters(Vec<(String, Option<String>)>),
}

/// A consistent view for one request: local functions, and the fabric for the rest.
#[derive(Clone)]
pub struct Routing {
    local: Arc<FunctionTable>,
    fabric: Option<Arc<FabricShared>>,
    cluster_id: Arc<str>,
    /// Whether a command nothing in this cluster matches may be asked of other clusters
    /// (not for a command that came from another cluster).
    other_clusters: bool,
}

impl Routing {
    /// Local functions only.
    pub fn local(local: Arc<FunctionTable>, cluster_id: impl Into<Arc<str>>) -> Self {
        Routing { local, fabric: None, cluster_id: cluster_id.into(), other_clusters: false }
    }

    /// Local functions and the cluster's.
    pub fn with_fabric(local: Arc<FunctionTable>, fabric: Arc<FabricShared>, cluster_id: Arc<str>) -> Self {
        Routing { local, fabric: Some(fabric), cluster_id, other_clusters: true }
    }

    /// The same, but a command nothing in this cluster matches is 1001 rather than asked of
    /// other clusters (for commands that came from another cluster: they never bounce on).
    pub fn within_cluster(self) -> Self {
        Routing { other_clusters: false, ..self }
    }

    /// The fabric, for remote calls.
    pub fn fabric(&self) -> Option<&Arc<FabricShared>> {
        self.fabric.as_ref()
    }

    /// Picks the endpoint for `cmd`, skipping the nodes in `exclude` (failed before).
    pub fn resolve(
        &self,
        cmd: &RpcCommand,
        constraint: Option<&VersionConstraint>,
        exclude: &[String],
    ) -> Result<Endpoint, RpcError> {
        self.pick(cmd, constraint, exclude, true)
    }

    /// Picks another node for `cmd` (this node's match was served by a worker that went
    /// away): `None` when no other node has it.
    pub fn resolve_elsewhere(
        &self,
        cmd: &RpcCommand,
        constraint: Option<&VersionConstraint>,
    ) -> Option<RemoteFunction> {
        match self.pick(cmd, constraint, &[], false) {
            Ok(Endpoint::Remote(target)) => Some(target),
            _ => None,
        }
    }

    /// A command for another cluster: over this node's bridges when they route to it,
    /// else through the least loaded node of this cluster whose catalog says it does, else
    /// 1005 at once with the reason ([`FabricShared::cluster_route`]).
    fn federated(&self, cluster: &str) -> Result<Endpoint, RpcError> {
        let Some(fabric) = self.fabric.as_ref() else {
            return Err(RpcError::unreachable(format!("no route to cluster {cluster}: this node has no fabric")));
        };
        let via = fabric.cluster_route(cluster).map_err(RpcError::unreachable)?;
        Ok(Endpoint::Cluster { cluster: cluster.to_owned(), via })
    }

    /// The other clusters this node reaches, nearest first
    /// ([`FabricShared::clusters_reached`]); none for a command from another cluster.
    fn other_clusters(&self) -> Vec<(String, Option<String>)> {
        let Some(fabric) = self.fabric.as_ref().filter(|_| self.other_clusters) else { return Vec::new() };
        fabric.clusters_reached()
    }

    fn pick(
        &self,
        cmd: &RpcCommand,
        constraint: Option<&VersionConstraint>,
        exclude: &[String],
        with_local: bool,
    ) -> Result<Endpoint, RpcError> {
        if let Some(cluster) = cmd.target_cluster.as_deref().filter(|c| **c != *self.cluster_id) {
            return self.federated(cluster);
        }
        let best_spec = self
            .local
            .candidates(cmd, constraint, &self.cluster_id)
            .filter(|_| with_local)
            .max_by_key(|s| s.identity().version);
        let view = self.fabric.as_ref().map(|f| f.view.load());
        let matching = |f: &&RemoteFunction| {
            f.identity.name == cmd.fun
                && cmd.target_cluster.as_deref().is_none_or(|c| c == f.cluster_id)
                && matches(&f.identity, cmd, constraint)
        };
        let remote: Vec<&RemoteFunction> = view
            .iter()
            .flat_map(|v| v.functions.iter())
            .filter(|f| !exclude.contains(&f.node))
            .filter(matching)
            .collect();
        let best_local = best_spec.map(|s| s.identity().version);
        let best_remote = remote.iter().map(|f| f.identity.version).max();
        let prefer_local = match (best_local, best_remote) {
            (Some(l), Some(r)) => l >= r,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => {
                let down: Vec<&str> =
                    view.iter().flat_map(|v| v.unreachable.iter()).filter(matching).map(|f| f.node.as_str()).collect();
                let elsewhere = if down.is_empty() && with_local && exclude.is_empty() && cmd.target_cluster.is_none() {
                    self.other_clusters()
                } else {
                    Vec::new()
                };
                if !elsewhere.is_empty() {
                    return Ok(Endpoint::Clusters(elsewhere));
                }
                return Err(if down.is_empty() {
                    RpcError::not_found(&cmd.fun)
                } else {
                    RpcError::unreachable(format!(
                        "{} is only on unreachable node(s) {} (suspected down or no route)",
                        cmd.fun,
                        down.join(", ")
                    ))
                });
            }
        };
        if prefer_local {
            return best_spec.cloned().map(Endpoint::Local).ok_or_else(|| RpcError::not_found(&cmd.fun));
        }
        let Some(top) = best_remote else { return Err(RpcError::not_found(&cmd.fun)) };
        let mut best: Vec<&RemoteFunction> = remote.into_iter().filter(|f| f.identity.version == top).collect();
        best.shuffle(&mut rand::thread_rng());
        let fabric = self.fabric.as_ref();
        let pick = best.into_iter().min_by_key(|f| fabric.map_or(0, |fab| fab.load_of(&f.node)));
        pick.cloned().map(Endpoint::Remote).ok_or_else(|| RpcError::not_found(&cmd.fun))
    }
}
