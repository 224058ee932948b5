//! [`MemoryStore`]: ordered maps behind one lock; for tests and nodes without a data dir.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::{Batch, Bytes, KeyRange, KvStore, PersistenceError, Result, TreeName, Write};

type Trees = BTreeMap<TreeName, BTreeMap<Bytes, Bytes>>;

/// An in-memory [`KvStore`]: same semantics as [`super::SledStore`], nothing survives the
/// process, and `sync` is a no-op.
#[derive(Debug, Default)]
pub struct MemoryStore {
    trees: RwLock<Trees>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Trees>> {
        self.trees.read().map_err(|_| PersistenceError::Corrupt("memory store lock poisoned".to_owned()))
    }
}

impl KvStore for MemoryStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.read()?.get(tree).and_then(|t| t.get(key)).cloned())
    }

    fn scan(&self, tree: &str, range: &KeyRange, limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let trees = self.read()?;
        let Some(tree) = trees.get(tree) else { return Ok(Vec::new()) };
        Ok(tree
            .range::<Bytes, _>((range.start.clone(), range.end.clone()))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        // One write lock for the whole batch: readers see all of it or none of it.
        let mut trees =
            self.trees.write().map_err(|_| PersistenceError::Corrupt("memory store lock poisoned".to_owned()))?;
        for write in batch.writes() {
            match write {
                Write::Put { tree, key, value } => {
                    trees.entry(tree.clone()).or_default().insert(key.clone(), value.clone());
                }
                Write::Delete { tree, key } => {
                    if let Some(t) = trees.get_mut(tree) {
                        t.remove(key);
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn tree_names(&self) -> Result<Vec<TreeName>> {
        Ok(self.read()?.iter().filter(|(_, t)| !t.is_empty()).map(|(name, _)| name.clone()).collect())
    }

    fn is_durable(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
