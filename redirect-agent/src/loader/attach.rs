//! Load, attach, pin; and the explicit cleanup that removes all of it.

use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, Program,
        links::{FdLink, PinnedLink},
    },
};
use redirect_common::{
    ALL_MAPS, ALL_PROGRAMS, CGROUP_PROGRAMS, GLOBAL_SOCK_OFFSETS, PROG_SOCK_OPS, PROG_TCP_CONNECT,
    RECORD_PROGRAMS, RETIRED_MAPS, SOCK_DPORT_OFFSET, SockOffsets, TCP_CONNECT_FN,
};

use super::{OBJECT, bpffs::ensure_bpffs, sys};
use crate::error_chain::chain;

/// Where the programs go.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// The bpffs mount (mounted when missing).
    pub bpffs: PathBuf,
    /// Directory of all pins, below `bpffs`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the programs attach to (all pods must sit below it).
    pub cgroup_root: PathBuf,
    /// Which program records router-bound connections.
    pub record_hook: RecordHook,
    /// The router's ports (IPv4, IPv6; 0 for none): the `fentry` record hook looks at
    /// connects to these only.
    pub router_ports: [u16; 2],
}

/// Which program hands a router-bound connection's original destination to `conns_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordHook {
    /// `fentry` on `tcp_connect()` where the kernel allows it, else `sock_ops`.
    #[default]
    Auto,
    /// `fentry` on `tcp_connect()`, once per TCP connect (Linux 5.11+); the agent refuses to
    /// start without it.
    Fentry,
    /// `sock_ops` at the cgroup root, which the kernel runs for every callback of every socket
    /// below it (~9 runs per connection).
    SockOps,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup root {path}: {source}")]
    CgroupRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object (maps pinned in {pin_dir}): {source}")]
    Object {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {reason}")]
    Program { name: &'static str, reason: String },
    #[error("{0}")]
    Kernel(String),
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

/// What happened to each program's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// No link was pinned: attached and pinned a new one.
    Attached,
    /// A pinned link on the same cgroup now runs the new program (swapped in place).
    Updated,
    /// A pinned link on another cgroup (or unusable) was removed and a new one attached.
    Replaced,
    /// A new link took the pin over (tracing links cannot swap programs): the old one ran until
    /// then and was detached as its pin went.
    Relinked,
}

#[derive(Clone, Debug)]
pub struct AttachReport {
    pub cgroup_root: PathBuf,
    pub links: Vec<(&'static str, LinkAction)>,
    /// The record hook attached, and why `fentry` was not (set only when `auto` fell back).
    pub record: &'static str,
    pub record_fallback: Option<String>,
}

/// The loaded object; its maps are taken by `KernelMaps`. Links live on in their pins, so
/// dropping this (or the process dying) leaves the data path in place.
pub struct Attached {
    pub ebpf: Ebpf,
    pub report: AttachReport,
}

/// Loads the programs, reuses pinned maps, and attaches (or updates) one pinned link per program
/// at the cgroup root.
pub fn attach(cfg: &LoaderConfig) -> Result<Attached, LoaderError> {
    ensure_bpffs(&cfg.bpffs).map_err(|source| LoaderError::Bpffs {
        path: cfg.bpffs.clone(),
        source,
    })?;
    fs::create_dir_all(&cfg.pin_dir).map_err(|source| LoaderError::Bpffs {
        path: cfg.pin_dir.clone(),
        source,
    })?;
    let cg_err = |source| LoaderError::CgroupRoot {
        path: cfg.cgroup_root.clone(),
        source,
    };
    let cgroup = fs::File::open(&cfg.cgroup_root).map_err(cg_err)?;
    let cgroup_id = cgroup.metadata().map_err(cg_err)?.ino();
    let kernel = super::kernel_check::probe();
    for (need, answer) in &kernel.answers {
        if let super::kernel_check::Answer::Unknown(why) = answer {
            tracing::warn!(need = need.what, %why, "cannot tell whether the kernel has this");
        }
    }
    if let Some(why) = kernel.refusal() {
        return Err(LoaderError::Kernel(why));
    }

    // The offsets are looked up first: they are baked into the object as it loads.
    let offsets = match cfg.record_hook {
        RecordHook::SockOps => Err("--record-hook sock-ops".to_string()),
        _ => super::sock_btf::from_kernel().and_then(|o| fentry_globals(o, cfg.router_ports)),
    };
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&cfg.pin_dir);
    if let Ok(offsets) = &offsets {
        loader.override_global(GLOBAL_SOCK_OFFSETS, offsets, true);
    }
    let mut ebpf = loader.load(OBJECT).map_err(|e| LoaderError::Object {
        pin_dir: cfg.pin_dir.clone(),
        source: Box::new(e),
    })?;

    let mut links = Vec::new();
    for (name, link_name) in CGROUP_PROGRAMS {
        let link = cfg.pin_dir.join(link_name);
        let action = attach_at_cgroup(&mut ebpf, name, &link, &cgroup, cgroup_id)?;
        links.push((name, action));
    }
    let (record, record_fallback) = match offsets.and_then(|_| attach_fentry(&mut ebpf, cfg)) {
        Ok(action) => {
            links.push((PROG_TCP_CONNECT, action));
            (PROG_TCP_CONNECT, None)
        }
        Err(why) if cfg.record_hook == RecordHook::Fentry => {
            return Err(LoaderError::Program {
                name: PROG_TCP_CONNECT,
                reason: format!("{why} (--record-hook fentry; auto falls back to sock_ops)"),
            });
        }
        Err(why) => {
            let link = cfg.pin_dir.join(RECORD_PROGRAMS[1].1);
            let action = attach_at_cgroup(&mut ebpf, PROG_SOCK_OPS, &link, &cgroup, cgroup_id)?;
            links.push((PROG_SOCK_OPS, action));
            // Only now that sock_ops records does an earlier fentry link go.
            remove_pin(&cfg.pin_dir.join(RECORD_PROGRAMS[0].1))?;
            let fallback = (cfg.record_hook == RecordHook::Auto).then_some(why);
            (PROG_SOCK_OPS, fallback)
        }
    };
    // No program of ours uses them any more: their pins only hold kernel memory.
    for map in RETIRED_MAPS {
        let path = cfg.pin_dir.join(map);
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(pin = %path.display(), "removed a map earlier versions used"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(pin = %path.display(), error = %e, "cannot remove a retired map")
            }
        }
    }
    Ok(Attached {
        ebpf,
        report: AttachReport {
            cgroup_root: cfg.cgroup_root.clone(),
            links,
            record,
            record_fallback,
        },
    })
}

/// The `fentry` program's globals: this kernel's offsets and the router's ports.
fn fentry_globals(mut o: SockOffsets, router_ports: [u16; 2]) -> Result<SockOffsets, String> {
    if o.dport as usize != SOCK_DPORT_OFFSET {
        return Err(format!(
            "this kernel's struct sock has skc_dport at byte {}, the program reads byte \
             {SOCK_DPORT_OFFSET}",
            o.dport
        ));
    }
    o.router_dport4 = router_ports[0].to_be();
    o.router_dport6 = router_ports[1].to_be();
    Ok(o)
}

/// Loads `name` and runs it at the cgroup root (`cgroup`, whose id is `cgroup_id`) through the
/// link pinned at `link_path`: the pinned link is updated in place when it is on this cgroup,
/// replaced otherwise.
fn attach_at_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    link_path: &Path,
    cgroup: &fs::File,
    cgroup_id: u64,
) -> Result<LinkAction, LoaderError> {
    let perr = |reason: String| LoaderError::Program { name, reason };
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| perr("missing from the object".into()))?;
    load(prog).map_err(|e| perr(verifier_message(e)))?;
    let prog_fd = program_fd(prog).map_err(|e| perr(chain(&e)))?;
    let mut action = LinkAction::Attached;
    if link_path.exists() {
        match reuse_link(link_path, cgroup_id, prog_fd) {
            Ok(()) => return Ok(LinkAction::Updated),
            Err(reason) => {
                tracing::info!(link = %link_path.display(), %reason, "replacing pinned link");
                // Removing the pin drops the last reference: the kernel detaches the link.
                remove_pin(link_path)?;
                action = LinkAction::Replaced;
            }
        }
    }
    let fd_link = attach_new(prog, cgroup).map_err(perr)?;
    fd_link.pin(link_path).map_err(|e| LoaderError::Pin {
        path: link_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(action)
}

/// Loads and attaches the `fentry` record hook, pins its link over the previous one (a rename:
/// the old link records until the new one runs), then removes a `sock_ops` link left by an
/// earlier start. An error says why the kernel would not have it.
fn attach_fentry(ebpf: &mut Ebpf, cfg: &LoaderConfig) -> Result<LinkAction, String> {
    let Some(Program::FEntry(prog)) = ebpf.program_mut(PROG_TCP_CONNECT) else {
        return Err("missing from the object".into());
    };
    let btf = Btf::from_sys_fs().map_err(|e| format!("the kernel's BTF: {}", chain(&e)))?;
    prog.load(TCP_CONNECT_FN, &btf).map_err(|e| match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            format!("the kernel refused an fentry program on {TCP_CONNECT_FN}: {io_error} {last}")
                .trim_end()
                .to_string()
        }
        e => chain(&e),
    })?;
    let id = prog
        .attach()
        .map_err(|e| format!("attaching to {TCP_CONNECT_FN}: {}", chain(&e)))?;
    let link: FdLink = prog.take_link(id).map_err(|e| chain(&e))?.into();
    let path = cfg.pin_dir.join(RECORD_PROGRAMS[0].1);
    let tmp = fentry_tmp_pin(&cfg.pin_dir);
    let _ = fs::remove_file(&tmp);
    let action = if path.exists() {
        LinkAction::Relinked
    } else {
        LinkAction::Attached
    };
    link.pin(&tmp)
        .map_err(|e| format!("pin {}: {e}", tmp.display()))?;
    fs::rename(&tmp, &path).map_err(|e| format!("pin {}: {e}", path.display()))?;
    remove_pin(&cfg.pin_dir.join(RECORD_PROGRAMS[1].1)).map_err(|e| e.to_string())?;
    Ok(action)
}

/// Where a new `fentry` link is pinned before it is renamed over the old one (bpffs refuses
/// names with a dot).
fn fentry_tmp_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("{}_new", RECORD_PROGRAMS[0].1))
}

/// Removes a pin if present; a link's last reference goes with it, which detaches it.
fn remove_pin(path: &Path) -> Result<(), LoaderError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LoaderError::Pin {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        _ => Ok(()),
    }
}

fn load(prog: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match prog {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

fn program_fd(prog: &Program) -> Result<i32, aya::programs::ProgramError> {
    Ok(match prog {
        Program::CgroupSockAddr(p) => p.fd()?.as_fd().as_raw_fd(),
        Program::SockOps(p) => p.fd()?.as_fd().as_raw_fd(),
        _ => return Err(aya::programs::ProgramError::UnexpectedProgramType),
    })
}

fn verifier_message(e: aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("rejected by the verifier: {io_error}\n{verifier_log}"),
        e => chain(&e),
    }
}

fn reuse_link(path: &Path, cgroup_id: u64, prog_fd: i32) -> Result<(), String> {
    let link = sys::obj_get(path).map_err(|e| format!("cannot open: {e}"))?;
    let (_, attached_to) = sys::cgroup_link_info(&link).map_err(|e| format!("no info: {e}"))?;
    if attached_to != cgroup_id {
        return Err(format!(
            "attached to cgroup {attached_to}, configured root is {cgroup_id}"
        ));
    }
    sys::link_update(&link, prog_fd).map_err(|e| format!("update failed: {e}"))
}

fn attach_new(prog: &mut Program, cgroup: &fs::File) -> Result<FdLink, String> {
    // bpf_link cgroup attachments always coexist with other programs on the cgroup (a CNI's
    // socket load balancer), and the kernel rejects any flag on them: the mode must be 0.
    let mode = CgroupAttachMode::Single;
    match prog {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, mode).map_err(|e| chain(&e))?;
            let link = p.take_link(id).map_err(|e| chain(&e))?;
            FdLink::try_from(link).map_err(|e| chain(&e))
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode).map_err(|e| chain(&e))?;
            let link = p.take_link(id).map_err(|e| chain(&e))?;
            FdLink::try_from(link).map_err(|e| chain(&e))
        }
        _ => Err("unexpected program type".into()),
    }
}

/// Removes every link (detaching the programs), map pin and the pin directory. Returns what it
/// removed. Missing pieces are not an error: cleanup is idempotent.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let pin_err = |path: &Path, e: String| LoaderError::Pin {
        path: path.to_path_buf(),
        reason: e,
    };
    let links = ALL_PROGRAMS.iter().map(|(_, link)| pin_dir.join(link));
    for path in links.chain([fentry_tmp_pin(pin_dir)]) {
        if path.exists() {
            let link = PinnedLink::from_pin(&path).map_err(|e| pin_err(&path, e.to_string()))?;
            let fd: FdLink = link.unpin().map_err(|e| pin_err(&path, e.to_string()))?;
            drop(fd);
            removed.push(path);
        }
    }
    // The persisted last good state (a pinned map the agent creates itself) goes too.
    let state = [
        crate::agent::last_good::STATE_PIN,
        crate::agent::last_good::STATE_PIN_TMP,
    ];
    for map in ALL_MAPS.iter().chain(&RETIRED_MAPS).copied().chain(state) {
        let path = pin_dir.join(map);
        if path.exists() {
            fs::remove_file(&path).map_err(|e| pin_err(&path, e.to_string()))?;
            removed.push(path);
        }
    }
    // Anything else in the directory is not ours to remove; rmdir fails loudly if so.
    fs::remove_dir(pin_dir).map_err(|e| pin_err(pin_dir, e.to_string()))?;
    removed.push(pin_dir.to_path_buf());
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(dport: u32) -> SockOffsets {
        SockOffsets {
            ready: 1,
            family: 16,
            rcv_saddr: 4,
            num: 14,
            v6_rcv_saddr: 72,
            dport,
            router_dport4: 0,
            router_dport6: 0,
        }
    }

    #[test]
    fn the_fentry_globals_carry_the_router_ports_in_network_order() {
        let o = fentry_globals(offsets(12), [15001, 0]).unwrap();
        assert_eq!(o.router_dport4.to_ne_bytes(), 15001u16.to_be_bytes());
        assert_eq!(o.router_dport6, 0);
        assert_eq!((o.family, o.v6_rcv_saddr), (16, 72));
    }

    #[test]
    fn a_kernel_whose_skc_dport_moved_gets_no_fentry_hook() {
        let e = fentry_globals(offsets(16), [15001, 15001]).unwrap_err();
        assert!(e.contains("skc_dport at byte 16"), "{e}");
    }
}
