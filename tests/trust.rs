//! Authenticated peer links (DESIGN.md §8, "Trust"), with in-process nodes on 127.0.0.1
//! port 0 linked by real loopback websockets.
//!
//! What they pin down: nodes with credentials from one authority form a cluster, relay
//! each other's signed catalog entries and route calls; a node with credentials from
//! another authority, or with none, is refused in both directions (one `peer refused`
//! line, counted in `/metrics`); a raw websocket speaking peer frames without the
//! handshake gets 1004 and changes nothing (the real peer stays routable, another
//! client's results are its own); a node restarted with its credentials rejoins.
//!
//! Credentials are made per test in a temporary directory with the same code as
//! `mpreg keys`. Readiness is observed by polling, never assumed after a sleep.
//!
//! Run: `cargo test --test trust`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use mpreg::{Client, FunctionSpec, NodeBuilder, Settings};
use mpreg_actors::fabric::trust;
use mpreg_actors::protocol::ErrorCode;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use common::keys::Keys;
use common::memory::rss_mib;
use common::node::{cluster_settings, TestNode};
use common::ws::{peer_status, raw_connect, raw_next, raw_send};
use common::{cluster_id, get_ok, poll_until_async, rpc_error};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(10);

/// Settings of a test node: ports chosen by the OS, one worker, fast gossip.
fn settings(name: &str, cluster: &str, peers: &[&str], credentials: Option<&Path>) -> Settings {
    Settings {
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        credentials: credentials.map(Path::to_owned),
        ..cluster_settings(name, cluster)
    }
}

impl TestNode {
    fn url(&self) -> &str {
        self.node.url()
    }

    async fn get(&self, path: &str) -> String {
        let url = format!("{}{path}", self.node.monitoring_url().expect("monitoring is enabled"));
        get_ok(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    async fn topology(&self) -> Value {
        serde_json::from_str(&self.get("/topology").await).expect("topology is JSON")
    }

    /// A labelled counter from `/metrics` (0 when absent).
    async fn counter(&self, family: &str, label: &str, value: &str) -> u64 {
        let needle = format!("{family}{{node=\"{}\",{label}=\"{value}\"}} ", self.node.name());
        let text = self.get("/metrics").await;
        text.lines().find_map(|l| l.strip_prefix(&needle)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }

    async fn refused(&self, reason: &str) -> u64 {
        self.counter("mpreg_peer_refused_total", "reason", reason).await
    }
}

async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until_async(what, SOON, probe).await
}

fn member<'a>(topology: &'a Value, node: &str) -> Option<&'a Value> {
    topology["nodes"].as_array()?.iter().find(|n| n["node"] == node)
}

fn linked(topology: &Value, node: &str) -> bool {
    member(topology, node).is_some_and(|m| m["linked"] == true && m["state"] == "alive")
}

async fn wait_linked(node: &TestNode, other: &str) {
    wait_until(&format!("a live link to {other}"), || async { linked(&node.topology().await, other).then_some(()) })
        .await;
}

async fn wait_callable(client: &Client, fun: &str, args: Vec<Value>) -> Value {
    let args = &args;
    wait_until(&format!("{fun}({args:?}) to succeed"), move || async move { client.call(fun, args.clone()).await.ok() })
        .await
}

/// `held(x)`: waits for `gate`, then answers `x * factor` — a call the test keeps in
/// flight for as long as it needs.
fn held(gate: &Arc<Notify>, factor: i64) -> FunctionSpec {
    let gate = gate.clone();
    FunctionSpec::asynchronous("held", move |x: i64| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            x * factor
        }
    })
}

fn plus(n: i64) -> impl Fn(i64) -> i64 + Send + Sync + Clone + 'static {
    move |x: i64| x + n
}

// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn nodes_of_one_authority_form_a_cluster_relay_signed_entries_and_route() {
    let cluster = cluster_id("trusted");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let b_fun = FunctionSpec::sync("b_fun", plus(1)).inline();
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))), vec![b_fun]).await;
    // C only knows A: it learns of B (and B's signed entries) through A, then dials B.
    let c_fun = FunctionSpec::sync("c_fun", plus(2)).inline();
    let c = TestNode::start(settings("C", &cluster, &[a.url()], Some(&keys.issue("C"))), vec![c_fun]).await;
    for (node, others) in [(&a, ["B", "C"]), (&b, ["A", "C"]), (&c, ["A", "B"])] {
        for other in others {
            wait_linked(node, other).await;
        }
    }
    assert_eq!(wait_callable(&a.client().await, "b_fun", vec![json!(1)]).await, json!(2));
    assert_eq!(wait_callable(&c.client().await, "b_fun", vec![json!(2)]).await, json!(3));
    assert_eq!(wait_callable(&b.client().await, "c_fun", vec![json!(3)]).await, json!(5));
    // C holds B's entries as B signed them (C may have got them from A before it
    // linked to B; either way the signature is B's, over the exact text).
    let catalog: Value = serde_json::from_str(&c.get("/catalog").await).expect("catalog is JSON");
    let entry = catalog["nodes"].as_array().and_then(|n| n.iter().find(|e| e["node"] == "B")).expect("B's entries");
    let signed: Value = serde_json::from_str(entry["proof"]["signed"].as_str().expect("signed text")).unwrap();
    assert_eq!((&signed["node"], &signed["functions"][0]["name"]), (&json!("B"), &json!("b_fun")), "{entry:#}");
    assert!(entry["proof"]["certificate"]["body"].as_str().is_some_and(|b| b.contains("\"node\":\"B\"")));
    for node in [&a, &b, &c] {
        let metrics = node.get("/metrics").await;
        assert!(!metrics.contains("mpreg_peer_refused_total{"), "nothing refused: {metrics}");
        assert!(!metrics.contains("forged_statement") && !metrics.contains("unsigned_statement"), "{metrics}");
    }

    // A clean shutdown is a signed GOODBYE: every node drops B at once.
    b.node.shutdown().await;
    for node in [&a, &c] {
        wait_until("B to be gone", || async { member(&node.topology().await, "B").is_none().then_some(()) }).await;
    }
    assert_eq!(c.counter("mpreg_fabric_dropped_total", "reason", "forged_statement").await, 0);
}

/// A node holding `max_inbound_links` links dialled to it refuses a further dialer politely,
/// with credentials too: A accepts B only; C, which names only A, is sent to B, joins the
/// cluster through it, and is reached from A.
#[actix_rt::test]
async fn a_full_node_sends_a_dialer_to_another_member() {
    let cluster = cluster_id("inbound-cap");
    let keys = Keys::new(&cluster);
    let a_settings = Settings { max_inbound_links: 1, ..settings("A", &cluster, &[], Some(&keys.issue("A"))) };
    let a = TestNode::start(a_settings, vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))), vec![]).await;
    wait_linked(&a, "B").await;
    let c_fun = FunctionSpec::sync("c_fun", plus(2)).inline();
    let c = TestNode::start(settings("C", &cluster, &[a.url()], Some(&keys.issue("C"))), vec![c_fun]).await;
    wait_until("A to refuse C for its inbound cap", || async { (a.refused("full").await >= 1).then_some(()) }).await;
    wait_linked(&c, "B").await;
    assert_eq!(wait_callable(&a.client().await, "c_fun", vec![json!(1)]).await, json!(3));
    let topology = a.topology().await;
    let inbound = topology["links"].as_array().expect("links").iter().filter(|l| l[2] == "inbound").count();
    assert_eq!(inbound, 1, "{topology:#}");
    drop((b, c));
}

#[actix_rt::test]
async fn a_node_of_another_authority_is_refused_both_ways() {
    let cluster = cluster_id("foreign-authority");
    let keys = Keys::new(&cluster);
    let other_keys = Keys::new(&cluster);
    let a_fun = FunctionSpec::sync("a_fun", plus(1)).inline();
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![a_fun]).await;
    // X claims the same cluster and even a name A would accept, with another authority's
    // certificate; it dials A, and B (a real member) is told about nothing from X.
    let x_fun = FunctionSpec::sync("x_fun", plus(2)).inline();
    let x = TestNode::start(settings("X", &cluster, &[a.url()], Some(&other_keys.issue("X"))), vec![x_fun]).await;
    wait_until("A to refuse X as untrusted", || async { (a.refused("untrusted").await >= 1).then_some(()) }).await;
    // A dials X too: X, checking A's certificate against its own authority, refuses A.
    let a2 = TestNode::start(settings("A2", &cluster, &[x.url()], Some(&keys.issue("A2"))), vec![]).await;
    wait_until("X to refuse A2 as untrusted", || async { (x.refused("untrusted").await >= 1).then_some(()) }).await;
    let a_topology = a.topology().await;
    assert!(member(&a_topology, "X").is_none(), "A never lists X: {a_topology:#}");
    assert!(member(&x.topology().await, "A").is_none());
    assert!(member(&x.topology().await, "A2").is_none());
    let error = rpc_error(x.client().await.call("a_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "X cannot route to A: {error:?}");
    let error = rpc_error(a.client().await.call("x_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "nor A to X: {error:?}");
    drop(a2);
}

#[actix_rt::test]
async fn a_node_without_credentials_is_refused_both_ways() {
    let cluster = cluster_id("no-credentials");
    let keys = Keys::new(&cluster);
    let open_fun = FunctionSpec::sync("open_fun", plus(1)).inline();
    let open = TestNode::start(settings("O", &cluster, &[], None), vec![open_fun]).await;
    // A (credentials) dials O (open): O refuses a peer that presents credentials it
    // cannot check; A refuses O's STATUS without credentials. Either way, no link.
    let a_fun = FunctionSpec::sync("a_fun", plus(2)).inline();
    let a = TestNode::start(settings("A", &cluster, &[open.url()], Some(&keys.issue("A"))), vec![a_fun]).await;
    wait_until("O to refuse A", || async { (open.refused("unexpected_credentials").await >= 1).then_some(()) }).await;
    // P (open) dials A: A refuses it.
    let p = TestNode::start(settings("P", &cluster, &[a.url()], None), vec![]).await;
    wait_until("A to refuse P", || async { (a.refused("no_credentials").await >= 1).then_some(()) }).await;
    for (node, others) in [(&a, ["O", "P"]), (&open, ["A", "A"]), (&p, ["A", "A"])] {
        let topology = node.topology().await;
        for other in others {
            assert!(member(&topology, other).is_none(), "{other} unknown: {topology:#}");
        }
    }
    let error = rpc_error(a.client().await.call("open_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "{error:?}");
    let error = rpc_error(p.client().await.call("a_fun", vec![json!(1)]).await);
    assert_eq!(error.kind(), Some(ErrorCode::NotFound), "{error:?}");
}

#[actix_rt::test]
async fn peer_frames_without_the_handshake_get_1004_and_change_nothing() {
    let cluster = cluster_id("raw-peer-frames");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    // `gate` lets the test hold a call of another client in flight while it attacks.
    let gate = Arc::new(Notify::new());
    let held = held(&gate, 10);
    let b_fun = FunctionSpec::sync("b_fun", plus(1)).inline();
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))), vec![b_fun, held]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(1)]).await, json!(2));
    let topology = a.topology().await;
    let b_instance = member(&topology, "B").expect("A knows B")["instance_id"].clone();
    let a_instance = member(&topology, "A").expect("A lists itself")["instance_id"].clone();

    // Another client's call to B, held in flight on B.
    let victim = a.client().await;
    let in_flight = tokio::spawn(async move { victim.call("held", vec![json!(7)]).await });

    let mut ws = raw_connect(a.url()).await;
    let mut frames = vec![
        json!({"role": "fabric-gossip", "kind": "departed", "from": "B", "node": "B", "instance_id": b_instance}),
        json!({"role": "server", "kind": "goodbye", "node": "B", "instance_id": b_instance}),
        json!({"role": "fabric-gossip", "kind": "catalog", "from": "B", "deltas": [{
            "node": "B", "instance_id": b_instance, "cluster_id": cluster, "version": 999_999,
            "advertised_at": 0.0, "ttl_s": 60.0,
            "functions": [{"name": "b_fun", "function_id": "b_fun", "version": "1.0.0", "resources": []}]
        }]}),
        json!({"role": "fabric-gossip", "kind": "members", "from": "B", "members": (0..50).map(|i| json!({
            "info": {"node": format!("fake{i}"), "instance_id": "f", "cluster_id": cluster, "url": "ws://127.0.0.1:9"},
            "heartbeat": 1, "catalog_version": 1, "neighbours": []
        })).collect::<Vec<_>>()}),
    ];
    // Replies to call ids as the old, predictable scheme made them, and to random ones.
    for n in 1..=20 {
        frames.push(json!({"role": "fabric-message", "id": format!("A:{}:{n}", a_instance.as_str().unwrap_or("")),
            "source": "B", "target": "A", "path": ["B"], "hops_left": 5,
            "body": {"kind": "reply", "outcome": {"status": "ok", "value": "forged"}}}));
    }
    for frame in &frames {
        ws.send(Message::Text(frame.to_string())).await.unwrap();
        let reply = raw_next(&mut ws, SOON).await.unwrap_or_else(|| panic!("{frame} closed the connection"));
        assert_eq!(reply["error"]["code"], 1004, "{frame} -> {reply}");
        let details = reply["error"]["details"].as_str().unwrap_or_default();
        assert!(details.contains("handshake"), "{details}");
    }
    // The same connection still serves requests.
    let rpc = json!({"role": "rpc", "u": "after", "cmds": [{"name": "r", "fun": "b_fun", "args": [41]}]});
    ws.send(Message::Text(rpc.to_string())).await.unwrap();
    let reply = raw_next(&mut ws, SOON).await.expect("an answer");
    assert_eq!((&reply["u"], &reply["r"]), (&json!("after"), &json!({"r": 42})), "{reply}");

    // A STATUS without credentials is refused in words, counted, and the link closed.
    raw_send(&mut ws, &peer_status("B", "spy", &cluster)).await;
    let refusal = raw_next(&mut ws, SOON).await.expect("a refusal");
    assert_eq!((&refusal["role"], &refusal["kind"]), (&json!("server"), &json!("refused")), "{refusal}");
    assert_eq!(raw_next(&mut ws, SOON).await, None, "the refused link is closed");
    assert!(a.refused("no_credentials").await >= 1);

    // Nothing changed: B is still linked and routable, no fake node was learned, and the
    // held call gets its own result.
    let topology = a.topology().await;
    assert!(linked(&topology, "B"), "{topology:#}");
    assert_eq!(member(&topology, "B").unwrap()["instance_id"], b_instance);
    assert!(member(&topology, "fake0").is_none(), "{topology:#}");
    assert_eq!(client.call("b_fun", vec![json!(9)]).await.unwrap(), json!(10));
    // Release the held call (notify_one stores a permit if it has not started waiting).
    gate.notify_one();
    let result = tokio::time::timeout(SOON, in_flight).await.expect("the held call ends").expect("task");
    assert_eq!(result.unwrap(), json!(70));
    assert!(a.counter("mpreg_fabric_dropped_total", "reason", "no_handshake").await >= frames.len() as u64);
    drop(b);
}

#[actix_rt::test]
async fn a_node_restarted_with_its_credentials_rejoins() {
    let cluster = cluster_id("rejoin");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let b_creds = keys.issue("B");
    let b_fun = || FunctionSpec::sync("b_fun", plus(1)).inline();
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&b_creds)), vec![b_fun()]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(1)]).await, json!(2));
    let first = member(&a.topology().await, "B").unwrap()["instance_id"].clone();
    b.node.shutdown().await;
    drop(b);
    wait_until("B to be gone", || async { member(&a.topology().await, "B").is_none().then_some(()) }).await;

    // The same credentials file, a new process instance (and port).
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&b_creds)), vec![b_fun()]).await;
    wait_linked(&a, "B").await;
    let second = member(&a.topology().await, "B").unwrap()["instance_id"].clone();
    assert_ne!(first, second, "a new instance");
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(5)]).await, json!(6));
    assert_eq!(a.refused("untrusted").await, 0);
    drop(b);
}

#[actix_rt::test]
async fn a_node_refuses_to_start_with_credentials_of_another_node_or_cluster() {
    let cluster = cluster_id("wrong-file");
    let keys = Keys::new(&cluster);
    let a_creds = keys.issue("A");
    let wrong_name = NodeBuilder::new(settings("B", &cluster, &[], Some(&a_creds))).start().await;
    let error = wrong_name.err().expect("a node named B cannot use A's credentials").to_string();
    assert!(error.contains("issued to node \"A\""), "{error}");
    let wrong_cluster = NodeBuilder::new(settings("A", "elsewhere", &[], Some(&a_creds))).start().await;
    let error = wrong_cluster.err().expect("nor in another cluster").to_string();
    assert!(error.contains("issued for cluster"), "{error}");
    // An empty name takes the certificate's.
    let unnamed = TestNode::start(settings("", &cluster, &[], Some(&a_creds)), vec![]).await;
    assert_eq!(unnamed.node.name(), "A");
}

#[actix_rt::test]
async fn calls_served_for_a_link_are_capped_counted_and_cancelled_with_the_link() {
    let cluster = cluster_id("link-calls");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let gate = Arc::new(Notify::new());
    let held = held(&gate, 1);
    let b_settings =
        Settings { max_in_flight_per_link: 1, ..settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))) };
    let b = TestNode::start(b_settings, vec![held]).await;
    wait_linked(&a, "B").await;
    let gauge = |node: &TestNode| {
        let url = format!("{}/metrics", node.node.monitoring_url().unwrap());
        let needle = format!("mpreg_requests_in_flight{{node=\"{}\"}} ", node.node.name());
        async move {
            let text = get_ok(&url).await.unwrap();
            text.lines().find_map(|l| l.strip_prefix(&needle).map(|n| n.trim().parse::<i64>().unwrap())).unwrap()
        }
    };

    // One call held on B for A's link...
    let first = a.client().await;
    let first_call = tokio::spawn(async move { first.call("held", vec![json!(1)]).await });
    wait_until("B to serve one call for A", || async { (gauge(&b).await == 1).then_some(()) }).await;
    // ...so a second one over the same link is refused as overloaded (1006), not queued.
    let error = rpc_error(
        wait_until("held to be routable", || async {
            let result = a.client().await.call("held", vec![json!(2)]).await;
            (rpc_error_kind(&result) != Some(ErrorCode::NotFound)).then_some(result)
        })
        .await,
    );
    assert_eq!(error.kind(), Some(ErrorCode::Overloaded), "a 1006, back off and retry: {error:?}");
    assert!(error.details_text().contains("max_in_flight_per_link"), "{error:?}");
    assert!(b.counter("mpreg_limit_exceeded_total", "limit", "max_in_flight_per_link").await >= 1);

    // A goes away: the call B was serving for it is cancelled, and the gauge comes back.
    a.node.shutdown().await;
    drop(a);
    wait_until("B's in-flight gauge to return to 0", || async { (gauge(&b).await == 0).then_some(()) }).await;
    let _ = tokio::time::timeout(SOON, first_call).await;
}

#[actix_rt::test]
async fn a_call_refused_at_the_serving_nodes_max_in_flight_is_a_1006() {
    let cluster = cluster_id("peer-max-in-flight");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let gate = Arc::new(Notify::new());
    let held = held(&gate, 1);
    // B admits one waiting request in all, whoever asks (clients or peers).
    let b_settings = Settings { max_in_flight: 1, ..settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))) };
    let b = TestNode::start(b_settings, vec![held]).await;
    wait_linked(&a, "B").await;
    let first = a.client().await;
    let first_call = tokio::spawn(async move { first.call("held", vec![json!(1)]).await });
    wait_until("B to serve one call for A", || async { (b.node.metrics().admission().in_flight() == 1).then_some(()) })
        .await;
    let result = wait_until("held to be routable", || async {
        let result = a.client().await.call("held", vec![json!(2)]).await;
        (rpc_error_kind(&result) != Some(ErrorCode::NotFound)).then_some(result)
    })
    .await;
    let error = rpc_error(result);
    assert_eq!(error.kind(), Some(ErrorCode::Overloaded), "back off and retry, not a lost route: {error:?}");
    let details = error.details_text();
    assert!(details.contains("node=B") && details.contains("max_in_flight"), "{details}");
    assert_eq!(b.node.metrics().limit_exceeded_count("max_in_flight"), 1);
    // The held call is B's to finish; it still gets its answer.
    gate.notify_one();
    let answer = tokio::time::timeout(SOON, first_call).await.expect("the held call ends").expect("task");
    assert_eq!(answer.unwrap(), json!(1));
}

fn rpc_error_kind(result: &Result<Value, mpreg::ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(_) => None,
        Err(e) => rpc_error(Err(e.clone())).kind(),
    }
}

// ---------------------------------------------------------------------------------------
// The command line

fn mpreg() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"));
    command.env("RUST_LOG", "info").env("NO_COLOR", "1");
    command
}

#[test]
fn keys_init_and_issue_write_private_files_that_a_node_accepts() {
    let dir = std::env::temp_dir().join(format!("mpreg-keys-cli-{}-{}", std::process::id(), trust::fresh_nonce()));
    let out = mpreg().args(["keys", "init"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let public = std::fs::read_to_string(dir.join("cluster.pub")).unwrap();
    assert_eq!(printed.trim(), public.trim());
    assert_eq!(public.trim().len(), 64);
    // A second init would orphan every certificate: refused.
    let again = mpreg().args(["keys", "init"]).arg(&dir).output().unwrap();
    assert!(!again.status.success());

    let out = mpreg()
        .args(["keys", "issue"])
        .arg(&dir)
        .args(["node-a", "--cluster-id", "c1", "--valid-days", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(path, dir.join("node-a.cred"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in [dir.join("cluster.key"), path.clone()] {
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
        }
    }
    let credentials = trust::Credentials::load(&path, trust::unix_seconds()).expect("a valid credentials file");
    assert_eq!((credentials.body().node.as_str(), credentials.body().cluster_id.as_str()), ("node-a", "c1"));
    assert_eq!(trust::to_hex(credentials.authority().as_bytes()), public.trim());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_open_node_refuses_a_non_loopback_host_unless_insecure() {
    let out = mpreg()
        .args(["server", "start", "--host", "0.0.0.0", "--port", "0", "--monitoring-port", "0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address") && stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("--credentials"), "{stderr}");
}

#[actix_rt::test]
async fn an_authenticated_relay_cannot_forge_another_nodes_goodbye_entries_or_replies() {
    use mpreg_actors::fabric::trust::{link_transcript, LinkEnd, LinkSide};
    use mpreg_actors::fabric::wire::{goodbye_text, CatalogDelta};

    let cluster = cluster_id("forging-relay");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let b_fun = FunctionSpec::sync("b_fun", plus(1)).inline();
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))), vec![b_fun]).await;
    let client = a.client().await;
    assert_eq!(wait_callable(&client, "b_fun", vec![json!(1)]).await, json!(2));
    let topology = a.topology().await;
    let b_instance = member(&topology, "B").expect("A knows B")["instance_id"].as_str().unwrap().to_owned();
    let a_instance = member(&topology, "A").expect("A lists itself")["instance_id"].as_str().unwrap().to_owned();

    // M: a real member of the cluster (its certificate is valid), dialling A by hand.
    let m = keys.authority.issue("M", &cluster, trust::unix_seconds(), 3600).unwrap();
    let m_nonce = trust::fresh_nonce();
    let m_catalog = CatalogDelta {
        node: "M".into(),
        instance_id: "m1".into(),
        cluster_id: cluster.clone(),
        version: 1,
        advertised_at: 0.0,
        ttl_s: 60.0,
        functions: vec![],
        queues: vec![],
        about: vec![],
        clusters: vec![],
        proof: None,
    };
    let signed_catalog = CatalogDelta { proof: Some(m.seal(serde_json::to_string(&m_catalog).unwrap())), ..m_catalog };
    let mut ws = raw_connect(a.url()).await;
    let mut status = peer_status("M", "m1", &cluster);
    status["auth"] = json!({"nonce": m_nonce, "certificate": m.certificate(), "catalog": signed_catalog});
    raw_send(&mut ws, &status).await;
    let answer = raw_next(&mut ws, SOON).await.expect("A's STATUS");
    assert_eq!((&answer["role"], &answer["kind"]), (&json!("server"), &json!("status")), "{answer}");
    let a_nonce = answer["auth"]["nonce"].as_str().expect("A's nonce").to_owned();
    let transcript = link_transcript(
        LinkSide::Dialer,
        &cluster,
        LinkEnd { node: "M", instance_id: "m1", nonce: &m_nonce },
        LinkEnd { node: "A", instance_id: &a_instance, nonce: &a_nonce },
    );
    let proof = json!({"role": "server", "kind": "proof", "signature": m.sign_hex(&transcript)});
    ws.send(Message::Text(proof.to_string())).await.unwrap();
    wait_linked(&a, "M").await;

    // Statements about B that only B can make, made by M.
    let m_signed_goodbye = m.seal(goodbye_text(&cluster, "B", &b_instance));
    let forged_entries = CatalogDelta {
        node: "B".into(),
        instance_id: b_instance.clone(),
        cluster_id: cluster.clone(),
        version: 1_000_000,
        advertised_at: 0.0,
        ttl_s: 60.0,
        functions: vec![],
        queues: vec![],
        about: vec![],
        clusters: vec![],
        proof: None,
    };
    let forged_signed =
        CatalogDelta { proof: Some(m.seal(serde_json::to_string(&forged_entries).unwrap())), ..forged_entries.clone() };
    let frames = [
        json!({"role": "fabric-gossip", "kind": "departed", "from": "M", "node": "B", "instance_id": b_instance}),
        json!({"role": "fabric-gossip", "kind": "departed", "from": "M", "node": "B", "instance_id": b_instance,
               "proof": m_signed_goodbye}),
        json!({"role": "fabric-gossip", "kind": "catalog", "from": "M", "deltas": [forged_entries]}),
        json!({"role": "fabric-gossip", "kind": "catalog", "from": "M", "deltas": [forged_signed]}),
        json!({"role": "server", "kind": "goodbye", "node": "B", "instance_id": b_instance, "proof": m_signed_goodbye}),
        json!({"role": "fabric-message", "id": format!("A:{a_instance}:1:0000000000000000"), "source": "B",
               "target": "A", "path": ["B"], "hops_left": 5,
               "body": {"kind": "reply", "outcome": {"status": "ok", "value": "forged"}}}),
    ];
    for frame in &frames {
        ws.send(Message::Text(frame.to_string())).await.unwrap();
    }
    wait_until("A to drop the forged statements", || async {
        let unsigned = a.counter("mpreg_fabric_dropped_total", "reason", "unsigned_statement").await;
        let forged = a.counter("mpreg_fabric_dropped_total", "reason", "forged_statement").await;
        let stray = a.counter("mpreg_fabric_dropped_total", "reason", "stray_reply").await;
        (unsigned >= 2 && forged >= 2 && stray >= 1).then_some(())
    })
    .await;
    // One frame repeating the forged entries 500 times costs one signature check: an
    // entry set per node per frame, the first.
    let forged_before = a.counter("mpreg_fabric_dropped_total", "reason", "forged_statement").await;
    let repeated =
        json!({"role": "fabric-gossip", "kind": "catalog", "from": "M", "deltas": vec![&forged_signed; 500]});
    let once = json!({"role": "fabric-gossip", "kind": "catalog", "from": "M", "deltas": [&forged_signed]});
    for frame in [repeated, once] {
        ws.send(Message::Text(frame.to_string())).await.unwrap();
    }
    let forged_after = wait_until("A to drop both frames' forged entries", || async {
        let forged = a.counter("mpreg_fabric_dropped_total", "reason", "forged_statement").await;
        (forged >= forged_before + 2).then_some(forged)
    })
    .await;
    assert_eq!(forged_after, forged_before + 2, "one check per frame");
    let topology = a.topology().await;
    assert!(linked(&topology, "B"), "B is still there: {topology:#}");
    assert_eq!(member(&topology, "B").unwrap()["instance_id"], json!(b_instance));
    assert_eq!(client.call("b_fun", vec![json!(9)]).await.unwrap(), json!(10), "B's entries are B's");
    drop(b);
}

#[actix_rt::test]
async fn fabric_inputs_from_an_admitted_peer_are_bounded() {
    // Open mode on loopback: anyone may become a peer, so the bounds are what stands.
    let cluster = cluster_id("fabric-bounds");
    let a_settings = Settings { max_catalog_entries_per_node: 2, ..settings("A", &cluster, &[], None) };
    let a = TestNode::start(a_settings, vec![]).await;
    let mut ws = raw_connect(a.url()).await;
    let function = |name: &str| json!({"name": name, "function_id": name, "version": "1.0.0", "resources": []});
    let mut status = peer_status("spy", "s1", &cluster);
    status["functions"] = json!([function("f1"), function("f2"), function("f3")]);
    raw_send(&mut ws, &status).await;
    let answer = raw_next(&mut ws, SOON).await.expect("A's STATUS");
    assert_eq!(answer["kind"], "status", "{answer}");
    // A catalog request naming A 4,000 times is answered with A's entries once (each
    // repeat used to copy and sign them again, into one frame).
    let request = json!({"role": "fabric-gossip", "kind": "catalog-request", "from": "spy", "nodes": vec!["A"; 4000]});
    ws.send(Message::Text(request.to_string())).await.unwrap();
    // Two catalog frames come: the snapshot every new link gets, and the answer.
    let mut catalogs = 0;
    while catalogs < 2 {
        let frame = raw_next(&mut ws, SOON).await.expect("A's frames");
        if frame["kind"] == "catalog" {
            catalogs += 1;
            let deltas = frame["deltas"].as_array().expect("deltas");
            assert_eq!(deltas.len(), 1, "A's entries, once: {} deltas", deltas.len());
            assert_eq!(deltas[0]["node"], "A");
        }
    }
    // 3000 invented nodes in one digest, every one with a URL to dial.
    let members: Vec<Value> = (0..3000)
        .map(|i| {
            json!({"info": {"node": format!("fake{i}"), "instance_id": "f", "cluster_id": cluster,
                            "url": format!("ws://127.0.0.1:{}", 1 + i % 50)},
                   "heartbeat": 1, "catalog_version": 1, "neighbours": []})
        })
        .collect();
    let digest = json!({"role": "fabric-gossip", "kind": "members", "from": "spy", "members": members});
    ws.send(Message::Text(digest.to_string())).await.unwrap();
    wait_until("A to count the refused digest entries", || async {
        (a.counter("mpreg_limit_exceeded_total", "limit", "max_new_members_per_frame").await >= 1).then_some(())
    })
    .await;
    let topology = a.topology().await;
    let fakes =
        topology["nodes"].as_array().unwrap().iter().filter(|n| n["node"].as_str().unwrap().starts_with("fake"));
    assert!(fakes.count() <= 16, "at most max_new_members_per_frame (16) learned: {topology:#}");
    // The learned ones are dialled at most max_dials_per_round (4) per gossip round.
    wait_until("A to defer dials beyond max_dials_per_round", || async {
        (a.counter("mpreg_limit_exceeded_total", "limit", "max_dials_per_round").await >= 1).then_some(())
    })
    .await;
    // The spy's three functions exceed max_catalog_entries_per_node (2): not stored.
    assert!(a.counter("mpreg_limit_exceeded_total", "limit", "max_catalog_entries_per_node").await >= 1);
    let catalog = a.get("/catalog").await;
    assert!(!catalog.contains("\"f1\""), "{catalog}");
}

#[actix_rt::test]
async fn queues_are_advertised_in_signed_catalog_entries_and_used_across_the_cluster() {
    let cluster = cluster_id("trusted-queues");
    let keys = Keys::new(&cluster);
    let a = TestNode::start(settings("A", &cluster, &[], Some(&keys.issue("A"))), vec![]).await;
    let b = TestNode::start(settings("B", &cluster, &[a.url()], Some(&keys.issue("B"))), vec![]).await;
    wait_linked(&a, "B").await;
    b.client().await.queue_create("jobs", json!({})).await.expect("created on B");
    let on_a = a.client().await;
    let on_a = &on_a;
    let id = wait_until("A to send to B's queue", move || async move {
        on_a.queue_send("jobs", json!({"n": 1}), Default::default()).await.ok()
    })
    .await;
    let got = b.client().await.queue_receive("jobs", 1, 0.0, None).await.unwrap();
    assert_eq!((got[0].id.clone(), got[0].payload.clone()), (id, json!({"n": 1})));
    // A holds B's queues as B signed them: the name is in the signed text.
    let catalog: Value = serde_json::from_str(&a.get("/catalog").await).expect("catalog is JSON");
    let entry = catalog["nodes"].as_array().and_then(|n| n.iter().find(|e| e["node"] == "B")).expect("B's entries");
    let signed: Value = serde_json::from_str(entry["proof"]["signed"].as_str().expect("signed text")).unwrap();
    assert_eq!(signed["queues"], json!(["jobs"]), "{entry:#}");
    for node in [&a, &b] {
        let metrics = node.get("/metrics").await;
        assert!(!metrics.contains("forged_statement") && !metrics.contains("unsigned_statement"), "{metrics}");
    }
}

/// `settings` with SWIM periods long enough that a raw peer (it answers no probe) is not
/// suspected, and its link closed, during a test.
fn quiet(settings: Settings) -> Settings {
    Settings { probe_interval_s: 30.0, suspect_after_s: 60.0, remove_after_s: 120.0, ..settings }
}

/// A raw websocket admitted by `a` (open mode) as node `peer`, instance `p1`, and `a`'s
/// STATUS answer.
async fn raw_peer(a: &TestNode, cluster: &str) -> (common::ws::Ws, Value) {
    let mut ws = raw_connect(a.url()).await;
    raw_send(&mut ws, &peer_status("peer", "p1", cluster)).await;
    let answer = raw_next(&mut ws, SOON).await.expect("A's STATUS");
    assert_eq!(answer["kind"], "status", "{answer}");
    (ws, answer)
}

#[actix_rt::test]
async fn a_peer_that_does_not_read_holds_at_most_the_byte_bound_of_flooded_publishes() {
    // Every publish is flooded to every peer link. A peer that never reads gets what its
    // link queue takes in bytes (max_outbound_bytes_per_connection, 16 MiB), not 4,096
    // frames of up to 16 MiB each; the rest is dropped and counted.
    const PUBLISHES: usize = 200;
    let cluster = cluster_id("non-reading-peer");
    let a = TestNode::start(quiet(settings("A", &cluster, &[], None)), vec![]).await;
    let (_silent, _) = raw_peer(&a, &cluster).await;
    let client = a.client().await;
    let before = rss_mib();
    // Larger than pubsub_backlog_max_message_bytes: no backlog keeps them.
    let payload = json!("f".repeat(1_100_000));
    for _ in 0..PUBLISHES {
        client.publish("flood.big", payload.clone()).await.expect("publish");
    }
    let dropped = poll_until_async("A to drop flooded publishes for the silent peer", SOON, || async {
        let dropped = a.node.metrics().fabric_dropped_count("link_queue_full");
        (dropped >= (PUBLISHES / 2) as u64).then_some(dropped)
    })
    .await;
    let grown = rss_mib().saturating_sub(before);
    println!("{PUBLISHES} publishes of 1 MB, a peer that does not read: {dropped} dropped, RSS +{grown} MiB");
    assert!(grown < 96, "RSS grew {grown} MiB");
    // A goes on serving.
    assert_eq!(client.call("echo", vec![json!(1)]).await.unwrap(), json!(1));
}

#[actix_rt::test]
async fn a_call_served_for_a_peer_stops_at_max_request_timeout() {
    // A peer may send a call without `timeout_ms` (or with a huge one) to a function that
    // never ends: it holds a place in the node's max_in_flight only until
    // max_request_timeout_s, like a client's request.
    let cluster = cluster_id("served-deadline");
    // 3 s: long enough that a loaded machine sees both calls running.
    let a_settings =
        Settings { request_timeout_s: 3.0, max_request_timeout_s: 3.0, ..quiet(settings("A", &cluster, &[], None)) };
    let forever = FunctionSpec::asynchronous("forever", |_: Value| async move {
        std::future::pending::<()>().await;
        Value::Null
    });
    let a = TestNode::start(a_settings, vec![forever]).await;
    let (mut ws, _) = raw_peer(&a, &cluster).await;
    let identity = json!({"name": "forever", "function_id": "forever", "version": "1.0.0", "resources": []});
    for (i, timeout_ms) in [(1, None), (2, Some(u64::MAX))] {
        let mut body = json!({"kind": "call", "command": "c", "identity": identity, "args": [1], "kwargs": {}});
        if let Some(ms) = timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        let call = json!({"role": "fabric-message", "id": format!("peer:p1:{i}:0000000000000000"), "source": "peer",
            "target": "A", "path": ["peer"], "hops_left": 5, "body": body});
        ws.send(Message::Text(call.to_string())).await.unwrap();
    }
    wait_until("both calls to be served", || async { (a.node.metrics().admission().in_flight() == 2).then_some(()) })
        .await;
    wait_until("both calls stopped at max_request_timeout_s", || async {
        (a.node.metrics().admission().in_flight() == 0).then_some(())
    })
    .await;
    assert_eq!(a.counter("mpreg_limit_exceeded_total", "limit", "max_request_timeout_s").await, 2);
}

#[actix_rt::test]
async fn swim_learns_no_member_the_membership_has_not_admitted() {
    // An admitted peer invents SWIM members: instances of itself as senders, and strangers
    // in a push-pull. SWIM would track them, probe them and pass them on to everyone.
    let cluster = cluster_id("swim-strangers");
    let a = TestNode::start(quiet(settings("A", &cluster, &[], None)), vec![]).await;
    let (mut ws, answer) = raw_peer(&a, &cluster).await;
    let a_member = format!("A#{}", answer["info"]["instance_id"].as_str().expect("A's instance"));
    let pending = |topology: &Value| topology["pending_updates"].as_u64().expect("pending_updates");
    wait_linked(&a, "peer").await;
    // What A has to pass on settles once the peer's join is spread.
    let settled = wait_until("A's news about the peer to be passed on", || async {
        let topology = a.topology().await;
        (pending(&topology) <= 2).then_some(pending(&topology))
    })
    .await;
    let strangers: Vec<Value> =
        (0..1000).map(|i| json!({"member": format!("ghost{i}#g"), "incarnation": 0, "liveness": "alive"})).collect();
    let push_pull = json!({"role": "fabric-gossip", "kind": "swim", "from": "peer#p1", "to": a_member,
        "message": {"kind": "push-pull", "members": strangers, "reply": false}});
    ws.send(Message::Text(push_pull.to_string())).await.unwrap();
    for i in 0..100 {
        let gossip = json!({"role": "fabric-gossip", "kind": "swim", "from": format!("peer#fake{i}"), "to": a_member,
            "message": {"kind": "gossip", "rumors": []}});
        ws.send(Message::Text(gossip.to_string())).await.unwrap();
    }
    wait_until("A to drop the messages of invented instances", || async {
        (a.counter("mpreg_fabric_dropped_total", "reason", "swim_unknown_member").await == 100).then_some(())
    })
    .await;
    let topology = a.topology().await;
    assert!(pending(&topology) <= settled, "A took up invented members to spread: {topology:#}");
    let nodes: Vec<&str> = topology["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["A", "peer"], "{topology:#}");
}
