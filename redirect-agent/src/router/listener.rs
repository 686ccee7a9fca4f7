//! Sockets: the router's listeners and its marked upstream connections.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// A non-blocking listener, shared by the router threads. `SO_REUSEPORT`: during an upgrade
/// the new agent binds the same address while the old one still serves, takes over the
/// liveness slot, and the old one's queued connections move to it when it closes
/// (`tcp_migrate_req`, see [`enable_request_migration`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // Each family has its own listener and liveness slot.
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Connects with `SO_MARK` set before `connect()`, so the kernel leaves this socket alone.
pub async fn connect_marked(dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    connect_socket(s, dst, mark).await
}

/// Connects a fresh TCP socket (made in whichever network namespace) with `SO_MARK` set first.
pub async fn connect_socket(s: Socket, dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_nonblocking(true)?;
    let sock = TcpSocket::from_std_stream(s.into());
    sock.connect(dst).await
}

/// Where the kernel says whether a closing listener hands its queued connections to another
/// listener of its `SO_REUSEPORT` group (Linux ≥ 5.14; per network namespace).
pub const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `tcp_migrate_req` in this network namespace, so connections queued at an old
/// router when it closes are served by its successor instead of being reset. Returns whether
/// it is on.
pub fn enable_request_migration() -> std::io::Result<bool> {
    let on = std::fs::read_to_string(MIGRATE_REQ_SYSCTL)?.trim() == "1";
    if !on {
        std::fs::write(MIGRATE_REQ_SYSCTL, "1")?;
    }
    Ok(std::fs::read_to_string(MIGRATE_REQ_SYSCTL)?.trim() == "1")
}
