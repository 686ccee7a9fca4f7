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

/// The guest's script: mounts, modules, `env`, the steps, power off.
pub fn script(steps: &[Step], env: &[(&str, String)]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# The guest's PID 1 after switch_root.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# A node's layout: cgroup v2 alone at /sys/fs/cgroup, bpffs at /sys/fs/bpf.
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
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b c"), r"'a'\''b c'");
    }

    #[test]
    fn every_step_prints_its_start_and_exit_markers_in_order() {
        let steps = [
            test_step("e2e", Path::new("/w/t/e2e-1"), Path::new("/w/tests"), None),
            test_step("iso", Path::new("/w/t/iso"), Path::new("/w"), Some("one")),
        ];
        let s = script(&steps, &[("REDIRECT_AGENT_BIN", "/w/agent".into())]);
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
