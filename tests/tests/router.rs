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
fn a_non_http_client_is_passed_through_untouched() {
    let Some(mc) = MiniCluster::new_or_skip("opaque_client_first", TOOLS) else {
        return;
    };
    let shop = Shop::with_agent(&mc, true).unwrap();
    // Bytes that are no HTTP (a TLS-like record): the router copies them to the original
    // destination; the baseline HTTP server answers 400 to them, which proves they arrived.
    let raw = r#"
import socket
s = socket.create_connection(("10.200.2.10", 80), timeout=5)
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
