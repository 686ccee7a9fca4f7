//! The boundary to the kernel maps. The aya implementation lives in `loader`; `MemoryMaps` here
//! stands in for it in tests.

use redirect_common::{
    ForkEndpoints, ForkKey, MAP_FORKS, MAP_SERVICES, MAP_WORKLOADS, RouterConfig, ServiceValue,
    SockAddr, WorkloadValue,
};

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
    /// Every label [`MapError::metric_label`] gives.
    pub const METRIC_LABELS: [&'static str; 2] = ["map_full", "map_error"];

    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MapError::Full { .. } => Self::METRIC_LABELS[0],
            MapError::Other { .. } => Self::METRIC_LABELS[1],
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

/// Capacity limits of [`MemoryMaps`] (None: unbounded), to test full maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapLimits {
    pub services: Option<u32>,
    pub forks: Option<u32>,
    pub workloads: Option<u32>,
}

/// In-memory maps: the stand-in for the kernel maps in tests and dry runs. Puts of new keys
/// into a map at its limit fail with [`MapError::Full`], as the kernel's `E2BIG` does;
/// deleting a missing key succeeds.
#[derive(Clone, Debug, Default)]
pub struct MemoryMaps {
    tables: Tables,
    limits: MapLimits,
}

impl MemoryMaps {
    /// Empty and unbounded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty, with capacity limits.
    pub fn with_limits(limits: MapLimits) -> Self {
        MemoryMaps {
            limits,
            ..Default::default()
        }
    }

    /// What the maps hold.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }
}

/// Inserts unless `map` is at its limit and `key` is new.
fn put_bounded<K: Ord, V>(
    map: &mut std::collections::BTreeMap<K, V>,
    limit: Option<u32>,
    name: &'static str,
    key: K,
    value: V,
) -> Result<(), MapError> {
    if let Some(max) = limit
        && !map.contains_key(&key)
        && map.len() >= max as usize
    {
        return Err(MapError::Full { map: name, max });
    }
    map.insert(key, value);
    Ok(())
}

impl RedirectMaps for MemoryMaps {
    fn read(&self) -> Result<Tables, MapError> {
        Ok(Tables {
            services: self.tables.services.clone(),
            forks: self.tables.forks.clone(),
            workloads: self.tables.workloads.clone(),
            router: self.tables.router,
            ..Default::default()
        })
    }

    fn put_service(&mut self, key: SockAddr, value: ServiceValue) -> Result<(), MapError> {
        put_bounded(
            &mut self.tables.services,
            self.limits.services,
            MAP_SERVICES,
            key,
            value,
        )
    }

    fn del_service(&mut self, key: &SockAddr) -> Result<(), MapError> {
        self.tables.services.remove(key);
        Ok(())
    }

    fn put_fork(&mut self, key: ForkKey, value: ForkEndpoints) -> Result<(), MapError> {
        put_bounded(
            &mut self.tables.forks,
            self.limits.forks,
            MAP_FORKS,
            key,
            value,
        )
    }

    fn del_fork(&mut self, key: &ForkKey) -> Result<(), MapError> {
        self.tables.forks.remove(key);
        Ok(())
    }

    fn put_workload(&mut self, cgroup_id: u64, value: WorkloadValue) -> Result<(), MapError> {
        put_bounded(
            &mut self.tables.workloads,
            self.limits.workloads,
            MAP_WORKLOADS,
            cgroup_id,
            value,
        )
    }

    fn del_workload(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        self.tables.workloads.remove(&cgroup_id);
        Ok(())
    }

    fn set_router(&mut self, value: RouterConfig) -> Result<(), MapError> {
        self.tables.router = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_maps_refuse_new_keys_at_their_limit_but_accept_updates() {
        let mut maps = MemoryMaps::with_limits(MapLimits {
            workloads: Some(1),
            ..Default::default()
        });
        let wl = |key_id| WorkloadValue { key_id, _pad: 0 };
        maps.put_workload(1, wl(1)).unwrap();
        maps.put_workload(1, wl(2)).unwrap();
        let err = maps.put_workload(2, wl(1)).unwrap_err();
        assert!(matches!(
            err,
            MapError::Full {
                map: MAP_WORKLOADS,
                max: 1
            }
        ));
        maps.del_workload(1).unwrap();
        maps.del_workload(1).unwrap();
        maps.put_workload(2, wl(1)).unwrap();
        assert_eq!(maps.tables().workloads.len(), 1);
    }
}
