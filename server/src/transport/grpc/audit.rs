//! `AuditService` over gRPC: the audit log's query, for admin tokens valid
//! for every project.

use std::sync::Arc;

use strata_proto::v1::audit_service_server::AuditService;
use strata_proto::v1::{QueryAuditRequest, QueryAuditResponse, ResponseHeader};

use crate::app::audit::{Filter, authorize_query, query};
use crate::app::auth::principal_of;
use crate::transport::state::DaemonState;

/// `AuditService` over gRPC.
#[derive(Debug, Clone)]
pub struct AuditApi(pub Arc<DaemonState>);

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn query(
        &self,
        request: tonic::Request<QueryAuditRequest>,
    ) -> Result<tonic::Response<QueryAuditResponse>, tonic::Status> {
        authorize_query(principal_of(request.extensions())?)?;
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
