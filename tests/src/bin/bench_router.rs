//! The HTTP benchmark of the node router behind `cargo xtask bench router` (see
//! `docs/benchmarks.md`): what the router costs a request next to a direct connection, and how
//! it compares with HAProxy doing the same header routing.
//!
//! `bench_router [--rounds N] [--seconds S] [--warmup S] [--json PATH] [--loads h1,h1_close,h2]`
//!
//! Defaults: 3 rounds, 3 s samples, 1 s warm-up per scenario, every load pattern. Needs root
//! (prints why and exits 0 without), wrk, h2load, haproxy and curl. The agent is
//! `$REDIRECT_AGENT_BIN` (`cargo xtask bench router` passes a release build), the server
//! `$REDIRECT_BENCHSERVER_BIN` or `benchserver` next to this program.
//!
//! Builds a mini-cluster (pods `client`, `checkout-base`, `checkout-fork`; Service `checkout`
//! `10.200.2.40:80 → 8080`; Sandbox `feature-x` forking checkout), starts the agent (its
//! router) and `benchserver` (HTTP/1.1 and h2c) in both checkout pods, and HAProxy in the
//! node. Then, for three load patterns, measures four scenarios, interleaved within each round
//! (the order rotates from round to round), and prints the medians over the rounds:
//!
//! | scenario          | the client pod sends to                | key | served by       |
//! |-------------------|----------------------------------------|-----|-----------------|
//! | `direct`          | checkout-fork's `ip:8080`              | yes | checkout-fork   |
//! | `router_baseline` | ClusterIP `:80` (kernel → router)      | no  | checkout-base   |
//! | `router_fork`     | ClusterIP `:80` (kernel → router)      | yes | checkout-fork   |
//! | `haproxy`         | HAProxy in the node, `10.200.0.1:1808x`| yes | checkout-fork   |
//!
//! The key is `baggage: routing-key=feature-x`; `direct` sends it too (ignored), so every
//! scenario sends the same request. Load patterns, all run inside the client pod:
//! `h1` (`wrk -t1 -c32 --latency`, HTTP/1.1 keep-alive), `h1_close` (the same with
//! `Connection: close`: one connection per request) and `h2` (`h2load -c8 -m16`, h2c with prior
//! knowledge; p50/p99 computed from its `--log-file`).
//!
//! HAProxy (Debian's package) runs with `nbthread 2` (the router's tokio runtime has one
//! worker per CPU, 2 here), keep-alive to the servers and `http-reuse always`, and routes with
//! an ACL on `req.hdr(baggage)`; one frontend per protocol (`:18080` HTTP/1.1, `:18081` h2c),
//! whose backends speak the client's protocol, as the router does.
//!
//! Every sample is checked: no non-2xx response and no socket error, and the request counters
//! of both servers (`GET /stats`, read from the node before and after) show that every
//! request reached the intended server and none the other. Before measuring, one `curl` per
//! scenario and pattern, with the same headers, must see the expected `x-served-by`. The
//! node's `TcpActiveOpens` (its netns only holds the router and HAProxy) gives the upstream
//! connections each proxy opened per request: the pool reuse.
//!
//! CPU time per request is reported for the load generator (`getrusage` of the reaped child),
//! the proxy (every thread of the agent process, or of HAProxy, from `schedstat`) and the
//! servers: unlike req/s, it hardly depends on what else the machine runs at the time, and its
//! sum over the chain explains the throughput ratios when the CPUs are saturated.
//!
//! Everything runs on this machine at once (load generator, router, HAProxy, servers): the
//! figures compare the scenarios with each other, not with other machines.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use redirect_tests::{MiniCluster, Pod, Proc, ROUTER_IP4, SetupError, agent::Agent};

const VIP4: &str = "10.200.2.40";
const VIP6: &str = "fd00:200::2:40";
const SERVICE_PORT: u16 = 80;
/// benchserver's port in both checkout pods (the Service's target port).
const SERVER_PORT: u16 = 8080;
const HAPROXY_H1_PORT: u16 = 18080;
const HAPROXY_H2_PORT: u16 = 18081;
const KEY: &str = "feature-x";
const KEY_HEADER: &str = "baggage: routing-key=feature-x";
const BASE: &str = "checkout-base";
const FORK: &str = "checkout-fork";
const TOOLS: &[&str] = &["wrk", "h2load", "haproxy", "curl"];
/// Longest sample accepted.
const MAX_SECONDS: f64 = 60.0;
/// How long a load generator may take beyond its measuring time (start-up, exit).
const LOAD_SLACK: Duration = Duration::from_secs(15);
const SHORT: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: bench_router [--rounds N] [--seconds S] [--warmup S] [--json PATH] \
                     [--loads h1,h1_close,h2]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = bench(&args) {
        eprintln!("bench_router: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Options.

struct Options {
    /// Load patterns to run (default all), in `Load::ALL` order.
    loads: Vec<Load>,
    rounds: usize,
    seconds: f64,
    warmup: f64,
    json: Option<PathBuf>,
}

fn options(args: &[String]) -> Result<Options> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    ensure!(args.len().is_multiple_of(2), "flags come in pairs\n{USAGE}");
    let mut o = Options {
        rounds: 3,
        seconds: 3.0,
        warmup: 1.0,
        json: None,
        loads: Load::ALL.to_vec(),
    };
    for pair in args.chunks(2) {
        let (k, v) = (pair[0].as_str(), pair[1].as_str());
        match k {
            "--rounds" => o.rounds = v.parse().context("--rounds")?,
            "--seconds" => o.seconds = v.parse().context("--seconds")?,
            "--warmup" => o.warmup = v.parse().context("--warmup")?,
            "--json" => o.json = Some(PathBuf::from(v)),
            "--loads" => {
                let names: Vec<&str> = v.split(',').collect();
                o.loads = Load::ALL
                    .into_iter()
                    .filter(|l| names.contains(&l.name()))
                    .collect();
                ensure!(
                    o.loads.len() == names.len(),
                    "--loads takes a comma-separated list of h1, h1_close, h2"
                );
            }
            _ => bail!("unknown flag {k:?}\n{USAGE}"),
        }
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
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Direct,
        Scenario::RouterBaseline,
        Scenario::RouterFork,
        Scenario::Haproxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::RouterBaseline => "router_baseline",
            Scenario::RouterFork => "router_fork",
            Scenario::Haproxy => "haproxy",
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
    /// Connections the node (router or HAProxy) opened to upstreams during the sample.
    upstream_opens: u64,
    /// CPU time of the proxy of the scenario (the agent process or HAProxy; none for
    /// `direct`) and of both servers during the sample, in nanoseconds.
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

/// `$REDIRECT_BENCHSERVER_BIN`, else `benchserver` next to this program.
fn benchserver_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECT_BENCHSERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("own path")?;
    Ok(exe.with_file_name("benchserver"))
}

fn bench(args: &[String]) -> Result<()> {
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
        "{missing:?} not found: the benchmark needs wrk, h2load (nghttp2-client), haproxy and \
         curl (Debian: apt-get install wrk nghttp2-client haproxy curl)"
    );
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
    let samples = result?;
    report(&samples, &o)
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
type Samples = [[Vec<Sample>; 4]; 3];

fn run(mc: &MiniCluster, o: &Options) -> Result<Samples> {
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
    procs.push(mc.node().spawn(&["haproxy", "-db", "-f", cfg])?);
    let scene = Scene {
        mc,
        client,
        base,
        fork,
        agent_pid: agent.pid().context("agent pid")?,
        haproxy_pid: procs.last().map(Proc::pid).context("haproxy pid")?,
        server_pids,
        log_seq: AtomicU32::new(0),
    };
    scene.wait_haproxy(procs.last_mut().expect("haproxy"))?;
    println!(
        "mini-cluster {} ready: agent {} (router {}), HAProxy {}",
        mc.id(),
        agent_bin.display(),
        if agent_bin.components().any(|c| c.as_os_str() == "release") {
            "release build"
        } else {
            "NOT a release build: figures are not representative"
        },
        haproxy_version(mc),
    );

    // Checks and warm-up: every scenario and pattern once, its route proven by curl.
    for &load in &o.loads {
        for sc in Scenario::ALL {
            stop_requested()?;
            let seen = scene.curl_served_by(load, sc)?;
            let s = scene
                .sample(load, sc, o.warmup)
                .with_context(|| format!("warm-up {} {}", load.name(), sc.name()))?;
            println!(
                "warm-up {:<8} {:<15} {:>9.0} req/s  curl: x-served-by {seen} (checked)",
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
    let agent_log = agent.log();
    if agent_log.contains("panicked") {
        eprintln!("bench_router: the agent panicked:\n{agent_log}");
    }
    drop(scene);
    drop(procs);
    drop(agent);
    Ok(samples)
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
            Scenario::Haproxy => {
                let port = if load == Load::H2 {
                    HAPROXY_H2_PORT
                } else {
                    HAPROXY_H1_PORT
                };
                format!("http://{ROUTER_IP4}:{port}/")
            }
        }
    }

    /// Waits until HAProxy answers on both frontends.
    fn wait_haproxy(&self, haproxy: &mut Proc) -> Result<()> {
        let deadline = Instant::now() + READY;
        for (port, h2) in [(HAPROXY_H1_PORT, false), (HAPROXY_H2_PORT, true)] {
            let url = format!("http://{ROUTER_IP4}:{port}/");
            let mut argv = vec!["curl", "-sf", "--max-time", "2", "-o", "/dev/null", &url];
            if h2 {
                argv.push("--http2-prior-knowledge");
            }
            loop {
                if let Some(status) = haproxy.try_status()? {
                    bail!("haproxy exited ({status}):\n{}", haproxy.log());
                }
                if self.mc.node().run(&argv, SHORT)?.success() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("haproxy does not answer on {url}:\n{}", haproxy.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// One curl from the client pod with the scenario's headers and protocol: the
    /// `x-served-by` it saw, which must be the scenario's server.
    fn curl_served_by(&self, load: Load, sc: Scenario) -> Result<String> {
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
        if sc.key() {
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
            seen == sc.served_by(),
            "{} {}: served by {seen:?}, expected {}:\n{head}",
            load.name(),
            sc.name(),
            sc.served_by()
        );
        Ok(seen)
    }

    /// Requests served so far by (base, fork), read from the node (outside the attached
    /// cgroup root, so never redirected).
    fn served(&self) -> Result<(u64, u64)> {
        let read = |pod: &Pod<'_>| -> Result<u64> {
            let url = format!("http://{}:{SERVER_PORT}/stats", pod.ip4());
            let out = self
                .mc
                .node()
                .run(&["curl", "-sS", "--max-time", "5", &url], SHORT)?
                .check()
                .with_context(|| format!("GET {url}"))?;
            out.trim()
                .parse()
                .with_context(|| format!("GET {url}: {out:?}"))
        };
        Ok((read(&self.base)?, read(&self.fork)?))
    }

    /// The node netns's `Tcp: ActiveOpens`: connections the router and HAProxy opened.
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
        };
        let servers_cpu = || -> Result<u64> { self.server_pids.iter().map(|p| cpu_ns(*p)).sum() };
        let proxy_cpu = || proxy.map_or(Ok(0), cpu_ns);
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

fn report(samples: &Samples, o: &Options) -> Result<()> {
    let mut json: Vec<(String, f64, &str)> = Vec::new();
    println!();
    println!(
        "HTTP through the router: medians of {} rounds x {} s per scenario, interleaved",
        o.rounds, o.seconds
    );
    println!(
        "xdir, p99xd: req/s and p99 over direct's. upconn/r: upstream connections the node \
         opened per request.\nCPU us/req: CPU time per request of the load generator, the \
         proxy (router or HAProxy) and the server, and their sum.\nbusy: the machine's CPU \
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
    }
    if let Some(path) = &o.json {
        write_json(path, &json)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
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
