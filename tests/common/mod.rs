//! Helpers shared by the integration tests; each test file has `mod common;`.
//!
//! - HTTP/1.1 over a plain TCP stream, blocking ([`http_blocking`]) and async
//!   ([`http_async`]): the monitoring endpoints need nothing more, and no HTTP client
//!   crate is a dependency.
//! - Bounded polling ([`poll_until`], [`poll_until_async`]): readiness is observed, never
//!   assumed after a fixed sleep; the short pause between two probes is not
//!   synchronisation, only politeness.
//! - [`TempFile`]: a uniquely named file in the temp directory, removed on drop.
//! - [`quiet_expected_panics`]: the tests make functions and actors panic on purpose;
//!   those panics are expected and would only bury real failures in noise.
//! - [`node`]: a node in the test process, stopped on drop, and cluster test settings.
//! - [`keys`]: a cluster authority and node credentials in a temporary directory.
//! - [`ws`]: a websocket without the SDK, down to the bytes of a frame.
//! - [`memory`]: this process's resident memory, where in-process nodes live.
//! - [`metrics`]: samples out of the Prometheus text of `/metrics`.
//! - [`latency`]: the bystander's p99.
//! - [`proxy`]: a TCP forwarder a test can pause and cut.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

pub mod keys;
pub mod latency;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod process;
pub mod proxy;
pub mod ws;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pause between two probes of a poll loop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Panic messages containing this marker are expected by the test that caused them.
pub const EXPECTED_PANIC: &str = "[expected panic]";

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Body, de-chunked.
    pub body: String,
}

/// `http://host:port/path` -> (`host:port`, `/path`).
pub fn split_http_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("not an http:// URL: {url}"));
    match rest.split_once('/') {
        Some((authority, path)) => (authority.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), "/".to_owned()),
    }
}

fn request_bytes(method: &str, authority: &str, path: &str) -> Vec<u8> {
    request_with_body(method, authority, path, "")
}

fn request_with_body(method: &str, authority: &str, path: &str, json: &str) -> Vec<u8> {
    let length = json.len();
    let content_type = if json.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{content_type}Content-Length: {length}\r\nConnection: close\r\n\r\n{json}")
        .into_bytes()
}

/// Parses a whole `Connection: close` response.
pub fn parse_http(raw: &[u8]) -> Result<HttpReply, String> {
    let (status, body) = mpreg::demo::parse_http_response(raw).map_err(|e| format!("{e:#}"))?;
    Ok(HttpReply { status, body })
}

/// One HTTP request over a blocking `std` TCP stream (bounded by a 5 s I/O timeout).
pub fn http_blocking(method: &str, url: &str) -> Result<HttpReply, String> {
    http_blocking_json(method, url, "", Duration::from_secs(5))
}

/// One HTTP request with a JSON body (none when `json` is empty) over a blocking `std`
/// TCP stream, bounded by `timeout` for each read.
pub fn http_blocking_json(method: &str, url: &str, json: &str, timeout: Duration) -> Result<HttpReply, String> {
    let (authority, path) = split_http_url(url);
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{authority} did not resolve"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.write_all(&request_with_body(method, &authority, &path, json)).map_err(|e| e.to_string())?;
    // Until the server closes, or the whole body its Content-Length announces is in (some
    // servers, chromedriver among them, keep the connection open despite `close`).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if announced_length_received(&raw) {
            break;
        }
    }
    parse_http(&raw)
}

/// Whether `raw` holds a response head with a `Content-Length` and that many body bytes.
fn announced_length_received(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
    length.is_some_and(|length| raw.len() >= end + 4 + length)
}

/// One HTTP request over a tokio TCP stream, for tests that run a node in-process: a
/// blocking read there would stall the runtime the node's actors live on.
pub async fn http_async(method: &str, url: &str) -> Result<HttpReply, String> {
    let (authority, path) = split_http_url(url);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&authority).await.map_err(|e| e.to_string())?;
        stream.write_all(&request_bytes(method, &authority, &path)).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        parse_http(&raw)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(|_| format!("{method} {url}: no answer"))?
}

/// `GET url` with [`http_async`]; the body of a 200 answer, an error for any other.
pub async fn get_ok(url: &str) -> Result<String, String> {
    let reply = http_async("GET", url).await?;
    match reply.status {
        200 => Ok(reply.body),
        status => Err(format!("status {status}: {}", reply.body)),
    }
}

/// Probes until `probe` returns `Some`, at most `timeout`; panics naming `what` otherwise.
pub fn poll_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`poll_until`] for async probes.
pub async fn poll_until_async<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A file in the temp directory with a name unique to this process and call; removed
/// when dropped.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file named `mpreg-test-<pid>-<n>-<stem>`.
    pub fn new(stem: &str, contents: &str) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mpreg-test-{}-{n}-{stem}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        TempFile { path }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as UTF-8 text (for command lines).
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Installs (once per test process) a panic hook that stays silent for panics the tests
/// cause on purpose — messages containing [`EXPECTED_PANIC`], or actix actors hit by
/// fault injection — and reports every other panic as before.
pub fn quiet_expected_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !(text.contains(EXPECTED_PANIC) || text.starts_with("injected fault in ")) {
                previous(info);
            }
        }));
    });
}

/// Removes ANSI colour sequences (`ESC [ ... letter`) from log text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `[`, parameters, and the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A cluster id unique to the test and the process, so nodes of different tests (and of
/// test runs side by side) never admit each other.
pub fn cluster_id(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// The server's error, or a panic naming what came instead.
pub fn rpc_error(result: Result<serde_json::Value, mpreg::ClientError>) -> mpreg::RpcError {
    match result {
        Err(mpreg::ClientError::Rpc(error)) => error,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}
