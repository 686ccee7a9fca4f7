//! Per-request routing through hyper, for what the in-place HTTP/1.1 path hands over
//! (upgrades, CONNECT, HTTP/1.0): every request routed on its own, by the routing key it
//! carries.

use std::{net::IpAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use redirect_common::OrigDst;

use super::{
    Worker,
    body::{BodyError, UpstreamBody},
    key::extract_key,
    pool::{Checkout, PoolKey},
    route::{Decided, Failure, decide, key_or_none},
    stats::RequestOutcome,
};

pub type RouterBody = Either<Incoming, Full<Bytes>>;

/// Response header naming where a request went, when enabled (`--debug-header`).
pub const DEBUG_HEADER: &str = "x-redirect-upstream";

/// Routes and forwards one request from the pod at `client`. Never fails: every problem
/// becomes a response and a count.
pub async fn handle(
    req: Request<Incoming>,
    worker: Arc<Worker>,
    client: IpAddr,
    orig: OrigDst,
) -> Result<Response<RouterBody>, std::convert::Infallible> {
    let shared = &worker.shared;
    let started = Instant::now();
    let key = key_or_none(shared, extract_key(&shared.settings.keys, req.headers()));
    let (upstream, dest, label) = match decide(shared, &orig, key.as_deref()) {
        Decided::Unavailable { message, label } => {
            let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, &message);
            if let Some(label) = label {
                set_debug_header(&mut resp, &label);
            }
            return Ok(resp);
        }
        Decided::Go {
            upstream,
            dest,
            label,
        } => (upstream, dest, label),
    };

    let upgrade = is_upgrade(&req);
    let body_idle = shared.settings.body_idle_timeout;
    let mut req = req.map(|b| UpstreamBody::new(b, body_idle));
    let key = PoolKey { client, upstream };
    let result = if upgrade {
        Box::pin(forward_upgrade(req, &worker, key)).await
    } else {
        strip_hop_by_hop(req.headers_mut());
        // Boxed, like the upgrade: the forwarding state (pool checkout, connect, timeout) is
        // most of the future's size.
        Box::pin(forward(req, &worker, key)).await
    };
    let (mut resp, outcome) = match result {
        Ok(resp) if upgrade => (resp.map(Either::Left), RequestOutcome::Upgraded),
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            (resp.map(Either::Left), RequestOutcome::Ok)
        }
        Err(failure) => {
            let (status, reason, outcome) = failure.answer(upstream);
            (error_response(status, &reason), outcome)
        }
    };
    shared.stats.count_request(dest, outcome);
    shared.stats.observe(dest, started.elapsed());
    if let Some(label) = label {
        set_debug_header(&mut resp, &label);
    }
    Ok(resp)
}

fn set_debug_header(resp: &mut Response<RouterBody>, label: &str) {
    if let Ok(v) = HeaderValue::from_str(label) {
        resp.headers_mut().insert(DEBUG_HEADER, v);
    }
}

async fn forward(
    req: Request<UpstreamBody>,
    worker: &Worker,
    key: PoolKey,
) -> Result<Response<Incoming>, Failure> {
    let timeout = worker.shared.settings.response_timeout;
    let pool = &worker.pool;
    let fut = async {
        let mut found = Checkout::default();
        let conn = pool.h1(key, &mut found).await;
        worker.shared.stats.count_pool_discards(found.discarded);
        let mut conn = conn.map_err(|e| Failure::unreachable(&worker.shared, e))?;
        // Back to the pool now: it is ready for the next request once this response has been
        // read, and only a ready, quiet connection is handed out again. A failed exchange
        // leaves the connection out.
        let resp = conn.send.send_request(req).await.map_err(sending)?;
        pool.put_h1(key, conn);
        Ok(resp)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout(timeout)),
    }
}

/// A failed exchange: the client's fault when its request body could not be read (hyper's
/// "user body" error, caused by the server side's parse of that body), else the upstream's.
fn sending(e: hyper::Error) -> Failure {
    match client_body_error(&e) {
        Some(cause) => Failure::BadBody(match std::error::Error::source(cause) {
            Some(detail) => format!("{cause}: {detail}"),
            None => cause.to_string(),
        }),
        None => Failure::upstream(e),
    }
}

fn client_body_error(e: &hyper::Error) -> Option<&hyper::Error> {
    use std::error::Error;
    if !e.is_user() {
        return None;
    }
    // A body cut for silence (--body-idle-timeout-ms) stays an upstream failure, as documented.
    match e.source()?.downcast_ref::<BodyError>()? {
        BodyError::Client(cause) => Some(cause),
        BodyError::Idle(_) => None,
    }
}

/// Removes hop-by-hop fields (RFC 9110 7.6.1): `Connection` and every field it names,
/// `Keep-Alive`, `Proxy-Connection`, `Upgrade`, and `TE` unless it is just `trailers` (which
/// gRPC needs end to end). They describe one connection, not the message: forwarded, a client's
/// `Connection: close` would close the pooled upstream connection after every request.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| http::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove(header::UPGRADE);
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    let te_trailers_only = headers.get_all(header::TE).iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
    });
    if !te_trailers_only {
        headers.remove(header::TE);
    }
}

/// Whether the request asks to leave HTTP: `Connection: upgrade` with an `Upgrade` header
/// (WebSocket, ...) or CONNECT.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == http::Method::CONNECT {
        return true;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && req.headers().contains_key(header::UPGRADE)
}

/// WebSocket and other upgrades, and CONNECT: the upgrade request is routed like any other, on
/// a connection of its own, then both sides are spliced together.
async fn forward_upgrade(
    mut req: Request<UpstreamBody>,
    worker: &Worker,
    key: PoolKey,
) -> Result<Response<Incoming>, Failure> {
    let connect = req.method() == http::Method::CONNECT;
    let client_side = hyper::upgrade::on(&mut req);
    let mut conn = worker
        .pool
        .new_h1(key, true)
        .await
        .map_err(Failure::upstream)?;
    let timeout = worker.shared.settings.response_timeout;
    let mut resp = match tokio::time::timeout(timeout, conn.send.send_request(req)).await {
        Err(_) => return Err(Failure::Timeout(timeout)),
        Ok(r) => r.map_err(Failure::upstream)?,
    };
    let switched =
        resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    if switched {
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) else {
                return;
            };
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
        });
    }
    Ok(resp)
}

/// A response the router makes itself: status and a one-line reason.
fn error_response(status: StatusCode, reason: &str) -> Response<RouterBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!("{reason}\n")))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
