//! `strata.v1.AdminService`: daemon status for operators.

use std::sync::Arc;

use strata_proto::v1::admin_service_server::AdminService;
use strata_proto::v1::{ResponseHeader, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::transport::state::DaemonState;

/// gRPC handler of `AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    state: Arc<DaemonState>,
}

impl AdminApi {
    /// A handler over the daemon's shared state.
    pub fn new(state: Arc<DaemonState>) -> Self {
        Self { state }
    }
}

/// Builds the status report (shared by gRPC and `GET /v1/status`).
pub async fn status(state: &DaemonState) -> Result<StatusResponse, ApiError> {
    let store = state.store.status().await?;
    Ok(StatusResponse {
        header: Some(ResponseHeader {
            revision: store.revision,
            member: state.member.clone(),
        }),
        store_kind: state.store.kind().to_owned(),
        revision: store.revision,
        compacted_revision: store.compacted_revision,
        uptime_seconds: state.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ready: state.is_ready(),
    })
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(status(&self.state).await?))
    }
}
