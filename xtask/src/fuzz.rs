//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a bounded time.
//!
//! The targets build with the nightly pinned for the eBPF crate (cargo-fuzz needs a nightly for
//! its sanitizer and coverage flags; one pinned nightly is enough to install). Each run reads
//! the committed seeds in `fuzz/corpus/<target>` and writes what it finds to a scratch corpus
//! in `target/fuzz-corpus/<target>`, so the committed corpus stays small. A crash leaves its
//! input in `fuzz/artifacts/<target>/` and fails the task.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf,
    cmd::{self, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds to fuzz each target.
    #[arg(long, env = "REDIRECT_FUZZ_SECONDS", default_value_t = 20)]
    pub seconds: u64,
    /// Build without AddressSanitizer (`cargo fuzz --sanitizer none`): faster, and the way out
    /// on a toolchain where the sanitizer runtime does not link. Panics are still found.
    #[arg(long, env = "REDIRECT_FUZZ_NO_SANITIZER")]
    pub no_sanitizer: bool,
    /// Targets to run (comma-separated in the environment); default: every file in
    /// fuzz/fuzz_targets.
    #[arg(env = "REDIRECT_FUZZ_TARGETS", value_delimiter = ',')]
    pub targets: Vec<String>,
}

/// How one target's run ended.
struct Run {
    target: String,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
    ok: bool,
}

/// What libFuzzer printed that the summary needs.
#[derive(Default)]
struct Seen {
    /// libFuzzer started (so the build succeeded).
    started: bool,
    executions: Option<u64>,
    exec_per_sec: Option<u64>,
}

pub fn run(o: &Options) -> Result<()> {
    let root = workspace_root();
    let targets = if o.targets.is_empty() {
        all_targets(&root.join("fuzz/fuzz_targets"))?
    } else {
        o.targets.clone()
    };
    ensure_cargo_fuzz()?;
    let nightly = build_ebpf::pinned_nightly()?;

    let mut runs = Vec::new();
    for target in &targets {
        runs.push(fuzz_one(&nightly, target, o)?);
    }

    println!();
    println!(
        "{:<14} {:>14} {:>12} result",
        "target", "executions", "exec/s"
    );
    for r in &runs {
        let show = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
        let (execs, rate) = (show(r.executions), show(r.exec_per_sec));
        let result = if r.ok { "ok" } else { "FAILED" };
        println!("{:<14} {execs:>14} {rate:>12} {result}", r.target);
    }
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing failed for {}: the crashing inputs are in fuzz/artifacts/<target>/",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Target names: the files in fuzz/fuzz_targets, sorted.
fn all_targets(dir: &Path) -> Result<Vec<String>> {
    let mut targets: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_string())
        })
        .collect();
    targets.sort();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}

/// Installs cargo-fuzz with the workspace's stable toolchain unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<()> {
    let version = cmd::cargo().args(["fuzz", "--version"]).output();
    if let Ok(out) = version
        && out.status.success()
    {
        print!("using {}", String::from_utf8_lossy(&out.stdout));
        return Ok(());
    }
    println!("installing cargo-fuzz");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz failed")
}

fn fuzz_one(nightly: &str, target: &str, o: &Options) -> Result<Run> {
    let root = workspace_root();
    let scratch = root.join("target/fuzz-corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;

    let mut c = Command::new("rustup");
    c.args(["run", nightly, "cargo", "fuzz", "run"]);
    if o.no_sanitizer {
        c.args(["--sanitizer", "none"]);
    }
    // libFuzzer writes new inputs to the first corpus directory only.
    c.arg(target)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", o.seconds))
        .arg("-print_final_stats=1")
        .current_dir(&root)
        .stderr(Stdio::piped());
    cmd::scrub_toolchain_env(&mut c);

    println!("fuzzing {target} for {} s", o.seconds);
    let mut child = c
        .spawn()
        .with_context(|| format!("could not start {c:?}"))?;
    // libFuzzer reports on stderr: pass it through and keep its final statistics.
    let mut seen = Seen::default();
    let stderr = child.stderr.take().expect("stderr is piped");
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz output")?;
        eprintln!("{line}");
        seen.started |= line.starts_with("INFO: Seed:");
        if let Some(n) = executed_units(&line) {
            seen.executions = Some(n);
        }
        if let Some(n) = stat(&line, "average_exec_per_sec") {
            seen.exec_per_sec = Some(n);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if !seen.started {
        // Nothing ran: the build failed, and it would fail the same way for every target.
        bail!(
            "{c:?} failed before fuzzing ({status}): see the build output above{}",
            if o.no_sanitizer {
                ""
            } else {
                "; if AddressSanitizer does not link, try --no-sanitizer"
            }
        );
    }
    if !status.success() {
        eprintln!("xtask: {c:?} failed: {status}");
    }
    Ok(Run {
        target: target.to_string(),
        executions: seen.executions,
        exec_per_sec: seen.exec_per_sec,
        ok: status.success(),
    })
}

/// libFuzzer's count of executed inputs, from its final statistics
/// (`stat::number_of_executed_units: N`) or its last status line (`#N DONE ...`).
fn executed_units(line: &str) -> Option<u64> {
    if let Some(n) = stat(line, "number_of_executed_units") {
        return Some(n);
    }
    let rest = line.strip_prefix('#')?;
    let (n, status) = rest.split_once(char::is_whitespace)?;
    if status.trim_start().starts_with("DONE") {
        return n.parse().ok();
    }
    None
}

/// A final statistic of libFuzzer (`-print_final_stats=1`): `stat::<name>: N`.
fn stat(line: &str, name: &str) -> Option<u64> {
    let rest = line
        .strip_prefix("stat::")?
        .strip_prefix(name)?
        .strip_prefix(':')?;
    rest.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{executed_units, stat};

    #[test]
    fn reads_the_execution_count_from_libfuzzer_output() {
        assert_eq!(
            executed_units("stat::number_of_executed_units: 1234567"),
            Some(1234567)
        );
        assert_eq!(
            executed_units(
                "#2097152\tDONE   cov: 312 ft: 1024 corp: 90/2Kb exec/s: 99864 rss: 60Mb"
            ),
            Some(2097152)
        );
        assert_eq!(executed_units("#1024\tpulse  cov: 300 ft: 900"), None);
        assert_eq!(executed_units("INFO: Seed: 42"), None);
        assert_eq!(
            stat(
                "stat::average_exec_per_sec:     51234",
                "average_exec_per_sec"
            ),
            Some(51234)
        );
    }
}
