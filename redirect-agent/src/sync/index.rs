//! The store's objects by name, kept from one `desired()` to the next.
//!
//! Sources hand an object that did not change over as the same `Arc` (the kube source's caches
//! keep it until an event replaces it; a manifest reload makes every object new), so comparing
//! a snapshot with the previous one by identity finds what changed without reading the objects
//! that did not: pointer comparisons from both ends, and a hash set over the stretch between the
//! first and the last change. The index then takes out the old objects and puts in the new.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};

use crate::forkslice::ForkSliceRef;
use crate::slice::Slice;
use crate::store::{Store, ns_name};

/// The objects of one list that are not in the other, by identity.
#[derive(Debug)]
pub struct Changes<T> {
    /// In the old list only (deleted, or replaced by a new version).
    pub removed: Vec<Arc<T>>,
    /// In the new list only (created, or a new version).
    pub added: Vec<Arc<T>>,
}

impl<T> Changes<T> {
    pub fn len(&self) -> usize {
        self.removed.len() + self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every object involved, old versions first.
    pub fn objects(&self) -> impl Iterator<Item = &Arc<T>> {
        self.removed.iter().chain(&self.added)
    }
}

/// What differs between `old` and `new`, by object identity, whatever their order.
pub fn changes<T>(old: &[Arc<T>], new: &[Arc<T>]) -> Changes<T> {
    let same = |(a, b): &(&Arc<T>, &Arc<T>)| Arc::ptr_eq(a, b);
    let prefix = old.iter().zip(new).take_while(same).count();
    let (old, new) = (&old[prefix..], &new[prefix..]);
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(same)
        .count();
    let (old, new) = (&old[..old.len() - suffix], &new[..new.len() - suffix]);
    let old_ptrs: HashSet<*const T> = old.iter().map(Arc::as_ptr).collect();
    let new_ptrs: HashSet<*const T> = new.iter().map(Arc::as_ptr).collect();
    Changes {
        removed: old
            .iter()
            .filter(|o| !new_ptrs.contains(&Arc::as_ptr(o)))
            .cloned()
            .collect(),
        added: new
            .iter()
            .filter(|o| !old_ptrs.contains(&Arc::as_ptr(o)))
            .cloned()
            .collect(),
    }
}

/// What changed in each list of a store.
#[derive(Debug)]
pub struct StoreChanges {
    pub services: Changes<Service>,
    pub endpoint_slices: Changes<Slice>,
    pub pods: Changes<Pod>,
    pub sandboxes: Changes<crate::crd::Sandbox>,
}

impl StoreChanges {
    pub fn between(old: &Store, new: &Store) -> Self {
        StoreChanges {
            services: changes(&old.services, &new.services),
            endpoint_slices: changes(&old.endpoint_slices, &new.endpoint_slices),
            pods: changes(&old.pods, &new.pods),
            sandboxes: changes(&old.sandboxes, &new.sandboxes),
        }
    }

    /// How many objects changed (a new version counts twice: old and new).
    pub fn count(&self) -> usize {
        self.services.len() + self.endpoint_slices.len() + self.pods.len() + self.sandboxes.len()
    }
}

/// namespace → name → value, looked up by `&str` without building a key.
type Names<V> = HashMap<String, HashMap<String, V>>;

fn get<'a, V>(names: &'a Names<V>, namespace: &str, name: &str) -> Option<&'a V> {
    names.get(namespace)?.get(name)
}

/// Lookups by name: Services by namespace/name, EndpointSlices by the Service they belong to
/// (their `kubernetes.io/service-name` label, in their own namespace), the controller's fork
/// slices by what they are about, and Pods by namespace. Built from a whole store once, then
/// kept up to date with [`Index::update`]. Names are unique per kind in a store (both sources
/// make sure of it); should one come twice, the first object in store order is the one found.
#[derive(Debug, Default)]
pub struct Index {
    services: Names<Arc<Service>>,
    service_slices: Names<Vec<Arc<Slice>>>,
    fork_slices: HashMap<ForkSliceRef, Vec<Arc<Slice>>>,
    pods: HashMap<String, Vec<Arc<Pod>>>,
}

/// An object came with the name of one the index holds: the index must be rebuilt.
#[derive(Debug)]
pub struct NameTaken;

impl Index {
    pub fn new(store: &Store) -> Self {
        let mut index = Index::default();
        for s in &store.services {
            // A second object of the same name is ignored: the first one is found.
            let _ = index.add_service(s);
        }
        for s in &store.endpoint_slices {
            index.add_slice(s);
        }
        for p in &store.pods {
            index.add_pod(p);
        }
        index
    }

    /// Takes `changes` in. On [`NameTaken`] the index is unusable and must be rebuilt.
    pub fn update(&mut self, changes: &StoreChanges) -> Result<(), NameTaken> {
        for s in &changes.services.removed {
            let (ns, name) = ns_name(&s.metadata);
            if let Some(names) = self.services.get_mut(ns)
                && names.get(name).is_some_and(|held| Arc::ptr_eq(held, s))
            {
                names.remove(name);
            }
        }
        for s in &changes.endpoint_slices.removed {
            self.remove_slice(s);
        }
        for p in &changes.pods.removed {
            if let Some(pods) = self.pods.get_mut(ns_name(&p.metadata).0) {
                pods.retain(|held| !Arc::ptr_eq(held, p));
            }
        }
        for s in &changes.services.added {
            self.add_service(s)?;
        }
        for s in &changes.endpoint_slices.added {
            self.add_slice(s);
        }
        for p in &changes.pods.added {
            self.add_pod(p);
        }
        Ok(())
    }

    fn add_service(&mut self, s: &Arc<Service>) -> Result<(), NameTaken> {
        let (ns, name) = ns_name(&s.metadata);
        let names = self.services.entry(ns.to_string()).or_default();
        if names.contains_key(name) {
            return Err(NameTaken);
        }
        names.insert(name.to_string(), s.clone());
        Ok(())
    }

    fn add_slice(&mut self, s: &Arc<Slice>) {
        if let Some(owner) = &s.service {
            self.service_slices
                .entry(s.namespace.clone())
                .or_default()
                .entry(owner.to_string())
                .or_default()
                .push(s.clone());
        }
        if let Some(r) = &s.fork {
            self.fork_slices
                .entry(r.clone())
                .or_default()
                .push(s.clone());
        }
    }

    fn remove_slice(&mut self, s: &Arc<Slice>) {
        if let Some(owner) = &s.service
            && let Some(names) = self.service_slices.get_mut(&s.namespace)
            && let Some(slices) = names.get_mut(owner)
        {
            slices.retain(|held| !Arc::ptr_eq(held, s));
            if slices.is_empty() {
                names.remove(owner);
            }
        }
        if let Some(r) = &s.fork
            && let Some(slices) = self.fork_slices.get_mut(r)
        {
            slices.retain(|held| !Arc::ptr_eq(held, s));
            if slices.is_empty() {
                self.fork_slices.remove(r);
            }
        }
    }

    fn add_pod(&mut self, p: &Arc<Pod>) {
        let ns = ns_name(&p.metadata).0;
        self.pods.entry(ns.to_string()).or_default().push(p.clone());
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        get(&self.services, namespace, name)
    }

    /// The EndpointSlices of the Service `namespace/name` (labelled with its name).
    pub fn service_slices(&self, namespace: &str, name: &str) -> &[Arc<Slice>] {
        get(&self.service_slices, namespace, name).map_or(&[], Vec::as_slice)
    }

    /// The controller's fork slices about `r`.
    pub fn fork_slices(&self, r: &ForkSliceRef) -> &[Arc<Slice>] {
        self.fork_slices.get(r).map_or(&[], Vec::as_slice)
    }

    /// The Pods of `namespace`.
    pub fn pods_in(&self, namespace: &str) -> &[Arc<Pod>] {
        self.pods.get(namespace).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;
    use crate::k8s::SERVICE_NAME_LABEL;

    fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn slice(ns: Option<&str>, name: &str, labels: serde_json::Value) -> Arc<Slice> {
        let s: Arc<EndpointSlice> = object(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "addressType": "IPv4", "endpoints": [],
        }));
        Arc::new(Slice::from(&*s))
    }

    fn service(ns: &str, name: &str, ip: &str) -> Arc<Service> {
        object(
            serde_json::json!({"metadata": {"name": name, "namespace": ns},
                                  "spec": {"clusterIP": ip}}),
        )
    }

    fn pod(ns: Option<&str>, name: &str) -> Arc<Pod> {
        object(serde_json::json!({"metadata": {"name": name, "namespace": ns}}))
    }

    fn names<'a>(slices: impl IntoIterator<Item = &'a Arc<Slice>>) -> Vec<&'a str> {
        slices.into_iter().map(|s| s.name.as_str()).collect()
    }

    fn ip(s: Option<&Arc<Service>>) -> Option<String> {
        s.and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
    }

    fn fork_ref() -> ForkSliceRef {
        ForkSliceRef {
            sandbox_namespace: "shop".into(),
            sandbox_name: "fx".into(),
            service_namespace: "shop".into(),
            service: "checkout".into(),
        }
    }

    fn store() -> Store {
        let fork = serde_json::json!({
            "endpointslice.kubernetes.io/managed-by": "controller.redirect.dev",
            "redirect.dev/sandbox": "fx", "redirect.dev/sandbox-namespace": "shop",
            "redirect.dev/fork-of": "checkout"});
        Store {
            services: vec![
                service("shop", "checkout", "10.0.0.1"),
                service("other", "checkout", "10.0.0.2"),
                service("shop", "checkout", "10.0.0.3"),
            ],
            endpoint_slices: vec![
                slice(
                    Some("shop"),
                    "c-2",
                    serde_json::json!({SERVICE_NAME_LABEL: "checkout"}),
                ),
                slice(
                    Some("other"),
                    "c-x",
                    serde_json::json!({SERVICE_NAME_LABEL: "checkout"}),
                ),
                slice(
                    Some("shop"),
                    "unlabelled",
                    serde_json::json!({"app": "checkout"}),
                ),
                slice(Some("shop"), "fx-1", fork),
                slice(None, "d-1", serde_json::json!({SERVICE_NAME_LABEL: "db"})),
                slice(
                    Some("shop"),
                    "c-1",
                    serde_json::json!({SERVICE_NAME_LABEL: "checkout"}),
                ),
            ],
            pods: vec![
                pod(Some("shop"), "b"),
                pod(None, "x"),
                pod(Some("shop"), "a"),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_index_finds_services_slices_and_pods_by_name_in_store_order() {
        let store = store();
        let index = Index::new(&store);
        assert_eq!(
            ip(index.service("shop", "checkout")).as_deref(),
            Some("10.0.0.1"),
            "the first of a name given twice"
        );
        assert_eq!(
            ip(index.service("other", "checkout")).as_deref(),
            Some("10.0.0.2")
        );
        assert!(index.service("shop", "nope").is_none());
        assert_eq!(
            names(index.service_slices("shop", "checkout")),
            ["c-2", "c-1"],
            "its namespace only, in store order, labelled ones only"
        );
        assert_eq!(names(index.service_slices("default", "db")), ["d-1"]);
        assert!(index.service_slices("shop", "fx-1").is_empty());
        assert_eq!(names(index.fork_slices(&fork_ref())), ["fx-1"]);
        let pods = |ns| -> Vec<&str> {
            index
                .pods_in(ns)
                .iter()
                .map(|p| ns_name(&p.metadata).1)
                .collect()
        };
        assert_eq!(pods("shop"), ["b", "a"]);
        assert_eq!(pods("default"), ["x"]);
        assert!(pods("other").is_empty());
    }

    #[test]
    fn changes_are_found_by_identity_wherever_they_are() {
        let a: Vec<Arc<u32>> = (0..10).map(Arc::new).collect();
        let mut b = a.clone();
        b[3] = Arc::new(3); // same value, new object: a new version
        b.remove(7);
        b.insert(0, Arc::new(99));
        b.push(Arc::new(100));
        let c = changes(&a, &b);
        let values = |v: &[Arc<u32>]| -> Vec<u32> { v.iter().map(|x| **x).collect() };
        assert_eq!(values(&c.removed), [3, 7]);
        assert_eq!(values(&c.added), [99, 3, 100]);
        assert!(changes(&a, &a.clone()).is_empty());
        let mut reversed = a.clone();
        reversed.reverse();
        assert!(changes(&a, &reversed).is_empty(), "order does not matter");
        assert_eq!(changes(&a, &[]).removed.len(), 10);
        assert_eq!(changes(&[], &a).added.len(), 10);
    }

    #[test]
    fn an_updated_index_finds_what_a_rebuilt_one_finds() {
        let old = store();
        let mut index = Index::new(&old);
        let mut new = old.clone();
        // Replace a slice, delete one, move a pod, add a service and a fork slice.
        new.endpoint_slices[0] = slice(
            Some("shop"),
            "c-2",
            serde_json::json!({SERVICE_NAME_LABEL: "cart"}),
        );
        new.endpoint_slices.remove(3);
        new.pods[0] = pod(Some("other"), "b");
        new.services.push(service("shop", "cart", "10.0.0.9"));
        index
            .update(&StoreChanges::between(&old, &new))
            .expect("no name taken twice");
        assert_eq!(
            ip(index.service("shop", "cart")).as_deref(),
            Some("10.0.0.9")
        );
        assert_eq!(names(index.service_slices("shop", "checkout")), ["c-1"]);
        assert_eq!(names(index.service_slices("shop", "cart")), ["c-2"]);
        assert!(index.fork_slices(&fork_ref()).is_empty());
        assert_eq!(index.pods_in("other").len(), 1);
        assert_eq!(index.pods_in("shop").len(), 1);

        let mut taken = new.clone();
        taken.services.push(service("shop", "cart", "10.0.0.10"));
        assert!(
            index.update(&StoreChanges::between(&new, &taken)).is_err(),
            "a second Service of a name held is refused"
        );
    }
}
