//! The store conformance suite: one set of behavioural tests every backend
//! must pass (see `tests/tests/store_conformance.rs`).
//!
//! Every case is a `pub async fn case(fixture: &Fixture)`. A case only
//! touches keys under its fixture's namespace ([`Fixture::key`]), so cases
//! marked [`Isolation::Shared`] can run concurrently against one store (one
//! etcd cluster) while other clients write to it. Such cases never assume
//! absolute revision numbers: they assert relative facts (strictly
//! increasing, equal to what a write acknowledged) and check "nothing was
//! written" through a watch on their own namespace. Cases marked
//! [`Isolation::Exclusive`] assert store-wide facts (exact `+1` steps,
//! compaction) and need a store nobody else writes to while they run; the
//! fixture factory must hand them a fresh store.
//!
//! Lease cases use TTLs of at least 2 s (etcd's minimum) and allow expiry to
//! take up to TTL + a few seconds; lease ids are treated as opaque.
//!
//! [`store_conformance_tests!`](crate::store_conformance_tests) expands into
//! one `#[tokio::test]` per case, so a backend's test file is one line.

// Test code compiled into the library so other crates' tests can run it:
// panicking on a failed expectation is exactly what it is for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use super::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyRange, KeyValue, LeaseId, Revision,
    Store, StoreError, Txn, WatchBatch, WatchStream,
};

/// Longest any single watch read may take before the case fails.
const WATCH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long "no further event" is observed for.
const QUIET: Duration = Duration::from_millis(300);
/// Extra time a backend may take to expire a lease after its TTL (etcd
/// checks expiry periodically and needs a raft round).
const EXPIRY_SLACK: Duration = Duration::from_secs(4);

/// What a case needs from the store it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// The case only touches its own namespace and may share the store with
    /// other cases and clients.
    Shared,
    /// The case asserts store-wide facts (exact revision steps, compaction)
    /// and needs a store nobody else writes to while it runs.
    Exclusive,
}

/// Description of one case, handed to the fixture factory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CaseSpec {
    /// The case's function name.
    pub name: &'static str,
    /// Whether the case needs a store of its own.
    pub isolation: Isolation,
}

/// What a case runs against: a store and a key namespace unique to this run
/// of this case.
pub struct Fixture {
    store: Arc<dyn Store>,
    namespace: Vec<u8>,
    spec: CaseSpec,
    // Dropped after `store` (field order), e.g. the temporary directory
    // holding an embedded store's file.
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("backend", &self.store.kind())
            .field("namespace", &String::from_utf8_lossy(&self.namespace))
            .field("spec", &self.spec)
            .finish()
    }
}

impl Fixture {
    /// A fixture for `spec` on `store`, with a namespace unique across
    /// processes and runs (`/strata-conformance/<case>/<pid>-<time>-<n>/`).
    pub fn new(store: Arc<dyn Store>, spec: CaseSpec) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let namespace = format!(
            "/strata-conformance/{}/{}-{nanos:x}-{n}/",
            spec.name,
            std::process::id()
        )
        .into_bytes();
        Self {
            store,
            namespace,
            spec,
            _guard: None,
        }
    }

    /// Keeps `guard` alive until after the store is dropped (for example the
    /// temporary directory an embedded store lives in).
    pub fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The store under test.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The case this fixture was made for.
    pub fn spec(&self) -> CaseSpec {
        self.spec
    }

    /// The namespace every key of this case starts with (ends with `/`).
    pub fn namespace(&self) -> &[u8] {
        &self.namespace
    }

    /// The key `suffix` inside this case's namespace.
    pub fn key(&self, suffix: impl AsRef<[u8]>) -> Vec<u8> {
        let mut key = self.namespace.clone();
        key.extend_from_slice(suffix.as_ref());
        key
    }

    /// Every key of this case.
    pub fn all(&self) -> KeyRange {
        KeyRange::prefix(self.namespace.clone())
    }
}

/// What a fixture factory returns: a [`Fixture`], or an `Option` of one
/// where `None` skips the case (for a backend that is not installed; the
/// factory must say so loudly, and must not skip under CI).
pub trait IntoFixture {
    /// The fixture, or `None` to skip.
    fn into_fixture(self) -> Option<Fixture>;
}

impl IntoFixture for Fixture {
    fn into_fixture(self) -> Option<Fixture> {
        Some(self)
    }
}

impl IntoFixture for Option<Fixture> {
    fn into_fixture(self) -> Option<Fixture> {
        self
    }
}

/// Expands into one `#[tokio::test]` per conformance case, inside a module
/// named after the backend.
///
/// `$factory` is called with a [`CaseSpec`] and must return a future of a
/// [`Fixture`] (or of an `Option<Fixture>`, see [`IntoFixture`]); for
/// [`Isolation::Exclusive`] cases it must provide a store nobody else
/// writes to while the case runs.
///
/// ```text
/// strata_server::store_conformance_tests!(embedded, |spec| async move {
///     let dir = tempfile::tempdir().unwrap();
///     let store = EmbeddedStore::open(dir.path()).unwrap();
///     Fixture::new(Arc::new(store), spec).with_guard(dir)
/// });
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($backend:ident, $factory:expr $(,)?) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            $crate::__store_conformance_cases! { ($factory)
                Shared put_get_range,
                Shared range_prefix_and_key_order,
                Shared version_and_revision_bookkeeping,
                Exclusive revision_advances_by_one_per_change,
                Shared txn_compare_value,
                Shared txn_compare_version,
                Shared txn_compare_create_revision,
                Shared txn_compare_mod_revision,
                Shared txn_compare_existence,
                Shared txn_all_compares_must_hold,
                Shared txn_commits_atomically_at_one_revision,
                Shared txn_invalid_writes_nothing,
                Shared delete_key_and_prefix,
                Shared watch_events_in_revision_order,
                Shared watch_prefix_and_key_filtering,
                Shared watch_resume_yields_exactly_missed_batches,
                Shared watch_lagging_far_behind,
                Shared watch_from_zero_sees_only_future_changes,
                Exclusive compaction_watch_below_point_is_compacted,
                Exclusive compaction_errors,
                Shared lease_revoke_deletes_keys_at_one_revision,
                Shared lease_keep_alive_extends,
                Shared lease_expiry_deletes_keys_at_one_revision,
                Shared lease_unknown_put_writes_nothing,
                Shared lease_checked_only_when_compares_hold,
                Shared lease_reput_without_lease_detaches,
                Shared concurrent_writers_watch_sees_every_write_once,
                Shared concurrent_transactions_keep_their_own_outcomes,
                Shared concurrent_compare_and_swap_loses_no_update,
            }
        }
    };
}

/// Implementation detail of [`store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    (($factory:expr) $($(#[$meta:meta])* $isolation:ident $case:ident),* $(,)?) => {
        $(
            $(#[$meta])*
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let spec = $crate::store::conformance::CaseSpec {
                    name: ::core::stringify!($case),
                    isolation: $crate::store::conformance::Isolation::$isolation,
                };
                let Some(fixture) = $crate::store::conformance::IntoFixture::into_fixture(
                    ($factory)(spec).await,
                ) else {
                    return;
                };
                $crate::store::conformance::$case(&fixture).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// Helpers.

fn kv(key: &[u8], value: &[u8], create: Revision, modified: Revision, version: i64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: 0,
    }
}

fn put_event(kv: KeyValue) -> Event {
    Event {
        kind: EventKind::Put,
        kv,
    }
}

fn delete_event(key: &[u8], revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_vec(),
            mod_revision: revision,
            ..KeyValue::default()
        },
    }
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

async fn watch(f: &Fixture, range: KeyRange, start: Revision) -> WatchStream {
    f.store().watch(range, start).await.expect("watch")
}

/// The next watch item (error or batch); `None` when the stream ended.
async fn next_item(stream: &mut WatchStream, what: &str) -> Option<Result<WatchBatch, StoreError>> {
    within(what, WATCH_TIMEOUT, stream.next()).await
}

/// The next batch; fails the case on an error or the end of the stream.
async fn next_batch(stream: &mut WatchStream, what: &str) -> WatchBatch {
    match next_item(stream, what).await {
        Some(Ok(batch)) => {
            assert!(
                !batch.events.is_empty(),
                "{what}: empty batch at {}",
                batch.revision
            );
            batch
        }
        Some(Err(e)) => panic!("{what}: watch failed: {e}"),
        None => panic!("{what}: watch stream ended"),
    }
}

/// Reads batches until (and including) the one at `last`; fails when a
/// batch goes past `last` or revisions do not strictly increase.
async fn batches_through(stream: &mut WatchStream, last: Revision, what: &str) -> Vec<WatchBatch> {
    let mut out: Vec<WatchBatch> = Vec::new();
    loop {
        let batch = next_batch(stream, what).await;
        if let Some(prev) = out.last() {
            assert!(
                batch.revision > prev.revision,
                "{what}: revision {} after {}",
                batch.revision,
                prev.revision
            );
        }
        assert!(
            batch.revision <= last,
            "{what}: batch at {} past {last}",
            batch.revision
        );
        let done = batch.revision == last;
        out.push(batch);
        if done {
            return out;
        }
    }
}

/// Asserts that no batch arrives for a short while.
async fn assert_quiet(stream: &mut WatchStream, what: &str) {
    if let Ok(item) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("{what}: expected no event, got {item:?}");
    }
}

/// Writes a fresh sentinel key and asserts it is the very next thing the
/// watch (on the case's namespace) reports: proof that nothing was written
/// in between.
async fn assert_next_is_sentinel(f: &Fixture, stream: &mut WatchStream, what: &str) {
    static N: AtomicU64 = AtomicU64::new(0);
    let key = f.key(format!("~sentinel-{}", N.fetch_add(1, Ordering::Relaxed)));
    let rev = f.store().put(&key, b"s").await.unwrap();
    let batch = next_batch(stream, what).await;
    assert_eq!(
        batch,
        WatchBatch {
            revision: rev,
            events: vec![put_event(kv(&key, b"s", rev, rev, 1))].into()
        },
        "{what}: something was written before the sentinel"
    );
}

/// Each batch's events by revision, sorted by key: the order of
/// transactions committed together is the store's choice.
fn by_revision(batches: Vec<WatchBatch>) -> BTreeMap<Revision, Vec<Event>> {
    batches
        .into_iter()
        .map(|b| {
            let mut events = b.events.to_vec();
            events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
            (b.revision, events)
        })
        .collect()
}

fn keys_of(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| show(&kv.key)).collect()
}

// ---------------------------------------------------------------------------
// Put, get, range.

/// Put/get round trip with create/mod revision and version, empty and
/// binary values, missing keys, and the revision a read reports.
pub async fn put_get_range(f: &Fixture) {
    let s = f.store();
    assert!(!s.kind().is_empty());
    let a = f.key("a");
    assert_eq!(s.get(&a).await.unwrap(), None, "a fresh key is missing");
    let r1 = s.put(&a, b"v1").await.unwrap();
    assert!(r1 > 0, "revisions are positive, got {r1}");
    assert_eq!(s.get(&a).await.unwrap(), Some(kv(&a, b"v1", r1, r1, 1)));
    let read = s.range(KeyRange::key(a.clone())).await.unwrap();
    assert!(
        read.revision >= r1,
        "a read after a write reports at least its revision"
    );

    let r2 = s.put(&a, b"v2").await.unwrap();
    assert!(r2 > r1);
    assert_eq!(s.get(&a).await.unwrap(), Some(kv(&a, b"v2", r1, r2, 2)));

    let empty = f.key("empty");
    let r3 = s.put(&empty, b"").await.unwrap();
    assert!(r3 > r2);
    assert_eq!(
        s.get(&empty).await.unwrap(),
        Some(kv(&empty, b"", r3, r3, 1))
    );

    let bin = f.key("bin");
    let value: Vec<u8> = (0..=255u8).collect();
    let r4 = s.put(&bin, &value).await.unwrap();
    assert!(r4 > r3);
    assert_eq!(
        s.get(&bin).await.unwrap(),
        Some(kv(&bin, &value, r4, r4, 1))
    );

    let missing = s.range(KeyRange::key(f.key("missing"))).await.unwrap();
    assert!(missing.kvs.is_empty());
    assert!(missing.revision >= r4);

    let all = s.range(f.all()).await.unwrap();
    assert!(all.revision >= r4);
    assert_eq!(
        all.kvs,
        vec![
            kv(&a, b"v2", r1, r2, 2),
            kv(&bin, &value, r4, r4, 1),
            kv(&empty, b"", r3, r3, 1)
        ]
    );
    assert!(s.status().await.unwrap().revision >= r4);
}

/// Prefix ranges select exactly the keys starting with the prefix, in
/// ascending byte order (including 0x00 and 0xff bytes); a key range
/// selects only that key.
pub async fn range_prefix_and_key_order(f: &Fixture) {
    let s = f.store();
    let suffixes: [&[u8]; 10] = [
        b"b",
        b"a/2",
        b"a",
        b"\xff",
        b"a/10",
        b"\x00",
        b"ab",
        b"a/1",
        b"B",
        b"a/\xff\xff",
    ];
    for suffix in suffixes {
        s.put(&f.key(suffix), suffix).await.unwrap();
    }
    let sorted = |mut v: Vec<Vec<u8>>| {
        v.sort();
        v.into_iter().map(|k| show(&k)).collect::<Vec<_>>()
    };
    let all = s.range(f.all()).await.unwrap();
    assert_eq!(
        keys_of(&all.kvs),
        sorted(suffixes.iter().map(|x| f.key(x)).collect())
    );
    for kv in &all.kvs {
        assert_eq!(f.key(&kv.value), kv.key, "value belongs to its key");
    }

    let under_a_slash = s.range(KeyRange::prefix(f.key("a/"))).await.unwrap();
    assert_eq!(
        keys_of(&under_a_slash.kvs),
        sorted(vec![
            f.key("a/1"),
            f.key("a/10"),
            f.key("a/2"),
            f.key(b"a/\xff\xff")
        ])
    );
    let under_a = s.range(KeyRange::prefix(f.key("a"))).await.unwrap();
    assert_eq!(
        keys_of(&under_a.kvs),
        sorted(vec![
            f.key("a"),
            f.key("a/1"),
            f.key("a/10"),
            f.key("a/2"),
            f.key(b"a/\xff\xff"),
            f.key("ab")
        ])
    );
    let under_ff = s.range(KeyRange::prefix(f.key(b"\xff"))).await.unwrap();
    assert_eq!(keys_of(&under_ff.kvs), vec![show(&f.key(b"\xff"))]);
    let exact = s.range(KeyRange::key(f.key("a"))).await.unwrap();
    assert_eq!(keys_of(&exact.kvs), vec![show(&f.key("a"))]);
    let nothing = s.range(KeyRange::prefix(f.key("zzz"))).await.unwrap();
    assert!(nothing.kvs.is_empty());
}

/// Version counts puts since creation; delete and re-create resets
/// create revision and version; all keys of a txn share its mod revision.
pub async fn version_and_revision_bookkeeping(f: &Fixture) {
    let s = f.store();
    let k = f.key("k");
    let r1 = s.put(&k, b"1").await.unwrap();
    let r2 = s.put(&k, b"2").await.unwrap();
    let r3 = s.put(&k, b"3").await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    assert_eq!(s.get(&k).await.unwrap(), Some(kv(&k, b"3", r1, r3, 3)));

    let del = s
        .txn(Txn::new().delete(KeyRange::key(k.clone())))
        .await
        .unwrap();
    assert!(del.succeeded);
    assert_eq!(del.deleted, 1);
    assert!(del.revision > r3);
    assert_eq!(s.get(&k).await.unwrap(), None);

    let r5 = s.put(&k, b"again").await.unwrap();
    assert!(r5 > del.revision);
    assert_eq!(
        s.get(&k).await.unwrap(),
        Some(kv(&k, b"again", r5, r5, 1)),
        "re-created"
    );

    let other = f.key("other");
    let t = s
        .txn(Txn::new().put(k.clone(), "t").put(other.clone(), "o"))
        .await
        .unwrap();
    assert!(t.succeeded);
    assert!(t.revision > r5);
    assert_eq!(t.deleted, 0);
    assert_eq!(
        s.get(&k).await.unwrap(),
        Some(kv(&k, b"t", r5, t.revision, 2))
    );
    assert_eq!(
        s.get(&other).await.unwrap(),
        Some(kv(&other, b"o", t.revision, t.revision, 1))
    );
}

/// **Exclusive.** Every change advances the store revision by exactly one
/// (one per txn, whatever its number of ops); reads, failed compares,
/// deletes of missing keys, empty txns and lease operations without keys
/// do not advance it.
pub async fn revision_advances_by_one_per_change(f: &Fixture) {
    let s = f.store();
    let k = f.key("k");
    let r = s.put(&k, b"v").await.unwrap();
    assert_eq!(s.status().await.unwrap().revision, r);
    assert_eq!(s.range(f.all()).await.unwrap().revision, r);

    let resp = s
        .txn(Txn::new().delete(KeyRange::key(f.key("missing"))))
        .await
        .unwrap();
    assert_eq!(
        (resp.succeeded, resp.revision, resp.deleted),
        (true, r, 0),
        "delete missing"
    );
    let resp = s
        .txn(Txn::new().delete(KeyRange::prefix(f.key("none/"))))
        .await
        .unwrap();
    assert_eq!(
        (resp.succeeded, resp.revision, resp.deleted),
        (true, r, 0),
        "delete none"
    );
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::missing(k.clone()))
                .put(k.clone(), "x"),
        )
        .await;
    let resp = resp.unwrap();
    assert_eq!(
        (resp.succeeded, resp.revision),
        (false, r),
        "failed compare"
    );
    let resp = s.txn(Txn::new()).await.unwrap();
    assert_eq!(resp.revision, r, "empty txn");
    let lease = s.lease_grant(10).await.unwrap();
    s.lease_keep_alive(lease.id).await.unwrap();
    s.lease_time_to_live(lease.id).await.unwrap();
    assert_eq!(
        s.lease_revoke(lease.id).await.unwrap(),
        r,
        "revoke of a lease without keys"
    );
    assert_eq!(
        s.status().await.unwrap().revision,
        r,
        "nothing above changed anything"
    );

    assert_eq!(s.put(&k, b"w").await.unwrap(), r + 1);
    let t = s
        .txn(
            Txn::new()
                .put(f.key("a"), "a")
                .put(f.key("b"), "b")
                .put(f.key("c"), "c"),
        )
        .await
        .unwrap();
    assert_eq!(t.revision, r + 2);
    let d = s.txn(Txn::new().delete(f.all())).await.unwrap();
    assert_eq!((d.revision, d.deleted), (r + 3, 4));
    assert_eq!(s.status().await.unwrap().revision, r + 3);
    assert_eq!(s.range(f.all()).await.unwrap().revision, r + 3);
}

// ---------------------------------------------------------------------------
// Transactions.

/// Runs `compare` as the guard of a put to a scratch key and checks the
/// outcome (and that a failed guard wrote nothing).
async fn check_compare(f: &Fixture, compare: Compare, expected: bool) {
    let s = f.store();
    let out = f.key("~compare-out");
    let what = format!("{compare:?}");
    let before = s.get(&out).await.unwrap();
    let resp = s
        .txn(Txn::new().when(compare).put(out.clone(), what.clone()))
        .await
        .unwrap();
    assert_eq!(resp.succeeded, expected, "outcome of {what}");
    assert_eq!(resp.deleted, 0);
    let after = s.get(&out).await.unwrap();
    if expected {
        let after = after.expect("guarded put applied");
        assert_eq!(after.value, what.as_bytes());
        assert_eq!(after.mod_revision, resp.revision);
    } else {
        assert_eq!(after, before, "a failed compare writes nothing ({what})");
        if let Some(before) = before {
            assert!(resp.revision >= before.mod_revision);
        }
    }
}

fn cmp(key: &[u8], op: CompareOp, target: CompareTarget) -> Compare {
    Compare {
        key: key.to_vec(),
        op,
        target,
    }
}

/// Value compares are byte-wise; on a missing key every value compare is
/// false, whatever the operator.
pub async fn txn_compare_value(f: &Fixture) {
    use CompareOp::{Equal, Greater, Less, NotEqual};
    let k = f.key("k");
    f.store().put(&k, b"b").await.unwrap();
    let v = |x: &[u8]| CompareTarget::Value(x.to_vec());
    for (op, target, expected) in [
        (Equal, v(b"b"), true),
        (Equal, v(b"a"), false),
        (Equal, v(b""), false),
        (NotEqual, v(b"a"), true),
        (NotEqual, v(b"b"), false),
        (Greater, v(b"a"), true),
        (Greater, v(b"ab"), true),
        (Greater, v(b"b"), false),
        (Greater, v(b"c"), false),
        (Less, v(b"c"), true),
        (Less, v(b"b\x00"), true),
        (Less, v(b"b"), false),
        (Less, v(b"a"), false),
    ] {
        check_compare(f, cmp(&k, op, target), expected).await;
    }
    check_compare(f, Compare::value_equals(k.clone(), "b"), true).await;
    let missing = f.key("missing");
    for op in [Equal, NotEqual, Greater, Less] {
        check_compare(f, cmp(&missing, op, v(b"")), false).await;
        check_compare(f, cmp(&missing, op, v(b"x")), false).await;
    }
}

/// Version compares; a missing key has version 0.
pub async fn txn_compare_version(f: &Fixture) {
    use CompareOp::{Equal, Greater, Less, NotEqual};
    let k = f.key("k");
    f.store().put(&k, b"1").await.unwrap();
    f.store().put(&k, b"2").await.unwrap();
    let v = CompareTarget::Version;
    for (op, target, expected) in [
        (Equal, v(2), true),
        (Equal, v(1), false),
        (NotEqual, v(2), false),
        (NotEqual, v(0), true),
        (Greater, v(1), true),
        (Greater, v(2), false),
        (Less, v(3), true),
        (Less, v(2), false),
    ] {
        check_compare(f, cmp(&k, op, target), expected).await;
    }
    let missing = f.key("missing");
    check_compare(f, cmp(&missing, Equal, v(0)), true).await;
    check_compare(f, cmp(&missing, Greater, v(0)), false).await;
    check_compare(f, cmp(&missing, Less, v(1)), true).await;
}

/// Create-revision compares; a missing key has create revision 0.
pub async fn txn_compare_create_revision(f: &Fixture) {
    use CompareOp::{Equal, Greater, Less, NotEqual};
    let k = f.key("k");
    let created = f.store().put(&k, b"1").await.unwrap();
    let modified = f.store().put(&k, b"2").await.unwrap();
    let c = CompareTarget::CreateRevision;
    for (op, target, expected) in [
        (Equal, c(created), true),
        (Equal, c(modified), false),
        (NotEqual, c(modified), true),
        (Less, c(modified), true),
        (Less, c(created), false),
        (Greater, c(created - 1), true),
        (Greater, c(created), false),
    ] {
        check_compare(f, cmp(&k, op, target), expected).await;
    }
    let missing = f.key("missing");
    check_compare(f, cmp(&missing, Equal, c(0)), true).await;
    check_compare(f, cmp(&missing, Equal, c(created)), false).await;
}

/// Mod-revision compares; a missing key has mod revision 0.
pub async fn txn_compare_mod_revision(f: &Fixture) {
    use CompareOp::{Equal, Greater, Less, NotEqual};
    let k = f.key("k");
    let created = f.store().put(&k, b"1").await.unwrap();
    let modified = f.store().put(&k, b"2").await.unwrap();
    for (op, revision, expected) in [
        (Equal, modified, true),
        (Equal, created, false),
        (NotEqual, created, true),
        (Greater, created, true),
        (Greater, modified, false),
        (Less, modified + 1, true),
        (Less, modified, false),
    ] {
        check_compare(f, Compare::mod_revision(k.clone(), op, revision), expected).await;
    }
    let missing = f.key("missing");
    check_compare(f, Compare::mod_revision(missing.clone(), Equal, 0), true).await;
    check_compare(f, Compare::mod_revision(missing, Greater, 0), false).await;
}

/// `exists` / `missing` compares, before and after a delete; "create if
/// missing" succeeds once.
pub async fn txn_compare_existence(f: &Fixture) {
    let s = f.store();
    let k = f.key("k");
    check_compare(f, Compare::exists(k.clone()), false).await;
    check_compare(f, Compare::missing(k.clone()), true).await;
    s.put(&k, b"v").await.unwrap();
    check_compare(f, Compare::exists(k.clone()), true).await;
    check_compare(f, Compare::missing(k.clone()), false).await;
    s.delete(KeyRange::key(k.clone())).await.unwrap();
    check_compare(f, Compare::exists(k.clone()), false).await;
    check_compare(f, Compare::missing(k.clone()), true).await;

    let once = f.key("once");
    let create = |v: &'static str| {
        Txn::new()
            .when(Compare::missing(once.clone()))
            .put(once.clone(), v)
    };
    let first = s.txn(create("first")).await.unwrap();
    assert!(first.succeeded);
    let second = s.txn(create("second")).await.unwrap();
    assert!(!second.succeeded);
    assert!(second.revision >= first.revision);
    assert_eq!(
        s.get(&once).await.unwrap(),
        Some(kv(&once, b"first", first.revision, first.revision, 1))
    );
}

/// Every compare must hold; one false compare among true ones fails the
/// txn and none of its ops (puts and deletes) is applied.
pub async fn txn_all_compares_must_hold(f: &Fixture) {
    let s = f.store();
    let a = f.key("a");
    let b = f.key("b");
    let ra = s.put(&a, b"1").await.unwrap();
    s.put(&b, b"2").await.unwrap();
    let mut w = watch(f, f.all(), 0).await;
    let ops = |t: Txn| {
        t.put(f.key("c"), "c")
            .put(a.clone(), "changed")
            .delete(KeyRange::key(b.clone()))
    };

    let resp = s
        .txn(ops(Txn::new()
            .when(Compare::value_equals(a.clone(), "1"))
            .when(Compare::exists(b.clone()))
            .when(Compare::mod_revision(
                a.clone(),
                CompareOp::Equal,
                ra + 1_000_000,
            ))))
        .await
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.deleted, 0);
    assert_eq!(s.get(&a).await.unwrap().unwrap().value, b"1");
    assert!(s.get(&b).await.unwrap().is_some());
    assert_eq!(s.get(&f.key("c")).await.unwrap(), None);
    assert_next_is_sentinel(f, &mut w, "failed txn").await;

    let resp =
        s.txn(ops(Txn::new()
            .when(Compare::value_equals(a.clone(), "1"))
            .when(Compare::exists(b.clone()))
            .when(Compare::mod_revision(a.clone(), CompareOp::Equal, ra))))
            .await
            .unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.deleted, 1);
    let batch = next_batch(&mut w, "successful txn").await;
    assert_eq!(batch.revision, resp.revision);
    assert_eq!(batch.events.len(), 3);
}

/// All ops of a txn (puts and deletes) become visible at one revision and
/// reach watchers as one batch, events in op order.
pub async fn txn_commits_atomically_at_one_revision(f: &Fixture) {
    let s = f.store();
    let (a, b, c, d) = (f.key("a"), f.key("b"), f.key("c"), f.key("d"));
    let ra = s.put(&a, b"old").await.unwrap();
    s.put(&d, b"doomed").await.unwrap();
    let mut w = watch(f, f.all(), 0).await;
    let resp = s
        .txn(
            Txn::new()
                .put(c.clone(), "c")
                .put(a.clone(), "a")
                .delete(KeyRange::key(d.clone()))
                .put(b.clone(), "b"),
        )
        .await
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.deleted, 1);
    let r = resp.revision;
    let read = s.range(f.all()).await.unwrap();
    assert!(read.revision >= r);
    assert_eq!(
        read.kvs,
        vec![
            kv(&a, b"a", ra, r, 2),
            kv(&b, b"b", r, r, 1),
            kv(&c, b"c", r, r, 1)
        ]
    );
    let batch = next_batch(&mut w, "txn batch").await;
    assert_eq!(
        batch,
        WatchBatch {
            revision: r,
            events: vec![
                put_event(kv(&c, b"c", r, r, 1)),
                put_event(kv(&a, b"a", ra, r, 2)),
                delete_event(&d, r),
                put_event(kv(&b, b"b", r, r, 1)),
            ]
            .into(),
        }
    );
    assert_next_is_sentinel(f, &mut w, "after the txn").await;
}

/// A txn naming a key twice (two puts; a put inside a deleted key or
/// prefix, in either order) or an empty key is rejected with
/// `InvalidTxn`, whatever its compares, and writes nothing.
pub async fn txn_invalid_writes_nothing(f: &Fixture) {
    let s = f.store();
    let keep = f.key("x/keep");
    s.put(&keep, b"kept").await.unwrap();
    let mut w = watch(f, f.all(), 0).await;
    let invalid = [
        (
            "two puts",
            Txn::new()
                .put(f.key("a"), "1")
                .put(f.key("ok"), "ok")
                .put(f.key("a"), "2"),
        ),
        (
            "put inside deleted prefix",
            Txn::new()
                .delete(KeyRange::prefix(f.key("x/")))
                .put(f.key("x/new"), "n"),
        ),
        (
            "put then delete of the same key",
            Txn::new()
                .put(keep.clone(), "changed")
                .delete(KeyRange::key(keep.clone())),
        ),
        (
            "delete then put of the same key",
            Txn::new()
                .delete(KeyRange::key(f.key("b")))
                .put(f.key("b"), "b"),
        ),
        (
            "empty key",
            Txn::new().put(f.key("ok"), "ok").put(Vec::new(), "empty"),
        ),
        (
            "failing compare and two puts",
            Txn::new()
                .when(Compare::missing(keep.clone()))
                .put(f.key("a"), "1")
                .put(f.key("a"), "2"),
        ),
        (
            "holding compare and two puts",
            Txn::new()
                .when(Compare::exists(keep.clone()))
                .put(f.key("a"), "1")
                .put(f.key("a"), "2"),
        ),
    ];
    for (what, txn) in invalid {
        match s.txn(txn).await {
            Err(StoreError::InvalidTxn(_)) => {}
            other => panic!("{what}: expected InvalidTxn, got {other:?}"),
        }
    }
    for k in ["a", "b", "ok", "x/new"] {
        assert_eq!(s.get(&f.key(k)).await.unwrap(), None, "{k} must not exist");
    }
    assert_eq!(s.get(&keep).await.unwrap().unwrap().value, b"kept");
    assert_next_is_sentinel(f, &mut w, "invalid txns").await;
}

/// Deleting a key or a prefix removes exactly the selected keys at one
/// revision (one batch, deletes in key order); deleting missing keys
/// succeeds with count 0 and emits nothing.
pub async fn delete_key_and_prefix(f: &Fixture) {
    let s = f.store();
    for k in ["d/3", "d/1", "d", "dx", "d/2", "e"] {
        s.put(&f.key(k), k.as_bytes()).await.unwrap();
    }
    let mut w = watch(f, f.all(), 0).await;

    let one = s
        .txn(Txn::new().delete(KeyRange::key(f.key("e"))))
        .await
        .unwrap();
    assert_eq!((one.succeeded, one.deleted), (true, 1));
    let batch = next_batch(&mut w, "delete key").await;
    assert_eq!(
        batch,
        WatchBatch {
            revision: one.revision,
            events: vec![delete_event(&f.key("e"), one.revision)].into()
        }
    );

    let many = s
        .txn(Txn::new().delete(KeyRange::prefix(f.key("d/"))))
        .await
        .unwrap();
    assert_eq!((many.succeeded, many.deleted), (true, 3));
    assert!(many.revision > one.revision);
    let batch = next_batch(&mut w, "delete prefix").await;
    let r = many.revision;
    assert_eq!(
        batch,
        WatchBatch {
            revision: r,
            events: vec![
                delete_event(&f.key("d/1"), r),
                delete_event(&f.key("d/2"), r),
                delete_event(&f.key("d/3"), r),
            ]
            .into(),
        }
    );
    let left = s.range(f.all()).await.unwrap();
    assert_eq!(
        keys_of(&left.kvs),
        vec![show(&f.key("d")), show(&f.key("dx"))]
    );

    assert_eq!(
        s.delete(KeyRange::key(f.key("e"))).await.unwrap(),
        0,
        "already deleted"
    );
    assert_eq!(s.delete(KeyRange::key(f.key("never"))).await.unwrap(), 0);
    assert_eq!(s.delete(KeyRange::prefix(f.key("d/"))).await.unwrap(), 0);
    let nothing = s
        .txn(Txn::new().delete(KeyRange::prefix(f.key("zz/"))))
        .await
        .unwrap();
    assert!(nothing.succeeded);
    assert!(nothing.revision >= r);
    assert_next_is_sentinel(f, &mut w, "deletes of missing keys").await;
}

// ---------------------------------------------------------------------------
// Watch.

/// A watch from a past revision replays every change from that revision
/// (inclusive) in revision order, one batch per revision, with full
/// key-values for puts and key + revision for deletes.
pub async fn watch_events_in_revision_order(f: &Fixture) {
    let s = f.store();
    let (a, b, c) = (f.key("a"), f.key("b"), f.key("c"));
    let r0 = s.put(&f.key("start"), b"s").await.unwrap();
    let r1 = s.put(&a, b"a1").await.unwrap();
    let r2 = s.put(&b, b"b1").await.unwrap();
    let r3 = s.put(&a, b"a2").await.unwrap();
    let r4 = s
        .txn(Txn::new().delete(KeyRange::key(b.clone())))
        .await
        .unwrap()
        .revision;
    let r5 = s
        .txn(Txn::new().put(c.clone(), "c1").put(a.clone(), "a3"))
        .await
        .unwrap()
        .revision;
    let expected = vec![
        WatchBatch {
            revision: r0,
            events: vec![put_event(kv(&f.key("start"), b"s", r0, r0, 1))].into(),
        },
        WatchBatch {
            revision: r1,
            events: vec![put_event(kv(&a, b"a1", r1, r1, 1))].into(),
        },
        WatchBatch {
            revision: r2,
            events: vec![put_event(kv(&b, b"b1", r2, r2, 1))].into(),
        },
        WatchBatch {
            revision: r3,
            events: vec![put_event(kv(&a, b"a2", r1, r3, 2))].into(),
        },
        WatchBatch {
            revision: r4,
            events: vec![delete_event(&b, r4)].into(),
        },
        WatchBatch {
            revision: r5,
            events: vec![
                put_event(kv(&c, b"c1", r5, r5, 1)),
                put_event(kv(&a, b"a3", r1, r5, 3)),
            ]
            .into(),
        },
    ];
    let mut w = watch(f, f.all(), r0).await;
    assert_eq!(batches_through(&mut w, r5, "replay").await, expected);

    // Live changes follow the replay on the same stream.
    let r6 = s.put(&b, b"b2").await.unwrap();
    assert_eq!(
        next_batch(&mut w, "live").await,
        WatchBatch {
            revision: r6,
            events: vec![put_event(kv(&b, b"b2", r6, r6, 1))].into()
        }
    );

    // Starting in the middle skips exactly what came before.
    let mut mid = watch(f, f.all(), r3).await;
    assert_eq!(batches_through(&mut mid, r6, "from r3").await.len(), 4);
}

/// A prefix watch reports only keys under the prefix; a key watch only
/// that key; a txn touching keys inside and outside yields a batch with
/// just the inside events.
pub async fn watch_prefix_and_key_filtering(f: &Fixture) {
    let s = f.store();
    let mut pw = watch(f, KeyRange::prefix(f.key("w/")), 0).await;
    let mut kw = watch(f, KeyRange::key(f.key("w")), 0).await;
    let (w1, w2, w, wz, x) = (
        f.key("w/1"),
        f.key("w/2"),
        f.key("w"),
        f.key("wz"),
        f.key("x"),
    );

    let r1 = s.put(&w1, b"1").await.unwrap();
    s.put(&x, b"x").await.unwrap();
    let r3 = s.put(&w, b"w").await.unwrap();
    s.put(&wz, b"wz").await.unwrap();
    let t = s
        .txn(
            Txn::new()
                .put(x.clone(), "x2")
                .put(w2.clone(), "2")
                .put(w.clone(), "w2"),
        )
        .await
        .unwrap()
        .revision;
    let d = s
        .txn(Txn::new().delete(KeyRange::prefix(f.key("w"))))
        .await
        .unwrap();
    assert_eq!(d.deleted, 4);
    let d = d.revision;

    let prefix_batches = batches_through(&mut pw, d, "prefix watch").await;
    assert_eq!(
        prefix_batches,
        vec![
            WatchBatch {
                revision: r1,
                events: vec![put_event(kv(&w1, b"1", r1, r1, 1))].into()
            },
            WatchBatch {
                revision: t,
                events: vec![put_event(kv(&w2, b"2", t, t, 1))].into()
            },
            WatchBatch {
                revision: d,
                events: vec![delete_event(&w1, d), delete_event(&w2, d)].into()
            },
        ]
    );
    let key_batches = batches_through(&mut kw, d, "key watch").await;
    assert_eq!(
        key_batches,
        vec![
            WatchBatch {
                revision: r3,
                events: vec![put_event(kv(&w, b"w", r3, r3, 1))].into()
            },
            WatchBatch {
                revision: t,
                events: vec![put_event(kv(&w, b"w2", r3, t, 2))].into()
            },
            WatchBatch {
                revision: d,
                events: vec![delete_event(&w, d)].into()
            },
        ]
    );
    s.put(&x, b"x3").await.unwrap();
    s.put(&f.key("w2"), b"no").await.unwrap();
    let end = s.put(&f.key("w/end"), b"e").await.unwrap();
    assert_eq!(next_batch(&mut pw, "prefix sentinel").await.revision, end);
    let end = s.put(&w, b"again").await.unwrap();
    assert_eq!(next_batch(&mut kw, "key sentinel").await.revision, end);
}

/// Writes `n` revisions under `prefix` (some single puts, some two-key
/// txns); returns each revision's events.
async fn write_revisions(f: &Fixture, prefix: &str, n: usize) -> Vec<WatchBatch> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let k1 = f.key(format!("{prefix}{i:04}"));
        if i % 3 == 0 {
            let k2 = f.key(format!("{prefix}{i:04}b"));
            let r = f
                .store()
                .txn(Txn::new().put(k1.clone(), "v").put(k2.clone(), "w"))
                .await;
            let r = r.unwrap().revision;
            out.push(WatchBatch {
                revision: r,
                events: vec![
                    put_event(kv(&k1, b"v", r, r, 1)),
                    put_event(kv(&k2, b"w", r, r, 1)),
                ]
                .into(),
            });
        } else {
            let r = f.store().put(&k1, b"v").await.unwrap();
            out.push(WatchBatch {
                revision: r,
                events: vec![put_event(kv(&k1, b"v", r, r, 1))].into(),
            });
        }
    }
    out
}

/// A consumer that processed batches up to revision R and resumes from
/// R + 1 gets exactly the batches it missed: no gap, no duplicate.
pub async fn watch_resume_yields_exactly_missed_batches(f: &Fixture) {
    let mut first = watch(f, f.all(), 0).await;
    let mut written = write_revisions(f, "a", 10).await;
    let seen = batches_through(&mut first, written[3].revision, "first connection").await;
    assert_eq!(seen, written[..4].to_vec());
    drop(first);
    written.extend(write_revisions(f, "b", 10).await);
    let last = written.last().unwrap().revision;

    let resume_from = seen.last().unwrap().revision + 1;
    let mut resumed = watch(f, f.all(), resume_from).await;
    assert_eq!(
        batches_through(&mut resumed, last, "resumed").await,
        written[4..].to_vec()
    );

    // Resuming exactly at the next revision to come waits for it.
    let mut at_end = watch(f, f.all(), last + 1).await;
    let more = write_revisions(f, "c", 2).await;
    let got = batches_through(&mut resumed, more[1].revision, "resumed, live").await;
    assert_eq!(got, more);
    let got = batches_through(&mut at_end, more[1].revision, "from the end").await;
    assert_eq!(got, more);
}

/// A watcher that reads nothing while thousands of revisions commit still
/// gets every one of them, in order, exactly once; so does a watch opened
/// afterwards from the first of them.
pub async fn watch_lagging_far_behind(f: &Fixture) {
    const TASKS: usize = 16;
    const PER_TASK: usize = 320; // 5120 revisions: more than any live buffer.
    let mut lagging = watch(f, f.all(), 0).await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(f.store());
        let prefix = f.key(format!("t{t:02}/"));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let mut key = prefix.clone();
                key.extend_from_slice(format!("{i:04}").as_bytes());
                let r = store.put(&key, b"v").await.unwrap();
                acked.push((r, key));
            }
            acked
        }));
    }
    // Puts made at the same time may share a revision (group commit).
    let mut expected: BTreeMap<Revision, Vec<Event>> = BTreeMap::new();
    for task in tasks {
        for (r, key) in task.await.unwrap() {
            expected
                .entry(r)
                .or_default()
                .push(put_event(kv(&key, b"v", r, r, 1)));
        }
    }
    for events in expected.values_mut() {
        events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    }
    let first = *expected.keys().next().unwrap();
    let last = *expected.keys().next_back().unwrap();
    let got = batches_through(&mut lagging, last, "lagging watcher").await;
    assert_eq!(got.len(), expected.len());
    assert!(
        by_revision(got) == expected,
        "lagging watcher saw a different history"
    );
    let mut history = watch(f, f.all(), first).await;
    let got = batches_through(&mut history, last, "history watcher").await;
    assert!(
        by_revision(got) == expected,
        "history watcher saw a different history"
    );
}

/// Start revision 0 means "only changes after the watch was created".
pub async fn watch_from_zero_sees_only_future_changes(f: &Fixture) {
    let s = f.store();
    s.put(&f.key("before"), b"b").await.unwrap();
    s.txn(Txn::new().delete(KeyRange::key(f.key("before"))))
        .await
        .unwrap();
    let mut w = watch(f, f.all(), 0).await;
    let r = s.put(&f.key("after"), b"a").await.unwrap();
    assert_eq!(
        next_batch(&mut w, "first event").await,
        WatchBatch {
            revision: r,
            events: vec![put_event(kv(&f.key("after"), b"a", r, r, 1))].into()
        }
    );
    assert_quiet(&mut w, "after the only write").await;
}

// ---------------------------------------------------------------------------
// Compaction.

/// **Exclusive.** After compacting at C, a watch from below C yields
/// `Compacted` as its first item and ends; a watch from exactly C replays
/// from C; current values stay readable.
pub async fn compaction_watch_below_point_is_compacted(f: &Fixture) {
    let s = f.store();
    let (a, b, c) = (f.key("a"), f.key("b"), f.key("c"));
    let r1 = s.put(&a, b"1").await.unwrap();
    let r2 = s.put(&b, b"2").await.unwrap();
    let r3 = s.put(&a, b"3").await.unwrap();
    let r4 = s.put(&c, b"4").await.unwrap();
    s.compact(r3).await.unwrap();
    assert_eq!(s.status().await.unwrap().compacted_revision, r3);

    for below in [r1, r2] {
        let mut w = watch(f, f.all(), below).await;
        match next_item(&mut w, "watch below the compaction point").await {
            Some(Err(StoreError::Compacted {
                requested,
                compacted,
            })) => {
                assert_eq!((requested, compacted), (below, r3));
            }
            other => panic!("expected Compacted as first item, got {other:?}"),
        }
        assert!(
            next_item(&mut w, "after Compacted").await.is_none(),
            "stream ends after it"
        );
    }

    let mut at = watch(f, f.all(), r3).await;
    assert_eq!(
        batches_through(&mut at, r4, "watch at the compaction point").await,
        vec![
            WatchBatch {
                revision: r3,
                events: vec![put_event(kv(&a, b"3", r1, r3, 2))].into()
            },
            WatchBatch {
                revision: r4,
                events: vec![put_event(kv(&c, b"4", r4, r4, 1))].into()
            },
        ]
    );
    let r5 = s.put(&b, b"5").await.unwrap();
    assert_eq!(
        next_batch(&mut at, "live after compaction").await.revision,
        r5
    );
    let all = s.range(f.all()).await.unwrap();
    assert_eq!(
        all.kvs,
        vec![
            kv(&a, b"3", r1, r3, 2),
            kv(&b, b"5", r2, r5, 2),
            kv(&c, b"4", r4, r4, 1)
        ]
    );
}

/// **Exclusive.** Compacting a future revision fails with
/// `FutureRevision`; compacting at or below the compaction point fails with
/// `Compacted`; compacting at the current revision works.
pub async fn compaction_errors(f: &Fixture) {
    let s = f.store();
    let r1 = s.put(&f.key("k"), b"1").await.unwrap();
    let r2 = s.put(&f.key("k"), b"2").await.unwrap();
    let r3 = s.put(&f.key("k"), b"3").await.unwrap();
    match s.compact(r3 + 1).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (r3 + 1, r3));
        }
        other => panic!("compact of a future revision: expected FutureRevision, got {other:?}"),
    }
    assert!(matches!(
        s.compact(r3 + 1000).await,
        Err(StoreError::FutureRevision { .. })
    ));
    assert_eq!(
        s.status().await.unwrap().revision,
        r3,
        "a failed compact writes nothing"
    );
    s.compact(r2).await.unwrap();
    for again in [r2, r1] {
        match s.compact(again).await {
            Err(StoreError::Compacted { .. }) => {}
            other => panic!("compact at {again} after {r2}: expected Compacted, got {other:?}"),
        }
    }
    s.compact(r3).await.unwrap();
    let status = s.status().await.unwrap();
    assert_eq!((status.revision, status.compacted_revision), (r3, r3));
    let mut w = watch(f, f.all(), r3).await;
    assert_eq!(
        next_batch(&mut w, "watch at the newest compaction point")
            .await
            .revision,
        r3
    );
    let r4 = s.put(&f.key("k"), b"4").await.unwrap();
    assert_eq!(
        next_batch(&mut w, "write after compaction").await.revision,
        r4
    );
}

// ---------------------------------------------------------------------------
// Leases.

fn assert_lease_gone<T: Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("{what}: expected LeaseNotFound, got {other:?}"),
    }
}

fn delete_keys(batch: &WatchBatch) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = batch
        .events
        .iter()
        .map(|e| {
            assert_eq!(
                e.kind,
                EventKind::Delete,
                "only deletes expected in {batch:?}"
            );
            assert_eq!(e.kv.mod_revision, batch.revision);
            e.kv.key.clone()
        })
        .collect();
    keys.sort();
    keys
}

/// Grant, attach keys (in a multi-put txn and alone), revoke: every
/// attached key is deleted at one revision (one watch batch), unattached
/// keys stay, and the lease is gone afterwards. Revoking a lease without
/// keys emits nothing.
pub async fn lease_revoke_deletes_keys_at_one_revision(f: &Fixture) {
    let s = f.store();
    let lease = s.lease_grant(30).await.unwrap();
    assert_ne!(lease.id, 0);
    assert_eq!(lease.ttl_seconds, 30);
    let other = s.lease_grant(30).await.unwrap();
    assert_ne!(other.id, lease.id, "lease ids are unique");
    let info = s.lease_time_to_live(lease.id).await.unwrap();
    assert_eq!(info.granted_ttl_seconds, 30);
    assert!((25..=30).contains(&info.remaining_seconds), "{info:?}");

    let (a, b, c, free) = (f.key("a"), f.key("b"), f.key("c"), f.key("free"));
    let t = s
        .txn(
            Txn::new()
                .put_with_lease(a.clone(), "a", lease.id)
                .put_with_lease(b.clone(), "b", lease.id),
        )
        .await
        .unwrap();
    assert!(t.succeeded);
    s.txn(Txn::new().put_with_lease(c.clone(), "c", lease.id))
        .await
        .unwrap();
    s.put(&free, b"free").await.unwrap();
    let got = s.get(&a).await.unwrap().unwrap();
    assert_eq!((got.lease, got.mod_revision), (lease.id, t.revision));

    let mut w = watch(f, f.all(), 0).await;
    let revoked_at = s.lease_revoke(lease.id).await.unwrap();
    let batch = next_batch(&mut w, "revoke").await;
    assert_eq!(batch.revision, revoked_at);
    assert_eq!(delete_keys(&batch), vec![a.clone(), b.clone(), c.clone()]);
    for k in [&a, &b, &c] {
        assert_eq!(s.get(k).await.unwrap(), None);
    }
    assert!(s.get(&free).await.unwrap().is_some());
    assert_lease_gone(
        s.lease_time_to_live(lease.id).await,
        "ttl of a revoked lease",
    );
    assert_lease_gone(
        s.lease_keep_alive(lease.id).await,
        "keep-alive of a revoked lease",
    );
    assert_lease_gone(s.lease_revoke(lease.id).await, "second revoke");

    let r = s.lease_revoke(other.id).await.unwrap();
    assert!(r >= revoked_at);
    assert_next_is_sentinel(f, &mut w, "revoke of a lease without keys").await;
}

/// Keep-alive renews a lease for its full TTL: the remaining time goes up
/// and the keys outlive the original deadline.
pub async fn lease_keep_alive_extends(f: &Fixture) {
    let s = f.store();
    let granted = Instant::now();
    let lease = s.lease_grant(3).await.unwrap();
    let k = f.key("k");
    s.txn(Txn::new().put_with_lease(k.clone(), "v", lease.id))
        .await
        .unwrap();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = s.lease_time_to_live(lease.id).await.unwrap();
    assert_eq!(before.granted_ttl_seconds, 3);
    assert!(
        before.remaining_seconds <= 2,
        "{before:?} 1.5 s after a 3 s grant"
    );
    assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), 3);
    let after = s.lease_time_to_live(lease.id).await.unwrap();
    assert!(
        after.remaining_seconds >= 2,
        "{after:?} right after keep-alive"
    );
    assert!(
        after.remaining_seconds > before.remaining_seconds,
        "{before:?} -> {after:?}"
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), 3);
    // Well past the original deadline (3 s) plus expiry slack, yet within
    // the renewed one (3 s + 3 s).
    let until = granted + Duration::from_millis(4200);
    tokio::time::sleep_until(until.into()).await;
    let got = s.get(&k).await.unwrap();
    assert_eq!(
        got.map(|kv| kv.lease),
        Some(lease.id),
        "kept-alive key must still exist"
    );
    s.lease_revoke(lease.id).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), None);
}

/// An expired lease deletes all its keys at one revision (one watch
/// batch), not before its TTL; unattached keys stay; the lease is gone.
pub async fn lease_expiry_deletes_keys_at_one_revision(f: &Fixture) {
    let s = f.store();
    let granted = Instant::now();
    let lease = s.lease_grant(2).await.unwrap();
    let (a, b, c, free) = (f.key("a"), f.key("b"), f.key("c"), f.key("free"));
    s.txn(
        Txn::new()
            .put_with_lease(a.clone(), "a", lease.id)
            .put_with_lease(b.clone(), "b", lease.id),
    )
    .await
    .unwrap();
    s.txn(
        Txn::new()
            .put_with_lease(c.clone(), "c", lease.id)
            .put(free.clone(), "free"),
    )
    .await
    .unwrap();
    let mut w = watch(f, f.all(), 0).await;
    let batch = within(
        "lease expiry",
        Duration::from_secs(2) + EXPIRY_SLACK,
        next_batch(&mut w, "expiry"),
    )
    .await;
    let elapsed = granted.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "expired after {elapsed:?}, TTL is 2 s"
    );
    assert_eq!(delete_keys(&batch), vec![a.clone(), b.clone(), c.clone()]);
    for k in [&a, &b, &c] {
        assert_eq!(s.get(k).await.unwrap(), None);
    }
    assert!(s.get(&free).await.unwrap().is_some());
    assert_lease_gone(
        s.lease_time_to_live(lease.id).await,
        "ttl of an expired lease",
    );
    assert_lease_gone(
        s.lease_keep_alive(lease.id).await,
        "keep-alive of an expired lease",
    );
    assert_lease_gone(
        s.txn(Txn::new().put_with_lease(a.clone(), "again", lease.id))
            .await,
        "put with an expired lease",
    );
    assert_next_is_sentinel(f, &mut w, "after expiry").await;
}

/// A revoked (hence unknown) lease id; never reused by the backend.
async fn dead_lease(f: &Fixture) -> LeaseId {
    let lease = f.store().lease_grant(10).await.unwrap();
    f.store().lease_revoke(lease.id).await.unwrap();
    lease.id
}

/// A put naming an unknown lease fails with `LeaseNotFound` and writes
/// nothing, not even the txn's other ops.
pub async fn lease_unknown_put_writes_nothing(f: &Fixture) {
    let s = f.store();
    let dead = dead_lease(f).await;
    let (a, b) = (f.key("a"), f.key("b"));
    s.put(&b, b"old").await.unwrap();
    let mut w = watch(f, f.all(), 0).await;
    assert_lease_gone(
        s.txn(Txn::new().put_with_lease(a.clone(), "a", dead)).await,
        "put",
    );
    assert_lease_gone(
        s.txn(
            Txn::new()
                .put(b.clone(), "new")
                .put_with_lease(a.clone(), "a", dead),
        )
        .await,
        "txn with a good and a bad put",
    );
    assert_lease_gone(
        s.txn(
            Txn::new()
                .when(Compare::exists(b.clone()))
                .put_with_lease(a.clone(), "a", dead),
        )
        .await,
        "guarded put whose compare holds",
    );
    assert_eq!(s.get(&a).await.unwrap(), None);
    assert_eq!(s.get(&b).await.unwrap().unwrap().value, b"old");
    assert_lease_gone(s.lease_keep_alive(dead).await, "keep-alive");
    assert_next_is_sentinel(f, &mut w, "puts with an unknown lease").await;
}

/// As in etcd, the ops of a txn are checked only when they are applied: a
/// put naming an unknown lease behind a compare that fails is no error,
/// just a failed txn.
pub async fn lease_checked_only_when_compares_hold(f: &Fixture) {
    let s = f.store();
    let dead = dead_lease(f).await;
    let a = f.key("a");
    let resp = s
        .txn(
            Txn::new()
                .when(Compare::exists(f.key("missing")))
                .put_with_lease(a.clone(), "a", dead),
        )
        .await;
    match resp {
        Ok(r) => assert!(!r.succeeded),
        Err(e) => panic!("expected a failed txn, got error {e}"),
    }
    assert_eq!(s.get(&a).await.unwrap(), None);
}

/// Re-putting a key without a lease (or with another lease) detaches it:
/// revoking the old lease no longer deletes it.
pub async fn lease_reput_without_lease_detaches(f: &Fixture) {
    let s = f.store();
    let first = s.lease_grant(30).await.unwrap();
    let second = s.lease_grant(30).await.unwrap();
    let (plain, moved, stays, recreated) = (
        f.key("plain"),
        f.key("moved"),
        f.key("stays"),
        f.key("recreated"),
    );
    for k in [&plain, &moved, &stays, &recreated] {
        s.txn(Txn::new().put_with_lease(k.clone(), "leased", first.id))
            .await
            .unwrap();
    }
    s.put(&plain, b"no lease").await.unwrap();
    assert_eq!(s.get(&plain).await.unwrap().unwrap().lease, 0);
    s.txn(Txn::new().put_with_lease(moved.clone(), "second", second.id))
        .await
        .unwrap();
    assert_eq!(s.get(&moved).await.unwrap().unwrap().lease, second.id);
    s.delete(KeyRange::key(recreated.clone())).await.unwrap();
    s.put(&recreated, b"fresh").await.unwrap();

    let mut w = watch(f, f.all(), 0).await;
    let r = s.lease_revoke(first.id).await.unwrap();
    let batch = next_batch(&mut w, "revoke of the first lease").await;
    assert_eq!(batch.revision, r);
    assert_eq!(delete_keys(&batch), vec![stays.clone()]);
    assert_eq!(s.get(&plain).await.unwrap().unwrap().value, b"no lease");
    assert_eq!(s.get(&recreated).await.unwrap().unwrap().value, b"fresh");
    assert!(s.get(&moved).await.unwrap().is_some());

    let r = s.lease_revoke(second.id).await.unwrap();
    let batch = next_batch(&mut w, "revoke of the second lease").await;
    assert_eq!(batch.revision, r);
    assert_eq!(delete_keys(&batch), vec![moved.clone()]);
    assert!(s.get(&plain).await.unwrap().is_some());
}

// ---------------------------------------------------------------------------
// Concurrency.

/// N tasks × M writes (puts and two-key txns) at once: revisions of one
/// writer strictly increase, and watches (live from before, and from history
/// afterwards) see every acknowledged write exactly once, in revision order,
/// at its acknowledged revision. Transactions committed together (the etcd
/// backend's group commit) share a revision and arrive in one batch.
pub async fn concurrent_writers_watch_sees_every_write_once(f: &Fixture) {
    const TASKS: usize = 8;
    const WRITES: usize = 40;
    let mut live = watch(f, f.all(), 0).await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(f.store());
        let prefix = f.key(format!("t{t}/"));
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(Revision, Vec<Vec<u8>>, String)> = Vec::new();
            for i in 0..WRITES {
                let key = |s: &str| {
                    let mut k = prefix.clone();
                    k.extend_from_slice(format!("{i:03}{s}").as_bytes());
                    k
                };
                let mut txn = Txn::new().put(key(""), format!("{t}-{i}"));
                let mut keys = vec![key("")];
                if i % 4 == 1 {
                    txn = txn.put(key("b"), format!("{t}-{i}"));
                    keys.push(key("b"));
                }
                let resp = store.txn(txn).await.unwrap();
                assert!(resp.succeeded);
                if let Some((prev, _, _)) = acked.last() {
                    assert!(resp.revision > *prev, "one writer's revisions went back");
                }
                acked.push((resp.revision, keys, format!("{t}-{i}")));
            }
            acked
        }));
    }
    let mut expected: BTreeMap<Revision, Vec<Event>> = BTreeMap::new();
    for task in tasks {
        for (r, keys, value) in task.await.unwrap() {
            let events = expected.entry(r).or_default();
            for k in keys {
                events.push(put_event(kv(&k, value.as_bytes(), r, r, 1)));
            }
        }
    }
    let writes: usize = expected.values().map(Vec::len).sum();
    assert_eq!(writes, TASKS * (WRITES + WRITES / 4));
    let first = *expected.keys().next().unwrap();
    let last = *expected.keys().next_back().unwrap();
    for events in expected.values_mut() {
        events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
    }
    let seen = batches_through(&mut live, last, "live watch").await;
    assert_eq!(by_revision(seen), expected);
    let mut history = watch(f, f.all(), first).await;
    let seen = batches_through(&mut history, last, "history watch").await;
    assert_eq!(by_revision(seen), expected);
    assert_quiet(&mut live, "after all writes").await;
}

/// Many transactions at once, each with its own compares: every one gets
/// the outcome it would get alone (the compares that hold commit, those
/// that do not write nothing, delete counts are its own), a put naming an
/// unknown lease fails alone, and nothing else is written.
pub async fn concurrent_transactions_keep_their_own_outcomes(f: &Fixture) {
    const N: usize = 48;
    let store = f.store();
    for i in 0..N {
        store.put(&f.key(format!("k{i:02}")), b"0").await.unwrap();
        store.put(&f.key(format!("d{i:02}/a")), b"x").await.unwrap();
        store.put(&f.key(format!("d{i:02}/b")), b"x").await.unwrap();
    }
    let bogus_lease: LeaseId = 0x7eed_5eed_0bad_1dea;
    let mut live = watch(f, f.all(), 0).await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let store = Arc::clone(store);
        let key = f.key(format!("k{i:02}"));
        let dir = f.key(format!("d{i:02}/"));
        tasks.push(tokio::spawn(async move {
            // Even i: the compare holds. Odd i: it does not. Every 7th
            // names a lease that does not exist.
            let expect = if i % 2 == 0 { b"0".as_slice() } else { b"1" };
            let lease = if i % 7 == 3 { bogus_lease } else { 0 };
            let txn = Txn::new()
                .when(Compare::value_equals(key.clone(), expect))
                .put_with_lease(key.clone(), format!("w{i}"), lease)
                .delete(KeyRange::prefix(dir));
            (i, lease, store.txn(txn).await)
        }));
    }
    let mut committed = BTreeMap::new();
    for task in tasks {
        let (i, lease, result) = task.await.unwrap();
        match result {
            Ok(resp) if i % 2 == 0 && lease == 0 => {
                assert!(resp.succeeded, "txn {i}");
                assert_eq!(resp.deleted, 2, "txn {i} deletes its own two keys");
                committed.insert(i, resp.revision);
            }
            Ok(resp) if i % 2 == 1 => {
                assert!(!resp.succeeded, "txn {i}: its compare does not hold");
                assert_eq!(resp.deleted, 0, "txn {i}");
            }
            Err(StoreError::LeaseNotFound(l)) if i % 2 == 0 && lease != 0 => {
                assert_eq!(l, bogus_lease, "txn {i}");
            }
            other => panic!("txn {i} (lease {lease:x}): unexpected {other:?}"),
        }
    }
    for i in 0..N {
        let value = store
            .get(&f.key(format!("k{i:02}")))
            .await
            .unwrap()
            .unwrap();
        let left = store
            .range(KeyRange::prefix(f.key(format!("d{i:02}/"))))
            .await
            .unwrap()
            .kvs
            .len();
        if let Some(&revision) = committed.get(&i) {
            assert_eq!(value.value, format!("w{i}").into_bytes(), "k{i:02}");
            assert_eq!(value.mod_revision, revision, "k{i:02}");
            assert_eq!(left, 0, "d{i:02}/");
        } else {
            assert_eq!(value.value, b"0", "k{i:02} was written");
            assert_eq!(left, 2, "d{i:02}/ was deleted");
        }
    }
    // The watch shows exactly the committed transactions' events.
    let last = *committed.values().max().unwrap();
    let mut seen = BTreeMap::new();
    for batch in batches_through(&mut live, last, "outcomes").await {
        for event in batch.events.iter() {
            assert!(
                seen.insert(show(&event.kv.key), batch.revision).is_none(),
                "{} changed twice",
                show(&event.kv.key)
            );
        }
    }
    let mut expected = BTreeMap::new();
    for (i, revision) in &committed {
        for k in [
            format!("k{i:02}"),
            format!("d{i:02}/a"),
            format!("d{i:02}/b"),
        ] {
            expected.insert(show(&f.key(k)), *revision);
        }
    }
    assert_eq!(seen, expected);
    assert_next_is_sentinel(f, &mut live, "after the outcomes").await;
}

/// Concurrent compare-and-swap increments (guarded by mod revision) never
/// lose an update: the counter ends at the number of successful swaps and
/// the watch shows every value once, in order.
pub async fn concurrent_compare_and_swap_loses_no_update(f: &Fixture) {
    const TASKS: usize = 4;
    const INCREMENTS: usize = 15;
    const MAX_ATTEMPTS: usize = 10_000;
    let counter = f.key("counter");
    let start = f.store().put(&counter, b"0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(f.store());
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            for _ in 0..MAX_ATTEMPTS {
                if done == INCREMENTS {
                    break;
                }
                let cur = store.get(&counter).await.unwrap().unwrap();
                let n: u64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                let swap = Txn::new()
                    .when(Compare::mod_revision(
                        counter.clone(),
                        CompareOp::Equal,
                        cur.mod_revision,
                    ))
                    .put(counter.clone(), (n + 1).to_string());
                if store.txn(swap).await.unwrap().succeeded {
                    done += 1;
                }
            }
            assert_eq!(
                done, INCREMENTS,
                "no progress after {MAX_ATTEMPTS} attempts"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = TASKS * INCREMENTS;
    let end = f.store().get(&counter).await.unwrap().unwrap();
    assert_eq!(end.value, total.to_string().as_bytes());
    assert_eq!(end.version, i64::try_from(total).unwrap() + 1);
    let mut w = watch(f, KeyRange::key(counter.clone()), start + 1).await;
    let batches = batches_through(&mut w, end.mod_revision, "counter history").await;
    let values: Vec<String> = batches
        .iter()
        .map(|b| String::from_utf8_lossy(&b.events[0].kv.value).into_owned())
        .collect();
    let expected: Vec<String> = (1..=total).map(|n| n.to_string()).collect();
    assert_eq!(values, expected);
}
