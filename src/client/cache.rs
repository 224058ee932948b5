//! Typed cache operations (`role: "cache"`, see `mpreg_actors::cache`).
//!
//! ```no_run
//! # async fn run() -> Result<(), mpreg::ClientError> {
//! use mpreg::{CacheOptions, Client};
//! use serde_json::json;
//! let client = Client::connect("ws://127.0.0.1:6666").await?;
//! client.cache_put("users", "42", json!({"name": "ada"}), CacheOptions::ttl(60.0)).await?;
//! let hit = client.cache_get("users", "42", CacheOptions::default()).await?;
//! assert_eq!(hit.map(|h| h.value), Some(json!({"name": "ada"})));
//! // Cache-aside: computed (and stored) only on a miss.
//! let profile = client
//!     .cache_get_or_put("users", "7", CacheOptions::ttl(60.0), || async { Ok(json!({"name": "bob"})) })
//!     .await?;
//! # let _ = profile; Ok(()) }
//! ```

use std::future::Future;

use serde_json::{json, Map, Value};

use super::{Client, ClientError};

/// Levels and TTL of one operation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheOptions {
    /// Seconds to live (writes); `None`: the node's `cache_default_ttl_s`.
    pub ttl: Option<f64>,
    /// Levels the operation may touch (`l1`, `l2`, `l3`; `l4`: a `get` may read other
    /// clusters); empty: l1, l2, l3.
    pub levels: Vec<String>,
}

impl CacheOptions {
    /// Every level, this TTL.
    pub fn ttl(seconds: f64) -> Self {
        CacheOptions { ttl: Some(seconds), levels: Vec::new() }
    }

    /// Only these levels.
    pub fn levels(mut self, levels: &[&str]) -> Self {
        self.levels = levels.iter().map(|l| (*l).to_owned()).collect();
        self
    }
}

/// A value found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheHit {
    /// The value.
    pub value: Value,
    /// Its version (what `cas` compares).
    pub version: u64,
    /// The level that served it: `l1`, `l2`, `l3` or `l4`.
    pub level: String,
    /// The cluster that served it (L4 only).
    pub cluster: Option<String>,
    /// Seconds until it expires; `None`: never.
    pub expires_in: Option<f64>,
}

/// The outcome of a `cas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the value was stored.
    pub swapped: bool,
    /// The entry's version now (0: absent).
    pub version: u64,
}

impl Client {
    /// One cache op: `{"role": "cache", "u", "op", ...fields}` -> its `result`.
    pub async fn cache_op(&self, op: &str, fields: Value, options: &CacheOptions) -> Result<Value, ClientError> {
        let u = self.next_u();
        let mut frame = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        frame.insert("role".into(), json!("cache"));
        frame.insert("u".into(), json!(u));
        frame.insert("op".into(), json!(op));
        if let Some(ttl) = options.ttl {
            frame.insert("ttl".into(), json!(ttl));
        }
        if !options.levels.is_empty() {
            frame.insert("levels".into(), json!(options.levels));
        }
        let reply = self.roundtrip(u, Value::Object(frame), self.inner.deadline).await?;
        if let Some(error) = reply.get("error").filter(|e| !e.is_null()) {
            let error = serde_json::from_value(error.clone()).map_err(|e| ClientError::Protocol(e.to_string()))?;
            return Err(ClientError::Rpc(error));
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }

    /// The value at `namespace`/`key`; `None` on a miss.
    pub async fn cache_get(
        &self,
        namespace: &str,
        key: &str,
        options: CacheOptions,
    ) -> Result<Option<CacheHit>, ClientError> {
        let r = self.cache_op("get", json!({"namespace": namespace, "key": key}), &options).await?;
        if r["found"].as_bool() != Some(true) {
            return Ok(None);
        }
        Ok(Some(CacheHit {
            value: r["value"].clone(),
            version: r["version"].as_u64().unwrap_or(0),
            level: r["level"].as_str().unwrap_or("").to_owned(),
            cluster: r["cluster"].as_str().map(str::to_owned),
            expires_in: r["expires_in"].as_f64(),
        }))
    }

    /// Stores `value`; its new version.
    pub async fn cache_put(
        &self,
        namespace: &str,
        key: &str,
        value: Value,
        options: CacheOptions,
    ) -> Result<u64, ClientError> {
        let r = self.cache_op("put", json!({"namespace": namespace, "key": key, "value": value}), &options).await?;
        Ok(r["version"].as_u64().unwrap_or(0))
    }

    /// Removes a key from every level that holds it; whether one did.
    pub async fn cache_delete(&self, namespace: &str, key: &str, options: CacheOptions) -> Result<bool, ClientError> {
        let r = self.cache_op("delete", json!({"namespace": namespace, "key": key}), &options).await?;
        Ok(r["deleted"].as_bool().unwrap_or(false))
    }

    /// Removes every key of `namespace` (starting with `prefix`, if given); how many.
    pub async fn cache_invalidate(
        &self,
        namespace: &str,
        prefix: Option<&str>,
        options: CacheOptions,
    ) -> Result<u64, ClientError> {
        let mut fields = json!({"namespace": namespace});
        if let Some(prefix) = prefix {
            fields["prefix"] = json!(prefix);
        }
        let r = self.cache_op("invalidate", fields, &options).await?;
        Ok(r["removed"].as_u64().unwrap_or(0))
    }

    /// Adds `by` to the integer at the key (absent: 0), atomically; the new value.
    pub async fn cache_incr(
        &self,
        namespace: &str,
        key: &str,
        by: i64,
        options: CacheOptions,
    ) -> Result<i64, ClientError> {
        let r = self.cache_op("incr", json!({"namespace": namespace, "key": key, "by": by}), &options).await?;
        r["value"].as_i64().ok_or_else(|| ClientError::Protocol(format!("incr answered {r}")))
    }

    /// Stores `value` only if the entry's version is `version` (0: only if absent).
    pub async fn cache_cas(
        &self,
        namespace: &str,
        key: &str,
        value: Value,
        version: u64,
        options: CacheOptions,
    ) -> Result<CasOutcome, ClientError> {
        let fields = json!({"namespace": namespace, "key": key, "value": value, "version": version});
        let r = self.cache_op("cas", fields, &options).await?;
        Ok(CasOutcome { swapped: r["swapped"].as_bool().unwrap_or(false), version: r["version"].as_u64().unwrap_or(0) })
    }

    /// The node's cache figures per level.
    pub async fn cache_stats(&self) -> Result<Value, ClientError> {
        self.cache_op("stats", json!({}), &CacheOptions::default()).await
    }

    /// Cache-aside: the cached value, or `compute()`'s, stored with `options` before it is
    /// returned. A failed computation is returned as is and not cached.
    pub async fn cache_get_or_put<F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        options: CacheOptions,
        compute: F,
    ) -> Result<Value, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Value, ClientError>>,
    {
        if let Some(hit) = self.cache_get(namespace, key, options.clone()).await? {
            return Ok(hit.value);
        }
        let value = compute().await?;
        self.cache_put(namespace, key, value.clone(), options).await?;
        Ok(value)
    }
}
