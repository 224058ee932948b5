//! `mpreg bench rpc`: RPC throughput and latency next to a raw websocket floor.
//!
//! One process run starts everything it measures (DESIGN.md §13):
//! - a raw echo server on the node's own stack (actix-web + actix-ws, same worker count),
//!   which returns each binary frame unchanged: the floor no RPC can beat;
//! - a real node (`NodeBuilder`, built-in `echo`);
//! - one client thread with a current-thread tokio runtime, which drives both over a raw
//!   tokio-tungstenite connection with the same pre-encoded frames, so client overhead is
//!   identical on both sides and the ratio measures the server.
//!
//! Each scenario is one connection, 0.5 s of warm-up, then `--duration` seconds measured:
//! sequential (one call in flight) and pipelined (64 in flight). Last, a separate `mpreg
//! server start` process is spawned to read the idle node's resident memory.
//!
//! Two cluster scenarios run in the same process: the node above (node 1, which also
//! serves `add` and `multiply` on cpu,math) is joined by a second in-process node (node 2:
//! `model_score` on gpu and `echo_remote`, a function only it serves). `rpc_chain_2node`
//! sends the tier-1 three-step chain to node 2 (two steps run on node 1);
//! `rpc_forward_1hop` calls `echo_remote` through node 1. Both are sequential and are
//! reported as p50 multiples of `rpc_echo_seq`.
//!
//! Two worker scenarios drive `worker_echo`, served by a Rust worker ([`crate::worker`])
//! connected to node 1 over its own websockets, one per node thread (in this process, its
//! own thread on the client's CPU, as a worker process would run on the core the node
//! leaves free):
//! `rpc_worker_seq` (p50 as a multiple of `rpc_echo_seq`, target 2x) and
//! `rpc_worker_pipelined` (calls/s as a fraction of `rpc_echo_pipelined`, target 0.3).
//!
//! Progress goes to stderr so that stdout holds only the table or the JSON object.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_ws::AggregatedMessage;
use anyhow::{bail, Context};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::bench_plot::{latency_curve, write_latency_svg};
use crate::client::Client;
use crate::config::Settings;
use crate::node::{Node, NodeBuilder};
use crate::worker::Worker;
use crate::{FunctionSpec, RpcCommand};

/// Flags of `mpreg bench rpc` and `mpreg bench cache`: timed scenarios on one machine.
#[derive(Debug, clap::Args)]
pub struct ScenarioBenchArgs {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Leave thread placement to the OS scheduler (default: servers on one CPU, client on
    /// another, via `taskset`).
    #[arg(long)]
    pub no_pin: bool,
    /// Also draw each scenario's latency distribution into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

impl ScenarioBenchArgs {
    /// Draws the latency distributions of `results` into the `--plot` file, if one was given.
    pub(super) fn draw_plot(&self, bench: &str, results: &[ScenarioResult]) -> anyhow::Result<()> {
        if let Some(path) = &self.plot {
            write_latency_svg(path, &format!("mpreg bench {bench}: latency distributions"), results)?;
            eprintln!("plot: {}", path.display());
        }
        Ok(())
    }
}

/// Runs the whole benchmark and prints the report; exit code 0 when every reply was a success.
pub fn rpc(args: ScenarioBenchArgs) -> anyhow::Result<i32> {
    if !args.duration.is_finite() || args.duration <= 0.0 || args.duration > 3600.0 {
        bail!("--duration must be a number of seconds in (0, 3600], got {}", args.duration);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let (results, pinned) = run_scenarios(duration, !args.no_pin)?;
    progress!("idle_rss: spawning `mpreg server start` ...");
    let idle_rss_mb = idle_rss_mb().context("measuring the idle node's resident memory")?;
    progress!(" {idle_rss_mb:.1} MiB\n");
    args.draw_plot("rpc", &results)?;
    let report = Report { duration, results, idle_rss_mb, pinned };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        report.write_table(&mut out)?;
    }
    out.flush()?;
    Ok(0)
}

/// Warm-up before each measured window: lets connections, allocators and caches settle.
pub(super) const WARMUP: Duration = Duration::from_millis(500);
/// Requests kept outstanding on the connection in the pipelined scenarios.
pub(super) const PIPELINE_DEPTH: usize = 64;
/// A scenario that has not finished this long after its window ends is declared stuck.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(10);
/// How long the spawned node may take to print `MPREG_URL=`.
pub(super) const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the spawned node sits idle before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(1);

/// Which server a scenario talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The raw actix-ws echo server.
    Floor,
    /// The real node (node 1 of the 2-node cluster).
    Node,
    /// Node 2 of the 2-node cluster.
    Node2,
}

/// What each request of a scenario asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// `echo(42)`, served by the node the client is connected to.
    Echo,
    /// The tier-1 chain: `add` and `multiply` on cpu, then `model_score` on gpu.
    Chain,
    /// `echo_remote(42)`, served by node 2 only.
    EchoRemote,
    /// `worker_echo(42)`, served by a worker connected to node 1.
    WorkerEcho,
}

/// The tier-1 chain (`model_score(multiply(add(20, 22), 3))`).
const CHAIN_CMDS: &str = r#"[{"name":"sum","fun":"add","args":[20,22],"locs":["cpu"]},{"name":"scaled","fun":"multiply","args":["sum",3],"locs":["cpu"]},{"name":"scored","fun":"model_score","args":["scaled"],"locs":["gpu"]}]"#;
/// What a successful chain reply contains: `model_score(126)`'s score.
const CHAIN_SCORE: &[u8] = b"1.26";
/// The function only node 2 serves.
const REMOTE_FUNCTION: &str = "echo_remote";
/// The function the bench's worker serves.
const WORKER_FUNCTION: &str = "worker_echo";
/// How long the 2-node cluster may take to route both cluster scenarios.
const ROUTABLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Gossip round of the 2-node cluster (fast, so it forms quickly).
const CLUSTER_GOSSIP_S: f64 = 0.1;

/// One row of the benchmark: what to drive and against which floor to compare it.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    target: Target,
    request: Request,
    /// Requests in flight on the connection.
    depth: usize,
    /// The scenario whose calls/s this one is divided by.
    floor: Option<&'static str>,
    /// The scenario whose p50 this one's p50 is divided by, and the target for that ratio.
    p50_baseline: Option<(&'static str, f64)>,
}

/// The sequential single-node RPC, baseline of the cluster scenarios' latency.
const ECHO_SEQ: &str = "rpc_echo_seq";

/// In print order; a floor or baseline comes before the scenario compared to it.
const SCENARIOS: [Scenario; 8] = [
    Scenario {
        name: "raw_ws_echo_seq",
        target: Target::Floor,
        request: Request::Echo,
        depth: 1,
        floor: None,
        p50_baseline: None,
    },
    Scenario {
        name: ECHO_SEQ,
        target: Target::Node,
        request: Request::Echo,
        depth: 1,
        floor: Some("raw_ws_echo_seq"),
        p50_baseline: None,
    },
    Scenario {
        name: "raw_ws_echo_pipelined",
        target: Target::Floor,
        request: Request::Echo,
        depth: PIPELINE_DEPTH,
        floor: None,
        p50_baseline: None,
    },
    Scenario {
        name: "rpc_echo_pipelined",
        target: Target::Node,
        request: Request::Echo,
        depth: PIPELINE_DEPTH,
        floor: Some("raw_ws_echo_pipelined"),
        p50_baseline: None,
    },
    Scenario {
        name: "rpc_worker_seq",
        target: Target::Node,
        request: Request::WorkerEcho,
        depth: 1,
        floor: None,
        p50_baseline: Some((ECHO_SEQ, 2.0)),
    },
    Scenario {
        name: "rpc_worker_pipelined",
        target: Target::Node,
        request: Request::WorkerEcho,
        depth: PIPELINE_DEPTH,
        // Compared with the node's own echo, pipelined alike (target: at least 0.3x).
        floor: Some("rpc_echo_pipelined"),
        p50_baseline: None,
    },
    Scenario {
        name: "rpc_chain_2node",
        target: Target::Node2,
        request: Request::Chain,
        depth: 1,
        floor: None,
        p50_baseline: Some((ECHO_SEQ, 4.0)),
    },
    Scenario {
        name: "rpc_forward_1hop",
        target: Target::Node,
        request: Request::EchoRemote,
        depth: 1,
        floor: None,
        p50_baseline: Some((ECHO_SEQ, 2.5)),
    },
];

/// The figures of one scenario.
#[derive(Debug, Clone)]
pub(super) struct ScenarioResult {
    pub(super) name: &'static str,
    pub(super) calls_per_s: f64,
    pub(super) p50_us: u32,
    pub(super) p99_us: u32,
    /// Replies received inside the measured window.
    calls: usize,
    /// calls/s divided by the floor's calls/s (rpc scenarios only).
    ratio_to_floor: Option<f64>,
    /// p50 divided by the baseline's p50, with the target (cluster scenarios only).
    p50_ratio: Option<P50Ratio>,
    /// (fraction, latency µs) points of the distribution, for `--plot`.
    pub(super) latency_curve: Vec<(f64, u32)>,
}

impl ScenarioResult {
    /// The figures of `sorted` latencies (µs), with no rate or comparison yet.
    pub(super) fn for_plot(name: &'static str, sorted: &[u32]) -> ScenarioResult {
        ScenarioResult {
            name,
            calls_per_s: 0.0,
            p50_us: percentile(sorted, 0.50),
            p99_us: percentile(sorted, 0.99),
            calls: sorted.len(),
            ratio_to_floor: None,
            p50_ratio: None,
            latency_curve: latency_curve(sorted),
        }
    }
}

/// A p50 compared to another scenario's.
#[derive(Debug, Clone, Copy)]
struct P50Ratio {
    baseline: &'static str,
    ratio: f64,
    target: f64,
}

/// Everything the run measured.
struct Report {
    duration: Duration,
    results: Vec<ScenarioResult>,
    idle_rss_mb: f64,
    /// CPUs of the servers and of the client, when pinned.
    pinned: Option<Placement>,
}

impl Report {
    fn to_json(&self) -> serde_json::Value {
        let results: Vec<_> = self
            .results
            .iter()
            .map(|r| {
                let mut row = json!({
                    "name": r.name,
                    "calls_per_s": round1(r.calls_per_s),
                    "p50_us": r.p50_us,
                    "p99_us": r.p99_us,
                    "calls": r.calls,
                    "ratio_to_floor": r.ratio_to_floor.map(round3),
                });
                if let Some(p) = r.p50_ratio {
                    row[format!("p50_ratio_to_{}", p.baseline)] = json!(round3(p.ratio));
                    row["p50_ratio_target"] = json!(p.target);
                    row["p50_ratio_met"] = json!(p.ratio <= p.target);
                }
                row
            })
            .collect();
        json!({
            "results": results,
            "idle_rss_mb": round1(self.idle_rss_mb),
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": WARMUP.as_secs_f64(),
            "pipeline_depth": PIPELINE_DEPTH,
            "pinned": self.pinned.map(|p| json!({"server_cpu": p.server_cpu, "client_cpu": p.client_cpu})),
        })
    }

    fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let placement = match self.pinned {
            Some(p) => format!("servers on CPU {}, client on CPU {}", p.server_cpu, p.client_cpu),
            None => "threads not pinned".to_owned(),
        };
        writeln!(
            out,
            "mpreg bench rpc: {} s per scenario after {} s warm-up, one connection each, {placement}",
            self.duration.as_secs_f64(),
            WARMUP.as_secs_f64()
        )?;
        writeln!(
            out,
            "{:<24}{:>12}{:>10}{:>10}{:>10}   p50 vs {ECHO_SEQ} (target)",
            "scenario", "calls/s", "p50 µs", "p99 µs", "vs floor"
        )?;
        for r in &self.results {
            let ratio = r.ratio_to_floor.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x"));
            let p50 = r.p50_ratio.map_or_else(
                || "-".to_owned(),
                |p| {
                    let verdict = if p.ratio <= p.target { "ok" } else { "MISSED" };
                    format!("{:.2}x (<= {}x, {verdict})", p.ratio, p.target)
                },
            );
            writeln!(
                out,
                "{:<24}{:>12.0}{:>10}{:>10}{:>10}   {p50}",
                r.name, r.calls_per_s, r.p50_us, r.p99_us, ratio
            )?;
        }
        writeln!(
            out,
            "rpc_chain_2node: client on node 2 (model_score/gpu), add+multiply on node 1; \
             rpc_forward_1hop: client on node 1, echo_remote only on node 2; both nodes in this process"
        )?;
        writeln!(out, "idle node resident memory: {:.1} MiB", self.idle_rss_mb)
    }
}

pub(super) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------
// Servers: both live in one actix System (main thread + their worker threads).

/// Starts the floor and the node, runs the client thread against them, stops both.
fn run_scenarios(duration: Duration, pin: bool) -> anyhow::Result<(Vec<ScenarioResult>, Option<Placement>)> {
    actix_rt::System::new().block_on(async move {
        let defaults = Settings::default();
        let floor = EchoServer::start(defaults.workers, defaults.max_frame_bytes.saturating_mul(2))
            .context("starting the raw websocket echo server")?;
        // Node 1: echo (built in) for the single-node scenarios, add+multiply for the chain.
        let settings = Settings {
            port: 0,
            monitoring_enabled: false,
            name: "bench-node1".to_owned(),
            functions: vec!["add".to_owned(), "multiply".to_owned()],
            gossip_interval_s: CLUSTER_GOSSIP_S,
            ..Settings::default()
        };
        let node = NodeBuilder::new(settings).start().await.context("starting node 1")?;
        // Node 2: model_score (gpu) and a function only it serves; joins node 1.
        let settings2 = Settings {
            port: 0,
            monitoring_enabled: false,
            name: "bench-node2".to_owned(),
            functions: vec!["model_score".to_owned()],
            peers: vec![node.url().to_owned()],
            gossip_interval_s: CLUSTER_GOSSIP_S,
            ..Settings::default()
        };
        let node2 = match NodeBuilder::new(settings2)
            .function(FunctionSpec::sync(REMOTE_FUNCTION, |v: Value| v).inline())
            .start()
            .await
        {
            Ok(node2) => node2,
            Err(e) => {
                stop(&node, &floor).await;
                return Err(anyhow::Error::new(e).context("starting node 2"));
            }
        };
        let urls = Urls { floor: floor.url.clone(), node: node.url().to_owned(), node2: node2.url().to_owned() };
        progress!("waiting for the 2-node cluster to route the chain and echo_remote ...");
        let started = Instant::now();
        if let Err(e) = wait_routable(&urls).await {
            progress!("\n");
            node2.shutdown().await;
            stop(&node, &floor).await;
            return Err(e);
        }
        progress!(" {:.2} s\n", started.elapsed().as_secs_f64());
        // The servers' worker threads start when their futures are first polled: let them
        // run before the client thread pins every other thread of the process.
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        // The client gets its own thread so it never shares a runtime with a server; the
        // result comes back over a channel so the main thread (which hosts the node's
        // supervised actors) is never blocked.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let client = std::thread::Builder::new()
            .name("bench-client".to_owned())
            .spawn(move || drop(tx.send(run_client(&urls, duration, pin))))
            .context("starting the client thread")?;
        let outcome = rx.await.context("the client thread died");
        drop(client.join());
        node2.shutdown().await;
        stop(&node, &floor).await;
        outcome?
    })
}

/// Polls, through a `Client` on each entry node, until the chain answers on node 2 and
/// `echo_remote` answers on node 1 (bounded by `ROUTABLE_TIMEOUT`).
async fn wait_routable(urls: &Urls) -> anyhow::Result<()> {
    let deadline = Instant::now() + ROUTABLE_TIMEOUT;
    let entry2 = Client::connect(&urls.node2).await.context("connecting to node 2")?;
    let entry1 = Client::connect(&urls.node).await.context("connecting to node 1")?;
    let chain: Vec<RpcCommand> = serde_json::from_str(CHAIN_CMDS).context("the chain's commands")?;
    let outcome = async {
        loop {
            let chain_ok = matches!(entry2.request(chain.clone()).await, Ok(r) if r["scored"]["score"] == json!(1.26));
            let remote_ok = entry1.call(REMOTE_FUNCTION, vec![json!(42)]).await.ok() == Some(json!(42));
            if chain_ok && remote_ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the 2-node cluster did not route within {} s (chain: {chain_ok}, echo_remote: {remote_ok})",
                    ROUTABLE_TIMEOUT.as_secs()
                );
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    entry1.close().await;
    entry2.close().await;
    outcome
}

async fn stop(node: &Node, floor: &EchoServer) {
    node.shutdown().await;
    floor.handle.stop(true).await;
}

/// The floor: actix-web + actix-ws, configured like the node's listener, echoing frames.
struct EchoServer {
    url: String,
    handle: actix_web::dev::ServerHandle,
}

impl EchoServer {
    /// Binds 127.0.0.1:0 and serves with `workers` threads (must run inside an actix System).
    fn start(workers: usize, max_frame: usize) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let server = HttpServer::new(move || {
            App::new().app_data(web::Data::new(MaxFrame(max_frame))).default_service(web::to(echo_entry))
        })
        .workers(workers.max(1))
        // As the node's listener: the floor must use the same socket options.
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .context("listening")?
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Ok(EchoServer { url: format!("ws://{addr}"), handle })
    }
}

/// The frame size limit the node's listener uses, so both parse frames the same way.
struct MaxFrame(usize);

async fn echo_entry(
    req: HttpRequest,
    body: web::Payload,
    max_frame: web::Data<MaxFrame>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, mut session, stream) = actix_ws::handle(&req, body)?;
    let limit = max_frame.0;
    let mut stream = stream.max_frame_size(limit).aggregate_continuations().max_continuation_size(limit);
    actix_rt::spawn(async move {
        while let Some(Ok(message)) = stream.recv().await {
            let sent = match message {
                AggregatedMessage::Binary(bytes) => session.binary(bytes).await,
                AggregatedMessage::Text(text) => session.text(text).await,
                AggregatedMessage::Ping(payload) => session.pong(&payload).await,
                AggregatedMessage::Pong(_) => Ok(()),
                AggregatedMessage::Close(_) => break,
            };
            if sent.is_err() {
                return;
            }
        }
        drop(session.close(None).await);
    });
    Ok(response)
}

// ---------------------------------------------------------------------------------------
// Client: one thread, current-thread runtime, raw websocket, pre-encoded frames.

/// Where the client connects.
struct Urls {
    floor: String,
    node: String,
    node2: String,
}

/// Runs every scenario in order on this (new) thread.
fn run_client(urls: &Urls, duration: Duration, pin: bool) -> anyhow::Result<(Vec<ScenarioResult>, Option<Placement>)> {
    let pinned = if pin {
        match Placement::apply() {
            Ok(placement) => {
                progress!("pinned: servers on CPU {}, client on CPU {}\n", placement.server_cpu, placement.client_cpu);
                Some(placement)
            }
            Err(e) => {
                eprintln!("not pinned ({e:#}): sequential figures may jump between runs");
                None
            }
        }
    } else {
        None
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("building the client runtime")?;
    let worker = BenchWorker::start(&urls.node)?;
    let results = run_all(&runtime, urls, duration);
    worker.stop();
    Ok((results?, pinned))
}

/// Every scenario in order, on the client's runtime.
fn run_all(runtime: &tokio::runtime::Runtime, urls: &Urls, duration: Duration) -> anyhow::Result<Vec<ScenarioResult>> {
    let mut results: Vec<ScenarioResult> = Vec::with_capacity(SCENARIOS.len());
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        progress!("[{}/{}] {} ", i + 1, SCENARIOS.len(), scenario.name);
        let url = match scenario.target {
            Target::Floor => &urls.floor,
            Target::Node => &urls.node,
            Target::Node2 => &urls.node2,
        };
        let budget = WARMUP + duration + STUCK_AFTER;
        let measurement = runtime
            .block_on(async { tokio::time::timeout(budget, drive(url, scenario, duration)).await })
            .with_context(|| format!("{}: no progress for {} s", scenario.name, STUCK_AFTER.as_secs()))?
            .with_context(|| format!("{} against {url}", scenario.name))?;
        if measurement.errors > 0 {
            bail!(
                "{}: {} error replies; first: {}",
                scenario.name,
                measurement.errors,
                measurement.first_error.as_deref().unwrap_or("?")
            );
        }
        let mut result = measurement.into_result(scenario.name, duration);
        result.ratio_to_floor = scenario.floor.and_then(|floor| {
            let floor = results.iter().find(|r| r.name == floor)?;
            (floor.calls_per_s > 0.0).then(|| result.calls_per_s / floor.calls_per_s)
        });
        result.p50_ratio = scenario.p50_baseline.and_then(|(baseline, target)| {
            let base = results.iter().find(|r| r.name == baseline)?;
            (base.p50_us > 0).then(|| P50Ratio {
                baseline,
                ratio: f64::from(result.p50_us) / f64::from(base.p50_us),
                target,
            })
        });
        progress!(" {:.0} calls/s\n", result.calls_per_s);
        results.push(result);
    }
    Ok(results)
}

/// The Rust worker serving `worker_echo` on node 1: its own thread and runtime, started
/// from the client's thread after pinning, so it runs on the client's CPU, as a worker
/// process would on the core the node does not use.
struct BenchWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl BenchWorker {
    fn start(node_url: &str) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, registered) = std::sync::mpsc::channel::<Result<(), String>>();
        let url = node_url.to_owned();
        let thread = std::thread::Builder::new()
            .name("bench-worker".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => return drop(ready.send(Err(e.to_string()))),
                };
                runtime.block_on(async move {
                    let spec = FunctionSpec::sync(WORKER_FUNCTION, |v: Value| v).inline();
                    match Worker::new(&url, "bench-worker").function(spec).start().await {
                        Ok(worker) => {
                            let _ = ready.send(Ok(()));
                            let _ = stopped.await;
                            worker.goodbye().await;
                        }
                        Err(e) => drop(ready.send(Err(e.to_string()))),
                    }
                });
            })
            .context("starting the bench worker's thread")?;
        match registered.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(())) => Ok(BenchWorker { stop, thread }),
            Ok(Err(e)) => bail!("the bench worker did not register: {e}"),
            Err(_) => bail!("the bench worker did not register within {} s", STARTUP_TIMEOUT.as_secs()),
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Where the threads run during the scenarios.
///
/// Left to itself, the scheduler sometimes keeps the client and the server worker on one
/// CPU (a wake-up is then a cheap local switch) and sometimes splits them (each wake-up
/// crosses CPUs), which moves sequential latency between ~20 and ~60 µs from one run to
/// the next. Pinning makes every scenario pay the cross-CPU wake-up a remote client
/// causes, and leaves the client a CPU of its own.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    pub(super) server_cpu: usize,
    pub(super) client_cpu: usize,
}

impl Placement {
    /// Pins every thread of this process to the first allowed CPU, then the calling
    /// thread to the second. Threads created later inherit their creator's CPU.
    pub(super) fn apply() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let cpus = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .and_then(|list| parse_cpu_list(list.trim()))
            .context("no readable Cpus_allowed_list in /proc/self/status")?;
        let [server_cpu, client_cpu, ..] = cpus[..] else { bail!("only one CPU is available") };
        let me = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
        let tid = me.file_name().and_then(|name| name.to_str()).context("unexpected /proc/thread-self link")?;
        taskset(&["-a", "-p", "-c", &server_cpu.to_string(), &std::process::id().to_string()])?;
        taskset(&["-p", "-c", &client_cpu.to_string(), tid])?;
        Ok(Placement { server_cpu, client_cpu })
    }
}

/// Runs `taskset ARGS` (util-linux), quietly.
fn taskset(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// A kernel CPU list (`0-3,6`) in ascending order.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => cpus.extend(first.parse::<usize>().ok()?..=last.parse().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// The client's connection type.
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one scenario's connection observed.
#[derive(Debug, Default)]
pub(super) struct Measurement {
    /// Latencies (µs) of the replies received inside the measured window.
    latencies_us: Vec<u32>,
    /// Replies that were not a success (warm-up included).
    pub(super) errors: u64,
    /// The first such reply, shortened.
    pub(super) first_error: Option<String>,
}

impl Measurement {
    pub(super) fn into_result(mut self, name: &'static str, window: Duration) -> ScenarioResult {
        self.latencies_us.sort_unstable();
        let mut result = ScenarioResult::for_plot(name, &self.latencies_us);
        result.calls_per_s = result.calls as f64 / window.as_secs_f64();
        result
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub(super) fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Connects, keeps `scenario.depth` requests outstanding through warm-up and the measured
/// window, then drains what is still in flight.
async fn drive(url: &str, scenario: &Scenario, duration: Duration) -> anyhow::Result<Measurement> {
    let check = match (scenario.target, scenario.request) {
        (Target::Floor, _) => ReplyCheck::Echo,
        (_, Request::Chain) => ReplyCheck::RpcSuccessWith(CHAIN_SCORE),
        (_, _) => ReplyCheck::RpcSuccess,
    };
    let mut measurements =
        drive_templates(url, vec![(RequestTemplate::new(scenario.request), check)], scenario.depth, duration).await?;
    Ok(measurements.remove(0))
}

/// [`drive`] for request frames of any role, taking turns on one connection (request `i`
/// is `frames[i % frames.len()]`), one [`Measurement`] per frame. Each frame is its JSON
/// text with `"u":"0000000000000000"` (16 digits), patched per request. Taking turns puts
/// two requests under the same conditions, so their ratio does not drift with the machine.
pub(super) async fn drive_frames(
    url: &str,
    frames: Vec<(String, ReplyCheck)>,
    depth: usize,
    duration: Duration,
) -> anyhow::Result<Vec<Measurement>> {
    let templates = frames
        .into_iter()
        .map(|(frame, check)| Ok((RequestTemplate::from_text(frame)?, check)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    drive_templates(url, templates, depth, duration).await
}

async fn drive_templates(
    url: &str,
    templates: Vec<(RequestTemplate, ReplyCheck)>,
    depth: usize,
    duration: Duration,
) -> anyhow::Result<Vec<Measurement>> {
    if templates.is_empty() {
        bail!("no request to send");
    }
    // Nagle off on the client: a small frame written while earlier ones are unacknowledged
    // must not wait for an ACK (the server side is left as the node configures it).
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut driver = Driver::new(ws, templates, depth, duration);
    let outcome = driver.run(depth).await;
    // Best effort: the measurement is complete whether or not the close handshake is.
    drop(driver.ws.close(None).await);
    outcome.map(|()| driver.measurements)
}

/// How a reply is judged.
#[derive(Debug, Clone, Copy)]
pub(super) enum ReplyCheck {
    /// The echo server returns the request: same length.
    Echo,
    /// The node answered without error.
    RpcSuccess,
    /// The node answered without error, and the reply contains these bytes.
    RpcSuccessWith(&'static [u8]),
}

/// The measured window, after warm-up.
struct Window {
    start: Instant,
    end: Instant,
}

/// The state of one scenario's connection.
struct Driver {
    ws: Ws,
    /// The requests and the checks of their replies, taking turns by sequence number.
    templates: Vec<(RequestTemplate, ReplyCheck)>,
    /// Send time by request sequence number (the `u`).
    outstanding: HashMap<u64, Instant>,
    next_seq: u64,
    window: Window,
    next_dot: Instant,
    /// One per template.
    measurements: Vec<Measurement>,
}

impl Driver {
    fn new(ws: Ws, templates: Vec<(RequestTemplate, ReplyCheck)>, depth: usize, duration: Duration) -> Self {
        let now = Instant::now();
        let start = now + WARMUP;
        let expected = (duration.as_secs_f64() * 200_000.0).min(50_000_000.0) as usize / templates.len().max(1);
        let measurements = templates
            .iter()
            .map(|_| Measurement { latencies_us: Vec::with_capacity(expected), ..Measurement::default() })
            .collect();
        Driver {
            ws,
            templates,
            outstanding: HashMap::with_capacity(depth * 2),
            next_seq: 0,
            window: Window { start, end: start + duration },
            next_dot: now + Duration::from_secs(1),
            measurements,
        }
    }

    async fn run(&mut self, depth: usize) -> anyhow::Result<()> {
        for _ in 0..depth {
            self.feed_request().await?;
        }
        self.ws.flush().await.context("sending requests")?;
        while !self.outstanding.is_empty() {
            let message = self.ws.next().await.context("the server closed the connection")?;
            let mut replies = self.on_message(message.context("reading a reply")?)?;
            // Take every reply already buffered before writing: one write for a batch of
            // requests, as any pipelining client does (only matters with depth > 1).
            while !self.outstanding.is_empty() {
                match self.ws.next().now_or_never() {
                    Some(Some(message)) => replies += self.on_message(message.context("reading a reply")?)?,
                    Some(None) => bail!("the server closed the connection"),
                    None => break,
                }
            }
            let now = Instant::now();
            self.tick(now);
            if now < self.window.end && replies > 0 {
                for _ in 0..replies {
                    self.feed_request().await?;
                }
                self.ws.flush().await.context("sending requests")?;
            }
        }
        Ok(())
    }

    /// Queues the next request (written on the next flush).
    async fn feed_request(&mut self) -> anyhow::Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = self.template_of(seq).0.frame(seq);
        self.outstanding.insert(seq, Instant::now());
        self.ws.feed(Message::Binary(frame)).await.context("sending a request")
    }

    /// Records one incoming frame; returns 1 when it answered a request, else 0.
    fn on_message(&mut self, message: Message) -> anyhow::Result<usize> {
        let now = Instant::now();
        let bytes: &[u8] = match &message {
            Message::Binary(bytes) => bytes,
            Message::Text(text) => text.as_bytes(),
            Message::Close(frame) => bail!("the server closed the connection: {frame:?}"),
            // Pings are answered by tungstenite on the next flush.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(0),
        };
        // A reply we cannot match would leave its request outstanding forever: stop here.
        let seq = reply_seq(bytes).with_context(|| format!("a reply without a readable u: {}", preview(bytes)))?;
        let sent =
            self.outstanding.remove(&seq).with_context(|| format!("a reply for an unknown u: {}", preview(bytes)))?;
        let (template, check) = self.template_of(seq);
        let ok = match *check {
            ReplyCheck::Echo => bytes.len() == template.len(),
            ReplyCheck::RpcSuccess => find(bytes, br#""error":null"#).is_some(),
            ReplyCheck::RpcSuccessWith(needle) => {
                find(bytes, br#""error":null"#).is_some() && find(bytes, needle).is_some()
            }
        };
        let measurement = &mut self.measurements[Self::turn(seq, self.templates.len())];
        if !ok {
            measurement.errors += 1;
            measurement.first_error.get_or_insert_with(|| preview(bytes));
        }
        if now >= self.window.start && now <= self.window.end {
            let micros = u32::try_from(now.duration_since(sent).as_micros()).unwrap_or(u32::MAX);
            measurement.latencies_us.push(micros);
        }
        Ok(1)
    }

    /// Which template request `seq` uses.
    fn turn(seq: u64, templates: usize) -> usize {
        (seq % templates as u64) as usize
    }

    fn template_of(&self, seq: u64) -> &(RequestTemplate, ReplyCheck) {
        &self.templates[Self::turn(seq, self.templates.len())]
    }

    /// One dot on stderr per second of scenario time.
    fn tick(&mut self, now: Instant) {
        if now >= self.next_dot {
            progress!(".");
            self.next_dot += Duration::from_secs(1);
        }
    }
}

/// An RPC request, encoded once; each request patches only its `u` digits.
struct RequestTemplate {
    bytes: Vec<u8>,
    /// Where the `U_DIGITS` hex digits of `u` start.
    u_at: usize,
}

/// Fixed width, so every frame has the same size.
const U_DIGITS: usize = 16;
/// What precedes the `u` value in requests and in the node's replies.
const U_KEY: &[u8] = br#""u":""#;

impl RequestTemplate {
    /// `echo(42)`.
    #[cfg(test)]
    fn echo() -> Self {
        Self::new(Request::Echo)
    }

    fn new(request: Request) -> Self {
        let u = "0".repeat(U_DIGITS);
        let cmds = match request {
            Request::Echo => r#"[{"name":"e","fun":"echo","args":[42]}]"#.to_owned(),
            Request::EchoRemote => format!(r#"[{{"name":"e","fun":"{REMOTE_FUNCTION}","args":[42]}}]"#),
            Request::WorkerEcho => format!(r#"[{{"name":"e","fun":"{WORKER_FUNCTION}","args":[42]}}]"#),
            Request::Chain => CHAIN_CMDS.to_owned(),
        };
        let text = format!(r#"{{"role":"rpc","u":"{u}","cmds":{cmds}}}"#);
        let bytes = text.into_bytes();
        // The key is in the literal just built, so this cannot miss.
        let u_at = find(&bytes, U_KEY).map_or(0, |at| at + U_KEY.len());
        RequestTemplate { bytes, u_at }
    }

    /// A template from a whole frame's text holding `"u":"` and 16 digits.
    fn from_text(text: String) -> anyhow::Result<Self> {
        let bytes = text.into_bytes();
        let u_at = find(&bytes, U_KEY).map(|at| at + U_KEY.len()).context("the frame has no \"u\":\"")?;
        if bytes.len() < u_at + U_DIGITS {
            bail!("the frame's u is shorter than {U_DIGITS} digits");
        }
        Ok(RequestTemplate { bytes, u_at })
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The request frame whose `u` is `seq` in hex.
    fn frame(&self, seq: u64) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        write_hex(&mut bytes[self.u_at..self.u_at + U_DIGITS], seq);
        bytes
    }
}

/// The sequence number in a reply's `u` (node reply or echoed request).
fn reply_seq(frame: &[u8]) -> Option<u64> {
    let at = find(frame, U_KEY)? + U_KEY.len();
    parse_hex(frame.get(at..at + U_DIGITS)?)
}

fn write_hex(dst: &mut [u8], mut value: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for digit in dst.iter_mut().rev() {
        *digit = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &b| Some(acc << 4 | u64::from(char::from(b).to_digit(16)?)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The start of a frame, for error messages.
fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Idle memory: a real `mpreg server start` process, read from /proc.

/// Kills the spawned node however the measurement ends.
pub(super) struct ChildGuard(pub(super) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// Spawns a node process from `command` (stdin and stderr closed, stdout piped). A thread
/// reads its stdout until it exits (closing the pipe early would make the node's next line
/// fail and stop it) and sends what `pick` makes of each line to `lines`.
pub(super) fn spawn_node<T: Send + 'static>(
    command: &mut Command,
    lines: std::sync::mpsc::Sender<T>,
    pick: impl Fn(String) -> Option<T> + Send + 'static,
) -> anyhow::Result<ChildGuard> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", command.get_program().to_string_lossy()))?;
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().context("the node's stdout was not captured")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(picked) = pick(line) {
                drop(lines.send(picked));
            }
        }
    });
    Ok(child)
}

/// Spawns this binary as a node, waits for it to listen and sit idle, returns its VmRSS
/// in MiB.
fn idle_rss_mb() -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("locating the mpreg binary")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut command = Command::new(&exe);
    command.args(["server", "start", "--port", "0", "--monitoring-port", "0", "--functions", "demo"]);
    let mut child = spawn_node(&mut command, tx, |line| line.starts_with("MPREG_URL=").then_some(line))?;
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(_) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("the node printed no MPREG_URL= within {} s", STARTUP_TIMEOUT.as_secs())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.0.wait().context("waiting for the node")?;
            bail!("the node exited before printing MPREG_URL= ({status})")
        }
    }
    std::thread::sleep(IDLE_SETTLE);
    let path = format!("/proc/{}/status", child.0.id());
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = status_kib(&status, "VmRSS").with_context(|| format!("no VmRSS line in {path}"))?;
    Ok(kib as f64 / 1024.0)
}

/// A `Field:   12345 kB` figure of a /proc status file (`VmRSS`, `RssAnon`).
pub(super) fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_sequence_number_and_keep_their_size() {
        let template = RequestTemplate::echo();
        let frame = template.frame(0xabc);
        assert_eq!(frame.len(), template.len());
        assert_eq!(reply_seq(&frame), Some(0xabc));
        let parsed: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(parsed["u"], "0000000000000abc");
        assert_eq!(parsed["cmds"][0]["fun"], "echo");
    }

    #[test]
    fn cluster_templates_are_valid_requests() {
        let chain = RequestTemplate::new(Request::Chain).frame(7);
        let parsed: serde_json::Value = serde_json::from_slice(&chain).unwrap();
        assert_eq!(parsed["cmds"].as_array().map(Vec::len), Some(3));
        assert_eq!(parsed["cmds"][2]["locs"], json!(["gpu"]));
        assert_eq!(reply_seq(&chain), Some(7));
        let remote = RequestTemplate::new(Request::EchoRemote).frame(9);
        let parsed: serde_json::Value = serde_json::from_slice(&remote).unwrap();
        assert_eq!(parsed["cmds"][0]["fun"], REMOTE_FUNCTION);
        let cmds: Vec<RpcCommand> = serde_json::from_str(CHAIN_CMDS).unwrap();
        assert_eq!(cmds.len(), 3);
    }

    #[test]
    fn node_replies_are_matched_by_u() {
        let reply = br#"{"r":{"e":42},"error":null,"u":"00000000000000ff","intermediate_results":[]}"#;
        assert_eq!(reply_seq(reply), Some(255));
        assert_eq!(reply_seq(br#"{"u":"12"}"#), None);
        assert_eq!(reply_seq(br#"{"u":"zzzzzzzzzzzzzzzz"}"#), None);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn cpu_lists_expand_ranges() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn figures_are_read_from_proc_status() {
        let status = "Name:\tmpreg\nVmRSS:\t   12345 kB\nRssAnon:\t  2048 kB\nVmData: 1 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(12345));
        assert_eq!(status_kib(status, "RssAnon"), Some(2048));
        assert_eq!(status_kib(status, "Rss"), None);
        assert_eq!(status_kib("Name:\tmpreg\n", "VmRSS"), None);
    }
}
