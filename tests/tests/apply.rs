//! Plan before apply, end to end with the `strata` binary against a real
//! `stratad`: `config apply -f DIR` shows create/update/delete/unchanged,
//! refuses without a terminal unless `--yes`, syncs, is a no-op when run
//! again, prunes on request; `tenant delete` shows what it removes before
//! refusing or deleting.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::path::Path;
use std::time::Duration;

use strata_tests::{Daemon, strata};

/// Runs the CLI in project `vega` (stdin is not a terminal; the harness
/// sends the daemon's admin token): (code, stdout, stderr).
async fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    strata(daemon, &[&["--project", "vega"][..], args].concat()).await
}

async fn ok(daemon: &Daemon, args: &[&str]) -> (String, String) {
    let (code, out, err) = cli(daemon, args).await;
    assert_eq!(code, 0, "strata {args:?} failed: {err}{out}");
    (out, err)
}

async fn revision(daemon: &Daemon) -> i64 {
    let (out, _) = ok(daemon, &["-o", "json", "status"]).await;
    serde_json::from_str::<serde_json::Value>(&out).expect("json")["revision"]
        .as_i64()
        .expect("revision")
}

/// The tenant's resolved keys with the tenant that supplied each.
async fn resolved(daemon: &Daemon, tenant: &str) -> Vec<(String, String)> {
    let (out, _) = ok(daemon, &["-o", "json", "config", "list", tenant]).await;
    let values: serde_json::Value = serde_json::from_str(&out).expect("json");
    values
        .as_array()
        .expect("array")
        .iter()
        .map(|v| {
            (
                v["key"].as_str().unwrap().to_owned(),
                v["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn write(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_shows_the_plan_refuses_without_yes_syncs_and_prunes() {
    let d = Daemon::builder().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("integration");
    write(&dir, "mm/server.yaml", "port: 7000\nreplicas: 2\n");
    write(&dir, "game.json", "{\"max_players\": 8}");
    write(&dir, "flags.properties", "a=1\n");
    write(&dir, "notes.txt", "hello");
    write(&dir, ".git/config", "[core]\n"); // hidden: skipped
    let dir_arg = dir.to_str().unwrap();
    ok(&d, &["tenant", "create", "integration"]).await;
    ok(
        &d,
        &["tenant", "create", "feat-1", "--parent", "integration"],
    )
    .await;
    ok(
        &d,
        &[
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"max_players\": 4}",
        ],
    )
    .await;

    // Without a terminal and without --yes: the plan, then a refusal.
    let before = revision(&d).await;
    let (code, _, err) = cli(
        &d,
        &["config", "apply", "-f", dir_arg, "--tenant", "integration"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    for line in [
        "+ create    flags.properties (properties)",
        "+ create    mm/server.yaml (yaml)",
        "+ create    notes.txt (text)",
        "~ update    game.json",
        "Plan: 3 to create, 1 to update, 0 to delete, 0 unchanged.",
        "stdin is not a terminal",
        "--yes",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert!(!err.contains(".git"), "{err}");
    assert_eq!(
        revision(&d).await,
        before,
        "a refused apply wrote something"
    );

    // With --yes it applies.
    let (out, _) = ok(
        &d,
        &[
            "-o",
            "json",
            "config",
            "apply",
            "-f",
            dir_arg,
            "--tenant",
            "integration",
            "--yes",
        ],
    )
    .await;
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["created"], 3, "{done}");
    assert_eq!(done["updated"], 1, "{done}");
    assert_eq!(
        resolved(&d, "integration").await,
        [
            ("flags.properties".to_owned(), "a=1\n".to_owned()),
            ("game.json".to_owned(), "{\"max_players\": 8}".to_owned()),
            (
                "mm/server.yaml".to_owned(),
                "port: 7000\nreplicas: 2\n".to_owned()
            ),
            ("notes.txt".to_owned(), "hello".to_owned()),
        ]
    );

    // Running it again changes nothing and needs no confirmation.
    let before = revision(&d).await;
    let (_, err) = ok(
        &d,
        &["config", "apply", "-f", dir_arg, "--tenant", "integration"],
    )
    .await;
    assert!(
        err.contains("Plan: 0 to create, 0 to update, 0 to delete, 4 unchanged."),
        "{err}"
    );
    assert_eq!(revision(&d).await, before);

    // Change a file, remove one, and have a key written outside the directory.
    write(&dir, "game.json", "{\"max_players\": 12}");
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    ok(
        &d,
        &[
            "config",
            "put",
            "integration",
            "extra.json",
            "--value",
            "{}",
        ],
    )
    .await;
    // Without --prune, keys without a file stay.
    let (_, err) = ok(
        &d,
        &[
            "config",
            "apply",
            "-f",
            dir_arg,
            "--tenant",
            "integration",
            "--dry-run",
        ],
    )
    .await;
    assert!(err.contains("~ update    game.json"), "{err}");
    assert!(!err.contains("delete    "), "{err}");
    // With --prune, they are planned for deletion; --dry-run writes nothing.
    let before = revision(&d).await;
    let (_, err) = ok(
        &d,
        &[
            "config",
            "apply",
            "-f",
            dir_arg,
            "--tenant",
            "integration",
            "--prune",
            "--dry-run",
        ],
    )
    .await;
    for line in [
        "~ update    game.json",
        "- delete    extra.json",
        "- delete    notes.txt",
        "Plan: 0 to create, 1 to update, 2 to delete, 2 unchanged.",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert_eq!(revision(&d).await, before);
    ok(
        &d,
        &[
            "config",
            "apply",
            "-f",
            dir_arg,
            "--tenant",
            "integration",
            "--prune",
            "--yes",
        ],
    )
    .await;
    assert_eq!(
        resolved(&d, "integration").await,
        [
            ("flags.properties".to_owned(), "a=1\n".to_owned()),
            ("game.json".to_owned(), "{\"max_players\": 12}".to_owned()),
            (
                "mm/server.yaml".to_owned(),
                "port: 7000\nreplicas: 2\n".to_owned()
            ),
        ]
    );

    // Applying into the child only touches the child's own layers: a file
    // equal to the inherited value is still a layer of its own to create.
    let child = tmp.path().join("feat-1");
    write(&child, "game.json", "{\"max_players\": 2}");
    let (_, err) = ok(
        &d,
        &[
            "config",
            "apply",
            "-f",
            child.to_str().unwrap(),
            "--tenant",
            "feat-1",
            "--prune",
            "--yes",
        ],
    )
    .await;
    // The inherited keys are not the child's layers, so prune leaves them.
    assert!(
        err.contains("Plan: 1 to create, 0 to update, 0 to delete, 0 unchanged."),
        "{err}"
    );
    let child_view = resolved(&d, "feat-1").await;
    assert!(child_view.contains(&("game.json".to_owned(), "{\"max_players\": 2}".to_owned())));
    assert!(
        child_view.iter().any(|(k, _)| k == "mm/server.yaml"),
        "{child_view:?}"
    );

    // A file name that cannot be a key is refused before anything is written.
    write(&dir, "bad name.json", "{}");
    let before = revision(&d).await;
    let (code, _, err) = cli(
        &d,
        &[
            "config",
            "apply",
            "-f",
            dir_arg,
            "--tenant",
            "integration",
            "--yes",
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad name.json"), "{err}");
    assert_eq!(revision(&d).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_delete_and_rollback_show_the_plan_before_refusing_or_applying() {
    let d = Daemon::builder().start().await;
    ok(&d, &["tenant", "create", "integration"]).await;
    ok(
        &d,
        &["tenant", "create", "feat-1", "--parent", "integration"],
    )
    .await;
    ok(&d, &["tenant", "create", "feat-2", "--parent", "feat-1"]).await;
    ok(
        &d,
        &["config", "put", "feat-1", "a.json", "--value", "{\"a\": 1}"],
    )
    .await;
    ok(
        &d,
        &["config", "put", "feat-1", "b.json", "--value", "{\"b\": 1}"],
    )
    .await;
    ok(
        &d,
        &["config", "put", "feat-2", "a.json", "--value", "{\"a\": 2}"],
    )
    .await;

    let before = revision(&d).await;
    let (code, _, err) = cli(&d, &["tenant", "delete", "feat-1", "--force"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("Deleting tenant feat-1 and its descendants removes:"),
        "{err}"
    );
    assert!(err.contains("tenant feat-1: 2 config key(s)"), "{err}");
    assert!(err.contains("tenant feat-2: 1 config key(s)"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(
        revision(&d).await,
        before,
        "a refused delete changed something"
    );
    let (listed, _) = ok(&d, &["-o", "json", "tenant", "list"]).await;
    assert!(listed.contains("feat-2"), "{listed}");

    // Rollback shows the layer now and what it becomes.
    let (out, _) = ok(
        &d,
        &[
            "-o",
            "json",
            "config",
            "put",
            "feat-1",
            "a.json",
            "--value",
            "{\"a\": 3}",
        ],
    )
    .await;
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (out, _) = ok(&d, &["-o", "json", "config", "history", "feat-1", "a.json"]).await;
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = history.as_array().unwrap().last().unwrap()["revision"]
        .as_i64()
        .unwrap();
    let before = revision(&d).await;
    let (code, _, err) = cli(
        &d,
        &[
            "config",
            "rollback",
            "feat-1",
            "a.json",
            "--to",
            &first.to_string(),
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "~ update    a.json (now replace json at revision {}; becomes the version of revision {first}",
            second["revision"]
        )),
        "{err}"
    );
    assert_eq!(revision(&d).await, before);
    ok(
        &d,
        &[
            "config",
            "rollback",
            "feat-1",
            "a.json",
            "--to",
            &first.to_string(),
            "--yes",
        ],
    )
    .await;
    let (value, _) = ok(&d, &["config", "get", "feat-1", "a.json"]).await;
    assert_eq!(value.trim(), "{\"a\": 1}");

    let (_, err) = ok(&d, &["tenant", "delete", "feat-1", "--force", "--yes"]).await;
    assert!(err.contains("tenant feat-2: 1 config key(s)"), "{err}");
}

/// With a terminal (a pseudo-terminal from util-linux `script`), apply asks;
/// a layer changed by someone else between the plan and the answer makes the
/// apply stop with a clear error instead of overwriting that change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_between_plan_and_confirmation_is_not_overwritten() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: util-linux `script` (for a pseudo-terminal) is not installed");
        return;
    }
    let d = Daemon::builder().start().await;
    ok(&d, &["tenant", "create", "integration"]).await;
    ok(
        &d,
        &[
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"v\": 1}",
        ],
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("integration");
    write(&dir, "game.json", "{\"v\": 2}");
    write(&dir, "new.json", "{}");

    let command = format!(
        "{} --endpoints {} --project vega config apply -f {} --tenant integration",
        strata_tests::strata_bin().display(),
        d.endpoint(),
        dir.display()
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env_clear()
        .env("STRATA_TOKEN", d.admin_token())
        .env("TERM", "dumb")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn script");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let prompt = "Do you want to apply these changes to tenant integration? [y/N]";
    tokio::time::timeout(Duration::from_secs(20), async {
        while !String::from_utf8_lossy(&seen).contains(prompt) {
            let mut buf = [0u8; 4096];
            let n = stdout.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "ended before asking: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no prompt: {}", String::from_utf8_lossy(&seen)));
    let shown = String::from_utf8_lossy(&seen).into_owned();
    assert!(shown.contains("~ update    game.json"), "{shown}");
    assert!(shown.contains("+ create    new.json"), "{shown}");

    // Someone else changes the layer while the plan waits for an answer.
    ok(
        &d,
        &[
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"v\": 3}",
        ],
    )
    .await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"y\n").await.unwrap();
    stdin.flush().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stdout.read_to_end(&mut rest))
        .await
        .expect("apply should finish")
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("script exits")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(status.code(), Some(1), "{rest}");
    assert!(rest.contains("game.json"), "{rest}");
    assert!(rest.contains("changed since the plan"), "{rest}");
    // The other writer's value stands; nothing after the failed step ran
    // (game.json sorts before new.json).
    let (value, _) = ok(&d, &["config", "get", "integration", "game.json"]).await;
    assert_eq!(value.trim(), "{\"v\": 3}");
    let (code, _, _) = cli(&d, &["config", "get", "integration", "new.json"]).await;
    assert_ne!(code, 0, "new.json must not have been written");
}
