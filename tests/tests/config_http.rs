//! Tenants and layered configuration end to end, over HTTP/JSON (as a CD
//! step with curl would) and gRPC, against a real `stratad` process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;

use serde_json::{Value, json};
use strata_proto::v1::ResolveRequest;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_tests::{Daemon, http_get, http_json as call, http_ok as ok, http_request};

async fn revision(addr: SocketAddr) -> i64 {
    let (_, body) = http_get(addr, "/v1/status").await.unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["revision"]
        .as_i64()
        .unwrap()
}

fn assert_error(status: u16, json: &Value, want_status: u16, want_code: &str, needle: &str) {
    assert_eq!(status, want_status, "{json}");
    assert_eq!(json["error"]["code"], want_code, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

const P: &str = "/v1/projects/vega/tenants";

#[tokio::test]
async fn feature_tenant_sees_its_override_and_the_rest_from_integration() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(
        a,
        "PUT",
        &format!("{P}/integration"),
        r#"{"labels":{"env":"shared"}}"#,
    )
    .await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration","ttl_seconds":3600}"#,
    )
    .await;
    for svc in ["a", "b", "c", "d"] {
        ok(
            a,
            "PUT",
            &format!("{P}/integration/config/{svc}/server.yaml"),
            &format!("name: {svc}\nport: 7000\n"),
        )
        .await;
    }
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1/config/a/server.yaml"),
        "name: a-feature\nport: 7100\n",
    )
    .await;

    let listed = ok(a, "GET", &format!("{P}/feat-1/config?prefix="), "").await;
    let origins: Vec<(String, String)> = listed["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["key"].as_str().unwrap().to_owned(),
                v["origin"][0].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        origins,
        [
            ("a/server.yaml".into(), "feat-1".into()),
            ("b/server.yaml".into(), "integration".into()),
            ("c/server.yaml".into(), "integration".into()),
            ("d/server.yaml".into(), "integration".into()),
        ]
    );

    // The raw resolved value, with origin and revision headers.
    let (status, body) = http_get(a, &format!("{P}/feat-1/config/a/server.yaml"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "name: a-feature\nport: 7100\n");
    let (_, raw) = http_request(
        a,
        "GET",
        &format!("{P}/feat-1/config/b/server.yaml"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(raw, "name: b\nport: 7000\n");

    // The same through gRPC.
    let mut grpc = ConfigServiceClient::new(daemon.channel().await);
    let resolved = grpc
        .resolve(ResolveRequest {
            project: "vega".into(),
            tenant: "feat-1".into(),
            keys: vec![],
            prefixes: vec!["".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.values.len(), 4);
    assert_eq!(resolved.values[0].origin, ["feat-1"]);
    assert_eq!(resolved.values[1].origin, ["integration"]);
    assert!(resolved.header.unwrap().revision > 0);

    // Deleting the feature tenant removes its layers; integration is untouched.
    ok(a, "DELETE", &format!("{P}/feat-1"), "").await;
    let (status, json) = call(a, "GET", &format!("{P}/feat-1/config?prefix="), "").await;
    assert_error(status, &json, 404, "not_found", "feat-1");
    let listed = ok(a, "GET", &format!("{P}/integration/config?prefix="), "").await;
    assert_eq!(listed["values"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn merge_layers_patch_the_parent_and_explain_names_each_field() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    ok(
        a,
        "PUT",
        &format!("{P}/integration/config/mm/server.yaml"),
        "server:\n  port: 7000\n  host: mm\nlimits:\n  cpu: 1\n",
    )
    .await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1/config/mm/server.yaml?mode=merge&format=json"),
        r#"{"server":{"port":7100},"limits":null}"#,
    )
    .await;

    let (status, body) = http_get(a, &format!("{P}/feat-1/config/mm/server.yaml"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let value: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value, json!({"server": {"port": 7100, "host": "mm"}}));

    let explained = ok(
        a,
        "GET",
        &format!("{P}/feat-1/config/mm/server.yaml?explain=true"),
        "",
    )
    .await;
    assert_eq!(explained["origin"], json!(["feat-1", "integration"]));
    assert_eq!(
        explained["fields"],
        json!([{"path": "/server/host", "tenant": "integration"}, {"path": "/server/port", "tenant": "feat-1"}])
    );

    let (_, layer) = http_get(a, &format!("{P}/feat-1/config/mm/server.yaml?layer=true"))
        .await
        .unwrap();
    assert_eq!(layer, r#"{"server":{"port":7100},"limits":null}"#);

    // A tombstone hides the key for the tenant; deleting the tombstone brings it back.
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1/config/mm/server.yaml?mode=delete"),
        "",
    )
    .await;
    let (status, _) = http_get(a, &format!("{P}/feat-1/config/mm/server.yaml"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    ok(
        a,
        "DELETE",
        &format!("{P}/feat-1/config/mm/server.yaml"),
        "",
    )
    .await;
    let (_, body) = http_get(a, &format!("{P}/feat-1/config/mm/server.yaml"))
        .await
        .unwrap();
    assert!(body.contains("port: 7000"), "{body}");
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let daemon = Daemon::builder()
        .args(["--config", "/dev/null"])
        .env("STRATA_LIMITS_MAX_VALUE_BYTES", "1024")
        .start()
        .await;
    let a = daemon.addr;
    ok(
        a,
        "PUT",
        &format!("{P}/integration"),
        r#"{"protected":true}"#,
    )
    .await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    let before = revision(a).await;

    let (s, j) = call(a, "PUT", &format!("{P}/Feat_2"), "").await;
    assert_error(s, &j, 400, "invalid_argument", "tenant name");
    let (s, j) = call(a, "PUT", &format!("{P}/feat-2"), r#"{"parent":"nope"}"#).await;
    assert_error(s, &j, 404, "not_found", "parent tenant \"nope\"");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    assert_error(s, &j, 409, "already_exists", "feat-1");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-2"),
        r#"{"parent": "integration", "colour": 1}"#,
    )
    .await;
    assert_error(s, &j, 400, "invalid_argument", "colour");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1/config/a.yaml"),
        "a: 1\nb: [1, 2\n",
    )
    .await;
    assert_error(s, &j, 400, "invalid_argument", "invalid yaml at line");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1/config/a.toml"),
        "a = 1\nb = = 2\n",
    )
    .await;
    assert_error(s, &j, 400, "invalid_argument", "invalid toml at line 2");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1/config/a.txt?mode=merge"),
        "x",
    )
    .await;
    assert_error(s, &j, 400, "invalid_argument", "mode merge");
    let (s, j) = call(a, "PUT", &format!("{P}/feat-1/config/a//b"), "x").await;
    assert_error(s, &j, 400, "invalid_argument", "empty path segment");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1/config/big.txt"),
        &"x".repeat(1025),
    )
    .await;
    assert_error(s, &j, 413, "limit_exceeded", "limit is 1024 bytes");
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/feat-1/config/a.txt?format=xml"),
        "x",
    )
    .await;
    assert_error(s, &j, 400, "invalid_argument", "unknown format");
    let (s, j) = call(a, "PUT", &format!("{P}/nope/config/a.txt"), "x").await;
    assert_error(s, &j, 404, "not_found", "tenant \"nope\"");
    let (s, j) = call(a, "DELETE", &format!("{P}/integration"), "").await;
    assert_error(s, &j, 409, "failed_precondition", "protected");
    let (s, j) = call(a, "DELETE", &format!("{P}/integration?force=true&x"), "").await;
    assert!(s == 200 || s == 400, "{s} {j}");
    assert_eq!(
        revision(a).await,
        before + i64::from(s == 200),
        "a refused request wrote something"
    );
}

#[tokio::test]
async fn chains_are_bounded_and_deletes_respect_children() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/t0"), "").await;
    for i in 1..8 {
        ok(
            a,
            "PUT",
            &format!("{P}/t{i}"),
            &format!(r#"{{"parent":"t{}"}}"#, i - 1),
        )
        .await;
    }
    let t7 = ok(a, "GET", &format!("{P}/t7"), "").await;
    assert_eq!(t7["tenant"]["chain"].as_array().unwrap().len(), 8);
    let before = revision(a).await;
    let (s, j) = call(a, "PUT", &format!("{P}/t8"), r#"{"parent":"t7"}"#).await;
    assert_error(s, &j, 400, "invalid_argument", "limit is 8");
    let (s, j) = call(a, "DELETE", &format!("{P}/t3"), "").await;
    assert_error(s, &j, 409, "failed_precondition", "has children (t4)");
    assert_eq!(revision(a).await, before);

    let listed = ok(a, "GET", P, "").await;
    let names: Vec<&str> = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"]);

    let put = ok(a, "PUT", &format!("{P}/t5/config/k.json"), "{}").await;
    let before = put["revision"].as_i64().unwrap();
    let deleted = ok(a, "DELETE", &format!("{P}/t3?force=true"), "").await;
    assert_eq!(deleted["deleted_layers"], 1);
    assert_eq!(
        deleted["revision"].as_i64().unwrap(),
        before + 1,
        "subtree deleted at one revision"
    );
    let listed = ok(a, "GET", P, "").await;
    assert_eq!(listed["tenants"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn compare_and_set_on_expected_revision() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let first = ok(
        a,
        "PUT",
        &format!("{P}/integration/config/k.json?expected_revision=-1"),
        "{\"v\":1}",
    )
    .await;
    let rev = first["layer"]["mod_revision"].as_i64().unwrap();
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/integration/config/k.json?expected_revision=-1"),
        "{\"v\":2}",
    )
    .await;
    assert_error(s, &j, 409, "revision_mismatch", "not the expected -1");
    assert_eq!(j["error"]["metadata"]["current_revision"], rev.to_string());
    ok(
        a,
        "PUT",
        &format!("{P}/integration/config/k.json?expected_revision={rev}"),
        "{\"v\":2}",
    )
    .await;
    let (s, j) = call(
        a,
        "PUT",
        &format!("{P}/integration/config/k.json?expected_revision={rev}"),
        "{\"v\":3}",
    )
    .await;
    assert_error(s, &j, 409, "revision_mismatch", "expected");
    let (_, body) = http_get(a, &format!("{P}/integration/config/k.json"))
        .await
        .unwrap();
    assert_eq!(body, "{\"v\":2}");
}

/// A merged value comes in the nearest layer's format (a JSON merge over a
/// YAML base answers JSON); `?format=` asks for json, yaml or toml instead,
/// and refuses what cannot convert.
#[tokio::test]
async fn merged_values_come_in_the_nearest_format_and_format_asks_for_another() {
    let daemon = Daemon::start().await;
    let addr = daemon.addr;
    ok(addr, "PUT", &format!("{P}/integration"), "{}").await;
    ok(
        addr,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    ok(
        addr,
        "PUT",
        &format!("{P}/integration/config/mm/server.yaml"),
        "port: 7000\nhost: mm\n",
    )
    .await;
    ok(
        addr,
        "PUT",
        &format!("{P}/feat-1/config/mm/server.yaml?mode=merge&format=json"),
        r#"{"port":7100}"#,
    )
    .await;
    let merged = json!({"port": 7100, "host": "mm"});
    let get = |query: &'static str| async move {
        http_request(
            addr,
            "GET",
            &format!("{P}/feat-1/config/mm/server.yaml{query}"),
            &[],
            b"",
        )
        .await
        .unwrap()
    };
    let (status, body) = get("").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        merged,
        "{body}"
    );
    let (status, body) = get("?format=yaml").await;
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<Value>(&body).is_err(),
        "YAML, not JSON: {body}"
    );
    assert_eq!(
        serde_norway::from_str::<Value>(&body).unwrap(),
        merged,
        "{body}"
    );
    let (status, body) = get("?format=toml").await;
    assert_eq!(status, 200);
    assert_eq!(toml::from_str::<Value>(&body).unwrap(), merged, "{body}");
    // The base's own layer, converted too.
    let (status, body) = get("?format=json&layer=true").await;
    assert_eq!(status, 200, "{body}");
    // `layer=true` reads feat-1's own layer: the JSON patch.
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"port": 7100})
    );

    ok(
        addr,
        "PUT",
        &format!("{P}/integration/config/motd.txt"),
        "hello",
    )
    .await;
    let (status, body) = http_request(
        addr,
        "GET",
        &format!("{P}/feat-1/config/motd.txt?format=json"),
        &[],
        b"",
    )
    .await
    .unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_error(
        status,
        &json,
        400,
        "invalid_argument",
        "cannot be rendered as json",
    );
    let (status, body) = get("?format=xml").await;
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_error(status, &json, 400, "invalid_argument", "unknown format");
}
