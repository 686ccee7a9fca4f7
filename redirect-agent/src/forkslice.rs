//! Fork endpoints as EndpointSlices: the controller publishes, for every fork of every sandbox,
//! the fork pods' addresses in EndpointSlices of its own, so that node agents, which watch only
//! their own node's Pods, learn the fork pods on other nodes. This module is the one place that
//! says what such a slice looks like ([`fork_slices`]) and how to read one back
//! ([`parse_fork_slice`]).
//!
//! A fork slice follows EndpointSlice semantics (what kube-controller-manager writes for a
//! Service), with two differences:
//!
//! - it never carries `kubernetes.io/service-name`: kube-proxy (and every CNI's service load
//!   balancer) would add the fork pods to the baseline Service's backends. It is labelled
//!   `endpointslice.kubernetes.io/managed-by: controller.redirect.dev` (so the cluster's
//!   EndpointSlice controllers leave it alone), `redirect.dev/sandbox`,
//!   `redirect.dev/sandbox-namespace` and `redirect.dev/fork-of: <service>` instead;
//! - it is owned by the Sandbox (`ownerReferences`, `controller: true`), so deleting the
//!   sandbox deletes its slices.
//!
//! Layout: one slice per address family (of the Service's `ipFamilies`, else of the pods' IPs)
//! and per set of resolved ports (a named `targetPort` may resolve to different container ports
//! on different pods), at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints each. Ports are named like
//! the Service's TCP ports. Names are `<sandbox>-<service>-<hash>`, at most 63 characters,
//! deterministic: the same inputs give the same slices, so the controller can compare.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::crd::{API_VERSION, Fork, Sandbox};
use crate::k8s::{
    pod_ips, pod_ready_condition, pod_running, pod_terminating, target_port, tcp_ports,
};
use crate::store::{labels_match, ns_name};

pub use crate::k8s::MANAGED_BY_LABEL;
/// Our value of [`MANAGED_BY_LABEL`]: the slice is a fork slice.
pub const MANAGED_BY: &str = "controller.redirect.dev";
/// Label: name of the sandbox the fork belongs to.
pub const SANDBOX_LABEL: &str = "redirect.dev/sandbox";
/// Label: namespace of the sandbox the fork belongs to.
pub const SANDBOX_NAMESPACE_LABEL: &str = "redirect.dev/sandbox-namespace";
/// Label: name of the Service the fork stands in for (in the slice's namespace).
pub const FORK_OF_LABEL: &str = "redirect.dev/fork-of";
/// Longest slice name we generate.
pub const MAX_NAME_LEN: usize = 63;
/// Most endpoints in one slice (kube-controller-manager's default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Label selector of every fork slice (for a watch or a list).
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// What a fork slice is about, read back from its labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForkSliceRef {
    pub sandbox_namespace: String,
    pub sandbox_name: String,
    /// Namespace of the forked Service (the slice's own).
    pub service_namespace: String,
    /// Name of the forked Service.
    pub service: String,
}

/// The sandbox, service and namespace of a fork slice; None for any other EndpointSlice.
pub fn parse_fork_slice(slice: &EndpointSlice) -> Option<ForkSliceRef> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let non_empty = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
    Some(ForkSliceRef {
        sandbox_namespace: non_empty(SANDBOX_NAMESPACE_LABEL)?,
        sandbox_name: non_empty(SANDBOX_LABEL)?,
        service_namespace: ns_name(&slice.metadata).0.to_string(),
        service: non_empty(FORK_OF_LABEL)?,
    })
}

/// The pods a fork selects: in the fork's namespace, carrying every selector label. An empty
/// selector selects nothing (the spec is invalid then).
pub fn selected_pods<'p>(
    fork: &Fork,
    sandbox_namespace: &str,
    pods: impl IntoIterator<Item = &'p Pod>,
) -> Vec<&'p Pod> {
    if fork.selector.is_empty() {
        return Vec::new();
    }
    let ns = fork.namespace_or(sandbox_namespace);
    let mut out: Vec<&Pod> = pods
        .into_iter()
        .filter(|p| {
            ns_name(&p.metadata).0 == ns && labels_match(&fork.selector, p.metadata.labels.as_ref())
        })
        .collect();
    out.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
    out
}

/// The EndpointSlices publishing the endpoints of `fork` (of `sandbox`), whose baseline is
/// `service`, served by `pods` (the pods the fork selects, see [`selected_pods`]). Sorted by
/// name, endpoints in pod name order. Pods that have
/// finished, have no IP, or serve none of the Service's TCP ports are left out; pods that are
/// not ready are published with `ready: false`.
pub fn fork_slices(
    sandbox: &Sandbox,
    fork: &Fork,
    service: &Service,
    pods: &[&Pod],
) -> Vec<EndpointSlice> {
    let (sandbox_ns, sandbox_name) = ns_name(&sandbox.metadata);
    let namespace = fork.namespace_or(sandbox_ns).to_string();
    let ports = tcp_ports(service);
    let families = service_families(service);

    // (family, resolved ports) → endpoints, in pod order.
    let mut groups: BTreeMap<(Family, Vec<PortKey>), Vec<Endpoint>> = BTreeMap::new();
    let mut pods = pods.to_vec();
    pods.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
    for pod in pods {
        if !pod_running(pod) {
            continue;
        }
        let resolved: Vec<PortKey> = ports
            .iter()
            .filter_map(|p| {
                target_port(pod, p).map(|number| PortKey {
                    name: p.name.clone().unwrap_or_default(),
                    port: number,
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect();
        if resolved.is_empty() {
            continue;
        }
        for ip in pod_ips(pod) {
            let family = Family::of(ip);
            if families.as_ref().is_some_and(|f| !f.contains(&family)) {
                continue;
            }
            groups
                .entry((family, resolved.clone()))
                .or_default()
                .push(endpoint(pod, ip));
        }
    }

    let mut out = Vec::new();
    for ((family, ports), endpoints) in groups {
        for (chunk, endpoints) in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
            let name = slice_name(
                sandbox_ns,
                sandbox_name,
                &fork.service,
                family,
                &ports,
                chunk,
            );
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(namespace.clone()),
                    labels: Some(
                        [
                            (MANAGED_BY_LABEL, MANAGED_BY),
                            (SANDBOX_LABEL, sandbox_name),
                            (SANDBOX_NAMESPACE_LABEL, sandbox_ns),
                            (FORK_OF_LABEL, fork.service.as_str()),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ),
                    owner_references: Some(vec![OwnerReference {
                        api_version: API_VERSION.to_string(),
                        kind: "Sandbox".to_string(),
                        name: sandbox_name.to_string(),
                        uid: sandbox.metadata.uid.clone().unwrap_or_default(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]),
                    ..ObjectMeta::default()
                },
                address_type: family.address_type().to_string(),
                endpoints: endpoints.to_vec(),
                ports: Some(
                    ports
                        .iter()
                        .map(|p| EndpointPort {
                            name: Some(p.name.clone()),
                            port: Some(i32::from(p.port)),
                            protocol: Some("TCP".to_string()),
                            app_protocol: p.app_protocol.clone(),
                        })
                        .collect(),
                ),
            });
        }
    }
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

/// Pods that are ready in `slices` (by `targetRef`, so a dual-stack pod counts once).
pub fn ready_endpoints(slices: &[EndpointSlice]) -> usize {
    let mut pods = std::collections::BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) == Some(true);
            if ready {
                let who = ep
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.uid.clone().or_else(|| r.name.clone()))
                    .or_else(|| ep.addresses.first().cloned());
                pods.insert(who);
            }
        }
    }
    pods.len()
}

/// The families the Service serves (`spec.ipFamilies`); None when unset (follow the pods).
fn service_families(svc: &Service) -> Option<Vec<Family>> {
    let families: Vec<Family> = svc
        .spec
        .as_ref()?
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    (!families.is_empty()).then_some(families)
}

fn endpoint(pod: &Pod, ip: IpAddr) -> Endpoint {
    let (ns, name) = ns_name(&pod.metadata);
    let terminating = pod_terminating(pod);
    let serving = pod_running(pod) && pod_ready_condition(pod);
    Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(serving && !terminating),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_string()),
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A service port resolved for one pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey {
    name: String,
    port: u16,
    app_protocol: Option<String>,
}

/// `<sandbox>-<service>-<hash>`, at most [`MAX_NAME_LEN`] characters; the hash covers every
/// input, so two slices never share a name.
fn slice_name(
    sandbox_ns: &str,
    sandbox: &str,
    service: &str,
    family: Family,
    ports: &[PortKey],
    chunk: usize,
) -> String {
    let mut h = Fnv64::default();
    for part in [sandbox_ns, sandbox, service, family.address_type()] {
        h.write(part.as_bytes());
        h.write(&[0]);
    }
    for p in ports {
        h.write(p.name.as_bytes());
        h.write(&p.port.to_be_bytes());
        h.write(p.app_protocol.as_deref().unwrap_or("").as_bytes());
        h.write(&[0]);
    }
    h.write(&(chunk as u64).to_be_bytes());
    let hash = format!("{:016x}", h.0);
    let hash = &hash[..10];
    let max_prefix = MAX_NAME_LEN - 1 - hash.len();
    let prefix: String = format!("{sandbox}-{service}")
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(max_prefix)
        .collect();
    let prefix = prefix.trim_matches('-');
    if prefix.is_empty() {
        format!("fork-{hash}")
    } else {
        format!("{prefix}-{hash}")
    }
}

/// FNV-1a, 64 bits: stable across Rust releases (names must not change on an upgrade).
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::SandboxSpec;

    const NS: &str = "shop";

    fn sandbox(name: &str) -> Sandbox {
        let mut sb = Sandbox::new(
            name,
            SandboxSpec {
                routing_key: "feature-x".into(),
                forks: vec![fork("checkout")],
                fallback: None,
                ttl: None,
            },
        );
        sb.metadata.namespace = Some(NS.into());
        sb.metadata.uid = Some("sb-uid".into());
        sb
    }

    fn fork(service: &str) -> Fork {
        Fork {
            service: service.into(),
            namespace: None,
            selector: [("app".to_string(), format!("{service}-fx"))].into(),
        }
    }

    /// A dual-stack Service with a named targetPort (`http`) and a numeric one (9090).
    fn service(name: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "clusterIP": "10.96.0.10",
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
                    {"name": "metrics", "port": 9090, "targetPort": 9090},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]
            }
        }))
        .unwrap()
    }

    fn pod(name: &str, ips: &[&str], http_port: i32, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                         "labels": {"app": "checkout-fx"}},
            "spec": {"nodeName": "node-b", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": http_port}
            ]}]},
            "status": {
                "phase": "Running",
                "podIP": ips[0],
                "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }

    fn slices_for(pods: &[Pod]) -> Vec<EndpointSlice> {
        let refs: Vec<&Pod> = pods.iter().collect();
        fork_slices(
            &sandbox("feature-x"),
            &fork("checkout"),
            &service("checkout"),
            &refs,
        )
    }

    fn port_pairs(slice: &EndpointSlice) -> Vec<(String, i32)> {
        slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect()
    }

    #[test]
    fn a_dual_stack_pod_is_published_in_one_slice_per_family_with_the_service_port_names() {
        let slices = slices_for(&[pod("a", &["10.1.0.5", "fd00::5"], 8080, true)]);
        let families: Vec<_> = slices.iter().map(|s| s.address_type.as_str()).collect();
        assert_eq!(families.len(), 2);
        assert!(families.contains(&"IPv4") && families.contains(&"IPv6"));
        for s in &slices {
            // The named targetPort resolved against the pod; UDP ports are not published.
            assert_eq!(
                port_pairs(s),
                [("http".to_string(), 8080), ("metrics".to_string(), 9090)]
            );
            assert_eq!(
                s.ports.as_ref().unwrap()[0].app_protocol.as_deref(),
                Some("http")
            );
            assert_eq!(s.metadata.namespace.as_deref(), Some(NS));
            let ep = &s.endpoints[0];
            assert_eq!(ep.node_name.as_deref(), Some("node-b"));
            let target = ep.target_ref.as_ref().unwrap();
            assert_eq!(
                (
                    target.kind.as_deref(),
                    target.name.as_deref(),
                    target.uid.as_deref()
                ),
                (Some("Pod"), Some("a"), Some("uid-a"))
            );
        }
        let v6 = slices.iter().find(|s| s.address_type == "IPv6").unwrap();
        assert_eq!(v6.endpoints[0].addresses, ["fd00::5"]);
    }

    #[test]
    fn pods_whose_named_target_port_resolves_differently_are_in_different_slices() {
        let slices = slices_for(&[
            pod("a", &["10.1.0.5"], 8080, true),
            pod("b", &["10.1.0.6"], 8081, true),
            pod("c", &["10.1.0.7"], 8080, true),
        ]);
        assert_eq!(slices.len(), 2);
        let mut by_port: Vec<(i32, Vec<String>)> = slices
            .iter()
            .map(|s| {
                (
                    port_pairs(s)[0].1,
                    s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                )
            })
            .collect();
        by_port.sort();
        assert_eq!(
            by_port,
            [
                (8080, vec!["10.1.0.5".to_string(), "10.1.0.7".to_string()]),
                (8081, vec!["10.1.0.6".to_string()])
            ]
        );
    }

    #[test]
    fn readiness_and_termination_become_endpoint_conditions() {
        let mut terminating = pod("t", &["10.1.0.9"], 8080, true);
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-01-01T00:00:00Z".parse().unwrap(),
            ));
        let slices = slices_for(&[
            pod("ready", &["10.1.0.5"], 8080, true),
            pod("unready", &["10.1.0.6"], 8080, false),
            terminating,
        ]);
        assert_eq!(slices.len(), 1);
        let conditions: Vec<(bool, bool, bool)> = slices[0]
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
            })
            .collect();
        assert_eq!(
            conditions,
            [
                (true, true, false),
                (false, true, true),
                (false, false, false)
            ],
            "ready, terminating (still serving), unready (in pod name order)"
        );
        assert_eq!(ready_endpoints(&slices), 1);
    }

    #[test]
    fn a_dual_stack_ready_pod_counts_as_one_ready_endpoint() {
        let slices = slices_for(&[pod("a", &["10.1.0.5", "fd00::5"], 8080, true)]);
        assert_eq!(ready_endpoints(&slices), 1);
    }

    #[test]
    fn a_service_of_one_family_gets_slices_of_that_family_only() {
        let mut svc = service("checkout");
        svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into()]);
        let p = pod("a", &["10.1.0.5", "fd00::5"], 8080, true);
        let slices = fork_slices(&sandbox("feature-x"), &fork("checkout"), &svc, &[&p]);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].address_type, "IPv4");
    }

    #[test]
    fn pods_without_ip_or_serving_no_port_or_finished_are_left_out() {
        let mut no_ip = pod("a", &["10.1.0.5"], 8080, true);
        no_ip.status.as_mut().unwrap().pod_ip = None;
        no_ip.status.as_mut().unwrap().pod_ips = None;
        let mut done = pod("b", &["10.1.0.6"], 8080, true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut svc = service("checkout");
        // Only the named port, which pod c does not declare.
        svc.spec
            .as_mut()
            .unwrap()
            .ports
            .as_mut()
            .unwrap()
            .truncate(1);
        let mut no_port = pod("c", &["10.1.0.7"], 8080, true);
        no_port.spec.as_mut().unwrap().containers[0].ports = None;
        let slices = fork_slices(
            &sandbox("feature-x"),
            &fork("checkout"),
            &svc,
            &[&no_ip, &done, &no_port],
        );
        assert!(slices.is_empty(), "{slices:?}");
    }

    #[test]
    fn slices_are_labelled_as_forks_owned_by_the_sandbox_and_never_as_the_service() {
        let slices = slices_for(&[pod("a", &["10.1.0.5"], 8080, true)]);
        let s = &slices[0];
        let labels = s.metadata.labels.as_ref().unwrap();
        assert!(!labels.contains_key(crate::k8s::SERVICE_NAME_LABEL));
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels[SANDBOX_LABEL], "feature-x");
        assert_eq!(labels[SANDBOX_NAMESPACE_LABEL], NS);
        assert_eq!(labels[FORK_OF_LABEL], "checkout");
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Sandbox", "feature-x", "sb-uid")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.api_version, API_VERSION);
        assert_eq!(
            parse_fork_slice(s),
            Some(ForkSliceRef {
                sandbox_namespace: NS.into(),
                sandbox_name: "feature-x".into(),
                service_namespace: NS.into(),
                service: "checkout".into(),
            })
        );
    }

    #[test]
    fn a_slice_of_the_cluster_endpoint_controller_is_not_a_fork_slice() {
        let mut s = slices_for(&[pod("a", &["10.1.0.5"], 8080, true)]).remove(0);
        s.metadata.labels.as_mut().unwrap().insert(
            MANAGED_BY_LABEL.into(),
            "endpointslice-controller.k8s.io".into(),
        );
        assert_eq!(parse_fork_slice(&s), None);
        s.metadata.labels = None;
        assert_eq!(parse_fork_slice(&s), None);
    }

    #[test]
    fn names_are_deterministic_distinct_and_at_most_63_characters() {
        let long = "a-very-long-sandbox-name-that-goes-on-and-on-and-on-and-on-x";
        let mut sb = sandbox(long);
        sb.metadata.name = Some(long.into());
        let f = fork("a-rather-long-service-name-as-well");
        let svc = service("a-rather-long-service-name-as-well");
        let mut p = pod("a", &["10.1.0.5", "fd00::5"], 8080, true);
        p.metadata.labels = Some(f.selector.clone());
        let slices = fork_slices(&sb, &f, &svc, &[&p]);
        let again = fork_slices(&sb, &f, &svc, &[&p]);
        assert_eq!(slices, again);
        let names: Vec<&str> = slices
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap())
            .collect();
        assert_ne!(names[0], names[1]);
        for n in &names {
            assert!(n.len() <= MAX_NAME_LEN, "{n}");
            assert!(n.starts_with("a-very-long-sandbox-name"), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !n.ends_with('-'),
                "{n}"
            );
        }
        assert!(
            slices_for(&[pod("a", &["10.1.0.5"], 8080, true)])[0]
                .metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("feature-x-checkout-")
        );
    }

    #[test]
    fn more_endpoints_than_a_slice_holds_are_split() {
        let pods: Vec<Pod> = (0..(MAX_ENDPOINTS_PER_SLICE + 1))
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &[&format!("10.1.{}.{}", i / 200, i % 200)],
                    8080,
                    true,
                )
            })
            .collect();
        let slices = slices_for(&pods);
        assert_eq!(slices.len(), 2);
        let total: usize = slices.iter().map(|s| s.endpoints.len()).sum();
        assert_eq!(total, MAX_ENDPOINTS_PER_SLICE + 1);
    }

    #[test]
    fn a_fork_selects_labelled_pods_of_its_namespace_only() {
        let mut other_ns = pod("x", &["10.1.0.8"], 8080, true);
        other_ns.metadata.namespace = Some("elsewhere".into());
        let mut unlabelled = pod("y", &["10.1.0.9"], 8080, true);
        unlabelled.metadata.labels = None;
        let a = pod("a", &["10.1.0.5"], 8080, true);
        let pods = [other_ns, unlabelled, a];
        let selected = selected_pods(&fork("checkout"), NS, &pods);
        assert_eq!(selected.len(), 1);
        assert_eq!(selected[0].metadata.name.as_deref(), Some("a"));
        let mut empty = fork("checkout");
        empty.selector.clear();
        assert!(selected_pods(&empty, NS, &pods).is_empty());
    }
}
