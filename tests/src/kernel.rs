//! Checking what the kernel did against the pure decision the agent's routing module computes.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use redirect_agent::{
    loader::KernelMaps,
    routing::{ConnectDecision, ConnectInput, at_connect},
    sync::RedirectMaps,
};
use redirect_common::{Reason, SockAddr};

use crate::{Pod, agent::read_counters, cgroup2_mount};

/// The cgroup ids the kernel walks for a process in `dir`: root (level 0) first.
pub fn ancestors(dir: &Path) -> Result<Vec<u64>> {
    let mount = cgroup2_mount()?;
    let rel = dir
        .strip_prefix(&mount)
        .with_context(|| format!("{} is not below {}", dir.display(), mount.display()))?;
    let mut ids = vec![std::fs::metadata(&mount)?.ino()];
    let mut cur = PathBuf::from(&mount);
    for part in rel.components() {
        cur.push(part);
        ids.push(std::fs::metadata(&cur)?.ino());
    }
    Ok(ids)
}

/// The decision the routing module predicts for `pod` connecting to `dst`, from the tables the
/// kernel maps hold right now.
pub fn predict(
    pin_dir: &Path,
    pod: &Pod<'_>,
    dst: std::net::SocketAddr,
    router_alive: bool,
) -> Result<ConnectDecision> {
    let tables = KernelMaps::open(pin_dir)?.read()?;
    let input = ConnectInput {
        dst: SockAddr::from(dst),
        tcp: true,
        ancestors: ancestors(pod.container_cgroup_path())?,
        mark: 0,
        router_alive,
        pick: 0,
    };
    Ok(at_connect(&tables, &input))
}

/// Counter increments between two readings, only the reasons that moved.
pub fn delta(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then_some((*k, d))
        })
        .collect()
}

/// Runs `connect_once` (which must open exactly one TCP connection) and checks that the kernel
/// counted exactly the connect decision the routing module predicts (plus the `sock_ops` record
/// when the decision goes to the router). Returns the prediction.
pub fn expect_kernel_agrees(
    pin_dir: &Path,
    pod: &Pod<'_>,
    dst: std::net::SocketAddr,
    connect_once: impl FnOnce() -> Result<()>,
) -> Result<ConnectDecision> {
    let predicted = predict(pin_dir, pod, dst, true)?;
    let before = read_counters(pin_dir)?;
    connect_once()?;
    let moved = delta(&before, &read_counters(pin_dir)?);
    let mut expected = BTreeMap::from([(predicted.reason.label(), 1)]);
    if predicted.reason == Reason::ToRouter {
        expected.insert(Reason::ConnRecorded.label(), 1);
    }
    ensure!(
        moved == expected,
        "kernel counted {moved:?} for {} -> {dst}, routing predicts {expected:?}",
        pod.name()
    );
    Ok(predicted)
}
