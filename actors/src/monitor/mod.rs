//! Monitor: the operator's HTTP window — the dashboard at `/`, `/health`, `/metrics`,
//! `/actors`, `/topology`, `/catalog` (with this node's workers), `/queues`.
//!
//! The dashboard (`dashboard.html`, embedded in the binary) is one static page whose
//! script polls the JSON and text endpoints below once a second; it adds no state and no
//! endpoint of its own, so the request path and the actors never know it is open.
//!
//! Queue figures (`/queues`, the `mpreg_queue_*` series of `/metrics`) come from the
//! [`QueueBoard`] the Queue actor republishes every 0.5 s and on create/delete, so they
//! may lag the queues by that much.
//!
//! Who sends to it: the supervisor (stop, fault injection); HTTP clients. Whom it calls:
//! the supervisor (`DescribeTree`, `CrashChild`). The counters live in [`Metrics`] (a module
//! below every actor that counts), so the request path never waits on this actor; the
//! monitor only reads them.
//!
//! What a restart loses: nothing of substance. The listening socket is bound once by the
//! node and handed in; each incarnation serves a duplicate of it, so the port survives a
//! restart and the metrics live outside the actor.

use std::net::TcpListener;
use std::sync::Arc;

use actix::{Actor, Context};
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;
use tracing::error;

use crate::cache::LocalCache;
use crate::fabric::bridge::Bridges;
use crate::fabric::describe::Describer;
use crate::fabric::{DescribeCatalog, DescribeTopology};
use crate::metrics::{label_value, Metrics};
use crate::queue::QueueBoard;
use crate::registry::TableHandle;
use crate::supervisor::{ChildGuard, CrashChild, DescribeTree, NodeSupervisor, Slot};
use crate::worker::WorkerHub;

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
    /// The fabric (for `/topology` and `/catalog`), behind the node's describe gate.
    pub fabric: Describer,
    /// The queues' latest figures (for `/queues` and `/metrics`).
    pub queues: QueueBoard,
    /// The node's workers (for `/catalog` and `/metrics`).
    pub workers: Arc<WorkerHub>,
    /// The cache (its `mpreg_cache_*` series of `/metrics`).
    pub cache: Arc<LocalCache>,
    /// The registered functions (their `mpreg_function_*` series of `/metrics`).
    pub functions: TableHandle,
    /// Federation bridges (for `/routes`); `None`: this node bridges to no cluster.
    pub bridges: Option<Arc<Bridges>>,
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
                .route("/", web::get().to(dashboard))
                .route("/health", web::get().to(health))
                .route("/metrics", web::get().to(metrics))
                .route("/actors", web::get().to(actors))
                .route("/actors/{name}/panic", web::post().to(crash))
                .route("/topology", web::get().to(topology))
                .route("/catalog", web::get().to(catalog))
                .route("/queues", web::get().to(queues))
                .route("/routes", web::get().to(routes))
        })
        .workers(1)
        .tcp_nodelay(true)
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

/// The dashboard page: HTML, CSS and script in one file, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // The page talks only to this origin; it loads nothing from elsewhere.
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
        ))
        .insert_header(("Cache-Control", "no-cache"))
        .body(DASHBOARD)
}

async fn health(state: web::Data<MonitorState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "node": state.node,
        "cluster_id": state.cluster_id,
        "url": state.url,
    }))
}

async fn metrics(state: web::Data<MonitorState>) -> HttpResponse {
    let mut body = state.metrics.render(&state.node);
    render_queues(&mut body, &state.node, &state.queues);
    state.workers.render(&mut body, &state.node);
    state.cache.render_metrics(&mut body, &state.node);
    render_functions(&mut body, &state.node, &state.functions);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body)
}

/// Appends the per-function series: calls this node ran by outcome, and the seconds they
/// took (a function's counts start when it is registered and go with it).
fn render_functions(out: &mut String, node: &str, functions: &TableHandle) {
    use std::fmt::Write;
    let table = functions.current();
    let mut rows: Vec<_> = table
        .specs()
        .map(|spec| {
            let id = spec.identity();
            (label_value(&id.name), id.version.to_string(), spec.stats())
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let _ = writeln!(
        out,
        "# HELP mpreg_function_calls_total Calls of each function this node ran, by outcome.\n\
         # TYPE mpreg_function_calls_total counter"
    );
    for (fun, version, counts) in &rows {
        for (outcome, n) in [("ok", counts.ok), ("error", counts.errors)] {
            let _ = writeln!(
                out,
                "mpreg_function_calls_total{{node=\"{node}\",fun=\"{fun}\",version=\"{version}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP mpreg_function_seconds_total Time the calls of each function took on this node.\n\
         # TYPE mpreg_function_seconds_total counter"
    );
    for (fun, version, counts) in &rows {
        let seconds = counts.micros as f64 / 1e6;
        let _ = writeln!(
            out,
            "mpreg_function_seconds_total{{node=\"{node}\",fun=\"{fun}\",version=\"{version}\"}} {seconds}"
        );
    }
}

/// Appends the per-queue series: gauges (depth, leased, delayed, dead letters) and
/// counters (acked, redelivered, dead-lettered, sent).
fn render_queues(out: &mut String, node: &str, board: &QueueBoard) {
    use std::fmt::Write;
    let queues = board.load();
    type Field = fn(&crate::queue::core::QueueStats) -> u64;
    let series: [(&str, &str, &str, Field); 8] = [
        ("mpreg_queue_depth", "gauge", "Visible messages, ready for a consumer.", |s| s.visible as u64),
        ("mpreg_queue_leased", "gauge", "Messages leased to a consumer (or in a delivery round).", |s| {
            (s.leased + s.in_round) as u64
        }),
        ("mpreg_queue_delayed", "gauge", "Messages waiting for their delay.", |s| s.delayed as u64),
        ("mpreg_queue_dead_letters", "gauge", "Dead letters held.", |s| s.dead_letters as u64),
        ("mpreg_queue_sent_total", "counter", "Messages accepted.", |s| s.sent_total),
        ("mpreg_queue_acked_total", "counter", "Messages completed by acks.", |s| s.acked_total),
        ("mpreg_queue_redelivered_total", "counter", "Messages made visible again after a lease ended.", |s| {
            s.redelivered_total
        }),
        ("mpreg_queue_dead_lettered_total", "counter", "Messages dead-lettered.", |s| s.dead_lettered_total),
    ];
    for (name, kind, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for q in queues.iter() {
            let _ = writeln!(out, "{name}{{node=\"{node}\",queue=\"{}\"}} {}", q.name, field(&q.stats));
        }
    }
}

async fn queues(state: web::Data<MonitorState>) -> HttpResponse {
    let queues = state.queues.load();
    HttpResponse::Ok().json(json!({ "node": state.node, "queues": &*queues }))
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

/// `GET /routes`: the federation state (bridges, every destination's explanation, route
/// keys, refusals); `?destination=C[&avoid=X,Y]`: one destination's explanation.
async fn routes(state: web::Data<MonitorState>, query: web::Query<RoutesQuery>) -> HttpResponse {
    let Some(bridges) = &state.bridges else {
        return HttpResponse::NotFound().body("this node has no federation bridges ([mpreg.federation])");
    };
    match &query.destination {
        Some(destination) => {
            let avoid: Vec<String> =
                query.avoid.as_deref().unwrap_or("").split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
            match bridges.explain(destination, &avoid) {
                Some(explanation) => HttpResponse::Ok().json(explanation),
                None => HttpResponse::ServiceUnavailable().body("federation state unavailable"),
            }
        }
        None => HttpResponse::Ok().json(bridges.describe()),
    }
}

/// The query of `GET /routes`.
#[derive(Debug, serde::Deserialize)]
struct RoutesQuery {
    destination: Option<String>,
    avoid: Option<String>,
}

async fn topology(state: web::Data<MonitorState>) -> HttpResponse {
    match state.fabric.ask(|| DescribeTopology { brief: false }).await {
        Ok(answer) => HttpResponse::Ok().json(answer),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("fabric unavailable: {e}")),
    }
}

/// The fabric's catalog plus this node's workers: an entry of this node whose identity a
/// worker lists is served by that worker, not by the node's own code.
async fn catalog(state: web::Data<MonitorState>) -> HttpResponse {
    match state.fabric.ask(|| DescribeCatalog).await {
        Ok(listing) => {
            let mut body = serde_json::to_value(listing).unwrap_or_else(|_| json!({}));
            if let Some(fields) = body.as_object_mut() {
                fields.insert("workers".to_owned(), json!(state.workers.describe()));
            }
            HttpResponse::Ok().json(body)
        }
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("fabric unavailable: {e}")),
    }
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
