//! `redirect-agent controller`: the cluster-wide controller (one Deployment, two replicas, one
//! leader). Node agents only read the API; the controller is the only writer. It
//!
//! - validates Sandboxes and RouteGroups and writes their `status` (conditions `Valid` and
//!   `Ready`, observed generation, per fork the ready endpoints) through the status
//!   subresource, only when it changed, with Kubernetes Events on transitions;
//! - deletes Sandboxes whose `spec.ttl` has passed, waking up for exactly the next expiry;
//! - publishes the fork pods of every sandbox as EndpointSlices of its own
//!   ([`crate::forkslice`]), so that node agents learn fork pods on other nodes;
//! - leads through a `coordination.k8s.io/v1` Lease ([`lease`]): only the leader writes, and
//!   it stops at once when it loses the Lease.
//!
//! ```text
//! reflectors (Sandboxes, RouteGroups, Services, Pods, fork EndpointSlices; all replicas)
//!   → Snapshot → validate::plan(&Snapshot, now) -> Plan        pure, unit-tested
//!   → reconcile: delete expired, write slices, write statuses + events   (leader only)
//! ```
//!
//! The decisions are cross-object (a routing key belongs to the first of its claimants, a
//! route group's readiness depends on sandboxes, a fork's on Pods and Services), so a pass
//! looks at everything at once instead of one object at a time: any change (debounced), the
//! next TTL expiry, a retry after a failed write (backoff from `--requeue`, doubling, at most
//! `--resync-interval`) or the periodic resync runs one pass. A pass writes only what differs,
//! so passes are cheap when nothing changed.

pub mod admin;
pub mod events;
pub mod lease;
#[cfg(test)]
mod mock;
pub mod reconcile;
pub mod slices;
pub mod status;
pub mod ttl;
pub mod validate;
pub mod watch;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::{Notify, watch as signal};
use tokio::time::Instant;

pub use self::admin::Metrics;
use self::lease::{Elector, LEASE_NAME, Leadership, LeaseConfig, LeaseError};
use self::reconcile::{Memory, Writer, reconcile};
use self::watch::Caches;

/// Changes within this window after the first are handled by one pass.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// `redirect-agent controller` flags.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct ControllerArgs {
    /// Namespace of the leader-election Lease (`redirect-controller`): the controller's own,
    /// from the downward API.
    #[arg(long, env = "POD_NAMESPACE", default_value = "redirect-system")]
    pub namespace: String,
    /// This replica's name in the Lease, unique among the replicas [default: the hostname].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease lasts without renewal (Go duration, at least 3s). The leader renews
    /// every third of it and stops writing when it could not renew for two thirds of it; a
    /// standby takes over at most this long after the leader died (at once after a clean
    /// shutdown, which releases the Lease).
    #[arg(long, env = "REDIRECT_LEASE_DURATION", default_value = "15s", value_parser = parse_lease_duration)]
    pub lease_duration: Duration,
    /// A full reconcile pass runs at least this often, even without changes (Go duration).
    #[arg(long, env = "REDIRECT_CONTROLLER_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// After a pass with failed writes, the next one runs this much later, doubling with
    /// each failed pass up to `--resync-interval` (Go duration).
    #[arg(long, env = "REDIRECT_CONTROLLER_REQUEUE", default_value = "1s", value_parser = parse_duration)]
    pub requeue: Duration,
    /// Address of the admin endpoint: `/healthz`, `/readyz` (every watch listed once; leader
    /// and standby alike) and `/metrics`.
    #[arg(long, env = "REDIRECT_CONTROLLER_ADMIN_ADDR", default_value = admin::DEFAULT_ADDR)]
    pub admin_addr: SocketAddr,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        ControllerArgs {
            namespace: "redirect-system".into(),
            identity: None,
            lease_duration: Duration::from_secs(15),
            resync_interval: Duration::from_secs(300),
            requeue: Duration::from_secs(1),
            admin_addr: admin::DEFAULT_ADDR.parse().expect("a valid address"),
        }
    }
}

impl ControllerArgs {
    /// `--identity`, else the hostname, else a name made of the process id.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.trim().is_empty())
            .or_else(hostname)
            .unwrap_or_else(|| format!("redirect-controller-{}", std::process::id()))
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// A Go duration (`15s`, `1m30s`), positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if s.starts_with('-') {
        return Err("must be positive".into());
    }
    let d = Duration::from(d);
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

fn parse_lease_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(3) {
        return Err("must be at least 3s".into());
    }
    Ok(d)
}

/// A write the controller makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAction {
    PatchStatus,
    DeleteExpired,
    CreateSlice,
    ReplaceSlice,
    DeleteSlice,
    PublishEvent,
}

impl WriteAction {
    /// Bounded label for metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            WriteAction::PatchStatus => "status_patch",
            WriteAction::DeleteExpired => "sandbox_delete",
            WriteAction::CreateSlice => "slice_create",
            WriteAction::ReplaceSlice => "slice_replace",
            WriteAction::DeleteSlice => "slice_delete",
            WriteAction::PublishEvent => "event_publish",
        }
    }
}

impl fmt::Display for WriteAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteAction::PatchStatus => "writing the status of",
            WriteAction::DeleteExpired => "deleting expired",
            WriteAction::CreateSlice => "creating",
            WriteAction::ReplaceSlice => "replacing",
            WriteAction::DeleteSlice => "deleting",
            WriteAction::PublishEvent => "publishing an event about",
        })
    }
}

/// Why the controller could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {object}: {source}")]
    Write {
        action: WriteAction,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("not the leader (any more): writes stopped")]
    NotLeader,
}

impl ControllerError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::AdminBind { .. } => "admin_bind",
            ControllerError::Write { action, .. } => action.metric_label(),
            ControllerError::Lease(e) => e.metric_label(),
            ControllerError::NotLeader => "not_leader",
        }
    }
}

/// Runs the controller until `shutdown` completes: watches, leader election, the admin
/// endpoint and, while leading, the reconcile loop. On shutdown the loop stops first (no write
/// after it), then the Lease is released so the other replica takes over at once. Fails only
/// when the admin endpoint cannot be bound; everything else is retried.
pub async fn run(
    args: ControllerArgs,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let identity = args.identity();
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| ControllerError::AdminBind {
            addr: args.admin_addr,
            source,
        })?;
    let admin_addr = listener.local_addr().unwrap_or(args.admin_addr);
    let admin = tokio::spawn(admin::serve(listener, metrics.clone()));
    tracing::info!(
        identity,
        namespace = args.namespace,
        lease = LEASE_NAME,
        admin = %admin_addr,
        "controller starting"
    );

    let changed = Arc::new(Notify::new());
    let caches = Caches::start(&client, &changed, &metrics);
    let (lead_tx, leadership) = Leadership::channel();
    let (stop_tx, stop_rx) = signal::channel(false);
    let elector = Elector::new(
        client.clone(),
        LeaseConfig {
            name: LEASE_NAME.into(),
            namespace: args.namespace.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
        },
    );
    let election = {
        let metrics = metrics.clone();
        tokio::spawn(lease::run(elector, lead_tx, stop_rx, move |leading| {
            metrics.set_leader(leading)
        }))
    };
    let writer = Writer::new(client, &identity, leadership.clone(), metrics.clone());
    let settings = LoopSettings {
        resync: args.resync_interval,
        requeue: args.requeue,
    };
    tokio::select! {
        _ = reconcile_loop(&caches, &writer, &changed, leadership, &settings, &metrics) => {}
        _ = shutdown => tracing::info!("shutting down: writes stopped"),
    }
    // The loop is gone: no write after this point. Now give the Lease up.
    stop_tx.send_replace(true);
    if let Err(error) = election.await {
        tracing::warn!(%error, "leader election task failed");
    }
    drop(caches);
    admin.abort();
    tracing::info!("controller stopped");
    Ok(())
}

/// When passes run.
#[derive(Clone, Debug)]
struct LoopSettings {
    resync: Duration,
    requeue: Duration,
}

/// The delay before retrying after `failures` failed passes in a row.
fn backoff(requeue: Duration, failures: u32, cap: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    requeue.saturating_mul(factor).min(cap.max(requeue))
}

async fn reconcile_loop(
    caches: &Caches,
    writer: &Writer,
    changed: &Notify,
    mut leadership: Leadership,
    settings: &LoopSettings,
    metrics: &Metrics,
) {
    let mut memory = Memory::default();
    let mut was_leader = false;
    let mut due = false;
    let mut failures: u32 = 0;
    let mut last_pass = Instant::now();
    let mut next_expiry: Option<Timestamp> = None;
    loop {
        let leader = leadership.is_leader();
        if leader != was_leader {
            was_leader = leader;
            // What we remember of earlier writes may be stale after a gap.
            memory = Memory::default();
            failures = 0;
            due = leader;
            if leader {
                tracing::info!("leading: reconciling");
            }
        }
        if !leader {
            leadership.changed().await;
            continue;
        }
        if !caches.synced() {
            tokio::select! {
                _ = changed.notified() => {}
                _ = leadership.changed() => {}
            }
            continue;
        }
        if !due {
            let mut wake = last_pass + settings.resync;
            if failures > 0 {
                wake = wake.min(last_pass + backoff(settings.requeue, failures, settings.resync));
            }
            if let Some(at) = next_expiry {
                wake = wake.min(Instant::now() + ttl::until(at, Timestamp::now()));
            }
            tokio::select! {
                _ = changed.notified() => tokio::time::sleep(DEBOUNCE).await,
                _ = tokio::time::sleep_until(wake) => {}
                _ = leadership.changed() => continue,
            }
        }
        due = false;
        let started = Instant::now();
        let result = reconcile(writer, caches.snapshot(), &mut memory, Timestamp::now()).await;
        last_pass = Instant::now();
        metrics.reconciled();
        match result {
            Ok(report) => {
                next_expiry = report.next_expiry;
                if report.errors.is_empty() {
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        failed = report.errors.len(),
                        retry_in = ?backoff(settings.requeue, failures, settings.resync),
                        "reconcile pass had failed writes"
                    );
                }
                tracing::debug!(
                    writes = report.writes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "reconciled"
                );
            }
            Err(error) => {
                metrics.error(error.metric_label());
                tracing::warn!(%error, "reconcile pass stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests;
