//! The admin server: `/routes` (where each service resolves for each
//! followed tenant, and why), `/inbound` (which tenants call the app, when
//! the inbound listener runs), `/metrics` (Prometheus), `/healthz` (the
//! process runs) and `/readyz` (the own tenant's routes arrived and the
//! sidecar is not draining).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::conn::{Gate, Limits};
use crate::shutdown::Shutdown;
use crate::table::Routing;

/// What the admin server reports on.
#[derive(Debug)]
pub struct Admin {
    /// Routes.
    pub routing: Arc<Routing>,
    /// Metrics.
    pub prometheus: PrometheusHandle,
    /// Set once shutdown began.
    pub draining: Arc<AtomicBool>,
    /// Callers of the app, when the inbound listener runs.
    pub inbound: Option<Arc<crate::inbound::InboundTenants>>,
}

/// Serves until `shutdown`, with the listeners' limits: at most
/// `max_connections` connections (more get a 503) and hyper's header
/// read timeout (which also closes a connection idle that long).
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    limits: Limits,
    mut shutdown: Shutdown,
) {
    let gate = Gate::new("admin", true, &limits);
    let limits = Arc::new(limits);
    loop {
        tokio::select! {
            (stream, _, permit) = gate.accept(&listener) => {
                let admin = Arc::clone(&admin);
                let limits = Arc::clone(&limits);
                tokio::spawn(async move {
                    let _permit = permit;
                    let service = service_fn(move |req| {
                        let admin = Arc::clone(&admin);
                        async move { Ok::<_, Infallible>(admin.answer(&req)) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_read_timeout)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if served.is_err_and(|e| e.is_timeout()) {
                        limits.header_timeouts.increment(1);
                    }
                });
            }
            () = shutdown.wait() => return,
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

impl Admin {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                if self.draining.load(Ordering::Acquire) {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
                } else if self.routing.is_ready() {
                    reply(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "waiting for the own tenant's routes\n",
                    )
                }
            }
            "/routes" => match serde_json::to_vec_pretty(&self.routing.view()) {
                Ok(body) => reply(StatusCode::OK, "application/json", body),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            },
            "/inbound" => match &self.inbound {
                Some(seen) => match serde_json::to_vec_pretty(&seen.view()) {
                    Ok(body) => reply(StatusCode::OK, "application/json", body),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                },
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "no inbound listener (start with --inbound LISTEN=APP)\n",
                ),
            },
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.prometheus.render(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}
