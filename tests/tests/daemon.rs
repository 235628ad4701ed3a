//! `stratad` as a user meets it: a real process on a loopback port, probed
//! with generic gRPC tools' protocols (health, reflection), HTTP, and
//! stopped with signals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use strata_proto::v1::StatusRequest;
use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_tests::{Daemon, http_get, run_stratad};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(daemon: &Daemon) -> strata_tests::AuthChannel {
    daemon.channel().await
}

async fn health(channel: &strata_tests::AuthChannel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn reflected_services(channel: &strata_tests::AuthChannel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn serves_health_reflection_status_and_metrics_then_drains_on_sigterm() {
    let mut daemon = Daemon::start().await;
    let channel = channel(&daemon).await;

    assert_eq!(health(&channel, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(&channel, "strata.v1.AdminService").await,
        ServingStatus::Serving as i32
    );

    let services = reflected_services(&channel).await;
    assert!(
        services.contains(&"strata.v1.AdminService".to_owned()),
        "{services:?}"
    );
    assert!(
        services.contains(&"grpc.health.v1.Health".to_owned()),
        "{services:?}"
    );

    let status = AdminServiceClient::new(channel.clone())
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.store_kind, "embedded");
    assert!(status.ready);
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.header.unwrap().member, daemon.addr.to_string());

    assert_eq!(http_get(daemon.addr, "/readyz").await.unwrap().0, 200);
    assert_eq!(http_get(daemon.addr, "/healthz").await.unwrap().0, 200);
    let (code, body) = http_get(daemon.addr, "/v1/status").await.unwrap();
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["store_kind"], "embedded");

    let (code, body) = http_get(daemon.addr, "/no/such/route").await.unwrap();
    assert_eq!(code, 404);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "not_found");

    let (code, metrics) = http_get(daemon.addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for expected in [
        r#"strata_rpc_requests_total{op="/strata.v1.AdminService/Status",code="OK"} 1"#,
        r#"strata_rpc_duration_seconds_bucket{op="/strata.v1.AdminService/Status""#,
        r#"strata_rpc_requests_total{op="GET /readyz",code="200"}"#,
        "strata_store_revision ",
        "strata_ready 1",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }

    let asked = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit {exit}; stderr:\n{}", daemon.stderr());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn sigterm_with_an_open_stream_reports_not_serving_and_exits_within_grace() {
    let mut daemon = Daemon::builder()
        .args(["--shutdown-grace", "2s"])
        .start()
        .await;
    let channel = channel(&daemon).await;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let asked = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // While draining, new connections are refused or the daemon is gone.
    let readiness = http_get(daemon.addr, "/readyz").await;
    assert!(
        !matches!(readiness, Ok((200, _))),
        "still ready while draining: {readiness:?}"
    );

    let exit = daemon.wait_exit(Duration::from_secs(10)).await;
    let took = asked.elapsed();
    assert!(exit.success(), "exit {exit}; stderr:\n{}", daemon.stderr());
    assert!(
        took < Duration::from_secs(4),
        "grace is 2s but exit took {took:?}"
    );
}

#[tokio::test]
async fn sigint_stops_cleanly_too() {
    let mut daemon = Daemon::start().await;
    daemon.signal(Signal::SIGINT);
    let exit = daemon.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit {exit}; stderr:\n{}", daemon.stderr());
}

/// Startup failures: one line on stderr naming the problem, the right exit
/// code, no panic.
fn assert_one_clear_line(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got:\n{stderr}");
    assert!(lines[0].starts_with("stratad: error: "), "{stderr}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn bad_configuration_exits_64_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, "listen = \"127.0.0.1:7070\"\nlisen = \"typo\"\n").unwrap();
    let bad_file = bad_file.to_str().unwrap();

    // (arguments, environment, what the one error line must mention)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--data-dir", data, "--listen", "not-an-address"],
            vec![],
            "--listen",
        ),
        (
            vec!["--data-dir", data, "--log-format", "xml"],
            vec![],
            "log.format",
        ),
        (
            vec!["--data-dir", data, "--config", bad_file],
            vec![],
            "lisen",
        ),
        (
            vec!["--data-dir", data, "--config", "/nonexistent/stratad.toml"],
            vec![],
            "/nonexistent/stratad.toml",
        ),
        (
            vec!["--data-dir", data],
            vec![("STRATA_SHUTDOWN_GRACE", "soon")],
            "STRATA_SHUTDOWN_GRACE",
        ),
        (
            vec!["--data-dir", data],
            vec![("STRATA_COMPACTION_RETAIN_REVISIONS", "-5")],
            "retain_revisions",
        ),
    ];
    for (args, env, needle) in cases {
        let (status, stderr) = run_stratad(&args, &env).await;
        assert_eq!(status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert_one_clear_line(&stderr, needle);
    }

    let (status, stderr) = run_stratad(&["--no-such-flag"], &[]).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[tokio::test]
async fn unusable_data_dir_exits_nonzero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();

    // A path through a regular file cannot become a directory.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("data");
    let (status, stderr) = run_stratad(
        &[
            "--data-dir",
            under_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_one_clear_line(&stderr, "cannot create data dir");

    // A data dir whose database file is not a database.
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("strata.redb"), vec![0x5a; 64 * 1024]).unwrap();
    let (status, stderr) = run_stratad(
        &[
            "--data-dir",
            garbage.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_one_clear_line(&stderr, "strata.redb");

    // A data dir that another running daemon holds.
    let first = Daemon::start().await;
    let (status, stderr) = run_stratad(
        &[
            "--data-dir",
            first.data_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_one_clear_line(&stderr, "another stratad");
}

#[tokio::test]
async fn listen_address_in_use_exits_nonzero_with_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    // A data dir stratad creates (0700): an existing one as open as
    // tempdir's 0755 would add a warning line about its mode.
    let data = dir.path().join("data");
    let (status, stderr) = run_stratad(
        &["--data-dir", data.to_str().unwrap(), "--listen", &addr],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_one_clear_line(&stderr, "cannot listen on");
}

#[tokio::test]
async fn configuration_file_and_env_are_honoured_by_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stratad.toml");
    std::fs::write(
        &config,
        "shutdown_grace = \"1s\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let mut daemon = Daemon::builder()
        .args(["--config", config.to_str().unwrap()])
        .env("STRATA_LOG_LEVEL", "warn")
        .start()
        .await;
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).await.success());
    let stderr = daemon.final_stderr().await;
    assert!(
        !stderr.contains("INFO"),
        "warn level from env not applied:\n{stderr}"
    );

    // Without the env override the file's JSON format shows in every line.
    let mut daemon = Daemon::builder()
        .args(["--config", config.to_str().unwrap()])
        .start()
        .await;
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).await.success());
    let stderr = daemon.final_stderr().await;
    assert!(stderr.lines().count() >= 2, "{stderr}");
    for line in stderr.lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(json.get("level").is_some(), "{json}");
    }
}

/// Permission bits of `path` (without the file type).
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// docs/security.md, "Files the daemon writes": the data dir was created with the process umask
/// (0755 under umask 022, the usual one outside the systemd unit), and so
/// was the store file (0644), so every local user could read the whole
/// store. The test process's umask is used as is (022 here): the daemon
/// must not depend on it.
#[tokio::test]
async fn daemon_data_dir_store_and_admin_token_are_private_finding_8() {
    let daemon = Daemon::start().await;
    assert_eq!(mode(&daemon.data_dir), 0o700, "data dir");
    assert_eq!(
        mode(&daemon.data_dir.join("strata.redb")),
        0o600,
        "store file"
    );
    assert_eq!(mode(&daemon.admin_token_file), 0o600, "admin token");
    drop(daemon);

    // An admin token file in a directory that does not exist yet.
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("secrets/nested/admin.token");
    let daemon = Daemon::builder()
        .admin_token_file(&token_file)
        .start()
        .await;
    assert_eq!(mode(&tmp.path().join("secrets")), 0o700);
    assert_eq!(mode(&tmp.path().join("secrets/nested")), 0o700);
    assert_eq!(mode(&token_file), 0o600);
    drop(daemon);
}

/// Finding 8: a data dir that already exists with looser permissions (an
/// older stratad, or one made by hand) is kept as it is — the operator may
/// have chosen it — but the daemon says so clearly, naming the fix.
#[tokio::test]
async fn daemon_warns_about_a_data_dir_others_can_read_finding_8() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::builder().data_dir(&data).start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.stderr().contains("chmod 700") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("chmod 700"))
        .unwrap_or_else(|| panic!("no warning about the data dir's mode:\n{stderr}"));
    assert!(line.contains(data.to_str().unwrap()), "{line}");
    assert!(line.contains("WARN") || line.contains("warn"), "{line}");
    // Left as the operator made it.
    assert_eq!(mode(&data), 0o755);
    // What the daemon created inside is private all the same.
    assert_eq!(mode(&data.join("strata.redb")), 0o600);
}
