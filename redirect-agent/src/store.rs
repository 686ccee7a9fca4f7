//! A typed snapshot of the objects the node's routing depends on. Sources (kube watchers, a
//! manifest directory) produce it; `sync::desired` reads it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{RouteGroup, Sandbox};
use crate::forkslice::{ForkSliceRef, parse_fork_slice};
use crate::k8s::SERVICE_NAME_LABEL;

/// Namespace of objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything `desired()` needs, as typed objects. Objects are shared (`Arc`) so that a source
/// with caches (the kube watchers) takes a snapshot without copying them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub sandboxes: Vec<Arc<Sandbox>>,
    pub route_groups: Vec<Arc<RouteGroup>>,
    /// Problems that do not invalidate the snapshot (e.g. a fork of a Service that does not
    /// exist: that fork has no effect).
    pub warnings: Vec<String>,
}

/// `(namespace, name)` of an object; the namespace defaults to `default`.
pub fn ns_name(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// An object by kind and name, for messages: `Sandbox team-a/feature-x`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    pub fn new(kind: &str, meta: &ObjectMeta) -> Self {
        let (namespace, name) = ns_name(meta);
        ObjectName {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// `namespace/name`.
    pub fn ns_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Two objects that claim the same routing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyConflict {
    pub key: String,
    /// The owner that sorts first (sandboxes before route groups, then by namespace/name).
    pub first: ObjectName,
    pub second: ObjectName,
}

impl fmt::Display for KeyConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "routing key {:?} is used by both {} and {}",
            self.key, self.first, self.second
        )
    }
}

fn sort_by_name<T>(items: &mut [T], meta: impl Fn(&T) -> &ObjectMeta) {
    items.sort_by(|a, b| ns_name(meta(a)).cmp(&ns_name(meta(b))));
}

impl Store {
    /// Sorts every list by namespace/name, so that everything derived is deterministic.
    pub fn sort(&mut self) {
        sort_by_name(&mut self.services, |o| &o.metadata);
        sort_by_name(&mut self.endpoint_slices, |o| &o.metadata);
        sort_by_name(&mut self.pods, |o| &o.metadata);
        sort_by_name(&mut self.sandboxes, |o| &o.metadata);
        sort_by_name(&mut self.route_groups, |o| &o.metadata);
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| ns_name(&s.metadata) == (namespace, name))
            .map(|s| &**s)
    }

    /// Owners of each routing key, sandboxes (sorted) before route groups (sorted).
    pub fn key_owners(&self) -> BTreeMap<&str, Vec<ObjectName>> {
        let mut sandboxes: Vec<_> = self
            .sandboxes
            .iter()
            .map(|s| {
                (
                    s.spec.routing_key.as_str(),
                    ObjectName::new("Sandbox", &s.metadata),
                )
            })
            .collect();
        sandboxes.sort_by(|a, b| a.1.cmp(&b.1));
        let mut groups: Vec<_> = self
            .route_groups
            .iter()
            .map(|g| {
                (
                    g.spec.routing_key.as_str(),
                    ObjectName::new("RouteGroup", &g.metadata),
                )
            })
            .collect();
        groups.sort_by(|a, b| a.1.cmp(&b.1));
        let mut owners: BTreeMap<&str, Vec<ObjectName>> = BTreeMap::new();
        for (key, name) in sandboxes.into_iter().chain(groups) {
            owners.entry(key).or_default().push(name);
        }
        owners
    }

    /// Routing keys claimed by more than one sandbox or route group (each extra owner is
    /// reported against the first).
    pub fn key_conflicts(&self) -> Vec<KeyConflict> {
        let mut out = Vec::new();
        for (key, owners) in self.key_owners() {
            for second in &owners[1..] {
                out.push(KeyConflict {
                    key: key.to_string(),
                    first: owners[0].clone(),
                    second: second.clone(),
                });
            }
        }
        out
    }

    /// Lookups by name over this store (see [`StoreIndex`]).
    pub fn index(&self) -> StoreIndex<'_> {
        StoreIndex::new(self)
    }

    /// Forks that name a Service that does not exist (they have no effect), and route groups
    /// that select no sandbox.
    pub fn dangling_references(&self) -> Vec<String> {
        let mut out = Vec::new();
        let services: HashSet<(&str, &str)> =
            self.services.iter().map(|s| ns_name(&s.metadata)).collect();
        for sb in &self.sandboxes {
            let (ns, _) = ns_name(&sb.metadata);
            for fork in &sb.spec.forks {
                let fork_ns = fork.namespace_or(ns);
                if !services.contains(&(fork_ns, fork.service.as_str())) {
                    out.push(format!(
                        "{}: fork of Service {fork_ns}/{} has no effect: no such Service",
                        ObjectName::new("Sandbox", &sb.metadata),
                        fork.service
                    ));
                }
            }
        }
        let sandbox_labels =
            LabelIndex::new(self.sandboxes.iter().map(|s| s.metadata.labels.as_ref()));
        for rg in &self.route_groups {
            if sandbox_labels
                .matching(&rg.spec.sandbox_selector)
                .is_empty()
            {
                out.push(format!(
                    "{}: sandboxSelector matches no Sandbox",
                    ObjectName::new("RouteGroup", &rg.metadata)
                ));
            }
        }
        out
    }
}

/// Lookups by name over a [`Store`], built once (per `desired()`) instead of a scan of a whole
/// list per lookup: Services by namespace/name, EndpointSlices by the Service they belong to
/// (their `kubernetes.io/service-name` label, in their own namespace), the controller's fork
/// slices by what they are about, and Pods by namespace. Every list keeps the store's order,
/// and a name given twice finds the first object, as [`Store::service`] does. One pass over
/// each list: at cluster scale the cost is reaching each object's fields in memory.
#[derive(Debug)]
pub struct StoreIndex<'s> {
    services: HashMap<(&'s str, &'s str), &'s Service>,
    service_slices: HashMap<(&'s str, &'s str), Slices<'s>>,
    fork_slices: BTreeMap<ForkSliceRef, Vec<&'s EndpointSlice>>,
    pods: HashMap<&'s str, Vec<&'s Pod>>,
}

impl<'s> StoreIndex<'s> {
    pub fn new(store: &'s Store) -> Self {
        let mut services = HashMap::with_capacity(store.services.len());
        for s in &store.services {
            services.entry(ns_name(&s.metadata)).or_insert(&**s);
        }
        // Sized up front: growing would hash every key again.
        let mut service_slices: HashMap<_, Slices<'s>> =
            HashMap::with_capacity(store.endpoint_slices.len());
        let mut fork_slices: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for slice in &store.endpoint_slices {
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let Some(owner) = owner {
                let (ns, _) = ns_name(&slice.metadata);
                match service_slices.entry((ns, owner.as_str())) {
                    Entry::Occupied(mut e) => e.get_mut().rest.push(&**slice),
                    Entry::Vacant(e) => {
                        e.insert(Slices {
                            first: slice,
                            rest: Vec::new(),
                        });
                    }
                }
            }
            if let Some(r) = parse_fork_slice(slice) {
                fork_slices.entry(r).or_default().push(&**slice);
            }
        }
        let mut pods: HashMap<_, Vec<_>> = HashMap::new();
        for p in &store.pods {
            pods.entry(ns_name(&p.metadata).0).or_default().push(&**p);
        }
        StoreIndex {
            services,
            service_slices,
            fork_slices,
            pods,
        }
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&'s Service> {
        // Keys of a shorter lifetime than 's: the map is covariant in its key type.
        let services: &HashMap<(&str, &str), &'s Service> = &self.services;
        services.get(&(namespace, name)).copied()
    }

    /// The EndpointSlices of the Service `namespace/name` (labelled with its name).
    pub fn service_slices<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'s EndpointSlice> + 'a {
        let slices: &HashMap<(&str, &str), Slices<'s>> = &self.service_slices;
        slices
            .get(&(namespace, name))
            .into_iter()
            .flat_map(|s| std::iter::once(s.first).chain(s.rest.iter().copied()))
    }

    /// The controller's fork slices about `r` (see [`parse_fork_slice`]).
    pub fn fork_slices(&self, r: &ForkSliceRef) -> &[&'s EndpointSlice] {
        self.fork_slices.get(r).map_or(&[], Vec::as_slice)
    }

    /// The Pods of `namespace`.
    pub fn pods_in(&self, namespace: &str) -> &[&'s Pod] {
        self.pods.get(namespace).map_or(&[], Vec::as_slice)
    }
}

/// The EndpointSlices of one Service, in store order. Most Services have one: no allocation
/// for those.
#[derive(Debug)]
struct Slices<'s> {
    first: &'s EndpointSlice,
    rest: Vec<&'s EndpointSlice>,
}

/// Objects by their labels, to find those a matchLabels selector selects without testing every
/// object against every selector (route groups × sandboxes).
#[derive(Debug, Default)]
pub struct LabelIndex<'a> {
    len: usize,
    /// (key, value) → positions of the objects that carry it, ascending.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
    labels: Vec<Option<&'a BTreeMap<String, String>>>,
}

impl<'a> LabelIndex<'a> {
    /// Indexes the labels of each object, by position.
    pub fn new(labels: impl IntoIterator<Item = Option<&'a BTreeMap<String, String>>>) -> Self {
        let labels: Vec<_> = labels.into_iter().collect();
        let mut by_label: HashMap<_, Vec<usize>> = HashMap::new();
        for (i, l) in labels.iter().enumerate() {
            for (k, v) in l.iter().copied().flatten() {
                by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        LabelIndex {
            len: labels.len(),
            by_label,
            labels,
        }
    }

    /// Positions (ascending) of the objects `selector` selects, as [`labels_match`] says.
    pub fn matching(&self, selector: &BTreeMap<String, String>) -> Vec<usize> {
        let by_label: &HashMap<(&str, &str), Vec<usize>> = &self.by_label;
        // The rarest label of the selector gives the candidates; the others are checked.
        let candidates = selector
            .iter()
            .map(|(k, v)| {
                by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len());
        match candidates {
            None => (0..self.len).collect(),
            Some(c) => c
                .iter()
                .copied()
                .filter(|i| labels_match(selector, self.labels[*i]))
                .collect(),
        }
    }
}

/// Whether `labels` carry every `selector` entry (matchLabels; an empty selector matches all).
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RouteGroupSpec, SandboxSpec};

    fn sandbox(ns: &str, name: &str, key: &str) -> Sandbox {
        let mut s = Sandbox::new(
            name,
            SandboxSpec {
                routing_key: key.into(),
                forks: vec![],
                fallback: None,
                ttl: None,
            },
        );
        s.metadata.namespace = Some(ns.into());
        s
    }

    #[test]
    fn a_routing_key_used_twice_is_a_conflict_naming_both_owners() {
        let store = Store {
            sandboxes: vec![
                sandbox("b", "two", "k").into(),
                sandbox("a", "one", "k").into(),
                sandbox("a", "x", "other").into(),
            ],
            ..Default::default()
        };
        let conflicts = store.key_conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            conflicts[0].to_string(),
            "routing key \"k\" is used by both Sandbox a/one and Sandbox b/two"
        );
    }

    #[test]
    fn a_route_group_reusing_a_sandbox_key_conflicts_with_the_sandbox() {
        let mut rg = RouteGroup::new(
            "group",
            RouteGroupSpec {
                routing_key: "k".into(),
                sandbox_selector: BTreeMap::new(),
            },
        );
        rg.metadata.namespace = Some("a".into());
        let store = Store {
            sandboxes: vec![sandbox("z", "sb", "k").into()],
            route_groups: vec![rg.into()],
            ..Default::default()
        };
        let c = &store.key_conflicts()[0];
        assert_eq!(c.first.kind, "Sandbox");
        assert_eq!(c.second.kind, "RouteGroup");
    }

    fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn slice(ns: Option<&str>, name: &str, labels: serde_json::Value) -> Arc<EndpointSlice> {
        object(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "addressType": "IPv4", "endpoints": [],
        }))
    }

    fn names<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Vec<&'a str> {
        slices.into_iter().map(|s| ns_name(&s.metadata).1).collect()
    }

    #[test]
    fn the_index_finds_services_slices_and_pods_by_name_in_store_order() {
        let service = |ns: &str, name: &str, ip: &str| -> Arc<Service> {
            object(
                serde_json::json!({"metadata": {"name": name, "namespace": ns},
                                      "spec": {"clusterIP": ip}}),
            )
        };
        let pod = |ns: Option<&str>, name: &str| -> Arc<Pod> {
            object(serde_json::json!({"metadata": {"name": name, "namespace": ns}}))
        };
        let fork = serde_json::json!({
            "endpointslice.kubernetes.io/managed-by": "controller.redirect.dev",
            "redirect.dev/sandbox": "fx", "redirect.dev/sandbox-namespace": "shop",
            "redirect.dev/fork-of": "checkout"});
        let store = Store {
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
        };
        let index = store.index();

        let ip = |s: Option<&Service>| s.and_then(|s| s.spec.as_ref()?.cluster_ip.clone());
        for (ns, name) in [
            ("shop", "checkout"),
            ("other", "checkout"),
            ("shop", "nope"),
        ] {
            assert_eq!(
                ip(index.service(ns, name)),
                ip(store.service(ns, name)),
                "{ns}/{name}: the first of the store, as Store::service finds it"
            );
        }
        assert_eq!(
            ip(index.service("shop", "checkout")).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            names(index.service_slices("shop", "checkout")),
            ["c-2", "c-1"],
            "its namespace only, in store order, labelled ones only"
        );
        assert_eq!(names(index.service_slices("default", "db")), ["d-1"]);
        assert_eq!(names(index.service_slices("shop", "fx-1")).len(), 0);
        let r = ForkSliceRef {
            sandbox_namespace: "shop".into(),
            sandbox_name: "fx".into(),
            service_namespace: "shop".into(),
            service: "checkout".into(),
        };
        assert_eq!(names(index.fork_slices(&r).iter().copied()), ["fx-1"]);
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
    fn a_label_index_selects_exactly_what_labels_match_selects_in_order() {
        let labels = |pairs: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let objects = [
            labels(&[("team", "a"), ("tier", "web")]),
            None,
            labels(&[("team", "b")]),
            labels(&[("team", "a")]),
            labels(&[]),
            labels(&[("team", "a"), ("tier", "db")]),
        ];
        let index = LabelIndex::new(objects.iter().map(Option::as_ref));
        let selectors = [
            labels(&[]).unwrap(),
            labels(&[("team", "a")]).unwrap(),
            labels(&[("team", "a"), ("tier", "web")]).unwrap(),
            labels(&[("tier", "db"), ("team", "b")]).unwrap(),
            labels(&[("team", "c")]).unwrap(),
        ];
        for selector in &selectors {
            let brute: Vec<usize> = (0..objects.len())
                .filter(|i| labels_match(selector, objects[*i].as_ref()))
                .collect();
            assert_eq!(index.matching(selector), brute, "{selector:?}");
        }
        assert_eq!(index.matching(&selectors[1]), [0, 3, 5]);
        assert_eq!(index.matching(&selectors[0]).len(), objects.len());
    }

    #[test]
    fn empty_selector_matches_everything_and_missing_labels_match_nothing_else() {
        let sel: BTreeMap<_, _> = [("team".to_string(), "a".to_string())].into();
        assert!(labels_match(&BTreeMap::new(), None));
        assert!(!labels_match(&sel, None));
        assert!(labels_match(&sel, Some(&sel)));
    }
}
