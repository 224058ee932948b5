//! Durable queues against the real `mpreg` binary and `kill -9`: every acknowledged send
//! survives, leased messages come back, and each acknowledged durable send was preceded by
//! an fdatasync/fsync (checked under strace).
//!
//! A send whose commit fails on a really full disk is tested in tests/queue_disk_full.rs;
//! a read-only data dir at start is refused with exit code 73 (tests/persistence.rs).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use mpreg::client::QueueSendOptions;
use mpreg::Client;
use serde_json::json;

use common::process::NodeProcess;

async fn connect(url: &str) -> Client {
    Client::connect(url).await.expect("client connects")
}

#[actix_rt::test]
async fn five_thousand_acknowledged_sends_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let node = NodeProcess::on_data_dir(&dir);
    let clients = [connect(&node.url).await, connect(&node.url).await, connect(&node.url).await];
    clients[0].queue_create("orders", json!({"max_messages": 100000})).await.unwrap();
    // 5,000 sends, 64 in flight per connection over 3 connections.
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            let range = (i * 5000 / 3)..((i + 1) * 5000 / 3);
            futures_util::stream::iter(range)
                .map(|n| {
                    let client = client.clone();
                    async move { client.queue_send("orders", json!({"n": n}), QueueSendOptions::default()).await }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
        }));
    }
    let mut acked = BTreeSet::new();
    for task in tasks {
        for sent in task.await.unwrap() {
            acked.insert(sent.expect("send acknowledged"));
        }
    }
    assert_eq!(acked.len(), 5000);
    node.kill9();

    let node = NodeProcess::on_data_dir(&dir);
    let client = connect(&node.url).await;
    let mut got = BTreeSet::new();
    loop {
        let batch = client.queue_receive("orders", 1000, 0.0, Some("check")).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for m in batch {
            assert!(got.insert(m.id.clone()), "{} delivered twice", m.id);
        }
    }
    assert_eq!(got, acked, "exactly the acknowledged ids come back");
}

#[actix_rt::test]
async fn leased_messages_are_visible_again_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let node = NodeProcess::on_data_dir(&dir);
    let client = connect(&node.url).await;
    client.queue_create("leases", json!({"visibility_timeout": 3600})).await.unwrap();
    let mut sent = BTreeSet::new();
    for n in 0..100 {
        sent.insert(client.queue_send("leases", json!(n), QueueSendOptions::default()).await.unwrap());
    }
    let leased = client.queue_receive("leases", 100, 0.0, Some("w")).await.unwrap();
    assert_eq!(leased.len(), 100);
    assert_eq!(client.queue_stats("leases").await.unwrap()["leased"], json!(100));
    node.kill9();

    let node = NodeProcess::on_data_dir(&dir);
    let client = connect(&node.url).await;
    let stats = client.queue_stats("leases").await.unwrap();
    assert_eq!(stats["visible"], json!(100), "{stats}");
    let again = client.queue_receive("leases", 1000, 0.0, Some("w2")).await.unwrap();
    assert_eq!(again.iter().map(|m| m.id.clone()).collect::<BTreeSet<_>>(), sent);
    assert!(again.iter().all(|m| m.receive_count == 2), "the crashed delivery counts");
}

/// Lines of the strace log that start an fdatasync or fsync call.
fn syncs_in(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
        .count()
}

#[actix_rt::test]
async fn each_durable_send_is_preceded_by_a_sync_under_strace() {
    if Command::new("strace").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        println!("SKIPPED: strace is not installed (apt-get install strace)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log = tmp.path().join("strace.log");
    let mut command = Command::new("strace");
    command.args(["-f", "-qq", "-e", "trace=fdatasync,fsync", "-o"]).arg(&log).arg(env!("CARGO_BIN_EXE_mpreg"));
    command.env("RUST_LOG", "warn").env("NO_COLOR", "1").env_remove("MPREG_URL");
    NodeProcess::add_data_dir_args(&mut command, &dir);
    let node = NodeProcess::spawn(command);
    let client = connect(&node.url).await;
    client.queue_create("synced", json!({})).await.unwrap();
    for n in 0..20 {
        let before = syncs_in(&log);
        client.queue_send("synced", json!(n), QueueSendOptions::default()).await.unwrap();
        let after = syncs_in(&log);
        assert!(after > before, "send {n} was acknowledged without an fdatasync/fsync ({before} -> {after})");
    }
}

/// Runs `mpreg client queue ARGS --url URL`; (exit code, stdout, stderr).
fn cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mpreg"))
        .args(["client", "queue"])
        .args(args)
        .args(["--url", url])
        .env("NO_COLOR", "1")
        .env_remove("MPREG_URL")
        .output()
        .expect("run mpreg client queue");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_creates_sends_receives_acks_across_processes_and_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let node = NodeProcess::on_data_dir(&dir);
    let url = node.url.clone();
    let (code, out, err) = cli(&url, &["create", "work", "--max-receives", "2", "--visibility", "60"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = cli(&url, &["send", "work", r#"{"job": 1}"#, "--priority", "3"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let id = out.trim().to_owned();
    assert_eq!(out, format!("{id}\n"), "send prints the id alone on a line");
    node.kill9();

    let node = NodeProcess::on_data_dir(&dir);
    let url = node.url.clone();
    let (code, out, err) = cli(&url, &["receive", "work", "--max", "10"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines, vec![json!({"id": id, "payload": {"job": 1}, "receive_count": 1})]);
    // Ack from another process: the default consumer `cli` holds the lease.
    let (code, out, err) = cli(&url, &["ack", "work", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = cli(&url, &["stats", "work", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((stats["visible"].clone(), stats["leased"].clone()), (json!(0), json!(0)), "{stats}");
    let (code, out, _) = cli(&url, &["list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"work\""), "{out}");
    let (code, _, err) = cli(&url, &["send", "nope", "1"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("1001") || err.contains("unknown queue"), "{err}");
}
