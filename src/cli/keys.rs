//! `mpreg keys init DIR`, `mpreg keys issue DIR NAME` and `mpreg keys rotate DIR`: a cluster
//! authority, node credentials and federation route keys (the logic and the file formats
//! live in `mpreg_actors::fabric::trust` and `mpreg_actors::federation::keys`).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use mpreg_actors::fabric::trust::{self, Authority};
use mpreg_actors::federation::keys as route_keys;

/// Creates `dir/cluster.key` (0600) and `dir/cluster.pub`; prints the public key.
pub fn init(dir: &Path) -> anyhow::Result<i32> {
    let authority = Authority::generate();
    authority.save(dir).with_context(|| format!("cannot create a cluster authority in {}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", authority.public_hex())?;
    Ok(0)
}

/// Creates `dir/NAME.cred` (0600) signed by the authority in `dir`; prints its path.
pub fn issue(dir: &Path, name: &str, cluster_id: &str, valid_days: u64) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..",
        "node name {name:?} cannot be a file name"
    );
    anyhow::ensure!(valid_days > 0, "--valid-days must be at least 1");
    let authority =
        Authority::load(dir).with_context(|| format!("no usable cluster authority in {}", dir.display()))?;
    let valid_s = valid_days.saturating_mul(86_400);
    let credentials = authority.issue(name, cluster_id, trust::unix_seconds(), valid_s)?;
    let path = dir.join(format!("{name}.cred"));
    credentials.save(&path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", path.display())?;
    Ok(0)
}

/// Makes the first or the next route key in `dir/route.key`; prints generation and key id.
pub fn rotate(dir: &Path, cluster_id: &str, overlap_s: u64) -> anyhow::Result<i32> {
    let rotation = route_keys::rotate_in_dir(dir, cluster_id, trust::unix_seconds(), overlap_s)
        .with_context(|| format!("cannot rotate the route key in {}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "generation={} key_id={} file={}", rotation.generation, rotation.key_id, rotation.path.display())?;
    Ok(0)
}
