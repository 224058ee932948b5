//! Registry: the functions this node serves, and the snapshot the request path reads.
//!
//! Who sends to it: the node handle and the WorkerHub (`RegisterFunctions` after start,
//! `UnregisterFunctions` for workers), the supervisor (fault injection). Whom it calls:
//! FabricGossip (`LocalFunctionsChanged`, fire and forget: the catalog also refreshes
//! periodically). Each message is one change: its functions enter (or leave) the table
//! together, all or none, and reach other nodes in one catalog update. Invariants: one function_id per name and one
//! name per function_id; an identity (name, id, version) is registered once.
//!
//! The request path never sends it a message: the actor owns MUTATION and publishes an
//! immutable [`FunctionTable`] through a shared [`TableHandle`] (an `Arc` swapped on
//! change), which connections read lock-free (DESIGN.md §4).
//!
//! What a restart loses: nothing. The table lives in the shared handle, outside the actor,
//! and a new Registry starts from the last published table.

use std::collections::HashMap;
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};
use arc_swap::ArcSwap;

use crate::fabric::wire::{FunctionAbout, MAX_ABOUT_BYTES};
use crate::fabric::{FabricGossip, LocalFunctionsChanged};
use crate::function::{FunctionIdentity, FunctionSpec};
use crate::protocol::RpcCommand;
use crate::supervisor::{ChildGuard, Slot};
use crate::version::VersionConstraint;

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The same name, id and version are already registered.
    #[error("function {name} (id {function_id}, version {version}) is already registered")]
    Duplicate {
        /// Function name.
        name: String,
        /// Function id.
        function_id: String,
        /// Version.
        version: String,
    },
    /// The name is registered under another id, or the id under another name.
    #[error("identity conflict: {0}")]
    Conflict(String),
    /// The declared parameters do not parse or do not fit the function's code.
    #[error("parameters: {0}")]
    Parameters(String),
    /// The registry actor is not running (restarting or stopped).
    #[error("registry unavailable")]
    Unavailable,
}

/// Every local function, by name. Immutable once published.
#[derive(Debug, Clone, Default)]
pub struct FunctionTable {
    by_name: HashMap<String, Vec<FunctionSpec>>,
}

impl FunctionTable {
    /// Adds a function, enforcing the identity rules.
    pub fn register(&mut self, spec: FunctionSpec) -> Result<(), RegistryError> {
        if let Some(error) = spec.declaration_error() {
            return Err(RegistryError::Parameters(error.to_owned()));
        }
        let id = spec.identity().clone();
        if let Some(existing) = self.by_name.get(&id.name).and_then(|v| v.first()) {
            // A built-in served to local clients only (discovery) is not shadowed by, nor
            // does it shadow, another version under its name.
            if existing.is_local_only() || spec.is_local_only() {
                return Err(RegistryError::Conflict(format!("name {} is reserved for a built-in", id.name)));
            }
            if existing.identity().function_id != id.function_id {
                return Err(RegistryError::Conflict(format!(
                    "name {} is registered with function_id {}, not {}",
                    id.name,
                    existing.identity().function_id,
                    id.function_id
                )));
            }
        }
        if let Some(other) = self
            .by_name
            .values()
            .flatten()
            .find(|s| s.identity().function_id == id.function_id && s.identity().name != id.name)
        {
            return Err(RegistryError::Conflict(format!(
                "function_id {} is registered for name {}, not {}",
                id.function_id,
                other.identity().name,
                id.name
            )));
        }
        let versions = self.by_name.entry(id.name.clone()).or_default();
        if versions.iter().any(|s| s.identity().version == id.version) {
            return Err(RegistryError::Duplicate {
                name: id.name,
                function_id: id.function_id,
                version: id.version.to_string(),
            });
        }
        versions.push(spec);
        Ok(())
    }

    /// Adds every function of `specs`, or none: the index of the first one refused, and
    /// why (the table is then unchanged).
    pub fn register_all(&mut self, specs: Vec<FunctionSpec>) -> Result<(), (usize, RegistryError)> {
        let mut next = self.clone();
        for (i, spec) in specs.into_iter().enumerate() {
            next.register(spec).map_err(|e| (i, e))?;
        }
        *self = next;
        Ok(())
    }

    /// Removes the worker-served function with exactly this identity (the node's own
    /// functions are never removed); whether there was one.
    pub fn unregister_external(&mut self, identity: &FunctionIdentity) -> bool {
        let Some(versions) = self.by_name.get_mut(&identity.name) else { return false };
        let before = versions.len();
        versions.retain(|s| !(s.is_external() && s.identity() == identity));
        let removed = versions.len() < before;
        if versions.is_empty() {
            self.by_name.remove(&identity.name);
        }
        removed
    }

    /// The local functions a command may call (DESIGN.md §7): name, function_id, version
    /// constraint, `locs` ⊆ resources, `target_cluster`. Choosing among them (and among
    /// remote ones) is `routing::Routing::resolve`.
    pub fn candidates<'a>(
        &'a self,
        cmd: &'a RpcCommand,
        constraint: Option<&'a VersionConstraint>,
        cluster_id: &str,
    ) -> impl Iterator<Item = &'a FunctionSpec> + 'a {
        let cluster_ok = cmd.target_cluster.as_deref().is_none_or(|c| c == cluster_id);
        self.by_name
            .get(&cmd.fun)
            .into_iter()
            .flatten()
            .filter(move |spec| cluster_ok && matches(spec.identity(), cmd, constraint))
    }

    /// The function with exactly this identity (serving a call routed from another node).
    pub fn find_exact(&self, identity: &FunctionIdentity) -> Option<&FunctionSpec> {
        self.by_name.get(&identity.name)?.iter().find(|s| {
            let id = s.identity();
            id.function_id == identity.function_id && id.version == identity.version
        })
    }

    /// Every identity the catalog advertises (local-only functions are not), sorted.
    pub fn identities(&self) -> Vec<FunctionIdentity> {
        let mut all: Vec<_> =
            self.by_name.values().flatten().filter(|s| !s.is_local_only()).map(|s| s.identity().clone()).collect();
        all.sort();
        all
    }
}

impl FunctionTable {
    /// What the catalog tells about the advertised functions: declared parameters and
    /// documentation, each cut to what a catalog entry may carry, and which ones a worker
    /// serves.
    pub fn about(&self) -> Vec<FunctionAbout> {
        let mut out: Vec<FunctionAbout> = self
            .specs()
            .filter(|s| !s.is_local_only())
            .filter(|s| s.declared_signature().is_some() || s.documentation().is_some() || s.is_external())
            .map(|s| {
                let id = s.identity();
                FunctionAbout {
                    name: id.name.clone(),
                    function_id: id.function_id.clone(),
                    version: id.version,
                    params: s.declared_signature().map(ToString::to_string).filter(|p| p.len() <= MAX_ABOUT_BYTES),
                    doc: s.documentation().map(|d| cut(d, MAX_ABOUT_BYTES).to_owned()),
                    worker: s.is_external(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        out
    }

    /// Every registered function, local-only ones included.
    pub fn specs(&self) -> impl Iterator<Item = &FunctionSpec> {
        self.by_name.values().flatten()
    }
}

/// The longest prefix of `text` within `max` bytes that ends on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether a function with `identity` satisfies the command's filters (not the cluster).
pub fn matches(identity: &FunctionIdentity, cmd: &RpcCommand, constraint: Option<&VersionConstraint>) -> bool {
    cmd.function_id.as_ref().is_none_or(|id| *id == identity.function_id)
        && constraint.is_none_or(|c| c.matches(&identity.version))
        && cmd.locs.iter().all(|loc| identity.resources.contains(loc))
}

/// The published table, shared by the Registry (writer) and every connection (readers).
#[derive(Clone, Default)]
pub struct TableHandle(Arc<ArcSwap<FunctionTable>>);

impl TableHandle {
    /// A handle publishing `table`.
    pub fn new(table: FunctionTable) -> Self {
        TableHandle(Arc::new(ArcSwap::from_pointee(table)))
    }

    /// The current table; cheap (an `Arc` clone).
    pub fn current(&self) -> Arc<FunctionTable> {
        self.0.load_full()
    }

    fn publish(&self, table: FunctionTable) {
        self.0.store(Arc::new(table));
    }
}

/// Register functions on the running node, all or none, as one change (one catalog
/// update): the index of the first one refused, and why.
#[derive(Message)]
#[rtype(result = "Result<(), (usize, RegistryError)>")]
pub struct RegisterFunctions {
    /// The functions.
    pub specs: Vec<FunctionSpec>,
}

/// Remove worker-served functions (their last worker left), as one change; the node's own
/// functions stay. How many were removed.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct UnregisterFunctions {
    /// Exactly which functions.
    pub identities: Vec<FunctionIdentity>,
}

/// The Registry actor.
pub struct Registry {
    table: TableHandle,
    fabric: Slot<FabricGossip>,
    _guard: ChildGuard,
}

impl Registry {
    /// A registry publishing through `table` and announcing changes to `fabric`.
    pub fn new(table: TableHandle, fabric: Slot<FabricGossip>, guard: ChildGuard) -> Self {
        Registry { table, fabric, _guard: guard }
    }

    /// Makes `next` the current table and tells the fabric (it advertises the functions).
    fn publish(&self, next: FunctionTable) {
        let (functions, about) = (next.identities(), next.about());
        self.table.publish(next);
        if let Some(fabric) = self.fabric.get() {
            fabric.do_send(LocalFunctionsChanged { functions, about });
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<RegisterFunctions> for Registry {
    type Result = Result<(), (usize, RegistryError)>;

    fn handle(&mut self, msg: RegisterFunctions, _: &mut Context<Self>) -> Self::Result {
        let mut next = FunctionTable::clone(&self.table.current());
        next.register_all(msg.specs)?;
        self.publish(next);
        Ok(())
    }
}

impl Handler<UnregisterFunctions> for Registry {
    type Result = usize;

    fn handle(&mut self, msg: UnregisterFunctions, _: &mut Context<Self>) -> usize {
        let mut next = FunctionTable::clone(&self.table.current());
        let removed = msg.identities.iter().filter(|identity| next.unregister_external(identity)).count();
        if removed > 0 {
            self.publish(next);
        }
        removed
    }
}

crate::supervised_child!(Registry, "registry");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Version;

    fn ver(v: &'static str) -> FunctionSpec {
        FunctionSpec::sync("ver", move || v.to_owned()).function_id("demo.ver").version(v.parse().unwrap())
    }

    fn cmd(fun: &str) -> RpcCommand {
        RpcCommand::new("x", fun, vec![])
    }

    #[test]
    fn highest_matching_version_wins() {
        let mut table = FunctionTable::default();
        for v in ["1.0.0", "2.0.0", "1.5.0"] {
            table.register(ver(v)).unwrap();
        }
        let pick = |c: Option<&str>| {
            let c = c.map(|c| c.parse::<VersionConstraint>().unwrap());
            let ver = cmd("ver");
            table.candidates(&ver, c.as_ref(), "c").map(|s| s.identity().version).max()
        };
        assert_eq!(pick(None), Some(Version::new(2, 0, 0)));
        assert_eq!(pick(Some("<2")), Some(Version::new(1, 5, 0)));
        assert_eq!(pick(Some(">=3")), None);
    }

    #[test]
    fn identity_conflicts_are_refused() {
        let mut table = FunctionTable::default();
        table.register(ver("1.0.0")).unwrap();
        assert!(matches!(table.register(ver("1.0.0")), Err(RegistryError::Duplicate { .. })));
        let long_doc = "é".repeat(MAX_ABOUT_BYTES);
        table.register(FunctionSpec::sync("documented", |x: i64| x).params(["x"]).doc(&long_doc)).unwrap();
        let about = table.about();
        let documented = about.iter().find(|a| a.name == "documented").expect("told");
        assert_eq!(documented.params.as_deref(), Some("x"));
        assert!(documented.doc.as_ref().is_some_and(|d| d.len() <= MAX_ABOUT_BYTES && d.starts_with('é')));
        let builtin = FunctionSpec::sync("list_peers", || 1).local_only();
        table.register(builtin).unwrap();
        let shadow = FunctionSpec::sync("list_peers", || 2).version(Version::new(9, 0, 0));
        assert!(matches!(table.register(shadow), Err(RegistryError::Conflict(_))));
        let misdeclared = FunctionSpec::sync("two", |a: i64, b: i64| a + b).params(["a"]);
        assert!(matches!(table.register(misdeclared), Err(RegistryError::Parameters(_))));
        let other_id = FunctionSpec::sync("ver", || 1).function_id("other").version(Version::new(3, 0, 0));
        assert!(matches!(table.register(other_id), Err(RegistryError::Conflict(_))));
        let stolen_id = FunctionSpec::sync("thief", || 1).function_id("demo.ver");
        assert!(matches!(table.register(stolen_id), Err(RegistryError::Conflict(_))));
    }

    #[test]
    fn only_worker_functions_are_unregistered() {
        let mut table = FunctionTable::default();
        table.register(ver("1.0.0")).unwrap();
        let own = ver("1.0.0").identity().clone();
        assert!(!table.unregister_external(&own), "the node's own function stays");
        let served = FunctionIdentity { version: Version::new(2, 0, 0), ..own.clone() };
        let spec = FunctionSpec::external(served.clone(), |_| Box::pin(async { Ok(serde_json::Value::Null) }));
        table.register(spec).unwrap();
        assert_eq!(table.identities().len(), 2);
        assert!(table.unregister_external(&served));
        assert!(!table.unregister_external(&served));
        assert_eq!(table.identities(), vec![own]);
    }

    #[test]
    fn a_batch_registers_all_or_nothing() {
        let mut table = FunctionTable::default();
        table.register(ver("1.0.0")).unwrap();
        let fresh = FunctionSpec::sync("fresh", || 1);
        let (index, error) = table.register_all(vec![fresh.clone(), ver("2.0.0"), ver("1.0.0")]).unwrap_err();
        assert_eq!(index, 2);
        assert!(matches!(error, RegistryError::Duplicate { .. }), "{error}");
        assert_eq!(table.identities(), vec![ver("1.0.0").identity().clone()], "nothing of the batch entered");
        table.register_all(vec![fresh, ver("2.0.0")]).unwrap();
        assert_eq!(table.identities().len(), 3);
    }

    #[test]
    fn locs_must_be_a_subset_and_cluster_must_match() {
        let mut table = FunctionTable::default();
        table.register(FunctionSpec::sync("add", |a: i64, b: i64| a + b).resources(["cpu", "math"])).unwrap();
        let mut c = cmd("add");
        c.locs = vec!["cpu".into()];
        assert_eq!(table.candidates(&c, None, "local").count(), 1);
        c.locs.push("gpu".into());
        assert_eq!(table.candidates(&c, None, "local").count(), 0);
        c.locs.clear();
        c.target_cluster = Some("elsewhere".into());
        assert_eq!(table.candidates(&c, None, "local").count(), 0);
    }
}
