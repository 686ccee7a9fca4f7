//! The HTTP benchmark of the node router behind `cargo xtask bench router` (see
//! `docs/benchmarks.md`): what the router costs a request next to a direct connection, and how
//! it compares with HAProxy and nginx doing the same header routing, in CPU and in memory.
//!
//! `bench_router [--rounds N] [--seconds S] [--warmup S] [--json PATH] [--loads h1,h1_close,h2]`
//!
//! Defaults: 3 rounds, 3 s samples, 1 s warm-up per scenario, every load pattern. Needs root
//! (prints why and exits 0 without), wrk, h2load, haproxy, nginx, curl and python3. The agent
//! is `$REDIRECT_AGENT_BIN` (`cargo xtask bench router` passes a release build), the server
//! `$REDIRECT_BENCHSERVER_BIN` or `benchserver` next to this program.
//!
//! Builds a mini-cluster (pods `client`, `checkout-base`, `checkout-fork`; Service `checkout`
//! `10.200.2.40:80 → 8080`; Sandbox `feature-x` forking checkout), starts the agent (its
//! router) and `benchserver` (HTTP/1.1 and h2c) in both checkout pods, and HAProxy and nginx
//! in the node. Then, for three load patterns, measures five scenarios, interleaved within
//! each round (the order rotates from round to round), and prints the medians over the rounds:
//!
//! | scenario          | the client pod sends to                 | key | served by       |
//! |-------------------|-----------------------------------------|-----|-----------------|
//! | `direct`          | checkout-fork's `ip:8080`               | yes | checkout-fork   |
//! | `router_baseline` | ClusterIP `:80` (kernel → router)       | no  | checkout-base   |
//! | `router_fork`     | ClusterIP `:80` (kernel → router)       | yes | checkout-fork   |
//! | `haproxy`         | HAProxy in the node, `10.200.0.1:18080` | yes | checkout-fork   |
//! | `nginx`           | nginx in the node, `10.200.0.1:18082`   | yes | checkout-fork   |
//!
//! (For h2: HAProxy `:18081`, nginx `:18083`.) The key is
//! `baggage: routing-key=feature-x`; `direct` sends it too (ignored), so every scenario sends
//! the same request. Load patterns, all run inside the client pod: `h1` (`wrk -t1 -c32
//! --latency`, HTTP/1.1 keep-alive), `h1_close` (the same with `Connection: close`: one
//! connection per request) and `h2` (`h2load -c8 -m16`, h2c with prior knowledge; p50/p99
//! computed from its `--log-file`).
//!
//! HAProxy (Debian's package) runs with `nbthread 2` (the router's tokio runtime has one
//! worker per CPU, 2 here), keep-alive to the servers and `http-reuse always`, and routes with
//! an ACL on `req.hdr(baggage)`; one frontend per protocol (`:18080` HTTP/1.1, `:18081` h2c),
//! whose backends speak the client's protocol, as the router does.
//!
//! nginx (Debian's `nginx-light`, 1.22) runs in the foreground with one master and
//! `worker_processes 2`, everything it writes under the cluster's work dir, no access log, and
//! routes with `map $http_baggage $upstream` on the same baggage member as HAProxy's ACL (its
//! baseline is the ClusterIP too). Its upstreams keep idle connections (`keepalive`,
//! `proxy_http_version 1.1`, an empty `Connection`). One server with a plain HTTP/1.1 listener
//! and an `http2` one (h2c with prior knowledge). Unlike HAProxy and the router, nginx
//! forwards HTTP/2 requests to its upstreams in HTTP/1.1: one upstream connection per stream
//! in flight.
//!
//! Every sample is checked: no non-2xx response and no socket error, and the request counters
//! of both servers (`GET /stats`, read from the node before and after) show that every
//! request reached the intended server and none the other. Before measuring, one `curl` per
//! scenario and pattern, with the same headers, must see the expected `x-served-by` (and for
//! HAProxy and nginx, one without the key must see checkout-base). The
//! node's `TcpActiveOpens` (its netns only holds the router and the two proxies) gives the
//! upstream connections each proxy opened per request: the pool reuse.
//!
//! CPU time per request is reported for the load generator (`getrusage` of the reaped child),
//! the proxy (every thread of every process of it, from `schedstat`: the agent, HAProxy, or
//! nginx's master and workers) and the servers: unlike req/s, it hardly depends on what else
//! the machine runs at the time, and its sum over the chain explains the throughput ratios
//! when the CPUs are saturated.
//!
//! After the rounds, memory: each proxy's RSS (`VmRSS`, summed over its processes) before and
//! while the client pod holds `IDLE_H1_CONNS` idle HTTP/1.1 keep-alive connections through it
//! (a python3 program, one keyed request answered on each, one after the other), and before
//! and while `H2_CONNS` x `H2_STREAMS` HTTP/2 streams are in flight through it (h2load on
//! `GET /delay`, which checkout-fork holds; the RSS is read once the server holds them all):
//! the growth per connection or stream.
//!
//! Everything runs on this machine at once (load generator, router, proxies, servers): the
//! figures compare the scenarios with each other, not with other machines.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use nix::sys::signal::Signal;
use redirect_tests::{MiniCluster, Pod, Proc, ROUTER_IP4, SetupError, agent::Agent};

const VIP4: &str = "10.200.2.40";
const VIP6: &str = "fd00:200::2:40";
const SERVICE_PORT: u16 = 80;
/// benchserver's port in both checkout pods (the Service's target port).
const SERVER_PORT: u16 = 8080;
const HAPROXY_H1_PORT: u16 = 18080;
const HAPROXY_H2_PORT: u16 = 18081;
const NGINX_H1_PORT: u16 = 18082;
const NGINX_H2_PORT: u16 = 18083;
const KEY: &str = "feature-x";
const KEY_HEADER: &str = "baggage: routing-key=feature-x";
const BASE: &str = "checkout-base";
const FORK: &str = "checkout-fork";
const TOOLS: &[&str] = &["wrk", "h2load", "haproxy", "nginx", "curl", "python3"];
/// Longest sample accepted.
const MAX_SECONDS: f64 = 60.0;
/// How long a load generator may take beyond its measuring time (start-up, exit).
const LOAD_SLACK: Duration = Duration::from_secs(15);
const SHORT: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 keep-alive connections the client holds through each proxy for the memory
/// figures.
const IDLE_H1_CONNS: u64 = 1000;
/// HTTP/2 connections, and streams on each, held in flight through each proxy.
const H2_CONNS: u64 = 8;
const H2_STREAMS: u64 = 100;
/// How long the server holds each of those streams (`GET /delay?ms=N`).
const H2_DELAY: Duration = Duration::from_secs(8);
/// Wait between the last connection or stream in place and the RSS reading.
const SETTLE: Duration = Duration::from_millis(300);

fn main() {
    if let Err(e) = bench(Args::parse()) {
        eprintln!("bench_router: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Options.

/// The HTTP benchmark of the node router: what it costs a request next to a direct
/// connection, and how it compares with HAProxy and nginx doing the same header routing.
#[derive(Parser)]
struct Args {
    /// Rounds, each measuring every scenario once (1 to 100).
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,
    /// Length of each sample, in whole seconds (1 to 60).
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    seconds: f64,
    /// Length of each scenario's warm-up, in whole seconds (1 to 60).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    warmup: f64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Load patterns to run, comma-separated (default: all).
    #[arg(long, value_name = "h1,h1_close,h2", value_delimiter = ',')]
    loads: Option<Vec<String>>,
}

struct Options {
    /// Load patterns to run (default all), in `Load::ALL` order.
    loads: Vec<Load>,
    rounds: usize,
    seconds: f64,
    warmup: f64,
    json: Option<PathBuf>,
}

fn options(args: Args) -> Result<Options> {
    let mut o = Options {
        rounds: args.rounds,
        seconds: args.seconds,
        warmup: args.warmup,
        json: args.json,
        loads: Load::ALL.to_vec(),
    };
    if let Some(names) = args.loads {
        o.loads = Load::ALL
            .into_iter()
            .filter(|l| names.iter().any(|n| n == l.name()))
            .collect();
        ensure!(
            !names.is_empty() && o.loads.len() == names.len(),
            "--loads takes a comma-separated list of h1, h1_close, h2"
        );
    }
    ensure!((1..=100).contains(&o.rounds), "--rounds must be in 1..=100");
    // Whole seconds: wrk takes nothing finer.
    for (name, v, min) in [("--seconds", o.seconds, 1.0), ("--warmup", o.warmup, 1.0)] {
        ensure!(
            v >= min && v <= MAX_SECONDS && v.fract() == 0.0,
            "{name} must be a whole number in [{min}, {MAX_SECONDS}]"
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Scenarios and load patterns.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Direct,
    RouterBaseline,
    RouterFork,
    Haproxy,
    Nginx,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Direct,
        Scenario::RouterBaseline,
        Scenario::RouterFork,
        Scenario::Haproxy,
        Scenario::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::RouterBaseline => "router_baseline",
            Scenario::RouterFork => "router_fork",
            Scenario::Haproxy => "haproxy",
            Scenario::Nginx => "nginx",
        }
    }

    /// The pod whose server must answer.
    fn served_by(self) -> &'static str {
        match self {
            Scenario::RouterBaseline => BASE,
            _ => FORK,
        }
    }

    fn key(self) -> bool {
        self != Scenario::RouterBaseline
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    H1,
    H1Close,
    H2,
}

impl Load {
    const ALL: [Load; 3] = [Load::H1, Load::H1Close, Load::H2];

    fn name(self) -> &'static str {
        match self {
            Load::H1 => "h1",
            Load::H1Close => "h1_close",
            Load::H2 => "h2",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Load::H1 => "HTTP/1.1 keep-alive (wrk -t1 -c32)",
            Load::H1Close => {
                "HTTP/1.1 one connection per request (wrk -t1 -c32, Connection: close)"
            }
            Load::H2 => "HTTP/2 h2c (h2load -c8 -m16)",
        }
    }
}

/// What one load-generator run measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests the generator completed.
    done: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    m: Measured,
    /// Connections the node (router, HAProxy or nginx) opened to upstreams during the sample.
    upstream_opens: u64,
    /// CPU time of the proxy of the scenario (the agent process, HAProxy, or nginx's master and
    /// workers; none for `direct`) and of both servers during the sample, in nanoseconds.
    proxy_cpu_ns: u64,
    server_cpu_ns: u64,
    /// CPU time of the load generator (wrk or h2load), in nanoseconds.
    client_cpu_ns: u64,
    /// Share of the machine's CPU time that was busy during the sample (0 to 1).
    busy: f64,
}

// ---------------------------------------------------------------------------------------------
// The scene.

struct Scene<'c> {
    mc: &'c MiniCluster,
    client: Pod<'c>,
    base: Pod<'c>,
    fork: Pod<'c>,
    agent_pid: u32,
    haproxy_pid: u32,
    nginx_pid: u32,
    server_pids: Vec<u32>,
    log_seq: AtomicU32,
}

fn haproxy_cfg(base: &str, fork: &str) -> String {
    // req.hdr() yields each comma-separated member of every baggage header: the key is one
    // member `routing-key=feature-x`, optionally with `;properties` (W3C baggage).
    let acl = "acl fork req.hdr(baggage) -m reg '^ *routing-key *= *feature-x *(;.*)?$'";
    format!(
        "global
    nbthread 2
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend h1
    bind {ROUTER_IP4}:{HAPROXY_H1_PORT}
    {acl}
    use_backend fork_h1 if fork
    default_backend base_h1

backend fork_h1
    server fork {fork}

backend base_h1
    server base {base}

frontend h2
    bind {ROUTER_IP4}:{HAPROXY_H2_PORT} proto h2
    {acl}
    use_backend fork_h2 if fork
    default_backend base_h2

backend fork_h2
    server fork {fork} proto h2

backend base_h2
    server base {base} proto h2
"
    )
}

/// nginx's configuration: the same routing as [`haproxy_cfg`] with `map`, everything it
/// writes under `dir` (its prefix), in the foreground with one master and 2 workers.
fn nginx_cfg(dir: &str, base: &str, fork: &str) -> String {
    // One baggage member `routing-key=feature-x` (optionally `;properties`) anywhere in the
    // comma-separated list, as HAProxy's per-member match. nginx 1.22's `$http_baggage` is the
    // first baggage field only (the benchmark sends one).
    let member = r#""~(^|,) *routing-key *= *feature-x *(;[^,]*)?(,|$)""#;
    format!(
        "daemon off;
master_process on;
user root;
worker_processes 2;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 30s;
    keepalive_requests 1000000;

    map $http_baggage $upstream {{
        default base;
        {member} fork;
    }}

    upstream fork {{
        server {fork};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 30s;
    }}

    upstream base {{
        server {base};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 30s;
    }}

    server {{
        listen {ROUTER_IP4}:{NGINX_H1_PORT};
        listen {ROUTER_IP4}:{NGINX_H2_PORT} http2;
        location / {{
            proxy_pass http://$upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
"
    )
}

/// `$REDIRECT_BENCHSERVER_BIN`, else `benchserver` next to this program.
fn benchserver_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECT_BENCHSERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("own path")?;
    Ok(exe.with_file_name("benchserver"))
}

fn bench(args: Args) -> Result<()> {
    let o = options(args)?;
    redirect_tests::scene::stop::install()?;
    if !nix::unistd::geteuid().is_root() {
        println!(
            "bench router skipped: needs root (network namespaces, cgroups, eBPF); run it as \
             root, e.g. `sudo -E cargo xtask bench router`"
        );
        return Ok(());
    }
    let missing: Vec<&str> = TOOLS.iter().copied().filter(|t| !on_path(t)).collect();
    ensure!(
        missing.is_empty(),
        "{missing:?} not found: the benchmark needs wrk, h2load (nghttp2-client), haproxy, \
         nginx (nginx-light), curl and python3 (Debian: apt-get install wrk nghttp2-client \
         haproxy nginx-light curl python3)"
    );
    raise_fd_limit()?;
    let mc = match MiniCluster::new() {
        Ok(mc) => mc,
        Err(SetupError::Skip(why)) => {
            println!("bench router skipped: {why}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let id = mc.id().to_string();
    // Everything the scene holds (agent, servers, HAProxy, pods) is dropped inside `run`,
    // before `mc`.
    let result = run(&mc, &o);
    drop(mc);
    let left: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&id))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        eprintln!("bench_router: namespaces left behind: {left:?}");
    }
    let (samples, memory) = result?;
    report(&samples, &memory, &o)
}

/// Whether an executable `name` is on `$PATH` (`wrk` has no flag that exits 0).
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Samples per load pattern and scenario, indexed like `Load::ALL` and `Scenario::ALL`.
type Samples = [[Vec<Sample>; 5]; 3];

fn run(mc: &MiniCluster, o: &Options) -> Result<(Samples, Memory)> {
    let server = benchserver_bin()?;
    ensure!(
        server.exists(),
        "{} missing: build it (cargo build --release -p redirect-tests --bin benchserver) \
         or set REDIRECT_BENCHSERVER_BIN",
        server.display()
    );
    let agent_bin = redirect_tests::agent::agent_bin();
    let fork_labels = [("app", "checkout"), ("redirect.dev/sandbox", KEY)];
    let client = mc.pod_with_labels("client", &[("app", "client")])?;
    let base = mc.pod_with_labels(BASE, &[("app", "checkout")])?;
    let fork = mc.pod_with_labels(FORK, &fork_labels)?;
    // One connection per request at tens of thousands per second: room for the ephemeral
    // ports of the client and of the proxies' upstream connections, TIME_WAIT reused.
    widen_ports(|argv| client.run(argv, SHORT))?;
    widen_ports(|argv| mc.node().run(argv, SHORT))?;
    let mut procs: Vec<Proc> = Vec::new();
    let server = server.to_str().context("non-UTF-8 benchserver path")?;
    for pod in [&base, &fork] {
        let l4 = format!("{}:{SERVER_PORT}", pod.ip4());
        let l6 = format!("[{}]:{SERVER_PORT}", pod.ip6());
        let mut p = pod.spawn(&[
            server,
            "--name",
            pod.name(),
            "--listen",
            &l4,
            "--listen",
            &l6,
        ])?;
        p.wait_for_log("listening", READY)?;
        procs.push(p);
    }
    mc.service(
        "checkout",
        VIP4,
        VIP6,
        &[(SERVICE_PORT, SERVER_PORT)],
        &[&base],
    )?;
    let manifests = mc.workdir().join("manifests");
    mc.write_manifests(&manifests)?;
    fs::write(
        manifests.join("sandbox-feature-x.yaml"),
        redirect_tests::scene::sandbox_manifest(KEY, "Unavailable", &["checkout"]),
    )?;
    let agent = Agent::start(mc, &manifests)?;

    let cfg = mc.workdir().join("haproxy.cfg");
    fs::write(
        &cfg,
        haproxy_cfg(
            &format!("{VIP4}:{SERVICE_PORT}"),
            &format!("{}:{SERVER_PORT}", fork.ip4()),
        ),
    )?;
    let cfg = cfg.to_str().context("non-UTF-8 work dir")?;
    let check = mc.node().run(&["haproxy", "-c", "-f", cfg], SHORT)?;
    ensure!(
        check.success(),
        "haproxy rejects its configuration:\n{}{}",
        check.stdout,
        check.stderr
    );
    let server_pids = procs.iter().map(Proc::pid).collect();
    let mut haproxy = mc.node().spawn(&["haproxy", "-db", "-f", cfg])?;

    let prefix = mc.workdir().join("nginx");
    fs::create_dir(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    let prefix = prefix.to_str().context("non-UTF-8 work dir")?;
    let cfg = format!("{prefix}/nginx.conf");
    fs::write(
        &cfg,
        nginx_cfg(
            prefix,
            &format!("{VIP4}:{SERVICE_PORT}"),
            &format!("{}:{SERVER_PORT}", fork.ip4()),
        ),
    )?;
    // `-e stderr`: nginx opens its error log before reading the configuration.
    let nginx_argv = ["nginx", "-p", prefix, "-e", "stderr", "-c", &cfg];
    let check = mc
        .node()
        .run(&[&nginx_argv[..], &["-t", "-q"]].concat(), SHORT)?;
    ensure!(
        check.success(),
        "nginx rejects its configuration:\n{}{}",
        check.stdout,
        check.stderr
    );
    let mut nginx = mc.node().spawn(&nginx_argv)?;
    let scene = Scene {
        mc,
        client,
        base,
        fork,
        agent_pid: agent.pid().context("agent pid")?,
        haproxy_pid: haproxy.pid(),
        nginx_pid: nginx.pid(),
        server_pids,
        log_seq: AtomicU32::new(0),
    };
    // Killed when dropped: here on an error, else with `procs`.
    let waited = scene
        .wait_proxy(&mut haproxy, "haproxy", [HAPROXY_H1_PORT, HAPROXY_H2_PORT])
        .and_then(|()| scene.wait_proxy(&mut nginx, "nginx", [NGINX_H1_PORT, NGINX_H2_PORT]));
    procs.extend([haproxy, nginx]);
    waited?;
    println!(
        "mini-cluster {} ready: agent {} (router {}), HAProxy {}, nginx {}",
        mc.id(),
        agent_bin.display(),
        if agent_bin.components().any(|c| c.as_os_str() == "release") {
            "release build"
        } else {
            "NOT a release build: figures are not representative"
        },
        haproxy_version(mc),
        nginx_version(mc),
    );

    // Checks and warm-up: every scenario and pattern once, its route proven by curl.
    for &load in &o.loads {
        for sc in Scenario::ALL {
            stop_requested()?;
            let seen = scene.curl_served_by(load, sc)?;
            // The proxies' default route: an unkeyed request reaches the baseline.
            let unkeyed = match sc {
                Scenario::Haproxy | Scenario::Nginx => {
                    let base = scene.curl_check(load, sc, false, BASE)?;
                    format!(", unkeyed {base}")
                }
                _ => String::new(),
            };
            let s = scene
                .sample(load, sc, o.warmup)
                .with_context(|| format!("warm-up {} {}", load.name(), sc.name()))?;
            println!(
                "warm-up {:<8} {:<15} {:>9.0} req/s  curl: x-served-by {seen}{unkeyed} (checked)",
                load.name(),
                sc.name(),
                s.m.rps
            );
        }
    }

    let mut samples: Samples = Default::default();
    let started = Instant::now();
    for round in 0..o.rounds {
        for (li, load) in Load::ALL.into_iter().enumerate() {
            if !o.loads.contains(&load) {
                continue;
            }
            let mut line = format!("round {}/{} {:<8}", round + 1, o.rounds, load.name());
            for i in 0..Scenario::ALL.len() {
                let si = (i + round) % Scenario::ALL.len();
                let sc = Scenario::ALL[si];
                stop_requested()?;
                let s = scene.sample(load, sc, o.seconds).with_context(|| {
                    format!("round {} {} {}", round + 1, load.name(), sc.name())
                })?;
                let _ = write!(line, " {} {:.0}", sc.name(), s.m.rps);
                samples[li][si].push(s);
            }
            println!("{line}");
        }
    }
    println!("measured in {:.0} s", started.elapsed().as_secs_f64());
    stop_requested()?;
    let memory = scene.memory().context("memory figures")?;
    let agent_log = agent.log();
    if agent_log.contains("panicked") {
        eprintln!("bench_router: the agent panicked:\n{agent_log}");
    }
    drop(scene);
    drop(procs);
    drop(agent);
    Ok((samples, memory))
}

fn stop_requested() -> Result<()> {
    if redirect_tests::scene::stop::requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// Widens the ephemeral port range and lets connects reuse TIME_WAIT ports, in the netns
/// `argv` runs in.
fn widen_ports(run: impl Fn(&[&str]) -> Result<redirect_tests::RunOutput>) -> Result<()> {
    let script = "echo '1024 65000' > /proc/sys/net/ipv4/ip_local_port_range && \
                  echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse";
    run(&["sh", "-c", script])?
        .check()
        .map(drop)
        .context("widening the ephemeral port range")
}

/// `1.22.1` from `nginx -v` (`nginx version: nginx/1.22.1`, on stderr).
fn nginx_version(mc: &MiniCluster) -> String {
    mc.node()
        .run(&["nginx", "-v"], SHORT)
        .ok()
        .and_then(|o| {
            let text = format!("{}{}", o.stdout, o.stderr);
            let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
            Some(v.to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn haproxy_version(mc: &MiniCluster) -> String {
    mc.node()
        .run(&["haproxy", "-v"], SHORT)
        .ok()
        .and_then(|o| {
            o.stdout
                .split_whitespace()
                .nth(2)
                .map(|v| v.split(['-', '+']).next().unwrap_or(v).to_string())
        })
        .unwrap_or_else(|| "?".into())
}

impl Scene<'_> {
    fn url(&self, load: Load, sc: Scenario) -> String {
        match sc {
            Scenario::Direct => format!("http://{}:{SERVER_PORT}/", self.fork.ip4()),
            Scenario::RouterBaseline | Scenario::RouterFork => format!("http://{VIP4}/"),
            Scenario::Haproxy | Scenario::Nginx => {
                let (h1, h2) = if sc == Scenario::Haproxy {
                    (HAPROXY_H1_PORT, HAPROXY_H2_PORT)
                } else {
                    (NGINX_H1_PORT, NGINX_H2_PORT)
                };
                let port = if load == Load::H2 { h2 } else { h1 };
                format!("http://{ROUTER_IP4}:{port}/")
            }
        }
    }

    /// Waits until a proxy in the node answers on its HTTP/1.1 and its h2c port.
    fn wait_proxy(&self, proxy: &mut Proc, name: &str, [h1, h2]: [u16; 2]) -> Result<()> {
        let deadline = Instant::now() + READY;
        for (port, h2) in [(h1, false), (h2, true)] {
            let url = format!("http://{ROUTER_IP4}:{port}/");
            let mut argv = vec!["curl", "-sf", "--max-time", "2", "-o", "/dev/null", &url];
            if h2 {
                argv.push("--http2-prior-knowledge");
            }
            loop {
                if let Some(status) = proxy.try_status()? {
                    bail!("{name} exited ({status}):\n{}", proxy.log());
                }
                if self.mc.node().run(&argv, SHORT)?.success() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} does not answer on {url}:\n{}", proxy.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// One curl from the client pod with the scenario's headers and protocol: the
    /// `x-served-by` it saw, which must be the scenario's server.
    fn curl_served_by(&self, load: Load, sc: Scenario) -> Result<String> {
        self.curl_check(load, sc, sc.key(), sc.served_by())
    }

    /// The same with the key sent or not, expecting `want` to answer: a proxy in the node
    /// must send unkeyed requests to the baseline.
    fn curl_check(&self, load: Load, sc: Scenario, key: bool, want: &str) -> Result<String> {
        let url = self.url(load, sc);
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-D",
            "-",
        ];
        if key {
            argv.extend(["-H", KEY_HEADER]);
        }
        match load {
            Load::H1 => argv.push("--http1.1"),
            Load::H1Close => argv.extend(["--http1.1", "-H", "Connection: close"]),
            Load::H2 => argv.push("--http2-prior-knowledge"),
        }
        argv.push(&url);
        let head = self
            .client
            .run(&argv, SHORT)?
            .check()
            .with_context(|| format!("curl {}", argv.join(" ")))?;
        let status = head.lines().next().unwrap_or("");
        let want_version = if load == Load::H2 {
            "HTTP/2 "
        } else {
            "HTTP/1.1 "
        };
        ensure!(
            status.starts_with(&format!("{want_version}200")),
            "{} {}: expected {want_version}200, got {status:?}",
            load.name(),
            sc.name()
        );
        let seen = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-served-by")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        ensure!(
            seen == want,
            "{} {}: served by {seen:?}, expected {}:\n{head}",
            load.name(),
            sc.name(),
            want
        );
        Ok(seen)
    }

    /// Requests served so far by (base, fork), read from the node (outside the attached
    /// cgroup root, so never redirected).
    fn served(&self) -> Result<(u64, u64)> {
        Ok((
            self.server_count(&self.base, "stats")?,
            self.server_count(&self.fork, "stats")?,
        ))
    }

    /// A count benchserver in `pod` answers at `/<path>`, read from the node.
    fn server_count(&self, pod: &Pod<'_>, path: &str) -> Result<u64> {
        let url = format!("http://{}:{SERVER_PORT}/{path}", pod.ip4());
        let out = self
            .mc
            .node()
            .run(&["curl", "-sS", "--max-time", "5", &url], SHORT)?
            .check()
            .with_context(|| format!("GET {url}"))?;
        out.trim()
            .parse()
            .with_context(|| format!("GET {url}: {out:?}"))
    }

    /// Checks that exactly `n` requests reached checkout-fork and none checkout-base since the
    /// counts `before` (from [`Scene::served`]).
    fn all_served_by_fork(&self, before: (u64, u64), n: u64) -> Result<()> {
        let (base0, fork0) = before;
        let (base1, fork1) = self.served()?;
        ensure!(
            base1 == base0 && fork1 - fork0 == n,
            "{n} requests: {FORK} served {}, {BASE} {}",
            fork1 - fork0,
            base1 - base0
        );
        Ok(())
    }

    /// The node netns's `Tcp: ActiveOpens`: connections the router and the proxies opened.
    fn node_active_opens(&self) -> Result<u64> {
        let snmp = self
            .mc
            .node()
            .run(&["cat", "/proc/net/snmp"], SHORT)?
            .check()?;
        active_opens(&snmp)
    }

    /// One load-generator run of `seconds`, checked.
    fn sample(&self, load: Load, sc: Scenario, seconds: f64) -> Result<Sample> {
        let proxy = match sc {
            Scenario::Direct => None,
            Scenario::RouterBaseline | Scenario::RouterFork => Some(self.agent_pid),
            Scenario::Haproxy => Some(self.haproxy_pid),
            Scenario::Nginx => Some(self.nginx_pid),
        };
        let servers_cpu = || -> Result<u64> { self.server_pids.iter().map(|p| cpu_ns(*p)).sum() };
        // Every process of the proxy: nginx's workers are children of its master.
        let proxy_cpu = || proxy.map_or(Ok(0), tree_cpu_ns);
        let (base0, fork0) = self.served()?;
        let opens0 = self.node_active_opens()?;
        let (proxy0, servers0, machine0) = (proxy_cpu()?, servers_cpu()?, machine_cpu()?);
        let client0 = children_cpu_ns();
        let m = self.load(load, sc, seconds)?;
        let client1 = children_cpu_ns();
        let (proxy1, servers1, machine1) = (proxy_cpu()?, servers_cpu()?, machine_cpu()?);
        let opens1 = self.node_active_opens()?;
        let (base1, fork1) = self.served()?;
        let (intended, other) = if sc.served_by() == BASE {
            (base1 - base0, fork1 - fork0)
        } else {
            (fork1 - fork0, base1 - base0)
        };
        ensure!(
            other == 0 && intended >= m.done,
            "{} completed {} requests, but {} served {intended} and the other server {other}",
            load.name(),
            m.done,
            sc.served_by()
        );
        let upstream_opens = opens1 - opens0;
        ensure!(
            sc != Scenario::Direct || upstream_opens == 0,
            "direct requests went through the node: it opened {upstream_opens} connections"
        );
        let (busy, total) = (machine1.0 - machine0.0, machine1.1 - machine0.1);
        Ok(Sample {
            m,
            upstream_opens,
            proxy_cpu_ns: proxy1 - proxy0,
            server_cpu_ns: servers1 - servers0,
            client_cpu_ns: client1 - client0,
            busy: if total > 0 {
                busy as f64 / total as f64
            } else {
                0.0
            },
        })
    }

    fn load(&self, load: Load, sc: Scenario, seconds: f64) -> Result<Measured> {
        let url = self.url(load, sc);
        let secs = format!("{seconds}");
        let timeout = Duration::from_secs_f64(seconds) + LOAD_SLACK;
        let mut argv: Vec<String> = match load {
            Load::H1 | Load::H1Close => ["wrk", "-t1", "-c32", "--latency", "-d"]
                .map(String::from)
                .into(),
            Load::H2 => ["h2load", "-c8", "-m16", "-D"].map(String::from).into(),
        };
        argv.push(secs);
        if sc.key() {
            argv.extend(["-H".into(), KEY_HEADER.into()]);
        }
        if load == Load::H1Close {
            argv.extend(["-H".into(), "Connection: close".into()]);
        }
        let log = self.mc.workdir().join(format!(
            "h2load-{}.tsv",
            self.log_seq.fetch_add(1, Ordering::Relaxed)
        ));
        if load == Load::H2 {
            argv.push(format!("--log-file={}", log.display()));
        }
        argv.push(url);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.client.run(&argv, timeout)?;
        let text = format!("{}{}", out.stdout, out.stderr);
        ensure!(
            out.success(),
            "{} failed ({}):\n{text}",
            argv[0],
            out.status
        );
        let measured = match load {
            Load::H1 | Load::H1Close => parse_wrk(&text),
            Load::H2 => {
                let tsv = fs::read_to_string(&log).with_context(|| format!("{}", log.display()));
                let _ = fs::remove_file(&log);
                parse_h2load(&text, &tsv?)
            }
        };
        measured.with_context(|| format!("{}:\n{text}", argv.join(" ")))
    }
}

/// Time on CPU of every thread of process `pid` so far, in nanoseconds (the first field of
/// `/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&dir).with_context(|| dir.clone())?.flatten() {
        // A thread that just exited: its time is gone with it.
        let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse::<u64>()
            .context("schedstat")?;
    }
    Ok(total)
}

/// `pid` and every process below it, from `/proc/<pid>/task/*/children`, recursively
/// (bounded: at most `MAX_TREE` processes).
fn process_tree(pid: u32) -> Vec<u32> {
    const MAX_TREE: usize = 4096;
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() && tree.len() < MAX_TREE {
        let p = tree[next];
        next += 1;
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                tree.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    tree.truncate(MAX_TREE);
    tree
}

/// [`cpu_ns`] of `pid` and of every process below it (a process that exits takes its time
/// with it: nginx's workers live as long as the master).
fn tree_cpu_ns(pid: u32) -> Result<u64> {
    let mut total = cpu_ns(pid)?;
    for child in process_tree(pid).into_iter().skip(1) {
        total += cpu_ns(child).unwrap_or(0);
    }
    Ok(total)
}

/// Resident memory of process `pid` (`VmRSS` in `/proc/<pid>/status`), in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| path.clone())?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .with_context(|| format!("no VmRSS in {path}"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("VmRSS in {path}"))?;
    Ok(kib * 1024)
}

/// [`rss_bytes`] summed over `pid` and every process below it (pages shared between them,
/// like nginx's code, count once per process; a difference of two sums cancels them).
fn tree_rss_bytes(pid: u32) -> Result<u64> {
    let mut total = rss_bytes(pid)?;
    for child in process_tree(pid).into_iter().skip(1) {
        total += rss_bytes(child).unwrap_or(0);
    }
    Ok(total)
}

/// User and system CPU time of every child this process has waited for, in nanoseconds:
/// around one `run` it is the CPU time of that program (the load generator).
fn children_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// (busy, total) jiffies of all CPUs from `/proc/stat`; idle and iowait count as idle.
fn machine_cpu() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat cpu line")?;
    ensure!(v.len() >= 5, "short cpu line in /proc/stat");
    let total: u64 = v.iter().sum();
    Ok((total - v[3] - v[4], total))
}

// ---------------------------------------------------------------------------------------------
// Memory.

/// Holds `N` idle HTTP/1.1 keep-alive connections to `HOST:PORT`, each after one `GET /` with
/// `HEADER` answered `200` by `SERVED_BY`, made one after the other; prints `ready N`, then on
/// SIGUSR1 checks that every connection is still open, prints `open K` and exits (at most
/// `HOLD` seconds after `ready`).
const IDLE_H1_SCRIPT: &str = r#"
import resource, signal, socket, sys, time
host, port, n, header, served_by, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
released = []
signal.signal(signal.SIGUSR1, lambda *_: released.append(1))
req = ("GET / HTTP/1.1\r\nHost: %s\r\n%s\r\n\r\n" % (host, header)).encode()
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection %d: closed before a response" % i)
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    if not lines[0].startswith("HTTP/1.1 200"):
        sys.exit("connection %d: %r" % (i, lines[0]))
    if fields.get("x-served-by") != served_by:
        sys.exit("connection %d: served by %r" % (i, fields.get("x-served-by")))
    if "close" in fields.get("connection", "").lower():
        sys.exit("connection %d: the proxy closes it" % i)
    length = int(fields.get("content-length", "-1"))
    if length < 0:
        sys.exit("connection %d: no content-length" % i)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection %d: closed in the body" % i)
        body += chunk
    conns.append(s)
print("ready %d" % len(conns), flush=True)
deadline = time.monotonic() + hold
while not released and time.monotonic() < deadline:
    time.sleep(0.02)
if not released:
    sys.exit("not released within %.0f s" % hold)
still = 0
for s in conns:
    s.setblocking(False)
    try:
        still += s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        still += 1
    except OSError:
        pass
print("open %d" % still, flush=True)
"#;

/// RSS growth per idle HTTP/1.1 connection and per HTTP/2 stream in flight, in bytes, per
/// proxy (`router`, `haproxy`, `nginx`).
#[derive(Debug, Default)]
struct Memory {
    idle_h1: Vec<(&'static str, f64)>,
    h2_stream: Vec<(&'static str, f64)>,
}

impl Memory {
    fn idle_h1(&self, proxy: &str) -> Option<f64> {
        self.idle_h1.iter().find(|(p, _)| *p == proxy).map(|e| e.1)
    }

    fn h2_stream(&self, proxy: &str) -> Option<f64> {
        self.h2_stream
            .iter()
            .find(|(p, _)| *p == proxy)
            .map(|e| e.1)
    }
}

/// Raises this process's soft limit of open files towards its hard limit (the proxies and the
/// client programs inherit it): the memory figures hold `IDLE_H1_CONNS` connections at once.
fn raise_fd_limit() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    let want = (IDLE_H1_CONNS * 4 + 1024).min(lim.rlim_max);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        ensure!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    ensure!(
        lim.rlim_cur >= IDLE_H1_CONNS + 256,
        "the open-file limit ({}) is too low to hold {IDLE_H1_CONNS} connections",
        lim.rlim_cur
    );
    Ok(())
}

impl Scene<'_> {
    /// The memory figures, after the throughput rounds: each proxy's RSS (all its processes)
    /// before and with `IDLE_H1_CONNS` idle HTTP/1.1 keep-alive connections from the client,
    /// and before and with `H2_CONNS` x `H2_STREAMS` HTTP/2 streams in flight, per connection
    /// or stream.
    fn memory(&self) -> Result<Memory> {
        let proxies = [
            (
                "router",
                self.agent_pid,
                VIP4.to_string(),
                SERVICE_PORT,
                SERVICE_PORT,
            ),
            (
                "haproxy",
                self.haproxy_pid,
                ROUTER_IP4.to_string(),
                HAPROXY_H1_PORT,
                HAPROXY_H2_PORT,
            ),
            (
                "nginx",
                self.nginx_pid,
                ROUTER_IP4.to_string(),
                NGINX_H1_PORT,
                NGINX_H2_PORT,
            ),
        ];
        let mut memory = Memory::default();
        for (name, pid, host, h1, _) in &proxies {
            stop_requested()?;
            let per = self
                .rss_per_idle_h1_conn(*pid, host, *h1)
                .with_context(|| format!("{name}: idle HTTP/1.1 connections"))?;
            println!(
                "memory {name:<8} {IDLE_H1_CONNS} idle HTTP/1.1 connections: {:.0} bytes of RSS each",
                per
            );
            memory.idle_h1.push((name, per));
        }
        for (name, pid, host, _, h2) in &proxies {
            stop_requested()?;
            let per = self
                .rss_per_h2_stream(*pid, host, *h2)
                .with_context(|| format!("{name}: HTTP/2 streams in flight"))?;
            println!(
                "memory {name:<8} {} HTTP/2 streams in flight ({H2_CONNS} connections): {:.0} \
                 bytes of RSS each",
                H2_CONNS * H2_STREAMS,
                per
            );
            memory.h2_stream.push((name, per));
        }
        Ok(memory)
    }

    /// RSS growth of the proxy `pid` (and its children) per idle keep-alive connection the
    /// client holds to `host:port`, each after one keyed request that checkout-fork answered.
    fn rss_per_idle_h1_conn(&self, pid: u32, host: &str, port: u16) -> Result<f64> {
        let (base0, fork0) = self.served()?;
        let before = tree_rss_bytes(pid)?;
        let hold = READY + LOAD_SLACK;
        let mut holder = self.client.spawn(&[
            "python3",
            "-c",
            IDLE_H1_SCRIPT,
            host,
            &port.to_string(),
            &IDLE_H1_CONNS.to_string(),
            KEY_HEADER,
            FORK,
            &hold.as_secs().to_string(),
        ])?;
        // Sequential requests: about a millisecond each through a proxy.
        holder.wait_for_log("ready", Duration::from_secs(60))?;
        std::thread::sleep(SETTLE);
        let with = tree_rss_bytes(pid)?;
        holder.signal(Signal::SIGUSR1)?;
        let status = holder
            .wait_timeout(SHORT)?
            .with_context(|| format!("the connection holder did not exit:\n{}", holder.log()))?;
        let log = holder.log();
        ensure!(
            status.success(),
            "the connection holder failed ({status}):\n{log}"
        );
        ensure!(
            log.contains(&format!("open {IDLE_H1_CONNS}\n")),
            "the proxy closed idle connections before the RSS was read:\n{log}"
        );
        self.all_served_by_fork((base0, fork0), IDLE_H1_CONNS)?;
        Ok((with as f64 - before as f64) / IDLE_H1_CONNS as f64)
    }

    /// RSS growth of the proxy `pid` (and its children) per HTTP/2 stream in flight: h2load
    /// sends `H2_CONNS` x `H2_STREAMS` keyed `GET /delay` at once to `host:port` (h2c), which
    /// checkout-fork holds for `H2_DELAY`; the RSS is read once the server holds them all.
    fn rss_per_h2_stream(&self, pid: u32, host: &str, port: u16) -> Result<f64> {
        let streams = H2_CONNS * H2_STREAMS;
        let (base0, fork0) = self.served()?;
        ensure!(
            self.in_flight()? == 0,
            "{FORK} still holds delayed requests"
        );
        let before = tree_rss_bytes(pid)?;
        let url = format!("http://{host}:{port}/delay?ms={}", H2_DELAY.as_millis());
        let mut load = self.client.spawn(&[
            "h2load",
            &format!("-c{H2_CONNS}"),
            &format!("-m{H2_STREAMS}"),
            &format!("-n{streams}"),
            "-H",
            KEY_HEADER,
            &url,
        ])?;
        // Leave a margin before the server answers the first of them.
        let deadline = Instant::now() + H2_DELAY.saturating_sub(Duration::from_secs(2));
        loop {
            let held = self.in_flight()?;
            if held >= streams {
                break;
            }
            if let Some(status) = load.try_status()? {
                bail!(
                    "h2load exited ({status}) with {held} of {streams} streams at the server:\n{}",
                    load.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "only {held} of {streams} streams reached {FORK} within {:?}",
                H2_DELAY.saturating_sub(Duration::from_secs(2))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(SETTLE);
        let with = tree_rss_bytes(pid)?;
        let status = load
            .wait_timeout(H2_DELAY + LOAD_SLACK)?
            .with_context(|| format!("h2load did not finish:\n{}", load.log()))?;
        let text = load.log();
        ensure!(status.success(), "h2load failed ({status}):\n{text}");
        let (_, done) = parse_h2load_summary(&text).with_context(|| text.clone())?;
        ensure!(
            done == streams,
            "{done} of {streams} streams succeeded:\n{text}"
        );
        self.all_served_by_fork((base0, fork0), streams)?;
        Ok((with as f64 - before as f64) / streams as f64)
    }

    /// `/delay` requests checkout-fork holds now, read from the node.
    fn in_flight(&self) -> Result<u64> {
        self.server_count(&self.fork, "inflight")
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing the load generators.

fn active_opens(snmp: &str) -> Result<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        bail!("no Tcp lines in /proc/net/snmp")
    };
    let i = names
        .split_whitespace()
        .position(|n| n == "ActiveOpens")
        .context("no Tcp ActiveOpens")?;
    values
        .split_whitespace()
        .nth(i)
        .context("short Tcp line")?
        .parse()
        .context("Tcp ActiveOpens")
}

/// `476.00us`, `1.21ms`, `2.00s`, `1.5m` in milliseconds.
fn wrk_duration_ms(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {s:?}"))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => bail!("unit of {s:?}"),
    })
}

fn parse_wrk(text: &str) -> Result<Measured> {
    let (mut rps, mut p50, mut p99, mut done) = (None, None, None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = Some(v.parse::<f64>()?),
            ["50%", v] => p50 = Some(wrk_duration_ms(v)?),
            ["99%", v] => p99 = Some(wrk_duration_ms(v)?),
            [n, "requests", "in", ..] => done = Some(n.parse::<u64>()?),
            ["Non-2xx", "or", "3xx", "responses:", n] => bail!("{n} non-2xx/3xx responses"),
            ["Socket", "errors:", ..] => bail!("{line}"),
            _ => {}
        }
    }
    let (Some(rps), Some(p50), Some(p99), Some(done)) = (rps, p50, p99, done) else {
        bail!("no Requests/sec, latency distribution or request count in wrk's output")
    };
    ensure!(done > 0, "no request completed");
    Ok(Measured {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        done,
    })
}

/// h2load's summary and its per-request log (`start_us\tstatus\tduration_us`).
fn parse_h2load(text: &str, tsv: &str) -> Result<Measured> {
    let (rps, done) = parse_h2load_summary(text)?;
    let mut durations: Vec<f64> = Vec::new();
    for line in tsv.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        ensure!(cols.len() >= 3, "log line {line:?}");
        ensure!(
            cols[1] == "200",
            "a response with status {} in the log",
            cols[1]
        );
        durations.push(cols[2].trim().parse::<f64>()? / 1000.0);
    }
    ensure!(!durations.is_empty(), "empty h2load log");
    durations.sort_by(f64::total_cmp);
    Ok(Measured {
        rps,
        p50_ms: percentile(&durations, 0.50),
        p99_ms: percentile(&durations, 0.99),
        done,
    })
}

/// Checks h2load's summary (no failed, errored or timed-out request, only 2xx): its req/s and
/// the requests that succeeded.
fn parse_h2load_summary(text: &str) -> Result<(f64, u64)> {
    let mut rps = None;
    let mut succeeded = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 3.00s, 41234.50 req/s, 1.23MB/s
            rps = rest
                .split(", ")
                .find_map(|p| p.strip_suffix(" req/s"))
                .map(str::parse::<f64>)
                .transpose()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: N total, N started, N done, N succeeded, 0 failed, 0 errored, 0 timeout
            for part in rest.split(", ") {
                let (n, what) = part.split_once(' ').context("requests line")?;
                let n: u64 = n.parse()?;
                match what {
                    "succeeded" => succeeded = Some(n),
                    "failed" | "errored" | "timeout" if n > 0 => bail!("{n} requests {what}"),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: N 2xx, 0 3xx, 0 4xx, 0 5xx
            for part in rest.split(", ") {
                let (n, class) = part.split_once(' ').context("status codes line")?;
                if class != "2xx" && n != "0" {
                    bail!("{n} {class} responses");
                }
            }
        }
    }
    let (Some(rps), Some(done)) = (rps, succeeded) else {
        bail!("no req/s or succeeded count in h2load's output")
    };
    ensure!(done > 0, "no request succeeded");
    Ok((rps, done))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Report.

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Medians over the rounds of one scenario under one load.
#[derive(Debug, Clone, Copy)]
struct Medians {
    rps: f64,
    rps_min: f64,
    rps_max: f64,
    p50: f64,
    p99: f64,
    /// Upstream connections the node opened per request.
    opens_per_req: f64,
    /// CPU time per request of the proxy and of the server, in microseconds.
    proxy_us: f64,
    server_us: f64,
    client_us: f64,
    busy: f64,
}

fn medians(samples: &[Sample]) -> Medians {
    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let rps = col(|s| s.m.rps);
    Medians {
        rps: median(&rps),
        rps_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
        rps_max: rps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        p50: median(&col(|s| s.m.p50_ms)),
        p99: median(&col(|s| s.m.p99_ms)),
        opens_per_req: median(&col(|s| s.upstream_opens as f64 / s.m.done as f64)),
        proxy_us: median(&col(|s| s.proxy_cpu_ns as f64 / 1e3 / s.m.done as f64)),
        server_us: median(&col(|s| s.server_cpu_ns as f64 / 1e3 / s.m.done as f64)),
        client_us: median(&col(|s| s.client_cpu_ns as f64 / 1e3 / s.m.done as f64)),
        busy: median(&col(|s| s.busy)),
    }
}

fn report(samples: &Samples, memory: &Memory, o: &Options) -> Result<()> {
    let mut json: Vec<(String, f64, &str)> = Vec::new();
    println!();
    println!(
        "HTTP through the router: medians of {} rounds x {} s per scenario, interleaved",
        o.rounds, o.seconds
    );
    println!(
        "xdir, p99xd: req/s and p99 over direct's. upconn/r: upstream connections the node \
         opened per request.\nCPU us/req: CPU time per request of the load generator, the \
         proxy (router, HAProxy or nginx: all its processes) and the server, and their sum.\nbusy: the machine's CPU \
         busy (other work on the machine included)."
    );
    for (li, load) in Load::ALL.into_iter().enumerate() {
        if !o.loads.contains(&load) {
            continue;
        }
        let m: Vec<Medians> = samples[li].iter().map(|s| medians(s)).collect();
        let direct = m[0];
        println!();
        println!("{} [{}]", load.title(), load.name());
        println!(
            "{:<15} {:>7} {:>13} {:>5} {:>6} {:>6} {:>5} {:>8} {:-^27}",
            "", "", "", "", "", "", "", "", " CPU us/req "
        );
        println!(
            "{:<15} {:>7} {:>13} {:>5} {:>6} {:>6} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>4}",
            "scenario",
            "req/s",
            "min-max",
            "xdir",
            "p50 ms",
            "p99 ms",
            "p99xd",
            "upconn/r",
            "client",
            "proxy",
            "server",
            "sum",
            "busy"
        );
        for (sc, m) in Scenario::ALL.iter().zip(&m) {
            println!(
                "{:<15} {:>7.0} {:>13} {:>5.2} {:>6.2} {:>6.2} {:>5.2} {:>8.3} {:>6.1} \
                 {:>6.1} {:>6.1} {:>6.1} {:>3.0}%",
                sc.name(),
                m.rps,
                format!("{:.0}-{:.0}", m.rps_min, m.rps_max),
                m.rps / direct.rps,
                m.p50,
                m.p99,
                m.p99 / direct.p99,
                m.opens_per_req,
                m.client_us,
                m.proxy_us,
                m.server_us,
                m.client_us + m.proxy_us + m.server_us,
                m.busy * 100.0,
            );
            let p = format!("{}_{}", load.name(), sc.name());
            json.push((format!("{p}_rps"), m.rps, "req/s"));
            json.push((format!("{p}_p50"), m.p50, "ms"));
            json.push((format!("{p}_p99"), m.p99, "ms"));
            if *sc != Scenario::Direct {
                json.push((format!("{p}_over_direct"), m.rps / direct.rps, "ratio"));
                json.push((
                    format!("{p}_p99_over_direct_p99"),
                    m.p99 / direct.p99,
                    "ratio",
                ));
                json.push((
                    format!("{p}_upstream_opens_over_requests"),
                    m.opens_per_req,
                    "ratio",
                ));
                json.push((format!("{p}_proxy_cpu_per_request"), m.proxy_us, "us"));
                json.push((
                    format!("{p}_chain_cpu_over_direct"),
                    (m.client_us + m.proxy_us + m.server_us)
                        / (direct.client_us + direct.server_us),
                    "ratio",
                ));
            }
        }
        let (fork, haproxy) = (m[2], m[3]);
        let tput = fork.rps / haproxy.rps;
        let p99 = fork.p99 / haproxy.p99;
        let cpu = fork.proxy_us / haproxy.proxy_us;
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "router_fork vs haproxy: req/s x{tput:.2} (goal >= 1.5: {}), p99 x{p99:.2} \
             (goal <= 1: {}); proxy CPU per request x{cpu:.2}; direct is x{:.2} of haproxy's \
             req/s (what a free proxy would reach)",
            verdict(tput >= 1.5),
            verdict(p99 <= 1.0),
            direct.rps / haproxy.rps,
        );
        let p = load.name();
        json.push((format!("{p}_router_fork_over_haproxy"), tput, "ratio"));
        json.push((
            format!("{p}_router_fork_p99_over_haproxy_p99"),
            p99,
            "ratio",
        ));
        json.push((
            format!("{p}_router_fork_proxy_cpu_over_haproxy_proxy_cpu"),
            cpu,
            "ratio",
        ));
        json.push((
            format!("{p}_direct_over_haproxy"),
            direct.rps / haproxy.rps,
            "ratio",
        ));
        let nginx = m[4];
        let (tput, p99, cpu) = (
            fork.rps / nginx.rps,
            fork.p99 / nginx.p99,
            fork.proxy_us / nginx.proxy_us,
        );
        println!(
            "router_fork vs nginx: req/s x{tput:.2}, p99 x{p99:.2}; proxy CPU per request \
             x{cpu:.2}"
        );
        json.push((format!("{p}_router_fork_over_nginx"), tput, "ratio"));
        json.push((format!("{p}_router_fork_p99_over_nginx_p99"), p99, "ratio"));
        json.push((
            format!("{p}_router_fork_proxy_cpu_over_nginx_proxy_cpu"),
            cpu,
            "ratio",
        ));
    }
    report_memory(memory, &mut json);
    if let Some(path) = &o.json {
        write_json(path, &json)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

fn report_memory(memory: &Memory, json: &mut Vec<(String, f64, &str)>) {
    println!();
    println!(
        "Memory: RSS growth of the proxy (all its processes), per idle HTTP/1.1 keep-alive \
         connection ({IDLE_H1_CONNS}, one request each) and per HTTP/2 stream in flight \
         ({H2_CONNS} connections x {H2_STREAMS} streams)"
    );
    println!(
        "{:<8} {:>16} {:>16}",
        "proxy", "idle h1 conn B", "h2 stream B"
    );
    for (name, h1) in &memory.idle_h1 {
        let h2 = memory.h2_stream(name).unwrap_or(f64::NAN);
        println!("{name:<8} {h1:>16.0} {h2:>16.0}");
    }
    for (name, v) in &memory.idle_h1 {
        json.push((format!("{name}_rss_per_idle_h1_conn_bytes"), *v, "bytes"));
    }
    for (name, v) in &memory.h2_stream {
        json.push((format!("{name}_rss_per_h2_stream_bytes"), *v, "bytes"));
    }
    let mut ratios = Vec::new();
    for peer in ["haproxy", "nginx"] {
        ratios.push((
            format!("router_rss_per_idle_h1_conn_over_{peer}"),
            peer,
            memory.idle_h1("router"),
            memory.idle_h1(peer),
        ));
    }
    // nginx forwards each stream on an HTTP/1.1 connection of its own: no ratio to it.
    ratios.push((
        "router_rss_per_h2_stream_over_haproxy".into(),
        "haproxy",
        memory.h2_stream("router"),
        memory.h2_stream("haproxy"),
    ));
    for (name, peer, router, other) in ratios {
        let (Some(router), Some(other)) = (router, other) else {
            continue;
        };
        // A peer whose RSS did not grow (it reused memory it already had) gives no ratio.
        if other > 0.0 {
            println!("{name}: x{:.2}", router / other);
            json.push((name, router / other, "ratio"));
        } else {
            println!("{name}: none ({peer}'s RSS did not grow)");
        }
    }
}

/// `[{"name": …, "value": …, "unit": …}, …]`, one entry a line.
fn write_json(path: &Path, entries: &[(String, f64, &str)]) -> Result<()> {
    let mut lines = Vec::new();
    for (name, value, unit) in entries {
        let scale = match *unit {
            "ratio" => 1e4,
            "ms" | "us" => 1e3,
            _ => 10.0,
        };
        // Rounded; a non-finite value (a zero latency divided by) becomes null.
        let value = serde_json::Value::from((value * scale).round() / scale);
        lines.push(format!(
            "  {{\"name\": {}, \"value\": {value}, \"unit\": {}}}",
            serde_json::Value::from(name.as_str()),
            serde_json::Value::from(*unit),
        ));
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, format!("[\n{}\n]\n", lines.join(",\n")))
        .with_context(|| format!("writing {}", path.display()))
}
