//! The quick demo: `cargo run --example quick_demo` (the same code as `mpreg demo`).
//!
//! Starts a three-node cluster in this process and shows automatic dependency
//! resolution, resource routing, concurrency over one connection and zero-configuration
//! clustering, checking every result; exits non-zero when a check fails. The code is in
//! `src/demo.rs` (`mpreg::demo::run_quick_demo`).

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    mpreg::demo::init_logging();
    mpreg::demo::run_quick_demo().await
}
