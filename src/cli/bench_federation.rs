//! `mpreg bench federation --simulate N`: N clusters in a line exchanging signed route
//! updates in memory (`mpreg_actors::federation::simulation`), every signature made and
//! checked for real: rounds and wall time until every cluster routes to every other.
//! Bridges between node processes are not built yet, so this measures the core only.

use std::io::Write;

use mpreg_actors::federation::simulation::Simulation;
use serde_json::json;

/// Flags of `mpreg bench federation`.
#[derive(Debug, clap::Args)]
pub struct FederationBenchArgs {
    /// Clusters in the simulated line (several sizes: repeat the flag).
    #[arg(long, default_values_t = [8])]
    pub simulate: Vec<usize>,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the simulations and prints them.
pub fn run(args: FederationBenchArgs) -> anyhow::Result<i32> {
    // A route's path holds at most 16 clusters (the table's max_path_len), so a longer
    // line cannot converge end to end, by design.
    if let Some(bad) = args.simulate.iter().find(|&&n| !(2..=16).contains(&n)) {
        anyhow::bail!("--simulate must be between 2 and 16 clusters (the longest route path), got {bad}");
    }
    let now_ms = mpreg_actors::fabric::trust::unix_seconds() * 1000;
    let reports: Vec<_> = args.simulate.iter().map(|&n| Simulation::converge_line(n, now_ms)).collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        let results: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({"name": "federation_converge_simulated", "clusters": r.clusters, "rounds": r.rounds,
                       "updates": r.updates, "seconds": r.seconds, "converged": r.converged})
            })
            .collect();
        writeln!(out, "{}", json!({ "results": results }))?;
    } else {
        writeln!(out, "{:>8} {:>7} {:>8} {:>10} {:>10}", "clusters", "rounds", "updates", "ms", "converged")?;
        for r in &reports {
            writeln!(
                out,
                "{:>8} {:>7} {:>8} {:>10.1} {:>10}",
                r.clusters,
                r.rounds,
                r.updates,
                r.seconds * 1000.0,
                r.converged
            )?;
        }
    }
    Ok(if reports.iter().all(|r| r.converged) { 0 } else { 1 })
}
