//! The agent's main loop: every snapshot of the source becomes a new generation that is synced
//! to the maps and published to the router and the admin endpoint; a resync timer re-applies
//! the last good snapshot (pods whose cgroup appeared late, maps changed behind our back).

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration, time::Instant};

use crate::{
    admin::{AdminState, api::PodEntry},
    cgroup::CgroupResolver,
    loader,
    router::{RouterError, Shared},
    routing::RouteView,
    source::{Source, Update},
    store::{Store, ns_name},
    sync::RedirectMaps,
};

use super::{
    Syncer,
    last_good::{self, Restore, Saved, StateStore},
};

/// Why the loop ended other than by the shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("the {0} source stopped")]
    SourceStopped(&'static str),
    #[error(transparent)]
    Router(#[from] RouterError),
}

/// Binds, registers and starts the router with its first route view (set before the router
/// accepts anything); returns its shared state.
pub type StartRouter = Box<dyn FnOnce(Arc<RouteView>) -> Result<Arc<Shared>, RouterError> + Send>;

/// The node router, as the loop sees it.
pub enum RouterHandle {
    /// No router (tests of the loop alone).
    None,
    /// Started with the persisted last good state when it matches the pinned maps, else
    /// after the first sync that applied without failure: either way it knows every key, so
    /// it never takes a connection it would route by a partial table. Until then baseline
    /// callers go straight to their destination (fail open) and, during an upgrade, the
    /// previous agent's router keeps serving.
    Pending(StartRouter),
    Running(Arc<Shared>),
}

impl RouterHandle {
    pub fn running(&self) -> Option<&Arc<Shared>> {
        match self {
            RouterHandle::Running(r) => Some(r),
            _ => None,
        }
    }
}

/// What the loop drives besides the maps.
pub struct LoopContext {
    pub admin: Arc<AdminState>,
    /// The router, whose route view is swapped after every change.
    pub router: RouterHandle,
    /// Where the pins are (stale trace switch-off).
    pub pin_dir: PathBuf,
    /// How often the last good snapshot is re-applied.
    pub resync: Duration,
    /// Where the last good state is kept across restarts (`None`: not kept).
    pub state: Option<Box<dyn StateStore>>,
}

/// Runs until `shutdown` completes (`Ok`) or the source stops (`Err`). The last good state
/// stays in force in between: a rejected update changes nothing.
pub async fn run<M, C, S>(
    syncer: &mut Syncer<M, C>,
    source: &mut S,
    ctx: &mut LoopContext,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LoopError>
where
    M: RedirectMaps,
    C: CgroupResolver,
    S: Source,
{
    let mut resync = tokio::time::interval(ctx.resync.max(Duration::from_millis(100)));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_good: Option<Store> = None;
    let mut generation = 0u64;
    let mut persisted = Persisted::default();
    if let Some(saved) = restore(syncer, ctx) {
        // The router serves the state an earlier agent applied until the first sync replaces
        // it: a keyed request is routed as before the restart even while the source cannot
        // give a good snapshot yet.
        syncer.last = Arc::new(saved.tables.clone());
        start_router(syncer, ctx)?;
        ctx.admin.restored(&syncer.last);
        if let Some(router) = ctx.router.running() {
            router.set_client_pods(saved.pods.iter().cloned().collect());
        }
        persisted.saved = Some(saved);
    }
    tokio::pin!(shutdown);
    loop {
        // In this order: shutdown, then the source, then the resync timer. A resync that is
        // due whenever a long sync ends must not keep a new snapshot waiting.
        tokio::select! {
            biased;
            _ = &mut shutdown => return Ok(()),
            update = source.next() => match update {
                None => return Err(LoopError::SourceStopped(source.name())),
                Some(Update::Snapshot(store)) => {
                    generation += 1;
                    let ok = sync(syncer, &store, generation, true, &ctx.admin).1;
                    if ok {
                        start_router(syncer, ctx)?;
                        persist(syncer, &store, ctx, &mut persisted);
                    }
                    publish(syncer, ctx);
                    publish_pods(&store, ctx);
                    last_good = Some(store);
                }
                Some(Update::Rejected(errors)) => {
                    ctx.admin.sync.record_manifest_rejected(errors.len());
                    for error in &errors {
                        tracing::error!(error = %error.message, label = error.label, "{} rejected", source.name());
                    }
                    tracing::error!(
                        errors = errors.len(),
                        "{} rejected: the last good state stays in force",
                        source.name()
                    );
                }
            },
            _ = resync.tick() => {
                if let Some(store) = &last_good {
                    let (changed, ok) = sync(syncer, store, generation, false, &ctx.admin);
                    if ok {
                        persist(syncer, store, ctx, &mut persisted);
                    }
                    if ok && matches!(ctx.router, RouterHandle::Pending(_)) {
                        start_router(syncer, ctx)?;
                        publish(syncer, ctx);
                        publish_pods(store, ctx);
                    } else if changed {
                        publish(syncer, ctx);
                    }
                }
                // A tracer killed before it could switch tracing off leaves it on: switch it off.
                if let Ok(Some(stale)) = loader::inspect::clear_stale_trace(&ctx.pin_dir) {
                    ctx.admin.sync.record_stale_trace_cleared();
                    tracing::info!(tracer_pid = stale.pid, "switched off a trace whose tracer is gone");
                }
            }
        }
    }
}

/// The last good state an earlier agent persisted, when it matches the pinned maps. Anything
/// else is logged and leaves the router to wait for the first sync.
fn restore<M: RedirectMaps, C: CgroupResolver>(
    syncer: &Syncer<M, C>,
    ctx: &LoopContext,
) -> Option<Saved> {
    let store = ctx.state.as_deref()?;
    let pinned = match syncer.maps.read() {
        Ok(t) => t,
        Err(error) => {
            tracing::warn!(%error, "persisted state not used: the pinned maps cannot be read");
            return None;
        }
    };
    match last_good::restore(store, &pinned) {
        Restore::Use(saved) => {
            tracing::info!(
                state = %store.describe(),
                keys = saved.tables.keys.len(),
                forks = saved.tables.forks.len(),
                "routing with the persisted last good state until the first sync"
            );
            Some(saved)
        }
        Restore::Missing => {
            tracing::info!(
                state = %store.describe(),
                "no persisted state (first start): the router starts after the first sync"
            );
            None
        }
        Restore::Ignored(reason) => {
            tracing::warn!(
                %reason,
                "persisted state ignored: the router starts after the first sync"
            );
            None
        }
    }
}

/// What the state store holds, so that unchanged syncs do not rewrite it.
#[derive(Default)]
struct Persisted {
    saved: Option<Saved>,
    /// The last write failed (warned once; the next success says so).
    failing: bool,
}

/// Keeps the state store equal to the last sync that applied without failure. A failed write
/// is a warning: routing goes on, only a restart would then wait for its first sync.
fn persist<M: RedirectMaps, C: CgroupResolver>(
    syncer: &Syncer<M, C>,
    store: &Store,
    ctx: &LoopContext,
    persisted: &mut Persisted,
) {
    let Some(state) = ctx.state.as_deref() else {
        return;
    };
    let mut pods: Vec<_> = client_pods(store).into_iter().collect();
    pods.sort();
    let saved = Saved {
        tables: (*syncer.last).clone(),
        pods,
    };
    if persisted.saved.as_ref() == Some(&saved) {
        return;
    }
    match state.save(&last_good::encode(&saved)) {
        Ok(()) => {
            if std::mem::take(&mut persisted.failing) {
                tracing::info!("the last good state is persisted again");
            }
            persisted.saved = Some(saved);
        }
        // Retried after every good sync and resync: warn once, not every resync.
        Err(error) if !persisted.failing => {
            persisted.failing = true;
            tracing::warn!(
                %error,
                "cannot persist the last good state: a restart will wait for its first sync"
            );
        }
        Err(error) => tracing::debug!(%error, "cannot persist the last good state"),
    }
}

/// Starts a pending router with the syncer's current tables.
fn start_router<M: RedirectMaps, C: CgroupResolver>(
    syncer: &Syncer<M, C>,
    ctx: &mut LoopContext,
) -> Result<(), RouterError> {
    if matches!(ctx.router, RouterHandle::Pending(_)) {
        let RouterHandle::Pending(start) = std::mem::replace(&mut ctx.router, RouterHandle::None)
        else {
            unreachable!("checked above");
        };
        let shared = start(Arc::new(RouteView::new(syncer.last.clone())))?;
        ctx.admin.set_router(shared.clone());
        ctx.router = RouterHandle::Running(shared);
    }
    Ok(())
}

/// Hands the syncer's current tables to the router.
fn publish<M: RedirectMaps, C: CgroupResolver>(syncer: &Syncer<M, C>, ctx: &LoopContext) {
    if let Some(router) = ctx.router.running() {
        router
            .view
            .store(Arc::new(RouteView::new(syncer.last.clone())));
    }
}

/// Hands the node's pods (address → UID) to the router, which opens upstream connections in
/// the client pod's network namespace.
fn publish_pods(store: &Store, ctx: &LoopContext) {
    if let Some(router) = ctx.router.running() {
        router.set_client_pods(client_pods(store));
    }
}

/// The node's pods by address.
fn client_pods(store: &Store) -> std::collections::HashMap<std::net::IpAddr, String> {
    store
        .pods
        .iter()
        .filter_map(|p| Some((crate::k8s::pod_ips(p), p.metadata.uid.clone()?)))
        .flat_map(|(ips, uid)| ips.into_iter().map(move |ip| (ip, uid.clone())))
        .collect()
}

/// Applies `store`; logs `synced` for every new generation, and for resyncs that changed
/// something. Returns whether anything changed, and whether every map operation succeeded.
pub fn sync<M, C>(
    syncer: &mut Syncer<M, C>,
    store: &Store,
    generation: u64,
    new_generation: bool,
    admin: &AdminState,
) -> (bool, bool)
where
    M: RedirectMaps,
    C: CgroupResolver,
{
    let start = Instant::now();
    let out = syncer.sync(store);
    admin.synced(
        &syncer.last,
        pods(store),
        generation,
        start.elapsed(),
        out.applied,
        &out.failed,
    );
    for w in &out.warnings {
        tracing::warn!(warning = %w, "sync");
    }
    for (op, error) in &out.failed {
        tracing::error!(?op, %error, "map update failed");
    }
    if new_generation || out.applied > 0 || !out.failed.is_empty() {
        tracing::info!(
            generation,
            applied = out.applied,
            failed = out.failed.len(),
            services = syncer.last.services.len(),
            forks = syncer.last.forks.len(),
            workloads = syncer.last.workloads.len(),
            "synced"
        );
    }
    (out.applied > 0, out.failed.is_empty())
}

/// The pods of the store by uid, so `redirectctl` can name cgroups.
fn pods(store: &Store) -> Vec<PodEntry> {
    store
        .pods
        .iter()
        .filter_map(|p| {
            let (namespace, name) = ns_name(&p.metadata);
            Some(PodEntry {
                uid: p.metadata.uid.clone()?,
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use redirect_common::RouterConfig;

    use super::*;
    use crate::source::{Rejection, load_texts};
    use crate::sync::MemoryMaps;

    /// A source that yields scripted updates, then stays silent (or stops when `stop`).
    struct Scripted {
        updates: VecDeque<Update>,
        stop: bool,
    }

    impl Source for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        async fn next(&mut self) -> Option<Update> {
            match self.updates.pop_front() {
                Some(u) => Some(u),
                None if self.stop => None,
                None => std::future::pending().await,
            }
        }
    }

    fn store_with_sandbox() -> Store {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: redirect.dev/v1alpha1
kind: Sandbox
metadata: {name: fx, namespace: default}
spec:
  routingKey: fx
  forks: [{service: checkout, selector: {app: checkout-fx}}]
"#;
        load_texts(&[("scene.yaml".into(), yaml.into())]).expect("the scene loads")
    }

    fn ctx() -> LoopContext {
        LoopContext {
            admin: Arc::new(AdminState::new(
                "/nonexistent".into(),
                "/nonexistent".into(),
                None,
                "info",
            )),
            router: RouterHandle::None,
            pin_dir: "/nonexistent".into(),
            resync: Duration::from_secs(3600),
            state: None,
        }
    }

    fn syncer() -> Syncer<MemoryMaps, HashMap<String, u64>> {
        Syncer::new(
            MemoryMaps::default(),
            HashMap::new(),
            None,
            RouterConfig::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_rejected_update_keeps_the_last_good_state_and_counts_the_errors() {
        let mut syncer = syncer();
        let mut ctx = ctx();
        let mut source = Scripted {
            updates: VecDeque::from([
                Update::Snapshot(store_with_sandbox()),
                Update::Rejected(vec![Rejection {
                    message: "zz.yaml:3: bad".into(),
                    label: "invalid_object",
                }]),
            ]),
            stop: true,
        };
        let end = run(&mut syncer, &mut source, &mut ctx, std::future::pending()).await;
        assert!(matches!(end, Err(LoopError::SourceStopped("scripted"))));
        assert_eq!(syncer.last.keys.len(), 1, "the sandbox key stays");
        assert_eq!(
            syncer.maps.read().unwrap().forks.len(),
            1,
            "the fork is in the maps"
        );
        assert_eq!(ctx.admin.sync.manifest_errors(), 1);
        assert_eq!(ctx.admin.status().generation, 1);
        assert!(ctx.admin.is_ready());
    }

    #[tokio::test]
    async fn shutdown_ends_the_loop_with_the_maps_as_last_synced() {
        let mut syncer = syncer();
        let mut ctx = ctx();
        let mut source = Scripted {
            updates: VecDeque::from([Update::Snapshot(store_with_sandbox())]),
            stop: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
        };
        let handle = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
        };
        let (end, ()) = tokio::join!(run(&mut syncer, &mut source, &mut ctx, stop), handle);
        assert!(end.is_ok());
        assert_eq!(
            syncer.maps.read().unwrap().forks.len(),
            1,
            "the fork is in the maps"
        );
    }
    /// Runs the loop on `maps` with `state` kept in memory, over the scripted `updates`.
    async fn run_once(
        maps: MemoryMaps,
        state: &last_good::MemoryState,
        updates: Vec<Update>,
    ) -> (Syncer<MemoryMaps, HashMap<String, u64>>, LoopContext) {
        let mut syncer = Syncer::new(maps, HashMap::new(), None, RouterConfig::default()).unwrap();
        let mut ctx = ctx();
        ctx.state = Some(Box::new(state.clone()));
        let mut source = Scripted {
            updates: updates.into(),
            stop: true,
        };
        let end = run(&mut syncer, &mut source, &mut ctx, std::future::pending()).await;
        assert!(matches!(end, Err(LoopError::SourceStopped("scripted"))));
        (syncer, ctx)
    }

    /// An agent that synced `store_with_sandbox()` (and persisted it in `state`), then stopped.
    async fn synced_with_sandbox(
        state: &last_good::MemoryState,
    ) -> Syncer<MemoryMaps, HashMap<String, u64>> {
        let updates = vec![Update::Snapshot(store_with_sandbox())];
        run_once(MemoryMaps::default(), state, updates).await.0
    }

    fn rejected() -> Update {
        Update::Rejected(vec![Rejection {
            message: "zz.yaml:3: bad".into(),
            label: "invalid_object",
        }])
    }

    #[tokio::test]
    async fn a_restarted_agent_routes_with_the_persisted_state_while_its_source_is_rejected() {
        let state = last_good::MemoryState::default();
        let first = synced_with_sandbox(&state).await;
        assert!(state.load().unwrap().is_some(), "persisted after the sync");
        let (second, ctx) = run_once(first.maps.clone(), &state, vec![rejected()]).await;
        let keys: Vec<_> = second.last.keys.values().map(|k| k.key.clone()).collect();
        assert_eq!(keys, ["fx"], "the router's view has the key");
        assert_eq!(second.last.service_names.len(), 1);
        assert_eq!(ctx.admin.status().state_from, "persisted");
        assert!(!ctx.admin.is_ready(), "ready only after a sync of its own");
    }

    #[tokio::test]
    async fn a_persisted_state_the_maps_no_longer_match_is_not_used() {
        let state = last_good::MemoryState::default();
        let first = synced_with_sandbox(&state).await;
        // A later writer removed the fork from the maps without updating the state.
        let mut maps = first.maps.clone();
        let fork = *maps.read().unwrap().forks.keys().next().unwrap();
        maps.del_fork(&fork).unwrap();
        let (second, ctx) = run_once(maps, &state, vec![rejected()]).await;
        assert!(second.last.keys.is_empty(), "neither is trusted");
        assert_eq!(ctx.admin.status().state_from, "none");
    }

    #[tokio::test]
    async fn a_first_start_without_persisted_state_syncs_and_then_persists() {
        let state = last_good::MemoryState::default();
        let (_, ctx) = run_once(MemoryMaps::default(), &state, vec![rejected()]).await;
        assert_eq!(ctx.admin.status().state_from, "none");
        assert!(
            state.load().unwrap().is_none(),
            "nothing good to persist yet"
        );
        let (synced, ctx) = run_once(
            MemoryMaps::default(),
            &state,
            vec![Update::Snapshot(store_with_sandbox())],
        )
        .await;
        assert_eq!(ctx.admin.status().state_from, "synced");
        let saved = last_good::decode(&state.load().unwrap().unwrap(), "memory").unwrap();
        assert_eq!(saved.tables, *synced.last);
    }
}
