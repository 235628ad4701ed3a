//! `GET /v1/audit`: the audit log's query over HTTP, for admin tokens
//! valid for every project. Reading and filtering entries is
//! `app::audit::query`; this file only adapts it to HTTP.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use strata_proto::v1::ErrorReason;

use crate::app::audit::{Filter, authorize_query, query};
use crate::error::ApiError;
use crate::transport::http::{RouteTable, build, listed};
use crate::transport::state::DaemonState;

/// `GET /v1/audit?project=&tenant=&actor=&since_unix_ms=&until_unix_ms=&operation=&result=&limit=`.
async fn http_query(
    State(state): State<Arc<DaemonState>>,
    request: Request,
) -> Result<Response, ApiError> {
    authorize_query(crate::app::auth::principal_of(request.extensions())?)?;
    let Query(filter) = Query::<Filter>::try_from_uri(request.uri())
        .map_err(|e| ApiError::new(ErrorReason::InvalidArgument, e.body_text()))?;
    let (entries, truncated, revision) =
        query(state.store.as_ref(), &state.audit.settings, &filter).await?;
    let entries: Vec<_> = entries
        .iter()
        .map(strata_proto::names::audit_entry_json)
        .collect();
    Ok(Json(serde_json::json!({
        "revision": revision,
        "entries": entries,
        "truncated": truncated,
    }))
    .into_response())
}

fn table() -> RouteTable<Arc<DaemonState>> {
    vec![(
        http::Method::GET,
        "/v1/audit",
        axum::routing::get(http_query),
    )]
}

/// The HTTP route of the audit log.
pub fn router(state: Arc<DaemonState>) -> axum::Router {
    build(table()).with_state(state)
}

/// Method and path of every route of [`router`].
pub fn routes() -> Vec<(http::Method, &'static str)> {
    listed(table())
}
