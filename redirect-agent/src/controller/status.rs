//! Status conditions: composing them (`lastTransitionTime` kept while a condition's status
//! holds), comparing statuses (ignoring `lastTransitionTime`, so that an unchanged status is
//! never written again) and the merge patch that writes one through the status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

/// Condition type: the spec is usable.
pub const VALID: &str = "Valid";
/// Condition type: valid, and everything it routes to is there.
pub const READY: &str = "Ready";

/// Longest condition message written (the API allows 32768 bytes).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// One condition, as computed (without its transition time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub ok: bool,
    /// CamelCase.
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    /// The condition, with the `lastTransitionTime` of `previous`'s condition of the same type
    /// when its status is the same, else `now`.
    pub fn condition(
        &self,
        generation: Option<i64>,
        now: Timestamp,
        previous: &[Condition],
    ) -> Condition {
        let status = if self.ok { "True" } else { "False" };
        let last_transition_time = find(previous, self.type_)
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: self.type_.to_string(),
            status: status.to_string(),
            reason: self.reason.to_string(),
            message: truncate(&self.message, MAX_MESSAGE_LEN),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// The condition of type `type_`.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` has status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Whether `current` already says what `desired` says, `lastTransitionTime` aside (a missing
/// status never does).
pub fn unchanged<S: Serialize>(current: Option<&S>, desired: &S) -> bool {
    let Some(current) = current else {
        return false;
    };
    match (serde_json::to_value(current), serde_json::to_value(desired)) {
        (Ok(a), Ok(b)) => without_transition_times(a) == without_transition_times(b),
        _ => false,
    }
}

fn without_transition_times(mut status: Value) -> Value {
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    status
}

/// The JSON merge patch that sets `status` to `desired`: every field in `fields` that
/// `desired` leaves out is set to null (removed), so nothing of an older status survives.
pub fn status_patch<S: Serialize>(desired: &S, fields: &[&str]) -> Value {
    let mut status = serde_json::to_value(desired).unwrap_or(Value::Null);
    if let Some(map) = status.as_object_mut() {
        for f in fields {
            map.entry(f.to_string()).or_insert(Value::Null);
        }
    }
    serde_json::json!({ "status": status })
}

/// `s`, cut to at most `max` bytes at a character boundary, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SandboxStatus;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn verdict(ok: bool, reason: &'static str) -> Verdict {
        Verdict {
            type_: READY,
            ok,
            reason,
            message: "m".into(),
        }
    }

    #[test]
    fn the_transition_time_is_kept_while_the_status_holds_and_reset_when_it_flips() {
        let t0 = at("2025-01-01T00:00:00Z");
        let t1 = at("2025-01-01T01:00:00Z");
        let first = verdict(false, "NoMatchingPods").condition(Some(1), t0, &[]);
        assert_eq!(first.last_transition_time, Time(t0));
        let same_status =
            verdict(false, "NoReadyEndpoints").condition(Some(2), t1, std::slice::from_ref(&first));
        assert_eq!(same_status.last_transition_time, Time(t0));
        assert_eq!(same_status.reason, "NoReadyEndpoints");
        assert_eq!(same_status.observed_generation, Some(2));
        let flipped = verdict(true, "ForksReady").condition(Some(2), t1, &[first]);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(flipped.status, "True");
    }

    #[test]
    fn statuses_that_differ_only_in_transition_times_are_unchanged() {
        let a = SandboxStatus {
            conditions: vec![verdict(true, "ForksReady").condition(
                Some(1),
                at("2025-01-01T00:00:00Z"),
                &[],
            )],
            observed_generation: Some(1),
            ..Default::default()
        };
        let mut b = a.clone();
        b.conditions[0].last_transition_time = Time(at("2025-02-01T00:00:00Z"));
        assert!(unchanged(Some(&a), &b));
        b.conditions[0].message = "other".into();
        assert!(!unchanged(Some(&a), &b));
        assert!(!unchanged(None, &a), "a missing status is always written");
    }

    #[test]
    fn the_patch_clears_fields_the_new_status_leaves_out() {
        let patch = status_patch(&SandboxStatus::default(), &["conditions", "forks"]);
        assert_eq!(
            patch,
            serde_json::json!({"status": {"conditions": null, "forks": null, "forkCount": 0, "readyEndpoints": 0}})
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let s = "é".repeat(10);
        let t = truncate(&s, 8);
        assert!(t.len() <= 8 && t.ends_with('…'), "{t}");
        assert_eq!(truncate("short", 8), "short");
    }
}
