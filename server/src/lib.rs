//! `stratad`, the Strata daemon, as a library.
//!
//! The folders are the layers, bottom-up; a module imports only its own
//! layer and those below (`scripts/check-layers.py` checks it in CI, with
//! the layers listed in `server/layers.txt`):
//!
//! - ground: [`store`] (the trait and its backends), [`domain`] (pure
//!   rules), [`error`], [`settings_error`], [`private_fs`];
//! - [`probe`]: the active health prober and where it may connect;
//! - [`state`]: the in-memory view and the watch hub;
//! - [`app`]: the operations every transport shares, and the audit log;
//! - [`transport`]: middleware, then the gRPC and HTTP handlers;
//! - [`daemon`]: settings, listener, `run`, leader and jobs.
//!
//! The binary in `main.rs` only reads settings and calls
//! [`daemon::server::run`]; tests and benchmarks use the same pieces
//! in-process.

// The operations every transport shares, and the audit log.
pub mod app;
// Settings, listener and TLS, `run`, leader election and the leader-only jobs.
pub mod daemon;
// Pure rules: names, documents, resolution, registry records, token format.
pub mod domain;
// The one table from API errors to gRPC codes and HTTP statuses.
pub mod error;
// Files and directories the daemon creates, private whatever the umask.
pub mod private_fs;
// The active health prober (TCP, HTTP, gRPC, UDP) and where probes may connect.
pub mod probe;
// The one error type of settings.
pub mod settings_error;
// The in-memory view of the store and the watch hub.
pub mod state;
// The `Store` trait and its embedded and etcd backends.
pub mod store;
// Middleware, gRPC handlers, the HTTP/JSON API.
pub mod transport;
