//! The outbound proxy's HTTP/1.1 fast path: requests are parsed with
//! `httparse` straight from a per-connection buffer, the rewritten head
//! (hop-by-hop headers dropped, tenant baggage carried) and the buffered
//! body go to a pooled upstream socket in one write, and the upstream's
//! response is passed back as bytes — verbatim when it has no
//! connection-scoped header. No `http::Request`, no hyper codec, no task
//! per upstream connection.
//!
//! Why: on this path hyper's generic HTTP/1.1 machinery (header maps,
//! body channels, a connection task per upstream socket) was the
//! userspace cost left per request (benches/SIDECAR.md).
//!
//! Everything unusual goes to the hyper path ([`crate::http_proxy`]),
//! which then serves the rest of that connection: HTTP/2 prior knowledge
//! (gRPC), upgrades (WebSocket, `h2c`), `Expect: 100-continue`, `CONNECT`,
//! HTTP/1.0, gRPC over HTTP/1.1, other transfer codings, hop-by-hop
//! headers named in `Connection`, over-long or malformed heads, and
//! refused requests with a body. The hand-over happens only at a request
//! boundary, before anything of that request was sent upstream, by giving
//! hyper the socket with the unread bytes in front — so the choice is
//! safe per request. The listener serves only through hyper when trace
//! export is on (spans need the hyper path's `http::Request`).
//!
//! Behaviour kept from the hyper path: Host / absolute-form routing, the
//! tenant from baggage `strata-tenant` or `x-strata-tenant`, baggage
//! injection without disturbing other entries, per-route timeouts to the
//! response head, a failed connect retried on another instance, passive
//! ejection on connect failures and 5xx, weighted balancing, 503 JSON
//! refusals naming service and tenant chain, the same metrics. Request and
//! response bodies stream both ways (`Content-Length`, chunked passed
//! through with its trailers, close-delimited responses).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Shutdown;
use crate::http_proxy::{self, Found, MAX_ATTEMPTS, Proxy, Refusal, accept};
use crate::table::Route;
use crate::tenant::{self, Origin};
use crate::upstream::Upstream;

/// Longest request or response head read here; longer ones go to hyper
/// (which answers 431) or fail as a bad upstream response.
const MAX_HEAD: usize = 64 * 1024;

/// Headers parsed per head, hyper's default limit: a request with more
/// goes to hyper (which refuses it), a response with more is a bad
/// upstream response, as it is for hyper's client.
const MAX_HEADERS: usize = 100;

/// Bytes read per socket read (and what an idle connection keeps
/// allocated for reading, like hyper's initial read buffer).
const READ_CHUNK: usize = 8 * 1024;

/// Serves the outbound proxy on `listener` until `shutdown`; then idle
/// connections close and in-flight requests get at most `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    // Each connection task holds a sender; the channel closes when the
    // last one ends, which is what the drain waits for.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            stream = accept(&listener) => {
                tokio::spawn(connection(
                    Arc::clone(&proxy),
                    Arc::clone(&builder),
                    stream,
                    shutdown.clone(),
                    alive.clone(),
                ));
            }
            () = shutdown.wait() => break,
        }
    }
    drop(listener);
    drop(alive);
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        tracing::warn!("outbound proxy: connections still open after {grace:?}; closing them");
    }
}

/// A downstream connection's read buffer: bytes `buf[pos..]` are read
/// but not yet consumed.
struct Input {
    buf: Vec<u8>,
    pos: usize,
}

impl Input {
    fn pending(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Drops consumed bytes so the next read appends after the pending
    /// ones and the buffer does not grow.
    fn compact(&mut self) {
        if self.pos >= self.buf.len() {
            self.buf.clear();
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
        }
        self.pos = 0;
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        self.compact();
        fill(r, &mut self.buf).await
    }
}

async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    r.read_buf(buf).await
}

/// Buffers reused by every request of a connection.
struct Scratch {
    /// The rewritten request head and its buffered body.
    request: Vec<u8>,
    /// Bytes read from the upstream.
    up: Vec<u8>,
    /// A rewritten response head (and refusals).
    response: Vec<u8>,
}

async fn connection(
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stream: TcpStream,
    mut shutdown: Shutdown,
    // Held until the connection ends: the drain waits for every sender.
    _alive: mpsc::Sender<()>,
) {
    let mut input = Input {
        buf: Vec::with_capacity(READ_CHUNK),
        pos: 0,
    };
    let mut scratch = Scratch {
        request: Vec::with_capacity(1024),
        // Allocated by the first upstream read.
        up: Vec::new(),
        response: Vec::new(),
    };
    // Whether the tenant of the pending request was just learned (a second
    // "unknown tenant" for it is then a refusal, not another wait).
    let mut learned = false;
    loop {
        let step = prepare(&proxy, input.pending(), &mut scratch.request);
        match step {
            Step::Incomplete => {
                if input.pending().len() >= MAX_HEAD {
                    break;
                }
                let idle = input.pending().is_empty();
                let read = if idle {
                    // Between requests a shutdown closes the connection.
                    tokio::select! {
                        read = input.fill(&mut stream) => read,
                        () = shutdown.wait() => return,
                    }
                } else {
                    input.fill(&mut stream).await
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            Step::Fallback => break,
            Step::Refuse(refused) => {
                learned = false;
                count_unroutable(&proxy);
                let close = refused.close;
                input.pos += refused.head_len;
                let ok = respond_refusal(
                    &mut stream,
                    &mut scratch.response,
                    &refused.refusal,
                    refused.head_method,
                    close,
                )
                .await;
                if !ok || close {
                    return finish(stream).await;
                }
            }
            Step::Learn(learn) => {
                if learned {
                    learned = false;
                    let refusal =
                        http_proxy::unroutable(&learn.service, &learn.tenant, Vec::new(), false);
                    if learn.refused.has_body {
                        break;
                    }
                    count_unroutable(&proxy);
                    input.pos += learn.refused.head_len;
                    let close = learn.refused.close;
                    let ok = respond_refusal(
                        &mut stream,
                        &mut scratch.response,
                        &refusal,
                        learn.refused.head_method,
                        close,
                    )
                    .await;
                    if !ok || close {
                        return finish(stream).await;
                    }
                    continue;
                }
                // Only the first request of a tenant this sidecar does not
                // follow yet waits here; then the head is parsed again.
                if let Err(e) = proxy.routing.learn(&learn.tenant).await {
                    if learn.refused.has_body {
                        // Hyper skips the unread body; it asks for the
                        // tenant again (a refused tenant is remembered,
                        // so that second answer is quick).
                        break;
                    }
                    count_unroutable(&proxy);
                    input.pos += learn.refused.head_len;
                    let refusal = http_proxy::learn_failed(learn.service, learn.tenant, &e);
                    let close = learn.refused.close;
                    let ok = respond_refusal(
                        &mut stream,
                        &mut scratch.response,
                        &refusal,
                        learn.refused.head_method,
                        close,
                    )
                    .await;
                    if !ok || close {
                        return finish(stream).await;
                    }
                    continue;
                }
                learned = true;
            }
            Step::Forward(request) => {
                learned = false;
                let started = Instant::now();
                // The body bytes already read go out with the head.
                let body_start = input.pos + request.head_len;
                let pending = input.buf.get(body_start..).unwrap_or_default();
                let mut rest = BodyLeft::new(match request.body {
                    // Requests are never close-delimited.
                    Framing::Close => Framing::None,
                    framing => framing,
                });
                let Ok(used) = rest.take(pending) else {
                    // Malformed chunked body: nothing was sent, hyper
                    // answers 400.
                    break;
                };
                scratch.request.extend_from_slice(&pending[..used]);
                input.pos = body_start + used;
                let next = exchange(
                    &proxy,
                    &request,
                    rest,
                    started,
                    &mut stream,
                    &mut input,
                    &mut scratch,
                )
                .await;
                if next == Next::Close || request.close {
                    return finish(stream).await;
                }
            }
        }
    }
    hand_over(proxy, builder, stream, input, shutdown).await;
}

fn count_unroutable(proxy: &Proxy) {
    metrics::counter!("strata_sidecar_unroutable_total", "project" => proxy.project.clone())
        .increment(1);
}

/// Closes a downstream connection after its last response: FIN first, so
/// the caller reads the whole response before the socket goes away.
async fn finish(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
}

/// The rest of a connection goes to hyper, unread bytes first.
async fn hand_over(
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    mut input: Input,
    mut shutdown: Shutdown,
) {
    input.compact();
    let io = TokioIo::new(Rewind {
        prefix: input.buf,
        pos: 0,
        inner: stream,
    });
    let service = service_fn(move |req| http_proxy::handle(Arc::clone(&proxy), req));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "downstream connection ended");
            }
        }
        () = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A socket whose first reads return bytes read from it before.
struct Rewind {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
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
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes (responses only).
    Close,
}

/// What is left of a message body; tells how much of the bytes read next
/// belong to it.
#[derive(Debug)]
enum BodyLeft {
    Done,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl BodyLeft {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::None | Framing::Length(0) => Self::Done,
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(Chunked::default()),
            Framing::Close => Self::UntilClose,
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// How many leading bytes of `bytes` belong to the body; moves past
    /// them. `Err` for a malformed chunked body.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, ()> {
        let n = match self {
            Self::Done => 0,
            Self::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= n as u64;
                n
            }
            Self::Chunked(scan) => scan.feed(bytes)?,
            Self::UntilClose => bytes.len(),
        };
        if matches!(self, Self::Length(0)) || matches!(self, Self::Chunked(scan) if scan.done()) {
            *self = Self::Done;
        }
        Ok(n)
    }
}

/// What to do with a request refused before forwarding.
struct Refused {
    head_len: usize,
    head_method: bool,
    close: bool,
    has_body: bool,
}

struct Refuse {
    refusal: Refusal,
    head_len: usize,
    head_method: bool,
    close: bool,
}

struct Learn {
    service: String,
    tenant: String,
    refused: Refused,
}

/// A request ready to forward; its rewritten head is in the scratch
/// buffer.
struct Ready {
    route: Arc<Route>,
    head_len: usize,
    body: Framing,
    head_method: bool,
    /// The caller asked to close after this exchange.
    close: bool,
    /// Safe to send again when a reused upstream socket answered nothing.
    idempotent: bool,
}

enum Step {
    /// More bytes are needed for a head.
    Incomplete,
    /// The hyper path takes the connection from here.
    Fallback,
    /// Answer with a refusal (the request has no body).
    Refuse(Refuse),
    /// The request's tenant is not followed yet.
    Learn(Learn),
    /// Forward it.
    Forward(Ready),
}

/// `HeaderValue::to_str`'s rule (visible ASCII and tab), so values the
/// hyper path would ignore are ignored here too.
fn visible(bytes: &[u8]) -> Option<&str> {
    if bytes.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Parses the head at the start of `input` and decides what to do with
/// the request; for a request to forward, writes its rewritten head into
/// `out`. Synchronous, so nothing borrowed from the buffer lives across an
/// await.
fn prepare(proxy: &Proxy, input: &[u8], out: &mut Vec<u8>) -> Step {
    if input.is_empty() {
        return Step::Incomplete;
    }
    // HTTP/2 prior knowledge (gRPC) is hyper's.
    let n = input.len().min(PREFACE.len());
    if input[..n] == PREFACE[..n] {
        return if n < PREFACE.len() {
            Step::Incomplete
        } else {
            Step::Fallback
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Incomplete,
        Err(_) => return Step::Fallback,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        // HTTP/1.0 keep-alive rules differ: hyper's.
        return Step::Fallback;
    };
    if method == "CONNECT" {
        return Step::Fallback;
    }
    let mut host: Option<&str> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut baggage_count = 0usize;
    let mut baggage_tenant: Option<&str> = None;
    let mut header_tenant: Option<&str> = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Step::Fallback;
            }
            match visible(value) {
                Some(v) => host = Some(v),
                None => return Step::Fallback,
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = visible(value).and_then(|v| v.trim().parse::<u64>().ok()) else {
                return Step::Fallback;
            };
            if length.is_some_and(|l| l != n) {
                return Step::Fallback;
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let is_chunked =
                visible(value).is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !is_chunked || chunked {
                return Step::Fallback;
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let Some(v) = visible(value) else {
                return Step::Fallback;
            };
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case("keep-alive") {
                    // Upgrades, or hop-by-hop headers to strip by name.
                    return Step::Fallback;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Step::Fallback;
        } else if name.eq_ignore_ascii_case("content-type") {
            if value.starts_with(b"application/grpc") {
                // Its refusals are gRPC statuses: hyper's.
                return Step::Fallback;
            }
        } else if name.eq_ignore_ascii_case("baggage") {
            baggage_count += 1;
            if baggage_tenant.is_none() {
                baggage_tenant =
                    visible(value).and_then(strata_client::propagation::tenant_from_baggage);
            }
        } else if name.eq_ignore_ascii_case(strata_client::propagation::TENANT_HEADER)
            && header_tenant.is_none()
        {
            // Like `HeaderMap::get`: the first one counts, even if blank.
            header_tenant = Some(visible(value).map(str::trim).unwrap_or_default());
        }
    }
    if chunked && length.is_some() {
        return Step::Fallback;
    }
    let body = if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(n) if n > 0 => Framing::Length(n),
            _ => Framing::None,
        }
    };
    let head_method = method == "HEAD";
    // Absolute form (an `HTTP_PROXY` client): the callee is the URI's
    // authority and the upstream gets the origin form.
    let absolute = if target.starts_with('/') || target == "*" {
        None
    } else {
        match http::Uri::try_from(target) {
            Ok(uri) if uri.authority().is_some() => Some(uri),
            _ => return Step::Fallback,
        }
    };
    let service = match &absolute {
        Some(uri) => uri
            .authority()
            .and_then(|a| http_proxy::service_name(a.as_str())),
        None => host.and_then(http_proxy::service_name),
    };
    let named = match (baggage_tenant, header_tenant) {
        (Some(t), _) => Some((t, Origin::Baggage)),
        (None, Some(t)) if !t.is_empty() => Some((t, Origin::Header)),
        _ => None,
    };
    let refused = Refused {
        head_len,
        head_method,
        close,
        has_body: body != Framing::None,
    };
    let (route, origin) = match http_proxy::resolve(proxy, service, named) {
        Ok(Found::Route(route, origin)) => (route, origin),
        Ok(Found::Unknown { service, tenant }) => {
            return Step::Learn(Learn {
                service,
                tenant,
                refused,
            });
        }
        Err(refusal) => {
            if refused.has_body {
                // Skipping an unread body is hyper's job.
                return Step::Fallback;
            }
            return Step::Refuse(Refuse {
                refusal,
                head_len,
                head_method,
                close,
            });
        }
    };

    // The rewritten head.
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match &absolute {
        Some(uri) => {
            let origin_form = uri.path_and_query().map_or("/", |pq| pq.as_str());
            out.extend_from_slice(origin_form.as_bytes());
        }
        None => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(uri) = &absolute
        && host.is_none()
        && let Some(authority) = uri.authority()
    {
        push_header(out, b"host", authority.as_str().as_bytes());
    }
    // The common cases keep or add baggage without a header map: the only
    // baggage header already names the route's tenant, or there is none.
    let keep_baggage = baggage_count == 1
        && origin == Origin::Baggage
        && baggage_tenant == Some(route.requested.as_str());
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("keep-alive")
            || name.eq_ignore_ascii_case("proxy-connection")
            || name.eq_ignore_ascii_case("proxy-authorization")
            || (!keep_baggage && name.eq_ignore_ascii_case("baggage"))
        {
            continue;
        }
        push_header(out, name.as_bytes(), h.value);
    }
    if baggage_count == 0 {
        push_header(out, b"baggage", route.baggage.as_bytes());
    } else if !keep_baggage {
        // Merge the caller's entries with ours, as the hyper path does.
        let mut map = http::HeaderMap::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("baggage")
                && let Ok(v) = http::HeaderValue::from_bytes(h.value)
            {
                map.append(http::header::HeaderName::from_static("baggage"), v);
            }
        }
        tenant::carry(&mut map, &route.requested, origin, &route.baggage);
        for v in map.get_all("baggage") {
            push_header(out, b"baggage", v.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    Step::Forward(Ready {
        route,
        head_len,
        body,
        head_method,
        close,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        ),
    })
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a refusal as an HTTP/1.1 response; false when the caller is
/// gone.
async fn respond_refusal(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    refusal: &Refusal,
    head_method: bool,
    close: bool,
) -> bool {
    use std::io::Write as _;
    let body = refusal.json();
    let status = refusal.status();
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    );
    if !head_method {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(out).await.is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Sends a prepared request to an instance of its route and relays the
/// answer: a failed connect moves to another instance; a reused socket
/// that turns out closed is replaced (for an idempotent request, also when
/// it closed without answering, nginx's rule); a failure after sending is
/// the caller's 502, no answer by the deadline its 504.
async fn exchange(
    proxy: &Proxy,
    request: &Ready,
    mut rest: BodyLeft,
    started: Instant,
    down: &mut TcpStream,
    input: &mut Input,
    scratch: &mut Scratch,
) -> Next {
    let route = &*request.route;
    let deadline = started + route.timeout;
    let body_left = !rest.is_done();
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        let Some((index, upstream)) = route.balancer.pick(&tried) else {
            break;
        };
        let upstream = Arc::clone(upstream);
        if attempt > 0 {
            metrics::counter!("strata_sidecar_upstream_retries_total", "project" => proxy.project.clone())
                .increment(1);
        }
        let in_flight = upstream.start();
        let (mut up, reused) = match upstream.take_raw() {
            Some(s) => (s, true),
            None => {
                let connect_timeout = proxy
                    .connect_timeout
                    .min(deadline.saturating_duration_since(Instant::now()));
                match upstream.dial(connect_timeout).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        http_proxy::connect_failed(&upstream, &e, &mut last_error);
                        tried.push(index);
                        continue;
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, up.write_all(&scratch.request)).await {
            Err(_) => {
                upstream.failed();
                let refusal =
                    http_proxy::upstream_failure(route, http_proxy::timeout_message(route), true);
                return refuse_after(route, started, down, scratch, request, &refusal, body_left)
                    .await;
            }
            Ok(Err(e)) => {
                // Nothing the upstream could act on arrived: a reused
                // socket was stale (not the instance's fault), a fresh one
                // broke — try again either way.
                if !reused {
                    upstream.failed();
                    tried.push(index);
                }
                last_error = format!("{}: {e}", upstream.address);
                continue;
            }
            Ok(Ok(())) => {}
        }
        let x = Exchange {
            route,
            upstream: &upstream,
            started,
            deadline,
            head_method: request.head_method,
            close: request.close,
            may_retry: reused && request.idempotent && !body_left,
        };
        let (relayed, body_sent) = if body_left {
            let (mut up_r, mut up_w) = up.split();
            let (mut down_r, mut down_w) = down.split();
            let copy = copy_body(&mut down_r, input, &mut up_w, &mut rest);
            let relay = relay(
                &x,
                &mut up_r,
                &mut scratch.up,
                &mut down_w,
                &mut scratch.response,
            );
            tokio::pin!(copy, relay);
            let mut copied: Option<Result<(), Side>> = None;
            let relayed = loop {
                tokio::select! {
                    done = &mut copy, if copied.is_none() => {
                        if done == Err(Side::Down) {
                            // The caller is gone mid-body.
                            return Next::Close;
                        }
                        copied = Some(done);
                    }
                    relayed = &mut relay => break relayed,
                }
            };
            (relayed, copied == Some(Ok(())))
        } else {
            let relayed = relay(&x, &mut up, &mut scratch.up, down, &mut scratch.response).await;
            (relayed, true)
        };
        drop(in_flight);
        match relayed {
            Relayed::Done {
                up_reusable,
                down_close,
            } => {
                if up_reusable && body_sent {
                    upstream.put_raw(up);
                }
                return if down_close || !body_sent {
                    Next::Close
                } else {
                    Next::KeepAlive
                };
            }
            Relayed::Retry(e) => {
                last_error = e;
                continue;
            }
            Relayed::Refused(refusal) => {
                return refuse_after(route, started, down, scratch, request, &refusal, !body_sent)
                    .await;
            }
            Relayed::Broken => return Next::Close,
        }
    }
    let refusal = http_proxy::unreachable(route, &last_error);
    refuse_after(route, started, down, scratch, request, &refusal, body_left).await
}

/// Answers a forwarded request that failed before its response head with
/// the refusal, counted in the route's metrics like an upstream status.
/// The connection closes when part of the request body is still unread.
async fn refuse_after(
    route: &Route,
    started: Instant,
    down: &mut TcpStream,
    scratch: &mut Scratch,
    request: &Ready,
    refusal: &Refusal,
    unread_body: bool,
) -> Next {
    route
        .metrics
        .record(Some(refusal.status().as_u16()), started.elapsed());
    let close = unread_body || request.close;
    let ok = respond_refusal(
        down,
        &mut scratch.response,
        refusal,
        request.head_method,
        close,
    )
    .await;
    if ok && !close {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// Which side of a body copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Down,
    Up,
}

/// Copies the rest of a request body from the caller to the upstream;
/// bytes after its end (a pipelined request) stay in `input`.
async fn copy_body<R, W>(
    down: &mut R,
    input: &mut Input,
    up: &mut W,
    rest: &mut BodyLeft,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while !rest.is_done() {
        if input.pending().is_empty() {
            match input.fill(down).await {
                Ok(0) | Err(_) => return Err(Side::Down),
                Ok(_) => {}
            }
        }
        let pending = input.pending();
        // A malformed body cannot be resynchronised: the caller's
        // connection ends.
        let n = rest.take(pending).map_err(|()| Side::Down)?;
        up.write_all(&pending[..n]).await.map_err(|_| Side::Up)?;
        input.pos += n;
    }
    Ok(())
}

/// One attempt's fixed facts.
struct Exchange<'a> {
    route: &'a Route,
    upstream: &'a Upstream,
    started: Instant,
    deadline: Instant,
    head_method: bool,
    /// The caller asked to close after this exchange (its response says
    /// so, as hyper's would).
    close: bool,
    may_retry: bool,
}

enum Relayed {
    /// The whole response was passed on.
    Done { up_reusable: bool, down_close: bool },
    /// A reused socket closed without a byte of answer: send again.
    Retry(String),
    /// Nothing reached the caller yet: answer with this.
    Refused(Refusal),
    /// The exchange broke after part of the response reached the caller.
    Broken,
}

/// Reads the upstream's response head (by the deadline) and passes the
/// response on, streaming its body.
async fn relay<R, W>(
    x: &Exchange<'_>,
    up: &mut R,
    buf: &mut Vec<u8>,
    down: &mut W,
    out: &mut Vec<u8>,
) -> Relayed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    buf.clear();
    let mut wrote_interim = false;
    let failed = |message: String, timeout: bool, wrote: bool| {
        x.upstream.failed();
        if wrote {
            Relayed::Broken
        } else {
            Relayed::Refused(http_proxy::upstream_failure(x.route, message, timeout))
        }
    };
    let head = loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let code = resp.code.unwrap_or(0);
                    if (100..200).contains(&code) && code != 101 {
                        // Interim (103 Early Hints): passed on as is.
                        if down.write_all(&buf[..n]).await.is_err() {
                            return Relayed::Broken;
                        }
                        wrote_interim = true;
                        buf.drain(..n);
                        continue;
                    }
                    break response_head(x, &resp, n, out);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return failed(
                        format!(
                            "{} ({}): response head too long",
                            x.route.service, x.upstream.address
                        ),
                        false,
                        wrote_interim,
                    );
                }
                Err(e) => {
                    return failed(
                        format!(
                            "{} ({}): invalid response: {e}",
                            x.route.service, x.upstream.address
                        ),
                        false,
                        wrote_interim,
                    );
                }
            }
        }
        match tokio::time::timeout_at(x.deadline, fill(up, buf)).await {
            Err(_) => {
                return failed(http_proxy::timeout_message(x.route), true, wrote_interim);
            }
            Ok(Ok(0)) if buf.is_empty() && x.may_retry && !wrote_interim => {
                return Relayed::Retry(format!(
                    "{}: connection closed before a response",
                    x.upstream.address
                ));
            }
            Ok(Ok(0)) => {
                return failed(
                    format!(
                        "{} ({}): connection closed before message completed",
                        x.route.service, x.upstream.address
                    ),
                    false,
                    wrote_interim,
                );
            }
            Ok(Err(e)) => {
                return failed(
                    format!("{} ({}): {e}", x.route.service, x.upstream.address),
                    false,
                    wrote_interim,
                );
            }
            Ok(Ok(_)) => {}
        }
    };
    let head = match head {
        Ok(head) => head,
        Err(message) => return failed(message, false, wrote_interim),
    };
    // The response head is what the route's metrics and the instance's
    // health see, as on the hyper path.
    if head.status >= 500 {
        x.upstream.failed();
    } else {
        x.upstream.succeeded();
    }
    x.route
        .metrics
        .record(Some(head.status), x.started.elapsed());

    // Head (verbatim or rewritten) and the body bytes already read go out
    // in one write.
    let body = buf.get(head.len..).unwrap_or_default();
    let mut state = BodyLeft::new(head.framing);
    let Ok(first) = state.take(body) else {
        return failed(
            format!(
                "{} ({}): malformed chunked body",
                x.route.service, x.upstream.address
            ),
            false,
            wrote_interim,
        );
    };
    let written = if head.rewritten {
        out.extend_from_slice(&body[..first]);
        down.write_all(out).await
    } else {
        down.write_all(&buf[..head.len + first]).await
    };
    if written.is_err() {
        return Relayed::Broken;
    }
    // Bytes past the response's end: the socket is out of step.
    let mut clean = buf.len() == head.len + first;
    while !state.is_done() {
        buf.clear();
        match fill(up, buf).await {
            // The end of a close-delimited body.
            Ok(0) if matches!(state, BodyLeft::UntilClose) => break,
            Ok(0) | Err(_) => return Relayed::Broken,
            Ok(_) => {}
        }
        let Ok(n) = state.take(buf) else {
            return Relayed::Broken;
        };
        if down.write_all(&buf[..n]).await.is_err() {
            return Relayed::Broken;
        }
        // A close-delimited response never leaves the socket reusable, so
        // this only matters for the other framings.
        clean = n == buf.len();
    }
    Relayed::Done {
        up_reusable: clean && !head.up_close && head.framing != Framing::Close,
        down_close: head.framing == Framing::Close,
    }
}

/// A parsed response head.
struct Head {
    status: u16,
    /// Its length in the upstream buffer.
    len: usize,
    framing: Framing,
    /// The upstream will close the socket after it.
    up_close: bool,
    /// The caller gets the rewritten head in `out` instead of the bytes.
    rewritten: bool,
}

/// Reads a final response head: its framing (RFC 9112 section 6.3) and
/// whether it needs rewriting — connection-scoped headers are not passed
/// on (as on the hyper path), and a close-delimited body closes the
/// caller's connection too.
fn response_head(
    x: &Exchange<'_>,
    resp: &httparse::Response<'_, '_>,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<Head, String> {
    let status = resp.code.unwrap_or(0);
    let bad = |what: &str| format!("{} ({}): {what}", x.route.service, x.upstream.address);
    if status == 101 {
        // The request asked for no upgrade (those go through hyper).
        return Err(bad("unexpected 101 Switching Protocols"));
    }
    let mut up_close = resp.version != Some(1);
    let mut hop = false;
    let mut length: Option<u64> = None;
    let mut transfer: Option<bool> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            hop = true;
            if let Some(v) = visible(h.value) {
                for token in v.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        up_close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") && resp.version == Some(0) {
                        up_close = false;
                    }
                }
            }
        } else if h.name.eq_ignore_ascii_case("keep-alive") {
            hop = true;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only when it is the last coding.
            let last_chunked = visible(h.value).is_some_and(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
            });
            transfer = Some(last_chunked);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = visible(h.value)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| bad("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    let framing = if x.head_method || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else {
        match (transfer, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(0)) => Framing::None,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    let close_down = framing == Framing::Close || x.close;
    // Transfer-Encoding overrides Content-Length (RFC 9112 section 6.3);
    // a proxy must not pass both on.
    let drop_length = transfer.is_some() && length.is_some();
    let rewritten = hop || close_down || drop_length;
    if rewritten {
        out.clear();
        out.extend_from_slice(format!("HTTP/1.1 {status} ").as_bytes());
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection")
                || h.name.eq_ignore_ascii_case("keep-alive")
                || (drop_length && h.name.eq_ignore_ascii_case("content-length"))
            {
                continue;
            }
            push_header(out, h.name.as_bytes(), h.value);
        }
        if close_down {
            // The caller learns that the connection ends (and, for a
            // close-delimited body, where the body ends).
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(Head {
        status,
        len,
        framing,
        up_close,
        rewritten,
    })
}

/// Follows a chunked body (RFC 9112 section 7.1) through its bytes, which
/// pass on unchanged (extensions and trailers included), to find its end.
#[derive(Debug, Clone, Copy, Default)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, Default)]
enum ChunkState {
    /// In a chunk-size line.
    #[default]
    SizeStart,
    Size {
        value: u64,
        digits: u8,
        ext: bool,
        cr: bool,
    },
    /// Chunk data bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: the current line's length so far.
    Trailer {
        len: usize,
        cr: bool,
    },
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }

    /// Consumes bytes of `input` up to the body's end; how many belong to
    /// the body. `Err` on a malformed body.
    fn feed(&mut self, input: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => ChunkState::SizeStart,
                ChunkState::DataCr | ChunkState::DataLf => return Err(()),
                ChunkState::SizeStart => match hex(b) {
                    Some(d) => ChunkState::Size {
                        value: u64::from(d),
                        digits: 1,
                        ext: false,
                        cr: false,
                    },
                    None => return Err(()),
                },
                ChunkState::Size {
                    value,
                    digits,
                    ext,
                    cr,
                } => {
                    if cr {
                        if b != b'\n' {
                            return Err(());
                        }
                        if value == 0 {
                            ChunkState::Trailer { len: 0, cr: false }
                        } else {
                            ChunkState::Data(value)
                        }
                    } else if b == b'\r' {
                        ChunkState::Size {
                            value,
                            digits,
                            ext,
                            cr: true,
                        }
                    } else if ext {
                        ChunkState::Size {
                            value,
                            digits,
                            ext,
                            cr,
                        }
                    } else if let Some(d) = hex(b) {
                        // 15 hex digits: sizes far past anything real,
                        // and no overflow.
                        if digits >= 15 {
                            return Err(());
                        }
                        ChunkState::Size {
                            value: value * 16 + u64::from(d),
                            digits: digits + 1,
                            ext,
                            cr,
                        }
                    } else if matches!(b, b';' | b' ' | b'\t') {
                        ChunkState::Size {
                            value,
                            digits,
                            ext: true,
                            cr,
                        }
                    } else {
                        return Err(());
                    }
                }
                ChunkState::Trailer { len, cr } => {
                    if cr {
                        if b != b'\n' {
                            return Err(());
                        }
                        if len == 0 {
                            ChunkState::Done
                        } else {
                            ChunkState::Trailer { len: 0, cr: false }
                        }
                    } else if b == b'\r' {
                        ChunkState::Trailer { len, cr: true }
                    } else if len >= MAX_HEAD {
                        return Err(());
                    } else {
                        ChunkState::Trailer { len: len + 1, cr }
                    }
                }
            };
            i += 1;
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let mut scan = Chunked::default();
        let n = scan.feed(body).unwrap();
        assert!(scan.done());
        assert_eq!(&body[n..], b"GET / HTTP/1.1\r\n");

        // Byte by byte: the same end.
        let mut scan = Chunked::default();
        let mut total = 0;
        for b in body.chunks(1) {
            total += scan.feed(b).unwrap();
            if scan.done() {
                break;
            }
        }
        assert_eq!(total, n);

        let mut scan = Chunked::default();
        assert_eq!(scan.feed(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap(), 20);
        assert!(scan.done());

        for bad in [&b"x\r\n"[..], b"5\rx", b"1\r\nab", b"fffffffffffffffff\r\n"] {
            assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
        }
        let mut scan = Chunked::default();
        assert_eq!(scan.feed(b"3\r\nab").unwrap(), 5);
        assert!(!scan.done());
    }
}
