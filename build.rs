//! Lays out the release binary's code so that a node's resident memory is small: the
//! functions a node runs are linked first, together (`layout/node.order`, made by
//! `layout/generate.sh`), so the pages a node maps hold its code rather than the CLI's,
//! the benches' and the client's. See `layout/README.md`.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=layout/node.order");
    println!("cargo:rerun-if-env-changed=MPREG_CODE_LAYOUT");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if env::var("PROFILE").as_deref() != Ok("release") || env::var("MPREG_CODE_LAYOUT").as_deref() == Ok("off") {
        return;
    }
    // `--symbol-ordering-file` is an lld option: rustc links with its own lld on this
    // target from 1.90 on, unless told to use another linker (RUSTFLAGS, or a `linker`
    // in cargo's configuration, which it passes as RUSTC_LINKER).
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("fuse-ld") || flags.contains("linker") || env::var_os("RUSTC_LINKER").is_some() {
        println!("cargo:warning=a linker is configured: the code layout of layout/node.order is not applied");
        return;
    }
    if rustc_minor().is_none_or(|minor| minor < 90) {
        println!("cargo:warning=rustc before 1.90 links with the system linker: layout/node.order is not applied");
        return;
    }
    let order = format!("{}/layout/node.order", env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned()));
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
    // Functions renamed or gone since the file was made are skipped, silently.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// The minor version of the rustc that builds this crate (`rustc 1.95.0 (...)` -> 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
