//! The node-local router: accepts connections the kernel redirected to it, recovers each one's
//! original destination from the kernel's record, and forwards it. It registers its listeners
//! in the liveness sockmap, so the kernel only redirects while a router is accepting.
//!
//! This version forwards every connection to its original destination (passthrough); the
//! per-request routing plugs in at `forward`.

mod addr;
mod listener;
mod stats;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use redirect_common::{OrigDst, ROUTER_SOCK_V4, ROUTER_SOCK_V6};
use tokio::net::{TcpListener, TcpStream};

pub use addr::{from_sockaddr, to_sockaddr};
pub use stats::{Outcome, RouterStats};

use crate::loader::RouterSocks;

/// Where the router listens and how it marks its own sockets.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    /// `SO_MARK` on upstream sockets, so the kernel never redirects them again.
    pub mark: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("router cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("router cannot register its listener for liveness: {0}")]
    Register(crate::sync::MapError),
}

/// A bound router, ready to serve.
pub struct Router {
    listeners: Vec<TcpListener>,
    socks: Arc<Mutex<RouterSocks>>,
    mark: u32,
    pub stats: Arc<RouterStats>,
}

impl Router {
    /// Binds the listeners and registers them in the liveness sockmap.
    pub fn bind(settings: &RouterSettings, mut socks: RouterSocks) -> Result<Self, RouterError> {
        let mut listeners = Vec::new();
        for (addr, slot) in [(settings.v4, ROUTER_SOCK_V4), (settings.v6, ROUTER_SOCK_V6)] {
            let Some(addr) = addr else { continue };
            let l = listener::bind(addr).map_err(|source| RouterError::Listen { addr, source })?;
            socks.register(slot, &l).map_err(RouterError::Register)?;
            tracing::info!(%addr, "router listening");
            listeners.push(l);
        }
        Ok(Router {
            listeners,
            socks: Arc::new(Mutex::new(socks)),
            mark: settings.mark,
            stats: Arc::new(RouterStats::default()),
        })
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(sweep_loop(self.socks.clone()));
        for l in self.listeners {
            let socks = self.socks.clone();
            let stats = self.stats.clone();
            let mark = self.mark;
            tasks.spawn(async move { accept_loop(l, socks, stats, mark).await });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Records of connections that never reached the router (failed handshakes) would stay in the
/// kernel's table; the router deletes the ones it reads and this removes the rest by age.
async fn sweep_loop(socks: Arc<Mutex<RouterSocks>>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let swept = socks.lock().map(|mut s| s.sweep(SWEEP_AGE)).unwrap_or(0);
        if swept > 0 {
            tracing::debug!(swept, "removed stale original-destination records");
        }
    }
}

const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const SWEEP_AGE: std::time::Duration = std::time::Duration::from_secs(30);

async fn accept_loop(
    l: TcpListener,
    socks: Arc<Mutex<RouterSocks>>,
    stats: Arc<RouterStats>,
    mark: u32,
) {
    loop {
        let (client, peer) = match l.accept().await {
            Ok(c) => c,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                stats.count(Outcome::AcceptError);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let orig = socks
            .lock()
            .ok()
            .and_then(|mut s| s.take_orig_dst(&to_sockaddr(peer)));
        let Some(orig) = orig else {
            // Not redirected by the kernel: the router is no open proxy.
            stats.count(Outcome::NoOrigDst);
            tracing::debug!(%peer, "refused: no recorded original destination");
            drop(client);
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let outcome = forward(client, orig, mark).await;
            stats.count(outcome);
        });
    }
}

/// Forwards one client connection to its original destination.
async fn forward(mut client: TcpStream, orig: OrigDst, mark: u32) -> Outcome {
    let dst = from_sockaddr(&orig.dst);
    let mut upstream = match listener::connect_marked(dst, mark).await {
        Ok(s) => s,
        Err(error) => {
            tracing::debug!(%dst, %error, "upstream connect failed");
            return Outcome::UpstreamFailed;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(_) => Outcome::Forwarded,
        Err(_) => Outcome::Reset,
    }
}
