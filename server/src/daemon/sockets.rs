//! The daemon's accepted sockets: `TCP_NODELAY` on each, and writes
//! coalesced until a flush that waits one turn of the scheduler (so one
//! push to many streams of a connection becomes few system calls).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The daemon's listener: every accepted connection gets `TCP_NODELAY`, as
/// gRPC servers set it (a push must not wait for the peer to acknowledge
/// the previous one), and a [`CoalescingIo`].
pub struct DaemonListener(pub TcpListener);

impl axum::serve::Listener for DaemonListener {
    type Io = CoalescingIo<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        (CoalescingIo::new(stream), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Pending bytes above which [`CoalescingIo`] writes before being flushed.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Capacity a drained [`CoalescingIo`] keeps; a burst's larger buffer is
/// freed, so idle connections stay small.
const COALESCE_KEEP: usize = 4 * 1024;

/// A connection whose writes are held until a flush, and whose flushes wait
/// one turn of the scheduler.
///
/// One push to many Watch streams wakes one task per stream, and each
/// stream's write wakes its connection's task, which tokio runs right after
/// the waking task: without this, every connection wrote each push of each
/// of its streams in its own system call (about one `writev` per
/// subscriber and push; the kernel's loopback work for each came on top).
/// Re-queueing the flush behind the tasks already runnable lets the other
/// streams of the connection add their frames first, so a push to 10,000
/// subscribers over 100 connections takes a few hundred writes instead of
/// 10,000. When nothing else is runnable the flush happens on the next poll.
pub struct CoalescingIo<T> {
    inner: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
    /// The current flush was already postponed once.
    deferred: bool,
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    /// Writes everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let rest = [IoSlice::new(&self.pending[self.written..])];
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &rest))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.pending.capacity() > COALESCE_KEEP {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.pending.len() >= COALESCE_LIMIT {
            ready!(me.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            me.pending.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pending.is_empty() {
            return Pin::new(&mut me.inner).poll_flush(cx);
        }
        if !me.deferred {
            // Waking itself puts the task at the back of the run queue.
            me.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(me.poll_drain(cx))?;
        me.deferred = false;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn coalescing_io_holds_writes_until_the_postponed_flush() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = CoalescingIo::new(near);
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two").await.unwrap();
        let mut buf = [0_u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(20), far.read(&mut buf)).await;
        assert!(early.is_err(), "nothing may reach the peer before a flush");
        let mut first = true;
        let flushed = std::future::poll_fn(|cx| {
            let r = Pin::new(&mut io).poll_flush(cx);
            if first {
                assert!(r.is_pending(), "the first flush waits one turn");
                first = false;
            }
            r
        });
        flushed.await.unwrap();
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one two");
    }

    #[tokio::test]
    async fn coalescing_io_writes_through_large_bursts_and_on_shutdown() {
        let (near, mut far) = tokio::io::duplex(4 * COALESCE_LIMIT);
        let mut io = CoalescingIo::new(near);
        let burst = vec![7_u8; COALESCE_LIMIT + 10];
        io.write_all(&burst).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        let mut got = vec![0_u8; COALESCE_LIMIT + 10];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, burst);
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    }
}
