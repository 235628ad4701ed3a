//! `stratad`, the Strata daemon, as a library.
//!
//! This crate owns the store layer ([`store`]: the trait and its backends)
//! and the daemon around it: configuration ([`config`]), the server with its
//! gRPC and HTTP surfaces ([`server`], [`admin`], [`http`]), the error table
//! ([`error`]), logs and metrics ([`telemetry`]) and background [`jobs`]. The
//! binary in `main.rs` only reads configuration and calls [`server::run`];
//! tests and benchmarks use the same pieces in-process.

pub mod admin;
pub mod api;
pub mod audit;
pub mod audit_api;
pub mod auth;
pub mod backup;
pub mod config;
pub mod credentials;
pub mod daemon_state;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod grpc_backup;
pub mod grpc_methods;
pub mod grpc_registry;
pub mod http;
pub mod http_api;
pub mod http_registry;
pub mod hub;
pub mod jobs;
pub mod keyspace;
pub mod leader;
pub mod limits;
pub mod listener;
pub mod private_fs;
pub mod probe;
pub mod probe_policy;
pub mod registry;
pub mod registry_jobs;
pub mod registry_wire;
pub mod server;
pub mod service_watch;
pub mod settings_error;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod tracing_otel;
pub mod view;
