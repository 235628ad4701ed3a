//! Request metrics: `strata_rpc_requests_total{op,code}` and
//! `strata_rpc_duration_seconds{op}` for every gRPC and HTTP request, with
//! the metric handles of each route cached so a request costs no label
//! allocation. Only methods the daemon serves and routes it matched become
//! `op` labels (anything else counts as `unmatched`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};

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
    if crate::transport::grpc_methods::is_grpc(request.headers()) {
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
    let grpc = crate::transport::grpc_methods::is_grpc(request.headers());
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
        if grpc && !crate::transport::grpc_methods::grpc_methods().contains_key(route.as_str()) {
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
