//! The boundary to the kernel maps. The aya implementation lives in `loader`; `MemoryMaps` here
//! stands in for it in tests.

use redirect_common::{ForkEndpoints, ForkKey, RouterConfig, ServiceValue, SockAddr, WorkloadValue};

use crate::routing::Tables;

/// A map operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map has no room for another entry.
    #[error("map {map} is full ({max} entries)")]
    Full { map: &'static str, max: u32 },
    /// Any other failure of the map syscall.
    #[error("map {map}: {reason}")]
    Other { map: &'static str, reason: String },
}

impl MapError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MapError::Full { .. } => "map_full",
            MapError::Other { .. } => "map_error",
        }
    }
}

/// The kernel maps as the sync sees them: the kernel-facing parts of `Tables`.
pub trait RedirectMaps {
    /// Reads what the maps hold now (names in `Tables` stay empty).
    fn read(&self) -> Result<Tables, MapError>;
    fn put_service(&mut self, key: SockAddr, value: ServiceValue) -> Result<(), MapError>;
    fn del_service(&mut self, key: &SockAddr) -> Result<(), MapError>;
    fn put_fork(&mut self, key: ForkKey, value: ForkEndpoints) -> Result<(), MapError>;
    fn del_fork(&mut self, key: &ForkKey) -> Result<(), MapError>;
    fn put_workload(&mut self, cgroup_id: u64, value: WorkloadValue) -> Result<(), MapError>;
    fn del_workload(&mut self, cgroup_id: u64) -> Result<(), MapError>;
    fn set_router(&mut self, value: RouterConfig) -> Result<(), MapError>;
}
