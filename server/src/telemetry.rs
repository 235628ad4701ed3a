//! Logs and metrics: the `tracing` subscriber and the process-wide Prometheus
//! recorder, plus the RPC/HTTP request metrics middleware.
//!
//! Metric names follow DESIGN.md section 7: prefix `strata_`, unit suffixes,
//! and only bounded labels (`op`, `code`; later `project`, `tenant`,
//! `service`) — never an instance id or a key.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};

/// Latency buckets (seconds) shared by every duration histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the global `tracing` subscriber writing to stderr.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&config.level).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| e.to_string())
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
        "Time to apply and durably commit one group-commit batch."
    );
    describe_histogram!(
        "strata_store_batch_requests",
        "Requests committed together by one group-commit batch."
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

/// Whether a request is gRPC (any `application/grpc*` content type).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Names the operation of a request with a bounded label value: the gRPC
/// method path for gRPC, `METHOD /route/{param}` for HTTP, `unmatched` for
/// anything that hit no route.
fn op_label(request: &Request) -> String {
    if is_grpc(request.headers()) {
        return request.uri().path().to_owned();
    }
    match request.extensions().get::<MatchedPath>() {
        Some(path) => format!("{} {}", request.method(), path.as_str()),
        None => "unmatched".to_owned(),
    }
}

/// Middleware recording `strata_rpc_requests_total{op,code}` and
/// `strata_rpc_duration_seconds{op}` for every gRPC and HTTP request.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut op = op_label(&request);
    let response = next.run(request).await;
    let code = match response.headers().get("grpc-status") {
        Some(v) => grpc_code_name(v.to_str().unwrap_or("2")),
        None if op.starts_with('/') => "OK".to_owned(),
        None => response.status().as_u16().to_string(),
    };
    // An unknown gRPC method must not mint a label value per method name.
    if code == "UNIMPLEMENTED" {
        op = "unmatched".to_owned();
    }
    metrics::counter!("strata_rpc_requests_total", "op" => op.clone(), "code" => code).increment(1);
    metrics::histogram!("strata_rpc_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    response
}

fn grpc_code_name(code: &str) -> String {
    let code = code
        .parse::<i32>()
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Unknown);
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_uppercase()).then_some('_');
            sep.into_iter().chain(c.to_uppercase())
        })
        .collect()
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
    }
}
