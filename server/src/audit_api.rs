//! The audit log's query API: `AuditService.Query` over gRPC and
//! `GET /v1/audit` over HTTP, for admin tokens valid for every project.
//! Reading and filtering entries is `audit::query`; this file only adapts
//! it to the two transports.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use strata_proto::v1::audit_service_server::AuditService;
use strata_proto::v1::{ErrorReason, QueryAuditRequest, QueryAuditResponse, ResponseHeader};

use crate::audit::{Filter, query};
use crate::daemon_state::DaemonState;
use crate::error::ApiError;
use crate::http::{RouteTable, build, listed};

/// The single place that decides who may read the audit log: admin tokens
/// valid for every project.
fn authorize_query(extensions: &http::Extensions) -> Result<(), ApiError> {
    crate::auth::principal_of(extensions)?.require_admin()
}

/// `AuditService` over gRPC.
#[derive(Debug, Clone)]
pub struct AuditApi(pub Arc<DaemonState>);

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn query(
        &self,
        request: tonic::Request<QueryAuditRequest>,
    ) -> Result<tonic::Response<QueryAuditResponse>, tonic::Status> {
        authorize_query(request.extensions())?;
        let filter = Filter::from(request.into_inner());
        let (entries, truncated, revision) =
            query(self.0.store.as_ref(), &self.0.audit.settings, &filter).await?;
        Ok(tonic::Response::new(QueryAuditResponse {
            header: Some(ResponseHeader {
                revision,
                member: self.0.member.clone(),
            }),
            entries,
            truncated,
        }))
    }
}

/// `GET /v1/audit?project=&tenant=&actor=&since_unix_ms=&until_unix_ms=&operation=&result=&limit=`.
async fn http_query(
    State(state): State<Arc<DaemonState>>,
    request: Request,
) -> Result<Response, ApiError> {
    authorize_query(request.extensions())?;
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
