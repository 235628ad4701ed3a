//! The watch hub: pushes each subscriber's *resolved* view of its selection.
//!
//! Subscribers with the same (project, tenant, selection) share a group; a
//! group keeps the last resolved view and one broadcast channel. After the
//! view applies a revision, [`Hub::on_batch`] visits only the groups whose
//! tenant chain contains a changed tenant, re-resolves only the affected keys
//! (all selected keys when a tenant of the chain itself changed), and sends
//! one message per group — built once, shared by every subscriber of the
//! group. A change an override hides resolves to the same value and sends
//! nothing.
//!
//! Resuming with `start_revision` replays the view's journal: the project's
//! state is rolled back to `start_revision - 1` with the journal's
//! before-images, then rolled forward revision by revision, emitting exactly
//! the resolved changes the subscriber missed. When the journal no longer
//! reaches back that far, or a subscriber falls so far behind that its group
//! channel overflowed, it gets a snapshot marked `reset` instead. Nothing a
//! slow subscriber does blocks the hub or other subscribers.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use futures::Stream;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{
    ConfigChange, ErrorReason, ResolvedValue, ResponseHeader, WatchConfigResponse,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::store::Revision;
use crate::view::{JournalEntry, Object, ProjectView, View, ViewState};

/// Messages a group buffers for its slowest subscriber before that one is
/// sent a reset snapshot instead.
const GROUP_BUFFER: usize = 1024;

/// What a subscriber watches: exact keys and key prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selection {
    keys: Vec<String>,
    prefixes: Vec<String>,
}

impl Selection {
    /// A selection (order and duplicates do not matter). Nothing selected
    /// means every key.
    pub fn new(mut keys: Vec<String>, mut prefixes: Vec<String>) -> Self {
        if keys.is_empty() && prefixes.is_empty() {
            prefixes.push(String::new());
        }
        keys.sort();
        keys.dedup();
        prefixes.sort();
        prefixes.dedup();
        Self { keys, prefixes }
    }

    /// Whether `key` is selected.
    pub fn matches(&self, key: &str) -> bool {
        self.keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok()
            || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    project: String,
    tenant: String,
    selection: Selection,
}

/// Resolved values of a selection by key.
type Resolution = BTreeMap<String, ResolvedValue>;

fn resolve_key(p: &ProjectView, chain: &[&str], key: &str) -> Option<ResolvedValue> {
    match p.resolve(chain, key) {
        Ok(Some(r)) => Some(ResolvedValue {
            key: key.to_owned(),
            value: r.value,
            format: r.format.name().to_owned(),
            origin: r.origin,
            mod_revision: r.mod_revision,
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(key, error = %e, "key cannot be resolved; left out of watch pushes");
            None
        }
    }
}

/// The resolved selection, or `None` when the tenant does not exist.
fn resolve_selection(
    p: Option<&ProjectView>,
    tenant: &str,
    selection: &Selection,
) -> Option<Resolution> {
    let p = p?;
    let chain = p.chain(tenant)?;
    let keys = p.selected_keys(&chain, &selection.keys, &selection.prefixes);
    Some(
        keys.into_iter()
            .filter_map(|k| resolve_key(p, &chain, &k).map(|v| (k, v)))
            .collect(),
    )
}

fn same(a: &ResolvedValue, b: &ResolvedValue) -> bool {
    a.value == b.value && a.format == b.format && a.origin == b.origin
}

/// Changes that turn `old` into `new`.
fn diff(old: &Resolution, new: &Resolution) -> Vec<ConfigChange> {
    let mut changes = Vec::new();
    for (key, value) in new {
        if old.get(key).is_none_or(|o| !same(o, value)) {
            changes.push(ConfigChange {
                key: key.clone(),
                value: Some(value.clone()),
            });
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            changes.push(ConfigChange {
                key: key.clone(),
                value: None,
            });
        }
    }
    changes.sort_by(|a, b| a.key.cmp(&b.key));
    changes
}

/// A message on its way to subscribers, with its birth time for latency.
#[derive(Debug)]
struct Push {
    message: WatchConfigResponse,
    created: Instant,
}

struct Group {
    sender: broadcast::Sender<Arc<Push>>,
    last: Resolution,
    chain: Vec<String>,
    deleted: bool,
}

/// The hub (see the module documentation).
pub struct Hub {
    view: Arc<View>,
    groups: Mutex<HashMap<GroupKey, Group>>,
    member: String,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub fed by `view` (it registers itself as the view's listener).
    pub fn new(view: Arc<View>, member: String) -> Arc<Self> {
        let hub = Arc::new(Self {
            view: Arc::clone(&view),
            groups: Mutex::new(HashMap::new()),
            member,
        });
        let weak: Weak<Self> = Arc::downgrade(&hub);
        let registered = view.set_listener(Box::new(move |state, entry| {
            if let Some(hub) = weak.upgrade() {
                hub.on_batch(state, entry);
            }
        }));
        if registered.is_err() {
            tracing::error!("the view already has a listener; watch pushes will not flow");
        }
        hub
    }

    fn message(
        &self,
        kind: Kind,
        revision: Revision,
        changes: Vec<ConfigChange>,
    ) -> WatchConfigResponse {
        WatchConfigResponse {
            header: Some(ResponseHeader {
                revision,
                member: self.member.clone(),
            }),
            kind: kind as i32,
            revision,
            reset: false,
            changes,
            tenant_deleted: false,
        }
    }

    fn snapshot(
        &self,
        resolution: &Resolution,
        revision: Revision,
        reset: bool,
    ) -> WatchConfigResponse {
        let changes = resolution
            .values()
            .map(|v| ConfigChange {
                key: v.key.clone(),
                value: Some(v.clone()),
            })
            .collect();
        WatchConfigResponse {
            reset,
            ..self.message(Kind::Snapshot, revision, changes)
        }
    }

    fn deleted(&self, last: &Resolution, revision: Revision) -> WatchConfigResponse {
        let changes = last
            .keys()
            .map(|k| ConfigChange {
                key: k.clone(),
                value: None,
            })
            .collect();
        WatchConfigResponse {
            tenant_deleted: true,
            ..self.message(Kind::Change, revision, changes)
        }
    }

    /// Computes and sends the pushes one applied revision causes.
    fn on_batch(&self, state: &ViewState, entry: &JournalEntry) {
        let started = Instant::now();
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.retain(|_, g| g.sender.receiver_count() > 0);
        for (key, group) in groups.iter_mut() {
            // Keys this revision may have changed for the group; `None`: all.
            let mut affected: Option<BTreeSet<&str>> = Some(BTreeSet::new());
            for change in entry.changes.iter().filter(|c| c.project == key.project) {
                if !group.chain.contains(&change.tenant) {
                    continue;
                }
                match (&change.object, affected.as_mut()) {
                    (Object::Layer(k), Some(set)) if key.selection.matches(k) => {
                        set.insert(k.as_str());
                    }
                    (Object::Tenant, _) => affected = None,
                    // Other keys, and registry objects: not in this view.
                    _ => {}
                }
            }
            if affected.as_ref().is_some_and(BTreeSet::is_empty) {
                continue;
            }
            let project = state.projects.get(&key.project);
            let chain = project.and_then(|p| p.chain(&key.tenant));
            let (Some(p), Some(chain)) = (project, chain) else {
                group.deleted = true;
                let message = self.deleted(&group.last, entry.revision);
                // Subscribers that left meanwhile need nothing.
                let _ = group.sender.send(Arc::new(Push {
                    message,
                    created: started,
                }));
                continue;
            };
            let new = match &affected {
                None => resolve_selection(Some(p), &key.tenant, &key.selection).unwrap_or_default(),
                Some(keys) => {
                    let mut new = group.last.clone();
                    for k in keys {
                        match resolve_key(p, &chain, k) {
                            Some(v) => new.insert((*k).to_owned(), v),
                            None => new.remove(*k),
                        };
                    }
                    new
                }
            };
            let changes = diff(&group.last, &new);
            group.last = new;
            group.chain = chain.into_iter().map(str::to_owned).collect();
            if !changes.is_empty() {
                let message = self.message(Kind::Change, entry.revision, changes);
                let _ = group.sender.send(Arc::new(Push {
                    message,
                    created: started,
                }));
            }
        }
        groups.retain(|_, g| !g.deleted);
        metrics::histogram!("strata_watch_fanout_duration_seconds")
            .record(started.elapsed().as_secs_f64());
    }

    /// Starts a subscription (see [`Subscription`]).
    pub async fn subscribe(
        self: &Arc<Self>,
        project: String,
        tenant: String,
        selection: Selection,
        start_revision: Revision,
        shutdown: CancellationToken,
    ) -> Result<Subscription, ApiError> {
        if start_revision < 0 {
            return Err(ApiError::new(
                ErrorReason::InvalidArgument,
                format!("start_revision must be 0 or positive, got {start_revision}"),
            ));
        }
        // A subscriber moving from a replica that is ahead waits until this
        // one has caught up with what it already saw.
        if start_revision > 0 {
            self.view.wait_for(start_revision - 1).await?;
        }
        let key = GroupKey {
            project,
            tenant,
            selection,
        };
        let (rx, initial, after) = self.join(&key, start_revision)?;
        metrics::gauge!("strata_watch_subscribers").increment(1.0);
        Ok(Subscription {
            hub: Arc::clone(self),
            key,
            rx,
            pending: initial.into(),
            after,
            done: false,
            shutdown,
        })
    }

    /// Joins (or creates) the group under the view's read lock, so the
    /// initial messages and the live pushes meet without gap or overlap.
    #[allow(clippy::type_complexity)]
    fn join(
        &self,
        key: &GroupKey,
        start_revision: Revision,
    ) -> Result<
        (
            broadcast::Receiver<Arc<Push>>,
            Vec<WatchConfigResponse>,
            Revision,
        ),
        ApiError,
    > {
        let state = self.view.read();
        let revision = state.revision;
        let project = state.projects.get(&key.project);
        let current = resolve_selection(project, &key.tenant, &key.selection).ok_or_else(|| {
            ApiError::new(
                ErrorReason::NotFound,
                format!(
                    "tenant {:?} not found in project {:?}",
                    key.tenant, key.project
                ),
            )
        })?;
        let chain: Vec<String> = project
            .and_then(|p| p.chain(&key.tenant))
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let rx = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            let group = groups.entry(key.clone()).or_insert_with(|| Group {
                sender: broadcast::channel(GROUP_BUFFER).0,
                last: current.clone(),
                chain,
                deleted: false,
            });
            group.sender.subscribe()
        };
        let initial = if start_revision == 0 {
            vec![self.snapshot(&current, revision, false)]
        } else if start_revision > revision {
            Vec::new()
        } else if state.journal.covers(start_revision) {
            self.replay(&state, key, start_revision)
        } else {
            metrics::counter!("strata_watch_resets_total", "reason" => "history").increment(1);
            vec![self.snapshot(&current, revision, true)]
        };
        Ok((rx, initial, revision))
    }

    /// The changes of `key`'s resolved view from `start` to the state's
    /// revision, one message per revision that changed it.
    fn replay(
        &self,
        state: &ViewState,
        key: &GroupKey,
        start: Revision,
    ) -> Vec<WatchConfigResponse> {
        let mut p = state
            .projects
            .get(&key.project)
            .cloned()
            .unwrap_or_default();
        let entries: Vec<&Arc<JournalEntry>> = state.journal.since(start).collect();
        for entry in entries.iter().rev() {
            for c in entry
                .changes
                .iter()
                .rev()
                .filter(|c| c.project == key.project)
            {
                p.set(&c.tenant, &c.object, c.before.as_ref());
            }
        }
        let mut last = resolve_selection(Some(&p), &key.tenant, &key.selection).unwrap_or_default();
        let mut out = Vec::new();
        for entry in entries {
            let mut touched = false;
            for c in entry.changes.iter().filter(|c| c.project == key.project) {
                p.set(&c.tenant, &c.object, c.after.as_ref());
                touched = true;
            }
            if !touched {
                continue;
            }
            let new = resolve_selection(Some(&p), &key.tenant, &key.selection).unwrap_or_default();
            let changes = diff(&last, &new);
            if !changes.is_empty() {
                out.push(self.message(Kind::Change, entry.revision, changes));
            }
            last = new;
        }
        out
    }
}

/// One subscriber's stream of messages: the initial snapshot or replay,
/// then live pushes. Ends after a `tenant_deleted` message, and with
/// `UNAVAILABLE` when the daemon shuts down (resume on another replica).
pub struct Subscription {
    hub: Arc<Hub>,
    key: GroupKey,
    rx: broadcast::Receiver<Arc<Push>>,
    pending: VecDeque<WatchConfigResponse>,
    /// Live pushes at or below this revision are already covered.
    after: Revision,
    done: bool,
    shutdown: CancellationToken,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!("strata_watch_subscribers").decrement(1.0);
    }
}

impl Subscription {
    /// The next message; `None` when the stream is over.
    pub async fn next(&mut self) -> Option<Result<WatchConfigResponse, tonic::Status>> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                self.done |= message.tenant_deleted;
                metrics::counter!("strata_watch_pushes_total").increment(1);
                return Some(Ok(message));
            }
            if self.done {
                return None;
            }
            let received = tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.done = true;
                    return Some(Err(tonic::Status::unavailable(
                        "stratad is shutting down; resume the watch on another replica",
                    )));
                }
                r = self.rx.recv() => r,
            };
            match received {
                Ok(push) => {
                    if push.message.revision <= self.after {
                        continue;
                    }
                    self.after = push.message.revision;
                    metrics::histogram!("strata_watch_push_latency_seconds")
                        .record(push.created.elapsed().as_secs_f64());
                    self.pending.push_back(push.message.clone());
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("strata_watch_resets_total", "reason" => "lagged")
                        .increment(1);
                    match self.hub.join(&self.key, 0) {
                        Ok((rx, mut initial, after)) => {
                            self.rx = rx;
                            self.after = after;
                            for m in &mut initial {
                                m.reset = true;
                            }
                            self.pending.extend(initial);
                        }
                        Err(_) => {
                            let m = self
                                .hub
                                .deleted(&Resolution::new(), self.hub.view.revision());
                            self.pending.push_back(m);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// This subscription as a stream for tonic.
    pub fn into_stream(
        self,
    ) -> Pin<Box<dyn Stream<Item = Result<WatchConfigResponse, tonic::Status>> + Send>> {
        Box::pin(futures::stream::unfold(self, |mut s| async move {
            s.next().await.map(|m| (m, s))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_matches_keys_and_prefixes() {
        let s = Selection::new(vec!["a/x.yaml".into()], vec!["b/".into()]);
        assert!(s.matches("a/x.yaml") && s.matches("b/y") && !s.matches("a/y") && !s.matches("c"));
        assert!(Selection::new(vec![], vec![]).matches("anything"));
    }
}
