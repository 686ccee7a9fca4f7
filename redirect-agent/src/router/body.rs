//! The request body sent upstream on hyper's HTTP/1 path (upgrades, CONNECT, HTTP/1.0): the
//! client's body, cut when the client sends nothing for the body-idle timeout (when set), so a
//! client that starts a body and never ends it cannot hold an upstream connection forever.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client request body: {0}")]
    Client(hyper::Error),
    #[error("the client sent no request body data for {0:?}")]
    Idle(Duration),
}

pub struct UpstreamBody {
    inner: Incoming,
    idle: Option<Duration>,
    /// Started at the first poll: the clock runs only while the upstream wants data.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl UpstreamBody {
    /// `idle`: the longest silence between two frames of the body, or `None` for no limit.
    pub fn new(inner: Incoming, idle: Option<Duration>) -> Self {
        UpstreamBody {
            inner,
            idle,
            timer: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let (Some(idle), Some(t)) = (this.idle, this.timer.as_mut()) {
                t.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::Client)));
        }
        let Some(idle) = this.idle else {
            return Poll::Pending;
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(idle)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
