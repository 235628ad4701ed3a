//! Typed config watches: [`Config<T>`] for one key and [`ConfigMap<T>`] for
//! every key under a prefix.
//!
//! A handle holds the newest good value in an [`ArcSwap`], so reading it is
//! a lock-free atomic load — game code can read it every tick. A background
//! task follows the daemon's watch stream (see [`crate::watch`] for
//! failover), decodes each new value by its format into `T`, swaps it in,
//! and then tells subscribers: a `tokio::sync::watch` receiver and callbacks
//! that see the old and the new value. A value that does not decode leaves
//! the last good one in place and is reported on the error stream, in the
//! log and in `strata_sdk_watch_errors_total`.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use serde::de::DeserializeOwned;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{ResolvedValue, WatchConfigRequest, WatchConfigResponse};
use tokio::sync::{broadcast, watch};
use tonic::transport::Channel;

use crate::cache::DiskCache;
use crate::client::Client;
use crate::format::decode;
use crate::watch::{AbortOnDrop, Feed, Resumable, Source, spawn};
use crate::{Error, WatchError};

/// How many unread errors an error receiver keeps before it lags.
const ERROR_BUFFER: usize = 64;

/// Where the raw (undecoded) changes of a config watch go.
trait ConfigSink: Send + Sync + 'static {
    fn apply(&self, revision: i64, changes: &[(String, Option<ResolvedValue>)]);
    fn common(&self) -> &Common;
}

/// The raw side of a config watch: the resolved view it holds, kept in
/// step with the stream and the disk cache.
struct ConfigFeed {
    keys: Vec<String>,
    prefixes: Vec<String>,
    held: BTreeMap<String, ResolvedValue>,
    cache: Option<Arc<DiskCache>>,
    sink: Option<Arc<dyn ConfigSink>>,
    tenant: String,
}

fn differs(a: &ResolvedValue, b: &ResolvedValue) -> bool {
    a.value != b.value || a.format != b.format
}

impl Feed for ConfigFeed {
    type Msg = WatchConfigResponse;

    async fn open(
        &self,
        client: &Client,
        channel: Channel,
        start_revision: i64,
    ) -> Result<tonic::Streaming<WatchConfigResponse>, tonic::Status> {
        let request = client.request(WatchConfigRequest {
            project: client.project().to_owned(),
            tenant: client.tenant().to_owned(),
            keys: self.keys.clone(),
            prefixes: self.prefixes.clone(),
            start_revision,
        });
        crate::codec::server_streaming(channel, request, "/strata.v1.ConfigService/Watch").await
    }

    fn revision(msg: &WatchConfigResponse) -> i64 {
        msg.revision
    }

    fn is_snapshot(msg: &WatchConfigResponse) -> bool {
        msg.kind == Kind::Snapshot as i32
    }

    fn is_final(msg: &WatchConfigResponse) -> bool {
        msg.tenant_deleted
    }

    fn absorb(&mut self, msg: WatchConfigResponse) {
        let snapshot = Self::is_snapshot(&msg);
        let mut diff = Vec::new();
        if snapshot {
            let fresh: BTreeMap<String, ResolvedValue> = msg
                .changes
                .into_iter()
                .filter_map(|c| c.value.map(|v| (c.key, v)))
                .collect();
            for (key, old) in &self.held {
                match fresh.get(key) {
                    None => diff.push((key.clone(), None)),
                    Some(new) if differs(old, new) => diff.push((key.clone(), Some(new.clone()))),
                    Some(_) => {}
                }
            }
            for (key, new) in &fresh {
                if !self.held.contains_key(key) {
                    diff.push((key.clone(), Some(new.clone())));
                }
            }
            self.held = fresh;
        } else {
            for change in msg.changes {
                match change.value {
                    Some(new) => {
                        if self
                            .held
                            .get(&change.key)
                            .is_none_or(|old| differs(old, &new))
                        {
                            diff.push((change.key.clone(), Some(new.clone())));
                        }
                        self.held.insert(change.key, new);
                    }
                    None => {
                        if self.held.remove(&change.key).is_some() {
                            diff.push((change.key, None));
                        }
                    }
                }
            }
        }
        if let Some(cache) = &self.cache
            && (snapshot || !diff.is_empty())
        {
            cache.store(&self.keys, &self.prefixes, &self.held, msg.revision);
        }
        if let Some(sink) = &self.sink {
            if !diff.is_empty() {
                sink.apply(msg.revision, &diff);
            }
            if msg.tenant_deleted {
                sink.common().report(WatchError::TenantDeleted {
                    tenant: self.tenant.clone(),
                });
            }
        }
    }

    fn start_from_cache(&mut self) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let Some((values, revision)) = cache.lookup(&self.keys, &self.prefixes) else {
            return false;
        };
        tracing::warn!(
            path = %cache.path().display(),
            revision,
            keys = ?self.keys,
            prefixes = ?self.prefixes,
            "every daemon is down: starting from the disk cache; will catch up when a daemon answers"
        );
        metrics::counter!("strata_sdk_cache_starts_total").increment(1);
        self.held = values;
        true
    }

    fn set_source(&mut self, source: Source) {
        if let Some(sink) = &self.sink {
            sink.common()
                .source
                .store(source.to_u8(), Ordering::Release);
        }
    }

    fn report(&self, error: WatchError) {
        match &self.sink {
            Some(sink) => sink.common().report(error),
            None => tracing::info!(error = %error, "config watch"),
        }
    }
}

/// State every handle kind shares: labels, source, revision, error stream.
struct Common {
    project: String,
    tenant: String,
    source: AtomicU8,
    revision: AtomicI64,
    /// Created by the first `errors()` call: a broadcast channel allocates
    /// its whole buffer up front, which most watches never need.
    errors: std::sync::OnceLock<broadcast::Sender<WatchError>>,
}

impl Common {
    fn new(client: &Client, source: Source, revision: i64) -> Self {
        Self {
            project: client.project().to_owned(),
            tenant: client.tenant().to_owned(),
            source: AtomicU8::new(source.to_u8()),
            revision: AtomicI64::new(revision),
            errors: std::sync::OnceLock::new(),
        }
    }

    fn report(&self, error: WatchError) {
        match &error {
            WatchError::Disconnected { .. } => {
                tracing::info!(project = %self.project, tenant = %self.tenant, error = %error, "config watch")
            }
            _ => {
                tracing::warn!(project = %self.project, tenant = %self.tenant, error = %error, "config watch")
            }
        }
        metrics::counter!(
            "strata_sdk_watch_errors_total",
            "project" => self.project.clone(),
            "tenant" => self.tenant.clone(),
            "kind" => error.kind(),
        )
        .increment(1);
        // No receiver is fine: the error was logged and counted.
        if let Some(errors) = self.errors.get() {
            let _ = errors.send(error);
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<WatchError> {
        self.errors
            .get_or_init(|| broadcast::channel(ERROR_BUFFER).0)
            .subscribe()
    }

    /// Runs a user callback; a panic in it is reported, not propagated, so
    /// it cannot kill the watch.
    fn guarded(&self, f: impl FnOnce()) {
        if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
            tracing::error!(project = %self.project, tenant = %self.tenant, "a config change callback panicked");
        }
    }
}

type Callback<T> = Arc<dyn Fn(&T, &T) + Send + Sync>;
/// One key's change in a map: key, old value, new value.
type MapEvent<'a, T> = (&'a str, Option<Arc<T>>, Option<Arc<T>>);
type MapCallback<T> = Arc<dyn Fn(&str, Option<&T>, Option<&T>) + Send + Sync>;

struct Slot<T> {
    key: String,
    value: ArcSwap<T>,
    changes: watch::Sender<Arc<T>>,
    callbacks: Mutex<Vec<Callback<T>>>,
    common: Common,
}

impl<T: DeserializeOwned + Send + Sync + 'static> ConfigSink for Slot<T> {
    fn apply(&self, revision: i64, changes: &[(String, Option<ResolvedValue>)]) {
        for (key, value) in changes {
            if *key != self.key {
                continue;
            }
            let Some(value) = value else {
                self.common.report(WatchError::Removed {
                    key: key.clone(),
                    revision,
                });
                continue;
            };
            match decode::<T>(&value.format, &value.value) {
                Ok(new) => {
                    let new = Arc::new(new);
                    let old = self.value.swap(Arc::clone(&new));
                    self.common.revision.store(revision, Ordering::Release);
                    self.changes.send_replace(Arc::clone(&new));
                    let callbacks = self
                        .callbacks
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    for callback in callbacks {
                        self.common.guarded(|| callback(&old, &new));
                    }
                }
                Err(message) => self.common.report(WatchError::Decode {
                    key: key.clone(),
                    revision,
                    format: value.format.clone(),
                    message,
                }),
            }
        }
    }

    fn common(&self) -> &Common {
        &self.common
    }
}

/// A watched config key, decoded into `T` and kept up to date.
///
/// Cheap to clone; the watch stops when the last clone is dropped. Get one
/// with [`Client::watch`].
///
/// ```no_run
/// # async fn run(client: strata_client::Client) -> Result<(), strata_client::Error> {
/// #[derive(serde::Deserialize)]
/// struct Matchmaking {
///     max_players: u32,
/// }
///
/// let config = client.watch::<Matchmaking>("matchmaker/server.yaml").await?;
/// // Every tick: a lock-free read.
/// let max = config.get().max_players;
/// // Hot reload: see each new value, with the one it replaced.
/// config.on_change(|old, new| {
///     tracing::info!(old = old.max_players, new = new.max_players, "max players changed");
/// });
/// # let _ = max; Ok(()) }
/// ```
pub struct Config<T> {
    slot: Arc<Slot<T>>,
    _task: Arc<AbortOnDrop>,
}

impl<T> Clone for Config<T> {
    fn clone(&self) -> Self {
        Self {
            slot: Arc::clone(&self.slot),
            _task: Arc::clone(&self._task),
        }
    }
}

impl<T> std::fmt::Debug for Config<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("key", &self.slot.key)
            .field("revision", &self.revision())
            .field("source", &self.source())
            .finish_non_exhaustive()
    }
}

/// A borrowed view of a config value, from [`Config::load`]: cheaper than
/// [`Config::get`] (no reference count touched), meant to be dropped soon.
pub struct ConfigRef<T>(Guard<Arc<T>>);

impl<T> std::ops::Deref for ConfigRef<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> Config<T> {
    /// The current value (lock-free; an atomic load and a reference count
    /// increment).
    pub fn get(&self) -> Arc<T> {
        self.slot.value.load_full()
    }

    /// The current value, borrowed (lock-free; cheaper than [`get`] while
    /// the returned guard is short-lived).
    ///
    /// [`get`]: Config::get
    pub fn load(&self) -> ConfigRef<T> {
        ConfigRef(self.slot.value.load())
    }

    /// The key watched.
    pub fn key(&self) -> &str {
        &self.slot.key
    }

    /// The revision that brought the current value (0 when it came from the
    /// disk cache and no daemon has answered yet).
    pub fn revision(&self) -> i64 {
        self.slot.common.revision.load(Ordering::Acquire)
    }

    /// Where the current value came from.
    pub fn source(&self) -> Source {
        Source::from_u8(self.slot.common.source.load(Ordering::Acquire))
    }

    /// A receiver that sees every new good value (`changed().await`, then
    /// `borrow()`), for `tokio::select!` loops.
    pub fn changes(&self) -> watch::Receiver<Arc<T>> {
        self.slot.changes.subscribe()
    }

    /// Calls `f(old, new)` after each new good value is in place, on the
    /// watch's task (keep it short; a panic in it is logged and swallowed).
    /// Callbacks live as long as the watch.
    pub fn on_change<F>(&self, f: F)
    where
        F: Fn(&T, &T) + Send + Sync + 'static,
    {
        self.slot
            .callbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::new(f));
    }

    /// A receiver of the problems this watch survives: bad values (the last
    /// good one is kept), removal of the key, disconnects.
    pub fn errors(&self) -> broadcast::Receiver<WatchError> {
        self.slot.common.subscribe()
    }
}

struct MapSlot<T> {
    prefix: String,
    value: ArcSwap<BTreeMap<String, Arc<T>>>,
    changes: watch::Sender<Arc<BTreeMap<String, Arc<T>>>>,
    callbacks: Mutex<Vec<MapCallback<T>>>,
    common: Common,
}

impl<T: DeserializeOwned + Send + Sync + 'static> ConfigSink for MapSlot<T> {
    fn apply(&self, revision: i64, changes: &[(String, Option<ResolvedValue>)]) {
        let mut map = BTreeMap::clone(&self.value.load());
        let mut events: Vec<MapEvent<'_, T>> = Vec::new();
        for (key, value) in changes {
            match value {
                Some(value) => match decode::<T>(&value.format, &value.value) {
                    Ok(new) => {
                        let new = Arc::new(new);
                        let old = map.insert(key.clone(), Arc::clone(&new));
                        events.push((key, old, Some(new)));
                    }
                    Err(message) => self.common.report(WatchError::Decode {
                        key: key.clone(),
                        revision,
                        format: value.format.clone(),
                        message,
                    }),
                },
                None => {
                    if let Some(old) = map.remove(key) {
                        events.push((key, Some(old), None));
                    }
                }
            }
        }
        if events.is_empty() {
            return;
        }
        let map = Arc::new(map);
        self.value.store(Arc::clone(&map));
        self.common.revision.store(revision, Ordering::Release);
        self.changes.send_replace(map);
        let callbacks = self
            .callbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (key, old, new) in &events {
            for callback in &callbacks {
                self.common
                    .guarded(|| callback(key, old.as_deref(), new.as_deref()));
            }
        }
    }

    fn common(&self) -> &Common {
        &self.common
    }
}

/// Every config key under a prefix, each decoded into `T`, kept up to date.
/// Keys appear and disappear as they are written and removed.
///
/// Cheap to clone; the watch stops when the last clone is dropped. Get one
/// with [`Client::watch_prefix`].
///
/// ```no_run
/// # async fn run(client: strata_client::Client) -> Result<(), strata_client::Error> {
/// #[derive(serde::Deserialize)]
/// struct Map {
///     name: String,
///     max_players: u32,
/// }
///
/// let maps = client.watch_prefix::<Map>("maps/").await?;
/// if let Some(dust) = maps.get("maps/dust.json") {
///     println!("{} holds {}", dust.name, dust.max_players);
/// }
/// # Ok(()) }
/// ```
pub struct ConfigMap<T> {
    slot: Arc<MapSlot<T>>,
    _task: Arc<AbortOnDrop>,
}

impl<T> Clone for ConfigMap<T> {
    fn clone(&self) -> Self {
        Self {
            slot: Arc::clone(&self.slot),
            _task: Arc::clone(&self._task),
        }
    }
}

impl<T> std::fmt::Debug for ConfigMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMap")
            .field("prefix", &self.slot.prefix)
            .field("keys", &self.slot.value.load().len())
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl<T> ConfigMap<T> {
    /// The current value of `key` (a full key, prefix included), lock-free.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        self.slot.value.load().get(key).cloned()
    }

    /// Every current key and value, as one consistent snapshot.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<T>>> {
        self.slot.value.load_full()
    }

    /// The prefix watched.
    pub fn prefix(&self) -> &str {
        &self.slot.prefix
    }

    /// The revision of the newest change applied.
    pub fn revision(&self) -> i64 {
        self.slot.common.revision.load(Ordering::Acquire)
    }

    /// Where the current values came from.
    pub fn source(&self) -> Source {
        Source::from_u8(self.slot.common.source.load(Ordering::Acquire))
    }

    /// A receiver that sees every new snapshot.
    pub fn changes(&self) -> watch::Receiver<Arc<BTreeMap<String, Arc<T>>>> {
        self.slot.changes.subscribe()
    }

    /// Calls `f(key, old, new)` for each key that changed (`old` is `None`
    /// for a new key, `new` is `None` for a removed one), after the new
    /// snapshot is in place. Same rules as [`Config::on_change`].
    pub fn on_change<F>(&self, f: F)
    where
        F: Fn(&str, Option<&T>, Option<&T>) + Send + Sync + 'static,
    {
        self.slot
            .callbacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::new(f));
    }

    /// A receiver of the problems this watch survives (see
    /// [`Config::errors`]).
    pub fn errors(&self) -> broadcast::Receiver<WatchError> {
        self.slot.common.subscribe()
    }
}

impl Client {
    fn config_feed(&self, keys: Vec<String>, prefixes: Vec<String>) -> Resumable<ConfigFeed> {
        Resumable::new(
            self.clone(),
            ConfigFeed {
                keys,
                prefixes,
                held: BTreeMap::new(),
                cache: self.inner.cache.clone(),
                sink: None,
                tenant: self.tenant().to_owned(),
            },
        )
    }

    /// Watches one config key, resolved for this client's tenant and
    /// decoded into `T` by the value's format (json, yaml, toml; properties
    /// as a map of strings; text as a string).
    ///
    /// Waits for the first value: from a daemon, or — when no daemon answers
    /// within the startup timeout — from the disk cache (the handle's
    /// [`source`](Config::source) then says so, and the watch catches up
    /// once a daemon answers). Fails when the key does not exist, its value
    /// does not decode, or no daemon answers and nothing is cached.
    pub async fn watch<T>(&self, key: &str) -> Result<Config<T>, Error>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let mut feed = self.config_feed(vec![key.to_owned()], Vec::new());
        let live = feed.start().await?;
        let Some(raw) = feed.feed.held.get(key) else {
            return Err(Error::MissingKey {
                key: key.to_owned(),
                tenant: self.tenant().to_owned(),
            });
        };
        let value = decode::<T>(&raw.format, &raw.value).map_err(|message| Error::Decode {
            key: key.to_owned(),
            format: raw.format.clone(),
            message,
        })?;
        let value = Arc::new(value);
        let slot = Arc::new(Slot {
            key: key.to_owned(),
            value: ArcSwap::new(Arc::clone(&value)),
            changes: watch::channel(value).0,
            callbacks: Mutex::new(Vec::new()),
            common: Common::new(self, feed.source(), feed.revision()),
        });
        feed.feed.sink = Some(Arc::clone(&slot) as Arc<dyn ConfigSink>);
        let task = spawn(feed, live);
        Ok(Config {
            slot,
            _task: Arc::new(task),
        })
    }

    /// Watches every config key under `prefix` (`""` watches all), each
    /// decoded into `T`. Same startup rules as [`watch`](Client::watch),
    /// except that an empty prefix is not an error. A value that does not
    /// decode at start is left out (and logged); later bad values keep the
    /// key's last good value.
    pub async fn watch_prefix<T>(&self, prefix: &str) -> Result<ConfigMap<T>, Error>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let mut feed = self.config_feed(Vec::new(), vec![prefix.to_owned()]);
        let live = feed.start().await?;
        let common = Common::new(self, feed.source(), feed.revision());
        let mut map = BTreeMap::new();
        for (key, raw) in &feed.feed.held {
            match decode::<T>(&raw.format, &raw.value) {
                Ok(value) => {
                    map.insert(key.clone(), Arc::new(value));
                }
                Err(message) => common.report(WatchError::Decode {
                    key: key.clone(),
                    revision: feed.revision(),
                    format: raw.format.clone(),
                    message,
                }),
            }
        }
        let map = Arc::new(map);
        let slot = Arc::new(MapSlot {
            prefix: prefix.to_owned(),
            value: ArcSwap::new(Arc::clone(&map)),
            changes: watch::channel(map).0,
            callbacks: Mutex::new(Vec::new()),
            common,
        });
        feed.feed.sink = Some(Arc::clone(&slot) as Arc<dyn ConfigSink>);
        let task = spawn(feed, live);
        Ok(ConfigMap {
            slot,
            _task: Arc::new(task),
        })
    }
}
