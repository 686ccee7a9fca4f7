//! `redirectctl routes`: `forks_v1`, which routing key forks which service port, with the ready
//! endpoints of each family.

use std::net::SocketAddr;

use serde::Serialize;

use super::{CtlError, Ctx, Names, agent_note, table::Table};
use crate::{loader::KernelMaps, sync::RedirectMaps};

#[derive(Debug, Serialize)]
pub struct RoutesDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub routes: Vec<RouteRow>,
}

#[derive(Debug, Serialize)]
pub struct RouteRow {
    pub key_id: u32,
    pub key: Option<String>,
    pub service_id: u32,
    pub service: Option<String>,
    pub ready_ipv4: u32,
    pub ready_ipv6: u32,
    pub endpoints: Vec<SocketAddr>,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<RoutesDoc, CtlError> {
    ctx.require_pins()?;
    let t = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let routes = t
        .forks
        .iter()
        .map(|(k, f)| {
            let (_, v4) = f.family_range(true);
            let (_, v6) = f.family_range(false);
            RouteRow {
                key_id: k.key_id,
                key: names.key(k.key_id),
                service_id: k.service_id,
                service: names.service(k.service_id),
                ready_ipv4: v4 as u32,
                ready_ipv6: v6 as u32,
                endpoints: f.endpoints[..v4 + v6]
                    .iter()
                    .map(SocketAddr::from)
                    .collect(),
            }
        })
        .collect();
    Ok(RoutesDoc {
        schema: "redirectctl.routes/v1",
        agent_reachable: names.reachable(),
        routes,
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["KEY", "SERVICE", "READY v4/v6", "ENDPOINTS"]);
        for r in &doc.routes {
            let eps: Vec<String> = r.endpoints.iter().map(|e| e.to_string()).collect();
            t.row(vec![
                r.key
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", r.key_id)),
                r.service
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", r.service_id)),
                format!("{}/{}", r.ready_ipv4, r.ready_ipv6),
                if eps.is_empty() {
                    "(none ready)".into()
                } else {
                    eps.join(", ")
                },
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no routes: no sandbox forks a service on this node\n");
        } else {
            out.push_str(&t.render());
        }
        out
    });
    Ok(())
}
