//! `connect4`/`connect6`: `redirect_common::connect::decide` over the socket being connected
//! and the maps, then the rewrite it asks for.

use core::{ffi::c_void, ptr::addr_of};

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release,
    },
    programs::SockAddrContext,
};
use redirect_common::{
    ForkEndpoints, ForkKey, MAX_FORK_ENDPOINTS, MAX_PEER_HINTS, MAX_PEER_SLOTS, OrigDst,
    OriginCacheEntry, PeerSlot, RouterConfig, SOCK_TO_ROUTER, SockAddr, SockRecord,
    connect::{ConnectEnv, decide},
    origin::{self, OriginLookups},
    peer,
};

use crate::{
    counters::count,
    maps::{
        FORKS, ORIGIN_CACHE, ORIGIN_GEN, PEER_HINTS, PEER_SLOTS, ROUTER, ROUTER_SOCKS, SERVICES,
        SOCK_RECORDS, WORKLOADS,
    },
    trace,
};

const IPPROTO_TCP: u32 = 6;
/// `connect()` proceeds; the programs never refuse a connection (fail open).
const ALLOW: i32 = 1;

#[inline(always)]
pub fn run(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    // Checked first: when nobody traces, tracing costs this one array lookup.
    let trace_mode = trace::mode();
    let d = decide(&Kernel { ctx, ipv6 }, &mut ());
    if let Some(to) = d.rewrite.get() {
        rewrite(ctx, ipv6, &to);
    }
    count(d.reason);
    if trace_mode != redirect_common::TRACE_OFF {
        trace::emit(trace_mode, ipv6, &d);
    }
    ALLOW
}

/// The decision's view of the kernel: the socket being connected, helpers and the maps.
struct Kernel<'a> {
    ctx: &'a SockAddrContext,
    ipv6: bool,
}

impl ConnectEnv for Kernel<'_> {
    #[inline(always)]
    fn tcp_destination(&self) -> Option<SockAddr> {
        // SAFETY: the context pointer is valid for the program's run.
        if unsafe { (*self.ctx.sock_addr).protocol } != IPPROTO_TCP {
            return None;
        }
        Some(context_addr(self.ctx, self.ipv6))
    }

    #[inline(always)]
    fn service(&self, dst: &SockAddr) -> Option<u32> {
        // SAFETY: `services_v1` is `BPF_F_NO_PREALLOC` and the programs never insert into or
        // remove from it, so the value is not recycled while the reference lives.
        unsafe { SERVICES.get(dst) }.map(|s| s.service_id)
    }

    #[inline(always)]
    fn router(&self) -> Option<&RouterConfig> {
        ROUTER.get(0)
    }

    #[inline(always)]
    fn socket_mark(&self) -> u32 {
        // SAFETY: in cgroup_sock_addr programs the union holds `sk`, the socket being connected.
        let sk = unsafe { (*self.ctx.sock_addr).__bindgen_anon_1.sk };
        if sk.is_null() {
            return 0;
        }
        // SAFETY: `sk` is non-null; the verifier checks the read of its field.
        unsafe { (*sk).mark }
    }

    #[inline(always)]
    fn caller(&self) -> Option<(u64, u32)> {
        // SAFETY: no arguments; returns the current task's cgroup id.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        origin::caller_key(&KernelOrigin, cgroup_id)
    }

    #[inline(always)]
    fn fork(&self, key: &ForkKey) -> Option<&ForkEndpoints> {
        // SAFETY: as for `services_v1`: `forks_v1` is `BPF_F_NO_PREALLOC` and only read here.
        unsafe { FORKS.get(key) }
    }

    #[inline(always)]
    fn pick(&self, start: usize, n: usize) -> usize {
        // SAFETY: a helper without arguments.
        let i = start + (unsafe { bpf_get_prandom_u32() } as usize) % n;
        // The verifier does not track `%`, and LLVM would drop a plain mask as redundant: the
        // volatile read hides the bound from LLVM so the mask (a power of two) stays.
        // SAFETY: `i` is a live, aligned local.
        unsafe { core::ptr::read_volatile(&i) & (MAX_FORK_ENDPOINTS - 1) }
    }

    #[inline(always)]
    fn router_alive(&self, slot: u32) -> bool {
        router_alive(slot)
    }

    /// Records what `getpeername()` reports instead of the fork endpoint or the router: for a
    /// fork endpoint, in the socket cookie's slot (`redirect_common::peer`: an array write,
    /// where a socket storage costs an allocation); for the router, in the socket's storage,
    /// with the original destination the record hook hands on. A reconnect overwrites either.
    #[inline(always)]
    fn remember(&self, dst: &SockAddr, to: &SockAddr, service_id: u32, to_router: bool) -> bool {
        if !to_router {
            let cookie = socket_cookie(self.ctx);
            let Some(slot) = PEER_SLOTS.get_ptr_mut(PeerSlot::index(cookie, MAX_PEER_SLOTS)) else {
                return false;
            };
            // SAFETY: an element of an array map, written whole; a concurrent reader checks it.
            unsafe { *slot = PeerSlot::new(cookie, *dst, *to) };
            if let Some(hint) = PEER_HINTS.get_ptr_mut(peer::hint_index(to, MAX_PEER_HINTS)) {
                // Written once: a store on every connect would bounce the line between CPUs.
                // SAFETY: an element of an array map; a plain store, as every writer stores 1.
                unsafe {
                    if *hint == 0 {
                        *hint = 1;
                    }
                }
            }
            return true;
        }
        let mut record = SockRecord {
            orig: OrigDst {
                dst: *dst,
                service_id,
                // SAFETY: a helper without arguments.
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                recorded_ns: 0,
            },
            flags: SOCK_TO_ROUTER,
            _pad: 0,
        };
        let stored = SOCK_RECORDS.get_or_insert_ptr_mut(self.ctx, Some(&mut record));
        if stored.is_null() {
            return false;
        }
        // SAFETY: non-null storage of this socket; an existing record (a reconnect) is
        // overwritten.
        unsafe { *stored = record };
        true
    }
}

/// The address the context holds: the destination in `connect4`/`6`, the peer in
/// `getpeername4`/`6`.
#[inline(always)]
pub fn context_addr(ctx: &SockAddrContext, ipv6: bool) -> SockAddr {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if ipv6 {
        SockAddr::v6(
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            port,
        )
    } else {
        SockAddr::v4(sa.user_ip4, port)
    }
}

/// The socket's cookie (given one on first use; never 0).
#[inline(always)]
pub fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) }
}

/// The caller lookup's view of the kernel: helpers and the pinned maps.
struct KernelOrigin;

impl OriginLookups for KernelOrigin {
    #[inline(always)]
    fn generation(&self) -> u64 {
        ORIGIN_GEN.get(0).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn cached(&self, cgroup_id: u64) -> Option<OriginCacheEntry> {
        // Copied at once: an LRU element may be recycled under us; the entry's check catches it.
        ORIGIN_CACHE
            .get_ptr(&cgroup_id)
            // SAFETY: a non-null map value pointer, read once into a local copy.
            .map(|p| unsafe { core::ptr::read_volatile(p) })
    }

    #[inline(always)]
    fn ancestor(&self, level: i32) -> u64 {
        // SAFETY: returns 0 for a level past the task's own cgroup.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    }

    #[inline(always)]
    fn workload_key(&self, cgroup_id: u64) -> Option<u32> {
        // SAFETY: the value is read at once, not held across helper calls.
        unsafe { WORKLOADS.get(&cgroup_id) }.map(|w| w.key_id)
    }

    #[inline(always)]
    fn remember(&self, cgroup_id: u64, entry: &OriginCacheEntry) {
        // Best effort: without the entry the next connect walks again.
        let _ = ORIGIN_CACHE.insert(&cgroup_id, entry, 0);
    }
}

/// Whether the router's listener for this family sits in the liveness sockmap.
#[inline(always)]
fn router_alive(slot: u32) -> bool {
    let map = addr_of!(ROUTER_SOCKS) as *mut c_void;
    // SAFETY: `map` is the sockmap's definition and the key points to a live `u32`, the map's
    // key type.
    let sk = unsafe { bpf_map_lookup_elem(map, addr_of!(slot) as *const c_void) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a sockmap lookup takes a reference on the socket that must be released.
    unsafe { bpf_sk_release(sk) };
    true
}

/// Writes the new destination. Each field separately and volatile: adjacent 4-byte context
/// stores merged into one 8-byte store are rejected by the verifier.
#[inline(always)]
pub fn rewrite(ctx: &SockAddrContext, ipv6: bool, to: &SockAddr) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run, and these fields are writable
    // in connect4/6 and getpeername4/6 (the verifier checks each store).
    unsafe {
        if ipv6 {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], to.ip[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], to.ip[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], to.ip[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], to.ip[3]);
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, to.ip[3]);
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(to.port.to_be()));
    }
}
