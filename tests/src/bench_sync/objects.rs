//! The cluster of the sync benchmark: a compact [`Plan`] of what exists where (a few hundred
//! kilobytes at the default size), and the Kubernetes objects it stands for, built one at a
//! time as JSON so that neither the generator nor the benchmark holds the cluster in memory.
//!
//! The shape, at `--services S --endpoints E --sandboxes B --route-groups R --node-pods P`:
//!
//! - **Namespaces** `team-NN`, one per 200 services.
//! - **Services** `svc-NNNNN` (ClusterIP `10.96.0.0/16`), round-robin over the namespaces.
//!   Every fourth has a second port (`grpc 9090`); every third names its target port
//!   (`targetPort: http`, resolved from the pods' container ports).
//! - **Endpoints**: every service gets one (while they last), the rest of the E go to services
//!   picked with a skew (a few services have hundreds of endpoints, most one to five), in
//!   EndpointSlices of at most 100 endpoints as kube-controller-manager writes them (labels,
//!   `targetRef`, `nodeName`, zone, conditions). Pod IPs are `10.64.0.0/10`.
//! - **Sandboxes** `sb-NNNN` (routing key = name), each in a namespace of its own services,
//!   forking 1 to 3 of them (popular services more often); a fork selects
//!   `app=<service>, sandbox=<sandbox>`, served by one fork pod (two for one fork in ten),
//!   IPs `10.128.0.0/10`. Every other sandbox carries a `group` label.
//! - **RouteGroups** `rg-NNN`, each selecting one `group` (so about B / 2R sandboxes).
//! - **This node** ([`NODE`]) runs P pods: it is one of the nodes that run sandboxes, so half
//!   of them are fork pods (every k-th fork pod of the cluster, about P / 2), the rest baseline
//!   pods (endpoints of the slices whose `nodeName` is this node). The other pods run on other
//!   nodes (`node-NNNN`, about P pods each).
//! - **Pods** in the API: those of this node and every fork pod (the controller needs them;
//!   the agent watches only its node's). Baseline pods of other nodes are not created: the
//!   agent never sees them (its Pod watch is for its node), only their EndpointSlices.
//! - **Fork slices**: what the controller publishes for every fork
//!   (`redirect_agent::forkslice::fork_slices`), fork pods of every node.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Service};
use redirect_agent::crd::Sandbox;
use serde_json::{Value, json};

/// The node the benchmark's agent runs for.
pub const NODE: &str = "node-bench";
/// Services per namespace.
const SERVICES_PER_NAMESPACE: usize = 200;
/// Most endpoints in one EndpointSlice (kube-controller-manager's default).
pub const MAX_PER_SLICE: usize = 100;
/// The container port of `http` (every service's first port's target).
pub const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
/// How many pods a node of the cluster runs.
const PODS_PER_NODE: usize = 110;

/// How big the cluster is.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub services: usize,
    pub endpoints: usize,
    pub sandboxes: usize,
    pub route_groups: usize,
    pub node_pods: usize,
}

impl Scale {
    /// The flags that give this scale (for the generator process).
    pub fn args(&self) -> Vec<String> {
        [
            ("--services", self.services),
            ("--endpoints", self.endpoints),
            ("--sandboxes", self.sandboxes),
            ("--route-groups", self.route_groups),
            ("--node-pods", self.node_pods),
        ]
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect()
    }
}

/// One service.
#[derive(Clone, Debug)]
pub struct ServicePlan {
    pub namespace: u32,
    pub two_ports: bool,
    pub named_target: bool,
    /// Global index of its first endpoint; the others follow.
    pub first_endpoint: u32,
    pub endpoints: u32,
}

/// One fork of a sandbox.
#[derive(Clone, Debug)]
pub struct ForkPlan {
    pub service: u32,
    /// Global index of its first fork pod; `pods` follow.
    pub first_pod: u32,
    pub pods: u32,
}

/// One sandbox.
#[derive(Clone, Debug)]
pub struct SandboxPlan {
    pub namespace: u32,
    /// The `group` label (route group membership).
    pub group: Option<u32>,
    pub forks: Vec<ForkPlan>,
}

/// What exists where; everything else is derived from it.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scale: Scale,
    pub namespaces: u32,
    pub services: Vec<ServicePlan>,
    pub sandboxes: Vec<SandboxPlan>,
    pub fork_pods: u32,
    /// Every `local_fork_stride`-th fork pod runs on this node.
    pub local_fork_stride: u32,
    /// Endpoints (global indexes) whose pods run on this node.
    pub local_endpoints: BTreeSet<u32>,
    /// Nodes of the cluster besides this one.
    pub other_nodes: u32,
}

/// splitmix64: small, fast, and the same sequence everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The smallest number ≥ `n` that shares no factor with `m` (a stride that visits all of
/// `0..m`).
fn coprime_near(n: usize, m: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    (n.max(1)..).find(|c| gcd(*c, m.max(1)) == 1).unwrap_or(1)
}

impl Plan {
    pub fn new(scale: Scale) -> Plan {
        let mut rng = Rng::new(0x5eed_2025);
        let s = scale.services.max(1);
        let namespaces = s.div_ceil(SERVICES_PER_NAMESPACE) as u32;

        // Endpoint counts: one each while they last, the rest skewed (u^2.5 puts most on a
        // few ranks), ranks spread over the services by a coprime stride.
        let mut counts = vec![0u32; s];
        for c in counts.iter_mut().take(scale.endpoints) {
            *c = 1;
        }
        let stride = coprime_near(7919, s);
        for _ in s..scale.endpoints.max(s) {
            let rank = ((rng.unit().powf(2.5)) * s as f64) as usize % s;
            counts[(rank * stride) % s] += 1;
        }
        let mut next = 0u32;
        let services: Vec<ServicePlan> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = ServicePlan {
                    namespace: (i % namespaces as usize) as u32,
                    two_ports: i % 4 == 0,
                    named_target: i % 3 == 0,
                    first_endpoint: next,
                    endpoints: n,
                };
                next += n;
                p
            })
            .collect();

        // Sandboxes fork 1-3 services of their namespace, popular (low) ones more often.
        let per_ns = s.div_ceil(namespaces as usize);
        let mut fork_pods = 0u32;
        let mut sandboxes = Vec::with_capacity(scale.sandboxes);
        for b in 0..scale.sandboxes {
            let namespace = (b % namespaces as usize) as u32;
            let in_ns: Vec<u32> = (0..per_ns)
                .map(|m| namespace + m as u32 * namespaces)
                .filter(|i| (*i as usize) < s)
                .collect();
            let want = (1 + rng.below(3)).min(in_ns.len());
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < want {
                let m = (rng.unit().powf(1.5) * in_ns.len() as f64) as usize % in_ns.len();
                if !chosen.contains(&in_ns[m]) {
                    chosen.push(in_ns[m]);
                }
            }
            let forks = chosen
                .into_iter()
                .map(|service| {
                    let pods = if rng.below(10) == 0 { 2 } else { 1 };
                    let f = ForkPlan {
                        service,
                        first_pod: fork_pods,
                        pods,
                    };
                    fork_pods += pods;
                    f
                })
                .collect();
            let group = (scale.route_groups > 0 && b % 2 == 0)
                .then(|| ((b / 2) % scale.route_groups) as u32);
            sandboxes.push(SandboxPlan {
                namespace,
                group,
                forks,
            });
        }

        // This node: half fork pods (every k-th), the rest baseline endpoints, evenly spread.
        let local_forks_wanted = (scale.node_pods / 2).max(1);
        let local_fork_stride = (fork_pods as usize).div_ceil(local_forks_wanted).max(1) as u32;
        let local_forks = (fork_pods as usize).div_ceil(local_fork_stride as usize);
        let local_baseline = scale
            .node_pods
            .saturating_sub(local_forks)
            .min(scale.endpoints);
        let local_endpoints = (0..local_baseline)
            .map(|k| (k * scale.endpoints / local_baseline.max(1)) as u32)
            .collect();
        let other_nodes = (scale.endpoints + fork_pods as usize)
            .div_ceil(PODS_PER_NODE)
            .max(1) as u32;
        Plan {
            scale,
            namespaces,
            services,
            sandboxes,
            fork_pods,
            local_fork_stride,
            local_endpoints,
            other_nodes,
        }
    }

    pub fn forks(&self) -> usize {
        self.sandboxes.iter().map(|s| s.forks.len()).sum()
    }

    pub fn local_fork_pods(&self) -> usize {
        (self.fork_pods as usize).div_ceil(self.local_fork_stride as usize)
    }

    pub fn baseline_slices(&self) -> usize {
        self.services
            .iter()
            .map(|s| (s.endpoints as usize).div_ceil(MAX_PER_SLICE).max(1))
            .sum()
    }

    /// Services some sandbox forks, sorted.
    pub fn forked_services(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .sandboxes
            .iter()
            .flat_map(|s| s.forks.iter().map(|f| f.service))
            .collect();
        set.into_iter().collect()
    }

    fn fork_pod_local(&self, f: u32) -> bool {
        f.is_multiple_of(self.local_fork_stride)
    }

    fn other_node(&self, seed: u32) -> String {
        format!(
            "node-{:04}",
            (seed as u64 * 2_654_435_761 % self.other_nodes as u64)
        )
    }
}

pub fn namespace(ns: u32) -> String {
    format!("team-{ns:02}")
}

pub fn service_name(i: u32) -> String {
    format!("svc-{i:05}")
}

pub fn sandbox_name(b: u32) -> String {
    format!("sb-{b:04}")
}

fn route_group_name(r: u32) -> String {
    format!("rg-{r:03}")
}

fn group_label(g: u32) -> String {
    format!("g-{g:03}")
}

/// A short deterministic hex tag (the random suffixes of generated names).
fn tag(a: u64, b: u64) -> String {
    let mut r = Rng::new(a.wrapping_mul(0x1000_0001).wrapping_add(b));
    format!("{:05x}", r.next_u64() & 0xf_ffff)
}

/// An IPv4 address `base + n`.
pub fn ip(base: [u8; 4], n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + n)
}

fn endpoint_ip(j: u32) -> Ipv4Addr {
    ip([10, 64, 0, 0], j)
}

fn fork_pod_ip(f: u32) -> Ipv4Addr {
    ip([10, 128, 0, 0], f)
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    ip([10, 96, 0, 10], i)
}

fn zone(seed: u32) -> String {
    format!("zone-{}", ["a", "b", "c"][seed as usize % 3])
}

pub fn namespace_object(ns: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace(ns), "labels": {"kubernetes.io/metadata.name": namespace(ns)}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// Service `i`, as `kubectl apply` leaves it (the last-applied annotation included).
pub fn service(plan: &Plan, i: u32) -> Value {
    let sp = &plan.services[i as usize];
    let name = service_name(i);
    let ns = namespace(sp.namespace);
    let target = if sp.named_target {
        json!("http")
    } else {
        json!(HTTP_PORT)
    };
    let mut ports =
        vec![json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": target})];
    if sp.two_ports {
        ports.push(json!({"name": "grpc", "port": GRPC_PORT, "protocol": "TCP", "targetPort": GRPC_PORT, "appProtocol": "grpc"}));
    }
    let ip = cluster_ip(i).to_string();
    let applied = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"selector": {"app": name}, "ports": ports},
    });
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {"app": name, "app.kubernetes.io/part-of": ns, "app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied.to_string()},
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": name}, "ports": ports,
        },
        "status": {"loadBalancer": {}},
    })
}

/// The name of the `k`-th EndpointSlice of service `i`.
pub fn slice_name(i: u32, k: usize) -> String {
    format!("{}-{}", service_name(i), tag(u64::from(i), k as u64))
}

fn slice_ports(sp: &ServicePlan) -> Value {
    let mut ports = vec![json!({"name": "http", "port": HTTP_PORT, "protocol": "TCP"})];
    if sp.two_ports {
        ports.push(
            json!({"name": "grpc", "port": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"}),
        );
    }
    Value::Array(ports)
}

/// The name of the pod behind endpoint `j` of service `i`.
fn baseline_pod_name(i: u32, j: u32) -> String {
    format!(
        "{}-{}-{}",
        service_name(i),
        tag(u64::from(i), 1 << 40),
        tag(u64::from(j), 7)
    )
}

/// Endpoint `j` of service `i`, as the EndpointSlice controller writes it.
pub fn endpoint(plan: &Plan, i: u32, j: u32) -> Value {
    let node = if plan.local_endpoints.contains(&j) {
        NODE.to_string()
    } else {
        plan.other_node(j)
    };
    endpoint_at(
        &endpoint_ip(j).to_string(),
        &baseline_pod_name(i, j),
        &namespace(plan.services[i as usize].namespace),
        &node,
        j,
    )
}

/// An endpoint of a baseline pod `pod` at `ip` on `node`.
pub fn endpoint_at(ip: &str, pod: &str, ns: &str, node: &str, seed: u32) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": node,
        "zone": zone(seed),
        "targetRef": {"kind": "Pod", "name": pod, "namespace": ns,
                      "uid": format!("{}-0000-4000-8000-{:012x}", tag(u64::from(seed), 3), seed)},
    })
}

/// The endpoints of the `k`-th slice of service `i`.
pub fn slice_endpoints(plan: &Plan, i: u32, k: usize) -> Vec<Value> {
    let sp = &plan.services[i as usize];
    let start = k * MAX_PER_SLICE;
    let end = (start + MAX_PER_SLICE).min(sp.endpoints as usize);
    (start..end)
        .map(|e| endpoint(plan, i, sp.first_endpoint + e as u32))
        .collect()
}

/// An EndpointSlice of service `i` named `name` holding `endpoints`.
pub fn slice_with(plan: &Plan, i: u32, name: &str, endpoints: Vec<Value>) -> Value {
    let sp = &plan.services[i as usize];
    let svc = service_name(i);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": namespace(sp.namespace),
            "generateName": format!("{svc}-"),
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": svc,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-01-01T00:00:00Z"},
        },
        "addressType": "IPv4",
        "ports": slice_ports(sp),
        "endpoints": endpoints,
    })
}

/// The EndpointSlices of service `i` (one, empty, for a service without endpoints).
pub fn slices(plan: &Plan, i: u32) -> Vec<Value> {
    let sp = &plan.services[i as usize];
    let n = (sp.endpoints as usize).div_ceil(MAX_PER_SLICE).max(1);
    (0..n)
        .map(|k| slice_with(plan, i, &slice_name(i, k), slice_endpoints(plan, i, k)))
        .collect()
}

fn pod_json(name: &str, ns: &str, labels: Value, node: &str, ip: Ipv4Addr, image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"),
                                  "uid": "00000000-0000-4000-8000-000000000001", "controller": true}],
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always",
            "containers": [{
                "name": "app", "image": image,
                "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                          {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "NAMESPACE", "value": ns}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
        },
        "status": {
            "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": "172.18.0.2",
            "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"},
                           {"type": "ContainersReady", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "app", "image": image, "imageID": format!("{image}@sha256:0"),
                                   "ready": true, "restartCount": 0, "started": true}],
        },
    })
}

/// The baseline pods of this node (behind the local endpoints).
pub fn local_baseline_pods(plan: &Plan) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, sp) in plan.services.iter().enumerate() {
        let i = i as u32;
        let range = sp.first_endpoint..sp.first_endpoint + sp.endpoints;
        for &j in plan.local_endpoints.range(range) {
            let svc = service_name(i);
            out.push(pod_json(
                &baseline_pod_name(i, j),
                &namespace(sp.namespace),
                json!({"app": svc, "pod-template-hash": tag(u64::from(i), 1 << 40)}),
                NODE,
                endpoint_ip(j),
                &format!("registry.example/{svc}:1.0.0"),
            ));
        }
    }
    out
}

/// The selector of fork `fork` of sandbox `b`.
pub fn fork_selector(b: u32, service: u32) -> Value {
    json!({"app": service_name(service), "sandbox": sandbox_name(b)})
}

/// The fork pods of sandbox `b` (on every node).
pub fn fork_pods(plan: &Plan, b: u32) -> Vec<Value> {
    let sb = &plan.sandboxes[b as usize];
    let mut out = Vec::new();
    for fork in &sb.forks {
        for k in 0..fork.pods {
            let f = fork.first_pod + k;
            let node = if plan.fork_pod_local(f) {
                NODE.to_string()
            } else {
                plan.other_node(f + 1_000_000)
            };
            let svc = service_name(fork.service);
            out.push(pod_json(
                &format!("{svc}-{}-{k}", sandbox_name(b)),
                &namespace(sb.namespace),
                fork_selector(b, fork.service),
                &node,
                fork_pod_ip(f),
                &format!("registry.example/{svc}:{}", sandbox_name(b)),
            ));
        }
    }
    out
}

/// The fork list of sandbox `b`'s spec.
pub fn fork_specs(plan: &Plan, b: u32) -> Vec<Value> {
    plan.sandboxes[b as usize]
        .forks
        .iter()
        .map(|f| json!({"service": service_name(f.service), "selector": fork_selector(b, f.service)}))
        .collect()
}

/// Sandbox `b`.
pub fn sandbox(plan: &Plan, b: u32) -> Value {
    let sb = &plan.sandboxes[b as usize];
    let name = sandbox_name(b);
    let mut labels = serde_json::Map::new();
    labels.insert("owner".into(), json!(format!("dev-{}", b % 97)));
    if let Some(g) = sb.group {
        labels.insert("group".into(), json!(group_label(g)));
    }
    json!({
        "apiVersion": "redirect.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name, "namespace": namespace(sb.namespace), "labels": labels},
        "spec": {"routingKey": name, "forks": fork_specs(plan, b)},
    })
}

/// The controller's fork slices of sandbox `b`, built by the controller's own code.
pub fn fork_slices(plan: &Plan, b: u32) -> Result<Vec<Value>> {
    let sandbox: Sandbox =
        serde_json::from_value(sandbox(plan, b)).context("the sandbox does not fit the CRD")?;
    let pods: Vec<Pod> = fork_pods(plan, b)
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()
        .context("a fork pod does not fit the Pod type")?;
    let mut out = Vec::new();
    for (fork, fp) in sandbox
        .spec
        .forks
        .iter()
        .zip(&plan.sandboxes[b as usize].forks)
    {
        let service: Service = serde_json::from_value(service(plan, fp.service))?;
        let ns = namespace(plan.sandboxes[b as usize].namespace);
        let selected = redirect_agent::forkslice::selected_pods(fork, &ns, &pods);
        for slice in redirect_agent::forkslice::fork_slices(&sandbox, fork, &service, &selected) {
            out.push(serde_json::to_value(slice)?);
        }
    }
    Ok(out)
}

/// RouteGroup `r`.
pub fn route_group(plan: &Plan, r: u32) -> Value {
    json!({
        "apiVersion": "redirect.dev/v1alpha1", "kind": "RouteGroup",
        "metadata": {"name": route_group_name(r), "namespace": namespace(r % plan.namespaces)},
        "spec": {"routingKey": route_group_name(r), "sandboxSelector": {"group": group_label(r)}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::new(Scale {
            services: 10_000,
            endpoints: 50_000,
            sandboxes: 1_000,
            route_groups: 100,
            node_pods: 110,
        })
    }

    #[test]
    fn the_default_plan_has_the_asked_sizes() {
        let p = plan();
        assert_eq!(p.services.len(), 10_000);
        assert_eq!(
            p.services
                .iter()
                .map(|s| s.endpoints as usize)
                .sum::<usize>(),
            50_000
        );
        assert!(p.services.iter().all(|s| s.endpoints >= 1));
        let fork_pods_here = p.local_fork_pods();
        assert_eq!(fork_pods_here + p.local_endpoints.len(), 110);
        assert!(p.forks() > 1_500 && p.forks() < 2_500, "{}", p.forks());
    }
}
