//! The router's HTTP logic end to end over loopback, with the kernel boundary in memory
//! ([`MemoryKernel`]): no root, no eBPF. What the kernel would have recorded for a connection is
//! recorded by the test before it connects.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirect_common::{ForkEndpoints, ForkKey, OrigDst, SockAddr};

use super::{MemoryKernel, Outcome, Router, RouterSettings, Shared};
use crate::routing::{KeyInfo, PortProtocol, RouteView, Tables};

const SERVICE: u32 = 7;
const KEY_ID: u32 = 3;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP/1.1 upstream that answers every request with its name and keeps each request head.
struct Upstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start(name: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let kept = kept.clone();
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    // Requests without bodies, one after the other on the connection.
                    while let Some(head) = read_head(&mut conn) {
                        kept.lock().unwrap().push(head);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if conn.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Upstream { addr, heads }
    }

    fn requests(&self) -> usize {
        self.heads.lock().unwrap().len()
    }
}

/// Reads up to the end of a head; `None` at end of stream.
fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        assert!(head.len() < 64 * 1024, "head without end");
    }
    Some(String::from_utf8(head).unwrap())
}

/// A response's status code and body (`content-length` framed).
fn read_response(conn: &mut TcpStream) -> Option<(u16, String)> {
    let head = read_head(conn)?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8(body).ok()?))
}

/// One forked service: `baseline` stands at the address the client asked for, the fork of
/// key `feature-x` at `fork` (no endpoint: `None`).
fn tables(fork: Option<SocketAddr>, fallback: bool) -> Tables {
    let mut t = Tables::default();
    t.service_protocols.insert(SERVICE, PortProtocol::Http);
    t.keys.insert(
        KEY_ID,
        Arc::new(KeyInfo {
            key: "feature-x".into(),
            owners: vec!["default/feature-x".into()],
            fallback_to_baseline: fallback,
        }),
    );
    let eps: Vec<SockAddr> = fork.into_iter().map(SockAddr::from).collect();
    t.forks.insert(
        ForkKey {
            key_id: KEY_ID,
            service_id: SERVICE,
        },
        ForkEndpoints::from_endpoints(&eps).0,
    );
    t
}

struct Running {
    addr: SocketAddr,
    shared: Arc<Shared>,
    kernel: MemoryKernel,
}

fn start(tables: Tables, settings: RouterSettings) -> Running {
    let kernel = MemoryKernel::default();
    let settings = RouterSettings {
        v4: Some("127.0.0.1:0".parse().unwrap()),
        workers: 1,
        ..settings
    };
    let router = Router::bind(settings, kernel.clone()).unwrap();
    let addr = router.listeners[0].1.local_addr().unwrap();
    let shared = router.shared.clone();
    shared.view.store(Arc::new(RouteView::new(tables)));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(router.serve());
    });
    Running {
        addr,
        shared,
        kernel,
    }
}

impl Running {
    /// Connects as a redirected client whose original destination was `dst`.
    fn connect(&self, dst: SocketAddr) -> TcpStream {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let src = sock.local_addr().unwrap().as_socket().unwrap();
        self.kernel.record(
            SockAddr::from(src),
            OrigDst {
                dst: SockAddr::from(dst),
                service_id: SERVICE,
                cgroup_id: 0,
                recorded_ns: 0,
            },
        );
        self.connect_unrecorded(sock)
    }

    fn connect_unrecorded(&self, sock: socket2::Socket) -> TcpStream {
        sock.connect(&self.addr.into()).unwrap();
        let conn: TcpStream = sock.into();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        conn
    }
}

fn get(conn: &mut TcpStream, extra: &str) -> (u16, String) {
    let req = format!("GET /x HTTP/1.1\r\nhost: checkout\r\n{extra}\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    read_response(conn).expect("a response")
}

/// Polls `cond` every 10 ms for at most 10 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn each_request_on_a_connection_is_routed_by_its_own_key() {
    let (baseline, fork) = (Upstream::start("baseline"), Upstream::start("fork"));
    let r = start(tables(Some(fork.addr), false), RouterSettings::default());
    let mut conn = r.connect(baseline.addr);
    assert_eq!(
        get(&mut conn, "baggage: routing-key=feature-x\r\n"),
        (200, "fork".into())
    );
    assert_eq!(get(&mut conn, ""), (200, "baseline".into()));
    assert_eq!(
        get(&mut conn, "x-routing-key: feature-x\r\n"),
        (200, "fork".into())
    );
    assert_eq!(
        get(&mut conn, "baggage: routing-key=unknown\r\n"),
        (200, "baseline".into())
    );
    assert_eq!((fork.requests(), baseline.requests()), (2, 2));
    // The record is taken when the connection is admitted, not left for the sweep.
    assert_eq!(r.kernel.pending(), 0);
    assert_eq!(r.shared.stats.get(Outcome::NoOrigDst), 0);
}

#[test]
fn hop_by_hop_fields_stay_with_the_client() {
    let baseline = Upstream::start("baseline");
    let r = start(tables(None, true), RouterSettings::default());
    let mut conn = r.connect(baseline.addr);
    let extra = "connection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n\
                 x-end-to-end: 2\r\n";
    assert_eq!(get(&mut conn, extra), (200, "baseline".into()));
    let head = baseline.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("x-end-to-end: 2\r\n"), "{head}");
    for gone in ["x-hop", "keep-alive"] {
        assert!(!head.contains(gone), "{gone} forwarded: {head}");
    }
}

#[test]
fn a_fork_without_endpoints_answers_503_unless_its_sandbox_falls_back() {
    let baseline = Upstream::start("baseline");
    for (fallback, want) in [(false, 503), (true, 200)] {
        let r = start(tables(None, fallback), RouterSettings::default());
        let mut conn = r.connect(baseline.addr);
        let (status, body) = get(&mut conn, "baggage: routing-key=feature-x\r\n");
        assert_eq!(status, want, "fallback {fallback}: {body}");
        if !fallback {
            assert!(body.contains("default/feature-x"), "{body}");
        }
    }
    assert_eq!(baseline.requests(), 1);
}

#[test]
fn a_connection_the_kernel_did_not_record_is_closed_unserved() {
    let baseline = Upstream::start("baseline");
    let r = start(tables(None, true), RouterSettings::default());
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let mut conn = r.connect_unrecorded(sock);
    let _ = conn.write_all(b"GET /x HTTP/1.1\r\nhost: checkout\r\n\r\n");
    let mut buf = [0u8; 64];
    // Closed (or reset) without a byte: the router is no open proxy.
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
    eventually("the refusal is counted", || {
        r.shared.stats.get(Outcome::NoOrigDst) == 1
    });
    assert_eq!(baseline.requests(), 0);
}

#[test]
fn an_answer_that_ends_the_connection_says_so() {
    let baseline = Upstream::start("baseline");
    let r = start(tables(None, true), RouterSettings::default());
    // Framed two ways: refused, and nothing after it on the connection can be trusted.
    let mut conn = r.connect(baseline.addr);
    conn.write_all(
        b"POST /x HTTP/1.1\r\nhost: checkout\r\ncontent-length: 1\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut conn)
        .expect("an answer")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    // A keyed request for a fork without endpoints gets a 503 and the connection stays open.
    let r = start(tables(None, false), RouterSettings::default());
    let mut conn = r.connect(baseline.addr);
    conn.write_all(b"GET /x HTTP/1.1\r\nhost: c\r\nbaggage: routing-key=feature-x\r\n\r\n")
        .unwrap();
    let head = read_head(&mut conn)
        .expect("an answer")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503 "), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(baseline.requests(), 0);
}

#[test]
fn a_record_that_cannot_be_read_closes_the_connection_and_is_counted_as_such() {
    let baseline = Upstream::start("baseline");
    let r = start(tables(None, true), RouterSettings::default());
    r.kernel.break_takes();
    let mut conn = r.connect(baseline.addr);
    let _ = conn.write_all(b"GET /x HTTP/1.1\r\nhost: checkout\r\n\r\n");
    assert!(matches!(conn.read(&mut [0u8; 64]), Ok(0) | Err(_)));
    eventually("the map error is counted", || {
        r.shared.stats.get(Outcome::OrigDstError) == 1
    });
    // Not mistaken for a connection the kernel never redirected.
    assert_eq!(r.shared.stats.get(Outcome::NoOrigDst), 0);
    assert_eq!(baseline.requests(), 0);
}

#[test]
fn a_full_router_leaves_its_liveness_slot_and_returns_when_a_connection_ends() {
    let baseline = Upstream::start("baseline");
    let settings = RouterSettings {
        max_connections: 2,
        ..RouterSettings::default()
    };
    let r = start(tables(None, true), settings);
    assert_eq!(r.kernel.registered(), 0b01, "registered at bind");
    let mut first = r.connect(baseline.addr);
    assert_eq!(get(&mut first, ""), (200, "baseline".into()));
    let mut second = r.connect(baseline.addr);
    assert_eq!(get(&mut second, ""), (200, "baseline".into()));
    eventually("the full router leaves its slot", || {
        r.kernel.registered() == 0
    });
    drop(first);
    eventually("back in its slot", || r.kernel.registered() == 0b01);
    // A slot a peer emptied while the router had room is filled again by the liveness check.
    r.kernel.clear(0);
    eventually("registered again", || r.kernel.registered() == 0b01);
    drop(second);
}

/// An HTTP/2 upstream on loopback: answers every stream with `x-served-by: NAME`, echoes the
/// request body back as it arrives and ends with the trailer `x-served-by: NAME`.
fn h2_upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(echo(req, respond, name));
                    }
                });
            }
        });
    });
    addr
}

async fn echo(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    name: &'static str,
) {
    let resp = http::Response::builder()
        .header("x-served-by", name)
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(resp, false) else {
        return;
    };
    let mut body = req.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-served-by", http::HeaderValue::from_static(name));
    let _ = send.send_trailers(trailers);
}

/// An HTTP/2 client on `conn`, its connection driven by the current runtime.
async fn h2_client(conn: TcpStream) -> h2::client::SendRequest<bytes::Bytes> {
    conn.set_nonblocking(true).unwrap();
    let io = tokio::net::TcpStream::from_std(conn).unwrap();
    let (send, driver) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(driver);
    send
}

/// What a stream brought back: status, `x-served-by`, body and the trailer `x-served-by`.
type H2Answer = (u16, Option<String>, Vec<u8>, Option<String>);

/// Sends one request on `send` (`body`: none when empty) and reads the whole answer.
async fn h2_request(
    send: &h2::client::SendRequest<bytes::Bytes>,
    key: Option<&str>,
    body: Vec<u8>,
) -> H2Answer {
    let mut req = http::Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri("http://checkout/x");
    if let Some(key) = key {
        req = req.header("baggage", format!("routing-key={key}"));
    }
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut up) = send
        .send_request(req.body(()).unwrap(), body.is_empty())
        .unwrap();
    if !body.is_empty() {
        // More than the router's windows: it must move the body as they open.
        up.send_data(bytes::Bytes::from(body), true).unwrap();
    }
    let resp = response.await.unwrap();
    let served_by = |h: &http::HeaderMap| {
        h.get("x-served-by")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let head = (resp.status().as_u16(), served_by(resp.headers()));
    let mut recv = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    let trailer = recv.trailers().await.unwrap().as_ref().and_then(served_by);
    (head.0, head.1, got, trailer)
}

#[test]
fn http2_streams_on_one_connection_are_routed_each_by_its_key_with_bodies_and_trailers() {
    let (baseline, fork) = (h2_upstream("baseline"), h2_upstream("fork"));
    let r = start(tables(Some(fork), false), RouterSettings::default());
    let conn = r.connect(baseline);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let upload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (keyed, unkeyed, big) = rt.block_on(async {
        let send = h2_client(conn).await;
        let answers = async {
            tokio::join!(
                h2_request(&send, Some("feature-x"), Vec::new()),
                h2_request(&send, None, Vec::new()),
                h2_request(&send, Some("feature-x"), upload.clone()),
            )
        };
        tokio::time::timeout(IO_TIMEOUT, answers).await.unwrap()
    });
    let named = |n: &str| Some(n.to_string());
    assert_eq!(keyed, (200, named("fork"), Vec::new(), named("fork")));
    assert_eq!(
        unkeyed,
        (200, named("baseline"), Vec::new(), named("baseline"))
    );
    assert_eq!(
        (big.0, &big.1, &big.3),
        (200, &named("fork"), &named("fork"))
    );
    assert!(
        big.2 == upload,
        "the echoed body differs ({} bytes)",
        big.2.len()
    );
    use super::{Dest, RequestOutcome};
    assert_eq!(
        r.shared.stats.get_request(Dest::Fork, RequestOutcome::Ok),
        2
    );
    assert_eq!(
        r.shared
            .stats
            .get_request(Dest::Baseline, RequestOutcome::Ok),
        1
    );

    // A fork without endpoints: the router's own 503 on that stream, the connection goes on.
    let r = start(tables(None, false), RouterSettings::default());
    let conn = r.connect(baseline);
    let (refused, after) = rt.block_on(async {
        let send = h2_client(conn).await;
        let refused = h2_request(&send, Some("feature-x"), Vec::new()).await;
        (refused, h2_request(&send, None, Vec::new()).await)
    });
    assert_eq!((refused.0, &refused.1), (503, &None));
    let text = String::from_utf8_lossy(&refused.2);
    assert!(text.contains("default/feature-x"), "{text}");
    assert_eq!(after.1, named("baseline"));
}
