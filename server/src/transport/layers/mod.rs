//! The middleware every request passes, outermost first: tracing, request
//! metrics, authentication, rate limits and stream caps, the audit scope,
//! JSON bodies for HTTP errors. Each layer is an axum `from_fn` middleware
//! with its own small state; none knows about handlers.

// The audit scope around every handler, and the outcome read from the response.
pub mod audit;
// Authentication: bearer tokens to principals; streams that end on revocation.
pub mod auth;
// The request rate per token, stream caps, JSON bodies for HTTP errors.
pub mod limits;
// Request counts and latencies by operation and code.
pub mod metrics;
// OpenTelemetry trace export and request spans.
pub mod tracing;
