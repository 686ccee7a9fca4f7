//! Every map of the programs, pinned by name under the agent's pin directory. Sizes and names
//! come from `redirect-common`, so userspace and kernel cannot disagree.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage, SockMap},
    macros::btf_map,
};
use redirect_common::{
    ForkEndpoints, ForkKey, MAX_CONNS, MAX_FORKS, MAX_ORIGIN_CACHE, MAX_PEER_HINTS, MAX_PEER_SLOTS,
    MAX_SERVICES, MAX_WORKLOADS, OrigDst, OriginCacheEntry, PeerSlot, Reason, RouterConfig,
    ServiceValue, SockAddr, SockRecord, TRACE_RING_BYTES, TRACE_STATS, TraceControl, TraceEvent,
    WorkloadValue,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "services_v1", pin_by_name)]
pub static SERVICES: HashMap<SockAddr, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "forks_v1", pin_by_name)]
pub static FORKS: HashMap<ForkKey, ForkEndpoints, { MAX_FORKS as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "workloads_v1", pin_by_name)]
pub static WORKLOADS: HashMap<u64, WorkloadValue, { MAX_WORKLOADS as usize }, NO_PREALLOC> =
    HashMap::new();

/// The caller lookup's answer per task cgroup, tagged with the `workloads_v1` generation it was
/// computed from (`redirect_common::origin`).
#[btf_map(name = "origin_cache_v1", pin_by_name)]
pub static ORIGIN_CACHE: LruHashMap<u64, OriginCacheEntry, { MAX_ORIGIN_CACHE as usize }> =
    LruHashMap::new();

/// The generation of `workloads_v1`, incremented by the agent after each write to it.
#[btf_map(name = "origin_gen_v1", pin_by_name)]
pub static ORIGIN_GEN: Array<u64, 1> = Array::new();

#[btf_map(name = "router_v1", pin_by_name)]
pub static ROUTER: Array<RouterConfig, 1> = Array::new();

/// The router's listening sockets (index `ROUTER_SOCK_V4`/`_V6`). A socket leaves a sockmap when
/// it closes, so the router's death empties its slot at once: that is the liveness signal.
#[btf_map(name = "router_socks_v1", pin_by_name)]
pub static ROUTER_SOCKS: SockMap<2> = SockMap::new();

/// Per socket sent to the router (and per socket sent to a fork endpoint, once it asked for
/// its peer): what `connect()` was asked for, for the record hook and `getpeername()`.
#[btf_map(name = "sock_records_v1", pin_by_name)]
pub static SOCK_RECORDS: SkStorage<SockRecord> = SkStorage::new();

/// What `getpeername()` reports for sockets sent to a fork endpoint, by socket cookie
/// (`redirect_common::peer`).
#[btf_map(name = "peer_slots_v1", pin_by_name)]
pub static PEER_SLOTS: Array<PeerSlot, { MAX_PEER_SLOTS as usize }> = Array::new();

/// Which peers may have a slot in `peer_slots_v1` (`redirect_common::peer::hint_index`).
#[btf_map(name = "peer_hints_v1", pin_by_name)]
pub static PEER_HINTS: Array<u64, { MAX_PEER_HINTS as usize }> = Array::new();

/// Original destination by client source address, for the router (which deletes what it reads).
#[btf_map(name = "conns_v1", pin_by_name)]
pub static CONNS: HashMap<SockAddr, OrigDst, { MAX_CONNS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "counters_v1", pin_by_name)]
pub static COUNTERS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Whether anyone traces: the first thing `connect4`/`connect6` read (one array lookup).
#[btf_map(name = "trace_ctl_v1", pin_by_name)]
pub static TRACE_CTL: Array<TraceControl, 1> = Array::new();

/// Traced decisions, for `redirectctl trace`. Bounded: when full, events are dropped and counted.
#[btf_map(name = "trace_events_v1", pin_by_name)]
pub static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_RING_BYTES as usize }> = RingBuf::new();

/// Trace events emitted and dropped (`TRACE_STAT_*`).
#[btf_map(name = "trace_stats_v1", pin_by_name)]
pub static TRACE_STATS_MAP: PerCpuArray<u64, { TRACE_STATS as usize }> = PerCpuArray::new();
