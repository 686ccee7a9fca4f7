//! Named network namespaces (`/run/netns/<name>`, made by `ip netns add`) and work inside them.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

use crate::exec::tool;

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` sets up the `/run/netns` mount on first use; one at a time in this process.
static ADD_LOCK: Mutex<()> = Mutex::new(());

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn add(name: &str) -> Result<PathBuf> {
    let _guard = ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tool(&["ip", "netns", "add", name], None)?;
    Ok(path(name))
}

pub fn delete(name: &str) -> Result<()> {
    if !path(name).exists() {
        return Ok(());
    }
    tool(&["ip", "netns", "delete", name], None).map(drop)
}

/// Runs `f` on a short-lived thread that has entered the netns at `netns`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in {} panicked", netns.display()))?
    })
}

/// Sets sysctls (`net.ipv4.ip_forward` style keys) inside the netns.
pub fn sysctls(netns: &Path, values: &[(&str, &str)]) -> Result<()> {
    in_netns(netns, || {
        for (key, value) in values {
            let file = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&file, value).with_context(|| format!("sysctl {key}={value}"))?;
        }
        Ok(())
    })
}

/// `ip -n <netns> -batch -` with `script` (one `ip` command per line, without `ip`).
pub fn ip_batch(name: &str, script: &str) -> Result<()> {
    tool(&["ip", "-n", name, "-batch", "-"], Some(script)).map(drop)
}

/// Polls (bounded by `timeout`) until every listed device is LOWER_UP and the netns has no
/// tentative IPv6 address.
pub fn wait_ready(name: &str, devices: &[&str], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let links = tool(&["ip", "-n", name, "-o", "link", "show"], None)?;
        let up = devices.iter().all(|dev| {
            links.lines().any(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|n| n.trim().split('@').next() == Some(dev))
                    && l.contains("LOWER_UP")
            })
        });
        let tentative = tool(&["ip", "-n", name, "-6", "addr", "show", "tentative"], None)?;
        if up && tentative.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "netns {name} not ready after {timeout:?}: links:\n{links}\ntentative:\n{tentative}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs every process (except this one) whose netns is the one bound at `netns`.
pub fn kill_processes_in(netns: &Path) {
    let Ok(meta) = fs::metadata(netns) else {
        return;
    };
    let want = format!("net:[{}]", meta.ino());
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let link = fs::read_link(entry.path().join("ns/net"));
        if link.is_ok_and(|l| l.as_os_str() == want.as_str()) {
            // SAFETY: kill(2) of a process found in a namespace this harness owns.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}
