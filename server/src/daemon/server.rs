//! The daemon around the store: one listener serving gRPC (Strata services,
//! `grpc.health.v1`, server reflection) and HTTP (`/healthz`, `/readyz`,
//! `/metrics`, JSON API), background jobs, readiness and graceful drain.
//!
//! [`run`] is the whole server: tests start it on a `127.0.0.1:0` listener
//! in-process; `stratad` calls it with the configured address.

use std::future::Future;
use std::io::IoSlice;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prost::Message;
use strata_proto::v1::admin_service_server::AdminServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_health::ServingStatus;

use crate::app::api::{Api, Limits};
use crate::daemon::settings::CompactionConfig;
use crate::state::hub::Hub;
use crate::state::view::{JournalLimits, View};
use crate::store::Store;
use crate::transport::grpc::GrpcApi;
use crate::transport::grpc::admin::AdminApi;
use crate::transport::state::DaemonState;
use strata_proto::v1::config_service_server::ConfigServiceServer;
use strata_proto::v1::registry_service_server::{RegistryService, RegistryServiceServer};
use strata_proto::v1::tenant_service_server::TenantServiceServer;
use strata_proto::v1::token_service_server::TokenServiceServer;
use strata_proto::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse,
};

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
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(String),
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
    let upkeep = tokio::spawn(crate::daemon::telemetry::upkeep(prometheus.clone()));
    let listener_addr = listener.local_addr();
    let member = listener_addr
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    // Every transaction of an audited call carries its audit entry
    // (audit.rs); the retention job and refusal entries use the raw store.
    let raw_store = store;
    let store: Arc<dyn Store> = Arc::new(crate::app::audit::AuditingStore::new(Arc::clone(
        &raw_store,
    )));
    let audit = crate::app::audit::Auditor::new(Arc::clone(&raw_store), &member, options.audit);
    let state = Arc::new(DaemonState {
        store: Arc::clone(&store),
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
        .add_service(
            strata_proto::v1::backup_service_server::BackupServiceServer::new(
                crate::transport::grpc::backup::BackupApi::new(Arc::clone(&state)),
            ),
        )
        .add_service(
            strata_proto::v1::audit_service_server::AuditServiceServer::new(
                crate::transport::grpc::audit::AuditApi(Arc::clone(&state)),
            ),
        )
        .add_service(TokenServiceServer::new(
            crate::transport::grpc::token::TokenApi(crate::app::tokens::Tokens::new(
                Arc::clone(&store),
                Arc::clone(&state.auth),
                state.member.clone(),
            )),
        ))
        .into_axum_router()
        // More specific than the services' catch-all routes, so they win.
        .route_service(
            crate::transport::grpc::WATCH_CONFIG_PATH,
            crate::transport::grpc::watch_config_route(GrpcApi::new(Arc::clone(&state))),
        )
        .route_service(
            crate::transport::grpc::WATCH_SERVICES_PATH,
            crate::transport::grpc::watch_services_route(GrpcApi::new(Arc::clone(&state))),
        )
        .route_service(
            REGISTER_PATH,
            unary_route::<RegisterRequest, RegisterResponse>(&state, |api, r| {
                Box::pin(async move { api.register(r).await })
            }),
        )
        .route_service(
            DEREGISTER_PATH,
            unary_route::<DeregisterRequest, DeregisterResponse>(&state, |api, r| {
                Box::pin(async move { api.deregister(r).await })
            }),
        )
        .route_service(
            HEARTBEAT_PATH,
            unary_route::<HeartbeatRequest, HeartbeatResponse>(&state, |api, r| {
                Box::pin(async move { api.heartbeat(r).await })
            }),
        );
    let app = grpc
        .merge(http_router(&state))
        .fallback(crate::transport::http::fallback)
        // Inside authentication (they need the principal), outermost first:
        // the rate limit, the audit log, JSON bodies for every HTTP error.
        .layer(axum::middleware::from_fn(
            crate::transport::layers::limits::json_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.audit),
            crate::transport::layers::audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.streams),
            crate::transport::layers::limits::stream_cap,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.rate),
            crate::transport::layers::limits::rate_limit,
        ))
        // Every route, the fallback included, passes authentication first;
        // requests refused there are still counted by `track_requests`.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.auth),
            crate::transport::layers::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(
            crate::transport::layers::metrics::track_requests,
        ));
    // Outermost, so refused requests are traced too; not there at all when
    // no OTLP endpoint is set, so tracing then costs nothing per request.
    let app = if crate::transport::layers::tracing::enabled() {
        app.layer(axum::middleware::from_fn(
            crate::transport::layers::tracing::trace_requests,
        ))
    } else {
        app
    };

    let stop_accepting = state.shutdown.clone();
    let tls = options.tls.clone();
    let connections = options.limits.connections;
    let server = tokio::spawn(async move {
        let stopped = async move { stop_accepting.cancelled().await };
        match tls {
            None => {
                crate::daemon::listener::serve(DaemonListener(listener), app, connections, stopped)
                    .await
            }
            Some(tls) => {
                let listener = crate::daemon::tls::TlsListener::new(DaemonListener(listener), tls);
                crate::daemon::listener::serve(listener, app, connections, stopped).await
            }
        }
    });

    // Health answers while the view loads; readiness waits for it.
    let view = View::load(store.as_ref(), options.journal).await?;
    let loaded = store.status().await?;
    metrics::gauge!("strata_store_revision").set(loaded.revision as f64);
    metrics::gauge!("strata_store_compacted_revision").set(loaded.compacted_revision as f64);
    // The hub must listen before the view follows, so no revision escapes it.
    let _ = state.hub.set(Hub::new(
        Arc::clone(&view),
        state.member.clone(),
        options.limits.counts.max_watch_selections_per_token,
    ));
    let _ = state.services_hub.set(Hub::new(
        Arc::clone(&view),
        state.member.clone(),
        options.limits.counts.max_watch_selections_per_token,
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
        Arc::clone(&store),
        Arc::clone(&state.auth),
        tokens_loaded,
        state.shutdown.clone(),
    ));
    let follower =
        tokio::spawn(Arc::clone(&view).follow(Arc::clone(&store), state.shutdown.clone()));
    // Only this function sets it, once.
    // Probes never connect to this daemon's own listener.
    let mut probes = options.probes.clone();
    if let Ok(own) = listener_addr {
        probes.deny_own(own);
    }
    let api = Api::new(Arc::clone(&store), view, options.limits).with_probe_policy(probes);
    let _ = state.api.set(api.clone());
    // Leader-only jobs run on the one replica that holds the leader lease
    // (with the embedded store, always this daemon).
    let compaction = options.compaction.clone();
    let audit_settings = options.audit;
    let jobs = tokio::spawn(crate::daemon::leader::run(
        Arc::clone(&store),
        state.member.clone(),
        crate::daemon::leader::DEFAULT_TERM_TTL_SECONDS,
        state.shutdown.clone(),
        {
            let store = Arc::clone(&store);
            move |term: CancellationToken| {
                let (store, api, compaction) =
                    (Arc::clone(&store), api.clone(), compaction.clone());
                let raw_store = Arc::clone(&raw_store);
                async move {
                    tokio::join!(
                        crate::app::audit::retention(raw_store, audit_settings, term.clone()),
                        crate::daemon::compaction::compaction(store, compaction, term.clone()),
                        crate::daemon::registry_jobs::health_checks(api.clone(), term.clone()),
                        crate::daemon::registry_jobs::tenant_gc(
                            api.clone(),
                            crate::daemon::registry_jobs::TENANT_GC_INTERVAL,
                            term.clone(),
                        ),
                        crate::daemon::registry_jobs::instance_gauges(api, term),
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
        token_follower.abort();
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
    token_follower.abort();
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

/// Routes of the registry's hot unary calls: what CD steps and SDK
/// keep-alives call at high rates.
const REGISTER_PATH: &str = "/strata.v1.RegistryService/Register";
const DEREGISTER_PATH: &str = "/strata.v1.RegistryService/Deregister";
const HEARTBEAT_PATH: &str = "/strata.v1.RegistryService/Heartbeat";

/// Bytes a unary registry call's decoder and encoder reserve. tonic's
/// default, 8 KiB each, is allocated and freed on every call, while these
/// requests and answers are a few hundred bytes; a larger message grows
/// its buffer as needed.
const UNARY_BUFFER: usize = 1024;

type UnaryFuture<Res> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Res>, tonic::Status>> + Send>>;

/// One unary `RegistryService` method served exactly as the generated
/// server serves it (the handler is still the [`RegistryService`] method),
/// but with [`SmallCodec`]'s buffers.
struct UnaryMethod<Req, Res> {
    api: GrpcApi,
    handler: fn(GrpcApi, tonic::Request<Req>) -> UnaryFuture<Res>,
}

impl<Req, Res> Clone for UnaryMethod<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            api: self.api.clone(),
            handler: self.handler,
        }
    }
}

impl<Req, Res> tonic::server::UnaryService<Req> for UnaryMethod<Req, Res> {
    type Response = Res;
    type Future = UnaryFuture<Res>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        (self.handler)(self.api.clone(), request)
    }
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

/// The axum route of one unary registry method (see [`UnaryMethod`]).
fn unary_route<Req, Res>(
    state: &Arc<DaemonState>,
    handler: fn(GrpcApi, tonic::Request<Req>) -> UnaryFuture<Res>,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static
where
    Req: Message + Default + Send + 'static,
    Res: Message + Send + 'static,
{
    let method = UnaryMethod {
        api: GrpcApi::new(Arc::clone(state)),
        handler,
    };
    tower::service_fn(move |request: axum::extract::Request| {
        let method = method.clone();
        async move {
            let mut grpc = tonic::server::Grpc::new(SmallCodec::<Res, Req>::default());
            Ok::<_, std::convert::Infallible>(grpc.unary(method, request).await)
        }
    })
}

/// Protobuf codec with [`UNARY_BUFFER`]-byte buffers: encodes `E`, decodes `D`.
struct SmallCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for SmallCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The encoding or decoding half of a [`SmallCodec`].
struct SmallHalf<T>(PhantomData<fn() -> T>);

fn unary_buffers() -> BufferSettings {
    BufferSettings::new(UNARY_BUFFER, YIELD_THRESHOLD)
}

impl<E, D> Codec for SmallCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = SmallHalf<E>;
    type Decoder = SmallHalf<D>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallHalf(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallHalf(PhantomData)
    }
}

impl<T: Message> Encoder for SmallHalf<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        // tonic reserves the message's length before encoding, so this only
        // fails if the message changed size meanwhile.
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("cannot encode the answer: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        unary_buffers()
    }
}

impl<T: Message + Default> Decoder for SmallHalf<T> {
    type Item = T;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        T::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("cannot decode the request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        unary_buffers()
    }
}

/// Encoded bytes after which a unary response is handed to HTTP/2 (tonic's
/// default; a unary call has one message, so it never applies in practice).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The daemon's listener: every accepted connection gets `TCP_NODELAY`, as
/// gRPC servers set it (a push must not wait for the peer to acknowledge
/// the previous one), and a [`CoalescingIo`].
struct DaemonListener(TcpListener);

impl axum::serve::Listener for DaemonListener {
    type Io = CoalescingIo<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        (CoalescingIo::new(stream), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Pending bytes above which [`CoalescingIo`] writes before being flushed.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Capacity a drained [`CoalescingIo`] keeps; a burst's larger buffer is
/// freed, so idle connections stay small.
const COALESCE_KEEP: usize = 4 * 1024;

/// A connection whose writes are held until a flush, and whose flushes wait
/// one turn of the scheduler.
///
/// One push to many Watch streams wakes one task per stream, and each
/// stream's write wakes its connection's task, which tokio runs right after
/// the waking task: without this, every connection wrote each push of each
/// of its streams in its own system call (about one `writev` per
/// subscriber and push; the kernel's loopback work for each came on top).
/// Re-queueing the flush behind the tasks already runnable lets the other
/// streams of the connection add their frames first, so a push to 10,000
/// subscribers over 100 connections takes a few hundred writes instead of
/// 10,000. When nothing else is runnable the flush happens on the next poll.
struct CoalescingIo<T> {
    inner: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    written: usize,
    /// The current flush was already postponed once.
    deferred: bool,
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    /// Writes everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            let rest = [IoSlice::new(&self.pending[self.written..])];
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &rest))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.pending.capacity() > COALESCE_KEEP {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.pending.len() >= COALESCE_LIMIT {
            ready!(me.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            me.pending.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pending.is_empty() {
            return Pin::new(&mut me.inner).poll_flush(cx);
        }
        if !me.deferred {
            // Waking itself puts the task at the back of the run queue.
            me.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(me.poll_drain(cx))?;
        me.deferred = false;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn coalescing_io_holds_writes_until_the_postponed_flush() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = CoalescingIo::new(near);
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two").await.unwrap();
        let mut buf = [0_u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(20), far.read(&mut buf)).await;
        assert!(early.is_err(), "nothing may reach the peer before a flush");
        let mut first = true;
        let flushed = std::future::poll_fn(|cx| {
            let r = Pin::new(&mut io).poll_flush(cx);
            if first {
                assert!(r.is_pending(), "the first flush waits one turn");
                first = false;
            }
            r
        });
        flushed.await.unwrap();
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one two");
    }

    #[tokio::test]
    async fn coalescing_io_writes_through_large_bursts_and_on_shutdown() {
        let (near, mut far) = tokio::io::duplex(4 * COALESCE_LIMIT);
        let mut io = CoalescingIo::new(near);
        let burst = vec![7_u8; COALESCE_LIMIT + 10];
        io.write_all(&burst).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        let mut got = vec![0_u8; COALESCE_LIMIT + 10];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, burst);
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    }
}
