//! OpenTelemetry tracing: spans exported over OTLP/gRPC when an endpoint is
//! configured, and W3C trace context (`traceparent`) carried on calls.
//!
//! Off unless [`TracingConfig`] names an endpoint — usually from
//! `OTEL_EXPORTER_OTLP_ENDPOINT` through [`TracingConfig::from_env`]. While
//! off, nothing is started (no exporter, no thread, no connection) and a
//! call costs one `Option` check. While on, a
//! [`ClientBuilder::tracing`](crate::ClientBuilder::tracing) client wraps
//! [`Client::resolve`](crate::Client::resolve) in a client span (a child of
//! the caller's current OpenTelemetry [`Context`]) and sends its
//! `traceparent` to `stratad`, whose server span becomes its child.
//!
//! ```no_run
//! # async fn run() -> Result<(), strata_client::Error> {
//! use strata_client::trace::TracingConfig;
//!
//! let client = strata_client::Client::builder()
//!     .endpoints(["10.0.0.1:7700"])
//!     .tenant("feat-login")
//!     // OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_BSP_SCHEDULE_DELAY, …
//!     .tracing(TracingConfig::from_env(std::env::vars())?)
//!     .build()?;
//! let _ = client.resolve("matchmaker").await?;
//! // Before the process exits, so the last spans are not lost:
//! client.flush_traces().await;
//! # Ok(()) }
//! ```
//!
//! The same pieces serve `strata-sidecar`: [`extract`] and [`inject`] move
//! the context between HTTP headers, and [`Exporter::tracer`] makes its
//! spans.

use std::path::PathBuf;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};

use crate::Error;
use crate::services::ResolvedService;

/// Span attribute keys Strata sets on its spans (the daemon, the SDK and
/// the sidecar use the same names; defined once in
/// [`strata_proto::names::attributes`]).
pub use strata_proto::names::attributes;

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's OTLP/gRPC address.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: wins over [`ENDPOINT_VAR`].
pub const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The OpenTelemetry default batch delay (`OTEL_BSP_SCHEDULE_DELAY`).
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);

/// How long a flush at shutdown may take before spans are given up: a
/// collector that is down must not hold up the process's exit.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and how to export spans. The default is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    endpoint: Option<String>,
    service_name: Option<String>,
    schedule_delay: Duration,
    ca_certificate: Option<PathBuf>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: None,
            schedule_delay: DEFAULT_SCHEDULE_DELAY,
            ca_certificate: None,
        }
    }
}

impl TracingConfig {
    /// No export (the default).
    pub fn off() -> Self {
        Self::default()
    }

    /// Reads the standard OpenTelemetry variables from `vars` (pass
    /// `std::env::vars()`; tests pass a list, so nothing is read from the
    /// process environment here):
    ///
    /// - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    ///   `OTEL_EXPORTER_OTLP_ENDPOINT` — `http://host:4317` (or `https://`,
    ///   or `host:port` meaning `http://`); unset or empty: off;
    /// - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: off;
    /// - `OTEL_EXPORTER_OTLP_PROTOCOL` / `…_TRACES_PROTOCOL`: only `grpc`;
    /// - `OTEL_SERVICE_NAME` — the `service.name` resource attribute;
    /// - `OTEL_BSP_SCHEDULE_DELAY` — milliseconds between batch exports
    ///   (default 5000);
    /// - `OTEL_EXPORTER_OTLP_CERTIFICATE` / `…_TRACES_CERTIFICATE` — PEM CA
    ///   bundle for an `https://` collector.
    ///
    /// Errors name the variable and the value.
    pub fn from_env<I, K, V>(vars: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut config = Self::default();
        let (mut endpoint, mut traces_endpoint) = (None, None);
        let (mut certificate, mut traces_certificate) = (None, None);
        let mut disabled = false;
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref().trim());
            // The specification treats an empty value as unset.
            if value.is_empty() {
                continue;
            }
            let invalid = |why: &str| Error::Config(format!("{key}={value:?}: {why}"));
            match key {
                ENDPOINT_VAR => endpoint = Some(value.to_owned()),
                TRACES_ENDPOINT_VAR => traces_endpoint = Some(value.to_owned()),
                "OTEL_SERVICE_NAME" => config.service_name = Some(value.to_owned()),
                "OTEL_BSP_SCHEDULE_DELAY" => {
                    let ms: u64 = value
                        .parse()
                        .map_err(|_| invalid("not a number of milliseconds"))?;
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
                    _ => return Err(invalid("only `otlp` and `none` are supported")),
                },
                "OTEL_EXPORTER_OTLP_PROTOCOL" | "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                    if value != "grpc" =>
                {
                    return Err(invalid("only `grpc` is supported (OTLP over gRPC)"));
                }
                _ => {}
            }
        }
        config.ca_certificate = traces_certificate.or(certificate);
        if !disabled && let Some(endpoint) = traces_endpoint.or(endpoint) {
            config = config.endpoint(endpoint);
            config.checked_endpoint()?;
        }
        Ok(config)
    }

    /// Exports to this OTLP/gRPC collector (`http://host:4317`,
    /// `https://…`, or `host:port`).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        self.endpoint = Some(if endpoint.contains("://") {
            endpoint
        } else {
            format!("http://{endpoint}")
        });
        self
    }

    /// The `service.name` of exported spans (default: what the component
    /// passes to [`TracingConfig::start`]).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Time between batch exports (default 5 s).
    pub fn schedule_delay(mut self, delay: Duration) -> Self {
        self.schedule_delay = delay;
        self
    }

    /// PEM CA bundle trusted for an `https://` collector.
    pub fn ca_certificate(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_certificate = Some(path.into());
        self
    }

    /// Whether spans are exported.
    pub fn is_enabled(&self) -> bool {
        self.endpoint.is_some()
    }

    /// The collector endpoint, when on.
    pub fn endpoint_uri(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    fn checked_endpoint(&self) -> Result<Option<&str>, Error> {
        let Some(endpoint) = self.endpoint.as_deref() else {
            return Ok(None);
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| Error::Config(format!("OTLP endpoint {endpoint:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => Ok(Some(endpoint)),
            _ => Err(Error::Config(format!(
                "OTLP endpoint {endpoint:?}: expected http://host:port or https://host:port"
            ))),
        }
    }

    /// Starts exporting: `Ok(None)` when off, without building anything.
    /// When on, it builds the OTLP/gRPC exporter (the connection is made on
    /// the first export) and one batch thread; it must be called inside a
    /// Tokio runtime, which the exporter's connection runs on.
    pub fn start(&self, default_service_name: &str) -> Result<Option<Exporter>, Error> {
        let Some(endpoint) = self.checked_endpoint()? else {
            return Ok(None);
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "OTLP export must be started inside a Tokio runtime".into(),
            ));
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(path) = &self.ca_certificate {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Config(format!("OTLP CA certificate {}: {e}", path.display()))
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            builder = builder.with_tls_config(tls);
        }
        let exporter = builder
            .build()
            .map_err(|e| Error::Config(format!("OTLP exporter for {endpoint}: {e}")))?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(self.schedule_delay)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let name = self
            .service_name
            .clone()
            .unwrap_or_else(|| default_service_name.to_owned());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder().with_service_name(name).build())
            .build();
        Ok(Some(Exporter::new(provider)))
    }
}

/// A running span exporter: a tracer provider with one batch processor.
/// Clones share it. Call [`Exporter::shutdown`] (or at least
/// [`Exporter::flush`]) before the process exits.
#[derive(Debug, Clone)]
pub struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Exporter {
    /// Wraps a provider (tests may pass one with their own processor).
    pub fn new(provider: SdkTracerProvider) -> Self {
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("strata");
        Self { provider, tracer }
    }

    /// The tracer spans are made with.
    pub fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    /// The provider (for a `tracing-opentelemetry` layer, say).
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Exports every finished span now. The batch thread's export runs on
    /// this runtime's connection, so the wait happens off the runtime's
    /// threads.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let flushed =
            tokio::task::spawn_blocking(move || provider.force_flush().map_err(|e| e.to_string()))
                .await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!(error = %e, "flushing spans failed");
        }
    }

    /// Exports what is left and stops the batch thread, waiting at most
    /// [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || {
            provider
                .shutdown_with_timeout(SHUTDOWN_TIMEOUT)
                .map_err(|e| e.to_string())
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }

    /// [`Exporter::shutdown`] without waiting: on a blocking thread of the
    /// current Tokio runtime (the export itself runs on the runtime, so a
    /// runtime thread must not block on it), or right here without one.
    /// Every clone shares the provider, so all of them stop exporting.
    pub fn shutdown_in_background(self) {
        let provider = self.provider;
        let shutdown = move || {
            if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                tracing::debug!(error = %e, "exporting the last spans failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(shutdown)),
            Err(_) => shutdown(),
        }
    }

    /// Starts a span of `kind` named `name`, a child of `parent`, and
    /// returns the context holding it (end it with [`end_span`]).
    pub fn start_span(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }
}

/// Ends the span of `cx`, marking it failed with `error` if given.
pub fn end_span(cx: &Context, error: Option<String>) {
    let span = cx.span();
    if let Some(message) = error {
        span.set_status(Status::error(message));
    }
    span.end();
}

/// Sets an attribute on the span of `cx`.
pub fn set_attribute(cx: &Context, attribute: KeyValue) {
    cx.span().set_attribute(attribute);
}

/// The client span of one SDK call: named after the gRPC method, with the
/// RPC and Strata attributes, a child of the caller's current context (so
/// an application that traces its own work sees the call inside it).
pub(crate) fn start_call_span(
    exporter: &Exporter,
    method: &'static str,
    project: &str,
    tenant: &str,
    service: &str,
) -> Context {
    let (rpc_service, rpc_method) = method.split_once('/').unwrap_or((method, ""));
    exporter.start_span(
        method,
        SpanKind::Client,
        &Context::current(),
        vec![
            KeyValue::new(attributes::RPC_SYSTEM, "grpc"),
            KeyValue::new(attributes::RPC_SERVICE, rpc_service),
            KeyValue::new(attributes::RPC_METHOD, rpc_method),
            KeyValue::new(attributes::PROJECT, project.to_owned()),
            KeyValue::new(attributes::TENANT, tenant.to_owned()),
            KeyValue::new(attributes::SERVICE, service.to_owned()),
        ],
    )
}

/// Ends a resolve call's span with where the service resolved.
pub(crate) fn end_resolve_span(span: Option<&Context>, outcome: &Result<ResolvedService, Error>) {
    let Some(cx) = span else { return };
    match outcome {
        Ok(resolved) => {
            let s = cx.span();
            s.set_attribute(KeyValue::new(
                attributes::RESOLVED_TENANT,
                resolved.tenant.clone().unwrap_or_default(),
            ));
            s.set_attribute(KeyValue::new(attributes::FALLBACK, resolved.fallback));
            end_span(cx, None);
        }
        Err(e) => end_span(cx, Some(e.to_string())),
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

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) a request carries,
/// as a parent context (empty when it carries none or an invalid one).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s span as the `traceparent` (and `tracestate`) of a request,
/// replacing what was there.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// [`inject`] for gRPC metadata.
pub fn inject_metadata(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<TracingConfig, Error> {
        TracingConfig::from_env(pairs.iter().copied())
    }

    #[test]
    fn the_environment_turns_export_on_and_off() {
        assert!(!env(&[]).unwrap().is_enabled());
        assert!(!env(&[(ENDPOINT_VAR, "")]).unwrap().is_enabled());
        let on = env(&[
            (ENDPOINT_VAR, "http://collector:4317"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "game"),
        ])
        .unwrap();
        assert_eq!(on.endpoint_uri(), Some("http://collector:4317"));
        assert_eq!(on.schedule_delay, Duration::from_millis(100));
        assert_eq!(on.service_name.as_deref(), Some("game"));
        let traces = env(&[
            (ENDPOINT_VAR, "http://a:4317"),
            (TRACES_ENDPOINT_VAR, "b:4317"),
        ])
        .unwrap();
        assert_eq!(traces.endpoint_uri(), Some("http://b:4317"));
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let config = env(&[(ENDPOINT_VAR, "http://a:4317"), off]).unwrap();
            assert!(!config.is_enabled(), "{off:?}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ];
        for (key, value) in cases {
            let err = env(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = env(&[(ENDPOINT_VAR, "ftp://x")]).unwrap_err().to_string();
        assert!(err.contains("ftp://x"), "{err}");
    }

    #[test]
    fn off_builds_nothing_and_needs_no_runtime() {
        // No runtime here: starting a configured exporter would fail, so
        // `Ok(None)` shows that nothing was built.
        assert!(TracingConfig::off().start("test").unwrap().is_none());
        let on = TracingConfig::off().endpoint("127.0.0.1:4317");
        assert!(on.start("test").is_err());
    }

    #[test]
    fn trace_context_round_trips_through_headers_and_metadata() {
        let mut headers = http::HeaderMap::new();
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        headers.insert("traceparent", http::HeaderValue::from_static(parent));
        let cx = extract(&headers);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote() && sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let mut out = http::HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(out["traceparent"], parent);
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_metadata(&cx, &mut metadata);
        assert_eq!(metadata.get("traceparent").unwrap(), parent);
        // No context: nothing is written.
        let mut none = http::HeaderMap::new();
        inject(&Context::new(), &mut none);
        assert!(none.is_empty());
    }
}
