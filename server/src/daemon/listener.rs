//! Serving connections on the daemon's one port: a cap on open
//! connections, deadlines on what a client must send before it costs more
//! than a socket, HTTP/2 keep-alive pings, and a graceful drain.
//!
//! Without these a client could hold the daemon's connections open for
//! free: a connection that never sends a byte, or sends a request head one
//! byte a minute (slowloris), would keep its socket, buffers and task for
//! good, and enough of them exhaust the process's file descriptors.
//!
//! - **Connection cap** (`limits.max_connections`): a connection accepted
//!   beyond it is closed at once and counted in
//!   `strata_connections_refused_total`.
//! - **Greeting deadline**: the first bytes that tell HTTP/1.1 from HTTP/2
//!   (24, the length of the HTTP/2 preface) must arrive within
//!   `limits.header_read_timeout` of the accept.
//! - **HTTP/1.1 head deadline**: each request head must be complete within
//!   `limits.header_read_timeout` (hyper's own timer).
//! - **HTTP/2 keep-alive**: a ping every 30 s, and a connection whose peer
//!   does not answer one within 20 s is closed; idle watch connections
//!   stay open, dead ones do not.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;

use crate::app::limits::ConnectionLimits;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes a client must send before the greeting deadline: the HTTP/2
/// connection preface, which also covers any HTTP/1.1 request line start.
const GREETING_BYTES: usize = 24;

/// Time between HTTP/2 keep-alive pings.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// How long a peer has to answer a keep-alive ping.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Most concurrent streams (calls and watches) on one HTTP/2 connection
/// (hyper's default, stated so it is a documented bound).
const H2_MAX_STREAMS: u32 = 200;

/// Serves `app` on `listener` until `stopped` completes, then stops
/// accepting, asks every connection to finish its in-flight requests and
/// returns once all have closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    stopped: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: axum::serve::Listener,
    L::Io: Send + 'static,
{
    let permits =
        (limits.max_connections != 0).then(|| Arc::new(Semaphore::new(limits.max_connections)));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    tokio::pin!(stopped);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => break,
        };
        let permit = match &permits {
            None => None,
            Some(permits) => match Arc::clone(permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    // Dropping the socket closes it: the client sees the
                    // connection end and can try another replica.
                    metrics::counter!("strata_connections_refused_total").increment(1);
                    tracing::debug!(
                        limit = limits.max_connections,
                        "connection refused: limits.max_connections reached"
                    );
                    continue;
                }
            },
        };
        let io = GuardedIo::new(io, permit, limits.header_read_timeout);
        let router = app.clone();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            tower::ServiceExt::oneshot(router.clone(), request)
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A connection holding its place under the cap, and failing its reads
/// when the client has not sent its greeting in time.
struct GuardedIo<T> {
    inner: T,
    _permit: Option<OwnedSemaphorePermit>,
    /// Until the greeting is in: the deadline and the bytes still owed.
    greeting: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<T> GuardedIo<T> {
    fn new(inner: T, permit: Option<OwnedSemaphorePermit>, deadline: Duration) -> Self {
        Self {
            inner,
            _permit: permit,
            greeting: Some((Box::pin(tokio::time::sleep(deadline)), GREETING_BYTES)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some((deadline, owed)) = &mut this.greeting else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                // Zero bytes is the end of the stream; hyper handles that.
                *owed = owed.saturating_sub(got);
                if *owed == 0 || got == 0 {
                    this.greeting = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent no request within limits.header_read_timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
