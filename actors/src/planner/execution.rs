//! Running a plan: substitution, dispatch, level reports, budgets (DESIGN.md §6).
//!
//! An [`Execution`] owns everything a run needs between two commands, so a run that has
//! built too much on a connection's thread can stop there ([`Step::Paused`], only when no
//! command is running) and continue on the Planner's thread with nothing lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde_json::{json, Map, Value};

use super::budget::{footprint, Budget, LimitExceeded, Limits};
use super::{Lookup, Plan};
use crate::cache::core::{CacheError, CacheKey};
use crate::cache::rpc::{self, Flight};
use crate::cache::{Levels, LocalCache};
use crate::fabric::bridge::Work;
use crate::fabric::wire::CallOutcome;
use crate::fabric::{FabricShared, RemoteFunction};
use crate::function::{type_name, CallArgs, FunctionError};
use crate::metrics::Metrics;
use crate::protocol::{RpcCommand, RpcError};
use crate::routing::{Endpoint, Routing};
use crate::unix_now;
use crate::version::VersionConstraint;

/// A finished command's result and its estimated JSON size (measured once, on arrival).
#[derive(Debug)]
struct Done {
    value: Value,
    bytes: u64,
}

type Results = [Option<Done>];

/// What substituting the references in `value` would copy, in estimated JSON bytes,
/// measured without copying anything.
fn substitution_cost(value: &Value, results: &Results, index: &Lookup<'_>) -> u64 {
    match value {
        Value::String(s) => match s.split_once('.') {
            None => index.get(s).and_then(|i| results[i].as_ref()).map_or(0, |done| done.bytes),
            Some(_) => follow_path(s, results, index).map_or(0, |found| footprint(found).bytes),
        },
        Value::Array(items) => items.iter().map(|v| substitution_cost(v, results, index)).sum(),
        Value::Object(map) => map.values().map(|v| substitution_cost(v, results, index)).sum(),
        _ => 0,
    }
}

/// Replaces, in place, references in `value` by results of completed commands; returns
/// the estimated bytes copied.
fn substitute(value: &mut Value, results: &Results, index: &Lookup<'_>) -> u64 {
    match value {
        Value::String(s) => match resolve_reference(s, results, index) {
            Some((resolved, bytes)) => {
                *value = resolved;
                bytes
            }
            None => 0,
        },
        Value::Array(items) => items.iter_mut().map(|v| substitute(v, results, index)).sum(),
        Value::Object(map) => map.values_mut().map(|v| substitute(v, results, index)).sum(),
        _ => 0,
    }
}

fn resolve_reference(s: &str, results: &Results, index: &Lookup<'_>) -> Option<(Value, u64)> {
    match s.split_once('.') {
        None => index.get(s).and_then(|i| results[i].as_ref()).map(|done| (done.value.clone(), done.bytes)),
        Some(_) => follow_path(s, results, index).map(|found| (found.clone(), footprint(found).bytes)),
    }
}

/// `base.a.b`: the value under keys `a`, `b` of `base`'s result, if there is one. A string
/// containing a dot is always read this way (the reference's rule).
fn follow_path<'r>(s: &str, results: &'r Results, index: &Lookup<'_>) -> Option<&'r Value> {
    let (base, path) = s.split_once('.')?;
    let mut at = &results[index.get(base)?].as_ref()?.value;
    for key in path.split('.') {
        at = at.as_object()?.get(key)?;
    }
    Some(at)
}

/// One completed level, in the reference's shape.
pub type LevelReport = Value;

/// Receives each level's report the moment the level completes.
pub trait LevelObserver {
    /// Called once per level, in level order.
    fn level_completed(&mut self, report: &LevelReport) -> impl std::future::Future<Output = ()>;
}

/// Observes nothing.
pub struct NoObserver;

impl LevelObserver for NoObserver {
    async fn level_completed(&mut self, _: &LevelReport) {}
}

/// The result of a successful run.
#[derive(Debug)]
pub struct Outcome {
    /// Sink results by command name.
    pub r: Value,
    /// Per-level reports (when asked for).
    pub intermediate_results: Vec<Value>,
    /// Timing summary (when asked for).
    pub execution_summary: Option<Value>,
}

/// What the caller wants back besides `r`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReportOptions {
    /// Keep per-level reports in the response.
    pub intermediate_results: bool,
    /// Build level reports even if not returned (for a callback topic).
    pub observe_levels: bool,
    /// Add the timing summary.
    pub execution_summary: bool,
}

struct LevelTracker {
    remaining: Vec<usize>,
    /// Estimated JSON bytes of each level's results (names included), for the reports.
    level_bytes: Vec<u64>,
    next: usize,
    started: Instant,
    last_completed: Instant,
    times_ms: Vec<f64>,
}

/// Where a run happens, which decides when it yields the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On a connection's thread: hand the run over ([`Step::Paused`]) once it has built
    /// more than this many bytes, at a point where nothing is running.
    InPlace {
        /// Bytes of work (substituted plus reply) allowed in place.
        pause_above: u64,
    },
    /// On the Planner's own thread: run to the end, yielding now and then so a timeout
    /// and the other requests there get their turn.
    Offloaded,
}

/// How often (in commands) an offloaded run yields.
const YIELD_EVERY: usize = 64;

/// Where a run stopped.
pub enum Step {
    /// The request finished (or failed).
    Finished(Result<Outcome, RpcError>),
    /// The run built more than it may in place; continue it elsewhere with
    /// [`Execution::run`]. Nothing was running when it paused, so nothing is lost.
    Paused(Box<Execution>),
}

/// A plan being run: the state between two commands, which can move to another thread
/// (it owns all of it; functions still running are never part of it).
pub struct Execution {
    plan: Plan,
    options: ReportOptions,
    results: Vec<Option<Done>>,
    dep_count: Vec<usize>,
    ready: VecDeque<usize>,
    completed: usize,
    tracker: Option<LevelTracker>,
    reports: Vec<Value>,
    budget: Budget,
    /// The largest result so far: with a command's reference count, it bounds what
    /// substituting its arguments can copy.
    largest_result: u64,
    metrics: Option<Arc<Metrics>>,
    /// When the request stops waiting; travels with each call (see [`CallArgs::deadline`]).
    deadline: Option<Instant>,
    /// The node's cache, for commands whose results are cached.
    cache: Option<Arc<LocalCache>>,
    /// Commands served from the cache (named in `execution_summary`).
    cached: Vec<String>,
    /// Results looked up by [`Execution::prefetch_cached`], used before anything else.
    prefetched: Vec<Option<Value>>,
}

// An execution moves to the Planner's thread when it pauses.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Execution>();
};

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("plan", &self.plan)
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

/// Runs `plan` under the default [`Limits`]; the first failing command fails the request.
pub async fn execute(
    plan: Plan,
    options: ReportOptions,
    observer: &mut impl LevelObserver,
) -> Result<Outcome, RpcError> {
    match Execution::new(plan, options, Limits::default(), None).run(observer, Placement::Offloaded).await {
        Step::Finished(result) => result,
        Step::Paused(_) => Err(RpcError::invalid("an offloaded run never pauses")),
    }
}

impl Execution {
    /// Ready to run `plan` under `limits`; refusals are counted in `metrics`.
    pub fn new(mut plan: Plan, options: ReportOptions, limits: Limits, metrics: Option<Arc<Metrics>>) -> Self {
        let n = plan.cmds.len();
        let dep_count = std::mem::take(&mut plan.dep_count);
        let ready: VecDeque<usize> = (0..n).filter(|&i| dep_count[i] == 0).collect();
        let track_levels = options.intermediate_results || options.observe_levels || options.execution_summary;
        let tracker = track_levels.then(|| {
            let now = Instant::now();
            LevelTracker {
                remaining: plan.levels.iter().fold(vec![0; plan.level_count], |mut acc, &l| {
                    acc[l] += 1;
                    acc
                }),
                level_bytes: vec![0; plan.level_count],
                next: 0,
                started: now,
                last_completed: now,
                times_ms: Vec::new(),
            }
        });
        let mut results = Vec::with_capacity(n);
        results.resize_with(n, || None);
        let cache = plan.routing.fabric().and_then(|fabric| fabric.cache.clone());
        Execution {
            plan,
            options,
            results,
            dep_count,
            ready,
            completed: 0,
            tracker,
            reports: Vec::new(),
            budget: Budget::new(limits),
            largest_result: 0,
            metrics,
            deadline: None,
            cache,
            cached: Vec::new(),
            prefetched: Vec::new(),
        }
    }

    /// Tells every call when the request stops waiting (a worker may stop early).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Looks up, in the node's cache, the result of every command that is not inline;
    /// true when all were found, so the run completes in its first poll like an inline
    /// plan (a cached RPC is then answered on the connection's thread, without a task).
    /// Only commands without references qualify: their arguments are known now.
    pub fn prefetch_cached(&mut self) -> bool {
        let Some(cache) = &self.cache else { return false };
        let now = unix_now();
        let mut found = vec![None; self.plan.cmds.len()];
        for (i, cmd) in self.plan.cmds.iter().enumerate() {
            let (identity, default_ttl) = match &self.plan.endpoints[i] {
                Endpoint::Local(function) if function.is_inline() => continue,
                Endpoint::Local(function) => (function.identity(), function.cache_ttl()),
                Endpoint::Remote(target) => (&target.identity, None),
                Endpoint::Cluster { .. } | Endpoint::Clusters(_) => return false,
            };
            // A bad TTL is refused by the normal path, never served.
            let ttl = cmd.cache.as_ref().map(|c| c.ttl).or(default_ttl);
            if self.plan.levels[i] > 0 || ttl.is_none_or(|ttl| cache.expiry(Some(ttl), now).is_err()) {
                return false;
            }
            let Ok(key) = cache.key(rpc::NAMESPACE, &rpc::call_key(identity, &cmd.args, &cmd.kwargs)) else {
                return false;
            };
            match cache.get(&key, Levels::LOCAL, now) {
                Ok(Some((entry, _))) => found[i] = Some(entry.value.clone()),
                _ => return false,
            }
        }
        self.prefetched = found;
        true
    }

    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.plan.request_id
    }

    /// Whether every command runs in place (see [`Plan::is_inline`]).
    pub fn is_inline(&self) -> bool {
        self.plan.is_inline()
    }

    /// Runs until the request finishes, or (in place) until it has built too much.
    pub async fn run(mut self, observer: &mut impl LevelObserver, placement: Placement) -> Step {
        match self.drive(observer, placement).await {
            Ok(true) => Step::Paused(Box::new(self)),
            Ok(false) => Step::Finished(Ok(self.outcome())),
            Err(error) => Step::Finished(Err(error)),
        }
    }

    /// The 1002 of a bound the request ran into, counted in `/metrics`.
    fn refuse(&self, exceeded: LimitExceeded) -> RpcError {
        if let Some(metrics) = &self.metrics {
            metrics.limit_exceeded(exceeded.limit.setting());
        }
        exceeded.error
    }

    /// `Ok(true)` when paused, `Ok(false)` when every command completed.
    async fn drive(&mut self, observer: &mut impl LevelObserver, placement: Placement) -> Result<bool, RpcError> {
        let n = self.plan.cmds.len();
        // Created on first use: a request of inline functions never needs it.
        let mut running: Option<FuturesUnordered<Running>> = None;
        let mut since_yield = 0;
        while self.completed < n {
            let mut pausing = false;
            while let Some(i) = self.ready.pop_front() {
                // A command without dependencies has nothing to substitute (level 0).
                let has_refs = self.plan.levels[i] > 0;
                // What substitution may copy is counted before anything is copied. Nearly
                // always a bound (references x largest result) shows it is small, and the
                // copy counts itself; otherwise the arguments are measured first.
                let mut measured = false;
                if has_refs {
                    let bound = u64::from(self.plan.occurrences[i]).saturating_mul(self.largest_result);
                    let small = match placement {
                        Placement::InPlace { pause_above } => self.budget.work().saturating_add(bound) <= pause_above,
                        Placement::Offloaded => true,
                    };
                    if !(small && self.budget.substitution_fits(bound)) {
                        let lookup = Lookup { cmds: &self.plan.cmds, index: &self.plan.index };
                        let cmd = &self.plan.cmds[i];
                        let cost: u64 = cmd
                            .args
                            .iter()
                            .chain(cmd.kwargs.values())
                            .map(|v| substitution_cost(v, &self.results, &lookup))
                            .sum();
                        if let Placement::InPlace { pause_above } = placement {
                            if self.budget.work().saturating_add(cost) > pause_above {
                                self.ready.push_front(i);
                                pausing = true;
                                break;
                            }
                        }
                        if let Err(exceeded) = self.budget.substitute(cost, &cmd.name) {
                            return Err(self.refuse(exceeded));
                        }
                        measured = true;
                    }
                }
                // Each command's arguments are used once: substitute in place, no copies.
                let mut args = std::mem::take(&mut self.plan.cmds[i].args);
                let mut kwargs = std::mem::take(&mut self.plan.cmds[i].kwargs);
                if has_refs {
                    let lookup = Lookup { cmds: &self.plan.cmds, index: &self.plan.index };
                    let copied: u64 =
                        args.iter_mut().chain(kwargs.values_mut()).map(|v| substitute(v, &self.results, &lookup)).sum();
                    // Within the bound, so within the budget: this only counts it.
                    if !measured {
                        if let Err(exceeded) = self.budget.substitute(copied, &self.plan.cmds[i].name) {
                            return Err(self.refuse(exceeded));
                        }
                    }
                }
                if let Some(value) = self.prefetched.get_mut(i).and_then(Option::take) {
                    self.cached.push(self.plan.cmds[i].name.clone());
                    self.finish(i, value)?;
                    self.drain_levels(observer).await?;
                    continue;
                }
                let call = CallArgs { args, kwargs, deadline: self.deadline };
                let types = ArgTypes::of(&call.args);
                let slot = self.cache_slot(i, &call)?;
                if let Some(value) = slot.as_ref().and_then(CacheSlot::lookup) {
                    self.cached.push(self.plan.cmds[i].name.clone());
                    self.finish(i, value)?;
                    self.drain_levels(observer).await?;
                    continue;
                }
                match (&self.plan.endpoints[i], slot) {
                    (Endpoint::Local(function), slot) if function.is_inline() => {
                        let result = function
                            .invoke_inline(call)
                            .unwrap_or_else(|| Err(FunctionError::new("Internal", "not inline")));
                        let value = result.map_err(|e| failure(&self.plan.cmds[i], None, &e, &types))?;
                        if let Some(slot) = slot {
                            slot.store(&value);
                        }
                        self.finish(i, value)?;
                    }
                    (endpoint, slot) => {
                        let mut future = dispatch(&self.plan, i, endpoint.clone(), call, types);
                        if let Some(slot) = slot {
                            future = single_flight(i, future, slot);
                        }
                        running.get_or_insert_with(FuturesUnordered::new).push(future);
                    }
                }
                // Inline completions may close levels before anything else runs.
                self.drain_levels(observer).await?;
                if placement == Placement::Offloaded {
                    since_yield += 1;
                    if since_yield >= YIELD_EVERY {
                        since_yield = 0;
                        tokio::task::yield_now().await;
                    }
                }
            }
            let idle = running.as_ref().is_none_or(FuturesUnordered::is_empty);
            if pausing && idle {
                return Ok(true);
            }
            if self.completed == n {
                break;
            }
            let next = match running.as_mut() {
                Some(running) => running.next().await,
                None => None,
            };
            let Some((i, result)) = next else {
                // Nothing running and nothing ready: impossible for an acyclic plan.
                return Err(RpcError::invalid("plan stalled: unresolved dependencies"));
            };
            self.finish(i, result?)?;
            self.drain_levels(observer).await?;
        }
        Ok(false)
    }

    /// Where command `i`'s result is cached: when the command asks for it (`cache`), or
    /// its local function is cacheable, and the node has a cache. A bad TTL is 1002.
    fn cache_slot(&self, i: usize, call: &CallArgs) -> Result<Option<CacheSlot>, RpcError> {
        let Some(cache) = &self.cache else { return Ok(None) };
        let (identity, default_ttl) = match &self.plan.endpoints[i] {
            Endpoint::Local(function) => (function.identity(), function.cache_ttl()),
            Endpoint::Remote(target) => (&target.identity, None),
            // Cached, if at all, by the cluster that runs it.
            Endpoint::Cluster { .. } | Endpoint::Clusters(_) => return Ok(None),
        };
        let Some(ttl) = self.plan.cmds[i].cache.as_ref().map(|c| c.ttl).or(default_ttl) else { return Ok(None) };
        let refuse = |e: CacheError| {
            if let (CacheError::Limit(setting, _), Some(metrics)) = (&e, &self.metrics) {
                metrics.limit_exceeded(setting);
            }
            RpcError::invalid(format!("command {}: cache: {e}", self.plan.cmds[i].name))
        };
        let expires_at = cache.expiry(Some(ttl), unix_now()).map_err(refuse)?;
        let key = cache.key(rpc::NAMESPACE, &rpc::call_key(identity, &call.args, &call.kwargs)).map_err(refuse)?;
        Ok(Some(CacheSlot { cache: cache.clone(), key, expires_at }))
    }

    /// Records command `i`'s result (measured once here) and readies its dependants.
    fn finish(&mut self, i: usize, value: Value) -> Result<(), RpcError> {
        self.completed += 1;
        let size = footprint(&value);
        let name = &self.plan.cmds[i].name;
        if let Err(exceeded) = self.budget.depth(size, name) {
            return Err(self.refuse(exceeded));
        }
        // `"name":value,` in `r` and in the level reports.
        let entry = size.bytes + name.len() as u64 + 4;
        if self.plan.is_sink(i) {
            if let Err(exceeded) = self.budget.reply(entry, || format!("the result of command {name}")) {
                return Err(self.refuse(exceeded));
            }
        }
        if let Some(tracker) = self.tracker.as_mut() {
            let level = self.plan.levels[i];
            tracker.remaining[level] -= 1;
            tracker.level_bytes[level] += entry;
        }
        self.largest_result = self.largest_result.max(size.bytes);
        self.results[i] = Some(Done { value, bytes: size.bytes });
        for &j in &self.plan.dependants[i] {
            self.dep_count[j] -= 1;
            if self.dep_count[j] == 0 {
                self.ready.push_back(j);
            }
        }
        Ok(())
    }

    /// Reports every level completed since the last call. Each report repeats all earlier
    /// results (`accumulated_results`), so their sizes are counted before one is built.
    async fn drain_levels(&mut self, observer: &mut impl LevelObserver) -> Result<(), RpcError> {
        let Some(tracker) = self.tracker.as_mut() else { return Ok(()) };
        let plan = &self.plan;
        while tracker.next < plan.level_count && tracker.remaining[tracker.next] == 0 {
            let level = tracker.next;
            let now = Instant::now();
            let took = now.duration_since(tracker.last_completed).as_secs_f64() * 1000.0;
            tracker.last_completed = now;
            tracker.times_ms.push(took);
            tracker.next += 1;
            if !(self.options.intermediate_results || self.options.observe_levels) {
                continue;
            }
            let accumulated: u64 = tracker.level_bytes[..=level].iter().sum();
            let estimate = 256 + plan.request_id.len() as u64 + tracker.level_bytes[level] + accumulated;
            if let Err(exceeded) = self.budget.reply(estimate, || format!("the intermediate result of level {level}")) {
                if let Some(metrics) = &self.metrics {
                    metrics.limit_exceeded(exceeded.limit.setting());
                }
                return Err(exceeded.error);
            }
            let mut level_results = Map::new();
            let mut accumulated = Map::new();
            for (i, cmd) in plan.cmds.iter().enumerate() {
                if plan.levels[i] <= level {
                    let value = self.results[i].as_ref().map_or(Value::Null, |done| done.value.clone());
                    if plan.levels[i] == level {
                        level_results.insert(cmd.name.clone(), value.clone());
                    }
                    accumulated.insert(cmd.name.clone(), value);
                }
            }
            let report = json!({
                "request_id": plan.request_id,
                "level_index": level,
                "level_results": level_results,
                "accumulated_results": accumulated,
                "total_levels": plan.level_count,
                "completed_levels": level + 1,
                "timestamp": unix_now(),
                "execution_time_ms": took,
            });
            observer.level_completed(&report).await;
            self.reports.push(report);
        }
        Ok(())
    }

    /// The response's parts, once every command completed.
    fn outcome(mut self) -> Outcome {
        let mut r = Map::new();
        for (i, result) in self.results.iter_mut().enumerate() {
            if self.plan.is_sink(i) {
                let value = result.take().map_or(Value::Null, |done| done.value);
                r.insert(std::mem::take(&mut self.plan.cmds[i].name), value);
            }
        }
        let execution_summary = match (&self.tracker, self.options.execution_summary) {
            (Some(tracker), true) => Some(summary(&self.plan, tracker, &self.cached)),
            _ => None,
        };
        Outcome {
            r: Value::Object(r),
            intermediate_results: if self.options.intermediate_results { self.reports } else { Vec::new() },
            execution_summary,
        }
    }
}

/// The argument types of a call, for the 1003 details, kept without allocating: this is
/// computed for every call and read only when one fails.
#[derive(Clone, Copy)]
struct ArgTypes {
    names: [&'static str; 8],
    len: usize,
    total: usize,
}

impl ArgTypes {
    fn of(args: &[Value]) -> Self {
        let mut names = [""; 8];
        for (slot, value) in names.iter_mut().zip(args) {
            *slot = type_name(value);
        }
        ArgTypes { names, len: args.len().min(8), total: args.len() }
    }
}

impl std::fmt::Display for ArgTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names[..self.len].join(","))?;
        if self.total > self.len {
            write!(f, ",...({} more)", self.total - self.len)?;
        }
        Ok(())
    }
}

/// The 1003 details: command, function, node (when remote), error, argument types. A call
/// whose serving process went away ([`FunctionError::is_unreachable`]) is a 1005 instead,
/// one whose deadline passed first ([`FunctionError::is_deadline_passed`]) a 1004.
fn failure(cmd: &RpcCommand, node: Option<&str>, error: &FunctionError, types: &ArgTypes) -> RpcError {
    let node = node.map(|n| format!(" node={n}")).unwrap_or_default();
    if error.is_unreachable() {
        return RpcError::unreachable(format!("command={} fun={}{node}: {}", cmd.name, cmd.fun, error.message));
    }
    if error.is_deadline_passed() {
        return RpcError::deadline_passed(format!("command={} fun={}{node}: {}", cmd.name, cmd.fun, error.message));
    }
    RpcError::execution_failed(format!(
        "Function execution failed: command={} fun={}{node} error={error} args_types=[{types}]",
        cmd.name, cmd.fun
    ))
}

type Running = LocalBoxFuture<'static, (usize, Result<Value, RpcError>)>;

/// Where a command's result is cached.
struct CacheSlot {
    cache: Arc<LocalCache>,
    key: CacheKey,
    expires_at: Option<f64>,
}

impl CacheSlot {
    /// The cached result, if live.
    fn lookup(&self) -> Option<Value> {
        let hit = self.cache.get(&self.key, Levels::LOCAL, unix_now()).ok().flatten();
        hit.map(|(entry, _)| entry.value.clone())
    }

    /// Caches a successful result (one too large for `cache_max_value_bytes` is not).
    fn store(&self, value: &Value) {
        if self.cache.check_value(value).is_ok() {
            let now = unix_now();
            let _ = self.cache.put(&self.key, value.clone(), self.expires_at, None, Levels::LOCAL, now);
        }
    }
}

/// Runs `future` once for every identical call in flight on this node: the first runs
/// it and caches a success; the others wait for its result.
fn single_flight(i: usize, future: Running, slot: CacheSlot) -> Running {
    async move {
        match slot.cache.flights.join(slot.key.stored()) {
            Flight::Follower(result) => {
                let cancelled = || Err(RpcError::unreachable("the identical call this one waited for was lost"));
                (i, result.await.unwrap_or_else(|_| cancelled()))
            }
            Flight::Leader(leader) => {
                // Another flight may have landed between the lookup and now.
                if let Some(value) = slot.lookup() {
                    leader.finish(&Ok(value.clone()));
                    return (i, Ok(value));
                }
                let (i, result) = future.await;
                if let Ok(value) = &result {
                    slot.store(value);
                }
                leader.finish(&result);
                (i, result)
            }
        }
    }
    .boxed_local()
}

/// Starts a command that does not complete in place.
fn dispatch(plan: &Plan, i: usize, endpoint: Endpoint, call: CallArgs, types: ArgTypes) -> Running {
    let cmd = plan.cmds[i].clone();
    match endpoint {
        // Served by a worker: one that goes away before answering (and has no other
        // worker here to retry on) leaves the call to another node, if one has it.
        Endpoint::Local(function) if function.is_external() => {
            let routing = plan.routing.clone();
            let constraint = plan.constraints[i].clone();
            async move {
                let result = match function.invoke(call.clone()).await {
                    Err(e) if e.is_unreachable() => match routing.resolve_elsewhere(&cmd, constraint.as_ref()) {
                        Some(target) => run_remote(&routing, &cmd, constraint.as_ref(), target, call, &types).await,
                        None => Err(failure(&cmd, None, &e, &types)),
                    },
                    other => other.map_err(|e| failure(&cmd, None, &e, &types)),
                };
                (i, result)
            }
            .boxed_local()
        }
        Endpoint::Local(function) => {
            async move { (i, function.invoke(call).await.map_err(|e| failure(&cmd, None, &e, &types))) }.boxed_local()
        }
        Endpoint::Remote(target) => {
            let routing = plan.routing.clone();
            let constraint = plan.constraints[i].clone();
            async move { (i, run_remote(&routing, &cmd, constraint.as_ref(), target, call, &types).await) }
                .boxed_local()
        }
        Endpoint::Cluster { cluster, via } => {
            let routing = plan.routing.clone();
            async move { (i, run_federated(&routing, cmd, (&cluster, via.as_deref()), call).await) }.boxed_local()
        }
        Endpoint::Clusters(clusters) => {
            let routing = plan.routing.clone();
            async move { (i, run_elsewhere(&routing, cmd, &clusters, call).await) }.boxed_local()
        }
    }
}

/// Runs a command nothing in this cluster matches in the first of `clusters` that does
/// ([`FabricShared::ask_clusters`]): a cluster that does not export (or serve) the
/// function answers 1001 and the next is asked. None ran it: 1005 if a cluster was out of
/// reach (it may have it), else 1001.
async fn run_elsewhere(
    routing: &Routing,
    cmd: RpcCommand,
    clusters: &[(String, Option<String>)],
    call: CallArgs,
) -> Result<Value, RpcError> {
    let fabric = fabric_of(routing, &cmd)?;
    let (deadline, none) = (call.deadline, RpcError::not_found(&cmd.fun));
    fabric.ask_clusters(clusters, substituted(cmd, call), deadline, none).await
}

/// Runs a command in another cluster over the federation bridges (this node's, or those
/// of `via`, a node of this cluster); the error is the one the destination gave, or 1005
/// when the route or a bridge went away.
async fn run_federated(
    routing: &Routing,
    cmd: RpcCommand,
    (cluster, via): (&str, Option<&str>),
    call: CallArgs,
) -> Result<Value, RpcError> {
    let fabric = fabric_of(routing, &cmd)?;
    let deadline = call.deadline;
    fabric.run_in_cluster(cluster, via, substituted(cmd, call), deadline).await
}

fn fabric_of<'a>(routing: &'a Routing, cmd: &RpcCommand) -> Result<&'a Arc<FabricShared>, RpcError> {
    routing.fabric().ok_or_else(|| RpcError::unreachable(format!("command={}: this node has no fabric", cmd.name)))
}

/// The command with its arguments substituted, as work for another cluster.
fn substituted(mut cmd: RpcCommand, call: CallArgs) -> Work {
    cmd.args = call.args;
    cmd.kwargs = call.kwargs;
    Work::Command(Box::new(cmd))
}

/// Runs a command on another node. A failure of the function fails the request (1003,
/// naming the node); a node or link that goes away before answering gets one retry on
/// another match, else 1005; a node that refuses the call at one of its in-flight bounds
/// gets the same retry, else 1006.
async fn run_remote(
    routing: &Routing,
    cmd: &RpcCommand,
    constraint: Option<&VersionConstraint>,
    mut target: RemoteFunction,
    call: CallArgs,
    types: &ArgTypes,
) -> Result<Value, RpcError> {
    let Some(fabric) = routing.fabric() else {
        return Err(RpcError::unreachable(format!("command={} fun={}: this node has no fabric", cmd.name, cmd.fun)));
    };
    let mut tried = Vec::new();
    loop {
        let (reason, overloaded) = match fabric.call(&target.node, &cmd.name, &target.identity, call.clone()).await {
            CallOutcome::Ok { value } => return Ok(value),
            CallOutcome::Failed { error, node } => {
                return Err(failure(cmd, Some(&node), &error, types));
            }
            CallOutcome::Refused { error } => return Err(error),
            CallOutcome::NotFound { node } => (format!("function no longer on node {node}"), false),
            // Unreachable includes a node or link that went away before answering.
            CallOutcome::Unreachable { reason } => (reason, false),
            // A bound on the serving (or a forwarding) node: another provider may have
            // room; if none does, the client backs off (1006), it is not a lost route.
            CallOutcome::Overloaded { reason } => (reason, true),
        };
        tried.push(target.node.clone());
        let retry = if tried.len() < 2 { routing.resolve(cmd, constraint, &tried).ok() } else { None };
        match retry {
            Some(Endpoint::Remote(next)) => target = next,
            Some(Endpoint::Local(function)) => {
                return function.invoke(call).await.map_err(|e| failure(cmd, None, &e, types));
            }
            Some(Endpoint::Cluster { .. } | Endpoint::Clusters(_)) | None => {
                let details = format!("command={} fun={} node={}: {reason}", cmd.name, cmd.fun, target.node);
                return Err(if overloaded {
                    RpcError::peer_overloaded(details)
                } else {
                    RpcError::unreachable(details)
                });
            }
        }
    }
}

fn summary(plan: &Plan, tracker: &LevelTracker, cached: &[String]) -> Value {
    let total = tracker.started.elapsed().as_secs_f64() * 1000.0;
    let bottleneck = tracker.times_ms.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
    let average = if tracker.times_ms.is_empty() {
        0.0
    } else {
        tracker.times_ms.iter().sum::<f64>() / tracker.times_ms.len() as f64
    };
    let mut summary = json!({
        "request_id": plan.request_id,
        "total_execution_time_ms": total,
        "total_levels": plan.level_count,
        "level_execution_times": tracker.times_ms,
        "bottleneck_level_index": bottleneck,
        "average_level_time_ms": average,
        "parallel_commands_executed": plan.cmds.len(),
        "cross_cluster_hops": 0,
    });
    // Only when there are any: otherwise the summary keeps the reference's exact shape.
    if !cached.is_empty() {
        summary["cached_commands"] = json!(cached);
    }
    summary
}
