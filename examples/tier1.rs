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
//! - `cache`, `fabric` (federation between clusters), `monitoring` (cross-system
//!   event timeline): not implemented yet; they say so and exit with code 2.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use mpreg::demo::{example_settings, init_logging, shutdown_all, wait_routable, CONVERGE_TIMEOUT};
use mpreg::{Client, FunctionSpec, NodeBuilder, RpcCommand};
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
        other => {
            let name = format!("{other:?}").to_lowercase();
            eprintln!("not implemented yet: {name}");
            std::process::exit(2);
        }
    }
    println!("tier1: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The two nodes of tier 1: RPC-CPU, and RPC-GPU which joins it.
async fn start_pair() -> anyhow::Result<Vec<mpreg::Node>> {
    let cpu = NodeBuilder::new(example_settings("RPC-CPU", &[], false))
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

async fn demo_rpc() -> anyhow::Result<()> {
    println!("Tier 1: RPC — a dependency chain across two nodes");
    let nodes = start_pair().await?;
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
        let mut sum = RpcCommand::new("sum", "add", vec![json!(20), json!(22)]);
        sum.locs = vec!["cpu".into(), "math".into()];
        let scaled = RpcCommand::new("scaled", "multiply", vec![json!("sum"), json!(3)]);
        let mut scored = RpcCommand::new("scored", "model_score", vec![json!("scaled")]);
        scored.locs = vec!["gpu".into(), "ml".into()];
        let r = client.request(vec![sum, scaled, scored]).await.context("the rpc chain")?;
        println!("RPC result: {r}");
        let score = r["scored"]["score"].as_f64().context("scored.score is not a number")?;
        ensure!((score - 1.26).abs() < 1e-6, "scored.score: expected 1.26, got {score}");
        ensure!(
            r == json!({"scored": {"score": 1.26, "model": "demo"}}),
            "expected {{\"scored\": {{\"score\": 1.26, \"model\": \"demo\"}}}} (only the sink), got {r}"
        );
        client.close().await;
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    result
}

async fn demo_pubsub() -> anyhow::Result<()> {
    println!("Tier 1: pub/sub — subscribe on one node, publish on the other");
    let nodes = start_pair().await?;
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
    use mpreg::client::QueueSendOptions;
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
