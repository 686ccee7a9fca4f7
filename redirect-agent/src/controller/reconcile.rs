//! One reconcile pass: snapshot → [`plan`] → writes, in this order:
//!
//! 1. expired sandboxes are deleted (with a `uid` precondition, so a newer sandbox of the same
//!    name is never deleted), and an `Expired` event says so;
//! 2. fork slices are created, replaced, deleted ([`slice_ops`]);
//! 3. statuses that changed are written (JSON merge patch on the status subresource) and the
//!    events of their transitions published.
//!
//! Each write is checked against the leadership first: the moment this replica stops leading,
//! the pass stops ([`ControllerError::NotLeader`]). A failed write is logged with the object and
//! the reason, counted, and does not stop the others; the loop retries the pass with backoff.
//!
//! The caches lag behind our own writes by a watch event. So that a pass running in that window
//! neither writes the same status again nor repeats its events, [`Memory`] remembers what was
//! written, against the `resourceVersion` it was written over, until the caches show a newer
//! version; and the sandboxes deleted until they leave the caches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions,
};
use kube::{Api, Client};

use super::events::{Events, Notice};
use super::lease::Leadership;
use super::slices::{SliceOp, slice_ops};
use super::status::status_patch;
use super::validate::{
    BadObject, HasConditions, ObjectPlan, ROUTE_GROUP_STATUS_FIELDS, SANDBOX_STATUS_FIELDS,
    Snapshot, plan, reason,
};
use super::{ControllerError, Metrics, WriteAction};
use crate::crd::{RouteGroup, RouteGroupStatus, Sandbox, SandboxStatus};
use crate::store::ns_name;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "redirect-controller";

/// What a pass writes with.
pub struct Writer {
    client: Client,
    events: Events,
    leadership: Leadership,
    metrics: Arc<Metrics>,
}

impl Writer {
    pub fn new(
        client: Client,
        identity: &str,
        leadership: Leadership,
        metrics: Arc<Metrics>,
    ) -> Writer {
        Writer {
            events: Events::new(client.clone(), identity),
            client,
            leadership,
            metrics,
        }
    }

    /// Ok while this replica leads.
    fn check(&self) -> Result<(), ControllerError> {
        if self.leadership.is_leader() {
            Ok(())
        } else {
            Err(ControllerError::NotLeader)
        }
    }

    fn custom<K: kube::Resource<DynamicType = ()>>(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &ApiResource::erase::<K>(&()),
        )
    }

    fn failed(&self, error: ControllerError, report: &mut PassReport) {
        self.metrics.error(error.metric_label());
        tracing::warn!(%error, "write failed; retried with backoff");
        report.errors.push(error);
    }

    async fn publish(&self, notice: &Notice, regarding: &ObjectReference) {
        let object = format!(
            "{} {}/{}",
            regarding.kind.as_deref().unwrap_or(""),
            regarding.namespace.as_deref().unwrap_or(""),
            regarding.name.as_deref().unwrap_or("")
        );
        if notice.warning {
            tracing::warn!(object, reason = %notice.reason, "{}", notice.note);
        } else {
            tracing::info!(object, reason = %notice.reason, "{}", notice.note);
        }
        match self.events.publish(notice, regarding).await {
            Ok(()) => self.metrics.wrote("event"),
            Err(source) => {
                // Best effort: the status says it too.
                let error = ControllerError::Write {
                    action: WriteAction::PublishEvent,
                    object,
                    source,
                };
                self.metrics.error(error.metric_label());
                tracing::debug!(%error, "event not published");
            }
        }
    }
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Successful writes (events aside).
    pub writes: usize,
    /// Failed writes (the pass went on without them).
    pub errors: Vec<ControllerError>,
    /// When the next sandbox expires.
    pub next_expiry: Option<Timestamp>,
}

type Key = (String, String);

#[derive(Clone, Debug)]
struct Written<S> {
    /// The `resourceVersion` the status was written over.
    over: Option<String>,
    status: S,
}

/// What this replica wrote that the caches may not show yet.
#[derive(Debug, Default)]
pub struct Memory {
    sandboxes: HashMap<Key, Written<SandboxStatus>>,
    route_groups: HashMap<Key, Written<RouteGroupStatus>>,
    /// uids of the sandboxes deleted.
    deleted: HashSet<String>,
}

impl Memory {
    /// `snapshot` as it will be once the caches show our writes: a status written over the
    /// version the cache still holds is replaced by what was written; deleted sandboxes are
    /// left out. Whatever the caches caught up with (or that is gone) is forgotten.
    pub fn overlay(&mut self, snapshot: &mut Snapshot) {
        let store = &mut snapshot.store;
        let present: HashSet<&str> = store
            .sandboxes
            .iter()
            .filter_map(|s| s.metadata.uid.as_deref())
            .collect();
        self.deleted.retain(|uid| present.contains(uid.as_str()));
        let deleted = &self.deleted;
        store
            .sandboxes
            .retain(|s| s.metadata.uid.as_ref().is_none_or(|u| !deleted.contains(u)));
        overlay_kind(
            &mut self.sandboxes,
            &mut store.sandboxes,
            &mut snapshot.bad_sandboxes,
            |sb: &mut Sandbox, s| sb.status = Some(s),
        );
        overlay_kind(
            &mut self.route_groups,
            &mut store.route_groups,
            &mut snapshot.bad_route_groups,
            |rg: &mut RouteGroup, s| rg.status = Some(s),
        );
    }
}

fn key_of(meta: &ObjectMeta) -> Key {
    let (ns, name) = ns_name(meta);
    (ns.to_string(), name.to_string())
}

fn overlay_kind<K, S>(
    memory: &mut HashMap<Key, Written<S>>,
    objects: &mut [Arc<K>],
    bad: &mut [BadObject<S>],
    set: impl Fn(&mut K, S),
) where
    K: kube::Resource + Clone,
    S: Clone,
{
    let mut keep = HashMap::new();
    for obj in objects.iter_mut() {
        let key = key_of(obj.meta());
        if let Some(w) = memory.remove(&key)
            && w.over == obj.meta().resource_version
        {
            let mut updated = (**obj).clone();
            set(&mut updated, w.status.clone());
            *obj = Arc::new(updated);
            keep.insert(key, w);
        }
    }
    for b in bad.iter_mut() {
        let key = key_of(&b.meta);
        if let Some(w) = memory.remove(&key)
            && w.over == b.meta.resource_version
        {
            b.status = Some(w.status.clone());
            keep.insert(key, w);
        }
    }
    *memory = keep;
}

/// One pass over `snapshot` at `now`. Fails only when leadership is lost (the rest of the
/// pass is dropped); every other failure is in the report.
pub async fn reconcile(
    writer: &Writer,
    mut snapshot: Snapshot,
    memory: &mut Memory,
    now: Timestamp,
) -> Result<PassReport, ControllerError> {
    memory.overlay(&mut snapshot);
    let plan = plan(&snapshot, now);
    let mut report = PassReport {
        next_expiry: plan.next_expiry,
        ..PassReport::default()
    };

    for expired in &plan.expired {
        writer.check()?;
        let (ns, name) = (&expired.object.namespace, &expired.object.name);
        let dp = DeleteParams {
            preconditions: expired.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match writer.custom::<Sandbox>(ns).delete(name, &dp).await {
            Ok(_) => {
                writer.metrics.wrote("sandbox_delete");
                report.writes += 1;
                if let Some(uid) = &expired.uid {
                    memory.deleted.insert(uid.clone());
                }
                let notice = Notice {
                    warning: false,
                    reason: reason::EXPIRED.into(),
                    action: "Delete",
                    note: format!(
                        "ttl {} passed at {}: the sandbox was deleted",
                        expired.ttl, expired.at
                    ),
                };
                writer.publish(&notice, &expired.reference).await;
            }
            // Gone already, or a newer sandbox of the same name: nothing to do.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(source) => writer.failed(
                ControllerError::Write {
                    action: WriteAction::DeleteExpired,
                    object: expired.object.to_string(),
                    source,
                },
                &mut report,
            ),
        }
    }

    for op in slice_ops(&plan.slices, &snapshot.fork_slices) {
        writer.check()?;
        let object = format!("EndpointSlice {}", op.slice_name());
        let (action, result) = apply_slice(writer, op).await;
        match result {
            Ok(()) => {
                writer.metrics.wrote(action.metric_label());
                report.writes += 1;
                tracing::debug!(object, action = action.metric_label(), "fork slice written");
            }
            Err(source) => writer.failed(
                ControllerError::Write {
                    action,
                    object,
                    source,
                },
                &mut report,
            ),
        }
    }

    for p in plan.sandboxes.iter().filter(|p| p.write) {
        writer.check()?;
        if write_status::<Sandbox, _>(writer, p, SANDBOX_STATUS_FIELDS, &mut report).await {
            memory.sandboxes.insert(
                (p.object.namespace.clone(), p.object.name.clone()),
                Written {
                    over: p.resource_version.clone(),
                    status: p.status.clone(),
                },
            );
        }
    }
    for p in plan.route_groups.iter().filter(|p| p.write) {
        writer.check()?;
        if write_status::<RouteGroup, _>(writer, p, ROUTE_GROUP_STATUS_FIELDS, &mut report).await {
            memory.route_groups.insert(
                (p.object.namespace.clone(), p.object.name.clone()),
                Written {
                    over: p.resource_version.clone(),
                    status: p.status.clone(),
                },
            );
        }
    }
    Ok(report)
}

async fn apply_slice(writer: &Writer, op: SliceOp) -> (WriteAction, Result<(), kube::Error>) {
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let api = |s: &EndpointSlice| -> Api<EndpointSlice> {
        Api::namespaced(writer.client.clone(), ns_name(&s.metadata).0)
    };
    match op {
        SliceOp::Create(s) => (
            WriteAction::CreateSlice,
            api(&s).create(&pp, &s).await.map(drop),
        ),
        SliceOp::Replace(s) => {
            let name = ns_name(&s.metadata).1.to_string();
            (
                WriteAction::ReplaceSlice,
                api(&s).replace(&name, &pp, &s).await.map(drop),
            )
        }
        SliceOp::Delete {
            namespace,
            name,
            uid,
        } => {
            let dp = DeleteParams {
                preconditions: uid.map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let api: Api<EndpointSlice> = Api::namespaced(writer.client.clone(), &namespace);
            let result = match api.delete(&name, &dp).await {
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                other => other.map(drop),
            };
            (WriteAction::DeleteSlice, result)
        }
    }
}

/// Writes one status and publishes its events; true when written.
async fn write_status<K, S>(
    writer: &Writer,
    p: &ObjectPlan<S>,
    fields: &[&str],
    report: &mut PassReport,
) -> bool
where
    K: kube::Resource<DynamicType = ()>,
    S: HasConditions,
{
    let patch = status_patch(&p.status, fields);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match writer
        .custom::<K>(&p.object.namespace)
        .patch_status(&p.object.name, &pp, &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            writer.metrics.wrote("status");
            report.writes += 1;
            for notice in &p.notices {
                writer.publish(notice, &p.reference).await;
            }
            true
        }
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(source) => {
            writer.failed(
                ControllerError::Write {
                    action: WriteAction::PatchStatus,
                    object: p.object.to_string(),
                    source,
                },
                report,
            );
            false
        }
    }
}

#[cfg(test)]
mod tests;
