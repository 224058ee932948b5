//! Clusters exchanging route updates in memory: the federation cores of several clusters
//! wired by simulated bridges, for tests and for `mpreg bench federation --simulate N`.
//!
//! Every cluster gets its own authority and first route key; clusters pin each other's
//! authorities (except those named unpinned). A round lets every cluster send
//! [`FederationCore::outgoing`] to its linked neighbours, which [`FederationCore::receive`]
//! it; [`Simulation::exchange`] runs rounds until no table changes. Signatures are real
//! (ed25519 sign and `verify_strict`), so the time a round takes is the core's real cost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::Serialize;

use super::core::{FederationConfig, FederationCore};
use super::keys::{RouteKeyRing, RouteSigner};
use super::{ClusterId, RouteRejection};
use crate::fabric::trust::Authority;

/// Clusters and their federation cores.
pub struct Simulation {
    /// Each cluster's authority.
    pub authorities: BTreeMap<ClusterId, Authority>,
    /// Each cluster's core.
    pub cores: BTreeMap<ClusterId, FederationCore>,
}

/// What one [`Simulation::exchange`] did.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// Rounds until nothing changed (the last, quiet round included).
    pub rounds: usize,
    /// Updates signed, sent and opened.
    pub delivered: usize,
    /// Refused updates: sender, receiver, reason.
    pub refused: Vec<(ClusterId, ClusterId, RouteRejection)>,
}

/// `mpreg bench federation --simulate N`: N clusters in a line converging.
#[derive(Debug, Clone, Serialize)]
pub struct LineReport {
    /// Clusters in the line.
    pub clusters: usize,
    /// Rounds until every cluster routes to every other and nothing changes.
    pub rounds: usize,
    /// Updates signed and verified on the way.
    pub updates: usize,
    /// Wall time of the whole exchange (one thread).
    pub seconds: f64,
    /// Whether every cluster ended with a route to every other.
    pub converged: bool,
}

impl Simulation {
    /// Clusters `names`, none linked yet, their keys made at `now_s` (Unix seconds).
    pub fn new(names: &[&str], unpinned: &[&str], now_s: u64) -> Self {
        let authorities: BTreeMap<ClusterId, Authority> =
            names.iter().map(|n| (n.to_string(), Authority::generate())).collect();
        let cores = names
            .iter()
            .map(|n| {
                let mut ring = RouteKeyRing::default();
                for (other, authority) in &authorities {
                    if other != n && !unpinned.contains(&other.as_str()) {
                        ring.pin(other, authority.public_key());
                    }
                }
                let signer = RouteSigner::first(&authorities[*n], n, now_s);
                (n.to_string(), FederationCore::new(FederationConfig::new(n), signer, ring))
            })
            .collect();
        Simulation { authorities, cores }
    }

    /// A core by cluster id (panics on an unknown id: simulations name their clusters).
    pub fn core(&mut self, name: &str) -> &mut FederationCore {
        self.cores.get_mut(name).unwrap_or_else(|| panic!("no cluster {name} in the simulation"))
    }

    /// Opens a bridge between `a` and `b`; each learns the other's key chain over it.
    pub fn link(&mut self, a: &str, b: &str) {
        self.core(a).link_up(b);
        self.core(b).link_up(a);
        let chain_a = self.core(a).own_chain().to_vec();
        let chain_b = self.core(b).own_chain().to_vec();
        // A cluster that does not pin the other refuses its chain; its updates are then
        // refused too, which is what the caller wants to see.
        let _ = self.core(b).learn_keys(a, &chain_a);
        let _ = self.core(a).learn_keys(b, &chain_b);
    }

    /// Closes the bridge between `a` and `b`.
    pub fn cut(&mut self, a: &str, b: &str, now_ms: u64) {
        self.core(a).link_down(b, now_ms);
        self.core(b).link_down(a, now_ms);
    }

    /// Rounds of updates at `now_ms` until no table changes (at most twice the number of
    /// clusters plus two).
    pub fn exchange(&mut self, now_ms: u64) -> Exchange {
        let mut exchange = Exchange::default();
        let names: Vec<ClusterId> = self.cores.keys().cloned().collect();
        for _ in 0..(2 * names.len() + 2) {
            exchange.rounds += 1;
            let mut changed = false;
            for from in &names {
                for (to, updates) in self.core(from).outgoing(now_ms) {
                    for update in updates {
                        exchange.delivered += 1;
                        match self.core(&to).receive(from, &update, now_ms) {
                            Ok(c) => changed |= c,
                            Err(r) => exchange.refused.push((from.clone(), to.clone(), r.reason)),
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        exchange
    }

    /// The path `from` selects to `to` (`from` first), if any.
    pub fn path(&self, from: &str, to: &str, now_ms: u64) -> Option<Vec<ClusterId>> {
        self.cores.get(from).and_then(|core| core.table().explain(to, &[], now_ms).selected)
    }

    /// N clusters in a line (`c0 – c1 – … – cN-1`), linked, exchanging until quiet.
    pub fn converge_line(clusters: usize, now_ms: u64) -> LineReport {
        let names: Vec<String> = (0..clusters).map(|i| format!("c{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut sim = Simulation::new(&refs, &[], now_ms / 1000);
        for pair in refs.windows(2) {
            sim.link(pair[0], pair[1]);
        }
        let started = Instant::now();
        let exchange = sim.exchange(now_ms);
        let seconds = started.elapsed().as_secs_f64();
        let converged = refs.iter().all(|from| {
            let reached: BTreeSet<&str> =
                refs.iter().copied().filter(|to| to != from && sim.path(from, to, now_ms).is_some()).collect();
            reached.len() == clusters - 1
        });
        LineReport { clusters, rounds: exchange.rounds, updates: exchange.delivered, seconds, converged }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_of_eight_converges_and_every_path_is_the_line() {
        let report = Simulation::converge_line(8, 1_800_000_000_000);
        assert!(report.converged, "{report:?}");
        assert!(report.rounds <= 18, "{report:?}");
    }
}
