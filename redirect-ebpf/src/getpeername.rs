//! `getpeername()` on a socket the connect programs rewrote reports the address the
//! application connected to (the ClusterIP), not the fork endpoint or the router.

use aya_ebpf::programs::SockAddrContext;

use crate::{connect::rewrite, maps::SOCK_RECORDS};

/// The call proceeds either way.
const ALLOW: i32 = 1;

#[inline(always)]
pub fn run(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    let record = SOCK_RECORDS.get_ptr_mut(ctx);
    if !record.is_null() {
        // SAFETY: non-null storage of this socket, written at connect().
        let peer = unsafe { (*record).orig.dst };
        // An IPv4 socket only ever stored an IPv4 address; an IPv6 socket may hold a mapped one.
        if ipv6 || peer.is_v4() {
            rewrite(ctx, ipv6, &peer);
        }
    }
    ALLOW
}
