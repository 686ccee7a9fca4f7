//! Router outcome counters: every connection and every request ends in exactly one.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

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
    /// The client pod already held `--max-connections-per-pod`: reset.
    PodLimit,
    /// Opaque connection closed after `--opaque-idle-timeout-ms` without a byte either way.
    IdleTimeout,
    /// A port declared HTTP got bytes that cannot start an HTTP request: answered 400.
    NotHttp,
    /// The original destination could not be read from the kernel (logged): closed.
    OrigDstError,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Forwarded,
        Outcome::Opaque,
        Outcome::NoOrigDst,
        Outcome::UpstreamFailed,
        Outcome::Reset,
        Outcome::AcceptError,
        Outcome::PodLimit,
        Outcome::IdleTimeout,
        Outcome::NotHttp,
        Outcome::OrigDstError,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Opaque => "opaque",
            Outcome::NoOrigDst => "no_orig_dst",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Reset => "reset",
            Outcome::AcceptError => "accept_error",
            Outcome::PodLimit => "pod_limit",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::NotHttp => "not_http",
            Outcome::OrigDstError => "orig_dst_error",
        }
    }
}

/// Where a request was routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    Baseline,
    Fork,
}

impl Dest {
    pub const ALL: [Dest; 2] = [Dest::Baseline, Dest::Fork];

    pub const fn label(self) -> &'static str {
        match self {
            Dest::Baseline => "baseline",
            Dest::Fork => "fork",
        }
    }
}

/// How one HTTP request (HTTP/2 stream) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The upstream's response was relayed.
    Ok,
    /// An upgrade (WebSocket, CONNECT) routed and spliced.
    Upgraded,
    /// 503: the key's sandbox has no ready endpoint for the service.
    Unavailable,
    /// 502: the upstream refused, reset or failed the handshake.
    UpstreamError,
    /// 504: no response headers in time.
    UpstreamTimeout,
    /// 400: the client's request body was malformed (an invalid chunk, cut short), so it could
    /// not be forwarded whole; the upstream is not at fault.
    BadRequest,
}

impl RequestOutcome {
    pub const ALL: [RequestOutcome; 6] = [
        RequestOutcome::Ok,
        RequestOutcome::Upgraded,
        RequestOutcome::Unavailable,
        RequestOutcome::UpstreamError,
        RequestOutcome::UpstreamTimeout,
        RequestOutcome::BadRequest,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::Upgraded => "upgraded",
            RequestOutcome::Unavailable => "unavailable",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::UpstreamTimeout => "upstream_timeout",
            RequestOutcome::BadRequest => "bad_request",
        }
    }
}

/// Upper bounds (seconds) of the request latency buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A lock-free latency histogram: counts per bucket (not cumulative), sum and count.
#[derive(Default, Debug)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a `Latency` for rendering.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Cumulative counts per bucket of `LATENCY_BUCKETS`.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Latency {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LatencySnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        LatencySnapshot {
            cumulative,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[derive(Default, Debug)]
pub struct RouterStats {
    conns: [AtomicU64; Outcome::ALL.len()],
    requests: [[AtomicU64; RequestOutcome::ALL.len()]; Dest::ALL.len()],
    /// Requests whose routing key header was malformed (they went to baseline).
    key_errors: AtomicU64,
    /// Idle upstream connections dropped instead of reused: bytes had arrived on them unasked.
    pool_discards: AtomicU64,
    /// Upstream connections opened from the node's network namespace because the client pod's
    /// could not be found (shared with the connector).
    pub netns_fallbacks: std::sync::Arc<AtomicU64>,
    /// Whether the router is out of the liveness map because it is full, and how often it was.
    full: AtomicBool,
    full_total: AtomicU64,
    /// Time from a request's arrival to its response headers, per destination.
    latency: [Latency; Dest::ALL.len()],
}

impl RouterStats {
    pub fn count(&self, o: Outcome) {
        self.conns[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.conns[o as usize].load(Ordering::Relaxed)
    }

    pub fn count_request(&self, dest: Dest, o: RequestOutcome) {
        self.requests[dest as usize][o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get_request(&self, dest: Dest, o: RequestOutcome) -> u64 {
        self.requests[dest as usize][o as usize].load(Ordering::Relaxed)
    }

    /// All requests routed to `dest`, whatever their outcome.
    pub fn requests_to(&self, dest: Dest) -> u64 {
        RequestOutcome::ALL
            .iter()
            .map(|o| self.get_request(dest, *o))
            .sum()
    }

    pub fn count_key_error(&self) {
        self.key_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn key_errors(&self) -> u64 {
        self.key_errors.load(Ordering::Relaxed)
    }

    pub fn count_pool_discards(&self, n: u64) {
        if n > 0 {
            self.pool_discards.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
        if full {
            self.full_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the router is full now (out of the liveness map), and how often it was.
    pub fn full(&self) -> (bool, u64) {
        (
            self.full.load(Ordering::Relaxed),
            self.full_total.load(Ordering::Relaxed),
        )
    }

    pub fn pool_discards(&self) -> u64 {
        self.pool_discards.load(Ordering::Relaxed)
    }

    pub fn observe(&self, dest: Dest, d: Duration) {
        self.latency[dest as usize].observe(d);
    }

    pub fn latency(&self, dest: Dest) -> LatencySnapshot {
        self.latency[dest as usize].snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_sum_is_kept() {
        let s = RouterStats::default();
        s.observe(Dest::Fork, Duration::from_micros(300));
        s.observe(Dest::Fork, Duration::from_millis(20));
        s.observe(Dest::Fork, Duration::from_secs(9));
        let l = s.latency(Dest::Fork);
        assert_eq!(l.count, 3);
        assert_eq!(l.cumulative[0], 1);
        assert_eq!(l.cumulative[5], 2);
        assert_eq!(*l.cumulative.last().unwrap(), 2, "9 s is above every bound");
        assert!((l.sum_seconds - 9.0203).abs() < 1e-6);
        assert_eq!(s.latency(Dest::Baseline).count, 0);
    }

    #[test]
    fn requests_are_counted_per_destination_and_outcome() {
        let s = RouterStats::default();
        s.count_request(Dest::Fork, RequestOutcome::Ok);
        s.count_request(Dest::Fork, RequestOutcome::UpstreamError);
        s.count_request(Dest::Baseline, RequestOutcome::Ok);
        assert_eq!(s.requests_to(Dest::Fork), 2);
        assert_eq!(s.get_request(Dest::Baseline, RequestOutcome::Ok), 1);
    }
}
