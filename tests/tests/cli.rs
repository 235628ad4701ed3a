//! The studio's scenario through the `strata` CLI against a real daemon:
//! integration holds a, b, c, d; feat-1 overrides a; feat-1 sees
//! [feat-1.a, integration.b, integration.c, integration.d]; deleting feat-1
//! leaves nothing of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use serde_json::Value;
use strata_tests::{Daemon, strata};

async fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let (code, stdout, stderr) = strata(daemon, args).await;
    assert_eq!(code, 0, "strata {args:?} failed: {stderr}");
    stdout
}

async fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let out = ok(daemon, &full).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn studio_scenario_through_the_cli() {
    let daemon = Daemon::start().await;
    let p = ["--project", "vega"];
    let with = |args: &[&'static str]| -> Vec<&'static str> {
        p.iter().copied().chain(args.iter().copied()).collect()
    };

    ok(
        &daemon,
        &with(&["tenant", "create", "integration", "--protected"]),
    )
    .await;
    ok(
        &daemon,
        &with(&[
            "tenant",
            "create",
            "feat-1",
            "--parent",
            "integration",
            "--ttl",
            "72h",
        ]),
    )
    .await;
    for (svc, key) in [
        ("a", "a/server.yaml"),
        ("b", "b/server.yaml"),
        ("c", "c/server.yaml"),
        ("d", "d/server.yaml"),
    ] {
        let value = format!("name: {svc}\n");
        let (code, _, stderr) = strata(
            &daemon,
            &[
                "--project",
                "vega",
                "config",
                "put",
                "integration",
                key,
                "--value",
                &value,
            ],
        )
        .await;
        assert_eq!(code, 0, "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("override.yml");
    std::fs::write(&file, "name: a-feature\n").unwrap();
    let (code, _, stderr) = strata(
        &daemon,
        &[
            "--project",
            "vega",
            "config",
            "put",
            "feat-1",
            "a/server.yaml",
            "--file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");

    let listed = json(&daemon, &with(&["config", "list", "feat-1"])).await;
    let seen: Vec<(String, String)> = listed
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
        seen,
        [
            ("a/server.yaml".to_owned(), "feat-1".to_owned()),
            ("b/server.yaml".to_owned(), "integration".to_owned()),
            ("c/server.yaml".to_owned(), "integration".to_owned()),
            ("d/server.yaml".to_owned(), "integration".to_owned()),
        ]
    );
    assert_eq!(
        ok(
            &daemon,
            &with(&["config", "get", "feat-1", "a/server.yaml"])
        )
        .await,
        "name: a-feature\n"
    );
    assert_eq!(
        ok(
            &daemon,
            &with(&["config", "get", "feat-1", "b/server.yaml"])
        )
        .await,
        "name: b\n"
    );

    let diff = json(&daemon, &with(&["config", "diff", "integration", "feat-1"])).await;
    assert_eq!(diff.as_array().unwrap().len(), 1, "{diff}");
    assert_eq!(diff[0]["key"], "a/server.yaml");

    let tree = ok(&daemon, &with(&["tenant", "list"])).await;
    assert!(
        tree.contains("integration") && tree.contains("  feat-1"),
        "{tree}"
    );

    // Errors from the server: exit 1 with its message; usage errors: exit 2.
    let (code, _, stderr) = strata(
        &daemon,
        &with(&["tenant", "delete", "integration", "--yes"]),
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("protected"), "{stderr}");
    let (code, _, stderr) = strata(&daemon, &with(&["tenant", "create", "Not_Valid"])).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid tenant name"), "{stderr}");
    let (code, _, _) = strata(&daemon, &with(&["tenant", "frobnicate"])).await;
    assert_eq!(code, 2);

    let deleted = json(&daemon, &with(&["tenant", "delete", "feat-1", "--yes"])).await;
    assert_eq!(deleted["deleted_layers"], 1);
    let (code, _, stderr) = strata(&daemon, &with(&["config", "list", "feat-1"])).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("not found"), "{stderr}");
    let status = json(&daemon, &["status"]).await;
    assert_eq!(status["store"], "embedded");
    assert!(status["revision"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn strata_watch_prints_snapshot_and_changes_until_the_tenant_is_deleted() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let daemon = Daemon::start().await;
    let p = ["--project", "vega"];
    let with = |args: &[&'static str]| -> Vec<&'static str> {
        p.iter().copied().chain(args.iter().copied()).collect()
    };
    ok(&daemon, &with(&["tenant", "create", "integration"])).await;
    ok(
        &daemon,
        &with(&["tenant", "create", "feat-1", "--parent", "integration"]),
    )
    .await;
    ok(
        &daemon,
        &with(&["config", "put", "integration", "a.yaml", "--value", "v: 1"]),
    )
    .await;

    let mut child = tokio::process::Command::new(strata_tests::strata_bin())
        .args([
            "--endpoints",
            &daemon.endpoint(),
            "--project",
            "vega",
            "-o",
            "json",
            "watch",
            "feat-1",
        ])
        .env("STRATA_TOKEN", daemon.admin_token())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("watch still running");
        serde_json::from_str(&line).unwrap()
    };
    let snapshot = next().await;
    assert_eq!(snapshot["kind"], "snapshot");
    assert_eq!(snapshot["changes"][0]["origin"][0], "integration");

    ok(
        &daemon,
        &with(&["config", "put", "feat-1", "a.yaml", "--value", "v: 2"]),
    )
    .await;
    let change = next().await;
    assert_eq!(change["kind"], "change");
    assert_eq!(change["changes"][0]["value"], "v: 2");
    assert_eq!(change["changes"][0]["origin"][0], "feat-1");

    ok(&daemon, &with(&["tenant", "delete", "feat-1", "--yes"])).await;
    let last = next().await;
    assert_eq!(last["tenant_deleted"], true);
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Finding 10 of the security review: `--endpoints https://a,http://b` fell back to
/// plaintext (sending the token in clear) when the https endpoint failed.
/// Now it is a usage error naming the override; with `--allow-plaintext` or
/// `STRATA_ALLOW_PLAINTEXT=1` the fallback works as before.
#[tokio::test]
async fn cli_refuses_a_mixed_https_and_http_endpoint_list_finding_10() {
    let daemon = Daemon::start().await;
    let token = daemon.admin_token();
    let dead = strata_tests::free_port();
    let mixed = format!("https://127.0.0.1:{dead},{}", daemon.endpoint());
    let env = [("STRATA_TOKEN", token.as_str())];
    let (code, out, err) = strata_tests::strata_at(&mixed, &env, &["status"]).await;
    assert_eq!(code, 2, "refused as a usage error: {out}{err}");
    assert!(
        err.contains("--allow-plaintext") && err.contains("STRATA_ALLOW_PLAINTEXT"),
        "names the override: {err}"
    );
    assert!(
        err.contains(&daemon.endpoint()),
        "names the endpoint: {err}"
    );

    let (code, out, err) =
        strata_tests::strata_at(&mixed, &env, &["--allow-plaintext", "status"]).await;
    assert_eq!(code, 0, "--allow-plaintext: {out}{err}");
    let env = [
        ("STRATA_TOKEN", token.as_str()),
        ("STRATA_ALLOW_PLAINTEXT", "1"),
    ];
    let (code, out, err) = strata_tests::strata_at(&mixed, &env, &["status"]).await;
    assert_eq!(code, 0, "STRATA_ALLOW_PLAINTEXT=1: {out}{err}");
}

/// `strata completion` and `strata man` come from the same clap definitions
/// the CLI parses with, and need neither a daemon nor a token.
#[tokio::test]
async fn completion_scripts_and_man_pages_cover_every_command() {
    let run = |args: &[&str]| {
        std::process::Command::new(strata_tests::strata_bin())
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let bash = run(&["completion", "bash"]);
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8(bash.stdout).unwrap();
    assert!(script.contains("_strata()"), "{script}");
    for command in [
        "tenant",
        "config",
        "service",
        "token",
        "export",
        "import",
        "audit",
        "watch",
        "completion",
        "man",
    ] {
        assert!(script.contains(command), "bash completion lacks {command}");
    }
    for shell in ["zsh", "fish"] {
        let out = run(&["completion", shell]);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{shell}: {out:?}"
        );
    }
    let bad = run(&["completion", "tcsh"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );

    let dir = tempfile::tempdir().unwrap();
    let man = run(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(man.status.success(), "{man:?}");
    for page in [
        "strata.1",
        "strata-config-put.1",
        "strata-service-register.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let put = std::fs::read_to_string(dir.path().join("strata-config-put.1")).unwrap();
    assert!(
        put.contains("expected\\-revision") || put.contains("expected-revision"),
        "{put}"
    );
}
