//! A small game server on the Strata SDK: it reads a typed config and
//! hot-reloads it, registers itself, resolves its matchmaker (with tenant
//! fallback), and carries its tenant on outgoing calls.
//!
//! Run it against a daemon (see docs/sdk.md for the setup commands); the
//! client reads `STRATA_ENDPOINTS`, `STRATA_PROJECT`, `STRATA_TENANT`,
//! `STRATA_TOKEN` (or `STRATA_TOKEN_FILE`), `STRATA_CACHE_DIR` and
//! `STRATA_TLS_CA` from the environment:
//!
//! ```text
//! STRATA_ENDPOINTS=127.0.0.1:7070 STRATA_TOKEN_FILE=strata-data/admin.token \
//!     cargo run -p strata-client --example game_server
//! ```
//!
//! (project `vega` and tenant `feat-login` unless `STRATA_PROJECT` and
//! `STRATA_TENANT` say otherwise).
//!
//! Stop it with Ctrl-C: it deregisters before exiting.

use std::error::Error;
use std::time::Duration;

use serde::Deserialize;
use strata_client::propagation::WithTenant;
use strata_client::{ClientBuilder, InstanceSpec, RoundRobin, Source};

/// `game-server/config.yaml` (any format works: json, yaml, toml).
#[derive(Debug, Deserialize)]
struct GameConfig {
    max_players: u32,
    tick_rate_hz: u32,
    #[serde(default)]
    motd: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // 1. A client for our project and tenant, from the environment. Without
    //    STRATA_CACHE_DIR it keeps a disk cache here, so that it starts even
    //    when every daemon is down.
    //    What the environment leaves unset, the example fills in for the
    //    setup in docs/sdk.md.
    let mut builder = ClientBuilder::from_env(std::env::vars())?;
    let unset = |name: &str| std::env::var(name).map_or(true, |v| v.trim().is_empty());
    if unset("STRATA_ENDPOINTS") {
        builder = builder.endpoints(["127.0.0.1:7070"]);
    }
    if unset("STRATA_PROJECT") {
        builder = builder.project("vega");
    }
    if unset("STRATA_TENANT") {
        builder = builder.tenant("feat-login");
    }
    if unset("STRATA_CACHE_DIR") {
        builder = builder.cache_dir("strata-cache");
    }
    let client = builder.build()?;

    // 2. Typed config, hot-reloaded. Reads are lock-free: fine every tick.
    let config = client
        .watch::<GameConfig>("game-server/config.yaml")
        .await?;
    if config.source() == Source::DiskCache {
        tracing::warn!("no daemon reachable: running on the cached config");
    }
    tracing::info!(config = ?*config.get(), "config loaded");
    config.on_change(|old, new| {
        tracing::info!(
            old_max = old.max_players,
            new_max = new.max_players,
            motd = %new.motd,
            "config reloaded"
        );
    });

    // 3. Our own endpoint, registered for as long as we run.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let registration = client
        .register(
            InstanceSpec::new("game-server")
                .endpoint("main", &address)
                .version(env!("CARGO_PKG_VERSION"))
                .ttl(Duration::from_secs(10)),
        )
        .await?;
    tracing::info!(id = registration.id(), %address, "registered");

    // 4. The matchmaker we depend on: ours if this branch deploys one, else
    //    the integration environment's.
    let matchmaker = client.watch_service("matchmaker").await?;
    let balancer = RoundRobin::new();
    let tenant = client.propagated_tenant()?;

    // 5. The game loop.
    let mut ticks: u64 = 0;
    loop {
        let period = Duration::from_secs(1) / config.load().tick_rate_hz.max(1);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(period) => {}
        }
        ticks += 1;
        let players = config.load().max_players;
        if !ticks.is_multiple_of(50) {
            continue;
        }
        let resolved = matchmaker.get();
        match balancer.pick(&resolved.instances) {
            Some(instance) => {
                // The call carries our tenant, so the matchmaker (and what
                // it calls) routes back into this branch where it can.
                let request = http::Request::builder()
                    .uri(format!(
                        "http://{}/queue?slots={players}",
                        instance.address().unwrap_or_default()
                    ))
                    .with_tenant(&tenant)
                    .body(())?;
                tracing::info!(
                    uri = %request.uri(),
                    from_tenant = ?resolved.tenant,
                    fallback = resolved.fallback,
                    "would ask the matchmaker"
                );
            }
            None => tracing::warn!("no matchmaker instance anywhere in the tenant chain"),
        }
    }

    // 6. Leave cleanly: deregister now rather than waiting for the lease.
    registration.deregister().await?;
    tracing::info!("deregistered; bye");
    Ok(())
}
