//! A socket wrapper that cuts a client whose socket accepts no bytes for `write_timeout`.
//!
//! Every write (and flush, and shutdown) that cannot make progress starts a timer; any progress resets it.
//! When it runs out, that and every later write fails with `TimedOut`, which ends whatever is writing: hyper's
//! connection (responses, SSE streams) or the WebSocket loop. Reads pass through untouched.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::time::{sleep, Sleep};

use crate::metrics::{Metrics, Refusal};

pub(crate) struct TimedIo<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
    metrics: Arc<Metrics>,
}

impl<S> TimedIo<S> {
    pub fn new(inner: S, limit: Duration, metrics: Arc<Metrics>) -> TimedIo<S> {
        TimedIo {
            inner,
            limit,
            stalled: None,
            timed_out: false,
            metrics,
        }
    }

    /// A write is pending: `Ready(Err)` once it has been for `limit`.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timed_out = true;
            self.stalled = None;
            self.metrics.refused(Refusal::WriteTimeout);
            return Poll::Ready(Err(timed_out()));
        }
        Poll::Pending
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client did not accept writes within write_timeout",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(r, cx)
    }
}

/// The connection's byte stream, shared, so the server can still answer `408` on it after hyper gave up
/// waiting for a request head (hyper closes without a word). It remembers whether the client sent anything
/// since the server last wrote, to tell a slow request (408) from an idle keep-alive connection (closed
/// silently). Only one task uses it at a time; the lock is never held across an await.
pub(crate) struct SharedIo<I>(Arc<std::sync::Mutex<Shared<I>>>);

struct Shared<I> {
    io: I,
    heard: bool,
}

impl<I> SharedIo<I> {
    pub fn new(io: I) -> SharedIo<I> {
        SharedIo(Arc::new(std::sync::Mutex::new(Shared { io, heard: false })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared<I>) -> T) -> T {
        let mut s = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s)
    }

    /// Whether the client sent bytes after the server's last write (a request head is under way).
    pub fn heard_since_answer(&self) -> bool {
        self.with(|s| s.heard)
    }
}

impl<I> Clone for SharedIo<I> {
    fn clone(&self) -> Self {
        SharedIo(self.0.clone())
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SharedIo<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.with(|s| {
            let before = buf.filled().len();
            let r = Pin::new(&mut s.io).poll_read(cx, buf);
            if buf.filled().len() > before {
                s.heard = true;
            }
            r
        })
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SharedIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.with(|s| {
            let r = Pin::new(&mut s.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                s.heard = false;
            }
            r
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with(|s| {
            let r = Pin::new(&mut s.io).poll_write_vectored(cx, bufs);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                s.heard = false;
            }
            r
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.with(|s| s.io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| Pin::new(&mut s.io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| Pin::new(&mut s.io).poll_shutdown(cx))
    }
}
