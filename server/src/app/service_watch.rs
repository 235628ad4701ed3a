//! The services watch: a subscriber names a tenant and services (or all)
//! and is pushed each service's resolved endpoint set — which tenant serves
//! it, whether that is a fallback, its routable instances — whenever that
//! changes. The mechanics (groups, replay, resets) are the hub's; this is
//! the [`Lens`] that says what a service resolution is.

use strata_proto::v1::watch_services_response::Kind;
use strata_proto::v1::{ResolvedService, ResponseHeader, WatchServicesResponse};

use crate::app::registry::resolution;
use crate::app::registry_wire::resolution_to_proto;
use crate::state::hub::{Affects, Frame, Lens, Resolution};
use crate::state::view::{Change, Object, ProjectView};
use crate::store::Revision;

/// Which services a subscriber watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceSelection {
    /// Sorted, deduplicated names; empty watches every service.
    services: Vec<String>,
}

impl ServiceSelection {
    /// A selection of `services` (empty: every service visible from the
    /// tenant, including ones registered later).
    pub fn new(mut services: Vec<String>) -> Self {
        services.sort();
        services.dedup();
        Self { services }
    }

    /// Whether `service` is watched.
    pub fn matches(&self, service: &str) -> bool {
        self.services.is_empty()
            || self
                .services
                .binary_search_by(|s| s.as_str().cmp(service))
                .is_ok()
    }
}

/// The services watch.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServicesLens;

impl Lens for ServicesLens {
    type Selection = ServiceSelection;
    type Value = ResolvedService;
    type Message = WatchServicesResponse;

    const NAME: &'static str = "services";

    fn resolve_all(
        p: &ProjectView,
        chain: &[&str],
        selection: &ServiceSelection,
    ) -> Resolution<ResolvedService> {
        let names: Vec<String> = if selection.services.is_empty() {
            p.services_in_chain(chain).into_iter().collect()
        } else {
            selection.services.clone()
        };
        names
            .into_iter()
            .filter_map(|s| Self::resolve_one(p, chain, &s).map(|r| (s, r)))
            .collect()
    }

    fn resolve_one(p: &ProjectView, chain: &[&str], service: &str) -> Option<ResolvedService> {
        let mut resolved = resolution(p, chain, service);
        // One encoding goes to every subscriber, whatever its token:
        // probe failure texts and lease ids stay out of it (list or
        // resolve the service to see them with a register token).
        for instance in &mut resolved.instances {
            instance.redact();
        }
        resolved
            .tenant
            .is_some()
            .then(|| resolution_to_proto(resolved))
    }

    fn affects<'c>(change: &'c Change, selection: &ServiceSelection) -> Affects<'c> {
        match &change.object {
            Object::Tenant => Affects::Everything,
            Object::Instance { service, .. } | Object::Health { service, .. }
                if selection.matches(service) =>
            {
                Affects::Name(service)
            }
            _ => Affects::Nothing,
        }
    }

    fn same(a: &ResolvedService, b: &ResolvedService) -> bool {
        a == b
    }

    fn message(
        frame: Frame,
        entries: Vec<(String, Option<ResolvedService>)>,
    ) -> WatchServicesResponse {
        WatchServicesResponse {
            header: Some(ResponseHeader {
                revision: frame.revision,
                member: frame.member,
            }),
            kind: if frame.snapshot {
                Kind::Snapshot
            } else {
                Kind::Change
            } as i32,
            revision: frame.revision,
            reset: frame.reset,
            services: entries
                .into_iter()
                .map(|(service, value)| {
                    value.unwrap_or(ResolvedService {
                        service,
                        ..ResolvedService::default()
                    })
                })
                .collect(),
            tenant_deleted: frame.tenant_deleted,
        }
    }

    fn revision(message: &WatchServicesResponse) -> Revision {
        message.revision
    }

    fn is_last(message: &WatchServicesResponse) -> bool {
        message.tenant_deleted
    }

    fn mark_reset(message: &mut WatchServicesResponse) {
        message.reset = true;
    }
}
