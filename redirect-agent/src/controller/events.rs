//! Kubernetes Events (events.k8s.io/v1) on transitions: a sandbox or route group became
//! invalid (Warning, with the `Valid` reason), became valid again, became ready, stopped being
//! ready (Warning, with the `Ready` reason), expired and was deleted. Which events a status
//! change means is pure ([`transitions`]); publishing goes through kube-runtime's `Recorder`.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::status::{self, READY, VALID};

/// `reportingController` of our events.
pub const REPORTING_CONTROLLER: &str = "controller.redirect.dev";

/// An event to publish about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    /// CamelCase, e.g. `KeyConflict`, `Ready`, `Expired`.
    pub reason: String,
    /// What the controller did or saw: `Validate`, `Delete`.
    pub action: &'static str,
    pub note: String,
}

impl Notice {
    pub fn event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(status::truncate(&self.note, 1024)),
            action: self.action.to_string(),
            secondary: None,
        }
    }
}

/// The events that going from the conditions `old` to `new` means.
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Notice> {
    let mut out = Vec::new();
    let before = |t: &str| status::find(old, t);
    let after = |t: &str| status::find(new, t);
    if let Some(valid) = after(VALID) {
        let was = before(VALID);
        if valid.status == "False"
            && was.is_none_or(|w| w.status != "False" || w.reason != valid.reason)
        {
            out.push(Notice {
                warning: true,
                reason: valid.reason.clone(),
                action: "Validate",
                note: valid.message.clone(),
            });
        } else if valid.status == "True" && was.is_some_and(|w| w.status == "False") {
            out.push(Notice {
                warning: false,
                reason: valid.reason.clone(),
                action: "Validate",
                note: valid.message.clone(),
            });
        }
    }
    if let Some(ready) = after(READY) {
        let was_ready = before(READY).is_some_and(|w| w.status == "True");
        let valid = !status::find(new, VALID).is_some_and(|v| v.status == "False");
        if ready.status == "True" && !was_ready {
            out.push(Notice {
                warning: false,
                reason: "Ready".into(),
                action: "Validate",
                note: ready.message.clone(),
            });
        } else if ready.status == "False" && was_ready && valid {
            // An invalid object already got its warning.
            out.push(Notice {
                warning: true,
                reason: ready.reason.clone(),
                action: "Validate",
                note: ready.message.clone(),
            });
        }
    }
    out
}

/// Publishes events (best effort: a failure is returned for the caller to log and count).
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    pub fn new(client: kube::Client, identity: &str) -> Events {
        Events {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: REPORTING_CONTROLLER.into(),
                    instance: Some(identity.to_string()),
                },
            ),
        }
    }

    pub async fn publish(
        &self,
        notice: &Notice,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        self.recorder.publish(&notice.event(), regarding).await
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn c(type_: &str, ok: bool, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            observed_generation: None,
            last_transition_time: Time("2025-01-01T00:00:00Z".parse().unwrap()),
        }
    }

    fn reasons(n: &[Notice]) -> Vec<(bool, &str)> {
        n.iter().map(|n| (n.warning, n.reason.as_str())).collect()
    }

    #[test]
    fn a_new_object_that_is_invalid_gets_one_warning_with_the_valid_reason() {
        let n = transitions(
            &[],
            &[c(VALID, false, "KeyConflict"), c(READY, false, "Invalid")],
        );
        assert_eq!(reasons(&n), [(true, "KeyConflict")]);
        assert_eq!(n[0].note, "KeyConflict message");
    }

    #[test]
    fn becoming_ready_is_a_normal_event_and_staying_ready_is_none() {
        let ready = [c(VALID, true, "Validated"), c(READY, true, "ForksReady")];
        let waiting = [
            c(VALID, true, "Validated"),
            c(READY, false, "NoMatchingPods"),
        ];
        assert_eq!(reasons(&transitions(&waiting, &ready)), [(false, "Ready")]);
        assert!(transitions(&ready, &ready).is_empty());
        assert!(transitions(&waiting, &waiting).is_empty());
    }

    #[test]
    fn a_ready_sandbox_losing_its_endpoints_is_a_warning() {
        let ready = [c(VALID, true, "Validated"), c(READY, true, "ForksReady")];
        let down = [
            c(VALID, true, "Validated"),
            c(READY, false, "NoReadyEndpoints"),
        ];
        assert_eq!(
            reasons(&transitions(&ready, &down)),
            [(true, "NoReadyEndpoints")]
        );
    }

    #[test]
    fn a_new_problem_on_an_invalid_object_warns_again_and_a_fix_is_announced() {
        let conflict = [c(VALID, false, "KeyConflict"), c(READY, false, "Invalid")];
        let unknown = [
            c(VALID, false, "UnknownService"),
            c(READY, false, "Invalid"),
        ];
        let fixed = [
            c(VALID, true, "Validated"),
            c(READY, false, "NoMatchingPods"),
        ];
        assert_eq!(
            reasons(&transitions(&conflict, &unknown)),
            [(true, "UnknownService")]
        );
        assert_eq!(
            reasons(&transitions(&unknown, &fixed)),
            [(false, "Validated")]
        );
    }
}
