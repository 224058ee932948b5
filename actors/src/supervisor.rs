//! NodeSupervisor: re-creates crashed children, limits restart intensity, escalates.
//!
//! ```text
//! NodeSupervisor (one_for_one, max `max_restarts` in `window`, then escalate)
//! ├── Persistence hands out the store handle (first child; state lives in sled)
//! ├── Registry   function table mutations
//! ├── PubSub     subscription trie, delivery, backlog
//! ├── Queue      every queue of the node; recovers them from the store on (re)start
//! ├── Planner    large requests, on its own thread
//! └── Monitor    HTTP /health /metrics /actors
//! Listener (websocket accept loop -> Connection actors; transient, not restarted)
//! ```
//!
//! actix's own `Supervisor` restarts only after `ctx.stop()`: a panic inside a handler
//! drops the actor's task and closes its mailbox for good. So supervision is ours: every
//! child holds a [`ChildGuard`] whose `Drop` tells this actor the child died and whether
//! it was panicking; the supervisor re-creates the child from its factory (which also
//! re-publishes the new address in the child's [`Slot`]). More than `max_restarts` within
//! `window` escalates: the supervisor logs it and ends the node with
//! [`NodeExit::Escalated`], which the CLI turns into a non-zero exit code.
//!
//! Every lifecycle event is one structured line under the target `mpreg::supervision`:
//! `actor started|stopped|restarted|escalated` with `actor`, `reason`, `restarts`, `node`.
//!
//! What a restart of the supervisor would lose: everything — it is the root, so it is not
//! restarted; a panic in it ends the node (the exit channel closes).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, MessageResponse, Recipient};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::unix_now;

/// Why the node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExit {
    /// Still running.
    Running,
    /// Asked to stop (signal, API).
    Requested,
    /// A child crashed too often.
    Escalated {
        /// The child that exceeded its restart budget.
        actor: String,
    },
}

/// A child's current address, re-published on every restart. Callers read it per use and
/// retry once on `MailboxError::Closed`.
pub struct Slot<A: Actor>(Arc<RwLock<Option<Addr<A>>>>);

impl<A: Actor> Clone for Slot<A> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<A: Actor> Default for Slot<A> {
    fn default() -> Self {
        Slot(Arc::new(RwLock::new(None)))
    }
}

impl<A: Actor> Slot<A> {
    /// The current address, if the child is running.
    pub fn get(&self) -> Option<Addr<A>> {
        self.0.read().ok().and_then(|a| a.clone())
    }

    /// Sends a message built by `make` to the current address, once more if the child
    /// was just restarted (its old mailbox closed). `Err` when it is not running.
    pub async fn send<M>(&self, make: impl Fn() -> M) -> Result<M::Result, actix::MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: actix::dev::ToEnvelope<A, M>,
    {
        let mut last = actix::MailboxError::Closed;
        for _ in 0..2 {
            if let Some(addr) = self.get() {
                match addr.send(make()).await {
                    Ok(result) => return Ok(result),
                    Err(e) => last = e,
                }
            }
            tokio::task::yield_now().await;
        }
        Err(last)
    }

    /// Publishes a new address.
    pub fn set(&self, addr: Addr<A>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(addr);
        }
    }
}

/// Held by every supervised child; reports the child's death when dropped.
pub struct ChildGuard {
    name: &'static str,
    generation: u64,
    supervisor: Recipient<ChildDied>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Keep this trivial: a panic here during unwinding would abort the process.
        self.supervisor.do_send(ChildDied {
            name: self.name,
            generation: self.generation,
            panicked: std::thread::panicking(),
        });
    }
}

#[cfg(test)]
impl ChildGuard {
    /// A guard no supervisor watches, for a test that starts one child alone.
    pub(crate) fn unwatched() -> ChildGuard {
        struct Nobody;
        impl Actor for Nobody {
            type Context = Context<Self>;
        }
        impl Handler<ChildDied> for Nobody {
            type Result = ();
            fn handle(&mut self, _: ChildDied, _: &mut Context<Self>) {}
        }
        ChildGuard { name: "unwatched", generation: 0, supervisor: Nobody.start().recipient() }
    }
}

/// Sent by a [`ChildGuard`] when its actor is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChildDied {
    name: &'static str,
    generation: u64,
    panicked: bool,
}

/// Makes the receiving actor panic inside its handler: fault injection for tests and
/// chaos drills (enabled by the `fault_injection` setting).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct InjectPanic;

impl InjectPanic {
    /// Panics, naming the actor.
    pub fn detonate(self, actor: &str) {
        panic!("injected fault in {actor}");
    }
}

/// Asks a child to stop cleanly (node shutdown).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopChild;

/// The handles the supervisor keeps of a running child.
pub struct ChildHandles {
    /// To inject a fault.
    pub panic: Recipient<InjectPanic>,
    /// To stop it.
    pub stop: Recipient<StopChild>,
}

impl ChildHandles {
    /// The handles of any actor that serves both messages.
    pub fn of<A>(addr: &Addr<A>) -> Self
    where
        A: Actor + Handler<InjectPanic> + Handler<StopChild>,
        A::Context: actix::dev::ToEnvelope<A, InjectPanic> + actix::dev::ToEnvelope<A, StopChild>,
    {
        ChildHandles { panic: addr.clone().recipient(), stop: addr.clone().recipient() }
    }
}

type Factory = Box<dyn Fn(ChildGuard) -> ChildHandles>;

/// A child to supervise: its name and how to start it.
pub struct ChildSpec {
    name: &'static str,
    factory: Factory,
}

impl ChildSpec {
    /// A child started by `factory` (which should also publish the address in its slot).
    pub fn new(name: &'static str, factory: impl Fn(ChildGuard) -> ChildHandles + 'static) -> Self {
        ChildSpec { name, factory: Box::new(factory) }
    }
}

/// Restart intensity: at most `max_restarts` within `window`, else escalate.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts allowed in the window.
    pub max_restarts: usize,
    /// The sliding window.
    pub window: Duration,
    /// Delay before the first restart; doubles with each restart in the window.
    pub backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { max_restarts: 5, window: Duration::from_secs(60), backoff: Duration::from_millis(10) }
    }
}

/// What `GET /actors` shows of one child.
#[derive(Debug, Clone, Serialize)]
pub struct ChildStatus {
    /// Child name.
    pub name: String,
    /// `running`, `restarting`, `stopped` or `escalated`.
    pub state: &'static str,
    /// Restarts since the node started.
    pub restarts: u64,
    /// Why it last died.
    pub last_failure: Option<String>,
    /// Unix time of the last (re)start.
    pub started_at: f64,
}

/// The supervision tree as served at `/actors`.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct TreeStatus {
    /// Node name.
    pub node: String,
    /// Supervisor strategy.
    pub strategy: &'static str,
    /// Allowed restarts per window.
    pub max_restarts: usize,
    /// Window in seconds.
    pub window_s: u64,
    /// The children.
    pub children: Vec<ChildStatus>,
}

/// Ask for the tree.
#[derive(Message)]
#[rtype(result = "TreeStatus")]
pub struct DescribeTree;

/// Inject a panic into the named child. Result: whether such a child is running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CrashChild {
    /// Child name.
    pub name: String,
}

/// Stop every child and end the node with [`NodeExit::Requested`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

struct Child {
    spec: ChildSpec,
    handles: Option<ChildHandles>,
    generation: u64,
    restarts: u64,
    recent: VecDeque<Instant>,
    last_failure: Option<String>,
    state: &'static str,
    started_at: f64,
}

/// The root of a node's supervision tree.
pub struct NodeSupervisor {
    node: String,
    policy: RestartPolicy,
    children: Vec<Child>,
    exit: watch::Sender<NodeExit>,
    metrics: Arc<Metrics>,
    stopping: bool,
}

impl NodeSupervisor {
    /// A supervisor for `children`; `exit` reports why the node ended.
    pub fn new(
        node: String,
        policy: RestartPolicy,
        children: Vec<ChildSpec>,
        exit: watch::Sender<NodeExit>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let children = children
            .into_iter()
            .map(|spec| Child {
                spec,
                handles: None,
                generation: 0,
                restarts: 0,
                recent: VecDeque::new(),
                last_failure: None,
                state: "stopped",
                started_at: 0.0,
            })
            .collect();
        NodeSupervisor { node, policy, children, exit, metrics, stopping: false }
    }

    fn start_child(&mut self, index: usize, ctx: &mut Context<Self>) {
        let supervisor = ctx.address().recipient();
        let child = &mut self.children[index];
        child.generation += 1;
        let guard = ChildGuard { name: child.spec.name, generation: child.generation, supervisor };
        child.handles = Some((child.spec.factory)(guard));
        child.state = "running";
        child.started_at = unix_now();
    }

    fn escalate(&mut self, name: &str, ctx: &mut Context<Self>) {
        error!(target: "mpreg::supervision", actor = name, reason = "restart intensity exceeded",
            restarts = self.policy.max_restarts, node = %self.node, "actor escalated");
        for child in &mut self.children {
            if child.spec.name == name {
                child.state = "escalated";
            }
        }
        self.stop_children("escalation");
        let _ = self.exit.send(NodeExit::Escalated { actor: name.to_owned() });
        ctx.stop();
    }

    /// Stops every child; each stop is logged here, because the supervisor itself stops
    /// right after and will not read the children's death notices.
    fn stop_children(&mut self, reason: &'static str) {
        self.stopping = true;
        for child in &mut self.children {
            if let Some(handles) = child.handles.take() {
                handles.stop.do_send(StopChild);
                info!(target: "mpreg::supervision", actor = child.spec.name, reason, restarts = child.restarts,
                    node = %self.node, "actor stopped");
            }
            if child.state == "running" || child.state == "restarting" {
                child.state = "stopped";
            }
        }
    }
}

impl Actor for NodeSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for index in 0..self.children.len() {
            self.start_child(index, ctx);
            info!(target: "mpreg::supervision", actor = self.children[index].spec.name, reason = "boot",
                restarts = 0, node = %self.node, "actor started");
        }
    }
}

impl Handler<ChildDied> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildDied, ctx: &mut Context<Self>) {
        let Some(index) = self.children.iter().position(|c| c.spec.name == msg.name) else {
            return;
        };
        let child = &mut self.children[index];
        if child.generation != msg.generation {
            return; // a stale guard of an earlier incarnation
        }
        child.handles = None;
        let reason = if msg.panicked { "panicked" } else { "stopped" };
        if self.stopping {
            return; // logged by `stop_children`
        }
        warn!(target: "mpreg::supervision", actor = msg.name, reason, restarts = child.restarts,
            node = %self.node, "actor stopped");
        let now = Instant::now();
        child.recent.push_back(now);
        while child.recent.front().is_some_and(|t| now.duration_since(*t) > self.policy.window) {
            child.recent.pop_front();
        }
        child.last_failure = Some(reason.to_owned());
        if child.recent.len() > self.policy.max_restarts {
            self.escalate(msg.name, ctx);
            return;
        }
        child.state = "restarting";
        let delay = self.policy.backoff * 2u32.saturating_pow(child.recent.len().saturating_sub(1) as u32);
        ctx.run_later(delay, move |sup, ctx| {
            if sup.stopping {
                return;
            }
            sup.start_child(index, ctx);
            let child = &mut sup.children[index];
            child.restarts += 1;
            sup.metrics.record_restart();
            info!(target: "mpreg::supervision", actor = child.spec.name, reason, restarts = child.restarts,
                node = %sup.node, "actor restarted");
        });
    }
}

impl Handler<DescribeTree> for NodeSupervisor {
    type Result = TreeStatus;

    fn handle(&mut self, _: DescribeTree, _: &mut Context<Self>) -> TreeStatus {
        TreeStatus {
            node: self.node.clone(),
            strategy: "one_for_one",
            max_restarts: self.policy.max_restarts,
            window_s: self.policy.window.as_secs(),
            children: self
                .children
                .iter()
                .map(|c| ChildStatus {
                    name: c.spec.name.to_owned(),
                    state: c.state,
                    restarts: c.restarts,
                    last_failure: c.last_failure.clone(),
                    started_at: c.started_at,
                })
                .collect(),
        }
    }
}

impl Handler<CrashChild> for NodeSupervisor {
    type Result = bool;

    fn handle(&mut self, msg: CrashChild, _: &mut Context<Self>) -> bool {
        let target = self.children.iter().find(|c| c.spec.name == msg.name).and_then(|c| c.handles.as_ref());
        match target {
            Some(handles) => {
                warn!(target: "mpreg::supervision", actor = %msg.name, node = %self.node, "fault injected");
                handles.panic.do_send(InjectPanic);
                true
            }
            None => false,
        }
    }
}

impl Handler<Shutdown> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        info!(target: "mpreg::supervision", actor = "node", reason = "shutdown requested", node = %self.node,
            "actor stopped");
        self.stop_children("shutdown");
        let _ = self.exit.send(NodeExit::Requested);
        ctx.stop();
    }
}

/// Implements the two messages every supervised child serves: a clean stop and fault
/// injection.
#[macro_export]
macro_rules! supervised_child {
    ($actor:ty, $name:expr) => {
        impl actix::Handler<$crate::supervisor::StopChild> for $actor {
            type Result = ();
            fn handle(&mut self, _: $crate::supervisor::StopChild, ctx: &mut Self::Context) {
                actix::ActorContext::stop(ctx);
            }
        }

        impl actix::Handler<$crate::supervisor::InjectPanic> for $actor {
            type Result = ();
            fn handle(&mut self, msg: $crate::supervisor::InjectPanic, _: &mut Self::Context) {
                msg.detonate($name);
            }
        }
    };
}

#[cfg(test)]
mod tests;
