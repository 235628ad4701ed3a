//! OpenTelemetry traces of `stratad`: when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set, every gRPC and HTTP request gets a server span — a child of the
//! W3C `traceparent` the caller sent (the SDK sends one) — exported over
//! OTLP/gRPC in batches.
//!
//! Off (the default) it costs nothing: [`Tracing::start`] returns `None`
//! without building an exporter or starting its batch thread, the `tracing`
//! subscriber gets no OpenTelemetry layer, and the router does not add
//! the [`trace_requests`] middleware ([`enabled`] is false).
//!
//! The variables are read by [`OtelConfig::from_env`] from the environment
//! `Config::load` is given, like every other setting.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::settings_error::SettingsError;

/// Span attribute keys shared with the SDK and the sidecar.
pub use strata_proto::names::attributes;

/// The OpenTelemetry default batch delay.
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);

/// Longest wait for the last spans at shutdown: a collector that is down
/// must not hold up the exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Set once an exporter runs; read by `transport::router::router` to add the middleware.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Trace export settings (standard `OTEL_*` variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    /// OTLP/gRPC collector (`http://host:4317`); `None`: off.
    pub endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Time between batch exports.
    pub schedule_delay: Duration,
    /// PEM CA bundle for an `https://` collector.
    pub ca_certificate: Option<PathBuf>,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "stratad".into(),
            schedule_delay: DEFAULT_SCHEDULE_DELAY,
            ca_certificate: None,
        }
    }
}

impl OtelConfig {
    /// Reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), `OTEL_SDK_DISABLED`,
    /// `OTEL_TRACES_EXPORTER` (`otlp` or `none`),
    /// `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` (only `grpc`),
    /// `OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY` (ms) and
    /// `OTEL_EXPORTER_OTLP[_TRACES]_CERTIFICATE`. Empty values count as
    /// unset, as the specification says.
    pub fn from_env<'a>(
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SettingsError> {
        let mut config = Self::default();
        let (mut endpoint, mut traces_endpoint) = (None, None);
        let (mut certificate, mut traces_certificate) = (None, None);
        let mut disabled = false;
        for (key, value) in env {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            let invalid = |setting: &'static str, message: &str| SettingsError::Invalid {
                setting,
                source_name: key.to_owned(),
                message: format!("{value:?}: {message}"),
            };
            match key {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => endpoint = Some(value.to_owned()),
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => traces_endpoint = Some(value.to_owned()),
                "OTEL_SERVICE_NAME" => config.service_name = value.to_owned(),
                "OTEL_BSP_SCHEDULE_DELAY" => {
                    let ms: u64 = value.parse().map_err(|_| {
                        invalid("OTEL_BSP_SCHEDULE_DELAY", "not a number of milliseconds")
                    })?;
                    config.schedule_delay = Duration::from_millis(ms);
                }
                "OTEL_EXPORTER_OTLP_CERTIFICATE" => certificate = Some(PathBuf::from(value)),
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE" => {
                    traces_certificate = Some(PathBuf::from(value));
                }
                "OTEL_SDK_DISABLED" => disabled |= value.eq_ignore_ascii_case("true"),
                "OTEL_TRACES_EXPORTER" => match value {
                    "otlp" => {}
                    "none" => disabled = true,
                    _ => {
                        return Err(invalid(
                            "OTEL_TRACES_EXPORTER",
                            "only `otlp` and `none` are supported",
                        ));
                    }
                },
                "OTEL_EXPORTER_OTLP_PROTOCOL" | "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                    if value != "grpc" =>
                {
                    return Err(invalid(
                        "OTEL_EXPORTER_OTLP_PROTOCOL",
                        "only `grpc` is supported (OTLP over gRPC)",
                    ));
                }
                _ => {}
            }
        }
        config.ca_certificate = traces_certificate.or(certificate);
        if disabled {
            return Ok(config);
        }
        let (source, endpoint) = match (traces_endpoint, endpoint) {
            (Some(e), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
            (None, Some(e)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", e),
            (None, None) => return Ok(config),
        };
        // `host:port` is taken as plaintext, like most OTLP exporters do.
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("http://{endpoint}")
        };
        let valid = endpoint.parse::<http::Uri>().ok().is_some_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        if !valid {
            return Err(SettingsError::Invalid {
                setting: "OTEL_EXPORTER_OTLP_ENDPOINT",
                source_name: source.to_owned(),
                message: format!("{endpoint:?}: expected http://host:port or https://host:port"),
            });
        }
        config.endpoint = Some(endpoint);
        Ok(config)
    }
}

/// The running exporter: owns the tracer provider and its batch thread.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Builds the OTLP/gRPC exporter and its batch processor, or returns
    /// `Ok(None)` — having built nothing — when `config` has no endpoint.
    /// Must run inside a Tokio runtime: the exporter's connection (made on
    /// the first export) lives on it.
    pub fn start(config: &OtelConfig) -> Result<Option<Self>, String> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(None);
        };
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone());
        if endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(path) = &config.ca_certificate {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("OTLP CA certificate {}: {e}", path.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            builder = builder.with_tls_config(tls);
        }
        let exporter = builder
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(config.schedule_delay)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Some(Self { provider }))
    }

    /// The `tracing` layer turning this crate's spans into OpenTelemetry
    /// spans. Only `strata_server` spans at `info` and above are exported:
    /// the log filter does not decide what is traced, and the exporter's
    /// own gRPC client (tonic, hyper, h2) is never traced into itself.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target("strata_server", tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("stratad"))
            .with_location(false)
            .with_threads(false)
            .with_filter(targets)
    }

    /// Exports the spans still queued and stops the batch thread (at most
    /// a few seconds). The wait happens off the runtime's threads, since
    /// the export itself runs on the runtime.
    pub async fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || {
            provider
                .shutdown_with_timeout(SHUTDOWN_TIMEOUT)
                .map_err(|e| e.to_string())
        })
        .await;
        match done {
            Ok(Ok(())) => tracing::debug!("spans flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "exporting the last spans failed"),
            Err(e) => tracing::warn!(error = %e, "exporting the last spans failed"),
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Middleware giving each request a server span, a child of the caller's
/// `traceparent` (W3C trace context) when it sent one. Added by
/// the router only when [`enabled`].
///
/// The span is named after the gRPC method or the HTTP route template
/// (bounded, like the metrics' `op`); handlers that know more fill the
/// Strata attributes with [`record_resolution`].
pub async fn trace_requests(request: Request, next: Next) -> Response {
    let grpc = crate::transport::grpc_methods::is_grpc(request.headers());
    let name = if grpc {
        request.uri().path().trim_start_matches('/').to_owned()
    } else {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        format!("{} {route}", request.method())
    };
    let span = tracing::info_span!(
        "rpc",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = if grpc { "grpc" } else { "http" },
        rpc.grpc.status_code = Empty,
        http.response.status_code = Empty,
        strata.project = Empty,
        strata.tenant = Empty,
        strata.service = Empty,
        strata.resolved_tenant = Empty,
        strata.fallback = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    // Fails only without the OpenTelemetry layer, where there is no trace.
    let _ = span.set_parent(parent);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    // A failed unary call is answered trailers-only, so its status is a
    // header; a success's comes in the trailers, after this span ends (as
    // the request metrics count it, see `telemetry::track_requests`).
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok());
    let failed = match (grpc, grpc_status) {
        (_, Some(code)) => {
            span.record("rpc.grpc.status_code", code);
            code != "0"
        }
        (true, None) => {
            span.record("rpc.grpc.status_code", "0");
            false
        }
        (false, None) => status.is_server_error(),
    };
    if failed {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// Records a service resolution on the current request's span (a no-op
/// when tracing is off).
pub fn record_resolution(
    project: &str,
    tenant: &str,
    service: &str,
    resolved_tenant: Option<&str>,
    fallback: bool,
) {
    if !enabled() {
        return;
    }
    let span = tracing::Span::current();
    span.record(attributes::PROJECT, project);
    span.record(attributes::TENANT, tenant);
    span.record(attributes::SERVICE, service);
    span.record(attributes::RESOLVED_TENANT, resolved_tenant.unwrap_or(""));
    span.record(attributes::FALLBACK, fallback);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> Result<OtelConfig, SettingsError> {
        OtelConfig::from_env(pairs.iter().copied())
    }

    /// Names of this process's threads (`/proc/self/task/*/comm`).
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect()
    }

    /// The SDK's batch thread, "OpenTelemetry.Traces.BatchProcessor", as
    /// the kernel truncates it.
    const BATCH_THREAD: &str = "OpenTelemetry.T";

    #[test]
    fn variables_turn_export_on_and_off() {
        assert_eq!(env(&[]).unwrap(), OtelConfig::default());
        assert_eq!(
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])
                .unwrap()
                .endpoint,
            None
        );
        let on = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "stratad-eu"),
        ])
        .unwrap();
        assert_eq!(on.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(on.schedule_delay, Duration::from_millis(100));
        assert_eq!(on.service_name, "stratad-eu");
        let traces = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://b:4317"),
        ])
        .unwrap();
        assert_eq!(traces.endpoint.as_deref(), Some("https://b:4317"));
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let config = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"), off]).unwrap();
            assert_eq!(config.endpoint, None, "{off:?}");
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (key, value) in [
            ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_EXPORTER", "jaeger"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x:1"),
        ] {
            let err = env(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(value), "{err}");
        }
    }

    #[tokio::test]
    async fn without_an_endpoint_nothing_is_started() {
        // Off: no exporter, no batch thread, no middleware.
        assert!(Tracing::start(&OtelConfig::default()).unwrap().is_none());
        assert!(!enabled());
        assert!(!thread_names().iter().any(|n| n == BATCH_THREAD));
        // On (nothing listens there; the connection is lazy): the batch
        // thread exists until shutdown, so the check above can fail.
        let on = OtelConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..OtelConfig::default()
        };
        let tracing = Tracing::start(&on).unwrap().unwrap();
        assert!(enabled());
        // The SDK spawns the thread, which names itself once it runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !thread_names().iter().any(|n| n == BATCH_THREAD)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(thread_names().iter().any(|n| n == BATCH_THREAD));
        tracing.shutdown().await;
        assert!(!enabled());
    }
}
