//! Copies the original destination of a socket sent to the router into `conns_v1`, keyed by the
//! client's source address, right before its SYN: the router looks it up after `accept()`.

use core::{ffi::c_void, ptr::addr_of};

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::generated::{bpf_ktime_get_ns, bpf_sk_storage_get},
    programs::SockOpsContext,
};
use redirect_common::{Reason, SOCK_TO_ROUTER, SockAddr, SockRecord};

use crate::{
    counters::count,
    maps::{CONNS, SOCK_RECORDS},
};

const AF_INET: u32 = 2;
/// sock_ops programs report success; the value is not a verdict for these ops.
const OK: u32 = 1;

#[inline(always)]
pub fn run(ctx: &SockOpsContext) -> u32 {
    // Runs ~9 times per connection: leave at once unless this is the connect callback.
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return OK;
    }
    if let Some(reason) = record(ctx) {
        count(reason);
    }
    OK
}

#[inline(always)]
fn record(ctx: &SockOpsContext) -> Option<Reason> {
    // SAFETY: context pointer valid for the run; `sk` is checked for null before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let map = addr_of!(SOCK_RECORDS) as *mut c_void;
    // SAFETY: `map` is the socket storage's definition, `sk` a non-null socket from the context;
    // without a value to insert and with flags 0 the helper only looks up (and a socket without
    // storage, every socket that was not rewritten, answers at once).
    let record = unsafe { bpf_sk_storage_get(map, sk as *mut c_void, core::ptr::null_mut(), 0) }
        as *const SockRecord;
    if record.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket.
    let record = unsafe { *record };
    if record.flags & SOCK_TO_ROUTER == 0 {
        // Rewritten to a fork endpoint: only `getpeername()` needs the record.
        return None;
    }
    let ops = ctx.ops;
    // Every context field is read unconditionally, one by one at its fixed offset: the verifier
    // rejects loads through a moved context pointer, which is what LLVM emits when it merges
    // per-family loads into one load at a selected offset.
    // SAFETY: the context pointer is valid for the program's run; the verifier checks each read.
    let (family, port, ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_port) as u16,
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    let src = if family == AF_INET {
        SockAddr::v4(ip4, port)
    } else {
        SockAddr::v6(ip6, port)
    };
    let mut value = record.orig;
    // SAFETY: a helper without arguments.
    value.recorded_ns = unsafe { bpf_ktime_get_ns() };
    Some(match CONNS.insert(&src, &value, 0) {
        Ok(()) => Reason::ConnRecorded,
        Err(_) => Reason::ConnsFull,
    })
}
