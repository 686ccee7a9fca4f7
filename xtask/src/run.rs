//! `cargo xtask test` and `cargo xtask demo`.

use anyhow::{Context, Result};

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

#[derive(clap::Args)]
pub struct TestOptions {
    /// Only run tests whose name contains this (passed to cargo test).
    pub filter: Option<String>,
    /// Skip formatting and lint checks.
    #[arg(long)]
    pub no_lint: bool,
    /// Seconds each fuzz target runs after the tests (0: no fuzzing).
    #[arg(long, env = "REDIRECT_TEST_FUZZ_SECONDS", default_value_t = 10)]
    pub fuzz_seconds: u64,
    /// Kernels the privileged suites also run on under QEMU after the tests (`cargo xtask
    /// vm-test`): series separated by commas, or `none`. 5.10 is the oldest supported (the
    /// fallbacks); 6.12 runs the `fentry` record hook, which some host kernels refuse.
    #[arg(long, env = "REDIRECT_TEST_VM_KERNELS", default_value = "5.10,6.12")]
    pub vm_kernels: String,
}

/// Path of the agent binary the end-to-end tests and the demo start.
pub fn agent_bin() -> std::path::PathBuf {
    workspace_root().join("target/debug/redirect-agent")
}

fn build_bins() -> Result<()> {
    cmd::run(cargo().args(["build", "--workspace", "--bins"]))
}

pub fn test(o: &TestOptions) -> Result<()> {
    build_ebpf::run(&build_ebpf::Options { no_verify: false })?;
    if !o.no_lint {
        cmd::run(cargo().args(["fmt", "--all", "--check"]))?;
        cmd::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The eBPF crate is outside the workspace: its own fmt and clippy.
        crate::lint_ebpf::run()?;
    }
    build_bins()?;
    // helm and kubectl for tests/tests/deploy.rs (target/tools/bin; quick when present).
    crate::tools::install_for_tests()?;
    let mut c = cargo();
    // Every test binary runs even when one fails, so one run shows every failure.
    c.args(["test", "--workspace", "--no-fail-fast"])
        .env("REDIRECT_AGENT_BIN", agent_bin());
    // The image the container tests run (tests/tests/container.rs); building it needs root
    // (buildah), like the tests that run it.
    if cmd::is_root() {
        let built = crate::image::build(&crate::image::Options {
            tag: None,
            output: None,
            binaries_only: false,
        })
        .context("building the image for the container tests (cargo xtask image)")?;
        c.env("REDIRECT_AGENT_IMAGE", &built.references[0]);
    }
    if let Some(f) = &o.filter {
        c.args(["--", f]);
    }
    cmd::run(&mut c)?;
    if o.filter.is_none() {
        vm_tests(&o.vm_kernels)?;
    }
    if o.fuzz_seconds > 0 && o.filter.is_none() {
        crate::fuzz::run(&crate::fuzz::Options {
            seconds: o.fuzz_seconds,
            no_sanitizer: false,
            targets: Vec::new(),
        })?;
    }
    Ok(())
}

/// The privileged suites on each of `kernels` under QEMU (the host kernel ran them above).
fn vm_tests(kernels: &str) -> Result<()> {
    if kernels == "none" {
        return Ok(());
    }
    if !cmd::is_root() {
        println!("SKIP vm-test {kernels}: needs root");
        return Ok(());
    }
    for kernel in kernels.split(',').map(str::trim) {
        crate::vm::run(&crate::vm::Options::for_test(kernel)).with_context(|| {
            format!("the privileged tests on kernel {kernel} (cargo xtask vm-test {kernel})")
        })?;
    }
    Ok(())
}

pub fn demo() -> Result<()> {
    build_ebpf::run(&build_ebpf::Options { no_verify: true })?;
    build_bins()?;
    cmd::run(
        cargo()
            .args(["run", "--quiet", "-p", "redirect-tests", "--bin", "demo"])
            .env("REDIRECT_AGENT_BIN", agent_bin()),
    )
}
