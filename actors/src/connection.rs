//! Connection: one actor per websocket, plus the listener that accepts them.
//!
//! Who sends to it: its websocket (frames), its own heartbeat timer. Whom it calls: the
//! planner (small requests in place or as a task on this actor's thread; large ones, and
//! runs that outgrow this thread, on the supervised Planner actor), PubSub (subscribe,
//! publish), the Queue actor (`role: "queue"`, answered `queue-reply`; its pushes,
//! `queue-message`, come through the same outbox), the [`WorkerHub`] (`role: "worker-*"`:
//! a connection that registers as a worker gets its calls through the same outbox, or
//! written straight into its websocket by the caller's thread when that outbox is idle, is
//! disconnected over a frame that breaks the worker protocol or past `worker_timeout_s`
//! of silence, and leaves the hub when it closes), the cache (`role: "cache"`, answered
//! `cache-reply`, read and written in place without a mailbox). Replies and
//! notifications go through one [`Outbox`] drained by a single writer task, so a reply
//! queued after a notification is also sent after it.
//!
//! Invariants: every frame gets an answer (bad input included; a panic while handling a
//! request answers that request with 1003); at most
//! `max_in_flight_per_connection` requests that wait (calls, queue and cache operations,
//! pub/sub requests, `cluster-status`) wait at once on a connection, and
//! `max_in_flight` on the node (beyond either: 1006; a waiting request holds an
//! [`InFlight`] permit, given back however it ends); requests run
//! concurrently and are answered by `u`, not in arrival order.
//!
//! Backpressure: the outbox is bounded in bytes (`max_outbound_bytes_per_connection`). A
//! client that does not read fills it, and then its websocket is not read either (the
//! [`ReadGate`](crate::outbox::ReadGate)) until the writer drains it: its requests wait in
//! TCP, not in memory. Replies are never dropped; notifications that do not fit are.
//! A ping flood costs at most one waiting pong.
//!
//! Websocket faults close with the code RFC 6455 gives them: 1007 for a text message that
//! is not UTF-8, 1009 for a frame or message over twice `max_frame_bytes`, 1002 otherwise.
//! A frame over `max_frame_bytes` but under twice it is answered 1002 under its own `u`.
//!
//! Connections are transient: a crashed one is not restarted (its client reconnects). A
//! restart of anything else loses no connection.

use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, StreamHandler, WrapFuture};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Item, Message, ProtocolError, Session};
use bytes::Bytes;
use futures_util::{FutureExt, Sink};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use crate::cache::{cluster as cache_cluster, LocalCache};
use crate::fabric::describe::Describer;
use crate::fabric::link::next_link_id;
use crate::fabric::link::CLOSED_ON_PURPOSE;
use crate::fabric::queue_sessions::QueueRoute;
use crate::fabric::wire::{PeerFrame, ServerFrame};
use crate::fabric::{
    CloseLink, DescribeCatalog, DescribeTopology, FabricShared, LinkClosed, LinkId, LinkOpened, LinkSender,
};
use crate::function::panic_message;
use crate::metrics::{InFlight, Metrics};
use crate::outbox::OutboxReceiver;
use crate::planner::{
    Answer, Execution, Job, LevelObserver, LevelReport, Limits, NoObserver, Outcome, Placement, Plan, Planner,
    ReportOptions, RunJob, Step,
};
use crate::protocol::{
    decode_inbound, encode, sniff_u, CacheReply, CacheRequest, ClusterStatusRequest, FrameKind, Inbound, InboundError,
    PubSubAck, PubSubMessage, PublishRequest, QueueReply, QueueRequest, RpcError, RpcRequest, RpcResponse,
    SubscribeRequest, UnsubscribeRequest,
};
use crate::pubsub::{self, ConnectionId, Origin, OutFrame, Outbox, PubSub};
use crate::queue::{ConnectionGone, Queue, QueueCall};
use crate::registry::TableHandle;
use crate::routing::Routing;
use crate::supervisor::Slot;
use crate::unix_now;
use crate::worker::wire::WorkerInbound;
use crate::worker::{LeaveReason, WorkerHub, WorkerId};

/// Per-connection limits and node identity, from the node's settings.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Node name (publisher of callback-topic messages).
    pub node: String,
    /// This node's cluster (for `target_cluster`).
    pub cluster_id: Arc<str>,
    /// Whole-request timeout unless the request sets its own.
    pub request_timeout: Duration,
    /// The longest `timeout` a request may set (1002 beyond).
    pub max_request_timeout: Duration,
    /// Commands in one request (1002 beyond).
    pub max_commands_per_request: usize,
    /// Bounds on what one request builds: reply, substitutions, nesting (1002 beyond).
    pub limits: Limits,
    /// Requests with more commands than this are planned and run on the Planner.
    pub planner_offload_commands: usize,
    /// Frames larger than this, and runs that built more than this many bytes on the
    /// connection's thread, continue on the Planner.
    pub planner_offload_bytes: usize,
    /// Requests in flight per connection before 1006.
    pub max_in_flight: usize,
    /// Largest frame answered normally; up to twice this is read and refused with 1002,
    /// beyond that the connection is closed (1009) because the frame cannot be skipped.
    pub max_frame_bytes: usize,
    /// Frames queued for the writer before notifications are dropped.
    pub outbox_capacity: usize,
    /// Bytes queued for the writer before the connection stops reading and notifications
    /// are dropped (see [`crate::outbox`]).
    pub max_outbound_bytes: usize,
    /// How often the server pings an idle client.
    pub heartbeat_interval: Duration,
    /// A client silent for this long is disconnected.
    pub client_timeout: Duration,
    /// Websockets accepted and open at once (clients, workers, links other nodes dialled);
    /// an upgrade beyond it is answered 503.
    pub max_connections: usize,
    /// Places kept beyond `max_connections` for links other nodes dial (`max_inbound_links`):
    /// a connection taking one must speak as a peer within [`RESERVED_PLACE_GRACE`], so
    /// clients holding every place cannot keep the cluster's own nodes out.
    pub peer_reserve: usize,
}

/// How long a connection in a place reserved for peers has to speak as one.
pub const RESERVED_PLACE_GRACE: Duration = Duration::from_secs(2);

/// The websockets open now, against `max_connections`: a place is taken before the
/// upgrade and given back when the connection's actor is gone.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

/// One open websocket's place in the [`ConnectionCount`]; `reserved`: one of the places
/// kept for peers beyond `max_connections`.
struct ConnectionPlace {
    shared: Arc<NodeShared>,
    reserved: bool,
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.shared.connections.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionPlace {
    /// A place, or `None` when `max_connections` websockets and the peers' reserve are
    /// open already.
    fn take(shared: &Arc<NodeShared>) -> Option<ConnectionPlace> {
        let count = &shared.connections.0;
        let before = count.fetch_add(1, Ordering::AcqRel);
        if before >= shared.config.max_connections.saturating_add(shared.config.peer_reserve) {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionPlace { shared: shared.clone(), reserved: before >= shared.config.max_connections })
    }
}

/// What every connection shares.
pub struct NodeShared {
    /// Limits and identity.
    pub config: ConnectionConfig,
    /// The published function table.
    pub table: TableHandle,
    /// PubSub's current address.
    pub pubsub: Slot<PubSub>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The cluster: remote calls, peer links, cross-node pub/sub.
    pub fabric: Arc<FabricShared>,
    /// The Planner's current address: large requests run there.
    pub planner: Slot<Planner>,
    /// The Queue actor's current address (`role: "queue"`).
    pub queue: Slot<Queue>,
    /// The node's workers (`role: "worker-*"`).
    pub workers: Arc<WorkerHub>,
    /// This node's cache levels (`role: "cache"`), called without a mailbox.
    pub cache: Arc<LocalCache>,
    /// The gate to the fabric for `cluster-status`.
    pub describer: Describer,
    /// The websockets open now (`max_connections`).
    pub connections: ConnectionCount,
}

/// How long a closing peer link's writer may take to flush before the socket is closed
/// anyway.
const LINK_CLOSE_GRACE: Duration = Duration::from_secs(2);

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
static NEXT_MESSAGE: AtomicU64 = AtomicU64::new(1);

/// The websocket server: accepts on `listener` (already bound, so port 0 works) with
/// `workers` threads. Any path is accepted; a non-websocket request gets a 400.
pub fn serve(
    listener: TcpListener,
    shared: Arc<NodeShared>,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let hard_limit = shared.config.max_frame_bytes.saturating_mul(2);
    Ok(HttpServer::new(move || {
        // Called on each listener thread as it starts.
        shared.fabric.add_listener_thread();
        App::new()
            .app_data(web::Data::from(shared.clone()))
            .app_data(web::PayloadConfig::new(hard_limit))
            .default_service(web::to(websocket_entry))
    })
    .workers(workers.max(1))
    // Replies are small and latency-bound: Nagle plus the client's delayed ACK would hold
    // the last reply of a burst for ~40 ms.
    .tcp_nodelay(true)
    // Once a websocket's close handshake is done the server ends the TCP connection at
    // once, as RFC 6455 §7.1.1 asks of it. actix's default lingers up to a second for the
    // client to hang up first, while a websocket client waits for the server to: every
    // disconnect stalled that long.
    .client_disconnect_timeout(Duration::ZERO)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?
    .run())
}

async fn websocket_entry(
    req: HttpRequest,
    body: web::Payload,
    shared: web::Data<NodeShared>,
) -> Result<HttpResponse, actix_web::Error> {
    let shared = shared.into_inner();
    let Some(place) = ConnectionPlace::take(&shared) else {
        shared.metrics.limit_exceeded("max_connections");
        let max = shared.config.max_connections;
        debug!(max, "websocket refused: max_connections open already");
        return Ok(HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).body(format!(
            "too many connections: this node has max_connections ({max}) websockets open; retry later"
        )));
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let hard_limit = shared.config.max_frame_bytes.saturating_mul(2);
    let stream = stream.max_frame_size(hard_limit).aggregate_continuations().max_continuation_size(hard_limit);
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    Connection::create(move |ctx| {
        let connection = Connection::new(shared, session, peer, place);
        // Backpressure: while the outbox is over its byte bound, the websocket is not read.
        ctx.add_stream(connection.outbox.gate(stream, connection.shared.metrics.clone()));
        connection
    });
    Ok(response)
}

/// One client (or peer) websocket.
pub struct Connection {
    id: ConnectionId,
    peer: String,
    shared: Arc<NodeShared>,
    outbox: Outbox,
    session: Session,
    close: Option<oneshot::Sender<Option<CloseReason>>>,
    in_flight: usize,
    /// One backlog replay at a time: a replay waits for the one before it.
    replays: Arc<tokio::sync::Semaphore>,
    /// Whether a frame arrived since the last heartbeat tick (cheaper than a clock read
    /// per frame).
    heard: bool,
    /// Heartbeat ticks in a row without a frame.
    silent_ticks: u32,
    /// Set once the other end spoke a peer frame: this connection is a fabric link.
    link: Option<LinkId>,
    /// The other end closed this link on purpose ([`crate::fabric::link::CLOSED_ON_PURPOSE`]).
    closed_on_purpose: bool,
    /// Closes a peer link through its own writer, after the frames already queued on it
    /// (a `peer refused` reason must reach the peer before the close does).
    link_close: Option<oneshot::Sender<CloseReason>>,
    /// A pong is waiting for room in the websocket (the client is not reading).
    pong_waiting: bool,
    /// The latest ping heard while a pong waits: answered next, the ones before it never
    /// (RFC 6455 §5.5.3 allows answering only the most recent ping).
    next_pong: Option<Bytes>,
    /// The heartbeat's ping is still waiting for room in the websocket.
    ping_waiting: bool,
    /// Set by `worker-register` (or `worker-lane`): this connection is (becoming) a worker
    /// (or one more lane of one).
    worker: Option<WorkerId>,
    /// Which of the worker's connections this is (0: the registering one).
    worker_lane: usize,
    /// When the worker last sent a worker frame (its heartbeat).
    worker_heard: Instant,
    /// Why the worker leaves when the connection ends.
    worker_leaving: LeaveReason,
    /// Its place in `max_connections`, given back when the actor is gone.
    place: ConnectionPlace,
}

impl Connection {
    fn new(shared: Arc<NodeShared>, session: Session, peer: String, place: ConnectionPlace) -> Self {
        let (outbox, frames) = Outbox::channel(shared.config.outbox_capacity, shared.config.max_outbound_bytes);
        let (close, closed) = oneshot::channel();
        actix_rt::spawn(write_frames(frames, closed, session.clone()));
        Connection {
            id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            peer,
            shared,
            outbox,
            session,
            close: Some(close),
            in_flight: 0,
            replays: Arc::new(tokio::sync::Semaphore::new(1)),
            heard: true,
            silent_ticks: 0,
            link: None,
            closed_on_purpose: false,
            link_close: None,
            pong_waiting: false,
            next_pong: None,
            ping_waiting: false,
            worker: None,
            worker_lane: 0,
            worker_heard: Instant::now(),
            worker_leaving: LeaveReason::Disconnected,
            place,
        }
    }

    fn close_with(&mut self, code: CloseCode, description: &str, ctx: &mut Context<Self>) {
        if let Some(close) = self.close.take() {
            let _ = close.send(Some(CloseReason { code, description: Some(description.to_owned()) }));
        }
        ctx.stop();
    }

    /// The client closed: answer with its own code (RFC 6455 §5.5.1: an endpoint
    /// "typically echos the status code it received") after the frames already queued,
    /// and stop. A code that may not appear in a close frame is answered 1002.
    fn on_close(&mut self, reason: Option<CloseReason>, ctx: &mut Context<Self>) {
        self.closed_on_purpose = reason.as_ref().is_some_and(|r| u16::from(r.code) == CLOSED_ON_PURPOSE);
        let echo = reason.map(|reason| CloseReason { code: echoed_close_code(reason.code), description: None });
        if let Some(close) = self.close.take() {
            let _ = close.send(echo);
        }
        ctx.stop();
    }

    /// Sends a reply from the actor itself (answers computed in place: inline requests,
    /// refusals). A binary frame up to [`FRAGMENT_BYTES`] goes straight into the websocket
    /// when the outbox is empty and the socket has room, saving the writer task a wake-up;
    /// otherwise it joins
    /// the outbox (counted in its bytes, so a client that does not read stops being read).
    /// Never blocks, never drops: if the outbox has no free frame slot it is sent from a
    /// task.
    ///
    /// Order: replies to different requests carry no order between them (clients match
    /// them by `u`). Frames that must stay in order — a request's callback-topic
    /// notifications before its reply — all travel through the outbox.
    fn reply(&mut self, bytes: Vec<u8>, kind: FrameKind, ctx: &mut Context<Self>) {
        let mut bytes = Bytes::from(bytes);
        if kind == FrameKind::Binary && bytes.len() <= FRAGMENT_BYTES && self.outbox.is_idle() {
            match self.write_now(bytes, Message::Binary) {
                Ok(()) => return,
                Err(unsent) => bytes = unsent,
            }
        }
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.outbox.queue(OutFrame { bytes, kind }) {
            let outbox = self.outbox.clone();
            ctx.spawn(async move { drop(outbox.send(frame).await) }.into_actor(self));
        }
    }

    /// Puts a message (`wrap` of `payload`) into the websocket if it has room right now;
    /// hands the payload back otherwise. (Polled with a no-op waker: nobody waits here,
    /// the caller falls back to a queue.)
    fn write_now(&mut self, payload: Bytes, wrap: fn(Bytes) -> Message) -> Result<(), Bytes> {
        write_now(&mut self.session, payload, wrap)
    }

    /// A ping or pong on a peer link counts as hearing from it (see
    /// [`crate::fabric::link::FabricShared::heard_on`]).
    fn heard_on_link(&self) {
        if let Some(link) = self.link {
            self.shared.fabric.heard_on(link);
        }
    }

    /// Answers a ping, keeping at most one pong waiting per connection: a client that
    /// pings without reading costs one pending pong, not one task per ping.
    fn on_ping(&mut self, payload: Bytes, ctx: &mut Context<Self>) {
        if self.pong_waiting {
            self.next_pong = Some(payload);
            return;
        }
        let Err(payload) = self.write_now(payload, Message::Pong) else { return };
        self.pong_waiting = true;
        let mut session = self.session.clone();
        let pong = async move { drop(session.pong(&payload).await) }.into_actor(self);
        ctx.spawn(pong.map(|_, act, ctx| {
            act.pong_waiting = false;
            if let Some(next) = act.next_pong.take() {
                act.on_ping(next, ctx);
            }
        }));
    }

    /// The frame queue of a fabric link over this websocket. Peer frames have their own
    /// queue and writer, bounded like a client's outbox (the fabric drops best-effort
    /// frames or waits when full, see [`LinkSender`]); the two carry no order between them
    /// (a peer sends no client requests).
    fn link_sender(&mut self) -> LinkSender {
        let (sender, frames) =
            Outbox::channel(self.shared.config.outbox_capacity, self.shared.config.max_outbound_bytes);
        let (close, closed) = oneshot::channel();
        self.link_close = Some(close);
        actix_rt::spawn(write_link_frames(frames, closed, self.session.clone()));
        sender
    }

    fn on_frame(&mut self, bytes: Bytes, kind: FrameKind, ctx: &mut Context<Self>) {
        let limit = self.shared.config.max_frame_bytes;
        if bytes.len() > limit {
            // Answered under the frame's own `u` (found by a byte scan, not a parse), so a
            // client waiting on it hears back.
            self.shared.metrics.limit_exceeded("max_frame_bytes");
            let error =
                RpcError::invalid(format!("frame too large: {} bytes (max_frame_bytes is {limit})", bytes.len()));
            self.reject(InboundError { u: sniff_u(&bytes), role: None, error }, kind, ctx);
            return;
        }
        // On a peer link: a federation call or reply only passing through goes on undecoded.
        if self.link.is_some_and(|link| self.shared.fabric.pass_through(link, &bytes)) {
            return;
        }
        match decode_inbound(&bytes) {
            Ok(Inbound::Rpc(request)) => self.on_rpc(request, bytes.len(), kind, ctx),
            Ok(Inbound::Subscribe(request)) => self.on_subscribe(request, kind, ctx),
            Ok(Inbound::Publish(request)) => self.on_publish(request, kind, ctx),
            Ok(Inbound::Unsubscribe(request)) => self.on_unsubscribe(request, kind, ctx),
            Ok(Inbound::Peer) => match PeerFrame::decode(&bytes) {
                Ok(frame) => self.on_peer_frame(frame, bytes.len(), kind, ctx),
                Err(e) => {
                    let error = RpcError::invalid(e.to_string());
                    self.reject(InboundError { u: None, role: None, error }, kind, ctx);
                }
            },
            Ok(Inbound::ClusterStatus(request)) => self.on_cluster_status(request, kind, ctx),
            Ok(Inbound::Queue(request)) => self.on_queue(request, kind, ctx),
            Ok(Inbound::Worker) => self.on_worker_frame(&bytes, kind, ctx),
            // A worker that sends garbage is disconnected: its calls could not be trusted.
            Err(rejected) if self.worker.is_some() => {
                self.worker_protocol_error(&format!("undecodable frame: {}", rejected.error.details_text()), ctx)
            }
            Ok(Inbound::Cache(request)) => self.on_cache(request, kind, ctx),
            Err(rejected) => self.reject(rejected, kind, ctx),
        }
    }

    /// A `worker-*` frame (see [`crate::worker::wire`]).
    fn on_worker_frame(&mut self, bytes: &[u8], kind: FrameKind, ctx: &mut Context<Self>) {
        let frame = match WorkerInbound::decode(bytes) {
            Ok(frame) => frame,
            Err(e) if self.worker.is_some() => {
                return self.worker_protocol_error(&format!("bad worker frame: {e}"), ctx)
            }
            Err(e) => {
                let error = RpcError::invalid(format!("bad worker frame: {e}"));
                return self.reject(InboundError { u: sniff_u(bytes), role: None, error }, kind, ctx);
            }
        };
        let hub = self.shared.workers.clone();
        match (frame, self.worker) {
            (WorkerInbound::Register(frame), None) => {
                let Some(id) = hub.reserve(self.outbox.clone(), self.session.clone(), kind) else {
                    return self.reply(encode(&hub.too_many(frame.u)), kind, ctx);
                };
                self.worker = Some(id);
                self.worker_heard = Instant::now();
                // Spawned, not tied to this actor: a registration half done when the
                // connection ends must still finish (and then undo itself).
                let registration = tokio::spawn(hub.clone().register(id, frame));
                ctx.spawn(registration.into_actor(self).map(move |outcome, act, ctx| match outcome {
                    Ok(Ok(())) => act.watch_worker(ctx),
                    Ok(Err(refusal)) => {
                        act.worker = None;
                        act.reply(encode(&refusal), kind, ctx);
                    }
                    Err(_) => {
                        act.worker = None;
                        let refusal = crate::worker::wire::RegisteredFrame::refused(
                            String::new(),
                            RpcError::invalid("registration failed"),
                        );
                        act.reply(encode(&refusal), kind, ctx);
                    }
                }));
            }
            (WorkerInbound::Register(_), Some(_)) => self.worker_protocol_error("worker-register sent twice", ctx),
            (WorkerInbound::Lane(frame), None) => {
                // Heartbeats come on the registering websocket: a lane is watched by the
                // client timeout only, and its loss is the worker's.
                match hub.add_lane(&frame, self.outbox.clone(), self.session.clone(), kind) {
                    Ok((id, lane)) => (self.worker, self.worker_lane) = (Some(id), lane),
                    Err(error) => {
                        let refusal = crate::worker::wire::RegisteredFrame::refused(frame.u, error);
                        self.reply(encode(&refusal), kind, ctx);
                    }
                }
            }
            (WorkerInbound::Lane(_), Some(_)) => self.worker_protocol_error("worker-lane on a worker's websocket", ctx),
            (WorkerInbound::Result(result), Some(id)) => {
                self.worker_heard = Instant::now();
                hub.result(id, result);
            }
            (WorkerInbound::Heartbeat {}, Some(_)) => self.worker_heard = Instant::now(),
            (WorkerInbound::Goodbye {}, Some(id)) => {
                self.worker_heard = Instant::now();
                self.worker_leaving = LeaveReason::Goodbye;
                hub.goodbye(id);
            }
            (_, None) => {
                let error = RpcError::invalid("not a worker: send worker-register first");
                self.reject(InboundError { u: sniff_u(bytes), role: None, error }, kind, ctx);
            }
        }
    }

    /// Disconnects a registered worker that stays silent past `worker_timeout_s`.
    fn watch_worker(&mut self, ctx: &mut Context<Self>) {
        let config = self.shared.workers.config();
        let (every, timeout) = (config.heartbeat, config.timeout);
        ctx.run_interval(every.min(timeout), move |act, ctx| {
            if act.worker.is_some() && act.worker_heard.elapsed() > timeout {
                info!(conn = act.id, peer = %act.peer, "worker silent past worker_timeout_s; disconnecting");
                act.worker_leaving = LeaveReason::MissedHeartbeats;
                act.close_with(CloseCode::Policy, "worker missed heartbeats", ctx);
            }
        });
    }

    /// Closes a worker's connection over a frame that breaks the worker protocol.
    fn worker_protocol_error(&mut self, reason: &str, ctx: &mut Context<Self>) {
        warn!(conn = self.id, peer = %self.peer, reason, "worker protocol error; disconnecting the worker");
        self.worker_leaving = LeaveReason::ProtocolError;
        // A close reason has at most 123 bytes.
        let mut text = format!("worker protocol error: {reason}");
        if text.len() > 120 {
            let mut cut = 120;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        self.close_with(CloseCode::Protocol, &text, ctx);
    }

    /// A queue operation: answered `queue-reply` by the Queue actor (after the commit, for
    /// durable writes); pushes of its subscriptions go through this connection's outbox.
    fn on_queue(&mut self, request: QueueRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (outbox, conn) = (self.outbox.clone(), self.id);
        let metrics = self.shared.metrics.clone();
        let (fabric, timeout) = (self.shared.fabric.clone(), self.shared.config.request_timeout);
        self.spawn_counted("queue", &request.u.clone(), kind, ctx, move |permit| async move {
            let request = Arc::new(request);
            let call = || QueueCall { conn, outbox: outbox.clone(), kind, request: request.clone() };
            let outcome = match fabric.queue_route(&request) {
                QueueRoute::Remote(owner) => {
                    fabric.queue_session_used(conn, &owner.node, &outbox, kind);
                    fabric.forward_queue_op(&owner, &request, conn, timeout).await
                }
                QueueRoute::Refused(error) => Err(error),
                QueueRoute::Clusters { clusters, work, targeted } => {
                    fabric.queue_elsewhere(&clusters, work, targeted, timeout).await
                }
                QueueRoute::Local => match fabric.local_queue_op(call).await {
                    Ok(list) if request.op == "list" => Ok(merge_remote_queues(&fabric, list)),
                    outcome => outcome,
                },
            };
            drop(permit);
            if let Err(e) = &outcome {
                metrics.record_outcome(e.kind());
            }
            let reply = QueueReply::new(Some(request.u.clone()), outcome);
            let _ = outbox.send(OutFrame { bytes: Bytes::from(encode(&reply)), kind }).await;
        });
    }

    /// A cache operation, answered `cache-reply`: in place on this thread when this
    /// node's levels can answer (no mailbox on the way), else as a task that asks the
    /// key's owners over the fabric (see [`crate::cache::cluster`]).
    fn on_cache(&mut self, request: CacheRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let shared = &self.shared;
        let outcome = match cache_cluster::route(&shared.fabric, &shared.cache, &request, unix_now()) {
            cache_cluster::Route::Answered(outcome) => outcome,
            cache_cluster::Route::Cluster => return self.on_cache_task(request, kind, ctx),
        };
        if let Err(e) = &outcome {
            shared.metrics.record_outcome(e.kind());
        }
        let reply = CacheReply::new(Some(request.u), outcome);
        self.reply(encode(&reply), kind, ctx);
    }

    fn on_cache_task(&mut self, request: CacheRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (fabric, cache, outbox) = (self.shared.fabric.clone(), self.shared.cache.clone(), self.outbox.clone());
        let (metrics, timeout) = (self.shared.metrics.clone(), self.shared.config.request_timeout);
        self.spawn_counted("cache", &request.u.clone(), kind, ctx, move |permit| async move {
            let u = request.u.clone();
            let outcome = cache_cluster::execute(&fabric, &cache, request, timeout).await;
            drop(permit);
            if let Err(e) = &outcome {
                metrics.record_outcome(e.kind());
            }
            let reply = CacheReply::new(Some(u), outcome);
            let _ = outbox.send(OutFrame { bytes: Bytes::from(encode(&reply)), kind }).await;
        });
    }

    /// `cluster-status`: counted like any waiting request, and asked of the fabric
    /// through the node's [`Describer`] gate, so a flood of them cannot crowd out the
    /// fabric's probes.
    fn on_cluster_status(&mut self, request: ClusterStatusRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (describer, outbox) = (self.shared.describer.clone(), self.outbox.clone());
        self.spawn_counted("cluster-status", &request.u.clone(), kind, ctx, move |permit| async move {
            let (u, brief) = (request.u, request.brief);
            let answer = if !describer.is_running() {
                cluster_status_failure(&u, "fabric restarting")
            } else {
                let topology = describer.ask(|| DescribeTopology { brief }).await;
                let catalog = if brief { Ok(None) } else { describer.ask(|| DescribeCatalog).await.map(Some) };
                match (topology, catalog) {
                    (Ok(topology), Ok(catalog)) => {
                        let mut answer = serde_json::json!({"role": "cluster-status", "u": u, "topology": topology});
                        if let Some(catalog) = catalog {
                            answer["catalog"] = serde_json::json!(catalog);
                        }
                        answer
                    }
                    _ => cluster_status_failure(&u, "fabric unavailable"),
                }
            };
            drop(permit);
            let _ = outbox.send(OutFrame { bytes: Bytes::from(encode(&answer)), kind }).await;
        });
    }

    /// Runs `task`, a request that has to wait, as a task of this connection: counted in
    /// the connection's `max_in_flight_per_connection` until it ends, and holding (in the
    /// [`InFlight`] it is handed) a place in the node's `max_in_flight`. Past either bound
    /// the request (`role`, `u`) is answered at once with 1006, in its role's reply.
    fn spawn_counted<F>(
        &mut self,
        role: &str,
        u: &str,
        kind: FrameKind,
        ctx: &mut Context<Self>,
        task: impl FnOnce(InFlight) -> F,
    ) where
        F: std::future::Future<Output = ()> + 'static,
    {
        let limit = self.shared.config.max_in_flight;
        let (error, setting) = if self.in_flight >= limit {
            (RpcError::overloaded(limit), "max_in_flight_per_connection")
        } else {
            match self.node_permit() {
                Ok(permit) => {
                    self.in_flight += 1;
                    ctx.spawn(task(permit).into_actor(self).map(|_, act, _| act.in_flight -= 1));
                    return;
                }
                Err(error) => (error, "max_in_flight"),
            }
        };
        self.shared.metrics.limit_exceeded(setting);
        self.shared.metrics.record_outcome(error.kind());
        self.reply(error_reply(Some(role), Some(u.to_owned()), error), kind, ctx);
    }

    /// A peer frame. Only a STATUS turns a client connection into a (not yet admitted)
    /// link; any other peer frame on a client connection is answered 1004 and changes
    /// nothing. Whether the link is admitted is the fabric's call.
    fn on_peer_frame(&mut self, frame: PeerFrame, bytes: usize, kind: FrameKind, ctx: &mut Context<Self>) {
        let fabric = self.shared.fabric.clone();
        let link = match self.link {
            Some(link) => link,
            None if !matches!(frame, PeerFrame::Server(ServerFrame::Status { .. })) => {
                let role = match &frame {
                    PeerFrame::Server(_) => "server",
                    PeerFrame::FabricGossip(_) => "fabric-gossip",
                    PeerFrame::FabricMessage(_) => "fabric-message",
                    PeerFrame::Federation(_) => "federation",
                };
                debug!(conn = self.id, peer = %self.peer, role, "peer frame before the handshake refused");
                self.shared.metrics.fabric_dropped("no_handshake");
                let error = RpcError::peer_handshake_required(role);
                self.shared.metrics.record_outcome(error.kind());
                self.reply(encode(&RpcResponse::failure(None, error)), kind, ctx);
                return;
            }
            None => {
                let Some(gossip) = fabric.gossip.get() else {
                    warn!(conn = self.id, peer = %self.peer, "peer frame while the fabric restarts; closing");
                    self.close_with(CloseCode::Again, "fabric restarting", ctx);
                    return;
                };
                let link = next_link_id();
                self.link = Some(link);
                // Closable before the fabric hears of it.
                fabric.inbound_opened(link, ctx.address().recipient());
                gossip.do_send(LinkOpened {
                    link,
                    sender: self.link_sender(),
                    outbound_url: None,
                    close: None,
                    peer: self.peer.clone(),
                    thread: std::thread::current().id(),
                    lane: None,
                    incarnation: None,
                });
                link
            }
        };
        fabric.on_frame(link, frame, bytes);
    }

    fn reject(&mut self, rejected: InboundError, kind: FrameKind, ctx: &mut Context<Self>) {
        debug!(conn = self.id, error = %rejected.error, "frame rejected");
        self.shared.metrics.record_outcome(rejected.error.kind());
        let bytes = error_reply(rejected.role.as_deref(), rejected.u, rejected.error);
        self.reply(bytes, kind, ctx);
    }

    /// Answers 1006 and counts the refusal under the limit's setting name.
    fn overloaded(
        &mut self,
        u: String,
        error: RpcError,
        setting: &'static str,
        kind: FrameKind,
        ctx: &mut Context<Self>,
    ) {
        self.shared.metrics.limit_exceeded(setting);
        self.shared.metrics.record_outcome(error.kind());
        self.reply(encode(&RpcResponse::failure(Some(u), error)), kind, ctx);
    }

    /// A node-wide permit for a request that has to wait (1006 when the node is full). The
    /// request's task owns it, so it is given back however the task ends (answered, or
    /// dropped with its connection).
    fn admit(&mut self, u: &str, kind: FrameKind, ctx: &mut Context<Self>) -> Option<InFlight> {
        match self.node_permit() {
            Ok(permit) => Some(permit),
            Err(error) => {
                self.overloaded(u.to_owned(), error, "max_in_flight", kind, ctx);
                None
            }
        }
    }

    /// A place in the node's `max_in_flight`, or the 1006 that refuses it.
    fn node_permit(&self) -> Result<InFlight, RpcError> {
        let admission = self.shared.metrics.admission();
        admission.try_admit().ok_or_else(|| RpcError::node_overloaded(admission.limit()))
    }

    fn on_rpc(&mut self, request: RpcRequest, frame_bytes: usize, kind: FrameKind, ctx: &mut Context<Self>) {
        let limit = self.shared.config.max_in_flight;
        if self.in_flight >= limit {
            self.overloaded(request.u, RpcError::overloaded(limit), "max_in_flight_per_connection", kind, ctx);
            return;
        }
        let started = Instant::now();
        let config = &self.shared.config;
        let max_commands = config.max_commands_per_request;
        if request.cmds.len() > max_commands {
            self.shared.metrics.limit_exceeded("max_commands_per_request");
            let error = RpcError::invalid(format!(
                "request has {} commands, over max_commands_per_request ({max_commands})",
                request.cmds.len()
            ));
            self.shared.metrics.request_finished(started.elapsed(), error.kind());
            self.reply(encode(&RpcResponse::failure(Some(request.u), error)), kind, ctx);
            return;
        }
        // Large requests are planned and run on the Planner's thread from the start.
        if request.cmds.len() > config.planner_offload_commands || frame_bytes > config.planner_offload_bytes {
            let u = request.u.clone();
            let job = offloaded(self.shared.clone(), request, started);
            self.wait_for_planner(u, job, kind, started, ctx);
            return;
        }
        let u = request.u.clone();
        // A panic while planning, running in place or encoding answers this request only.
        let handled = catch_unwind(AssertUnwindSafe(|| in_place(&self.shared, request, started)));
        let prepared = match handled {
            Ok(InPlace::Answered(answer)) => {
                self.shared.metrics.request_finished(started.elapsed(), answer.error);
                self.reply(answer.bytes, kind, ctx);
                return;
            }
            Ok(InPlace::Paused(execution, ending)) => {
                let job = resumed(self.shared.clone(), execution, ending);
                self.wait_for_planner(u, job, kind, started, ctx);
                return;
            }
            Ok(InPlace::Task(prepared)) => prepared,
            Err(payload) => {
                let answer = failed(u, panicked(payload.as_ref()));
                self.shared.metrics.request_finished(started.elapsed(), answer.error);
                self.reply(answer.bytes, kind, ctx);
                return;
            }
        };
        let Some(permit) = self.admit(&u, kind, ctx) else { return };
        self.in_flight += 1;
        let shared = self.shared.clone();
        let span = tracing::debug_span!("rpc", u = %u, conn = self.id);
        let task = async move {
            let run = AssertUnwindSafe((*prepared).run(&shared)).catch_unwind().await;
            let answer = run.unwrap_or_else(|payload| failed(u, panicked(payload.as_ref())));
            drop(permit);
            shared.metrics.request_finished(started.elapsed(), answer.error);
            answer.bytes
        }
        .instrument(span);
        ctx.spawn(task.into_actor(self).map(move |bytes, act, ctx| act.answered(bytes, kind, ctx)));
    }

    /// Sends the answer of a request that ran as a task of this actor: it ends on the
    /// connection's thread, so [`Self::reply`] can put it straight into the websocket.
    fn answered(&mut self, bytes: Vec<u8>, kind: FrameKind, ctx: &mut Context<Self>) {
        self.in_flight -= 1;
        self.reply(bytes, kind, ctx);
    }

    /// Hands `job` (the request `u`) to the Planner and sends its answer when it comes;
    /// the request counts as in flight meanwhile.
    fn wait_for_planner(&mut self, u: String, job: Job, kind: FrameKind, started: Instant, ctx: &mut Context<Self>) {
        let Some(permit) = self.admit(&u, kind, ctx) else { return };
        self.in_flight += 1;
        let shared = self.shared.clone();
        let span = tracing::debug_span!("rpc", u = %u, conn = self.id, planner = true);
        let task = async move {
            let answer = on_planner(&shared, u, job).await;
            drop(permit);
            shared.metrics.request_finished(started.elapsed(), answer.error);
            answer.bytes
        }
        .instrument(span);
        ctx.spawn(task.into_actor(self).map(move |bytes, act, ctx| act.answered(bytes, kind, ctx)));
    }

    fn on_subscribe(&mut self, request: SubscribeRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (pubsub, outbox, conn) = (self.shared.pubsub.clone(), self.outbox.clone(), self.id);
        let replays = self.replays.clone();
        self.spawn_counted("pubsub-subscribe", &request.u.clone(), kind, ctx, move |_permit| async move {
            let SubscribeRequest { u, subscription } = request;
            let subscription = Arc::new(subscription);
            let subscribe =
                || pubsub::Subscribe { conn, subscription: subscription.clone(), outbox: outbox.clone(), kind };
            let (ack, mut replay) = match send_with_retry(&pubsub, subscribe).await {
                Ok(Ok(start)) => (PubSubAck::new(&u, None), start),
                Ok(Err(refused)) => (PubSubAck::new(&u, Some(refused.to_string())), None),
                Err(e) => (PubSubAck::new(&u, Some(e)), None),
            };
            if outbox.send(OutFrame { bytes: Bytes::from(encode(&ack)), kind }).await.is_err() || replay.is_none() {
                return;
            }
            // The backlog follows the ack, one replay at a time on a connection, one page
            // at a time, each read once the outbox is under its byte bound: a subscriber
            // that does not read holds at most one page more, and the replays waiting
            // their turn hold only where they start.
            let Ok(_turn) = replays.acquire().await else { return };
            while let Some(token) = replay.take() {
                outbox.room().await;
                let Ok(page) = send_with_retry(&pubsub, || pubsub::ContinueReplay { token: token.clone() }).await
                else {
                    return;
                };
                for frame in page.frames {
                    if outbox.send(frame).await.is_err() {
                        return;
                    }
                }
                replay = page.next;
            }
        });
    }

    fn on_publish(&mut self, request: PublishRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (pubsub, outbox) = (self.shared.pubsub.clone(), self.outbox.clone());
        let fabric = self.shared.fabric.clone();
        self.spawn_counted("pubsub-publish", &request.u.clone(), kind, ctx, move |permit| async move {
            let PublishRequest { u, message } = request;
            let message = Arc::new(message);
            let publish = || pubsub::Publish { message: message.clone(), origin: Origin::Local, ticket: None };
            let error = match send_with_retry(&pubsub, publish).await {
                Ok(Ok(())) => {
                    fabric.broadcast_publish(&message);
                    None
                }
                Ok(Err(refused)) => Some(refused.to_string()),
                Err(e) => Some(e),
            };
            drop(permit);
            let ack = PubSubAck::new(&u, error);
            let _ = outbox.send(OutFrame { bytes: Bytes::from(encode(&ack)), kind }).await;
        });
    }

    fn on_unsubscribe(&mut self, request: UnsubscribeRequest, kind: FrameKind, ctx: &mut Context<Self>) {
        let (pubsub, outbox, conn) = (self.shared.pubsub.clone(), self.outbox.clone(), self.id);
        self.spawn_counted("pubsub-unsubscribe", &request.u.clone(), kind, ctx, move |permit| async move {
            let UnsubscribeRequest { u, subscription_id } = request;
            let unsubscribe = || pubsub::Unsubscribe { conn, subscription_id: subscription_id.clone() };
            let error = match send_with_retry(&pubsub, unsubscribe).await {
                Ok(true) => None,
                Ok(false) => Some(format!("unknown subscription_id: {subscription_id}")),
                Err(e) => Some(e),
            };
            drop(permit);
            let _ = outbox.send(OutFrame { bytes: Bytes::from(encode(&PubSubAck::new(&u, error))), kind }).await;
        });
    }
}

/// The reply that refuses a request of `role` with `error`, in that role's own shape.
fn error_reply(role: Option<&str>, u: Option<String>, error: RpcError) -> Vec<u8> {
    match role {
        Some("queue") => encode(&QueueReply::new(u, Err(error))),
        Some("cache") => encode(&CacheReply::new(u, Err(error))),
        Some("cluster-status") => encode(&cluster_status_failure(u.as_deref().unwrap_or(""), &error.to_string())),
        Some(role) if role.starts_with("pubsub-") => {
            encode(&PubSubAck::new(u.as_deref().unwrap_or(""), Some(error.to_string())))
        }
        _ => encode(&RpcResponse::failure(u, error)),
    }
}

/// A `cluster-status` answer that failed: `error` says why.
fn cluster_status_failure(u: &str, error: &str) -> Value {
    serde_json::json!({"role": "cluster-status", "u": u, "error": error})
}

/// Sends to PubSub (see [`Slot::send`]); the error as the text a client is told.
async fn send_with_retry<M>(slot: &Slot<PubSub>, make: impl Fn() -> M) -> Result<M::Result, String>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    PubSub: actix::Handler<M>,
{
    slot.send(make).await.map_err(|e| format!("pubsub unavailable: {e}"))
}

/// Publishes each completed level on the request's callback topic.
struct CallbackPublisher<'a> {
    shared: &'a NodeShared,
    topic: Option<String>,
}

impl LevelObserver for CallbackPublisher<'_> {
    async fn level_completed(&mut self, report: &LevelReport) {
        let Some(topic) = &self.topic else { return };
        let message = Arc::new(PubSubMessage {
            topic: topic.clone(),
            payload: report.clone(),
            timestamp: unix_now(),
            message_id: format!("{}-{}", self.shared.config.node, NEXT_MESSAGE.fetch_add(1, Ordering::Relaxed)),
            publisher: self.shared.config.node.clone(),
            headers: Default::default(),
            routing_path: None,
            current_hop: None,
        });
        let publish = || pubsub::Publish { message: message.clone(), origin: Origin::Local, ticket: None };
        match send_with_retry(&self.shared.pubsub, publish).await {
            Ok(Ok(())) => self.shared.fabric.broadcast_publish(&message),
            Ok(Err(refused)) => warn!(topic = %topic, cause = %refused, "intermediate result not published"),
            Err(e) => warn!(topic = %topic, cause = %e, "intermediate result not published"),
        }
    }
}

/// What answering a request needs besides its execution.
struct Ending {
    u: String,
    timeout: Duration,
    started: Instant,
    callback_topic: Option<String>,
}

impl Ending {
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + self.timeout)
    }

    /// Runs `execution` under the request's deadline (which a resumed run keeps).
    async fn finish(&self, shared: &NodeShared, execution: Execution, placement: Placement) -> Step {
        let mut observer = CallbackPublisher { shared, topic: self.callback_topic.clone() };
        match tokio::time::timeout_at(self.deadline(), execution.run(&mut observer, placement)).await {
            Ok(step) => step,
            Err(_) => Step::Finished(Err(RpcError::timeout(self.timeout.as_secs_f64()))),
        }
    }
}

/// A validated, planned request.
struct Prepared {
    ending: Ending,
    execution: Execution,
}

/// How a request went on the connection's thread.
enum InPlace {
    /// Answered (inline functions only, or refused).
    Answered(Answer),
    /// Built more than it may in place: the rest goes to the Planner.
    Paused(Box<Execution>, Ending),
    /// Something has to wait (a task, a remote call, a callback topic): run as a task.
    Task(Box<Prepared>),
}

/// Plans `request` and, when every command is inline, runs it now.
fn in_place(shared: &NodeShared, request: RpcRequest, started: Instant) -> InPlace {
    let mut prepared = match prepare(shared, request, started) {
        Ok(prepared) => prepared,
        Err((u, error)) => return InPlace::Answered(failed(u, error)),
    };
    // Fast path: a plan of inline functions only completes in its first poll; running
    // it here saves a task, a timer and a span per request (DESIGN.md §4). So does a
    // plan whose other commands all have their results in the cache (looked up now).
    let in_place = prepared.ending.callback_topic.is_none()
        && (prepared.execution.is_inline() || prepared.execution.prefetch_cached());
    if !in_place {
        return InPlace::Task(Box::new(prepared));
    }
    let Prepared { ending, execution } = prepared;
    let placement = Placement::InPlace { pause_above: shared.config.planner_offload_bytes as u64 };
    match execution.run(&mut NoObserver, placement).now_or_never() {
        Some(Step::Finished(result)) => InPlace::Answered(answer(&response(ending.u, result))),
        Some(Step::Paused(execution)) => InPlace::Paused(execution, ending),
        // Unreachable for an inline plan; answer rather than lose the request.
        None => InPlace::Answered(failed(ending.u, RpcError::invalid("inline plan did not complete"))),
    }
}

/// `list` names every queue of the catalog: the local ones (with stats) and the remote
/// ones (name, owner, and whether the owner is reachable).
fn merge_remote_queues(fabric: &FabricShared, mut list: Value) -> Value {
    let view = fabric.view.load();
    if let Some(Value::Array(queues)) = list.get_mut("queues") {
        let mut remote: Vec<(&String, &crate::fabric::RemoteQueue, bool)> = view
            .queues
            .iter()
            .map(|(n, q)| (n, q, true))
            .chain(view.unreachable_queues.iter().map(|(n, q)| (n, q, false)))
            .collect();
        remote.sort_by(|a, b| a.0.cmp(b.0));
        for (name, owner, reachable) in remote {
            if !queues.iter().any(|q| q.get("name").and_then(Value::as_str) == Some(name.as_str())) {
                queues.push(serde_json::json!({"name": name, "owner": owner.node, "reachable": reachable}));
            }
        }
    }
    list
}

/// Validates and plans a request (no I/O); a refusal comes with the request's `u`.
fn prepare(shared: &NodeShared, request: RpcRequest, started: Instant) -> Result<Prepared, (String, RpcError)> {
    let config = &shared.config;
    let timeout = match request.timeout {
        None => config.request_timeout,
        Some(s) if s.is_finite() && s > 0.0 => {
            let max = config.max_request_timeout;
            match Duration::try_from_secs_f64(s) {
                Ok(timeout) if timeout <= max => timeout,
                _ => {
                    shared.metrics.limit_exceeded("max_request_timeout_s");
                    let error = RpcError::invalid(format!(
                        "timeout {s} s is over max_request_timeout_s ({})",
                        max.as_secs_f64()
                    ));
                    return Err((request.u, error));
                }
            }
        }
        Some(s) => {
            let error = RpcError::invalid(format!("timeout must be a positive number of seconds, got {s}"));
            return Err((request.u, error));
        }
    };
    let options = ReportOptions {
        intermediate_results: request.return_intermediate_results,
        observe_levels: request.intermediate_result_callback_topic.is_some(),
        execution_summary: request.include_execution_summary,
    };
    let callback_topic = request.intermediate_result_callback_topic.clone();
    let u = request.u.clone();
    let routing = Routing::with_fabric(shared.table.current(), shared.fabric.clone(), config.cluster_id.clone());
    match Plan::build(request, routing) {
        Ok(plan) => {
            let mut execution = Execution::new(plan, options, config.limits, Some(shared.metrics.clone()));
            if let Some(deadline) = started.checked_add(timeout) {
                execution = execution.with_deadline(deadline);
            }
            Ok(Prepared { ending: Ending { u, timeout, started, callback_topic }, execution })
        }
        Err(error) => Err((u, error)),
    }
}

fn response(u: String, result: Result<Outcome, RpcError>) -> RpcResponse {
    match result {
        Ok(outcome) => {
            let mut response = RpcResponse::success(u, outcome.r);
            response.intermediate_results = outcome.intermediate_results;
            response.execution_summary = outcome.execution_summary;
            response
        }
        Err(error) => RpcResponse::failure(Some(u), error),
    }
}

/// Encodes a response, noting how it ended.
fn answer(response: &RpcResponse) -> Answer {
    Answer { bytes: encode(response), error: response.error.as_ref().and_then(RpcError::kind) }
}

fn failed(u: String, error: RpcError) -> Answer {
    answer(&RpcResponse::failure(Some(u), error))
}

/// The 1003 of a request whose handling (not a function: those are guarded on their own)
/// panicked.
fn panicked(payload: &(dyn std::any::Any + Send)) -> RpcError {
    let text = panic_message(payload);
    warn!(cause = %text, "request handling panicked");
    RpcError::execution_failed(format!("Request handling failed: error=Panic: {text}"))
}

impl Prepared {
    /// Runs a request that waits for something, as a task on the connection's thread;
    /// if it builds too much here, the rest runs on the Planner.
    async fn run(self, shared: &Arc<NodeShared>) -> Answer {
        let Prepared { ending, execution } = self;
        let placement = Placement::InPlace { pause_above: shared.config.planner_offload_bytes as u64 };
        match ending.finish(shared, execution, placement).await {
            Step::Finished(result) => answer(&response(ending.u, result)),
            Step::Paused(execution) => {
                let u = ending.u.clone();
                on_planner(shared, u, resumed(shared.clone(), execution, ending)).await
            }
        }
    }
}

/// A job for the Planner: plan and run `request` there.
fn offloaded(shared: Arc<NodeShared>, request: RpcRequest, started: Instant) -> Job {
    Box::new(move || {
        async move {
            match prepare(&shared, request, started) {
                Ok(Prepared { ending, execution }) => run_to_end(&shared, execution, ending).await,
                Err((u, error)) => failed(u, error),
            }
        }
        .boxed_local()
    })
}

/// A job for the Planner: continue a run that paused on a connection's thread.
fn resumed(shared: Arc<NodeShared>, execution: Box<Execution>, ending: Ending) -> Job {
    Box::new(move || async move { run_to_end(&shared, *execution, ending).await }.boxed_local())
}

/// Runs `execution` to its end on the Planner's thread; the reply is encoded there too.
async fn run_to_end(shared: &NodeShared, execution: Execution, ending: Ending) -> Answer {
    let result = match ending.finish(shared, execution, Placement::Offloaded).await {
        Step::Finished(result) => result,
        Step::Paused(_) => Err(RpcError::invalid("an offloaded run never pauses")),
    };
    answer(&response(ending.u, result))
}

/// Runs `job` on the Planner. A Planner that is restarting, or a job that panicked, still
/// answers the request `u`.
async fn on_planner(shared: &NodeShared, u: String, job: Job) -> Answer {
    let Some(planner) = shared.planner.get() else {
        return failed(u, RpcError::unreachable("planner unavailable (restarting); retry"));
    };
    match planner.send(RunJob { job }).await {
        Ok(Some(answer)) => answer,
        Ok(None) => failed(u, RpcError::execution_failed("Request handling failed: error=Panic: planner job panicked")),
        Err(e) => failed(u, RpcError::unreachable(format!("planner unavailable: {e}; retry"))),
    }
}

/// Puts a message (`wrap` of `payload`) into `session` if it has room right now; hands the
/// payload back otherwise. Never blocks (polled with a no-op waker: nobody waits here, the
/// caller falls back to a queue).
pub(crate) fn write_now<T>(session: &mut Session, payload: T, wrap: fn(T) -> Message) -> Result<(), T> {
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    let mut session = Pin::new(session);
    match session.as_mut().poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {
            // A closed session drops the frame: there is nobody left to read it.
            if session.as_mut().start_send(wrap(payload)).is_ok() {
                let _ = session.poll_flush(&mut cx);
            }
            Ok(())
        }
        Poll::Ready(Err(_)) => Ok(()),
        Poll::Pending => Err(payload),
    }
}

/// Drains the outbox into the websocket, in order, until the connection closes. A frame's
/// bytes are released once the websocket took it, which is what lets the connection read
/// again (see [`crate::outbox`]).
async fn write_frames(
    mut frames: OutboxReceiver,
    mut closed: oneshot::Receiver<Option<CloseReason>>,
    mut session: Session,
) {
    loop {
        tokio::select! {
            biased;
            frame = frames.recv() => {
                let Some(frame) = frame else { break };
                // A client that does not read keeps this write waiting; the connection's
                // close must still get through, so the two race.
                let outcome = tokio::select! {
                    biased;
                    sent = async {
                        // A long message goes out in fragments that no direct write may split.
                        let _fragments = match frame.bytes.len() > FRAGMENT_BYTES {
                            true => Some(frames.fragments().await),
                            false => None,
                        };
                        write_frame(&mut session, &frame).await
                    } => Ok(sent),
                    reason = &mut closed => Err(reason.unwrap_or(None)),
                };
                frames.written(&frame);
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(reason) => return close_session(session, reason).await,
                }
            }
            reason = &mut closed => return close_session(session, reason.unwrap_or(None)).await,
        }
    }
    // Every sender is gone (the connection stopped): close with its reason, if it gave one.
    close_session(session, closed.try_recv().unwrap_or(None)).await;
}

/// How long a close frame may wait for room in the websocket: a client that does not read
/// would otherwise keep the writer (and the session) forever.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

async fn close_session(session: Session, reason: Option<CloseReason>) {
    let _ = tokio::time::timeout(CLOSE_WAIT, session.close(reason)).await;
}

/// The code that answers a client's close: its own, unless RFC 6455 (§7.4.1) forbids it in
/// a close frame (1005, 1006, 1015, or outside the ranges it defines), then 1002.
fn echoed_close_code(code: CloseCode) -> CloseCode {
    match u16::from(code) {
        1000..=1003 | 1007..=1014 | 3000..=4999 => code,
        _ => CloseCode::Protocol,
    }
}

/// What a websocket stream error means for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamFault {
    /// The transport failed or ended mid-frame: nobody is left to answer.
    Dropped,
    /// A text message that is not UTF-8 (close 1007).
    InvalidText,
    /// A frame, or a message's continuations together, over the hard size limit (close 1009).
    TooLarge,
    /// Any other violation of the websocket protocol (close 1002).
    Protocol,
}

impl StreamFault {
    /// Classifies an error of actix-ws's (aggregated) message stream. actix-ws reports bad
    /// UTF-8 as an `InvalidData` I/O error, an over-long continuation as an `Other` I/O
    /// error with a text message, and a transport failure as an I/O error wrapping the
    /// payload's error.
    fn of(error: &ProtocolError) -> Self {
        match error {
            ProtocolError::Overflow => StreamFault::TooLarge,
            ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => StreamFault::InvalidText,
            ProtocolError::Io(e) => match e.get_ref() {
                Some(inner) if inner.is::<actix_web::error::PayloadError>() => StreamFault::Dropped,
                Some(inner) if inner.to_string().contains("maximum continuation size") => StreamFault::TooLarge,
                _ => StreamFault::Dropped,
            },
            _ => StreamFault::Protocol,
        }
    }

    /// The close code and reason sent for this fault.
    fn close(self) -> (CloseCode, &'static str) {
        match self {
            StreamFault::InvalidText => (CloseCode::Invalid, "invalid UTF-8 in a text message"),
            StreamFault::TooLarge => (CloseCode::Size, "message too large"),
            StreamFault::Dropped | StreamFault::Protocol => (CloseCode::Protocol, "protocol error"),
        }
    }
}

/// The largest websocket frame the writer hands to actix-ws: a longer message goes out as
/// continuation frames of this size. actix-ws holds up to 32 messages in its channel and
/// actix-http one encoded batch of them in its write buffer, none of it counted in the
/// outbox; fragments keep that near 4 MiB per connection whatever the message size, while
/// the whole message stays counted in the outbox until its last fragment is handed over.
pub(crate) const FRAGMENT_BYTES: usize = 64 * 1024;

/// Writes one queued frame in the type the client used, in fragments when it is long.
/// Only this writer sends fragments, and nothing else writes a data frame while it does:
/// the fast paths need an idle outbox (the frame counts in it until written), and a
/// direct write from another thread also waits for the [`crate::outbox::Fragments`] guard.
async fn write_frame(session: &mut Session, frame: &OutFrame) -> Result<(), actix_ws::Closed> {
    let bytes = &frame.bytes;
    if bytes.len() <= FRAGMENT_BYTES {
        return write_whole(session, frame).await;
    }
    let first = bytes.slice(..FRAGMENT_BYTES);
    session
        .continuation(match frame.kind {
            FrameKind::Binary => Item::FirstBinary(first),
            FrameKind::Text => Item::FirstText(first),
        })
        .await?;
    let mut at = FRAGMENT_BYTES;
    while bytes.len() - at > FRAGMENT_BYTES {
        session.continuation(Item::Continue(bytes.slice(at..at + FRAGMENT_BYTES))).await?;
        at += FRAGMENT_BYTES;
    }
    session.continuation(Item::Last(bytes.slice(at..))).await
}

/// Writes one frame as a single websocket message.
async fn write_whole(session: &mut Session, frame: &OutFrame) -> Result<(), actix_ws::Closed> {
    match frame.kind {
        FrameKind::Binary => session.binary(frame.bytes.clone()).await,
        FrameKind::Text => match String::from_utf8(frame.bytes.to_vec()) {
            Ok(text) => session.text(text).await,
            Err(_) => session.binary(frame.bytes.clone()).await,
        },
    }
}

/// Drains a fabric link's queue into the websocket until the fabric drops the link or the
/// websocket closes. Whole messages only: the client writer may fragment on the same
/// websocket, and two fragmented messages must not interleave.
async fn write_link_frames(
    mut frames: OutboxReceiver,
    mut closed: oneshot::Receiver<CloseReason>,
    mut session: Session,
) {
    loop {
        tokio::select! {
            biased;
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                if write_whole(&mut session, &frame).await.is_err() {
                    return;
                }
                frames.written(&frame);
            }
            reason = &mut closed => {
                // Whatever the fabric queued before it asked for the close goes out first.
                while let Ok(frame) = frames.try_recv() {
                    if write_whole(&mut session, &frame).await.is_err() {
                        return;
                    }
                }
                let _ = session.close(reason.ok()).await;
                return;
            }
        }
    }
}

impl Actor for Connection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.shared.metrics.connections_changed(1);
        debug!(conn = self.id, peer = %self.peer, "connection opened");
        if self.place.reserved {
            ctx.run_later(RESERVED_PLACE_GRACE, |act, ctx| {
                if act.link.is_none() {
                    act.shared.metrics.limit_exceeded("max_connections");
                    let max = act.shared.config.max_connections;
                    let reason = format!("too many connections: max_connections ({max}) reached; retry later");
                    act.close_with(CloseCode::Again, &reason, ctx);
                }
            });
        }
        ctx.run_interval(self.shared.config.heartbeat_interval, |act, ctx| {
            if std::mem::take(&mut act.heard) {
                act.silent_ticks = 0;
            } else {
                act.silent_ticks += 1;
            }
            let silent = act.shared.config.heartbeat_interval * act.silent_ticks;
            if silent >= act.shared.config.client_timeout {
                info!(conn = act.id, peer = %act.peer, "client silent past client_timeout; closing");
                act.close_with(CloseCode::Away, "idle timeout", ctx);
                return;
            }
            if act.ping_waiting {
                return; // the last ping is still waiting for room: the client is not reading
            }
            act.ping_waiting = true;
            let mut session = act.session.clone();
            let ping = async move { drop(session.ping(b"mpreg").await) }.into_actor(act);
            ctx.spawn(ping.map(|_, act, _| act.ping_waiting = false));
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shared.metrics.connections_changed(-1);
        if let Some(link) = self.link {
            self.shared.fabric.link_closed(link);
            if let Some(gossip) = self.shared.fabric.gossip.get() {
                gossip.do_send(LinkClosed { link, on_purpose: self.closed_on_purpose });
            }
        }
        if let Some(pubsub) = self.shared.pubsub.get() {
            pubsub.do_send(pubsub::ConnectionClosed { conn: self.id });
        }
        if let Some(queue) = self.shared.queue.get() {
            queue.do_send(ConnectionGone { conn: self.id });
        }
        self.shared.fabric.queue_connection_closed(self.id);
        if let Some(worker) = self.worker.take() {
            self.shared.workers.remove(worker, self.worker_lane, self.worker_leaving);
        }
        if let Some(close) = self.close.take() {
            let _ = close.send(None);
        }
        debug!(conn = self.id, "connection closed");
    }
}

impl Handler<CloseLink> for Connection {
    type Result = ();

    fn handle(&mut self, msg: CloseLink, ctx: &mut Context<Self>) {
        let (code, why) = if msg.on_purpose {
            (CloseCode::Other(CLOSED_ON_PURPOSE), "link closed by fabric")
        } else {
            (CloseCode::Restart, "fabric stopping")
        };
        let reason = CloseReason { code, description: Some(why.to_owned()) };
        match self.link_close.take().map(|close| close.send(reason)) {
            // The link's writer flushes what is queued, then closes the socket, which ends
            // the stream and stops this actor; a writer stuck on a peer that does not read
            // is cut short after a grace period.
            Some(Ok(())) => {
                ctx.run_later(LINK_CLOSE_GRACE, move |act, ctx| act.close_with(code, why, ctx));
            }
            _ => self.close_with(code, why, ctx),
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for Connection {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Context<Self>) {
        self.heard = true;
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_frame(text.into_bytes(), FrameKind::Text, ctx),
            Ok(AggregatedMessage::Binary(bytes)) => self.on_frame(bytes, FrameKind::Binary, ctx),
            Ok(AggregatedMessage::Ping(payload)) => {
                self.heard_on_link();
                self.on_ping(payload, ctx);
            }
            Ok(AggregatedMessage::Pong(_)) => self.heard_on_link(),
            Ok(AggregatedMessage::Close(reason)) => self.on_close(reason, ctx),
            Err(e) => match StreamFault::of(&e) {
                StreamFault::Dropped => {
                    // The peer went away mid-frame (or without a close frame): nothing to answer.
                    debug!(conn = self.id, peer = %self.peer, cause = %e, "connection dropped");
                    ctx.stop();
                }
                fault => {
                    // The codec cannot resynchronise after a bad frame: answer, then close
                    // with the code RFC 6455 gives the fault.
                    warn!(conn = self.id, peer = %self.peer, cause = %e, "websocket protocol error; closing");
                    let (code, reason) = fault.close();
                    if code == CloseCode::Size {
                        self.shared.metrics.limit_exceeded("max_frame_bytes");
                    }
                    let error = RpcError::invalid(format!("websocket protocol error: {e}"));
                    self.shared.metrics.record_outcome(error.kind());
                    self.reply(encode(&RpcResponse::failure(None, error)), FrameKind::Binary, ctx);
                    self.close_with(code, reason, ctx);
                }
            },
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use actix_web::error::PayloadError;

    use super::*;

    #[test]
    fn a_close_is_answered_with_its_own_code_unless_the_code_may_not_be_sent() {
        for code in [1000u16, 1001, 1003, 1008, 1011, 3000, 4999] {
            assert_eq!(u16::from(echoed_close_code(CloseCode::from(code))), code);
        }
        for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(u16::from(echoed_close_code(CloseCode::from(code))), 1002, "{code}");
        }
    }

    #[test]
    fn stream_faults_close_with_the_code_rfc_6455_gives_them() {
        let io = ProtocolError::Io;
        let cases = [
            (io(io::Error::new(io::ErrorKind::InvalidData, "invalid utf-8")), StreamFault::InvalidText, 1007),
            // As actix-ws reports an aggregated message over `max_continuation_size`.
            (io(io::Error::other("Exceeded maximum continuation size")), StreamFault::TooLarge, 1009),
            (ProtocolError::Overflow, StreamFault::TooLarge, 1009),
            (ProtocolError::InvalidOpcode(3), StreamFault::Protocol, 1002),
            (ProtocolError::UnmaskedFrame, StreamFault::Protocol, 1002),
        ];
        for (error, fault, code) in cases {
            assert_eq!(StreamFault::of(&error), fault, "{error}");
            assert_eq!(u16::from(fault.close().0), code, "{error}");
        }
        let dropped = io(io::Error::other(PayloadError::Incomplete(None)));
        assert_eq!(StreamFault::of(&dropped), StreamFault::Dropped);
    }
}
