//! Project tasks: `cargo xtask <command>`. Run `cargo xtask --help` for the list.

mod bench;
mod bench_router;
mod build_ebpf;
mod cmd;
mod fuzz;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark redirect", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object with the pinned nightly; as root, also load every program through
    /// the kernel verifier and print its name, type and instruction count.
    BuildEbpf(build_ebpf::Options),
    /// Build everything, check formatting and lints, and run every test (privileged tests need
    /// root and skip with a message without it).
    Test(run::TestOptions),
    /// Run the mini-cluster demo: a request with a routing key reaches the fork, one without
    /// reaches baseline. Needs root; everything it creates is removed at the end.
    Demo,
    /// Benchmarks, side by side in one run; figures also go to target/bench/<name>.json.
    Bench(bench::Options),
    /// Run every fuzz target in fuzz/ for a while (cargo-fuzz, pinned nightly).
    Fuzz(fuzz::Options),
}

fn main() -> std::process::ExitCode {
    let result: Result<()> = match Cli::parse().command {
        Command::BuildEbpf(o) => build_ebpf::run(&o),
        Command::Test(o) => run::test(&o),
        Command::Demo => run::demo(),
        Command::Bench(o) => bench::run(&o),
        Command::Fuzz(o) => fuzz::run(&o),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, without a backtrace: the failing command already printed its own
            // output above.
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
