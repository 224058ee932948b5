//! The catalog change log behind `catalog_watch`: what entered and left this node's view
//! of the catalog, numbered, so a client can ask for the changes since the version it
//! last saw.
//!
//! FabricGossip shows it the whole view after every change ([`CatalogLog::observe`]); the
//! log keeps the difference from the view before as one [`CatalogChange`]. Bounded in
//! items: the oldest changes are forgotten first, and a client asking from before the
//! oldest one kept is told to start over (`reset`), as it is after a node restart
//! (versions start again at 0).

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use serde_json::Value;

/// One change of the view: the entries that appeared and those that went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CatalogChange {
    /// Its number; the first change is 1.
    pub version: u64,
    /// When it was seen (Unix seconds).
    pub at: f64,
    /// Entries that appeared (as `catalog_query` lists them).
    pub added: Vec<Value>,
    /// Entries that went.
    pub removed: Vec<Value>,
}

impl CatalogChange {
    fn items(&self) -> usize {
        self.added.len() + self.removed.len()
    }
}

/// The answer to "what changed since version `since`".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangesSince {
    /// The latest version.
    pub version: u64,
    /// The changes after `since`, oldest first.
    pub changes: Vec<CatalogChange>,
    /// `since` is older than the oldest change kept, or newer than the latest: the
    /// changes are incomplete, query the catalog again.
    pub reset: bool,
}

/// The log. Entries are keyed by a stable text of their identity.
#[derive(Debug, Clone)]
pub struct CatalogLog {
    current: BTreeMap<String, Value>,
    changes: VecDeque<CatalogChange>,
    version: u64,
    /// Changes up to this version were forgotten.
    forgotten: u64,
    items: usize,
    max_items: usize,
}

impl CatalogLog {
    /// A log that keeps at most `max_items` added or removed entries.
    pub fn new(max_items: usize) -> Self {
        CatalogLog { current: BTreeMap::new(), changes: VecDeque::new(), version: 0, forgotten: 0, items: 0, max_items }
    }

    /// Takes the whole view now (entries by key); records the difference as a change and
    /// returns it, or `None` when nothing changed.
    pub fn observe(&mut self, now: f64, view: BTreeMap<String, Value>) -> Option<CatalogChange> {
        let removed: Vec<Value> =
            self.current.iter().filter(|(k, _)| !view.contains_key(*k)).map(|(_, v)| v.clone()).collect();
        let added: Vec<Value> =
            view.iter().filter(|(k, _)| !self.current.contains_key(*k)).map(|(_, v)| v.clone()).collect();
        self.current = view;
        if added.is_empty() && removed.is_empty() {
            return None;
        }
        self.version += 1;
        let change = CatalogChange { version: self.version, at: now, added, removed };
        self.items += change.items();
        self.changes.push_back(change.clone());
        while self.items > self.max_items {
            let Some(oldest) = self.changes.pop_front() else { break };
            self.items -= oldest.items();
            self.forgotten = oldest.version;
        }
        Some(change)
    }

    /// The changes after `since`.
    pub fn since(&self, since: u64) -> ChangesSince {
        let reset = since < self.forgotten || since > self.version;
        let changes =
            if reset { Vec::new() } else { self.changes.iter().filter(|c| c.version > since).cloned().collect() };
        ChangesSince { version: self.version, changes, reset }
    }

    /// The latest version.
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn view(keys: &[&str]) -> BTreeMap<String, Value> {
        keys.iter().map(|k| (k.to_string(), json!(k))).collect()
    }

    #[test]
    fn changes_are_numbered_differences() {
        let mut log = CatalogLog::new(100);
        assert_eq!(log.observe(1.0, view(&["a", "b"])).map(|c| c.version), Some(1));
        assert_eq!(log.observe(2.0, view(&["a", "b"])), None);
        let change = log.observe(3.0, view(&["b", "c"])).expect("a change");
        assert_eq!((change.version, change.added, change.removed), (2, vec![json!("c")], vec![json!("a")]));
        let since = log.since(1);
        assert_eq!((since.version, since.changes.len(), since.reset), (2, 1, false));
        assert_eq!(log.since(2).changes, vec![]);
        assert!(log.since(7).reset, "a version from before a restart");
    }

    #[test]
    fn the_oldest_changes_are_forgotten_and_asking_for_them_resets() {
        let mut log = CatalogLog::new(3);
        log.observe(1.0, view(&["a", "b"]));
        log.observe(2.0, view(&["a", "b", "c"]));
        log.observe(3.0, view(&["a", "b", "c", "d"]));
        assert!(log.since(0).reset, "change 1 was forgotten");
        let since = log.since(1);
        assert!(!since.reset);
        assert_eq!(since.changes.iter().map(|c| c.version).collect::<Vec<_>>(), vec![2, 3]);
    }
}
