//! SIGTERM drains the router: it stops accepting (new connections go straight to their
//! destination, the pinned data path stays), the request in flight finishes and is answered
//! with `Connection: close`, idle keep-alive connections are closed (HTTP/1) or get GOAWAY
//! (HTTP/2), the agent exits as soon as nothing is left, and its log says what it drained.
//! Skips without root.

use std::time::{Duration, Instant};

use redirect_tests::{MiniCluster, agent::read_counters, scene::*};

const TOOLS: &[&str] = &["curl", "python3"];

/// In the client pod: an idle HTTP/1.1 keep-alive connection (one request served), an idle
/// HTTP/2 connection (preface and settings), and a request in flight (`/sleep/3000`). Prints
/// `in-flight` once all three are open, then one line per event with seconds since its start:
/// `idle-closed T`, `goaway T`, `h2-closed T`, `inflight-done T STATUS close=BOOL BODY`.
const CLIENTS: &str = r#"
import select, socket, time
t0 = time.monotonic()
def now(): return "%.3f" % (time.monotonic() - t0)
VIP = "10.200.2.10"
a = socket.create_connection((VIP, 80), timeout=10)
a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
got = b""
while b"checkout-base\n" not in got:
    c = a.recv(4096)
    if not c: raise SystemExit("keep-alive connection closed early")
    got += c
h2 = socket.create_connection((VIP, 80), timeout=10)
h2.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
b = socket.create_connection((VIP, 80), timeout=10)
b.sendall(b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\n\r\n")
print("in-flight", flush=True)
bufs = {a: b"", h2: b"", b: b""}
open_ = [a, h2, b]
deadline = time.monotonic() + 20
while open_ and time.monotonic() < deadline:
    ready, _, _ = select.select(open_, [], [], 0.5)
    for s in ready:
        try:
            c = s.recv(65536)
        except ConnectionResetError:
            c = b""
        if s is h2 and c:
            bufs[h2] += c
            while len(bufs[h2]) >= 9:
                n = int.from_bytes(bufs[h2][:3], "big")
                if len(bufs[h2]) < 9 + n: break
                kind, flags, payload = bufs[h2][3], bufs[h2][4], bufs[h2][9:9 + n]
                bufs[h2] = bufs[h2][9 + n:]
                if kind == 4 and not flags & 1:
                    h2.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                if kind == 6 and not flags & 1:
                    # A client answers PINGs: the graceful GOAWAY waits for that answer.
                    h2.sendall(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)
                if kind == 7:
                    print("goaway", now(), flush=True)
            continue
        if c:
            bufs[s] += c
            continue
        open_.remove(s)
        if s is a:
            print("idle-closed", now(), repr(bufs[a]), flush=True)
        elif s is h2:
            print("h2-closed", now(), flush=True)
        else:
            head, _, body = bufs[b].partition(b"\r\n\r\n")
            lines = head.decode().lower().split("\r\n")
            status = lines[0].split()[1] if lines[0] else "none"
            close = "connection: close" in lines
            print("inflight-done", now(), status, "close=%s" % close, body.decode().strip(), flush=True)
print("done", flush=True)
"#;

/// Seconds of the event line starting with `event`.
fn at(out: &str, event: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{event} ")))
        .unwrap_or_else(|| panic!("no {event} line:\n{out}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn sigterm_finishes_the_request_in_flight_closes_idle_connections_and_fails_open_meanwhile() {
    let Some(mc) = MiniCluster::new_or_skip("sigterm_drain", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_args(&mc, true, &["--drain-timeout-ms", "10000"]).unwrap();
    let mut clients = shop.client.spawn(&["python3", "-c", CLIENTS]).unwrap();
    clients
        .wait_for_log("in-flight", Duration::from_secs(10))
        .unwrap();
    // Let the slow request reach its upstream.
    std::thread::sleep(Duration::from_millis(300));
    let pins = shop.agent().pin_dir.clone();
    let router_down = || read_counters(&pins).unwrap()["router_down"];
    let down_before = router_down();

    let Shop {
        agent,
        client,
        frontend_fork,
        ..
    } = &mut shop;
    let agent = agent.as_mut().unwrap();
    let (took, meanwhile) = std::thread::scope(|s| {
        let stopping = s.spawn(|| agent.terminate(Duration::from_secs(20)));
        // While it drains, new connections never fail: once the listener is closed they go
        // straight to their original destination (fail open), a keyed one included.
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while router_down() == down_before && Instant::now() < deadline {
            answers.push(get_with(
                client,
                CHECKOUT_VIP4,
                "",
                Some("x-routing-key: feature-x"),
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
        (stopping.join().unwrap(), answers)
    });
    let took = took.unwrap();
    for answer in &meanwhile {
        assert!(
            answer.is_ok(),
            "a request failed during the drain: {answer:?}"
        );
    }
    assert!(
        router_down() > down_before,
        "no connection went straight to its destination during the drain"
    );

    clients.wait_timeout(Duration::from_secs(20)).unwrap();
    let out = clients.log();
    assert!(out.contains("\ndone"), "{out}");
    // The request in flight finished, answered in full, with Connection: close.
    let done = out
        .lines()
        .find(|l| l.starts_with("inflight-done"))
        .unwrap();
    assert!(
        done.ends_with(" 200 close=True checkout-base"),
        "in-flight request: {done}"
    );
    // The idle ones were closed without waiting for it: HTTP/1 closed (nothing sent on it),
    // HTTP/2 told with GOAWAY first.
    let finished = at(&out, "inflight-done");
    assert!(at(&out, "idle-closed") < finished, "{out}");
    assert!(
        out.lines()
            .find(|l| l.starts_with("idle-closed"))
            .unwrap()
            .ends_with(" b''"),
        "{out}"
    );
    assert!(at(&out, "goaway") < finished, "{out}");
    assert!(at(&out, "goaway") <= at(&out, "h2-closed"), "{out}");
    // The agent exited once the last connection finished, not at the drain timeout.
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM; clients:\n{out}\nagent:\n{}",
        agent.log()
    );

    // Its log says what it drained.
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("router drained"))
        .unwrap_or_else(|| panic!("no drain summary:\n{log}"));
    assert!(
        line.contains("connections=3") && line.contains("left=0"),
        "{line}"
    );

    // With the agent gone, the pinned data path still routes: a fork pod reaches the fork in
    // the kernel, and a baseline caller goes straight to baseline, key or not.
    assert_eq!(
        get(frontend_fork, CHECKOUT_VIP4, "").unwrap(),
        "checkout-fork\n"
    );
    assert_eq!(
        get_with(client, CHECKOUT_VIP4, "", Some("x-routing-key: feature-x")).unwrap(),
        "checkout-base\n"
    );
}
