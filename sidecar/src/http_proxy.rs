//! The outbound HTTP proxy: HTTP/1.1 and HTTP/2 cleartext (prior
//! knowledge, so gRPC works) on one port. The callee is the host of the
//! `Host` header or of an absolute-form URI (`svc`, `svc.strata`, with or
//! without a port), so an app can set `HTTP_PROXY` or just call
//! `http://svc/`. The request's tenant picks the route; the request goes to
//! one of the route's instances over a pooled connection of the same HTTP
//! version, carrying the tenant in its baggage. Bodies stream both ways,
//! trailers (gRPC status) pass, and HTTP/1.1 upgrades (WebSocket) become a
//! byte tunnel.
//!
//! Per request: one `ArcSwap` load and two hash probes find the route; no
//! lock and no control-plane await, except for the very first request of a
//! tenant this sidecar does not follow yet.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::shutdown::Shutdown;
use crate::table::{Lookup, Route, Routing};
use crate::tenant::{self, Origin};
use crate::upstream::{ConnectError, PooledBody};

pub use crate::upstream::ProxyBody;

/// Most attempts per request (first try plus moves to other instances or
/// fresh connections after a failed connect).
pub(crate) const MAX_ATTEMPTS: usize = 4;

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    /// Routes.
    pub routing: Arc<Routing>,
    /// Dial timeout per instance.
    pub connect_timeout: Duration,
    /// Project (metric label).
    pub project: String,
    /// Spans of proxied requests, when trace export is on.
    pub trace: Option<crate::trace::ProxyTrace>,
    /// Connection cap and timeouts of the listeners it serves.
    pub limits: crate::conn::Limits,
}

/// Serves the proxy on `listener` until `shutdown`, then lets in-flight
/// requests finish for at most `grace`.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: Shutdown, grace: Duration) {
    let limits = proxy.limits.clone();
    crate::conn::serve_http(listener, limits, shutdown, grace, "outbound", move |req| {
        handle(Arc::clone(&proxy), req)
    })
    .await;
}

/// The service name in an authority: the host without port, without a
/// `.strata` suffix (or a trailing dot), lowercased.
pub fn service_name(authority: &str) -> Option<Cow<'_, str>> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host = match host.len().checked_sub(7) {
        Some(cut) if host.is_char_boundary(cut) && host[cut..].eq_ignore_ascii_case(".strata") => {
            &host[..cut]
        }
        _ => host,
    };
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

fn callee<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(HOST)?.to_str().ok()?,
    };
    service_name(authority)
}

/// Whether a request is gRPC (its refusals then go in `grpc-status`).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Why a request could not be routed, for the caller.
pub(crate) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    service: Option<String>,
    tenant: Option<String>,
    chain: Vec<String>,
}

impl Refusal {
    /// A request naming a tenant that is not a valid tenant name.
    pub(crate) fn bad_tenant(tenant: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: format!("the request's tenant {tenant:?} is not a valid tenant name"),
            service: None,
            tenant: None,
            chain: Vec::new(),
        }
    }

    /// A request whose framing the sidecar will not pass on (why: what is
    /// wrong with it).
    pub(crate) fn malformed(why: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: format!("malformed HTTP/1.1 request: {why}"),
            service: None,
            tenant: None,
            chain: Vec::new(),
        }
    }

    /// A request head that did not arrive whole within the
    /// `header_read_timeout` (`limit`).
    pub(crate) fn head_timeout(limit: Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "deadline_exceeded",
            message: format!(
                "the request head did not arrive whole within {limit:?} (header_read_timeout)"
            ),
            service: None,
            tenant: None,
            chain: Vec::new(),
        }
    }

    /// The HTTP status the caller gets.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body of an HTTP refusal: code, message, service and tenant
    /// chain. Shared with the HTTP/1.1 fast path, which writes it itself.
    pub(crate) fn json(&self) -> String {
        serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "service": self.service,
                "tenant": self.tenant,
                "chain": self.chain,
            }
        })
        .to_string()
    }

    /// The refusal as the caller's response (gRPC status for gRPC calls).
    pub(crate) fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        if grpc {
            // gRPC clients read the status from grpc-status, not HTTP.
            let grpc_code = match self.status {
                StatusCode::BAD_REQUEST => "3",       // INVALID_ARGUMENT
                StatusCode::GATEWAY_TIMEOUT => "4",   // DEADLINE_EXCEEDED
                StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
                _ => "14",                            // UNAVAILABLE
            };
            let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static(grpc_code));
            if let Ok(v) = HeaderValue::from_str(&grpc_message(&self.message)) {
                headers.insert("grpc-message", v);
            }
            return response;
        }
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(self.json()))));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}

/// Percent-encodes what the gRPC spec does not allow raw in grpc-message.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a request goes, or the tenant the sidecar must learn first.
pub(crate) enum Found {
    /// The route, and where the request's tenant came from.
    Route(Arc<Route>, Origin),
    /// The tenant is not followed yet.
    Unknown { service: String, tenant: String },
}

fn find(proxy: &Proxy, req: &Request<Incoming>) -> Result<Found, Refusal> {
    resolve(proxy, callee(req), tenant::tenant_of(req.headers()))
}

/// The route of a request to `service` (`None`: it names none) from the
/// tenant it `named` (`None`: the sidecar's own). Shared by the hyper path
/// and the HTTP/1.1 fast path, which reads both from raw header bytes.
pub(crate) fn resolve(
    proxy: &Proxy,
    service: Option<Cow<'_, str>>,
    named: Option<(&str, Origin)>,
) -> Result<Found, Refusal> {
    let Some(service) = service else {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: "the request names no service (Host header or absolute URI)".into(),
            service: None,
            tenant: None,
            chain: Vec::new(),
        });
    };
    let own = proxy.routing.own_tenant();
    let (tenant, origin) = named.unwrap_or((own, Origin::Own));
    let table = proxy.routing.load();
    match table.lookup(tenant, &service) {
        Lookup::Route(route) => Ok(Found::Route(Arc::clone(route), origin)),
        Lookup::NoRoute(t) => Err(unroutable(&service, tenant, t.chain.clone(), t.deleted)),
        Lookup::UnknownTenant => {
            if !tenant::valid(tenant) {
                return Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    code: "invalid_argument",
                    message: format!("the request's tenant {tenant:?} is not a valid tenant name"),
                    service: Some(service.into_owned()),
                    tenant: None,
                    chain: Vec::new(),
                });
            }
            Ok(Found::Unknown {
                service: service.into_owned(),
                tenant: tenant.to_owned(),
            })
        }
    }
}

pub(crate) fn unroutable(
    service: &str,
    tenant: &str,
    chain: Vec<String>,
    deleted: bool,
) -> Refusal {
    let message = if deleted {
        format!("tenant {tenant} was deleted; no route to {service}")
    } else {
        format!(
            "no routable instance of {service} for tenant {tenant} (chain: {})",
            chain.join(" → ")
        )
    };
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message,
        service: Some(service.to_owned()),
        tenant: Some(tenant.to_owned()),
        chain,
    }
}

/// The refusal when a tenant's routes could not be learned.
pub(crate) fn learn_failed(
    service: String,
    tenant: String,
    e: &crate::table::LearnError,
) -> Refusal {
    let (status, code) = match e {
        crate::table::LearnError::RateLimited(_) => {
            (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted")
        }
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    Refusal {
        status,
        code,
        message: format!("cannot route {service} for tenant {tenant}: {e}"),
        service: Some(service),
        tenant: Some(tenant),
        chain: Vec::new(),
    }
}

async fn route_for(
    proxy: &Proxy,
    req: &Request<Incoming>,
) -> Result<(Arc<Route>, Origin), Refusal> {
    let (service, tenant) = match find(proxy, req)? {
        Found::Route(route, origin) => return Ok((route, origin)),
        Found::Unknown { service, tenant } => (service, tenant),
    };
    if let Err(e) = proxy.routing.learn(&tenant).await {
        return Err(learn_failed(service, tenant, &e));
    }
    match find(proxy, req)? {
        Found::Route(route, origin) => Ok((route, origin)),
        Found::Unknown { service, tenant } => Err(unroutable(&service, &tenant, Vec::new(), false)),
    }
}

pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let grpc = is_grpc(&req);
    // The slow path (learning a tenant) and forwarding are boxed: hyper
    // spawns a task per HTTP/2 stream around this future and moves it on
    // the way, so it should stay small.
    let found = match find(&proxy, &req) {
        Ok(Found::Route(route, origin)) => Ok((route, origin)),
        Ok(Found::Unknown { .. }) => Box::pin(route_for(&proxy, &req)).await,
        Err(refusal) => Err(refusal),
    };
    let (route, origin) = match found {
        Ok(found) => found,
        Err(refusal) => {
            metrics::counter!("strata_sidecar_unroutable_total", "project" => proxy.project.clone())
                .increment(1);
            tracing::debug!(message = %refusal.message, "request refused");
            if let Some(trace) = &proxy.trace {
                trace.refused(
                    req.headers(),
                    refusal.service.as_deref(),
                    refusal.tenant.as_deref(),
                    refusal.status.as_u16(),
                    &refusal.message,
                );
            }
            return Ok(refusal.into_response(grpc));
        }
    };
    let mut req = req;
    tenant::carry(req.headers_mut(), &route.requested, origin, &route.baggage);
    let span = proxy.trace.as_ref().map(|t| t.start(&mut req, &route));
    let outcome = Box::pin(forward(&proxy, &route, req, started + route.timeout)).await;
    let status = match &outcome {
        Ok(response) => response.status().as_u16(),
        Err(refusal) => refusal.status.as_u16(),
    };
    route.metrics.record(Some(status), started.elapsed());
    if let Some(cx) = &span {
        crate::trace::finish(cx, status);
    }
    let response = match outcome {
        Ok(response) => response.map(Either::Left),
        Err(refusal) => refusal.into_response(grpc),
    };
    Ok(response)
}

/// Turns a request into one an HTTP/1.1 upstream takes: origin-form URI
/// (an absolute-form one came from an `HTTP_PROXY` client), hop-by-hop
/// headers dropped unless they carry an upgrade.
fn prepare_h1(req: &mut Request<Incoming>) {
    if req.uri().scheme().is_some() {
        if !req.headers().contains_key(HOST)
            && let Some(a) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(HOST, a);
        }
        let origin = req
            .uri()
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        *req.uri_mut() = origin;
    }
    let headers = req.headers_mut();
    headers.remove("proxy-connection");
    headers.remove("proxy-authorization");
    headers.remove("keep-alive");
    if headers.contains_key(CONNECTION) && !headers.contains_key(UPGRADE) {
        let listed: Vec<String> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        for name in listed {
            headers.remove(name.as_str());
        }
        headers.remove(CONNECTION);
    }
}

pub(crate) fn upstream_failure(route: &Route, message: String, timeout: bool) -> Refusal {
    Refusal {
        status: if timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        },
        code: if timeout {
            "deadline_exceeded"
        } else {
            "unavailable"
        },
        message,
        service: Some(route.service.clone()),
        tenant: Some(route.tenant.clone()),
        chain: Vec::new(),
    }
}

/// Sends the request to an instance of the route: a failed connect moves
/// to another instance (the request was not sent, so this is safe for any
/// method); a failure after sending is the caller's 502.
pub(crate) async fn forward(
    proxy: &Proxy,
    route: &Route,
    mut req: Request<Incoming>,
    deadline: Instant,
) -> Result<Response<PooledBody>, Refusal> {
    let h2 = req.version() == Version::HTTP_2;
    let mut downstream_upgrade = None;
    if !h2 {
        prepare_h1(&mut req);
        if req.headers().contains_key(UPGRADE) {
            downstream_upgrade = Some(hyper::upgrade::on(&mut req));
        }
    }
    let mut tried: Vec<usize> = Vec::new();
    let mut pending = Some(req);
    let mut last_error = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        let Some(req) = pending.take() else { break };
        let Some((index, upstream)) = route.balancer.pick(&tried) else {
            break;
        };
        let upstream = Arc::clone(upstream);
        if attempt > 0 {
            metrics::counter!("strata_sidecar_upstream_retries_total", "project" => proxy.project.clone())
                .increment(1);
        }
        let _in_flight = upstream.start();
        let connect_timeout = proxy
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        if h2 {
            let mut sender = match upstream.h2(connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    connect_failed(&upstream, &e, &mut last_error);
                    tried.push(index);
                    pending = Some(req);
                    continue;
                }
            };
            match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
                Err(_) => {
                    upstream.failed();
                    return Err(upstream_failure(route, timeout_message(route), true));
                }
                Ok(Ok(response)) => {
                    return Ok(finish(&upstream, response, h2).map(PooledBody::plain));
                }
                Ok(Err(mut e)) => {
                    upstream.failed();
                    if let Some(req) = e.take_message() {
                        // Never sent: the connection was closing.
                        last_error = format!("{}: {}", upstream.address, e.error());
                        tried.push(index);
                        pending = Some(req);
                        continue;
                    }
                    return Err(upstream_failure(
                        route,
                        format!("{} ({}): {}", route.service, upstream.address, e.error()),
                        false,
                    ));
                }
            }
        }
        let (mut sender, reused) = match upstream.h1(connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                connect_failed(&upstream, &e, &mut last_error);
                tried.push(index);
                pending = Some(req);
                continue;
            }
        };
        match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
            Err(_) => {
                upstream.failed();
                return Err(upstream_failure(route, timeout_message(route), true));
            }
            Ok(Ok(mut response)) => {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(downstream) = downstream_upgrade.take() {
                        let upstream_upgrade = hyper::upgrade::on(&mut response);
                        tokio::spawn(tunnel(downstream, upstream_upgrade));
                    }
                    return Ok(finish(&upstream, response, h2).map(PooledBody::plain));
                }
                let response = finish(&upstream, response, h2);
                let upstream = Arc::clone(&upstream);
                return Ok(response.map(move |body| PooledBody::pooled(body, upstream, sender)));
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    // A pooled keep-alive connection the upstream had
                    // closed: not the instance's fault, try again.
                    if !reused {
                        upstream.failed();
                        tried.push(index);
                    }
                    last_error = format!("{}: {}", upstream.address, e.error());
                    pending = Some(req);
                    continue;
                }
                upstream.failed();
                return Err(upstream_failure(
                    route,
                    format!("{} ({}): {}", route.service, upstream.address, e.error()),
                    false,
                ));
            }
        }
    }
    Err(unreachable(route, &last_error))
}

/// The refusal when no instance of a route could be reached (or it has
/// none).
pub(crate) fn unreachable(route: &Route, last_error: &str) -> Refusal {
    let message = if route.balancer.is_empty() {
        format!(
            "{} has no routable instance in {}",
            route.service, route.tenant
        )
    } else {
        format!(
            "no instance of {} in {} could be reached: {last_error}",
            route.service, route.tenant
        )
    };
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "unavailable",
        message,
        service: Some(route.service.clone()),
        tenant: Some(route.tenant.clone()),
        chain: Vec::new(),
    }
}

pub(crate) fn timeout_message(route: &Route) -> String {
    format!(
        "{} in {} did not answer within {:?}",
        route.service, route.tenant, route.timeout
    )
}

pub(crate) fn connect_failed(
    upstream: &crate::upstream::Upstream,
    e: &ConnectError,
    last: &mut String,
) {
    tracing::debug!(error = %e, "upstream connect failed; trying another instance");
    upstream.failed();
    *last = e.to_string();
}

/// Bookkeeping on a response head: 5xx count towards ejection, anything
/// else clears the streak; connection-scoped headers of an HTTP/1.1
/// upstream are not passed on (except for an upgrade).
fn finish(
    upstream: &crate::upstream::Upstream,
    mut response: Response<Incoming>,
    h2: bool,
) -> Response<Incoming> {
    if response.status().is_server_error() {
        upstream.failed();
    } else {
        upstream.succeeded();
    }
    if !h2 && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let headers = response.headers_mut();
        if headers.contains_key(CONNECTION) {
            headers.remove(CONNECTION);
        }
        if headers.contains_key("keep-alive") {
            headers.remove("keep-alive");
        }
    }
    response
}

/// Joins an upgraded downstream connection to the upgraded upstream one.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(downstream, upstream) {
        Ok((d, u)) => {
            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_from_authorities() {
        let cases = [
            ("matchmaker", Some("matchmaker")),
            ("matchmaker:8080", Some("matchmaker")),
            ("matchmaker.strata", Some("matchmaker")),
            ("Matchmaker.Strata:80", Some("matchmaker")),
            ("matchmaker.strata.", Some("matchmaker")),
            ("user@b:1", Some("b")),
            (":80", None),
            (".strata", None),
        ];
        for (authority, want) in cases {
            assert_eq!(service_name(authority).as_deref(), want, "{authority}");
        }
        assert_eq!(grpc_message("50% → x"), "50%25 %E2%86%92 x");
    }
}
