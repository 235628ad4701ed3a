//! What every request handler shares: the store, the operations (`Api`)
//! once the view is loaded, the watch hubs, authentication, the audit log,
//! rate and stream limits, readiness. `daemon::server` builds it and wires the
//! daemon; the gRPC and HTTP handlers only read it, so they import this
//! file, never the one that starts everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;
use strata_proto::v1::ErrorReason;
use tokio_util::sync::CancellationToken;

use crate::app::api::{Api, Limits};
use crate::app::service_watch::ServicesLens;
use crate::error::ApiError;
use crate::state::hub::{ConfigLens, Hub};
use crate::store::Store;

/// Everything request handlers share.
pub struct DaemonState {
    /// The store backend.
    pub store: Arc<dyn Store>,
    /// When this daemon started.
    pub started: Instant,
    /// Name of this replica in response headers (its listen address).
    pub member: String,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Fires when the daemon starts draining; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Size and count limits on writes.
    pub limits: Limits,
    /// Checks bearer tokens; its table follows the store.
    pub auth: Arc<crate::app::auth::Authenticator>,
    /// The audit log.
    pub audit: Arc<crate::app::audit::Auditor>,
    /// Request rate per token (the middleware's, and each KeepAlive
    /// message's).
    pub rate: Arc<crate::transport::layers::limits::RateLimiter>,
    /// Open streams per token.
    pub streams: Arc<crate::transport::layers::limits::StreamCounter>,
    pub(crate) ready: AtomicBool,
    pub(crate) api: OnceLock<Api>,
    pub(crate) hub: OnceLock<Arc<Hub<ConfigLens>>>,
    pub(crate) services_hub: OnceLock<Arc<Hub<ServicesLens>>>,
}

impl std::fmt::Debug for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonState")
            .field("store", &self.store.kind())
            .field("member", &self.member)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl DaemonState {
    /// Whether the daemon serves reads and writes (store open and loaded, not draining).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The tenant and config operations, once the view is loaded.
    pub fn api(&self) -> Result<&Api, ApiError> {
        self.api.get().ok_or_else(|| {
            ApiError::new(
                ErrorReason::Unavailable,
                "stratad is still loading its view of the store",
            )
        })
    }

    /// The watch hub, once the view is loaded.
    pub fn hub(&self) -> Result<&Arc<Hub<ConfigLens>>, ApiError> {
        self.hub.get().ok_or_else(|| {
            ApiError::new(
                ErrorReason::Unavailable,
                "stratad is still loading its view of the store",
            )
        })
    }

    /// The services watch hub, once the view is loaded.
    pub fn services_hub(&self) -> Result<&Arc<Hub<ServicesLens>>, ApiError> {
        self.services_hub.get().ok_or_else(|| {
            ApiError::new(
                ErrorReason::Unavailable,
                "stratad is still loading its view of the store",
            )
        })
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        metrics::gauge!("strata_ready").set(if ready { 1.0 } else { 0.0 });
    }
}
