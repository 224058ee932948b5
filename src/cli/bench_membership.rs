//! `mpreg bench membership --simulate N`: the SWIM membership protocol
//! (`mpreg_actors::fabric::swim`) in a simulated cluster of N members with message loss:
//! protocol periods until a join and a failure reach every member, and messages per
//! member per period.

use std::io::Write;

use mpreg_actors::fabric::swim::simulation::{SimConfig, Simulation};
use mpreg_actors::fabric::swim::SwimConfig;
use serde_json::json;

/// Flags of `mpreg bench membership`.
#[derive(Debug, clap::Args)]
pub struct MembershipBenchArgs {
    /// Members of the simulated cluster (several sizes: repeat the flag).
    #[arg(long, default_values_t = [1000])]
    pub simulate: Vec<usize>,
    /// Fraction of messages lost.
    #[arg(long, default_value_t = 0.05)]
    pub loss: f64,
    /// Seed of the simulation (the same seed gives the same run).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up on a stage after this many protocol periods.
    #[arg(long, default_value_t = 60.0)]
    pub max_periods: f64,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the simulations and prints them.
pub fn run(args: MembershipBenchArgs) -> anyhow::Result<i32> {
    if !(0.0..1.0).contains(&args.loss) {
        anyhow::bail!("--loss must be in [0, 1), got {}", args.loss);
    }
    let reports: Vec<_> = args
        .simulate
        .iter()
        .map(|&members| {
            let config =
                SimConfig { members, loss: args.loss, step: 0.1, seed: args.seed, swim: SwimConfig::default() };
            Simulation::join_and_failure(config, args.max_periods)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", json!({ "results": reports }))?;
        return Ok(0);
    }
    let periods = |p: Option<f64>| p.map_or_else(|| "never".to_owned(), |p| format!("{p:.1}"));
    writeln!(
        out,
        "{:>8} {:>6} {:>8} {:>10} {:>8} {:>14} {:>10} {:>12}",
        "members", "loss", "join", "suspected", "dead", "msgs/member/T", "suspected", "false deaths"
    )?;
    writeln!(
        out,
        "{:>8} {:>6} {:>8} {:>10} {:>8} {:>14} {:>10} {:>12}",
        "", "", "(T)", "(T)", "(T)", "", "at end", ""
    )?;
    for r in &reports {
        writeln!(
            out,
            "{:>8} {:>6.2} {:>8} {:>10} {:>8} {:>14.2} {:>10} {:>12}",
            r.members,
            r.loss,
            periods(r.join_periods),
            periods(r.failure_suspected_periods),
            periods(r.failure_dead_periods),
            r.messages_per_member_per_period,
            r.suspected_at_end,
            r.false_deaths
        )?;
    }
    Ok(0)
}
