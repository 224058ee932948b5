//! `mpreg bench cache [--json]`: cache operations next to RPC echo, in one run.
//!
//! Two nodes in this process (one actix System), each key owned by one of them
//! (`cache_replication = 1`, so "another node's key" is well defined); one client thread
//! drives node 1 over a raw websocket with pre-encoded frames, exactly as `mpreg bench
//! rpc` does, so the ratios compare the server paths:
//!
//! - `rpc_echo_seq`, `rpc_echo_pipelined`: the RPC baselines of this run;
//! - `cache_get_hit_seq`, `cache_get_hit_pipelined`: `get` of a key node 1 owns (an L1
//!   hit, answered on the connection's thread);
//! - `cache_put_pipelined`: `put` of a key node 1 owns (L1 + L2, and a drop of the key
//!   sent to node 2, which might hold a copy, before the answer);
//! - `cache_get_remote`: `get` with `levels: ["l3"]` of a key node 2 owns (one fabric
//!   round trip; no copy is kept, so every call crosses).
//! - `rpc_uncached`, `rpc_cached`: sequential calls of `work_1ms` (an async function that
//!   sleeps 1 ms), without and with `"cache": {"ttl": 3600}` (after the first call, every
//!   call is a hit served without running it). `rpc_cached` takes turns with `echo` on one
//!   connection (`rpc_echo_beside_cached`), and its target is the ratio of the two: a p50
//!   of a few tens of µs drifts between scenarios run seconds apart more than by 20%.
//!
//! `redis-server` is not run: this benchmark has no RESP client (see the README).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mpreg_actors::cache::core::{owners, CacheKey, KeyLimits};
use serde_json::json;

use super::bench::{
    drive_frames, round1, round3, Placement, ReplyCheck, ScenarioBenchArgs, ScenarioResult, PIPELINE_DEPTH,
    STUCK_AFTER, WARMUP,
};
use crate::client::{CacheOptions, Client};
use crate::config::Settings;
use crate::node::NodeBuilder;
use crate::FunctionSpec;

const NODE1: &str = "bench-cache-1";
const NODE2: &str = "bench-cache-2";
const ECHO: &str = r#"{"role":"rpc","u":"0000000000000000","cmds":[{"name":"e","fun":"echo","args":[42]}]}"#;
/// The function of the RPC caching pair: 1 ms of waiting.
const WORK: &str = "work_1ms";
const WORK_UNCACHED: &str =
    r#"{"role":"rpc","u":"0000000000000000","cmds":[{"name":"w","fun":"work_1ms","args":[7]}]}"#;
const WORK_CACHED: &str =
    r#"{"role":"rpc","u":"0000000000000000","cmds":[{"name":"w","fun":"work_1ms","args":[7],"cache":{"ttl":3600}}]}"#;

/// One scenario: its requests (taking turns on one connection), each with its result's
/// name and the check of its replies; its depth.
struct CacheScenario {
    turns: Vec<(&'static str, String, ReplyCheck)>,
    depth: usize,
}

/// The first key `k<i>` whose single owner is `node`.
fn key_owned_by(node: &str) -> String {
    let nodes = [NODE1.to_owned(), NODE2.to_owned()];
    let limits = KeyLimits { max_key_bytes: 1024, max_ttl_s: 1e9 };
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| CacheKey::new("bench", k, &limits).is_ok_and(|key| owners(&key.hash_input(), &nodes, 1) == [node]))
        .unwrap_or_default()
}

fn cache_frame(op: &str, key: &str, extra: &str) -> String {
    format!(r#"{{"role":"cache","u":"0000000000000000","op":"{op}","namespace":"bench","key":"{key}"{extra}}}"#)
}

fn scenarios(local: &str, remote: &str) -> Vec<CacheScenario> {
    let found = ReplyCheck::RpcSuccessWith(br#""found":true"#);
    let scenario = |name, frame, check, depth| CacheScenario { turns: vec![(name, frame, check)], depth };
    vec![
        scenario("rpc_echo_seq", ECHO.to_owned(), ReplyCheck::RpcSuccess, 1),
        scenario("rpc_echo_pipelined", ECHO.to_owned(), ReplyCheck::RpcSuccess, PIPELINE_DEPTH),
        scenario("cache_get_hit_seq", cache_frame("get", local, ""), found, 1),
        scenario("cache_get_hit_pipelined", cache_frame("get", local, ""), found, PIPELINE_DEPTH),
        scenario(
            "cache_put_pipelined",
            cache_frame("put", local, r#","value":{"user":42,"name":"ada"}"#),
            ReplyCheck::RpcSuccess,
            PIPELINE_DEPTH,
        ),
        scenario("cache_get_remote", cache_frame("get", remote, r#","levels":["l3"]"#), found, 1),
        scenario("rpc_uncached", WORK_UNCACHED.to_owned(), ReplyCheck::RpcSuccess, 1),
        CacheScenario {
            turns: vec![
                ("rpc_echo_beside_cached", ECHO.to_owned(), ReplyCheck::RpcSuccess),
                ("rpc_cached", WORK_CACHED.to_owned(), ReplyCheck::RpcSuccess),
            ],
            depth: 1,
        },
    ]
}

/// Runs the benchmark; exit code 0 when every reply was a success.
pub fn cache(args: ScenarioBenchArgs) -> anyhow::Result<i32> {
    if !args.duration.is_finite() || args.duration <= 0.0 || args.duration > 3600.0 {
        bail!("--duration must be a number of seconds in (0, 3600], got {}", args.duration);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let (results, pinned) = run(duration, !args.no_pin)?;
    args.draw_plot("cache", &results)?;
    let by_name = |name: &str| results.iter().find(|r| r.name == name);
    let ratio = |a: &str, b: &str, f: fn(&ScenarioResult) -> f64| match (by_name(a), by_name(b)) {
        (Some(a), Some(b)) if f(b) > 0.0 => round3(f(a) / f(b)),
        _ => 0.0,
    };
    let throughput = ratio("cache_get_hit_pipelined", "rpc_echo_pipelined", |r| r.calls_per_s);
    let cached_p50 = ratio("rpc_cached", "rpc_echo_beside_cached", |r| f64::from(r.p50_us));
    let targets = json!({
        "cache_get_hit_pipelined_vs_rpc_echo_pipelined": throughput,
        "cache_get_hit_pipelined_min": 0.8,
        "cache_get_hit_pipelined_met": throughput >= 0.8,
        "cache_get_hit_seq_p50_vs_rpc_echo_seq": ratio("cache_get_hit_seq", "rpc_echo_seq", |r| f64::from(r.p50_us)),
        "cache_get_remote_p50_vs_rpc_echo_seq": ratio("cache_get_remote", "rpc_echo_seq", |r| f64::from(r.p50_us)),
        "rpc_cached_p50_vs_rpc_echo_beside_cached": cached_p50,
        "rpc_cached_p50_max": 1.2,
        "rpc_cached_met": cached_p50 > 0.0 && cached_p50 <= 1.2,
        "rpc_uncached_p50_vs_rpc_cached": ratio("rpc_uncached", "rpc_cached", |r| f64::from(r.p50_us)),
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| json!({"name": r.name, "calls_per_s": round1(r.calls_per_s), "p50_us": r.p50_us, "p99_us": r.p99_us}))
            .collect();
        let report = json!({
            "duration_s": args.duration,
            "warmup_s": WARMUP.as_secs_f64(),
            "pipeline_depth": PIPELINE_DEPTH,
            "pinned": pinned.map(|p| json!({"server_cpu": p.server_cpu, "client_cpu": p.client_cpu})),
            "results": rows,
            "targets": targets,
        });
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "{:<26}{:>12}{:>10}{:>10}", "scenario", "calls/s", "p50 µs", "p99 µs")?;
        for r in &results {
            writeln!(out, "{:<26}{:>12.0}{:>10}{:>10}", r.name, r.calls_per_s, r.p50_us, r.p99_us)?;
        }
        writeln!(out, "targets: {targets}")?;
    }
    out.flush()?;
    Ok(0)
}

/// Starts the two nodes, fills the cache, runs the client thread, stops both.
fn run(duration: Duration, pin: bool) -> anyhow::Result<(Vec<ScenarioResult>, Option<Placement>)> {
    actix_rt::System::new().block_on(async move {
        let settings = |name: &str, peers: Vec<String>| Settings {
            port: 0,
            monitoring_enabled: false,
            name: name.to_owned(),
            peers,
            gossip_interval_s: 0.1,
            cache_replication: 1,
            ..Settings::default()
        };
        let work = FunctionSpec::asynchronous(WORK, |x: i64| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            x
        });
        let node1 =
            NodeBuilder::new(settings(NODE1, vec![])).function(work).start().await.context("starting node 1")?;
        let node2 = match NodeBuilder::new(settings(NODE2, vec![node1.url().to_owned()])).start().await {
            Ok(node) => node,
            Err(e) => {
                node1.shutdown().await;
                return Err(anyhow::Error::new(e).context("starting node 2"));
            }
        };
        let (local, remote) = (key_owned_by(NODE1), key_owned_by(NODE2));
        let url = node1.url().to_owned();
        let ready = prepare(&url, &local, &remote).await;
        let outcome = match ready {
            Ok(()) => {
                actix_rt::time::sleep(Duration::from_millis(50)).await;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let list = scenarios(&local, &remote);
                let client = std::thread::Builder::new()
                    .name("bench-client".to_owned())
                    .spawn(move || drop(tx.send(run_client(&url, list, duration, pin))))
                    .context("starting the client thread")?;
                let outcome = rx.await.context("the client thread died");
                drop(client.join());
                outcome.and_then(|o| o)
            }
            Err(e) => Err(e),
        };
        node2.shutdown().await;
        node1.shutdown().await;
        outcome
    })
}

/// Waits until node 1 sees node 2 as a cache node, then stores both keys.
async fn prepare(url: &str, local: &str, remote: &str) -> anyhow::Result<()> {
    let client = Client::connect(url).await.context("connecting to node 1")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = client.cache_stats().await?;
        if stats["l3"]["nodes"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        if Instant::now() > deadline {
            bail!("node 1 never saw node 2 as a cache node: {stats}");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    for key in [local, remote] {
        client.cache_put("bench", key, json!({"user": 42, "name": "ada"}), CacheOptions::default()).await?;
    }
    let remote_hit = client.cache_get("bench", remote, CacheOptions::default().levels(&["l3"])).await?;
    if remote_hit.is_none() {
        bail!("the remote key is not readable through l3");
    }
    client.close().await;
    Ok(())
}

fn run_client(
    url: &str,
    list: Vec<CacheScenario>,
    duration: Duration,
    pin: bool,
) -> anyhow::Result<(Vec<ScenarioResult>, Option<Placement>)> {
    let pinned = if pin {
        match Placement::apply() {
            Ok(placement) => Some(placement),
            Err(e) => {
                eprintln!("not pinned ({e:#}): sequential figures may jump between runs");
                None
            }
        }
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut results = Vec::new();
    let total = list.len();
    for (i, scenario) in list.into_iter().enumerate() {
        let label = scenario.turns.iter().map(|(name, _, _)| *name).collect::<Vec<_>>().join(" + ");
        progress!("[{}/{total}] {label} ", i + 1);
        let (names, frames): (Vec<_>, Vec<_>) =
            scenario.turns.into_iter().map(|(name, frame, check)| (name, (frame, check))).unzip();
        let budget = WARMUP + duration + STUCK_AFTER;
        let measurements = runtime
            .block_on(async { tokio::time::timeout(budget, drive_frames(url, frames, scenario.depth, duration)).await })
            .with_context(|| format!("{label}: no progress for {} s", STUCK_AFTER.as_secs()))??;
        for (name, measurement) in names.into_iter().zip(measurements) {
            if measurement.errors > 0 {
                bail!(
                    "{name}: {} error replies; first: {}",
                    measurement.errors,
                    measurement.first_error.as_deref().unwrap_or("?")
                );
            }
            let result = measurement.into_result(name, duration);
            progress!(" {:.0} calls/s", result.calls_per_s);
            results.push(result);
        }
        progress!("\n");
    }
    Ok((results, pinned))
}
