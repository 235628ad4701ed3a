//! The watch hub: pushes each subscriber's *resolved* view of its selection.
//! One hub serves each kind of watch — config keys ([`ConfigLens`]) and
//! service endpoint sets (`crate::app::service_watch`); a [`Lens`] says what a
//! kind resolves and how its messages look, the hub does the rest.
//!
//! Subscribers with the same (project, tenant, selection) share a group; a
//! group keeps the last resolved view and one broadcast channel. After the
//! view applies a revision, `Hub::on_batch` visits only the groups whose
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

// What a watch selects and resolves: selections, lenses, diffs.
mod lens;
// One subscriber's stream: snapshot or replay, then live pushes.
mod subscription;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use futures::Stream;
use metrics::{Counter, Gauge, Histogram};
use prost::bytes::Bytes;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{
    ConfigChange, ErrorReason, ResolvedValue, ResponseHeader, WatchConfigResponse,
};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::error::ApiError;
use crate::state::view::{Change, JournalEntry, Object, ProjectView, View, ViewState};
use crate::store::Revision;

pub use lens::*;
pub use subscription::*;

/// Messages a group buffers for its slowest subscriber before that one is
/// sent a reset snapshot instead.
const GROUP_BUFFER: usize = 1024;

struct Group<L: Lens> {
    sender: broadcast::Sender<Arc<Push<L::Message>>>,
    last: Resolution<L::Value>,
    chain: Vec<String>,
    deleted: bool,
}

/// The hub's metric handles, looked up in the registry once: a push to
/// 10,000 subscribers records 10,000 deliveries, and a registry look-up per
/// delivery (key hash, label comparison) was a measurable share of it.
struct HubMetrics {
    pushes: Counter,
    latency: Histogram,
    subscribers: Gauge,
    resets_history: Counter,
    resets_lagged: Counter,
    fanout: Histogram,
}

impl HubMetrics {
    fn new(kind: &'static str) -> Self {
        Self {
            pushes: metrics::counter!("strata_watch_pushes_total", "watch" => kind),
            latency: metrics::histogram!("strata_watch_push_latency_seconds", "watch" => kind),
            subscribers: metrics::gauge!("strata_watch_subscribers", "watch" => kind),
            resets_history: metrics::counter!(
                "strata_watch_resets_total", "watch" => kind, "reason" => "history"
            ),
            resets_lagged: metrics::counter!(
                "strata_watch_resets_total", "watch" => kind, "reason" => "lagged"
            ),
            fanout: metrics::histogram!("strata_watch_fanout_duration_seconds", "watch" => kind),
        }
    }
}

/// The hub (see the module documentation).
pub struct Hub<L: Lens> {
    view: Arc<View>,
    groups: Mutex<HashMap<GroupKey<L::Selection>, Group<L>>>,
    member: String,
    metrics: HubMetrics,
    /// The distinct selections each token watches, with how many of its
    /// subscriptions watch each: every distinct selection keeps its own
    /// resolved copy of the values it selects, so a token may hold only
    /// `max_selections_per_token` of them at once (0: no limit).
    owners: Mutex<HashMap<Arc<str>, Watched<L::Selection>>>,
    max_selections_per_token: usize,
}

/// The distinct selections one token watches, each with its number of
/// subscriptions.
type Watched<S> = HashMap<GroupKey<S>, usize>;

/// Longest a subscription waits for this replica to reach the revision it
/// resumes from (a replica a little behind the one the client came from
/// catches up in milliseconds; a revision that does not exist never comes).
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl<L: Lens> std::fmt::Debug for Hub<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("kind", &L::NAME)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl<L: Lens> Hub<L> {
    /// A hub fed by `view` (it adds itself to the view's listeners). A
    /// token may watch at most `max_selections_per_token` distinct
    /// selections at once (0: no limit).
    pub fn new(view: Arc<View>, member: String, max_selections_per_token: usize) -> Arc<Self> {
        let hub = Arc::new(Self {
            view: Arc::clone(&view),
            groups: Mutex::new(HashMap::new()),
            member,
            metrics: HubMetrics::new(L::NAME),
            owners: Mutex::new(HashMap::new()),
            max_selections_per_token,
        });
        let weak: Weak<Self> = Arc::downgrade(&hub);
        view.add_listener(Box::new(move |state, entry| {
            if let Some(hub) = weak.upgrade() {
                hub.on_batch(state, entry);
            }
        }));
        hub
    }

    fn frame(&self, snapshot: bool, revision: Revision) -> Frame {
        Frame {
            member: self.member.clone(),
            snapshot,
            revision,
            reset: false,
            tenant_deleted: false,
        }
    }

    fn snapshot(
        &self,
        resolution: &Resolution<L::Value>,
        revision: Revision,
        reset: bool,
    ) -> L::Message {
        let entries = resolution
            .iter()
            .map(|(name, v)| (name.clone(), Some(v.clone())))
            .collect();
        L::message(
            Frame {
                reset,
                ..self.frame(true, revision)
            },
            entries,
        )
    }

    fn deleted(&self, last: &Resolution<L::Value>, revision: Revision) -> L::Message {
        let entries = last.keys().map(|name| (name.clone(), None)).collect();
        L::message(
            Frame {
                tenant_deleted: true,
                ..self.frame(false, revision)
            },
            entries,
        )
    }

    /// Computes and sends the pushes one applied revision causes.
    fn on_batch(&self, state: &ViewState, entry: &JournalEntry) {
        let started = Instant::now();
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.retain(|_, g| g.sender.receiver_count() > 0);
        for (key, group) in groups.iter_mut() {
            // Names this revision may have changed for the group; `None`: all.
            let mut affected: Option<BTreeSet<&str>> = Some(BTreeSet::new());
            for change in entry.changes.iter().filter(|c| c.project == key.project) {
                if !group.chain.contains(&change.tenant) {
                    continue;
                }
                match (L::affects(change, &key.selection), affected.as_mut()) {
                    (Affects::Name(name), Some(set)) => {
                        set.insert(name);
                    }
                    (Affects::Everything, _) => affected = None,
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
                let _ = group.sender.send(Push::new(message, started));
                continue;
            };
            let new = match &affected {
                None => L::resolve_all(p, &chain, &key.selection),
                Some(names) => {
                    let mut new = group.last.clone();
                    for name in names {
                        match L::resolve_one(p, &chain, name) {
                            Some(v) => new.insert((*name).to_owned(), v),
                            None => new.remove(*name),
                        };
                    }
                    new
                }
            };
            let changes = diff::<L>(&group.last, &new);
            group.last = new;
            group.chain = chain.into_iter().map(str::to_owned).collect();
            if !changes.is_empty() {
                let message = L::message(self.frame(false, entry.revision), changes);
                let _ = group.sender.send(Push::new(message, started));
            }
        }
        groups.retain(|_, g| !g.deleted);
        self.metrics.fanout.record(started.elapsed().as_secs_f64());
    }

    /// Starts a subscription (see [`Subscription`]) for `owner`, the
    /// subscribing token's id (`None`: not counted, as with auth off).
    pub async fn subscribe(
        self: &Arc<Self>,
        project: String,
        tenant: String,
        selection: L::Selection,
        start_revision: Revision,
        shutdown: CancellationToken,
        owner: Option<Arc<str>>,
    ) -> Result<Subscription<L>, ApiError> {
        if start_revision < 0 {
            return Err(ApiError::new(
                ErrorReason::InvalidArgument,
                format!("start_revision must be 0 or positive, got {start_revision}"),
            ));
        }
        // A subscriber moving from a replica that is ahead waits until this
        // one has caught up with what it already saw, but not forever: a
        // revision no replica has reached would park the stream for good.
        if start_revision > 0 {
            let reached =
                tokio::time::timeout(CATCH_UP_WAIT, self.view.wait_for(start_revision - 1)).await;
            match reached {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorReason::Unavailable,
                        format!(
                            "start_revision {start_revision} is ahead of this replica (at \
                             revision {}) and it did not catch up within {CATCH_UP_WAIT:?}; \
                             resume from a revision this cluster has reached",
                            self.view.revision()
                        ),
                    ));
                }
            }
        }
        let key = GroupKey {
            project,
            tenant,
            selection,
        };
        let owner = match owner {
            Some(owner) => Some(self.reserve(owner, &key)?),
            None => None,
        };
        let (rx, initial, after) = match self.join(&key, start_revision) {
            Ok(joined) => joined,
            Err(e) => {
                if let Some(owner) = &owner {
                    self.release(owner, &key);
                }
                return Err(e);
            }
        };
        self.metrics.subscribers.increment(1.0);
        Ok(Subscription {
            hub: Arc::clone(self),
            owner,
            key,
            rx: BroadcastStream::new(rx),
            pending: initial.into_iter().map(Item::Own).collect(),
            after,
            done: false,
            cancelled: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown,
            registered: None,
        })
    }

    /// Counts one more subscription of `owner` to `key`, refusing a new
    /// distinct selection beyond the limit.
    fn reserve(&self, owner: Arc<str>, key: &GroupKey<L::Selection>) -> Result<Arc<str>, ApiError> {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        let watched = owners.entry(Arc::clone(&owner)).or_default();
        if let Some(count) = watched.get_mut(key) {
            *count += 1;
            return Ok(owner);
        }
        let max = self.max_selections_per_token;
        if max != 0 && watched.len() >= max {
            let held = watched.len();
            if held == 0 {
                owners.remove(&owner);
            }
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "token {owner} already watches {held} distinct {} selections; the limit is \
                     {max} (limits.max_watch_selections_per_token): close some, or watch one \
                     wider selection",
                    L::NAME
                ),
            )
            .with("limit", max)
            .with("setting", "limits.max_watch_selections_per_token"));
        }
        watched.insert(key.clone(), 1);
        Ok(owner)
    }

    /// Undoes one [`Self::reserve`].
    fn release(&self, owner: &Arc<str>, key: &GroupKey<L::Selection>) {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(watched) = owners.get_mut(owner) {
            if let Some(count) = watched.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    watched.remove(key);
                }
            }
            if watched.is_empty() {
                owners.remove(owner);
            }
        }
    }

    /// Joins (or creates) the group under the view's read lock, so the
    /// initial messages and the live pushes meet without gap or overlap.
    #[allow(clippy::type_complexity)]
    fn join(
        &self,
        key: &GroupKey<L::Selection>,
        start_revision: Revision,
    ) -> Result<
        (
            broadcast::Receiver<Arc<Push<L::Message>>>,
            Vec<L::Message>,
            Revision,
        ),
        ApiError,
    > {
        let state = self.view.read();
        let revision = state.revision;
        let project = state.projects.get(&key.project);
        let current =
            resolve_selection::<L>(project, &key.tenant, &key.selection).ok_or_else(|| {
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
            self.metrics.resets_history.increment(1);
            vec![self.snapshot(&current, revision, true)]
        };
        Ok((rx, initial, revision))
    }

    /// The changes of `key`'s resolved view from `start` to the state's
    /// revision, one message per revision that changed it.
    fn replay(
        &self,
        state: &ViewState,
        key: &GroupKey<L::Selection>,
        start: Revision,
    ) -> Vec<L::Message> {
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
        let mut last =
            resolve_selection::<L>(Some(&p), &key.tenant, &key.selection).unwrap_or_default();
        let mut out = Vec::new();
        for entry in entries {
            let mut touched = false;
            for c in entry.changes.iter().filter(|c| c.project == key.project) {
                p.set(&c.tenant, &c.object, c.after.as_ref());
                touched |= L::affects(c, &key.selection) != Affects::Nothing;
            }
            if !touched {
                continue;
            }
            let new =
                resolve_selection::<L>(Some(&p), &key.tenant, &key.selection).unwrap_or_default();
            let changes = diff::<L>(&last, &new);
            if !changes.is_empty() {
                out.push(L::message(self.frame(false, entry.revision), changes));
            }
            last = new;
        }
        out
    }
}
