//! Outbox: a connection's queue of outgoing frames, bounded in frames and in bytes, and the
//! gate that stops reading a client that does not read.
//!
//! Who writes into it: the connection (replies, acks) and PubSub (notifications). Who
//! drains it: the connection's single writer task, which releases each frame's bytes once
//! the websocket has taken it. A fabric link's queue is an outbox too
//! ([`crate::fabric::LinkSender`]): calls and replies go in with `queue`/`send`, gossip
//! with `try_send`, flooded publishes with [`Outbox::try_send_bulk`]; no read gate.
//!
//! Backpressure, in bytes: each queued frame costs its length plus [`FRAME_OVERHEAD`].
//! - Replies are never dropped: [`Outbox::queue`] and [`Outbox::send`] ignore the byte
//!   bound (they wait only for a free frame slot). Instead, while the queue is over the
//!   bound, the [`ReadGate`] around the connection's websocket stream stops yielding
//!   frames, so the client's next requests wait in TCP, not in our memory, and the
//!   connection resumes reading when the writer drains the queue below the bound. The
//!   overshoot is at most the replies of requests already accepted.
//! - Notifications are best-effort: [`Outbox::try_send`] refuses a frame that would take
//!   the queue over the bound (PubSub drops it and counts it), unless the queue is empty,
//!   so a single message larger than the bound still reaches a subscriber that reads.
//! - A backlog replay must not lose messages either, but it is many frames for one
//!   request: it waits for [`Outbox::room`] before each page, so it adds at most one page
//!   to a queue over the bound, and a connection runs one replay at a time.
//!
//! What is not counted: replies written straight into the websocket on the fast path (the
//! connection does that only when the queue is empty, and only up to 64 KiB), calls the
//! WorkerHub writes straight into a worker's websocket under the same conditions
//! ([`Outbox::write_if_idle`]), and frames
//! already handed to actix-ws: at most 32 in its channel plus one encoded batch of them in
//! actix-http's write buffer. The writer hands longer messages over in 64 KiB fragments,
//! so that is about 4 MiB per connection whatever the message size.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendError, TrySendError};

use crate::metrics::Metrics;
use crate::protocol::FrameKind;

/// What a queued frame costs beyond its bytes (the frame, its buffer header, the slot), so
/// that a flood of tiny frames is bounded too.
pub const FRAME_OVERHEAD: usize = 64;

/// A frame queued for a connection's writer.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// The encoded JSON.
    pub bytes: Bytes,
    /// Text or binary.
    pub kind: FrameKind,
}

impl OutFrame {
    fn cost(&self) -> usize {
        self.bytes.len() + FRAME_OVERHEAD
    }
}

/// The queue of frames a connection's writer sends, in order; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    frames: mpsc::Sender<OutFrame>,
    budget: Arc<ByteBudget>,
}

/// The bytes queued in one outbox, and who to wake when they fall below the bound.
#[derive(Debug)]
struct ByteBudget {
    queued: AtomicUsize,
    limit: usize,
    /// The connection's read side, parked by its [`ReadGate`] while over the bound.
    reader: AtomicWaker,
    /// Writers that wait for the queue to fall under the bound ([`Outbox::room`]).
    room: tokio::sync::Notify,
    /// Who writes into the websocket outside the queue's order: [`OPEN`], a direct write
    /// from another thread ([`DIRECT`], see [`Outbox::write_if_idle`]) or the writer
    /// sending one message in fragments ([`FRAGMENTS`]), which nothing may split.
    gate: AtomicU8,
}

const OPEN: u8 = 0;
const DIRECT: u8 = 1;
const FRAGMENTS: u8 = 2;

impl ByteBudget {
    fn over(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= self.limit
    }

    /// Gives back `cost` bytes; wakes the reader when that brings the queue under the bound.
    fn release(&self, cost: usize) {
        let before = self.queued.fetch_sub(cost, Ordering::AcqRel);
        if before >= self.limit && before - cost < self.limit {
            self.reader.wake();
            self.room.notify_waiters();
        }
    }
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxReceiver {
    frames: mpsc::Receiver<OutFrame>,
    budget: Arc<ByteBudget>,
}

impl Outbox {
    /// An outbox of at most `capacity` frames and (for notifications) `max_bytes` bytes.
    pub fn channel(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (frames, receiver) = mpsc::channel(capacity.max(1));
        let budget = Arc::new(ByteBudget {
            queued: AtomicUsize::new(0),
            limit: max_bytes,
            reader: AtomicWaker::new(),
            room: tokio::sync::Notify::new(),
            gate: AtomicU8::new(OPEN),
        });
        (Outbox { frames, budget: budget.clone() }, OutboxReceiver { frames: receiver, budget })
    }

    /// Queues a best-effort frame (a notification) if it fits in both bounds; a refused
    /// frame comes back (`Full` when over a bound, `Closed` when the writer is gone).
    pub fn try_send(&self, frame: OutFrame) -> Result<(), TrySendError<OutFrame>> {
        let cost = frame.cost();
        let before = self.budget.queued.fetch_add(cost, Ordering::AcqRel);
        if before > 0 && before + cost > self.budget.limit {
            self.budget.release(cost);
            return Err(TrySendError::Full(frame));
        }
        self.frames.try_send(frame).inspect_err(|_| self.budget.release(cost))
    }

    /// Queues a frame that must not be lost (a reply) without waiting: only a full frame
    /// count refuses it (`Full`, with the frame, for the caller to [`Outbox::send`]).
    pub fn queue(&self, frame: OutFrame) -> Result<(), TrySendError<OutFrame>> {
        let cost = frame.cost();
        self.budget.queued.fetch_add(cost, Ordering::AcqRel);
        self.frames.try_send(frame).inspect_err(|_| self.budget.release(cost))
    }

    /// Queues a frame that must not be lost, waiting for a frame slot if need be (never for
    /// bytes: see the module doc). Fails only when the writer is gone. Its bytes count once
    /// it has its slot: a send dropped while it waits (a timeout, a cancelled call) leaves
    /// nothing counted.
    pub async fn send(&self, frame: OutFrame) -> Result<(), SendError<OutFrame>> {
        let Ok(slot) = self.frames.reserve().await else { return Err(SendError(frame)) };
        self.budget.queued.fetch_add(frame.cost(), Ordering::AcqRel);
        slot.send(frame);
        Ok(())
    }

    /// Like [`Outbox::try_send`], for bulk best-effort frames (flooded publishes): refused
    /// once the queue holds half its byte bound, so the other best-effort frames behind
    /// them (gossip, SWIM probes) still find room on a link that reads slowly.
    pub fn try_send_bulk(&self, frame: OutFrame) -> Result<(), TrySendError<OutFrame>> {
        if self.budget.queued.load(Ordering::Acquire) >= self.budget.limit / 2 {
            return Err(TrySendError::Full(frame));
        }
        self.try_send(frame)
    }

    /// Waits until the queue is under its byte bound (at once if it is): a writer of many
    /// frames that must not be lost (a backlog replay) calls it before each batch, so that
    /// it overshoots the bound by one batch at most instead of queueing without end.
    pub async fn room(&self) {
        loop {
            let notified = self.budget.room.notified();
            tokio::pin!(notified);
            // Registered before the check: a release in between is not missed.
            notified.as_mut().enable();
            if !self.budget.over() {
                return;
            }
            notified.await;
        }
    }

    /// Whether nothing is queued or being handed to the websocket (so a frame written
    /// straight into the socket cannot overtake one queued earlier).
    pub fn is_idle(&self) -> bool {
        self.budget.queued.load(Ordering::Acquire) == 0
    }

    /// Writes `payload` straight into the websocket, from any thread, when nothing is
    /// queued or being written (so it overtakes no queued frame) and the writer is not
    /// sending a message in fragments (which it would split). `write` must not block: it
    /// hands the payload back when the websocket has no room. The payload comes back
    /// unwritten otherwise, for the caller to queue.
    pub fn write_if_idle<T>(&self, payload: T, write: impl FnOnce(T) -> Result<(), T>) -> Result<(), T> {
        let gate = &self.budget.gate;
        if gate.compare_exchange(OPEN, DIRECT, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(payload);
        }
        let written = if self.is_idle() { write(payload) } else { Err(payload) };
        gate.store(OPEN, Ordering::Release);
        written
    }

    /// Whether the queue is at or over its byte bound.
    pub fn is_over_bound(&self) -> bool {
        self.budget.over()
    }

    /// Bytes queued now (frame overheads included).
    pub fn queued_bytes(&self) -> usize {
        self.budget.queued.load(Ordering::Acquire)
    }

    /// Wraps the connection's inbound stream so that it pauses while this outbox is over
    /// its byte bound; each pause counts once in `metrics` under
    /// `max_outbound_bytes_per_connection`.
    pub fn gate<S>(&self, inbound: S, metrics: Arc<Metrics>) -> ReadGate<S> {
        ReadGate { inbound, budget: self.budget.clone(), metrics, paused: false }
    }
}

impl OutboxReceiver {
    /// The next frame, in order; `None` once every [`Outbox`] is gone. Its bytes still
    /// count until [`OutboxReceiver::written`].
    pub async fn recv(&mut self) -> Option<OutFrame> {
        self.frames.recv().await
    }

    /// The next frame if one is queued (see [`OutboxReceiver::recv`]).
    pub fn try_recv(&mut self) -> Result<OutFrame, mpsc::error::TryRecvError> {
        self.frames.try_recv()
    }

    /// The websocket took `frame` (or the connection gave up on it): its bytes are free.
    pub fn written(&self, frame: &OutFrame) {
        self.budget.release(frame.cost());
    }

    /// Keeps direct writes ([`Outbox::write_if_idle`]) out while the writer sends one
    /// message in fragments; they are refused until the guard drops. A direct write in
    /// progress is waited for (it never blocks).
    pub async fn fragments(&self) -> Fragments<'_> {
        let gate = &self.budget.gate;
        while gate.compare_exchange(OPEN, FRAGMENTS, Ordering::AcqRel, Ordering::Acquire).is_err() {
            tokio::task::yield_now().await;
        }
        Fragments(gate)
    }
}

/// The writer is sending a message in fragments (see [`OutboxReceiver::fragments`]).
pub struct Fragments<'a>(&'a AtomicU8);

impl Drop for Fragments<'_> {
    fn drop(&mut self) {
        self.0.store(OPEN, Ordering::Release);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        // Frames left unsent are discarded with the receiver: give their bytes back so
        // nobody parked on this budget waits for a writer that is gone.
        self.frames.close();
        while let Ok(frame) = self.frames.try_recv() {
            self.budget.release(frame.cost());
        }
    }
}

/// A connection's inbound stream that yields nothing while its outbox is over the byte
/// bound (see the module doc). One atomic load per poll; no clock, no allocation.
pub struct ReadGate<S> {
    inbound: S,
    budget: Arc<ByteBudget>,
    metrics: Arc<Metrics>,
    /// Paused on the last poll (a pause is counted when it starts).
    paused: bool,
}

impl<S: Stream + Unpin> Stream for ReadGate<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.budget.over() {
            self.budget.reader.register(cx.waker());
            // Re-checked after registering: a release in between would have found no waker.
            if self.budget.over() {
                if !std::mem::replace(&mut self.paused, true) {
                    self.metrics.limit_exceeded("max_outbound_bytes_per_connection");
                }
                return Poll::Pending;
            }
        }
        self.paused = false;
        Pin::new(&mut self.inbound).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{stream, FutureExt, StreamExt};

    use super::*;

    fn frame(len: usize) -> OutFrame {
        OutFrame { bytes: Bytes::from(vec![b'x'; len]), kind: FrameKind::Binary }
    }

    #[test]
    fn notifications_are_refused_past_the_byte_bound_but_replies_are_not() {
        let (outbox, mut receiver) = Outbox::channel(100, 1000);
        outbox.try_send(frame(500)).expect("fits");
        assert!(matches!(outbox.try_send(frame(500)), Err(TrySendError::Full(_))), "would pass 1000 bytes");
        outbox.queue(frame(2000)).expect("a reply is queued whatever its size");
        assert!(outbox.is_over_bound());
        let first = receiver.recv().now_or_never().flatten().expect("queued");
        receiver.written(&first);
        assert_eq!(outbox.queued_bytes(), 2000 + FRAME_OVERHEAD);
    }

    #[test]
    fn a_direct_write_needs_an_idle_queue_and_no_fragments_in_progress() {
        let (outbox, mut receiver) = Outbox::channel(100, 1000);
        let write = |_: u32| Ok::<(), u32>(());
        assert_eq!(outbox.write_if_idle(1, write), Ok(()), "idle: written");
        assert_eq!(outbox.write_if_idle(2, Err), Err(2), "no room: handed back");
        outbox.queue(frame(10)).expect("queued");
        assert_eq!(outbox.write_if_idle(3, write), Err(3), "would overtake a queued frame");
        let queued = receiver.recv().now_or_never().flatten().expect("queued");
        let fragments = receiver.fragments().now_or_never().expect("the gate is open");
        receiver.written(&queued);
        assert!(outbox.is_idle());
        assert_eq!(outbox.write_if_idle(4, write), Err(4), "would split a fragmented message");
        drop(fragments);
        assert_eq!(outbox.write_if_idle(5, write), Ok(()));
    }

    #[test]
    fn a_frame_larger_than_the_bound_reaches_an_empty_queue() {
        let (outbox, _receiver) = Outbox::channel(100, 1000);
        outbox.try_send(frame(5000)).expect("the queue was empty");
        assert!(outbox.try_send(frame(1)).is_err(), "but nothing joins it while over");
    }

    #[test]
    fn tiny_frames_are_bounded_by_their_overhead() {
        let (outbox, _receiver) = Outbox::channel(1_000_000, 10 * FRAME_OVERHEAD);
        let accepted = (0..1000).filter(|_| outbox.try_send(frame(0)).is_ok()).count();
        assert_eq!(accepted, 10);
    }

    #[test]
    fn the_gate_pauses_reading_while_over_and_resumes_when_drained() {
        let (outbox, mut receiver) = Outbox::channel(100, 1000);
        let metrics = Arc::new(Metrics::default());
        let mut gated = outbox.gate(stream::iter([1, 2, 3]), metrics.clone());
        assert_eq!(gated.next().now_or_never(), Some(Some(1)));
        outbox.queue(frame(1500)).expect("queued");
        assert_eq!(gated.next().now_or_never(), None, "paused while over the bound");
        assert_eq!(gated.next().now_or_never(), None, "still paused");
        assert_eq!(metrics.limit_exceeded_count("max_outbound_bytes_per_connection"), 1, "one pause, counted once");
        let queued = receiver.recv().now_or_never().flatten().expect("queued");
        receiver.written(&queued);
        assert!(outbox.is_idle());
        assert_eq!(gated.next().now_or_never(), Some(Some(2)), "reading again");
    }

    #[tokio::test]
    async fn room_waits_while_over_the_bound_and_not_otherwise() {
        let (outbox, mut receiver) = Outbox::channel(100, 1000);
        outbox.room().now_or_never().expect("under the bound: at once");
        outbox.queue(frame(1500)).expect("queued");
        let waiting = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.room().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "over the bound: waits");
        let queued = receiver.recv().await.expect("queued");
        receiver.written(&queued);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("woken when drained")
            .expect("task");
    }

    #[tokio::test]
    async fn a_send_dropped_while_it_waits_for_a_slot_leaves_nothing_counted() {
        let (outbox, mut receiver) = Outbox::channel(1, 1000);
        outbox.queue(frame(10)).expect("the only slot");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), outbox.send(frame(500))).await;
        assert!(waiting.is_err(), "no slot: it waits, and is dropped");
        let first = receiver.recv().await.expect("queued");
        receiver.written(&first);
        assert!(outbox.is_idle(), "{} bytes counted", outbox.queued_bytes());
        outbox.try_send(frame(900)).expect("the whole bound is free");
    }

    #[test]
    fn bulk_frames_fill_half_the_bound_and_leave_the_rest_to_others() {
        let (outbox, _receiver) = Outbox::channel(100, 1000);
        outbox.try_send_bulk(frame(600)).expect("an empty queue takes it");
        assert!(outbox.try_send_bulk(frame(10)).is_err(), "past half the bound");
        outbox.try_send(frame(200)).expect("other best-effort frames still fit");
    }

    #[test]
    fn a_dropped_receiver_gives_back_what_it_held() {
        let (outbox, receiver) = Outbox::channel(100, 1000);
        outbox.queue(frame(10)).expect("queued");
        drop(receiver);
        assert!(outbox.is_idle());
        assert!(matches!(outbox.try_send(frame(1)), Err(TrySendError::Closed(_))));
    }
}
