//! The Kubernetes API as a [`Source`]: five kube-runtime watches feed local caches, and a
//! snapshot of the caches is taken after every change (debounced).
//!
//! | watch | scope | why |
//! |---|---|---|
//! | Services | cluster-wide | ClusterIPs and ports of forked services |
//! | EndpointSlices | cluster-wide | baseline backends (connections another program already translated), and the controller's fork slices (fork pods on other nodes) |
//! | Pods | `spec.nodeName=<this node>` | fork pods on this node (cgroup → sandbox) and their endpoints |
//! | Sandboxes | cluster-wide | keys and forks |
//! | RouteGroups | cluster-wide | keys over several sandboxes |
//!
//! Nothing is yielded before every watch has listed once (so `/readyz` waits for it); a kind
//! whose CRD is missing counts as listed, with nothing in it, and keeps retrying. While the API
//! server cannot be reached, watches retry with jittered backoff and no snapshot is yielded: the
//! last good state stays in force.

pub mod health;
pub mod project;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::health::Health;
use self::watch::{Cache, Convert, WatchSink};
use crate::crd::{RouteGroup, Sandbox, SpecError};
use crate::slice::Slice;
use crate::source::{Source, Update};
use crate::store::Store;

/// Default debounce window.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(20);

/// What the kube source needs to know.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    /// This node's name: only its Pods are watched.
    pub node_name: String,
    /// Changes within this window of the previous snapshot are coalesced into one snapshot at
    /// its end; a change after a quiet window is yielded at once.
    pub debounce: Duration,
    /// Objects per list page.
    pub page_size: u32,
}

/// The caches of the five watches.
#[derive(Debug, Default)]
struct Caches {
    services: Arc<Cache<Service>>,
    endpoint_slices: Arc<Cache<Slice>>,
    pods: Arc<Cache<Pod>>,
    sandboxes: Arc<Cache<Sandbox>>,
    route_groups: Arc<Cache<RouteGroup>>,
}

/// Kube watchers as a source. Dropping it stops the watches.
pub struct KubeSource {
    caches: Caches,
    health: Arc<Health>,
    changed: Arc<Notify>,
    /// A change was taken from `changed` and not yet yielded. Kept here, not in `next()`'s
    /// future, so that a call dropped before it yields (the agent's loop selects between the
    /// source and its resync timer) leaves the change to the next call instead of losing it.
    dirty: bool,
    debounce: Duration,
    last_snapshot: Option<Instant>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches (they run on the current tokio runtime).
    pub fn start(client: Client, config: &KubeSourceConfig) -> KubeSource {
        let caches = Caches::default();
        let health = Arc::new(Health::default());
        let changed = Arc::new(Notify::new());
        let base = watcher::Config::default().page_size(config.page_size.max(1));
        let mut tasks = Vec::new();

        let mut spawn = |task: JoinHandle<()>| tasks.push(task);
        spawn(watch_typed(
            Api::<Service>::all(client.clone()),
            base.clone(),
            "Service",
            "cluster-wide",
            Box::new(|s| Ok(project::service(s))),
            &caches.services,
            &health,
            &changed,
        ));
        spawn(watch_typed(
            Api::<EndpointSlice>::all(client.clone()),
            base.clone(),
            "EndpointSlice",
            "cluster-wide",
            Box::new(|s| Ok(Slice::from(s))),
            &caches.endpoint_slices,
            &health,
            &changed,
        ));
        let node_selector = format!("spec.nodeName={}", config.node_name);
        spawn(watch_typed(
            Api::<Pod>::all(client.clone()),
            base.clone().fields(&node_selector),
            "Pod",
            &node_selector,
            Box::new(|p| Ok(project::pod(p))),
            &caches.pods,
            &health,
            &changed,
        ));
        // Custom resources are read untyped and converted one by one, so one object that does
        // not fit the types (an older or newer CRD, a hand-edited object) is skipped alone
        // instead of failing the whole list.
        spawn(watch_typed(
            Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<Sandbox>(&())),
            base.clone(),
            "Sandbox",
            "cluster-wide",
            Box::new(|o| {
                let mut sb: Sandbox = from_dynamic(o)?;
                check_spec(sb.spec.validate())?;
                sb.metadata = project::custom_meta(sb.metadata);
                sb.status = None;
                Ok(sb)
            }),
            &caches.sandboxes,
            &health,
            &changed,
        ));
        spawn(watch_typed(
            Api::<DynamicObject>::all_with(client, &ApiResource::erase::<RouteGroup>(&())),
            base,
            "RouteGroup",
            "cluster-wide",
            Box::new(|o| {
                let mut rg: RouteGroup = from_dynamic(o)?;
                check_spec(rg.spec.validate())?;
                rg.metadata = project::custom_meta(rg.metadata);
                Ok(rg)
            }),
            &caches.route_groups,
            &health,
            &changed,
        ));

        KubeSource {
            caches,
            health,
            changed,
            dirty: false,
            debounce: config.debounce,
            last_snapshot: None,
            tasks,
        }
    }

    /// The watches' state, shared with the admin endpoint.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The caches as a Store.
    fn snapshot(&self) -> Store {
        Store {
            services: self.caches.services.snapshot(),
            endpoint_slices: self.caches.endpoint_slices.snapshot(),
            pods: self.caches.pods.snapshot(),
            sandboxes: self.caches.sandboxes.snapshot(),
            route_groups: self.caches.route_groups.snapshot(),
            warnings: Vec::new(),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Source for KubeSource {
    fn name(&self) -> &'static str {
        "kube"
    }

    async fn next(&mut self) -> Option<Update> {
        loop {
            if !self.dirty {
                self.changed.notified().await;
                self.dirty = true;
            }
            if !self.health.all_synced() {
                self.dirty = false;
                continue;
            }
            if let Some(last) = self.last_snapshot {
                // Everything that arrives before the window ends is in this one snapshot.
                tokio::time::sleep_until(last + self.debounce).await;
            }
            self.dirty = false;
            self.last_snapshot = Some(Instant::now());
            // Forks of missing Services and empty route groups are for `desired()` to warn
            // about: it does, and looks only at what changed.
            return Some(Update::Snapshot(self.snapshot()));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn watch_typed<K, T>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    scope: &str,
    convert: Convert<K, T>,
    cache: &Arc<Cache<T>>,
    health: &Arc<Health>,
    changed: &Arc<Notify>,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Send + Sync + 'static,
{
    let index = health.register(kind, scope);
    tokio::spawn(watch::run(
        api,
        config,
        convert,
        WatchSink {
            cache: cache.clone(),
            health: health.clone(),
            index,
            changed: changed.clone(),
            kind,
        },
    ))
}

/// A custom resource read untyped, as its Rust type.
fn from_dynamic<T: DeserializeOwned>(o: DynamicObject) -> Result<T, String> {
    let value = serde_json::to_value(o).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| format!("does not match the CRD's types: {e}"))
}

fn check_spec(errors: Vec<SpecError>) -> Result<(), String> {
    if errors.is_empty() {
        return Ok(());
    }
    Err(errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; "))
}

#[cfg(test)]
mod tests;
