use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{ApiMock, Call};
use crate::controller::validate::plan;
use crate::crd::{Fork, SandboxSpec};
use crate::forkslice::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::store::Store;

const NOW: &str = "2025-06-01T12:00:00Z";
const SANDBOXES: &str = "/apis/redirect.dev/v1alpha1/namespaces/shop/sandboxes";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn sandbox(name: &str, forks: &[&str]) -> Sandbox {
    let mut sb = Sandbox::new(
        name,
        SandboxSpec {
            routing_key: format!("key-{name}"),
            forks: forks
                .iter()
                .map(|s| Fork {
                    service: s.to_string(),
                    namespace: None,
                    selector: [("app".to_string(), format!("{s}-fx"))].into(),
                })
                .collect(),
            fallback: None,
            ttl: None,
        },
    );
    sb.metadata.namespace = Some("shop".into());
    sb.metadata.uid = Some(format!("uid-{name}"));
    sb.metadata.generation = Some(2);
    sb.metadata.resource_version = Some("10".into());
    sb.metadata.creation_timestamp = Some(Time("2025-06-01T11:00:00Z".parse().unwrap()));
    sb
}

fn service(name: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap(),
    )
}

fn pod(name: &str, fork_of: &str, ip: &str) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "labels": {"app": format!("{fork_of}-fx")}},
            "spec": {"nodeName": "node-b", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap(),
    )
}

fn snapshot(sandboxes: Vec<Sandbox>) -> Snapshot {
    Snapshot {
        store: Store {
            sandboxes: sandboxes.into_iter().map(Arc::new).collect(),
            ..Store::default()
        },
        ..Snapshot::default()
    }
}

fn writer(client: kube::Client) -> (Writer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (
        Writer::new(
            client,
            "controller-0",
            Leadership::always(),
            metrics.clone(),
        ),
        metrics,
    )
}

/// Runs one pass against the script, which must answer every request the pass makes; then
/// checks that nothing else was asked.
async fn pass(
    writer: &Writer,
    api: &mut ApiMock,
    snapshot: Snapshot,
    memory: &mut Memory,
    script: impl for<'a> FnOnce(&'a mut ApiMock) -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>,
) -> Result<PassReport, ControllerError> {
    let (report, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(reconcile(writer, snapshot, memory, now()), script(api))
    })
    .await
    .expect("the pass made a request the script did not answer");
    api.expect_none(Duration::from_millis(20)).await;
    report
}

fn condition(body: &Value, type_: &str) -> Value {
    body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap()
}

fn answer_event(call: Call) {
    call.reply(201, json!({"metadata": {"name": "e", "namespace": "shop"}}));
}

#[tokio::test]
async fn a_new_sandbox_gets_its_status_written_through_the_status_subresource() {
    let (client, mut api) = ApiMock::new();
    let (writer, metrics) = writer(client);
    let mut snap = snapshot(vec![sandbox("sb", &["checkout"])]);
    snap.store.services.push(service("checkout"));
    let report = pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            let call = api
                .expect(
                    "PATCH",
                    &format!("{SANDBOXES}/sb/status?&fieldManager=redirect-controller"),
                )
                .await;
            assert_eq!(
                call.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert_eq!(
                call.body,
                json!({"status": {
                    "conditions": [
                        {"type": "Valid", "status": "True", "reason": "Validated",
                         "message": "routing key \"key-sb\" and 1 fork(s) are valid",
                         "observedGeneration": 2, "lastTransitionTime": NOW},
                        {"type": "Ready", "status": "False", "reason": "NoMatchingPods",
                         "message": "Sandbox shop/sb: fork of Service shop/checkout: selector app=checkout-fx matches no pod",
                         "observedGeneration": 2, "lastTransitionTime": NOW}
                    ],
                    "observedGeneration": 2,
                    "forks": [{"service": "checkout", "namespace": "shop", "readyEndpoints": 0}],
                    "forkCount": 1,
                    "readyEndpoints": 0
                }})
            );
            call.ok(json!({"metadata": {"name": "sb", "namespace": "shop"}}));
        })
    })
    .await
    .unwrap();
    assert_eq!(report.writes, 1);
    assert!(report.errors.is_empty());
    assert_eq!(metrics.writes("status"), 1);
}

#[tokio::test]
async fn a_sandbox_becoming_ready_has_its_slice_published_then_its_status_then_an_event() {
    let (client, mut api) = ApiMock::new();
    let (writer, _) = writer(client);
    let mut snap = snapshot(vec![sandbox("sb", &["checkout"])]);
    snap.store.services.push(service("checkout"));
    snap.store
        .pods
        .push(pod("checkout-fx-1", "checkout", "10.1.0.5"));
    pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            let create = api
                .expect(
                    "POST",
                    &format!("{SLICES}?&fieldManager=redirect-controller"),
                )
                .await;
            let labels = &create.body["metadata"]["labels"];
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
            assert_eq!(labels["redirect.dev/sandbox"], "sb");
            assert_eq!(labels["redirect.dev/fork-of"], "checkout");
            assert_eq!(labels.get("kubernetes.io/service-name"), None);
            assert_eq!(create.body["addressType"], "IPv4");
            assert_eq!(
                create.body["endpoints"][0]["addresses"],
                json!(["10.1.0.5"])
            );
            assert_eq!(
                create.body["metadata"]["ownerReferences"][0]["uid"],
                "uid-sb"
            );
            create.echo("1");
            let patch = api
                .expect(
                    "PATCH",
                    &format!("{SANDBOXES}/sb/status?&fieldManager=redirect-controller"),
                )
                .await;
            assert_eq!(condition(&patch.body, "Ready")["status"], "True");
            assert_eq!(patch.body["status"]["readyEndpoints"], 1);
            patch.ok(json!({}));
            let event = api.expect("POST", &format!("{EVENTS}?")).await;
            assert_eq!(event.body["reason"], "Ready");
            assert_eq!(event.body["type"], "Normal");
            assert_eq!(event.body["reportingController"], "controller.redirect.dev");
            assert_eq!(event.body["reportingInstance"], "controller-0");
            assert_eq!(
                event.body["regarding"],
                json!({"apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
                       "namespace": "shop", "name": "sb", "uid": "uid-sb"})
            );
            answer_event(event);
        })
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_expired_sandbox_is_deleted_with_a_uid_precondition_and_an_event() {
    let (client, mut api) = ApiMock::new();
    let (writer, metrics) = writer(client);
    let mut old = sandbox("old", &[]);
    old.spec.ttl = Some("30m".into());
    let mut memory = Memory::default();
    let report = pass(
        &writer,
        &mut api,
        snapshot(vec![old.clone()]),
        &mut memory,
        |api| {
            Box::pin(async move {
                let delete = api.expect("DELETE", &format!("{SANDBOXES}/old?")).await;
                assert_eq!(delete.body["preconditions"], json!({"uid": "uid-old"}));
                delete.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
                let event = api.expect("POST", &format!("{EVENTS}?")).await;
                assert_eq!(event.body["reason"], "Expired");
                assert_eq!(event.body["action"], "Delete");
                assert_eq!(
                    event.body["note"],
                    "ttl 30m passed at 2025-06-01T11:30:00Z: the sandbox was deleted"
                );
                answer_event(event);
            })
        },
    )
    .await
    .unwrap();
    assert_eq!(report.writes, 1);
    assert_eq!(metrics.writes("sandbox_delete"), 1);
    // Until the cache drops it, the deleted sandbox is neither deleted again nor validated.
    pass(&writer, &mut api, snapshot(vec![old]), &mut memory, |_| {
        Box::pin(async {})
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unchanged_status_is_not_written() {
    let (client, mut api) = ApiMock::new();
    let (writer, _) = writer(client);
    let mut sb = sandbox("sb", &[]);
    let first = plan(&snapshot(vec![sb.clone()]), now());
    sb.status = Some(first.sandboxes[0].status.clone());
    let report = pass(
        &writer,
        &mut api,
        snapshot(vec![sb]),
        &mut Memory::default(),
        |_| Box::pin(async {}),
    )
    .await
    .unwrap();
    assert_eq!(report.writes, 0);
}

#[tokio::test]
async fn a_pass_before_the_cache_shows_our_write_does_not_write_it_again() {
    let (client, mut api) = ApiMock::new();
    let (writer, _) = writer(client);
    let mut memory = Memory::default();
    let sb = sandbox("sb", &[]);
    pass(
        &writer,
        &mut api,
        snapshot(vec![sb.clone()]),
        &mut memory,
        |api| {
            Box::pin(async move {
                api.expect(
                    "PATCH",
                    &format!("{SANDBOXES}/sb/status?&fieldManager=redirect-controller"),
                )
                .await
                .ok(json!({}));
                answer_event(api.expect("POST", &format!("{EVENTS}?")).await);
            })
        },
    )
    .await
    .unwrap();
    // The cache still has resourceVersion 10 without a status: no second write, no event.
    pass(
        &writer,
        &mut api,
        snapshot(vec![sb.clone()]),
        &mut memory,
        |_| Box::pin(async {}),
    )
    .await
    .unwrap();
    // Someone else replaced the status (a newer version without ours): written again.
    let mut newer = sb;
    newer.metadata.resource_version = Some("12".into());
    pass(
        &writer,
        &mut api,
        snapshot(vec![newer]),
        &mut memory,
        |api| {
            Box::pin(async move {
                api.expect(
                    "PATCH",
                    &format!("{SANDBOXES}/sb/status?&fieldManager=redirect-controller"),
                )
                .await
                .ok(json!({}));
                // The same event again: the recorder counts it in a series (a PATCH).
                let event = api.next().await;
                assert!(event.uri.starts_with(EVENTS), "{}", event.uri);
                assert_eq!(event.body["series"]["count"], 2);
                answer_event(event);
            })
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn changed_fork_slices_are_replaced_and_stale_ones_deleted() {
    let (client, mut api) = ApiMock::new();
    let (writer, metrics) = writer(client);
    let mut sb = sandbox("sb", &["checkout"]);
    let mut snap = snapshot(vec![sb.clone()]);
    snap.store.services.push(service("checkout"));
    snap.store
        .pods
        .push(pod("checkout-fx-1", "checkout", "10.1.0.5"));
    // What exists: the right slice with an old address, and a slice of a deleted sandbox.
    let desired = plan(&snap, now()).slices;
    let mut changed = desired[0].clone();
    changed.endpoints[0].addresses = vec!["10.1.0.99".into()];
    changed.metadata.resource_version = Some("5".into());
    let mut stale = desired[0].clone();
    stale.metadata.name = Some("gone-checkout-0123456789".into());
    stale.metadata.uid = Some("uid-stale".into());
    snap.fork_slices = vec![Arc::new(changed), Arc::new(stale)];
    sb.status = Some(plan(&snap, now()).sandboxes[0].status.clone());
    snap.store.sandboxes = vec![Arc::new(sb)];
    let name = desired[0].metadata.name.clone().unwrap();
    pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            let put = api
                .expect(
                    "PUT",
                    &format!("{SLICES}/{name}?&fieldManager=redirect-controller"),
                )
                .await;
            assert_eq!(put.body["metadata"]["resourceVersion"], "5");
            assert_eq!(put.body["endpoints"][0]["addresses"], json!(["10.1.0.5"]));
            put.echo("6");
            let delete = api
                .expect("DELETE", &format!("{SLICES}/gone-checkout-0123456789?"))
                .await;
            assert_eq!(delete.body["preconditions"], json!({"uid": "uid-stale"}));
            delete.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
        })
    })
    .await
    .unwrap();
    assert_eq!(metrics.writes("slice_replace"), 1);
    assert_eq!(metrics.writes("slice_delete"), 1);
}

#[tokio::test]
async fn a_failed_write_is_reported_and_the_other_objects_are_still_written() {
    let (client, mut api) = ApiMock::new();
    let (writer, metrics) = writer(client);
    let snap = snapshot(vec![sandbox("a", &[]), sandbox("b", &[])]);
    let report = pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            api.expect(
                "PATCH",
                &format!("{SANDBOXES}/a/status?&fieldManager=redirect-controller"),
            )
            .await
            .fail(500, "InternalError");
            api.expect(
                "PATCH",
                &format!("{SANDBOXES}/b/status?&fieldManager=redirect-controller"),
            )
            .await
            .ok(json!({}));
            answer_event(api.expect("POST", &format!("{EVENTS}?")).await);
        })
    })
    .await
    .unwrap();
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].metric_label(), "status_patch");
    assert!(
        report.errors[0]
            .to_string()
            .starts_with("writing the status of Sandbox shop/a: "),
        "{}",
        report.errors[0]
    );
    assert_eq!(metrics.errors("status_patch"), 1);
    assert_eq!(report.writes, 1);
}

#[tokio::test]
async fn a_replica_that_does_not_lead_writes_nothing() {
    let (client, mut api) = ApiMock::new();
    let (_tx, standby) = Leadership::channel();
    let writer = Writer::new(
        client,
        "controller-1",
        standby,
        Arc::new(Metrics::default()),
    );
    let result = pass(
        &writer,
        &mut api,
        snapshot(vec![sandbox("sb", &[])]),
        &mut Memory::default(),
        |_| Box::pin(async {}),
    )
    .await;
    assert!(matches!(result, Err(ControllerError::NotLeader)));
}

#[tokio::test]
async fn a_sandbox_that_does_not_parse_is_reported_on_its_status_with_a_warning() {
    let (client, mut api) = ApiMock::new();
    let (writer, _) = writer(client);
    let mut snap = Snapshot::default();
    snap.bad_sandboxes.push(BadObject {
        meta: sandbox("broken", &[]).metadata,
        error: "spec: invalid type: string \"x\", expected a sequence".into(),
        status: None,
    });
    pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            let patch = api
                .expect(
                    "PATCH",
                    &format!("{SANDBOXES}/broken/status?&fieldManager=redirect-controller"),
                )
                .await;
            let valid = condition(&patch.body, "Valid");
            assert_eq!(valid["reason"], "InvalidSpec");
            assert_eq!(
                valid["message"],
                "Sandbox shop/broken does not match the Sandbox type: spec: invalid type: string \"x\", expected a sequence"
            );
            assert_eq!(patch.body["status"]["forks"], Value::Null, "cleared");
            patch.ok(json!({}));
            let event = api.expect("POST", &format!("{EVENTS}?")).await;
            assert_eq!(event.body["type"], "Warning");
            assert_eq!(event.body["reason"], "InvalidSpec");
            answer_event(event);
        })
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn route_group_status_goes_to_its_own_status_subresource() {
    let (client, mut api) = ApiMock::new();
    let (writer, _) = writer(client);
    let mut rg = RouteGroup::new(
        "release",
        crate::crd::RouteGroupSpec {
            routing_key: "release-1".into(),
            sandbox_selector: Default::default(),
        },
    );
    rg.metadata.namespace = Some("shop".into());
    rg.metadata.generation = Some(1);
    let mut snap = snapshot(vec![sandbox("sb", &[])]);
    let sb_status = plan(&snap, now()).sandboxes[0].status.clone();
    let mut sb = (*snap.store.sandboxes[0]).clone();
    sb.status = Some(sb_status);
    snap.store.sandboxes = vec![Arc::new(sb)];
    snap.store.route_groups.push(Arc::new(rg));
    pass(&writer, &mut api, snap, &mut Memory::default(), |api| {
        Box::pin(async move {
            let patch = api
                .expect(
                    "PATCH",
                    "/apis/redirect.dev/v1alpha1/namespaces/shop/routegroups/release/status?&fieldManager=redirect-controller",
                )
                .await;
            assert_eq!(patch.body["status"]["sandboxes"], 1);
            assert_eq!(condition(&patch.body, "Ready")["reason"], "SandboxesSelected");
            patch.ok(json!({}));
            answer_event(api.expect("POST", &format!("{EVENTS}?")).await);
        })
    })
    .await
    .unwrap();
}
