//! Smoke tests of the built `mpreg` binary: `server start` / `start-config`, the `client`
//! subcommands, the supervision log, fault injection, escalation, signals, and settings
//! validation.
//!
//! Every server listens on port 0 and announces its URLs on stdout; the tests read them
//! from there, read stderr on a background thread, and poll (bounded) for what they
//! expect. Each server process is killed when its [`ServerProcess`] drops.
//!
//! Run: `cargo test --test cli`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{http_blocking, poll_until, strip_ansi, TempFile, POLL_INTERVAL};

/// Upper bound for anything that should happen "soon" on a loaded 2-core machine.
const SOON: Duration = Duration::from_secs(15);

/// The binary under test, with a fixed log filter and no colours.
fn mpreg() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mpreg"));
    command.env("RUST_LOG", "info").env("NO_COLOR", "1").env_remove("MPREG_URL");
    command
}

/// Collects a child's output stream on a background thread.
struct Collector {
    text: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    fn new(stream: impl Read + Send + 'static) -> Collector {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Collector { text, thread: Some(thread) }
    }

    /// Everything so far, without colour codes.
    fn text(&self) -> String {
        strip_ansi(&self.text.lock().unwrap())
    }

    /// Everything, once the stream has ended.
    fn finish(mut self) -> String {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.text()
    }
}

/// A running `mpreg server ...`, killed on drop.
struct ServerProcess {
    child: Child,
    url: String,
    monitoring: String,
    stderr: Collector,
    _config: Option<TempFile>,
}

impl ServerProcess {
    /// Starts the server and waits until it has printed both URLs.
    fn start(args: &[&str]) -> ServerProcess {
        Self::start_with_config(args, None)
    }

    fn start_with_config(args: &[&str], config: Option<TempFile>) -> ServerProcess {
        let mut child = mpreg()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpreg starts");
        let stderr = Collector::new(child.stderr.take().expect("stderr is piped"));
        // Stdout is read to its end on its own thread (so the child never blocks on it);
        // its lines come here.
        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut server =
            ServerProcess { child, url: String::new(), monitoring: String::new(), stderr, _config: config };
        let deadline = Instant::now() + SOON;
        while server.url.is_empty() || server.monitoring.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no MPREG_URL / MPREG_MONITORING_URL within {SOON:?}; stderr:\n{}", server.stderr.text())
            });
            if let Some(url) = line.strip_prefix("MPREG_URL=") {
                server.url = url.to_owned();
            } else if let Some(url) = line.strip_prefix("MPREG_MONITORING_URL=") {
                server.monitoring = url.to_owned();
            }
        }
        assert!(server.url.starts_with("ws://127.0.0.1:"), "{}", server.url);
        assert!(server.monitoring.starts_with("http://127.0.0.1:"), "{}", server.monitoring);
        server
    }

    fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Polls stderr until a line satisfies `wanted`; returns that line.
    fn wait_for_log(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        poll_until(what, SOON, || self.stderr().lines().find(|l| wanted(l)).map(str::to_owned))
    }

    /// `METHOD {monitoring}{path}`.
    fn http(&self, method: &str, path: &str) -> common::HttpReply {
        http_blocking(method, &format!("{}{path}", self.monitoring)).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The restart count of a child as `/actors` shows it (None while it is restarting).
    fn restarts(&self, actor: &str) -> Option<u64> {
        let reply = http_blocking("GET", &format!("{}/actors", self.monitoring)).ok()?;
        let tree: Value = serde_json::from_str(&reply.body).ok()?;
        let child = tree["children"].as_array()?.iter().find(|c| c["name"] == json!(actor))?.clone();
        (child["state"] == json!("running")).then(|| child["restarts"].as_u64()).flatten()
    }

    /// Waits (bounded) for the process to end by itself.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        poll_until("the server to exit", timeout, || self.child.try_wait().expect("try_wait works"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a short-lived `mpreg` command did.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs an `mpreg` command to completion (killed after `SOON`).
fn run(args: &[&str]) -> Finished {
    let mut child = mpreg()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpreg starts");
    let stdout = Collector::new(child.stdout.take().expect("stdout is piped"));
    let stderr = Collector::new(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait works") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`mpreg {}` did not finish within {SOON:?}; stderr:\n{}", args.join(" "), stderr.text());
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Finished { status, stdout: stdout.finish(), stderr: stderr.finish() }
}

/// Runs an `mpreg` command that must succeed; returns its stdout.
fn run_ok(args: &[&str]) -> String {
    let done = run(args);
    assert!(done.status.success(), "`mpreg {}` failed ({}): {}", args.join(" "), done.status, done.stderr);
    done.stdout
}

/// A supervision log line (text format) about `actor` with this message.
fn supervision_line(line: &str, message: &str, actor: &str) -> bool {
    line.contains("mpreg::supervision") && line.contains(message) && line.contains(&format!("actor=\"{actor}\""))
}

const DEMO_NODE: &[&str] =
    &["server", "start", "--port", "0", "--monitoring-port", "0", "--functions", "demo", "--fault-injection"];

#[test]
fn server_start_prints_urls_and_the_client_commands_work() {
    let server = ServerProcess::start(DEMO_NODE);
    let url = server.url.as_str();

    assert_eq!(run_ok(&["client", "call", "add", "[20,22]", "--locs", "cpu", "--url", url]).trim(), "42");
    assert_eq!(run_ok(&["client", "call", "echo", r#""hi""#, "--url", url]).trim(), r#""hi""#);
    let by_name = run_ok(&["client", "call", "multiply", "[6]", "--kwargs", r#"{"factor": 7}"#, "--url", url]);
    assert_eq!(by_name.trim(), "42");
    let peers = run_ok(&["client", "call", "list_peers", "--url", url]);
    assert_eq!(serde_json::from_str::<Value>(&peers).unwrap(), json!([]), "a lone node has no peers: {peers}");

    let chain = TempFile::new(
        "chain.json",
        &json!([
            {"name": "sum", "fun": "add", "args": [20, 22], "locs": ["cpu"]},
            {"name": "scaled", "fun": "multiply", "args": ["sum", 3]},
            {"name": "final", "fun": "echo", "args": ["scaled"]},
        ])
        .to_string(),
    );
    let out = run_ok(&["client", "request", chain.arg(), "--url", url]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"final": 126}), "{out}");

    let health = format!("{}/health", server.monitoring);
    run_ok(&["client", "health", "--url", &health]);

    // A failing call exits non-zero and says why.
    let failed = run(&["client", "call", "no_such_function", "--url", url]);
    assert!(!failed.status.success());
    assert!(failed.stderr.contains("1001"), "{}", failed.stderr);
    let unhealthy = run(&["client", "health", "--url", &format!("{}/no-such-page", server.monitoring)]);
    assert!(!unhealthy.status.success());
}

#[test]
fn supervision_is_logged_and_a_crashed_actor_comes_back() {
    let server = ServerProcess::start(DEMO_NODE);
    for actor in ["registry", "pubsub", "monitor"] {
        server.wait_for_log(&format!("`actor started` for {actor}"), |l| supervision_line(l, "actor started", actor));
    }

    let reply = server.http("POST", "/actors/pubsub/panic");
    assert_eq!(reply.status, 202, "{}", reply.body);
    let line =
        server.wait_for_log("`actor restarted` for pubsub", |l| supervision_line(l, "actor restarted", "pubsub"));
    assert!(line.contains("restarts=1") && line.contains("reason=\"panicked\""), "{line}");
    assert!(server.stderr().lines().any(|l| supervision_line(l, "actor stopped", "pubsub")), "{}", server.stderr());

    assert_eq!(run_ok(&["client", "call", "echo", r#""still here""#, "--url", &server.url]).trim(), r#""still here""#);
    assert_eq!(server.restarts("pubsub"), Some(1));
    assert_eq!(server.restarts("registry"), Some(0));
    assert_eq!(server.http("POST", "/actors/no_such_actor/panic").status, 404);
}

#[test]
fn fault_injection_is_refused_unless_enabled() {
    let server = ServerProcess::start(&["server", "start", "--port", "0", "--monitoring-port", "0"]);
    assert_eq!(server.http("POST", "/actors/pubsub/panic").status, 403);
    assert_eq!(server.restarts("pubsub"), Some(0));
}

#[test]
fn too_many_restarts_escalate_and_the_node_exits_70() {
    let config = TempFile::new(
        "escalate.toml",
        "[mpreg]\nport = 0\nmonitoring_port = 0\nmax_restarts = 2\nfault_injection = true\nfunctions = [\"demo\"]\n",
    );
    let path = config.arg().to_owned();
    let mut server = ServerProcess::start_with_config(&["server", "start-config", &path], Some(config));

    // Each injection waits for the previous restart, so every panic counts.
    let mut injected = 0;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(injected < 10, "still running after {injected} injected panics; stderr:\n{}", server.stderr());
        let _ = http_blocking("POST", &format!("{}/actors/registry/panic", server.monitoring));
        injected += 1;
        let expected = injected;
        let outcome = poll_until(&format!("restart #{expected} or exit"), SOON, || {
            if let Some(status) = server.child.try_wait().unwrap() {
                return Some(Some(status));
            }
            (server.restarts("registry") == Some(expected)).then_some(None)
        });
        if let Some(status) = outcome {
            break status;
        }
    };
    assert_eq!(injected, 3, "max_restarts = 2: the third panic escalates");
    assert_eq!(status.code(), Some(70), "stderr:\n{}", server.stderr());
    server.wait_for_log("`actor escalated` for registry", |l| supervision_line(l, "actor escalated", "registry"));
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let mut server = ServerProcess::start(&["server", "start", "--port", "0", "--monitoring-port", "0"]);
    let pid = server.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(kill.success());
    let status = server.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    server.wait_for_log("the node-stopped line", |l| l.contains("node stopped"));
}

#[test]
fn an_unknown_settings_key_is_refused_by_name() {
    let config = TempFile::new("typo.toml", "[mpreg]\nport = 0\nprot = 1\n");
    let done = run(&["server", "start-config", config.arg()]);
    assert!(!done.status.success(), "started despite an unknown key: {}", done.stdout);
    assert!(done.stderr.contains("prot"), "{}", done.stderr);
    assert!(!done.stdout.contains("MPREG_URL="), "{}", done.stdout);

    let config = TempFile::new("range.toml", "[mpreg]\nport = 0\nrequest_timeout_s = 0\n");
    let done = run(&["server", "start-config", config.arg()]);
    assert!(!done.status.success());
    assert!(done.stderr.contains("request_timeout_s"), "{}", done.stderr);
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let server =
        ServerProcess::start(&["server", "start", "--port", "0", "--monitoring-port", "0", "--log-format", "json"]);
    let line = server.wait_for_log("a JSON `actor started` line for pubsub", |l| {
        l.contains("mpreg::supervision") && l.contains("actor started") && l.contains("pubsub")
    });
    let record: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(record["target"], json!("mpreg::supervision"), "{record}");
    assert_eq!(record["fields"]["message"], json!("actor started"), "{record}");
    assert_eq!(record["fields"]["actor"], json!("pubsub"), "{record}");
    assert_eq!(record["fields"]["reason"], json!("boot"), "{record}");
    for line in server.stderr().lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()), "not a JSON object: {line}");
    }
}
