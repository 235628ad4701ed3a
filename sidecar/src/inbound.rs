//! The optional inbound listener in front of the app
//! (`--inbound 10.1.2.3:15006=127.0.0.1:8080`, the address callers use):
//! calls to the app pass
//! through the sidecar, which records the tenant each one came from.
//!
//! What it gives an operator and the app:
//! - which branches call this instance, and how often: the
//!   `strata_sidecar_inbound_requests_total{tenant}` counter and the
//!   admin server's `/inbound` (per tenant: requests, last seen);
//! - one place the tenant of a call is normalised: whatever the caller
//!   sent (`baggage` or `x-strata-tenant`), the app receives it as the
//!   `strata-tenant` baggage entry, which the SDK's propagation helpers
//!   read — so the app's callbacks through the outbound proxy go back to
//!   the caller's branch;
//! - a call naming a malformed tenant is refused with 400 before it
//!   reaches the app, as on the outbound side.
//!
//! Forwarding is the outbound proxy's (pooled HTTP/1.1 and h2c
//! connections, upgrades, trailers), to one fixed upstream: the app.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use metrics::{Counter, Histogram, counter, histogram};
use serde::Serialize;
use tokio::time::Instant;

use crate::http_proxy::{self, Proxy, ProxyBody, Refusal};
use crate::table::Route;
use crate::tenant;
use crate::upstream::{Balancer, Ejection, Upstream};

/// The `tenant` label of calls that named no tenant. Not a valid tenant
/// name (`_`), so it cannot collide with one.
const NO_TENANT: &str = "_none";

/// The `tenant` label once [`InboundTenants`] tracks its maximum of
/// distinct tenants: a caller cannot grow the metric set without bound.
const OTHER_TENANTS: &str = "_other";

/// The inbound listener's state.
#[derive(Debug)]
pub struct Inbound {
    /// Dial timeout and project (shared with the outbound proxy).
    pub proxy: Arc<Proxy>,
    /// A route with the app as its only instance.
    pub app: Arc<Route>,
    /// Who called.
    pub seen: Arc<InboundTenants>,
}

impl Inbound {
    /// The inbound state for an app at `app`, forwarded with the outbound
    /// proxy's `proxy` settings.
    pub fn new(
        proxy: Arc<Proxy>,
        app: SocketAddr,
        own_tenant: &str,
        timeout: std::time::Duration,
        ejection: Ejection,
        max_tenants: usize,
    ) -> Self {
        let upstream = Arc::new(Upstream::new(
            app.to_string(),
            own_tenant.to_owned(),
            "app".to_owned(),
            ejection,
        ));
        // The route's outbound metric handles are built against a no-op
        // recorder: inbound calls are counted by `InboundTenants`, and an
        // outbound series named after the app would be misleading.
        let metrics = metrics::with_local_recorder(&metrics::NoopRecorder, || {
            crate::metrics::RouteMetrics::new(&proxy.project, "app", own_tenant, false)
        });
        let app_route = Route {
            service: "app".to_owned(),
            requested: own_tenant.to_owned(),
            tenant: own_tenant.to_owned(),
            fallback: false,
            balancer: Balancer::new(vec![(upstream, 1)]),
            timeout,
            metrics,
            baggage: tenant::baggage_value(own_tenant)
                .unwrap_or_else(|| http::HeaderValue::from_static("")),
        };
        let seen = Arc::new(InboundTenants::new(&proxy.project, app, max_tenants));
        Self {
            proxy,
            app: Arc::new(app_route),
            seen,
        }
    }
}

/// Serves the inbound listener until `shutdown`, then lets in-flight
/// calls finish for at most `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    inbound: Arc<Inbound>,
    shutdown: crate::shutdown::Shutdown,
    grace: std::time::Duration,
) {
    let limits = inbound.proxy.limits.clone();
    crate::conn::serve_http(listener, limits, shutdown, grace, "inbound", move |req| {
        handle(Arc::clone(&inbound), req)
    })
    .await;
}

async fn handle(
    inbound: Arc<Inbound>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let grpc = http_proxy::is_grpc(&req);
    let named = tenant::tenant_of(req.headers()).map(|(t, origin)| (t.to_owned(), origin));
    let caller = match named {
        Some((name, _)) if !tenant::valid(&name) => {
            let refusal = Refusal::bad_tenant(&name);
            inbound
                .seen
                .record(None, Some(StatusCode::BAD_REQUEST.as_u16()), started);
            return Ok(refusal.into_response(grpc));
        }
        Some((name, origin)) => {
            if let Some(value) = tenant::baggage_value(&name) {
                tenant::carry(req.headers_mut(), &name, origin, &value);
            }
            Some(name)
        }
        None => None,
    };
    let deadline = started + inbound.app.timeout;
    let outcome = Box::pin(http_proxy::forward(
        &inbound.proxy,
        &inbound.app,
        req,
        deadline,
    ))
    .await;
    let response = match outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            inbound
                .seen
                .record(caller.as_deref(), Some(status), started);
            response.map(Either::Left)
        }
        Err(refusal) => {
            inbound
                .seen
                .record(caller.as_deref(), Some(refusal.status().as_u16()), started);
            refusal.into_response(grpc)
        }
    };
    Ok(response)
}

/// Calls seen by the inbound listener, by calling tenant.
#[derive(Debug)]
pub struct InboundTenants {
    project: String,
    app: SocketAddr,
    max_tenants: usize,
    duration: Histogram,
    by_tenant: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    requests: u64,
    last_seen_ms: u64,
    /// By status class: 1xx … 5xx, no status.
    counters: [Counter; 6],
}

/// One calling tenant in `/inbound`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CallerView {
    /// The tenant the calls named; `None` for calls that named none.
    pub tenant: Option<String>,
    /// Calls so far.
    pub requests: u64,
    /// When the last one arrived (Unix milliseconds).
    pub last_seen_unix_ms: u64,
}

/// The admin server's `/inbound`.
#[derive(Debug, Serialize)]
pub struct InboundView {
    /// The app's address.
    pub app: String,
    /// Calling tenants, most recent first.
    pub callers: Vec<CallerView>,
}

impl InboundTenants {
    fn new(project: &str, app: SocketAddr, max_tenants: usize) -> Self {
        Self {
            project: project.to_owned(),
            app,
            max_tenants: max_tenants.max(1),
            duration: histogram!(
                "strata_sidecar_inbound_request_duration_seconds",
                "project" => project.to_owned(),
            ),
            by_tenant: Mutex::new(HashMap::new()),
        }
    }

    /// Records one call from `tenant` (`None`: it named none) answered with
    /// `status` (`None`: no HTTP status).
    pub fn record(&self, tenant: Option<&str>, status: Option<u16>, started: Instant) {
        self.duration.record(started.elapsed().as_secs_f64());
        let class = match status {
            Some(s @ 100..=599) => usize::from(s / 100 - 1),
            _ => 5,
        };
        let key = tenant.unwrap_or(NO_TENANT);
        let mut by_tenant = self
            .by_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = if by_tenant.contains_key(key) || by_tenant.len() < self.max_tenants {
            key
        } else {
            OTHER_TENANTS
        };
        if !by_tenant.contains_key(key) {
            let seen = Seen {
                requests: 0,
                last_seen_ms: 0,
                counters: ["1xx", "2xx", "3xx", "4xx", "5xx", "error"].map(|code| {
                    counter!(
                        "strata_sidecar_inbound_requests_total",
                        "project" => self.project.clone(),
                        "tenant" => key.to_owned(),
                        "code" => code,
                    )
                }),
            };
            by_tenant.insert(key.to_owned(), seen);
        }
        if let Some(seen) = by_tenant.get_mut(key) {
            seen.requests += 1;
            seen.last_seen_ms = unix_ms();
            seen.counters[class].increment(1);
        }
    }

    /// What `/inbound` shows.
    pub fn view(&self) -> InboundView {
        let by_tenant = self
            .by_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut callers: Vec<CallerView> = by_tenant
            .iter()
            .map(|(tenant, seen)| CallerView {
                tenant: (tenant != NO_TENANT).then(|| tenant.clone()),
                requests: seen.requests,
                last_seen_unix_ms: seen.last_seen_ms,
            })
            .collect();
        callers.sort_by(|a, b| {
            b.last_seen_unix_ms
                .cmp(&a.last_seen_unix_ms)
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        InboundView {
            app: self.app.to_string(),
            callers,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn callers_are_counted_by_tenant_and_capped() {
        let seen = InboundTenants::new("vega", "127.0.0.1:8080".parse().unwrap(), 2);
        let now = Instant::now();
        seen.record(Some("feat-1"), Some(200), now);
        seen.record(Some("feat-1"), Some(503), now);
        seen.record(None, Some(200), now);
        // A third distinct tenant goes to the overflow entry.
        seen.record(Some("feat-2"), Some(200), now);
        let view = seen.view();
        let requests = |t: Option<&str>| {
            view.callers
                .iter()
                .find(|c| c.tenant.as_deref() == t)
                .map(|c| c.requests)
        };
        assert_eq!(requests(Some("feat-1")), Some(2));
        assert_eq!(requests(None), Some(1));
        assert_eq!(requests(Some("feat-2")), None);
        assert_eq!(requests(Some(OTHER_TENANTS)), Some(1));
    }
}
