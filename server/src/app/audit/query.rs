//! Reading the audit log: filters, newest first, bounded per query.

use prost::Message;
use serde::Deserialize;
use strata_proto::v1::{AuditEntry, ErrorReason, QueryAuditRequest};

use super::{AuditSettings, HOUR_MS, hour_prefix};
use crate::error::ApiError;
use crate::store::{KeyRange, Revision, Store, unix_now_ms};

/// Default and largest number of entries one query returns.
const DEFAULT_QUERY_LIMIT: usize = 100;
const MAX_QUERY_LIMIT: usize = 10_000;

/// The single place that decides who may read the audit log: admin tokens
/// valid for every project.
pub fn authorize_query(principal: &crate::app::auth::Principal) -> Result<(), ApiError> {
    principal.require_admin()
}

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
