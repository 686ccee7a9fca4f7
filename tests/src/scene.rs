//! The standard branching scene: a small shop with a baseline and one sandbox, on a
//! mini-cluster, with the agent running. Used by the end-to-end tests and the demo.
//!
//! ```text
//! pods:      client (baseline caller)   checkout-base   checkout-fork*   catalog-base
//!            frontend-fork* (a fork pod that calls other services)       (* sandbox feature-x)
//! services:  checkout 10.200.2.10 / fd00:200::2:10  :80 → 8080  baseline checkout-base
//!                     also :50051 (gRPC), :8081 (WebSocket), :2525 (opaque), servers per test
//!            catalog  10.200.2.11 / fd00:200::2:11  :80 → 8080  baseline catalog-base
//!            frontend 10.200.2.12 / fd00:200::2:12  :80 → 8080  no baseline pod
//! sandbox:   feature-x (key feature-x) forks frontend → frontend-fork, checkout → checkout-fork
//! ```
//!
//! Each service's first port is named `http` (declared HTTP: the router serves it as HTTP); the
//! others are named `tcp-<port>` (undeclared: the router detects their protocol).

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    MiniCluster, Pod, Proc, Service,
    agent::{Agent, SourceMode},
};

pub const CHECKOUT_VIP4: &str = "10.200.2.10";
pub const CHECKOUT_VIP6: &str = "fd00:200::2:10";
pub const CATALOG_VIP4: &str = "10.200.2.11";
pub const CATALOG_VIP6: &str = "fd00:200::2:11";
pub const FRONTEND_VIP4: &str = "10.200.2.12";
pub const FRONTEND_VIP6: &str = "fd00:200::2:12";
pub const SANDBOX_KEY: &str = "feature-x";
pub const SANDBOX_FILE: &str = "sandbox-feature-x.yaml";
pub const SERVER_PORT: u16 = 8080;
/// Ports of checkout (service port = target port) for the protocol peers.
pub const GRPC_PORT: u16 = 50051;
pub const WS_PORT: u16 = 8081;
pub const OPAQUE_PORT: u16 = 2525;
/// How long one client command may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The podserver binary: `$REDIRECT_PODSERVER_BIN`, else the workspace's debug build.
pub fn podserver_bin() -> PathBuf {
    std::env::var_os("REDIRECT_PODSERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/podserver"))
}

/// The sandbox manifest of the scene.
pub fn sandbox_yaml() -> String {
    sandbox_yaml_with_fallback("Unavailable")
}

/// The sandbox manifest with `spec.fallback` set (`Unavailable` or `Baseline`).
pub fn sandbox_yaml_with_fallback(fallback: &str) -> String {
    sandbox_manifest(SANDBOX_KEY, fallback, &["frontend", "checkout"])
}

/// A Sandbox `key` (in `default`) forking each of `services` with the pods labelled
/// `app: <service>` and `redirect.dev/sandbox: <key>`.
pub fn sandbox_manifest(key: &str, fallback: &str, services: &[&str]) -> String {
    let mut yaml = format!(
        "apiVersion: redirect.dev/v1alpha1
kind: Sandbox
metadata:
  name: {key}
  namespace: default
  resourceVersion: \"1\"
spec:
  routingKey: {key}
  fallback: {fallback}
  forks:
"
    );
    for service in services {
        yaml.push_str(&format!(
            "  - service: {service}
    selector:
      app: {service}
      redirect.dev/sandbox: {key}
"
        ));
    }
    yaml
}

/// SIGINT and SIGTERM set a flag instead of killing the process, so a long run (a benchmark)
/// stops after its current step and still cleans up.
pub mod stop {
    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::{Context, Result};
    use nix::sys::signal::{SigHandler, Signal, signal};

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }

    pub fn install() -> Result<()> {
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { signal(sig, SigHandler::Handler(on_signal)) }
                .context("installing a signal handler")?;
        }
        Ok(())
    }

    pub fn requested() -> bool {
        STOP.load(Ordering::Relaxed)
    }
}

/// The shop on a mini-cluster. Fields drop in reverse order: agent, servers, pods.
pub struct Shop<'c> {
    pub agent: Option<Agent>,
    pub servers: Vec<Proc>,
    pub manifests: PathBuf,
    pub checkout: Service,
    pub catalog: Service,
    pub frontend: Service,
    pub client: Pod<'c>,
    pub frontend_fork: Pod<'c>,
    pub checkout_base: Pod<'c>,
    pub checkout_fork: Pod<'c>,
    pub catalog_base: Pod<'c>,
}

impl<'c> Shop<'c> {
    /// Builds the pods, servers, services and manifests (with the sandbox when `with_sandbox`),
    /// without an agent.
    pub fn build(mc: &'c MiniCluster, with_sandbox: bool) -> Result<Shop<'c>> {
        let fork_labels = |app: &'static str| [("app", app), ("redirect.dev/sandbox", SANDBOX_KEY)];
        let client = mc.pod_with_labels("client", &[("app", "client")])?;
        let frontend_fork = mc.pod_with_labels("frontend-fork", &fork_labels("frontend"))?;
        let checkout_base = mc.pod_with_labels("checkout-base", &[("app", "checkout")])?;
        let checkout_fork = mc.pod_with_labels("checkout-fork", &fork_labels("checkout"))?;
        let catalog_base = mc.pod_with_labels("catalog-base", &[("app", "catalog")])?;
        let bin = podserver_bin();
        let mut servers = Vec::new();
        for pod in [
            &frontend_fork,
            &checkout_base,
            &checkout_fork,
            &catalog_base,
        ] {
            servers.push(pod.spawn_server(&bin, pod.name(), SERVER_PORT)?);
        }
        let ports = [(80, SERVER_PORT)];
        // checkout also has a port per protocol peer; tests start those servers as needed.
        let checkout_ports = [
            (80, SERVER_PORT),
            (GRPC_PORT, GRPC_PORT),
            (WS_PORT, WS_PORT),
            (OPAQUE_PORT, OPAQUE_PORT),
        ];
        let checkout = mc.service(
            "checkout",
            CHECKOUT_VIP4,
            CHECKOUT_VIP6,
            &checkout_ports,
            &[&checkout_base],
        )?;
        let catalog = mc.service(
            "catalog",
            CATALOG_VIP4,
            CATALOG_VIP6,
            &ports,
            &[&catalog_base],
        )?;
        let frontend = mc.service("frontend", FRONTEND_VIP4, FRONTEND_VIP6, &ports, &[])?;
        let manifests = mc.workdir().join("manifests");
        fs::create_dir_all(&manifests)?;
        mc.write_manifests(&manifests)?;
        let shop = Shop {
            agent: None,
            servers,
            manifests,
            checkout,
            catalog,
            frontend,
            client,
            frontend_fork,
            checkout_base,
            checkout_fork,
            catalog_base,
        };
        if with_sandbox {
            shop.add_sandbox()?;
        }
        Ok(shop)
    }

    /// Builds the scene and starts the agent on it.
    pub fn with_agent(mc: &'c MiniCluster, with_sandbox: bool) -> Result<Shop<'c>> {
        Shop::with_agent_args(mc, with_sandbox, &[])
    }

    /// `with_agent` with extra `redirect-agent run` flags.
    pub fn with_agent_args(
        mc: &'c MiniCluster,
        with_sandbox: bool,
        agent_args: &[&str],
    ) -> Result<Shop<'c>> {
        let mut shop = Shop::build(mc, with_sandbox)?;
        shop.agent = Some(Agent::start_with(mc, &shop.manifests, agent_args)?);
        Ok(shop)
    }

    /// `with_agent` reading from `source` (with `SourceMode::Kube`, an API server mirrors the
    /// scene's manifests, so the same steps change what the agent sees).
    pub fn with_agent_on(
        mc: &'c MiniCluster,
        with_sandbox: bool,
        source: SourceMode,
    ) -> Result<Shop<'c>> {
        let mut shop = Shop::build(mc, with_sandbox)?;
        shop.agent = Some(Agent::start_on(mc, &shop.manifests, &[], source)?);
        Ok(shop)
    }

    /// `with_agent_on`, with the agent running from the container `image`.
    pub fn with_agent_in_container(
        mc: &'c MiniCluster,
        with_sandbox: bool,
        source: SourceMode,
        image: &str,
    ) -> Result<Shop<'c>> {
        let mut shop = Shop::build(mc, with_sandbox)?;
        shop.agent = Some(Agent::start_in_container(
            mc,
            &shop.manifests,
            source,
            image,
        )?);
        Ok(shop)
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("scene started with an agent")
    }

    pub fn add_sandbox(&self) -> Result<()> {
        write_atomically(&self.manifests.join(SANDBOX_FILE), &sandbox_yaml())?;
        self.changed()
    }

    /// Replaces the sandbox with one whose `spec.fallback` is `fallback`.
    pub fn set_sandbox_fallback(&self, fallback: &str) -> Result<()> {
        write_atomically(
            &self.manifests.join(SANDBOX_FILE),
            &sandbox_yaml_with_fallback(fallback),
        )?;
        self.changed()
    }

    /// Removes a pod's manifest (as if the pod were deleted): a fork loses its endpoint.
    pub fn remove_pod_manifest(&self, pod: &Pod<'_>) -> Result<()> {
        let path = self.manifests.join(format!("pod-{}.yaml", pod.name()));
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        self.changed()
    }

    pub fn remove_sandbox(&self) -> Result<()> {
        fs::remove_file(self.manifests.join(SANDBOX_FILE)).context("removing the sandbox")?;
        self.changed()
    }

    /// Writes a manifest file into the watched directory.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        write_atomically(&self.manifests.join(name), text)?;
        self.changed()
    }

    /// With an API server, the change is in it when this returns (the mirror ran); the
    /// manifest source reads the directory itself.
    fn changed(&self) -> Result<()> {
        match self.agent.as_ref().and_then(|a| a.kube.as_ref()) {
            Some(kube) => kube.sync_now(),
            None => Ok(()),
        }
    }
}

/// Writes through a temporary file and a rename, so the watcher never reads half a file.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// `curl` from `pod` to `http://<ip>/<path>`, returning the body. `ip` may be IPv6.
pub fn get(pod: &Pod<'_>, ip: &str, path: &str) -> Result<String> {
    get_with(pod, ip, path, None)
}

/// `get` with one extra request header (`"name: value"`).
pub fn get_with(pod: &Pod<'_>, ip: &str, path: &str, header: Option<&str>) -> Result<String> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let url = format!("http://{host}/{path}");
    let mut argv = vec!["curl", "-sS", "--max-time", "5", "-g", &url];
    if let Some(h) = header {
        argv.extend(["-H", h]);
    }
    pod.run(&argv, CLIENT_TIMEOUT)?
        .check()
        .with_context(|| format!("GET {url}"))
}

/// GET from `pod` over an IPv6 socket to the IPv4-mapped form of `ip4` (`::ffff:a.b.c.d`),
/// which the kernel handles in connect6.
pub fn get_v4_mapped(pod: &Pod<'_>, ip4: &str, path: &str) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
         s.settimeout(5)\n\
         s.connect(('::ffff:{ip4}', 80))\n\
         s.sendall(b'GET /{path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n    c = s.recv(4096)\n    if not c: break\n    data += c\n\
         print(data.split(b'\\r\\n\\r\\n', 1)[1].decode(), end='')\n"
    );
    pod.run(&["python3", "-c", &script], CLIENT_TIMEOUT)?
        .check()
        .with_context(|| format!("GET [::ffff:{ip4}]/{path}"))
}

/// Whether a GET from `pod` to `http://<ip>/peer` went through the node router. The router
/// opens its upstream socket in the client pod's network namespace, so the upstream sees the
/// pod's own address either way; but a proxied connection has a source port of its own, while
/// a direct one is the client's socket itself. (`ip` may be IPv6 or IPv4-mapped.)
pub fn through_router(pod: &Pod<'_>, ip: &str) -> Result<bool> {
    let script = "import socket, sys\n\
         ip = sys.argv[1]\n\
         s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_STREAM)\n\
         s.settimeout(5)\n\
         s.connect((ip, 80))\n\
         s.sendall(b'GET /peer HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n    c = s.recv(4096)\n    if not c: break\n    data += c\n\
         seen = data.split(b'\\r\\n\\r\\n', 1)[1].decode().strip()\n\
         local = s.getsockname()\n\
         host, port = seen.rsplit(':', 1)\n\
         host = host.strip('[]')\n\
         mine = local[0][7:] if local[0].startswith('::ffff:') else local[0]\n\
         print('router' if (host, int(port)) != (mine, local[1]) else 'direct')\n";
    let out = pod
        .run(&["python3", "-c", script, ip], CLIENT_TIMEOUT)?
        .check()
        .with_context(|| format!("GET {ip}/peer"))?;
    match out.trim() {
        "router" => Ok(true),
        "direct" => Ok(false),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}
