//! Conversions between socket addresses and the kernel's `SockAddr`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use redirect_common::SockAddr;

/// A socket address as the kernel maps key it (IPv4 stored IPv4-mapped).
pub fn to_sockaddr(a: SocketAddr) -> SockAddr {
    match a.ip() {
        IpAddr::V4(ip) => SockAddr::v4(u32::from_ne_bytes(ip.octets()), a.port()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), a.port()),
            None => {
                let o = ip.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                SockAddr::v6([w(0), w(4), w(8), w(12)], a.port())
            }
        },
    }
}

/// The socket address a `SockAddr` stands for.
pub fn from_sockaddr(s: &SockAddr) -> SocketAddr {
    match s.v4_be() {
        Some(be) => SocketAddr::new(Ipv4Addr::from(be.to_ne_bytes()).into(), s.port),
        None => {
            let mut o = [0u8; 16];
            for (i, w) in s.ip.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            SocketAddr::new(Ipv6Addr::from(o).into(), s.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_v4_mapped_becomes_v4() {
        for a in ["10.200.1.2:80", "[fd00:200::1:2]:8080"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(from_sockaddr(&to_sockaddr(a)), a);
        }
        let mapped: SocketAddr = "[::ffff:10.200.1.2]:80".parse().unwrap();
        assert_eq!(
            from_sockaddr(&to_sockaddr(mapped)).to_string(),
            "10.200.1.2:80"
        );
    }
}
