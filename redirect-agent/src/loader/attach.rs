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
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, Program,
        links::{FdLink, PinnedLink},
    },
};
use redirect_common::{ALL_MAPS, ALL_PROGRAMS, RETIRED_MAPS};

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
}

#[derive(Clone, Debug)]
pub struct AttachReport {
    pub cgroup_root: PathBuf,
    pub links: Vec<(&'static str, LinkAction)>,
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

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&cfg.pin_dir)
        .load(OBJECT)
        .map_err(|e| LoaderError::Object {
            pin_dir: cfg.pin_dir.clone(),
            source: Box::new(e),
        })?;

    let mut links = Vec::new();
    for (name, link_name) in ALL_PROGRAMS {
        let perr = |reason: String| LoaderError::Program { name, reason };
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| perr("missing from the object".into()))?;
        load(prog).map_err(|e| perr(verifier_message(e)))?;
        let prog_fd = program_fd(prog).map_err(|e| perr(chain(&e)))?;
        let link_path = cfg.pin_dir.join(link_name);

        let mut action = LinkAction::Attached;
        if link_path.exists() {
            match reuse_link(&link_path, cgroup_id, prog_fd) {
                Ok(()) => {
                    links.push((name, LinkAction::Updated));
                    continue;
                }
                Err(reason) => {
                    tracing::info!(link = %link_path.display(), %reason, "replacing pinned link");
                    // Removing the pin drops the last reference: the kernel detaches the link.
                    fs::remove_file(&link_path).map_err(|e| LoaderError::Pin {
                        path: link_path.clone(),
                        reason: e.to_string(),
                    })?;
                    action = LinkAction::Replaced;
                }
            }
        }
        let fd_link = attach_new(prog, &cgroup).map_err(perr)?;
        fd_link.pin(&link_path).map_err(|e| LoaderError::Pin {
            path: link_path.clone(),
            reason: e.to_string(),
        })?;
        links.push((name, action));
    }
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
        },
    })
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
    for (_, link_name) in ALL_PROGRAMS {
        let path = pin_dir.join(link_name);
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
