//! The audit log: every mutation, and every attempt at one refused for
//! permission, with who (the caller's token id and name), what (operation,
//! project, tenant, subject), when, the revision and the result.
//!
//! **Where entries come from.** A middleware (`transport::layers::audit`) runs
//! inside the authentication layer and opens a [`Call`]: a *scope* (a tokio
//! task-local holding the caller's principal) around every handler. A handler
//! that changes state states what it is doing — a typed [`Target`]: operation,
//! project, tenant, subject — when it authorizes ([`authorize`], or
//! [`declare`] first when the permission it needs depends on the body it has
//! yet to read). [`AuditingStore`] wraps the daemon's store: once a target is
//! stated, the first transaction of the call that commits carries one more put
//! — the entry — so an acknowledged mutation always has its entry (same
//! transaction, same revision, same fsync or etcd commit; a transaction whose
//! compares fail writes neither). When the call is refused for permission, the
//! middleware writes a refusal entry with the same target before the answer
//! goes out. Other refusals (malformed, over a limit, conflicting with the
//! current state) write nothing — so a refused call leaves the store exactly
//! as it was — unless `audit.refusals = "all"`. A call that states no target
//! (a read, a lease renewal, or a request the transport could not decode, so
//! no handler ran) is not recorded.
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

mod query;
mod record;
mod retention;
mod settings;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use prost::Message;
use strata_proto::v1::AuditEntry;

use crate::app::auth::{Action, Principal};
use crate::error::ApiError;
use crate::store::{
    KeyRange, Lease, LeaseId, LeaseInfo, RangeResponse, Revision, Store, StoreError, StoreStatus,
    Txn, TxnResponse, WatchStream, unix_now_ms,
};

pub use query::{Filter, authorize_query, query};
pub use record::{Auditor, Call};
pub use retention::retention;
pub use settings::{AuditFile, AuditSettings};

/// Prefix of every audit entry in the store.
pub const PREFIX: &str = "audit/";

const HOUR_MS: i64 = 3_600_000;
/// A pruning window: the first 8 of the 13 digits of a Unix millisecond
/// time, so every window is a key prefix.
const WINDOW_MS: i64 = 100_000;

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

// ---------------------------------------------------------------- targets

/// What a recorded call does; its name is the entry's `operation` (the
/// gRPC method's name, which the HTTP route doing the same shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Create a tenant.
    CreateTenant,
    /// Change a tenant's labels or TTL.
    UpdateTenant,
    /// Delete a tenant.
    DeleteTenant,
    /// Write a config layer.
    PutConfig,
    /// Delete a config layer.
    DeleteLayer,
    /// Restore a config layer as it was at a revision.
    Rollback,
    /// Register an instance.
    Register,
    /// Deregister an instance.
    Deregister,
    /// Drain an instance (or undo it).
    Drain,
    /// Register a branch: tenant, instances and config in one call.
    RegisterBranch,
    /// Import a backup.
    Import,
    /// Create a token.
    CreateToken,
    /// Revoke a token.
    RevokeToken,
    /// The daemon's health checker changed an instance's health.
    SetHealth,
    /// The daemon collected a tenant whose TTL ran out.
    ExpireTenant,
}

impl Operation {
    /// The name recorded in entries and filtered on by queries.
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateTenant => "CreateTenant",
            Self::UpdateTenant => "UpdateTenant",
            Self::DeleteTenant => "DeleteTenant",
            Self::PutConfig => "PutConfig",
            Self::DeleteLayer => "DeleteLayer",
            Self::Rollback => "Rollback",
            Self::Register => "Register",
            Self::Deregister => "Deregister",
            Self::Drain => "Drain",
            Self::RegisterBranch => "RegisterBranch",
            Self::Import => "Import",
            Self::CreateToken => "CreateToken",
            Self::RevokeToken => "RevokeToken",
            Self::SetHealth => "SetHealth",
            Self::ExpireTenant => "ExpireTenant",
        }
    }
}

/// What one mutating call is, as its handler states it and the audit log
/// records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What it does.
    pub operation: Operation,
    /// Project (empty for whole-store operations).
    pub project: String,
    /// Tenant (empty when it names none).
    pub tenant: String,
    /// What in the tenant: key, `service[/instance]`, token.
    pub subject: String,
}

impl Target {
    /// `operation` on `tenant` of `project`, naming no subject.
    pub fn new(operation: Operation, project: &str, tenant: &str) -> Self {
        Self {
            operation,
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            subject: String::new(),
        }
    }

    /// The same target naming `subject`.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }
}

// ---------------------------------------------------------------- scope

#[derive(Debug)]
struct Scope {
    actor_id: Arc<str>,
    actor_name: Arc<str>,
    /// What the handler stated; unset for reads.
    target: OnceLock<Target>,
    transport: &'static str,
    member: Arc<str>,
    /// A transaction of this call committed with the entry.
    written: AtomicBool,
    revision: AtomicI64,
}

impl Scope {
    fn new(
        actor_id: Arc<str>,
        actor_name: Arc<str>,
        transport: &'static str,
        member: Arc<str>,
    ) -> Self {
        Self {
            actor_id,
            actor_name,
            target: OnceLock::new(),
            transport,
            member,
            written: AtomicBool::new(false),
            revision: AtomicI64::new(0),
        }
    }

    fn entry(&self, target: &Target, time_unix_ms: i64, result: &str, message: &str) -> AuditEntry {
        AuditEntry {
            time_unix_ms,
            actor_token_id: self.actor_id.to_string(),
            actor_name: self.actor_name.to_string(),
            operation: target.operation.name().to_owned(),
            project: target.project.clone(),
            tenant: target.tenant.clone(),
            subject: target.subject.clone(),
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

/// States what the current call is about to change. The first statement of
/// a call counts; outside an audited call (a unit test, a background task
/// not run through [`as_daemon`]) it does nothing.
pub fn declare(target: Target) {
    let _ = SCOPE.try_with(|scope| scope.target.set(target));
}

/// States `target` (see [`declare`]), then authorizes `principal` to do
/// `action` on its project and tenant: a denied attempt is recorded with
/// the same fields as the change would have been.
pub fn authorize(principal: &Principal, action: Action, target: Target) -> Result<(), ApiError> {
    let result = principal.authorize(action, &target.project, &target.tenant);
    declare(target);
    result
}

/// [`authorize`] for a gRPC request, with the principal the authentication
/// layer put into it.
pub fn allow<T>(
    request: &tonic::Request<T>,
    action: Action,
    target: Target,
) -> Result<(), ApiError> {
    match crate::app::auth::principal_of(request.extensions()) {
        Ok(principal) => authorize(principal, action, target),
        Err(e) => {
            declare(target);
            Err(e)
        }
    }
}

/// Runs `work` as the daemon itself (`actor` names the job, e.g.
/// `tenant-ttl`): its committed transactions are recorded like a caller's.
pub async fn as_daemon<F: std::future::Future>(target: Target, actor: &str, work: F) -> F::Output {
    let scope = Scope::new("stratad".into(), actor.into(), "internal", "".into());
    let _ = scope.target.set(target);
    SCOPE.scope(Arc::new(scope), work).await
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
        let Some((scope, target)) = scope
            .filter(|s| !s.written.load(Ordering::Acquire))
            .and_then(|s| s.target.get().cloned().map(|t| (s, t)))
        else {
            return self.inner.txn(txn).await;
        };
        let now = unix_now_ms();
        let entry = scope.entry(&target, now, "ok", "");
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

    #[tokio::test]
    async fn the_first_stated_target_counts_and_a_denial_still_states_it() {
        let reader = Principal {
            role: crate::app::auth::Role::Read,
            ..Principal::anonymous()
        };
        let scope = Arc::new(Scope::new("id".into(), "reader".into(), "grpc", "".into()));
        let put = Target::new(Operation::PutConfig, "vega", "feat-1").subject("a.yaml");
        let denied = SCOPE
            .scope(Arc::clone(&scope), async {
                let denied = authorize(&reader, Action::WriteConfig, put.clone());
                declare(Target::new(Operation::DeleteLayer, "x", "y"));
                denied
            })
            .await;
        assert!(denied.is_err());
        assert_eq!(scope.target.get(), Some(&put));
        let entry = scope.entry(&put, 5, "permission_denied", "no");
        assert_eq!(
            (
                entry.operation.as_str(),
                entry.tenant.as_str(),
                entry.subject.as_str()
            ),
            ("PutConfig", "feat-1", "a.yaml")
        );
        // Outside a scope, stating is a no-op.
        declare(put);
    }
}
