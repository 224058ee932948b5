//! Supervisor tests: a tiny child actor is crashed, restarted, escalated and stopped.
//!
//! Synchronisation is by polling observable state (the tree, the slot, the exit channel)
//! with a bounded deadline, never by a fixed sleep. Log lines are checked through a small
//! process-wide capturing subscriber; see [`capture`] for why it is global.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, Message};
use tokio::sync::watch;
use tracing::Level;

use super::*;
use crate::metrics::Metrics;

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(5);

/// The child under test: answers [`Ping`] with its incarnation number.
struct TestActor {
    incarnation: u32,
    _guard: ChildGuard,
}

impl Actor for TestActor {
    type Context = Context<Self>;
}

/// Which incarnation is this?
#[derive(Message)]
#[rtype(result = "u32")]
struct Ping;

impl Handler<Ping> for TestActor {
    type Result = u32;

    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
        self.incarnation
    }
}

crate::supervised_child!(TestActor, "test");

/// A child named `name` publishing itself in `slot`; `starts` counts incarnations.
fn child(name: &'static str, slot: &Slot<TestActor>, starts: &Arc<AtomicU32>) -> ChildSpec {
    let (slot, starts) = (slot.clone(), starts.clone());
    ChildSpec::new(name, move |guard| {
        let incarnation = starts.fetch_add(1, Ordering::SeqCst) + 1;
        let addr = TestActor { incarnation, _guard: guard }.start();
        slot.set(addr.clone());
        ChildHandles::of(&addr)
    })
}

/// A running supervisor with one child `test` (and optionally a bystander `other`).
struct Node {
    supervisor: Addr<NodeSupervisor>,
    slot: Slot<TestActor>,
    starts: Arc<AtomicU32>,
    other: Slot<TestActor>,
    exit: watch::Receiver<NodeExit>,
    metrics: Arc<Metrics>,
}

fn start(node: &str, policy: RestartPolicy) -> Node {
    let (slot, other, starts) = (Slot::default(), Slot::default(), Arc::new(AtomicU32::new(0)));
    let children = vec![child("test", &slot, &starts), child("other", &other, &Arc::new(AtomicU32::new(0)))];
    let (exit_sender, exit) = watch::channel(NodeExit::Running);
    let metrics = Arc::new(Metrics::default());
    let supervisor = NodeSupervisor::new(node.to_owned(), policy, children, exit_sender, metrics.clone()).start();
    Node { supervisor, slot, starts, other, exit, metrics }
}

fn fast_policy(max_restarts: usize) -> RestartPolicy {
    RestartPolicy { max_restarts, window: Duration::from_secs(60), backoff: Duration::from_millis(1) }
}

/// Polls `probe` until it yields a value, failing after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

impl Node {
    async fn tree(&self) -> TreeStatus {
        self.supervisor.send(DescribeTree).await.expect("supervisor running")
    }

    async fn status(&self, name: &str) -> ChildStatus {
        self.tree().await.children.into_iter().find(|c| c.name == name).expect("child listed")
    }

    /// The incarnation the slot currently points at, if it answers.
    async fn ping(&self) -> Option<u32> {
        self.slot.get()?.send(Ping).await.ok()
    }

    /// Waits until `test` runs incarnation `incarnation` and has been restarted
    /// `restarts` times.
    async fn running(&self, incarnation: u32, restarts: u64) {
        eventually(&format!("incarnation {incarnation} after {restarts} restarts"), || async {
            let status = self.status("test").await;
            let live = status.state == "running" && status.restarts == restarts;
            (live && self.ping().await == Some(incarnation)).then_some(())
        })
        .await;
    }

    async fn crash(&self) {
        assert!(self.supervisor.send(CrashChild { name: "test".to_owned() }).await.unwrap(), "test is running");
    }
}

#[actix_rt::test]
async fn boot_starts_every_child() {
    let node = start("boot", RestartPolicy::default());
    node.running(1, 0).await;
    let tree = node.tree().await;
    assert_eq!(tree.node, "boot");
    assert_eq!(tree.strategy, "one_for_one");
    assert_eq!((tree.max_restarts, tree.window_s), (5, 60));
    let names: Vec<&str> = tree.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["test", "other"]);
    for child in &tree.children {
        assert_eq!((child.state, child.restarts, child.last_failure.as_deref()), ("running", 0, None));
        assert!(child.started_at > 1.0e9);
    }
    assert_eq!(*node.exit.borrow(), NodeExit::Running);
}

#[actix_rt::test]
async fn a_panic_is_followed_by_a_restart_with_a_new_address() {
    let node = start("restart", fast_policy(5));
    node.running(1, 0).await;
    let first = node.slot.get().unwrap();
    let bystander = node.other.get().unwrap();
    node.crash().await;

    node.running(2, 1).await;
    let status = node.status("test").await;
    assert_eq!(status.last_failure.as_deref(), Some("panicked"));
    assert!(first.send(Ping).await.is_err(), "the crashed incarnation's mailbox is closed");
    assert_eq!(node.metrics.restarts(), 1);
    assert_eq!(node.starts.load(Ordering::SeqCst), 2);
    // one_for_one: the other child was left alone.
    let other = node.status("other").await;
    assert_eq!((other.state, other.restarts), ("running", 0));
    assert!(bystander.connected() && bystander.send(Ping).await.is_ok());
    assert_eq!(*node.exit.borrow(), NodeExit::Running);
}

#[actix_rt::test]
async fn crashing_an_unknown_child_is_refused() {
    let node = start("unknown", fast_policy(5));
    node.running(1, 0).await;
    assert!(!node.supervisor.send(CrashChild { name: "nobody".to_owned() }).await.unwrap());
}

#[actix_rt::test]
async fn exceeding_the_restart_budget_escalates() {
    let mut node = start("escalate", fast_policy(2));
    node.running(1, 0).await;
    node.crash().await;
    node.running(2, 1).await;
    node.crash().await;
    node.running(3, 2).await;
    let bystander = node.other.get().unwrap();
    node.crash().await;

    let exit = tokio::time::timeout(DEADLINE, node.exit.wait_for(|e| *e != NodeExit::Running))
        .await
        .expect("the node ends")
        .expect("exit sender alive until it is sent")
        .clone();
    assert_eq!(exit, NodeExit::Escalated { actor: "test".to_owned() });
    // No third restart, and the supervisor ended, taking the other child down with it.
    assert_eq!(node.starts.load(Ordering::SeqCst), 3);
    assert_eq!(node.metrics.restarts(), 2);
    eventually("the supervisor to stop", || async { (!node.supervisor.connected()).then_some(()) }).await;
    eventually("the bystander to stop", || async { bystander.send(Ping).await.is_err().then_some(()) }).await;
}

#[actix_rt::test]
async fn a_stale_child_died_is_ignored() {
    let node = start("stale", fast_policy(5));
    node.running(1, 0).await;
    node.crash().await;
    node.running(2, 1).await;

    // A late report from generation 1 (and one from a generation that never existed).
    for generation in [1, 0] {
        node.supervisor.send(ChildDied { name: "test", generation, panicked: true }).await.unwrap();
    }
    // Likewise a guard of an earlier incarnation that is only dropped now.
    drop(ChildGuard { name: "test", generation: 1, supervisor: node.supervisor.clone().recipient() });
    let status = node.status("test").await;
    assert_eq!((status.state, status.restarts), ("running", 1));
    assert_eq!(node.ping().await, Some(2));
    assert_eq!(node.starts.load(Ordering::SeqCst), 2);

    // The current generation's report is acted on.
    node.supervisor.send(ChildDied { name: "test", generation: 2, panicked: false }).await.unwrap();
    node.running(3, 2).await;
    assert_eq!(node.status("test").await.last_failure.as_deref(), Some("stopped"));
}

#[actix_rt::test]
async fn shutdown_stops_children_without_restarting_them() {
    let mut node = start("shutdown", fast_policy(5));
    node.running(1, 0).await;
    let (child, other) = (node.slot.get().unwrap(), node.other.get().unwrap());
    node.supervisor.send(Shutdown).await.unwrap();

    let exit = tokio::time::timeout(DEADLINE, node.exit.wait_for(|e| *e != NodeExit::Running))
        .await
        .expect("the node ends")
        .expect("exit sent")
        .clone();
    assert_eq!(exit, NodeExit::Requested);
    eventually("both children to stop", || async {
        (child.send(Ping).await.is_err() && other.send(Ping).await.is_err()).then_some(())
    })
    .await;
    eventually("the supervisor to stop", || async { (!node.supervisor.connected()).then_some(()) }).await;
    assert_eq!(node.starts.load(Ordering::SeqCst), 1, "nothing was restarted");
    assert_eq!(node.metrics.restarts(), 0);
}

#[actix_rt::test]
async fn backoff_delays_the_restart() {
    // Long enough that the `restarting` state is observable even on a loaded machine.
    let backoff = Duration::from_millis(500);
    let node = start("backoff", RestartPolicy { max_restarts: 5, window: Duration::from_secs(60), backoff });
    node.running(1, 0).await;
    let crashed_at = tokio::time::Instant::now();
    node.crash().await;
    eventually("the child to be restarting", || async {
        let status = node.status("test").await;
        (status.state == "restarting").then_some(())
    })
    .await;
    assert_eq!(node.status("test").await.last_failure.as_deref(), Some("panicked"));
    assert!(!node.supervisor.send(CrashChild { name: "test".to_owned() }).await.unwrap(), "nothing to crash");
    node.running(2, 1).await;
    assert!(crashed_at.elapsed() >= backoff);
}

// ---- Lifecycle log lines ----

mod capture {
    //! A minimal `tracing` subscriber recording `mpreg::supervision` events.
    //!
    //! It is installed as the GLOBAL default, once, and tests pick their own events by
    //! their `node` field. A thread-local (`set_default`) capture is not reliable here:
    //! `tracing` caches each callsite's interest process-wide, and a sibling test hitting
    //! the same `info!` first on a thread without a subscriber can pin it to "never".

    use std::fmt;
    use std::sync::{Mutex, OnceLock};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Event, Level, Metadata, Subscriber};

    const TARGET: &str = "mpreg::supervision";

    /// One captured event: its level and every field as text (`message` included).
    #[derive(Debug, Clone)]
    pub struct Line {
        pub level: Level,
        pub fields: Vec<(String, String)>,
    }

    impl Line {
        pub fn get(&self, field: &str) -> Option<&str> {
            self.fields.iter().find(|(name, _)| name == field).map(|(_, value)| value.as_str())
        }
    }

    struct Fields(Vec<(String, String)>);

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push((field.name().to_owned(), value.to_owned()));
        }

        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    struct Capture;

    static LINES: Mutex<Vec<Line>> = Mutex::new(Vec::new());

    impl Subscriber for Capture {
        fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
            if metadata.target() == TARGET {
                Interest::always()
            } else {
                Interest::sometimes()
            }
        }

        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.target() == TARGET
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            if event.metadata().target() != TARGET {
                return;
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            let line = Line { level: *event.metadata().level(), fields: fields.0 };
            if let Ok(mut lines) = LINES.lock() {
                lines.push(line);
            }
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    /// Installs the capture (once per process). Panics if another global subscriber won.
    pub fn install() {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        let ok = *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(Capture).is_ok());
        assert!(ok, "another global tracing subscriber is installed");
    }

    /// Captured lines of node `node`, in order.
    pub fn lines_of(node: &str) -> Vec<Line> {
        LINES
            .lock()
            .map(|lines| lines.iter().filter(|l| l.get("node") == Some(node)).cloned().collect())
            .unwrap_or_default()
    }
}

/// `(message, actor, reason, restarts)` of each line, for compact comparison.
fn summary(lines: &[capture::Line]) -> Vec<(String, String, String, String)> {
    let text = |l: &capture::Line, f: &str| l.get(f).unwrap_or("-").to_owned();
    lines.iter().map(|l| (text(l, "message"), text(l, "actor"), text(l, "reason"), text(l, "restarts"))).collect()
}

fn row(message: &str, actor: &str, reason: &str, restarts: &str) -> (String, String, String, String) {
    (message.to_owned(), actor.to_owned(), reason.to_owned(), restarts.to_owned())
}

#[actix_rt::test]
async fn every_lifecycle_event_is_logged_under_mpreg_supervision() {
    capture::install();
    let mut node = start("logged-node", fast_policy(1));
    node.running(1, 0).await;
    node.crash().await;
    node.running(2, 1).await;
    node.crash().await;
    tokio::time::timeout(DEADLINE, node.exit.wait_for(|e| *e != NodeExit::Running))
        .await
        .expect("the node ends")
        .expect("exit sent");

    // The escalation line is written before the exit is sent, so everything is in.
    let lines = capture::lines_of("logged-node");
    assert_eq!(
        summary(&lines),
        [
            row("actor started", "test", "boot", "0"),
            row("actor started", "other", "boot", "0"),
            row("fault injected", "test", "-", "-"),
            row("actor stopped", "test", "panicked", "0"),
            row("actor restarted", "test", "panicked", "1"),
            row("fault injected", "test", "-", "-"),
            row("actor stopped", "test", "panicked", "1"),
            row("actor escalated", "test", "restart intensity exceeded", "1"),
            row("actor stopped", "other", "escalation", "0"),
        ]
    );
    let levels: Vec<Level> = lines.iter().map(|l| l.level).collect();
    assert_eq!(
        levels,
        [
            Level::INFO,
            Level::INFO,
            Level::WARN,
            Level::WARN,
            Level::INFO,
            Level::WARN,
            Level::WARN,
            Level::ERROR,
            Level::INFO
        ]
    );
}

/// Each child's stop at shutdown is its own `actor stopped` line (reason `shutdown`),
/// written by the supervisor as it stops them (it stops right after, so it cannot wait
/// for their death notices).
#[actix_rt::test]
async fn shutdown_logs_each_child_stopping() {
    capture::install();
    let mut node = start("shutdown-logged", fast_policy(5));
    node.running(1, 0).await;
    node.supervisor.send(Shutdown).await.unwrap();
    node.exit.wait_for(|e| *e != NodeExit::Running).await.unwrap();
    eventually("a shutdown line per child", || async {
        let lines = summary(&capture::lines_of("shutdown-logged"));
        let logged =
            ["test", "other"].iter().all(|actor| lines.contains(&row("actor stopped", actor, "shutdown", "0")));
        logged.then_some(())
    })
    .await;
}
