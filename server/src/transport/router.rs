//! The daemon's one router: every gRPC service (with the watch streams and
//! the hot registry calls on their own routes), every HTTP resource, and
//! the middleware stack around them, outermost first: tracing (when
//! exporting), request metrics, authentication, rate limit, stream caps,
//! the audit scope, JSON bodies for HTTP errors.

use std::sync::Arc;

use strata_proto::v1::admin_service_server::AdminServiceServer;
use strata_proto::v1::audit_service_server::AuditServiceServer;
use strata_proto::v1::backup_service_server::BackupServiceServer;
use strata_proto::v1::config_service_server::ConfigServiceServer;
use strata_proto::v1::registry_service_server::{RegistryService, RegistryServiceServer};
use strata_proto::v1::tenant_service_server::TenantServiceServer;
use strata_proto::v1::token_service_server::TokenServiceServer;
use strata_proto::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse,
};

use crate::app::tokens::Tokens;
use crate::transport::grpc::GrpcApi;
use crate::transport::grpc::admin::AdminApi;
use crate::transport::grpc::audit::AuditApi;
use crate::transport::grpc::backup::BackupApi;
use crate::transport::grpc::token::TokenApi;
use crate::transport::grpc::unary::{DEREGISTER_PATH, HEARTBEAT_PATH, REGISTER_PATH, unary_route};
use crate::transport::grpc::{
    WATCH_CONFIG_PATH, WATCH_SERVICES_PATH, watch_config_route, watch_services_route,
};
use crate::transport::layers;
use crate::transport::state::DaemonState;

/// The reflection service could not load our descriptors.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up gRPC reflection: {0}")]
pub struct ReflectionError(String);

/// The whole router of the daemon over `state`; `health` holds the
/// `grpc.health.v1` service whose status the daemon sets.
pub fn router(
    state: &Arc<DaemonState>,
    tokens: Tokens,
    health: tonic::service::Routes,
) -> Result<axum::Router, ReflectionError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(strata_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let grpc = || GrpcApi::new(Arc::clone(state));
    let app = health
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AdminServiceServer::new(AdminApi::new(Arc::clone(state))))
        .add_service(TenantServiceServer::new(grpc()))
        .add_service(ConfigServiceServer::new(grpc()))
        .add_service(RegistryServiceServer::new(grpc()))
        .add_service(BackupServiceServer::new(BackupApi::new(Arc::clone(state))))
        .add_service(AuditServiceServer::new(AuditApi(Arc::clone(state))))
        .add_service(TokenServiceServer::new(TokenApi(tokens)))
        .into_axum_router()
        // More specific than the services' catch-all routes, so they win.
        .route_service(WATCH_CONFIG_PATH, watch_config_route(grpc()))
        .route_service(WATCH_SERVICES_PATH, watch_services_route(grpc()))
        .route_service(
            REGISTER_PATH,
            unary_route::<RegisterRequest, RegisterResponse>(state, |api, r| {
                Box::pin(async move { api.register(r).await })
            }),
        )
        .route_service(
            DEREGISTER_PATH,
            unary_route::<DeregisterRequest, DeregisterResponse>(state, |api, r| {
                Box::pin(async move { api.deregister(r).await })
            }),
        )
        .route_service(
            HEARTBEAT_PATH,
            unary_route::<HeartbeatRequest, HeartbeatResponse>(state, |api, r| {
                Box::pin(async move { api.heartbeat(r).await })
            }),
        )
        .merge(http_router(state))
        .fallback(crate::transport::http::fallback)
        // Inside authentication (they need the principal), outermost first:
        // the rate limit, the audit log, JSON bodies for every HTTP error.
        .layer(axum::middleware::from_fn(layers::limits::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.audit),
            layers::audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.streams),
            layers::limits::stream_cap,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.rate),
            layers::limits::rate_limit,
        ))
        // Every route, the fallback included, passes authentication first;
        // requests refused there are still counted by `track_requests`.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            layers::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(layers::metrics::track_requests));
    // Outermost, so refused requests are traced too; not there at all when
    // no OTLP endpoint is set, so tracing then costs nothing per request.
    Ok(if layers::tracing::enabled() {
        app.layer(axum::middleware::from_fn(layers::tracing::trace_requests))
    } else {
        app
    })
}

/// One HTTP resource file: its router, and the method and path of each
/// of its routes (from the same table).
type HttpResource = (
    fn(Arc<DaemonState>) -> axum::Router,
    fn() -> Vec<(http::Method, &'static str)>,
);

/// Every HTTP resource file the daemon serves.
const HTTP_RESOURCES: [HttpResource; 4] = [
    (
        crate::transport::http::router,
        crate::transport::http::routes,
    ),
    (
        crate::transport::http::tenants::router,
        crate::transport::http::tenants::routes,
    ),
    (
        crate::transport::http::registry::router,
        crate::transport::http::registry::routes,
    ),
    (
        crate::transport::http::audit::router,
        crate::transport::http::audit::routes,
    ),
];

/// Every HTTP/JSON route of the daemon.
fn http_router(state: &Arc<DaemonState>) -> axum::Router {
    HTTP_RESOURCES
        .iter()
        .fold(axum::Router::new(), |app, (router, _)| {
            app.merge(router(Arc::clone(state)))
        })
}

/// Method and path of every route the daemon serves over HTTP (tests walk it:
/// the audit of every route, for one).
pub fn http_routes() -> Vec<(http::Method, &'static str)> {
    HTTP_RESOURCES
        .iter()
        .flat_map(|(_, routes)| routes())
        .collect()
}
