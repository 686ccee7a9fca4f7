//! Opt-in decision tracing for `redirectctl trace`. Off unless a tracer set `trace_ctl_v1`: then
//! the cost is one array lookup per `connect()`. When on, each decision is copied into a bounded
//! ring buffer; a full buffer drops the event and counts it.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns};
use redirect_common::{
    Reason, SockAddr, TRACE_ALL, TRACE_F_IPV6_SOCKET, TRACE_OFF, TRACE_STAT_DROPPED,
    TRACE_STAT_EMITTED, TraceEvent,
};

use crate::maps::{TRACE_CTL, TRACE_EVENTS, TRACE_STATS_MAP};

/// What the decision looked at, filled as it goes (plain stack stores).
#[derive(Default)]
pub struct Seen {
    /// Whether this was a TCP connect with a destination (only those are traced).
    pub tcp: bool,
    pub before: SockAddr,
    pub after: SockAddr,
    pub rewritten: bool,
    pub service_id: u32,
    pub key_id: u32,
    pub pod_cgroup_id: u64,
}

/// The trace mode (`TRACE_OFF` unless someone traces).
#[inline(always)]
pub fn mode() -> u32 {
    match TRACE_CTL.get(0) {
        Some(c) => c.mode,
        None => TRACE_OFF,
    }
}

#[inline(always)]
pub fn emit(mode: u32, ipv6: bool, reason: Reason, s: &Seen) {
    if !s.tcp || (mode != TRACE_ALL && reason == Reason::NotForked) {
        return;
    }
    let ev = TraceEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pod_cgroup_id: s.pod_cgroup_id,
        before: s.before,
        after: if s.rewritten { s.after } else { s.before },
        service_id: s.service_id,
        key_id: s.key_id,
        reason: reason as u32,
        flags: if ipv6 { TRACE_F_IPV6_SOCKET } else { 0 },
    };
    let stat = match TRACE_EVENTS.output(&ev, 0) {
        Ok(()) => TRACE_STAT_EMITTED,
        Err(_) => TRACE_STAT_DROPPED,
    };
    if let Some(slot) = TRACE_STATS_MAP.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
