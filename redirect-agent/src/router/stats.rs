//! Router outcome counters: every connection and every request ends in exactly one.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a connection the router accepted ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// HTTP connection served to its end.
    Forwarded,
    /// Non-HTTP connection copied to its original destination.
    Opaque,
    /// No kernel-recorded original destination: refused.
    NoOrigDst,
    UpstreamFailed,
    Reset,
    AcceptError,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Opaque,
        Outcome::NoOrigDst,
        Outcome::UpstreamFailed,
        Outcome::Reset,
        Outcome::AcceptError,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Opaque => "opaque",
            Outcome::NoOrigDst => "no_orig_dst",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Reset => "reset",
            Outcome::AcceptError => "accept_error",
        }
    }
}

/// How one HTTP request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    Baseline,
    Fork,
    /// An upgrade (WebSocket, CONNECT) routed and spliced.
    Upgraded,
    /// 503: the key's sandbox has no ready endpoint for the service.
    Unavailable,
    /// 502: the upstream refused, reset or failed the handshake.
    UpstreamError,
    /// 504: no response headers in time.
    UpstreamTimeout,
    /// The routing key header was malformed (the request went to baseline).
    BadKey,
}

impl RequestOutcome {
    pub const ALL: [RequestOutcome; 7] = [
        RequestOutcome::Baseline,
        RequestOutcome::Fork,
        RequestOutcome::Upgraded,
        RequestOutcome::Unavailable,
        RequestOutcome::UpstreamError,
        RequestOutcome::UpstreamTimeout,
        RequestOutcome::BadKey,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            RequestOutcome::Baseline => "baseline",
            RequestOutcome::Fork => "fork",
            RequestOutcome::Upgraded => "upgraded",
            RequestOutcome::Unavailable => "unavailable",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::UpstreamTimeout => "upstream_timeout",
            RequestOutcome::BadKey => "bad_key",
        }
    }
}

#[derive(Default, Debug)]
pub struct RouterStats {
    conns: [AtomicU64; Outcome::ALL.len()],
    requests: [AtomicU64; RequestOutcome::ALL.len()],
}

impl RouterStats {
    pub fn count(&self, o: Outcome) {
        self.conns[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.conns[o as usize].load(Ordering::Relaxed)
    }

    pub fn count_request(&self, o: RequestOutcome) {
        self.requests[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get_request(&self, o: RequestOutcome) -> u64 {
        self.requests[o as usize].load(Ordering::Relaxed)
    }
}
