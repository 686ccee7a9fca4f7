//! Mini-cluster harness: one Kubernetes-like node and its pods made of real network namespaces,
//! veths, routes, nftables and cgroups, for end-to-end tests of redirect. No mocks.
//!
//! ```no_run
//! use std::time::Duration;
//! use redirect_tests::MiniCluster;
//!
//! let Some(mc) = MiniCluster::new_or_skip("doc_example", &["curl"]) else { return Ok(()) };
//! let client = mc.pod("client")?;
//! let baseline = mc.pod_with_labels("checkout-baseline", &[("app", "checkout")])?;
//! let _server = baseline.spawn_server("/path/to/podserver".as_ref(), "checkout-baseline", 8080)?;
//! mc.service("checkout", "10.200.128.10", "fd00:200::128:10", &[(80, 8080)], &[&baseline])?;
//! let out = client.run(&["curl", "-s", "http://10.200.128.10/"], Duration::from_secs(10))?;
//! assert_eq!(out.check()?, "checkout-baseline\n");
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! # Layout
//! - **Node**: a netns `<id>-node` with `ip_forward` on, the router addresses
//!   [`ROUTER_IP4`]/32 and [`ROUTER_IP6`]/128 on `lo`, a `/32` and `/128` route to every pod over
//!   its point-to-point veth `vp<N>` (Calico/kindnet style; `fe80::1/64` on each node-side veth)
//!   and kube-proxy style nftables DNAT for ClusterIPs (table `inet rdt_kube`).
//! - **Pod** number `N` (1, 2, … in creation order, at most [`MAX_PODS`]): a netns `<id>-p<N>`
//!   whose `eth0` holds `10.200.1.N/32` and `fd00:200::1:N/128` (N in hex in the last group),
//!   default routes `via 10.200.0.1 onlink` and `via fe80::1`, no DAD. Its cgroup is laid out
//!   as a kubelet's cgroup driver would ([`CgroupLayout`]): by default
//!   `<cgroup root>/kubepods/pod<uid>` (cgroupfs, a Guaranteed pod) with a child `c0` where its
//!   processes run, so eBPF programs must walk ancestors to find the pod.
//! - **Cgroup root** ([`MiniCluster::cgroup_root`]): `<cgroup2 mount>/<id>`, where a test
//!   attaches its cgroup programs; the mount is found in `/proc/self/mountinfo`.
//! - **Service**: ClusterIPs chosen by the test inside `10.200.0.0/16` and `fd00:200::/64`
//!   (outside the router and pod ranges), routed to `lo` in the node so the node itself can
//!   use them too; DNAT happens in the node, so a backend sees the client's pod IP.
//!
//! Only `10.200.0.0/16` and `fd00:200::/64` are used, only inside namespaces the harness
//! creates; the root netns is never touched and nothing routes out of the cluster.
//!
//! # Names and cleanup
//! Every name starts with `rdt-<pid>-<start time>-<seq>` (see [`sweep_leftovers`]), so clusters
//! in parallel tests and processes never collide. Dropping a [`MiniCluster`] (also while
//! unwinding from a panic) kills every process in its namespaces and cgroups and removes the
//! namespaces (and with them veths, routes and nftables), the cgroups and the work dir. The
//! first cluster of a process sweeps leftovers of dead processes. [`Pod`], [`Node`] and
//! [`Proc`] borrow the cluster, so they are dropped before it.
//!
//! # Known limits
//! TCP services only; no hairpin (a pod reaching itself through a ClusterIP needs SNAT, which
//! the harness never does); one node.

pub mod agent;
pub mod apiserver;
pub mod bpf_objects;
mod cgroup;
mod exec;
pub mod kernel;
pub mod kubeapi;
mod manifests;
mod names;
mod netns;
mod nft;
pub mod peers;
pub mod rollout;
pub mod scene;
pub mod server_args;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

pub use cgroup::cgroup2_mount;
pub use exec::{Proc, RunOutput};
pub use names::{PREFIX, Swept, sweep_leftovers};
#[doc(hidden)]
pub use names::{name_for_owner, own_start_time};

/// `spec.nodeName` of every pod.
pub const NODE_NAME: &str = "mini-node";
/// Kubernetes namespace of every object.
pub const NAMESPACE: &str = "default";
/// The node's router address (on the node's `lo`, and the pods' IPv4 gateway).
pub const ROUTER_IP4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The node's IPv6 router address (on the node's `lo`).
pub const ROUTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// Most pods one cluster holds.
pub const MAX_PODS: u8 = 250;

/// How long to wait for links and addresses to become usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Pod::spawn_server`] waits for "listening".
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Tools a cluster cannot be built without.
const REQUIRED_TOOLS: &[&str] = &["ip", "nft"];

/// Why a cluster could not be built.
#[derive(Debug)]
pub enum SetupError {
    /// The machine cannot run the harness (not root, a tool or cgroup2 missing): tests print
    /// the reason ([`skip`]) and pass.
    Skip(String),
    /// Building the cluster failed: a real error.
    Failed(anyhow::Error),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Skip(why) => write!(f, "skipped: {why}"),
            SetupError::Failed(e) => write!(f, "mini-cluster setup failed: {e:#}"),
        }
    }
}

impl std::error::Error for SetupError {}

impl From<anyhow::Error> for SetupError {
    fn from(e: anyhow::Error) -> Self {
        SetupError::Failed(e)
    }
}

impl From<std::io::Error> for SetupError {
    fn from(e: std::io::Error) -> Self {
        SetupError::Failed(e.into())
    }
}

/// Reports that `test` skips: writes `SKIP <test>: <why>` straight to stderr, past the test
/// harness's output capture, so a run without root or a tool shows what it did not test even
/// when every test passes. Every test that skips says so through here.
pub fn skip(test: &str, why: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIP {test}: {why}");
}

/// What `setup` gave, or `None` after [`skip`] when it says the machine cannot run `test`;
/// panics on a real setup error.
pub fn or_skip<T>(test: &str, setup: Result<T, SetupError>) -> Option<T> {
    match setup {
        Ok(v) => Some(v),
        Err(SetupError::Skip(why)) => {
            skip(test, why);
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// `Err(Skip)` unless this process runs as root; `why` says what needs root.
pub fn require_root(why: &str) -> Result<(), SetupError> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(SetupError::Skip(format!("needs root {why} (euid {euid})")))
    }
}

/// `Err(Skip)` unless every tool runs (`<tool> --version` or `-V` exits 0).
pub fn require_tools(tools: &[&str]) -> Result<(), SetupError> {
    for tool in tools {
        let found = ["--version", "-V"].iter().any(|flag| {
            Command::new(tool)
                .arg(flag)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !found {
            return Err(SetupError::Skip(format!("tool `{tool}` not found")));
        }
    }
    Ok(())
}

fn preflight() -> Result<PathBuf, SetupError> {
    require_root("for namespaces, nftables and cgroups")?;
    require_tools(REQUIRED_TOOLS)?;
    cgroup2_mount().map_err(|e| SetupError::Skip(format!("{e:#}")))
}

#[derive(Debug)]
pub(crate) struct PodInfo {
    pub name: String,
    pub index: u8,
    pub uid: String,
    pub labels: Vec<(String, String)>,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub netns_name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub container_cgroup: PathBuf,
    pub cgroup_id: u64,
}

/// A port of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// With [`MiniCluster::service`]: `http` for the first port (declared HTTP by the name
    /// convention), `tcp-<port>` for the others (no declaration: the router detects).
    pub name: String,
    /// `appProtocol`, when set.
    pub app_protocol: Option<String>,
    /// The ClusterIP port.
    pub port: u16,
    /// The pods' port.
    pub target_port: u16,
}

/// A ClusterIP service (dual-stack, TCP).
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    ports: Vec<ServicePort>,
}

impl Service {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The IPv4 ClusterIP.
    pub fn ip4(&self) -> Ipv4Addr {
        self.ip4
    }
    /// The IPv6 ClusterIP.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }
    /// The ports, in the order given.
    pub fn ports(&self) -> &[ServicePort] {
        &self.ports
    }
}

#[derive(Debug)]
pub(crate) struct ServiceState {
    pub service: Service,
    pub uid: String,
    pub backends: Vec<Arc<PodInfo>>,
    /// resourceVersion of the EndpointSlices: 1, then +1 per [`MiniCluster::set_backends`].
    pub version: u64,
}

#[derive(Default)]
struct State {
    /// Every netns name created (or being created), for teardown.
    netns: Vec<String>,
    pods: Vec<Arc<PodInfo>>,
    services: Vec<ServiceState>,
}

/// How pod cgroups are laid out, as the kubelet's cgroup driver does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroupfs driver, a Guaranteed pod: `kubepods/pod<uid>/c0`.
    #[default]
    Cgroupfs,
    /// systemd driver, a BestEffort pod: `kubepods.slice/kubepods-besteffort.slice/
    /// kubepods-besteffort-pod<uid with underscores>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

impl CgroupLayout {
    /// Below the cgroup root: the directory the pod cgroups go in.
    fn pods_parent(self) -> &'static str {
        match self {
            CgroupLayout::Cgroupfs => "kubepods",
            CgroupLayout::Systemd => "kubepods.slice/kubepods-besteffort.slice",
        }
    }

    /// The pod's cgroup and its container's, below [`CgroupLayout::pods_parent`].
    fn pod_dirs(self, uid: &str, index: usize) -> (String, String) {
        match self {
            CgroupLayout::Cgroupfs => (format!("pod{uid}"), "c0".into()),
            CgroupLayout::Systemd => (
                format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
                format!("cri-containerd-{index:064x}.scope"),
            ),
        }
    }
}

/// One node and its pods. Dropping it removes everything it made.
pub struct MiniCluster {
    id: String,
    layout: CgroupLayout,
    cgroup_root: PathBuf,
    workdir: PathBuf,
    node_netns_name: String,
    node_netns: PathBuf,
    log_seq: AtomicU32,
    state: Mutex<State>,
}

impl std::fmt::Debug for MiniCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniCluster")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

static SWEEP: Once = Once::new();

impl MiniCluster {
    /// Builds the node: `Err(SetupError::Skip)` when the machine cannot (not root, `ip` or
    /// `nft` missing, no cgroup2). The first call in a process sweeps leftovers of dead runs.
    pub fn new() -> Result<MiniCluster, SetupError> {
        MiniCluster::with_layout(CgroupLayout::default())
    }

    /// [`MiniCluster::new`] with pod cgroups laid out as `layout`.
    pub fn with_layout(layout: CgroupLayout) -> Result<MiniCluster, SetupError> {
        let mount = preflight()?;
        SWEEP.call_once(|| {
            let swept = sweep_leftovers();
            if swept != Swept::default() {
                eprintln!("redirect-tests: removed leftovers of dead runs: {swept:?}");
            }
        });
        let id = names::new_cluster_id()?;
        let node_netns_name = format!("{id}-node");
        let mc = MiniCluster {
            layout,
            cgroup_root: mount.join(&id),
            workdir: std::env::temp_dir().join(&id),
            node_netns: netns::path(&node_netns_name),
            node_netns_name,
            id,
            log_seq: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        };
        // On error `mc` is dropped here, which removes whatever was made.
        mc.setup_node().map_err(SetupError::Failed)?;
        Ok(mc)
    }

    /// [`MiniCluster::new`] for tests: also requires `tools` (e.g. `curl`); prints
    /// `SKIP <test>: <reason>` ([`skip`]) and gives `None` when the machine cannot run it; panics on real
    /// setup errors.
    pub fn new_or_skip(test: &str, tools: &[&str]) -> Option<MiniCluster> {
        MiniCluster::new_or_skip_with_layout(test, tools, CgroupLayout::default())
    }

    /// [`MiniCluster::new_or_skip`] with pod cgroups laid out as `layout`.
    pub fn new_or_skip_with_layout(
        test: &str,
        tools: &[&str],
        layout: CgroupLayout,
    ) -> Option<MiniCluster> {
        or_skip(
            test,
            require_tools(tools).and_then(|()| MiniCluster::with_layout(layout)),
        )
    }

    fn setup_node(&self) -> Result<()> {
        fs::create_dir(&self.workdir)
            .with_context(|| format!("creating {}", self.workdir.display()))?;
        cgroup::create(&self.cgroup_root)?;
        let mut dir = self.cgroup_root.clone();
        for level in self.layout.pods_parent().split('/') {
            dir.push(level);
            cgroup::create(&dir)?;
        }
        self.lock().netns.push(self.node_netns_name.clone());
        netns::add(&self.node_netns_name)?;
        netns::sysctls(
            &self.node_netns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        netns::ip_batch(
            &self.node_netns_name,
            &format!(
                "link set lo up\naddr add {ROUTER_IP4}/32 dev lo\naddr add {ROUTER_IP6}/128 dev lo nodad\n"
            ),
        )?;
        self.apply_rules(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster id, `rdt-<pid>-<start>-<seq>`, prefix of every name it uses.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The test's own cgroup dir (`<cgroup2 mount>/<id>`), holding `kubepods/`: attach cgroup
    /// eBPF programs here.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The parent of the pod cgroups (`<cgroup root>/kubepods` in the default layout).
    pub fn kubepods_path(&self) -> PathBuf {
        self.cgroup_root.join(self.layout.pods_parent())
    }

    /// `/run/netns/<id>-node`.
    pub fn node_netns_path(&self) -> &Path {
        &self.node_netns
    }

    /// Scratch dir for this cluster (process logs live here); removed on drop.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The node.
    pub fn node(&self) -> Node<'_> {
        Node { mc: self }
    }

    /// A pod without labels.
    pub fn pod(&self, name: &str) -> Result<Pod<'_>> {
        self.pod_with_labels(name, &[])
    }

    /// A pod with `labels` (written to its manifest). Names are unique per cluster.
    pub fn pod_with_labels(&self, name: &str, labels: &[(&str, &str)]) -> Result<Pod<'_>> {
        ensure!(
            !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'.'),
            "pod name {name:?} is not a DNS name"
        );
        let mut st = self.lock();
        ensure!(
            st.pods.iter().all(|p| p.name != name),
            "pod {name:?} exists"
        );
        let index = u8::try_from(st.pods.len() + 1)
            .ok()
            .filter(|n| *n <= MAX_PODS)
            .context("too many pods")?;
        let uid = names::random_uuid()?;
        let ip4 = Ipv4Addr::new(10, 200, 1, index);
        let ip6 = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 1, u16::from(index));
        let netns_name = format!("{}-p{index}", self.id);
        st.netns.push(netns_name.clone());
        let ns = netns::add(&netns_name)?;
        netns::sysctls(
            &ns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        let veth = format!("vp{index}");
        exec::tool(
            &[
                "ip",
                "-n",
                &self.node_netns_name,
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns_name,
            ],
            None,
        )?;
        netns::ip_batch(
            &self.node_netns_name,
            &format!("link set {veth} up\naddr add fe80::1/64 dev {veth} nodad\n"),
        )?;
        netns::ip_batch(
            &netns_name,
            &format!(
                "link set lo up\nlink set eth0 up\naddr add {ip4}/32 dev eth0\naddr add {ip6}/128 dev eth0 nodad\n"
            ),
        )?;
        netns::wait_ready(&netns_name, &["eth0"], READY_TIMEOUT)?;
        netns::wait_ready(&self.node_netns_name, &[&veth], READY_TIMEOUT)?;
        netns::ip_batch(
            &self.node_netns_name,
            &format!("route add {ip4}/32 dev {veth}\nroute add {ip6}/128 dev {veth}\n"),
        )?;
        netns::ip_batch(
            &netns_name,
            &format!(
                "route add default via {ROUTER_IP4} dev eth0 onlink\nroute add ::/0 via fe80::1 dev eth0\n"
            ),
        )?;
        let (pod_dir, container_dir) = self.layout.pod_dirs(&uid.to_string(), usize::from(index));
        let cgroup = self.kubepods_path().join(pod_dir);
        cgroup::create(&cgroup)?;
        let container_cgroup = cgroup.join(container_dir);
        cgroup::create(&container_cgroup)?;
        let cgroup_id = fs::metadata(&cgroup)?.ino();
        let info = Arc::new(PodInfo {
            name: name.to_string(),
            index,
            uid,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ip4,
            ip6,
            netns_name,
            netns: ns,
            cgroup,
            container_cgroup,
            cgroup_id,
        });
        st.pods.push(info.clone());
        Ok(Pod { mc: self, info })
    }

    /// A dual-stack ClusterIP service: `ports` are (port, targetPort), `backends` its ready
    /// endpoints (none: connections are reset). DNAT picks a backend at random per connection.
    pub fn service(
        &self,
        name: &str,
        ip4: &str,
        ip6: &str,
        ports: &[(u16, u16)],
        backends: &[&Pod<'_>],
    ) -> Result<Service> {
        let ports: Vec<ServicePort> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, target_port))| ServicePort {
                name: if i == 0 {
                    "http".to_string()
                } else {
                    format!("tcp-{port}")
                },
                app_protocol: None,
                port,
                target_port,
            })
            .collect();
        self.service_with_ports(name, ip4, ip6, &ports, backends)
    }

    /// [`MiniCluster::service`] with ports named (and their `appProtocol` set) by the caller.
    pub fn service_with_ports(
        &self,
        name: &str,
        ip4: &str,
        ip6: &str,
        ports: &[ServicePort],
        backends: &[&Pod<'_>],
    ) -> Result<Service> {
        let ip4: Ipv4Addr = ip4.parse().with_context(|| format!("ClusterIP {ip4:?}"))?;
        let ip6: Ipv6Addr = ip6.parse().with_context(|| format!("ClusterIP {ip6:?}"))?;
        check_cluster_ip(IpAddr::V4(ip4))?;
        check_cluster_ip(IpAddr::V6(ip6))?;
        ensure!(!ports.is_empty(), "service {name:?} needs a port");
        let mut st = self.lock();
        for s in &st.services {
            let svc = &s.service;
            ensure!(svc.name != name, "service {name:?} exists");
            ensure!(
                svc.ip4 != ip4 && svc.ip6 != ip6,
                "ClusterIP of {name:?} is taken by {:?}",
                svc.name
            );
        }
        let service = Service {
            name: name.to_string(),
            ip4,
            ip6,
            ports: ports.to_vec(),
        };
        // A route, so the node's own connects to the ClusterIP find one; OUTPUT DNAT then
        // reroutes them to the backend.
        netns::ip_batch(
            &self.node_netns_name,
            &format!(
                "route add {ip4}/32 dev lo src {ROUTER_IP4}\nroute add {ip6}/128 dev lo src {ROUTER_IP6}\n"
            ),
        )?;
        st.services.push(ServiceState {
            service: service.clone(),
            uid: names::random_uuid()?,
            backends: backends.iter().map(|p| p.info.clone()).collect(),
            version: 1,
        });
        self.apply_rules(&st)?;
        Ok(service)
    }

    /// Replaces the endpoints of `service` (rules and EndpointSlice manifests; the slices'
    /// resourceVersion goes up by one).
    pub fn set_backends(&self, service: &Service, backends: &[&Pod<'_>]) -> Result<()> {
        let mut st = self.lock();
        let s = st
            .services
            .iter_mut()
            .find(|s| s.service.name == service.name)
            .with_context(|| format!("no service {:?}", service.name))?;
        s.backends = backends.iter().map(|p| p.info.clone()).collect();
        s.version += 1;
        self.apply_rules(&st)
    }

    fn apply_rules(&self, st: &State) -> Result<()> {
        let rules: Vec<nft::Rules<'_>> = st
            .services
            .iter()
            .map(|s| nft::Rules {
                name: &s.service.name,
                ip4: s.service.ip4,
                ip6: s.service.ip6,
                ports: s
                    .service
                    .ports
                    .iter()
                    .map(|p| (p.port, p.target_port))
                    .collect(),
                backends4: s.backends.iter().map(|p| p.ip4).collect(),
                backends6: s.backends.iter().map(|p| p.ip6).collect(),
            })
            .collect();
        let file = self.workdir.join("rules.nft");
        fs::write(&file, nft::render(&rules))?;
        let path = file.to_str().context("non-UTF-8 temp dir")?;
        self.node()
            .run(&["nft", "-f", path], Duration::from_secs(20))?
            .check()
            .context("loading nftables rules")
            .map(drop)
    }

    /// Writes one YAML file per object into `dir` (created if missing): `pod-<name>.yaml`,
    /// `service-<name>.yaml`, `endpointslice-<name>-ipv4.yaml` and `-ipv6.yaml`. Returns the
    /// paths written.
    pub fn write_manifests(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let st = self.lock();
        let mut files = Vec::new();
        let mut write = |name: String, text: String| -> Result<()> {
            let path = dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            files.push(path);
            Ok(())
        };
        for p in &st.pods {
            write(format!("pod-{}.yaml", p.name), manifests::pod(p))?;
        }
        for s in &st.services {
            let n = &s.service.name;
            write(format!("service-{n}.yaml"), manifests::service(s))?;
            write(
                format!("endpointslice-{n}-ipv4.yaml"),
                manifests::endpoint_slice(s, false),
            )?;
            write(
                format!("endpointslice-{n}-ipv6.yaml"),
                manifests::endpoint_slice(s, true),
            )?;
        }
        Ok(files)
    }

    fn dump_logs(&self) {
        let Ok(entries) = fs::read_dir(&self.workdir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- {} (last {} lines)", log.display(), tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// ClusterIPs must be in the test ranges and clear of the router and pod addresses.
fn check_cluster_ip(ip: IpAddr) -> Result<()> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            ensure!(
                o[0] == 10 && o[1] == 200 && o[2] > 1,
                "IPv4 ClusterIP {a} must be in 10.200.2.0 - 10.200.255.255"
            );
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            ensure!(
                s[..4] == [0xfd00, 0x200, 0, 0] && !(s[4..6] == [0, 0] && s[6] <= 1),
                "IPv6 ClusterIP {a} must be in fd00:200::/64 above fd00:200::1:ffff (router and pods)"
            );
        }
    }
    Ok(())
}

impl Drop for MiniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let netns_names = std::mem::take(&mut self.lock().netns);
        for name in &netns_names {
            netns::kill_processes_in(&netns::path(name));
        }
        if !cgroup::remove_tree(&self.cgroup_root) {
            eprintln!(
                "redirect-tests: could not remove cgroup {}",
                self.cgroup_root.display()
            );
        }
        for name in netns_names.iter().rev() {
            if let Err(e) = netns::delete(name) {
                eprintln!("redirect-tests: {e:#}");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.workdir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("redirect-tests: removing {}: {e}", self.workdir.display());
        }
    }
}

/// The node's netns. Processes started here stay in the test's own cgroup.
#[derive(Debug, Clone, Copy)]
pub struct Node<'c> {
    mc: &'c MiniCluster,
}

/// A pod: netns, veth to the node, cgroup `kubepods/pod<uid>/c0`.
#[derive(Debug, Clone)]
pub struct Pod<'c> {
    mc: &'c MiniCluster,
    info: Arc<PodInfo>,
}

impl Node<'_> {
    /// [`NODE_NAME`].
    pub fn name(&self) -> &'static str {
        NODE_NAME
    }

    /// `GET /status` of the agent's admin endpoint (on the node's loopback, its default
    /// address), as JSON.
    pub fn admin_status(&self) -> Result<serde_json::Value> {
        let out = self
            .run(
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:9967/status",
                ],
                Duration::from_secs(10),
            )?
            .check()?;
        serde_json::from_str(&out).with_context(|| format!("/status is not JSON: {out}"))
    }

    /// `/run/netns/<id>-node`.
    pub fn netns_path(&self) -> &Path {
        &self.mc.node_netns
    }

    fn place(&self) -> exec::Place<'_> {
        exec::Place {
            label: "node",
            netns: &self.mc.node_netns,
            cgroup: None,
            workdir: &self.mc.workdir,
            log_seq: &self.mc.log_seq,
        }
    }
}

impl Pod<'_> {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// `metadata.uid` (a random UUID).
    pub fn uid(&self) -> &str {
        &self.info.uid
    }
    /// `metadata.labels`.
    pub fn labels(&self) -> &[(String, String)] {
        &self.info.labels
    }
    /// `10.200.1.N`.
    pub fn ip4(&self) -> Ipv4Addr {
        self.info.ip4
    }
    /// `fd00:200::1:N`.
    pub fn ip6(&self) -> Ipv6Addr {
        self.info.ip6
    }
    /// N: the pod's number in the cluster (1 for the first pod).
    pub fn index(&self) -> u8 {
        self.info.index
    }
    /// `/run/netns/<id>-p<N>`.
    pub fn netns_path(&self) -> &Path {
        &self.info.netns
    }
    /// `<id>-p<N>`, the name `ip netns` lists.
    pub fn netns_name(&self) -> &str {
        &self.info.netns_name
    }
    /// The pod cgroup `<cgroup root>/kubepods/pod<uid>`.
    pub fn cgroup_path(&self) -> &Path {
        &self.info.cgroup
    }
    /// The container cgroup `<pod cgroup>/c0`, where the pod's processes run.
    pub fn container_cgroup_path(&self) -> &Path {
        &self.info.container_cgroup
    }
    /// The pod cgroup's id (its inode), as `bpf_get_current_ancestor_cgroup_id` reports it.
    pub fn cgroup_id(&self) -> u64 {
        self.info.cgroup_id
    }

    /// Starts `podserver` (path from `env!("CARGO_BIN_EXE_podserver")`) serving `name` on
    /// `ip4:port` and `[ip6]:port`, and waits until it listens.
    pub fn spawn_server(&self, podserver: &Path, name: &str, port: u16) -> Result<Proc> {
        let bin = podserver.to_str().context("non-UTF-8 podserver path")?;
        let listen4 = format!("{}:{port}", self.info.ip4);
        let listen6 = format!("[{}]:{port}", self.info.ip6);
        let argv = [
            bin, "--name", name, "--listen", &listen4, "--listen", &listen6,
        ];
        let mut server = self.spawn(&argv)?;
        server.wait_for_log("listening", SERVER_READY_TIMEOUT)?;
        Ok(server)
    }

    fn place(&self) -> exec::Place<'_> {
        exec::Place {
            label: &self.info.name,
            netns: &self.info.netns,
            cgroup: Some(&self.info.container_cgroup),
            workdir: &self.mc.workdir,
            log_seq: &self.mc.log_seq,
        }
    }
}

/// `command`, `spawn` and `run` for a place to run programs.
macro_rules! exec_methods {
    ($ty:ident, $where:literal) => {
        impl $ty<'_> {
            #[doc = concat!("A `Command` for `argv` that runs ", $where, " (stdin null, proxy variables removed). Start it with [`Proc::spawn`] (own process group, killed on drop) or set stdio and spawn it yourself.")]
            pub fn command(&self, argv: &[&str]) -> Result<Command> {
                self.place().command(argv)
            }

            #[doc = concat!("Starts `argv` ", $where, ", stdout and stderr to a log file in the work dir ([`Proc::log`]). Dropping the [`Proc`] kills it.")]
            pub fn spawn(&self, argv: &[&str]) -> Result<Proc> {
                self.place().spawn(argv)
            }

            #[doc = concat!("Runs `argv` ", $where, " to completion, at most `timeout` (then the process group is killed and an error returned).")]
            pub fn run(&self, argv: &[&str], timeout: Duration) -> Result<RunOutput> {
                self.place().run(argv, timeout)
            }
        }
    };
}

exec_methods!(Node, "in the node netns");
exec_methods!(Pod, "in the pod (its netns, cgroup `c0`)");
