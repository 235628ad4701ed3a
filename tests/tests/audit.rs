//! The audit log end to end, against real `stratad` processes: every kind
//! of mutation (over HTTP and gRPC) is recorded with its actor, revision
//! and result; refused calls are recorded; queries filter; retention
//! prunes by count and by age; only admin tokens read it; `strata audit`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use strata_proto::v1::audit_service_client::AuditServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{
    AuditEntry, CreateTokenRequest, PutConfigRequest, QueryAuditRequest, RevokeTokenRequest, Role,
    UpdateTenantRequest,
};
use strata_tests::{Daemon, http_request, http_request_as, strata};

const P: &str = "/v1/projects/vega/tenants";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// An HTTP call with the admin token that must succeed; its JSON body.
async fn ok(daemon: &Daemon, method: &str, path: &str, body: &str) -> Value {
    let (status, text) = http_request(daemon.addr, method, path, &[], body.as_bytes())
        .await
        .unwrap();
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status} {text}"
    );
    serde_json::from_str(&text).unwrap()
}

/// Creates a token and returns (id, name, secret).
async fn token(daemon: &Daemon, name: &str, role: Role, pattern: &str) -> (String, String) {
    let mut tokens = TokenServiceClient::new(daemon.channel().await);
    let r = tokens
        .create_token(CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            project: "vega".into(),
            tenant_pattern: pattern.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    (r.info.unwrap().id, r.token)
}

async fn query(daemon: &Daemon, request: QueryAuditRequest) -> Vec<AuditEntry> {
    AuditServiceClient::new(daemon.channel().await)
        .query(request)
        .await
        .unwrap()
        .into_inner()
        .entries
}

async fn all_entries(daemon: &Daemon) -> Vec<AuditEntry> {
    query(
        daemon,
        QueryAuditRequest {
            limit: 10_000,
            ..QueryAuditRequest::default()
        },
    )
    .await
}

/// The one entry of `operation` with `subject`; panics listing them all.
fn find<'a>(entries: &'a [AuditEntry], operation: &str, subject: &str) -> &'a AuditEntry {
    let found: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.operation == operation && e.subject == subject)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{operation} {subject:?} should be recorded once: {entries:#?}"
    );
    found[0]
}

#[tokio::test]
async fn every_kind_of_mutation_is_recorded_with_actor_revision_and_result() {
    let daemon = Daemon::start().await;
    let started = now_ms();
    let rev = |v: &Value| v["revision"].as_i64().unwrap();

    // HTTP, as the admin token.
    let integration = rev(&ok(&daemon, "PUT", &format!("{P}/integration"), "{}").await);
    let feat = rev(&ok(
        &daemon,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await);
    let put = rev(&ok(
        &daemon,
        "PUT",
        &format!("{P}/feat-1/config/mm/a.yaml"),
        "a: 1\n",
    )
    .await);
    let put2 = rev(&ok(
        &daemon,
        "PUT",
        &format!("{P}/feat-1/config/mm/a.yaml"),
        "a: 2\n",
    )
    .await);
    let rollback = rev(&ok(
        &daemon,
        "POST",
        &format!("{P}/feat-1/config/mm/a.yaml?rollback_to={put}"),
        "",
    )
    .await);
    let delete_layer = rev(&ok(
        &daemon,
        "DELETE",
        &format!("{P}/feat-1/config/mm/a.yaml"),
        "",
    )
    .await);
    let registered = ok(
        &daemon,
        "POST",
        &format!("{P}/feat-1/services/mm/instances"),
        r#"{"id":"mm-1","endpoints":{"main":"127.0.0.1:7000"},"ttl_seconds":30}"#,
    )
    .await;
    let register = rev(&registered);
    let lease = registered["lease_id"].as_i64().unwrap();
    // A renewal changes nothing: not recorded.
    ok(
        &daemon,
        "POST",
        &format!("/v1/leases/{lease}/heartbeat"),
        "",
    )
    .await;
    let drain = rev(&ok(
        &daemon,
        "POST",
        &format!("{P}/feat-1/services/mm/instances/mm-1/drain"),
        "",
    )
    .await);
    let deregister = rev(&ok(
        &daemon,
        "DELETE",
        &format!("{P}/feat-1/services/mm/instances/mm-1"),
        "",
    )
    .await);
    let branch = rev(&ok(
        &daemon,
        "POST",
        &format!("{P}/feat-2/services/lobby:register"),
        r#"{"parent":"integration","instances":[{"id":"l-1","endpoints":{"main":"127.0.0.1:7001"},"ttl_seconds":30}],"config":{"lobby.json":{"value":"{}"}}}"#,
    )
    .await);

    // gRPC.
    let channel = daemon.channel().await;
    let grpc_put = ConfigServiceClient::new(channel.clone())
        .put_config(PutConfigRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            key: "shared.json".into(),
            value: b"{\"x\":1}".to_vec(),
            ..PutConfigRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let update = TenantServiceClient::new(channel.clone())
        .update_tenant(UpdateTenantRequest {
            project: "vega".into(),
            name: "integration".into(),
            labels: [("team".to_owned(), "core".to_owned())].into(),
            update_labels: true,
            ..UpdateTenantRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let (reader_id, reader) = token(&daemon, "ci-reader", Role::Read, "").await;
    TokenServiceClient::new(channel.clone())
        .revoke_token(RevokeTokenRequest {
            id: token(&daemon, "short-lived", Role::Read, "").await.0,
        })
        .await
        .unwrap();

    // Refused: a read token may not write; the attempt is recorded.
    let (status, _) = http_request_as(
        daemon.addr,
        "PUT",
        &format!("{P}/integration/config/denied.json"),
        &[("authorization", &format!("Bearer {reader}"))],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    let delete_feat = rev(&ok(&daemon, "DELETE", &format!("{P}/feat-1"), "").await);

    let entries = all_entries(&daemon).await;
    let ok_entry = |e: &AuditEntry, revision: i64, tenant: &str, transport: &str| {
        assert_eq!(e.result, "ok", "{e:?}");
        assert_eq!(e.revision, revision, "{e:?}");
        assert_eq!(
            (e.project.as_str(), e.tenant.as_str()),
            ("vega", tenant),
            "{e:?}"
        );
        assert_eq!(e.actor_name, "bootstrap-admin", "{e:?}");
        assert!(!e.actor_token_id.is_empty() && e.actor_token_id != "anonymous");
        assert_eq!(e.transport, transport, "{e:?}");
        assert!(e.time_unix_ms >= started - 1000 && e.time_unix_ms <= now_ms() + 1000);
    };
    let creates: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.operation == "CreateTenant")
        .collect();
    assert_eq!(creates.len(), 2, "{creates:#?}");
    ok_entry(
        creates.iter().find(|e| e.tenant == "integration").unwrap(),
        integration,
        "integration",
        "http",
    );
    ok_entry(
        creates.iter().find(|e| e.tenant == "feat-1").unwrap(),
        feat,
        "feat-1",
        "http",
    );
    let puts: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.operation == "PutConfig" && e.subject == "mm/a.yaml")
        .collect();
    let mut put_revisions: Vec<i64> = puts.iter().map(|e| e.revision).collect();
    put_revisions.sort_unstable();
    assert_eq!(put_revisions, vec![put, put2]);
    ok_entry(
        find(&entries, "Rollback", "mm/a.yaml"),
        rollback,
        "feat-1",
        "http",
    );
    ok_entry(
        find(&entries, "DeleteLayer", "mm/a.yaml"),
        delete_layer,
        "feat-1",
        "http",
    );
    ok_entry(find(&entries, "Register", "mm"), register, "feat-1", "http");
    ok_entry(find(&entries, "Drain", "mm/mm-1"), drain, "feat-1", "http");
    ok_entry(
        find(&entries, "Deregister", "mm/mm-1"),
        deregister,
        "feat-1",
        "http",
    );
    ok_entry(
        find(&entries, "RegisterBranch", "lobby"),
        branch,
        "feat-2",
        "http",
    );
    ok_entry(
        find(&entries, "PutConfig", "shared.json"),
        grpc_put,
        "integration",
        "grpc",
    );
    ok_entry(
        find(&entries, "UpdateTenant", ""),
        update,
        "integration",
        "grpc",
    );
    ok_entry(
        find(&entries, "DeleteTenant", ""),
        delete_feat,
        "feat-1",
        "http",
    );
    let created = find(&entries, "CreateToken", "ci-reader");
    assert_eq!(
        (created.result.as_str(), created.actor_name.as_str()),
        ("ok", "bootstrap-admin")
    );
    assert!(created.revision > 0);
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.operation == "RevokeToken")
            .count(),
        1,
        "{entries:#?}"
    );
    assert!(
        !entries.iter().any(|e| e.operation.contains("eartbeat")),
        "renewals are not recorded: {entries:#?}"
    );
    let denied = find(&entries, "PutConfig", "denied.json");
    assert_eq!(denied.result, "permission_denied");
    assert_eq!(denied.revision, 0);
    assert_eq!(
        (denied.actor_token_id.as_str(), denied.actor_name.as_str()),
        (reader_id.as_str(), "ci-reader")
    );
    assert!(denied.message.contains("ci-reader"), "{denied:?}");
    // Newest first.
    assert!(
        entries
            .windows(2)
            .all(|w| w[0].time_unix_ms >= w[1].time_unix_ms)
    );

    // Only admin tokens read the log, over gRPC and HTTP.
    let refused = AuditServiceClient::new(daemon.channel_as(Some(&reader)).await)
        .query(QueryAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let (status, body) = http_request_as(
        daemon.addr,
        "GET",
        "/v1/audit",
        &[("authorization", &format!("Bearer {reader}"))],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn queries_filter_by_tenant_actor_operation_result_and_time() {
    let daemon = Daemon::start().await;
    ok(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    ok(
        &daemon,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    let (_, writer) = token(&daemon, "ci-writer", Role::Write, "").await;
    let as_writer = format!("Bearer {writer}");
    let before_writes = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..3 {
        let (status, _) = http_request_as(
            daemon.addr,
            "PUT",
            &format!("{P}/feat-1/config/k{i}.json"),
            &[("authorization", &as_writer)],
            b"{}",
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    // A write token may not delete tenants.
    let (status, _) = http_request_as(
        daemon.addr,
        "DELETE",
        &format!("{P}/feat-1"),
        &[("authorization", &as_writer)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after_writes = now_ms();
    ok(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/late.json"),
        "{}",
    )
    .await;

    let q = |f: fn(&mut QueryAuditRequest)| {
        let mut r = QueryAuditRequest {
            limit: 1000,
            ..QueryAuditRequest::default()
        };
        f(&mut r);
        r
    };
    let by_actor = query(&daemon, q(|r| r.actor = "ci-writer".into())).await;
    assert_eq!(by_actor.len(), 4, "{by_actor:#?}");
    let by_tenant = query(&daemon, q(|r| r.tenant = "integration".into())).await;
    let ops: Vec<&str> = by_tenant.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(ops, ["PutConfig", "CreateTenant"], "{by_tenant:#?}");
    let errors = query(&daemon, q(|r| r.result = "error".into())).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].operation.as_str(), errors[0].result.as_str()),
        ("DeleteTenant", "permission_denied")
    );
    let puts = query(
        &daemon,
        q(|r| {
            r.operation = "PutConfig".into();
            r.result = "ok".into();
        }),
    )
    .await;
    assert_eq!(puts.len(), 4);
    let mut window = QueryAuditRequest {
        since_unix_ms: before_writes,
        until_unix_ms: after_writes,
        limit: 1000,
        ..QueryAuditRequest::default()
    };
    let in_window = query(&daemon, window.clone()).await;
    assert_eq!(in_window.len(), 4, "{in_window:#?}");
    assert!(in_window.iter().all(|e| e.actor_name == "ci-writer"));
    window.limit = 2;
    let response = AuditServiceClient::new(daemon.channel().await)
        .query(window)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.entries.len(), 2);
    assert!(response.truncated);
    let other_project = query(&daemon, q(|r| r.project = "dk".into())).await;
    assert!(other_project.is_empty());

    // The same over HTTP.
    let (status, body) = http_request(
        daemon.addr,
        "GET",
        "/v1/audit?actor=ci-writer&result=error",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{json}");
    assert_eq!(entries[0]["result"], "permission_denied");
    let (status, body) = http_request(daemon.addr, "GET", "/v1/audit?colour=red", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "invalid_argument"
    );

    // The CLI.
    let (code, out, err) = strata(
        &daemon,
        &[
            "--project",
            "vega",
            "audit",
            "--actor",
            "ci-writer",
            "--since",
            "1h",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["entries"].as_array().unwrap().len(), 4, "{json}");
    let (code, out, err) = strata(
        &daemon,
        &[
            "--project",
            "vega",
            "audit",
            "--tenant",
            "feat-1",
            "--result",
            "error",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("permission_denied") && out.contains("ci-writer"),
        "{out}"
    );
    let (code, _, err) = strata(&daemon, &["audit", "--since", "yesterday-ish"]).await;
    assert_eq!(code, 2, "{err}");
}

fn config_file(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("stratad.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Polls `check` every 100 ms for at most `timeout`.
async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn retention_keeps_the_newest_entries_up_to_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "[audit]\nmax_entries = 5\nprune_interval = \"200ms\"\n",
    );
    let daemon = Daemon::builder().args(["--config", &config]).start().await;
    ok(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    let mut revisions = Vec::new();
    for i in 0..12 {
        let v = ok(&daemon, "PUT", &format!("{P}/integration/config/k{i}"), "x").await;
        revisions.push(v["revision"].as_i64().unwrap());
    }
    let pruned = eventually(Duration::from_secs(10), async || {
        all_entries(&daemon).await.len() == 5
    })
    .await;
    let entries = all_entries(&daemon).await;
    assert!(pruned, "still {} entries: {entries:#?}", entries.len());
    let mut kept: Vec<i64> = entries.iter().map(|e| e.revision).collect();
    kept.sort_unstable();
    assert_eq!(kept, revisions[7..], "the newest five are kept");
    // Writes go on; the log stays bounded.
    for i in 0..4 {
        ok(
            &daemon,
            "PUT",
            &format!("{P}/integration/config/more{i}"),
            "x",
        )
        .await;
    }
    assert!(
        eventually(Duration::from_secs(10), async || {
            let e = all_entries(&daemon).await;
            e.len() == 5 && e[0].subject == "more3"
        })
        .await
    );
}

#[tokio::test]
async fn retention_drops_entries_older_than_the_age() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "[audit]\nmax_age = \"4s\"\nprune_interval = \"200ms\"\n",
    );
    let daemon = Daemon::builder().args(["--config", &config]).start().await;
    ok(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    ok(&daemon, "PUT", &format!("{P}/integration/config/old"), "x").await;
    assert_eq!(all_entries(&daemon).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ok(&daemon, "PUT", &format!("{P}/integration/config/new"), "x").await;
    let aged = eventually(Duration::from_secs(10), async || {
        let e = all_entries(&daemon).await;
        e.len() == 1 && e[0].subject == "new"
    })
    .await;
    assert!(aged, "{:#?}", all_entries(&daemon).await);
    assert!(!daemon.stderr().contains("panicked"));
}

#[tokio::test]
async fn every_refusal_is_recorded_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "[audit]\nrefusals = \"all\"\n");
    let daemon = Daemon::builder().args(["--config", &config]).start().await;
    ok(&daemon, "PUT", &format!("{P}/integration"), "{}").await;
    let (status, _) = http_request(
        daemon.addr,
        "PUT",
        &format!("{P}/integration/config/a//b"),
        &[],
        b"x",
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    let (status, _) = http_request(daemon.addr, "PUT", &format!("{P}/integration"), &[], b"{}")
        .await
        .unwrap();
    assert_eq!(status, 409);
    let errors = query(
        &daemon,
        QueryAuditRequest {
            result: "error".into(),
            ..QueryAuditRequest::default()
        },
    )
    .await;
    let results: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.operation.as_str(), e.result.as_str()))
        .collect();
    assert_eq!(
        results,
        [
            ("CreateTenant", "already_exists"),
            ("PutConfig", "invalid_argument")
        ]
    );
    assert_eq!(errors[1].subject, "a//b");
}

#[tokio::test]
async fn the_daemons_own_changes_are_recorded_as_stratad() {
    let daemon = Daemon::start().await;
    let created = ok(
        &daemon,
        "PUT",
        &format!("{P}/short"),
        r#"{"ttl_seconds":1}"#,
    )
    .await;
    assert!(created["revision"].as_i64().unwrap() > 0);
    let expired = eventually(Duration::from_secs(10), async || {
        all_entries(&daemon)
            .await
            .iter()
            .any(|e| e.operation == "ExpireTenant")
    })
    .await;
    assert!(expired, "{:#?}", all_entries(&daemon).await);
    let entries = all_entries(&daemon).await;
    let e = entries
        .iter()
        .find(|e| e.operation == "ExpireTenant")
        .unwrap();
    assert_eq!(
        (e.actor_token_id.as_str(), e.actor_name.as_str()),
        ("stratad", "tenant-ttl")
    );
    assert_eq!((e.project.as_str(), e.tenant.as_str()), ("vega", "short"));
    assert_eq!(e.result, "ok");
    assert!(e.revision > created["revision"].as_i64().unwrap());
}

#[tokio::test]
async fn replicas_over_etcd_share_one_log() {
    if !strata_tests::etcd::etcd_available("replicas_over_etcd_share_one_log") {
        return;
    }
    let etcd = strata_tests::etcd::EtcdCluster::start(1).await;
    let start = || {
        Daemon::builder()
            .args(["--etcd-endpoints", &etcd.endpoints_arg()])
            .env("STRATA_ETCD_PREFIX", "/audit-test/")
            .start()
    };
    let a = start().await;
    let b = start().await;
    let created = ok(&a, "PUT", &format!("{P}/integration"), "{}").await;
    let put = ok(&b, "PUT", &format!("{P}/integration/config/k.json"), "{}").await;
    let on = |d: &Daemon| {
        let d = d.addr;
        async move {
            let (status, body) = http_request(d, "GET", "/v1/audit?project=vega", &[], b"")
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            let json: Value = serde_json::from_str(&body).unwrap();
            json["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["operation"].as_str().unwrap().to_owned(),
                        e["revision"].as_i64().unwrap(),
                        e["member"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let want = vec![
        (
            "PutConfig".to_owned(),
            put["revision"].as_i64().unwrap(),
            b.addr.to_string(),
        ),
        (
            "CreateTenant".to_owned(),
            created["revision"].as_i64().unwrap(),
            a.addr.to_string(),
        ),
    ];
    // Each replica answers from the shared store, whoever served the write.
    assert_eq!(on(&a).await, want);
    assert_eq!(on(&b).await, want);
}
