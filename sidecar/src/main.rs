//! `strata-sidecar` binary: settings from the command line, the
//! environment and a config file; runs until SIGTERM or SIGINT, then
//! drains.

use std::collections::HashMap;
use std::process::ExitCode;

use strata_sidecar::config::LoadError;
use strata_sidecar::{Listeners, Settings};

fn main() -> ExitCode {
    // The only place the process environment is read.
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = match Settings::load(std::env::args_os(), &env) {
        Ok(s) => s,
        Err(LoadError::Usage(e)) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Err(LoadError::Invalid(e)) => {
            eprintln!("strata-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // One worker: a current-thread runtime, like one nginx worker — no
    // cross-thread wake-ups on the request path.
    let mut runtime = match settings.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = Listeners::bind(&settings).await?;
        strata_sidecar::run(settings, listeners, signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
