//! Raw TCP routes: a local port per callee (`--tcp 127.0.0.1:16001=matchmaker`).
//! A connection is routed for the sidecar's own tenant with the same
//! fallback as HTTP (the registry's resolution along the chain), to an
//! instance picked by the same balancer; a failed connect moves on to
//! another instance. Bytes are then copied both ways until either side
//! closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Shutdown;
use crate::table::{Lookup, Route, Routing};

/// One TCP route's listener and what it needs.
#[derive(Debug)]
pub struct TcpProxy {
    /// Routes.
    pub routing: Arc<Routing>,
    /// The service connections go to.
    pub service: String,
    /// Dial timeout per instance.
    pub connect_timeout: Duration,
    /// Project (metric label).
    pub project: String,
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
            accepted = listener.accept() => {
                while connections.try_join_next().is_some() {}
                match accepted {
                    Ok((stream, _)) => {
                        let proxy = Arc::clone(&proxy);
                        connections.spawn(async move { proxy.handle(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
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
    fn route(&self) -> Option<Arc<Route>> {
        let table = self.routing.load();
        match table.lookup(self.routing.own_tenant(), &self.service) {
            Lookup::Route(route) => Some(Arc::clone(route)),
            Lookup::NoRoute(_) | Lookup::UnknownTenant => None,
        }
    }

    async fn handle(&self, mut downstream: TcpStream) {
        let started = Instant::now();
        let _ = downstream.set_nodelay(true);
        let Some(route) = self.route() else {
            tracing::warn!(
                service = %self.service, tenant = %self.routing.own_tenant(),
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
            match upstream.dial(self.connect_timeout).await {
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
}
