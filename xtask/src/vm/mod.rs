//! `cargo xtask vm-test <kernel>`: the privileged tests on other kernels, under QEMU.
//!
//! Each kernel is a stock Debian one ([`kernels`]), booted under software emulation with a
//! busybox initramfs ([`initramfs`]) that mounts this machine's root read-only over 9p under a
//! tmpfs overlay, so the guest runs the very binaries built here. The guest ([`guest`]) mounts a
//! node's filesystems (cgroup v2 alone, bpffs), prints the kernel check and what the verifier
//! accepted, runs the test binaries one test at a time, and powers off; [`qemu`] reads the
//! result back from the console. See docs/compatibility.md.

mod cpio;
mod guest;
mod initramfs;
pub mod kernels;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf,
    cmd::{self, cargo, workspace_root},
};

/// The test binaries (of `redirect-tests`) a kernel must pass, in the order they run.
pub const SUITES: [&str; 2] = ["e2e", "isolation"];

#[derive(clap::Args)]
pub struct Options {
    /// A kernel series (5.10, 6.1, 6.12, 7.3), `all`, or a path to a vmlinuz inside an
    /// unpacked tree (`<tree>/boot/vmlinuz-<release>` beside `<tree>/lib/modules/<release>`).
    pub kernel: String,
    /// Test binaries of redirect-tests to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = SUITES.map(String::from))]
    pub suites: Vec<String>,
    /// Only run tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Look for a newer kernel of each series in the archive.
    #[arg(long)]
    pub refresh: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1024..=65536))]
    pub memory: u32,
    /// Guest CPUs (emulated threads; at most the host's).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Minutes one kernel may take, boot to power-off.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout_minutes: u64,
    /// Skip building (use what is in target/ already).
    #[arg(long)]
    pub no_build: bool,
    /// Also run the connect benchmark in the guest (`bench_connect`, 3 rounds x 2 s) and print
    /// its tables: on kernels with `fentry` it measures both record hooks side by side. The
    /// guest is emulated, so only its ratios mean anything.
    #[arg(long)]
    pub bench_connect: bool,
}

impl Options {
    /// What `cargo xtask test` runs: every suite, binaries already built.
    pub fn for_test(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_string(),
            suites: SUITES.map(String::from).to_vec(),
            filter: None,
            refresh: false,
            memory: 4096,
            cpus: 2,
            timeout_minutes: 30,
            no_build: true,
            bench_connect: false,
        }
    }
}

/// Where kernels, initramfs images, logs and results go.
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target/vm")
}

/// One kernel's outcome, for the summary and target/vm/<label>.json.
struct Outcome {
    label: String,
    release: String,
    passed: bool,
    lines: Vec<String>,
}

pub fn run(o: &Options) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "vm-test needs root (the guest runs the privileged tests as root on this machine's binaries)"
        );
    }
    let targets = targets(&o.kernel)?;
    let binaries = if o.no_build {
        test_binaries(&o.suites, false)?
    } else {
        build_ebpf::build()?;
        cmd::run(cargo().args(["build", "--workspace", "--bins"]))?;
        if o.bench_connect {
            cmd::run(
                cargo()
                    .args(["build", "--release", "-p", "redirect-tests"])
                    .args(["--bin", "bench_connect"]),
            )?;
        }
        test_binaries(&o.suites, true)?
    };
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let kernel = match target {
            Target::Series(s) => kernels::fetch(s, &cache, o.refresh)?,
            Target::Path(p) => kernel_at(p)?,
        };
        outcomes.push(run_kernel(o, &kernel, &binaries, &cache)?);
    }
    println!("\nvm-test summary");
    for out in &outcomes {
        println!(
            "  {:<6} {:<24} {}",
            out.label,
            out.release,
            if out.passed { "passed" } else { "FAILED" }
        );
        for l in &out.lines {
            println!("      {l}");
        }
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test failed on {} (consoles in {}/<kernel>.log)",
            failed.join(", "),
            cache.display()
        );
    }
    Ok(())
}

enum Target {
    Series(String),
    Path(PathBuf),
}

fn targets(kernel: &str) -> Result<Vec<Target>> {
    if kernel == "all" {
        return Ok(kernels::SERIES
            .iter()
            .map(|s| Target::Series(s.to_string()))
            .collect());
    }
    if kernels::SERIES.contains(&kernel) {
        return Ok(vec![Target::Series(kernel.to_string())]);
    }
    let path = PathBuf::from(kernel);
    if path.is_file() {
        return Ok(vec![Target::Path(path)]);
    }
    bail!(
        "kernel {kernel:?}: not a known series ({}), `all`, or an existing vmlinuz file",
        kernels::SERIES.join(", ")
    )
}

/// A vmlinuz given by path: `<tree>/boot/vmlinuz-<release>` with `<tree>/lib/modules/<release>`.
fn kernel_at(vmlinuz: &Path) -> Result<kernels::Kernel> {
    let vmlinuz =
        fs::canonicalize(vmlinuz).with_context(|| format!("resolving {}", vmlinuz.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .with_context(|| {
            format!(
                "{}: expected a file named vmlinuz-<release>",
                vmlinuz.display()
            )
        })?
        .to_string();
    let tree = vmlinuz
        .parent()
        .and_then(Path::parent)
        .with_context(|| {
            format!(
                "{}: expected <tree>/boot/vmlinuz-<release>",
                vmlinuz.display()
            )
        })?
        .to_path_buf();
    let modules = tree.join("lib/modules").join(&release);
    if !modules.join("modules.dep").is_file() {
        bail!(
            "{}: no {}/modules.dep beside it (unpack the kernel's modules there and run \
             `depmod -b {} {release}`)",
            vmlinuz.display(),
            modules.display(),
            tree.display()
        );
    }
    Ok(kernels::Kernel {
        series: release.clone(),
        package_version: "(given by path)".into(),
        release,
        root: tree,
        vmlinuz,
    })
}

/// Builds the test binaries (unless `build` is false) and returns (suite, executable) pairs,
/// from cargo's own report of what it built.
fn test_binaries(suites: &[String], build: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "redirect-tests",
        "--no-run",
        "--message-format=json",
    ]);
    if !build {
        c.arg("--offline");
    }
    for s in suites {
        c.args(["--test", s]);
    }
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries {} failed", suites.join(", "));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        if suites.iter().any(|s| s == name) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for s in suites {
        if !found.iter().any(|(n, _)| n == s) {
            bail!("no test binary {s} in redirect-tests (its tests/{s}.rs)");
        }
    }
    found.sort_by_key(|(n, _)| suites.iter().position(|s| s == n));
    Ok(found)
}

fn run_kernel(
    o: &Options,
    kernel: &kernels::Kernel,
    binaries: &[(String, PathBuf)],
    cache: &Path,
) -> Result<Outcome> {
    let label = kernel.series.clone();
    let root = workspace_root();
    let bin = |name: &str| root.join("target/debug").join(name).display().to_string();
    let mut steps = vec![
        guest::Step {
            name: "kernel-check".into(),
            dir: root.display().to_string(),
            argv: vec![bin("redirect-agent"), "kernel-check".into()],
        },
        guest::Step {
            name: "verifier".into(),
            dir: root.display().to_string(),
            argv: vec![bin("xtask"), "verify-ebpf".into()],
        },
    ];
    for (suite, exe) in binaries {
        steps.push(guest::test_step(
            suite,
            exe,
            &root.join("tests"),
            o.filter.as_deref(),
        ));
    }
    if o.bench_connect {
        steps.push(guest::Step {
            name: "bench-connect".into(),
            dir: root.display().to_string(),
            argv: vec![
                root.join("target/release/bench_connect")
                    .display()
                    .to_string(),
                "--rounds".into(),
                "3".into(),
                "--seconds".into(),
                "2".into(),
            ],
        });
    }
    let env = [
        ("REDIRECT_AGENT_BIN", bin("redirect-agent")),
        ("RUST_BACKTRACE", "1".into()),
    ];
    let script = guest::script(&steps, &env, &[&root]);
    let initrd = cache.join(format!("initramfs-{label}.cpio"));
    initramfs::write(
        &initramfs::Layout {
            release: &kernel.release,
            tree: &kernel.root,
            guest_script: &script,
        },
        &initrd,
    )?;
    let log = cache.join(format!("{label}.log"));
    println!(
        "vm: booting {} ({} {}) under QEMU (emulated: expect the tests to run 10-30x slower)",
        kernel.release, label, kernel.package_version
    );
    let started = Instant::now();
    let report = qemu::boot(&qemu::Machine {
        vmlinuz: &kernel.vmlinuz,
        initramfs: &initrd,
        memory_mib: o.memory,
        cpus: o.cpus,
        log: &log,
        label: &label,
        timeout: Duration::from_secs(o.timeout_minutes * 60),
    })?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let outcome = summarize(&label, kernel, &report, minutes);
    let json = serde_json::json!({
        "series": label,
        "package_version": kernel.package_version,
        "release": report.release.clone().unwrap_or_else(|| kernel.release.clone()),
        "passed": outcome.passed,
        "minutes": (minutes * 10.0).round() / 10.0,
        "steps": report.steps.iter().map(|(n, c)| serde_json::json!({"name": n, "exit": c})).collect::<Vec<_>>(),
        "summary": outcome.lines,
    });
    let path = cache.join(format!("{label}.json"));
    fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(outcome)
}

/// The lines worth keeping per kernel: libtest's result lines, skips (a skip inside the guest
/// means the guest lacks something, so it fails the kernel), the verifier table.
fn summarize(label: &str, kernel: &kernels::Kernel, r: &qemu::Report, minutes: f64) -> Outcome {
    let mut lines = Vec::new();
    let mut skipped = false;
    // The kernel lists programs in no fixed order.
    let mut verifier = Vec::new();
    if let Some(why) = &r.boot_failure {
        lines.push(format!("boot failed: {why}"));
    }
    for (step, out) in &r.output {
        let exit = r
            .steps
            .iter()
            .find(|(n, _)| n == step)
            .and_then(|(_, c)| *c);
        for l in out {
            let l = l.trim();
            if l.starts_with("test result:") {
                lines.push(format!("{step}: {l}"));
            } else if l.starts_with("SKIP ") {
                skipped = true;
                lines.push(format!("{step}: {l}"));
            } else if step == "verifier" && !l.is_empty() && !l.starts_with("program") {
                verifier.push(format!(
                    "verifier: {}",
                    l.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
        if exit != Some(0) {
            lines.push(format!("{step}: exit {exit:?}"));
        }
    }
    verifier.sort();
    lines.splice(0..0, verifier);
    if !r.done {
        lines.push("the guest did not reach its end".into());
    }
    lines.push(format!("{minutes:.1} min"));
    Outcome {
        label: label.to_string(),
        release: r.release.clone().unwrap_or_else(|| kernel.release.clone()),
        passed: r.passed() && !skipped,
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_a_series_all_or_an_existing_file() {
        assert!(matches!(&targets("6.12").unwrap()[..], [Target::Series(s)] if s == "6.12"));
        assert_eq!(targets("all").unwrap().len(), kernels::SERIES.len());
        let err = targets("6.2").err().unwrap().to_string();
        assert!(
            err.contains("\"6.2\"") && err.contains("5.10, 6.1, 6.12, 7.3"),
            "{err}"
        );
    }

    #[test]
    fn a_vmlinuz_outside_an_unpacked_tree_is_refused_with_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("vm-test-kernel-at-{}", std::process::id()));
        let boot = dir.join("boot");
        fs::create_dir_all(&boot).unwrap();
        let odd = boot.join("bzImage");
        fs::write(&odd, b"").unwrap();
        let vmlinuz = boot.join("vmlinuz-6.8.0-1-amd64");
        fs::write(&vmlinuz, b"").unwrap();
        let named = kernel_at(&odd).err().unwrap().to_string();
        let no_modules = kernel_at(&vmlinuz).err().unwrap().to_string();
        let modules = dir.join("lib/modules/6.8.0-1-amd64");
        fs::create_dir_all(&modules).unwrap();
        fs::write(modules.join("modules.dep"), b"").unwrap();
        let found = kernel_at(&vmlinuz).map(|k| (k.release, k.root));
        let canonical = fs::canonicalize(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(named.contains("vmlinuz-<release>"), "{named}");
        assert!(
            no_modules.contains("modules.dep") && no_modules.contains("depmod"),
            "{no_modules}"
        );
        let (release, root) = found.unwrap();
        assert_eq!(release, "6.8.0-1-amd64");
        assert_eq!(root, canonical);
    }
}
