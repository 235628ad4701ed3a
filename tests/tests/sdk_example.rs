//! `client-sdk/examples/game_server.rs` as docs/sdk.md runs it: configured
//! only by `STRATA_ENDPOINTS` and `STRATA_TOKEN` against a daemon with auth
//! on (the default), it loads its config, registers, finds the matchmaker
//! through the tenant fallback, and deregisters on SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use strata_tests::{Daemon, http_ok, stratad_bin};
use tokio::io::{AsyncBufReadExt, BufReader};

const P: &str = "/v1/projects/vega/tenants";

/// Waits until `log` holds `what`; panics with the log after `timeout`.
async fn wait_for(log: &Arc<Mutex<String>>, what: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !log.lock().unwrap().contains(what) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the example never logged {what:?}; its log:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_game_server_example_runs_from_the_environment() {
    let daemon = Daemon::start().await;
    // The setup of docs/sdk.md.
    http_ok(daemon.addr, "PUT", &format!("{P}/integration"), "{}").await;
    http_ok(
        daemon.addr,
        "PUT",
        &format!("{P}/feat-login"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    http_ok(
        daemon.addr,
        "PUT",
        &format!("{P}/integration/config/game-server/config.yaml"),
        "max_players: 16\ntick_rate_hz: 20\nmotd: hello\n",
    )
    .await;
    http_ok(
        daemon.addr,
        "POST",
        &format!("{P}/integration/services/matchmaker/instances"),
        r#"{"id":"mm-1","endpoints":{"main":"10.0.0.9:8080"},"kind":"persistent"}"#,
    )
    .await;

    let example = stratad_bin().with_file_name("examples").join("game_server");
    assert!(
        example.exists(),
        "{} is built by the README's test command (cargo build --examples)",
        example.display()
    );
    let work = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&example)
        .current_dir(work.path())
        .env_clear()
        .env("STRATA_ENDPOINTS", daemon.addr.to_string())
        .env("STRATA_TOKEN", daemon.admin_token())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
    }
    wait_for(&log, "config loaded", Duration::from_secs(20)).await;
    wait_for(&log, "registered", Duration::from_secs(20)).await;
    // Its own instance, in its own tenant.
    let listed = http_ok(
        daemon.addr,
        "GET",
        &format!("{P}/feat-login/services/game-server/instances"),
        "",
    )
    .await;
    assert_eq!(listed["instances"].as_array().unwrap().len(), 1, "{listed}");
    // Every 50 ticks (2.5 s at 20 Hz) it asks for the matchmaker, which
    // only the integration tenant runs.
    wait_for(&log, "would ask the matchmaker", Duration::from_secs(20)).await;
    assert!(log.lock().unwrap().contains("10.0.0.9:8080"));

    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the example exits on SIGINT")
        .unwrap();
    assert!(status.success(), "{status}; log:\n{}", log.lock().unwrap());
    wait_for(&log, "deregistered", Duration::from_secs(1)).await;
    let listed = http_ok(
        daemon.addr,
        "GET",
        &format!("{P}/feat-login/services/game-server/instances"),
        "",
    )
    .await;
    assert_eq!(listed["instances"].as_array().unwrap().len(), 0, "{listed}");
}
