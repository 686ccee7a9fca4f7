//! The node-local router: accepts connections the kernel redirected to it, recovers each one's
//! original destination from the kernel's record, takes the protocol from what the service port
//! declares (or, when it declares none, detects it) and routes every HTTP request (every HTTP/2
//! stream) by its routing key; anything else (TLS, databases, unknown) goes to its original
//! destination untouched. It registers its listeners in the liveness sockmap, so the kernel
//! only redirects while a router is accepting.

pub use redirect_l7::{detect, key};
mod body;
mod client_netns;
mod conn;
mod connector;
mod deadline;
#[cfg(test)]
mod end_to_end;
mod h1;
mod http;
mod http2;
mod kernel;
mod listener;
mod log_limit;
mod overload;
mod peek;
mod pod_conns;
mod pool;
mod prefixed;
mod route;
mod scratch;
mod stats;
mod tunnel;

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use redirect_common::{ROUTER_SOCK_V4, ROUTER_SOCK_V6};
use tokio::sync::Semaphore;

pub use http::DEBUG_HEADER;
pub use kernel::{MemoryKernel, OrigDsts, RouterKernel};
pub use listener::{MIGRATE_REQ_SYSCTL, enable_request_migration};
pub use stats::{Dest, LATENCY_BUCKETS, LatencySnapshot, Outcome, RequestOutcome, RouterStats};

use crate::{loader::RouterSockError, routing::RouteView};

/// Where the router listens and how it behaves.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    /// `SO_MARK` on upstream sockets, so the kernel never redirects them again.
    pub mark: u32,
    /// Where routing keys are read from.
    pub keys: key::KeyConfig,
    /// Add a response header naming the upstream a request went to.
    pub debug_header: bool,
    /// Longest wait for the client's first bytes before treating the connection as opaque
    /// (protocols where the server speaks first), on ports that declare no protocol.
    pub detect_timeout: Duration,
    /// Longest wait for a request's headers (slow or idle clients).
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers.
    pub response_timeout: Duration,
    /// Longest silence inside a request body before the request is cut (its upstream stream
    /// reset); `None`: no limit.
    pub body_idle_timeout: Option<Duration>,
    /// Largest request head accepted, per request (HTTP/1.1: 431 beyond it).
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request head (431 beyond it).
    pub max_headers: usize,
    /// Connections served at once (lowered to what the file descriptor limit allows); a full
    /// router leaves the liveness map, so new connections go straight to their destination.
    pub max_connections: usize,
    /// Connections one client pod may hold through the router; beyond it they are reset.
    pub max_connections_per_pod: usize,
    /// Bytes the router may have to buffer for one client pod: each connection reserves its
    /// worst case ([`Router::bind`] logs it), which can lower the connections per pod.
    pub max_buffered_bytes_per_pod: usize,
    /// Longest time an opaque (non-HTTP) connection may move no byte either way before it is
    /// closed; `None`: no limit.
    pub opaque_idle_timeout: Option<Duration>,
    /// Open upstream sockets in the client pod's network namespace: where pod cgroups are
    /// found and the host's `/proc`. `None`: always in the node's.
    pub client_netns: Option<ClientNetnsSettings>,
    /// Router threads. Each runs its own single-threaded runtime, accepts on the shared
    /// listeners and keeps its own upstream pool, so a connection and its upstream traffic stay
    /// on one thread (no hand-offs between workers, no pool lock).
    pub workers: usize,
}

/// Where the router finds client pods' network namespaces.
#[derive(Clone, Debug)]
pub struct ClientNetnsSettings {
    pub cgroup_root: std::path::PathBuf,
    pub proc_root: std::path::PathBuf,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            v4: None,
            v6: None,
            mark: 0,
            keys: key::KeyConfig::default(),
            debug_header: false,
            detect_timeout: Duration::from_millis(500),
            header_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            body_idle_timeout: None,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 16_384,
            max_connections_per_pod: 1024,
            max_buffered_bytes_per_pod: 256 * 1024 * 1024,
            opaque_idle_timeout: Some(Duration::from_secs(3600)),
            client_netns: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("router cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("router cannot register its listener for liveness: {0}")]
    Register(RouterSockError),
    #[error("router cannot start its socket maker for client network namespaces: {0}")]
    Netns(std::io::Error),
}

/// What every router thread shares.
pub struct Shared {
    pub settings: RouterSettings,
    /// The routing tables of the last sync, swapped whole.
    pub view: ArcSwap<RouteView>,
    pub stats: RouterStats,
    /// Liveness registration and the age sweep of the connection table.
    socks: Mutex<Box<dyn RouterKernel>>,
    /// Taking original destinations: one syscall, no lock.
    conns: Box<dyn OrigDsts>,
    slots: Arc<Semaphore>,
    /// Connections per client pod.
    pods: Arc<pod_conns::PodConns>,
    /// Opens upstream connections (in the client pod's network namespace).
    connector: Arc<connector::Connector>,
    /// Out of the liveness map while full.
    overload: overload::Overload,
    accept_log: log_limit::LogLimit,
    pod_log: log_limit::LogLimit,
    not_http_log: log_limit::LogLimit,
    map_log: log_limit::LogLimit,
    /// Set once on shutdown: workers stop accepting and close their listeners, connections
    /// finish their current request (HTTP/1) or streams (HTTP/2 GOAWAY) and close.
    drain: tokio::sync::watch::Sender<bool>,
    /// Client connections being served. Not `active()`: each waiting accept also holds a slot.
    open: AtomicUsize,
}

/// What a drain did, for its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Client connections open when the router stopped accepting.
    pub connections: usize,
    /// Connections still open at the deadline (cut when the process exits).
    pub left: usize,
    pub took: Duration,
}

/// Counts one client connection while it lives.
pub(crate) struct OpenConnection<'a>(&'a AtomicUsize);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.settings
            .max_connections
            .saturating_sub(self.slots.available_permits())
    }

    /// An upstream connection could not be made: out of descriptors or memory, the router is
    /// full; any other failure is the upstream's.
    pub(crate) fn connect_failed(&self, e: &connector::ConnectError) {
        if e.io().is_some_and(overload::is_exhaustion) {
            self.full(overload::Cause::Resources);
        }
    }

    /// The router cannot take more: out of the liveness map until it has room again.
    pub(crate) fn full(&self, cause: overload::Cause) {
        let full_at = match cause {
            overload::Cause::Connections => self.settings.max_connections,
            overload::Cause::Resources => self.active(),
        };
        if self
            .overload
            .enter(&self.socks, self.active(), full_at, cause)
        {
            self.stats.set_full(true);
        }
    }

    /// A connection ended: back in the liveness map once below the low-water mark.
    fn room_again(&self) {
        // A draining router never comes back (its successor may hold the slot by now).
        if !self.draining() && self.overload.maybe_leave(&self.socks, self.active()) {
            self.stats.set_full(false);
        }
    }

    /// The node's pods after a sync (address → UID): whose network namespace upstream
    /// connections for a client address are opened in.
    pub fn set_client_pods(&self, pods: std::collections::HashMap<std::net::IpAddr, String>) {
        if let Some(n) = &self.connector.netns {
            n.set_pods(pods);
        }
    }

    /// Slower ways this kernel makes the router go (empty on a current kernel).
    pub fn kernel_fallbacks(&self) -> Vec<&'static str> {
        self.conns.fallback().into_iter().collect()
    }

    /// Whether the router is draining.
    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// Client connections being served now.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a client connection until the guard drops.
    pub(crate) fn open_connection(&self) -> OpenConnection<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(&self.open)
    }

    /// Stops accepting (the listeners close: a successor bound to the same address takes the
    /// new connections and, with `tcp_migrate_req`, the queued ones; without one, the liveness
    /// slot empties and connections go straight to their destination), lets the connections
    /// in flight finish, and waits for them at most `timeout`.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let started = tokio::time::Instant::now();
        // Counted first: idle connections close the moment the workers see the flag.
        let connections = self.connections();
        self.drain.send_replace(true);
        let deadline = started + timeout;
        while self.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        DrainReport {
            connections,
            left: self.connections(),
            took: started.elapsed(),
        }
    }
}

/// One router thread's state.
pub struct Worker {
    pub shared: Arc<Shared>,
    pool: pool::Pool,
}

/// A bound router, ready to serve.
pub struct Router {
    /// Listeners and their liveness slots.
    listeners: Vec<(u32, std::net::TcpListener)>,
    pub shared: Arc<Shared>,
}

impl Router {
    /// Binds the listeners and registers them in the liveness sockmap.
    pub fn bind(
        mut settings: RouterSettings,
        socks: impl RouterKernel,
    ) -> Result<Self, RouterError> {
        let mut socks: Box<dyn RouterKernel> = Box::new(socks);
        let fds = raise_fd_limit();
        let fit = fds.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
        if fit < settings.max_connections {
            tracing::warn!(
                fd_limit = fds,
                max_connections = fit,
                "the file descriptor limit allows fewer connections than --max-connections"
            );
            settings.max_connections = fit.max(1);
        }
        let reserve = connection_buffer_bound(&settings);
        let by_bytes = (settings.max_buffered_bytes_per_pod / reserve).max(1);
        if by_bytes < settings.max_connections_per_pod {
            settings.max_connections_per_pod = by_bytes;
        }
        tracing::info!(
            max_connections = settings.max_connections,
            max_connections_per_pod = settings.max_connections_per_pod,
            buffer_bytes_per_connection = reserve,
            max_buffered_bytes_per_pod = settings.max_buffered_bytes_per_pod,
            fd_limit = fds,
            "router limits"
        );
        let mut listeners = Vec::new();
        for (addr, slot) in [(settings.v4, ROUTER_SOCK_V4), (settings.v6, ROUTER_SOCK_V6)] {
            let Some(addr) = addr else { continue };
            let l = listener::bind(addr).map_err(|source| RouterError::Listen { addr, source })?;
            socks
                .register(slot, l.as_fd())
                .map_err(RouterError::Register)?;
            tracing::info!(%addr, "router listening");
            listeners.push((slot, l));
        }
        let conns = socks.orig_dsts().map_err(RouterError::Register)?;
        let stats = RouterStats::default();
        let netns = match &settings.client_netns {
            Some(c) => Some(
                client_netns::ClientNetns::new(c.cgroup_root.clone(), c.proc_root.clone())
                    .map_err(RouterError::Netns)?,
            ),
            None => None,
        };
        let connector = Arc::new(connector::Connector {
            mark: settings.mark,
            timeout: settings.connect_timeout,
            netns,
            netns_log: log_limit::LogLimit::new(Duration::from_secs(10)),
            netns_errors: stats.netns_fallbacks.clone(),
        });
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            pods: pod_conns::PodConns::new(settings.max_connections_per_pod),
            connector,
            overload: overload::Overload::default(),
            accept_log: log_limit::LogLimit::new(Duration::from_secs(10)),
            pod_log: log_limit::LogLimit::new(Duration::from_secs(10)),
            not_http_log: log_limit::LogLimit::new(Duration::from_secs(10)),
            map_log: log_limit::LogLimit::new(Duration::from_secs(10)),
            settings,
            view: ArcSwap::default(),
            stats,
            socks: Mutex::new(socks),
            conns,
            drain: tokio::sync::watch::Sender::new(false),
            open: AtomicUsize::new(0),
        });
        Ok(Router { listeners, shared })
    }

    /// Starts the router threads, then sweeps the connection table until the task is dropped.
    /// Only the threads hold the listeners (the kernel redirects only while a listener is
    /// open): they close them when they stop accepting, at [`Shared::drain`] or if they die.
    pub async fn serve(self) {
        for i in 0..self.shared.settings.workers.max(1) {
            let listeners: Vec<_> = self
                .listeners
                .iter()
                .filter_map(|(slot, l)| match l.try_clone() {
                    Ok(l) => Some((*slot, l)),
                    Err(error) => {
                        tracing::error!(%error, "cannot share a router listener with a worker");
                        None
                    }
                })
                .collect();
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || conn::worker(shared, listeners));
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start router worker {i}");
            }
        }
        let Router { listeners, shared } = self;
        drop(listeners);
        sweep_loop(shared).await
    }
}

/// Records of connections that never reached the router (failed handshakes) would stay in the
/// kernel's table; the router deletes the ones it reads and this removes the rest by age.
async fn sweep_loop(shared: Arc<Shared>) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut liveness = tokio::time::interval(LIVENESS_CHECK);
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                let swept = shared
                    .socks
                    .lock()
                    .map(|mut s| s.sweep(SWEEP_AGE))
                    .unwrap_or(0);
                if swept > 0 {
                    tracing::debug!(swept, "removed stale original-destination records");
                }
            }
            _ = liveness.tick() => {
                if !shared.draining() {
                    shared.overload.reassert(&shared.socks);
                }
            }
        }
    }
}

/// The most a client connection can make the router buffer: its request head (HTTP/1.1), or
/// its HTTP/2 receive window, or the copy buffers of an opaque connection, plus the copy
/// buffers.
pub fn connection_buffer_bound(s: &RouterSettings) -> usize {
    s.max_header_bytes
        .max(8192)
        .max(http2::CLIENT_H2_CONN_WINDOW as usize)
        + conn::TUNNEL_BUFFERS
}

/// Descriptors kept for everything but connections (maps, pools, admin, logs).
const FD_RESERVE: usize = 512;
/// A connection holds its client socket and its upstream socket.
const FDS_PER_CONNECTION: usize = 2;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the soft one is often 1024) and returns
/// the limit in force.
fn raise_fd_limit() -> usize {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return usize::MAX;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    usize::try_from(l.rlim_cur).unwrap_or(usize::MAX)
}

const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
const SWEEP_AGE: Duration = Duration::from_secs(30);
/// How often a router with room checks that its liveness slot is filled.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_reserves_its_largest_buffer_plus_copy_buffers() {
        let s = RouterSettings::default();
        assert_eq!(connection_buffer_bound(&s), 128 * 1024 + 16 * 1024);
        let big_heads = RouterSettings {
            max_header_bytes: 1024 * 1024,
            ..RouterSettings::default()
        };
        assert_eq!(connection_buffer_bound(&big_heads), 1024 * 1024 + 16 * 1024);
    }
}
