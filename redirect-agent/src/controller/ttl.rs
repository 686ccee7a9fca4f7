//! Sandbox expiry: a sandbox with `spec.ttl` expires `ttl` after its
//! `metadata.creationTimestamp`; the controller deletes it then, and wakes up for exactly the
//! next expiry. A sandbox without a TTL, with an invalid one or without a creation time never
//! expires.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::Sandbox;

/// When `sandbox` expires.
pub fn expires_at(sandbox: &Sandbox) -> Option<Timestamp> {
    let created = sandbox.metadata.creation_timestamp.as_ref()?.0;
    let ttl = SignedDuration::try_from(sandbox.spec.ttl()?).ok()?;
    created.checked_add(ttl).ok()
}

/// Whether `sandbox` has expired at `now` (its expiry is now or past) and is not being
/// deleted already.
pub fn is_expired(sandbox: &Sandbox, now: Timestamp) -> bool {
    sandbox.metadata.deletion_timestamp.is_none() && expires_at(sandbox).is_some_and(|t| t <= now)
}

/// The earliest expiry after `now`.
pub fn next_expiry<'a>(
    sandboxes: impl IntoIterator<Item = &'a Sandbox>,
    now: Timestamp,
) -> Option<Timestamp> {
    sandboxes
        .into_iter()
        .filter_map(expires_at)
        .filter(|t| *t > now)
        .min()
}

/// How long from `now` until `at` (zero when past).
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_until(at)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::crd::SandboxSpec;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn sandbox(created: Option<&str>, ttl: Option<&str>) -> Sandbox {
        let mut sb = Sandbox::new(
            "sb",
            SandboxSpec {
                routing_key: "k".into(),
                forks: vec![],
                fallback: None,
                ttl: ttl.map(Into::into),
            },
        );
        sb.metadata.creation_timestamp = created.map(|c| Time(at(c)));
        sb
    }

    #[test]
    fn a_sandbox_expires_its_ttl_after_creation() {
        let sb = sandbox(Some("2025-01-01T10:00:00Z"), Some("1h30m"));
        assert_eq!(expires_at(&sb), Some(at("2025-01-01T11:30:00Z")));
        assert!(!is_expired(&sb, at("2025-01-01T11:29:59Z")));
        assert!(is_expired(&sb, at("2025-01-01T11:30:00Z")));
    }

    #[test]
    fn no_ttl_an_invalid_ttl_or_no_creation_time_never_expire() {
        let far = at("2999-01-01T00:00:00Z");
        for sb in [
            sandbox(Some("2025-01-01T10:00:00Z"), None),
            sandbox(Some("2025-01-01T10:00:00Z"), Some("forever")),
            sandbox(Some("2025-01-01T10:00:00Z"), Some("0s")),
            sandbox(None, Some("1h")),
        ] {
            assert_eq!(expires_at(&sb), None);
            assert!(!is_expired(&sb, far));
        }
    }

    #[test]
    fn a_sandbox_being_deleted_is_not_expired_again() {
        let mut sb = sandbox(Some("2025-01-01T10:00:00Z"), Some("1h"));
        sb.metadata.deletion_timestamp = Some(Time(at("2025-01-01T11:00:01Z")));
        assert!(!is_expired(&sb, at("2025-01-01T12:00:00Z")));
    }

    #[test]
    fn the_next_wake_up_is_the_earliest_future_expiry() {
        let now = at("2025-01-01T10:30:00Z");
        let sbs = [
            sandbox(Some("2025-01-01T10:00:00Z"), Some("10m")), // past
            sandbox(Some("2025-01-01T10:00:00Z"), Some("2h")),
            sandbox(Some("2025-01-01T10:00:00Z"), Some("45m")),
            sandbox(Some("2025-01-01T10:00:00Z"), None),
        ];
        let next = next_expiry(&sbs, now).unwrap();
        assert_eq!(next, at("2025-01-01T10:45:00Z"));
        assert_eq!(until(next, now), Duration::from_secs(15 * 60));
        assert_eq!(until(now, next), Duration::ZERO);
        assert_eq!(next_expiry(&sbs[3..], now), None);
    }
}
