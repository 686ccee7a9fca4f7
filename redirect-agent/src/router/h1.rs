//! The in-place HTTP/1.1 path, which serves nearly every HTTP/1.1 request: the request head is
//! parsed where it was read (only what routing and framing need), forwarded as received less
//! its hop-by-hop lines, and bodies are copied as they come, chunk framing included, never
//! re-framed. One timer per connection, moved lazily; upstream sockets are plain sockets,
//! pooled per client pod and upstream between requests.
//!
//! Upgrades (WebSocket), CONNECT and HTTP/1.0 requests hand the connection, with what was read
//! of it, to the general path (hyper) for the rest of its life.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use redirect_common::OrigDst;
use redirect_l7::{
    chunked::Chunked,
    head::{self, Body, Limits},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{
    DEBUG_HEADER, Worker,
    conn::{drained, linger_close, router_response},
    deadline::Deadline,
    pool::{Checkout, PoolKey},
    prefixed::Prefixed,
    route::{Decided, Failure, decide, key_or_none},
    scratch::{read_append, try_read_append},
    stats::{Dest, Outcome, RequestOutcome},
};

/// Most bytes of one read; a connection's buffers stay this small while bodies stream.
const READ_CHUNK: usize = 16 * 1024;
/// Longest upstream response head (HTTP/2: its header list).
pub(super) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 256;
const RESPONSE_LIMITS: Limits = Limits {
    max_bytes: MAX_RESPONSE_HEAD,
    max_headers: MAX_RESPONSE_HEADERS,
};

/// How serving the connection in place ended.
pub enum Served {
    Done(Outcome),
    /// A request this path does not serve: the general path takes the connection, whose
    /// unserved bytes (that request first) are in the stream's prefix.
    HandOff(Prefixed<TcpStream>),
}

/// Serves requests on `client`, whose first bytes `prefix` were read by protocol detection.
pub async fn serve(
    mut client: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    orig: OrigDst,
    worker: &Arc<Worker>,
) -> Served {
    let shared = &worker.shared;
    let settings = &shared.settings;
    let limits = Limits {
        max_bytes: settings.max_header_bytes,
        max_headers: settings.max_headers,
    };
    let mut cbuf = prefix;
    let mut clock = Deadline::new(tokio::time::Instant::now() + settings.header_timeout);
    let mut drain_rx = shared.drain.subscribe();
    let drain = drained(&mut drain_rx);
    tokio::pin!(drain);
    loop {
        clock.set(tokio::time::Instant::now() + settings.header_timeout);
        // Bytes of `cbuf` already searched for the end of the head: a head is parsed once, when
        // its empty line has arrived, not again on every read (a head trickled byte by byte
        // would otherwise cost the square of its length).
        let mut scanned = 0;
        let mut req = loop {
            scanned = skip_empty_lines(&mut cbuf, scanned);
            let parsed = if head_ended(&cbuf, scanned) {
                head::parse_request(&cbuf, limits, &settings.keys)
            } else if cbuf.len() >= limits.max_bytes {
                Err(head::HeadError::TooLarge(limits.max_bytes))
            } else {
                Ok(None)
            };
            scanned = cbuf.len();
            match parsed {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "refused a request head");
                    let resp =
                        router_response(e.status(), &format!("request head: {e}"), None, true);
                    linger_close(&mut client, &resp).await;
                    return Served::Done(Outcome::Forwarded);
                }
            }
            if cbuf.is_empty() {
                // Idle between requests: no buffer held.
                cbuf = Vec::new();
            }
            let ready = tokio::select! {
                biased;
                _ = &mut drain, if cbuf.is_empty() => {
                    return Served::Done(Outcome::Forwarded);
                }
                r = client.readable() => r,
                _ = clock.passed() => {
                    if cbuf.is_empty() {
                        return Served::Done(Outcome::Forwarded);
                    }
                    tracing::debug!(%peer, "cut: request head not complete within the header timeout");
                    let resp = router_response(408, "request head not complete in time", None, true);
                    linger_close(&mut client, &resp).await;
                    return Served::Done(Outcome::Reset);
                }
            };
            if ready.is_err() {
                return Served::Done(Outcome::Reset);
            }
            match try_read_append(&client, &mut cbuf) {
                Ok(0) => {
                    return Served::Done(if cbuf.is_empty() {
                        Outcome::Forwarded
                    } else {
                        Outcome::Reset
                    });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    return Served::Done(Outcome::Reset);
                }
            }
        };
        if req.special.is_some() {
            return Served::HandOff(Prefixed::new(cbuf, client));
        }
        let started = Instant::now();
        let key = key_or_none(shared, std::mem::replace(&mut req.key, Ok(None)));
        let (upstream, dest, label) = match decide(shared, &orig, key.as_deref()) {
            Decided::Unavailable { message, label } => {
                // A request with a body is not read past: the connection closes after the answer.
                let close = req.body != Body::None || req.close;
                let resp = router_response(503, &message, label.as_deref(), close);
                if client.write_all(&resp).await.is_err() || close {
                    return Served::Done(Outcome::Forwarded);
                }
                cbuf.drain(..req.len);
                continue;
            }
            Decided::Go {
                upstream,
                dest,
                label,
            } => (upstream, dest, label),
        };
        let ex = Exchange {
            worker,
            peer,
            upstream,
            dest,
            label: label.as_deref(),
            req: &req,
            started,
        };
        // Boxed: an idle connection's task then holds only the loop's state, not the
        // exchange's (the task's size is that of its largest state).
        let ended = Box::pin(ex.run(&mut client, &mut cbuf, &mut clock)).await;
        if let Some(socket) = ended.upstream {
            // Back to the pool at once: the pod's other connections may use it meanwhile.
            let key = PoolKey {
                client: peer.ip(),
                upstream,
            };
            worker.pool.put_socket(key, socket);
        }
        if !ended.keep_client || req.close || shared.draining() {
            return Served::Done(ended.outcome);
        }
    }
}

/// Drops the empty lines a client may send before a request line (RFC 9112 2.2); returns where
/// the search for the head's end resumes.
fn skip_empty_lines(buf: &mut Vec<u8>, scanned: usize) -> usize {
    let mut n = 0;
    loop {
        match &buf[n..] {
            [b'\r', b'\n', ..] => n += 2,
            [b'\n', ..] => n += 1,
            _ => break,
        }
    }
    if n == 0 {
        return scanned;
    }
    buf.drain(..n);
    0
}

/// Whether the empty line that ends a head is in `buf`, looking only at what came after
/// `scanned` (and the 2 bytes before, where it may have begun). `buf` starts with a request or
/// status line, so the first empty line is the head's end.
fn head_ended(buf: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(2);
    buf[from..]
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && buf.get(from + i + 2) == Some(&b'\n')))
}

/// One request and its response.
struct Exchange<'a> {
    worker: &'a Worker,
    peer: SocketAddr,
    upstream: SocketAddr,
    dest: Dest,
    label: Option<&'a str>,
    req: &'a head::Request,
    started: Instant,
}

/// What an exchange leaves.
struct Ended {
    /// The upstream socket, clean for another request.
    upstream: Option<TcpStream>,
    keep_client: bool,
    outcome: Outcome,
}

/// Why a request body stopped.
enum BodyFail {
    /// The client's body was malformed or cut short.
    Client(String),
    /// The client sent nothing for the body-idle limit.
    Idle(Duration),
    /// Writing to the upstream failed (it may still have answered).
    Upstream,
}

/// Why an exchange failed.
enum Fail {
    /// 504: no response head within the response timeout.
    Timeout(Duration),
    /// 502: nothing (or nothing valid) came back; `replayable`: not a byte of a response.
    Upstream { reason: String, replayable: bool },
    /// 400: the client's request body could not be forwarded whole.
    BadBody(String),
    /// The client went away while its response was being written.
    Client,
}

/// The shared answer, with the status as a number.
fn answer(f: Failure, upstream: SocketAddr) -> (u16, String, RequestOutcome) {
    let (status, reason, outcome) = f.answer(upstream);
    (status.as_u16(), reason, outcome)
}

impl Fail {
    /// The router's answer to the client: status, reason and how the request is counted;
    /// `None` when the client is gone.
    fn answer(self, upstream: SocketAddr) -> Option<(u16, String, RequestOutcome)> {
        Some(match self {
            Fail::Timeout(after) => answer(Failure::Timeout(after), upstream),
            // The reason already names the upstream.
            Fail::Upstream { reason, .. } => (502, reason, RequestOutcome::UpstreamError),
            Fail::BadBody(reason) => answer(Failure::BadBody(reason), upstream),
            Fail::Client => return None,
        })
    }
}

impl Exchange<'_> {
    async fn run(&self, client: &mut TcpStream, cbuf: &mut Vec<u8>, clock: &mut Deadline) -> Ended {
        let shared = &self.worker.shared;
        let key = PoolKey {
            client: self.peer.ip(),
            upstream: self.upstream,
        };
        let mut found = Checkout::default();
        let mut attempt = self.worker.pool.take_socket(key, &mut found);
        shared.stats.count_pool_discards(found.discarded);
        let no_body = self.req.body == Body::None;
        let mut copy = Vec::new();
        let head: &[u8] = if self.req.drop.is_empty() {
            &cbuf[..self.req.len]
        } else {
            head::copy_without(cbuf, self.req.len, &self.req.drop, &mut copy);
            &copy
        };
        // A pooled socket the upstream closed meanwhile fails the first write or read: a
        // request without body is sent again, once, on a new connection.
        let (mut up, result) = loop {
            let was_reused = attempt.is_some();
            let mut up = match attempt.take() {
                Some(s) => s,
                None => match self.connect(key).await {
                    Ok(s) => s,
                    Err(reason) => {
                        return self
                            .failed(client, 502, reason, RequestOutcome::UpstreamError, no_body)
                            .await;
                    }
                },
            };
            if up.write_all(head).await.is_err() {
                if was_reused {
                    continue;
                }
                let reason = format!("upstream {}: connection reset", self.upstream);
                return self
                    .failed(client, 502, reason, RequestOutcome::UpstreamError, false)
                    .await;
            }
            if !no_body {
                break (up, None);
            }
            let head_sent = AtomicBool::new(false);
            let (mut ur, _) = up.split();
            let (_, mut cw) = client.split();
            let r = self.relay(&mut ur, &mut cw, clock, &head_sent).await;
            match r {
                Err(Fail::Upstream {
                    replayable: true, ..
                }) if was_reused => continue,
                r => {
                    break (
                        up,
                        Some(
                            r.map(|r| (r, true))
                                .map_err(|f| (f, head_sent.load(Relaxed))),
                        ),
                    );
                }
            }
        };
        cbuf.drain(..self.req.len);
        let relayed = match result {
            Some(r) => r,
            None => self.pump(client, cbuf, &mut up, clock).await,
        };
        match relayed {
            Ok((r, body_done)) => {
                shared.stats.count_request(self.dest, RequestOutcome::Ok);
                shared.stats.observe(self.dest, r.head_after);
                Ended {
                    upstream: (r.upstream_clean && body_done).then_some(up),
                    keep_client: !r.client_close && body_done,
                    outcome: Outcome::Forwarded,
                }
            }
            Err((fail, head_sent)) => match fail.answer(self.upstream) {
                None => {
                    // Nobody reads the response: the client is gone.
                    shared.stats.count_request(self.dest, RequestOutcome::Ok);
                    shared.stats.observe(self.dest, self.started.elapsed());
                    Ended {
                        upstream: None,
                        keep_client: false,
                        outcome: Outcome::Forwarded,
                    }
                }
                Some((_, _, outcome)) if head_sent => {
                    // The response is cut: closing is the only way to tell the client.
                    shared.stats.count_request(self.dest, outcome);
                    shared.stats.observe(self.dest, self.started.elapsed());
                    Ended {
                        upstream: None,
                        keep_client: false,
                        outcome: Outcome::Reset,
                    }
                }
                Some((status, reason, outcome)) => {
                    self.failed(client, status, reason, outcome, no_body).await
                }
            },
        }
    }

    /// A new upstream connection, from the client pod's network namespace.
    async fn connect(&self, key: PoolKey) -> Result<TcpStream, String> {
        self.worker
            .shared
            .connector
            .connect(key.client, key.upstream)
            .await
            .map_err(|e| {
                self.worker.shared.connect_failed(&e);
                format!("upstream {}: {e}", self.upstream)
            })
    }

    /// Answers the request with the router's own response, counted.
    async fn failed(
        &self,
        client: &mut TcpStream,
        status: u16,
        reason: String,
        outcome: RequestOutcome,
        keep: bool,
    ) -> Ended {
        let shared = &self.worker.shared;
        shared.stats.count_request(self.dest, outcome);
        shared.stats.observe(self.dest, self.started.elapsed());
        let keep = keep && !self.req.close;
        let resp = router_response(status, &reason, self.label, !keep);
        if keep {
            if client.write_all(&resp).await.is_err() {
                return Ended {
                    upstream: None,
                    keep_client: false,
                    outcome: Outcome::Forwarded,
                };
            }
        } else {
            linger_close(client, &resp).await;
        }
        Ended {
            upstream: None,
            keep_client: keep,
            outcome: Outcome::Forwarded,
        }
    }

    /// The request body and the response at once: an upstream may answer (or stream its
    /// answer) before it has read the whole body.
    async fn pump(
        &self,
        client: &mut TcpStream,
        cbuf: &mut Vec<u8>,
        up: &mut TcpStream,
        clock: &mut Deadline,
    ) -> Result<(Relayed, bool), (Fail, bool)> {
        let head_sent = AtomicBool::new(false);
        let settings = &self.worker.shared.settings;
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let send = send_body(
            self.req.body,
            cbuf,
            &mut cr,
            &mut uw,
            settings.body_idle_timeout,
            settings.max_header_bytes,
        );
        let relay = self.relay(&mut ur, &mut cw, clock, &head_sent);
        tokio::pin!(send, relay);
        let mut body_done = false;
        let mut sending = true;
        loop {
            tokio::select! {
                biased;
                r = &mut send, if sending => match r {
                    Ok(()) => {
                        body_done = true;
                        sending = false;
                    }
                    Err(BodyFail::Upstream) => sending = false,
                    Err(BodyFail::Client(reason)) => {
                        return Err((Fail::BadBody(reason), head_sent.load(Relaxed)));
                    }
                    // A body cut for silence stays an upstream failure, as documented.
                    Err(BodyFail::Idle(d)) => {
                        let reason = format!(
                            "upstream {}: the client sent no request body data for {d:?}",
                            self.upstream
                        );
                        return Err((Fail::Upstream { reason, replayable: false }, head_sent.load(Relaxed)));
                    }
                },
                r = &mut relay => {
                    return r.map(|r| (r, body_done)).map_err(|f| (f, head_sent.load(Relaxed)));
                }
            }
        }
    }

    /// Reads the upstream's response (interim ones first) and writes it to the client.
    async fn relay(
        &self,
        ur: &mut ReadHalf<'_>,
        cw: &mut WriteHalf<'_>,
        clock: &mut Deadline,
        head_sent: &AtomicBool,
    ) -> Result<Relayed, Fail> {
        let timeout = self.worker.shared.settings.response_timeout;
        clock.set(tokio::time::Instant::now() + timeout);
        // Grows by what arrives (a usual response is one small segment); a body that takes more
        // reads gets a full read's room below.
        let mut ubuf: Vec<u8> = Vec::new();
        let mut got_any = false;
        let mut scanned = 0;
        let resp = loop {
            let parsed = if head_ended(&ubuf, scanned) {
                head::parse_response(&ubuf, RESPONSE_LIMITS, self.req.head_method)
            } else if ubuf.len() >= MAX_RESPONSE_HEAD {
                Err(head::HeadError::TooLarge(MAX_RESPONSE_HEAD))
            } else {
                Ok(None)
            };
            scanned = ubuf.len();
            match parsed {
                Ok(Some(r)) if r.interim() => {
                    cw.write_all(&ubuf[..r.len])
                        .await
                        .map_err(|_| Fail::Client)?;
                    ubuf.drain(..r.len);
                    scanned = 0;
                    continue;
                }
                Ok(Some(r)) if r.status == 101 => {
                    return Err(self.bad_upstream("switched protocols unasked".into()));
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(e) => return Err(self.bad_upstream(format!("invalid response: {e}"))),
            }
            let n = tokio::select! {
                biased;
                r = read_append(ur.as_ref(), &mut ubuf) => r,
                _ = clock.passed() => return Err(Fail::Timeout(timeout)),
            };
            match n {
                Ok(0) | Err(_) => {
                    return Err(Fail::Upstream {
                        reason: format!(
                            "upstream {}: connection closed before a complete response",
                            self.upstream
                        ),
                        replayable: !got_any && ubuf.is_empty(),
                    });
                }
                Ok(_) => got_any = true,
            }
        };
        let head_after = self.started.elapsed();
        // The head, less hop-by-hop lines, plus the debug header; then what of the body
        // arrived with it, in the same write.
        let mut left = resp.body;
        let mut chunks = Chunked::new(MAX_RESPONSE_HEAD);
        let body_part = take_body(&mut left, &mut chunks, &ubuf[resp.len..])
            .map_err(|e| self.bad_upstream(format!("response body: {e}")))?;
        head_sent.store(true, Relaxed);
        // The last response on this connection says so: the client asked, or the router
        // drains (the client then opens its next connection elsewhere).
        let closing = self.req.close || self.worker.shared.draining();
        if resp.drop.is_empty() && self.label.is_none() && !closing {
            cw.write_all(&ubuf[..resp.len + body_part])
                .await
                .map_err(|_| Fail::Client)?;
        } else {
            let mut out = Vec::with_capacity(resp.len + body_part + 64);
            head::copy_without(&ubuf, resp.end_of_fields, &resp.drop, &mut out);
            if let Some(label) = self.label {
                out.extend_from_slice(format!("{DEBUG_HEADER}: {label}\r\n").as_bytes());
            }
            if closing {
                out.extend_from_slice(b"connection: close\r\n");
            }
            out.extend_from_slice(&ubuf[resp.end_of_fields..resp.len + body_part]);
            cw.write_all(&out).await.map_err(|_| Fail::Client)?;
        }
        ubuf.drain(..resp.len + body_part);
        // The rest of the body.
        while !body_ended(left, &chunks) {
            ubuf.clear();
            ubuf.reserve(READ_CHUNK);
            match ur.read_buf(&mut ubuf).await {
                Ok(0) if left == Body::UntilClose => break,
                Ok(0) | Err(_) => {
                    return Err(Fail::Upstream {
                        reason: "response body cut".into(),
                        replayable: false,
                    });
                }
                Ok(_) => {}
            }
            let n = take_body(&mut left, &mut chunks, &ubuf)
                .map_err(|e| self.bad_upstream(format!("response body: {e}")))?;
            cw.write_all(&ubuf[..n]).await.map_err(|_| Fail::Client)?;
            ubuf.drain(..n);
        }
        // Bytes beyond the response: an upstream that says more than it was asked is not
        // asked again.
        let stray = !ubuf.is_empty();
        if stray {
            self.worker.shared.stats.count_pool_discards(1);
        }
        Ok(Relayed {
            upstream_clean: !resp.close && !stray,
            client_close: closing || resp.body == Body::UntilClose,
            head_after,
        })
    }

    fn bad_upstream(&self, what: String) -> Fail {
        Fail::Upstream {
            reason: format!("upstream {}: {what}", self.upstream),
            replayable: false,
        }
    }
}

/// A relayed response.
struct Relayed {
    upstream_clean: bool,
    client_close: bool,
    /// When its head arrived (the request's latency).
    head_after: Duration,
}

/// How many bytes of `buf` belong to the body still expected (`left`, updated).
fn take_body(
    left: &mut Body,
    chunks: &mut Chunked,
    buf: &[u8],
) -> Result<usize, redirect_l7::chunked::ChunkError> {
    Ok(match left {
        Body::None => 0,
        Body::Length(n) => {
            let k = (*n).min(buf.len() as u64);
            *n -= k;
            if *n == 0 {
                *left = Body::None;
            }
            k as usize
        }
        Body::Chunked => chunks.feed(buf)?,
        Body::UntilClose => buf.len(),
    })
}

fn body_ended(left: Body, chunks: &Chunked) -> bool {
    match left {
        Body::None => true,
        Body::Length(_) | Body::UntilClose => false,
        Body::Chunked => chunks.done(),
    }
}

/// Copies the request body from the client (what `cbuf` already holds first) to the upstream;
/// bytes after it stay in `cbuf` (the next pipelined request).
async fn send_body(
    body: Body,
    cbuf: &mut Vec<u8>,
    cr: &mut ReadHalf<'_>,
    uw: &mut WriteHalf<'_>,
    idle: Option<Duration>,
    max_trailers: usize,
) -> Result<(), BodyFail> {
    let mut left = body;
    let mut chunks = Chunked::new(max_trailers);
    loop {
        let n =
            take_body(&mut left, &mut chunks, cbuf).map_err(|e| BodyFail::Client(e.to_string()))?;
        if n > 0 {
            uw.write_all(&cbuf[..n])
                .await
                .map_err(|_| BodyFail::Upstream)?;
            cbuf.drain(..n);
        }
        if body_ended(left, &chunks) {
            return Ok(());
        }
        cbuf.reserve(READ_CHUNK);
        let read = match idle {
            Some(d) => tokio::time::timeout(d, cr.read_buf(cbuf))
                .await
                .map_err(|_| BodyFail::Idle(d))?,
            None => cr.read_buf(cbuf).await,
        };
        match read {
            Ok(0) => {
                return Err(BodyFail::Client(
                    "the client closed its side before the end of the body".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(BodyFail::Client(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routers_own_responses_are_complete_messages() {
        let r = router_response(
            503,
            "sandbox a has no ready endpoint",
            Some("unavailable k s"),
            false,
        );
        let text = String::from_utf8(r).unwrap();
        let parsed = head::parse_response(text.as_bytes(), RESPONSE_LIMITS, false)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.status, 503);
        assert_eq!(parsed.body, Body::Length(32));
        assert_eq!(&text[parsed.len..], "sandbox a has no ready endpoint\n");
        assert!(text.contains("\r\nx-redirect-upstream: unavailable k s\r\n"));
    }

    #[test]
    fn a_head_is_complete_once_its_empty_line_arrived_however_split() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..head.len() {
            let mut buf = Vec::new();
            let mut scanned = 0;
            let mut ended_at = None;
            for (i, piece) in head.chunks(split).enumerate() {
                buf.extend_from_slice(piece);
                scanned = skip_empty_lines(&mut buf, scanned);
                if ended_at.is_none() && head_ended(&buf, scanned) {
                    ended_at = Some(i);
                }
                scanned = buf.len();
            }
            assert_eq!(
                ended_at,
                Some(head.len().div_ceil(split) - 1),
                "split {split}"
            );
        }
        assert!(head_ended(b"GET / HTTP/1.1\nHost: x\n\n", 0));
        assert!(!head_ended(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
        assert!(!head_ended(b"GET / HTTP/1.1\r\nHost: x\r\n\r", 0));
    }

    #[test]
    fn empty_lines_before_a_request_are_dropped() {
        let mut buf = b"\r\n\n\r\nGET".to_vec();
        assert_eq!(skip_empty_lines(&mut buf, 5), 0);
        assert_eq!(buf, b"GET");
        let mut buf = b"\r".to_vec();
        assert_eq!(skip_empty_lines(&mut buf, 1), 1);
        assert_eq!(buf, b"\r");
    }

    #[test]
    fn body_accounting_stops_at_the_end_of_the_message() {
        let mut left = Body::Length(5);
        let mut c = Chunked::new(0);
        assert_eq!(take_body(&mut left, &mut c, b"abc").unwrap(), 3);
        assert_eq!(take_body(&mut left, &mut c, b"deGET").unwrap(), 2);
        assert!(body_ended(left, &c));
        let mut left = Body::Chunked;
        assert_eq!(
            take_body(&mut left, &mut c, b"1\r\na\r\n0\r\n\r\nGET").unwrap(),
            11
        );
        assert!(body_ended(left, &c));
        let mut left = Body::UntilClose;
        assert_eq!(take_body(&mut left, &mut c, b"all").unwrap(), 3);
        assert!(!body_ended(left, &c));
    }
}
