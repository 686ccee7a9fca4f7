//! `cargo xtask bench router`: HTTP requests through the node router next to direct requests
//! and HAProxy and nginx doing the same header routing, and the memory each proxy holds per
//! idle connection and per HTTP/2 stream (see docs/benchmarks.md). Builds everything optimised
//! (the agent too: the router's speed is what is measured), runs
//! `tests/src/bin/bench_router.rs` and checks the JSON it writes to target/bench/router.json.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

/// Flags of `cargo xtask bench router`.
#[derive(clap::Args)]
pub struct RouterOptions {
    /// Rounds; each runs every scenario of every load pattern once, in a rotating order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub rounds: u64,
    /// Seconds of one sample (one scenario under one load pattern in one round).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
}

/// Builds and runs the benchmark: `rounds` rounds of `seconds`-second samples. Needs root
/// (prints why and succeeds without), wrk, h2load, haproxy, nginx, curl and python3.
pub fn run(rounds: u64, seconds: u64) -> Result<()> {
    if !cmd::is_root() {
        println!(
            "bench router needs root (network namespaces, cgroups, eBPF): skipped. \
             Run it as root, e.g. `sudo -E cargo xtask bench router`."
        );
        return Ok(());
    }
    build_ebpf::run(&build_ebpf::Options { no_verify: true })?;
    // Release builds throughout: the agent's router is the thing measured, and the servers
    // must not be the bottleneck.
    cmd::run(cargo().args(["build", "--release", "-p", "redirect-agent", "--bins"]))?;
    cmd::run(cargo().args([
        "build",
        "--release",
        "-p",
        "redirect-tests",
        "--bin",
        "bench_router",
        "--bin",
        "benchserver",
    ]))?;
    let target = workspace_root().join("target");
    let release = target.join("release");
    let json = target.join("bench/router.json");
    // A stale file must not pass for this run's figures.
    match std::fs::remove_file(&json) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", json.display()));
        }
        _ => {}
    }
    cmd::run(
        Command::new(release.join("bench_router"))
            .args(["--rounds", &rounds.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .arg("--json")
            .arg(&json)
            .env("REDIRECT_AGENT_BIN", release.join("redirect-agent"))
            .env("REDIRECT_BENCHSERVER_BIN", release.join("benchserver")),
    )?;
    if json.exists() {
        let text = std::fs::read_to_string(&json)?;
        let list = serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .with_context(|| format!("{} is not a JSON list", json.display()))?;
        ensure!(
            list.iter()
                .all(|e| e["name"].is_string() && e["value"].is_number() && e["unit"].is_string()),
            "{}: every entry needs name, value and unit",
            json.display()
        );
    }
    Ok(())
}
