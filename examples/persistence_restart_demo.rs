//! Persistence across a restart, the queue half: `cargo run --example persistence_restart_demo`.
//!
//! One node with a data dir in a temp directory. A durable queue `jobs` gets 100 messages;
//! a worker receives 10 and acks 5 of them (the other 5 stay leased); a second queue
//! `risky` (max_receives 1) dead-letters a message that was nacked. The node shuts down
//! and a new node starts on the same data dir. Expected after the restart: exactly the 95
//! messages never acked come back (the 5 leased ones visible again, delivered a second
//! time), nothing acked returns, and the dead letter is still in `risky`'s dead-letter
//! list with its reason. Every result is checked.
//!
//! The cache half of the mission's persistence demo waits for the cache (not built yet).
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{ensure, Context};
use mpreg::client::QueueSendOptions;
use mpreg::demo::{example_settings, init_logging};
use mpreg::{Client, Node, NodeBuilder, Settings};
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
    println!("Persistence restart: durable queues survive a node restart on the same data dir");
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

        let pending: BTreeSet<String> = sent.into_iter().filter(|id| !ids[..ACKED].contains(id)).collect();
        let leased: BTreeSet<String> = ids[ACKED..].iter().cloned().collect();
        client.close().await;
        anyhow::Ok((pending, leased))
    }
    .await;
    node.shutdown().await;
    // The store (and its file lock) is released when the last handle to it goes.
    drop(node);
    let (pending, leased) = before?;
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
