//! `redirect-agent controller` against the API server stand-in, over real HTTP with the real
//! kube client: status conditions, Events, TTL deletion, fork slices, and the Lease handed
//! over between two controllers (one process, two identities) when the first one stops.
//! Needs no privileges.

use std::future::Future;
use std::time::{Duration, Instant};

use redirect_agent::controller::{ControllerArgs, run};
use redirect_agent::forkslice::{MANAGED_BY, MANAGED_BY_LABEL};
use redirect_tests::apiserver::ApiServer;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NS: &str = "shop";
const SANDBOX: (&str, &str) = ("redirect.dev/v1alpha1", "Sandbox");
const LEASE: (&str, &str) = ("coordination.k8s.io/v1", "Lease");
const SLICE: (&str, &str) = ("discovery.k8s.io/v1", "EndpointSlice");
const EVENT: (&str, &str) = ("events.k8s.io/v1", "Event");

/// A controller running on the test's runtime; `stop()` fires its shutdown future.
struct Controller {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Controller {
    async fn start(api: &ApiServer, identity: &str) -> Controller {
        let config = kube::Config::new(api.url().parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let args = ControllerArgs {
            namespace: "redirect-system".into(),
            identity: Some(identity.into()),
            lease_duration: Duration::from_secs(3),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            ..ControllerArgs::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(args, client, async {
                let _ = stopped.await;
            })
            .await
            .expect("the controller runs until stopped");
        });
        Controller {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the controller stops within 10 s")
            .unwrap();
    }
}

/// Polls `f` until it returns Some, for at most 15 s.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn sandbox(name: &str, key: &str, forks: &[&str], ttl: Option<&str>) -> Value {
    let forks: Vec<Value> = forks
        .iter()
        .map(|s| json!({"service": s, "selector": {"app": format!("{s}-fx")}}))
        .collect();
    let mut spec = json!({"routingKey": key, "forks": forks});
    if let Some(ttl) = ttl {
        spec["ttl"] = json!(ttl);
    }
    json!({"apiVersion": SANDBOX.0, "kind": SANDBOX.1,
           "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}

fn pod(name: &str, fork_of: &str, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "labels": {"app": format!("{fork_of}-fx")}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn get_sandbox(api: &ApiServer, name: &str) -> Option<Value> {
    api.get(SANDBOX.0, SANDBOX.1, NS, name)
}

fn events_about(api: &ApiServer, name: &str) -> Vec<Value> {
    api.list(EVENT.0, EVENT.1)
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .collect()
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    api.get(LEASE.0, LEASE.1, "redirect-system", "redirect-controller")?
        .pointer("/spec/holderIdentity")?
        .as_str()
        .map(str::to_string)
}

async fn with_timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_gets_status_conditions_events_and_fork_slices() {
    with_timeout(async {
        let api = ApiServer::start().unwrap();
        api.apply_json(service("checkout")).unwrap();
        api.apply_json(pod("checkout-fx-1", "checkout", "10.1.0.5", "node-b"))
            .unwrap();
        let created = api
            .apply_json(sandbox("feature-x", "feature-x", &["checkout"], None))
            .unwrap();
        let controller = Controller::start(&api, "controller-0").await;

        let sb = eventually("Ready=True on the sandbox", || {
            let sb = get_sandbox(&api, "feature-x")?;
            (condition(&sb, "Ready")?["status"] == "True").then_some(sb)
        })
        .await;
        let valid = condition(&sb, "Valid").unwrap();
        assert_eq!(valid["status"], "True");
        assert_eq!(valid["reason"], "Validated");
        assert_eq!(sb["status"]["observedGeneration"], 1);
        assert_eq!(
            sb["status"]["forks"],
            json!([{"service": "checkout", "namespace": NS, "readyEndpoints": 1}])
        );
        assert_eq!(sb["status"]["readyEndpoints"], 1);

        let slices = eventually("the fork slice", || {
            let s = api.list(SLICE.0, SLICE.1);
            (!s.is_empty()).then_some(s)
        })
        .await;
        assert_eq!(slices.len(), 1);
        let slice = &slices[0];
        assert_eq!(slice["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            slice["metadata"]["labels"]["redirect.dev/fork-of"],
            "checkout"
        );
        assert!(
            slice["metadata"]["labels"]
                .get("kubernetes.io/service-name")
                .is_none()
        );
        assert_eq!(
            slice["metadata"]["ownerReferences"][0]["uid"],
            created["metadata"]["uid"]
        );
        assert_eq!(
            slice["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        assert_eq!(slice["endpoints"][0]["nodeName"], "node-b");

        let events = eventually("the Ready event", || {
            let e = events_about(&api, "feature-x");
            e.iter().any(|e| e["reason"] == "Ready").then_some(e)
        })
        .await;
        let ready = events.iter().find(|e| e["reason"] == "Ready").unwrap();
        assert_eq!(ready["type"], "Normal");
        assert_eq!(ready["reportingInstance"], "controller-0");

        // Deleting the sandbox takes its slices along (owner references).
        api.delete(SANDBOX.0, SANDBOX.1, NS, "feature-x").unwrap();
        assert!(api.list(SLICE.0, SLICE.1).is_empty());
        controller.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_claimed_twice_is_a_key_conflict_on_the_later_sandbox() {
    with_timeout(async {
        let api = ApiServer::start().unwrap();
        api.apply_json(sandbox("a-first", "shared", &[], None))
            .unwrap();
        api.apply_json(sandbox("b-second", "shared", &[], None))
            .unwrap();
        let controller = Controller::start(&api, "controller-0").await;
        let loser = eventually("KeyConflict on b-second", || {
            let c = condition(&get_sandbox(&api, "b-second")?, "Valid")?;
            (c["reason"] == "KeyConflict").then_some(c)
        })
        .await;
        assert_eq!(loser["status"], "False");
        assert!(
            loser["message"]
                .as_str()
                .unwrap()
                .contains("already used by Sandbox shop/a-first"),
            "{loser}"
        );
        let winner = condition(&get_sandbox(&api, "a-first").unwrap(), "Valid").unwrap();
        assert_eq!(winner["status"], "True");
        // A route group reusing the key loses it to the sandboxes (the node agents' rule).
        api.apply_json(serde_json::json!({
            "apiVersion": "redirect.dev/v1alpha1", "kind": "RouteGroup",
            "metadata": {"name": "group", "namespace": "shop"},
            "spec": {"routingKey": "shared", "sandboxSelector": {}}
        }))
        .unwrap();
        let group = eventually("the route group's Valid condition", || {
            let g = api.get("redirect.dev/v1alpha1", "RouteGroup", "shop", "group")?;
            condition(&g, "Valid")
        })
        .await;
        assert_eq!(
            (group["status"].as_str(), group["reason"].as_str()),
            (Some("False"), Some("KeyConflict")),
            "{group}"
        );
        eventually("a KeyConflict warning event", || {
            events_about(&api, "b-second")
                .iter()
                .any(|e| e["reason"] == "KeyConflict" && e["type"] == "Warning")
                .then_some(())
        })
        .await;
        controller.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_is_deleted_when_its_ttl_passes() {
    with_timeout(async {
        let api = ApiServer::start().unwrap();
        api.apply_json(sandbox("short", "short", &[], Some("2s")))
            .unwrap();
        api.apply_json(sandbox("long", "long", &[], Some("1h")))
            .unwrap();
        let controller = Controller::start(&api, "controller-0").await;
        let start = Instant::now();
        eventually("the status of the short-lived sandbox", || {
            condition(&get_sandbox(&api, "short")?, "Ready")
        })
        .await;
        eventually("the expired sandbox to be deleted", || {
            get_sandbox(&api, "short").is_none().then_some(())
        })
        .await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "deleted at its expiry, not at a resync"
        );
        assert!(get_sandbox(&api, "long").is_some());
        eventually("the Expired event", || {
            events_about(&api, "short")
                .iter()
                .any(|e| e["reason"] == "Expired")
                .then_some(())
        })
        .await;
        controller.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_passes_to_the_standby_when_the_leader_stops() {
    with_timeout(async {
        let api = ApiServer::start().unwrap();
        let first = Controller::start(&api, "controller-a").await;
        eventually("controller-a to lead", || {
            (lease_holder(&api).as_deref() == Some("controller-a")).then_some(())
        })
        .await;
        let second = Controller::start(&api, "controller-b").await;
        // The standby leaves the Lease alone while the leader renews it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(lease_holder(&api).as_deref(), Some("controller-a"));

        let stopped = Instant::now();
        first.stop().await;
        eventually("controller-b to take over", || {
            (lease_holder(&api).as_deref() == Some("controller-b")).then_some(())
        })
        .await;
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "a released Lease is taken at the standby's next look, not at expiry"
        );
        let lease = api
            .get(LEASE.0, LEASE.1, "redirect-system", "redirect-controller")
            .unwrap();
        assert_eq!(lease["spec"]["leaseTransitions"], 1);

        // The new leader writes.
        api.apply_json(sandbox("after", "after", &[], None))
            .unwrap();
        eventually("the new leader's status write", || {
            condition(&get_sandbox(&api, "after")?, "Valid")
        })
        .await;
        eventually("the new leader's event", || {
            events_about(&api, "after")
                .iter()
                .any(|e| e["reportingInstance"] == "controller-b")
                .then_some(())
        })
        .await;
        second.stop().await;
        assert_eq!(lease_holder(&api), None, "released on shutdown");
    })
    .await;
}
