//! The dashboard in a real browser: three `mpreg` processes, Chromium driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`), the page of node A read as an
//! operator would see it.
//!
//! Node B's name is markup (`<b id="injected">b</b>`): names come from peers, and the page
//! must show them as text, never build elements from them. Three calls of `echo` on node A
//! must show in the page's functions table. The test kills node C and waits
//! for the page to show it suspect, injects a panic into
//! node A's pub/sub actor and waits for the page to show the restart, and saves a
//! screenshot of each step under `target/tmp/dashboard/`. Where `chromedriver` is not
//! installed it says it is skipped, except under CI (`CI` set), where it must run.
//!
//! The WebDriver client is the W3C protocol's few JSON calls over the tests' own HTTP
//! helper, so the test needs no browser-automation crate.
//!
//! Run: `cargo test --test dashboard_browser`.

mod common;
#[path = "common/conformance_replay.rs"]
mod replay;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{cluster_id, http_blocking, http_blocking_json, poll_until, TempFile};
use replay::ServerProcess;
use serde_json::{json, Value};

/// Bound for a node process to print its URL (a cold start of a debug binary included).
const READY: Duration = Duration::from_secs(30);
/// Bound for the page to show a change (it polls once a second; the machine is loaded).
const SOON: Duration = Duration::from_secs(30);
/// Node B's name: markup, which the page must show as text.
const HOSTILE_NAME: &str = "<b id=\"injected\">b</b>";
/// Bound for one WebDriver call (starting the browser is the slow one).
const WEBDRIVER_CALL: Duration = Duration::from_secs(60);

/// A node's settings: fault injection on, and a removal delay far above the test's waits,
/// so a killed node stays listed as suspect while the page is read.
fn node_config(name: &str, cluster: &str, peers: &[&ServerProcess]) -> TempFile {
    let peers: Vec<String> = peers.iter().map(|p| format!("{:?}", p.url)).collect();
    let settings = format!(
        "[mpreg]\nname = {name:?}\ncluster_id = {cluster:?}\nhost = \"127.0.0.1\"\nport = 0\n\
         monitoring_enabled = true\nmonitoring_port = 0\nfault_injection = true\nremove_after_s = 300.0\npeers = [{}]\n",
        peers.join(", ")
    );
    let stem: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    TempFile::new(&format!("dashboard-{stem}"), &settings)
}

fn start_node(config: &TempFile) -> ServerProcess {
    ServerProcess::start(env!("CARGO_BIN_EXE_mpreg"), &["server", "start-config", config.arg()], READY)
        .unwrap_or_else(|e| panic!("node does not start: {e}"))
}

/// `chromedriver` on a port of its choosing; killed and reaped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    /// None (the test is skipped) where chromedriver is not installed, outside CI.
    fn start() -> Option<Driver> {
        let spawned = Command::new("chromedriver").arg("--port=0").stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let why = format!("this test needs chromedriver (Debian: chromium chromium-driver): {e}");
                assert!(std::env::var_os("CI").is_none(), "{why}");
                println!("SKIPPED: {why}");
                return None;
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(port.trim_end_matches('.').trim().to_owned());
                }
            }
        });
        let port = match rx.recv_timeout(READY) {
            Ok(port) => port,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromedriver did not say its port: {e}");
            }
        };
        Some(Driver { child, url: format!("http://127.0.0.1:{port}") })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One headless Chromium session; deleted (the browser closed) on drop.
struct Browser<'d> {
    session: String,
    driver: &'d Driver,
}

impl<'d> Browser<'d> {
    fn open(driver: &'d Driver) -> Browser<'d> {
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100",
            ]},
        }}});
        let answer = call(&format!("{}/session", driver.url), "POST", &capabilities);
        let session = answer["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_owned();
        Browser { session, driver }
    }

    fn command(&self, method: &str, what: &str, body: &Value) -> Value {
        call(&format!("{}/session/{}/{what}", self.driver.url, self.session), method, body)
    }

    fn go(&self, url: &str) {
        self.command("POST", "url", &json!({ "url": url }));
    }

    /// Runs `script` in the page and returns what it returns.
    fn eval(&self, script: &str) -> Value {
        self.command("POST", "execute/sync", &json!({ "script": script, "args": [] }))
    }

    /// Saves a PNG of the page as `target/tmp/dashboard/{name}.png`.
    fn screenshot(&self, name: &str) {
        let encoded = self.command("GET", "screenshot", &Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("the screenshot decodes");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("screenshot written");
    }

    /// Node name -> state as the page's node table shows them.
    fn node_states(&self) -> Value {
        self.eval(
            "const out = {}; for (const r of document.querySelectorAll('#nodes tr')) \
             out[r.dataset.node] = r.dataset.state; return out;",
        )
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = http_blocking("DELETE", &format!("{}/session/{}", self.driver.url, self.session));
    }
}

/// A WebDriver call: its `value`, or a panic with the driver's error.
fn call(url: &str, method: &str, body: &Value) -> Value {
    let json = if body.is_null() { String::new() } else { body.to_string() };
    let reply =
        http_blocking_json(method, url, &json, WEBDRIVER_CALL).unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let answer: Value =
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{method} {url}: {e}: {}", reply.body));
    assert_eq!(reply.status, 200, "{method} {url}: {answer}");
    answer["value"].clone()
}

#[test]
fn dashboard_shows_nodes_suspects_and_restarts_in_a_browser() {
    let Some(driver) = Driver::start() else { return };
    let cluster = cluster_id("dashboard");
    let a_config = node_config("a", &cluster, &[]);
    let a = start_node(&a_config);
    let b_config = node_config(HOSTILE_NAME, &cluster, &[&a]);
    let b = start_node(&b_config);
    let c_config = node_config("c", &cluster, &[&a]);
    let c = start_node(&c_config);
    let monitor = a.monitoring_url.clone().expect("node a prints its monitoring URL");

    let page = http_blocking("GET", &format!("{monitor}/")).expect("GET /");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>MPREG node</title>"), "{}", page.body);

    let browser = Browser::open(&driver);
    browser.go(&format!("{monitor}/"));
    let expected = json!({"a": "self", HOSTILE_NAME: "alive", "c": "alive"});
    poll_until("the page shows a, b and c alive", SOON, || (browser.node_states() == expected).then_some(()));
    let drawn = browser.eval("return document.querySelectorAll('#topology-picture circle').length;");
    assert_eq!(drawn, json!(3), "three nodes in the picture");
    assert_eq!(browser.eval("return document.getElementById('node-name').textContent;"), json!("a"));
    let injected = browser
        .eval("return document.getElementById('injected') === null && document.querySelectorAll('b').length === 0;");
    assert_eq!(injected, json!(true), "a node's name became markup");

    // Calls of echo on node a appear in the functions table.
    for args in ["[1]", "[2]", "[3]"] {
        let status = Command::new(env!("CARGO_BIN_EXE_mpreg"))
            .args(["client", "call", "echo", args, "--url", &a.url])
            .stdout(Stdio::null())
            .status()
            .expect("the client runs");
        assert!(status.success(), "echo {args}");
    }
    let echo_calls = "const r = document.querySelector('#functions tr[data-function=\"echo 1.0.0\"]'); \
                      return r ? Number(r.children[1].textContent) : -1;";
    poll_until("the page shows 3 calls of echo", SOON, || (browser.eval(echo_calls) == json!(3)).then_some(()));
    browser.screenshot("1-alive");

    // kill -9: no GOODBYE; node a sees the link drop and suspects c.
    drop(c);
    poll_until("the page shows c suspect", SOON, || (browser.node_states()["c"] == json!("suspect")).then_some(()));
    assert_eq!(browser.node_states()[HOSTILE_NAME], json!("alive"), "b is unaffected");
    browser.screenshot("2-suspect");

    let injected = http_blocking("POST", &format!("{monitor}/actors/pubsub/panic")).expect("inject a panic");
    assert_eq!(injected.status, 202, "{}", injected.body);
    let restarts = "const r = document.querySelector('#actors tr[data-actor=\"pubsub\"]'); \
                    return r ? Number(r.dataset.restarts) : -1;";
    poll_until("the page shows pubsub restarted", SOON, || (browser.eval(restarts) == json!(1)).then_some(()));
    let events = browser.eval("return document.getElementById('events').textContent;");
    let events = events.as_str().unwrap_or_default();
    assert!(events.contains("actor pubsub restarted"), "{events}");
    assert!(events.contains("node c: alive → suspect"), "{events}");
    browser.screenshot("3-restarted");
    drop(b);
}
