//! How each watch of the kube source is doing, for `/status`, `/metrics`, `redirectctl status`
//! and readiness: synced once or not, connected or failing, events seen, objects skipped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::admin::unix_ms;

/// Longest wait between two retries of a failing watch (kube-runtime's default backoff caps at
/// 30 s), plus a margin: a watch that had no error for this long is established again.
pub const RECONNECT_PROOF: Duration = Duration::from_secs(35);

/// The state of one watch, as `/status` shows it (schema: fields may be added, never renamed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStatus {
    /// `Service`, `EndpointSlice`, `Pod`, `Sandbox`, `RouteGroup`.
    pub kind: String,
    /// The query: field and label selectors, or `cluster-wide`.
    pub scope: String,
    /// The first complete list arrived (readiness waits for every watch's).
    pub synced: bool,
    /// The watch is established: an event arrived after its last error, or no error came for
    /// longer than the longest retry backoff (a watcher that still failed would have retried
    /// and failed again by then). False while the API server cannot be reached or answers
    /// errors.
    pub connected: bool,
    /// The kind is not served (its CRD is not installed); the watch retries.
    pub crd_missing: bool,
    /// Objects held.
    pub objects: u64,
    /// Add/update/delete events received since start.
    pub events_total: u64,
    /// Complete relists (the first one included): a 410 Gone or a reconnect after an error.
    pub lists_total: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    pub last_error_at_unix_ms: Option<u64>,
    pub last_event_at_unix_ms: Option<u64>,
    /// Objects that could not be read, by `namespace/name`, with the reason (they are left out
    /// of routing; the rest goes on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<String, String>,
}

/// The source's part of `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `manifests` or `kube`.
    pub kind: String,
    /// Every watch has synced once and is connected now.
    pub healthy: bool,
    /// What an operator should know, e.g. that the last good state is being served while the
    /// API server is unreachable.
    pub message: String,
    pub watches: Vec<WatchStatus>,
}

/// Shared between the watch tasks (writers) and the admin endpoint (reader).
#[derive(Debug, Default)]
pub struct Health {
    watches: Mutex<Vec<WatchStatus>>,
}

impl Health {
    /// Registers a watch; returns its index.
    pub fn register(&self, kind: &str, scope: &str) -> usize {
        let mut w = self.lock();
        w.push(WatchStatus {
            kind: kind.to_string(),
            scope: scope.to_string(),
            ..WatchStatus::default()
        });
        w.len() - 1
    }

    pub fn update(&self, index: usize, f: impl FnOnce(&mut WatchStatus)) {
        if let Some(w) = self.lock().get_mut(index) {
            f(w);
        }
    }

    pub fn event(&self, index: usize, objects: usize) {
        self.update(index, |w| {
            w.events_total += 1;
            w.objects = objects as u64;
            w.connected = true;
            w.last_event_at_unix_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    pub fn error(&self, index: usize, error: &str, crd_missing: bool) {
        self.update(index, |w| {
            w.errors_total += 1;
            w.connected = false;
            w.crd_missing = crd_missing;
            w.last_error = Some(error.to_string());
            w.last_error_at_unix_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    /// Every watch has its first list (a kind whose CRD is missing counts: it has nothing).
    pub fn all_synced(&self) -> bool {
        self.lock().iter().all(|w| w.synced || w.crd_missing)
    }

    /// Every watch's state now (connectivity inferred as of now).
    pub fn watches(&self) -> Vec<WatchStatus> {
        let now = unix_ms(SystemTime::now());
        let mut watches = self.lock().clone();
        for w in &mut watches {
            if !w.connected
                && w.last_error_at_unix_ms
                    .is_some_and(|e| now.saturating_sub(e) > RECONNECT_PROOF.as_millis() as u64)
            {
                w.connected = true;
            }
        }
        watches
    }

    /// The `/status` summary.
    pub fn status(&self) -> SourceStatus {
        let watches = self.watches();
        let synced = watches.iter().all(|w| w.synced || w.crd_missing);
        let failing: Vec<&str> = watches
            .iter()
            .filter(|w| !w.connected && !w.crd_missing)
            .map(|w| w.kind.as_str())
            .collect();
        let missing: Vec<&str> = watches
            .iter()
            .filter(|w| w.crd_missing)
            .map(|w| w.kind.as_str())
            .collect();
        let mut message = if !synced {
            "waiting for the first list of every watch".to_string()
        } else if !failing.is_empty() {
            format!(
                "the API server cannot be reached or fails for {}: the last good state stays in \
                 force (the kernel path keeps working); watches retry with backoff",
                failing.join(", ")
            )
        } else {
            "all watches synced and connected".to_string()
        };
        if !missing.is_empty() {
            message.push_str(&format!(
                "; the {} CRD is not installed (kubectl apply -f deploy/crds.yaml)",
                missing.join(" and ")
            ));
        }
        SourceStatus {
            kind: "kube".into(),
            healthy: synced && failing.is_empty() && missing.is_empty(),
            message,
            watches,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WatchStatus>> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_watch_after_sync_says_the_last_good_state_stays() {
        let h = Health::default();
        let svc = h.register("Service", "cluster-wide");
        let pod = h.register("Pod", "spec.nodeName=n1");
        assert!(!h.all_synced());
        for i in [svc, pod] {
            h.update(i, |w| w.synced = true);
            h.event(i, 3);
        }
        assert!(h.status().healthy);
        h.error(pod, "connection refused", false);
        let st = h.status();
        assert!(!st.healthy);
        assert!(
            h.all_synced(),
            "a later failure does not undo the first sync"
        );
        assert!(
            st.message.contains("Pod") && st.message.contains("last good state"),
            "{}",
            st.message
        );
        assert_eq!(st.watches[1].errors_total, 1);
    }

    #[test]
    fn a_watch_without_errors_for_longer_than_the_longest_backoff_is_connected_again() {
        let h = Health::default();
        let svc = h.register("Service", "cluster-wide");
        h.update(svc, |w| w.synced = true);
        h.error(svc, "connection refused", false);
        assert!(!h.watches()[0].connected);
        let long_ago = unix_ms(SystemTime::now()) - RECONNECT_PROOF.as_millis() as u64 - 1000;
        h.update(svc, |w| w.last_error_at_unix_ms = Some(long_ago));
        assert!(h.watches()[0].connected);
        assert!(h.status().healthy);
    }

    #[test]
    fn a_missing_crd_counts_as_synced_and_is_named() {
        let h = Health::default();
        let sb = h.register("Sandbox", "cluster-wide");
        h.error(
            sb,
            "404 the server could not find the requested resource",
            true,
        );
        assert!(h.all_synced());
        let st = h.status();
        assert!(!st.healthy);
        assert!(
            st.message.contains("Sandbox CRD is not installed"),
            "{}",
            st.message
        );
    }
}
