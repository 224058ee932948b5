//! Discovery built-ins: the reference client's introspection calls (`list_peers`,
//! `cluster_map`, `cluster_map_v2`, `catalog_query`, `catalog_watch`, `rpc_list`,
//! `rpc_describe`, `rpc_report`, `summary_query`, `summary_watch`), answered by the node
//! the client is connected to, from its own membership and catalog.
//!
//! They are functions like any other ([`builtins`]), with two differences: they are
//! local-only (never advertised in the catalog, so never forwarded to another node of the
//! cluster; a `target_cluster` naming another cluster goes over the federation bridges,
//! or is 1005 without a route), and each takes one optional request object
//! (`call("catalog_query", {"entry_type": "functions"})`) or the same fields as keyword
//! arguments. Each call asks FabricGossip for a [`DiscoveryView`] (one mailbox round trip:
//! discovery is not on the hot path) and answers with [`answer`], a pure function of the
//! view and the request, in the shapes the reference client parses.
//!
//! A function's parameters and documentation are known where it is registered and travel
//! in its node's catalog entry (each text at most 1 KiB), so `rpc_describe` on any node
//! shows them. What this server does not keep, it does not pretend to: there are no tenants,
//! namespace policies, regions, tags or latency figures; entry types other than
//! functions, nodes and queues, and the reference's DNS gateway, namespace policy,
//! resolver cache and access audit calls are refused with a clear error.
//!
//! The view is kept current by the fabric: a node joining shows up once its STATUS or
//! gossip arrives; a node leaving (GOODBYE) at once; a node that went silent once it is
//! suspected (suspected nodes are left out: they are not called either). Catalog changes
//! are numbered in a bounded [`log::CatalogLog`] for `catalog_watch`, and each is also
//! published to this node's subscribers of `mpreg.discovery.delta`.

mod answer;
pub mod log;

use std::sync::Arc;

use actix::{Message, MessageResponse};
use serde_json::{Map, Value};

use crate::fabric::describe::Describer;
use crate::fabric::wire::{FunctionAbout, NodeInfo};
use crate::function::{FunctionError, FunctionIdentity, FunctionSpec, Signature};
use crate::metrics::Metrics;
pub use answer::{answer, catalog_entries, summaries_of, Pages};
use log::ChangesSince;

/// The pub/sub topic catalog changes are published on (the reference's name).
pub const DELTA_TOPIC: &str = "mpreg.discovery.delta";
/// The pub/sub topic service summaries are published on when they change.
pub const SUMMARY_TOPIC: &str = "mpreg.discovery.summary";
/// The scope every entry of this server has (the reference's default scope).
const SCOPE: &str = "zone";

/// The reference's calls this server does not serve: answered with an error saying so.
pub const UNSUPPORTED: [&str; 12] = [
    "dns_register",
    "dns_unregister",
    "dns_list",
    "dns_describe",
    "namespace_status",
    "namespace_policy_validate",
    "namespace_policy_apply",
    "namespace_policy_export",
    "namespace_policy_audit",
    "resolver_cache_stats",
    "resolver_resync",
    "discovery_access_audit",
];

/// The calls this module answers.
pub const COMMANDS: [&str; 11] = [
    "list_peers",
    "cluster_map",
    "cluster_map_v2",
    "catalog_query",
    "catalog_watch",
    "rpc_list",
    "rpc_describe",
    "rpc_describe_local",
    "rpc_report",
    "summary_query",
    "summary_watch",
];

/// Page sizes, from the node's settings.
#[derive(Debug, Clone, Copy)]
pub struct DiscoveryLimits {
    /// Items per page when the request gives no `limit`.
    pub page_size: usize,
    /// The largest page; a larger `limit` is cut to it (and counted).
    pub max_page_size: usize,
}

/// One node as discovery shows it.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    /// Who it is.
    pub info: NodeInfo,
    /// `ok`, or `unconfirmed` (restored from a snapshot, not yet heard from).
    pub status: &'static str,
    /// When it was last heard from (Unix seconds; now for this node).
    pub last_seen: f64,
    /// When its catalog entries were advertised (its clock).
    pub advertised_at: f64,
    /// How long they stay valid without a refresh.
    pub ttl_s: f64,
    /// Its functions.
    pub functions: Vec<FunctionIdentity>,
    /// The queues it owns.
    pub queues: Vec<String>,
    /// What it tells about its functions (parameters, documentation).
    pub about: Vec<FunctionAbout>,
}

/// What this node knows about one of its own functions beyond the catalog.
#[derive(Debug, Clone)]
pub struct LocalFunction {
    /// Which function.
    pub identity: FunctionIdentity,
    /// Its declared parameters.
    pub signature: Option<Signature>,
    /// Its documentation.
    pub doc: Option<String>,
}

/// Everything one discovery answer reads, taken at one moment.
#[derive(Debug, Clone, MessageResponse)]
pub struct DiscoveryView {
    /// When (Unix seconds).
    pub generated_at: f64,
    /// This node.
    pub me: NodeInfo,
    /// This node first, then every routable member, by name.
    pub nodes: Vec<NodeEntry>,
    /// This node's own functions, with parameters and documentation.
    pub local: Vec<LocalFunction>,
    /// Catalog changes since the version asked for (`catalog_watch`).
    pub changes: Option<ChangesSince>,
}

/// Ask FabricGossip for the view; `since`: also the catalog changes after that version.
#[derive(Message)]
#[rtype(result = "DiscoveryView")]
pub struct DescribeDiscovery {
    /// A catalog version (`catalog_watch`'s `since_version`).
    pub since: Option<u64>,
}

/// The discovery calls as local-only functions, asking the fabric for the view through
/// `describer`.
pub fn builtins(describer: Describer, limits: DiscoveryLimits, metrics: Arc<Metrics>) -> Vec<FunctionSpec> {
    let mut specs: Vec<FunctionSpec> = COMMANDS
        .iter()
        .map(|&command| {
            let (describer, metrics) = (describer.clone(), metrics.clone());
            FunctionSpec::asynchronous(command, move |request: Value, filters: Map<String, Value>| {
                let (describer, metrics) = (describer.clone(), metrics.clone());
                async move {
                    let request = merge_request(command, request, filters)?;
                    let since = match request.get("since_version") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(v.as_u64().ok_or_else(|| {
                            FunctionError::type_error(format!(
                                "{command}() since_version must be a non-negative integer"
                            ))
                        })?),
                    };
                    let since = since.or((command == "catalog_watch").then_some(u64::MAX));
                    let view = describer.ask(|| DescribeDiscovery { since }).await.map_err(|_| unavailable())?;
                    let page = Pages::new(limits, &request, &metrics)?;
                    answer(command, &request, &view, page)
                }
            })
            .signature("request=None, **filters")
            .local_only()
            .doc(describe(command))
        })
        .collect();
    specs.extend(UNSUPPORTED.iter().map(|&command| {
        FunctionSpec::raw(command, move |_| {
            Err(FunctionError::new(
                "NotSupportedError",
                format!(
                    "{command} is not supported by this server: it keeps no DNS gateway, namespace \
                     policy, resolver cache or access audit (see the README's discovery section)"
                ),
            ))
        })
        .local_only()
    }));
    specs
}

fn unavailable() -> FunctionError {
    FunctionError::new("Unavailable", "the fabric is restarting; retry")
}

fn describe(command: &str) -> &'static str {
    match command {
        "list_peers" => "The other nodes this node knows, with their functions and resources.",
        "cluster_map" => "Every node of the cluster with its URLs.",
        "cluster_map_v2" => "The cluster map, filtered and paginated.",
        "catalog_query" => "Catalog entries (functions, nodes, queues), filtered and paginated.",
        "catalog_watch" => "The catalog change topic, and the changes since a version.",
        "rpc_list" => "Functions in the catalog, with summaries where known.",
        "rpc_describe" | "rpc_describe_local" => "Functions with their parameters and documentation where known.",
        "rpc_report" => "Counts of functions by namespace and cluster.",
        "summary_query" => "One summary per service (function name) of the catalog.",
        _ => "The service summary topic.",
    }
}

/// The request object and the keyword arguments, as one object.
fn merge_request(
    command: &str,
    request: Value,
    filters: Map<String, Value>,
) -> Result<Map<String, Value>, FunctionError> {
    let mut merged = match request {
        Value::Null => Map::new(),
        Value::Object(map) => map,
        other => {
            return Err(FunctionError::type_error(format!(
                "{command}() takes a request object, not {}",
                crate::function::type_name(&other)
            )))
        }
    };
    merged.extend(filters);
    Ok(merged)
}

#[cfg(test)]
mod tests;
