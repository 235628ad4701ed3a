//! Prometheus metrics (docs/metrics.md naming): requests by service,
//! resolved tenant, fallback and status class, and a latency histogram.
//! Handles are looked up once per route when the routing table is built,
//! so a request only bumps atomics — no label hashing on the request path.

use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;

/// Latency buckets in seconds: 50 µs to 30 s (a sidecar hop is tens of
/// microseconds; the upstream's own time dominates the upper range).
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus handle, installing the recorder on first
/// use.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    strata_metrics::install(BUCKETS, describe)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "strata_sidecar_requests_total",
        "Requests and TCP connections routed, by service, resolved tenant, fallback and status class (code)."
    );
    describe_histogram!(
        "strata_sidecar_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to the upstream's response head (TCP: connection lifetime)."
    );
    describe_counter!(
        "strata_sidecar_ejections_total",
        "Instances ejected after consecutive failures."
    );
    describe_counter!(
        "strata_sidecar_upstream_retries_total",
        "Requests moved to another instance after a failed connect."
    );
    describe_counter!(
        "strata_sidecar_proxy_header_errors_total",
        "TCP connections on accept-proxy routes refused for a missing, malformed or late PROXY v2 header."
    );
    describe_counter!(
        "strata_sidecar_inbound_requests_total",
        "Calls through the inbound listener to the app, by calling tenant and status class (code)."
    );
    describe_histogram!(
        "strata_sidecar_inbound_request_duration_seconds",
        Unit::Seconds,
        "Time from an inbound call's arrival to the app's response head."
    );
    describe_counter!(
        "strata_sidecar_limit_hits_total",
        "Connections and requests cut off by a limit, by the setting that sets it (limit): max_connections, header_read_timeout, idle_timeout, tenant_learn_rate, max_unknown_tenants."
    );
    describe_gauge!(
        "strata_sidecar_routes",
        "Routes in the current table (tenant × service)."
    );
    describe_gauge!(
        "strata_sidecar_tenants",
        "Tenants whose routes the sidecar follows."
    );
}

/// The counter of hits of one limit (`limit`: the setting's name).
/// Creating it registers the series, so every limit shows up (at 0)
/// before its first hit.
pub fn limit_hits(project: &str, limit: &'static str) -> Counter {
    counter!(
        "strata_sidecar_limit_hits_total",
        "project" => project.to_owned(),
        "limit" => limit,
    )
}

/// Status classes, the `code` label: `1xx` … `5xx`, and `error` for a
/// request that got no HTTP status (a TCP connection that failed).
const CODES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// One route's metric handles.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    requests: [Counter; 6],
    duration: Histogram,
}

impl RouteMetrics {
    /// Handles for requests to `service` in `requested` resolving to
    /// `resolved` (the serving tenant; empty when nothing serves).
    pub fn new(project: &str, service: &str, resolved: &str, fallback: bool) -> Self {
        let labels = |code: &'static str| {
            counter!(
                "strata_sidecar_requests_total",
                "project" => project.to_owned(),
                "service" => service.to_owned(),
                "tenant" => resolved.to_owned(),
                "fallback" => if fallback { "true" } else { "false" },
                "code" => code,
            )
        };
        Self {
            requests: CODES.map(labels),
            duration: histogram!(
                "strata_sidecar_request_duration_seconds",
                "project" => project.to_owned(),
                "service" => service.to_owned(),
                "tenant" => resolved.to_owned(),
            ),
        }
    }

    /// Records one request with its HTTP status (`None`: no status).
    pub fn record(&self, status: Option<u16>, elapsed: Duration) {
        let class = match status {
            Some(s @ 100..=599) => usize::from(s / 100 - 1),
            _ => 5,
        };
        self.requests[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}
