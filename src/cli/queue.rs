//! `mpreg client queue create|send|receive|ack|nack|stats|list|dlq|redrive|bind`.
//!
//! Output is for scripts: `send` prints the message id alone on a line (once the node
//! acknowledged it, i.e. once durable for a durable queue), `receive` one JSON object per
//! line (`id`, `payload`, `receive_count`, and `reason` from a dead-letter queue), the
//! others JSON.
//!
//! Consumers: a lease belongs to a consumer id, and `ack` from another process must name
//! the consumer that received. `receive`, `ack` and `nack` therefore use the consumer
//! `cli` unless `--consumer` says otherwise, so `receive` then `ack` in two invocations
//! just works; two CLI workers sharing a queue should each pass their own `--consumer`.

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Client, QueueSendOptions};

/// The consumer id the CLI uses unless `--consumer` is given.
pub const DEFAULT_CONSUMER: &str = "cli";

/// Node URL flag shared by every queue command.
#[derive(Debug, Args)]
pub struct UrlArg {
    /// Node URL.
    #[arg(long, env = "MPREG_URL")]
    pub url: String,
}

/// `mpreg client queue ...`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a queue (idempotent with the same settings).
    Create {
        /// Queue name.
        name: String,
        /// Keep it in memory only (not persisted).
        #[arg(long)]
        in_memory: bool,
        /// Deliveries without an ack before a message is dead-lettered.
        #[arg(long)]
        max_receives: Option<u32>,
        /// Visibility timeout in seconds.
        #[arg(long)]
        visibility: Option<f64>,
        /// Most messages held (dead letters included).
        #[arg(long)]
        max_messages: Option<usize>,
        /// Largest payload in bytes.
        #[arg(long)]
        max_message_bytes: Option<usize>,
        /// Message TTL in seconds.
        #[arg(long)]
        ttl: Option<f64>,
        /// Dedup window in seconds (0: off).
        #[arg(long)]
        dedup_window: Option<f64>,
        /// Seconds a quorum message waits for enough subscribers.
        #[arg(long)]
        quorum_wait: Option<f64>,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Send a message; prints its id once the node acknowledged it.
    Send {
        /// Queue name.
        name: String,
        /// The payload (JSON).
        payload: String,
        /// at_least_once (default), fire_and_forget, broadcast, quorum:N.
        #[arg(long)]
        guarantee: Option<String>,
        /// Priority (higher first).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i64>,
        /// Delay in seconds.
        #[arg(long)]
        delay: Option<f64>,
        /// Dedup id.
        #[arg(long)]
        dedup_id: Option<String>,
        /// The cluster whose queue it is (over federation bridges; default: this one's).
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Receive messages: one JSON object per line.
    Receive {
        /// Queue name.
        name: String,
        /// Most messages.
        #[arg(long, default_value_t = 1)]
        max: usize,
        /// Long-poll: seconds to wait for the first message.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
        /// Consumer id (default `cli`).
        #[arg(long, default_value = DEFAULT_CONSUMER)]
        consumer: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Ack messages (by id) received by the same consumer.
    Ack {
        /// Queue name.
        name: String,
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Consumer id (default `cli`).
        #[arg(long, default_value = DEFAULT_CONSUMER)]
        consumer: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Nack messages: visible again (after `--delay`).
    Nack {
        /// Queue name.
        name: String,
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Seconds before they are visible again.
        #[arg(long, default_value_t = 0.0)]
        delay: f64,
        /// Consumer id (default `cli`).
        #[arg(long, default_value = DEFAULT_CONSUMER)]
        consumer: String,
        #[command(flatten)]
        url: UrlArg,
    },
    /// A queue's counters and config.
    Stats {
        /// Queue name.
        name: String,
        /// The cluster whose queue it is (over federation bridges; default: this one's).
        #[arg(long)]
        cluster: Option<String>,
        /// Raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Every queue.
    List {
        #[command(flatten)]
        url: UrlArg,
    },
    /// The dead letters of a queue.
    Dlq {
        /// Queue name.
        name: String,
        /// Most listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Move dead letters back to the queue.
    Redrive {
        /// Queue name.
        name: String,
        /// Most moved (default all).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        url: UrlArg,
    },
    /// Bind a pub/sub topic pattern to the queue.
    Bind {
        /// Queue name.
        name: String,
        /// Topic pattern (`*` one word, `#` any).
        pattern: String,
        #[command(flatten)]
        url: UrlArg,
    },
}

fn guarantee(text: &str) -> anyhow::Result<Value> {
    Ok(match text {
        "at_least_once" | "at-least-once" => json!("at_least_once"),
        "fire_and_forget" | "fire-and-forget" => json!("fire_and_forget"),
        "broadcast" => json!("broadcast"),
        other => match other.strip_prefix("quorum:").or_else(|| other.strip_prefix("quorum=")) {
            Some(n) => json!({ "quorum": n.parse::<u32>()? }),
            None => bail!("unknown guarantee {other:?} (at_least_once, fire_and_forget, broadcast, quorum:N)"),
        },
    })
}

fn url_of(command: &QueueCommand) -> &str {
    match command {
        QueueCommand::Create { url, .. }
        | QueueCommand::Send { url, .. }
        | QueueCommand::Receive { url, .. }
        | QueueCommand::Ack { url, .. }
        | QueueCommand::Nack { url, .. }
        | QueueCommand::Stats { url, .. }
        | QueueCommand::List { url }
        | QueueCommand::Dlq { url, .. }
        | QueueCommand::Redrive { url, .. }
        | QueueCommand::Bind { url, .. } => &url.url,
    }
}

/// Runs one queue command against a node.
pub async fn run(command: QueueCommand) -> anyhow::Result<i32> {
    let client = Client::connect(url_of(&command)).await?;
    let outcome = execute(&client, command).await;
    client.close().await;
    outcome
}

async fn execute(client: &Client, command: QueueCommand) -> anyhow::Result<i32> {
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match command {
        QueueCommand::Create {
            name,
            in_memory,
            max_receives,
            visibility,
            max_messages,
            max_message_bytes,
            ttl,
            dedup_window,
            quorum_wait,
            ..
        } => {
            let mut config = json!({ "durable": !in_memory });
            let mut set = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    config[k] = v;
                }
            };
            set("max_receives", max_receives.map(|v| json!(v)));
            set("visibility_timeout", visibility.map(|v| json!(v)));
            set("max_messages", max_messages.map(|v| json!(v)));
            set("max_message_bytes", max_message_bytes.map(|v| json!(v)));
            set("message_ttl", ttl.map(|v| json!(v)));
            set("dedup_window", dedup_window.map(|v| json!(v)));
            set("quorum_wait", quorum_wait.map(|v| json!(v)));
            print(&client.queue_create(&name, config).await?);
        }
        QueueCommand::Send { name, payload, guarantee: g, priority, delay, dedup_id, cluster, .. } => {
            let payload: Value = serde_json::from_str(&payload)
                .map_err(|e| anyhow::anyhow!("PAYLOAD must be JSON ({e}), got {payload:?}"))?;
            let options = QueueSendOptions {
                guarantee: g.as_deref().map(guarantee).transpose()?,
                priority,
                delay,
                dedup_id,
                target_cluster: cluster,
            };
            println!("{}", client.queue_send(&name, payload, options).await?);
        }
        QueueCommand::Receive { name, max, wait, consumer, .. } => {
            for m in client.queue_receive(&name, max, wait, Some(&consumer)).await? {
                let mut line = json!({"id": m.id, "payload": m.payload, "receive_count": m.receive_count});
                if let Some(reason) = &m.reason {
                    line["reason"] = json!(reason);
                }
                println!("{line}");
            }
        }
        QueueCommand::Ack { name, ids, consumer, .. } => {
            let acked = client.queue_ack(&name, &ids, Some(&consumer)).await?;
            let unknown: Vec<&String> = ids.iter().filter(|id| !acked.contains(id)).collect();
            println!("{}", json!({"acked": acked, "unknown": unknown}));
            if !unknown.is_empty() {
                return Ok(1);
            }
        }
        QueueCommand::Nack { name, ids, delay, consumer, .. } => {
            let nacked = client.queue_nack(&name, &ids, delay, Some(&consumer)).await?;
            let unknown: Vec<&String> = ids.iter().filter(|id| !nacked.contains(id)).collect();
            println!("{}", json!({"nacked": nacked, "unknown": unknown}));
            if !unknown.is_empty() {
                return Ok(1);
            }
        }
        QueueCommand::Stats { name, json: raw, cluster, .. } => {
            let stats = match cluster {
                Some(cluster) => client.queue_stats_in(&cluster, &name).await?,
                None => client.queue_stats(&name).await?,
            };
            if raw {
                print(&stats);
            } else {
                for key in [
                    "visible",
                    "delayed",
                    "leased",
                    "in_round",
                    "waiting_quorum",
                    "dead_letters",
                    "subscribers",
                    "sent_total",
                    "acked_total",
                    "redelivered_total",
                    "dead_lettered_total",
                    "expired_total",
                ] {
                    println!("{key:<20} {}", stats[key]);
                }
                println!("{:<20} {}", "durable", stats["config"]["durable"]);
            }
        }
        QueueCommand::List { .. } => {
            for q in client.queue_list().await? {
                println!("{}", q);
            }
        }
        QueueCommand::Dlq { name, limit, .. } => {
            for m in client.queue_dlq(&name, limit).await? {
                println!("{m}");
            }
        }
        QueueCommand::Redrive { name, limit, .. } => {
            println!("{}", json!({ "redriven": client.queue_redrive(&name, limit).await? }));
        }
        QueueCommand::Bind { name, pattern, .. } => {
            client.queue_bind(&name, &pattern).await?;
            println!("{}", json!({ "bound": true, "pattern": pattern }));
        }
    }
    Ok(0)
}
