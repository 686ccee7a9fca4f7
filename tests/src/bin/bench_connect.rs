//! The connect()+close() benchmark behind `cargo xtask bench connect` (see
//! `docs/benchmarks.md`): what the cgroup programs cost a connecting client.
//!
//! `bench_connect [--rounds N] [--seconds S] [--warmup S] [--json PATH]`
//!
//! Builds a mini-cluster with the agent running and one sandbox, then measures four scenarios,
//! interleaved within each round (the order rotates from round to round), and prints the
//! median, min and max connections per second of each plus the ratios of the medians:
//!
//! | scenario      | client                                   | connects to                    |
//! |---------------|------------------------------------------|--------------------------------|
//! | `none`        | `client` pod's netns, cgroup OUTSIDE root | fork pod ip, 2nd listener      |
//! | `miss`        | `client` pod (a baseline pod)            | fork endpoint `ip:9000`        |
//! | `origin`      | `caller-fork` pod (a fork pod)           | `target` ClusterIP `:80`       |
//! | `direct_fork` | `caller-fork` pod (a fork pod)           | fork endpoint `ip:9000`        |
//!
//! `origin` is rewritten by `connect4` to the fork endpoint (reason `origin_fork`); `miss` and
//! `direct_fork` take the one-lookup miss path (`not_forked`); `none` runs no program at all:
//! its client stays in this process's cgroup (outside the attached root) and enters the pod's
//! netns itself (`client --netns`), and its server is a second listener on the fork pod's
//! address that also runs outside the root, so not even `sock_ops` runs on the accepting side.
//! The other three share the listener inside the fork pod's cgroup. Every scenario crosses the
//! same path: pod veth → node (forwarding, conntrack) → pod veth. Before measuring, a warm-up
//! sample of each scenario checks the kernel counters: `none` must count nothing, `miss` and
//! `direct_fork` one `not_forked` per connection, `origin` one `origin_fork`.
//!
//! Besides wall-clock connections per second, each sample reports connections per CPU-second
//! of the client process (`CLOCK_PROCESS_CPUTIME_ID`, which includes the handshake's softirq
//! work done in the client's context): less sensitive to other load on a shared machine.
//! After the rounds, five more interleaved rounds of `miss`, `origin`, `direct_fork` and
//! `to_router` (the `client` pod to the `target` ClusterIP, which `connect4` sends to the
//! router) run with the kernel's BPF run-time statistics enabled and report the programs' own
//! time per connection (read through `bpftool`; skipped with a note without it); then, with a
//! `getpeername()` after each connect, `miss`, `origin` and `unforked` (the `client` pod to
//! the second listener, which is no fork endpoint), for what `getpeername4` costs.
//!
//! Hidden modes, used by the benchmark itself:
//! - `client --addr IP:PORT --seconds S [--count N] [--netns PATH] [--getpeername]`: blocking
//!   connect() (with `--getpeername`, then getpeername(), which must name `IP:PORT`) then
//!   close() in a loop for S seconds (at most N connections) and prints
//!   `connects=<n> ns=<elapsed> cpu_ns=<client CPU time>`. Every socket gets
//!   `SO_LINGER {on, 0}`, so close() sends a RST and leaves no TIME_WAIT behind: the ephemeral
//!   ports never run out, however long it runs. `--netns` enters that network namespace before
//!   the first socket, without changing cgroup. A failed connect() ends it with an error: a
//!   refused or reset connection would be fast and count as a success otherwise.
//! - `server --listen IP:PORT [--netns PATH]`: accept() and close() forever; prints
//!   `listening` once bound.

use std::{
    fs::{self, File},
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, accept4, bind, connect,
        listen, setsockopt, socket, sockopt,
    },
};
use redirect_tests::{MiniCluster, Pod, Proc, SetupError, agent::Agent};

/// The fork endpoint's port (the services' target port), served inside the fork pod's cgroup.
const POD_PORT: u16 = 9000;
/// The fork pod's second listener, outside the cgroup root (for `none`).
const FREE_PORT: u16 = 9001;
const TARGET_VIP4: &str = "10.200.2.20";
const TARGET_VIP6: &str = "fd00:200::2:20";
const CALLER_VIP4: &str = "10.200.2.21";
const CALLER_VIP6: &str = "fd00:200::2:21";
const SERVICE_PORT: u16 = 80;
const KEY: &str = "bench";
/// Longest sample a client accepts, and most connections per sample.
const MAX_SECONDS: f64 = 60.0;
const MAX_COUNT: u64 = 100_000_000;
/// How long a client may take beyond its measuring time (start-up, exit).
const CLIENT_SLACK: Duration = Duration::from_secs(15);
const SERVER_READY: Duration = Duration::from_secs(10);

/// The connect()+close() benchmark: what the cgroup programs cost a connecting client.
#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand)]
enum Mode {
    /// connect() then close() in a loop; prints `connects=<n> ns=<elapsed> cpu_ns=<cpu>`.
    #[command(hide = true)]
    Client(ClientArgs),
    /// accept() and close() forever; prints `listening` once bound.
    #[command(hide = true)]
    Server(ServerArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Where to connect.
    #[arg(long, value_name = "IP:PORT")]
    addr: SocketAddr,
    /// How long to run.
    #[arg(long, value_name = "S")]
    seconds: f64,
    /// Most connections.
    #[arg(long, value_name = "N", default_value_t = MAX_COUNT)]
    count: u64,
    /// Network namespace to enter before the first socket.
    #[arg(long, value_name = "PATH")]
    netns: Option<String>,
    /// Call getpeername() after each connect() and check it names --addr.
    #[arg(long)]
    getpeername: bool,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Where to listen.
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
    /// Network namespace to enter before binding.
    #[arg(long, value_name = "PATH")]
    netns: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        Some(Mode::Client(a)) => client(a),
        Some(Mode::Server(a)) => server(a),
        None => bench(cli.options),
    };
    if let Err(e) = result {
        eprintln!("bench_connect: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Hidden modes: client and server.

fn enter_netns(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening netns {path}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))
}

fn family(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// CPU time of this process so far (scheduler runtime of all its threads).
fn process_cpu_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ensure!(r == 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn client(args: ClientArgs) -> Result<()> {
    let ClientArgs {
        addr,
        seconds,
        count,
        netns,
        getpeername,
    } = args;
    if let Some(path) = netns {
        enter_netns(&path)?;
    }
    ensure!(
        seconds > 0.0 && seconds <= MAX_SECONDS,
        "--seconds must be in (0, {MAX_SECONDS}]"
    );
    ensure!(
        (1..=MAX_COUNT).contains(&count),
        "--count must be in 1..={MAX_COUNT}"
    );
    let duration = Duration::from_secs_f64(seconds);
    let target = SockaddrStorage::from(addr);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let cpu_start = process_cpu_ns()?;
    let start = Instant::now();
    let mut n = 0u64;
    let elapsed = loop {
        let sock = socket(
            family(&addr),
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("socket")?;
        setsockopt(&sock, sockopt::Linger, &linger).context("SO_LINGER")?;
        connect(sock.as_raw_fd(), &target)
            .with_context(|| format!("connect {addr} (after {n} connections)"))?;
        if getpeername {
            let peer: SockaddrStorage =
                nix::sys::socket::getpeername(sock.as_raw_fd()).context("getpeername")?;
            ensure!(
                peer == target,
                "getpeername after connecting to {addr} named {peer} (after {n} connections)"
            );
        }
        drop(sock);
        n += 1;
        let elapsed = start.elapsed();
        if n >= count || elapsed >= duration {
            break elapsed;
        }
    };
    let cpu = process_cpu_ns()? - cpu_start;
    println!("connects={n} ns={} cpu_ns={cpu}", elapsed.as_nanos());
    Ok(())
}

fn server(args: ServerArgs) -> Result<()> {
    let ServerArgs {
        listen: addr,
        netns,
    } = args;
    if let Some(path) = netns {
        enter_netns(&path)?;
    }
    let sock = socket(
        family(&addr),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    setsockopt(&sock, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    bind(sock.as_raw_fd(), &SockaddrStorage::from(addr)).with_context(|| format!("bind {addr}"))?;
    listen(&sock, Backlog::MAXCONN).context("listen")?;
    println!("listening");
    std::io::stdout().flush()?;
    loop {
        // Errors (a connection reset before accept, EMFILE for a moment) are not fatal.
        if let Ok(fd) = accept4(sock.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: `fd` was just returned by accept4 and is owned by nobody else.
            unsafe { libc::close(fd) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    None,
    Miss,
    Origin,
    DirectFork,
    /// Only in the run-time sample: a baseline pod to the forked ClusterIP, sent to the router.
    ToRouter,
    /// Only in the `getpeername()` sample: a baseline pod to the fork pod's second listener, an
    /// address that is no fork endpoint.
    Unforked,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::None,
        Scenario::Miss,
        Scenario::Origin,
        Scenario::DirectFork,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::Miss => "miss",
            Scenario::Origin => "origin",
            Scenario::DirectFork => "direct_fork",
            Scenario::ToRouter => "to_router",
            Scenario::Unforked => "unforked",
        }
    }
}

/// The ratios reported, `a / b`, with their goal (reported, never asserted).
const RATIOS: [(Scenario, Scenario, Option<f64>); 3] = [
    (Scenario::Miss, Scenario::None, Some(0.98)),
    (Scenario::Origin, Scenario::DirectFork, Some(0.98)),
    (Scenario::Origin, Scenario::None, None),
];

#[derive(clap::Args)]
struct Options {
    /// Rounds, each measuring every scenario once (1 to 100).
    #[arg(long, value_name = "N", default_value_t = 5)]
    rounds: usize,
    /// Length of each sample, in seconds (0.1 to 60).
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    seconds: f64,
    /// Length of each scenario's warm-up sample, in seconds (0.1 to 60).
    #[arg(long, value_name = "S", default_value_t = 0.5)]
    warmup: f64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

fn check(o: &Options) -> Result<()> {
    ensure!((1..=100).contains(&o.rounds), "--rounds must be in 1..=100");
    for (name, v) in [("--seconds", o.seconds), ("--warmup", o.warmup)] {
        ensure!(
            (0.1..=MAX_SECONDS).contains(&v),
            "{name} must be in [0.1, {MAX_SECONDS}]"
        );
    }
    Ok(())
}

fn bench(o: Options) -> Result<()> {
    check(&o)?;
    redirect_tests::scene::stop::install()?;
    let mc = match MiniCluster::new() {
        Ok(mc) => mc,
        Err(SetupError::Skip(why)) => {
            println!("bench connect skipped: {why}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    // The scene (agent, servers, pods) lives and is dropped inside `measure`, before `mc`.
    let (samples, programs) = measure(&mc, &o)?;
    drop(mc);
    report(&samples, &programs, &o)
}

/// One client run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    connects: u64,
    /// Connections per second of wall-clock time.
    rate: f64,
    /// Connections per second of the client's CPU time.
    cpu_rate: f64,
}

/// The samples of each scenario, indexed like `Scenario::ALL`.
type Samples = [Vec<Sample>; 4];

struct Scene<'c> {
    mc: &'c MiniCluster,
    exe: String,
    client: Pod<'c>,
    caller_fork: Pod<'c>,
    target_fork: Pod<'c>,
}

/// One figure of `--json`: name, value, unit.
type JsonEntry = (String, f64, &'static str);

fn measure(mc: &MiniCluster, o: &Options) -> Result<(Samples, Vec<JsonEntry>)> {
    let exe = std::env::current_exe().context("own path")?;
    let exe = exe.to_str().context("non-UTF-8 own path")?.to_string();
    let fork = |app: &'static str| [("app", app), ("redirect.dev/sandbox", KEY)];
    let client = mc.pod_with_labels("client", &[("app", "client")])?;
    let caller_fork = mc.pod_with_labels("caller-fork", &fork("caller"))?;
    let target_base = mc.pod_with_labels("target-base", &[("app", "target")])?;
    let target_fork = mc.pod_with_labels("target-fork", &fork("target"))?;
    // Nothing listens on target-base: a connection that reached baseline instead of the fork
    // is reset, which fails the client.
    let fork_ip = IpAddr::V4(target_fork.ip4());
    let listen = SocketAddr::new(fork_ip, POD_PORT).to_string();
    let free = SocketAddr::new(fork_ip, FREE_PORT).to_string();
    let netns = target_fork.netns_path().to_str().context("netns path")?;
    let mut servers: Vec<Proc> = vec![
        target_fork.spawn(&[&exe, "server", "--listen", &listen])?,
        // In the node netns without a cgroup, so it stays in this process's cgroup; it enters
        // the fork pod's netns itself.
        mc.node()
            .spawn(&[&exe, "server", "--listen", &free, "--netns", netns])?,
    ];
    for s in &mut servers {
        s.wait_for_log("listening", SERVER_READY)?;
    }
    let ports = [(SERVICE_PORT, POD_PORT)];
    mc.service("target", TARGET_VIP4, TARGET_VIP6, &ports, &[&target_base])?;
    mc.service("caller", CALLER_VIP4, CALLER_VIP6, &ports, &[])?;
    let manifests = mc.workdir().join("manifests");
    mc.write_manifests(&manifests)?;
    fs::write(
        manifests.join("sandbox-bench.yaml"),
        redirect_tests::scene::sandbox_manifest(KEY, "Unavailable", &["caller", "target"]),
    )?;
    let mut agent = Agent::start(mc, &manifests)?;
    println!(
        "mini-cluster {} ready; agent attached at {}, pinned at {}",
        mc.id(),
        mc.cgroup_root().display(),
        agent.pin_dir.display()
    );
    let scene = Scene {
        mc,
        exe,
        client,
        caller_fork,
        target_fork,
    };

    // Warm-up, which also checks that each scenario takes the path it is named after.
    for sc in Scenario::ALL.into_iter().chain([Scenario::ToRouter]) {
        let before = agent.counters()?;
        let s = scene.sample(sc, o.warmup, false)?;
        let after = agent.counters()?;
        let delta = |label: &str| after[label] - before[label];
        let total = after.values().sum::<u64>() - before.values().sum::<u64>();
        let n = s.connects;
        let ok = match sc {
            Scenario::None => total == 0,
            Scenario::Miss | Scenario::DirectFork | Scenario::Unforked => {
                delta("not_forked") >= n && delta("origin_fork") == 0
            }
            Scenario::Origin => delta("origin_fork") >= n,
            Scenario::ToRouter => delta("to_router") >= n,
        };
        ensure!(
            ok,
            "{}: {n} connections, but the kernel counted not_forked +{} origin_fork +{} \
             (all reasons +{total}): the scenario does not take its path",
            sc.name(),
            delta("not_forked"),
            delta("origin_fork"),
        );
        println!(
            "warm-up {:<12} {:>7.0} conn/s   kernel: not_forked +{} origin_fork +{} (as expected)",
            sc.name(),
            s.rate,
            delta("not_forked"),
            delta("origin_fork"),
        );
    }

    let mut samples: Samples = Default::default();
    for round in 0..o.rounds {
        let mut line = format!("round {}/{}:", round + 1, o.rounds);
        for k in rotated(round, Scenario::ALL.len()) {
            if redirect_tests::scene::stop::requested() {
                bail!("interrupted");
            }
            let sc = Scenario::ALL[k];
            let s = scene.sample(sc, o.seconds, false)?;
            samples[sc as usize].push(s);
            line.push_str(&format!("  {} {:.0}", sc.name(), s.rate));
        }
        println!("{line}");
    }
    let programs = match record_hooks_time(&scene, &mut agent, o.warmup.max(1.0)) {
        Ok(entries) => entries,
        Err(e) => {
            println!("program run time not measured: {e:#}");
            Vec::new()
        }
    };
    Ok((samples, programs))
}

/// BPF_ENABLE_STATS (bpf(2) command 32) with type BPF_STATS_RUN_TIME (0): the kernel times
/// every program run while the returned descriptor stays open.
fn enable_bpf_stats() -> Result<OwnedFd> {
    let attr = [0u64; 8];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of the zeroed attribute buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            32,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    ensure!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The value of `"key":` in one flat JSON object as bpftool prints it.
fn json_field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = &obj[obj.find(&pat)? + pat.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"'))
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running bpftool (not installed?)")?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (attach type, program id) of the programs attached at the cluster's cgroup root.
fn attached(root: &Path) -> Result<Vec<(String, String)>> {
    let root = root.to_str().context("cgroup path")?;
    let text = bpftool(&["-j", "cgroup", "show", root])?;
    let progs: Vec<(String, String)> = text
        .split('{')
        .filter_map(|obj| {
            Some((
                json_field(obj, "attach_type")?.to_string(),
                json_field(obj, "id")?.to_string(),
            ))
        })
        .collect();
    ensure!(!progs.is_empty(), "no programs attached at {root}");
    Ok(progs)
}

/// ("fentry", program id) of the `fentry` record hook, when the agent pinned its link.
fn fentry_hook(pin_dir: &Path) -> Result<Option<(String, String)>> {
    let pin = pin_dir.join(redirect_common::RECORD_PROGRAMS[0].1);
    if !pin.exists() {
        return Ok(None);
    }
    let text = bpftool(&[
        "-j",
        "link",
        "show",
        "pinned",
        pin.to_str().context("pin path")?,
    ])?;
    let id = json_field(&text, "prog_id").context("no prog_id in bpftool's link")?;
    Ok(Some(("fentry".to_string(), id.to_string())))
}

/// The record hook's program run time with the agent's automatic choice and, when that is
/// `fentry`, again with `--record-hook sock-ops` (same scene, one run: the two side by side).
fn record_hooks_time(scene: &Scene<'_>, agent: &mut Agent, seconds: f64) -> Result<Vec<JsonEntry>> {
    let fentry = fentry_hook(&agent.pin_dir)?;
    let chose_fentry = fentry.is_some();
    let mut json = program_time(scene, fentry, seconds)?;
    if !chose_fentry {
        println!("record hook: sock_ops (fentry on tcp_connect not available on this kernel)");
        return Ok(json);
    }
    agent.set_extra(&["--record-hook", "sock-ops"]);
    agent.restart(scene.mc)?;
    println!("\nthe same with --record-hook sock-ops (the fallback before Linux 5.11):");
    let ops = program_time(scene, fentry_hook(&agent.pin_dir)?, seconds)?;
    let value = |v: &[JsonEntry], k: &str| v.iter().find(|e| e.0 == k).map(|e| e.1);
    if let (Some(f), Some(o)) = (
        value(&json, "programs_miss_ns"),
        value(&ops, "programs_miss_ns"),
    ) {
        println!(
            "programs per unforked connection, fentry / sock_ops: {:.2}",
            f / o
        );
        json.push((
            "programs_miss_ns_fentry_over_sock_ops".into(),
            f / o,
            "ratio",
        ));
    }
    json.extend(
        ops.into_iter()
            .filter(|e| e.0.starts_with("record_") || e.0.starts_with("programs_"))
            .map(|(k, v, u)| (format!("sock_ops_hook_{k}"), v, u)),
    );
    Ok(json)
}

/// Total (run time ns, runs) per attach type.
fn run_stats(progs: &[(String, String)]) -> Result<Vec<(String, u64, u64)>> {
    progs
        .iter()
        .map(|(kind, id)| {
            let text = bpftool(&["-j", "prog", "show", "id", id])?;
            let num = |k: &str| {
                json_field(&text, k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            Ok((kind.clone(), num("run_time_ns"), num("run_cnt")))
        })
        .collect()
}

/// The order of `n` scenarios in round `round`: each round starts one later, so every scenario
/// runs in every position across the rounds.
fn rotated(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

/// Rounds of the program run-time sample, each scenario once per round in a rotating order (as
/// the rate rounds): this machine's load moves by tens of percent from one second to the next.
const PROGRAM_ROUNDS: usize = 5;

/// Run time (ns) and runs per attach type, between two `run_stats` readings.
fn stats_delta(
    before: &[(String, u64, u64)],
    after: &[(String, u64, u64)],
    kind: &str,
) -> (f64, f64) {
    let sum = |v: &[(String, u64, u64)]| -> (u64, u64) {
        v.iter()
            .filter(|(k, _, _)| k == kind)
            .fold((0, 0), |(t, c), (_, dt, dc)| (t + dt, c + dc))
    };
    let ((t1, c1), (t0, c0)) = (sum(after), sum(before));
    ((t1 - t0) as f64, (c1 - c0) as f64)
}

/// One scenario's totals over the rounds of `program_time`.
#[derive(Clone, Copy, Default)]
struct ProgramTotals {
    connects: f64,
    client_cpu_ns: f64,
    connect_ns: f64,
    connect_runs: f64,
    record_ns: f64,
    record_runs: f64,
}

/// The programs' own run time per connection, measured by the kernel (BPF run-time stats,
/// enabled only for these extra samples because timing every run costs a little), against the
/// client's CPU time per connection, over `PROGRAM_ROUNDS` interleaved rounds, with the `fentry`
/// record hook's (attach type, program id) when the agent attached it. Returns the
/// figures for `--json`, per scenario: `connect4_<sc>_ns` (per run), `record_<sc>_runs` (runs
/// of the record hook, `sock_ops` or `fentry`, per connection), `record_<sc>_ns` (per run),
/// `programs_<sc>_ns` (per connection), `programs_<sc>_share` (% of the client's CPU time per
/// connection); `connect4_origin_ns_over_miss_ns`; and `getpeername_<sc>_ns`, what a
/// `getpeername()` right after `connect()` costs in `getpeername4` for `unforked`, `miss` and
/// `origin`.
fn program_time(
    scene: &Scene<'_>,
    fentry: Option<(String, String)>,
    seconds: f64,
) -> Result<Vec<JsonEntry>> {
    let mut progs = attached(scene.mc.cgroup_root())?;
    // The hook's name, and its attach type as `run_stats` reports it.
    let (hook, record_kind) = if fentry.is_some() {
        ("fentry", "fentry")
    } else {
        ("sock_ops", "cgroup_sock_ops")
    };
    progs.extend(fentry);
    let _stats = enable_bpf_stats()?;
    let scenarios = [
        Scenario::Miss,
        Scenario::Origin,
        Scenario::DirectFork,
        Scenario::ToRouter,
    ];
    let at = |sc: Scenario| {
        scenarios
            .iter()
            .position(|s| *s == sc)
            .expect("listed above")
    };
    let (origin, miss) = (at(Scenario::Origin), at(Scenario::Miss));
    let mut totals = [ProgramTotals::default(); 4];
    let mut round_ratios = Vec::new();
    for round in 0..PROGRAM_ROUNDS {
        let mut per_run = [0.0; 4];
        for k in rotated(round, scenarios.len()) {
            let before = run_stats(&progs)?;
            let s = scene.sample(scenarios[k], seconds, false)?;
            let after = run_stats(&progs)?;
            let (connect_ns, connect_runs) = stats_delta(&before, &after, "cgroup_inet4_connect");
            let (record_ns, record_runs) = stats_delta(&before, &after, record_kind);
            let t = &mut totals[k];
            t.connects += s.connects as f64;
            t.client_cpu_ns += s.connects as f64 * 1e9 / s.cpu_rate;
            t.connect_ns += connect_ns;
            t.connect_runs += connect_runs;
            t.record_ns += record_ns;
            t.record_runs += record_runs;
            per_run[k] = connect_ns / connect_runs.max(1.0);
        }
        round_ratios.push(per_run[origin] / per_run[miss]);
    }
    println!();
    println!(
        "program run time per connection (kernel BPF stats, {PROGRAM_ROUNDS} rounds x {seconds} s \
         per scenario; record hook {hook}, whose runs count every TCP connect of the machine):"
    );
    println!(
        "{:<12} {:>13} {:>19} {:>12} {:>15} {:>7}",
        "scenario", "connect4 ns", "record runs x ns", "programs ns", "client CPU ns", "share"
    );
    let mut json = Vec::new();
    let mut connect4_ns = [0.0; 4];
    for (k, sc) in scenarios.into_iter().enumerate() {
        let t = totals[k];
        let n = t.connects.max(1.0);
        let total = (t.connect_ns + t.record_ns) / n;
        let cpu = t.client_cpu_ns / n;
        let per_connect = t.connect_ns / t.connect_runs.max(1.0);
        let (runs, per_op) = (t.record_runs / n, t.record_ns / t.record_runs.max(1.0));
        let share = total / cpu * 100.0;
        connect4_ns[k] = per_connect;
        println!(
            "{:<12} {per_connect:>13.1} {runs:>10.1} x {per_op:<6.1} {total:>12.0} {cpu:>15.0} \
             {share:>6.2}%",
            sc.name(),
        );
        let name = sc.name();
        json.extend([
            (format!("connect4_{name}_ns"), per_connect, "ns/run"),
            (format!("record_{name}_runs"), runs, "runs/conn"),
            (format!("record_{name}_ns"), per_op, "ns/run"),
            (format!("programs_{name}_ns"), total, "ns/conn"),
            (format!("programs_{name}_share"), share, "%"),
        ]);
    }
    let ratio = connect4_ns[origin] / connect4_ns[miss];
    println!(
        "connect4 origin / miss: {ratio:.2} (per-round range {:.2} - {:.2}; goal <= 2.00)",
        min(&round_ratios),
        max(&round_ratios),
    );
    json.push(("connect4_origin_ns_over_miss_ns".into(), ratio, "ratio"));

    // getpeername() right after connect(): a socket whose peer is no fork endpoint is answered
    // after one hint lookup; one whose peer is (`miss` connects to the fork endpoint directly)
    // also reads its slot; a rewritten socket's first call copies the answer from its slot into
    // its storage.
    let peer_scenarios = [Scenario::Unforked, Scenario::Miss, Scenario::Origin];
    let mut peername = [(0.0, 0.0); 3];
    for round in 0..PROGRAM_ROUNDS {
        for k in rotated(round, peer_scenarios.len()) {
            let before = run_stats(&progs)?;
            scene.sample(peer_scenarios[k], seconds, true)?;
            let after = run_stats(&progs)?;
            let (ns, runs) = stats_delta(&before, &after, "cgroup_inet4_getpeername");
            peername[k].0 += ns;
            peername[k].1 += runs;
        }
    }
    let per_call = peername.map(|(ns, runs)| ns / f64::max(runs, 1.0));
    println!(
        "getpeername4 ns, getpeername() once right after each connect(): unforked peer {:.1}, \
         fork endpoint connected directly (miss) {:.1}, rewritten (origin) {:.1}",
        per_call[0], per_call[1], per_call[2]
    );
    for (sc, ns) in peer_scenarios.into_iter().zip(per_call) {
        json.push((format!("getpeername_{}_ns", sc.name()), ns, "ns/run"));
    }
    Ok(json)
}

impl Scene<'_> {
    /// One client run of `seconds`; with `getpeername`, the client asks for its peer after each
    /// connect and checks it is the address it connected to.
    fn sample(&self, sc: Scenario, seconds: f64, getpeername: bool) -> Result<Sample> {
        let fork_ip = IpAddr::V4(self.target_fork.ip4());
        let addr = match sc {
            Scenario::None | Scenario::Unforked => SocketAddr::new(fork_ip, FREE_PORT).to_string(),
            Scenario::Miss | Scenario::DirectFork => SocketAddr::new(fork_ip, POD_PORT).to_string(),
            Scenario::Origin | Scenario::ToRouter => format!("{TARGET_VIP4}:{SERVICE_PORT}"),
        };
        let secs = seconds.to_string();
        let mut argv = vec![
            self.exe.as_str(),
            "client",
            "--addr",
            &addr,
            "--seconds",
            &secs,
        ];
        if getpeername {
            argv.push("--getpeername");
        }
        let timeout = Duration::from_secs_f64(seconds) + CLIENT_SLACK;
        let out = match sc {
            Scenario::None => {
                // Started in the node netns without a cgroup, so it stays in this process's
                // cgroup (outside the attached root); it enters the pod's netns itself.
                let netns = self.client.netns_path().to_str().context("netns path")?;
                argv.extend(["--netns", netns]);
                self.mc.node().run(&argv, timeout)?
            }
            Scenario::Miss | Scenario::ToRouter | Scenario::Unforked => {
                self.client.run(&argv, timeout)?
            }
            Scenario::Origin | Scenario::DirectFork => self.caller_fork.run(&argv, timeout)?,
        };
        let text = out
            .check()
            .with_context(|| format!("{} client", sc.name()))?;
        parse_client(&text).with_context(|| format!("{} client printed {text:?}", sc.name()))
    }
}

fn parse_client(text: &str) -> Result<Sample> {
    let field = |name: &str| -> Result<u64> {
        let prefix = format!("{name}=");
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .with_context(|| format!("no {name}="))?
            .parse()
            .with_context(|| format!("bad {name}="))
    };
    let (n, ns, cpu_ns) = (field("connects")?, field("ns")?, field("cpu_ns")?);
    ensure!(n > 0 && ns > 0 && cpu_ns > 0, "empty sample");
    Ok(Sample {
        connects: n,
        rate: n as f64 * 1e9 / ns as f64,
        cpu_rate: n as f64 * 1e9 / cpu_ns as f64,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if !s.len().is_multiple_of(2) {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn report(samples: &Samples, programs: &[JsonEntry], o: &Options) -> Result<()> {
    let rates =
        |sc: Scenario| -> Vec<f64> { samples[sc as usize].iter().map(|s| s.rate).collect() };
    let cpu_rates =
        |sc: Scenario| -> Vec<f64> { samples[sc as usize].iter().map(|s| s.cpu_rate).collect() };
    let med = |sc: Scenario| median(&rates(sc));
    let cpu_med = |sc: Scenario| median(&cpu_rates(sc));
    println!();
    println!(
        "connect()+close() per second, {} rounds x {} s per scenario, interleaved",
        o.rounds, o.seconds
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>7} {:>7}   {:>13} {:>7}",
        "scenario", "median", "min", "max", "spread", "x none", "per client-CPU", "x none"
    );
    for sc in Scenario::ALL {
        let v = rates(sc);
        let m = median(&v);
        println!(
            "{:<12} {m:>8.0} {:>8.0} {:>8.0} {:>6.1}% {:>7.3}   {:>13.0}  {:>7.3}",
            sc.name(),
            min(&v),
            max(&v),
            (max(&v) - min(&v)) / m * 100.0,
            m / med(Scenario::None),
            cpu_med(sc),
            cpu_med(sc) / cpu_med(Scenario::None),
        );
    }
    println!();
    println!(
        "{:<24} {:>7} {:>17} {:>13}   {:>14}",
        "ratio of medians", "value", "per-round range", "goal", "per client-CPU"
    );
    let mut json = Vec::new();
    for sc in Scenario::ALL {
        json.push((format!("connect_{}", sc.name()), med(sc), "conn/s"));
    }
    for (a, b, goal) in RATIOS {
        let name = format!("{}_over_{}", a.name(), b.name());
        let value = med(a) / med(b);
        // The ratio within each round (samples seconds apart): how much of a difference is
        // noise.
        let paired: Vec<f64> = rates(a).iter().zip(rates(b)).map(|(x, y)| x / y).collect();
        let goal = match goal {
            Some(g) if value >= g => format!(">= {g:.2} met"),
            Some(g) => format!(">= {g:.2} missed"),
            None => "-".to_string(),
        };
        println!(
            "{name:<24} {value:>7.3} {:>7.3} - {:<7.3} {goal:>13}   {:>14.3}",
            min(&paired),
            max(&paired),
            cpu_med(a) / cpu_med(b),
        );
        json.push((name, value, "ratio"));
    }
    json.extend(programs.iter().cloned());
    if let Some(path) = &o.json {
        write_json(path, &json)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// `[{"name": …, "value": …, "unit": …}, …]`; names and units are plain ASCII identifiers.
fn write_json(path: &Path, entries: &[JsonEntry]) -> Result<()> {
    let body: Vec<String> = entries
        .iter()
        .map(|(name, value, unit)| {
            let value = if *unit == "ratio" {
                format!("{value:.4}")
            } else if *unit == "%" {
                format!("{value:.2}")
            } else {
                format!("{value:.1}")
            };
            format!("  {{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\"}}")
        })
        .collect();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, format!("[\n{}\n]\n", body.join(",\n")))
        .with_context(|| format!("writing {}", path.display()))
}
