//! What `getpeername()` reports for a socket `connect4`/`connect6` sent to a fork endpoint: the
//! address the application asked for (the ClusterIP), kept in a slot of `peer_slots_v1`.
//!
//! A socket storage per rewritten socket would keep that answer exactly, but creating one (an
//! allocation and its accounting) is most of a rewritten `connect()`'s time: ~1 µs, three times
//! the rest of the decision. So `connect()` writes a fixed slot instead, the
//! one at the socket's cookie modulo [`MAX_PEER_SLOTS`](crate::MAX_PEER_SLOTS) (one array write),
//! and the first `getpeername()` that finds its slot intact copies the answer into the socket's
//! storage, where it stays for the socket's life. A socket is then answered exactly when its
//! first `getpeername()` comes before another rewritten socket whose cookie falls in the same
//! slot (on the order of 64k rewritten connects later on the node); after that, it reports its
//! real peer, the fork endpoint.
//!
//! Most sockets asking are not rewritten ones, and a socket's cookie is created on first use,
//! which costs more than the rest of the program. So `getpeername()` first checks a small array
//! of hints, `peer_hints_v1`, indexed by a hash of the peer: `connect()` sets the hint of every
//! fork endpoint it sends a socket to, and only a socket whose peer's hint is set looks for its
//! slot. Hints are never cleared: a stale or shared one only costs that lookup.
//!
//! A slot is used only for the socket it was written for, still connected where `connect()`
//! sent it: the entry holds the cookie and that endpoint, and `getpeername()` compares both
//! (a socket that failed to connect and then connected elsewhere reports where it is). Slots are
//! overwritten while other CPUs may read them, so each carries a check word over every field,
//! as `origin_cache_v1`'s entries do: a read mixing two entries fails the check and is a miss.

use core::mem::size_of;

use crate::{SockAddr, origin::mix};

/// Value of `peer_slots_v1`, an array indexed by [`PeerSlot::index`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSlot {
    /// The socket's cookie (`bpf_get_socket_cookie`, never 0 for a socket).
    pub cookie: u64,
    /// The address the application asked for: what `getpeername()` reports.
    pub asked: SockAddr,
    /// The fork endpoint `connect()` sent the socket to.
    pub sent_to: SockAddr,
    /// [`PeerSlot::check_of`] the fields above.
    pub check: u64,
}
const _: () = assert!(size_of::<PeerSlot>() == 56);

impl PeerSlot {
    /// The slot for the socket with `cookie`, of `slots` (a power of two).
    #[inline(always)]
    pub const fn index(cookie: u64, slots: u32) -> u32 {
        (cookie as u32) & (slots - 1)
    }

    #[inline(always)]
    pub fn new(cookie: u64, asked: SockAddr, sent_to: SockAddr) -> Self {
        let mut s = PeerSlot {
            cookie,
            asked,
            sent_to,
            check: 0,
        };
        s.check = s.check_of();
        s
    }

    /// The check word over every other field.
    #[inline(always)]
    pub const fn check_of(&self) -> u64 {
        let [a0, a1] = words(&self.asked);
        let [s0, s1] = words(&self.sent_to);
        let ports = ((self.asked.port as u64) << 16) | self.sent_to.port as u64;
        let mut h = mix(self.cookie ^ 0x7065_6572_736c_6f74);
        h = mix(h ^ a0);
        h = mix(h ^ a1);
        h = mix(h ^ s0);
        h = mix(h ^ s1);
        mix(h ^ ports)
    }

    /// What `getpeername()` reports for the socket with `cookie` whose peer is `peer`: the
    /// address asked for, when this slot was written for that socket and that peer and was read
    /// whole; else `None` (the socket's real peer stands).
    #[inline(always)]
    pub fn answer(&self, cookie: u64, peer: &SockAddr) -> Option<SockAddr> {
        if self.cookie != cookie
            || self.sent_to.ip != peer.ip
            || self.sent_to.port != peer.port
            || self.check != self.check_of()
        {
            return None;
        }
        Some(self.asked)
    }
}

/// The index in `peer_hints_v1` (of `hints` entries, a power of two) for a socket whose peer
/// is `peer`.
#[inline(always)]
pub const fn hint_index(peer: &SockAddr, hints: u32) -> u32 {
    let [w0, w1] = words(peer);
    (mix(w0 ^ w1.rotate_left(17) ^ peer.port as u64) as u32) & (hints - 1)
}

/// An address's IP as two 64-bit words.
#[inline(always)]
const fn words(a: &SockAddr) -> [u64; 2] {
    [
        ((a.ip[0] as u64) << 32) | a.ip[1] as u64,
        ((a.ip[2] as u64) << 32) | a.ip[3] as u64,
    ]
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    const VIP: SockAddr = SockAddr::v4(0x1400_00c8, 80);
    const EP: SockAddr = SockAddr::v4(0x0501_c80a, 8080);

    #[test]
    fn a_slot_answers_only_its_own_socket_still_connected_where_it_was_sent() {
        let slot = PeerSlot::new(42, VIP, EP);
        assert_eq!(slot.answer(42, &EP), Some(VIP));
        // Another socket whose cookie falls in the same slot.
        assert_eq!(slot.answer(42 + 65_536, &EP), None);
        // The same socket, connected elsewhere after a failed connect.
        assert_eq!(slot.answer(42, &SockAddr::v4(0x0501_c80a, 8081)), None);
        assert_eq!(slot.answer(42, &SockAddr::v4(0x0601_c80a, 8080)), None);
        // An empty slot answers nobody.
        assert_eq!(PeerSlot::default().answer(0, &SockAddr::default()), None);
    }

    #[test]
    fn a_read_mixing_two_entries_fails_the_check() {
        let a = PeerSlot::new(7, VIP, EP);
        let other_vip = SockAddr::v6([0xfd00_0000, 0, 0, 0x20], 443);
        let b = PeerSlot::new(7 + 65_536, other_vip, EP);
        // Every split of the fields between the two entries, but the whole of either.
        for mask in 1..0b1111u32 {
            let pick = |bit: u32| mask & (1 << bit) != 0;
            let torn = PeerSlot {
                cookie: if pick(0) { b.cookie } else { a.cookie },
                asked: if pick(1) { b.asked } else { a.asked },
                sent_to: if pick(2) { b.sent_to } else { a.sent_to },
                check: if pick(3) { b.check } else { a.check },
            };
            if torn == a || torn == b {
                continue;
            }
            for cookie in [a.cookie, b.cookie] {
                assert_eq!(torn.answer(cookie, &EP), None, "{mask:04b}");
            }
        }
    }

    #[test]
    fn every_field_changes_the_check() {
        let s = PeerSlot::new(9, VIP, EP);
        let changes: [fn(&mut PeerSlot); 5] = [
            |v| v.cookie ^= 1,
            |v| v.asked.ip[3] ^= 1,
            |v| v.asked.port ^= 1,
            |v| v.sent_to.ip[0] ^= 1,
            |v| v.sent_to.port ^= 1,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            let mut v = s;
            change(&mut v);
            assert_ne!(v.check_of(), s.check, "change {i}");
        }
        assert_eq!(PeerSlot::index(65_536 + 5, 65_536), 5);
    }

    #[test]
    fn hints_spread_neighbouring_endpoints() {
        // Pod addresses of one node and one port: no two share a hint among 64 of 4096.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64u8 {
            let ep = SockAddr::v4(u32::from_ne_bytes([10, 200, 1, i]), 8080);
            let h = hint_index(&ep, 4096);
            assert!(h < 4096);
            seen.insert(h);
        }
        assert!(seen.len() >= 62, "{}", seen.len());
        let v6 = SockAddr::v6([0xfd00_0200, 0, 0, 1], 8080);
        assert_ne!(
            hint_index(&v6, 4096),
            hint_index(&SockAddr::v6([0xfd00_0200, 0, 0, 1], 8081), 4096)
        );
    }
}
