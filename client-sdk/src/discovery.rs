//! Discovery: [`Client::resolve`] once, or [`Client::watch_service`] for an
//! endpoint set kept up to date, both with the registry's tenant fallback
//! (the nearest tenant of the chain with a routable instance serves, and
//! the answer says whether that is a fallback).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use arc_swap::ArcSwap;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::watch_services_response::Kind;
use strata_proto::v1::{ResolveServiceRequest, WatchServicesRequest, WatchServicesResponse};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::cache::DiskCache;
use crate::client::Client;
use crate::services::ResolvedService;
use crate::watch::{AbortOnDrop, Feed, Resumable, Source, spawn};
use crate::{Error, WatchError};

struct ServiceSlot {
    value: ArcSwap<ResolvedService>,
    changes: watch::Sender<Arc<ResolvedService>>,
    /// A [`Source`] as `u8`: read lock-free by the handle, set by the task.
    source: AtomicU8,
}

struct ServicesFeed {
    service: String,
    current: Option<ResolvedService>,
    slot: Option<Arc<ServiceSlot>>,
    /// Where each new resolution is kept for a start with every daemon
    /// down (the client's cache: its tenant is the one resolved for).
    cache: Option<Arc<DiskCache>>,
}

impl Feed for ServicesFeed {
    type Msg = WatchServicesResponse;

    async fn open(
        &self,
        client: &Client,
        channel: Channel,
        start_revision: i64,
    ) -> Result<tonic::Streaming<WatchServicesResponse>, tonic::Status> {
        let request = client.request(WatchServicesRequest {
            project: client.project().to_owned(),
            tenant: client.tenant().to_owned(),
            services: vec![self.service.clone()],
            start_revision,
        });
        crate::codec::server_streaming(channel, request, "/strata.v1.RegistryService/WatchServices")
            .await
    }

    fn revision(msg: &WatchServicesResponse) -> i64 {
        msg.revision
    }

    fn is_snapshot(msg: &WatchServicesResponse) -> bool {
        msg.kind == Kind::Snapshot as i32
    }

    fn is_final(msg: &WatchServicesResponse) -> bool {
        msg.tenant_deleted
    }

    fn absorb(&mut self, msg: WatchServicesResponse) {
        let snapshot = Self::is_snapshot(&msg);
        let entry = msg.services.into_iter().find(|s| s.service == self.service);
        if entry.is_none() && !snapshot {
            return; // a change to nothing we watch
        }
        let fresh = ResolvedService::from_proto(&self.service, entry, msg.revision);
        let unchanged = self.current.as_ref().is_some_and(|c| c.same_as(&fresh));
        // A snapshot is stored even when nothing changed, so the cache's
        // revision follows the daemon's after a reconnect.
        if let Some(cache) = &self.cache
            && (snapshot || !unchanged)
        {
            cache.store_service(&fresh);
        }
        if unchanged {
            return;
        }
        self.current = Some(fresh.clone());
        if let Some(slot) = &self.slot {
            let fresh = Arc::new(fresh);
            slot.value.store(Arc::clone(&fresh));
            slot.changes.send_replace(fresh);
        }
    }

    fn start_from_cache(&mut self) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let Some(cached) = cache.lookup_service(&self.service) else {
            return false;
        };
        tracing::warn!(
            path = %cache.path().display(),
            revision = cached.revision,
            service = %self.service,
            instances = cached.instances.len(),
            "every daemon is down: starting from the disk cache; will catch up when a daemon answers"
        );
        metrics::counter!("strata_sdk_cache_starts_total").increment(1);
        self.current = Some(cached);
        true
    }

    fn set_source(&mut self, source: Source) {
        if let Some(slot) = &self.slot {
            slot.source.store(source.to_u8(), Ordering::Release);
        }
    }

    fn report(&self, error: WatchError) {
        tracing::info!(service = %self.service, error = %error, "service watch");
    }
}

/// A service's endpoint set for the client's tenant, kept up to date.
///
/// Cheap to clone; the watch stops when the last clone is dropped. Get one
/// with [`Client::watch_service`].
#[derive(Clone)]
pub struct ServiceWatch {
    slot: Arc<ServiceSlot>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for ServiceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceWatch")
            .field("current", &self.slot.value.load())
            .finish_non_exhaustive()
    }
}

impl ServiceWatch {
    /// The current resolution (lock-free).
    pub fn get(&self) -> Arc<ResolvedService> {
        self.slot.value.load_full()
    }

    /// A receiver that sees every new resolution.
    pub fn changes(&self) -> watch::Receiver<Arc<ResolvedService>> {
        self.slot.changes.subscribe()
    }

    /// Where the current resolution came from: [`Source::DiskCache`] when
    /// every daemon was down as the watch started and the set is the last
    /// one this client's cache holds, [`Source::Daemon`] once a daemon has
    /// answered.
    pub fn source(&self) -> Source {
        Source::from_u8(self.slot.source.load(Ordering::Acquire))
    }
}

impl Client {
    /// Resolves a service for this client's tenant, with fallback along the
    /// tenant chain. A service with no routable instance anywhere in the
    /// chain is not an error: the answer's `tenant` is `None` and it lists
    /// no instances.
    ///
    /// ```no_run
    /// # async fn run(client: strata_client::Client) -> Result<(), strata_client::Error> {
    /// let matchmaker = client.resolve("matchmaker").await?;
    /// if matchmaker.fallback {
    ///     println!("using {:?}'s matchmaker", matchmaker.tenant);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resolve(&self, service: &str) -> Result<ResolvedService, Error> {
        let request = ResolveServiceRequest {
            project: self.project().to_owned(),
            tenant: self.tenant().to_owned(),
            service: service.to_owned(),
        };
        let span = self.start_call_span("strata.v1.RegistryService/ResolveService", service);
        let response = self
            .call(
                self.inner.request_timeout.max(self.inner.startup_timeout),
                |channel, _| {
                    let request = self.traced_request(request.clone(), span.as_ref());
                    async move {
                        RegistryServiceClient::new(channel)
                            .resolve_service(request)
                            .await
                    }
                },
            )
            .await
            .map(tonic::Response::into_inner);
        let resolved = response.map(|response| {
            let revision = response.header.map_or(0, |h| h.revision);
            ResolvedService::from_proto(service, response.service, revision)
        });
        crate::trace::end_resolve_span(span.as_ref(), &resolved);
        resolved
    }

    /// Watches where a service resolves for this client's tenant: the
    /// handle always holds the current endpoint set (with the fallback
    /// information) and notifies of every change. Waits for the first
    /// answer. When no daemon answers within the startup timeout, it starts
    /// from the last resolution kept in the disk cache (with
    /// [`ClientBuilder::cache_dir`](crate::ClientBuilder::cache_dir);
    /// [`ServiceWatch::source`] then says so) and catches up when a daemon
    /// answers; with nothing cached it fails with [`Error::Unreachable`].
    ///
    /// ```no_run
    /// # async fn run(client: strata_client::Client) -> Result<(), strata_client::Error> {
    /// use strata_client::PowerOfTwoChoices;
    ///
    /// let matchmaker = client.watch_service("matchmaker").await?;
    /// let balancer = PowerOfTwoChoices::new();
    /// if let Some(pick) = balancer.pick(&matchmaker.get().instances) {
    ///     // `pick` counts as in flight until dropped.
    ///     println!("calling {:?}", pick.instance().address());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn watch_service(&self, service: &str) -> Result<ServiceWatch, Error> {
        let mut feed = Resumable::new(
            self.clone(),
            ServicesFeed {
                service: service.to_owned(),
                current: None,
                slot: None,
                cache: self.inner.cache.clone(),
            },
        );
        let live = feed.start().await?;
        let current = feed
            .feed
            .current
            .clone()
            .unwrap_or_else(|| ResolvedService::from_proto(service, None, feed.revision()));
        let current = Arc::new(current);
        let slot = Arc::new(ServiceSlot {
            value: ArcSwap::new(Arc::clone(&current)),
            changes: watch::channel(current).0,
            source: AtomicU8::new(feed.source().to_u8()),
        });
        feed.feed.slot = Some(Arc::clone(&slot));
        let task = spawn(feed, live);
        Ok(ServiceWatch {
            slot,
            _task: Arc::new(task),
        })
    }
}
