//! `mpreg demo`: the quick demo (`mpreg::demo::run_quick_demo`), the same code as
//! `cargo run --example quick_demo`.

/// Runs the quick demo in its own actix system; exit code 0 when every check passed.
pub fn run() -> anyhow::Result<i32> {
    crate::demo::init_logging();
    actix_rt::System::new().block_on(crate::demo::run_quick_demo())?;
    Ok(0)
}
