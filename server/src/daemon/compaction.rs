//! Automatic history compaction (leader-only), keeping `retain_revisions`
//! revisions behind the current one; and its `[compaction]` settings.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::settings_error::{SettingsError, Sourced};
use crate::store::{Store, StoreError};

/// Automatic compaction of store history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Revisions of history kept behind the current one (watch resume and
    /// config history reach back this far). 0 disables automatic compaction.
    pub retain_revisions: i64,
    /// How often the compaction job runs.
    pub interval: Duration,
}

/// The `[compaction]` table of the configuration file.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionFile {
    /// Revisions kept behind the current one (0: off).
    pub retain_revisions: Option<i64>,
    /// How often the job runs (`5m`).
    pub interval: Option<String>,
}

impl CompactionConfig {
    /// The compaction settings from their merged values; errors name the
    /// setting and its source.
    pub fn from_settings(
        retain_revisions: &Sourced<i64>,
        interval: &Sourced<String>,
    ) -> Result<Self, SettingsError> {
        let parsed = humantime::parse_duration(interval.value.trim()).map_err(|e| {
            SettingsError::invalid(
                "compaction.interval",
                &interval.source,
                format!("{:?} is not a duration like 10s or 5m: {e}", interval.value),
            )
        })?;
        if parsed.is_zero() {
            return Err(SettingsError::invalid(
                "compaction.interval",
                &interval.source,
                "must be longer than zero",
            ));
        }
        if retain_revisions.value < 0 {
            return Err(SettingsError::invalid(
                "compaction.retain_revisions",
                &retain_revisions.source,
                format!(
                    "must be 0 (off) or positive, got {}",
                    retain_revisions.value
                ),
            ));
        }
        Ok(Self {
            retain_revisions: retain_revisions.value,
            interval: parsed,
        })
    }
}

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
