//! `redirectctl workloads`: `workloads_v1`, the fork pods' cgroups and their routing keys, with
//! the cgroup path and pod found by scanning the cgroup2 mount.

use serde::Serialize;

use super::{
    CtlError, Ctx, Names, agent_note,
    names::{CgroupIndex, pod_uid_of_path},
    table::{Table, or_dash},
};
use crate::{loader::KernelMaps, sync::RedirectMaps};

#[derive(Debug, Serialize)]
pub struct WorkloadsDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub workloads: Vec<WorkloadRow>,
}

#[derive(Debug, Serialize)]
pub struct WorkloadRow {
    pub cgroup_id: u64,
    pub key_id: u32,
    pub key: Option<String>,
    /// None when no cgroup with this id exists (the pod is gone) or the scan did not reach it.
    pub cgroup_path: Option<String>,
    pub pod_uid: Option<String>,
    /// `namespace/name`, when the agent answers.
    pub pod: Option<String>,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<WorkloadsDoc, CtlError> {
    ctx.require_pins()?;
    let t = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let idx = CgroupIndex::scan();
    let workloads = t
        .workloads
        .iter()
        .map(|(cg, w)| {
            let path = idx.path(*cg);
            let uid = path.and_then(pod_uid_of_path);
            WorkloadRow {
                cgroup_id: *cg,
                key_id: w.key_id,
                key: names.key(w.key_id),
                cgroup_path: path.map(|p| p.display().to_string()),
                pod: uid.as_deref().and_then(|u| names.pod(u)),
                pod_uid: uid,
            }
        })
        .collect();
    Ok(WorkloadsDoc {
        schema: "redirectctl.workloads/v1",
        agent_reachable: names.reachable(),
        workloads,
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["CGROUP ID", "KEY", "POD", "CGROUP PATH"]);
        for w in &doc.workloads {
            t.row(vec![
                w.cgroup_id.to_string(),
                w.key
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", w.key_id)),
                w.pod
                    .clone()
                    .or(w.pod_uid.as_ref().map(|u| format!("uid {u}")))
                    .unwrap_or_else(|| "-".into()),
                or_dash(w.cgroup_path.as_ref()),
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no fork pods on this node\n");
        } else {
            out.push_str(&t.render());
        }
        out
    });
    Ok(())
}
