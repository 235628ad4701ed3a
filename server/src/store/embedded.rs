//! The `embedded` backend: a durable, crash-safe, single-node [`Store`] on a
//! `redb` file.
//!
//! One writer thread owns every mutation. Requests queue on a channel; the
//! writer drains whatever has queued (up to [`EmbeddedOptions::max_batch`]),
//! applies each request in order inside one redb write transaction, commits
//! it with one fsync (`Durability::Immediate`) and only then answers. This is
//! group commit: concurrent writers share an fsync, yet each transaction still
//! gets its own revision and its own compare results, exactly as if it had
//! committed alone.
//!
//! On disk (tables of `<data-dir>/strata.redb`):
//! - `kv`: key → [`KvRecord`] (value, create/mod revision, version, lease);
//! - `log`: revision → the events of that revision (the watch history, cut by
//!   compaction);
//! - `meta`: current revision, compaction point, next lease id;
//! - `leases`: lease id → (TTL, deadline in Unix milliseconds). Deadlines are
//!   persisted, so a lease keeps its expiry across a restart and one that
//!   lapsed while the daemon was down expires right after start.
//!
//! After a commit the writer publishes each revision's events on a broadcast
//! channel. A watcher reads history it missed from `log`, then follows the
//! broadcast; if it lags past the channel's capacity it falls back to `log`,
//! so a slow watcher never slows the writer or other watchers.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::{broadcast, oneshot};

use super::{
    Event, EventKind, KeyRange, KeyValue, Lease, LeaseId, LeaseInfo, RangeResponse, Revision,
    Store, StoreError, StoreStatus, Txn, TxnOp, TxnResponse, WatchBatch, WatchStream, unix_now_ms,
};

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "strata.redb";

const KV: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<'_, i64, (i64, i64)> = TableDefinition::new("leases");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";
const META_NEXT_LEASE: &str = "next_lease";

/// How many revisions a catching-up watcher reads from the log at once.
const LOG_READ_CHUNK: usize = 512;
/// Longest the writer sleeps without checking lease deadlines.
const MAX_IDLE: Duration = Duration::from_millis(500);

/// Tuning of the embedded backend.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Most requests the writer commits with one fsync.
    pub max_batch: usize,
    /// Revisions buffered for live watchers before a slow one falls back to
    /// reading the log.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            watch_buffer: 4096,
        }
    }
}

/// Stored form of a key's value and bookkeeping.
#[derive(Clone, PartialEq, Message)]
struct KvRecord {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "3")]
    mod_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(int64, tag = "5")]
    lease: i64,
}

/// Stored form of one event in the log.
#[derive(Clone, PartialEq, Message)]
struct EventRecord {
    #[prost(bool, tag = "1")]
    delete: bool,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    kv: Option<KvRecord>,
}

/// Stored form of one revision in the log.
#[derive(Clone, PartialEq, Message)]
struct LogRecord {
    #[prost(message, repeated, tag = "1")]
    events: Vec<EventRecord>,
}

fn backend(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(err.into().to_string())
}

fn corrupt(err: prost::DecodeError) -> StoreError {
    StoreError::Backend(format!("corrupt record: {err}"))
}

fn decode_kv(key: &[u8], bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let rec = KvRecord::decode(bytes).map_err(corrupt)?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: rec.value,
        create_revision: rec.create_revision,
        mod_revision: rec.mod_revision,
        version: rec.version,
        lease: rec.lease,
    })
}

fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    KvRecord {
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
    .encode_to_vec()
}

fn encode_log(events: &[Event]) -> Vec<u8> {
    LogRecord {
        events: events
            .iter()
            .map(|e| EventRecord {
                delete: e.kind == EventKind::Delete,
                key: e.kv.key.clone(),
                kv: (e.kind == EventKind::Put).then(|| KvRecord {
                    value: e.kv.value.clone(),
                    create_revision: e.kv.create_revision,
                    mod_revision: e.kv.mod_revision,
                    version: e.kv.version,
                    lease: e.kv.lease,
                }),
            })
            .collect(),
    }
    .encode_to_vec()
}

fn decode_log(revision: Revision, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let rec = LogRecord::decode(bytes).map_err(corrupt)?;
    Ok(rec
        .events
        .into_iter()
        .map(|e| match (e.delete, e.kv) {
            (false, Some(kv)) => Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: e.key,
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    lease: kv.lease,
                },
            },
            _ => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: e.key,
                    mod_revision: revision,
                    ..KeyValue::default()
                },
            },
        })
        .collect())
}

fn read_kv<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    key: &[u8],
) -> Result<Option<KeyValue>, StoreError> {
    match table.get(key).map_err(backend)? {
        Some(guard) => Ok(Some(decode_kv(key, guard.value())?)),
        None => Ok(None),
    }
}

fn read_range<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    range: &KeyRange,
) -> Result<Vec<KeyValue>, StoreError> {
    match range {
        KeyRange::Key(key) => Ok(read_kv(table, key)?.into_iter().collect()),
        KeyRange::Prefix(prefix) => {
            let mut out = Vec::new();
            for entry in table.range(prefix.as_slice()..).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push(decode_kv(k.value(), v.value())?);
            }
            Ok(out)
        }
    }
}

/// One committed revision, as published to live watchers.
#[derive(Debug)]
struct Committed {
    revision: Revision,
    events: Arc<[Event]>,
}

/// State shared by the handle, the writer thread and watchers.
struct Shared {
    db: Database,
    path: PathBuf,
    /// Latest committed revision (updated after fsync, before publishing).
    revision: AtomicI64,
    compacted: AtomicI64,
    /// Set while the writer runs; watchers subscribe through it. The writer
    /// owns the only strong sender, so watchers see `Closed` once it exits.
    events: broadcast::WeakSender<Arc<Committed>>,
}

impl Shared {
    fn read_range(&self, range: &KeyRange) -> Result<RangeResponse, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let revision = meta
            .get(META_REVISION)
            .map_err(backend)?
            .map_or(0, |g| g.value());
        let kv = rtx.open_table(KV).map_err(backend)?;
        Ok(RangeResponse {
            kvs: read_range(&kv, range)?,
            revision,
        })
    }

    /// Reads up to `limit` revisions of history starting at `from`.
    fn read_log(&self, from: Revision, limit: usize) -> Result<Vec<Committed>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let meta = rtx.open_table(META).map_err(backend)?;
        let compacted = meta
            .get(META_COMPACTED)
            .map_err(backend)?
            .map_or(0, |g| g.value());
        if from < compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let log = rtx.open_table(LOG).map_err(backend)?;
        let start = u64::try_from(from.max(1)).unwrap_or(1);
        let mut out = Vec::new();
        for entry in log.range(start..).map_err(backend)?.take(limit) {
            let (rev, bytes) = entry.map_err(backend)?;
            let revision = i64::try_from(rev.value()).unwrap_or(i64::MAX);
            out.push(Committed {
                revision,
                events: decode_log(revision, bytes.value())?.into(),
            });
        }
        Ok(out)
    }
}

/// A request to the writer thread.
enum Request {
    Txn(Txn, Reply<TxnResponse>),
    Grant(i64, Reply<Lease>),
    KeepAlive(LeaseId, Reply<i64>),
    Revoke(LeaseId, Reply<Revision>),
    TimeToLive(LeaseId, Reply<LeaseInfo>),
    Compact(Revision, Reply<()>),
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// An answer held back until the batch's commit outcome is known.
type Deferred = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Deferred {
    Box::new(move |commit| {
        // The caller may have gone away; its answer is then nobody's business.
        let _ = reply.send(commit.and(result));
    })
}

/// The embedded, redb-backed store. Dropping it stops the writer thread
/// (after the batch in flight) and closes the file.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir` with default options.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, EmbeddedOptions::default())
    }

    /// Opens (creating if needed) the store in `data_dir`.
    ///
    /// Blocking: call it from a blocking context. Fails with a message naming
    /// the path when the directory cannot be created, the file cannot be
    /// opened or locked (another process has it), or it is not a store.
    pub fn open_with(data_dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let db = Database::create(&path).map_err(|e| {
            let e = redb::Error::from(e);
            let hint = match e {
                redb::Error::DatabaseAlreadyOpen => " (is another stratad using this data dir?)",
                _ => "",
            };
            StoreError::Backend(format!("cannot open {}: {e}{hint}", path.display()))
        })?;
        let (sender, _) = broadcast::channel(options.watch_buffer.max(16));
        let shared = Arc::new(Shared {
            db,
            path,
            revision: AtomicI64::new(0),
            compacted: AtomicI64::new(0),
            events: sender.downgrade(),
        });
        let writer = Writer::load(Arc::clone(&shared), sender, options.max_batch.max(1))?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("strata-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            shared,
            requests: Some(tx),
            writer: Some(handle),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let closed = || StoreError::Unavailable("store is closed".into());
        self.requests
            .as_ref()
            .ok_or_else(closed)?
            .send(make(tx))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch; joining
        // it makes "dropped" mean "file closed", so a reopen never races.
        drop(self.requests.take());
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn range(&self, range: KeyRange) -> Result<RangeResponse, StoreError> {
        self.blocking(move |s| s.read_range(&range)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn.validate()?;
        self.call(|r| Request::Txn(txn, r)).await
    }

    async fn watch(
        &self,
        range: KeyRange,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        let sender = self
            .shared
            .events
            .upgrade()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        // Subscribe before reading the current revision so nothing committed
        // in between can be missed.
        let live = sender.subscribe();
        let current = self.shared.revision.load(Ordering::Acquire);
        let next = if start_revision <= 0 {
            current + 1
        } else {
            start_revision
        };
        let watcher = Watcher {
            shared: Arc::downgrade(&self.shared),
            range,
            next,
            live,
            catch_up: next <= current,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watcher,
            |mut w| async move { w.next_batch().await.map(|item| (item, w)) },
        )))
    }

    async fn lease_grant(&self, ttl_seconds: i64) -> Result<Lease, StoreError> {
        if ttl_seconds <= 0 {
            return Err(StoreError::InvalidTxn(format!(
                "lease TTL must be positive, got {ttl_seconds}"
            )));
        }
        self.call(|r| Request::Grant(ttl_seconds, r)).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        self.call(|r| Request::KeepAlive(id, r)).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision, StoreError> {
        self.call(|r| Request::Revoke(id, r)).await
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<LeaseInfo, StoreError> {
        self.call(|r| Request::TimeToLive(id, r)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.call(|r| Request::Compact(revision, r)).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        Ok(StoreStatus {
            revision: self.shared.revision.load(Ordering::Acquire),
            compacted_revision: self.shared.compacted.load(Ordering::Acquire),
        })
    }
}

/// One watch's position and buffers.
struct Watcher {
    shared: Weak<Shared>,
    range: KeyRange,
    /// The next revision this watcher has to deliver or skip.
    next: Revision,
    live: broadcast::Receiver<Arc<Committed>>,
    /// Whether history from `next` must be read from the log before following
    /// the live channel.
    catch_up: bool,
    pending: VecDeque<WatchBatch>,
    done: bool,
}

impl Watcher {
    fn filter(&self, committed: &Committed) -> Option<WatchBatch> {
        let matching = committed
            .events
            .iter()
            .filter(|e| self.range.contains(&e.kv.key))
            .count();
        let events: Arc<[Event]> = if matching == committed.events.len() {
            // The common case (a prefix watcher seeing a whole revision):
            // share the events instead of copying them per watcher.
            Arc::clone(&committed.events)
        } else {
            committed
                .events
                .iter()
                .filter(|e| self.range.contains(&e.kv.key))
                .cloned()
                .collect()
        };
        (matching > 0).then_some(WatchBatch {
            revision: committed.revision,
            events,
        })
    }

    fn fail(&mut self, err: StoreError) -> Option<Result<WatchBatch, StoreError>> {
        self.done = true;
        Some(Err(err))
    }

    async fn next_batch(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.done {
                return None;
            }
            if self.catch_up {
                let Some(shared) = self.shared.upgrade() else {
                    return self.fail(StoreError::Unavailable("store is closed".into()));
                };
                let from = self.next;
                let read =
                    tokio::task::spawn_blocking(move || shared.read_log(from, LOG_READ_CHUNK))
                        .await;
                let chunk = match read {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(e)) => return self.fail(e),
                    Err(e) => {
                        return self.fail(StoreError::Unavailable(format!("log read failed: {e}")));
                    }
                };
                self.catch_up = chunk.len() == LOG_READ_CHUNK;
                for committed in &chunk {
                    self.next = committed.revision + 1;
                    if let Some(batch) = self.filter(committed) {
                        self.pending.push_back(batch);
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(committed) => {
                    if committed.revision < self.next {
                        continue;
                    }
                    if committed.revision > self.next {
                        // Revisions are contiguous, so a jump means this
                        // watcher missed some: read them from the log.
                        self.catch_up = true;
                        continue;
                    }
                    self.next = committed.revision + 1;
                    if let Some(batch) = self.filter(&committed) {
                        return Some(Ok(batch));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up = true,
                Err(broadcast::error::RecvError::Closed) => {
                    return self.fail(StoreError::Unavailable("store is closed".into()));
                }
            }
        }
    }
}

/// In-memory state of one lease; the writer thread owns it.
struct LeaseState {
    ttl_seconds: i64,
    deadline_ms: i64,
    keys: BTreeSet<Vec<u8>>,
}

/// The single writer: owns every mutation and the lease table.
struct Writer {
    shared: Arc<Shared>,
    events: broadcast::Sender<Arc<Committed>>,
    max_batch: usize,
    revision: Revision,
    compacted: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, LeaseState>,
    /// (deadline, lease) for finding the next expiry without a scan.
    deadlines: BTreeSet<(i64, LeaseId)>,
    /// Set after a failed commit whose state could not be reloaded.
    failed: Option<String>,
}

/// The tables a batch writes to.
struct Tables<'t> {
    kv: Table<'t, &'static [u8], &'static [u8]>,
    log: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    leases: Table<'t, i64, (i64, i64)>,
}

impl Writer {
    fn load(
        shared: Arc<Shared>,
        events: broadcast::Sender<Arc<Committed>>,
        max_batch: usize,
    ) -> Result<Self, StoreError> {
        let mut writer = Self {
            shared,
            events,
            max_batch,
            revision: 0,
            compacted: 0,
            next_lease: 1,
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            failed: None,
        };
        writer.reload()?;
        Ok(writer)
    }

    /// Rebuilds the in-memory state from the file (at open, and after a
    /// failed commit left memory ahead of disk).
    fn reload(&mut self) -> Result<(), StoreError> {
        let wtx = self.shared.db.begin_write().map_err(backend)?;
        {
            let t = open_tables(&wtx).map_err(backend)?;
            let meta_get = |k: &str| -> Result<i64, StoreError> {
                Ok(t.meta.get(k).map_err(backend)?.map_or(0, |g| g.value()))
            };
            self.revision = meta_get(META_REVISION)?;
            self.compacted = meta_get(META_COMPACTED)?;
            self.next_lease = meta_get(META_NEXT_LEASE)?.max(1);
            self.leases.clear();
            self.deadlines.clear();
            for entry in t.leases.iter().map_err(backend)? {
                let (id, value) = entry.map_err(backend)?;
                let (ttl_seconds, deadline_ms) = value.value();
                let id = id.value();
                self.leases.insert(
                    id,
                    LeaseState {
                        ttl_seconds,
                        deadline_ms,
                        keys: BTreeSet::new(),
                    },
                );
                self.deadlines.insert((deadline_ms, id));
            }
            for entry in t.kv.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let rec = KvRecord::decode(value.value()).map_err(corrupt)?;
                if let Some(lease) = self.leases.get_mut(&rec.lease) {
                    lease.keys.insert(key.value().to_vec());
                }
            }
        }
        // Creating the tables of a new file is the only write here.
        wtx.commit().map_err(backend)?;
        self.shared.revision.store(self.revision, Ordering::Release);
        self.shared
            .compacted
            .store(self.compacted, Ordering::Release);
        Ok(())
    }

    fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            let wait = self.until_next_expiry();
            let mut batch = Vec::new();
            match requests.recv_timeout(wait) {
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            if batch.is_empty() && self.until_next_expiry() > Duration::ZERO {
                continue;
            }
            self.process(batch);
        }
    }

    fn until_next_expiry(&self) -> Duration {
        match self.deadlines.first() {
            Some(&(deadline, _)) => {
                let left = deadline.saturating_sub(unix_now_ms()).max(0);
                Duration::from_millis(u64::try_from(left).unwrap_or(0)).min(MAX_IDLE)
            }
            None => MAX_IDLE,
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(reason) = &self.failed {
            let err = StoreError::Unavailable(format!("store failed earlier: {reason}"));
            for request in batch {
                reject(request, err.clone());
            }
            return;
        }
        let started = Instant::now();
        let size = batch.len();
        let mut deferred: Vec<Deferred> = Vec::with_capacity(size);
        let mut committed: Vec<Arc<Committed>> = Vec::new();
        let outcome = self.write_batch(batch, &mut deferred, &mut committed);
        match outcome {
            Ok(()) => {
                self.shared.revision.store(self.revision, Ordering::Release);
                self.shared
                    .compacted
                    .store(self.compacted, Ordering::Release);
                // Callers first: their writes are durable now, and waking
                // thousands of watchers must not delay the acknowledgements.
                for answer in deferred {
                    answer(Ok(()));
                }
                for c in committed {
                    // No live watcher is fine: history stays in the log.
                    let _ = self.events.send(c);
                }
                metrics::histogram!("strata_store_write_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("strata_store_write_batch_size").record(size as f64);
                metrics::gauge!("strata_store_revision").set(self.revision as f64);
            }
            Err(err) => {
                tracing::error!(error = %err, "store commit failed; nothing of this batch was written");
                for answer in deferred {
                    answer(Err(err.clone()));
                }
                if let Err(reload) = self.reload() {
                    tracing::error!(error = %reload, "store state could not be reloaded; refusing writes");
                    self.failed = Some(reload.to_string());
                }
            }
        }
    }

    /// Applies the batch in one write transaction and commits it. Answers are
    /// collected in `deferred` and sent by the caller once the outcome is known.
    fn write_batch(
        &mut self,
        batch: Vec<Request>,
        deferred: &mut Vec<Deferred>,
        committed: &mut Vec<Arc<Committed>>,
    ) -> Result<(), StoreError> {
        let mut wtx = self.shared.db.begin_write().map_err(backend)?;
        wtx.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let dirty = {
            let mut t = open_tables(&wtx).map_err(backend)?;
            let revision_before = self.revision;
            let mut dirty = false;
            let now = unix_now_ms();
            while let Some(&(deadline, id)) = self.deadlines.first() {
                if deadline > now {
                    break;
                }
                self.revoke(&mut t, id, committed)?;
                dirty = true;
            }
            for request in batch {
                let (answer, wrote) = self.apply(&mut t, request, now, committed)?;
                deferred.push(answer);
                dirty |= wrote;
            }
            if self.revision != revision_before {
                t.meta
                    .insert(META_REVISION, self.revision)
                    .map_err(backend)?;
            }
            dirty
        };
        if dirty {
            wtx.commit().map_err(backend)?;
        } else {
            wtx.abort().map_err(backend)?;
        }
        Ok(())
    }

    /// Applies one request. Returns its deferred answer and whether it wrote.
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        request: Request,
        now: i64,
        committed: &mut Vec<Arc<Committed>>,
    ) -> Result<(Deferred, bool), StoreError> {
        Ok(match request {
            Request::Txn(txn, reply) => {
                let result = self.txn(t, txn, committed)?;
                let wrote = matches!(&result, Ok(r) if r.succeeded);
                (defer(reply, result), wrote)
            }
            Request::Grant(ttl_seconds, reply) => {
                let id = self.next_lease;
                self.next_lease += 1;
                let deadline_ms = now.saturating_add(ttl_seconds.saturating_mul(1000));
                t.leases
                    .insert(id, (ttl_seconds, deadline_ms))
                    .map_err(backend)?;
                t.meta
                    .insert(META_NEXT_LEASE, self.next_lease)
                    .map_err(backend)?;
                self.leases.insert(
                    id,
                    LeaseState {
                        ttl_seconds,
                        deadline_ms,
                        keys: BTreeSet::new(),
                    },
                );
                self.deadlines.insert((deadline_ms, id));
                (defer(reply, Ok(Lease { id, ttl_seconds })), true)
            }
            Request::KeepAlive(id, reply) => match self.leases.get_mut(&id) {
                Some(lease) => {
                    self.deadlines.remove(&(lease.deadline_ms, id));
                    lease.deadline_ms = now.saturating_add(lease.ttl_seconds.saturating_mul(1000));
                    self.deadlines.insert((lease.deadline_ms, id));
                    t.leases
                        .insert(id, (lease.ttl_seconds, lease.deadline_ms))
                        .map_err(backend)?;
                    (defer(reply, Ok(lease.ttl_seconds)), true)
                }
                None => (defer(reply, Err(StoreError::LeaseNotFound(id))), false),
            },
            Request::Revoke(id, reply) => {
                if self.leases.contains_key(&id) {
                    self.revoke(t, id, committed)?;
                    (defer(reply, Ok(self.revision)), true)
                } else {
                    (defer(reply, Err(StoreError::LeaseNotFound(id))), false)
                }
            }
            Request::TimeToLive(id, reply) => {
                let result = self
                    .leases
                    .get(&id)
                    .map_or(Err(StoreError::LeaseNotFound(id)), |l| {
                        Ok(LeaseInfo {
                            granted_ttl_seconds: l.ttl_seconds,
                            remaining_seconds: (l.deadline_ms - now).max(0) / 1000,
                        })
                    });
                (defer(reply, result), false)
            }
            Request::Compact(revision, reply) => {
                if revision > self.revision {
                    let err = StoreError::FutureRevision {
                        requested: revision,
                        current: self.revision,
                    };
                    (defer(reply, Err(err)), false)
                } else if revision <= self.compacted {
                    let err = StoreError::Compacted {
                        requested: revision,
                        compacted: self.compacted,
                    };
                    (defer(reply, Err(err)), false)
                } else {
                    let below = u64::try_from(revision).unwrap_or(0);
                    t.log.retain_in(..below, |_, _| false).map_err(backend)?;
                    t.meta.insert(META_COMPACTED, revision).map_err(backend)?;
                    self.compacted = revision;
                    (defer(reply, Ok(())), true)
                }
            }
        })
    }

    /// Applies a transaction. The outer error is a storage failure (the whole
    /// batch fails); the inner one is this transaction's own answer.
    #[allow(clippy::type_complexity)]
    fn txn(
        &mut self,
        t: &mut Tables<'_>,
        txn: Txn,
        committed: &mut Vec<Arc<Committed>>,
    ) -> Result<Result<TxnResponse, StoreError>, StoreError> {
        for compare in &txn.compares {
            if !compare.holds_for(read_kv(&t.kv, &compare.key)?.as_ref()) {
                return Ok(Ok(TxnResponse {
                    succeeded: false,
                    revision: self.revision,
                    deleted: 0,
                }));
            }
        }
        // As in etcd, leases are checked only for the branch that applies.
        for op in &txn.ops {
            if let TxnOp::Put { lease, .. } = op
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Ok(Err(StoreError::LeaseNotFound(*lease)));
            }
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        let mut deleted = 0;
        for op in txn.ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let previous = read_kv(&t.kv, &key)?;
                    let (create_revision, version, old_lease) = match &previous {
                        Some(p) => (p.create_revision, p.version + 1, p.lease),
                        None => (revision, 1, 0),
                    };
                    if old_lease != lease {
                        self.detach(old_lease, &key);
                        if let Some(l) = self.leases.get_mut(&lease) {
                            l.keys.insert(key.clone());
                        }
                    }
                    let kv = KeyValue {
                        key,
                        value,
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease,
                    };
                    t.kv.insert(kv.key.as_slice(), encode_kv(&kv).as_slice())
                        .map_err(backend)?;
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                TxnOp::Delete(range) => {
                    for kv in read_range(&t.kv, &range)? {
                        t.kv.remove(kv.key.as_slice()).map_err(backend)?;
                        self.detach(kv.lease, &kv.key);
                        deleted += 1;
                        events.push(delete_event(kv.key, revision));
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(Ok(TxnResponse {
                succeeded: true,
                revision: self.revision,
                deleted: 0,
            }));
        }
        self.append(t, revision, events, committed)?;
        Ok(Ok(TxnResponse {
            succeeded: true,
            revision,
            deleted,
        }))
    }

    /// Removes a lease and deletes its keys at one revision (none when it
    /// had no keys).
    fn revoke(
        &mut self,
        t: &mut Tables<'_>,
        id: LeaseId,
        committed: &mut Vec<Arc<Committed>>,
    ) -> Result<(), StoreError> {
        let Some(lease) = self.leases.remove(&id) else {
            return Ok(());
        };
        self.deadlines.remove(&(lease.deadline_ms, id));
        t.leases.remove(id).map_err(backend)?;
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for key in lease.keys {
            if read_kv(&t.kv, &key)?.is_some_and(|kv| kv.lease == id) {
                t.kv.remove(key.as_slice()).map_err(backend)?;
                events.push(delete_event(key, revision));
            }
        }
        if !events.is_empty() {
            self.append(t, revision, events, committed)?;
        }
        Ok(())
    }

    fn detach(&mut self, lease: LeaseId, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    /// Records a new revision in the log and queues it for live watchers.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        revision: Revision,
        events: Vec<Event>,
        committed: &mut Vec<Arc<Committed>>,
    ) -> Result<(), StoreError> {
        let rev =
            u64::try_from(revision).map_err(|_| StoreError::Backend("revision overflow".into()))?;
        t.log
            .insert(rev, encode_log(&events).as_slice())
            .map_err(backend)?;
        self.revision = revision;
        committed.push(Arc::new(Committed {
            revision,
            events: events.into(),
        }));
        Ok(())
    }
}

fn delete_event(key: Vec<u8>, revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            mod_revision: revision,
            ..KeyValue::default()
        },
    }
}

fn open_tables(wtx: &WriteTransaction) -> Result<Tables<'_>, redb::TableError> {
    Ok(Tables {
        kv: wtx.open_table(KV)?,
        log: wtx.open_table(LOG)?,
        meta: wtx.open_table(META)?,
        leases: wtx.open_table(LEASES)?,
    })
}

fn reject(request: Request, err: StoreError) {
    // Callers that went away need no answer.
    match request {
        Request::Txn(_, r) => drop(r.send(Err(err))),
        Request::Grant(_, r) => drop(r.send(Err(err))),
        Request::KeepAlive(_, r) => drop(r.send(Err(err))),
        Request::Revoke(_, r) => drop(r.send(Err(err))),
        Request::TimeToLive(_, r) => drop(r.send(Err(err))),
        Request::Compact(_, r) => drop(r.send(Err(err))),
    }
}
