//! One behaviour suite run against both stores, the group committer driven through a
//! store with injected faults, sled's open failures, and a property test that sled and
//! memory agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn kv(k: &str, v: &str) -> (Bytes, Bytes) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

fn sled_in(dir: &tempfile::TempDir) -> SledStore {
    SledStore::open(&dir.path().join("data")).expect("open sled")
}

/// The behaviour every [`KvStore`] must have.
fn behaviour_suite(store: &dyn KvStore) {
    assert_eq!(store.get("meta", b"missing").unwrap(), None);
    assert!(store.tree_names().unwrap().is_empty());
    assert!(store.scan("nothing", &KeyRange::all(), 10).unwrap().is_empty());

    // Written out of order, scanned in byte order; a later write to a key wins.
    let batch = Batch::new()
        .put("queue/a", "k3", "v3")
        .put("queue/a", "k1", "old")
        .put("queue/a", "k2", "v2")
        .put("queue/a", "k1", "v1")
        .put("queue/a", "j9", "other")
        .put("meta", "version", "1");
    store.apply(&batch).unwrap();
    assert_eq!(store.get("queue/a", b"k1").unwrap(), Some(b"v1".to_vec()));
    assert_eq!(store.get("meta", b"version").unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get("meta", b"k1").unwrap(), None, "trees are separate keyspaces");
    assert_eq!(
        store.scan("queue/a", &KeyRange::all(), 100).unwrap(),
        vec![kv("j9", "other"), kv("k1", "v1"), kv("k2", "v2"), kv("k3", "v3")]
    );
    assert_eq!(
        store.scan("queue/a", &KeyRange::prefix("k"), 100).unwrap(),
        vec![kv("k1", "v1"), kv("k2", "v2"), kv("k3", "v3")]
    );
    // Bounded, then the next page.
    let page = store.scan("queue/a", &KeyRange::prefix("k"), 2).unwrap();
    assert_eq!(page, vec![kv("k1", "v1"), kv("k2", "v2")]);
    let next = KeyRange::prefix("k").resume_after(page[1].0.clone());
    assert_eq!(store.scan("queue/a", &next, 2).unwrap(), vec![kv("k3", "v3")]);
    assert_eq!(
        store.scan("queue/a", &KeyRange::between("k1", "k3"), 10).unwrap(),
        vec![kv("k1", "v1"), kv("k2", "v2")]
    );
    assert_eq!(store.scan("queue/a", &KeyRange::after("k2"), 10).unwrap(), vec![kv("k3", "v3")]);
    assert!(store.scan("queue/a", &KeyRange::between("k3", "k1"), 10).unwrap().is_empty(), "inverted range");
    assert!(store.scan("queue/a", &KeyRange::all(), 0).unwrap().is_empty());
    assert_eq!(store.tree_names().unwrap(), vec!["meta".to_owned(), "queue/a".to_owned()]);

    // One batch across trees: a move from one queue to another plus a counter.
    store
        .apply(&Batch::new().delete("queue/a", "k1").put("queue/a.dlq", "k1", "v1").put("meta", "moved", "1"))
        .unwrap();
    assert_eq!(store.get("queue/a", b"k1").unwrap(), None);
    assert_eq!(store.get("queue/a.dlq", b"k1").unwrap(), Some(b"v1".to_vec()));
    assert_eq!(store.get("meta", b"moved").unwrap(), Some(b"1".to_vec()));

    // Deleting a missing key or in a missing tree is fine; an emptied tree is not listed.
    store.apply(&Batch::new().delete("queue/a.dlq", "k1").delete("ghost", "x").delete("meta", "nope")).unwrap();
    assert_eq!(store.tree_names().unwrap(), vec!["meta".to_owned(), "queue/a".to_owned()]);
    store.apply(&Batch::new()).unwrap();

    // Binary keys sort as bytes, and a prefix of 0xff bytes has no successor.
    store
        .apply(&Batch::new().put("bin", vec![0xff, 0xff], "a").put("bin", vec![0xff], "b").put("bin", vec![0], "c"))
        .unwrap();
    let all: Vec<Bytes> = store.scan("bin", &KeyRange::all(), 10).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(all, vec![vec![0], vec![0xff], vec![0xff, 0xff]]);
    assert_eq!(store.scan("bin", &KeyRange::prefix(vec![0xff]), 10).unwrap().len(), 2);
    store.sync().unwrap();
}

#[test]
fn memory_store_behaves() {
    behaviour_suite(&MemoryStore::new());
}

#[test]
fn sled_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    behaviour_suite(&sled_in(&dir));
}

#[test]
fn sled_keeps_synced_batches_across_reopen_including_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![7u8; 2 * 1024 * 1024]; // larger than a segment: sled puts it in blobs/
    {
        let store = sled_in(&dir);
        store.apply(&Batch::new().put("queue/q", "m1", big.clone()).put("meta", "n", "1")).unwrap();
        store.sync().unwrap();
    }
    let store = sled_in(&dir);
    assert_eq!(store.get("queue/q", b"m1").unwrap().as_deref(), Some(big.as_slice()));
    assert_eq!(store.get("meta", b"n").unwrap(), Some(b"1".to_vec()));
}

#[test]
fn a_second_open_of_a_locked_dir_fails_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _held = sled_in(&dir);
    let err = SledStore::open(&dir.path().join("data")).unwrap_err();
    assert_eq!(err.failure, OpenFailure::Locked, "{err}");
    assert!(err.to_string().contains("data_dir") && err.to_string().contains("locked"), "{err}");
}

#[test]
fn a_garbage_conf_fails_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    drop(sled_in(&dir));
    std::fs::write(dir.path().join("data/conf"), b"this is not a sled config\x00\xff\xfe").unwrap();
    let err = SledStore::open(&dir.path().join("data")).unwrap_err();
    assert_eq!(err.failure, OpenFailure::Corrupt, "{err}");
}

#[test]
fn a_garbage_log_never_opens_as_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = sled_in(&dir);
        store.apply(&Batch::new().put("queue/q", "m1", "payload")).unwrap();
        store.sync().unwrap();
    }
    let log = dir.path().join("data/db");
    let len = std::fs::metadata(&log).unwrap().len() as usize;
    std::fs::write(&log, vec![0xA5; len.max(4096)]).unwrap();
    for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("snap.")) {
            std::fs::write(&path, b"garbage").unwrap();
        }
    }
    match SledStore::open(&dir.path().join("data")) {
        Err(err) => assert_eq!(err.failure, OpenFailure::Corrupt, "{err}"),
        Ok(store) => panic!("opened a corrupt store silently: {:?}", store.tree_names()),
    }
}

#[test]
fn a_path_under_a_file_cannot_be_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = SledStore::open(&file.join("data")).unwrap_err();
    assert!(err.to_string().contains(&file.display().to_string()), "{err}");
}

#[test]
fn open_store_without_a_dir_is_memory() {
    let store = open_store(None).unwrap();
    assert!(!store.is_durable());
    assert_eq!(store.describe(), "memory");
}

/// A memory store whose `sync` can be held at a gate, fail on demand, and counts calls;
/// `apply` fails for the tree `refused`, and with an I/O error for the tree `full`.
struct FaultyStore {
    inner: MemoryStore,
    syncs_entered: AtomicU64,
    /// Syncs numbered (from 1) at or past this fail.
    fail_syncs_from: AtomicU64,
    gate_closed: Mutex<bool>,
    gate: Condvar,
}

impl Default for FaultyStore {
    fn default() -> Self {
        FaultyStore {
            inner: MemoryStore::new(),
            syncs_entered: AtomicU64::new(0),
            fail_syncs_from: AtomicU64::new(u64::MAX),
            gate_closed: Mutex::new(false),
            gate: Condvar::new(),
        }
    }
}

impl FaultyStore {
    fn close_gate(&self) {
        *self.gate_closed.lock().unwrap() = true;
    }

    fn open_gate(&self) {
        *self.gate_closed.lock().unwrap() = false;
        self.gate.notify_all();
    }
}

impl KvStore for FaultyStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.get(tree, key)
    }
    fn scan(&self, tree: &str, range: &KeyRange, limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan(tree, range, limit)
    }
    fn apply(&self, batch: &Batch) -> Result<()> {
        if batch.writes().iter().any(|w| w.tree() == "full") {
            return Err(PersistenceError::Io("No space left on device (os error 28)".to_owned()));
        }
        if batch.writes().iter().any(|w| w.tree() == "refused") {
            // Not an I/O error: this batch is bad, not the disk.
            return Err(PersistenceError::Corrupt("refused tree".to_owned()));
        }
        self.inner.apply(batch)
    }
    fn sync(&self) -> Result<()> {
        let number = self.syncs_entered.fetch_add(1, Ordering::SeqCst) + 1;
        let mut closed = self.gate_closed.lock().unwrap();
        while *closed {
            closed = self.gate.wait(closed).unwrap();
        }
        if number >= self.fail_syncs_from.load(Ordering::SeqCst) {
            return Err(PersistenceError::Io("No space left on device (os error 28)".to_owned()));
        }
        Ok(())
    }
    fn tree_names(&self) -> Result<Vec<TreeName>> {
        self.inner.tree_names()
    }
    fn is_durable(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "faulty".to_owned()
    }
}

/// Holds the committer in its first sync, queues `n` more commits, and returns the
/// first commit and the queued ones as spawned tasks.
async fn hold_first_sync_and_queue(
    handle: &PersistenceHandle,
    store: &Arc<FaultyStore>,
    batches: Vec<Batch>,
) -> (tokio::task::JoinHandle<Result<()>>, Vec<tokio::task::JoinHandle<Result<()>>>) {
    let before = store.syncs_entered.load(Ordering::SeqCst);
    store.close_gate();
    let first = tokio::spawn({
        let handle = handle.clone();
        async move { handle.commit(Batch::new().put("queue/q", "first", "1")).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.syncs_entered.load(Ordering::SeqCst) != before + 1 {
        assert!(Instant::now() < deadline, "timed out waiting for the first sync");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let n = batches.len();
    let rest: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.commit(batch).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.queued() < n {
        assert!(Instant::now() < deadline, "commits never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (first, rest)
}

/// Opens the gate [`hold_first_sync_and_queue`] closed and asserts that the first commit
/// and every queued one succeed.
async fn release_and_await_all(
    store: &FaultyStore,
    first: tokio::task::JoinHandle<Result<()>>,
    rest: Vec<tokio::task::JoinHandle<Result<()>>>,
) {
    store.open_gate();
    first.await.unwrap().unwrap();
    for task in rest {
        task.await.unwrap().unwrap();
    }
}

#[actix_rt::test]
async fn a_stalled_group_and_the_commits_behind_it_are_answered_not_durable() {
    // sled on a full disk may block inside a write instead of failing it: the committer
    // never comes back, and without the watchdog nobody would answer its waiters.
    let store = Arc::new(FaultyStore::default());
    let handle = PersistenceHandle::start(store.clone(), 1, None).unwrap();
    let behind = vec![Batch::new().put("queue/q", "b1", "x"), Batch::new().put("queue/q", "b2", "x")];
    let (first, rest) = hold_first_sync_and_queue(&handle, &store, behind).await;
    assert!(!handle.answer_stalled(Duration::from_secs(3600)), "not stalled for an hour yet");
    assert!(handle.answer_stalled(Duration::ZERO));
    for task in std::iter::once(first).chain(rest) {
        let answer = task.await.unwrap();
        assert!(
            matches!(&answer, Err(PersistenceError::Io(cause)) if cause.contains("has not finished")),
            "{answer:?}"
        );
    }
    let later = handle.commit(Batch::new().put("queue/q", "later", "x")).await;
    assert!(matches!(later, Err(PersistenceError::Poisoned(_))), "{later:?}");
    store.open_gate();
}

#[actix_rt::test]
async fn group_commit_answers_every_waiter_after_one_sync() {
    let store = Arc::new(FaultyStore::default());
    let handle = PersistenceHandle::start(store.clone(), 64, None).unwrap();
    let batches = (0..20).map(|i| Batch::new().put("queue/q", format!("m{i:02}"), "x")).collect();
    let (first, rest) = hold_first_sync_and_queue(&handle, &store, batches).await;
    release_and_await_all(&store, first, rest).await;
    // The first commit synced alone; the 20 queued behind it shared ONE sync.
    assert_eq!(store.syncs_entered.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().syncs(), 2);
    assert_eq!(handle.stats().commits(), 21);
    assert_eq!(handle.scan("queue/q", &KeyRange::prefix("m"), 100).unwrap().len(), 20);
}

#[actix_rt::test]
async fn max_batch_bounds_a_group() {
    let store = Arc::new(FaultyStore::default());
    let handle = PersistenceHandle::start(store.clone(), 8, None).unwrap();
    let batches = (0..20).map(|i| Batch::new().put("queue/q", format!("m{i:02}"), "x")).collect();
    let (first, rest) = hold_first_sync_and_queue(&handle, &store, batches).await;
    release_and_await_all(&store, first, rest).await;
    // 1 + ceil(20 / 8) groups.
    assert_eq!(handle.stats().syncs(), 4);
}

#[actix_rt::test]
async fn a_failed_sync_fails_every_waiter_of_its_group_and_poisons() {
    let store = Arc::new(FaultyStore::default());
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let handle = PersistenceHandle::start(store.clone(), 64, Some(metrics.clone())).unwrap();
    handle.commit(Batch::new().put("queue/q", "before", "1")).await.unwrap();
    // The held group (sync 2) succeeds; the 10 queued behind it share sync 3, which fails.
    store.fail_syncs_from.store(3, Ordering::SeqCst);
    let batches = (0..10).map(|i| Batch::new().put("queue/q", format!("m{i}"), "x")).collect();
    let (first, rest) = hold_first_sync_and_queue(&handle, &store, batches).await;
    store.open_gate();
    first.await.unwrap().unwrap();
    for task in rest {
        match task.await.unwrap() {
            Err(PersistenceError::Io(cause)) => assert!(cause.contains("No space left"), "{cause}"),
            other => panic!("a waiter of a failed sync was answered {other:?}"),
        }
    }
    assert_eq!(store.syncs_entered.load(Ordering::SeqCst), 3, "the 10 shared one failed sync");
    assert_eq!(handle.stats().commits(), 2, "only the commits before the failure are acknowledged");
    assert_eq!(handle.stats().sync_failures(), 1);
    // Later durable writes are refused and not even applied.
    store.fail_syncs_from.store(u64::MAX, Ordering::SeqCst);
    let later = handle.commit(Batch::new().put("queue/q", "later", "1")).await;
    assert!(matches!(later, Err(PersistenceError::Poisoned(_))), "{later:?}");
    assert_eq!(handle.get("queue/q", b"later").unwrap(), None);
    assert_eq!(handle.get("queue/q", b"before").unwrap(), Some(b"1".to_vec()), "reads still work");
    let text = metrics.render("n1");
    assert!(text.contains("mpreg_persistence_commits_total{node=\"n1\"} 2"), "{text}");
    assert!(text.contains("mpreg_persistence_sync_failures_total{node=\"n1\"} 1"), "{text}");
    assert!(text.contains("mpreg_persistence_durable{node=\"n1\"} 1"), "{text}");
}

#[actix_rt::test]
async fn a_write_the_disk_refuses_poisons_later_commits_and_writes() {
    let store = Arc::new(FaultyStore::default());
    let handle = PersistenceHandle::start(store.clone(), 64, None).unwrap();
    handle.commit(Batch::new().put("queue/q", "before", "1")).await.unwrap();
    let refused = handle.commit(Batch::new().put("full", "k", "x")).await;
    assert!(matches!(&refused, Err(PersistenceError::Io(cause)) if cause.contains("No space")), "{refused:?}");
    // The store is not asked again: later commits and writes are refused at once.
    let later = handle.commit(Batch::new().put("queue/q", "later", "1")).await;
    assert!(matches!(later, Err(PersistenceError::Poisoned(_))), "{later:?}");
    assert!(matches!(handle.write(&Batch::new().put("queue/q", "w", "1")), Err(PersistenceError::Poisoned(_))));
    assert_eq!(handle.get("queue/q", b"later").unwrap(), None);
    assert_eq!(handle.get("queue/q", b"before").unwrap(), Some(b"1".to_vec()), "reads still work");
}

#[actix_rt::test]
async fn a_batch_that_cannot_be_applied_fails_alone() {
    let store = Arc::new(FaultyStore::default());
    let handle = PersistenceHandle::start(store.clone(), 64, None).unwrap();
    let batches = vec![
        Batch::new().put("queue/q", "good1", "x"),
        Batch::new().put("queue/q", "half", "x").put("refused", "k", "x"),
        Batch::new().put("queue/q", "good2", "x"),
    ];
    let (first, rest) = hold_first_sync_and_queue(&handle, &store, batches).await;
    store.open_gate();
    first.await.unwrap().unwrap();
    let outcomes: Vec<_> = futures_util::future::join_all(rest).await.into_iter().map(|r| r.unwrap()).collect();
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    assert!(outcomes[1].is_err(), "{outcomes:?}");
    assert_eq!(handle.get("queue/q", b"half").unwrap(), None, "a failed batch leaves nothing behind");
    assert_eq!(handle.stats().syncs(), 2);
}

#[actix_rt::test]
async fn sled_commits_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let handle = PersistenceHandle::start(Arc::new(sled_in(&dir)), 64, None).unwrap();
        let commits = (0..100).map(|i| {
            let handle = handle.clone();
            async move { handle.commit(Batch::new().put("queue/q", format!("m{i:03}"), "x")).await }
        });
        for outcome in futures_util::future::join_all(commits).await {
            outcome.unwrap();
        }
        assert!(handle.stats().syncs() <= 100);
    }
    // The committer thread holds the Db until it sees the channel closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match SledStore::open(&dir.path().join("data")) {
            Ok(store) => break store,
            Err(e) if e.failure == OpenFailure::Locked && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(store.scan("queue/q", &KeyRange::all(), 1000).unwrap().len(), 100);
}

#[actix_rt::test]
async fn the_supervised_actor_serves_the_same_store_after_a_crash() {
    use crate::supervisor::{ChildHandles, ChildSpec, CrashChild, NodeSupervisor, RestartPolicy, Slot};
    use actix::Actor;
    let handle = PersistenceHandle::start(Arc::new(MemoryStore::new()), 64, None).unwrap();
    let slot: Slot<Persistence> = Slot::default();
    let child = ChildSpec::new("persistence", {
        let (handle, slot) = (handle.clone(), slot.clone());
        move |guard| {
            let addr = Persistence::new(handle.clone(), guard).start();
            slot.set(addr.clone());
            ChildHandles::of(&addr)
        }
    });
    let (exit, _exit_rx) = tokio::sync::watch::channel(crate::supervisor::NodeExit::Running);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let supervisor =
        NodeSupervisor::new("n1".to_owned(), RestartPolicy::default(), vec![child], exit, metrics.clone()).start();
    let served = slot.send(|| GetHandle).await.unwrap();
    served.commit(Batch::new().put("meta", "k", "v")).await.unwrap();
    assert!(supervisor.send(CrashChild { name: "persistence".to_owned() }).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.restarts() == 0 {
        assert!(Instant::now() < deadline, "the persistence actor was not restarted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let after = slot.send(|| GetHandle).await.unwrap();
    assert_eq!(after.get("meta", b"k").unwrap(), Some(b"v".to_vec()));
    after.commit(Batch::new().put("meta", "k2", "v")).await.unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, Vec<u8>, Vec<u8>),
    Delete(u8, Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let key = proptest::collection::vec(0u8..4, 0..4);
    prop_oneof![
        (0u8..3, key.clone(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(t, k, v)| Op::Put(t, k, v)),
        (0u8..3, key).prop_map(|(t, k)| Op::Delete(t, k)),
    ]
}

fn tree(t: u8) -> String {
    ["queue/a", "queue/b", "meta"][t as usize].to_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random batches (single- and multi-tree) leave sled and memory with the same contents.
    #[test]
    fn sled_and_memory_agree(batches in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 1..12),
                             prefix in proptest::collection::vec(0u8..4, 0..2)) {
        let dir = tempfile::tempdir().unwrap();
        let sled = sled_in(&dir);
        let memory = MemoryStore::new();
        for ops in &batches {
            let mut batch = Batch::new();
            for op in ops {
                batch.push(match op.clone() {
                    Op::Put(t, key, value) => Write::Put { tree: tree(t), key, value },
                    Op::Delete(t, key) => Write::Delete { tree: tree(t), key },
                });
            }
            sled.apply(&batch).unwrap();
            memory.apply(&batch).unwrap();
        }
        sled.sync().unwrap();
        prop_assert_eq!(sled.tree_names().unwrap(), memory.tree_names().unwrap());
        for t in 0..3 {
            let name = tree(t);
            prop_assert_eq!(sled.scan(&name, &KeyRange::all(), 1000).unwrap(), memory.scan(&name, &KeyRange::all(), 1000).unwrap());
            let range = KeyRange::prefix(prefix.clone());
            prop_assert_eq!(sled.scan(&name, &range, 3).unwrap(), memory.scan(&name, &range, 3).unwrap());
            for k in 0u8..4 {
                prop_assert_eq!(sled.get(&name, &[k]).unwrap(), memory.get(&name, &[k]).unwrap());
            }
        }
    }
}
