//! The Strata client SDK for game servers.
//!
//! One [`Client`] talks to a list of `stratad` daemons for one project and
//! tenant. It gives a game server:
//!
//! - **typed, hot-reloaded config** — [`Client::watch`] and
//!   [`Client::watch_prefix`] return handles whose read is a lock-free load
//!   and which notify of every change (a `tokio::sync::watch` receiver or a
//!   callback with the old and new value); a bad value keeps the last good
//!   one and is reported, never panics;
//! - **a disk fallback** — with [`ClientBuilder::cache_dir`], every config
//!   key and service watched is written atomically to disk, and a game server started while
//!   every daemon is down starts from it, then catches up;
//! - **self-registration** — [`Client::register`] returns a
//!   [`Registration`] guard that keeps the instance's lease alive across
//!   daemon failover, registers again if the lease was lost, and
//!   deregisters on drop;
//! - **discovery** — [`Client::resolve`] and [`Client::watch_service`] with
//!   the tenant fallback of the registry, and client-side balancing
//!   ([`RoundRobin`], [`PowerOfTwoChoices`]);
//! - **tenant propagation** — [`propagation`] puts the tenant on outgoing
//!   `http` and tonic requests as the W3C `baggage` entry `strata-tenant`.
//! - **tracing** — with [`ClientBuilder::tracing`] (usually from
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`), calls are OpenTelemetry spans exported
//!   over OTLP/gRPC and carry their W3C `traceparent` to the daemon
//!   ([`trace`]).
//!
//! Every call and watch fails over between the daemons: on a failure it
//! moves to the next endpoint (with backoff and jitter after each round),
//! and watches resume from the last revision they saw, so no update is lost
//! or delivered twice.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use serde::Deserialize;
//! use strata_client::{Client, InstanceSpec, RoundRobin};
//!
//! #[derive(Deserialize)]
//! struct Settings {
//!     max_players: u32,
//!     tick_rate: u32,
//! }
//!
//! # async fn run() -> Result<(), strata_client::Error> {
//! let client = Client::builder()
//!     .endpoints(["10.0.0.1:7700", "10.0.0.2:7700"])
//!     .project("vega")
//!     .tenant("feat-login")
//!     .cache_dir("/var/cache/strata")
//!     .build()?;
//!
//! let settings = client.watch::<Settings>("game/settings.yaml").await?;
//! println!("max players: {}", settings.get().max_players);
//!
//! let _registration = client
//!     .register(InstanceSpec::new("game-server").endpoint("main", "10.0.0.7:7777"))
//!     .await?;
//!
//! let matchmaker = client.watch_service("matchmaker").await?;
//! let balancer = RoundRobin::new();
//! if let Some(instance) = balancer.pick(&matchmaker.get().instances) {
//!     println!("matchmaker at {:?}", instance.address());
//! }
//! # tokio::time::sleep(Duration::ZERO).await;
//! # Ok(()) }
//! ```
//!
//! The admin CLI uses [`Connection`], a plain connection exposing the raw
//! `strata.v1` clients.

#![deny(missing_docs)]

mod balance;
mod cache;
mod client;
mod codec;
mod config;
mod connection;
mod discovery;
mod endpoints;
mod error;
mod format;
pub mod propagation;
mod registration;
mod tenant_services;
mod tls;
mod token;
pub mod trace;
mod watch;

pub use balance::{InFlight, PowerOfTwoChoices, RoundRobin};
pub use client::{Client, ClientBuilder};
pub use config::{Config, ConfigMap, ConfigRef};
pub use connection::Connection;
pub use discovery::{Endpoint, ResolvedService, ServiceInstance, ServiceWatch};
pub use error::{Error, WatchError};
pub use registration::{InstanceSpec, Registration};
pub use strata_proto::v1 as proto;
pub use tenant_services::{TenantServices, TenantServicesWatch};
pub use tls::TlsConfig;
pub use token::{AuthChannel, BearerToken};
pub use tonic::{Code, Status};
pub use watch::Source;
