//! Bootstrapping a cluster from OS-assigned ports: `cargo run --example auto_port_cluster_bootstrap`.
//!
//! node-a starts on port 0; the URL it reports once bound (`Node::url`, the same line a
//! `mpreg server start --port 0` prints as `MPREG_URL=`) is the only thing node-b is
//! given, as its peer. No port is chosen in advance and no lock file is needed. Then:
//! each node's `/topology` lists the other with the port it really bound, and a client on
//! node-b asks `list_peers()` (as the mission's example does) and sees node-a; a function
//! registered on each running node returns that node's own URL, and a client on the other
//! node calls it across the cluster and gets the same URL back. Exits non-zero on a
//! mismatch.

use std::time::Instant;

use anyhow::{ensure, Context};
use mpreg::client::CallOptions;
use mpreg::demo::{
    example_settings, init_logging, known_nodes, shutdown_all, text, wait_routable, wait_until, CONVERGE_TIMEOUT,
};
use mpreg::{Client, FunctionSpec, NodeBuilder};
use serde_json::json;

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let started = Instant::now();
    println!("auto-port cluster bootstrap: two nodes, no port chosen in advance");
    let a = NodeBuilder::new(example_settings("node-a", &[], true)).start().await.context("starting node-a")?;
    println!("node-a url: {}   (asked for port 0; this is the port the OS assigned)", a.url());
    let mut nodes = vec![a];
    let result = async {
        let a_url = nodes[0].url().to_owned();
        let b =
            NodeBuilder::new(example_settings("node-b", &[&a_url], true)).start().await.context("starting node-b")?;
        println!("node-b url: {}   (peers: [{a_url}], the URL node-a reported)", b.url());
        nodes.push(b);
        let (a, b) = (&nodes[0], &nodes[1]);
        for (node, other) in [(a, b), (b, a)] {
            ensure!(!node.url().ends_with(":0"), "{} reports port 0: the bound port is not reported", node.name());
            ensure!(node.url() != other.url(), "both nodes report {}", node.url());
        }

        // Each node learns the other, with the port it really bound.
        let t = Instant::now();
        for (node, other) in [(a, b), (b, a)] {
            let monitoring = node.monitoring_url().context("monitoring disabled")?.to_owned();
            let other_name = other.name().to_owned();
            let known = wait_until(&format!("{} to list {other_name}", node.name()), CONVERGE_TIMEOUT, || {
                let (monitoring, other_name) = (monitoring.clone(), other_name.clone());
                async move {
                    let known = known_nodes(&monitoring).await.ok()?;
                    known.iter().any(|k| k.name == other_name && k.state == "alive" && k.linked).then_some(known)
                }
            })
            .await?;
            let peers: Vec<String> = known.iter().map(|k| format!("{} at {} ({})", k.name, k.url, k.state)).collect();
            println!("{} peers: {}", node.name(), peers.join(", "));
            let listed = known.iter().find(|k| k.name == other_name).map(|k| k.url.clone());
            ensure!(
                listed.as_deref() == Some(other.url()),
                "{} lists {other_name} at {listed:?}, but {other_name} is bound at {}",
                node.name(),
                other.url()
            );
        }
        println!("both nodes learned each other's real port within {} ms", t.elapsed().as_millis());

        // As the mission's example does: a client on node-b asks for its peers.
        let client = Client::connect(b.url()).await?;
        let peers = client.call("list_peers", vec![]).await?;
        let urls: Vec<&str> = peers.as_array().into_iter().flatten().filter_map(|p| p["url"].as_str()).collect();
        println!("node-b list_peers(): {urls:?}");
        ensure!(urls == [a.url()], "list_peers on node-b: expected [{}], got {peers}", a.url());
        client.close().await;

        // Registered on the running nodes: each returns its own URL.
        for node in [a, b] {
            let (name, url) = (node.name().to_owned(), node.url().to_owned());
            node.register(
                FunctionSpec::sync("whoami", move || json!({"node": name, "url": url}))
                    .inline()
                    .resources([node.name()]),
            )
            .await
            .with_context(|| format!("registering whoami on {}", node.name()))?;
        }
        println!("registered whoami() on each running node, with the node's name as its resource");
        for (client_node, target) in [(a, b), (b, a)] {
            let client = Client::connect(client_node.url()).await?;
            let r = wait_routable(&client, "whoami", vec![], &[target.name()], CONVERGE_TIMEOUT).await?;
            println!(
                "client on {} -> whoami() locs [{}] -> ran on {} at {}",
                client_node.name(),
                target.name(),
                text(&r["node"]),
                text(&r["url"])
            );
            ensure!(
                r == json!({"node": target.name(), "url": target.url()}),
                "whoami on {}: expected {{node: {}, url: {}}}, got {r}",
                target.name(),
                target.name(),
                target.url()
            );
            // And the local one, for contrast: the resource picks the node, not the connection.
            let options = CallOptions { locs: vec![client_node.name().to_owned()], ..CallOptions::default() };
            let local = client.call_with("whoami", vec![], options).await?;
            ensure!(local["url"] == json!(client_node.url()), "local whoami on {}: got {local}", client_node.name());
            client.close().await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    shutdown_all(&nodes).await;
    result?;
    println!("auto-port bootstrap: every check passed in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
