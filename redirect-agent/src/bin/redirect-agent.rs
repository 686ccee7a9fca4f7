//! redirect-agent: the node agent. `redirect-agent --help` lists the commands.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use redirect_agent::{
    admin::{self, AdminState, LogControl, api::PodEntry},
    agent::Syncer,
    cgroup::{PodCgroups, cgroup2_mount},
    loader::{self, KernelMaps, LoaderConfig, RouterSocks},
    router::{Router, RouterSettings, key::KeyConfig, to_sockaddr},
    routing::RouteView,
    source::manifest::{DEFAULT_POLL_INTERVAL, watch_dir},
    store::{Store, ns_name},
};
use redirect_common::{PIN_SUBDIR, RouterConfig};
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
    /// Directory of Kubernetes YAML manifests (Service, EndpointSlice, Pod, Sandbox,
    /// RouteGroup), watched for changes.
    #[arg(long, env = "REDIRECT_MANIFESTS")]
    manifests: PathBuf,
    /// cgroup v2 directory to attach at; every pod cgroup must be below it [default: the
    /// cgroup2 mount found in /proc/self/mountinfo].
    #[arg(long, env = "REDIRECT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
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
    /// (server-speaks-first protocols), in milliseconds.
    #[arg(long, env = "REDIRECT_DETECT_TIMEOUT_MS", default_value_t = 500)]
    detect_timeout_ms: u64,
    /// Longest wait for a request's headers from a client, in milliseconds.
    #[arg(long, env = "REDIRECT_HEADER_TIMEOUT_MS", default_value_t = 30_000)]
    header_timeout_ms: u64,
    /// Longest wait for an upstream's response headers before answering 504, in milliseconds.
    #[arg(long, env = "REDIRECT_RESPONSE_TIMEOUT_MS", default_value_t = 60_000)]
    response_timeout_ms: u64,
    /// Router threads, each with its own runtime and upstream pool [default: one per CPU].
    #[arg(long, env = "REDIRECT_ROUTER_WORKERS")]
    router_workers: Option<usize>,
    /// Largest request head accepted; larger gets 431.
    #[arg(long, env = "REDIRECT_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Only pods with this spec.nodeName count as local workloads [default: all pods].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// How often the manifest directory is checked for changes, in milliseconds.
    #[arg(long, env = "REDIRECT_POLL_MS", default_value_t = DEFAULT_POLL_INTERVAL.as_millis() as u64)]
    poll_ms: u64,
    /// How often the last good state is re-applied (pods whose cgroup appeared late), in
    /// milliseconds.
    #[arg(long, env = "REDIRECT_RESYNC_MS", default_value_t = 2000)]
    resync_ms: u64,
    /// Admin endpoint (/healthz, /readyz, /metrics, /tables, /status, /loglevel) address, or
    /// `off`. Keep it on localhost: it has no authentication.
    #[arg(long, env = "REDIRECT_ADMIN_ADDR", default_value = admin::DEFAULT_ADDR)]
    admin_addr: AdminAddr,
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
    }
}

#[tokio::main]
async fn run(a: RunArgs, log_control: LogControl, log_filter: String) -> Result<()> {
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
    })?;
    for (prog, action) in &attached.report.links {
        tracing::info!(program = prog, ?action, cgroup_root = %cgroup_root.display(), "attached");
    }
    drop(attached);

    let admin = Arc::new(AdminState::new(
        pin_dir.clone(),
        cgroup_root.clone(),
        Some(log_control),
        &log_filter,
    ));
    if let AdminAddr(Some(addr)) = a.admin_addr {
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("admin endpoint --admin-addr {addr}"))?;
        tracing::info!(%addr, "admin endpoint listening");
        tokio::spawn(admin::serve(listener, admin.clone()));
    }

    let router_cfg = RouterConfig {
        v4: a.router_v4.map(to_sockaddr).unwrap_or_default(),
        v6: a.router_v6.map(to_sockaddr).unwrap_or_default(),
        mark: a.router_mark,
        _pad: 0,
    };
    let maps = KernelMaps::open(&pin_dir)?;
    let mut syncer = Syncer::new(maps, PodCgroups::new(&cgroup_root), a.node_name, router_cfg)?;

    let router = Router::bind(
        RouterSettings {
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
            max_header_bytes: a.max_header_bytes,
            workers: a
                .router_workers
                .unwrap_or_else(|| RouterSettings::default().workers),
            ..RouterSettings::default()
        },
        RouterSocks::open(&pin_dir)?,
    )?;
    let shared = router.shared.clone();
    admin.set_router(shared.clone());
    shared
        .view
        .store(Arc::new(RouteView::new(syncer.last.clone())));
    tokio::spawn(router.serve());

    let mut updates = watch_dir(&a.manifests, Duration::from_millis(a.poll_ms));
    let mut resync = tokio::time::interval(Duration::from_millis(a.resync_ms.max(100)));
    let mut last_good: Option<Store> = None;
    let mut generation = 0u64;
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                None => anyhow::bail!("the manifest watcher stopped"),
                Some(Ok(store)) => {
                    generation += 1;
                    sync(&mut syncer, &store, generation, true, &admin);
                    shared.view.store(Arc::new(RouteView::new(syncer.last.clone())));
                    last_good = Some(store);
                }
                Some(Err(errors)) => {
                    admin.sync.record_manifest_rejected(errors.len());
                    for error in &errors {
                        tracing::error!(%error, "manifest rejected");
                    }
                    tracing::error!(
                        errors = errors.len(),
                        dir = %a.manifests.display(),
                        "manifests rejected: the last good state stays in force"
                    );
                }
            },
            _ = resync.tick() => {
                if let Some(store) = &last_good
                    && sync(&mut syncer, store, generation, false, &admin)
                {
                    shared.view.store(Arc::new(RouteView::new(syncer.last.clone())));
                }
                // A tracer killed before it could switch tracing off leaves it on: switch it off.
                if let Ok(Some(stale)) = loader::inspect::clear_stale_trace(&pin_dir) {
                    admin.sync.record_stale_trace_cleared();
                    tracing::info!(tracer_pid = stale.pid, "switched off a trace whose tracer is gone");
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("stopping; pinned programs and routes stay in place");
                return Ok(());
            }
        }
    }
}

/// Applies `store`; logs `synced` for every new generation, and for resyncs that changed
/// something.
/// Returns whether anything changed.
fn sync<M, C>(
    syncer: &mut Syncer<M, C>,
    store: &Store,
    generation: u64,
    new_generation: bool,
    admin: &AdminState,
) -> bool
where
    M: redirect_agent::sync::RedirectMaps,
    C: redirect_agent::cgroup::CgroupResolver,
{
    let start = Instant::now();
    let out = syncer.sync(store);
    admin.synced(
        &syncer.last,
        pods(store),
        generation,
        start.elapsed(),
        out.applied,
        &out.failed,
    );
    for w in &out.warnings {
        tracing::warn!(warning = %w, "sync");
    }
    for f in &out.failed {
        tracing::error!(failure = %f, "map update failed");
    }
    if new_generation || out.applied > 0 || !out.failed.is_empty() {
        tracing::info!(
            generation,
            applied = out.applied,
            failed = out.failed.len(),
            services = syncer.last.services.len(),
            forks = syncer.last.forks.len(),
            workloads = syncer.last.workloads.len(),
            "synced"
        );
    }
    out.applied > 0
}

/// The pods of the store by uid, so `redirectctl` can name cgroups.
fn pods(store: &Store) -> Vec<PodEntry> {
    store
        .pods
        .iter()
        .filter_map(|p| {
            let (namespace, name) = ns_name(&p.metadata);
            Some(PodEntry {
                uid: p.metadata.uid.clone()?,
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        })
        .collect()
}
