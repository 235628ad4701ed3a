//! The daemon around the store: one listener serving gRPC (Strata services,
//! `grpc.health.v1`, server reflection) and HTTP (`/healthz`, `/readyz`,
//! `/metrics`, JSON API), background jobs, readiness and graceful drain.
//!
//! [`run`] is the whole server: tests start it on a `127.0.0.1:0` listener
//! in-process; `stratad` calls it with the configured address.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use strata_proto::v1::admin_service_server::AdminServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::app::api::{Api, Limits};
use crate::app::tokens::Tokens;
use crate::daemon::settings::CompactionConfig;
use crate::daemon::sockets::DaemonListener;
use crate::state::hub::Hub;
use crate::state::view::{JournalLimits, View};
use crate::store::Store;
use crate::transport::grpc::admin::AdminApi;
use crate::transport::state::DaemonState;

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
    /// TLS for the listener (`None`: plaintext).
    pub tls: Option<crate::daemon::tls::ServerTls>,
    /// Tokens (`admin_token_file` `None`: `./admin.token`).
    pub auth: crate::app::auth::AuthConfig,
    /// Retention of the audit log.
    pub audit: crate::app::audit::AuditSettings,
    /// Where health probes may connect (the listener's own address is
    /// added by [`run`]).
    pub probes: crate::probe::policy::ProbePolicy,
}

/// Failures that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The metrics recorder could not be installed.
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    /// The reflection service could not load our descriptors.
    #[error(transparent)]
    Reflection(#[from] crate::transport::router::ReflectionError),
    /// The store failed while loading.
    #[error("store failed while loading: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The token table could not be loaded or the admin token created.
    #[error("{0}")]
    Auth(String),
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
    let prometheus = crate::daemon::telemetry::prometheus().map_err(ServerError::Metrics)?;
    let upkeep = tokio::spawn(strata_metrics::upkeep(prometheus.clone()));
    let listener_addr = listener.local_addr().ok();
    // Every transaction of an audited call carries its audit entry; the
    // retention job and refusal entries use the raw store.
    let raw_store = store;
    let state = daemon_state(&raw_store, listener_addr, prometheus, &options);
    metrics::gauge!("strata_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    state.set_ready(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    set_serving(&health, false).await;
    let tokens = Tokens::new(
        Arc::clone(&state.store),
        Arc::clone(&state.auth),
        state.member.clone(),
    );
    let health_routes = tonic::service::Routes::new(health_service);
    let app = crate::transport::router::router(&state, tokens, health_routes)?;
    let mut server = serve(listener, app, &state, &options);

    // Health answers while the view loads; readiness waits for it.
    let loaded = match load(&state, listener_addr, &options).await {
        Ok(loaded) => loaded,
        Err(e) => {
            upkeep.abort();
            state.shutdown.cancel();
            server.abort();
            return Err(e);
        }
    };
    let jobs = leader_jobs(&state, &raw_store, &loaded.api, &options);
    state.set_ready(true);
    set_serving(&health, true).await;
    tracing::info!(
        revision = loaded.revision,
        store = state.store.kind(),
        "ready"
    );

    let early_exit = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(result),
    };
    let followers = [loaded.view_follower, loaded.token_follower];
    if let Some(result) = early_exit {
        upkeep.abort();
        jobs.abort();
        followers.iter().for_each(JoinHandle::abort);
        return match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Serve(e)),
            Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
        };
    }
    let drained = drain(&state, &health, &mut server, options.shutdown_grace).await;
    upkeep.abort();
    stop_jobs(jobs).await;
    followers.iter().for_each(JoinHandle::abort);
    drained
}

/// What every handler shares, before the view is loaded.
fn daemon_state(
    raw_store: &Arc<dyn Store>,
    listener_addr: Option<SocketAddr>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    options: &ServerOptions,
) -> Arc<DaemonState> {
    let member = listener_addr.map(|a| a.to_string()).unwrap_or_default();
    let store: Arc<dyn Store> =
        Arc::new(crate::app::audit::AuditingStore::new(Arc::clone(raw_store)));
    let audit = crate::app::audit::Auditor::new(Arc::clone(raw_store), &member, options.audit);
    Arc::new(DaemonState {
        store,
        started: Instant::now(),
        member,
        prometheus,
        shutdown: CancellationToken::new(),
        limits: options.limits,
        auth: crate::app::auth::Authenticator::new(&options.auth),
        audit,
        rate: crate::transport::layers::limits::RateLimiter::new(options.limits.rate),
        streams: crate::transport::layers::limits::StreamCounter::new(
            options.limits.counts.max_streams_per_token,
        ),
        ready: AtomicBool::new(false),
        api: OnceLock::new(),
        hub: OnceLock::new(),
        services_hub: OnceLock::new(),
    })
}

/// Sets the `grpc.health.v1` status of the daemon and of `AdminService`.
async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    if serving {
        health.set_serving::<AdminServiceServer<AdminApi>>().await;
    } else {
        health
            .set_not_serving::<AdminServiceServer<AdminApi>>()
            .await;
    }
}

/// Serves `app` on `listener` (with TLS when configured) until the state's
/// shutdown token is cancelled.
fn serve(
    listener: TcpListener,
    app: axum::Router,
    state: &Arc<DaemonState>,
    options: &ServerOptions,
) -> JoinHandle<std::io::Result<()>> {
    let stop_accepting = state.shutdown.clone();
    let tls = options.tls.clone();
    let connections = options.limits.connections;
    tokio::spawn(async move {
        let stopped = async move { stop_accepting.cancelled().await };
        let listener = DaemonListener(listener);
        match tls {
            None => crate::daemon::listener::serve(listener, app, connections, stopped).await,
            Some(tls) => {
                let listener = crate::daemon::tls::TlsListener::new(listener, tls);
                crate::daemon::listener::serve(listener, app, connections, stopped).await
            }
        }
    })
}

/// What [`load`] started.
struct Loaded {
    api: Api,
    revision: i64,
    view_follower: JoinHandle<()>,
    token_follower: JoinHandle<()>,
}

/// Loads the view, starts the hubs, loads the tokens (creating the first
/// admin token on a new store) and sets the operations: after this the
/// daemon can answer every call.
async fn load(
    state: &Arc<DaemonState>,
    listener_addr: Option<SocketAddr>,
    options: &ServerOptions,
) -> Result<Loaded, ServerError> {
    let store = &state.store;
    let view = View::load(store.as_ref(), options.journal).await?;
    let loaded = store.status().await?;
    metrics::gauge!("strata_store_revision").set(loaded.revision as f64);
    metrics::gauge!("strata_store_compacted_revision").set(loaded.compacted_revision as f64);
    // The hub must listen before the view follows, so no revision escapes it.
    let max_selections = options.limits.counts.max_watch_selections_per_token;
    let _ = state.hub.set(Hub::new(
        Arc::clone(&view),
        state.member.clone(),
        max_selections,
    ));
    let _ = state.services_hub.set(Hub::new(
        Arc::clone(&view),
        state.member.clone(),
        max_selections,
    ));
    // Tokens load (and on a new store, the admin token is created) before
    // readiness, so a ready daemon authenticates every valid token.
    let token_file = options
        .auth
        .admin_token_file
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("admin.token"));
    let tokens_loaded = crate::app::tokens::start(store.as_ref(), &state.auth, &token_file)
        .await
        .map_err(ServerError::Auth)?;
    let token_follower = tokio::spawn(crate::app::tokens::follow(
        Arc::clone(store),
        Arc::clone(&state.auth),
        tokens_loaded,
        state.shutdown.clone(),
    ));
    let view_follower =
        tokio::spawn(Arc::clone(&view).follow(Arc::clone(store), state.shutdown.clone()));
    // Probes never connect to this daemon's own listener.
    let mut probes = options.probes.clone();
    if let Some(own) = listener_addr {
        probes.deny_own(own);
    }
    let api = Api::new(Arc::clone(store), view, options.limits).with_probe_policy(probes);
    let _ = state.api.set(api.clone());
    Ok(Loaded {
        api,
        revision: loaded.revision,
        view_follower,
        token_follower,
    })
}

/// Leader-only jobs, run on the one replica that holds the leader lease
/// (with the embedded store, always this daemon): audit retention, history
/// compaction, health checks, tenant TTL collection, instance gauges.
fn leader_jobs(
    state: &Arc<DaemonState>,
    raw_store: &Arc<dyn Store>,
    api: &Api,
    options: &ServerOptions,
) -> JoinHandle<()> {
    let store = Arc::clone(&state.store);
    let raw_store = Arc::clone(raw_store);
    let api = api.clone();
    let compaction = options.compaction.clone();
    let audit_settings = options.audit;
    tokio::spawn(crate::daemon::leader::run(
        Arc::clone(&state.store),
        state.member.clone(),
        crate::daemon::leader::DEFAULT_TERM_TTL_SECONDS,
        state.shutdown.clone(),
        move |term: CancellationToken| {
            let (store, raw_store, api, compaction) = (
                Arc::clone(&store),
                Arc::clone(&raw_store),
                api.clone(),
                compaction.clone(),
            );
            async move {
                use crate::daemon::registry_jobs::{
                    TENANT_GC_INTERVAL, health_checks, instance_gauges, tenant_gc,
                };
                tokio::join!(
                    crate::app::audit::retention(raw_store, audit_settings, term.clone()),
                    crate::daemon::compaction::compaction(store, compaction, term.clone()),
                    health_checks(api.clone(), term.clone()),
                    tenant_gc(api.clone(), TENANT_GC_INTERVAL, term.clone()),
                    instance_gauges(api, term),
                );
            }
        },
    ))
}

/// Stops accepting, and waits up to `grace` for in-flight requests; then
/// closes what is still open.
async fn drain(
    state: &Arc<DaemonState>,
    health: &HealthReporter,
    server: &mut JoinHandle<std::io::Result<()>>,
    grace: Duration,
) -> Result<(), ServerError> {
    tracing::info!(grace = ?grace, "draining: refusing new connections, finishing in-flight requests");
    state.set_ready(false);
    set_serving(health, false).await;
    state.shutdown.cancel();
    match tokio::time::timeout(grace, &mut *server).await {
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

/// Leader-only jobs stop on the shutdown token; the leader gets a moment to
/// release its lease so a successor need not wait for it to expire.
async fn stop_jobs(mut jobs: JoinHandle<()>) {
    if tokio::time::timeout(JOBS_STOP_TIMEOUT, &mut jobs)
        .await
        .is_err()
    {
        jobs.abort();
    }
}
