//! Limits end to end, against real `stratad` processes configured with
//! small limits: every size limit is refused with `limit_exceeded` (413 /
//! RESOURCE_EXHAUSTED) and writes nothing; count limits hold under
//! concurrent writers; the per-token request rate trips (429 with
//! `Retry-After` / RESOURCE_EXHAUSTED) and recovers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use strata_proto::v1::audit_service_client::AuditServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{
    CreateTokenRequest, ErrorReason, PutConfigRequest, QueryAuditRequest, Role,
};
use strata_tests::{Daemon, http_get, http_request, http_request_as};

const P: &str = "/v1/projects/vega/tenants";

const SMALL_LIMITS: &str = "[limits]
max_value_bytes = 1024
max_key_bytes = 64
max_labels = 2
max_label_value_bytes = 16
max_metadata_entries = 2
max_metadata_bytes = 64
max_endpoints = 2
max_tenants_per_project = 4
max_config_keys_per_tenant = 3
max_instances_per_tenant = 2
";

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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn call(daemon: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http_request(daemon.addr, method, path, &[], body.as_bytes())
        .await
        .unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
    (status, json)
}

async fn revision(daemon: &Daemon) -> i64 {
    let (_, body) = http_get(daemon.addr, "/v1/status").await.unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["revision"]
        .as_i64()
        .unwrap()
}

/// Audit entries since `since` (ms): (refusals, successes).
async fn audited_since(daemon: &Daemon, since: i64) -> (usize, usize) {
    let entries = AuditServiceClient::new(daemon.channel().await)
        .query(QueryAuditRequest {
            since_unix_ms: since,
            limit: 10_000,
            ..QueryAuditRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let refused = entries.iter().filter(|e| e.result != "ok").count();
    (refused, entries.len() - refused)
}

fn assert_limit(status: u16, json: &Value, what: &str) {
    assert_eq!(status, 413, "{what}: {json}");
    assert_eq!(json["error"]["code"], "limit_exceeded", "{what}: {json}");
    assert!(
        json["error"]["message"].as_str().unwrap().contains("limit"),
        "{what}: {json}"
    );
}

#[tokio::test]
async fn every_size_limit_is_refused_and_writes_nothing() {
    let (daemon, _dir) = start_with(SMALL_LIMITS).await;
    let (status, _) = call(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    assert_eq!(status, 201);
    let (_, tenants_before) = call(&daemon, "GET", P, "").await;
    // The daemon's own start-up write (its leader election, right after it
    // turns ready) must not count as a write of this test: wait until the
    // revision holds still.
    let mut before = revision(&daemon).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = revision(&daemon).await;
        if now == before {
            break;
        }
        before = now;
    }
    let since = now_ms();

    let big = "x".repeat(1025);
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/big.txt"),
        &big,
    )
    .await;
    assert_limit(s, &j, "value");
    let long_key = format!("{}.txt", "k".repeat(61));
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/{long_key}"),
        "x",
    )
    .await;
    assert_limit(s, &j, "key");
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/labelled"),
        r#"{"labels":{"a":"1","b":"2","c":"3"}}"#,
    )
    .await;
    assert_limit(s, &j, "label count");
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/labelled"),
        r#"{"labels":{"a":"0123456789abcdefg"}}"#,
    )
    .await;
    assert_limit(s, &j, "label value");
    let instance = |extra: &str| {
        format!(
            r#"{{"id":"mm-1","endpoints":{{"main":"127.0.0.1:7000"}},"ttl_seconds":30{extra}}}"#
        )
    };
    let register = format!("{P}/integration/services/mm/instances");
    let (s, j) = call(
        &daemon,
        "POST",
        &register,
        &instance(r#","metadata":{"a":"1","b":"2","c":"3"}"#),
    )
    .await;
    assert_limit(s, &j, "metadata entries");
    let (s, j) = call(
        &daemon,
        "POST",
        &register,
        &instance(&format!(r#","metadata":{{"a":"{}"}}"#, "m".repeat(80))),
    )
    .await;
    assert_limit(s, &j, "metadata bytes");
    let (s, j) = call(
        &daemon,
        "POST",
        &register,
        r#"{"id":"mm-1","endpoints":{"a":"127.0.0.1:1","b":"127.0.0.1:2","c":"127.0.0.1:3"},"ttl_seconds":30}"#,
    )
    .await;
    assert_limit(s, &j, "endpoints");
    // Over gRPC: RESOURCE_EXHAUSTED with the reason in the error detail.
    let refused = ConfigServiceClient::new(daemon.channel().await)
        .put_config(PutConfigRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            key: "big.txt".into(),
            value: big.into_bytes(),
            ..PutConfigRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        strata_client::Error::from(refused).reason(),
        ErrorReason::LimitExceeded
    );
    // A malformed key is a plain 400, not a limit.
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/a/../b"),
        "x",
    )
    .await;
    assert_eq!(
        (s, j["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    // Nothing was written: no layer, no instance, no new tenant, not even
    // an audit entry (only permission refusals are recorded by default).
    for path in [
        format!("{P}/integration/config/big.txt?layer=true"),
        format!("{P}/labelled"),
    ] {
        let (s, _) = call(&daemon, "GET", &path, "").await;
        assert_eq!(s, 404, "{path}");
    }
    let (_, instances) = call(&daemon, "GET", &register, "").await;
    assert_eq!(
        instances["instances"].as_array().unwrap().len(),
        0,
        "{instances}"
    );
    let (_, tenants_after) = call(&daemon, "GET", P, "").await;
    assert_eq!(tenants_after["tenants"], tenants_before["tenants"]);
    let (refusals, oks) = audited_since(&daemon, since).await;
    assert_eq!((refusals, oks), (0, 0));
    assert_eq!(revision(&daemon).await, before);
}

/// Runs `n` requests at once; their (status, error code).
async fn at_once(daemon: &Daemon, requests: Vec<(&str, String, String)>) -> Vec<(u16, String)> {
    let addr = daemon.addr;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(method, path, body)| {
            let method = method.to_owned();
            tokio::spawn(async move {
                let (status, text) = http_request(addr, &method, &path, &[], body.as_bytes())
                    .await
                    .unwrap();
                let json: Value = serde_json::from_str(&text).unwrap();
                (
                    status,
                    json["error"]["code"].as_str().unwrap_or("").to_owned(),
                )
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn tally(results: &[(u16, String)], ok_status: u16) -> usize {
    for (status, code) in results {
        assert!(
            *status == ok_status || code == "limit_exceeded",
            "{status} {code}: only successes and limit_exceeded are expected"
        );
    }
    results.iter().filter(|(s, _)| *s == ok_status).count()
}

#[tokio::test]
async fn counts_hold_under_concurrent_writers() {
    let (daemon, _dir) = start_with(SMALL_LIMITS).await;
    let (status, _) = call(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    assert_eq!(status, 201);

    // Tenants per project: 4, one exists; ten writers race for three slots.
    let creates = (0..10)
        .map(|i| {
            (
                "PUT",
                format!("{P}/t{i}"),
                r#"{"parent":"integration"}"#.to_owned(),
            )
        })
        .collect();
    assert_eq!(tally(&at_once(&daemon, creates).await, 201), 3);
    let (_, tenants) = call(&daemon, "GET", P, "").await;
    assert_eq!(tenants["tenants"].as_array().unwrap().len(), 4);

    // Config keys per tenant: 3.
    let puts = (0..8)
        .map(|i| {
            (
                "PUT",
                format!("{P}/integration/config/k{i}.txt"),
                "v".to_owned(),
            )
        })
        .collect();
    assert_eq!(tally(&at_once(&daemon, puts).await, 200), 3);
    let (_, listed) = call(&daemon, "GET", &format!("{P}/integration/config"), "").await;
    let keys: Vec<String> = listed["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 3, "{listed}");
    // At the limit an existing key is still writable; a new one is not
    // until one is removed.
    let (s, _) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/{}", keys[0]),
        "w",
    )
    .await;
    assert_eq!(s, 200);
    let (s, j) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/new.txt"),
        "w",
    )
    .await;
    assert_limit(s, &j, "fourth key");
    assert_eq!(
        j["error"]["metadata"]["setting"],
        "limits.max_config_keys_per_tenant"
    );
    let (s, _) = call(
        &daemon,
        "DELETE",
        &format!("{P}/integration/config/{}", keys[1]),
        "",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/new.txt"),
        "w",
    )
    .await;
    assert_eq!(s, 200);

    // Instances per tenant: 2.
    let register = format!("{P}/integration/services/mm/instances");
    let regs = (0..6)
        .map(|i| {
            (
                "POST",
                register.clone(),
                format!(
                    r#"{{"id":"mm-{i}","endpoints":{{"main":"127.0.0.1:7000"}},"ttl_seconds":30}}"#
                ),
            )
        })
        .collect();
    assert_eq!(tally(&at_once(&daemon, regs).await, 201), 2);
    let (_, instances) = call(&daemon, "GET", &register, "").await;
    let ids: Vec<String> = instances["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{instances}");
    // Re-registering an existing id at the limit is an update, not a new one.
    let (s, j) = call(
        &daemon,
        "POST",
        &register,
        &format!(
            r#"{{"id":"{}","endpoints":{{"main":"127.0.0.1:7001"}},"ttl_seconds":30}}"#,
            ids[0]
        ),
    )
    .await;
    assert_eq!(s, 201, "{j}");

    // A branch registration that would pass a count writes nothing at all:
    // the tenant is not created either.
    let (s, j) = call(
        &daemon,
        "POST",
        &format!("{P}/t0/services/lobby:register"),
        r#"{"instances":[
            {"id":"a","endpoints":{"main":"127.0.0.1:1"},"ttl_seconds":30},
            {"id":"b","endpoints":{"main":"127.0.0.1:2"},"ttl_seconds":30},
            {"id":"c","endpoints":{"main":"127.0.0.1:3"},"ttl_seconds":30}]}"#,
    )
    .await;
    // t0 may or may not have won a slot above; either way the three
    // instances exceed the per-tenant limit of two.
    if s == 404 {
        assert_eq!(j["error"]["code"], "not_found", "{j}");
    } else {
        assert_limit(s, &j, "branch instances");
    }
    let (s, j) = call(
        &daemon,
        "POST",
        &format!("{P}/feat-new/services/lobby:register"),
        r#"{"parent":"integration","instances":[{"id":"a","endpoints":{"main":"127.0.0.1:1"},"ttl_seconds":30}]}"#,
    )
    .await;
    assert_limit(s, &j, "branch tenant");
    let (s, _) = call(&daemon, "GET", &format!("{P}/feat-new"), "").await;
    assert_eq!(s, 404);
    assert!(!daemon.stderr().contains("panicked"));
}

#[tokio::test]
async fn request_rate_per_token_trips_and_recovers() {
    let (daemon, _dir) = start_with("[limits]\nrequests_per_second = 5\nrequest_burst = 5\n").await;
    let other = TokenServiceClient::new(daemon.channel().await)
        .create_token(CreateTokenRequest {
            name: "other".into(),
            role: Role::Read as i32,
            project: "vega".into(),
            ..CreateTokenRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // Let the admin token's bucket fill again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut limited = None;
    for _ in 0..20 {
        let (status, text) = http_request(daemon.addr, "GET", P, &[], b"").await.unwrap();
        if status == 429 {
            limited = Some(text);
            break;
        }
        assert_eq!(status, 200, "{text}");
    }
    let text = limited.expect("20 requests at once should pass 5 per second");
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["error"]["code"], "rate_limited", "{json}");
    assert!(
        json["error"]["metadata"]["retry_after_ms"].is_string(),
        "{json}"
    );
    // The raw answer carries Retry-After.
    let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!(
                "GET {P} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {}\r\n\r\n",
                daemon.admin_token()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");

    // gRPC: RESOURCE_EXHAUSTED.
    let refused = AuditServiceClient::new(daemon.channel().await)
        .query(QueryAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );

    // Another token has its own bucket; probes are never limited.
    let (status, _) = http_request_as(
        daemon.addr,
        "GET",
        P,
        &[("authorization", &format!("Bearer {other}"))],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    for _ in 0..20 {
        assert_eq!(http_get(daemon.addr, "/healthz").await.unwrap().0, 200);
    }

    // And it recovers.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _) = http_request(daemon.addr, "GET", P, &[], b"").await.unwrap();
    assert_eq!(status, 200);
}
