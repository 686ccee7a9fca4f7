//! redirect's kernel programs. Entry points are one line each; the decisions live in
//! `connect.rs`, `record.rs`, `sock_ops.rs` and `tcp_connect.rs`, the maps in `maps.rs`, all
//! types in `redirect-common`.
#![no_std]
#![no_main]
// Every `unsafe` says why it is sound; `cargo xtask lint-ebpf` enforces it.
#![deny(clippy::undocumented_unsafe_blocks)]

mod connect;
mod counters;
mod getpeername;
mod maps;
mod record;
mod sock_ops;
mod tcp_connect;
mod trace;

use aya_ebpf::{
    macros::{cgroup_sock_addr, fentry, sock_ops},
    programs::{FEntryContext, SockAddrContext, SockOpsContext},
};

/// `connect()` on IPv4 sockets.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    connect::run(&ctx, false)
}

/// `connect()` on IPv6 sockets, including IPv4-mapped destinations.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    connect::run(&ctx, true)
}

/// `getpeername()` on IPv4 sockets: the address the application asked for.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername::run(&ctx, false)
}

/// `getpeername()` on IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername::run(&ctx, true)
}

/// Records a redirected connection's original destination by its source address (the fallback
/// before Linux 5.11).
#[sock_ops]
pub fn redirect_sock_ops(ctx: SockOpsContext) -> u32 {
    sock_ops::run(&ctx)
}

/// Records a redirected connection's original destination by its source address, once per TCP
/// connect.
#[fentry(function = "tcp_connect")]
pub fn redirect_tcp_connect(ctx: FEntryContext) -> i32 {
    tcp_connect::run(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
