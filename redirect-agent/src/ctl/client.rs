//! A small blocking client for the agent's admin endpoint: hyper's HTTP/1.1 client, one
//! connection per request, on a runtime of its own (redirectctl is synchronous).

use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderValue, Request,
    header::{AUTHORIZATION, HOST},
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::timeout};

use crate::{
    admin::{
        access::Token,
        api::{AgentStatus, TablesDoc},
    },
    error_chain::chain,
};

/// Largest answer read.
const MAX_BODY: usize = 64 << 20;

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

    /// Sends one request; errors are texts for humans ("connection refused" etc.). Each step
    /// (connecting, sending and reading the head, reading the body) has the client's timeout.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<Reply, String> {
        let addr = self.addr()?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host_port);
        if let Some(t) = &self.token {
            let mut value = HeaderValue::try_from(t.authorization())
                .map_err(|e| format!("at {}: the admin token: {e}", self.url))?;
            value.set_sensitive(true);
            req = req.header(AUTHORIZATION, value);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .map_err(|e| format!("at {}: {method} {path}: {e}", self.url))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("at {}: {e}", self.url))?;
        rt.block_on(self.exchange(addr, req))
    }

    async fn exchange(&self, addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let at = &self.url;
        let stream = match timeout(self.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("at {at}: cannot connect: {e}")),
            Err(_) => return Err(format!("at {at}: cannot connect: connection timed out")),
        };
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("at {at}: {}", chain(&e)))?;
        // Drives the connection while the request and its answer go through it.
        tokio::spawn(conn);
        let resp = match timeout(self.timeout, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(format!("at {at}: {}", chain(&e))),
            Err(_) => return Err(format!("at {at}: no answer within {:?}", self.timeout)),
        };
        let status = resp.status().as_u16();
        let body = match timeout(
            self.timeout,
            Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Err(format!("at {at}: reading the answer: {}", chain(&*e))),
            Err(_) => return Err(format!("at {at}: reading the answer: timed out")),
        };
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
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

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::TcpListener,
        thread,
    };

    use super::*;

    /// Answers one request with `answer` and returns the request head it read.
    fn serve_once(answer: &'static str) -> (String, thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let t = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            r.get_mut().write_all(answer.as_bytes()).unwrap();
            head
        });
        (url, t)
    }

    #[test]
    fn a_request_sends_host_and_token_and_reads_status_and_body() {
        let (url, server) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"a\":1}\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = AdminClient::new(&url, Duration::from_secs(5))
            .unwrap()
            .with_token(Token::from_file(&file).unwrap());
        let r = c.request("GET", "/tables", None).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{\"a\":1}\n"));
        let head = server.join().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /tables http/1.1\r\n"), "{head}");
        let host = url.strip_prefix("http://").unwrap();
        assert!(head.contains(&format!("host: {host}\r\n")), "{head}");
        assert!(head.contains("authorization: bearer s3cret\r\n"), "{head}");
    }

    #[test]
    fn an_error_status_is_an_answer_and_get_json_names_it() {
        let (url, server) =
            serve_once("HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\nnot found\n");
        let c = AdminClient::new(&url, Duration::from_secs(5)).unwrap();
        let e = c.get_json::<serde_json::Value>("/nope").unwrap_err();
        assert_eq!(e, format!("at {url}: GET /nope answered 404: not found"));
        server.join().unwrap();
    }

    #[test]
    fn errors_name_the_address_and_the_reason() {
        // A port nobody listens on: bound, then closed.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{addr}");
        let c = AdminClient::new(&url, Duration::from_secs(5)).unwrap();
        let e = c.request("GET", "/status", None).unwrap_err();
        assert!(e.starts_with(&format!("at {url}: cannot connect: ")), "{e}");
        assert!(e.contains("refused"), "{e}");

        // A server that never answers: the timeout ends the wait.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let hold = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.read(&mut [0; 1024]);
            thread::sleep(Duration::from_millis(500));
        });
        let c = AdminClient::new(&url, Duration::from_millis(100)).unwrap();
        let e = c.request("GET", "/status", None).unwrap_err();
        assert_eq!(e, format!("at {url}: no answer within 100ms"));
        hold.join().unwrap();

        // Not HTTP.
        let (url, server) = serve_once("SSH-2.0-OpenSSH\r\n\r\n");
        let c = AdminClient::new(&url, Duration::from_secs(5)).unwrap();
        let e = c.request("GET", "/status", None).unwrap_err();
        assert!(e.starts_with(&format!("at {url}: ")), "{e}");
        server.join().unwrap();

        assert_eq!(
            AdminClient::new("https://127.0.0.1:1", Duration::from_secs(1)).unwrap_err(),
            "https://127.0.0.1:1: the admin endpoint speaks plain HTTP"
        );
    }
}
