//! The controller's admin endpoint (HTTP/1.1, `--admin-addr`, default `0.0.0.0:9968`):
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once every watch has listed once (leader and standby alike), else 503 |
//! | `GET /metrics` | Prometheus text format: reconciles, errors by reason, writes by kind, leadership |

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::admin::unix_ms;

/// Default address of the controller's admin endpoint.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9968";

/// What the controller counts; shared by the loop, the election, the watches and `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    last_reconcile_unix_ms: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    writes: Mutex<BTreeMap<&'static str, u64>>,
    leader: AtomicBool,
    leader_changes: AtomicU64,
    synced: AtomicBool,
}

impl Metrics {
    /// A reconcile pass ran.
    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        self.last_reconcile_unix_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// An error, by its bounded label (`metric_label()`).
    pub fn error(&self, label: &'static str) {
        *lock(&self.errors).entry(label).or_default() += 1;
    }

    /// A successful write of `kind` (`status`, `sandbox_delete`, `slice_create`, ...).
    pub fn wrote(&self, kind: &'static str) {
        *lock(&self.writes).entry(kind).or_default() += 1;
    }

    pub fn set_leader(&self, leader: bool) {
        if self.leader.swap(leader, Ordering::Relaxed) != leader {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    /// Every watch has listed once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// Errors counted under `label`.
    pub fn errors(&self, label: &str) -> u64 {
        lock(&self.errors).get(label).copied().unwrap_or(0)
    }

    /// Successful writes of `kind`.
    pub fn writes(&self, kind: &str) -> u64 {
        lock(&self.writes).get(kind).copied().unwrap_or(0)
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        fn header(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        let mut out = String::new();
        let o = &mut out;
        let n = "redirect_controller_reconciles_total";
        header(o, n, "counter", "Reconcile passes run (as leader).");
        let _ = writeln!(o, "{n} {}", self.reconciles());
        let n = "redirect_controller_last_reconcile_timestamp_seconds";
        header(
            o,
            n,
            "gauge",
            "When the last reconcile pass ran (Unix time; 0: never).",
        );
        let last = self.last_reconcile_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(o, "{n} {last}");
        let n = "redirect_controller_errors_total";
        header(o, n, "counter", "Errors, by reason.");
        for (label, count) in lock(&self.errors).iter() {
            let _ = writeln!(o, "{n}{{reason=\"{label}\"}} {count}");
        }
        let n = "redirect_controller_writes_total";
        header(o, n, "counter", "Successful API writes, by kind.");
        for (kind, count) in lock(&self.writes).iter() {
            let _ = writeln!(o, "{n}{{kind=\"{kind}\"}} {count}");
        }
        let n = "redirect_controller_is_leader";
        header(
            o,
            n,
            "gauge",
            "1 while this replica holds the Lease (only the leader writes).",
        );
        let _ = writeln!(o, "{n} {}", u8::from(self.is_leader()));
        let n = "redirect_controller_leader_changes_total";
        header(
            o,
            n,
            "counter",
            "Times this replica became or stopped being the leader.",
        );
        let _ = writeln!(o, "{n} {}", self.leader_changes.load(Ordering::Relaxed));
        let n = "redirect_controller_caches_synced";
        header(o, n, "gauge", "1 once every watch has listed once.");
        let _ = writeln!(o, "{n} {}", u8::from(self.is_synced()));
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(handle(&req, &metrics)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn handle(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, PLAIN, "ok\n".into()),
        (&Method::GET, "/readyz") if metrics.is_synced() => {
            let role = if metrics.is_leader() {
                "leader"
            } else {
                "standby"
            };
            text(StatusCode::OK, PLAIN, format!("ready ({role})\n"))
        }
        (&Method::GET, "/readyz") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "not ready: the watches have not listed yet (are the CRDs installed?)\n".into(),
        ),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (_, "/healthz" | "/readyz" | "/metrics") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz /readyz /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_reconciles_errors_by_reason_and_leadership() {
        let m = Metrics::default();
        m.reconciled();
        m.error("status_patch");
        m.error("status_patch");
        m.wrote("slice_create");
        m.set_leader(true);
        let text = m.render();
        assert!(
            text.contains("redirect_controller_reconciles_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("redirect_controller_errors_total{reason=\"status_patch\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("redirect_controller_writes_total{kind=\"slice_create\"} 1\n"));
        assert!(text.contains("redirect_controller_is_leader 1\n"));
        assert!(text.contains("redirect_controller_leader_changes_total 1\n"));
        assert!(text.contains("redirect_controller_caches_synced 0\n"));
    }

    #[tokio::test]
    async fn the_endpoint_is_ready_once_synced_as_leader_or_standby() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve(listener, metrics.clone()));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_synced(true);
        let ready = get("/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.contains("standby"),
            "{ready}"
        );
        assert!(
            get("/metrics")
                .await
                .contains("redirect_controller_caches_synced 1")
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
