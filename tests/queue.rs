//! Queues over the wire, in process: a real node (`NodeBuilder`, port 0, in-memory store
//! unless a test gives a data dir) and the typed client. Every op, every guarantee, DLQ and
//! redrive, priority, delay, dedup, subscriptions with prefetch, consumers that go away,
//! the errors (1001, 1002, 1006) and a restart of the Queue actor with nothing acked lost.

// `&[id.clone()]` reads better in these tests than `std::slice::from_ref(&id)`.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::FutureExt;
use mpreg::client::QueueSendOptions;
use mpreg::{Client, Node, NodeBuilder, Settings};
use serde_json::{json, Value};

use common::poll_until_async;

const SOON: Duration = Duration::from_secs(20);

struct TestNode(Node);

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.0.shutdown().now_or_never();
    }
}

async fn node() -> TestNode {
    node_with(Settings::default()).await
}

/// A node with `settings`, on ports the OS picks.
async fn node_with(settings: Settings) -> TestNode {
    let settings = Settings { port: 0, monitoring_port: 0, ..settings };
    TestNode(NodeBuilder::new(settings).start().await.expect("node starts"))
}

async fn client(node: &TestNode) -> Client {
    Client::connect(node.0.url()).await.expect("client connects")
}

fn code(result: Result<impl std::fmt::Debug, mpreg::ClientError>) -> u16 {
    match result {
        Err(mpreg::ClientError::Rpc(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn opts(guarantee: Value) -> QueueSendOptions {
    QueueSendOptions { guarantee: Some(guarantee), ..QueueSendOptions::default() }
}

#[actix_rt::test]
async fn send_receive_ack_and_stats() {
    let node = node().await;
    let c = client(&node).await;
    let created = c.queue_create("jobs", json!({})).await.unwrap();
    assert_eq!(created["created"], json!(true));
    // Same config again: idempotent; a different one: 1002.
    assert_eq!(c.queue_create("jobs", json!({})).await.unwrap()["created"], json!(false));
    assert_eq!(code(c.queue_create("jobs", json!({"max_receives": 9})).await), 1002);
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(c.queue_send("jobs", json!({"n": n}), QueueSendOptions::default()).await.unwrap());
    }
    let got = c.queue_receive("jobs", 10, 0.0, None).await.unwrap();
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), sent);
    assert_eq!(got[0].payload, json!({"n": 0}));
    assert_eq!(got[0].receive_count, 1);
    let acked = c.queue_ack("jobs", &sent, None).await.unwrap();
    assert_eq!(acked, sent);
    // Acking again: unknown, not an error.
    assert!(c.queue_ack("jobs", &sent, None).await.unwrap().is_empty());
    let stats = c.queue_stats("jobs").await.unwrap();
    assert_eq!(stats["acked_total"], json!(5));
    assert_eq!(stats["visible"], json!(0));
    let list = c.queue_list().await.unwrap();
    assert!(list.iter().any(|q| q["name"] == json!("jobs")), "{list:?}");
    assert!(c.queue_delete("jobs").await.unwrap());
    assert_eq!(code(c.queue_stats("jobs").await), 1001);
}

#[actix_rt::test]
async fn errors_unknown_queue_too_large_full_bad_op() {
    let node = node().await;
    let c = client(&node).await;
    assert_eq!(code(c.queue_send("nope", json!(1), QueueSendOptions::default()).await), 1001);
    c.queue_create("small", json!({"max_messages": 2, "max_message_bytes": 16})).await.unwrap();
    assert_eq!(code(c.queue_send("small", json!("x".repeat(100)), QueueSendOptions::default()).await), 1002);
    c.queue_send("small", json!(1), QueueSendOptions::default()).await.unwrap();
    c.queue_send("small", json!(2), QueueSendOptions::default()).await.unwrap();
    assert_eq!(code(c.queue_send("small", json!(3), QueueSendOptions::default()).await), 1006);
    assert_eq!(code(c.queue_op("frobnicate", Some("small"), json!({})).await), 1002);
    assert_eq!(code(c.queue_create("bad name!", json!({})).await), 1002);
    assert!(node.0.metrics().limit_exceeded_count("max_message_bytes") >= 1);
    assert!(node.0.metrics().limit_exceeded_count("max_messages") >= 1);
}

#[actix_rt::test]
async fn the_queues_of_a_node_hold_at_most_queue_max_bytes() {
    // 1 MiB for all queues together: whatever each queue's max_messages, a client cannot
    // make the node hold more.
    let node = node_with(Settings { queue_max_bytes: 1 << 20, ..Settings::default() }).await;
    let c = client(&node).await;
    for q in ["big-a", "big-b"] {
        c.queue_create(q, json!({"max_messages": 1_000_000})).await.unwrap();
    }
    let payload = |i: usize| json!(format!("{i:08}{}", "x".repeat(100_000)));
    let mut sent = 0;
    let refused = loop {
        let queue = if sent % 2 == 0 { "big-a" } else { "big-b" };
        match c.queue_send(queue, payload(sent), QueueSendOptions::default()).await {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent <= 10, "sent {sent} messages of 100 KB under a 1 MiB bound");
    };
    assert_eq!(sent, 10, "ten messages of 100 KB fit in 1 MiB");
    match refused {
        mpreg::ClientError::Rpc(e) => {
            assert_eq!(e.code, 1006, "{e:?}");
            assert!(e.details_text().contains("queue_max_bytes"), "{e:?}");
        }
        other => panic!("expected 1006, got {other:?}"),
    }
    assert_eq!(node.0.metrics().limit_exceeded_count("queue_max_bytes"), 1);
    // Acknowledged messages make room again; a deleted queue gives back all it held.
    let got = c.queue_receive("big-a", 1, 0.0, None).await.unwrap();
    c.queue_ack("big-a", &[got[0].id.clone()], None).await.unwrap();
    c.queue_send("big-b", payload(100), QueueSendOptions::default()).await.unwrap();
    assert!(c.queue_delete("big-a").await.unwrap());
    for i in 0..4 {
        c.queue_send("big-b", payload(200 + i), QueueSendOptions::default()).await.unwrap();
    }
}

#[actix_rt::test]
async fn priority_delay_and_dedup() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("p", json!({})).await.unwrap();
    let low = c.queue_send("p", json!("low"), QueueSendOptions::default()).await.unwrap();
    let high =
        c.queue_send("p", json!("high"), QueueSendOptions { priority: Some(9), ..Default::default() }).await.unwrap();
    let got = c.queue_receive("p", 10, 0.0, None).await.unwrap();
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![high, low]);
    // Dedup: the same dedup id answers the first id.
    let dd = QueueSendOptions { dedup_id: Some("k1".into()), ..Default::default() };
    let first = c.queue_send("p", json!("a"), dd.clone()).await.unwrap();
    assert_eq!(c.queue_send("p", json!("b"), dd).await.unwrap(), first);
    // Delay: not visible at once; visible after a long-poll.
    let delayed = QueueSendOptions { delay: Some(0.3), ..Default::default() };
    let late = c.queue_send("p", json!("late"), delayed).await.unwrap();
    let now = c.queue_receive("p", 10, 0.0, Some("x")).await.unwrap();
    assert_eq!(now.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![first]);
    let later = c.queue_receive("p", 10, 5.0, Some("x")).await.unwrap();
    assert_eq!(later.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), vec![late]);
}

#[actix_rt::test]
async fn nack_redelivers_then_dead_letters_and_redrive_brings_back() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("d", json!({"max_receives": 2})).await.unwrap();
    let id = c.queue_send("d", json!("poison"), QueueSendOptions::default()).await.unwrap();
    for round in 1..=2 {
        let got = c.queue_receive("d", 1, 0.0, Some("w")).await.unwrap();
        assert_eq!(got[0].receive_count, round);
        assert_eq!(c.queue_nack("d", &[id.clone()], 0.0, Some("w")).await.unwrap(), vec![id.clone()]);
    }
    assert!(c.queue_receive("d", 1, 0.0, Some("w")).await.unwrap().is_empty());
    let dead = c.queue_dlq("d", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], json!(id));
    assert!(dead[0]["reason"].as_str().unwrap().contains("max receives"), "{dead:?}");
    assert_eq!(c.queue_redrive("d", None).await.unwrap(), 1);
    let got = c.queue_receive("d", 1, 0.0, Some("w")).await.unwrap();
    assert_eq!(got[0].id, id);
    assert_eq!(c.queue_stats("d").await.unwrap()["dead_lettered_total"], json!(1));
}

#[actix_rt::test]
async fn name_dot_dlq_is_a_queue_of_the_dead_letters_that_can_be_received_acked_and_redriven() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("d", json!({"max_receives": 1})).await.unwrap();
    let mut ids = Vec::new();
    for payload in ["poison", "bad", "worse"] {
        let id = c.queue_send("d", json!(payload), QueueSendOptions::default()).await.unwrap();
        assert_eq!(c.queue_receive("d", 1, 0.0, Some("w")).await.unwrap()[0].id, id);
        c.queue_nack("d", std::slice::from_ref(&id), 0.0, Some("w")).await.unwrap();
        ids.push(id);
    }
    let stats = c.queue_stats("d.dlq").await.unwrap();
    assert_eq!((stats["visible"].clone(), stats["dead_letters_of"].clone()), (json!(3), json!("d")), "{stats}");

    // Received oldest first, each with its reason, leased to one consumer at a time.
    let got = c.queue_receive("d.dlq", 1, 0.0, Some("ops")).await.unwrap();
    assert_eq!((got[0].id.clone(), got[0].payload.clone()), (ids[0].clone(), json!("poison")));
    assert_eq!(got[0].reason.as_deref(), Some("max receives (1) reached"));
    let other = c.queue_receive("d.dlq", 10, 0.0, Some("other")).await.unwrap();
    assert_eq!(other.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids[1..]);
    // The ack deletes it for good; a nack gives the other two back.
    assert_eq!(c.queue_ack("d.dlq", std::slice::from_ref(&ids[0]), Some("ops")).await.unwrap(), [ids[0].clone()]);
    assert_eq!(c.queue_nack("d.dlq", &ids[1..], 0.0, Some("other")).await.unwrap(), ids[1..]);
    assert_eq!(c.queue_stats("d.dlq").await.unwrap()["visible"], json!(2));
    assert_eq!(c.queue_dlq("d.dlq", 10).await.unwrap().len(), 2, "dlq on NAME.dlq lists NAME's dead letters");

    // What it is not: a queue to send to, subscribe to or create.
    let refused = c.queue_send("d.dlq", json!(1), QueueSendOptions::default()).await;
    assert_eq!(code(refused), 1002);
    assert_eq!(code(c.queue_create("x.dlq", json!({})).await), 1002);
    // Redrive through it moves them back to d.
    assert_eq!(c.queue_redrive("d.dlq", None).await.unwrap(), 2);
    assert_eq!(c.queue_receive("d", 10, 0.0, Some("w")).await.unwrap().len(), 2);
    assert_eq!(c.queue_stats("d.dlq").await.unwrap()["visible"], json!(0));
}

#[actix_rt::test]
async fn visibility_timeout_redelivers() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("v", json!({"visibility_timeout": 0.2})).await.unwrap();
    let id = c.queue_send("v", json!(1), QueueSendOptions::default()).await.unwrap();
    assert_eq!(c.queue_receive("v", 1, 0.0, Some("a")).await.unwrap()[0].id, id);
    // The lease ends on the actor's timer; a long-poll sees it come back.
    let again = c.queue_receive("v", 1, 5.0, Some("b")).await.unwrap();
    assert_eq!(again[0].id, id);
    assert_eq!(again[0].receive_count, 2);
    // The first holder's lease is gone.
    assert!(c.queue_ack("v", &[id.clone()], Some("a")).await.unwrap().is_empty());
    assert_eq!(c.queue_ack("v", &[id], Some("b")).await.unwrap().len(), 1);
}

#[actix_rt::test]
async fn subscribe_with_prefetch_pushes_and_acks_return_credit() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("s", json!({})).await.unwrap();
    for n in 0..5 {
        c.queue_send("s", json!(n), QueueSendOptions::default()).await.unwrap();
    }
    let mut sub = c.queue_subscribe("s", 2).await.unwrap();
    let a = tokio::time::timeout(SOON, sub.next()).await.unwrap().unwrap();
    let b = tokio::time::timeout(SOON, sub.next()).await.unwrap().unwrap();
    assert_eq!((a.payload.clone(), b.payload.clone()), (json!(0), json!(1)));
    // Prefetch 2: nothing more until an ack.
    assert!(tokio::time::timeout(Duration::from_millis(200), sub.next()).await.is_err());
    assert_eq!(c.queue_ack("s", &[a.id.clone()], None).await.unwrap(), vec![a.id]);
    let next = tokio::time::timeout(SOON, sub.next()).await.unwrap().unwrap();
    assert_eq!(next.payload, json!(2));
    assert_eq!(c.queue_stats("s").await.unwrap()["leased"], json!(2));
}

#[actix_rt::test]
async fn broadcast_and_quorum_and_fire_and_forget() {
    let node = node().await;
    let (c1, c2) = (client(&node).await, client(&node).await);
    c1.queue_create("b", json!({})).await.unwrap();
    let mut s1 = c1.queue_subscribe("b", 4).await.unwrap();
    let mut s2 = c2.queue_subscribe("b", 4).await.unwrap();
    let id = c1.queue_send("b", json!("all"), opts(json!("broadcast"))).await.unwrap();
    let m1 = tokio::time::timeout(SOON, s1.next()).await.unwrap().unwrap();
    let m2 = tokio::time::timeout(SOON, s2.next()).await.unwrap().unwrap();
    assert_eq!((m1.id.as_str(), m2.id.as_str()), (id.as_str(), id.as_str()));
    c1.queue_ack("b", &[id.clone()], None).await.unwrap();
    c2.queue_ack("b", &[id.clone()], None).await.unwrap();
    let q = c1.queue_send("b", json!("two"), opts(json!({"quorum": 2}))).await.unwrap();
    let m1 = tokio::time::timeout(SOON, s1.next()).await.unwrap().unwrap();
    let m2 = tokio::time::timeout(SOON, s2.next()).await.unwrap().unwrap();
    assert_eq!((m1.id.as_str(), m2.id.as_str()), (q.as_str(), q.as_str()));
    c1.queue_ack("b", &[q.clone()], None).await.unwrap();
    c2.queue_ack("b", &[q], None).await.unwrap();
    let stats = c1.queue_stats("b").await.unwrap();
    assert_eq!(stats["acked_total"], json!(2), "{stats}");
    let f = c1.queue_send("b", json!("ff"), opts(json!("fire_and_forget"))).await.unwrap();
    let got = tokio::time::timeout(SOON, async {
        tokio::select! { m = s1.next() => m, m = s2.next() => m }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got.id, f);
}

#[actix_rt::test]
async fn a_consumer_that_goes_away_releases_its_leases() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("g", json!({})).await.unwrap();
    let id = c.queue_send("g", json!(1), QueueSendOptions::default()).await.unwrap();
    let gone = client(&node).await;
    assert_eq!(gone.queue_receive("g", 1, 0.0, None).await.unwrap()[0].id, id);
    gone.close().await;
    drop(gone);
    let got = c.queue_receive("g", 1, 10.0, None).await.unwrap();
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].receive_count, 2);
}

#[actix_rt::test]
async fn a_restarted_queue_actor_loses_nothing_acked() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("r", json!({})).await.unwrap();
    let mut ids = BTreeSet::new();
    for n in 0..20 {
        ids.insert(c.queue_send("r", json!(n), QueueSendOptions::default()).await.unwrap());
    }
    // Five leased and not acked, five acked.
    let leased = c.queue_receive("r", 10, 0.0, Some("w")).await.unwrap();
    let acked: Vec<String> = leased[..5].iter().map(|m| m.id.clone()).collect();
    c.queue_ack("r", &acked, Some("w")).await.unwrap();
    for id in &acked {
        ids.remove(id);
    }
    assert!(node.0.crash_actor("queue").await, "the queue actor runs");
    let c2 = c.clone();
    let stats = poll_until_async("the queue actor to come back", SOON, || {
        let c2 = c2.clone();
        async move { c2.queue_stats("r").await.ok() }
    })
    .await;
    assert_eq!(stats["visible"], json!(15), "{stats}");
    let got = c.queue_receive("r", 100, 0.0, Some("w")).await.unwrap();
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<BTreeSet<_>>(), ids);
}

#[actix_rt::test]
async fn bad_frames_get_a_queue_reply() {
    let node = node().await;
    let c = client(&node).await;
    // `op` missing: 1002 under the frame's u, as a queue-reply.
    assert_eq!(code(c.queue_op("stats", None, json!({})).await), 1002);
}

#[actix_rt::test]
async fn queues_show_in_metrics_and_on_the_queues_endpoint() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("m", json!({})).await.unwrap();
    c.queue_send("m", json!(1), QueueSendOptions::default()).await.unwrap();
    let base = node.0.monitoring_url().expect("monitoring is on").to_owned();
    let queues = poll_until_async("/queues to show the message", SOON, || {
        let url = format!("{base}/queues");
        async move {
            let body = common::get_ok(&url).await.ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["queues"][0]["stats"]["visible"] == json!(1)).then_some(v)
        }
    })
    .await;
    assert_eq!(queues["queues"][0]["name"], json!("m"), "{queues}");
    let metrics = common::get_ok(&format!("{base}/metrics")).await.unwrap();
    let node_name = node.0.name().to_owned();
    assert!(metrics.contains(&format!("mpreg_queue_depth{{node=\"{node_name}\",queue=\"m\"}} 1")), "{metrics}");
    assert!(metrics.contains("# TYPE mpreg_queue_dead_lettered_total counter"), "{metrics}");
}

#[actix_rt::test]
async fn a_bound_topic_enqueues_each_matching_publish_once_and_survives_a_restart() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("audit", json!({})).await.unwrap();
    c.queue_bind("audit", "user.*.login").await.unwrap();
    assert_eq!(c.queue_stats("audit").await.unwrap()["bindings"], json!(["user.*.login"]));
    // The binding subscribes asynchronously: publish until the first one lands.
    let c2 = c.clone();
    poll_until_async("the binding to enqueue a publish", SOON, || {
        let c2 = c2.clone();
        async move {
            c2.publish("user.probe.login", json!("probe")).await.ok()?;
            (c2.queue_stats("audit").await.ok()?["visible"].as_u64()? > 0).then_some(())
        }
    })
    .await;
    c.publish("user.7.login", json!({"user": 7})).await.unwrap();
    c.publish("user.7.logout", json!({"user": 7})).await.unwrap();
    c.publish("user.end.login", json!("end")).await.unwrap();
    // Everything up to the end marker, probes aside: exactly the one matching publish.
    let mut seen = Vec::new();
    'drain: loop {
        let got = c.queue_receive("audit", 100, 5.0, Some("d")).await.unwrap();
        assert!(!got.is_empty(), "the end marker never arrived; seen {seen:?}");
        let ids: Vec<String> = got.iter().map(|m| m.id.clone()).collect();
        c.queue_ack("audit", &ids, Some("d")).await.unwrap();
        for m in got {
            if m.payload == json!("end") {
                break 'drain;
            }
            if m.payload != json!("probe") {
                seen.push(m.payload);
            }
        }
    }
    assert_eq!(seen, vec![json!({"user": 7})]);
    // A restart of the Queue actor re-subscribes the persisted binding.
    assert!(node.0.crash_actor("queue").await);
    let c3 = c.clone();
    poll_until_async("the binding to work after a restart", SOON, || {
        let c3 = c3.clone();
        async move {
            c3.publish("user.8.login", json!({"user": 8})).await.ok()?;
            (c3.queue_stats("audit").await.ok()?["visible"].as_u64()? > 0).then_some(())
        }
    })
    .await;
}

#[actix_rt::test]
async fn a_deleted_queue_takes_its_bindings_with_it() {
    let node = node().await;
    let c = client(&node).await;
    c.queue_create("feed", json!({})).await.unwrap();
    c.queue_bind("feed", "news.#").await.unwrap();
    assert!(c.queue_delete("feed").await.unwrap());
    c.queue_create("feed", json!({})).await.unwrap();
    // A witness queue bound to the same pattern shows when a publish has been enqueued.
    c.queue_create("witness", json!({})).await.unwrap();
    c.queue_bind("witness", "news.#").await.unwrap();
    let c2 = c.clone();
    poll_until_async("the witness binding to enqueue a publish", SOON, || {
        let c2 = c2.clone();
        async move {
            c2.publish("news.today", json!("news")).await.ok()?;
            (c2.queue_stats("witness").await.ok()?["visible"].as_u64()? > 0).then_some(())
        }
    })
    .await;
    // One more publish after the witness works: it reaches the witness, never the re-created queue.
    c.publish("news.later", json!("later")).await.unwrap();
    let c3 = c.clone();
    poll_until_async("the witness to hold the later publish", SOON, || {
        let c3 = c3.clone();
        async move {
            let got = c3.queue_receive("witness", 1000, 0.0, Some("w")).await.ok()?;
            got.iter().any(|m| m.payload == json!("later")).then_some(())
        }
    })
    .await;
    assert_eq!(c.queue_stats("feed").await.unwrap()["visible"], json!(0));
}

#[actix_rt::test]
async fn bindings_are_bounded_per_queue_not_per_node() {
    let node = node_with(Settings { pubsub_max_subscriptions_per_connection: 2, ..Settings::default() }).await;
    let c = client(&node).await;
    for queue in ["a", "b"] {
        c.queue_create(queue, json!({})).await.unwrap();
        c.queue_bind(queue, "x.#").await.unwrap();
        c.queue_bind(queue, "y.#").await.unwrap();
        // Binding a pattern again changes nothing and is not refused.
        c.queue_bind(queue, "y.#").await.unwrap();
    }
    // The third pattern of one queue is refused (1006), naming the setting.
    match c.queue_bind("a", "z.#").await {
        Err(mpreg::ClientError::Rpc(e)) => {
            assert_eq!(e.code, 1006);
            assert!(format!("{e:?}").contains("pubsub_max_subscriptions_per_connection"), "{e:?}");
        }
        other => panic!("expected 1006, got {other:?}"),
    }
    // Every binding of both queues works: each gets a publish on each of its patterns.
    for topic in ["x.1", "y.1"] {
        c.publish(topic, json!(topic)).await.unwrap();
    }
    for queue in ["a", "b"] {
        let c2 = c.clone();
        poll_until_async(&format!("{queue} to hold both publishes"), SOON, || {
            let c2 = c2.clone();
            async move { (c2.queue_stats(queue).await.ok()?["visible"] == json!(2)).then_some(()) }
        })
        .await;
    }
}

#[actix_rt::test]
async fn queue_subscriptions_are_bounded_per_connection_and_in_id_length() {
    let node = node_with(Settings { pubsub_max_subscriptions_per_connection: 3, ..Settings::default() }).await;
    let c = client(&node).await;
    c.queue_create("q", json!({})).await.unwrap();
    let subscribe = |id: String| c.queue_op("subscribe", Some("q"), json!({ "subscription_id": id }));
    // An id of 16 MiB would be kept four times over until the connection closes.
    assert_eq!(code(subscribe("i".repeat(257)).await), 1002);
    assert_eq!(code(subscribe(String::new()).await), 1002);
    for i in 0..3 {
        subscribe(format!("s{i}")).await.unwrap();
    }
    // The fourth is refused (1006, naming the setting); renewing a held one is not.
    match subscribe("s3".to_owned()).await {
        Err(mpreg::ClientError::Rpc(e)) => {
            assert_eq!(e.code, 1006);
            assert!(format!("{e:?}").contains("pubsub_max_subscriptions_per_connection"), "{e:?}");
        }
        other => panic!("expected 1006, got {other:?}"),
    }
    subscribe("s1".to_owned()).await.expect("a held subscription is renewed");
    // The same id on another queue is another subscription, and counts.
    c.queue_create("r", json!({})).await.unwrap();
    let on_r = c.queue_op("subscribe", Some("r"), json!({ "subscription_id": "s1" })).await;
    assert_eq!(code(on_r), 1006, "the same id on another queue is not a renewal");
    // A deleted queue's subscriptions no longer count.
    c.queue_create("gone", json!({})).await.unwrap();
    c.queue_op("unsubscribe", Some("q"), json!({ "subscription_id": "s2" })).await.unwrap();
    c.queue_op("subscribe", Some("gone"), json!({ "subscription_id": "g" })).await.unwrap();
    assert_eq!(code(subscribe("s2".to_owned()).await), 1006, "full again");
    c.queue_delete("gone").await.unwrap();
    subscribe("s2".to_owned()).await.expect("room once the queue is deleted");
    // Room again after an unsubscribe, and another connection has its own bound.
    assert_eq!(code(subscribe("s3".to_owned()).await), 1006, "full");
    c.queue_op("unsubscribe", Some("q"), json!({ "subscription_id": "s0" })).await.unwrap();
    subscribe("s3".to_owned()).await.expect("room after an unsubscribe");
    let other = client(&node).await;
    other.queue_op("subscribe", Some("q"), json!({ "subscription_id": "s9" })).await.expect("its own bound");
}
