//! Upstream connections, pooled per (upstream address, protocol) and reused: HTTP/1.1
//! connections one request at a time, one multiplexed HTTP/2 connection per upstream.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::listener::connect_marked;

/// Idle HTTP/1.1 connections kept per upstream.
const MAX_IDLE_H1: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

pub struct Pool {
    mark: u32,
    connect_timeout: Duration,
    h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Incoming>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Incoming>>>,
}

impl Pool {
    pub fn new(mark: u32, connect_timeout: Duration) -> Self {
        Pool {
            mark,
            connect_timeout,
            h1: Mutex::default(),
            h2: Mutex::default(),
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, connect_marked(addr, self.mark)).await {
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr,
                after: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// An HTTP/1.1 connection to `addr` ready for a request: an idle pooled one, or a new one.
    pub async fn h1(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        if let Some(idle) = self.h1.lock().ok().and_then(|mut m| {
            let list = m.get_mut(&addr)?;
            list.retain(|s| !s.is_closed());
            let i = list.iter().position(|s| s.is_ready())?;
            Some(list.swap_remove(i))
        }) {
            return Ok(idle);
        }
        self.new_h1(addr, false).await
    }

    /// A fresh HTTP/1.1 connection (with upgrades allowed when `upgrades`), not from the pool.
    pub async fn new_h1(
        &self,
        addr: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let io = TokioIo::new(self.connect(addr).await?);
        let (send, conn) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(io)
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
        Ok(send)
    }

    /// Returns an HTTP/1.1 connection for reuse (it becomes ready when its response is read).
    pub fn put_h1(&self, addr: SocketAddr, send: http1::SendRequest<Incoming>) {
        if send.is_closed() {
            return;
        }
        if let Ok(mut m) = self.h1.lock() {
            let list = m.entry(addr).or_default();
            if list.len() < MAX_IDLE_H1 {
                list.push(send);
            }
        }
    }

    /// The shared HTTP/2 connection to `addr`, opened when missing or closed.
    pub async fn h2(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Incoming>, UpstreamError> {
        if let Some(s) = self.h2.lock().ok().and_then(|m| m.get(&addr).cloned())
            && !s.is_closed()
        {
            return Ok(s);
        }
        let io = TokioIo::new(self.connect(addr).await?);
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        if let Ok(mut m) = self.h2.lock() {
            m.insert(addr, send.clone());
        }
        Ok(send)
    }
}
