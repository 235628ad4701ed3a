//! OpenTelemetry traces across hops, with real processes and a real OTLP
//! receiver: a `stratad` and a `strata-sidecar` (for the feature tenant
//! `feat-1`, child of `integration`) export to a small OTLP/gRPC collector
//! started by the test, as does an in-process SDK client.
//!
//! What an operator relies on: one trace, rooted in the caller's context,
//! shows the SDK's `ResolveService` call and the daemon's server span as its
//! child, and the caller's request through the sidecar falling back to
//! `integration` with the callee seeing the sidecar's span as its parent —
//! each span with the project, tenant, service, resolved tenant and
//! fallback. The sidecar's spans reach the collector when it is stopped
//! (SIGTERM flushes them), and processes without an endpoint start no
//! exporter thread.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use strata_client::trace::TracingConfig;
use strata_tests::sidecar::Sidecar;
use strata_tests::{Daemon, http_ok};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

const PROJECT: &str = "vega";

/// Aborts a task when dropped, so test servers stop with the test.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A span as the collector received it, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    span: Span,
}

impl Exported {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn attr(&self, key: &str) -> Option<&Value> {
        attr(&self.span.attributes, key)
    }

    fn str_attr(&self, key: &str) -> Option<&str> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    fn bool_attr(&self, key: &str) -> Option<bool> {
        match self.attr(key)? {
            Value::BoolValue(b) => Some(*b),
            _ => None,
        }
    }

    fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }

    /// Asserts the Strata attributes of a span about resolving `service`
    /// for `feat-1`, served by `integration` (a fallback).
    fn assert_fallback_route(&self, what: &str) {
        assert_eq!(
            self.str_attr("strata.project"),
            Some(PROJECT),
            "{what}: {self:?}"
        );
        assert_eq!(
            self.str_attr("strata.tenant"),
            Some("feat-1"),
            "{what}: {self:?}"
        );
        assert_eq!(
            self.str_attr("strata.service"),
            Some("matchmaker"),
            "{what}: {self:?}"
        );
        assert_eq!(
            self.str_attr("strata.resolved_tenant"),
            Some("integration"),
            "{what}: {self:?}"
        );
        assert_eq!(
            self.bool_attr("strata.fallback"),
            Some(true),
            "{what}: {self:?}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

type Spans = Arc<Mutex<Vec<Exported>>>;

/// The OTLP/gRPC collector: keeps every span it is sent.
struct Collector(Spans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| match attr(&r.attributes, "service.name") {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (String, Spans, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Spans::default();
    let collector = Collector(Arc::clone(&spans));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (format!("http://{addr}"), spans, Task(task))
}

/// Waits (bounded) for a span matching `pick` to reach the collector.
async fn wait_span(spans: &Spans, what: &str, pick: impl Fn(&Exported) -> bool) -> Exported {
    let limit = Duration::from_secs(15);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = spans.lock().unwrap().iter().find(|e| pick(e)) {
            return found.clone();
        }
        if Instant::now() >= deadline {
            let seen: Vec<(String, String)> = spans
                .lock()
                .unwrap()
                .iter()
                .map(|e| (e.service.clone(), e.span.name.clone()))
                .collect();
            panic!("{what}: not exported within {limit:?}; spans seen: {seen:?}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// The callee: answers 200 and keeps the `traceparent` of each request.
async fn callee() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let record = Arc::clone(&record);
                    async move {
                        let traceparent = req
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        record.lock().unwrap().push(traceparent);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"integration.matchmaker",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen, Task(task))
}

/// One HTTP/1.1 GET through the sidecar for `host`: (status, body).
async fn get(proxy: SocketAddr, host: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = timeout(Duration::from_secs(5), TcpStream::connect(proxy))
        .await
        .expect("connect timeout")
        .expect("connect to the sidecar");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::get("/").header("host", host);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("response within 10 s")
    .expect("response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Names of a process's threads (`/proc/<pid>/task/*/comm`).
fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// The OpenTelemetry SDK's batch thread ("OpenTelemetry.Traces.BatchProcessor"
/// truncated by the kernel): it exists exactly while spans are exported.
fn has_exporter_thread(pid: i32) -> bool {
    thread_names(pid).iter().any(|n| n == "OpenTelemetry.T")
}

/// A `traceparent` value and the context it stands for: the caller's own
/// span, which the test plays (it is never exported).
fn caller_context() -> (String, String, opentelemetry::Context) {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    let (trace_hex, span_hex) = (format!("{trace:032x}"), format!("{span:016x}"));
    let cx = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    (trace_hex, span_hex, cx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_links_sdk_daemon_sidecar_and_callee() {
    let (collector, spans, _collector) = start_collector().await;
    let daemon = Daemon::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await;
    let api = daemon.addr;
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration"),
        "{}",
    )
    .await;
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    // The matchmaker runs in integration only: feat-1 falls back to it.
    let (matchmaker, traceparents, _callee) = callee().await;
    http_ok(
        api,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/integration/services/matchmaker/instances"),
        &format!(r#"{{"id":"mm-1","endpoints":{{"main":"{matchmaker}"}},"protocol":"http","kind":"persistent"}}"#),
    )
    .await;

    // The sidecar batches for a minute: its spans can only arrive through
    // the flush at SIGTERM.
    let mut sidecar = Sidecar::start_with_env(
        &daemon.endpoint(),
        PROJECT,
        "feat-1",
        &[],
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    )
    .await;
    let sidecar_pid = sidecar.pid();
    assert!(
        has_exporter_thread(daemon.pid().as_raw()),
        "stratad exports"
    );
    assert!(has_exporter_thread(sidecar_pid), "the sidecar exports");

    let (trace_id, caller_span, caller) = caller_context();

    // SDK → daemon: the SDK's span is a child of the caller's context, the
    // daemon's of the SDK's.
    let client = strata_client::Client::builder()
        .endpoints([daemon.endpoint()])
        .project(PROJECT)
        .tenant("feat-1")
        .token(daemon.admin_token())
        .tracing(
            TracingConfig::off()
                .endpoint(collector.clone())
                .service_name("game-server")
                .schedule_delay(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let resolved = client
        .resolve("matchmaker")
        .with_context(caller.clone())
        .await
        .unwrap();
    assert_eq!(resolved.tenant.as_deref(), Some("integration"));
    assert!(resolved.fallback);
    client.flush_traces().await;

    let sdk = wait_span(&spans, "the SDK's ResolveService span", |e| {
        e.service == "game-server" && e.trace_id() == trace_id
    })
    .await;
    assert_eq!(sdk.span.name, "strata.v1.RegistryService/ResolveService");
    assert_eq!(sdk.span.kind, SpanKind::Client as i32);
    assert_eq!(
        sdk.parent_id(),
        caller_span,
        "the SDK span's parent is the caller"
    );
    sdk.assert_fallback_route("SDK span");

    let server = wait_span(&spans, "stratad's ResolveService span", |e| {
        e.service == "stratad" && e.trace_id() == trace_id
    })
    .await;
    assert_eq!(server.span.name, "strata.v1.RegistryService/ResolveService");
    assert_eq!(server.span.kind, SpanKind::Server as i32);
    assert_eq!(
        server.parent_id(),
        sdk.span_id(),
        "the daemon's span is a child of the SDK's"
    );
    server.assert_fallback_route("stratad span");
    assert_eq!(server.str_attr("rpc.grpc.status_code"), Some("0"));

    // A game server registering itself: its Register call and the
    // daemon's handling of it are one trace too.
    let (register_trace, register_caller, register_cx) = caller_context();
    let registration = client
        .register(strata_client::InstanceSpec::new("lobby").endpoint("main", "127.0.0.1:7777"))
        .with_context(register_cx)
        .await
        .unwrap();
    client.flush_traces().await;
    let sdk_register = wait_span(&spans, "the SDK's Register span", |e| {
        e.service == "game-server" && e.trace_id() == register_trace
    })
    .await;
    assert_eq!(sdk_register.span.name, "strata.v1.RegistryService/Register");
    assert_eq!(sdk_register.parent_id(), register_caller);
    assert_eq!(sdk_register.str_attr("strata.service"), Some("lobby"));
    let server_register = wait_span(&spans, "stratad's Register span", |e| {
        e.service == "stratad" && e.trace_id() == register_trace
    })
    .await;
    assert_eq!(
        server_register.span.name,
        "strata.v1.RegistryService/Register"
    );
    assert_eq!(
        server_register.parent_id(),
        sdk_register.span_id(),
        "the daemon's Register span is a child of the SDK's"
    );
    registration.deregister().await.unwrap();

    // caller → sidecar → callee, in the same trace.
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let (status, body) = get(
        sidecar.outbound,
        "matchmaker",
        &[("traceparent", traceparent.as_str())],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "integration.matchmaker"));
    let received = traceparents.lock().unwrap().last().cloned().unwrap();
    let parts: Vec<&str> = received.split('-').collect();
    assert_eq!(parts.len(), 4, "callee's traceparent: {received:?}");
    assert_eq!(parts[1], trace_id, "the callee is in the caller's trace");
    assert_ne!(
        parts[2], caller_span,
        "the sidecar put its own span in between"
    );

    // Nothing from the sidecar yet (a minute's batch delay); SIGTERM
    // flushes it.
    assert!(
        !spans
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.service == "strata-sidecar"),
        "the sidecar exported before its batch was due"
    );
    sidecar.signal(Signal::SIGTERM);
    let exit = sidecar.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "sidecar exit: {exit}; {}", sidecar.stderr());
    let proxied = wait_span(&spans, "the sidecar's span", |e| {
        e.service == "strata-sidecar" && e.trace_id() == trace_id
    })
    .await;
    assert_eq!(proxied.span.name, "proxy matchmaker");
    assert_eq!(proxied.span.kind, SpanKind::Client as i32);
    assert_eq!(
        proxied.parent_id(),
        caller_span,
        "the sidecar's parent is the caller"
    );
    assert_eq!(
        parts[2],
        proxied.span_id(),
        "the callee's parent is the sidecar's span"
    );
    proxied.assert_fallback_route("sidecar span");
    assert_eq!(proxied.int_attr("http.response.status_code"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_exporter_runs() {
    let daemon = Daemon::start().await;
    http_ok(
        daemon.addr,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration"),
        "{}",
    )
    .await;
    let sidecar = Sidecar::start(&daemon.endpoint(), PROJECT, "integration", &[], &[]).await;
    // Serve a request each, so anything started lazily would be running.
    let (status, _) = get(sidecar.outbound, "nosuch", &[]).await;
    assert_eq!(status, 503);
    assert!(!has_exporter_thread(daemon.pid().as_raw()), "stratad");
    assert!(!has_exporter_thread(sidecar.pid()), "strata-sidecar");
}

#[tokio::test]
async fn a_bad_otel_variable_stops_stratad_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    for (key, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317"),
    ] {
        let (status, stderr) = strata_tests::run_stratad(&args, &[(key, value)]).await;
        assert_eq!(status.code(), Some(64), "{key}={value}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(value),
            "the error names the variable and its value: {stderr}"
        );
    }
}
