//! Recording one call: the scope handlers state their target in
//! ([`Call`]), and after the call what the store wrapper did not write
//! (refusals, successes that wrote nothing, the failure of a call that
//! committed part of its work), within each token's refusal budget. The
//! middleware that opens a call per request and reads its outcome from the
//! response is `transport::layers::audit`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use strata_proto::v1::AuditEntry;

use crate::app::auth::Principal;

use super::{AuditSettings, SCOPE, Scope, entry_key};
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

/// One audited call: the scope its handler states its target in.
#[derive(Debug, Clone)]
pub struct Call(Arc<Scope>);

impl Call {
    /// A call by `principal` (anonymous when none) over `transport`
    /// (`grpc`, `http`).
    pub fn open(auditor: &Auditor, principal: Option<&Principal>, transport: &'static str) -> Self {
        let (actor_id, actor_name) = match principal {
            Some(p) => (Arc::clone(&p.token_id), Arc::clone(&p.name)),
            None => ("anonymous".into(), "anonymous".into()),
        };
        Self(Arc::new(Scope::new(
            actor_id,
            actor_name,
            transport,
            Arc::clone(&auditor.member),
        )))
    }

    /// Runs the call's handler inside the scope.
    pub async fn run<F: std::future::Future>(&self, handler: F) -> F::Output {
        SCOPE.scope(Arc::clone(&self.0), handler).await
    }

    /// Whether the handler stated a target (reads and renewals do not).
    pub fn stated(&self) -> bool {
        self.0.target.get().is_some()
    }
}

impl Auditor {
    /// Records the end of `call`: `failed` is the error code and message it
    /// answered with, `None` for success. Nothing when the call stated no
    /// target.
    pub async fn finish(&self, call: &Call, failed: Option<(String, String)>) {
        let scope = &call.0;
        let Some(target) = scope.target.get() else {
            return;
        };
        let written = scope.written.load(Ordering::Acquire);
        match failed {
            // Recorded with the committed transaction.
            None if written => {}
            None => {
                self.append(&scope.entry(target, unix_now_ms(), "ok", ""))
                    .await;
            }
            // Malformed, over-limit and conflicting calls change nothing and
            // are counted by `strata_rpc_requests_total{code}`; writing each
            // would let any caller turn garbage into store writes.
            // A call that already committed part of its work (an import that
            // failed after its first transaction) always gets its failure
            // recorded, or the log would show only its first commit as `ok`.
            Some((code, _))
                if !written
                    && code != "permission_denied"
                    && !self.settings.record_all_refusals => {}
            Some((code, mut message)) => {
                let now_ms = unix_now_ms();
                if written {
                    // A multi-transaction call (import) that failed part way:
                    // its first commit is recorded as ok, the failure here.
                    let mut entry = scope.entry(target, now_ms, &code, &message);
                    entry.revision = scope.revision.load(Ordering::Acquire);
                    self.append(&entry).await;
                    return;
                }
                let per_minute = self.settings.max_refusals_per_minute;
                if per_minute > 0 {
                    let verdict = self
                        .refusals
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .admit(&scope.actor_id, per_minute, now_ms);
                    match verdict {
                        RefusalVerdict::Suppress => {
                            metrics::counter!("strata_audit_refusals_suppressed_total")
                                .increment(1);
                            return;
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
                self.append(&scope.entry(target, now_ms, &code, &message))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
