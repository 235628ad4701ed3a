//! Request limits as middleware: the request rate per token (a token
//! bucket behind the authentication layer), caps on open streams, and
//! JSON bodies for every HTTP error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use strata_proto::v1::ErrorReason;

use crate::app::limits::{RateSettings, exceeded};
use crate::error::ApiError;

// ---------------------------------------------------------------- rate

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per token id.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateSettings,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

/// Buckets kept before idle (full) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

impl RateLimiter {
    /// A limiter with `settings`.
    pub fn new(settings: RateSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one request from `token`'s bucket; `Err(wait)` when it is
    /// empty, with how long until the next request is allowed.
    pub fn take(&self, token: &Arc<str>, now: Instant) -> Result<(), Duration> {
        let RateSettings { per_second, burst } = self.settings;
        if per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(token) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(Arc::clone(token)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // `try_`: a rate so small the wait overflows a Duration must not
            // panic on the request path; a day is as good as forever here.
            Err(
                Duration::try_from_secs_f64((1.0 - bucket.tokens) / per_second)
                    .unwrap_or(Duration::from_secs(86_400)),
            )
        }
    }
}

impl RateLimiter {
    /// The error for a request of `token` refused for `wait` (counted in
    /// `strata_rate_limited_total`).
    pub fn refusal(&self, token: &str, wait: Duration) -> ApiError {
        metrics::counter!("strata_rate_limited_total").increment(1);
        ApiError::new(
            ErrorReason::RateLimited,
            format!(
                "token {token:?} sent more than {} requests per second (burst {}); retry in {} ms",
                self.settings.per_second,
                self.settings.burst,
                wait.as_millis().max(1)
            ),
        )
        .with("retry_after_ms", wait.as_millis().max(1))
    }
}

// ---------------------------------------------------------------- streams

/// Open streams per token. A stream costs the daemon for as long as it is
/// open (a subscription, buffers, an HTTP/2 stream), and one request opens
/// it, so the request rate alone does not bound how many a token holds.
#[derive(Debug)]
pub struct StreamCounter {
    max: usize,
    open: Mutex<HashMap<Arc<str>, usize>>,
}

/// One open stream, counted until dropped.
#[derive(Debug)]
pub struct StreamPermit {
    counter: Arc<StreamCounter>,
    token: Arc<str>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self
            .counter
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.token);
            }
        }
    }
}

impl StreamCounter {
    /// A counter allowing `max` open streams per token (0: no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more open stream of `token`, or refuses it at the limit.
    pub fn acquire(self: &Arc<Self>, token: &Arc<str>) -> Result<StreamPermit, ApiError> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(Arc::clone(token)).or_default();
        if self.max != 0 && *n >= self.max {
            let held = *n;
            return Err(exceeded(
                format!(
                    "token {token:?} has {held} streams open; the limit is {}: close some, or \
                     share one watch among more subscribers",
                    self.max
                ),
                self.max,
                "limits.max_streams_per_token",
            ));
        }
        *n += 1;
        Ok(StreamPermit {
            counter: Arc::clone(self),
            token: Arc::clone(token),
        })
    }
}

/// A response body holding a [`StreamPermit`] for as long as it lives.
struct PermitBody {
    inner: axum::body::Body,
    _permit: StreamPermit,
}

impl http_body::Body for PermitBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware counting the open gRPC streams of each token against
/// `limits.max_streams_per_token` (inside authentication: it needs the
/// principal). With auth off there is no token to count against.
pub async fn stream_cap(
    State(counter): State<Arc<StreamCounter>>,
    request: Request,
    next: Next,
) -> Response {
    let streaming = crate::transport::grpc_methods::is_streaming_grpc(&request);
    let token = request
        .extensions()
        .get::<crate::app::auth::Principal>()
        .filter(|p| streaming && &*p.token_id != "anonymous")
        .map(|p| Arc::clone(&p.token_id));
    let Some(token) = token else {
        return next.run(request).await;
    };
    match counter.acquire(&token) {
        Ok(permit) => next.run(request).await.map(|inner| {
            axum::body::Body::new(PermitBody {
                inner,
                _permit: permit,
            })
        }),
        Err(error) => tonic::Status::from(error).into_http(),
    }
}

/// Paths never rate limited: probes and scrapes (they carry no token).
fn unlimited_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
}

/// The rate-limit middleware: must run inside the authentication layer
/// (it keys buckets by the principal's token id). A refused request gets
/// `RATE_LIMITED`: HTTP 429 with a JSON body and `Retry-After` in whole
/// seconds (at least one), or gRPC `RESOURCE_EXHAUSTED` with
/// `retry_after_ms` in the error detail.
pub async fn rate_limit(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if limiter.settings.per_second <= 0.0 || unlimited_path(request.uri().path()) {
        return next.run(request).await;
    }
    // With auth off every caller is the same `anonymous` principal (token
    // ids are hex, never that word): one bucket would throttle the whole
    // daemon, so there is no rate limit.
    let Some(token) = request
        .extensions()
        .get::<crate::app::auth::Principal>()
        .filter(|p| &*p.token_id != "anonymous")
        .map(|p| Arc::clone(&p.token_id))
    else {
        return next.run(request).await;
    };
    match limiter.take(&token, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let error = limiter.refusal(&token, wait);
            if crate::transport::grpc_methods::is_grpc(request.headers()) {
                tonic::Status::from(error).into_http()
            } else {
                let mut response = error.into_response();
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                response
            }
        }
    }
}

// ---------------------------------------------------------------- JSON errors

/// Largest non-JSON error body read to become the JSON error's message.
const MAX_ERROR_TEXT: usize = 4 * 1024;

/// Gives every HTTP (non-gRPC) error response a JSON body
/// `{"error":{"code","message","metadata"}}`: the router's own answers
/// (405 for a method a route does not have, 400 for a path segment that is
/// not UTF-8 or a malformed query) are plain text or empty otherwise.
pub async fn json_errors(request: Request, next: Next) -> Response {
    if crate::transport::grpc_methods::is_grpc(request.headers()) {
        return next.run(request).await;
    }
    let response = next.run(request).await;
    let status = response.status();
    if status.as_u16() < 400 || is_json(response.headers()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = match status {
        StatusCode::UNAUTHORIZED => ErrorReason::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorReason::PermissionDenied,
        StatusCode::NOT_FOUND => ErrorReason::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorReason::LimitExceeded,
        StatusCode::TOO_MANY_REQUESTS => ErrorReason::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorReason::Unavailable,
        s if s.is_server_error() => ErrorReason::Internal,
        _ => ErrorReason::InvalidArgument,
    };
    let message = if text.is_empty() {
        let allow = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(|a| format!("; allowed: {a}"))
            .unwrap_or_default();
        format!(
            "{}{allow}",
            status.canonical_reason().unwrap_or("request refused")
        )
    } else {
        text
    };
    let mut response = ApiError::new(reason, message).into_response();
    *response.status_mut() = status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate_and_cap_at_the_burst() {
        let limiter = RateLimiter::new(RateSettings {
            per_second: 10.0,
            burst: 3.0,
        });
        let token: Arc<str> = "t1".into();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(&token, t0).is_ok());
        }
        let wait = limiter.take(&token, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another token has its own bucket.
        assert!(limiter.take(&"t2".into(), t0).is_ok());
        assert!(
            limiter
                .take(&token, t0 + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            limiter
                .take(&token, t0 + Duration::from_millis(100))
                .is_err()
        );
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.take(&token, later).is_ok());
        }
        assert!(limiter.take(&token, later).is_err());
    }
}
