//! The daemon's in-memory view of the store: every tenant and config layer,
//! loaded at revision R and kept current by following the store's watch from
//! R+1. All reads are served from here; writes go to the store, and a write
//! is answered only after the view has applied its revision
//! ([`View::wait_for`]), so a client reads its own writes on this replica.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::document::{Format, Mode};
use crate::domain::resolve::{self, Layer, ResolveError, Resolved};
use crate::keyspace::{self, LayerRecord, Parsed, TenantRecord};
use crate::store::{Event, EventKind, KeyRange, Revision, Store, StoreError, WatchBatch};

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

/// One project's tenants and layers.
#[derive(Debug, Default, Clone)]
pub struct ProjectView {
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantEntry>,
    /// Layers by tenant, then key.
    pub layers: BTreeMap<String, BTreeMap<String, LayerEntry>>,
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
}

impl ViewState {
    /// Applies one store event. Keys that are not domain keys and records
    /// that do not decode are skipped with a warning (they cannot come from
    /// this daemon).
    pub fn apply(&mut self, event: &Event) {
        let Some(parsed) = keyspace::parse(&event.kv.key) else {
            return;
        };
        match (parsed, event.kind) {
            (Parsed::Tenant { project, tenant }, EventKind::Put) => {
                match TenantRecord::decode(event.kv.value.as_slice()) {
                    Ok(record) => {
                        self.projects
                            .entry(project.to_owned())
                            .or_default()
                            .tenants
                            .insert(
                                tenant.to_owned(),
                                TenantEntry {
                                    record,
                                    create_revision: event.kv.create_revision,
                                    mod_revision: event.kv.mod_revision,
                                },
                            );
                    }
                    Err(e) => {
                        tracing::warn!(project, tenant, error = %e, "undecodable tenant record skipped")
                    }
                }
            }
            (Parsed::Tenant { project, tenant }, EventKind::Delete) => {
                if let Some(p) = self.projects.get_mut(project) {
                    p.tenants.remove(tenant);
                    if p.tenants.is_empty() && p.layers.is_empty() {
                        self.projects.remove(project);
                    }
                }
            }
            (
                Parsed::Layer {
                    project,
                    tenant,
                    key,
                },
                EventKind::Put,
            ) => {
                let decoded = LayerRecord::decode(event.kv.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        let format = r.format.parse::<Format>().map_err(|e| e.to_string())?;
                        let mode = r.mode.parse::<Mode>().map_err(|e| e.to_string())?;
                        Ok(LayerEntry {
                            value: r.value.into(),
                            format,
                            mode,
                            mod_revision: event.kv.mod_revision,
                        })
                    });
                match decoded {
                    Ok(entry) => {
                        self.projects
                            .entry(project.to_owned())
                            .or_default()
                            .layers
                            .entry(tenant.to_owned())
                            .or_default()
                            .insert(key.to_owned(), entry);
                    }
                    Err(e) => {
                        tracing::warn!(project, tenant, key, error = %e, "undecodable layer skipped")
                    }
                }
            }
            (
                Parsed::Layer {
                    project,
                    tenant,
                    key,
                },
                EventKind::Delete,
            ) => {
                if let Some(p) = self.projects.get_mut(project) {
                    if let Some(layers) = p.layers.get_mut(tenant) {
                        layers.remove(key);
                        if layers.is_empty() {
                            p.layers.remove(tenant);
                        }
                    }
                    if p.tenants.is_empty() && p.layers.is_empty() {
                        self.projects.remove(project);
                    }
                }
            }
        }
    }
}

/// The shared, always-current view.
pub struct View {
    state: RwLock<ViewState>,
    revision: watch::Sender<Revision>,
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
    pub async fn load(store: &dyn Store) -> Result<Arc<Self>, StoreError> {
        let all = store.range(KeyRange::prefix(Vec::new())).await?;
        let mut state = ViewState {
            revision: all.revision,
            projects: BTreeMap::new(),
        };
        for kv in all.kvs {
            state.apply(&Event {
                kind: EventKind::Put,
                kv,
            });
        }
        let (revision, _) = watch::channel(state.revision);
        Ok(Arc::new(Self {
            state: RwLock::new(state),
            revision,
        }))
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
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            for event in &batch.events {
                state.apply(event);
            }
            state.revision = batch.revision;
        }
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
        let fresh = Self::load(store).await?;
        let state = fresh.read().clone();
        let revision = state.revision;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        self.revision.send_replace(revision);
        Ok(())
    }
}
