//! RPC result caching on one node: a command with `"cache": {"ttl": S}` (or a call of a
//! function registered `cacheable`) is served from the cache without running the
//! function, `execution_summary` names it; identical concurrent calls run the function
//! once (single flight); failures are not cached; another version or other arguments are
//! another key.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use mpreg::client::CallOptions;
use mpreg::{Client, FunctionError, FunctionSpec, RpcCommand, Settings};
use mpreg_actors::protocol::{CommandCache, RpcRequest};
use serde_json::{json, Value};
use tokio::sync::watch;

use common::node::TestNode;
use common::poll_until_async;

const SOON: Duration = Duration::from_secs(20);

fn settings() -> Settings {
    Settings { port: 0, monitoring_port: 0, ..Settings::default() }
}

/// `square(x)`, which counts its runs and fails while `failing` is set.
fn square(runs: Arc<AtomicUsize>, failing: Arc<AtomicBool>) -> FunctionSpec {
    FunctionSpec::asynchronous("square", move |x: i64| {
        let (runs, failing) = (runs.clone(), failing.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) {
                return Err(FunctionError::new("Unavailable", "the backend is down"));
            }
            Ok::<_, FunctionError>(x * x)
        }
    })
}

fn cached(ttl: f64) -> CallOptions {
    CallOptions { cache_ttl: Some(ttl), ..CallOptions::default() }
}

#[actix_rt::test]
async fn a_cached_call_is_served_without_running_the_function_and_the_summary_says_so() {
    let runs = Arc::new(AtomicUsize::new(0));
    let node = TestNode::start(settings(), vec![square(runs.clone(), Arc::default())]).await;
    let client = Client::connect(node.url()).await.unwrap();
    assert_eq!(client.call_with("square", vec![json!(7)], cached(60.0)).await.unwrap(), json!(49));
    assert_eq!(client.call_with("square", vec![json!(7)], cached(60.0)).await.unwrap(), json!(49));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second call was served from the cache");
    // Other arguments: another key. Without `cache`: always run.
    assert_eq!(client.call_with("square", vec![json!(8)], cached(60.0)).await.unwrap(), json!(64));
    assert_eq!(client.call("square", vec![json!(7)]).await.unwrap(), json!(49));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // The summary names the commands served from the cache.
    let mut hit = RpcCommand::new("hit", "square", vec![json!(7)]);
    hit.cache = Some(CommandCache { ttl: 60.0 });
    let mut miss = RpcCommand::new("miss", "square", vec![json!(9)]);
    miss.cache = Some(CommandCache { ttl: 60.0 });
    let request: RpcRequest = serde_json::from_value(json!({
        "role": "rpc", "u": "summary", "cmds": [hit, miss], "include_execution_summary": true,
    }))
    .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.r, Some(json!({"hit": 49, "miss": 81})));
    let summary = response.execution_summary.expect("a summary");
    assert_eq!(summary["cached_commands"], json!(["hit"]), "{summary}");
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    // A bad TTL is refused before anything runs.
    let error = client.call_with("square", vec![json!(7)], cached(-1.0)).await.unwrap_err();
    assert!(matches!(error, mpreg::ClientError::Rpc(ref e) if e.code == 1002), "{error:?}");
}

#[actix_rt::test]
async fn failures_are_not_cached() {
    let (runs, failing) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(true)));
    let node = TestNode::start(settings(), vec![square(runs.clone(), failing.clone())]).await;
    let client = Client::connect(node.url()).await.unwrap();
    let error = client.call_with("square", vec![json!(3)], cached(60.0)).await.unwrap_err();
    assert!(matches!(error, mpreg::ClientError::Rpc(ref e) if e.code == 1003), "{error:?}");
    failing.store(false, Ordering::SeqCst);
    assert_eq!(client.call_with("square", vec![json!(3)], cached(60.0)).await.unwrap(), json!(9));
    assert_eq!(client.call_with("square", vec![json!(3)], cached(60.0)).await.unwrap(), json!(9));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the failure ran once, the success once");
}

#[actix_rt::test]
async fn identical_concurrent_calls_run_the_function_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let slow = {
        let runs = runs.clone();
        FunctionSpec::asynchronous("report", move |day: String| {
            let (runs, mut gate) = (runs.clone(), gate.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, FunctionError>(json!({"day": day, "rows": 42}))
            }
        })
    };
    let node = TestNode::start(settings(), vec![slow]).await;
    let client = Client::connect(node.url()).await.unwrap();
    let calls = join_all((0..50).map(|_| client.call_with("report", vec![json!("monday")], cached(60.0))));
    // Released only once the other 49 wait on the first.
    let release = async {
        poll_until_async("49 calls to wait for the first", SOON, || async {
            (node.cache().flights.followers() == 49).then_some(())
        })
        .await;
        open.send(true).unwrap();
    };
    let (results, ()) = tokio::join!(calls, release);
    let results: Vec<Value> = results.into_iter().map(Result::unwrap).collect();
    assert!(results.iter().all(|r| *r == json!({"day": "monday", "rows": 42})));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "50 identical calls, one run");
    assert!(node.cache().flights.is_empty());
}

#[actix_rt::test]
async fn a_cacheable_function_is_cached_by_default_and_a_new_version_is_another_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = |version: &str| {
        let runs = runs.clone();
        FunctionSpec::sync("lookup", move |k: String| {
            runs.fetch_add(1, Ordering::SeqCst);
            format!("value of {k}")
        })
        .inline()
        .version(version.parse().unwrap())
        .cacheable(60.0)
    };
    let node = TestNode::start(settings(), vec![counted("1.0.0")]).await;
    let client = Client::connect(node.url()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(client.call("lookup", vec![json!("a")]).await.unwrap(), json!("value of a"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "inline and cacheable: run once");
    node.register(counted("2.0.0")).await.unwrap();
    let v2 = CallOptions { version_constraint: Some(">=2".into()), ..CallOptions::default() };
    assert_eq!(client.call_with("lookup", vec![json!("a")], v2.clone()).await.unwrap(), json!("value of a"));
    assert_eq!(client.call_with("lookup", vec![json!("a")], v2).await.unwrap(), json!("value of a"));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "version 2 has its own entry");
    let stats = client.cache_stats().await.unwrap();
    assert!(stats["l1"]["hits"].as_u64().unwrap() >= 3, "{stats}");
}
