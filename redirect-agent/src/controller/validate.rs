//! The controller's decisions as one pure function, [`plan`]: a snapshot of the cluster →
//! the sandboxes to delete (expired), the fork slices to publish, and per Sandbox and
//! RouteGroup its status, whether that differs from the one it has, and the events the
//! difference means. No API here: the apply step (`reconcile.rs`) performs the plan.
//!
//! | problem | condition | reason |
//! |---|---|---|
//! | spec does not parse (does not match the types) | `Valid=False` | `InvalidSpec` |
//! | routing key syntax | `Valid=False` | `InvalidRoutingKey` |
//! | TTL syntax, or not positive | `Valid=False` | `InvalidTtl` |
//! | fork with an empty service name | `Valid=False` | `EmptyForkService` |
//! | fork with an empty selector | `Valid=False` | `EmptyForkSelector` |
//! | a service forked twice | `Valid=False` | `DuplicateFork` |
//! | fork of another namespace's Service | `Valid=False` | `CrossNamespaceFork` |
//! | fork of a Service that does not exist | `Valid=False` | `UnknownService` |
//! | routing key claimed by an object that sorts first | `Valid=False` | `KeyConflict` |
//! | invalid (any of the above) | `Ready=False` | `Invalid` |
//! | a fork's selector matches no pod | `Ready=False` | `NoMatchingPods` |
//! | a fork's pods: none ready (serving a port of the Service) | `Ready=False` | `NoReadyEndpoints` |
//! | a route group's selector matches no sandbox | `Ready=False` | `NoMatchingSandboxes` |
//!
//! When several problems apply, the condition's reason is the first one's (in the table's
//! order) and its message lists them all. A routing key claimed twice stays with the owner the
//! node agents give it to ([`Store::key_owners`]: sandboxes before route groups, then by
//! namespace/name); the others are `KeyConflict`. Expired sandboxes take no part: they are about
//! to be deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

use super::events::{Notice, transitions};
use super::status::{self, READY, VALID, Verdict};
use super::ttl;
use crate::crd::{API_VERSION, ForkStatus, RouteGroup, RouteGroupStatus, Sandbox, SandboxStatus};
use crate::forkslice::{fork_slices, ready_endpoints, selected_pods};
use crate::store::{ObjectName, Store, labels_match, ns_name};

/// Condition reasons (CamelCase). The spec problems' reasons come from
/// [`crate::crd::SpecError::reason`]: `InvalidRoutingKey`, `InvalidTtl`, `EmptyForkService`,
/// `EmptyForkSelector`, `DuplicateFork`.
pub mod reason {
    /// `Valid=True`.
    pub const VALIDATED: &str = "Validated";
    /// The object does not match the CRD's types (it could not be read).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A fork names a namespace other than the sandbox's.
    pub const CROSS_NAMESPACE_FORK: &str = "CrossNamespaceFork";
    /// A fork names a Service that does not exist.
    pub const UNKNOWN_SERVICE: &str = "UnknownService";
    /// Another object owns the routing key.
    pub const KEY_CONFLICT: &str = "KeyConflict";
    /// `Ready=True` of a sandbox.
    pub const FORKS_READY: &str = "ForksReady";
    /// `Ready=False` because `Valid=False`.
    pub const INVALID: &str = "Invalid";
    /// A fork's selector matches no pod.
    pub const NO_MATCHING_PODS: &str = "NoMatchingPods";
    /// A fork has pods, none of them a ready endpoint.
    pub const NO_READY_ENDPOINTS: &str = "NoReadyEndpoints";
    /// `Ready=True` of a route group.
    pub const SANDBOXES_SELECTED: &str = "SandboxesSelected";
    /// A route group's selector matches no sandbox.
    pub const NO_MATCHING_SANDBOXES: &str = "NoMatchingSandboxes";
    /// Event: the TTL passed and the sandbox was deleted.
    pub const EXPIRED: &str = "Expired";
}

/// Status fields of a Sandbox the controller owns (cleared when absent from a new status).
pub const SANDBOX_STATUS_FIELDS: &[&str] = &[
    "conditions",
    "observedGeneration",
    "forks",
    "forkCount",
    "readyEndpoints",
];
/// Status fields of a RouteGroup the controller owns.
pub const ROUTE_GROUP_STATUS_FIELDS: &[&str] = &["conditions", "observedGeneration", "sandboxes"];

/// An object whose spec could not be read as its type; `status` is its current status when
/// that could be read.
#[derive(Clone, Debug, PartialEq)]
pub struct BadObject<S> {
    pub meta: ObjectMeta,
    pub error: String,
    pub status: Option<S>,
}

/// What [`plan`] looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Sandboxes, RouteGroups, Services, Pods.
    pub store: Store,
    /// The fork slices that exist now, whole (they are compared with the desired ones).
    pub fork_slices: Vec<Arc<EndpointSlice>>,
    pub bad_sandboxes: Vec<BadObject<SandboxStatus>>,
    pub bad_route_groups: Vec<BadObject<RouteGroupStatus>>,
}

/// The status one object should have.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectPlan<S> {
    pub object: ObjectName,
    /// For events.
    pub reference: ObjectReference,
    /// The object's `resourceVersion` the plan was made from.
    pub resource_version: Option<String>,
    pub status: S,
    /// The status differs from the current one (`lastTransitionTime` aside): write it.
    pub write: bool,
    /// Events the change means (published once the status is written).
    pub notices: Vec<Notice>,
}

/// A sandbox whose TTL has passed.
#[derive(Clone, Debug, PartialEq)]
pub struct Expiry {
    pub object: ObjectName,
    pub reference: ObjectReference,
    /// Precondition of the delete: never delete a newer sandbox of the same name.
    pub uid: Option<String>,
    pub ttl: String,
    pub at: Timestamp,
}

/// Everything the controller should do now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub expired: Vec<Expiry>,
    /// Every fork slice that should exist, sorted by namespace/name.
    pub slices: Vec<EndpointSlice>,
    pub sandboxes: Vec<ObjectPlan<SandboxStatus>>,
    pub route_groups: Vec<ObjectPlan<RouteGroupStatus>>,
    /// The earliest expiry still to come: when to look again.
    pub next_expiry: Option<Timestamp>,
}

impl Plan {
    /// Status writes the plan holds.
    pub fn writes(&self) -> usize {
        self.sandboxes.iter().filter(|p| p.write).count()
            + self.route_groups.iter().filter(|p| p.write).count()
    }
}

/// One problem of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The plan for `snapshot` at `now`.
pub fn plan(snapshot: &Snapshot, now: Timestamp) -> Plan {
    let all = &snapshot.store;
    let mut out = Plan::default();

    let mut live = Store {
        sandboxes: Vec::new(),
        ..all.clone()
    };
    for sb in &all.sandboxes {
        if ttl::is_expired(sb, now) {
            out.expired.push(Expiry {
                object: ObjectName::new("Sandbox", &sb.metadata),
                reference: reference("Sandbox", &sb.metadata),
                uid: sb.metadata.uid.clone(),
                ttl: sb.spec.ttl.clone().unwrap_or_default(),
                at: ttl::expires_at(sb).unwrap_or(now),
            });
        } else {
            live.sandboxes.push(sb.clone());
        }
    }
    live.sort();
    out.next_expiry = ttl::next_expiry(live.sandboxes.iter().map(|s| &**s), now);

    let owners = live.key_owners();
    let index = Index::new(&live);
    for sb in &live.sandboxes {
        let (p, slices) = sandbox_plan(sb, &index, &owners, now);
        out.sandboxes.push(p);
        out.slices.extend(slices);
    }
    for bad in &snapshot.bad_sandboxes {
        out.sandboxes.push(bad_plan("Sandbox", bad, now));
    }
    for rg in &live.route_groups {
        out.route_groups
            .push(route_group_plan(rg, &live, &owners, now));
    }
    for bad in &snapshot.bad_route_groups {
        out.route_groups.push(bad_plan("RouteGroup", bad, now));
    }
    out.slices
        .sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
    out
}

/// A reference to an object for events (no resourceVersion: it is about the object, not one
/// version of it).
pub fn reference(kind: &str, meta: &ObjectMeta) -> ObjectReference {
    let (namespace, name) = ns_name(meta);
    ObjectReference {
        api_version: Some(API_VERSION.to_string()),
        kind: Some(kind.to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    }
}

/// Services by namespace/name and Pods by namespace, so that a pass is not quadratic.
struct Index<'s> {
    services: BTreeMap<(&'s str, &'s str), &'s Service>,
    pods: BTreeMap<&'s str, Vec<&'s Pod>>,
}

impl<'s> Index<'s> {
    fn new(store: &'s Store) -> Index<'s> {
        let mut pods: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for p in &store.pods {
            pods.entry(ns_name(&p.metadata).0).or_default().push(p);
        }
        Index {
            services: store
                .services
                .iter()
                .map(|s| (ns_name(&s.metadata), &**s))
                .collect(),
            pods,
        }
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&'s Service> {
        self.services.get(&(namespace, name)).copied()
    }

    fn pods(&self, namespace: &str) -> impl Iterator<Item = &'s Pod> + '_ {
        self.pods.get(namespace).into_iter().flatten().copied()
    }
}

fn sandbox_plan(
    sb: &Sandbox,
    store: &Index<'_>,
    owners: &BTreeMap<&str, Vec<ObjectName>>,
    now: Timestamp,
) -> (ObjectPlan<SandboxStatus>, Vec<EndpointSlice>) {
    let name = ObjectName::new("Sandbox", &sb.metadata);
    let ns = name.namespace.as_str();
    let mut problems: Vec<Problem> = sb
        .spec
        .validate()
        .iter()
        .map(|e| Problem {
            reason: e.reason(),
            message: format!("{name}: {e}"),
        })
        .collect();
    for fork in &sb.spec.forks {
        if let Some(other) = fork.namespace.as_deref().filter(|f| *f != ns) {
            problems.push(Problem {
                reason: reason::CROSS_NAMESPACE_FORK,
                message: format!(
                    "{name}: fork of Service {other}/{} is in another namespace; a sandbox forks \
                     only Services of its own namespace ({ns})",
                    fork.service
                ),
            });
        }
    }
    for fork in &sb.spec.forks {
        let fork_ns = fork.namespace_or(ns);
        if fork_ns == ns && !fork.service.is_empty() && store.service(ns, &fork.service).is_none() {
            problems.push(Problem {
                reason: reason::UNKNOWN_SERVICE,
                message: format!(
                    "{name}: fork of Service {ns}/{}: no such Service",
                    fork.service
                ),
            });
        }
    }
    if let Some(p) = key_conflict(&name, &sb.spec.routing_key, owners) {
        problems.push(p);
    }

    // Per fork: its pods, the slices publishing them, and whether any is ready.
    let mut slices = Vec::new();
    let mut forks = Vec::new();
    let mut waiting = Vec::new();
    let mut seen = BTreeSet::new();
    for fork in &sb.spec.forks {
        let fork_ns = fork.namespace_or(ns);
        let pods = selected_pods(fork, ns, store.pods(fork_ns));
        let service = (fork_ns == ns && seen.insert(fork.service.as_str()))
            .then(|| store.service(ns, &fork.service))
            .flatten();
        let published = match service {
            Some(svc) => fork_slices(sb, fork, svc, &pods),
            None => Vec::new(),
        };
        let ready = ready_endpoints(&published);
        slices.extend(published);
        forks.push(ForkStatus {
            service: fork.service.clone(),
            namespace: fork_ns.to_string(),
            ready_endpoints: clamp(ready),
        });
        if fork.selector.is_empty() || service.is_none() {
            continue; // invalid: said in Valid
        }
        if pods.is_empty() {
            waiting.push(Problem {
                reason: reason::NO_MATCHING_PODS,
                message: format!(
                    "{name}: fork of Service {fork_ns}/{}: selector {} matches no pod",
                    fork.service,
                    selector_text(&fork.selector)
                ),
            });
        } else if ready == 0 {
            waiting.push(Problem {
                reason: reason::NO_READY_ENDPOINTS,
                message: format!(
                    "{name}: fork of Service {fork_ns}/{}: {} pod(s) match the selector, none \
                     is ready and serves a TCP port of the Service",
                    fork.service,
                    pods.len()
                ),
            });
        }
    }

    let valid = valid_verdict(&problems, || {
        format!(
            "routing key {:?} and {} fork(s) are valid",
            sb.spec.routing_key,
            sb.spec.forks.len()
        )
    });
    let ready = if !valid.ok {
        not_ready_because_invalid()
    } else if let Some(first) = waiting.first() {
        Verdict {
            type_: READY,
            ok: false,
            reason: first.reason,
            message: join(&waiting),
        }
    } else {
        Verdict {
            type_: READY,
            ok: true,
            reason: reason::FORKS_READY,
            message: if forks.is_empty() {
                "no forks".into()
            } else {
                format!(
                    "every fork has a ready endpoint: {}",
                    forks
                        .iter()
                        .map(|f| format!("{} ({})", f.service, f.ready_endpoints))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        }
    };

    let current = sb.status.as_ref();
    let previous = current.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = sb.metadata.generation;
    let conditions = vec![
        valid.condition(generation, now, previous),
        ready.condition(generation, now, previous),
    ];
    let status = SandboxStatus {
        observed_generation: generation,
        fork_count: clamp(sb.spec.forks.len()),
        ready_endpoints: forks.iter().map(|f| f.ready_endpoints).sum(),
        forks,
        conditions,
    };
    (object_plan(name, &sb.metadata, current, status), slices)
}

fn route_group_plan(
    rg: &RouteGroup,
    store: &Store,
    owners: &BTreeMap<&str, Vec<ObjectName>>,
    now: Timestamp,
) -> ObjectPlan<RouteGroupStatus> {
    let name = ObjectName::new("RouteGroup", &rg.metadata);
    let mut problems: Vec<Problem> = rg
        .spec
        .validate()
        .iter()
        .map(|e| Problem {
            reason: e.reason(),
            message: format!("{name}: {e}"),
        })
        .collect();
    if let Some(p) = key_conflict(&name, &rg.spec.routing_key, owners) {
        problems.push(p);
    }
    let members: Vec<ObjectName> = store
        .sandboxes
        .iter()
        .filter(|sb| labels_match(&rg.spec.sandbox_selector, sb.metadata.labels.as_ref()))
        .map(|sb| ObjectName::new("Sandbox", &sb.metadata))
        .collect();
    let valid = valid_verdict(&problems, || {
        format!("routing key {:?} is valid", rg.spec.routing_key)
    });
    let ready = if !valid.ok {
        not_ready_because_invalid()
    } else if members.is_empty() {
        Verdict {
            type_: READY,
            ok: false,
            reason: reason::NO_MATCHING_SANDBOXES,
            message: format!(
                "{name}: sandboxSelector {} matches no Sandbox",
                selector_text(&rg.spec.sandbox_selector)
            ),
        }
    } else {
        const SHOWN: usize = 10;
        let mut listed: Vec<String> = members
            .iter()
            .take(SHOWN)
            .map(ObjectName::ns_name)
            .collect();
        if members.len() > SHOWN {
            listed.push(format!("and {} more", members.len() - SHOWN));
        }
        Verdict {
            type_: READY,
            ok: true,
            reason: reason::SANDBOXES_SELECTED,
            message: format!(
                "selects {} sandbox(es): {}",
                members.len(),
                listed.join(", ")
            ),
        }
    };
    let current = rg.status.as_ref();
    let previous = current.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = rg.metadata.generation;
    let status = RouteGroupStatus {
        conditions: vec![
            valid.condition(generation, now, previous),
            ready.condition(generation, now, previous),
        ],
        observed_generation: generation,
        sandboxes: clamp(members.len()),
    };
    object_plan(name, &rg.metadata, current, status)
}

/// `Valid=False InvalidSpec` and `Ready=False Invalid` for an object that could not be read.
fn bad_plan<S: HasConditions>(kind: &str, bad: &BadObject<S>, now: Timestamp) -> ObjectPlan<S> {
    let name = ObjectName::new(kind, &bad.meta);
    let valid = Verdict {
        type_: VALID,
        ok: false,
        reason: reason::INVALID_SPEC,
        message: format!("{name} does not match the {kind} type: {}", bad.error),
    };
    let previous = bad.status.as_ref().map(|s| s.conditions()).unwrap_or(&[]);
    let generation = bad.meta.generation;
    let mut status = S::default();
    status.set(
        vec![
            valid.condition(generation, now, previous),
            not_ready_because_invalid().condition(generation, now, previous),
        ],
        generation,
    );
    object_plan(name, &bad.meta, bad.status.as_ref(), status)
}

/// The statuses the controller writes.
pub trait HasConditions: serde::Serialize + Default {
    fn conditions(&self) -> &[Condition];
    /// Sets the conditions and the generation they were computed from.
    fn set(&mut self, conditions: Vec<Condition>, generation: Option<i64>);
}

impl HasConditions for SandboxStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    fn set(&mut self, conditions: Vec<Condition>, generation: Option<i64>) {
        self.conditions = conditions;
        self.observed_generation = generation;
    }
}

impl HasConditions for RouteGroupStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    fn set(&mut self, conditions: Vec<Condition>, generation: Option<i64>) {
        self.conditions = conditions;
        self.observed_generation = generation;
    }
}

fn object_plan<S: HasConditions>(
    object: ObjectName,
    meta: &ObjectMeta,
    current: Option<&S>,
    status: S,
) -> ObjectPlan<S> {
    let reference = reference(&object.kind, meta);
    let write = !status::unchanged(current, &status);
    let notices = if write {
        transitions(
            current.map(HasConditions::conditions).unwrap_or(&[]),
            status.conditions(),
        )
    } else {
        Vec::new()
    };
    ObjectPlan {
        object,
        reference,
        resource_version: meta.resource_version.clone(),
        status,
        write,
        notices,
    }
}

fn key_conflict(
    name: &ObjectName,
    key: &str,
    owners: &BTreeMap<&str, Vec<ObjectName>>,
) -> Option<Problem> {
    let first = owners.get(key)?.first()?;
    (first != name).then(|| Problem {
        reason: reason::KEY_CONFLICT,
        message: format!(
            "{name}: routing key {key:?} is already used by {first}, which keeps it (sandboxes \
             before route groups, then by namespace/name)"
        ),
    })
}

fn valid_verdict(problems: &[Problem], ok_message: impl FnOnce() -> String) -> Verdict {
    match problems.first() {
        Some(first) => Verdict {
            type_: VALID,
            ok: false,
            reason: first.reason,
            message: join(problems),
        },
        None => Verdict {
            type_: VALID,
            ok: true,
            reason: reason::VALIDATED,
            message: ok_message(),
        },
    }
}

fn not_ready_because_invalid() -> Verdict {
    Verdict {
        type_: READY,
        ok: false,
        reason: reason::INVALID,
        message: "not valid: see the Valid condition".into(),
    }
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `a=1,b=2`, or `{}` when empty.
fn selector_text(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "{}".into();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn clamp(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests;
