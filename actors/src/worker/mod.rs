//! Workers: processes in any language that serve functions over a node's websocket.
//!
//! A worker connects like a client, sends `worker-register` (see [`wire`] for every
//! frame), and from then on its connection carries `worker-call`s to it and
//! `worker-result`s back. Its functions enter the Registry as external functions
//! ([`FunctionSpec::external`]), so the node treats them like its own: they are in the
//! catalog, routed to from every node by name, resources and version, and take part in
//! DAGs. Several workers may serve the same function; they share one registry entry and
//! a call goes to the one with the fewest calls in flight that is under its
//! `max_concurrency`. When every one is at its bound the call waits, within its deadline,
//! for the first free slot.
//!
//! Failure: a worker that disconnects, says `worker-goodbye` or stays silent past
//! `worker_timeout_s` leaves at once: when it was the last to serve a function, that
//! function leaves the registry (and so the catalog). Its calls in flight are retried once
//! on another worker serving the same function, else fail with
//! [`FunctionError::unreachable`] — a 1005 for the client, or a retry on another node
//! when the call came from one. A function error a worker reports is the usual 1003,
//! its text ending with `(worker=NAME)`.
//!
//! Trust: with node credentials, a worker must present the node's worker token
//! (`worker_token_file`); a node with credentials and no token accepts no worker.
//!
//! The bookkeeping (who serves what, who is busy, whom to pick) is [`WorkerPool`]: no
//! I/O, no clock, unit-tested. [`WorkerHub`] wraps it with the connections' outboxes (a
//! call is written straight into the worker's websocket from the caller's thread when
//! nothing is queued there) and the calls waiting for answers; connections and the
//! Registry share it.
//!
//! Lanes: a worker may open more websockets (`worker-lane`, as many as the node has
//! listener threads but one). Each websocket is served by one node thread; a call goes
//! out on the worker's websocket served by the caller's own thread when there is one, so
//! the call, the worker's answer and the reply to the client stay on one thread, with no
//! wake-up of a second one. A worker is one worker whatever its lanes: one
//! `max_concurrency`, one entry in `/catalog`; losing any of its websockets loses the
//! worker (the others are closed), as its calls in flight there cannot be answered.

pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use actix_ws::{CloseCode, CloseReason, Message, Session};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use crate::connection::{write_now, FRAGMENT_BYTES};
use crate::function::{CallArgs, FunctionError, FunctionIdentity, FunctionResult, FunctionSpec};
use crate::metrics::{label_value, Metrics};
use crate::outbox::{OutFrame, Outbox};
use crate::protocol::{encode, FrameKind, RpcError};
use crate::registry::{RegisterFunctions, Registry, RegistryError, UnregisterFunctions};
use crate::supervisor::Slot;
use crate::version::Version;
use wire::{cancel_frame, CallFrame, LaneFrame, RegisterFrame, RegisteredFrame, ResultFrame};

/// A worker's id on this node.
pub type WorkerId = u64;

/// Bounds and identity, from the node's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Workers registered at once (1006 beyond).
    pub max_workers: usize,
    /// Functions one worker registers (1002 beyond).
    pub max_functions_per_worker: usize,
    /// A worker's concurrency when it names none, and the most it may name.
    pub max_concurrency: usize,
    /// How often a worker is asked to send a frame.
    pub heartbeat: Duration,
    /// A worker silent for this long is disconnected.
    pub timeout: Duration,
    /// How long a call without a deadline waits (the node's request timeout).
    pub default_deadline: Duration,
    /// The token a worker must present, if any.
    pub token: Option<String>,
    /// Whether the node has credentials: then a worker must present `token`.
    pub token_required: bool,
    /// Extra websockets (lanes) a worker may open: the node's listener threads but one.
    pub lanes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_workers: 64,
            max_functions_per_worker: 64,
            max_concurrency: 64,
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            default_deadline: Duration::from_secs(30),
            token: None,
            token_required: false,
            lanes: 0,
        }
    }
}

/// Longest worker name, function name, id or resource, in bytes.
const MAX_NAME_BYTES: usize = 256;
/// Most resources one function may list.
const MAX_RESOURCES: usize = 64;

/// One worker's load and what it serves.
#[derive(Debug, Clone)]
struct WorkerLoad {
    in_flight: usize,
    max_concurrency: usize,
    functions: Vec<FunctionIdentity>,
    /// Said goodbye: gets no new calls.
    draining: bool,
}

/// What [`WorkerPool::pick`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// This worker takes the call (its in-flight count is already raised).
    Worker(WorkerId),
    /// Workers serve it, but all are at their max concurrency: wait for a slot.
    Busy,
    /// No (other) worker serves it.
    Nobody,
}

/// Who serves what and how busy each worker is. No I/O, no clock.
#[derive(Debug, Default)]
pub struct WorkerPool {
    workers: HashMap<WorkerId, WorkerLoad>,
    serving: BTreeMap<FunctionIdentity, Vec<WorkerId>>,
    /// Rotates ties between equally loaded workers.
    turn: usize,
}

impl WorkerPool {
    /// Adds a worker serving `functions`; the identities nobody served before it.
    pub fn add(
        &mut self,
        id: WorkerId,
        functions: Vec<FunctionIdentity>,
        max_concurrency: usize,
    ) -> Vec<FunctionIdentity> {
        let mut new = Vec::new();
        for identity in &functions {
            let serving = self.serving.entry(identity.clone()).or_default();
            if serving.is_empty() {
                new.push(identity.clone());
            }
            serving.push(id);
        }
        self.workers.insert(id, WorkerLoad { in_flight: 0, max_concurrency, functions, draining: false });
        new
    }

    /// Stops sending calls to `id` (it stays until [`Self::remove`]); the identities no
    /// other worker serves now.
    pub fn drain(&mut self, id: WorkerId) -> Vec<FunctionIdentity> {
        let Some(load) = self.workers.get_mut(&id) else { return Vec::new() };
        load.draining = true;
        let functions = load.functions.clone();
        self.orphans(id, functions)
    }

    /// Removes `id`; the identities no other worker serves now.
    pub fn remove(&mut self, id: WorkerId) -> Vec<FunctionIdentity> {
        let Some(load) = self.workers.remove(&id) else { return Vec::new() };
        self.orphans(id, load.functions)
    }

    fn orphans(&mut self, id: WorkerId, functions: Vec<FunctionIdentity>) -> Vec<FunctionIdentity> {
        let mut orphaned = Vec::new();
        for identity in functions {
            if let Some(serving) = self.serving.get_mut(&identity) {
                serving.retain(|w| *w != id);
                if serving.is_empty() {
                    self.serving.remove(&identity);
                    orphaned.push(identity);
                }
            }
        }
        orphaned
    }

    /// Whether any worker serves `identity`.
    pub fn serves(&self, identity: &FunctionIdentity) -> bool {
        self.serving.contains_key(identity)
    }

    /// The worker for a call of `identity`: fewest in flight among those under their max
    /// concurrency, skipping `tried`; ties rotate.
    pub fn pick(&mut self, identity: &FunctionIdentity, tried: &[WorkerId]) -> Pick {
        let Some(serving) = self.serving.get(identity) else { return Pick::Nobody };
        let candidates: Vec<WorkerId> = serving.iter().copied().filter(|w| !tried.contains(w)).collect();
        if candidates.is_empty() {
            return Pick::Nobody;
        }
        self.turn = self.turn.wrapping_add(1);
        let n = candidates.len();
        let best = (0..n)
            .map(|k| candidates[(k + self.turn) % n])
            .filter_map(|w| self.workers.get(&w).map(|load| (w, load)))
            .filter(|(_, load)| !load.draining && load.in_flight < load.max_concurrency)
            .min_by_key(|(_, load)| load.in_flight)
            .map(|(w, _)| w);
        match best.and_then(|w| self.workers.get_mut(&w).map(|load| (w, load))) {
            Some((w, load)) => {
                load.in_flight += 1;
                Pick::Worker(w)
            }
            None => Pick::Busy,
        }
    }

    /// A call on `id` ended (answered, lost or abandoned).
    pub fn finished(&mut self, id: WorkerId) {
        if let Some(load) = self.workers.get_mut(&id) {
            load.in_flight = load.in_flight.saturating_sub(1);
        }
    }

    /// Workers registered.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

/// One websocket of a worker: the one it registered on, or a lane.
struct WorkerConn {
    /// The node thread serving it: calls made on that thread go out here.
    thread: ThreadId,
    outbox: Outbox,
    /// The websocket: a call goes straight into it when its outbox is idle, sparing the
    /// connection's writer task a wake-up.
    session: Session,
    kind: FrameKind,
}

/// A worker's connections: where its calls go, and the calls waiting for its answers.
struct WorkerLink {
    name: String,
    /// The registering websocket first, then the lanes (never removed while it lives).
    conns: Vec<WorkerConn>,
    /// What a `worker-lane` must present.
    lane_key: String,
    /// Calls waiting for answers, with the index in `conns` each went out on (where its
    /// cancel goes too).
    pending: HashMap<String, (oneshot::Sender<FunctionResult>, usize)>,
}

#[derive(Default)]
struct HubState {
    pool: WorkerPool,
    links: HashMap<WorkerId, WorkerLink>,
}

/// Calls answered by workers, by outcome; and workers gone, by reason.
#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    error: AtomicU64,
    lost: AtomicU64,
    abandoned: AtomicU64,
    registered: AtomicU64,
    left: Mutex<BTreeMap<&'static str, u64>>,
}

/// One worker as `/catalog` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Id on this node.
    pub worker_id: String,
    /// Its name.
    pub name: String,
    /// Calls it runs now.
    pub in_flight: usize,
    /// Its bound.
    pub max_concurrency: usize,
    /// Whether it said goodbye.
    pub draining: bool,
    /// What it serves.
    pub functions: Vec<FunctionIdentity>,
}

/// Why a worker left, for the log and `mpreg_workers_left_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// `worker-goodbye`, then the websocket closed.
    Goodbye,
    /// The websocket closed (or broke) without a goodbye.
    Disconnected,
    /// Silent past `worker_timeout_s`.
    MissedHeartbeats,
    /// Sent a frame that is not the worker protocol.
    ProtocolError,
}

impl LeaveReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LeaveReason::Goodbye => "goodbye",
            LeaveReason::Disconnected => "disconnected",
            LeaveReason::MissedHeartbeats => "missed_heartbeats",
            LeaveReason::ProtocolError => "protocol_error",
        }
    }
}

/// The node's workers: registration, dispatch, results, departures. Shared by every
/// connection (through `NodeShared`) and by the external functions in the Registry.
pub struct WorkerHub {
    config: WorkerConfig,
    registry: Slot<Registry>,
    metrics: Arc<Metrics>,
    state: Mutex<HubState>,
    /// Woken when a slot frees or a worker leaves: calls waiting for capacity look again.
    capacity: Notify,
    /// Registry changes happen one at a time, so "first to serve" and "last to leave"
    /// are decided against a registry that agrees with the pool.
    registering: tokio::sync::Mutex<()>,
    next_worker: AtomicU64,
    next_call: AtomicU64,
    counters: Counters,
}

impl WorkerHub {
    /// A hub registering worker functions through `registry`.
    pub fn new(config: WorkerConfig, registry: Slot<Registry>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(WorkerHub {
            config,
            registry,
            metrics,
            state: Mutex::new(HubState::default()),
            capacity: Notify::new(),
            registering: tokio::sync::Mutex::new(()),
            next_worker: AtomicU64::new(1),
            next_call: AtomicU64::new(1),
            counters: Counters::default(),
        })
    }

    /// The settings it runs with.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Reserves a worker id for a connection about to register, so that the connection's
    /// end removes it whatever point the registration reached; `None` (counted) when the
    /// node has `max_workers` already.
    pub fn reserve(&self, outbox: Outbox, session: Session, kind: FrameKind) -> Option<WorkerId> {
        let mut state = self.lock();
        if state.links.len() >= self.config.max_workers {
            drop(state);
            self.metrics.limit_exceeded("max_workers");
            return None;
        }
        let id = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let conn = WorkerConn { thread: std::thread::current().id(), outbox, session, kind };
        let lane_key = format!("{:032x}", rand::random::<u128>());
        state
            .links
            .insert(id, WorkerLink { name: String::new(), conns: vec![conn], lane_key, pending: HashMap::new() });
        Some(id)
    }

    /// Adds the websocket a `worker-lane` came on (served by the calling thread) to its
    /// registered worker: its `worker-registered` is queued on `outbox` before any call
    /// can be. The worker's id and the lane's index (for [`Self::remove`]); a refusal
    /// (1002) for a worker this node does not have, a wrong key, or one lane too many.
    pub fn add_lane(
        &self,
        frame: &LaneFrame,
        outbox: Outbox,
        session: Session,
        kind: FrameKind,
    ) -> Result<(WorkerId, usize), RpcError> {
        let mut state = self.lock();
        let id = frame.worker_id.parse::<WorkerId>().ok().filter(|id| state.pool.workers.contains_key(id));
        let Some((id, link)) = id.and_then(|id| state.links.get_mut(&id).map(|link| (id, link))) else {
            return Err(RpcError::invalid(format!("no worker {:?} registered on this node", frame.worker_id)));
        };
        if !same_secret(frame.lane_key.as_bytes(), link.lane_key.as_bytes()) {
            self.metrics.peer_refused("worker_lane_key");
            return Err(RpcError::invalid("wrong lane_key"));
        }
        if link.conns.len() > self.config.lanes {
            self.metrics.limit_exceeded("worker_lanes");
            return Err(RpcError::invalid(format!("a worker opens at most {} lanes on this node", self.config.lanes)));
        }
        let reply = RegisteredFrame {
            role: "worker-registered",
            u: frame.u.clone(),
            worker_id: Some(id.to_string()),
            heartbeat_s: Some(self.config.heartbeat.as_secs_f64()),
            max_concurrency: None,
            lanes: None,
            lane_key: None,
            error: None,
        };
        let _ = outbox.queue(OutFrame { bytes: Bytes::from(encode(&reply)), kind });
        link.conns.push(WorkerConn { thread: std::thread::current().id(), outbox, session, kind });
        Ok((id, link.conns.len() - 1))
    }

    /// The refusal of a `worker-register` at the `max_workers` bound.
    pub fn too_many(&self, u: String) -> RegisteredFrame {
        let max = self.config.max_workers;
        RegisteredFrame::refused(
            u,
            RpcError::peer_overloaded(format!("this node already has max_workers ({max}) workers")),
        )
    }

    /// Registers the reserved worker `id`. All or nothing: a refused function refuses the
    /// whole registration (and releases `id`). On success the `worker-registered` frame is
    /// queued on the worker's outbox before any call can be; a refusal is returned for the
    /// caller to send. Run it to completion (spawned): it changes the registry.
    pub async fn register(self: Arc<Self>, id: WorkerId, frame: RegisterFrame) -> Result<(), RegisteredFrame> {
        let u = frame.u.clone();
        let refuse = |error: RpcError| {
            self.lock().links.remove(&id);
            RegisteredFrame::refused(u.clone(), error)
        };
        let (identities, max_concurrency) = match self.validate(&frame) {
            Ok(valid) => valid,
            Err(error) => return Err(refuse(error)),
        };
        let _serial = self.registering.lock().await;
        // Functions nobody serves yet enter the registry (which refuses conflicts with the
        // node's own functions); the others gain a worker.
        let fresh: Vec<FunctionIdentity> =
            identities.iter().filter(|identity| !self.lock().pool.serves(identity)).cloned().collect();
        // One registry change: the worker's functions reach other nodes in one catalog update.
        let specs: Vec<FunctionSpec> = fresh.iter().map(|identity| self.external_spec(identity.clone())).collect();
        let failure = if specs.is_empty() {
            None
        } else {
            let outcome = self
                .registry
                .send(|| RegisterFunctions { specs: specs.clone() })
                .await
                .unwrap_or(Err((0, RegistryError::Unavailable)));
            outcome.err().map(|(i, e)| {
                let name = fresh.get(i).map_or("?", |identity| identity.name.as_str());
                RpcError::invalid(format!("function {name}: {e}"))
            })
        };
        let lanes = self.config.lanes;
        let mut reply = RegisteredFrame {
            role: "worker-registered",
            u: u.clone(),
            worker_id: Some(id.to_string()),
            heartbeat_s: Some(self.config.heartbeat.as_secs_f64()),
            max_concurrency: Some(max_concurrency),
            lanes: (lanes > 0).then_some(lanes),
            lane_key: None,
            error: None,
        };
        let accepted = failure.is_none() && {
            let mut state = self.lock();
            match state.links.get_mut(&id) {
                // The connection ended meanwhile: nothing to add.
                None => false,
                Some(link) => {
                    link.name.clone_from(&frame.name);
                    if lanes > 0 {
                        reply.lane_key = Some(link.lane_key.clone());
                    }
                    // Queued before the worker can be picked, so it precedes every call.
                    let bytes = Bytes::from(encode(&reply));
                    let conn = &link.conns[0];
                    let _ = conn.outbox.queue(OutFrame { bytes, kind: conn.kind });
                    state.pool.add(id, identities.clone(), max_concurrency);
                    true
                }
            }
        };
        if !accepted {
            if failure.is_none() {
                let _ = self.registry.send(|| UnregisterFunctions { identities: fresh.clone() }).await;
            }
            return Err(refuse(failure.unwrap_or_else(|| RpcError::unreachable("the worker's connection closed"))));
        }
        self.counters.registered.fetch_add(1, Ordering::Relaxed);
        self.capacity.notify_waiters();
        info!(worker = %frame.name, worker_id = id, functions = identities.len(), max_concurrency, "worker registered");
        Ok(())
    }

    /// Checks a registration against the bounds and the token; its identities and the
    /// concurrency granted.
    fn validate(&self, frame: &RegisterFrame) -> Result<(Vec<FunctionIdentity>, usize), RpcError> {
        if self.config.token_required || self.config.token.is_some() {
            let Some(expected) = &self.config.token else {
                return Err(RpcError::invalid(
                    "this node has credentials and no worker_token_file: it accepts no worker",
                ));
            };
            if !frame.token.as_deref().is_some_and(|given| same_secret(given.as_bytes(), expected.as_bytes())) {
                self.metrics.peer_refused("worker_token");
                return Err(RpcError::invalid("worker token missing or wrong (see worker_token_file)"));
            }
        }
        let bounded = |what: &str, text: &str| {
            if text.is_empty() || text.len() > MAX_NAME_BYTES {
                self.metrics.limit_exceeded("worker_name_bytes");
                Err(RpcError::invalid(format!("{what} must be 1 to {MAX_NAME_BYTES} bytes, got {}", text.len())))
            } else {
                Ok(())
            }
        };
        bounded("worker name", &frame.name)?;
        let limit = self.config.max_functions_per_worker;
        if frame.functions.is_empty() || frame.functions.len() > limit {
            if !frame.functions.is_empty() {
                self.metrics.limit_exceeded("max_functions_per_worker");
            }
            return Err(RpcError::invalid(format!(
                "a worker registers 1 to max_functions_per_worker ({limit}) functions, got {}",
                frame.functions.len()
            )));
        }
        let mut identities: Vec<FunctionIdentity> = Vec::with_capacity(frame.functions.len());
        for f in &frame.functions {
            bounded("function name", &f.name)?;
            let function_id = f.function_id.clone().unwrap_or_else(|| f.name.clone());
            bounded("function_id", &function_id)?;
            if f.resources.len() > MAX_RESOURCES {
                self.metrics.limit_exceeded("worker_resources");
                return Err(RpcError::invalid(format!("function {}: more than {MAX_RESOURCES} resources", f.name)));
            }
            for r in &f.resources {
                bounded("resource", r)?;
            }
            let version = match &f.version {
                Some(text) => text
                    .parse::<Version>()
                    .map_err(|e| RpcError::invalid(format!("function {}: version {text:?}: {e}", f.name)))?,
                None => Version::default(),
            };
            let identity =
                FunctionIdentity { name: f.name.clone(), function_id, version, resources: f.resources.clone() };
            if identities.iter().any(|i| i.name == identity.name && i.version == identity.version) {
                return Err(RpcError::invalid(format!("function {} {} listed twice", f.name, identity.version)));
            }
            identities.push(identity);
        }
        let max_concurrency = match frame.max_concurrency {
            None => self.config.max_concurrency,
            Some(0) => return Err(RpcError::invalid("max_concurrency must be at least 1")),
            Some(n) => n.min(self.config.max_concurrency),
        };
        Ok((identities, max_concurrency))
    }

    /// The registry entry of a function workers serve: its body dispatches to them.
    fn external_spec(self: &Arc<Self>, identity: FunctionIdentity) -> FunctionSpec {
        // Weak: the registry (and so the table) must not keep the hub alive.
        let hub = Arc::downgrade(self);
        let target = identity.clone();
        FunctionSpec::external(identity, move |call| {
            let (hub, identity) = (hub.clone(), target.clone());
            Box::pin(async move {
                match hub.upgrade() {
                    Some(hub) => hub.call(&identity, call).await,
                    None => Err(FunctionError::unreachable("the node's worker hub is gone")),
                }
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // A panic while holding this lock leaves plain bookkeeping behind: keep using it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one call on a worker serving `identity`: the least loaded with room, waiting
    /// within the deadline for room; retried once on another worker when the first one
    /// goes away before answering.
    pub async fn call(&self, identity: &FunctionIdentity, call: CallArgs) -> FunctionResult {
        let deadline = call.deadline.unwrap_or_else(|| Instant::now() + self.config.default_deadline);
        let mut tried: Vec<WorkerId> = Vec::new();
        let mut lost_on = String::new();
        loop {
            let worker = match self.wait_for_worker(identity, &tried, deadline).await {
                Ok(worker) => worker,
                Err(e) if !tried.is_empty() && e.is_unreachable() => {
                    self.counters.lost.fetch_add(1, Ordering::Relaxed);
                    return Err(FunctionError::unreachable(format!(
                        "worker {lost_on} went away before answering and no other worker serves {}",
                        identity.name
                    )));
                }
                Err(e) => return Err(e),
            };
            match self.run_on(worker, identity, &call, deadline).await {
                Attempt::Answered(result) => return result,
                Attempt::Lost(name) => {
                    debug!(worker = %name, fun = %identity.name, "worker gone mid-call; retrying once");
                    lost_on = name;
                    tried.push(worker);
                    if tried.len() >= 2 {
                        self.counters.lost.fetch_add(1, Ordering::Relaxed);
                        return Err(FunctionError::unreachable(format!(
                            "workers serving {} went away before answering (last: {lost_on})",
                            identity.name
                        )));
                    }
                }
            }
        }
    }

    async fn wait_for_worker(
        &self,
        identity: &FunctionIdentity,
        tried: &[WorkerId],
        deadline: Instant,
    ) -> Result<WorkerId, FunctionError> {
        loop {
            let notified = self.capacity.notified();
            tokio::pin!(notified);
            // Registered before looking, so a slot freed in between is not missed.
            notified.as_mut().enable();
            match self.lock().pool.pick(identity, tried) {
                Pick::Worker(worker) => return Ok(worker),
                Pick::Nobody => {
                    return Err(FunctionError::unreachable(format!("no worker serves {} any more", identity.name)))
                }
                Pick::Busy => {}
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                return Err(FunctionError::deadline_passed(format!(
                    "every worker serving {} stayed at its max_concurrency until the deadline",
                    identity.name
                )));
            }
        }
    }

    /// Sends the call to `worker` (whose in-flight count `pick` raised) and waits.
    async fn run_on(
        &self,
        worker: WorkerId,
        identity: &FunctionIdentity,
        call: &CallArgs,
        deadline: Instant,
    ) -> Attempt {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed).to_string();
        let (reply, answer) = oneshot::channel();
        let mut slot = CallSlot { hub: self, worker, id: id.clone(), answered: false };
        let timeout_ms = crate::fabric::link::millis_left(deadline, Instant::now());
        let encoded = encode(&CallFrame::new(&id, identity, &call.args, &call.kwargs, timeout_ms));
        let here = std::thread::current().id();
        let Some((name, queue)) = ({
            let mut state = self.lock();
            state.links.get_mut(&worker).map(|link| {
                // The websocket served by this thread, if the worker has one: no hand-off.
                let lane = link.conns.iter().position(|conn| conn.thread == here).unwrap_or(0);
                link.pending.insert(id.clone(), (reply, lane));
                let conn = &mut link.conns[lane];
                let queue = match direct_write(conn, encoded) {
                    Ok(()) => None,
                    Err(bytes) => Some((conn.outbox.clone(), OutFrame { bytes, kind: conn.kind })),
                };
                (link.name.clone(), queue)
            })
        }) else {
            return Attempt::Lost(format!("#{worker}"));
        };
        if let Some((outbox, frame)) = queue {
            if outbox.send(frame).await.is_err() {
                return Attempt::Lost(name);
            }
        }
        let outcome = match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => return Attempt::Lost(name),
            Err(_) => {
                // The request's own timeout answers the client; the slot's drop tells the worker.
                self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                let late = format!("worker {name} did not answer before the deadline");
                return Attempt::Answered(Err(FunctionError::deadline_passed(late)));
            }
        };
        slot.answered = true;
        Attempt::Answered(match outcome {
            Ok(value) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                Ok(value)
            }
            Err(error) => {
                self.counters.error.fetch_add(1, Ordering::Relaxed);
                Err(FunctionError::new(error.kind, format!("{} (worker={name})", error.message)))
            }
        })
    }

    /// A `worker-result` from `worker`. A result for no waiting call (cancelled, timed
    /// out) is ignored.
    pub fn result(&self, worker: WorkerId, frame: ResultFrame) {
        let waiting = self.lock().links.get_mut(&worker).and_then(|link| link.pending.remove(&frame.id));
        let Some((waiting, _)) = waiting else {
            debug!(worker_id = worker, id = %frame.id, "result for no waiting call; ignored");
            return;
        };
        let _ = waiting.send(match frame.error {
            Some(error) => Err(error),
            None => Ok(frame.result),
        });
    }

    /// `worker-goodbye`: no new calls; its functions leave now if nobody else serves them.
    pub fn goodbye(self: &Arc<Self>, worker: WorkerId) {
        let orphaned = self.lock().pool.drain(worker);
        info!(worker_id = worker, "worker said goodbye");
        self.capacity.notify_waiters();
        self.unregister(orphaned);
    }

    /// One of the worker's connections (`lane`, as [`Self::add_lane`] numbered it; 0 for
    /// the registering one) ended: calls waiting on the worker are lost (and retried),
    /// its functions leave the registry if nobody else serves them, and its other
    /// connections are closed. After a goodbye, the worker left by `Goodbye` whatever
    /// connection ends first.
    pub fn remove(self: &Arc<Self>, worker: WorkerId, lane: usize, reason: LeaveReason) {
        let (orphaned, link, said_goodbye) = {
            let mut state = self.lock();
            let said_goodbye = state.pool.workers.get(&worker).is_some_and(|load| load.draining);
            (state.pool.remove(worker), state.links.remove(&worker), said_goodbye)
        };
        let Some(link) = link else { return };
        let reason = if said_goodbye && reason == LeaveReason::Disconnected { LeaveReason::Goodbye } else { reason };
        for (i, conn) in link.conns.into_iter().enumerate().filter(|(i, _)| *i != lane) {
            let description = Some(format!("worker left ({}): its connection {lane} ended", reason.label()));
            debug!(worker_id = worker, conn = i, "closing the worker's other connection");
            let close = CloseReason { code: CloseCode::Away, description };
            // At shutdown the listener's runtime may be gone already: the connection goes
            // with it, closed or not (spawning there would panic).
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { drop(conn.session.close(Some(close)).await) });
            }
        }
        let lost = link.pending.len();
        // Dropping the senders wakes every waiting call with "lost".
        drop(link.pending);
        self.capacity.notify_waiters();
        if let Ok(mut left) = self.counters.left.lock() {
            *left.entry(reason.label()).or_default() += 1;
        }
        match reason {
            LeaveReason::Goodbye => info!(worker = %link.name, worker_id = worker, "worker left"),
            _ => {
                warn!(worker = %link.name, worker_id = worker, reason = reason.label(), calls_lost = lost, "worker left")
            }
        }
        self.unregister(orphaned);
    }

    /// Takes functions nobody serves any more out of the registry, in one change (after
    /// any registration under way; those a new worker took over meanwhile stay).
    fn unregister(self: &Arc<Self>, identities: Vec<FunctionIdentity>) {
        if identities.is_empty() {
            return;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            let _serial = hub.registering.lock().await;
            let orphaned: Vec<FunctionIdentity> = {
                let state = hub.lock();
                identities.into_iter().filter(|identity| !state.pool.serves(identity)).collect()
            };
            if orphaned.is_empty() {
                return;
            }
            // One registry change: they leave other nodes' catalogs in one update.
            if hub.registry.send(|| UnregisterFunctions { identities: orphaned.clone() }).await.is_err() {
                warn!(functions = orphaned.len(), "registry unavailable: worker functions not unregistered");
            }
        });
    }

    /// This node's workers, for `/catalog`.
    pub fn describe(&self) -> Vec<WorkerStatus> {
        let state = self.lock();
        let mut all: Vec<WorkerStatus> = state
            .pool
            .workers
            .iter()
            .map(|(id, load)| WorkerStatus {
                worker_id: id.to_string(),
                name: state.links.get(id).map(|l| l.name.clone()).unwrap_or_default(),
                in_flight: load.in_flight,
                max_concurrency: load.max_concurrency,
                draining: load.draining,
                functions: load.functions.clone(),
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name).then(a.worker_id.cmp(&b.worker_id)));
        all
    }

    /// Appends the `mpreg_worker*` series to a `/metrics` body.
    pub fn render(&self, out: &mut String, node: &str) {
        let (workers, serving) = {
            let state = self.lock();
            let serving: Vec<(String, String, usize)> = state
                .pool
                .serving
                .iter()
                .map(|(identity, ws)| (label_value(&identity.name), identity.version.to_string(), ws.len()))
                .collect();
            (state.pool.len(), serving)
        };
        let _ = writeln!(out, "# HELP mpreg_workers Workers connected to this node.\n# TYPE mpreg_workers gauge");
        let _ = writeln!(out, "mpreg_workers{{node=\"{node}\"}} {workers}");
        let _ = writeln!(
            out,
            "# HELP mpreg_worker_function_workers Workers serving each function (served by a worker, not the node).\n\
             # TYPE mpreg_worker_function_workers gauge"
        );
        for (name, version, n) in serving {
            let _ = writeln!(
                out,
                "mpreg_worker_function_workers{{node=\"{node}\",fun=\"{name}\",version=\"{version}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mpreg_worker_calls_total Calls sent to workers, by outcome.\n# TYPE mpreg_worker_calls_total counter"
        );
        let c = &self.counters;
        for (outcome, counter) in [("ok", &c.ok), ("error", &c.error), ("lost", &c.lost), ("abandoned", &c.abandoned)] {
            let _ = writeln!(
                out,
                "mpreg_worker_calls_total{{node=\"{node}\",outcome=\"{outcome}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mpreg_workers_registered_total Workers accepted.\n# TYPE mpreg_workers_registered_total counter\n\
             mpreg_workers_registered_total{{node=\"{node}\"}} {}",
            c.registered.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mpreg_workers_left_total Workers gone, by reason.\n# TYPE mpreg_workers_left_total counter"
        );
        if let Ok(left) = c.left.lock() {
            for (reason, n) in left.iter() {
                let _ = writeln!(out, "mpreg_workers_left_total{{node=\"{node}\",reason=\"{reason}\"}} {n}");
            }
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Writes an encoded call straight into the worker's websocket when its outbox is idle
/// and the message needs no fragments; otherwise its bytes come back, to be queued.
fn direct_write(conn: &mut WorkerConn, encoded: Vec<u8>) -> Result<(), Bytes> {
    if encoded.len() > FRAGMENT_BYTES {
        return Err(Bytes::from(encoded));
    }
    let WorkerConn { outbox, session, kind, .. } = conn;
    match kind {
        FrameKind::Binary => {
            outbox.write_if_idle(Bytes::from(encoded), |bytes| write_now(session, bytes, Message::Binary))
        }
        // The node's JSON is UTF-8: the check does not copy, and cannot fail.
        FrameKind::Text => match String::from_utf8(encoded) {
            Ok(text) => outbox
                .write_if_idle(text, |text| write_now(session, text, |text| Message::Text(text.into())))
                .map_err(|text| Bytes::from(text.into_bytes())),
            Err(e) => Err(Bytes::from(e.into_bytes())),
        },
    }
}

/// How one attempt on one worker ended.
enum Attempt {
    /// The worker answered (or the deadline passed).
    Answered(FunctionResult),
    /// The worker went away first (its name).
    Lost(String),
}

/// A call sent to a worker: however it ends, the worker's slot is given back, and a call
/// nobody waits for any more is cancelled on the worker.
struct CallSlot<'a> {
    hub: &'a WorkerHub,
    worker: WorkerId,
    id: String,
    answered: bool,
}

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        state.pool.finished(self.worker);
        if !self.answered {
            if let Some(link) = state.links.get_mut(&self.worker) {
                if let Some(conn) = link.pending.remove(&self.id).and_then(|(_, lane)| link.conns.get(lane)) {
                    let bytes = Bytes::from(encode(&cancel_frame(&self.id)));
                    // Best effort: a worker whose outbox is full finishes the call in vain.
                    let _ = conn.outbox.try_send(OutFrame { bytes, kind: conn.kind });
                }
            }
        }
        drop(state);
        self.hub.capacity.notify_waiters();
    }
}

#[cfg(test)]
mod tests;
