//! `redirectctl counters`: the kernel's decision counters per reason (per-CPU values summed),
//! trace counters, and the router's outcome counters when the agent answers.

use std::collections::BTreeMap;

use redirect_common::Reason;
use serde::Serialize;

use super::{CtlError, Ctx, table::Table};
use crate::loader::{KernelMaps, inspect};

#[derive(Debug, Serialize)]
pub struct CountersDoc {
    pub schema: &'static str,
    /// Reason label → count, in `Reason` order.
    pub kernel: Vec<KernelCounter>,
    pub trace: TraceCounters,
    pub agent_reachable: bool,
    pub agent_error: Option<String>,
    /// Router connection outcomes (None when the agent does not answer).
    pub router_connections: Option<BTreeMap<String, u64>>,
    /// Router request outcomes.
    pub router_requests: Option<BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct KernelCounter {
    pub reason: &'static str,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct TraceCounters {
    pub emitted: u64,
    pub dropped: u64,
}

pub fn collect(ctx: &Ctx) -> Result<CountersDoc, CtlError> {
    ctx.require_pins()?;
    let values = KernelMaps::open(&ctx.pin_dir)?.counters()?;
    let (emitted, dropped) = inspect::trace_stats(&ctx.pin_dir).unwrap_or((0, 0));
    let status = ctx.admin.status();
    let (agent_error, conns, reqs) = match status {
        Ok(s) => (None, Some(s.router_connections), Some(s.router_requests)),
        Err(e) => (Some(e), None, None),
    };
    Ok(CountersDoc {
        schema: "redirectctl.counters/v1",
        kernel: Reason::ALL
            .iter()
            .map(|r| KernelCounter {
                reason: r.label(),
                count: values[*r as usize],
            })
            .collect(),
        trace: TraceCounters { emitted, dropped },
        agent_reachable: agent_error.is_none(),
        agent_error,
        router_connections: conns,
        router_requests: reqs,
    })
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let doc = collect(ctx)?;
    ctx.print(&doc, || {
        let mut t = Table::new(&["KERNEL DECISION", "COUNT"]);
        for c in &doc.kernel {
            t.row(vec![c.reason.into(), c.count.to_string()]);
        }
        let mut out = t.render();
        out.push_str(&format!(
            "trace events: {} emitted, {} dropped\n",
            doc.trace.emitted, doc.trace.dropped
        ));
        match (&doc.router_connections, &doc.router_requests) {
            (Some(c), Some(r)) => {
                let mut t = Table::new(&["ROUTER CONNECTION", "COUNT"]);
                for (k, v) in c {
                    t.row(vec![k.clone(), v.to_string()]);
                }
                out.push('\n');
                out.push_str(&t.render());
                let mut t = Table::new(&["ROUTER REQUEST", "COUNT"]);
                for (k, v) in r {
                    t.row(vec![k.clone(), v.to_string()]);
                }
                out.push('\n');
                out.push_str(&t.render());
            }
            _ => out.push_str(&format!(
                "router counters unavailable: agent admin API {}\n",
                doc.agent_error.as_deref().unwrap_or("did not answer")
            )),
        }
        out
    });
    Ok(())
}
