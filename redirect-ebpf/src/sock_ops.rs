//! The fallback record hook (kernels before 5.11, whose tracing programs cannot read socket
//! storage): a `sock_ops` program at the cgroup root, run for every callback of every socket
//! below it, which records at `TCP_CONNECT_CB` (see `record.rs`).

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, programs::SockOpsContext};
use redirect_common::{Reason, SockAddr};

use crate::{counters::count, record};

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
    let orig = record::router_bound(sk as *mut c_void)?;
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
    Some(record::store(orig, &src))
}
