//! Raw TCP routes: a local port per callee (`--tcp 127.0.0.1:16001=matchmaker`).
//! A connection is routed for the sidecar's own tenant with the same
//! fallback as HTTP (the registry's resolution along the chain), to an
//! instance picked by the same balancer; a failed connect moves on to
//! another instance. Bytes are then copied both ways until either side
//! closes.
//!
//! A route may speak PROXY protocol v2 ([`crate::proxy_protocol`]): with
//! `accept-proxy` the app's header names the tenant the connection is routed
//! for (so one local port serves every branch a test harness drives); with
//! `send-proxy` the callee learns the original addresses and the tenant.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::proxy_protocol;
use crate::shutdown::Shutdown;
use crate::table::{Lookup, Route, Routing};

/// One TCP route's listener and what it needs.
#[derive(Debug)]
pub struct TcpProxy {
    /// The route's connection cap (`max_connections`): connections beyond
    /// it are closed at once.
    pub gate: crate::conn::Gate,
    /// Routes.
    pub routing: Arc<Routing>,
    /// The service connections go to.
    pub service: String,
    /// Dial timeout per instance.
    pub connect_timeout: Duration,
    /// Project (metric label).
    pub project: String,
    /// Read a PROXY v2 header from the app first; its tenant TLV picks the
    /// route.
    pub accept_proxy: bool,
    /// Write a PROXY v2 header with the tenant to the upstream first.
    pub send_proxy: bool,
    /// How long the app may take to send its PROXY v2 header.
    pub header_timeout: Duration,
}

/// Accepts connections until `shutdown`, then lets open ones run for at
/// most `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<TcpProxy>,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            (stream, peer, permit) = proxy.gate.accept(&listener) => {
                while connections.try_join_next().is_some() {}
                let proxy = Arc::clone(&proxy);
                connections.spawn(async move {
                    let _permit = permit;
                    proxy.handle(stream, peer).await;
                });
            }
            () = shutdown.wait() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(service = %proxy.service, "TCP connections still open after {grace:?}; closing them");
        connections.abort_all();
    }
}

impl TcpProxy {
    fn lookup(&self, tenant: &str) -> Result<Option<Arc<Route>>, ()> {
        let table = self.routing.load();
        match table.lookup(tenant, &self.service) {
            Lookup::Route(route) => Ok(Some(Arc::clone(route))),
            Lookup::NoRoute(_) => Ok(None),
            Lookup::UnknownTenant => Err(()),
        }
    }

    /// The route for `tenant`; a tenant the sidecar does not follow yet
    /// (named by a PROXY header) is learned first, as for HTTP.
    async fn route(&self, tenant: &str) -> Option<Arc<Route>> {
        match self.lookup(tenant) {
            Ok(route) => route,
            Err(()) => {
                if let Err(e) = self.routing.learn(tenant).await {
                    tracing::warn!(tenant, error = %e, "cannot learn the routes of a TCP connection's tenant");
                    return None;
                }
                self.lookup(tenant).ok().flatten()
            }
        }
    }

    async fn handle(&self, mut downstream: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let mut accepted = proxy_protocol::Accepted::default();
        if self.accept_proxy {
            match proxy_protocol::read_header(&mut downstream, self.header_timeout).await {
                Ok(header) => accepted = header,
                Err(e) => {
                    tracing::warn!(service = %self.service, %peer, error = %e, "refusing a TCP connection without a valid PROXY v2 header");
                    metrics::counter!("strata_sidecar_proxy_header_errors_total", "project" => self.project.clone())
                        .increment(1);
                    return;
                }
            }
        }
        let tenant = accepted
            .tenant
            .as_deref()
            .unwrap_or_else(|| self.routing.own_tenant());
        let Some(route) = self.route(tenant).await else {
            tracing::warn!(
                service = %self.service, tenant,
                "no routable instance for a TCP connection; closing it"
            );
            metrics::counter!("strata_sidecar_unroutable_total", "project" => self.project.clone())
                .increment(1);
            return;
        };
        let mut tried = Vec::new();
        while let Some((index, upstream)) = route.balancer.pick(&tried) {
            let upstream = Arc::clone(upstream);
            let _in_flight = upstream.start();
            let dialled = match upstream.dial(self.connect_timeout).await {
                Ok(stream) if self.send_proxy => {
                    self.introduce(stream, &downstream, peer, &accepted, &route.requested)
                        .await
                }
                other => other.map_err(|e| e.to_string()),
            };
            match dialled {
                Ok(mut stream) => {
                    upstream.succeeded();
                    route.metrics.record(Some(200), started.elapsed());
                    if let Err(e) =
                        tokio::io::copy_bidirectional(&mut downstream, &mut stream).await
                    {
                        tracing::debug!(error = %e, "TCP connection ended");
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TCP upstream connect failed; trying another instance");
                    upstream.failed();
                    tried.push(index);
                }
            }
        }
        tracing::warn!(service = %self.service, tenant = %route.tenant, "no instance could be reached for a TCP connection");
        route.metrics.record(None, started.elapsed());
    }

    /// Sends the PROXY v2 header to a freshly dialled upstream: the
    /// original addresses (the app's header's, else this connection's) and
    /// the tenant the connection was routed for.
    async fn introduce(
        &self,
        mut upstream: TcpStream,
        downstream: &TcpStream,
        peer: SocketAddr,
        accepted: &proxy_protocol::Accepted,
        tenant: &str,
    ) -> Result<TcpStream, String> {
        let (source, destination) = match accepted.addresses {
            Some(addresses) => addresses,
            None => (peer, downstream.local_addr().map_err(|e| e.to_string())?),
        };
        let header =
            proxy_protocol::encode(source, destination, tenant).map_err(|e| e.to_string())?;
        upstream
            .write_all(&header)
            .await
            .map_err(|e| format!("sending the PROXY v2 header: {e}"))?;
        Ok(upstream)
    }
}
