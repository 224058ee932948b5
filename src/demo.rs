//! `mpreg demo` (also `cargo run --example quick_demo`): a three-node cluster started in
//! this process, walked through what MPREG does, every result checked.
//!
//! 1. Automatic dependency resolution: a request of several commands whose arguments name
//!    other commands (and fields of their results) runs as a DAG across two nodes.
//! 2. Resource routing: the same function on two nodes, told apart by resources.
//! 3. Concurrency over one connection: requests in flight together, answered as they
//!    finish, not in the order sent; then a burst of 200 calls.
//! 4. Zero-configuration clustering: a third node given one peer URL learns the others
//!    and is used by them.
//!
//! The helpers below ([`example_settings`], [`wait_routable`], [`wait_until`],
//! [`http_get_json`], [`init_logging`]) are shared with the examples under `examples/`.
//! Readiness is always observed (a call that succeeds, a topology that lists a node),
//! never assumed after a fixed sleep; the pause between two probes is politeness only.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mpreg_actors::fabric::trust::{self, Authority};
use mpreg_actors::federation::keys::{rotate_in_dir, ROUTE_KEY_FILE};
use mpreg_actors::federation::policy::ExportList;

use crate::client::CallOptions;
use crate::config::FederationSettings;
use crate::{Client, ClientError, FunctionSpec, Node, NodeBuilder, RpcCommand, Settings};

/// How long a demo waits for the cluster to converge before giving up.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

/// The pause between two readiness probes.
const PROBE_PAUSE: Duration = Duration::from_millis(10);

/// Settings for a node of an in-process demo cluster: `127.0.0.1`, an OS-assigned port,
/// fast gossip (0.1 s) so the cluster converges in a few rounds, monitoring only when
/// asked for (it serves `/topology` and `/catalog`).
pub fn example_settings(name: &str, peers: &[&str], monitoring: bool) -> Settings {
    Settings {
        name: name.to_owned(),
        host: "127.0.0.1".to_owned(),
        port: 0,
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        gossip_interval_s: 0.1,
        monitoring_enabled: monitoring,
        ..Settings::default()
    }
}

/// Installs a log subscriber on stderr: `RUST_LOG` filters, default `error` (demos print
/// their story on stdout and check every result; `RUST_LOG=info` shows the cluster at
/// work: links, gossip, GOODBYEs, supervision).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Probes until `probe` returns `Some`, at most `timeout`; an error naming `what` otherwise.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(PROBE_PAUSE).await;
    }
}

/// Calls `fun(args)` with `locs` through `client` until the cluster can route it: while the
/// answer is 1001 (not known yet) or 1005 (known, no link yet) it retries, for at most
/// `timeout`; any other error is returned at once. Returns the first successful result.
pub async fn wait_routable(
    client: &Client,
    fun: &str,
    args: Vec<Value>,
    locs: &[&str],
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let options = CallOptions { locs: locs.iter().map(|l| (*l).to_owned()).collect(), ..CallOptions::default() };
        match client.call_with(fun, args.clone(), options).await {
            Ok(value) => return Ok(value),
            Err(e) if matches!(e.code().map(|c| c.as_u16()), Some(1001 | 1005)) && Instant::now() < deadline => {
                tokio::time::sleep(PROBE_PAUSE).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{fun} with locs {locs:?} is not routable")),
        }
    }
}

/// `GET url` (plain `http://host:port/path`) and parse the body as JSON: enough HTTP/1.1
/// for the monitoring endpoints (`/topology`, `/catalog`, `/health`).
pub async fn http_get_json(url: &str) -> anyhow::Result<Value> {
    let (status, body) = http_request("GET", url).await?;
    ensure!(status == 200, "GET {url}: status {status}");
    serde_json::from_str(&body).with_context(|| format!("GET {url}: body is not JSON"))
}

/// One bodiless HTTP/1.1 request (plain `http://host:port/path`, 5 s at most): the status
/// and the de-chunked body, for the monitoring endpoints (`/metrics` text, fault injection).
pub async fn http_request(method: &str, url: &str) -> anyhow::Result<(u16, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, "/".to_owned()),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let head =
            format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{method} {url}: no answer within 5 s"))?
        .with_context(|| format!("{method} {url}"))?;
    parse_http_response(&raw).with_context(|| format!("{method} {url}"))
}

/// A whole HTTP/1.1 response (`Connection: close`): its status and de-chunked body.
pub fn parse_http_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("incomplete response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_owned() };
    Ok((status, body))
}

/// The value of the first sample of `metric` in Prometheus text (as `/metrics` serves it)
/// whose labels contain `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk header")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        body = rest.get(size + 2..).context("short chunk")?;
    }
}

/// One entry of a node's `/topology`, as the demos use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownNode {
    /// Its name.
    pub name: String,
    /// `alive` or `suspect`.
    pub state: String,
    /// Whether the asking node has a direct link to it.
    pub linked: bool,
    /// The URL it advertises.
    pub url: String,
}

/// The nodes a node's `/topology` lists besides itself.
pub async fn known_nodes(monitoring_url: &str) -> anyhow::Result<Vec<KnownNode>> {
    let topology = http_get_json(&format!("{monitoring_url}/topology")).await?;
    let nodes = topology["nodes"].as_array().context("/topology has no `nodes`")?;
    Ok(nodes
        .iter()
        .filter(|n| n["state"] != "self")
        .map(|n| {
            let text = |key: &str| n[key].as_str().unwrap_or_default().to_owned();
            KnownNode { name: text("node"), state: text("state"), linked: n["linked"] == true, url: text("url") }
        })
        .collect())
}

/// One cluster of a federation demo: its authority and first route key saved in
/// `dir/CLUSTER`, a certificate for its node `name`, and that node's settings (monitoring
/// on) bridging to the clusters `neighbours` (their authorities pinned), dialling `peers`,
/// announcing every second and letting other clusters call `add`.
fn fabric_settings(
    dir: &Path,
    (cluster, name): (&str, &str),
    authorities: &BTreeMap<&str, Authority>,
    neighbours: &[&str],
    peers: &[&str],
) -> anyhow::Result<Settings> {
    let own = dir.join(cluster);
    let now = trust::unix_seconds();
    let authority = authorities.get(cluster).with_context(|| format!("no authority for {cluster}"))?;
    authority.save(&own)?;
    if !own.join(ROUTE_KEY_FILE).exists() {
        rotate_in_dir(&own, cluster, now, 3600)?;
    }
    let credentials = own.join(format!("{name}.cred"));
    authority.issue(name, cluster, now, 3600)?.save(&credentials)?;
    let mut trust = BTreeMap::new();
    for n in neighbours {
        let pinned = authorities.get(n).with_context(|| format!("no authority for {n}"))?;
        trust.insert((*n).to_owned(), pinned.public_hex());
    }
    let mut settings = example_settings(name, &[], true);
    settings.cluster_id = cluster.to_owned();
    settings.credentials = Some(credentials);
    settings.federation = FederationSettings {
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        allowed_clusters: neighbours.iter().map(|n| (*n).to_owned()).collect(),
        trust,
        route_key_dir: Some(own),
        announce_interval_s: 1.0,
        exports: ExportList {
            functions: vec!["add".into()],
            queues: vec!["jobs".into()],
            cache: vec!["shared".into()],
            ..ExportList::default()
        },
        ..FederationSettings::default()
    };
    Ok(settings)
}

/// Three clusters in a line, as the fabric demos run them: a1 (FED-A), b1 (FED-B,
/// bridging to both) and c1 (FED-C, the only node serving `add`), with their keys and
/// credentials in `dir`; a1 keeps its state in `a_data_dir` when one is given.
pub struct FabricLine {
    /// a1, of FED-A.
    pub a: Node,
    /// b1, of FED-B: dials a1 and c1.
    pub b: Node,
    /// c1, of FED-C: serves and exports `add`.
    pub c: Node,
    /// a1's settings (to reload or restart it with).
    pub a_settings: Settings,
    /// b1's settings.
    pub b_settings: Settings,
}

impl FabricLine {
    /// Starts a1, then c1, then b1 (which bridges them).
    pub async fn start(dir: &Path, a_data_dir: Option<std::path::PathBuf>) -> anyhow::Result<FabricLine> {
        let authorities: BTreeMap<&str, Authority> =
            ["FED-A", "FED-B", "FED-C"].into_iter().map(|c| (c, Authority::generate())).collect();
        let mut a_settings = fabric_settings(dir, ("FED-A", "a1"), &authorities, &["FED-B"], &[])?;
        a_settings.data_dir = a_data_dir;
        let a = NodeBuilder::new(a_settings.clone()).start().await.context("starting a1")?;
        let c = NodeBuilder::new(fabric_settings(dir, ("FED-C", "c1"), &authorities, &["FED-B"], &[])?)
            .function(FunctionSpec::sync("add", |x: i64, y: i64| x + y).inline())
            .start()
            .await
            .context("starting c1")?;
        let b_settings = fabric_settings(dir, ("FED-B", "b1"), &authorities, &["FED-A", "FED-C"], &[a.url(), c.url()])?;
        let b = NodeBuilder::new(b_settings.clone()).start().await.context("starting b1")?;
        Ok(FabricLine { a, b, c, a_settings, b_settings })
    }
}

/// `command` sent to run in cluster `cluster` (`target_cluster`).
pub fn in_cluster(cluster: &str, command: RpcCommand) -> RpcCommand {
    RpcCommand { target_cluster: Some(cluster.to_owned()), ..command }
}

/// Waits (at most [`CONVERGE_TIMEOUT`]) until the node whose monitoring port is
/// `monitoring` selects a route to `destination`; its explanation
/// (`/routes?destination=`).
pub async fn wait_route(monitoring: &str, destination: &str) -> anyhow::Result<Value> {
    let url = format!("{monitoring}/routes?destination={destination}");
    wait_until(&format!("a route from {monitoring} to {destination}"), CONVERGE_TIMEOUT, || async {
        http_get_json(&url).await.ok().filter(|e| !e["selected"].is_null())
    })
    .await
}

/// Stops the nodes, the last started first (joiners before the node they joined); each
/// says GOODBYE, so the others drop it at once.
pub async fn shutdown_all(nodes: &[Node]) {
    for node in nodes.iter().rev() {
        node.shutdown().await;
    }
}

fn locs(resources: &[&str]) -> Vec<String> {
    resources.iter().map(|r| (*r).to_owned()).collect()
}

fn command(name: &str, fun: &str, args: Vec<Value>, resources: &[&str]) -> RpcCommand {
    let mut command = RpcCommand::new(name, fun, args);
    command.locs = locs(resources);
    command
}

fn call_options(resources: &[&str]) -> CallOptions {
    CallOptions { locs: locs(resources), ..CallOptions::default() }
}

/// A JSON value for printing: strings without their quotes.
pub fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

fn expect_eq(what: &str, got: &Value, want: &Value) -> anyhow::Result<()> {
    ensure!(got == want, "{what}: expected {want}, got {got}");
    Ok(())
}

/// An async job that sleeps `ms` milliseconds (no thread held) and says where it ran.
fn job(fun: &str, node: &str, resource: &str) -> FunctionSpec {
    let node = node.to_owned();
    FunctionSpec::asynchronous(fun, move |label: String, ms: u64| {
        let node = node.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json!({"job": label, "slept_ms": ms, "node": node})
        }
    })
    .resources([resource])
}

/// `compute(x) = x * x`, registered on several nodes; the result names the node.
fn compute(node: &str, resource: &str) -> FunctionSpec {
    let node = node.to_owned();
    FunctionSpec::sync("compute", move |x: i64| json!({"result": x * x, "node": node})).inline().resources([resource])
}

fn cpu_node_functions(builder: NodeBuilder) -> NodeBuilder {
    let here = "cpu-node";
    let records = Arc::new(AtomicU64::new(0));
    builder
        .function(FunctionSpec::sync("add", |a: i64, b: i64| a + b).inline().resources(["cpu", "math"]))
        .function(FunctionSpec::sync("multiply", |x: i64, factor: i64| x * factor).inline().resources(["cpu", "math"]))
        .function(
            FunctionSpec::sync("process_data", move |raw: Vec<f64>| {
                let values: Vec<f64> = raw.iter().map(|r| r * 2.0).collect();
                json!({"values": values, "count": values.len(), "node": here})
            })
            .resources(["cpu"]),
        )
        .function(
            FunctionSpec::sync("store", move |analysis: Value| {
                let id = records.fetch_add(1, Ordering::Relaxed) + 1;
                json!({"stored": true, "record_id": format!("rec-{id}"), "mean": analysis["mean"], "node": here})
            })
            .resources(["storage"]),
        )
        .function(
            FunctionSpec::sync("report", move |count: u64, mean: f64, record_id: String, ran_on: Vec<String>| {
                json!({
                    "text": format!("{count} readings, mean {mean}, stored as {record_id}"),
                    "stages_ran_on": ran_on,
                    "reported_by": here,
                })
            })
            .resources(["cpu"]),
        )
        .function(compute(here, "cpu"))
        .function(
            FunctionSpec::sync("heavy_compute", move |values: Vec<i64>, rounds: i64| {
                let mut total = 0i64;
                for _ in 0..rounds {
                    total += values.iter().map(|v| v * v).sum::<i64>();
                }
                json!({"sum_of_squares_x_rounds": total, "node": here})
            })
            .resources(["cpu", "cpu-intensive"]),
        )
        .function(job("cpu_job", here, "cpu"))
}

fn gpu_node_functions(builder: NodeBuilder) -> NodeBuilder {
    let here = "gpu-node";
    builder
        .function(
            FunctionSpec::sync("model_score", |x: f64| json!({"score": x / 100.0, "model": "demo"}))
                .inline()
                .resources(["gpu", "ml"]),
        )
        .function(
            FunctionSpec::sync("analyze", move |data: Value| {
                let values: Vec<f64> =
                    data["values"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
                let mean = if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 };
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                json!({"mean": mean, "max": max, "node": here})
            })
            .resources(["gpu", "ml"]),
        )
        .function(
            FunctionSpec::sync("train_model", move |dataset: String| {
                json!({"model": format!("{dataset}-classifier"), "epochs": 3, "node": here})
            })
            .resources(["gpu", "ml-models"]),
        )
        .function(
            FunctionSpec::sync("run_inference", move |model: String, input: String| {
                json!({"model": model, "input": input, "label": "cat", "confidence": 0.97, "node": here})
            })
            .resources(["gpu", "ml-models"]),
        )
        .function(compute(here, "gpu"))
        .function(job("gpu_job", here, "gpu"))
}

fn db_node_functions(builder: NodeBuilder) -> NodeBuilder {
    let here = "db-node";
    builder
        .function(
            FunctionSpec::sync("query_database", move |sql: String| json!({"sql": sql, "rows": 3, "node": here}))
                .resources(["database"]),
        )
        .function(
            FunctionSpec::sync("aggregate_results", move |operation: String, sources: Vec<Value>| {
                let ran_on: Vec<Value> =
                    sources.iter().map(|s| s.get("node").cloned().unwrap_or(Value::Null)).collect();
                json!({"operation": operation, "total_sources": sources.len(), "sources_ran_on": ran_on, "node": here})
            })
            .resources(["database"]),
        )
}

/// The quick demo: starts its own cluster in this process, prints what happens, checks
/// every result, stops the cluster. An error names the first check that failed.
pub async fn run_quick_demo() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("MPREG quick demo: a cluster of websocket RPC nodes, started in this process");
    println!("=========================================================================");
    let cpu = cpu_node_functions(NodeBuilder::new(example_settings("cpu-node", &[], false)))
        .start()
        .await
        .context("starting cpu-node")?;
    let mut nodes = vec![cpu];
    let result = async {
        let hub = nodes[0].url().to_owned();
        let gpu = gpu_node_functions(NodeBuilder::new(example_settings("gpu-node", &[&hub], false)))
            .start()
            .await
            .context("starting gpu-node")?;
        nodes.push(gpu);
        println!(
            "cpu-node  {}  functions: add, multiply [cpu,math], process_data, report, compute [cpu],",
            nodes[0].url()
        );
        println!("                                 store [storage], heavy_compute [cpu-intensive], cpu_job");
        println!("gpu-node  {}  functions: model_score, analyze [gpu,ml], train_model, run_inference", nodes[1].url());
        println!("                                 [gpu,ml-models], compute [gpu], gpu_job");
        println!("          (gpu-node was given one peer: cpu-node's URL)");
        let client = Client::connect(&hub).await.context("connecting to cpu-node")?;
        let t = Instant::now();
        wait_routable(&client, "model_score", vec![json!(0)], &["gpu"], CONVERGE_TIMEOUT).await?;
        println!(
            "cluster formed: gpu-node's functions are routable from cpu-node after {} ms",
            t.elapsed().as_millis()
        );
        println!("the client is connected to cpu-node only; the cluster decides where each command runs");

        dependency_resolution(&client).await?;
        resource_routing(&client).await?;
        concurrency(&client).await?;
        zero_configuration(&mut nodes, &client).await?;
        client.close().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    println!("\nshutting the cluster down (each node says GOODBYE to the others)");
    shutdown_all(&nodes).await;
    result?;
    println!("quick demo: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn dependency_resolution(client: &Client) -> anyhow::Result<()> {
    println!("\n1. Automatic dependency resolution");
    println!("   one request, three commands; an argument naming another command is replaced by its result:");
    println!("     sum    = add(20, 22)           locs [cpu, math]");
    println!("     scaled = multiply(\"sum\", 3)");
    println!("     scored = model_score(\"scaled\") locs [gpu, ml]");
    let r = client
        .request(vec![
            command("sum", "add", vec![json!(20), json!(22)], &["cpu", "math"]),
            command("scaled", "multiply", vec![json!("sum"), json!(3)], &[]),
            command("scored", "model_score", vec![json!("scaled")], &["gpu", "ml"]),
        ])
        .await?;
    println!("   result: {r}");
    println!(
        "   add and multiply ran on cpu-node, model_score on gpu-node; only the last command (the sink) is returned"
    );
    expect_eq("add -> multiply -> model_score", &r, &json!({"scored": {"score": 1.26, "model": "demo"}}))?;

    println!("\n   a DAG with a fan-in, and references to FIELDS of results (step2.mean):");
    println!("     step1 = process_data([3,1,4,1,5,9,2,6])   locs [cpu]");
    println!("     step2 = analyze(\"step1\")                  locs [gpu, ml]");
    println!("     step3 = store(\"step2\")                    locs [storage]");
    println!("     final = report(\"step1.count\", \"step2.mean\", \"step3.record_id\",");
    println!("                    [\"step1.node\", \"step2.node\", \"step3.node\"])");
    let r = client
        .request(vec![
            command(
                "final",
                "report",
                vec![
                    json!("step1.count"),
                    json!("step2.mean"),
                    json!("step3.record_id"),
                    json!(["step1.node", "step2.node", "step3.node"]),
                ],
                &[],
            ),
            command("step3", "store", vec![json!("step2")], &["storage"]),
            command("step1", "process_data", vec![json!([3, 1, 4, 1, 5, 9, 2, 6])], &["cpu"]),
            command("step2", "analyze", vec![json!("step1")], &["gpu", "ml"]),
        ])
        .await?;
    let report = &r["final"];
    println!("   (sent in the order final, step3, step1, step2: MPREG orders them by their references)");
    println!("   final: {}", text(&report["text"]));
    println!("   stages ran on: {}", report["stages_ran_on"]);
    expect_eq("report text", &report["text"], &json!("8 readings, mean 7.75, stored as rec-1"))?;
    expect_eq("stages", &report["stages_ran_on"], &json!(["cpu-node", "gpu-node", "cpu-node"]))?;
    expect_eq("sinks returned", &json!(r.as_object().map(|o| o.len())), &json!(1))?;
    Ok(())
}

async fn resource_routing(client: &Client) -> anyhow::Result<()> {
    println!("\n2. Resource routing");
    println!("   compute(x) = x*x is registered on BOTH nodes: on gpu-node with [gpu], on cpu-node with [cpu]");
    for (resource, node) in [("gpu", "gpu-node"), ("cpu", "cpu-node")] {
        let r = client.call_with("compute", vec![json!(7)], call_options(&[resource])).await?;
        println!("   compute(7) locs [{resource}]  -> {} (ran on {})", r["result"], text(&r["node"]));
        expect_eq("compute(7)", &r, &json!({"result": 49, "node": node}))?;
    }
    let r = client.call_with("train_model", vec![json!("imagenet")], call_options(&["gpu", "ml-models"])).await?;
    println!(
        "   train_model(\"imagenet\") locs [gpu, ml-models] -> {} (ran on {})",
        text(&r["model"]),
        text(&r["node"])
    );
    expect_eq("train_model", &r, &json!({"model": "imagenet-classifier", "epochs": 3, "node": "gpu-node"}))?;
    let values: Vec<i64> = (1..=10).collect();
    let r =
        client.call_with("heavy_compute", vec![json!(values), json!(100)], call_options(&["cpu-intensive"])).await?;
    println!(
        "   heavy_compute([1..10], 100) locs [cpu-intensive] -> {} (ran on {})",
        r["sum_of_squares_x_rounds"],
        text(&r["node"])
    );
    expect_eq("heavy_compute", &r, &json!({"sum_of_squares_x_rounds": 38500, "node": "cpu-node"}))?;
    match client.call_with("compute", vec![json!(7)], call_options(&["tpu"])).await {
        Err(ClientError::Rpc(e)) if e.code == 1001 => {
            println!(
                "   compute(7) locs [tpu]  -> error {} \"{}\": no node has compute with resource tpu",
                e.code, e.message
            );
        }
        other => bail!("compute with locs [tpu]: expected error 1001, got {other:?}"),
    }
    Ok(())
}

async fn concurrency(client: &Client) -> anyhow::Result<()> {
    println!("\n3. Concurrency over one connection");
    let jobs = [("A", "gpu_job", 300u64), ("B", "cpu_job", 200), ("C", "gpu_job", 100), ("D", "cpu_job", 10)];
    println!("   4 requests sent back to back on ONE websocket: A 300 ms (gpu), B 200 ms (cpu), C 100 ms (gpu), D 10 ms (cpu)");
    let start = Instant::now();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = jobs.iter().map(|&(label, fun, ms)| {
        let (client, order) = (client.clone(), order.clone());
        async move {
            let r = client.call(fun, vec![json!(label), json!(ms)]).await;
            let at = start.elapsed();
            if let Ok(mut order) = order.lock() {
                order.push(label);
            }
            (label, fun, ms, at, r)
        }
    });
    let answers = join_all(calls).await;
    let total = start.elapsed();
    let order = order.lock().map(|o| o.clone()).unwrap_or_default();
    for (label, fun, ms, at, r) in &answers {
        let r = r.as_ref().map_err(|e| anyhow::anyhow!("job {label}: {e}"))?;
        let want_node = if *fun == "gpu_job" { "gpu-node" } else { "cpu-node" };
        expect_eq(&format!("job {label}"), r, &json!({"job": label, "slept_ms": ms, "node": want_node}))?;
        println!("   job {label} ({ms:>3} ms on {want_node}) answered at +{:>3} ms", at.as_millis());
    }
    let work: u64 = jobs.iter().map(|j| j.2).sum();
    println!(
        "   answers arrived in the order {}: each matched to its request by id, none waited for another",
        order.join(", ")
    );
    println!("   {} ms for {work} ms of work: the four ran at the same time", total.as_millis());
    ensure!(order.first() != Some(&"A"), "the slowest job A, sent first, was answered first: requests were serialised");
    ensure!(
        order.iter().position(|l| *l == "D") < order.iter().position(|l| *l == "A"),
        "job D (10 ms) should be answered before job A (300 ms); order was {order:?}"
    );
    ensure!(total < Duration::from_millis(work), "took {total:?}, not less than the {work} ms of work: no concurrency");

    let burst = 200i64;
    let start = Instant::now();
    let results = join_all((0..burst).map(|i| {
        let client = client.clone();
        async move { client.call_with("add", vec![json!(i), json!(i)], call_options(&["cpu"])).await }
    }))
    .await;
    let elapsed = start.elapsed();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.with_context(|| format!("burst call {i}"))?;
        expect_eq(&format!("add({i}, {i})"), &r, &json!(2 * i))?;
    }
    println!(
        "   then {burst} add() calls in flight at once on the same connection: all {burst} correct in {} ms",
        elapsed.as_millis()
    );
    Ok(())
}

async fn zero_configuration(nodes: &mut Vec<Node>, hub_client: &Client) -> anyhow::Result<()> {
    println!("\n4. Zero-configuration clustering");
    let hub = nodes[0].url().to_owned();
    let db = db_node_functions(NodeBuilder::new(example_settings("db-node", &[&hub], true)))
        .start()
        .await
        .context("starting db-node")?;
    let monitoring = db.monitoring_url().context("db-node has no monitoring URL")?.to_owned();
    println!("   db-node joins at {} with ONE peer URL: {hub} (cpu-node); it is told nothing about gpu-node", db.url());
    println!("   db-node functions: query_database, aggregate_results [database]");
    let db_url = db.url().to_owned();
    nodes.push(db);
    let t = Instant::now();
    let known = wait_until("db-node to learn gpu-node and link to it", CONVERGE_TIMEOUT, || {
        let monitoring = monitoring.clone();
        async move {
            let known = known_nodes(&monitoring).await.ok()?;
            let ready = ["cpu-node", "gpu-node"]
                .iter()
                .all(|name| known.iter().any(|k| k.name == *name && k.state == "alive" && k.linked));
            ready.then_some(known)
        }
    })
    .await?;
    println!("   after {} ms, db-node's /topology lists:", t.elapsed().as_millis());
    for k in &known {
        let how = if k.linked { "linked directly" } else { "reached through a peer" };
        println!("     {:<9} {}  {}, {how}", k.name, k.url, k.state);
    }

    let client = Client::connect(&db_url).await.context("connecting to db-node")?;
    wait_routable(&client, "compute", vec![json!(0)], &["gpu"], CONVERGE_TIMEOUT).await?;
    println!("   a client on db-node runs one workflow over all three nodes:");
    println!("     gpu_process  = run_inference(\"ModelA\", \"input\")    locs [gpu, ml-models]");
    println!("     cpu_process  = heavy_compute([1,2,3], 100)          locs [cpu-intensive]");
    println!("     db_query     = query_database(\"SELECT * FROM metrics\") locs [database]");
    println!("     final_report = aggregate_results(\"comprehensive_analysis\", [\"gpu_process\", \"cpu_process\", \"db_query\"])");
    let r = client
        .request(vec![
            command("gpu_process", "run_inference", vec![json!("ModelA"), json!("input")], &["gpu", "ml-models"]),
            command("cpu_process", "heavy_compute", vec![json!([1, 2, 3]), json!(100)], &["cpu-intensive"]),
            command("db_query", "query_database", vec![json!("SELECT * FROM metrics")], &["database"]),
            command(
                "final_report",
                "aggregate_results",
                vec![json!("comprehensive_analysis"), json!(["gpu_process", "cpu_process", "db_query"])],
                &["database"],
            ),
        ])
        .await?;
    let report = &r["final_report"];
    println!(
        "   final_report: {} sources, which ran on {} (report made on {})",
        report["total_sources"],
        report["sources_ran_on"],
        text(&report["node"])
    );
    expect_eq(
        "final_report",
        report,
        &json!({
            "operation": "comprehensive_analysis",
            "total_sources": 3,
            "sources_ran_on": ["gpu-node", "cpu-node", "db-node"],
            "node": "db-node",
        }),
    )?;
    client.close().await;

    let r =
        wait_routable(hub_client, "query_database", vec![json!("SELECT 1")], &["database"], CONVERGE_TIMEOUT).await?;
    println!("   and the older nodes learned of db-node too: query_database via cpu-node ran on {}", text(&r["node"]));
    expect_eq("query_database via cpu-node", &r, &json!({"sql": "SELECT 1", "rows": 3, "node": "db-node"}))?;
    Ok(())
}
