//! The answers: pure functions of a [`DiscoveryView`] and a request, in the shapes the
//! reference client parses.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::{DiscoveryLimits, DiscoveryView, LocalFunction, NodeEntry, DELTA_TOPIC, SCOPE, SUMMARY_TOPIC};
use crate::fabric::wire::NodeInfo;
use crate::function::{FunctionError, FunctionIdentity, Signature};
use crate::metrics::Metrics;
use crate::version::VersionConstraint;

/// A page window: `page_token` is the reference's `"offset:limit"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    pub(super) offset: usize,
    pub(super) limit: usize,
}

impl Pages {
    /// The window a request asks for, its size capped by the settings.
    pub fn new(
        limits: DiscoveryLimits,
        request: &Map<String, Value>,
        metrics: &Metrics,
    ) -> Result<Pages, FunctionError> {
        let mut pages = Pages { offset: 0, limit: limits.page_size.max(1) };
        if let Some(token) = request.get("page_token").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            let parsed = token.split_once(':').and_then(|(o, l)| Some((o.parse().ok()?, l.parse::<usize>().ok()?)));
            let (offset, limit) = parsed
                .ok_or_else(|| FunctionError::value_error(format!("page_token {token:?} is not \"offset:limit\"")))?;
            pages = Pages { offset, limit: limit.max(1) };
        }
        match request.get("limit") {
            None | Some(Value::Null) => {}
            Some(v) => {
                let limit = v
                    .as_u64()
                    .filter(|l| *l > 0)
                    .ok_or_else(|| FunctionError::value_error(format!("limit must be a positive integer, not {v}")))?;
                pages.limit = usize::try_from(limit).unwrap_or(usize::MAX);
            }
        }
        if pages.limit > limits.max_page_size {
            metrics.limit_exceeded("discovery_max_page_size");
            pages.limit = limits.max_page_size.max(1);
        }
        Ok(pages)
    }

    /// This page of `items`, and the token of the next one (`None` on the last page).
    fn slice<T>(self, items: Vec<T>) -> (Vec<T>, Option<String>) {
        let total = items.len();
        let page = items.into_iter().skip(self.offset).take(self.limit).collect();
        let next = self.offset.saturating_add(self.limit);
        (page, (next < total).then(|| format!("{next}:{}", self.limit)))
    }
}

/// The answer to `command` with `request`, from `view`.
pub fn answer(
    command: &str,
    request: &Map<String, Value>,
    view: &DiscoveryView,
    page: Pages,
) -> Result<Value, FunctionError> {
    let filters = Filters::of(request)?;
    match command {
        "list_peers" => {
            Ok(Value::Array(view.nodes.iter().skip(1).filter(|n| filters.node_matches(n)).map(peer_snapshot).collect()))
        }
        "cluster_map" => Ok(json!({
            "cluster_id": view.me.cluster_id,
            "generated_at": view.generated_at,
            "nodes": view.nodes.iter().map(node_snapshot).collect::<Vec<_>>(),
        })),
        "cluster_map_v2" => {
            let nodes: Vec<Value> = view.nodes.iter().filter(|n| filters.node_matches(n)).map(node_snapshot).collect();
            let (nodes, next) = page.slice(nodes);
            Ok(
                json!({"cluster_id": view.me.cluster_id, "generated_at": view.generated_at, "nodes": nodes, "next_page_token": next}),
            )
        }
        "catalog_query" => {
            let entry_type = request.get("entry_type").and_then(Value::as_str).unwrap_or("").to_lowercase();
            let items = match entry_type.as_str() {
                "functions" | "function" => function_items(view, &filters).into_iter().map(|(item, _)| item).collect(),
                "nodes" | "node" => view.nodes.iter().filter(|n| filters.node_matches(n)).map(node_entry).collect(),
                "queues" | "queue" => queue_items(view, &filters),
                other => {
                    return Err(FunctionError::value_error(format!(
                        "entry_type {other:?} is not kept in this server's catalog (it keeps functions, nodes, queues)"
                    )))
                }
            };
            let (items, next) = page.slice(items);
            Ok(
                json!({"entry_type": entry_type, "generated_at": view.generated_at, "items": items, "next_page_token": next}),
            )
        }
        "catalog_watch" => {
            let mut out = watch_response(DELTA_TOPIC, request, view);
            if let Some(changes) = &view.changes {
                out["version"] = json!(changes.version);
                if request.get("since_version").is_some_and(|v| !v.is_null()) {
                    out["changes"] = json!(changes.changes);
                    out["reset"] = json!(changes.reset);
                }
            }
            Ok(out)
        }
        "rpc_list" => {
            let items: Vec<Value> = function_items(view, &filters)
                .into_iter()
                .filter(|(_, f)| filters.query_matches(f, view))
                .map(|(_, f)| rpc_item(f, view, false))
                .collect();
            let (items, next) = page.slice(items);
            Ok(json!({"generated_at": view.generated_at, "items": items, "next_page_token": next}))
        }
        "rpc_describe" | "rpc_describe_local" => {
            let mode = request.get("mode").and_then(Value::as_str).unwrap_or("auto").to_lowercase();
            let local_only = command == "rpc_describe_local" || mode == "local";
            if !matches!(mode.as_str(), "auto" | "local" | "catalog" | "scatter") {
                return Err(FunctionError::value_error(format!(
                    "mode {mode:?} is not one of auto, local, catalog, scatter"
                )));
            }
            let items: Vec<Value> = function_items(view, &filters)
                .into_iter()
                .filter(|(_, f)| !local_only || f.node == view.me.node)
                .filter(|(_, f)| filters.query_matches(f, view) && filters.describe_matches(f))
                .map(|(_, f)| rpc_item(f, view, true))
                .collect();
            let (items, next) = page.slice(items);
            Ok(json!({"generated_at": view.generated_at, "items": items, "errors": [], "next_page_token": next}))
        }
        "rpc_report" => {
            let functions = function_items(view, &filters);
            let mut by_namespace: BTreeMap<String, usize> = BTreeMap::new();
            let mut by_cluster: BTreeMap<String, usize> = BTreeMap::new();
            for (_, f) in &functions {
                *by_namespace.entry(namespace_of(&f.identity.name).to_owned()).or_default() += 1;
                *by_cluster.entry(f.cluster_id.to_owned()).or_default() += 1;
            }
            let counts = |m: BTreeMap<String, usize>| {
                m.into_iter().map(|(key, count)| json!({"key": key, "count": count})).collect::<Vec<_>>()
            };
            Ok(json!({
                "generated_at": view.generated_at,
                "total_functions": functions.len(),
                "namespace_counts": counts(by_namespace),
                "cluster_counts": counts(by_cluster),
                "tag_counts": [],
            }))
        }
        "summary_query" => {
            let service = request.get("service_id").and_then(Value::as_str);
            let items: Vec<Value> = summaries(view, &filters)
                .into_iter()
                .filter(|s| service.is_none_or(|id| s["service_id"] == id))
                .collect();
            let include_ingress = request.get("include_ingress").and_then(Value::as_bool).unwrap_or(false)
                || request.get("ingress_limit").is_some_and(|v| !v.is_null());
            let ingress = include_ingress.then(|| ingress(view, request));
            let (items, next) = page.slice(items);
            Ok(json!({"generated_at": view.generated_at, "items": items, "ingress": ingress, "next_page_token": next}))
        }
        "summary_watch" => Ok(watch_response(SUMMARY_TOPIC, request, view)),
        other => Err(FunctionError::new("NotSupportedError", format!("{other} is not a discovery call"))),
    }
}

/// One function endpoint, borrowed from the view.
struct FunctionRef<'a> {
    identity: &'a FunctionIdentity,
    node: &'a str,
    cluster_id: &'a str,
    entry: &'a NodeEntry,
}

/// Filters shared by the calls (the reference's request fields; unknown ones are ignored,
/// as the reference ignores them).
#[derive(Debug, Default)]
struct Filters {
    scope: Option<String>,
    cluster_id: Option<String>,
    node_id: Option<String>,
    namespace: Option<String>,
    function_name: Option<String>,
    function_id: Option<String>,
    version: Option<VersionConstraint>,
    resources: Vec<String>,
    capabilities: Vec<String>,
    tags: Vec<String>,
    query: Option<String>,
    queue_name: Option<String>,
    names: Vec<String>,
    ids: Vec<String>,
}

fn text(request: &Map<String, Value>, key: &str) -> Option<String> {
    request.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn list(request: &Map<String, Value>, key: &str) -> Vec<String> {
    match request.get(key) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

impl Filters {
    fn of(request: &Map<String, Value>) -> Result<Filters, FunctionError> {
        let version = match text(request, "version_constraint") {
            Some(c) => Some(
                c.parse::<VersionConstraint>()
                    .map_err(|e| FunctionError::value_error(format!("invalid version constraint {c:?}: {e}")))?,
            ),
            None => None,
        };
        let scope =
            text(request, "scope").map(|s| s.to_lowercase()).map(|s| if s == "cluster" { SCOPE.to_owned() } else { s });
        Ok(Filters {
            scope,
            cluster_id: text(request, "cluster_id"),
            node_id: text(request, "node_id"),
            namespace: text(request, "namespace").or_else(|| text(request, "namespace_filter")),
            function_name: text(request, "function_name"),
            function_id: text(request, "function_id"),
            version,
            resources: list(request, "resources"),
            capabilities: list(request, "capabilities"),
            tags: list(request, "tags"),
            query: text(request, "query").map(|q| q.to_lowercase()),
            queue_name: text(request, "queue_name"),
            names: list(request, "function_names"),
            ids: list(request, "function_ids"),
        })
    }

    fn scope_matches(&self) -> bool {
        self.scope.as_deref().is_none_or(|s| s == SCOPE)
    }

    fn node_matches(&self, node: &NodeEntry) -> bool {
        let resources = node_resources(node);
        let capabilities = capabilities(node);
        self.scope_matches()
            && self.cluster_id.as_ref().is_none_or(|c| *c == node.info.cluster_id)
            && self.node_id.as_ref().is_none_or(|n| *n == node.info.node || *n == node.info.url)
            && self.resources.iter().all(|r| resources.contains(r.as_str()))
            && self.capabilities.iter().all(|c| capabilities.contains(&c.as_str()))
            && self.tags.is_empty()
    }

    fn function_matches(&self, f: &FunctionRef<'_>) -> bool {
        self.scope_matches()
            && self.cluster_id.as_deref().is_none_or(|c| c == f.cluster_id)
            && self.node_id.as_deref().is_none_or(|n| n == f.node || n == f.entry.info.url)
            && self.namespace.as_deref().is_none_or(|ns| {
                let own = namespace_of(&f.identity.name);
                own == ns || own.starts_with(&format!("{ns}."))
            })
            && self.function_name.as_deref().is_none_or(|n| n == f.identity.name)
            && self.function_id.as_deref().is_none_or(|id| id == f.identity.function_id)
            && self.version.as_ref().is_none_or(|c| c.matches(&f.identity.version))
            && self.resources.iter().all(|r| f.identity.resources.contains(r))
            && self.capabilities.iter().all(|c| c == "rpc")
            && self.tags.is_empty()
    }

    fn query_matches(&self, f: &FunctionRef<'_>, view: &DiscoveryView) -> bool {
        let Some(query) = &self.query else { return true };
        let doc = known(f, view).and_then(|l| l.doc).unwrap_or_default().to_lowercase();
        f.identity.name.to_lowercase().contains(query) || doc.contains(query)
    }

    fn describe_matches(&self, f: &FunctionRef<'_>) -> bool {
        (self.names.is_empty() || self.names.contains(&f.identity.name))
            && (self.ids.is_empty() || self.ids.contains(&f.identity.function_id))
    }
}

/// The reference's namespace of a name: what comes before its last dot ("" for none).
fn namespace_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(ns, _)| ns)
}

/// A node's resources: every resource of its functions.
fn node_resources(node: &NodeEntry) -> BTreeSet<&str> {
    node.functions.iter().flat_map(|f| f.resources.iter().map(String::as_str)).collect()
}

fn capabilities(node: &NodeEntry) -> Vec<&'static str> {
    if node.queues.is_empty() {
        vec!["rpc"]
    } else {
        vec!["queue", "rpc"]
    }
}

fn transport_endpoints(url: &str) -> Vec<Value> {
    let Some(rest) = url.split_once("://").map(|(scheme, rest)| (scheme, rest.split('/').next().unwrap_or(rest)))
    else {
        return Vec::new();
    };
    let (protocol, authority) = rest;
    let Some((host, port)) = authority.rsplit_once(':') else { return Vec::new() };
    let Ok(port) = port.parse::<u16>() else { return Vec::new() };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    vec![json!({"connection_type": "client", "protocol": protocol, "host": host, "port": port, "endpoint": url})]
}

fn peer_snapshot(node: &NodeEntry) -> Value {
    let funs: BTreeSet<&str> = node.functions.iter().map(|f| f.name.as_str()).collect();
    json!({
        "url": node.info.url,
        "cluster_id": node.info.cluster_id,
        "funs": funs,
        "locs": node_resources(node),
        "last_seen": node.last_seen,
        "status": node.status,
        "status_timestamp": node.last_seen,
        "scope": SCOPE,
        "region": null,
        "advertised_urls": [node.info.url],
        "transport_endpoints": transport_endpoints(&node.info.url),
        "load": null,
        "node_id": node.info.node,
    })
}

fn node_snapshot(node: &NodeEntry) -> Value {
    json!({
        "node_id": node.info.node,
        "cluster_id": node.info.cluster_id,
        "resources": node_resources(node),
        "capabilities": capabilities(node),
        "region": null,
        "scope": SCOPE,
        "tags": [],
        "transport_endpoints": transport_endpoints(&node.info.url),
        "advertised_urls": [node.info.url],
        "advertised_at": node.advertised_at,
        "load": null,
        "status": node.status,
    })
}

fn node_entry(node: &NodeEntry) -> Value {
    let mut out = node_snapshot(node);
    out["ttl_seconds"] = json!(node.ttl_s);
    out
}

fn identity_json(identity: &FunctionIdentity) -> Value {
    json!({"name": identity.name, "function_id": identity.function_id, "version": identity.version.to_string()})
}

/// Every function endpoint that passes the filters, with its `catalog_query` item, sorted
/// by cluster, node, name, id and version.
fn function_items<'a>(view: &'a DiscoveryView, filters: &Filters) -> Vec<(Value, FunctionRef<'a>)> {
    let mut out: Vec<(Value, FunctionRef<'a>)> = view
        .nodes
        .iter()
        .flat_map(|entry| {
            entry.functions.iter().map(move |identity| FunctionRef {
                identity,
                node: &entry.info.node,
                cluster_id: &entry.info.cluster_id,
                entry,
            })
        })
        .filter(|f| filters.function_matches(f))
        .map(|f| (function_item(&f), f))
        .collect();
    out.sort_by(|(_, a), (_, b)| {
        (a.cluster_id, a.node, &a.identity.name, &a.identity.function_id, &a.identity.version).cmp(&(
            b.cluster_id,
            b.node,
            &b.identity.name,
            &b.identity.function_id,
            &b.identity.version,
        ))
    });
    out
}

fn function_item(f: &FunctionRef<'_>) -> Value {
    json!({
        "identity": identity_json(f.identity),
        "namespace": namespace_of(&f.identity.name),
        "resources": f.identity.resources,
        "node_id": f.node,
        "cluster_id": f.cluster_id,
        "scope": SCOPE,
        "tags": [],
        "advertised_at": f.entry.advertised_at,
        "ttl_seconds": f.entry.ttl_s,
        "url": f.entry.info.url,
    })
}

fn queue_items(view: &DiscoveryView, filters: &Filters) -> Vec<Value> {
    let mut out: Vec<(&str, &str, Value)> = Vec::new();
    if !filters.scope_matches() || !filters.tags.is_empty() {
        return Vec::new();
    }
    for node in &view.nodes {
        if filters.cluster_id.as_ref().is_some_and(|c| *c != node.info.cluster_id)
            || filters.node_id.as_ref().is_some_and(|n| *n != node.info.node && *n != node.info.url)
        {
            continue;
        }
        for queue in node.queues.iter().filter(|q| filters.queue_name.as_ref().is_none_or(|n| n == *q)) {
            out.push((
                &node.info.cluster_id,
                queue,
                json!({
                    "queue_name": queue,
                    "node_id": node.info.node,
                    "cluster_id": node.info.cluster_id,
                    "scope": SCOPE,
                    "tags": [],
                    "advertised_at": node.advertised_at,
                    "ttl_seconds": node.ttl_s,
                    "url": node.info.url,
                }),
            ));
        }
    }
    out.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    out.into_iter().map(|(_, _, item)| item).collect()
}

/// What is known about a function beyond its identity: this node's own from its
/// registration, another node's from what its catalog entry tells (`None`: nothing told).
fn known(f: &FunctionRef<'_>, view: &DiscoveryView) -> Option<LocalFunction> {
    if f.node == view.me.node {
        return view.local.iter().find(|l| l.identity == *f.identity).cloned();
    }
    f.entry.about.iter().find(|a| a.describes(f.identity)).map(|a| LocalFunction {
        identity: f.identity.clone(),
        signature: a.params.as_deref().and_then(|p| Signature::parse(p).ok()),
        doc: a.doc.clone(),
    })
}

/// An `rpc_list` item (`describe`: an `rpc_describe` item, with the spec). Summaries and
/// specs exist for functions whose node declared parameters or documentation.
fn rpc_item(f: FunctionRef<'_>, view: &DiscoveryView, describe: bool) -> Value {
    let known = known(&f, view);
    let local = known.as_ref();
    let namespace = namespace_of(&f.identity.name);
    let summary_text = local.and_then(|l| l.doc.as_deref()).and_then(|d| d.lines().next()).unwrap_or("");
    let summary = local.map(|l| {
        let (count, required) = l
            .signature
            .as_ref()
            .map_or((0, 0), |s| (s.params().len(), s.params().iter().filter(|p| p.required()).count()));
        json!({
            "identity": identity_json(f.identity),
            "namespace": namespace,
            "summary": summary_text,
            "parameter_count": count,
            "required_parameter_count": required,
            "return_type": {"display": "Any", "args": [], "is_optional": false},
            "spec_version": "1",
            "spec_digest": "",
        })
    });
    let mut item = json!({
        "identity": identity_json(f.identity),
        "namespace": namespace,
        "node_id": f.node,
        "cluster_id": f.cluster_id,
        "resources": f.identity.resources,
        "tags": [],
        "scope": SCOPE,
        "summary": summary,
        "spec_digest": null,
    });
    if describe {
        item["spec"] = match local {
            Some(l) => json!({
                "identity": identity_json(f.identity),
                "namespace": namespace,
                "doc": {
                    "summary": summary_text,
                    "description": l.doc.clone().unwrap_or_default(),
                    "param_docs": [],
                    "return_doc": "",
                },
                "parameters": l.signature.as_ref().map_or(json!([]), Signature::describe),
                "parameters_declared": l.signature.is_some(),
                "return_spec": {"type_spec": {"display": "Any", "args": [], "is_optional": false}, "doc": ""},
                "resources": f.identity.resources,
                "tags": [],
                "scope": SCOPE,
                "capabilities": ["rpc"],
                "examples": [],
                "spec_version": "1",
                "spec_digest": "",
            }),
            None => Value::Null,
        };
    }
    item
}

/// One summary per service (function name): how many endpoints serve it, in which
/// clusters.
fn summaries(view: &DiscoveryView, filters: &Filters) -> Vec<Value> {
    let mut by_service: BTreeMap<&str, (usize, BTreeSet<&str>, f64)> = BTreeMap::new();
    for (_, f) in function_items(view, filters) {
        let entry = by_service.entry(&f.identity.name).or_insert((0, BTreeSet::new(), f64::MAX));
        entry.0 += 1;
        entry.1.insert(f.cluster_id);
        entry.2 = entry.2.min(f.entry.ttl_s);
    }
    by_service
        .into_iter()
        .map(|(service, (count, clusters, ttl))| {
            let source = (clusters.len() == 1).then(|| clusters.iter().next().copied()).flatten();
            json!({
                "namespace": service.rsplit_once('.').map_or(service, |(ns, _)| ns),
                "service_id": service,
                "regions": [],
                "endpoint_count": count,
                "health_band": "healthy",
                "ttl_seconds": ttl,
                "generated_at": view.generated_at,
                "scope": SCOPE,
                "policy_version": null,
                "source_cluster": source,
                "clusters": clusters,
            })
        })
        .collect()
}

/// Where a client of each cluster can connect: its nodes' URLs.
fn ingress(view: &DiscoveryView, request: &Map<String, Value>) -> Value {
    let limit = request.get("ingress_limit").and_then(Value::as_u64).map_or(usize::MAX, |l| l as usize);
    let mut by_cluster: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in &view.nodes {
        let urls = by_cluster.entry(&node.info.cluster_id).or_default();
        if urls.len() < limit {
            urls.push(&node.info.url);
        }
    }
    json!(by_cluster)
}

fn watch_response(topic: &str, request: &Map<String, Value>, view: &DiscoveryView) -> Value {
    json!({
        "topic": topic,
        "generated_at": view.generated_at,
        "scope": text(request, "scope").unwrap_or_else(|| SCOPE.to_owned()),
        "namespace": request.get("namespace").cloned().unwrap_or(Value::Null),
        "cluster_id": text(request, "cluster_id").unwrap_or_else(|| view.me.cluster_id.clone()),
    })
}

/// Every function and queue entry of `nodes`, by a stable key, as `catalog_query` lists
/// them: what the change log compares.
pub fn catalog_entries(nodes: &[NodeEntry]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in nodes {
        for identity in &entry.functions {
            let f = FunctionRef { identity, node: &entry.info.node, cluster_id: &entry.info.cluster_id, entry };
            let key = format!("function\u{0}{}\u{0}{}\u{0}{:?}", entry.info.node, entry.info.instance_id, identity);
            let mut item = function_item(&f);
            item["entry_type"] = json!("functions");
            out.insert(key, item);
        }
        for queue in &entry.queues {
            let key = format!("queue\u{0}{}\u{0}{}\u{0}{queue}", entry.info.node, entry.info.instance_id);
            out.insert(
                key,
                json!({"entry_type": "queues", "queue_name": queue, "node_id": entry.info.node,
                       "cluster_id": entry.info.cluster_id, "url": entry.info.url}),
            );
        }
    }
    out
}

/// The summaries of `nodes`, for the summary topic.
pub fn summaries_of(me: &NodeInfo, nodes: &[NodeEntry], now: f64) -> Value {
    let view =
        DiscoveryView { generated_at: now, me: me.clone(), nodes: nodes.to_vec(), local: Vec::new(), changes: None };
    json!(summaries(&view, &Filters::default()))
}
