//! Logs and metrics: the `tracing` subscriber and the process-wide Prometheus
//! recorder, plus the RPC/HTTP request metrics middleware.
//!
//! Metric names follow docs/metrics.md: prefix `strata_`, unit suffixes,
//! and only bounded labels (`op`, `code`; later `project`, `tenant`,
//! `service`) — never an instance id or a key.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use serde::Deserialize;

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

/// Latency buckets (seconds) shared by every duration histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the global `tracing` subscriber writing to stderr, plus the
/// OpenTelemetry span export when `tracing` runs (the log filter applies
/// to the log output only, so it never hides spans from traces).
pub fn init_logging(
    config: &LogConfig,
    tracing: Option<&crate::tracing_otel::Tracing>,
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
        .with(tracing.map(crate::tracing_otel::Tracing::layer))
        .try_init()
        .map_err(|e| e.to_string())
}

/// Returns the process-wide Prometheus handle, installing the recorder on
/// first use (several in-process daemons, as in tests, share it).
pub fn prometheus() -> Result<PrometheusHandle, String> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// Keeps the exporter's histogram storage bounded; run for the daemon's life.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
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

/// The metric handles of one `op` label value, so that a request costs no
/// label allocation and no look-up in the recorder's registry.
struct OpMetrics {
    duration: Histogram,
    /// `strata_rpc_requests_total` by code; a handful per op.
    codes: RwLock<Vec<(Box<str>, Counter)>>,
    op: Box<str>,
}

impl OpMetrics {
    fn new(op: &str) -> Self {
        Self {
            duration: metrics::histogram!("strata_rpc_duration_seconds", "op" => op.to_owned()),
            codes: RwLock::new(Vec::new()),
            op: op.into(),
        }
    }

    fn count(&self, code: &str) {
        let known = self
            .codes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(c, _)| &**c == code)
            .map(|(_, counter)| counter.clone());
        let counter = known.unwrap_or_else(|| {
            let mut codes = self.codes.write().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, counter)) = codes.iter().find(|(c, _)| &**c == code) {
                return counter.clone();
            }
            let counter = metrics::counter!(
                "strata_rpc_requests_total",
                "op" => self.op.to_string(),
                "code" => code.to_owned()
            );
            codes.push((code.into(), counter.clone()));
            counter
        });
        counter.increment(1);
    }
}

/// Metric handles by route: the gRPC method path, or the HTTP route
/// template with its methods. Bounded like the labels themselves: only
/// routes that exist get an entry (a gRPC path the daemon does not serve is
/// counted as `unmatched` and never cached, whatever it was answered).
type OpCache = RwLock<HashMap<Box<str>, Vec<(http::Method, Arc<OpMetrics>)>>>;

fn op_cache() -> &'static OpCache {
    static CACHE: OnceLock<OpCache> = OnceLock::new();
    CACHE.get_or_init(OpCache::default)
}

/// The route part of a request's `op` label: the gRPC method path, the
/// matched HTTP route template, or `None` for an HTTP request no route took.
fn route_of(request: &Request) -> Option<&str> {
    if crate::grpc_methods::is_grpc(request.headers()) {
        return Some(request.uri().path());
    }
    request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
}

fn cached_op(route: &str, method: &http::Method) -> Option<Arc<OpMetrics>> {
    op_cache()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(route)?
        .iter()
        .find(|(m, _)| m == method)
        .map(|(_, op)| Arc::clone(op))
}

fn insert_op(route: &str, method: &http::Method, op: &str) -> Arc<OpMetrics> {
    let mut cache = op_cache().write().unwrap_or_else(PoisonError::into_inner);
    let methods = cache.entry(route.into()).or_default();
    if let Some((_, existing)) = methods.iter().find(|(m, _)| m == method) {
        return Arc::clone(existing);
    }
    let metrics = Arc::new(OpMetrics::new(op));
    methods.push((method.clone(), Arc::clone(&metrics)));
    metrics
}

fn unmatched() -> &'static OpMetrics {
    static UNMATCHED: OnceLock<OpMetrics> = OnceLock::new();
    UNMATCHED.get_or_init(|| OpMetrics::new("unmatched"))
}

/// Middleware recording `strata_rpc_requests_total{op,code}` and
/// `strata_rpc_duration_seconds{op}` for every gRPC and HTTP request.
///
/// `op` is a bounded label value: the gRPC method path for a method the
/// daemon serves, `METHOD /route/{param}` for HTTP, `unmatched` for
/// anything else (an unknown gRPC path, an HTTP request no route took). The metric handles of each op are made once and cached, since
/// building the labels and finding the series took measurable time per
/// request at registry write rates.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let grpc = crate::grpc_methods::is_grpc(request.headers());
    let method = request.method().clone();
    // The route is copied only when it has no entry yet.
    let (cached, route) = match route_of(&request) {
        Some(route) => match cached_op(route, &method) {
            Some(op) => (Some(op), None),
            None => (None, Some(route.to_owned())),
        },
        None => (None, None),
    };
    let response = next.run(request).await;
    let status = response.status();
    let code: &str = match response.headers().get("grpc-status") {
        Some(v) => grpc_code_name(v.to_str().unwrap_or("2")),
        None if grpc => "OK",
        None => status.as_str(),
    };
    let handles = cached.or_else(|| {
        let route = route?;
        // Only methods the daemon serves may become a label (the cache
        // holds nothing else, so a hit needs no check): the path of any
        // other request is client input, and every distinct one would keep
        // a series and a cache entry for the daemon's life.
        if grpc && !crate::grpc_methods::grpc_methods().contains_key(route.as_str()) {
            return None;
        }
        let label = if grpc {
            route.clone()
        } else {
            format!("{method} {route}")
        };
        Some(insert_op(&route, &method, &label))
    });
    let op: &OpMetrics = match &handles {
        Some(op) => op,
        None => unmatched(),
    };
    op.count(code);
    op.duration.record(started.elapsed().as_secs_f64());
    response
}

/// The canonical name of a gRPC status code (`NOT_FOUND`), `UNKNOWN` for
/// anything that is not one.
fn grpc_code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from_i32) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Ok(tonic::Code::Unknown) | Err(_) => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_render_as_canonical_names() {
        assert_eq!(grpc_code_name("0"), "OK");
        assert_eq!(grpc_code_name("5"), "NOT_FOUND");
        assert_eq!(grpc_code_name("12"), "UNIMPLEMENTED");
        assert_eq!(grpc_code_name("14"), "UNAVAILABLE");
        assert_eq!(grpc_code_name("x"), "UNKNOWN");
        assert_eq!(grpc_code_name("3"), "INVALID_ARGUMENT");
        assert_eq!(grpc_code_name("16"), "UNAUTHENTICATED");
    }
}
