//! Fuzz-style tests of the HTTP API against a real `stratad`: malformed
//! JSON, bodies over the limit (answered without reading them to the end),
//! invalid UTF-8 and path traversal in keys and paths, deeply nested
//! documents, wrong content types, and a seeded stream of random requests.
//! Every answer must be a clear 4xx with a JSON error body; the daemon must
//! stay up (healthz, no panic in its log); and the store must be unchanged —
//! the same tenants and config at the same revision.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use strata_proto::v1::QueryAuditRequest;
use strata_proto::v1::audit_service_client::AuditServiceClient;
use strata_tests::{Daemon, http_get, http_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const P: &str = "/v1/projects/vega/tenants";
const T: &str = "/v1/projects/vega/tenants/integration";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Sends one request; it must be answered 4xx with a JSON error body.
async fn refused(
    daemon: &Daemon,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let (status, text) = http_request(daemon.addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}; stderr:\n{}", daemon.stderr()));
    assert!(
        (400..500).contains(&status),
        "{method} {path} ({} body bytes) -> {status} {text}",
        body.len()
    );
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
    let code = json["error"]["code"].as_str().unwrap_or_default();
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !code.is_empty() && !message.is_empty(),
        "{method} {path} -> {status}: {json}"
    );
    (status, json)
}

/// Everything a client can see of the project: tenants and every layer.
async fn snapshot(daemon: &Daemon) -> (Value, Vec<(String, Value)>) {
    let (_, tenants) = http_request(daemon.addr, "GET", P, &[], b"").await.unwrap();
    let tenants: Value = serde_json::from_str(&tenants).unwrap();
    let mut layers = Vec::new();
    for t in tenants["tenants"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let (_, body) = http_request(daemon.addr, "GET", &format!("{P}/{name}/config"), &[], b"")
            .await
            .unwrap();
        // The values, not the revision the read was served at.
        let values = serde_json::from_str::<Value>(&body).unwrap()["values"].clone();
        layers.push((name.to_owned(), values));
    }
    (tenants["tenants"].clone(), layers)
}

async fn revision(daemon: &Daemon) -> i64 {
    let (_, body) = http_get(daemon.addr, "/v1/status").await.unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["revision"]
        .as_i64()
        .unwrap()
}

/// The revision once the daemon's own start-up writes are done (its
/// leader election commits right after it turns ready): unchanged over
/// 300 ms, checked for at most 10 s.
async fn settled_revision(daemon: &Daemon) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = revision(daemon).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = revision(daemon).await;
        if now == last || tokio::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Sends `header` then streams a body at the daemon for at most `for_at_most`
/// (or until the daemon stops reading); returns the status line and body of
/// its answer.
async fn stream_body(
    daemon: &Daemon,
    header: String,
    chunk: Vec<u8>,
    for_at_most: Duration,
) -> (String, String) {
    let stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let deadline = Instant::now() + for_at_most;
        if write.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        while Instant::now() < deadline {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut raw = Vec::new();
    let started = Instant::now();
    let read_all = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0_u8; 8192];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&raw);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|n| n.trim().parse::<usize>().ok());
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read_all.is_ok(), "no answer within 20 s");
    writer.abort();
    assert!(
        started.elapsed() < for_at_most,
        "the answer must come before the client stops sending"
    );
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn malformed_requests_get_clear_json_errors_and_change_nothing() {
    let daemon = Daemon::start().await;
    for (path, body) in [
        (T.to_owned(), "{}"),
        (format!("{P}/feat-1"), r#"{"parent":"integration"}"#),
        (format!("{T}/config/app.json"), r#"{"a":{"b":1}}"#),
        (format!("{T}/config/app.yaml"), "a: 1\n"),
    ] {
        let (status, text) = http_request(daemon.addr, "PUT", &path, &[], body.as_bytes())
            .await
            .unwrap();
        assert!(status < 300, "{path}: {status} {text}");
    }
    let before = snapshot(&daemon).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = now_ms();
    let start_revision = settled_revision(&daemon).await;
    let mut sent = 0;

    // Malformed JSON bodies, wrong types, unknown fields, wrong content types.
    let tenant_bodies: &[&[u8]] = &[
        b"{",
        b"{\"parent\":",
        b"[]",
        b"\"integration\"",
        b"null",
        b"{\"parent\":1}",
        b"{\"labels\":{\"a\":1}}",
        b"{\"ttl_seconds\":1e309}",
        b"{\"ttl_seconds\":99999999999999999999999}",
        b"{\"unknown\":true}",
        b"{\"parent\":\"integration\"}{\"parent\":\"x\"}",
        b"\xff\xfe{}",
        b"{\"parent\":\"\xc3\x28\"}",
        b"\0\0\0\0",
        b"<tenant parent=\"integration\"/>",
        b"parent=integration",
    ];
    for body in tenant_bodies {
        for content_type in ["application/json", "application/xml", "text/plain"] {
            let (status, _) = refused(
                &daemon,
                "PUT",
                &format!("{P}/feat-2"),
                &[("content-type", content_type)],
                body,
            )
            .await;
            assert_eq!(status, 400);
            sent += 1;
        }
    }
    let instance_bodies: &[&[u8]] = &[
        b"{",
        b"{\"endpoints\":\"127.0.0.1:1\"}",
        b"{\"endpoints\":{\"main\":\"not an address\"},\"ttl_seconds\":30}",
        b"{\"endpoints\":{\"main\":\"127.0.0.1:99999\"},\"ttl_seconds\":30}",
        b"{\"endpoints\":{\"main\":\"127.0.0.1:1\"},\"ttl_seconds\":-5}",
        b"{\"endpoints\":{\"main\":\"127.0.0.1:1\"},\"kind\":\"forever\"}",
        b"{\"id\":\"../../etc\",\"endpoints\":{\"main\":\"127.0.0.1:1\"},\"ttl_seconds\":30}",
    ];
    for body in instance_bodies {
        refused(
            &daemon,
            "POST",
            &format!("{T}/services/mm/instances"),
            &[],
            body,
        )
        .await;
        refused(
            &daemon,
            "POST",
            &format!("{T}/services/mm:register"),
            &[],
            body,
        )
        .await;
        sent += 2;
    }

    // Path traversal and strange keys: refused, never a file or another tenant.
    for key in [
        "../x",
        "a/../../b",
        "%2e%2e/x",
        "%2E%2E%2Fetc%2Fpasswd",
        "..%2f..%2fetc%2fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/.",
        "a/..",
        "..%5c..%5cwindows",
        "a%00b",
        "%ff%fe",
        "a/%c3%28",
        "key%0d%0aset-cookie:x",
        "@seq",
        "a@1",
    ] {
        for method in ["PUT", "DELETE", "POST"] {
            let path = format!("{T}/config/{key}");
            refused(&daemon, method, &path, &[], b"x").await;
            sent += 1;
        }
        let (status, _) = refused(&daemon, "GET", &format!("{T}/config/{key}"), &[], b"").await;
        assert!(status == 400 || status == 404);
    }
    // Invalid UTF-8 and traversal in project, tenant, service and instance.
    for path in [
        "/v1/projects/%ff/tenants/integration",
        "/v1/projects/vega/tenants/%c3%28",
        "/v1/projects/../tenants/integration",
        "/v1/projects/vega/tenants/..",
        "/v1/projects/vega/tenants/integration%2f..%2fother",
        "/v1/projects/vega/tenants/integration/services/%ff/instances",
        "/v1/projects/vega/tenants/integration/services/mm/instances/%ff%ff",
        "/v1/projects/vega/tenants/integration/services/..%2f..:register",
    ] {
        for method in ["PUT", "POST", "DELETE"] {
            refused(&daemon, method, path, &[], b"{}").await;
            sent += 1;
        }
    }
    // Query parameters that do not parse.
    for query in [
        "?expected_revision=abc",
        "?format=xml",
        "?mode=sideways",
        "?expected_revision=-7",
        "?format=%ff",
    ] {
        refused(
            &daemon,
            "PUT",
            &format!("{T}/config/app.json{query}"),
            &[],
            b"{}",
        )
        .await;
        sent += 1;
    }
    refused(
        &daemon,
        "POST",
        &format!("{T}/config/app.json?rollback_to=x"),
        &[],
        b"",
    )
    .await;
    refused(&daemon, "DELETE", &format!("{T}?force=maybe"), &[], b"").await;
    sent += 2;
    // Methods a route does not have.
    for (method, path) in [
        ("PATCH", T.to_owned()),
        ("PUT", format!("{T}/services/mm/instances")),
    ] {
        let (status, _) = refused(&daemon, method, &path, &[], b"{}").await;
        assert_eq!(status, 405);
        sent += 1;
    }

    // Deep documents: 10,000 levels, in every structured format, and as a
    // JSON request body. No stack overflow; a clear error.
    let depth = 10_000;
    let deep_json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let deep_object = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let deep_yaml_flow = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // `- - - 1`: each dash opens a block sequence inside the previous one.
    let deep_yaml_block = format!("{}1\n", "- ".repeat(depth));
    let deep_toml = format!("a = {}{}", "[".repeat(depth), "]".repeat(depth));
    let deep_inline_toml = format!("a = {}{}", "{b = ".repeat(depth), "}".repeat(depth));
    for (key, body) in [
        ("deep.json", &deep_json),
        ("deep2.json", &deep_object),
        ("deep.yaml", &deep_yaml_flow),
        ("deep2.yaml", &deep_yaml_block),
        ("deep.toml", &deep_toml),
        ("deep2.toml", &deep_inline_toml),
    ] {
        for mode in ["replace", "merge"] {
            let (status, _) = refused(
                &daemon,
                "PUT",
                &format!("{T}/config/{key}?mode={mode}"),
                &[],
                body.as_bytes(),
            )
            .await;
            assert!(status == 400 || status == 413, "{key}: {status}");
            sent += 1;
        }
    }
    refused(
        &daemon,
        "PUT",
        &format!("{P}/feat-2"),
        &[],
        deep_object.as_bytes(),
    )
    .await;
    refused(
        &daemon,
        "POST",
        &format!("{T}/services/mm/instances"),
        &[],
        deep_json.as_bytes(),
    )
    .await;
    sent += 2;

    // Bodies over the limit: 413 long before the client is done sending.
    let (line, body) = stream_body(
        &daemon,
        format!(
            "PUT {T}/config/huge.bin HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            daemon.admin_token(),
            1_u64 << 34
        ),
        vec![b'x'; 64 * 1024],
        Duration::from_secs(15),
    )
    .await;
    assert!(line.contains(" 413 "), "{line} {body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "limit_exceeded", "{json}");
    let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
    chunk.extend(vec![b'{'; 64 * 1024]);
    chunk.extend_from_slice(b"\r\n");
    let (line, body) = stream_body(
        &daemon,
        format!(
            "PUT {P}/feat-3 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
            daemon.admin_token()
        ),
        chunk,
        Duration::from_secs(15),
    )
    .await;
    assert!(line.contains(" 413 "), "{line} {body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "limit_exceeded", "{json}");
    sent += 2;
    for path in [
        format!("{T}/services/mm/instances"),
        format!("{T}/services/mm:register"),
        format!("{P}/feat-4"),
    ] {
        let (line, body) = stream_body(
            &daemon,
            format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
                daemon.admin_token(),
                1_u64 << 30
            ),
            vec![b' '; 64 * 1024],
            Duration::from_secs(15),
        )
        .await;
        assert!(
            line.contains(" 413 ") || line.contains(" 405 "),
            "{path}: {line}"
        );
        let json: Value = serde_json::from_str(&body).unwrap();
        assert!(json["error"]["code"].is_string(), "{json}");
        sent += 1;
    }

    // Random requests from a fixed seed: random bytes as JSON bodies and as
    // path segments.
    let seed = 0x5eed_0008_u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let routes = [
        ("PUT", format!("{P}/feat-1")),
        ("PUT", format!("{P}/feat-9")),
        ("POST", format!("{T}/services/mm/instances")),
        ("POST", format!("{T}/services/mm:register")),
        ("PUT", format!("{T}/config/app.json")),
        ("PUT", format!("{T}/config/app.json?mode=merge")),
        ("PUT", format!("{T}/config/app.yaml")),
        ("PUT", format!("{T}/config/new.toml")),
    ];
    for i in 0..300 {
        let (method, path) = &routes[rng.random_range(0..routes.len())];
        let len = rng.random_range(8..2048);
        let mut body = vec![0_u8; len];
        rng.fill(&mut body[..]);
        // Never valid JSON, YAML or TOML: an unterminated string first.
        body[0] = b'"';
        body[1] = b'\x01';
        let (status, json) = refused(&daemon, method, path, &[], &body).await;
        assert!(
            status == 400 || status == 409 || status == 413,
            "request {i} (seed {seed:#x}): {method} {path} -> {status} {json}"
        );
        sent += 1;
    }
    for i in 0..200 {
        // Random bytes led by one no name or key may contain.
        let lead = [0x00_u8, 0x20, 0x7f, 0xff][rng.random_range(0..4)];
        let segment: String = std::iter::once(lead)
            .chain((0..rng.random_range(0..40)).map(|_| rng.random::<u8>()))
            .map(|b| format!("%{b:02x}"))
            .collect();
        let method = ["PUT", "DELETE", "POST"][rng.random_range(0..3)];
        let path = match rng.random_range(0..4) {
            0 => format!("{P}/{segment}"),
            1 => format!("{T}/config/{segment}"),
            2 => format!("{T}/services/{segment}/instances"),
            _ => format!("/v1/projects/{segment}/tenants/integration"),
        };
        let (status, json) = refused(&daemon, method, &path, &[], b"{}").await;
        assert!(
            [400, 404, 405, 409].contains(&status),
            "request {i} (seed {seed:#x}): {method} {path} -> {status} {json}"
        );
        sent += 1;
    }

    // Still alive, never panicked, and nothing changed: the same tenants and
    // values, the same revision (refusals other than permission denials
    // leave no audit entry either).
    assert_eq!(http_get(daemon.addr, "/healthz").await.unwrap().0, 200);
    assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());
    assert_eq!(snapshot(&daemon).await, before);
    assert_eq!(
        revision(&daemon).await,
        start_revision,
        "after {sent} refused calls"
    );
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
    assert!(entries.is_empty(), "{entries:#?}");
}

#[tokio::test]
async fn non_utf8_request_lines_are_refused_without_harm() {
    let daemon = Daemon::start().await;
    let start_revision = settled_revision(&daemon).await;
    for raw in [
        &b"PUT /v1/projects/vega/tenants/\xff\xfe HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"[..],
        b"PUT /v1/projects/vega/tenants/a/config/\xc3\x28 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        b"\xff\xff\xff\xff\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: \xff\r\n\xff: x\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        // The HTTP parser refuses these before any route is involved: a 400
        // (hyper's own, without body) or a closed connection.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
    }
    assert_eq!(http_get(daemon.addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(revision(&daemon).await, start_revision);
    assert!(!daemon.stderr().contains("panicked"));
}
