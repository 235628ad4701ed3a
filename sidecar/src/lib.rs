//! `strata-sidecar`: routes an app's outbound calls to the nearest tenant
//! that runs the callee (docs/sidecar.md).
//!
//! - [`http_proxy`] — HTTP/1.1 + h2c outbound proxy (default
//!   `127.0.0.1:15001`); the callee is named by the `Host` header or an
//!   absolute URI.
//! - [`h1_fast`] — the outbound proxy's HTTP/1.1 fast path (raw bytes,
//!   `httparse`), handing anything unusual to [`http_proxy`].
//! - [`tenant`] — the tenant of a request (baggage `strata-tenant`,
//!   `x-strata-tenant`, else the sidecar's own) and carrying it on.
//! - [`table`] — the routing table, pushed from `stratad` through the SDK
//!   and held in an `ArcSwap` snapshot.
//! - [`upstream`] — pooled upstream connections, weighted balancing,
//!   connect retries on another instance, passive ejection.
//! - [`tcp_proxy`] — raw TCP ports per callee, optionally speaking
//!   PROXY protocol v2 with the tenant in a TLV ([`proxy_protocol`]).
//! - [`inbound`] — optional listener in front of the app that records the
//!   tenant of incoming calls.
//! - [`admin`] — `/routes`, `/metrics`, `/healthz`, `/readyz` (default
//!   `127.0.0.1:15000`).
//! - [`config`] — settings from flags, env and a TOML file.
//! - [`conn`] — every listener's connection cap, request-head and idle
//!   timeouts.
//! - [`trace`] — OpenTelemetry spans of proxied requests, W3C trace
//!   context carried to the callee (when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set).

pub mod admin;
pub mod config;
pub mod conn;
pub mod h1_fast;
pub mod http_proxy;
pub mod inbound;
pub mod metrics;
pub mod proxy_protocol;
pub mod shutdown;
pub mod table;
pub mod tcp_proxy;
pub mod tenant;
pub mod trace;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Settings;
pub use shutdown::Shutdown;

/// The sockets the sidecar serves on, bound before [`run`] so a caller
/// (or a test) can bind port 0 and learn the addresses.
#[derive(Debug)]
pub struct Listeners {
    /// Outbound HTTP proxy.
    pub outbound: TcpListener,
    /// Admin server.
    pub admin: TcpListener,
    /// Raw TCP routes: listener and route.
    pub tcp: Vec<(TcpListener, config::TcpRoute)>,
    /// Inbound listener in front of the app, if configured.
    pub inbound: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address of `settings`.
    pub async fn bind(settings: &Settings) -> Result<Self, RunError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Bind(addr, e))
        };
        let mut tcp = Vec::new();
        for route in &settings.tcp {
            tcp.push((bind(route.listen).await?, route.clone()));
        }
        let inbound = match settings.inbound {
            Some(route) => Some(bind(route.listen).await?),
            None => None,
        };
        Ok(Self {
            outbound: bind(settings.outbound).await?,
            admin: bind(settings.admin).await?,
            tcp,
            inbound,
        })
    }
}

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The SDK client could not be built from the settings.
    #[error("{0}")]
    Client(#[from] strata_client::Error),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Runs the sidecar until `shutdown` resolves: then readiness turns false,
/// listeners stop accepting, and in-flight requests and TCP connections
/// get `settings.shutdown_grace` to finish.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let prometheus = metrics::prometheus().map_err(RunError::Metrics)?;
    let mut builder = strata_client::Client::builder()
        .endpoints(settings.endpoints.iter().cloned())
        .project(settings.project.clone())
        .tenant(settings.tenant.clone());
    if let Some(token) = &settings.token {
        builder = builder.token(token.clone());
    }
    if let Some(tls) = &settings.tls {
        builder = builder.tls(tls.clone());
    }
    let client = builder.build()?;
    // Off (no endpoint): nothing is built, no thread is started.
    let exporter = settings.tracing.start("strata-sidecar")?;
    let routing = table::Routing::start(client, &settings);

    let (stop, stopped) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));
    let grace = settings.shutdown_grace;
    let mut serving = tokio::task::JoinSet::new();

    tracing::info!(
        outbound = %listeners.outbound.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        admin = %listeners.admin.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        project = %settings.project, tenant = %settings.tenant,
        "strata-sidecar listening"
    );
    let limits = conn::Limits::new(&settings);
    let proxy = Arc::new(http_proxy::Proxy {
        routing: Arc::clone(&routing),
        connect_timeout: settings.connect_timeout,
        project: settings.project.clone(),
        trace: exporter
            .clone()
            .map(|e| trace::ProxyTrace::new(e, settings.project.clone())),
        limits: limits.clone(),
    });
    let inbound = match (listeners.inbound, settings.inbound) {
        (Some(listener), Some(route)) => {
            tracing::info!(
                listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
                app = %route.app, "inbound listener"
            );
            if route.listen.ip().is_unspecified() {
                // What the operator asked for, said out loud: callers on
                // every network the host is on can reach the app here.
                tracing::info!(
                    listen = %route.listen,
                    "the inbound listener accepts connections on every interface of this host"
                );
            }
            let inbound = Arc::new(inbound::Inbound::new(
                Arc::clone(&proxy),
                route.app,
                &settings.tenant,
                settings.timeout,
                upstream::Ejection {
                    after: settings.eject_after.max(1),
                    duration: settings.eject_for,
                },
                settings.max_tenants,
            ));
            let seen = Arc::clone(&inbound.seen);
            serving.spawn(inbound::serve(
                listener,
                inbound,
                Shutdown(stopped.clone()),
                grace,
            ));
            Some(seen)
        }
        _ => None,
    };
    if proxy.trace.is_some() {
        // Spans are made from the hyper path's `http::Request`.
        serving.spawn(http_proxy::serve(
            listeners.outbound,
            proxy,
            Shutdown(stopped.clone()),
            grace,
        ));
    } else {
        serving.spawn(h1_fast::serve(
            listeners.outbound,
            proxy,
            Shutdown(stopped.clone()),
            grace,
        ));
    }
    for (listener, route) in listeners.tcp {
        tracing::info!(
            listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            service = %route.service, accept_proxy = route.accept_proxy,
            send_proxy = route.send_proxy, "TCP route"
        );
        let gate = conn::Gate::new(
            format!("TCP route {} ({})", route.listen, route.service),
            false,
            &limits,
        );
        let proxy = Arc::new(tcp_proxy::TcpProxy {
            gate,
            routing: Arc::clone(&routing),
            service: route.service,
            connect_timeout: settings.connect_timeout,
            project: settings.project.clone(),
            accept_proxy: route.accept_proxy,
            send_proxy: route.send_proxy,
            header_timeout: settings.proxy_header_timeout,
        });
        serving.spawn(tcp_proxy::serve(
            listener,
            proxy,
            Shutdown(stopped.clone()),
            grace,
        ));
    }
    let admin = Arc::new(admin::Admin {
        routing: Arc::clone(&routing),
        prometheus: prometheus.clone(),
        draining: Arc::clone(&draining),
        inbound,
    });
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        admin,
        limits,
        Shutdown(stopped.clone()),
    ));
    let upkeep = tokio::spawn(strata_metrics::upkeep(prometheus));

    shutdown.await;
    tracing::info!("shutting down: draining for at most {grace:?}");
    draining.store(true, Ordering::Release);
    let _ = stop.send(true);
    while serving.join_next().await.is_some() {}
    let _ = admin_task.await;
    upkeep.abort();
    // After the drain, so the spans of the last requests are exported.
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    tracing::info!("strata-sidecar stopped");
    Ok(())
}
