//! The JSON documents of the admin API, shared by the agent (which serves them) and
//! `redirectctl` (which reads them). Field names are a stable schema (`docs/debugging.md`):
//! fields may be added, never renamed or removed, without a new `schema` value.

use std::net::SocketAddr;
use std::sync::Arc;

use redirect_common::{
    ForkEndpoints, ForkKey, RouterConfig, ServiceValue, SockAddr, WorkloadValue,
};
use serde::{Deserialize, Serialize};

use crate::routing::{KeyInfo, PortProtocol, ServiceName, Tables};

/// `schema` of [`TablesDoc`].
pub const TABLES_SCHEMA: &str = "redirect.tables/v1";
/// `schema` of [`AgentStatus`].
pub const STATUS_SCHEMA: &str = "redirect.agent-status/v1";

/// `GET /tables`: the agent's current `Tables` (what it last synced), names included.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TablesDoc {
    pub schema: String,
    /// Manifest generation the tables were computed from (0: none yet).
    pub generation: u64,
    pub services: Vec<ServiceEntry>,
    pub service_names: Vec<ServiceNameEntry>,
    pub keys: Vec<KeyEntry>,
    pub forks: Vec<ForkEntry>,
    pub workloads: Vec<WorkloadEntry>,
    pub router: RouterEntry,
    /// Pods the agent knows (uid → name), to name cgroups.
    pub pods: Vec<PodEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub address: SocketAddr,
    pub service_id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNameEntry {
    pub service_id: u32,
    pub namespace: String,
    pub name: String,
    pub port: String,
    /// What the port declares: `http` (served as HTTP, never opaque) or `detect` (the first
    /// bytes decide). Absent in documents of agents that did not report it: `detect`.
    #[serde(default)]
    pub protocol: PortProtocol,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key_id: u32,
    pub key: String,
    pub owners: Vec<String>,
    pub fallback_to_baseline: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkEntry {
    pub key_id: u32,
    pub service_id: u32,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    pub cgroup_id: u64,
    pub key_id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEntry {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    pub mark: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEntry {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl TablesDoc {
    pub fn new(t: &Tables, generation: u64, pods: Vec<PodEntry>) -> Self {
        let addr = |s: &redirect_common::SockAddr| SocketAddr::from(s);
        TablesDoc {
            schema: TABLES_SCHEMA.into(),
            generation,
            services: t
                .services
                .iter()
                .map(|(a, v)| ServiceEntry {
                    address: addr(a),
                    service_id: v.service_id,
                })
                .collect(),
            service_names: t
                .service_names
                .iter()
                .map(|(id, n)| ServiceNameEntry {
                    service_id: *id,
                    namespace: n.namespace.clone(),
                    name: n.name.clone(),
                    port: n.port.clone(),
                    protocol: t.service_protocols.get(id).copied().unwrap_or_default(),
                })
                .collect(),
            keys: t
                .keys
                .iter()
                .map(|(id, k)| KeyEntry {
                    key_id: *id,
                    key: k.key.clone(),
                    owners: k.owners.clone(),
                    fallback_to_baseline: k.fallback_to_baseline,
                })
                .collect(),
            forks: t
                .forks
                .iter()
                .map(|(k, f)| ForkEntry {
                    key_id: k.key_id,
                    service_id: k.service_id,
                    endpoints: f.endpoints[..(f.count as usize).min(f.endpoints.len())]
                        .iter()
                        .map(addr)
                        .collect(),
                })
                .collect(),
            workloads: t
                .workloads
                .iter()
                .map(|(cg, w)| WorkloadEntry {
                    cgroup_id: *cg,
                    key_id: w.key_id,
                })
                .collect(),
            router: RouterEntry {
                v4: (!t.router.v4.is_unset()).then(|| addr(&t.router.v4)),
                v6: (!t.router.v6.is_unset()).then(|| addr(&t.router.v6)),
                mark: t.router.mark,
            },
            pods,
        }
    }

    /// Back to `Tables` (the kernel part and the names).
    pub fn to_tables(&self) -> Tables {
        let mut t = Tables::default();
        for s in &self.services {
            t.services.insert(
                SockAddr::from(s.address),
                ServiceValue {
                    service_id: s.service_id,
                    flags: 0,
                },
            );
        }
        for n in &self.service_names {
            t.service_names.insert(
                n.service_id,
                Arc::new(ServiceName {
                    namespace: n.namespace.clone(),
                    name: n.name.clone(),
                    port: n.port.clone(),
                }),
            );
            t.service_protocols.insert(n.service_id, n.protocol);
        }
        for k in &self.keys {
            t.keys.insert(
                k.key_id,
                Arc::new(KeyInfo {
                    key: k.key.clone(),
                    owners: k.owners.clone(),
                    fallback_to_baseline: k.fallback_to_baseline,
                }),
            );
        }
        for f in &self.forks {
            let eps: Vec<_> = f.endpoints.iter().map(|a| SockAddr::from(*a)).collect();
            t.forks.insert(
                ForkKey {
                    key_id: f.key_id,
                    service_id: f.service_id,
                },
                ForkEndpoints::from_endpoints(&eps).0,
            );
        }
        for w in &self.workloads {
            t.workloads.insert(
                w.cgroup_id,
                WorkloadValue {
                    key_id: w.key_id,
                    _pad: 0,
                },
            );
        }
        t.router = RouterConfig {
            v4: self.router.v4.map(SockAddr::from).unwrap_or_default(),
            v6: self.router.v6.map(SockAddr::from).unwrap_or_default(),
            mark: self.router.mark,
            _pad: 0,
        };
        t
    }
}

/// `GET /status`: the agent process and its last sync.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub schema: String,
    pub version: String,
    pub pid: u32,
    pub started_at_unix_ms: u64,
    /// `/readyz`: the maps were synced (without failed operations) at least once.
    pub ready: bool,
    pub generation: u64,
    pub last_sync: Option<SyncInfo>,
    pub syncs_total: u64,
    pub sync_errors_total: u64,
    pub manifest_errors_total: u64,
    pub log_filter: String,
    pub pin_dir: String,
    pub cgroup_root: String,
    /// Router connections by outcome label (empty before the router started).
    pub router_connections: std::collections::BTreeMap<String, u64>,
    /// Router requests by outcome label.
    pub router_requests: std::collections::BTreeMap<String, u64>,
    /// Where the routing state comes from and how its watches are doing (absent from agents
    /// that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::source::kube::health::SourceStatus>,
    /// Where the routing state in force comes from: `synced` (this agent's source),
    /// `persisted` (the last good state an earlier agent applied, until the first sync), or
    /// `none` (nothing yet). Empty from agents that predate it.
    #[serde(default)]
    pub state_from: String,
    /// Slower ways an older kernel makes the router go (empty on a current kernel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_fallbacks: Vec<String>,
    /// The program that records router-bound connections (`redirect_tcp_connect` or
    /// `redirect_sock_ops`). Empty from agents that predate it.
    #[serde(default)]
    pub record_hook: String,
}

pub const STATE_NONE: &str = "none";
pub const STATE_PERSISTED: &str = "persisted";
pub const STATE_SYNCED: &str = "synced";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncInfo {
    pub at_unix_ms: u64,
    pub duration_ms: f64,
    pub generation: u64,
    pub applied: usize,
    pub failed: usize,
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn tables_survive_the_json_round_trip() {
        let t = Tables::sample();
        let doc = TablesDoc::new(&t, 4, vec![]);
        let json = serde_json::to_string(&doc).unwrap();
        assert!(json.contains("\"10.200.2.10:80\""), "{json}");
        let back: TablesDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_tables(), t);
        assert_eq!(back.generation, 4);
    }
}
