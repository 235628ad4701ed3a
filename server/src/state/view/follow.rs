//! The shared view: loaded at one revision, kept current by following the
//! store's watch, and waited on by writers so a client reads its own
//! writes.

use super::*;

/// Called after every applied revision, with the state already updated
/// (the watch hub uses it to compute pushes).
pub type BatchListener = Box<dyn Fn(&ViewState, &JournalEntry) + Send + Sync>;

/// The shared, always-current view.
pub struct View {
    pub(super) state: RwLock<ViewState>,
    pub(super) revision: watch::Sender<Revision>,
    pub(super) listeners: RwLock<Vec<BatchListener>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("revision", &*self.revision.borrow())
            .finish_non_exhaustive()
    }
}

/// Longest a write waits for the view to catch up with its revision.
pub(super) const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

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
