//! This node's two levels: L1 in memory, L2 in the store's `cache` tree.
//!
//! [`LocalCache`] is shared (`Arc`) by every connection thread, the fabric (operations
//! from other nodes) and the [`super::Cache`] actor, and called without a mailbox:
//!
//! - an L1 hit takes no lock of ours (quick_cache shards its own);
//! - every write, and every read that falls through to L2 and copies the entry into L1,
//!   holds the lock of the key's stripe (one of [`STRIPES`] mutexes chosen by the key's
//!   hash). So `incr` and `cas` are atomic on this node, and a reader that copies an
//!   entry from L2 into L1 cannot race a delete of that key and resurrect it in L1.
//!
//! L2 writes are applied to the store at once (visible to every reader) without waiting
//! for the disk; the actor's tick makes them durable with one group-commit sync per
//! interval. The L2 is bounded by entries and bytes: past either bound, a write evicts
//! expired entries first, then entries under a clock hand that moves through the key
//! order. Expired entries are never served: every read checks the expiry.

use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tracing::warn;

use super::core::{
    self, check_namespace, check_ttl, stored_prefix, CacheError, CacheKey, Entry, KeyLimits, L1Limits, Version, L1,
};
use crate::persistence::{Batch, KeyRange, PersistenceHandle};

/// The store tree of the L2.
pub const L2_TREE: &str = "cache";

/// Stripes of write locks.
pub const STRIPES: usize = 64;

/// Entries read per page when scanning the L2 (start-up count, invalidation, eviction).
const SCAN_PAGE: usize = 1024;

/// Which levels an operation may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    /// Memory.
    pub l1: bool,
    /// The store.
    pub l2: bool,
    /// The cluster (the key's owner nodes).
    pub l3: bool,
    /// Other clusters (a `get` only; never by default).
    pub l4: bool,
}

impl Levels {
    /// The default: this cluster's levels.
    pub const ALL: Levels = Levels { l1: true, l2: true, l3: true, l4: false };
    /// This node only.
    pub const LOCAL: Levels = Levels { l1: true, l2: true, l3: false, l4: false };
    /// None.
    const NONE: Levels = Levels { l1: false, l2: false, l3: false, l4: false };

    /// Parses `["l1", "l2", "l3", "l4"]` (absent: l1, l2, l3); an unknown level is refused.
    pub fn parse(levels: Option<&[String]>) -> Result<Levels, CacheError> {
        let Some(names) = levels else { return Ok(Levels::ALL) };
        let mut out = Levels::NONE;
        for name in names {
            match name.as_str() {
                "l1" => out.l1 = true,
                "l2" => out.l2 = true,
                "l3" => out.l3 = true,
                "l4" => out.l4 = true,
                other => return Err(CacheError::Invalid(format!("unknown cache level {other:?} (l1, l2, l3, l4)"))),
            }
        }
        if out == Levels::NONE {
            return Err(CacheError::Invalid("levels must name at least one of l1, l2, l3, l4".into()));
        }
        Ok(out)
    }

    /// This node's part of it.
    pub fn local(self) -> Levels {
        Levels { l3: false, l4: false, ..self }
    }
}

/// The bounds of one node's cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheLimits {
    /// L1 bounds.
    pub l1: L1Limits,
    /// Most L2 entries.
    pub l2_max_entries: u64,
    /// Most L2 bytes (keys and records).
    pub l2_max_bytes: u64,
    /// Key and TTL bounds.
    pub keys: KeyLimits,
    /// Largest encoded value.
    pub max_value_bytes: usize,
    /// TTL of a write that gives none (seconds); `None`: no expiry.
    pub default_ttl_s: Option<f64>,
    /// Owners of each key across the cluster (the first is the primary).
    pub replication: usize,
    /// Longest a node that does not own a key keeps a copy read from an owner (seconds).
    pub copy_ttl_s: f64,
    /// How long an op waits for another node.
    pub remote_timeout: std::time::Duration,
}

/// Hit, miss and eviction counters (rendered by the monitor as `mpreg_cache_*`).
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Reads served by L1, L2, L3, L4.
    pub hits: [AtomicU64; 4],
    /// Reads a level could not serve.
    pub misses: [AtomicU64; 4],
    /// Entries evicted from L2 for space.
    pub l2_evictions: AtomicU64,
    /// Expired entries removed from L2.
    pub l2_expired: AtomicU64,
    /// Entries and bytes in L2 now.
    pub l2_entries: AtomicU64,
    /// Bytes in L2 now.
    pub l2_bytes: AtomicU64,
    /// Operations sent to another node.
    pub forwarded: AtomicU64,
}

/// Index of a level in the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Memory.
    L1 = 0,
    /// The store.
    L2 = 1,
    /// Another node.
    L3 = 2,
    /// Another cluster.
    L4 = 3,
}

impl Level {
    /// `l1`, `l2`, `l3`, `l4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::L1 => "l1",
            Level::L2 => "l2",
            Level::L3 => "l3",
            Level::L4 => "l4",
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Stored with this entry.
    Stored(Arc<Entry>),
    /// Not stored: the node holds a newer version (last writer wins).
    Older {
        /// The version kept.
        kept: Version,
    },
}

/// L1 + L2 of this node.
pub struct LocalCache {
    l1: L1,
    store: PersistenceHandle,
    limits: CacheLimits,
    stripes: Vec<Mutex<()>>,
    hasher: std::collections::hash_map::RandomState,
    /// Counters.
    pub counters: CacheCounters,
    /// L2 writes so far, and how many of them the last successful sync covered.
    l2_writes: AtomicU64,
    l2_synced: AtomicU64,
    /// The L2 eviction clock hand (the last key evicted or passed).
    hand: Mutex<Option<Vec<u8>>>,
    /// RPC calls whose result is being computed (see [`super::rpc`]).
    pub flights: super::rpc::SingleFlight,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache").field("l1", &self.l1).field("limits", &self.limits).finish()
    }
}

impl LocalCache {
    /// Opens the cache over `store`: counts the L2 entries (removing expired ones).
    pub fn open(store: PersistenceHandle, limits: CacheLimits, now: f64) -> Result<Self, CacheError> {
        let cache = LocalCache {
            l1: L1::new(limits.l1),
            store,
            limits,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            counters: CacheCounters::default(),
            l2_writes: AtomicU64::new(0),
            l2_synced: AtomicU64::new(0),
            hand: Mutex::new(None),
            flights: super::rpc::SingleFlight::default(),
        };
        let (mut entries, mut bytes, mut expired) = (0u64, 0u64, Batch::new());
        let mut range = KeyRange::all();
        loop {
            let page = cache.store.scan(L2_TREE, &range, SCAN_PAGE).map_err(storage)?;
            for (k, record) in &page {
                match CacheKey::from_stored(k).and_then(|key| Entry::decode(&key, record)) {
                    Some(entry) if entry.is_live(now) => {
                        entries += 1;
                        bytes += entry.bytes;
                    }
                    _ => expired = expired.delete(L2_TREE, k.clone()),
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == SCAN_PAGE => range = KeyRange::after(last.clone()),
                _ => break,
            }
        }
        let removed = expired.writes().len() as u64;
        if removed > 0 {
            cache.store.write(&expired).map_err(storage)?;
            cache.counters.l2_expired.fetch_add(removed, Ordering::Relaxed);
            cache.l2_writes.fetch_add(1, Ordering::Relaxed);
        }
        cache.counters.l2_entries.store(entries, Ordering::Relaxed);
        cache.counters.l2_bytes.store(bytes, Ordering::Relaxed);
        Ok(cache)
    }

    /// Its bounds.
    pub fn limits(&self) -> &CacheLimits {
        &self.limits
    }

    /// A checked key.
    pub fn key(&self, namespace: &str, key: &str) -> Result<CacheKey, CacheError> {
        CacheKey::new(namespace, key, &self.limits.keys)
    }

    /// When an entry written now with `ttl` (or the default) expires.
    pub fn expiry(&self, ttl: Option<f64>, now: f64) -> Result<Option<f64>, CacheError> {
        match ttl.or(self.limits.default_ttl_s) {
            Some(ttl) => Ok(Some(now + check_ttl(ttl, &self.limits.keys)?)),
            None => Ok(None),
        }
    }

    /// Refuses a value larger than `cache_max_value_bytes` once encoded.
    pub fn check_value(&self, value: &Value) -> Result<(), CacheError> {
        let encoded = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
        if encoded > self.limits.max_value_bytes {
            return Err(CacheError::Limit(
                "cache_max_value_bytes",
                format!("value is {encoded} bytes (cache_max_value_bytes is {})", self.limits.max_value_bytes),
            ));
        }
        Ok(())
    }

    fn stripe(&self, key: &CacheKey) -> MutexGuard<'_, ()> {
        let i = (self.hasher.hash_one(key.stored()) % STRIPES as u64) as usize;
        // A poisoned stripe only means a panic elsewhere held it; the data is in L1/L2.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live entry at `key` from the first of `levels` that has it (an L2 hit is
    /// copied into L1 when L1 is one of the levels).
    pub fn get(&self, key: &CacheKey, levels: Levels, now: f64) -> Result<Option<(Arc<Entry>, Level)>, CacheError> {
        if levels.l1 {
            if let Some(entry) = self.l1.get(key.stored(), now) {
                self.hit(Level::L1);
                return Ok(Some((entry, Level::L1)));
            }
            self.miss(Level::L1);
        }
        if !levels.l2 {
            return Ok(None);
        }
        let _guard = self.stripe(key);
        match self.l2_get(key, now)? {
            Some(entry) => {
                self.hit(Level::L2);
                let entry = Arc::new(entry);
                if levels.l1 {
                    self.l1.insert(key.stored(), entry.clone());
                }
                Ok(Some((entry, Level::L2)))
            }
            None => {
                self.miss(Level::L2);
                Ok(None)
            }
        }
    }

    /// Counts a hit at `level`.
    pub fn hit(&self, level: Level) {
        self.counters.hits[level as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a miss at `level`.
    pub fn miss(&self, level: Level) {
        self.counters.misses[level as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The live L2 entry (an expired one is deleted). Caller holds the stripe.
    fn l2_get(&self, key: &CacheKey, now: f64) -> Result<Option<Entry>, CacheError> {
        let Some(record) = self.store.get(L2_TREE, key.stored().as_bytes()).map_err(storage)? else {
            return Ok(None);
        };
        match Entry::decode(key, &record) {
            Some(entry) if entry.is_live(now) => Ok(Some(entry)),
            other => {
                let bytes = other.map_or((key.stored().len() + record.len()) as u64, |e| e.bytes);
                self.l2_delete(key, bytes)?;
                self.counters.l2_expired.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    fn l2_delete(&self, key: &CacheKey, bytes: u64) -> Result<(), CacheError> {
        self.store.write(&Batch::new().delete(L2_TREE, key.stored().as_bytes())).map_err(storage)?;
        self.l2_writes.fetch_add(1, Ordering::Relaxed);
        self.counters.l2_entries.fetch_sub(1, Ordering::Relaxed);
        self.counters.l2_bytes.fetch_sub(bytes.min(self.counters.l2_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        Ok(())
    }

    /// The current version at `key` on this node (either level, live or not). Caller
    /// holds the stripe.
    fn current(&self, key: &CacheKey, levels: Levels, now: f64) -> Result<Option<Entry>, CacheError> {
        if levels.l1 {
            if let Some(entry) = self.l1.peek(key.stored()).filter(|e| e.is_live(now)) {
                return Ok(Some((*entry).clone()));
            }
        }
        if levels.l2 {
            return self.l2_get(key, now);
        }
        Ok(None)
    }

    /// Stores `entry` in `levels`. Caller holds the stripe.
    fn store_entry(&self, key: &CacheKey, entry: Arc<Entry>, levels: Levels) -> Result<(), CacheError> {
        if levels.l2 {
            let old = self.store.get(L2_TREE, key.stored().as_bytes()).map_err(storage)?;
            self.store.write(&Batch::new().put(L2_TREE, key.stored().as_bytes(), entry.encode())).map_err(storage)?;
            self.l2_writes.fetch_add(1, Ordering::Relaxed);
            match old {
                Some(old) => {
                    let old_bytes = (key.stored().len() + old.len()) as u64;
                    self.counters.l2_bytes.fetch_add(entry.bytes, Ordering::Relaxed);
                    let have = self.counters.l2_bytes.load(Ordering::Relaxed);
                    self.counters.l2_bytes.fetch_sub(old_bytes.min(have), Ordering::Relaxed);
                }
                None => {
                    self.counters.l2_entries.fetch_add(1, Ordering::Relaxed);
                    self.counters.l2_bytes.fetch_add(entry.bytes, Ordering::Relaxed);
                }
            }
        }
        if levels.l1 {
            self.l1.insert(key.stored(), entry);
        } else {
            // A level not written must not keep an older copy.
            self.l1.remove(key.stored());
        }
        Ok(())
    }

    /// Writes `value` at `key`. Without `version` this node is the primary: the entry
    /// gets the next version. With one (a replica or a copy from the primary), it is
    /// stored only if newer than what this node holds: last writer wins.
    pub fn put(
        &self,
        key: &CacheKey,
        value: Value,
        expires_at: Option<f64>,
        version: Option<Version>,
        levels: Levels,
        now: f64,
    ) -> Result<Written, CacheError> {
        let written = {
            let _guard = self.stripe(key);
            let current = self.current(key, levels, now)?.map(|e| e.version);
            let version = match (version, current) {
                (Some(v), Some(kept)) if v <= kept => return Ok(Written::Older { kept }),
                (Some(v), _) => v,
                (None, current) => core::next_version(current, now),
            };
            let entry = Arc::new(Entry::new(key, value, version, expires_at));
            self.store_entry(key, entry.clone(), levels)?;
            Written::Stored(entry)
        };
        if levels.l2 {
            self.enforce_l2_bound(now)?;
        }
        Ok(written)
    }

    /// Removes `key` from `levels`; whether a live entry was there.
    pub fn delete(&self, key: &CacheKey, levels: Levels, now: f64) -> Result<bool, CacheError> {
        let _guard = self.stripe(key);
        let mut found = false;
        if levels.l1 {
            found |= self.l1.peek(key.stored()).is_some_and(|e| e.is_live(now));
            self.l1.remove(key.stored());
        }
        if levels.l2 {
            if let Some(record) = self.store.get(L2_TREE, key.stored().as_bytes()).map_err(storage)? {
                found |= Entry::decode(key, &record).is_some_and(|e| e.is_live(now));
                self.l2_delete(key, (key.stored().len() + record.len()) as u64)?;
            }
        }
        Ok(found)
    }

    /// Removes every key of `namespace` (starting with `prefix`, if given) from `levels`;
    /// how many keys were removed.
    pub fn invalidate(&self, namespace: &str, prefix: Option<&str>, levels: Levels) -> Result<u64, CacheError> {
        check_namespace(namespace)?;
        let stored = stored_prefix(namespace, prefix.unwrap_or(""));
        let mut removed: std::collections::HashSet<String> = std::collections::HashSet::new();
        if levels.l1 {
            removed.extend(self.l1.remove_prefix(&stored));
        }
        if levels.l2 {
            let mut range = KeyRange::prefix(stored.as_bytes().to_vec());
            loop {
                let page = self.store.scan(L2_TREE, &range, SCAN_PAGE).map_err(storage)?;
                for (k, _) in &page {
                    let Some(key) = CacheKey::from_stored(k) else { continue };
                    let _guard = self.stripe(&key);
                    // Re-read under the lock: a concurrent write may have replaced it.
                    if let Some(record) = self.store.get(L2_TREE, k).map_err(storage)? {
                        self.l2_delete(&key, (k.len() + record.len()) as u64)?;
                        if levels.l1 {
                            self.l1.remove(key.stored());
                        }
                        removed.insert(key.stored().to_owned());
                    }
                }
                match page.last() {
                    Some((last, _)) if page.len() == SCAN_PAGE => range = range.resume_after(last.clone()),
                    _ => break,
                }
            }
        }
        Ok(removed.len() as u64)
    }

    /// Adds `by` to the integer at `key` (absent: 0) as the primary; the new entry.
    pub fn incr(
        &self,
        key: &CacheKey,
        by: i64,
        ttl: Option<f64>,
        levels: Levels,
        now: f64,
    ) -> Result<Arc<Entry>, CacheError> {
        let entry = {
            let _guard = self.stripe(key);
            let current = self.current(key, levels, now)?;
            let value = core::incremented(current.as_ref().map(|e| &e.value), by)?;
            // An explicit ttl restarts the clock; otherwise the entry keeps its expiry.
            let expires_at = match (ttl, &current) {
                (Some(_), _) | (None, None) => self.expiry(ttl, now)?,
                (None, Some(e)) => e.expires_at,
            };
            let version = core::next_version(current.map(|e| e.version), now);
            let entry = Arc::new(Entry::new(key, Value::from(value), version, expires_at));
            self.store_entry(key, entry.clone(), levels)?;
            entry
        };
        if levels.l2 {
            self.enforce_l2_bound(now)?;
        }
        Ok(entry)
    }

    /// Stores `value` only if the entry's version is `expected` (0: only if absent), as
    /// the primary. `Ok(Ok(entry))`: swapped; `Ok(Err(version))`: not, with the current
    /// version (0: absent).
    pub fn cas(
        &self,
        key: &CacheKey,
        value: Value,
        expected: Version,
        expires_at: Option<f64>,
        levels: Levels,
        now: f64,
    ) -> Result<Result<Arc<Entry>, Version>, CacheError> {
        let entry = {
            let _guard = self.stripe(key);
            let current = self.current(key, levels, now)?.map(|e| e.version);
            if current.unwrap_or(0) != expected {
                return Ok(Err(current.unwrap_or(0)));
            }
            let entry = Arc::new(Entry::new(key, value, core::next_version(current, now), expires_at));
            self.store_entry(key, entry.clone(), levels)?;
            entry
        };
        if levels.l2 {
            self.enforce_l2_bound(now)?;
        }
        Ok(Ok(entry))
    }

    /// Evicts from L2 until it is within both bounds: expired entries first, then the
    /// entries under the clock hand.
    fn enforce_l2_bound(&self, now: f64) -> Result<(), CacheError> {
        let over = || {
            self.counters.l2_entries.load(Ordering::Relaxed) > self.limits.l2_max_entries
                || self.counters.l2_bytes.load(Ordering::Relaxed) > self.limits.l2_max_bytes
        };
        if !over() {
            return Ok(());
        }
        // One evictor at a time; the others' writes are covered by its loop.
        let Ok(mut hand) = self.hand.try_lock() else { return Ok(()) };
        let mut wrapped = false;
        while over() {
            let range = match hand.take() {
                Some(after) => KeyRange { start: Bound::Excluded(after), end: Bound::Unbounded },
                None => KeyRange::all(),
            };
            let page = self.store.scan(L2_TREE, &range, 64).map_err(storage)?;
            if page.is_empty() {
                if wrapped {
                    break;
                }
                wrapped = true;
                continue;
            }
            // Expired ones in this page first, then the rest in key order.
            let mut victims: Vec<(CacheKey, bool)> = page
                .iter()
                .filter_map(|(k, r)| {
                    let key = CacheKey::from_stored(k)?;
                    let live = Entry::decode(&key, r).is_some_and(|e| e.is_live(now));
                    Some((key, live))
                })
                .collect();
            victims.sort_by_key(|(_, live)| *live);
            for (key, live) in victims {
                if !over() {
                    break;
                }
                let _guard = self.stripe(&key);
                if let Some(record) = self.store.get(L2_TREE, key.stored().as_bytes()).map_err(storage)? {
                    self.l2_delete(&key, (key.stored().len() + record.len()) as u64)?;
                    let counter = if live { &self.counters.l2_evictions } else { &self.counters.l2_expired };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                *hand = Some(key.stored().as_bytes().to_vec());
            }
        }
        Ok(())
    }

    /// Removes up to `max` expired entries from L2 (from the start, or after `after`) and
    /// every expired entry from L1; where the L2 sweep stopped (`None`: it reached the end).
    pub fn sweep(&self, after: Option<Vec<u8>>, max: usize, now: f64) -> Result<Option<Vec<u8>>, CacheError> {
        self.l1.remove_expired(now);
        let range = match after {
            Some(after) => KeyRange { start: Bound::Excluded(after), end: Bound::Unbounded },
            None => KeyRange::all(),
        };
        let page = self.store.scan(L2_TREE, &range, max).map_err(storage)?;
        for (k, record) in &page {
            let Some(key) = CacheKey::from_stored(k) else { continue };
            if Entry::decode(&key, record).is_some_and(|e| e.is_live(now)) {
                continue;
            }
            let _guard = self.stripe(&key);
            // Under the lock: `l2_get` deletes it if it is (still) expired.
            self.l2_get(&key, now)?;
        }
        Ok(page.last().filter(|_| page.len() == max).map(|(k, _)| k.clone()))
    }

    /// L2 writes not yet covered by a successful sync.
    pub fn unsynced(&self) -> u64 {
        self.l2_writes.load(Ordering::Relaxed).saturating_sub(self.l2_synced.load(Ordering::Relaxed))
    }

    /// The store (for the actor's sync).
    pub fn store(&self) -> &PersistenceHandle {
        &self.store
    }

    /// Figures for `stats` and `/metrics`.
    pub fn stats(&self) -> Value {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "l1": {
                "entries": self.l1.len(),
                "bytes": self.l1.weight(),
                "max_entries": self.limits.l1.max_entries,
                "max_bytes": self.limits.l1.max_bytes,
                "hits": load(&c.hits[0]),
                "misses": load(&c.misses[0]),
                "evictions": self.l1.evictions(),
            },
            "l2": {
                "entries": load(&c.l2_entries),
                "bytes": load(&c.l2_bytes),
                "max_entries": self.limits.l2_max_entries,
                "max_bytes": self.limits.l2_max_bytes,
                "hits": load(&c.hits[1]),
                "misses": load(&c.misses[1]),
                "evictions": load(&c.l2_evictions),
                "expired": load(&c.l2_expired),
                "durable": self.store.is_durable(),
                "unsynced_writes": self.unsynced(),
            },
            "l3": {
                "hits": load(&c.hits[2]),
                "misses": load(&c.misses[2]),
                "forwarded": load(&c.forwarded),
            },
            "l4": {
                "hits": load(&c.hits[3]),
                "misses": load(&c.misses[3]),
            },
        })
    }

    /// The `mpreg_cache_*` series of `/metrics`.
    pub fn render_metrics(&self, out: &mut String, node: &str) {
        use std::fmt::Write;
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let levels = [Level::L1, Level::L2, Level::L3, Level::L4];
        let mut family = |name: &str, kind: &str, help: &str, values: &[(Level, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (level, v) in values {
                let _ = writeln!(out, "{name}{{node=\"{node}\",level=\"{}\"}} {v}", level.as_str());
            }
        };
        let hits: Vec<(Level, u64)> = levels.iter().map(|l| (*l, load(&c.hits[*l as usize]))).collect();
        let misses: Vec<(Level, u64)> = levels.iter().map(|l| (*l, load(&c.misses[*l as usize]))).collect();
        family("mpreg_cache_hits_total", "counter", "Cache reads served, by level.", &hits);
        family("mpreg_cache_misses_total", "counter", "Cache reads a level could not serve, by level.", &misses);
        family(
            "mpreg_cache_evictions_total",
            "counter",
            "Cache entries evicted for space, by level.",
            &[(Level::L1, self.l1.evictions()), (Level::L2, load(&c.l2_evictions))],
        );
        family(
            "mpreg_cache_entries",
            "gauge",
            "Cache entries held, by level.",
            &[(Level::L1, self.l1.len()), (Level::L2, load(&c.l2_entries))],
        );
        family(
            "mpreg_cache_bytes",
            "gauge",
            "Cache bytes held, by level (L1: as accounted against cache_l1_max_bytes).",
            &[(Level::L1, self.l1.weight()), (Level::L2, load(&c.l2_bytes))],
        );
        let _ = writeln!(
            out,
            "# HELP mpreg_cache_expired_total Expired L2 entries removed.\n# TYPE mpreg_cache_expired_total counter\n\
             mpreg_cache_expired_total{{node=\"{node}\"}} {}",
            load(&c.l2_expired)
        );
        let _ = writeln!(
            out,
            "# HELP mpreg_cache_forwarded_total Cache operations sent to another node.\n\
             # TYPE mpreg_cache_forwarded_total counter\nmpreg_cache_forwarded_total{{node=\"{node}\"}} {}",
            load(&c.forwarded)
        );
    }

    /// Makes the L2 writes so far durable (one group-commit sync), if there were any.
    pub async fn sync(&self) {
        let target = self.l2_writes.load(Ordering::Relaxed);
        if target == self.l2_synced.load(Ordering::Relaxed) {
            return;
        }
        match self.store.commit(Batch::new()).await {
            Ok(()) => self.l2_synced.store(target, Ordering::Relaxed),
            Err(e) => warn!(cause = %e, "cache L2 sync failed"),
        }
    }
}

fn storage(e: crate::persistence::PersistenceError) -> CacheError {
    CacheError::Storage(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::MemoryStore;
    use serde_json::json;

    fn limits() -> CacheLimits {
        CacheLimits {
            l1: L1Limits { max_bytes: 1 << 20, max_entries: 1000 },
            l2_max_entries: 50,
            l2_max_bytes: 1 << 20,
            keys: KeyLimits { max_key_bytes: 256, max_ttl_s: 3600.0 },
            max_value_bytes: 4096,
            default_ttl_s: None,
            replication: 2,
            copy_ttl_s: 5.0,
            remote_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn open(store: &PersistenceHandle, now: f64) -> LocalCache {
        LocalCache::open(store.clone(), limits(), now).expect("opens")
    }

    fn handle() -> PersistenceHandle {
        PersistenceHandle::start(Arc::new(MemoryStore::new()), 16, None).expect("committer")
    }

    #[test]
    fn put_get_across_levels_and_reopen() {
        let store = handle();
        let cache = open(&store, 100.0);
        let k = cache.key("ns", "a").unwrap();
        let Written::Stored(e) = cache.put(&k, json!({"x": 1}), Some(110.0), None, Levels::ALL, 100.0).unwrap() else {
            panic!("stored")
        };
        let (got, level) = cache.get(&k, Levels::ALL, 101.0).unwrap().unwrap();
        assert_eq!((got.version, level), (e.version, Level::L1));
        // Another process over the same store: L1 is empty, L2 serves it, then L1 has it.
        let reopened = open(&store, 102.0);
        assert_eq!(reopened.get(&k, Levels::ALL, 102.0).unwrap().unwrap().1, Level::L2);
        assert_eq!(reopened.get(&k, Levels::ALL, 102.0).unwrap().unwrap().1, Level::L1);
        // Expired: never served, from either level, and gone from the store.
        assert!(reopened.get(&k, Levels::ALL, 110.0).unwrap().is_none());
        assert!(open(&store, 111.0).get(&k, Levels::LOCAL, 111.0).unwrap().is_none());
        assert_eq!(reopened.stats()["l2"]["entries"], 0);
    }

    #[test]
    fn replicas_keep_the_newest_version() {
        let cache = open(&handle(), 1.0);
        let k = cache.key("ns", "a").unwrap();
        assert!(matches!(cache.put(&k, json!(2), None, Some(20), Levels::ALL, 1.0), Ok(Written::Stored(_))));
        assert_eq!(cache.put(&k, json!(1), None, Some(10), Levels::ALL, 1.0), Ok(Written::Older { kept: 20 }));
        assert_eq!(cache.get(&k, Levels::ALL, 1.0).unwrap().unwrap().0.value, json!(2));
    }

    #[test]
    fn incr_cas_delete_and_invalidate() {
        let cache = open(&handle(), 1.0);
        let k = cache.key("ns", "n").unwrap();
        for i in 1..=5 {
            assert_eq!(cache.incr(&k, 1, None, Levels::ALL, 1.0).unwrap().value, json!(i));
        }
        let v = cache.get(&k, Levels::ALL, 1.0).unwrap().unwrap().0.version;
        assert_eq!(cache.cas(&k, json!("x"), v + 1, None, Levels::ALL, 1.0).unwrap(), Err(v));
        let swapped = cache.cas(&k, json!("x"), v, None, Levels::ALL, 1.0).unwrap().expect("swapped");
        assert!(swapped.version > v);
        assert!(cache.incr(&k, 1, None, Levels::ALL, 1.0).is_err(), "not an integer");
        let absent = cache.key("ns", "new").unwrap();
        assert!(cache.cas(&absent, json!(1), 0, None, Levels::ALL, 1.0).unwrap().is_ok());
        assert!(cache.delete(&k, Levels::ALL, 1.0).unwrap());
        assert!(!cache.delete(&k, Levels::ALL, 1.0).unwrap());
        for key in ["p1", "p2", "q"] {
            let k = cache.key("inv", key).unwrap();
            cache.put(&k, json!(1), None, None, Levels::ALL, 1.0).unwrap();
        }
        assert_eq!(cache.invalidate("inv", Some("p"), Levels::LOCAL).unwrap(), 2);
        assert!(cache.get(&cache.key("inv", "p1").unwrap(), Levels::ALL, 1.0).unwrap().is_none());
        assert!(cache.get(&cache.key("inv", "q").unwrap(), Levels::ALL, 1.0).unwrap().is_some());
        assert_eq!(cache.invalidate("inv", None, Levels::LOCAL).unwrap(), 1);
    }

    #[test]
    fn l2_stays_within_its_bound_and_evicts_expired_first() {
        let cache = open(&handle(), 1.0);
        let expiring = cache.key("ns", "zzz-expiring").unwrap();
        cache.put(&expiring, json!(0), Some(2.0), None, Levels::LOCAL, 1.0).unwrap();
        for i in 0..200 {
            let k = cache.key("ns", &format!("k{i:03}")).unwrap();
            cache.put(&k, json!(i), None, None, Levels::LOCAL, 3.0).unwrap();
            let stats = cache.stats();
            assert!(stats["l2"]["entries"].as_u64().unwrap() <= 50, "{stats}");
        }
        let stats = cache.stats();
        assert_eq!(stats["l2"]["expired"], 1, "{stats}");
        assert_eq!(stats["l2"]["evictions"], 150, "{stats}");
        // The most recent writes are still in L2.
        let last = cache.key("ns", "k199").unwrap();
        assert!(cache.get(&last, Levels { l1: false, l2: true, l3: false, l4: false }, 3.0).unwrap().is_some());
    }

    #[test]
    fn levels_parse() {
        assert_eq!(Levels::parse(None), Ok(Levels::ALL));
        let l = Levels::parse(Some(&["l1".to_owned()])).unwrap();
        assert!(l.l1 && !l.l2 && !l.l3 && !l.l4);
        assert!(!Levels::parse(None).unwrap().l4, "other clusters only when asked");
        let l4 = Levels::parse(Some(&["l4".to_owned()])).unwrap();
        assert!(l4.l4 && !l4.l1 && l4.local() == Levels { l1: false, l2: false, l3: false, l4: false });
        assert!(Levels::parse(Some(&["l5".to_owned()])).is_err());
        assert!(Levels::parse(Some(&[])).is_err());
    }
}
