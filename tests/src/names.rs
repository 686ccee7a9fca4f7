//! Names of everything a mini-cluster creates outside its own namespaces, and the sweep of
//! leftovers from processes that died without cleaning up.
//!
//! Every cluster gets an id `rdt-<pid>-<start>-<seq>`: the creating process's pid, its start
//! time (field 22 of `/proc/<pid>/stat`, base 36) and a per-process counter. Together they are
//! unique across processes and pid reuse, and they tell the sweep whether the creator still
//! lives. Netns names are `<id>-node` and `<id>-p<N>`, the cgroup dir is
//! `<cgroup2 mount>/<id>`, the work dir is `<temp dir>/<id>`.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{cgroup, netns};

/// Prefix of every name the harness creates.
pub const PREFIX: &str = "rdt-";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh cluster id for this process.
pub(crate) fn new_cluster_id() -> std::io::Result<String> {
    let pid = std::process::id();
    let start = start_time(pid)?.unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(format!("{PREFIX}{pid}-{}-{seq}", base36(start)))
}

/// Start time of `pid` in clock ticks since boot, `None` when no such process exists.
fn start_time(pid: u32) -> std::io::Result<Option<u64>> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // rest starts at field 3 (state); the start time is field 22.
    Ok(rest.split_whitespace().nth(19).and_then(|s| s.parse().ok()))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

fn parse_base36(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 36).ok()
}

/// The cluster id at the start of a harness-made name, and whether its creator is gone.
/// Names not made by the harness give `None`.
fn owner_is_dead(name: &str) -> Option<bool> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(4, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let start = parse_base36(parts.next()?)?;
    let _seq: u32 = parts.next()?.parse().ok()?;
    if pid == 0 {
        return None;
    }
    match start_time(pid) {
        Ok(None) => Some(true),
        Ok(Some(now)) => Some(now != start),
        Err(_) => Some(false),
    }
}

/// `n` random bytes from the kernel.
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A random version-4 UUID string, as Kubernetes uses for `metadata.uid`.
pub(crate) fn random_uuid() -> std::io::Result<String> {
    let mut b: [u8; 16] = random_bytes()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// What [`sweep_leftovers`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Network namespace names deleted from `/run/netns`.
    pub netns: Vec<String>,
    /// Cgroup directories removed (with everything below them).
    pub cgroups: Vec<String>,
    /// Work directories removed from the temp dir.
    pub workdirs: Vec<String>,
    /// Agent pin directories removed from bpffs (links detached, map pins removed).
    pub pins: Vec<String>,
}

/// Removes the namespaces, cgroups and work dirs of mini-clusters whose creating process is
/// dead (crashed or killed runs). Leftovers of live processes are never touched, so parallel
/// test processes are safe. [`crate::MiniCluster::new`] calls this once per process.
pub fn sweep_leftovers() -> Swept {
    let mut swept = Swept::default();
    for name in list_dir(Path::new(netns::NETNS_DIR)) {
        if owner_is_dead(&name) == Some(true) {
            netns::kill_processes_in(&Path::new(netns::NETNS_DIR).join(&name));
            if netns::delete(&name).is_ok() {
                swept.netns.push(name);
            }
        }
    }
    if let Ok(mount) = cgroup::cgroup2_mount() {
        for name in list_dir(&mount) {
            if owner_is_dead(&name) == Some(true) && cgroup::remove_tree(&mount.join(&name)) {
                swept.cgroups.push(name);
            }
        }
    }
    let bpffs = Path::new(crate::agent::BPFFS);
    for name in list_dir(bpffs) {
        if owner_is_dead(&name) == Some(true)
            && redirect_agent::loader::cleanup(&bpffs.join(&name)).is_ok()
        {
            swept.pins.push(name);
        }
    }
    let tmp = std::env::temp_dir();
    for name in list_dir(&tmp) {
        if owner_is_dead(&name) == Some(true) && fs::remove_dir_all(tmp.join(&name)).is_ok() {
            swept.workdirs.push(name);
        }
    }
    swept
}

fn list_dir(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect()
}

/// A name that looks like one of ours, owned by `pid` with start time `start` (for tests of
/// the sweep).
#[doc(hidden)]
pub fn name_for_owner(pid: u32, start: u64, seq: u32) -> String {
    format!("{PREFIX}{pid}-{}-{seq}", base36(start))
}

/// This process's start time as the ids encode it (for tests of the sweep).
#[doc(hidden)]
pub fn own_start_time() -> u64 {
    start_time(std::process::id()).ok().flatten().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back_and_own_process_is_alive() {
        let id = new_cluster_id().unwrap();
        assert!(id.starts_with(PREFIX));
        assert_eq!(owner_is_dead(&id), Some(false));
        assert_eq!(owner_is_dead(&format!("{id}-node")), Some(false));
        assert_eq!(owner_is_dead(&format!("{id}-p12")), Some(false));
    }

    #[test]
    fn reused_pid_with_other_start_time_counts_as_dead() {
        let name = name_for_owner(std::process::id(), own_start_time() + 1, 0);
        assert_eq!(owner_is_dead(&name), Some(true));
    }

    #[test]
    fn foreign_names_are_never_ours() {
        for n in [
            "rdt",
            "rdt-",
            "rdt-x-1-0",
            "cni-1234",
            "rdt-0-1-0",
            "rdt-12-zz",
        ] {
            assert_eq!(owner_is_dead(n), None, "{n}");
        }
    }

    #[test]
    fn uuids_look_like_kubernetes_uids() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
        assert_eq!(u.matches('-').count(), 4);
        assert_ne!(u, random_uuid().unwrap());
    }

    #[test]
    fn base36_round_trips() {
        for n in [0, 1, 35, 36, 123_456_789, u64::MAX] {
            assert_eq!(parse_base36(&base36(n)), Some(n));
        }
    }
}
