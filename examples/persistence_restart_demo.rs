//! Persistence across a restart, queues and cache: `cargo run --example persistence_restart_demo`.
//!
//! One node with a data dir in a temp directory. A durable queue `jobs` gets 100 messages;
//! a worker receives 10 and acks 5 of them (the other 5 stay leased); a second queue
//! `risky` (max_receives 1) dead-letters a message that was nacked. The node shuts down
//! and a new node starts on the same data dir. Expected after the restart: exactly the 95
//! messages never acked come back (the 5 leased ones visible again, delivered a second
//! time), nothing acked returns, and the dead letter is still in `risky`'s dead-letter
//! list with its reason. Every result is checked.
//!
//! The cache: two entries with a long TTL, one with a 1 s TTL and a counter are put before
//! the restart (and their L2 writes synced); after it, the long-lived entries are served
//! from L2 with their versions, the short one is a miss once its TTL has run out (never
//! served expired), and the counter continues where it stopped.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use mpreg::client::QueueSendOptions;
use mpreg::demo::{example_settings, init_logging};
use mpreg::{CacheOptions, Client, Node, NodeBuilder, Settings};
use serde_json::json;

const SENT: usize = 100;
const RECEIVED: usize = 10;
const ACKED: usize = 5;

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let started = Instant::now();
    let data = std::env::temp_dir().join(format!("mpreg-persistence-restart-{}", std::process::id()));
    let result = demo(&data).await;
    let _ = std::fs::remove_dir_all(&data);
    result?;
    println!("persistence_restart_demo: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn demo(data: &std::path::Path) -> anyhow::Result<()> {
    println!("Persistence restart: durable queues and the cache survive a node restart on the same data dir");
    let mut settings = example_settings("PERSIST", &[], false);
    settings.data_dir = Some(data.to_path_buf());

    // Before: send, lease some, ack some, dead-letter one.
    let node = NodeBuilder::new(settings.clone()).start().await.context("starting the node")?;
    let before = async {
        let client = Client::connect(node.url()).await?;
        client.queue_create("jobs", json!({"visibility_timeout": 300.0})).await?;
        client.queue_create("risky", json!({"max_receives": 1})).await?;
        let mut sent = Vec::with_capacity(SENT);
        for i in 0..SENT {
            sent.push(client.queue_send("jobs", json!({"job": i}), QueueSendOptions::default()).await?);
        }
        let got = client.queue_receive("jobs", RECEIVED, 0.0, Some("worker")).await?;
        ensure!(got.len() == RECEIVED, "received {} of {RECEIVED}", got.len());
        let ids: Vec<String> = got.iter().map(|m| m.id.clone()).collect();
        let acked = client.queue_ack("jobs", &ids[..ACKED], Some("worker")).await?;
        ensure!(acked.len() == ACKED, "acked {acked:?}");
        println!("before: {SENT} sent, {RECEIVED} received, {ACKED} acked, {} left leased", RECEIVED - ACKED);

        let poison = client.queue_send("risky", json!("poison"), QueueSendOptions::default()).await?;
        let got = client.queue_receive("risky", 1, 0.0, Some("worker")).await?;
        ensure!(got.len() == 1 && got[0].id == poison, "the poison message is received");
        client.queue_nack("risky", std::slice::from_ref(&poison), 0.0, Some("worker")).await?;
        let dead = client.queue_dlq("risky", 10).await?;
        ensure!(dead.len() == 1 && dead[0]["id"] == json!(poison), "dead-lettered before the restart: {dead:?}");
        println!("before: 1 message dead-lettered in risky ({})", dead[0]["reason"]);

        let versions = cache_before(&client).await?;

        let pending: BTreeSet<String> = sent.into_iter().filter(|id| !ids[..ACKED].contains(id)).collect();
        let leased: BTreeSet<String> = ids[ACKED..].iter().cloned().collect();
        client.close().await;
        anyhow::Ok((pending, leased, versions))
    }
    .await;
    node.shutdown().await;
    // The store (and its file lock) is released when the last handle to it goes.
    drop(node);
    let (pending, leased, (versions, short_expiry)) = before?;
    ensure!(pending.len() == SENT - ACKED && leased.len() == RECEIVED - ACKED, "bookkeeping before the restart");
    println!("node stopped; starting a new one on the same data dir");

    // After: everything not acked is back, the leased ones for a second delivery.
    let node = restart(settings).await?;
    let after = async {
        let client = Client::connect(node.url()).await?;
        let mut back = Vec::new();
        loop {
            let got = client.queue_receive("jobs", 50, 0.0, Some("worker")).await?;
            if got.is_empty() {
                break;
            }
            back.extend(got);
        }
        let ids: BTreeSet<String> = back.iter().map(|m| m.id.clone()).collect();
        ensure!(ids.len() == back.len(), "a message was delivered twice after the restart");
        ensure!(
            ids == pending,
            "after the restart: {} messages back, expected exactly the {} not acked",
            ids.len(),
            pending.len()
        );
        for message in &back {
            let expected = if leased.contains(&message.id) { 2 } else { 1 };
            ensure!(
                message.receive_count == expected,
                "{} has receive_count {}, expected {expected}",
                message.id,
                message.receive_count
            );
        }
        let all: Vec<String> = back.iter().map(|m| m.id.clone()).collect();
        client.queue_ack("jobs", &all, Some("worker")).await?;
        println!(
            "after: {} messages back ({} of them redelivered leases), none of the acked ones",
            ids.len(),
            leased.len()
        );

        let dead = client.queue_dlq("risky", 10).await?;
        ensure!(dead.len() == 1, "the dead letter survived the restart: {dead:?}");
        println!("after: risky still holds its dead letter ({})", dead[0]["reason"]);
        cache_after(&client, &versions, short_expiry).await?;
        client.close().await;
        anyhow::Ok(())
    }
    .await;
    node.shutdown().await;
    after
}

/// Starts the node again on the same data dir (the stopped node released it).
async fn restart(settings: Settings) -> anyhow::Result<Node> {
    NodeBuilder::new(settings).start().await.context("restarting the node")
}

/// The cache before the restart: two long-lived entries, a short one, a counter; waits
/// until the L2 writes are synced. Returns the long entries' versions and when the short
/// one expires.
async fn cache_before(client: &Client) -> anyhow::Result<(Vec<(String, u64)>, Instant)> {
    let long = CacheOptions::ttl(3600.0);
    let mut versions = Vec::new();
    for (key, value) in [("profile:ada", json!({"name": "Ada"})), ("profile:bob", json!({"name": "Bob"}))] {
        versions.push((key.to_owned(), client.cache_put("users", key, value, long.clone()).await?));
    }
    client.cache_put("users", "session:tmp", json!("short-lived"), CacheOptions::ttl(1.0)).await?;
    let short_expiry = Instant::now() + Duration::from_secs(1);
    ensure!(client.cache_incr("stats", "logins", 41, long.clone()).await? == 41, "the counter starts at 41");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = client.cache_stats().await?;
        if stats["l2"]["unsynced_writes"] == json!(0) {
            break;
        }
        ensure!(Instant::now() < deadline, "the cache's L2 writes were never synced: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("before: cache users/profile:ada, users/profile:bob (ttl 1 h), users/session:tmp (ttl 1 s), stats/logins = 41; synced");
    Ok((versions, short_expiry))
}

/// The cache after the restart: long entries from L2 with their versions, the short one
/// never served once expired, the counter continuing.
async fn cache_after(client: &Client, versions: &[(String, u64)], short_expiry: Instant) -> anyhow::Result<()> {
    for (key, version) in versions {
        let hit = client.cache_get("users", key, CacheOptions::default()).await?;
        let hit = hit.with_context(|| format!("users/{key} did not survive the restart"))?;
        ensure!(hit.level == "l2" && hit.version == *version, "users/{key} after the restart: {hit:?}");
    }
    while Instant::now() < short_expiry {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let short = client.cache_get("users", "session:tmp", CacheOptions::default()).await?;
    ensure!(short.is_none(), "an expired entry was served after the restart: {short:?}");
    let logins = client.cache_incr("stats", "logins", 1, CacheOptions::default()).await?;
    ensure!(logins == 42, "the counter continued at {logins}, expected 42");
    println!(
        "after: both profiles served from L2 with their versions, session:tmp expired (a miss), stats/logins -> 42"
    );
    Ok(())
}
