//! Limits on the sidecar's listeners (docs/security.md, "Slow and idle
//! connections" and "Connection floods"): a cap on open connections per
//! listener, and the timeouts that keep a slow or silent client from holding
//! one for ever.
//!
//! - `max_connections`: each listener (outbound, inbound, admin, every TCP
//!   route) serves at most this many connections at once. One more is
//!   accepted and refused at once — an HTTP listener answers `503` naming
//!   the setting, a TCP route closes it — so a flood costs a bounded
//!   amount of memory and file descriptors and callers get a clear answer
//!   instead of a connect that hangs in the kernel's backlog.
//! - `header_read_timeout`: a request head must arrive whole within this
//!   time of its first byte (hyper's `header_read_timeout` on the hyper
//!   path, the fast path's own timer on the fast path).
//! - `idle_timeout`: a connection that moved no byte for this long closes
//!   gracefully (HTTP/2: GOAWAY, streams in progress finish).
//!
//! Every refusal and timeout is counted in
//! `strata_sidecar_limit_hits_total{limit}`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::shutdown::Shutdown;
use crate::upstream::ProxyBody;

/// The limits every listener applies, with the counters of their hits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a request head may take from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may stay without a byte either way (HTTP/1.1:
    /// between requests).
    pub idle_timeout: Duration,
    /// Most connections per listener.
    pub max_connections: usize,
    /// `strata_sidecar_limit_hits_total{limit="header_read_timeout"}`.
    pub header_timeouts: Counter,
    /// `strata_sidecar_limit_hits_total{limit="idle_timeout"}`.
    pub idle_timeouts: Counter,
    /// `strata_sidecar_limit_hits_total{limit="max_connections"}`.
    pub refused: Counter,
}

impl Limits {
    /// The limits of `settings`, counted for `project`.
    pub fn new(settings: &crate::Settings) -> Self {
        let hits = |limit| crate::metrics::limit_hits(&settings.project, limit);
        Self {
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
            header_timeouts: hits("header_read_timeout"),
            idle_timeouts: hits("idle_timeout"),
            refused: hits("max_connections"),
        }
    }

    /// The hyper server builder for HTTP/1.1 and h2c connections with
    /// these limits: hyper's header read timeout (whose timer, on an
    /// HTTP/1.1 keep-alive connection, also runs while it waits for the
    /// next request).
    pub(crate) fn hyper_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(1024);
        builder
    }
}

/// Concurrent refusals being written: past this, an excess connection is
/// closed without an answer, so a flood cannot grow the refusal tasks.
const MAX_REFUSING: usize = 64;

/// How long a refused HTTP connection may take to receive its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// One listener's connection cap.
#[derive(Debug)]
pub struct Gate {
    /// The listener, for logs and the 503's message.
    name: String,
    /// Whether refusals get an HTTP answer.
    http: bool,
    max: usize,
    permits: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    refused: Counter,
}

impl Gate {
    /// A cap of `limits.max_connections` for the listener `name`; `http`:
    /// refused connections get a 503.
    pub fn new(name: impl Into<String>, http: bool, limits: &Limits) -> Self {
        Self {
            name: name.into(),
            http,
            max: limits.max_connections,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            refused: limits.refused.clone(),
        }
    }

    /// The next connection this listener may serve (Nagle off) and its
    /// place under the cap, held until it is dropped. Connections beyond
    /// the cap are refused on the way.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Permit) {
        loop {
            let (stream, peer) = accept(listener).await;
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => return (stream, peer, Permit { _permit: permit }),
                Err(_) => self.refuse(stream, peer),
            }
        }
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr) {
        self.refused.increment(1);
        tracing::debug!(listener = %self.name, %peer, max = self.max, "connection refused: max_connections");
        if !self.http {
            return;
        }
        let Ok(slot) = Arc::clone(&self.refusing).try_acquire_owned() else {
            return;
        };
        let answer = refusal(&self.name, self.max);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                stream.write_all(&answer).await?;
                stream.shutdown().await?;
                // Read what the caller sent before closing: closing with
                // unread bytes would reset the connection and could
                // destroy the 503 before the caller reads it.
                let mut sink = [0u8; 4096];
                let mut left = 64 * 1024usize;
                while left > 0 {
                    let n = stream.read(&mut sink).await?;
                    if n == 0 {
                        break;
                    }
                    left = left.saturating_sub(n);
                }
                Ok::<_, io::Error>(())
            })
            .await;
        });
    }
}

/// The 503 a connection beyond the cap gets.
fn refusal(listener: &str, max: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "error": {
            "code": "unavailable",
            "message": format!(
                "the sidecar's {listener} listener already serves {max} connections, \
                 its limit (max_connections); try again later"
            ),
        }
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connection's place under its listener's cap.
#[derive(Debug)]
pub struct Permit {
    _permit: OwnedSemaphorePermit,
}

/// The next accepted connection, with Nagle off. A failed accept (EMFILE
/// and friends) is logged and retried after a pause instead of spinning.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// When a connection last moved a byte: milliseconds since its start.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A downstream socket as hyper sees it: the bytes the fast path read
/// before handing it over come first; every byte moved is noted for the
/// idle timeout; and the connection's place under the cap lives as long
/// as the socket (an upgraded connection keeps it while it tunnels).
pub(crate) struct Downstream {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
    activity: Arc<Activity>,
    _permit: Permit,
}

impl Downstream {
    fn new(inner: TcpStream, prefix: Vec<u8>, permit: Permit) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
            activity: Arc::new(Activity {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
            _permit: permit,
        }
    }
}

impl AsyncRead for Downstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.pos..)
            && !rest.is_empty()
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos >= this.prefix.len() {
                // Replayed: no need to keep the buffer for the
                // connection's lifetime.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Downstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one connection through hyper (HTTP/1.1 or h2c, upgrades
/// included), `prefix` (bytes already read from it) first, answering with
/// `handler`, until it ends. It shuts down gracefully — in-flight requests
/// and streams finish — when `shutdown` begins or when it moved no byte
/// for `limits.idle_timeout`.
pub(crate) async fn serve_hyper<F, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    prefix: Vec<u8>,
    permit: Permit,
    handler: F,
    limits: &Limits,
    mut shutdown: Shutdown,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let io = Downstream::new(stream, prefix, permit);
    let activity = Arc::clone(&io.activity);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service_fn(handler));
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => {
            ended_with(ended, limits);
            return;
        }
        () = activity.idle_for(limits.idle_timeout) => {
            limits.idle_timeouts.increment(1);
            tracing::debug!(idle_timeout = ?limits.idle_timeout, "closing an idle connection");
            conn.as_mut().graceful_shutdown();
        }
        () = shutdown.wait() => conn.as_mut().graceful_shutdown(),
    }
    ended_with(conn.await, limits);
}

/// Notes how a hyper connection ended (a header read timeout is counted).
fn ended_with(ended: Result<(), Box<dyn std::error::Error + Send + Sync>>, limits: &Limits) {
    let Err(e) = ended else { return };
    if e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
    {
        limits.header_timeouts.increment(1);
        tracing::debug!(header_read_timeout = ?limits.header_read_timeout, "request head not complete in time; connection closed");
    } else {
        tracing::debug!(error = %e, "downstream connection ended");
    }
}

/// Accepts HTTP/1.1 and h2c connections on `listener` (at most
/// `limits.max_connections` at once; more get a 503), answering each
/// request with `handler`, until `shutdown`; then lets in-flight requests
/// finish for at most `grace`. The inbound listener's, and the outbound
/// proxy's while trace export is on.
pub(crate) async fn serve_http<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    mut shutdown: Shutdown,
    grace: Duration,
    name: &'static str,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let builder = Arc::new(limits.hyper_builder());
    let gate = Gate::new(name, true, &limits);
    let limits = Arc::new(limits);
    let drain = Drain::new();
    loop {
        tokio::select! {
            (stream, _, permit) = gate.accept(&listener) => {
                let builder = Arc::clone(&builder);
                let limits = Arc::clone(&limits);
                let handler = handler.clone();
                let shutdown = shutdown.clone();
                let alive = drain.alive();
                tokio::spawn(async move {
                    let _alive = alive;
                    serve_hyper(&builder, stream, Vec::new(), permit, handler, &limits, shutdown)
                        .await;
                });
            }
            () = shutdown.wait() => break,
        }
    }
    drop(listener);
    drain.wait(grace, name).await;
}

/// Waits for a listener's connection tasks at shutdown: each holds an
/// [`Alive`]; the wait ends when the last one is dropped.
#[derive(Debug)]
pub(crate) struct Drain {
    alive: tokio::sync::mpsc::Sender<()>,
    all_done: tokio::sync::mpsc::Receiver<()>,
}

/// Held by a connection task until it ends.
#[derive(Debug)]
pub(crate) struct Alive {
    _alive: tokio::sync::mpsc::Sender<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        let (alive, all_done) = tokio::sync::mpsc::channel(1);
        Self { alive, all_done }
    }

    pub(crate) fn alive(&self) -> Alive {
        Alive {
            _alive: self.alive.clone(),
        }
    }

    /// Waits at most `grace` for every connection task to end.
    pub(crate) async fn wait(self, grace: Duration, name: &str) {
        let Self {
            alive,
            mut all_done,
        } = self;
        drop(alive);
        if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
            tracing::warn!("{name}: connections still open after {grace:?}; closing them");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limits(max_connections: usize) -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_connections,
            header_timeouts: Counter::noop(),
            idle_timeouts: Counter::noop(),
            refused: Counter::noop(),
        }
    }

    /// Finding 10: past the cap, a flood of connections that never read
    /// gets at most 64 answers written at a time (each for at most a
    /// second); the others are closed at once — and every one is closed
    /// within the bound, while the connection under the cap is kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_in_flight_are_bounded_finding_10() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new("test", true, &limits(1));
        let serving = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (stream, _, permit) = gate.accept(&listener).await;
                held.push((stream, permit));
            }
        });
        let kept = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        let started = Instant::now();
        let mut flood = Vec::new();
        for _ in 0..300 {
            flood.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut answered = 0usize;
        for mut stream in flood {
            let mut got = Vec::new();
            let ended =
                tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut got)).await;
            assert!(ended.is_ok(), "a refused connection stayed open");
            if got.starts_with(b"HTTP/1.1 503") {
                assert!(String::from_utf8_lossy(&got).contains("max_connections"));
                answered += 1;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(4));
        // The 300 connections arrive within well under a second (the
        // answered ones linger up to 1 s), so about 64 get an answer.
        assert!((1..=2 * MAX_REFUSING).contains(&answered), "{answered}");
        // The one under the cap is still open.
        let mut probe = [0u8; 1];
        assert!(
            kept.try_read(&mut probe)
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        );
        serving.abort();
    }
}
