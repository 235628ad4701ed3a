//! Hostile clients against a real `stratad`: each test reproduces one attack
//! from the security review (named `finding_N_…` or `gap_…` after it) and
//! checks the daemon's defence. Every loop is bounded in count and time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::{Duration, Instant};

use serde_json::Value;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{
    CreateTenantRequest, CreateTokenRequest, CreateTokenResponse, HeartbeatRequest,
    RevokeTokenRequest, Role, WatchConfigRequest, WatchConfigResponse, WatchServicesRequest,
};
use strata_tests::{Daemon, http_get, http_json, http_request_as, strata};
use tonic::Code;

const P: &str = "/v1/projects/vega/tenants";

async fn start_with(config: &str) -> Daemon {
    Daemon::builder().config(config).start().await
}

async fn call(daemon: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
    http_json(daemon.addr, method, path, body).await
}

/// Creates `vega/integration`, the root every test hangs its tenants under.
async fn integration(daemon: &Daemon) {
    let (status, json) = call(daemon, "PUT", &format!("{P}/integration"), "").await;
    assert_eq!(status, 201, "{json}");
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

/// Creates a token of project `vega` as `request` describes (a random
/// name unless it has one).
async fn create_token(daemon: &Daemon, request: CreateTokenRequest) -> CreateTokenResponse {
    let name = if request.name.is_empty() {
        format!("t-{}", rand::random::<u32>())
    } else {
        request.name.clone()
    };
    TokenServiceClient::new(daemon.channel().await)
        .create_token(CreateTokenRequest {
            name,
            project: "vega".into(),
            ..request
        })
        .await
        .unwrap()
        .into_inner()
}

/// Creates a token for project `vega`; returns its secret.
async fn token(daemon: &Daemon, role: Role, pattern: &str) -> String {
    create_token(
        daemon,
        CreateTokenRequest {
            role: role as i32,
            tenant_pattern: pattern.into(),
            ..CreateTokenRequest::default()
        },
    )
    .await
    .token
}

/// Opens a watch of every key of `vega/integration` over `channel`.
async fn watch_integration(
    channel: strata_tests::AuthChannel,
) -> tonic::Streaming<WatchConfigResponse> {
    ConfigServiceClient::new(channel)
        .watch(WatchConfigRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            ..WatchConfigRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
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
    assert!(
        after.contains("op=\"unmatched\""),
        "unknown paths count as unmatched"
    );
    assert!(
        after.contains("op=\"/strata.v1.TenantService/ListTenants\",code=\"UNAUTHENTICATED\""),
        "known methods keep their label"
    );
}

/// A YAML document whose aliases expand ~10⁷ values from ~30 KB of text.
fn yaml_bomb() -> String {
    let mut text = String::from("a: &a [");
    text.push_str(&vec!["1"; 1000].join(","));
    text.push_str("]\nb: [");
    text.push_str(&vec!["*a"; 10_000].join(","));
    text.push_str("]\n");
    text
}

/// Finding 2: a YAML alias bomb written by any write-capable token is
/// refused while it expands, with a message saying why, and the daemon
/// keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_2_yaml_alias_bomb_is_refused() {
    let daemon = Daemon::start().await;
    integration(&daemon).await;
    let started = Instant::now();
    let (status, json) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/bomb.yaml"),
        &yaml_bomb(),
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expands"),
        "{json}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing was written, and the daemon still serves.
    let (status, _) = call(
        &daemon,
        "GET",
        &format!("{P}/integration/config/bomb.yaml"),
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(http_get(daemon.addr, "/readyz").await.unwrap().0, 200);
}

/// Finding 3: forbidden calls of a `read` token cannot push the audit
/// history out of the log: beyond a budget per token and minute they are
/// counted, not recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_3_refused_calls_cannot_erase_the_audit_log() {
    let daemon = start_with("[audit]\nmax_entries = 200\nprune_interval = \"200ms\"\n").await;
    integration(&daemon).await;
    let reader = token(&daemon, Role::Read, "").await;
    for i in 0..400 {
        let (status, _) = call_as(
            &daemon,
            &reader,
            "PUT",
            &format!("{P}/integration/config/k{i}.txt"),
            "x",
        )
        .await;
        assert_eq!(status, 403);
    }
    // Let retention run a few times.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, json) = call(&daemon, "GET", "/v1/audit?project=vega&limit=1000", "").await;
    assert_eq!(status, 200, "{json}");
    let entries = json["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["operation"] == "CreateTenant" && e["result"] == "ok"),
        "the tenant's creation was pruned by refusals: {} entries",
        entries.len()
    );
    let denied = entries
        .iter()
        .filter(|e| e["result"] == "permission_denied")
        .count();
    assert_eq!(
        denied, 60,
        "the default budget is 60 refusals per token and minute"
    );
    let (_, metrics) = http_get(daemon.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("strata_audit_refusals_suppressed_total 340"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("suppressed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A persistent instance with an HTTP check at `address`.
fn probed(id: &str, address: &str) -> String {
    json_text(&serde_json::json!({
        "id": id,
        "kind": "persistent",
        "endpoints": {"main": address},
        "check": {"http": "/healthz", "interval_ms": 100, "timeout_ms": 100, "failure_threshold": 1}
    }))
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

/// Finding 4: health checks cannot be aimed at metadata services or at the
/// daemon itself, loopback can be denied with one setting (names are
/// checked where they resolve), and probe failure texts are shown only to
/// tokens that may register in the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_probes_cannot_scan_from_the_daemon() {
    let daemon = Daemon::start().await;
    let instances = format!("{P}/integration/services/api/instances");
    integration(&daemon).await;
    for target in [
        "169.254.169.254:80",
        &daemon.addr.to_string(),
        "[fe80::1]:80",
    ] {
        let (status, json) = call(&daemon, "POST", &instances, &probed("x", target)).await;
        assert_eq!(status, 403, "{target}: {json}");
        assert!(
            json["error"]["message"].as_str().unwrap().contains("probe"),
            "{json}"
        );
    }
    // Loopback is allowed by default (a developer machine): a closed port
    // is probed and found unhealthy.
    let closed = strata_tests::free_port();
    let (status, json) = call(
        &daemon,
        "POST",
        &instances,
        &probed("local", &format!("127.0.0.1:{closed}")),
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let detail = loop {
        let (_, json) = call(&daemon, "GET", &instances, "").await;
        let detail = json["instances"][0]["health_detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !detail.is_empty() {
            break detail;
        }
        assert!(Instant::now() < deadline, "never probed: {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(detail.contains(&closed.to_string()), "{detail}");
    // A read token sees the verdict, not what the probe found there.
    let reader = token(&daemon, Role::Read, "").await;
    let (status, json) = call_as(&daemon, &reader, "GET", &instances, "").await;
    assert_eq!(status, 200);
    assert_eq!(json["instances"][0]["health"], "unhealthy", "{json}");
    assert_eq!(json["instances"][0]["health_detail"], "", "{json}");
    assert_eq!(json["instances"][0]["lease_id"], 0, "{json}");

    // With probes.deny_private, a name resolving to loopback is accepted
    // at registration but never connected to.
    let locked = start_with("[probes]\ndeny_private = true\n").await;
    integration(&locked).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (status, json) = call(
        &locked,
        "POST",
        &instances,
        &probed("literal", &format!("127.0.0.1:{port}")),
    )
    .await;
    assert_eq!(status, 403, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("probes.deny_private"),
        "{json}"
    );
    let (status, json) = call(
        &locked,
        "POST",
        &instances,
        &probed("named", &format!("localhost:{port}")),
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, json) = call(&locked, "GET", &instances, "").await;
        let detail = json["instances"][0]["health_detail"]
            .as_str()
            .unwrap_or_default();
        if detail.contains("deny_private") {
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "the probe connected to a denied address");
}

/// Finding 6: open streams per token, distinct selections per token, keys
/// per selection and config bytes per project are bounded, each refused
/// with the setting that raises it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_watches_and_data_are_bounded() {
    let daemon = start_with(
        "[limits]\nmax_streams_per_token = 3\nmax_watch_selections_per_token = 2\nmax_config_bytes_per_project = 4096\n",
    )
    .await;
    integration(&daemon).await;
    let reader = token(&daemon, Role::Read, "").await;
    let channel = daemon.channel_as(Some(&reader)).await;
    let watch = |keys: Vec<String>| {
        let mut client = ConfigServiceClient::new(channel.clone());
        async move {
            client
                .watch(WatchConfigRequest {
                    project: "vega".into(),
                    tenant: "integration".into(),
                    keys,
                    ..WatchConfigRequest::default()
                })
                .await
        }
    };
    let mut a = watch(vec!["a".into()]).await.unwrap().into_inner();
    a.message().await.unwrap().unwrap();
    let mut b = watch(vec!["b".into()]).await.unwrap().into_inner();
    b.message().await.unwrap().unwrap();
    // A third distinct selection is over the token's selection limit.
    let refused = match watch(vec!["c".into()]).await {
        Ok(s) => s.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_watch_selections_per_token"));
    // The same selection again shares its group: the third stream is fine,
    // the fourth is over the stream limit.
    let mut a2 = watch(vec!["a".into()]).await.unwrap().into_inner();
    a2.message().await.unwrap().unwrap();
    let refused = match watch(vec!["a".into()]).await {
        Ok(s) => s.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_streams_per_token"),
        "{refused:?}"
    );
    drop((a, b, a2));

    // One selection with too many keys.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let many: Vec<String> = (0..2_000).map(|i| format!("k{i}")).collect();
    let refused = match watch(many).await {
        Ok(s) => s.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("1024"), "{refused:?}");

    // Config bytes per project: 3 KiB fits, 2 more KiB do not (in another
    // tenant too), and replacing a value with a smaller one always does.
    assert_eq!(
        call(
            &daemon,
            "PUT",
            &format!("{P}/feat-1"),
            r#"{"parent":"integration"}"#
        )
        .await
        .0,
        201
    );
    let big = "x".repeat(3 * 1024);
    let (status, json) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/a.txt"),
        &big,
    )
    .await;
    assert_eq!(status, 200, "{json}");
    let (status, json) = call(
        &daemon,
        "PUT",
        &format!("{P}/feat-1/config/b.txt"),
        &"y".repeat(2 * 1024),
    )
    .await;
    assert_eq!(status, 413, "{json}");
    assert!(
        json["error"]["message"].as_str().unwrap().contains("4096"),
        "{json}"
    );
    assert_eq!(
        json["error"]["metadata"]["setting"], "limits.max_config_bytes_per_project",
        "{json}"
    );
    let (status, json) = call(
        &daemon,
        "PUT",
        &format!("{P}/integration/config/a.txt"),
        "small",
    )
    .await;
    assert_eq!(status, 200, "{json}");
}

/// Finding 7: a `register` token may hang a tenant only under a parent it
/// owns or a shared one (a root or protected tenant without a TTL), at
/// every entry point; a lease is renewed only by tokens of the project its
/// instances are in, and lease ids are not sequential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_7_tokens_stay_inside_their_scope() {
    let daemon = Daemon::start().await;
    for (name, body) in [
        ("integration", "{}"),
        ("feat-a", r#"{"parent":"integration"}"#),
        ("sandbox", r#"{"ttl_seconds":3600}"#),
    ] {
        let (status, json) = call(&daemon, "PUT", &format!("{P}/{name}"), body).await;
        assert_eq!(status, 201, "{name}: {json}");
    }
    let hotfix = token(&daemon, Role::Register, "hotfix-*").await;
    let feat = token(&daemon, Role::Register, "feat-*").await;

    for parent in ["feat-a", "sandbox"] {
        let body = format!(r#"{{"parent":"{parent}"}}"#);
        let (status, json) =
            call_as(&daemon, &hotfix, "PUT", &format!("{P}/hotfix-1"), &body).await;
        assert_eq!(status, 403, "under {parent}: {json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("under vega/"),
            "{json}"
        );
        let branch = format!(
            r#"{{"parent":"{parent}","instances":[{{"id":"h","endpoints":{{"main":"10.0.0.1:1"}}}}]}}"#
        );
        let (status, json) = call_as(
            &daemon,
            &hotfix,
            "POST",
            &format!("{P}/hotfix-2/services/api:register"),
            &branch,
        )
        .await;
        assert_eq!(status, 403, "branch under {parent}: {json}");
    }
    let mut grpc = TenantServiceClient::new(daemon.channel_as(Some(&hotfix)).await);
    let refused = grpc
        .create_tenant(CreateTenantRequest {
            project: "vega".into(),
            name: "hotfix-3".into(),
            parent: "feat-a".into(),
            ..CreateTenantRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Shared parents and its own tenants are fine; so is feat-a's owner.
    let (status, json) = call_as(
        &daemon,
        &hotfix,
        "PUT",
        &format!("{P}/hotfix-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let (status, json) = call_as(
        &daemon,
        &hotfix,
        "PUT",
        &format!("{P}/hotfix-1-sub"),
        r#"{"parent":"hotfix-1"}"#,
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let (status, json) = call_as(
        &daemon,
        &feat,
        "PUT",
        &format!("{P}/feat-a-1"),
        r#"{"parent":"feat-a"}"#,
    )
    .await;
    assert_eq!(status, 201, "{json}");

    // Leases: orion's instance cannot be kept alive by a vega token.
    let orion = "/v1/projects/orion/tenants";
    assert_eq!(
        call(&daemon, "PUT", &format!("{orion}/integration"), "")
            .await
            .0,
        201
    );
    let ephemeral = r#"{"endpoints":{"main":"10.0.0.2:1"},"kind":"ephemeral","ttl_seconds":30}"#;
    let (status, theirs) = call(
        &daemon,
        "POST",
        &format!("{orion}/integration/services/api/instances"),
        ephemeral,
    )
    .await;
    assert_eq!(status, 201, "{theirs}");
    let their_lease = theirs["lease_id"].as_i64().unwrap();
    let (status, ours) = call_as(
        &daemon,
        &feat,
        "POST",
        &format!("{P}/feat-a/services/api/instances"),
        ephemeral,
    )
    .await;
    assert_eq!(status, 201, "{ours}");
    let our_lease = ours["lease_id"].as_i64().unwrap();
    assert!(
        (their_lease - our_lease).abs() > 1_000,
        "lease ids look sequential: {their_lease}, {our_lease}"
    );
    let beat = |lease: i64| format!("/v1/leases/{lease}/heartbeat");
    let (status, json) = call_as(&daemon, &feat, "POST", &beat(their_lease), "").await;
    assert_eq!(status, 404, "{json}");
    let (status, json) = call_as(&daemon, &feat, "POST", &beat(our_lease), "").await;
    assert_eq!(status, 200, "{json}");
    let (status, json) = call(&daemon, "POST", &beat(their_lease), "").await;
    assert_eq!(
        status, 200,
        "an admin of every project renews any lease: {json}"
    );
}

/// Known gap: a revoked token's open streams (Watch, WatchServices,
/// KeepAlive) end within a second, with UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_revocation_ends_open_streams() {
    let daemon = Daemon::start().await;
    integration(&daemon).await;
    let created = create_token(
        &daemon,
        CreateTokenRequest {
            role: Role::Register as i32,
            tenant_pattern: "integration".into(),
            ..CreateTokenRequest::default()
        },
    )
    .await;
    let channel = daemon.channel_as(Some(&created.token)).await;
    let mut config = watch_integration(channel.clone()).await;
    config.message().await.unwrap().unwrap();
    let mut services = RegistryServiceClient::new(channel.clone())
        .watch_services(WatchServicesRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            ..WatchServicesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    services.message().await.unwrap().unwrap();
    let (beats, rx) = tokio::sync::mpsc::channel::<HeartbeatRequest>(4);
    let mut keep_alive = RegistryServiceClient::new(channel)
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    TokenServiceClient::new(daemon.channel().await)
        .revoke_token(RevokeTokenRequest {
            id: created.info.unwrap().id,
        })
        .await
        .unwrap();
    let revoked = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        let config = config.message().await.unwrap_err();
        let services = services.message().await.unwrap_err();
        let keep_alive = keep_alive.message().await.unwrap_err();
        (config, services, keep_alive)
    })
    .await
    .expect("every stream ends within a second of the revocation");
    for status in [ended.0, ended.1, ended.2] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
    }
    drop(beats);
    eprintln!("streams ended {:?} after the revocation", revoked.elapsed());
}

/// Known gap: every KeepAlive message counts against the token's request
/// rate, like a unary Heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_keep_alive_messages_are_rate_limited() {
    let daemon = start_with("[limits]\nrequests_per_second = 5\nrequest_burst = 5\n").await;
    integration(&daemon).await;
    let sdk = token(&daemon, Role::Register, "integration").await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, json) = call_as(
        &daemon,
        &sdk,
        "POST",
        &format!("{P}/integration/services/api/instances"),
        r#"{"endpoints":{"main":"10.0.0.2:1"},"kind":"ephemeral","ttl_seconds":30}"#,
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let lease = json["lease_id"].as_i64().unwrap();
    let beats = futures::stream::iter((0..20).map(move |_| HeartbeatRequest { lease_id: lease }));
    let mut answers = RegistryServiceClient::new(daemon.channel_as(Some(&sdk)).await)
        .keep_alive(beats)
        .await
        .unwrap()
        .into_inner();
    let mut renewed = 0;
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .expect("an answer")
        {
            Ok(Some(_)) => renewed += 1,
            Ok(None) => panic!("all 20 renewals were answered: no rate limit"),
            Err(status) => break status,
        }
    };
    assert!(renewed <= 5, "{renewed} renewals within a burst of 5");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("requests per second"),
        "{refused:?}"
    );
}

/// Known gap: an import applies the registration rules to the instances it
/// brings (it checked only some of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_imported_instances_are_validated_like_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = start_with("[limits]\nmax_metadata_entries = 100\n").await;
    integration(&roomy).await;
    let metadata: serde_json::Map<String, Value> = (0..10)
        .map(|i| (format!("m{i}"), Value::String("v".into())))
        .collect();
    let instance = serde_json::json!({
        "id": "i", "kind": "persistent", "endpoints": {"main": "10.0.0.3:1"}, "metadata": metadata
    });
    let (status, json) = call(
        &roomy,
        "POST",
        &format!("{P}/integration/services/api/instances"),
        &instance.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let file = dir.path().join("vega.backup");
    let (code, _, err) = strata(
        &roomy,
        &["--project", "vega", "export", "-f", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{err}");

    let strict = start_with("[limits]\nmax_metadata_entries = 2\n").await;
    let (code, out, err) =
        strata(&strict, &["import", "-f", file.to_str().unwrap(), "--yes"]).await;
    assert_ne!(code, 0, "imported what registering refuses: {out}");
    assert!(err.contains("metadata entries"), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
}

/// Reads from `stream` until the peer closes it; how long that took, or
/// `None` when it stayed open for `within`.
async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt as _;
    let started = Instant::now();
    let mut buf = [0_u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// Finding 10 (the daemon's listener): a client that sends nothing, or
/// dribbles its request head (slowloris), loses its connection after
/// `limits.header_read_timeout`; connections beyond
/// `limits.max_connections` are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_10_slow_and_surplus_connections_are_closed() {
    use tokio::io::AsyncWriteExt as _;
    let daemon = start_with("[limits]\nheader_read_timeout = \"2s\"\nmax_connections = 6\n").await;

    // Silent.
    let mut silent = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let after = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(after.is_some(), "a silent connection stayed open");

    // Slowloris: one byte of a never-ending head every 100 ms.
    let slow = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let (mut read, mut write) = slow.into_split();
    let dribble = tokio::spawn(async move {
        let head = format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {}",
            "a".repeat(200)
        );
        for byte in head.bytes() {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let closed = closed_within(&mut read, Duration::from_secs(5)).await;
    dribble.abort();
    let after = closed.expect("a slowloris head was still being read after 5 s");
    assert!(after < Duration::from_secs(4), "{after:?}");

    // The cap: six idle connections fill it, the seventh is closed at once.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(tokio::net::TcpStream::connect(daemon.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut surplus = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let after = closed_within(&mut surplus, Duration::from_millis(700)).await;
    assert!(after.is_some(), "a connection over the cap was kept");
    // Once the idle ones time out, the daemon serves again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = http_get(daemon.addr, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let (_, metrics) = http_get(daemon.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("strata_connections_refused_total"),
        "counted"
    );
}

/// Known gap, the expiry side: a stream opened with a token that expires
/// ends at the expiry, not at the client's leisure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_expired_tokens_lose_their_streams() {
    let daemon = Daemon::start().await;
    integration(&daemon).await;
    let short = create_token(
        &daemon,
        CreateTokenRequest {
            role: Role::Read as i32,
            ttl_seconds: 2,
            ..CreateTokenRequest::default()
        },
    )
    .await
    .token;
    let mut watch = watch_integration(daemon.channel_as(Some(&short)).await).await;
    watch.message().await.unwrap().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the stream ends when its token expires")
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("expired"), "{ended:?}");
}
