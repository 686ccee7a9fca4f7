//! redirect-agent: the node agent. `redirect-agent --help` lists the commands.

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use redirect_agent::{
    admin::{self, AdminState, LogControl},
    agent::{self, LoopContext, RouterHandle, StartRouter, Syncer},
    cgroup::{PodCgroups, cgroup2_mount},
    controller::ControllerArgs,
    loader::{self, KernelMaps, LoaderConfig, RecordHook, RouterSocks},
    router::{
        ClientNetnsSettings, MIGRATE_REQ_SYSCTL, Router, RouterSettings, enable_request_migration,
        key::KeyConfig,
    },
    source::{
        DEFAULT_POLL_INTERVAL, ManifestSource, SourceKind,
        kube::{DEFAULT_DEBOUNCE, KubeSource, KubeSourceConfig},
    },
};
use redirect_common::{PIN_SUBDIR, RouterConfig, SockAddr};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, reload, util::SubscriberInitExt};

#[derive(Parser)]
#[command(
    version,
    about = "redirect node agent: eBPF connect-time redirection and node router"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info,redirect_agent=debug`); changeable at
    /// run time with `PUT /loglevel` on the admin endpoint.
    #[arg(long, env = "REDIRECT_LOG", default_value = "info", global = true)]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "REDIRECT_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the programs, start the node router and keep the maps in sync with the sources.
    Run(Box<RunArgs>),
    /// Remove every link, program and pin the agent made (the data path stops at once).
    Cleanup(PinArgs),
    /// Print the CustomResourceDefinitions (Sandbox, RouteGroup) as YAML.
    Crd,
    /// Probe what the programs need from this kernel (program and map types, helpers), print
    /// each with the kernel's answer, and exit 1 when something is missing. `run` makes the same
    /// check before it loads anything.
    KernelCheck,
    /// The cluster-wide controller (its own Deployment): validates sandboxes and route groups
    /// and writes their status, deletes expired sandboxes, publishes fork endpoints as
    /// EndpointSlices; one leader at a time through a Lease.
    Controller(ControllerArgs),
}

#[derive(Args)]
struct PinArgs {
    /// bpffs mount point.
    #[arg(long, env = "REDIRECT_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Directory of the pins [default: <bpffs>/redirect].
    #[arg(long, env = "REDIRECT_PIN_DIR")]
    pin_dir: Option<PathBuf>,
}

impl PinArgs {
    fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| self.bpffs.join(PIN_SUBDIR))
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Where the routing state comes from: `kube` (the Kubernetes API: in-cluster config, or
    /// the KUBECONFIG file) or `manifests` (a directory, `--manifests`) [default: kube inside a
    /// pod (KUBERNETES_SERVICE_HOST is set), else manifests].
    #[arg(long, env = "REDIRECT_SOURCE", value_enum)]
    source: Option<SourceKind>,
    /// Directory of Kubernetes YAML manifests (Service, EndpointSlice, Pod, Sandbox,
    /// RouteGroup), watched for changes (with `--source manifests`).
    #[arg(long, env = "REDIRECT_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// With `--source kube`: changes that arrive within this many milliseconds of the previous
    /// sync are coalesced into one sync at the end of the window; a change after a quiet
    /// window is synced at once.
    #[arg(long, env = "REDIRECT_DEBOUNCE_MS", default_value_t = DEFAULT_DEBOUNCE.as_millis() as u64)]
    debounce_ms: u64,
    /// With `--source kube`: objects per list page (initial lists and relists).
    #[arg(long, env = "REDIRECT_KUBE_PAGE_SIZE", default_value_t = 500)]
    kube_page_size: u32,
    /// cgroup v2 directory to attach at; every pod cgroup must be below it [default: the
    /// cgroup2 mount found in /proc/self/mountinfo].
    #[arg(long, env = "REDIRECT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Which program records connections sent to the router: `fentry` on the kernel's
    /// `tcp_connect()` runs once per connect (Linux 5.11+, and where tracing programs are
    /// allowed); `sock_ops` runs for every callback of every socket below the cgroup root;
    /// `auto` takes `fentry` when the kernel loads it, else `sock_ops` (listed in `/status`).
    #[arg(long, env = "REDIRECT_RECORD_HOOK", value_enum, default_value_t = RecordHook::Auto)]
    record_hook: RecordHook,
    /// Router address for IPv4 clients: pods' redirected connections go here, and the router
    /// listens on it. Must be reachable from every pod netns (a node address).
    #[arg(long, env = "REDIRECT_ROUTER_V4")]
    router_v4: Option<SocketAddr>,
    /// Router address for IPv6 clients.
    #[arg(long, env = "REDIRECT_ROUTER_V6")]
    router_v6: Option<SocketAddr>,
    /// SO_MARK the router sets on its upstream sockets (decimal or 0x hex); the programs never
    /// redirect sockets carrying it.
    #[arg(long, env = "REDIRECT_ROUTER_MARK", default_value = "0x52440000", value_parser = parse_u32)]
    router_mark: u32,
    /// Baggage member names that carry the routing key (repeat or comma-separate).
    #[arg(
        long,
        env = "REDIRECT_BAGGAGE_KEYS",
        value_delimiter = ',',
        default_value = "routing-key"
    )]
    baggage_key: Vec<String>,
    /// tracestate member names that carry the routing key.
    #[arg(
        long,
        env = "REDIRECT_TRACESTATE_KEYS",
        value_delimiter = ',',
        default_value = "routing-key"
    )]
    tracestate_key: Vec<String>,
    /// Plain request headers that carry the routing key (checked first).
    #[arg(
        long,
        env = "REDIRECT_KEY_HEADERS",
        value_delimiter = ',',
        default_value = "x-routing-key"
    )]
    key_header: Vec<String>,
    /// Add an `x-redirect-upstream` response header naming where each request went.
    #[arg(long, env = "REDIRECT_DEBUG_HEADER")]
    debug_header: bool,
    /// Longest wait for a client's first bytes before its connection is treated as opaque
    /// (server-speaks-first protocols), in milliseconds. Only on service ports that declare no
    /// HTTP protocol: a port declared HTTP (appProtocol, or an http/grpc port name) waits for
    /// its first request up to the header timeout.
    #[arg(long, env = "REDIRECT_DETECT_TIMEOUT_MS", default_value_t = 500)]
    detect_timeout_ms: u64,
    /// Longest wait for a request's headers from a client, in milliseconds (also for the
    /// first request on a port declared HTTP, and between requests on a kept-alive connection).
    #[arg(long, env = "REDIRECT_HEADER_TIMEOUT_MS", default_value_t = 30_000)]
    header_timeout_ms: u64,
    /// Longest wait for an upstream's response headers before answering 504, in milliseconds.
    #[arg(long, env = "REDIRECT_RESPONSE_TIMEOUT_MS", default_value_t = 60_000)]
    response_timeout_ms: u64,
    /// Longest silence inside a request body (between two of its frames) before the request
    /// is cut and its upstream stream reset, in milliseconds; 0: no limit. Off by default:
    /// long-lived gRPC streams are legitimately idle, and one client pod's open bodies only
    /// hold its own upstream connections.
    #[arg(long, env = "REDIRECT_BODY_IDLE_TIMEOUT_MS", default_value_t = 0)]
    body_idle_timeout_ms: u64,
    /// On SIGTERM, how long connections in flight may take to finish (the router stops
    /// accepting at once: a successor bound to the same address takes new connections, or
    /// they go straight to their destination), in milliseconds. Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "REDIRECT_DRAIN_TIMEOUT_MS", default_value_t = 25_000)]
    drain_timeout_ms: u64,
    /// Router threads, each with its own runtime and upstream pool [default: one per CPU].
    #[arg(long, env = "REDIRECT_ROUTER_WORKERS")]
    router_workers: Option<usize>,
    /// Connections the router serves at once (lowered to what the file descriptor limit
    /// allows, two per connection). A full router leaves the liveness map: new connections go
    /// straight to their original destination until it is back under 90 % of it.
    #[arg(long, env = "REDIRECT_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Connections one client pod may hold through the router at once; beyond it, its new
    /// connections are reset (other pods are not affected).
    #[arg(long, env = "REDIRECT_MAX_CONNECTIONS_PER_POD", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_pod: u32,
    /// Bytes the router may have to buffer for one client pod. Every connection counts for
    /// the most it can make the router hold (the larger of --max-header-bytes and the 128 KiB
    /// HTTP/2 receive window, plus 16 KiB of copy buffers), so this can lower
    /// --max-connections-per-pod; the router logs the limits in force at start.
    #[arg(long, env = "REDIRECT_MAX_BUFFERED_BYTES_PER_POD", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_buffered_bytes_per_pod: u64,
    /// An opaque (non-HTTP) connection that moves no byte either way for this long is closed,
    /// in milliseconds; 0: no limit. The default (1 h, as Envoy's TCP proxy) keeps idle database
    /// pool connections open.
    #[arg(
        long,
        env = "REDIRECT_OPAQUE_IDLE_TIMEOUT_MS",
        default_value_t = 3_600_000
    )]
    opaque_idle_timeout_ms: u64,
    /// Where the router opens upstream sockets: `client`, in the client pod's network
    /// namespace (its source address, NetworkPolicy and ClusterIP translation apply, as on a
    /// direct connection); `node`, in the agent's own (the node's address).
    #[arg(
        long,
        env = "REDIRECT_UPSTREAM_NETNS",
        value_enum,
        default_value = "client"
    )]
    upstream_netns: UpstreamNetns,
    /// The host's /proc, where a pod's network namespace is opened (`<pid>/ns/net` of a
    /// process in the pod's cgroup): `/proc` with hostPID, else a hostPath mount of it.
    #[arg(long, env = "REDIRECT_HOST_PROC", default_value = "/proc")]
    host_proc: PathBuf,
    /// Largest request head accepted (request line and header fields, per request, pipelined
    /// ones included); larger gets 431. HTTP/2: the largest header list.
    #[arg(long, env = "REDIRECT_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request head; more gets 431. (HTTP/2 header lists are
    /// bounded by --max-header-bytes.)
    #[arg(long, env = "REDIRECT_MAX_HEADERS", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..))]
    max_headers: u16,
    /// This node's name (the DaemonSet sets it from spec.nodeName): only its pods count as
    /// local workloads, and the kube source watches only its pods. Required with `--source
    /// kube` [default with manifests: all pods].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// How often the manifest directory is checked for changes, in milliseconds (with
    /// `--source manifests`).
    #[arg(long, env = "REDIRECT_POLL_MS", default_value_t = DEFAULT_POLL_INTERVAL.as_millis() as u64)]
    poll_ms: u64,
    /// How often the last good state is re-applied (pods whose cgroup appeared late), in
    /// milliseconds.
    #[arg(long, env = "REDIRECT_RESYNC_MS", default_value_t = 2000)]
    resync_ms: u64,
    /// Admin endpoint (/healthz, /readyz, /metrics, /tables, /status, /loglevel) address, or
    /// `off`. A loopback address unless --admin-allow-remote is given.
    #[arg(long, env = "REDIRECT_ADMIN_ADDR", default_value = admin::DEFAULT_ADDR)]
    admin_addr: AdminAddr,
    /// Allow a non-loopback --admin-addr (e.g. for a metrics scrape from another host).
    /// Requires --admin-token-file: /healthz, /readyz and /metrics stay open, every other
    /// endpoint (PUT /loglevel, /tables, /status) needs the token.
    #[arg(long, env = "REDIRECT_ADMIN_ALLOW_REMOTE")]
    admin_allow_remote: bool,
    /// File holding the admin bearer token (a mounted Secret; surrounding whitespace is
    /// ignored). When given, every admin endpoint but /healthz, /readyz and /metrics needs
    /// `Authorization: Bearer <token>`. Read once at start; the token is never logged.
    #[arg(long, env = "REDIRECT_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// `--upstream-netns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum UpstreamNetns {
    Client,
    Node,
}

/// `--admin-addr`: an address or `off`.
#[derive(Clone, Debug)]
struct AdminAddr(Option<SocketAddr>);

impl std::str::FromStr for AdminAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(AdminAddr(None));
        }
        s.parse()
            .map(|a| AdminAddr(Some(a)))
            .map_err(|e| format!("{s:?} is neither ip:port nor `off`: {e}"))
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

/// Installs the log subscriber; returns the control that changes its filter at run time.
fn init_logging(filter: &str, json: bool) -> Result<LogControl> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("--log {filter:?}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry().with(fmt).with(filter).init();
    Ok(Box::new(move |s: &str| {
        let f = EnvFilter::try_new(s).map_err(|e| format!("invalid filter {s:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

fn main() -> Result<()> {
    redirect_agent::agent::allocator::one_arena();
    let cli = Cli::parse();
    let log_control = init_logging(&cli.log, cli.log_json)?;
    match cli.command {
        Command::Run(a) => run(*a, log_control, cli.log),
        Command::Cleanup(p) => {
            let removed = loader::cleanup(&p.pin_dir())?;
            for r in &removed {
                println!("removed {}", r.display());
            }
            if removed.is_empty() {
                println!("nothing to remove at {}", p.pin_dir().display());
            }
            Ok(())
        }
        Command::Crd => {
            print!("{}", redirect_agent::crd::crd_yaml());
            Ok(())
        }
        Command::KernelCheck => kernel_check(),
        Command::Controller(a) => controller(a),
    }
}

fn kernel_check() -> Result<()> {
    use redirect_agent::loader::kernel_check::{Answer, probe};
    let report = probe();
    println!("kernel {}", report.release);
    for (need, answer) in &report.answers {
        let said = match answer {
            Answer::Yes => "yes".to_string(),
            Answer::No => format!("MISSING (needs {})", need.since),
            Answer::Unknown(why) => format!("unknown ({why})"),
        };
        println!("  {:<66} {said}", need.what);
    }
    if let Some(why) = report.refusal() {
        anyhow::bail!("{why}");
    }
    let unknown = report
        .answers
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Unknown(_)))
        .count();
    if unknown > 0 {
        anyhow::bail!(
            "{unknown} of {} needs could not be probed (the probes load programs: run as root, \
             as the agent runs)",
            report.answers.len()
        );
    }
    println!("everything the programs need is there");
    Ok(())
}

#[tokio::main]
async fn controller(a: ControllerArgs) -> Result<()> {
    let client = kube::Client::try_default().await.context(
        "no Kubernetes client configuration (in-cluster service account, or KUBECONFIG)",
    )?;
    redirect_agent::controller::run(a, client, shutdown_signal()).await?;
    tracing::info!("controller stopped");
    Ok(())
}

#[tokio::main]
async fn run(a: RunArgs, log_control: LogControl, log_filter: String) -> Result<()> {
    let source_kind = a.source.unwrap_or_else(|| {
        SourceKind::default_for_env(std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref())
    });
    // Check the source's own flags before anything is attached.
    let kube_node_name = match source_kind {
        SourceKind::Manifests if a.manifests.is_none() => {
            anyhow::bail!("--source manifests needs --manifests DIR (REDIRECT_MANIFESTS)")
        }
        SourceKind::Manifests => None,
        SourceKind::Kube => Some(a.node_name.clone().filter(|n| !n.is_empty()).context(
            "--source kube needs --node-name (NODE_NAME; the DaemonSet sets it from spec.nodeName)",
        )?),
    };
    let admin_access = match a.admin_addr {
        AdminAddr(Some(addr)) => {
            let token = a
                .admin_token_file
                .as_deref()
                .map(admin::access::Token::from_file)
                .transpose()?;
            Some((
                addr,
                admin::access::Access::for_addr(addr, a.admin_allow_remote, token)?,
            ))
        }
        AdminAddr(None) => None,
    };
    tracing::info!(source = ?source_kind, "starting");
    let cgroup_root = match a.cgroup_root {
        Some(p) => p,
        None => cgroup2_mount()
            .context("reading /proc/self/mountinfo")?
            .context("no cgroup2 mount found: pass --cgroup-root")?,
    };
    let pin_dir = a.pins.pin_dir();
    let attached = loader::attach(&LoaderConfig {
        bpffs: a.pins.bpffs.clone(),
        pin_dir: pin_dir.clone(),
        cgroup_root: cgroup_root.clone(),
        record_hook: a.record_hook,
        router_ports: [a.router_v4, a.router_v6].map(|r| r.map_or(0, |r| r.port())),
    })?;
    for (prog, action) in &attached.report.links {
        tracing::info!(program = prog, ?action, cgroup_root = %cgroup_root.display(), "attached");
    }
    let report = &attached.report;
    if let Some(why) = &report.record_fallback {
        tracing::warn!(
            record_hook = report.record,
            %why,
            "fentry on tcp_connect unavailable: recording with sock_ops, which runs for every \
             socket below the cgroup root"
        );
    }
    let record_hook = (report.record, report.record_fallback.clone());
    drop(attached);

    let admin = Arc::new(AdminState::new(
        pin_dir.clone(),
        cgroup_root.clone(),
        Some(log_control),
        &log_filter,
    ));
    admin.set_record_hook(record_hook.0, record_hook.1);
    if let Some((addr, access)) = admin_access {
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("admin endpoint --admin-addr {addr}"))?;
        let token = access.needs_token();
        tracing::info!(%addr, token, "admin endpoint listening");
        tokio::spawn(admin::serve(listener, admin.clone(), access));
    }

    let router_cfg = RouterConfig {
        v4: a.router_v4.map(SockAddr::from).unwrap_or_default(),
        v6: a.router_v6.map(SockAddr::from).unwrap_or_default(),
        mark: a.router_mark,
        _pad: 0,
    };
    let mut maps = KernelMaps::open(&pin_dir)?;
    maps.invalidate_origin_cache()?;
    let mut syncer = Syncer::new(maps, PodCgroups::new(&cgroup_root), a.node_name, router_cfg)?;

    let settings = RouterSettings {
        v4: a.router_v4,
        v6: a.router_v6,
        mark: a.router_mark,
        keys: KeyConfig {
            baggage: a.baggage_key,
            tracestate: a.tracestate_key,
            headers: a.key_header,
        },
        debug_header: a.debug_header,
        detect_timeout: Duration::from_millis(a.detect_timeout_ms),
        header_timeout: Duration::from_millis(a.header_timeout_ms),
        response_timeout: Duration::from_millis(a.response_timeout_ms),
        body_idle_timeout: (a.body_idle_timeout_ms > 0)
            .then(|| Duration::from_millis(a.body_idle_timeout_ms)),
        max_header_bytes: a.max_header_bytes,
        max_headers: usize::from(a.max_headers),
        max_connections: a.max_connections as usize,
        max_connections_per_pod: a.max_connections_per_pod as usize,
        max_buffered_bytes_per_pod: usize::try_from(a.max_buffered_bytes_per_pod)
            .unwrap_or(usize::MAX),
        opaque_idle_timeout: (a.opaque_idle_timeout_ms > 0)
            .then(|| Duration::from_millis(a.opaque_idle_timeout_ms)),
        client_netns: (a.upstream_netns == UpstreamNetns::Client).then(|| ClientNetnsSettings {
            cgroup_root: cgroup_root.clone(),
            proc_root: a.host_proc.clone(),
        }),
        workers: a
            .router_workers
            .unwrap_or_else(|| RouterSettings::default().workers),
        ..RouterSettings::default()
    };
    // Opened now, so a missing pin fails the start; bound once the tables are complete (the
    // persisted last good state, or the first sync).
    let socks = RouterSocks::open(&pin_dir)?;
    let start_router: StartRouter = Box::new(move |view| {
        let router = Router::bind(settings, socks)?;
        let shared = router.shared.clone();
        // Complete tables before the first accept: a keyed request never sees an empty view.
        shared.view.store(view);
        tokio::spawn(router.serve());
        tracing::info!("router started: the routing tables are complete");
        Ok(shared)
    });
    match enable_request_migration() {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            sysctl = MIGRATE_REQ_SYSCTL,
            "cannot turn on tcp_migrate_req: connections queued at this router when it stops \
             during an upgrade are reset instead of moving to its successor (set \
             net.ipv4.tcp_migrate_req=1 on the node)"
        ),
    }

    let mut ctx = LoopContext {
        admin: admin.clone(),
        router: RouterHandle::Pending(start_router),
        state: Some(Box::new(agent::last_good::PinnedState::new(&pin_dir))),
        pin_dir,
        resync: Duration::from_millis(a.resync_ms),
    };
    let stop = shutdown_signal();
    let end = match source_kind {
        SourceKind::Manifests => {
            let dir = a
                .manifests
                .context("--source manifests needs --manifests DIR")?;
            admin.set_source("manifests", None);
            let mut source = ManifestSource::new(dir, Duration::from_millis(a.poll_ms));
            agent::run(&mut syncer, &mut source, &mut ctx, stop).await
        }
        SourceKind::Kube => {
            let node_name = kube_node_name.context("unreachable: checked above")?;
            let client = kube::Client::try_default().await.context(
                "no Kubernetes client configuration (in-cluster service account, or KUBECONFIG)",
            )?;
            let mut source = KubeSource::start(
                client,
                &KubeSourceConfig {
                    node_name,
                    debounce: Duration::from_millis(a.debounce_ms),
                    page_size: a.kube_page_size,
                },
            );
            admin.set_source("kube", Some(source.health()));
            agent::run(&mut syncer, &mut source, &mut ctx, stop).await
        }
    };
    end?;
    let Some(router) = ctx.router.running() else {
        tracing::info!("stopping; pinned programs and routes stay in place");
        return Ok(());
    };
    let timeout = Duration::from_millis(a.drain_timeout_ms);
    tracing::info!(
        connections = router.connections(),
        ?timeout,
        "stopping: draining the router; it accepts nothing more, pinned programs and routes stay \
         in place"
    );
    let report = router.drain(timeout).await;
    let took_ms = report.took.as_millis() as u64;
    if report.left == 0 {
        tracing::info!(
            connections = report.connections,
            left = 0,
            took_ms,
            "router drained: every connection open at SIGTERM finished"
        );
    } else {
        tracing::warn!(
            connections = report.connections,
            left = report.left,
            took_ms,
            "router drained at the deadline (--drain-timeout-ms): the connections left are cut"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
