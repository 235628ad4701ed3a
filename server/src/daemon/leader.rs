//! Leader election for the jobs that must run on exactly one replica
//! (health probes, tenant TTL collection, compaction, audit retention,
//! instance gauges).
//!
//! Built on the store trait alone, so it works the same over etcd and the
//! embedded store (where the one daemon simply always wins): a replica
//! grants a lease and creates the leader key under it only if the key is
//! missing. The winner keeps the lease alive and runs the jobs under a
//! cancellation token for its *term*; when a keep-alive fails (the lease
//! expired, or the store is unreachable for longer than the TTL) the term
//! ends and the jobs are cancelled. The others watch the key and campaign
//! again as soon as it is deleted — by the leader's revoke on shutdown, or
//! by its lease expiring when it died — so a new leader takes over within
//! the lease TTL.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::store::{Compare, EventKind, KeyRange, LeaseId, Revision, Store, StoreError, Txn};

/// Store key of the leader record (outside every domain prefix, so the view
/// ignores it). Its value is the leader's member name.
pub const LEADER_KEY: &[u8] = b"leader/stratad";

/// Lease TTL of a term: how long the replicas go without a leader when the
/// leader dies without revoking.
pub const DEFAULT_TERM_TTL_SECONDS: i64 = 3;

/// Pause before campaigning again after a store error.
const RETRY: Duration = Duration::from_millis(500);

/// Who leads, as this replica last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This replica leads.
    Leader,
    /// Another replica (named) leads.
    Follower(String),
}

/// Campaigns for leadership until `shutdown`, running `jobs(term)` for each
/// term this replica wins; `term` is cancelled when the term ends. The jobs'
/// future should return once `term` is cancelled.
pub async fn run<F, Fut>(
    store: Arc<dyn Store>,
    member: String,
    ttl_seconds: i64,
    shutdown: CancellationToken,
    jobs: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    metrics::gauge!("strata_leader").set(0.0);
    while !shutdown.is_cancelled() {
        match campaign(store.as_ref(), &member, ttl_seconds).await {
            Ok((Role::Leader, lease, _)) => {
                tracing::info!(%member, lease, "elected leader; starting leader-only jobs");
                metrics::gauge!("strata_leader").set(1.0);
                metrics::counter!("strata_leader_terms_total").increment(1);
                let term = shutdown.child_token();
                // Polled together, so the jobs never outlive this future.
                let ((), lost) = tokio::join!(jobs(term.clone()), async {
                    let lost = hold(store.as_ref(), lease, ttl_seconds, &shutdown).await;
                    term.cancel();
                    lost
                });
                metrics::gauge!("strata_leader").set(0.0);
                if let Some(why) = lost {
                    tracing::warn!(%member, reason = %why, "lost leadership; leader-only jobs stopped");
                } else {
                    // Step down at once so another replica need not wait for
                    // the lease to expire.
                    if let Err(e) = store.lease_revoke(lease).await {
                        tracing::warn!(error = %e, "could not release leadership on shutdown");
                    }
                    return;
                }
            }
            Ok((Role::Follower(leader), lease, seen)) => {
                tracing::debug!(%member, %leader, "following");
                if let Err(e) = store.lease_revoke(lease).await {
                    tracing::debug!(error = %e, "could not revoke an unused campaign lease");
                }
                wait_for_vacancy(store.as_ref(), seen, ttl_seconds, &shutdown).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader campaign failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// One attempt: creates the leader key under a fresh lease if it is
/// missing. Returns the role, the campaign lease, and the revision read.
async fn campaign(
    store: &dyn Store,
    member: &str,
    ttl_seconds: i64,
) -> Result<(Role, LeaseId, Revision), StoreError> {
    let lease = store.lease_grant(ttl_seconds).await?.id;
    let txn = Txn::new()
        .when(Compare::missing(LEADER_KEY))
        .put_with_lease(LEADER_KEY, member.as_bytes(), lease);
    let response = match store.txn(txn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = store.lease_revoke(lease).await;
            return Err(e);
        }
    };
    if response.succeeded {
        return Ok((Role::Leader, lease, response.revision));
    }
    let current = store.range(KeyRange::key(LEADER_KEY)).await?;
    let leader = current
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    Ok((Role::Follower(leader), lease, current.revision))
}

/// Keeps the term's lease alive until `shutdown` (`None`) or until the term
/// is lost (`Some(reason)`).
///
/// The term is over, as far as this replica may assume, one TTL after the
/// last renewal was *sent* (etcd counts from when it received it, which is
/// later): a renewal that has not been answered by then is abandoned rather
/// than awaited, because meanwhile the lease may have expired and another
/// replica may be leading. A store call may otherwise take its whole
/// request timeout (10 s on etcd), far longer than the TTL.
async fn hold(
    store: &dyn Store,
    lease: LeaseId,
    ttl_seconds: i64,
    shutdown: &CancellationToken,
) -> Option<String> {
    let ttl = Duration::from_secs(u64::try_from(ttl_seconds.max(1)).unwrap_or(1));
    let every = ttl / 3;
    let mut term_ends = tokio::time::Instant::now() + ttl;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(every) => {}
        }
        let sent = tokio::time::Instant::now();
        if sent >= term_ends {
            return Some("could not renew the term within its TTL".into());
        }
        let renewal = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = tokio::time::timeout_at(term_ends, store.lease_keep_alive(lease)) => r,
        };
        match renewal {
            Ok(Ok(_)) => term_ends = sent + ttl,
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                return Some("the term's lease expired".into());
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "could not renew the leader term; retrying");
            }
            Err(_) => {
                return Some(format!(
                    "could not renew the term within its TTL ({ttl:?}): the store did not answer"
                ));
            }
        }
    }
}

/// Returns once the leader key is deleted after `seen` (or the watch cannot
/// tell, in which case a new campaign settles it), or on `shutdown`.
async fn wait_for_vacancy(
    store: &dyn Store,
    seen: Revision,
    ttl_seconds: i64,
    shutdown: &CancellationToken,
) {
    let mut watch = match store.watch(KeyRange::key(LEADER_KEY), seen + 1).await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch the leader key; polling");
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(RETRY) => {}
            }
            return;
        }
    };
    // A periodic re-check covers a watch that silently stalls.
    let recheck = Duration::from_secs(u64::try_from(ttl_seconds.max(1)).unwrap_or(1) * 2);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(recheck) => return,
            next = watch.next() => next,
        };
        match next {
            Some(Ok(batch)) if batch.events.iter().any(|e| e.kind == EventKind::Delete) => return,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn one_leader_at_a_time_and_a_successor_after_step_down() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let leading = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let terms = Arc::new(AtomicUsize::new(0));
        let mut replicas = Vec::new();
        for i in 0..3 {
            let shutdown = CancellationToken::new();
            let (leading, most, terms) = (leading.clone(), most.clone(), terms.clone());
            let task = tokio::spawn(run(
                Arc::clone(&store),
                format!("replica-{i}"),
                1,
                shutdown.clone(),
                move |term: CancellationToken| {
                    let (leading, most, terms) = (leading.clone(), most.clone(), terms.clone());
                    async move {
                        terms.fetch_add(1, Ordering::SeqCst);
                        let now = leading.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        term.cancelled().await;
                        leading.fetch_sub(1, Ordering::SeqCst);
                    }
                },
            ));
            replicas.push((shutdown, task));
        }
        let wait_for = |n: usize| {
            let terms = terms.clone();
            async move {
                for _ in 0..100 {
                    if terms.load(Ordering::SeqCst) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("no term {n} within 5 s");
            }
        };
        wait_for(1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(terms.load(Ordering::SeqCst), 1, "exactly one leader");
        // Whoever leads steps down: another takes over.
        let leader = store.get(LEADER_KEY).await.unwrap().unwrap();
        let name = String::from_utf8(leader.value).unwrap();
        let index: usize = name.trim_start_matches("replica-").parse().unwrap();
        let (shutdown, task) = replicas.remove(index);
        shutdown.cancel();
        task.await.unwrap();
        wait_for(2).await;
        let successor = store.get(LEADER_KEY).await.unwrap().unwrap();
        assert_ne!(successor.value, name.as_bytes());
        for (shutdown, task) in replicas {
            shutdown.cancel();
            task.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1, "never two leaders at once");
        assert_eq!(leading.load(Ordering::SeqCst), 0);
    }

    /// The embedded store, except that lease renewals can be made to hang
    /// (a store that stopped answering).
    struct Stalling {
        inner: EmbeddedStore,
        stall: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Stalling {
        fn kind(&self) -> &'static str {
            "stalling"
        }
        async fn range(&self, range: KeyRange) -> Result<crate::store::RangeResponse, StoreError> {
            self.inner.range(range).await
        }
        async fn txn(&self, txn: Txn) -> Result<crate::store::TxnResponse, StoreError> {
            self.inner.txn(txn).await
        }
        async fn watch(
            &self,
            range: KeyRange,
            start_revision: Revision,
        ) -> Result<crate::store::WatchStream, StoreError> {
            self.inner.watch(range, start_revision).await
        }
        async fn lease_grant(&self, ttl_seconds: i64) -> Result<crate::store::Lease, StoreError> {
            self.inner.lease_grant(ttl_seconds).await
        }
        async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.lease_keep_alive(id).await
        }
        async fn lease_revoke(&self, id: LeaseId) -> Result<Revision, StoreError> {
            self.inner.lease_revoke(id).await
        }
        async fn lease_time_to_live(
            &self,
            id: LeaseId,
        ) -> Result<crate::store::LeaseInfo, StoreError> {
            self.inner.lease_time_to_live(id).await
        }
        async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
            self.inner.compact(revision).await
        }
        async fn status(&self) -> Result<crate::store::StoreStatus, StoreError> {
            self.inner.status().await
        }
    }

    /// A leader whose store stops answering renewals gives up its jobs
    /// within the term's TTL, instead of waiting out the store call while
    /// its lease may already have expired and another replica leads.
    #[tokio::test]
    async fn a_leader_that_cannot_renew_stops_its_jobs_within_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Stalling {
            inner: EmbeddedStore::open(dir.path()).unwrap(),
            stall: std::sync::atomic::AtomicBool::new(false),
        });
        let (started, ended) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::clone(&store) as Arc<dyn Store>,
            "only".into(),
            1,
            shutdown.clone(),
            {
                let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
                move |term: CancellationToken| {
                    let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
                    async move {
                        started.notify_one();
                        term.cancelled().await;
                        ended.notify_one();
                    }
                }
            },
        ));
        tokio::time::timeout(Duration::from_secs(5), started.notified())
            .await
            .expect("elected");
        // Renewals work for a while, then hang.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        store.stall.store(true, Ordering::SeqCst);
        let stalled = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), ended.notified())
            .await
            .expect("the term ends although the renewal never returns");
        // At most one TTL after the last renewal sent before the stall,
        // which was at most a third of a TTL before it.
        assert!(
            stalled.elapsed() <= Duration::from_millis(1_000 + 200),
            "jobs ran {:?} after renewals stopped",
            stalled.elapsed()
        );
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }

    #[tokio::test]
    async fn a_dead_leader_is_replaced_once_its_lease_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let spawn = |name: &str| {
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(run(
                Arc::clone(&store),
                name.to_owned(),
                1,
                shutdown.clone(),
                |term: CancellationToken| async move { term.cancelled().await },
            ));
            (shutdown, task)
        };
        let leader_name = || async {
            store
                .get(LEADER_KEY)
                .await
                .unwrap()
                .map(|kv| String::from_utf8(kv.value).unwrap())
        };
        let (_first_shutdown, first) = spawn("first");
        for _ in 0..100 {
            if leader_name().await.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(leader_name().await.as_deref(), Some("first"));
        let (second_shutdown, second) = spawn("second");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(leader_name().await.as_deref(), Some("first"));
        // The leader dies without stepping down (no revoke).
        first.abort();
        let died = tokio::time::Instant::now();
        loop {
            if leader_name().await.as_deref() == Some("second") {
                break;
            }
            assert!(
                died.elapsed() < Duration::from_secs(5),
                "no successor within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        second_shutdown.cancel();
        second.await.unwrap();
    }
}
