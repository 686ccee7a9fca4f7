//! kube-standin: the Kubernetes API server stand-in of `redirect_tests::apiserver`, as a
//! process, for manual runs and benchmarks. `kube-standin --help` documents the flags.
//!
//! Prints `listening on http://ADDR` once it serves (and has loaded every `--load` file),
//! then serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use redirect_tests::apiserver::{ApiServer, Options};

#[derive(Parser)]
#[command(
    version,
    about = "A Kubernetes API server stand-in (list, watch, writes, discovery) for tests and benchmarks of redirect"
)]
struct Cli {
    /// Address to listen on (plain HTTP, no authentication).
    #[arg(long, env = "KUBE_STANDIN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// YAML or JSON manifests to load at start: files, or directories whose `*.yaml`, `*.yml`
    /// and `*.json` files are loaded in name order (not recursively). Repeatable; the
    /// environment variable takes a comma-separated list. A redirect.dev
    /// CustomResourceDefinition among them installs the CRDs.
    #[arg(long, env = "KUBE_STANDIN_LOAD", value_delimiter = ',')]
    load: Vec<PathBuf>,
    /// Write a kubeconfig for this server here (for `KUBECONFIG=...`).
    #[arg(long, env = "KUBE_STANDIN_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds a watch with `allowWatchBookmarks=true` stays idle before a BOOKMARK.
    #[arg(long, env = "KUBE_STANDIN_BOOKMARK_MS", default_value_t = 1000)]
    bookmark_ms: u64,
    /// Start without the redirect.dev CRDs: sandboxes and routegroups answer 404 until a
    /// loaded manifest installs them.
    #[arg(long, env = "KUBE_STANDIN_NO_CRDS")]
    no_crds: bool,
    /// Changes kept per resource for watches to replay; older ones answer 410 Expired.
    #[arg(long, env = "KUBE_STANDIN_HISTORY", default_value_t = 100_000)]
    history: usize,
    /// Tokio worker threads (1: a single-threaded runtime).
    #[arg(long, env = "KUBE_STANDIN_THREADS", default_value_t = 2)]
    threads: usize,
    /// Bind inside this network namespace (a path like /run/netns/NAME).
    #[arg(long, env = "KUBE_STANDIN_NETNS")]
    netns: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kube-standin: {e:#}");
        std::process::exit(1);
    }
}

/// The manifest files under `path`, in load order.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))?;
    files.retain(|f| {
        f.is_file()
            && f.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
    });
    files.sort();
    Ok(files)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let api = ApiServer::start_with(Options {
        addr: cli.listen,
        bookmark_interval: Duration::from_millis(cli.bookmark_ms.max(1)),
        netns: cli.netns,
        crds_installed: !cli.no_crds,
        history_limit: cli.history,
        threads: cli.threads,
    })?;
    let started = Instant::now();
    let mut files = 0;
    for path in &cli.load {
        for file in manifest_files(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            api.apply_yaml(&text)
                .with_context(|| format!("loading {}", file.display()))?;
            files += 1;
        }
    }
    if files > 0 {
        eprintln!(
            "kube-standin: loaded {files} files up to resourceVersion {} in {:?}",
            api.resource_version(),
            started.elapsed()
        );
    }
    if let Some(path) = &cli.kubeconfig {
        api.write_kubeconfig(path)?;
    }
    println!("listening on {}", api.url());
    wait_for_signal()?;
    drop(api);
    Ok(())
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok(())
        })
}
