//! Prometheus text exposition (format 0.0.4) of everything the node can tell: kernel decisions,
//! router outcomes, map fill, router liveness, syncs, manifests and tracing.

use std::{fmt::Write as _, path::Path, sync::Mutex};

use redirect_common::Reason;

use crate::{
    loader::{KernelMaps, inspect},
    router::{Dest, LATENCY_BUCKETS, Outcome, RequestOutcome, RouterStats},
    source::kube::health::{SourceStatus, WatchStatus},
};

/// Upper bounds (seconds) of the sync duration histogram.
pub const SYNC_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A fixed-bucket histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound of `SYNC_BUCKETS` (not cumulative).
    buckets: [u64; SYNC_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = SYNC_BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cum = 0;
        for (b, n) in SYNC_BUCKETS.iter().zip(self.buckets) {
            cum += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the sync loop reports.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    inner: Mutex<SyncCounts>,
}

#[derive(Clone, Debug, Default)]
pub struct SyncCounts {
    pub duration: Histogram,
    pub applied: u64,
    /// Failed map operations by `MapError::metric_label`.
    pub errors_full: u64,
    pub errors_other: u64,
    /// Manifest errors (each error of each rejected manifest set) and rejected sets.
    pub manifest_errors: u64,
    pub manifest_rejected: u64,
    pub stale_traces_cleared: u64,
}

impl SyncMetrics {
    /// Records one sync: its duration, operations applied, and failures (each one's text, as
    /// `SyncOutcome::failed` holds them).
    pub fn record_sync(&self, seconds: f64, applied: usize, failed: &[String]) {
        let mut c = self.lock();
        c.duration.observe(seconds);
        c.applied += applied as u64;
        for f in failed {
            // `MapError::Full` displays as "map <name> is full (<n> entries)".
            if f.contains(" is full (") {
                c.errors_full += 1;
            } else {
                c.errors_other += 1;
            }
        }
    }

    pub fn record_manifest_rejected(&self, errors: usize) {
        let mut c = self.lock();
        c.manifest_errors += errors as u64;
        c.manifest_rejected += 1;
    }

    pub fn record_stale_trace_cleared(&self) {
        self.lock().stale_traces_cleared += 1;
    }

    pub fn snapshot(&self) -> SyncCounts {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncCounts> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The source's watches: one series per watched kind.
pub fn render_source(out: &mut String, source: &SourceStatus) {
    type Field = fn(&WatchStatus) -> u64;
    let series: [(&str, &str, &str, Field); 7] = [
        (
            "redirect_source_watch_synced",
            "gauge",
            "1 once the watch's first list arrived.",
            |w| u64::from(w.synced),
        ),
        (
            "redirect_source_watch_connected",
            "gauge",
            "1 while the watch's last call succeeded; 0 while the API server fails or cannot be reached (the last good state stays in force).",
            |w| u64::from(w.connected),
        ),
        (
            "redirect_source_watch_crd_missing",
            "gauge",
            "1 while the kind is not served (its CRD is not installed).",
            |w| u64::from(w.crd_missing),
        ),
        (
            "redirect_source_watch_objects",
            "gauge",
            "Objects held by the watch's cache.",
            |w| w.objects,
        ),
        (
            "redirect_source_watch_events_total",
            "counter",
            "Add, update and delete events received.",
            |w| w.events_total,
        ),
        (
            "redirect_source_watch_lists_total",
            "counter",
            "Complete lists (the first, and relists after 410 Gone or errors).",
            |w| w.lists_total,
        ),
        (
            "redirect_source_watch_errors_total",
            "counter",
            "Failed list or watch calls (each retried with backoff).",
            |w| w.errors_total,
        ),
    ];
    for (name, kind, help, field) in series {
        header(out, name, kind, help);
        for w in &source.watches {
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", w.kind, field(w));
        }
    }
    header(
        out,
        "redirect_source_objects_skipped",
        "gauge",
        "Objects left out of routing because they cannot be read (named in /status and the log).",
    );
    for w in &source.watches {
        let _ = writeln!(
            out,
            "redirect_source_objects_skipped{{kind=\"{}\"}} {}",
            w.kind,
            w.skipped.len()
        );
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric. Kernel values are read from the pins at each scrape; a map that cannot
/// be read leaves its metrics out and counts in `redirect_scrape_errors`.
pub fn render(
    pin_dir: &Path,
    router: Option<&RouterStats>,
    sync: &SyncCounts,
    ready: bool,
    generation: u64,
    last_sync_unix: Option<f64>,
) -> String {
    let mut out = String::new();
    let mut scrape_errors = 0u64;

    header(
        &mut out,
        "redirect_kernel_decisions_total",
        "counter",
        "connect4/connect6/sock_ops decisions by reason (per-CPU counters summed).",
    );
    match KernelMaps::open(pin_dir).and_then(|m| m.counters()) {
        Ok(values) => {
            for r in Reason::ALL {
                let _ = writeln!(
                    out,
                    "redirect_kernel_decisions_total{{reason=\"{}\"}} {}",
                    r.label(),
                    values[r as usize]
                );
            }
        }
        Err(_) => scrape_errors += 1,
    }

    if let Some(stats) = router {
        header(
            &mut out,
            "redirect_router_connections_total",
            "counter",
            "Connections the node router accepted, by how they ended.",
        );
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "redirect_router_connections_total{{outcome=\"{}\"}} {}",
                o.label(),
                stats.get(o)
            );
        }
        header(
            &mut out,
            "redirect_router_requests_total",
            "counter",
            "HTTP requests (HTTP/2 streams) the router routed, by destination kind and outcome.",
        );
        for d in Dest::ALL {
            for o in RequestOutcome::ALL {
                let _ = writeln!(
                    out,
                    "redirect_router_requests_total{{dest=\"{}\",outcome=\"{}\"}} {}",
                    d.label(),
                    o.label(),
                    stats.get_request(d, o)
                );
            }
        }
        header(
            &mut out,
            "redirect_router_key_errors_total",
            "counter",
            "Requests whose routing key header was malformed (routed to baseline).",
        );
        let _ = writeln!(
            out,
            "redirect_router_key_errors_total {}",
            stats.key_errors()
        );
        header(
            &mut out,
            "redirect_router_pool_discards_total",
            "counter",
            "Idle upstream connections dropped instead of reused: bytes had arrived on them unasked.",
        );
        let _ = writeln!(
            out,
            "redirect_router_pool_discards_total {}",
            stats.pool_discards()
        );
        header(
            &mut out,
            "redirect_router_netns_fallbacks_total",
            "counter",
            "Upstream connections opened from the node's network namespace because the client pod's could not be found.",
        );
        let _ = writeln!(
            out,
            "redirect_router_netns_fallbacks_total {}",
            stats
                .netns_fallbacks
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let (full, full_total) = stats.full();
        header(
            &mut out,
            "redirect_router_full",
            "gauge",
            "1 while the router is full and out of the liveness map (new connections go straight to their destination).",
        );
        let _ = writeln!(out, "redirect_router_full {}", u8::from(full));
        header(
            &mut out,
            "redirect_router_full_total",
            "counter",
            "Times the router was full and left the liveness map.",
        );
        let _ = writeln!(out, "redirect_router_full_total {full_total}");
        header(
            &mut out,
            "redirect_router_request_duration_seconds",
            "histogram",
            "Time from a request's arrival at the router to its response headers, by destination kind.",
        );
        for d in Dest::ALL {
            let l = stats.latency(d);
            for (bound, n) in LATENCY_BUCKETS.iter().zip(&l.cumulative) {
                let _ = writeln!(
                    out,
                    "redirect_router_request_duration_seconds_bucket{{dest=\"{}\",le=\"{bound}\"}} {n}",
                    d.label()
                );
            }
            let _ = writeln!(
                out,
                "redirect_router_request_duration_seconds_bucket{{dest=\"{}\",le=\"+Inf\"}} {}",
                d.label(),
                l.count
            );
            let _ = writeln!(
                out,
                "redirect_router_request_duration_seconds_sum{{dest=\"{}\"}} {}",
                d.label(),
                l.sum_seconds
            );
            let _ = writeln!(
                out,
                "redirect_router_request_duration_seconds_count{{dest=\"{}\"}} {}",
                d.label(),
                l.count
            );
        }
    }

    header(
        &mut out,
        "redirect_router_listener_up",
        "gauge",
        "1 when the router's listener of the family is in router_socks_v1 (the kernel redirects to it).",
    );
    match inspect::router_alive(pin_dir) {
        Ok([v4, v6]) => {
            let _ = writeln!(
                out,
                "redirect_router_listener_up{{family=\"ipv4\"}} {}",
                u8::from(v4)
            );
            let _ = writeln!(
                out,
                "redirect_router_listener_up{{family=\"ipv6\"}} {}",
                u8::from(v6)
            );
        }
        Err(_) => scrape_errors += 1,
    }

    let fill = inspect::map_fill(pin_dir);
    header(
        &mut out,
        "redirect_map_entries",
        "gauge",
        "Entries in each pinned map (maps that cannot be listed are left out).",
    );
    for f in &fill {
        if let Some(n) = f.entries {
            let _ = writeln!(out, "redirect_map_entries{{map=\"{}\"}} {n}", f.name);
        }
        if f.error.is_some() {
            scrape_errors += 1;
        }
    }
    header(
        &mut out,
        "redirect_map_max_entries",
        "gauge",
        "Capacity of each pinned map (bytes for the trace ring buffer).",
    );
    for f in fill.iter().filter(|f| f.error.is_none()) {
        let _ = writeln!(
            out,
            "redirect_map_max_entries{{map=\"{}\"}} {}",
            f.name, f.max_entries
        );
    }

    header(
        &mut out,
        "redirect_sync_duration_seconds",
        "histogram",
        "Time of one sync (desired, diff, apply to the maps).",
    );
    sync.duration
        .render(&mut out, "redirect_sync_duration_seconds");
    header(
        &mut out,
        "redirect_sync_ops_applied_total",
        "counter",
        "Map operations applied by syncs.",
    );
    let _ = writeln!(out, "redirect_sync_ops_applied_total {}", sync.applied);
    header(
        &mut out,
        "redirect_sync_errors_total",
        "counter",
        "Map operations that failed during syncs, by kind.",
    );
    let _ = writeln!(
        out,
        "redirect_sync_errors_total{{kind=\"map_full\"}} {}",
        sync.errors_full
    );
    let _ = writeln!(
        out,
        "redirect_sync_errors_total{{kind=\"map_error\"}} {}",
        sync.errors_other
    );
    header(
        &mut out,
        "redirect_manifest_errors_total",
        "counter",
        "Errors in rejected manifest sets (each names a file, object and reason in the log).",
    );
    let _ = writeln!(
        out,
        "redirect_manifest_errors_total {}",
        sync.manifest_errors
    );
    header(
        &mut out,
        "redirect_manifest_rejected_total",
        "counter",
        "Manifest sets rejected whole (the last good state stayed in force).",
    );
    let _ = writeln!(
        out,
        "redirect_manifest_rejected_total {}",
        sync.manifest_rejected
    );
    header(
        &mut out,
        "redirect_sync_generation",
        "gauge",
        "Manifest generation of the current tables.",
    );
    let _ = writeln!(out, "redirect_sync_generation {generation}");
    if let Some(t) = last_sync_unix {
        header(
            &mut out,
            "redirect_last_sync_timestamp_seconds",
            "gauge",
            "When the last sync ran (Unix time).",
        );
        let _ = writeln!(out, "redirect_last_sync_timestamp_seconds {t:.3}");
    }
    header(
        &mut out,
        "redirect_ready",
        "gauge",
        "1 once the maps were synced at least once (/readyz).",
    );
    let _ = writeln!(out, "redirect_ready {}", u8::from(ready));

    header(
        &mut out,
        "redirect_trace_events_total",
        "counter",
        "Decision trace events written to the ring buffer, and dropped because it was full.",
    );
    match inspect::trace_stats(pin_dir) {
        Ok((emitted, dropped)) => {
            let _ = writeln!(
                out,
                "redirect_trace_events_total{{result=\"emitted\"}} {emitted}"
            );
            let _ = writeln!(
                out,
                "redirect_trace_events_total{{result=\"dropped\"}} {dropped}"
            );
        }
        Err(_) => scrape_errors += 1,
    }
    header(
        &mut out,
        "redirect_trace_active",
        "gauge",
        "1 while someone traces decisions (trace_ctl_v1 on).",
    );
    let active = inspect::trace_control(pin_dir).map(|c| c.mode != 0);
    match active {
        Ok(a) => {
            let _ = writeln!(out, "redirect_trace_active {}", u8::from(a));
        }
        Err(_) => scrape_errors += 1,
    }
    header(
        &mut out,
        "redirect_trace_stale_cleared_total",
        "counter",
        "Trace switches left on by a killed tracer that the agent turned off.",
    );
    let _ = writeln!(
        out,
        "redirect_trace_stale_cleared_total {}",
        sync.stale_traces_cleared
    );

    header(
        &mut out,
        "redirect_scrape_errors",
        "gauge",
        "Pinned maps this scrape could not read.",
    );
    let _ = writeln!(out, "redirect_scrape_errors {scrape_errors}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut h = Histogram::default();
        for v in [0.0001, 0.003, 0.003, 10.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.5\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn failed_map_operations_are_classified() {
        let m = SyncMetrics::default();
        m.record_sync(
            0.001,
            3,
            &[
                "PutWorkload: map workloads_v1 is full (16384 entries)".into(),
                "PutFork: map forks_v1: boom".into(),
            ],
        );
        let c = m.snapshot();
        assert_eq!((c.applied, c.errors_full, c.errors_other), (3, 1, 1));
    }
}
