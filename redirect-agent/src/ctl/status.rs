//! `redirectctl status`: are the programs attached (where, since when), is the router taking
//! connections (its listeners in `router_socks_v1`), how full are the maps, is someone tracing,
//! and is the agent up (and when did it last sync).

use std::time::{Duration, SystemTime};

use redirect_common::{TCP_CONNECT_FN, TRACE_ALL, TRACE_FORKED, TRACE_OFF};
use serde::Serialize;

use super::{
    CtlError, Ctx, fmt_age, fmt_time,
    names::CgroupIndex,
    table::{Table, or_dash},
    unix_ms,
};
use crate::{
    admin::api::AgentStatus,
    loader::{inspect, monotonic_ns, sys},
    source::kube::health::SourceStatus,
};

#[derive(Debug, Serialize)]
pub struct StatusDoc {
    pub schema: &'static str,
    pub pin_dir: String,
    /// Whether the pin directory exists at all.
    pub pinned: bool,
    pub programs: Vec<ProgramRow>,
    pub router: RouterLiveness,
    pub maps: Vec<MapRow>,
    pub trace: TraceState,
    pub agent: AgentReach,
}

#[derive(Debug, Serialize)]
pub struct ProgramRow {
    pub program: &'static str,
    pub link_pin: String,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    /// The cgroup the link attaches the program to (a cgroup link).
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    /// The kernel function a tracing link attaches the program to (`fentry/tcp_connect`).
    pub kernel_function: Option<String>,
    /// When the program the link runs was loaded (the agent's last start).
    pub loaded_at_unix_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RouterLiveness {
    /// Whether the IPv4 router listener is in `router_socks_v1` (None: unknown, see error).
    pub ipv4: Option<bool>,
    pub ipv6: Option<bool>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MapRow {
    pub name: &'static str,
    pub map_type: String,
    pub id: u32,
    pub entries: Option<u64>,
    pub max_entries: u32,
    pub fill_percent: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TraceState {
    /// `off`, `forked` or `all`.
    pub mode: &'static str,
    pub tracer_pid: Option<u32>,
    pub heartbeat_age_ms: Option<u64>,
    /// A tracer that stopped renewing its heartbeat (killed); the agent switches it off.
    pub stale: bool,
    pub emitted: u64,
    pub dropped: u64,
}

#[derive(Debug, Serialize)]
pub struct AgentReach {
    pub address: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub status: Option<AgentStatus>,
}

pub fn collect(ctx: &Ctx) -> Result<StatusDoc, CtlError> {
    let pinned = ctx.pin_dir.is_dir();
    let idx = CgroupIndex::scan();
    let programs = inspect::links(&ctx.pin_dir)
        .into_iter()
        .map(|l| {
            let cgroup_link = l.link.filter(|i| i.link_type == sys::LINK_TYPE_CGROUP);
            ProgramRow {
                program: l.program,
                link_pin: l.pin.display().to_string(),
                attached: l.link.is_some(),
                link_id: l.link.map(|i| i.link_id),
                prog_id: l.link.map(|i| i.prog_id),
                cgroup_id: cgroup_link.map(|i| i.cgroup_id),
                cgroup_path: cgroup_link
                    .and_then(|i| idx.path(i.cgroup_id))
                    .map(|p| p.display().to_string()),
                kernel_function: l
                    .link
                    .filter(|i| i.link_type == sys::LINK_TYPE_TRACING)
                    .map(|_| format!("fentry/{TCP_CONNECT_FN}")),
                loaded_at_unix_ms: l.prog_loaded_at.map(unix_ms),
                error: l.error,
            }
        })
        .collect();
    let router = if pinned {
        match inspect::router_alive(&ctx.pin_dir) {
            Ok([v4, v6]) => RouterLiveness {
                ipv4: Some(v4),
                ipv6: Some(v6),
                error: None,
            },
            Err(e) => RouterLiveness {
                ipv4: None,
                ipv6: None,
                error: Some(e.to_string()),
            },
        }
    } else {
        RouterLiveness {
            ipv4: None,
            ipv6: None,
            error: Some("not pinned".into()),
        }
    };
    let maps = if pinned {
        inspect::map_fill(&ctx.pin_dir)
            .into_iter()
            .map(|f| MapRow {
                name: f.name,
                map_type: f.map_type,
                id: f.id,
                fill_percent: f
                    .entries
                    .filter(|_| f.max_entries > 0 && !f.name.starts_with("trace_events"))
                    .map(|n| (n as f64 * 1000.0 / f64::from(f.max_entries)).round() / 10.0),
                entries: f.entries,
                max_entries: f.max_entries,
                error: f.error,
            })
            .collect()
    } else {
        Vec::new()
    };
    let ctl = inspect::trace_control(&ctx.pin_dir).ok();
    let (emitted, dropped) = inspect::trace_stats(&ctx.pin_dir).unwrap_or((0, 0));
    let on = ctl.filter(|c| c.mode != TRACE_OFF);
    let age = on.map(|c| monotonic_ns().saturating_sub(c.heartbeat_ns) / 1_000_000);
    let trace = TraceState {
        mode: match on.map(|c| c.mode) {
            None => "off",
            Some(TRACE_FORKED) => "forked",
            Some(TRACE_ALL) => "all",
            Some(_) => "unknown",
        },
        tracer_pid: on.map(|c| c.pid),
        heartbeat_age_ms: age,
        stale: age.is_some_and(|a| a >= inspect::TRACE_STALE_AFTER.as_millis() as u64),
        emitted,
        dropped,
    };
    let agent = match ctx.admin.status() {
        Ok(s) => AgentReach {
            address: ctx.admin.url.clone(),
            reachable: true,
            error: None,
            status: Some(s),
        },
        Err(e) => AgentReach {
            address: ctx.admin.url.clone(),
            reachable: false,
            error: Some(e),
            status: None,
        },
    };
    Ok(StatusDoc {
        schema: "redirectctl.status/v1",
        pin_dir: ctx.pin_dir.display().to_string(),
        pinned,
        programs,
        router,
        maps,
        trace,
        agent,
    })
}

fn when(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now().duration_since(t).unwrap_or_default();
    format!("{} ({} ago)", fmt_time(t), fmt_age(ago))
}

pub fn render(doc: &StatusDoc) -> String {
    let mut out = format!("pins: {}", doc.pin_dir);
    if !doc.pinned {
        out.push_str(" (missing: nothing is loaded; the agent never ran or was cleaned up)");
    }
    out.push_str("\n\n");
    let mut t = Table::new(&["PROGRAM", "ATTACHED", "LINK/PROG", "CGROUP", "LOADED"]);
    for p in &doc.programs {
        t.row(vec![
            p.program.into(),
            if p.attached {
                "yes".into()
            } else {
                format!("NO ({})", p.error.as_deref().unwrap_or("?"))
            },
            match (p.link_id, p.prog_id) {
                (Some(l), Some(pr)) => format!("{l}/{pr}"),
                _ => "-".into(),
            },
            match (&p.cgroup_path, p.cgroup_id) {
                _ if p.kernel_function.is_some() => {
                    format!(
                        "(kernel function {})",
                        p.kernel_function.as_deref().unwrap_or("")
                    )
                }
                (Some(path), _) => path.clone(),
                (None, Some(id)) => format!("cgroup id {id} (path not found)"),
                _ => "-".into(),
            },
            or_dash(p.loaded_at_unix_ms.map(when)),
        ]);
    }
    out.push_str(&t.render());
    let live = |v: Option<bool>| match v {
        Some(true) => "up",
        Some(false) => "DOWN (connections to forked services go direct: fail open)",
        None => "unknown",
    };
    out.push_str(&format!(
        "\nrouter ipv4: {}\nrouter ipv6: {}\n",
        live(doc.router.ipv4),
        live(doc.router.ipv6)
    ));
    if let Some(e) = &doc.router.error {
        out.push_str(&format!("router liveness: {e}\n"));
    }
    if !doc.maps.is_empty() {
        let mut t = Table::new(&["MAP", "TYPE", "ENTRIES", "MAX", "FILL"]);
        for m in &doc.maps {
            t.row(vec![
                m.name.into(),
                if m.error.is_some() {
                    "MISSING".into()
                } else {
                    m.map_type.clone()
                },
                or_dash(m.entries),
                or_dash((m.max_entries > 0).then_some(m.max_entries)),
                or_dash(m.fill_percent.map(|p| format!("{p}%"))),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "\ntrace: {}{} (events emitted {}, dropped {})\n",
        doc.trace.mode,
        match (doc.trace.tracer_pid, doc.trace.heartbeat_age_ms) {
            (Some(pid), Some(age)) => format!(
                ", tracer pid {pid}, heartbeat {age} ms ago{}",
                if doc.trace.stale { " (STALE)" } else { "" }
            ),
            _ => String::new(),
        },
        doc.trace.emitted,
        doc.trace.dropped
    ));
    match &doc.agent.status {
        Some(s) => {
            out.push_str(&format!(
                "agent: reachable at {} (pid {}, version {}, {}, generation {}, log filter {:?})\n",
                doc.agent.address,
                s.pid,
                s.version,
                if s.ready { "ready" } else { "NOT READY" },
                s.generation,
                s.log_filter
            ));
            match &s.last_sync {
                Some(l) => out.push_str(&format!(
                    "last sync: {}, took {:.2} ms, {} applied, {} failed; {} syncs, {} map errors, {} manifest errors\n",
                    when(l.at_unix_ms),
                    l.duration_ms,
                    l.applied,
                    l.failed,
                    s.syncs_total,
                    s.sync_errors_total,
                    s.manifest_errors_total
                )),
                None if s.state_from == crate::admin::api::STATE_PERSISTED => out.push_str(
                    "last sync: none yet; routing with the last good state an earlier agent \
                     persisted\n",
                ),
                None => out.push_str("last sync: none yet\n"),
            }
            if let Some(src) = &s.source {
                render_source(&mut out, src);
            }
        }
        None => out.push_str(&format!(
            "agent: UNREACHABLE {}{}\n",
            doc.agent.error.as_deref().unwrap_or(""),
            if doc.pinned {
                " (pinned programs and maps keep working; names are unavailable)"
            } else {
                ""
            }
        )),
    }
    out
}

/// The source line and, for the kube source, one row per watch.
fn render_source(out: &mut String, src: &SourceStatus) {
    out.push_str(&format!(
        "source: {}{}\n",
        src.kind,
        if src.message.is_empty() {
            String::new()
        } else {
            format!(
                " ({}{})",
                if src.healthy { "" } else { "PROBLEM: " },
                src.message
            )
        }
    ));
    if src.watches.is_empty() {
        return;
    }
    let mut t = Table::new(&[
        "WATCH",
        "SCOPE",
        "SYNCED",
        "CONNECTED",
        "OBJECTS",
        "EVENTS",
        "LISTS",
        "ERRORS",
        "SKIPPED",
        "LAST ERROR",
    ]);
    for w in &src.watches {
        let yes_no = |b: bool| if b { "yes" } else { "NO" }.to_string();
        t.row(vec![
            w.kind.clone(),
            w.scope.clone(),
            if w.crd_missing {
                "NO CRD".into()
            } else {
                yes_no(w.synced)
            },
            yes_no(w.connected),
            w.objects.to_string(),
            w.events_total.to_string(),
            w.lists_total.to_string(),
            w.errors_total.to_string(),
            w.skipped.len().to_string(),
            w.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    for w in &src.watches {
        for (name, reason) in &w.skipped {
            out.push_str(&format!("skipped {} {name}: {reason}\n", w.kind));
        }
    }
}

pub fn run(ctx: &Ctx) -> Result<(), CtlError> {
    let doc = collect(ctx)?;
    ctx.print(&doc, || render(&doc));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kube::health::WatchStatus;

    #[test]
    fn a_failing_watch_and_a_skipped_object_are_shown_with_the_reason() {
        let src = SourceStatus {
            kind: "kube".into(),
            healthy: false,
            message: "the API server cannot be reached or fails for Pod".into(),
            watches: vec![WatchStatus {
                kind: "Pod".into(),
                scope: "spec.nodeName=n1".into(),
                synced: true,
                connected: false,
                errors_total: 3,
                last_error: Some("connection refused".into()),
                skipped: [("shop/odd".to_string(), "bad".to_string())].into(),
                ..WatchStatus::default()
            }],
        };
        let mut out = String::new();
        render_source(&mut out, &src);
        assert!(
            out.starts_with("source: kube (PROBLEM: the API server cannot be reached"),
            "{out}"
        );
        let row = out.lines().find(|l| l.starts_with("Pod")).unwrap();
        for cell in ["spec.nodeName=n1", "yes", "NO", "3", "connection refused"] {
            assert!(row.contains(cell), "{cell} missing from {row:?}");
        }
        assert!(out.contains("skipped Pod shop/odd: bad"), "{out}");
    }
}
