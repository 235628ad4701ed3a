//! Background jobs of the daemon. For now: automatic history compaction,
//! keeping `retain_revisions` revisions behind the current one.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::daemon::settings::CompactionConfig;
use crate::store::{Store, StoreError};

/// Compacts the store every `config.interval` until `shutdown` fires.
pub async fn compaction(
    store: Arc<dyn Store>,
    config: CompactionConfig,
    shutdown: CancellationToken,
) {
    if config.retain_revisions == 0 {
        return;
    }
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let code = match compact_once(store.as_ref(), config.retain_revisions).await {
            Ok(Some(revision)) => {
                tracing::info!(revision, "compacted store history");
                "ok"
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "history compaction failed; will retry");
                "error"
            }
        };
        metrics::counter!("strata_compactions_total", "code" => code).increment(1);
    }
}

/// Compacts up to `retain` revisions behind the current one, if that moves
/// the compaction point. Returns the new compaction point.
pub async fn compact_once(store: &dyn Store, retain: i64) -> Result<Option<i64>, StoreError> {
    let status = store.status().await?;
    let target = status.revision - retain;
    if target <= status.compacted_revision {
        return Ok(None);
    }
    match store.compact(target).await {
        Ok(()) => {
            metrics::gauge!("strata_store_compacted_revision").set(target as f64);
            Ok(Some(target))
        }
        // Someone else (another replica) compacted further meanwhile.
        Err(StoreError::Compacted { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn compacts_to_retention_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for i in 0..10 {
            store.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
        }
        let current = store.status().await.unwrap().revision;
        assert_eq!(compact_once(&store, 3).await.unwrap(), Some(current - 3));
        assert_eq!(
            store.status().await.unwrap().compacted_revision,
            current - 3
        );
        assert_eq!(compact_once(&store, 3).await.unwrap(), None);
        assert_eq!(compact_once(&store, 100).await.unwrap(), None);
    }
}
