//! `mpreg bench federation`: federation convergence and cross-cluster calls.
//!
//! - `--simulate N`: N clusters in a line exchanging signed route updates in memory
//!   (`mpreg_actors::federation::simulation`), every signature made and checked for real:
//!   rounds and wall time until every cluster routes to every other (the core alone).
//! - `--clusters N`: N node processes, one cluster each (own authority, credentials and
//!   route key), in a line: node i keeps a bridge to node i−1. Started one after the
//!   other; `federation_converge` is the time from the last node's start until every node
//!   routes to every other cluster (its `/routes`), then `rpc_local` (echo on node 0),
//!   `rpc_cross_1bridge` (echo with `target_cluster` = cluster 1, across one bridge) and
//!   `rpc_cross_2bridges` (echo with `target_cluster` = cluster 2, across two bridges)
//!   are measured one call at a time on node 0; then `queue_send_local` (a send to node
//!   0's in-memory queue) and `queue_send_cross_2bridges` (a send with `target_cluster` =
//!   cluster 2 to its queue of the same name), one at a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mpreg_actors::fabric::trust::{self, Authority};
use mpreg_actors::federation::keys::rotate_in_dir;
use mpreg_actors::federation::simulation::Simulation;
use mpreg_actors::protocol::RpcCommand;
use serde_json::{json, Value};

use super::bench::{percentile, spawn_node, ChildGuard};
use crate::client::{Client, QueueSendOptions};

/// How long a node may take to print its URLs, and the line to converge.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `mpreg bench federation`.
#[derive(Debug, clap::Args)]
pub struct FederationBenchArgs {
    /// Clusters in the simulated line (several sizes: repeat the flag).
    #[arg(long, default_values_t = [8])]
    pub simulate: Vec<usize>,
    /// Instead of the simulation: this many node processes, one cluster each, in a line
    /// bridged for real (3 to 16).
    #[arg(long)]
    pub clusters: Option<usize>,
    /// Calls measured for each latency (after 20 unmeasured).
    #[arg(long, default_value_t = 500)]
    pub calls: usize,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the simulations, or the process line, and prints them.
pub fn run(args: FederationBenchArgs) -> anyhow::Result<i32> {
    if let Some(n) = args.clusters {
        if !(3..=16).contains(&n) {
            bail!("--clusters must be between 3 (two bridges to cross) and 16 (the longest route path), got {n}");
        }
        let report = actix_rt::System::new().block_on(processes(n, args.calls.max(1)))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", json!({ "results": report }))?;
        } else {
            for r in &report {
                writeln!(out, "{r}")?;
            }
        }
        return Ok(0);
    }
    // A route's path holds at most 16 clusters (the table's max_path_len), so a longer
    // line cannot converge end to end, by design.
    if let Some(bad) = args.simulate.iter().find(|&&n| !(2..=16).contains(&n)) {
        anyhow::bail!("--simulate must be between 2 and 16 clusters (the longest route path), got {bad}");
    }
    let now_ms = mpreg_actors::fabric::trust::unix_seconds() * 1000;
    let reports: Vec<_> = args.simulate.iter().map(|&n| Simulation::converge_line(n, now_ms)).collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let results: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({"name": "federation_converge_simulated", "clusters": r.clusters, "rounds": r.rounds,
                       "updates": r.updates, "seconds": r.seconds, "converged": r.converged})
            })
            .collect();
        writeln!(out, "{}", json!({ "results": results }))?;
    } else {
        writeln!(out, "{:>8} {:>7} {:>8} {:>10} {:>10}", "clusters", "rounds", "updates", "ms", "converged")?;
        for r in &reports {
            writeln!(
                out,
                "{:>8} {:>7} {:>8} {:>10.1} {:>10}",
                r.clusters,
                r.rounds,
                r.updates,
                r.seconds * 1000.0,
                r.converged
            )?;
        }
    }
    Ok(if reports.iter().all(|r| r.converged) { 0 } else { 1 })
}

/// The keys and settings of the bench's clusters, removed on drop.
struct Workdir(PathBuf);

impl Drop for Workdir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// A node process of the line, killed on drop.
struct LineNode {
    url: String,
    monitoring: String,
    _child: ChildGuard,
}

fn cluster_name(i: usize) -> String {
    format!("bench-fed-{i}")
}

/// Cluster `i`'s authority, node credentials and route key in `dir/i`; its settings file
/// bridging to its neighbours in the line (`peer`: the node it dials).
fn prepare(dir: &Path, i: usize, authorities: &[Authority], peer: Option<&str>) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (name, now) = (cluster_name(i), trust::unix_seconds());
    let own = dir.join(i.to_string());
    authorities[i].save(&own)?;
    rotate_in_dir(&own, &name, now, 60)?;
    let credentials = own.join("node.cred");
    authorities[i].issue(&format!("n{i}"), &name, now, 86_400)?.save(&credentials)?;
    let neighbours: Vec<usize> =
        [i.checked_sub(1), Some(i + 1).filter(|&j| j < authorities.len())].into_iter().flatten().collect();
    let allowed: Vec<String> = neighbours.iter().map(|&j| cluster_name(j)).collect();
    let pins: Vec<String> =
        neighbours.iter().map(|&j| format!("{} = \"{}\"", cluster_name(j), authorities[j].public_hex())).collect();
    let text = format!(
        "[mpreg]\n[mpreg.federation]\nallowed_clusters = {}\npeers = {}\nroute_key_dir = {}\n\
         [mpreg.federation.exports]\nfunctions = [\"echo\"]\nqueues = [\"bench\"]\n[mpreg.federation.trust]\n{}\n",
        json!(allowed),
        json!(peer.into_iter().collect::<Vec<_>>()),
        json!(own.display().to_string()),
        pins.join("\n")
    );
    let settings = own.join("node.toml");
    std::fs::write(&settings, text)?;
    Ok((credentials, settings))
}

/// Starts node `i` and waits for its URLs.
fn start(exe: &Path, i: usize, credentials: &Path, settings: &Path) -> anyhow::Result<LineNode> {
    let mut command = Command::new(exe);
    command
        .args(["server", "start", "--port", "0", "--monitoring-port", "0", "--name", &format!("n{i}")])
        .args(["--cluster-id", &cluster_name(i), "--credentials"])
        .arg(credentials)
        .arg("--config")
        .arg(settings)
        .env("RUST_LOG", "warn");
    let (tx, rx) = std::sync::mpsc::channel();
    let child = spawn_node(&mut command, tx, Some)?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut monitoring = None;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("node n{i} printed no MPREG_URL= within {} s", STARTUP_TIMEOUT.as_secs()))?;
        if let Some(url) = line.strip_prefix("MPREG_MONITORING_URL=") {
            monitoring = Some(url.to_owned());
        } else if let Some(url) = line.strip_prefix("MPREG_URL=") {
            let monitoring = monitoring.context("no MPREG_MONITORING_URL= before MPREG_URL=")?;
            return Ok(LineNode { url: url.to_owned(), monitoring, _child: child });
        }
    }
}

/// How many other clusters `node` routes to now.
async fn routed(node: &LineNode) -> usize {
    let routes = crate::demo::http_get_json(&format!("{}/routes", node.monitoring)).await.unwrap_or(Value::Null);
    routes["routes"].as_array().map_or(0, |r| r.iter().filter(|r| !r["selected"].is_null()).count())
}

/// p50 in µs of `calls` sequential requests of `cmd` (after 20 unmeasured).
async fn p50_us(client: &Client, cmd: &RpcCommand, calls: usize) -> anyhow::Result<u32> {
    p50_of(calls, || client.request(vec![cmd.clone()])).await
}

/// p50 in µs of `calls` sequential runs of `op` (after 20 unmeasured).
async fn p50_of<T, F, Fut>(calls: usize, mut op: F) -> anyhow::Result<u32>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::client::ClientError>>,
{
    for _ in 0..20 {
        op().await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        op().await?;
        samples.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    samples.sort_unstable();
    Ok(percentile(&samples, 0.5))
}

async fn processes(n: usize, calls: usize) -> anyhow::Result<Vec<Value>> {
    let exe = std::env::current_exe().context("locating the mpreg binary")?;
    let dir = Workdir(std::env::temp_dir().join(format!("mpreg-bench-federation-{}", trust::fresh_nonce())));
    let authorities: Vec<Authority> = (0..n).map(|_| Authority::generate()).collect();
    let mut nodes: Vec<LineNode> = Vec::with_capacity(n);
    for i in 0..n {
        let peer = nodes.last().map(|p| p.url.clone());
        let (credentials, settings) = prepare(&dir.0, i, &authorities, peer.as_deref())?;
        nodes.push(start(&exe, i, &credentials, &settings)?);
    }
    let started = Instant::now();
    loop {
        let counts = futures_util::future::join_all(nodes.iter().map(routed)).await;
        if counts.iter().all(|&c| c == n - 1) {
            break;
        }
        if started.elapsed() > STARTUP_TIMEOUT {
            bail!("the line of {n} clusters did not converge within {} s", STARTUP_TIMEOUT.as_secs());
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let converge = started.elapsed().as_secs_f64();
    let client = Client::connect(&nodes[0].url).await?;
    let echo = RpcCommand::new("r", "echo", vec![json!("x")]);
    let local = p50_us(&client, &echo, calls).await?;
    // One bridge as well as two: their difference is what one more cluster on the way
    // costs (two link crossings and the forwarding), the one-bridge call's excess over
    // the local call that plus the destination's side.
    let one = RpcCommand { target_cluster: Some(cluster_name(1)), ..echo.clone() };
    let one_bridge = p50_us(&client, &one, calls).await?;
    let cross = RpcCommand { target_cluster: Some(cluster_name(2)), ..echo };
    let remote = p50_us(&client, &cross, calls).await?;
    // In-memory queues (no sync) without dedup on node 0 and node 2.
    let config = json!({"durable": false, "dedup_window": 0});
    client.queue_create("bench", config.clone()).await?;
    let far = Client::connect(&nodes[2].url).await?;
    far.queue_create("bench", config).await?;
    far.close().await;
    let send = |target_cluster: Option<String>| {
        let options = QueueSendOptions { target_cluster, ..Default::default() };
        client.queue_send("bench", json!("x"), options)
    };
    let queue_local = p50_of(calls, || send(None)).await?;
    let queue_cross = p50_of(calls, || send(Some(cluster_name(2)))).await?;
    client.close().await;
    Ok(vec![
        json!({"name": "federation_converge", "clusters": n, "seconds": converge}),
        json!({"name": "rpc_local", "calls": calls, "p50_us": local}),
        json!({"name": "rpc_cross_1bridge", "calls": calls, "p50_us": one_bridge}),
        json!({"name": "rpc_cross_2bridges", "calls": calls, "p50_us": remote,
               "ratio_to_local": f64::from(remote) / f64::from(local.max(1))}),
        json!({"name": "queue_send_local", "calls": calls, "p50_us": queue_local}),
        json!({"name": "queue_send_cross_2bridges", "calls": calls, "p50_us": queue_cross,
               "ratio_to_local": f64::from(queue_cross) / f64::from(queue_local.max(1))}),
    ])
}
