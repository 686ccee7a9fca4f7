//! Leader election over a `coordination.k8s.io/v1` Lease (kube 5 has none built in). The rules
//! are client-go's:
//!
//! - the Lease is free when it does not exist, names no holder (released), or its holder did
//!   not renew it within `leaseDurationSeconds` (`renewTime + leaseDurationSeconds` is past);
//! - a free Lease is taken by writing our identity into it; `leaseTransitions` goes up by one
//!   when the holder changes;
//! - every write carries the `resourceVersion` read, so of two replicas racing for it one gets
//!   409 Conflict: it lost, and stands by;
//! - the leader renews every `leaseDuration / 3`; when it cannot renew for `2/3` of the
//!   duration (the API server is unreachable, or a write answered 409), it stops at once, before
//!   anyone else may take over;
//! - on shutdown the leader releases the Lease (no holder, a one-second duration), so the other
//!   replica takes over at its next look instead of waiting for the Lease to expire.
//!
//! Which of these applies ([`decide`]) and what to write ([`next_lease`], [`released`]) are
//! pure functions of the Lease and the time; [`Elector`] does the API calls and [`run`] the
//! loop, publishing "leading until" through a [`Leadership`] that the writers check.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

/// Name of the controller's Lease.
pub const LEASE_NAME: &str = "redirect-controller";

/// Who competes for which Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a Lease lasts without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often the leader renews (and a standby looks): a third of the duration.
    pub fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// How long the leader keeps leading without a successful renewal: two thirds of the
    /// duration, so it stops before anyone may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// What to do with the Lease as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// It is free (released, or its holder let it expire): take it over.
    TakeOver { previous: Option<String> },
    /// Someone else holds it until `until`.
    Standby { holder: String, until: Timestamp },
}

/// When `lease` expires: its last renewal (or acquisition) plus its duration. None when it
/// has neither time or no duration (it is free).
pub fn expires_at(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let last = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds?));
    last.checked_add(duration).ok()
}

/// The holder named in `lease` (an empty name is none).
pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

/// What `identity` should do with `lease` at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    match holder(lease) {
        None => Decision::TakeOver { previous: None },
        Some(h) if h == identity => Decision::Renew,
        Some(h) => match expires_at(lease) {
            Some(until) if until > now => Decision::Standby {
                holder: h.to_string(),
                until,
            },
            _ => Decision::TakeOver {
                previous: Some(h.to_string()),
            },
        },
    }
}

/// The Lease to write for `decision` (None for `Standby`). It keeps `current`'s
/// `resourceVersion`, so a concurrent change makes the write fail with 409.
pub fn next_lease(
    current: Option<&Lease>,
    decision: &Decision,
    config: &LeaseConfig,
    now: Timestamp,
) -> Option<Lease> {
    let now = Some(MicroTime(now));
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    match decision {
        Decision::Standby { .. } => return None,
        Decision::Create => {
            *spec = LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(config.duration_seconds()),
                acquire_time: now.clone(),
                renew_time: now,
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
        }
        Decision::Renew => {
            spec.renew_time = now;
            spec.lease_duration_seconds = Some(config.duration_seconds());
            if spec.acquire_time.is_none() {
                spec.acquire_time = spec.renew_time.clone();
            }
        }
        Decision::TakeOver { .. } => {
            spec.holder_identity = Some(config.identity.clone());
            spec.lease_duration_seconds = Some(config.duration_seconds());
            spec.acquire_time = now.clone();
            spec.renew_time = now;
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
    }
    Some(lease)
}

/// `lease` given up: no holder, and a one-second duration from `now` (so an elector that only
/// looks at expiry also takes over at once).
pub fn released(lease: &Lease, now: Timestamp) -> Lease {
    let mut lease = lease.clone();
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// Why a Lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading Lease {lease}: {source}")]
    Get {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {lease}: {source}")]
    Write {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

impl LeaseError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaseError::Get { .. } => "lease_get",
            LeaseError::Write { .. } => "lease_write",
            LeaseError::Timeout(_) => "lease_timeout",
        }
    }
}

/// The outcome of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (acquired, taken over or renewed).
    Leading,
    /// Someone else holds it (`holder` unknown when our write lost a race: 409).
    Standby {
        holder: Option<String>,
        until: Option<Timestamp>,
    },
}

/// The API side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease as we last wrote it, while we hold it: a renewal is one write.
    held: Option<Lease>,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            held: None,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// One round at `now`: renew the Lease we hold, or read it and take it when free.
    pub async fn try_lead(&mut self, now: Timestamp) -> Result<Attempt, LeaseError> {
        let current = match self.held.take() {
            Some(lease) => Some(lease),
            None => self
                .api
                .get_opt(&self.config.name)
                .await
                .map_err(|source| LeaseError::Get {
                    lease: self.lease_name(),
                    source,
                })?,
        };
        let decision = decide(current.as_ref(), &self.config.identity, now);
        let Some(lease) = next_lease(current.as_ref(), &decision, &self.config, now) else {
            let Decision::Standby { holder, until } = decision else {
                unreachable!("only Standby writes nothing")
            };
            return Ok(Attempt::Standby {
                holder: Some(holder),
                until: Some(until),
            });
        };
        let pp = PostParams::default();
        let written = match decision {
            Decision::Create => self.api.create(&pp, &lease).await,
            _ => self.api.replace(&self.config.name, &pp, &lease).await,
        };
        match written {
            Ok(lease) => {
                match &decision {
                    Decision::Create => {
                        tracing::info!(lease = %self.lease_name(), identity = %self.config.identity, "created the Lease: leading")
                    }
                    Decision::TakeOver { previous } => tracing::info!(
                        lease = %self.lease_name(),
                        identity = %self.config.identity,
                        previous = previous.as_deref().unwrap_or("(released)"),
                        "took over the Lease: leading"
                    ),
                    _ => tracing::debug!(lease = %self.lease_name(), "renewed the Lease"),
                }
                self.held = Some(lease);
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::info!(
                    lease = %self.lease_name(),
                    "another replica wrote the Lease first (409 Conflict): standing by"
                );
                Ok(Attempt::Standby {
                    holder: None,
                    until: None,
                })
            }
            Err(source) => Err(LeaseError::Write {
                lease: self.lease_name(),
                source,
            }),
        }
    }

    /// Gives the Lease up, if we hold it. A 409 or 404 means it is not ours any more: fine.
    pub async fn release(&mut self, now: Timestamp) -> Result<(), LeaseError> {
        let Some(lease) = self.held.take() else {
            return Ok(());
        };
        match self
            .api
            .replace(
                &self.config.name,
                &PostParams::default(),
                &released(&lease, now),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %self.lease_name(), "released the Lease");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
            Err(source) => Err(LeaseError::Write {
                lease: self.lease_name(),
                source,
            }),
        }
    }

    /// Forgets the Lease we think we hold (after an error: the next round reads it again).
    pub fn forget(&mut self) {
        self.held = None;
    }
}

/// Whether this replica leads, as the elector last found (the writers' check). Leading ends by
/// itself at the renew deadline if the elector could not renew in time.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<Option<Instant>>,
}

impl Leadership {
    /// A leadership and the sender the elector publishes "leading until" with.
    pub fn channel() -> (watch::Sender<Option<Instant>>, Leadership) {
        let (tx, rx) = watch::channel(None);
        (tx, Leadership { rx })
    }

    /// Always leading (tests, single-replica runs).
    pub fn always() -> Leadership {
        // A receiver keeps the last value after its sender is gone.
        let (_, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(10 * 365 * 86400)));
        Leadership { rx }
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.rx.borrow(), Some(until) if Instant::now() < until)
    }

    /// Waits until the elector publishes a change (forever once the elector is gone).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the election until `stop` turns true; then, if leading, stops leading and releases the
/// Lease. `on_change` is told every change of leadership (for metrics).
pub async fn run(
    mut elector: Elector,
    tx: watch::Sender<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
    on_change: impl Fn(bool),
) {
    let period = elector.config().renew_period();
    let deadline = elector.config().renew_deadline();
    let mut leading = false;
    let mut set = |now_leading: bool, until: Option<Instant>| {
        tx.send_replace(until.filter(|_| now_leading));
        if now_leading != leading {
            leading = now_leading;
            on_change(now_leading);
        }
    };
    let mut last_renewed: Option<Instant> = None;
    while !*stop.borrow() {
        let started = Instant::now();
        let round = tokio::time::timeout(deadline, elector.try_lead(Timestamp::now())).await;
        match round.unwrap_or(Err(LeaseError::Timeout(deadline))) {
            Ok(Attempt::Leading) => {
                last_renewed = Some(started);
                set(true, Some(started + deadline));
            }
            Ok(Attempt::Standby { holder, until }) => {
                if last_renewed.take().is_some() {
                    tracing::warn!(
                        holder = holder.as_deref().unwrap_or("unknown"),
                        "lost the Lease: stopped writing"
                    );
                }
                tracing::debug!(holder = ?holder, until = ?until, "standing by");
                set(false, None);
            }
            Err(error) => {
                elector.forget();
                tracing::warn!(%error, "leader election round failed; retrying");
                if last_renewed.is_some_and(|t| Instant::now() >= t + deadline) {
                    tracing::warn!("could not renew the Lease in time: stopped writing");
                    last_renewed = None;
                    set(false, None);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => {}
        }
    }
    set(false, None);
    if last_renewed.is_some() {
        let release = elector.release(Timestamp::now());
        match tokio::time::timeout(Duration::from_secs(5), release).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release the Lease; it expires by itself")
            }
            Err(_) => tracing::warn!("releasing the Lease timed out; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod tests;
