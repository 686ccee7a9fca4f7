//! Reads through one scratch buffer per router thread: a connection's own buffer grows only by
//! the bytes that arrived, never by a read's worth of spare room. Connections come and go in
//! any order, and per-connection read buffers freed between their live neighbours would stay
//! resident (freed heap the allocator cannot return): a few hundred bytes per request head
//! instead of 4–16 KiB per connection.

use std::{cell::RefCell, io};

use tokio::{io::Interest, net::TcpStream};

/// The largest single read.
pub const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);
}

/// Reads what `s` holds now (at most [`SCRATCH_LEN`] bytes) and appends it to `into`; `Ok(0)`
/// is the end of the stream, `WouldBlock` that nothing is there.
pub fn try_read_append(s: &TcpStream, into: &mut Vec<u8>) -> io::Result<usize> {
    SCRATCH.with_borrow_mut(|b| {
        let n = s.try_read(b)?;
        into.extend_from_slice(&b[..n]);
        if n > 0 && n < b.len() {
            // A short read emptied the socket: forget its readiness, as tokio's own reads do,
            // so the next wait does not start with a read that finds nothing.
            let _ = s.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
        Ok(n)
    })
}

/// Waits until `s` has bytes (or its end) and appends them to `into`.
pub async fn read_append(s: &TcpStream, into: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match try_read_append(s, into) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn appends_exactly_what_arrived() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        server.write_all(b"hello").await.unwrap();
        let mut into = b"> ".to_vec();
        assert_eq!(read_append(&c, &mut into).await.unwrap(), 5);
        assert_eq!(into, b"> hello");
        assert!(into.capacity() < 64, "{}", into.capacity());
        let nothing = try_read_append(&c, &mut into).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        drop(server);
        assert_eq!(read_append(&c, &mut into).await.unwrap(), 0);
    }
}
