//! `getpeername()` on a socket the connect programs rewrote reports the address the
//! application connected to (the ClusterIP), not the fork endpoint or the router.

use aya_ebpf::programs::SockAddrContext;
use redirect_common::{
    MAX_PEER_HINTS, MAX_PEER_SLOTS, OrigDst, PeerSlot, SockAddr, SockRecord, peer,
};

use crate::{
    connect::{context_addr, rewrite, socket_cookie},
    maps::{PEER_HINTS, PEER_SLOTS, SOCK_RECORDS},
};

/// The call proceeds either way.
const ALLOW: i32 = 1;

#[inline(always)]
pub fn run(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    let record = SOCK_RECORDS.get_ptr_mut(ctx);
    let asked = if record.is_null() {
        from_slot(ctx, ipv6)
    } else {
        // SAFETY: non-null storage of this socket, written at connect() or by an earlier call.
        Some(unsafe { (*record).orig.dst })
    };
    if let Some(peer) = asked {
        // An IPv4 socket only ever stored an IPv4 address; an IPv6 socket may hold a mapped one.
        if ipv6 || peer.is_v4() {
            rewrite(ctx, ipv6, &peer);
        }
    }
    ALLOW
}

/// The answer `connect()` left in the socket cookie's slot (`redirect_common::peer`), copied
/// into the socket's storage so that it outlives the slot.
#[inline(always)]
fn from_slot(ctx: &SockAddrContext, ipv6: bool) -> Option<SockAddr> {
    let peer = context_addr(ctx, ipv6);
    // Most sockets asking were never rewritten: this answers them without creating a cookie.
    let hint = PEER_HINTS.get(peer::hint_index(&peer, MAX_PEER_HINTS))?;
    if *hint == 0 {
        return None;
    }
    let cookie = socket_cookie(ctx);
    let slot = PEER_SLOTS.get_ptr(PeerSlot::index(cookie, MAX_PEER_SLOTS))?;
    // SAFETY: an element of an array map, copied at once; the copy's check catches a read
    // mixing two writes.
    let slot = unsafe { core::ptr::read_volatile(slot) };
    let asked = slot.answer(cookie, &peer)?;
    let mut record = SockRecord {
        orig: OrigDst {
            dst: asked,
            ..OrigDst::default()
        },
        flags: 0,
        _pad: 0,
    };
    // Best effort: without the storage the slot answers until another socket takes it.
    let _ = SOCK_RECORDS.get_or_insert_ptr_mut(ctx, Some(&mut record));
    Some(asked)
}
