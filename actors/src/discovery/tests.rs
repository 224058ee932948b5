//! The answers as pure functions of a view: shapes, filters, pagination.

use serde_json::{json, Map, Value};

use super::*;
use crate::version::Version;

fn info(node: &str, cluster: &str, port: u16) -> NodeInfo {
    NodeInfo {
        node: node.into(),
        instance_id: format!("{node}-1"),
        cluster_id: cluster.into(),
        url: format!("ws://127.0.0.1:{port}"),
    }
}

fn function(name: &str, resources: &[&str]) -> FunctionIdentity {
    FunctionIdentity {
        name: name.into(),
        function_id: name.into(),
        version: Version::new(1, 0, 0),
        resources: resources.iter().map(|r| r.to_string()).collect(),
    }
}

fn node(info: NodeInfo, functions: Vec<FunctionIdentity>, queues: &[&str]) -> NodeEntry {
    NodeEntry {
        info,
        status: "ok",
        last_seen: 99.0,
        advertised_at: 90.0,
        ttl_s: 60.0,
        functions,
        queues: queues.iter().map(|q| q.to_string()).collect(),
        about: Vec::new(),
    }
}

fn view() -> DiscoveryView {
    let me = info("a", "c1", 1001);
    DiscoveryView {
        generated_at: 100.0,
        me: me.clone(),
        nodes: vec![
            node(me, vec![function("echo", &[]), function("math.add", &["cpu", "math"])], &["jobs"]),
            NodeEntry {
                about: vec![FunctionAbout {
                    name: "tpu_square".into(),
                    function_id: "tpu_square".into(),
                    version: Version::new(1, 0, 0),
                    params: Some("x".into()),
                    doc: Some("Squares.".into()),
                    worker: false,
                }],
                ..node(info("b", "c1", 1002), vec![function("echo", &[]), function("tpu_square", &["tpu"])], &[])
            },
            node(info("c", "c2", 1003), vec![function("math.mul", &["cpu"])], &[]),
        ],
        local: vec![LocalFunction {
            identity: function("math.add", &["cpu", "math"]),
            signature: Some(Signature::named(["a", "b"]).expect("valid")),
            doc: Some("Adds.\nReturns a + b.".into()),
        }],
        changes: None,
    }
}

const PAGES: Pages = Pages { offset: 0, limit: 200 };

fn ask(command: &str, request: Value) -> Value {
    let request: Map<String, Value> = request.as_object().cloned().unwrap_or_default();
    let limits = DiscoveryLimits { page_size: 200, max_page_size: 2000 };
    let pages = Pages::new(limits, &request, &Metrics::default()).expect("valid pages");
    answer(command, &request, &view(), pages).expect("an answer")
}

#[test]
fn list_peers_leaves_out_this_node_and_lists_functions_and_resources() {
    let peers = ask("list_peers", json!({}));
    let urls: Vec<&str> = peers.as_array().unwrap().iter().map(|p| p["url"].as_str().unwrap()).collect();
    assert_eq!(urls, ["ws://127.0.0.1:1002", "ws://127.0.0.1:1003"]);
    assert_eq!(peers[0]["funs"], json!(["echo", "tpu_square"]));
    assert_eq!(peers[0]["locs"], json!(["tpu"]));
    assert_eq!(peers[0]["status"], json!("ok"));
    assert_eq!(peers[0]["transport_endpoints"][0]["port"], json!(1002));
    assert_eq!(ask("list_peers", json!({"cluster_id": "c2"})).as_array().unwrap().len(), 1);
}

#[test]
fn cluster_maps_list_every_node_and_paginate() {
    let map = ask("cluster_map", json!({}));
    assert_eq!(map["cluster_id"], json!("c1"));
    assert_eq!(map["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(map["nodes"][0]["advertised_urls"], json!(["ws://127.0.0.1:1001"]));
    assert_eq!(map["nodes"][0]["capabilities"], json!(["queue", "rpc"]));

    let request: Map<String, Value> = Map::new();
    let first = answer("cluster_map_v2", &request, &view(), Pages { offset: 0, limit: 2 }).unwrap();
    assert_eq!(first["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_page_token"], json!("2:2"));
    let rest = ask("cluster_map_v2", json!({"page_token": "2:2"}));
    assert_eq!(rest["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_page_token"], Value::Null);
    assert_eq!(ask("cluster_map_v2", json!({"scope": "global"}))["nodes"], json!([]));
    assert_eq!(ask("cluster_map_v2", json!({"resources": ["tpu"]}))["nodes"][0]["node_id"], json!("b"));
}

#[test]
fn catalog_query_filters_each_entry_type() {
    let functions = ask("catalog_query", json!({"entry_type": "functions", "resources": ["cpu"]}));
    let names: Vec<&str> =
        functions["items"].as_array().unwrap().iter().map(|i| i["identity"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["math.add", "math.mul"]);
    let by_ns = ask("catalog_query", json!({"entry_type": "functions", "namespace": "math", "cluster_id": "c1"}));
    assert_eq!(by_ns["items"].as_array().unwrap().len(), 1);
    let versions = ask("catalog_query", json!({"entry_type": "functions", "version_constraint": ">=2"}));
    assert_eq!(versions["items"], json!([]));
    let queues = ask("catalog_query", json!({"entry_type": "queues"}));
    assert_eq!(queues["items"][0]["queue_name"], json!("jobs"));
    let nodes = ask("catalog_query", json!({"entry_type": "nodes", "capabilities": ["queue"]}));
    assert_eq!(nodes["items"].as_array().unwrap().len(), 1);
    let request: Map<String, Value> = json!({"entry_type": "topics"}).as_object().cloned().unwrap();
    let refused = answer("catalog_query", &request, &view(), PAGES).unwrap_err();
    assert!(refused.message.contains("functions, nodes, queues"), "{refused}");
}

#[test]
fn rpc_list_describe_and_report() {
    let listed = ask("rpc_list", json!({"query": "add"}));
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["summary"]["summary"], json!("Adds."));
    assert_eq!(listed["items"][0]["summary"]["required_parameter_count"], json!(2));

    let described = ask("rpc_describe", json!({"function_name": "math.add"}));
    let spec = &described["items"][0]["spec"];
    assert_eq!(spec["parameters"][1]["name"], json!("b"));
    assert_eq!(spec["doc"]["description"], json!("Adds.\nReturns a + b."));
    let remote = ask("rpc_describe", json!({"function_name": "tpu_square"}));
    assert_eq!(remote["items"][0]["spec"]["parameters"][0]["name"], json!("x"), "told in b's catalog entry");
    assert_eq!(remote["items"][0]["spec"]["doc"]["summary"], json!("Squares."));
    let untold = ask("rpc_describe", json!({"function_name": "echo", "node_id": "b"}));
    assert_eq!(untold["items"][0]["spec"], Value::Null, "b told nothing about its echo");
    let local = ask("rpc_describe_local", json!({}));
    assert!(local["items"].as_array().unwrap().iter().all(|i| i["node_id"] == "a"));

    let report = ask("rpc_report", json!({}));
    assert_eq!(report["total_functions"], json!(5));
    assert_eq!(report["cluster_counts"], json!([{"key": "c1", "count": 4}, {"key": "c2", "count": 1}]));
    assert_eq!(report["namespace_counts"], json!([{"key": "", "count": 3}, {"key": "math", "count": 2}]));
}

#[test]
fn summaries_count_endpoints_per_service() {
    let summary = ask("summary_query", json!({"include_ingress": true}));
    let echo = summary["items"].as_array().unwrap().iter().find(|s| s["service_id"] == "echo").unwrap().clone();
    assert_eq!(echo["endpoint_count"], json!(2));
    assert_eq!(echo["source_cluster"], json!("c1"));
    assert_eq!(summary["ingress"]["c2"], json!(["ws://127.0.0.1:1003"]));
    assert_eq!(ask("summary_query", json!({"service_id": "math.mul"}))["items"].as_array().unwrap().len(), 1);
    assert_eq!(ask("summary_watch", json!({}))["topic"], json!(SUMMARY_TOPIC));
}

#[test]
fn catalog_watch_reports_the_changes_since_a_version() {
    let mut log = log::CatalogLog::new(100);
    let mut v = view();
    log.observe(1.0, catalog_entries(&v.nodes));
    v.nodes.pop();
    log.observe(2.0, catalog_entries(&v.nodes));
    v.changes = Some(log.since(1));
    let request: Map<String, Value> = json!({"since_version": 1}).as_object().cloned().unwrap();
    let watch = answer("catalog_watch", &request, &v, PAGES).unwrap();
    assert_eq!(watch["topic"], json!(DELTA_TOPIC));
    assert_eq!(watch["version"], json!(2));
    assert_eq!(watch["reset"], json!(false));
    assert_eq!(watch["changes"][0]["removed"][0]["identity"]["name"], json!("math.mul"));
}

#[test]
fn pages_come_from_tokens_and_limits_capped_by_the_settings() {
    let limits = DiscoveryLimits { page_size: 10, max_page_size: 50 };
    let metrics = Metrics::default();
    let pages = |request: Value| Pages::new(limits, request.as_object().unwrap(), &metrics);
    assert_eq!(pages(json!({})).unwrap(), Pages { offset: 0, limit: 10 });
    assert_eq!(pages(json!({"page_token": "20:5"})).unwrap(), Pages { offset: 20, limit: 5 });
    assert_eq!(pages(json!({"limit": 1000})).unwrap(), Pages { offset: 0, limit: 50 });
    assert_eq!(metrics.limit_exceeded_count("discovery_max_page_size"), 1);
    assert!(pages(json!({"page_token": "x"})).is_err());
    assert!(pages(json!({"limit": 0})).is_err());
}

mod pagination {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Following `next_page_token` from the first page visits every item once, in
        /// order, whatever the page size and the number of functions.
        #[test]
        fn following_tokens_visits_every_item_once(functions in 0usize..40, limit in 1usize..12) {
            let mut v = view();
            v.nodes[0].functions = (0..functions).map(|i| function(&format!("f{i:02}"), &[])).collect();
            v.nodes.truncate(1);
            let limits = DiscoveryLimits { page_size: limit, max_page_size: 2000 };
            let mut request: Map<String, Value> = json!({"entry_type": "functions"}).as_object().cloned().unwrap();
            let mut seen = Vec::new();
            loop {
                let pages = Pages::new(limits, &request, &Metrics::default()).unwrap();
                let page = answer("catalog_query", &request, &v, pages).unwrap();
                let items = page["items"].as_array().unwrap();
                prop_assert!(items.len() <= limit);
                seen.extend(items.iter().map(|i| i["identity"]["name"].as_str().unwrap().to_owned()));
                match page["next_page_token"].as_str() {
                    Some(token) => { request.insert("page_token".into(), json!(token)); }
                    None => break,
                }
            }
            let expected: Vec<String> = (0..functions).map(|i| format!("f{i:02}")).collect();
            prop_assert_eq!(seen, expected);
        }
    }
}
