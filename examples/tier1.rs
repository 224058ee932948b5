//! Tier 1, one system at a time: `cargo run --example tier1 -- --system rpc`.
//!
//! - `rpc`: two nodes, RPC-CPU (`add`, `multiply` on [cpu, math]) and RPC-GPU
//!   (`model_score` on [gpu, ml], peer: RPC-CPU). A client on RPC-CPU sends the chain
//!   `sum = add(20, 22)` -> `scaled = multiply(sum, 3)` -> `scored = model_score(scaled)`;
//!   the last step runs on the other node. Expected: `{"scored": {"score": 1.26, "model": "demo"}}`.
//! - `pubsub`: the same two nodes; two subscriptions on RPC-CPU ("auth": `user.*.login`,
//!   `user.*.logout`; "orders": `order.#`, `payment.*.completed`), three messages
//!   published through RPC-GPU; expected: exactly one delivery per message, across nodes.
//! - `queue`: one node with a data dir in a temp directory. A durable queue `orders`
//!   (max_receives 2): at-least-once send/receive/ack, a nack and redelivery, a poison
//!   message dead-lettered after two receives, then redriven and acked; priority, dedup,
//!   fire-and-forget, broadcast to two subscribers and quorum(2). Every result is checked.
//! - `cache`: three nodes CACHE-A, CACHE-B, CACHE-C (each key owned by two of them). A
//!   value put on A is read on C; TTL expiry; a versioned `cas`; `incr` from the three
//!   nodes at once (300 calls: exactly 300); delete and prefix invalidation on B leave no
//!   copy in any node's L1 or L2; a cache-aside read computes once, then hits; per-level
//!   stats. Every result is checked.
//! - `monitoring`: the operator's tour of RPC-CPU's monitoring port while the pair works:
//!   `/health`, `/metrics` (the chain's calls and a failed call counted, the latency
//!   histogram), `/topology` (RPC-GPU alive and linked), `/actors` (every child running),
//!   a panic injected into the pub/sub actor and its restart seen in `/actors` and
//!   `/metrics` while RPC keeps answering, the dashboard at `/`, and RPC-GPU's departure
//!   seen in `/topology` while `/health` still answers. Every result is checked.
//! - `fabric`: three clusters FED-A, FED-B, FED-C in a line, one node each, FED-B bridging
//!   (each cluster its own authority, node credentials and route key, pinned by its
//!   neighbours). A client on FED-A runs `add(20, 22)` with `target_cluster = FED-C`
//!   (only FED-C has `add`): 42, across two bridges; FED-A's route explanation names the
//!   path FED-A -> FED-B -> FED-C; a message sent from FED-A to FED-C's queue `jobs`
//!   (`target_cluster`) is received on c1, and a cache `get` on a1 with level `l4` reads
//!   FED-C's value; FED-C stops, FED-B withdraws the route, and the same call fails with
//!   1005 at once. Every result is checked.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use mpreg::client::QueueSendOptions;
use mpreg::demo::{
    example_settings, http_get_json, http_request, in_cluster, init_logging, metric_value, shutdown_all, wait_routable,
    wait_route, wait_until, FabricLine, CONVERGE_TIMEOUT,
};
use mpreg::{CacheOptions, Client, FunctionSpec, NodeBuilder, RpcCommand};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum System {
    Rpc,
    Pubsub,
    Queue,
    Cache,
    Fabric,
    Monitoring,
}

/// Tier 1: one MPREG system at a time, on a cluster started in this process.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which system to demonstrate.
    #[arg(long, value_enum, default_value = "rpc")]
    system: System,
}

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let args = <Args as clap::Parser>::parse();
    let started = Instant::now();
    match args.system {
        System::Rpc => demo_rpc().await?,
        System::Pubsub => demo_pubsub().await?,
        System::Queue => demo_queue().await?,
        System::Cache => demo_cache().await?,
        System::Monitoring => demo_monitoring().await?,
        System::Fabric => demo_fabric().await?,
    }
    println!("tier1: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The two nodes of tier 1: RPC-CPU, and RPC-GPU which joins it. With `monitored`,
/// RPC-CPU serves its monitoring port with fault injection on.
async fn start_pair(monitored: bool) -> anyhow::Result<Vec<mpreg::Node>> {
    let mut settings = example_settings("RPC-CPU", &[], monitored);
    settings.fault_injection = monitored;
    let cpu = NodeBuilder::new(settings)
        .function(FunctionSpec::sync("add", |a: i64, b: i64| a + b).inline().resources(["cpu", "math"]))
        .function(FunctionSpec::sync("multiply", |x: i64, factor: i64| x * factor).inline().resources(["cpu", "math"]))
        .start()
        .await
        .context("starting RPC-CPU")?;
    let gpu = NodeBuilder::new(example_settings("RPC-GPU", &[cpu.url()], false))
        .function(
            FunctionSpec::sync("model_score", |x: f64| json!({"score": x / 100.0, "model": "demo"}))
                .inline()
                .resources(["gpu", "ml"]),
        )
        .start()
        .await;
    match gpu {
        Ok(gpu) => {
            println!("RPC-CPU  {}  add, multiply [cpu, math]", cpu.url());
            println!("RPC-GPU  {}  model_score [gpu, ml]   (peers: RPC-CPU)", gpu.url());
            Ok(vec![cpu, gpu])
        }
        Err(e) => {
            cpu.shutdown().await;
            Err(e).context("starting RPC-GPU")
        }
    }
}

/// The tier-1 chain, sent to `client`; checks its result and returns it.
async fn run_chain(client: &Client) -> anyhow::Result<Value> {
    let mut sum = RpcCommand::new("sum", "add", vec![json!(20), json!(22)]);
    sum.locs = vec!["cpu".into(), "math".into()];
    let scaled = RpcCommand::new("scaled", "multiply", vec![json!("sum"), json!(3)]);
    let mut scored = RpcCommand::new("scored", "model_score", vec![json!("scaled")]);
    scored.locs = vec!["gpu".into(), "ml".into()];
    let r = client.request(vec![sum, scaled, scored]).await.context("the rpc chain")?;
    ensure!(
        r == json!({"scored": {"score": 1.26, "model": "demo"}}),
        "expected {{\"scored\": {{\"score\": 1.26, \"model\": \"demo\"}}}} (only the sink), got {r}"
    );
    Ok(r)
}

async fn demo_rpc() -> anyhow::Result<()> {
    println!("Tier 1: RPC — a dependency chain across two nodes");
    let nodes = start_pair(false).await?;
    let result = async {
        let client = Client::connect(nodes[0].url()).await.context("connecting to RPC-CPU")?;
        let t = Instant::now();
        wait_routable(&client, "model_score", vec![json!(0)], &["gpu", "ml"], CONVERGE_TIMEOUT).await?;
        println!("cluster ready: model_score (on RPC-GPU) routable from RPC-CPU after {} ms", t.elapsed().as_millis());
        println!("request, sent to RPC-CPU:");
        println!("  sum    = add(20, 22)           locs [cpu, math]   -> runs on RPC-CPU");
        println!(
            "  scaled = multiply(\"sum\", 3)                       -> runs on RPC-CPU (the only node with multiply)"
        );
        println!("  scored = model_score(\"scaled\") locs [gpu, ml]     -> runs on RPC-GPU");
        let r = run_chain(&client).await?;
        println!("RPC result: {r}");
        client.close().await;
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    result
}

async fn demo_pubsub() -> anyhow::Result<()> {
    println!("Tier 1: pub/sub — subscribe on one node, publish on the other");
    let nodes = start_pair(false).await?;
    let result = async {
        let subscriber = Client::connect(nodes[0].url()).await.context("connecting to RPC-CPU")?;
        let publisher = Client::connect(nodes[1].url()).await.context("connecting to RPC-GPU")?;
        // The publisher's node must have its link to the subscriber's node: observed as
        // RPC-CPU's `add` becoming routable from RPC-GPU.
        let t = Instant::now();
        wait_routable(&publisher, "add", vec![json!(0), json!(0)], &["cpu"], CONVERGE_TIMEOUT).await?;
        println!("cluster ready: RPC-GPU reaches RPC-CPU after {} ms", t.elapsed().as_millis());
        let mut auth = subscriber.subscribe(&["user.*.login", "user.*.logout"], None).await?;
        let mut orders = subscriber.subscribe(&["order.#", "payment.*.completed"], None).await?;
        println!("on RPC-CPU: subscription \"auth\"   = user.*.login, user.*.logout");
        println!("            subscription \"orders\" = order.#, payment.*.completed   (* one word, # zero or more)");
        let messages = [
            ("user.123.login", json!({"user": 123})),
            ("order.us.456.created", json!({"order": 456})),
            ("payment.card.completed", json!({"amount": 42})),
        ];
        for (topic, payload) in &messages {
            publisher.publish(topic, payload.clone()).await.with_context(|| format!("publishing {topic}"))?;
            println!("published on RPC-GPU: {topic} {payload}");
        }
        // One end marker per subscription, published last: everything before it has been
        // delivered when it arrives, so any extra delivery would be counted.
        publisher.publish("user.end.logout", json!("end")).await?;
        publisher.publish("order.end", json!("end")).await?;
        let got_auth = drain(&mut auth, "user.end.logout").await?;
        let got_orders = drain(&mut orders, "order.end").await?;
        println!("auth   received: {got_auth:?}");
        println!("orders received: {got_orders:?}");
        ensure!(got_auth == ["user.123.login"], "auth: expected [user.123.login], got {got_auth:?}");
        ensure!(
            got_orders == ["order.us.456.created", "payment.card.completed"],
            "orders: expected [order.us.456.created, payment.card.completed], got {got_orders:?}"
        );
        let total = got_auth.len() + got_orders.len();
        ensure!(total == messages.len(), "expected exactly {} notifications, got {total}", messages.len());
        println!(
            "{total} notifications for {} messages: one per matching subscription, delivered across nodes",
            messages.len()
        );
        subscriber.close().await;
        publisher.close().await;
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    result
}

/// The topics received on `stream` before the `end` marker (bounded wait per message).
async fn drain(stream: &mut mpreg::client::SubscriptionStream, end: &str) -> anyhow::Result<Vec<String>> {
    let mut topics = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .with_context(|| format!("no notification within 5 s (received so far: {topics:?})"))?;
        let Some(message) = message else { bail!("subscription closed (received so far: {topics:?})") };
        if message.topic == end {
            return Ok(topics);
        }
        ensure!(message.payload != Value::Null, "notification on {} without payload", message.topic);
        topics.push(message.topic);
    }
}

/// The next pushed message of a queue subscription (bounded wait).
async fn pushed(sub: &mut mpreg::client::QueueSubscription) -> anyhow::Result<mpreg::client::QueueMessage> {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .context("no queue push within 5 s")?
        .context("queue subscription closed")
}

async fn demo_queue() -> anyhow::Result<()> {
    println!("Tier 1: queues — every delivery guarantee, dead letters and redrive, on a durable store");
    let data = std::env::temp_dir().join(format!("mpreg-tier1-queue-{}", std::process::id()));
    let mut settings = example_settings("QUEUE", &[], false);
    settings.data_dir = Some(data.clone());
    let node = NodeBuilder::new(settings).start().await.context("starting the node")?;
    let result = async {
        let client = Client::connect(node.url()).await?;
        let created = client.queue_create("orders", json!({"max_receives": 2})).await?;
        println!("created: {created}");
        // at_least_once: send, receive, ack.
        let id = client.queue_send("orders", json!({"order": 1}), QueueSendOptions::default()).await?;
        let got = client.queue_receive("orders", 10, 0.0, Some("worker")).await?;
        ensure!(got.len() == 1 && got[0].id == id, "at_least_once: expected [{id}], got {got:?}");
        ensure!(
            client.queue_ack("orders", std::slice::from_ref(&id), Some("worker")).await? == [id.clone()],
            "ack of {id}"
        );
        println!("at_least_once: {id} sent (durable), received once, acked");
        // nack -> redelivery with receive_count 2 -> dead letter -> redrive.
        let poison = client.queue_send("orders", json!({"order": "poison"}), QueueSendOptions::default()).await?;
        for round in 1..=2u32 {
            let got = client.queue_receive("orders", 1, 0.0, Some("worker")).await?;
            ensure!(got.len() == 1 && got[0].receive_count == round, "round {round}: got {got:?}");
            client.queue_nack("orders", std::slice::from_ref(&poison), 0.0, Some("worker")).await?;
        }
        let dlq = client.queue_dlq("orders", 10).await?;
        ensure!(dlq.len() == 1 && dlq[0]["id"] == json!(poison), "dead letters: {dlq:?}");
        println!("dead-lettered after 2 receives: {} ({})", poison, dlq[0]["reason"]);
        // orders.dlq is a queue of its own: received with the reason, given back by a nack.
        let dead = client.queue_receive("orders.dlq", 1, 0.0, Some("ops")).await?;
        ensure!(dead.len() == 1 && dead[0].id == poison && dead[0].reason.is_some(), "orders.dlq: {dead:?}");
        client.queue_nack("orders.dlq", std::slice::from_ref(&poison), 0.0, Some("ops")).await?;
        println!("received from orders.dlq ({}), given back", dead[0].reason.as_deref().unwrap_or_default());
        ensure!(client.queue_redrive("orders", None).await? == 1, "redrive moves one message");
        let got = client.queue_receive("orders", 1, 0.0, Some("worker")).await?;
        ensure!(got.len() == 1 && got[0].id == poison, "after redrive: {got:?}");
        client.queue_ack("orders", std::slice::from_ref(&poison), Some("worker")).await?;
        println!("redriven, received again and acked");
        // Priority and dedup.
        let low = client.queue_send("orders", json!("low"), QueueSendOptions::default()).await?;
        let high = client
            .queue_send("orders", json!("high"), QueueSendOptions { priority: Some(5), ..Default::default() })
            .await?;
        let dup = QueueSendOptions { dedup_id: Some("once".into()), ..Default::default() };
        let first = client.queue_send("orders", json!("a"), dup.clone()).await?;
        ensure!(client.queue_send("orders", json!("b"), dup).await? == first, "dedup answers the first id");
        let got: Vec<String> =
            client.queue_receive("orders", 10, 0.0, Some("worker")).await?.into_iter().map(|m| m.id).collect();
        ensure!(got == [high.clone(), low.clone(), first.clone()], "priority order: got {got:?}");
        client.queue_ack("orders", &got, Some("worker")).await?;
        println!("priority: high before low; dedup: a second send with the same id is the first message");
        // Push: broadcast, quorum(2), fire_and_forget.
        let other = Client::connect(node.url()).await?;
        let mut s1 = client.queue_subscribe("orders", 8).await?;
        let mut s2 = other.queue_subscribe("orders", 8).await?;
        let guarantee = |g: Value| QueueSendOptions { guarantee: Some(g), ..Default::default() };
        let b = client.queue_send("orders", json!("to all"), guarantee(json!("broadcast"))).await?;
        let (m1, m2) = (pushed(&mut s1).await?, pushed(&mut s2).await?);
        ensure!(m1.id == b && m2.id == b, "broadcast reaches both subscribers");
        client.queue_ack("orders", std::slice::from_ref(&b), None).await?;
        other.queue_ack("orders", std::slice::from_ref(&b), None).await?;
        let q = client.queue_send("orders", json!("two acks"), guarantee(json!({"quorum": 2}))).await?;
        let (m1, m2) = (pushed(&mut s1).await?, pushed(&mut s2).await?);
        ensure!(m1.id == q && m2.id == q, "quorum(2) goes to both subscribers");
        client.queue_ack("orders", std::slice::from_ref(&q), None).await?;
        other.queue_ack("orders", std::slice::from_ref(&q), None).await?;
        println!("broadcast {b}: both subscribers got it; quorum(2) {q}: done after two acks");
        let f = client.queue_send("orders", json!("once"), guarantee(json!("fire_and_forget"))).await?;
        let m = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! { m = s1.next() => m, m = s2.next() => m }
        })
        .await
        .context("no fire_and_forget push")?
        .context("subscription closed")?;
        ensure!(m.id == f, "fire_and_forget delivered to one subscriber");
        println!("fire_and_forget {f}: delivered to one subscriber, no ack needed");
        let stats = client.queue_stats("orders").await?;
        println!("stats: {stats}");
        ensure!(stats["acked_total"] == json!(7), "acked_total: expected 7, got {}", stats["acked_total"]);
        ensure!(stats["dead_lettered_total"] == json!(1), "dead_lettered_total: {}", stats["dead_lettered_total"]);
        ensure!(stats["visible"] == json!(0) && stats["dead_letters"] == json!(0), "queue empty: {stats}");
        other.close().await;
        client.close().await;
        Ok(())
    }
    .await;
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// Three nodes, B and C introduced by A, each seeing the other two as cache nodes.
async fn start_cache_trio() -> anyhow::Result<Vec<mpreg::Node>> {
    let mut nodes = Vec::new();
    for name in ["CACHE-A", "CACHE-B", "CACHE-C"] {
        let peers: Vec<&str> = nodes.first().map(|a: &mpreg::Node| vec![a.url()]).unwrap_or_default();
        match NodeBuilder::new(example_settings(name, &peers, false)).start().await {
            Ok(node) => nodes.push(node),
            Err(e) => {
                shutdown_all(&nodes).await;
                return Err(e).context(format!("starting {name}"));
            }
        }
    }
    Ok(nodes)
}

async fn demo_cache() -> anyhow::Result<()> {
    println!("Tier 1: cache — L1 memory, L2 store, L3 the cluster (2 owners per key)");
    let nodes = start_cache_trio().await?;
    let result = async {
        let mut clients = Vec::new();
        for node in &nodes {
            clients.push(Client::connect(node.url()).await.with_context(|| format!("connecting to {}", node.name()))?);
        }
        let t = Instant::now();
        for (node, client) in nodes.iter().zip(&clients) {
            loop {
                let stats = client.cache_stats().await?;
                if stats["l3"]["nodes"].as_array().map(Vec::len) == Some(3) {
                    break;
                }
                ensure!(t.elapsed() < CONVERGE_TIMEOUT, "{} never saw 3 cache nodes: {stats}", node.name());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        println!("cluster ready: every node sees 3 cache nodes after {} ms", t.elapsed().as_millis());
        let (a, b, c) = (&clients[0], &clients[1], &clients[2]);
        let all = CacheOptions::default;

        // Put on A, get on C.
        let profile = json!({"name": "Ada", "langs": ["rust", "python"]});
        let version = a.cache_put("users", "ada", profile.clone(), CacheOptions::ttl(600.0)).await?;
        let hit = c.cache_get("users", "ada", all()).await?.context("C missed what A put")?;
        println!("put users/ada on CACHE-A (version {version}); CACHE-C got it from {}", hit.level);
        ensure!(hit.value == profile && hit.version == version, "C read {hit:?}");

        // TTL: served until it runs out, never after.
        b.cache_put("sessions", "tmp", json!("short-lived"), CacheOptions::ttl(0.5)).await?;
        ensure!(a.cache_get("sessions", "tmp", all()).await?.is_some(), "the session is live on A");
        let expired_at = Instant::now() + Duration::from_millis(500);
        while Instant::now() < expired_at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for client in &clients {
            ensure!(client.cache_get("sessions", "tmp", all()).await?.is_none(), "an expired entry was served");
        }
        println!("sessions/tmp (ttl 0.5 s): served while live, a miss on every node after it expired");

        // cas: only with the current version.
        let stale = c.cache_cas("users", "ada", json!({"name": "Eve"}), version - 1, all()).await?;
        ensure!(!stale.swapped, "cas with an old version swapped");
        let swapped = c.cache_cas("users", "ada", json!({"name": "Ada L."}), version, all()).await?;
        ensure!(swapped.swapped && swapped.version > version, "cas with the current version: {swapped:?}");
        let now = a.cache_get("users", "ada", all()).await?.context("ada vanished")?;
        ensure!(now.value == json!({"name": "Ada L."}), "A reads the old value after cas: {now:?}");
        println!("cas on CACHE-C: refused with an old version, applied with the current one; A reads the new value");

        // incr from three nodes at once: atomic at the key's primary owner.
        let calls = clients.iter().flat_map(|cl| (0..100).map(move |_| cl.cache_incr("stats", "visits", 1, all())));
        let results = futures_util::future::join_all(calls).await;
        ensure!(results.iter().all(Result::is_ok), "an incr failed");
        let total = b.cache_get("stats", "visits", all()).await?.context("visits missing")?.value;
        println!("incr stats/visits 100 times from each of the 3 nodes at once -> {total}");
        ensure!(total == json!(300), "expected 300, got {total}");

        // Delete and invalidate on B: no copy left in any L1 or L2.
        for key in ["page:1", "page:2", "page:3", "other"] {
            a.cache_put("html", key, json!(format!("<p>{key}</p>")), all()).await?;
            for client in &clients {
                ensure!(client.cache_get("html", key, all()).await?.is_some(), "html/{key} not readable");
            }
        }
        ensure!(b.cache_delete("html", "other", all()).await?, "delete found nothing");
        let removed = b.cache_invalidate("html", Some("page:"), all()).await?;
        for (node, client) in nodes.iter().zip(&clients) {
            for key in ["page:1", "page:2", "page:3", "other"] {
                for level in ["l1", "l2"] {
                    let left = client.cache_get("html", key, all().levels(&[level])).await?;
                    ensure!(left.is_none(), "html/{key} still in {}'s {level}", node.name());
                }
            }
        }
        println!(
            "delete html/other and invalidate html/page:* on CACHE-B: {removed} entries removed, none left anywhere"
        );

        // Cache-aside: computed once, then served from the cache.
        let mut computed = 0;
        for _ in 0..3 {
            let value = a
                .cache_get_or_put("reports", "daily", CacheOptions::ttl(60.0), || {
                    computed += 1;
                    async { Ok(json!({"rows": 42})) }
                })
                .await?;
            ensure!(value == json!({"rows": 42}), "cache-aside returned {value}");
        }
        ensure!(computed == 1, "cache-aside computed {computed} times");
        println!("cache-aside reports/daily: computed once, then 2 hits");

        let stats = a.cache_stats().await?;
        for level in ["l1", "l2"] {
            let s = &stats[level];
            println!("CACHE-A {level}: entries {} hits {} misses {}", s["entries"], s["hits"], s["misses"]);
        }
        let l3 = &stats["l3"];
        println!("CACHE-A l3: hits {} misses {} forwarded {}", l3["hits"], l3["misses"], l3["forwarded"]);
        ensure!(stats["l3"]["hits"].as_u64().unwrap_or(0) > 0 || stats["l1"]["hits"].as_u64().unwrap_or(0) > 0);
        for client in &clients {
            client.close().await;
        }
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    result
}

/// The children of RPC-CPU's supervision tree: name -> (state, restarts, last failure).
async fn children(monitor: &str) -> anyhow::Result<Vec<(String, String, u64, Option<String>)>> {
    let tree = http_get_json(&format!("{monitor}/actors")).await?;
    let children = tree["children"].as_array().context("/actors has no `children`")?;
    Ok(children
        .iter()
        .map(|c| {
            let text = |key: &str| c[key].as_str().unwrap_or_default().to_owned();
            (
                text("name"),
                text("state"),
                c["restarts"].as_u64().unwrap_or(0),
                c["last_failure"].as_str().map(str::to_owned),
            )
        })
        .collect())
}

async fn get_text(url: &str) -> anyhow::Result<String> {
    let (status, body) = http_request("GET", url).await?;
    ensure!(status == 200, "GET {url}: status {status}");
    Ok(body)
}

async fn demo_fabric() -> anyhow::Result<()> {
    println!("Tier 1: fabric — three clusters bridged by signed path-vector routes");
    let dir = tempfile::tempdir()?;
    let FabricLine { a, b, c, .. } = FabricLine::start(dir.path(), None).await?;
    println!("FED-A  a1  {}", a.url());
    println!("FED-B  b1  {}  bridges to a1 and c1", b.url());
    println!("FED-C  c1  {}  add", c.url());
    let nodes = [a, b, c];
    let result = async {
        let monitoring = nodes[0].monitoring_url().context("a1 serves its monitoring port")?.to_owned();
        let t = Instant::now();
        let explained = wait_route(&monitoring, "FED-C").await?;
        println!("FED-A routes to FED-C after {} ms", t.elapsed().as_millis());
        ensure!(explained["selected"] == json!(["FED-A", "FED-B", "FED-C"]), "selected path: {explained}");
        let best = &explained["candidates"][0];
        println!(
            "  selected: FED-A -> FED-B -> FED-C (next hop {}, score {}, {} hops)",
            best["next_hop"], best["score"], best["metrics"]["hop_count"]
        );
        let client = Client::connect(nodes[0].url()).await.context("connecting to a1")?;
        let add = || in_cluster("FED-C", RpcCommand::new("sum", "add", vec![json!(20), json!(22)]));
        let r = client.request(vec![add()]).await.context("add in FED-C")?;
        ensure!(r == json!({"sum": 42}), "expected {{\"sum\": 42}}, got {r}");
        println!("add(20, 22) with target_cluster FED-C, sent to a1: {r} (ran on c1, across two bridges)");
        // A queue and a cache value of FED-C, used from a1.
        let on_c = Client::connect(nodes[2].url()).await.context("connecting to c1")?;
        on_c.queue_create("jobs", json!({})).await.context("queue jobs on c1")?;
        let to_c = QueueSendOptions { target_cluster: Some("FED-C".into()), ..Default::default() };
        let id = client.queue_send("jobs", json!({"job": 1}), to_c).await.context("send to FED-C's jobs")?;
        let got = on_c.queue_receive("jobs", 1, 0.0, None).await.context("receive on c1")?;
        ensure!(got.len() == 1 && got[0].id == id, "c1 received {got:?}, expected message {id}");
        println!(
            "queue send to jobs with target_cluster FED-C, sent to a1: id {id}, received on c1: {}",
            got[0].payload
        );
        on_c.cache_put("shared", "greeting", json!("hello from FED-C"), CacheOptions::default()).await?;
        let l4 = CacheOptions::default().levels(&["l1", "l2", "l3", "l4"]);
        let hit = client.cache_get("shared", "greeting", l4).await?.context("L4 get found nothing")?;
        ensure!(hit.level == "l4" && hit.cluster.as_deref() == Some("FED-C"), "L4 get: {hit:?}");
        println!("cache get shared/greeting with levels l1..l4 on a1: {} (level l4, from FED-C)", hit.value);
        on_c.close().await;
        nodes[2].shutdown().await;
        println!("c1 stopped: FED-B withdraws FED-C");
        let (error, took) = wait_until("FED-A's call to FED-C to fail with 1005", CONVERGE_TIMEOUT, || async {
            let t = Instant::now();
            match client.request(vec![add()]).await {
                Err(mpreg::ClientError::Rpc(e)) if e.code == 1005 => Some((e, t.elapsed())),
                _ => None,
            }
        })
        .await?;
        ensure!(took < Duration::from_secs(1), "1005 took {took:?}, not at once");
        println!("  the same call now: 1005 in {} ms ({})", took.as_millis(), error.details.unwrap_or_default());
        client.close().await;
        Ok(())
    }
    .await;
    shutdown_all(&nodes[..2]).await;
    result
}

async fn demo_monitoring() -> anyhow::Result<()> {
    println!("Tier 1: monitoring — RPC-CPU's monitoring port while the pair works");
    let nodes = start_pair(true).await?;
    let result = async {
        let monitor = nodes[0].monitoring_url().context("RPC-CPU has no monitoring port")?.to_owned();
        println!("RPC-CPU monitoring: {monitor}  (open {monitor}/ in a browser for the dashboard)");
        let client = Client::connect(nodes[0].url()).await.context("connecting to RPC-CPU")?;
        wait_routable(&client, "model_score", vec![json!(0)], &["gpu", "ml"], CONVERGE_TIMEOUT).await?;

        let health = http_get_json(&format!("{monitor}/health")).await?;
        println!("/health    {health}");
        ensure!(health["status"] == "ok" && health["node"] == "RPC-CPU", "/health: {health}");

        let before = get_text(&format!("{monitor}/metrics")).await?;
        let ok_before = metric_value(&before, "mpreg_requests_total", "code=\"ok\"").context("no ok count")?;
        let missing_before = metric_value(&before, "mpreg_requests_total", "code=\"1001\"").context("no 1001 count")?;
        const CALLS: u32 = 20;
        for _ in 0..CALLS {
            run_chain(&client).await?;
        }
        let missing = client.call("no_such_function", vec![]).await;
        ensure!(missing.is_err(), "a call to an unknown function succeeded: {missing:?}");
        let after = get_text(&format!("{monitor}/metrics")).await?;
        let ok_after = metric_value(&after, "mpreg_requests_total", "code=\"ok\"").context("no ok count")?;
        let missing_after = metric_value(&after, "mpreg_requests_total", "code=\"1001\"").context("no 1001 count")?;
        let timed = metric_value(&after, "mpreg_request_duration_seconds_count", "").context("no histogram")?;
        println!(
            "/metrics   requests ok {ok_before} -> {ok_after}, failed with 1001 (no such function) {missing_before} -> {missing_after}, timed: {timed}"
        );
        ensure!(ok_after - ok_before >= f64::from(CALLS), "{CALLS} chains, ok grew by {}", ok_after - ok_before);
        ensure!(missing_after > missing_before, "the unknown function's failure is not counted");
        ensure!(timed >= ok_after, "the latency histogram counted {timed} of {ok_after} requests");

        let topology = http_get_json(&format!("{monitor}/topology")).await?;
        let gpu = topology["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node"] == "RPC-GPU"))
            .context("/topology does not list RPC-GPU")?;
        println!("/topology  RPC-GPU: state {}, linked {}", gpu["state"], gpu["linked"]);
        ensure!(gpu["state"] == "alive" && gpu["linked"] == true, "RPC-GPU in /topology: {gpu}");

        let tree = children(&monitor).await?;
        println!("/actors    {}", tree.iter().map(|(n, s, _, _)| format!("{n}: {s}")).collect::<Vec<_>>().join(", "));
        ensure!(tree.len() >= 8, "expected the node's 8 supervised actors, got {tree:?}");
        ensure!(tree.iter().all(|(_, s, r, _)| s == "running" && *r == 0), "not all running: {tree:?}");

        println!("fault      injecting a panic into pubsub (its panic message on stderr is expected)");
        let (status, body) = http_request("POST", &format!("{monitor}/actors/pubsub/panic")).await?;
        ensure!(status == 202, "fault injection: status {status}: {body}");
        let (restarts, failure) = wait_until("pubsub restarted", CONVERGE_TIMEOUT, || async {
            let tree = children(&monitor).await.ok()?;
            let (_, state, restarts, failure) = tree.into_iter().find(|(n, ..)| n == "pubsub")?;
            (state == "running" && restarts == 1).then_some((restarts, failure))
        })
        .await?;
        let failure = failure.context("the restarted actor has no last failure")?;
        println!("           pubsub restarted {restarts} time(s), last failure: {failure}");
        let metrics = get_text(&format!("{monitor}/metrics")).await?;
        let counted = metric_value(&metrics, "mpreg_actor_restarts_total", "").context("no restart count")?;
        ensure!(counted == 1.0, "mpreg_actor_restarts_total: {counted}");
        run_chain(&client).await.context("the chain after the restart")?;
        println!("           the chain still answers after the restart");

        let (status, page) = http_request("GET", &format!("{monitor}/")).await?;
        ensure!(status == 200 && page.contains("<title>MPREG node</title>"), "dashboard: status {status}");
        println!("/          the dashboard ({} bytes, no external assets)", page.len());
        client.close().await;
        Ok(())
    }
    .await;
    let departure = async {
        result?;
        let monitor = nodes[0].monitoring_url().context("RPC-CPU has no monitoring port")?.to_owned();
        nodes[1].shutdown().await;
        wait_until("RPC-GPU gone from /topology", CONVERGE_TIMEOUT, || async {
            let topology = http_get_json(&format!("{monitor}/topology")).await.ok()?;
            let listed = topology["nodes"].as_array()?.iter().any(|n| n["node"] == "RPC-GPU");
            (!listed).then_some(())
        })
        .await?;
        let health = http_get_json(&format!("{monitor}/health")).await?;
        ensure!(health["status"] == "ok", "/health after the departure: {health}");
        println!("departure  RPC-GPU said GOODBYE: gone from /topology, /health still ok");
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    departure
}
