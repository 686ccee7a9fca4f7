//! Opaque connections: bytes copied both ways until either side closes or, with an idle limit,
//! until no byte moved in either direction for that long.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A side closed (or failed).
    Closed,
    /// Nothing moved for the idle limit.
    Idle,
}

/// Copies between `a` and `b`; `idle`: the longest silence in both directions, `None` for no
/// limit.
pub async fn tunnel<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        return tokio::io::copy_bidirectional(a, b)
            .await
            .map(|_| Ended::Closed);
    };
    let start = Instant::now();
    // Milliseconds from `start` to the last byte moved either way.
    let last = AtomicU64::new(0);
    let mut a = Active {
        inner: a,
        start,
        last: &last,
    };
    let mut b = Active {
        inner: b,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet_until = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            r = &mut copy => return r.map(|_| Ended::Closed),
            _ = tokio::time::sleep_until(quiet_until) => {
                let moved = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if moved + idle <= Instant::now() {
                    return Ok(Ended::Idle);
                }
            }
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Active<'a, S> {
    inner: &'a mut S,
    start: Instant,
    last: &'a AtomicU64,
}

impl<S> Active<'_, S> {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_limit_and_traffic_keeps_it_open() {
        let (mut a, mut a_peer) = duplex(64);
        let (mut b, mut b_peer) = duplex(64);
        let t = tokio::spawn(
            async move { tunnel(&mut a, &mut b, Some(Duration::from_secs(10))).await },
        );
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            a_peer.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            b_peer.read_exact(&mut got).await.unwrap();
        }
        assert!(
            !t.is_finished(),
            "traffic every 6 s keeps a 10 s limit open"
        );
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(t.await.unwrap().unwrap(), Ended::Idle);
    }
}
