//! Rolling the agent under load, the way its DaemonSet rolls it (`maxSurge: 1`: the new agent
//! starts beside the old one on the same pins, binds the router address with `SO_REUSEPORT` and
//! takes the liveness slot once its tables are complete; the old one gets SIGTERM, stops
//! accepting and drains), while clients keep calling a forked service with and without the
//! routing key.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{MiniCluster, scene::*};

/// Three clients in one process, for `seconds`: a new connection per request without the key,
/// the same with the key, and one keep-alive connection alternating both (which reconnects
/// once when the server closed it between requests, as every HTTP client does; a request that
/// fails after that counts as failed). Prints counts as JSON.
pub const ROLL_CLIENTS: &str = r#"
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

/// What the clients saw during an upgrade and a rollback.
#[derive(Debug)]
pub struct RolloutFigures {
    /// The clients' counts: `requests`, `connect_failed`, `failed`, `misrouted`, `reconnects`.
    pub clients: Value,
    /// How long the old agent took to exit after SIGTERM, on upgrade and on rollback.
    pub upgrade: Duration,
    pub rollback: Duration,
}

/// Runs the clients for `seconds` and rolls the shop's agent twice (upgrade, then rollback)
/// while they run.
pub fn upgrade_and_roll_back(
    mc: &MiniCluster,
    shop: &mut Shop<'_>,
    seconds: u64,
) -> Result<RolloutFigures> {
    let script = mc.workdir().join("roll_clients.py");
    std::fs::write(&script, ROLL_CLIENTS)?;
    let mut clients = shop.client.spawn(&[
        "python3",
        script.to_str().context("script path")?,
        CHECKOUT_VIP4,
        &seconds.to_string(),
    ])?;
    std::thread::sleep(Duration::from_secs(2));
    let upgrade = shop.agent().roll(mc, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let rollback = shop.agent().roll(mc, Duration::from_secs(60))?;
    clients
        .wait_timeout(Duration::from_secs(seconds + 30))?
        .context("the clients did not finish")?;
    let log = clients.log();
    let clients: Value =
        serde_json::from_str(log.trim()).with_context(|| format!("client output: {log}"))?;
    Ok(RolloutFigures {
        clients,
        upgrade,
        rollback,
    })
}

/// Asserts that nothing was refused, failed or misrouted, and that both handovers happened.
pub fn assert_dropped_nothing(f: &RolloutFigures, agent_log: &str) {
    let res = &f.clients;
    assert!(res["requests"].as_u64().unwrap_or(0) > 300, "{res}");
    for field in ["connect_failed", "failed", "misrouted"] {
        assert_eq!(res[field], 0, "{field}: {res}\n{agent_log}");
    }
    assert_eq!(
        agent_log.matches("router started").count(),
        3,
        "three agents ran:\n{agent_log}"
    );
    assert_eq!(
        agent_log.matches("draining the router").count(),
        2,
        "two drained on SIGTERM:\n{agent_log}"
    );
}
