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

/// Resolved entries of a selection by name (config key, service name).
pub type Resolution<V> = BTreeMap<String, V>;

/// What one change means for a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affects<'c> {
    /// Nothing selected can have changed.
    Nothing,
    /// The entry with this name may have changed.
    Name(&'c str),
    /// Anything may have changed (the tenant chain itself changed).
    Everything,
}

/// The frame of a message: everything but its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Replica that sends it.
    pub member: String,
    /// A whole view (`true`) or the entries that changed.
    pub snapshot: bool,
    /// Revision the message brings the subscriber to.
    pub revision: Revision,
    /// A snapshot replacing what the subscriber held (history lost).
    pub reset: bool,
    /// The subscriber's tenant was deleted; the last message.
    pub tenant_deleted: bool,
}

/// A kind of watch: what a subscriber selects, how it resolves, and the
/// messages it is sent.
pub trait Lens: Send + Sync + 'static {
    /// What a subscriber selects.
    type Selection: Clone + Eq + Hash + Send + Sync + 'static;
    /// One resolved entry.
    type Value: Clone + Send + Sync + 'static;
    /// The message on the wire.
    type Message: prost::Message + Clone + Send + Sync + 'static;

    /// Name of the kind, for metrics labels.
    const NAME: &'static str;

    /// Every selected entry that exists for `chain`, resolved.
    fn resolve_all(
        p: &ProjectView,
        chain: &[&str],
        selection: &Self::Selection,
    ) -> Resolution<Self::Value>;
    /// One entry resolved; `None` when it does not exist.
    fn resolve_one(p: &ProjectView, chain: &[&str], name: &str) -> Option<Self::Value>;
    /// What `change` (to a tenant of the subscriber's chain) may change.
    fn affects<'c>(change: &'c Change, selection: &Self::Selection) -> Affects<'c>;
    /// Whether a subscriber would see a difference between two values.
    fn same(a: &Self::Value, b: &Self::Value) -> bool;
    /// A message: `entries` are (name, new value; `None` = gone).
    fn message(frame: Frame, entries: Vec<(String, Option<Self::Value>)>) -> Self::Message;
    /// The revision a message brings the subscriber to.
    fn revision(message: &Self::Message) -> Revision;
    /// Whether a message is the last one (the tenant was deleted).
    fn is_last(message: &Self::Message) -> bool;
    /// Marks a snapshot as a reset.
    fn mark_reset(message: &mut Self::Message);
}

/// The config watch: resolved keys and prefixes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigLens;

impl Lens for ConfigLens {
    type Selection = Selection;
    type Value = ResolvedValue;
    type Message = WatchConfigResponse;

    const NAME: &'static str = "config";

    fn resolve_all(
        p: &ProjectView,
        chain: &[&str],
        selection: &Selection,
    ) -> Resolution<ResolvedValue> {
        p.selected_keys(chain, &selection.keys, &selection.prefixes)
            .into_iter()
            .filter_map(|k| resolve_key(p, chain, &k).map(|v| (k, v)))
            .collect()
    }

    fn resolve_one(p: &ProjectView, chain: &[&str], key: &str) -> Option<ResolvedValue> {
        resolve_key(p, chain, key)
    }

    fn affects<'c>(change: &'c Change, selection: &Selection) -> Affects<'c> {
        match &change.object {
            Object::Layer(k) if selection.matches(k) => Affects::Name(k),
            Object::Tenant => Affects::Everything,
            // Other keys, and registry objects: not in this view.
            _ => Affects::Nothing,
        }
    }

    fn same(a: &ResolvedValue, b: &ResolvedValue) -> bool {
        a.value == b.value && a.format == b.format && a.origin == b.origin
    }

    fn message(frame: Frame, entries: Vec<(String, Option<ResolvedValue>)>) -> WatchConfigResponse {
        WatchConfigResponse {
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
            changes: entries
                .into_iter()
                .map(|(key, value)| ConfigChange { key, value })
                .collect(),
            tenant_deleted: frame.tenant_deleted,
        }
    }

    fn revision(message: &WatchConfigResponse) -> Revision {
        message.revision
    }

    fn is_last(message: &WatchConfigResponse) -> bool {
        message.tenant_deleted
    }

    fn mark_reset(message: &mut WatchConfigResponse) {
        message.reset = true;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey<S> {
    project: String,
    tenant: String,
    selection: S,
}

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
fn resolve_selection<L: Lens>(
    p: Option<&ProjectView>,
    tenant: &str,
    selection: &L::Selection,
) -> Option<Resolution<L::Value>> {
    let p = p?;
    let chain = p.chain(tenant)?;
    Some(L::resolve_all(p, &chain, selection))
}

/// Entries that turn `old` into `new`, by name.
fn diff<L: Lens>(
    old: &Resolution<L::Value>,
    new: &Resolution<L::Value>,
) -> Vec<(String, Option<L::Value>)> {
    let mut changes = Vec::new();
    for (name, value) in new {
        if old.get(name).is_none_or(|o| !L::same(o, value)) {
            changes.push((name.clone(), Some(value.clone())));
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            changes.push((name.clone(), None));
        }
    }
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    changes
}

/// A message on its way to subscribers, with its birth time for latency.
#[derive(Debug)]
struct Push<M> {
    message: M,
    /// `message` in protobuf, encoded once for every subscriber of the
    /// group (see [`Encoded`]).
    encoded: Bytes,
    created: Instant,
}

impl<M: prost::Message> Push<M> {
    fn new(message: M, created: Instant) -> Arc<Self> {
        Arc::new(Self {
            encoded: Bytes::from(message.encode_to_vec()),
            message,
            created,
        })
    }
}

/// A watch message already encoded in protobuf (without gRPC's framing).
/// A live push is encoded once per group and the bytes are shared by every
/// subscriber of the group, so a stream of these costs a subscriber a copy
/// of the bytes instead of a clone of the message and its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub Bytes);

/// What a subscription has to deliver next.
enum Item<M> {
    /// A message of this subscriber's own (snapshot, replay, reset).
    Own(M),
    /// A live push its group shares.
    Shared(Arc<Push<M>>),
}

impl<M: prost::Message + Clone> Item<M> {
    fn is_last(&self, is_last: impl Fn(&M) -> bool) -> bool {
        match self {
            Self::Own(m) => is_last(m),
            Self::Shared(p) => is_last(&p.message),
        }
    }

    fn message(self) -> M {
        match self {
            Self::Own(m) => m,
            Self::Shared(p) => p.message.clone(),
        }
    }

    fn encoded(self) -> Encoded {
        match self {
            Self::Own(m) => Encoded(Bytes::from(m.encode_to_vec())),
            Self::Shared(p) => Encoded(p.encoded.clone()),
        }
    }
}

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

/// One subscriber's stream of messages: the initial snapshot or replay,
/// then live pushes. Ends after a `tenant_deleted` message, and with
/// `UNAVAILABLE` when the daemon shuts down (resume on another replica).
///
/// A hand-written [`Stream`]: one push wakes every subscriber of a group,
/// so what a poll costs is paid thousands of times per change. Polling
/// allocates nothing (the receive future's box is reused), and the shutdown
/// signal is registered once per task rather than on every poll.
pub struct Subscription<L: Lens> {
    hub: Arc<Hub<L>>,
    /// The token this subscription is counted against.
    owner: Option<Arc<str>>,
    key: GroupKey<L::Selection>,
    rx: BroadcastStream<Arc<Push<L::Message>>>,
    pending: VecDeque<Item<L::Message>>,
    /// Live pushes at or below this revision are already covered.
    after: Revision,
    done: bool,
    shutdown: CancellationToken,
    /// Wakes the stream when the daemon starts draining.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `cancelled` was last polled with: polling it again takes
    /// the shutdown token's lock, which every subscription shares, so it is
    /// polled only when the stream moved to another task.
    registered: Option<Waker>,
}

// No field is pinned structurally: the futures are boxed, so moving a
// subscription never moves them.
impl<L: Lens> Unpin for Subscription<L> {}

impl<L: Lens> Drop for Subscription<L> {
    fn drop(&mut self) {
        self.hub.metrics.subscribers.decrement(1.0);
        if let Some(owner) = &self.owner {
            self.hub.release(owner, &self.key);
        }
    }
}

/// A subscription as the stream a tonic handler returns.
pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, tonic::Status>> + Send>>;

impl<L: Lens> Subscription<L> {
    /// The next message; `None` when the stream is over.
    pub async fn next(&mut self) -> Option<Result<L::Message, tonic::Status>> {
        futures::StreamExt::next(self).await
    }

    /// This subscription as a stream for tonic.
    pub fn into_stream(self) -> MessageStream<L::Message> {
        Box::pin(self)
    }

    /// Handles what the group channel delivered; a message to deliver is
    /// queued in `pending`.
    fn receive(&mut self, received: Result<Arc<Push<L::Message>>, BroadcastStreamRecvError>) {
        match received {
            Ok(push) => {
                let revision = L::revision(&push.message);
                if revision <= self.after {
                    return;
                }
                self.after = revision;
                self.hub
                    .metrics
                    .latency
                    .record(push.created.elapsed().as_secs_f64());
                self.pending.push_back(Item::Shared(push));
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                self.hub.metrics.resets_lagged.increment(1);
                match self.hub.join(&self.key, 0) {
                    Ok((rx, mut initial, after)) => {
                        self.rx = BroadcastStream::new(rx);
                        self.after = after;
                        for m in &mut initial {
                            L::mark_reset(m);
                        }
                        self.pending.extend(initial.into_iter().map(Item::Own));
                    }
                    Err(_) => {
                        let m = self
                            .hub
                            .deleted(&Resolution::new(), self.hub.view.revision());
                        self.pending.push_back(Item::Own(m));
                    }
                }
            }
        }
    }
}

impl<L: Lens> Subscription<L> {
    /// The next thing to deliver (see [`Stream::poll_next`]).
    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Item<L::Message>, tonic::Status>>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                self.done |= item.is_last(L::is_last);
                self.hub.metrics.pushes.increment(1);
                return Poll::Ready(Some(Ok(item)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if self.shutdown.is_cancelled() {
                self.done = true;
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "stratad is shutting down; resume the watch on another replica",
                ))));
            }
            match Pin::new(&mut self.rx).poll_next(cx) {
                Poll::Ready(Some(received)) => self.receive(received),
                // The group was dropped: the hub is gone.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    let fresh = self
                        .registered
                        .as_ref()
                        .is_none_or(|w| !w.will_wake(cx.waker()));
                    if fresh {
                        if self.cancelled.as_mut().poll(cx).is_ready() {
                            continue;
                        }
                        self.registered = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// This subscription as a stream of encoded messages, for a codec that
    /// writes [`Encoded`] bytes as they are (see [`crate::transport::grpc`]).
    pub fn into_encoded_stream(self) -> MessageStream<Encoded> {
        Box::pin(EncodedStream(self))
    }
}

impl<L: Lens> Stream for Subscription<L> {
    type Item = Result<L::Message, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_item(cx)
            .map(|item| item.map(|r| r.map(Item::message)))
    }
}

/// A subscription yielding [`Encoded`] messages.
struct EncodedStream<L: Lens>(Subscription<L>);

impl<L: Lens> Stream for EncodedStream<L> {
    type Item = Result<Encoded, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .0
            .poll_item(cx)
            .map(|item| item.map(|r| r.map(Item::encoded)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::app::api::{Api, Limits, NewTenant, PutLayer};
    use crate::domain::document::{Format, Mode};
    use crate::state::view::JournalLimits;
    use crate::store::Store;
    use crate::store::embedded::EmbeddedStore;

    /// A real embedded store, its view following it, a config hub and the
    /// API that writes through it.
    struct Rig {
        api: Api,
        hub: Arc<Hub<ConfigLens>>,
        shutdown: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
            let view = View::load(store.as_ref(), JournalLimits::default())
                .await
                .unwrap();
            let hub = Hub::<ConfigLens>::new(Arc::clone(&view), "m1".into(), 2);
            let shutdown = CancellationToken::new();
            tokio::spawn(Arc::clone(&view).follow(Arc::clone(&store), shutdown.clone()));
            let api = Api::new(store, view, Limits::default());
            Self {
                api,
                hub,
                shutdown,
                _dir: dir,
            }
        }

        async fn tenant(&self, name: &str, parent: &str) {
            self.api
                .create_tenant(NewTenant {
                    project: "p".into(),
                    name: name.into(),
                    parent: parent.into(),
                    ..NewTenant::default()
                })
                .await
                .unwrap();
        }

        async fn put(&self, tenant: &str, key: &str, value: &str) -> Revision {
            self.api
                .put_layer(PutLayer {
                    project: "p".into(),
                    tenant: tenant.into(),
                    key: key.into(),
                    value: value.as_bytes().to_vec(),
                    format: Some(Format::Text),
                    mode: Mode::Replace,
                    expected_revision: None,
                })
                .await
                .unwrap()
                .1
        }

        async fn subscribe(&self, tenant: &str, key: &str) -> Subscription<ConfigLens> {
            self.hub
                .subscribe(
                    "p".into(),
                    tenant.into(),
                    Selection::new(vec![key.into()], vec![]),
                    0,
                    self.shutdown.clone(),
                    None,
                )
                .await
                .unwrap()
        }

        fn groups(&self) -> usize {
            self.hub
                .groups
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn next(s: &mut Subscription<ConfigLens>) -> WatchConfigResponse {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a message within 10 s")
            .expect("the stream goes on")
            .expect("a message, not an error")
    }

    /// A resolved value as (text, origin); `None`: the key is gone.
    type Seen = Option<(String, Vec<String>)>;

    /// (key, what it resolves to) for each change of a message.
    fn entries(m: &WatchConfigResponse) -> Vec<(String, Seen)> {
        m.changes
            .iter()
            .map(|c| {
                let v = c.value.as_ref().map(|v| {
                    (
                        String::from_utf8(v.value.clone()).unwrap(),
                        v.origin.clone(),
                    )
                });
                (c.key.clone(), v)
            })
            .collect()
    }

    fn value(text: &str, origin: &str) -> Seen {
        Some((text.to_owned(), vec![origin.to_owned()]))
    }

    #[test]
    fn selection_matches_keys_and_prefixes() {
        let s = Selection::new(vec!["a/x.yaml".into()], vec!["b/".into()]);
        assert!(s.matches("a/x.yaml") && s.matches("b/y") && !s.matches("a/y") && !s.matches("c"));
        assert!(Selection::new(vec![], vec![]).matches("anything"));
    }

    #[tokio::test]
    async fn subscribers_of_one_tenant_and_key_share_one_group_and_get_the_same_push() {
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        rig.put("base", "a.txt", "v1").await;
        let mut subs = Vec::new();
        for _ in 0..3 {
            let mut s = rig.subscribe("base", "a.txt").await;
            let snapshot = next(&mut s).await;
            assert_eq!(snapshot.kind, Kind::Snapshot as i32);
            assert_eq!(
                entries(&snapshot),
                vec![("a.txt".into(), value("v1", "base"))]
            );
            subs.push(s);
        }
        assert_eq!(rig.groups(), 1, "one group for one (tenant, selection)");
        let revision = rig.put("base", "a.txt", "v2").await;
        for s in &mut subs {
            let m = next(s).await;
            assert_eq!((m.kind, m.revision), (Kind::Change as i32, revision));
            assert_eq!(entries(&m), vec![("a.txt".into(), value("v2", "base"))]);
        }
    }

    #[tokio::test]
    async fn tenants_with_and_without_an_override_get_their_own_pushes_and_nothing_they_cannot_see()
    {
        let rig = Rig::new().await;
        rig.tenant("integration", "").await;
        rig.tenant("feat-1", "integration").await;
        rig.put("integration", "a.txt", "base-1").await;
        let mut parent = rig.subscribe("integration", "a.txt").await;
        let mut child = rig.subscribe("feat-1", "a.txt").await;
        let mut child2 = rig.subscribe("feat-1", "a.txt").await;
        for s in [&mut parent, &mut child, &mut child2] {
            assert_eq!(
                entries(&next(s).await),
                vec![("a.txt".into(), value("base-1", "integration"))]
            );
        }
        assert_eq!(rig.groups(), 2, "one group per tenant");

        // The override changes only the child's view.
        let overridden = rig.put("feat-1", "a.txt", "feat").await;
        for s in [&mut child, &mut child2] {
            let m = next(s).await;
            assert_eq!(m.revision, overridden);
            assert_eq!(entries(&m), vec![("a.txt".into(), value("feat", "feat-1"))]);
        }
        // The parent's change is hidden from the child by its override.
        let hidden = rig.put("integration", "a.txt", "base-2").await;
        let m = next(&mut parent).await;
        assert_eq!(m.revision, hidden);
        assert_eq!(
            entries(&m),
            vec![("a.txt".into(), value("base-2", "integration"))]
        );
        // The parent's first push is this one: the override sent it nothing.
        assert!(overridden < hidden);

        // The next thing the children see is the override going away, not
        // the hidden change.
        let removed = rig
            .api
            .delete_layer("p", "feat-1", "a.txt", None)
            .await
            .unwrap();
        for s in [&mut child, &mut child2] {
            let m = next(s).await;
            assert_eq!(m.revision, removed, "no push for the hidden change");
            assert_eq!(
                entries(&m),
                vec![("a.txt".into(), value("base-2", "integration"))]
            );
        }
        // Removing the override does not change the parent's view: its next
        // push is the next change of its own.
        let last = rig.put("integration", "a.txt", "base-3").await;
        let m = next(&mut parent).await;
        assert_eq!(
            m.revision, last,
            "no push for the child's override going away"
        );
        assert_eq!(
            entries(&m),
            vec![("a.txt".into(), value("base-3", "integration"))]
        );
    }

    #[tokio::test]
    async fn a_stream_ends_with_unavailable_when_the_daemon_shuts_down() {
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        let mut s = rig.subscribe("base", "a.txt").await;
        assert_eq!(next(&mut s).await.kind, Kind::Snapshot as i32);
        let waiting = tokio::spawn(async move {
            let end = s.next().await;
            (end, s.next().await)
        });
        // Let the stream register for the signal first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        rig.shutdown.cancel();
        let (end, after) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        let status = end.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(after.is_none(), "the stream is over");
    }

    #[tokio::test]
    async fn groups_without_subscribers_are_dropped() {
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        let mut s = rig.subscribe("base", "a.txt").await;
        next(&mut s).await;
        assert_eq!(rig.groups(), 1);
        drop(s);
        // The next revision sweeps the group away.
        rig.put("base", "b.txt", "x").await;
        assert_eq!(rig.groups(), 0);
    }

    #[tokio::test]
    async fn encoded_streams_carry_the_same_messages_and_share_one_encoding_per_push() {
        use prost::Message as _;
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        rig.put("base", "a.txt", "v1").await;
        let mut plain = rig.subscribe("base", "a.txt").await;
        let mut encoded = Vec::new();
        for _ in 0..2 {
            encoded.push(rig.subscribe("base", "a.txt").await.into_encoded_stream());
        }
        let snapshot = next(&mut plain).await;
        for s in &mut encoded {
            let bytes = futures::StreamExt::next(s).await.unwrap().unwrap().0;
            assert_eq!(WatchConfigResponse::decode(bytes).unwrap(), snapshot);
        }
        rig.put("base", "a.txt", "v2").await;
        let push = next(&mut plain).await;
        let mut seen = Vec::new();
        for s in &mut encoded {
            let bytes = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(s))
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .0;
            assert_eq!(WatchConfigResponse::decode(bytes.clone()).unwrap(), push);
            seen.push(bytes);
        }
        // Both subscribers were handed the very same buffer.
        assert_eq!(seen[0].as_ptr(), seen[1].as_ptr());
    }

    /// Finding 6 of the security review: a token holds a bounded number of
    /// distinct selections (each keeps its own resolved copy); the same
    /// selection again is free, and closing one frees its slot.
    #[tokio::test]
    async fn a_token_watches_a_bounded_number_of_selections_finding_6() {
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        let owner: Arc<str> = "t1".into();
        let watch = |key: &str| {
            rig.hub.subscribe(
                "p".into(),
                "base".into(),
                Selection::new(vec![key.into()], vec![]),
                0,
                rig.shutdown.clone(),
                Some(Arc::clone(&owner)),
            )
        };
        let a = watch("a").await.unwrap();
        let _b = watch("b").await.unwrap();
        let _a_again = watch("a").await.unwrap();
        let Err(refused) = watch("c").await else {
            panic!("a third distinct selection must be refused");
        };
        assert_eq!(refused.reason, ErrorReason::LimitExceeded);
        assert!(
            refused
                .to_string()
                .contains("limits.max_watch_selections_per_token"),
            "{refused}"
        );
        // Another token is not charged for this one's selections.
        rig.hub
            .subscribe(
                "p".into(),
                "base".into(),
                Selection::new(vec!["c".into()], vec![]),
                0,
                rig.shutdown.clone(),
                Some("t2".into()),
            )
            .await
            .unwrap();
        drop(a);
        assert!(watch("c").await.is_err(), "'a' is still watched once");
        drop(_a_again);
        watch("c").await.unwrap();
    }

    /// Finding 6: a start revision this replica never reaches is refused
    /// after a bounded wait instead of parking the stream forever.
    #[tokio::test]
    async fn a_start_revision_from_the_future_is_refused_finding_6() {
        let rig = Rig::new().await;
        rig.tenant("base", "").await;
        let started = std::time::Instant::now();
        let Err(refused) = rig
            .hub
            .subscribe(
                "p".into(),
                "base".into(),
                Selection::new(vec!["a".into()], vec![]),
                i64::MAX / 2,
                rig.shutdown.clone(),
                None,
            )
            .await
        else {
            panic!("a revision from the future must be refused");
        };
        assert_eq!(refused.reason, ErrorReason::Unavailable);
        assert!(
            refused.to_string().contains("ahead of this replica"),
            "{refused}"
        );
        assert!(started.elapsed() < CATCH_UP_WAIT + std::time::Duration::from_secs(5));
    }
}
