//! Federation between node processes: clusters A–B–C in a line, one node each, B bridging
//! (it dials A directly and C through a [`Proxy`] the test can cut). Each cluster has its
//! own authority, node credentials and route key; each node pins the authorities of the
//! clusters it allows.
//!
//! - a command from A with `target_cluster = C` runs on C (only C serves `add`), across
//!   both bridges; one of a function C serves but does not export is refused (1001); from a2, a node of A without bridges, through a1 (its catalog says it
//!   reaches C);
//! - without `target_cluster`, `add` (nothing in A has it) runs in C, the nearest cluster
//!   that exports it (B, nearer, exports nothing), from a1 and from a2; `multiply`, which
//!   no cluster exports, is 1001;
//! - C rotates its route key live: B learns the new key without a restart;
//! - cut B–C: the route is withdrawn and the call fails with 1005 at once;
//! - heal (B redials): restored;
//! - a reloaded import policy (SIGHUP) hides C from A at once;
//! - a node of cluster D, which A neither allows nor pins, is refused (`peer refused`,
//!   counted) and routes nowhere.
//!
//! A cluster that signs with a route key retired after its overlap (X rotated with a
//! one-second overlap, then restarted with its old key directory) is refused by its
//! neighbour (`retired_key`, no route), and routed again once it signs with the new key.
//!
//! A ring of four clusters A–B–C–D converges with every selected path loop-free, a call
//! from A reaches the far cluster C, what A publishes on an exported topic reaches a
//! subscriber in every cluster exactly once (and an unexported one stays in A), and
//! cutting A–B reroutes A the other way round.
//!
//! Run: `cargo test --test federation_processes`.

mod common;
#[path = "common/conformance_replay.rs"]
mod replay;

use std::path::Path;
use std::time::{Duration, Instant};

use common::keys::Keys;
use common::proxy::Proxy;
use common::{poll_until_async, rpc_error, TempFile};
use mpreg::client::{CacheOptions, QueueSendOptions};
use mpreg::{Client, RpcCommand};
use mpreg_actors::fabric::trust;
use mpreg_actors::federation::keys::rotate_in_dir;
use mpreg_actors::protocol::ErrorCode;
use replay::ServerProcess;
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(30);
const SOON: Duration = Duration::from_secs(20);

/// One cluster: its authority (and route key, in the same directory).
struct Cluster {
    id: String,
    keys: Keys,
}

impl Cluster {
    fn new(id: &str) -> Cluster {
        let keys = Keys::new(id);
        rotate_in_dir(&keys.dir, id, trust::unix_seconds(), 60).expect("first route key");
        Cluster { id: id.to_owned(), keys }
    }
}

/// A settings file for a node of `me` bridging to `allowed` (pinned), dialling `peers`,
/// letting other clusters call the functions `exports`, receive its publishes on
/// `news.#`, use its queues `jobs.#` and read its cache namespace `shared`.
fn federation_settings(me: &Cluster, allowed: &[&Cluster], peers: &[&str], exports: &[&str]) -> TempFile {
    federation_settings_keyed(me, &me.keys.dir, allowed, peers, exports)
}

/// [`federation_settings`] with the route key read from `route_key_dir` (`route.key`).
fn federation_settings_keyed(
    me: &Cluster,
    route_key_dir: &Path,
    allowed: &[&Cluster],
    peers: &[&str],
    exports: &[&str],
) -> TempFile {
    let allowed_ids: Vec<&str> = allowed.iter().map(|c| c.id.as_str()).collect();
    let trust: Vec<String> =
        allowed.iter().map(|c| format!("{} = \"{}\"", c.id, c.keys.authority.public_hex())).collect();
    let text = format!(
        "[mpreg]\n[mpreg.federation]\nallowed_clusters = {}\npeers = {}\nroute_key_dir = {}\nannounce_interval_s = 1.0\n\
         [mpreg.federation.exports]\nfunctions = {}\ntopics = [\"news.#\"]\nqueues = [\"jobs.#\"]\ncache = [\"shared\"]\n\
         [mpreg.federation.trust]\n{}\n",
        json!(allowed_ids),
        json!(peers),
        json!(route_key_dir.display().to_string()),
        json!(exports),
        trust.join("\n"),
    );
    TempFile::new(&format!("federation-{}", me.id), &text)
}

/// Starts node `name` of `cluster` with its credentials: with `settings` (federation) or
/// none, serving `functions`, joined to the nodes of its cluster at `peers`.
async fn start(
    name: &str,
    cluster: &Cluster,
    settings: Option<&TempFile>,
    functions: &[&str],
    peers: &[&str],
) -> ServerProcess {
    start_with(name, cluster, settings, functions, peers, None).await
}

/// [`start`], with `data_dir` as the node's data dir (durable queues).
async fn start_with(
    name: &str,
    cluster: &Cluster,
    settings: Option<&TempFile>,
    functions: &[&str],
    peers: &[&str],
    data_dir: Option<&std::path::Path>,
) -> ServerProcess {
    let credentials = cluster.keys.issue(name);
    let mut args: Vec<String> =
        ["server", "start", "--port", "0", "--monitoring-port", "0"].iter().map(|s| (*s).to_owned()).collect();
    if let Some(dir) = data_dir {
        args.extend(["--data-dir".into(), dir.display().to_string()]);
    }
    if let Some(settings) = settings {
        args.extend(["--config".into(), settings.arg().to_owned()]);
    }
    for peer in peers {
        args.extend(["--peer".into(), (*peer).to_owned()]);
    }
    args.extend(["--name".into(), name.into(), "--cluster-id".into(), cluster.id.clone()]);
    args.extend(["--credentials".into(), credentials.display().to_string()]);
    for f in functions {
        args.extend(["--functions".into(), (*f).to_owned()]);
    }
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), &args, READY)
    })
    .await
    .expect("start task")
    .unwrap_or_else(|e| panic!("node {name} does not start: {e}"))
}

/// `add(a, b)` in `cluster` (only C serves `add`: the demo pack).
fn add_in(cluster: &str, a: i64, b: i64) -> RpcCommand {
    RpcCommand { target_cluster: Some(cluster.to_owned()), ..RpcCommand::new("r", "add", vec![json!(a), json!(b)]) }
}

async fn routes(node: &ServerProcess) -> Value {
    let url = format!("{}/routes", node.monitoring_url.as_deref().expect("monitoring URL printed"));
    mpreg::demo::http_get_json(&url).await.unwrap_or(Value::Null)
}

async fn metrics(node: &ServerProcess) -> String {
    let url = format!("{}/metrics", node.monitoring_url.as_deref().expect("monitoring URL printed"));
    mpreg::demo::http_request("GET", &url).await.map(|(_, body)| body).unwrap_or_default()
}

/// The selected path to `destination` in `/routes`, if any.
fn selected(routes: &Value, destination: &str) -> Option<Vec<String>> {
    routes["routes"]
        .as_array()?
        .iter()
        .find(|r| r["destination"] == destination)
        .and_then(|r| r["selected"].as_array().map(|p| p.iter().filter_map(Value::as_str).map(str::to_owned).collect()))
}

/// Queues and the cache's L4 across the line A–B–C, from a1 (bridged to B) and a2
/// (through a1): C owns the durable queue `jobs` (every cluster exports `jobs.#`) and
/// `private` (not exported), and holds `shared/k` and `secret/k` in its cache (only
/// `shared` exported).
async fn queues_and_cache_across_clusters(a1: &Client, a2: &Client, node_a: &ServerProcess, node_c: &ServerProcess) {
    let on_c = Client::connect(&node_c.url).await.expect("client connects to C");
    for queue in ["jobs", "private"] {
        on_c.queue_create(queue, json!({"durable": true})).await.expect("queue on C");
    }
    let to_c = || QueueSendOptions { target_cluster: Some("fed-c".into()), ..Default::default() };
    // A send with target_cluster: answered with the id once C's owner synced it.
    let id = a1.queue_send("jobs", json!({"n": 1}), to_c()).await.expect("send to C's queue");
    // Without target_cluster: nothing in A has `jobs`; B (nearer) has none (1001), C has it.
    let id2 = a2.queue_send("jobs", json!({"n": 2}), Default::default()).await.expect("send found in C");
    // The CLI, as a user: `--cluster`.
    let url = node_a.url.clone();
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
            .args(["client", "queue", "send", "jobs", r#"{"n": 3}"#, "--cluster", "fed-c", "--url", &url])
            .output()
            .expect("mpreg client queue send runs")
    })
    .await
    .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let stats = a1.queue_stats_in("fed-c", "jobs").await.expect("stats of C's queue");
    assert_eq!(stats["visible"], 3, "{stats}");
    let got = on_c.queue_receive("jobs", 10, 0.0, None).await.expect("receive on C");
    let payloads: Vec<&Value> = got.iter().map(|m| &m.payload).collect();
    assert_eq!(payloads, [&json!({"n": 1}), &json!({"n": 2}), &json!({"n": 3})]);
    assert_eq!((got[0].id.as_str(), got[1].id.as_str()), (id.as_str(), id2.as_str()));

    let refused = |result: Result<String, mpreg::ClientError>| match result {
        Err(mpreg::ClientError::Rpc(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    // Not exported by C: 1001 naming the cluster and the queue, from C's bridge node.
    let e = refused(a1.queue_send("private", json!(1), to_c()).await);
    assert_eq!(e.code, ErrorCode::NotFound.as_u16(), "{e:?}");
    assert!(e.details_text().contains("cluster fed-c does not export queue private"), "{e:?}");
    // Exported, but no such queue in C: C's own 1001.
    let e = refused(a1.queue_send("jobs.missing", json!(1), to_c()).await);
    assert_eq!(e.code, ErrorCode::NotFound.as_u16(), "{e:?}");
    assert!(e.details_text().contains("unknown queue: jobs.missing"), "{e:?}");
    // Oversized for the queue on C: C's queue refuses it (1002), nothing is stored.
    on_c.queue_create("jobs.small", json!({"durable": true, "max_message_bytes": 64})).await.expect("small queue");
    let e = refused(a1.queue_send("jobs.small", json!("x".repeat(1000)), to_c()).await);
    assert_eq!(e.code, ErrorCode::InvalidRequest.as_u16(), "{e:?}");
    assert_eq!(on_c.queue_stats("jobs.small").await.unwrap()["visible"], 0);
    // Receives do not cross (1002); a cluster nobody routes to is 1005 at once.
    let receive = a1.queue_op("receive", Some("jobs"), json!({"target_cluster": "fed-c"})).await;
    assert_eq!(rpc_error(receive).code, ErrorCode::InvalidRequest.as_u16());
    let options = QueueSendOptions { target_cluster: Some("fed-z".into()), ..Default::default() };
    let e = refused(a1.queue_send("jobs", json!(1), options).await);
    assert_eq!(e.code, ErrorCode::Unreachable.as_u16(), "{e:?}");

    // Cache L4: C's values, read from A when asked for (`l4`), kept in A's L1 briefly.
    on_c.cache_put("shared", "k", json!({"from": "c"}), CacheOptions::default()).await.expect("put on C");
    on_c.cache_put("secret", "k", json!(1), CacheOptions::default()).await.expect("put on C");
    let l4 = || CacheOptions::default().levels(&["l1", "l2", "l3", "l4"]);
    assert!(a1.cache_get("shared", "k", CacheOptions::default()).await.unwrap().is_none(), "not without l4");
    let hit = a2.cache_get("shared", "k", l4()).await.expect("L4 get").expect("found in C");
    assert_eq!((hit.value, hit.level.as_str(), hit.cluster.as_deref()), (json!({"from": "c"}), "l4", Some("fed-c")));
    let copy = a2.cache_get("shared", "k", l4()).await.unwrap().expect("kept in a2's L1");
    assert_eq!(copy.level, "l1");
    assert!(copy.expires_in.is_some_and(|s| s <= 10.0), "{copy:?}");
    // A key over the bound is refused where the request starts (1002), never sent.
    let long = a1.cache_get("shared", &"k".repeat(5000), l4()).await;
    assert!(
        matches!(long, Err(mpreg::ClientError::Rpc(ref e)) if e.code == ErrorCode::InvalidRequest.as_u16()),
        "{long:?}"
    );
    // Not exported by C (B exports `shared` but holds nothing): a miss, not an error.
    assert!(a1.cache_get("secret", "k", l4()).await.expect("L4 miss").is_none());
    drop(on_c);
}

#[actix_rt::test]
async fn a_line_of_three_clusters_routes_withdraws_and_heals() {
    let (a, b, c, d) = (Cluster::new("fed-a"), Cluster::new("fed-b"), Cluster::new("fed-c"), Cluster::new("fed-d"));
    let a_settings = federation_settings(&a, &[&b], &[], &[]);
    // C lets other clusters call add, not multiply (both in its demo pack).
    let c_settings = federation_settings(&c, &[&b], &[], &["add"]);
    let node_a = start("a1", &a, Some(&a_settings), &[], &[]).await;
    let c_data = tempfile::tempdir().expect("data dir for c1");
    let node_c = start_with("c1", &c, Some(&c_settings), &["demo"], &[], Some(c_data.path())).await;
    let proxy = Proxy::to(&node_c.url).await;
    let b_settings = federation_settings(&b, &[&a, &c], &[&node_a.url, &proxy.url], &[]);
    let node_b = start("b1", &b, Some(&b_settings), &[], &[]).await;

    // A learns C through B.
    let path = poll_until_async("A routes to C via B", SOON, || async {
        selected(&routes(&node_a).await, "fed-c").filter(|p| p.len() == 3)
    })
    .await;
    assert_eq!(path, ["fed-a", "fed-b", "fed-c"]);
    let client = Client::connect(&node_a.url).await.expect("client connects to A");
    // Only C serves add: the answer proves the command crossed both bridges and ran there.
    let value = client.request(vec![add_in("fed-c", 2, 3)]).await.expect("cross-cluster call");
    assert_eq!(value["r"], 5);
    // A has no add of its own: a command without target_cluster is asked of the clusters
    // A reaches, nearest first: B (exports nothing: 1001), then C, which exports add.
    let elsewhere = client.request(vec![RpcCommand::new("r", "add", vec![json!(1), json!(2)])]).await;
    assert_eq!(elsewhere.expect("add found in C without target_cluster")["r"], 3);
    // C serves multiply but does not export it, and nothing else has it: 1001.
    let nowhere = rpc_error(client.request(vec![RpcCommand::new("r", "multiply", vec![json!(2), json!(3)])]).await);
    assert_eq!(nowhere.code, ErrorCode::NotFound.as_u16(), "{nowhere:?}");
    // C does not export multiply: refused on C's bridge node with 1001 naming the export
    // list, though C serves it.
    let multiply = RpcCommand {
        target_cluster: Some("fed-c".into()),
        ..RpcCommand::new("r", "multiply", vec![json!(2), json!(3)])
    };
    let not_exported = rpc_error(client.request(vec![multiply]).await);
    assert_eq!(not_exported.code, ErrorCode::NotFound.as_u16(), "{not_exported:?}");
    assert!(not_exported.details_text().contains("does not export multiply"), "{not_exported:?}");

    // A second node of A, without bridges of its own: a1 advertises that it reaches C,
    // so a2 sends its target_cluster commands through a1.
    let node_a2 = start("a2", &a, None, &[], &[&node_a.url]).await;
    let via_a1 = Client::connect(&node_a2.url).await.expect("client connects to a2");
    poll_until_async("a2 calls C through a1", SOON, || async {
        via_a1.request(vec![add_in("fed-c", 3, 4)]).await.ok().filter(|v| v["r"] == 7)
    })
    .await;
    // And without target_cluster: a2 has no match in A, so it asks the clusters a1 reaches.
    let value = via_a1.request(vec![RpcCommand::new("r", "add", vec![json!(4), json!(4)])]).await;
    assert_eq!(value.expect("a2 finds add in C through a1")["r"], 8);

    queues_and_cache_across_clusters(&client, &via_a1, &node_a, &node_c).await;
    // C reloads its export list (SIGHUP) without queues: a send to jobs is refused on C's
    // bridge node at once (1001).
    let no_queues = std::fs::read_to_string(c_settings.path()).unwrap().replace("queues = [\"jobs.#\"]", "queues = []");
    std::fs::write(c_settings.path(), no_queues).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &node_c.pid().to_string()]).status().unwrap();
    assert!(status.success());
    poll_until_async("C stops exporting its queues", SOON, || async {
        let options = QueueSendOptions { target_cluster: Some("fed-c".into()), ..Default::default() };
        match client.queue_send("jobs", json!({"late": true}), options).await {
            Err(mpreg::ClientError::Rpc(e)) if e.code == ErrorCode::NotFound.as_u16() => {
                e.details_text().contains("does not export queue jobs").then_some(())
            }
            _ => None,
        }
    })
    .await;

    // Rotate C's route key while it runs: C reads the file again, sends B the new chain
    // and signs with the new key; B trusts it without a restart, and calls keep working.
    let rotation = rotate_in_dir(&c.keys.dir, "fed-c", trust::unix_seconds(), 60).expect("rotation");
    assert_eq!(rotation.generation, 2);
    poll_until_async("B learns C's new route key", SOON, || async {
        routes(&node_b).await["keys"].to_string().contains(&rotation.key_id).then_some(())
    })
    .await;
    let value = client.request(vec![add_in("fed-c", 5, 5)]).await.expect("call after the rotation");
    assert_eq!(value["r"], 10);

    // Cut B–C: B withdraws C from A; the call fails with 1005 at once (no timeout).
    proxy.cut();
    proxy.set_open(false);
    let error = poll_until_async("A's call to C fails with 1005", SOON, || async {
        let started = Instant::now();
        let result = client.request(vec![add_in("fed-c", 1, 1)]).await;
        match result {
            Err(mpreg::ClientError::Rpc(e)) if e.code == ErrorCode::Unreachable.as_u16() => {
                Some((e, started.elapsed()))
            }
            _ => None,
        }
    })
    .await;
    assert!(error.1 < Duration::from_secs(2), "1005 took {:?}", error.1);
    assert!(format!("{:?}", error.0.details).contains("fed-c"), "{:?}", error.0);
    assert_eq!(selected(&routes(&node_a).await, "fed-c"), None, "withdrawn at A");
    // A queue send to C is refused at once too (no route), with the reason.
    let started = Instant::now();
    let options = QueueSendOptions { target_cluster: Some("fed-c".into()), ..Default::default() };
    match client.queue_send("jobs", json!({"cut": true}), options).await {
        Err(mpreg::ClientError::Rpc(e)) => {
            assert_eq!(e.code, ErrorCode::Unreachable.as_u16(), "{e:?}");
            assert!(e.details_text().contains("fed-c"), "{e:?}");
        }
        other => panic!("a send to a cut cluster answered {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "1005 took {:?}", started.elapsed());

    // Heal: B redials C, the route and the call come back.
    proxy.set_open(true);
    poll_until_async("A's call to C works again", SOON, || async {
        client.request(vec![add_in("fed-c", 20, 22)]).await.ok().filter(|v| v["r"] == 42)
    })
    .await;

    // D (not allowed nor pinned by A) dials A: refused, counted, and routes nowhere.
    let d_settings = federation_settings(&d, &[&a], &[&node_a.url], &[]);
    let node_d = start("d1", &d, Some(&d_settings), &[], &[]).await;
    poll_until_async("A refuses D's bridge", SOON, || async {
        metrics(&node_a).await.contains("reason=\"federation_refused\"").then_some(())
    })
    .await;
    let from_d = Client::connect(&node_d.url).await.expect("client connects to D");
    let refused = rpc_error(from_d.request(vec![add_in("fed-a", 1, 1)]).await);
    assert_eq!(refused.code, ErrorCode::Unreachable.as_u16());
    let bridges_of_a = routes(&node_a).await["bridges"].as_array().cloned().unwrap_or_default();
    assert!(bridges_of_a.iter().all(|b| b["cluster"] != "fed-d"), "{bridges_of_a:?}");

    // The explanation names the selected path and every candidate.
    let explained =
        mpreg::demo::http_get_json(&format!("{}/routes?destination=fed-c", node_a.monitoring_url.as_deref().unwrap()))
            .await
            .unwrap();
    assert_eq!(explained["selected"], json!(["fed-a", "fed-b", "fed-c"]));
    assert_eq!(explained["candidates"][0]["next_hop"], "fed-b");
    // The same through the CLI, as text; and --avoid B leaves no route (exit 1).
    let monitoring = node_a.monitoring_url.clone().unwrap();
    let explain = |extra: &'static [&'static str]| {
        let monitoring = monitoring.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
                .args(["client", "route", "explain", "fed-c", "--url", &monitoring])
                .args(extra)
                .output()
                .expect("mpreg client route explain runs")
        })
    };
    let text = explain(&[]).await.unwrap();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "{stdout}");
    assert!(stdout.contains("selected: fed-a -> fed-b -> fed-c"), "{stdout}");
    let url = node_a.url.clone();
    let call = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
            .args(["client", "call", "add", "[20, 1]", "--target-cluster", "fed-c", "--url", &url])
            .output()
            .expect("mpreg client call runs")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&call.stdout).trim(), "21", "{call:?}");
    let avoided = explain(&["--avoid", "fed-b"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&avoided.stdout);
    assert_eq!(avoided.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("filtered: avoided") && stdout.contains("selected: none"), "{stdout}");

    // Reload A's policies (SIGHUP): routes B announces for any cluster but B itself are
    // refused now; A drops its route to C at once, the route to B stays.
    let hidden = format!(
        "{}[mpreg.federation.import.neighbors.fed-b]\nallowed_destinations = [\"fed-b\"]\n",
        std::fs::read_to_string(a_settings.path()).unwrap()
    );
    std::fs::write(a_settings.path(), hidden).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &node_a.pid().to_string()]).status().unwrap();
    assert!(status.success());
    poll_until_async("A's policy hides C", SOON, || async {
        let routes = routes(&node_a).await;
        (selected(&routes, "fed-c").is_none() && selected(&routes, "fed-b").is_some()).then_some(())
    })
    .await;
    let hidden = rpc_error(client.request(vec![add_in("fed-c", 1, 1)]).await);
    assert_eq!(hidden.code, ErrorCode::Unreachable.as_u16());
    drop((client, from_d, via_a1, node_a2, node_b, node_d));
}

/// The value of `mpreg_federation_route_rejected_total{reason="REASON"}` on `node` (0 when
/// absent).
async fn rejected(node: &ServerProcess, reason: &str) -> f64 {
    let labels = format!("reason=\"{reason}\"");
    common::metrics::metric_value(&metrics(node).await, "mpreg_federation_route_rejected_total", &labels).unwrap_or(0.0)
}

/// Whether `node`'s `/routes` trusts `cluster`'s route key of `generation` now (`active`).
async fn key_active(node: &ServerProcess, cluster: &str, generation: u64) -> Option<bool> {
    let routes = routes(node).await;
    let keys = routes["keys"][cluster]["keys"].as_array()?.clone();
    keys.iter().find(|k| k["generation"] == generation).and_then(|k| k["active"].as_bool())
}

#[actix_rt::test]
async fn a_cluster_signing_with_a_retired_route_key_is_refused_until_it_signs_with_the_new_one() {
    // A (one node, the observer) and X (one node, dialling A). X's route key before its
    // rotation is kept aside, as an old backup of its key directory would keep it.
    let (a, x) = (Cluster::new("retire-a"), Cluster::new("retire-x"));
    let old_keys = tempfile::tempdir().expect("temp dir");
    std::fs::copy(x.keys.dir.join("route.key"), old_keys.path().join("route.key")).expect("old route key kept");
    // Announcements every 0.5 s valid 2 s: a bridge silent for 2 s is closed.
    let quick = |settings: TempFile| {
        let text = std::fs::read_to_string(settings.path()).unwrap();
        std::fs::write(
            settings.path(),
            text.replace("announce_interval_s = 1.0", "announce_interval_s = 0.5\nroute_ttl_s = 2.0"),
        )
        .unwrap();
        settings
    };
    let a_settings = quick(federation_settings(&a, &[&x], &[], &[]));
    let node_a = start("a1", &a, Some(&a_settings), &[], &[]).await;
    let x_settings = quick(federation_settings(&x, &[&a], &[&node_a.url], &[]));
    let x_old_settings = quick(federation_settings_keyed(&x, old_keys.path(), &[&a], &[&node_a.url], &[]));
    let node_x = start("x1", &x, Some(&x_settings), &[], &[]).await;
    poll_until_async("A routes to X", SOON, || async { selected(&routes(&node_a).await, "retire-x") }).await;

    // A bridge that carries announcements is not silent: the same bridge stays open while
    // X's announcements keep coming for three silent limits (6 s of epochs).
    let bridge = |routes: &Value| {
        routes["bridges"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["cluster"] == "retire-x"))
            .map(|b| b["link"].clone())
    };
    let epoch = |routes: &Value| {
        let route = routes["routes"].as_array()?.iter().find(|r| r["destination"] == "retire-x")?;
        route["candidates"].as_array()?.iter().filter_map(|c| c["epoch"].as_u64()).max()
    };
    let first = routes(&node_a).await;
    let (link, since) = (bridge(&first).expect("bridged to X"), epoch(&first).expect("an announcement from X"));
    poll_until_async("X announces for three silent limits", SOON, || async {
        epoch(&routes(&node_a).await).filter(|&e| e >= since + 6_000)
    })
    .await;
    assert_eq!(bridge(&routes(&node_a).await), Some(link), "a bridge carrying announcements was closed as silent");

    // X rotates with a one-second overlap; A learns the new key live, then the overlap
    // passes and A trusts only the new one (generation 1 no longer active).
    let rotation = rotate_in_dir(&x.keys.dir, "retire-x", trust::unix_seconds(), 1).expect("rotation");
    assert_eq!(rotation.generation, 2);
    poll_until_async("A learns X's new key and retires the old one", SOON, || async {
        let (old, new) = (key_active(&node_a, "retire-x", 1).await, key_active(&node_a, "retire-x", 2).await);
        (old == Some(false) && new == Some(true)).then_some(())
    })
    .await;
    assert_eq!(rejected(&node_a, "retired_key").await, 0.0, "X signs with its new key");
    assert!(selected(&routes(&node_a).await, "retire-x").is_some(), "routed under the new key");

    // X restarts with the old key directory: it signs with the retired key. A takes the
    // bridge (X's node certificate is valid) but refuses every announcement as
    // `retired_key`, and does not route to X.
    drop(node_x);
    poll_until_async("A withdraws X once its node is gone", SOON, || async {
        selected(&routes(&node_a).await, "retire-x").is_none().then_some(())
    })
    .await;
    let node_x = start("x1", &x, Some(&x_old_settings), &[], &[]).await;
    poll_until_async("A refuses X's announcements signed with the retired key", SOON, || async {
        let routes = routes(&node_a).await;
        let bridged = routes["bridges"].as_array().is_some_and(|b| b.iter().any(|b| b["cluster"] == "retire-x"));
        (bridged && rejected(&node_a, "retired_key").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(selected(&routes(&node_a).await, "retire-x"), None, "no route from a retired key");
    let client = Client::connect(&node_a.url).await.expect("client connects to A");
    let refused = rpc_error(client.request(vec![add_in("retire-x", 1, 1)]).await);
    assert_eq!(refused.code, ErrorCode::Unreachable.as_u16(), "{refused:?}");

    // X restarts with its current key: accepted again.
    drop(node_x);
    let node_x = start("x1", &x, Some(&x_settings), &[], &[]).await;
    poll_until_async("A routes to X again under the new key", SOON, || async {
        selected(&routes(&node_a).await, "retire-x")
    })
    .await;
    drop((client, node_x));
}

/// Every path selected in `routes` (by destination), each checked loop-free: it starts at
/// `me`, ends at its destination, and names no cluster twice.
fn loop_free_paths(routes: &Value, me: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut paths = std::collections::BTreeMap::new();
    for route in routes["routes"].as_array().into_iter().flatten() {
        let destination = route["destination"].as_str().unwrap_or_default().to_owned();
        let Some(path) = selected(routes, &destination) else { continue };
        let distinct: std::collections::BTreeSet<&String> = path.iter().collect();
        assert_eq!(distinct.len(), path.len(), "{me}: a loop in {path:?}");
        assert_eq!((path.first().map(String::as_str), path.last()), (Some(me), Some(&destination)), "{path:?}");
        paths.insert(destination, path);
    }
    paths
}

#[actix_rt::test]
async fn a_ring_of_four_clusters_converges_without_loops_and_reroutes_around_a_cut() {
    // A–B–C–D–A, one node each; A dials B through a proxy the test cuts, and D; B dials C;
    // C dials D. Only C serves (and exports) add.
    let [a, b, c, d] = ["ring-a", "ring-b", "ring-c", "ring-d"].map(Cluster::new);
    let d_settings = federation_settings(&d, &[&c, &a], &[], &[]);
    let node_d = start("d1", &d, Some(&d_settings), &[], &[]).await;
    let c_settings = federation_settings(&c, &[&b, &d], &[&node_d.url], &["add"]);
    let c_data = tempfile::tempdir().expect("data dir for c1");
    let node_c = start_with("c1", &c, Some(&c_settings), &["demo"], &[], Some(c_data.path())).await;
    let b_settings = federation_settings(&b, &[&a, &c], &[&node_c.url], &[]);
    let node_b = start("b1", &b, Some(&b_settings), &[], &[]).await;
    let proxy = Proxy::to(&node_b.url).await;
    let a_settings = federation_settings(&a, &[&b, &d], &[&proxy.url, &node_d.url], &[]);
    let node_a = start("a1", &a, Some(&a_settings), &[], &[]).await;
    let ring = [(&node_a, "ring-a"), (&node_b, "ring-b"), (&node_c, "ring-c"), (&node_d, "ring-d")];

    // Converged: every node routes to the three others on shortest paths (at most two
    // hops; longer ones may be selected on the way), every path loop-free at every look;
    // the far cluster C is two hops from A, through B (equal paths: the smaller next hop).
    for (node, me) in ring {
        poll_until_async(&format!("{me} routes to every other cluster on a shortest path"), SOON, || async {
            let paths = loop_free_paths(&routes(node).await, me);
            (paths.len() == 3 && paths.values().all(|p| p.len() <= 3)).then_some(())
        })
        .await;
    }
    // Polled: A may hold only the way through D until B's announcement of C arrives.
    poll_until_async("A selects C through B once both ways are known", SOON, || async {
        let path = selected(&routes(&node_a).await, "ring-c");
        (path.as_deref() == Some(&["ring-a".to_string(), "ring-b".into(), "ring-c".into()][..])).then_some(())
    })
    .await;
    let client = Client::connect(&node_a.url).await.expect("client connects to A");
    let value = client.request(vec![add_in("ring-c", 2, 40)]).await.expect("A calls the far cluster");
    assert_eq!(value["r"], 42);

    // Pub/sub across the ring: what A publishes on news.# (exported) reaches a subscriber
    // in every cluster, A's own included, exactly once though the ring offers two ways
    // round; secret.# (not exported) stays in A.
    let mut subscribers = Vec::new();
    for (node, me) in ring {
        let subscriber = Client::connect(&node.url).await.expect("subscriber connects");
        let stream = subscriber.subscribe(&["news.#", "secret.#"], None).await.expect("subscribed");
        subscribers.push((me, subscriber, stream));
    }
    for topic in ["news.1", "secret.1", "news.2"] {
        client.publish(topic, json!(topic)).await.expect("published");
    }
    for (me, _subscriber, stream) in &mut subscribers {
        let expected: &[&str] = if *me == "ring-a" { &["news.1", "news.2", "secret.1"] } else { &["news.1", "news.2"] };
        let mut got = Vec::new();
        let collect = async {
            while got.len() < expected.len() {
                match stream.next().await {
                    Some(message) => got.push(message.topic),
                    None => break,
                }
            }
        };
        let timed_out = tokio::time::timeout(SOON, collect).await.is_err();
        got.sort();
        assert!(!timed_out, "{me}: got only {got:?}");
        assert_eq!(got, expected, "{me}");
    }
    // A last publish: each subscriber's next message is it, not a late copy of the others.
    client.publish("news.3", json!(3)).await.expect("published");
    for (me, _subscriber, stream) in &mut subscribers {
        let next = tokio::time::timeout(SOON, stream.next()).await.ok().flatten().map(|m| m.topic);
        assert_eq!(next.as_deref(), Some("news.3"), "{me}");
    }
    drop(subscribers);

    // Cut A–B: A reroutes the other way round, to C through D and to B through D and C.
    proxy.cut();
    proxy.set_open(false);
    poll_until_async("A reroutes around the cut", SOON, || async {
        let routes = routes(&node_a).await;
        let via_d = selected(&routes, "ring-c") == Some(vec!["ring-a".into(), "ring-d".into(), "ring-c".into()])
            && selected(&routes, "ring-b")
                == Some(vec!["ring-a".into(), "ring-d".into(), "ring-c".into(), "ring-b".into()]);
        via_d.then(|| loop_free_paths(&routes, "ring-a"))
    })
    .await;
    let value = client.request(vec![add_in("ring-c", 3, 4)]).await.expect("A calls C the other way round");
    assert_eq!(value["r"], 7);
    for (node, me) in ring {
        loop_free_paths(&routes(node).await, me);
    }
    drop((client, node_a, node_b, node_c, node_d));
}

/// The links of `node`'s bridges to `cluster`, as `/routes` lists them.
async fn bridge_links(node: &ServerProcess, cluster: &str) -> Vec<u64> {
    let routes = routes(node).await;
    let bridges = routes["bridges"].as_array().cloned().unwrap_or_default();
    let mut links: Vec<u64> =
        bridges.iter().filter(|b| b["cluster"] == cluster).filter_map(|b| b["link"].as_u64()).collect();
    links.sort_unstable();
    links
}

#[actix_rt::test]
async fn a_bridge_opens_a_lane_on_each_listener_thread_that_lives_and_dies_with_it() {
    // B dials A through a proxy the test cuts. Both listen on two threads; announcements
    // every 0.5 s and a 4 s route TTL make a bridge silent for 4 s a dead one (pinged every
    // second). Fault injection lets the test crash a fabric.
    let (a, b) = (Cluster::new("lane-a"), Cluster::new("lane-b"));
    let quick = |settings: TempFile| {
        let text = std::fs::read_to_string(settings.path()).unwrap().replacen(
            "[mpreg]\n",
            "[mpreg]\nworkers = 2\nfault_injection = true\n",
            1,
        );
        let text = text.replace("announce_interval_s = 1.0", "announce_interval_s = 0.5\nroute_ttl_s = 4.0");
        std::fs::write(settings.path(), text).unwrap();
        settings
    };
    let a_settings = quick(federation_settings(&a, &[&b], &[], &["add"]));
    let node_a = start("a1", &a, Some(&a_settings), &["demo"], &[]).await;
    let proxy = Proxy::to(&node_a.url).await;
    let b_settings = quick(federation_settings(&b, &[&a], &[&proxy.url], &[]));
    let node_b = start("b1", &b, Some(&b_settings), &[], &[]).await;

    // B's bridge and one lane (one link per listener thread of B), seen from both sides.
    let both_linked = || async {
        let (at_a, at_b) = (bridge_links(&node_a, "lane-b").await, bridge_links(&node_b, "lane-a").await);
        (at_a.len() == 2 && at_b.len() == 2).then_some((at_a, at_b))
    };
    let linked = poll_until_async("B's bridge and its lane are up on both sides", SOON, both_linked).await;
    let client = Client::connect(&node_b.url).await.expect("client connects to B");
    for i in 0..20 {
        let value = client.request(vec![add_in("lane-a", i, 1)]).await.expect("B calls A");
        assert_eq!(value["r"], i + 1);
    }

    // Quiet for three silent limits: announcements go on one link per node, so the lane
    // carries none, yet its keepalive keeps it (the same links throughout, none redialled).
    let quiet_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet_until {
        let now = (bridge_links(&node_a, "lane-b").await, bridge_links(&node_b, "lane-a").await);
        assert_eq!(now, linked, "a quiet bridge or lane was closed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Cut: the bridge and its lane go on both sides; healed, both come back (new links).
    proxy.cut();
    proxy.set_open(false);
    poll_until_async("every link gone on both sides", SOON, || async {
        let gone = bridge_links(&node_a, "lane-b").await.is_empty() && bridge_links(&node_b, "lane-a").await.is_empty();
        gone.then_some(())
    })
    .await;
    proxy.set_open(true);
    let healed = poll_until_async("the bridge and its lane are back", SOON, both_linked).await;
    assert!(healed.0.iter().all(|link| !linked.0.contains(link)), "{healed:?} after {linked:?}");
    poll_until_async("B calls A again", SOON, || async {
        client.request(vec![add_in("lane-a", 20, 22)]).await.ok().filter(|v| v["r"] == 42)
    })
    .await;

    // A fabric that panics is restarted: the links the one before held, accepted (A) or
    // dialled (B), are closed and forgotten on both sides, and new ones take their place.
    let mut before = healed;
    for node in [&node_a, &node_b] {
        let url = format!("{}/actors/fabric/panic", node.monitoring_url.as_deref().unwrap());
        let (status, body) = mpreg::demo::http_request("POST", &url).await.expect("fault injected");
        assert_eq!(status, 202, "{body}");
        let renewed = poll_until_async("only new links, two a side, after the restart", SOON, || async {
            let now = both_linked().await?;
            let fresh =
                now.0.iter().all(|link| !before.0.contains(link)) && now.1.iter().all(|link| !before.1.contains(link));
            fresh.then_some(now)
        })
        .await;
        poll_until_async("B calls A after the restart", SOON, || async {
            client.request(vec![add_in("lane-a", 1, 1)]).await.ok().filter(|v| v["r"] == 2)
        })
        .await;
        before = renewed;
    }
    drop((client, node_a, node_b));
}
