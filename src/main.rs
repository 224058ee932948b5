//! The `mpreg` command; everything it does lives in `mpreg::cli`.

use clap::Parser;

fn main() {
    limit_malloc_arenas();
    let cli = mpreg::cli::Cli::parse();
    match mpreg::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory
/// freed in one arena is not reused by another: a node's few threads (listener workers,
/// monitor, planner, committer) each kept their own partly empty heap: 0.4-1.7 MiB of a
/// 64-node cluster member's 4.6-5.8 MiB of private memory (more on a busier machine). One arena shared by all of them;
/// the per-thread caches in front of it still serve small allocations without its lock.
/// `MALLOC_ARENA_MAX` in the environment, when set, is left to decide.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first in `main`, before any other thread exists; mallopt only
        // sets a malloc parameter and reports failure by returning 0 (ignored: the
        // default arenas are then kept, which is correct, only larger).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
