//! Planner: request -> dependency DAG -> dispatch -> response (DESIGN.md §6).
//!
//! [`Plan::build`] is pure: it validates the request, finds references, computes the DAG
//! and its levels, rejects duplicates and cycles, and resolves every command to a function
//! before anything runs (so an unknown function fails the request at once). [`execute`]
//! then runs the plan: a command starts as soon as its own dependencies are done, ready
//! commands start in the order they were listed, inline functions complete in place and
//! everything else runs concurrently. The first failure ends the request; commands still
//! running are cancelled.
//!
//! Planning runs as a task on the connection's own thread (DESIGN.md §4), so there is no
//! Planner mailbox on the hot path; what would be its state (the function table) is a
//! snapshot read without locking.
//!
//! References: a string anywhere in `args` or `kwargs` (recursively through arrays and
//! object VALUES, never keys) equal to a command name references it; `name.a.b` references
//! `name` and follows object keys `a`, `b` when substituted. A path that cannot be followed
//! is passed through as the literal string.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde_json::{json, Map, Value};

use crate::fabric::wire::CallOutcome;
use crate::fabric::RemoteFunction;
use crate::function::{type_name, CallArgs, FunctionError};
use crate::protocol::{RpcCommand, RpcError, RpcRequest};
use crate::routing::{Endpoint, Routing};
use crate::unix_now;
use crate::version::VersionConstraint;

/// A validated request, ready to run.
pub struct Plan {
    request_id: String,
    cmds: Vec<RpcCommand>,
    constraints: Vec<Option<VersionConstraint>>,
    endpoints: Vec<Endpoint>,
    routing: Routing,
    index: NameIndex,
    dependants: Vec<Vec<usize>>,
    dep_count: Vec<usize>,
    levels: Vec<usize>,
    level_count: usize,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("request_id", &self.request_id).field("cmds", &self.cmds).finish_non_exhaustive()
    }
}

impl Plan {
    /// Validates `request` and resolves each command through `routing`.
    pub fn build(request: RpcRequest, routing: Routing) -> Result<Plan, RpcError> {
        let RpcRequest { u, cmds, .. } = request;
        let index = NameIndex::build(&cmds)?;
        let lookup = Lookup { cmds: &cmds, index: &index };
        let deps: Vec<Vec<usize>> = cmds.iter().map(|cmd| references(cmd, &lookup)).collect();
        let mut dependants = vec![Vec::new(); cmds.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependants[d].push(i);
            }
        }
        let levels = levels(&cmds, &deps, &dependants)?;
        let mut constraints = Vec::with_capacity(cmds.len());
        for cmd in &cmds {
            let constraint = match &cmd.version_constraint {
                Some(text) => Some(text.parse::<VersionConstraint>().map_err(|e| RpcError::invalid(e.to_string()))?),
                None => None,
            };
            constraints.push(constraint);
        }
        let endpoints = cmds
            .iter()
            .zip(&constraints)
            .map(|(cmd, c)| routing.resolve(cmd, c.as_ref(), &[]))
            .collect::<Result<_, _>>()?;
        Ok(Plan {
            request_id: u,
            constraints,
            endpoints,
            routing,
            dep_count: deps.iter().map(Vec::len).collect(),
            level_count: levels.iter().map(|l| l + 1).max().unwrap_or(0),
            cmds,
            index,
            dependants,
            levels,
        })
    }

    /// Whether every command runs in place (no task, no remote call): such a plan
    /// completes in its first poll.
    pub fn is_inline(&self) -> bool {
        self.endpoints.iter().all(|e| matches!(e, Endpoint::Local(f) if f.is_inline()))
    }

    /// How many levels (longest dependency chain) the plan has.
    pub fn level_count(&self) -> usize {
        self.level_count
    }

    /// The level of each command: 0 for no dependencies, else 1 + the deepest dependency.
    pub fn levels(&self) -> &[usize] {
        &self.levels
    }

    /// Commands no other command references: their results form `r`.
    pub fn sinks(&self) -> impl Iterator<Item = &str> {
        (0..self.cmds.len()).filter(|&i| self.is_sink(i)).map(|i| self.cmds[i].name.as_str())
    }

    fn is_sink(&self, i: usize) -> bool {
        self.dependants[i].is_empty()
    }
}

/// Command name -> position. Requests of a few commands (the common case) scan the names
/// instead of building a hash map: no allocation, and faster for a handful of names.
#[derive(Debug)]
struct NameIndex {
    map: Option<HashMap<String, usize>>,
}

impl NameIndex {
    const SCAN_LIMIT: usize = 16;

    /// Indexes the names; a repeated name is a request error.
    fn build(cmds: &[RpcCommand]) -> Result<Self, RpcError> {
        let duplicate = |name: &str| RpcError::invalid(format!("duplicate command name: {name}"));
        if cmds.len() <= Self::SCAN_LIMIT {
            for (i, cmd) in cmds.iter().enumerate() {
                if cmds[..i].iter().any(|earlier| earlier.name == cmd.name) {
                    return Err(duplicate(&cmd.name));
                }
            }
            return Ok(NameIndex { map: None });
        }
        let mut map = HashMap::with_capacity(cmds.len());
        for (i, cmd) in cmds.iter().enumerate() {
            if map.insert(cmd.name.clone(), i).is_some() {
                return Err(duplicate(&cmd.name));
            }
        }
        Ok(NameIndex { map: Some(map) })
    }
}

/// Finds commands by name.
#[derive(Clone, Copy)]
struct Lookup<'a> {
    cmds: &'a [RpcCommand],
    index: &'a NameIndex,
}

impl Lookup<'_> {
    fn get(&self, name: &str) -> Option<usize> {
        match &self.index.map {
            Some(map) => map.get(name).copied(),
            None => self.cmds.iter().position(|c| c.name == name),
        }
    }
}

/// Indices of the commands that `cmd` references, sorted and unique.
fn references(cmd: &RpcCommand, index: &Lookup<'_>) -> Vec<usize> {
    fn walk(value: &Value, index: &Lookup<'_>, found: &mut Vec<usize>) {
        match value {
            Value::String(s) => {
                found.extend(index.get(s));
                found.extend(s.split_once('.').and_then(|(base, _)| index.get(base)));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, index, found)),
            Value::Object(map) => map.values().for_each(|v| walk(v, index, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    cmd.args.iter().chain(cmd.kwargs.values()).for_each(|v| walk(v, index, &mut found));
    found.sort_unstable();
    found.dedup();
    found
}

/// Longest-path level of every command (Kahn's algorithm); a cycle is a request error.
fn levels(cmds: &[RpcCommand], deps: &[Vec<usize>], dependants: &[Vec<usize>]) -> Result<Vec<usize>, RpcError> {
    let n = cmds.len();
    let mut remaining: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut level = vec![0; n];
    let mut queue: VecDeque<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = queue.pop_front() {
        done += 1;
        for &j in &dependants[i] {
            level[j] = level[j].max(level[i] + 1);
            remaining[j] -= 1;
            if remaining[j] == 0 {
                queue.push_back(j);
            }
        }
    }
    if done == n {
        return Ok(level);
    }
    Err(RpcError::invalid(format!("dependency cycle: {}", describe_cycle(cmds, deps, &remaining))))
}

/// Walks dependencies among the commands left in a cycle until one repeats.
fn describe_cycle(cmds: &[RpcCommand], deps: &[Vec<usize>], remaining: &[usize]) -> String {
    let Some(start) = (0..cmds.len()).find(|&i| remaining[i] > 0) else {
        return String::new();
    };
    let mut path = vec![start];
    let mut seen = HashMap::from([(start, 0)]);
    let mut at = start;
    // Every command left over waits on another left-over command.
    while let Some(&next) = deps[at].iter().find(|&&d| remaining[d] > 0) {
        if let Some(&pos) = seen.get(&next) {
            let mut cycle: Vec<&str> = path[pos..].iter().map(|&i| cmds[i].name.as_str()).collect();
            cycle.push(&cmds[next].name);
            // Report in the order the data flows: a -> b means b uses a.
            cycle.reverse();
            return cycle.join(" -> ");
        }
        seen.insert(next, path.len());
        path.push(next);
        at = next;
    }
    cmds[start].name.clone()
}

/// Replaces, in place, references in `value` by results of completed commands.
fn substitute(value: &mut Value, results: &[Option<Value>], index: &Lookup<'_>) {
    match value {
        Value::String(s) => {
            if let Some(resolved) = resolve_reference(s, results, index) {
                *value = resolved;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| substitute(v, results, index)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute(v, results, index)),
        _ => {}
    }
}

fn resolve_reference(s: &str, results: &[Option<Value>], index: &Lookup<'_>) -> Option<Value> {
    // A string containing a dot is always read as base.path (the reference's rule).
    let Some((base, path)) = s.split_once('.') else {
        return index.get(s).and_then(|i| results[i].clone());
    };
    let mut at = results[index.get(base)?].as_ref()?;
    for key in path.split('.') {
        at = at.as_object()?.get(key)?;
    }
    Some(at.clone())
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
    next: usize,
    started: Instant,
    last_completed: Instant,
    times_ms: Vec<f64>,
}

/// Runs `plan`; the first failing command fails the whole request.
pub async fn execute(
    mut plan: Plan,
    options: ReportOptions,
    observer: &mut impl LevelObserver,
) -> Result<Outcome, RpcError> {
    let n = plan.cmds.len();
    let mut results: Vec<Option<Value>> = vec![None; n];
    let mut dep_count = std::mem::take(&mut plan.dep_count);
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| dep_count[i] == 0).collect();
    // Created on first use: a request of inline functions never needs it.
    let mut running: Option<FuturesUnordered<Running>> = None;
    let mut completed = 0;
    let track_levels = options.intermediate_results || options.observe_levels || options.execution_summary;
    let mut tracker = track_levels.then(|| {
        let now = Instant::now();
        LevelTracker {
            remaining: plan.levels.iter().fold(vec![0; plan.level_count], |mut acc, &l| {
                acc[l] += 1;
                acc
            }),
            next: 0,
            started: now,
            last_completed: now,
            times_ms: Vec::new(),
        }
    });
    let mut reports = Vec::new();

    while completed < n {
        while let Some(i) = ready.pop_front() {
            // Each command's arguments are used once: substitute in place, no copies.
            let mut args = std::mem::take(&mut plan.cmds[i].args);
            let mut kwargs = std::mem::take(&mut plan.cmds[i].kwargs);
            let lookup = Lookup { cmds: &plan.cmds, index: &plan.index };
            for value in args.iter_mut().chain(kwargs.values_mut()) {
                substitute(value, &results, &lookup);
            }
            let call = CallArgs { args, kwargs };
            let types = ArgTypes::of(&call.args);
            match &plan.endpoints[i] {
                Endpoint::Local(function) if function.is_inline() => {
                    let result = function
                        .invoke_inline(call)
                        .unwrap_or_else(|| Err(FunctionError::new("Internal", "not inline")));
                    let value = result.map_err(|e| failure(&plan.cmds[i], None, &e, &types))?;
                    completed += 1;
                    finish(&plan, i, value, &mut results, &mut dep_count, &mut ready, tracker.as_mut());
                }
                endpoint => {
                    let future = dispatch(&plan, i, endpoint.clone(), call, types);
                    running.get_or_insert_with(FuturesUnordered::new).push(future);
                }
            }
            if let Some(tracker) = tracker.as_mut() {
                // Inline completions may close levels before anything else runs.
                drain_levels(&plan, &results, tracker, &mut reports, options, observer).await;
            }
        }
        if completed == n {
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
        let value = result?;
        completed += 1;
        finish(&plan, i, value, &mut results, &mut dep_count, &mut ready, tracker.as_mut());
        if let Some(tracker) = tracker.as_mut() {
            drain_levels(&plan, &results, tracker, &mut reports, options, observer).await;
        }
    }

    let mut r = Map::new();
    for (i, result) in results.iter_mut().enumerate() {
        if plan.is_sink(i) {
            r.insert(std::mem::take(&mut plan.cmds[i].name), result.take().unwrap_or(Value::Null));
        }
    }
    let execution_summary = match (&tracker, options.execution_summary) {
        (Some(tracker), true) => Some(summary(&plan, tracker)),
        _ => None,
    };
    Ok(Outcome {
        r: Value::Object(r),
        intermediate_results: if options.intermediate_results { reports } else { Vec::new() },
        execution_summary,
    })
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

/// The 1003 details: command, function, node (when remote), error, argument types.
fn failure(cmd: &RpcCommand, node: Option<&str>, error: &FunctionError, types: &ArgTypes) -> RpcError {
    let node = node.map(|n| format!(" node={n}")).unwrap_or_default();
    RpcError::execution_failed(format!(
        "Function execution failed: command={} fun={}{node} error={error} args_types=[{types}]",
        cmd.name, cmd.fun
    ))
}

type Running = LocalBoxFuture<'static, (usize, Result<Value, RpcError>)>;

/// Starts a command that does not complete in place.
fn dispatch(plan: &Plan, i: usize, endpoint: Endpoint, call: CallArgs, types: ArgTypes) -> Running {
    let cmd = plan.cmds[i].clone();
    match endpoint {
        Endpoint::Local(function) => {
            async move { (i, function.invoke(call).await.map_err(|e| failure(&cmd, None, &e, &types))) }.boxed_local()
        }
        Endpoint::Remote(target) => {
            let routing = plan.routing.clone();
            let constraint = plan.constraints[i].clone();
            async move { (i, run_remote(&routing, &cmd, constraint.as_ref(), target, call, &types).await) }
                .boxed_local()
        }
    }
}

/// Runs a command on another node. A failure of the function fails the request (1003,
/// naming the node); a node or link that goes away before answering gets one retry on
/// another match, else 1005.
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
        let reason = match fabric.call(&target.node, &cmd.name, &target.identity, call.clone()).await {
            CallOutcome::Ok { value } => return Ok(value),
            CallOutcome::Failed { error, node } => {
                return Err(failure(cmd, Some(&node), &error, types));
            }
            CallOutcome::NotFound { node } => format!("function no longer on node {node}"),
            // Unreachable includes a node or link that went away before answering.
            CallOutcome::Unreachable { reason } => reason,
        };
        tried.push(target.node.clone());
        let retry = if tried.len() < 2 { routing.resolve(cmd, constraint, &tried).ok() } else { None };
        match retry {
            Some(Endpoint::Remote(next)) => target = next,
            Some(Endpoint::Local(function)) => {
                return function.invoke(call).await.map_err(|e| failure(cmd, None, &e, types));
            }
            None => {
                return Err(RpcError::unreachable(format!(
                    "command={} fun={} node={}: {reason}",
                    cmd.name, cmd.fun, target.node
                )))
            }
        }
    }
}

fn finish(
    plan: &Plan,
    i: usize,
    value: Value,
    results: &mut [Option<Value>],
    dep_count: &mut [usize],
    ready: &mut VecDeque<usize>,
    tracker: Option<&mut LevelTracker>,
) {
    results[i] = Some(value);
    if let Some(tracker) = tracker {
        tracker.remaining[plan.levels[i]] -= 1;
    }
    for &j in &plan.dependants[i] {
        dep_count[j] -= 1;
        if dep_count[j] == 0 {
            ready.push_back(j);
        }
    }
}

async fn drain_levels(
    plan: &Plan,
    results: &[Option<Value>],
    tracker: &mut LevelTracker,
    reports: &mut Vec<Value>,
    options: ReportOptions,
    observer: &mut impl LevelObserver,
) {
    while tracker.next < plan.level_count && tracker.remaining[tracker.next] == 0 {
        let level = tracker.next;
        let now = Instant::now();
        let took = now.duration_since(tracker.last_completed).as_secs_f64() * 1000.0;
        tracker.last_completed = now;
        tracker.times_ms.push(took);
        tracker.next += 1;
        if !(options.intermediate_results || options.observe_levels) {
            continue;
        }
        let mut level_results = Map::new();
        let mut accumulated = Map::new();
        for (i, cmd) in plan.cmds.iter().enumerate() {
            if plan.levels[i] <= level {
                let value = results[i].clone().unwrap_or(Value::Null);
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
        reports.push(report);
    }
}

fn summary(plan: &Plan, tracker: &LevelTracker) -> Value {
    let total = tracker.started.elapsed().as_secs_f64() * 1000.0;
    let bottleneck = tracker.times_ms.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
    let average = if tracker.times_ms.is_empty() {
        0.0
    } else {
        tracker.times_ms.iter().sum::<f64>() / tracker.times_ms.len() as f64
    };
    json!({
        "request_id": plan.request_id,
        "total_execution_time_ms": total,
        "total_levels": plan.level_count,
        "level_execution_times": tracker.times_ms,
        "bottleneck_level_index": bottleneck,
        "average_level_time_ms": average,
        "parallel_commands_executed": plan.cmds.len(),
        "cross_cluster_hops": 0,
    })
}

#[cfg(test)]
mod tests;
