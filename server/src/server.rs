//! The daemon around the store: one listener serving gRPC (Strata services,
//! `grpc.health.v1`, server reflection) and HTTP (`/healthz`, `/readyz`,
//! `/metrics`, JSON API), background jobs, readiness and graceful drain.
//!
//! [`run`] is the whole server: tests start it on a `127.0.0.1:0` listener
//! in-process; `stratad` calls it with the configured address.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use strata_proto::v1::admin_service_server::AdminServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::admin::AdminApi;
use crate::api::{Api, Limits};
use crate::config::CompactionConfig;
use crate::error::ApiError;
use crate::grpc::GrpcApi;
use crate::hub::{ConfigLens, Hub};
use crate::service_watch::ServicesLens;
use crate::store::Store;
use crate::view::{JournalLimits, View};
use strata_proto::v1::ErrorReason;
use strata_proto::v1::config_service_server::ConfigServiceServer;
use strata_proto::v1::registry_service_server::RegistryServiceServer;
use strata_proto::v1::tenant_service_server::TenantServiceServer;

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
    ready: AtomicBool,
    api: OnceLock<Api>,
    hub: OnceLock<Arc<Hub<ConfigLens>>>,
    services_hub: OnceLock<Arc<Hub<ServicesLens>>>,
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

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        metrics::gauge!("strata_ready").set(if ready { 1.0 } else { 0.0 });
    }
}

/// Longest wait for leader-only jobs to stop at shutdown.
const JOBS_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Settings of [`run`] beyond the listener and the store.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Longest drain after the shutdown signal.
    pub shutdown_grace: Duration,
    /// Automatic history compaction.
    pub compaction: CompactionConfig,
    /// Size and count limits on writes.
    pub limits: Limits,
    /// How much recent history the view keeps for resuming watches.
    pub journal: JournalLimits,
}

/// Failures that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The metrics recorder could not be installed.
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    /// The reflection service could not load our descriptors.
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(String),
    /// The store failed while loading.
    #[error("store failed while loading: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight
/// requests for at most `options.shutdown_grace` and returns.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let prometheus = crate::telemetry::prometheus().map_err(ServerError::Metrics)?;
    let upkeep = tokio::spawn(crate::telemetry::upkeep(prometheus.clone()));
    let member = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let state = Arc::new(DaemonState {
        store: Arc::clone(&store),
        started: Instant::now(),
        member,
        prometheus,
        shutdown: CancellationToken::new(),
        limits: options.limits,
        ready: AtomicBool::new(false),
        api: OnceLock::new(),
        hub: OnceLock::new(),
        services_hub: OnceLock::new(),
    });
    metrics::gauge!("strata_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    state.set_ready(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<AdminServiceServer<AdminApi>>()
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(strata_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let grpc = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AdminServiceServer::new(AdminApi::new(Arc::clone(&state))))
        .add_service(TenantServiceServer::new(GrpcApi::new(Arc::clone(&state))))
        .add_service(ConfigServiceServer::new(GrpcApi::new(Arc::clone(&state))))
        .add_service(RegistryServiceServer::new(GrpcApi::new(Arc::clone(&state))))
        .into_axum_router();
    let app = grpc
        .merge(crate::http::router(Arc::clone(&state)))
        .merge(crate::http_api::router(Arc::clone(&state)))
        .fallback(crate::http::fallback)
        .layer(axum::middleware::from_fn(crate::telemetry::track_requests));

    let stop_accepting = state.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop_accepting.cancelled().await })
            .await
    });

    // Health answers while the view loads; readiness waits for it.
    let view = View::load(store.as_ref(), options.journal).await?;
    let loaded = store.status().await?;
    metrics::gauge!("strata_store_revision").set(loaded.revision as f64);
    metrics::gauge!("strata_store_compacted_revision").set(loaded.compacted_revision as f64);
    // The hub must listen before the view follows, so no revision escapes it.
    let _ = state
        .hub
        .set(Hub::new(Arc::clone(&view), state.member.clone()));
    let _ = state
        .services_hub
        .set(Hub::new(Arc::clone(&view), state.member.clone()));
    let follower =
        tokio::spawn(Arc::clone(&view).follow(Arc::clone(&store), state.shutdown.clone()));
    // Only this function sets it, once.
    let api = Api::new(Arc::clone(&store), view, options.limits);
    let _ = state.api.set(api.clone());
    // Leader-only jobs run on the one replica that holds the leader lease
    // (with the embedded store, always this daemon).
    let compaction = options.compaction.clone();
    let jobs = tokio::spawn(crate::leader::run(
        Arc::clone(&store),
        state.member.clone(),
        crate::leader::DEFAULT_TERM_TTL_SECONDS,
        state.shutdown.clone(),
        {
            let store = Arc::clone(&store);
            move |term: CancellationToken| {
                let (store, api, compaction) =
                    (Arc::clone(&store), api.clone(), compaction.clone());
                async move {
                    tokio::join!(
                        crate::jobs::compaction(store, compaction, term.clone()),
                        crate::registry_jobs::health_checks(api.clone(), term.clone()),
                        crate::registry_jobs::tenant_gc(
                            api.clone(),
                            crate::registry_jobs::TENANT_GC_INTERVAL,
                            term.clone(),
                        ),
                        crate::registry_jobs::instance_gauges(api, term),
                    );
                }
            }
        },
    ));
    state.set_ready(true);
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    tracing::info!(revision = loaded.revision, store = store.kind(), "ready");

    let mut server = server;
    let early_exit = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(result),
    };
    if let Some(result) = early_exit {
        upkeep.abort();
        jobs.abort();
        follower.abort();
        return match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Serve(e)),
            Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
        };
    }

    tracing::info!(grace = ?options.shutdown_grace, "draining: refusing new connections, finishing in-flight requests");
    state.set_ready(false);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<AdminServiceServer<AdminApi>>()
        .await;
    state.shutdown.cancel();
    let drained = tokio::time::timeout(options.shutdown_grace, &mut server).await;
    upkeep.abort();
    // Leader-only jobs stop on the shutdown token; give the leader a moment
    // to release its lease so a successor need not wait for it to expire.
    let mut jobs = jobs;
    if tokio::time::timeout(JOBS_STOP_TIMEOUT, &mut jobs)
        .await
        .is_err()
    {
        jobs.abort();
    }
    follower.abort();
    match drained {
        Ok(Ok(Ok(()))) => {
            tracing::info!("drained; stopped");
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(ServerError::Serve(e)),
        Ok(Err(e)) => Err(ServerError::Serve(std::io::Error::other(e))),
        Err(_) => {
            server.abort();
            tracing::warn!("grace period over; closing the connections still open");
            Ok(())
        }
    }
}
