use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use super::*;
use crate::crd::{Fork, RouteGroupSpec, SandboxSpec};

const NOW: &str = "2025-06-01T12:00:00Z";

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn fork(service: &str) -> Fork {
    Fork {
        service: service.into(),
        namespace: None,
        selector: [("app".to_string(), format!("{service}-fx"))].into(),
    }
}

fn sandbox(ns: &str, name: &str, key: &str, forks: Vec<Fork>) -> Sandbox {
    let mut sb = Sandbox::new(
        name,
        SandboxSpec {
            routing_key: key.into(),
            forks,
            fallback: None,
            ttl: None,
        },
    );
    sb.metadata.namespace = Some(ns.into());
    sb.metadata.uid = Some(format!("uid-{ns}-{name}"));
    sb.metadata.generation = Some(3);
    sb.metadata.creation_timestamp = Some(Time(at("2025-06-01T11:00:00Z")));
    sb
}

fn route_group(ns: &str, name: &str, key: &str, selector: &[(&str, &str)]) -> RouteGroup {
    let mut rg = RouteGroup::new(
        name,
        RouteGroupSpec {
            routing_key: key.into(),
            sandbox_selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    );
    rg.metadata.namespace = Some(ns.into());
    rg.metadata.generation = Some(1);
    rg
}

/// A scene: objects in, a plan out.
#[derive(Default)]
struct Scene {
    snapshot: Snapshot,
}

impl Scene {
    fn service(mut self, ns: &str, name: &str) -> Self {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        self.snapshot.store.services.push(Arc::new(svc));
        self
    }

    /// A pod labelled `app: <service>-fx`.
    fn pod(mut self, ns: &str, name: &str, fork_of: &str, ip: &str, ready: bool) -> Self {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "labels": {"app": format!("{fork_of}-fx")}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap();
        self.snapshot.store.pods.push(Arc::new(pod));
        self
    }

    fn sandbox(mut self, sb: Sandbox) -> Self {
        self.snapshot.store.sandboxes.push(Arc::new(sb));
        self
    }

    fn route_group(mut self, rg: RouteGroup) -> Self {
        self.snapshot.store.route_groups.push(Arc::new(rg));
        self
    }

    fn plan(&self) -> Plan {
        plan(&self.snapshot, at(NOW))
    }
}

fn sandbox_plan<'p>(plan: &'p Plan, ns: &str, name: &str) -> &'p ObjectPlan<SandboxStatus> {
    plan.sandboxes
        .iter()
        .find(|p| p.object.namespace == ns && p.object.name == name)
        .unwrap_or_else(|| panic!("no plan for Sandbox {ns}/{name}"))
}

fn route_group_plan<'p>(plan: &'p Plan, ns: &str, name: &str) -> &'p ObjectPlan<RouteGroupStatus> {
    plan.route_groups
        .iter()
        .find(|p| p.object.namespace == ns && p.object.name == name)
        .unwrap()
}

/// `(status, reason)` of a condition.
fn cond(conditions: &[Condition], type_: &str) -> (String, String) {
    let c = status::find(conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

fn message(conditions: &[Condition], type_: &str) -> String {
    status::find(conditions, type_).unwrap().message.clone()
}

fn t(reason: &str) -> (String, String) {
    ("True".into(), reason.into())
}

fn f(reason: &str) -> (String, String) {
    ("False".into(), reason.into())
}

#[test]
fn a_sandbox_whose_forks_have_ready_pods_is_valid_and_ready() {
    let scene = Scene::default()
        .service("shop", "checkout")
        .service("shop", "cart")
        .pod("shop", "checkout-fx-1", "checkout", "10.1.0.5", true)
        .pod("shop", "checkout-fx-2", "checkout", "10.1.0.6", true)
        .pod("shop", "cart-fx-1", "cart", "10.1.0.7", true)
        .sandbox(sandbox(
            "shop",
            "feature-x",
            "feature-x",
            vec![fork("checkout"), fork("cart")],
        ));
    let plan = scene.plan();
    let p = sandbox_plan(&plan, "shop", "feature-x");
    let s = &p.status;
    assert_eq!(cond(&s.conditions, VALID), t("Validated"));
    assert_eq!(cond(&s.conditions, READY), t("ForksReady"));
    assert_eq!(
        message(&s.conditions, READY),
        "every fork has a ready endpoint: checkout (2), cart (1)"
    );
    assert_eq!(s.observed_generation, Some(3));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(3))
    );
    assert!(
        s.conditions
            .iter()
            .all(|c| c.last_transition_time == Time(at(NOW)))
    );
    assert_eq!(
        s.forks,
        [
            ForkStatus {
                service: "checkout".into(),
                namespace: "shop".into(),
                ready_endpoints: 2
            },
            ForkStatus {
                service: "cart".into(),
                namespace: "shop".into(),
                ready_endpoints: 1
            },
        ]
    );
    assert_eq!((s.fork_count, s.ready_endpoints), (2, 3));
    assert!(p.write, "a sandbox without status gets one");
    let events: Vec<_> = p.notices.iter().map(|n| n.reason.as_str()).collect();
    assert_eq!(events, ["Ready"]);
    assert_eq!(plan.slices.len(), 2, "one IPv4 slice per fork");
}

#[test]
fn a_fork_of_a_service_that_does_not_exist_is_unknown_service() {
    let plan = Scene::default()
        .pod("shop", "p", "payments", "10.1.0.5", true)
        .sandbox(sandbox("shop", "sb", "k", vec![fork("payments")]))
        .plan();
    let s = &sandbox_plan(&plan, "shop", "sb").status;
    assert_eq!(cond(&s.conditions, VALID), f("UnknownService"));
    assert_eq!(
        message(&s.conditions, VALID),
        "Sandbox shop/sb: fork of Service shop/payments: no such Service"
    );
    assert_eq!(cond(&s.conditions, READY), f("Invalid"));
    assert!(plan.slices.is_empty());
}

#[test]
fn a_fork_whose_selector_matches_no_pod_is_valid_but_not_ready() {
    let plan = Scene::default()
        .service("shop", "checkout")
        .pod("other", "p", "checkout", "10.1.0.5", true)
        .sandbox(sandbox("shop", "sb", "k", vec![fork("checkout")]))
        .plan();
    let p = sandbox_plan(&plan, "shop", "sb");
    assert_eq!(cond(&p.status.conditions, VALID), t("Validated"));
    assert_eq!(cond(&p.status.conditions, READY), f("NoMatchingPods"));
    assert_eq!(
        message(&p.status.conditions, READY),
        "Sandbox shop/sb: fork of Service shop/checkout: selector app=checkout-fx matches no pod"
    );
    assert!(p.notices.is_empty(), "not ready from the start is no event");
}

#[test]
fn a_fork_whose_pods_are_not_ready_has_no_ready_endpoints() {
    let plan = Scene::default()
        .service("shop", "checkout")
        .pod("shop", "p", "checkout", "10.1.0.5", false)
        .sandbox(sandbox("shop", "sb", "k", vec![fork("checkout")]))
        .plan();
    let s = &sandbox_plan(&plan, "shop", "sb").status;
    assert_eq!(cond(&s.conditions, READY), f("NoReadyEndpoints"));
    assert_eq!(s.forks[0].ready_endpoints, 0);
    // Still published: node agents see the endpoint as not ready.
    assert_eq!(plan.slices.len(), 1);
}

#[test]
fn a_key_claimed_by_two_sandboxes_stays_with_the_first_by_namespace_and_name() {
    let plan = Scene::default()
        .sandbox(sandbox("b", "one", "shared", vec![]))
        .sandbox(sandbox("a", "two", "shared", vec![]))
        .plan();
    let winner = &sandbox_plan(&plan, "a", "two").status;
    let loser = sandbox_plan(&plan, "b", "one");
    assert_eq!(cond(&winner.conditions, VALID), t("Validated"));
    assert_eq!(cond(&loser.status.conditions, VALID), f("KeyConflict"));
    assert!(
        message(&loser.status.conditions, VALID)
            .contains("routing key \"shared\" is already used by Sandbox a/two"),
    );
    assert_eq!(cond(&loser.status.conditions, READY), f("Invalid"));
    let events: Vec<_> = loser
        .notices
        .iter()
        .map(|n| (n.warning, n.reason.as_str()))
        .collect();
    assert_eq!(events, [(true, "KeyConflict")]);
}

#[test]
fn a_route_group_reusing_a_sandbox_key_loses_it_even_when_it_sorts_first() {
    let plan = Scene::default()
        .sandbox(sandbox("z", "sb", "shared", vec![]))
        .route_group(route_group("a", "rg", "shared", &[]))
        .plan();
    let sb = &sandbox_plan(&plan, "z", "sb").status;
    let rg = &route_group_plan(&plan, "a", "rg").status;
    assert_eq!(cond(&sb.conditions, VALID), t("Validated"));
    assert_eq!(cond(&rg.conditions, VALID), f("KeyConflict"));
    assert!(message(&rg.conditions, VALID).contains("Sandbox z/sb"));
}

#[test]
fn a_fork_of_another_namespace_is_cross_namespace_and_publishes_nothing() {
    let mut other = fork("checkout");
    other.namespace = Some("payments".into());
    let plan = Scene::default()
        .service("payments", "checkout")
        .pod("payments", "p", "checkout", "10.1.0.5", true)
        .sandbox(sandbox("tenant", "sb", "k", vec![other]))
        .plan();
    let s = &sandbox_plan(&plan, "tenant", "sb").status;
    assert_eq!(cond(&s.conditions, VALID), f("CrossNamespaceFork"));
    assert!(message(&s.conditions, VALID).contains("payments/checkout"));
    assert!(plan.slices.is_empty());
    assert_eq!(s.forks[0].namespace, "payments");
}

#[test]
fn a_fork_naming_its_own_namespace_is_fine() {
    let mut own = fork("checkout");
    own.namespace = Some("shop".into());
    let plan = Scene::default()
        .service("shop", "checkout")
        .pod("shop", "p", "checkout", "10.1.0.5", true)
        .sandbox(sandbox("shop", "sb", "k", vec![own]))
        .plan();
    let s = &sandbox_plan(&plan, "shop", "sb").status;
    assert_eq!(cond(&s.conditions, READY), t("ForksReady"));
}

#[test]
fn every_spec_problem_is_listed_and_the_first_gives_the_reason() {
    let mut empty = fork("cart");
    empty.selector.clear();
    let mut sb = sandbox(
        "shop",
        "sb",
        "bad key",
        vec![fork("checkout"), empty, fork("checkout")],
    );
    sb.spec.ttl = Some("soon".into());
    let plan = Scene::default()
        .service("shop", "checkout")
        .service("shop", "cart")
        .sandbox(sb)
        .plan();
    let s = &sandbox_plan(&plan, "shop", "sb").status;
    assert_eq!(cond(&s.conditions, VALID), f("InvalidRoutingKey"));
    let m = message(&s.conditions, VALID);
    for part in [
        "invalid routing key \"bad key\"",
        "invalid ttl \"soon\"",
        "selector is empty",
        "\"checkout\" is forked twice",
    ] {
        assert!(m.contains(part), "{part:?} not in {m:?}");
    }
    // The duplicate fork does not publish the same slices twice.
    let names: BTreeSet<_> = plan
        .slices
        .iter()
        .map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names.len(), plan.slices.len());
}

#[test]
fn each_spec_problem_alone_has_its_own_reason() {
    let cases: Vec<(Sandbox, &str)> = vec![
        (sandbox("shop", "a", "bad key", vec![]), "InvalidRoutingKey"),
        (
            {
                let mut sb = sandbox("shop", "b", "kb", vec![]);
                sb.spec.ttl = Some("0s".into());
                sb
            },
            "InvalidTtl",
        ),
        (
            {
                let mut e = fork("checkout");
                e.selector.clear();
                sandbox("shop", "c", "kc", vec![e])
            },
            "EmptyForkSelector",
        ),
        (
            sandbox("shop", "d", "kd", vec![fork("checkout"), fork("checkout")]),
            "DuplicateFork",
        ),
        (
            sandbox("shop", "e", "ke", vec![fork("")]),
            "EmptyForkService",
        ),
    ];
    for (sb, reason) in cases {
        let name = sb.metadata.name.clone().unwrap();
        let plan = Scene::default()
            .service("shop", "checkout")
            .sandbox(sb)
            .plan();
        let s = &sandbox_plan(&plan, "shop", &name).status;
        assert_eq!(cond(&s.conditions, VALID), f(reason), "sandbox {name}");
    }
}

#[test]
fn an_unchanged_status_is_not_written_again_and_keeps_its_transition_time() {
    let mut scene = Scene::default()
        .service("shop", "checkout")
        .pod("shop", "p", "checkout", "10.1.0.5", true)
        .sandbox(sandbox("shop", "sb", "k", vec![fork("checkout")]))
        .route_group(route_group("shop", "rg", "group", &[]));
    let first = scene.plan();
    // The statuses are written; an hour later, nothing changed.
    let mut sb = (*scene.snapshot.store.sandboxes[0]).clone();
    sb.status = Some(first.sandboxes[0].status.clone());
    scene.snapshot.store.sandboxes[0] = Arc::new(sb);
    let mut rg = (*scene.snapshot.store.route_groups[0]).clone();
    rg.status = Some(first.route_groups[0].status.clone());
    scene.snapshot.store.route_groups[0] = Arc::new(rg);
    let later = plan(&scene.snapshot, at("2025-06-01T13:00:00Z"));
    assert_eq!(later.writes(), 0);
    assert!(later.sandboxes[0].notices.is_empty());
    assert_eq!(later.sandboxes[0].status, first.sandboxes[0].status);
}

#[test]
fn a_changed_endpoint_count_is_written_without_an_event() {
    let scene = Scene::default()
        .service("shop", "checkout")
        .pod("shop", "p", "checkout", "10.1.0.5", true)
        .sandbox(sandbox("shop", "sb", "k", vec![fork("checkout")]));
    let first = scene.plan();
    let mut sb = (*scene.snapshot.store.sandboxes[0]).clone();
    sb.status = Some(first.sandboxes[0].status.clone());
    let scene = Scene {
        snapshot: Snapshot {
            store: Store {
                sandboxes: vec![Arc::new(sb)],
                ..scene.snapshot.store.clone()
            },
            ..Default::default()
        },
    }
    .pod("shop", "q", "checkout", "10.1.0.6", true);
    let second = scene.plan();
    let p = &second.sandboxes[0];
    assert!(p.write);
    assert_eq!(p.status.ready_endpoints, 2);
    assert!(p.notices.is_empty());
}

#[test]
fn a_route_group_is_ready_when_it_selects_a_sandbox() {
    let mut member = sandbox("team-a", "sb", "k", vec![]);
    member.metadata.labels = Some([("group".to_string(), "release".to_string())].into());
    let plan = Scene::default()
        .sandbox(member)
        .sandbox(sandbox("team-b", "other", "k2", vec![]))
        .route_group(route_group(
            "shop",
            "release",
            "release-1",
            &[("group", "release")],
        ))
        .route_group(route_group(
            "shop",
            "empty",
            "release-2",
            &[("group", "none")],
        ))
        .route_group(route_group("shop", "bad", "bad key", &[]))
        .plan();
    let ready = &route_group_plan(&plan, "shop", "release").status;
    assert_eq!(cond(&ready.conditions, VALID), t("Validated"));
    assert_eq!(cond(&ready.conditions, READY), t("SandboxesSelected"));
    assert_eq!(
        message(&ready.conditions, READY),
        "selects 1 sandbox(es): team-a/sb"
    );
    assert_eq!(ready.sandboxes, 1);
    let empty = &route_group_plan(&plan, "shop", "empty").status;
    assert_eq!(cond(&empty.conditions, READY), f("NoMatchingSandboxes"));
    assert_eq!(empty.sandboxes, 0);
    let bad = &route_group_plan(&plan, "shop", "bad").status;
    assert_eq!(cond(&bad.conditions, VALID), f("InvalidRoutingKey"));
    assert_eq!(cond(&bad.conditions, READY), f("Invalid"));
}

#[test]
fn an_expired_sandbox_is_deleted_instead_of_validated_and_frees_its_key() {
    let mut expired = sandbox("a", "old", "shared", vec![fork("checkout")]);
    expired.spec.ttl = Some("30m".into()); // created 11:00, now 12:00
    let mut later = sandbox("a", "later", "other", vec![]);
    later.spec.ttl = Some("2h".into());
    let plan = Scene::default()
        .service("a", "checkout")
        .pod("a", "p", "checkout", "10.1.0.5", true)
        .sandbox(expired)
        .sandbox(later)
        .sandbox(sandbox("b", "next", "shared", vec![]))
        .plan();
    assert_eq!(plan.expired.len(), 1);
    let e = &plan.expired[0];
    assert_eq!(e.object.ns_name(), "a/old");
    assert_eq!(e.uid.as_deref(), Some("uid-a-old"));
    assert_eq!(e.at, at("2025-06-01T11:30:00Z"));
    assert_eq!(e.ttl, "30m");
    assert!(plan.sandboxes.iter().all(|p| p.object.name != "old"));
    assert!(plan.slices.is_empty(), "no slices for an expired sandbox");
    let next = &sandbox_plan(&plan, "b", "next").status;
    assert_eq!(cond(&next.conditions, VALID), t("Validated"));
    assert_eq!(plan.next_expiry, Some(at("2025-06-01T13:00:00Z")));
}

#[test]
fn an_object_that_does_not_parse_is_invalid_spec_with_the_error() {
    let mut meta = ObjectMeta {
        name: Some("broken".into()),
        namespace: Some("shop".into()),
        generation: Some(7),
        ..ObjectMeta::default()
    };
    let mut scene = Scene::default();
    scene.snapshot.bad_sandboxes.push(BadObject {
        meta: meta.clone(),
        error: "spec.forks: invalid type: string \"x\", expected a sequence".into(),
        status: None,
    });
    meta.name = Some("broken-group".into());
    scene.snapshot.bad_route_groups.push(BadObject {
        meta,
        error: "spec.routingKey: missing field".into(),
        status: None,
    });
    let plan = scene.plan();
    let p = sandbox_plan(&plan, "shop", "broken");
    assert_eq!(cond(&p.status.conditions, VALID), f("InvalidSpec"));
    assert!(message(&p.status.conditions, VALID).contains("expected a sequence"));
    assert_eq!(p.status.observed_generation, Some(7));
    assert!(p.write);
    let rg = route_group_plan(&plan, "shop", "broken-group");
    assert_eq!(cond(&rg.status.conditions, VALID), f("InvalidSpec"));
}
