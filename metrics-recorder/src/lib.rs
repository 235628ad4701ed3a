//! The process-wide Prometheus recorder that `stratad` and
//! `strata-sidecar` install, and its upkeep: one place for what both
//! binaries do the same way, so neither can drift (a second recorder in one
//! process would fail to install).
//!
//! Each binary keeps its own buckets and metric descriptions; this crate
//! only installs them once per process.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// How often [`upkeep`] drains the exporter's histogram storage.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Returns the process-wide Prometheus handle, installing the recorder with
/// `buckets` (seconds, for every histogram) and running `describe` on first
/// use. Later calls — several in-process daemons in tests, or a sidecar
/// beside a daemon — get the same handle; their buckets and descriptions
/// are not applied again.
pub fn install(buckets: &[f64], describe: fn()) -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(buckets)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// Keeps the exporter's histogram storage bounded; run it for the life of
/// the process (abort the task to stop it).
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn describe() {
        metrics::describe_counter!("strata_metrics_test_total", "A counter of this test.");
    }

    #[test]
    fn the_recorder_is_installed_once_and_renders_what_is_recorded() {
        let first = install(&[0.1, 1.0], describe).unwrap();
        // A second install (another binary's settings) gets the same handle.
        let second = install(&[5.0], || {}).unwrap();
        metrics::counter!("strata_metrics_test_total").increment(3);
        let text = second.render();
        assert!(text.contains("strata_metrics_test_total 3"), "{text}");
        assert!(text.contains("A counter of this test."), "{text}");
        assert_eq!(first.render(), text);
    }
}
