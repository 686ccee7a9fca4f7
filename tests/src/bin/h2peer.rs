//! HTTP/2 (h2c, prior knowledge) peers for the isolation tests: a server with a stream limit
//! like real ones, two hostile clients and a measuring victim. The hostile clients first make
//! one complete request, so the router already holds an upstream connection their streams join.
//!
//! - `h2peer server --name NAME --listen ADDR:PORT [--listen ..]`: at most 100 concurrent
//!   streams per connection; every response carries `x-served-by: NAME`. `/bytes/<n>` streams
//!   `n` bytes (at most 1 GiB); `/echo` streams the request body back as it arrives (never
//!   whole); `/head-bytes/<n>` answers with an `x-fill` header of `n` bytes (at most 1 MiB);
//!   `/sleep/<ms>` answers `NAME\n` after `ms` (at most 60 s); any other path reads the
//!   whole request body, then answers `NAME\n`. `--goaway-after N`: GOAWAY on a connection
//!   once it brought N requests (the streams in flight complete). Prints `listening`.
//! - `h2peer window0 --target ADDR:PORT --path P --streams N [--header "name: value"]`: one
//!   connection announcing `SETTINGS_INITIAL_WINDOW_SIZE=0`, N GETs whose bodies it never
//!   reads. Prints `holding` once every response head arrived (or after 10 s), then waits.
//! - `h2peer open-bodies --target ADDR:PORT --path P --streams N [--header ..]`: one connection,
//!   N POSTs whose bodies never end. Prints `holding` after 1 s, then waits; logs `response
//!   <status>` or `failed` on stderr for each request that ends.
//! - `h2peer victim --target ADDR:PORT --path P --count N [--header ..] [--timeout-ms T]`: N
//!   requests one after the other, each on a new connection, each read to its end within T
//!   (default 5000); prints one JSON line: `{"ok":..,"failed":..,"p50_ms":..,"p99_ms":..,
//!   "errors":[..]}`.
//!
//! Every wait is bounded; the hostile clients wait until killed.

use std::{convert::Infallible, io::Write, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

const MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// HTTP/2 (h2c, prior knowledge) peers for the isolation tests.
#[derive(Parser)]
struct Cli {
    mode: Mode,
    #[command(flatten)]
    args: Args,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Serves `/bytes/<n>`, and `NAME\n` after reading the whole request body.
    Server,
    /// One connection with a zero initial window, N GETs whose bodies it never reads.
    Window0,
    /// One connection, N POSTs whose bodies never end.
    OpenBodies,
    /// N requests one after the other, each on a new connection; prints one JSON line.
    Victim,
}

#[derive(clap::Args)]
struct Args {
    /// Server: sent back in the body.
    #[arg(long, value_name = "NAME", default_value = "")]
    name: String,
    /// Server: address to listen on (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Clients: where to connect.
    #[arg(long, value_name = "ADDR:PORT")]
    target: Option<SocketAddr>,
    /// Clients: the request path.
    #[arg(long, value_name = "P", default_value = "/")]
    path: String,
    /// window0, open-bodies: streams to open.
    #[arg(long, value_name = "N", default_value_t = 10)]
    streams: usize,
    /// victim: requests to make.
    #[arg(long, value_name = "N", default_value_t = 10)]
    count: usize,
    /// Clients: one header added to every request.
    #[arg(long, value_name = "name: value", value_parser = header)]
    header: Option<(String, String)>,
    /// victim: how long each request may take, in milliseconds.
    #[arg(long = "timeout-ms", value_name = "T", default_value = "5000", value_parser = millis)]
    timeout: Duration,
    /// server: after this many requests on a connection, GOAWAY (graceful: the streams in
    /// flight complete, then the connection closes).
    #[arg(long, value_name = "N")]
    goaway_after: Option<usize>,
}

fn header(v: &str) -> Result<(String, String), String> {
    let (n, val) = v.split_once(':').ok_or("expected `name: value`")?;
    Ok((n.trim().to_string(), val.trim().to_string()))
}

fn millis(v: &str) -> Result<Duration, std::num::ParseIntError> {
    v.parse().map(Duration::from_millis)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("h2peer: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let Cli { mode, args: a } = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match mode {
        Mode::Server => rt.block_on(server(a)),
        Mode::Window0 => rt.block_on(window0(a)),
        Mode::OpenBodies => rt.block_on(open_bodies(a)),
        Mode::Victim => rt.block_on(victim(a)),
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn server(a: Args) -> Result<()> {
    if a.listen.is_empty() || a.name.is_empty() {
        bail!("server needs --name NAME and --listen ADDR:PORT");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut listeners = Vec::new();
    for addr in &a.listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?,
        );
    }
    println!("listening");
    std::io::stdout().flush()?;
    let name = Bytes::from(format!("{}\n", a.name));
    let goaway_after = a.goaway_after;
    for l in listeners {
        let name = name.clone();
        tasks.spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let count = std::sync::atomic::AtomicUsize::new(0);
                    let enough = std::sync::Arc::new(tokio::sync::Notify::new());
                    let tell = enough.clone();
                    let svc = service_fn(move |req| {
                        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        if Some(n) == goaway_after {
                            tell.notify_one();
                        }
                        respond(req, name.clone())
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(100)
                        .serve_connection(TokioIo::new(s), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = enough.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// A server response body: streamed back from the request (`/echo`) or made here.
type ServerBody = BoxBody<Bytes, hyper::Error>;

async fn respond(req: Request<Incoming>, name: Bytes) -> Result<Response<ServerBody>, Infallible> {
    let served_by = String::from_utf8_lossy(name.trim_ascii_end()).into_owned();
    let mut resp = answer(req, name).await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&served_by) {
        resp.headers_mut().insert("x-served-by", v);
    }
    Ok(resp)
}

async fn answer(req: Request<Incoming>, name: Bytes) -> Response<ServerBody> {
    let made = |b: Body| b.map_err(|never| match never {}).boxed();
    let path = req.uri().path();
    if path == "/echo" {
        return Response::new(req.into_body().boxed());
    }
    if let Some(n) = path.strip_prefix("/head-bytes/") {
        let n = n.parse::<usize>().unwrap_or(0).min(1 << 20);
        let mut resp = Response::new(made(Full::new(name).boxed()));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&"a".repeat(n)) {
            resp.headers_mut().insert("x-fill", v);
        }
        return resp;
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Response::new(made(Full::new(name).boxed()));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n = n.parse::<u64>().unwrap_or(0).min(MAX_BYTES);
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let frames = futures::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                (left > 0).then(|| {
                    let k = left.min(chunk.len() as u64);
                    (Ok(Frame::data(chunk.slice(..k as usize))), left - k)
                })
            }
        });
        return Response::new(made(StreamBody::new(frames).boxed()));
    }
    let _ = req.into_body().collect().await;
    Response::new(made(Full::new(name).boxed()))
}

fn request(a: &Args, method: &str, body: Body) -> Result<Request<Body>> {
    let target = a.target.context("--target is required")?;
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{target}{}", a.path));
    if let Some((n, v)) = &a.header {
        b = b.header(n.as_str(), v.as_str());
    }
    Ok(b.body(body)?)
}

async fn connect(
    target: SocketAddr,
    window0: bool,
) -> Result<hyper::client::conn::http2::SendRequest<Body>> {
    let s = TcpStream::connect(target).await?;
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if window0 {
        b.initial_stream_window_size(0);
    }
    let (send, conn) = b.handshake(TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn hold() -> Result<()> {
    println!("holding");
    std::io::stdout().flush()?;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

/// One complete request first: the router then has an upstream connection for the hostile
/// streams to join (concurrent first requests could each open their own).
async fn warm_up(a: &Args) -> Result<()> {
    let mut send = connect(a.target.context("--target")?, false).await?;
    let mut req = request(a, "GET", Empty::new().boxed())?;
    *req.uri_mut() = format!("http://{}/", a.target.context("--target")?).parse()?;
    let resp = send.send_request(req).await?;
    resp.into_body().collect().await?;
    Ok(())
}

async fn window0(a: Args) -> Result<()> {
    warm_up(&a).await?;
    let send = connect(a.target.context("--target")?, true).await?;
    let mut heads = tokio::task::JoinSet::new();
    let mut kept = Vec::new();
    for _ in 0..a.streams {
        let mut send = send.clone();
        let req = request(&a, "GET", Empty::new().boxed())?;
        heads.spawn(async move { send.send_request(req).await });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = heads.join_next().await {
            // Keep the bodies unread: the window stays shut.
            if let Ok(Ok(resp)) = r {
                kept.push(resp);
            }
        }
    })
    .await;
    eprintln!("{} response heads", kept.len());
    hold().await
}

async fn open_bodies(a: Args) -> Result<()> {
    warm_up(&a).await?;
    let send = connect(a.target.context("--target")?, false).await?;
    for _ in 0..a.streams {
        let mut send = send.clone();
        let body = StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, Infallible>>());
        let req = request(&a, "POST", body.boxed())?;
        tokio::spawn(async move {
            match send.send_request(req).await {
                Ok(resp) => eprintln!("response {}", resp.status().as_u16()),
                Err(_) => eprintln!("failed"),
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    hold().await
}

async fn victim(a: Args) -> Result<()> {
    let target = a.target.context("--target")?;
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut ms = Vec::new();
    for _ in 0..a.count {
        let start = std::time::Instant::now();
        let req = request(&a, "GET", Empty::new().boxed())?;
        let one = async {
            let mut send = connect(target, false).await?;
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body.len()))
        };
        match tokio::time::timeout(a.timeout, one).await {
            Ok(Ok((status, _))) if status.is_success() => ok += 1,
            Ok(Ok((status, _))) => errors.push(format!("status {status}")),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push(format!("no complete response within {:?}", a.timeout)),
        }
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        ms.get(((ms.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "ok": ok,
            "failed": errors.len(),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "errors": errors,
        })
    );
    Ok(())
}
