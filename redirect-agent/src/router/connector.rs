//! Opening upstream connections: `SO_MARK` set before `connect()` (the kernel never redirects
//! the router's own sockets), in the client pod's network namespace when it is known, within
//! the connect timeout.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use socket2::Domain;
use tokio::net::TcpStream;

use super::{
    client_netns::{ClientNetns, Place},
    listener::{connect_marked, connect_socket},
    log_limit::LogLimit,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ConnectError {
    /// The system error, when there is one (to tell descriptor exhaustion from a bad upstream).
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            ConnectError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// TCP keepalive on upstream sockets: an upstream that vanished without closing (its node or
/// network gone) is noticed after ~1 min of silence, also under a request that waits, without
/// HTTP/2 PINGs (gRPC servers count a client's pings, and close connections that ping more
/// often than every 5 minutes, or at all while idle).
const UPSTREAM_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(30))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

pub struct Connector {
    pub mark: u32,
    pub timeout: Duration,
    /// Upstream sockets in the client pod's namespace; `None`: always the node's.
    pub netns: Option<ClientNetns>,
    /// Failures to find a pod's namespace, logged at most every 10 s.
    pub netns_log: LogLimit,
    pub netns_errors: std::sync::Arc<AtomicU64>,
}

impl Connector {
    /// Fail open, like every other failure of the router: the connection is made from the
    /// node's namespace, counted and logged.
    fn fell_back(&self, client: IpAddr, error: &dyn std::fmt::Display) {
        self.netns_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.netns_log.allow() {
            tracing::error!(
                %error,
                %client,
                suppressed,
                "upstream connection from the node's network namespace instead of the client pod's"
            );
        }
    }

    /// A connection to `dst` on behalf of the client at `client`.
    pub async fn connect(
        &self,
        client: IpAddr,
        dst: SocketAddr,
    ) -> Result<TcpStream, ConnectError> {
        let place = match &self.netns {
            Some(n) => match n.place(client).await {
                Ok(p) => p,
                Err(error) => {
                    self.fell_back(client, &error);
                    Place::Node
                }
            },
            None => Place::Node,
        };
        let connecting = async {
            let socket = match (place, &self.netns) {
                (Place::Pod(netns), Some(n)) => {
                    match n.socket_in(netns, Domain::for_address(dst)).await {
                        Ok(s) => Some(s),
                        Err(error) => {
                            self.fell_back(client, &error);
                            None
                        }
                    }
                }
                _ => None,
            };
            match socket {
                Some(s) => connect_socket(s, dst, self.mark).await,
                None => connect_marked(dst, self.mark).await,
            }
        };
        match tokio::time::timeout(self.timeout, connecting).await {
            Err(_) => Err(ConnectError::Timeout {
                addr: dst,
                after: self.timeout,
            }),
            Ok(Err(source)) => Err(ConnectError::Io { addr: dst, source }),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&UPSTREAM_KEEPALIVE);
                Ok(s)
            }
        }
    }
}
