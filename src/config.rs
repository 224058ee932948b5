//! Settings: defaults, a TOML file (`[mpreg]` table), CLI overrides, validation.
//!
//! Every key is listed in `config/node.toml` with a comment. Unknown keys are errors that
//! name the key, never silently dropped: a typo in a production config must not start a
//! node with the default it meant to override.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mpreg_actors::fabric::swim::SwimConfig;
use mpreg_actors::federation::policy::{ExportList, ExportPolicies, Exports, ImportPolicies};
use serde::{Deserialize, Serialize};

/// The longest duration a setting may give, in seconds (about 31 years).
const MAX_SECONDS: f64 = 1e9;
/// The shortest SWIM protocol period: 20 probes a second from every node.
const MIN_PROBE_INTERVAL_S: f64 = 0.05;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything a node can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Node name; empty means `host:port` once bound.
    pub name: String,
    /// Interface to listen on.
    pub host: String,
    /// Websocket port; 0 lets the OS choose (the bound URL is printed).
    pub port: u16,
    /// Cluster this node belongs to.
    pub cluster_id: String,
    /// Resources of this node (metadata; matching uses each function's own resources).
    pub resources: Vec<String>,
    /// Function packs or single functions to register: `demo`, `tpu_square`, ...
    pub functions: Vec<String>,
    /// Serve `/health`, `/metrics`, `/actors`.
    pub monitoring_enabled: bool,
    /// Monitoring port; 0 lets the OS choose.
    pub monitoring_port: u16,
    /// Where durable state lives (one sled database); created at start and checked for
    /// writability. None: memory only, nothing survives a restart.
    pub data_dir: Option<PathBuf>,
    /// Most durable batches that share one flush + fdatasync (group commit).
    pub persistence_max_batch: usize,
    /// Most queues one node hosts; a `create` beyond it is refused with 1006.
    pub queue_max_queues: usize,
    /// Bytes of messages all queues of one node hold together (payloads plus 256 bytes
    /// each); a `send` beyond it is refused with 1006 until messages are acknowledged.
    pub queue_max_bytes: u64,
    /// Longest long-poll `wait` of a queue `receive` (seconds); a longer one is capped.
    pub queue_max_wait_s: f64,
    /// Bytes of keys and values the cache's memory level (L1) holds at most.
    pub cache_l1_max_bytes: u64,
    /// Entries the L1 holds at most.
    pub cache_l1_max_entries: u64,
    /// Bytes of keys and records the cache's store level (L2, sled tree `cache`) holds at most.
    pub cache_l2_max_bytes: u64,
    /// Entries the L2 holds at most.
    pub cache_l2_max_entries: u64,
    /// Longest cache namespace + key, in bytes; beyond: 1002.
    pub cache_max_key_bytes: usize,
    /// Largest cache value (encoded JSON bytes); beyond: 1002.
    pub cache_max_value_bytes: usize,
    /// TTL (seconds) of a cache write that gives none; 0: no expiry.
    pub cache_default_ttl_s: f64,
    /// Longest TTL (seconds) a cache write may ask for; beyond: 1002.
    pub cache_max_ttl_s: f64,
    /// How often expired cache entries are swept and L2 writes synced (seconds).
    pub cache_sweep_interval_s: f64,
    /// Nodes that own each cache key (the first is the primary; the others are replicas).
    pub cache_replication: usize,
    /// Longest a node keeps a copy of a key it does not own, read from an owner (seconds).
    pub cache_copy_ttl_s: f64,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Whole-request timeout (seconds) unless a request sets `timeout`.
    pub request_timeout_s: f64,
    /// The longest `timeout` a request may ask for (seconds; at least `request_timeout_s`
    /// is always allowed); beyond it: 1002.
    pub max_request_timeout_s: f64,
    /// Commands in one request; beyond it: 1002.
    pub max_commands_per_request: usize,
    /// Estimated JSON bytes of one reply, intermediate results included; beyond it: 1002.
    pub max_reply_bytes: usize,
    /// Estimated JSON bytes that references may copy into arguments, per request; beyond
    /// it: 1002.
    pub max_substitution_bytes: usize,
    /// Nesting depth of a command's result; beyond it: 1002.
    pub max_value_depth: usize,
    /// Requests with more commands than this run on the Planner's thread.
    pub planner_offload_commands: usize,
    /// Frames larger than this, and runs that built more than this in place (bytes), run
    /// on the Planner's thread.
    pub planner_offload_bytes: usize,
    /// Requests in flight per connection before 1006.
    pub max_in_flight_per_connection: usize,
    /// Largest frame served normally (bytes).
    pub max_frame_bytes: usize,
    /// Frames queued per connection writer.
    pub outbox_capacity: usize,
    /// Bytes queued per connection writer: past it the connection stops reading its
    /// socket (replies wait) and pub/sub notifications to it are dropped (counted). Also
    /// each peer link's bound for best-effort frames (gossip, flooded publishes).
    pub max_outbound_bytes_per_connection: usize,
    /// Requests in flight on the whole node (all connections and peers) before 1006.
    pub max_in_flight: usize,
    /// Websockets accepted and open at once (clients, workers, links other nodes dialled);
    /// `max_inbound_links` more are kept for peers (a connection opened past this must
    /// speak as one within 2 s); an upgrade beyond both is answered HTTP 503.
    pub max_connections: usize,
    /// Websocket worker threads.
    pub workers: usize,
    /// Server ping interval (seconds).
    pub heartbeat_interval_s: f64,
    /// Close a client silent for this long (seconds).
    pub client_timeout_s: f64,
    /// Pub/sub backlog retention (seconds).
    pub pubsub_backlog_seconds: f64,
    /// Pub/sub backlog size (messages).
    pub pubsub_backlog_max: usize,
    /// Pub/sub backlog size (encoded bytes, all messages together).
    pub pubsub_backlog_max_bytes: usize,
    /// Largest pub/sub message kept in the backlog (encoded bytes); larger ones are
    /// delivered but not kept.
    pub pubsub_backlog_max_message_bytes: usize,
    /// Words in a pub/sub topic or pattern.
    pub pubsub_max_topic_words: usize,
    /// Bytes in a pub/sub topic, pattern or subscription id.
    pub pubsub_max_topic_bytes: usize,
    /// Patterns in one subscription.
    pub pubsub_max_patterns_per_subscription: usize,
    /// Subscriptions of one connection (pub/sub ones; queue ones separately, as many), and
    /// bindings of one queue.
    pub pubsub_max_subscriptions_per_connection: usize,
    /// Pattern words indexed on this node, all subscriptions together.
    pub pubsub_max_index_words: usize,
    /// Supervisor: restarts allowed per window before the node stops.
    pub max_restarts: usize,
    /// Supervisor: the window (seconds).
    pub restart_window_s: f64,
    /// Serve `POST /actors/{name}/panic` (chaos drills and tests only).
    pub fault_injection: bool,
    /// Peers to dial at start and keep dialling (`ws://host:port`).
    pub peers: Vec<String>,
    /// The URL other nodes should dial to reach this one; default `ws://host:port` with
    /// the port really bound (set it when `host` is `0.0.0.0` or behind NAT).
    pub advertise_url: Option<String>,
    /// Nodes learned through gossip are dialled while this node holds fewer links than
    /// this in all, configured, dialled and accepted ones together (0: only `peers`);
    /// other nodes are reached over next hops.
    pub peer_fanout: usize,
    /// Links other nodes dialled to this one; a further dialer is refused with the URLs of
    /// a few other members to dial instead (so a seed every node names is not linked to all).
    pub max_inbound_links: usize,
    /// Housekeeping round: dial attempts, catalog expiry (seconds).
    pub gossip_interval_s: f64,
    /// A silent peer is suspected (and not routed to) after at most about this long: SWIM's
    /// protocol period is `probe_interval_s`, at most half of this (seconds).
    pub suspect_after_s: f64,
    /// SWIM's protocol period, one probe of one member (capped at half of
    /// `suspect_after_s`); the probe goes indirect after half a period. A silent member is
    /// suspected by a first node about two periods after it stops (seconds).
    pub probe_interval_s: f64,
    /// ... and removed with its functions after about this long: a suspicion lasts
    /// `(remove_after_s - suspect_after_s) · log10(max(n, 10))` for n members, stretched
    /// by the node's local health (seconds).
    pub remove_after_s: f64,
    /// A node that said GOODBYE is not redialled for this long (seconds).
    pub departed_grace_s: f64,
    /// Entries and members restored from a snapshot that nobody confirms expire after this
    /// long; a member's entries otherwise stay while SWIM holds it a member.
    pub catalog_ttl_s: f64,
    /// The catalog and known peers are saved to the store this often when they changed,
    /// and at clean shutdown, and restored at start (seconds; 0: never saved nor restored).
    pub catalog_snapshot_interval_s: f64,
    /// Forwards a routed message may take before it is refused.
    pub hop_budget: u32,
    /// This node's credentials file (`mpreg keys issue`): with it, every peer link is
    /// authenticated; without it the node runs open (development, loopback only).
    pub credentials: Option<PathBuf>,
    /// Allow running open (no credentials) on a non-loopback `host`.
    pub insecure: bool,
    /// Calls served at once for one peer link, and served or relayed for one federation
    /// bridge; beyond it a call is refused and its client gets 1006 (overloaded).
    pub max_in_flight_per_link: usize,
    /// Function entries one node may advertise; a larger entry set is refused.
    pub max_catalog_entries_per_node: usize,
    /// Nodes not known before that one membership digest may teach this node.
    pub max_new_members_per_frame: usize,
    /// Peer dials started per gossip round.
    pub max_dials_per_round: usize,
    /// Items per page of a discovery answer (`cluster_map_v2`, `catalog_query`,
    /// `rpc_list`, `rpc_describe`, `summary_query`) when the request gives no `limit`.
    pub discovery_page_size: usize,
    /// The largest page a discovery request may ask for; a larger `limit` is cut to it
    /// (counted in mpreg_limit_exceeded_total{limit="discovery_max_page_size"}).
    pub discovery_max_page_size: usize,
    /// Catalog entries (added or removed) the `catalog_watch` change log keeps; a client
    /// asking for older changes is told to query the catalog again.
    pub discovery_change_log_items: usize,
    /// Worker processes registered at once (a further `worker-register`: 1006).
    pub max_workers: usize,
    /// Functions one worker may register (1002 beyond).
    pub max_functions_per_worker: usize,
    /// Calls one worker runs at once when it names no `max_concurrency`, and the most it
    /// may name.
    pub worker_max_concurrency: usize,
    /// How often a worker is asked to send a frame (seconds).
    pub worker_heartbeat_s: f64,
    /// A worker silent this long (seconds) is disconnected and its calls retried or lost.
    pub worker_timeout_s: f64,
    /// A file holding the token workers must present; required for workers when
    /// `credentials` is set (a node with credentials and no token accepts no worker).
    pub worker_token_file: Option<PathBuf>,
    /// Bridges to other clusters (`[mpreg.federation]`); none unless `allowed_clusters`
    /// names some.
    pub federation: FederationSettings,
}

/// `[mpreg.federation]`: which clusters this node bridges to, the authority pinned for
/// each, this cluster's route key, announcement timing and route policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSettings {
    /// Nodes of other clusters to keep a bridge to (`ws://host:port`; `--federation-peer`).
    pub peers: Vec<String>,
    /// Clusters a bridge may be made with (either side dialling); any other is refused.
    pub allowed_clusters: Vec<String>,
    /// The authority public key (hex, the other cluster's `cluster.pub`) pinned for each
    /// allowed cluster: its nodes' certificates and route keys must chain to it.
    pub trust: std::collections::BTreeMap<String, String>,
    /// The directory holding this cluster's route key (`route.key`, made by `mpreg keys
    /// rotate DIR`); it must chain to this node's own authority.
    pub route_key_dir: Option<PathBuf>,
    /// Announcements are re-sent this often even when nothing changed (seconds).
    pub announce_interval_s: f64,
    /// Announcements stay valid this long without a refresh (seconds).
    pub route_ttl_s: f64,
    /// Clusters a `target_cluster` call may cross.
    pub hop_budget: u32,
    /// Import policies: `default` and per neighbour cluster (`neighbors.NAME`).
    pub import: ImportPolicies,
    /// Export policies: `global` and per neighbour cluster.
    pub export: ExportPolicies,
    /// What this cluster lets other clusters use (`exports.functions`: the functions a
    /// call from another cluster may run); nothing unless listed.
    pub exports: ExportList,
}

impl FederationSettings {
    /// The export list compiled for matching, or why it is invalid.
    pub fn compiled_exports(&self) -> Result<Exports, String> {
        Exports::new(&self.exports)
    }
}

impl Default for FederationSettings {
    fn default() -> Self {
        FederationSettings {
            peers: Vec::new(),
            allowed_clusters: Vec::new(),
            trust: std::collections::BTreeMap::new(),
            route_key_dir: None,
            announce_interval_s: 5.0,
            route_ttl_s: 30.0,
            hop_budget: 8,
            import: ImportPolicies::default(),
            export: ExportPolicies::default(),
            exports: ExportList::default(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: String::new(),
            host: "127.0.0.1".to_owned(),
            port: 6666,
            cluster_id: "default-cluster".to_owned(),
            resources: Vec::new(),
            functions: Vec::new(),
            monitoring_enabled: true,
            monitoring_port: 0,
            data_dir: None,
            persistence_max_batch: 256,
            queue_max_queues: 1000,
            queue_max_bytes: 256 * 1024 * 1024,
            queue_max_wait_s: 20.0,
            cache_l1_max_bytes: 64 * 1024 * 1024,
            cache_l1_max_entries: 100_000,
            cache_l2_max_bytes: 256 * 1024 * 1024,
            cache_l2_max_entries: 1_000_000,
            cache_max_key_bytes: 1024,
            cache_max_value_bytes: 1024 * 1024,
            cache_default_ttl_s: 0.0,
            cache_max_ttl_s: 30.0 * 86_400.0,
            cache_sweep_interval_s: 1.0,
            cache_replication: 2,
            cache_copy_ttl_s: 10.0,
            log_format: LogFormat::Text,
            request_timeout_s: 30.0,
            max_request_timeout_s: 300.0,
            max_commands_per_request: 10_000,
            max_reply_bytes: 16 * 1024 * 1024,
            max_substitution_bytes: 16 * 1024 * 1024,
            max_value_depth: 128,
            planner_offload_commands: 16,
            planner_offload_bytes: 256 * 1024,
            max_in_flight_per_connection: 1024,
            max_frame_bytes: 16 * 1024 * 1024,
            outbox_capacity: 4096,
            max_outbound_bytes_per_connection: 16 * 1024 * 1024,
            max_in_flight: 65_536,
            max_connections: 10_000,
            workers: 2,
            heartbeat_interval_s: 20.0,
            client_timeout_s: 60.0,
            pubsub_backlog_seconds: 300.0,
            pubsub_backlog_max: 10_000,
            pubsub_backlog_max_bytes: 64 * 1024 * 1024,
            pubsub_backlog_max_message_bytes: 1024 * 1024,
            pubsub_max_topic_words: 32,
            pubsub_max_topic_bytes: 256,
            pubsub_max_patterns_per_subscription: 64,
            pubsub_max_subscriptions_per_connection: 1024,
            pubsub_max_index_words: 262_144,
            max_restarts: 5,
            restart_window_s: 60.0,
            fault_injection: false,
            peers: Vec::new(),
            advertise_url: None,
            peer_fanout: 8,
            max_inbound_links: 64,
            gossip_interval_s: 0.25,
            suspect_after_s: 2.0,
            probe_interval_s: 1.0,
            remove_after_s: 6.0,
            departed_grace_s: 5.0,
            catalog_ttl_s: 60.0,
            catalog_snapshot_interval_s: 30.0,
            hop_budget: 5,
            credentials: None,
            insecure: false,
            max_in_flight_per_link: 4096,
            max_catalog_entries_per_node: 10_000,
            max_new_members_per_frame: 16,
            max_dials_per_round: 4,
            discovery_page_size: 200,
            discovery_max_page_size: 2000,
            discovery_change_log_items: 10_000,
            max_workers: 64,
            max_functions_per_worker: 64,
            worker_max_concurrency: 64,
            worker_heartbeat_s: 5.0,
            worker_timeout_s: 15.0,
            worker_token_file: None,
            federation: FederationSettings::default(),
        }
    }
}

/// Whether `host` only reaches this machine (`127.0.0.0/8`, `::1`, `localhost`).
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// A settings file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    mpreg: Settings,
}

impl Settings {
    /// Reads a TOML file with an `[mpreg]` table.
    pub fn from_toml_file(path: &Path) -> Result<Settings, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Settings::from_toml_str(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
    }

    /// Parses TOML text with an `[mpreg]` table.
    pub fn from_toml_str(text: &str) -> Result<Settings, String> {
        toml::from_str::<SettingsFile>(text).map(|f| f.mpreg).map_err(|e| e.message().to_owned())
    }

    /// Checks ranges; run after all overrides are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Bounded above too: a duration of 1e300 seconds does not exist.
        let positive = |key: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 && value <= MAX_SECONDS {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: format!("must be a positive number of seconds up to {MAX_SECONDS}, got {value}"),
                })
            }
        };
        positive("request_timeout_s", self.request_timeout_s)?;
        positive("max_request_timeout_s", self.max_request_timeout_s)?;
        positive("queue_max_wait_s", self.queue_max_wait_s)?;
        positive("cache_max_ttl_s", self.cache_max_ttl_s)?;
        positive("cache_sweep_interval_s", self.cache_sweep_interval_s)?;
        positive("cache_copy_ttl_s", self.cache_copy_ttl_s)?;
        if !(self.cache_default_ttl_s.is_finite() && (0.0..=self.cache_max_ttl_s).contains(&self.cache_default_ttl_s)) {
            return Err(ConfigError::Invalid {
                key: "cache_default_ttl_s",
                message: "must be >= 0 (0: no expiry) and at most cache_max_ttl_s".into(),
            });
        }
        for (key, value) in [
            ("queue_max_bytes", self.queue_max_bytes),
            ("cache_l1_max_bytes", self.cache_l1_max_bytes),
            ("cache_l1_max_entries", self.cache_l1_max_entries),
            ("cache_l2_max_bytes", self.cache_l2_max_bytes),
            ("cache_l2_max_entries", self.cache_l2_max_entries),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        positive("heartbeat_interval_s", self.heartbeat_interval_s)?;
        positive("client_timeout_s", self.client_timeout_s)?;
        positive("restart_window_s", self.restart_window_s)?;
        positive("gossip_interval_s", self.gossip_interval_s)?;
        positive("suspect_after_s", self.suspect_after_s)?;
        positive("probe_interval_s", self.probe_interval_s)?;
        if self.probe_interval_s < MIN_PROBE_INTERVAL_S {
            return Err(ConfigError::Invalid {
                key: "probe_interval_s",
                message: format!("must be at least {MIN_PROBE_INTERVAL_S} (a probe a period, each node)"),
            });
        }
        positive("remove_after_s", self.remove_after_s)?;
        positive("catalog_ttl_s", self.catalog_ttl_s)?;
        positive("worker_heartbeat_s", self.worker_heartbeat_s)?;
        positive("worker_timeout_s", self.worker_timeout_s)?;
        if self.worker_timeout_s <= self.worker_heartbeat_s {
            return Err(ConfigError::Invalid {
                key: "worker_timeout_s",
                message: "must exceed worker_heartbeat_s, or healthy workers would be disconnected".into(),
            });
        }
        if self.suspect_after_s <= self.gossip_interval_s * 2.0 {
            return Err(ConfigError::Invalid {
                key: "suspect_after_s",
                message: "must exceed two gossip intervals, or healthy peers would be suspected".into(),
            });
        }
        if self.remove_after_s < self.suspect_after_s {
            return Err(ConfigError::Invalid {
                key: "remove_after_s",
                message: "must be at least suspect_after_s".into(),
            });
        }
        if !(self.catalog_snapshot_interval_s.is_finite()
            && (0.0..=MAX_SECONDS).contains(&self.catalog_snapshot_interval_s))
        {
            return Err(ConfigError::Invalid {
                key: "catalog_snapshot_interval_s",
                message: "must be >= 0 (0: no snapshots)".into(),
            });
        }
        if !(self.departed_grace_s.is_finite() && self.departed_grace_s >= 0.0) {
            return Err(ConfigError::Invalid { key: "departed_grace_s", message: "must be >= 0".into() });
        }
        if self.hop_budget == 0 {
            return Err(ConfigError::Invalid { key: "hop_budget", message: "must be at least 1".into() });
        }
        if !(self.pubsub_backlog_seconds.is_finite() && self.pubsub_backlog_seconds >= 0.0) {
            return Err(ConfigError::Invalid { key: "pubsub_backlog_seconds", message: "must be >= 0".into() });
        }
        let at_least_one = [
            ("max_in_flight_per_connection", self.max_in_flight_per_connection),
            ("max_commands_per_request", self.max_commands_per_request),
            ("max_reply_bytes", self.max_reply_bytes),
            ("max_substitution_bytes", self.max_substitution_bytes),
            ("max_value_depth", self.max_value_depth),
            ("max_frame_bytes", self.max_frame_bytes),
            ("outbox_capacity", self.outbox_capacity),
            ("max_outbound_bytes_per_connection", self.max_outbound_bytes_per_connection),
            ("max_in_flight", self.max_in_flight),
            ("max_connections", self.max_connections),
            ("workers", self.workers),
            ("pubsub_max_topic_words", self.pubsub_max_topic_words),
            ("pubsub_max_topic_bytes", self.pubsub_max_topic_bytes),
            ("max_in_flight_per_link", self.max_in_flight_per_link),
            ("max_catalog_entries_per_node", self.max_catalog_entries_per_node),
            ("max_new_members_per_frame", self.max_new_members_per_frame),
            ("max_dials_per_round", self.max_dials_per_round),
            ("max_inbound_links", self.max_inbound_links),
            ("discovery_page_size", self.discovery_page_size),
            ("discovery_max_page_size", self.discovery_max_page_size),
            ("discovery_change_log_items", self.discovery_change_log_items),
            ("persistence_max_batch", self.persistence_max_batch),
            ("queue_max_queues", self.queue_max_queues),
            ("max_workers", self.max_workers),
            ("max_functions_per_worker", self.max_functions_per_worker),
            ("worker_max_concurrency", self.worker_max_concurrency),
            ("cache_max_key_bytes", self.cache_max_key_bytes),
            ("cache_max_value_bytes", self.cache_max_value_bytes),
            ("cache_replication", self.cache_replication),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        if self.discovery_page_size > self.discovery_max_page_size {
            return Err(ConfigError::Invalid {
                key: "discovery_page_size",
                message: format!("must not exceed discovery_max_page_size ({})", self.discovery_max_page_size),
            });
        }
        if self.cluster_id.is_empty() {
            return Err(ConfigError::Invalid { key: "cluster_id", message: "must not be empty".into() });
        }
        let federation = &self.federation;
        positive("federation.announce_interval_s", federation.announce_interval_s)?;
        positive("federation.route_ttl_s", federation.route_ttl_s)?;
        if !federation.allowed_clusters.is_empty() {
            let invalid = |message: String| ConfigError::Invalid { key: "federation", message };
            if self.credentials.is_none() || federation.route_key_dir.is_none() {
                return Err(invalid(
                    "bridges need this node's credentials and a route_key_dir (see `mpreg keys rotate`)".into(),
                ));
            }
            if let Some(missing) = federation.allowed_clusters.iter().find(|c| !federation.trust.contains_key(*c)) {
                return Err(invalid(format!("allowed cluster {missing} has no pinned authority in trust")));
            }
            if federation.allowed_clusters.contains(&self.cluster_id) {
                return Err(invalid(format!("allowed_clusters names this node's own cluster {}", self.cluster_id)));
            }
            federation.compiled_exports().map_err(invalid)?;
        } else if !federation.peers.is_empty() {
            return Err(ConfigError::Invalid {
                key: "federation",
                message: "peers given but allowed_clusters is empty: every bridge would be refused".into(),
            });
        }
        if self.credentials.is_none() && !self.insecure && !is_loopback(&self.host) {
            return Err(ConfigError::Invalid {
                key: "insecure",
                message: format!(
                    "host {} is not a loopback address and no credentials are set: peer links would be \
                     unauthenticated on the network. Give --credentials FILE (see `mpreg keys`), or \
                     --insecure (settings key insecure = true) to run open anyway",
                    self.host
                ),
            });
        }
        Ok(())
    }

    /// The longest `timeout` a request may set: `max_request_timeout_s`, or the node's own
    /// `request_timeout_s` if that is longer (a node never refuses its own default).
    pub fn max_request_timeout(&self) -> Duration {
        Settings::seconds(self.max_request_timeout_s.max(self.request_timeout_s))
    }

    /// Seconds as a `Duration` (validated values only).
    pub fn seconds(value: f64) -> Duration {
        Duration::from_secs_f64(value)
    }

    /// SWIM's timing from `probe_interval_s`, `suspect_after_s` and `remove_after_s` (see
    /// their docs); the other bounds are SWIM's defaults (3 indirect probes, 16 rumors a
    /// message, a push-pull every 30 periods, local health up to 8).
    pub fn swim_config(&self) -> SwimConfig {
        let period = self.probe_interval_s.min(self.suspect_after_s / 2.0);
        SwimConfig {
            period,
            probe_timeout: period / 2.0,
            suspicion_mult: (self.remove_after_s - self.suspect_after_s).max(period) / period,
            ..SwimConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::from_toml_str("[mpreg]\nport = 1\nprot = 2\n").unwrap_err();
        assert!(err.contains("unknown field `prot`"), "{err}");
        let err = Settings::from_toml_str("[mpreg]\n[other]\n").unwrap_err();
        assert!(err.contains("unknown field `other`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Settings::from_toml_str("[mpreg]\nport = \"x\"\n").unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/node.toml");
        let settings = Settings::from_toml_file(&path).unwrap();
        settings.validate().unwrap();
    }

    #[test]
    fn federation_needs_credentials_a_route_key_and_a_pin_per_allowed_cluster() {
        let text = r#"
            [mpreg]
            cluster_id = "a"
            credentials = "a.cred"
            [mpreg.federation]
            allowed_clusters = ["b"]
            route_key_dir = "keys"
            [mpreg.federation.trust]
            b = "00"
            [mpreg.federation.import.neighbors.b]
            allowed_destinations = ["b"]
        "#;
        let settings = Settings::from_toml_str(text).unwrap();
        assert!(settings.validate().is_ok());
        let policy = settings.federation.import.for_neighbor("b");
        assert_eq!(policy.allowed_destinations, Some(["b".to_string()].into()));
        let invalid = |s: Settings| s.validate().unwrap_err().to_string();
        let mut unpinned = settings.clone();
        unpinned.federation.allowed_clusters.push("c".into());
        assert!(invalid(unpinned).contains("allowed cluster c has no pinned authority"));
        let mut no_key = settings.clone();
        no_key.federation.route_key_dir = None;
        assert!(invalid(no_key).contains("route_key_dir"));
        let mut own = settings.clone();
        own.federation.allowed_clusters.push("a".into());
        own.federation.trust.insert("a".into(), "00".into());
        assert!(invalid(own).contains("own cluster"));
        let mut bad_exports = settings.clone();
        bad_exports.federation.exports.functions.push(String::new());
        assert!(invalid(bad_exports).contains("exports.functions"));
        let mut peers_only = Settings::default();
        peers_only.federation.peers.push("ws://127.0.0.1:1".into());
        assert!(invalid(peers_only).contains("allowed_clusters is empty"));
    }

    #[test]
    fn open_mode_stays_on_loopback_unless_insecure() {
        for host in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"] {
            assert!(Settings { host: host.into(), ..Settings::default() }.validate().is_ok(), "{host}");
        }
        for host in ["0.0.0.0", "192.168.1.4", "node-a", "::"] {
            let open = Settings { host: host.into(), ..Settings::default() };
            let err = open.validate().unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { key: "insecure", .. }), "{host}: {err}");
            assert!(err.to_string().contains("--insecure"), "{err}");
            assert!(Settings { insecure: true, ..open.clone() }.validate().is_ok());
            assert!(Settings { credentials: Some("x.cred".into()), ..open }.validate().is_ok());
        }
    }

    #[test]
    fn trust_bounds_must_be_positive() {
        for key in [
            "max_in_flight_per_link",
            "max_catalog_entries_per_node",
            "max_new_members_per_frame",
            "max_dials_per_round",
        ] {
            let mut settings = Settings::default();
            match key {
                "max_in_flight_per_link" => settings.max_in_flight_per_link = 0,
                "max_catalog_entries_per_node" => settings.max_catalog_entries_per_node = 0,
                "max_new_members_per_frame" => settings.max_new_members_per_frame = 0,
                _ => settings.max_dials_per_round = 0,
            }
            assert!(matches!(settings.validate(), Err(ConfigError::Invalid { key: k, .. }) if k == key), "{key}");
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let settings = Settings { request_timeout_s: 0.0, ..Settings::default() };
        assert!(matches!(settings.validate(), Err(ConfigError::Invalid { key: "request_timeout_s", .. })));
        let settings = Settings { request_timeout_s: 1e300, ..Settings::default() };
        assert!(matches!(settings.validate(), Err(ConfigError::Invalid { key: "request_timeout_s", .. })));
        let settings = Settings { max_commands_per_request: 0, ..Settings::default() };
        assert!(matches!(settings.validate(), Err(ConfigError::Invalid { key: "max_commands_per_request", .. })));
        // A node's own default timeout is always allowed to requests.
        let settings = Settings { request_timeout_s: 600.0, ..Settings::default() };
        settings.validate().unwrap();
        assert_eq!(settings.max_request_timeout(), Duration::from_secs(600));
    }

    #[test]
    fn the_probe_interval_is_bounded_and_capped_by_suspect_after() {
        for hostile in [0.0, 0.001, -1.0, f64::NAN, 1e300] {
            let settings = Settings { probe_interval_s: hostile, ..Settings::default() };
            assert!(
                matches!(settings.validate(), Err(ConfigError::Invalid { key: "probe_interval_s", .. })),
                "{hostile}"
            );
        }
        let swim = Settings::default().swim_config();
        assert_eq!((swim.period, swim.probe_timeout), (1.0, 0.5));
        // Suspected within `suspect_after_s` however long the interval asked for.
        let settings = Settings { suspect_after_s: 1.0, probe_interval_s: 5.0, ..Settings::default() };
        settings.validate().unwrap();
        assert_eq!(settings.swim_config().period, 0.5);
    }
}
