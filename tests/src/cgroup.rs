//! cgroup v2 helpers: find the mount, build pod cgroups, kill and remove a subtree.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The cgroup2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in info.lines() {
        // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            return Ok(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    bail!("no cgroup2 filesystem in /proc/self/mountinfo")
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..=i + 3]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
