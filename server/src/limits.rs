//! Limits beyond single-value sizes: counts per tenant and per project
//! (enforced in the same plan/compare loop as every write), the request
//! rate per token (a token bucket behind the authentication layer), and the
//! middleware that gives every HTTP error a JSON body.
//!
//! **Counts.** A write that adds a tenant, a config key or an instance is
//! planned against the view, which knows the current count. To keep
//! concurrent writers from passing the limit together, such a write also
//! puts a *guard* key (`q/{project}` for tenants, `q/{project}/{tenant}/c`
//! for config keys, `q/{project}/{tenant}/i` for instances) with a compare
//! that the guard has not changed since the revision the plan saw. Two
//! guarded writers of one project or tenant therefore conflict, and the
//! loser is re-planned against a view that counts the winner. Tenants are
//! always guarded (creating one is rare); config keys and instances only
//! once the count is within [`CONFIG_GUARD_MARGIN`] / [`INSTANCE_GUARD_MARGIN`]
//! of the limit, so busy tenants far from it do not serialise their
//! registrations. Guards of a tenant are deleted with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use strata_proto::v1::ErrorReason;

use crate::error::ApiError;
use crate::store::{Compare, CompareOp, Revision, Txn};

/// Writes adding a config key pin the tenant's guard once its key count
/// is this close to the limit.
pub const CONFIG_GUARD_MARGIN: usize = 256;
/// Writes adding an instance pin the tenant's guard once its instance count
/// is this close to the limit.
pub const INSTANCE_GUARD_MARGIN: usize = 1024;

/// Size limits enforced on writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest config value, in bytes.
    pub max_value_bytes: usize,
    /// Most labels on a tenant.
    pub max_labels: usize,
    /// Versions of each layer's history kept (older ones are pruned as new
    /// ones are written).
    pub history_versions: u64,
    /// Sizes of a service registration.
    pub registration: crate::domain::registry::RegistrationLimits,
    /// Counts per tenant and project, key and label sizes.
    pub counts: crate::limits::CountLimits,
    /// Requests per second per token.
    pub rate: crate::limits::RateSettings,
    /// Open connections and how fast clients must send their requests.
    pub connections: crate::listener::ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 1024 * 1024,
            max_labels: 64,
            history_versions: 50,
            registration: crate::domain::registry::RegistrationLimits::default(),
            counts: crate::limits::CountLimits::default(),
            rate: crate::limits::RateSettings::default(),
            connections: crate::listener::ConnectionLimits::default(),
        }
    }
}

/// Count limits (0 in a setting: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountLimits {
    /// Most tenants in one project.
    pub max_tenants_per_project: usize,
    /// Most config keys (layers) in one tenant.
    pub max_config_keys_per_tenant: usize,
    /// Most service instances in one tenant.
    pub max_instances_per_tenant: usize,
    /// Longest config key, bytes (at most 512, the key syntax's own limit).
    pub max_key_bytes: usize,
    /// Longest label value, bytes.
    pub max_label_value_bytes: usize,
    /// Most bytes of config values (the current layers of every tenant)
    /// in one project.
    pub max_config_bytes_per_project: usize,
    /// Most streams (watches, keep-alives) one token holds open at once.
    pub max_streams_per_token: usize,
    /// Most distinct selections (project, tenant, keys) one token watches
    /// at once, per kind of watch.
    pub max_watch_selections_per_token: usize,
}

impl Default for CountLimits {
    fn default() -> Self {
        Self {
            max_tenants_per_project: 10_000,
            max_config_keys_per_tenant: 10_000,
            max_instances_per_tenant: 50_000,
            max_key_bytes: crate::domain::names::MAX_KEY_LEN,
            max_label_value_bytes: 256,
            max_config_bytes_per_project: 1 << 30,
            max_streams_per_token: 20_000,
            max_watch_selections_per_token: 1_000,
        }
    }
}

/// Request rate per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSettings {
    /// Sustained requests per second per token (0: unlimited).
    pub per_second: f64,
    /// Requests a token may send at once after being idle.
    pub burst: f64,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            per_second: 10_000.0,
            burst: 20_000.0,
        }
    }
}

impl Eq for RateSettings {}

/// The `[limits]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest config value, bytes (validated in `config.rs`).
    pub max_value_bytes: Option<i64>,
    /// Longest config key, bytes.
    pub max_key_bytes: Option<i64>,
    /// Most labels on a tenant.
    pub max_labels: Option<i64>,
    /// Longest label value, bytes.
    pub max_label_value_bytes: Option<i64>,
    /// Most metadata entries of an instance.
    pub max_metadata_entries: Option<i64>,
    /// Most bytes of an instance's metadata keys and values together.
    pub max_metadata_bytes: Option<i64>,
    /// Most endpoints of an instance.
    pub max_endpoints: Option<i64>,
    /// Most tenants per project (0: unlimited).
    pub max_tenants_per_project: Option<i64>,
    /// Most config keys per tenant (0: unlimited).
    pub max_config_keys_per_tenant: Option<i64>,
    /// Most instances per tenant (0: unlimited).
    pub max_instances_per_tenant: Option<i64>,
    /// Most config bytes per project (0: unlimited).
    pub max_config_bytes_per_project: Option<i64>,
    /// Most open streams per token (0: unlimited).
    pub max_streams_per_token: Option<i64>,
    /// Most distinct watched selections per token (0: unlimited).
    pub max_watch_selections_per_token: Option<i64>,
    /// Most open connections (0: unlimited).
    pub max_connections: Option<i64>,
    /// Longest a client may take to send a request head (`10s`).
    pub header_read_timeout: Option<String>,
    /// Requests per second per token (0: unlimited).
    pub requests_per_second: Option<f64>,
    /// Burst of requests per token.
    pub request_burst: Option<f64>,
}

/// Applies the `[limits]` tables of the sources (later ones winning) to
/// `limits`; errors name the setting and its source.
pub(crate) fn apply_layers(
    layers: &[(LimitsFile, String)],
    limits: &mut Limits,
) -> Result<(), crate::settings_error::SettingsError> {
    let invalid = |setting: &'static str, source: &str, message: String| {
        crate::settings_error::SettingsError::Invalid {
            setting,
            source_name: source.to_owned(),
            message,
        }
    };
    let count = |setting: &'static str, source: &str, v: i64, min: i64, max: i64| {
        if (min..=max).contains(&v) {
            usize::try_from(v).map_err(|e| invalid(setting, source, e.to_string()))
        } else {
            Err(invalid(
                setting,
                source,
                format!("must be between {min} and {max}, got {v}"),
            ))
        }
    };
    for (l, source) in layers {
        let s = source.as_str();
        if let Some(v) = l.max_key_bytes {
            limits.counts.max_key_bytes = count(
                "limits.max_key_bytes",
                s,
                v,
                1,
                crate::domain::names::MAX_KEY_LEN as i64,
            )?;
        }
        if let Some(v) = l.max_labels {
            limits.max_labels = count("limits.max_labels", s, v, 0, 10_000)?;
        }
        if let Some(v) = l.max_label_value_bytes {
            limits.counts.max_label_value_bytes =
                count("limits.max_label_value_bytes", s, v, 1, 1 << 20)?;
        }
        if let Some(v) = l.max_metadata_entries {
            limits.registration.max_metadata_entries =
                count("limits.max_metadata_entries", s, v, 0, 100_000)?;
        }
        if let Some(v) = l.max_metadata_bytes {
            limits.registration.max_metadata_bytes =
                count("limits.max_metadata_bytes", s, v, 0, 16 << 20)?;
        }
        if let Some(v) = l.max_endpoints {
            limits.registration.max_endpoints = count("limits.max_endpoints", s, v, 1, 10_000)?;
        }
        if let Some(v) = l.max_tenants_per_project {
            limits.counts.max_tenants_per_project =
                count("limits.max_tenants_per_project", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_config_keys_per_tenant {
            limits.counts.max_config_keys_per_tenant =
                count("limits.max_config_keys_per_tenant", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_instances_per_tenant {
            limits.counts.max_instances_per_tenant =
                count("limits.max_instances_per_tenant", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_config_bytes_per_project {
            limits.counts.max_config_bytes_per_project =
                count("limits.max_config_bytes_per_project", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_streams_per_token {
            limits.counts.max_streams_per_token =
                count("limits.max_streams_per_token", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_watch_selections_per_token {
            limits.counts.max_watch_selections_per_token =
                count("limits.max_watch_selections_per_token", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_connections {
            limits.connections.max_connections =
                count("limits.max_connections", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = &l.header_read_timeout {
            let timeout = humantime::parse_duration(v.trim())
                .map_err(|e| invalid("limits.header_read_timeout", s, format!("{v:?}: {e}")))?;
            if timeout.is_zero() {
                return Err(invalid(
                    "limits.header_read_timeout",
                    s,
                    "must not be zero".into(),
                ));
            }
            limits.connections.header_read_timeout = timeout;
        }
        if let Some(v) = l.requests_per_second {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    "limits.requests_per_second",
                    s,
                    format!("must be 0 (unlimited) or positive, got {v}"),
                ));
            }
            limits.rate.per_second = v;
        }
        if let Some(v) = l.request_burst {
            if !(v.is_finite() && v >= 1.0) {
                return Err(invalid(
                    "limits.request_burst",
                    s,
                    format!("must be at least 1, got {v}"),
                ));
            }
            limits.rate.burst = v;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- counts

/// Key of the guard of a project's tenant count.
pub fn tenants_guard(project: &str) -> Vec<u8> {
    format!("q/{project}").into_bytes()
}

fn config_guard(project: &str, tenant: &str) -> Vec<u8> {
    format!("q/{project}/{tenant}/c").into_bytes()
}

fn config_bytes_guard(project: &str) -> Vec<u8> {
    format!("q/{project}/bytes").into_bytes()
}

/// Writes that grow a project's config bytes pin its guard once they are
/// this close to the limit.
pub const CONFIG_BYTES_GUARD_MARGIN: usize = 64 << 20;

/// Checks that a project holding `current` bytes of config values may grow
/// by `growth`, and guards the total near the limit (a write that shrinks
/// or keeps the total is never refused).
pub(crate) fn plan_config_bytes(
    limits: &CountLimits,
    project: &str,
    current: usize,
    growth: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let max = limits.max_config_bytes_per_project;
    if max == 0 || growth == 0 {
        return Ok(txn);
    }
    if current.saturating_add(growth) > max {
        return Err(exceeded(
            format!(
                "project {project:?} holds {current} bytes of config values and this write adds \
                 {growth}; the limit is {max} bytes"
            ),
            max,
            "limits.max_config_bytes_per_project",
        ));
    }
    if current
        .saturating_add(growth)
        .saturating_add(CONFIG_BYTES_GUARD_MARGIN)
        > max
    {
        return Ok(guard(txn, config_bytes_guard(project), seen));
    }
    Ok(txn)
}

fn instances_guard(project: &str, tenant: &str) -> Vec<u8> {
    format!("q/{project}/{tenant}/i").into_bytes()
}

/// Pins `guard` to the state the plan saw (`seen`: the view's revision).
fn guard(txn: Txn, guard: Vec<u8>, seen: Revision) -> Txn {
    txn.when(Compare::mod_revision(
        guard.clone(),
        CompareOp::Less,
        seen + 1,
    ))
    .put(guard, Vec::new())
}

fn exceeded(what: String, limit: usize, setting: &str) -> ApiError {
    ApiError::new(ErrorReason::LimitExceeded, format!("{what} ({setting})"))
        .with("limit", limit)
        .with("setting", setting)
}

/// Checks that a project with `current` tenants may get `adding` more, and
/// guards the count. Call from the plan of a write.
pub(crate) fn plan_tenants(
    limits: &CountLimits,
    project: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let max = limits.max_tenants_per_project;
    if max == 0 || adding == 0 {
        return Ok(txn);
    }
    if current + adding > max {
        return Err(exceeded(
            format!("project {project:?} has {current} tenants; the limit is {max}"),
            max,
            "limits.max_tenants_per_project",
        ));
    }
    Ok(guard(txn, tenants_guard(project), seen))
}

/// Checks that a tenant with `current` config keys may get `adding` new
/// ones, and guards the count near the limit.
pub(crate) fn plan_config_keys(
    limits: &CountLimits,
    project: &str,
    tenant: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let count = TenantCount {
        max: limits.max_config_keys_per_tenant,
        margin: CONFIG_GUARD_MARGIN,
        what: "config keys",
        setting: "limits.max_config_keys_per_tenant",
    };
    count.plan(
        tenant,
        current,
        adding,
        || config_guard(project, tenant),
        seen,
        txn,
    )
}

/// Checks that a tenant with `current` instances may get `adding` new ones,
/// and guards the count near the limit.
pub(crate) fn plan_instances(
    limits: &CountLimits,
    project: &str,
    tenant: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let count = TenantCount {
        max: limits.max_instances_per_tenant,
        margin: INSTANCE_GUARD_MARGIN,
        what: "instances",
        setting: "limits.max_instances_per_tenant",
    };
    count.plan(
        tenant,
        current,
        adding,
        || instances_guard(project, tenant),
        seen,
        txn,
    )
}

/// One per-tenant count limit (0: unlimited) and how close to it writes
/// start guarding the count.
struct TenantCount {
    max: usize,
    margin: usize,
    what: &'static str,
    setting: &'static str,
}

impl TenantCount {
    fn plan(
        &self,
        tenant: &str,
        current: usize,
        adding: usize,
        guard_key: impl FnOnce() -> Vec<u8>,
        seen: Revision,
        txn: Txn,
    ) -> Result<Txn, ApiError> {
        let max = self.max;
        if max == 0 || adding == 0 {
            return Ok(txn);
        }
        if current + adding > max {
            return Err(exceeded(
                format!(
                    "tenant {tenant:?} has {current} {}; the limit is {max}",
                    self.what
                ),
                max,
                self.setting,
            ));
        }
        if current + adding + self.margin > max {
            return Ok(guard(txn, guard_key(), seen));
        }
        Ok(txn)
    }
}

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
    let streaming = crate::grpc_methods::is_streaming_grpc(&request);
    let token = request
        .extensions()
        .get::<crate::auth::Principal>()
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
        .get::<crate::auth::Principal>()
        .filter(|p| &*p.token_id != "anonymous")
        .map(|p| Arc::clone(&p.token_id))
    else {
        return next.run(request).await;
    };
    match limiter.take(&token, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let error = limiter.refusal(&token, wait);
            if crate::grpc_methods::is_grpc(request.headers()) {
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

/// Parses a JSON request body that must be an object. serde would also
/// fill a struct from an array (`[]` would be an empty tenant body), and
/// its own recursion limit keeps deep documents from the stack.
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |m: String| ApiError::new(ErrorReason::InvalidArgument, m);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(invalid(
            "invalid JSON body: expected a JSON object `{…}`".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}

/// Largest non-JSON error body read to become the JSON error's message.
const MAX_ERROR_TEXT: usize = 4 * 1024;

/// Gives every HTTP (non-gRPC) error response a JSON body
/// `{"error":{"code","message","metadata"}}`: the router's own answers
/// (405 for a method a route does not have, 400 for a path segment that is
/// not UTF-8 or a malformed query) are plain text or empty otherwise.
pub async fn json_errors(request: Request, next: Next) -> Response {
    if crate::grpc_methods::is_grpc(request.headers()) {
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

    #[test]
    fn the_shipped_example_lists_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = crate::config::parse_file(&path, &text).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.audit, crate::audit::AuditSettings::default());
    }

    #[test]
    fn bad_settings_name_the_setting_and_the_file() {
        let path = std::path::Path::new("s.toml");
        for (text, setting) in [
            ("[limits]\nmax_key_bytes = 9999\n", "limits.max_key_bytes"),
            (
                "[limits]\nmax_tenants_per_project = -1\n",
                "limits.max_tenants_per_project",
            ),
            (
                "[limits]\nrequests_per_second = -3.0\n",
                "limits.requests_per_second",
            ),
            ("[limits]\nrequest_burst = 0.5\n", "limits.request_burst"),
            ("[audit]\nmax_age = \"soon\"\n", "audit.max_age"),
            ("[audit]\nmax_entries = 0\n", "audit.max_entries"),
        ] {
            let e = crate::config::parse_file(path, text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(setting) && e.contains("s.toml"), "{text}: {e}");
        }
        assert!(crate::config::parse_file(path, "[limits]\nmax_colour = 1\n").is_err());
        let config = crate::config::parse_file(
            path,
            "[limits]\nmax_instances_per_tenant = 0\nrequests_per_second = 2.5\n",
        )
        .unwrap();
        assert_eq!(config.limits.counts.max_instances_per_tenant, 0);
        assert!((config.limits.rate.per_second - 2.5).abs() < f64::EPSILON);
    }

    #[test]
    fn counts_are_refused_at_the_limit_and_guarded_near_it() {
        let limits = CountLimits {
            max_tenants_per_project: 2,
            max_instances_per_tenant: 5000,
            ..CountLimits::default()
        };
        let txn = plan_tenants(&limits, "p", 1, 1, 7, Txn::new()).unwrap();
        assert_eq!(txn.ops.len(), 1, "creating a tenant puts the guard");
        let e = plan_tenants(&limits, "p", 2, 1, 7, Txn::new()).unwrap_err();
        assert_eq!(e.reason, ErrorReason::LimitExceeded);
        let far = plan_instances(&limits, "p", "t", 10, 1, 7, Txn::new()).unwrap();
        assert!(far.ops.is_empty(), "far from the limit, no guard");
        let near = plan_instances(&limits, "p", "t", 4000, 1, 7, Txn::new()).unwrap();
        assert_eq!(near.compares.len(), 1);
    }
}
