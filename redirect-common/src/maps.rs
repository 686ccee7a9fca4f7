//! Map names, sizes, keys and values.

use core::mem::size_of;

/// Version carried by every map, program and link name; bump on any layout change so a new
/// agent never reuses pins of an incompatible layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Directory under the bpffs mount where maps and links are pinned.
pub const PIN_SUBDIR: &str = "redirect";

pub const MAP_SERVICES: &str = "services_v1";
pub const MAP_FORKS: &str = "forks_v1";
pub const MAP_WORKLOADS: &str = "workloads_v1";
pub const MAP_ROUTER: &str = "router_v1";
pub const MAP_ROUTER_SOCKS: &str = "router_socks_v1";
/// Per socket sent to the router, and per socket sent to a fork endpoint once it asked
/// `getpeername()` (socket storage): its [`SockRecord`], gone with the socket.
pub const MAP_SOCK_RECORDS: &str = "sock_records_v1";
/// What `getpeername()` reports for sockets sent to a fork endpoint, one [`crate::PeerSlot`]
/// per socket cookie modulo `MAX_PEER_SLOTS`, written at `connect()` (see `peer`).
pub const MAP_PEER_SLOTS: &str = "peer_slots_v1";
/// Which peers may have a slot in `peer_slots_v1`: 1 at `peer::hint_index` of every fork
/// endpoint `connect()` sent a socket to (see `peer`).
pub const MAP_PEER_HINTS: &str = "peer_hints_v1";
pub const MAP_CONNS: &str = "conns_v1";
pub const MAP_COUNTERS: &str = "counters_v1";
/// Whether (and what) `connect4`/`connect6` trace: one [`TraceControl`], checked first.
pub const MAP_TRACE_CTL: &str = "trace_ctl_v1";
/// Ring buffer of [`TraceEvent`]s, read by `redirectctl trace`.
pub const MAP_TRACE_EVENTS: &str = "trace_events_v1";
/// Per-CPU trace counters, indexed by `TRACE_STAT_*`.
pub const MAP_TRACE_STATS: &str = "trace_stats_v1";

/// Per task cgroup: the caller's fork pod and routing key, or "not a fork pod", as of one
/// generation of `workloads_v1` (see `origin`).
pub const MAP_ORIGIN_CACHE: &str = "origin_cache_v1";
/// The single generation counter of `workloads_v1`: the agent increments it after every write
/// to `workloads_v1`, which retires every `origin_cache_v1` entry.
pub const MAP_ORIGIN_GEN: &str = "origin_gen_v1";

/// Maps earlier versions pinned and this one no longer uses (two socket storages, merged into
/// `sock_records_v1`): the agent removes their pins once its own programs are attached.
pub const RETIRED_MAPS: [&str; 2] = ["orig_sk_v1", "peer_sk_v1"];

/// Every map, for cleanup and status listings.
pub const ALL_MAPS: [&str; 15] = [
    MAP_SERVICES,
    MAP_FORKS,
    MAP_WORKLOADS,
    MAP_ORIGIN_CACHE,
    MAP_ORIGIN_GEN,
    MAP_ROUTER,
    MAP_ROUTER_SOCKS,
    MAP_SOCK_RECORDS,
    MAP_PEER_SLOTS,
    MAP_PEER_HINTS,
    MAP_CONNS,
    MAP_COUNTERS,
    MAP_TRACE_CTL,
    MAP_TRACE_EVENTS,
    MAP_TRACE_STATS,
];

pub const PROG_CONNECT4: &str = "redirect_connect4";
pub const PROG_CONNECT6: &str = "redirect_connect6";
pub const PROG_SOCK_OPS: &str = "redirect_sock_ops";
pub const PROG_GETPEERNAME4: &str = "redirect_getpeername4";
pub const PROG_GETPEERNAME6: &str = "redirect_getpeername6";
/// `fentry` on the kernel's `tcp_connect()`: records router-bound connections once per connect
/// (Linux 5.11+), where `sock_ops` runs for every callback of every socket below the root.
pub const PROG_TCP_CONNECT: &str = "redirect_tcp_connect";
/// The kernel function `PROG_TCP_CONNECT` is attached to.
pub const TCP_CONNECT_FN: &str = "tcp_connect";
/// The read-only global of `PROG_TCP_CONNECT` that the agent fills with [`SockOffsets`].
pub const GLOBAL_SOCK_OFFSETS: &str = "SOCK_OFFSETS";

/// The programs attached at the cgroup root in every mode, with their link pin names.
pub const CGROUP_PROGRAMS: [(&str, &str); 4] = [
    (PROG_CONNECT4, "link_connect4_v1"),
    (PROG_CONNECT6, "link_connect6_v1"),
    (PROG_GETPEERNAME4, "link_getpeername4_v1"),
    (PROG_GETPEERNAME6, "link_getpeername6_v1"),
];

/// The two ways to hand a router-bound connection's original destination to `conns_v1`, with
/// their link pin names, preferred first: exactly one is attached.
pub const RECORD_PROGRAMS: [(&str, &str); 2] = [
    (PROG_TCP_CONNECT, "link_tcp_connect_v1"),
    (PROG_SOCK_OPS, "link_sock_ops_v1"),
];

/// Every program with the pin name of its link, for cleanup.
pub const ALL_PROGRAMS: [(&str, &str); 6] = [
    CGROUP_PROGRAMS[0],
    CGROUP_PROGRAMS[1],
    CGROUP_PROGRAMS[2],
    CGROUP_PROGRAMS[3],
    RECORD_PROGRAMS[0],
    RECORD_PROGRAMS[1],
];

pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_FORKS: u32 = 16_384;
pub const MAX_WORKLOADS: u32 = 16_384;
pub const MAX_CONNS: u32 = 65_536;
/// Slots of `peer_slots_v1` (3.5 MiB): a rewritten socket's first `getpeername()` finds its
/// answer unless another rewritten socket took the slot since (see `peer`).
pub const MAX_PEER_SLOTS: u32 = 65_536;
const _: () = assert!(MAX_PEER_SLOTS.is_power_of_two());
/// Entries of `peer_hints_v1` (32 KiB), far more than a node's fork endpoints.
pub const MAX_PEER_HINTS: u32 = 4_096;
const _: () = assert!(MAX_PEER_HINTS.is_power_of_two());
/// Task cgroups whose caller lookup is cached (an LRU map: the least recently used go first).
pub const MAX_ORIGIN_CACHE: u32 = 16_384;
/// Bytes of the trace ring buffer (a power-of-two number of pages): ~2,900 events. When a reader
/// falls behind, events are dropped and counted, never queued without bound.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;
/// Index in `trace_stats_v1`: events written to the ring buffer.
pub const TRACE_STAT_EMITTED: u32 = 0;
/// Index in `trace_stats_v1`: events dropped because the ring buffer was full.
pub const TRACE_STAT_DROPPED: u32 = 1;
/// Number of slots of `trace_stats_v1`.
pub const TRACE_STATS: u32 = 2;
/// Endpoints kept per fork; one is picked per connection.
pub const MAX_FORK_ENDPOINTS: usize = 8;
const _: () = assert!(MAX_FORK_ENDPOINTS.is_power_of_two());
/// cgroup ancestry levels walked to find a pod cgroup (root is level 0).
pub const MAX_CGROUP_LEVELS: i32 = 12;

/// Index of the router's listening socket in `router_socks_v1`, per family.
pub const ROUTER_SOCK_V4: u32 = 0;
pub const ROUTER_SOCK_V6: u32 = 1;

/// A socket address. IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so one type serves both
/// families; `ip` holds the address as four 32-bit words in network byte order (as the kernel's
/// `user_ip6` does), `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockAddr>() == 20);

/// Network-order word 2 of an IPv4-mapped address (`::ffff:0:0/96`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl SockAddr {
    /// From an IPv4 address in network byte order (as `user_ip4`) and a host-order port.
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        SockAddr {
            ip: [0, 0, V4_MAPPED_WORD, ip_be],
            port,
            _pad: 0,
        }
    }

    /// From IPv6 words in network byte order and a host-order port.
    pub const fn v6(ip: [u32; 4], port: u16) -> Self {
        SockAddr { ip, port, _pad: 0 }
    }

    pub const fn is_v4(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address in network byte order, if this is an IPv4(-mapped) address.
    pub const fn v4_be(&self) -> Option<u32> {
        if self.is_v4() { Some(self.ip[3]) } else { None }
    }

    pub const fn is_unset(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0 && self.ip[3] == 0 && self.port == 0
    }
}

/// Value of `services_v1`, keyed by a `SockAddr` (ClusterIP:port, and each baseline backend
/// ip:port as fallback for when another program translated the VIP first). Only services that
/// some sandbox forks are present, so the miss is the common, cheap case.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifies one service port (namespace/name/port).
    pub service_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 8);

/// Value of `workloads_v1`, keyed by a pod's cgroup id (u64, the cgroup directory's inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadValue {
    /// The routing key the pod's sandbox carries.
    pub key_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<WorkloadValue>() == 8);

/// Key of `forks_v1`: which routing key forks which service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForkKey {
    pub key_id: u32,
    pub service_id: u32,
}
const _: () = assert!(size_of::<ForkKey>() == 8);

/// Value of `forks_v1`: the ready endpoints of a fork (target ip:port). The first `count` are
/// valid: IPv4 ones first (`count_v4` of them), then IPv6, so a connection picks an endpoint of
/// its destination's family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEndpoints {
    pub count: u32,
    pub count_v4: u32,
    pub endpoints: [SockAddr; MAX_FORK_ENDPOINTS],
}
const _: () = assert!(size_of::<ForkEndpoints>() == 8 + 20 * MAX_FORK_ENDPOINTS);

impl ForkEndpoints {
    /// Builds the value from endpoints in any order, keeping their order within each family.
    /// Returns it with the number of endpoints that did not fit.
    pub fn from_endpoints(eps: &[SockAddr]) -> (Self, usize) {
        let mut out = ForkEndpoints::default();
        let mut n = 0;
        for want_v4 in [true, false] {
            for ep in eps.iter().filter(|e| e.is_v4() == want_v4) {
                if n < MAX_FORK_ENDPOINTS {
                    out.endpoints[n] = *ep;
                    n += 1;
                    if want_v4 {
                        out.count_v4 += 1;
                    }
                }
            }
        }
        out.count = n as u32;
        (out, eps.len() - n)
    }

    /// `(first index, how many)` of the endpoints of one family.
    #[inline(always)]
    pub fn family_range(&self, v4: bool) -> (usize, usize) {
        let count = if (self.count as usize) < MAX_FORK_ENDPOINTS {
            self.count as usize
        } else {
            MAX_FORK_ENDPOINTS
        };
        let v4n = if (self.count_v4 as usize) < count {
            self.count_v4 as usize
        } else {
            count
        };
        if v4 { (0, v4n) } else { (v4n, count - v4n) }
    }
}

/// The single entry of `router_v1`: where redirected connections go and how the router marks
/// its own sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterConfig {
    /// Router address for IPv4 callers (unset: no IPv4 redirect).
    pub v4: SockAddr,
    /// Router address for IPv6 callers (unset: no IPv6 redirect).
    pub v6: SockAddr,
    /// `SO_MARK` the router puts on its upstream sockets; 0 disables the check.
    pub mark: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RouterConfig>() == 48);

/// A redirected connection's original destination: part of its socket's [`SockRecord`], copied
/// by `sock_ops` into `conns_v1` keyed by the client's source address for the router.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub dst: SockAddr,
    pub service_id: u32,
    /// cgroup id of the connecting socket (for explain and tracing).
    pub cgroup_id: u64,
    /// When `sock_ops` recorded it (CLOCK_MONOTONIC ns): entries the router never picked up
    /// (the connection failed before reaching it) are swept by age.
    pub recorded_ns: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 40);

/// `SockRecord::flags`: the socket was sent to the router, which needs `orig` in `conns_v1`.
pub const SOCK_TO_ROUTER: u32 = 1;

/// What is remembered about a rewritten socket in its socket storage (`sock_records_v1`):
/// `orig.dst` is what `getpeername()` reports. `connect4`/`connect6` write it for a socket they
/// send to the router (one storage serves both uses, because creating one is most of that
/// connect's time); `getpeername4`/`6` write it from the socket's `peer_slots_v1` slot for one
/// sent to a fork endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    pub orig: OrigDst,
    /// `SOCK_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SockRecord>() == 48);

/// Where `__sk_common.skc_dport` sits in `struct sock` on every kernel since 2.6.38: the one
/// field `PROG_TCP_CONNECT` reads with a plain load (its first check, on every TCP connect of the
/// node, is then free of helper calls). The agent checks the kernel's BTF agrees before loading.
pub const SOCK_DPORT_OFFSET: usize = 12;

/// Byte offsets in the kernel's `struct sock` of the fields `PROG_TCP_CONNECT` reads, found by
/// the agent in the kernel's BTF (Rust cannot emit CO-RE relocations), and the router's ports,
/// written into the program's read-only global `GLOBAL_SOCK_OFFSETS` before it is loaded.
/// `ready` is 0 in the object as built: the program then records nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub ready: u32,
    /// `__sk_common.skc_family` (u16).
    pub family: u32,
    /// `__sk_common.skc_rcv_saddr` (u32, network order): the IPv4 source address.
    pub rcv_saddr: u32,
    /// `__sk_common.skc_num` (u16, host order): the source port.
    pub num: u32,
    /// `__sk_common.skc_v6_rcv_saddr` (16 bytes): the IPv6 source address.
    pub v6_rcv_saddr: u32,
    /// `__sk_common.skc_dport` (u16, network order): must equal `SOCK_DPORT_OFFSET`.
    pub dport: u32,
    /// The routers' ports in network order (0: no router for the family): a connect to any
    /// other port was not sent to the router, and the program leaves at once.
    pub router_dport4: u16,
    pub router_dport6: u16,
}
const _: () = assert!(size_of::<SockOffsets>() == 28);

/// `TraceControl::mode`: not tracing (the programs pay one array lookup).
pub const TRACE_OFF: u32 = 0;
/// `TraceControl::mode`: trace decisions about forked service ports (everything but
/// `not_forked`).
pub const TRACE_FORKED: u32 = 1;
/// `TraceControl::mode`: trace every TCP connect decision, `not_forked` included (busy nodes
/// fill the ring buffer quickly; drops are counted).
pub const TRACE_ALL: u32 = 2;

/// The single entry of `trace_ctl_v1`. Whoever traces sets `mode`, its `pid` and a heartbeat it
/// renews every second, and clears the entry on exit. A flag left by a killed tracer is
/// recognised by its old heartbeat (independent of pid namespaces) and cleared by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceControl {
    pub mode: u32,
    /// Process id of the tracer (as the tracer sees it; informational).
    pub pid: u32,
    /// Last sign of life of the tracer (CLOCK_MONOTONIC ns).
    pub heartbeat_ns: u64,
}
const _: () = assert!(size_of::<TraceControl>() == 16);

/// `TraceEvent::flags`: the socket is IPv6 (connect6).
pub const TRACE_F_IPV6_SOCKET: u32 = 1;

/// One traced `connect()` decision, written to `trace_events_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    /// cgroup of the connecting task (its own, e.g. a container's).
    pub cgroup_id: u64,
    /// The fork pod's cgroup found in the ancestry walk; 0 for baseline callers (or when the
    /// walk did not run).
    pub pod_cgroup_id: u64,
    /// Destination the caller asked for.
    pub before: SockAddr,
    /// Destination after the decision (equal to `before` when untouched).
    pub after: SockAddr,
    /// Service port id of the destination; 0 when it is no forked service.
    pub service_id: u32,
    /// Routing key id of the caller's sandbox; 0 for baseline callers.
    pub key_id: u32,
    /// The decision (`Reason` discriminant).
    pub reason: u32,
    /// `TRACE_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<TraceEvent>() == 80);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, made only of integers, with no padding (asserted).
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for ForkKey {}
    unsafe impl aya::Pod for ForkEndpoints {}
    unsafe impl aya::Pod for RouterConfig {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockRecord {}
    unsafe impl aya::Pod for TraceControl {}
    unsafe impl aya::Pod for TraceEvent {}
    unsafe impl aya::Pod for SockOffsets {}
    unsafe impl aya::Pod for crate::origin::OriginCacheEntry {}
    unsafe impl aya::Pod for crate::peer::PeerSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_addresses_are_stored_v4_mapped() {
        let a = SockAddr::v4(u32::from_ne_bytes([10, 200, 0, 5]), 80);
        assert!(a.is_v4());
        assert_eq!(a.v4_be(), Some(u32::from_ne_bytes([10, 200, 0, 5])));
        let b = SockAddr::v6([u32::from_ne_bytes([0xfd, 0, 2, 0]), 0, 0, 1], 80);
        assert!(!b.is_v4());
        assert_eq!(b.v4_be(), None);
    }

    #[test]
    fn fork_endpoints_keep_ipv4_first_and_report_what_did_not_fit() {
        let v4 = |i: u8| SockAddr::v4(u32::from_ne_bytes([10, 200, 1, i]), 80);
        let v6 = |i: u32| SockAddr::v6([1, 0, 0, i], 80);
        let (f, dropped) = ForkEndpoints::from_endpoints(&[v6(1), v4(1), v6(2), v4(2)]);
        assert_eq!((f.count, f.count_v4, dropped), (4, 2, 0));
        assert_eq!(&f.endpoints[..4], &[v4(1), v4(2), v6(1), v6(2)]);
        assert_eq!(f.family_range(true), (0, 2));
        assert_eq!(f.family_range(false), (2, 2));
        let many: [SockAddr; 10] = core::array::from_fn(|i| v4(i as u8));
        let (f, dropped) = ForkEndpoints::from_endpoints(&many);
        assert_eq!((f.count, dropped), (MAX_FORK_ENDPOINTS as u32, 2));
        assert_eq!(f.family_range(false), (MAX_FORK_ENDPOINTS, 0));
    }
}
