//! The cache's logic without actix, I/O or a clock: keys, entries and their versions, the
//! bounded L1, the L2 record format, rendezvous ownership and canonical JSON.
//!
//! Time is always passed in (`now`, Unix seconds as `f64`), so the tests below drive expiry
//! directly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache as QuickCache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// An entry's version: assigned by the key's primary owner, strictly increasing per key
/// (see [`next_version`]); concurrent writes resolve last-writer-wins by version.
pub type Version = u64;

/// Why an operation was refused; each maps to a wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// Bad input (1002): empty or oversized key, bad TTL, `incr` on a non-integer.
    #[error("{0}")]
    Invalid(String),
    /// Over a configured bound (1002, counted under the setting's name).
    #[error("{1}")]
    Limit(&'static str, String),
    /// The store failed (1003).
    #[error("cache storage: {0}")]
    Storage(String),
}

/// The bounds a key and a TTL must respect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyLimits {
    /// Longest namespace + key, in bytes.
    pub max_key_bytes: usize,
    /// Longest TTL, in seconds.
    pub max_ttl_s: f64,
}

/// A cache key: `namespace` + `key`. Stored as `namespace \0 key`, so one namespace is a
/// byte prefix (invalidate a namespace) and a key prefix within it is one too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    flat: String,
    split: usize,
}

impl CacheKey {
    /// A key, checked: a non-empty namespace without NUL, a key without NUL, within
    /// `max_key_bytes` together.
    pub fn new(namespace: &str, key: &str, limits: &KeyLimits) -> Result<Self, CacheError> {
        check_namespace(namespace)?;
        if key.contains('\0') {
            return Err(CacheError::Invalid("key must not contain NUL".into()));
        }
        let len = namespace.len() + key.len();
        if len > limits.max_key_bytes {
            return Err(CacheError::Limit(
                "cache_max_key_bytes",
                format!("namespace + key is {len} bytes (cache_max_key_bytes is {})", limits.max_key_bytes),
            ));
        }
        Ok(CacheKey { flat: format!("{namespace}\0{key}"), split: namespace.len() })
    }

    /// Rebuilds a key from its stored form (`namespace \0 key`).
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        let flat = std::str::from_utf8(bytes).ok()?;
        let split = flat.find('\0')?;
        Some(CacheKey { flat: flat.to_owned(), split })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.flat[..self.split]
    }

    /// The key within the namespace.
    pub fn key(&self) -> &str {
        &self.flat[self.split + 1..]
    }

    /// `namespace \0 key`: the L1 key and the L2 key's bytes.
    pub fn stored(&self) -> &str {
        &self.flat
    }

    /// The bytes ownership is decided by: canonical JSON of `[namespace, key]`.
    pub fn hash_input(&self) -> String {
        canonical_json(&Value::Array(vec![Value::from(self.namespace()), Value::from(self.key())]))
    }
}

/// A namespace must be non-empty and NUL-free.
pub fn check_namespace(namespace: &str) -> Result<(), CacheError> {
    if namespace.is_empty() {
        return Err(CacheError::Invalid("namespace must not be empty".into()));
    }
    if namespace.contains('\0') {
        return Err(CacheError::Invalid("namespace must not contain NUL".into()));
    }
    Ok(())
}

/// The stored prefix of every key of `namespace` that starts with `prefix`.
pub fn stored_prefix(namespace: &str, prefix: &str) -> String {
    format!("{namespace}\0{prefix}")
}

/// Checks a TTL in seconds: positive, finite, at most `max_ttl_s`.
pub fn check_ttl(ttl: f64, limits: &KeyLimits) -> Result<f64, CacheError> {
    if !ttl.is_finite() || ttl <= 0.0 {
        return Err(CacheError::Invalid(format!("ttl must be a positive number of seconds, got {ttl}")));
    }
    if ttl > limits.max_ttl_s {
        return Err(CacheError::Limit(
            "cache_max_ttl_s",
            format!("ttl {ttl} s is over cache_max_ttl_s ({})", limits.max_ttl_s),
        ));
    }
    Ok(ttl)
}

/// One cached value with its version and expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The JSON value.
    pub value: Value,
    /// Its version.
    pub version: Version,
    /// When it expires (Unix seconds); `None`: never.
    pub expires_at: Option<f64>,
    /// Its size as accounted: the key's and the encoded value's bytes.
    pub bytes: u64,
}

/// Bytes of an L2 record before the value: version (8) + expiry (8).
const RECORD_HEADER: usize = 16;

impl Entry {
    /// An entry for `key`, sized from the value's JSON encoding.
    pub fn new(key: &CacheKey, value: Value, version: Version, expires_at: Option<f64>) -> Self {
        let encoded = serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0);
        let bytes = (key.stored().len() + encoded + RECORD_HEADER) as u64;
        Entry { value, version, expires_at, bytes }
    }

    /// Whether it may be served at `now`.
    pub fn is_live(&self, now: f64) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }

    /// Seconds left, for replies.
    pub fn expires_in(&self, now: f64) -> Option<f64> {
        self.expires_at.map(|at| (at - now).max(0.0))
    }

    /// The L2 record: version (u64 BE), expiry (f64 bits BE, 0 = never), JSON value.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.value).unwrap_or_else(|_| b"null".to_vec());
        let mut out = Vec::with_capacity(RECORD_HEADER + json.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.expires_at.unwrap_or(0.0).to_bits().to_be_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// Reads an L2 record of `key`; `None` when it is not one.
    pub fn decode(key: &CacheKey, record: &[u8]) -> Option<Self> {
        let version = u64::from_be_bytes(record.get(0..8)?.try_into().ok()?);
        let expires = f64::from_bits(u64::from_be_bytes(record.get(8..16)?.try_into().ok()?));
        let value: Value = serde_json::from_slice(record.get(RECORD_HEADER..)?).ok()?;
        let expires_at = (expires != 0.0).then_some(expires);
        Some(Entry { value, version, expires_at, bytes: (key.stored().len() + record.len()) as u64 })
    }
}

/// The version of a new write on the primary owner: past the current one, and at least
/// the wall clock in microseconds, so that a replica promoted to primary after a failure
/// (which continues from its own copy) still writes versions above the lost primary's.
pub fn next_version(current: Option<Version>, now: f64) -> Version {
    let clock = (now.max(0.0) * 1e6) as u64;
    current.map_or(clock, |v| v.saturating_add(1).max(clock))
}

/// The new value of `incr`: the current integer (absent = 0) plus `by`.
pub fn incremented(current: Option<&Value>, by: i64) -> Result<i64, CacheError> {
    let base = match current {
        None => 0,
        Some(v) => {
            v.as_i64().ok_or_else(|| CacheError::Invalid(format!("incr on a value that is not an integer: {v}")))?
        }
    };
    base.checked_add(by).ok_or_else(|| CacheError::Invalid(format!("incr overflows: {base} + {by}")))
}

/// JSON with object keys sorted at every depth and no whitespace: the same value always
/// gives the same bytes, whatever order its keys came in. Used wherever a key is hashed.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The nodes that own a key: the `replication` nodes with the highest rendezvous
/// (highest-random-weight) score `sha256(sha256(hash_input) || node)`, highest first; the
/// first is the primary. Adding or removing a node moves only the keys it owns (or now
/// owns): every other node's score for a key is unchanged.
pub fn owners<'a>(hash_input: &str, nodes: &'a [String], replication: usize) -> Vec<&'a str> {
    let key_digest = Sha256::digest(hash_input.as_bytes());
    let mut scored: Vec<(u64, &'a str)> = nodes
        .iter()
        .map(|node| {
            let mut h = Sha256::new();
            h.update(key_digest);
            h.update(node.as_bytes());
            let digest = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            (u64::from_be_bytes(first), node.as_str())
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(replication.max(1)).map(|(_, n)| n).collect()
}

/// The bounds of the L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Limits {
    /// Bytes of keys and values together.
    pub max_bytes: u64,
    /// Entries.
    pub max_entries: u64,
}

impl L1Limits {
    /// Every entry weighs at least this much, so that the byte bound also bounds the
    /// number of entries: `entries * min_weight <= max_bytes` gives
    /// `entries <= max_entries`.
    fn min_weight(&self) -> u64 {
        self.max_bytes.div_ceil(self.max_entries.max(1)).max(1)
    }
}

#[derive(Debug, Clone)]
struct EntryWeighter {
    min_weight: u64,
}

impl Weighter<String, Arc<Entry>> for EntryWeighter {
    fn weight(&self, _key: &String, entry: &Arc<Entry>) -> u64 {
        entry.bytes.max(self.min_weight)
    }
}

/// Counts evictions (and entries too large to be admitted at all).
#[derive(Debug, Clone, Default)]
struct EvictionCounter(Arc<AtomicU64>);

impl Lifecycle<String, Arc<Entry>> for EvictionCounter {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: String, _val: Arc<Entry>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The memory level: a concurrent cache bounded by bytes and by entries, read from any
/// thread without a lock of ours.
///
/// The policy is quick_cache's S3-FIFO (a small probationary FIFO, a main FIFO with a
/// reinsertion bit and a ghost queue): a key seen once — a scan — passes through the small
/// queue and is evicted before it can push out the frequently read keys of the main
/// queue. Expiry is checked on every read: an expired entry is removed, never returned.
pub struct L1 {
    cache: QuickCache<String, Arc<Entry>, EntryWeighter, DefaultHashBuilder, EvictionCounter>,
    limits: L1Limits,
    evictions: Arc<AtomicU64>,
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1").field("limits", &self.limits).field("entries", &self.cache.len()).finish()
    }
}

impl L1 {
    /// An empty L1 within `limits`.
    pub fn new(limits: L1Limits) -> Self {
        let min_weight = limits.min_weight();
        let evictions = Arc::new(AtomicU64::new(0));
        let estimated = usize::try_from(limits.max_entries.min(1 << 20)).unwrap_or(1 << 20).max(1);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(estimated)
            .weight_capacity(limits.max_bytes.max(1))
            .build();
        let cache = match options {
            Ok(options) => QuickCache::with_options(
                options,
                EntryWeighter { min_weight },
                DefaultHashBuilder::default(),
                EvictionCounter(evictions.clone()),
            ),
            // Unreachable with both fields set; a small default keeps the node up.
            Err(_) => QuickCache::with(
                estimated,
                limits.max_bytes.max(1),
                EntryWeighter { min_weight },
                DefaultHashBuilder::default(),
                EvictionCounter(evictions.clone()),
            ),
        };
        L1 { cache, limits, evictions }
    }

    /// The live entry at `key`; an expired one is removed and not returned.
    pub fn get(&self, key: &str, now: f64) -> Option<Arc<Entry>> {
        let entry = self.cache.get(key)?;
        if entry.is_live(now) {
            return Some(entry);
        }
        self.cache.remove_if(key, |e| !e.is_live(now));
        None
    }

    /// The entry at `key` whatever its expiry, without counting as a read for the policy.
    pub fn peek(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.peek(key)
    }

    /// Stores `entry` at `key` (evicting others if the bounds require it).
    pub fn insert(&self, key: &str, entry: Arc<Entry>) {
        self.cache.insert(key.to_owned(), entry);
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &str) -> bool {
        self.cache.remove(key).is_some()
    }

    /// Removes every key starting with `prefix`; the keys removed.
    pub fn remove_prefix(&self, prefix: &str) -> Vec<String> {
        let removed = std::cell::RefCell::new(Vec::new());
        self.cache.retain(|k, _| {
            let keep = !k.starts_with(prefix);
            if !keep {
                removed.borrow_mut().push(k.clone());
            }
            keep
        });
        removed.into_inner()
    }

    /// Removes every entry expired at `now`; how many.
    pub fn remove_expired(&self, now: f64) -> u64 {
        let before = self.cache.len();
        self.cache.retain(|_, e| e.is_live(now));
        before.saturating_sub(self.cache.len()) as u64
    }

    /// Entries held now (expired ones not yet removed included).
    pub fn len(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes accounted now: each entry's size, at least `max_bytes / max_entries`.
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }

    /// Sum of the entries' own sizes.
    pub fn bytes(&self) -> u64 {
        self.cache.iter().map(|(_, e)| e.bytes).sum()
    }

    /// Entries evicted (or too large to be admitted) so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Its bounds.
    pub fn limits(&self) -> L1Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const LIMITS: KeyLimits = KeyLimits { max_key_bytes: 64, max_ttl_s: 3600.0 };

    fn key(ns: &str, k: &str) -> CacheKey {
        CacheKey::new(ns, k, &LIMITS).expect("valid key")
    }

    #[test]
    fn keys_are_checked_and_split_back() {
        let k = key("users", "42");
        assert_eq!((k.namespace(), k.key(), k.stored()), ("users", "42", "users\u{0}42"));
        assert_eq!(CacheKey::from_stored(k.stored().as_bytes()), Some(k));
        assert!(CacheKey::new("", "a", &LIMITS).is_err());
        assert!(CacheKey::new("a\0b", "a", &LIMITS).is_err());
        assert!(CacheKey::new("a", &"x".repeat(64), &LIMITS).is_err());
        assert!(stored_prefix("users", "4").starts_with("users\0"));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"z":[{"y":1,"x":2}],"c":"\"q"}}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"c":"\"q","z":[{"x":2,"y":1}]},"b":1}"#);
    }

    #[test]
    fn records_round_trip_and_expiry_is_kept() {
        let k = key("n", "k");
        let e = Entry::new(&k, json!({"a": [1, 2.5, "x"]}), 7, Some(123.5));
        let back = Entry::decode(&k, &e.encode()).expect("decodes");
        assert_eq!(back, e);
        let forever = Entry::new(&k, json!(1), 1, None);
        assert_eq!(Entry::decode(&k, &forever.encode()).unwrap().expires_at, None);
        assert!(Entry::decode(&k, b"short").is_none());
        assert!(e.is_live(123.4) && !e.is_live(123.5));
    }

    #[test]
    fn versions_increase_past_the_clock_and_the_current_one() {
        assert_eq!(next_version(None, 1.5), 1_500_000);
        assert_eq!(next_version(Some(9_000_000), 1.5), 9_000_001);
        assert_eq!(next_version(Some(5), 1.5), 1_500_000);
        assert_eq!(next_version(Some(u64::MAX), 0.0), u64::MAX);
    }

    #[test]
    fn incr_needs_an_integer_and_does_not_overflow() {
        assert_eq!(incremented(None, 3), Ok(3));
        assert_eq!(incremented(Some(&json!(-2)), 3), Ok(1));
        assert!(incremented(Some(&json!("a")), 1).is_err());
        assert!(incremented(Some(&json!(1.5)), 1).is_err());
        assert!(incremented(Some(&json!(i64::MAX)), 1).is_err());
    }

    #[test]
    fn ttl_is_bounded() {
        assert_eq!(check_ttl(2.0, &LIMITS), Ok(2.0));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 3601.0] {
            assert!(check_ttl(bad, &LIMITS).is_err(), "{bad}");
        }
    }

    #[test]
    fn l1_evicts_a_scan_before_the_hot_keys() {
        let l1 = L1::new(L1Limits { max_bytes: 1 << 20, max_entries: 1000 });
        let hot: Vec<CacheKey> = (0..200).map(|i| key("h", &i.to_string())).collect();
        for k in &hot {
            l1.insert(k.stored(), Arc::new(Entry::new(k, json!(1), 1, None)));
        }
        for _ in 0..3 {
            for k in &hot {
                assert!(l1.get(k.stored(), 0.0).is_some());
            }
        }
        // A scan of 10x the capacity, each key read once.
        for i in 0..10_000 {
            let k = key("scan", &i.to_string());
            l1.insert(k.stored(), Arc::new(Entry::new(&k, json!(1), 1, None)));
        }
        let kept = hot.iter().filter(|k| l1.get(k.stored(), 0.0).is_some()).count();
        assert!(kept >= 180, "the scan pushed out {} of 200 hot keys", 200 - kept);
        assert!(l1.evictions() > 0);
    }

    #[test]
    fn l1_prefix_and_expiry_removal() {
        let l1 = L1::new(L1Limits { max_bytes: 1 << 20, max_entries: 100 });
        for (ns, k, exp) in [("a", "x1", None), ("a", "x2", Some(5.0)), ("a", "y", None), ("b", "x", None)] {
            let k = key(ns, k);
            l1.insert(k.stored(), Arc::new(Entry::new(&k, json!(1), 1, exp)));
        }
        assert_eq!(l1.remove_expired(6.0), 1);
        assert_eq!(l1.remove_prefix(&stored_prefix("a", "x")), vec![key("a", "x1").stored().to_owned()]);
        assert_eq!(l1.len(), 2);
        assert_eq!(l1.remove_prefix(&stored_prefix("a", "")).len(), 1);
        assert!(l1.get(key("b", "x").stored(), 0.0).is_some());
    }

    #[test]
    fn hrw_is_deterministic_and_distinct() {
        let nodes: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let k = key("ns", "k").hash_input();
        let first = owners(&k, &nodes, 2);
        assert_eq!(first.len(), 2);
        assert_ne!(first[0], first[1]);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(owners(&k, &shuffled, 2), first);
        assert_eq!(owners(&k, &nodes, 10).len(), 4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put { key: u16, size: usize, ttl: Option<u8> },
        Get { key: u16 },
        Tick { seconds: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..400, 0usize..3000, proptest::option::of(1u8..20)).prop_map(|(key, size, ttl)| Op::Put {
                key,
                size,
                ttl
            }),
            (0u16..400).prop_map(|key| Op::Get { key }),
            (0u8..10).prop_map(|seconds| Op::Tick { seconds }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever is put, the L1 stays within both bounds, and no read returns an
        /// expired entry.
        #[test]
        fn l1_bounds_hold_and_expired_is_never_returned(
            max_bytes in 4_000u64..200_000,
            max_entries in 1u64..300,
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let l1 = L1::new(L1Limits { max_bytes, max_entries });
            let mut now = 1_000.0;
            for op in ops {
                match op {
                    Op::Put { key: i, size, ttl } => {
                        let k = key("p", &i.to_string());
                        let value = Value::String("v".repeat(size));
                        let entry = Entry::new(&k, value, 1, ttl.map(|t| now + f64::from(t)));
                        l1.insert(k.stored(), Arc::new(entry));
                    }
                    Op::Get { key: i } => {
                        if let Some(e) = l1.get(key("p", &i.to_string()).stored(), now) {
                            prop_assert!(e.is_live(now), "expired entry returned at {now}: {:?}", e.expires_at);
                        }
                    }
                    Op::Tick { seconds } => now += f64::from(seconds),
                }
                prop_assert!(l1.weight() <= max_bytes, "weight {} > {max_bytes}", l1.weight());
                prop_assert!(l1.bytes() <= max_bytes, "bytes {} > {max_bytes}", l1.bytes());
                prop_assert!(l1.len() <= max_entries, "entries {} > {max_entries}", l1.len());
            }
        }

        /// A node joining takes over only keys it now owns, and every other owner kept
        /// the key; a node leaving moves only the keys it owned.
        #[test]
        fn hrw_moves_only_the_keys_of_the_node_that_joined_or_left(
            count in 1usize..8,
            replication in 1usize..4,
            keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..200),
        ) {
            let nodes: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
            let mut joined = nodes.clone();
            joined.push("newcomer".to_owned());
            for k in &keys {
                let input = key("ns", k).hash_input();
                let before = owners(&input, &nodes, replication);
                let after = owners(&input, &joined, replication);
                if before != after {
                    prop_assert!(after.contains(&"newcomer"), "{k}: moved without the newcomer");
                    for n in after.iter().filter(|n| **n != "newcomer") {
                        prop_assert!(before.contains(n), "{k}: {n} became an owner");
                    }
                }
                // The reverse: the newcomer leaves again.
                let removed = owners(&input, &nodes, replication);
                if !after.contains(&"newcomer") {
                    prop_assert_eq!(&removed, &after);
                }
            }
        }
    }
}
