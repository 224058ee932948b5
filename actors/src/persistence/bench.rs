//! Measurements of the store that `mpreg bench persistence` prints and `mpreg bench queue`
//! can reuse: the unbatched durable floor and group-committed writes with many in flight.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Batch, KvStore, OpenError, PersistenceHandle, SledStore};

/// One measured scenario, in the shape of `mpreg bench rpc --json` rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    /// Scenario name.
    pub name: String,
    /// Completed operations per second.
    pub calls_per_s: f64,
    /// Median latency of one operation (µs).
    pub p50_us: f64,
    /// 99th percentile latency (µs).
    pub p99_us: f64,
    /// Operations measured.
    pub ops: usize,
    /// Syncs performed (ops / syncs = mean group size).
    pub syncs: u64,
    /// Seconds spent in syncs (group commit only).
    pub sync_seconds: f64,
}

fn figure(name: &str, mut latencies: Vec<Duration>, elapsed: Duration, syncs: u64) -> Figure {
    latencies.sort();
    let at = |q: f64| {
        latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Figure {
        name: name.to_owned(),
        calls_per_s: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: at(0.50),
        p99_us: at(0.99),
        ops: latencies.len(),
        syncs,
        sync_seconds: 0.0,
    }
}

fn value(len: usize) -> Vec<u8> {
    vec![0x42; len]
}

/// `sled_flush_seq`: one insert, then `SledStore::sync` (sled `flush()` + `fdatasync`), one
/// at a time, in a fresh store under `dir`: the unbatched durable floor.
pub fn sled_flush_seq(dir: &Path, ops: usize, value_len: usize) -> Result<Figure, OpenError> {
    let store = SledStore::open(dir)?;
    let payload = value(value_len);
    let mut latencies = Vec::with_capacity(ops);
    let started = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        let batch = Batch::new().put("queue/bench", format!("{i:012}"), payload.clone());
        if store.apply(&batch).and_then(|_| store.sync()).is_err() {
            break;
        }
        latencies.push(t.elapsed());
    }
    Ok(figure("sled_flush_seq", latencies, started.elapsed(), ops as u64))
}

/// `persistence_commit_durable`: `writers` tasks each committing one-write batches through
/// `handle` until `ops` commits are acknowledged; they share syncs by group commit.
pub async fn group_commit(
    handle: &PersistenceHandle,
    name: &str,
    writers: usize,
    ops: usize,
    value_len: usize,
) -> Figure {
    let payload = Arc::new(value(value_len));
    let syncs_before = handle.stats().syncs();
    let sync_before = handle.stats().sync_time();
    let per_writer = ops.div_ceil(writers.max(1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers.max(1))
        .map(|w| {
            let (handle, payload) = (handle.clone(), payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let t = Instant::now();
                    let batch = Batch::new().put("queue/bench", format!("{w:04}-{i:010}"), payload.as_slice());
                    if handle.commit(batch).await.is_err() {
                        break;
                    }
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(ops);
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    let mut f = figure(name, latencies, started.elapsed(), handle.stats().syncs() - syncs_before);
    f.sync_seconds = (handle.stats().sync_time() - sync_before).as_secs_f64();
    f
}

/// Both scenarios on fresh sled stores under `dir`: the floor, then 64 writers in flight.
pub async fn run(dir: &Path, ops: usize, value_len: usize, max_batch: usize) -> Result<Vec<Figure>, OpenError> {
    let floor = sled_flush_seq(&dir.join("seq"), ops, value_len)?;
    let store = Arc::new(SledStore::open(&dir.join("group"))?);
    let handle = PersistenceHandle::start(store, max_batch, None).map_err(|e| OpenError {
        path: dir.to_path_buf(),
        failure: super::OpenFailure::Io,
        detail: e.to_string(),
    })?;
    let grouped = group_commit(&handle, "persistence_commit_durable_64", 64, ops * 4, value_len).await;
    let single = group_commit(&handle, "persistence_commit_durable_1", 1, ops, value_len).await;
    Ok(vec![floor, single, grouped])
}
