//! `strata service …` and `strata tenant delete` against a real daemon:
//! integration and feat-1 (its child) register instances through the CLI;
//! feat-1 resolves to its own instances where it has routable ones and falls
//! back to integration elsewhere; drain, deregister and watch change that;
//! bad input is a usage error (exit 2), a server refusal exit 1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use strata_tests::{Daemon, strata, strata_bin};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

async fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let (code, stdout, stderr) = strata(daemon, args).await;
    assert_eq!(code, 0, "strata {args:?} failed: {stderr}");
    stdout
}

/// Runs `strata --project vega -o json ARGS…` and parses its output.
async fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut full = vec!["--project", "vega", "--output", "json"];
    full.extend_from_slice(args);
    let out = ok(daemon, &full).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Runs `strata --project vega ARGS…` in table mode.
async fn table(daemon: &Daemon, args: &[&str]) -> String {
    let mut full = vec!["--project", "vega"];
    full.extend_from_slice(args);
    ok(daemon, &full).await
}

/// Runs `strata --project vega ARGS…` expecting failure: (code, stderr).
async fn fails(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let mut full = vec!["--project", "vega"];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = strata(daemon, &full).await;
    assert_ne!(code, 0, "strata {full:?} should fail; printed {stdout}");
    (code, stderr)
}

/// A long-running `strata` child (watch, ephemeral register).
fn spawn(daemon: &Daemon, args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(strata_bin())
        .args(["--endpoints", &daemon.endpoint(), "--project", "vega"])
        .args(args)
        .env_clear()
        .env("STRATA_TOKEN", daemon.admin_token())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut Lines<R>) -> String {
    tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line within 10 s")
        .unwrap()
        .expect("the child is still running")
}

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = next_line(lines).await;
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Sorted ids of the instances in a JSON array.
fn ids(instances: &Value) -> Vec<String> {
    let mut ids: Vec<String> = instances
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {instances}"))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn register(daemon: &Daemon, tenant: &str, service: &str, id: &str, address: &str) {
    let endpoint = format!("main={address}");
    let r = json(
        daemon,
        &[
            "service",
            "register",
            tenant,
            service,
            "--id",
            id,
            "--endpoint",
            &endpoint,
        ],
    )
    .await;
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["kind"], "persistent", "{r}");
    assert!(r["revision"].as_i64().unwrap() > 0, "{r}");
}

/// Creates integration and feat-1 (child of integration) in project vega.
async fn tenants(daemon: &Daemon) {
    table(daemon, &["tenant", "create", "integration"]).await;
    table(
        daemon,
        &["tenant", "create", "feat-1", "--parent", "integration"],
    )
    .await;
}

#[tokio::test]
async fn register_resolve_list_drain_deregister() {
    let daemon = Daemon::start().await;
    tenants(&daemon).await;

    register(&daemon, "integration", "mm", "mm-int", "10.0.0.1:7000").await;
    register(&daemon, "feat-1", "mm", "mm-f1", "10.0.1.1:7000").await;
    let chat = json(
        &daemon,
        &[
            "service",
            "register",
            "integration",
            "chat",
            "--id",
            "chat-int",
            "--endpoint",
            "main=10.0.0.2:7100",
            "--endpoint",
            "metrics=10.0.0.2:9100",
            "--protocol",
            "grpc",
            "--weight",
            "50",
            "--version",
            "1.2.3",
            "--meta",
            "zone=a",
        ],
    )
    .await;
    assert_eq!(chat["id"], "chat-int");
    // Without --id the daemon makes one up.
    let generated = json(
        &daemon,
        &[
            "service",
            "register",
            "integration",
            "lobby",
            "--endpoint",
            "main=lobby.internal:80",
        ],
    )
    .await;
    let generated_id = generated["id"].as_str().unwrap().to_owned();
    assert!(!generated_id.is_empty(), "{generated}");

    // feat-1 has mm itself; chat only through integration.
    let mm = json(&daemon, &["service", "resolve", "feat-1", "mm"]).await;
    assert_eq!(mm["tenant"], "feat-1", "{mm}");
    assert_eq!(mm["fallback"], false, "{mm}");
    assert_eq!(ids(&mm["instances"]), ["mm-f1"]);
    assert_eq!(
        mm["instances"][0]["endpoints"]["main"]["address"],
        "10.0.1.1:7000"
    );
    assert!(mm["revision"].as_i64().unwrap() > 0, "{mm}");
    let resolved = json(&daemon, &["service", "resolve", "feat-1", "chat"]).await;
    assert_eq!(resolved["tenant"], "integration", "{resolved}");
    assert_eq!(resolved["fallback"], true, "{resolved}");
    let i = &resolved["instances"][0];
    assert_eq!(i["id"], "chat-int");
    assert_eq!(i["endpoints"]["metrics"]["address"], "10.0.0.2:9100");
    assert_eq!(i["endpoints"]["main"]["protocol"], "grpc");
    assert_eq!(i["weight"], 50);
    assert_eq!(i["version"], "1.2.3");
    assert_eq!(i["metadata"]["zone"], "a");
    let text = table(&daemon, &["service", "resolve", "feat-1", "chat"]).await;
    assert!(
        text.contains("served by integration (fallback)") && text.contains("chat-int"),
        "{text}"
    );
    let nothing = json(&daemon, &["service", "resolve", "feat-1", "nope"]).await;
    assert_eq!(nothing["tenant"], Value::Null, "{nothing}");
    assert_eq!(ids(&nothing["instances"]), Vec::<String>::new());

    // Every service visible from feat-1, and where each resolves.
    let services = json(&daemon, &["service", "list", "feat-1"]).await;
    let seen: Vec<(String, String, bool, i64)> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["tenant"].as_str().unwrap().to_owned(),
                s["fallback"].as_bool().unwrap(),
                s["routable_instances"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("chat".to_owned(), "integration".to_owned(), true, 1),
            ("lobby".to_owned(), "integration".to_owned(), true, 1),
            ("mm".to_owned(), "feat-1".to_owned(), false, 1),
        ]
    );
    let text = table(&daemon, &["service", "list", "feat-1"]).await;
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("mm") && l.contains("feat-1") && l.contains("no")),
        "{text}"
    );

    // A tenant's own instances, with their state.
    let own = json(&daemon, &["service", "list", "feat-1", "mm"]).await;
    assert_eq!(ids(&own), ["mm-f1"]);
    assert_eq!(own[0]["health"], "healthy", "{own}");
    assert_eq!(own[0]["draining"], false, "{own}");
    assert_eq!(own[0]["kind"], "persistent", "{own}");
    let none = json(&daemon, &["service", "list", "feat-1", "chat"]).await;
    assert_eq!(ids(&none), Vec::<String>::new());
    let text = table(&daemon, &["service", "list", "integration", "chat"]).await;
    assert!(
        text.contains("chat-int") && text.contains("1.2.3") && text.contains("main=10.0.0.2:7100"),
        "{text}"
    );

    // Draining feat-1's only instance makes feat-1 fall back; undoing it not.
    let drained = json(&daemon, &["service", "drain", "feat-1", "mm", "mm-f1"]).await;
    assert_eq!(drained["draining"], true, "{drained}");
    let own = json(&daemon, &["service", "list", "feat-1", "mm"]).await;
    assert_eq!(own[0]["draining"], true, "{own}");
    let mm = json(&daemon, &["service", "resolve", "feat-1", "mm"]).await;
    assert_eq!(mm["tenant"], "integration", "{mm}");
    assert_eq!(mm["fallback"], true, "{mm}");
    assert_eq!(ids(&mm["instances"]), ["mm-int"]);
    json(
        &daemon,
        &["service", "drain", "feat-1", "mm", "mm-f1", "--undo"],
    )
    .await;
    let mm = json(&daemon, &["service", "resolve", "feat-1", "mm"]).await;
    assert_eq!(mm["tenant"], "feat-1", "{mm}");

    // Deregistering it does the same for good.
    let gone = json(&daemon, &["service", "deregister", "feat-1", "mm", "mm-f1"]).await;
    assert_eq!(gone["deregistered"], "mm-f1", "{gone}");
    let mm = json(&daemon, &["service", "resolve", "feat-1", "mm"]).await;
    assert_eq!(mm["tenant"], "integration", "{mm}");
    assert_eq!(
        ids(&json(&daemon, &["service", "list", "feat-1", "mm"]).await),
        Vec::<String>::new()
    );
    json(
        &daemon,
        &[
            "service",
            "deregister",
            "integration",
            "lobby",
            &generated_id,
        ],
    )
    .await;

    // Usage errors: exit 2 before anything is sent.
    for args in [
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "10.0.0.5:7000",
        ][..],
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "main=10.0.0.5:7000",
            "--protocol",
            "smtp",
        ],
        &["service", "register", "feat-1", "mm"],
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "main=10.0.0.5:7000",
            "--endpoint",
            "main=10.0.0.6:7000",
        ],
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "main=10.0.0.5:7000",
            "--check-tcp",
            "--check-http",
            "/healthz",
        ],
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "main=10.0.0.5:7000",
            "--ttl",
            "5s",
        ],
        &["service", "frobnicate"],
    ] {
        let (code, stderr) = fails(&daemon, args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    let (_, stderr) = fails(
        &daemon,
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "10.0.0.5:7000",
        ],
    )
    .await;
    assert!(stderr.contains("name=host:port"), "{stderr}");

    // Server refusals: exit 1 with the daemon's message, nothing registered.
    let (code, stderr) = fails(
        &daemon,
        &[
            "service",
            "register",
            "feat-1",
            "mm",
            "--endpoint",
            "main=10.0.0.5",
        ],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("invalid endpoint address"), "{stderr}");
    let (code, stderr) = fails(
        &daemon,
        &[
            "service",
            "register",
            "nosuch",
            "mm",
            "--endpoint",
            "main=10.0.0.5:7000",
        ],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not found") || stderr.contains("nosuch"),
        "{stderr}"
    );
    let (code, stderr) = fails(&daemon, &["service", "deregister", "feat-1", "mm", "mm-f1"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("mm-f1"), "{stderr}");
    assert_eq!(
        ids(&json(&daemon, &["service", "list", "feat-1", "mm"]).await),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn watch_prints_a_snapshot_then_changes() {
    let daemon = Daemon::start().await;
    tenants(&daemon).await;
    register(&daemon, "integration", "mm", "mm-int", "10.0.0.1:7000").await;
    register(&daemon, "integration", "chat", "chat-int", "10.0.0.2:7100").await;

    let (mut ndjson, mut lines) =
        spawn(&daemon, &["-o", "json", "service", "watch", "feat-1", "mm"]);
    let (mut people, mut text) = spawn(&daemon, &["service", "watch", "feat-1"]);

    let snapshot = next_json(&mut lines).await;
    assert_eq!(snapshot["kind"], "snapshot", "{snapshot}");
    let services = snapshot["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "only mm is watched: {snapshot}");
    assert_eq!(services[0]["service"], "mm");
    assert_eq!(services[0]["tenant"], "integration");
    assert_eq!(services[0]["fallback"], true);
    let header = next_line(&mut text).await;
    assert!(
        header.starts_with('@') && header.ends_with("snapshot"),
        "{header}"
    );
    let mut listed = vec![next_line(&mut text).await, next_line(&mut text).await];
    listed.sort();
    assert!(
        listed[0].contains("chat") && listed[0].contains("integration (fallback)"),
        "{listed:?}"
    );
    assert!(
        listed[1].contains("mm") && listed[1].contains("10.0.0.1:7000"),
        "{listed:?}"
    );

    // feat-1 gets its own mm: both watchers see the switch.
    register(&daemon, "feat-1", "mm", "mm-f1", "10.0.1.1:7000").await;
    let change = next_json(&mut lines).await;
    assert_eq!(change["kind"], "change", "{change}");
    assert!(change["revision"].as_i64().unwrap() > snapshot["revision"].as_i64().unwrap());
    assert_eq!(change["services"][0]["service"], "mm");
    assert_eq!(change["services"][0]["tenant"], "feat-1");
    assert_eq!(change["services"][0]["fallback"], false);
    assert_eq!(ids(&change["services"][0]["instances"]), ["mm-f1"]);
    let header = next_line(&mut text).await;
    assert!(header.ends_with("change"), "{header}");
    let line = next_line(&mut text).await;
    assert!(
        line.contains("mm") && line.contains("→ feat-1:") && line.contains("10.0.1.1:7000"),
        "{line}"
    );

    // A change to chat is not the mm watcher's business; dropping feat-1's
    // mm switches it back.
    register(
        &daemon,
        "integration",
        "chat",
        "chat-int-2",
        "10.0.0.3:7100",
    )
    .await;
    json(&daemon, &["service", "deregister", "feat-1", "mm", "mm-f1"]).await;
    let back = next_json(&mut lines).await;
    assert_eq!(back["kind"], "change", "{back}");
    assert_eq!(back["services"][0]["service"], "mm", "{back}");
    assert_eq!(back["services"][0]["tenant"], "integration", "{back}");
    assert_eq!(back["services"][0]["fallback"], true, "{back}");

    ndjson.kill().await.unwrap();
    people.kill().await.unwrap();
}

#[tokio::test]
async fn an_ephemeral_registration_lives_while_the_cli_runs() {
    let daemon = Daemon::start().await;
    tenants(&daemon).await;
    let (mut child, mut stdout) = spawn(
        &daemon,
        &[
            "-o",
            "json",
            "service",
            "register",
            "feat-1",
            "game",
            "--id",
            "g-1",
            "--kind",
            "ephemeral",
            "--ttl",
            "2s",
            "--endpoint",
            "main=10.0.9.1:7777",
        ],
    );
    let mut stderr: Lines<BufReader<ChildStderr>> =
        BufReader::new(child.stderr.take().unwrap()).lines();
    // The JSON record is pretty-printed over several lines.
    let mut record = String::new();
    while !record.ends_with("}\n") {
        record.push_str(&next_line(&mut stdout).await);
        record.push('\n');
    }
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["id"], "g-1");
    assert_eq!(record["kind"], "ephemeral");
    assert_eq!(record["ttl_seconds"], 2);
    let note = next_line(&mut stderr).await;
    assert!(
        note.contains("keeping ephemeral instance g-1 alive"),
        "{note}"
    );

    // Well past its TTL it is still there: the CLI keeps the lease alive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let game = json(&daemon, &["service", "resolve", "feat-1", "game"]).await;
    assert_eq!(ids(&game["instances"]), ["g-1"], "{game}");
    assert_eq!(game["instances"][0]["kind"], "ephemeral", "{game}");

    // SIGTERM deregisters it and exits 0.
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the CLI exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let note = next_line(&mut stderr).await;
    assert!(note.contains("deregistered game instance g-1"), "{note}");
    let game = json(&daemon, &["service", "resolve", "feat-1", "game"]).await;
    assert_eq!(game["tenant"], Value::Null, "{game}");
}

#[tokio::test]
async fn tenant_delete_shows_what_it_removes() {
    let daemon = Daemon::start().await;
    tenants(&daemon).await;
    table(
        &daemon,
        &["tenant", "create", "feat-1-a", "--parent", "feat-1"],
    )
    .await;
    register(&daemon, "integration", "mm", "mm-int", "10.0.0.1:7000").await;
    register(&daemon, "feat-1", "mm", "mm-f1", "10.0.1.1:7000").await;
    register(&daemon, "feat-1", "chat", "chat-f1", "10.0.1.2:7100").await;
    register(&daemon, "feat-1-a", "mm", "mm-f1a", "10.0.2.1:7000").await;
    for (tenant, key, value) in [
        ("integration", "a.yaml", "v: 1"),
        ("integration", "b.yaml", "v: 1"),
        ("feat-1", "a.yaml", "v: 2"),
        ("feat-1-a", "c.yaml", "v: 3"),
    ] {
        table(&daemon, &["config", "put", tenant, key, "--value", value]).await;
    }
    // A tombstone counts as a key of feat-1 too.
    table(
        &daemon,
        &["config", "put", "feat-1", "b.yaml", "--mode", "delete"],
    )
    .await;

    // Without a terminal to ask on, --yes is required: a usage error.
    let (code, stderr) = fails(&daemon, &["tenant", "delete", "feat-1", "--force"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");

    // Without --force the server refuses (feat-1 has a child); the preview
    // says so first.
    let (code, stderr) = fails(&daemon, &["tenant", "delete", "feat-1", "--yes"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("feat-1-a"), "{stderr}");

    let (code, stdout, stderr) = strata(
        &daemon,
        &[
            "--project",
            "vega",
            "-o",
            "json",
            "tenant",
            "delete",
            "feat-1",
            "--force",
            "--yes",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "tenant feat-1: 2 config key(s), 2 service instance(s) (chat: chat-f1; mm: mm-f1)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("tenant feat-1-a: 1 config key(s), 1 service instance(s) (mm: mm-f1a)"),
        "{stderr}"
    );
    let deleted: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        deleted["deleted_tenants"],
        serde_json::json!(["feat-1", "feat-1-a"])
    );
    assert_eq!(deleted["deleted_instances"], 3);
    assert_eq!(deleted["deleted_layers"], 3);

    let services = json(&daemon, &["service", "list", "integration"]).await;
    assert_eq!(services.as_array().unwrap().len(), 1, "{services}");
    let (code, _) = fails(&daemon, &["service", "list", "feat-1", "mm"]).await;
    assert_eq!(code, 1);
}
