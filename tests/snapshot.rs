//! Catalog snapshots across a restart (issue 7, DESIGN.md §8 "Snapshots"): in-process
//! nodes on 127.0.0.1 port 0, the restarted node on the same temporary data dir.
//!
//! B is reached through a small TCP proxy that the test can pause (B advertises the
//! proxy's URL), so "before any link forms" is a state the test holds, not a race it
//! hopes to win: A restarts with no `peers` while the proxy accepts nothing, shows B's
//! restored entries as unconfirmed (a call finds no route: 1005, not 1001), and once the
//! proxy opens, dials B from the restored URL and confirms it.
//!
//! Also: a corrupt snapshot is ignored, counted and WARNed about (the binary's log), and
//! replaced at the next clean shutdown; signed entries are restored only when they verify
//! against the restarted node's own trust (another authority: entries dropped).
//!
//! sled holds an exclusive lock on the data dir, so each restart first waits (polling)
//! until the previous node's store is closed.
//!
//! Run: `cargo test --test snapshot`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mpreg::node::NodeError;
use mpreg::{Client, FunctionSpec, Node, NodeBuilder, Settings};
use mpreg_actors::fabric::trust::{self, Authority};
use mpreg_actors::persistence::{Batch, KvStore, OpenFailure, SledStore};
use mpreg_actors::protocol::ErrorCode;
use serde_json::{json, Value};

use common::node::cluster_settings;
use common::proxy::{socket_of, Proxy};
use common::{cluster_id, get_ok, poll_until_async, rpc_error};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine; a dial
/// retried after a failure may wait a backoff of up to 2 s plus a 2 s dial timeout.
const SOON: Duration = Duration::from_secs(20);

fn settings(name: &str, cluster: &str, peers: Vec<String>, data_dir: Option<&Path>) -> Settings {
    Settings {
        peers,
        data_dir: data_dir.map(Path::to_path_buf),
        catalog_snapshot_interval_s: 0.1,
        ..cluster_settings(name, cluster)
    }
}

/// Starts a node. sled releases its directory's lock a moment after the last handle on it
/// is dropped (its background writers finish first), so a start that finds the directory
/// still locked by the handle just dropped (this test's own store, or a node just shut
/// down) is tried again until the lock is released; any other failure fails the test.
async fn start(settings: Settings, functions: Vec<FunctionSpec>) -> Node {
    let name = settings.name.clone();
    poll_until_async(&format!("node {name} to start (the data dir released)"), SOON, || {
        let builder = functions.iter().cloned().fold(NodeBuilder::new(settings.clone()), NodeBuilder::function);
        let name = name.clone();
        async move {
            match builder.start().await {
                Ok(node) => Some(node),
                Err(NodeError::Storage(e)) if e.failure == OpenFailure::Locked => None,
                Err(e) => panic!("node {name} does not start: {e}"),
            }
        }
    })
    .await
}

async fn monitor(node: &Node, path: &str) -> String {
    let url = format!("{}{path}", node.monitoring_url().expect("monitoring is enabled"));
    get_ok(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn monitor_json(node: &Node, path: &str) -> Value {
    serde_json::from_str(&monitor(node, path).await).expect("JSON")
}

/// The value of an unlabelled-but-`node` metric line.
async fn metric(node: &Node, name: &str) -> f64 {
    let text = monitor(node, "/metrics").await;
    let prefix = format!("{name}{{node=");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad line {line}"))
}

/// `state` of `node` in `/topology`.
async fn state_of(node: &Node, member: &str) -> Option<String> {
    let topology = monitor_json(node, "/topology").await;
    topology["nodes"].as_array()?.iter().find(|n| n["node"] == member).map(|n| n["state"].as_str().unwrap().into())
}

#[actix_rt::test]
async fn a_restarted_node_restores_its_catalog_dials_the_restored_peer_and_confirms_it() {
    let cluster = cluster_id("snapshot");
    let dir = tempfile::tempdir().expect("temp dir");

    // B listens on its own port; it advertises the proxy in front of it.
    let (listener, proxy_url) = Proxy::bind().await;
    let mut b_settings = settings("B", &cluster, vec![], None);
    b_settings.advertise_url = Some(proxy_url.clone());
    let only_b = FunctionSpec::sync("only_b", |x: i64| x * 2).inline();
    let b = start(b_settings, vec![only_b]).await;
    let proxy = Proxy::start(listener, proxy_url, socket_of(b.url()));

    // A joins through the proxy, learns only_b, saves a snapshot, then stops cleanly.
    let a = start(settings("A", &cluster, vec![proxy.url.clone()], Some(dir.path())), vec![]).await;
    let client = Client::connect(a.url()).await.expect("client connects");
    poll_until_async("only_b callable from A", SOON, || async { client.call("only_b", vec![json!(4)]).await.ok() })
        .await;
    poll_until_async("a periodic snapshot", SOON, || async {
        (metric(&a, "mpreg_catalog_snapshot_saved_timestamp_seconds").await > 0.0).then_some(())
    })
    .await;
    drop(client);
    a.shutdown().await;
    drop(a);

    // No link can form now; A restarts without peers.
    proxy.set_open(false);
    let a = start(settings("A", &cluster, vec![], Some(dir.path())), vec![]).await;
    assert_eq!(state_of(&a, "B").await.as_deref(), Some("unconfirmed"), "{}", monitor(&a, "/topology").await);
    let catalog = monitor_json(&a, "/catalog").await;
    assert_eq!(catalog["unconfirmed"], json!(["B"]), "{catalog:#}");
    let b_entries = catalog["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "B").expect("B restored");
    assert!(b_entries["functions"].as_array().unwrap().iter().any(|f| f["name"] == "only_b"), "{catalog:#}");
    assert!(metric(&a, "mpreg_catalog_snapshot_entries_restored").await >= 1.0);
    assert!(metric(&a, "mpreg_catalog_snapshot_restored_timestamp_seconds").await > 0.0);
    // Known but not reachable yet: unreachable (1005), not "no such function" (1001).
    let client = Client::connect(a.url()).await.expect("client connects");
    let error = rpc_error(client.call("only_b", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::Unreachable), "{error:?}");

    // The proxy opens: A dials B from the restored URL, B's STATUS confirms it.
    proxy.set_open(true);
    poll_until_async("B confirmed", SOON, || async { (state_of(&a, "B").await? == "alive").then_some(()) }).await;
    assert_eq!(client.call("only_b", vec![json!(21)]).await.expect("only_b through the restored peer"), json!(42));
    let catalog = monitor_json(&a, "/catalog").await;
    assert!(catalog.get("unconfirmed").is_none(), "{catalog:#}");

    drop(client);
    a.shutdown().await;
    drop(a);
    b.shutdown().await;
}

#[actix_rt::test]
async fn a_corrupt_snapshot_is_ignored_and_counted() {
    let cluster = cluster_id("corrupt-snapshot");
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = SledStore::open(dir.path()).expect("open the store");
        store.apply(&Batch::new().put("catalog", b"snapshot".to_vec(), b"{\"format\": garbage".to_vec())).unwrap();
        store.sync().unwrap();
    }
    let a = start(settings("A", &cluster, vec![], Some(dir.path())), vec![]).await;
    assert_eq!(metric(&a, "mpreg_catalog_snapshot_corrupt_total").await, 1.0);
    assert_eq!(metric(&a, "mpreg_catalog_snapshot_restored_timestamp_seconds").await, 0.0);
    let catalog = monitor_json(&a, "/catalog").await;
    assert_eq!(catalog["nodes"].as_array().map(Vec::len), Some(1), "only A itself: {catalog:#}");
    let client = Client::connect(a.url()).await.expect("client connects");
    assert_eq!(client.call("echo", vec![json!("up")]).await.expect("echo"), json!("up"));
    drop(client);
    // A clean shutdown replaces the corrupt snapshot with a good one.
    a.shutdown().await;
    drop(a);
    let a = start(settings("A", &cluster, vec![], Some(dir.path())), vec![]).await;
    assert_eq!(metric(&a, "mpreg_catalog_snapshot_corrupt_total").await, 0.0);
    assert!(metric(&a, "mpreg_catalog_snapshot_restored_timestamp_seconds").await > 0.0);
    a.shutdown().await;
}

/// `NAME.cred` issued by `authority` for `cluster`, in `dir`.
fn issue(authority: &Authority, dir: &Path, name: &str, cluster: &str) -> PathBuf {
    let credentials = authority.issue(name, cluster, trust::unix_seconds(), 86_400).expect("credentials issued");
    let path = dir.join(format!("{name}-{}.cred", trust::fresh_nonce()));
    credentials.save(&path).expect("credentials saved");
    path
}

#[actix_rt::test]
async fn signed_entries_are_restored_only_under_the_same_trust() {
    let cluster = cluster_id("signed-snapshot");
    let (dir, keys) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
    let (authority, stranger) = (Authority::generate(), Authority::generate());
    let with = |name: &str, peers: Vec<String>, data_dir: Option<&Path>, authority: &Authority| Settings {
        credentials: Some(issue(authority, keys.path(), name, &cluster)),
        ..settings(name, &cluster, peers, data_dir)
    };
    let only_b = FunctionSpec::sync("only_b", |x: i64| x * 2).inline();
    let b = start(with("B", vec![], None, &authority), vec![only_b]).await;
    let a = start(with("A", vec![b.url().to_owned()], Some(dir.path()), &authority), vec![]).await;
    let client = Client::connect(a.url()).await.expect("client connects");
    poll_until_async("only_b callable from A", SOON, || async { client.call("only_b", vec![json!(4)]).await.ok() })
        .await;
    drop(client);
    a.shutdown().await;
    drop(a);

    // Same authority: B's signed entries verify again.
    let a = start(with("A", vec![], Some(dir.path()), &authority), vec![]).await;
    assert!(metric(&a, "mpreg_catalog_snapshot_entries_restored").await >= 1.0);
    a.shutdown().await;
    drop(a);

    // Another authority: the entries do not verify and are dropped; B stays a known URL.
    let a = start(with("A", vec![], Some(dir.path()), &stranger), vec![]).await;
    assert_eq!(metric(&a, "mpreg_catalog_snapshot_entries_restored").await, 0.0);
    assert_eq!(metric(&a, "mpreg_catalog_snapshot_members_restored").await, 1.0);
    let catalog = monitor_json(&a, "/catalog").await;
    assert_eq!(catalog["nodes"].as_array().map(Vec::len), Some(1), "only A itself: {catalog:#}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The WARN line, from the binary: a corrupt snapshot never stops a node.
#[test]
fn the_binary_warns_about_a_corrupt_snapshot_and_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = SledStore::open(dir.path()).expect("open the store");
        store.apply(&Batch::new().put("catalog", b"snapshot".to_vec(), b"\xff\x00".to_vec())).unwrap();
        store.sync().unwrap();
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .args(["server", "start", "--port", "0", "--monitoring-port", "0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mpreg");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("catalog snapshot corrupt") || line.contains("MPREG_URL") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(SOON);
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a WARN about the corrupt snapshot");
    assert!(line.contains("WARN") && line.contains("starting without it"), "{line}");
}
