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
//!
//! # Module layering
//!
//! The modules form layers; a module imports only modules of its own layer
//! or below, so there is no import cycle (`scripts/check-layers.py --crate
//! client-sdk --layers client-sdk/layers.txt` checks it; that file lists
//! the same layers). Bottom-up:
//!
//! 1. **values** — `error` ([`Error`], [`WatchError`]), `services` (the
//!    discovery value types [`ResolvedService`], [`ServiceInstance`],
//!    [`Endpoint`]), `format`, `codec`, `tls`, `token`: no I/O policy, and
//!    nothing of the crate above them.
//! 2. **transport** — `endpoints` (the endpoint pool and backoff), `trace`
//!    (spans), `cache` (the disk cache of values and service sets).
//! 3. **client** — `client` ([`Client`]: pool, token, timeouts, the retry
//!    loop of one-shot calls; owns the disk cache) and `connection`
//!    ([`Connection`], the CLI's raw clients).
//! 4. **engine** — `watch`: the resumable watch engine every watch runs on
//!    (it follows a [`Client`]'s pool).
//! 5. **features** — `config`, `discovery`, `tenant_services`,
//!    `registration`, `propagation`, `balance`: what a game server calls,
//!    each built on the layers below and none on another.
//!
//! The crate root only declares modules and re-exports; no module imports
//! it except through those re-exports (`crate::Error` is `error::Error`).

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
mod services;
mod tenant_services;
mod tls;
mod token;
pub mod trace;
mod watch;

pub use balance::{InFlight, PowerOfTwoChoices, RoundRobin};
pub use client::{Client, ClientBuilder};
pub use config::{Config, ConfigMap, ConfigRef};
pub use connection::Connection;
pub use discovery::ServiceWatch;
pub use error::{Error, WatchError};
pub use registration::{InstanceSpec, Registration};
pub use services::{Endpoint, ResolvedService, ServiceInstance};
pub use strata_proto::v1 as proto;
pub use tenant_services::{TenantServices, TenantServicesWatch};
pub use tls::TlsConfig;
pub use token::{AuthChannel, BearerToken};
pub use tonic::{Code, Status};
pub use watch::Source;
