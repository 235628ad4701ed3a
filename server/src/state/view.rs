//! The daemon's in-memory view of the store: every tenant and config layer,
//! loaded at revision R and kept current by following the store's watch from
//! R+1. All reads are served from here; writes go to the store, and a write
//! is answered only after the view has applied its revision
//! ([`View::wait_for`]), so a client reads its own writes on this replica.

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

/// A domain object as it was or is (for undo and replay).
#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    /// A tenant.
    Tenant(TenantEntry),
    /// A config layer.
    Layer(LayerEntry),
    /// A service instance.
    Instance(InstanceEntry),
    /// A probe verdict.
    Health(HealthEntry),
}

/// Which object of a tenant changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The tenant itself.
    Tenant,
    /// Its layer of a config key.
    Layer(String),
    /// An instance of a service.
    Instance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
    /// The probe verdict on an instance of a service.
    Health {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
}

impl Object {
    /// The service, for instance and health objects.
    pub fn service(&self) -> Option<&str> {
        match self {
            Object::Instance { service, .. } | Object::Health { service, .. } => Some(service),
            Object::Tenant | Object::Layer(_) => None,
        }
    }
}

/// One object changed at one revision, with its images before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Project.
    pub project: String,
    /// Tenant (for tenant objects: the tenant itself).
    pub tenant: String,
    /// The object of the tenant that changed.
    pub object: Object,
    /// The object before the revision (`None`: it did not exist).
    pub before: Option<Image>,
    /// The object after the revision (`None`: it was deleted).
    pub after: Option<Image>,
}

/// Every domain change of one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// The revision.
    pub revision: Revision,
    /// Changes in the order the store applied them.
    pub changes: Vec<Change>,
}

impl JournalEntry {
    fn approx_bytes(&self) -> usize {
        let image = |i: &Option<Image>| match i {
            Some(Image::Layer(l)) => l.value.len() + 64,
            Some(Image::Tenant(_) | Image::Health(_)) => 128,
            Some(Image::Instance(i)) => 256 + i.record.metadata.len() * 64,
            None => 0,
        };
        self.changes
            .iter()
            .map(|c| 96 + image(&c.before) + image(&c.after))
            .sum()
    }
}

/// How much recent history the view keeps for replaying watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Most revisions kept.
    pub max_revisions: usize,
    /// Most bytes of before/after images kept (approximate).
    pub max_bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            max_revisions: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

fn set_nested<T>(
    map: &mut BTreeMap<String, ByService<T>>,
    tenant: &str,
    service: &str,
    id: &str,
    entry: Option<T>,
) {
    match entry {
        Some(entry) => {
            map.entry(tenant.to_owned())
                .or_default()
                .entry(service.to_owned())
                .or_default()
                .insert(id.to_owned(), entry);
        }
        None => {
            let Some(services) = map.get_mut(tenant) else {
                return;
            };
            if let Some(ids) = services.get_mut(service) {
                ids.remove(id);
                if ids.is_empty() {
                    services.remove(service);
                }
            }
            if services.is_empty() {
                map.remove(tenant);
            }
        }
    }
}

/// Recent revisions with undo/redo images, so a watch can resume from a
/// revision the subscriber names.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    entries: std::collections::VecDeque<Arc<JournalEntry>>,
    bytes: usize,
    limits: JournalLimits,
    /// Revisions at or after this one are all in the journal.
    covers_from: Revision,
}

impl Journal {
    fn push(&mut self, entry: JournalEntry) -> Arc<JournalEntry> {
        let entry = Arc::new(entry);
        self.bytes += entry.approx_bytes();
        self.entries.push_back(Arc::clone(&entry));
        while self.entries.len() > self.limits.max_revisions || self.bytes > self.limits.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(old.approx_bytes());
            self.covers_from = old.revision + 1;
        }
        entry
    }

    /// Whether every revision from `revision` on is in the journal.
    pub fn covers(&self, revision: Revision) -> bool {
        revision >= self.covers_from
    }

    /// Entries with a revision of at least `from`, oldest first.
    pub fn since(&self, from: Revision) -> impl DoubleEndedIterator<Item = &Arc<JournalEntry>> {
        let skip = self.entries.partition_point(|e| e.revision < from);
        self.entries.range(skip..)
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

/// Called after every applied revision, with the state already updated
/// (the watch hub uses it to compute pushes).
pub type BatchListener = Box<dyn Fn(&ViewState, &JournalEntry) + Send + Sync>;

/// The shared, always-current view.
pub struct View {
    state: RwLock<ViewState>,
    revision: watch::Sender<Revision>,
    listeners: RwLock<Vec<BatchListener>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("revision", &*self.revision.borrow())
            .finish_non_exhaustive()
    }
}

/// Longest a write waits for the view to catch up with its revision.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

impl View {
    /// Loads every domain key from the store and returns the view at the
    /// store's current revision. Call [`View::follow`] to keep it current.
    pub async fn load(store: &dyn Store, limits: JournalLimits) -> Result<Arc<Self>, StoreError> {
        let state = Self::load_state(store, limits).await?;
        let (revision, _) = watch::channel(state.revision);
        Ok(Arc::new(Self {
            state: RwLock::new(state),
            revision,
            listeners: RwLock::new(Vec::new()),
        }))
    }

    async fn load_state(store: &dyn Store, limits: JournalLimits) -> Result<ViewState, StoreError> {
        let all = store.range(KeyRange::prefix(Vec::new())).await?;
        let mut state = ViewState::new(all.revision, limits);
        for kv in all.kvs {
            state.apply(&Event {
                kind: EventKind::Put,
                kv,
            });
        }
        Ok(state)
    }

    /// Adds a listener told about every applied revision (add listeners
    /// before [`View::follow`] starts, so none misses a revision).
    pub fn add_listener(&self, listener: BatchListener) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    fn tell_listeners(&self, entry: &JournalEntry) {
        let state = self.read();
        for listener in self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            listener(&state, entry);
        }
    }

    /// Read access to the current state.
    pub fn read(&self) -> RwLockReadGuard<'_, ViewState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The revision the view has applied.
    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// A receiver that sees every applied revision.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// Waits until the view has applied `revision`.
    pub async fn wait_for(&self, revision: Revision) -> Result<(), StoreError> {
        let mut rx = self.revision.subscribe();
        match tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|r| *r >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Unavailable(
                "the view stopped following the store".into(),
            )),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the view did not reach revision {revision} within {CATCH_UP_TIMEOUT:?}"
            ))),
        }
    }

    fn apply_batch(&self, batch: &WatchBatch) {
        let entry = self
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply_batch(batch);
        // Only this task writes the state, so it is still at this revision
        // while the listeners read it.
        self.tell_listeners(&entry);
        self.revision.send_replace(batch.revision);
    }

    /// Follows the store's watch until `shutdown`, resuming after errors. If
    /// the history it needs was compacted (the view fell far behind), it
    /// reloads everything.
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let from = self.revision() + 1;
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                s = store.watch(KeyRange::prefix(Vec::new()), from) => s,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "view cannot watch the store; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    () = shutdown.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    Some(Ok(batch)) => {
                        backoff = Duration::from_millis(50);
                        self.apply_batch(&batch);
                    }
                    Some(Err(StoreError::Compacted { .. })) => {
                        tracing::warn!("view fell behind compacted history; reloading");
                        if let Err(e) = self.reload(store.as_ref()).await {
                            tracing::warn!(error = %e, "view reload failed; retrying");
                            tokio::time::sleep(backoff).await;
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "view watch ended; resuming");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        break;
                    }
                    None => {
                        tokio::time::sleep(backoff).await;
                        break;
                    }
                }
            }
        }
    }

    async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let limits = self.read().journal.limits;
        let state = Self::load_state(store, limits).await?;
        let revision = state.revision;
        // The revisions skipped cannot be replayed one by one; tell the
        // listener that every tenant may have changed, so subscribers get
        // the net change instead of silently missing it.
        let mut tenants = std::collections::BTreeSet::new();
        for st in [&*self.read(), &state] {
            for (project, p) in &st.projects {
                tenants.extend(p.tenants.keys().map(|t| (project.clone(), t.clone())));
            }
        }
        let everything = JournalEntry {
            revision,
            changes: tenants
                .into_iter()
                .map(|(project, tenant)| Change {
                    project,
                    tenant,
                    object: Object::Tenant,
                    before: None,
                    after: None,
                })
                .collect(),
        };
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        self.tell_listeners(&everything);
        self.revision.send_replace(revision);
        Ok(())
    }
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
