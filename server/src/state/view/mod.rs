//! The daemon's in-memory view of the store: every tenant and config layer,
//! loaded at revision R and kept current by following the store's watch from
//! R+1. All reads are served from here; writes go to the store, and a write
//! is answered only after the view has applied its revision
//! ([`View::wait_for`]), so a client reads its own writes on this replica.

// The view that follows the store: load, follow, wait for a revision.
mod follow;
// What changed at each revision, kept for resuming watches.
mod journal;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::document::{Format, Mode};
use crate::domain::registry;
use crate::domain::resolve::{self, Layer, ResolveError, Resolved};
use crate::state::keyspace::{
    self, HealthRecord, InstanceRecord, LayerRecord, Parsed, TenantRecord,
};
use crate::store::{Event, EventKind, KeyRange, LeaseId, Revision, Store, StoreError, WatchBatch};

pub use follow::*;
pub use journal::*;

/// Longest tenant chain (the tenant and its ancestors).
pub const MAX_CHAIN: usize = 8;

/// A tenant as the view holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantEntry {
    /// Stored record.
    pub record: TenantRecord,
    /// Revision of creation.
    pub create_revision: Revision,
    /// Revision of the last change.
    pub mod_revision: Revision,
}

/// A config layer as the view holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// Raw value.
    pub value: Arc<[u8]>,
    /// Format.
    pub format: Format,
    /// Mode.
    pub mode: Mode,
    /// Revision of the last change.
    pub mod_revision: Revision,
}

/// A registered service instance as the view holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceEntry {
    /// Stored record.
    pub record: Arc<InstanceRecord>,
    /// Lease of an ephemeral instance (0 for persistent ones).
    pub lease: LeaseId,
    /// Revision of the first registration.
    pub create_revision: Revision,
    /// Revision of the last change.
    pub mod_revision: Revision,
}

/// The probe verdict on a persistent instance.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthEntry {
    /// Stored verdict.
    pub record: HealthRecord,
    /// Revision of the last change.
    pub mod_revision: Revision,
}

/// Instances (or verdicts) of a tenant by service, then instance id.
pub type ByService<T> = BTreeMap<String, BTreeMap<String, T>>;

/// The version numbers a layer's history holds in the store. Versions are
/// written with increasing numbers and pruned oldest first, so the kept
/// ones are always the contiguous span `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionSpan {
    /// Oldest kept version.
    pub first: u64,
    /// Newest version.
    pub last: u64,
}

impl VersionSpan {
    /// How many versions are kept.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Whether no versions are kept (never true for a span the view holds).
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }
}

/// One project's tenants and layers.
#[derive(Debug, Default, Clone)]
pub struct ProjectView {
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantEntry>,
    /// Layers by tenant, then key.
    pub layers: BTreeMap<String, BTreeMap<String, LayerEntry>>,
    /// Which versions of each layer's history the store holds, by tenant,
    /// then key. Only the numbers: the versions themselves are read from the
    /// store when asked for, so history costs the view a few bytes per key.
    pub history: BTreeMap<String, BTreeMap<String, VersionSpan>>,
    /// Service instances by tenant.
    pub instances: BTreeMap<String, ByService<InstanceEntry>>,
    /// Probe verdicts by tenant (only persistent instances with a check
    /// have one).
    pub health: BTreeMap<String, ByService<HealthEntry>>,
    /// How many of this project's instances hold each lease: a lease
    /// belongs to the projects whose instances it keeps alive, and only
    /// callers of those projects may renew it.
    pub leases: HashMap<LeaseId, usize>,
    /// Bytes of the values of every current layer of the project.
    pub config_bytes: usize,
}

impl ProjectView {
    /// The chain of `tenant`: itself first, then its ancestors to the root.
    /// `None` when the tenant does not exist.
    pub fn chain(&self, tenant: &str) -> Option<Vec<&str>> {
        let mut chain = Vec::new();
        let mut current = self.tenants.get_key_value(tenant)?;
        loop {
            chain.push(current.0.as_str());
            let parent = &current.1.record.parent;
            if parent.is_empty() || chain.len() > 2 * MAX_CHAIN {
                return Some(chain);
            }
            match self.tenants.get_key_value(parent.as_str()) {
                Some(next) => current = next,
                None => return Some(chain),
            }
        }
    }

    /// Direct children of `tenant`, by name.
    pub fn children(&self, tenant: &str) -> Vec<&str> {
        self.tenants
            .iter()
            .filter(|(_, t)| t.record.parent == tenant)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// `tenant` and every tenant below it, parents before children.
    pub fn subtree(&self, tenant: &str) -> Vec<&str> {
        let mut out = vec![];
        let mut queue = std::collections::VecDeque::from([tenant]);
        while let Some(t) = queue.pop_front() {
            if let Some((name, _)) = self.tenants.get_key_value(t) {
                out.push(name.as_str());
                queue.extend(self.children(t));
            }
        }
        out
    }

    /// The versions kept of the history of `key` in `tenant`, if any.
    pub fn versions(&self, tenant: &str, key: &str) -> Option<VersionSpan> {
        self.history.get(tenant)?.get(key).copied()
    }

    fn note_version(&mut self, tenant: &str, key: &str, seq: u64, exists: bool) {
        if exists {
            self.history
                .entry(tenant.to_owned())
                .or_default()
                .entry(key.to_owned())
                .and_modify(|span| {
                    span.first = span.first.min(seq);
                    span.last = span.last.max(seq);
                })
                .or_insert(VersionSpan {
                    first: seq,
                    last: seq,
                });
            return;
        }
        let Some(keys) = self.history.get_mut(tenant) else {
            return;
        };
        if let Some(span) = keys.get_mut(key) {
            if seq == span.first {
                span.first += 1;
            } else if seq == span.last {
                span.last -= 1;
            }
            if span.is_empty() {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.history.remove(tenant);
        }
    }

    /// An instance of `service` in `tenant`, if registered.
    pub fn instance(&self, tenant: &str, service: &str, id: &str) -> Option<&InstanceEntry> {
        self.instances.get(tenant)?.get(service)?.get(id)
    }

    /// The probe verdict on an instance, if it has one.
    pub fn health_of(&self, tenant: &str, service: &str, id: &str) -> Option<&HealthEntry> {
        self.health.get(tenant)?.get(service)?.get(id)
    }

    /// Whether an instance may receive traffic (see
    /// [`crate::domain::registry::routable`]).
    pub fn routable(&self, tenant: &str, service: &str, id: &str, entry: &InstanceEntry) -> bool {
        let verdict = self.health_of(tenant, service, id).map(|h| &h.record);
        registry::routable(&entry.record, verdict)
    }

    /// `resolve_service(T, S)`: the first tenant of `chain` with a routable
    /// instance of `service`, and those instances by id. The walk stops at
    /// the first strict tenant (a strict tenant never resolves a service
    /// outside itself, whoever asks). `None`: nothing routable.
    pub fn resolve_service<'a>(
        &'a self,
        chain: &[&'a str],
        service: &str,
    ) -> Option<(&'a str, Vec<(&'a str, &'a InstanceEntry)>)> {
        for tenant in chain {
            let routable: Vec<(&str, &InstanceEntry)> = self
                .instances
                .get(*tenant)
                .and_then(|s| s.get(service))
                .into_iter()
                .flatten()
                .filter(|(id, e)| self.routable(tenant, service, id, e))
                .map(|(id, e)| (id.as_str(), e))
                .collect();
            if !routable.is_empty() {
                return Some((tenant, routable));
            }
            if self.tenants.get(*tenant).is_some_and(|t| t.record.strict) {
                return None;
            }
        }
        None
    }

    /// Every service with an instance (routable or not) in some tenant of
    /// `chain`, by name.
    pub fn services_in_chain(&self, chain: &[&str]) -> std::collections::BTreeSet<String> {
        chain
            .iter()
            .filter_map(|t| self.instances.get(*t))
            .flat_map(|services| services.keys().cloned())
            .collect()
    }

    /// Whether an instance of this project holds `lease`.
    pub fn holds_lease(&self, lease: LeaseId) -> bool {
        self.leases.contains_key(&lease)
    }

    /// The layer of `key` in `tenant`, if any.
    pub fn layer(&self, tenant: &str, key: &str) -> Option<&LayerEntry> {
        self.layers.get(tenant)?.get(key)
    }

    /// Resolves `key` along `chain`.
    pub fn resolve(&self, chain: &[&str], key: &str) -> Result<Option<Resolved>, ResolveError> {
        resolve::resolve(self.chain_layers(chain, key))
    }

    /// The layers of `key` along `chain`, nearest first.
    pub fn chain_layers<'a>(
        &'a self,
        chain: &'a [&'a str],
        key: &'a str,
    ) -> impl Iterator<Item = Layer<'a>> + 'a {
        chain.iter().filter_map(move |tenant| {
            self.layer(tenant, key).map(|l| Layer {
                tenant,
                value: &l.value,
                format: l.format,
                mode: l.mode,
                revision: l.mod_revision,
            })
        })
    }

    /// Every key that some tenant of `chain` has a layer for, matching the
    /// selection (exact keys or prefixes), in key order.
    pub fn selected_keys(
        &self,
        chain: &[&str],
        keys: &[String],
        prefixes: &[String],
    ) -> Vec<String> {
        let mut out = std::collections::BTreeSet::new();
        for tenant in chain {
            let Some(layers) = self.layers.get(*tenant) else {
                continue;
            };
            for key in keys {
                if layers.contains_key(key) {
                    out.insert(key.clone());
                }
            }
            for prefix in prefixes {
                for (key, _) in layers.range(prefix.clone()..) {
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    out.insert(key.clone());
                }
            }
        }
        out.into_iter().collect()
    }
}

/// Everything the view holds at one revision.
#[derive(Debug, Default, Clone)]
pub struct ViewState {
    /// Revision the state reflects.
    pub revision: Revision,
    /// Projects by name.
    pub projects: BTreeMap<String, ProjectView>,
    /// Recent changes, for resuming watches.
    pub journal: Journal,
}

impl ProjectView {
    /// Puts an object into the state as `image` describes (`None`: absent).
    pub fn set(&mut self, tenant: &str, object: &Object, image: Option<&Image>) {
        match (object, image) {
            (Object::Tenant, Some(Image::Tenant(entry))) => {
                self.tenants.insert(tenant.to_owned(), entry.clone());
            }
            (Object::Tenant, _) => {
                self.tenants.remove(tenant);
            }
            (Object::Layer(key), Some(Image::Layer(entry))) => {
                self.config_bytes += entry.value.len();
                let old = self
                    .layers
                    .entry(tenant.to_owned())
                    .or_default()
                    .insert(key.clone(), entry.clone());
                if let Some(old) = old {
                    self.config_bytes = self.config_bytes.saturating_sub(old.value.len());
                }
            }
            (Object::Layer(key), _) => {
                if let Some(layers) = self.layers.get_mut(tenant) {
                    if let Some(old) = layers.remove(key) {
                        self.config_bytes = self.config_bytes.saturating_sub(old.value.len());
                    }
                    if layers.is_empty() {
                        self.layers.remove(tenant);
                    }
                }
            }
            (Object::Instance { service, id }, image) => {
                let entry = match image {
                    Some(Image::Instance(e)) => Some(e.clone()),
                    _ => None,
                };
                let old = self.instance(tenant, service, id).map_or(0, |e| e.lease);
                let new = entry.as_ref().map_or(0, |e| e.lease);
                if old != new {
                    if old != 0
                        && let std::collections::hash_map::Entry::Occupied(mut held) =
                            self.leases.entry(old)
                    {
                        *held.get_mut() -= 1;
                        if *held.get() == 0 {
                            held.remove();
                        }
                    }
                    if new != 0 {
                        *self.leases.entry(new).or_default() += 1;
                    }
                }
                set_nested(&mut self.instances, tenant, service, id, entry);
            }
            (Object::Health { service, id }, image) => {
                let entry = match image {
                    Some(Image::Health(e)) => Some(e.clone()),
                    _ => None,
                };
                set_nested(&mut self.health, tenant, service, id, entry);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.tenants.is_empty()
            && self.layers.is_empty()
            && self.history.is_empty()
            && self.instances.is_empty()
            && self.health.is_empty()
    }

    fn image(&self, tenant: &str, object: &Object) -> Option<Image> {
        match object {
            Object::Tenant => self.tenants.get(tenant).cloned().map(Image::Tenant),
            Object::Layer(key) => self.layer(tenant, key).cloned().map(Image::Layer),
            Object::Instance { service, id } => self
                .instance(tenant, service, id)
                .cloned()
                .map(Image::Instance),
            Object::Health { service, id } => self
                .health
                .get(tenant)
                .and_then(|s| s.get(service))
                .and_then(|i| i.get(id))
                .cloned()
                .map(Image::Health),
        }
    }
}

impl ViewState {
    /// A fresh state at `revision` whose journal keeps `limits`.
    pub fn new(revision: Revision, limits: JournalLimits) -> Self {
        Self {
            revision,
            projects: BTreeMap::new(),
            journal: Journal {
                limits,
                covers_from: revision + 1,
                ..Journal::default()
            },
        }
    }

    /// Applies one store event and returns the change it made. Keys that are
    /// not domain keys and records that do not decode are skipped with a
    /// warning (they cannot come from this daemon).
    pub fn apply(&mut self, event: &Event) -> Option<Change> {
        let (project, tenant, object) = match keyspace::parse(&event.kv.key)? {
            Parsed::Tenant { project, tenant } => (project, tenant, Object::Tenant),
            Parsed::Layer {
                project,
                tenant,
                key,
            } => (project, tenant, Object::Layer(key.to_owned())),
            Parsed::Instance {
                project,
                tenant,
                service,
                id,
            } => (
                project,
                tenant,
                Object::Instance {
                    service: service.to_owned(),
                    id: id.to_owned(),
                },
            ),
            Parsed::Health {
                project,
                tenant,
                service,
                id,
            } => (
                project,
                tenant,
                Object::Health {
                    service: service.to_owned(),
                    id: id.to_owned(),
                },
            ),
            Parsed::Version {
                project,
                tenant,
                key,
                seq,
            } => {
                // History is bookkeeping, not part of anyone's resolved view:
                // it never reaches the journal or subscribers.
                let p = self.projects.entry(project.to_owned()).or_default();
                p.note_version(tenant, key, seq, event.kind == EventKind::Put);
                if p.is_empty() {
                    self.projects.remove(project);
                }
                return None;
            }
        };
        let after = match event.kind {
            EventKind::Delete => None,
            EventKind::Put => match decode_image(&object, &event.kv) {
                Ok(image) => Some(image),
                Err(e) => {
                    tracing::warn!(project, tenant, ?object, error = %e, "undecodable record skipped");
                    return None;
                }
            },
        };
        let p = self.projects.entry(project.to_owned()).or_default();
        let before = p.image(tenant, &object);
        p.set(tenant, &object, after.as_ref());
        if p.is_empty() {
            self.projects.remove(project);
        }
        Some(Change {
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            object,
            before,
            after,
        })
    }

    /// Applies a whole revision and records it in the journal.
    pub fn apply_batch(&mut self, batch: &WatchBatch) -> Arc<JournalEntry> {
        let changes = batch.events.iter().filter_map(|e| self.apply(e)).collect();
        self.revision = batch.revision;
        self.journal.push(JournalEntry {
            revision: batch.revision,
            changes,
        })
    }
}

fn decode_image(object: &Object, kv: &crate::store::KeyValue) -> Result<Image, String> {
    let value = kv.value.as_slice();
    Ok(match object {
        Object::Layer(_) => {
            let r = LayerRecord::decode(value).map_err(|e| e.to_string())?;
            let format = r.format.parse::<Format>().map_err(|e| e.to_string())?;
            let mode = r.mode.parse::<Mode>().map_err(|e| e.to_string())?;
            Image::Layer(LayerEntry {
                value: r.value.into(),
                format,
                mode,
                mod_revision: kv.mod_revision,
            })
        }
        Object::Tenant => Image::Tenant(TenantEntry {
            record: TenantRecord::decode(value).map_err(|e| e.to_string())?,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        }),
        Object::Instance { .. } => Image::Instance(InstanceEntry {
            record: Arc::new(InstanceRecord::decode(value).map_err(|e| e.to_string())?),
            lease: kv.lease,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        }),
        Object::Health { .. } => Image::Health(HealthEntry {
            record: HealthRecord::decode(value).map_err(|e| e.to_string())?,
            mod_revision: kv.mod_revision,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(lease: LeaseId) -> Image {
        Image::Instance(InstanceEntry {
            record: Arc::new(InstanceRecord::default()),
            lease,
            create_revision: 1,
            mod_revision: 1,
        })
    }

    fn layer(bytes: usize) -> Image {
        Image::Layer(LayerEntry {
            value: vec![b'x'; bytes].into(),
            format: Format::Text,
            mode: Mode::Replace,
            mod_revision: 1,
        })
    }

    fn at(service: &str, id: &str) -> Object {
        Object::Instance {
            service: service.into(),
            id: id.into(),
        }
    }

    /// A lease belongs to the project while one of its instances holds it:
    /// re-registering under another lease moves the count, removing the
    /// last instance frees the lease.
    #[test]
    fn leases_follow_the_instances_holding_them() {
        let mut p = ProjectView::default();
        p.set("t1", &at("api", "a"), Some(&instance(7)));
        p.set("t2", &at("api", "b"), Some(&instance(7)));
        p.set("t1", &at("api", "c"), Some(&instance(0)));
        assert!(p.holds_lease(7));
        assert!(!p.holds_lease(0), "persistent instances hold no lease");
        p.set("t1", &at("api", "a"), Some(&instance(9)));
        assert!(p.holds_lease(7) && p.holds_lease(9));
        p.set("t2", &at("api", "b"), None);
        assert!(!p.holds_lease(7), "its last instance left");
        p.set("t1", &at("api", "a"), None);
        assert!(p.leases.is_empty(), "{:?}", p.leases);
    }

    /// The project's config bytes count every current layer once:
    /// replacing a value counts its new size, removing it frees it.
    #[test]
    fn config_bytes_count_current_layers() {
        let mut p = ProjectView::default();
        p.set("t1", &Object::Layer("a".into()), Some(&layer(100)));
        p.set("t2", &Object::Layer("a".into()), Some(&layer(50)));
        assert_eq!(p.config_bytes, 150);
        p.set("t1", &Object::Layer("a".into()), Some(&layer(10)));
        assert_eq!(p.config_bytes, 60);
        p.set("t2", &Object::Layer("a".into()), None);
        p.set("t2", &Object::Layer("never-written".into()), None);
        assert_eq!(p.config_bytes, 10);
    }
}
