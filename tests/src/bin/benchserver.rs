//! Upstream server of the router benchmark (`cargo xtask bench router`, see
//! `docs/benchmarks.md`): HTTP/1.1 and h2c (prior knowledge) on the same port, as cheap as
//! hyper makes it, so the benchmark measures the proxies rather than the servers.
//!
//! `benchserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...] [--threads N]`
//!
//! Every request gets `200 OK`, `x-served-by: NAME` and the body `NAME\n`, except
//! `GET /stats`, which answers how many other requests this server has served (`<n>\n`) and is
//! not counted itself: the benchmark reads it before and after a sample to prove every request
//! of the sample reached this server. Request bodies are ignored. Keep-alive, `Connection:
//! close` and HTTP/2 multiplexing are hyper's (`hyper_util::server::conn::auto`). Prints
//! `listening` once every address is bound. `--threads` sets the tokio workers (default 2).

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

const USAGE: &str =
    "usage: benchserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...] [--threads N]";

struct State {
    body: Bytes,
    served_by: HeaderValue,
    served: AtomicU64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("benchserver: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut name = None;
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().context(USAGE)?;
        match flag.as_str() {
            "--name" => name = Some(value),
            "--listen" => listen.push(value.parse().with_context(|| format!("--listen {value}"))?),
            "--threads" => threads = value.parse().context("--threads")?,
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    let Some(name) = name else { bail!(USAGE) };
    if listen.is_empty() || !(1..=64).contains(&threads) {
        bail!(USAGE);
    }
    let state = Arc::new(State {
        body: Bytes::from(format!("{name}\n")),
        served_by: HeaderValue::from_str(&name).context("--name is not a header value")?,
        served: AtomicU64::new(0),
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(listen, state))
}

async fn serve(listen: Vec<SocketAddr>, state: Arc<State>) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?,
        );
    }
    println!("listening");
    std::io::stdout().flush()?;
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(accept_loop(l, builder.clone(), state.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(l: TcpListener, builder: auto::Builder<TokioExecutor>, state: Arc<State>) {
    loop {
        let stream = match l.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (builder, state) = (builder.clone(), state.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = respond(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let body = if req.uri().path() == "/stats" {
        Bytes::from(format!("{}\n", state.served.load(Ordering::Relaxed)))
    } else {
        state.served.fetch_add(1, Ordering::Relaxed);
        state.body.clone()
    };
    let mut resp = Response::new(Full::new(body));
    let h = resp.headers_mut();
    h.insert("x-served-by", state.served_by.clone());
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
