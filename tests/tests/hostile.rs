//! Hostile clients against a real `stratad`: each test reproduces one attack
//! from the security review (named `finding_N_…` or `gap_…` after it) and
//! checks the daemon's defence. Every loop is bounded in count and time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, Instant};

use serde_json::Value;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{CreateTokenRequest, Role};
use strata_tests::{Daemon, http_get, http_request, http_request_as};

const P: &str = "/v1/projects/vega/tenants";

async fn start_with(config: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stratad.toml");
    std::fs::write(&path, config).unwrap();
    let daemon = Daemon::builder()
        .args(["--config", path.to_str().unwrap()])
        .start()
        .await;
    (daemon, dir)
}

async fn call(daemon: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http_request(daemon.addr, method, path, &[], body.as_bytes())
        .await
        .unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
    (status, json)
}

async fn call_as(
    daemon: &Daemon,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let bearer = format!("Bearer {token}");
    let (status, text) = http_request_as(
        daemon.addr,
        method,
        path,
        &[("authorization", &bearer)],
        body.as_bytes(),
    )
    .await
    .unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
    (status, json)
}

/// Creates a token for project `vega`; returns its secret.
async fn token(daemon: &Daemon, role: Role, pattern: &str) -> String {
    TokenServiceClient::new(daemon.channel().await)
        .create_token(CreateTokenRequest {
            name: format!("t-{}", rand::random::<u32>()),
            role: role as i32,
            project: "vega".into(),
            tenant_pattern: pattern.into(),
            ..CreateTokenRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Finding 1: gRPC requests to paths the daemon does not serve, sent without
/// a token, must not mint a metrics label (and a cache entry) per path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_unknown_grpc_paths_do_not_grow_metrics() {
    let daemon = Daemon::start().await;
    let (_, before) = http_get(daemon.addr, "/metrics").await.unwrap();
    let marker = "zzhostile";
    for i in 0..200 {
        let path = format!("/{marker}.Svc{i}/{}", "m".repeat(2_000));
        let (status, _) = http_request_as(
            daemon.addr,
            "POST",
            &path,
            &[("content-type", "application/grpc")],
            b"",
        )
        .await
        .unwrap();
        assert!(status < 500, "{status}");
    }
    // A known method, refused for want of a token, still counts under its
    // own (bounded) name.
    http_request_as(
        daemon.addr,
        "POST",
        "/strata.v1.TenantService/ListTenants",
        &[("content-type", "application/grpc")],
        b"",
    )
    .await
    .unwrap();
    let (_, after) = http_get(daemon.addr, "/metrics").await.unwrap();
    assert!(
        !after.contains(marker),
        "an unknown path became a label: {}",
        after
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect::<String>()
    );
    assert!(
        after.len() < before.len() + 20_000,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(after.contains("op=\"unmatched\""), "unknown paths count as unmatched");
    assert!(
        after.contains("op=\"/strata.v1.TenantService/ListTenants\",code=\"UNAUTHENTICATED\""),
        "known methods keep their label"
    );
}
