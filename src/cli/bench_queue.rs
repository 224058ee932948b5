//! `mpreg bench queue [--json]`: durable queue throughput against the unbatched floor.
//!
//! - `sled_flush_seq`: insert + flush + fdatasync one at a time on a fresh store (what
//!   each durable write would cost without group commit).
//! - `queue_send_durable`: 64 sends in flight on one connection to a durable queue, each
//!   answered after its commit (group commit shares the syncs).
//! - `queue_send_memory`: the same on an in-memory queue (no writes).
//! - `queue_roundtrip_durable`: 64 workers each doing send -> receive -> ack on a durable
//!   queue; one roundtrip = the three acknowledged operations.
//!
//! The node runs in this process on its own thread, with a data dir in a temp directory
//! removed at the end. Output: the `results` list of `mpreg bench rpc --json`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use mpreg_actors::persistence::{Batch, KvStore, SledStore};
use serde_json::json;

use crate::client::{Client, QueueSendOptions};
use crate::config::Settings;
use crate::node::NodeBuilder;

/// Flags of `mpreg bench queue`.
#[derive(Debug, clap::Args)]
pub struct QueueBenchArgs {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Operations in flight.
    #[arg(long, default_value_t = 64)]
    pub depth: usize,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Figure {
    name: &'static str,
    calls_per_s: f64,
    p50_us: u64,
    p99_us: u64,
}

fn figure(name: &'static str, mut latencies_us: Vec<u64>, elapsed: Duration) -> Figure {
    latencies_us.sort_unstable();
    let pct = |q: f64| {
        if latencies_us.is_empty() {
            return 0;
        }
        let rank = (q * latencies_us.len() as f64).ceil() as usize;
        latencies_us[rank.clamp(1, latencies_us.len()) - 1]
    };
    Figure {
        name,
        calls_per_s: latencies_us.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Insert + flush + fdatasync one at a time for `duration`.
fn sled_flush_seq(dir: &Path, duration: Duration) -> anyhow::Result<Figure> {
    let store = SledStore::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        let t = Instant::now();
        n += 1;
        let batch = Batch::new().put("bench", n.to_be_bytes().to_vec(), vec![0x5a; 64]);
        store.apply(&batch)?;
        store.sync()?;
        latencies.push(t.elapsed().as_micros() as u64);
    }
    Ok(figure("sled_flush_seq", latencies, started.elapsed()))
}

/// Keeps `depth` operations (each `op(i)`) in flight for `duration`.
async fn drive<F, Fut>(name: &'static str, depth: usize, duration: Duration, op: F) -> anyhow::Result<Figure>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let op = &op;
    let latencies: Vec<anyhow::Result<u64>> = futures_util::stream::iter(0u64..)
        .take_while(|_| std::future::ready(started.elapsed() < duration))
        .map(|i| async move {
            let t = Instant::now();
            op(i).await?;
            Ok(t.elapsed().as_micros() as u64)
        })
        .buffer_unordered(depth)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let latencies = latencies.into_iter().collect::<anyhow::Result<Vec<u64>>>()?;
    Ok(figure(name, latencies, elapsed))
}

async fn queue_scenarios(url: &str, depth: usize, duration: Duration) -> anyhow::Result<Vec<Figure>> {
    let client = Client::connect(url).await?;
    let big = json!({"max_messages": 10_000_000, "dedup_window": 0});
    client.queue_create("bench_durable", big.clone()).await?;
    let mut memory = big.clone();
    memory["durable"] = json!(false);
    client.queue_create("bench_memory", memory).await?;
    client.queue_create("bench_roundtrip", big).await?;
    let send = |queue: &'static str| {
        let client = client.clone();
        move |i: u64| {
            let client = client.clone();
            async move {
                client.queue_send(queue, json!({"n": i}), QueueSendOptions::default()).await?;
                Ok(())
            }
        }
    };
    let mut figures = vec![drive("queue_send_durable", depth, duration, send("bench_durable")).await?];
    figures.push(drive("queue_send_memory", depth, duration, send("bench_memory")).await?);
    let roundtrip = |i: u64| {
        let client = client.clone();
        async move {
            let consumer = format!("w{}", i % 64);
            client.queue_send("bench_roundtrip", json!({"n": i}), QueueSendOptions::default()).await?;
            let got = client.queue_receive("bench_roundtrip", 1, 1.0, Some(&consumer)).await?;
            let ids: Vec<String> = got.into_iter().map(|m| m.id).collect();
            if ids.is_empty() {
                bail!("a receive after a send got nothing");
            }
            let acked = client.queue_ack("bench_roundtrip", &ids, Some(&consumer)).await?;
            if acked.len() != ids.len() {
                bail!("ack of {ids:?} acked only {acked:?}");
            }
            Ok(())
        }
    };
    figures.push(drive("queue_roundtrip_durable", depth, duration, roundtrip).await?);
    client.close().await;
    Ok(figures)
}

/// The benchmark's stores, removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark; exit code 0 when every operation succeeded.
pub fn queue(args: QueueBenchArgs) -> anyhow::Result<i32> {
    if !args.duration.is_finite() || args.duration <= 0.0 || args.duration > 3600.0 {
        bail!("--duration must be a number of seconds in (0, 3600], got {}", args.duration);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let tmp = TempDir(std::env::temp_dir().join(format!("mpreg-bench-queue-{}", std::process::id())));
    progress!("sled_flush_seq ...");
    let floor = sled_flush_seq(&tmp.0.join("floor"), duration)?;
    progress!(" {:.0}/s\n", floor.calls_per_s);

    let data_dir = tmp.0.join("node");
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let settings = Settings {
                port: 0,
                monitoring_enabled: false,
                data_dir: Some(data_dir),
                workers: 1,
                ..Settings::default()
            };
            match NodeBuilder::new(settings).start().await {
                Ok(node) => {
                    let _ = url_tx.send(Ok(node.url().to_owned()));
                    let _ = stop_rx.await;
                    let stats = node.persistence().stats();
                    let (commits, syncs) = (stats.commits(), stats.syncs());
                    eprintln!(
                        "group commit: {commits} commits in {syncs} syncs ({:.1} per sync, {:.0} us per sync)",
                        commits as f64 / syncs.max(1) as f64,
                        stats.sync_time().as_micros() as f64 / syncs.max(1) as f64
                    );
                    node.shutdown().await;
                }
                Err(e) => drop(url_tx.send(Err(e.to_string()))),
            }
        })
    });
    let url = url_rx.recv().context("the node thread ended")?.map_err(|e| anyhow::anyhow!(e))?;
    progress!("queue scenarios ({} s each, {} in flight) ...", args.duration, args.depth);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let figures = runtime.block_on(queue_scenarios(&url, args.depth.max(1), duration));
    let _ = stop_tx.send(());
    let _ = server.join();
    let mut results = vec![floor];
    results.extend(figures?);
    progress!(" done\n");

    let rate = |name: &str| results.iter().find(|r| r.name == name).map_or(0.0, |r| r.calls_per_s);
    let (durable, floor_rate, roundtrip) =
        (rate("queue_send_durable"), rate("sled_flush_seq"), rate("queue_roundtrip_durable"));
    let targets = json!({
        "queue_send_durable_min": 20000,
        "queue_send_durable_met": durable >= 20000.0,
        "ratio_to_sled_flush_seq": if floor_rate > 0.0 { (durable / floor_rate * 10.0).round() / 10.0 } else { 0.0 },
        "ratio_min": 5,
        "ratio_met": floor_rate > 0.0 && durable >= 5.0 * floor_rate,
        "queue_roundtrip_durable_min": 10000,
        "queue_roundtrip_durable_met": roundtrip >= 10000.0,
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| {
                json!({"name": r.name, "calls_per_s": (r.calls_per_s * 10.0).round() / 10.0,
                    "p50_us": r.p50_us, "p99_us": r.p99_us})
            })
            .collect();
        let report = json!({"duration_s": args.duration, "depth": args.depth, "results": rows, "targets": targets});
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "{:<26} {:>12} {:>10} {:>10}", "scenario", "ops/s", "p50 us", "p99 us")?;
        for r in &results {
            writeln!(out, "{:<26} {:>12.0} {:>10} {:>10}", r.name, r.calls_per_s, r.p50_us, r.p99_us)?;
        }
        writeln!(out, "targets: {targets}")?;
    }
    out.flush()?;
    Ok(0)
}
