//! gRPC handlers, one file per service, all on [`GrpcApi`] (or a small
//! wrapper of the daemon state): thin — decode the request, state what it
//! does and authorize, call one `app` operation, encode the answer; errors
//! go through the one table in [`crate::error`].
//!
//! `watch.rs` serves both watch streams — `ConfigService.Watch` and
//! `RegistryService.WatchServices` — on their own encoded routes; the
//! generated trait methods are shims over the same subscriptions.

// `AdminService` (status).
pub mod admin;
// `AuditService`.
pub mod audit;
// `BackupService`.
pub mod backup;
// `RegistryService`.
pub mod registry;
// `TokenService`.
pub mod token;
// `ConfigService`: layers, history, rollback, resolution.
pub mod config;
// `TenantService`.
pub mod tenant;
// The hot unary registry calls on their own routes, with small buffers.
pub mod unary;
// The watch streams: subscriptions, the encoded routes, their codec.
pub mod watch;

use std::sync::Arc;

use strata_proto::v1::ResponseHeader;
use tonic::Status;

use crate::app::api::Api;
use crate::error::ApiError;
use crate::store::Revision;
use crate::transport::state::DaemonState;

pub use tenant::tenant_to_proto;
pub use watch::{WATCH_CONFIG_PATH, WATCH_SERVICES_PATH, watch_config_route, watch_services_route};

/// Handler of the daemon's domain services.
#[derive(Debug, Clone)]
pub struct GrpcApi {
    pub(crate) state: Arc<DaemonState>,
}

impl GrpcApi {
    /// Handlers over the daemon's state (they answer `UNAVAILABLE` until the
    /// view is loaded).
    pub fn new(state: Arc<DaemonState>) -> Self {
        Self { state }
    }

    pub(crate) fn api(&self) -> Result<&Api, Status> {
        Ok(self.state.api()?)
    }

    pub(crate) fn header(&self, revision: Revision) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            member: self.state.member.clone(),
        })
    }
}

pub(crate) fn bad(e: impl std::fmt::Display) -> Status {
    ApiError::new(
        strata_proto::v1::ErrorReason::InvalidArgument,
        e.to_string(),
    )
    .into()
}

pub(crate) fn expected(revision: i64) -> Option<Revision> {
    (revision != 0).then_some(revision)
}
