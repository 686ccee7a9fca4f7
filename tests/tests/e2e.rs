//! End to end: the real agent, real eBPF programs, real sockets between network namespaces.
//! Every test skips with a message when not root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use redirect_common::Reason;
use redirect_tests::{
    CgroupLayout, MiniCluster, ROUTER_IP4, ROUTER_IP6,
    agent::{ROUTER_PORT, SourceMode, read_counters},
    bpf_objects::PinnedObjects,
    kernel::{delta, expect_kernel_agrees, predict},
    scene::*,
};

const TOOLS: &[&str] = &["curl", "bpftool", "python3"];

/// The same scenario with the agent on each source: the manifest directory, and the Kubernetes
/// API (a stand-in server mirroring the directory); the outcomes must be the same.
macro_rules! on_both_sources {
    ($($name:ident),* $(,)?) => {
        mod manifests {
            $(#[test]
            fn $name() {
                super::$name(redirect_tests::agent::SourceMode::Manifests)
            })*
        }
        mod kube {
            $(#[test]
            fn $name() {
                super::$name(redirect_tests::agent::SourceMode::Kube)
            })*
        }
    };
}

on_both_sources!(
    without_a_sandbox_traffic_reaches_baseline_untouched,
    fork_pod_reaches_the_fork_in_the_kernel_and_baseline_for_unforked_services,
    baseline_pod_reaches_a_forked_service_through_the_router_which_recovers_the_destination,
    agent_sigkill_fails_open_and_a_restart_restores_routes_from_pins_then_reconciles,
    removing_the_sandbox_removes_its_routes,
);

fn sa(ip: &str, port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    SocketAddr::new(ip, port)
}

/// GET from `pod` to `ip`, checking the kernel's decision against the routing module's.
fn get_checked(
    shop: &Shop<'_>,
    pod: &redirect_tests::Pod<'_>,
    ip: &str,
    path: &str,
) -> (String, Reason) {
    let pin_dir = shop.agent.as_ref().unwrap().pin_dir.clone();
    let mut body = String::new();
    let d = expect_kernel_agrees(&pin_dir, pod, sa(ip, 80), || {
        body = get(pod, ip, path)?;
        Ok(())
    })
    .unwrap();
    (body, d.reason)
}

fn without_a_sandbox_traffic_reaches_baseline_untouched(source: SourceMode) {
    let Some(mc) = MiniCluster::new_or_skip(&format!("without_a_sandbox_{source:?}"), TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_on(&mc, false, source).unwrap();
    for ip in [CHECKOUT_VIP4, CHECKOUT_VIP6] {
        let (body, reason) = get_checked(&shop, &shop.client, ip, "");
        assert_eq!(body, "checkout-base\n");
        assert_eq!(reason, Reason::NotForked);
        let peer = get(&shop.client, ip, "peer").unwrap();
        assert!(
            peer.contains(&shop.client.ip4().to_string())
                || peer.contains(&shop.client.ip6().to_string()),
            "{peer}"
        );
    }
    let c = shop.agent.as_ref().unwrap().counters().unwrap();
    assert!(c["not_forked"] >= 4, "{c:?}");
    assert_eq!(c["to_router"] + c["origin_fork"], 0, "{c:?}");
}

fn fork_pod_reaches_the_fork_in_the_kernel_and_baseline_for_unforked_services(source: SourceMode) {
    let Some(mc) = MiniCluster::new_or_skip(&format!("fork_pod_origin_routing_{source:?}"), TOOLS)
    else {
        return;
    };
    let shop = Shop::with_agent_on(&mc, true, source).unwrap();
    for (checkout, catalog) in [(CHECKOUT_VIP4, CATALOG_VIP4), (CHECKOUT_VIP6, CATALOG_VIP6)] {
        let (body, reason) = get_checked(&shop, &shop.frontend_fork, checkout, "");
        assert_eq!(
            (body.as_str(), reason),
            ("checkout-fork\n", Reason::OriginFork)
        );
        // The fork sees the fork pod itself as its peer: no router on this path.
        let peer = get(&shop.frontend_fork, checkout, "peer").unwrap();
        let fork_ip = if checkout.contains(':') {
            format!("[{}]", shop.frontend_fork.ip6())
        } else {
            shop.frontend_fork.ip4().to_string()
        };
        assert!(peer.starts_with(&fork_ip), "peer {peer}, want {fork_ip}");
        let (body, reason) = get_checked(&shop, &shop.frontend_fork, catalog, "");
        assert_eq!(
            (body.as_str(), reason),
            ("catalog-base\n", Reason::NotForked)
        );
    }
}

fn baseline_pod_reaches_a_forked_service_through_the_router_which_recovers_the_destination(
    source: SourceMode,
) {
    let Some(mc) = MiniCluster::new_or_skip(&format!("baseline_pod_via_router_{source:?}"), TOOLS)
    else {
        return;
    };
    let shop = Shop::with_agent_on(&mc, true, source).unwrap();
    for ip in [CHECKOUT_VIP4, CHECKOUT_VIP6] {
        let (body, reason) = get_checked(&shop, &shop.client, ip, "");
        // The passthrough router forwards to the original destination: baseline.
        assert_eq!(
            (body.as_str(), reason),
            ("checkout-base\n", Reason::ToRouter)
        );
        assert!(
            through_router(&shop.client, ip).unwrap(),
            "{ip}: not through the router"
        );
    }
    // IPv4-mapped destination on an IPv6 socket: redirected to the IPv4 router, and the router
    // still finds the original destination.
    let pin_dir = shop.agent.as_ref().unwrap().pin_dir.clone();
    let mapped = sa(&format!("::ffff:{CHECKOUT_VIP4}"), 80);
    expect_kernel_agrees(&pin_dir, &shop.client, mapped, || {
        assert!(through_router(
            &shop.client,
            &format!("::ffff:{CHECKOUT_VIP4}")
        )?);
        Ok(())
    })
    .unwrap();
    // An unforked service stays off the router.
    let (body, reason) = get_checked(&shop, &shop.client, CATALOG_VIP4, "");
    assert_eq!(
        (body.as_str(), reason),
        ("catalog-base\n", Reason::NotForked)
    );
    // Before Linux 5.14 the router took those destinations with its lookup-then-delete
    // fallback; before 5.11, or where the kernel refuses tracing programs, sock_ops records
    // them. Each fallback is named, and a kernel that needs none gets none.
    let st = status(&mc);
    let names: Vec<&str> = st["kernel_fallbacks"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    let fentry = fentry_expected();
    let mut want = Vec::new();
    if kernel_before(5, 14) {
        want.push("conns_v1: lookup, then delete");
    }
    if !fentry {
        want.push("record hook: redirect_sock_ops on every socket below the cgroup root");
    }
    assert_eq!(names.len(), want.len(), "{st:#}");
    for (name, want) in names.iter().zip(&want) {
        assert!(name.starts_with(want), "{name} is not {want}: {st:#}");
    }
    let hook = if fentry {
        redirect_common::PROG_TCP_CONNECT
    } else {
        redirect_common::PROG_SOCK_OPS
    };
    assert_eq!(st["record_hook"], hook, "{st:#}");
}

/// Both record hooks hand router-bound connections to the router, and each takes over from the
/// other on a restart: the new hook is attached before the old one's pin goes. `--record-hook
/// fentry` where the kernel refuses it stops the agent with the reason, the pins as they were.
#[test]
fn either_record_hook_hands_connections_to_the_router_and_takes_over_from_the_other() {
    use redirect_common::{PROG_SOCK_OPS, PROG_TCP_CONNECT, RECORD_PROGRAMS};
    let Some(mc) = MiniCluster::new_or_skip("record_hooks", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_args(&mc, true, &["--record-hook", "sock-ops"]).unwrap();
    let pins = shop.agent().pin_dir.clone();
    let fentry_pin = pins.join(RECORD_PROGRAMS[0].1);
    let sock_ops_pin = pins.join(RECORD_PROGRAMS[1].1);
    let fentry = fentry_expected();
    // Unkeyed requests from a baseline pod: the router can only forward them to the original
    // destination the record hook handed over (it refuses connections without one).
    let through_router_to_baseline = |shop: &Shop<'_>| {
        for ip in [CHECKOUT_VIP4, CHECKOUT_VIP6] {
            let (body, reason) = get_checked(shop, &shop.client, ip, "");
            assert_eq!(
                (body.as_str(), reason),
                ("checkout-base\n", Reason::ToRouter)
            );
        }
    };
    let record_fallback = |st: &serde_json::Value| {
        st["kernel_fallbacks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f.as_str().unwrap_or("").starts_with("record hook"))
    };

    // Chosen by flag, sock_ops is no kernel fallback.
    let st = status(&mc);
    assert_eq!(st["record_hook"], PROG_SOCK_OPS, "{st:#}");
    assert!(!record_fallback(&st), "{st:#}");
    assert_eq!((fentry_pin.exists(), sock_ops_pin.exists()), (false, true));
    through_router_to_baseline(&shop);

    // auto: fentry where the kernel loads it, and the sock_ops link is gone after it.
    shop.agent().set_extra(&[]);
    shop.agent().restart(&mc).unwrap();
    let st = status(&mc);
    let want = if fentry {
        PROG_TCP_CONNECT
    } else {
        PROG_SOCK_OPS
    };
    assert_eq!(st["record_hook"], want, "{st:#}");
    assert_eq!(record_fallback(&st), !fentry, "{st:#}");
    assert_eq!(
        (fentry_pin.exists(), sock_ops_pin.exists()),
        (fentry, !fentry)
    );
    through_router_to_baseline(&shop);

    // Required fentry: relinked where the kernel has it; refused with the reason elsewhere.
    shop.agent().set_extra(&["--record-hook", "fentry"]);
    if fentry {
        shop.agent().restart(&mc).unwrap();
        assert!(
            shop.agent().current_log().contains("action=Relinked"),
            "{}",
            shop.agent().current_log()
        );
        through_router_to_baseline(&shop);
    } else {
        let log = shop
            .agent()
            .restart_expecting_failure(&mc, Duration::from_secs(30))
            .unwrap();
        assert!(
            log.contains("program redirect_tcp_connect") && log.contains("--record-hook fentry"),
            "{log}"
        );
        assert_eq!((fentry_pin.exists(), sock_ops_pin.exists()), (false, true));
    }

    // And back to sock_ops: attached before the fentry link goes.
    shop.agent().set_extra(&["--record-hook", "sock-ops"]);
    shop.agent().restart(&mc).unwrap();
    assert_eq!(status(&mc)["record_hook"], PROG_SOCK_OPS);
    assert_eq!((fentry_pin.exists(), sock_ops_pin.exists()), (false, true));
    through_router_to_baseline(&shop);
}

/// Whether the agent's `auto` record hook should be `fentry` here: Linux 5.11 or later (socket
/// storage from tracing programs), and a kernel that loads tracing programs at all (aya's probe;
/// some sandboxed kernels refuse them with EPERM).
fn fentry_expected() -> bool {
    !kernel_before(5, 11)
        && aya::sys::is_program_supported(aya::programs::ProgramType::Tracing).unwrap_or(false)
}

/// Whether the running kernel is older than `major.minor` (its `uname -r`).
fn kernel_before(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let have = (parts.next().unwrap(), parts.next().unwrap());
    have < (major, minor)
}

/// Polls the kernel's `workloads_v1` until `pod`'s entry satisfies `want`, then gives the agent's
/// map write the moment it needs to finish (the generation increment follows the write in the
/// same call). Returns the entry.
fn wait_workload(
    shop: &Shop<'_>,
    pod: &redirect_tests::Pod<'_>,
    want: impl Fn(Option<u32>) -> bool,
) -> Option<u32> {
    use redirect_agent::{loader::KernelMaps, sync::RedirectMaps};
    let pin_dir = shop.agent.as_ref().unwrap().pin_dir.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tables = KernelMaps::open(&pin_dir).unwrap().read().unwrap();
        let key = tables.workloads.get(&pod.cgroup_id()).map(|w| w.key_id);
        if want(key) {
            std::thread::sleep(Duration::from_millis(100));
            return key;
        }
        assert!(
            Instant::now() < deadline,
            "workload of {} is {key:?}",
            pod.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_fork_pod_whose_workload_changes_or_goes_never_connects_with_its_old_key() {
    let Some(mc) = MiniCluster::new_or_skip("origin_cache_invalidation", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let caller = &shop.frontend_fork;
    let old_key = wait_workload(&shop, caller, |k| k.is_some());
    // Twice: the first connect walks the cgroups and caches the key, the second is served from
    // the cache.
    for _ in 0..2 {
        let (body, reason) = get_checked(&shop, caller, CHECKOUT_VIP4, "");
        assert_eq!(
            (body.as_str(), reason),
            ("checkout-fork\n", Reason::OriginFork)
        );
    }

    // The sandbox's routing key changes: the same pod, the same forks, a new key id. A cached
    // old key would find no fork under it (origin_baseline) and reach checkout-base.
    let renamed = |services: &[&str]| {
        sandbox_manifest(SANDBOX_KEY, "Unavailable", services).replace(
            &format!("routingKey: {SANDBOX_KEY}"),
            "routingKey: feature-renamed",
        )
    };
    shop.write_manifest(SANDBOX_FILE, &renamed(&["frontend", "checkout"]))
        .unwrap();
    let new_key = wait_workload(&shop, caller, |k| k.is_some() && k != old_key);
    let (body, reason) = get_checked(&shop, caller, CHECKOUT_VIP4, "");
    assert_eq!(
        (body.as_str(), reason),
        ("checkout-fork\n", Reason::OriginFork)
    );

    // The caller stops being a fork pod while checkout stays forked (its fork pod keeps its
    // workload: the removal is the only write): the caller is a baseline caller now, through
    // the router without a key to baseline, never to the fork through its cached key.
    shop.write_manifest(SANDBOX_FILE, &renamed(&["checkout"]))
        .unwrap();
    wait_workload(&shop, caller, |k| k.is_none());
    let (body, reason) = get_checked(&shop, caller, CHECKOUT_VIP4, "");
    assert_eq!(
        (body.as_str(), reason),
        ("checkout-base\n", Reason::ToRouter)
    );

    // And back: the cached "not a fork pod" goes as well.
    shop.write_manifest(SANDBOX_FILE, &renamed(&["frontend", "checkout"]))
        .unwrap();
    assert_eq!(wait_workload(&shop, caller, |k| k.is_some()), new_key);
    let (body, reason) = get_checked(&shop, caller, CHECKOUT_VIP4, "");
    assert_eq!(
        (body.as_str(), reason),
        ("checkout-fork\n", Reason::OriginFork)
    );
}

#[test]
fn the_router_refuses_connections_the_kernel_did_not_redirect() {
    let Some(mc) = MiniCluster::new_or_skip("router_no_open_proxy", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    for host in [ROUTER_IP4.to_string(), format!("[{ROUTER_IP6}]")] {
        let url = format!("http://{host}:{ROUTER_PORT}/");
        let out = shop
            .client
            .run(
                &["curl", "-sS", "-g", "--max-time", "5", &url],
                CLIENT_TIMEOUT,
            )
            .unwrap();
        assert!(
            !out.success(),
            "router answered a direct connection: {}",
            out.stdout
        );
        assert!(
            out.stderr.contains("Empty reply") || out.stderr.contains("reset"),
            "{}",
            out.stderr
        );
    }
}

/// A client loop in the `client` pod: one new connection + request every `interval`, for
/// `seconds`, with an `x-routing-key` when a fifth argument gives one. Separates connect failures from failures inside an established connection.
const LOOP_CLIENT: &str = r#"
import socket, sys, time, json
host, port, seconds, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
key = sys.argv[5] if len(sys.argv) > 5 else None
head = b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"x-routing-key: " + key.encode() + b"\r\n" if key else b"") + b"Connection: close\r\n\r\n"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
res = {"ok": 0, "connect_failed": 0, "broken": 0, "served_by": {}, "fail_times": []}
start = time.monotonic()
while time.monotonic() - start < seconds:
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    t = time.monotonic() - start
    try:
        s.connect((host, port))
    except OSError:
        res["connect_failed"] += 1; res["fail_times"].append(t); s.close(); time.sleep(interval); continue
    try:
        s.sendall(head)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
        body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
        if not body: raise OSError("empty")
        res["ok"] += 1; res["served_by"][body] = res["served_by"].get(body, 0) + 1
    except (OSError, IndexError):
        res["broken"] += 1; res["fail_times"].append(t)
    s.close()
    time.sleep(interval)
print(json.dumps(res))
"#;

fn agent_sigkill_fails_open_and_a_restart_restores_routes_from_pins_then_reconciles(
    source: SourceMode,
) {
    let Some(mc) = MiniCluster::new_or_skip(&format!("agent_sigkill_fails_open_{source:?}"), TOOLS)
    else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, source).unwrap();
    let script = mc.workdir().join("loop_client.py");
    std::fs::write(&script, LOOP_CLIENT).unwrap();
    let pin_dir = shop.agent().pin_dir.clone();
    assert!(through_router(&shop.client, CHECKOUT_VIP4).unwrap());

    // New connections every 1 ms while the agent (and its router) is SIGKILLed.
    let mut client = shop
        .client
        .spawn(&[
            "python3",
            script.to_str().unwrap(),
            CHECKOUT_VIP4,
            "80",
            "3",
            "0.001",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let killed_at = Instant::now();
    shop.agent().kill9().unwrap();
    client
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("client loop finished");
    let log = client.log();
    let res: serde_json::Value =
        serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("{e}: {log}"));
    println!(
        "fail-open under SIGKILL: {res} (agent killed {:?} before the loop ended)",
        killed_at.elapsed()
    );
    assert!(res["ok"].as_u64().unwrap() > 100, "{res}");
    // Only connections in flight at the kill may fail: inside the router, or sent to its
    // listener as it closed (a connect refused; the window is the kernel's own path from the
    // decision to the listener, which emulated kernels stretch enough to hit). None fail after.
    let failed = res["connect_failed"].as_u64().unwrap() + res["broken"].as_u64().unwrap();
    assert!(
        failed <= 3,
        "more connections failed than were in flight at the kill: {res}"
    );
    let times: Vec<f64> = res["fail_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    if let (Some(first), Some(last)) = (
        times.iter().copied().reduce(f64::min),
        times.iter().copied().reduce(f64::max),
    ) {
        assert!(
            last - first < 0.5,
            "failures spread over {:.3} s, not only at the kill: {res}",
            last - first
        );
    }

    // With the agent dead: baseline callers go direct (fail open), fork pods still reach the fork
    // through the pinned programs and maps.
    let before = read_counters(&pin_dir).unwrap();
    assert!(
        !through_router(&shop.client, CHECKOUT_VIP4).unwrap(),
        "not direct after the kill"
    );
    assert_eq!(
        delta(&before, &read_counters(&pin_dir).unwrap()),
        [("router_down", 1)].into()
    );
    assert_eq!(
        predict(&pin_dir, &shop.client, sa(CHECKOUT_VIP4, 80), false)
            .unwrap()
            .reason,
        Reason::RouterDown
    );
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );

    // The sandbox goes away while no agent runs; the restarted agent reuses the pins (routes
    // kept), then reconciles them with the manifests.
    shop.remove_sandbox().unwrap();
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    shop.agent().restart(&mc).unwrap();
    let log = shop.agent().log();
    // Cgroup links get the new program in place; the fentry record hook's link cannot swap
    // programs, so a new one takes its pin over.
    let cgroup_links = redirect_common::CGROUP_PROGRAMS.len();
    let (updated, relinked) = if fentry_expected() {
        (cgroup_links, 1)
    } else {
        (cgroup_links + 1, 0)
    };
    assert_eq!(
        log.matches("action=Updated").count(),
        updated,
        "links not reused:\n{log}"
    );
    assert_eq!(
        log.matches("action=Relinked").count(),
        relinked,
        "record hook not relinked:\n{log}"
    );
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
    let c = shop.agent().counters().unwrap();
    assert!(
        c["origin_fork"] >= 2,
        "counters were reset, not reused: {c:?}"
    );

    // Sandbox back: the restarted router registers again and takes baseline callers.
    shop.add_sandbox().unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    assert!(
        through_router(&shop.client, CHECKOUT_VIP4).unwrap(),
        "not through the router after restart"
    );
}

fn removing_the_sandbox_removes_its_routes(source: SourceMode) {
    let Some(mc) = MiniCluster::new_or_skip(&format!("sandbox_removed_{source:?}"), TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, source).unwrap();
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP6, "").unwrap(),
        "checkout-fork\n"
    );
    let synced = shop.agent().syncs();
    shop.remove_sandbox().unwrap();
    shop.agent()
        .wait_synced(synced + 1, Duration::from_secs(20))
        .unwrap();
    // The source may take a snapshot between the write and its watch event: the removal is in
    // that one or in the next. Once a request shows it, the maps hold it and stay as they are.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get(&shop.frontend_fork, CHECKOUT_VIP6, "").unwrap() != "checkout-base\n"
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (body, reason) = get_checked(&shop, &shop.frontend_fork, CHECKOUT_VIP6, "");
    assert_eq!(
        (body.as_str(), reason),
        ("checkout-base\n", Reason::NotForked)
    );
    let (body, reason) = get_checked(&shop, &shop.client, CHECKOUT_VIP4, "");
    assert_eq!(
        (body.as_str(), reason),
        ("checkout-base\n", Reason::NotForked)
    );
}

#[test]
fn an_invalid_manifest_is_reported_with_file_and_reason_and_the_last_good_state_stays() {
    let Some(mc) = MiniCluster::new_or_skip("invalid_manifest", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    // A second sandbox with an invalid routing key, and the first sandbox removed in the same
    // change: the whole change is rejected, so the first sandbox's routes stay.
    shop.write_manifest(
        "zz-broken.yaml",
        "apiVersion: redirect.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: broken, namespace: default}\nspec:\n  routingKey: \"bad key!\"\n  forks: []\n",
    )
    .unwrap();
    shop.remove_sandbox().unwrap();
    shop.agent()
        .wait_log("manifests rejected", Duration::from_secs(20))
        .unwrap();
    let log = shop.agent().log();
    let line = log
        .lines()
        .find(|l| l.contains("zz-broken.yaml"))
        .unwrap_or_else(|| panic!("no error naming the file:\n{log}"));
    assert!(
        line.contains("Sandbox default/broken") && line.contains("routing key"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    // Fixed: the change applies.
    std::fs::remove_file(shop.manifests.join("zz-broken.yaml")).unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
}

#[test]
fn cleanup_removes_every_link_program_and_pin_it_made() {
    let Some(mc) = MiniCluster::new_or_skip("cleanup_complete", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pin_dir = shop.agent().pin_dir.clone();
    // Every object, the persisted last good state included.
    shop.agent()
        .wait_persisted(Duration::from_secs(10))
        .unwrap();
    let objects = PinnedObjects::of(&pin_dir).unwrap();
    let removed = shop.agent().cleanup().unwrap();
    assert_eq!(removed.len(), objects.count() + 1, "{removed:?}");
    assert!(!pin_dir.exists());
    objects.wait_gone(Duration::from_secs(10)).unwrap();
    // Traffic is untouched afterwards.
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
    assert!(
        shop.agent().cleanup().unwrap().is_empty(),
        "cleanup is idempotent"
    );
}

#[test]
fn maps_earlier_versions_pinned_are_removed_by_a_new_agent_and_by_cleanup() {
    let Some(mc) = MiniCluster::new_or_skip("retired_maps", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pin_dir = shop.agent().pin_dir.clone();
    // What an agent of an earlier version would have left: a pinned map under each retired name.
    let pin_retired = || {
        for name in redirect_common::RETIRED_MAPS {
            let path = pin_dir.join(name);
            let path = path.to_str().unwrap();
            let made = std::process::Command::new("bpftool")
                .args([
                    "map", "create", path, "type", "hash", "key", "4", "value", "4",
                ])
                .args(["entries", "1", "name", "retired"])
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
        }
    };
    let all_there = || {
        redirect_common::RETIRED_MAPS
            .iter()
            .filter(|n| pin_dir.join(n).exists())
            .count()
    };
    pin_retired();
    assert_eq!(all_there(), 2);
    shop.agent().restart(&mc).unwrap();
    assert_eq!(all_there(), 0, "the new agent left a retired pin");
    assert!(
        shop.agent()
            .log()
            .contains("removed a map earlier versions used")
    );
    // The data path is whole after the restart.
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    pin_retired();
    let removed = shop.agent().cleanup().unwrap();
    for name in redirect_common::RETIRED_MAPS {
        assert!(removed.contains(&pin_dir.join(name)), "{name}: {removed:?}");
    }
    assert!(!pin_dir.exists());
}

#[test]
fn the_kernel_check_finds_everything_the_programs_need_here() {
    let Some(()) = redirect_tests::or_skip(
        "kernel_check",
        redirect_tests::require_root("(the probes load programs)"),
    ) else {
        return;
    };
    let out = std::process::Command::new(redirect_tests::agent::agent_bin())
        .arg("kernel-check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One line per need, each answered yes (the agent refuses to load otherwise).
    let answered = text.lines().filter(|l| l.ends_with(" yes")).count();
    assert_eq!(answered, 12, "{text}");
    assert!(
        text.contains("everything the programs need is there"),
        "{text}"
    );
}

#[test]
fn fork_pods_and_keyed_requests_are_routed_with_either_kubelet_cgroup_layout() {
    for layout in [CgroupLayout::Cgroupfs, CgroupLayout::Systemd] {
        let Some(mc) = MiniCluster::new_or_skip_with_layout("cgroup_layouts", TOOLS, layout) else {
            return;
        };
        let mut shop = Shop::with_agent(&mc, true).unwrap();
        let pin_dir = shop.agent().pin_dir.clone();
        let path = shop
            .frontend_fork
            .container_cgroup_path()
            .display()
            .to_string();
        let want = match layout {
            CgroupLayout::Cgroupfs => "/kubepods/pod",
            CgroupLayout::Systemd => {
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            }
        };
        assert!(path.contains(want), "{layout:?}: {path}");
        // The kernel finds the fork pod from its container's cgroup, as the model predicts.
        let d = expect_kernel_agrees(&pin_dir, &shop.frontend_fork, sa(CHECKOUT_VIP4, 80), || {
            assert_eq!(
                get(&shop.frontend_fork, CHECKOUT_VIP4, "")?,
                "checkout-fork\n",
                "{layout:?}"
            );
            Ok(())
        })
        .unwrap();
        assert_eq!(d.reason, Reason::OriginFork, "{layout:?}");
        // A baseline pod's keyed request goes through the router to the fork.
        let key = format!("x-routing-key: {SANDBOX_KEY}");
        assert_eq!(
            get_with(&shop.client, CHECKOUT_VIP4, "", Some(&key)).unwrap(),
            "checkout-fork\n",
            "{layout:?}"
        );
        assert_eq!(
            get(&shop.client, CHECKOUT_VIP4, "").unwrap(),
            "checkout-base\n",
            "{layout:?}"
        );
    }
}

/// What `getpeername()` says, asked twice each, on `sockets` sockets connected from `pod` to
/// `ip:port` and all held open until every connect is done: the distinct answers.
fn peer_names(pod: &redirect_tests::Pod<'_>, ip: &str, port: u16, sockets: usize) -> String {
    let script = format!(
        "import socket\n\
         fam = socket.AF_INET6 if ':' in '{ip}' else socket.AF_INET\n\
         socks = []\n\
         for _ in range({sockets}):\n\
         \x20   s = socket.socket(fam, socket.SOCK_STREAM)\n\
         \x20   s.settimeout(5)\n\
         \x20   s.connect(('{ip}', {port}))\n\
         \x20   socks.append(s)\n\
         seen = set()\n\
         for s in socks:\n\
         \x20   for _ in range(2):\n\
         \x20       seen.add('%s %d' % s.getpeername()[:2])\n\
         print(','.join(sorted(seen)))\n"
    );
    pod.run(&["python3", "-c", &script], CLIENT_TIMEOUT)
        .unwrap()
        .check()
        .unwrap()
        .trim()
        .to_string()
}

/// What `getpeername()` says after connecting from `pod` to `ip:80`.
fn peer_name(pod: &redirect_tests::Pod<'_>, ip: &str) -> String {
    peer_names(pod, ip, 80, 1)
}

#[test]
fn getpeername_reports_the_address_the_application_connected_to() {
    let Some(mc) = MiniCluster::new_or_skip("getpeername_original", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    for ip in [CHECKOUT_VIP4, CHECKOUT_VIP6] {
        // Kernel path (fork pod → fork endpoint) and router path (baseline pod → router).
        for pod in [&shop.frontend_fork, &shop.client] {
            assert_eq!(peer_name(pod, ip), format!("{ip} 80"), "{}", pod.name());
        }
        // Many rewritten sockets, each asked only once all are connected.
        assert_eq!(
            peer_names(&shop.frontend_fork, ip, 80, 64),
            format!("{ip} 80")
        );
    }
    // IPv4-mapped on an IPv6 socket keeps its mapped form.
    let mapped = format!("::ffff:{CHECKOUT_VIP4}");
    assert_eq!(peer_name(&shop.client, &mapped), format!("{mapped} 80"));
    // A socket connected to the fork endpoint itself (whose address rewritten sockets have as
    // their peer) reports that endpoint, from a fork pod as from a baseline pod.
    for ip in [
        shop.checkout_fork.ip4().to_string(),
        shop.checkout_fork.ip6().to_string(),
    ] {
        for pod in [&shop.frontend_fork, &shop.client] {
            assert_eq!(
                peer_names(pod, &ip, SERVER_PORT, 1),
                format!("{ip} {SERVER_PORT}"),
                "{}",
                pod.name()
            );
        }
    }
}

/// `GET /status` of the agent's admin endpoint (in the node netns).
fn status(mc: &MiniCluster) -> serde_json::Value {
    mc.node().admin_status().unwrap()
}

#[test]
fn keyed_requests_sent_across_an_agent_restart_while_the_api_server_is_down_all_reach_the_fork() {
    let Some(mc) = MiniCluster::new_or_skip("restart_keyed_api_down", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_on(&mc, true, SourceMode::Kube).unwrap();
    shop.agent()
        .wait_persisted(Duration::from_secs(10))
        .unwrap();
    let script = mc.workdir().join("loop_client.py");
    std::fs::write(&script, LOOP_CLIENT).unwrap();
    // Keyed requests on a new connection every 2 ms from a baseline pod, through the router.
    let mut client = shop
        .client
        .spawn(&[
            "python3",
            script.to_str().unwrap(),
            CHECKOUT_VIP4,
            "80",
            "4",
            "0.002",
            SANDBOX_KEY,
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // The new agent cannot list anything, so its source never gives a snapshot; the old one
    // is stopped once the new router runs (as a DaemonSet surge does).
    let api = shop.agent().kube.as_ref().unwrap().server.clone();
    api.set_down(true);
    shop.agent().roll(&mc, Duration::from_secs(10)).unwrap();
    client
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("client loop finished");
    let log = client.log();
    let res: serde_json::Value =
        serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("{e}: {log}"));
    println!("keyed requests across a restart with the API down: {res}");
    assert_eq!(res["connect_failed"], 0, "{res}");
    assert!(res["ok"].as_u64().unwrap() > 100, "{res}");
    assert_eq!(
        res["served_by"],
        serde_json::json!({"checkout-fork": res["ok"]}),
        "keyed requests reached baseline across the restart"
    );
    assert_eq!(status(&mc)["state_from"], "persisted");
    // The API back: the new agent syncs and routes with its own state from then on.
    api.set_down(false);
    shop.agent()
        .wait_synced(1, Duration::from_secs(30))
        .unwrap();
    assert_eq!(status(&mc)["state_from"], "synced");
    assert_eq!(
        get_with(
            &shop.client,
            CHECKOUT_VIP4,
            "",
            Some(&format!("x-routing-key: {SANDBOX_KEY}"))
        )
        .unwrap(),
        "checkout-fork\n"
    );
}

#[test]
fn a_restart_while_the_manifests_hold_a_broken_file_keeps_keyed_requests_on_the_fork() {
    let Some(mc) = MiniCluster::new_or_skip("restart_broken_manifest", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let key = format!("x-routing-key: {SANDBOX_KEY}");
    shop.agent()
        .wait_persisted(Duration::from_secs(10))
        .unwrap();
    shop.write_manifest(
        "zz-broken.yaml",
        "apiVersion: redirect.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: broken, namespace: default}\nspec:\n  routingKey: \"bad key!\"\n  forks: []\n",
    )
    .unwrap();
    shop.agent()
        .wait_log("manifests rejected", Duration::from_secs(20))
        .unwrap();

    // The agent crashes and comes back while the directory still holds the broken file: once
    // its source has answered (rejected), keyed requests must still reach the fork.
    shop.agent()
        .restart_until(&mc, "manifests rejected", Duration::from_secs(30))
        .unwrap();
    for _ in 0..10 {
        assert_eq!(
            get_with(&shop.client, CHECKOUT_VIP4, "", Some(&key)).unwrap(),
            "checkout-fork\n"
        );
    }
    let s = status(&mc);
    assert_eq!(s["state_from"], "persisted", "{s}");
    assert_eq!(s["ready"], false, "not ready before a sync of its own: {s}");
    assert!(
        shop.agent()
            .current_log()
            .contains("routing with the persisted last good state"),
        "{}",
        shop.agent().current_log()
    );

    // Fixed: the agent syncs from its source and keeps routing.
    std::fs::remove_file(shop.manifests.join("zz-broken.yaml")).unwrap();
    shop.agent()
        .wait_synced(1, Duration::from_secs(20))
        .unwrap();
    assert_eq!(status(&mc)["state_from"], "synced");
    assert_eq!(
        get_with(&shop.client, CHECKOUT_VIP4, "", Some(&key)).unwrap(),
        "checkout-fork\n"
    );
}
