//! `redirectctl trace`: a live stream of the kernel's `connect()` decisions (before and after
//! translation, caller, reason) from the `trace_events_v1` ring buffer. Tracing is switched on
//! in `trace_ctl_v1` only while this runs (and off again on exit, Ctrl-C included); the
//! programs then pay one array lookup per connect. Filters apply here, in userspace.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction},
};
use redirect_common::{ForkKey, Reason, TRACE_ALL, TRACE_F_IPV6_SOCKET, TRACE_FORKED, TraceEvent};
use serde::Serialize;

use super::{
    CtlError, Ctx, Format, Names, fmt_time, mono_to_system,
    names::{CgroupIndex, describe_cgroup},
    unix_ms,
};
use crate::loader::inspect::{self, TRACE_HEARTBEAT, TraceSession};

#[derive(Clone, Debug, Default)]
pub struct TraceArgs {
    /// Service name (`ns/name[:port]`, `name`) or address (`ip` or `ip:port`).
    pub service: Option<String>,
    /// Routing key or sandbox name.
    pub sandbox: Option<String>,
    /// Include `not_forked` decisions (every TCP connect on the node).
    pub all: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

#[derive(Debug, Serialize)]
pub struct TraceLine {
    pub schema: &'static str,
    pub time: String,
    pub time_unix_ms: u64,
    pub reason: &'static str,
    pub rewritten: bool,
    pub before: SocketAddr,
    pub after: SocketAddr,
    pub ipv6_socket: bool,
    pub service_id: Option<u32>,
    pub service: Option<String>,
    pub key_id: Option<u32>,
    pub key: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    /// `pod ns/name`, `pod uid <uid>`, a cgroup path, or `cgroup <id>`.
    pub caller: String,
    pub pod_cgroup_id: Option<u64>,
}

/// Which events to show.
#[derive(Debug, Default)]
pub struct Filter {
    service_ids: Option<Vec<u32>>,
    addr: Option<(IpAddr, Option<u16>)>,
    key_ids: Option<Vec<u32>>,
    /// (key, service) pairs of the sandbox filter: events for services the sandbox forks.
    forked_by: Vec<ForkKey>,
}

impl Filter {
    pub fn new(args: &TraceArgs, names: &Names) -> Result<Self, CtlError> {
        let mut f = Filter::default();
        if let Some(s) = &args.service {
            if let Ok(a) = s.parse::<SocketAddr>() {
                f.addr = Some((a.ip(), Some(a.port())));
            } else if let Ok(ip) = s.parse::<IpAddr>() {
                f.addr = Some((ip, None));
            } else {
                let ids = names.service_ids(s);
                if ids.is_empty() {
                    return Err(CtlError::Input(match &names.error {
                        Some(e) => format!(
                            "--service {s}: service names need the agent (admin API {e}); pass an ip or ip:port"
                        ),
                        None => format!(
                            "--service {s}: no forked service port by that name (a service no sandbox forks has no id: pass its ip:port and --all)"
                        ),
                    }));
                }
                f.service_ids = Some(ids);
            }
        }
        if let Some(k) = &args.sandbox {
            let ids = names.key_ids(k);
            if ids.is_empty() {
                return Err(CtlError::Input(match &names.error {
                    Some(e) => {
                        format!("--sandbox {k}: sandbox names need the agent (admin API {e})")
                    }
                    None => format!("--sandbox {k}: no sandbox or routing key by that name"),
                }));
            }
            f.forked_by = names
                .tables
                .forks
                .keys()
                .filter(|fk| ids.contains(&fk.key_id))
                .copied()
                .collect();
            f.key_ids = Some(ids);
        }
        Ok(f)
    }

    pub fn matches(&self, ev: &TraceEvent) -> bool {
        if let Some(ids) = &self.service_ids
            && !ids.contains(&ev.service_id)
        {
            return false;
        }
        if let Some((ip, port)) = self.addr {
            let hit = |a: SocketAddr| a.ip() == ip && port.is_none_or(|p| p == a.port());
            let (b, a) = (SocketAddr::from(&ev.before), SocketAddr::from(&ev.after));
            if !hit(b) && !hit(a) {
                return false;
            }
        }
        if let Some(ids) = &self.key_ids {
            let caller = ev.key_id != 0 && ids.contains(&ev.key_id);
            let forked = self
                .forked_by
                .iter()
                .any(|fk| fk.service_id == ev.service_id);
            if !caller && !forked {
                return false;
            }
        }
        true
    }
}

pub fn line(ev: &TraceEvent, idx: &CgroupIndex, names: &Names) -> TraceLine {
    let t = mono_to_system(ev.ts_ns);
    let (cgroup_path, caller) = describe_cgroup(ev.cgroup_id, idx, names);
    let reason = Reason::ALL
        .get(ev.reason as usize)
        .map(|r| r.label())
        .unwrap_or("unknown");
    TraceLine {
        schema: "redirectctl.trace/v1",
        time: fmt_time(t),
        time_unix_ms: unix_ms(t),
        reason,
        rewritten: ev.before != ev.after,
        before: SocketAddr::from(&ev.before),
        after: SocketAddr::from(&ev.after),
        ipv6_socket: ev.flags & TRACE_F_IPV6_SOCKET != 0,
        service_id: (ev.service_id != 0).then_some(ev.service_id),
        service: names.service(ev.service_id),
        key_id: (ev.key_id != 0).then_some(ev.key_id),
        key: names.key(ev.key_id),
        cgroup_id: ev.cgroup_id,
        cgroup_path,
        caller,
        pod_cgroup_id: (ev.pod_cgroup_id != 0).then_some(ev.pod_cgroup_id),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<(), CtlError> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| CtlError::Input(format!("installing a {sig} handler: {e}")))?;
    }
    Ok(())
}

pub fn run(ctx: &Ctx, args: &TraceArgs) -> Result<(), CtlError> {
    ctx.require_pins()?;
    let names = Names::fetch(&ctx.admin);
    let filter = Filter::new(args, &names)?;
    install_signal_handlers()?;
    let mode = if args.all { TRACE_ALL } else { TRACE_FORKED };
    let mut session = TraceSession::start(&ctx.pin_dir, mode)?;
    let (_, dropped_before) = inspect::trace_stats(&ctx.pin_dir).unwrap_or((0, 0));
    let mut idx = CgroupIndex::scan();
    let mut last_scan = Instant::now();
    let started = Instant::now();
    let mut last_beat = Instant::now();
    let mut shown = 0u64;
    eprintln!(
        "tracing {} connect() decisions on this node{} (Ctrl-C to stop)",
        if args.all {
            "all TCP"
        } else {
            "forked-service"
        },
        match &names.error {
            Some(e) => format!("; names unavailable: agent admin API {e}"),
            None => String::new(),
        }
    );
    let stdout = std::io::stdout();
    if ctx.format == Format::Table {
        let _ = writeln!(
            stdout.lock(),
            "{:<21} {:<19} {:<30} {:<30} {:<28} CALLER",
            "TIME",
            "REASON",
            "BEFORE",
            "AFTER",
            "SERVICE"
        );
    }
    let result = (|| -> Result<(), CtlError> {
        loop {
            if STOP.load(Ordering::SeqCst)
                || args.count.is_some_and(|c| shown >= c)
                || args.duration.is_some_and(|d| started.elapsed() >= d)
            {
                return Ok(());
            }
            if last_beat.elapsed() >= TRACE_HEARTBEAT {
                session.heartbeat()?;
                last_beat = Instant::now();
            }
            let mut got = false;
            while let Some(ev) = session.next_event() {
                got = true;
                if !filter.matches(&ev) {
                    continue;
                }
                if idx.path(ev.cgroup_id).is_none() && last_scan.elapsed() > Duration::from_secs(1)
                {
                    idx = CgroupIndex::scan();
                    last_scan = Instant::now();
                }
                let l = line(&ev, &idx, &names);
                let mut out = stdout.lock();
                let w = match ctx.format {
                    Format::Json => {
                        writeln!(out, "{}", serde_json::to_string(&l).unwrap_or_default())
                    }
                    Format::Table => writeln!(
                        out,
                        "{:<21} {:<19} {:<30} {:<30} {:<28} {}",
                        l.time,
                        l.reason,
                        l.before.to_string(),
                        if l.rewritten {
                            l.after.to_string()
                        } else {
                            "(untouched)".into()
                        },
                        l.service.clone().unwrap_or_else(|| "-".into()),
                        l.caller
                    ),
                };
                let _ = out.flush();
                if w.is_err() {
                    // stdout closed (a pipe reader left): stop like Ctrl-C.
                    return Ok(());
                }
                shown += 1;
                if args.count.is_some_and(|c| shown >= c) {
                    return Ok(());
                }
            }
            if !got {
                let fd = session.fd();
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                // EINTR (a signal) just ends this wait; the loop checks STOP.
                let _ = poll(&mut fds, PollTimeout::from(200u16));
            }
        }
    })();
    session.stop();
    let (_, dropped_after) = inspect::trace_stats(&ctx.pin_dir).unwrap_or((0, 0));
    eprintln!(
        "{shown} events shown; {} dropped by the kernel (ring buffer full) during the trace; tracing switched off",
        dropped_after.saturating_sub(dropped_before)
    );
    result
}
