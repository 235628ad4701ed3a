//! `stratad`: parses flags, environment and config file, opens the store,
//! binds the listener and runs the server until SIGTERM/SIGINT.
//!
//! Exit codes: 0 after a clean drain, 64 for bad flags or configuration, 1
//! when the store or the listener cannot be opened or the server fails.
//! Startup failures print exactly one line to stderr.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use strata_server::daemon::server::{self, ServerOptions};
use strata_server::daemon::settings::{Config, Flags};
use strata_server::daemon::telemetry;
use strata_server::store::Store;
use strata_server::store::embedded::EmbeddedStore;
use strata_server::store::etcd::EtcdStore;
use strata_server::transport::layers::tracing::Tracing;

/// `EX_USAGE` from sysexits.h: bad command line or configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(e) => {
            let usage_error = e.use_stderr();
            // Printing help/version/usage can only fail on a closed stream.
            let _ = e.print();
            return if usage_error {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let config = match Config::load(&flags, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &format!("invalid configuration: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    // The exporter's connection lives on the runtime, so it starts inside.
    let otel = match runtime.block_on(async { Tracing::start(&config.otel) }) {
        Ok(otel) => otel,
        Err(e) => return fail(EXIT_CONFIG, &format!("cannot set up trace export: {e}")),
    };
    if let Err(e) = telemetry::init_logging(&config.log, otel.as_ref()) {
        return fail(EXIT_CONFIG, &format!("cannot set up logging: {e}"));
    }
    if let Some(endpoint) = &config.otel.endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    }
    let result = runtime.block_on(async {
        let result = serve(config).await;
        // After the drain: the spans of the last requests go out too.
        if let Some(otel) = otel {
            otel.shutdown().await;
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(1, &message),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("stratad: error: {message}");
    ExitCode::from(code)
}

async fn serve(config: Config) -> Result<(), String> {
    let store = open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(
        listen = %config.listen,
        data_dir = %config.data_dir.display(),
        store = store.kind(),
        tls = config.tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "stratad starting"
    );
    if let Some(tls) = &config.tls {
        tracing::info!(
            cert = %tls.files().cert.display(),
            client_certificates = if tls.requires_client_cert() { "required" } else { "not asked for" },
            "serving gRPC and HTTP over TLS; SIGHUP reloads the certificate"
        );
        tokio::spawn(tls.clone().reload_on_sighup());
    }
    if config.etcd.is_some() {
        log_etcd_value_limit(config.limits.max_value_bytes);
    }
    let options = ServerOptions {
        shutdown_grace: config.shutdown_grace,
        compaction: config.compaction.clone(),
        limits: config.limits,
        journal: config.journal,
        tls: config.tls.clone(),
        auth: auth_options(&config),
        audit: config.audit,
        probes: config.probes.clone(),
    };
    server::run(listener, store, options, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// The auth settings with the admin token file resolved (default
/// `<data-dir>/admin.token`, also with etcd: the data directory is then
/// only used for this file). Warns loudly when auth is off.
fn auth_options(config: &Config) -> strata_server::app::auth::AuthConfig {
    let mut auth = config.auth.clone();
    if auth.admin_token_file.is_none() {
        auth.admin_token_file = Some(config.data_dir.join("admin.token"));
    }
    if auth.mode == strata_server::app::auth::AuthMode::Off {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--auth=off): anyone who can reach {} may read, change and \
             delete everything. Use this only for local experiments.",
            config.listen
        );
    }
    auth
}

/// Says how large config values may be on etcd, and what etcd must accept
/// for that: a write carries its value twice, and etcd refuses requests
/// over its `--max-request-bytes` (1.5 MiB by default).
fn log_etcd_value_limit(max_value_bytes: usize) {
    use strata_server::store::etcd::{ETCD_DEFAULT_MAX_REQUEST_BYTES, request_bytes_for_value};
    let needed = request_bytes_for_value(max_value_bytes);
    if needed <= ETCD_DEFAULT_MAX_REQUEST_BYTES {
        tracing::info!(
            max_value_bytes,
            "config values are limited to limits.max_value_bytes = {max_value_bytes} bytes on etcd, \
             so that a write (value, plus its history copy) fits etcd's default request limit \
             (--max-request-bytes 1.5 MiB); for larger values raise both"
        );
    } else {
        tracing::warn!(
            max_value_bytes,
            needed_request_bytes = needed,
            "limits.max_value_bytes = {max_value_bytes} needs etcd to accept requests of \
             {needed} bytes (--max-request-bytes; etcd's default is 1.5 MiB): writes of \
             larger values fail until etcd allows it"
        );
    }
}

/// The etcd store when etcd endpoints are configured, else the embedded one.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, String> {
    if let Some(etcd) = &config.etcd {
        let endpoints = etcd.endpoints.join(",");
        let store = EtcdStore::connect(etcd.clone())
            .await
            .map_err(|e| format!("cannot use etcd at {endpoints}: {e}"))?;
        return Ok(Arc::new(store));
    }
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&data_dir))
        .await
        .map_err(|e| format!("store open task failed: {e}"))?
        .map_err(|e| {
            format!(
                "cannot open the embedded store in {}: {e}",
                config.data_dir.display()
            )
        })?;
    Ok(Arc::new(store))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop stratad with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
}
