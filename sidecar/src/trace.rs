//! OpenTelemetry spans of proxied HTTP and gRPC requests, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see `strata_client::trace`).
//!
//! Each routed request gets one client span: a child of the `traceparent`
//! the caller sent (a new trace when it sent none), with the route as
//! attributes — project, requesting tenant, service, the tenant that serves
//! and whether that is a fallback. The forwarded request carries the span's
//! own `traceparent`, so the callee's span is its child and one trace shows
//! caller → sidecar → callee across a feature environment and its fallback.
//! The span ends when the callee's response head arrives (a streamed body
//! may take longer). A refused request gets a failed span naming why.
//!
//! Off, the proxy holds no [`ProxyTrace`]: no span is made, and
//! `traceparent` and `tracestate` pass through untouched.

use http::{HeaderMap, Request};
use opentelemetry::trace::SpanKind;
use opentelemetry::{Context, KeyValue};
use strata_client::trace::{Exporter, attributes, end_span, extract, inject, set_attribute};

use crate::table::Route;

/// Makes the spans of the outbound proxy.
#[derive(Debug, Clone)]
pub struct ProxyTrace {
    exporter: Exporter,
    project: String,
}

impl ProxyTrace {
    /// Spans for `project`, exported by `exporter`.
    pub fn new(exporter: Exporter, project: String) -> Self {
        Self { exporter, project }
    }

    /// Starts the span of a request about to be forwarded on `route`, and
    /// replaces the request's `traceparent` with the span's.
    pub fn start<B>(&self, req: &mut Request<B>, route: &Route) -> Context {
        let parent = extract(req.headers());
        let cx = self.exporter.start_span(
            format!("proxy {}", route.service),
            SpanKind::Client,
            &parent,
            vec![
                KeyValue::new(attributes::PROJECT, self.project.clone()),
                KeyValue::new(attributes::TENANT, route.requested.clone()),
                KeyValue::new(attributes::SERVICE, route.service.clone()),
                KeyValue::new(attributes::RESOLVED_TENANT, route.tenant.clone()),
                KeyValue::new(attributes::FALLBACK, route.fallback),
                KeyValue::new("http.request.method", req.method().as_str().to_owned()),
            ],
        );
        inject(&cx, req.headers_mut());
        cx
    }

    /// Records a request the sidecar answered itself (no route, bad
    /// tenant): a failed span, ended at once.
    pub fn refused(
        &self,
        headers: &HeaderMap,
        service: Option<&str>,
        tenant: Option<&str>,
        status: u16,
        message: &str,
    ) {
        let mut attributes = vec![
            KeyValue::new(attributes::PROJECT, self.project.clone()),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ];
        if let Some(service) = service {
            attributes.push(KeyValue::new(attributes::SERVICE, service.to_owned()));
        }
        if let Some(tenant) = tenant {
            attributes.push(KeyValue::new(attributes::TENANT, tenant.to_owned()));
        }
        let name = match service {
            Some(service) => format!("proxy {service}"),
            None => "proxy".to_owned(),
        };
        let cx = self
            .exporter
            .start_span(name, SpanKind::Client, &extract(headers), attributes);
        end_span(&cx, Some(message.to_owned()));
    }
}

/// Ends a request's span with the status the caller gets (5xx: failed).
pub fn finish(cx: &Context, status: u16) {
    set_attribute(
        cx,
        KeyValue::new("http.response.status_code", i64::from(status)),
    );
    let error = (status >= 500).then(|| format!("HTTP {status}"));
    end_span(cx, error);
}
