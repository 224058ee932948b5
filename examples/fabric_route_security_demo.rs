//! Route security between clusters: `cargo run --example fabric_route_security_demo`.
//!
//! Three clusters in a line, FED-A – FED-B – FED-C, one node each (b1 bridges to a1 and
//! c1), each cluster with its own authority, node credentials and route key; only c1
//! serves `add`, and it exports it. Checked, in order:
//!
//! - a1 routes to FED-C through FED-B and `add` with `target_cluster` FED-C runs on c1;
//! - live key rotation: FED-C's route key is rotated (`mpreg keys rotate`, a 1 s overlap)
//!   while c1 runs; b1 learns the new key from c1 without a restart, the old key retires
//!   when the overlap ends, and calls keep working under the new key with no update
//!   refused anywhere;
//! - neighbour policy filtering: a1's import policy for neighbour FED-B is reloaded (what
//!   SIGHUP does) to accept only FED-B itself: a1 drops its route to FED-C at once (the
//!   call fails with 1005), keeps FED-B, and counts the refused announcements as
//!   `policy`; the open policy again brings FED-C back.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::time::Instant;

use anyhow::{ensure, Context};
use mpreg::demo::{
    http_get_json, in_cluster, init_logging, shutdown_all, wait_route, wait_until, FabricLine, CONVERGE_TIMEOUT,
};
use mpreg::{Client, RpcCommand};
use mpreg_actors::fabric::trust;
use mpreg_actors::federation::keys::rotate_in_dir;
use mpreg_actors::federation::policy::RoutePolicy;
use serde_json::{json, Value};

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let started = Instant::now();
    demo().await?;
    println!("fabric_route_security_demo: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `add(x, y)` in FED-C.
fn add(x: i64, y: i64) -> RpcCommand {
    in_cluster("FED-C", RpcCommand::new("sum", "add", vec![json!(x), json!(y)]))
}

/// Runs `add(x, y)` in FED-C through `client` and checks the sum.
async fn check_add(client: &Client, x: i64, y: i64) -> anyhow::Result<()> {
    let r = client.request(vec![add(x, y)]).await.context("add in FED-C")?;
    ensure!(r == json!({"sum": x + y}), "add({x}, {y}) in FED-C: {r}");
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    println!("Fabric route security: live route key rotation and neighbour policy filtering");
    let dir = tempfile::tempdir()?;
    let FabricLine { a, b, c, a_settings, .. } = FabricLine::start(dir.path(), None).await?;
    let nodes = [a, c, b];
    let result = async {
        let a_monitoring = nodes[0].monitoring_url().context("a1 serves its monitoring port")?.to_owned();
        let b_monitoring = nodes[2].monitoring_url().context("b1 serves its monitoring port")?.to_owned();
        let explained = wait_route(&a_monitoring, "FED-C").await?;
        ensure!(explained["selected"] == json!(["FED-A", "FED-B", "FED-C"]), "a1's route: {explained}");
        let client = Client::connect(nodes[0].url()).await.context("connecting to a1")?;
        check_add(&client, 20, 22).await?;
        println!("a1 -> FED-C via FED-B: add(20, 22) = 42, ran on c1");

        // Live rotation: c1 reads route.key again, sends b1 its new chain, signs with it.
        let c_keys = dir.path().join("FED-C");
        let rotation = rotate_in_dir(&c_keys, "FED-C", trust::unix_seconds(), 1)?;
        println!("FED-C rotates its route key: generation {} ({})", rotation.generation, rotation.key_id);
        let b_keys = || {
            let url = format!("{b_monitoring}/routes");
            async move { http_get_json(&url).await.ok().map(|r| r["keys"]["FED-C"]["keys"].clone()) }
        };
        let learned = wait_until("b1 to learn FED-C's new route key", CONVERGE_TIMEOUT, || async {
            b_keys().await.filter(|keys| key_active(keys, &rotation.key_id) == Some(true))
        })
        .await?;
        println!("b1 learned it without a restart: {} keys in FED-C's chain", learned.as_array().map_or(0, Vec::len));
        let retired = wait_until("FED-C's old route key to retire at b1", CONVERGE_TIMEOUT, || async {
            b_keys().await.filter(|keys| {
                keys.as_array().is_some_and(|k| k.len() == 2 && k[0]["active"] == false && k[1]["active"] == true)
            })
        })
        .await?;
        println!("after the 1 s overlap only the new key verifies: old key {} retired", retired[0]["key_id"]);
        // b1 accepts an announcement from c1 emitted after the old key retired: signed
        // with the new key (one signed with the retired key would be refused).
        let retired_at_ms = retired[0]["valid_until"].as_u64().context("the old key's valid_until")? * 1000;
        let b_route = format!("{b_monitoring}/routes?destination=FED-C");
        wait_until("b1 to accept an announcement of c1 under the new key", CONVERGE_TIMEOUT, || async {
            let explained = http_get_json(&b_route).await.ok()?;
            explained["candidates"][0]["epoch"].as_u64().filter(|&epoch| epoch > retired_at_ms)
        })
        .await?;
        check_add(&client, 1, 2).await?;
        for (node, monitoring) in [("a1", &a_monitoring), ("b1", &b_monitoring)] {
            let rejected = http_get_json(&format!("{monitoring}/routes")).await?["rejected"].clone();
            ensure!(rejected == json!({}), "{node} refused updates: {rejected}");
        }
        println!("a fresh announcement under the new key keeps the route: add(1, 2) = 3, no update refused");

        // Neighbour policy: a1 accepts from FED-B only routes to FED-B itself.
        let mut hidden = a_settings.clone();
        hidden.federation.import.neighbors.insert(
            "FED-B".into(),
            RoutePolicy { allowed_destinations: Some(["FED-B".to_string()].into()), ..RoutePolicy::default() },
        );
        ensure!(nodes[0].reload_federation_policies(&hidden) == Ok(true), "a1 reloads its policies");
        let t = Instant::now();
        let error = wait_until("a1's call to FED-C to fail with 1005", CONVERGE_TIMEOUT, || async {
            match client.request(vec![add(1, 1)]).await {
                Err(mpreg::ClientError::Rpc(e)) if e.code == 1005 => Some(e),
                _ => None,
            }
        })
        .await?;
        println!(
            "a1's import policy for FED-B now allows only FED-B: FED-C gone in {} ms, the call is 1005 ({})",
            t.elapsed().as_millis(),
            error.details.unwrap_or_default()
        );
        let routes = wait_until("a1 to count an announcement refused by policy", CONVERGE_TIMEOUT, || async {
            let routes = http_get_json(&format!("{a_monitoring}/routes")).await.ok()?;
            routes["rejected"]["policy"].as_u64().is_some_and(|n| n > 0).then_some(routes)
        })
        .await?;
        ensure!(selected(&routes, "FED-B") == Some(json!(["FED-A", "FED-B"])), "FED-B stays: {routes}");
        ensure!(selected(&routes, "FED-C").is_none(), "FED-C is hidden: {routes}");
        println!("  FED-B stays routed; refused by policy so far: {}", routes["rejected"]["policy"]);

        ensure!(nodes[0].reload_federation_policies(&a_settings) == Ok(true), "a1 reloads its policies");
        wait_route(&a_monitoring, "FED-C").await?;
        check_add(&client, 40, 2).await?;
        println!("the open policy again: FED-C routed at the next announcement, add(40, 2) = 42");
        client.close().await;
        Ok(())
    }
    .await;
    shutdown_all(&nodes).await;
    result
}

/// Whether the key `key_id` is in `keys` (a cluster's chain in `/routes`) and active.
fn key_active(keys: &Value, key_id: &str) -> Option<bool> {
    keys.as_array()?.iter().find(|k| k["key_id"] == key_id).and_then(|k| k["active"].as_bool())
}

/// The selected path to `destination` in a `/routes` answer.
fn selected(routes: &Value, destination: &str) -> Option<Value> {
    let route = routes["routes"].as_array()?.iter().find(|r| r["destination"] == destination)?;
    (!route["selected"].is_null()).then(|| route["selected"].clone())
}
