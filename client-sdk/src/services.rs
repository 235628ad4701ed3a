//! The value types of discovery: a [`ResolvedService`] (where a service
//! resolves for a tenant), its [`ServiceInstance`]s and their
//! [`Endpoint`]s, built from the daemon's answers. Plain data with no I/O,
//! so the disk cache, the balancers and tracing can use them without
//! depending on the discovery calls (which depend on the cache).

use std::collections::BTreeMap;

use strata_proto::v1::Protocol;

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

    pub(crate) fn from_proto(instance: strata_proto::v1::Instance) -> Self {
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
