//! The shared half of `sock_ops` and `tcp_connect`: a router-bound socket's original
//! destination, copied from its socket storage into `conns_v1` keyed by the client's source
//! address, right before its SYN. The router looks it up after `accept()`.

use core::{ffi::c_void, ptr::addr_of};

use aya_ebpf::helpers::generated::{bpf_ktime_get_ns, bpf_sk_storage_get};
use redirect_common::{OrigDst, Reason, SOCK_TO_ROUTER, SockAddr, SockRecord};

use crate::maps::{CONNS, SOCK_RECORDS};

/// The original destination `connect4`/`connect6` stored for `sk` when they sent it to the
/// router; None for every other socket (no storage: answered at once) and for sockets rewritten
/// to a fork endpoint, whose record only `getpeername()` needs.
#[inline(always)]
pub fn router_bound(sk: *mut c_void) -> Option<OrigDst> {
    let map = addr_of!(SOCK_RECORDS) as *mut c_void;
    // SAFETY: `map` is the socket storage's definition and `sk` a socket the kernel handed the
    // program (the verifier checks its type); without a value and with flags 0 the helper only
    // looks up.
    let record =
        unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), 0) } as *const SockRecord;
    if record.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket, copied at once.
    let record = unsafe { *record };
    if record.flags & SOCK_TO_ROUTER == 0 {
        return None;
    }
    Some(record.orig)
}

/// Hands `orig` to the router under the connection's source address.
#[inline(always)]
pub fn store(mut orig: OrigDst, src: &SockAddr) -> Reason {
    // SAFETY: a helper without arguments.
    orig.recorded_ns = unsafe { bpf_ktime_get_ns() };
    match CONNS.insert(src, &orig, 0) {
        Ok(()) => Reason::ConnRecorded,
        Err(_) => Reason::ConnsFull,
    }
}
