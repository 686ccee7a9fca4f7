//! `redirectctl conns`: `conns_v1`, original destinations recorded for redirected connections
//! that the router has not picked up yet (it deletes each one it reads; the rest age out).

use std::net::SocketAddr;

use serde::Serialize;

use super::{
    CtlError, Ctx, Names, agent_note, fmt_age,
    names::{CgroupIndex, describe_cgroup},
    table::Table,
};
use crate::loader::{inspect, monotonic_ns};

#[derive(Debug, Serialize)]
pub struct ConnsDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub conns: Vec<ConnRow>,
}

#[derive(Debug, Serialize)]
pub struct ConnRow {
    pub source: SocketAddr,
    pub original_destination: SocketAddr,
    pub service_id: u32,
    pub service: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub caller: String,
    pub age_ms: u64,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<ConnsDoc, CtlError> {
    ctx.require_pins()?;
    let now = monotonic_ns();
    let entries = inspect::conns(&ctx.pin_dir)?;
    let idx = if entries.is_empty() {
        CgroupIndex::default()
    } else {
        CgroupIndex::scan()
    };
    let mut conns: Vec<ConnRow> = entries
        .iter()
        .map(|(src, o)| {
            let (cgroup_path, caller) = describe_cgroup(o.cgroup_id, &idx, names);
            ConnRow {
                source: SocketAddr::from(src),
                original_destination: SocketAddr::from(&o.dst),
                service_id: o.service_id,
                service: names.service(o.service_id),
                cgroup_id: o.cgroup_id,
                cgroup_path,
                caller,
                age_ms: now.saturating_sub(o.recorded_ns) / 1_000_000,
            }
        })
        .collect();
    conns.sort_by_key(|c| c.age_ms);
    Ok(ConnsDoc {
        schema: "redirectctl.conns/v1",
        agent_reachable: names.reachable(),
        conns,
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["SOURCE", "ORIGINAL DESTINATION", "SERVICE", "CALLER", "AGE"]);
        for c in &doc.conns {
            t.row(vec![
                c.source.to_string(),
                c.original_destination.to_string(),
                c.service
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", c.service_id)),
                c.caller.clone(),
                fmt_age(std::time::Duration::from_millis(c.age_ms)),
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no pending original destinations (the router picked every one up)\n");
        } else {
            out.push_str(&t.render());
        }
        out
    });
    Ok(())
}
