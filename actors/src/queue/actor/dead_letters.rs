//! `NAME.dlq`: the dead letters of queue `NAME`, served as a queue of their own.
//!
//! Not a second queue with records of its own: the dead letters stay in `NAME`'s core
//! (and its tree), so dead-lettering and redrive stay one atomic step. What makes it a
//! queue is that it can be consumed like one: `receive` leases dead letters (oldest
//! first, each with its `reason`) to one consumer at a time, `ack` deletes them, `nack`
//! or the lease's end gives them back, and `stats` counts them. `redrive` and `dlq` on
//! `NAME.dlq` act on `NAME`. Sending to it, subscribing to it, binding it or creating it
//! are refused with a 1002 that says what it is.

use actix::Context;
use serde_json::{json, Map, Value};

use super::{core_error, deliveries_json, opt_f64, opt_u64, Answer, Lane, Queue};
use crate::protocol::RpcError;
use crate::pubsub::ConnectionId;
use crate::queue::core::{ConsumerId, MAX_RECEIVE_BATCH};
use crate::unix_now;

impl Queue {
    /// One operation on `base.dlq` (`base` is a hosted queue).
    pub(super) fn dead_letter_op(
        &mut self,
        conn: ConnectionId,
        base: &str,
        op: &str,
        f: &Map<String, Value>,
        ctx: &mut Context<Self>,
    ) -> Answer {
        let now = unix_now();
        match op {
            "receive" => self.receive_dead(conn, base, f, now),
            "ack" | "nack" => self.settle(conn, base, op, f, now, Lane::Dead),
            "stats" => {
                let Some(hosted) = self.queues.get(base) else {
                    return Answer::Ready(Err(RpcError::queue_not_found(base)));
                };
                let mut stats = serde_json::to_value(hosted.core.dead_stats()).unwrap_or(Value::Null);
                if let Value::Object(map) = &mut stats {
                    map.insert("queue".into(), json!(format!("{base}.dlq")));
                    map.insert("dead_letters_of".into(), json!(base));
                    map.insert("owner".into(), json!(self.limits.node));
                }
                Answer::Ready(Ok(stats))
            }
            "redrive" | "dlq" => self.base_op(base, op, f, ctx),
            other => Answer::Ready(Err(RpcError::invalid(format!(
                "{base}.dlq is the dead-letter queue of {base}: it takes receive, ack, nack, stats, dlq and \
                 redrive, not {other:?} (messages reach it by exceeding {base}'s max_receives or quorum wait)"
            )))),
        }
    }

    fn receive_dead(&mut self, conn: ConnectionId, base: &str, f: &Map<String, Value>, now: f64) -> Answer {
        let parsed = (|| -> Result<_, RpcError> {
            let consumer = Self::consumer_of(conn, f)?;
            let max = opt_u64(f, "max")?.unwrap_or(1).clamp(1, MAX_RECEIVE_BATCH as u64) as usize;
            Ok((consumer, max, opt_f64(f, "visibility")?))
        })();
        let (consumer, max, visibility) = match parsed {
            Ok(p) => p,
            Err(e) => return Answer::Ready(Err(e)),
        };
        let consumer = consumer.unwrap_or_else(|| {
            // Bound to the connection under the base queue, whose core holds the leases.
            let c = ConsumerId::from(format!("conn:{conn}"));
            self.by_conn.entry(conn).or_default().insert((base.to_owned(), c.clone()));
            c
        });
        let Some(hosted) = self.queues.get_mut(base) else {
            return Answer::Ready(Err(RpcError::queue_not_found(base)));
        };
        let step = hosted.core.receive_dead(&consumer, max, visibility, now);
        let (value, durable) = self.effects(base, step);
        Answer::Waiting(Box::pin(async move {
            match durable.await {
                Ok(()) => value.map(|d| deliveries_json(&d)).map_err(core_error),
                Err(e) => Err(RpcError::not_durable(e)),
            }
        }))
    }
}
