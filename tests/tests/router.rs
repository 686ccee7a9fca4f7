//! End to end through the node router: per-request routing by key, protocols, bad input and
//! failures, with real clients and servers in network namespaces. Skips when not root.

use std::time::Duration;

use redirect_tests::{MiniCluster, scene::*};

const TOOLS: &[&str] = &["curl", "python3"];
const KEY: &str = "baggage: routing-key=feature-x";

/// curl from the baseline client pod, returning (stdout, stderr); fails the test on a curl error.
fn curl(shop: &Shop<'_>, args: &[&str]) -> (String, String) {
    let mut argv = vec!["curl", "-sS", "-g", "--max-time", "8"];
    argv.extend_from_slice(args);
    let out = shop.client.run(&argv, CLIENT_TIMEOUT).unwrap();
    assert!(out.success(), "curl {args:?}: {}", out.stderr);
    (out.stdout, out.stderr)
}

/// Status code and body of one request (curl's exit status is not checked).
fn status(shop: &Shop<'_>, args: &[&str]) -> (u16, String) {
    let mut argv = vec![
        "curl",
        "-sS",
        "-g",
        "--max-time",
        "8",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    argv.extend_from_slice(args);
    let out = shop.client.run(&argv, CLIENT_TIMEOUT).unwrap();
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn every_request_on_one_keep_alive_connection_is_routed_by_its_own_key() {
    let Some(mc) = MiniCluster::new_or_skip("keepalive_per_request", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    for vip in [CHECKOUT_VIP4, CHECKOUT_VIP6] {
        let host = if vip.contains(':') {
            format!("[{vip}]")
        } else {
            vip.to_string()
        };
        let url = format!("http://{host}/");
        let (out, err) = curl(
            &shop,
            &[
                "-v",
                "-H",
                KEY,
                &url,
                "--next",
                &url,
                "--next",
                "-H",
                "x-routing-key: feature-x",
                &url,
                "--next",
                "-H",
                "tracestate: vendor=abc, routing-key=feature-x",
                &url,
                "--next",
                "-H",
                "baggage: routing-key=other-branch",
                &url,
                "--next",
                "-H",
                "baggage: a=1;p, routing-key = feature-x ;prop=1",
                "-H",
                "baggage: z=2",
                &url,
            ],
        );
        assert_eq!(
            out,
            "checkout-fork\ncheckout-base\ncheckout-fork\ncheckout-fork\ncheckout-base\ncheckout-fork\n",
            "{vip}"
        );
        assert_eq!(
            err.matches("Re-using existing connection").count(),
            5,
            "not one connection:\n{err}"
        );
    }
    let log = shop.agent.as_ref().unwrap().log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_request_for_an_unforked_service_stays_on_baseline_even_with_a_key() {
    let Some(mc) = MiniCluster::new_or_skip("unforked_with_key", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    // catalog is not forked: the kernel never redirects it, whatever the request says.
    assert_eq!(
        get_with(&shop.client, CATALOG_VIP4, "", Some(KEY)).unwrap(),
        "catalog-base\n"
    );
}

#[test]
fn head_requests_and_the_opt_in_debug_header() {
    let Some(mc) = MiniCluster::new_or_skip("head_and_debug_header", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let url = format!("http://{CHECKOUT_VIP4}/");
    let (head, _) = curl(&shop, &["-I", "-H", KEY, &url]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-served-by: checkout-fork"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("x-redirect-upstream"),
        "debug header is opt-in:\n{head}"
    );
    drop(shop);

    let Some(mc) = MiniCluster::new_or_skip("head_and_debug_header", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--debug-header"]).unwrap();
    let (head, _) = curl(
        &shop,
        &["-sS", "-D", "-", "-o", "/dev/null", "-H", KEY, &url],
    );
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-redirect-upstream"))
        .unwrap_or_else(|| panic!("{head}"));
    assert!(line.contains("fork feature-x 10.200.1."), "{line}");
    let (head, _) = curl(&shop, &["-sS", "-D", "-", "-o", "/dev/null", &url]);
    assert!(head.contains("baseline no_key 10.200.2.10:80"), "{head}");
}

#[test]
fn oversized_headers_get_431_and_malformed_requests_get_400() {
    let Some(mc) = MiniCluster::new_or_skip("bad_requests", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--max-header-bytes", "16384"]).unwrap();
    let big = format!("x-big: {}", "a".repeat(40_000));
    let (code, _) = status(
        &shop,
        &["-H", &big, "-H", KEY, &format!("http://{CHECKOUT_VIP4}/")],
    );
    assert_eq!(code, 431);
    let raw = r#"
import socket
s = socket.create_connection(("10.200.2.10", 80), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
print(s.recv(4096).split(b"\r\n")[0].decode())
"#;
    let out = shop
        .client
        .run(&["python3", "-c", raw], CLIENT_TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

/// Sends `payload` (a Python bytes expression) on one connection to checkout, reads until the
/// router closes it (or 5 s of silence), and returns the status codes of the responses in order.
fn raw_statuses(shop: &Shop<'_>, payload: &str) -> Vec<u16> {
    let script = format!(
        r#"
import re, socket
s = socket.create_connection(("{CHECKOUT_VIP4}", 80), timeout=5)
s.sendall({payload})
data = b""
try:
    while True:
        c = s.recv(65536)
        if not c: break
        data += c
except (socket.timeout, ConnectionResetError):
    pass
print(" ".join(m.decode() for m in re.findall(rb"HTTP/1\.1 (\d\d\d) ", data)))
"#
    );
    let out = shop
        .client
        .run(&["python3", "-c", &script], CLIENT_TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
    out.split_whitespace().map(|c| c.parse().unwrap()).collect()
}

#[test]
fn a_pipelined_request_head_over_the_limit_gets_431() {
    let Some(mc) = MiniCluster::new_or_skip("pipelined_head_limit", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--max-header-bytes", "8192"]).unwrap();
    // A small request, then one whose head is 1.5 times the limit, in one write: the limit
    // holds for every head, not for what one read of the connection buffer holds.
    let small = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'";
    let big = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nx-big: ' + b'a' * 12000 + b'\\r\\n\\r\\n'";
    assert_eq!(raw_statuses(&shop, &format!("{small} + {big}")), [200, 431]);
    // Under the limit, both are served.
    let fits = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nx-big: ' + b'a' * 6000 + b'\\r\\n\\r\\n'";
    let last = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'";
    assert_eq!(
        raw_statuses(&shop, &format!("{small} + {fits} + {last}")),
        [200, 200, 200]
    );
}

/// The framings a smuggling attempt plays on: refused when two readings are possible, else
/// followed exactly, so a request hidden in a body stays body and the request after a body is
/// routed by its own key.
#[test]
fn request_bodies_are_framed_one_way_only() {
    let Some(mc) = MiniCluster::new_or_skip("framing_one_way", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let keyed_next = "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nx-routing-key: feature-x\\r\\n\\r\\n'";
    for framing in [
        "Transfer-Encoding: chunked\\r\\nContent-Length: 3",
        "Content-Length: 3\\r\\nTransfer-Encoding: chunked",
        "Content-Length: 3\\r\\nContent-Length: 4",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: identity",
        "Content-Length: -3",
    ] {
        let payload = format!(
            "b'POST / HTTP/1.1\\r\\nHost: x\\r\\n{framing}\\r\\n\\r\\n3\\r\\nabc\\r\\n0\\r\\n\\r\\n' + {keyed_next}"
        );
        assert_eq!(raw_statuses(&shop, &payload), [400], "{framing}");
    }
    let hidden = "GET / HTTP/1.1\r\nHost: x\r\nx-routing-key: feature-x\r\n\r\n";
    let last = "GET / HTTP/1.1\r\nHost: x\r\nx-routing-key: feature-x\r\nConnection: close\r\n\r\n";
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding, content-length\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n{last}",
        hidden.len()
    );
    let by_length = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}{last}",
        hidden.len()
    );
    for request in [chunked, by_length] {
        let out = redirect_tests::peers::raw_http(&shop.client, CHECKOUT_VIP4, 80, &request);
        let served: Vec<&str> = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("x-served-by: "))
            .collect();
        assert_eq!(served, ["checkout-base", "checkout-fork"], "{out}");
        assert!(
            out.contains(hidden),
            "the hidden request was not echoed as body: {out}"
        );
    }
}

/// A request with `n` headers in all (Host included).
fn with_headers(n: usize) -> String {
    format!(
        "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n' + \
         b''.join(b'x-h%d: v\\r\\n' % i for i in range({})) + b'\\r\\n'",
        n - 2
    )
}

#[test]
fn the_header_count_limit_is_a_flag_and_beyond_it_the_answer_is_431() {
    let Some(mc) = MiniCluster::new_or_skip("header_count_limit", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--max-headers", "150"]).unwrap();
    assert_eq!(raw_statuses(&shop, &with_headers(150)), [200]);
    assert_eq!(raw_statuses(&shop, &with_headers(151)), [431]);
    drop(shop);

    let Some(mc) = MiniCluster::new_or_skip("header_count_default", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    assert_eq!(raw_statuses(&shop, &with_headers(100)), [200]);
    assert_eq!(raw_statuses(&shop, &with_headers(101)), [431]);
}

#[test]
fn a_malformed_chunked_request_body_gets_400_and_is_no_upstream_error() {
    let Some(mc) = MiniCluster::new_or_skip("malformed_chunked", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    for key in ["", "x-routing-key: feature-x\\r\\n"] {
        let bad = format!(
            "b'POST / HTTP/1.1\\r\\nHost: x\\r\\n{key}Transfer-Encoding: chunked\\r\\n\\r\\n\
             5\\r\\nhello\\r\\nzz\\r\\nworld\\r\\n0\\r\\n\\r\\n'"
        );
        assert_eq!(raw_statuses(&shop, &bad), [400], "{key}");
    }
    let status = mc.node().admin_status().unwrap();
    let requests = &status["router_requests"];
    assert_eq!(requests["baseline/upstream_error"], 0, "{requests}");
    assert_eq!(requests["fork/upstream_error"], 0, "{requests}");
    assert_eq!(requests["baseline/bad_request"], 1, "{requests}");
    assert_eq!(requests["fork/bad_request"], 1, "{requests}");
}

#[test]
fn the_503_of_a_fork_without_ready_endpoint_carries_the_debug_header() {
    let Some(mc) = MiniCluster::new_or_skip("fork_unavailable_debug", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_args(&mc, true, &["--debug-header"]).unwrap();
    shop.remove_pod_manifest(&shop.checkout_fork).unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    let url = format!("http://{CHECKOUT_VIP4}/");
    let (head, _) = curl(
        &shop,
        &["-sS", "-D", "-", "-o", "/dev/null", "-H", KEY, &url],
    );
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-redirect-upstream"))
        .unwrap_or_else(|| panic!("no debug header on the 503:\n{head}"));
    assert!(
        line.contains("unavailable feature-x default/checkout:http"),
        "{line}"
    );
}

#[test]
fn a_fork_without_ready_endpoint_answers_503_naming_sandbox_and_service_unless_it_falls_back() {
    let Some(mc) = MiniCluster::new_or_skip("fork_unavailable", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    shop.remove_pod_manifest(&shop.checkout_fork).unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    let url = format!("http://{CHECKOUT_VIP4}/");
    let (code, body) = status(&shop, &["-H", KEY, &url]);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("default/feature-x") && body.contains("default/checkout:http"),
        "{body}"
    );
    // Without the key: baseline as always.
    assert_eq!(status(&shop, &[&url]), (200, "checkout-base\n".into()));
    shop.set_sandbox_fallback("Baseline").unwrap();
    shop.agent()
        .wait_synced(3, Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        status(&shop, &["-H", KEY, &url]),
        (200, "checkout-base\n".into())
    );
}

#[test]
fn an_upstream_that_refuses_gives_502_with_the_reason() {
    let Some(mc) = MiniCluster::new_or_skip("upstream_refused", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    // The fork pod stays "ready" in the manifests, but its server is gone.
    let fork_server = shop
        .servers
        .iter_mut()
        .find(|p| {
            p.log_path()
                .is_some_and(|l| l.to_string_lossy().contains("checkout-fork"))
        })
        .unwrap();
    fork_server.kill().unwrap();
    let (code, body) = status(&shop, &["-H", KEY, &format!("http://{CHECKOUT_VIP4}/")]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("refused"), "{body}");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_timed_out() {
    let Some(mc) = MiniCluster::new_or_skip("slow_client", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--header-timeout-ms", "500"]).unwrap();
    let slow = r#"
import socket, time
s = socket.create_connection(("10.200.2.10", 80), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
t = time.monotonic()
data = s.recv(4096)
print(round(time.monotonic() - t, 1), data.split(b"\r\n")[0].decode() or "closed")
"#;
    let out = shop
        .client
        .run(&["python3", "-c", slow], CLIENT_TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
    let secs: f64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(secs < 5.0, "connection held for {out}");
    assert!(out.contains("408") || out.contains("closed"), "{out}");
}

#[test]
fn a_non_http_client_on_an_undeclared_port_is_passed_through_untouched() {
    let Some(mc) = MiniCluster::new_or_skip("opaque_client_first", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    // An HTTP server behind a port that declares no protocol (`tcp-2525`).
    let _server = shop
        .checkout_base
        .spawn_server(&podserver_bin(), "checkout-base", OPAQUE_PORT)
        .unwrap();
    // Bytes that are no HTTP (a TLS-like record): the router copies them to the original
    // destination; the baseline HTTP server answers 400 to them, which proves they arrived.
    let raw = r#"
import socket
s = socket.create_connection(("10.200.2.10", 2525), timeout=5)
s.sendall(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
data = b""
while True:
    c = s.recv(4096)
    if not c: break
    data += c
print(data.split(b"\r\n")[0].decode(errors="replace"))
"#;
    let out = shop
        .client
        .run(&["python3", "-c", raw], CLIENT_TIMEOUT)
        .unwrap();
    assert!(out.stdout.contains("400"), "{} {}", out.stdout, out.stderr);
}

/// A size field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Cluster for tests that need the Python peers.
fn peer_cluster(test: &str) -> Option<MiniCluster> {
    redirect_tests::peers::peer_cluster_or_skip(test, TOOLS)
}

#[test]
fn grpc_streams_for_baseline_and_fork_share_one_client_connection_with_trailers_intact() {
    use redirect_tests::peers::*;
    let Some(mc) = peer_cluster("grpc_through_router") else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let _base = peer_server(
        &shop.checkout_base,
        GRPC_PEER,
        "checkout-base",
        GRPC_PORT,
        &[],
    );
    let _fork = peer_server(
        &shop.checkout_fork,
        GRPC_PEER,
        "checkout-fork",
        GRPC_PORT,
        &[],
    );
    let key = r#"{"baggage": "routing-key=feature-x"}"#;
    let calls = format!(
        r#"[{{"method":"unary","metadata":{key}}},
            {{"method":"unary","metadata":{{}}}},
            {{"method":"server_stream","n":3,"metadata":{key}}},
            {{"method":"client_stream","n":3,"metadata":{{}}}},
            {{"method":"bidi","n":3,"metadata":{key}}},
            {{"method":"unary","metadata":{{"baggage":"routing-key=feature-x","fail":"1"}}}}]"#
    );
    for vip in [CHECKOUT_VIP4.to_string(), format!("[{CHECKOUT_VIP6}]")] {
        let target = format!("{vip}:{GRPC_PORT}");
        let res = run_json(
            &shop.client,
            &[
                "python3", GRPC_PEER, "client", "--target", &target, "--calls", &calls,
            ],
        );
        let served: Vec<Vec<&str>> = res
            .as_array()
            .unwrap()
            .iter()
            .map(|c| strs(&c["served_by"]))
            .collect();
        assert_eq!(
            served,
            vec![
                vec!["checkout-fork"],
                vec!["checkout-base"],
                vec!["checkout-fork"; 3],
                vec!["checkout-base"],
                vec!["checkout-fork"; 3],
                vec![],
            ],
            "{res}"
        );
        for call in res.as_array().unwrap().iter().take(5) {
            assert_eq!(call["code"], "OK", "{call}");
            assert!(
                call["trailing"]["x-served-by"].is_string(),
                "trailers lost: {call}"
            );
        }
        let failed = &res[5];
        assert_eq!(
            (failed["code"].as_str(), failed["details"].as_str()),
            (Some("FAILED_PRECONDITION"), Some("asked to fail")),
            "{failed}"
        );
        assert_eq!(
            failed["trailing"]["x-served-by"], "checkout-fork",
            "{failed}"
        );
    }
}

#[test]
fn websocket_upgrade_is_routed_by_its_request_then_tunneled() {
    use redirect_tests::peers::*;
    let Some(mc) = peer_cluster("websocket_through_router") else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let _base = peer_server(&shop.checkout_base, WS_PEER, "checkout-base", WS_PORT, &[]);
    let _fork = peer_server(&shop.checkout_fork, WS_PEER, "checkout-fork", WS_PORT, &[]);
    let url = format!("ws://{CHECKOUT_VIP4}:{WS_PORT}/chat");
    let res = run_json(
        &shop.client,
        &[
            "python3",
            WS_PEER,
            "client",
            "--url",
            &url,
            "--header",
            KEY,
            "--messages",
            "a,b,c",
        ],
    );
    assert_eq!(
        strs(&res["replies"]),
        ["checkout-fork:a", "checkout-fork:b", "checkout-fork:c"],
        "{res}"
    );
    let res = run_json(
        &shop.client,
        &[
            "python3",
            WS_PEER,
            "client",
            "--url",
            &url,
            "--messages",
            "a",
        ],
    );
    assert_eq!(strs(&res["replies"]), ["checkout-base:a"], "{res}");
}

#[test]
fn a_server_first_protocol_does_not_hang_and_reaches_its_original_destination() {
    use redirect_tests::peers::*;
    let Some(mc) = MiniCluster::new_or_skip("opaque_server_first", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let _base = peer_server(
        &shop.checkout_base,
        OPAQUE_PEER,
        "checkout-base",
        OPAQUE_PORT,
        &["--banner"],
    );
    let _fork = peer_server(
        &shop.checkout_fork,
        OPAQUE_PEER,
        "checkout-fork",
        OPAQUE_PORT,
        &["--banner"],
    );
    let target = format!("{CHECKOUT_VIP4}:{OPAQUE_PORT}");
    let started = std::time::Instant::now();
    let res = run_json(
        &shop.client,
        &[
            "python3",
            OPAQUE_PEER,
            "client",
            "--target",
            &target,
            "--expect-banner",
            "--send",
            "hello\n",
        ],
    );
    assert_eq!(res["banner"], "checkout-base ready", "{res}");
    assert!(
        res["received"]
            .as_str()
            .unwrap()
            .contains("checkout-base:hello"),
        "{res}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn bodies_stream_both_ways_chunked_and_large_without_being_buffered_whole() {
    let Some(mc) = MiniCluster::new_or_skip("streaming_bodies", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pid = shop.agent().pid().unwrap();
    let rss = |field: &str| proc_status_bytes(pid, field);
    // Warm up the pools, then measure the peak resident size across a 256 MiB round trip.
    get_with(&shop.client, CHECKOUT_VIP4, "", Some(KEY)).unwrap();
    let before = rss("VmRSS:");
    let size: u64 = 256 * 1024 * 1024;
    let file = mc.workdir().join("upload");
    let cmd = format!(
        "head -c {size} /dev/urandom > {f} && curl -sS --max-time 60 -T {f} -H 'Transfer-Encoding: chunked' -H '{KEY}' http://{CHECKOUT_VIP4}/echo | cmp - {f} && echo same",
        f = file.display()
    );
    let out = shop
        .client
        .run(&["sh", "-c", &cmd], Duration::from_secs(90))
        .unwrap();
    assert_eq!(out.stdout.trim(), "same", "{out:?}");
    let peak = rss("VmHWM:");
    let grew = peak.saturating_sub(before);
    println!("agent RSS {before} before, peak {peak} during a {size}-byte round trip");
    assert!(
        grew < 64 * 1024 * 1024,
        "the router buffered the body: RSS grew {grew} bytes"
    );
}

#[test]
fn the_router_keeps_header_names_case_and_order_and_adds_nothing() {
    let Some(mc) = MiniCluster::new_or_skip("header_fidelity", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let body = |r: &str| {
        r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    };
    let fork_ip = shop.checkout_fork.ip4().to_string();
    let head = |lines: &[&str]| {
        format!(
            "GET /headers HTTP/1.1\r\n{}\r\nConnection: close\r\n\r\n",
            lines.join("\r\n")
        )
    };
    let exchange = |request: &str| {
        let via_router = redirect_tests::peers::raw_http(&shop.client, CHECKOUT_VIP4, 80, request);
        assert!(
            via_router.contains("x-served-by: checkout-fork"),
            "{via_router}"
        );
        let direct = redirect_tests::peers::raw_http(&shop.client, &fork_ip, SERVER_PORT, request);
        (body(&via_router), body(&direct))
    };
    // Byte for byte what the client sent, mixed case and all, less the hop-by-hop `Connection`
    // field (RFC 9110 7.6.1: it describes the client's connection, not the message).
    let request = head(&[
        "Host: checkout",
        "X-Mixed-Case: 1",
        "baggage: routing-key=feature-x",
        "ACCEPT: */*",
        "x-Custom-B: 2",
    ]);
    let (via_router, direct) = exchange(&request);
    assert_eq!(
        via_router,
        direct.replace("Connection: close\r\n", ""),
        "the fork saw a different request head through the router"
    );
    // Hop-by-hop fields go, with those `Connection` names; `TE: trailers` stays (gRPC needs it).
    let request = head(&[
        "Host: checkout",
        "baggage: routing-key=feature-x",
        "Keep-Alive: timeout=5",
        "X-Hop: 1",
        "TE: trailers",
        "X-End: 2",
        "Connection: X-Hop",
    ]);
    let (via_router, _) = exchange(&request);
    assert_eq!(
        via_router,
        "GET /headers HTTP/1.1\r\nHost: checkout\r\nbaggage: routing-key=feature-x\r\n\
         TE: trailers\r\nX-End: 2\r\n\r\n"
    );
    // Repeated field names stay where they were: the head goes on as received, interleaving
    // included.
    let request = head(&[
        "Host: checkout",
        "x-dup: 1",
        "baggage: routing-key=feature-x",
        "X-Other: 2",
        "x-dup: 3",
    ]);
    let (via_router, direct) = exchange(&request);
    assert_eq!(via_router, direct.replace("Connection: close\r\n", ""));
    assert!(
        via_router
            .contains("x-dup: 1\r\nbaggage: routing-key=feature-x\r\nX-Other: 2\r\nx-dup: 3\r\n"),
        "{via_router}"
    );
}

#[test]
fn a_slow_upstream_gets_504() {
    let Some(mc) = MiniCluster::new_or_skip("slow_upstream", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent_args(&mc, true, &["--response-timeout-ms", "500"]).unwrap();
    let started = std::time::Instant::now();
    let (code, body) = status(
        &shop,
        &["-H", KEY, &format!("http://{CHECKOUT_VIP4}/sleep/5000")],
    );
    assert_eq!(code, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn memory_stays_bounded_under_many_idle_connections() {
    let Some(mc) = MiniCluster::new_or_skip("idle_connections", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent(&mc, true).unwrap();
    let pid = shop.agent().pid().unwrap();
    let rss = || proc_status_bytes(pid, "VmRSS:");
    get_with(&shop.client, CHECKOUT_VIP4, "", Some(KEY)).unwrap();
    let before = rss();
    const N: usize = 800;
    // N keep-alive connections, one request each, then idle until told to stop.
    let script = format!(
        r#"
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
socks = []
for i in range({N}):
    s = socket.create_connection(("{CHECKOUT_VIP4}", 80), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nbaggage: routing-key=feature-x\r\n\r\n")
    r = s.recv(4096)
    assert r.startswith(b"HTTP/1.1 200"), (i, r[:200])
    socks.append(s)
print("open", flush=True)
time.sleep(30)
"#
    );
    let path = mc.workdir().join("idle.py");
    std::fs::write(&path, script).unwrap();
    let mut client = shop
        .client
        .spawn(&["python3", path.to_str().unwrap()])
        .unwrap();
    client
        .wait_for_log("open", Duration::from_secs(60))
        .unwrap();
    let per_conn = rss().saturating_sub(before) / N as u64;
    println!("router memory per idle connection: {per_conn} bytes");
    assert!(per_conn < 64 * 1024, "{per_conn} bytes per idle connection");
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let Some(mc) = MiniCluster::new_or_skip("expect_continue", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let body = mc.workdir().join("small-body");
    std::fs::write(&body, "x".repeat(4096)).unwrap();
    let url = format!("http://{CHECKOUT_VIP4}/echo");
    let upload = format!("@{}", body.display());
    let (out, err) = curl(
        &shop,
        &[
            "-v",
            "-H",
            KEY,
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "30",
            "--data-binary",
            &upload,
            &url,
        ],
    );
    assert!(
        err.contains("HTTP/1.1 100 Continue"),
        "no interim response:\n{err}"
    );
    assert_eq!(out.len(), 4096, "the body did not make it through");
}

/// A minimal CONNECT endpoint: answers `200` to a CONNECT request, then echoes the tunnel's
/// bytes prefixed with its name.
const CONNECT_SERVER: &str = r#"
import socket, sys, threading
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(16)
print("listening", flush=True)
def serve(c):
    c.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(4096)
        if not d: return
        head += d
    if not head.startswith(b"CONNECT "):
        c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n"); return
    c.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    while True:
        d = c.recv(4096)
        if not d: return
        c.sendall(name.encode() + b":" + d)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn connect_requests_are_routed_by_key_then_tunneled() {
    let Some(mc) = MiniCluster::new_or_skip("connect_tunnel", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    let port = OPAQUE_PORT.to_string();
    let mut servers = Vec::new();
    for pod in [&shop.checkout_base, &shop.checkout_fork] {
        let ip = pod.ip4().to_string();
        let mut s = pod
            .spawn(&["python3", "-c", CONNECT_SERVER, pod.name(), &ip, &port])
            .unwrap();
        s.wait_for_log("listening", Duration::from_secs(10))
            .unwrap();
        servers.push(s);
    }
    let client = format!(
        r#"
import socket, sys
s = socket.create_connection(("{CHECKOUT_VIP4}", {OPAQUE_PORT}), timeout=5)
s.sendall(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n" + sys.argv[1].encode() + b"\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
status, rest = head.split(b"\r\n", 1)[0], head.split(b"\r\n\r\n", 1)[1]
s.sendall(b"ping")
data = rest
while b"ping" not in data:
    data += s.recv(4096)
print(status.decode().split(" ")[1], data.decode())
"#
    );
    for (header, want) in [
        (KEY, "checkout-fork:ping"),
        ("x-nothing: 1", "checkout-base:ping"),
    ] {
        let out = shop
            .client
            .run(&["python3", "-c", &client, header], CLIENT_TIMEOUT)
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(out.trim(), format!("200 {want}"), "{header}");
    }
}

// The protocol from the Service: ports that declare HTTP (appProtocol or port name) are served
// as HTTP whatever the first bytes look like; the others are detected.

const ORDERS_VIP4: &str = "10.200.2.30";
const ORDERS_VIP6: &str = "fd00:200::2:30";
const ORDERS_KEY: &str = "orders-x";
/// `appProtocol: http` on a port whose name declares nothing.
const BY_APP_PROTOCOL: u16 = 80;
/// Named `http-api`, no appProtocol.
const BY_NAME: u16 = 81;
/// Named `web`, no appProtocol: detected.
const UNDECLARED: u16 = 82;
/// Named `smtp`, no appProtocol: a server-first protocol, detected as opaque.
const SERVER_FIRST: u16 = 2525;

/// A client pod, an `orders` service with the ports above (HTTP ports → 8080), its baseline pod
/// and its fork in the sandbox `orders-x`, podservers and banner servers on both, and the agent.
struct Orders<'c> {
    _agent: redirect_tests::agent::Agent,
    _servers: Vec<redirect_tests::Proc>,
    client: redirect_tests::Pod<'c>,
}

fn orders(mc: &MiniCluster) -> Orders<'_> {
    use redirect_tests::{ServicePort, peers::*};
    let client = mc.pod_with_labels("client", &[("app", "client")]).unwrap();
    let base = mc
        .pod_with_labels("orders-base", &[("app", "orders")])
        .unwrap();
    let fork = mc
        .pod_with_labels(
            "orders-fork",
            &[("app", "orders"), ("redirect.dev/sandbox", ORDERS_KEY)],
        )
        .unwrap();
    let mut servers = Vec::new();
    for (pod, name) in [(&base, "orders-base"), (&fork, "orders-fork")] {
        servers.push(
            pod.spawn_server(&podserver_bin(), name, SERVER_PORT)
                .unwrap(),
        );
        servers.push(peer_server(
            pod,
            OPAQUE_PEER,
            name,
            SERVER_FIRST,
            &["--banner"],
        ));
    }
    let port = |port: u16, target_port: u16, name: &str, app: Option<&str>| ServicePort {
        name: name.to_string(),
        app_protocol: app.map(str::to_string),
        port,
        target_port,
    };
    let ports = [
        port(BY_APP_PROTOCOL, SERVER_PORT, "web", Some("http")),
        port(BY_NAME, SERVER_PORT, "http-api", None),
        port(UNDECLARED, SERVER_PORT, "web-plain", None),
        port(SERVER_FIRST, SERVER_FIRST, "smtp", None),
    ];
    mc.service_with_ports("orders", ORDERS_VIP4, ORDERS_VIP6, &ports, &[&base])
        .unwrap();
    let manifests = mc.workdir().join("manifests");
    mc.write_manifests(&manifests).unwrap();
    std::fs::write(
        manifests.join("sandbox.yaml"),
        sandbox_manifest(ORDERS_KEY, "Unavailable", &["orders"]),
    )
    .unwrap();
    let agent = redirect_tests::agent::Agent::start_with(mc, &manifests, &[]).unwrap();
    Orders {
        _agent: agent,
        _servers: servers,
        client,
    }
}

/// One keyed request on a new connection to `port` of orders, sent after `delay_s` seconds of
/// silence with `prefix` before the request line and `method`; prints the status code and the
/// body (`status body`), or `closed`.
const DECLARED_CLIENT: &str = r#"
import socket, sys, time
host, port, delay, prefix, method, key = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
s = socket.create_connection((host, port), timeout=10)
time.sleep(delay)
prefix = prefix.encode().decode('unicode_escape').encode('latin-1')
s.sendall(prefix + ('%s / HTTP/1.1\r\nHost: orders\r\nbaggage: routing-key=%s\r\nConnection: close\r\n\r\n' % (method, key)).encode())
data = b''
while True:
    c = s.recv(65536)
    if not c: break
    data += c
if not data:
    print('closed')
else:
    head, _, body = data.partition(b'\r\n\r\n')
    print(head.split(b' ')[1].decode(), body.decode(errors='replace').strip())
"#;

/// `(status, body)` of one keyed request to `port` of orders (see [`DECLARED_CLIENT`]).
fn declared_request(o: &Orders<'_>, port: u16, delay_s: f64, prefix: &str, method: &str) -> String {
    let out = o
        .client
        .run(
            &[
                "python3",
                "-c",
                DECLARED_CLIENT,
                ORDERS_VIP4,
                &port.to_string(),
                &delay_s.to_string(),
                prefix,
                method,
                ORDERS_KEY,
            ],
            CLIENT_TIMEOUT,
        )
        .unwrap()
        .check()
        .unwrap();
    out.trim().to_string()
}

#[test]
fn a_port_declared_http_routes_a_request_sent_late_by_its_key() {
    let Some(mc) = MiniCluster::new_or_skip("declared_late", TOOLS) else {
        return;
    };
    let o = orders(&mc);
    // A pre-warmed connection: the request comes 700 ms after the connect, past the 500 ms
    // in which an undeclared port decides that the server speaks first.
    for port in [BY_APP_PROTOCOL, BY_NAME] {
        let out = declared_request(&o, port, 0.7, "", "GET");
        assert_eq!(out, "200 orders-fork", "port {port}");
    }
    // Undeclared, the same client is taken for a server-first protocol: tunnelled to baseline.
    let out = declared_request(&o, UNDECLARED, 0.7, "", "GET");
    assert_eq!(out, "200 orders-base", "port {UNDECLARED}");
}

#[test]
fn a_port_declared_http_routes_a_request_after_a_leading_crlf_or_with_a_lowercase_method() {
    let Some(mc) = MiniCluster::new_or_skip("declared_crlf", TOOLS) else {
        return;
    };
    let o = orders(&mc);
    for port in [BY_APP_PROTOCOL, BY_NAME] {
        let out = declared_request(&o, port, 0.0, "\\r\\n", "GET");
        assert_eq!(out, "200 orders-fork", "leading CRLF, port {port}");
        let out = declared_request(&o, port, 0.0, "", "get");
        assert_eq!(out, "200 orders-fork", "lowercase method, port {port}");
    }
}

#[test]
fn an_undeclared_port_still_detects_http_and_lets_a_server_first_protocol_through() {
    use redirect_tests::peers::*;
    let Some(mc) = MiniCluster::new_or_skip("undeclared_detects", TOOLS) else {
        return;
    };
    let o = orders(&mc);
    let out = declared_request(&o, UNDECLARED, 0.0, "", "GET");
    assert_eq!(out, "200 orders-fork");
    let target = format!("{ORDERS_VIP4}:{SERVER_FIRST}");
    let started = std::time::Instant::now();
    let res = run_json(
        &o.client,
        &[
            "python3",
            OPAQUE_PEER,
            "client",
            "--target",
            &target,
            "--expect-banner",
            "--send",
            "hello\n",
        ],
    );
    assert_eq!(res["banner"], "orders-base ready", "{res}");
    assert!(started.elapsed() < Duration::from_secs(5), "{res}");
}

#[test]
fn a_port_declared_http_answers_400_to_bytes_that_are_not_http() {
    let Some(mc) = MiniCluster::new_or_skip("declared_not_http", TOOLS) else {
        return;
    };
    let o = orders(&mc);
    // A TLS record on a port that says HTTP: the router answers, naming the declaration, and
    // does not forward (the baseline never sees it).
    let raw = format!(
        r#"
import socket
s = socket.create_connection(("{ORDERS_VIP4}", {BY_APP_PROTOCOL}), timeout=5)
s.sendall(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
data = b""
while True:
    c = s.recv(4096)
    if not c: break
    data += c
print(data.decode(errors="replace"))
"#
    );
    let out = o
        .client
        .run(&["python3", "-c", &raw], CLIENT_TIMEOUT)
        .unwrap()
        .check()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains("default/orders:web declares HTTP"),
        "the reason names the port: {out}"
    );
}

const H2PEER: &str = env!("CARGO_BIN_EXE_h2peer");

#[test]
fn http2_streams_carry_large_bodies_both_ways_and_get_the_routers_own_answers() {
    let Some(mc) = MiniCluster::new_or_skip("h2_through_router", TOOLS) else {
        return;
    };
    let mut shop = Shop::with_agent_args(
        &mc,
        true,
        &["--debug-header", "--response-timeout-ms", "1000"],
    )
    .unwrap();
    use redirect_tests::peers::h2peer_server;
    let _base = h2peer_server(&shop.checkout_base, H2PEER, "checkout-base", GRPC_PORT, &[]);
    let mut fork = h2peer_server(&shop.checkout_fork, H2PEER, "checkout-fork", GRPC_PORT, &[]);
    let url = |path: &str| format!("http://{CHECKOUT_VIP4}:{GRPC_PORT}{path}");
    // Status line and headers (lowercase names), then the body.
    let h2 = |shop: &Shop<'_>, extra: &[&str], path: &str| {
        let mut argv = vec!["--http2-prior-knowledge", "-D", "-"];
        argv.extend_from_slice(extra);
        let url = url(path);
        argv.push(&url);
        let (out, _) = curl(shop, &argv);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (head.to_ascii_lowercase(), body.to_string())
    };
    let debug = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("x-redirect-upstream: "))
            .unwrap_or_else(|| panic!("no debug header:\n{head}"))
            .to_string()
    };

    // Routed by key, stream by stream, with the debug header added.
    let (head, body) = h2(&shop, &["-H", KEY], "/");
    assert!(head.starts_with("http/2 200"), "{head}");
    assert_eq!(body, "checkout-fork\n");
    assert!(debug(&head).starts_with("fork feature-x "), "{head}");
    let (head, body) = h2(&shop, &[], "/");
    assert_eq!(body, "checkout-base\n", "{head}");
    assert!(debug(&head).starts_with("baseline "), "{head}");
    // The upstream sockets (in the client pod's namespace: to the fork and, for baseline, to
    // the ClusterIP) are watched by TCP keepalive. `ss` shows a socket's keepalive timer once
    // what it sent is acknowledged (before, its retransmission timer): asked for up to 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let sockets = shop
            .client
            .run(
                &["ss", "-tnoH", "state", "established", "( dport = :50051 )"],
                CLIENT_TIMEOUT,
            )
            .unwrap();
        let lines: Vec<&str> = sockets.stdout.lines().filter(|l| !l.is_empty()).collect();
        if !lines.is_empty() && lines.iter().all(|l| l.contains("keepalive")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an upstream socket without keepalive timer: {sockets:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A response head beyond what the router decodes: the upstream stream is reset, 502.
    let (head, body) = h2(&shop, &["-H", KEY], "/head-bytes/20000");
    assert!(head.starts_with("http/2 200"), "{head}\n{body}");
    let (head, body) = h2(&shop, &["-H", KEY], "/head-bytes/200000");
    assert!(head.starts_with("http/2 502"), "{head}\n{body}");

    // 64 MiB up and the same back on one stream, moved as the windows allow: never held whole.
    let pid = shop.agent().pid().unwrap();
    let before = proc_status_bytes(pid, "VmRSS:");
    let size: u64 = 64 * 1024 * 1024;
    let file = mc.workdir().join("upload-h2");
    let cmd = format!(
        "head -c {size} /dev/urandom > {f} && curl -sS --max-time 60 --http2-prior-knowledge -T {f} -H '{KEY}' {u} | cmp - {f} && echo same",
        f = file.display(),
        u = url("/echo"),
    );
    let out = shop
        .client
        .run(&["sh", "-c", &cmd], Duration::from_secs(90))
        .unwrap();
    assert_eq!(out.stdout.trim(), "same", "{out:?}");
    let grew = proc_status_bytes(pid, "VmHWM:").saturating_sub(before);
    println!("agent RSS {before} before, grew {grew} during a {size}-byte HTTP/2 round trip");
    assert!(
        grew < 32 * 1024 * 1024,
        "the router buffered the body: RSS grew {grew} bytes"
    );

    // No response head within --response-timeout-ms: 504, the upstream stream cancelled.
    let (head, body) = h2(&shop, &["-H", KEY], "/sleep/5000");
    assert!(head.starts_with("http/2 504"), "{head}");
    assert!(body.contains("sent no response within"), "{body}");
    assert!(debug(&head).starts_with("fork feature-x "), "{head}");

    // The fork's server is gone: 502 with the reason.
    fork.kill().unwrap();
    let (head, body) = h2(&shop, &["-H", KEY], "/");
    assert!(head.starts_with("http/2 502"), "{head}\n{body}");
    assert!(body.starts_with("upstream "), "{body}");

    // The fork has no ready endpoint: 503 naming sandbox and service; baseline unaffected.
    shop.remove_pod_manifest(&shop.checkout_fork).unwrap();
    shop.agent()
        .wait_synced(2, Duration::from_secs(20))
        .unwrap();
    let (head, body) = h2(&shop, &["-H", KEY], "/");
    assert!(head.starts_with("http/2 503"), "{head}");
    assert!(body.contains("default/feature-x"), "{body}");
    assert!(debug(&head).starts_with("unavailable feature-x "), "{head}");
    assert_eq!(h2(&shop, &[], "/").1, "checkout-base\n");

    let status = mc.node().admin_status().unwrap();
    let requests = &status["router_requests"];
    assert_eq!(requests["fork/upstream_timeout"], 1, "{requests}");
    assert_eq!(requests["fork/upstream_error"], 2, "{requests}");
    assert_eq!(requests["fork/unavailable"], 1, "{requests}");
}

#[test]
fn an_upstream_http2_connection_going_away_takes_no_new_request_and_none_fails() {
    use redirect_tests::peers::h2peer_server;
    let Some(mc) = MiniCluster::new_or_skip("h2_goaway", TOOLS) else {
        return;
    };
    // One router thread: every request of the client pod shares one upstream connection.
    let shop = Shop::with_agent_args(&mc, true, &["--router-workers", "1"]).unwrap();
    // The fork's server says GOAWAY on a connection's second request (as gRPC servers do at
    // their max connection age) and keeps the connection open while that request runs.
    let _fork = h2peer_server(
        &shop.checkout_fork,
        H2PEER,
        "checkout-fork",
        GRPC_PORT,
        &["--goaway-after", "2"],
    );
    let url = |path: &str| format!("http://{CHECKOUT_VIP4}:{GRPC_PORT}{path}");
    let get = |path: &str| status(&shop, &["--http2-prior-knowledge", "-H", KEY, &url(path)]);
    assert_eq!(get("/"), (200, "checkout-fork\n".into()));
    // The second request on the upstream connection: it gets the GOAWAY and stays open 3 s.
    let slow = url("/sleep/3000");
    let in_flight = shop
        .client
        .spawn(&[
            "curl",
            "-sS",
            "--max-time",
            "8",
            "--http2-prior-knowledge",
            "-H",
            KEY,
            &slow,
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // Meanwhile, new requests go on a new upstream connection instead of failing.
    for _ in 0..3 {
        assert_eq!(get("/"), (200, "checkout-fork\n".into()));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !in_flight.log().contains("checkout-fork") {
        assert!(
            std::time::Instant::now() < deadline,
            "the request in flight at the GOAWAY did not complete: {}",
            in_flight.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = mc.node().admin_status().unwrap();
    let requests = &status["router_requests"];
    assert_eq!(requests["fork/upstream_error"], 0, "{requests}");
    assert_eq!(requests["fork/ok"], 5, "{requests}");
}
