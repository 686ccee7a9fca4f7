//! `cargo xtask build-ebpf`: the one way the eBPF object is built.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, Program, SockOps},
};
use redirect_common::{GLOBAL_SOCK_OFFSETS, SockOffsets, TCP_CONNECT_FN};

use crate::cmd::{self, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Only build; skip loading the programs through the verifier.
    #[arg(long, env = "REDIRECT_NO_VERIFY")]
    pub no_verify: bool,
}

/// Where the object lands; the agent's build script embeds it from here.
pub fn object_path() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/redirect")
}

pub fn run(o: &Options) -> Result<()> {
    build()?;
    let obj = object_path();
    println!("built {}", obj.display());
    if o.no_verify {
        return Ok(());
    }
    if !cmd::is_root() {
        println!("not root: skipped loading the programs through the kernel verifier");
        return Ok(());
    }
    verify(&obj)
}

/// The nightly pinned in redirect-ebpf/rust-toolchain.toml (the one place it is written).
pub(crate) fn pinned_nightly() -> Result<String> {
    let path = workspace_root().join("redirect-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            let v = l.strip_prefix("channel")?.trim().strip_prefix('=')?.trim();
            Some(v.trim_matches('"').to_string())
        })
        .with_context(|| format!("{}: no channel line", path.display()))
}

/// `cargo <subcommand>` on redirect-ebpf with the pinned nightly, the release profile and the
/// eBPF target directory; target, `build-std` and flags come from redirect-ebpf/.cargo. The
/// build and its lints (`cargo xtask lint-ebpf`) both start here, so they see the same crate.
pub(crate) fn nightly_cargo(nightly: &str, subcommand: &str) -> Command {
    let root = workspace_root();
    let mut c = Command::new("rustup");
    c.args([
        "run",
        nightly,
        "cargo",
        subcommand,
        "--release",
        "--target-dir",
    ])
    .arg(root.join("target/ebpf"))
    .current_dir(root.join("redirect-ebpf"));
    cmd::scrub_toolchain_env(&mut c);
    c
}

pub fn build() -> Result<()> {
    let nightly = pinned_nightly()?;
    cmd::run(&mut nightly_cargo(&nightly, "build")).with_context(|| {
        format!("building the eBPF object with {nightly} failed; run ./x setup to install the toolchain and bpf-linker")
    })
}

/// Offsets as on x86_64 kernels of the last years: the verifier's answer does not depend on
/// them (`tcp_connect` reads through `bpf_probe_read_kernel`), but `ready` must be set, or the
/// verifier prunes the reads as dead code.
const VERIFY_SOCK_OFFSETS: SockOffsets = SockOffsets {
    ready: 1,
    family: 16,
    rcv_saddr: 4,
    num: 14,
    v6_rcv_saddr: 72,
    dport: 12,
    router_dport4: 15001u16.to_be(),
    router_dport6: 15001u16.to_be(),
};

/// Loads every program through the verifier, with maps pinned in a scratch directory that is
/// removed afterwards, and prints what the kernel accepted. The `fentry` record hook may be
/// refused by kernels before 5.11 (the agent then uses `sock_ops`): that is reported, not an
/// error.
pub fn verify(obj: &Path) -> Result<()> {
    let bpffs = PathBuf::from("/sys/fs/bpf");
    let scratch = bpffs.join(format!("redirect-verify-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| {
        format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf?)",
            scratch.display()
        )
    })?;
    let result = (|| -> Result<()> {
        let bytes = fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
        let mut ebpf: Ebpf = EbpfLoader::new()
            .default_map_pin_directory(&scratch)
            .override_global(GLOBAL_SOCK_OFFSETS, &VERIFY_SOCK_OFFSETS, true)
            .load(&bytes)
            .context("loading the object's maps")?;
        println!("{:<22} {:<20} {:>12}", "program", "type", "instructions");
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let prog = ebpf.program_mut(&name).expect("listed above");
            let kind = match prog {
                Program::CgroupSockAddr(p) => {
                    load(CgroupSockAddr::load(p), &name)?;
                    format!("cgroup_sock_addr/{:?}", p.info()?.program_type())
                }
                Program::SockOps(p) => {
                    load(SockOps::load(p), &name)?;
                    "sock_ops".to_string()
                }
                Program::FEntry(p) => {
                    let loaded = Btf::from_sys_fs()
                        .map_err(|e| anyhow::anyhow!("the kernel's BTF: {e}"))
                        .and_then(|btf| load(p.load(TCP_CONNECT_FN, &btf), &name));
                    if let Err(e) = loaded {
                        let first = format!("{e:#}");
                        let first = first.lines().next().unwrap_or_default();
                        println!(
                            "{name:<22} {:<20} {:>12}  ({first})",
                            "fentry", "not loaded"
                        );
                        continue;
                    }
                    "fentry".to_string()
                }
                other => bail!("unexpected program {name}: {:?}", other.prog_type()),
            };
            let info = match prog {
                Program::CgroupSockAddr(p) => p.info()?,
                Program::SockOps(p) => p.info()?,
                Program::FEntry(p) => p.info()?,
                _ => unreachable!(),
            };
            let insns = info.size_translated().unwrap_or(0) / 8;
            println!(
                "{name:<22} {:<20} {insns:>12}",
                kind.split('/').next().unwrap_or(&kind)
            );
        }
        Ok(())
    })();
    for entry in fs::read_dir(&scratch)?.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    fs::remove_dir(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    result
}

fn load(r: Result<(), aya::programs::ProgramError>, name: &str) -> Result<()> {
    r.map_err(|e| match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            anyhow::anyhow!("the verifier rejected {name}: {io_error}\n{verifier_log}")
        }
        e => anyhow::anyhow!("loading {name}: {e}"),
    })
}
