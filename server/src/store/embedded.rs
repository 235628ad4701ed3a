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
//! - `kv`: key → `KvRecord` (value, create/mod revision, version, lease);
//! - `log`: revision → the events of that revision (the watch history, cut by
//!   compaction);
//! - `meta`: current revision, compaction point;
//! - `leases`: lease id → (TTL, deadline in Unix milliseconds). Deadlines are
//!   persisted, so a lease keeps its expiry across a restart and one that
//!   lapsed while the daemon was down expires right after start.
//!
//! After a commit (and after answering the batch's callers) the writer
//! appends each revision to the live `Feed`: a chain of revisions in
//! memory, of which only the newest [`EmbeddedOptions::watch_buffer`] are
//! kept. A watcher reads history it missed from `log`, then walks the chain;
//! when the revision it needs has already dropped out of memory it falls back
//! to `log`, so a slow watcher never slows the writer or other watchers. See
//! `Feed` for why this is not a broadcast channel.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::Stream;
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::oneshot;

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

/// How many revisions a catching-up watcher reads from the log at once.
const LOG_READ_CHUNK: usize = 512;
/// Longest the writer sleeps without checking lease deadlines.
const MAX_IDLE: Duration = Duration::from_millis(500);
/// Longest the writer holds a batch open for requests still arriving (see
/// `Writer::linger`).
const MAX_LINGER: Duration = Duration::from_micros(500);
/// A batch closes once no request has arrived for this long.
const LINGER_GAP: Duration = Duration::from_micros(100);
/// The writer lingers only after a batch of at least this many requests:
/// below it, concurrency is too low for waiting to pay off, and a lone
/// writer must never wait.
const LINGER_MIN_BATCH: usize = 4;
/// Wakers cloned per hold of the feed's waker lock when publishing, so that
/// registering watchers never wait for a whole fan-out.
const WAKE_BATCH: usize = 64;

/// Tuning of the embedded backend.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Most requests the writer commits with one fsync.
    pub max_batch: usize,
    /// Revisions kept in memory for live watchers; one further behind reads
    /// the log instead.
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

/// One committed revision: read from the log, or about to be published.
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
    /// Every live lease's (TTL seconds, deadline in Unix ms), as of the last
    /// commit: answers [`Store::lease_time_to_live`] without a turn of the
    /// writer, which registrations naming a lease would otherwise wait for
    /// behind whole group commits. The writer updates it after a commit and
    /// before answering that commit's callers, so an acknowledged grant,
    /// keep-alive or revoke is always visible here.
    leases: Mutex<HashMap<LeaseId, (i64, i64)>>,
    /// Set when the writer refuses writes after a commit it could not undo.
    failed: AtomicBool,
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

/// One revision on the live feed.
///
/// Each node links to the next one weakly, so only the feed's ring decides
/// how much history stays in memory: a watcher pins just the node it stands
/// on, never the chain behind it, and dropping a node never recurses.
///
/// Aligned to a cache line so that the reference counts `Arc` puts in front
/// of it, which every watcher passing by writes, do not share a line with
/// the fields every watcher reads.
#[derive(Debug)]
#[repr(align(64))]
struct Node {
    revision: Revision,
    events: Arc<[Event]>,
    /// The longest prefix all event keys share: a watcher can tell from it
    /// alone whether it wants every event, without reading the events (whose
    /// array shares a line with their own, equally busy, reference counts).
    common: Box<[u8]>,
    next: OnceLock<Weak<Node>>,
}

/// Where a watcher's walk along the feed stands.
enum Step {
    /// The next revision, still in memory.
    Next(Arc<Node>),
    /// Nothing newer published yet.
    End,
    /// The next revision has dropped out of memory: read the log.
    Gone,
}

impl Node {
    fn new(revision: Revision, events: Arc<[Event]>) -> Self {
        let mut keys = events.iter().map(|e| e.kv.key.as_slice());
        let mut common = keys.next().unwrap_or_default();
        for key in keys {
            let shared = common.iter().zip(key).take_while(|(a, b)| a == b).count();
            common = common.get(..shared).unwrap_or_default();
        }
        Self {
            revision,
            common: common.into(),
            events,
            next: OnceLock::new(),
        }
    }

    /// This revision's events inside `range`, if any.
    fn batch_for(&self, range: &KeyRange) -> Option<WatchBatch> {
        let all = match range {
            KeyRange::Prefix(p) => self.common.starts_with(p),
            // Keys are unique within a revision, so a key range can hold all
            // events only when there is one.
            KeyRange::Key(k) => self.events.len() == 1 && *self.common == **k,
        };
        if all && !self.events.is_empty() {
            return Some(WatchBatch {
                revision: self.revision,
                events: Arc::clone(&self.events),
            });
        }
        filter(range, self.revision, &self.events)
    }

    fn step(&self) -> Step {
        match self.next.get() {
            None => Step::End,
            Some(link) => link.upgrade().map_or(Step::Gone, Step::Next),
        }
    }
}

/// The newest revisions, kept alive for live watchers.
struct Ring {
    nodes: VecDeque<Arc<Node>>,
    /// The newest node (the one the next revision links to).
    tail: Arc<Node>,
    capacity: usize,
}

/// Registered watcher wakers; a slot per live watcher, reused after it is
/// dropped.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// The live feed the writer publishes committed revisions on.
///
/// Not a `tokio::sync::broadcast` channel, because with thousands of watchers
/// its per-delivery bookkeeping dominated (measured in benches/RESULTS.md):
/// each receive takes a slot lock and decrements a shared counter, and each
/// receiver that catches up re-registers its waker under the channel's one
/// mutex, so every delivery crossed that lock twice. Here a delivery is
/// lock-free — a watcher follows the chain from the node it stands on — and
/// a watcher registers its waker once, not per revision; the writer wakes
/// every registered watcher once per committed batch.
struct Feed {
    ring: Mutex<Ring>,
    wakers: Mutex<Wakers>,
    /// Set when the writer has stopped; nothing will be published any more.
    closed: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something ever did, the
    // data would still be consistent (every update is a single assignment).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Feed {
    fn new(revision: Revision, capacity: usize) -> Self {
        let start = Arc::new(Node::new(revision, Arc::from(Vec::new())));
        Self {
            ring: Mutex::new(Ring {
                nodes: VecDeque::new(),
                tail: start,
                capacity: capacity.max(1),
            }),
            wakers: Mutex::new(Wakers::default()),
            closed: AtomicBool::new(false),
        }
    }

    /// The newest published node: a watcher standing on it receives every
    /// revision published from now on.
    fn tail(&self) -> Arc<Node> {
        Arc::clone(&lock(&self.ring).tail)
    }

    /// Appends committed revisions (in revision order) and wakes every
    /// registered watcher once.
    fn publish(&self, committed: Vec<Committed>) {
        if committed.is_empty() {
            return;
        }
        let nodes: Vec<Arc<Node>> = committed
            .into_iter()
            .map(|c| Arc::new(Node::new(c.revision, c.events)))
            .collect();
        {
            let mut ring = lock(&self.ring);
            for node in nodes {
                // Only the writer links, and always onto the newest node, so
                // the link is always still unset.
                let _ = ring.tail.next.set(Arc::downgrade(&node));
                ring.tail = Arc::clone(&node);
                ring.nodes.push_back(node);
                if ring.nodes.len() > ring.capacity {
                    ring.nodes.pop_front();
                }
            }
        }
        self.wake_all();
    }

    /// Marks the feed finished and wakes every watcher so that it reports
    /// the store closed once it has delivered what was published.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        {
            // Keep the tail: watchers may still stand on it.
            let mut ring = lock(&self.ring);
            ring.nodes.clear();
        }
        self.wake_all();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wakes every registered watcher. The wakers are cloned out in small
    /// batches and woken outside the lock: a waker may run arbitrary code
    /// (even drop a watcher, which takes this lock), and registrations should
    /// not wait for the whole fan-out.
    fn wake_all(&self) {
        let mut batch: Vec<Waker> = Vec::with_capacity(WAKE_BATCH);
        let mut from = 0;
        loop {
            let finished = {
                let wakers = lock(&self.wakers);
                for slot in wakers.slots.iter().skip(from) {
                    from += 1;
                    if let Some(w) = slot {
                        batch.push(w.clone());
                        if batch.len() == WAKE_BATCH {
                            break;
                        }
                    }
                }
                from >= wakers.slots.len()
            };
            for waker in batch.drain(..) {
                waker.wake();
            }
            if finished {
                return;
            }
        }
    }

    /// Registers (or replaces) a watcher's waker; `slot` is the watcher's
    /// registration, assigned on first use.
    fn register(&self, slot: &mut Option<usize>, waker: &Waker) {
        let mut wakers = lock(&self.wakers);
        let index = match *slot {
            Some(i) => i,
            None => match wakers.free.pop() {
                Some(i) => i,
                None => {
                    wakers.slots.push(None);
                    wakers.slots.len() - 1
                }
            },
        };
        if let Some(s) = wakers.slots.get_mut(index) {
            *s = Some(waker.clone());
            *slot = Some(index);
        }
    }

    fn unregister(&self, index: usize) {
        let mut wakers = lock(&self.wakers);
        if let Some(s) = wakers.slots.get_mut(index) {
            *s = None;
            wakers.free.push(index);
        }
    }
}

/// A request to the writer thread.
enum Request {
    Txn(Txn, Reply<TxnResponse>),
    Grant(i64, Reply<Lease>),
    KeepAlive(LeaseId, Reply<i64>),
    Revoke(LeaseId, Reply<Revision>),
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
    feed: Arc<Feed>,
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
    /// What it creates is private (directories 0700, the file 0600; see
    /// [`crate::private_fs`]).
    pub fn open_with(data_dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        crate::private_fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        // redb would create the file with the umask's mode (0644 under 022).
        crate::private_fs::create_file(&path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let db = Database::create(&path).map_err(|e| {
            let e = redb::Error::from(e);
            let hint = match e {
                redb::Error::DatabaseAlreadyOpen => " (is another stratad using this data dir?)",
                _ => "",
            };
            StoreError::Backend(format!("cannot open {}: {e}{hint}", path.display()))
        })?;
        // After a successful open only: a data dir that cannot be used is one
        // clear error line, not a warning before it.
        crate::private_fs::warn_if_shared("data dir", data_dir);
        crate::private_fs::warn_if_shared("store file", &path);
        let shared = Arc::new(Shared {
            db,
            path,
            revision: AtomicI64::new(0),
            compacted: AtomicI64::new(0),
            leases: Mutex::new(HashMap::new()),
            failed: AtomicBool::new(false),
        });
        let writer = Writer::load(
            Arc::clone(&shared),
            options.watch_buffer.max(16),
            options.max_batch.max(1),
        )?;
        let feed = Arc::clone(&writer.feed);
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("strata-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            shared,
            feed,
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
        if self.feed.is_closed() {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        // Stand on the feed before reading the current revision so nothing
        // committed in between can be missed.
        let cursor = self.feed.tail();
        let current = self.shared.revision.load(Ordering::Acquire);
        let next = if start_revision <= 0 {
            current + 1
        } else {
            start_revision
        };
        Ok(Box::pin(Watcher {
            shared: Arc::downgrade(&self.shared),
            feed: Arc::clone(&self.feed),
            range,
            next,
            cursor,
            catch_up: next <= current,
            reading: None,
            pending: VecDeque::new(),
            slot: None,
            waker: None,
            done: false,
        }))
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
        if self.feed.is_closed() {
            return Err(StoreError::Unavailable("store is closed".into()));
        }
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "store failed earlier; see the daemon log".into(),
            ));
        }
        let now = unix_now_ms();
        match lock(&self.shared.leases).get(&id) {
            // A lease past its deadline is as good as expired: the writer
            // deletes it before it applies anything else, so nothing can
            // attach to it or renew it any more.
            Some(&(ttl_seconds, deadline_ms)) if deadline_ms > now => Ok(LeaseInfo {
                granted_ttl_seconds: ttl_seconds,
                remaining_seconds: (deadline_ms - now) / 1000,
            }),
            _ => Err(StoreError::LeaseNotFound(id)),
        }
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

/// The events of one revision inside `range`, if any. Shares the revision's
/// events when all of them match (the common case of a prefix watch), so a
/// delivery to many watchers copies nothing.
fn filter(range: &KeyRange, revision: Revision, events: &Arc<[Event]>) -> Option<WatchBatch> {
    let events: Arc<[Event]> = if events.iter().all(|e| range.contains(&e.kv.key)) {
        Arc::clone(events)
    } else {
        events
            .iter()
            .filter(|e| range.contains(&e.kv.key))
            .cloned()
            .collect()
    };
    (!events.is_empty()).then_some(WatchBatch { revision, events })
}

type LogRead = tokio::task::JoinHandle<Result<Vec<Committed>, StoreError>>;

/// One watch: its position, and the stream it is polled as.
///
/// A hand-written stream rather than an `async` block behind
/// `stream::unfold`: the delivery path runs once per watcher per revision,
/// and the extra state machine layers were measurable at 10,000 watchers.
struct Watcher {
    shared: Weak<Shared>,
    feed: Arc<Feed>,
    range: KeyRange,
    /// The next revision this watcher has to deliver or skip.
    next: Revision,
    /// The feed node this watcher last passed; it delivers what follows.
    cursor: Arc<Node>,
    /// Whether history from `next` must be read from the log before following
    /// the feed.
    catch_up: bool,
    /// A log read in flight.
    reading: Option<LogRead>,
    pending: VecDeque<WatchBatch>,
    /// This watcher's registration in the feed's wakers, once polled live.
    slot: Option<usize>,
    /// The waker registered there, to notice when the task's waker changes.
    waker: Option<Waker>,
    done: bool,
}

impl Watcher {
    fn fail(&mut self, err: StoreError) -> Poll<Option<Result<WatchBatch, StoreError>>> {
        self.done = true;
        Poll::Ready(Some(Err(err)))
    }

    /// Falls back to the log from `next`. The cursor moves to the feed's tail
    /// first, so whatever is published while the log is read is still seen
    /// (revisions already read are skipped).
    fn lagged(&mut self) {
        self.cursor = self.feed.tail();
        self.catch_up = true;
    }

    fn closed() -> StoreError {
        StoreError::Unavailable("store is closed".into())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(index) = self.slot {
            self.feed.unregister(index);
        }
    }
}

impl Stream for Watcher {
    type Item = Result<WatchBatch, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(batch) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(batch)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(read) = this.reading.as_mut() {
                let read = std::task::ready!(Pin::new(read).poll(cx));
                this.reading = None;
                let chunk = match read {
                    Ok(Ok(chunk)) => chunk,
                    Ok(Err(e)) => return this.fail(e),
                    Err(e) => {
                        return this.fail(StoreError::Unavailable(format!("log read failed: {e}")));
                    }
                };
                this.catch_up = chunk.len() == LOG_READ_CHUNK;
                for c in &chunk {
                    this.next = c.revision + 1;
                    if let Some(batch) = filter(&this.range, c.revision, &c.events) {
                        this.pending.push_back(batch);
                    }
                }
                continue;
            }
            if this.catch_up {
                let Some(shared) = this.shared.upgrade() else {
                    return this.fail(Self::closed());
                };
                let from = this.next;
                this.reading = Some(tokio::task::spawn_blocking(move || {
                    shared.read_log(from, LOG_READ_CHUNK)
                }));
                continue;
            }
            // Register before looking for the next node: the writer links a
            // node first and wakes second, so either this look sees the node
            // or the wake-up reaches this waker.
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                this.feed.register(&mut this.slot, cx.waker());
                this.waker = Some(cx.waker().clone());
            }
            match this.cursor.step() {
                Step::Next(node) => {
                    this.cursor = node;
                    let node = &this.cursor;
                    if node.revision < this.next {
                        continue;
                    }
                    if node.revision > this.next {
                        // Revisions are contiguous, so a jump means this
                        // watcher missed some: read them from the log.
                        this.lagged();
                        continue;
                    }
                    this.next = node.revision + 1;
                    if let Some(batch) = node.batch_for(&this.range) {
                        return Poll::Ready(Some(Ok(batch)));
                    }
                }
                Step::Gone => this.lagged(),
                Step::End => {
                    // `closed` is set after the last publish, so after seeing
                    // it one more look finds anything published before.
                    if this.feed.is_closed() && matches!(this.cursor.step(), Step::End) {
                        return this.fail(Self::closed());
                    }
                    return Poll::Pending;
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
    feed: Arc<Feed>,
    max_batch: usize,
    revision: Revision,
    compacted: Revision,
    leases: HashMap<LeaseId, LeaseState>,
    /// (deadline, lease) for finding the next expiry without a scan.
    deadlines: BTreeSet<(i64, LeaseId)>,
    /// Lease changes of the batch being written, for `Shared::leases` once
    /// it has committed: (lease, (TTL, deadline), or `None` when it is gone).
    lease_changes: Vec<(LeaseId, Option<(i64, i64)>)>,
    /// Leases that expired in the batch being written.
    expired: u64,
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
    /// A random positive lease id no live lease has. Lease ids are
    /// capabilities of a kind (a heartbeat names only the id), so they are
    /// not sequential: one cannot be guessed from another.
    fn fresh_lease_id(&self) -> Result<LeaseId, StoreError> {
        use ring::rand::SecureRandom as _;
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut bytes = [0_u8; 8];
            rng.fill(&mut bytes)
                .map_err(|_| StoreError::Backend("the system random source failed".into()))?;
            let id = i64::from_le_bytes(bytes) & i64::MAX;
            if id != 0 && !self.leases.contains_key(&id) {
                return Ok(id);
            }
        }
    }

    fn load(
        shared: Arc<Shared>,
        watch_buffer: usize,
        max_batch: usize,
    ) -> Result<Self, StoreError> {
        let mut writer = Self {
            shared,
            feed: Arc::new(Feed::new(0, watch_buffer)),
            max_batch,
            revision: 0,
            compacted: 0,
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            lease_changes: Vec::new(),
            expired: 0,
            failed: None,
        };
        writer.reload()?;
        // The feed starts at the loaded revision: watchers read anything
        // older from the log.
        writer.feed = Arc::new(Feed::new(writer.revision, watch_buffer));
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
        *lock(&self.shared.leases) = self
            .leases
            .iter()
            .map(|(&id, l)| (id, (l.ttl_seconds, l.deadline_ms)))
            .collect();
        self.shared.revision.store(self.revision, Ordering::Release);
        self.shared
            .compacted
            .store(self.compacted, Ordering::Release);
        Ok(())
    }

    fn run(mut self, requests: mpsc::Receiver<Request>) {
        let mut last_batch = 0;
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
            if last_batch >= LINGER_MIN_BATCH {
                self.linger(&requests, &mut batch);
            }
            last_batch = batch.len();
            self.process(batch);
        }
    }

    /// Holds the batch open while requests keep arriving: until none came
    /// for [`LINGER_GAP`], [`MAX_LINGER`] has passed or the batch is full.
    ///
    /// Under steady concurrent load the callers of a batch re-queue while
    /// the next batch commits, so without this the writer alternates
    /// between two half-size cohorts; and much of a commit's cost is paid
    /// once per commit, not per request (the sync, the rewrite of the pages
    /// every request touches: table roots, the log's last leaf, `meta`).
    /// Merging them cuts the writer's time per request, which is what
    /// bounds throughput (benches/RESULTS.md). Only after a batch of at least
    /// [`LINGER_MIN_BATCH`], so one client's writes never wait.
    fn linger(&self, requests: &mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
        let until = Instant::now() + MAX_LINGER;
        while batch.len() < self.max_batch {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match requests.recv_timeout(left.min(LINGER_GAP)) {
                Ok(request) => batch.push(request),
                // Disconnected: the batch is still committed and answered;
                // the next receive ends the writer.
                Err(_) => return,
            }
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
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
        let mut committed: Vec<Committed> = Vec::new();
        self.lease_changes.clear();
        self.expired = 0;
        let outcome = self.write_batch(batch, &mut deferred, &mut committed);
        match outcome {
            Ok(()) => {
                self.shared.revision.store(self.revision, Ordering::Release);
                self.shared
                    .compacted
                    .store(self.compacted, Ordering::Release);
                if !self.lease_changes.is_empty() {
                    let mut leases = lock(&self.shared.leases);
                    for (id, change) in self.lease_changes.drain(..) {
                        match change {
                            Some(state) => leases.insert(id, state),
                            None => leases.remove(&id),
                        };
                    }
                }
                if self.expired > 0 {
                    metrics::counter!("strata_store_lease_expired_total").increment(self.expired);
                }
                // Callers first: their writes are durable now, and waking
                // thousands of watchers must not delay the acknowledgements.
                for answer in deferred {
                    answer(Ok(()));
                }
                self.feed.publish(committed);
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
                    self.shared.failed.store(true, Ordering::Release);
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
        committed: &mut Vec<Committed>,
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
                self.expired += 1;
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
        committed: &mut Vec<Committed>,
    ) -> Result<(Deferred, bool), StoreError> {
        Ok(match request {
            Request::Txn(txn, reply) => {
                let result = self.txn(t, txn, committed)?;
                let wrote = matches!(&result, Ok(r) if r.succeeded);
                (defer(reply, result), wrote)
            }
            Request::Grant(ttl_seconds, reply) => {
                let id = self.fresh_lease_id()?;
                let deadline_ms = now.saturating_add(ttl_seconds.saturating_mul(1000));
                t.leases
                    .insert(id, (ttl_seconds, deadline_ms))
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
                self.lease_changes
                    .push((id, Some((ttl_seconds, deadline_ms))));
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
                    self.lease_changes
                        .push((id, Some((lease.ttl_seconds, lease.deadline_ms))));
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
        committed: &mut Vec<Committed>,
    ) -> Result<Result<TxnResponse, StoreError>, StoreError> {
        let Txn { compares, ops } = txn;
        // What the compares read, kept for the puts below: a registry write
        // compares the very key it then writes, and a second B-tree descent
        // for the same answer was measurable writer time.
        let mut seen: Vec<(Vec<u8>, Option<KeyValue>)> = Vec::with_capacity(compares.len());
        for compare in compares {
            let current = read_kv(&t.kv, &compare.key)?;
            if !compare.holds_for(current.as_ref()) {
                return Ok(Ok(TxnResponse {
                    succeeded: false,
                    revision: self.revision,
                    deleted: 0,
                }));
            }
            seen.push((compare.key, current));
        }
        // As in etcd, leases are checked only for the branch that applies.
        for op in &ops {
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
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    // `Txn::validate` guarantees no other op of this
                    // transaction names this key, so what a compare read is
                    // still the key's state.
                    let previous = match seen.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, current)) => current.take(),
                        None => read_kv(&t.kv, &key)?,
                    };
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
                TxnOp::Delete(KeyRange::Key(key)) => {
                    // One descent: the removal itself reports what was there
                    // (a missing key leaves the tree untouched).
                    let removed = match t.kv.remove(key.as_slice()).map_err(backend)? {
                        Some(old) => Some(KvRecord::decode(old.value()).map_err(corrupt)?.lease),
                        None => None,
                    };
                    if let Some(old_lease) = removed {
                        self.detach(old_lease, &key);
                        deleted += 1;
                        events.push(delete_event(key, revision));
                    }
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
        committed: &mut Vec<Committed>,
    ) -> Result<(), StoreError> {
        let Some(lease) = self.leases.remove(&id) else {
            return Ok(());
        };
        self.deadlines.remove(&(lease.deadline_ms, id));
        self.lease_changes.push((id, None));
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
        committed: &mut Vec<Committed>,
    ) -> Result<(), StoreError> {
        let rev =
            u64::try_from(revision).map_err(|_| StoreError::Backend("revision overflow".into()))?;
        t.log
            .insert(rev, encode_log(&events).as_slice())
            .map_err(backend)?;
        self.revision = revision;
        committed.push(Committed {
            revision,
            events: events.into(),
        });
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // However the writer ends, live watchers must learn that nothing
        // more will come.
        self.feed.close();
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
        Request::Compact(_, r) => drop(r.send(Err(err))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    async fn open(options: EmbeddedOptions) -> (tempfile::TempDir, Arc<EmbeddedStore>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open_with(&path, options))
            .await
            .unwrap()
            .unwrap();
        (dir, Arc::new(store))
    }

    async fn next(stream: &mut WatchStream) -> Option<Result<WatchBatch, StoreError>> {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("watch stream stalled")
    }

    #[tokio::test]
    async fn stream_delivers_what_was_published_then_reports_the_store_closed() {
        let (_dir, store) = open(EmbeddedOptions::default()).await;
        let mut stream = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
        let revision = store.put(b"a/1", b"x").await.unwrap();
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .unwrap();
        let batch = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(batch.revision, revision);
        assert!(matches!(
            next(&mut stream).await,
            Some(Err(StoreError::Unavailable(_)))
        ));
        assert!(next(&mut stream).await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_moved_to_another_task_is_woken_there() {
        let (_dir, store) = open(EmbeddedOptions::default()).await;
        let mut stream = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
        // Polled (and registered) from this task first, with nothing to see.
        let quiet = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(quiet.is_err());
        let other = tokio::spawn(async move { next(&mut stream).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let revision = store.put(b"a/1", b"x").await.unwrap();
        let batch = other.await.unwrap().unwrap().unwrap();
        assert_eq!(batch.revision, revision);
    }

    #[tokio::test]
    async fn dropped_watchers_give_their_waker_slots_back() {
        let (_dir, store) = open(EmbeddedOptions::default()).await;
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(store.watch(KeyRange::prefix("a/"), 0).await.unwrap());
        }
        store.put(b"a/1", b"x").await.unwrap();
        for stream in &mut streams {
            next(stream).await.unwrap().unwrap();
            // Register: nothing more to deliver yet.
            let quiet = tokio::time::timeout(Duration::from_millis(10), stream.next()).await;
            assert!(quiet.is_err());
        }
        let registered = |store: &EmbeddedStore| {
            let w = lock(&store.feed.wakers);
            (w.slots.len(), w.slots.iter().flatten().count())
        };
        assert_eq!(registered(&store), (3, 3));
        streams.truncate(1);
        assert_eq!(registered(&store), (3, 1));
        let mut again = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
        let revision = store.put(b"a/2", b"y").await.unwrap();
        assert_eq!(next(&mut again).await.unwrap().unwrap().revision, revision);
        assert_eq!(registered(&store).0, 3);
        assert_eq!(
            next(&mut streams[0]).await.unwrap().unwrap().revision,
            revision
        );
    }

    #[tokio::test]
    async fn watcher_behind_the_ring_reads_the_log_then_follows_the_feed() {
        let options = EmbeddedOptions {
            max_batch: 4,
            watch_buffer: 16,
        };
        let (_dir, store) = open(options).await;
        let mut stream = store.watch(KeyRange::prefix("a/"), 0).await.unwrap();
        let first = store.put(b"a/0", b"x").await.unwrap();
        // Stand on the first revision, then fall far behind the ring.
        assert_eq!(next(&mut stream).await.unwrap().unwrap().revision, first);
        for i in 1..100 {
            store.put(format!("a/{i}").as_bytes(), b"x").await.unwrap();
        }
        store.put(b"b/other", b"x").await.unwrap();
        let last = store.put(b"a/last", b"x").await.unwrap();
        let mut expected = first + 1;
        loop {
            if expected == first + 100 {
                // The revision of `b/other` is outside the range.
                expected += 1;
            }
            let batch = next(&mut stream).await.unwrap().unwrap();
            assert_eq!(batch.revision, expected);
            expected += 1;
            if batch.revision == last {
                break;
            }
        }
    }

    #[test]
    fn node_common_prefix_decides_whole_revision_matches() {
        let put = |key: &str| Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.into(),
                ..KeyValue::default()
            },
        };
        let node = Node::new(7, vec![put("c/p/t/a"), put("c/p/t/b"), put("c/p/u")].into());
        assert_eq!(&*node.common, b"c/p/");
        let all = node.batch_for(&KeyRange::prefix("c/p/")).unwrap();
        assert!(Arc::ptr_eq(&all.events, &node.events));
        let some = node.batch_for(&KeyRange::prefix("c/p/t/")).unwrap();
        assert_eq!(some.events.len(), 2);
        assert!(node.batch_for(&KeyRange::prefix("d/")).is_none());
        assert_eq!(
            node.batch_for(&KeyRange::key("c/p/u"))
                .unwrap()
                .events
                .len(),
            1
        );
        let single = Node::new(8, vec![put("k")].into());
        let batch = single.batch_for(&KeyRange::key("k")).unwrap();
        assert!(Arc::ptr_eq(&batch.events, &single.events));
        assert!(single.batch_for(&KeyRange::key("k2")).is_none());
        assert!(single.batch_for(&KeyRange::prefix("k2")).is_none());
    }
}
