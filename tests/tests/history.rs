//! Config history and rollback end to end against a real `stratad`: every
//! version of a layer is kept (bounded), a rollback writes an old version as
//! a new revision, and deleting a tenant leaves none of its history behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use strata_server::store::embedded::EmbeddedStore;
use strata_server::store::{KeyRange, Store};
use strata_tests::{Daemon, http_get, http_json as call, http_ok as ok, strata};

async fn resolved(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path).await.unwrap()
}

const P: &str = "/v1/projects/vega/tenants";
const KEY: &str = "mm/server.json";

async fn put(addr: SocketAddr, tenant: &str, value: &str) -> i64 {
    ok(addr, "PUT", &format!("{P}/{tenant}/config/{KEY}"), value).await["revision"]
        .as_i64()
        .unwrap()
}

fn revisions(history: &Value) -> Vec<i64> {
    history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["revision"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn every_version_is_kept_and_rollback_writes_an_old_one_as_new() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let r1 = put(a, "integration", r#"{"port":7000}"#).await;
    let r2 = put(a, "integration", r#"{"port":7001}"#).await;
    // A write elsewhere, so a revision lies between two versions of KEY.
    ok(a, "PUT", &format!("{P}/integration/config/other.txt"), "x").await;
    let r3 = put(a, "integration", r#"{"port":7002}"#).await;

    let history = ok(
        a,
        "GET",
        &format!("{P}/integration/config/{KEY}?history=true"),
        "",
    )
    .await;
    assert_eq!(revisions(&history), vec![r3, r2, r1], "{history}");
    assert_eq!(history["versions"][2]["value"], r#"{"port":7000}"#);
    assert_eq!(history["versions"][0]["format"], "json");
    let limited = ok(
        a,
        "GET",
        &format!("{P}/integration/config/{KEY}?history=true&limit=2"),
        "",
    )
    .await;
    assert_eq!(revisions(&limited), vec![r3, r2]);

    // Roll back to the first version: a new revision with the old value.
    let done = ok(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={r1}"),
        "",
    )
    .await;
    let r4 = done["revision"].as_i64().unwrap();
    assert!(r4 > r3);
    assert_eq!(done["restored"]["revision"], r1);
    assert_eq!(done["layer"]["mod_revision"], r4);
    let (status, body) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"port":7000}"#));

    // A revision between versions means "as it was then".
    assert!(r3 > r2 + 1);
    let between = ok(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={}", r2 + 1),
        "",
    )
    .await;
    assert_eq!(between["restored"]["revision"], r2);
    let (_, body) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(body, r#"{"port":7001}"#);

    // Removing the layer is a version too, and can be undone.
    let removed_at =
        ok(a, "DELETE", &format!("{P}/integration/config/{KEY}"), "").await["revision"]
            .as_i64()
            .unwrap();
    let history = ok(
        a,
        "GET",
        &format!("{P}/integration/config/{KEY}?history=true"),
        "",
    )
    .await;
    assert_eq!(history["versions"][0]["revision"], removed_at);
    assert_eq!(history["versions"][0]["removed"], true);
    assert_eq!(history["versions"][1]["restored_from"], r2);
    let (status, _) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(status, 404);
    ok(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={r3}"),
        "",
    )
    .await;
    let (_, body) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(body, r#"{"port":7002}"#);

    // Rolling back to before the key existed removes the layer again.
    let gone = ok(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={}", r1 - 1),
        "",
    )
    .await;
    assert_eq!(gone["layer"], Value::Null);
    let (status, _) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(status, 404);

    // Compare-and-set guards a rollback like any write.
    let (status, json) = call(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={r1}&expected_revision={r1}"),
        "",
    )
    .await;
    assert_eq!(status, 409, "{json}");

    // Bad requests get clear errors.
    let (status, json) = call(a, "POST", &format!("{P}/integration/config/{KEY}"), "").await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rollback_to")
    );
    let (status, json) = call(
        a,
        "GET",
        &format!("{P}/integration/config/never/set.json?history=true"),
        "",
    )
    .await;
    assert_eq!(status, 404, "{json}");
}

#[tokio::test]
async fn retention_prunes_old_versions_and_refuses_rollback_past_them() {
    let daemon = Daemon::builder()
        .env("STRATA_HISTORY_VERSIONS", "3")
        .start()
        .await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let mut written = Vec::new();
    for port in 0..6 {
        written.push(put(a, "integration", &format!(r#"{{"port":{port}}}"#)).await);
    }
    let history = ok(
        a,
        "GET",
        &format!("{P}/integration/config/{KEY}?history=true"),
        "",
    )
    .await;
    assert_eq!(
        revisions(&history),
        vec![written[5], written[4], written[3]]
    );
    let (status, json) = call(
        a,
        "POST",
        &format!("{P}/integration/config/{KEY}?rollback_to={}", written[1]),
        "",
    )
    .await;
    assert_eq!(status, 409, "{json}");
    assert_eq!(json["error"]["code"], "failed_precondition");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("older than the oldest kept version"),
        "{message}"
    );
    // Nothing was written by the refused rollback.
    let (_, body) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(body, r#"{"port":5}"#);
}

#[tokio::test]
async fn history_and_rollback_through_the_cli() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let r1 = put(a, "integration", r#"{"mode":"casual"}"#).await;
    put(a, "integration", r#"{"mode":"ranked"}"#).await;

    let args = ["--project", "vega", "--output", "json"];
    let with = |rest: &[&str]| -> Vec<String> {
        args.iter()
            .chain(rest)
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
    };
    let run = |argv: Vec<String>| {
        let daemon = &daemon;
        async move {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            strata(daemon, &refs).await
        }
    };
    let (code, out, err) = run(with(&["config", "history", "integration", KEY])).await;
    assert_eq!(code, 0, "{err}");
    let versions: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 2, "{out}");
    assert_eq!(versions[1]["revision"], r1);
    assert_eq!(versions[1]["value"], r#"{"mode":"casual"}"#);

    let to = r1.to_string();
    let (code, out, err) = run(with(&[
        "config",
        "rollback",
        "integration",
        KEY,
        "--to",
        &to,
        "--yes",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["restored_revision"], r1);
    let (_, body) = resolved(a, &format!("{P}/integration/config/{KEY}")).await;
    assert_eq!(body, r#"{"mode":"casual"}"#);

    // A server-side refusal is exit code 1 with the server's message.
    let (code, _, err) = run(with(&[
        "config",
        "rollback",
        "integration",
        KEY,
        "--to",
        "0",
        "--yes",
    ]))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("must be positive"), "{err}");
}

#[tokio::test]
async fn deleting_a_tenant_leaves_no_key_of_it_in_the_store() {
    let mut daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    put(a, "integration", r#"{"port":1}"#).await;
    for port in 0..3 {
        put(a, "feat-1", &format!(r#"{{"port":{port}}}"#)).await;
    }
    ok(a, "DELETE", &format!("{P}/feat-1"), "").await;
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).await.success());

    let store = EmbeddedStore::open(&daemon.data_dir).unwrap();
    let all = store.range(KeyRange::prefix(Vec::new())).await.unwrap();
    let keys: Vec<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert!(
        keys.iter().all(|k| !k.contains("/feat-1")),
        "keys of feat-1 remain: {keys:?}"
    );
    // The parent's history is untouched.
    assert!(
        keys.iter()
            .any(|k| k.starts_with("h/vega/integration/mm/server.json@")),
        "{keys:?}"
    );
}
