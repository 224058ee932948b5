//! Typed queue operations (`role: "queue"`, see the queue actor's module doc).
//!
//! ```no_run
//! # async fn run() -> Result<(), mpreg::ClientError> {
//! use mpreg::Client;
//! use serde_json::json;
//! let client = Client::connect("ws://127.0.0.1:6666").await?;
//! client.queue_create("jobs", json!({})).await?;
//! let id = client.queue_send("jobs", json!({"n": 1}), Default::default()).await?;
//! let got = client.queue_receive("jobs", 10, 0.0, None).await?;
//! client.queue_ack("jobs", &[got[0].id.clone()], None).await?;
//! # let _ = id; Ok(()) }
//! ```

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{Client, ClientError};

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueueMessage {
    /// Its id (what ack and nack name).
    pub id: String,
    /// Its body.
    pub payload: Value,
    /// Deliveries so far, this one included.
    pub receive_count: u32,
    /// `at_least_once`, `fire_and_forget`, `broadcast` or `{"quorum": n}`.
    #[serde(default)]
    pub guarantee: Value,
    /// Its priority.
    #[serde(default)]
    pub priority: i64,
    /// Why it was dead-lettered, for a message received from a dead-letter queue
    /// (`NAME.dlq`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Options of a send.
#[derive(Debug, Clone, Default)]
pub struct QueueSendOptions {
    /// `at_least_once` (default), `fire_and_forget`, `broadcast`, `{"quorum": n}`.
    pub guarantee: Option<Value>,
    /// Higher first.
    pub priority: Option<i64>,
    /// Seconds before it becomes visible.
    pub delay: Option<f64>,
    /// Dedup key (default: the payload's hash).
    pub dedup_id: Option<String>,
    /// The cluster whose queue it is, when not this node's (over federation bridges).
    pub target_cluster: Option<String>,
}

/// A queue subscription's stream of pushed messages; ack them with
/// [`Client::queue_ack`] (no consumer) on the same client.
pub struct QueueSubscription {
    /// The subscription id.
    pub id: String,
    /// The queue.
    pub queue: String,
    messages: mpsc::UnboundedReceiver<QueueMessage>,
}

impl QueueSubscription {
    /// The next message; `None` when the connection closed.
    pub async fn next(&mut self) -> Option<QueueMessage> {
        self.messages.recv().await
    }
}

fn object(fields: Value) -> Map<String, Value> {
    match fields {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

impl Client {
    /// One queue op: `{"role": "queue", "u", "op", "queue", ...fields}` -> its `result`.
    pub async fn queue_op(&self, op: &str, queue: Option<&str>, fields: Value) -> Result<Value, ClientError> {
        let u = self.next_u();
        let mut frame = object(fields);
        let wait = frame.get("wait").and_then(Value::as_f64).unwrap_or(0.0);
        frame.insert("role".into(), json!("queue"));
        frame.insert("u".into(), json!(u));
        frame.insert("op".into(), json!(op));
        if let Some(queue) = queue {
            frame.insert("queue".into(), json!(queue));
        }
        let deadline = self.inner.deadline + Duration::from_secs_f64(wait.clamp(0.0, 3600.0));
        let reply = self.roundtrip(u, Value::Object(frame), deadline).await?;
        if let Some(error) = reply.get("error").filter(|e| !e.is_null()) {
            let error = serde_json::from_value(error.clone()).map_err(|e| ClientError::Protocol(e.to_string()))?;
            return Err(ClientError::Rpc(error));
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Creates a queue (`config`: QueueConfig fields, `{}` for defaults); idempotent with
    /// the same config. Returns `{"queue", "created", "config"}`.
    pub async fn queue_create(&self, queue: &str, config: Value) -> Result<Value, ClientError> {
        self.queue_op("create", Some(queue), json!({ "config": config })).await
    }

    /// Deletes a queue and its messages; whether it existed.
    pub async fn queue_delete(&self, queue: &str) -> Result<bool, ClientError> {
        let r = self.queue_op("delete", Some(queue), json!({})).await?;
        Ok(r["deleted"].as_bool().unwrap_or(false))
    }

    /// Sends a message; returns its id once it is durable (for a duplicate: the first
    /// message's id).
    pub async fn queue_send(
        &self,
        queue: &str,
        payload: Value,
        options: QueueSendOptions,
    ) -> Result<String, ClientError> {
        let mut fields = json!({ "payload": payload });
        if let Some(g) = options.guarantee {
            fields["guarantee"] = g;
        }
        if let Some(p) = options.priority {
            fields["priority"] = json!(p);
        }
        if let Some(d) = options.delay {
            fields["delay"] = json!(d);
        }
        if let Some(d) = options.dedup_id {
            fields["dedup_id"] = json!(d);
        }
        if let Some(c) = options.target_cluster {
            fields["target_cluster"] = json!(c);
        }
        let r = self.queue_op("send", Some(queue), fields).await?;
        r["id"].as_str().map(str::to_owned).ok_or_else(|| ClientError::Protocol(format!("send answered {r}")))
    }

    /// Receives up to `max` messages, waiting up to `wait` seconds for the first one.
    /// `consumer`: a stable consumer id (needed to ack from another connection).
    pub async fn queue_receive(
        &self,
        queue: &str,
        max: usize,
        wait: f64,
        consumer: Option<&str>,
    ) -> Result<Vec<QueueMessage>, ClientError> {
        let mut fields = json!({ "max": max, "wait": wait });
        if let Some(c) = consumer {
            fields["consumer"] = json!(c);
        }
        let r = self.queue_op("receive", Some(queue), fields).await?;
        serde_json::from_value(r["messages"].clone()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Acks messages; returns the ids acked (the others were unknown or not leased to us).
    pub async fn queue_ack(
        &self,
        queue: &str,
        ids: &[String],
        consumer: Option<&str>,
    ) -> Result<Vec<String>, ClientError> {
        let mut fields = json!({ "ids": ids });
        if let Some(c) = consumer {
            fields["consumer"] = json!(c);
        }
        let r = self.queue_op("ack", Some(queue), fields).await?;
        serde_json::from_value(r["acked"].clone()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Nacks messages (visible again after `delay` seconds); returns the ids nacked.
    pub async fn queue_nack(
        &self,
        queue: &str,
        ids: &[String],
        delay: f64,
        consumer: Option<&str>,
    ) -> Result<Vec<String>, ClientError> {
        let mut fields = json!({ "ids": ids, "delay": delay });
        if let Some(c) = consumer {
            fields["consumer"] = json!(c);
        }
        let r = self.queue_op("nack", Some(queue), fields).await?;
        serde_json::from_value(r["nacked"].clone()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The queue's stats, config and owner.
    pub async fn queue_stats(&self, queue: &str) -> Result<Value, ClientError> {
        self.queue_op("stats", Some(queue), json!({})).await
    }

    /// The stats of queue `queue` of cluster `cluster` (over federation bridges).
    pub async fn queue_stats_in(&self, cluster: &str, queue: &str) -> Result<Value, ClientError> {
        self.queue_op("stats", Some(queue), json!({ "target_cluster": cluster })).await
    }

    /// Every queue: `[{name, durable, owner, stats...}]`.
    pub async fn queue_list(&self) -> Result<Vec<Value>, ClientError> {
        let r = self.queue_op("list", None, json!({})).await?;
        Ok(r["queues"].as_array().cloned().unwrap_or_default())
    }

    /// Up to `limit` dead letters: `[{id, payload, reason, at, receive_count}]`.
    pub async fn queue_dlq(&self, queue: &str, limit: usize) -> Result<Vec<Value>, ClientError> {
        let r = self.queue_op("dlq", Some(queue), json!({ "limit": limit })).await?;
        Ok(r["messages"].as_array().cloned().unwrap_or_default())
    }

    /// Moves up to `limit` dead letters (all: None) back to the queue; how many.
    pub async fn queue_redrive(&self, queue: &str, limit: Option<usize>) -> Result<u64, ClientError> {
        let r = self.queue_op("redrive", Some(queue), json!({ "limit": limit })).await?;
        Ok(r["redriven"].as_u64().unwrap_or(0))
    }

    /// Binds a pub/sub topic pattern to the queue (persisted with its config).
    pub async fn queue_bind(&self, queue: &str, pattern: &str) -> Result<(), ClientError> {
        self.queue_op("bind", Some(queue), json!({ "pattern": pattern })).await.map(|_| ())
    }

    /// Subscribes: messages are pushed, at most `prefetch` unacked at once.
    pub async fn queue_subscribe(&self, queue: &str, prefetch: usize) -> Result<QueueSubscription, ClientError> {
        let id = format!("qsub-{}", self.next_u());
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.queue_subscribers.lock().map_err(|_| ClientError::Disconnected)?.insert(id.clone(), tx);
        let fields = json!({ "subscription_id": id, "prefetch": prefetch });
        if let Err(e) = self.queue_op("subscribe", Some(queue), fields).await {
            self.inner.queue_subscribers.lock().map(|mut s| s.remove(&id)).ok();
            return Err(e);
        }
        Ok(QueueSubscription { id, queue: queue.to_owned(), messages: rx })
    }

    /// Ends a queue subscription (its leases are released).
    pub async fn queue_unsubscribe(&self, subscription: &QueueSubscription) -> Result<(), ClientError> {
        self.inner.queue_subscribers.lock().map(|mut s| s.remove(&subscription.id)).ok();
        let fields = json!({ "subscription_id": subscription.id });
        self.queue_op("unsubscribe", Some(&subscription.queue), fields).await.map(|_| ())
    }
}
