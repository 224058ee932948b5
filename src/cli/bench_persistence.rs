//! `mpreg bench persistence`: the durable-write floor and group commit, on this disk.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use mpreg_actors::persistence::bench;
use serde_json::json;

/// Flags of `mpreg bench persistence`.
#[derive(Debug, clap::Args)]
pub struct PersistenceBenchArgs {
    /// Sequential durable writes measured (the grouped run does 4x as many).
    #[arg(long, default_value_t = 2000)]
    pub ops: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Directory for the scratch stores (default: a temp dir on the system's temp disk;
    /// point it at the data disk to measure that disk).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs both scenarios and prints them.
pub fn run(args: PersistenceBenchArgs) -> anyhow::Result<i32> {
    let scratch = match &args.dir {
        Some(dir) => tempfile::Builder::new().prefix("mpreg-bench-").tempdir_in(dir),
        None => tempfile::Builder::new().prefix("mpreg-bench-").tempdir(),
    }
    .context("scratch directory")?;
    let figures = actix_rt::System::new().block_on(bench::run(scratch.path(), args.ops, args.value_bytes, 256))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", json!({ "results": figures }))?;
    } else {
        writeln!(
            out,
            "{:<34} {:>12} {:>10} {:>10} {:>8} {:>10} {:>8}",
            "scenario", "ops/s", "p50 µs", "p99 µs", "ops", "ops/sync", "sync s"
        )?;
        for f in &figures {
            writeln!(
                out,
                "{:<34} {:>12.0} {:>10.1} {:>10.1} {:>8} {:>10.1} {:>8.2}",
                f.name,
                f.calls_per_s,
                f.p50_us,
                f.p99_us,
                f.ops,
                f.ops as f64 / f.syncs.max(1) as f64,
                f.sync_seconds
            )?;
        }
    }
    Ok(0)
}
