//! Every service visible from a tenant, kept up to date: the feed behind the
//! sidecar's routing table ([`Client::watch_tenant_services`]), and a
//! tenant's chain ([`Client::tenant_chain`]).
//!
//! Unlike [`Client::watch_service`](crate::Client::watch_service), the
//! tenant is named per call rather than taken from the client: a sidecar
//! routes requests of whatever tenant their baggage names, over one set of
//! daemon connections.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::watch_services_response::Kind;
use strata_proto::v1::{GetTenantRequest, WatchServicesRequest, WatchServicesResponse};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::client::Client;
use crate::services::ResolvedService;
use crate::watch::{AbortOnDrop, Feed, Resumable, Source, spawn};
use crate::{Error, WatchError};

/// Where every service visible from one tenant resolves, at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantServices {
    /// The tenant the services are resolved for.
    pub tenant: String,
    /// Each service that resolves somewhere in the tenant's chain, by name.
    pub services: BTreeMap<String, ResolvedService>,
    /// The revision this view reflects.
    pub revision: i64,
    /// The tenant was deleted (the view is empty; the watch keeps trying
    /// in case it is created again).
    pub deleted: bool,
}

struct Slot {
    value: ArcSwap<TenantServices>,
    changes: watch::Sender<Arc<TenantServices>>,
}

struct AllServicesFeed {
    current: TenantServices,
    slot: Option<Arc<Slot>>,
}

impl Feed for AllServicesFeed {
    type Msg = WatchServicesResponse;

    async fn open(
        &self,
        client: &Client,
        channel: Channel,
        start_revision: i64,
    ) -> Result<tonic::Streaming<WatchServicesResponse>, tonic::Status> {
        let request = client.request(WatchServicesRequest {
            project: client.project().to_owned(),
            tenant: self.current.tenant.clone(),
            // Empty: every service visible from the tenant.
            services: Vec::new(),
            start_revision,
        });
        // Small codec buffers, like every other watch (`codec.rs`): a
        // sidecar holds one of these per tenant it routes for.
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
        let mut next = self.current.clone();
        if Self::is_snapshot(&msg) {
            next.services.clear();
        }
        next.revision = msg.revision;
        next.deleted = msg.tenant_deleted;
        for entry in msg.services {
            let name = entry.service.clone();
            let resolved = ResolvedService::from_proto(&name, Some(entry), msg.revision);
            // A service that no longer resolves comes with no tenant.
            if resolved.tenant.is_none() {
                next.services.remove(&name);
            } else {
                next.services.insert(name, resolved);
            }
        }
        let same = next.deleted == self.current.deleted
            && next.services.len() == self.current.services.len()
            && next
                .services
                .iter()
                .zip(self.current.services.iter())
                .all(|((a, x), (b, y))| a == b && x.same_as(y));
        self.current = next;
        if same {
            return;
        }
        if let Some(slot) = &self.slot {
            let fresh = Arc::new(self.current.clone());
            slot.value.store(Arc::clone(&fresh));
            slot.changes.send_replace(fresh);
        }
    }

    fn start_from_cache(&mut self) -> bool {
        false
    }

    fn set_source(&mut self, _source: Source) {}

    fn report(&self, error: WatchError) {
        tracing::info!(tenant = %self.current.tenant, error = %error, "tenant services watch");
    }
}

/// Every service visible from a tenant, kept up to date. The watch stops
/// when the last clone is dropped. Get one with
/// [`Client::watch_tenant_services`].
#[derive(Clone)]
pub struct TenantServicesWatch {
    slot: Arc<Slot>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for TenantServicesWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantServicesWatch")
            .field("current", &self.slot.value.load())
            .finish_non_exhaustive()
    }
}

impl TenantServicesWatch {
    /// The current view (lock-free).
    pub fn get(&self) -> Arc<TenantServices> {
        self.slot.value.load_full()
    }

    /// A receiver that sees every new view.
    pub fn changes(&self) -> watch::Receiver<Arc<TenantServices>> {
        self.slot.changes.subscribe()
    }
}

impl Client {
    /// Watches every service visible from `tenant` (any tenant of the
    /// client's project, not only the client's own), with the registry's
    /// fallback along the tenant's chain. Waits for the first answer; fails
    /// when the tenant does not exist or no daemon answers within the
    /// startup timeout. Afterwards the watch follows daemon failover like
    /// every other watch.
    pub async fn watch_tenant_services(&self, tenant: &str) -> Result<TenantServicesWatch, Error> {
        let mut feed = Resumable::new(
            self.clone(),
            AllServicesFeed {
                current: TenantServices {
                    tenant: tenant.to_owned(),
                    services: BTreeMap::new(),
                    revision: 0,
                    deleted: false,
                },
                slot: None,
            },
        );
        let live = feed.start().await?;
        let current = Arc::new(feed.feed.current.clone());
        let slot = Arc::new(Slot {
            value: ArcSwap::new(Arc::clone(&current)),
            changes: watch::channel(current).0,
        });
        feed.feed.slot = Some(Arc::clone(&slot));
        let task = spawn(feed, live);
        Ok(TenantServicesWatch {
            slot,
            _task: Arc::new(task),
        })
    }

    /// The chain of `tenant`: itself, its parent, …, the root.
    pub async fn tenant_chain(&self, tenant: &str) -> Result<Vec<String>, Error> {
        let request = GetTenantRequest {
            project: self.project().to_owned(),
            name: tenant.to_owned(),
        };
        let response = self
            .call(self.inner.request_timeout, |channel, _| {
                let request = self.request(request.clone());
                async move { TenantServiceClient::new(channel).get_tenant(request).await }
            })
            .await?
            .into_inner();
        let chain = response.tenant.map(|t| t.chain).unwrap_or_default();
        Ok(if chain.is_empty() {
            vec![tenant.to_owned()]
        } else {
            chain
        })
    }
}
