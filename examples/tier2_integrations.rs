//! Tier 2, systems working together: `cargo run --example tier2_integrations`.
//!
//! Two nodes, ANALYTICS (which serves `expensive_report`, 200 ms of work) and EDGE (which
//! joins it). Three integrations, every result checked:
//!
//! 1. **RPC results cached and reused.** A client on EDGE calls `expensive_report` with
//!    `"cache": {"ttl": 60}` twice: the first runs it (on ANALYTICS), the second is served
//!    from EDGE's cache without running it, and its `execution_summary` names the command
//!    in `cached_commands`. The function's own run counter says it ran once.
//! 2. **Pub/sub feeding a durable queue.** A durable queue `audit` on ANALYTICS is bound to
//!    `user.*.login`; three logins are published through EDGE (and one logout, which does
//!    not match): exactly the three logins are waiting in the queue, received and acked.
//! 3. **Cache federation.** A value put on EDGE is read on ANALYTICS, a delete on
//!    ANALYTICS leaves EDGE with nothing in any level.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use mpreg::client::QueueSendOptions;
use mpreg::demo::{example_settings, init_logging, shutdown_all, wait_routable, CONVERGE_TIMEOUT};
use mpreg::{CacheOptions, Client, FunctionSpec, NodeBuilder, RpcCommand};
use mpreg_actors::protocol::{CommandCache, RpcRequest};
use serde_json::json;

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let started = Instant::now();
    let runs = Arc::new(AtomicUsize::new(0));
    let report = {
        let runs = runs.clone();
        FunctionSpec::asynchronous("expensive_report", move |region: String| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                json!({"region": region, "revenue": 1234.5, "orders": 42})
            }
        })
        .resources(["analytics"])
    };
    let analytics = NodeBuilder::new(example_settings("ANALYTICS", &[], false))
        .function(report)
        .start()
        .await
        .context("starting ANALYTICS")?;
    let edge = match NodeBuilder::new(example_settings("EDGE", &[analytics.url()], false)).start().await {
        Ok(edge) => edge,
        Err(e) => {
            analytics.shutdown().await;
            return Err(e).context("starting EDGE");
        }
    };
    println!("ANALYTICS {}  expensive_report [analytics]", analytics.url());
    println!("EDGE      {}  (peers: ANALYTICS)", edge.url());
    let nodes = vec![analytics, edge];
    let result = run(&nodes, &runs).await;
    shutdown_all(&nodes).await;
    result?;
    println!("tier2_integrations: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn run(nodes: &[mpreg::Node], runs: &AtomicUsize) -> anyhow::Result<()> {
    let analytics = Client::connect(nodes[0].url()).await.context("connecting to ANALYTICS")?;
    let edge = Client::connect(nodes[1].url()).await.context("connecting to EDGE")?;
    let t = Instant::now();
    wait_routable(&edge, "echo", vec![json!(0)], &[], CONVERGE_TIMEOUT).await?;
    loop {
        let seen = edge.cache_stats().await?["l3"]["nodes"].as_array().map(Vec::len);
        if seen == Some(2) {
            break;
        }
        ensure!(t.elapsed() < CONVERGE_TIMEOUT, "EDGE never saw ANALYTICS as a cache node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("cluster ready after {} ms", t.elapsed().as_millis());

    // 1. An expensive RPC, cached and reused.
    println!("\n1. RPC result caching: expensive_report(\"emea\") with cache ttl 60 s, twice, from EDGE");
    let ask = |u: &str| -> anyhow::Result<RpcRequest> {
        let mut cmd = RpcCommand::new("report", "expensive_report", vec![json!("emea")]);
        cmd.locs = vec!["analytics".into()];
        cmd.cache = Some(CommandCache { ttl: 60.0 });
        Ok(serde_json::from_value(json!({
            "role": "rpc", "u": u, "cmds": [cmd], "include_execution_summary": true,
        }))?)
    };
    let mut timings = Vec::new();
    let mut summaries = Vec::new();
    for u in ["first", "second"] {
        let t = Instant::now();
        let response = edge.send_request(ask(u)?).await?;
        timings.push(t.elapsed());
        ensure!(response.error.is_none(), "the report failed: {:?}", response.error);
        let r = response.r.context("no result")?;
        ensure!(r["report"]["revenue"] == json!(1234.5), "unexpected report: {r}");
        summaries.push(response.execution_summary.context("no execution summary")?);
    }
    println!(
        "   first call: {} ms (ran on ANALYTICS); second: {} ms, cached_commands = {}",
        timings[0].as_millis(),
        timings[1].as_millis(),
        summaries[1]["cached_commands"]
    );
    ensure!(summaries[0].get("cached_commands").is_none(), "the first call was not a cache hit: {}", summaries[0]);
    ensure!(summaries[1]["cached_commands"] == json!(["report"]), "the second call was a hit: {}", summaries[1]);
    ensure!(runs.load(Ordering::SeqCst) == 1, "expensive_report ran {} times", runs.load(Ordering::SeqCst));
    println!("   expensive_report ran once");

    // 2. A pub/sub topic bound to a durable queue.
    println!("\n2. pub/sub -> durable queue: audit on ANALYTICS bound to user.*.login, published through EDGE");
    analytics.queue_create("audit", json!({})).await?;
    analytics.queue_bind("audit", "user.*.login").await?;
    for (topic, user) in [("user.1.login", 1), ("user.2.logout", 2), ("user.3.login", 3), ("user.4.login", 4)] {
        edge.publish(topic, json!({"user": user})).await?;
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while got.len() < 3 && Instant::now() < deadline {
        got.extend(analytics.queue_receive("audit", 10, 0.5, Some("auditor")).await?);
    }
    // A bound queue stores each matching publish's payload.
    let mut users: Vec<i64> = got.iter().filter_map(|m| m.payload["user"].as_i64()).collect();
    users.sort_unstable();
    println!("   audit received {} messages, users {users:?}", got.len());
    ensure!(users == [1, 3, 4], "expected the three logins (users 1, 3, 4), got {users:?} from {got:?}");
    let ids: Vec<String> = got.iter().map(|m| m.id.clone()).collect();
    ensure!(analytics.queue_ack("audit", &ids, Some("auditor")).await?.len() == 3, "the three acks");
    let extra = analytics.queue_send("audit", json!({"manual": true}), QueueSendOptions::default()).await?;
    ensure!(!extra.is_empty(), "a direct send works too");

    // 3. Cache federation.
    println!("\n3. cache federation: put on EDGE, read on ANALYTICS, delete on ANALYTICS");
    let version = edge.cache_put("config", "feature-flags", json!({"beta": true}), CacheOptions::ttl(600.0)).await?;
    let hit = analytics.cache_get("config", "feature-flags", CacheOptions::default()).await?;
    let hit = hit.context("ANALYTICS missed what EDGE put")?;
    println!("   ANALYTICS read version {} from {}", hit.version, hit.level);
    ensure!(hit.value == json!({"beta": true}) && hit.version == version, "ANALYTICS read {hit:?}");
    ensure!(analytics.cache_delete("config", "feature-flags", CacheOptions::default()).await?, "the delete found it");
    for level in ["l1", "l2"] {
        let left = edge.cache_get("config", "feature-flags", CacheOptions::default().levels(&[level])).await?;
        ensure!(left.is_none(), "EDGE still holds the key in {level}");
    }
    ensure!(edge.cache_get("config", "feature-flags", CacheOptions::default()).await?.is_none(), "deleted everywhere");
    println!("   deleted on ANALYTICS: gone from every level of EDGE too");
    analytics.close().await;
    edge.close().await;
    Ok(())
}
