//! Queues across the cluster, in process: three nodes A, B, C (ports chosen by the OS, fast
//! gossip, in-memory stores). A queue lives on the node that created it and is advertised in
//! the catalog; any node forwards operations on it to its owner over the fabric. `list`
//! names remote queues with their owner; an owner that left answers 1005 at once; a
//! binding on the owner enqueues a publish made on any node exactly once; a subscription
//! made on any node gets its pushes over the fabric; a remote client's leases are released
//! when its connection closes (also when its node shuts down).

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use mpreg::client::QueueSendOptions;
use mpreg::Settings;
use serde_json::{json, Value};

use common::node::{cluster_settings, TestNode};
use common::{cluster_id, poll_until_async};

const SOON: Duration = Duration::from_secs(10);

fn settings(name: &str, cluster: &str, peers: &[&TestNode]) -> Settings {
    Settings { peers: peers.iter().map(|p| p.url().to_owned()).collect(), ..cluster_settings(name, cluster) }
}

async fn start(name: &str, cluster: &str, peers: &[&TestNode]) -> TestNode {
    TestNode::start(settings(name, cluster, peers), Vec::new()).await
}

async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until_async(what, SOON, probe).await
}

fn code(result: Result<impl std::fmt::Debug, mpreg::ClientError>) -> (u16, String) {
    match result {
        Err(mpreg::ClientError::Rpc(e)) => (e.code, format!("{e:?}")),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Three nodes, B and C introduced by A; the queue `queue` created on B and known (by
/// its catalog) on A and C.
async fn three_nodes(test: &str, queue: &str) -> (TestNode, TestNode, TestNode) {
    let cluster = cluster_id(test);
    let a = start("A", &cluster, &[]).await;
    let b = start("B", &cluster, &[&a]).await;
    let c = start("C", &cluster, &[&a]).await;
    b.client().await.queue_create(queue, json!({})).await.expect("created on B");
    for node in [&a, &c] {
        let c = node.client().await;
        let c = &c;
        wait_until(&format!("{} to list {queue} owned by B", node.name()), move || async move {
            let list = c.queue_list().await.ok()?;
            list.iter().any(|q| q["name"] == queue && q["owner"] == "B").then_some(())
        })
        .await;
    }
    (a, b, c)
}

#[actix_rt::test]
async fn a_queue_on_b_is_sent_to_on_a_and_received_and_acked_on_c() {
    let (a, b, c) = three_nodes("queue-remote-ops", "jobs").await;
    let (on_a, on_b, on_c) = (a.client().await, b.client().await, c.client().await);

    // `list` on A names it, owned by B.
    let list = on_a.queue_list().await.unwrap();
    let entry = list.iter().find(|q| q["name"] == "jobs").expect("A lists jobs");
    assert_eq!(entry["owner"], json!("B"), "{list:?}");

    let mut sent = Vec::new();
    for n in 0..3 {
        let id = on_a.queue_send("jobs", json!({"n": n}), QueueSendOptions::default()).await.unwrap();
        sent.push(id);
    }
    // Stored on B: its own stats say so.
    let stats = on_b.queue_stats("jobs").await.unwrap();
    assert_eq!(stats["visible"], json!(3), "{stats}");
    assert_eq!(stats["owner"], json!("B"), "{stats}");

    let got = on_c.queue_receive("jobs", 10, 0.0, None).await.unwrap();
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), sent);
    let payloads: Vec<Value> = got.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(payloads, [json!({"n": 0}), json!({"n": 1}), json!({"n": 2})]);
    // The leases are this connection's: another client (even on the same node) acks nothing.
    let other_on_c = c.client().await;
    assert!(other_on_c.queue_ack("jobs", &sent, None).await.unwrap().is_empty());
    assert_eq!(on_c.queue_ack("jobs", &sent, None).await.unwrap(), sent);

    let stats = on_a.queue_stats("jobs").await.unwrap();
    assert_eq!(stats["acked_total"], json!(3), "{stats}");
    assert_eq!(stats["visible"], json!(0), "{stats}");

    // A long poll forwarded to B is answered when a message arrives there.
    let poll = tokio::spawn({
        let on_c = on_c.clone();
        async move { on_c.queue_receive("jobs", 1, 5.0, None).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = on_a.queue_send("jobs", json!("late"), QueueSendOptions::default()).await.unwrap();
    let got = tokio::time::timeout(SOON, poll).await.expect("answered").expect("task").unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].id.clone(), got[0].payload.clone()), (late, json!("late")));

    // Its dead-letter queue lives with it, on B.
    assert_eq!(on_a.queue_stats("jobs.dlq").await.unwrap()["owner"], json!("B"));
    // Unknown queue: still 1001.
    assert_eq!(code(on_a.queue_send("nope", json!(1), QueueSendOptions::default()).await).0, 1001);
}

#[actix_rt::test]
async fn a_subscription_made_on_a_gets_pushes_from_the_owner_b_and_its_acks_return_credit() {
    let (a, _b, c) = three_nodes("queue-remote-subscribe", "jobs").await;
    let (on_a, on_c) = (a.client().await, c.client().await);
    let mut subscription = on_a.queue_subscribe("jobs", 2).await.expect("subscribed through A");

    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(on_c.queue_send("jobs", json!({"n": n}), QueueSendOptions::default()).await.unwrap());
    }
    // Prefetch 2: each ack returns one credit, so all five arrive, in order, once each.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let message = tokio::time::timeout(SOON, subscription.next()).await.expect("a push").expect("open");
        assert_eq!(message.payload, json!({"n": got.len()}));
        let ids = vec![message.id.clone()];
        assert_eq!(on_a.queue_ack("jobs", &ids, None).await.unwrap(), ids);
        got.push(message.id);
    }
    assert_eq!(got, sent);
    let stats = on_c.queue_stats("jobs").await.unwrap();
    assert_eq!((stats["acked_total"].clone(), stats["visible"].clone()), (json!(5), json!(0)), "{stats}");
}

#[actix_rt::test]
async fn a_remote_clients_leases_are_released_when_it_disconnects_and_when_its_node_shuts_down() {
    let (a, b, c) = three_nodes("queue-remote-release", "jobs").await;
    let on_b = b.client().await;
    for n in 0..4 {
        on_b.queue_send("jobs", json!(n), QueueSendOptions::default()).await.unwrap();
    }
    let visible = |n: u64| {
        let on_b = &on_b;
        move || async move {
            let stats = on_b.queue_stats("jobs").await.ok()?;
            (stats["visible"] == json!(n)).then_some(())
        }
    };

    // A client of A leases two (default visibility: 30 s) and disconnects: B makes them
    // visible again at once, not after the visibility timeout.
    let leaser = a.client().await;
    assert_eq!(leaser.queue_receive("jobs", 2, 0.0, None).await.unwrap().len(), 2);
    wait_until("two leased on B", visible(2)).await;
    leaser.close().await;
    wait_until("the disconnected client's leases released on B", visible(4)).await;

    // A client of C leases two and C leaves the cluster: B releases them too.
    let on_c = c.client().await;
    assert_eq!(on_c.queue_receive("jobs", 2, 0.0, None).await.unwrap().len(), 2);
    wait_until("two leased on B by C's client", visible(2)).await;
    c.shutdown().await;
    wait_until("C's client's leases released on B after C left", visible(4)).await;
}

#[actix_rt::test]
async fn a_send_to_a_queue_whose_owner_left_fails_fast_with_1005() {
    let (a, b, _c) = three_nodes("queue-owner-gone", "jobs").await;
    let on_a = a.client().await;
    on_a.queue_send("jobs", json!(1), QueueSendOptions::default()).await.expect("B serves it");

    b.shutdown().await;
    // Whatever A learnt first (a closed link, or B's GOODBYE), the answer is 1005 and comes
    // long before the 30 s request timeout.
    wait_until("A to see B gone", || async {
        let started = Instant::now();
        let result = on_a.queue_send("jobs", json!(2), QueueSendOptions::default()).await;
        match result {
            Err(mpreg::ClientError::Rpc(e)) if e.code == 1005 => {
                assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
                Some(())
            }
            _ => None,
        }
    })
    .await;
    // And it stays 1005 (not 1001) once B is forgotten.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (error, details) = code(on_a.queue_send("jobs", json!(3), QueueSendOptions::default()).await);
    assert_eq!(error, 1005, "{details}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[actix_rt::test]
async fn a_topic_bound_to_a_queue_on_b_gets_publishes_from_a_and_c_exactly_once() {
    let (a, b, c) = three_nodes("queue-remote-binding", "orders").await;
    let (on_a, on_b, on_c) = (a.client().await, b.client().await, c.client().await);
    // Bound through A (forwarded to B).
    on_a.queue_bind("orders", "orders.#").await.expect("bound");

    on_a.publish("orders.new", json!({"from": "A"})).await.unwrap();
    on_c.publish("orders.new", json!({"from": "C"})).await.unwrap();

    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + SOON;
    while got.len() < 2 && Instant::now() < deadline {
        let batch = on_b.queue_receive("orders", 10, 1.0, None).await.unwrap();
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        got.extend(batch.into_iter().map(|m| m.payload));
        if !ids.is_empty() {
            on_b.queue_ack("orders", &ids, None).await.unwrap();
        }
    }
    got.sort_by_key(|p| p["from"].as_str().unwrap_or_default().to_owned());
    assert_eq!(got, [json!({"from": "A"}), json!({"from": "C"})]);
    // Nothing else arrives (no duplicate from the flood).
    let more = on_c.queue_receive("orders", 10, 1.0, None).await.unwrap();
    assert!(more.is_empty(), "{more:?}");
    let stats = on_b.queue_stats("orders").await.unwrap();
    assert_eq!(stats["acked_total"], json!(2), "{stats}");
}
