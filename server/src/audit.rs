//! The audit log: every mutation, and every attempt at one refused for
//! permission, with who (the caller's token id and name), what (operation,
//! project, tenant, subject), when, the revision and the result.
//!
//! **Where entries come from.** [`record`] is a middleware inside the
//! authentication layer. For a mutating call it opens a *scope* (a tokio
//! task-local holding the principal, the operation and its target) around
//! the handler. [`AuditingStore`] wraps the daemon's store: while a scope is
//! open, the first transaction of the call that commits carries one more
//! put — the entry — so an acknowledged mutation always has its entry (same
//! transaction, same revision, same fsync or etcd commit; a transaction
//! whose compares fail writes neither). When the call is refused for
//! permission, the middleware writes a refusal entry before the answer goes
//! out. Other refusals (malformed, over a limit, conflicting with the
//! current state) write nothing — so a refused call leaves the store
//! exactly as it was — unless `audit.refusals = "all"`. No handler
//! knows about any of this: the target is read from the HTTP path, or for
//! gRPC from the request message, located with the descriptor set.
//!
//! **Layout.** `audit/{hour:010}/{unix_ms:013}-{nonce:016x}` →
//! [`AuditEntry`] (protobuf). Keys sort by time; the hour prefix lets a
//! query read only the hours it needs, and `audit/{hour}/{unix_ms / 100000}`
//! (a 100-second window) is a prefix too, which is what pruning deletes.
//!
//! **Retention.** [`retention`] runs on the leader: it counts entries per
//! window (one read at the start of its term, then the store's watch),
//! and every `prune_interval` deletes whole windows — and the oldest keys of
//! one window — beyond `max_entries` or older than `max_age`. Writers never
//! wait for it.
//!
//! Lease renewals (heartbeats, keep-alive streams) are not recorded: they
//! change no object, and an SDK sends one every few seconds per instance.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use prost::Message;
use serde::Deserialize;
use strata_proto::v1::{AuditEntry, ErrorDetail, ErrorReason, QueryAuditRequest};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::store::{
    KeyRange, Lease, LeaseId, LeaseInfo, RangeResponse, Revision, Store, StoreError, StoreStatus,
    Txn, TxnResponse, WatchStream, unix_now_ms,
};

/// Prefix of every audit entry in the store.
pub const PREFIX: &str = "audit/";

const HOUR_MS: i64 = 3_600_000;
/// A pruning window: the first 8 of the 13 digits of a Unix millisecond
/// time, so every window is a key prefix.
const WINDOW_MS: i64 = 100_000;
/// Most keys one pruning transaction deletes (etcd allows 128 operations).
const DELETES_PER_TXN: usize = 100;
/// Most pruning transactions per run, so a lowered limit is caught up with
/// over several runs instead of in one burst.
const TXNS_PER_RUN: usize = 10;
/// Default and largest number of entries one query returns.
const DEFAULT_QUERY_LIMIT: usize = 100;
const MAX_QUERY_LIMIT: usize = 10_000;
/// Largest unary gRPC mutation buffered to read its target (tonic's own
/// default limit on a decoded message, plus the frame header).
const MAX_GRPC_BODY: usize = 4 * 1024 * 1024 + 5;

/// Retention of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Most entries kept (the oldest beyond are pruned).
    pub max_entries: usize,
    /// Entries older than this are pruned.
    pub max_age: Duration,
    /// How often the leader prunes.
    pub prune_interval: Duration,
    /// Record every refused mutation, not only those refused for
    /// permission (`audit.refusals = "all"`).
    pub record_all_refusals: bool,
    /// Most refusal entries one token writes per minute; the rest are
    /// counted and summed up in its next recorded refusal (0: no limit).
    pub max_refusals_per_minute: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(10),
            record_all_refusals: false,
            max_refusals_per_minute: 60,
        }
    }
}

/// The `[audit]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// Most entries kept.
    pub max_entries: Option<i64>,
    /// Longest an entry is kept (`30d`, `12h`).
    pub max_age: Option<String>,
    /// How often the leader prunes (`10s`).
    pub prune_interval: Option<String>,
    /// Which refused mutations are recorded: `denied` (permission denied,
    /// the default) or `all`.
    pub refusals: Option<String>,
    /// Most refusal entries one token writes per minute (0: no limit).
    pub max_refusals_per_minute: Option<i64>,
}

impl AuditSettings {
    /// Settings from the `[audit]` tables of the sources, later ones
    /// winning; errors name the setting and its source.
    pub(crate) fn from_layers(
        layers: &[(AuditFile, String)],
    ) -> Result<Self, crate::settings_error::SettingsError> {
        let mut out = Self::default();
        let invalid = |setting: &'static str, source: &str, message: String| {
            crate::settings_error::SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            }
        };
        for (layer, source) in layers {
            if let Some(n) = layer.max_entries {
                out.max_entries = usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                    invalid(
                        "audit.max_entries",
                        source,
                        format!("must be at least 1, got {n}"),
                    )
                })?;
            }
            let duration = |setting: &'static str, v: &str| {
                humantime::parse_duration(v.trim())
                    .map_err(|e| invalid(setting, source, format!("{v:?}: {e}")))
                    .and_then(|d| {
                        if d.is_zero() {
                            Err(invalid(setting, source, "must not be zero".into()))
                        } else {
                            Ok(d)
                        }
                    })
            };
            if let Some(v) = &layer.max_age {
                out.max_age = duration("audit.max_age", v)?;
            }
            if let Some(v) = &layer.prune_interval {
                out.prune_interval = duration("audit.prune_interval", v)?;
            }
            if let Some(n) = layer.max_refusals_per_minute {
                out.max_refusals_per_minute = u32::try_from(n).map_err(|_| {
                    invalid(
                        "audit.max_refusals_per_minute",
                        source,
                        format!("must be between 0 and {}, got {n}", u32::MAX),
                    )
                })?;
            }
            match layer.refusals.as_deref().map(str::trim) {
                None => {}
                Some("denied") => out.record_all_refusals = false,
                Some("all") => out.record_all_refusals = true,
                Some(other) => {
                    return Err(invalid(
                        "audit.refusals",
                        source,
                        format!("{other:?}: expected \"denied\" or \"all\""),
                    ));
                }
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- keys

fn hour_prefix(hour: i64) -> String {
    format!("{PREFIX}{hour:010}/")
}

fn window_prefix(window: i64) -> String {
    let hour = window * WINDOW_MS / HOUR_MS;
    format!("{PREFIX}{hour:010}/{window:08}")
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A fresh entry key for time `ms`: unique across replicas (64 random
/// bits, mixed with a per-process counter).
fn entry_key(ms: i64) -> Vec<u8> {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NONCE.fetch_add(1, Ordering::Relaxed));
    hasher.write_i64(ms);
    format!(
        "{}{ms:013}-{:016x}",
        hour_prefix(ms.div_euclid(HOUR_MS)),
        hasher.finish()
    )
    .into_bytes()
}

/// The Unix millisecond time in an entry key.
fn key_time(key: &[u8]) -> Option<i64> {
    let key = std::str::from_utf8(key).ok()?.strip_prefix(PREFIX)?;
    let (_, rest) = key.split_once('/')?;
    rest.get(..13)?.parse().ok()
}

// ---------------------------------------------------------------- scope

/// What one mutating call is, as the audit log records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Operation name (`PutConfig`).
    pub operation: String,
    /// Project.
    pub project: String,
    /// Tenant.
    pub tenant: String,
    /// Key, `service[/instance]`, token.
    pub subject: String,
}

#[derive(Debug)]
struct Scope {
    actor_id: Arc<str>,
    actor_name: Arc<str>,
    target: Target,
    transport: &'static str,
    member: Arc<str>,
    /// A transaction of this call committed with the entry.
    written: AtomicBool,
    revision: AtomicI64,
}

impl Scope {
    fn entry(&self, time_unix_ms: i64, result: &str, message: &str) -> AuditEntry {
        AuditEntry {
            time_unix_ms,
            actor_token_id: self.actor_id.to_string(),
            actor_name: self.actor_name.to_string(),
            operation: self.target.operation.clone(),
            project: self.target.project.clone(),
            tenant: self.target.tenant.clone(),
            subject: self.target.subject.clone(),
            result: result.to_owned(),
            message: message.to_owned(),
            revision: 0,
            transport: self.transport.to_owned(),
            member: self.member.to_string(),
        }
    }
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// Runs `work` as the daemon itself (`actor` names the job, e.g.
/// `tenant-ttl`): its committed transactions are recorded like a caller's.
pub async fn as_daemon<F: std::future::Future>(target: Target, actor: &str, work: F) -> F::Output {
    let scope = Arc::new(Scope {
        actor_id: "stratad".into(),
        actor_name: actor.into(),
        target,
        transport: "internal",
        member: "".into(),
        written: AtomicBool::new(false),
        revision: AtomicI64::new(0),
    });
    SCOPE.scope(scope, work).await
}

// ---------------------------------------------------------------- store

/// The daemon's store with audit entries added to the transactions of
/// audited calls (see the module documentation). Everything else is passed
/// through unchanged.
pub struct AuditingStore {
    inner: Arc<dyn Store>,
}

impl AuditingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Store for AuditingStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn range(&self, range: KeyRange) -> Result<RangeResponse, StoreError> {
        self.inner.range(range).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let scope = SCOPE.try_with(Arc::clone).ok();
        let Some(scope) = scope.filter(|s| !s.written.load(Ordering::Acquire)) else {
            return self.inner.txn(txn).await;
        };
        let now = unix_now_ms();
        let entry = scope.entry(now, "ok", "");
        let response = self
            .inner
            .txn(txn.put(entry_key(now), entry.encode_to_vec()))
            .await?;
        if response.succeeded {
            scope.revision.store(response.revision, Ordering::Release);
            scope.written.store(true, Ordering::Release);
            metrics::counter!("strata_audit_entries_total", "result" => "ok").increment(1);
        }
        Ok(response)
    }

    async fn watch(
        &self,
        range: KeyRange,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        self.inner.watch(range, start_revision).await
    }

    async fn lease_grant(&self, ttl_seconds: i64) -> Result<Lease, StoreError> {
        self.inner.lease_grant(ttl_seconds).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        self.inner.lease_keep_alive(id).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision, StoreError> {
        self.inner.lease_revoke(id).await
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<LeaseInfo, StoreError> {
        self.inner.lease_time_to_live(id).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.inner.status().await
    }
}

// ---------------------------------------------------------------- classify

/// Where the target fields of one gRPC request message are.
#[derive(Debug, Clone, Default)]
struct GrpcOp {
    operation: String,
    /// Unary: the body is buffered to read the fields.
    unary: bool,
    project: Option<u32>,
    tenant: Option<u32>,
    /// Field numbers whose values make the subject, joined with `/`.
    subject: Vec<u32>,
}

/// Method names that change state. Anything else (Get, List, Resolve,
/// Watch, Explain, Status, Query, Export, Heartbeat, KeepAlive) is a read
/// or a lease renewal.
fn is_mutation(method: &str) -> bool {
    const VERBS: &[&str] = &[
        "Create",
        "Update",
        "Delete",
        "Put",
        "Register",
        "Deregister",
        "Drain",
        "Rollback",
        "Revoke",
        "Import",
        "Restore",
        "Set",
    ];
    VERBS.iter().any(|v| method.starts_with(v))
}

/// The mutating methods of every `strata.v1` service, from the descriptor
/// set (so services added later are covered without a table to maintain).
fn grpc_ops() -> HashMap<String, GrpcOp> {
    let mut out = HashMap::new();
    let Ok(set) = prost_types::FileDescriptorSet::decode(strata_proto::FILE_DESCRIPTOR_SET) else {
        tracing::error!("the descriptor set does not decode; gRPC audit entries lack targets");
        return out;
    };
    let mut messages: HashMap<String, &prost_types::DescriptorProto> = HashMap::new();
    for file in &set.file {
        for m in &file.message_type {
            messages.insert(format!(".{}.{}", file.package(), m.name()), m);
        }
    }
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if !is_mutation(method.name()) {
                    continue;
                }
                let mut op = GrpcOp {
                    operation: method.name().to_owned(),
                    unary: !method.client_streaming(),
                    ..GrpcOp::default()
                };
                if let Some(input) = messages.get(method.input_type()) {
                    let field = |name: &str| {
                        input
                            .field
                            .iter()
                            .find(|f| {
                                f.name() == name
                                    && f.r#type()
                                        == prost_types::field_descriptor_proto::Type::String
                                    && f.label()
                                        != prost_types::field_descriptor_proto::Label::Repeated
                            })
                            .map(|f| f.number() as u32)
                    };
                    op.project = field("project");
                    op.tenant = field("tenant");
                    let tenant_service = service.name() == "TenantService";
                    if op.tenant.is_none() && tenant_service {
                        op.tenant = field("name");
                    }
                    if let Some(key) = field("key") {
                        op.subject = vec![key];
                    } else if let Some(s) = field("service") {
                        op.subject = std::iter::once(s).chain(field("id")).collect();
                    } else if !tenant_service {
                        op.subject = field("name").or_else(|| field("id")).into_iter().collect();
                    }
                }
                out.insert(
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    op,
                );
            }
        }
    }
    out
}

/// Reads the string fields `wanted` from an encoded protobuf message's top
/// level (later occurrences win, as in protobuf).
fn scan_fields(mut buf: &[u8], wanted: &[u32]) -> HashMap<u32, String> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0_u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut out = HashMap::new();
    while !buf.is_empty() {
        let Some(tag) = varint(&mut buf) else { break };
        let number = (tag >> 3) as u32;
        let skip = match tag & 7 {
            0 => {
                if varint(&mut buf).is_none() {
                    break;
                }
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else {
                    break;
                };
                let Some(value) = buf.get(..len) else { break };
                if wanted.contains(&number) {
                    out.insert(number, String::from_utf8_lossy(value).into_owned());
                }
                len
            }
            _ => break,
        };
        let Some(rest) = buf.get(skip..) else { break };
        buf = rest;
    }
    out
}

/// Target of a buffered unary gRPC request body (one length-prefixed
/// message; a compressed one is not looked into).
fn grpc_target(op: &GrpcOp, body: &[u8]) -> Target {
    let mut target = Target {
        operation: op.operation.clone(),
        ..Target::default()
    };
    let Some(message) = body
        .get(5..)
        .filter(|_| body.first() == Some(&0))
        .and_then(|m| {
            let len = u32::from_be_bytes(body.get(1..5)?.try_into().ok()?) as usize;
            m.get(..len)
        })
    else {
        return target;
    };
    let wanted: Vec<u32> = op
        .project
        .iter()
        .chain(op.tenant.iter())
        .chain(op.subject.iter())
        .copied()
        .collect();
    let mut fields = scan_fields(message, &wanted);
    let mut take = |n: Option<u32>| n.and_then(|n| fields.remove(&n)).unwrap_or_default();
    target.project = take(op.project);
    target.tenant = take(op.tenant);
    let parts: Vec<String> = op
        .subject
        .iter()
        .map(|n| take(Some(*n)))
        .filter(|s| !s.is_empty())
        .collect();
    target.subject = parts.join("/");
    target
}

/// Decodes `%XX` escapes (invalid UTF-8 becomes U+FFFD: the entry still
/// says what was tried).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Target of a mutating HTTP request; `None` for reads and renewals.
fn http_target(method: &http::Method, path: &str) -> Option<Target> {
    use http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) || !path.starts_with("/v1/")
    {
        return None;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut target = Target::default();
    let operation = match segments.as_slice() {
        ["v1", "leases", _, "heartbeat"] => return None,
        ["v1", "projects", p, "tenants", t, rest @ ..] => {
            target.project = percent_decode(p);
            target.tenant = percent_decode(t);
            match (method, rest) {
                (&Method::PUT, []) => "CreateTenant",
                (&Method::PATCH, []) => "UpdateTenant",
                (&Method::DELETE, []) => "DeleteTenant",
                (m, ["config", key @ ..]) if !key.is_empty() => {
                    target.subject = key
                        .iter()
                        .map(|s| percent_decode(s))
                        .collect::<Vec<_>>()
                        .join("/");
                    match *m {
                        Method::PUT => "PutConfig",
                        Method::DELETE => "DeleteLayer",
                        Method::POST => "Rollback",
                        _ => "",
                    }
                }
                (&Method::POST, ["services", s]) if s.ends_with(":register") => {
                    target.subject = percent_decode(s.trim_end_matches(":register"));
                    "RegisterBranch"
                }
                (&Method::POST, ["services", s, "instances"]) => {
                    target.subject = percent_decode(s);
                    "Register"
                }
                (&Method::DELETE, ["services", s, "instances", id]) => {
                    target.subject = format!("{}/{}", percent_decode(s), percent_decode(id));
                    "Deregister"
                }
                (&Method::POST, ["services", s, "instances", id, "drain"]) => {
                    target.subject = format!("{}/{}", percent_decode(s), percent_decode(id));
                    "Drain"
                }
                _ => "",
            }
        }
        // Not an API route (the fallback answers 404): nothing to record.
        _ => return None,
    };
    target.operation = if operation.is_empty() {
        // Bounded: only what a caller with a valid token sent.
        let mut route = format!("{method} {path}");
        route.truncate(200);
        route
    } else {
        operation.to_owned()
    };
    Some(target)
}

// ---------------------------------------------------------------- middleware

/// The audit log of one daemon: where entries go and how calls map to
/// operations.
pub struct Auditor {
    /// The store without [`AuditingStore`] (refusal entries are written
    /// directly).
    store: Arc<dyn Store>,
    member: Arc<str>,
    grpc_ops: HashMap<String, GrpcOp>,
    pub(crate) settings: AuditSettings,
    refusals: std::sync::Mutex<RefusalBudgets>,
}

/// How long one refusal budget lasts.
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Most tokens whose refusal budgets are tracked at once; beyond, budgets
/// whose window has ended are dropped (only valid tokens reach the audit
/// layer, so this is reached only by a very large fleet of tokens).
const MAX_REFUSAL_BUDGETS: usize = 10_000;

/// Refusal entries written per token in the current window. Refusals cost
/// a caller nothing, and each one recorded is a store write that pushes the
/// oldest entry out of a log bounded by `max_entries`: without a budget, a
/// `read` token could erase the audit history with forbidden calls.
#[derive(Debug, Default)]
struct RefusalBudgets {
    by_token: HashMap<Arc<str>, RefusalBudget>,
}

#[derive(Debug)]
struct RefusalBudget {
    window_start: std::time::Instant,
    written: u32,
    /// Refusals not recorded since this token's last recorded one.
    suppressed: u64,
    suppressed_since_ms: i64,
}

/// Whether a refusal is recorded, and what it says of those that were not.
enum RefusalVerdict {
    Record { suppressed: u64, since_ms: i64 },
    Suppress,
}

impl RefusalBudgets {
    fn admit(&mut self, token: &Arc<str>, per_window: u32, now_ms: i64) -> RefusalVerdict {
        let now = std::time::Instant::now();
        if self.by_token.len() >= MAX_REFUSAL_BUDGETS && !self.by_token.contains_key(token) {
            self.by_token.retain(|_, b| {
                now.duration_since(b.window_start) < REFUSAL_WINDOW || b.suppressed > 0
            });
            if self.by_token.len() >= MAX_REFUSAL_BUDGETS {
                // Still full of live budgets: record without tracking.
                return RefusalVerdict::Record {
                    suppressed: 0,
                    since_ms: 0,
                };
            }
        }
        let budget = self
            .by_token
            .entry(Arc::clone(token))
            .or_insert(RefusalBudget {
                window_start: now,
                written: 0,
                suppressed: 0,
                suppressed_since_ms: 0,
            });
        if now.duration_since(budget.window_start) >= REFUSAL_WINDOW {
            budget.window_start = now;
            budget.written = 0;
        }
        if budget.written >= per_window {
            if budget.suppressed == 0 {
                budget.suppressed_since_ms = now_ms;
                tracing::warn!(
                    token_id = %token,
                    limit = per_window,
                    "a token's refused calls exceed audit.max_refusals_per_minute; the rest of \
                     this minute's are counted, not recorded"
                );
            }
            budget.suppressed += 1;
            return RefusalVerdict::Suppress;
        }
        budget.written += 1;
        let verdict = RefusalVerdict::Record {
            suppressed: budget.suppressed,
            since_ms: budget.suppressed_since_ms,
        };
        budget.suppressed = 0;
        verdict
    }
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("member", &self.member)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// An audit log writing to `store` (the unwrapped one).
    pub fn new(store: Arc<dyn Store>, member: &str, settings: AuditSettings) -> Arc<Self> {
        Arc::new(Self {
            store,
            member: member.into(),
            grpc_ops: grpc_ops(),
            settings,
            refusals: std::sync::Mutex::new(RefusalBudgets::default()),
        })
    }

    /// Writes one entry in its own transaction (refusals, and successes that
    /// wrote nothing).
    async fn append(&self, entry: &AuditEntry) {
        let key = entry_key(entry.time_unix_ms);
        match self
            .store
            .txn(Txn::new().put(key, entry.encode_to_vec()))
            .await
        {
            Ok(_) => {
                let result = if entry.result == "ok" {
                    "ok"
                } else {
                    "refused"
                };
                metrics::counter!("strata_audit_entries_total", "result" => result).increment(1);
            }
            Err(e) => {
                metrics::counter!("strata_audit_write_failures_total").increment(1);
                tracing::warn!(error = %e, operation = %entry.operation, "cannot write an audit entry");
            }
        }
    }
}

/// The result code and message of a failed call, from its response.
async fn failure(grpc: bool, response: Response) -> (Response, Option<(String, String)>) {
    if grpc {
        let headers = response.headers();
        let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else {
            return (response, None);
        };
        if code == "0" {
            return (response, None);
        }
        let detail = headers
            .get(strata_proto::ERROR_DETAIL_TRAILER)
            .and_then(|v| base64_engine::decode(v.as_bytes()))
            .and_then(|b| ErrorDetail::decode(b.as_slice()).ok());
        let found = match detail {
            Some(d) => (
                ApiError::new(
                    ErrorReason::try_from(d.reason).unwrap_or(ErrorReason::Internal),
                    "",
                )
                .reason_name()
                .to_owned(),
                d.message,
            ),
            None => (
                format!("grpc_{code}"),
                headers
                    .get("grpc-message")
                    .map(|v| percent_decode(&String::from_utf8_lossy(v.as_bytes())))
                    .unwrap_or_default(),
            ),
        };
        return (response, Some(found));
    }
    if response.status().as_u16() < 400 {
        return (response, None);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = json["error"]["code"]
        .as_str()
        .map_or_else(|| format!("http_{}", parts.status.as_u16()), str::to_owned);
    let message = json["error"]["message"].as_str().map_or_else(
        || String::from_utf8_lossy(&bytes).into_owned(),
        str::to_owned,
    );
    (
        Response::from_parts(parts, Body::from(bytes)),
        Some((code, message)),
    )
}

/// Minimal standard base64 (with or without padding), for the binary
/// error-detail header of gRPC answers.
mod base64_engine {
    pub(super) fn decode(input: &[u8]) -> Option<Vec<u8>> {
        let value = |c: u8| -> Option<u32> {
            Some(match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            } as u32)
        };
        let input: Vec<u8> = input.iter().copied().filter(|c| *c != b'=').collect();
        let mut out = Vec::with_capacity(input.len() * 3 / 4);
        for chunk in input.chunks(4) {
            let mut acc = 0_u32;
            for (i, c) in chunk.iter().enumerate() {
                acc |= value(*c)? << (18 - 6 * i);
            }
            let bytes = acc.to_be_bytes();
            out.extend_from_slice(&bytes[1..chunk.len()]);
        }
        Some(out)
    }
}

/// The audit middleware (see the module documentation). It must run inside
/// the authentication layer, which puts the caller's principal into the
/// request.
pub async fn record(State(auditor): State<Arc<Auditor>>, request: Request, next: Next) -> Response {
    let grpc = crate::grpc_methods::is_grpc(request.headers());
    let path = request.uri().path().to_owned();
    let (request, target) = if grpc {
        let Some(op) = auditor.grpc_ops.get(&path) else {
            return next.run(request).await;
        };
        if op.unary {
            let (parts, body) = request.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, MAX_GRPC_BODY).await else {
                return tonic::Status::from(
                    ApiError::new(
                        ErrorReason::LimitExceeded,
                        format!("request message exceeds {} bytes", MAX_GRPC_BODY - 5),
                    )
                    .with("limit_bytes", MAX_GRPC_BODY - 5),
                )
                .into_http();
            };
            let target = grpc_target(op, &bytes);
            (Request::from_parts(parts, Body::from(bytes)), target)
        } else {
            (
                request,
                Target {
                    operation: op.operation.clone(),
                    ..Target::default()
                },
            )
        }
    } else {
        match http_target(request.method(), &path) {
            Some(target) => (request, target),
            None => return next.run(request).await,
        }
    };
    let (actor_id, actor_name) = match request.extensions().get::<crate::auth::Principal>() {
        Some(p) => (Arc::clone(&p.token_id), Arc::clone(&p.name)),
        None => ("anonymous".into(), "anonymous".into()),
    };
    let scope = Arc::new(Scope {
        actor_id,
        actor_name,
        target,
        transport: if grpc { "grpc" } else { "http" },
        member: Arc::clone(&auditor.member),
        written: AtomicBool::new(false),
        revision: AtomicI64::new(0),
    });
    let response = SCOPE.scope(Arc::clone(&scope), next.run(request)).await;
    let (response, failed) = failure(grpc, response).await;
    let written = scope.written.load(Ordering::Acquire);
    match failed {
        // Recorded with the committed transaction.
        None if written => {}
        None => auditor.append(&scope.entry(unix_now_ms(), "ok", "")).await,
        // Malformed, over-limit and conflicting calls change nothing and
        // are counted by `strata_rpc_requests_total{code}`; writing each
        // would let any caller turn garbage into store writes.
        // A call that already committed part of its work (an import that
        // failed after its first transaction) always gets its failure
        // recorded, or the log would show only its first commit as `ok`.
        Some((code, _))
            if !written && code != "permission_denied" && !auditor.settings.record_all_refusals => {
        }
        Some((code, message)) => {
            let now_ms = unix_now_ms();
            let mut message = message;
            if written {
                // A multi-transaction call (import) that failed part way:
                // its first commit is recorded as ok, the failure here.
                let mut entry = scope.entry(now_ms, &code, &message);
                entry.revision = scope.revision.load(Ordering::Acquire);
                auditor.append(&entry).await;
                return response;
            }
            let per_minute = auditor.settings.max_refusals_per_minute;
            if per_minute > 0 {
                let verdict = auditor
                    .refusals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .admit(&scope.actor_id, per_minute, now_ms);
                match verdict {
                    RefusalVerdict::Suppress => {
                        metrics::counter!("strata_audit_refusals_suppressed_total").increment(1);
                        return response;
                    }
                    RefusalVerdict::Record {
                        suppressed,
                        since_ms,
                    } if suppressed > 0 => {
                        message.push_str(&format!(
                            " [and {suppressed} more refused calls of this token since \
                             {since_ms} (Unix ms) not recorded: audit.max_refusals_per_minute \
                             is {per_minute}]"
                        ));
                    }
                    RefusalVerdict::Record { .. } => {}
                }
            }
            auditor.append(&scope.entry(now_ms, &code, &message)).await;
        }
    }
    response
}

// ---------------------------------------------------------------- query

/// Filters of a query (see `QueryAuditRequest`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Project.
    #[serde(default)]
    pub project: String,
    /// Tenant.
    #[serde(default)]
    pub tenant: String,
    /// Token id or name.
    #[serde(default)]
    pub actor: String,
    /// From, Unix ms (0: none).
    #[serde(default)]
    pub since_unix_ms: i64,
    /// Before, Unix ms (0: none).
    #[serde(default)]
    pub until_unix_ms: i64,
    /// Operation.
    #[serde(default, alias = "op")]
    pub operation: String,
    /// Most entries (0: 100).
    #[serde(default)]
    pub limit: u32,
    /// `ok`, `error` or an error code.
    #[serde(default)]
    pub result: String,
}

impl Filter {
    fn matches(&self, e: &AuditEntry) -> bool {
        let eq = |want: &str, have: &str| want.is_empty() || want == have;
        eq(&self.project, &e.project)
            && eq(&self.tenant, &e.tenant)
            && (self.actor.is_empty()
                || self.actor == e.actor_token_id
                || self.actor == e.actor_name)
            && eq(&self.operation, &e.operation)
            && (self.since_unix_ms == 0 || e.time_unix_ms >= self.since_unix_ms)
            && (self.until_unix_ms == 0 || e.time_unix_ms < self.until_unix_ms)
            && match self.result.as_str() {
                "" => true,
                "error" => e.result != "ok",
                r => r == e.result,
            }
    }
}

impl From<QueryAuditRequest> for Filter {
    fn from(r: QueryAuditRequest) -> Self {
        Self {
            project: r.project,
            tenant: r.tenant,
            actor: r.actor,
            since_unix_ms: r.since_unix_ms,
            until_unix_ms: r.until_unix_ms,
            operation: r.operation,
            limit: r.limit,
            result: r.result,
        }
    }
}

/// Entries matching `filter`, newest first: (entries, more matched, the
/// revision the first read saw).
pub async fn query(
    store: &dyn Store,
    settings: &AuditSettings,
    filter: &Filter,
) -> Result<(Vec<AuditEntry>, bool, Revision), ApiError> {
    let limit = match filter.limit as usize {
        0 => DEFAULT_QUERY_LIMIT,
        n => n.min(MAX_QUERY_LIMIT),
    };
    if filter.until_unix_ms != 0 && filter.until_unix_ms <= filter.since_unix_ms {
        return Err(ApiError::new(
            ErrorReason::InvalidArgument,
            "until must be later than since",
        ));
    }
    let now = unix_now_ms();
    // An hour of slack either way for replicas' clocks.
    let newest = if filter.until_unix_ms > 0 {
        filter.until_unix_ms.min(now + HOUR_MS)
    } else {
        now + HOUR_MS
    };
    let horizon =
        now - i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX / 2) - HOUR_MS;
    let oldest = filter.since_unix_ms.max(horizon);
    let mut out = Vec::new();
    let mut revision = 0;
    let mut hour = newest.div_euclid(HOUR_MS);
    while hour >= oldest.div_euclid(HOUR_MS) {
        let range = store.range(KeyRange::prefix(hour_prefix(hour))).await?;
        if revision == 0 {
            revision = range.revision;
        }
        for kv in range.kvs.iter().rev() {
            let Ok(mut entry) = AuditEntry::decode(kv.value.as_slice()) else {
                continue;
            };
            if entry.result == "ok" && entry.revision == 0 {
                entry.revision = kv.create_revision;
            }
            if filter.matches(&entry) {
                if out.len() == limit {
                    return Ok((out, true, revision));
                }
                out.push(entry);
            }
        }
        hour -= 1;
    }
    Ok((out, false, revision))
}

// ---------------------------------------------------------------- retention

/// Leader-only: prunes the audit log to `settings` until `term` ends.
pub async fn retention(store: Arc<dyn Store>, settings: AuditSettings, term: CancellationToken) {
    while !term.is_cancelled() {
        if let Err(e) = retention_term(&store, &settings, &term).await {
            tracing::warn!(error = %e, "audit retention: retrying in a few seconds");
            tokio::select! {
                () = term.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
        }
    }
}

/// Counts entries per window, follows the watch, prunes on every tick;
/// returns on error (to start over) or when the term ends.
async fn retention_term(
    store: &Arc<dyn Store>,
    settings: &AuditSettings,
    term: &CancellationToken,
) -> Result<(), StoreError> {
    let all = store.range(KeyRange::prefix(PREFIX)).await?;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for kv in &all.kvs {
        if let Some(t) = key_time(&kv.key) {
            *counts.entry(t.div_euclid(WINDOW_MS)).or_default() += 1;
        }
    }
    drop(all.kvs);
    let mut watch = store
        .watch(KeyRange::prefix(PREFIX), all.revision + 1)
        .await?;
    let mut seen = all.revision;
    // The revision of our last prune: counts are trusted again once the
    // watch has shown it (so one prune is never acted on twice).
    let mut pending = 0;
    let mut tick = tokio::time::interval(settings.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = term.cancelled() => return Ok(()),
            batch = watch.next() => {
                let batch = batch.ok_or_else(|| StoreError::Unavailable("audit watch ended".into()))??;
                for event in batch.events.iter() {
                    let Some(t) = key_time(&event.kv.key) else { continue };
                    let window = t.div_euclid(WINDOW_MS);
                    match event.kind {
                        crate::store::EventKind::Put if event.kv.version == 1 => {
                            *counts.entry(window).or_default() += 1;
                        }
                        crate::store::EventKind::Put => {}
                        crate::store::EventKind::Delete => {
                            if let Some(c) = counts.get_mut(&window) {
                                *c = c.saturating_sub(1);
                                if *c == 0 {
                                    counts.remove(&window);
                                }
                            }
                        }
                    }
                }
                seen = batch.revision;
            }
            _ = tick.tick() => {
                if seen >= pending
                    && let Some(revision) = prune(store.as_ref(), settings, &counts).await?
                {
                    pending = revision;
                }
            }
        }
    }
}

/// One pruning run over the counted windows; the revision of its last
/// transaction, if it deleted anything.
async fn prune(
    store: &dyn Store,
    settings: &AuditSettings,
    counts: &BTreeMap<i64, usize>,
) -> Result<Option<Revision>, StoreError> {
    let cutoff =
        unix_now_ms() - i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX / 2);
    let total: usize = counts.values().sum();
    let mut excess = total.saturating_sub(settings.max_entries);
    let mut whole = Vec::new();
    // (window, delete keys older than this time, or at most this many)
    let mut partial: Option<(i64, Option<i64>, usize)> = None;
    for (&window, &count) in counts {
        let window_end = (window + 1) * WINDOW_MS;
        if window_end <= cutoff || count <= excess {
            whole.push(window);
            excess = excess.saturating_sub(count);
            continue;
        }
        let old = (window * WINDOW_MS < cutoff).then_some(cutoff);
        if old.is_some() || excess > 0 {
            partial = Some((window, old, excess));
        }
        break;
    }
    let mut txns = 0;
    let mut last = None;
    let mut pruned = 0_u64;
    for chunk in whole.chunks(DELETES_PER_TXN) {
        if txns == TXNS_PER_RUN {
            return Ok(last);
        }
        let mut txn = Txn::new();
        for w in chunk {
            txn = txn.delete(KeyRange::prefix(window_prefix(*w)));
        }
        let response = store.txn(txn).await?;
        pruned += u64::try_from(response.deleted).unwrap_or(0);
        last = Some(response.revision);
        txns += 1;
    }
    if let Some((window, older_than, count)) = partial {
        let range = store.range(KeyRange::prefix(window_prefix(window))).await?;
        let doomed: Vec<&Vec<u8>> = range
            .kvs
            .iter()
            .enumerate()
            .filter(|(i, kv)| {
                *i < count || older_than.is_some_and(|c| key_time(&kv.key).is_some_and(|t| t < c))
            })
            .map(|(_, kv)| &kv.key)
            .collect();
        for chunk in doomed.chunks(DELETES_PER_TXN) {
            if txns == TXNS_PER_RUN {
                break;
            }
            let mut txn = Txn::new();
            for key in chunk {
                txn = txn.delete(KeyRange::key(key.to_vec()));
            }
            let response = store.txn(txn).await?;
            pruned += u64::try_from(response.deleted).unwrap_or(0);
            last = Some(response.revision);
            txns += 1;
        }
    }
    if pruned > 0 {
        metrics::counter!("strata_audit_pruned_total").increment(pruned);
        tracing::debug!(pruned, "audit retention");
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_and_windows_are_prefixes() {
        let a = entry_key(1_700_000_000_000);
        let b = entry_key(1_700_000_000_001);
        assert!(a < b);
        assert_eq!(key_time(&a), Some(1_700_000_000_000));
        let window = 1_700_000_000_000_i64.div_euclid(WINDOW_MS);
        assert!(a.starts_with(window_prefix(window).as_bytes()));
        assert!(!entry_key((window + 1) * WINDOW_MS).starts_with(window_prefix(window).as_bytes()));
        assert!(a.starts_with(hour_prefix(1_700_000_000_000 / HOUR_MS).as_bytes()));
    }

    #[test]
    fn grpc_targets_come_from_the_request_message() {
        let ops = grpc_ops();
        let put = &ops["/strata.v1.ConfigService/PutConfig"];
        let message = strata_proto::v1::PutConfigRequest {
            project: "vega".into(),
            tenant: "feat-1".into(),
            key: "mm/server.yaml".into(),
            value: b"a: 1".to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let target = grpc_target(put, &body);
        assert_eq!(
            target,
            Target {
                operation: "PutConfig".into(),
                project: "vega".into(),
                tenant: "feat-1".into(),
                subject: "mm/server.yaml".into(),
            }
        );
        assert!(ops.contains_key("/strata.v1.TenantService/CreateTenant"));
        assert!(ops.contains_key("/strata.v1.RegistryService/Deregister"));
        assert!(!ops.contains_key("/strata.v1.RegistryService/Heartbeat"));
        assert!(!ops.contains_key("/strata.v1.ConfigService/Resolve"));
        // Garbage never panics and yields an empty target.
        assert_eq!(grpc_target(put, &[0, 0, 0, 0, 9, 0xff, 0xff]).project, "");
    }

    #[test]
    fn http_targets_come_from_the_path() {
        let t = http_target(
            &http::Method::PUT,
            "/v1/projects/vega/tenants/feat-1/config/a/b%20c.yaml",
        )
        .unwrap();
        assert_eq!(t.operation, "PutConfig");
        assert_eq!((t.project.as_str(), t.tenant.as_str()), ("vega", "feat-1"));
        assert_eq!(t.subject, "a/b c.yaml");
        assert!(http_target(&http::Method::GET, "/v1/projects/vega/tenants").is_none());
        assert!(http_target(&http::Method::POST, "/v1/leases/12/heartbeat").is_none());
        let d = http_target(
            &http::Method::POST,
            "/v1/projects/p/tenants/t/services/mm/instances/i-1/drain",
        )
        .unwrap();
        assert_eq!(
            (d.operation.as_str(), d.subject.as_str()),
            ("Drain", "mm/i-1")
        );
        let b = http_target(
            &http::Method::POST,
            "/v1/projects/p/tenants/t/services/mm:register",
        )
        .unwrap();
        assert_eq!(
            (b.operation.as_str(), b.subject.as_str()),
            ("RegisterBranch", "mm")
        );
        assert_eq!(percent_decode("%ff%2e%2e"), "\u{fffd}..");
    }

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_engine::decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_engine::decode(b"aGVsbG8").unwrap(), b"hello");
        assert!(base64_engine::decode(b"a*").is_none());
    }

    /// Finding 3 of the security review: refusals of one token are recorded
    /// up to the budget per minute; the rest are counted and summed up in
    /// the token's next recorded refusal, and other tokens are unaffected.
    #[test]
    fn refusals_beyond_the_budget_are_counted_not_recorded_finding_3() {
        let mut budgets = RefusalBudgets::default();
        let reader: Arc<str> = "reader".into();
        let other: Arc<str> = "other".into();
        for _ in 0..3 {
            assert!(matches!(
                budgets.admit(&reader, 3, 1_000),
                RefusalVerdict::Record { suppressed: 0, .. }
            ));
        }
        for _ in 0..1_000 {
            assert!(matches!(
                budgets.admit(&reader, 3, 2_000),
                RefusalVerdict::Suppress
            ));
        }
        assert!(matches!(
            budgets.admit(&other, 3, 2_000),
            RefusalVerdict::Record { suppressed: 0, .. }
        ));
        // A new window: the first refusal carries the count of the
        // suppressed ones and when they began.
        budgets.by_token.get_mut(&reader).unwrap().window_start -= REFUSAL_WINDOW;
        assert!(matches!(
            budgets.admit(&reader, 3, 70_000),
            RefusalVerdict::Record {
                suppressed: 1_000,
                since_ms: 2_000
            }
        ));
        assert!(matches!(
            budgets.admit(&reader, 3, 70_001),
            RefusalVerdict::Record { suppressed: 0, .. }
        ));
    }
}
