//! The controller's caches: kube-runtime reflectors over Sandboxes, RouteGroups, Services and
//! Pods (cluster-wide) and the fork slices (EndpointSlices labelled as ours). Every change wakes
//! the reconcile loop. Sandboxes and RouteGroups are read untyped and parsed one by one at each
//! pass, so one object that does not fit the types is reported on its own status instead of
//! failing the whole list. Pods, Services and EndpointSlices lose their managed fields and
//! annotations on arrival (the controller never reads them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store as Reader, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Metrics;
use super::validate::{BadObject, Snapshot};
use crate::crd::{RouteGroup, RouteGroupSpec, Sandbox, SandboxSpec};
use crate::forkslice;
use crate::source::kube::watch::is_not_found;
use crate::store::Store;

/// The reflectors' stores, and whether each has listed once.
pub struct Caches {
    sandboxes: Reader<DynamicObject>,
    route_groups: Reader<DynamicObject>,
    services: Reader<Service>,
    pods: Reader<Pod>,
    slices: Reader<EndpointSlice>,
    synced: Arc<Synced>,
    tasks: Vec<JoinHandle<()>>,
}

/// Per watch: has it listed once.
#[derive(Debug, Default)]
struct Synced(Vec<AtomicBool>);

impl Synced {
    fn all(&self) -> bool {
        self.0.iter().all(|s| s.load(Ordering::Relaxed))
    }
}

/// What each watch reports to.
struct WatchCtx {
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    synced: Arc<Synced>,
}

impl Caches {
    /// Starts the watches on the current runtime; `changed` is notified on every event.
    pub fn start(client: &Client, changed: &Arc<Notify>, metrics: &Arc<Metrics>) -> Caches {
        const WATCHES: usize = 5;
        let ctx = Arc::new(WatchCtx {
            changed: changed.clone(),
            metrics: metrics.clone(),
            synced: Arc::new(Synced(
                (0..WATCHES).map(|_| AtomicBool::new(false)).collect(),
            )),
        });
        let mut tasks = Vec::new();
        let mut spawn = |task: JoinHandle<()>| tasks.push(task);
        let sandbox_type = ApiResource::erase::<Sandbox>(&());
        let route_group_type = ApiResource::erase::<RouteGroup>(&());
        let sandboxes = Writer::new(sandbox_type.clone());
        let route_groups = Writer::new(route_group_type.clone());
        let services = Writer::default();
        let pods = Writer::default();
        let slices = Writer::default();
        let readers = (
            sandboxes.as_reader(),
            route_groups.as_reader(),
            services.as_reader(),
            pods.as_reader(),
            slices.as_reader(),
        );
        let all = watcher::Config::default();
        spawn(watch(
            Api::all_with(client.clone(), &sandbox_type),
            all.clone(),
            sandboxes,
            ("Sandbox", 0),
            |_| {},
            &ctx,
        ));
        spawn(watch(
            Api::all_with(client.clone(), &route_group_type),
            all.clone(),
            route_groups,
            ("RouteGroup", 1),
            |_| {},
            &ctx,
        ));
        spawn(watch(
            Api::<Service>::all(client.clone()),
            all.clone(),
            services,
            ("Service", 2),
            |s: &mut Service| slim(s),
            &ctx,
        ));
        spawn(watch(
            Api::<Pod>::all(client.clone()),
            all,
            pods,
            ("Pod", 3),
            |p: &mut Pod| slim(p),
            &ctx,
        ));
        spawn(watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&forkslice::managed_selector()),
            slices,
            ("EndpointSlice", 4),
            |s: &mut EndpointSlice| slim(s),
            &ctx,
        ));
        Caches {
            sandboxes: readers.0,
            route_groups: readers.1,
            services: readers.2,
            pods: readers.3,
            slices: readers.4,
            synced: ctx.synced.clone(),
            tasks,
        }
    }

    /// Every watch has listed once.
    pub fn synced(&self) -> bool {
        self.synced.all()
    }

    /// What the caches hold now, sorted.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot {
            store: Store {
                services: self.services.state(),
                pods: self.pods.state(),
                ..Store::default()
            },
            fork_slices: self.slices.state(),
            ..Snapshot::default()
        };
        for obj in self.sandboxes.state() {
            match parse_sandbox(&obj) {
                Ok(sb) => snapshot.store.sandboxes.push(Arc::new(sb)),
                Err(bad) => snapshot.bad_sandboxes.push(*bad),
            }
        }
        for obj in self.route_groups.state() {
            match parse_route_group(&obj) {
                Ok(rg) => snapshot.store.route_groups.push(Arc::new(rg)),
                Err(bad) => snapshot.bad_route_groups.push(*bad),
            }
        }
        snapshot.store.sort();
        snapshot
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Drops what the controller never reads.
fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    (kind, index): (&'static str, usize),
    modify: impl FnMut(&mut K) + Send + 'static,
    ctx: &Arc<WatchCtx>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let WatchCtx {
            changed,
            metrics,
            synced,
        } = &*ctx;
        let stream = watcher(api, config).default_backoff().modify(modify);
        let mut events = reflector::reflector(writer, stream).boxed();
        let mut missing_logged = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if !synced.0[index].swap(true, Ordering::Relaxed) {
                        tracing::info!(kind, "watch synced");
                        metrics.set_synced(synced.all());
                    }
                    missing_logged = false;
                    changed.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(error) => {
                    metrics.error("watch");
                    if is_not_found(&error) {
                        if !missing_logged {
                            missing_logged = true;
                            tracing::error!(
                                kind,
                                "the {kind} resource is not served: are the CRDs installed? \
                                 (`kubectl apply -f deploy/crds.yaml`); the watch retries"
                            );
                        }
                    } else {
                        tracing::warn!(kind, %error, "watch failed; retrying with backoff");
                    }
                }
            }
        }
    })
}

/// A Sandbox read untyped: the spec must parse; a status that does not is taken as none (the
/// controller writes a new one).
pub fn parse_sandbox(
    obj: &DynamicObject,
) -> Result<Sandbox, Box<BadObject<crate::crd::SandboxStatus>>> {
    let status = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    match parse_spec::<SandboxSpec>(obj) {
        Ok(spec) => {
            let mut sb = Sandbox::new(&obj.name_any(), spec);
            sb.metadata = obj.metadata.clone();
            sb.status = status;
            Ok(sb)
        }
        Err(error) => Err(Box::new(BadObject {
            meta: obj.metadata.clone(),
            error,
            status,
        })),
    }
}

/// A RouteGroup read untyped (see [`parse_sandbox`]).
pub fn parse_route_group(
    obj: &DynamicObject,
) -> Result<RouteGroup, Box<BadObject<crate::crd::RouteGroupStatus>>> {
    let status = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    match parse_spec::<RouteGroupSpec>(obj) {
        Ok(spec) => {
            let mut rg = RouteGroup::new(&obj.name_any(), spec);
            rg.metadata = obj.metadata.clone();
            rg.status = status;
            Ok(rg)
        }
        Err(error) => Err(Box::new(BadObject {
            meta: obj.metadata.clone(),
            error,
            status,
        })),
    }
}

fn parse_spec<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    let spec = obj.data.get("spec").ok_or("it has no spec")?;
    serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_sandbox_is_read_with_its_status_and_a_garbled_status_is_taken_as_none() {
        let sb = parse_sandbox(&dynamic(json!({
            "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "sb", "namespace": "shop", "resourceVersion": "5"},
            "spec": {"routingKey": "k", "forks": []},
            "status": {"conditions": "not a list"}
        })))
        .unwrap();
        assert_eq!(sb.spec.routing_key, "k");
        assert_eq!(sb.metadata.resource_version.as_deref(), Some("5"));
        assert_eq!(sb.status, None);
    }

    #[test]
    fn a_sandbox_whose_spec_does_not_fit_is_a_bad_object_with_the_reason() {
        let bad = parse_sandbox(&dynamic(json!({
            "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "sb", "namespace": "shop"},
            "spec": {"routingKey": "k", "forks": "checkout"},
            "status": {"forkCount": 2}
        })))
        .unwrap_err();
        assert!(bad.error.starts_with("spec: invalid type"), "{}", bad.error);
        assert_eq!(bad.status.map(|s| s.fork_count), Some(2));
        let none = parse_route_group(&dynamic(json!({
            "apiVersion": "redirect.dev/v1alpha1", "kind": "RouteGroup",
            "metadata": {"name": "rg", "namespace": "shop"}
        })))
        .unwrap_err();
        assert_eq!(none.error, "it has no spec");
    }
}
