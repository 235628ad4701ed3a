//! Plain HTTP routes served on the gRPC listener (liveness, readiness,
//! Prometheus metrics, a JSON status for curl), and what every HTTP/JSON
//! handler shares: its state, body and flag helpers.

// The audit log's query route.
pub mod audit;
// The registry's JSON API.
pub mod registry;
// The JSON API of tenants and config.
pub mod tenants;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use http::{Method, StatusCode, header};

use axum::body::{Body, Bytes};
use strata_proto::v1::ErrorReason;

use crate::app::api::Api;
use crate::error::ApiError;
use crate::transport::state::DaemonState;

/// Routes of one HTTP resource file: method, path, handler. Each file
/// builds its router from its table ([`build`]) and lists it for
/// [`crate::transport::router::http_routes`], so the routes a test walks are the
/// routes served.
pub type RouteTable<S> = Vec<(Method, &'static str, MethodRouter<S>)>;

/// The router of a route table (handlers of one path are merged).
pub fn build<S: Clone + Send + Sync + 'static>(table: RouteTable<S>) -> Router<S> {
    table
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
}

/// The method and path of every route of a table.
pub fn listed<S>(table: RouteTable<S>) -> Vec<(Method, &'static str)> {
    table
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

fn table() -> RouteTable<Arc<DaemonState>> {
    vec![
        (Method::GET, "/healthz", get(healthz)),
        (Method::GET, "/readyz", get(readyz)),
        (Method::GET, "/metrics", get(metrics)),
        (Method::GET, "/v1/status", get(status)),
    ]
}

/// The health, metrics and status routes.
pub fn router(state: Arc<DaemonState>) -> Router {
    build(table()).with_state(state)
}

/// Method and path of every route of [`router`].
pub fn routes() -> Vec<(Method, &'static str)> {
    listed(table())
}

/// Alive as long as the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 once the store is open and loaded, 503 before that and while draining.
async fn readyz(State(state): State<Arc<DaemonState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// Answers requests that match no route: gRPC callers get `UNIMPLEMENTED`,
/// everyone else a JSON 404.
pub async fn fallback(request: axum::extract::Request) -> Response {
    if crate::transport::grpc_methods::is_grpc(request.headers()) {
        return tonic::Status::unimplemented(format!("unknown method {}", request.uri().path()))
            .into_http();
    }
    ApiError::new(
        strata_proto::v1::ErrorReason::NotFound,
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
    .into_response()
}

async fn metrics(State(state): State<Arc<DaemonState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

async fn status(State(state): State<Arc<DaemonState>>) -> Result<Response, ApiError> {
    let s = crate::transport::grpc::admin::status(&state).await?;
    Ok(Json(serde_json::json!({
        "revision": s.revision,
        "compacted_revision": s.compacted_revision,
        "store_kind": s.store_kind,
        "uptime_seconds": s.uptime_seconds,
        "version": s.version,
        "ready": s.ready,
        "member": s.header.map(|h| h.member).unwrap_or_default(),
    }))
    .into_response())
}

/// Handler state of the JSON API.
#[derive(Clone)]
pub(crate) struct HttpState(pub(crate) Arc<DaemonState>);

impl HttpState {
    pub(crate) fn api(&self) -> Result<&Api, ApiError> {
        self.0.api()
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorReason::InvalidArgument, message)
}

pub(crate) fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("" | "true" | "1") => Ok(true),
        Some(other) => Err(invalid(format!(
            "query parameter {name}={other:?} must be true or false"
        ))),
    }
}

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            ErrorReason::LimitExceeded,
            format!("request body exceeds {limit} bytes"),
        )
        .with("limit_bytes", limit)
    })
}

/// Parses a JSON request body that must be an object. serde would also
/// fill a struct from an array (`[]` would be an empty tenant body), and
/// its own recursion limit keeps deep documents from the stack.
pub fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |m: String| ApiError::new(ErrorReason::InvalidArgument, m);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(invalid(
            "invalid JSON body: expected a JSON object `{…}`".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}
