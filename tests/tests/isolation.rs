//! No client pod can degrade routing for another: pooled upstream connections are never shared
//! between pods nor reused dirty, one pod's HTTP/2 streams and windows stay its own, silent and
//! slow connections are bounded per pod, and a full router fails open. Real clients, servers and
//! eBPF programs in network namespaces; skips when not root.

use std::time::Duration;

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
const H2PEER: &str = env!("CARGO_BIN_EXE_h2peer");

fn podserver(pod: &Pod<'_>, name: &str) -> Proc {
    pod.spawn_server(&podserver_bin(), name, PORT).unwrap()
}

fn h2_server(pod: &Pod<'_>, name: &str) -> Proc {
    let [l4, l6] = [
        format!("{}:{H2_PORT}", pod.ip4()),
        format!("[{}]:{H2_PORT}", pod.ip6()),
    ];
    spawn_listening(
        pod,
        &[
            H2PEER, "server", "--name", name, "--listen", &l4, "--listen", &l6,
        ],
    )
}

/// Two baseline client pods (an attacker and a victim), a baseline `shop` service (ports 80 →
/// 8080 and 9090 → 9090) and its fork in the sandbox `tenant-x`; each test starts the servers.
struct Scene<'c> {
    agent: Option<Agent>,
    _servers: Vec<Proc>,
    attacker: Pod<'c>,
    victim: Pod<'c>,
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
            &[(80, PORT), (H2_PORT, H2_PORT)],
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
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }
}

/// One keyed GET of `path` from `pod` on a new connection: (status, body).
fn keyed_get(pod: &Pod<'_>, path: &str) -> (u16, String) {
    let url = format!("http://{VIP4}/{path}");
    let header = format!("baggage: routing-key={KEY}");
    let out = pod
        .run(
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-H",
                &header,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                &url,
            ],
            CLIENT_TIMEOUT,
        )
        .unwrap();
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
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
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while attacker.log().matches("response 502").count() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "streams not cut: {}",
            attacker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
