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
//!
//! [`DesiredState`] computes the same from one snapshot to the next while remembering what
//! each Sandbox resolved to and each forked Service port's backends, so a change costs what it
//! touches rather than a pass over every object of the cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use redirect_common::{ForkEndpoints, MAX_FORK_ENDPOINTS, RouterConfig, SockAddr, WorkloadValue};

use super::claims::{Port, ServiceClaims};
use super::fork_table::{ForkTable, Made};
pub use super::ids::IdAllocator;
use super::index::{Index, StoreChanges};
use crate::cgroup::CgroupResolver;
use crate::crd::{Fallback, RouteGroup, Sandbox, validate_routing_key};
use crate::forkslice::ForkSliceRef;
use crate::k8s::{pod_ips, pod_ready, pod_running, target_port, tcp_ports};
use crate::routing::{KeyInfo, PortProtocol, ServiceName, Tables};
use crate::slice::Slice;
use crate::store::{LabelIndex, ObjectName, Store, labels_match, ns_name};

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

/// Which entries of the `forks` and `services` tables a call of [`DesiredState::desired`] may
/// have changed since the call before: every other entry is as it was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Key ids whose `forks` entries may differ.
    pub fork_keys: Vec<u32>,
    /// `services` addresses that may differ, sorted.
    pub services: Vec<SockAddr>,
}

/// The map address of `ip:port`.
fn map_addr(ip: IpAddr, port: u16) -> SockAddr {
    SockAddr::from(SocketAddr::new(ip, port))
}

/// The desired routing state of this node, computed from nothing.
pub fn desired(store: &Store, node: &mut NodeContext<'_>, ids: &mut IdAllocator) -> Desired {
    let mut state = DesiredState::new(std::mem::take(ids));
    let out = state.desired(store, node);
    *ids = state.ids;
    out
}

/// [`desired`] with a memory: what each Sandbox resolved to (its forks' service ids and
/// endpoints, its pods, its warnings) and the baseline backends of each forked Service port are
/// kept from one call to the next and recomputed only when an object they were made of
/// changed. Changes are found by object identity (see [`super::index`]): a source hands an
/// unchanged object over as the same `Arc`. The result is always that of [`desired`] on the
/// same store.
#[derive(Debug, Default)]
pub struct DesiredState {
    ids: IdAllocator,
    /// The store of the last call, to tell what changed.
    seen: Store,
    index: Index,
    /// Per Sandbox object (its address: the entry holds the `Arc`, so the address stays its
    /// own).
    sandboxes: HashMap<usize, Resolved>,
    /// The services table and the forked ports it was made of.
    claims: ServiceClaims,
    /// Services (namespace, name) whose Service or EndpointSlices changed since the last call:
    /// their ports' backends are computed again.
    stale: Stale,
    /// Service ports of sandboxes resolved or forgotten since the last call.
    dirty: HashSet<u32>,
    /// Gives each [`Resolved`] its own number.
    generation: u64,
    groups: GroupMemo,
    fork_table: ForkTable,
    calls: u64,
    touched: Option<Touched>,
}

/// What the route groups made of the sandboxes last time.
#[derive(Debug, Default)]
struct GroupMemo {
    /// The sandboxes (in order) whose labels `members` was computed from.
    sandboxes: Vec<Arc<Sandbox>>,
    /// Per RouteGroup object (address; the entry holds it): positions of the sandboxes it
    /// selects.
    members: HashMap<usize, (Arc<RouteGroup>, Vec<usize>)>,
    /// Per RouteGroup object (address): what it added to the tables.
    made: HashMap<usize, GroupMade>,
}

/// What one route group added to the tables, and what from.
#[derive(Debug)]
struct GroupMade {
    group: Arc<RouteGroup>,
    /// Its own number, as [`Resolved::generation`].
    generation: u64,
    key_id: u32,
    /// Generations of its members' [`Resolved`], in order.
    members: Vec<u64>,
    forks: Vec<(u32, ForkEndpoints)>,
    key: Arc<KeyInfo>,
    warnings: Vec<String>,
}

/// Service names by namespace.
type Stale = HashMap<String, HashSet<String>>;

impl DesiredState {
    pub fn new(ids: IdAllocator) -> Self {
        DesiredState {
            ids,
            ..Default::default()
        }
    }

    /// The desired routing state of this node for `store`.
    pub fn desired(&mut self, store: &Store, node: &mut NodeContext<'_>) -> Desired {
        let rebuilt = self.take_in(store);
        let mut sandboxes: Vec<&Arc<Sandbox>> = store.sandboxes.iter().collect();
        sandboxes.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
        for sb in &sandboxes {
            if !self.sandboxes.contains_key(&address(sb)) {
                self.generation += 1;
                let r = resolve(&self.index, &mut self.ids, sb, self.generation);
                self.dirty.extend(r.forked.iter().map(|(id, _)| *id));
                self.sandboxes.insert(address(sb), r);
            }
        }
        for (ns, names) in &self.stale {
            for name in names {
                self.dirty.extend(self.claims.ports_of(ns, name));
            }
        }
        let resolved: Vec<&Resolved> = sandboxes
            .iter()
            .map(|sb| &self.sandboxes[&address(sb)])
            .collect();
        let mut b = Builder {
            index: &self.index,
            ids: &mut self.ids,
            claims: &mut self.claims,
            stale: &self.stale,
            dirty: &self.dirty,
            groups: &mut self.groups,
            fork_table: &mut self.fork_table,
            generation: &mut self.generation,
            out: Desired::default(),
            touched: None,
            forked: HashMap::with_capacity(resolved.len() * 2),
        };
        b.build(store, node, &sandboxes, &resolved);
        let out = b.out;
        // Built anew (a first call, or the claims started over): what the previous tables held
        // is not known here, so everything may have changed.
        self.touched = b.touched.filter(|_| self.calls > 0 && !rebuilt);
        self.calls += 1;
        self.stale.clear();
        self.dirty.clear();
        out
    }

    /// What the last call may have changed in the `forks` and `services` tables compared to the
    /// call before; `None`: anything (the first call, or after starting over).
    pub fn touched(&self) -> Option<&Touched> {
        self.touched.as_ref()
    }

    /// Brings the index up to date with `store` and forgets what depends on objects that
    /// changed. Returns whether it started over (a new index, nothing remembered).
    fn take_in(&mut self, store: &Store) -> bool {
        let changes = StoreChanges::between(&self.seen, store);
        let objects = |s: &Store| {
            s.services.len() + s.endpoint_slices.len() + s.pods.len() + s.sandboxes.len()
        };
        // Past a quarter of the objects, building anew is the cheaper way.
        let rebuild = changes.count() * 4 > objects(&self.seen) + objects(store)
            || self.index.update(&changes).is_err();
        if rebuild {
            self.index = Index::new(store);
            self.sandboxes.clear();
            self.claims = ServiceClaims::default();
            self.groups = GroupMemo::default();
        } else {
            self.forget(&changes);
        }
        self.seen = store.clone();
        self.seen.warnings = Vec::new();
        rebuild
    }

    /// Drops the sandboxes and backends `changes` may have made different.
    fn forget(&mut self, changes: &StoreChanges) {
        let mut services: HashSet<(&str, &str)> = HashSet::new();
        let mut namespaces: HashSet<&str> = HashSet::new();
        // Sandboxes whose fork slices changed, by namespace/name.
        let mut sandboxes: HashSet<(&str, &str)> = HashSet::new();
        for s in changes.services.objects() {
            services.insert(ns_name(&s.metadata));
        }
        for s in changes.endpoint_slices.objects() {
            if let Some(owner) = &s.service {
                let names = self.stale.entry(s.namespace.clone()).or_default();
                names.insert(owner.clone());
            }
            if let Some(r) = &s.fork {
                sandboxes.insert((&r.sandbox_namespace, &r.sandbox_name));
            }
        }
        for (ns, name) in &services {
            let names = self.stale.entry(ns.to_string()).or_default();
            names.insert(name.to_string());
        }
        for p in changes.pods.objects() {
            namespaces.insert(ns_name(&p.metadata).0);
        }
        for s in &changes.sandboxes.removed {
            if let Some(r) = self.sandboxes.remove(&address(s)) {
                self.dirty.extend(r.forked.iter().map(|(id, _)| *id));
            }
        }
        let dirty = &mut self.dirty;
        self.sandboxes.retain(|_, r| {
            let (ns, name) = ns_name(&r.sandbox.metadata);
            let touched = r.sandbox.spec.forks.iter().any(|f| {
                let fork_ns = f.namespace_or(ns);
                namespaces.contains(fork_ns) || services.contains(&(fork_ns, f.service.as_str()))
            });
            let keep = !touched && !sandboxes.contains(&(ns, name));
            if !keep {
                dirty.extend(r.forked.iter().map(|(id, _)| *id));
            }
            keep
        });
    }
}

impl GroupMemo {
    /// Makes `members` hold, for each of `groups`, the positions of the `sandboxes` it selects.
    /// Computed again only when a sandbox's labels (or the list) changed, or for a new group.
    fn members_of(&mut self, sandboxes: &[&Arc<Sandbox>], groups: &[&Arc<RouteGroup>]) {
        let same_labels = self.sandboxes.len() == sandboxes.len()
            && self.sandboxes.iter().zip(sandboxes).all(|(was, now)| {
                Arc::ptr_eq(was, now) || was.metadata.labels == now.metadata.labels
            });
        if !same_labels {
            self.members.clear();
            self.sandboxes = sandboxes.iter().map(|sb| Arc::clone(sb)).collect();
        }
        let mut members = HashMap::with_capacity(groups.len());
        let mut index = None;
        for rg in groups {
            let at = Arc::as_ptr(rg) as usize;
            let positions = match self.members.remove(&at) {
                Some((_, p)) => p,
                None => index
                    .get_or_insert_with(|| {
                        LabelIndex::new(sandboxes.iter().map(|sb| sb.metadata.labels.as_ref()))
                    })
                    .matching(&rg.spec.sandbox_selector),
            };
            members.insert(at, (Arc::clone(rg), positions));
        }
        self.members = members;
    }
}

/// Where a sandbox object lives: its identity while an `Arc` of it is held.
fn address(sb: &Arc<Sandbox>) -> usize {
    Arc::as_ptr(sb) as usize
}

/// A sandbox with its forks resolved to service ids and ready endpoints: everything about it
/// that does not depend on other sandboxes or route groups.
#[derive(Debug)]
struct Resolved {
    sandbox: Arc<Sandbox>,
    /// Its own number: a Sandbox resolved again (its pods or services changed) gets a new one.
    generation: u64,
    name: ObjectName,
    /// `namespace/name`.
    owner: String,
    /// Its key, as the tables show it when it holds it.
    key: Arc<KeyInfo>,
    /// Why its routing key cannot be used, if it cannot.
    key_error: Option<String>,
    /// The id of its routing key (0 when the key cannot be used).
    key_id: u32,
    /// Per forked service port: the ready fork endpoints.
    forks: Vec<(u32, ForkEndpoints)>,
    /// Per forked service port: which one it is.
    forked: Vec<(u32, Forked)>,
    /// Every pod some fork of the sandbox selects (ready or not), sorted by namespace/name.
    pods: Vec<Arc<Pod>>,
    warnings: Vec<String>,
}

/// A forked service port.
#[derive(Debug)]
struct Forked {
    name: Arc<ServiceName>,
    port: ServicePort,
    protocol: PortProtocol,
    /// Its ClusterIPs on the port.
    vips: Arc<[SockAddr]>,
}

fn resolve(
    index: &Index,
    ids: &mut IdAllocator,
    sandbox: &Arc<Sandbox>,
    generation: u64,
) -> Resolved {
    let name = ObjectName::new("Sandbox", &sandbox.metadata);
    let mut warnings = Vec::new();
    let mut forks = Vec::new();
    let mut forked = Vec::new();
    let mut pods: BTreeMap<(&str, &str), &Arc<Pod>> = BTreeMap::new();
    for fork in &sandbox.spec.forks {
        let ns = fork.namespace_or(&name.namespace);
        if fork.selector.is_empty() {
            warnings.push(format!(
                "{name}: fork of Service {ns}/{} ignored: empty selector",
                fork.service
            ));
            continue;
        }
        // Fork pods belong to the sandbox (and route by its key) even when the Service they
        // stand in for is missing.
        let mut selected: Vec<&Arc<Pod>> = index
            .pods_in(ns)
            .iter()
            .filter(|p| labels_match(&fork.selector, p.metadata.labels.as_ref()))
            .collect();
        selected.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
        pods.extend(selected.iter().map(|p| (ns_name(&p.metadata), *p)));

        let Some(svc) = index.service(ns, &fork.service) else {
            warnings.push(format!(
                "{name}: fork of Service {ns}/{} has no effect: no such Service",
                fork.service
            ));
            continue;
        };
        let ports = tcp_ports(svc);
        if ports.is_empty() {
            warnings.push(format!(
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
            let service_id = ids.service_id(&service);
            let eps = fork_endpoints(&mut warnings, index, &name, &service, port, &selected);
            forks.push((service_id, eps));
            let vips = match u16::try_from(port.port) {
                Ok(vip_port) => cluster_ips(svc)
                    .into_iter()
                    .map(|ip| map_addr(ip, vip_port))
                    .collect::<Vec<_>>()
                    .into(),
                Err(_) => Arc::from([]),
            };
            forked.push((
                service_id,
                Forked {
                    name: Arc::new(service),
                    port: port.clone(),
                    protocol: PortProtocol::declared(
                        port.app_protocol.as_deref(),
                        port.name.as_deref(),
                    ),
                    vips,
                },
            ));
        }
    }
    let key_error = validate_routing_key(&sandbox.spec.routing_key)
        .err()
        .map(|e| e.to_string());
    let key_id = match key_error {
        None => ids.key_id(&sandbox.spec.routing_key),
        Some(_) => 0,
    };
    Resolved {
        sandbox: sandbox.clone(),
        generation,
        owner: name.ns_name(),
        key: Arc::new(KeyInfo {
            key: sandbox.spec.routing_key.clone(),
            owners: vec![name.ns_name()],
            fallback_to_baseline: sandbox.spec.fallback() == Fallback::Baseline,
        }),
        key_error,
        key_id,
        name,
        forks,
        forked,
        pods: pods.into_values().cloned().collect(),
        warnings,
    }
}

/// Ready endpoints of the selected pods (sorted by name) for one service port, then those of
/// the controller's fork slices that are not among them (fork pods on other nodes).
fn fork_endpoints(
    warnings: &mut Vec<String>,
    index: &Index,
    sandbox: &ObjectName,
    service: &ServiceName,
    port: &ServicePort,
    pods: &[&Arc<Pod>],
) -> ForkEndpoints {
    let mut all = Vec::new();
    for pod in pods.iter().filter(|p| pod_ready(p)) {
        let Some(target) = target_port(pod, port) else {
            let (ns, pod_name) = ns_name(&pod.metadata);
            warnings.push(format!(
                "{sandbox}: Pod {ns}/{pod_name} has no container port for {service}"
            ));
            continue;
        };
        all.extend(pod_ips(pod).into_iter().map(|ip| map_addr(ip, target)));
    }
    let slice_key = ForkSliceRef {
        sandbox_namespace: sandbox.namespace.clone(),
        sandbox_name: sandbox.name.clone(),
        service_namespace: service.namespace.clone(),
        service: service.name.clone(),
    };
    let mut published = Vec::new();
    for slice in index.fork_slices(&slice_key) {
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
        warnings.push(format!(
            "{sandbox}: fork of {service} has {} ready endpoints, only the first {MAX_FORK_ENDPOINTS} are used",
            all.len()
        ));
    }
    eps
}

struct Builder<'s, 'i> {
    index: &'s Index,
    ids: &'i mut IdAllocator,
    claims: &'i mut ServiceClaims,
    stale: &'i Stale,
    dirty: &'i HashSet<u32>,
    groups: &'i mut GroupMemo,
    fork_table: &'i mut ForkTable,
    generation: &'i mut u64,
    out: Desired,
    touched: Option<Touched>,
    /// Every service port some fork names.
    forked: HashMap<u32, &'s Forked>,
}

impl<'s> Builder<'s, '_> {
    fn build(
        &mut self,
        store: &Store,
        node: &mut NodeContext<'_>,
        sandboxes: &[&Arc<Sandbox>],
        resolved: &[&'s Resolved],
    ) {
        self.out.tables.router = node.router;
        for sb in resolved {
            self.out.warnings.extend(sb.warnings.iter().cloned());
            self.forked.extend(sb.forked.iter().map(|(id, f)| (*id, f)));
        }

        let mut groups: Vec<&Arc<RouteGroup>> = store.route_groups.iter().collect();
        groups.sort_by(|a, b| ns_name(&a.metadata).cmp(&ns_name(&b.metadata)));
        let group_names: Vec<ObjectName> = groups
            .iter()
            .map(|rg| ObjectName::new("RouteGroup", &rg.metadata))
            .collect();
        let mut key_owner: HashMap<u32, &ObjectName> = HashMap::with_capacity(resolved.len());
        let mut fork_owners: Vec<Made<'_>> = Vec::with_capacity(resolved.len() + groups.len());
        for sb in resolved {
            let key = &sb.sandbox.spec.routing_key;
            let key_id = match &sb.key_error {
                Some(e) => Err(e.as_str()),
                None => Ok(sb.key_id),
            };
            let Some(key_id) = self.claim_key(&mut key_owner, &sb.name, key, key_id) else {
                continue;
            };
            fork_owners.push(Made {
                key_id,
                generation: sb.generation,
                forks: &sb.forks,
            });
            self.out.tables.keys.insert(key_id, sb.key.clone());
            self.workloads(node, sb, key_id);
        }

        self.groups.members_of(sandboxes, &groups);
        let mut made = HashMap::with_capacity(groups.len());
        let mut group_keys = Vec::with_capacity(groups.len());
        for (rg, name) in groups.into_iter().zip(&group_names) {
            let key = &rg.spec.routing_key;
            let key_error = validate_routing_key(key).err().map(|e| e.to_string());
            let key_id = match &key_error {
                Some(e) => Err(e.as_str()),
                None => Ok(self.ids.key_id(key)),
            };
            let Some(key_id) = self.claim_key(&mut key_owner, name, key, key_id) else {
                continue;
            };
            let at = Arc::as_ptr(rg) as usize;
            let members: Vec<&Resolved> = self.groups.members[&at]
                .1
                .iter()
                .map(|i| resolved[*i])
                .collect();
            let generations: Vec<u64> = members.iter().map(|sb| sb.generation).collect();
            let group = match self.groups.made.remove(&at) {
                Some(g)
                    if Arc::ptr_eq(&g.group, rg)
                        && g.key_id == key_id
                        && g.members == generations =>
                {
                    g
                }
                _ => self.group(rg, name, key_id, &members, generations),
            };
            self.out.warnings.extend(group.warnings.iter().cloned());
            self.out.tables.keys.insert(key_id, group.key.clone());
            made.insert(at, group);
            group_keys.push(at);
        }
        fork_owners.extend(group_keys.iter().map(|at| {
            let g: &GroupMade = &made[at];
            Made {
                key_id: g.key_id,
                generation: g.generation,
                forks: &g.forks,
            }
        }));
        let touched = self.fork_table.update(&fork_owners);
        drop(fork_owners);
        self.groups.made = made;
        self.out.tables.forks = self.fork_table.table.clone();
        let services = self.services();
        self.touched = services.map(|services| Touched {
            fork_keys: touched,
            services,
        });
    }

    /// What route group `rg` adds to the tables with these members: the union of their forks
    /// (the first member forking a service port wins it) under its key.
    fn group(
        &mut self,
        rg: &Arc<RouteGroup>,
        name: &ObjectName,
        key_id: u32,
        members: &[&Resolved],
        generations: Vec<u64>,
    ) -> GroupMade {
        let mut warnings = Vec::new();
        if members.is_empty() {
            warnings.push(format!("{name}: sandboxSelector matches no Sandbox"));
        }
        let mut union: BTreeMap<u32, (&ObjectName, ForkEndpoints)> = BTreeMap::new();
        for sb in members {
            for (service_id, eps) in &sb.forks {
                match union.get(service_id) {
                    Some((first, _)) => {
                        let service = &self.forked[service_id].name;
                        warnings.push(format!(
                            "{name}: {first} and {} both fork {service}; using {first}",
                            sb.name
                        ));
                    }
                    None => {
                        union.insert(*service_id, (&sb.name, *eps));
                    }
                }
            }
        }
        let mut owners = vec![name.ns_name()];
        owners.extend(members.iter().map(|sb| sb.owner.clone()));
        *self.generation += 1;
        GroupMade {
            group: rg.clone(),
            generation: *self.generation,
            key_id,
            members: generations,
            forks: union
                .into_iter()
                .map(|(service_id, (_, eps))| (service_id, eps))
                .collect(),
            key: Arc::new(KeyInfo {
                key: rg.spec.routing_key.clone(),
                owners,
                fallback_to_baseline: !members.is_empty()
                    && members
                        .iter()
                        .all(|sb| sb.sandbox.spec.fallback() == Fallback::Baseline),
            }),
            warnings,
        }
    }
    fn warn(&mut self, warning: String) {
        self.out.warnings.push(warning);
    }

    /// The key id of `key` for `owner`, unless the key is invalid (`key_error`) or already
    /// taken.
    fn claim_key<'k>(
        &mut self,
        taken: &mut HashMap<u32, &'k ObjectName>,
        owner: &'k ObjectName,
        key: &str,
        key_id: Result<u32, &str>,
    ) -> Option<u32> {
        let key_id = match key_id {
            Ok(id) => id,
            Err(e) => {
                self.warn(format!("{owner}: ignored: {e}"));
                return None;
            }
        };
        if let Some(first) = taken.get(&key_id) {
            self.warn(format!(
                "{owner}: ignored: routing key {key:?} is already used by {first}"
            ));
            return None;
        }
        taken.insert(key_id, owner);
        Some(key_id)
    }

    /// Workloads: the sandbox's pods on this node whose cgroup is known.
    fn workloads(&mut self, node: &mut NodeContext<'_>, sb: &Resolved, key_id: u32) {
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

    /// `services`, `service_names` and `service_protocols` for every service port that some key
    /// forks (see [`ServiceClaims`] for who owns an address claimed twice). Only the ports
    /// that came or went, or whose sandboxes or Service objects changed, are looked at again.
    fn services(&mut self) -> Option<Vec<SockAddr>> {
        let mut used: Vec<u32> = self.out.tables.forks.keys().map(|k| k.service_id).collect();
        used.sort_unstable();
        used.dedup();
        let mut changes: Vec<(u32, Option<Port>)> = Vec::new();
        for id in self.claims.ports().map(|(id, _)| id) {
            if used.binary_search(&id).is_err() {
                changes.push((id, None));
            }
        }
        for id in used {
            let known = self.claims.port(id);
            if known.is_some() && !self.dirty.contains(&id) {
                continue;
            }
            let f = self.forked[&id];
            let stale = self
                .stale
                .get(&f.name.namespace)
                .is_some_and(|names| names.contains(&f.name.name));
            let backends = match known {
                Some(p) if !stale => p.backends.clone(),
                _ => backends(self.index, &f.name, &f.port),
            };
            let port = Port {
                name: f.name.clone(),
                protocol: f.protocol,
                vips: f.vips.clone(),
                backends,
            };
            changes.push((id, Some(port)));
        }
        let touched = self.claims.update(changes);
        self.out.warnings.extend(self.claims.conflicts());
        self.out.tables.services = self.claims.services.clone();
        self.out.tables.service_names = self.claims.names.clone();
        self.out.tables.service_protocols = self.claims.protocols.clone();
        touched
    }
}

/// Baseline backend addresses of a service port, from its EndpointSlices.
fn backends(index: &Index, name: &ServiceName, port: &ServicePort) -> Arc<[SockAddr]> {
    let want = port.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for slice in index.service_slices(&name.namespace, &name.name) {
        if let Some(number) = slice.tcp_port(want) {
            out.extend(slice.endpoints.iter().map(|e| map_addr(e.ip, number)));
        }
    }
    out.sort();
    out.dedup();
    out.into()
}

/// Ready, not terminating addresses of an EndpointSlice on its port named `port_name` (TCP).
fn slice_endpoints(slice: &Slice, port_name: &str) -> Vec<SockAddr> {
    let Some(number) = slice.tcp_port(port_name) else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.serving)
        .map(|e| map_addr(e.ip, number))
        .collect()
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use redirect_common::ForkKey;

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
        map_addr(ip.parse().unwrap(), port)
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
            self.store.endpoint_slices.push(slice_of(json!({
                "metadata": {"name": name, "namespace": NS,
                             "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": "IPv4",
                "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
                "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
            })));
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

    /// An EndpointSlice from its JSON, as the store keeps it.
    fn slice_of(v: serde_json::Value) -> Arc<Slice> {
        let s: EndpointSlice = serde_json::from_value(v).unwrap();
        Arc::new(Slice::from(s))
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
    fn each_forked_port_carries_what_its_service_declares() {
        let ports = json!([
            {"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "kubernetes.io/h2c"},
            {"name": "grpc-api", "port": 9000, "targetPort": 9000},
            {"name": "db", "port": 5432, "targetPort": 5432},
            {"name": "http-tls", "port": 443, "targetPort": 8443, "appProtocol": "https"},
        ]);
        let d = Scene::new()
            .service("checkout", &[VIP], ports)
            .pod("checkout-fx", "checkout-fx", "10.244.1.9")
            .sandbox("fx", "feature-x", &[("checkout", "checkout-fx")])
            .desired();
        let declared: BTreeMap<String, PortProtocol> = d
            .tables
            .service_names
            .iter()
            .map(|(id, n)| (n.port.clone(), d.tables.service_protocols[id]))
            .collect();
        assert_eq!(
            declared,
            BTreeMap::from([
                ("web".to_string(), PortProtocol::Http),
                ("grpc-api".to_string(), PortProtocol::Http),
                ("db".to_string(), PortProtocol::Detect),
                ("http-tls".to_string(), PortProtocol::Detect),
            ])
        );
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
        assert_eq!(*d.tables.service_names[&id], checkout_http());
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
                .contains_key(&map_addr("fd00:200::10".parse().unwrap(), 80))
        );
        assert!(d.tables.services.contains_key(&v4(VIP, 80)));
        let (_, eps) = only_fork(&d);
        assert_eq!(
            eps,
            [
                v4("10.244.1.9", 8080),
                map_addr("fd00:244::9".parse().unwrap(), 8080)
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
            scene.store.endpoint_slices.push(slice_of(slice));
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

    /// A tiny deterministic generator (xorshift64*), so the equivalence test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len() as u64) as usize]
        }
    }

    const NAMESPACES: [&str; 2] = ["a", "b"];

    /// One object of `kind` called `name` in `ns`, drawn at random from a small world where
    /// names, addresses, selectors and keys collide often.
    fn random_object(rng: &mut Rng, kind: usize, ns: &str, name: &str) -> serde_json::Value {
        let ip = |rng: &mut Rng| format!("10.1.0.{}", rng.below(12));
        let service = |rng: &mut Rng| format!("s{}", rng.below(5));
        match kind {
            0 => {
                let mut ports = vec![json!({"name": "http", "port": 80,
                    "targetPort": if rng.below(2) == 0 { json!(8080) } else { json!("http") }})];
                if rng.below(3) == 0 {
                    ports.push(json!({"name": "grpc", "port": 9000, "targetPort": 9000}));
                }
                // What the port declares changes with the Service alone.
                if rng.below(3) == 0 {
                    ports[0]["appProtocol"] = json!(rng.pick(&["http", "https", "example.com/x"]));
                }
                json!({"metadata": {"name": name, "namespace": ns},
                       "spec": {"clusterIP": format!("10.96.0.{}", rng.below(8)), "ports": ports}})
            }
            1 => {
                let endpoints: Vec<_> = (0..rng.below(3))
                    .map(|_| {
                        json!({"addresses": [ip(rng)],
                                    "conditions": {"ready": rng.below(4) != 0}})
                    })
                    .collect();
                let labels = if rng.below(3) == 0 {
                    json!({"endpointslice.kubernetes.io/managed-by": "controller.redirect.dev",
                           "redirect.dev/sandbox": format!("sb{}", rng.below(4)),
                           "redirect.dev/sandbox-namespace": rng.pick(&NAMESPACES),
                           "redirect.dev/fork-of": service(rng)})
                } else {
                    json!({SERVICE_NAME_LABEL: service(rng)})
                };
                json!({"metadata": {"name": name, "namespace": ns, "labels": labels},
                       "addressType": "IPv4",
                       "ports": [{"name": rng.pick(&["http", "grpc"]), "port": 8080, "protocol": "TCP"}],
                       "endpoints": endpoints})
            }
            2 => {
                let mut p = pod(
                    name,
                    &format!("app{}", rng.below(3)),
                    &[&ip(rng)],
                    rng.below(4) != 0,
                );
                p["metadata"]["namespace"] = json!(ns);
                p["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
                if rng.below(4) == 0 {
                    p["spec"]["nodeName"] = json!("node-b");
                }
                p
            }
            3 => {
                let forks: Vec<_> = (0..1 + rng.below(2))
                    .map(|_| {
                        let mut f = json!({"service": service(rng),
                                           "selector": {"app": format!("app{}", rng.below(3))}});
                        if rng.below(4) == 0 {
                            f["namespace"] = json!(rng.pick(&NAMESPACES));
                        }
                        f
                    })
                    .collect();
                json!({"apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
                       "metadata": {"name": name, "namespace": ns,
                                    "labels": {"team": rng.pick(&["x", "y"])}},
                       "spec": {"routingKey": rng.pick(&["k1", "k2", "k3", "k4", "bad key"]),
                                "forks": forks,
                                "fallback": rng.pick(&["Baseline", "Unavailable"])}})
            }
            _ => json!({"apiVersion": "redirect.dev/v1alpha1", "kind": "RouteGroup",
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"routingKey": rng.pick(&["g1", "k1"]),
                                 "sandboxSelector": {"team": rng.pick(&["x", "y"])}}}),
        }
    }

    type Key = (String, String);

    /// Objects made from JSON, kept while their JSON stays the same.
    type Made<T> = BTreeMap<Key, (serde_json::Value, Arc<T>)>;

    /// The objects of each kind by `(namespace, name)`, made into stores that share the
    /// objects that did not change, as a source with caches does.
    #[derive(Default)]
    struct World {
        objects: [BTreeMap<Key, serde_json::Value>; 5],
        services: Made<Service>,
        slices: Made<Slice>,
        pods: Made<Pod>,
        sandboxes: Made<Sandbox>,
        route_groups: Made<RouteGroup>,
    }

    impl World {
        /// Creates, replaces or deletes one object of a random kind.
        fn mutate(&mut self, rng: &mut Rng) {
            let kind = rng.below(5) as usize;
            let ns = rng.pick(&NAMESPACES).to_string();
            let name = format!("{}{}", ["s", "e", "p", "sb", "rg"][kind], rng.below(5));
            let key = (ns.clone(), name.clone());
            if rng.below(5) == 0 {
                self.objects[kind].remove(&key);
            } else {
                let v = random_object(rng, kind, &ns, &name);
                self.objects[kind].insert(key, v);
            }
        }

        /// A store of the objects; those that did not change since the last one are the same
        /// `Arc`s, unless `fresh`.
        fn store(&mut self, fresh: bool) -> Store {
            fn list<T>(
                objects: &BTreeMap<Key, serde_json::Value>,
                made: &mut Made<T>,
                fresh: bool,
                make: impl Fn(serde_json::Value) -> T,
            ) -> Vec<Arc<T>> {
                if fresh {
                    made.clear();
                }
                made.retain(|k, _| objects.contains_key(k));
                objects
                    .iter()
                    .map(|(k, v)| match made.get(k) {
                        Some((held, o)) if held == v => o.clone(),
                        _ => {
                            let o = Arc::new(make(v.clone()));
                            made.insert(k.clone(), (v.clone(), o.clone()));
                            o
                        }
                    })
                    .collect()
            }
            fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
                serde_json::from_value(v).unwrap()
            }
            Store {
                services: list(&self.objects[0], &mut self.services, fresh, parse),
                endpoint_slices: list(&self.objects[1], &mut self.slices, fresh, |v| {
                    Slice::from(parse::<EndpointSlice>(v))
                }),
                pods: list(&self.objects[2], &mut self.pods, fresh, parse),
                sandboxes: list(&self.objects[3], &mut self.sandboxes, fresh, parse),
                route_groups: list(&self.objects[4], &mut self.route_groups, fresh, parse),
                warnings: Vec::new(),
            }
        }
    }

    #[test]
    fn the_remembering_state_computes_what_a_fresh_desired_computes_after_every_change() {
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut world = World::default();
            for _ in 0..25 {
                world.mutate(&mut rng);
            }
            let mut cgroups: HashMap<String, u64> = HashMap::new();
            for ns in NAMESPACES {
                for i in 0..5 {
                    cgroups.insert(format!("uid-{ns}-p{i}"), 1000 + i);
                }
            }
            let mut state = DesiredState::default();
            let mut fresh_ids = IdAllocator::new();
            let mut before = Tables::default();
            for step in 0..41 {
                let fresh = if step < 40 {
                    let n = 1 + rng.below(3);
                    for _ in 0..n {
                        world.mutate(&mut rng);
                    }
                    // Now and then every object is new, as after a relist or a manifest reload.
                    rng.below(10) == 0
                } else {
                    // Last, a reload without any Sandbox: every fork goes at once.
                    world.objects[3].clear();
                    true
                };
                let store = world.store(fresh);
                let mut node = |cgroups: &mut HashMap<String, u64>| -> Desired {
                    let mut ctx = NodeContext {
                        node_name: Some(NODE.into()),
                        router: RouterConfig::default(),
                        cgroups,
                    };
                    state.desired(&store, &mut ctx)
                };
                let remembered = node(&mut cgroups);
                let mut ctx = NodeContext {
                    node_name: Some(NODE.into()),
                    router: RouterConfig::default(),
                    cgroups: &mut cgroups,
                };
                let computed = desired(&store, &mut ctx, &mut fresh_ids);
                assert_eq!(
                    remembered, computed,
                    "seed {seed}, step {step}: the state differs from a fresh desired()"
                );
                // What it says it touched is all that changed.
                if let Some(touched) = state.touched() {
                    assert_eq!(
                        crate::sync::diff_touched(&before, &remembered.tables, touched),
                        crate::sync::diff(&before, &remembered.tables),
                        "seed {seed}, step {step}: a change outside what was touched"
                    );
                }
                before = remembered.tables;
            }
        }
    }
}
