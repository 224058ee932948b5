//! `mpreg bench cluster`: how an N-process cluster forms, spreads a registration, notices
//! a dead node, and what each node costs in memory.
//!
//! Everything runs at default settings (or those of `--node-config`) except ports (0) and
//! names (`n0` .. `nN-1`); each node is polled every 20 ms (status) and 2 ms (probe) up to
//! 8 nodes, less often beyond in proportion to N:
//! - N `mpreg server start` processes of this binary are spawned, `n0` first, the others
//!   with `--peer <n0>`; mesh formation is the time from the first spawn until every
//!   node's `cluster-status` lists all N nodes alive;
//! - each process's VmRSS is read right after the mesh formed;
//! - settling: the time until one round of polls finds no process with updates still to
//!   pass on (`topology.pending_updates`: the joins' SWIM rumors, member records and
//!   entry sets, each retransmitted a bounded number of times), and the CPU meanwhile;
//! - idle cost: then, over a 5 s window with no client traffic, the CPU time of all N processes
//!   together (`/proc/<pid>/stat`, percent of one core), the bytes they wrote
//!   (`/proc/<pid>/io` `wchar`: peer links, plus logs, which are quiet at idle) per node
//!   per second, and the suspicions they raised (`topology.suspicions`; none is right);
//! - silent failure: the last process gets SIGSTOP; the others' views are polled until none
//!   shows it alive (suspected everywhere); then SIGCONT, until all show it alive again
//!   (it refuted the suspicion with a higher incarnation);
//! - registration propagation: this process starts its own node (the registrar, in
//!   process, `NodeBuilder` with `peers = [n0]`); once every process sees it alive, it
//!   registers `probe_fn` at t0 while one client per process calls `probe_fn` until it
//!   answers; the figure is the time until all N processes route it;
//! - failure detection: the last process gets SIGKILL; the others' `cluster-status` is
//!   polled until none shows it alive (suspected everywhere), then until it is gone from
//!   every view (removed everywhere).
//!
//! Progress goes to stderr so that stdout holds only the table or the JSON object.

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::runtime::Handle;

use super::bench::{round1, spawn_node, status_kib, ChildGuard, STARTUP_TIMEOUT};
use super::bench_plot::{convergence_curve, write_cdf_svg};
use crate::client::Client;
use crate::config::Settings;
use crate::node::NodeBuilder;
use crate::FunctionSpec;

/// Flags of `mpreg bench cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterBenchArgs {
    /// Node processes to start.
    #[arg(long, default_value_t = 16)]
    pub nodes: usize,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw convergence over time (new function routable, failure suspected and
    /// removed, per node) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// A settings file every node process starts with (`server start --config`); ports,
    /// names and the peer still come from the bench. Default: default settings.
    #[arg(long, value_name = "FILE.toml")]
    pub node_config: Option<std::path::PathBuf>,
}

/// Pause between `cluster-status` polls of one node, up to 8 nodes (see [`Pacing`]).
const STATUS_POLL: Duration = Duration::from_millis(20);
/// Pause between failed `probe_fn` calls on one node, up to 8 nodes (see [`Pacing`]).
const PROBE_POLL: Duration = Duration::from_millis(2);
/// Nodes polled at the base pauses; beyond, the pauses grow with N.
const POLLED_AT_BASE_PACE: usize = 8;

/// Pauses between polls of one node, stretched in proportion to N beyond 8 nodes, so all
/// pollers together send about the same requests a second whatever N: every
/// `cluster-status` answer lists every node and every function, so polling 64 nodes every
/// 20 ms (3,200 answers of ~40 KB a second) would load the machine the bench measures.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    status: Duration,
    probe: Duration,
}

impl Pacing {
    fn for_nodes(n: usize) -> Self {
        let factor = u32::try_from(n.div_ceil(POLLED_AT_BASE_PACE).max(1)).unwrap_or(u32::MAX);
        Pacing { status: STATUS_POLL * factor, probe: PROBE_POLL * factor }
    }
}
/// Bound on mesh formation and on the registrar joining.
const MESH_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on registration propagation.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on failure detection, beyond `remove_after_s`.
const FAILURE_SLACK: Duration = Duration::from_secs(30);
/// Registration propagation target at default settings.
const PROPAGATION_TARGET: Duration = Duration::from_secs(1);
/// The function the registrar registers.
const PROBE_FUNCTION: &str = "probe_fn";
/// The in-process registrar node's name.
const REGISTRAR: &str = "bench-registrar";
/// The idle window.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Bound on the joins being spread after the mesh formed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Targets of issue 10 at 64 nodes, shown beside the figures.
const IDLE_CPU_TARGET_PERCENT: f64 = 40.0;
/// See [`IDLE_CPU_TARGET_PERCENT`].
const SILENT_SUSPECTED_TARGET: Duration = Duration::from_secs(3);

/// Runs the whole benchmark and prints the report.
pub fn cluster(args: ClusterBenchArgs) -> anyhow::Result<i32> {
    if !(2..=256).contains(&args.nodes) {
        bail!("--nodes must be in 2..=256, got {}", args.nodes);
    }
    // The pollers run on their own runtime, so that polling never delays the registrar
    // node's actors (which live on this thread's actix System).
    let pollers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-poller")
        .enable_all()
        .build()
        .context("building the poller runtime")?;
    let handle = pollers.handle().clone();
    let settings = match &args.node_config {
        Some(path) => Settings::from_toml_file(path)?,
        None => Settings::default(),
    };
    let report = actix_rt::System::new().block_on(run(args.nodes, settings, args.node_config.as_deref(), handle));
    drop(pollers);
    let report = report?;
    if let Some(path) = &args.plot {
        report.plot(path)?;
        eprintln!("plot: {}", path.display());
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        report.write_table(&mut out)?;
    }
    out.flush()?;
    Ok(0)
}

impl Report {
    /// Convergence over time into the SVG file `path`: per node, when the new function
    /// became routable, and when the killed node was suspected and removed.
    fn plot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let suspected: Vec<Duration> = self.failure.iter().map(|f| f.0).collect();
        let removed: Vec<Duration> = self.failure.iter().map(|f| f.1).collect();
        let curves = [
            ("function routable, after register".to_owned(), convergence_curve(&self.propagation)),
            (format!("{} suspected, after kill -9", self.victim), convergence_curve(&suspected)),
            (format!("{} removed, after kill -9", self.victim), convergence_curve(&removed)),
        ];
        let title = format!("mpreg bench cluster --nodes {}: convergence", self.nodes);
        write_cdf_svg(path, &title, "time (ms, log scale)", "fraction of nodes", &curves)
    }
}

/// One spawned `mpreg server start`.
struct Process {
    name: String,
    url: String,
    child: ChildGuard,
}

/// Everything the run measured.
struct Report {
    nodes: usize,
    mesh_formed: Duration,
    registrar_joined: Duration,
    /// Per process, from t0 (the `register` call) to its first successful `probe_fn`.
    propagation: Vec<Duration>,
    /// How long `Node::register` itself took.
    register_call: Duration,
    victim: String,
    settling: Settling,
    idle: Idle,
    /// After SIGSTOP of `victim`: until the first other process no longer shows it alive
    /// (detection), and until none does (detection and dissemination).
    silent_suspected_first: Duration,
    silent_suspected_everywhere: Duration,
    /// After SIGCONT: until every other process shows it alive again.
    silent_refuted_everywhere: Duration,
    suspected_everywhere: Duration,
    removed_everywhere: Duration,
    /// Per surviving process, from the kill to its suspecting and to its removing the victim.
    failure: Vec<(Duration, Duration)>,
    /// VmRSS of each process after the mesh formed, MiB.
    rss_mib: Vec<f64>,
    /// Its private part (RssAnon, MiB): the rest is mostly the binary's code, which the
    /// processes share.
    anon_mib: Vec<f64>,
    /// Its proportional share (Pss, MiB): private pages plus each shared page divided by
    /// the processes that map it.
    pss_mib: Vec<f64>,
    settings: Settings,
    /// Pauses between polls of one node.
    pace: Pacing,
}

/// The mean of `values` (0 for none).
fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// What the N processes cost over the idle window.
struct Idle {
    /// CPU of all processes together, percent of one core.
    cpu_percent: f64,
    /// Bytes written per process per second.
    bytes_per_node_per_s: f64,
    /// Suspicions raised by any process during the window.
    false_suspicions: u64,
}

impl Report {
    fn propagation_all(&self) -> Duration {
        self.propagation.iter().copied().max().unwrap_or_default()
    }

    fn rss_max(&self) -> f64 {
        self.rss_mib.iter().copied().fold(0.0, f64::max)
    }

    fn to_json(&self) -> Value {
        let all = self.propagation_all();
        json!({
            "nodes": self.nodes,
            "mesh_formation_ms": ms(self.mesh_formed),
            "registration_propagation": {
                "registrar": "in-process node of the bench (NodeBuilder, peers = [n0]), not one of the N processes",
                "registrar_joined_everywhere_ms": ms(self.registrar_joined),
                "all_routable_ms": ms(all),
                "per_node_median_ms": ms(median(&self.propagation)),
                "per_node_max_ms": ms(all),
                "per_node_min_ms": ms(self.propagation.iter().copied().min().unwrap_or_default()),
                "register_call_ms": ms(self.register_call),
                "target_ms": ms(PROPAGATION_TARGET),
                "target_met": all <= PROPAGATION_TARGET,
                "probe_poll_ms": ms(self.pace.probe),
            },
            "settled_after_mesh_ms": ms(self.settling.took),
            "settling_cpu_percent": round1(self.settling.cpu_percent),
            "idle_window_s": IDLE_WINDOW.as_secs(),
            "idle_cpu_percent": round1(self.idle.cpu_percent),
            "idle_cpu_target_percent": IDLE_CPU_TARGET_PERCENT,
            "idle_bytes_per_node_per_s": self.idle.bytes_per_node_per_s.round(),
            "false_suspicions": self.idle.false_suspicions,
            "failure_detection": {
                "victim": self.victim,
                "silent_signal": "SIGSTOP, then SIGCONT",
                "silent_suspected_first_ms": ms(self.silent_suspected_first),
                "silent_suspected_everywhere_ms": ms(self.silent_suspected_everywhere),
                "silent_suspected_target_ms": ms(SILENT_SUSPECTED_TARGET),
                "silent_refuted_everywhere_ms": ms(self.silent_refuted_everywhere),
                "signal": "SIGKILL",
                "suspected_everywhere_ms": ms(self.suspected_everywhere),
                "removed_everywhere_ms": ms(self.removed_everywhere),
                "suspect_after_s": self.settings.suspect_after_s,
                "probe_interval_s": self.settings.swim_config().period,
                "remove_after_s": self.settings.remove_after_s,
                "status_poll_ms": ms(self.pace.status),
            },
            "memory": {
                "rss_mean_mib": round1(mean(&self.rss_mib)),
                "rss_max_mib": round1(self.rss_max()),
                "anon_mean_mib": round1(mean(&self.anon_mib)),
                "pss_mean_mib": round1(mean(&self.pss_mib)),
                "per_node_mib": self.rss_mib.iter().map(|&m| round1(m)).collect::<Vec<_>>(),
            },
            "settings": {
                "gossip_interval_s": self.settings.gossip_interval_s,
                "peer_fanout": self.settings.peer_fanout,
                "max_inbound_links": self.settings.max_inbound_links,
            },
        })
    }

    fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let all = self.propagation_all();
        let verdict = if all <= PROPAGATION_TARGET { "ok" } else { "MISSED" };
        writeln!(
            out,
            "mpreg bench cluster: {} node processes (gossip {} s, probe {} s, suspect after {} s, remove after {} s, \
             fan-out {}, inbound links <= {})",
            self.nodes,
            self.settings.gossip_interval_s,
            self.settings.swim_config().period,
            self.settings.suspect_after_s,
            self.settings.remove_after_s,
            self.settings.peer_fanout,
            self.settings.max_inbound_links
        )?;
        let rows = [
            ("mesh formed (all N see N alive)", format!("{:.0} ms", ms(self.mesh_formed))),
            ("registrar joined (in every view)", format!("{:.0} ms", ms(self.registrar_joined))),
            (
                "registration routable on all N",
                format!("{:.1} ms (target <= {:.0} ms, {verdict})", ms(all), ms(PROPAGATION_TARGET)),
            ),
            ("  per node median / max", format!("{:.1} / {:.1} ms", ms(median(&self.propagation)), ms(all))),
            ("  register() call itself", format!("{:.2} ms", ms(self.register_call))),
            (
                "suspected everywhere after kill -9",
                format!("{:.0} ms ({} killed)", ms(self.suspected_everywhere), self.victim),
            ),
            ("removed everywhere after kill -9", format!("{:.0} ms", ms(self.removed_everywhere))),
            (
                "RSS per node mean / max",
                format!(
                    "{:.1} / {:.1} MiB (private {:.1} MiB, proportional {:.1} MiB)",
                    mean(&self.rss_mib),
                    self.rss_max(),
                    mean(&self.anon_mib),
                    mean(&self.pss_mib)
                ),
            ),
            (
                "joins spread, after the mesh",
                format!("{:.0} ms ({:.1}% of one core meanwhile)", ms(self.settling.took), self.settling.cpu_percent),
            ),
            (
                "idle CPU, all N together",
                format!("{:.1}% of one core (target <= {IDLE_CPU_TARGET_PERCENT:.0}%)", self.idle.cpu_percent),
            ),
            ("idle bytes written per node", format!("{:.0} B/s", self.idle.bytes_per_node_per_s)),
            ("false suspicions while idle", self.idle.false_suspicions.to_string()),
            (
                "suspected everywhere after SIGSTOP",
                format!(
                    "{:.0} ms (target <= {:.0} ms; first process {:.0} ms)",
                    ms(self.silent_suspected_everywhere),
                    ms(SILENT_SUSPECTED_TARGET),
                    ms(self.silent_suspected_first)
                ),
            ),
            ("alive everywhere after SIGCONT", format!("{:.0} ms", ms(self.silent_refuted_everywhere))),
        ];
        for (what, value) in rows {
            writeln!(out, "{what:<38}{value}")?;
        }
        writeln!(
            out,
            "registrar: an in-process node of this bench (NodeBuilder, peers = [n0]), polled from all {} processes \
             every {} ms",
            self.nodes,
            self.pace.probe.as_millis()
        )
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or_default()
}

async fn run(
    n: usize,
    settings: Settings,
    node_config: Option<&std::path::Path>,
    pollers: Handle,
) -> anyhow::Result<Report> {
    let pace = Pacing::for_nodes(n);
    let exe = std::env::current_exe().context("locating the mpreg binary")?;

    progress!("spawning {n} node processes ...");
    let spawned = Instant::now();
    let (tx, rx) = std_mpsc::channel();
    let mut processes = vec![spawn(&exe, node_config, 0, None, tx.clone())?];
    let url0 = wait_url(&rx, 1)?.remove(&0).context("n0 printed no URL")?;
    processes[0].url = url0.clone();
    for i in 1..n {
        processes.push(spawn(&exe, node_config, i, Some(&url0), tx.clone())?);
    }
    drop(tx);
    for (i, url) in wait_url(&rx, n - 1)? {
        processes[i].url = url;
    }
    progress!(" listening after {:.0} ms\n", ms(spawned.elapsed()));

    // Mesh formation: every process lists all N names, each alive (or itself).
    progress!("waiting for the mesh ...");
    let names: Arc<HashSet<String>> = Arc::new(processes.iter().map(|p| p.name.clone()).collect());
    let urls: Vec<String> = processes.iter().map(|p| p.url.clone()).collect();
    let clients = pollers.spawn(connect_all(urls.clone())).await.context("poller runtime")??;
    let view_names = names.clone();
    let mesh = poll_views(&pollers, &clients, pace.status, spawned, MESH_TIMEOUT, "the mesh to form", move |status| {
        let members = members(status);
        members.len() == view_names.len()
            && members.iter().all(|(name, state)| view_names.contains(*name) && (*state == "alive" || *state == "self"))
    })
    .await?;
    let mesh_formed = max(&mesh);
    progress!(" {:.0} ms\n", ms(mesh_formed));

    let (mut rss_mib, mut anon_mib, mut pss_mib) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for p in &processes {
        let pid = p.child.0.id();
        let mib = |file: &str, field: &str| {
            let path = format!("/proc/{pid}/{file}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            status_kib(&text, field).map(|kib| kib as f64 / 1024.0).with_context(|| format!("no {field} in {path}"))
        };
        rss_mib.push(mib("status", "VmRSS")?);
        anon_mib.push(mib("status", "RssAnon")?);
        pss_mib.push(mib("smaps_rollup", "Pss")?);
    }

    progress!("waiting for the joins to be spread (no node with updates to pass on) ...");
    let settling = settle(&pollers, &clients, &processes, pace.status).await?;
    progress!(" {:.0} ms, {:.1}% of one core\n", ms(settling.took), settling.cpu_percent);

    progress!("idle for {} s ...", IDLE_WINDOW.as_secs());
    let idle = measure_idle(&pollers, &clients, &processes).await?;
    progress!(" {:.1}% of one core, {:.0} B/s per node\n", idle.cpu_percent, idle.bytes_per_node_per_s);

    // The registrar: an in-process node joining through n0.
    progress!("starting the in-process registrar node and waiting for it to join ...");
    let registrar_settings = Settings {
        name: REGISTRAR.to_owned(),
        port: 0,
        monitoring_enabled: false,
        peers: vec![url0.clone()],
        ..Settings::default()
    };
    let joining = Instant::now();
    let registrar = NodeBuilder::new(registrar_settings).start().await.context("starting the registrar node")?;
    let outcome = async {
        let joined =
            poll_views(&pollers, &clients, pace.status, joining, MESH_TIMEOUT, "the registrar to join", |status| {
                members(status).iter().any(|(name, state)| *name == REGISTRAR && *state == "alive")
            })
            .await?;
        let registrar_joined = max(&joined);
        progress!(" {:.0} ms\n", ms(registrar_joined));

        progress!("registering {PROBE_FUNCTION} on the registrar, polling all {n} processes ...");
        let t0 = Instant::now();
        let probes: Vec<_> = clients
            .iter()
            .map(|c| pollers.spawn(probe_until_routable(c.clone(), t0, PROBE_TIMEOUT, pace.probe)))
            .collect();
        registrar
            .register(FunctionSpec::sync(PROBE_FUNCTION, |v: Value| v).inline())
            .await
            .context("registering probe_fn")?;
        let register_call = t0.elapsed();
        let mut propagation = Vec::with_capacity(n);
        for (probe, p) in probes.into_iter().zip(&processes) {
            propagation
                .push(probe.await.context("poller runtime")?.with_context(|| format!("{} ({})", p.name, p.url))?);
        }
        progress!(" {:.1} ms\n", ms(max(&propagation)));
        Ok::<_, anyhow::Error>((registrar_joined, register_call, propagation))
    }
    .await;
    let (registrar_joined, register_call, propagation) = match outcome {
        Ok(figures) => figures,
        Err(e) => {
            registrar.shutdown().await;
            return Err(e);
        }
    };

    // Failure detection: SIGSTOP the last process, then SIGCONT; then SIGKILL it. The
    // other processes' views are watched.
    let victim_index = n - 1;
    let victim = processes[victim_index].name.clone();
    let others: Vec<Client> =
        clients.iter().enumerate().filter(|(i, _)| *i != victim_index).map(|(_, c)| c.clone()).collect();
    let silent = async {
        progress!("SIGSTOP {victim}, waiting until every other process suspects it ...");
        let pid = processes[victim_index].child.0.id();
        let stopped = Instant::now();
        signal(pid, "STOP")?;
        let watched = victim.clone();
        let suspected =
            poll_views(&pollers, &others, pace.status, stopped, MESH_TIMEOUT, "the stopped node to be suspected", {
                move |status| members(status).iter().all(|(name, state)| *name != watched || *state != "alive")
            })
            .await;
        signal(pid, "CONT")?;
        let suspected = suspected?;
        let first = suspected.iter().copied().min().unwrap_or_default();
        let suspected = max(&suspected);
        progress!(" {:.0} ms; SIGCONT, waiting until it is alive everywhere ...", ms(suspected));
        let resumed = Instant::now();
        let watched = victim.clone();
        let refuted =
            poll_views(&pollers, &others, pace.status, resumed, MESH_TIMEOUT, "the resumed node to refute", {
                move |status| members(status).iter().any(|(name, state)| *name == watched && *state == "alive")
            })
            .await?;
        progress!(" {:.0} ms\n", ms(max(&refuted)));
        Ok::<_, anyhow::Error>((first, suspected, max(&refuted)))
    }
    .await;
    let (silent_suspected_first, silent_suspected_everywhere, silent_refuted_everywhere) = match silent {
        Ok(figures) => figures,
        Err(e) => {
            registrar.shutdown().await;
            return Err(e);
        }
    };
    progress!("kill -9 {victim}, waiting until every other process suspects, then removes it ...");
    let survivors = others;
    let killed = Instant::now();
    processes[victim_index].child.0.kill().context("killing the victim")?;
    let bound = Settings::seconds(settings.remove_after_s) + FAILURE_SLACK;
    let failure = {
        let victim = victim.clone();
        let tasks: Vec<_> = survivors
            .iter()
            .map(|c| pollers.spawn(watch_failure(c.clone(), victim.clone(), killed, bound, pace.status)))
            .collect();
        let mut per_node = Vec::with_capacity(tasks.len());
        for task in tasks {
            match task.await.context("poller runtime").and_then(|r| r) {
                Ok(figures) => per_node.push(figures),
                Err(e) => {
                    registrar.shutdown().await;
                    return Err(e);
                }
            }
        }
        per_node
    };
    let suspected_everywhere = failure.iter().map(|f| f.0).max().unwrap_or_default();
    let removed_everywhere = failure.iter().map(|f| f.1).max().unwrap_or_default();
    progress!(" suspected {:.0} ms, removed {:.0} ms\n", ms(suspected_everywhere), ms(removed_everywhere));

    for c in &clients {
        let c = c.clone();
        drop(pollers.spawn(async move { c.close().await }).await);
    }
    registrar.shutdown().await;
    drop(processes);
    Ok(Report {
        nodes: n,
        mesh_formed,
        registrar_joined,
        propagation,
        register_call,
        victim,
        settling,
        idle,
        silent_suspected_first,
        silent_suspected_everywhere,
        silent_refuted_everywhere,
        suspected_everywhere,
        removed_everywhere,
        failure,
        rss_mib,
        anon_mib,
        pss_mib,
        settings,
        pace,
    })
}

/// CPU ticks (user + system) and bytes written so far by process `pid`.
fn process_usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/<pid>/stat")?;
    // The command name may hold spaces: the fields that follow start after its last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // Fields 14 and 15 of stat (utime, stime); `fields` starts at field 3.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).context("no utime/stime in stat");
    let ticks = tick(11)? + tick(12)?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("reading /proc/<pid>/io")?;
    let written = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("no wchar in /proc/<pid>/io")?;
    Ok((ticks, written))
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; Linux's USER_HZ is 100
/// where getconf is missing).
fn clock_ticks_per_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Sends `SIGSTOP`/`SIGCONT`/... (`name`) to `pid` with kill(1).
fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}

/// `topology.<field>` of every process's `cluster-status` (asked of all at once), summed.
async fn topology_sum(pollers: &Handle, clients: &[Client], field: &str) -> anyhow::Result<u64> {
    let asked: Vec<_> = clients
        .iter()
        .map(|client| {
            let client = client.clone();
            pollers.spawn(async move { client.cluster_status_brief().await })
        })
        .collect();
    let mut total = 0;
    for answer in asked {
        let status = answer.await.context("poller runtime")?.context("cluster-status")?;
        total += status["topology"][field].as_u64().with_context(|| format!("no topology.{field}"))?;
    }
    Ok(total)
}

/// `ticks` of CPU time over `elapsed`, in percent of one core.
fn cpu_percent(ticks: u64, elapsed: Duration) -> f64 {
    ticks as f64 / clock_ticks_per_s() / elapsed.as_secs_f64().max(1e-3) * 100.0
}

/// How long after the mesh formed every node had passed on all it learned of the joins,
/// and what the N processes cost meanwhile.
struct Settling {
    took: Duration,
    /// CPU of all processes together, percent of one core.
    cpu_percent: f64,
}

/// The CPU ticks (`/proc/<pid>/stat`) and bytes written (`/proc/<pid>/io`) of all
/// processes together.
fn usage(processes: &[Process]) -> anyhow::Result<(u64, u64)> {
    processes.iter().try_fold((0, 0), |(t, w), p| {
        let (ticks, written) = process_usage(p.child.0.id())?;
        Ok((t + ticks, w + written))
    })
}

/// Polls every process's `topology.pending_updates` until one round finds all of them 0
/// (within [`SETTLE_TIMEOUT`]): the idle window then measures what an idle cluster costs,
/// not the last retransmissions of its formation.
async fn settle(
    pollers: &Handle,
    clients: &[Client],
    processes: &[Process],
    pause: Duration,
) -> anyhow::Result<Settling> {
    let started = Instant::now();
    let (ticks_before, _) = usage(processes)?;
    loop {
        let pending = topology_sum(pollers, clients, "pending_updates").await?;
        if pending == 0 {
            break;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            bail!(
                "{pending} updates still waiting to be passed on {} s after the mesh formed",
                SETTLE_TIMEOUT.as_secs()
            );
        }
        actix_rt::time::sleep(pause).await;
    }
    let (ticks_after, _) = usage(processes)?;
    let took = started.elapsed();
    Ok(Settling { took, cpu_percent: cpu_percent(ticks_after.saturating_sub(ticks_before), took) })
}

/// The processes' CPU, bytes written and suspicions over [`IDLE_WINDOW`] with no traffic
/// from this bench (the window is a measurement, not a wait for something to happen).
async fn measure_idle(pollers: &Handle, clients: &[Client], processes: &[Process]) -> anyhow::Result<Idle> {
    let suspected_before = topology_sum(pollers, clients, "suspicions").await?;
    let (ticks_before, written_before) = usage(processes)?;
    let started = Instant::now();
    actix_rt::time::sleep(IDLE_WINDOW).await;
    let (ticks_after, written_after) = usage(processes)?;
    let elapsed = started.elapsed();
    let window = elapsed.as_secs_f64();
    let suspected_after = topology_sum(pollers, clients, "suspicions").await?;
    Ok(Idle {
        cpu_percent: cpu_percent(ticks_after.saturating_sub(ticks_before), elapsed),
        bytes_per_node_per_s: written_after.saturating_sub(written_before) as f64 / window / processes.len() as f64,
        false_suspicions: suspected_after.saturating_sub(suspected_before),
    })
}

/// Spawns node `i`; its stdout lines are read on a thread that reports `(i, url)`.
fn spawn(
    exe: &std::path::Path,
    config: Option<&std::path::Path>,
    i: usize,
    peer: Option<&str>,
    urls: std_mpsc::Sender<(usize, String)>,
) -> anyhow::Result<Process> {
    let name = format!("n{i}");
    let mut command = Command::new(exe);
    command.args(["server", "start", "--port", "0", "--monitoring-port", "0", "--name", &name]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    if let Some(peer) = peer {
        command.args(["--peer", peer]);
    }
    let child =
        spawn_node(&mut command, urls, move |line| line.strip_prefix("MPREG_URL=").map(|url| (i, url.to_owned())))?;
    Ok(Process { name, url: String::new(), child })
}

/// Waits for `count` URLs (bounded by `STARTUP_TIMEOUT`).
fn wait_url(
    rx: &std_mpsc::Receiver<(usize, String)>,
    count: usize,
) -> anyhow::Result<std::collections::HashMap<usize, String>> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut urls = std::collections::HashMap::new();
    while urls.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, url)) => {
                urls.insert(i, url);
            }
            Err(_) => {
                bail!("{} node(s) printed no MPREG_URL= within {} s", count - urls.len(), STARTUP_TIMEOUT.as_secs())
            }
        }
    }
    Ok(urls)
}

/// One client per URL, each retried until it connects (bounded).
async fn connect_all(urls: Vec<String>) -> anyhow::Result<Vec<Client>> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut clients = Vec::with_capacity(urls.len());
    for url in urls {
        loop {
            match Client::connect(&url).await {
                Ok(client) => break clients.push(client),
                Err(e) if Instant::now() >= deadline => return Err(anyhow::Error::new(e)),
                Err(_) => tokio::time::sleep(STATUS_POLL).await,
            }
        }
    }
    Ok(clients)
}

/// `(name, state)` of every node in a `cluster-status` answer.
fn members(status: &Value) -> Vec<(&str, &str)> {
    status["topology"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["node"].as_str().unwrap_or(""), n["state"].as_str().unwrap_or("")))
        .collect()
}

fn max(values: &[Duration]) -> Duration {
    values.iter().copied().max().unwrap_or_default()
}

/// Polls every client's `cluster-status` concurrently until `done` holds for it; returns
/// each one's time since `since`.
async fn poll_views(
    pollers: &Handle,
    clients: &[Client],
    pause: Duration,
    since: Instant,
    bound: Duration,
    what: &'static str,
    done: impl Fn(&Value) -> bool + Send + Sync + 'static,
) -> anyhow::Result<Vec<Duration>> {
    let done = Arc::new(done);
    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, done) = (client.clone(), done.clone());
            pollers.spawn(async move {
                loop {
                    let status = client.cluster_status_brief().await.context("cluster-status")?;
                    if done(&status) {
                        return Ok(since.elapsed());
                    }
                    if since.elapsed() > bound {
                        bail!(
                            "timed out after {} s waiting for {what}; last view: {:?}",
                            bound.as_secs(),
                            members(&status)
                        );
                    }
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    let mut times = Vec::with_capacity(tasks.len());
    for task in tasks {
        times.push(task.await.context("poller runtime")??);
    }
    Ok(times)
}

/// Calls `probe_fn` until it answers; returns the time since `t0`.
async fn probe_until_routable(
    client: Client,
    t0: Instant,
    bound: Duration,
    pause: Duration,
) -> anyhow::Result<Duration> {
    loop {
        let answer = client.call(PROBE_FUNCTION, vec![json!(1)]).await;
        if matches!(&answer, Ok(v) if *v == json!(1)) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > bound {
            bail!("{PROBE_FUNCTION} not routable after {} s: {answer:?}", bound.as_secs());
        }
        tokio::time::sleep(pause).await;
    }
}

/// Polls one survivor until it stops showing `victim` alive, then until `victim` is gone;
/// returns both times since `killed`.
async fn watch_failure(
    client: Client,
    victim: String,
    killed: Instant,
    bound: Duration,
    pause: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let mut suspected = None;
    loop {
        let status = client.cluster_status_brief().await.context("cluster-status")?;
        let state = members(&status).into_iter().find(|(name, _)| *name == victim).map(|(_, state)| state.to_owned());
        let now = killed.elapsed();
        if state.as_deref() != Some("alive") {
            let first = *suspected.get_or_insert(now);
            if state.is_none() {
                return Ok((first, now));
            }
        }
        if now > bound {
            bail!("{victim} still in the view ({state:?}) {} s after kill -9", bound.as_secs());
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_read_from_the_topology() {
        let status = json!({"topology": {"nodes": [
            {"node": "n0", "state": "self"}, {"node": "n1", "state": "suspect"}
        ]}});
        assert_eq!(members(&status), vec![("n0", "self"), ("n1", "suspect")]);
        assert!(members(&json!({})).is_empty());
    }

    #[test]
    fn median_takes_the_lower_middle() {
        let d = Duration::from_millis;
        assert_eq!(median(&[d(3), d(1), d(2)]), d(2));
        assert_eq!(median(&[d(4), d(1), d(2), d(3)]), d(2));
        assert_eq!(median(&[]), Duration::ZERO);
    }
}
