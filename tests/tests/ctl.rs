//! `redirectctl` and the agent's admin endpoint against the real kernel and the Shop scene.
//! Every command runs in the node netns (where the agent's admin endpoint listens on
//! 127.0.0.1:9967), as an operator on the node would run it. `explain` is checked against what
//! the kernel really did: the counter delta of one real connection. Skips without root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use redirect_tests::{
    MiniCluster, Pod, Proc, ROUTER_IP4, RunOutput,
    agent::{ROUTER_PORT, agent_bin, read_counters},
    kernel::delta,
    scene::*,
};
use serde_json::Value;

const TOOLS: &[&str] = &["curl", "python3"];
const CTL_TIMEOUT: Duration = Duration::from_secs(30);
const ADMIN: &str = "http://127.0.0.1:9967";

/// The redirectctl binary: `$REDIRECTCTL_BIN`, else the workspace's debug build.
fn ctl_bin() -> PathBuf {
    let bin = std::env::var_os("REDIRECTCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| agent_bin().with_file_name("redirectctl"));
    assert!(
        bin.exists(),
        "{} missing: cargo build -p redirect-agent",
        bin.display()
    );
    bin
}

/// `redirectctl --pin-dir <pins> <args>`.
fn ctl_argv<'a>(bin: &'a Path, pins: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec![bin.to_str().unwrap(), "--pin-dir", pins.to_str().unwrap()];
    argv.extend_from_slice(args);
    argv
}

/// Runs `redirectctl --pin-dir <pins> <args>` in the node netns to the end, whatever it exits
/// with.
fn ctl_run(mc: &MiniCluster, pins: &Path, args: &[&str]) -> RunOutput {
    let bin = ctl_bin();
    mc.node()
        .run(&ctl_argv(&bin, pins, args), CTL_TIMEOUT)
        .unwrap()
}

/// Starts `redirectctl --pin-dir <pins> <args>` in the node netns.
fn ctl_spawn(mc: &MiniCluster, pins: &Path, args: &[&str]) -> Proc {
    let bin = ctl_bin();
    mc.node().spawn(&ctl_argv(&bin, pins, args)).unwrap()
}

/// Service ports the scene's sandbox forks.
fn forked_ports(shop: &Shop<'_>) -> usize {
    shop.checkout.ports().len() + shop.frontend.ports().len()
}

fn pin_dir(shop: &Shop<'_>) -> PathBuf {
    shop.agent.as_ref().expect("agent").pin_dir.clone()
}

/// Runs `redirectctl --pin-dir <pins> <args>` in the node netns; returns stdout, panicking
/// with stderr on failure.
fn ctl(mc: &MiniCluster, pins: &Path, args: &[&str]) -> String {
    let out = ctl_run(mc, pins, args);
    assert!(
        out.success(),
        "redirectctl {args:?} failed: {}\n{}",
        out.stderr,
        out.stdout
    );
    out.stdout
}

fn ctl_json(mc: &MiniCluster, pins: &Path, args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let out = ctl(mc, pins, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `curl -X <method> <url> <extra>` that prints the status code on a line after the body.
fn curl_argv<'a>(method: &'a str, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ];
    argv.extend_from_slice(extra);
    argv
}

/// (status code, body) of a [`curl_argv`] run, which must have succeeded.
fn code_and_body(out: anyhow::Result<RunOutput>) -> (u16, String) {
    let out = out.unwrap().check().unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// `curl` in the node netns against the admin endpoint: (status code, body).
fn admin(mc: &MiniCluster, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("{ADMIN}{path}");
    let extra = body.map(|b| vec!["--data-binary", b]).unwrap_or_default();
    code_and_body(mc.node().run(&curl_argv(method, &url, &extra), CTL_TIMEOUT))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Counter deltas of one real connection made by `act`.
fn kernel_delta(pins: &Path, act: impl FnOnce()) -> BTreeMap<&'static str, u64> {
    let before = read_counters(pins).unwrap();
    act();
    delta(&before, &read_counters(pins).unwrap())
}

/// The counters one connect with `reason` moves (the router path also records the
/// destination in sock_ops).
fn expected(reason: &str) -> BTreeMap<&'static str, u64> {
    let reason: &'static str = redirect_common::Reason::ALL
        .iter()
        .map(|r| r.label())
        .find(|l| *l == reason)
        .unwrap_or_else(|| panic!("unknown reason {reason}"));
    let mut m = BTreeMap::from([(reason, 1)]);
    if reason == "to_router" {
        m.insert("conn_recorded", 1);
    }
    m
}

#[test]
fn status_shows_attached_programs_live_router_map_fill_and_the_agent() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_status", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);
    let s = ctl_json(&mc, &pins, &["status"]);
    assert_eq!(s["schema"], "redirectctl.status/v1");
    let progs = s["programs"].as_array().unwrap();
    // The programs at the cgroup root and the one record hook the agent chose.
    assert_eq!(
        progs.len(),
        redirect_common::CGROUP_PROGRAMS.len() + 1,
        "{s:#}"
    );
    let record = str_of(&progs.last().unwrap()["program"]);
    assert_eq!(
        record,
        mc.node().admin_status().unwrap()["record_hook"],
        "{s:#}"
    );
    for p in progs {
        assert_eq!(p["attached"], true, "{p}");
        if p["program"] == redirect_common::PROG_TCP_CONNECT {
            assert_eq!(str_of(&p["kernel_function"]), "fentry/tcp_connect", "{p}");
        } else {
            assert_eq!(
                str_of(&p["cgroup_path"]),
                mc.cgroup_root().to_str().unwrap(),
                "{p}"
            );
        }
        let loaded = p["loaded_at_unix_ms"].as_u64().unwrap();
        let now = redirect_agent::admin::unix_ms(std::time::SystemTime::now());
        assert!(loaded <= now && now - loaded < 600_000, "{p}");
    }
    assert_eq!(s["router"]["ipv4"], true, "{s:#}");
    assert_eq!(s["router"]["ipv6"], true, "{s:#}");
    let map = |name: &str| {
        s["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no map {name}: {s:#}"))
            .clone()
    };
    // Every forked port by VIP (v4, v6) and by baseline backend (v4, v6); frontend has none.
    assert_eq!(
        map("services_v1")["entries"],
        shop.checkout.ports().len() * 4 + shop.frontend.ports().len() * 2,
        "{s:#}"
    );
    assert_eq!(map("services_v1")["max_entries"], 65536);
    assert_eq!(map("forks_v1")["entries"], forked_ports(&shop));
    assert_eq!(map("workloads_v1")["entries"], 2);
    assert_eq!(map("router_socks_v1")["entries"], 2);
    assert_eq!(map("trace_ctl_v1")["max_entries"], 1);
    assert_eq!(s["trace"]["mode"], "off");
    assert_eq!(s["agent"]["reachable"], true, "{s:#}");
    let agent = &s["agent"]["status"];
    assert_eq!(agent["ready"], true);
    assert!(agent["generation"].as_u64().unwrap() >= 1);
    assert!(agent["last_sync"]["at_unix_ms"].as_u64().unwrap() > 0);
    // The table names the same things.
    let text = ctl(&mc, &pins, &["status"]);
    assert!(text.contains("router ipv4: up"), "{text}");
    assert!(
        text.contains("agent: reachable at http://127.0.0.1:9967"),
        "{text}"
    );
    assert!(text.contains(mc.cgroup_root().to_str().unwrap()), "{text}");
}

#[test]
fn map_commands_list_what_the_kernel_holds_with_the_agents_names() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_maps", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);

    let s = ctl_json(&mc, &pins, &["services"]);
    assert_eq!(s["agent_reachable"], true);
    let services = s["services"].as_array().unwrap();
    let vip = services
        .iter()
        .find(|r| r["address"] == format!("{CHECKOUT_VIP4}:80"))
        .unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(vip["service"], "default/checkout:http");
    let backend = format!("{}:{SERVER_PORT}", shop.checkout_base.ip4());
    assert!(
        services.iter().any(|r| r["address"] == backend.as_str()),
        "baseline backend keyed too: {s:#}"
    );
    assert!(
        !services
            .iter()
            .any(|r| r["address"] == format!("{CATALOG_VIP4}:80")),
        "catalog is not forked: {s:#}"
    );

    let s = ctl_json(&mc, &pins, &["sandboxes"]);
    let sb = &s["sandboxes"][0];
    assert_eq!(sb["key"], SANDBOX_KEY, "{s:#}");
    assert_eq!(sb["owners"][0], "default/feature-x");
    assert_eq!(sb["fallback"], "unavailable");
    assert_eq!(sb["forked_services"], forked_ports(&shop));
    assert_eq!(sb["fork_pods"], 2);

    let s = ctl_json(&mc, &pins, &["routes"]);
    let checkout = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "default/checkout:http")
        .unwrap_or_else(|| panic!("{s:#}"))
        .clone();
    assert_eq!(checkout["key"], SANDBOX_KEY);
    assert_eq!(
        (
            checkout["ready_ipv4"].as_u64(),
            checkout["ready_ipv6"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let fork4 = format!("{}:{SERVER_PORT}", shop.checkout_fork.ip4());
    let fork6 = format!("[{}]:{SERVER_PORT}", shop.checkout_fork.ip6());
    assert_eq!(checkout["endpoints"], serde_json::json!([fork4, fork6]));
    // frontend has no baseline pod but a fork.
    let frontend = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "default/frontend:http")
        .unwrap_or_else(|| panic!("{s:#}"))
        .clone();
    assert_eq!(frontend["ready_ipv4"], 1);

    let s = ctl_json(&mc, &pins, &["endpoints"]);
    let eps = s["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2 * forked_ports(&shop), "{s:#}");
    assert!(eps.iter().any(|e| e["endpoint"] == fork4.as_str()
        && e["family"] == "ipv4"
        && e["service"] == "default/checkout:http"));
    assert_eq!(s["router"]["ipv4"], format!("{ROUTER_IP4}:{ROUTER_PORT}"));

    let s = ctl_json(&mc, &pins, &["workloads"]);
    let w = s["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pod"] == "default/frontend-fork")
        .unwrap_or_else(|| panic!("{s:#}"))
        .clone();
    assert_eq!(w["cgroup_id"], shop.frontend_fork.cgroup_id());
    assert_eq!(
        str_of(&w["cgroup_path"]),
        shop.frontend_fork.cgroup_path().to_str().unwrap()
    );
    assert_eq!(w["pod_uid"], shop.frontend_fork.uid());
    assert_eq!(w["key"], SANDBOX_KEY);

    let s = ctl_json(&mc, &pins, &["conns"]);
    assert_eq!(s["schema"], "redirectctl.conns/v1");
    assert!(s["conns"].is_array());

    // Counters move with a real connection, and the router's outcomes come from the agent.
    get(&shop.client, CHECKOUT_VIP4, "").unwrap();
    let s = ctl_json(&mc, &pins, &["counters"]);
    let count = |reason: &str| {
        s["kernel"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["reason"] == reason)
            .unwrap()["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        count("to_router"),
        read_counters(&pins).unwrap()["to_router"]
    );
    assert!(count("to_router") >= 1);
    assert!(
        s["router_requests"]["baseline"].as_u64().unwrap() >= 1,
        "{s:#}"
    );
    assert!(s["router_connections"]["forwarded"].is_u64(), "{s:#}");

    // Tables name the same entries.
    let text = ctl(&mc, &pins, &["routes"]);
    assert!(
        text.contains("feature-x") && text.contains(&fork4),
        "{text}"
    );
    let text = ctl(&mc, &pins, &["workloads"]);
    assert!(text.contains("default/checkout-fork"), "{text}");
}

/// Checks `explain` for `pod` → `dst` against the kernel: the counter delta of one real
/// connection. Returns explain's JSON.
fn explain_checked(
    mc: &MiniCluster,
    pins: &Path,
    from: &str,
    pod: &Pod<'_>,
    dst: &str,
    key: Option<&str>,
    want_reason: &str,
) -> Value {
    let mut args = vec!["explain", "--from", from, "--to", dst];
    if let Some(k) = key {
        args.extend(["--key", k]);
    }
    let e = ctl_json(mc, pins, &args);
    assert_eq!(e["kernel"]["reason"], want_reason, "{e:#}");
    let addr: SocketAddr = dst.parse().unwrap();
    let ip = addr.ip().to_string();
    let header = key.map(|k| format!("baggage: routing-key={k}"));
    let moved = kernel_delta(pins, || {
        let _ = get_with(pod, &ip, "", header.as_deref());
    });
    assert_eq!(
        moved,
        expected(str_of(&e["kernel"]["reason"])),
        "explain said {} for {} -> {dst}, the kernel counted {moved:?}",
        e["kernel"]["reason"],
        pod.name()
    );
    e
}

#[test]
fn explain_walks_the_same_decision_the_kernel_makes_in_every_scenario() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_explain", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);
    let checkout4 = format!("{CHECKOUT_VIP4}:80");
    let checkout6 = format!("[{CHECKOUT_VIP6}]:80");
    let catalog4 = format!("{CATALOG_VIP4}:80");
    let fork_uid = shop.frontend_fork.uid().to_string();

    // Fork pod → forked service: the kernel rewrites to the fork endpoint (pod uid as caller).
    for dst in [&checkout4, &checkout6] {
        let e = explain_checked(
            &mc,
            &pins,
            &fork_uid,
            &shop.frontend_fork,
            dst,
            None,
            "origin_fork",
        );
        assert_eq!(e["verdict"]["kind"], "fork_endpoint");
        let want = if dst.contains('[') {
            format!("[{}]:{SERVER_PORT}", shop.checkout_fork.ip6())
        } else {
            format!("{}:{SERVER_PORT}", shop.checkout_fork.ip4())
        };
        assert_eq!(e["kernel"]["rewrite"], want.as_str(), "{e:#}");
        assert_eq!(e["from"]["pod"], "default/frontend-fork");
        assert_eq!(e["kernel"]["service"], "default/checkout:http");
        let maps: Vec<&str> = e["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["map"].as_str())
            .collect();
        assert_eq!(maps, ["services_v1", "workloads_v1", "forks_v1"], "{e:#}");
    }
    assert_eq!(
        get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );

    // Fork pod → a service nobody forks: untouched (cgroup path as caller).
    let cg = shop
        .frontend_fork
        .container_cgroup_path()
        .to_str()
        .unwrap()
        .to_string();
    let e = explain_checked(
        &mc,
        &pins,
        &cg,
        &shop.frontend_fork,
        &catalog4,
        None,
        "not_forked",
    );
    assert_eq!(e["verdict"]["kind"], "untouched");
    assert_eq!(e["steps"][0]["found"], "miss");

    // Baseline pod → forked service, with the key: router, then the fork (pod name as caller).
    let e = explain_checked(
        &mc,
        &pins,
        "default/client",
        &shop.client,
        &checkout4,
        Some(SANDBOX_KEY),
        "to_router",
    );
    assert_eq!(
        e["kernel"]["rewrite"],
        format!("{ROUTER_IP4}:{ROUTER_PORT}")
    );
    assert_eq!(e["router"]["route"], "fork", "{e:#}");
    assert_eq!(e["verdict"]["kind"], "router_fork");
    let fork4 = format!("{}:{SERVER_PORT}", shop.checkout_fork.ip4());
    assert_eq!(e["verdict"]["destination"], fork4.as_str());
    assert_eq!(
        get_with(
            &shop.client,
            CHECKOUT_VIP4,
            "",
            Some(&format!("baggage: routing-key={SANDBOX_KEY}"))
        )
        .unwrap(),
        "checkout-fork\n",
        "the router did what explain said"
    );

    // The same without a key (pid as caller): the router keeps it on baseline.
    let mut sleeper = shop.client.spawn(&["sleep", "60"]).unwrap();
    let pid = sleeper.pid().to_string();
    let e = explain_checked(
        &mc,
        &pins,
        &pid,
        &shop.client,
        &checkout4,
        None,
        "to_router",
    );
    assert_eq!(e["router"]["route"], "baseline");
    assert_eq!(e["router"]["why"], "no_key");
    assert_eq!(e["verdict"]["kind"], "router_baseline");
    assert_eq!(e["from"]["pod"], "default/client");
    sleeper.kill().unwrap();

    // An unknown key: the router keeps it on baseline and says why.
    let e = ctl_json(
        &mc,
        &pins,
        &[
            "explain",
            "--from",
            "default/client",
            "--to",
            &checkout4,
            "--key",
            "nope",
        ],
    );
    assert_eq!(e["router"]["why"], "unknown_key", "{e:#}");

    // The router down: the kernel fails open, and explain sees it in the sockmap.
    shop.agent().kill9().unwrap();
    let uid = shop.client.uid().to_string();
    let e = explain_checked(
        &mc,
        &pins,
        &uid,
        &shop.client,
        &checkout4,
        None,
        "router_down",
    );
    assert_eq!(e["verdict"]["kind"], "fail_open");
    assert_eq!(e["agent_reachable"], false);
    let text = ctl(&mc, &pins, &["explain", "--from", &uid, "--to", &checkout4]);
    assert!(text.contains("router_socks_v1[slot 0"), "{text}");
    assert!(text.contains("fail open"), "{text}");
}

#[test]
fn with_the_agent_killed_map_commands_still_work_and_show_it_unreachable() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_agent_down", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);
    shop.agent().kill9().unwrap();

    let s = ctl_json(&mc, &pins, &["status"]);
    assert_eq!(s["agent"]["reachable"], false, "{s:#}");
    assert!(
        str_of(&s["agent"]["error"]).contains("cannot connect"),
        "{s:#}"
    );
    assert_eq!(s["router"]["ipv4"], false, "router listener gone: {s:#}");
    for p in s["programs"].as_array().unwrap() {
        assert_eq!(p["attached"], true, "links outlive the agent: {p}");
    }
    let text = ctl(&mc, &pins, &["status"]);
    assert!(text.contains("agent: UNREACHABLE"), "{text}");
    assert!(text.contains("router ipv4: DOWN"), "{text}");

    let s = ctl_json(&mc, &pins, &["services"]);
    assert_eq!(s["agent_reachable"], false);
    let vip = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == format!("{CHECKOUT_VIP4}:80"))
        .unwrap_or_else(|| panic!("{s:#}"))
        .clone();
    assert_eq!(vip["service"], Value::Null, "no names without the agent");
    let text = ctl(&mc, &pins, &["services"]);
    assert!(text.contains("names unavailable"), "{text}");

    for noun in ["sandboxes", "routes", "endpoints", "workloads", "conns"] {
        let s = ctl_json(&mc, &pins, &[noun]);
        assert_eq!(s["agent_reachable"], false, "{noun}: {s:#}");
    }
    let s = ctl_json(&mc, &pins, &["workloads"]);
    let ids: Vec<u64> = s["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["cgroup_id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&shop.checkout_fork.cgroup_id()), "{s:#}");
    let s = ctl_json(&mc, &pins, &["routes"]);
    assert_eq!(
        s["routes"].as_array().unwrap().len(),
        forked_ports(&shop),
        "{s:#}"
    );

    let s = ctl_json(&mc, &pins, &["counters"]);
    assert_eq!(s["agent_reachable"], false);
    assert_eq!(s["router_requests"], Value::Null);
    assert_eq!(s["kernel"].as_array().unwrap().len(), 12);
}

/// Starts `redirectctl trace <args> -o json` in the node and waits until it traces.
fn start_trace(mc: &MiniCluster, pins: &Path, args: &[&str]) -> Proc {
    let mut p = ctl_spawn(mc, pins, &[&["-o", "json", "trace"], args].concat());
    p.wait_for_log("tracing", Duration::from_secs(20)).unwrap();
    p
}

fn trace_lines(p: &Proc) -> Vec<Value> {
    p.log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn trace_mode(mc: &MiniCluster, pins: &Path) -> String {
    str_of(&ctl_json(mc, pins, &["status"])["trace"]["mode"]).to_string()
}

#[test]
fn trace_shows_real_decisions_before_and_after_translation_and_switches_itself_off() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_trace", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);
    assert_eq!(trace_mode(&mc, &pins), "off");

    // A baseline caller through the router, filtered by service name.
    let mut t = start_trace(
        &mc,
        &pins,
        &["--service", "default/checkout", "--count", "1"],
    );
    assert_eq!(trace_mode(&mc, &pins), "forked");
    // Not matched by the filter: catalog is not forked (and not traced without --all).
    get(&shop.client, CATALOG_VIP4, "").unwrap();
    get(&shop.client, CHECKOUT_VIP4, "").unwrap();
    let status = t.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{}", t.log());
    let lines = trace_lines(&t);
    assert_eq!(lines.len(), 1, "{}", t.log());
    let ev = &lines[0];
    assert_eq!(ev["reason"], "to_router", "{ev:#}");
    assert_eq!(ev["before"], format!("{CHECKOUT_VIP4}:80"));
    assert_eq!(ev["after"], format!("{ROUTER_IP4}:{ROUTER_PORT}"));
    assert_eq!(ev["rewritten"], true);
    assert_eq!(ev["service"], "default/checkout:http");
    assert_eq!(ev["caller"], "pod default/client");
    assert_eq!(
        str_of(&ev["cgroup_path"]),
        shop.client.container_cgroup_path().to_str().unwrap()
    );
    assert!(t.log().contains("tracing switched off"), "{}", t.log());
    assert_eq!(trace_mode(&mc, &pins), "off", "switched off on exit");

    // A fork caller in the kernel, filtered by sandbox, over IPv6.
    let mut t = start_trace(&mc, &pins, &["--sandbox", SANDBOX_KEY, "--count", "1"]);
    get(&shop.frontend_fork, CHECKOUT_VIP6, "").unwrap();
    t.wait_timeout(Duration::from_secs(20)).unwrap();
    let lines = trace_lines(&t);
    let ev = &lines[0];
    assert_eq!(ev["reason"], "origin_fork", "{ev:#}");
    assert_eq!(ev["before"], format!("[{CHECKOUT_VIP6}]:80"));
    assert_eq!(
        ev["after"],
        format!("[{}]:{SERVER_PORT}", shop.checkout_fork.ip6())
    );
    assert_eq!(ev["key"], SANDBOX_KEY);
    assert_eq!(ev["ipv6_socket"], true);
    assert_eq!(ev["pod_cgroup_id"], shop.frontend_fork.cgroup_id());
    assert_eq!(ev["caller"], "pod default/frontend-fork");

    // --all shows untouched connects to unforked services, by address.
    let mut t = start_trace(
        &mc,
        &pins,
        &["--all", "--service", CATALOG_VIP4, "--count", "1"],
    );
    get(&shop.frontend_fork, CATALOG_VIP4, "").unwrap();
    t.wait_timeout(Duration::from_secs(20)).unwrap();
    let ev = &trace_lines(&t)[0];
    assert_eq!(ev["reason"], "not_forked", "{ev:#}");
    assert_eq!(ev["rewritten"], false);
    assert_eq!(ev["after"], ev["before"]);

    // Ctrl-C switches tracing off; a second tracer is refused while one runs.
    let mut t = start_trace(&mc, &pins, &[]);
    let second = ctl_run(&mc, &pins, &["trace"]);
    assert!(!second.success());
    assert!(
        second.stderr.contains("another trace is running"),
        "{}",
        second.stderr
    );
    t.signal(Signal::SIGINT).unwrap();
    assert!(t.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
    assert_eq!(trace_mode(&mc, &pins), "off");

    // A tracer killed outright leaves the switch on; the agent notices the silent heartbeat
    // and switches it off.
    let mut t = start_trace(&mc, &pins, &[]);
    t.signal(Signal::SIGKILL).unwrap();
    t.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(trace_mode(&mc, &pins), "forked");
    let deadline = Instant::now() + Duration::from_secs(30);
    while trace_mode(&mc, &pins) != "off" {
        assert!(Instant::now() < deadline, "stale trace never switched off");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of one sample of a scrape.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, label: Option<(&str, &str)>) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {metric} {label:?}"));
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{metric}: {other:?}"),
    }
}

fn scrape(mc: &MiniCluster) -> prometheus_parse::Scrape {
    let (code, body) = admin(mc, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn metrics_are_prometheus_text_whose_values_move_with_real_traffic() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_metrics", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let before = scrape(&mc);
    let k = |s: &prometheus_parse::Scrape, r| {
        sample(s, "redirect_kernel_decisions_total", Some(("reason", r)))
    };
    let req = |s: &prometheus_parse::Scrape, dest: &str| {
        s.samples
            .iter()
            .filter(|x| {
                x.metric == "redirect_router_requests_total"
                    && x.labels.get("dest") == Some(dest)
                    && x.labels.get("outcome") == Some("ok")
            })
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => panic!("not a counter"),
            })
            .sum::<f64>()
    };
    let header = format!("baggage: routing-key={SANDBOX_KEY}");
    for _ in 0..3 {
        assert_eq!(
            get_with(&shop.client, CHECKOUT_VIP4, "", Some(&header)).unwrap(),
            "checkout-fork\n"
        );
    }
    assert_eq!(
        get(&shop.client, CHECKOUT_VIP4, "").unwrap(),
        "checkout-base\n"
    );
    get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap();
    let after = scrape(&mc);
    assert_eq!(k(&after, "to_router") - k(&before, "to_router"), 4.0);
    assert_eq!(k(&after, "origin_fork") - k(&before, "origin_fork"), 1.0);
    assert_eq!(req(&after, "fork") - req(&before, "fork"), 3.0);
    assert_eq!(req(&after, "baseline") - req(&before, "baseline"), 1.0);
    let latency_count = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .find(|x| {
                x.metric == "redirect_router_request_duration_seconds_count"
                    && x.labels.get("dest") == Some("fork")
            })
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("not a count: {:?}", x.value),
            })
            .unwrap_or_else(|| panic!("no fork latency count"))
    };
    assert_eq!(latency_count(&after) - latency_count(&before), 3.0);
    assert_eq!(
        sample(
            &after,
            "redirect_map_entries",
            Some(("map", "workloads_v1"))
        ),
        2.0
    );
    assert_eq!(
        sample(
            &after,
            "redirect_map_max_entries",
            Some(("map", "conns_v1"))
        ),
        65536.0
    );
    assert_eq!(
        sample(
            &after,
            "redirect_router_listener_up",
            Some(("family", "ipv4"))
        ),
        1.0
    );
    assert_eq!(sample(&after, "redirect_ready", None), 1.0);
    assert_eq!(sample(&after, "redirect_scrape_errors", None), 0.0);
    let hist = after
        .samples
        .iter()
        .find(|s| s.metric == "redirect_sync_duration_seconds")
        .expect("sync histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.last().unwrap().count >= 1.0, "{buckets:?}")
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // A rejected manifest counts.
    shop.write_manifest(
        "zz-broken.yaml",
        "apiVersion: redirect.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: broken}\nspec:\n  routingKey: \"bad key!\"\n  forks: []\n",
    )
    .unwrap();
    shop.agent
        .as_ref()
        .unwrap()
        .wait_log("manifests rejected", Duration::from_secs(20))
        .unwrap();
    let s = scrape(&mc);
    assert_eq!(sample(&s, "redirect_manifest_rejected_total", None), 1.0);
    assert!(sample(&s, "redirect_manifest_errors_total", None) >= 1.0);
}

#[test]
fn readyz_answers_503_until_the_first_sync_and_200_after() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_readyz", TOOLS) else {
        return;
    };
    let shop = Shop::build(&mc, true).unwrap();
    // The first manifest set is rejected: the agent runs but has never synced.
    shop.write_manifest(
        "zz-broken.yaml",
        "apiVersion: redirect.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: broken}\nspec:\n  routingKey: \"bad key!\"\n  forks: []\n",
    )
    .unwrap();
    let pins = Path::new(redirect_tests::agent::BPFFS).join(mc.id());
    let router4 = format!("{ROUTER_IP4}:{ROUTER_PORT}");
    let bin = agent_bin();
    let mut agent = mc
        .node()
        .spawn(&[
            bin.to_str().unwrap(),
            "run",
            "--manifests",
            shop.manifests.to_str().unwrap(),
            "--cgroup-root",
            mc.cgroup_root().to_str().unwrap(),
            "--pin-dir",
            pins.to_str().unwrap(),
            "--router-v4",
            &router4,
            "--poll-ms",
            "50",
        ])
        .unwrap();
    let _cleanup = Cleanup(pins.clone());
    agent
        .wait_for_log("manifests rejected", Duration::from_secs(30))
        .unwrap();
    assert_eq!(admin(&mc, "GET", "/healthz", None), (200, "ok\n".into()));
    let (code, body) = admin(&mc, "GET", "/readyz", None);
    assert_eq!(code, 503, "{body}");
    std::fs::remove_file(shop.manifests.join("zz-broken.yaml")).unwrap();
    agent
        .wait_for_log(" synced", Duration::from_secs(30))
        .unwrap();
    assert_eq!(admin(&mc, "GET", "/readyz", None), (200, "ready\n".into()));
    let (code, tables) = admin(&mc, "GET", "/tables", None);
    assert_eq!(code, 200);
    let t: Value = serde_json::from_str(&tables).unwrap();
    assert_eq!(t["schema"], "redirect.tables/v1");
    assert_eq!(t["keys"][0]["key"], SANDBOX_KEY);
    assert!(
        t["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "client")
    );
    assert_eq!(admin(&mc, "POST", "/metrics", None).0, 405);
    assert_eq!(admin(&mc, "GET", "/nope", None).0, 404);
    agent.kill().unwrap();
}

/// Removes an agent's pins when the test ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = redirect_agent::loader::cleanup(&self.0);
    }
}

#[test]
fn the_log_level_changes_at_run_time() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_loglevel", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let agent = shop.agent.as_ref().unwrap();
    // A direct connection to the router is refused with a debug-level line.
    let poke = || {
        let url = format!("http://{ROUTER_IP4}:{ROUTER_PORT}/");
        let _ = shop
            .client
            .run(&["curl", "-sS", "--max-time", "5", &url], CLIENT_TIMEOUT);
    };
    const NEEDLE: &str = "refused: no recorded original destination";
    poke();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!agent.log().contains(NEEDLE), "debug logged at info");
    assert_eq!(admin(&mc, "GET", "/loglevel", None), (200, "info\n".into()));

    let (code, body) = admin(&mc, "PUT", "/loglevel", Some("info,redirect_agent=debug"));
    assert_eq!(code, 200, "{body}");
    poke();
    agent.wait_log(NEEDLE, Duration::from_secs(10)).unwrap();
    assert!(agent.log().contains("log filter changed"));
    let s = ctl_json(&mc, &agent.pin_dir, &["status"]);
    assert_eq!(
        s["agent"]["status"]["log_filter"],
        "info,redirect_agent=debug"
    );

    let (code, body) = admin(&mc, "PUT", "/loglevel", Some("[not a filter"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid filter"), "{body}");
}

/// `curl` from `pod` to `url` with extra curl arguments: (status code, body).
fn curl_from(pod: &Pod<'_>, method: &str, url: &str, extra: &[&str]) -> (u16, String) {
    code_and_body(pod.run(&curl_argv(method, url, extra), CTL_TIMEOUT))
}

#[test]
fn a_non_loopback_admin_address_is_refused_unless_allowed_and_then_needs_a_token() {
    let Some(mc) = MiniCluster::new_or_skip("admin_remote", TOOLS) else {
        return;
    };
    let mut shop = Shop::build(&mc, true).unwrap();
    let start = |extra: &[&str]| {
        redirect_tests::agent::Agent::start_with(&mc, &shop.manifests, extra).map(|_| ())
    };
    let err = format!(
        "{:#}",
        start(&["--admin-addr", "0.0.0.0:9967"]).unwrap_err()
    );
    assert!(
        err.contains("--admin-addr 0.0.0.0:9967 is not a loopback address"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        start(&["--admin-addr", "0.0.0.0:9967", "--admin-allow-remote"]).unwrap_err()
    );
    assert!(err.contains("needs --admin-token-file"), "{err}");

    const TOKEN: &str = "s3cret-admin-token";
    let token_file = mc.workdir().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    shop.agent = Some(
        redirect_tests::agent::Agent::start_with(
            &mc,
            &shop.manifests,
            &[
                "--admin-addr",
                "0.0.0.0:9967",
                "--admin-allow-remote",
                "--admin-token-file",
                token_file.to_str().unwrap(),
            ],
        )
        .unwrap(),
    );
    // From a pod, through the node's address: probes and metrics answer, the rest needs the
    // token.
    let url = |path: &str| format!("http://{ROUTER_IP4}:9967{path}");
    let pod = &shop.client;
    assert_eq!(curl_from(pod, "GET", &url("/healthz"), &[]).0, 200);
    assert_eq!(curl_from(pod, "GET", &url("/readyz"), &[]).0, 200);
    assert_eq!(curl_from(pod, "GET", &url("/metrics"), &[]).0, 200);
    let wrong = "Authorization: Bearer not-the-token";
    let right = format!("Authorization: Bearer {TOKEN}");
    for (method, path) in [("GET", "/tables"), ("GET", "/status"), ("GET", "/loglevel")] {
        assert_eq!(curl_from(pod, method, &url(path), &[]).0, 401, "{path}");
        assert_eq!(
            curl_from(pod, method, &url(path), &["-H", wrong]).0,
            401,
            "{path}"
        );
        assert_eq!(
            curl_from(pod, method, &url(path), &["-H", &right]).0,
            200,
            "{path}"
        );
    }
    let put = |auth: &[&str]| {
        let mut extra = vec!["--data-binary", "debug"];
        extra.extend_from_slice(auth);
        curl_from(pod, "PUT", &url("/loglevel"), &extra)
    };
    let (code, body) = put(&[]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(put(&["-H", wrong]).0, 401);
    assert_eq!(
        curl_from(pod, "GET", &url("/loglevel"), &["-H", &right]).1,
        "info\n",
        "an unauthorised PUT changed the filter"
    );
    assert_eq!(put(&["-H", &right]).0, 200);

    // redirectctl reads the token file named by the same variable as the agent's.
    let agent = shop.agent.as_ref().unwrap();
    let admin_url = url("");
    let out = ctl_run(
        &mc,
        &agent.pin_dir,
        &[
            "--admin",
            &admin_url,
            "--admin-token-file",
            token_file.to_str().unwrap(),
            "-o",
            "json",
            "status",
        ],
    );
    let s: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(s["agent"]["reachable"], true, "{s}");
    assert_eq!(s["agent"]["status"]["log_filter"], "debug", "{s}");
    assert!(!agent.log().contains(TOKEN), "the token was logged");
}

#[test]
fn redirectctl_needs_root_and_says_so_and_says_when_nothing_is_pinned() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_preconditions", TOOLS) else {
        return;
    };
    // The unprivileged user may not reach the build tree (a checkout under a 0700 directory):
    // run a copy from the cluster's work dir, which any user can traverse.
    let copy = mc.workdir().join("redirectctl");
    std::fs::copy(ctl_bin(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = std::process::Command::new(&copy);
    cmd.arg("status");
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    // A test thread forking meanwhile can hold the fresh copy's write descriptor for an
    // instant (until its exec closes it): exec then fails with ETXTBSY. Try again, briefly.
    let mut tries = 0;
    let out = loop {
        match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");

    // No agent ever ran with this pin dir: map commands say so, status shows nothing attached.
    let pins = Path::new(redirect_tests::agent::BPFFS).join(format!("{}-none", mc.id()));
    let out = ctl_run(&mc, &pins, &["services"]);
    assert!(!out.success());
    assert!(out.stderr.contains("nothing pinned at"), "{}", out.stderr);
    let s = ctl_json(&mc, &pins, &["status"]);
    assert_eq!(s["pinned"], false);
    for p in s["programs"].as_array().unwrap() {
        assert_eq!(p["attached"], false);
        assert_eq!(p["error"], "not pinned");
    }
    assert_eq!(s["agent"]["reachable"], false);
}

#[test]
fn with_o_json_an_error_is_a_json_document_on_stdout() {
    let Some(mc) = MiniCluster::new_or_skip("ctl_json_errors", TOOLS) else {
        return;
    };
    let pins = Path::new(redirect_tests::agent::BPFFS).join(format!("{}-none", mc.id()));
    let run = |args: &[&str]| ctl_run(&mc, &pins, args);
    for (args, kind, says, code) in [
        (
            &["-o", "json", "services"][..],
            "not_pinned",
            "nothing pinned at",
            1,
        ),
        (
            &["routes", "--output=json"],
            "not_pinned",
            "nothing pinned at",
            1,
        ),
        (
            &["-o", "json", "explain", "--from", "x", "--to", "nowhere"],
            "usage",
            "invalid value 'nowhere' for '--to <TO>'",
            2,
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", out.stderr);
        let doc: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {:?}", out.stdout));
        assert_eq!(doc["schema"], "redirectctl.error/v1", "{doc}");
        assert_eq!(doc["kind"], kind, "{doc}");
        assert!(str_of(&doc["error"]).contains(says), "{doc}");
        assert_eq!(out.stderr, "", "{args:?}");
    }
    // Without -o json the error stays a line on stderr.
    let out = run(&["services"]);
    assert!(!out.success());
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("nothing pinned at"), "{}", out.stderr);
}

/// Runs the failure walkthrough of `docs/debugging.md` and writes every command with its real
/// output to `$REDIRECT_CAPTURE` (markdown blocks). Run by hand:
/// `REDIRECT_CAPTURE=/tmp/capture.md cargo test -p redirect-tests --test ctl -- --ignored capture`.
#[test]
#[ignore = "writes the documentation's command output; run by hand"]
fn capture_debugging_walkthrough() {
    let Some(out_path) = std::env::var_os("REDIRECT_CAPTURE") else {
        redirect_tests::skip("ctl_capture", "set REDIRECT_CAPTURE to a file");
        return;
    };
    let Some(mc) = MiniCluster::new_or_skip("ctl_capture", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pins = pin_dir(&shop);
    let mut doc = String::new();
    let mut show = |title: &str, args: &[&str]| {
        let out = ctl_run(&mc, &pins, args);
        doc.push_str(&format!(
            "### {title}\n\n```console\n$ redirectctl {}\n{}{}```\n\n",
            args.join(" "),
            out.stdout,
            out.stderr
        ));
    };
    let checkout4 = format!("{CHECKOUT_VIP4}:80");
    let catalog4 = format!("{CATALOG_VIP4}:80");
    show("healthy: status", &["status"]);
    show("healthy: sandboxes", &["sandboxes"]);
    show("healthy: routes", &["routes"]);
    show("healthy: workloads", &["workloads"]);
    show(
        "healthy: explain as JSON",
        &[
            "-o",
            "json",
            "explain",
            "--from",
            "default/client",
            "--to",
            &format!("{CHECKOUT_VIP4}:80"),
            "--key",
            SANDBOX_KEY,
        ],
    );

    // Key not propagated: a baseline caller without the key.
    let mut t = ctl_spawn(
        &mc,
        &pins,
        &[
            "trace",
            "--service",
            "default/checkout:http",
            "--count",
            "2",
        ],
    );
    t.wait_for_log("tracing", Duration::from_secs(20)).unwrap();
    get(&shop.client, CHECKOUT_VIP4, "").unwrap();
    get(&shop.frontend_fork, CHECKOUT_VIP4, "").unwrap();
    t.wait_timeout(Duration::from_secs(20)).unwrap();
    let mut doc2 = format!(
        "### key not propagated: trace\n\n```console\n$ redirectctl trace --service default/checkout:http --count 2\n{}```\n\n",
        t.log()
    );
    show(
        "key not propagated: explain without the key",
        &["explain", "--from", "default/client", "--to", &checkout4],
    );
    show(
        "key not propagated: explain with the key",
        &[
            "explain",
            "--from",
            "default/client",
            "--to",
            &checkout4,
            "--key",
            SANDBOX_KEY,
        ],
    );
    show("key not propagated: counters", &["counters"]);
    let (_, metrics) = admin(&mc, "GET", "/metrics", None);
    let metrics_doc = format!(
        "### metrics\n\n```console\n$ curl -s http://127.0.0.1:9967/metrics\n{metrics}```\n\n"
    );

    // Service not forked.
    show("service not forked: services", &["services"]);
    show(
        "service not forked: explain",
        &[
            "explain",
            "--from",
            "default/frontend-fork",
            "--to",
            &catalog4,
        ],
    );

    // Fork not ready: the checkout fork pod goes away.
    shop.remove_pod_manifest(&shop.checkout_fork).unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    show("fork not ready: routes", &["routes"]);
    show(
        "fork not ready: explain from the fork pod",
        &[
            "explain",
            "--from",
            "default/frontend-fork",
            "--to",
            &checkout4,
        ],
    );
    show(
        "fork not ready: explain for a keyed request",
        &[
            "explain",
            "--from",
            "default/client",
            "--to",
            &checkout4,
            "--key",
            SANDBOX_KEY,
        ],
    );

    // Agent down.
    shop.agent().kill9().unwrap();
    show("agent down: status", &["status"]);
    show(
        "agent down: explain",
        &["explain", "--from", shop.client.uid(), "--to", &checkout4],
    );

    // Programs not attached: everything cleaned up.
    shop.agent().cleanup().unwrap();
    show("programs not attached: status", &["status"]);
    show("programs not attached: services", &["services"]);
    doc2.push_str(&doc);
    doc2.push_str(&metrics_doc);

    std::fs::write(out_path, doc2).unwrap();
}
