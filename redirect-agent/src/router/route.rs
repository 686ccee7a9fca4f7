//! Where one request goes, for both HTTP paths: the routing key read, the decision over the
//! current view, and what the debug header and a 503 say about it.

use std::{net::SocketAddr, time::Duration};

use http::StatusCode;

use redirect_common::OrigDst;

use super::{
    Shared,
    key::KeyError,
    pool::UpstreamError,
    stats::{Dest, RequestOutcome},
};
use crate::routing::{RequestRoute, for_request};

/// The decision for one request.
pub enum Decided {
    /// Forward to `upstream`.
    Go {
        upstream: SocketAddr,
        dest: Dest,
        /// The debug header's value, when enabled.
        label: Option<String>,
    },
    /// Answer 503 with `message` (already counted).
    Unavailable {
        message: String,
        label: Option<String>,
    },
}

/// Why a request got the router's own answer instead of its upstream's, on the paths that
/// answer before any byte of a response went out.
pub enum Failure {
    /// No response head within the response timeout.
    Timeout(Duration),
    /// The upstream refused, reset or failed before its response head.
    Upstream(String),
    /// The client's own request body failed while it was being sent upstream.
    BadBody(String),
}

impl Failure {
    /// The upstream failed with `e`.
    pub fn upstream(e: impl std::fmt::Display) -> Self {
        Failure::Upstream(e.to_string())
    }

    /// No upstream connection could be had; out of descriptors, the router is full.
    pub fn unreachable(shared: &Shared, e: UpstreamError) -> Self {
        if let UpstreamError::Connect(c) = &e {
            shared.connect_failed(c);
        }
        Failure::upstream(e)
    }

    /// The answer for a request to `upstream`: status, reason and how the request is counted.
    pub fn answer(self, upstream: SocketAddr) -> (StatusCode, String, RequestOutcome) {
        match self {
            Failure::Timeout(after) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream {upstream} sent no response within {after:?}"),
                RequestOutcome::UpstreamTimeout,
            ),
            Failure::Upstream(reason) => (
                StatusCode::BAD_GATEWAY,
                format!("upstream {upstream}: {reason}"),
                RequestOutcome::UpstreamError,
            ),
            Failure::BadBody(reason) => (
                StatusCode::BAD_REQUEST,
                format!("request body: {reason}"),
                RequestOutcome::BadRequest,
            ),
        }
    }
}

/// The routing key to route by: a malformed key header must not break the request, it goes
/// to baseline (counted, logged at debug level).
pub fn key_or_none(shared: &Shared, key: Result<Option<String>, KeyError>) -> Option<String> {
    match key {
        Ok(k) => k,
        Err(error) => {
            tracing::debug!(%error, "routing key ignored");
            shared.stats.count_key_error();
            None
        }
    }
}

/// Decides where a request for `orig` carrying `key` goes.
pub fn decide(shared: &Shared, orig: &OrigDst, key: Option<&str>) -> Decided {
    let view = shared.view.load();
    let debug = shared.settings.debug_header;
    let key_name = |key_id: &u32| view.tables.keys.get(key_id).map_or("", |k| k.key.as_str());
    match for_request(&view, orig, key, rand_u32()) {
        RequestRoute::Unavailable { key_id } => {
            shared
                .stats
                .count_request(Dest::Fork, RequestOutcome::Unavailable);
            let owners = view
                .tables
                .keys
                .get(&key_id)
                .map(|k| k.owners.join(", "))
                .unwrap_or_default();
            let service = view
                .tables
                .service_names
                .get(&orig.service_id)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("service {}", orig.service_id));
            Decided::Unavailable {
                message: format!("sandbox {owners} has no ready endpoint for {service}"),
                label: debug.then(|| format!("unavailable {} {service}", key_name(&key_id))),
            }
        }
        RequestRoute::Fork { endpoint, key_id } => {
            let upstream = SocketAddr::from(&endpoint);
            Decided::Go {
                upstream,
                dest: Dest::Fork,
                label: debug.then(|| format!("fork {} {upstream}", key_name(&key_id))),
            }
        }
        RequestRoute::Baseline(why) => {
            let upstream = SocketAddr::from(&orig.dst);
            Decided::Go {
                upstream,
                dest: Dest::Baseline,
                label: debug.then(|| format!("baseline {} {upstream}", why.label())),
            }
        }
    }
}

/// A cheap per-request random number to spread requests over fork endpoints.
fn rand_u32() -> u32 {
    use std::{
        cell::Cell,
        hash::{BuildHasher, RandomState},
    };
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u8) | 1);
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    })
}
