//! A small blocking client for the agent's admin endpoint (HTTP/1.0 over TCP, localhost).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use crate::admin::{
    access::Token,
    api::{AgentStatus, TablesDoc},
};

/// Where the agent's admin endpoint is.
#[derive(Clone, Debug)]
pub struct AdminClient {
    /// As given (`http://127.0.0.1:9967`), for messages.
    pub url: String,
    host_port: String,
    timeout: Duration,
    /// Sent as `Authorization: Bearer ...` when the agent needs it (`--admin-token-file`).
    token: Option<Token>,
}

/// A response: status code and body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl AdminClient {
    /// `url` is `http://host:port` or `host:port`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if url.starts_with("https://") {
            return Err(format!("{url}: the admin endpoint speaks plain HTTP"));
        }
        let host_port = rest.trim_end_matches('/').to_string();
        if host_port.is_empty() || host_port.contains('/') {
            return Err(format!("{url}: expected http://host:port"));
        }
        Ok(AdminClient {
            url: url.to_string(),
            host_port,
            timeout,
            token: None,
        })
    }

    /// Sends `token` with every request.
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        self.host_port
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.url))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.url))
    }

    /// Sends one request; errors are texts for humans ("connection refused" etc.).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<Reply, String> {
        let addr = self.addr()?;
        let mut s = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| format!("at {}: cannot connect: {e}", self.url))?;
        s.set_read_timeout(Some(self.timeout)).ok();
        s.set_write_timeout(Some(self.timeout)).ok();
        let body = body.unwrap_or("");
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: {}\r\n", t.authorization()))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            self.host_port,
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("at {}: {e}", self.url))?;
        let mut raw = Vec::new();
        s.take(64 << 20)
            .read_to_end(&mut raw)
            .map_err(|e| format!("at {}: reading the answer: {e}", self.url))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("at {}: malformed answer", self.url))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("at {}: malformed status line", self.url))?;
        Ok(Reply {
            status,
            body: body.to_string(),
        })
    }

    /// `GET path`, expecting 200 and a JSON body.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let r = self.request("GET", path, None)?;
        if r.status != 200 {
            return Err(format!(
                "at {}: GET {path} answered {}: {}",
                self.url,
                r.status,
                r.body.trim()
            ));
        }
        serde_json::from_str(&r.body).map_err(|e| format!("at {}: GET {path}: {e}", self.url))
    }

    pub fn tables(&self) -> Result<TablesDoc, String> {
        self.get_json("/tables")
    }

    pub fn status(&self) -> Result<AgentStatus, String> {
        self.get_json("/status")
    }
}
