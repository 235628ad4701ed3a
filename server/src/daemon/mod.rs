//! The daemon around the operations: settings (defaults, file,
//! environment, flags), the listener and TLS, `run` (start-up, serve,
//! drain), leader election and the leader-only jobs (history compaction,
//! health checks, tenant TTL collection), logs and the metrics recorder.

// Leader-only history compaction.
pub mod compaction;
// Leader election over the store's leases.
pub mod leader;
// The serve loop on the daemon's port: connection cap, request deadlines, HTTP/2 keep-alive, drain.
pub mod listener;
// Leader-only registry jobs: health checks, tenant TTL collection, instance gauges.
pub mod registry_jobs;
// Accepted sockets: TCP_NODELAY and coalesced writes.
pub mod sockets;
// `run`: builds the state, the router and the jobs, serves, drains.
pub mod server;
// The daemon's settings: defaults, file, environment, flags, each value with its source.
pub mod settings;
// Logs and the Prometheus recorder.
pub mod telemetry;
// TLS on the daemon's listener.
pub mod tls;
