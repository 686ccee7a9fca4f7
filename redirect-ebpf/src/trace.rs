//! Opt-in decision tracing for `redirectctl trace`. Off unless a tracer set `trace_ctl_v1`: then
//! the cost is one array lookup per `connect()`. When on, each decision is copied into a bounded
//! ring buffer; a full buffer drops the event and counts it.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns};
use redirect_common::{
    Reason, TRACE_ALL, TRACE_F_IPV6_SOCKET, TRACE_OFF, TRACE_STAT_DROPPED, TRACE_STAT_EMITTED,
    TraceEvent, connect::Decision,
};

use crate::maps::{TRACE_CTL, TRACE_EVENTS, TRACE_STATS_MAP};

/// The trace mode (`TRACE_OFF` unless someone traces).
#[inline(always)]
pub fn mode() -> u32 {
    match TRACE_CTL.get(0) {
        Some(c) => c.mode,
        None => TRACE_OFF,
    }
}

#[inline(always)]
pub fn emit(mode: u32, ipv6: bool, d: &Decision) {
    // Only TCP connects are traced.
    let Some(before) = d.dst.get() else { return };
    if mode != TRACE_ALL && d.reason == Reason::NotForked {
        return;
    }
    let (pod_cgroup_id, key_id) = d.workload.or_default();
    let ev = TraceEvent {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pod_cgroup_id,
        before,
        after: d.rewrite.get().unwrap_or(before),
        service_id: d.service_id.or_default(),
        key_id,
        reason: d.reason as u32,
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
