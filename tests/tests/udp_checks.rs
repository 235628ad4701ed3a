//! UDP health checks end to end: an instance registered with a UDP check is
//! routable only once a reply matched, and one whose server replies wrongly
//! never is. Bad UDP checks are refused at registration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_tests::{Daemon, http_json, http_ok, strata};

const P: &str = "/v1/projects/vega/tenants";

/// A UDP server answering every datagram with `reply`; stops with the test.
async fn udp_server(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0_u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(reply, from).await;
        }
    });
    (address, task)
}

fn register_body(id: &str, address: SocketAddr, check: &str) -> String {
    format!(
        r#"{{"id":"{id}","endpoints":{{"main":{{"address":"{address}","protocol":"udp"}}}},"kind":"persistent","check":{check}}}"#
    )
}

fn health_of(resolved: &Value, id: &str) -> String {
    resolved["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .map(|i| i["health"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn udp_checked_instances_are_routable_only_after_a_matching_reply() {
    let daemon = Daemon::start().await;
    http_ok(daemon.addr, "PUT", &format!("{P}/integration"), "{}").await;
    let (right, _right) = udp_server(b"pong 1.2").await;
    let (wrong, _wrong) = udp_server(b"busy").await;
    let check = r#"{"udp":{"send":"ping","expect_regex":"^pong [0-9.]+$"},"interval_ms":100,"timeout_ms":80,"failure_threshold":2}"#;
    let relays = format!("{P}/integration/services/relay/instances");
    http_ok(
        daemon.addr,
        "POST",
        &relays,
        &register_body("r-right", right, check),
    )
    .await;
    http_ok(
        daemon.addr,
        "POST",
        &relays,
        &register_body("r-wrong", wrong, check),
    )
    .await;
    // Binary datagrams, given as hex.
    let hex = r#"{"udp":{"send_hex":"00ff","expect_hex":"706f6e6720312e32"},"interval_ms":100}"#;
    http_ok(
        daemon.addr,
        "POST",
        &relays,
        &register_body("r-hex", right, hex),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = http_ok(daemon.addr, "GET", &relays, "").await;
        let settled = health_of(&listed, "r-right") == "healthy"
            && health_of(&listed, "r-hex") == "healthy"
            && health_of(&listed, "r-wrong") == "unhealthy";
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "probes did not settle: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The wrong server stays unroutable while the right one serves:
    // resolution hands out only the instances whose reply matched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = http_ok(daemon.addr, "GET", &relays, "").await;
    assert_eq!(health_of(&listed, "r-wrong"), "unhealthy", "{listed}");
    let resolved = http_ok(
        daemon.addr,
        "GET",
        &format!("{P}/integration/services/relay"),
        "",
    )
    .await;
    let mut routable: Vec<&str> = resolved["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    routable.sort_unstable();
    assert_eq!(routable, ["r-hex", "r-right"], "{resolved}");

    // Refused at registration, nothing written.
    for (check, needle) in [
        (r#"{"udp":{"send":""}}"#, "1-1200"),
        (
            r#"{"udp":{"send":"a","send_hex":"00"}}"#,
            "exactly one of send",
        ),
        (r#"{"udp":{"send_hex":"0g"}}"#, "not hex"),
        (
            r#"{"udp":{"send":"a","expect":"b","expect_regex":"c"}}"#,
            "at most one",
        ),
        (r#"{"udp":{"send":"a","expect_regex":"("}}"#, "expect_regex"),
        (
            r#"{"udp":{"send":"a","expect_regex":"a{1000}{1000}"}}"#,
            "expect_regex",
        ),
        (r#"{"udp":{"send":"a"},"tcp":true}"#, "exactly one of"),
    ] {
        let (status, json) = http_json(
            daemon.addr,
            "POST",
            &relays,
            &register_body("bad", right, check),
        )
        .await;
        assert_eq!(status, 400, "{check}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{check}: {message}");
    }
    let (oversized_send, _) = http_json(
        daemon.addr,
        "POST",
        &relays,
        &register_body(
            "bad",
            right,
            &format!(r#"{{"udp":{{"send":"{}"}}}}"#, "x".repeat(1201)),
        ),
    )
    .await;
    assert_eq!(oversized_send, 400);
    let listed = http_ok(daemon.addr, "GET", &relays, "").await;
    assert_eq!(listed["instances"].as_array().unwrap().len(), 3, "{listed}");

    // The CLI registers one too, `hex:` for bytes.
    let (code, out, err) = strata(
        &daemon,
        &[
            "--project",
            "vega",
            "service",
            "register",
            "integration",
            "relay",
            "--id",
            "r-cli",
            "--endpoint",
            &format!("main={right}"),
            "--protocol",
            "udp",
            "--check-udp-send",
            "hex:00ff",
            "--check-udp-expect",
            "pong 1.2",
            "--check-interval",
            "100ms",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}{out}");

    // A backup keeps the checks: restored under another name, the copies
    // probe the same way.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vega.backup");
    let file = file.to_str().unwrap();
    let (code, out, err) = strata(&daemon, &["--project", "vega", "export", "-f", file]).await;
    assert_eq!(code, 0, "{err}{out}");
    let (code, out, err) = strata(
        &daemon,
        &["import", "-f", file, "--as", "vega-copy", "--yes"],
    )
    .await;
    assert_eq!(code, 0, "{err}{out}");
    let copies = "/v1/projects/vega-copy/tenants/integration/services/relay/instances";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = http_ok(daemon.addr, "GET", copies, "").await;
        let settled = health_of(&listed, "r-right") == "healthy"
            && health_of(&listed, "r-hex") == "healthy"
            && health_of(&listed, "r-cli") == "healthy"
            && health_of(&listed, "r-wrong") == "unhealthy";
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restored probes did not settle: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
