//! Logs and metrics: the `tracing` subscriber and the process-wide Prometheus
//! recorder (the request metrics middleware is `transport::layers::metrics`).
//!
//! Metric names follow docs/metrics.md: prefix `strata_`, unit suffixes,
//! and only bounded labels (`op`, `code`; later `project`, `tenant`,
//! `service`) — never an instance id or a key.

use metrics_exporter_prometheus::PrometheusHandle;

use serde::Deserialize;

use crate::settings_error::{SettingsError, Sourced};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `tracing_subscriber::EnvFilter` directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// The `[log]` table of the configuration file (also `--log-level`,
/// `--log-format`, `STRATA_LOG_LEVEL`, `STRATA_LOG_FORMAT`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// A `tracing` filter (`info`, `strata_server=debug,info`).
    pub level: Option<String>,
    /// `text` or `json`.
    pub format: Option<String>,
}

impl LogConfig {
    /// The log settings from their merged values; errors name the setting
    /// and its source.
    pub fn from_settings(
        level: &Sourced<String>,
        format: &Sourced<String>,
    ) -> Result<Self, SettingsError> {
        let parsed_format = match format.value.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(SettingsError::invalid(
                    "log.format",
                    &format.source,
                    format!("{other:?} is not one of: text, json"),
                ));
            }
        };
        let filter = level.value.trim().to_owned();
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&filter) {
            return Err(SettingsError::invalid(
                "log.level",
                &level.source,
                format!("{filter:?}: {e}"),
            ));
        }
        Ok(Self {
            level: filter,
            format: parsed_format,
        })
    }
}

/// Latency buckets (seconds) shared by every duration histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the global `tracing` subscriber writing to stderr, plus the
/// OpenTelemetry span export when `tracing` runs (the log filter applies
/// to the log output only, so it never hides spans from traces).
pub fn init_logging(
    config: &LogConfig,
    tracing: Option<&crate::transport::layers::tracing::Tracing>,
) -> Result<(), String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter =
        tracing_subscriber::EnvFilter::try_new(&config.level).map_err(|e| e.to_string())?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(tracing.map(crate::transport::layers::tracing::Tracing::layer))
        .try_init()
        .map_err(|e| e.to_string())
}

/// Returns the process-wide Prometheus handle, installing the recorder on
/// first use (several in-process daemons, as in tests, share it).
pub fn prometheus() -> Result<PrometheusHandle, String> {
    strata_metrics::install(LATENCY_BUCKETS, describe)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "strata_rpc_requests_total",
        "gRPC and HTTP requests handled, by op and code."
    );
    describe_histogram!(
        "strata_rpc_duration_seconds",
        Unit::Seconds,
        "Time to answer a request (for streams: until the response starts), by op."
    );
    describe_histogram!(
        "strata_store_write_duration_seconds",
        Unit::Seconds,
        "Time to durably commit one group-commit batch (embedded: apply to fsync; etcd: one request)."
    );
    describe_histogram!(
        "strata_store_write_batch_size",
        "Requests committed together by one group-commit batch."
    );
    describe_counter!(
        "strata_store_lease_expired_total",
        "Leases the embedded store expired (their TTL ran out without a keep-alive); their keys \
         were deleted with them."
    );
    describe_counter!(
        "strata_registry_registrations_total",
        "Instance registrations and re-registrations acknowledged, by project and kind \
         (ephemeral, persistent)."
    );
    describe_counter!(
        "strata_registry_deregistrations_total",
        "Instance deregistrations acknowledged, by project."
    );
    describe_counter!(
        "strata_registry_branch_registrations_total",
        "Atomic branch registrations (RegisterBranch) acknowledged, by project."
    );
    describe_gauge!(
        "strata_registry_instances",
        "Registered instances, by project, tenant, kind and health."
    );
    describe_counter!(
        "strata_service_resolves_total",
        "Service resolutions answered, by project and whether they fell back to an ancestor \
         tenant."
    );
    describe_counter!(
        "strata_connections_refused_total",
        "Connections closed at accept because limits.max_connections were open."
    );
    describe_counter!(
        "strata_audit_refusals_suppressed_total",
        "Refused calls not written to the audit log because their token exceeded \
         audit.max_refusals_per_minute (each token's next recorded refusal counts them)."
    );
    describe_gauge!("strata_store_revision", "Latest committed store revision.");
    describe_gauge!(
        "strata_store_compacted_revision",
        "History below this revision is compacted."
    );
    describe_counter!(
        "strata_compactions_total",
        "Automatic history compactions, by code."
    );
    describe_gauge!(
        "strata_ready",
        "1 when the daemon is ready to serve, else 0."
    );
    describe_gauge!(
        "strata_build_info",
        "Always 1; labels carry the daemon version."
    );
}
