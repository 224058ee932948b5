//! The cache on one node, over the wire: every op of `role: "cache"` through the typed
//! client, levels and TTL, the refusals (1002, counted under their setting), the
//! `mpreg_cache_*` metrics, a crash of the Cache actor, the CLI, and L2 across a `kill -9`
//! of a node process (entries served again, an expired one never).

mod common;

use std::time::Duration;

use mpreg::{CacheOptions, Client, Settings};
use serde_json::json;

use common::metrics::metric_value;
use common::node::TestNode;
use common::process::{mpreg_command, NodeProcess};
use common::{get_ok, poll_until_async};

const SOON: Duration = Duration::from_secs(30);

async fn node() -> TestNode {
    TestNode::start(Settings { port: 0, monitoring_port: 0, ..Settings::default() }, vec![]).await
}

async fn client(url: &str) -> Client {
    Client::connect(url).await.expect("client connects")
}

fn code<T: std::fmt::Debug>(result: Result<T, mpreg::ClientError>) -> u16 {
    match result {
        Err(mpreg::ClientError::Rpc(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn all() -> CacheOptions {
    CacheOptions::default()
}

#[actix_rt::test]
async fn every_op_over_the_wire() {
    let node = node().await;
    let c = client(node.url()).await;
    assert_eq!(c.cache_get("users", "42", all()).await.unwrap(), None);
    let v1 = c.cache_put("users", "42", json!({"name": "ada"}), all()).await.unwrap();
    let hit = c.cache_get("users", "42", all()).await.unwrap().expect("hit");
    assert_eq!((hit.value, hit.version, hit.level.as_str(), hit.expires_in), (json!({"name": "ada"}), v1, "l1", None));
    // A newer write has a higher version; cas needs the current one.
    let v2 = c.cache_put("users", "42", json!({"name": "bob"}), all()).await.unwrap();
    assert!(v2 > v1);
    let refused = c.cache_cas("users", "42", json!("x"), v1, all()).await.unwrap();
    assert_eq!((refused.swapped, refused.version), (false, v2));
    let swapped = c.cache_cas("users", "42", json!("x"), v2, all()).await.unwrap();
    assert!(swapped.swapped && swapped.version > v2);
    assert!(c.cache_cas("users", "new", json!(1), 0, all()).await.unwrap().swapped, "0: only if absent");
    assert!(!c.cache_cas("users", "new", json!(2), 0, all()).await.unwrap().swapped);
    // incr from absent, by any amount.
    assert_eq!(c.cache_incr("counters", "hits", 1, all()).await.unwrap(), 1);
    assert_eq!(c.cache_incr("counters", "hits", -11, all()).await.unwrap(), -10);
    assert_eq!(code(c.cache_incr("users", "42", 1, all()).await), 1002, "not an integer");
    // delete and invalidate (prefix, then the namespace).
    assert!(c.cache_delete("users", "42", all()).await.unwrap());
    assert!(!c.cache_delete("users", "42", all()).await.unwrap());
    for key in ["session:1", "session:2", "profile:1"] {
        c.cache_put("app", key, json!(key), all()).await.unwrap();
    }
    assert_eq!(c.cache_invalidate("app", Some("session:"), all()).await.unwrap(), 2);
    assert_eq!(c.cache_get("app", "session:1", all()).await.unwrap(), None);
    assert!(c.cache_get("app", "profile:1", all()).await.unwrap().is_some());
    assert_eq!(c.cache_invalidate("app", None, all()).await.unwrap(), 1);
    assert_eq!(c.cache_get("app", "profile:1", all()).await.unwrap(), None);
    let stats = c.cache_stats().await.unwrap();
    assert_eq!(stats["l2"]["entries"], json!(2), "users/new and counters/hits: {stats}");
    assert_eq!(stats["node"], json!(node.name()));
}

#[actix_rt::test]
async fn levels_ttl_and_refusals() {
    let node = node().await;
    let c = client(node.url()).await;
    // Memory only: the store level never saw it.
    c.cache_put("ns", "mem", json!(1), all().levels(&["l1"])).await.unwrap();
    assert_eq!(c.cache_get("ns", "mem", all().levels(&["l2"])).await.unwrap(), None);
    assert_eq!(c.cache_get("ns", "mem", all()).await.unwrap().unwrap().level, "l1");
    // Store only: the first read through L1 copies it up.
    c.cache_put("ns", "disk", json!(2), all().levels(&["l2"])).await.unwrap();
    assert_eq!(c.cache_get("ns", "disk", all()).await.unwrap().unwrap().level, "l2");
    assert_eq!(c.cache_get("ns", "disk", all()).await.unwrap().unwrap().level, "l1");
    // A TTL: served with its remaining time until it runs out, then never again.
    c.cache_put("ns", "short", json!(3), CacheOptions::ttl(0.3)).await.unwrap();
    let hit = c.cache_get("ns", "short", all()).await.unwrap().expect("live");
    assert!(hit.expires_in.is_some_and(|s| s > 0.0 && s <= 0.3), "{hit:?}");
    poll_until_async("the entry to expire", SOON, || async {
        c.cache_get("ns", "short", all()).await.unwrap().is_none().then_some(())
    })
    .await;
    for levels in [&["l1"][..], &["l2"][..]] {
        assert_eq!(c.cache_get("ns", "short", all().levels(levels)).await.unwrap(), None);
    }
    // Refusals: 1002, the bounds counted under their setting names.
    let big = json!("x".repeat(2 * 1024 * 1024));
    assert_eq!(code(c.cache_put("ns", "big", big, all()).await), 1002);
    assert_eq!(code(c.cache_put("ns", &"k".repeat(2000), json!(1), all()).await), 1002);
    assert_eq!(code(c.cache_put("ns", "k", json!(1), CacheOptions::ttl(1e12)).await), 1002);
    assert_eq!(code(c.cache_put("ns", "k", json!(1), CacheOptions::ttl(-1.0)).await), 1002);
    assert_eq!(code(c.cache_get("", "k", all()).await), 1002);
    assert_eq!(code(c.cache_get("ns", "k", all().levels(&["l9"])).await), 1002);
    assert_eq!(code(c.cache_op("flush", json!({}), &all()).await), 1002);
    assert_eq!(code(c.cache_op("put", json!({"namespace": "ns", "key": "k"}), &all()).await), 1002);
    let metrics = get_ok(&format!("{}/metrics", node.monitoring_url().unwrap())).await.unwrap();
    for limit in ["cache_max_value_bytes", "cache_max_key_bytes", "cache_max_ttl_s"] {
        let label = format!("limit=\"{limit}\"");
        assert_eq!(metric_value(&metrics, "mpreg_limit_exceeded_total", &label), Some(1.0), "{limit}");
    }
}

#[actix_rt::test]
async fn metrics_count_hits_and_misses_per_level() {
    let node = node().await;
    let c = client(node.url()).await;
    c.cache_put("m", "k", json!(1), all().levels(&["l2"])).await.unwrap();
    c.cache_get("m", "k", all()).await.unwrap(); // L1 miss, L2 hit
    c.cache_get("m", "k", all()).await.unwrap(); // L1 hit
    c.cache_get("m", "absent", all().levels(&["l1", "l2"])).await.unwrap(); // L1 miss, L2 miss
    let metrics = get_ok(&format!("{}/metrics", node.monitoring_url().unwrap())).await.unwrap();
    let value = |name: &str, level: &str| metric_value(&metrics, name, &format!("level=\"{level}\""));
    assert_eq!(value("mpreg_cache_hits_total", "l1"), Some(1.0));
    assert_eq!(value("mpreg_cache_hits_total", "l2"), Some(1.0));
    assert_eq!(value("mpreg_cache_misses_total", "l1"), Some(2.0));
    assert_eq!(value("mpreg_cache_misses_total", "l2"), Some(1.0));
    assert_eq!(value("mpreg_cache_entries", "l1"), Some(1.0));
    assert_eq!(value("mpreg_cache_entries", "l2"), Some(1.0));
    assert!(value("mpreg_cache_bytes", "l2").is_some_and(|b| b > 0.0));
    assert_eq!(value("mpreg_cache_evictions_total", "l1"), Some(0.0));
}

#[actix_rt::test]
async fn the_cache_survives_a_crash_of_its_actor() {
    common::quiet_expected_panics();
    let node = node().await;
    let c = client(node.url()).await;
    c.cache_put("ns", "k", json!("kept"), all()).await.unwrap();
    assert!(node.crash_actor("cache").await, "the cache actor runs");
    poll_until_async("the cache actor to restart", SOON, || async { (node.metrics().restarts() >= 1).then_some(()) })
        .await;
    assert_eq!(c.cache_get("ns", "k", all()).await.unwrap().unwrap().value, json!("kept"));
    c.cache_put("ns", "k2", json!(2), all()).await.unwrap();
    assert_eq!(c.cache_incr("ns", "n", 2, all()).await.unwrap(), 2);
}

/// `mpreg client cache ...`: exit code and stdout.
fn cli(url: &str, args: &[&str]) -> (i32, String) {
    let out = mpreg_command().args(["client", "cache"]).args(args).args(["--url", url]).output().expect("run mpreg");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[actix_rt::test]
async fn the_cli_speaks_every_op() {
    let node = node().await;
    let url = node.url().to_owned();
    tokio::task::spawn_blocking(move || {
        assert_eq!(cli(&url, &["get", "ns", "k"]), (1, String::new()), "a miss exits 1");
        let (code, version) = cli(&url, &["put", "ns", "k", r#"{"b": 2, "a": [1]}"#, "--ttl", "600"]);
        assert_eq!(code, 0);
        assert!(version.parse::<u64>().is_ok(), "{version}");
        assert_eq!(cli(&url, &["get", "ns", "k"]), (0, r#"{"a":[1],"b":2}"#.to_owned()));
        assert_eq!(cli(&url, &["incr", "ns", "n", "--by", "5"]), (0, "5".to_owned()));
        assert_eq!(cli(&url, &["incr", "ns", "n", "--by", "-2"]), (0, "3".to_owned()));
        let (_, cas) = cli(&url, &["cas", "ns", "k", "7", "--version", "1"]);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&cas).unwrap()["swapped"], json!(false));
        let (_, cas) = cli(&url, &["cas", "ns", "k", "7", "--version", &version]);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&cas).unwrap()["swapped"], json!(true));
        assert_eq!(cli(&url, &["get", "ns", "k"]), (0, "7".to_owned()));
        assert_eq!(cli(&url, &["delete", "ns", "k"]), (0, "true".to_owned()));
        assert_eq!(cli(&url, &["get", "ns", "k"]).0, 1);
        assert_eq!(cli(&url, &["invalidate", "ns", "--prefix", "n"]), (0, "1".to_owned()));
        let (code, stats) = cli(&url, &["stats", "--json"]);
        assert_eq!(code, 0);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&stats).unwrap()["l2"]["entries"], json!(0));
        let (code, table) = cli(&url, &["stats"]);
        assert!(code == 0 && table.starts_with("level") && table.contains("l2"), "{table}");
    })
    .await
    .unwrap();
}

#[actix_rt::test]
async fn l2_entries_survive_kill_9_and_expired_ones_are_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let node = NodeProcess::on_data_dir(&dir);
    let c = client(&node.url).await;
    c.cache_put("keep", "a", json!({"n": 1}), all()).await.unwrap();
    c.cache_put("keep", "short", json!(2), CacheOptions::ttl(1.0)).await.unwrap();
    let expires = std::time::Instant::now() + Duration::from_secs(1);
    let counter = c.cache_incr("keep", "n", 41, all()).await.unwrap();
    assert_eq!(counter, 41);
    // Acknowledged writes reach the disk within one sweep interval: wait until they have.
    poll_until_async("the L2 writes to be synced", SOON, || async {
        let stats = c.cache_stats().await.unwrap();
        (stats["l2"]["unsynced_writes"] == json!(0)).then_some(())
    })
    .await;
    c.close().await;
    drop(node); // kill -9
    poll_until_async("the short entry's TTL to run out", SOON, || async {
        (std::time::Instant::now() > expires).then_some(())
    })
    .await;
    let node = NodeProcess::on_data_dir(&dir);
    let c = client(&node.url).await;
    let hit = c.cache_get("keep", "a", all()).await.unwrap().expect("kept across the restart");
    assert_eq!((hit.value, hit.level.as_str()), (json!({"n": 1}), "l2"));
    assert_eq!(c.cache_get("keep", "short", all()).await.unwrap(), None, "expired: never served");
    assert_eq!(c.cache_incr("keep", "n", 1, all()).await.unwrap(), 42);
    let stats = c.cache_stats().await.unwrap();
    assert_eq!(stats["l2"]["entries"], json!(2), "{stats}");
    assert_eq!(stats["l2"]["durable"], json!(true));
}
