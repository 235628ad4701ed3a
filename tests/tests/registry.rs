//! The service registry end to end against a real `stratad`: fallback
//! resolution between a feature tenant and `integration` with real
//! upstream servers probed by the daemon, the services watch following a
//! switch and back, strict tenants, ephemeral instances of a killed process
//! expiring, probe-driven health, tenant deletion and TTL collection leaving
//! no key behind, and clear errors for bad registrations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use strata_proto::v1::WatchServicesRequest;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_server::store::embedded::EmbeddedStore;
use strata_server::store::{KeyRange, Store};
use strata_tests::{Daemon, http_get, http_json as call, http_ok as ok, strata_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const P: &str = "/v1/projects/vega/tenants";

/// A real upstream: answers every HTTP request with 200 until dropped.
struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    async fn restart_on(addr: SocketAddr) -> Self {
        Self::on(TcpListener::bind(addr).await.unwrap())
    }

    fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    /// Stops accepting and closes the port.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn persistent(id: &str, addr: SocketAddr, check_interval_ms: u32) -> String {
    format!(
        r#"{{"id":"{id}","endpoints":{{"main":"{addr}"}},"kind":"persistent",
            "check":{{"http":"/healthz","interval_ms":{check_interval_ms},"failure_threshold":2}}}}"#
    )
}

/// Resolves `service` for `tenant` until `done` holds (bounded).
async fn resolve_until(
    a: SocketAddr,
    tenant: &str,
    service: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, json) = call(a, "GET", &format!("{P}/{tenant}/services/{service}"), "").await;
        if done(&json) {
            return json;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} for {tenant}: never {what}; last: {json}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn served_by(json: &Value) -> Option<&str> {
    json["tenant"].as_str()
}

#[tokio::test]
async fn feature_tenant_resolves_its_own_service_and_falls_back_for_the_rest() {
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
        &format!("{P}/locked"),
        r#"{"parent":"integration","strict":true}"#,
    )
    .await;

    let upstreams = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    for (svc, up) in ["a", "b", "c"].iter().zip(&upstreams) {
        ok(
            a,
            "POST",
            &format!("{P}/integration/services/{svc}/instances"),
            &persistent(&format!("{svc}-int"), up.addr, 100),
        )
        .await;
    }
    for svc in ["a", "b", "c"] {
        resolve_until(a, "integration", svc, "healthy", |j| {
            served_by(j) == Some("integration")
        })
        .await;
    }

    // Watch b from feat-1 before feat-1 has it: integration serves.
    let mut registry = RegistryServiceClient::new(daemon.channel().await);
    let mut watch = registry
        .watch_services(WatchServicesRequest {
            project: "vega".into(),
            tenant: "feat-1".into(),
            services: vec!["b".into()],
            start_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a watch message in time")
            .expect("the watch stays open")
            .unwrap()
    };
    let snapshot = next().await;
    assert_eq!(snapshot.services.len(), 1);
    assert_eq!(snapshot.services[0].tenant, "integration");
    assert!(snapshot.services[0].fallback);

    // The CD step registers only b in feat-1, with its config, atomically.
    let feat_b = Upstream::start().await;
    let branch = format!(
        r#"{{"parent":"integration","instances":[{}],
            "config":{{"b/server.json":{{"value":"{{\"port\":7100}}","format":"json"}}}}}}"#,
        persistent("b-feat", feat_b.addr, 100)
    );
    let done = ok(
        a,
        "POST",
        &format!("{P}/feat-1/services/b:register"),
        &branch,
    )
    .await;
    assert_eq!(done["tenant_created"], false);
    assert_eq!(done["instance_ids"][0], "b-feat");
    let (status, body) = http_get(a, &format!("{P}/feat-1/config/b/server.json"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"port":7100}"#));

    // Once its probe passes, feat-1's b serves feat-1; a and c fall back.
    let b = resolve_until(a, "feat-1", "b", "served by feat-1", |j| {
        served_by(j) == Some("feat-1")
    })
    .await;
    assert_eq!(b["fallback"], false);
    assert_eq!(
        b["instances"][0]["endpoints"]["main"]["address"],
        feat_b.addr.to_string()
    );
    for svc in ["a", "c"] {
        let r = ok(a, "GET", &format!("{P}/feat-1/services/{svc}"), "").await;
        assert_eq!(served_by(&r), Some("integration"), "{r}");
        assert_eq!(r["fallback"], true);
    }
    let listed = ok(a, "GET", &format!("{P}/feat-1/services"), "").await;
    let where_: Vec<(String, String)> = listed["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["tenant"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        where_,
        [("a", "integration"), ("b", "feat-1"), ("c", "integration")]
            .map(|(s, t)| (s.to_owned(), t.to_owned()))
    );

    // The watcher saw b switch to feat-1…
    let switched = next().await;
    assert_eq!(switched.services[0].tenant, "feat-1");
    assert!(!switched.services[0].fallback);
    // …and sees it switch back when feat-1's instance is deregistered.
    ok(
        a,
        "DELETE",
        &format!("{P}/feat-1/services/b/instances/b-feat"),
        "",
    )
    .await;
    let back = next().await;
    assert_eq!(back.services[0].tenant, "integration");
    assert!(back.services[0].fallback);
    assert!(back.revision > switched.revision);

    // A strict tenant never falls back, even with integration serving.
    let strict = ok(a, "GET", &format!("{P}/locked/services/a"), "").await;
    assert_eq!(strict["tenant"], Value::Null, "{strict}");
    assert_eq!(strict["instances"].as_array().unwrap().len(), 0);

    // Draining takes an instance out of rotation without removing it.
    ok(
        a,
        "POST",
        &format!("{P}/integration/services/c/instances/c-int/drain"),
        "",
    )
    .await;
    let drained = ok(a, "GET", &format!("{P}/feat-1/services/c"), "").await;
    assert_eq!(drained["tenant"], Value::Null, "{drained}");
    let own = ok(
        a,
        "GET",
        &format!("{P}/integration/services/c/instances"),
        "",
    )
    .await;
    assert_eq!(own["instances"][0]["draining"], true);

    feat_b.stop().await;
    for up in upstreams {
        up.stop().await;
    }
}

#[tokio::test]
async fn a_failing_probe_takes_an_instance_out_until_its_server_returns() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let up = Upstream::start().await;
    let addr = up.addr;
    // interval 200 ms × failure threshold 2.
    ok(
        a,
        "POST",
        &format!("{P}/integration/services/mm/instances"),
        &persistent("mm-1", addr, 200),
    )
    .await;
    resolve_until(a, "integration", "mm", "healthy", |j| {
        served_by(j) == Some("integration")
    })
    .await;

    up.stop().await;
    let stopped = tokio::time::Instant::now();
    resolve_until(a, "integration", "mm", "unroutable", |j| {
        served_by(j).is_none()
    })
    .await;
    // Two failed probes 200 ms apart, plus scheduling slack.
    assert!(
        stopped.elapsed() < Duration::from_millis(2_000),
        "took {:?}",
        stopped.elapsed()
    );
    let own = ok(
        a,
        "GET",
        &format!("{P}/integration/services/mm/instances"),
        "",
    )
    .await;
    assert_eq!(own["instances"][0]["health"], "unhealthy", "{own}");
    assert_ne!(own["instances"][0]["health_detail"], "");

    let up = Upstream::restart_on(addr).await;
    resolve_until(a, "integration", "mm", "healthy again", |j| {
        served_by(j) == Some("integration")
    })
    .await;
    up.stop().await;
}

#[tokio::test]
async fn an_ephemeral_instance_of_a_killed_process_expires_with_its_lease() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    // A game server stand-in: the CLI registers ephemerally and keeps the
    // lease alive until it dies.
    let mut child = tokio::process::Command::new(strata_bin())
        .args([
            "--endpoints",
            &daemon.endpoint(),
            "--project",
            "vega",
            "service",
            "register",
            "integration",
            "game",
            "--kind",
            "ephemeral",
            "--ttl",
            "2s",
            "--id",
            "game-1",
            "--endpoint",
            "main=127.0.0.1:7777",
        ])
        .env_clear()
        .env("STRATA_TOKEN", daemon.admin_token())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    resolve_until(a, "integration", "game", "registered", |j| {
        served_by(j) == Some("integration")
    })
    .await;
    // Alive past its TTL while the owner keeps it alive.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let alive = ok(a, "GET", &format!("{P}/integration/services/game"), "").await;
    assert_eq!(served_by(&alive), Some("integration"), "{alive}");

    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    let _ = child.wait().await;
    let killed = tokio::time::Instant::now();
    resolve_until(a, "integration", "game", "gone", |j| served_by(j).is_none()).await;
    // The TTL, plus the store's expiry tick and scheduling slack.
    assert!(
        killed.elapsed() < Duration::from_millis(4_000),
        "took {:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn deleted_and_expired_tenants_leave_no_key_behind() {
    let mut daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    ok(
        a,
        "POST",
        &format!("{P}/integration/services/a/instances"),
        r#"{"id":"a-int","endpoints":{"main":"127.0.0.1:1"},"kind":"persistent"}"#,
    )
    .await;
    // feat-1 gets everything a branch can hold, then is deleted.
    let branch = r#"{"parent":"integration",
        "instances":[{"id":"b1","endpoints":{"main":"127.0.0.1:2"},"kind":"persistent",
                      "check":{"tcp":true,"interval_ms":200}},
                     {"id":"b2","endpoints":{"main":"127.0.0.1:3"},"ttl_seconds":30}],
        "config":{"b/server.json":{"value":"{}"}}}"#;
    let done = ok(
        a,
        "POST",
        &format!("{P}/feat-1/services/b:register"),
        branch,
    )
    .await;
    assert_eq!(done["tenant_created"], true);
    assert!(done["lease_id"].as_i64().unwrap() > 0);
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1/config/b/server.json"),
        r#"{"v":2}"#,
    )
    .await;
    // Give the probe time to write a verdict, so that key exists too.
    tokio::time::sleep(Duration::from_millis(700)).await;
    ok(a, "DELETE", &format!("{P}/feat-1"), "").await;

    // feat-2 expires: its TTL is 1 s and the collector runs every second.
    let branch = r#"{"parent":"integration","ttl_seconds":1,
        "instances":[{"id":"c1","endpoints":{"main":"127.0.0.1:4"},"kind":"persistent"}],
        "config":{"c/server.json":{"value":"{}"}}}"#;
    ok(
        a,
        "POST",
        &format!("{P}/feat-2/services/c:register"),
        branch,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = call(a, "GET", &format!("{P}/feat-2"), "").await;
        if status == 404 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "feat-2 never collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).await.success());
    let store = EmbeddedStore::open(&daemon.data_dir).unwrap();
    let keys: Vec<String> = store
        .range(KeyRange::prefix(Vec::new()))
        .await
        .unwrap()
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    for gone in ["/feat-1", "/feat-2"] {
        assert!(
            keys.iter().all(|k| !k.contains(gone)),
            "keys of {gone} remain: {keys:?}"
        );
    }
    assert!(
        keys.contains(&"i/vega/integration/a/a-int".to_owned()),
        "{keys:?}"
    );
}

#[tokio::test]
async fn bad_registrations_get_clear_errors_and_write_nothing() {
    let daemon = Daemon::start().await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    let path = format!("{P}/integration/services/svc/instances");
    let cases = [
        (r#"{"endpoints":{"main":"10.0.0.5"}}"#, 400, "no port"),
        (r#"{"endpoints":{"main":"10.0.0.5:99999"}}"#, 400, "port"),
        (
            r#"{"endpoints":{"main":"a:1","main":"b:2"}}"#,
            400,
            "given twice",
        ),
        (r#"{"endpoints":{}}"#, 400, "at least one endpoint"),
        (
            r#"{"endpoints":{"main":"a:1"},"protocol":"smtp"}"#,
            400,
            "unknown protocol",
        ),
        (
            r#"{"endpoints":{"main":"a:1"},"check":{"tcp":true}}"#,
            400,
            "persistent",
        ),
        (
            r#"{"endpoints":{"main":"a:1"},"kind":"persistent","check":{"http":"/h","interval_ms":10}}"#,
            400,
            "interval",
        ),
        (
            r#"{"endpoints":{"main":"a:1"},"colour":"red"}"#,
            400,
            "unknown field",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, json) = call(a, "POST", &path, body).await;
        assert_eq!(got, status, "{body}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{body}: {needle:?} not in {message:?}"
        );
    }
    let big = format!(
        r#"{{"endpoints":{{"main":"a:1"}},"metadata":{{"blob":"{}"}}}}"#,
        "x".repeat(20_000)
    );
    let (got, json) = call(a, "POST", &path, &big).await;
    assert_eq!(got, 413, "{json}");
    assert_eq!(json["error"]["code"], "limit_exceeded");

    // Unknown tenants: resolve and register.
    let (got, _) = call(a, "GET", &format!("{P}/nowhere/services/svc"), "").await;
    assert_eq!(got, 404);
    let (got, _) = call(
        a,
        "POST",
        &format!("{P}/nowhere/services/svc/instances"),
        r#"{"endpoints":{"main":"a:1"}}"#,
    )
    .await;
    assert_eq!(got, 404);
    let (got, json) = call(
        a,
        "DELETE",
        &format!("{P}/integration/services/svc/instances/nope"),
        "",
    )
    .await;
    assert_eq!(got, 404, "{json}");

    // A branch registration with one bad part writes nothing at all.
    let branch = r#"{"parent":"integration",
        "instances":[{"id":"ok","endpoints":{"main":"127.0.0.1:5"},"kind":"persistent"}],
        "config":{"b/server.json":{"value":"{not json","format":"json"}}}"#;
    let (got, json) = call(
        a,
        "POST",
        &format!("{P}/feat-9/services/b:register"),
        branch,
    )
    .await;
    assert_eq!(got, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("b/server.json")
    );
    let (got, _) = call(a, "GET", &format!("{P}/feat-9"), "").await;
    assert_eq!(got, 404, "the tenant must not have been created");
    let branch = r#"{"parent":"no-such-parent",
        "instances":[{"id":"ok","endpoints":{"main":"127.0.0.1:5"},"kind":"persistent"}]}"#;
    let (got, _) = call(
        a,
        "POST",
        &format!("{P}/feat-9/services/b:register"),
        branch,
    )
    .await;
    assert_eq!(got, 404);
    let (got, _) = call(a, "GET", &format!("{P}/feat-9"), "").await;
    assert_eq!(got, 404);
    let everything = ok(a, "GET", &format!("{P}/integration/services"), "").await;
    assert_eq!(
        everything["services"].as_array().unwrap().len(),
        0,
        "{everything}"
    );
}

#[tokio::test]
async fn a_resumed_services_watch_gets_exactly_the_missed_changes_or_a_reset() {
    // A short journal, so an old resume point falls out of it.
    let daemon = Daemon::builder()
        .env("STRATA_WATCH_JOURNAL_REVISIONS", "4")
        .start()
        .await;
    let a = daemon.addr;
    ok(a, "PUT", &format!("{P}/integration"), "").await;
    ok(
        a,
        "PUT",
        &format!("{P}/feat-1"),
        r#"{"parent":"integration"}"#,
    )
    .await;
    let plain = |id: &str| {
        format!(r#"{{"id":"{id}","endpoints":{{"main":"127.0.0.1:9"}},"kind":"persistent"}}"#)
    };
    ok(
        a,
        "POST",
        &format!("{P}/integration/services/a/instances"),
        &plain("a1"),
    )
    .await;

    let mut registry = RegistryServiceClient::new(daemon.channel().await);
    let request = |start_revision| WatchServicesRequest {
        project: "vega".into(),
        tenant: "feat-1".into(),
        services: vec![],
        start_revision,
    };
    let mut watch = registry
        .watch_services(request(0))
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.next().await.unwrap().unwrap();
    assert_eq!(snapshot.services.len(), 1);
    assert_eq!(snapshot.services[0].service, "a");
    drop(watch);

    // While disconnected: b appears in feat-1 (a change), b appears in
    // integration (hidden by feat-1's: no change), a disappears (a change).
    let r1 = ok(
        a,
        "POST",
        &format!("{P}/feat-1/services/b/instances"),
        &plain("b1"),
    )
    .await["revision"]
        .as_i64()
        .unwrap();
    ok(
        a,
        "POST",
        &format!("{P}/integration/services/b/instances"),
        &plain("b2"),
    )
    .await;
    let r3 = ok(
        a,
        "DELETE",
        &format!("{P}/integration/services/a/instances/a1"),
        "",
    )
    .await["revision"]
        .as_i64()
        .unwrap();

    let mut resumed = registry
        .watch_services(request(snapshot.revision + 1))
        .await
        .unwrap()
        .into_inner();
    let first = resumed.next().await.unwrap().unwrap();
    assert_eq!(first.revision, r1);
    assert!(!first.reset);
    assert_eq!(first.services.len(), 1);
    assert_eq!(
        (
            first.services[0].service.as_str(),
            first.services[0].tenant.as_str()
        ),
        ("b", "feat-1")
    );
    let second = resumed.next().await.unwrap().unwrap();
    assert_eq!(second.revision, r3);
    assert_eq!(second.services.len(), 1);
    assert_eq!(second.services[0].service, "a");
    assert_eq!(second.services[0].tenant, "", "a no longer resolves");
    // Nothing else was missed.
    let quiet = tokio::time::timeout(Duration::from_millis(300), resumed.next()).await;
    assert!(quiet.is_err(), "unexpected message: {quiet:?}");

    // Push the resume point out of the journal: a reset snapshot.
    for i in 0..6 {
        ok(
            a,
            "POST",
            &format!("{P}/integration/services/c/instances"),
            &plain(&format!("c{i}")),
        )
        .await;
    }
    let mut reset = registry
        .watch_services(request(snapshot.revision + 1))
        .await
        .unwrap()
        .into_inner();
    let message = reset.next().await.unwrap().unwrap();
    assert!(message.reset, "{message:?}");
    let names: Vec<&str> = message
        .services
        .iter()
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(names, ["b", "c"]);
}
