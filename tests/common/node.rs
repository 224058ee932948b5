//! A node run in the test process: [`TestNode`] starts it with the functions a test
//! names and stops it on drop; [`cluster_settings`] is the configuration the cluster
//! tests share. Each test file adds the probes it needs in its own `impl TestNode`.

use std::ops::Deref;

use futures_util::FutureExt;
use mpreg::{Client, FunctionSpec, Node, NodeBuilder, Settings};

/// Settings of a cluster test node: ports chosen by the OS, one worker, fast gossip.
///
/// Suspicion stays at a second: a link silent that long is closed, and a debug build on a
/// busy 2-core machine can stall a thread for a few hundred milliseconds.
pub fn cluster_settings(name: &str, cluster: &str) -> Settings {
    Settings {
        name: name.to_owned(),
        port: 0,
        monitoring_port: 0,
        cluster_id: cluster.to_owned(),
        workers: 1,
        gossip_interval_s: 0.05,
        suspect_after_s: 1.0,
        remove_after_s: 3.0,
        departed_grace_s: 1.0,
        ..Settings::default()
    }
}

/// A running node, stopped on drop.
pub struct TestNode {
    /// The node itself.
    pub node: Node,
}

impl TestNode {
    /// Starts a node with `settings` and `functions`; panics naming the node if it does not.
    pub async fn start(settings: Settings, functions: Vec<FunctionSpec>) -> TestNode {
        let name = settings.name.clone();
        let builder = functions.into_iter().fold(NodeBuilder::new(settings), NodeBuilder::function);
        TestNode { node: builder.start().await.unwrap_or_else(|e| panic!("node {name} does not start: {e}")) }
    }

    /// A client connected to this node; panics if it cannot connect.
    pub async fn client(&self) -> Client {
        Client::connect(self.url()).await.expect("client connects")
    }
}

impl Deref for TestNode {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // The first poll of `shutdown` says GOODBYE and sends the listener its stop
        // command; the rest of the tree goes down with the test's actix System right after.
        let _ = self.node.shutdown().now_or_never();
    }
}
