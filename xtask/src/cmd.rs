//! Running child commands with clear failures.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Runs `cmd`, failing with the command line when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output; a failure names `what` and carries the
/// command's standard error.
pub fn output(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A `cargo` for the workspace's own (pinned stable) toolchain.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes what the outer cargo exports (toolchain, flags): inherited, it makes a nested build
/// silently use stable instead of the pinned nightly. `CARGO_HOME` stays: it says where
/// installed tools and the registry are.
pub fn scrub_toolchain_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k != "CARGO_HOME"
            && (k == "RUSTUP_TOOLCHAIN"
                || k.starts_with("RUSTC")
                || k.starts_with("CARGO")
                || k == "RUSTFLAGS"
                || k == "RUSTDOCFLAGS")
        {
            c.env_remove(&*k);
        }
    }
}
