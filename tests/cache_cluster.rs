//! The cache across the cluster (L3), in process: three nodes A, B, C (ports chosen by the
//! OS, fast gossip, in-memory stores), each key owned by 2 of them (rendezvous hashing).
//! A put on any node is read on any other; delete and invalidate on one node leave no
//! copy in any node's L1 or L2; a write drops the copies other nodes read earlier; `incr`
//! from three nodes at once is exact; a killed owner's replica serves its keys.

mod common;

use std::future::Future;
use std::time::Duration;

use futures_util::future::join_all;
use mpreg::{CacheOptions, Client, Settings};
use mpreg_actors::cache::core::{owners, CacheKey, KeyLimits};
use serde_json::json;

use common::node::{cluster_settings, TestNode};
use common::{cluster_id, poll_until_async};

const SOON: Duration = Duration::from_secs(20);

fn all() -> CacheOptions {
    CacheOptions::default()
}

/// Cluster test settings, with suspicion slower than the shared default: these tests
/// check what holds while the membership is stable (a link closed for silence by a
/// stalled debug build on a busy machine makes two nodes disagree on a key's primary,
/// the limit the README states); a departure (GOODBYE) is still seen at once.
///
/// Link queues are tiny, so the writes' replies and copies fill them at once: a full
/// queue must slow the writes down, never lose a reply (the caller would wait for its
/// timeout).
async fn start(name: &str, cluster: &str, peers: &[&TestNode]) -> TestNode {
    let settings = Settings {
        peers: peers.iter().map(|p| p.url().to_owned()).collect(),
        suspect_after_s: 5.0,
        remove_after_s: 10.0,
        outbox_capacity: 8,
        ..cluster_settings(name, cluster)
    };
    TestNode::start(settings, Vec::new()).await
}

async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until_async(what, SOON, probe).await
}

/// Three nodes that each see the other two as cache nodes.
async fn three_nodes(test: &str) -> [TestNode; 3] {
    let cluster = cluster_id(test);
    let a = start("A", &cluster, &[]).await;
    let b = start("B", &cluster, &[&a]).await;
    let c = start("C", &cluster, &[&a]).await;
    for node in [&a, &b, &c] {
        let cl = node.client().await;
        let cl = &cl;
        wait_until(&format!("{} to see 3 cache nodes", node.name()), move || async move {
            let stats = cl.cache_stats().await.ok()?;
            (stats["l3"]["nodes"] == json!(["A", "B", "C"])).then_some(())
        })
        .await;
    }
    [a, b, c]
}

/// The owners of `namespace`/`key` among A, B, C, as every node computes them.
fn owners_of(namespace: &str, key: &str) -> Vec<String> {
    let limits = KeyLimits { max_key_bytes: 1024, max_ttl_s: 1e6 };
    let input = CacheKey::new(namespace, key, &limits).unwrap().hash_input();
    let nodes = ["A".to_owned(), "B".to_owned(), "C".to_owned()];
    owners(&input, &nodes, 2).into_iter().map(str::to_owned).collect()
}

/// Whether `node` holds the key in `level` (`l1` or `l2`), without asking anyone else.
async fn holds(client: &Client, namespace: &str, key: &str, level: &str) -> bool {
    client.cache_get(namespace, key, all().levels(&[level])).await.unwrap().is_some()
}

#[actix_rt::test]
async fn a_put_on_a_is_read_on_c_and_stored_on_its_two_owners() {
    let nodes = three_nodes("cache-put-get").await;
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    let keys: Vec<String> = (0..24).map(|i| format!("k{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let version = clients[0].cache_put("ns", key, json!({"i": i}), all()).await.unwrap();
        let hit = clients[2].cache_get("ns", key, all()).await.unwrap().expect("C reads what A put");
        assert_eq!((hit.value, hit.version), (json!({"i": i}), version));
        let owners = owners_of("ns", key);
        // C read it from its own store if it owns the key, else from an owner.
        assert_eq!(hit.level, if owners.contains(&"C".to_owned()) { "l1" } else { "l3" }, "{key}: {owners:?}");
        for (name, cl) in ["A", "B", "C"].iter().zip(&clients) {
            assert_eq!(holds(cl, "ns", key, "l2").await, owners.contains(&name.to_string()), "{key} in {name}'s L2");
        }
    }
    let stored: u64 = join_all(clients.iter().map(|c| c.cache_stats()))
        .await
        .into_iter()
        .map(|s| s.unwrap()["l2"]["entries"].as_u64().unwrap())
        .sum();
    assert_eq!(stored, 2 * keys.len() as u64, "each key in exactly two L2s");
}

#[actix_rt::test]
async fn delete_and_invalidate_on_b_leave_no_copy_anywhere() {
    let nodes = three_nodes("cache-invalidate").await;
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    let keys: Vec<String> = (0..12).map(|i| format!("user:{i}")).collect();
    for key in &keys {
        clients[0].cache_put("profiles", key, json!(key), all()).await.unwrap();
        // Every node reads it: non-owners keep a copy in their L1.
        for cl in &clients {
            assert!(cl.cache_get("profiles", key, all()).await.unwrap().is_some());
        }
        for cl in [&clients[0], &clients[2]] {
            assert!(holds(cl, "profiles", key, "l1").await, "a copy or the owner's entry in L1");
        }
    }
    // Delete one key on B: gone from every level of every node.
    assert!(clients[1].cache_delete("profiles", "user:0", all()).await.unwrap());
    for cl in &clients {
        for level in ["l1", "l2"] {
            assert!(!holds(cl, "profiles", "user:0", level).await, "user:0 in {level}");
        }
        assert_eq!(cl.cache_get("profiles", "user:0", all()).await.unwrap(), None);
    }
    // Invalidate the namespace on B: nothing left on A or C either.
    let removed = clients[1].cache_invalidate("profiles", Some("user:"), all()).await.unwrap();
    assert!(removed >= 11 * 2, "at least the two owners' entries of 11 keys: {removed}");
    for (name, cl) in ["A", "B", "C"].iter().zip(&clients) {
        for key in &keys {
            for level in ["l1", "l2"] {
                assert!(!holds(cl, "profiles", key, level).await, "{key} still in {name}'s {level}");
            }
        }
        assert_eq!(cl.cache_get("profiles", "user:5", all()).await.unwrap(), None);
    }
}

#[actix_rt::test]
async fn a_write_on_one_node_drops_the_copies_read_on_the_others() {
    let nodes = three_nodes("cache-no-stale").await;
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    for i in 0..12 {
        let key = format!("k{i}");
        clients[0].cache_put("ns", &key, json!(1), all()).await.unwrap();
        for cl in &clients {
            assert_eq!(cl.cache_get("ns", &key, all()).await.unwrap().unwrap().value, json!(1));
        }
        // Written on another node each time; nobody serves the old value afterwards.
        clients[i % 3].cache_put("ns", &key, json!(2), all()).await.unwrap();
        for cl in &clients {
            assert_eq!(cl.cache_get("ns", &key, all()).await.unwrap().unwrap().value, json!(2), "{key}");
        }
        let counter = format!("n{i}");
        clients[1].cache_incr("ns", &counter, 5, all()).await.unwrap();
        for cl in &clients {
            assert_eq!(cl.cache_get("ns", &counter, all()).await.unwrap().unwrap().value, json!(5));
        }
        assert_eq!(clients[2].cache_incr("ns", &counter, 1, all()).await.unwrap(), 6);
        for cl in &clients {
            assert_eq!(cl.cache_get("ns", &counter, all()).await.unwrap().unwrap().value, json!(6));
        }
    }
}

#[actix_rt::test]
async fn incr_from_three_nodes_times_a_thousand_concurrent_calls_is_exact() {
    let nodes = three_nodes("cache-incr").await;
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    let calls = clients.iter().flat_map(|cl| (0..1000).map(move |_| cl.cache_incr("counters", "total", 1, all())));
    let results: Vec<i64> = join_all(calls).await.into_iter().map(|r| r.expect("incr answered")).collect();
    // Every value from 1 to 3000 handed out exactly once: each incr was atomic.
    let mut seen = results.clone();
    seen.sort_unstable();
    assert_eq!(seen, (1..=3000).collect::<Vec<i64>>());
    for cl in &clients {
        assert_eq!(cl.cache_get("counters", "total", all()).await.unwrap().unwrap().value, json!(3000));
    }
}

#[actix_rt::test]
async fn when_an_owner_is_killed_its_replica_serves() {
    let [a, b, c] = three_nodes("cache-owner-killed").await;
    // A key whose primary is A (the seed: B and C stay linked to each other after it goes).
    let key =
        (0..).map(|i| format!("k{i}")).find(|k| owners_of("ns", k)[0] == "A").expect("some key has A as its primary");
    let owners = owners_of("ns", &key);
    let replica = owners[1].clone();
    a.client().await.cache_put("ns", &key, json!("precious"), all()).await.unwrap();
    // Read on the node that is not the replica: it holds nothing and must ask.
    let (reader, replica_node) = if replica == "B" { (&c, &b) } else { (&b, &c) };
    drop(a);
    let cl = reader.client().await;
    let hit =
        wait_until("the replica to serve the key", || async { cl.cache_get("ns", &key, all()).await.ok().flatten() })
            .await;
    assert_eq!(hit.value, json!("precious"));
    assert_eq!(hit.level, "l3", "served by the replica");
    assert!(holds(&replica_node.client().await, "ns", &key, "l2").await, "the replica's own store has it");
    // Writes go on: the surviving owner becomes the primary.
    assert_eq!(cl.cache_incr("ns", "after", 1, all()).await.unwrap(), 1);
}
