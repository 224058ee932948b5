//! [`PersistenceHandle`] and the group committer thread behind it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix::MessageResponse;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{Batch, Bytes, KeyRange, KvStore, PersistenceError, Result, TreeName};
use crate::metrics::Metrics;

/// Default most batches per sync (`persistence_max_batch`).
pub const DEFAULT_MAX_BATCH: usize = 256;

/// A commit group (apply and sync) still running after this long is taken for a store
/// that blocks instead of failing (sled on a full disk): its waiters are answered "not
/// durable" and durable writes are refused until restart, as after a failed sync.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

/// How often the watchdog looks at the group in progress.
const STALL_CHECK: Duration = Duration::from_millis(500);

/// Who waits for a durable write's outcome.
type Waiter = oneshot::Sender<Result<()>>;

/// One durable write waiting for the committer.
struct Job {
    batch: Batch,
    done: Waiter,
}

/// Counters of the committer, for tests and benchmarks (the node's `/metrics` has the same
/// facts).
#[derive(Debug, Default)]
pub struct CommitStats {
    commits: AtomicU64,
    syncs: AtomicU64,
    sync_failures: AtomicU64,
    sync_nanos: AtomicU64,
}

impl CommitStats {
    /// Durable batches acknowledged.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Syncs that succeeded.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Syncs that failed (each failed every waiter of its group).
    pub fn sync_failures(&self) -> u64 {
        self.sync_failures.load(Ordering::Relaxed)
    }

    /// Time spent in syncs, successful or not.
    pub fn sync_time(&self) -> Duration {
        Duration::from_nanos(self.sync_nanos.load(Ordering::Relaxed))
    }
}

/// State shared by the handles and the committer thread.
struct Shared {
    /// `None` once closed. Every use holds the read lock for its whole duration, so when
    /// [`PersistenceHandle::close`] has taken it nobody else holds the store.
    store: RwLock<Option<Arc<dyn KvStore>>>,
    /// Whether the store is durable (kept after close, for the metrics).
    durable: bool,
    /// The store's description (kept after close, for logs).
    describe: String,
    stats: CommitStats,
    metrics: Option<Arc<Metrics>>,
    /// Set by the first failed sync; see the module doc.
    poisoned: Mutex<Option<String>>,
    /// The group the committer is applying and syncing: when it started, and its waiters
    /// (taken by the watchdog if the group stalls past [`STALL_LIMIT`]).
    in_progress: Mutex<Option<(Instant, Vec<Waiter>)>>,
    /// The committer's queue. The committer holds the lock only while it waits for or
    /// drains jobs, so the watchdog can answer the jobs queued behind a stalled group.
    queue: Mutex<mpsc::Receiver<Job>>,
}

impl Shared {
    /// Runs `f` on the store, unless it is closed.
    fn with_store<T>(&self, f: impl FnOnce(&Arc<dyn KvStore>) -> Result<T>) -> Result<T> {
        let store = self.store.read().map_err(|_| PersistenceError::Unavailable)?;
        store.as_ref().map_or(Err(PersistenceError::Unavailable), f)
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().map(|p| p.clone()).unwrap_or_else(|_| Some("poisoned lock".to_owned()))
    }

    /// Refuses every later durable commit with `cause` (the first cause is kept).
    fn poison(&self, cause: String) {
        if let Ok(mut poisoned) = self.poisoned.lock() {
            poisoned.get_or_insert(cause);
        }
    }

    /// While the group in progress has run past `limit` (see [`STALL_LIMIT`]): answers
    /// its waiters and the jobs queued behind it "not durable", and poisons the store.
    /// Whether it found the group stalled.
    fn answer_stalled(&self, limit: Duration) -> bool {
        let mut stalled = match self.in_progress.lock() {
            Ok(mut in_progress) => match in_progress.as_mut() {
                Some((since, waiters)) if since.elapsed() > limit => std::mem::take(waiters),
                _ => return false,
            },
            Err(_) => return false,
        };
        let cause = format!("the store has not finished a write for {} s (a full disk?)", limit.as_secs());
        if self.poisoned().is_none() {
            error!(store = %self.describe, cause = %cause,
                "commit stalled: its writes are not acknowledged, durable writes refused until restart");
            self.poison(cause.clone());
        }
        // The committer is inside the store, not waiting for jobs: the queue is free.
        if let Ok(mut queue) = self.queue.try_lock() {
            while let Ok(job) = queue.try_recv() {
                stalled.push(job.done);
            }
        }
        for waiter in stalled {
            let _ = waiter.send(Err(PersistenceError::Io(cause.clone())));
        }
        true
    }
}

/// Watches the committer of `shared` until the handles are gone (see [`STALL_LIMIT`]).
fn run_watchdog(shared: std::sync::Weak<Shared>) {
    while let Some(shared) = shared.upgrade() {
        shared.answer_stalled(STALL_LIMIT);
        drop(shared);
        std::thread::sleep(STALL_CHECK);
    }
}

/// The node's store, shared by every actor that persists something: cheap to clone,
/// `Send + Sync`. Reads and non-durable writes run in place; durable commits go to the
/// group committer thread, which exits when the last handle is dropped.
#[derive(Clone, MessageResponse)]
pub struct PersistenceHandle {
    shared: Arc<Shared>,
    commits: mpsc::Sender<Job>,
}

impl std::fmt::Debug for PersistenceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistenceHandle").field("store", &self.shared.describe).finish()
    }
}

impl PersistenceHandle {
    /// Starts the committer thread for `store`; at most `max_batch` batches share a sync.
    /// `metrics`, when given, receives the commit and sync counters.
    pub fn start(
        store: Arc<dyn KvStore>,
        max_batch: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<PersistenceHandle> {
        let max_batch = max_batch.max(1);
        // Room for a few full groups: beyond that, `commit` waits (backpressure).
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        if let Some(m) = &metrics {
            m.set_persistence_durable(store.is_durable());
        }
        let shared = Arc::new(Shared {
            durable: store.is_durable(),
            describe: store.describe(),
            store: RwLock::new(Some(store)),
            stats: CommitStats::default(),
            metrics,
            poisoned: Mutex::new(None),
            in_progress: Mutex::new(None),
            queue: Mutex::new(rx),
        });
        let committer = shared.clone();
        std::thread::Builder::new()
            .name("mpreg-committer".to_owned())
            .spawn(move || run_committer(&committer, max_batch))?;
        let watched = Arc::downgrade(&shared);
        std::thread::Builder::new().name("mpreg-commit-watch".to_owned()).spawn(move || run_watchdog(watched))?;
        Ok(PersistenceHandle { shared, commits: tx })
    }

    /// Whether commits reach stable storage (false: memory only).
    pub fn is_durable(&self) -> bool {
        self.shared.durable
    }

    /// Syncs what was written and releases the store (for sled: its files and their lock,
    /// so that a node started next on the same data dir opens it at once). Waits for a
    /// commit in progress; every later operation, through any clone, fails `Unavailable`.
    pub async fn close(&self) {
        let shared = self.shared.clone();
        let closed = tokio::task::spawn_blocking(move || {
            let taken = shared.store.write().ok().and_then(|mut store| store.take());
            if let Some(store) = taken {
                if let Err(e) = store.sync() {
                    warn!(store = %shared.describe, cause = %e, "sync at close failed");
                }
                // The last reference: the store is dropped (and released) here.
                drop(store);
            }
        });
        let _ = closed.await;
    }

    /// What the watchdog does to a group stalled past `limit` (tests use a short one).
    #[cfg(test)]
    pub(super) fn answer_stalled(&self, limit: Duration) -> bool {
        self.shared.answer_stalled(limit)
    }

    /// The committer's counters.
    pub fn stats(&self) -> &CommitStats {
        &self.shared.stats
    }

    /// Durable commits waiting for the committer (not counting the group being synced).
    pub fn queued(&self) -> usize {
        self.commits.max_capacity() - self.commits.capacity()
    }

    /// The value at `key` in `tree`.
    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.shared.with_store(|store| store.get(tree, key))
    }

    /// Up to `limit` entries of `tree` within `range`, in key order.
    pub fn scan(&self, tree: &str, range: &KeyRange, limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        self.shared.with_store(|store| store.scan(tree, range, limit))
    }

    /// The trees holding data.
    pub fn tree_names(&self) -> Result<Vec<TreeName>> {
        self.shared.with_store(|store| store.tree_names())
    }

    /// Applies `batch` atomically now, without waiting for the disk: for state that may
    /// be lost in a power cut (in-memory queues, periodic snapshots). The next durable
    /// commit makes it durable too.
    pub fn write(&self, batch: &Batch) -> Result<()> {
        if let Some(cause) = self.shared.poisoned() {
            return Err(PersistenceError::Poisoned(cause));
        }
        self.shared.with_store(|store| store.apply(batch))
    }

    /// Applies `batch` atomically and resolves once it is on stable storage (see the module
    /// doc for exactly what that means), sharing the sync with every commit queued at the
    /// same time. An error means the batch is NOT acknowledged.
    pub async fn commit(&self, batch: Batch) -> Result<()> {
        if let Some(cause) = self.shared.poisoned() {
            return Err(PersistenceError::Poisoned(cause));
        }
        let (done, answer) = oneshot::channel();
        self.commits.send(Job { batch, done }).await.map_err(|_| PersistenceError::Unavailable)?;
        answer.await.unwrap_or(Err(PersistenceError::Unavailable))
    }
}

/// What [`PersistenceHandle::submit`] hands back: resolves like [`PersistenceHandle::commit`].
pub type PendingCommit = oneshot::Receiver<Result<()>>;

impl PersistenceHandle {
    /// Queues `batch` for the committer and returns at once with the answer to await: the
    /// first half of [`commit`](Self::commit). Batches submitted one after another are
    /// applied in that order, so a caller that must keep its writes ordered (the queue
    /// actor) submits from one task and awaits the answers elsewhere. Waits only while
    /// the committer's channel is full (backpressure).
    pub async fn submit(&self, batch: Batch) -> Result<PendingCommit> {
        if let Some(cause) = self.shared.poisoned() {
            return Err(PersistenceError::Poisoned(cause));
        }
        let (done, answer) = oneshot::channel();
        self.commits.send(Job { batch, done }).await.map_err(|_| PersistenceError::Unavailable)?;
        Ok(answer)
    }
}

/// The committer: take one job, drain what else is queued, apply each, sync once, answer.
fn run_committer(shared: &Shared, max_batch: usize) {
    let mut jobs = Vec::with_capacity(max_batch);
    loop {
        {
            let Ok(mut queue) = shared.queue.lock() else { return };
            let Some(job) = queue.blocking_recv() else { return };
            jobs.push(job);
            while jobs.len() < max_batch {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let (batches, waiters): (Vec<Batch>, Vec<_>) = jobs.drain(..).map(|job| (job.batch, job.done)).unzip();
        if let Ok(mut in_progress) = shared.in_progress.lock() {
            *in_progress = Some((Instant::now(), waiters));
        }
        let outcomes = commit_group(shared, &batches);
        // Taken back, unless the watchdog answered them meanwhile (then the outcome is
        // not told: the waiters were told the writes are not acknowledged).
        let waiters = shared.in_progress.lock().ok().and_then(|mut p| p.take()).map_or_else(Vec::new, |(_, w)| w);
        for (done, outcome) in waiters.into_iter().zip(outcomes) {
            // A waiter that gave up is fine: its batch is committed anyway.
            let _ = done.send(outcome);
        }
    }
}

/// Applies the group's batches and syncs once; one outcome per job.
fn commit_group(shared: &Shared, jobs: &[Batch]) -> Vec<Result<()>> {
    if let Some(cause) = shared.poisoned() {
        // Not even applied: a reader must not see a write that cannot be acknowledged.
        return jobs.iter().map(|_| Err(PersistenceError::Poisoned(cause.clone()))).collect();
    }
    let Ok(store) = shared.store.read() else {
        return jobs.iter().map(|_| Err(PersistenceError::Unavailable)).collect();
    };
    let Some(store) = store.as_ref() else {
        return jobs.iter().map(|_| Err(PersistenceError::Unavailable)).collect();
    };
    let apply = |batch: &Batch| {
        catch_unwind(AssertUnwindSafe(|| store.apply(batch)))
            .unwrap_or_else(|_| Err(PersistenceError::Io("the store panicked while applying a batch".to_owned())))
    };
    // The whole group as ONE atomic batch first (sled's flush is several times slower
    // after many small batches than after one large one); if that fails, batch by batch,
    // so that only the failing batch's waiter is refused.
    let merged = (jobs.len() > 1).then(|| {
        let mut all = Batch::new();
        for batch in jobs {
            for write in batch.writes() {
                all.push(write.clone());
            }
        }
        all
    });
    let mut outcomes: Vec<Result<()>> = match merged.as_ref().map(apply) {
        Some(Ok(())) => jobs.iter().map(|_| Ok(())).collect(),
        // The disk refused the group: trying each batch again would only ask it again
        // (and sled, once its log cannot be written, may block instead of failing).
        Some(Err(e @ PersistenceError::Io(_))) => jobs.iter().map(|_| Err(e.clone())).collect(),
        _ => jobs.iter().map(apply).collect(),
    };
    let applied = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
    if applied == 0 {
        // Nothing could be written and the disk said why: refuse every later durable
        // commit, as after a failed sync, rather than hand sled more writes it cannot make.
        if let Some(Err(PersistenceError::Io(cause))) = outcomes.first() {
            error!(store = %shared.describe, cause = %cause, "write failed: durable writes refused until restart");
            shared.poison(cause.clone());
        }
        return outcomes;
    }
    let started = Instant::now();
    let synced = catch_unwind(AssertUnwindSafe(|| store.sync()))
        .unwrap_or_else(|_| Err(PersistenceError::Io("the store panicked while syncing".to_owned())));
    let elapsed = started.elapsed();
    let stats = &shared.stats;
    stats.sync_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    match synced {
        Ok(()) => {
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            stats.commits.fetch_add(applied, Ordering::Relaxed);
            if let Some(m) = &shared.metrics {
                m.record_persistence_sync(applied, elapsed, true);
            }
        }
        Err(e) => {
            stats.sync_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &shared.metrics {
                m.record_persistence_sync(0, elapsed, false);
            }
            error!(store = %store.describe(), cause = %e, waiters = applied,
                "sync failed: durable writes refused until restart");
            shared.poison(e.to_string());
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(e.clone());
            }
        }
    }
    outcomes
}
