//! `mpreg client cache put|get|delete|invalidate|incr|cas|stats`.
//!
//! Output is for scripts: `get` prints the value as compact JSON (exit code 1 on a miss),
//! `put` the new version, `incr` the new value, `delete` `true`/`false`, `invalidate` the
//! number of keys removed, `cas` `{"swapped", "version"}`, `stats` a table (`--json`: the
//! raw figures).

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::{CacheOptions, Client};

/// Flags shared by every cache command.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Node URL.
    #[arg(long, env = "MPREG_URL")]
    pub url: String,
    /// Levels the operation may touch, comma-separated (`l1,l2,l3`, the default; `l4`
    /// lets a `get` that misses them read other clusters that export the namespace).
    #[arg(long, value_delimiter = ',')]
    pub levels: Vec<String>,
}

/// `mpreg client cache ...`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Store a JSON value; prints its version.
    Put {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// The value (JSON).
        value: String,
        /// Seconds to live (default: the node's cache_default_ttl_s).
        #[arg(long)]
        ttl: Option<f64>,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Print the value (compact JSON); exit code 1 on a miss.
    Get {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Remove a key everywhere; prints whether it was there.
    Delete {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Remove every key of a namespace (or those starting with `--prefix`).
    Invalidate {
        /// Namespace.
        namespace: String,
        /// Only keys starting with it.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Add to an integer atomically (absent: 0); prints the new value.
    Incr {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// The amount.
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        by: i64,
        /// Seconds to live (restarts the entry's clock).
        #[arg(long)]
        ttl: Option<f64>,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Store a value only if the entry has version V (0: only if absent).
    Cas {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// The value (JSON).
        value: String,
        /// The version the entry must have.
        #[arg(long)]
        version: u64,
        /// Seconds to live.
        #[arg(long)]
        ttl: Option<f64>,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// The node's cache figures per level.
    Stats {
        /// Raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: CacheArgs,
    },
}

impl CacheCommand {
    fn args(&self) -> &CacheArgs {
        match self {
            CacheCommand::Put { args, .. }
            | CacheCommand::Get { args, .. }
            | CacheCommand::Delete { args, .. }
            | CacheCommand::Invalidate { args, .. }
            | CacheCommand::Incr { args, .. }
            | CacheCommand::Cas { args, .. }
            | CacheCommand::Stats { args, .. } => args,
        }
    }
}

fn json_arg(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("the value must be JSON, got {text:?}"))
}

/// Runs one cache command against a node; the process exit code.
pub async fn run(command: CacheCommand) -> anyhow::Result<i32> {
    let client = Client::connect(&command.args().url).await?;
    let outcome = execute(&client, command).await;
    client.close().await;
    outcome
}

async fn execute(client: &Client, command: CacheCommand) -> anyhow::Result<i32> {
    let options = |ttl: Option<f64>, args: &CacheArgs| CacheOptions { ttl, levels: args.levels.clone() };
    match command {
        CacheCommand::Put { namespace, key, value, ttl, args } => {
            let version = client.cache_put(&namespace, &key, json_arg(&value)?, options(ttl, &args)).await?;
            println!("{version}");
        }
        CacheCommand::Get { namespace, key, args } => {
            match client.cache_get(&namespace, &key, options(None, &args)).await? {
                Some(hit) => println!("{}", serde_json::to_string(&hit.value)?),
                None => {
                    eprintln!("miss: {namespace}/{key}");
                    return Ok(1);
                }
            }
        }
        CacheCommand::Delete { namespace, key, args } => {
            println!("{}", client.cache_delete(&namespace, &key, options(None, &args)).await?);
        }
        CacheCommand::Invalidate { namespace, prefix, args } => {
            let removed = client.cache_invalidate(&namespace, prefix.as_deref(), options(None, &args)).await?;
            println!("{removed}");
        }
        CacheCommand::Incr { namespace, key, by, ttl, args } => {
            println!("{}", client.cache_incr(&namespace, &key, by, options(ttl, &args)).await?);
        }
        CacheCommand::Cas { namespace, key, value, version, ttl, args } => {
            let outcome = client.cache_cas(&namespace, &key, json_arg(&value)?, version, options(ttl, &args)).await?;
            println!("{}", serde_json::json!({"swapped": outcome.swapped, "version": outcome.version}));
        }
        CacheCommand::Stats { json, .. } => {
            let stats = client.cache_stats().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "{:<6} {:>10} {:>12} {:>10} {:>10} {:>10}",
                    "level", "entries", "bytes", "hits", "misses", "evictions"
                );
                for level in ["l1", "l2", "l3"] {
                    let s = &stats[level];
                    let show = |k: &str| s.get(k).map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{level:<6} {:>10} {:>12} {:>10} {:>10} {:>10}",
                        show("entries"),
                        show("bytes"),
                        show("hits"),
                        show("misses"),
                        show("evictions")
                    );
                }
            }
        }
    }
    Ok(0)
}
