//! A typed snapshot of the objects the node's routing depends on. Sources (kube watchers, a
//! manifest directory) produce it; `sync::desired` reads it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{RouteGroup, Sandbox};
use crate::slice::Slice;

/// Namespace of objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything `desired()` needs, as typed objects. Objects are shared (`Arc`) so that a source
/// with caches (the kube watchers) takes a snapshot without copying them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices as routing reads them.
    pub endpoint_slices: Vec<Arc<Slice>>,
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
        self.endpoint_slices
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
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
