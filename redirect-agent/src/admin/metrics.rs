//! Prometheus text exposition (format 0.0.4) of everything the node can tell, through
//! `prometheus_client`: the sync's own metrics are live metrics; what the kernel, the router and
//! the source hold is read at each scrape by collectors (kernel values from the pins).
//!
//! The router's latency histograms stay lock-free atomics in `router::stats` (updated on every
//! request by every router thread); their collector only encodes them.

use std::{fmt, path::PathBuf, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet, prometheus_text},
    metrics::{MetricType, counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use redirect_common::Reason;

use crate::{
    loader::{KernelMaps, inspect},
    router::{Dest, LATENCY_BUCKETS, Outcome, RequestOutcome, Shared},
    source::kube::health::{SourceStatus, WatchStatus},
    sync::{MapError, Op},
};

/// Upper bounds (seconds) of the sync duration histogram.
pub const SYNC_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// `redirect_sync_errors_total{kind}`: `MapError::metric_label`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKind {
    kind: &'static str,
}

/// What the sync loop reports.
#[derive(Debug)]
pub struct SyncMetrics {
    duration: Histogram,
    /// Syncs recorded (the histogram's count, which it does not expose), for `/status`.
    syncs: Counter,
    applied: Counter,
    errors: Family<ErrorKind, Counter>,
    manifest_errors: Counter,
    manifest_rejected: Counter,
    stale_traces_cleared: Counter,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        let errors = Family::<ErrorKind, Counter>::default();
        // Both kinds from the start, at 0: an alert on them needs the series to exist.
        for kind in MapError::METRIC_LABELS {
            let _ = errors.get_or_create(&ErrorKind { kind });
        }
        SyncMetrics {
            duration: Histogram::new(SYNC_BUCKETS),
            syncs: Counter::default(),
            applied: Counter::default(),
            errors,
            manifest_errors: Counter::default(),
            manifest_rejected: Counter::default(),
            stale_traces_cleared: Counter::default(),
        }
    }
}

impl SyncMetrics {
    /// Records one sync: its duration, operations applied, and the operations that failed.
    pub fn record_sync(&self, seconds: f64, applied: usize, failed: &[(Op, MapError)]) {
        self.duration.observe(seconds);
        self.syncs.inc();
        self.applied.inc_by(applied as u64);
        for (_, e) in failed {
            self.errors
                .get_or_create(&ErrorKind {
                    kind: e.metric_label(),
                })
                .inc();
        }
    }

    pub fn record_manifest_rejected(&self, errors: usize) {
        self.manifest_errors.inc_by(errors as u64);
        self.manifest_rejected.inc();
    }

    pub fn record_stale_trace_cleared(&self) {
        self.stale_traces_cleared.inc();
    }

    pub fn syncs(&self) -> u64 {
        self.syncs.get()
    }

    /// Failed map operations over all syncs.
    pub fn errors(&self) -> u64 {
        MapError::METRIC_LABELS
            .iter()
            .map(|kind| self.errors.get_or_create(&ErrorKind { kind }).get())
            .sum()
    }

    pub fn manifest_errors(&self) -> u64 {
        self.manifest_errors.get()
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "redirect_sync_duration_seconds",
            "Time of one sync (desired, diff, apply to the maps)",
            self.duration.clone(),
        );
        r.register(
            "redirect_sync_ops_applied",
            "Map operations applied by syncs",
            self.applied.clone(),
        );
        r.register(
            "redirect_sync_errors",
            "Map operations that failed during syncs, by kind",
            self.errors.clone(),
        );
        r.register(
            "redirect_manifest_errors",
            "Errors in rejected manifest sets (each names a file, object and reason in the log)",
            self.manifest_errors.clone(),
        );
        r.register(
            "redirect_manifest_rejected",
            "Manifest sets rejected whole (the last good state stayed in force)",
            self.manifest_rejected.clone(),
        );
        r.register(
            "redirect_trace_stale_cleared",
            "Trace switches left on by a killed tracer that the agent turned off",
            self.stale_traces_cleared.clone(),
        );
    }
}

/// What one scrape shows besides the sync metrics.
pub struct Scrape {
    pub pin_dir: PathBuf,
    pub router: Option<Arc<Shared>>,
    pub ready: bool,
    pub generation: u64,
    pub last_sync_unix: Option<f64>,
    pub source: Option<SourceStatus>,
}

/// Renders every metric.
pub fn render(sync: &SyncMetrics, scrape: Scrape) -> String {
    let mut r = Registry::default();
    r.register_collector(Box::new(KernelCollector {
        pin_dir: scrape.pin_dir,
    }));
    if let Some(router) = scrape.router {
        r.register_collector(Box::new(RouterCollector(router)));
    }
    sync.register(&mut r);
    r.register_collector(Box::new(AgentCollector {
        ready: scrape.ready,
        generation: scrape.generation,
        last_sync_unix: scrape.last_sync_unix,
    }));
    if let Some(source) = scrape.source {
        r.register_collector(Box::new(SourceCollector(source)));
    }
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug in a collector.
    if let Err(e) = prometheus_text::encode(&mut out, &r) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// The exposition's content type.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

fn describe<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'a>, fmt::Error> {
    enc.encode_descriptor(name, help, None, kind)
}

fn counter(m: &mut MetricEncoder, v: u64) -> fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(
    m: &mut MetricEncoder,
    v: impl prometheus_client::encoding::EncodeGaugeValue,
) -> fmt::Result {
    m.encode_gauge(&v)
}

/// Kernel decisions, router liveness, map fill and tracing, read from the pins; last, how many
/// of those reads failed (their metrics are left out).
#[derive(Debug)]
struct KernelCollector {
    pin_dir: PathBuf,
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let pin_dir = &self.pin_dir;
        let mut scrape_errors = 0u64;
        match KernelMaps::open(pin_dir).and_then(|m| m.counters()) {
            Ok(values) => {
                let mut m = describe(
                    &mut enc,
                    "redirect_kernel_decisions",
                    "connect4/connect6/sock_ops decisions by reason (per-CPU counters summed).",
                    MetricType::Counter,
                )?;
                for r in Reason::ALL {
                    counter(
                        &mut m.encode_family(&[("reason", r.label())])?,
                        values[r as usize],
                    )?;
                }
            }
            Err(_) => scrape_errors += 1,
        }
        match inspect::router_alive(pin_dir) {
            Ok(alive) => {
                let mut m = describe(
                    &mut enc,
                    "redirect_router_listener_up",
                    "1 when the router's listener of the family is in router_socks_v1 (the kernel redirects to it).",
                    MetricType::Gauge,
                )?;
                for (family, up) in ["ipv4", "ipv6"].into_iter().zip(alive) {
                    gauge(&mut m.encode_family(&[("family", family)])?, u64::from(up))?;
                }
            }
            Err(_) => scrape_errors += 1,
        }
        let fill = inspect::map_fill(pin_dir);
        scrape_errors += fill.iter().filter(|f| f.error.is_some()).count() as u64;
        let mut m = describe(
            &mut enc,
            "redirect_map_entries",
            "Entries in each pinned map (maps that cannot be listed are left out).",
            MetricType::Gauge,
        )?;
        for f in &fill {
            if let Some(n) = f.entries {
                gauge(&mut m.encode_family(&[("map", f.name)])?, n)?;
            }
        }
        let mut m = describe(
            &mut enc,
            "redirect_map_max_entries",
            "Capacity of each pinned map (bytes for the trace ring buffer).",
            MetricType::Gauge,
        )?;
        for f in fill.iter().filter(|f| f.error.is_none()) {
            gauge(&mut m.encode_family(&[("map", f.name)])?, f.max_entries)?;
        }
        match inspect::trace_stats(pin_dir) {
            Ok((emitted, dropped)) => {
                let mut m = describe(
                    &mut enc,
                    "redirect_trace_events",
                    "Decision trace events written to the ring buffer, and dropped because it was full.",
                    MetricType::Counter,
                )?;
                counter(&mut m.encode_family(&[("result", "emitted")])?, emitted)?;
                counter(&mut m.encode_family(&[("result", "dropped")])?, dropped)?;
            }
            Err(_) => scrape_errors += 1,
        }
        match inspect::trace_control(pin_dir) {
            Ok(c) => gauge(
                &mut describe(
                    &mut enc,
                    "redirect_trace_active",
                    "1 while someone traces decisions (trace_ctl_v1 on).",
                    MetricType::Gauge,
                )?,
                u64::from(c.mode != 0),
            )?,
            Err(_) => scrape_errors += 1,
        }
        gauge(
            &mut describe(
                &mut enc,
                "redirect_scrape_errors",
                "Pinned maps this scrape could not read.",
                MetricType::Gauge,
            )?,
            scrape_errors,
        )
    }
}

/// The node router's counters and latency histograms.
struct RouterCollector(Arc<Shared>);

impl fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RouterCollector")
    }
}

impl Collector for RouterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0.stats;
        let mut m = describe(
            &mut enc,
            "redirect_router_connections",
            "Connections the node router accepted, by how they ended.",
            MetricType::Counter,
        )?;
        for o in Outcome::ALL {
            counter(
                &mut m.encode_family(&[("outcome", o.label())])?,
                stats.get(o),
            )?;
        }
        let mut m = describe(
            &mut enc,
            "redirect_router_requests",
            "HTTP requests (HTTP/2 streams) the router routed, by destination kind and outcome.",
            MetricType::Counter,
        )?;
        for d in Dest::ALL {
            for o in RequestOutcome::ALL {
                let labels = [("dest", d.label()), ("outcome", o.label())];
                counter(&mut m.encode_family(&labels)?, stats.get_request(d, o))?;
            }
        }
        let singles: [(&str, &str, u64); 3] = [
            (
                "redirect_router_key_errors",
                "Requests whose routing key header was malformed (routed to baseline).",
                stats.key_errors(),
            ),
            (
                "redirect_router_pool_discards",
                "Idle upstream connections dropped instead of reused: bytes had arrived on them unasked.",
                stats.pool_discards(),
            ),
            (
                "redirect_router_netns_fallbacks",
                "Upstream connections opened from the node's network namespace because the client pod's could not be found.",
                stats
                    .netns_fallbacks
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in singles {
            counter(&mut describe(&mut enc, name, help, MetricType::Counter)?, v)?;
        }
        let (full, full_total) = stats.full();
        gauge(
            &mut describe(
                &mut enc,
                "redirect_router_full",
                "1 while the router is full and out of the liveness map (new connections go straight to their destination).",
                MetricType::Gauge,
            )?,
            u64::from(full),
        )?;
        counter(
            &mut describe(
                &mut enc,
                "redirect_router_full",
                "Times the router was full and left the liveness map.",
                MetricType::Counter,
            )?,
            full_total,
        )?;
        let mut m = describe(
            &mut enc,
            "redirect_router_request_duration_seconds",
            "Time from a request's arrival at the router to its response headers, by destination kind.",
            MetricType::Histogram,
        )?;
        for d in Dest::ALL {
            let l = stats.latency(d);
            // The encoder wants each bucket's own count; the snapshot is cumulative.
            let mut below = 0;
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                .iter()
                .zip(&l.cumulative)
                .map(|(bound, cum)| {
                    let own = cum - below;
                    below = *cum;
                    (*bound, own)
                })
                .collect();
            m.encode_family(&[("dest", d.label())])?
                .encode_histogram::<NoLabelSet>(l.sum_seconds, l.count, &buckets, None)?;
        }
        Ok(())
    }
}

/// Readiness and where the routing state stands.
#[derive(Debug)]
struct AgentCollector {
    ready: bool,
    generation: u64,
    last_sync_unix: Option<f64>,
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        gauge(
            &mut describe(
                &mut enc,
                "redirect_sync_generation",
                "Manifest generation of the current tables.",
                MetricType::Gauge,
            )?,
            self.generation,
        )?;
        if let Some(t) = self.last_sync_unix {
            gauge(
                &mut describe(
                    &mut enc,
                    "redirect_last_sync_timestamp_seconds",
                    "When the last sync ran (Unix time).",
                    MetricType::Gauge,
                )?,
                t,
            )?;
        }
        gauge(
            &mut describe(
                &mut enc,
                "redirect_ready",
                "1 once the maps were synced at least once (/readyz).",
                MetricType::Gauge,
            )?,
            u64::from(self.ready),
        )
    }
}

/// The source's watches: one series per watched kind.
#[derive(Debug)]
struct SourceCollector(SourceStatus);

impl Collector for SourceCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        type Field = fn(&WatchStatus) -> u64;
        let series: [(&str, MetricType, &str, Field); 8] = [
            (
                "redirect_source_watch_synced",
                MetricType::Gauge,
                "1 once the watch's first list arrived.",
                |w| u64::from(w.synced),
            ),
            (
                "redirect_source_watch_connected",
                MetricType::Gauge,
                "1 while the watch's last call succeeded; 0 while the API server fails or cannot be reached (the last good state stays in force).",
                |w| u64::from(w.connected),
            ),
            (
                "redirect_source_watch_crd_missing",
                MetricType::Gauge,
                "1 while the kind is not served (its CRD is not installed).",
                |w| u64::from(w.crd_missing),
            ),
            (
                "redirect_source_watch_objects",
                MetricType::Gauge,
                "Objects held by the watch's cache.",
                |w| w.objects,
            ),
            (
                "redirect_source_watch_events",
                MetricType::Counter,
                "Add, update and delete events received.",
                |w| w.events_total,
            ),
            (
                "redirect_source_watch_lists",
                MetricType::Counter,
                "Complete lists (the first, and relists after 410 Gone or errors).",
                |w| w.lists_total,
            ),
            (
                "redirect_source_watch_errors",
                MetricType::Counter,
                "Failed list or watch calls (each retried with backoff).",
                |w| w.errors_total,
            ),
            (
                "redirect_source_objects_skipped",
                MetricType::Gauge,
                "Objects left out of routing because they cannot be read (named in /status and the log).",
                |w| w.skipped.len() as u64,
            ),
        ];
        for (name, kind, help, field) in series {
            let mut m = describe(&mut enc, name, help, kind)?;
            for w in &self.0.watches {
                let labels = [("kind", w.kind.as_str())];
                let mut f = m.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => counter(&mut f, field(w))?,
                    _ => gauge(&mut f, field(w))?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Op;

    fn scrape_of(sync: &SyncMetrics) -> String {
        render(
            sync,
            Scrape {
                pin_dir: "/nonexistent/redirect-pins".into(),
                router: None,
                ready: true,
                generation: 4,
                last_sync_unix: None,
                source: None,
            },
        )
    }

    #[test]
    fn sync_histogram_buckets_are_cumulative_and_end_in_inf() {
        let m = SyncMetrics::default();
        for v in [0.0001, 0.003, 0.003, 10.0] {
            m.record_sync(v, 0, &[]);
        }
        let out = scrape_of(&m);
        let name = "redirect_sync_duration_seconds";
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.0005\"}} 1\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.005\"}} 3\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"2.5\"}} 3\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 4\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_count 4\n")), "{out}");
        assert_eq!(m.syncs(), 4);
    }

    #[test]
    fn failed_map_operations_are_counted_by_their_typed_kind() {
        let m = SyncMetrics::default();
        let full = MapError::Full {
            map: "workloads_v1",
            max: 16_384,
        };
        let other = MapError::Other {
            map: "forks_v1",
            reason: "boom".into(),
        };
        m.record_sync(
            0.001,
            3,
            &[(Op::DelWorkload(1), full), (Op::DelWorkload(2), other)],
        );
        let out = scrape_of(&m);
        assert!(
            out.contains("redirect_sync_errors_total{kind=\"map_full\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("redirect_sync_errors_total{kind=\"map_error\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("redirect_sync_ops_applied_total 3\n"), "{out}");
        assert_eq!(m.errors(), 2);
    }

    #[test]
    fn unreadable_pins_leave_their_metrics_out_and_are_counted() {
        let out = scrape_of(&SyncMetrics::default());
        assert!(!out.contains("redirect_kernel_decisions_total{"), "{out}");
        assert!(
            out.contains("# TYPE redirect_scrape_errors gauge\n"),
            "{out}"
        );
        let errors: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("redirect_scrape_errors "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(errors >= 4, "{out}");
        assert!(out.contains("redirect_ready 1\n"), "{out}");
        assert!(out.contains("redirect_sync_generation 4\n"), "{out}");
        // Both error kinds exist from the start.
        assert!(
            out.contains("redirect_sync_errors_total{kind=\"map_full\"} 0\n"),
            "{out}"
        );
    }
}
