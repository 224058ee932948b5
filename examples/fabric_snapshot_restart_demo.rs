//! Federation state across a restart: `cargo run --example fabric_snapshot_restart_demo`.
//!
//! Three clusters in a line, FED-A – FED-B – FED-C, one node each (b1 dials a1 and c1);
//! only c1 serves `add`, and it exports it. a1 has a data dir: its route table and the
//! route keys it learned are saved to sled (at GOODBYE, and with the catalog snapshot).
//!
//! a1 routes to FED-C and calls `add` there, then stops. While it is down, b1's export
//! policy for FED-A is reloaded to announce nothing, so no announcement will ever reach the
//! restarted a1 (what a restart sees before the first announcement arrives, made to last).
//! a1 starts again on its data dir and port: at once, before any bridge, it selects its
//! route to FED-C from the snapshot; when b1 has redialled it, `add` with `target_cluster`
//! FED-C runs on c1 over that route, whose epoch (announcement time) is from before a1
//! stopped, and nothing was refused.
//!
//! Exit code 0 when every check passed, 1 when one failed.

use std::time::Instant;

use anyhow::{ensure, Context};
use mpreg::demo::{http_get_json, in_cluster, init_logging, shutdown_all, wait_route, wait_until, FabricLine};
use mpreg::{Client, NodeBuilder, RpcCommand};
use mpreg_actors::federation::policy::RoutePolicy;
use serde_json::json;

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let started = Instant::now();
    demo().await?;
    println!("fabric_snapshot_restart_demo: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn add(x: i64, y: i64) -> RpcCommand {
    in_cluster("FED-C", RpcCommand::new("sum", "add", vec![json!(x), json!(y)]))
}

async fn demo() -> anyhow::Result<()> {
    println!("Fabric snapshot restart: a bridge node routes across clusters from its snapshot");
    let dir = tempfile::tempdir()?;
    let FabricLine { a, b, c, mut a_settings, b_settings } =
        FabricLine::start(dir.path(), Some(dir.path().join("a1-data"))).await?;
    let nodes = [c, b];
    let result = async {
        let monitoring = a.monitoring_url().context("a1 serves its monitoring port")?.to_owned();
        let before = wait_route(&monitoring, "FED-C").await?;
        ensure!(before["selected"] == json!(["FED-A", "FED-B", "FED-C"]), "a1's route: {before}");
        let client = Client::connect(a.url()).await.context("connecting to a1")?;
        let r = client.request(vec![add(20, 22)]).await.context("add in FED-C")?;
        ensure!(r == json!({"sum": 42}), "add in FED-C: {r}");
        println!("a1 -> FED-C via FED-B: add(20, 22) = 42");
        client.close().await;
        let port = a.url().rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).context("a1's port")?;
        a.shutdown().await;
        let stopped_at_ms = mpreg_actors::unix_now_ms();
        println!("a1 stopped (its federation state saved at GOODBYE)");

        // b1 announces nothing to FED-A from now on.
        let mut silent = b_settings.clone();
        silent.federation.export.neighbors.insert(
            "FED-A".into(),
            RoutePolicy { allowed_destinations: Some(Default::default()), ..RoutePolicy::default() },
        );
        ensure!(nodes[1].reload_federation_policies(&silent) == Ok(true), "b1 reloads its policies");
        println!("b1's export policy for FED-A now announces nothing");

        a_settings.port = port;
        let restarted = NodeBuilder::new(a_settings).start().await.context("restarting a1")?;
        let result = async {
            let monitoring = restarted.monitoring_url().context("a1 serves its monitoring port")?.to_owned();
            let restored = http_get_json(&format!("{monitoring}/routes?destination=FED-C")).await?;
            ensure!(restored["selected"] == json!(["FED-A", "FED-B", "FED-C"]), "restored route: {restored}");
            println!("a1 restarted on its data dir: its route to FED-C is selected at once (from the snapshot)");
            let client = Client::connect(restarted.url()).await.context("connecting to the restarted a1")?;
            let t = Instant::now();
            let r = wait_until("the restarted a1's call to FED-C", mpreg::demo::CONVERGE_TIMEOUT, || async {
                client.request(vec![add(40, 2)]).await.ok()
            })
            .await?;
            ensure!(r == json!({"sum": 42}), "add in FED-C after the restart: {r}");
            let routes = http_get_json(&format!("{monitoring}/routes")).await?;
            let route = http_get_json(&format!("{monitoring}/routes?destination=FED-C")).await?;
            let epoch = route["candidates"][0]["epoch"].as_u64().context("the route's epoch")?;
            ensure!(epoch < stopped_at_ms, "announced after a1 stopped, not restored: {route}");
            ensure!(routes["rejected"] == json!({}), "updates refused: {}", routes["rejected"]);
            ensure!(!routes["bridges"].as_array().is_none_or(Vec::is_empty), "no bridge: {routes}");
            println!(
                "b1 redialled: add(40, 2) = 42 on c1 after {} ms, over the restored route (announced {} ms before a1 stopped, none since)",
                t.elapsed().as_millis(),
                stopped_at_ms - epoch
            );
            client.close().await;
            Ok(())
        }
        .await;
        restarted.shutdown().await;
        result
    }
    .await;
    shutdown_all(&nodes).await;
    result
}
