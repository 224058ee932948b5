//! NodeBuilder: settings + functions -> a running supervision tree.
//!
//! ```no_run
//! # async fn run() -> Result<(), mpreg::node::NodeError> {
//! use mpreg::{FunctionSpec, NodeBuilder, Settings};
//! let node = NodeBuilder::new(Settings { port: 0, ..Settings::default() })
//!     .function(FunctionSpec::sync("add", |a: i64, b: i64| a + b).inline().resources(["cpu"]))
//!     .start()
//!     .await?;
//! println!("listening on {}", node.url());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! `start` must run inside an actix `System` (`#[actix_rt::main]`, `#[actix_rt::test]`).
//! Both listeners are bound before anything else starts, so port 0 works and the URLs
//! reported are the real ones.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, ArbiterHandle};
use mpreg_actors::cache::core::{KeyLimits, L1Limits};
use mpreg_actors::cache::{Cache, CacheLimits, LocalCache};
use mpreg_actors::connection::{self, ConnectionConfig, NodeShared};
use mpreg_actors::discovery::{self, DiscoveryLimits};
use mpreg_actors::fabric::bridge::{BridgeConfig, Bridges};
use mpreg_actors::fabric::describe::Describer;
use mpreg_actors::fabric::membership::MembershipTiming;
use mpreg_actors::fabric::trust::{self, Credentials, TrustError};
use mpreg_actors::fabric::wire::NodeInfo;
use mpreg_actors::fabric::{
    FabricConfig, FabricGossip, FabricShared, LinkLimits, LinkQueue, SayGoodbye, SnapshotConfig,
};
use mpreg_actors::federation::core::FederationConfig;
use mpreg_actors::federation::keys::{RouteSigner, ROUTE_KEY_FILE};
use mpreg_actors::function::FunctionSpec;
use mpreg_actors::metrics::Metrics;
use mpreg_actors::monitor::{Monitor, MonitorState};
use mpreg_actors::persistence::{self, OpenError, Persistence, PersistenceHandle};
use mpreg_actors::planner::{Limits, Planner};
use mpreg_actors::pubsub::{BacklogLimits, PubSub, PubSubLimits};
use mpreg_actors::queue::{Queue, QueueBoard, QueueLimits};
use mpreg_actors::registry::{FunctionTable, RegisterFunctions, Registry, RegistryError, TableHandle};
use mpreg_actors::supervisor::{
    ChildHandles, ChildSpec, CrashChild, NodeExit, NodeSupervisor, RestartPolicy, Shutdown, Slot,
};
use mpreg_actors::worker::{WorkerConfig, WorkerHub};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Settings;
use crate::functions;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Settings out of range.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory is unusable.
    #[error("data_dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The store under the data directory cannot be opened: locked, corrupt, unwritable.
    #[error(transparent)]
    Storage(#[from] OpenError),
    /// The cache's store level cannot be read.
    #[error("cache: {0}")]
    Cache(String),
    /// Two functions with conflicting identities.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// `--functions` named something unknown.
    #[error("{0}")]
    Functions(String),
    /// The credentials file is unusable, or is for another node or cluster.
    #[error("credentials {path}: {reason}")]
    Credentials {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `[mpreg.federation]` cannot be used (a pinned key, the route key).
    #[error("federation: {0}")]
    Federation(String),
    /// The worker token file cannot be read or is empty.
    #[error("worker_token_file {path}: {reason}")]
    WorkerToken {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Reads the worker token file (trailing whitespace ignored), if one is set.
fn load_worker_token(settings: &Settings) -> Result<Option<String>, NodeError> {
    let Some(path) = &settings.worker_token_file else { return Ok(None) };
    let fail = |reason: String| NodeError::WorkerToken { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let token = text.trim_end().to_owned();
    if token.is_empty() {
        return Err(fail("the file is empty".to_owned()));
    }
    Ok(Some(token))
}

/// The node's federation bridges, when `[mpreg.federation]` allows some cluster: the
/// pinned authorities parsed, the route key loaded and checked against this node's own
/// authority.
fn load_bridges(
    settings: &Settings,
    credentials: Option<&Credentials>,
    metrics: Arc<Metrics>,
) -> Result<Option<Arc<Bridges>>, NodeError> {
    let federation = &settings.federation;
    let (Some(credentials), Some(dir)) = (credentials, &federation.route_key_dir) else { return Ok(None) };
    if federation.allowed_clusters.is_empty() {
        return Ok(None);
    }
    let fail = |e: String| NodeError::Federation(e);
    let mut pinned = BTreeMap::new();
    for (cluster, hex) in &federation.trust {
        let key = trust::verifying_key(hex, &format!("trust.{cluster}")).map_err(|e| fail(e.to_string()))?;
        pinned.insert(cluster.clone(), key);
    }
    let path = dir.join(ROUTE_KEY_FILE);
    let signer = RouteSigner::load(&path, credentials.authority()).map_err(|e| fail(e.to_string()))?;
    if signer.cluster_id() != settings.cluster_id {
        let other = signer.cluster_id();
        return Err(fail(format!("{} is a route key of cluster {other}", path.display())));
    }
    let mut config = FederationConfig::new(&settings.cluster_id);
    config.import = federation.import.clone();
    config.export = federation.export.clone();
    config.ttl_ms = Settings::seconds(federation.route_ttl_s).as_millis().try_into().unwrap_or(u64::MAX);
    let config = BridgeConfig {
        allowed: federation.allowed_clusters.iter().cloned().collect(),
        pinned,
        signer,
        federation: config,
        announce_interval: Settings::seconds(federation.announce_interval_s),
        hop_budget: federation.hop_budget,
        route_key: Some((path, *credentials.authority())),
        exports: federation.compiled_exports().map_err(fail)?,
        // Bounded like calls forwarded inside the cluster.
        call_ttl: LinkLimits::default().forwarded_ttl,
        max_waiting_calls: LinkLimits::default().max_forwarded_calls,
    };
    Ok(Some(Arc::new(Bridges::new(config, metrics))))
}

/// Loads the credentials named in `settings` and checks them against the node's name
/// (an empty name becomes the certificate's) and cluster.
fn load_credentials(settings: &mut Settings) -> Result<Option<Arc<Credentials>>, NodeError> {
    let Some(path) = settings.credentials.clone() else { return Ok(None) };
    let fail = |reason: String| NodeError::Credentials { path: path.display().to_string(), reason };
    let credentials = Credentials::load(&path, trust::unix_seconds()).map_err(|e| match e {
        TrustError::Io { source, .. } => fail(source.to_string()),
        other => fail(other.to_string()),
    })?;
    let body = credentials.body();
    if settings.name.is_empty() {
        settings.name = body.node.clone();
    } else if settings.name != body.node {
        return Err(fail(format!("issued to node {:?}, but this node is named {:?}", body.node, settings.name)));
    }
    if settings.cluster_id != body.cluster_id {
        return Err(fail(format!(
            "issued for cluster {:?}, but cluster_id is {:?}",
            body.cluster_id, settings.cluster_id
        )));
    }
    Ok(Some(Arc::new(credentials)))
}

/// Collects settings and functions, then starts a node.
pub struct NodeBuilder {
    settings: Settings,
    functions: Vec<FunctionSpec>,
}

impl NodeBuilder {
    /// A builder with `settings`; the built-in `echo` and `echos` are always registered.
    pub fn new(settings: Settings) -> Self {
        NodeBuilder { settings, functions: functions::builtins() }
    }

    /// Adds a function.
    pub fn function(mut self, spec: FunctionSpec) -> Self {
        self.functions.push(spec);
        self
    }

    /// Binds the listeners, starts the supervision tree and the websocket server.
    pub async fn start(self) -> Result<Node, NodeError> {
        let NodeBuilder { mut settings, mut functions } = self;
        settings.validate()?;
        let credentials = load_credentials(&mut settings)?;
        let worker_token = load_worker_token(&settings)?;
        functions.extend(functions::by_names(&settings.functions).map_err(NodeError::Functions)?);
        let mut table = FunctionTable::default();
        for spec in functions {
            table.register(spec)?;
        }
        // Before anything listens: a data dir that cannot be used stops the node here.
        let store = persistence::open_store(settings.data_dir.as_deref())?;
        let ws_listener = bind(&settings.host, settings.port)?;
        let ws_addr =
            ws_listener.local_addr().map_err(|source| NodeError::Bind { addr: settings.host.clone(), source })?;
        let url = format!("ws://{}", display_addr(&settings.host, ws_addr));
        let name = if settings.name.is_empty() { display_addr(&settings.host, ws_addr) } else { settings.name.clone() };
        let monitor_listener =
            if settings.monitoring_enabled { Some(bind(&settings.host, settings.monitoring_port)?) } else { None };
        let monitoring_url = match &monitor_listener {
            Some(l) => {
                let addr = l.local_addr().map_err(|source| NodeError::Bind { addr: settings.host.clone(), source })?;
                Some(format!("http://{}", display_addr(&settings.host, addr)))
            }
            None => None,
        };

        let metrics = Arc::new(Metrics::with_max_in_flight(settings.max_in_flight));
        if store.is_durable() {
            info!(node = %name, store = %store.describe(), max_batch = settings.persistence_max_batch,
                "persistence opened: durable writes are acknowledged after flush + fdatasync");
        } else {
            warn!(node = %name, "no data_dir: queues and snapshots are kept in memory and are NOT durable \
                (give --data-dir for durable state)");
        }
        let persistence = PersistenceHandle::start(store, settings.persistence_max_batch, Some(metrics.clone()))
            .map_err(|source| NodeError::DataDir {
                path: settings.data_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                source,
            })?;
        let cache = Arc::new(
            LocalCache::open(persistence.clone(), cache_limits(&settings), mpreg_actors::unix_now())
                .map_err(|e| NodeError::Cache(e.to_string()))?,
        );
        let persistence_slot: Slot<Persistence> = Slot::default();
        // The discovery built-ins answer from the fabric's view; local-only, never advertised.
        let gossip: Slot<FabricGossip> = Slot::default();
        // Status, discovery and the monitor ask the fabric through one gate.
        let describer = Describer::new(gossip.clone(), metrics.clone());
        let discovery_limits = DiscoveryLimits {
            page_size: settings.discovery_page_size,
            max_page_size: settings.discovery_max_page_size,
        };
        for spec in discovery::builtins(describer.clone(), discovery_limits, metrics.clone()) {
            table.register(spec)?;
        }
        let table = TableHandle::new(table);
        let registry: Slot<Registry> = Slot::default();
        let pubsub: Slot<PubSub> = Slot::default();
        let planner: Slot<Planner> = Slot::default();
        let queue: Slot<Queue> = Slot::default();
        let queue_board = QueueBoard::default();
        let workers = WorkerHub::new(
            WorkerConfig {
                max_workers: settings.max_workers,
                max_functions_per_worker: settings.max_functions_per_worker,
                max_concurrency: settings.worker_max_concurrency,
                heartbeat: Settings::seconds(settings.worker_heartbeat_s),
                timeout: Settings::seconds(settings.worker_timeout_s),
                default_deadline: Settings::seconds(settings.request_timeout_s),
                token: worker_token,
                token_required: credentials.is_some(),
                lanes: settings.workers.saturating_sub(1),
            },
            registry.clone(),
            metrics.clone(),
        );
        let supervisor_slot: Slot<NodeSupervisor> = Slot::default();
        let me = NodeInfo {
            node: name.clone(),
            instance_id: format!("{:016x}", rand::random::<u64>()),
            cluster_id: settings.cluster_id.clone(),
            url: settings.advertise_url.clone().unwrap_or_else(|| url.clone()),
        };
        match &credentials {
            Some(c) => info!(node = %name, cluster = %settings.cluster_id,
                authority = %trust::to_hex(c.authority().as_bytes()), "peer links are authenticated"),
            None => warn!(node = %name, host = %settings.host, insecure = settings.insecure,
                "peer links are not authenticated: any process that can reach this port can join the cluster \
                 (run with --credentials for production)"),
        }
        let bridges = load_bridges(&settings, credentials.as_deref(), metrics.clone())?;
        let limits = LinkLimits {
            max_in_flight_per_link: settings.max_in_flight_per_link,
            max_served_call: settings.max_request_timeout(),
            ..LinkLimits::default()
        };
        let fabric = Arc::new(
            FabricShared::new(me, settings.hop_budget, table.clone(), pubsub.clone(), gossip.clone())
                .with_trust(credentials)
                .with_bridges(bridges)
                .with_metrics(metrics.clone())
                .with_limits(limits)
                .with_queue(queue.clone())
                .with_discovery_log(settings.discovery_change_log_items)
                .with_cache(cache.clone()),
        );
        let fabric_config = FabricConfig {
            // Bridges are dialled and redialled like peers; the handshake tells them apart.
            peers: settings.peers.iter().chain(&settings.federation.peers).cloned().collect(),
            federation_peers: settings.federation.peers.clone(),
            fanout: settings.peer_fanout,
            max_inbound_links: settings.max_inbound_links,
            gossip_interval: Settings::seconds(settings.gossip_interval_s),
            timing: MembershipTiming {
                suspect_after: settings.suspect_after_s,
                remove_after: settings.remove_after_s,
                departed_grace: settings.departed_grace_s,
                catalog_ttl: settings.catalog_ttl_s,
            },
            swim: settings.swim_config(),
            dial_timeout: Duration::from_secs(2),
            max_backoff: Settings::seconds((settings.gossip_interval_s * 8.0).max(2.0)),
            link_queue: LinkQueue {
                frames: settings.outbox_capacity,
                bytes: settings.max_outbound_bytes_per_connection,
            },
            max_catalog_entries_per_node: settings.max_catalog_entries_per_node,
            max_new_members_per_frame: settings.max_new_members_per_frame,
            max_dials_per_round: settings.max_dials_per_round,
            // Catalog snapshots (restored at start, saved periodically and at GOODBYE).
            snapshots: (settings.catalog_snapshot_interval_s > 0.0).then(|| SnapshotConfig {
                store: persistence.clone(),
                interval: Settings::seconds(settings.catalog_snapshot_interval_s),
            }),
        };
        let mut children = vec![
            // First: everything that persists finds the store through it.
            ChildSpec::new("persistence", {
                let (handle, slot) = (persistence.clone(), persistence_slot.clone());
                move |guard| {
                    let addr = Persistence::new(handle.clone(), guard).start();
                    slot.set(addr.clone());
                    ChildHandles::of(&addr)
                }
            }),
            ChildSpec::new("registry", {
                let (table, registry, gossip) = (table.clone(), registry.clone(), gossip.clone());
                move |guard| {
                    let addr = Registry::new(table.clone(), gossip.clone(), guard).start();
                    registry.set(addr.clone());
                    ChildHandles::of(&addr)
                }
            }),
            ChildSpec::new("pubsub", {
                let (pubsub, metrics) = (pubsub.clone(), metrics.clone());
                let limits = PubSubLimits {
                    max_topic_words: settings.pubsub_max_topic_words,
                    max_topic_bytes: settings.pubsub_max_topic_bytes,
                    max_patterns_per_subscription: settings.pubsub_max_patterns_per_subscription,
                    max_subscriptions_per_connection: settings.pubsub_max_subscriptions_per_connection,
                    max_index_words: settings.pubsub_max_index_words,
                };
                let backlog = BacklogLimits {
                    seconds: settings.pubsub_backlog_seconds,
                    max_messages: settings.pubsub_backlog_max,
                    max_bytes: settings.pubsub_backlog_max_bytes,
                    max_message_bytes: settings.pubsub_backlog_max_message_bytes,
                };
                move |guard| {
                    let addr = PubSub::new(limits.clone(), backlog.clone(), metrics.clone(), guard).start();
                    pubsub.set(addr.clone());
                    ChildHandles::of(&addr)
                }
            }),
        ];
        children.push(ChildSpec::new("queue", {
            let (queue, board, metrics, store, pubsub) =
                (queue.clone(), queue_board.clone(), metrics.clone(), persistence.clone(), pubsub.clone());
            let fabric = fabric.clone();
            let limits = QueueLimits {
                max_queues: settings.queue_max_queues,
                max_bytes: settings.queue_max_bytes,
                max_wait: settings.queue_max_wait_s,
                max_message_bytes: settings.max_frame_bytes,
                node: name.clone(),
                max_bindings_per_queue: settings.pubsub_max_subscriptions_per_connection,
                max_subscriptions_per_connection: settings.pubsub_max_subscriptions_per_connection,
            };
            move |guard| {
                let addr = Queue::new(store.clone(), metrics.clone(), limits.clone(), board.clone(), guard)
                    .with_pubsub(pubsub.clone())
                    .with_fabric(fabric.clone())
                    .start();
                queue.set(addr.clone());
                ChildHandles::of(&addr)
            }
        }));
        children.push(ChildSpec::new("cache", {
            let (cache, interval) = (cache.clone(), Settings::seconds(settings.cache_sweep_interval_s));
            move |guard| ChildHandles::of(&Cache::new(cache.clone(), interval, guard).start())
        }));
        children.push(ChildSpec::new("fabric", {
            let (fabric, gossip) = (fabric.clone(), gossip.clone());
            move |guard| {
                let addr = FabricGossip::new(fabric.clone(), fabric_config.clone(), guard).start();
                gossip.set(addr.clone());
                ChildHandles::of(&addr)
            }
        }));
        // The Planner gets its own thread: large requests run there, off the workers.
        let planner_thread = Arbiter::new().handle();
        children.push(ChildSpec::new("planner", {
            let (planner, thread) = (planner.clone(), planner_thread.clone());
            move |guard| {
                let addr = Planner::start_in_arbiter(&thread, move |_| Planner::new(guard));
                planner.set(addr.clone());
                ChildHandles::of(&addr)
            }
        }));
        if let Some(listener) = monitor_listener.map(Arc::new) {
            let state = MonitorState {
                fabric: describer.clone(),
                node: name.clone(),
                cluster_id: settings.cluster_id.clone(),
                url: url.clone(),
                metrics: metrics.clone(),
                supervisor: supervisor_slot.clone(),
                fault_injection: settings.fault_injection,
                queues: queue_board.clone(),
                workers: workers.clone(),
                cache: cache.clone(),
                functions: table.clone(),
                bridges: fabric.bridges.clone(),
            };
            children.push(ChildSpec::new("monitor", move |guard| {
                ChildHandles::of(&Monitor::new(listener.clone(), state.clone(), guard).start())
            }));
        }
        let (exit_tx, exit_rx) = watch::channel(NodeExit::Running);
        let policy = RestartPolicy {
            max_restarts: settings.max_restarts,
            window: Settings::seconds(settings.restart_window_s),
            ..RestartPolicy::default()
        };
        let supervisor = NodeSupervisor::new(name.clone(), policy, children, exit_tx, metrics.clone()).start();
        supervisor_slot.set(supervisor.clone());

        let shared = Arc::new(NodeShared {
            config: ConnectionConfig {
                node: name.clone(),
                cluster_id: settings.cluster_id.as_str().into(),
                request_timeout: Settings::seconds(settings.request_timeout_s),
                max_request_timeout: settings.max_request_timeout(),
                max_commands_per_request: settings.max_commands_per_request,
                limits: Limits {
                    max_reply_bytes: settings.max_reply_bytes as u64,
                    max_substitution_bytes: settings.max_substitution_bytes as u64,
                    max_value_depth: settings.max_value_depth,
                },
                planner_offload_commands: settings.planner_offload_commands,
                planner_offload_bytes: settings.planner_offload_bytes,
                max_in_flight: settings.max_in_flight_per_connection,
                max_frame_bytes: settings.max_frame_bytes,
                outbox_capacity: settings.outbox_capacity,
                max_outbound_bytes: settings.max_outbound_bytes_per_connection,
                heartbeat_interval: Settings::seconds(settings.heartbeat_interval_s),
                client_timeout: Settings::seconds(settings.client_timeout_s),
                max_connections: settings.max_connections,
                peer_reserve: settings.max_inbound_links,
            },
            table: table.clone(),
            pubsub,
            metrics: metrics.clone(),
            fabric: fabric.clone(),
            describer,
            planner,
            queue,
            workers,
            cache: cache.clone(),
            connections: Default::default(),
        });
        let cache_handle = cache;
        let server = connection::serve(ws_listener, shared, settings.workers)
            .map_err(|source| NodeError::Bind { addr: url.clone(), source })?;
        let server_handle = server.handle();
        actix_rt::spawn(server);
        info!(target: "mpreg::supervision", actor = "listener", reason = "boot", restarts = 0, node = %name,
            url = %url, "actor started");
        Ok(Node {
            name,
            url,
            monitoring_url,
            supervisor,
            registry,
            gossip,
            fabric,
            exit: exit_rx,
            server: server_handle,
            metrics,
            planner_thread,
            persistence,
            cache: cache_handle,
        })
    }
}

/// The cache's bounds from the settings.
fn cache_limits(settings: &Settings) -> CacheLimits {
    CacheLimits {
        l1: L1Limits { max_bytes: settings.cache_l1_max_bytes, max_entries: settings.cache_l1_max_entries },
        l2_max_entries: settings.cache_l2_max_entries,
        l2_max_bytes: settings.cache_l2_max_bytes,
        keys: KeyLimits { max_key_bytes: settings.cache_max_key_bytes, max_ttl_s: settings.cache_max_ttl_s },
        max_value_bytes: settings.cache_max_value_bytes,
        default_ttl_s: (settings.cache_default_ttl_s > 0.0).then_some(settings.cache_default_ttl_s),
        replication: settings.cache_replication,
        copy_ttl_s: settings.cache_copy_ttl_s,
        remote_timeout: Settings::seconds(settings.request_timeout_s),
    }
}

fn bind(host: &str, port: u16) -> Result<TcpListener, NodeError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr).map_err(|source| NodeError::Bind { addr, source })
}

/// `host:port` with the configured host (so `0.0.0.0` stays as given) and the real port.
fn display_addr(host: &str, bound: SocketAddr) -> String {
    if host.contains(':') {
        format!("[{host}]:{}", bound.port())
    } else {
        format!("{host}:{}", bound.port())
    }
}

/// A running node.
pub struct Node {
    name: String,
    url: String,
    monitoring_url: Option<String>,
    supervisor: Addr<NodeSupervisor>,
    registry: Slot<Registry>,
    gossip: Slot<FabricGossip>,
    fabric: Arc<FabricShared>,
    exit: watch::Receiver<NodeExit>,
    server: actix_web::dev::ServerHandle,
    metrics: Arc<Metrics>,
    planner_thread: ArbiterHandle,
    persistence: PersistenceHandle,
    cache: Arc<LocalCache>,
}

impl Node {
    /// Applies the federation policies and export list of `settings` (SIGHUP); `false`
    /// when this node has no bridges, an error (nothing changed) when the export list is
    /// invalid.
    pub fn reload_federation_policies(&self, settings: &Settings) -> Result<bool, String> {
        let Some(bridges) = &self.fabric.bridges else { return Ok(false) };
        let federation = &settings.federation;
        bridges.set_policies(federation.import.clone(), federation.export.clone(), federation.compiled_exports()?);
        Ok(true)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ws://host:port`, with the port really bound.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `http://host:port` of the monitoring endpoints, when enabled.
    pub fn monitoring_url(&self) -> Option<&str> {
        self.monitoring_url.as_deref()
    }

    /// Node-wide counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The node's store: reads, and durable commits through the group committer.
    pub fn persistence(&self) -> &PersistenceHandle {
        &self.persistence
    }

    /// The node's cache levels (L1 and L2), as the connections use them.
    pub fn cache(&self) -> &Arc<LocalCache> {
        &self.cache
    }

    /// Registers a function on the running node.
    pub async fn register(&self, spec: FunctionSpec) -> Result<(), RegistryError> {
        let outcome = self.registry.send(|| RegisterFunctions { specs: vec![spec.clone()] }).await;
        outcome.unwrap_or(Err((0, RegistryError::Unavailable))).map_err(|(_, e)| e)
    }

    /// Injects a panic into a supervised actor (`registry`, `pubsub`, `queue`, `cache`, `monitor`); whether
    /// such an actor was running.
    pub async fn crash_actor(&self, name: &str) -> bool {
        self.supervisor.send(CrashChild { name: name.to_owned() }).await.unwrap_or(false)
    }

    /// Resolves when the node ends, with the reason.
    pub async fn wait(&self) -> NodeExit {
        let mut exit = self.exit.clone();
        loop {
            let current = exit.borrow_and_update().clone();
            if current != NodeExit::Running {
                return current;
            }
            if exit.changed().await.is_err() {
                // The supervisor is gone without saying why: it crashed.
                return NodeExit::Escalated { actor: "supervisor".to_owned() };
            }
        }
    }

    /// Says GOODBYE to the cluster, stops the supervision tree (which closes the peer
    /// links), then stops the listener, letting client connections finish gracefully, and
    /// releases the store: when this returns, another node may open the same data dir.
    pub async fn shutdown(&self) {
        if let Some(gossip) = self.gossip.get() {
            let _ = gossip.send(SayGoodbye).await;
        }
        let _ = self.supervisor.send(Shutdown).await;
        self.fabric.writers_done(Duration::from_secs(1)).await;
        self.server.stop(true).await;
        self.planner_thread.stop();
        self.persistence.close().await;
    }

    /// Stops the listener after the supervision tree ended on its own (escalation), and
    /// releases the store.
    pub async fn stop_listener(&self) {
        self.server.stop(false).await;
        self.planner_thread.stop();
        self.persistence.close().await;
    }
}
