//! Monitor: the operator's HTTP window — `/health`, `/metrics`, `/actors`, `/topology`,
//! `/catalog`.
//!
//! Who sends to it: the supervisor (stop, fault injection); HTTP clients. Whom it calls:
//! the supervisor (`DescribeTree`, `CrashChild`). The counters themselves are plain
//! atomics in [`Metrics`], shared by every connection, so the request path never waits
//! on this actor.
//!
//! What a restart loses: nothing of substance. The listening socket is bound once by the
//! node and handed in; each incarnation serves a duplicate of it, so the port survives a
//! restart and the metrics live outside the actor.

use std::net::TcpListener;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Context};
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;
use tracing::error;

use crate::fabric::{DescribeCatalog, DescribeTopology, FabricGossip};
use crate::protocol::ErrorCode;
use crate::supervisor::{ChildGuard, CrashChild, DescribeTree, NodeSupervisor, Slot};

const LATENCY_BUCKETS_S: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

/// Node-wide counters, updated lock-free from every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    requests_ok: AtomicU64,
    requests_failed: [AtomicU64; 6],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    latency_sum_us: AtomicU64,
    in_flight: AtomicI64,
    connections: AtomicI64,
    actor_restarts: AtomicU64,
    notifications_delivered: AtomicU64,
    notifications_dropped: AtomicU64,
}

impl Metrics {
    /// A request started waiting (a task, a remote call): it counts as in flight until
    /// [`Metrics::request_left`]. Requests answered in place never wait and are not counted.
    pub fn request_waiting(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A waiting request ended.
    pub fn request_left(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request was answered after `elapsed`, successfully or with `error`.
    pub fn request_finished(&self, elapsed: Duration, error: Option<ErrorCode>) {
        self.record_outcome(error);
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS_S.iter().position(|&b| seconds <= b) {
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A frame was answered without running anything (rejected before it started).
    pub fn record_outcome(&self, error: Option<ErrorCode>) {
        match error {
            None => self.requests_ok.fetch_add(1, Ordering::Relaxed),
            Some(code) => self.requests_failed[code as usize].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connections_changed(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// The supervisor restarted a child.
    pub fn record_restart(&self) {
        self.actor_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A publish queued `delivered` notifications to subscribers and dropped `dropped`
    /// because those subscribers' outboxes were full.
    pub fn record_notifications(&self, delivered: usize, dropped: usize) {
        self.notifications_delivered.fetch_add(delivered as u64, Ordering::Relaxed);
        self.notifications_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.actor_restarts.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self, node: &str) -> String {
        use std::fmt::Write;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP mpreg_requests_total RPC requests answered, by outcome.");
        let _ = writeln!(out, "# TYPE mpreg_requests_total counter");
        let _ = writeln!(out, "mpreg_requests_total{{node=\"{node}\",code=\"ok\"}} {}", load(&self.requests_ok));
        for code in ErrorCode::ALL {
            let n = load(&self.requests_failed[code as usize]);
            let _ = writeln!(out, "mpreg_requests_total{{node=\"{node}\",code=\"{}\"}} {n}", code.as_u16());
        }
        let _ = writeln!(out, "# HELP mpreg_request_duration_seconds Whole-request latency.");
        let _ = writeln!(out, "# TYPE mpreg_request_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
            cumulative += load(&self.latency_buckets[i]);
            let _ =
                writeln!(out, "mpreg_request_duration_seconds_bucket{{node=\"{node}\",le=\"{bound}\"}} {cumulative}");
        }
        let count = load(&self.requests_ok) + self.requests_failed.iter().map(load).sum::<u64>();
        let _ = writeln!(out, "mpreg_request_duration_seconds_bucket{{node=\"{node}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "mpreg_request_duration_seconds_sum{{node=\"{node}\"}} {}",
            load(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "mpreg_request_duration_seconds_count{{node=\"{node}\"}} {count}");
        let gauges = [
            ("mpreg_requests_in_flight", "Requests being executed.", self.in_flight.load(Ordering::Relaxed)),
            ("mpreg_connections", "Open websocket connections.", self.connections.load(Ordering::Relaxed)),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{node}\"}} {value}");
        }
        let counters = [
            ("mpreg_actor_restarts_total", "Supervised actor restarts.", load(&self.actor_restarts)),
            (
                "mpreg_pubsub_notifications_total",
                "Notifications queued to subscribers.",
                load(&self.notifications_delivered),
            ),
            (
                "mpreg_pubsub_notifications_dropped_total",
                "Notifications dropped: subscriber outbox full.",
                load(&self.notifications_dropped),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {value}");
        }
        out
    }
}

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct MonitorState {
    /// Node name.
    pub node: String,
    /// Cluster id.
    pub cluster_id: String,
    /// The node's websocket URL.
    pub url: String,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// The supervisor (for `/actors` and fault injection).
    pub supervisor: Slot<NodeSupervisor>,
    /// Whether `POST /actors/{name}/panic` is served.
    pub fault_injection: bool,
    /// The fabric (for `/topology` and `/catalog`).
    pub fabric: Slot<FabricGossip>,
}

/// The Monitor actor: owns the HTTP server serving `listener`.
pub struct Monitor {
    listener: Arc<TcpListener>,
    state: MonitorState,
    server: Option<ServerHandle>,
    _guard: ChildGuard,
}

impl Monitor {
    /// A monitor that will serve `listener` (already bound).
    pub fn new(listener: Arc<TcpListener>, state: MonitorState, guard: ChildGuard) -> Self {
        Monitor { listener, state, server: None, _guard: guard }
    }
}

impl Actor for Monitor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        let listener = match self.listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                error!(cause = %e, "monitor: cannot duplicate listening socket");
                return;
            }
        };
        let state = self.state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(state.clone()))
                .route("/health", web::get().to(health))
                .route("/metrics", web::get().to(metrics))
                .route("/actors", web::get().to(actors))
                .route("/actors/{name}/panic", web::post().to(crash))
                .route("/topology", web::get().to(topology))
                .route("/catalog", web::get().to(catalog))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener);
        match server {
            Ok(server) => {
                let server = server.run();
                self.server = Some(server.handle());
                actix_rt::spawn(server);
            }
            Err(e) => error!(cause = %e, "monitor: cannot serve"),
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(handle) = self.server.take() {
            // Not awaited: stopping must stay trivial (it may run during unwinding).
            drop(actix_rt::spawn(async move { handle.stop(false).await }));
        }
    }
}

crate::supervised_child!(Monitor, "monitor");

async fn health(state: web::Data<MonitorState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "node": state.node,
        "cluster_id": state.cluster_id,
        "url": state.url,
    }))
}

async fn metrics(state: web::Data<MonitorState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render(&state.node))
}

/// Asks a supervised actor through its slot and answers with its reply as JSON, or 503.
async fn ask<A, M>(slot: &Slot<A>, what: &str, make: impl Fn() -> M) -> HttpResponse
where
    A: Actor + actix::Handler<M>,
    A::Context: actix::dev::ToEnvelope<A, M>,
    M: actix::Message + Send + 'static,
    M::Result: serde::Serialize + Send,
{
    match slot.send(make).await {
        Ok(answer) => HttpResponse::Ok().json(answer),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("{what} unavailable: {e}")),
    }
}

async fn actors(state: web::Data<MonitorState>) -> HttpResponse {
    ask(&state.supervisor, "supervisor", || DescribeTree).await
}

async fn topology(state: web::Data<MonitorState>) -> HttpResponse {
    ask(&state.fabric, "fabric", || DescribeTopology).await
}

async fn catalog(state: web::Data<MonitorState>) -> HttpResponse {
    ask(&state.fabric, "fabric", || DescribeCatalog).await
}

async fn crash(state: web::Data<MonitorState>, name: web::Path<String>) -> HttpResponse {
    if !state.fault_injection {
        return HttpResponse::Forbidden().body("fault injection is disabled (setting fault_injection)");
    }
    let name = name.into_inner();
    match state.supervisor.send(|| CrashChild { name: name.clone() }).await {
        Ok(true) => HttpResponse::Accepted().body("fault injected"),
        Ok(false) => HttpResponse::NotFound().body("no such running actor"),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("supervisor unavailable: {e}")),
    }
}
