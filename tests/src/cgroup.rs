//! cgroup v2 helpers: find the mount, build pod cgroups, kill and remove a subtree.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The cgroup2 mount point, from `/proc/self/mountinfo` (the agent's own discovery).
pub fn cgroup2_mount() -> Result<PathBuf> {
    redirect_agent::cgroup::cgroup2_mount()
        .context("reading /proc/self/mountinfo")?
        .context("no cgroup2 filesystem in /proc/self/mountinfo")
}

/// Creates `dir` (one level; the parent must exist).
pub fn create(dir: &Path) -> Result<()> {
    fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// Sub-directories of a cgroup, children before parents (post-order), `root` last.
fn post_order(root: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 16 {
        return;
    }
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                post_order(&e.path(), depth + 1, out);
            }
        }
    }
    out.push(root.to_path_buf());
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in the subtree at `root` and removes all its directories. Bounded
/// (about 5 s); returns whether `root` is gone.
pub fn remove_tree(root: &Path) -> bool {
    if !root.exists() {
        return true;
    }
    // cgroup.kill (5.14+) kills the whole subtree at once; the pid walk covers older kernels.
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let me = std::process::id() as i32;
    loop {
        let mut dirs = Vec::new();
        post_order(root, 0, &mut dirs);
        for d in &dirs {
            for pid in pids_in(d) {
                if pid != me {
                    // SAFETY: plain kill(2) on a pid read from the cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for d in &dirs {
            let _ = fs::remove_dir(d);
        }
        if !root.exists() || Instant::now() >= deadline {
            return !root.exists();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
