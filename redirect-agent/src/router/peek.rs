//! An upstream TCP stream that the pool can still inspect while hyper owns it: before an idle
//! HTTP/1 connection is reused, the pool checks that nothing arrived on it since its last
//! response (an unrequested response would otherwise answer the next request).

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// The stream handed to hyper.
pub struct PeekableStream(Arc<TcpStream>);

/// The pool's view of the same socket.
#[derive(Clone)]
pub struct Peek(Arc<TcpStream>);

/// The stream and a handle to inspect it.
pub fn peekable(s: TcpStream) -> (PeekableStream, Peek) {
    let s = Arc::new(s);
    (PeekableStream(s.clone()), Peek(s))
}

impl Peek {
    /// Whether the socket is quiet: no unread bytes, no end of stream, no error. A non-blocking
    /// `MSG_PEEK`, which neither consumes data nor disturbs the runtime's readiness tracking.
    pub fn is_quiet(&self) -> bool {
        let mut buf = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&*self.0).peek(&mut buf) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // Unread bytes, or the upstream closed its side.
            Ok(_) => false,
        }
    }
}

impl AsyncRead for PeekableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; `try_read` cleared it, so the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PeekableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn unread_bytes_and_a_closed_peer_are_not_quiet() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let (mut stream, peek) = peekable(c);
        assert!(peek.is_quiet());
        server.write_all(b"x").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!peek.is_quiet(), "an unread byte");
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.unwrap();
        assert!(peek.is_quiet(), "read: quiet again");
        stream.write_all(b"y").await.unwrap();
        server.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!peek.is_quiet(), "the peer closed");
    }
}
