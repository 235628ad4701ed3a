//! The store layer: a revisioned key-value store modelled on the etcd v3 KV
//! API, and its backends.
//!
//! Everything above this module (the view, the watch hub, the RPC handlers)
//! talks to a [`Store`] and never knows which backend it runs on. A backend
//! provides:
//!
//! - **range** — read one key or every key under a prefix, together with the
//!   revision the read saw;
//! - **txn** — compares (value, version, create/mod revision) guarding a list
//!   of puts and deletes that commit atomically at one new revision;
//! - **watch** — every change to a key or prefix from a start revision, one
//!   [`WatchBatch`] per revision, in revision order, with
//!   [`StoreError::Compacted`] when that history is gone;
//! - **leases** — grant with a TTL, keep alive, revoke; expiry (or revoke)
//!   deletes the attached keys at one revision;
//! - **compaction** — drop history below a revision.
//!
//! The semantics follow etcd wherever etcd defines them (see the conformance
//! suite in [`conformance`], which every backend must pass), so the etcd
//! backend is a thin mapping.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;

pub mod embedded;
pub mod etcd;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

/// Wall-clock time as Unix milliseconds (lease deadlines, tenant expiry).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A store revision. Every commit gets the next revision; one sequence per
/// store, starting above zero and never reused. All writes of one
/// transaction share its revision; transactions committed together (the
/// etcd backend's group commit) share one revision too.
pub type Revision = i64;

/// Identifier of a lease. `0` means "no lease".
pub type LeaseId = i64;

/// Selects the keys an operation applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// Exactly this key.
    Key(Vec<u8>),
    /// Every key that starts with these bytes. An empty prefix selects all keys.
    Prefix(Vec<u8>),
}

impl KeyRange {
    /// Exactly `key`.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self::Key(key.into())
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Self::Prefix(prefix.into())
    }

    /// Whether `key` falls inside this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Self::Key(k) => k.as_slice() == key,
            Self::Prefix(p) => key.starts_with(p),
        }
    }

    /// Whether the two ranges share at least one possible key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (self, other) {
            (Self::Key(a), b) => b.contains(a),
            (a, Self::Key(b)) => a.contains(b),
            (Self::Prefix(a), Self::Prefix(b)) => a.starts_with(b) || b.starts_with(a),
        }
    }
}

/// A key with its value and bookkeeping, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in delete events).
    pub value: Vec<u8>,
    /// Revision at which the key was last created (0 in delete events).
    pub create_revision: Revision,
    /// Revision of the last change to the key (for delete events, the
    /// revision of the delete).
    pub mod_revision: Revision,
    /// Number of puts since the key was created; 1 after the first put.
    pub version: i64,
    /// Lease the key is attached to, `0` for none.
    pub lease: LeaseId,
}

/// Answer to [`Store::range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResponse {
    /// Matching keys in ascending byte order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read observed.
    pub revision: Revision,
}

/// What a [`Compare`] inspects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The value bytes. A compare on the value of a missing key is false.
    Value(Vec<u8>),
    /// The key's version (0 when missing).
    Version(i64),
    /// The key's create revision (0 when missing).
    CreateRevision(Revision),
    /// The key's mod revision (0 when missing).
    ModRevision(Revision),
}

/// How the key's attribute is compared with the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// attribute == target
    Equal,
    /// attribute != target
    NotEqual,
    /// attribute < target
    Less,
    /// attribute > target
    Greater,
}

impl CompareOp {
    /// Applies the comparison to two ordered values.
    pub fn holds<T: Ord + ?Sized>(self, actual: &T, target: &T) -> bool {
        match self {
            Self::Equal => actual == target,
            Self::NotEqual => actual != target,
            Self::Less => actual < target,
            Self::Greater => actual > target,
        }
    }
}

/// One guard of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key inspected.
    pub key: Vec<u8>,
    /// How to compare.
    pub op: CompareOp,
    /// What to compare with.
    pub target: CompareTarget,
}

impl Compare {
    /// True when `key` exists.
    pub fn exists(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Greater,
            target: CompareTarget::CreateRevision(0),
        }
    }

    /// True when `key` does not exist.
    pub fn missing(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }
    }

    /// True when `key` was last modified at `revision` (0: the key is missing).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::ModRevision(revision),
        }
    }

    /// True when `key` exists with exactly this value.
    pub fn value_equals(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }

    /// Evaluates this compare against the key's current state (`None` when missing).
    pub fn holds_for(&self, current: Option<&KeyValue>) -> bool {
        match (&self.target, current) {
            (CompareTarget::Value(_), None) => false,
            (CompareTarget::Value(v), Some(kv)) => self.op.holds(kv.value.as_slice(), v.as_slice()),
            (CompareTarget::Version(v), kv) => self.op.holds(&kv.map_or(0, |kv| kv.version), v),
            (CompareTarget::CreateRevision(r), kv) => {
                self.op.holds(&kv.map_or(0, |kv| kv.create_revision), r)
            }
            (CompareTarget::ModRevision(r), kv) => {
                self.op.holds(&kv.map_or(0, |kv| kv.mod_revision), r)
            }
        }
    }
}

/// One mutation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// Create or overwrite a key, attached to `lease` (0: no lease; an
    /// existing attachment is dropped).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// Lease to attach the key to, or 0.
        lease: LeaseId,
    },
    /// Delete every key in the range (nothing happens for missing keys).
    Delete(KeyRange),
}

/// A transaction: when every compare holds, every op commits at one revision.
///
/// As in etcd, a transaction may not name the same key twice (two puts, or a
/// put inside a deleted range); such a transaction is rejected with
/// [`StoreError::InvalidTxn`] and nothing is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Guards; all must hold.
    pub compares: Vec<Compare>,
    /// Mutations applied when the guards hold.
    pub ops: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a guard.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds a put without lease.
    pub fn put(self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.put_with_lease(key, value, 0)
    }

    /// Adds a put attached to `lease`.
    pub fn put_with_lease(
        mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        self.ops.push(TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease,
        });
        self
    }

    /// Adds a delete of a key or prefix.
    pub fn delete(mut self, range: KeyRange) -> Self {
        self.ops.push(TxnOp::Delete(range));
        self
    }

    /// Checks the rules every backend enforces before anything is written.
    pub fn validate(&self) -> Result<(), StoreError> {
        let mut puts: Vec<&[u8]> = Vec::new();
        let mut deletes: Vec<&KeyRange> = Vec::new();
        for op in &self.ops {
            match op {
                TxnOp::Put { key, .. } => {
                    if key.is_empty() {
                        return Err(StoreError::InvalidTxn("empty key".into()));
                    }
                    if puts.contains(&key.as_slice()) || deletes.iter().any(|d| d.contains(key)) {
                        return Err(StoreError::InvalidTxn(format!(
                            "key {:?} named twice in one transaction",
                            String::from_utf8_lossy(key)
                        )));
                    }
                    puts.push(key);
                }
                TxnOp::Delete(range) => {
                    if let KeyRange::Key(k) = range
                        && k.is_empty()
                    {
                        return Err(StoreError::InvalidTxn("empty key".into()));
                    }
                    if puts.iter().any(|p| range.contains(p)) {
                        return Err(StoreError::InvalidTxn(
                            "a put and a delete name the same key in one transaction".into(),
                        ));
                    }
                    deletes.push(range);
                }
            }
        }
        Ok(())
    }
}

/// Outcome of [`Store::txn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the compares held and the ops were applied.
    pub succeeded: bool,
    /// The revision the transaction committed at; when it changed nothing
    /// (compares failed, or only deletes of missing keys), the store's
    /// current revision.
    pub revision: Revision,
    /// Number of keys the transaction deleted.
    pub deleted: i64,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or overwritten.
    Put,
    /// The key was deleted (explicitly, by a prefix delete, or by lease expiry).
    Delete,
}

/// One change to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for deletes only `key` and `mod_revision`
    /// (the revision of the delete) are set.
    pub kv: KeyValue,
}

/// Every event of one revision that falls inside a watched range, in the
/// order the transaction applied them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision all these events committed at.
    pub revision: Revision,
    /// The events (never empty). Shared, not copied, between the watchers
    /// of one revision whenever the whole revision falls in their range.
    pub events: Arc<[Event]>,
}

/// The stream a watch returns. It ends with an error when the watch cannot go
/// on (history compacted, store closed or unreachable); a consumer then
/// resumes from the revision after the last batch it processed.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The lease's id.
    pub id: LeaseId,
    /// Granted TTL in seconds.
    pub ttl_seconds: i64,
}

/// A lease's remaining life, from [`Store::lease_time_to_live`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Granted TTL in seconds.
    pub granted_ttl_seconds: i64,
    /// Seconds left before expiry, rounded down.
    pub remaining_seconds: i64,
}

/// Revisions of the store as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// Latest committed revision.
    pub revision: Revision,
    /// History below this revision is gone (0: nothing compacted yet).
    pub compacted_revision: Revision,
}

/// Errors of the store layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The requested history was compacted away.
    #[error("revision {requested} has been compacted; history starts at {compacted}")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The store's compaction point.
        compacted: Revision,
    },
    /// The requested revision has not happened yet.
    #[error("revision {requested} is in the future; the store is at {current}")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's latest revision.
        current: Revision,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:x} not found")]
    LeaseNotFound(LeaseId),
    /// The request breaks a store rule; nothing was written.
    #[error("invalid request: {0}")]
    InvalidTxn(String),
    /// The store cannot serve now (closed, unreachable, shutting down).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend failed (I/O error, corruption). Nothing of the failed
    /// request was committed.
    #[error("store backend failure: {0}")]
    Backend(String),
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.kind())
    }
}

/// A revisioned key-value store (see the module documentation).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name of the backend: `"embedded"` or `"etcd"`.
    fn kind(&self) -> &'static str;

    /// Reads one key or a prefix at the latest revision.
    async fn range(&self, range: KeyRange) -> Result<RangeResponse, StoreError>;

    /// Commits a transaction (see [`Txn`]). Returns only after the result is
    /// durable.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Streams every change inside `range` from `start_revision` on
    /// (inclusive). `start_revision` 0 means "from the next revision".
    async fn watch(
        &self,
        range: KeyRange,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError>;

    /// Grants a lease that expires `ttl_seconds` after its last keep-alive.
    async fn lease_grant(&self, ttl_seconds: i64) -> Result<Lease, StoreError>;

    /// Renews a lease for its full TTL; returns the TTL.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError>;

    /// Revokes a lease, deleting its keys at one revision. Returns the
    /// revision of the deletion (the current revision when it had no keys).
    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision, StoreError>;

    /// Reports a lease's TTL and remaining time.
    async fn lease_time_to_live(&self, id: LeaseId) -> Result<LeaseInfo, StoreError>;

    /// Drops history below `revision`: watches from an earlier revision get
    /// [`StoreError::Compacted`] afterwards.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// Latest and compacted revisions.
    async fn status(&self) -> Result<StoreStatus, StoreError>;

    /// Reads one key.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.range(KeyRange::key(key)).await?.kvs.into_iter().next())
    }

    /// Puts one key unconditionally; returns the commit revision.
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<Revision, StoreError> {
        Ok(self.txn(Txn::new().put(key, value)).await?.revision)
    }

    /// Deletes a key or prefix; returns the number of deleted keys.
    async fn delete(&self, range: KeyRange) -> Result<i64, StoreError> {
        Ok(self.txn(Txn::new().delete(range)).await?.deleted)
    }
}
