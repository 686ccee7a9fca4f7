//! `cargo xtask bench <name>`.

use anyhow::{Context, Result, ensure};

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(clap::Subcommand)]
pub enum Bench {
    /// connect()+close() rate: no program, programs attached (miss path), origin path. Needs
    /// root; writes target/bench/connect.json. See docs/benchmarks.md.
    Connect(ConnectOptions),
    /// HTTP through the node router: direct, router (baseline and fork) and HAProxy, for
    /// HTTP/1.1 keep-alive, one connection per request and h2c. Needs root, wrk, h2load and
    /// haproxy; writes target/bench/router.json. See docs/benchmarks.md.
    Router(crate::bench_router::RouterOptions),
    /// The node agent's control plane at cluster scale: initial sync through the kube source,
    /// full desired()+diff(), watch event -> map latency, RSS. Needs no root (a kube-standin
    /// process and MemoryMaps); writes target/bench/sync.json. See docs/benchmarks.md.
    Sync(SyncOptions),
}

#[derive(clap::Args)]
pub struct ConnectOptions {
    /// Rounds; each runs every scenario once, in a rotating order.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Seconds of one sample (one scenario in one round).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

/// Flags of `cargo xtask bench sync` (the benchmark binary takes a few more: `bench_sync
/// --help`).
#[derive(clap::Args)]
pub struct SyncOptions {
    /// Services in the cluster (at least 10).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub services: u64,
    /// Endpoints over all services, in EndpointSlices of at most 100.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(0..=4_000_000))]
    pub endpoints: u64,
    /// Sandboxes, each forking 1 to 3 services (at least 1).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub sandboxes: u64,
    /// RouteGroups.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub route_groups: u64,
    /// API writes per latency pass (two passes: the default debounce, then none).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub events: u64,
    /// Repetitions of the full desired()+diff().
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub rounds: u64,
}

pub fn run(o: &Options) -> Result<()> {
    match &o.bench {
        Bench::Connect(c) => connect(c),
        Bench::Router(r) => crate::bench_router::run(r.rounds, r.seconds),
        Bench::Sync(s) => sync(s),
    }
}

/// Builds `bench_sync` and `kube-standin` optimised (the agent's code is what is measured) and
/// runs the benchmark; checks the JSON it writes.
fn sync(o: &SyncOptions) -> Result<()> {
    // The agent crate embeds the eBPF object (its build script refuses to build without one);
    // the benchmark never loads it, so an existing one will do.
    if !build_ebpf::object_path().exists() {
        build_ebpf::run(&build_ebpf::Options { no_verify: true })?;
    }
    cmd::run(cargo().args([
        "build",
        "--release",
        "-p",
        "redirect-tests",
        "--bin",
        "bench_sync",
        "--bin",
        "kube-standin",
    ]))?;
    let target = workspace_root().join("target");
    let json = target.join("bench/sync.json");
    // A stale file must not pass for this run's figures.
    match std::fs::remove_file(&json) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", json.display()));
        }
        _ => {}
    }
    cmd::run(
        std::process::Command::new(target.join("release/bench_sync"))
            .args(["--services", &o.services.to_string()])
            .args(["--endpoints", &o.endpoints.to_string()])
            .args(["--sandboxes", &o.sandboxes.to_string()])
            .args(["--route-groups", &o.route_groups.to_string()])
            .args(["--events", &o.events.to_string()])
            .args(["--rounds", &o.rounds.to_string()])
            .arg("--json")
            .arg(&json)
            .env(
                "REDIRECT_KUBE_STANDIN_BIN",
                target.join("release/kube-standin"),
            ),
    )?;
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("bench_sync wrote no {}", json.display()))?;
    let list = serde_json::from_str::<Vec<serde_json::Value>>(&text)
        .with_context(|| format!("{} is not a JSON list", json.display()))?;
    ensure!(
        list.iter()
            .all(|e| e["name"].is_string() && e["value"].is_number() && e["unit"].is_string()),
        "{}: every entry needs name, value and unit",
        json.display()
    );
    Ok(())
}

fn connect(o: &ConnectOptions) -> Result<()> {
    if !cmd::is_root() {
        println!(
            "bench connect needs root (network namespaces, cgroups, eBPF): skipped. \
             Run it as root, e.g. `sudo -E cargo xtask bench connect`."
        );
        return Ok(());
    }
    build_ebpf::run(&build_ebpf::Options { no_verify: true })?;
    // The agent runs as a debug build (its speed does not matter here); the client and server
    // loops are in the benchmark binary, which is built optimised.
    cmd::run(cargo().args(["build", "-p", "redirect-agent", "--bins"]))?;
    cmd::run(cargo().args([
        "build",
        "--release",
        "-p",
        "redirect-tests",
        "--bin",
        "bench_connect",
    ]))?;
    let target = workspace_root().join("target");
    let json = target.join("bench/connect.json");
    cmd::run(
        std::process::Command::new(target.join("release/bench_connect"))
            .args(["--rounds", &o.rounds.to_string()])
            .args(["--seconds", &o.seconds.to_string()])
            .arg("--json")
            .arg(&json)
            .env("REDIRECT_AGENT_BIN", target.join("debug/redirect-agent")),
    )?;
    if json.exists() {
        let text = std::fs::read_to_string(&json)?;
        serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .with_context(|| format!("{} is not a JSON list", json.display()))?;
    }
    Ok(())
}
