//! The daemon's two front doors on one port: gRPC handlers (`grpc/`), the
//! HTTP/JSON API (`http/`), and the middleware every request passes
//! (`layers/`: authentication, rate limits and stream caps, the audit
//! scope, request metrics and traces).
//!
//! A handler is thin: read the request, state what it does and authorize,
//! call one `app` operation, map the result. `state.rs` is what every
//! handler shares.

// gRPC handlers, one file per service, and the encoded watch routes.
pub mod grpc;
// The gRPC methods the daemon serves, and which of them stream.
pub mod grpc_methods;
// The HTTP/JSON API, one file per resource, and what its handlers share.
pub mod http;
// The one router: every service and resource, and the middleware stack.
pub mod router;
// The middleware: authentication, limits, audit scope, metrics, tracing.
pub mod layers;
// What every request handler shares (`DaemonState`).
pub mod state;
