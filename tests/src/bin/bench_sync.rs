//! The control-plane benchmark behind `cargo xtask bench sync` (see `docs/benchmarks.md`): the
//! node agent's kube source and sync at cluster scale.
//!
//! `bench_sync [--services N] [--endpoints N] [--sandboxes N] [--route-groups N] [--events N]
//! [--rounds N] [--json PATH] ...` (`--help` lists every flag)
//!
//! 1. A child process (`--generate-into DIR`, the same binary) writes the cluster of
//!    `tests/src/bench_sync/objects.rs` as JSON lists; `kube-standin --load DIR` serves them
//!    from a process of its own, so this process's memory is the agent side's alone.
//! 2. **Initial sync**: a real `KubeSource` (kube-rs client, real HTTP) starts; the time to its
//!    first snapshot and to that snapshot applied by a `Syncer` into `MemoryMaps`.
//! 3. **Full recompute**: `desired()` and `diff()` on that snapshot, `--rounds` times (median,
//!    p99), the source's own work per snapshot (the caches' copy),
//!    and one full `apply` into empty `MemoryMaps`.
//! 4. **Event → map**: `--events` API writes (`tests/src/bench_sync/events.rs`), one at a
//!    time with a pause, each timed from the write's response to the end of the map writes
//!    of the sync whose snapshot holds it (and checked: the maps must show it); a second pass
//!    with no debounce, on a restarted source, shows the debounce's share.
//! 5. **Memory**: VmRSS and VmHWM after the initial sync and after the first pass of events
//!    (the peak is reset after the rounds, which are the benchmark's own work), malloc's view
//!    (`mallinfo2`), and what the projected objects of each kind take.
//!
//! The loop of step 4 is `agent::run`'s, written out here for its timestamps: each snapshot
//! goes through `Syncer::sync` and the admin endpoint's tables (as `run_loop::sync` does), then
//! becomes the router's view; the last snapshot is re-synced every 2 s. The maps are
//! `MemoryMaps` behind a wrapper that notes the time of the last write.
//!
//! The stand-in and the object files are removed at the end, also after an error or Ctrl-C
//! (the stand-in also dies with this process: `PR_SET_PDEATHSIG`).

#[path = "../bench_sync/events.rs"]
mod events;
#[path = "../bench_sync/objects.rs"]
mod objects;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use redirect_agent::admin::AdminState;
use redirect_agent::admin::api::PodEntry;
use redirect_agent::agent::Syncer;
use redirect_agent::crd::Sandbox;
use redirect_agent::routing::{RouteView, Tables};
use redirect_agent::source::kube::health::Health;
use redirect_agent::source::kube::{KubeSource, KubeSourceConfig};
use redirect_agent::source::{Source, Update};
use redirect_agent::store::{Store, ns_name};
use redirect_agent::sync::{
    CgroupResolver, DesiredState, IdAllocator, MapError, MemoryMaps, NodeContext, RedirectMaps,
    apply, desired, diff,
};
use redirect_common::{
    ForkEndpoints, ForkKey, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};
use serde_json::Value;
use tokio::sync::Notify;

use events::{Check, Event, Events, Resource, Write};
use objects::{NODE, Plan, Scale};

/// Longest wait for the generator, for the stand-in to load and for the first snapshot.
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for one event to be applied.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agent re-applies its last snapshot (`--resync-ms`'s default).
const RESYNC: Duration = Duration::from_millis(2000);
/// Objects per generated file.
const FILE_ITEMS: usize = 2000;

/// Goals of the issue.
const GOAL_RECOMPUTE_MS: f64 = 50.0;
const GOAL_EVENT_P99_MS: f64 = 10.0;
const GOAL_RSS_MIB: f64 = 64.0;

#[derive(Parser, Debug)]
#[command(
    about = "The node agent's control plane at cluster scale: initial sync, full recompute, event -> map latency, RSS (see docs/benchmarks.md)"
)]
struct Cli {
    /// Services in the cluster (at least 10: the events need forked and unforked ones).
    #[arg(long, env = "BENCH_SYNC_SERVICES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    services: u64,
    /// Endpoints over all services, in EndpointSlices of at most 100.
    #[arg(long, env = "BENCH_SYNC_ENDPOINTS", default_value_t = 50_000)]
    endpoints: usize,
    /// Sandboxes, each forking 1 to 3 services (at least 1).
    #[arg(long, env = "BENCH_SYNC_SANDBOXES", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    sandboxes: u64,
    /// RouteGroups.
    #[arg(long, env = "BENCH_SYNC_ROUTE_GROUPS", default_value_t = 100)]
    route_groups: usize,
    /// Pods on the agent's node (half fork pods, half baseline pods).
    #[arg(long, env = "BENCH_SYNC_NODE_PODS", default_value_t = 110)]
    node_pods: usize,
    /// API writes per latency pass (two passes: default debounce, then none).
    #[arg(long, env = "BENCH_SYNC_EVENTS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    events: u64,
    /// Repetitions of the full desired()+diff().
    #[arg(long, env = "BENCH_SYNC_ROUNDS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rounds: u64,
    /// Milliseconds between an event applied and the next write (plus 0-20 ms of jitter).
    #[arg(long, env = "BENCH_SYNC_PAUSE_MS", default_value_t = 50)]
    pause_ms: u64,
    /// The agent's debounce window of the first latency pass, in milliseconds.
    #[arg(long, env = "BENCH_SYNC_DEBOUNCE_MS", default_value_t = 20)]
    debounce_ms: u64,
    /// Objects per list page of the kube source.
    #[arg(long, env = "BENCH_SYNC_PAGE_SIZE", default_value_t = 500)]
    page_size: u32,
    /// Write the figures here as JSON.
    #[arg(long, env = "BENCH_SYNC_JSON")]
    json: Option<PathBuf>,
    /// The kube-standin binary [default: next to this one].
    #[arg(long, env = "REDIRECT_KUBE_STANDIN_BIN")]
    standin: Option<PathBuf>,
    /// Only write the cluster's objects into this directory (the generator process).
    #[arg(long, hide = true)]
    generate_into: Option<PathBuf>,
}

impl Cli {
    fn scale(&self) -> Scale {
        Scale {
            services: self.services as usize,
            endpoints: self.endpoints,
            sandboxes: self.sandboxes as usize,
            route_groups: self.route_groups,
            node_pods: self.node_pods,
        }
    }
}

/// Set by SIGINT or SIGTERM: the benchmark stops and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`INTERRUPTED`] once; a second one kills as usual.
fn catch_signals() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("handling {sig}"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// Completes when a signal arrived.
async fn interrupted() {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    // As the agent does: the RSS figures are the agent's.
    redirect_agent::agent::allocator::one_arena();
    let cli = Cli::parse();
    let result = match &cli.generate_into {
        Some(dir) => generate(&Plan::new(cli.scale()), dir),
        None => catch_signals().and_then(|()| bench(&cli)),
    };
    if let Err(e) = result {
        eprintln!("bench_sync: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The generator process.

/// Writes JSON `List`s of at most [`FILE_ITEMS`] objects, in load order.
struct ListFiles<'d> {
    dir: &'d Path,
    prefix: String,
    file: Option<BufWriter<File>>,
    in_file: usize,
    files: usize,
    objects: usize,
}

impl<'d> ListFiles<'d> {
    fn new(dir: &'d Path, prefix: &str) -> Self {
        ListFiles {
            dir,
            prefix: prefix.to_string(),
            file: None,
            in_file: 0,
            files: 0,
            objects: 0,
        }
    }

    fn push(&mut self, obj: &Value) -> Result<()> {
        if self.in_file == FILE_ITEMS {
            self.close()?;
        }
        if self.file.is_none() {
            let path = self
                .dir
                .join(format!("{}-{:03}.json", self.prefix, self.files));
            let mut f = BufWriter::new(
                File::create(&path).with_context(|| format!("creating {}", path.display()))?,
            );
            f.write_all(br#"{"apiVersion": "v1", "kind": "List", "items": ["#)?;
            self.file = Some(f);
            self.files += 1;
        }
        let f = self.file.as_mut().context("no file")?;
        if self.in_file > 0 {
            f.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut *f, obj)?;
        self.in_file += 1;
        self.objects += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(mut f) = self.file.take() {
            f.write_all(b"]}\n")?;
            f.flush()?;
        }
        self.in_file = 0;
        Ok(())
    }
}

fn generate(plan: &Plan, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut w = ListFiles::new(dir, "00-namespaces");
    for ns in 0..plan.namespaces {
        w.push(&objects::namespace_object(ns))?;
    }
    w.close()?;
    let mut w = ListFiles::new(dir, "01-services");
    for i in 0..plan.services.len() as u32 {
        w.push(&objects::service(plan, i))?;
    }
    w.close()?;
    let mut w = ListFiles::new(dir, "02-endpointslices");
    for i in 0..plan.services.len() as u32 {
        for s in objects::slices(plan, i) {
            w.push(&s)?;
        }
    }
    w.close()?;
    let mut w = ListFiles::new(dir, "03-pods");
    for p in objects::local_baseline_pods(plan) {
        w.push(&p)?;
    }
    for b in 0..plan.sandboxes.len() as u32 {
        for p in objects::fork_pods(plan, b) {
            w.push(&p)?;
        }
    }
    w.close()?;
    let mut w = ListFiles::new(dir, "04-sandboxes");
    for b in 0..plan.sandboxes.len() as u32 {
        w.push(&objects::sandbox(plan, b))?;
    }
    w.close()?;
    let mut w = ListFiles::new(dir, "05-forkslices");
    for b in 0..plan.sandboxes.len() as u32 {
        for s in objects::fork_slices(plan, b)? {
            w.push(&s)?;
        }
    }
    w.close()?;
    let fork_slices = w.objects;
    let mut w = ListFiles::new(dir, "06-routegroups");
    for r in 0..plan.scale.route_groups as u32 {
        w.push(&objects::route_group(plan, r))?;
    }
    w.close()?;
    // The parent reads the count of fork slices from here.
    fs::write(dir.join("fork-slices.count"), fork_slices.to_string())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes and files, cleaned up on drop.

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop; it also dies with this process.
struct Killed(Child);

impl Killed {
    fn spawn(cmd: &mut Command) -> Result<Killed> {
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Killed(cmd.spawn()?))
    }

    /// Waits for the exit, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "still running after {timeout:?}");
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM first (the stand-in stops cleanly), then SIGKILL.
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe {
                libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
            }
            if self.wait(Duration::from_secs(3)).is_err() {
                let _ = self.0.kill();
            }
        }
        let _ = self.0.wait();
    }
}

/// The stand-in, serving the generated objects.
struct Standin {
    proc: Killed,
    url: String,
    log: PathBuf,
}

impl Standin {
    fn start(bin: &Path, objects: &Path, log: &Path) -> Result<Standin> {
        let stderr = File::create(log)?;
        let mut proc = Killed::spawn(
            Command::new(bin)
                .args(["--listen", "127.0.0.1:0", "--threads", "1", "--load"])
                .arg(objects)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr),
        )
        .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = proc.0.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let url = loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(url) => break url,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => bail!(
                    "kube-standin did not serve within {SETUP_TIMEOUT:?}: {}",
                    fs::read_to_string(log).unwrap_or_default().trim()
                ),
            }
        };
        Ok(Standin {
            proc,
            url,
            log: log.to_path_buf(),
        })
    }

    fn rss_mib(&self) -> Option<f64> {
        proc_status_kib(&format!("/proc/{}/status", self.proc.0.id()), "VmRSS:")
            .map(|k| k as f64 / 1024.0)
    }
}

/// A field of a `/proc/<pid>/status` file, in KiB.
fn proc_status_kib(path: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// This process's memory: the kernel's view (RSS, its high-water mark) and malloc's (bytes
/// handed out, and bytes freed but kept by the allocator).
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_mib: f64,
    hwm_mib: f64,
    heap_in_use_mib: f64,
    heap_free_mib: f64,
}

fn mem() -> Mem {
    let kib = |f| proc_status_kib("/proc/self/status", f).unwrap_or(0) as f64 / 1024.0;
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let mi = unsafe { libc::mallinfo2() };
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    Mem {
        rss_mib: kib("VmRSS:"),
        hwm_mib: kib("VmHWM:"),
        heap_in_use_mib: mib(mi.uordblks + mi.hblkhd),
        heap_free_mib: mib(mi.fordblks),
    }
}

/// Bytes malloc has handed out (chunk headers included).
fn heap_in_use() -> usize {
    // SAFETY: as in `mem`.
    let mi = unsafe { libc::mallinfo2() };
    mi.uordblks + mi.hblkhd
}

/// What the objects of each kind take, in MiB: the allocations of a deep copy (so without the
/// spare capacity the originals may have).
fn cache_sizes(store: &Store) -> Vec<(&'static str, usize, f64)> {
    fn deep<T: Clone>(v: &[Arc<T>]) -> f64 {
        let before = heap_in_use();
        let copy: Vec<T> = v.iter().map(|x| (**x).clone()).collect();
        let after = heap_in_use();
        drop(copy);
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
    }
    vec![
        ("Services", store.services.len(), deep(&store.services)),
        (
            "EndpointSlices",
            store.endpoint_slices.len(),
            deep(&store.endpoint_slices),
        ),
        ("Pods", store.pods.len(), deep(&store.pods)),
        ("Sandboxes", store.sandboxes.len(), deep(&store.sandboxes)),
        (
            "RouteGroups",
            store.route_groups.len(),
            deep(&store.route_groups),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The agent side.

/// Every pod of this node has a cgroup (as on a real node once its containers started): ids
/// derived from the uid.
struct AllCgroups;

impl CgroupResolver for AllCgroups {
    fn cgroup_id(&mut self, pod_uid: &str) -> Option<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in pod_uid.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Some(h | 1)
    }
}

/// CPU time of the calling thread so far. A sync runs on one thread from the snapshot to its
/// last map write (no await in between), so the difference of two readings is its CPU time,
/// which depends much less than wall-clock time on what else the machine runs.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `MemoryMaps` that remember when they were last written: the moment a sync's last map
/// update landed.
#[derive(Default)]
struct TimedMaps {
    inner: MemoryMaps,
    /// Wall clock and the writing thread's CPU time at the last write.
    last_write: Option<(Instant, Duration)>,
}

impl TimedMaps {
    fn wrote<T>(&mut self, r: Result<T, MapError>) -> Result<T, MapError> {
        self.last_write = Some((Instant::now(), thread_cpu()));
        r
    }
}

impl RedirectMaps for TimedMaps {
    fn read(&self) -> Result<Tables, MapError> {
        self.inner.read()
    }
    fn put_service(&mut self, key: SockAddr, value: ServiceValue) -> Result<(), MapError> {
        let r = self.inner.put_service(key, value);
        self.wrote(r)
    }
    fn del_service(&mut self, key: &SockAddr) -> Result<(), MapError> {
        let r = self.inner.del_service(key);
        self.wrote(r)
    }
    fn put_fork(&mut self, key: ForkKey, value: ForkEndpoints) -> Result<(), MapError> {
        let r = self.inner.put_fork(key, value);
        self.wrote(r)
    }
    fn del_fork(&mut self, key: &ForkKey) -> Result<(), MapError> {
        let r = self.inner.del_fork(key);
        self.wrote(r)
    }
    fn put_workload(&mut self, cgroup_id: u64, value: WorkloadValue) -> Result<(), MapError> {
        let r = self.inner.put_workload(cgroup_id, value);
        self.wrote(r)
    }
    fn del_workload(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        let r = self.inner.del_workload(cgroup_id);
        self.wrote(r)
    }
    fn set_router(&mut self, value: RouterConfig) -> Result<(), MapError> {
        let r = self.inner.set_router(value);
        self.wrote(r)
    }
}

type BenchSyncer = Syncer<TimedMaps, AllCgroups>;

fn new_syncer() -> Result<BenchSyncer> {
    Ok(Syncer::new(
        TimedMaps::default(),
        AllCgroups,
        Some(NODE.to_string()),
        RouterConfig::default(),
    )?)
}

fn admin_state() -> Arc<AdminState> {
    Arc::new(AdminState::new(
        "/nonexistent".into(),
        "/nonexistent".into(),
        None,
        "warn",
    ))
}

/// When the sync that held an event's write ended.
#[derive(Clone, Debug)]
struct Applied {
    /// The source yielded the snapshot.
    yielded: Instant,
    /// The last map write of its sync (or the end of the sync, when it wrote nothing).
    applied: Instant,
    /// CPU time from the snapshot to `applied`.
    cpu: Duration,
    result: Result<(), String>,
}

/// What the bench's loop and the event driver share.
#[derive(Default)]
struct Probe {
    pending: Mutex<Option<(Check, Option<Applied>)>>,
    done: Notify,
    /// Per sync of a new snapshot: snapshot yielded → maps written, and what follows (the
    /// sync's malloc trim, the admin tables, the router view).
    syncs: Mutex<Vec<(Duration, Duration)>>,
    /// When the source last yielded a snapshot (for the message of an event not applied).
    last_yield: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `run_loop::sync`, the agent's step for one snapshot, with a timestamp where the sync ends
/// and the admin endpoint's bookkeeping begins: `Syncer::sync`, then `AdminState::synced`
/// with the store's pods (its logs are left out: no subscriber here). Returns when the sync
/// ended (wall clock, thread CPU) and whether it wrote to the maps.
fn sync_step(
    syncer: &mut BenchSyncer,
    store: &Store,
    generation: u64,
    admin: &AdminState,
) -> ((Instant, Duration), bool) {
    syncer.maps.last_write = None;
    let start = Instant::now();
    let out = syncer.sync(store);
    let ended = (Instant::now(), thread_cpu());
    let pods = store
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
        .collect();
    admin.synced(
        &syncer.last,
        pods,
        generation,
        start.elapsed(),
        out.applied,
        &out.failed,
    );
    (ended, syncer.maps.last_write.is_some())
}

/// `agent::run` with timestamps: every snapshot is synced ([`sync_step`]), then published as
/// the router's view; the last snapshot is re-synced every 2 s. After each sync of a new
/// snapshot, the pending event's check runs against the snapshot and the tables.
async fn agent_loop(
    mut source: KubeSource,
    mut syncer: BenchSyncer,
    mut last_good: Store,
    probe: Arc<Probe>,
    admin: Arc<AdminState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut generation = 1u64;
    let mut view = Arc::new(RouteView::new(syncer.last.clone()));
    loop {
        tokio::select! {
            update = source.next() => {
                let yielded = Instant::now();
                let cpu_yielded = thread_cpu();
                let store = match update {
                    Some(Update::Snapshot(store)) => store,
                    Some(Update::Rejected(_)) => continue,
                    None => return,
                };
                generation += 1;
                let (ended, _) = sync_step(&mut syncer, &store, generation, &admin);
                view = Arc::new(RouteView::new(syncer.last.clone()));
                let published = Instant::now();
                // The last map write; the end of the sync when it wrote nothing.
                let (applied, cpu_applied) = syncer.maps.last_write.unwrap_or(ended);
                let cpu = cpu_applied.saturating_sub(cpu_yielded);
                lock(&probe.syncs).push((applied - yielded, published - applied));
                *lock(&probe.last_yield) = Some(yielded);
                {
                    let mut pending = lock(&probe.pending);
                    if let Some((check, outcome @ None)) = pending.as_mut()
                        && let Some(result) = check(&store, &syncer.last, syncer.maps.inner.tables())
                    {
                        *outcome = Some(Applied { yielded, applied, cpu, result });
                        probe.done.notify_one();
                    }
                }
                last_good = store;
            }
            _ = resync.tick() => {
                let (_, wrote) = sync_step(&mut syncer, &last_good, generation, &admin);
                if wrote {
                    view = Arc::new(RouteView::new(syncer.last.clone()));
                }
            }
            _ = &mut stop => {
                drop(view);
                return;
            }
        }
    }
}

/// The initial sync: a new source, its first snapshot, applied.
struct Started {
    source: KubeSource,
    syncer: BenchSyncer,
    store: Store,
    to_snapshot: Duration,
    first_sync: Duration,
    total: Duration,
}

async fn start_agent(client: &kube::Client, cli: &Cli, debounce: Duration) -> Result<Started> {
    let t0 = Instant::now();
    let mut source = KubeSource::start(
        client.clone(),
        &KubeSourceConfig {
            node_name: NODE.to_string(),
            debounce,
            page_size: cli.page_size,
        },
    );
    let store = match tokio::time::timeout(SETUP_TIMEOUT, source.next()).await {
        Ok(Some(Update::Snapshot(store))) => store,
        Ok(other) => bail!("the kube source yielded {other:?} instead of a snapshot"),
        Err(_) => bail!(
            "no snapshot within {SETUP_TIMEOUT:?}; watches: {:?}",
            source.health().watches()
        ),
    };
    let to_snapshot = t0.elapsed();
    let mut syncer = new_syncer()?;
    let t1 = Instant::now();
    let out = syncer.sync(&store);
    let first_sync = t1.elapsed();
    let total = t0.elapsed();
    ensure!(
        out.failed.is_empty(),
        "the first sync failed: {:?}",
        out.failed
    );
    Ok(Started {
        source,
        syncer,
        store,
        to_snapshot,
        first_sync,
        total,
    })
}

// ---------------------------------------------------------------------------------------------
// Writes.

struct Writer {
    client: kube::Client,
    sandbox: ApiResource,
    slice: ApiResource,
}

impl Writer {
    fn api(&self, resource: Resource, namespace: &str) -> Api<DynamicObject> {
        let ar = match resource {
            Resource::Sandbox => &self.sandbox,
            Resource::EndpointSlice => &self.slice,
        };
        Api::namespaced_with(self.client.clone(), namespace, ar)
    }

    async fn write(&self, w: &Write) -> Result<()> {
        match w {
            Write::Patch {
                resource,
                namespace,
                name,
                body,
            } => {
                self.api(*resource, namespace)
                    .patch(name, &PatchParams::default(), &Patch::Merge(body))
                    .await?;
            }
            Write::Create {
                resource,
                namespace,
                body,
            } => {
                let obj: DynamicObject = serde_json::from_value(body.clone())?;
                self.api(*resource, namespace)
                    .create(&PostParams::default(), &obj)
                    .await?;
            }
            Write::Delete {
                resource,
                namespace,
                name,
            } => {
                self.api(*resource, namespace)
                    .delete(name, &DeleteParams::default())
                    .await?;
            }
        }
        Ok(())
    }
}

/// One event as measured.
#[derive(Clone, Debug)]
struct Sample {
    kind: &'static str,
    /// Write sent → its response.
    write: Duration,
    /// Response → the last map write of the sync that holds it (0 when that came first).
    latency: Duration,
    /// Response → snapshot yielded (negative: before the response), in ms.
    to_snapshot_ms: f64,
    /// Snapshot yielded → maps written.
    sync: Duration,
    /// Its CPU time.
    sync_cpu: Duration,
}

/// One latency pass: `n` events through the running agent loop.
async fn latency_pass(
    events: &mut Events<'_>,
    n: usize,
    writer: &Writer,
    probe: &Probe,
    health: &Health,
    pause: Duration,
) -> Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(n);
    let mut jitter = objects::Rng::new(n as u64 + 17);
    for _ in 0..n {
        let Event {
            kind,
            what,
            write,
            check,
        } = events.next_event();
        *lock(&probe.pending) = Some((check, None));
        let sent = Instant::now();
        writer
            .write(&write)
            .await
            .with_context(|| format!("writing: {what}"))?;
        let responded = Instant::now();
        let syncs_before = lock(&probe.syncs).len();
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        let applied = loop {
            if let Some((_, Some(a))) = lock(&probe.pending).as_ref() {
                break a.clone();
            }
            if tokio::time::timeout_at(deadline, probe.done.notified())
                .await
                .is_err()
            {
                let syncs = lock(&probe.syncs).len() - syncs_before;
                let last = lock(&probe.last_yield).map(|t| t.elapsed());
                let watches: Vec<String> = health
                    .watches()
                    .iter()
                    .map(|w| {
                        format!(
                            "{} {} events, {} objects",
                            w.kind, w.events_total, w.objects
                        )
                    })
                    .collect();
                bail!(
                    "not applied within {EVENT_TIMEOUT:?}: {what} ({syncs} snapshots synced \
                     since the write, the last yielded {last:?} ago; watches: {})",
                    watches.join(", ")
                );
            }
        };
        *lock(&probe.pending) = None;
        if let Err(e) = &applied.result {
            bail!("{what}: the sync that holds it left the maps wrong: {e}");
        }
        let signed_ms = |a: Instant, b: Instant| {
            if a >= b {
                (a - b).as_secs_f64() * 1e3
            } else {
                -((b - a).as_secs_f64() * 1e3)
            }
        };
        samples.push(Sample {
            kind,
            write: responded - sent,
            latency: applied.applied.saturating_duration_since(responded),
            to_snapshot_ms: signed_ms(applied.yielded, responded),
            sync: applied.applied.saturating_duration_since(applied.yielded),
            sync_cpu: applied.cpu,
        });
        let extra = Duration::from_millis(jitter.below(21) as u64);
        tokio::time::sleep(pause + extra).await;
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------------------------
// Statistics and output.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of unsorted values.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn p50(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn p99(v: &[f64]) -> f64 {
    percentile(v, 99.0)
}

/// Full recompute figures.
struct Recompute {
    desired_diff: Vec<f64>,
    /// The same, CPU time.
    desired_diff_cpu: Vec<f64>,
    desired: Vec<f64>,
    diff: Vec<f64>,
    /// Per snapshot in the kube source: the lists' copy, and the previous snapshot's drop (in
    /// the loop).
    source_copy: Vec<f64>,
    source_drop: Vec<f64>,
    /// `DesiredState::desired` (the agent's, which remembers) on a snapshot it has seen: the
    /// floor of every sync.
    desired_unchanged: Vec<f64>,
    diff_full: f64,
    apply_full: f64,
    ops_full: usize,
}

fn recompute(store: &Store, last: &Tables, rounds: u64) -> Result<Recompute> {
    let mut ids = IdAllocator::new();
    let mut cgroups = AllCgroups;
    let mut node = NodeContext {
        node_name: Some(NODE.to_string()),
        router: RouterConfig::default(),
        cgroups: &mut cgroups,
    };
    // Warm the id allocator as a running agent's is.
    let want = desired(store, &mut node, &mut ids);
    ensure!(
        want.tables == *last,
        "desired() on the snapshot differs from what the first sync applied"
    );
    let (mut dd, mut de, mut di, mut dd_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let cpu0 = thread_cpu();
        let t0 = Instant::now();
        let want = desired(store, &mut node, &mut ids);
        let t1 = Instant::now();
        let ops = diff(last, &want.tables);
        let t2 = Instant::now();
        dd_cpu.push(ms(thread_cpu() - cpu0));
        ensure!(ops.is_empty(), "diff of an unchanged store is not empty");
        drop(want);
        dd.push(ms(t2 - t0));
        de.push(ms(t1 - t0));
        di.push(ms(t2 - t1));
    }
    // What the kube source does per snapshot besides: copy the caches' lists (Store::clone
    // does the same: a Vec<Arc<_>> per kind).
    let (mut source_copy, mut source_drop) = (Vec::new(), Vec::new());
    for _ in 0..rounds.min(20) {
        let t0 = Instant::now();
        let copy = store.clone();
        let t1 = Instant::now();
        drop(copy);
        source_copy.push(ms(t1 - t0));
        source_drop.push(ms(t1.elapsed()));
    }
    let mut state = DesiredState::new(ids);
    state.desired(store, &mut node);
    let mut desired_unchanged = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let want = state.desired(store, &mut node);
        desired_unchanged.push(ms(t0.elapsed()));
        ensure!(
            want.tables == *last,
            "the remembering desired() differs from a fresh one"
        );
    }
    let empty = MemoryMaps::new().read()?;
    let t0 = Instant::now();
    let ops = diff(&empty, last);
    let diff_full = ms(t0.elapsed());
    let ops_full = ops.len();
    let mut maps = MemoryMaps::new();
    let t0 = Instant::now();
    let report = apply(ops, &mut maps);
    let apply_full = ms(t0.elapsed());
    ensure!(report.failed.is_empty(), "the full apply failed");
    Ok(Recompute {
        desired_diff: dd,
        desired_diff_cpu: dd_cpu,
        desired: de,
        diff: di,
        source_copy,
        source_drop,
        desired_unchanged,
        diff_full,
        apply_full,
        ops_full,
    })
}

fn goal_text(value: f64, goal: f64) -> String {
    if value < goal {
        format!("< {goal} met")
    } else {
        format!("< {goal} MISSED")
    }
}

/// `[{"name": …, "value": …, "unit": …}, …]`, as the other benchmarks write.
fn write_json(path: &Path, entries: &[(String, f64, &str)]) -> Result<()> {
    let body: Vec<String> = entries
        .iter()
        .map(|(name, value, unit)| {
            format!("  {{\"name\": \"{name}\", \"value\": {value:.3}, \"unit\": \"{unit}\"}}")
        })
        .collect();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, format!("[\n{}\n]\n", body.join(",\n")))
        .with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

fn standin_bin(cli: &Cli) -> Result<PathBuf> {
    if let Some(p) = &cli.standin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("no directory of the executable")?
        .join("kube-standin");
    ensure!(
        bin.exists(),
        "{} not found: build it (`cargo build --release -p redirect-tests --bin kube-standin`) or pass --standin",
        bin.display()
    );
    Ok(bin)
}

fn bench(cli: &Cli) -> Result<()> {
    let scale = cli.scale();
    let standin_bin = standin_bin(cli)?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("redirect-bench-sync-{}", std::process::id())));
    let objects_dir = dir.0.join("objects");
    fs::create_dir_all(&objects_dir)?;

    // 1. Objects, in a process of their own; then the stand-in loads them.
    let t0 = Instant::now();
    let mut generator = Killed::spawn(
        Command::new(std::env::current_exe()?)
            .args(scale.args())
            .arg("--generate-into")
            .arg(&objects_dir)
            .stdin(Stdio::null()),
    )?;
    let status = generator
        .wait(SETUP_TIMEOUT)
        .context("generating the objects")?;
    ensure!(status.success(), "generating the objects: {status}");
    let fork_slices: usize = fs::read_to_string(objects_dir.join("fork-slices.count"))?
        .trim()
        .parse()?;
    let bytes: u64 = fs::read_dir(&objects_dir)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "bench_sync: objects generated in {:.1} s ({:.0} MB of JSON); starting kube-standin",
        t0.elapsed().as_secs_f64(),
        bytes as f64 / 1e6
    );
    let t0 = Instant::now();
    let standin = Standin::start(&standin_bin, &objects_dir, &dir.0.join("standin.log"))?;
    eprintln!(
        "bench_sync: kube-standin serves at {} after {:.1} s",
        standin.url,
        t0.elapsed().as_secs_f64()
    );
    let _ = fs::remove_dir_all(&objects_dir);

    let plan = Plan::new(scale);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            r = measure(cli, &plan, fork_slices, &standin) => r,
            () = interrupted() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    drop(runtime);
    if result.is_err() {
        eprintln!(
            "bench_sync: kube-standin's log: {}",
            fs::read_to_string(&standin.log).unwrap_or_default().trim()
        );
    }
    drop(standin);
    drop(dir);
    result
}

async fn measure(cli: &Cli, plan: &Plan, fork_slices: usize, standin: &Standin) -> Result<()> {
    let config = kube::Config::new(standin.url.parse().context("the stand-in's URL")?);
    let client = kube::Client::try_from(config)?;
    let debounce = Duration::from_millis(cli.debounce_ms);

    // 2. Initial sync.
    eprintln!("bench_sync: initial sync");
    let started = start_agent(&client, cli, debounce).await?;
    let mem_synced = mem();
    let store = &started.store;
    let want_slices = plan.baseline_slices() + fork_slices;
    ensure!(
        store.services.len() == plan.services.len()
            && store.endpoint_slices.len() == want_slices
            && store.pods.len()
                == plan
                    .scale
                    .node_pods
                    .min(plan.local_fork_pods() + plan.local_endpoints.len())
            && store.sandboxes.len() == plan.sandboxes.len()
            && store.route_groups.len() == plan.scale.route_groups,
        "the snapshot holds {} services, {} slices, {} pods, {} sandboxes, {} route groups; \
         expected {}, {want_slices}, {}, {}, {}",
        store.services.len(),
        store.endpoint_slices.len(),
        store.pods.len(),
        store.sandboxes.len(),
        store.route_groups.len(),
        plan.services.len(),
        plan.local_fork_pods() + plan.local_endpoints.len(),
        plan.sandboxes.len(),
        plan.scale.route_groups
    );
    let tables = (*started.syncer.last).clone();
    let initial = (started.to_snapshot, started.first_sync, started.total);
    let standin_rss = standin.rss_mib();

    // 3. Full recompute.
    eprintln!("bench_sync: {} rounds of desired()+diff()", cli.rounds);
    let rc = recompute(store, &tables, cli.rounds)?;
    // While the agent is idle: what the projected objects take, kind by kind.
    let sizes = cache_sizes(store);
    // The rounds and the copies are the benchmark's, not the agent's: give back what they
    // freed and start the peak (VmHWM) afresh, so that the peak reported below is that of the
    // event handling.
    // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
    let hwm_reset = fs::write("/proc/self/clear_refs", "5").is_ok();

    // 4. Event → map, with the debounce, then without.
    let writer = Writer {
        client: client.clone(),
        sandbox: ApiResource::erase::<Sandbox>(&()),
        slice: ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&()),
    };
    let mut events = Events::new(plan);
    let pause = Duration::from_millis(cli.pause_ms);
    let mut passes: Vec<Pass> = Vec::new();
    let mut started = Some(started);
    let mut mem_end = Mem::default();
    for debounce in [debounce, Duration::ZERO] {
        let s = match started.take() {
            Some(s) => s,
            None => {
                eprintln!("bench_sync: restarting the source with no debounce");
                start_agent(&client, cli, debounce).await?
            }
        };
        eprintln!(
            "bench_sync: {} events, debounce {} ms",
            cli.events,
            debounce.as_millis()
        );
        let probe = Arc::new(Probe::default());
        let health = s.source.health();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(agent_loop(
            s.source,
            s.syncer,
            s.store,
            probe.clone(),
            admin_state(),
            stop_rx,
        ));
        let samples = latency_pass(
            &mut events,
            cli.events as usize,
            &writer,
            &probe,
            &health,
            pause,
        )
        .await;
        if passes.is_empty() {
            // The agent after its events, still running; the second pass restarts the source
            // in this process, which a real agent never does.
            mem_end = mem();
        }
        let _ = stop_tx.send(());
        task.await?;
        let syncs = std::mem::take(&mut *lock(&probe.syncs));
        passes.push(Pass {
            debounce,
            samples: samples?,
            syncs,
        });
    }

    report(
        cli,
        plan,
        fork_slices,
        &tables,
        initial,
        &rc,
        &passes,
        (mem_synced, mem_end, standin_rss, hwm_reset),
        &sizes,
    )
}

/// One latency pass as measured.
struct Pass {
    debounce: Duration,
    samples: Vec<Sample>,
    /// Per sync of a new snapshot: snapshot → maps written, bookkeeping after.
    syncs: Vec<(Duration, Duration)>,
}

impl Pass {
    fn latencies(&self) -> Vec<f64> {
        self.samples.iter().map(|s| ms(s.latency)).collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cli: &Cli,
    plan: &Plan,
    fork_slices: usize,
    tables: &Tables,
    (to_snapshot, first_sync, initial): (Duration, Duration, Duration),
    rc: &Recompute,
    passes: &[Pass],
    (synced, end, standin_rss, hwm_reset): (Mem, Mem, Option<f64>, bool),
    sizes: &[(&str, usize, f64)],
) -> Result<()> {
    let mut json: Vec<(String, f64, &str)> = Vec::new();
    println!();
    println!(
        "control plane at {} services, {} endpoints in {} EndpointSlices (+{} fork slices), \
         {} sandboxes ({} forks, {} fork pods), {} route groups; this node: {} pods ({} fork pods)",
        plan.services.len(),
        plan.scale.endpoints,
        plan.baseline_slices(),
        fork_slices,
        plan.sandboxes.len(),
        plan.forks(),
        plan.fork_pods,
        plan.scale.route_groups,
        plan.local_fork_pods() + plan.local_endpoints.len(),
        plan.local_fork_pods(),
    );
    println!(
        "tables: {} services_v1, {} forks_v1, {} workloads_v1 entries, {} keys; \
         maps: MemoryMaps (in memory, not the kernel's)",
        tables.services.len(),
        tables.forks.len(),
        tables.workloads.len(),
        tables.keys.len()
    );
    println!();
    println!("{:<58} {:>11}   goal", "figure", "value");
    let row = |name: &str, value: String, goal: String| {
        println!("{name:<58} {value:>11}   {goal}");
    };
    let none = || "-".to_string();

    row(
        "initial sync: source start -> first sync applied",
        format!("{:.0} ms", ms(initial)),
        none(),
    );
    row(
        "  lists until the first snapshot",
        format!("{:.0} ms", ms(to_snapshot)),
        none(),
    );
    row(
        "  first sync (desired + diff + apply)",
        format!("{:.1} ms", ms(first_sync)),
        none(),
    );
    json.push(("initial_sync".into(), ms(initial), "ms"));
    json.push(("initial_sync_lists".into(), ms(to_snapshot), "ms"));
    json.push(("initial_sync_first_sync".into(), ms(first_sync), "ms"));

    let n = rc.desired_diff.len();
    let (dd50, dd99) = (p50(&rc.desired_diff), p99(&rc.desired_diff));
    row(
        &format!("desired()+diff() median of {n}"),
        format!("{dd50:.2} ms"),
        goal_text(dd50, GOAL_RECOMPUTE_MS),
    );
    row(
        &format!("desired()+diff() p99 of {n}"),
        format!("{dd99:.2} ms"),
        goal_text(dd99, GOAL_RECOMPUTE_MS),
    );
    row(
        "  its CPU time median / p99",
        format!(
            "{:.2} / {:.2}",
            p50(&rc.desired_diff_cpu),
            p99(&rc.desired_diff_cpu)
        ),
        none(),
    );
    row(
        "  desired() median",
        format!("{:.2} ms", p50(&rc.desired)),
        none(),
    );
    row(
        "  diff() median (nothing changed)",
        format!("{:.3} ms", p50(&rc.diff)),
        none(),
    );
    row(
        "desired(), remembering, nothing changed: median",
        format!("{:.2} ms", p50(&rc.desired_unchanged)),
        none(),
    );
    row(
        "per snapshot: lists' copy / drop",
        format!("{:.2} / {:.2}", p50(&rc.source_copy), p50(&rc.source_drop)),
        none(),
    );
    row(
        &format!("first full apply into MemoryMaps ({} ops)", rc.ops_full),
        format!("{:.2} ms", rc.apply_full),
        none(),
    );
    row(
        "  its diff() from empty maps",
        format!("{:.2} ms", rc.diff_full),
        none(),
    );
    json.push(("desired_diff_p50".into(), dd50, "ms"));
    json.push(("desired_diff_p99".into(), dd99, "ms"));
    json.push((
        "desired_diff_cpu_p50".into(),
        p50(&rc.desired_diff_cpu),
        "ms",
    ));
    json.push(("desired_p50".into(), p50(&rc.desired), "ms"));
    json.push(("diff_p50".into(), p50(&rc.diff), "ms"));
    json.push(("snapshot_copy_p50".into(), p50(&rc.source_copy), "ms"));
    json.push((
        "desired_unchanged_p50".into(),
        p50(&rc.desired_unchanged),
        "ms",
    ));
    json.push(("snapshot_drop_p50".into(), p50(&rc.source_drop), "ms"));
    json.push(("apply_full".into(), rc.apply_full, "ms"));
    json.push(("diff_full".into(), rc.diff_full, "ms"));

    for pass in passes {
        let lat = pass.latencies();
        let d = pass.debounce.as_millis();
        let tag = if d == 0 {
            "no_debounce".to_string()
        } else {
            "debounce".to_string()
        };
        let label = format!("debounce {d} ms");
        let (l50, l99) = (p50(&lat), p99(&lat));
        row(
            &format!("event -> map p50 ({label}, {} events)", lat.len()),
            format!("{l50:.2} ms"),
            none(),
        );
        row(
            &format!("event -> map p99 ({label})"),
            format!("{l99:.2} ms"),
            goal_text(l99, GOAL_EVENT_P99_MS),
        );
        let to_snap: Vec<f64> = pass.samples.iter().map(|s| s.to_snapshot_ms).collect();
        let sync: Vec<f64> = pass.samples.iter().map(|s| ms(s.sync)).collect();
        let write: Vec<f64> = pass.samples.iter().map(|s| ms(s.write)).collect();
        row(
            "  response -> snapshot yielded p50 / p99",
            format!("{:.2} / {:.2}", p50(&to_snap), p99(&to_snap)),
            none(),
        );
        row(
            "  snapshot -> maps written p50 / p99",
            format!("{:.2} / {:.2}", p50(&sync), p99(&sync)),
            none(),
        );
        let sync_cpu: Vec<f64> = pass.samples.iter().map(|s| ms(s.sync_cpu)).collect();
        row(
            "    its CPU time p50 / p99",
            format!("{:.2} / {:.2}", p50(&sync_cpu), p99(&sync_cpu)),
            none(),
        );
        let book: Vec<f64> = pass.syncs.iter().map(|s| ms(s.1)).collect();
        row(
            "  after the maps: trim, admin tables, router view p50",
            format!("{:.2} ms", p50(&book)),
            none(),
        );
        row(
            "  the write's round trip p50",
            format!("{:.2} ms", p50(&write)),
            none(),
        );
        let mut by_kind = String::new();
        for kind in events::KINDS {
            let v: Vec<f64> = pass
                .samples
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| ms(s.latency))
                .collect();
            if !v.is_empty() {
                by_kind.push_str(&format!("{kind} {:.1}  ", p50(&v)));
            }
        }
        println!("  p50 by event (ms): {}", by_kind.trim_end());
        json.push((format!("event_to_map_{tag}_p50"), l50, "ms"));
        json.push((format!("event_to_map_{tag}_p99"), l99, "ms"));
        json.push((format!("event_to_snapshot_{tag}_p50"), p50(&to_snap), "ms"));
        json.push((format!("event_snapshot_to_map_{tag}_p50"), p50(&sync), "ms"));
        json.push((
            format!("event_snapshot_to_map_cpu_{tag}_p50"),
            p50(&sync_cpu),
            "ms",
        ));
    }
    if let [with, without] = passes {
        let (a, b) = (with.latencies(), without.latencies());
        let share50 = p50(&a) - p50(&b);
        let share99 = p99(&a) - p99(&b);
        row(
            &format!(
                "debounce share p50 / p99 ({} ms minus 0 ms)",
                with.debounce.as_millis()
            ),
            format!("{share50:.2} / {share99:.2}"),
            none(),
        );
        json.push(("debounce_share_p50".into(), share50, "ms"));
        json.push(("debounce_share_p99".into(), share99, "ms"));
    }

    row(
        "RSS after the initial sync (VmRSS)",
        format!("{:.1} MiB", synced.rss_mib),
        goal_text(synced.rss_mib, GOAL_RSS_MIB),
    );
    row(
        "  peak until then (VmHWM)",
        format!("{:.1} MiB", synced.hwm_mib),
        goal_text(synced.hwm_mib, GOAL_RSS_MIB),
    );
    row(
        "  malloc: in use / freed but kept",
        format!(
            "{:.1} / {:.1}",
            synced.heap_in_use_mib, synced.heap_free_mib
        ),
        none(),
    );
    row(
        "RSS after the events (VmRSS, first pass)",
        format!("{:.1} MiB", end.rss_mib),
        goal_text(end.rss_mib, GOAL_RSS_MIB),
    );
    row(
        if hwm_reset {
            "  peak during the events (VmHWM)"
        } else {
            "  peak so far (VmHWM; could not reset it)"
        },
        format!("{:.1} MiB", end.hwm_mib),
        goal_text(end.hwm_mib, GOAL_RSS_MIB),
    );
    row(
        "  malloc: in use / freed but kept",
        format!("{:.1} / {:.1}", end.heap_in_use_mib, end.heap_free_mib),
        none(),
    );
    for (kind, n, mib) in sizes {
        row(
            &format!("  cache: {n} {kind}"),
            format!("{mib:.1} MiB"),
            none(),
        );
        json.push((format!("cache_{}", kind.to_lowercase()), *mib, "MiB"));
    }
    if let Some(s) = standin_rss {
        row(
            "  (kube-standin's own RSS, another process)",
            format!("{s:.0} MiB"),
            none(),
        );
    }
    json.push(("rss_after_sync".into(), synced.rss_mib, "MiB"));
    json.push(("rss_peak_initial_sync".into(), synced.hwm_mib, "MiB"));
    json.push(("heap_after_sync".into(), synced.heap_in_use_mib, "MiB"));
    json.push(("rss_end".into(), end.rss_mib, "MiB"));
    json.push(("rss_peak_events".into(), end.hwm_mib, "MiB"));
    json.push(("heap_end".into(), end.heap_in_use_mib, "MiB"));

    if let Some(path) = &cli.json {
        write_json(path, &json)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}
