//! `stratad`, the Strata daemon, as a library.
//!
//! This crate owns the store layer ([`store`]: the trait and its backends)
//! and the daemon around it. The binary in `main.rs` only reads
//! configuration and calls [`server::run`]; tests and benchmarks use the same
//! pieces in-process. Modules import each other without cycles
//! (`scripts/check-layers.py` checks it in CI); roughly bottom-up: `store`,
//! `domain`, `keyspace`, `error`, `settings_error`, `grpc_methods` → `view`,
//! `hub`, lenses → `api`, `registry`, `backup` → handlers (`grpc*`,
//! `http*`, `*_api`) and middleware (`auth`, `limits`, `audit`,
//! `telemetry`) → `daemon_state` → `server`, `config`, jobs.

// `AdminService` (status) over gRPC.
pub mod admin;
// The tenant and config operations every transport shares: validate against the view, plan one transaction, commit, re-plan on conflict.
pub mod api;
// The audit log: the recording middleware, the store wrapper that commits an entry with its change, refusal budgets, queries and retention.
pub mod audit;
// The audit log's query API over gRPC and HTTP.
pub mod audit_api;
// Roles, token scopes and the one authorization rule (`Principal::allows`); the authentication middleware and streams that end on revocation.
pub mod auth;
// Export and import of the versioned backup format.
pub mod backup;
// The daemon's settings: defaults, file, environment, flags, each value with its source.
pub mod config;
// The bearer token format: parsing, hashing, generation.
pub mod credentials;
// What every request handler shares (`DaemonState`).
pub mod daemon_state;
// Pure rules: names, documents, resolution, registry records.
pub mod domain;
// The one table from API errors to gRPC codes and HTTP statuses.
pub mod error;
// gRPC handlers of `TenantService` and `ConfigService`, and the encoded watch routes.
pub mod grpc;
// gRPC handlers of `BackupService`.
pub mod grpc_backup;
// The gRPC methods the daemon serves, and which of them stream.
pub mod grpc_methods;
// gRPC handlers of `RegistryService`.
pub mod grpc_registry;
// Health, readiness, metrics and status routes, and what every HTTP/JSON handler shares.
pub mod http;
// The HTTP/JSON API of tenants and config.
pub mod http_api;
// The HTTP/JSON API of the registry.
pub mod http_registry;
// The watch hub: groups of subscribers, resolved pushes, resumes from the journal.
pub mod hub;
// Leader-only history compaction.
pub mod jobs;
// Where each object lives in the store, and parsing store keys back.
pub mod keyspace;
// Leader election over the store's leases.
pub mod leader;
// Size, count, byte and rate limits, stream caps, and JSON bodies for HTTP errors.
pub mod limits;
// The serve loop on the daemon's port: connection cap, request deadlines, HTTP/2 keep-alive, drain.
pub mod listener;
// Files and directories the daemon creates, private whatever the umask.
pub mod private_fs;
// The active health prober (TCP, HTTP, gRPC).
pub mod probe;
// Where health probes may connect.
pub mod probe_policy;
// Registry operations: register, deregister, drain, heartbeat, branch registration, resolution.
pub mod registry;
// Leader-only registry jobs: health checks, tenant TTL collection, instance gauges.
pub mod registry_jobs;
// Registry objects to and from protobuf.
pub mod registry_wire;
// `run`: builds the state, the router and the jobs, serves, drains.
pub mod server;
// The services lens of the watch hub.
pub mod service_watch;
// The one error type of settings.
pub mod settings_error;
// The `Store` trait and its embedded and etcd backends.
pub mod store;
// Logs, the Prometheus recorder and request metrics.
pub mod telemetry;
// TLS on the daemon's listener.
pub mod tls;
// The token table's loading and following, the first admin token, `TokenService`.
pub mod tokens;
// OpenTelemetry trace export and request spans.
pub mod tracing_otel;
// The in-memory view of the store: projects, tenants, layers, instances, the journal.
pub mod view;
