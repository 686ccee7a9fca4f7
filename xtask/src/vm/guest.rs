//! The script the guest runs on the shared root: a node's mounts (pure cgroup v2, bpffs), the
//! kernel modules the tests use, then each step, each one's exit status printed as a marker the
//! harness reads back from the console.

use std::{fmt::Write, path::Path};

/// Console lines the guest prints for the harness.
pub const BEGIN: &str = "vm-test: begin";
pub const STEP: &str = "vm-test: step ";
pub const EXIT: &str = "vm-test: exit ";
pub const DONE: &str = "vm-test: done";

/// Modules the mini-cluster uses, loaded up front so a missing one fails loudly here rather
/// than as a test's odd netlink error. (Module autoloading works too: the shared root's kmod
/// finds the kernel's modules where the first init bound them.)
const TEST_MODULES: &str = "veth bridge nf_tables nft_chain_nat nf_nat nf_conntrack nft_ct \
nft_numgen nft_reject_inet nft_nat nft_masq nft_fib_inet nft_compat";

/// One command run in the guest, from `dir`.
pub struct Step {
    pub name: String,
    pub dir: String,
    pub argv: Vec<String>,
}

/// Fresh, empty filesystems over the shared root's own.
const SCRATCH: [&str; 2] = ["/tmp", "/run"];

/// The guest's script: mounts, modules, `env`, the steps, power off. `keep` are directories of
/// the shared root the steps use (the workspace); one below a scratch directory is carried over
/// the fresh mount.
pub fn script(steps: &[Step], env: &[(&str, String)], keep: &[&Path]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# The guest's PID 1 after switch_root.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
"#,
    );
    for dir in SCRATCH {
        let kept: Vec<String> = keep
            .iter()
            .filter(|k| k.starts_with(dir))
            .map(|k| quote(&k.display().to_string()))
            .collect();
        for (i, k) in kept.iter().enumerate() {
            let _ = writeln!(s, "mkdir -p /.vm-keep{i} && mount --bind {k} /.vm-keep{i}");
        }
        let _ = writeln!(s, "mount -t tmpfs tmpfs {dir}");
        for (i, k) in kept.iter().enumerate() {
            let _ = writeln!(s, "mkdir -p {k} && mount --move /.vm-keep{i} {k}");
        }
    }
    s.push_str(
        r#"# A node's layout: cgroup v2 alone at /sys/fs/cgroup, bpffs at /sys/fs/bpf.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
echo +cpu +memory +pids >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
ip link set lo up
hostname vm-test
echo /sbin/modprobe >/proc/sys/kernel/modprobe
for m in "#,
    );
    s.push_str(TEST_MODULES);
    s.push_str(
        r#"; do
  modprobe -q "$m" 2>/dev/null || echo "vm-test: note: module $m not loaded"
done
"#,
    );
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", quote(v));
    }
    let _ = writeln!(s, "echo '{BEGIN}' \"$(uname -r)\"");
    for step in steps {
        let argv: Vec<String> = step.argv.iter().map(|a| quote(a)).collect();
        let _ = writeln!(
            s,
            "echo '{STEP}{name}'\n(cd {dir} && {cmd}) </dev/null 2>&1\necho \"{EXIT}{name} $?\"",
            name = step.name,
            dir = quote(&step.dir),
            cmd = argv.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "echo '{DONE}'\nsync\necho o >/proc/sysrq-trigger\nsleep 60"
    );
    s
}

/// Single-quoted for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A step running a test binary with one test at a time (the tests share the node).
pub fn test_step(name: &str, binary: &Path, dir: &Path, filter: Option<&str>) -> Step {
    let mut argv = vec![
        binary.display().to_string(),
        "--test-threads=1".into(),
        "--color=never".into(),
    ];
    argv.extend(filter.map(str::to_string));
    Step {
        name: name.to_string(),
        dir: dir.display().to_string(),
        argv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_below_a_scratch_directory_is_carried_over_its_fresh_mount() {
        let s = script(&[], &[], &[Path::new("/tmp/ci.1"), Path::new("/work/w")]);
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(at("mount --bind '/tmp/ci.1' /.vm-keep0") < at("mount -t tmpfs tmpfs /tmp"));
        assert!(at("mount -t tmpfs tmpfs /tmp") < at("mount --move /.vm-keep0 '/tmp/ci.1'"));
        assert!(
            !s.contains("/work/w"),
            "only directories below /tmp or /run move: {s}"
        );
        assert!(s.contains("mount -t tmpfs tmpfs /run"));
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b c"), r"'a'\''b c'");
    }

    #[test]
    fn every_step_prints_its_start_and_exit_markers_in_order() {
        let steps = [
            test_step("e2e", Path::new("/w/t/e2e-1"), Path::new("/w/tests"), None),
            test_step("iso", Path::new("/w/t/iso"), Path::new("/w"), Some("one")),
        ];
        let s = script(&steps, &[("REDIRECT_AGENT_BIN", "/w/agent".into())], &[]);
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(at("export REDIRECT_AGENT_BIN='/w/agent'") < at(BEGIN));
        assert!(at(BEGIN) < at("vm-test: step e2e"));
        assert!(
            at("(cd '/w/tests' && '/w/t/e2e-1' '--test-threads=1' '--color=never')")
                < at("exit e2e $?")
        );
        assert!(at("exit e2e $?") < at("vm-test: step iso"));
        assert!(at("'/w/t/iso' '--test-threads=1' '--color=never' 'one'") < at(DONE));
    }
}
