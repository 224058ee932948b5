//! A structure-aware fuzz of peer frames (`server`, `fabric-gossip`, `fabric-message`).
//!
//! The generator builds random [`PeerFrame`] values — every variant of [`ServerFrame`],
//! [`GossipFrame`] and [`FabricBody`], with random names, instances, clusters, ids, paths,
//! hop budgets, JSON bodies, certificates, signatures and statement proofs — and random
//! byte mutations of their encodings (flips, cuts, duplications, insertions, truncation).
//!
//! - [`peer_frames_on_a_client_connection_are_answered_and_change_nothing`]: a node with
//!   credentials; each case goes on a raw client connection that did no handshake. A
//!   frame other than STATUS is answered 1004 and dropped; a STATUS (which only real
//!   credentials could get past) is refused and its connection closed; a mutated frame
//!   gets an answer (1002 for what does not decode). After all cases, `/topology` and
//!   `/catalog` are what they were, and the node still serves.
//! - [`decoded_peer_frames_fed_to_membership_and_trust_never_panic`]: unit level, no
//!   node: the bytes go through the fabric's decoder ([`PeerFrame::decode`]) and what
//!   decodes is fed to the membership core (`check`, `admit`, `apply_digest_bounded`,
//!   `apply_catalog`, `depart`, `tick`, `next_hops`), to a SWIM member (`receive`) and
//!   to the trust checks
//!   (`check_peer`, `open`, `verify_hex` over a link transcript).
//!
//! Both run `MPREG_FUZZ_CASES` cases (the variable `tests/hostile_rpc.rs` reads; by
//! default 24 on the wire and 256 at unit level): `MPREG_FUZZ_CASES=5000 cargo test
//! --test fuzz_peer_frames` for a long run.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures_util::SinkExt;
use mpreg::{Node, NodeBuilder, Settings};
use mpreg_actors::fabric::bridge::FederationFrame;
use mpreg_actors::fabric::membership::{MembershipCore, MembershipTiming};
use mpreg_actors::fabric::swim::{Liveness, Rumor, Swim, SwimConfig, SwimMessage};
use mpreg_actors::fabric::trust::{self, link_transcript, Authority, Certificate, LinkEnd, LinkSide, StatementProof};
use mpreg_actors::fabric::wire::{
    CallOutcome, CatalogDelta, FabricBody, FabricMessage, GossipFrame, MemberDigest, NodeInfo, PeerFrame, ServerFrame,
    StatusAuth,
};
use mpreg_actors::federation::keys::RouteKeyRing;
use mpreg_actors::function::{FunctionError, FunctionIdentity};
use mpreg_actors::protocol::PubSubMessage;
use mpreg_actors::version::Version;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use common::keys::Keys;
use common::ws::{raw_connect, raw_next, Ws};
use common::{cluster_id, get_ok};

/// Upper bound for one answer on a loaded 2-core machine (debug build).
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

fn cases(default: u32) -> u32 {
    std::env::var("MPREG_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Strategies

/// The names frames use: the fuzzed node's own ("A"), its cluster's members, strangers,
/// and hostile text.
fn name() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec!["A", "B", "C", "", "BROADCAST", "*", "A:1", "é\u{0}"]).prop_map(str::to_owned),
        "[a-zA-Z0-9:._-]{0,12}",
    ]
    .boxed()
}

fn hex_text() -> BoxedStrategy<String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..70).prop_map(|b| trust::to_hex(&b)),
        Just("00".repeat(64)),
        Just("zz".repeat(32)),
        ".{0,20}",
    ]
    .boxed()
}

/// JSON of a few levels: numbers at the edges, strings, nesting.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn json_map() -> BoxedStrategy<Map<String, Value>> {
    prop::collection::btree_map("[a-z]{1,3}", json_value(), 0..3).prop_map(|m| m.into_iter().collect()).boxed()
}

fn identity() -> BoxedStrategy<FunctionIdentity> {
    (
        prop::sample::select(vec!["echo", "b_fun", "add", "x"]),
        name(),
        (any::<u64>(), 0u64..3, 0u64..3),
        prop::collection::btree_set("[a-z]{1,4}", 0..3),
    )
        .prop_map(|(fun, id, (major, minor, patch), resources): (_, _, _, BTreeSet<String>)| FunctionIdentity {
            name: fun.to_owned(),
            function_id: if id.is_empty() { fun.to_owned() } else { id },
            version: Version { major: major % 1000, minor, patch },
            resources,
        })
        .boxed()
}

fn node_info() -> BoxedStrategy<NodeInfo> {
    (name(), name(), prop::sample::select(vec!["fuzz-cluster", "other", ""]), name())
        .prop_map(|(node, instance_id, cluster, port)| NodeInfo {
            node,
            instance_id,
            // "fuzz-cluster" is replaced by the node's real cluster id before sending.
            cluster_id: cluster.to_owned(),
            url: format!("ws://127.0.0.1:9/{port}"),
        })
        .boxed()
}

fn certificate() -> BoxedStrategy<Certificate> {
    let body = prop_oneof![
        ".{0,40}",
        (name(), hex_text(), any::<u64>()).prop_map(|(node, key, expires)| json!({
            "format": "mpreg-node-cert/1", "node": node, "cluster_id": "fuzz-cluster",
            "node_public_key": key, "authority_public_key": "00", "issued_at": 0, "expires_at": expires
        })
        .to_string()),
    ];
    (body, hex_text()).prop_map(|(body, signature)| Certificate { body, signature }).boxed()
}

fn proof() -> BoxedStrategy<StatementProof> {
    (".{0,60}", hex_text(), certificate())
        .prop_map(|(signed, signature, certificate)| StatementProof { signed, signature, certificate })
        .boxed()
}

fn delta() -> BoxedStrategy<CatalogDelta> {
    (
        (name(), name(), prop::sample::select(vec!["fuzz-cluster", "other"])),
        (any::<u64>(), any::<f64>(), prop_oneof![any::<f64>(), Just(60.0), Just(-1.0), Just(1e300)]),
        prop::collection::vec(identity(), 0..4),
        prop::option::of(proof()),
    )
        .prop_map(|((node, instance_id, cluster), (version, advertised_at, ttl_s), functions, proof)| {
            let finite = |f: f64| if f.is_finite() { f } else { 0.0 };
            CatalogDelta {
                node,
                instance_id,
                cluster_id: cluster.to_owned(),
                version,
                advertised_at: finite(advertised_at),
                ttl_s: finite(ttl_s),
                functions,
                queues: vec![],
                about: vec![],
                clusters: vec![],
                proof,
            }
        })
        .boxed()
}

fn digest() -> BoxedStrategy<MemberDigest> {
    (node_info(), any::<u64>(), any::<u64>(), prop::collection::vec(name(), 0..4))
        .prop_map(|(info, heartbeat, catalog_version, neighbours)| MemberDigest {
            info,
            heartbeat,
            catalog_version,
            neighbours,
        })
        .boxed()
}

fn server_frame() -> BoxedStrategy<ServerFrame> {
    let auth = (hex_text(), certificate(), prop::option::of(hex_text()), delta())
        .prop_map(|(nonce, certificate, proof, catalog)| Box::new(StatusAuth { nonce, certificate, proof, catalog }));
    prop_oneof![
        (node_info(), prop::collection::vec(identity(), 0..3), any::<u64>(), prop::option::of(auth)).prop_map(
            |(info, functions, catalog_version, auth)| ServerFrame::Status {
                info,
                functions,
                catalog_version,
                queues: vec![],
                about: vec![],
                auth,
            }
        ),
        hex_text().prop_map(|signature| ServerFrame::Proof { signature }),
        (".{0,30}", prop::collection::vec(".{0,30}", 0..3))
            .prop_map(|(reason, try_instead)| ServerFrame::Refused { reason, try_instead }),
        (name(), name(), prop::option::of(proof())).prop_map(|(node, instance_id, proof)| ServerFrame::Goodbye {
            node,
            instance_id,
            proof
        }),
    ]
    .boxed()
}

fn rumor() -> BoxedStrategy<Rumor> {
    let liveness =
        prop_oneof![Just(Liveness::Alive), Just(Liveness::Suspect), Just(Liveness::Dead), Just(Liveness::Left)];
    (prop_oneof![Just("A#a1".to_owned()), name()], any::<u64>(), liveness)
        .prop_map(|(member, incarnation, liveness)| Rumor { member, incarnation, liveness })
        .boxed()
}

fn swim_message() -> BoxedStrategy<SwimMessage> {
    let rumors = || prop::collection::vec(rumor(), 0..5);
    prop_oneof![
        (any::<u64>(), rumors()).prop_map(|(seq, rumors)| SwimMessage::Ping { seq, rumors }),
        (any::<u64>(), name(), rumors()).prop_map(|(seq, target, rumors)| SwimMessage::PingReq { seq, target, rumors }),
        (any::<u64>(), rumors()).prop_map(|(seq, rumors)| SwimMessage::Ack { seq, rumors }),
        (rumors(), any::<bool>()).prop_map(|(members, reply)| SwimMessage::PushPull { members, reply }),
    ]
    .boxed()
}

fn gossip_frame() -> BoxedStrategy<GossipFrame> {
    prop_oneof![
        (
            prop_oneof![Just("B#b1".to_owned()), name()],
            prop_oneof![Just("A#a1".to_owned()), name()],
            swim_message(),
            prop::collection::vec(digest(), 0..3),
            prop::collection::vec(delta(), 0..2)
        )
            .prop_map(|(from, to, message, records, deltas)| GossipFrame::Swim {
                from,
                to,
                message,
                records,
                deltas
            }),
        (name(), prop::collection::vec(digest(), 0..6))
            .prop_map(|(from, members)| GossipFrame::Members { from, members }),
        (name(), prop::collection::vec(delta(), 0..4)).prop_map(|(from, deltas)| GossipFrame::Catalog { from, deltas }),
        (name(), prop::collection::vec(name(), 0..5))
            .prop_map(|(from, nodes)| GossipFrame::CatalogRequest { from, nodes }),
        (name(), name(), name(), prop::option::of(proof()))
            .prop_map(|(from, node, instance_id, proof)| { GossipFrame::Departed { from, node, instance_id, proof } }),
    ]
    .boxed()
}

fn outcome() -> BoxedStrategy<CallOutcome> {
    prop_oneof![
        json_value().prop_map(|value| CallOutcome::Ok { value }),
        (".{0,8}", ".{0,20}", name())
            .prop_map(|(kind, message, node)| CallOutcome::Failed { error: FunctionError::new(kind, message), node }),
        name().prop_map(|node| CallOutcome::NotFound { node }),
        ".{0,20}".prop_map(|reason| CallOutcome::Unreachable { reason }),
        ".{0,20}".prop_map(|reason| CallOutcome::Overloaded { reason }),
    ]
    .boxed()
}

fn body() -> BoxedStrategy<FabricBody> {
    let message =
        (".{0,20}", json_value(), name(), any::<u32>()).prop_map(|(topic, payload, message_id, hop)| PubSubMessage {
            topic,
            payload,
            timestamp: 0.0,
            message_id,
            publisher: String::new(),
            headers: Map::new(),
            routing_path: Some(vec!["B".to_owned()]),
            current_hop: Some(hop),
        });
    prop_oneof![
        (".{0,8}", identity(), prop::collection::vec(json_value(), 0..4), json_map()).prop_map(
            |(command, identity, args, kwargs)| FabricBody::Call { command, identity, args, kwargs, timeout_ms: None }
        ),
        outcome().prop_map(|outcome| FabricBody::Reply { outcome }),
        message.prop_map(|message| FabricBody::Publish { message }),
        gossip_frame().prop_map(|frame| FabricBody::Gossip { frame }),
    ]
    .boxed()
}

fn fabric_message() -> BoxedStrategy<FabricMessage> {
    let id = prop_oneof![
        // The shape of A's call ids, with guessed counters and random bits.
        (name(), 0u64..50, any::<u64>()).prop_map(|(instance, n, bits)| format!("A:{instance}:{n}:{bits:016x}")),
        ".{0,24}",
    ];
    let hops = prop_oneof![Just(0u32), Just(1), Just(5), any::<u32>()];
    (
        id,
        name(),
        prop_oneof![Just("A".to_owned()), Just("*".to_owned()), name()],
        prop::collection::vec(name(), 0..6),
        hops,
        body(),
    )
        .prop_map(|(id, source, target, path, hops_left, body)| FabricMessage {
            id,
            source,
            target,
            path,
            hops_left,
            body,
        })
        .boxed()
}

fn peer_frame() -> BoxedStrategy<PeerFrame> {
    prop_oneof![
        server_frame().prop_map(PeerFrame::Server),
        gossip_frame().prop_map(PeerFrame::FabricGossip),
        fabric_message().prop_map(PeerFrame::FabricMessage),
    ]
    .boxed()
}

/// One byte-level change.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bits: u8 },
    Cut { at: usize, len: usize },
    Repeat { at: usize, len: usize },
    Insert { at: usize, byte: u8 },
    Truncate { at: usize },
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Cut { at, len }),
        (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Repeat { at, len }),
        (any::<usize>(), prop::sample::select(b"{}[]\":,0\\\x00\xff".to_vec()))
            .prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
    .boxed()
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match *m {
            Mutation::Flip { at, bits } => bytes[at % n] ^= bits,
            Mutation::Cut { at, len } => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            Mutation::Repeat { at, len } => {
                let at = at % n;
                let piece = bytes[at..(at + len).min(n)].to_vec();
                bytes.splice(at..at, piece);
            }
            Mutation::Insert { at, byte } => bytes.insert(at % (n + 1), byte),
            Mutation::Truncate { at } => bytes.truncate(at % n),
        }
    }
    bytes
}

/// A case: a frame, and (sometimes) mutations of its bytes.
fn case() -> impl Strategy<Value = (PeerFrame, Vec<Mutation>)> {
    (peer_frame(), prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..4)])
}

/// The frame's bytes, with the placeholder cluster replaced by `cluster`.
fn encode(frame: &PeerFrame, cluster: &str) -> Vec<u8> {
    serde_json::to_string(frame).expect("frames encode").replace("fuzz-cluster", cluster).into_bytes()
}

// ---------------------------------------------------------------------------------------
// (a) On the wire

/// What came back for one frame.
#[derive(Debug)]
enum Answer {
    /// A data frame.
    Frame(Value),
    /// The connection closed.
    Closed,
}

async fn answer(ws: &mut Ws) -> Answer {
    raw_next(ws, ANSWER_WITHIN).await.map_or(Answer::Closed, Answer::Frame)
}

/// The parts of `/topology` and `/catalog` an attacker must not change.
async fn state(monitoring: &str) -> (Value, Value) {
    let topology: Value = serde_json::from_str(&get_ok(&format!("{monitoring}/topology")).await.unwrap()).unwrap();
    let catalog: Value = serde_json::from_str(&get_ok(&format!("{monitoring}/catalog")).await.unwrap()).unwrap();
    let nodes: Vec<Value> = topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| json!([n["node"], n["instance_id"], n["state"], n["linked"]]))
        .collect();
    let entries: Vec<Value> = catalog["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!([e["node"], e["instance_id"], e["version"], e["functions"]]))
        .collect();
    (json!([nodes, topology["links"]]), Value::Array(entries))
}

#[test]
fn peer_frames_on_a_client_connection_are_answered_and_change_nothing() {
    let cluster = cluster_id("fuzz-peer");
    let keys = Keys::new(&cluster);
    let credentials = keys.issue("A");

    let (urls_tx, urls_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let node_cluster = cluster.clone();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let settings = Settings {
                name: "A".to_owned(),
                port: 0,
                monitoring_port: 0,
                cluster_id: node_cluster,
                functions: vec!["demo".to_owned()],
                credentials: Some(credentials),
                request_timeout_s: 2.0,
                ..Settings::default()
            };
            let node: Node = NodeBuilder::new(settings).start().await.expect("node starts");
            let monitoring = node.monitoring_url().expect("monitoring is on").to_owned();
            urls_tx.send((node.url().to_owned(), monitoring)).expect("test waits for the URLs");
            let _ = stop_rx.await;
            node.shutdown().await;
        });
    });
    let (url, monitoring) = urls_rx.recv().expect("node started");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let before = runtime.block_on(state(&monitoring));
    // Taken out for each case and put back: no borrow is held across an await.
    let socket = RefCell::new(Some(runtime.block_on(raw_connect(&url))));
    let dropped_frames = RefCell::new(0u64);
    let config = ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() };
    TestRunner::new(config)
        .run(&case(), |(frame, mutations)| {
            let bytes = mutate(encode(&frame, &cluster), &mutations);
            let mut ws = match socket.borrow_mut().take() {
                Some(ws) => ws,
                None => runtime.block_on(raw_connect(&url)),
            };
            let reply = runtime.block_on(async {
                ws.send(Message::Binary(bytes.clone())).await.expect("frame sent");
                answer(&mut ws).await
            });
            let shown = String::from_utf8_lossy(&bytes).into_owned();
            let is_status = |f: &PeerFrame| matches!(f, PeerFrame::Server(ServerFrame::Status { .. }));
            match (mutations.is_empty(), &reply) {
                (true, Answer::Frame(reply)) if is_status(&frame) => {
                    // Only real credentials get past a STATUS: refused, then closed.
                    prop_assert_eq!(&reply["kind"], &json!("refused"), "{} -> {}", shown, reply);
                    let closed = runtime.block_on(answer(&mut ws));
                    prop_assert!(matches!(closed, Answer::Closed), "{:?}", closed);
                    return Ok(());
                }
                (true, Answer::Frame(reply)) => {
                    prop_assert_eq!(&reply["error"]["code"], &json!(1004), "{} -> {}", shown, reply);
                    *dropped_frames.borrow_mut() += 1;
                }
                (false, Answer::Frame(reply)) => {
                    // A mutated frame: answered, whatever it became (1002 if it does not
                    // decode); a refused STATUS closes the connection after its answer.
                    let answered = reply.get("error").is_some() || reply.get("role").is_some();
                    prop_assert!(answered, "{} -> {}", shown, reply);
                    if reply["kind"] == json!("refused") {
                        return Ok(());
                    }
                }
                (_, Answer::Closed) => prop_assert!(false, "{} closed the connection without an answer", shown),
            }
            *socket.borrow_mut() = Some(ws);
            Ok(())
        })
        .unwrap();

    runtime.block_on(async {
        let after = state(&monitoring).await;
        assert_eq!(after.1, before.1, "the catalog did not change");
        // Refused links come and go; only admitted nodes and their states count.
        assert_eq!(after.0[0], before.0[0], "the membership did not change");
        let kept = socket.borrow_mut().take();
        let mut ws = match kept {
            Some(ws) => ws,
            None => raw_connect(&url).await,
        };
        let rpc = json!({"role": "rpc", "u": "last", "cmds": [{"name": "e", "fun": "echo", "args": [1]}]});
        ws.send(Message::Text(rpc.to_string())).await.unwrap();
        loop {
            if let Answer::Frame(reply) = answer(&mut ws).await {
                if reply["u"] == "last" {
                    assert_eq!(reply["r"], json!({"e": 1}));
                    break;
                }
            } else {
                panic!("closed");
            }
        }
    });
    eprintln!("{} well-formed peer frames answered 1004", dropped_frames.borrow());
    let _ = stop_tx.send(());
    server.join().expect("node thread ends");
    drop(keys);
}

// ---------------------------------------------------------------------------------------
// (b) At unit level

/// Feeds a decoded frame to the membership core and the trust checks, as the fabric
/// would on an admitted link (and more: every statement is checked, signed or not).
fn feed(frame: PeerFrame, core: &mut MembershipCore, swim: &mut Swim, trust: &trust::Credentials, now: f64) {
    let now_s = trust::unix_seconds();
    let open = |proof: &StatementProof, node: &str| {
        if let Ok(text) = trust.open(proof, node, now_s) {
            let _ = serde_json::from_str::<CatalogDelta>(text);
        }
    };
    let direct: HashSet<String> = ["B".to_owned()].into_iter().collect();
    match frame {
        PeerFrame::Server(ServerFrame::Status { info, auth, functions, catalog_version, .. }) => {
            let _ = core.check(&info, now);
            if let Some(auth) = auth {
                if let Ok(key) = trust.check_peer(&auth.certificate, &info.node, now_s) {
                    let me = LinkEnd { node: "A", instance_id: "a1", nonce: "00" };
                    let them = LinkEnd { node: &info.node, instance_id: &info.instance_id, nonce: &auth.nonce };
                    let transcript = link_transcript(LinkSide::Acceptor, &info.cluster_id, me, them);
                    let _ = trust::verify_hex(&key, &transcript, auth.proof.as_deref().unwrap_or(""));
                }
                if let Some(proof) = &auth.catalog.proof {
                    open(proof, &auth.catalog.node);
                }
                let _ = core.apply_catalog(&auth.catalog, now);
            }
            if core.admit(&info, now).is_ok() {
                let delta = CatalogDelta {
                    node: info.node.clone(),
                    instance_id: info.instance_id.clone(),
                    cluster_id: info.cluster_id.clone(),
                    version: catalog_version,
                    advertised_at: 0.0,
                    ttl_s: 60.0,
                    functions,
                    queues: vec![],
                    about: vec![],
                    clusters: vec![],
                    proof: None,
                };
                let _ = core.apply_catalog(&delta, now);
            }
        }
        PeerFrame::Server(ServerFrame::Proof { signature }) => {
            let _ = trust::verify_hex(trust.authority(), b"transcript", &signature);
        }
        PeerFrame::Server(ServerFrame::Refused { .. }) => {}
        PeerFrame::Server(ServerFrame::Goodbye { node, instance_id, proof })
        | PeerFrame::FabricGossip(GossipFrame::Departed { node, instance_id, proof, .. }) => {
            if let Some(proof) = &proof {
                open(proof, &node);
            }
            let _ = core.depart(&node, &instance_id, now);
            let _ = core.mark_suspect(&node, &instance_id);
        }
        PeerFrame::FabricGossip(GossipFrame::Members { members, .. }) => {
            let outcome = core.apply_digest_bounded(&members, now, 16);
            let _ = core.catalogs_of(&outcome.wanted, now);
            let _ = core.next_hops(&direct);
        }
        PeerFrame::FabricGossip(GossipFrame::Swim { from, message, records, deltas, .. }) => {
            let _ = core.apply_digest_bounded(&records, now, 16);
            for delta in &deltas {
                let _ = core.apply_catalog(delta, now);
            }
            let _ = swim.receive(&from, message, now);
            let _ = swim.tick(now);
            for m in records {
                let _ = core.mark_alive(&m.info.node, &m.info.instance_id, now);
                let _ = core.remove_dead(&m.info.node, &m.info.instance_id, now);
            }
        }
        PeerFrame::FabricGossip(GossipFrame::Catalog { deltas, .. }) => {
            for delta in &deltas {
                if let Some(proof) = &delta.proof {
                    open(proof, &delta.node);
                }
                let _ = core.apply_catalog(delta, now);
            }
        }
        PeerFrame::FabricGossip(GossipFrame::CatalogRequest { nodes, .. }) => {
            let _ = core.catalogs_of(&nodes, now);
        }
        PeerFrame::FabricMessage(message) => {
            let _ = core.next_hops(&direct);
            if let FabricBody::Gossip { frame } = message.body {
                feed(PeerFrame::FabricGossip(frame), core, swim, trust, now);
            }
        }
        // Only on a bridge (another cluster); route updates are opened against the keys
        // pinned for the sender, here none.
        PeerFrame::Federation(FederationFrame::Updates { updates }) => {
            let ring = RouteKeyRing::default();
            for update in &updates {
                let _ = update.open("B", &ring, now_s);
            }
        }
        PeerFrame::Federation(_) => {}
    }
}

#[test]
fn decoded_peer_frames_fed_to_membership_and_trust_never_panic() {
    let authority = Authority::generate();
    let trust = authority.issue("A", "fuzz-cluster", trust::unix_seconds(), 3600).expect("credentials");
    let me = NodeInfo {
        node: "A".into(),
        instance_id: "a1".into(),
        cluster_id: "fuzz-cluster".into(),
        url: "ws://127.0.0.1:1".into(),
    };
    // One core across cases, so frames act on the state earlier ones built.
    let core = RefCell::new(MembershipCore::new(me, MembershipTiming::default(), vec![]));
    let swim = RefCell::new(Swim::new("A#a1", SwimConfig::default(), 0.0, 7));
    let step = RefCell::new(0.0f64);
    let config = ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() };
    TestRunner::new(config)
        .run(&case(), |(frame, mutations)| {
            let bytes = mutate(encode(&frame, "fuzz-cluster"), &mutations);
            let decoded = PeerFrame::decode(&bytes);
            if mutations.is_empty() {
                prop_assert_eq!(decoded.as_ref().ok(), Some(&frame), "every frame round-trips");
            }
            let now = {
                let mut step = step.borrow_mut();
                *step += 0.5;
                *step
            };
            let mut core = core.borrow_mut();
            if let Ok(frame) = decoded {
                feed(frame, &mut core, &mut swim.borrow_mut(), &trust, now);
            }
            let _ = core.tick(now);
            let _ = core.digest();
            let _ = core.all_catalogs(now);
            Ok(())
        })
        .unwrap();
}
