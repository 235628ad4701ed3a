//! Discovery: [`Client::resolve`] once, or [`Client::watch_service`] for an
//! endpoint set kept up to date, both with the registry's tenant fallback
//! (the nearest tenant of the chain with a routable instance serves, and
//! the answer says whether that is a fallback).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use arc_swap::ArcSwap;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::watch_services_response::Kind;
use strata_proto::v1::{
    Protocol, ResolveServiceRequest, WatchServicesRequest, WatchServicesResponse,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::cache::DiskCache;
use crate::client::Client;
use crate::watch::{AbortOnDrop, Feed, Resumable, Source, spawn};
use crate::{Error, WatchError};

/// One endpoint of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// The endpoint's protocol (its own, else the instance's).
    pub protocol: Protocol,
}

/// A routable instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceInstance {
    /// Instance id, unique within its tenant and service.
    pub id: String,
    /// The tenant it is registered in.
    pub tenant: String,
    /// Endpoints by name.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Relative load-balancing weight (1–10000).
    pub weight: u32,
    /// The version it runs.
    pub version: String,
}

impl ServiceInstance {
    /// The address of the `main` endpoint, else of the first endpoint by
    /// name.
    pub fn address(&self) -> Option<&str> {
        self.endpoints
            .get("main")
            .or_else(|| self.endpoints.values().next())
            .map(|e| e.address.as_str())
    }

    /// An endpoint by name.
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.get(name)
    }

    fn from_proto(instance: strata_proto::v1::Instance) -> Self {
        let default_protocol =
            Protocol::try_from(instance.protocol).unwrap_or(Protocol::Unspecified);
        Self {
            id: instance.id,
            tenant: instance.tenant,
            endpoints: instance
                .endpoints
                .into_iter()
                .map(|(name, e)| {
                    let protocol = match Protocol::try_from(e.protocol) {
                        Ok(Protocol::Unspecified) | Err(_) => default_protocol,
                        Ok(p) => p,
                    };
                    (
                        name,
                        Endpoint {
                            address: e.address,
                            protocol,
                        },
                    )
                })
                .collect(),
            metadata: instance.metadata.into_iter().collect(),
            weight: if instance.weight == 0 {
                100
            } else {
                instance.weight
            },
            version: instance.version,
        }
    }
}

/// Where a service resolves for the client's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedService {
    /// The service.
    pub service: String,
    /// The tenant that serves it: the nearest of the chain with a routable
    /// instance; `None` when none has one (or a strict tenant has none).
    pub tenant: Option<String>,
    /// Whether the serving tenant is not the client's own (an ancestor
    /// such as `integration` serves).
    pub fallback: bool,
    /// The serving tenant's routable instances, by id.
    pub instances: Vec<ServiceInstance>,
    /// The revision this answer reflects.
    pub revision: i64,
}

impl ResolvedService {
    pub(crate) fn from_proto(
        service: &str,
        resolved: Option<strata_proto::v1::ResolvedService>,
        revision: i64,
    ) -> Self {
        let resolved = resolved.unwrap_or_default();
        let mut instances: Vec<ServiceInstance> = resolved
            .instances
            .into_iter()
            .map(ServiceInstance::from_proto)
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            service: service.to_owned(),
            tenant: (!resolved.tenant.is_empty()).then_some(resolved.tenant),
            fallback: resolved.fallback,
            instances,
            revision,
        }
    }

    /// Same answer, whatever the revision.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.tenant == other.tenant
            && self.fallback == other.fallback
            && self.instances == other.instances
    }
}

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
