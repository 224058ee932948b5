//! [`SledStore`]: one `sled::Db` (0.34.7) under the node's data dir, made power-safe by
//! syncing sled's own files after its `flush()`.
//!
//! sled 0.34.7 keeps, in its directory: `conf` (written once at creation), `db` (the log
//! and the page segments: every write lands here), `blobs/<lsn>` (values too large for a
//! segment, one file each, written with plain `write` and never synced by sled) and
//! `snap.<lsn>` (a recovery snapshot sled writes with `sync_all` itself; it can always be
//! rebuilt from `db`). `flush()` ends in `sync_file_range`, which is not power-safe, so
//! [`SledStore::sync`] follows it with `fdatasync(db)` and `fsync` of each new blob file and
//! of `blobs/`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{Batch, Bytes, KeyRange, KvStore, OpenError, OpenFailure, PersistenceError, Result, TreeName, Write};

/// sled's own tree, which we never use: not one of ours.
const SLED_DEFAULT_TREE: &[u8] = b"__sled__default";

/// Our tree of facts about the store itself; not listed by `tree_names`.
const STORE_TREE: &str = "__mpreg__";

/// The key written (and synced) when the store is created. sled 0.34.7 opens a `db` file
/// full of garbage as an EMPTY database without an error; an existing store without this
/// key is therefore refused as corrupt instead of silently starting empty.
const CREATED_KEY: &[u8] = b"created";

/// A [`KvStore`] on sled.
pub struct SledStore {
    dir: PathBuf,
    db: sled::Db,
    /// Our own handle on sled's log file, for `fdatasync` (an fsync reaches the inode,
    /// whichever descriptor asks).
    log: File,
    trees: RwLock<HashMap<TreeName, sled::Tree>>,
    /// Blob files already synced (sled names them by LSN and never rewrites one).
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("dir", &self.dir).finish()
    }
}

fn is_unwritable(e: &io::Error) -> bool {
    // EROFS has no stable `ErrorKind` on our MSRV; 30 on Linux.
    e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(30)
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. Fails, never falls back to an empty store,
    /// when the directory is unwritable, locked by another process or corrupt.
    pub fn open(dir: &Path) -> std::result::Result<SledStore, OpenError> {
        let fail = |failure, detail: String| OpenError { path: dir.to_path_buf(), failure, detail };
        let io_fail = |e: io::Error| {
            let failure = if is_unwritable(&e) { OpenFailure::Unwritable } else { OpenFailure::Io };
            fail(failure, e.to_string())
        };
        std::fs::create_dir_all(dir).map_err(io_fail)?;
        // sled opens a read-only directory without complaint and fails later, at the
        // first write: find out now.
        let probe = dir.join(".mpreg-write-check");
        std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe)).map_err(io_fail)?;
        let existed = dir.join("conf").exists() || dir.join("db").exists();
        let opened = catch_unwind(AssertUnwindSafe(|| sled::Config::new().path(dir).open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(classify_open_error(dir, e)),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "sled panicked while opening".to_owned());
                return Err(fail(OpenFailure::Corrupt, what));
            }
        };
        let log = File::open(dir.join("db")).map_err(io_fail)?;
        let store = SledStore {
            dir: dir.to_path_buf(),
            db,
            log,
            trees: RwLock::new(HashMap::new()),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        store.check_or_mark_created(existed)?;
        store.sync_files_at_open().map_err(io_fail)?;
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new store gets its creation record; an existing one must have it.
    fn check_or_mark_created(&self, existed: bool) -> std::result::Result<(), OpenError> {
        let fail = |failure, detail: String| OpenError { path: self.dir.clone(), failure, detail };
        let marker = self.tree(STORE_TREE).and_then(|t| t.get(CREATED_KEY).map_err(store_error));
        match marker {
            Ok(Some(_)) => Ok(()),
            Ok(None) if existed => Err(fail(
                OpenFailure::Corrupt,
                "sled files are present but hold no MPREG store (the log is unreadable or was replaced); \
                 move the directory aside to start empty"
                    .to_owned(),
            )),
            Ok(None) => {
                let created = format!("{{\"format\":1,\"unix_time\":{}}}", crate::unix_now());
                self.apply(&Batch::new().put(STORE_TREE, CREATED_KEY, created.into_bytes()))
                    .and_then(|_| self.sync())
                    .map_err(|e| fail(OpenFailure::Io, e.to_string()))
            }
            Err(PersistenceError::Corrupt(detail)) => Err(fail(OpenFailure::Corrupt, detail)),
            Err(e) => Err(fail(OpenFailure::Io, e.to_string())),
        }
    }

    /// Makes the files sled created reachable after a power cut: their contents, and the
    /// directory entries naming them.
    fn sync_files_at_open(&self) -> io::Result<()> {
        self.db.flush().map_err(sled_io)?;
        File::open(self.dir.join("conf"))?.sync_all()?;
        self.log.sync_all()?;
        self.sync_new_blobs()?;
        File::open(&self.dir)?.sync_all()?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Best effort: the parent may belong to someone else, and only matters the
            // first time the data dir is created.
            if let Ok(parent) = File::open(parent) {
                let _ = parent.sync_all();
            }
        }
        Ok(())
    }

    /// `fsync`s every blob file not synced yet, then `blobs/` itself if any was new.
    fn sync_new_blobs(&self) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced_blobs.lock().map_err(|_| io::Error::other("blob set lock poisoned"))?;
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                match File::open(blobs.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled in between: nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }

    fn tree(&self, name: &str) -> Result<sled::Tree> {
        if let Some(tree) = self.trees.read().ok().and_then(|t| t.get(name).cloned()) {
            return Ok(tree);
        }
        let tree = self.db.open_tree(name).map_err(store_error)?;
        if let Ok(mut trees) = self.trees.write() {
            trees.insert(name.to_owned(), tree.clone());
        }
        Ok(tree)
    }
}

fn classify_open_error(dir: &Path, e: sled::Error) -> OpenError {
    let (failure, detail) = match e {
        // sled 0.34.7 (config.rs `try_lock`) reports a held flock this way.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            (OpenFailure::Locked, io.to_string())
        }
        sled::Error::Io(io) if is_unwritable(&io) => (OpenFailure::Unwritable, io.to_string()),
        sled::Error::Io(io) if matches!(io.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof) => {
            (OpenFailure::Corrupt, io.to_string())
        }
        sled::Error::Io(io) => (OpenFailure::Io, io.to_string()),
        sled::Error::Corruption { at, .. } => (OpenFailure::Corrupt, format!("sled found corruption at {at:?}")),
        sled::Error::Unsupported(s) | sled::Error::ReportableBug(s) => (OpenFailure::Corrupt, s),
        other => (OpenFailure::Corrupt, other.to_string()),
    };
    OpenError { path: dir.to_path_buf(), failure, detail }
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(io) => io,
        other => io::Error::other(other.to_string()),
    }
}

fn store_error(e: sled::Error) -> PersistenceError {
    match e {
        sled::Error::Io(io) => PersistenceError::Io(io.to_string()),
        sled::Error::Corruption { at, .. } => PersistenceError::Corrupt(format!("sled found corruption at {at:?}")),
        other => PersistenceError::Io(other.to_string()),
    }
}

impl KvStore for SledStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.tree(tree)?.get(key).map_err(store_error)?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: &str, range: &KeyRange, limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let tree = self.tree(tree)?;
        let mut out = Vec::new();
        for entry in tree.range::<Bytes, _>((range.start.clone(), range.end.clone())).take(limit) {
            let (k, v) = entry.map_err(store_error)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let writes = batch.writes();
        let Some(first) = writes.first() else { return Ok(()) };
        if writes.iter().all(|w| w.tree() == first.tree()) {
            // One tree: a sled batch, atomic in memory and in recovery.
            let mut sled_batch = sled::Batch::default();
            for write in writes {
                match write {
                    Write::Put { key, value, .. } => sled_batch.insert(key.as_slice(), value.as_slice()),
                    Write::Delete { key, .. } => sled_batch.remove(key.as_slice()),
                }
            }
            return self.tree(first.tree())?.apply_batch(sled_batch).map_err(store_error);
        }
        // Several trees: a sled transaction over all of them.
        let mut names: Vec<&str> = Vec::new();
        for write in writes {
            if !names.contains(&write.tree()) {
                names.push(write.tree());
            }
        }
        let trees = names.iter().map(|n| self.tree(n)).collect::<Result<Vec<_>>>()?;
        let index: Vec<usize> =
            writes.iter().map(|w| names.iter().position(|n| *n == w.tree()).unwrap_or_default()).collect();
        let outcome = trees.as_slice().transaction(|tx| {
            for (write, &i) in writes.iter().zip(&index) {
                match write {
                    Write::Put { key, value, .. } => {
                        tx[i].insert(key.as_slice(), value.as_slice())?;
                    }
                    Write::Delete { key, .. } => {
                        tx[i].remove(key.as_slice())?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(store_error(e)),
            Err(TransactionError::Abort(())) => Err(PersistenceError::Io("transaction aborted".to_owned())),
        }
    }

    fn sync(&self) -> Result<()> {
        self.db.flush().map_err(store_error)?;
        self.log.sync_data().map_err(|e| PersistenceError::Io(e.to_string()))?;
        self.sync_new_blobs().map_err(|e| PersistenceError::Io(e.to_string()))
    }

    fn tree_names(&self) -> Result<Vec<TreeName>> {
        let mut names = Vec::new();
        for raw in self.db.tree_names() {
            if raw.as_ref() == SLED_DEFAULT_TREE || raw.as_ref() == STORE_TREE.as_bytes() {
                continue;
            }
            let name = String::from_utf8_lossy(&raw).into_owned();
            if !self.tree(&name)?.is_empty() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn is_durable(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("sled at {}", self.dir.display())
    }
}
