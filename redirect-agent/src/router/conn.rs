//! One redirected connection: original destination, protocol detection, dispatch.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::{server::conn, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use redirect_common::{OrigDst, SockAddr};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::TryAcquireError,
};

use super::{
    DEBUG_HEADER, Shared, Worker,
    detect::{MAX_SNIFF, Protocol, detect, detect_declared_http},
    h1,
    http::handle,
    http2,
    overload::{Cause, is_exhaustion},
    pool::Pool,
    prefixed::Prefixed,
    scratch::read_append,
    stats::Outcome,
    tunnel::{Ended, tunnel},
};
use crate::routing::PortProtocol;

/// One router thread: a single-threaded runtime accepting on every listener, with its own pool.
pub fn worker(shared: Arc<Shared>, listeners: Vec<(u32, std::net::TcpListener)>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "cannot start a router runtime");
            return;
        }
    };
    let worker = Arc::new(Worker {
        pool: Pool::new(shared.connector.clone()),
        shared,
    });
    rt.block_on(async move {
        let sweeper = tokio::spawn(sweep_pool(worker.clone()));
        let mut loops = tokio::task::JoinSet::new();
        for (slot, l) in listeners {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    let l = Arc::new(l);
                    worker
                        .shared
                        .overload
                        .add_listener(slot, Arc::downgrade(&l));
                    loops.spawn(accept_loop(l, worker.clone()));
                }
                Err(error) => tracing::error!(%error, "cannot register a router listener"),
            }
        }
        while loops.join_next().await.is_some() {}
        // Draining: the listeners are closed; serve the connections in flight until they end
        // (the process exits at the drain deadline at the latest).
        while worker.shared.active() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        sweeper.abort();
    });
}

/// The copy buffers of an opaque connection, one each way.
pub const TUNNEL_BUFFERS: usize = 2 * 8 * 1024;

/// Upstream connections unused this long are closed: pool keys come and go with client pods.
const POOL_IDLE: Duration = Duration::from_secs(90);

async fn sweep_pool(worker: Arc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        worker.pool.sweep(POOL_IDLE);
    }
}

/// Completes once the router drains (at once if it already does).
pub(super) async fn drained(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    let _ = rx.wait_for(|d| *d).await;
}

/// Waits after failed accepts: 5 ms, doubling up to 1 s, back to 5 ms after a success.
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
}

/// Accepts until the router drains; returning drops (closes) this worker's listener.
async fn accept_loop(l: Arc<TcpListener>, worker: Arc<Worker>) {
    let shared = &worker.shared;
    let mut drain = shared.drain.subscribe();
    let mut backoff = Backoff(Backoff::MIN);
    loop {
        // Bounded: at most max_connections served at once. A full router leaves the liveness
        // map (new connections go straight to their destination) and serves what is queued as
        // connections end.
        let permit = match shared.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                shared.full(Cause::Connections);
                tokio::select! {
                    biased;
                    _ = drained(&mut drain) => return,
                    p = shared.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            _ = drained(&mut drain) => return,
            a = l.accept() => a,
        };
        let (client, peer) = match accepted {
            Ok(c) => {
                backoff = Backoff(Backoff::MIN);
                c
            }
            Err(error) => {
                shared.stats.count(Outcome::AcceptError);
                if is_exhaustion(&error) {
                    shared.full(Cause::Resources);
                }
                if let Some(suppressed) = shared.accept_log.allow() {
                    tracing::warn!(%error, suppressed, "accept failed");
                }
                drop(permit);
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let worker = worker.clone();
        tokio::spawn(async move {
            let shared = &worker.shared;
            let _open = shared.open_connection();
            let outcome = admit(client, peer, &worker).await;
            shared.stats.count(outcome);
            drop(permit);
            shared.room_again();
        });
    }
}

/// Checks that the kernel redirected the connection and that its pod has room, then serves it.
async fn admit(client: TcpStream, peer: SocketAddr, worker: &Arc<Worker>) -> Outcome {
    let shared = &worker.shared;
    let orig = match shared.conns.take(&SockAddr::from(peer)) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            // Not redirected by the kernel: the router is no open proxy.
            tracing::debug!(%peer, "refused: no recorded original destination");
            return Outcome::NoOrigDst;
        }
        Err(error) => {
            if let Some(suppressed) = shared.map_log.allow() {
                tracing::warn!(
                    %peer,
                    %error,
                    suppressed,
                    "closed: the original destination cannot be read from the kernel"
                );
            }
            return Outcome::OrigDstError;
        }
    };
    let Some(_pod) = shared.pods.take(peer.ip()) else {
        // Reset at once: the pod's own excess connection fails fast, and nobody else waits.
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        if let Some(suppressed) = shared.pod_log.allow() {
            tracing::warn!(
                pod = %peer.ip(),
                max = shared.settings.max_connections_per_pod,
                suppressed,
                "client pod at its connection limit: connection reset"
            );
        }
        return Outcome::PodLimit;
    };
    serve(client, peer, orig, worker).await
}

async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    orig: OrigDst,
    worker: &Arc<Worker>,
) -> Outcome {
    let shared = &worker.shared;
    let _ = client.set_nodelay(true);
    let declared = shared.view.load().port_protocol(orig.service_id);
    let Sniffed {
        protocol,
        prefix,
        stalled,
    } = sniff(&mut client, shared, declared).await;
    if stalled {
        tracing::debug!(%peer, "cut: no request (or only its first bytes) within the header timeout");
        return Outcome::Reset;
    }
    if declared == PortProtocol::Http {
        match protocol {
            Some(Protocol::Opaque) => return Box::pin(not_http(client, peer, orig, shared)).await,
            None => {
                tracing::debug!(%peer, "closed by the client before its first request");
                return Outcome::Reset;
            }
            Some(Protocol::Http1 | Protocol::Http2) => {}
        }
    }
    match protocol {
        Some(Protocol::Http1) => {
            match Box::pin(h1::serve(client, prefix, peer, orig, worker)).await {
                h1::Served::Done(outcome) => outcome,
                h1::Served::HandOff(io) => {
                    Box::pin(serve_general_h1(TokioIo::new(io), peer, orig, worker)).await
                }
            }
        }
        Some(Protocol::Http2) => {
            Box::pin(http2::serve(
                Prefixed::new(prefix, client),
                peer,
                orig,
                worker,
            ))
            .await
        }
        Some(Protocol::Opaque) | None => {
            Box::pin(opaque(Prefixed::new(prefix, client), peer, orig, shared)).await
        }
    }
}

/// Serves a hyper connection to its end; once the router drains, `shutdown` asks it to finish
/// what is in flight and close. The connection is polled first: a drain that began before
/// hyper read what the client already sent must not close it unanswered.
async fn until_drained<C>(
    c: C,
    shutdown: fn(Pin<&mut C>),
    shared: &Shared,
    peer: SocketAddr,
    what: &str,
) -> Outcome
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(c);
    let mut drain = shared.drain.subscribe();
    let ended = tokio::select! {
        biased;
        r = c.as_mut() => r,
        _ = drained(&mut drain) => {
            shutdown(c.as_mut());
            c.await
        }
    };
    match ended {
        Ok(()) => Outcome::Forwarded,
        Err(error) => {
            tracing::debug!(%peer, %error, "{what} connection ended with an error");
            Outcome::Reset
        }
    }
}

/// HTTP/1 through hyper, for what the in-place path hands over (upgrades, CONNECT,
/// HTTP/1.0): the rest of the connection, starting with the request that needed it.
async fn serve_general_h1(
    io: TokioIo<Prefixed<TcpStream>>,
    peer: SocketAddr,
    orig: OrigDst,
    worker: &Arc<Worker>,
) -> Outcome {
    let shared = &worker.shared;
    let w = worker.clone();
    let svc = service_fn(move |req| handle(req, w.clone(), peer.ip(), orig));
    let mut b = conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(shared.settings.header_timeout)
        .max_buf_size(shared.settings.max_header_bytes.max(8192))
        // Per head: the buffer limit alone lets a pipelined head through when it arrives in
        // one read with the request before it.
        .max_header_size(shared.settings.max_header_bytes)
        .max_headers(shared.settings.max_headers)
        .preserve_header_case(true);
    let c = b.serve_connection(io, svc).with_upgrades();
    // At the drain, the request in flight completes, then the connection closes.
    until_drained(c, |c| c.graceful_shutdown(), shared, peer, "HTTP/1").await
}

/// What the first bytes said.
struct Sniffed {
    protocol: Option<Protocol>,
    prefix: Vec<u8>,
    /// The client started something that may be an HTTP request line but did not finish it
    /// within the header timeout (a slowloris from the first byte).
    stalled: bool,
}

/// A verdict on a connection's first bytes (`None`: more bytes needed).
type Decide = fn(&[u8]) -> Option<Protocol>;

/// Reads the first bytes until the protocol is known, the client is silent for the detection
/// timeout (a server-speaks-first protocol), or the client closes. Once the client has sent
/// bytes that may still become an HTTP request, it gets the header timeout to finish deciding,
/// like any request head: a client trickling its first bytes is cut instead of tunnelled.
///
/// On a port declared HTTP nobody speaks first: the client gets the header timeout from the
/// start (a pre-warmed connection may send its first request late), as an idle keep-alive
/// connection gets before each later request, and silence through it is cut, never tunnelled.
async fn sniff(client: &mut TcpStream, shared: &Shared, declared: PortProtocol) -> Sniffed {
    let (decide, first_wait): (Decide, _) = match declared {
        PortProtocol::Http => (detect_declared_http, shared.settings.header_timeout),
        PortProtocol::Detect => (detect, shared.settings.detect_timeout),
    };
    // Read as much as the first segment brings, not just what detection looks at: an HTTP/1.1
    // request head usually arrives whole and is served without another read.
    let mut buf = Vec::new();
    let start = Instant::now();
    while buf.len() < MAX_SNIFF {
        if let Some(p) = decide(&buf) {
            return Sniffed {
                protocol: Some(p),
                prefix: buf,
                stalled: false,
            };
        }
        let limit = if buf.is_empty() {
            first_wait
        } else {
            shared.settings.header_timeout
        };
        let left = (start + limit).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, read_append(client, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Err(_) => {
                return Sniffed {
                    protocol: decide(&buf),
                    stalled: !buf.is_empty() || declared == PortProtocol::Http,
                    prefix: buf,
                };
            }
            Ok(Ok(_)) => {}
        }
    }
    Sniffed {
        protocol: decide(&buf),
        prefix: buf,
        stalled: false,
    }
}

/// Longest wait for a client to read the router's last response before the socket closes.
const LINGER: Duration = Duration::from_secs(1);

/// A port declared HTTP got bytes that cannot start an HTTP request (TLS on a port named
/// `http`, a database client): answered with 400 naming the declaration, and closed. Not
/// forwarded: the declaration is what routes the port's requests, and a misdeclared port
/// shows up here (and in `redirect_router_connections_total{outcome="not_http"}`) instead of
/// routing by first bytes again.
async fn not_http(
    mut client: TcpStream,
    peer: SocketAddr,
    orig: OrigDst,
    shared: &Shared,
) -> Outcome {
    let service = shared
        .view
        .load()
        .tables
        .service_names
        .get(&orig.service_id)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("service {}", orig.service_id));
    if let Some(suppressed) = shared.not_http_log.allow() {
        tracing::warn!(
            pod = %peer.ip(),
            %service,
            suppressed,
            "a port declared HTTP got a connection that is not HTTP: answered 400 (fix the port's appProtocol or name)"
        );
    }
    let reason = format!(
        "{service} declares HTTP (appProtocol or port name), but this connection did not start with an HTTP request"
    );
    linger_close(&mut client, &router_response(400, &reason, None, true)).await;
    Outcome::NotHttp
}

/// A response the router makes itself: status and a one-line reason, the debug header
/// (`label`), and `connection: close` when `close`.
pub(super) fn router_response(
    status: u16,
    reason: &str,
    label: Option<&str>,
    close: bool,
) -> Vec<u8> {
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        reason.len() + 1
    );
    if let Some(label) = label {
        out.push_str(&format!("{DEBUG_HEADER}: {label}\r\n"));
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(reason);
    out.push('\n');
    out.into_bytes()
}

/// Writes the router's last response on a connection and closes it, reading what the client
/// still sends (bounded) first: closing with unread bytes resets the connection, which can
/// discard the response before the client reads it.
pub(super) async fn linger_close(client: &mut TcpStream, resp: &[u8]) {
    if client.write_all(resp).await.is_ok() && client.shutdown().await.is_ok() {
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match client.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => left = left.saturating_sub(k),
                }
            }
        })
        .await;
    }
}

/// Any other protocol: to the original destination, bytes copied both ways until a side
/// closes or nothing moved for the opaque idle limit.
async fn opaque(
    mut client: Prefixed<TcpStream>,
    peer: SocketAddr,
    orig: OrigDst,
    shared: &Shared,
) -> Outcome {
    let client_ip = peer.ip();
    let dst = SocketAddr::from(&orig.dst);
    let mut upstream = match shared.connector.connect(client_ip, dst).await {
        Ok(u) => u,
        Err(error) => {
            shared.connect_failed(&error);
            tracing::debug!(%dst, %error, "opaque upstream connect failed");
            return Outcome::UpstreamFailed;
        }
    };
    match tunnel(
        &mut client,
        &mut upstream,
        shared.settings.opaque_idle_timeout,
    )
    .await
    {
        Ok(Ended::Closed) => Outcome::Opaque,
        Ok(Ended::Idle) => Outcome::IdleTimeout,
        Err(_) => Outcome::Reset,
    }
}
