//! HTTP/2 (h2c, gRPC) on the `h2` crate directly: every stream routed on its own by the key it
//! carries, forwarded on the client pod's pooled upstream connection, its bodies moved frame by
//! frame under both sides' flow control and its trailers relayed.
//!
//! The streams of a client connection are polled inside that connection's task, not spawned:
//! what one wake-up produces for the client (response heads, data, window updates) leaves in
//! one write, and no task, channel or boxed body sits between the two connections.

use std::{
    future::poll_fn,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    FutureExt,
    stream::{FuturesUnordered, StreamExt},
};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream, server::SendResponse};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use redirect_common::OrigDst;
use tokio::net::TcpStream;

use super::{
    DEBUG_HEADER, Worker,
    conn::drained,
    key::extract_key,
    pool::PoolKey,
    prefixed::Prefixed,
    route::{Decided, Failure, decide, key_or_none},
    stats::{Dest, Outcome, RequestOutcome},
};

/// HTTP/2 receive windows towards clients: the most request body bytes one client connection
/// can make the router hold while its upstream does not read.
pub const CLIENT_H2_CONN_WINDOW: u32 = 128 * 1024;
const CLIENT_H2_STREAM_WINDOW: u32 = 64 * 1024;
/// Streams one client connection may have open at once.
const MAX_CLIENT_STREAMS: u32 = 200;
/// A client connection is pinged this often and closed when the answer takes longer than
/// [`PONG_WITHIN`]: a client that vanished without closing does not hold its streams (and
/// their upstream streams) forever. Upstream connections rely on TCP keepalive instead.
const PING_EVERY: Duration = Duration::from_secs(30);
const PONG_WITHIN: Duration = Duration::from_secs(20);

/// Serves one client HTTP/2 connection to its end.
pub async fn serve(
    io: Prefixed<TcpStream>,
    peer: SocketAddr,
    orig: OrigDst,
    worker: &Arc<Worker>,
) -> Outcome {
    let shared = &worker.shared;
    let mut b = h2::server::Builder::new();
    b.max_header_list_size(u32::try_from(shared.settings.max_header_bytes).unwrap_or(u32::MAX))
        // What a client can make the router hold per connection (node-local round trips are
        // short: small windows cost no throughput).
        .initial_connection_window_size(CLIENT_H2_CONN_WINDOW)
        .initial_window_size(CLIENT_H2_STREAM_WINDOW)
        .max_concurrent_streams(MAX_CLIENT_STREAMS);
    // The preface arrived (detection saw it); the client's SETTINGS must follow as promptly
    // as a request head.
    let mut conn =
        match tokio::time::timeout(shared.settings.header_timeout, b.handshake::<_, Bytes>(io))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "HTTP/2 handshake failed");
                return Outcome::Reset;
            }
            Err(_) => {
                tracing::debug!(%peer, "HTTP/2 handshake not finished within the header timeout");
                return Outcome::Reset;
            }
        };
    let alive = keepalive(conn.ping_pong());
    tokio::pin!(alive);
    let mut drain = shared.drain.subscribe();
    let mut draining = false;
    let mut streams = FuturesUnordered::new();
    let ended = loop {
        // Streams first: the frames they queue are written when the connection is polled
        // next, all in one go.
        tokio::select! {
            biased;
            Some(()) = streams.next(), if !streams.is_empty() => {}
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    streams.push(exchange(req, respond, worker, peer.ip(), orig));
                }
                Some(Err(error)) => break Err(error.to_string()),
                // Closed, or shut down after a GOAWAY once its streams ended.
                None => break Ok(()),
            },
            // At the drain, GOAWAY: streams in flight complete, the client opens new ones
            // elsewhere.
            _ = drained(&mut drain), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            () = &mut alive => break Err("no answer to a ping".to_string()),
        }
    };
    // Streams still open lost their client: dropping them resets their upstream streams.
    drop(streams);
    match ended {
        Ok(()) => Outcome::Forwarded,
        Err(error) => {
            tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
            Outcome::Reset
        }
    }
}

/// Completes when the peer leaves a ping unanswered (never, without a ping handle).
async fn keepalive(pp: Option<PingPong>) {
    let Some(mut pp) = pp else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_EVERY).await;
        match tokio::time::timeout(PONG_WITHIN, pp.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// One stream: routed, forwarded, its response relayed. Never fails: every problem becomes
/// a response (or, once the response head is out, a reset) and a count.
async fn exchange(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    worker: &Worker,
    client: IpAddr,
    orig: OrigDst,
) {
    let shared = &worker.shared;
    let started = Instant::now();
    let key = key_or_none(shared, extract_key(&shared.settings.keys, req.headers()));
    let (upstream, dest, label) = match decide(shared, &orig, key.as_deref()) {
        Decided::Unavailable { message, label } => {
            reply(
                &mut respond,
                StatusCode::SERVICE_UNAVAILABLE,
                &message,
                label.as_deref(),
            );
            return;
        }
        Decided::Go {
            upstream,
            dest,
            label,
        } => (upstream, dest, label),
    };
    let key = PoolKey { client, upstream };
    let forwarded = forward(
        req,
        &mut respond,
        worker,
        key,
        dest,
        label.as_deref(),
        started,
    );
    let Err(failure) = forwarded.await else {
        return;
    };
    let (status, reason, outcome) = failure.answer(upstream);
    shared.stats.count_request(dest, outcome);
    shared.stats.observe(dest, started.elapsed());
    reply(&mut respond, status, &reason, label.as_deref());
}

/// Sends the request upstream and relays the response. `Err` only while no response head has
/// gone to the client: the caller answers it.
async fn forward(
    req: Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
    worker: &Worker,
    key: PoolKey,
    dest: Dest,
    label: Option<&str>,
    started: Instant,
) -> Result<(), Failure> {
    let shared = &worker.shared;
    let timeout = shared.settings.response_timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let (parts, body) = req.into_parts();
    let end = body.is_end_stream();
    let opened = async {
        // A pooled connection whose upstream is going away (GOAWAY: a rolling restart, gRPC's
        // max connection age) takes no new stream; nothing was sent on it yet, so the request
        // goes once more, on a new connection.
        let mut fresh = false;
        loop {
            let conn = match worker.pool.h2(key).await {
                Ok(c) => c,
                Err(e) => return Err(Failure::unreachable(shared, e)),
            };
            // Waits while the upstream's stream limit is reached.
            match conn.send.clone().ready().await {
                Ok(mut send) => {
                    return send
                        .send_request(Request::from_parts(parts, ()), end)
                        .map_err(Failure::upstream);
                }
                Err(e) => {
                    conn.retire();
                    if fresh {
                        return Err(Failure::upstream(e));
                    }
                    fresh = true;
                }
            }
        }
    };
    let (response, up_body) = tokio::select! {
        biased;
        r = opened => r?,
        _ = &mut deadline => return Err(Failure::Timeout(timeout)),
        // The client gave up: dropping the upstream handles resets the upstream stream.
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return Ok(()),
    };
    // Fused: it may end before the response does, and is polled again after.
    let request_body = async {
        if end {
            return std::future::pending().await;
        }
        relay_request_body(body, up_body, shared.settings.body_idle_timeout).await
    }
    .fuse();
    tokio::pin!(request_body, response);
    let head = loop {
        tokio::select! {
            biased;
            r = &mut response => break r.map_err(Failure::upstream)?,
            r = &mut request_body => r?,
            _ = &mut deadline => return Err(Failure::Timeout(timeout)),
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return Ok(()),
        }
    };
    let (mut parts, up_resp_body) = head.into_parts();
    if let Some(label) = label
        && let Ok(v) = HeaderValue::from_str(label)
    {
        parts.headers.insert(DEBUG_HEADER, v);
    }
    shared.stats.count_request(dest, RequestOutcome::Ok);
    shared.stats.observe(dest, started.elapsed());
    let end = up_resp_body.is_end_stream();
    let Ok(down) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return Ok(()); // the client is gone
    };
    if end {
        return Ok(());
    }
    // The request body keeps flowing while the response does (bidirectional gRPC streams);
    // once the response has ended, what is left of the request is not wanted.
    let response_body = relay_response_body(up_resp_body, down);
    tokio::pin!(response_body);
    loop {
        tokio::select! {
            biased;
            () = &mut response_body => return Ok(()),
            _ = &mut request_body => {}
        }
    }
}

/// Moves the client's request body and trailers upstream. A failure resets the upstream
/// stream.
async fn relay_request_body(
    mut body: RecvStream,
    mut up: SendStream<Bytes>,
    idle: Option<Duration>,
) -> Result<(), Failure> {
    let cut = match relay(&mut body, &mut up, idle).await {
        Ok(()) => return Ok(()),
        Err(cut) => cut,
    };
    match cut {
        Cut::Idle(d) => {
            up.send_reset(Reason::CANCEL);
            Err(Failure::Upstream(format!(
                "the client sent no request body data for {d:?}"
            )))
        }
        Cut::Receive(e) => {
            up.send_reset(Reason::CANCEL);
            Err(Failure::BadBody(client_reason(&e)))
        }
        Cut::Send(e) => Err(Failure::upstream(e)),
    }
}

fn client_reason(e: &h2::Error) -> String {
    match e.reason() {
        Some(reason) if e.is_reset() => format!("the client reset its stream ({reason})"),
        _ => e.to_string(),
    }
}

/// Moves the upstream's response body and trailers to the client. An upstream reset is passed
/// on; a client reset ends it (dropping the upstream stream resets it).
async fn relay_response_body(mut body: RecvStream, mut down: SendStream<Bytes>) {
    if let Err(Cut::Receive(e)) = relay(&mut body, &mut down, None).await {
        down.send_reset(e.reason().unwrap_or(Reason::INTERNAL_ERROR));
    }
}

/// Why a relay stopped before the end of its stream.
enum Cut {
    /// Nothing arrived for the idle limit.
    Idle(Duration),
    /// The sending peer failed or reset its stream.
    Receive(h2::Error),
    /// The receiving peer reset its stream, or sending to it failed.
    Send(h2::Error),
}

/// Moves `from`'s data and trailers to `to`, each frame within `to`'s window; `from`'s window
/// is given back only once a frame is handed on, so at most one window is held. `idle`: the
/// longest wait for the next frame. A reset of `to` ends it at once.
async fn relay(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    idle: Option<Duration>,
) -> Result<(), Cut> {
    loop {
        let next = tokio::select! {
            biased;
            r = poll_fn(|cx| to.poll_reset(cx)) => {
                return Err(Cut::Send(r.map_or_else(|e| e, h2::Error::from)));
            }
            next = async {
                match idle {
                    None => Ok(from.data().await),
                    Some(d) => tokio::time::timeout(d, from.data()).await.map_err(|_| d),
                }
            } => next.map_err(Cut::Idle)?,
        };
        match next {
            Some(Ok(chunk)) => {
                let len = chunk.len();
                let last = from.is_end_stream();
                send_all(to, chunk, last).await.map_err(Cut::Send)?;
                let _ = from.flow_control().release_capacity(len);
                if last {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(Cut::Receive(e)),
            None => break,
        }
    }
    let trailers: Option<HeaderMap> = from.trailers().await.map_err(Cut::Receive)?;
    match trailers {
        Some(t) => to.send_trailers(t),
        None => to.send_data(Bytes::new(), true),
    }
    .map_err(Cut::Send)
}

/// Sends `data` as the peer's window allows, `end` ending the stream with the last frame.
async fn send_all(s: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), h2::Error> {
    if data.is_empty() {
        return s.send_data(data, end);
    }
    while !data.is_empty() {
        s.reserve_capacity(data.len());
        let mut granted = s.capacity();
        while granted == 0 {
            granted = match poll_fn(|cx| s.poll_capacity(cx)).await {
                Some(r) => r?,
                // Reset or closed by the peer.
                None => return Err(h2::Error::from(Reason::CANCEL)),
            };
        }
        let part = data.split_to(granted.min(data.len()));
        s.send_data(part, end && data.is_empty())?;
    }
    Ok(())
}

/// A response the router makes itself: status, a one-line reason and the debug header.
fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &str, label: Option<&str>) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(label) = label
        && let Ok(v) = HeaderValue::from_str(label)
    {
        resp.headers_mut().insert(DEBUG_HEADER, v);
    }
    if let Ok(mut s) = respond.send_response(resp, false) {
        // Small: queued whole, sent as the client's window allows.
        let _ = s.send_data(Bytes::from(format!("{reason}\n")), true);
    }
}
