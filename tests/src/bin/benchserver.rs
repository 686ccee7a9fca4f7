//! Upstream server of the router benchmark (`cargo xtask bench router`, see
//! `docs/benchmarks.md`): HTTP/1.1 and h2c (prior knowledge) on the same port, as cheap as
//! hyper makes it, so the benchmark measures the proxies rather than the servers.
//!
//! `benchserver --name NAME --listen ADDR:PORT [--listen ADDR:PORT ...] [--threads N]`
//!
//! Every request gets `200 OK`, `x-served-by: NAME` and the body `NAME\n`, except
//! `GET /stats`, which answers how many other requests this server has served (`<n>\n`) and is
//! not counted itself: the benchmark reads it before and after a sample to prove every request
//! of the sample reached this server. `GET /delay?ms=N` (N at most 60000) answers like any
//! request, but only after N ms, so that requests stay in flight through a proxy (the
//! benchmark's memory figures); `GET /inflight` answers how many of those are waiting
//! (`<n>\n`, not counted either). Request bodies are ignored. Keep-alive, `Connection: close`
//! and HTTP/2 multiplexing are hyper's (`hyper_util::server::conn::auto`), with up to
//! 1024 concurrent streams per HTTP/2 connection. Prints `listening` once every address is
//! bound. `--threads` sets the tokio workers (default 2).

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

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures::future::Either;
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
use redirect_tests::server_args::ServerArgs;
use tokio::net::TcpListener;

/// Upstream server of the router benchmark: HTTP/1.1 and h2c on the same port.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Tokio worker threads.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
}

struct State {
    body: Bytes,
    served_by: HeaderValue,
    served: AtomicU64,
    /// `/delay` requests waiting.
    delayed: AtomicU64,
}

/// Longest `/delay` accepted, in milliseconds.
const MAX_DELAY_MS: u64 = 60_000;
/// Concurrent streams per HTTP/2 connection: above what the memory figures hold on one
/// upstream connection (hyper's default is 200).
const MAX_H2_STREAMS: u32 = 1024;

fn main() {
    if let Err(e) = run() {
        eprintln!("benchserver: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let Args {
        server: ServerArgs { name, listen },
        threads,
    } = Args::parse();
    let state = Arc::new(State {
        body: Bytes::from(format!("{name}\n")),
        served_by: HeaderValue::from_str(&name).context("--name is not a header value")?,
        served: AtomicU64::new(0),
        delayed: AtomicU64::new(0),
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.into())
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
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
            let svc = service_fn(move |req| match delay(&req) {
                None => Either::Left(std::future::ready(Ok::<_, Infallible>(respond(
                    &state, &req,
                )))),
                Some(wait) => {
                    let state = state.clone();
                    Either::Right(async move {
                        let waiting = Delayed::enter(&state);
                        tokio::time::sleep(wait).await;
                        drop(waiting);
                        Ok(respond(&state, &req))
                    })
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// How long a `GET /delay?ms=N` waits before its answer; `None` for every other request.
fn delay(req: &Request<Incoming>) -> Option<Duration> {
    if req.uri().path() != "/delay" {
        return None;
    }
    let ms = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_DELAY_MS);
    Some(Duration::from_millis(ms))
}

/// Counts a `/delay` request as waiting while it lives (also when its connection goes away
/// and the wait is dropped).
struct Delayed<'s>(&'s State);

impl<'s> Delayed<'s> {
    fn enter(state: &'s State) -> Self {
        state.delayed.fetch_add(1, Ordering::Relaxed);
        Delayed(state)
    }
}

impl Drop for Delayed<'_> {
    fn drop(&mut self) {
        self.0.delayed.fetch_sub(1, Ordering::Relaxed);
    }
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let body = if req.uri().path() == "/stats" {
        Bytes::from(format!("{}\n", state.served.load(Ordering::Relaxed)))
    } else if req.uri().path() == "/inflight" {
        Bytes::from(format!("{}\n", state.delayed.load(Ordering::Relaxed)))
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
