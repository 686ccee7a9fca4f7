//! Conversions between `std::net::SocketAddr` and the maps' `SockAddr` (userspace only).
//!
//! `SockAddr` holds the address as network-order words (IPv4 as `::ffff:a.b.c.d`) and the port
//! in host order, so the conversions copy octets as they are and never swap bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::SockAddr;

/// A socket address as the kernel maps key it. An IPv4-mapped IPv6 address becomes the same
/// key as the IPv4 address it maps, since that is how the maps store IPv4.
impl From<SocketAddr> for SockAddr {
    fn from(a: SocketAddr) -> Self {
        let v6 = match a.ip() {
            IpAddr::V4(ip) => return SockAddr::v4(u32::from_ne_bytes(ip.octets()), a.port()),
            IpAddr::V6(ip) => ip,
        };
        let o = v6.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        SockAddr::v6([word(0), word(4), word(8), word(12)], a.port())
    }
}

/// The socket address a `SockAddr` stands for: IPv4 for an IPv4-mapped address, else IPv6.
impl From<&SockAddr> for SocketAddr {
    fn from(s: &SockAddr) -> Self {
        match s.v4_be() {
            Some(be) => SocketAddr::new(Ipv4Addr::from(be.to_ne_bytes()).into(), s.port),
            None => {
                let mut o = [0u8; 16];
                for (chunk, w) in o.chunks_mut(4).zip(s.ip) {
                    chunk.copy_from_slice(&w.to_ne_bytes());
                }
                SocketAddr::new(Ipv6Addr::from(o).into(), s.port)
            }
        }
    }
}

impl From<SockAddr> for SocketAddr {
    fn from(s: SockAddr) -> Self {
        SocketAddr::from(&s)
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;
    use crate::V4_MAPPED_WORD;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_is_stored_mapped_in_network_order_with_a_host_order_port() {
        let s = SockAddr::from(addr("10.200.1.2:8080"));
        assert_eq!(
            s.ip,
            [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes([10, 200, 1, 2])]
        );
        assert_eq!(s.port, 8080);
        assert_eq!(s, SockAddr::v4(u32::from_ne_bytes([10, 200, 1, 2]), 8080));
        // The words' bytes are the address's octets in order, whatever the host's endianness.
        assert_eq!(s.ip[3].to_ne_bytes(), [10, 200, 1, 2]);
    }

    #[test]
    fn ipv6_is_stored_as_network_order_words() {
        let s = SockAddr::from(addr("[fd00:2::1:9]:80"));
        assert_eq!(
            s.ip,
            [
                u32::from_ne_bytes([0xfd, 0, 0, 2]),
                0,
                0,
                u32::from_ne_bytes([0, 1, 0, 9])
            ]
        );
        assert_eq!(s.port, 80);
        assert!(!s.is_v4());
    }

    #[test]
    fn addresses_round_trip() {
        for a in [
            "10.200.1.2:80",
            "0.0.0.0:1",
            "[fd00:200::1:2]:8080",
            "[::1]:65535",
        ] {
            let a = addr(a);
            let s = SockAddr::from(a);
            assert_eq!(SocketAddr::from(&s), a);
            assert_eq!(SocketAddr::from(s), a);
        }
    }

    #[test]
    fn an_ipv4_mapped_address_comes_back_as_ipv4() {
        let mapped = SockAddr::from(addr("[::ffff:10.200.1.2]:80"));
        assert_eq!(mapped, SockAddr::from(addr("10.200.1.2:80")));
        assert_eq!(SocketAddr::from(mapped).to_string(), "10.200.1.2:80");
        assert_eq!(
            SocketAddr::from(&SockAddr::from(addr("[fd00::9]:80"))).to_string(),
            "[fd00::9]:80"
        );
    }
}
