//! End to end with the kube source only: the real agent watches an API server stand-in (real
//! HTTP, real watch semantics) that mirrors the scene's manifests. What the API server does
//! (goes away, compacts its history, lacks the CRDs, serves an unreadable object) must never
//! cost a route that was good. The scenarios shared with the manifest source are in `e2e.rs`.

use std::time::{Duration, Instant};

use redirect_tests::{MiniCluster, agent::SourceMode, scene::*};
use serde_json::Value;

const TOOLS: &[&str] = &["curl", "python3"];

/// `GET /status` of the agent's admin endpoint (in the node netns).
fn status(mc: &MiniCluster) -> Value {
    mc.node().admin_status().unwrap()
}

fn watches(s: &Value) -> Vec<Value> {
    s["source"]["watches"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `f` every 100 ms for at most `timeout`.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fork_pod_reaches(shop: &Shop<'_>, want: &str) -> bool {
    get(&shop.frontend_fork, CHECKOUT_VIP4, "").is_ok_and(|b| b == want)
}

#[test]
fn a_sandbox_created_in_the_api_routes_from_its_watch_event_and_pods_are_watched_for_this_node_only()
 {
    let Some(mc) = MiniCluster::new_or_skip("kube_event_routes", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, false, SourceMode::Kube).unwrap();
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
    shop.add_sandbox().unwrap();
    // Not a generation number: other watch events may be synced (with nothing to apply) before
    // the sandbox's.
    eventually(
        "the sandbox's fork reached",
        Duration::from_secs(20),
        || fork_pod_reaches(&shop, "checkout-fork\n"),
    );
    assert!(through_router(&shop.client, CHECKOUT_VIP4).unwrap());

    let requests = api.requests();
    let lists = |plural: &str| requests.iter().filter(|r| r.is_list_of(plural)).count();
    assert_eq!(
        lists("sandboxes"),
        1,
        "the new sandbox came as an event, not a relist"
    );
    let pods: Vec<_> = requests
        .iter()
        .filter(|r| r.is_list_of("pods") || r.is_watch_of("pods"))
        .collect();
    assert!(pods.len() >= 2, "a list and a watch of pods: {pods:?}");
    for r in pods {
        assert_eq!(
            r.param("fieldSelector"),
            Some("spec.nodeName=mini-node"),
            "{r:?}"
        );
    }
    for r in requests.iter().filter(|r| r.is_watch()) {
        assert_eq!(r.param("allowWatchBookmarks"), Some("true"), "{r:?}");
    }
}

#[test]
fn with_the_api_server_down_the_last_good_state_keeps_routing_and_status_says_so() {
    let Some(mc) = MiniCluster::new_or_skip("kube_api_down", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    assert!(watches(&status(&mc)).iter().all(|w| w["connected"] == true));

    api.set_down(true);
    eventually(
        "a watch reported disconnected",
        Duration::from_secs(20),
        || {
            watches(&status(&mc))
                .iter()
                .any(|w| w["connected"] == false)
        },
    );
    let s = status(&mc);
    let message = s["source"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("last good state stays in force"), "{s}");
    assert_eq!(
        s["ready"], true,
        "still ready: the kernel path keeps working"
    );
    // Both paths keep routing with the last good state.
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    assert!(through_router(&shop.client, CHECKOUT_VIP4).unwrap());

    // A change made while the agent cannot see it arrives once the server is back.
    shop.remove_sandbox().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(fork_pod_reaches(&shop, "checkout-fork\n"));
    api.set_down(false);
    eventually(
        "the sandbox removal reached the maps after the outage",
        Duration::from_secs(60),
        || fork_pod_reaches(&shop, "checkout-base\n"),
    );
    // A watch that resumed without an event is known to be established once no error came
    // for longer than the longest retry backoff (35 s).
    eventually(
        "every watch connected again",
        Duration::from_secs(90),
        || status(&mc)["source"]["healthy"] == true,
    );
}

#[test]
fn after_the_api_server_compacts_its_history_the_agent_relists_and_converges() {
    let Some(mc) = MiniCluster::new_or_skip("kube_compaction", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    let sandbox_lists = || {
        api.requests()
            .iter()
            .filter(|r| r.is_list_of("sandboxes"))
            .count()
    };
    assert_eq!(sandbox_lists(), 1);
    // The sandbox goes while the watches are cut, and the history that would tell them is
    // compacted away: resuming from their version answers 410 Gone.
    api.set_down(true);
    shop.remove_sandbox().unwrap();
    eventually(
        "the mirror deleted the sandbox",
        Duration::from_secs(10),
        || {
            api.get("redirect.dev/v1alpha1", "Sandbox", "default", SANDBOX_KEY)
                .is_none()
        },
    );
    api.compact();
    api.set_down(false);
    eventually("a relist of sandboxes", Duration::from_secs(60), || {
        sandbox_lists() >= 2
    });
    eventually(
        "the relist removed the sandbox's routes",
        Duration::from_secs(20),
        || fork_pod_reaches(&shop, "checkout-base\n"),
    );
}

#[test]
fn without_the_crds_the_agent_serves_the_other_kinds_names_the_fix_and_picks_them_up_later() {
    let Some(mc) = MiniCluster::new_or_skip("kube_no_crds", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::KubeWithoutCrds).unwrap();
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    shop.agent()
        .wait_log("the Sandbox CRD is not installed", Duration::from_secs(20))
        .unwrap();
    assert!(
        shop.agent()
            .log()
            .contains("kubectl apply -f deploy/crds.yaml")
    );
    let s = status(&mc);
    assert_eq!(s["ready"], true, "{s}");
    assert!(
        watches(&s)
            .iter()
            .any(|w| w["kind"] == "Sandbox" && w["crd_missing"] == true),
        "{s}"
    );
    assert!(fork_pod_reaches(&shop, "checkout-base\n"));

    api.install_crds();
    eventually(
        "the sandbox routes once its CRD is installed",
        Duration::from_secs(60),
        || fork_pod_reaches(&shop, "checkout-fork\n"),
    );
}

#[test]
fn an_unreadable_sandbox_is_skipped_by_name_and_the_rest_keeps_routing() {
    let Some(mc) = MiniCluster::new_or_skip("kube_bad_object", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    // An API server with the CRD's schema would refuse it; one without (or an older CRD) may
    // serve it anyway.
    api.apply_json(serde_json::json!({
        "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"routingKey": "bad key!", "forks": [{"service": "checkout", "selector": {"app": "x"}}]}
    }))
    .unwrap();
    shop.agent()
        .wait_log("object skipped", Duration::from_secs(20))
        .unwrap();
    let log = shop.agent().log();
    let line = log.lines().find(|l| l.contains("object skipped")).unwrap();
    assert!(
        line.contains("default/broken") && line.contains("invalid routing key"),
        "{line}"
    );
    let s = status(&mc);
    let sandbox = watches(&s)
        .into_iter()
        .find(|w| w["kind"] == "Sandbox")
        .unwrap();
    assert!(sandbox["skipped"]["default/broken"].is_string(), "{s}");
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
}
