//! `cargo xtask lint-ebpf`: formatting and clippy for redirect-ebpf, which sits outside the
//! workspace (its own nightly and target), so the workspace's `cargo fmt` and `cargo clippy`
//! never see it.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

pub fn run() -> Result<()> {
    let manifest = workspace_root().join("redirect-ebpf/Cargo.toml");
    // The workspace's rustfmt, so both sides of the kernel boundary share one style.
    cmd::run(
        cargo()
            .args(["fmt", "--check", "--manifest-path"])
            .arg(&manifest),
    )
    .context(
        "redirect-ebpf is not formatted: run `cargo fmt --manifest-path redirect-ebpf/Cargo.toml`",
    )?;

    let nightly = build_ebpf::pinned_nightly()?;
    require_clippy(&nightly)?;
    // Every warning fails; the crate itself denies `clippy::undocumented_unsafe_blocks`.
    let mut c = build_ebpf::nightly_cargo(&nightly, "clippy");
    c.args(["--", "-D", "warnings"]);
    cmd::run(&mut c).with_context(|| {
        format!("clippy ({nightly}) rejected redirect-ebpf: fix the findings above")
    })?;
    println!("redirect-ebpf: formatted, no clippy findings");
    Ok(())
}

/// Fails with the fix when the pinned nightly lacks clippy (toolchains installed before it was
/// one of its components).
fn require_clippy(nightly: &str) -> Result<()> {
    let mut c = Command::new("rustup");
    c.args(["component", "list", "--installed", "--toolchain", nightly]);
    cmd::scrub_toolchain_env(&mut c);
    let out = c
        .output()
        .with_context(|| format!("could not start {c:?}"))?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !listed.lines().any(|l| l.starts_with("clippy")) {
        bail!(
            "clippy is not installed for {nightly}: run ./x setup \
             (or rustup component add clippy --toolchain {nightly})"
        );
    }
    Ok(())
}
