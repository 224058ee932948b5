//! `mpreg bench rpc` — written next.

/// Flags of `mpreg bench rpc`.
#[derive(Debug, clap::Args)]
pub struct RpcBenchArgs {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn rpc(_args: RpcBenchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
