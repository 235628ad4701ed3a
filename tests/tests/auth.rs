//! Tokens and roles end to end, against real `stratad` processes: the
//! role × operation × tenant matrix over HTTP and gRPC (every forbidden call
//! is refused with 403 / PERMISSION_DENIED and changes nothing, every
//! allowed call succeeds), missing, malformed, unknown, revoked and expired
//! tokens, revocation across replicas, the admin token file of first start,
//! `--auth=off`, `/metrics` protection, the CLI, and that no secret ever
//! reaches the daemon's log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use strata_proto::v1::{
    CreateTenantRequest, CreateTokenRequest, Endpoint, HeartbeatRequest, Instance, InstanceKind,
    ListTokensRequest, PutConfigRequest, RegisterRequest, ResolveRequest, RevokeTokenRequest, Role,
    UpdateTenantRequest, WatchConfigRequest,
};
use strata_tests::{Daemon, http_request_as};
use tonic::Code;

/// A tenant a matrix column acts on.
#[derive(Clone, Copy, Debug)]
struct Target {
    /// Column name in failure messages.
    column: &'static str,
    project: &'static str,
    tenant: &'static str,
}

const OWN_BRANCH: Target = Target {
    column: "own branch",
    project: "vega",
    tenant: "feat-a",
};
const OTHER_BRANCH: Target = Target {
    column: "other branch",
    project: "vega",
    tenant: "feat-b",
};
const INTEGRATION: Target = Target {
    column: "integration",
    project: "vega",
    tenant: "integration",
};
const OTHER_PROJECT: Target = Target {
    column: "other project",
    project: "orion",
    tenant: "feat-a",
};
const TARGETS: [Target; 4] = [OWN_BRANCH, OTHER_BRANCH, INTEGRATION, OTHER_PROJECT];

/// One HTTP call with exactly this token (or none): (status, JSON body or
/// the raw text as a JSON string).
async fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let (status, text) = http_request_as(addr, method, path, &headers, body.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// As admin; must succeed.
async fn admin_ok(addr: SocketAddr, admin: &str, method: &str, path: &str, body: &str) -> Value {
    let (status, json) = call(addr, Some(admin), method, path, body).await;
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status} {json}"
    );
    json
}

fn tenants(project: &str) -> String {
    format!("/v1/projects/{project}/tenants")
}

/// Both projects with `integration` (protected) and, under it, the
/// branches `feat-a` and `feat-b`; each tenant T also has leaf children
/// `T-y` (to delete) and `T-z` (to force-delete), a `base.yaml` layer and
/// an `api` instance.
async fn seed(addr: SocketAddr, admin: &str) {
    for project in ["vega", "orion"] {
        let t = tenants(project);
        admin_ok(
            addr,
            admin,
            "PUT",
            &format!("{t}/integration"),
            r#"{"protected":true}"#,
        )
        .await;
        for branch in ["feat-a", "feat-b"] {
            admin_ok(
                addr,
                admin,
                "PUT",
                &format!("{t}/{branch}"),
                r#"{"parent":"integration"}"#,
            )
            .await;
        }
        for tenant in ["integration", "feat-a", "feat-b"] {
            for leaf in ["y", "z"] {
                admin_ok(
                    addr,
                    admin,
                    "PUT",
                    &format!("{t}/{tenant}-{leaf}"),
                    &json!({ "parent": tenant }).to_string(),
                )
                .await;
            }
            admin_ok(
                addr,
                admin,
                "PUT",
                &format!("{t}/{tenant}/config/base.yaml"),
                &format!("owner: {tenant}\n"),
            )
            .await;
            admin_ok(
                addr,
                admin,
                "POST",
                &format!("{t}/{tenant}/services/api/instances"),
                r#"{"id":"seed","kind":"persistent","endpoints":{"main":"127.0.0.1:9"}}"#,
            )
            .await;
        }
    }
}

/// Everything a caller could have changed, as the admin sees it: every
/// tenant (with its mod revision), every tenant's resolved config and its
/// own `api` instances, in both projects.
async fn fingerprint(addr: SocketAddr, admin: &str) -> Value {
    let mut all = serde_json::Map::new();
    for project in ["vega", "orion"] {
        let t = tenants(project);
        let list = admin_ok(addr, admin, "GET", &t, "").await;
        let mut names: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        for tenant in list["tenants"].as_array().unwrap() {
            let name = tenant["name"].as_str().unwrap().to_owned();
            rows.push(json!([name, tenant["mod_revision"], tenant["protected"]]));
            names.push(name);
        }
        all.insert(format!("{project}/tenants"), Value::Array(rows));
        for name in names {
            let mut config = admin_ok(addr, admin, "GET", &format!("{t}/{name}/config"), "").await;
            config["revision"] = Value::Null;
            let mut instances = admin_ok(
                addr,
                admin,
                "GET",
                &format!("{t}/{name}/services/api/instances"),
                "",
            )
            .await;
            instances["revision"] = Value::Null;
            all.insert(format!("{project}/{name}"), json!([config, instances]));
        }
    }
    Value::Object(all)
}

/// An HTTP operation of the matrix on a target tenant: (name, method, path,
/// body, the status it answers when allowed).
fn http_ops(t: Target) -> Vec<(&'static str, &'static str, String, String, u16)> {
    let base = format!("{}/{}", tenants(t.project), t.tenant);
    let tt = tenants(t.project);
    vec![
        ("get tenant", "GET", base.clone(), String::new(), 200),
        (
            "resolve config",
            "GET",
            format!("{base}/config/base.yaml"),
            String::new(),
            200,
        ),
        (
            "list services",
            "GET",
            format!("{base}/services"),
            String::new(),
            200,
        ),
        (
            "put config",
            "PUT",
            format!("{base}/config/new.yaml"),
            "v: 1\n".into(),
            200,
        ),
        (
            "delete config",
            "DELETE",
            format!("{base}/config/base.yaml"),
            String::new(),
            200,
        ),
        (
            "register",
            "POST",
            format!("{base}/services/api/instances"),
            r#"{"id":"new","kind":"persistent","endpoints":{"main":"127.0.0.1:9"}}"#.into(),
            201,
        ),
        (
            "drain",
            "POST",
            format!("{base}/services/api/instances/seed/drain"),
            String::new(),
            200,
        ),
        (
            "deregister",
            "DELETE",
            format!("{base}/services/api/instances/seed"),
            String::new(),
            200,
        ),
        (
            "register branch",
            "POST",
            format!("{base}/services/web:register"),
            r#"{"instances":[{"id":"w1","kind":"persistent","endpoints":{"main":"127.0.0.1:9"}}]}"#
                .into(),
            200,
        ),
        (
            "create child tenant",
            "PUT",
            format!("{tt}/{}-x", t.tenant),
            json!({ "parent": t.tenant }).to_string(),
            201,
        ),
        (
            "create protected tenant",
            "PUT",
            format!("{tt}/{}-p", t.tenant),
            json!({ "parent": t.tenant, "protected": true }).to_string(),
            201,
        ),
        (
            "delete tenant",
            "DELETE",
            format!("{tt}/{}-y", t.tenant),
            String::new(),
            200,
        ),
        (
            "force-delete tenant",
            "DELETE",
            format!("{tt}/{}-z?force=true", t.tenant),
            String::new(),
            200,
        ),
    ]
}

/// Whether the role of a matrix row may do `op` on target `t` — the table
/// of docs/security.md, written out independently of the server's.
fn expected_allowed(role: &str, op: &str, t: Target) -> bool {
    let reads = matches!(op, "get tenant" | "resolve config" | "list services");
    let in_vega = t.project == "vega";
    let own = in_vega && t.tenant == "feat-a";
    match role {
        "admin" => true,
        "project-admin" => in_vega,
        "read" => in_vega && reads,
        "write" => in_vega && (reads || matches!(op, "put config" | "delete config")),
        "register" => {
            in_vega
                && (reads
                    || (own && !matches!(op, "create protected tenant" | "force-delete tenant")))
        }
        other => panic!("unknown role {other}"),
    }
}

/// Creates a token through the gRPC TokenService as `admin`; returns it.
async fn create_token(
    daemon: &Daemon,
    admin: &str,
    name: &str,
    role: Role,
    project: &str,
    pattern: &str,
) -> String {
    TokenServiceClient::new(daemon.channel_as(Some(admin)).await)
        .create_token(CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            project: project.into(),
            tenant_pattern: pattern.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("create token {name}: {e}"))
        .into_inner()
        .token
}

/// One row of the matrix: a fresh daemon and world, a token of `role`, and
/// every HTTP operation on every target.
async fn http_row(role: &str) {
    let daemon = Daemon::start().await;
    let addr = daemon.addr;
    let admin = daemon.admin_token();
    seed(addr, &admin).await;
    let token = match role {
        "admin" => admin.clone(),
        "project-admin" => create_token(&daemon, &admin, "pa", Role::Admin, "vega", "").await,
        "read" => create_token(&daemon, &admin, "sdk", Role::Read, "vega", "").await,
        "write" => create_token(&daemon, &admin, "ops", Role::Write, "vega", "").await,
        "register" => {
            create_token(
                &daemon,
                &admin,
                "ci-feat-a",
                Role::Register,
                "vega",
                "feat-a*",
            )
            .await
        }
        other => panic!("unknown role {other}"),
    };
    let mut allowed_count = 0;
    let mut refused_count = 0;
    for target in TARGETS {
        for (op, method, path, body, ok_status) in http_ops(target) {
            let allowed = expected_allowed(role, op, target);
            let before = if allowed {
                Value::Null
            } else {
                fingerprint(addr, &admin).await
            };
            let (status, json) = call(addr, Some(&token), method, &path, &body).await;
            let what = format!("{role} × {op} × {} ({method} {path})", target.column);
            if allowed {
                assert_eq!(status, ok_status, "{what}: {json}");
                allowed_count += 1;
            } else {
                assert_eq!(status, 403, "{what} must be refused: {json}");
                assert_eq!(json["error"]["code"], "permission_denied", "{what}: {json}");
                let after = fingerprint(addr, &admin).await;
                assert_eq!(before, after, "{what} was refused but changed the store");
                refused_count += 1;
            }
        }
    }
    eprintln!("{role}: {allowed_count} allowed, {refused_count} refused");
    assert!(!daemon.stderr().contains(&token), "a token reached the log");
}

#[tokio::test]
async fn matrix_read_role_over_http() {
    http_row("read").await;
}

#[tokio::test]
async fn matrix_register_role_over_http() {
    http_row("register").await;
}

#[tokio::test]
async fn matrix_write_role_over_http() {
    http_row("write").await;
}

#[tokio::test]
async fn matrix_admin_roles_over_http() {
    http_row("admin").await;
    http_row("project-admin").await;
}

/// The same table over gRPC for the register role (a branch's CD token):
/// writes, registrations, tenant creation and watches in its own branch
/// pass; in another branch, integration and another project they are
/// PERMISSION_DENIED and change nothing.
#[tokio::test]
async fn matrix_register_role_over_grpc() {
    let daemon = Daemon::start().await;
    let addr = daemon.addr;
    let admin = daemon.admin_token();
    seed(addr, &admin).await;
    let token = create_token(
        &daemon,
        &admin,
        "ci-feat-a",
        Role::Register,
        "vega",
        "feat-a*",
    )
    .await;
    let channel = daemon.channel_as(Some(&token)).await;
    let mut config = ConfigServiceClient::new(channel.clone());
    let mut tenants_client = TenantServiceClient::new(channel.clone());
    let mut registry = RegistryServiceClient::new(channel.clone());
    let instance = || Instance {
        id: "g1".into(),
        endpoints: [(
            "main".to_owned(),
            Endpoint {
                address: "127.0.0.1:9".into(),
                ..Default::default()
            },
        )]
        .into(),
        kind: InstanceKind::Persistent as i32,
        ..Default::default()
    };
    for target in TARGETS {
        let own = target.project == "vega" && target.tenant == "feat-a";
        let before = fingerprint(addr, &admin).await;
        let put = config
            .put_config(PutConfigRequest {
                project: target.project.into(),
                tenant: target.tenant.into(),
                key: "grpc.yaml".into(),
                value: b"v: 1\n".to_vec(),
                ..Default::default()
            })
            .await;
        let reg = registry
            .register(RegisterRequest {
                project: target.project.into(),
                tenant: target.tenant.into(),
                service: "api".into(),
                instance: Some(instance()),
                lease_id: 0,
            })
            .await;
        let create = tenants_client
            .create_tenant(CreateTenantRequest {
                project: target.project.into(),
                name: format!("{}-g", target.tenant),
                parent: target.tenant.into(),
                ..Default::default()
            })
            .await;
        let resolve = config
            .resolve(ResolveRequest {
                project: target.project.into(),
                tenant: target.tenant.into(),
                ..Default::default()
            })
            .await;
        let watch = config
            .watch(WatchConfigRequest {
                project: target.project.into(),
                tenant: target.tenant.into(),
                ..Default::default()
            })
            .await;
        let column = target.column;
        if own {
            put.unwrap_or_else(|e| panic!("put in {column}: {e}"));
            reg.unwrap_or_else(|e| panic!("register in {column}: {e}"));
            create.unwrap_or_else(|e| panic!("create in {column}: {e}"));
        } else {
            for (op, result) in [
                ("put", put.map(|_| ())),
                ("register", reg.map(|_| ())),
                ("create tenant", create.map(|_| ())),
            ] {
                let status = result.expect_err(&format!("{op} in {column} must be refused"));
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{op} in {column}: {status:?}"
                );
            }
            assert_eq!(
                before,
                fingerprint(addr, &admin).await,
                "refused gRPC calls in {column} changed the store"
            );
        }
        // Reads and watches: the project's, not another project's.
        if target.project == "vega" {
            resolve.unwrap_or_else(|e| panic!("resolve in {column}: {e}"));
            watch.unwrap_or_else(|e| panic!("watch in {column}: {e}"));
        } else {
            assert_eq!(resolve.unwrap_err().code(), Code::PermissionDenied);
            assert_eq!(watch.unwrap_err().code(), Code::PermissionDenied);
        }
    }
    // Heartbeats need a register-capable token: a read token is refused.
    let reader = create_token(&daemon, &admin, "sdk", Role::Read, "vega", "").await;
    let refused = RegistryServiceClient::new(daemon.channel_as(Some(&reader)).await)
        .heartbeat(HeartbeatRequest { lease_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Token administration needs an admin token for every project.
    let refused = TokenServiceClient::new(channel)
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

/// No token, a malformed one, an unknown one, a wrong secret, a revoked and
/// an expired one: 401 over HTTP, UNAUTHENTICATED over gRPC, before any
/// handler runs. A token of another project: 403. Health, readiness and
/// (by default) metrics stay open.
#[tokio::test]
async fn bad_tokens_are_refused_and_open_routes_stay_open() {
    let daemon = Daemon::start().await;
    let addr = daemon.addr;
    let admin = daemon.admin_token();
    admin_ok(
        addr,
        &admin,
        "PUT",
        &format!("{}/integration", tenants("vega")),
        "",
    )
    .await;
    let list = tenants("vega");

    let valid = create_token(&daemon, &admin, "sdk", Role::Read, "vega", "").await;
    let (id, secret) = valid
        .strip_prefix("strata_")
        .unwrap()
        .split_once('_')
        .unwrap();
    let flipped = format!(
        "strata_{id}_{}{}",
        if secret.starts_with('0') { '1' } else { '0' },
        &secret[1..]
    );
    let unknown = format!("strata_{}_{secret}", "0".repeat(16));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("empty", Some(String::new())),
        ("malformed", Some("hunter2".into())),
        ("truncated", Some(valid[..valid.len() - 1].to_owned())),
        ("wrong secret", Some(flipped)),
        ("unknown id", Some(unknown)),
    ];
    for (what, token) in &cases {
        let (status, json) = call(addr, token.as_deref(), "GET", &list, "").await;
        assert_eq!(status, 401, "{what}: {json}");
        assert_eq!(json["error"]["code"], "unauthenticated", "{what}: {json}");
        let grpc = TenantServiceClient::new(daemon.channel_as(token.as_deref()).await)
            .list_tenants(strata_proto::v1::ListTenantsRequest {
                project: "vega".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(grpc.code(), Code::Unauthenticated, "{what}: {grpc:?}");
    }
    // Not a bearer scheme at all.
    let (status, _) = http_request_as(
        addr,
        "GET",
        &list,
        &[("authorization", &format!("Basic {valid}"))],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);

    // The valid token works, for its project only.
    assert_eq!(call(addr, Some(&valid), "GET", &list, "").await.0, 200);
    let (status, json) = call(addr, Some(&valid), "GET", &tenants("orion"), "").await;
    assert_eq!(status, 403, "{json}");

    // Revoked: refused at once on the replica that revoked it.
    TokenServiceClient::new(daemon.channel_as(Some(&admin)).await)
        .revoke_token(RevokeTokenRequest { id: id.into() })
        .await
        .unwrap();
    let (status, json) = call(addr, Some(&valid), "GET", &list, "").await;
    assert_eq!(status, 401, "revoked: {json}");

    // Expired.
    let short = TokenServiceClient::new(daemon.channel_as(Some(&admin)).await)
        .create_token(CreateTokenRequest {
            name: "short".into(),
            role: Role::Read as i32,
            project: "vega".into(),
            tenant_pattern: String::new(),
            ttl_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(call(addr, Some(&short), "GET", &list, "").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, json) = call(addr, Some(&short), "GET", &list, "").await;
    assert_eq!(status, 401, "expired: {json}");

    // Open routes.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(call(addr, None, "GET", path, "").await.0, 200, "{path}");
    }
    let health = tonic_health::pb::health_client::HealthClient::new(daemon.channel_as(None).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    // Unknown routes need a token too (nothing is learned without one).
    assert_eq!(call(addr, None, "GET", "/no/such", "").await.0, 401);
}

/// Invalid token requests are refused with clear errors and nothing stored.
#[tokio::test]
async fn token_requests_are_validated() {
    let daemon = Daemon::start().await;
    let admin = daemon.admin_token();
    let mut tokens = TokenServiceClient::new(daemon.channel_as(Some(&admin)).await);
    let bad = [
        ("no name", "", Role::Read, "vega", ""),
        ("bad name", "a b", Role::Read, "vega", ""),
        ("no role", "x", Role::Unspecified, "vega", ""),
        ("read for every project", "x", Role::Read, "", ""),
        ("register without pattern", "x", Role::Register, "vega", ""),
        (
            "register for every tenant",
            "x",
            Role::Register,
            "vega",
            "*",
        ),
        (
            "pattern on a write token",
            "x",
            Role::Write,
            "vega",
            "feat-*",
        ),
        ("bad project", "x", Role::Read, "Vega!", ""),
    ];
    for (what, name, role, project, pattern) in bad {
        let status = tokens
            .create_token(CreateTokenRequest {
                name: name.into(),
                role: role as i32,
                project: project.into(),
                tenant_pattern: pattern.into(),
                ttl_seconds: 0,
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    let listed = tokens
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1, "only the bootstrap token: {listed:?}");
    assert_eq!(listed[0].name, "bootstrap-admin");
    let missing = tokens
        .revoke_token(RevokeTokenRequest {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

/// First start writes the admin token, mode 0600, and logs where (not
/// what); a restart keeps it; `--auth=off` warns loudly and lets every
/// request through.
#[tokio::test]
async fn admin_token_file_restart_and_auth_off() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut daemon = Daemon::builder().data_dir(&data).start().await;
    let file = data.join("admin.token");
    let harness_file = daemon.admin_token_file.clone();
    let token = daemon.admin_token();
    // The harness points --admin-token-file at the default location.
    assert_eq!(harness_file, file);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token must be private");
    let log = daemon.stderr();
    assert!(log.contains(&file.display().to_string()), "{log}");
    assert!(!log.contains(&token), "the admin token reached the log");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(10)).await;

    // A restart keeps the same token and does not write a new one.
    let daemon = Daemon::builder().data_dir(&data).start().await;
    assert_eq!(daemon.admin_token(), token);
    assert_eq!(
        call(daemon.addr, Some(&token), "GET", &tenants("vega"), "")
            .await
            .0,
        200
    );
    assert_eq!(
        call(daemon.addr, None, "GET", &tenants("vega"), "").await.0,
        401
    );
    drop(daemon);

    let open = Daemon::builder().args(["--auth=off"]).start().await;
    let log = open.stderr();
    assert!(log.contains("AUTHENTICATION IS OFF"), "{log}");
    let (status, json) = call(
        open.addr,
        None,
        "PUT",
        &format!("{}/integration", tenants("vega")),
        r#"{"protected":true}"#,
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let (status, _) = call(
        open.addr,
        None,
        "DELETE",
        &format!("{}/integration?force=true", tenants("vega")),
        "",
    )
    .await;
    assert_eq!(status, 200);
}

/// `--metrics-auth=token` protects `/metrics`; any valid token reads it.
#[tokio::test]
async fn metrics_can_require_a_token() {
    let daemon = Daemon::builder()
        .args(["--metrics-auth", "token"])
        .start()
        .await;
    let admin = daemon.admin_token();
    let reader = create_token(&daemon, &admin, "prometheus", Role::Read, "vega", "").await;
    assert_eq!(call(daemon.addr, None, "GET", "/metrics", "").await.0, 401);
    let (status, body) = call(daemon.addr, Some(&reader), "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap_or("").contains("strata_"), "{body}");
    assert_eq!(call(daemon.addr, None, "GET", "/healthz", "").await.0, 200);
}

/// Runs the CLI with `env` (and nothing else from this process).
async fn cli(daemon: &Daemon, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    strata_tests::strata_at(&daemon.endpoint(), env, args).await
}

/// The operator's path: the admin token file with `--token-file`, a CD
/// token created with `strata token create`, used through `STRATA_TOKEN`
/// in its branch and refused in integration, listed without its secret,
/// revoked. With debug logging on, no secret appears in the daemon's log.
#[tokio::test]
async fn cli_token_lifecycle_and_no_secret_in_debug_logs() {
    let daemon = Daemon::builder()
        .args(["--log-level", "debug"])
        .start()
        .await;
    let file = daemon.admin_token_file.display().to_string();
    let admin = daemon.admin_token();
    let as_admin = ["--token-file", file.as_str(), "--project", "vega"];

    let (code, _, err) = cli(&daemon, &[], &["--project", "vega", "tenant", "list"]).await;
    assert_eq!(code, 1, "no token must fail: {err}");
    assert!(err.to_lowercase().contains("token"), "{err}");

    let run = |args: Vec<&'static str>| args;
    for args in [
        run(vec!["tenant", "create", "integration", "--protected"]),
        run(vec![
            "tenant",
            "create",
            "feat-login",
            "--parent",
            "integration",
        ]),
    ] {
        let all: Vec<&str> = as_admin.iter().copied().chain(args).collect();
        let (code, _, err) = cli(&daemon, &[], &all).await;
        assert_eq!(code, 0, "{all:?}: {err}");
    }
    let create: Vec<&str> = as_admin
        .iter()
        .copied()
        .chain([
            "token",
            "create",
            "ci-login",
            "--role",
            "register",
            "--tenants",
            "feat-*",
        ])
        .collect();
    let (code, out, err) = cli(&daemon, &[], &create).await;
    assert_eq!(code, 0, "{err}");
    let cd = out.trim().to_owned();
    assert!(cd.starts_with("strata_"), "{out}");

    let env = [("STRATA_TOKEN", cd.as_str()), ("STRATA_PROJECT", "vega")];
    let put = |tenant: &'static str| {
        vec![
            "config", "put", tenant, "app.yaml", "--value", "v: 1", "--format", "yaml",
        ]
    };
    let (code, _, err) = cli(&daemon, &env, &put("feat-login")).await;
    assert_eq!(code, 0, "own branch: {err}");
    let (code, _, err) = cli(&daemon, &env, &put("integration")).await;
    assert_eq!(code, 1, "integration must be refused");
    assert!(err.contains("may not write config"), "{err}");

    let list: Vec<&str> = as_admin
        .iter()
        .copied()
        .chain(["-o", "json", "token", "list"])
        .collect();
    let (code, out, err) = cli(&daemon, &[], &list).await;
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci-login")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(mine["role"], "register");
    assert_eq!(mine["tenant_pattern"], "feat-*");
    assert!(
        !out.contains(&cd) && !out.contains(&admin),
        "list shows a secret"
    );
    let id = mine["id"].as_str().unwrap().to_owned();

    let revoke: Vec<&str> = as_admin
        .iter()
        .copied()
        .chain(["token", "revoke", id.as_str()])
        .collect();
    let (code, _, err) = cli(&daemon, &[], &revoke).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&daemon, &env, &put("feat-login")).await;
    assert_eq!(code, 1);
    assert!(err.contains("revoked"), "{err}");

    // Malformed and wrong tokens too, then the whole debug log is searched.
    let (_, _, _) = cli(&daemon, &[("STRATA_TOKEN", "strata_zz_top")], &["status"]).await;
    let log = daemon.stderr();
    assert!(
        log.contains("DEBUG") || log.contains("debug"),
        "debug logging is on"
    );
    for secret in [&admin, &cd] {
        let part = secret.rsplit('_').next().unwrap();
        assert!(!log.contains(part), "a token secret reached the log");
    }
}

/// Tokens live in the store: one created through replica A works on B, and
/// one revoked through A is refused by B within a bounded time.
#[tokio::test]
async fn tokens_and_revocations_reach_every_replica() {
    if !strata_tests::etcd::etcd_available("tokens_and_revocations_reach_every_replica") {
        return;
    }
    let cluster = strata_tests::etcd::EtcdCluster::start(1).await;
    let prefix = format!("/auth-{}/", strata_tests::free_port());
    let start = || {
        Daemon::builder()
            .args(["--etcd-endpoints", &cluster.endpoints_arg()])
            .env("STRATA_ETCD_PREFIX", &prefix)
            .start()
    };
    let a = start().await;
    let b = start().await;
    let admin = a.admin_token();
    assert_eq!(b.admin_token(), admin, "replicas share the bootstrap token");
    admin_ok(
        a.addr,
        &admin,
        "PUT",
        &format!("{}/integration", tenants("vega")),
        "",
    )
    .await;
    let token = create_token(&a, &admin, "sdk", Role::Read, "vega", "").await;
    let id = token
        .strip_prefix("strata_")
        .unwrap()
        .split('_')
        .next()
        .unwrap()
        .to_owned();

    let path = format!("{}/integration", tenants("vega"));
    let b_addr = b.addr;
    let until = |want: u16| {
        let (token, path) = (token.clone(), path.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, json) = call(b_addr, Some(&token), "GET", &path, "").await;
                if status == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica B still answers {status}: {json}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(200).await;
    TokenServiceClient::new(a.channel_as(Some(&admin)).await)
        .revoke_token(RevokeTokenRequest { id })
        .await
        .unwrap();
    let revoked = Instant::now();
    until(401).await;
    eprintln!("revocation reached replica B after {:?}", revoked.elapsed());
}

/// A TTL deletes the tenant's whole subtree when it expires, so a
/// `register` token may set one only where it could delete every
/// descendant itself.
#[tokio::test]
async fn a_register_token_cannot_expire_a_child_it_does_not_own() {
    let daemon = Daemon::start().await;
    let addr = daemon.addr;
    let admin = daemon.admin_token();
    for (name, parent) in [
        ("integration", ""),
        ("feat-t", "integration"),
        ("qa-t", "feat-t"),
        ("feat-u", "integration"),
        ("feat-u-1", "feat-u"),
    ] {
        let body = json!({ "parent": parent }).to_string();
        admin_ok(
            addr,
            &admin,
            "PUT",
            &format!("{}/{name}", tenants("vega")),
            &body,
        )
        .await;
    }
    let token = create_token(&daemon, &admin, "ci-feat", Role::Register, "vega", "feat-*").await;
    let mut client = TenantServiceClient::new(daemon.channel_as(Some(&token)).await);
    let update = |name: &str, ttl: i64| UpdateTenantRequest {
        project: "vega".into(),
        name: name.into(),
        ttl_seconds: ttl,
        update_ttl: true,
        ..Default::default()
    };

    let refused = client
        .update_tenant(update("feat-t", 3600))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("qa-t"), "{}", refused.message());
    let info = admin_ok(
        addr,
        &admin,
        "GET",
        &format!("{}/feat-t", tenants("vega")),
        "",
    )
    .await;
    assert!(
        info.to_string().contains("\"ttl_seconds\":0"),
        "unchanged: {info}"
    );

    // Removing a TTL, or one over a subtree it owns, is fine.
    client.update_tenant(update("feat-t", 0)).await.unwrap();
    let set = client
        .update_tenant(update("feat-u", 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.tenant.unwrap().ttl_seconds, 3600);
}
