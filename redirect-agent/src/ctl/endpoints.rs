//! `redirectctl endpoints`: every fork endpoint in `forks_v1`, one per line, and the router
//! addresses of `router_v1`.

use std::net::SocketAddr;

use serde::Serialize;

use super::{CtlError, Ctx, Names, agent_note, table::Table};
use crate::{loader::KernelMaps, sync::RedirectMaps};

#[derive(Debug, Serialize)]
pub struct EndpointsDoc {
    pub schema: &'static str,
    pub agent_reachable: bool,
    pub endpoints: Vec<EndpointRow>,
    pub router: RouterRow,
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub endpoint: SocketAddr,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    pub key_id: u32,
    pub key: Option<String>,
    pub service_id: u32,
    pub service: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RouterRow {
    pub ipv4: Option<SocketAddr>,
    pub ipv6: Option<SocketAddr>,
    pub mark: u32,
}

pub fn collect(ctx: &Ctx, names: &Names) -> Result<EndpointsDoc, CtlError> {
    ctx.require_pins()?;
    let t = KernelMaps::open(&ctx.pin_dir)?.read()?;
    let mut endpoints = Vec::new();
    for (k, f) in &t.forks {
        for v4 in [true, false] {
            let (start, n) = f.family_range(v4);
            for ep in &f.endpoints[start..start + n] {
                endpoints.push(EndpointRow {
                    endpoint: SocketAddr::from(ep),
                    family: if v4 { "ipv4" } else { "ipv6" },
                    key_id: k.key_id,
                    key: names.key(k.key_id),
                    service_id: k.service_id,
                    service: names.service(k.service_id),
                });
            }
        }
    }
    let addr = |s: &redirect_common::SockAddr| (!s.is_unset()).then(|| SocketAddr::from(s));
    Ok(EndpointsDoc {
        schema: "redirectctl.endpoints/v1",
        agent_reachable: names.reachable(),
        endpoints,
        router: RouterRow {
            ipv4: addr(&t.router.v4),
            ipv6: addr(&t.router.v6),
            mark: t.router.mark,
        },
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let names = Names::fetch(&ctx.admin);
    let doc = collect(ctx, &names)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["ENDPOINT", "FAMILY", "KEY", "SERVICE"]);
        for e in &doc.endpoints {
            t.row(vec![
                e.endpoint.to_string(),
                e.family.into(),
                e.key
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", e.key_id)),
                e.service
                    .clone()
                    .unwrap_or_else(|| format!("id {:#010x}", e.service_id)),
            ]);
        }
        let mut out = agent_note(&names);
        if t.is_empty() {
            out.push_str("no ready fork endpoints\n");
        } else {
            out.push_str(&t.render());
        }
        let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or("unset".into());
        out.push_str(&format!(
            "router: ipv4 {}, ipv6 {}, mark {:#x}\n",
            show(doc.router.ipv4),
            show(doc.router.ipv6),
            doc.router.mark
        ));
        out
    });
    Ok(())
}
