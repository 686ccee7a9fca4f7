//! The desired routing state of one node.

use std::collections::BTreeMap;
use std::sync::Arc;

use redirect_common::{
    ForkEndpoints, ForkKey, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};

use super::PortProtocol;

/// A service port by name, for humans and for the router's lookups.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
    /// The port's name, or its number when unnamed.
    pub port: String,
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// A routing key and where it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key as it appears in requests.
    pub key: String,
    /// `namespace/name` of the sandboxes (or route group) that carry it.
    pub owners: Vec<String>,
    /// Whether requests for a fork with no ready endpoint fall back to baseline (else 503).
    pub fallback_to_baseline: bool,
}

/// Everything the node's kernel maps and router need, keyed exactly as the maps are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// `services_v1`: forked service ports by VIP:port and by baseline backend ip:port.
    pub services: BTreeMap<SockAddr, ServiceValue>,
    /// `forks_v1`: (routing key, service port) → ready fork endpoints.
    pub forks: BTreeMap<ForkKey, ForkEndpoints>,
    /// `workloads_v1`: fork pod cgroup id → its sandbox's routing key.
    pub workloads: BTreeMap<u64, WorkloadValue>,
    /// `router_v1`: router addresses and mark.
    pub router: RouterConfig,
    /// Names behind the ids, for the router, explain and logs (not in the kernel).
    pub service_names: BTreeMap<u32, Arc<ServiceName>>,
    /// What each forked service port declares about its protocol (same ids as
    /// `service_names`; router only: the kernel redirects every protocol alike).
    pub service_protocols: BTreeMap<u32, PortProtocol>,
    pub keys: BTreeMap<u32, Arc<KeyInfo>>,
}

#[cfg(test)]
impl Tables {
    /// One forked service port (a VIP, a fork with an endpoint of each family, a workload, its
    /// name, protocol and key) and a router: for tests of what carries whole tables.
    pub fn sample() -> Tables {
        let mut t = Tables::default();
        let vip = SockAddr::v4(u32::from_ne_bytes([10, 200, 2, 10]), 80);
        t.services.insert(
            vip,
            ServiceValue {
                service_id: 7,
                flags: 0,
            },
        );
        t.service_names.insert(
            7,
            Arc::new(ServiceName {
                namespace: "default".into(),
                name: "checkout".into(),
                port: "http".into(),
            }),
        );
        t.service_protocols.insert(7, PortProtocol::Http);
        t.keys.insert(
            3,
            Arc::new(KeyInfo {
                key: "feature-x".into(),
                owners: vec!["default/feature-x".into()],
                fallback_to_baseline: true,
            }),
        );
        let ep6 = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 5], 8080);
        let ep4 = SockAddr::v4(u32::from_ne_bytes([10, 200, 1, 4]), 8080);
        t.forks.insert(
            ForkKey {
                key_id: 3,
                service_id: 7,
            },
            ForkEndpoints::from_endpoints(&[ep6, ep4]).0,
        );
        t.workloads.insert(99, WorkloadValue { key_id: 3, _pad: 0 });
        t.router.v4 = SockAddr::v4(u32::from_ne_bytes([10, 200, 0, 1]), 15001);
        t.router.mark = 0x5244_0000;
        t
    }
}
