//! Leader-only pruning of the audit log to its count and age.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{AuditSettings, PREFIX, WINDOW_MS, key_time, window_prefix};
use crate::store::{KeyRange, Revision, Store, StoreError, Txn, unix_now_ms};

/// Most keys one pruning transaction deletes (etcd allows 128 operations).
const DELETES_PER_TXN: usize = 100;
/// Most pruning transactions per run, so a lowered limit is caught up with
/// over several runs instead of in one burst.
const TXNS_PER_RUN: usize = 10;

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
