//! A durable queue on a disk that really fills up: the node runs with its data dir on a
//! small tmpfs, mounted in a mount namespace of its own (`unshare --mount`, as root, or
//! with `--user --map-root-user` where unprivileged user namespaces are allowed). Durable
//! sends are acknowledged until the filesystem is full; from then on each is refused with
//! 1003 `not durable` and the node keeps serving. After `kill -9` and a restart on the
//! same filesystem (grown, so that the store has room again), every acknowledged message
//! comes back.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mpreg::client::QueueSendOptions;
use mpreg::{Client, ClientError};
use serde_json::json;

use common::process::printed_urls;

const SOON: Duration = Duration::from_secs(60);
/// The tmpfs, and its size for the restart (receiving rewrites each record with its new
/// receive count, so the second node needs room).
const TMPFS_MIB: u32 = 16;
const GROWN_MIB: u32 = 128;
/// Messages of 32 KiB: the disk fills after a few hundred.
const PAYLOAD_BYTES: usize = 32 * 1024;
const MAX_SENDS: usize = 2_000;

/// Mounts the tmpfs, starts a node on it, and when that node has died (the test kills it)
/// grows the tmpfs and starts a second node on the same data dir.
const SCRIPT: &str = r#"set -eu
mount -t tmpfs -o "size=${TMPFS_MIB}m" tmpfs "$MNT"
"$BIN" server start --port 0 --monitoring-port 0 --data-dir "$MNT/data" &
echo "$!" > "$PIDFILE"
wait "$!" || true
mount -o "remount,size=${GROWN_MIB}m" "$MNT"
exec "$BIN" server start --port 0 --monitoring-port 0 --data-dir "$MNT/data"
"#;

/// The script, in a mount namespace of its own; killed (with the first node) on drop.
struct Nodes {
    child: Child,
    pidfile: std::path::PathBuf,
}

impl Nodes {
    /// None where no mount namespace can be made (not root, and unprivileged user
    /// namespaces are off): then the test says it is skipped, except under CI (`CI` set),
    /// where it must run.
    fn start(dir: &Path) -> Option<Nodes> {
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let pidfile = dir.join("first.pid");
        // As root a mount namespace is enough; elsewhere a user namespace maps us to root.
        let namespaces: &[&[&str]] = &[&["--mount"], &["--user", "--map-root-user", "--mount"]];
        let usable = namespaces.iter().find(|flags| {
            Command::new("unshare").args(**flags).arg("true").stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        });
        let Some(flags) = usable else {
            let why = "this test needs `unshare --mount` (root) or unprivileged user namespaces";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            println!("SKIPPED: {why}");
            return None;
        };
        let child = Command::new("unshare")
            .args(*flags)
            .args(["sh", "-c", SCRIPT])
            .env("MNT", &mnt)
            .env("BIN", env!("CARGO_BIN_EXE_mpreg"))
            .env("PIDFILE", &pidfile)
            .env("TMPFS_MIB", TMPFS_MIB.to_string())
            .env("GROWN_MIB", GROWN_MIB.to_string())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env_remove("MPREG_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unshare");
        Some(Nodes { child, pidfile })
    }

    fn kill_first(&self) {
        let pid = std::fs::read_to_string(&self.pidfile).expect("the first node's pid");
        let status = Command::new("kill").args(["-9", pid.trim()]).status().expect("kill");
        assert!(status.success(), "kill -9 {pid}");
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).stderr(Stdio::null()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A payload that does not compress: distinct hex digits.
fn payload(n: usize) -> String {
    let mut x = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut text = String::with_capacity(PAYLOAD_BYTES);
    while text.len() < PAYLOAD_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:016x}"));
    }
    text
}

#[actix_rt::test]
async fn a_full_disk_refuses_durable_sends_with_1003_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(mut nodes) = Nodes::start(dir.path()) else { return };
    let urls = printed_urls(&mut nodes.child);
    let first = urls.recv_timeout(SOON).expect("the first node listens");
    let client = Client::connect(&first).await.expect("client connects");
    client.queue_create("full", json!({"max_message_bytes": 65_536})).await.expect("created");

    let mut acked = BTreeSet::new();
    let mut refusal = None;
    for n in 0..MAX_SENDS {
        match client.queue_send("full", json!(payload(n)), QueueSendOptions::default()).await {
            Ok(id) => {
                acked.insert(id);
            }
            Err(ClientError::Rpc(e)) => {
                refusal = Some(e);
                break;
            }
            Err(e) => panic!("send {n}: {e}"),
        }
    }
    let refusal =
        refusal.unwrap_or_else(|| panic!("{MAX_SENDS} sends of {PAYLOAD_BYTES} bytes fit in {TMPFS_MIB} MiB"));
    assert_eq!(refusal.code, 1003, "{refusal:?}");
    assert!(format!("{refusal:?}").contains("not durable"), "{refusal:?}");
    assert!(!acked.is_empty(), "some sends were acknowledged before the disk filled");
    // The node keeps serving, and keeps refusing durable sends (nothing pretends to work).
    let again = client.queue_send("full", json!("small"), QueueSendOptions::default()).await;
    assert!(matches!(&again, Err(ClientError::Rpc(e)) if e.code == 1003), "{again:?}");
    assert!(client.queue_stats("full").await.is_ok(), "the node still answers");

    nodes.kill_first();
    let second = urls.recv_timeout(SOON).expect("the second node listens");
    let client = Client::connect(&second).await.expect("client connects");
    let mut back = BTreeSet::new();
    loop {
        let got = client.queue_receive("full", 1000, 0.0, Some("check")).await.expect("receive");
        if got.is_empty() {
            break;
        }
        back.extend(got.into_iter().map(|m| m.id));
    }
    let lost: Vec<_> = acked.difference(&back).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged messages lost: {lost:?}", lost.len(), acked.len());
}
