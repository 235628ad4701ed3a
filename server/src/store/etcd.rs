//! The etcd backend: the [`Store`] trait mapped onto the etcd v3 API with
//! `etcd-client`.
//!
//! The trait was modelled on etcd, so most calls are one request: `range`
//! is a range request (paged, at one revision), `txn` a txn request with the
//! same compares, leases are etcd leases and revisions are etcd's own. What
//! needs more than a mapping:
//!
//! - **Key prefix** — every key is stored under [`EtcdOptions::prefix`], so
//!   several installations (or test runs) can share one cluster; callers
//!   never see it.
//! - **Failover** — one client per endpoint. A request goes to the current
//!   endpoint; when that one cannot be reached the next is tried, within
//!   [`EtcdOptions::request_timeout`]. A request that may have reached etcd
//!   (the connection broke mid-call) is retried only when repeating it is
//!   harmless (reads, keep-alives, grants); a write whose outcome is unknown
//!   fails with [`StoreError::Unavailable`] instead of being applied twice.
//! - **Watch** — one etcd watch per call. Events arrive grouped by revision
//!   (etcd never splits a revision across responses unless asked to), and
//!   become one [`WatchBatch`] each. When the stream breaks, the watch is
//!   re-created from the revision after the last batch delivered, on
//!   whichever endpoint answers, so the consumer sees neither a gap nor a
//!   duplicate; only when no endpoint answers for the request timeout does
//!   the stream end with `Unavailable`, and the consumer resumes itself.
//!   etcd's compacted response becomes [`StoreError::Compacted`].
//! - **Compacted revision** — etcd does not report it. A read at revision
//!   `r` fails as compacted exactly when `r` is below the compaction point,
//!   so [`Store::status`] finds the point by bisection from the last one seen
//!   (which compaction never lowers): one read when nothing changed.
//! - **Group commit** — transactions issued at the same time go to etcd as
//!   the nested transactions of one request, without changing any result
//!   (see `store/etcd/batch.rs`).

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client as etcd;
use tonic::Code;

mod batch;

use super::{
    CompareOp, CompareTarget, Event, EventKind, KeyRange, KeyValue, Lease, LeaseId, LeaseInfo,
    RangeResponse, Revision, Store, StoreError, StoreStatus, Txn, TxnOp, TxnResponse, WatchBatch,
    WatchStream,
};

/// Default limit for one store call, failover to other endpoints included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for opening a connection to one endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default limit for one attempt at one endpoint. etcd itself gives up on a
/// proposal only after 5 s plus two election timeouts (a write that reached
/// a follower just as the leader died waits that long); answering sooner
/// lets a reader try the next endpoint, and a writer report the unknown
/// outcome, while the cluster elects a new leader.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd's default limit on one request (`--max-request-bytes`).
pub const ETCD_DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// The default largest config value when the store is etcd. A config write
/// carries its value twice (the layer and its history version) in one
/// transaction, so values up to `limits.max_value_bytes` fit in etcd's
/// default 1.5 MiB request limit only when that is well under half of it:
/// 512 KiB leaves room for the keys, records and history pruning of the
/// write. Larger values need etcd's `--max-request-bytes` raised, and
/// `limits.max_value_bytes` set explicitly.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 512 * 1024;
/// Bytes a config write needs besides twice its value (keys, records,
/// compares and pruned versions), for [`request_bytes_for_value`].
const WRITE_OVERHEAD_BYTES: usize = 64 * 1024;

/// The etcd request limit (`--max-request-bytes`) a config write of a
/// `value_bytes`-byte value needs, rounded up to a whole MiB.
pub fn request_bytes_for_value(value_bytes: usize) -> usize {
    const MIB: usize = 1024 * 1024;
    (2 * value_bytes + WRITE_OVERHEAD_BYTES).div_ceil(MIB) * MIB
}

/// Keys per range request; larger ranges are read in pages at one revision
/// so that neither etcd nor the daemon builds one huge message.
const RANGE_PAGE: i64 = 1000;
/// Largest message accepted from etcd (a page of large values, or a watch
/// response catching up on up to 1000 revisions).
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;
/// Upper bound on attempts of one call, whatever the timeout.
const MAX_ATTEMPTS: usize = 64;
/// Restarts of a paged range whose revision was compacted mid-read.
const RANGE_RESTARTS: usize = 3;

/// TLS settings for the etcd connection (rustls). The endpoints must be
/// `https://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file with the CA certificate(s) that signed the etcd server
    /// certificates (no platform roots are built in).
    pub ca_file: PathBuf,
    /// PEM client certificate, for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// User and password for etcd's authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The etcd user.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password must never reach logs.
        f.debug_struct("EtcdAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How to reach the etcd cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs of the members (`http://host:2379`, or `https://…` with TLS).
    pub endpoints: Vec<String>,
    /// Prefix of every key this store reads or writes.
    pub prefix: Vec<u8>,
    /// TLS, when the endpoints are `https://`.
    pub tls: Option<EtcdTls>,
    /// Authentication, when etcd has it enabled.
    pub auth: Option<EtcdAuth>,
    /// Limit for opening a connection to one endpoint.
    pub connect_timeout: Duration,
    /// Limit for one store call, failover included.
    pub request_timeout: Duration,
    /// Limit for one attempt of a call at one endpoint.
    pub attempt_timeout: Duration,
}

impl EtcdOptions {
    /// Options for these endpoints, without prefix, TLS or auth.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: Vec::new(),
            tls: None,
            auth: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// Stores every key under `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// The etcd-backed store (see the module documentation).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
    commits: Arc<batch::GroupCommit>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.urls())
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .finish_non_exhaustive()
    }
}

struct Member {
    url: String,
    client: tokio::sync::OnceCell<etcd::Client>,
}

struct Inner {
    members: Vec<Member>,
    /// Index of the endpoint calls go to; moves on when it fails.
    current: AtomicUsize,
    prefix: Vec<u8>,
    connect: etcd::ConnectOptions,
    connect_timeout: Duration,
    request_timeout: Duration,
    attempt_timeout: Duration,
    /// Highest compaction point seen; etcd's only grows.
    compacted: AtomicI64,
}

/// Why one attempt of a call failed.
enum Attempt {
    /// The request never reached etcd (no connection, or etcd refused it
    /// before doing anything): always safe to try the next endpoint.
    NotSent(String),
    /// The request may or may not have been applied.
    Unknown(String),
    /// etcd answered with an error; trying elsewhere would not help.
    Rejected(tonic::Status),
    /// A client-side failure unrelated to the endpoint.
    Broken(String),
}

/// A call that failed for good.
enum CallError {
    /// etcd answered with this error (the caller maps it to a [`StoreError`]).
    Rejected(tonic::Status),
    /// Already mapped.
    Store(StoreError),
}

/// Whether a call may be repeated after an attempt with unknown outcome.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Repeating is harmless (reads, keep-alives, grants).
    Safe,
    /// Repeating could apply a write twice.
    Unsafe,
}

fn classify(error: etcd::Error) -> Attempt {
    match error {
        etcd::Error::GRpcStatus(status) => classify_status(status),
        etcd::Error::TransportError(e) => Attempt::NotSent(e.to_string()),
        etcd::Error::IoError(e) => Attempt::Unknown(e.to_string()),
        etcd::Error::WatchError(e) | etcd::Error::LeaseKeepAliveError(e) => Attempt::Unknown(e),
        other => Attempt::Broken(other.to_string()),
    }
}

fn classify_status(status: tonic::Status) -> Attempt {
    let message = status.message().to_owned();
    // etcd rejects these before proposing anything to raft.
    const REFUSED: [&str; 3] = [
        "etcdserver: no leader",
        "etcdserver: not capable",
        "etcdserver: too many requests",
    ];
    if REFUSED.iter().any(|m| message.contains(m)) {
        return Attempt::NotSent(message);
    }
    match status.code() {
        // tonic reports a connection that could not be opened this way; the
        // request was never written.
        Code::Unavailable if is_connect_failure(&message) => Attempt::NotSent(message),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
            Attempt::Unknown(format!("{}: {message}", status.code()))
        }
        Code::Unknown if message.contains("transport") || message.contains("h2") => {
            Attempt::Unknown(message)
        }
        _ => Attempt::Rejected(status),
    }
}

fn is_connect_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("connect") || m.contains("connection refused") || m.contains("dns error")
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix); `[0]` ("to the end") when no such key exists.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn etcd_op(op: CompareOp) -> etcd::CompareOp {
    match op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Less => etcd::CompareOp::Less,
        CompareOp::Greater => etcd::CompareOp::Greater,
    }
}

/// The first lease a transaction's puts name (for `LeaseNotFound`).
fn first_lease(txn: &Txn) -> LeaseId {
    txn.ops
        .iter()
        .find_map(|op| match op {
            TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether etcd refused a request for its size: over `--max-request-bytes`
/// ("request is too large"), or so far over that its gRPC server would not
/// even read it (the limit plus 512 KiB: "received message larger than max").
fn is_too_large(status: &tonic::Status) -> bool {
    let message = status.message();
    message.contains("request is too large")
        || (status.code() == Code::ResourceExhausted && message.contains("larger than max"))
}

fn is_lease_not_found(message: &str) -> bool {
    message.contains("lease not found")
}

/// Keys the deletes of a transaction removed.
fn deleted_count(resp: &etcd::TxnResponse) -> i64 {
    resp.op_responses()
        .iter()
        .map(|r| match r {
            etcd::TxnOpResponse::Delete(d) => d.deleted(),
            _ => 0,
        })
        .sum()
}

fn header_revision(header: Option<&etcd::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(etcd::ResponseHeader::revision)
        .ok_or_else(|| StoreError::Backend("etcd response without header".into()))
}

impl Inner {
    fn urls(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.url.as_str()).collect()
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    /// The etcd key and range end of `range` (an empty end: one key).
    fn etcd_range(&self, range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
        match range {
            KeyRange::Key(k) => (self.full_key(k), Vec::new()),
            KeyRange::Prefix(p) => {
                let full = self.full_key(p);
                if full.is_empty() {
                    // Every key: from the smallest possible key to the end.
                    (vec![0], vec![0])
                } else {
                    let end = prefix_end(&full);
                    (full, end)
                }
            }
        }
    }

    fn strip<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        key.strip_prefix(self.prefix.as_slice())
    }

    fn key_value(&self, kv: &etcd::KeyValue) -> Option<KeyValue> {
        Some(KeyValue {
            key: self.strip(kv.key())?.to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        })
    }

    fn event(&self, event: &etcd::Event) -> Option<Event> {
        let kv = event.kv()?;
        match event.event_type() {
            etcd::EventType::Put => Some(Event {
                kind: EventKind::Put,
                kv: self.key_value(kv)?,
            }),
            etcd::EventType::Delete => Some(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: self.strip(kv.key())?.to_vec(),
                    mod_revision: kv.mod_revision(),
                    ..KeyValue::default()
                },
            }),
        }
    }

    /// The client of endpoint `index`, connecting it first if needed (with
    /// auth, connecting already asks etcd for a token).
    async fn client(&self, index: usize) -> Result<etcd::Client, Attempt> {
        let member = &self.members[index];
        let connect = async {
            match tokio::time::timeout(
                self.connect_timeout,
                etcd::Client::connect([member.url.as_str()], Some(self.connect.clone())),
            )
            .await
            {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(etcd::Error::GRpcStatus(status)))
                    if matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::Unauthenticated
                            | Code::PermissionDenied
                            | Code::FailedPrecondition
                    ) =>
                {
                    // Wrong credentials, or auth not enabled: every
                    // endpoint would say the same.
                    Err(Attempt::Broken(format!(
                        "authentication failed: {}",
                        status.message()
                    )))
                }
                Ok(Err(e)) => Err(Attempt::NotSent(e.to_string())),
                Err(_) => Err(Attempt::NotSent(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                ))),
            }
        };
        member.client.get_or_try_init(|| connect).await.cloned()
    }

    /// Runs `op` against the current endpoint, moving on to the next ones
    /// when it cannot be reached (see the module documentation).
    async fn call<T, F, Fut>(&self, what: &str, repeat: Repeat, mut op: F) -> Result<T, CallError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let count = self.members.len();
        let mut last = String::from("no attempt made");
        let mut backoff = Duration::from_millis(25);
        for attempt in 0..MAX_ATTEMPTS {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let limit = remaining.min(self.attempt_timeout);
            let index = self.current.load(Ordering::Relaxed) % count;
            let outcome = match self.client(index).await {
                Err(e) => e,
                Ok(client) => match tokio::time::timeout(limit, op(client)).await {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(e)) => classify(e),
                    Err(_) => Attempt::Unknown(format!("no answer within {limit:?}")),
                },
            };
            let url = &self.members[index].url;
            let unknown = matches!(outcome, Attempt::Unknown(_));
            match outcome {
                Attempt::Rejected(status) => return Err(CallError::Rejected(status)),
                Attempt::Broken(e) => {
                    return Err(CallError::Store(StoreError::Backend(format!(
                        "etcd {what} via {url}: {e}"
                    ))));
                }
                Attempt::Unknown(e) | Attempt::NotSent(e) => {
                    tracing::debug!(endpoint = %url, error = %e, "etcd {what} failed");
                    last = format!("{url}: {e}");
                    // This endpoint failed: later calls start at the next
                    // one (unless another call already moved on).
                    let _ = self.current.compare_exchange(
                        index,
                        (index + 1) % count,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if repeat == Repeat::Unsafe && unknown {
                        return Err(CallError::Store(StoreError::Unavailable(format!(
                            "etcd {what} via {last} (it may or may not have been applied)"
                        ))));
                    }
                }
            }
            if (attempt + 1) % count == 0 {
                // Every endpoint failed once in this round: give the cluster
                // a moment (a leader election takes about a second).
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        Err(CallError::Store(StoreError::Unavailable(format!(
            "etcd {what} failed at every endpoint ({}) within {:?}; last error: {last}",
            self.urls().join(", "),
            self.request_timeout
        ))))
    }

    /// Maps an error etcd answered with; `lease` is the lease the request
    /// named (for `LeaseNotFound`).
    fn rejected(&self, what: &str, status: &tonic::Status, lease: LeaseId) -> StoreError {
        let message = status.message();
        if is_lease_not_found(message) {
            return StoreError::LeaseNotFound(lease);
        }
        if is_too_large(status) {
            // etcd's limit is its own setting; say which one, and ours.
            return StoreError::InvalidTxn(format!(
                "etcd refused the {what} as larger than its request limit ({message}); \
                 a config write carries its value twice (layer and history), so raise \
                 etcd's --max-request-bytes (1.5 MiB by default) or lower stratad's \
                 limits.max_value_bytes; nothing was written"
            ));
        }
        const INVALID: [&str; 5] = [
            "duplicate key given in txn request",
            "too many operations in txn request",
            "key is not provided",
            "requested lease TTL is too large",
            "invalid",
        ];
        if INVALID.iter().any(|m| message.contains(m)) {
            return StoreError::InvalidTxn(format!("etcd rejected the {what}: {message}"));
        }
        StoreError::Backend(format!("etcd {what}: {} ({})", message, status.code()))
    }

    fn lift<T>(
        &self,
        what: &str,
        lease: LeaseId,
        r: Result<T, CallError>,
    ) -> Result<T, StoreError> {
        r.map_err(|e| match e {
            CallError::Store(e) => e,
            CallError::Rejected(status) => self.rejected(what, &status, lease),
        })
    }

    /// The latest revision of the cluster.
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let key = if self.prefix.is_empty() {
            vec![0]
        } else {
            self.prefix.clone()
        };
        let resp = self
            .call("read", Repeat::Safe, |client| {
                let key = key.clone();
                async move {
                    client
                        .kv_client()
                        .get(key, Some(etcd::GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await;
        let resp = self.lift("read", 0, resp)?;
        header_revision(resp.header())
    }

    /// Whether history at `revision` is still there (a read at a revision
    /// below the compaction point fails as compacted).
    async fn readable_at(&self, revision: Revision) -> Result<bool, StoreError> {
        let key = self.full_key(b"\0strata-compaction-probe");
        let resp = self
            .call("compaction probe", Repeat::Safe, |client| {
                let key = key.clone();
                async move {
                    client
                        .kv_client()
                        .get(
                            key,
                            Some(
                                etcd::GetOptions::new()
                                    .with_count_only()
                                    .with_revision(revision),
                            ),
                        )
                        .await
                }
            })
            .await;
        match resp {
            Ok(_) => Ok(true),
            Err(CallError::Rejected(status)) if status.message().contains("compacted") => Ok(false),
            other => self.lift("compaction probe", 0, other).map(|_| true),
        }
    }

    /// The compaction point at `current` (0 when nothing was compacted).
    async fn compacted_revision(&self, current: Revision) -> Result<Revision, StoreError> {
        let known = self.compacted.load(Ordering::Relaxed);
        let low = known.max(1);
        if low > current || self.readable_at(low).await? {
            // The point never moves down, and history at `known` is still
            // there: nothing was compacted since.
            return Ok(known);
        }
        // History at `low` is gone and at `current` it is not: find the
        // first readable revision in (low, current].
        let (mut gone, mut there) = (low, current);
        while there - gone > 1 {
            let mid = gone + (there - gone) / 2;
            if self.readable_at(mid).await? {
                there = mid;
            } else {
                gone = mid;
            }
        }
        self.compacted.fetch_max(there, Ordering::Relaxed);
        Ok(there)
    }

    /// One page of a range at `revision` (0: the latest).
    async fn range_page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: Revision,
    ) -> Result<etcd::GetResponse, CallError> {
        let mut options = etcd::GetOptions::new().with_limit(RANGE_PAGE);
        if !end.is_empty() {
            options = options.with_range(end.to_vec());
        }
        if revision > 0 {
            options = options.with_revision(revision);
        }
        self.call("range", Repeat::Safe, |client| {
            let (from, options) = (from.to_vec(), options.clone());
            async move {
                client
                    .kv_client()
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .get(from, Some(options))
                    .await
            }
        })
        .await
    }

    async fn range(&self, range: &KeyRange) -> Result<RangeResponse, StoreError> {
        let (key, end) = self.etcd_range(range);
        'restart: for _ in 0..RANGE_RESTARTS {
            let mut kvs = Vec::new();
            let mut revision: Revision = 0;
            let mut from = key.clone();
            loop {
                let page = match self.range_page(&from, &end, revision).await {
                    Ok(page) => page,
                    // The revision the first page pinned was compacted
                    // while later pages were read: read again.
                    Err(CallError::Rejected(s))
                        if revision > 0 && s.message().contains("compacted") =>
                    {
                        continue 'restart;
                    }
                    Err(e) => return self.lift("range", 0, Err(e)),
                };
                if revision == 0 {
                    revision = header_revision(page.header())?;
                }
                kvs.extend(page.kvs().iter().filter_map(|kv| self.key_value(kv)));
                let Some(last) = page.kvs().last() else {
                    break;
                };
                if !page.more() || end.is_empty() {
                    break;
                }
                from = last.key().to_vec();
                from.push(0);
            }
            return Ok(RangeResponse { kvs, revision });
        }
        Err(StoreError::Unavailable(
            "etcd range: history was compacted faster than the range could be read".into(),
        ))
    }

    /// Sends `txn` as one plain etcd transaction.
    async fn txn_alone(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        let request = self.etcd_txn(txn);
        let resp = self
            .call("txn", Repeat::Unsafe, |client| {
                let request = request.clone();
                async move { client.kv_client().txn(request).await }
            })
            .await;
        let resp = self.lift("txn", first_lease(txn), resp)?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
            deleted: deleted_count(&resp),
        })
    }

    fn etcd_txn(&self, txn: &Txn) -> etcd::Txn {
        let compares: Vec<etcd::Compare> = txn
            .compares
            .iter()
            .map(|c| {
                let key = self.full_key(&c.key);
                let op = etcd_op(c.op);
                match &c.target {
                    CompareTarget::Value(v) => etcd::Compare::value(key, op, v.clone()),
                    CompareTarget::Version(v) => etcd::Compare::version(key, op, *v),
                    CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(key, op, *r),
                    CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(key, op, *r),
                }
            })
            .collect();
        let ops: Vec<etcd::TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, lease } => {
                    let options = (*lease != 0).then(|| etcd::PutOptions::new().with_lease(*lease));
                    etcd::TxnOp::put(self.full_key(key), value.clone(), options)
                }
                TxnOp::Delete(range) => {
                    let (key, end) = self.etcd_range(range);
                    let options =
                        (!end.is_empty()).then(|| etcd::DeleteOptions::new().with_range(end));
                    etcd::TxnOp::delete(key, options)
                }
            })
            .collect();
        etcd::Txn::new().when(compares).and_then(ops)
    }
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers; fails with
    /// [`StoreError::Unavailable`] when no endpoint does within the request
    /// timeout.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let mut connect = etcd::ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(options.connect_timeout)
            // Notices a dead member under an open watch; etcd refuses pings
            // more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_auto_token_refresh(true);
        if let Some(auth) = &options.auth {
            connect = connect.with_user(auth.username.clone(), auth.password.clone());
        }
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls_options(tls)?);
        }
        let inner = Inner {
            members: options
                .endpoints
                .iter()
                .map(|url| Member {
                    url: url.trim().to_owned(),
                    client: tokio::sync::OnceCell::new(),
                })
                .collect(),
            current: AtomicUsize::new(0),
            prefix: options.prefix.clone(),
            connect,
            connect_timeout: options.connect_timeout,
            request_timeout: options.request_timeout,
            attempt_timeout: options.attempt_timeout,
            compacted: AtomicI64::new(0),
        };
        let inner = Arc::new(inner);
        let store = Self {
            commits: Arc::new(batch::GroupCommit::start(inner.clone())),
            inner,
        };
        store.inner.current_revision().await.map_err(|e| match e {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("cannot reach etcd: {m}"))
            }
            other => StoreError::Unavailable(format!("etcd is not usable: {other}")),
        })?;
        Ok(store)
    }

    /// The client URLs this store was given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.members.iter().map(|m| m.url.clone()).collect()
    }
}

fn tls_options(tls: &EtcdTls) -> Result<etcd::TlsOptions, StoreError> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot read etcd {what} {}: {e}", path.display()))
        })
    };
    let mut options = etcd::TlsOptions::new()
        .ca_certificate(etcd::Certificate::from_pem(read("CA file", &tls.ca_file)?));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            options = options.identity(etcd::Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Unavailable(
                "etcd client certificate and key must be given together".into(),
            ));
        }
    }
    Ok(options)
}

#[async_trait]
impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn range(&self, range: KeyRange) -> Result<RangeResponse, StoreError> {
        self.inner.range(&range).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn.validate()?;
        self.commits.txn(txn).await
    }

    async fn watch(
        &self,
        range: KeyRange,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        if start_revision < 0 {
            return Err(StoreError::InvalidTxn(format!(
                "negative watch start revision {start_revision}"
            )));
        }
        // "From the next revision" is pinned to a number first, so that a
        // watch re-created after a failure starts exactly where this one did.
        let start = if start_revision == 0 {
            self.inner.current_revision().await? + 1
        } else {
            start_revision
        };
        let (key, end) = self.inner.etcd_range(&range);
        let mut watch = Watch {
            inner: Arc::clone(&self.inner),
            key,
            end,
            next: start,
            stream: None,
            pending: VecDeque::new(),
            done: false,
        };
        // Open it now so that an unreachable cluster is reported here.
        watch.stream = Some(watch.open().await?);
        Ok(Box::pin(futures::stream::unfold(
            watch,
            |mut watch| async move {
                let item = watch.next_item().await?;
                Some((item, watch))
            },
        )))
    }

    async fn lease_grant(&self, ttl_seconds: i64) -> Result<Lease, StoreError> {
        let resp = self
            .inner
            .call("lease grant", Repeat::Safe, |client| async move {
                client.lease_client().grant(ttl_seconds, None).await
            })
            .await;
        let resp = self.inner.lift("lease grant", 0, resp)?;
        if !resp.error().is_empty() {
            return Err(StoreError::InvalidTxn(format!(
                "etcd refused the lease: {}",
                resp.error()
            )));
        }
        Ok(Lease {
            id: resp.id(),
            ttl_seconds: resp.ttl(),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        let resp = self
            .inner
            .call("lease keep-alive", Repeat::Safe, |client| async move {
                // Opening the stream already renews once and reports an
                // unknown lease (as an error, which is an answer, not a
                // failure to try elsewhere); the second renewal reports the
                // TTL.
                let (mut keeper, mut stream) = match client.lease_client().keep_alive(id).await {
                    Ok(opened) => opened,
                    Err(etcd::Error::LeaseKeepAliveError(m)) if is_lease_not_found(&m) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                };
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match resp {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(resp.ttl()),
            Ok(_) => Err(StoreError::LeaseNotFound(id)),
            Err(e) => self.inner.lift("lease keep-alive", id, Err(e)),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision, StoreError> {
        let resp = self
            .inner
            .call("lease revoke", Repeat::Unsafe, |client| async move {
                client.lease_client().revoke(id).await
            })
            .await;
        let resp = self.inner.lift("lease revoke", id, resp)?;
        header_revision(resp.header())
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<LeaseInfo, StoreError> {
        let resp = self
            .inner
            .call("lease time-to-live", Repeat::Safe, |client| async move {
                client.lease_client().time_to_live(id, None).await
            })
            .await;
        let resp = self.inner.lift("lease time-to-live", id, resp)?;
        // etcd answers an unknown lease with TTL -1 rather than an error.
        if resp.ttl() < 0 {
            return Err(StoreError::LeaseNotFound(id));
        }
        Ok(LeaseInfo {
            granted_ttl_seconds: resp.granted_ttl(),
            remaining_seconds: resp.ttl(),
        })
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let inner = &self.inner;
        let resp = inner
            .call("compaction", Repeat::Unsafe, |client| async move {
                client.kv_client().compact(revision, None).await
            })
            .await;
        match resp {
            Ok(_) => {
                inner.compacted.fetch_max(revision, Ordering::Relaxed);
                Ok(())
            }
            Err(CallError::Rejected(status)) if status.message().contains("future revision") => {
                Err(StoreError::FutureRevision {
                    requested: revision,
                    current: inner.current_revision().await?,
                })
            }
            Err(CallError::Rejected(status)) if status.message().contains("compacted") => {
                let current = inner.current_revision().await?;
                Err(StoreError::Compacted {
                    requested: revision,
                    compacted: inner.compacted_revision(current).await?,
                })
            }
            Err(e) => inner.lift("compaction", 0, Err(e)),
        }
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let revision = self.inner.current_revision().await?;
        let compacted_revision = self.inner.compacted_revision(revision).await?;
        Ok(StoreStatus {
            revision,
            compacted_revision,
        })
    }
}

/// State of one [`Store::watch`] stream.
struct Watch {
    inner: Arc<Inner>,
    key: Vec<u8>,
    end: Vec<u8>,
    /// The revision the consumer needs next: every revision below it in the
    /// range was delivered (or had no events in the range).
    next: Revision,
    stream: Option<etcd::WatchStream>,
    pending: VecDeque<WatchBatch>,
    done: bool,
}

impl Watch {
    /// Creates the etcd watch from `next`, failing over like any call.
    async fn open(&self) -> Result<etcd::WatchStream, StoreError> {
        let mut options = etcd::WatchOptions::new()
            .with_start_revision(self.next)
            .with_progress_notify();
        if !self.end.is_empty() {
            options = options.with_range(self.end.clone());
        }
        let resp = self
            .inner
            .call("watch", Repeat::Safe, |client| {
                let (key, options) = (self.key.clone(), options.clone());
                async move {
                    client
                        .watch_client()
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .watch(key, Some(options))
                        .await
                }
            })
            .await;
        self.inner.lift("watch", 0, resp)
    }

    /// The next item for the consumer, `None` after the stream ended.
    async fn next_item(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        let mut broken_since: Option<Instant> = None;
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                // Re-create the watch where the last one left off. `open`
                // itself tries every endpoint for the request timeout; a
                // stream that opens and breaks again at once is bounded by
                // the same limit.
                let since = *broken_since.get_or_insert_with(Instant::now);
                if since.elapsed() > self.inner.request_timeout {
                    return self.fail(StoreError::Unavailable(format!(
                        "etcd watch kept breaking for {:?}; resume from revision {}",
                        self.inner.request_timeout, self.next
                    )));
                }
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) => return self.fail(e),
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if let Some(error) = self.absorb(&resp) {
                        return self.fail(error);
                    }
                    if resp.canceled() {
                        // Cancelled without compaction (e.g. the member lost
                        // its leader): watch again from where it stopped.
                        tracing::debug!(
                            reason = resp.cancel_reason(),
                            "etcd watch cancelled; re-creating"
                        );
                        self.stream = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else {
                        broken_since = None;
                    }
                }
                Ok(None) => {
                    tracing::debug!(next = self.next, "etcd watch stream closed; re-creating");
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::debug!(next = self.next, error = %e, "etcd watch stream failed; re-creating");
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn fail(&mut self, error: StoreError) -> Option<Result<WatchBatch, StoreError>> {
        self.done = true;
        self.stream = None;
        Some(Err(error))
    }

    /// Takes one etcd response in: queues its batches, advances `next`, and
    /// returns the error that ends the stream, if any.
    fn absorb(&mut self, resp: &etcd::WatchResponse) -> Option<StoreError> {
        if resp.compact_revision() != 0 {
            self.inner
                .compacted
                .fetch_max(resp.compact_revision(), Ordering::Relaxed);
            return Some(StoreError::Compacted {
                requested: self.next,
                compacted: resp.compact_revision(),
            });
        }
        if resp.canceled()
            && !resp.cancel_reason().is_empty()
            && !resp.cancel_reason().contains("leader")
        {
            return Some(StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            )));
        }
        let events = resp.events();
        if events.is_empty() {
            // A progress notification: every event up to the header's
            // revision was sent, so a new watch may start after it. (The
            // response to creation carries no such promise.)
            if !resp.created()
                && !resp.canceled()
                && let Some(header) = resp.header()
            {
                self.next = self.next.max(header.revision() + 1);
            }
            return None;
        }
        let mut grouped: Vec<(Revision, Vec<Event>)> = Vec::new();
        for event in events {
            let Some(event) = self.inner.event(event) else {
                continue;
            };
            let revision = event.kv.mod_revision;
            if revision < self.next {
                // Already delivered before the watch was re-created.
                continue;
            }
            match grouped.last_mut() {
                Some((r, group)) if *r == revision => group.push(event),
                _ => grouped.push((revision, vec![event])),
            }
        }
        for (revision, group) in grouped {
            match self.pending.back_mut() {
                // etcd does not split a revision across responses unless
                // asked to; should it ever, the parts still make one batch.
                Some(batch) if batch.revision == revision => {
                    let mut events = batch.events.to_vec();
                    events.extend(group);
                    batch.events = events.into();
                }
                _ => self.pending.push_back(WatchBatch {
                    revision,
                    events: group.into(),
                }),
            }
        }
        if let Some(last) = self.pending.back() {
            self.next = last.revision + 1;
        }
        None
    }
}
