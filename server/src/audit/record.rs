//! The recording middleware: opens the scope handlers state their target
//! in, and after the call writes what the store wrapper did not (refusals,
//! successes that wrote nothing, the failure of a call that committed part
//! of its work), within each token's refusal budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prost::Message;
use strata_proto::v1::{AuditEntry, ErrorDetail, ErrorReason};

use super::{AuditSettings, SCOPE, Scope, entry_key};
use crate::error::ApiError;
use crate::store::{Store, Txn, unix_now_ms};

/// The audit log of one daemon: where entries go and what is recorded.
pub struct Auditor {
    /// The store without [`AuditingStore`] (refusal entries are written
    /// directly).
    store: Arc<dyn Store>,
    member: Arc<str>,
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
    let (actor_id, actor_name) = match request.extensions().get::<crate::auth::Principal>() {
        Some(p) => (Arc::clone(&p.token_id), Arc::clone(&p.name)),
        None => ("anonymous".into(), "anonymous".into()),
    };
    let scope = Arc::new(Scope::new(
        actor_id,
        actor_name,
        if grpc { "grpc" } else { "http" },
        Arc::clone(&auditor.member),
    ));
    let response = SCOPE.scope(Arc::clone(&scope), next.run(request)).await;
    // Reads and renewals state nothing: nothing to record.
    let Some(target) = scope.target.get() else {
        return response;
    };
    let (response, failed) = failure(grpc, response).await;
    let written = scope.written.load(Ordering::Acquire);
    match failed {
        // Recorded with the committed transaction.
        None if written => {}
        None => {
            auditor
                .append(&scope.entry(target, unix_now_ms(), "ok", ""))
                .await
        }
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
                let mut entry = scope.entry(target, now_ms, &code, &message);
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
            auditor
                .append(&scope.entry(target, now_ms, &code, &message))
                .await;
        }
    }
    response
}

// ---------------------------------------------------------------- query

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_engine::decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_engine::decode(b"aGVsbG8").unwrap(), b"hello");
        assert!(base64_engine::decode(b"a*").is_none());
    }

    /// Refusals of one token are recorded up to the budget per minute; the
    /// rest are counted and summed up in the token's next recorded refusal,
    /// and other tokens are unaffected.
    #[test]
    fn refusals_beyond_the_budget_are_counted_not_recorded() {
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
