//! The agent's admin endpoint (HTTP/1.1, bound to localhost by default):
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once the maps were synced without failure at least once, else 503 |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /tables` | [`api::TablesDoc`]: the current routing tables with names (for `redirectctl`) |
//! | `GET /status` | [`api::AgentStatus`]: process, last sync, log filter |
//! | `GET /loglevel` | the current log filter |
//! | `PUT /loglevel` | body: a new filter (`tracing` EnvFilter syntax), applied at once |
//!
//! With a token ([`access`]), every path but `/healthz`, `/readyz` and `/metrics` needs
//! `Authorization: Bearer <token>`; others get 401.

pub mod access;
pub mod api;
pub mod metrics;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use metrics::SyncMetrics;

use crate::{
    router::{Dest, Outcome, RequestOutcome, RouterStats, Shared},
    routing::Tables,
    source::kube::health::{Health, SourceStatus},
};

/// The source the agent reads (`/status`, `/metrics`).
#[derive(Default)]
struct SourceInfo {
    kind: String,
    health: Option<Arc<Health>>,
}

/// Default address of the admin endpoint.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9967";

/// Changes the log filter at run time; returns an error text for a filter that does not parse.
pub type LogControl = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoint shows; the agent updates it after every sync.
pub struct AdminState {
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
    started: SystemTime,
    ready: AtomicBool,
    generation: AtomicU64,
    /// What `GET /tables` shows, kept as the sync left it: the document is made when asked
    /// for (at 10,000s of entries, making it on every sync would cost more than the sync).
    tables: ArcSwap<Published>,
    last_sync: Mutex<Option<api::SyncInfo>>,
    pub sync: SyncMetrics,
    router: Mutex<Option<Arc<Shared>>>,
    /// Where the routing state in force came from (`api::STATE_*`).
    state_from: Mutex<&'static str>,
    source: Mutex<SourceInfo>,
    log: Option<LogControl>,
    log_filter: Mutex<String>,
    /// The record hook attached, and why the preferred one could not be.
    record_hook: Mutex<(&'static str, Option<String>)>,
}

/// The tables of the last sync (or of the persisted state), with what names their pods.
#[derive(Default)]
struct Published {
    tables: Arc<Tables>,
    generation: u64,
    pods: Vec<api::PodEntry>,
}

impl AdminState {
    pub fn new(
        pin_dir: PathBuf,
        cgroup_root: PathBuf,
        log: Option<LogControl>,
        log_filter: &str,
    ) -> Self {
        AdminState {
            pin_dir,
            cgroup_root,
            started: SystemTime::now(),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            tables: ArcSwap::from_pointee(Published::default()),
            last_sync: Mutex::new(None),
            sync: SyncMetrics::default(),
            router: Mutex::new(None),
            state_from: Mutex::new(api::STATE_NONE),
            source: Mutex::new(SourceInfo::default()),
            log,
            log_filter: Mutex::new(log_filter.to_string()),
            record_hook: Mutex::new(("", None)),
        }
    }

    /// The record hook the loader attached, and why `fentry` was not (a kernel fallback).
    pub fn set_record_hook(&self, program: &'static str, fallback: Option<String>) {
        *lock(&self.record_hook) = (program, fallback);
    }

    /// The router whose stats `/metrics` shows.
    pub fn set_router(&self, shared: Arc<Shared>) {
        *lock(&self.router) = Some(shared);
    }

    /// The source the agent reads, and its watches' health when it has watches.
    pub fn set_source(&self, kind: &str, health: Option<Arc<Health>>) {
        *lock(&self.source) = SourceInfo {
            kind: kind.to_string(),
            health,
        };
    }

    /// The source's part of `/status`.
    pub fn source_status(&self) -> Option<SourceStatus> {
        let info = lock(&self.source);
        match &info.health {
            Some(h) => Some(h.status()),
            None if info.kind.is_empty() => None,
            None => Some(SourceStatus {
                kind: info.kind.clone(),
                healthy: true,
                message: String::new(),
                watches: Vec::new(),
            }),
        }
    }

    fn router_stats(&self) -> Option<Arc<Shared>> {
        lock(&self.router).clone()
    }

    /// Publishes the state an earlier agent persisted, which routes until the first sync.
    pub fn restored(&self, tables: &Arc<Tables>) {
        *lock(&self.state_from) = api::STATE_PERSISTED;
        self.tables.store(Arc::new(Published {
            tables: tables.clone(),
            generation: 0,
            pods: Vec::new(),
        }));
    }

    /// Records a sync and publishes its tables. `ok`: no map operation failed.
    pub fn synced(
        &self,
        tables: &Arc<Tables>,
        pods: Vec<api::PodEntry>,
        generation: u64,
        took: Duration,
        applied: usize,
        failed: &[(crate::sync::Op, crate::sync::MapError)],
    ) {
        self.sync.record_sync(took.as_secs_f64(), applied, failed);
        *lock(&self.state_from) = api::STATE_SYNCED;
        self.generation.store(generation, Ordering::Relaxed);
        self.tables.store(Arc::new(Published {
            tables: tables.clone(),
            generation,
            pods,
        }));
        *lock(&self.last_sync) = Some(api::SyncInfo {
            at_unix_ms: unix_ms(SystemTime::now()),
            duration_ms: took.as_secs_f64() * 1000.0,
            generation,
            applied,
            failed: failed.len(),
        });
        if failed.is_empty() {
            self.ready.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> api::AgentStatus {
        let router = self.router_stats();
        let stats = router.as_ref().map(|r| &r.stats);
        api::AgentStatus {
            schema: api::STATUS_SCHEMA.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at_unix_ms: unix_ms(self.started),
            ready: self.is_ready(),
            generation: self.generation.load(Ordering::Relaxed),
            last_sync: lock(&self.last_sync).clone(),
            syncs_total: self.sync.syncs(),
            sync_errors_total: self.sync.errors(),
            manifest_errors_total: self.sync.manifest_errors(),
            log_filter: lock(&self.log_filter).clone(),
            pin_dir: self.pin_dir.display().to_string(),
            cgroup_root: self.cgroup_root.display().to_string(),
            router_connections: stats
                .map(|s| {
                    Outcome::ALL
                        .iter()
                        .map(|o| (o.label().to_string(), s.get(*o)))
                        .collect()
                })
                .unwrap_or_default(),
            router_requests: stats.map(request_counts).unwrap_or_default(),
            source: self.source_status(),
            state_from: lock(&self.state_from).to_string(),
            kernel_fallbacks: self.kernel_fallbacks(router.as_deref()),
            record_hook: lock(&self.record_hook).0.to_string(),
        }
    }

    fn kernel_fallbacks(&self, router: Option<&Shared>) -> Vec<String> {
        let mut out: Vec<String> = router
            .map(|r| r.kernel_fallbacks().iter().map(|f| f.to_string()).collect())
            .unwrap_or_default();
        if let (program, Some(why)) = &*lock(&self.record_hook) {
            out.push(format!(
                "record hook: {program} on every socket below the cgroup root, ~9 runs per \
                 connection (fentry on tcp_connect: {why})"
            ));
        }
        out
    }

    fn metrics(&self) -> String {
        let last_sync_unix = lock(&self.last_sync)
            .as_ref()
            .map(|s| s.at_unix_ms as f64 / 1000.0);
        metrics::render(
            &self.sync,
            metrics::Scrape {
                pin_dir: self.pin_dir.clone(),
                router: self.router_stats(),
                ready: self.is_ready(),
                generation: self.generation.load(Ordering::Relaxed),
                last_sync_unix,
                source: self.source_status(),
            },
        )
    }

    fn set_log_filter(&self, filter: &str) -> Result<(), String> {
        let Some(log) = &self.log else {
            return Err("this agent cannot change its log filter".into());
        };
        log(filter)?;
        *lock(&self.log_filter) = filter.to_string();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Binds the admin endpoint. `SO_REUSEPORT`, so that during an upgrade the new agent serves
/// its probes while the old one still runs on the same node.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

/// Serves the admin endpoint until the task is dropped, to the clients `access` allows.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, access: access::Access) {
    let access = Arc::new(access);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let allowed = access.allows(
                    req.method(),
                    req.uri().path(),
                    req.headers().get(header::AUTHORIZATION),
                );
                async move {
                    if !allowed {
                        return Ok::<_, Infallible>(unauthorized());
                    }
                    Ok(handle(req, &state).await)
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", body.into())
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => reply(StatusCode::OK, "application/json", b),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// 401 for a request without the admin token.
fn unauthorized() -> Response<Body> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "this endpoint needs Authorization: Bearer <the token of --admin-token-file>\n",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Largest `PUT /loglevel` body.
const MAX_FILTER_BYTES: usize = 4096;

async fn handle(req: Request<Incoming>, state: &Arc<AdminState>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => {
            if state.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the maps have not been synced yet\n",
                )
            }
        }
        (Method::GET, "/metrics") => {
            // Map reads are syscalls (listing a big map takes a while): off the async workers.
            let state = state.clone();
            match tokio::task::spawn_blocking(move || state.metrics()).await {
                Ok(body) => reply(StatusCode::OK, metrics::CONTENT_TYPE, body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("collecting the metrics failed: {e}\n"),
                ),
            }
        }
        (Method::GET, "/tables") => {
            let p = state.tables.load();
            json(&api::TablesDoc::new(
                &p.tables,
                p.generation,
                p.pods.clone(),
            ))
        }
        (Method::GET, "/status") => json(&state.status()),
        (Method::GET, "/loglevel") => text(
            StatusCode::OK,
            format!("{}\n", lock(&state.log_filter).as_str()),
        ),
        (Method::PUT, "/loglevel") => {
            let body = match Limited::new(req.into_body(), MAX_FILTER_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
            };
            let Ok(filter) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n");
            };
            match state.set_log_filter(filter.trim()) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!("log filter set to {}\n", filter.trim()),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/tables" | "/status" | "/loglevel") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics /tables /status /loglevel\n",
        ),
    }
}

/// Router request counters for `/status`: per destination (`baseline`, `fork`), per destination
/// and outcome (`fork/upstream_error`), and `key_errors`.
fn request_counts(s: &RouterStats) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for d in Dest::ALL {
        m.insert(d.label().to_string(), s.requests_to(d));
        for o in RequestOutcome::ALL {
            m.insert(format!("{}/{}", d.label(), o.label()), s.get_request(d, o));
        }
    }
    m.insert("key_errors".to_string(), s.key_errors());
    m
}
