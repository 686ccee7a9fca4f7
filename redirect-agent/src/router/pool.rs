//! Upstream connections, pooled per (client pod, upstream address) and reused: HTTP/1.1
//! connections one request at a time (plain sockets for the in-place HTTP/1.1 path, hyper
//! connections for the general one), one multiplexed HTTP/2 connection per key. No connection
//! is shared between client pods, so one pod's stalled windows, exhausted stream limits or a
//! misbehaving upstream's stray bytes never reach another pod's requests.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    body::UpstreamBody,
    connector::{ConnectError, Connector},
    peek::{Peek, peekable},
};

/// Idle HTTP/1.1 connections kept per key, and per router thread in all.
const MAX_IDLE_H1: usize = 32;
const MAX_IDLE_H1_TOTAL: usize = 1024;

/// HTTP/2 receive windows towards upstreams (per client pod, upstream and router thread).
pub const UPSTREAM_H2_CONN_WINDOW: u32 = 1024 * 1024;
const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Streams opened on a new upstream HTTP/2 connection before its SETTINGS tell its limit.
const UPSTREAM_H2_FIRST_STREAMS: usize = 100;

/// Whose a pooled connection is: the client pod (its address, which the router sees
/// untranslated) and the upstream it goes to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub client: IpAddr,
    pub upstream: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    H2Handshake { addr: SocketAddr, source: h2::Error },
}

/// An HTTP/1.1 connection, with the handle that tells whether it is clean to reuse.
pub struct H1 {
    pub send: http1::SendRequest<UpstreamBody>,
    peek: Peek,
}

struct IdleH1 {
    conn: H1,
    since: Instant,
}

struct SharedH2 {
    conn: H2,
    used: Instant,
}

/// A pooled HTTP/2 connection.
#[derive(Clone)]
pub struct H2 {
    pub send: h2::client::SendRequest<Bytes>,
    /// Set once the connection has ended or takes no new stream.
    closed: Arc<AtomicBool>,
}

impl H2 {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// The connection takes no new stream (the upstream sent GOAWAY, or it failed): the next
    /// checkout opens another. Its streams in flight go on.
    pub fn retire(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// What a checkout found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checkout {
    /// Idle connections dropped because bytes had arrived on them unasked.
    pub discarded: u64,
}

/// Idle plain sockets of the in-place HTTP/1.1 path.
#[derive(Default)]
struct IdleSockets {
    by_key: HashMap<PoolKey, Vec<(TcpStream, Instant)>>,
    total: usize,
}

pub struct Pool {
    connector: Arc<Connector>,
    h1: Mutex<HashMap<PoolKey, Vec<IdleH1>>>,
    sockets: Mutex<IdleSockets>,
    h2: Mutex<HashMap<PoolKey, SharedH2>>,
}

impl Pool {
    pub fn new(connector: Arc<Connector>) -> Self {
        Pool {
            connector,
            h1: Mutex::default(),
            sockets: Mutex::default(),
            h2: Mutex::default(),
        }
    }

    /// A clean idle socket for `key` (newest first), if one is pooled. One on which anything
    /// arrived since its last response (stray bytes, the upstream's close) is dropped.
    pub fn take_socket(&self, key: PoolKey, found: &mut Checkout) -> Option<TcpStream> {
        let mut idle = self.sockets.lock().ok()?;
        let IdleSockets { by_key, total } = &mut *idle;
        let list = by_key.get_mut(&key)?;
        let mut clean = None;
        while let Some((s, _)) = list.pop() {
            *total -= 1;
            if is_quiet(&s) {
                clean = Some(s);
                break;
            }
            found.discarded += 1;
        }
        if list.is_empty() {
            by_key.remove(&key);
        }
        clean
    }

    /// Keeps a socket whose last response was read whole, for the next request of `key`.
    pub fn put_socket(&self, key: PoolKey, s: TcpStream) {
        let Ok(mut idle) = self.sockets.lock() else {
            return;
        };
        // Bounded: keys come with client pods, and each idle socket holds a descriptor.
        if idle.total >= MAX_IDLE_H1_TOTAL {
            return;
        }
        let list = idle.by_key.entry(key).or_default();
        if list.len() < MAX_IDLE_H1 {
            list.push((s, Instant::now()));
            idle.total += 1;
        }
    }

    /// An HTTP/1.1 connection for `key` ready for a request: a clean idle pooled one, or a new
    /// one. An idle connection on which anything arrived (an unrequested response, stray
    /// bytes, the upstream's close) is dropped, never reused.
    pub async fn h1(&self, key: PoolKey, found: &mut Checkout) -> Result<H1, UpstreamError> {
        if let Some(idle) = self.idle_h1(key, found) {
            return Ok(idle);
        }
        self.new_h1(key, false).await
    }

    fn idle_h1(&self, key: PoolKey, found: &mut Checkout) -> Option<H1> {
        let mut m = self.h1.lock().ok()?;
        let list = m.get_mut(&key)?;
        list.retain(|c| !c.conn.send.is_closed());
        // Newest first: the likeliest to be still open upstream.
        while let Some(i) = list.iter().rposition(|c| c.conn.send.is_ready()) {
            let c = list.swap_remove(i);
            if c.conn.peek.is_quiet() {
                return Some(c.conn);
            }
            found.discarded += 1;
        }
        None
    }

    /// A fresh HTTP/1.1 connection (with upgrades allowed when `upgrades`), not from the pool.
    pub async fn new_h1(&self, key: PoolKey, upgrades: bool) -> Result<H1, UpstreamError> {
        let addr = key.upstream;
        let stream = self.connector.connect(key.client, addr).await?;
        let (stream, peek) = peekable(stream);
        let (send, conn) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(H1 { send, peek })
    }

    /// Returns an HTTP/1.1 connection whose response headers arrived; it becomes ready for the
    /// next request once that response has been read.
    pub fn put_h1(&self, key: PoolKey, conn: H1) {
        if conn.send.is_closed() {
            return;
        }
        if let Ok(mut m) = self.h1.lock() {
            // Bounded: keys come with client pods, and each idle connection holds a descriptor.
            if m.values().map(Vec::len).sum::<usize>() >= MAX_IDLE_H1_TOTAL {
                return;
            }
            let list = m.entry(key).or_default();
            if list.len() < MAX_IDLE_H1 {
                list.push(IdleH1 {
                    conn,
                    since: Instant::now(),
                });
            }
        }
    }

    /// The HTTP/2 connection of `key`, opened when missing, closed or retired.
    pub async fn h2(&self, key: PoolKey) -> Result<H2, UpstreamError> {
        if let Some(conn) = self.h2.lock().ok().and_then(|mut m| {
            let e = m.get_mut(&key).filter(|e| !e.conn.is_closed())?;
            e.used = Instant::now();
            Some(e.conn.clone())
        }) {
            return Ok(conn);
        }
        let addr = key.upstream;
        let stream = self.connector.connect(key.client, addr).await?;
        let (send, driver) = h2::client::Builder::new()
            // What one client pod's unread responses can make the router hold per upstream.
            .initial_connection_window_size(UPSTREAM_H2_CONN_WINDOW)
            .initial_window_size(UPSTREAM_H2_STREAM_WINDOW)
            .initial_max_send_streams(UPSTREAM_H2_FIRST_STREAMS)
            // A response head as large as the HTTP/1.1 path takes: an upstream cannot make the
            // router decode and hold megabytes of headers (the stream is reset: 502).
            .max_header_list_size(super::h1::MAX_RESPONSE_HEAD as u32)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|source| UpstreamError::H2Handshake { addr, source })?;
        let conn = H2 {
            send,
            closed: Arc::new(AtomicBool::new(false)),
        };
        let ended = conn.closed.clone();
        // No PINGs: TCP keepalive watches the socket (see the connector).
        tokio::spawn(async move {
            let _ = driver.await;
            ended.store(true, Ordering::Relaxed);
        });
        if let Ok(mut m) = self.h2.lock() {
            m.insert(
                key,
                SharedH2 {
                    conn: conn.clone(),
                    used: Instant::now(),
                },
            );
        }
        Ok(conn)
    }

    /// Drops connections closed upstream and those unused for `idle`: per-pod keys come and go
    /// with pods. An HTTP/2 connection whose streams are still open stays up until they end.
    pub fn sweep(&self, idle: Duration) {
        let now = Instant::now();
        if let Ok(mut m) = self.h1.lock() {
            m.retain(|_, list| {
                list.retain(|c| !c.conn.send.is_closed() && now - c.since < idle);
                !list.is_empty()
            });
        }
        if let Ok(mut m) = self.sockets.lock() {
            let IdleSockets { by_key, total } = &mut *m;
            by_key.retain(|_, list| {
                list.retain(|(s, since)| {
                    let keep = now - *since < idle && is_quiet(s);
                    *total -= usize::from(!keep);
                    keep
                });
                !list.is_empty()
            });
        }
        if let Ok(mut m) = self.h2.lock() {
            m.retain(|_, c| !c.conn.is_closed() && now - c.used < idle);
        }
    }
}

/// Whether nothing arrived on an idle socket: no byte, no close, no error. Costs no system
/// call unless the runtime saw it become readable (then the byte read is lost with the socket).
fn is_quiet(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
