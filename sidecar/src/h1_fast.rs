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
//! Framing is hyper's, byte for byte (docs/security.md, "Request smuggling
//! through the HTTP/1.1 fast path"): bodies pass on verbatim, so a reading the
//! upstream could make differently would let a request hide inside another one
//! on a pooled upstream connection. `Content-Length` is digits only (`+5` is
//! refused, not 5) and repeated values must agree (one header goes on);
//! chunked bodies follow hyper's decoder (size line, extensions, trailers and
//! their limits) and carry no bare LF. What hyper refuses is answered 400 with
//! `connection: close`; a bare LF in the trailers, which hyper reads as a line
//! end and re-encodes, goes to hyper when nothing was sent yet, else 400 as
//! well. Response heads with a bare LF, or several length values, go to the
//! caller rewritten.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::conn::{Alive, Drain, Gate, Permit, serve_hyper};
use crate::http_proxy::{self, Found, MAX_ATTEMPTS, Proxy, Refusal};
use crate::shutdown::Shutdown;
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
/// connections close and in-flight requests get at most `grace`. At most
/// `max_connections` connections are served at once; more get a 503.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let builder = Arc::new(proxy.limits.hyper_builder());
    let gate = Gate::new("outbound", true, &proxy.limits);
    let drain = Drain::new();
    loop {
        tokio::select! {
            (stream, _, permit) = gate.accept(&listener) => {
                tokio::spawn(connection(
                    Arc::clone(&proxy),
                    Arc::clone(&builder),
                    stream,
                    permit,
                    shutdown.clone(),
                    drain.alive(),
                ));
            }
            () = shutdown.wait() => break,
        }
    }
    drop(listener);
    drain.wait(grace, "outbound proxy").await;
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
    permit: Permit,
    mut shutdown: Shutdown,
    // Held until the connection ends: the drain waits for every one.
    _alive: Alive,
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
    // When the first byte of the head being read arrived.
    let mut head_started: Option<Instant> = None;
    let limits = &proxy.limits;
    loop {
        let step = prepare(&proxy, input.pending(), &mut scratch.request);
        if !matches!(step, Step::Incomplete) {
            head_started = None;
        }
        match step {
            Step::Incomplete => {
                if input.pending().len() >= MAX_HEAD {
                    break;
                }
                let read = if input.pending().is_empty() {
                    // Between requests: a shutdown or the idle timeout
                    // closes the connection.
                    tokio::select! {
                        read = tokio::time::timeout(limits.idle_timeout, input.fill(&mut stream)) => {
                            let Ok(read) = read else {
                                limits.idle_timeouts.increment(1);
                                return finish(stream).await;
                            };
                            read
                        }
                        () = shutdown.wait() => return,
                    }
                } else {
                    // A head in progress must be whole within
                    // header_read_timeout of its first byte (slowloris).
                    let deadline =
                        *head_started.get_or_insert_with(Instant::now) + limits.header_read_timeout;
                    match tokio::time::timeout_at(deadline, input.fill(&mut stream)).await {
                        Ok(read) => read,
                        Err(_) => {
                            limits.header_timeouts.increment(1);
                            let refusal = Refusal::head_timeout(limits.header_read_timeout);
                            respond_refusal(
                                &mut stream,
                                &mut scratch.response,
                                &refusal,
                                false,
                                true,
                            )
                            .await;
                            return finish(stream).await;
                        }
                    }
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            Step::Fallback => break,
            Step::Malformed(why) => {
                bad_request(&mut stream, &mut scratch.response, why).await;
                return finish(stream).await;
            }
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
                let used = match rest.take(pending) {
                    Ok(used) => used,
                    // Nothing was sent yet: hyper reads it its own way and
                    // re-encodes what it forwards.
                    Err(BodyError::BareLf) => break,
                    Err(e) => {
                        bad_request(&mut stream, &mut scratch.response, e.message()).await;
                        return finish(stream).await;
                    }
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
    hand_over(proxy, builder, stream, permit, input, shutdown).await;
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
    permit: Permit,
    mut input: Input,
    shutdown: Shutdown,
) {
    input.compact();
    let limits = proxy.limits.clone();
    let handler = move |req| http_proxy::handle(Arc::clone(&proxy), req);
    serve_hyper(
        &builder, stream, input.buf, permit, handler, &limits, shutdown,
    )
    .await;
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
    /// them. `Err` for a chunked body that cannot be passed on.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, BodyError> {
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
    /// The request's framing is invalid: 400, and the connection closes.
    Malformed(&'static str),
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

/// The HTTP/2 connection preface, read whole (under the head timeout)
/// before hyper gets the connection, so hyper never waits for it.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    let mut bad_length: Option<&'static str> = None;
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
            // hyper's rule: digits only; repeated, the values must agree.
            match length_digits(value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                Some(_) => bad_length = Some("conflicting Content-Length headers"),
                None => bad_length = Some("invalid Content-Length: digits only"),
            }
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
    if chunked && (length.is_some() || bad_length.is_some()) {
        // Transfer-Encoding wins, but hyper's reading depends on the
        // order of the two: hyper's.
        return Step::Fallback;
    }
    if let Some(why) = bad_length {
        // The body's end is unknown: refused, and the connection closes.
        return Step::Malformed(why);
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
    let mut length_sent = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Repeated (with the same value): once, as hyper sends it.
            if length_sent {
                continue;
            }
            length_sent = true;
        }
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
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}{}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            "retry-after: 1\r\n"
        } else {
            ""
        },
        if close { "connection: close\r\n" } else { "" },
    );
    if !head_method {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(out).await.is_ok()
}

/// Answers a request whose framing cannot be passed on with 400 (and
/// `connection: close`: where its body ends is unknown).
async fn bad_request(stream: &mut TcpStream, out: &mut Vec<u8>, why: &str) {
    tracing::debug!(why, "malformed request refused");
    let refusal = Refusal::malformed(why);
    respond_refusal(stream, out, &refusal, false, true).await;
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
            answered: AtomicBool::new(false),
        };
        let (relayed, body_sent) = if body_left {
            let outcome = {
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
                loop {
                    tokio::select! {
                        done = &mut copy, if copied.is_none() => match done {
                            // The caller is gone mid-body.
                            Err(Side::Down) => return Next::Close,
                            Err(Side::Malformed(e)) => break Err(e),
                            done => copied = Some(done),
                        },
                        relayed = &mut relay => break Ok((relayed, copied == Some(Ok(())))),
                    }
                }
            };
            match outcome {
                Ok(relayed) => relayed,
                Err(e) => {
                    // The rest of the body cannot go on: the upstream
                    // socket (which got part of it) is dropped, never
                    // pooled, and the caller's connection ends — with a
                    // 400 unless the upstream's answer already started.
                    if !x.answered.load(Ordering::Relaxed) {
                        bad_request(down, &mut scratch.response, e.message()).await;
                    }
                    return Next::Close;
                }
            }
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
    /// The caller's body cannot be passed on.
    Malformed(BodyError),
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
        let n = rest.take(pending).map_err(Side::Malformed)?;
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
    /// Part of a response went to the caller (a refusal can no longer be
    /// sent instead).
    answered: AtomicBool,
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
                        x.answered.store(true, Ordering::Relaxed);
                        if down.write_all(&buf[..n]).await.is_err() {
                            return Relayed::Broken;
                        }
                        wrote_interim = true;
                        buf.drain(..n);
                        continue;
                    }
                    break response_head(x, &resp, &buf[..n], out);
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
    let first = match state.take(body) {
        Ok(first) => first,
        Err(e) => {
            return failed(
                format!(
                    "{} ({}): response body not passed on: {}",
                    x.route.service,
                    x.upstream.address,
                    e.message()
                ),
                false,
                wrote_interim,
            );
        }
    };
    x.answered.store(true, Ordering::Relaxed);
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
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<Head, String> {
    let len = raw.len();
    let status = resp.code.unwrap_or(0);
    let bad = |what: &str| format!("{} ({}): {what}", x.route.service, x.upstream.address);
    if status == 101 {
        // The request asked for no upgrade (those go through hyper).
        return Err(bad("unexpected 101 Switching Protocols"));
    }
    let mut up_close = resp.version != Some(1);
    let mut hop = false;
    let mut lengths = 0usize;
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
            lengths += 1;
        }
    }
    // hyper's client decides in this order: no body whatever the headers
    // say, then Transfer-Encoding (Content-Length ignored), then
    // Content-Length, which must be valid.
    let no_body = x.head_method || status < 200 || status == 204 || status == 304;
    // How many length values to collapse into one header (0: keep as is).
    let mut one_length: Option<u64> = None;
    let framing = if no_body {
        Framing::None
    } else if let Some(last_chunked) = transfer {
        if resp.version == Some(0) {
            return Err(bad("transfer-encoding in an HTTP/1.0 response"));
        }
        if last_chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if lengths > 0 {
        let values = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| h.value);
        let (n, count) =
            response_length(values).ok_or_else(|| bad("invalid or conflicting content-length"))?;
        if count > 1 {
            // `5, 5` or a repeated header: the caller gets one value.
            one_length = Some(n);
        }
        if n == 0 {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::Close
    };
    let close_down = framing == Framing::Close || x.close;
    // Transfer-Encoding overrides Content-Length (RFC 9112 section 6.3);
    // a proxy must not pass both on.
    let drop_length = transfer.is_some() && lengths > 0;
    // httparse takes a bare LF for a line end; a caller might not, and
    // would then see other headers (or another body length): such a head
    // goes out rewritten with CRLF.
    let bare_lf = has_bare_lf(raw);
    let rewritten = hop || close_down || drop_length || one_length.is_some() || bare_lf;
    if rewritten {
        out.clear();
        out.extend_from_slice(format!("HTTP/1.1 {status} ").as_bytes());
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            let is_length = h.name.eq_ignore_ascii_case("content-length");
            if h.name.eq_ignore_ascii_case("connection")
                || h.name.eq_ignore_ascii_case("keep-alive")
                || (is_length && (drop_length || one_length.is_some()))
            {
                continue;
            }
            push_header(out, h.name.as_bytes(), h.value);
        }
        if let Some(n) = one_length {
            push_header(out, b"content-length", n.to_string().as_bytes());
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

/// hyper's limit on the chunk-extension bytes of one body.
const MAX_EXTENSION_BYTES: u64 = 16 * 1024;

/// hyper's limit on the bytes of a trailer section (without a configured
/// `max_buf_size`, as here).
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// hyper's limit on the fields of a trailer section (its header limit).
const MAX_TRAILERS: usize = MAX_HEADERS;

/// Why a chunked body cannot be passed on as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyError {
    /// Malformed: hyper refuses it too. The text says what is wrong.
    Invalid(&'static str),
    /// A bare LF in the trailer section. hyper takes it for a line end and
    /// re-encodes the trailers it parsed, but bytes passed on verbatim
    /// would end the body early for a server that ends lines at LF: what
    /// follows would be its next request (docs/security.md, "Request smuggling").
    BareLf,
}

impl BodyError {
    fn message(self) -> &'static str {
        match self {
            Self::Invalid(why) => why,
            Self::BareLf => "bare LF in the chunked trailer section",
        }
    }
}

/// Follows a chunked body (RFC 9112 section 7.1) through its bytes, which
/// pass on unchanged (extensions and trailers included), to find its end.
///
/// The bytes go on verbatim, so the grammar is hyper's 1.x decoder's
/// exactly (size digits with overflow check, optional SP/HTAB, extensions
/// up to a CRLF without a bare LF and at most 16 KiB per body, CRLF after
/// data) plus what hyper checks when it parses the trailers (field names
/// are tokens followed by `:`, values visible bytes, at most 100 fields
/// and 16 KiB), and no bare LF anywhere: whoever reads the bytes next, a
/// strict parser or one that ends lines at LF, finds the same end.
#[derive(Debug, Clone, Copy, Default)]
struct Chunked {
    state: ChunkState,
    /// Extension bytes so far (hyper counts them per body).
    extension_bytes: u64,
    /// Trailer section bytes so far, from its first field's first byte.
    trailer_bytes: usize,
    /// Trailer fields so far.
    trailers: usize,
}

#[derive(Debug, Clone, Copy, Default)]
enum ChunkState {
    /// The first byte of a chunk-size line.
    #[default]
    SizeStart,
    /// In the size's hex digits.
    Size(u64),
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeLws(u64),
    /// In a chunk extension, up to CR.
    Extension(u64),
    /// After the size line's CR.
    SizeLf(u64),
    /// Chunk data bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's size line, or a trailer field's CRLF.
    LineStart,
    /// In a trailer field's name.
    Name,
    /// In a trailer field's value.
    Value,
    /// After a trailer field's CR.
    FieldLf,
    /// After the trailer section's final CR.
    EndLf,
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }

    /// One more byte of the trailer section (hyper's byte limit).
    fn trailer_byte(&mut self) -> Result<(), BodyError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes >= MAX_TRAILER_BYTES {
            return Err(BodyError::Invalid("chunked trailer section over 16 KiB"));
        }
        Ok(())
    }

    /// Consumes bytes of `input` up to the body's end; how many belong to
    /// the body. `Err` on a body that cannot be passed on verbatim.
    fn feed(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        use ChunkState as S;
        let invalid = |why| Err(BodyError::Invalid(why));
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                S::Done => return Ok(i),
                S::Data(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 { S::DataCr } else { S::Data(left) };
                    continue;
                }
                S::DataCr if b == b'\r' => S::DataLf,
                S::DataLf if b == b'\n' => S::SizeStart,
                S::DataCr | S::DataLf => return invalid("chunk data not followed by CRLF"),
                S::SizeStart => match hex(b) {
                    Some(d) => S::Size(u64::from(d)),
                    None => return invalid("chunk size line does not start with a hex digit"),
                },
                S::Size(value) => match (hex(b), b) {
                    (Some(d), _) => match value
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(u64::from(d)))
                    {
                        Some(v) => S::Size(v),
                        None => return invalid("chunk size overflows"),
                    },
                    (None, b' ' | b'\t') => S::SizeLws(value),
                    (None, b';') => S::Extension(value),
                    (None, b'\r') => S::SizeLf(value),
                    (None, b'\n') => return invalid("bare LF ends a chunk size line"),
                    (None, _) => return invalid("invalid byte in a chunk size"),
                },
                S::SizeLws(value) => match b {
                    b' ' | b'\t' => S::SizeLws(value),
                    b';' => S::Extension(value),
                    b'\r' => S::SizeLf(value),
                    _ => return invalid("invalid byte after a chunk size"),
                },
                S::Extension(value) => match b {
                    b'\r' => S::SizeLf(value),
                    b'\n' => return invalid("bare LF in a chunk extension"),
                    _ => {
                        self.extension_bytes += 1;
                        if self.extension_bytes >= MAX_EXTENSION_BYTES {
                            return invalid("chunk extensions over 16 KiB");
                        }
                        S::Extension(value)
                    }
                },
                S::SizeLf(value) => match (b, value) {
                    (b'\n', 0) => S::LineStart,
                    (b'\n', n) => S::Data(n),
                    _ => return invalid("chunk size line not ended by CRLF"),
                },
                S::LineStart => match b {
                    b'\r' => {
                        if self.trailer_bytes > 0 {
                            self.trailer_byte()?;
                        }
                        S::EndLf
                    }
                    b'\n' => return Err(BodyError::BareLf),
                    _ if token(b) => {
                        self.trailer_byte()?;
                        S::Name
                    }
                    _ => return invalid("invalid trailer field name"),
                },
                S::Name => {
                    self.trailer_byte()?;
                    match b {
                        b':' => S::Value,
                        _ if token(b) => S::Name,
                        _ => return invalid("invalid trailer field name"),
                    }
                }
                S::Value => {
                    self.trailer_byte()?;
                    match b {
                        b'\r' => S::FieldLf,
                        b'\n' => return Err(BodyError::BareLf),
                        b'\t' | 0x20..=0x7e | 0x80..=0xff => S::Value,
                        _ => return invalid("invalid byte in a trailer field value"),
                    }
                }
                S::FieldLf => {
                    self.trailer_byte()?;
                    if b != b'\n' {
                        return invalid("trailer field not ended by CRLF");
                    }
                    if self.trailers >= MAX_TRAILERS {
                        return invalid("more than 100 trailer fields");
                    }
                    self.trailers += 1;
                    S::LineStart
                }
                S::EndLf => {
                    if b != b'\n' {
                        return invalid("trailer section not ended by CRLF");
                    }
                    if self.trailer_bytes > 0 {
                        self.trailer_byte()?;
                    }
                    S::Done
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

/// Whether `bytes` has an LF without a CR before it.
fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// RFC 9110 `tchar`, httparse's header-name bytes.
fn token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// hyper's reading of a `Content-Length` value: ASCII digits only (no
/// sign, no inner whitespace — httparse already trimmed the outer), within
/// `u64`. `u64::from_str` would also take `+5`, which a server reading
/// digits only takes for something else.
fn length_digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// hyper's client reading of a response's `Content-Length` headers: each
/// a comma-separated list of digit runs, all equal. `Some((length, how
/// many values))`; `None` when one is invalid or they differ.
fn response_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<(u64, usize)> {
    let mut length = None;
    let mut count = 0usize;
    for value in values {
        for item in visible(value)?.split(',') {
            let n = length_digits(item.trim().as_bytes())?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
            count += 1;
        }
    }
    length.map(|l| (l, count))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

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

    /// What hyper's HTTP/1.1 server (the hyper path's, default settings)
    /// makes of `body` as a chunked request body followed by a pipelined
    /// `GET /next`.
    #[derive(Debug, PartialEq, Eq)]
    enum Hyper {
        /// It read the body (data bytes), and `/next` as the next request
        /// or not.
        Accepted { data: Vec<u8>, next: bool },
        /// The body is an error.
        Refused,
    }

    async fn hyper_reads(body: &[u8]) -> Hyper {
        use http_body_util::BodyExt;
        use std::sync::Mutex;
        let (client, server) = tokio::io::duplex(1 << 20);
        // (path, body data or `None` for a body error), per request.
        type Seen = Vec<(String, Option<Vec<u8>>)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = Arc::clone(&seen);
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let log = Arc::clone(&log);
            async move {
                let path = req.uri().path().to_owned();
                let data = req
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .map(|c| c.to_bytes().to_vec());
                log.lock().unwrap().push((path, data));
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        });
        // Half-close: the pipelined request after our EOF is still served
        // (framing is unaffected).
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        let mut input =
            b"POST /b HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(body);
        input.extend_from_slice(b"GET /next HTTP/1.1\r\nhost: h\r\n\r\n");
        let (mut read, mut write) = tokio::io::split(client);
        let writer = async move {
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
            // Keep the write half until the server is done.
            std::future::pending::<()>().await;
        };
        let drain = async move {
            let mut sink = Vec::new();
            let _ = read.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = conn => {}
                () = writer => {}
                () = drain => {}
            }
        })
        .await;
        let seen = seen.lock().unwrap();
        match seen.first() {
            Some((path, Some(data))) if path == "/b" => Hyper::Accepted {
                data: data.clone(),
                next: seen.get(1).is_some_and(|(p, _)| p == "/next"),
            },
            _ => Hyper::Refused,
        }
    }

    /// The data of a body the fast path accepted (its grammar is strict,
    /// so plain splitting at CRLF decodes it).
    fn data_of(mut body: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let digits: String = body[..line_end]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .map(|&b| char::from(b))
                .collect();
            let size = usize::from_str_radix(&digits, 16).unwrap();
            body = &body[line_end + 2..];
            if size == 0 {
                return data;
            }
            data.extend_from_slice(&body[..size]);
            body = &body[size + 2..];
        }
    }

    /// Where a server that ends every line at LF (dropping a CR before
    /// it) and reads sizes leniently finds the end of a chunked body.
    fn lenient_end(body: &[u8]) -> Option<usize> {
        let mut pos = 0;
        let line = |pos: &mut usize| -> Option<Vec<u8>> {
            let rest = body.get(*pos..)?;
            let end = rest.iter().position(|&b| b == b'\n')?;
            *pos += end + 1;
            let mut l = rest[..end].to_vec();
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            Some(l)
        };
        loop {
            let size_line = line(&mut pos)?;
            let text = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(text.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                while !line(&mut pos)?.is_empty() {}
                return Some(pos);
            }
            pos += size;
            line(&mut pos)?;
        }
    }

    /// The fast path's verdict on a whole body, fed at once and byte by
    /// byte (which must agree).
    fn fast(body: &[u8]) -> Result<Option<usize>, BodyError> {
        let mut scan = Chunked::default();
        let whole = scan.feed(body).map(|n| scan.done().then_some(n));
        let mut scan = Chunked::default();
        let mut total = 0;
        let mut bytewise = Ok(None);
        for b in body.chunks(1) {
            match scan.feed(b) {
                Ok(n) => total += n,
                Err(e) => {
                    bytewise = Err(e);
                    break;
                }
            }
            if scan.done() {
                bytewise = Ok(Some(total));
                break;
            }
        }
        assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(body));
        whole
    }

    /// Checks the fast path against hyper and a lenient reader: a body it
    /// accepts, hyper accepts with the same data and the same end (it
    /// reads the request after it), and so does a server that ends lines
    /// at LF; a body it finds invalid, hyper refuses; a bare LF in the
    /// trailers (hyper may read it either way) is never passed on.
    fn check(rt: &tokio::runtime::Runtime, body: &[u8]) -> Result<(), String> {
        let mut shown = String::from_utf8_lossy(body).into_owned();
        if shown.len() > 120 {
            shown = format!(
                "{}… ({} bytes)",
                &shown[..shown.floor_char_boundary(100)],
                body.len()
            );
        }
        let verdict = fast(body);
        let hyper = rt.block_on(hyper_reads(body));
        match verdict {
            Ok(Some(n)) if n == body.len() => {
                let want = Hyper::Accepted {
                    data: data_of(body),
                    next: true,
                };
                if hyper != want {
                    return Err(format!("{shown:?}: fast path accepts, hyper: {hyper:?}"));
                }
                if lenient_end(body) != Some(n) {
                    return Err(format!(
                        "{shown:?}: fast path ends at {n}, a lenient server at {:?}",
                        lenient_end(body)
                    ));
                }
            }
            Ok(Some(n)) => {
                if lenient_end(body) != Some(n) {
                    return Err(format!(
                        "{shown:?}: fast path ends at {n}, a lenient server at {:?}",
                        lenient_end(body)
                    ));
                }
            }
            // Truncated: nothing to compare.
            Ok(None) => {}
            Err(BodyError::Invalid(why)) => {
                if hyper != Hyper::Refused {
                    return Err(format!(
                        "{shown:?}: fast path refuses ({why}), hyper: {hyper:?}"
                    ));
                }
            }
            Err(BodyError::BareLf) => {}
        }
        Ok(())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Finding 9: what a server ending lines at LF reads differently —
    /// the bare LFs of the finding — is refused (or, for a bare LF in the
    /// trailers, left to hyper), and everything else is decided as hyper
    /// decides it, limits included.
    #[test]
    fn h1_fast_chunked_framing_is_hyper_s_finding_9() {
        let rt = runtime();
        let smuggle = b"GET /x HTTP/1.1\r\nHost: s\r\n\r\n";
        let with = |prefix: &[u8]| [prefix, &smuggle[..]].concat();
        let bare_lf_cases = [
            with(b"0\r\n\n"),
            with(b"0\r\nx-t: 1\r\n\n"),
            b"0\r\nx-t: 1\nx-u: 2\r\n\r\n".to_vec(),
        ];
        for body in &bare_lf_cases {
            assert_eq!(fast(body), Err(BodyError::BareLf), "{body:?}");
            check(&rt, body).unwrap();
        }
        let invalid_cases: Vec<Vec<u8>> = vec![
            with(b"0;ext\n\n"),
            with(b"0\n\n"),
            with(b"0\r\n\r"),
            b"5 x\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"5 5\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"5\rhello\r\n0\r\n\r\n".to_vec(),
            b"5\r\nhello\n0\r\n\r\n".to_vec(),
            b"5\r\nhelloX\r\n0\r\n\r\n".to_vec(),
            b"-5\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"0x5\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"10000000000000000\r\n".to_vec(),
            b"0\r\n x: folded\r\n\r\n".to_vec(),
            b"0\r\nx : 1\r\n\r\n".to_vec(),
            b"0\r\nx\r\n\r\n".to_vec(),
            b"0\r\n: 1\r\n\r\n".to_vec(),
            b"0\r\nx: a\x01b\r\n\r\n".to_vec(),
            b"0\r\nx: a\x7fb\r\n\r\n".to_vec(),
            b"0\r\nx: a\rb\r\n\r\n".to_vec(),
        ];
        for body in &invalid_cases {
            assert!(
                matches!(fast(body), Err(BodyError::Invalid(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(body),
                fast(body)
            );
            check(&rt, body).unwrap();
        }
        let valid_cases: Vec<&[u8]> = vec![
            b"0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5 \t ;a=b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x y\";b\r\nhello\r\n0;z\r\n\r\n",
            b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\nx-sum: 1\r\nx-b:\t\x80 v \r\n\r\n",
            b"5;\x00\x7f\r\nhello\r\n0\r\n\r\n",
        ];
        for body in valid_cases {
            assert_eq!(fast(body), Ok(Some(body.len())), "{body:?}");
            check(&rt, body).unwrap();
        }
    }

    /// Finding 9: hyper's limits on extensions (16 KiB per body), trailer
    /// bytes (16 KiB) and trailer fields (100) hold here too, at the same
    /// byte — and a body that tries to pass them is refused.
    #[test]
    fn h1_fast_chunked_limits_are_hyper_s_finding_9() {
        let rt = runtime();
        // n extension bytes (the `;` is not one).
        let extension = |n: usize| format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(n)).into_bytes();
        let trailer_bytes = |n: usize| {
            // "0\r\n" + "x: " + value + "\r\n" + "\r\n": the section is
            // everything after "0\r\n".
            let value = "v".repeat(n - 3 - 2 - 2);
            format!("0\r\nx: {value}\r\n\r\n").into_bytes()
        };
        let fields = |n: usize| {
            let mut b = b"0\r\n".to_vec();
            for i in 0..n {
                b.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
            }
            b.extend_from_slice(b"\r\n");
            b
        };
        for (body, ok) in [
            (extension(MAX_EXTENSION_BYTES as usize - 1), true),
            (extension(MAX_EXTENSION_BYTES as usize), false),
            (trailer_bytes(MAX_TRAILER_BYTES - 1), true),
            (trailer_bytes(MAX_TRAILER_BYTES), false),
            (fields(MAX_TRAILERS), true),
            (fields(MAX_TRAILERS + 1), false),
        ] {
            let verdict = fast(&body);
            assert_eq!(verdict.is_ok(), ok, "{} bytes: {verdict:?}", body.len());
            check(&rt, &body).unwrap();
        }
    }

    /// Finding 9: `Content-Length` is read as hyper reads it — digits
    /// only (`+5` is not 5), repeated values must agree — and responses
    /// may list agreeing values (`5, 5`), as hyper's client allows.
    #[test]
    fn h1_fast_content_length_is_digits_only_finding_9() {
        for (value, want) in [
            (&b"5"[..], Some(5)),
            (b"0005", Some(5)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"+5", None),
            (b"-5", None),
            (b"5 5", None),
            (b"5,5", None),
            (b"0x5", None),
            (b"", None),
        ] {
            assert_eq!(length_digits(value), want, "{value:?}");
        }
        let values = |v: &[&'static str]| v.iter().map(|s| s.as_bytes()).collect::<Vec<_>>();
        for (headers, want) in [
            (values(&["5"]), Some((5, 1))),
            (values(&["5, 5"]), Some((5, 2))),
            (values(&["5", "5"]), Some((5, 2))),
            (values(&["5", "6"]), None),
            (values(&["5, 6"]), None),
            (values(&["+5"]), None),
            (values(&["5,"]), None),
        ] {
            assert_eq!(
                response_length(headers.iter().copied()),
                want,
                "{headers:?}"
            );
        }
        assert!(has_bare_lf(b"HTTP/1.1 200 OK\ncontent-length: 1\r\n\r\n"));
        assert!(!has_bare_lf(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"
        ));
    }

    /// A chunked body built from parts, each possibly damaged: the
    /// generator for the comparison with hyper.
    fn chunked_body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let eol = prop_oneof![
            8 => Just(b"\r\n".to_vec()),
            1 => Just(b"\n".to_vec()),
            1 => Just(b"\r".to_vec()),
            1 => Just(b"\r\r\n".to_vec()),
            1 => Just(b" \r\n".to_vec()),
        ];
        let noise = prop::sample::select(vec![
            b'\r', b'\n', b' ', b'\t', b';', b':', b'=', b'"', b'a', b'F', b'0', b'x', 0, 0x7f,
            0x80, b'-', b'+',
        ]);
        let ext = prop_oneof![
            4 => Just(Vec::new()),
            1 => Just(b";a=b".to_vec()),
            1 => Just(b" ;a".to_vec()),
            1 => prop::collection::vec(noise.clone(), 0..6),
        ];
        let chunk = (
            prop::collection::vec(b'a'..=b'z', 1..12),
            ext.clone(),
            eol.clone(),
            eol.clone(),
            any::<bool>(),
        )
            .prop_map(|(data, ext, eol1, eol2, upper)| {
                let size = if upper {
                    format!("{:X}", data.len())
                } else {
                    format!("{:x}", data.len())
                };
                [size.into_bytes(), ext, eol1, data, eol2].concat()
            });
        let trailer = (
            prop_oneof![
                4 => Just(b"x-t".to_vec()),
                1 => prop::collection::vec(noise.clone(), 0..4),
            ],
            prop_oneof![
                4 => Just(b": v".to_vec()),
                1 => prop::collection::vec(noise.clone(), 0..6),
            ],
            eol.clone(),
        )
            .prop_map(|(name, value, eol)| [name, value, eol].concat());
        (
            prop::collection::vec(chunk, 0..3),
            ext,
            eol.clone(),
            prop::collection::vec(trailer, 0..3),
            eol,
            prop::collection::vec((any::<prop::sample::Index>(), noise), 0..2),
        )
            .prop_map(|(chunks, ext, eol1, trailers, eol2, damage)| {
                let mut body = chunks.concat();
                body.extend_from_slice(b"0");
                body.extend_from_slice(&ext);
                body.extend_from_slice(&eol1);
                body.extend_from_slice(&trailers.concat());
                body.extend_from_slice(&eol2);
                for (at, byte) in damage {
                    let at = at.index(body.len() + 1);
                    body.insert(at, byte);
                }
                body
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Finding 9: on generated, often damaged chunked bodies the fast
        /// path's framing decision is hyper's, and never one a server that
        /// ends lines at LF reads differently.
        #[test]
        fn h1_fast_chunked_framing_matches_hyper_on_generated_bodies_finding_9(
            body in chunked_body()
        ) {
            let rt = runtime();
            if let Err(e) = check(&rt, &body) {
                proptest::prop_assert!(false, "{}", e);
            }
        }
    }
}
