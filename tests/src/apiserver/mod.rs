//! A Kubernetes API server stand-in, for testing the node agent's real kube-rs client over
//! real HTTP where no kube-apiserver can run.
//!
//! ```no_run
//! use redirect_tests::apiserver::ApiServer;
//! use serde_json::json;
//!
//! let api = ApiServer::start()?;
//! api.apply_json(json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "p1", "namespace": "default"},
//!     "spec": {"nodeName": "n1", "containers": []},
//! }))?;
//! let config = kube::Config::new(api.url().parse()?);
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! # What it implements
//! Written to <https://kubernetes.io/docs/reference/using-api/api-concepts/>, for what
//! kube-runtime's `watcher`/`reflector` and kube-client's `Api` use:
//! - **Resources** (`resources.rs`): core `v1` namespaces (cluster-scoped), pods, services,
//!   events; `discovery.k8s.io/v1` endpointslices; `coordination.k8s.io/v1` leases;
//!   `events.k8s.io/v1` events; `redirect.dev/v1alpha1` sandboxes (with `/status`) and
//!   routegroups, which answer 404 and are absent from discovery until the CRDs are
//!   installed. Pods, services and namespaces have `/status` too. Discovery: `/api`,
//!   `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`, `/version`.
//! - **Versions and history** (`store.rs`): one global resourceVersion (the empty store is
//!   at 1, so no list answers "0"); per-resource history that [`ApiServer::compact`] (or the
//!   history limit) cuts, after which older watches and continue tokens get 410 Expired.
//! - **LIST** (`http.rs`): `limit`/`continue`, `resourceVersion` (+`resourceVersionMatch`),
//!   label and field selectors (`selector.rs`; unsupported field labels answer 400).
//! - **WATCH** (`watch.rs`): replay from a version; synthetic ADDED events first when
//!   `resourceVersion` is unset or "0" (as the API concepts page specifies for both); streaming
//!   lists (`sendInitialEvents`); bookmarks; `timeoutSeconds`; selector transitions as
//!   ADDED/DELETED; a version older than the history as one 410 `ERROR` event.
//! - **Writes**: create (`generateName`, 409 AlreadyExists), replace (409 Conflict on a stale
//!   resourceVersion; custom resources need one, 422 otherwise), merge/strategic-merge/apply
//!   patches (all as merge patches; apply needs `fieldManager` and creates missing objects),
//!   `/status`, delete (answering a `Status` Success) with preconditions and owner-reference
//!   cascading, deletecollection. Writes that change nothing are no-ops (no new version, no
//!   event).
//! - **Faults**: [`ApiServer::compact`], [`ApiServer::drop_watches`],
//!   [`ApiServer::set_down`], [`ApiServer::fail_next`]; every request is recorded
//!   ([`ApiServer::requests`]). Injected failures carry no `Retry-After`: kube-client
//!   retries 429/503/504 by itself after a few milliseconds.
//!
//! # What it does not
//! No authentication or authorization (`Authorization` is ignored), no admission, no schema
//! validation or defaulting (objects are stored as sent, beyond `metadata`), no
//! `managedFields` or apply conflicts, no strategic-merge list semantics, no JSON patch
//! (415), no `dryRun`, no graceful deletion or finalizers, no namespace lifecycle (objects in
//! unknown namespaces are accepted; deleting a namespace leaves its objects), no protobuf or
//! CBOR, no list snapshots at old versions (pages after the first reflect the current state;
//! `resourceVersionMatch=Exact` is served only for the current version), no aggregated
//! discovery or OpenAPI.

mod http;
mod patch;
mod resources;
mod selector;
mod status;
mod store;
mod watch;

use std::collections::VecDeque;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch as signal;

pub use status::ApiError;
use store::{DeleteOptions, Store, Write};

/// Requests kept by [`ApiServer::requests`] (the oldest are dropped beyond).
const MAX_RECORDED: usize = 100_000;

/// How to start an [`ApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen (default `127.0.0.1:0`, a free port).
    pub addr: SocketAddr,
    /// How long a watch with `allowWatchBookmarks=true` stays idle before a BOOKMARK
    /// (default 1 s).
    pub bookmark_interval: Duration,
    /// A network namespace (`/run/netns/<name>`) to bind the listening socket in.
    pub netns: Option<PathBuf>,
    /// Whether the redirect.dev CRDs are installed at start (default true); see
    /// [`ApiServer::install_crds`].
    pub crds_installed: bool,
    /// Changes kept per resource for watches to replay (default 100 000); older ones are
    /// dropped as if compacted.
    pub history_limit: usize,
    /// Tokio worker threads (default 1: a current-thread runtime).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bookmark_interval: Duration::from_secs(1),
            netns: None,
            crds_installed: true,
            history_limit: 100_000,
            threads: 1,
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// The path, percent-encoded as sent.
    pub path: String,
    /// Query parameters in order, decoded.
    pub query: Vec<(String, String)>,
    pub user_agent: Option<String>,
    /// The HTTP status answered (200 for every watch that started).
    pub status: u16,
    pub at: SystemTime,
}

impl RequestRecord {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        http::param(&self.query, name)
    }

    /// A GET with `watch=true` (or `1`).
    pub fn is_watch(&self) -> bool {
        self.method == "GET" && http::bool_param(&self.query, "watch") == Ok(Some(true))
    }

    /// A GET of a collection that is not a watch (`path` ends with `plural`).
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == "GET" && !self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }

    /// A watch of a collection `plural`.
    pub fn is_watch_of(&self, plural: &str) -> bool {
        self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }
}

/// State shared by the server thread and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    pub bookmark_interval: Duration,
    down: AtomicBool,
    failures: Mutex<(usize, u16)>,
    requests: Mutex<VecDeque<RequestRecord>>,
    pub open_watches: AtomicUsize,
    /// Changed to cut every watch stream.
    pub cut_watches: signal::Sender<u64>,
    /// Changed to cut every connection.
    pub cut_connections: signal::Sender<u64>,
    addr: OnceLock<SocketAddr>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// The status to answer instead of serving, while injected failures remain.
    pub fn take_failure(&self) -> Option<u16> {
        let mut f = lock(&self.failures);
        if f.0 == 0 {
            return None;
        }
        f.0 -= 1;
        Some(f.1)
    }

    pub fn record(&self, r: RequestRecord) {
        let mut requests = lock(&self.requests);
        if requests.len() >= MAX_RECORDED {
            requests.pop_front();
        }
        requests.push_back(r);
    }

    /// `host:port` for discovery's `serverAddressByClientCIDRs`.
    pub fn address(&self) -> String {
        self.addr.get().map(|a| a.to_string()).unwrap_or_default()
    }

    fn cut(sender: &signal::Sender<u64>) {
        sender.send_modify(|g| *g += 1);
    }
}

/// A running stand-in, on its own thread with its own tokio runtime; dropping it stops the
/// server (open connections are closed).
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: signal::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts with the default [`Options`]: `127.0.0.1` on a free port, CRDs installed.
    pub fn start() -> Result<ApiServer> {
        ApiServer::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Result<ApiServer> {
        let seed: [u8; 16] = crate::names::random_bytes().context("reading /dev/urandom")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(opts.history_limit, seed, opts.crds_installed)),
            bookmark_interval: opts.bookmark_interval,
            down: AtomicBool::new(false),
            failures: Mutex::new((0, 0)),
            requests: Mutex::new(VecDeque::new()),
            open_watches: AtomicUsize::new(0),
            cut_watches: signal::channel(0).0,
            cut_connections: signal::channel(0).0,
            addr: OnceLock::new(),
        });
        let (shutdown, shutdown_rx) = signal::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-standin".into())
            .spawn(move || {
                let setup = || -> Result<(std::net::TcpListener, tokio::runtime::Runtime)> {
                    if let Some(path) = &opts.netns {
                        let f = File::open(path)
                            .with_context(|| format!("opening {}", path.display()))?;
                        setns(&f, CloneFlags::CLONE_NEWNET)
                            .with_context(|| format!("setns {}", path.display()))?;
                    }
                    let listener = std::net::TcpListener::bind(opts.addr)
                        .with_context(|| format!("binding {}", opts.addr))?;
                    listener.set_nonblocking(true)?;
                    let mut builder = if opts.threads <= 1 {
                        tokio::runtime::Builder::new_current_thread()
                    } else {
                        let mut b = tokio::runtime::Builder::new_multi_thread();
                        b.worker_threads(opts.threads);
                        b
                    };
                    let rt = builder.enable_all().build().context("tokio runtime")?;
                    Ok((listener, rt))
                };
                let (listener, rt) = match setup() {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match listener
                        .local_addr()
                        .and_then(|a| Ok((a, tokio::net::TcpListener::from_std(listener)?)))
                    {
                        Ok((addr, l)) => {
                            let _ = server_shared.addr.set(addr);
                            let _ = ready_tx.send(Ok(addr));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    http::serve(listener, server_shared, shutdown_rx).await;
                });
            })
            .context("spawning the API server thread")?;
        let addr = ready_rx.recv().context("the API server thread died")??;
        Ok(ApiServer {
            addr,
            shared,
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (plain http, no credentials, namespace `default`),
    /// for `KUBECONFIG` and `kube::Config::infer()`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: standin\nusers:\n- name: standin\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The resource of an object from its `apiVersion` and `kind`, and its namespace
    /// (`default` when a namespaced object has none).
    fn locate(obj: &Value) -> Result<(usize, String)> {
        let api_version = obj["apiVersion"]
            .as_str()
            .context("object without apiVersion")?;
        let kind = obj["kind"].as_str().context("object without kind")?;
        let res = resources::by_kind(api_version, kind)
            .with_context(|| format!("{api_version} {kind} is not served"))?;
        let namespace = if resources::RESOURCES[res].namespaced {
            store::meta_str(obj, "namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        Ok((res, namespace))
    }

    fn resource(api_version: &str, kind: &str) -> Result<usize> {
        resources::by_kind(api_version, kind)
            .with_context(|| format!("{api_version} {kind} is not served"))
    }

    /// Creates or replaces an object as an administrator would: unconditionally (any
    /// `resourceVersion` in `obj` is ignored), status included, keeping `uid` and
    /// `creationTimestamp` of an existing object. A new object keeps the `uid` it names when
    /// no other object has it (a Pod's uid names its cgroup in the mini-cluster). Returns the
    /// object as stored.
    pub fn apply_json(&self, mut obj: Value) -> Result<Value> {
        let (res, namespace) = Self::locate(&obj)?;
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        let mut store = self.shared.store();
        if !store.served(res) {
            bail!("{}: the redirect.dev CRDs are not installed", obj["kind"]);
        }
        let existing = store::meta_str(&obj, "name")
            .filter(|n| !n.is_empty())
            .and_then(|n| store.get(res, &namespace, n));
        let stored = match existing {
            Some(old) => {
                let name = store::meta_str(&old.value, "name")
                    .unwrap_or_default()
                    .to_string();
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("uid");
                }
                store.update(res, &namespace, &name, obj, Write::Admin)?
            }
            None => store.create(res, &namespace, obj, Write::Admin)?,
        };
        Ok(stored.value.clone())
    }

    /// Applies every document of a multi-document YAML stream with [`ApiServer::apply_json`]
    /// (`*List` documents item by item). A redirect.dev `CustomResourceDefinition` installs
    /// the CRDs; other CRDs are an error.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        for (i, doc) in yaml_serde::Deserializer::from_str(yaml).enumerate() {
            let value = Value::deserialize(doc).with_context(|| format!("YAML document {i}"))?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default();
            if kind == "CustomResourceDefinition" {
                let group = value.pointer("/spec/group").and_then(Value::as_str);
                if group != Some(redirect_agent::crd::GROUP) {
                    bail!(
                        "document {i}: only the {} CRDs are served",
                        redirect_agent::crd::GROUP
                    );
                }
                self.install_crds();
            } else if let Some(items) = value["items"].as_array().filter(|_| kind.ends_with("List"))
            {
                for item in items {
                    self.apply_json(item.clone())
                        .with_context(|| format!("document {i}"))?;
                }
            } else {
                self.apply_json(value)
                    .with_context(|| format!("document {i}"))?;
            }
        }
        Ok(())
    }

    /// Deletes an object (and, as the garbage collector would, its dependents). False when
    /// there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool> {
        let res = Self::resource(api_version, kind)?;
        match self
            .shared
            .store()
            .delete(res, namespace, name, &DeleteOptions::default())
        {
            Ok(_) => Ok(true),
            Err(e) if e.code == 404 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = resources::by_kind(api_version, kind)?;
        self.shared
            .store()
            .get(res, namespace, name)
            .map(|o| o.value.clone())
    }

    /// Every object of a kind, in (namespace, name) order.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Some(res) = resources::by_kind(api_version, kind) else {
            return Vec::new();
        };
        self.shared
            .store()
            .all(res)
            .map(|o| o.value.clone())
            .collect()
    }

    /// Forgets all history up to now: a watch or continue token from an older version gets
    /// 410 Gone (Expired).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Cuts every open watch stream mid-way (connection closed without the final chunk).
    pub fn drop_watches(&self) {
        Shared::cut(&self.shared.cut_watches);
    }

    /// While down, new connections are closed at once and open ones (watches included) are
    /// cut, as for an unreachable API server.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            Shared::cut(&self.shared.cut_connections);
            Shared::cut(&self.shared.cut_watches);
        }
    }

    /// The next `n` requests answer `status` with a `Status` body instead of being served.
    pub fn fail_next(&self, n: usize, status: u16) {
        *lock(&self.shared.failures) = (n, status);
    }

    /// Installs the redirect.dev CRDs (when started with `crds_installed: false`).
    pub fn install_crds(&self) {
        self.shared.store().install_crds();
    }

    /// Every request so far (the latest 100 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        Shared::cut(&self.shared.cut_connections);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
