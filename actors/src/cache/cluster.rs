//! L3: the cluster's cache over the fabric.
//!
//! **Owners.** Every node serves the cache. A key's owners are the `cache_replication`
//! nodes with the highest rendezvous score among this node and every node it can reach
//! ([`super::core::owners`]); the first is the primary. Nodes that see the same members
//! agree on the owners without talking; a node joining or leaving moves only its keys.
//!
//! **Writes** (`put`, `delete`, `incr`, `cas`) run on the primary (forwarded to it as a
//! `cache-op` with duty `primary`; if it is unreachable, the next owner takes the role).
//! The primary assigns the version (so `incr` and `cas` are atomic there), stores the
//! entry in its L1 and L2, then, before answering, sends the versioned entry to the
//! other owners (duty `local`: stored only if newer, last writer wins) and a delete of
//! the key to every other node (which drops any copy it read earlier). So when a write
//! is answered, no reachable node still serves the old value.
//!
//! **Reads** try this node's L1, then L2, then each owner in turn (duty `local`: its own
//! levels only). A value read from an owner is kept as a copy in this node's L1 for at
//! most `cache_copy_ttl_s` (less if it expires sooner): the next write drops it, and the
//! bound caps how long a copy could outlive a drop that was lost with a link.
//!
//! **Invalidation** (namespace or prefix) runs here and on every reachable node (duty
//! `local`), all at once; `removed` is the sum over the nodes.
//!
//! A node that restarts serves what its L2 kept (never an expired entry); writes it
//! missed while down reach it again only through later writes.
//!
//! **Limits.** Owners are computed from each node's own view of the members, without
//! coordination: while two nodes disagree (a link closed for silence, a partition) they
//! may send a key's writes to different primaries, so `incr` and `cas` are atomic per
//! primary only; a write whose answer was lost with its link is retried on the next
//! owner and may be applied twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::FutureExt;
use serde_json::{json, Value};
use tracing::debug;

use super::core::{owners, CacheKey, Entry};
use super::local::{Level, Levels, LocalCache, Written};
use super::ops::{self, found, key_of, to_rpc, value_of};
use crate::fabric::bridge::Work;
use crate::fabric::wire::CallOutcome;
use crate::fabric::FabricShared;
use crate::protocol::{CacheReply, CacheRequest, RpcError};
use crate::unix_now;

/// Duty of a forwarded op: run as the key's primary owner.
pub const PRIMARY: &str = "primary";
/// Duty of a forwarded op: run on the target's own levels only.
pub const LOCAL: &str = "local";

/// How a request is served.
#[derive(Debug)]
pub enum Route {
    /// Answered in place, from this node's levels.
    Answered(Result<Value, RpcError>),
    /// Needs other nodes: run [`execute`] as a task.
    Cluster,
}

/// The nodes serving the cache: this one and every node it can reach.
pub fn alive(fabric: &FabricShared) -> Vec<String> {
    let view = fabric.view.load();
    let mut nodes: Vec<String> = view.next_hops.keys().cloned().collect();
    nodes.push(fabric.me.node.clone());
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Serves what it can in place: every op without `l3`, or when no other node is
/// reachable; a `get` this node's levels answer; `stats`. Everything else goes to
/// [`execute`].
pub fn route(fabric: &FabricShared, cache: &LocalCache, request: &CacheRequest, now: f64) -> Route {
    let metrics = &fabric.metrics;
    let levels = match Levels::parse(request.levels.as_deref()) {
        Ok(levels) => levels,
        Err(e) => return Route::Answered(Err(to_rpc(e, metrics))),
    };
    let l3 = levels.l3 && !fabric.view.load().next_hops.is_empty();
    // L4 is read-only: other ops run as without it.
    let l4 = levels.l4 && request.op == "get";
    if (!l3 && !l4) || request.op == "stats" || !ops::OPS.contains(&request.op.as_str()) {
        let mut outcome = ops::execute_local(cache, request, &fabric.me.node, now).map_err(|e| to_rpc(e, metrics));
        if let (Ok(stats), "stats") = (&mut outcome, request.op.as_str()) {
            stats["l3"]["nodes"] = json!(alive(fabric));
            stats["l3"]["replication"] = json!(cache.limits().replication);
        }
        return Route::Answered(outcome);
    }
    if request.op == "get" && (levels.l1 || levels.l2) {
        let key = match key_of(cache, request) {
            Ok(key) => key,
            Err(e) => return Route::Answered(Err(to_rpc(e, metrics))),
        };
        match cache.get(&key, levels.local(), now) {
            Ok(Some((entry, level))) => return Route::Answered(Ok(found(&entry, level, now))),
            Ok(None) => {}
            Err(e) => return Route::Answered(Err(to_rpc(e, metrics))),
        }
    }
    Route::Cluster
}

/// Runs an op that needs other nodes (see [`route`]), within `timeout` per remote call.
pub async fn execute(
    fabric: &FabricShared,
    cache: &LocalCache,
    request: CacheRequest,
    timeout: Duration,
) -> Result<Value, RpcError> {
    let metrics = &fabric.metrics;
    let now = unix_now();
    match request.op.as_str() {
        "get" => {
            let levels = Levels::parse(request.levels.as_deref()).map_err(|e| to_rpc(e, metrics))?;
            let in_cluster = levels.l3 && !fabric.view.load().next_hops.is_empty();
            if in_cluster {
                let answer = read_from(Level::L3, fabric, cache, &request, timeout, now).await;
                if !levels.l4 || answer.as_ref().is_ok_and(|a| a["found"].as_bool() == Some(true)) {
                    return answer;
                }
            }
            read_from(Level::L4, fabric, cache, &request, timeout, now).await
        }
        "invalidate" => {
            let mut local = request.clone();
            local.levels = None;
            let here = ops::execute_local(cache, &local, &fabric.me.node, now).map_err(|e| to_rpc(e, metrics))?;
            let others: Vec<String> = alive(fabric).into_iter().filter(|n| *n != fabric.me.node).collect();
            let answers = join_all(others.iter().map(|n| remote(fabric, cache, n, LOCAL, &local, timeout))).await;
            let mut removed = here["removed"].as_u64().unwrap_or(0);
            let mut reached = 1;
            for answer in answers.into_iter().flatten() {
                removed += answer["removed"].as_u64().unwrap_or(0);
                reached += 1;
            }
            Ok(json!({"removed": removed, "nodes": reached}))
        }
        _ => write_on_primary(fabric, cache, request, timeout).await,
    }
}

/// A write goes to the first owner that answers (this node runs it itself when it is
/// that owner); an owner that cannot be reached is skipped.
async fn write_on_primary(
    fabric: &FabricShared,
    cache: &LocalCache,
    request: CacheRequest,
    timeout: Duration,
) -> Result<Value, RpcError> {
    let key = key_of(cache, &request).map_err(|e| to_rpc(e, &fabric.metrics))?;
    let nodes = alive(fabric);
    let owners = owners(&key.hash_input(), &nodes, cache.limits().replication);
    let mut unreachable = Vec::new();
    for owner in owners {
        if owner == fabric.me.node {
            return run_as_primary(fabric, cache, &request, timeout).await;
        }
        match remote(fabric, cache, owner, PRIMARY, &request, timeout).await {
            Err(e) if e.code == crate::protocol::ErrorCode::Unreachable.as_u16() => unreachable.push(e.details_text()),
            outcome => return outcome,
        }
    }
    Err(RpcError::unreachable(format!("no owner of the key answered: {}", unreachable.join("; "))))
}

/// Runs a write as the key's primary, then brings every other node in line before
/// answering: owners get the versioned entry (or the delete), the others drop the key.
async fn run_as_primary(
    fabric: &FabricShared,
    cache: &LocalCache,
    request: &CacheRequest,
    timeout: Duration,
) -> Result<Value, RpcError> {
    let metrics = &fabric.metrics;
    let now = unix_now();
    let fail = |e| to_rpc(e, metrics);
    let key = key_of(cache, request).map_err(fail)?;
    let (result, entry) = match request.op.as_str() {
        "put" => {
            let value = value_of(cache, request).map_err(fail)?;
            let expires_at = cache.expiry(request.ttl, now).map_err(fail)?;
            match cache.put(&key, value, expires_at, request.version, Levels::LOCAL, now).map_err(fail)? {
                Written::Stored(entry) => (json!({"version": entry.version, "stored": true}), Some(entry)),
                Written::Older { kept } => return Ok(json!({"version": kept, "stored": false})),
            }
        }
        "incr" => {
            let entry = cache.incr(&key, request.by.unwrap_or(1), request.ttl, Levels::LOCAL, now).map_err(fail)?;
            (json!({"value": entry.value, "version": entry.version}), Some(entry))
        }
        "cas" => {
            let value = value_of(cache, request).map_err(fail)?;
            let expected =
                request.version.ok_or_else(|| RpcError::invalid("cache cas needs \"version\"".to_owned()))?;
            let expires_at = cache.expiry(request.ttl, now).map_err(fail)?;
            match cache.cas(&key, value, expected, expires_at, Levels::LOCAL, now).map_err(fail)? {
                Ok(entry) => (json!({"swapped": true, "version": entry.version}), Some(entry)),
                Err(current) => return Ok(json!({"swapped": false, "version": current})),
            }
        }
        "delete" => (json!({"deleted": cache.delete(&key, Levels::LOCAL, now).map_err(fail)?}), None),
        other => return Err(RpcError::invalid(format!("cache {other} is not a write"))),
    };
    let deleted = result["deleted"].as_bool().unwrap_or(false);
    let remote_deleted = spread(fabric, cache, &key, entry.as_deref(), request, timeout, now).await;
    if request.op == "delete" {
        return Ok(json!({"deleted": deleted || remote_deleted}));
    }
    Ok(result)
}

/// Sends a write's outcome to every other node: the entry (or the delete) to the other
/// owners, a delete to the rest; whether any of them held the key (for `delete`).
async fn spread(
    fabric: &FabricShared,
    cache: &LocalCache,
    key: &CacheKey,
    entry: Option<&Entry>,
    request: &CacheRequest,
    timeout: Duration,
    now: f64,
) -> bool {
    let nodes = alive(fabric);
    let owners = owners(&key.hash_input(), &nodes, cache.limits().replication);
    let mut drop = CacheRequest::new(request.u.clone(), "delete");
    drop.namespace = Some(key.namespace().to_owned());
    drop.key = Some(key.key().to_owned());
    let replica = entry.map(|entry| {
        let mut put = CacheRequest::new(request.u.clone(), "put");
        put.namespace = drop.namespace.clone();
        put.key = drop.key.clone();
        put.value = Some(entry.value.clone());
        put.version = Some(entry.version);
        // Relative on the wire; a replica's clock within a few ms of ours is enough.
        put.ttl = entry.expires_at.map(|at| (at - now).max(0.001));
        put
    });
    let sends = nodes.iter().filter(|n| **n != fabric.me.node).map(|node| {
        let message = match &replica {
            Some(put) if owners.contains(&node.as_str()) => put,
            _ => &drop,
        };
        remote(fabric, cache, node, LOCAL, message, timeout)
    });
    let answers = join_all(sends).await;
    answers.iter().any(|a| a.as_ref().is_ok_and(|v| v["deleted"].as_bool() == Some(true)))
}

/// Other clusters asked by one L4 read, at most.
pub const MAX_L4_CLUSTERS: usize = 4;

/// A read this node's levels missed, from `level`: L3, each owner in turn; L4, the
/// clusters this node reaches, nearest first, at most [`MAX_L4_CLUSTERS`] of them, all
/// within `timeout`, each reading its own L1–L3 (never on to a further cluster) if its
/// export list shares the namespace (else 1001, a miss here), a hit naming the cluster.
/// A hit is kept as a short copy in L1.
async fn read_from(
    level: Level,
    fabric: &FabricShared,
    cache: &LocalCache,
    request: &CacheRequest,
    timeout: Duration,
    now: f64,
) -> Result<Value, RpcError> {
    let metrics = &fabric.metrics;
    let key = key_of(cache, request).map_err(|e| to_rpc(e, metrics))?;
    let levels = Levels::parse(request.levels.as_deref()).map_err(|e| to_rpc(e, metrics))?;
    let mut ask = request.clone();
    let reads: Vec<LocalBoxFuture<'_, Result<Value, RpcError>>> = if level == Level::L4 {
        ask.levels = Some(vec!["l1".into(), "l2".into(), "l3".into()]);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut clusters = fabric.clusters_reached();
        clusters.truncate(MAX_L4_CLUSTERS);
        let read = move |(cluster, via): (String, Option<String>), ask: CacheRequest| async move {
            if tokio::time::Instant::now() >= deadline {
                return Err(RpcError::timeout(timeout.as_secs_f64()));
            }
            let work = Work::Cache(Box::new(ask));
            let read = fabric.run_in_cluster(&cluster, via.as_deref(), work, Some(deadline.into_std()));
            let mut answer = match tokio::time::timeout_at(deadline, read).await {
                Ok(answer) => answer?,
                Err(_) => return Err(RpcError::timeout(timeout.as_secs_f64())),
            };
            answer["cluster"] = json!(cluster);
            Ok(answer)
        };
        clusters.into_iter().map(|c| read(c, ask.clone()).boxed_local()).collect()
    } else {
        ask.levels = None;
        let nodes = alive(fabric);
        let owners: Vec<String> = owners(&key.hash_input(), &nodes, cache.limits().replication)
            .into_iter()
            .filter(|owner| *owner != fabric.me.node)
            .map(str::to_owned)
            .collect();
        let read = move |owner: String, ask: CacheRequest| async move {
            remote(fabric, cache, &owner, LOCAL, &ask, timeout).await
        };
        owners.into_iter().map(|owner| read(owner, ask.clone()).boxed_local()).collect()
    };
    first_hit(cache, &key, (level, levels.l1), reads, now).await
}

/// Asks each of `reads` (a source's answer to the `get`) in turn: the first hit answers
/// at `level`, kept as a short copy in L1 when `copy`; a source without the key (or, with
/// 1001, not sharing it) is a miss. None has it: a miss, or the error when every source
/// failed.
async fn first_hit(
    cache: &LocalCache,
    key: &CacheKey,
    (level, copy): (Level, bool),
    reads: Vec<LocalBoxFuture<'_, Result<Value, RpcError>>>,
    now: f64,
) -> Result<Value, RpcError> {
    let (mut failures, asked) = (Vec::new(), reads.len());
    for read in reads {
        match read.await {
            Ok(mut answer) if answer["found"].as_bool() == Some(true) => {
                cache.hit(level);
                if copy {
                    keep_copy(cache, key, &answer, now);
                }
                answer["level"] = json!(level.as_str());
                return Ok(answer);
            }
            Ok(_) => {}
            Err(e) if e.kind() == Some(crate::protocol::ErrorCode::NotFound) => {}
            Err(e) => failures.push(e),
        }
    }
    cache.miss(level);
    match failures.pop() {
        // Every source asked failed: say so rather than report a miss.
        Some(e) if failures.len() + 1 == asked => Err(e),
        _ => Ok(json!({"found": false})),
    }
}

/// A cache read that came from another cluster (see `read_from`): this
/// cluster's levels, as a client of this node would read them.
pub async fn serve_for_cluster(
    fabric: &FabricShared,
    cache: &LocalCache,
    mut request: CacheRequest,
) -> Result<Value, RpcError> {
    request.levels = Some(vec!["l1".into(), "l2".into(), "l3".into()]);
    match route(fabric, cache, &request, unix_now()) {
        Route::Answered(outcome) => outcome,
        Route::Cluster => execute(fabric, cache, request, cache.limits().remote_timeout).await,
    }
}

/// Keeps a value read from an owner in this node's L1, for at most `cache_copy_ttl_s`.
fn keep_copy(cache: &LocalCache, key: &CacheKey, answer: &Value, now: f64) {
    let Some(version) = answer["version"].as_u64() else { return };
    let cap = now + cache.limits().copy_ttl_s;
    let expires_at = answer["expires_in"].as_f64().map_or(cap, |left| (now + left).min(cap));
    let copy = Levels { l1: true, l2: false, l3: false, l4: false };
    if let Err(e) = cache.put(key, answer["value"].clone(), Some(expires_at), Some(version), copy, now) {
        debug!(cause = %e, "cache copy not kept");
    }
}

/// One op on another node; its `cache-reply` as a result.
async fn remote(
    fabric: &FabricShared,
    cache: &LocalCache,
    node: &str,
    duty: &str,
    request: &CacheRequest,
    timeout: Duration,
) -> Result<Value, RpcError> {
    let body = serde_json::to_value(request).map_err(|e| RpcError::invalid(e.to_string()))?;
    cache.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let outcome = match tokio::time::timeout(timeout, fabric.cache_op(node, duty, body)).await {
        Ok(outcome) => outcome,
        Err(_) => return Err(RpcError::timeout(timeout.as_secs_f64())),
    };
    outcome.into_op_result("cache", node)
}

/// A cache op from another node (see [`crate::fabric::wire::FabricBody::CacheOp`]).
pub async fn serve(fabric: &FabricShared, cache: &Arc<LocalCache>, duty: &str, request: Value) -> CallOutcome {
    let u = request.get("u").and_then(Value::as_str).map(str::to_owned);
    let outcome = match serde_json::from_value::<CacheRequest>(request) {
        Err(e) => Err(RpcError::invalid(format!("bad forwarded cache request: {e}"))),
        Ok(request) => match duty {
            PRIMARY => run_as_primary(fabric, cache, &request, cache.limits().remote_timeout).await,
            LOCAL => {
                let mut local = request;
                local.levels = None;
                ops::execute_local(cache, &local, &fabric.me.node, unix_now()).map_err(|e| to_rpc(e, &fabric.metrics))
            }
            other => Err(RpcError::invalid(format!("unknown cache duty {other:?}"))),
        },
    };
    CallOutcome::Ok { value: serde_json::to_value(CacheReply::new(u, outcome)).unwrap_or(Value::Null) }
}
