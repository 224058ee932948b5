//! The discovery built-ins on a real 3-node cluster (in-process nodes on port 0, real
//! loopback websockets, the `mpreg::Client` SDK): each answers from the node's own view,
//! and that view follows a node joining and a node leaving (GOODBYE).
//!
//! Readiness is observed by polling the built-ins themselves, never assumed after a sleep.
//!
//! Run: `cargo test --test discovery`.

mod common;

use std::time::Duration;

use mpreg::functions::demo_pack;
use mpreg::{Client, FunctionSpec, RpcCommand, Settings};
use serde_json::{json, Map, Value};

use common::node::{cluster_settings, TestNode};
use common::{cluster_id, poll_until_async, rpc_error};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(20);

fn settings(name: &str, cluster: &str, peers: &[&TestNode]) -> Settings {
    Settings { peers: peers.iter().map(|p| p.url().to_owned()).collect(), ..cluster_settings(name, cluster) }
}

fn demo(names: &[&str]) -> Vec<FunctionSpec> {
    demo_pack().into_iter().filter(|f| names.contains(&f.identity().name.as_str())).collect()
}

/// Calls a discovery built-in with one request object.
async fn ask(client: &Client, command: &str, request: Value) -> Value {
    client.call(command, vec![request]).await.unwrap_or_else(|e| panic!("{command}: {e}"))
}

fn strings(value: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> =
        value.as_array().into_iter().flatten().filter_map(|v| v[key].as_str().map(str::to_owned)).collect();
    out.sort();
    out
}

fn sorted(mut urls: Vec<String>) -> Vec<String> {
    urls.sort();
    urls
}

/// Polls `command` on `client` until `done` holds for its answer.
async fn until(client: &Client, command: &str, request: Value, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    poll_until_async(what, SOON, || async {
        let answer = ask(client, command, request.clone()).await;
        done(&answer).then_some(answer)
    })
    .await
}

#[actix_rt::test]
async fn every_builtin_follows_a_node_joining_and_leaving() {
    let cluster = cluster_id("discovery");
    let a = TestNode::start(settings("a", &cluster, &[]), demo(&["add", "multiply"])).await;
    let b = TestNode::start(settings("b", &cluster, &[&a]), vec![mpreg::functions::tpu_square()]).await;
    let on_a = a.client().await;

    // Two nodes: a's only peer is b, with its function and its resources.
    let peers = until(&on_a, "list_peers", json!(null), "a lists b", |p| strings(p, "url") == [b.url()]).await;
    let peer = &peers[0];
    assert_eq!(peer["cluster_id"], json!(cluster));
    assert!(peer["funs"].as_array().unwrap().contains(&json!("tpu_square")), "{peer}");
    assert_eq!(peer["locs"], json!(["tpu"]), "{peer}");
    assert_eq!(peer["status"], json!("ok"));
    assert!(peer["last_seen"].as_f64().is_some_and(|t| t > 0.0), "{peer}");
    assert_eq!(peer["advertised_urls"], json!([b.url()]));
    let watch = ask(&on_a, "catalog_watch", json!({})).await;
    assert_eq!(watch["topic"], json!("mpreg.discovery.delta"));
    let before_c = watch["version"].as_u64().expect("a catalog version");

    // A third node joins through a.
    let c = TestNode::start(settings("c", &cluster, &[&a]), demo(&["model_score"])).await;
    let all = sorted(vec![a.url().to_owned(), b.url().to_owned(), c.url().to_owned()]);
    let others = sorted(vec![b.url().to_owned(), c.url().to_owned()]);
    until(&on_a, "list_peers", json!({}), "a lists b and c", |p| strings(p, "url") == others).await;
    let on_b = b.client().await;
    let from_b = sorted(vec![a.url().to_owned(), c.url().to_owned()]);
    until(&on_b, "list_peers", json!({}), "b lists a and c", |p| strings(p, "url") == from_b).await;

    let map = ask(&on_a, "cluster_map", json!(null)).await;
    assert_eq!(map["cluster_id"], json!(cluster));
    let mut urls: Vec<String> = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["advertised_urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()))
        .collect();
    urls.sort();
    assert_eq!(urls, all);

    let first = ask(&on_a, "cluster_map_v2", json!({"limit": 2})).await;
    assert_eq!(first["nodes"].as_array().unwrap().len(), 2, "{first}");
    let token = first["next_page_token"].as_str().expect("a second page").to_owned();
    let second = ask(&on_a, "cluster_map_v2", json!({"page_token": token})).await;
    assert_eq!(second["nodes"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second["next_page_token"], Value::Null);
    let gpu_nodes = ask(&on_a, "cluster_map_v2", json!({"resources": ["gpu"]})).await;
    assert_eq!(strings(&gpu_nodes["nodes"], "node_id"), ["c"]);

    let gpu =
        until(&on_a, "catalog_query", json!({"entry_type": "functions", "resources": ["gpu"]}), "c's entry", |q| {
            q["items"].as_array().is_some_and(|i| i.len() == 1)
        })
        .await;
    assert_eq!(gpu["items"][0]["identity"]["name"], json!("model_score"));
    assert_eq!(gpu["items"][0]["node_id"], json!("c"));
    let nodes = ask(&on_a, "catalog_query", json!({"entry_type": "nodes"})).await;
    assert_eq!(strings(&nodes["items"], "node_id"), ["a", "b", "c"]);

    let watch = ask(&on_a, "catalog_watch", json!({"since_version": before_c})).await;
    assert_eq!(watch["reset"], json!(false), "{watch}");
    let added: Vec<&Value> =
        watch["changes"].as_array().unwrap().iter().flat_map(|c| c["added"].as_array().unwrap()).collect();
    assert!(added.iter().any(|e| e["identity"]["name"] == "model_score" && e["node_id"] == "c"), "{watch}");
    let after_c = watch["version"].as_u64().expect("a catalog version");

    // rpc_list: every endpoint; summaries (and specs) where the function is local.
    let listed = ask(&on_a, "rpc_list", json!({"function_name": "model_score"})).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["items"][0]["node_id"], json!("c"));
    let on_c = c.client().await;
    let described = ask(&on_c, "rpc_describe", json!({"function_name": "model_score", "mode": "local"})).await;
    let spec = &described["items"][0]["spec"];
    assert_eq!(strings(&spec["parameters"], "name"), ["x"], "{described}");
    assert!(spec["doc"]["summary"].as_str().is_some_and(|d| d.starts_with("Scores x")), "{spec}");
    // Parameters and documentation travel in c's catalog entry: a describes c's function.
    let remote = ask(&on_a, "rpc_describe", json!({"function_name": "model_score"})).await;
    assert_eq!(remote["items"][0]["node_id"], json!("c"));
    assert_eq!(strings(&remote["items"][0]["spec"]["parameters"], "name"), ["x"], "{remote}");
    let multiply = ask(&on_a, "rpc_describe", json!({"function_names": ["multiply"]})).await;
    let names: Vec<&str> = multiply["items"][0]["spec"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["x", "factor"], "{multiply}");

    let report = ask(&on_a, "rpc_report", json!({})).await;
    let total = report["total_functions"].as_u64().unwrap();
    // echo and echos on each of the 3 nodes, add, multiply, tpu_square, model_score.
    assert_eq!(total, 10, "{report}");
    assert_eq!(report["cluster_counts"], json!([{"key": cluster, "count": 10}]));

    let summary = ask(&on_a, "summary_query", json!({"include_ingress": true})).await;
    let service = |id: &str| summary["items"].as_array().unwrap().iter().find(|s| s["service_id"] == id).cloned();
    assert_eq!(service("echo").expect("echo")["endpoint_count"], json!(3));
    assert_eq!(service("model_score").expect("model_score")["endpoint_count"], json!(1));
    assert_eq!(sorted(serde_json::from_value(summary["ingress"][&cluster].clone()).unwrap()), all);
    assert_eq!(ask(&on_a, "summary_watch", json!({})).await["topic"], json!("mpreg.discovery.summary"));

    // c leaves (GOODBYE): every view on a drops it.
    drop(on_c);
    c.shutdown().await;
    until(&on_a, "list_peers", json!({}), "a lists b only", |p| strings(p, "url") == [b.url()]).await;
    let map = ask(&on_a, "cluster_map", json!({})).await;
    assert_eq!(map["nodes"].as_array().unwrap().len(), 2, "{map}");
    let gpu = ask(&on_a, "catalog_query", json!({"entry_type": "functions", "resources": ["gpu"]})).await;
    assert_eq!(gpu["items"], json!([]));
    let watch = ask(&on_a, "catalog_watch", json!({"since_version": after_c})).await;
    let removed: Vec<&Value> =
        watch["changes"].as_array().unwrap().iter().flat_map(|c| c["removed"].as_array().unwrap()).collect();
    assert!(removed.iter().any(|e| e["identity"]["name"] == "model_score"), "{watch}");
    let summary = ask(&on_a, "summary_query", json!({"service_id": "echo"})).await;
    assert_eq!(summary["items"][0]["endpoint_count"], json!(2));
}

#[actix_rt::test]
async fn builtins_are_local_only_and_unsupported_ones_say_so() {
    let cluster = cluster_id("discovery-local");
    let a = TestNode::start(settings("a", &cluster, &[]), vec![]).await;
    let b = TestNode::start(settings("b", &cluster, &[&a]), vec![mpreg::functions::tpu_square()]).await;
    let on_a = a.client().await;
    until(&on_a, "list_peers", json!({}), "a lists b", |p| strings(p, "url") == [b.url()]).await;

    // Never advertised: b's catalog entry lists its own functions, not the built-ins.
    let functions = ask(&on_a, "catalog_query", json!({"entry_type": "functions", "node_id": "b"})).await;
    let names: Vec<&str> =
        functions["items"].as_array().unwrap().iter().map(|i| i["identity"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "echos", "tpu_square"]);

    // Never forwarded inside the cluster: asked for another cluster, b (which has the
    // built-ins too) does not serve it; with no federation bridge, no route (1005).
    let mut command = RpcCommand::new("p", "list_peers", vec![]);
    command.target_cluster = Some("elsewhere".into());
    let error = rpc_error(on_a.request(vec![command]).await);
    assert_eq!(error.code, 1005, "{error:?}");
    assert!(format!("{:?}", error.details).contains("no route to cluster elsewhere"), "{error:?}");

    // The request's fields may come as keyword arguments too.
    let mut kwargs = Map::new();
    kwargs.insert("entry_type".into(), json!("queues"));
    let options = mpreg::client::CallOptions { kwargs, ..Default::default() };
    let queues = on_a.call_with("catalog_query", vec![], options).await.expect("catalog_query by keyword");
    assert_eq!(queues["items"], json!([]));

    for command in ["dns_list", "namespace_status", "resolver_cache_stats", "discovery_access_audit"] {
        let error = rpc_error(on_a.call(command, vec![json!({})]).await);
        assert_eq!(error.code, 1003, "{command}: {error:?}");
        let details = error.details.map(|d| d.to_string()).unwrap_or_default();
        assert!(details.contains("not supported by this server"), "{command}: {details}");
    }
    let error = rpc_error(on_a.call("catalog_query", vec![json!({"entry_type": "topics"})]).await);
    assert!(error.details.map(|d| d.to_string()).unwrap_or_default().contains("functions, nodes, queues"));

    // A keyword argument reaches a function on another node by its parameter name.
    let mut kwargs = Map::new();
    kwargs.insert("x".into(), json!(7));
    let options = mpreg::client::CallOptions { kwargs, ..Default::default() };
    assert_eq!(on_a.call_with("tpu_square", vec![], options).await.expect("tpu_square(x=7)"), json!(49));
}

#[actix_rt::test]
async fn catalog_changes_are_published_to_the_delta_topic() {
    let cluster = cluster_id("discovery-topic");
    let a = TestNode::start(settings("a", &cluster, &[]), vec![]).await;
    let on_a = a.client().await;
    let mut deltas = on_a.subscribe(&["mpreg.discovery.delta"], None).await.expect("subscribed");
    let b = TestNode::start(settings("b", &cluster, &[&a]), vec![mpreg::functions::tpu_square()]).await;
    // Every change is published; the one that adds b's function comes within SOON.
    let joined = tokio::time::timeout(SOON, async {
        loop {
            let message = deltas.next().await.expect("the subscription stays open");
            let added = message.payload["change"]["added"].as_array().cloned().unwrap_or_default();
            if added.iter().any(|e| e["identity"]["name"] == "tpu_square") {
                return message;
            }
        }
    })
    .await
    .expect("a delta naming b's function");
    assert_eq!(joined.payload["source_node"], json!("a"));
    assert!(joined.payload["change"]["version"].as_u64().is_some());
    drop(b);
}
