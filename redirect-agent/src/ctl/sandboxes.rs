//! `redirectctl sandboxes`: routing keys, the sandboxes (or route group) behind each, and what
//! the kernel holds for them (forked services, ready endpoints, fork pods).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{CtlError, Ctx, Names, agent_note, table::Table};
use crate::{loader::KernelMaps, sync::RedirectMaps};

#[derive(Debug, Serialize)]
pub struct SandboxesDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub sandboxes: Vec<SandboxRow>,
}

#[derive(Debug, Default, Serialize)]
pub struct SandboxRow {
    pub key_id: u32,
    /// The routing key; None when the agent does not answer.
    pub key: Option<String>,
    /// `namespace/name` of the sandboxes (or route group) carrying the key.
    pub owners: Vec<String>,
    /// `baseline` or `unavailable` (503): what a request gets when the fork has no ready pod.
    pub fallback: Option<&'static str>,
    /// Entries in `forks_v1` for this key.
    pub forked_services: usize,
    /// Ready endpoints over all of them.
    pub ready_endpoints: u32,
    /// Fork pods (entries in `workloads_v1`) carrying this key on this node.
    pub fork_pods: usize,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<SandboxesDoc, CtlError> {
    ctx.require_pins()?;
    let t = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let mut rows: BTreeMap<u32, SandboxRow> = BTreeMap::new();
    for (id, k) in &names.tables.keys {
        rows.insert(
            *id,
            SandboxRow {
                key_id: *id,
                key: Some(k.key.clone()),
                owners: k.owners.clone(),
                fallback: Some(if k.fallback_to_baseline {
                    "baseline"
                } else {
                    "unavailable"
                }),
                ..Default::default()
            },
        );
    }
    let row = |rows: &mut BTreeMap<u32, SandboxRow>, id: u32| {
        rows.entry(id)
            .or_insert_with(|| SandboxRow {
                key_id: id,
                ..Default::default()
            })
            .key_id
    };
    for (k, f) in &t.forks {
        row(&mut rows, k.key_id);
        let r = rows.get_mut(&k.key_id).expect("inserted");
        r.forked_services += 1;
        r.ready_endpoints += f.count;
    }
    for w in t.workloads.values() {
        row(&mut rows, w.key_id);
        rows.get_mut(&w.key_id).expect("inserted").fork_pods += 1;
    }
    Ok(SandboxesDoc {
        schema: "redirectctl.sandboxes/v1",
        agent_reachable: names.reachable(),
        sandboxes: rows.into_values().collect(),
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&[
            "KEY",
            "SANDBOXES",
            "FALLBACK",
            "FORKED SERVICES",
            "READY ENDPOINTS",
            "FORK PODS",
        ]);
        for s in &doc.sandboxes {
            t.row(vec![
                s.key
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", s.key_id)),
                if s.owners.is_empty() {
                    "-".into()
                } else {
                    s.owners.join(",")
                },
                s.fallback.unwrap_or("-").into(),
                s.forked_services.to_string(),
                s.ready_endpoints.to_string(),
                s.fork_pods.to_string(),
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no sandboxes\n");
        } else {
            out.push_str(&t.render());
        }
        out
    });
    Ok(())
}
