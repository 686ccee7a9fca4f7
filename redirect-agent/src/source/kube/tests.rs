//! The kube source against a scripted API (`tower-test`): the exact queries it sends, and what
//! it yields for lists, events, 410 Gone, a missing CRD and an unreadable object.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;

/// One request the source sent.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: BTreeMap<String, String>,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

/// What the scripted API answers to a request: a status and a body, or nothing yet (a watch
/// that stays open and quiet).
type Answer = Option<(StatusCode, String)>;

/// A scripted API server: `answer` decides each reply; watch bodies pushed on `watch_tx`
/// (resource path, body) answer the next watch of that path.
struct Api {
    seen: Arc<Mutex<Vec<Seen>>>,
    watch_tx: mpsc::UnboundedSender<(String, String)>,
}

impl Api {
    fn start(
        lists: impl Fn(&Seen) -> Answer + Send + 'static,
    ) -> (Client, Api, tokio::task::JoinHandle<()>) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<(String, String)>();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut queued: Vec<(String, String)> = Vec::new();
            let mut open: Vec<(String, tower_test::mock::SendResponse<Response<Body>>)> =
                Vec::new();
            loop {
                tokio::select! {
                    req = handle.next_request() => {
                        let Some((req, send)) = req else { return };
                        let s = seen_of(&req);
                        log.lock().unwrap().push(s.clone());
                        if s.is_watch() {
                            match queued.iter().position(|(p, _)| *p == s.path) {
                                Some(i) => {
                                    let (_, body) = queued.remove(i);
                                    send.send_response(reply(StatusCode::OK, body));
                                }
                                None => open.push((s.path.clone(), send)),
                            }
                        } else {
                            match lists(&s) {
                                Some((status, body)) => send.send_response(reply(status, body)),
                                None => open.push((s.path.clone(), send)),
                            }
                        }
                    }
                    w = watch_rx.recv() => {
                        let Some((path, body)) = w else { return };
                        match open.iter().position(|(p, _)| *p == path) {
                            Some(i) => {
                                let (_, send) = open.remove(i);
                                send.send_response(reply(StatusCode::OK, body));
                            }
                            None => queued.push((path, body)),
                        }
                    }
                }
            }
        });
        (Client::new(svc, "default"), Api { seen, watch_tx }, task)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn lists_of(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path == path && !s.is_watch())
            .count()
    }

    /// Ends the next (or current) watch of `path` with these events.
    fn events(&self, path: &str, events: &[Value]) {
        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
        self.watch_tx.send((path.to_string(), body)).unwrap();
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&[Seen]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f(&self.seen()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; requests: {:#?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn seen_of(req: &Request<Body>) -> Seen {
    let query = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.replace("%3D", "=").replace("%2F", "/"))
        })
        .collect();
    Seen {
        path: req.uri().path().to_string(),
        query,
    }
}

fn reply(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(body.into_bytes()))
        .unwrap()
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const SANDBOXES: &str = "/apis/redirect.dev/v1alpha1/sandboxes";
const ROUTE_GROUPS: &str = "/apis/redirect.dev/v1alpha1/routegroups";

fn list(kind: &str, api_version: &str, rv: u64, items: Vec<Value>) -> Answer {
    Some((
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": {"resourceVersion": rv.to_string()}, "items": items})
        .to_string(),
    ))
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": "3", "uid": format!("u-{name}")},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn sandbox(name: &str, key: Value) -> Value {
    json!({"apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": "4"},
           "spec": {"routingKey": key, "forks": [{"service": "checkout", "selector": {"app": "checkout-fx"}}]}})
}

/// Lists for every kind: one Service, one valid Sandbox (and `extra_sandboxes`).
fn standard_lists(extra_sandboxes: Vec<Value>) -> impl Fn(&Seen) -> Answer + Send + 'static {
    move |s: &Seen| match s.path.as_str() {
        SERVICES => list("Service", "v1", 10, vec![service("checkout", "10.96.0.10")]),
        SLICES => list("EndpointSlice", "discovery.k8s.io/v1", 10, vec![]),
        PODS => list("Pod", "v1", 10, vec![]),
        SANDBOXES => {
            let mut items = vec![sandbox("fx", json!("fx"))];
            items.extend(extra_sandboxes.iter().cloned());
            list("Sandbox", "redirect.dev/v1alpha1", 10, items)
        }
        ROUTE_GROUPS => list("RouteGroup", "redirect.dev/v1alpha1", 10, vec![]),
        _ => Some((StatusCode::NOT_FOUND, "{}".into())),
    }
}

fn config(debounce: Duration) -> KubeSourceConfig {
    KubeSourceConfig {
        node_name: "node-a".into(),
        debounce,
        page_size: 500,
    }
}

async fn snapshot(source: &mut KubeSource) -> Store {
    match tokio::time::timeout(Duration::from_secs(10), source.next()).await {
        Ok(Some(Update::Snapshot(store))) => store,
        Ok(other) => panic!("expected a snapshot, got {other:?}"),
        Err(_) => panic!(
            "no snapshot within 10 s; watches: {:#?}",
            source.health.watches()
        ),
    }
}

#[tokio::test]
async fn pods_are_listed_and_watched_for_this_node_only_with_bookmarks_from_the_list_version() {
    let (client, api, _task) = Api::start(standard_lists(vec![]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    let store = snapshot(&mut source).await;
    assert_eq!(store.services.len(), 1);
    assert_eq!(store.sandboxes.len(), 1);
    api.wait_for("a watch of every kind", |seen| {
        [SERVICES, SLICES, PODS, SANDBOXES, ROUTE_GROUPS]
            .iter()
            .all(|p| seen.iter().any(|s| s.path == *p && s.is_watch()))
    })
    .await;

    for s in api.seen().iter().filter(|s| s.path == PODS) {
        assert_eq!(
            s.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-a"),
            "{s:?}"
        );
    }
    let seen = api.seen();
    let pod_list = seen
        .iter()
        .find(|s| s.path == PODS && !s.is_watch())
        .unwrap();
    assert_eq!(pod_list.query.get("limit").map(String::as_str), Some("500"));
    let pod_watch = seen
        .iter()
        .find(|s| s.path == PODS && s.is_watch())
        .unwrap();
    assert_eq!(
        pod_watch.query.get("resourceVersion").map(String::as_str),
        Some("10"),
        "the watch starts where the list ended"
    );
    assert_eq!(
        pod_watch
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true")
    );
    for s in seen.iter().filter(|s| s.path != PODS) {
        assert!(
            !s.query.contains_key("fieldSelector") && !s.query.contains_key("labelSelector"),
            "only pods are scoped: {s:?}"
        );
    }
    let health = source.health().status();
    assert!(health.healthy, "{health:?}");
}

#[tokio::test]
async fn an_event_reaches_the_next_snapshot_without_a_relist() {
    let (client, api, _task) = Api::start(standard_lists(vec![]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    snapshot(&mut source).await;
    api.events(
        SERVICES,
        &[json!({"type": "ADDED", "object": service("catalog", "10.96.0.11")})],
    );
    let store = snapshot(&mut source).await;
    let names: Vec<_> = store
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["catalog", "checkout"]);
    assert_eq!(api.lists_of(SERVICES), 1, "no relist for an event");

    api.events(
        SERVICES,
        &[json!({"type": "DELETED", "object": service("checkout", "10.96.0.10")})],
    );
    let store = snapshot(&mut source).await;
    assert_eq!(store.services.len(), 1);
    assert_eq!(api.lists_of(SERVICES), 1);
}

#[tokio::test]
async fn a_burst_of_events_within_the_debounce_window_makes_one_snapshot() {
    let (client, api, _task) = Api::start(standard_lists(vec![]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(400)));
    snapshot(&mut source).await;
    let events: Vec<Value> = (0..20)
        .map(|i| json!({"type": "ADDED", "object": service(&format!("s{i:02}"), "10.96.1.1")}))
        .collect();
    api.events(SERVICES, &events[..10]);
    api.events(SERVICES, &events[10..]);
    let store = snapshot(&mut source).await;
    assert_eq!(
        store.services.len(),
        21,
        "both watch batches land in the one snapshot at the end of the window"
    );
}

#[tokio::test]
async fn a_change_is_kept_when_the_call_waiting_out_its_debounce_window_is_dropped() {
    // The agent's loop selects between the source and its resync timer, so a call of `next()`
    // can be dropped while it waits for the end of the debounce window.
    let (client, api, _task) = Api::start(standard_lists(vec![]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(1500)));
    snapshot(&mut source).await;
    api.events(
        SERVICES,
        &[json!({"type": "ADDED", "object": service("catalog", "10.96.0.11")})],
    );
    let arrived = || {
        source
            .health()
            .watches()
            .iter()
            .any(|w| w.kind == "Service" && w.objects == 2)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !arrived() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dropped = tokio::time::timeout(Duration::from_millis(50), source.next()).await;
    assert!(
        dropped.is_err(),
        "still within the window of the first snapshot"
    );

    let store = snapshot(&mut source).await;
    assert_eq!(
        store.services.len(),
        2,
        "the change the dropped call had taken is in the next snapshot"
    );
}

#[tokio::test]
async fn a_410_gone_makes_the_watch_relist_and_the_relist_replaces_the_cache() {
    let (client, api, _task) = Api::start(standard_lists(vec![]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    snapshot(&mut source).await;
    api.events(
        SERVICES,
        &[json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                  "message": "too old resource version: 10 (20)", "reason": "Expired", "code": 410}})],
    );
    api.wait_for("a second list of services", |seen| {
        seen.iter()
            .filter(|s| s.path == SERVICES && !s.is_watch())
            .count()
            == 2
    })
    .await;
    let w = source
        .health()
        .watches()
        .into_iter()
        .find(|w| w.kind == "Service")
        .unwrap();
    assert!(w.errors_total >= 1, "{w:?}");
}

#[tokio::test]
async fn a_missing_sandbox_crd_is_named_and_the_other_kinds_are_served() {
    let lists = |s: &Seen| match s.path.as_str() {
        SANDBOXES | ROUTE_GROUPS => Some((
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "the server could not find the requested resource",
                   "reason": "NotFound", "code": 404})
            .to_string(),
        )),
        _ => standard_lists(vec![])(s),
    };
    let (client, _api, _task) = Api::start(lists);
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    let store = snapshot(&mut source).await;
    assert_eq!(store.services.len(), 1, "the other kinds are served");
    assert!(store.sandboxes.is_empty());
    let status = source.health().status();
    assert!(
        status
            .message
            .contains("Sandbox and RouteGroup CRD is not installed"),
        "{}",
        status.message
    );
    assert!(
        status
            .watches
            .iter()
            .any(|w| w.kind == "Sandbox" && w.crd_missing)
    );
}

#[tokio::test]
async fn a_sandbox_that_does_not_fit_the_types_is_skipped_and_named_and_the_rest_routes() {
    let (client, _api, _task) = Api::start(standard_lists(vec![
        sandbox("wrong-type", json!(42)),
        sandbox("bad-key", json!("a key with spaces")),
    ]));
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    let store = snapshot(&mut source).await;
    let names: Vec<_> = store
        .sandboxes
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["fx"]);
    let sb = source
        .health()
        .watches()
        .into_iter()
        .find(|w| w.kind == "Sandbox")
        .unwrap();
    assert_eq!(
        sb.skipped.keys().collect::<Vec<_>>(),
        ["shop/bad-key", "shop/wrong-type"]
    );
    assert!(sb.skipped["shop/bad-key"].contains("invalid routing key"));
    assert!(sb.skipped["shop/wrong-type"].contains("does not match the CRD's types"));
}

#[tokio::test]
async fn nothing_is_yielded_before_every_watch_has_listed_once() {
    // Pods never answer: no snapshot, and the health says what it waits for.
    let lists = |s: &Seen| match s.path.as_str() {
        PODS => None,
        _ => standard_lists(vec![])(s),
    };
    let (client, _api, _task) = Api::start(lists);
    let mut source = KubeSource::start(client, &config(Duration::from_millis(20)));
    let got = tokio::time::timeout(Duration::from_millis(500), source.next()).await;
    assert!(got.is_err(), "no snapshot without the pods' list");
    let status = source.health().status();
    assert!(!status.healthy);
    assert!(
        status.message.contains("waiting for the first list"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn a_paged_list_follows_continue_tokens_and_the_snapshot_holds_every_page() {
    let lists = |s: &Seen| match (s.path.as_str(), s.query.get("continue").map(String::as_str)) {
        (SERVICES, None) => Some((
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "ServiceList",
                   "metadata": {"resourceVersion": "10", "continue": "page-2"},
                   "items": [service("a-first", "10.96.0.1")]})
            .to_string(),
        )),
        (SERVICES, Some("page-2")) => {
            list("Service", "v1", 10, vec![service("b-second", "10.96.0.2")])
        }
        (SERVICES, Some(other)) => panic!("unexpected continue token {other}"),
        _ => standard_lists(vec![])(s),
    };
    let (client, api, _task) = Api::start(lists);
    let mut source = KubeSource::start(
        client,
        &KubeSourceConfig {
            page_size: 1,
            ..config(Duration::from_millis(20))
        },
    );
    let store = snapshot(&mut source).await;
    let names: Vec<_> = store
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a-first", "b-second"]);
    let pages: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.path == SERVICES && !s.is_watch())
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages[0].query.get("limit").map(String::as_str), Some("1"));
    assert_eq!(
        pages[1].query.get("continue").map(String::as_str),
        Some("page-2")
    );
}
