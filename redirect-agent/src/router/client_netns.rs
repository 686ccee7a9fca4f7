//! Upstream sockets in the client pod's network namespace, so the upstream sees a connection
//! exactly like the client's own: its source address, its NetworkPolicy, its ClusterIP
//! translation (as Istio ambient's ztunnel does in its in-pod mode).
//!
//! A pod is known by its address (the router sees it untranslated). From the node's pods the
//! agent knows address → pod UID; the UID names the pod's cgroup (`.../pod<uid>` with the
//! cgroupfs driver, `...-pod<uid>.slice` with systemd); any process in it or in its
//! containers' cgroups (the sandbox "pause" container at least) is in the pod's network
//! namespace: `<proc>/<pid>/ns/net`. The namespace is kept open per pod (an fd) until the pod
//! leaves the node. Sockets are made by one dedicated thread that enters the namespace,
//! calls `socket()` and returns to the node's namespace: a socket keeps the namespace it was
//! created in, and no runtime thread ever changes namespace.
//!
//! A client that is no known pod (a host-network process, or a pod the agent has not synced
//! yet) gets its upstream socket in the node's namespace.

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cgroup::pod_uid_of_cgroup;

/// Most cgroup directories visited to find one pod's cgroup, and the deepest level.
const MAX_CGROUP_ENTRIES: usize = 100_000;
const MAX_CGROUP_DEPTH: usize = 8;

/// Where an upstream socket is made.
pub enum Place {
    /// The node's network namespace (the router's own).
    Node,
    /// The client pod's namespace.
    Pod(Arc<OwnedFd>),
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no cgroup for pod {uid} below {root}")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("no process in the cgroup of pod {uid} ({cgroup}) to find its network namespace")]
    NoProcess { uid: String, cgroup: PathBuf },
    #[error("opening the network namespace of pod {uid} ({path}): {source}")]
    Open {
        uid: String,
        path: PathBuf,
        source: io::Error,
    },
}

pub struct ClientNetns {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    /// Pod address → pod UID, from the last sync.
    pods: ArcSwap<HashMap<IpAddr, String>>,
    /// Open namespaces by pod address, with the UID they were found for.
    open: Mutex<HashMap<IpAddr, (String, Arc<OwnedFd>)>>,
    maker: Mutex<mpsc::Sender<Job>>,
}

struct Job {
    netns: Arc<OwnedFd>,
    domain: Domain,
    reply: tokio::sync::oneshot::Sender<io::Result<Socket>>,
}

impl ClientNetns {
    /// `cgroup_root`: where pod cgroups are found; `proc_root`: the host's `/proc`.
    pub fn new(cgroup_root: PathBuf, proc_root: PathBuf) -> io::Result<Self> {
        let home = File::open("/proc/thread-self/ns/net")?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("router-netns".into())
            .spawn(move || make_sockets(OwnedFd::from(home), rx))?;
        Ok(ClientNetns {
            cgroup_root,
            proc_root,
            pods: ArcSwap::default(),
            open: Mutex::default(),
            maker: Mutex::new(tx),
        })
    }

    /// The node's pods after a sync: address → UID. Namespaces of pods gone, or whose address
    /// now belongs to another pod, are closed.
    pub fn set_pods(&self, pods: HashMap<IpAddr, String>) {
        if let Ok(mut open) = self.open.lock() {
            open.retain(|ip, (uid, _)| pods.get(ip) == Some(uid));
        }
        self.pods.store(Arc::new(pods));
    }

    /// Where to make the upstream socket for the client at `ip`.
    pub async fn place(&self, ip: IpAddr) -> Result<Place, NetnsError> {
        let Some(uid) = self.pods.load().get(&ip).cloned() else {
            return Ok(Place::Node);
        };
        if let Some((_, fd)) = self
            .open
            .lock()
            .ok()
            .and_then(|o| o.get(&ip).filter(|(u, _)| *u == uid).cloned())
        {
            return Ok(Place::Pod(fd));
        }
        let (root, proc_root, u) = (
            self.cgroup_root.clone(),
            self.proc_root.clone(),
            uid.clone(),
        );
        let found = tokio::task::spawn_blocking(move || open_pod_netns(&root, &proc_root, &u))
            .await
            .map_err(|e| NetnsError::Open {
                uid: uid.clone(),
                path: PathBuf::new(),
                source: io::Error::other(e),
            })??;
        let fd = Arc::new(found);
        if let Ok(mut open) = self.open.lock() {
            open.insert(ip, (uid, fd.clone()));
        }
        Ok(Place::Pod(fd))
    }

    /// A TCP socket of `domain` in the namespace `netns`.
    pub async fn socket_in(&self, netns: Arc<OwnedFd>, domain: Domain) -> io::Result<Socket> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.maker
            .lock()
            .map_err(|_| io::Error::other("socket maker lock poisoned"))?
            .send(Job {
                netns,
                domain,
                reply,
            })
            .map_err(|_| io::Error::other("the socket maker thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("the socket maker thread is gone"))?
    }
}

/// The socket maker: enters each job's namespace, makes the socket, returns home. If it cannot
/// return home it stops (its thread would be in the wrong namespace).
fn make_sockets(home: OwnedFd, jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        let made = enter(&job.netns).and_then(|()| {
            let s = Socket::new(job.domain, Type::STREAM, Some(Protocol::TCP));
            match enter(&home) {
                Ok(()) => s,
                Err(e) => Err(e),
            }
        });
        let lost = made.is_err() && enter(&home).is_err();
        let _ = job.reply.send(made);
        if lost {
            tracing::error!(
                "the router's socket maker cannot return to the node's network namespace"
            );
            return;
        }
    }
}

fn enter(netns: &impl AsFd) -> io::Result<()> {
    // SAFETY: setns on a namespace fd we own; it affects only this (dedicated) thread.
    if unsafe { libc::setns(netns.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Finds the pod's cgroup, a process in it, and opens that process's network namespace.
fn open_pod_netns(cgroup_root: &Path, proc_root: &Path, uid: &str) -> Result<OwnedFd, NetnsError> {
    let cgroup = find_pod_cgroup(cgroup_root, uid).ok_or_else(|| NetnsError::NoCgroup {
        uid: uid.to_string(),
        root: cgroup_root.to_path_buf(),
    })?;
    let mut last = None;
    for pid in pids_below(&cgroup) {
        let path = proc_root.join(pid.to_string()).join("ns/net");
        match File::open(&path) {
            Ok(f) => return Ok(OwnedFd::from(f)),
            // The process may have just exited: try the next.
            Err(source) => last = Some((path, source)),
        }
    }
    Err(match last {
        Some((path, source)) => NetnsError::Open {
            uid: uid.to_string(),
            path,
            source,
        },
        None => NetnsError::NoProcess {
            uid: uid.to_string(),
            cgroup,
        },
    })
}

/// The cgroup directory of pod `uid` below `root` (breadth first, bounded).
fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    let mut seen = 0;
    for _ in 0..MAX_CGROUP_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                seen += 1;
                if seen > MAX_CGROUP_ENTRIES {
                    return None;
                }
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                if pod_uid_of_cgroup(&name.to_string_lossy()).as_deref() == Some(uid) {
                    return Some(e.path());
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

/// Process ids in `cgroup` and its descendants (containers), the pod cgroup's own first.
fn pids_below(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = dirs.pop() {
        seen += 1;
        if seen > 1024 {
            break;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            // 0: a process outside this PID namespace (the agent needs the host's).
            pids.extend(
                text.lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .filter(|p| *p != 0),
            );
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_pod_cgroup_by_uid_in_both_layouts_and_its_processes() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "0d7c2a8e-5b7f-4a35-9d55-3f1c6a1b2c3d";
        let cgroupfs = dir
            .path()
            .join("kubepods/besteffort")
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(cgroupfs.join("c0")).unwrap();
        std::fs::write(cgroupfs.join("cgroup.procs"), "").unwrap();
        std::fs::write(cgroupfs.join("c0/cgroup.procs"), "42\n43\n").unwrap();
        assert_eq!(find_pod_cgroup(dir.path(), uid), Some(cgroupfs.clone()));
        assert_eq!(pids_below(&cgroupfs), vec![42, 43]);
        let systemd = dir.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        let other = tempfile::tempdir().unwrap();
        let moved = other.path().join(systemd.strip_prefix(dir.path()).unwrap());
        std::fs::create_dir_all(&moved).unwrap();
        assert_eq!(find_pod_cgroup(other.path(), uid), Some(moved));
        assert_eq!(find_pod_cgroup(other.path(), "ffffffff-0000"), None);
    }

    #[test]
    fn a_pod_without_processes_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "11111111-2222-3333-4444-555555555555";
        std::fs::create_dir_all(dir.path().join(format!("pod{uid}"))).unwrap();
        let e = open_pod_netns(dir.path(), Path::new("/proc"), uid).unwrap_err();
        assert!(e.to_string().contains(uid), "{e}");
    }
}
