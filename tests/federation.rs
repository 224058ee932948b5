//! Federation from the outside: `mpreg keys rotate` makes route keys that chain to the
//! cluster authority, and a receiver trusts the new key while the old one overlaps;
//! `mpreg bench federation --simulate N` reports a converged line.

use mpreg_actors::fabric::trust::{self, Authority};
use mpreg_actors::federation::keys::{KeyRejection, RouteKeyRing, RouteSigner, ROUTE_KEY_FILE};

fn mpreg() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mpreg"))
}

fn rotate(dir: &std::path::Path, overlap_s: &str) -> std::process::Output {
    mpreg()
        .args(["keys", "rotate"])
        .arg(dir)
        .args(["--cluster-id", "cluster-b", "--overlap-s", overlap_s])
        .output()
        .unwrap()
}

fn key_id(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.split_whitespace().find_map(|w| w.strip_prefix("key_id=")).expect("key_id= printed").to_owned()
}

#[test]
fn keys_rotate_chains_route_keys_to_the_authority() {
    let dir = tempfile::tempdir().unwrap();
    // No authority yet: refused with a reason.
    let refused = rotate(dir.path(), "60");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot rotate"), "{refused:?}");

    let authority = Authority::generate();
    authority.save(dir.path()).unwrap();
    let first = rotate(dir.path(), "60");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).starts_with("generation=1 "));
    // The authority's secret is not needed for a rotation: only the current route key.
    std::fs::remove_file(dir.path().join(trust::AUTHORITY_KEY_FILE)).unwrap();
    let second = rotate(dir.path(), "60");
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(String::from_utf8_lossy(&second.stdout).starts_with("generation=2 "));

    let signer = RouteSigner::load(&dir.path().join(ROUTE_KEY_FILE), &authority.public_key()).unwrap();
    assert_eq!(signer.key_id(), key_id(&second));
    let mut ring = RouteKeyRing::default();
    ring.pin("cluster-b", authority.public_key());
    assert!(ring.learn_chain(signer.chain()).unwrap());
    let now = trust::unix_seconds();
    let sig = signer.sign_hex(b"announcement");
    assert_eq!(ring.verify("cluster-b", signer.key_id(), b"announcement", &sig, now), Ok(()));
    // The first key is still in its overlap window now, and retired after it.
    let first_id = key_id(&first);
    let unverifiable = signer.sign_hex(b"other");
    assert_eq!(
        ring.verify("cluster-b", &first_id, b"announcement", &unverifiable, now),
        Err(KeyRejection::BadSignature)
    );
    assert_eq!(
        ring.verify("cluster-b", &first_id, b"announcement", &unverifiable, now + 61),
        Err(KeyRejection::RetiredKey)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ROUTE_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn bench_federation_simulate_reports_a_converged_line() {
    let out = mpreg().args(["bench", "federation", "--simulate", "4", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let result = &report["results"][0];
    assert_eq!(result["name"], "federation_converge_simulated");
    assert_eq!(result["clusters"], 4);
    assert_eq!(result["converged"], true);
    assert!(result["updates"].as_u64().unwrap() > 0 && result["seconds"].as_f64().unwrap() > 0.0);
    // Beyond the longest route path: refused with the reason.
    let refused = mpreg().args(["bench", "federation", "--simulate", "17"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("longest route path"));
}
