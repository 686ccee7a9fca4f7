//! `cargo xtask bench <name>`.

use anyhow::{Context, Result};

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

pub fn run(o: &Options) -> Result<()> {
    match &o.bench {
        Bench::Connect(c) => connect(c),
        Bench::Router(r) => crate::bench_router::run(r.rounds, r.seconds),
    }
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
