//! `mpreg server start-config config/persistence_settings.toml`, the mission's persistent
//! server from a settings file: the shipped file parses (every key known), and a node
//! started from it (ports and data dir moved to a temp copy) keeps its durable queue and
//! its cache across a restart from the same file.

mod common;

use std::path::Path;
use std::time::Duration;

use mpreg::client::QueueSendOptions;
use mpreg::{CacheOptions, Client};
use serde_json::json;

use common::poll_until_async;
use common::process::{mpreg_command, NodeProcess};

const SOON: Duration = Duration::from_secs(30);
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/persistence_settings.toml");

/// The shipped file with the ports chosen by the OS and the data dir in `dir`.
fn settings_in(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(SHIPPED).expect("the shipped settings file");
    let data = dir.join("data");
    let moved: Vec<String> = text
        .lines()
        .map(|line| match line.split_once('=').map(|(k, _)| k.trim()) {
            Some("port") => "port = 0".to_owned(),
            Some("monitoring_port") => "monitoring_port = 0".to_owned(),
            Some("data_dir") => format!("data_dir = {:?}", data.display().to_string()),
            _ => line.to_owned(),
        })
        .collect();
    assert!(moved.iter().any(|l| l.starts_with("data_dir = ")), "the shipped file names a data_dir");
    let path = dir.join("persistence_settings.toml");
    std::fs::write(&path, moved.join("\n")).expect("write the settings");
    path
}

/// `mpreg server start-config SETTINGS`.
fn start_config(settings: &Path) -> NodeProcess {
    let mut command = mpreg_command();
    command.args(["server", "start-config"]).arg(settings);
    NodeProcess::spawn(command)
}

#[test]
fn the_shipped_file_is_valid() {
    let settings = mpreg::Settings::from_toml_file(Path::new(SHIPPED)).expect("every key is a known setting");
    settings.validate().expect("valid settings");
    assert!(settings.data_dir.is_some(), "a persistent server has a data_dir");
}

#[actix_rt::test]
async fn a_node_from_the_settings_file_keeps_its_queue_and_cache_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = settings_in(tmp.path());
    let node = start_config(&settings);
    let url = node.url.clone();
    let client = Client::connect(&url).await.unwrap();
    client.queue_create("orders", json!({})).await.unwrap();
    let id = client.queue_send("orders", json!({"sku": "a1"}), QueueSendOptions::default()).await.unwrap();
    let version = client.cache_put("users", "ada", json!({"name": "Ada"}), CacheOptions::ttl(3600.0)).await.unwrap();
    poll_until_async("the cache's L2 writes to be synced", SOON, || async {
        (client.cache_stats().await.ok()?["l2"]["unsynced_writes"] == json!(0)).then_some(())
    })
    .await;
    client.close().await;
    node.terminate();

    let node = start_config(&settings);
    let url = node.url.clone();
    let client = Client::connect(&url).await.unwrap();
    let got = client.queue_receive("orders", 10, 0.0, None).await.unwrap();
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), [id]);
    let hit = client.cache_get("users", "ada", CacheOptions::default()).await.unwrap().expect("kept");
    assert_eq!((hit.value, hit.version, hit.level.as_str()), (json!({"name": "Ada"}), version, "l2"));
}
