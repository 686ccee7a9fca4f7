//! The protocol peers of the end-to-end tests work on their own: real gRPC, WebSocket, raw TCP
//! and HTTP/1.1 (podserver) between two pods of a mini-cluster, no router, no agent. Every test
//! skips (and passes) without root or without the Python modules (`./x setup` installs
//! `tests/peers/requirements.txt`).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use redirect_tests::{MiniCluster, Pod, Proc, peers::*};
use serde_json::Value;

const PODSERVER: &str = env!("CARGO_BIN_EXE_podserver");
const MIB: usize = 1024 * 1024;

/// A cluster for `test`, or `None` (after printing why) when the machine cannot run it:
/// not root, a tool missing, or (with `python_peers`) the Python modules missing.
fn cluster(test: &str, tools: &[&str], python_peers: bool) -> Option<MiniCluster> {
    if python_peers {
        peer_cluster_or_skip(test, tools)
    } else {
        MiniCluster::new_or_skip(test, tools)
    }
}

/// Pods `client` and `server`, the latter running podserver `srv` on port 8080 (dropping the
/// [`Proc`] stops it).
fn podserver_pair(mc: &MiniCluster) -> (Pod<'_>, Pod<'_>, Proc) {
    let client = mc.pod("client").unwrap();
    let server = mc.pod("server").unwrap();
    let s = server
        .spawn_server(Path::new(PODSERVER), "srv", 8080)
        .unwrap();
    (client, server, s)
}

#[test]
fn grpc_peer_runs_every_call_kind_over_one_connection() {
    let Some(mc) = cluster("grpc_peer", &["python3"], true) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let server = mc.pod("server").unwrap();
    let _s = peer_server(&server, GRPC_PEER, "grpc-a", 50051, &[]);
    let svc = mc
        .service(
            "grpc",
            "10.200.2.20",
            "fd00:200::2:20",
            &[(80, 50051)],
            &[&server],
        )
        .unwrap();

    let calls = r#"[
        {"method": "unary", "text": "one", "metadata": {"baggage": "routing-key=feature-x"}},
        {"method": "server_stream", "text": "s", "n": 3, "delay_ms": 20, "metadata": {}},
        {"method": "client_stream", "texts": ["a", "b"]},
        {"method": "bidi", "n": 3},
        {"method": "unary", "metadata": {"fail": "1"}},
        {"method": "server_stream", "metadata": {"fail": "1"}}
    ]"#;
    let target = format!("{}:50051", server.ip4());
    let results = run_json(
        &client,
        &[
            "python3", GRPC_PEER, "client", "--target", &target, "--calls", calls,
        ],
    );
    let r = results.as_array().unwrap();
    assert_eq!(r.len(), 6, "{results}");
    let expect = [
        ("unary", vec!["one"]),
        ("server_stream", vec!["s#0", "s#1", "s#2"]),
        ("client_stream", vec!["a,b"]),
        ("bidi", vec!["m0", "m1", "m2"]),
    ];
    for (res, (method, texts)) in r.iter().zip(expect) {
        assert_eq!(res["method"], method, "{res}");
        assert_eq!(res["code"], "OK", "{res}");
        assert_eq!(res["details"], Value::Null, "{res}");
        assert_eq!(strs(&res["texts"]), texts, "{res}");
        assert!(
            strs(&res["served_by"]).iter().all(|s| *s == "grpc-a"),
            "{res}"
        );
        assert_eq!(res["trailing"]["x-served-by"], "grpc-a", "{res}");
    }
    assert_eq!(
        r[0]["seen_metadata"]["baggage"], "routing-key=feature-x",
        "{results}"
    );
    assert_eq!(r[1]["seen_metadata"].get("baggage"), None, "{results}");
    // One channel, one connection: the server saw the same client address for every call.
    let peer = r[0]["peer"].as_str().unwrap();
    assert!(
        peer.starts_with(&format!("ipv4:{}:", client.ip4())),
        "{results}"
    );
    assert!(r[..4].iter().all(|res| res["peer"] == peer), "{results}");
    for res in &r[4..] {
        assert_eq!(res["code"], "FAILED_PRECONDITION", "{res}");
        assert_eq!(res["details"], "asked to fail", "{res}");
        assert_eq!(res["trailing"]["x-served-by"], "grpc-a", "{res}");
        assert!(strs(&res["served_by"]).is_empty(), "{res}");
    }

    // IPv6: the pod address and a ClusterIP (kube-proxy DNAT, the form the router tests use).
    let calls = r#"[{"method": "unary"}, {"method": "bidi", "n": 2}]"#;
    for target in [
        format!("[{}]:50051", server.ip6()),
        format!("[{}]:80", svc.ip6()),
        format!("{}:80", svc.ip4()),
    ] {
        let results = run_json(
            &client,
            &[
                "python3", GRPC_PEER, "client", "--target", &target, "--calls", calls,
            ],
        );
        for res in results.as_array().unwrap() {
            assert_eq!(res["code"], "OK", "{target}: {res}");
            assert_eq!(res["trailing"]["x-served-by"], "grpc-a", "{target}: {res}");
        }
        let want = if target.starts_with('[') {
            format!("ipv6:[{}]:", client.ip6())
        } else {
            format!("ipv4:{}:", client.ip4())
        };
        assert!(
            results[0]["peer"].as_str().unwrap().starts_with(&want),
            "{target}: {results}"
        );
    }

    // Nothing listening: a result with UNAVAILABLE, not a hang.
    let target = format!("{}:50052", server.ip4());
    let results = run_json(
        &client,
        &[
            "python3",
            GRPC_PEER,
            "client",
            "--target",
            &target,
            "--timeout",
            "3",
            "--calls",
            r#"[{"method": "unary"}]"#,
        ],
    );
    assert_eq!(results[0]["code"], "UNAVAILABLE", "{results}");
}

#[test]
fn ws_peer_echoes_and_reports_the_upgrade_request() {
    let Some(mc) = cluster("ws_peer", &["python3"], true) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let server = mc.pod("server").unwrap();
    let _s = peer_server(&server, WS_PEER, "ws-a", 8081, &[]);
    for url in [
        format!("ws://{}:8081/chat?room=1", server.ip4()),
        format!("ws://[{}]:8081/chat?room=1", server.ip6()),
    ] {
        let out = run_json(
            &client,
            &[
                "python3",
                WS_PEER,
                "client",
                "--url",
                &url,
                "--header",
                "baggage: routing-key=feature-x",
                "--messages",
                "a,b,c,__request__",
            ],
        );
        assert_eq!(out["status"], "ok", "{out}");
        assert_eq!(out["served_by"], "ws-a", "{out}");
        assert_eq!(out["http_status"], 101, "{out}");
        let replies = strs(&out["replies"]);
        assert_eq!(replies[..3], ["ws-a:a", "ws-a:b", "ws-a:c"], "{out}");
        let request: Value =
            serde_json::from_str(replies[3].strip_prefix("ws-a:").unwrap()).unwrap();
        assert_eq!(request["path"], "/chat?room=1", "{out}");
        let headers = request["headers"].as_array().unwrap();
        assert!(
            headers.contains(&serde_json::json!(["baggage", "routing-key=feature-x"])),
            "{out}"
        );
    }
    // Errors: a non-zero exit and the reason on stderr.
    let url = format!("ws://{}:8082/", server.ip4());
    let out = client
        .run(
            &[
                "python3",
                WS_PEER,
                "client",
                "--url",
                &url,
                "--messages",
                "a",
            ],
            TIMEOUT,
        )
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("ws_peer:"), "{out:?}");
}

#[test]
fn opaque_peer_speaks_first_and_echoes() {
    let Some(mc) = cluster("opaque_peer", &["python3"], false) else {
        return;
    };
    let client = mc.pod("client").unwrap();
    let server = mc.pod("server").unwrap();
    let _banner = peer_server(&server, OPAQUE_PEER, "smtp-a", 2525, &["--banner"]);
    let _plain = peer_server(&server, OPAQUE_PEER, "raw-a", 7000, &[]);
    let [b4, b6] = listen_addrs(&server, 2525);
    for target in [&b4, &b6] {
        // The client sends nothing until the server spoke.
        let out = run_json(
            &client,
            &[
                "python3",
                OPAQUE_PEER,
                "client",
                "--target",
                target,
                "--expect-banner",
                "--send",
                "hello\\nworld\\n",
            ],
        );
        assert_eq!(out["banner"], "smtp-a ready", "{out}");
        assert_eq!(out["received"], "smtp-a:hello\nsmtp-a:world\n", "{out}");
        assert_eq!(out["eof"], true, "{out}");
        // Banner only, nothing sent.
        let out = run_json(
            &client,
            &[
                "python3",
                OPAQUE_PEER,
                "client",
                "--target",
                target,
                "--expect-banner",
            ],
        );
        assert_eq!(out["banner"], "smtp-a ready", "{out}");
        assert_eq!(out["received"], "", "{out}");
    }
    let [p4, _] = listen_addrs(&server, 7000);
    let out = run_json(
        &client,
        &[
            "python3",
            OPAQUE_PEER,
            "client",
            "--target",
            &p4,
            "--send",
            "a\\nb",
        ],
    );
    assert_eq!(out["banner"], Value::Null, "{out}");
    assert_eq!(out["received"], "raw-a:a\nraw-a:b", "{out}");
    // --lines: no half-close needed.
    let out = run_json(
        &client,
        &[
            "python3",
            OPAQUE_PEER,
            "client",
            "--target",
            &p4,
            "--send",
            "x\\ny\\n",
            "--lines",
            "2",
        ],
    );
    assert_eq!(out["received"], "raw-a:x\nraw-a:y\n", "{out}");
    // A server that never speaks: the banner wait is bounded.
    let started = Instant::now();
    let out = client
        .run(
            &[
                "python3",
                OPAQUE_PEER,
                "client",
                "--target",
                &p4,
                "--expect-banner",
                "--timeout",
                "1",
            ],
            TIMEOUT,
        )
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stdout.contains("\"timed_out\": true"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn podserver_headers_returns_the_head_as_received() {
    let Some(mc) = cluster("podserver_headers", &["python3", "curl"], false) else {
        return;
    };
    let (client, server, _s) = podserver_pair(&mc);
    let head = "GET /headers?x=1 HTTP/1.1\r\nhost: Example.COM\r\nX-Mixed-Case: 1\r\n\
                x-mixed-case: 2\r\nZZZ-First:  spaced \r\naaa-last: y\r\nConnection: close\r\n\r\n";
    let out = raw_http(&client, &server.ip4().to_string(), 8080, head);
    let (resp_head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(resp_head.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        resp_head.contains(&format!("content-length: {}\r\n", head.len())),
        "{out}"
    );
    assert_eq!(body, head);

    // curl: its own headers, then ours, in the order given, case kept.
    let url = format!("http://[{}]:8080/headers", server.ip6());
    let body = client
        .run(
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "-H",
                "X-Mixed-Case: 1",
                "-H",
                "x-LOWER: 2",
                &url,
            ],
            TIMEOUT,
        )
        .unwrap()
        .check()
        .unwrap();
    assert!(body.starts_with("GET /headers HTTP/1.1\r\n"), "{body}");
    assert!(
        body.ends_with("X-Mixed-Case: 1\r\nx-LOWER: 2\r\n\r\n"),
        "{body}"
    );
}

/// `len` bytes that repeat nowhere nearby (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The peak resident memory of `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn podserver_echo_streams_a_20_mib_upload_back() {
    let Some(mc) = cluster("podserver_echo", &["curl", "python3"], false) else {
        return;
    };
    let (client, server, s) = podserver_pair(&mc);
    let data = noise(20 * MIB);
    let input = mc.workdir().join("upload.bin");
    fs::write(&input, &data).unwrap();
    let input = input.to_str().unwrap();
    let url = format!("http://{}:8080/echo", server.ip4());
    for (how, extra) in [
        ("chunked", ["-T", input, "-H", "Transfer-Encoding: chunked"]),
        (
            "content-length",
            [
                "--data-binary",
                &format!("@{input}"),
                "-H",
                "X-Kind: length",
            ],
        ),
    ] {
        let output = mc.workdir().join(format!("echoed-{how}.bin"));
        let headers = mc.workdir().join(format!("headers-{how}.txt"));
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-o",
            output.to_str().unwrap(),
            "-D",
            headers.to_str().unwrap(),
        ];
        argv.extend_from_slice(&extra);
        argv.push(&url);
        client.run(&argv, TIMEOUT).unwrap().check().unwrap();
        let headers = fs::read_to_string(&headers).unwrap();
        assert!(headers.contains("x-served-by: srv\r\n"), "{headers}");
        if how == "chunked" {
            assert!(
                headers.contains("transfer-encoding: chunked\r\n"),
                "{headers}"
            );
        } else {
            assert!(
                headers.contains(&format!("content-length: {}\r\n", data.len())),
                "{headers}"
            );
        }
        let echoed = fs::read(&output).unwrap();
        assert_eq!(echoed.len(), data.len(), "{how}");
        assert!(echoed == data, "{how}: the echo differs from the upload");
    }
    // Streamed, not buffered: the server never held a 20 MiB body.
    let peak = peak_rss_kib(s.pid());
    assert!(peak < 12 * 1024, "podserver peak RSS {peak} KiB");

    // Trailers of a chunked request are read and dropped; the connection stays usable.
    let request = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n\
                   GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = raw_http(&client, &server.ip4().to_string(), 8080, request);
    assert!(
        out.contains("transfer-encoding: chunked\r\n")
            && out.contains("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{out}"
    );
    assert!(
        out.ends_with("content-length: 0\r\nx-served-by: srv\r\nconnection: close\r\n\r\n"),
        "{out}"
    );
}

#[test]
fn podserver_sleep_bytes_and_head() {
    let Some(mc) = cluster("podserver_sleep_bytes_head", &["curl", "python3"], false) else {
        return;
    };
    let (client, server, _s) = podserver_pair(&mc);
    let base = format!("http://{}:8080", server.ip4());
    let curl = |args: &[&str]| {
        let mut argv = vec!["curl", "-sS", "-g", "--max-time", "10"];
        argv.extend_from_slice(args);
        client.run(&argv, TIMEOUT).unwrap().check().unwrap()
    };

    let started = Instant::now();
    assert_eq!(curl(&[&format!("{base}/sleep/700")]), "srv\n");
    assert!(started.elapsed() >= Duration::from_millis(700));
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/sleep/x"),
    ]);
    assert_eq!(code, "400");

    let n = 3 * MIB + 17;
    let output = mc.workdir().join("bytes.bin");
    curl(&["-o", output.to_str().unwrap(), &format!("{base}/bytes/{n}")]);
    let got = fs::read(&output).unwrap();
    let pattern = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n";
    assert_eq!(got.len(), n);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern[i % pattern.len()]),
        "/bytes/{n} does not follow the pattern"
    );
    assert_eq!(curl(&[&format!("{base}/bytes/0")]), "");

    // HEAD: GET's headers, no body.
    for (path, length) in [
        ("/", 4),
        ("/bytes/1000", 1000),
        ("/bytes/5000000", 5_000_000),
        ("/peer", format!("{}:12345\n", client.ip4()).len()),
    ] {
        let out = curl(&["-i", "-I", &format!("{base}{path}")]);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {out}");
        assert!(out.contains("x-served-by: srv\r\n"), "{path}: {out}");
        if path != "/peer" {
            assert!(
                out.contains(&format!("content-length: {length}\r\n")),
                "{path}: {out}"
            );
        }
        assert!(out.ends_with("\r\n\r\n"), "{path}: {out}");
    }
    // HEAD and GET on one keep-alive connection: no stray body between them.
    let request = "HEAD /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n\
                   GET /bytes/10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = raw_http(&client, &server.ip4().to_string(), 8080, request);
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.ends_with("\r\n\r\nabcdefghij"), "{out}");
}
