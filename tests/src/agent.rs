//! Running the real `redirect-agent` binary on a mini-cluster's node.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use redirect_agent::loader::{self, KernelMaps};
use redirect_common::Reason;

use crate::{MiniCluster, NODE_NAME, Proc, ROUTER_IP4, ROUTER_IP6, kubeapi::KubeApi};

/// Port the node router listens on in the mini-cluster.
pub const ROUTER_PORT: u16 = 15001;
/// bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The agent binary: `$REDIRECT_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("REDIRECT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirect-agent")
        })
}

/// Where a test agent reads the routing state from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceMode {
    /// `--source manifests`: the scene's manifest directory.
    Manifests,
    /// `--source kube`: an API server stand-in in the node netns that mirrors the directory.
    Kube,
    /// `Kube`, with the redirect.dev CRDs not installed yet (`ApiServer::install_crds`).
    KubeWithoutCrds,
}

/// A running agent (in the node netns, attached at the cluster's cgroup root, pinned in its own
/// directory). Dropping it kills the agent and removes every link and pin it made.
pub struct Agent {
    proc: Option<Proc>,
    pub pin_dir: PathBuf,
    manifests: PathBuf,
    /// The API the agent watches (kube source only).
    pub kube: Option<KubeApi>,
    /// Logs of agents that ran before a restart.
    earlier_logs: String,
    /// Extra `run` flags.
    extra: Vec<String>,
    /// Run the agent from this container image (podman) instead of the workspace binary.
    image: Option<String>,
    /// Names of the containers this agent started (removed on drop).
    containers: Vec<String>,
}

/// How containers run on this kind of host: runc (crun rejects hybrid cgroups), limits the
/// host allows, and the host's PIDs (as `hostPID: true`: the router finds pods' network
/// namespaces through them).
pub const PODMAN_RUN: &[&str] = &[
    "run",
    "--rm",
    "--pid=host",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

impl Agent {
    /// Starts the agent on `manifests` and waits for its first sync.
    pub fn start(mc: &MiniCluster, manifests: &Path) -> Result<Agent> {
        Agent::start_with(mc, manifests, &[])
    }

    /// `start` with extra `redirect-agent run` flags.
    pub fn start_with(mc: &MiniCluster, manifests: &Path, extra: &[&str]) -> Result<Agent> {
        Agent::start_on(mc, manifests, extra, SourceMode::Manifests)
    }

    /// `start_with` reading from `source`: the manifest directory itself, or an API server
    /// that mirrors it.
    pub fn start_on(
        mc: &MiniCluster,
        manifests: &Path,
        extra: &[&str],
        source: SourceMode,
    ) -> Result<Agent> {
        let bin = agent_bin();
        if !bin.exists() {
            bail!(
                "agent binary {} missing: run `cargo build -p redirect-agent` (or cargo xtask test)",
                bin.display()
            );
        }
        Agent::launch(mc, manifests, extra, source, None, Duration::from_secs(30))
    }

    /// Starts an agent (the workspace binary, or `image` with podman) and waits until its
    /// router runs.
    fn launch(
        mc: &MiniCluster,
        manifests: &Path,
        extra: &[&str],
        source: SourceMode,
        image: Option<&str>,
        timeout: Duration,
    ) -> Result<Agent> {
        let mut agent = Agent {
            proc: None,
            pin_dir: Path::new(BPFFS).join(mc.id()),
            manifests: manifests.to_path_buf(),
            kube: match source {
                SourceMode::Manifests => None,
                SourceMode::Kube => Some(KubeApi::start(mc, manifests, true)?),
                SourceMode::KubeWithoutCrds => Some(KubeApi::start(mc, manifests, false)?),
            },
            earlier_logs: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            image: image.map(str::to_string),
            containers: Vec::new(),
        };
        agent.spawn(mc)?;
        agent.wait_started(timeout)?;
        Ok(agent)
    }

    /// `start_on`, running the agent from the container `image` (podman, privileged, in the
    /// node's network namespace, with bpffs, the cgroup2 mount and the kubeconfig mounted), as
    /// the DaemonSet runs it on a node.
    pub fn start_in_container(
        mc: &MiniCluster,
        manifests: &Path,
        source: SourceMode,
        image: &str,
    ) -> Result<Agent> {
        Agent::launch(
            mc,
            manifests,
            &[],
            source,
            Some(image),
            Duration::from_secs(60),
        )
    }

    fn spawn(&mut self, mc: &MiniCluster) -> Result<()> {
        self.proc = Some(self.spawn_process(mc)?);
        Ok(())
    }

    /// Rolls the agent the way a DaemonSet with `maxSurge: 1` does: starts a second agent
    /// (same flags, same pins), waits until its router runs, then stops the first one with
    /// SIGTERM and waits for it to drain and exit. Returns how long the old one took to exit.
    pub fn roll(&mut self, mc: &MiniCluster, timeout: Duration) -> Result<Duration> {
        let mut new = self.spawn_process(mc)?;
        let deadline = Instant::now() + timeout;
        while !new.log().contains("router started") {
            if let Some(status) = new.try_status()? {
                bail!("the new agent exited ({status}):\n{}", new.log());
            }
            if Instant::now() > deadline {
                bail!("the new agent's router did not start:\n{}", new.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let old = self.proc.replace(new).context("no agent running")?;
        self.terminate_process(old, timeout)
    }

    /// Stops the agent as Kubernetes does (SIGTERM) and waits for it to drain and exit.
    /// Returns how long it took.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Duration> {
        let p = self.proc.take().context("no agent running")?;
        self.terminate_process(p, timeout)
    }

    fn terminate_process(&mut self, mut p: Proc, timeout: Duration) -> Result<Duration> {
        let stopping = Instant::now();
        p.signal(Signal::SIGTERM)?;
        let status = p.wait_timeout(timeout)?;
        self.earlier_logs.push_str(&p.log());
        match status {
            Some(s) if s.success() => Ok(stopping.elapsed()),
            Some(s) => bail!("the agent exited with {s} on SIGTERM:\n{}", p.log()),
            None => bail!("the agent did not exit within {timeout:?} of SIGTERM"),
        }
    }

    fn spawn_process(&mut self, mc: &MiniCluster) -> Result<Proc> {
        let bin = match &self.image {
            None => agent_bin(),
            // The image's entry point.
            Some(_) => PathBuf::from("/usr/local/bin/redirect-agent"),
        };
        let container_name = format!("{}-agent-{}", mc.id(), self.containers.len());
        let cgroup2 = crate::cgroup2_mount()?;
        let mut prefix: Vec<String> = Vec::new();
        if let Some(image) = &self.image {
            // podman's default sysctls (ping_group_range) are refused in a network namespace it
            // did not make; the DaemonSet's pod has none either.
            let conf = mc.workdir().join("containers.conf");
            std::fs::write(&conf, "[containers]\ndefault_sysctls = []\n")?;
            prefix.extend([
                "/usr/bin/env".into(),
                format!("CONTAINERS_CONF={}", conf.display()),
                "podman".into(),
            ]);
            prefix.extend(PODMAN_RUN.iter().map(|s| s.to_string()));
            prefix.extend([
                "--name".into(),
                container_name.clone(),
                "--privileged".into(),
                format!("--network=ns:{}", mc.node_netns_path().display()),
                "-v".into(),
                format!("{BPFFS}:{BPFFS}"),
                "-v".into(),
                format!("{0}:{0}", cgroup2.display()),
                "-v".into(),
                format!("{0}:{0}:ro", self.manifests.display()),
            ]);
            if let Some(kube) = &self.kube {
                prefix.extend([
                    "-v".into(),
                    format!("{0}:{0}:ro", kube.kubeconfig.display()),
                    "-e".into(),
                    format!("KUBECONFIG={}", kube.kubeconfig.display()),
                ]);
            }
            prefix.extend([
                "--entrypoint".into(),
                bin.display().to_string(),
                image.clone(),
            ]);
            self.containers.push(container_name);
        }
        let router4 = format!("{ROUTER_IP4}:{ROUTER_PORT}");
        let router6 = format!("[{ROUTER_IP6}]:{ROUTER_PORT}");
        let kubeconfig_env;
        let mut argv: Vec<&str> = prefix.iter().map(String::as_str).collect();
        // In a container the entry point is the agent: the arguments follow the image.
        let program: Vec<&str> = match self.image {
            None => vec![bin.to_str().context("agent path")?],
            Some(_) => vec![],
        };
        match &self.kube {
            None => argv.extend(program.iter().copied().chain([
                "run",
                "--source",
                "manifests",
                "--manifests",
                self.manifests.to_str().context("manifest path")?,
                "--poll-ms",
                "50",
            ])),
            Some(kube) => {
                kubeconfig_env = format!(
                    "KUBECONFIG={}",
                    kube.kubeconfig.to_str().context("kubeconfig path")?
                );
                if self.image.is_none() {
                    argv.extend(["/usr/bin/env", &kubeconfig_env]);
                }
                argv.extend(program.iter().copied().chain([
                    "run",
                    "--source",
                    "kube",
                    "--node-name",
                    NODE_NAME,
                ]));
            }
        }
        argv.extend([
            "--cgroup-root",
            mc.cgroup_root().to_str().context("cgroup path")?,
            "--pin-dir",
            self.pin_dir.to_str().context("pin path")?,
            "--router-v4",
            &router4,
            "--router-v6",
            &router6,
            "--resync-ms",
            "500",
            "--log",
            "info",
        ]);
        argv.extend(self.extra.iter().map(String::as_str));
        mc.node().spawn(&argv)
    }

    /// Everything the agent (and earlier runs of it) logged.
    pub fn log(&self) -> String {
        let now = self.proc.as_ref().map(Proc::log).unwrap_or_default();
        format!("{}{now}", self.earlier_logs)
    }

    /// The newest generation (snapshot of its source) the current agent process has synced.
    /// Resyncs of the same generation that changed something are logged too; they do not
    /// count, so a test waiting for generation 2 waits for the source's next change.
    pub fn syncs(&self) -> usize {
        let log = self.proc.as_ref().map(Proc::log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(" synced"))
            .filter_map(|l| {
                let rest = l.split("generation=").nth(1)?;
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// Waits until the current agent process synced generation `n` (its source's `n`th
    /// snapshot).
    pub fn wait_synced(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.syncs() >= n {
                return Ok(());
            }
            if let Some(p) = self.proc.as_mut()
                && let Some(status) = p.try_status()?
            {
                bail!("agent exited ({status}) before sync {n}:\n{}", p.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log sync {n} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent logged a line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "agent never logged {needle:?} within {timeout:?}:\n{}",
            self.log()
        )
    }

    /// SIGKILLs the agent (and so its router): no cleanup runs.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            if self.image.is_some()
                && let Some(name) = self.containers.last()
            {
                // SIGKILL cannot be proxied: kill the container itself.
                let _ = std::process::Command::new("podman")
                    .args(["kill", "--signal", "KILL", name])
                    .output();
            }
            p.signal(Signal::SIGKILL)?;
            p.wait_timeout(Duration::from_secs(10))?;
            self.earlier_logs.push_str(&p.log());
        }
        Ok(())
    }

    /// Replaces the extra `redirect-agent run` flags of the next start.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// SIGKILLs the agent and starts it again, expecting the new process to exit with an error
    /// within `timeout`: returns its log.
    pub fn restart_expecting_failure(
        &mut self,
        mc: &MiniCluster,
        timeout: Duration,
    ) -> Result<String> {
        self.kill9()?;
        self.spawn(mc)?;
        let mut p = self.proc.take().context("no agent started")?;
        let status = p.wait_timeout(timeout)?;
        let log = p.log();
        self.earlier_logs.push_str(&log);
        match status {
            Some(s) if !s.success() => Ok(log),
            Some(s) => bail!("the agent exited with {s}, expected a failure:\n{log}"),
            None => {
                p.signal(Signal::SIGKILL)?;
                p.wait_timeout(Duration::from_secs(10))?;
                bail!("the agent still runs after {timeout:?}, expected a failure:\n{log}")
            }
        }
    }

    /// Starts the agent again (after `kill9`) and waits for its first sync.
    pub fn restart(&mut self, mc: &MiniCluster) -> Result<()> {
        self.kill9()?;
        self.spawn(mc)?;
        self.wait_started(Duration::from_secs(30))
    }

    /// SIGKILLs the agent and starts it again, waiting only until the new process logged a
    /// line containing `needle` (not for a sync: a restarted agent routes with the last good
    /// state it persisted before its source gives a good snapshot).
    pub fn restart_until(
        &mut self,
        mc: &MiniCluster,
        needle: &str,
        timeout: Duration,
    ) -> Result<()> {
        self.kill9()?;
        self.spawn(mc)?;
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.proc.as_mut().context("no agent running")?;
            if p.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = p.try_status()? {
                bail!("the agent exited ({status}):\n{}", p.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not log {needle:?} within {timeout:?}:\n{}",
                    p.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log of the current agent process alone.
    pub fn current_log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Waits until the agent persisted its last good state beside the pins.
    pub fn wait_persisted(&self, timeout: Duration) -> Result<()> {
        let path = self.pin_dir.join("state_v1");
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if Instant::now() > deadline {
                bail!("{} not written within {timeout:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for the current process's first sync and for its router, which starts right
    /// after the first sync that applied without failure.
    pub fn wait_started(&mut self, timeout: Duration) -> Result<()> {
        self.wait_synced(1, timeout)?;
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.proc.as_ref().map(Proc::log).unwrap_or_default();
            if log.contains("router started") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the router did not start within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Kernel decision counters by reason label, read from the pinned map.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        read_counters(&self.pin_dir)
    }

    /// Stops the agent and removes links and pins, reporting what it removed.
    pub fn cleanup(&mut self) -> Result<Vec<PathBuf>> {
        self.kill9()?;
        Ok(loader::cleanup(&self.pin_dir)?)
    }
}

/// Kernel decision counters by reason label, read from the maps pinned in `pin_dir`.
pub fn read_counters(pin_dir: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let maps = KernelMaps::open(pin_dir)?;
    let values = maps.counters()?;
    Ok(Reason::ALL
        .iter()
        .map(|r| (r.label(), values[*r as usize]))
        .collect())
}

impl Drop for Agent {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = std::process::Command::new("podman")
                .args(["rm", "--force", "--time", "0", name])
                .output();
        }
        if let Err(error) = self.cleanup() {
            eprintln!(
                "agent cleanup of {} failed: {error:#}",
                self.pin_dir.display()
            );
        }
    }
}
