//! Upgrades drop nothing: the agent is rolled the way its DaemonSet rolls it (`maxSurge: 1`: the
//! new agent starts beside the old one on the same pins, binds the router address with
//! `SO_REUSEPORT` and takes the liveness slot once its tables are complete; the old one gets
//! SIGTERM, stops accepting and drains) while clients keep calling a forked service with and
//! without the routing key. Every connect must succeed, every request must be answered, and
//! every answer must come from where its key says.

use std::time::Duration;

use redirect_tests::{MiniCluster, agent::SourceMode, scene::*};

const TOOLS: &[&str] = &["curl", "python3"];

/// Three clients in one process, for `seconds`: a new connection per request without the key,
/// the same with the key, and one keep-alive connection alternating both (which reconnects
/// once when the server closed it between requests, as every HTTP client does; a request that
/// fails after that counts as failed). Prints counts as JSON.
const ROLL_CLIENTS: &str = r#"
import http.client, json, socket, sys, threading, time
host, seconds = sys.argv[1], float(sys.argv[2])
KEY = {"x-routing-key": "feature-x"}
res = {"requests": 0, "connect_failed": 0, "failed": 0, "misrouted": 0, "reconnects": 0, "errors": []}
lock = threading.Lock()
def count(field, err=None):
    with lock:
        res[field] += 1
        if err is not None and len(res["errors"]) < 20:
            res["errors"].append(err)
def check(body, keyed):
    want = "checkout-fork" if keyed else "checkout-base"
    count("requests")
    if body.strip() != want:
        count("misrouted", f"keyed={keyed} got {body.strip()!r}")
def per_connection(keyed):
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            c = http.client.HTTPConnection(host, 80, timeout=5)
            c.connect()
        except OSError as e:
            count("connect_failed", f"connect: {e}"); time.sleep(0.005); continue
        try:
            c.request("GET", "/", headers=dict(KEY if keyed else {}, Connection="close"))
            check(c.getresponse().read().decode(), keyed)
        except (OSError, http.client.HTTPException) as e:
            count("failed", f"keyed={keyed}: {e!r}")
        c.close()
        time.sleep(0.005)
def keep_alive():
    start = time.monotonic()
    c = http.client.HTTPConnection(host, 80, timeout=5)
    keyed = False
    while time.monotonic() - start < seconds:
        keyed = not keyed
        for attempt in (0, 1):
            try:
                c.request("GET", "/", headers=dict(KEY) if keyed else {})
                check(c.getresponse().read().decode(), keyed)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                c.close(); c = http.client.HTTPConnection(host, 80, timeout=5)
                if attempt == 1:
                    count("failed", f"keep-alive keyed={keyed}: {e!r}")
                else:
                    count("reconnects")
            except (OSError, http.client.HTTPException) as e:
                count("failed", f"keep-alive keyed={keyed}: {e!r}")
                c.close(); c = http.client.HTTPConnection(host, 80, timeout=5)
                break
        time.sleep(0.005)
threads = [threading.Thread(target=per_connection, args=(False,)),
           threading.Thread(target=per_connection, args=(True,)),
           threading.Thread(target=keep_alive)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(res))
"#;

#[test]
fn an_upgrade_and_a_rollback_refuse_no_connection_fail_no_request_and_misroute_nothing() {
    let Some(mc) = MiniCluster::new_or_skip("rollout", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    let script = mc.workdir().join("roll_clients.py");
    std::fs::write(&script, ROLL_CLIENTS).unwrap();
    let seconds = 12;
    let mut clients = shop
        .client
        .spawn(&[
            "python3",
            script.to_str().unwrap(),
            CHECKOUT_VIP4,
            &seconds.to_string(),
        ])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let upgrade = shop.agent().roll(&mc, Duration::from_secs(40)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let rollback = shop.agent().roll(&mc, Duration::from_secs(40)).unwrap();
    clients
        .wait_timeout(Duration::from_secs(seconds + 30))
        .unwrap()
        .expect("the clients finished");
    let log = clients.log();
    let res: serde_json::Value =
        serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("{e}: {log}"));
    println!(
        "rollout: {res} (old agent drained and exited in {upgrade:?} on upgrade, {rollback:?} on rollback)"
    );
    assert!(res["requests"].as_u64().unwrap() > 300, "{res}");
    for field in ["connect_failed", "failed", "misrouted"] {
        assert_eq!(res[field], 0, "{field}: {res}\n{}", shop.agent().log());
    }
    // Both handovers happened: three agents ran, two drained on SIGTERM.
    let agent_log = shop.agent().log();
    assert_eq!(
        agent_log.matches("router started").count(),
        3,
        "{agent_log}"
    );
    assert_eq!(
        agent_log.matches("draining the router").count(),
        2,
        "{agent_log}"
    );
}
