//! `desired(&Store) -> Tables`: what this node's maps and router should hold. Pure: the only
//! outside input is the cgroup resolver, behind a trait.
//!
//! - A *service id* names one service port (`namespace/name:port`), a *key id* one routing key;
//!   both come from the [`IdAllocator`] so they stay the same across syncs.
//! - `services` holds only forked service ports, keyed by each ClusterIP:port and by each
//!   baseline backend address:port (for when another program translated the VIP first).
//! - `forks` holds, per routing key and forked service port, the ready fork endpoints (count 0
//!   when there is none: the fork exists, it is just down).
//! - `workloads` maps the cgroup of each fork pod on this node to its sandbox's key.
//!
//! Conflicts never fail the sync: the object that sorts first (namespace/name) wins, and a
//! warning says what was dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use redirect_common::{
    ForkEndpoints, ForkKey, MAX_FORK_ENDPOINTS, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};

pub use super::ids::IdAllocator;
use crate::cgroup::CgroupResolver;
use crate::crd::{Fallback, Sandbox, validate_routing_key};
use crate::forkslice::ForkSliceRef;
use crate::k8s::{pod_ips, pod_ready, pod_running, target_port, tcp_ports};
use crate::routing::{KeyInfo, ServiceName, Tables};
use crate::store::{LabelIndex, ObjectName, Store, StoreIndex, labels_match, ns_name};

pub use crate::k8s::SERVICE_NAME_LABEL;

/// What `desired` needs to know about the node it runs for.
pub struct NodeContext<'a> {
    /// This node's name: only fork pods scheduled here become workloads. None: all pods.
    pub node_name: Option<String>,
    /// Where the node router listens and how it marks its sockets.
    pub router: RouterConfig,
    /// Finds fork pods' cgroups.
    pub cgroups: &'a mut dyn CgroupResolver,
}

/// The desired tables and what was dropped on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub tables: Tables,
    pub warnings: Vec<String>,
}

/// A socket address as the maps store it (IPv4 as IPv4-mapped, network-order words).
pub fn sockaddr(ip: IpAddr, port: u16) -> SockAddr {
    match ip {
        IpAddr::V4(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), port),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr::v6([word(0), word(4), word(8), word(12)], port)
        }
    }
}

/// The desired routing state of this node.
pub fn desired(store: &Store, node: &mut NodeContext<'_>, ids: &mut IdAllocator) -> Desired {
    let mut b = Builder {
        index: store.index(),
        ids,
        out: Desired::default(),
        forked: BTreeMap::new(),
    };
    b.out.tables.router = node.router;

    let mut sandboxes: Vec<&Sandbox> = store.sandboxes.iter().map(|s| &**s).collect();
    sandboxes.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
    let resolved: Vec<ResolvedSandbox<'_>> = sandboxes.iter().map(|sb| b.resolve(sb)).collect();

    let mut key_owner: BTreeMap<String, ObjectName> = BTreeMap::new();
    for sb in &resolved {
        let Some(key_id) = b.claim_key(&mut key_owner, &sb.name, &sb.sandbox.spec.routing_key)
        else {
            continue;
        };
        for (service_id, eps) in &sb.forks {
            b.out.tables.forks.insert(
                ForkKey {
                    key_id,
                    service_id: *service_id,
                },
                *eps,
            );
        }
        b.out.tables.keys.insert(
            key_id,
            KeyInfo {
                key: sb.sandbox.spec.routing_key.clone(),
                owners: vec![sb.name.ns_name()],
                fallback_to_baseline: sb.sandbox.spec.fallback() == Fallback::Baseline,
            },
        );
        b.workloads(node, sb, key_id);
    }

    let mut groups: Vec<_> = store.route_groups.iter().collect();
    groups.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
    let sandbox_labels = LabelIndex::new(
        resolved
            .iter()
            .map(|sb| sb.sandbox.metadata.labels.as_ref()),
    );
    for rg in groups {
        let name = ObjectName::new("RouteGroup", &rg.metadata);
        let Some(key_id) = b.claim_key(&mut key_owner, &name, &rg.spec.routing_key) else {
            continue;
        };
        let members: Vec<&ResolvedSandbox<'_>> = sandbox_labels
            .matching(&rg.spec.sandbox_selector)
            .into_iter()
            .map(|i| &resolved[i])
            .collect();
        if members.is_empty() {
            b.warn(format!("{name}: sandboxSelector matches no Sandbox"));
        }
        let mut union: BTreeMap<u32, (&ObjectName, ForkEndpoints)> = BTreeMap::new();
        for sb in &members {
            for (service_id, eps) in &sb.forks {
                match union.get(service_id) {
                    Some((first, _)) => {
                        let service = &b.forked[service_id].0;
                        let warning = format!(
                            "{name}: {first} and {} both fork {service}; using {first}",
                            sb.name
                        );
                        b.warn(warning);
                    }
                    None => {
                        union.insert(*service_id, (&sb.name, *eps));
                    }
                }
            }
        }
        for (service_id, (_, eps)) in union {
            b.out
                .tables
                .forks
                .insert(ForkKey { key_id, service_id }, eps);
        }
        let mut owners = vec![name.ns_name()];
        owners.extend(members.iter().map(|sb| sb.name.ns_name()));
        b.out.tables.keys.insert(
            key_id,
            KeyInfo {
                key: rg.spec.routing_key.clone(),
                owners,
                fallback_to_baseline: !members.is_empty()
                    && members
                        .iter()
                        .all(|sb| sb.sandbox.spec.fallback() == Fallback::Baseline),
            },
        );
    }

    b.services();
    b.out
}

/// A sandbox with its forks resolved to service ids and ready endpoints.
struct ResolvedSandbox<'s> {
    sandbox: &'s Sandbox,
    name: ObjectName,
    /// Per forked service port: the ready fork endpoints.
    forks: Vec<(u32, ForkEndpoints)>,
    /// Every pod some fork of the sandbox selects (ready or not), sorted by namespace/name.
    pods: Vec<&'s Pod>,
}

struct Builder<'s, 'i> {
    /// The store's objects by name.
    index: StoreIndex<'s>,
    ids: &'i mut IdAllocator,
    out: Desired,
    /// Service id → its name and (Service, port), for every service port some fork names.
    forked: BTreeMap<u32, (ServiceName, &'s Service, &'s ServicePort)>,
}

impl<'s> Builder<'s, '_> {
    fn warn(&mut self, warning: String) {
        self.out.warnings.push(warning);
    }

    /// The key id of `key` for `owner`, unless the key is invalid or already taken.
    fn claim_key(
        &mut self,
        taken: &mut BTreeMap<String, ObjectName>,
        owner: &ObjectName,
        key: &str,
    ) -> Option<u32> {
        if let Err(e) = validate_routing_key(key) {
            self.warn(format!("{owner}: ignored: {e}"));
            return None;
        }
        if let Some(first) = taken.get(key) {
            self.warn(format!(
                "{owner}: ignored: routing key {key:?} is already used by {first}"
            ));
            return None;
        }
        taken.insert(key.to_string(), owner.clone());
        Some(self.ids.key_id(key))
    }

    fn resolve(&mut self, sandbox: &'s Sandbox) -> ResolvedSandbox<'s> {
        let name = ObjectName::new("Sandbox", &sandbox.metadata);
        let mut forks = Vec::new();
        let mut pods: BTreeMap<(&str, &str), &'s Pod> = BTreeMap::new();
        for fork in &sandbox.spec.forks {
            let ns = fork.namespace_or(&name.namespace);
            if fork.selector.is_empty() {
                self.warn(format!(
                    "{name}: fork of Service {ns}/{} ignored: empty selector",
                    fork.service
                ));
                continue;
            }
            // Fork pods belong to the sandbox (and route by its key) even when the Service
            // they stand in for is missing.
            let mut selected: Vec<&'s Pod> = self
                .index
                .pods_in(ns)
                .iter()
                .copied()
                .filter(|p| labels_match(&fork.selector, p.metadata.labels.as_ref()))
                .collect();
            selected.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
            pods.extend(selected.iter().map(|p| (ns_name(&p.metadata), *p)));

            let Some(svc) = self.index.service(ns, &fork.service) else {
                self.warn(format!(
                    "{name}: fork of Service {ns}/{} has no effect: no such Service",
                    fork.service
                ));
                continue;
            };
            let ports = tcp_ports(svc);
            if ports.is_empty() {
                self.warn(format!(
                    "{name}: fork of Service {ns}/{} has no effect: no TCP port",
                    fork.service
                ));
            }
            for port in ports {
                let service = ServiceName {
                    namespace: ns.to_string(),
                    name: fork.service.clone(),
                    port: port_name(port),
                };
                let service_id = self.ids.service_id(&service);
                let eps = self.fork_endpoints(&name, &service, port, &selected);
                self.forked.insert(service_id, (service, svc, port));
                forks.push((service_id, eps));
            }
        }
        ResolvedSandbox {
            sandbox,
            name,
            forks,
            pods: pods.into_values().collect(),
        }
    }

    /// Ready endpoints of the selected pods (sorted by name) for one service port, then those
    /// of the controller's fork slices that are not among them (fork pods on other nodes).
    fn fork_endpoints(
        &mut self,
        sandbox: &ObjectName,
        service: &ServiceName,
        port: &ServicePort,
        pods: &[&Pod],
    ) -> ForkEndpoints {
        let mut all = Vec::new();
        for pod in pods.iter().filter(|p| pod_ready(p)) {
            let Some(target) = target_port(pod, port) else {
                let (ns, pod_name) = ns_name(&pod.metadata);
                self.warn(format!(
                    "{sandbox}: Pod {ns}/{pod_name} has no container port for {service}"
                ));
                continue;
            };
            all.extend(pod_ips(pod).into_iter().map(|ip| sockaddr(ip, target)));
        }
        let slice_key = ForkSliceRef {
            sandbox_namespace: sandbox.namespace.clone(),
            sandbox_name: sandbox.name.clone(),
            service_namespace: service.namespace.clone(),
            service: service.name.clone(),
        };
        let mut published = Vec::new();
        for slice in self.index.fork_slices(&slice_key) {
            published.extend(slice_endpoints(slice, port.name.as_deref().unwrap_or("")));
        }
        published.sort();
        for a in published {
            if !all.contains(&a) {
                all.push(a);
            }
        }
        let (eps, dropped) = ForkEndpoints::from_endpoints(&all);
        if dropped > 0 {
            self.warn(format!(
                "{sandbox}: fork of {service} has {} ready endpoints, only the first {MAX_FORK_ENDPOINTS} are used",
                all.len()
            ));
        }
        eps
    }

    /// Workloads: the sandbox's pods on this node whose cgroup is known.
    fn workloads(&mut self, node: &mut NodeContext<'_>, sb: &ResolvedSandbox<'_>, key_id: u32) {
        for pod in &sb.pods {
            let local = match &node.node_name {
                None => true,
                Some(n) => pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(n),
            };
            if !local || !pod_running(pod) {
                continue;
            }
            let (ns, pod_name) = ns_name(&pod.metadata);
            let Some(uid) = pod.metadata.uid.as_deref() else {
                self.warn(format!("{}: Pod {ns}/{pod_name} has no uid", sb.name));
                continue;
            };
            let Some(cgroup) = node.cgroups.cgroup_id(uid) else {
                continue; // not started yet: found on a later sync
            };
            match self.out.tables.workloads.get(&cgroup) {
                Some(w) if w.key_id != key_id => {
                    let first = self
                        .out
                        .tables
                        .keys
                        .get(&w.key_id)
                        .map(|k| k.owners.join(","));
                    let first = first.unwrap_or_default();
                    self.warn(format!(
                        "Pod {ns}/{pod_name} is selected by forks of Sandbox {first} and {}; it keeps the key of {first}",
                        sb.name
                    ));
                }
                Some(_) => {}
                None => {
                    self.out
                        .tables
                        .workloads
                        .insert(cgroup, WorkloadValue { key_id, _pad: 0 });
                }
            }
        }
    }

    /// `services` and `service_names` for every service port that some key forks.
    fn services(&mut self) {
        let used: BTreeSet<u32> = self.out.tables.forks.keys().map(|k| k.service_id).collect();
        let mut ports: Vec<_> = used
            .iter()
            .map(|id| (*id, self.forked[id].clone()))
            .collect();
        ports.sort_by(|a, b| a.1.0.cmp(&b.1.0));
        // ClusterIPs first, so a backend address never shadows a VIP.
        for (service_id, (name, svc, port)) in &ports {
            let Ok(vip_port) = u16::try_from(port.port) else {
                continue;
            };
            for ip in cluster_ips(svc) {
                self.service_entry(sockaddr(ip, vip_port), *service_id, name);
            }
        }
        for (service_id, (name, _svc, port)) in &ports {
            for addr in self.backends(name, port) {
                self.service_entry(addr, *service_id, name);
            }
            self.out
                .tables
                .service_names
                .insert(*service_id, name.clone());
        }
    }

    fn service_entry(&mut self, addr: SockAddr, service_id: u32, name: &ServiceName) {
        match self.out.tables.services.get(&addr) {
            Some(v) if v.service_id != service_id => {
                let first = self.forked[&v.service_id].0.clone();
                self.warn(format!(
                    "{} is an address of both {first} and {name}; connections to it count as {first}",
                    display_addr(&addr)
                ));
            }
            Some(_) => {}
            None => {
                self.out.tables.services.insert(
                    addr,
                    ServiceValue {
                        service_id,
                        flags: 0,
                    },
                );
            }
        }
    }

    /// Baseline backend addresses of a service port, from its EndpointSlices.
    fn backends(&self, name: &ServiceName, port: &ServicePort) -> Vec<SockAddr> {
        let mut out = Vec::new();
        for slice in self.index.service_slices(&name.namespace, &name.name) {
            let want = port.name.as_deref().unwrap_or("");
            let slice_port = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == want
                    && p.protocol.as_deref().is_none_or(|p| p == "TCP")
            });
            let Some(number) = slice_port
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for ep in &slice.endpoints {
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        out.push(sockaddr(ip, number));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Ready, not terminating addresses of an EndpointSlice on its port named `port_name` (TCP).
fn slice_endpoints(slice: &EndpointSlice, port_name: &str) -> Vec<SockAddr> {
    let number = slice
        .ports
        .iter()
        .flatten()
        .find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().is_none_or(|p| p == "TCP")
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    let Some(number) = number else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let c = ep.conditions.as_ref();
        // A missing `ready` means ready (EndpointSlice API).
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        if !ready || terminating {
            continue;
        }
        out.extend(
            ep.addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .map(|ip| sockaddr(ip, number)),
        );
    }
    out
}

/// A service port's name, or its number when unnamed.
fn port_name(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => port.port.to_string(),
    }
}

/// The ClusterIPs of a service (both families); none for headless services.
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    let mut out: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    out.dedup();
    out
}

/// `ip:port` of a map address, for messages.
pub fn display_addr(a: &SockAddr) -> String {
    match a.v4_be() {
        Some(be) => format!("{}:{}", std::net::Ipv4Addr::from(be.to_ne_bytes()), a.port),
        None => {
            let mut o = [0u8; 16];
            for (chunk, w) in o.chunks_mut(4).zip(a.ip) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            format!("[{}]:{}", std::net::Ipv6Addr::from(o), a.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::crd::{Fork, RouteGroup, RouteGroupSpec, SandboxSpec};
    use crate::routing::RouteView;

    /// A routing key's id, looked up as the router does.
    fn key_of(t: &Tables, key: &str) -> Option<u32> {
        RouteView::new(t.clone()).key_id(key)
    }

    const NS: &str = "shop";
    const VIP: &str = "10.200.128.10";
    const NODE: &str = "node-a";

    fn v4(ip: &str, port: u16) -> SockAddr {
        sockaddr(ip.parse().unwrap(), port)
    }

    fn http_port(target: serde_json::Value) -> serde_json::Value {
        json!({"name": "http", "port": 80, "targetPort": target})
    }

    /// A scene: objects added one by one, then `desired()` run once.
    #[derive(Default)]
    struct Scene {
        store: Store,
        cgroups: HashMap<String, u64>,
        node_name: Option<String>,
    }

    impl Scene {
        fn new() -> Self {
            Scene {
                node_name: Some(NODE.into()),
                ..Default::default()
            }
        }

        fn service(mut self, name: &str, cluster_ips: &[&str], ports: serde_json::Value) -> Self {
            self.store.services.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips, "ports": ports},
                }))
                .unwrap(),
            ));
            self
        }

        fn checkout(self) -> Self {
            self.service("checkout", &[VIP], json!([http_port(json!(8080))]))
        }

        fn slice(mut self, service: &str, port: (&str, u16), addresses: &[&str]) -> Self {
            let name = format!("{service}-{}", self.store.endpoint_slices.len());
            self.store.endpoint_slices.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": NS,
                                 "labels": {SERVICE_NAME_LABEL: service}},
                    "addressType": "IPv4",
                    "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
                    "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
                }))
                .unwrap(),
            ));
            self
        }

        fn pod_json(mut self, pod: serde_json::Value) -> Self {
            self.store
                .pods
                .push(Arc::new(serde_json::from_value(pod).unwrap()));
            self
        }

        /// A ready pod with labels `app=<app>`, one IP, container port 8080 named `http`.
        fn pod(self, name: &str, app: &str, ip: &str) -> Self {
            self.pod_json(pod(name, app, &[ip], true))
        }

        fn sandbox(mut self, name: &str, key: &str, forks: &[(&str, &str)]) -> Self {
            let mut sb = Sandbox::new(
                name,
                SandboxSpec {
                    routing_key: key.into(),
                    forks: forks
                        .iter()
                        .map(|(service, app)| Fork {
                            service: service.to_string(),
                            namespace: None,
                            selector: [("app".to_string(), app.to_string())].into(),
                        })
                        .collect(),
                    fallback: None,
                    ttl: None,
                },
            );
            sb.metadata.namespace = Some(NS.into());
            sb.metadata.labels = Some([("team".to_string(), "payments".to_string())].into());
            self.store.sandboxes.push(sb.into());
            self
        }

        fn route_group(mut self, name: &str, key: &str, team: &str) -> Self {
            let mut rg = RouteGroup::new(
                name,
                RouteGroupSpec {
                    routing_key: key.into(),
                    sandbox_selector: [("team".to_string(), team.to_string())].into(),
                },
            );
            rg.metadata.namespace = Some("groups".into());
            self.store.route_groups.push(rg.into());
            self
        }

        fn cgroup(mut self, pod_uid: &str, id: u64) -> Self {
            self.cgroups.insert(pod_uid.into(), id);
            self
        }

        fn desired_with(mut self, ids: &mut IdAllocator) -> Desired {
            let mut node = NodeContext {
                node_name: self.node_name.clone(),
                router: RouterConfig {
                    v4: v4("10.200.0.1", 15001),
                    mark: 0x5244,
                    ..Default::default()
                },
                cgroups: &mut self.cgroups,
            };
            desired(&self.store, &mut node, ids)
        }

        fn desired(self) -> Desired {
            self.desired_with(&mut IdAllocator::new())
        }
    }

    fn pod(name: &str, app: &str, ips: &[&str], ready: bool) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                         "labels": {"app": app}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app",
                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ips[0],
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        })
    }

    fn checkout_http() -> ServiceName {
        ServiceName {
            namespace: NS.into(),
            name: "checkout".into(),
            port: "http".into(),
        }
    }

    /// The only fork of the tables, with its endpoints.
    fn only_fork(d: &Desired) -> (ForkKey, Vec<SockAddr>) {
        assert_eq!(d.tables.forks.len(), 1, "{:?}", d.tables.forks);
        let (k, v) = d.tables.forks.iter().next().unwrap();
        (*k, v.endpoints[..v.count as usize].to_vec())
    }

    #[test]
    fn sockaddr_stores_ipv4_mapped_and_ipv6_as_network_order_words() {
        let a = sockaddr("10.200.128.10".parse().unwrap(), 80);
        assert_eq!(a, SockAddr::v4(u32::from_ne_bytes([10, 200, 128, 10]), 80));
        let b = sockaddr("fd00:2::9".parse().unwrap(), 80);
        assert_eq!(
            b.ip,
            [
                u32::from_ne_bytes([0xfd, 0, 0, 2]),
                0,
                0,
                u32::from_ne_bytes([0, 0, 0, 9])
            ]
        );
        assert_eq!(display_addr(&a), "10.200.128.10:80");
        assert_eq!(display_addr(&b), "[fd00:2::9]:80");
    }

    #[test]
    fn a_forked_service_is_keyed_by_cluster_ip_and_by_every_backend() {
        let d = Scene::new()
            .checkout()
            .slice("checkout", ("http", 8080), &["10.244.1.5", "10.244.2.7"])
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let id = d
            .tables
            .service_names
            .iter()
            .next()
            .map(|(id, _)| *id)
            .unwrap();
        assert_eq!(d.tables.service_names[&id], checkout_http());
        let keys: BTreeSet<_> = d.tables.services.keys().copied().collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                v4("10.200.128.10", 80),
                v4("10.244.1.5", 8080),
                v4("10.244.2.7", 8080)
            ])
        );
        assert!(
            d.tables
                .services
                .values()
                .all(|v| v.service_id == id && v.flags == 0)
        );
        assert_eq!(d.tables.router.v4, v4("10.200.0.1", 15001));
    }

    #[test]
    fn services_nobody_forks_are_absent() {
        let d = Scene::new()
            .checkout()
            .service("cart", &["10.200.128.11"], json!([{"port": 80}]))
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert!(!d.tables.services.contains_key(&v4("10.200.128.11", 80)));
        assert_eq!(d.tables.service_names.len(), 1);
    }

    #[test]
    fn a_headless_service_is_keyed_by_its_backends_only() {
        let d = Scene::new()
            .service("db", &["None"], json!([{"name": "pg", "port": 5432}]))
            .slice("db", ("pg", 5432), &["10.244.1.5"])
            .sandbox("fx", "feature-x", &[("db", "db-fx")])
            .desired();
        let keys: Vec<_> = d.tables.services.keys().copied().collect();
        assert_eq!(keys, [v4("10.244.1.5", 5432)]);
    }

    #[test]
    fn dual_stack_services_and_pods_give_both_families() {
        let d = Scene::new()
            .service(
                "checkout",
                &[VIP, "fd00:200::10"],
                json!([http_port(json!(8080))]),
            )
            .pod_json(pod(
                "checkout-fx",
                "checkout-fx",
                &["10.244.1.9", "fd00:244::9"],
                true,
            ))
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert!(
            d.tables
                .services
                .contains_key(&sockaddr("fd00:200::10".parse().unwrap(), 80))
        );
        assert!(d.tables.services.contains_key(&v4(VIP, 80)));
        let (_, eps) = only_fork(&d);
        assert_eq!(
            eps,
            [
                v4("10.244.1.9", 8080),
                sockaddr("fd00:244::9".parse().unwrap(), 8080)
            ]
        );
    }

    #[test]
    fn fork_endpoints_are_the_ready_fork_pods_on_the_target_port() {
        let d = Scene::new()
            .checkout()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .pod("checkout-base", "checkout", "10.244.1.5")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let (key, eps) = only_fork(&d);
        assert_eq!(d.tables.keys[&key.key_id].key, "feature-x");
        assert_eq!(eps, [v4("10.244.1.9", 8080)]);
    }

    #[test]
    fn fork_pods_on_other_nodes_come_from_the_controllers_fork_slices() {
        use crate::forkslice::{
            FORK_OF_LABEL, MANAGED_BY, MANAGED_BY_LABEL, SANDBOX_LABEL, SANDBOX_NAMESPACE_LABEL,
        };
        let fork_slice = |name: &str, sandbox: &str, endpoints: serde_json::Value| {
            json!({
                "metadata": {"name": name, "namespace": NS, "labels": {
                    MANAGED_BY_LABEL: MANAGED_BY, SANDBOX_LABEL: sandbox,
                    SANDBOX_NAMESPACE_LABEL: NS, FORK_OF_LABEL: "checkout"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            })
        };
        let mut scene = Scene::new()
            .checkout()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")]);
        for slice in [
            fork_slice(
                "fx-checkout-a",
                "fx",
                json!([
                    // The local pod again (published too): listed once.
                    {"addresses": ["10.244.1.9"], "conditions": {"ready": true}, "nodeName": NODE},
                    {"addresses": ["10.244.2.7"], "conditions": {"ready": true}, "nodeName": "other"},
                    {"addresses": ["10.244.2.8"], "nodeName": "other"},
                    {"addresses": ["10.244.2.9"], "conditions": {"ready": false}},
                    {"addresses": ["10.244.2.10"], "conditions": {"ready": true, "terminating": true}},
                ]),
            ),
            // Another sandbox's fork of the same service: not ours.
            fork_slice(
                "other-checkout-a",
                "other",
                json!([{"addresses": ["10.244.3.1"]}]),
            ),
        ] {
            scene
                .store
                .endpoint_slices
                .push(Arc::new(serde_json::from_value(slice).unwrap()));
        }
        let d = scene.desired();
        let (_, eps) = only_fork(&d);
        assert_eq!(
            eps,
            [
                v4("10.244.1.9", 8080),
                v4("10.244.2.7", 8080),
                v4("10.244.2.8", 8080)
            ]
        );
        // A fork slice is never a baseline backend of the service.
        assert!(!d.tables.services.contains_key(&v4("10.244.2.7", 8080)));
    }

    #[test]
    fn a_named_target_port_is_resolved_from_the_pods_container_ports() {
        let d = Scene::new()
            .service("checkout", &[VIP], json!([http_port(json!("http"))]))
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert_eq!(only_fork(&d).1, [v4("10.244.1.9", 8080)]);
    }

    #[test]
    fn a_pod_without_the_named_port_is_skipped_with_a_warning() {
        let d = Scene::new()
            .service("checkout", &[VIP], json!([http_port(json!("grpc"))]))
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert_eq!(only_fork(&d).1, []);
        assert!(d.warnings[0].contains("has no container port for shop/checkout:http"));
    }

    #[test]
    fn an_unset_target_port_means_the_service_port_and_unnamed_ports_are_named_by_number() {
        let d = Scene::new()
            .service("checkout", &[VIP], json!([{"port": 9000}]))
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert_eq!(only_fork(&d).1, [v4("10.244.1.9", 9000)]);
        assert_eq!(d.tables.service_names.values().next().unwrap().port, "9000");
    }

    #[test]
    fn not_ready_terminating_and_finished_pods_are_not_endpoints() {
        let mut terminating = pod("b-terminating", "checkout-fx", &["10.244.1.2"], true);
        terminating["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        let mut finished = pod("c-finished", "checkout-fx", &["10.244.1.3"], true);
        finished["status"]["phase"] = json!("Succeeded");
        let d = Scene::new()
            .checkout()
            .pod_json(pod("a-not-ready", "checkout-fx", &["10.244.1.1"], false))
            .pod_json(terminating)
            .pod_json(finished)
            .pod("d-ready", "checkout-fx", "10.244.1.4")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert_eq!(only_fork(&d).1, [v4("10.244.1.4", 8080)]);
    }

    #[test]
    fn a_fork_with_no_ready_endpoint_is_present_with_count_zero() {
        let d = Scene::new()
            .checkout()
            .pod_json(pod("checkout-fx", "checkout-fx", &["10.244.1.1"], false))
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert_eq!(only_fork(&d).1, []);
        assert!(d.tables.services.contains_key(&v4(VIP, 80)));
    }

    #[test]
    fn endpoints_are_sorted_by_pod_name_and_capped() {
        let mut scene = Scene::new().checkout();
        for i in (0..10).rev() {
            scene = scene.pod(&format!("fx-{i}"), "checkout-fx", &format!("10.244.1.{i}"));
        }
        let d = scene
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let want: Vec<_> = (0..8).map(|i| v4(&format!("10.244.1.{i}"), 8080)).collect();
        assert_eq!(only_fork(&d).1, want);
        assert!(d.warnings.iter().any(|w| w.contains("10 ready endpoints")));
    }

    #[test]
    fn a_fork_of_a_missing_service_has_no_effect_and_is_a_warning() {
        let d = Scene::new()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        assert!(d.tables.services.is_empty() && d.tables.forks.is_empty());
        assert_eq!(
            d.warnings,
            ["Sandbox shop/fx: fork of Service shop/checkout has no effect: no such Service"]
        );
        assert_eq!(d.tables.keys.len(), 1, "the key still exists");
    }

    #[test]
    fn fork_pods_of_a_missing_service_still_carry_their_sandbox_key() {
        let d = Scene::new()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .cgroup("uid-checkout-fx", 4242)
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let key_id = RouteView::new(d.tables.clone())
            .key_id("feature-x")
            .unwrap();
        assert_eq!(d.tables.workloads[&4242].key_id, key_id);
    }

    #[test]
    fn fork_pods_on_this_node_become_workloads_with_their_sandbox_key() {
        let mut elsewhere = pod("checkout-fx-2", "checkout-fx", &["10.244.2.9"], true);
        elsewhere["spec"]["nodeName"] = json!("node-b");
        let d = Scene::new()
            .checkout()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .pod_json(elsewhere)
            .pod("checkout-fx-3", "checkout-fx", "10.244.1.10")
            .pod("checkout-base", "checkout", "10.244.1.5")
            .cgroup("uid-checkout-fx", 4242)
            .cgroup("uid-checkout-fx-2", 4343)
            .cgroup("uid-checkout-base", 4444)
            // checkout-fx-3 has no cgroup yet
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let key_id = RouteView::new(d.tables.clone())
            .key_id("feature-x")
            .unwrap();
        assert_eq!(
            d.tables.workloads,
            BTreeMap::from([(4242, WorkloadValue { key_id, _pad: 0 })])
        );
    }

    #[test]
    fn a_pod_selected_by_two_sandboxes_keeps_the_first_key_with_a_warning() {
        let d = Scene::new()
            .checkout()
            .service("cart", &["10.200.128.11"], json!([{"port": 80}]))
            .pod("shared", "shared", "10.244.1.9")
            .cgroup("uid-shared", 7)
            .sandbox("b", "key-b", &[("cart", "shared")])
            .sandbox("a", "key-a", &[("checkout", "shared")])
            .desired();
        let key_a = key_of(&d.tables, "key-a").unwrap();
        assert_eq!(d.tables.workloads[&7].key_id, key_a);
        assert!(d.warnings.iter().any(|w| w.starts_with(
            "Pod shop/shared is selected by forks of Sandbox shop/a and Sandbox shop/b"
        )));
    }

    #[test]
    fn a_routing_key_used_twice_goes_to_the_first_sandbox_with_a_warning() {
        let d = Scene::new()
            .checkout()
            .service("cart", &["10.200.128.11"], json!([{"port": 80}]))
            .sandbox("z-late", "feature-x", &[("cart", "cart-fx")])
            .sandbox("a-early", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let key_id = RouteView::new(d.tables.clone())
            .key_id("feature-x")
            .unwrap();
        assert_eq!(d.tables.keys[&key_id].owners, ["shop/a-early"]);
        assert_eq!(
            only_fork(&d).0.service_id,
            *d.tables.service_names.keys().next().unwrap()
        );
        assert_eq!(
            d.warnings,
            [
                "Sandbox shop/z-late: ignored: routing key \"feature-x\" is already used by Sandbox shop/a-early"
            ]
        );
    }

    #[test]
    fn a_route_group_key_forks_the_union_of_its_sandboxes() {
        let d = Scene::new()
            .checkout()
            .service("cart", &["10.200.128.11"], json!([http_port(json!(8080))]))
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .pod("cart-fy", "cart-fy", "10.244.1.8")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .sandbox("fy", "feature-y", &[("cart", "cart-fy")])
            .route_group("release", "release-1", "payments")
            .desired();
        let group = RouteView::new(d.tables.clone())
            .key_id("release-1")
            .unwrap();
        let forks: Vec<_> = d
            .tables
            .forks
            .iter()
            .filter(|(k, _)| k.key_id == group)
            .map(|(k, v)| {
                (
                    d.tables.service_names[&k.service_id].name.as_str(),
                    v.endpoints[0],
                )
            })
            .collect();
        assert_eq!(
            forks.iter().copied().collect::<BTreeMap<_, _>>(),
            BTreeMap::from([
                ("cart", v4("10.244.1.8", 8080)),
                ("checkout", v4("10.244.1.9", 8080))
            ])
        );
        assert_eq!(
            d.tables.keys[&group].owners,
            ["groups/release", "shop/fx", "shop/fy"]
        );
        assert_eq!(
            d.tables.forks.len(),
            4,
            "each sandbox keeps its own key too"
        );
    }

    #[test]
    fn route_group_members_forking_the_same_service_use_the_first_sandbox() {
        let d = Scene::new()
            .checkout()
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .pod("checkout-fy", "checkout-fy", "10.244.1.8")
            .sandbox("fy", "feature-y", &[("checkout", "checkout-fy")])
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .route_group("release", "release-1", "payments")
            .desired();
        let group = RouteView::new(d.tables.clone())
            .key_id("release-1")
            .unwrap();
        let fork = d
            .tables
            .forks
            .iter()
            .find(|(k, _)| k.key_id == group)
            .unwrap()
            .1;
        assert_eq!(fork.endpoints[0], v4("10.244.1.9", 8080));
        assert_eq!(
            d.warnings,
            [
                "RouteGroup groups/release: Sandbox shop/fx and Sandbox shop/fy both fork shop/checkout:http; using Sandbox shop/fx"
            ]
        );
    }

    #[test]
    fn a_route_group_selecting_nothing_still_owns_its_key() {
        let d = Scene::new()
            .checkout()
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .route_group("release", "release-1", "nobody")
            .desired();
        let group = RouteView::new(d.tables.clone())
            .key_id("release-1")
            .unwrap();
        assert!(d.tables.forks.keys().all(|k| k.key_id != group));
        assert!(!d.tables.keys[&group].fallback_to_baseline);
        assert_eq!(
            d.warnings,
            ["RouteGroup groups/release: sandboxSelector matches no Sandbox"]
        );
    }

    #[test]
    fn key_info_carries_the_fallback() {
        let mut scene = Scene::new()
            .checkout()
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .sandbox("fy", "feature-y", &[("checkout", "checkout-fx")]);
        Arc::make_mut(&mut scene.store.sandboxes[0]).spec.fallback = Some(Fallback::Baseline);
        let d = scene.desired();
        let info = |k| &d.tables.keys[&key_of(&d.tables, k).unwrap()];
        assert!(info("feature-x").fallback_to_baseline);
        assert!(!info("feature-y").fallback_to_baseline);
    }

    #[test]
    fn ids_stay_the_same_when_another_service_is_added() {
        let mut ids = IdAllocator::new();
        let before = Scene::new()
            .checkout()
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired_with(&mut ids);
        let after = Scene::new()
            .service(
                "aaa-first",
                &["10.200.128.1"],
                json!([{"name": "http", "port": 80}]),
            )
            .checkout()
            .sandbox(
                "fx",
                "feature-x",
                &[("aaa-first", "a"), ("checkout", "checkout-fx")],
            )
            .desired_with(&mut ids);
        let id_of = |d: &Desired| d.tables.services[&v4(VIP, 80)].service_id;
        assert_eq!(id_of(&before), id_of(&after));
        assert_eq!(
            key_of(&before.tables, "feature-x"),
            key_of(&after.tables, "feature-x")
        );
        assert_eq!(after.tables.service_names.len(), 2);
    }

    #[test]
    fn a_backend_shared_by_two_forked_services_counts_as_the_first() {
        let d = Scene::new()
            .checkout()
            .service(
                "checkout-alias",
                &["10.200.128.12"],
                json!([http_port(json!(8080))]),
            )
            .slice("checkout", ("http", 8080), &["10.244.1.5"])
            .slice("checkout-alias", ("http", 8080), &["10.244.1.5"])
            .sandbox(
                "fx",
                "feature-x",
                &[("checkout", "fx"), ("checkout-alias", "fx")],
            )
            .desired();
        let first = d.tables.services[&v4(VIP, 80)].service_id;
        assert_eq!(d.tables.services[&v4("10.244.1.5", 8080)].service_id, first);
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
    }

    #[test]
    fn the_example_manifests_route_feature_x_to_its_fork() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests");
        let store = crate::source::load_dir(&dir).expect("the fixtures load");
        assert!(store.warnings.is_empty(), "{:?}", store.warnings);
        let fork_uid = store
            .pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("checkout-feature-x"))
            .and_then(|p| p.metadata.uid.clone())
            .unwrap();
        let mut cgroups = HashMap::from([(fork_uid, 4242u64)]);
        let mut node = NodeContext {
            node_name: Some("node-a".into()),
            router: RouterConfig::default(),
            cgroups: &mut cgroups,
        };
        let d = desired(&store, &mut node, &mut IdAllocator::new());
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);

        let t = &d.tables;
        let key_id = key_of(t, "feature-x").unwrap();
        let svc = t.services[&v4(VIP, 80)].service_id;
        assert_eq!(t.service_names[&svc].to_string(), "shop/checkout:http");
        assert_eq!(t.services[&v4("10.244.1.5", 8080)].service_id, svc);
        let fork = t.forks[&ForkKey {
            key_id,
            service_id: svc,
        }];
        assert_eq!(fork.count, 1);
        assert_eq!(fork.endpoints[0], v4("10.244.1.9", 8080));
        assert_eq!(t.workloads[&4242].key_id, key_id);
        assert_eq!(t.keys[&key_id].owners, ["shop/feature-x"]);
    }
}
