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
//! Small plans run on the connection's own thread (DESIGN.md §4), so there is no Planner
//! mailbox on the hot path; what would be its state (the function table) is a snapshot
//! read without locking. Large plans, and runs that have built more than a threshold in
//! place ([`Placement::InPlace`], [`Step::Paused`]), continue on the supervised
//! [`Planner`] actor's own thread, so other connections keep their latency.
//!
//! Running is `execution.rs`. Every run is bounded ([`Limits`], `budget.rs`): values substituted into arguments, the
//! reply with its intermediate results, and the nesting of results are counted as the work
//! happens, and a request that would exceed a bound fails with 1002 naming it.
//!
//! References: a string anywhere in `args` or `kwargs` (recursively through arrays and
//! object VALUES, never keys) equal to a command name references it; `name.a.b` references
//! `name` and follows object keys `a`, `b` when substituted. A path that cannot be followed
//! is passed through as the literal string.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

use crate::protocol::{RpcCommand, RpcError, RpcRequest};
use crate::routing::{Endpoint, Routing};
use crate::version::VersionConstraint;

mod actor;
mod budget;
mod execution;

pub use actor::{Answer, Job, Planner, RunJob};
pub use budget::{footprint, Budget, Footprint, Limit, LimitExceeded, Limits};
pub use execution::{
    execute, Execution, LevelObserver, LevelReport, NoObserver, Outcome, Placement, ReportOptions, Step,
};

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
    /// References held by each command (see [`references`]).
    occurrences: Vec<u32>,
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
        let (deps, occurrences): (Vec<Vec<usize>>, Vec<u32>) = cmds.iter().map(|cmd| references(cmd, &lookup)).unzip();
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
            occurrences,
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

/// Indices of the commands that `cmd` references, sorted and unique, and how many
/// references it holds (at least the number of values substitution will copy).
fn references(cmd: &RpcCommand, index: &Lookup<'_>) -> (Vec<usize>, u32) {
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
    let occurrences = u32::try_from(found.len()).unwrap_or(u32::MAX);
    found.sort_unstable();
    found.dedup();
    (found, occurrences)
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod budget_tests;
