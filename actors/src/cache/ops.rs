//! One wire operation (`role: "cache"`) on this node's levels: checks the frame's fields,
//! calls [`LocalCache`], shapes the `result` of the `cache-reply`.

use serde_json::{json, Value};

use super::core::{CacheError, CacheKey, Entry};
use super::local::{Level, Levels, LocalCache, Written};
use crate::metrics::Metrics;
use crate::protocol::{CacheRequest, RpcError};

/// The ops a `cache` frame may name.
pub const OPS: [&str; 7] = ["get", "put", "delete", "invalidate", "incr", "cas", "stats"];

/// A [`CacheError`] on the wire: 1002 for bad input (a bound counted under its setting),
/// 1003 for a storage failure.
pub fn to_rpc(error: CacheError, metrics: &Metrics) -> RpcError {
    match error {
        CacheError::Invalid(m) => RpcError::invalid(m),
        CacheError::Limit(setting, m) => {
            metrics.limit_exceeded(setting);
            RpcError::invalid(m)
        }
        CacheError::Storage(m) => RpcError::execution_failed(m),
    }
}

/// The request's key, checked.
pub fn key_of(cache: &LocalCache, request: &CacheRequest) -> Result<CacheKey, CacheError> {
    let namespace = request.namespace.as_deref().ok_or_else(|| missing("namespace", &request.op))?;
    let key = request.key.as_deref().ok_or_else(|| missing("key", &request.op))?;
    cache.key(namespace, key)
}

fn missing(field: &str, op: &str) -> CacheError {
    CacheError::Invalid(format!("cache {op} needs {field:?}"))
}

/// The request's value, checked (`put`, `cas`).
pub fn value_of(cache: &LocalCache, request: &CacheRequest) -> Result<Value, CacheError> {
    let value = request.value.clone().ok_or_else(|| missing("value", &request.op))?;
    cache.check_value(&value)?;
    Ok(value)
}

/// `{"found": true, "value", "version", "level", "expires_in"}`.
pub fn found(entry: &Entry, level: Level, now: f64) -> Value {
    json!({
        "found": true,
        "value": entry.value,
        "version": entry.version,
        "level": level.as_str(),
        "expires_in": entry.expires_in(now),
    })
}

/// Runs `request` on this node's levels only (`l3` in `levels` is ignored here; the
/// cluster layer handles it).
pub fn execute_local(cache: &LocalCache, request: &CacheRequest, node: &str, now: f64) -> Result<Value, CacheError> {
    let levels = Levels::parse(request.levels.as_deref())?.local();
    if !levels.l1 && !levels.l2 && request.op != "stats" {
        return Err(CacheError::Invalid(format!("cache {} needs l1 or l2 on this node", request.op)));
    }
    match request.op.as_str() {
        "get" => {
            let key = key_of(cache, request)?;
            Ok(match cache.get(&key, levels, now)? {
                Some((entry, level)) => found(&entry, level, now),
                None => json!({"found": false}),
            })
        }
        "put" => {
            let key = key_of(cache, request)?;
            let value = value_of(cache, request)?;
            let expires_at = cache.expiry(request.ttl, now)?;
            Ok(match cache.put(&key, value, expires_at, request.version, levels, now)? {
                Written::Stored(entry) => json!({"version": entry.version, "stored": true}),
                Written::Older { kept } => json!({"version": kept, "stored": false}),
            })
        }
        "delete" => {
            let key = key_of(cache, request)?;
            Ok(json!({"deleted": cache.delete(&key, levels, now)?}))
        }
        "invalidate" => {
            let namespace = request.namespace.as_deref().ok_or_else(|| missing("namespace", &request.op))?;
            Ok(json!({"removed": cache.invalidate(namespace, request.prefix.as_deref(), levels)?}))
        }
        "incr" => {
            let key = key_of(cache, request)?;
            let entry = cache.incr(&key, request.by.unwrap_or(1), request.ttl, levels, now)?;
            Ok(json!({"value": entry.value, "version": entry.version}))
        }
        "cas" => {
            let key = key_of(cache, request)?;
            let value = value_of(cache, request)?;
            let expected = request.version.ok_or_else(|| missing("version", &request.op))?;
            let expires_at = cache.expiry(request.ttl, now)?;
            Ok(match cache.cas(&key, value, expected, expires_at, levels, now)? {
                Ok(entry) => json!({"swapped": true, "version": entry.version}),
                Err(current) => json!({"swapped": false, "version": current}),
            })
        }
        "stats" => {
            let mut stats = cache.stats();
            stats["node"] = Value::from(node);
            Ok(stats)
        }
        other => Err(CacheError::Invalid(format!("unknown cache op {other:?} (one of {})", OPS.join(", ")))),
    }
}
