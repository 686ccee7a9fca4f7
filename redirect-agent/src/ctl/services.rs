//! `redirectctl services`: `services_v1`, the forked service ports the kernel knows (by
//! ClusterIP:port and by each baseline backend ip:port), with their names.

use std::net::SocketAddr;

use serde::Serialize;

use super::{
    CtlError, Ctx, Names, agent_note,
    table::{Table, or_dash},
};
use crate::{loader::KernelMaps, sync::RedirectMaps};

#[derive(Debug, Serialize)]
pub struct ServicesDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub services: Vec<ServiceRow>,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub address: SocketAddr,
    pub service_id: u32,
    /// `namespace/name:port`, when the agent answers.
    pub service: Option<String>,
    /// What the port declares, when the agent answers: `http` (served as HTTP) or `detect`
    /// (the router detects the protocol from the first bytes).
    pub protocol: Option<String>,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<ServicesDoc, CtlError> {
    ctx.require_pins()?;
    let t = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let mut services: Vec<ServiceRow> = t
        .services
        .iter()
        .map(|(a, v)| ServiceRow {
            address: SocketAddr::from(a),
            service_id: v.service_id,
            service: names.service(v.service_id),
            protocol: names.protocol(v.service_id),
        })
        .collect();
    services.sort_by(|a, b| (&a.service, a.address).cmp(&(&b.service, b.address)));
    Ok(ServicesDoc {
        schema: "redirectctl.services/v1",
        agent_reachable: names.reachable(),
        services,
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["SERVICE", "PROTOCOL", "ID", "ADDRESS"]);
        for s in &doc.services {
            t.row(vec![
                or_dash(s.service.as_ref()),
                or_dash(s.protocol.as_ref()),
                format!("{:#010x}", s.service_id),
                s.address.to_string(),
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no forked service ports: no sandbox forks a service on this node\n");
        } else {
            out.push_str(&t.render());
        }
        out
    });
    Ok(())
}
