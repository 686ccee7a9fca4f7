//! One sync: `desired(&Store) -> diff(current, desired) -> apply(RedirectMaps)`.

use std::sync::Arc;

use redirect_common::RouterConfig;

use crate::{
    cgroup::CgroupResolver,
    routing::Tables,
    store::Store,
    sync::{
        MapError, Op, RedirectMaps,
        desired::{DesiredState, NodeContext},
        diff::{apply, diff, diff_touched},
    },
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub applied: usize,
    pub failed: Vec<(Op, MapError)>,
    pub warnings: Vec<String>,
}

/// Keeps the maps in line with the last good store. Owns the desired state (with its id
/// allocator, so ids stay stable, and what it remembers between syncs).
pub struct Syncer<M: RedirectMaps, C: CgroupResolver> {
    pub maps: M,
    cgroups: C,
    state: DesiredState,
    node_name: Option<String>,
    router: RouterConfig,
    /// What the maps hold, as far as this syncer knows (read from the kernel at start). The
    /// same tables as `last` after a sync without failure.
    current: Arc<Tables>,
    /// The desired tables of the last sync, names included (the router reads these).
    pub last: Arc<Tables>,
}

impl<M: RedirectMaps, C: CgroupResolver> Syncer<M, C> {
    /// Starts from what the maps hold now (pins of an earlier agent included), so the first sync
    /// reconciles them instead of starting over.
    pub fn new(
        maps: M,
        cgroups: C,
        node_name: Option<String>,
        router: RouterConfig,
    ) -> Result<Self, MapError> {
        let current = Arc::new(maps.read()?);
        Ok(Syncer {
            maps,
            cgroups,
            state: DesiredState::default(),
            node_name,
            router,
            last: current.clone(),
            current,
        })
    }

    pub fn sync(&mut self, store: &Store) -> SyncOutcome {
        let mut node = NodeContext {
            node_name: self.node_name.clone(),
            cgroups: &mut self.cgroups,
            router: self.router,
        };
        let want = self.state.desired(store, &mut node);
        // The maps hold the last desired tables (nothing failed since): only what the state
        // says it touched can differ.
        let ops = match self.state.touched() {
            Some(touched) if Arc::ptr_eq(&self.current, &self.last) => {
                diff_touched(&self.current, &want.tables, touched)
            }
            _ => diff(&self.current, &want.tables),
        };
        let report = apply(ops, &mut self.maps);
        let failed = report.failed;
        let tables = Arc::new(want.tables);
        // Re-read on failure so the next diff starts from the truth.
        self.current = if failed.is_empty() {
            tables.clone()
        } else {
            Arc::new(self.maps.read().unwrap_or_else(|_| (*tables).clone()))
        };
        self.last = tables;
        super::allocator::trim_freed_memory();
        SyncOutcome {
            applied: report.applied,
            failed,
            warnings: want.warnings,
        }
    }
}
