//! The `mpreg` binary refuses a data dir it cannot use, with a message naming the dir and
//! the cause, and a distinct exit code: locked by another node (75), corrupt (65),
//! read-only (73). It never starts on an empty store in silence.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::process::NodeProcess;

const SOON: Duration = Duration::from_secs(30);

fn mpreg() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mpreg"));
    command.env("RUST_LOG", "info").env("NO_COLOR", "1").env_remove("MPREG_URL");
    command
}

/// Waits for `child` to exit, polling; kills it and panics after [`SOON`].
fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mpreg did not exit within {SOON:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `command` to completion; (exit code, stdout, stderr).
fn finish(mut command: Command) -> (Option<i32>, String, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn mpreg");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_exit(&mut child);
    (status.code(), out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

fn start_on(dir: &Path) -> (Option<i32>, String, String) {
    let mut command = mpreg();
    command.args(["server", "start", "--port", "0", "--data-dir"]).arg(dir);
    finish(command)
}

#[test]
fn a_dir_locked_by_a_running_node_stops_the_second_with_75() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let _first = NodeProcess::on_data_dir(&dir);
    let (code, stdout, stderr) = start_on(&dir);
    assert_eq!(code, Some(75), "stderr:\n{stderr}");
    assert!(!stdout.contains("MPREG_URL"), "the second node must not serve: {stdout}");
    assert!(stderr.contains("error: node failed to start: data_dir"), "{stderr}");
    assert!(stderr.contains(&dir.display().to_string()) && stderr.contains("locked"), "{stderr}");
}

#[test]
fn a_garbage_log_stops_the_node_with_65() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("conf"), vec![0x5a; 64]).unwrap();
    std::fs::write(dir.join("db"), vec![0xa5; 64 * 1024]).unwrap();
    let (code, stdout, stderr) = start_on(&dir);
    assert_eq!(code, Some(65), "stderr:\n{stderr}");
    assert!(!stdout.contains("MPREG_URL"), "{stdout}");
    assert!(stderr.contains(&dir.display().to_string()) && stderr.contains("corrupt"), "{stderr}");
}

#[test]
fn a_garbage_log_in_a_used_store_stops_the_node_with_65() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    drop(NodeProcess::on_data_dir(&dir)); // creates a real store, then is killed
    let log = dir.join("db");
    let len = std::fs::metadata(&log).unwrap().len() as usize;
    std::fs::write(&log, vec![0xa5; len.max(4096)]).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("snap.")) {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (code, _, stderr) = start_on(&dir);
    assert_eq!(code, Some(65), "stderr:\n{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
}

/// A read-only data dir: a read-only bind mount in a private user+mount namespace
/// (works unprivileged and as root), else a mode-0555 dir when not root.
#[test]
fn a_read_only_data_dir_stops_the_node_with_73() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let namespace_works = Command::new("unshare")
        .args(["-rm", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let (code, stdout, stderr) = if namespace_works {
        let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" server start --port 0 --data-dir "$1""#;
        let mut command = Command::new("unshare");
        command
            .args(["-rm", "sh", "-c", script, "sh"])
            .arg(&dir)
            .arg(env!("CARGO_BIN_EXE_mpreg"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        finish(command)
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(dir.join("probe"), b"x").is_ok() {
            eprintln!("skipped: no user namespaces (unshare) and running as root, so no read-only dir can be made");
            return;
        }
        start_on(&dir)
    };
    assert_eq!(code, Some(73), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains(&dir.display().to_string()) && stderr.contains("not writable"), "{stderr}");
}

#[test]
fn without_a_data_dir_the_node_warns_that_nothing_is_durable() {
    let mut child = mpreg()
        .args(["server", "start", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpreg");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("WARN") && line.contains("NOT durable") {
                let _ = tx.send(line);
            }
        }
    });
    let warned = rx.recv_timeout(SOON);
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned.is_ok(), "no WARN that queues are not durable");
}

/// Under `strace`, the durable-write benchmark's 20 sequential writes issue at least 20
/// `fdatasync` calls: sled's `flush()` (`sync_file_range`) is never the only sync.
#[test]
fn durable_writes_are_followed_by_fdatasync_under_strace() {
    let available = Command::new("strace").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !available.is_ok_and(|s| s.success()) {
        eprintln!("skipped: strace is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace");
    let mut command = Command::new("strace");
    command
        .args(["-f", "-qq", "-e", "trace=fdatasync,fsync,sync_file_range", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_mpreg"))
        .args(["bench", "persistence", "--ops", "20", "--dir"])
        .arg(tmp.path());
    let (code, stdout, stderr) = finish(command);
    if code != Some(0) && stderr.contains("PTRACE") {
        eprintln!("skipped: ptrace is not permitted here: {stderr}");
        return;
    }
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let fdatasyncs = trace.lines().filter(|l| l.contains("fdatasync(")).count();
    assert!(fdatasyncs >= 20, "{fdatasyncs} fdatasync calls for 20 sequential durable writes:\n{trace}");
    assert!(stdout.contains("sled_flush_seq"), "{stdout}");
}
