//! No client pod can degrade routing for another: pooled upstream connections are never shared
//! between pods nor reused dirty, one pod's HTTP/2 streams and windows stay its own, silent and
//! slow connections are bounded per pod, and a full router fails open. Real clients, servers and
//! eBPF programs in network namespaces; skips when not root.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use redirect_tests::{
    MiniCluster, Pod, Proc,
    agent::Agent,
    peers::spawn_listening,
    scene::{CLIENT_TIMEOUT, podserver_bin, sandbox_manifest},
};

const TOOLS: &[&str] = &["curl", "python3"];
const KEY: &str = "tenant-x";
const VIP4: &str = "10.200.2.20";
const VIP6: &str = "fd00:200::2:20";
const PORT: u16 = 8080;
const H2_PORT: u16 = 9090;
/// A shop port that declares no protocol: silent connections to it wait for detection and
/// become opaque tunnels (on the declared port 80 they would wait for a request instead).
const UNDECLARED_PORT: u16 = 8080;
const H2PEER: &str = env!("CARGO_BIN_EXE_h2peer");

fn podserver(pod: &Pod<'_>, name: &str) -> Proc {
    pod.spawn_server(&podserver_bin(), name, PORT).unwrap()
}

fn h2_server(pod: &Pod<'_>, name: &str) -> Proc {
    redirect_tests::peers::h2peer_server(pod, H2PEER, name, H2_PORT, &[])
}

/// Two baseline client pods (an attacker and a victim), a baseline `shop` service (ports 80 →
/// 8080 named `http`, so declared HTTP; 9090 → 9090 and 8080 → 8080, undeclared: the router
/// detects) and its fork in the sandbox `tenant-x`; each test starts the servers.
struct Scene<'c> {
    agent: Option<Agent>,
    _servers: Vec<Proc>,
    attacker: Pod<'c>,
    victim: Pod<'c>,
    workdir: PathBuf,
}

impl<'c> Scene<'c> {
    /// Builds the pods, starts `servers(baseline pod, fork pod)` and the agent with
    /// `agent_args`.
    fn new(
        mc: &'c MiniCluster,
        servers: impl FnOnce(&Pod<'c>, &Pod<'c>) -> Vec<Proc>,
        agent_args: &[&str],
    ) -> Scene<'c> {
        let attacker = mc
            .pod_with_labels("attacker", &[("app", "attacker")])
            .unwrap();
        let victim = mc.pod_with_labels("victim", &[("app", "victim")]).unwrap();
        let base = mc.pod_with_labels("shop-base", &[("app", "shop")]).unwrap();
        let fork = mc
            .pod_with_labels(
                "shop-fork",
                &[("app", "shop"), ("redirect.dev/sandbox", KEY)],
            )
            .unwrap();
        let servers = servers(&base, &fork);
        mc.service(
            "shop",
            VIP4,
            VIP6,
            &[(80, PORT), (H2_PORT, H2_PORT), (UNDECLARED_PORT, PORT)],
            &[&base],
        )
        .unwrap();
        let manifests = mc.workdir().join("manifests");
        mc.write_manifests(&manifests).unwrap();
        std::fs::write(
            manifests.join("sandbox.yaml"),
            sandbox_manifest(KEY, "Unavailable", &["shop"]),
        )
        .unwrap();
        let agent = Agent::start_with(mc, &manifests, agent_args).unwrap();
        Scene {
            agent: Some(agent),
            _servers: servers,
            attacker,
            victim,
            workdir: mc.workdir().to_path_buf(),
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Writes a client script into the work dir and returns its path.
    fn script(&self, name: &str, text: &str) -> String {
        let path = self.workdir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

/// One GET of `path` from `pod` on a new connection, with `extra` curl arguments: (status,
/// body); status 0 when the connection failed.
fn get(pod: &Pod<'_>, path: &str, max_time: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{VIP4}/{path}");
    let mut argv = vec!["curl", "-sS", "--max-time", max_time];
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&["-o", "-", "-w", "\n%{http_code}", &url]);
    let out = pod.run(&argv, CLIENT_TIMEOUT).unwrap();
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// One keyed GET of `path` from `pod` on a new connection: (status, body).
fn keyed_get(pod: &Pod<'_>, path: &str) -> (u16, String) {
    let header = format!("baggage: routing-key={KEY}");
    get(pod, path, "5", &["-H", &header])
}

/// A slow HTTP/1.1 server (300 ms per request) that answers every request with its path and,
/// 150 ms later, writes an extra response nobody asked for (`LEAKED`) on the same connection:
/// a buggy or hostile fork.
const EXTRA_RESPONSE_SERVER: &str = r#"
import socket, sys, threading, time
def serve(c):
    f = c.makefile('rb')
    try:
        while True:
            line = f.readline()
            if not line: break
            path = line.split()[1]
            while True:
                h = f.readline()
                if h in (b'\r\n', b''): break
            body = path + b'\n'
            time.sleep(0.3)
            resp = b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body
            c.sendall(resp)
            extra = b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nLEAKED\n'
            threading.Timer(0.15, c.sendall, args=(extra,)).start()
    except OSError:
        pass
    c.close()
def listen(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for fam, addr in ((socket.AF_INET, (sys.argv[1], 8080)), (socket.AF_INET6, (sys.argv[2], 8080))):
    threading.Thread(target=listen, args=(fam, addr), daemon=True).start()
print('listening', flush=True)
threading.Event().wait()
"#;

#[test]
fn an_unrequested_extra_response_from_a_fork_never_reaches_another_request() {
    let Some(mc) = MiniCluster::new_or_skip("extra_response", TOOLS) else {
        return;
    };
    let script = mc.workdir().join("extra_response_server.py");
    std::fs::write(&script, EXTRA_RESPONSE_SERVER).unwrap();
    let scene = Scene::new(
        &mc,
        |base, fork| {
            vec![
                podserver(base, "shop-base"),
                spawn_listening(
                    fork,
                    &[
                        "python3",
                        script.to_str().unwrap(),
                        &fork.ip4().to_string(),
                        &fork.ip6().to_string(),
                    ],
                ),
            ]
        },
        // One worker: every request shares one upstream pool, the case to guard.
        &["--router-workers", "1"],
    );
    let mut wrong = Vec::new();
    for i in 0..12 {
        // The victim asks right after the attacker, while the stray response is on its way;
        // then a pause, so the attacker's own next request finds it arrived.
        for (who, pod) in [("attacker", &scene.attacker), ("victim", &scene.victim)] {
            let path = format!("{who}-{i}");
            let (code, body) = keyed_get(pod, &path);
            if (code, body.as_str()) != (200, format!("/{path}\n").as_str()) {
                wrong.push(format!("{path}: {code} {body:?}"));
            }
        }
        std::thread::sleep(Duration::from_millis(600));
    }
    println!("requests answered with another request's response: {wrong:?}");
    assert!(wrong.is_empty(), "{} of 24 wrong: {wrong:?}", wrong.len());
    let log = scene.agent().log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The victim's HTTP/2 figures, printed and checked.
fn h2_victim(scene: &Scene<'_>, attack: &str) -> serde_json::Value {
    let target = format!("{VIP4}:{H2_PORT}");
    let header = format!("baggage: routing-key={KEY}");
    let out = scene
        .victim
        .run(
            &[
                H2PEER,
                "victim",
                "--target",
                &target,
                "--path",
                "/bytes/1000000",
                "--count",
                "10",
                "--header",
                &header,
                "--timeout-ms",
                "5000",
            ],
            Duration::from_secs(90),
        )
        .unwrap()
        .check()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    println!("victim HTTP/2 requests during {attack}: {v}");
    v
}

fn h2_scene<'c>(mc: &'c MiniCluster) -> Scene<'c> {
    Scene::new(
        mc,
        |base, fork| vec![h2_server(base, "shop-base"), h2_server(fork, "shop-fork")],
        // One worker: every connection shares its upstream pool, the case to guard.
        &["--router-workers", "1"],
    )
}

#[test]
fn a_client_with_a_shut_http2_window_does_not_stall_another_pods_responses() {
    let Some(mc) = MiniCluster::new_or_skip("h2_window0", TOOLS) else {
        return;
    };
    let scene = h2_scene(&mc);
    let target = format!("{VIP4}:{H2_PORT}");
    let header = format!("baggage: routing-key={KEY}");
    // Ten large responses it never reads: they would fill a shared upstream connection's window.
    let mut attacker = scene
        .attacker
        .spawn(&[
            H2PEER,
            "window0",
            "--target",
            &target,
            "--path",
            "/bytes/8000000",
            "--streams",
            "10",
            "--header",
            &header,
        ])
        .unwrap();
    attacker
        .wait_for_log("holding", Duration::from_secs(20))
        .unwrap();
    let v = h2_victim(&scene, "a window-0 client");
    println!("attacker: {}", attacker.log().trim());
    assert_eq!(v["ok"], 10, "{v}");
}

#[test]
fn a_client_holding_every_upstream_http2_stream_does_not_block_another_pod() {
    let Some(mc) = MiniCluster::new_or_skip("h2_open_bodies", TOOLS) else {
        return;
    };
    let scene = h2_scene(&mc);
    let target = format!("{VIP4}:{H2_PORT}");
    let header = format!("baggage: routing-key={KEY}");
    // The upstream allows 100 streams per connection; these never end their bodies.
    let mut attacker = scene
        .attacker
        .spawn(&[
            H2PEER,
            "open-bodies",
            "--target",
            &target,
            "--path",
            "/upload",
            "--streams",
            "100",
            "--header",
            &header,
        ])
        .unwrap();
    attacker
        .wait_for_log("holding", Duration::from_secs(20))
        .unwrap();
    let v = h2_victim(&scene, "100 never-ending request bodies");
    println!("attacker: {}", attacker.log().trim());
    assert_eq!(v["ok"], 10, "{v}");
}

#[test]
fn an_http2_request_body_silent_past_the_body_idle_limit_is_cut() {
    let Some(mc) = MiniCluster::new_or_skip("h2_body_idle", TOOLS) else {
        return;
    };
    let scene = Scene::new(
        &mc,
        |base, fork| vec![h2_server(base, "shop-base"), h2_server(fork, "shop-fork")],
        &["--body-idle-timeout-ms", "1000"],
    );
    let target = format!("{VIP4}:{H2_PORT}");
    let mut attacker = scene
        .attacker
        .spawn(&[
            H2PEER,
            "open-bodies",
            "--target",
            &target,
            "--path",
            "/upload",
            "--streams",
            "5",
        ])
        .unwrap();
    attacker
        .wait_for_log("holding", Duration::from_secs(20))
        .unwrap();
    // Each stream is cut after 1 s of silence: the router answers it 502 and resets it upstream.
    let deadline = Instant::now() + Duration::from_secs(15);
    while attacker.log().matches("response 502").count() < 5 {
        assert!(
            Instant::now() < deadline,
            "streams not cut: {}",
            attacker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `n` connections that never send a byte (stopping after `budget` seconds of
/// connecting), holds them `hold` seconds watching which the far end closes, then prints JSON:
/// opened, connect_failed, open_at_end, close_after_s (the first 50, seconds from opening).
const SILENT_CLIENT: &str = r#"
import json, select, socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
budget = float(sys.argv[5]) if len(sys.argv) > 5 else 60
socks, failed, opened_at = {}, 0, {}
began = time.monotonic()
for i in range(n):
    if time.monotonic() - began > budget:
        failed += n - i; break
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:  # out of descriptors: hold what is open
        failed += n - i; break
    s.settimeout(2)
    try:
        s.connect((host, port))
        socks[s.fileno()] = s; opened_at[s.fileno()] = time.monotonic()
    except OSError:
        failed += 1; s.close()
print('holding', len(socks), failed, flush=True)
p = select.poll()
for fd in socks: p.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
start, closes = time.monotonic(), []
while time.monotonic() - start < hold and socks:
    for fd, ev in p.poll(100):
        s = socks.get(fd)
        if s is None: continue
        try:
            if s.recv(1, socket.MSG_DONTWAIT): continue
        except BlockingIOError:
            continue
        except OSError:
            pass
        p.unregister(fd); del socks[fd]
        closes.append(round(time.monotonic() - opened_at[fd], 2)); s.close()
print(json.dumps({"opened": n - failed, "connect_failed": failed, "open_at_end": len(socks),
                  "close_after_s": closes[:50]}), flush=True)
"#;

/// A baseline server that holds every connection open as long as the client does and answers
/// any HTTP request `shop-base`.
const HOLDING_SERVER: &str = r#"
import asyncio, sys
async def serve(r, w):
    data = b''
    try:
        while b'\r\n\r\n' not in data:
            c = await r.read(4096)
            if not c: break
            data += c
        if b'\r\n\r\n' in data:
            w.write(b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshop-base\n')
            await w.drain()
    except OSError:
        pass
    w.close()
async def main():
    servers = [await asyncio.start_server(serve, h, 8080, backlog=4096) for h in sys.argv[1:3]]
    print('listening', flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))
asyncio.run(main())
"#;

/// `n` keyed GETs of `/peer`, one after the other, each on a new connection with a 5 s limit;
/// prints JSON: ok, failed, p50_ms, p99_ms, served (response body by count), errors.
const VICTIM_CLIENT: &str = r#"
import json, socket, sys, time
host, port, n, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ok, lat, served, errors = 0, [], {}, {}
for i in range(n):
    t = time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(('GET / HTTP/1.1\r\nHost: x\r\nbaggage: routing-key=%s\r\nConnection: close\r\n\r\n' % key).encode())
        data = b''
        while True:
            c = s.recv(65536)
            if not c: break
            data += c
        s.close()
        head, body = data.split(b'\r\n\r\n', 1)
        status = head.split(b' ', 2)[1].decode()
        if status == '200':
            ok += 1; b = body.decode().strip(); served[b] = served.get(b, 0) + 1
        else:
            errors[status] = errors.get(status, 0) + 1
    except Exception as e:
        k = type(e).__name__; errors[k] = errors.get(k, 0) + 1
    lat.append((time.monotonic() - t) * 1000)
    time.sleep(0.05)
lat.sort()
pct = lambda p: round(lat[max(0, int(len(lat) * p + 0.999999) - 1)], 1) if lat else 0
print(json.dumps({"ok": ok, "failed": n - ok, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                  "served": served, "errors": errors}))
"#;

fn http_scene<'c>(mc: &'c MiniCluster, agent_args: &[&str]) -> Scene<'c> {
    Scene::new(
        mc,
        |base, fork| vec![podserver(base, "shop-base"), podserver(fork, "shop-fork")],
        agent_args,
    )
}

/// Starts `n` silent connections from the attacker to the undeclared port, held `hold_s`;
/// returns once they are open.
fn silent_attack(scene: &Scene<'_>, n: usize, hold_s: u32) -> Proc {
    let script = scene.script("silent_client.py", SILENT_CLIENT);
    let port = UNDECLARED_PORT.to_string();
    let mut p = scene
        .attacker
        .spawn(&[
            "python3",
            &script,
            VIP4,
            &port,
            &n.to_string(),
            &hold_s.to_string(),
            "40",
        ])
        .unwrap();
    p.wait_for_log("holding", Duration::from_secs(90)).unwrap();
    p
}

/// The attacker's final report.
fn silent_report(p: &mut Proc, within: Duration) -> serde_json::Value {
    p.wait_timeout(within)
        .unwrap()
        .expect("the silent client finished");
    let log = p.log();
    let line = log.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {log}"))
}

/// `n` keyed requests from the victim; prints and returns its figures.
fn victim_run(scene: &Scene<'_>, n: usize, during: &str) -> serde_json::Value {
    let script = scene.script("victim_client.py", VICTIM_CLIENT);
    let out = scene
        .victim
        .run(
            &["python3", &script, VIP4, "80", &n.to_string(), KEY],
            Duration::from_secs(10 * n as u64),
        )
        .unwrap()
        .check()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    println!("victim HTTP/1.1 requests {during}: {v}");
    v
}

#[test]
fn one_pod_cannot_hold_more_than_its_share_of_the_router() {
    let Some(mc) = MiniCluster::new_or_skip("pod_share", TOOLS) else {
        return;
    };
    let scene = http_scene(&mc, &["--max-connections-per-pod", "100"]);
    let mut attacker = silent_attack(&scene, 1000, 6);
    let v = victim_run(
        &scene,
        20,
        "while another pod opens 1000 silent connections",
    );
    let a = silent_report(&mut attacker, Duration::from_secs(30));
    println!("attacker: {a}");
    assert_eq!(v["ok"], 20, "{v}");
    assert_eq!(
        v["served"]["shop-fork"], 20,
        "keyed requests still routed: {v}"
    );
    assert!(
        a["open_at_end"].as_u64().unwrap() <= 100,
        "the attacker kept more than its share: {a}"
    );
}

#[test]
fn a_pods_buffer_budget_bounds_the_connections_it_holds() {
    let Some(mc) = MiniCluster::new_or_skip("pod_buffer_budget", TOOLS) else {
        return;
    };
    // Ten connections' worth: each may make the router hold 144 KiB (128 KiB HTTP/2 window,
    // 16 KiB copy buffers).
    let budget = (10 * 144 * 1024).to_string();
    let scene = http_scene(&mc, &["--max-buffered-bytes-per-pod", &budget]);
    let mut attacker = silent_attack(&scene, 50, 4);
    let v = victim_run(&scene, 10, "while another pod opens 50 silent connections");
    let a = silent_report(&mut attacker, Duration::from_secs(30));
    println!("attacker: {a}");
    assert_eq!(v["ok"], 10, "{v}");
    assert_eq!(a["open_at_end"], 10, "{a}");
}

#[test]
fn victims_keep_routing_while_one_pod_opens_twenty_thousand_silent_connections() {
    let Some(mc) = MiniCluster::new_or_skip("twenty_thousand", TOOLS) else {
        return;
    };
    // Default limits: 1024 connections per pod, the agent's own file descriptor limit. The
    // baseline holds every connection it gets (as a database would), so nothing but the router
    // bounds the attacker.
    let script = mc.workdir().join("holding_server.py");
    std::fs::write(&script, HOLDING_SERVER).unwrap();
    let scene = Scene::new(
        &mc,
        |base, fork| {
            vec![
                spawn_listening(
                    base,
                    &[
                        "python3",
                        script.to_str().unwrap(),
                        &base.ip4().to_string(),
                        &base.ip6().to_string(),
                    ],
                ),
                podserver(fork, "shop-fork"),
            ]
        },
        &[],
    );
    let mut attacker = silent_attack(&scene, 20_000, 10);
    let v = victim_run(
        &scene,
        50,
        "while another pod opens 20,000 silent connections",
    );
    let a = silent_report(&mut attacker, Duration::from_secs(60));
    println!(
        "attacker: {}",
        serde_json::json!({"opened": a["opened"], "connect_failed": a["connect_failed"], "open_at_end": a["open_at_end"]})
    );
    assert_eq!(v["ok"], 50, "{v}");
    assert_eq!(
        v["served"]["shop-fork"], 50,
        "keyed requests still routed: {v}"
    );
}

#[test]
fn silent_opaque_tunnels_are_closed_after_the_idle_limit() {
    let Some(mc) = MiniCluster::new_or_skip("opaque_idle", TOOLS) else {
        return;
    };
    let scene = http_scene(&mc, &["--opaque-idle-timeout-ms", "1500"]);
    let mut attacker = silent_attack(&scene, 5, 12);
    let a = silent_report(&mut attacker, Duration::from_secs(30));
    println!("silent connections: {a}");
    assert_eq!(a["open_at_end"], 0, "{a}");
    for t in a["close_after_s"].as_array().unwrap() {
        let t = t.as_f64().unwrap();
        // 500 ms of detection, then 1.5 s without a byte either way; the upstream's own idle
        // limit (30 s) is far off.
        assert!((1.9..10.0).contains(&t), "closed after {t} s: {a}");
    }
}

#[test]
fn a_full_router_takes_itself_out_so_new_connections_go_straight_to_their_destination() {
    let Some(mc) = MiniCluster::new_or_skip("full_router_fails_open", TOOLS) else {
        return;
    };
    let scene = http_scene(
        &mc,
        &[
            "--max-connections",
            "100",
            "--max-connections-per-pod",
            "1000",
        ],
    );
    let mut attacker = silent_attack(&scene, 300, 8);
    let v = victim_run(&scene, 20, "while the router is full");
    let a = silent_report(&mut attacker, Duration::from_secs(30));
    println!("attacker: {a}");
    assert_eq!(v["ok"], 20, "{v}");
    assert_eq!(
        v["served"]["shop-base"], 20,
        "fail open: straight to the original destination: {v}"
    );
    // The attacker is gone: the router takes connections again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = victim_run(&scene, 1, "after the attack");
        if v["served"]["shop-fork"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the router never came back: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = scene.agent().log();
    assert!(log.contains("router full"), "{log}");
}

#[test]
fn a_router_out_of_file_descriptors_fails_open_and_does_not_spin() {
    let Some(mc) = MiniCluster::new_or_skip("router_emfile", &["curl", "python3", "prlimit"])
    else {
        return;
    };
    let scene = http_scene(&mc, &[]);
    let pid = scene.agent().pid().unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={0}:{0}", open + 200);
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut attacker = silent_attack(&scene, 400, 10);
    // Past the detection timeout: every accepted silent connection wants an upstream socket.
    std::thread::sleep(Duration::from_secs(1));
    let v = victim_run(&scene, 20, "while the router is out of file descriptors");
    let a = silent_report(&mut attacker, Duration::from_secs(30));
    println!("attacker: {a}");
    assert_eq!(v["ok"], 20, "{v}");
    let log = scene.agent().log();
    let warnings = log.matches("accept failed").count();
    println!("accept warnings logged: {warnings}");
    assert!(
        warnings <= 10,
        "the accept loop spins on EMFILE: {warnings} warnings"
    );
}

/// A NetworkPolicy stand-in in the node: connections from `pod` to the shop's pods are reset.
fn deny_to_shop(mc: &MiniCluster, pod: &Pod<'_>, shop: &[&str]) {
    let rules = format!(
        "table inet rdt_policy {{\n chain forward {{\n  type filter hook forward priority 0;\n  ip saddr {} ip daddr {{ {} }} tcp dport {PORT} reject with tcp reset\n }}\n}}\n",
        pod.ip4(),
        shop.join(", ")
    );
    let file = mc.workdir().join("policy.nft");
    std::fs::write(&file, rules).unwrap();
    mc.node()
        .run(
            &["nft", "-f", file.to_str().unwrap()],
            Duration::from_secs(20),
        )
        .unwrap()
        .check()
        .unwrap();
}

#[test]
fn upstream_connections_keep_the_client_pods_address_and_policy_with_and_without_a_sandbox() {
    let Some(mc) = MiniCluster::new_or_skip("client_identity", TOOLS) else {
        return;
    };
    let mut scene = http_scene(&mc, &[]);
    let shop: Vec<String> = ["shop-base", "shop-fork"]
        .iter()
        .map(|n| mc_pod_ip(&mc, n))
        .collect();
    let shop: Vec<&str> = shop.iter().map(String::as_str).collect();
    deny_to_shop(&mc, &scene.attacker, &shop);
    // With the Sandbox: keyed (to the fork) and unkeyed (to baseline) requests go through the
    // router, which connects as the attacker: the rule holds.
    for path in ["with-key", "peer"] {
        let (code, body) = keyed_get(&scene.attacker, path);
        assert_ne!(code, 200, "denied pod reached the fork: {body}");
    }
    let (code, body) = unkeyed_get(&scene.attacker);
    assert_ne!(code, 200, "denied pod reached baseline: {body}");
    // Others are not affected, and the fork sees the victim's own address, not the node's.
    let (code, peer) = keyed_get(&scene.victim, "peer");
    assert_eq!(code, 200, "{peer}");
    assert!(
        peer.starts_with(&format!("{}:", scene.victim.ip4())),
        "the upstream saw {peer}, not the victim {}",
        scene.victim.ip4()
    );
    // Without the Sandbox the kernel leaves the connection alone: the rule holds as always.
    std::fs::remove_file(mc.workdir().join("manifests/sandbox.yaml")).unwrap();
    scene
        .agent
        .as_mut()
        .unwrap()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    let (code, body) = unkeyed_get(&scene.attacker);
    assert_ne!(code, 200, "denied pod reached baseline directly: {body}");
    assert_eq!(unkeyed_get(&scene.victim).0, 200);
}

/// `10.200.1.N` of the pod named `name` (from the manifests the harness wrote).
fn mc_pod_ip(mc: &MiniCluster, name: &str) -> String {
    let text =
        std::fs::read_to_string(mc.workdir().join(format!("manifests/pod-{name}.yaml"))).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("podIP:"))
        .unwrap();
    line.split(':')
        .nth(1)
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string()
}

/// One GET without a key from `pod` on a new connection: (status, body); status 0 when the
/// connection failed.
fn unkeyed_get(pod: &Pod<'_>) -> (u16, String) {
    get(pod, "", "8", &[])
}

/// Sends an HTTP request one byte per second from its first byte; prints the seconds until
/// the far end closed (answered or cut), or `open` after 20 s.
const TRICKLE_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
start = time.monotonic()
data = b'GET / HTTP/1.1\r\nHost: x\r\nx-pad: ' + b'a' * 40 + b'\r\n\r\n'
for b in data[:20]:
    try:
        s.sendall(bytes([b]))
        s.settimeout(1)
        got = s.recv(4096)
        if not got:
            print(round(time.monotonic() - start, 1)); sys.exit(0)
    except socket.timeout:
        continue
    except OSError:
        print(round(time.monotonic() - start, 1)); sys.exit(0)
print('open')
"#;

#[test]
fn a_client_trickling_its_first_bytes_is_cut_at_the_header_timeout() {
    let Some(mc) = MiniCluster::new_or_skip("trickle", TOOLS) else {
        return;
    };
    let scene = http_scene(&mc, &["--header-timeout-ms", "3000"]);
    let script = scene.script("trickle_client.py", TRICKLE_CLIENT);
    let out = scene
        .attacker
        .run(&["python3", &script, VIP4, "80"], Duration::from_secs(40))
        .unwrap()
        .check()
        .unwrap();
    println!("a client sending 1 byte/s: closed after {} s", out.trim());
    let after: f64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not cut: {out}"));
    // Detection gives a client that started speaking the header timeout (3 s), then the
    // request head gets its own: at most ~6 s.
    assert!(after < 10.0, "cut after {after} s");
}

#[test]
fn a_router_with_room_refills_its_liveness_slot_when_another_router_cleared_it() {
    let Some(mc) = MiniCluster::new_or_skip("liveness_refill", &["curl", "python3", "bpftool"])
    else {
        return;
    };
    let scene = http_scene(&mc, &[]);
    let map = scene
        .agent()
        .pin_dir
        .join(redirect_common::MAP_ROUTER_SOCKS);
    // What a full router sharing the address (the other agent during an upgrade) does.
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "delete",
            "pinned",
            map.to_str().unwrap(),
            "key",
            "0",
            "0",
            "0",
            "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = victim_run(&scene, 1, "after the liveness slot was cleared");
        if v["served"]["shop-fork"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router never registered again: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn with_upstream_netns_node_the_upstream_sees_the_nodes_address() {
    let Some(mc) = MiniCluster::new_or_skip("upstream_netns_node", TOOLS) else {
        return;
    };
    let scene = http_scene(&mc, &["--upstream-netns", "node"]);
    let (code, peer) = keyed_get(&scene.victim, "peer");
    assert_eq!(code, 200, "{peer}");
    assert!(
        peer.starts_with(&format!("{}:", redirect_tests::ROUTER_IP4)),
        "{peer}"
    );
}
