//! The record hook on Linux 5.11+: `fentry` on the kernel's `tcp_connect()`, which runs once per
//! TCP connect (the source port is bound by then, the SYN not yet sent: the same moment as
//! `sock_ops`' `TCP_CONNECT_CB`). It runs for every TCP connect of the node, so it first compares
//! the destination port with the router's (one load, no helper call) and only then looks for
//! the socket's record (see `record.rs`).
//!
//! `struct sock`'s layout is the kernel's: the agent writes the offsets of the source fields
//! into `SOCK_OFFSETS` from the kernel's BTF before loading, and those reads go through
//! `bpf_probe_read_kernel`, so a wrong offset can only yield a wrong address, never a fault.
//! The port compare is a plain load at `SOCK_DPORT_OFFSET`, which the verifier checks against
//! the BTF and the agent checks against the kernel's offset before loading.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::FEntryContext};
use redirect_common::{SOCK_DPORT_OFFSET, SockAddr, SockOffsets};

use crate::{counters::count, record};

const AF_INET: u16 = 2;

/// Filled by the agent (`GLOBAL_SOCK_OFFSETS`); all zero in the object as built.
#[unsafe(no_mangle)]
static SOCK_OFFSETS: SockOffsets = SockOffsets {
    ready: 0,
    family: 0,
    rcv_saddr: 0,
    num: 0,
    v6_rcv_saddr: 0,
    dport: 0,
    router_dport4: 0,
    router_dport6: 0,
};

#[inline(always)]
pub fn run(ctx: &FEntryContext) {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return;
    }
    // SAFETY: a read of a static; volatile so LLVM keeps the load the agent's value fills.
    let off = unsafe { core::ptr::read_volatile(&SOCK_OFFSETS) };
    if off.ready == 0 {
        return;
    }
    // SAFETY: `sk` is the traced function's `struct sock *`; the verifier checks this load at a
    // constant offset against the kernel's BTF and makes it fault-safe.
    let dport =
        unsafe { core::ptr::read_volatile(sk.cast::<u8>().add(SOCK_DPORT_OFFSET).cast::<u16>()) };
    if dport != off.router_dport4 && dport != off.router_dport6 {
        return;
    }
    let Some(orig) = record::router_bound(sk) else {
        return;
    };
    if let Some(src) = source(sk as *const u8, &off) {
        count(record::store(orig, &src));
    }
}

/// The socket's bound source address, as `sock_ops` reports it: the IPv4 fields for an
/// `AF_INET` socket, the IPv6 ones (an IPv4-mapped address included) otherwise.
#[inline(always)]
fn source(sk: *const u8, off: &SockOffsets) -> Option<SockAddr> {
    let family: u16 = read(sk, off.family)?;
    let port: u16 = read(sk, off.num)?;
    Some(if family == AF_INET {
        SockAddr::v4(read(sk, off.rcv_saddr)?, port)
    } else {
        SockAddr::v6(read(sk, off.v6_rcv_saddr)?, port)
    })
}

/// The `T` at byte `offset` of the socket.
#[inline(always)]
fn read<T>(sk: *const u8, offset: u32) -> Option<T> {
    // SAFETY: `bpf_probe_read_kernel` checks the address and fails instead of faulting;
    // `wrapping_add` makes no claim about where the result points.
    unsafe { bpf_probe_read_kernel(sk.wrapping_add(offset as usize).cast::<T>()) }.ok()
}
