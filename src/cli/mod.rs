//! The `mpreg` command line: `server`, `client`, `bench`, `demo`.
//!
//! User-facing output (URLs, results, tables) goes to stdout; logs go to stderr.

/// Progress of a long bench on stderr (`eprint!` arguments), only when stderr is a
/// terminal: redirected output gets the results and the warnings, not the progress.
macro_rules! progress {
    ($($arg:tt)*) => {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!($($arg)*);
        }
    };
}

mod bench;
mod bench_cache;
mod bench_cluster;
mod bench_federation;
mod bench_membership;
mod bench_persistence;
mod bench_plot;
mod bench_queue;
mod cache;
mod client;
mod demo;
mod keys;
mod queue;
mod server;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

/// Exit code when the supervisor escalated (too many restarts).
pub const EXIT_ESCALATED: i32 = 70;
/// Exit code at start: the data dir holds files that are not a readable store (EX_DATAERR).
pub const EXIT_DATA_CORRUPT: i32 = 65;
/// Exit code at start: the data dir cannot be created or written (EX_CANTCREAT).
pub const EXIT_DATA_UNWRITABLE: i32 = 73;
/// Exit code at start: another I/O error on the data dir (EX_IOERR).
pub const EXIT_DATA_IO: i32 = 74;
/// Exit code at start: the data dir is locked by another running process (EX_TEMPFAIL).
pub const EXIT_DATA_LOCKED: i32 = 75;

/// MPREG: dependency-resolving RPC over websockets, on supervised actors.
#[derive(Debug, Parser)]
#[command(name = "mpreg", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Talk to a node.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Measure.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Make a cluster authority and node credentials (authenticated peer links).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Start a 3-node cluster in this process and walk through what MPREG does, checking
    /// every result (the same code as `cargo run --example quick_demo`).
    Demo,
}

/// `mpreg server ...`
// Parsed once per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Start a node from flags (defaults for everything else).
    Start(StartArgs),
    /// Start a node from a TOML file with an `[mpreg]` table.
    StartConfig {
        /// The settings file.
        file: PathBuf,
        /// Log format (overrides the file's `log_format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
}

/// Flags of `mpreg server start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// A settings file (TOML, `[mpreg]` table) read first; the flags below override it
    /// (lists such as `--peer` add to it). How one file serves every pod of a StatefulSet.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface to listen on.
    #[arg(long)]
    pub host: Option<String>,
    /// Websocket port (0: any free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Node name (default host:port).
    #[arg(long)]
    pub name: Option<String>,
    /// Cluster id.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// A resource of this node (repeatable).
    #[arg(long = "resource")]
    pub resources: Vec<String>,
    /// Function packs or names, comma-separated (`demo`, `tpu_square`).
    #[arg(long, value_delimiter = ',')]
    pub functions: Vec<String>,
    /// Monitoring HTTP port (0: any free port).
    #[arg(long)]
    pub monitoring_port: Option<u16>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Whole-request timeout in seconds.
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// Serve `POST /actors/{name}/panic` (chaos drills and tests only).
    #[arg(long)]
    pub fault_injection: bool,
    /// A peer to join (`ws://host:port`, repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// The URL other nodes should dial to reach this one.
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// A node of another cluster to keep a federation bridge to (repeatable; the cluster
    /// must be allowed and pinned in `[mpreg.federation]`).
    #[arg(long = "federation-peer")]
    pub federation_peers: Vec<String>,
    /// This node's credentials file (`mpreg keys issue`): authenticate every peer link.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Run without credentials on a non-loopback host anyway (development only).
    #[arg(long)]
    pub insecure: bool,
}

/// `mpreg keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a cluster authority: DIR/cluster.key (secret, mode 0600) and DIR/cluster.pub.
    /// Prints the public key. Keep cluster.key off the nodes.
    Init {
        /// Directory for the authority (created if missing).
        dir: PathBuf,
    },
    /// Issue DIR/NAME.cred (mode 0600): a fresh node key pair and a certificate signed by
    /// the authority in DIR. Prints the file's path. Start the node with
    /// `--credentials DIR/NAME.cred --name NAME --cluster-id C`.
    Issue {
        /// Directory holding cluster.key.
        dir: PathBuf,
        /// The node's name (as in `--name`).
        name: String,
        /// The node's cluster (as in `--cluster-id`).
        #[arg(long, default_value = "default-cluster")]
        cluster_id: String,
        /// Days until the certificate expires.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Make a new route key for federation: DIR/route.key (mode 0600, copy it to every node
    /// of the cluster). The first key is certified by the authority in DIR/cluster.key;
    /// each later one is signed by the key before it, which keeps verifying for
    /// --overlap-s seconds. Prints the generation and the new key id.
    Rotate {
        /// Directory holding cluster.pub (and cluster.key for the first key).
        dir: PathBuf,
        /// The cluster the route key signs for.
        #[arg(long, default_value = "default-cluster")]
        cluster_id: String,
        /// Seconds the previous key still verifies after the rotation.
        #[arg(long, default_value_t = 300)]
        overlap_s: u64,
    },
}

/// `mpreg client ...`
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Call one function: `mpreg client call add '[1,2]' --locs cpu --url ws://...`.
    Call {
        /// Function name.
        fun: String,
        /// Positional arguments as a JSON array (a single non-array value is one argument).
        #[arg(default_value = "[]")]
        args: String,
        /// Keyword arguments as a JSON object (`'{"factor": 7}'`), bound to the function's
        /// parameter names.
        #[arg(long)]
        kwargs: Option<String>,
        /// Required resources, comma-separated.
        #[arg(long, value_delimiter = ',')]
        locs: Vec<String>,
        /// Function id to match.
        #[arg(long)]
        function_id: Option<String>,
        /// Version constraint (`>=1.0,<2`).
        #[arg(long)]
        version: Option<String>,
        /// Whole-request timeout in seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// Serve the result from the node's cache, and cache it for this many seconds.
        #[arg(long)]
        cache_ttl: Option<f64>,
        /// Run it in this cluster (another one: over the federation bridges).
        #[arg(long)]
        target_cluster: Option<String>,
        /// Node URL.
        #[arg(long, env = "MPREG_URL")]
        url: String,
    },
    /// Run a DAG from a JSON file: a list of commands, or an object with `cmds`.
    Request {
        /// The file (`-` for stdin).
        file: PathBuf,
        /// Node URL.
        #[arg(long, env = "MPREG_URL")]
        url: String,
    },
    /// Durable queues: create, send, receive, ack, nack, stats, list, dlq, redrive, bind.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// The cache: put, get, delete, invalidate, incr, cas, stats.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Show the cluster as the node at URL sees it.
    Status {
        /// Node URL.
        #[arg(long, env = "MPREG_URL")]
        url: String,
        /// Print the raw JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Federation routes as a node with bridges sees them.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Exit 0 when `GET URL` answers 200 (container health checks).
    Health {
        /// e.g. `http://127.0.0.1:9100/health`.
        #[arg(long)]
        url: String,
    },
}

/// `mpreg client route ...`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Why calls to CLUSTER go where they go: every candidate route with its path,
    /// metrics, score, tie-breakers and why it was filtered, and the one selected
    /// (`GET /routes?destination=CLUSTER` on the node's monitoring port).
    Explain {
        /// The destination cluster.
        cluster: String,
        /// Clusters to route around (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        avoid: Vec<String>,
        /// The node's monitoring URL (`http://host:port`, printed as MPREG_MONITORING_URL).
        #[arg(long)]
        url: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `mpreg bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// RPC throughput and latency against a raw websocket floor.
    Rpc(bench::ScenarioBenchArgs),
    /// Mesh formation, registration propagation, failure detection and memory of N node
    /// processes.
    Cluster(bench_cluster::ClusterBenchArgs),
    /// Durable writes: insert + flush + fdatasync one at a time, and group-committed.
    Persistence(bench_persistence::PersistenceBenchArgs),
    /// Durable queue throughput (group commit) against sled's one-at-a-time flush.
    Queue(bench_queue::QueueBenchArgs),
    /// The SWIM membership protocol in a simulated cluster: periods to spread a join and
    /// a failure, messages per member.
    Membership(bench_membership::MembershipBenchArgs),
    /// Cache get/put (local and remote) next to RPC echo of the same run.
    Cache(bench::ScenarioBenchArgs),
    /// Signed path-vector routes between N simulated clusters in a line: rounds and time
    /// until every cluster routes to every other.
    Federation(bench_federation::FederationBenchArgs),
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Server(ServerCommand::Start(args)) => server::start(args),
        Command::Server(ServerCommand::StartConfig { file, log_format }) => server::start_config(&file, log_format),
        Command::Client(command) => client::run(command),
        Command::Bench(BenchCommand::Rpc(args)) => bench::rpc(args),
        Command::Bench(BenchCommand::Cluster(args)) => bench_cluster::cluster(args),
        Command::Bench(BenchCommand::Persistence(args)) => bench_persistence::run(args),
        Command::Bench(BenchCommand::Queue(args)) => bench_queue::queue(args),
        Command::Bench(BenchCommand::Membership(args)) => bench_membership::run(args),
        Command::Bench(BenchCommand::Federation(args)) => bench_federation::run(args),
        Command::Bench(BenchCommand::Cache(args)) => bench_cache::cache(args),
        Command::Demo => demo::run(),
        Command::Keys(KeysCommand::Init { dir }) => keys::init(&dir),
        Command::Keys(KeysCommand::Issue { dir, name, cluster_id, valid_days }) => {
            keys::issue(&dir, &name, &cluster_id, valid_days)
        }
        Command::Keys(KeysCommand::Rotate { dir, cluster_id, overlap_s }) => keys::rotate(&dir, &cluster_id, overlap_s),
    }
}
