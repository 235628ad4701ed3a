//! Backup and restore end to end against real `stratad` processes: export →
//! stop → wipe the data directory → start → import gives every tenant the
//! same resolved view, field origins, metadata and layer history; import
//! under a new project name; refusals (existing project, damaged file) write
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use strata_client::Connection;
use strata_client::proto::{
    ExplainRequest, GetLayerRequest, Instance, InstanceKind, ListHistoryRequest,
    ListInstancesRequest, ListTenantsRequest, RegisterRequest, ResolveRequest,
};
use strata_tests::{Daemon, strata};

/// Every key the scenario writes somewhere (history is listed per key).
const KEYS: &[&str] = &[
    "mm/server.yaml",
    "game.json",
    "flags.properties",
    "old.txt",
    "blob.bin",
];

/// Runs the CLI against `daemon` with its admin token (the harness reads
/// the daemon's token file at each call, so it follows restarts).
async fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    strata(daemon, args).await
}

/// [`cli`] that must succeed; returns stdout.
async fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let (code, out, err) = cli(daemon, args).await;
    assert_eq!(code, 0, "strata {args:?} failed: {err}{out}");
    out
}

async fn connect(daemon: &Daemon) -> Connection {
    Connection::connect(&[daemon.endpoint()], Duration::from_secs(5))
        .await
        .expect("connect")
        .with_token(&daemon.admin_token())
        .expect("token")
}

/// Everything a user can see of `project`, with revision numbers replaced by
/// their order (a restore assigns new revisions, keeping their order):
/// tenants and their metadata, each tenant's resolved values and field
/// origins, and every layer's kept history and current layer.
async fn fingerprint(conn: &Connection, project: &str) -> Vec<String> {
    let mut out = Vec::new();
    let tenants = conn
        .tenants()
        .list_tenants(ListTenantsRequest {
            project: project.into(),
        })
        .await
        .expect("list tenants")
        .into_inner()
        .tenants;
    for t in &tenants {
        let mut labels: Vec<_> = t.labels.iter().collect();
        labels.sort();
        out.push(format!(
            "tenant {} parent={:?} labels={labels:?} ttl={} expires={} fallback={} protected={} chain={:?}",
            t.name, t.parent, t.ttl_seconds, t.expires_at_unix_ms, t.fallback, t.protected, t.chain
        ));
        let values = conn
            .config()
            .resolve(ResolveRequest {
                project: project.into(),
                tenant: t.name.clone(),
                keys: vec![],
                prefixes: vec![String::new()],
            })
            .await
            .expect("resolve")
            .into_inner()
            .values;
        for v in &values {
            out.push(format!(
                "  resolved {} {:?} format={} origin={:?}",
                v.key, v.value, v.format, v.origin
            ));
            let explained = conn
                .config()
                .explain(ExplainRequest {
                    project: project.into(),
                    tenant: t.name.clone(),
                    key: v.key.clone(),
                })
                .await
                .expect("explain")
                .into_inner();
            for f in &explained.fields {
                out.push(format!("    field {} from {}", f.path, f.tenant));
            }
        }
        for key in KEYS {
            let history = conn
                .config()
                .list_history(ListHistoryRequest {
                    project: project.into(),
                    tenant: t.name.clone(),
                    key: (*key).into(),
                    limit: 0,
                })
                .await;
            let Ok(history) = history else { continue };
            let versions = history.into_inner().versions;
            // Oldest first, so the index is the version's order.
            let revisions: Vec<i64> = versions.iter().rev().map(|v| v.revision).collect();
            assert!(
                revisions.windows(2).all(|w| w[0] < w[1]),
                "{project}/{}/{key}: versions must have distinct, increasing revisions: {revisions:?}",
                t.name
            );
            for v in versions.iter().rev() {
                let order = revisions.iter().position(|r| *r == v.revision);
                let restored = if v.restored_from == 0 {
                    "-".to_owned()
                } else {
                    match revisions.iter().position(|r| *r == v.restored_from) {
                        Some(i) => format!("version {i}"),
                        None if v.restored_from < revisions[0] => "before version 0".to_owned(),
                        None => format!("unknown revision {}", v.restored_from),
                    }
                };
                out.push(format!(
                    "  history {key} #{order:?} written_at={} restored_from={restored} layer={:?}",
                    v.written_at_unix_ms,
                    v.layer
                        .as_ref()
                        .map(|l| (l.value.clone(), l.format.clone(), l.mode.clone()))
                ));
            }
            let layer = conn
                .config()
                .get_layer(GetLayerRequest {
                    project: project.into(),
                    tenant: t.name.clone(),
                    key: (*key).into(),
                })
                .await;
            if let Ok(layer) = layer {
                let layer = layer.into_inner().layer.expect("layer");
                // The layer is what its newest version wrote, at that revision.
                out.push(format!(
                    "  layer {key} {:?} {} {} written by newest version: {}",
                    layer.value,
                    layer.format,
                    layer.mode,
                    revisions.last() == Some(&layer.mod_revision)
                ));
            }
        }
        let services = ["matchmaker", "lobby"];
        for service in services {
            let instances = conn
                .registry()
                .list_instances(ListInstancesRequest {
                    project: project.into(),
                    tenant: t.name.clone(),
                    service: service.into(),
                })
                .await
                .expect("list instances")
                .into_inner()
                .instances;
            for i in instances {
                let mut endpoints: Vec<_> = i
                    .endpoints
                    .iter()
                    .map(|(k, e)| format!("{k}={}/{}", e.address, e.protocol))
                    .collect();
                endpoints.sort();
                let mut metadata: Vec<_> = i.metadata.iter().collect();
                metadata.sort();
                out.push(format!(
                    "  instance {service}/{} kind={} endpoints={endpoints:?} metadata={metadata:?} weight={} version={} check={:?} draining={}",
                    i.id, i.kind, i.weight, i.version, i.check, i.draining
                ));
            }
        }
    }
    out
}

/// Builds a realistic project `vega` and a second project `dk`.
async fn populate(d: &Daemon, dir: &Path) {
    let vega = ["--project", "vega"];
    for args in [
        vec![
            "tenant",
            "create",
            "integration",
            "--protected",
            "--label",
            "team=core",
        ],
        vec![
            "tenant",
            "create",
            "feat-1",
            "--parent",
            "integration",
            "--ttl",
            "72h",
            "--label",
            "owner=ana",
        ],
        vec!["tenant", "create", "perf", "--strict"],
        vec![
            "config",
            "put",
            "integration",
            "mm/server.yaml",
            "--value",
            "port: 7000\nreplicas: 2\nmode: ranked\n",
        ],
        vec![
            "config",
            "put",
            "integration",
            "mm/server.yaml",
            "--value",
            "port: 7000\nreplicas: 3\nmode: ranked\n",
        ],
        vec![
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"max_players\": 8, \"map\": \"dust\"}",
        ],
        vec![
            "config",
            "put",
            "integration",
            "flags.properties",
            "--value",
            "a=1\nb=2\n",
        ],
        vec![
            "config",
            "put",
            "integration",
            "old.txt",
            "--value",
            "soon gone",
        ],
        vec!["config", "delete", "integration", "old.txt"],
        vec![
            "config",
            "put",
            "feat-1",
            "mm/server.yaml",
            "--mode",
            "merge",
            "--value",
            "replicas: 1\n",
        ],
        vec![
            "config",
            "put",
            "feat-1",
            "flags.properties",
            "--mode",
            "delete",
        ],
        vec![
            "config",
            "put",
            "perf",
            "game.json",
            "--value",
            "{\"max_players\": 64}",
        ],
    ] {
        ok(d, &[&vega[..], &args[..]].concat()).await;
    }
    // A third version of game.json, then a rollback to the first.
    ok(
        d,
        &[
            "--project",
            "vega",
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"max_players\": 16}",
        ],
    )
    .await;
    let conn = connect(d).await;
    let first = conn
        .config()
        .list_history(ListHistoryRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            key: "game.json".into(),
            limit: 0,
        })
        .await
        .expect("history")
        .into_inner()
        .versions
        .last()
        .expect("a first version")
        .revision;
    ok(
        d,
        &[
            "--project",
            "vega",
            "config",
            "rollback",
            "integration",
            "game.json",
            "--to",
            &first.to_string(),
            "--yes",
        ],
    )
    .await;
    // A binary value (not UTF-8) in the branch.
    let blob = dir.join("blob.bin");
    std::fs::write(&blob, [0xff, 0x00, 0x10, 0x80]).expect("write blob");
    ok(
        d,
        &[
            "--project",
            "vega",
            "config",
            "put",
            "feat-1",
            "blob.bin",
            "--file",
            blob.to_str().expect("utf-8 path"),
            "--format",
            "binary",
        ],
    )
    .await;
    // A persistent (CD) registration is backed up; an ephemeral one is not.
    ok(
        d,
        &[
            "--project",
            "vega",
            "service",
            "register",
            "integration",
            "matchmaker",
            "--endpoint",
            "main=127.0.0.1:7000",
            "--id",
            "mm-1",
            "--meta",
            "zone=eu",
            "--version",
            "1.2.3",
            "--weight",
            "50",
        ],
    )
    .await;
    conn.registry()
        .register(RegisterRequest {
            project: "vega".into(),
            tenant: "feat-1".into(),
            service: "lobby".into(),
            instance: Some(Instance {
                id: "lobby-eph".into(),
                endpoints: [(
                    "main".to_owned(),
                    strata_client::proto::Endpoint {
                        address: "127.0.0.1:7100".into(),
                        ..Default::default()
                    },
                )]
                .into(),
                kind: InstanceKind::Ephemeral as i32,
                ttl_seconds: 60,
                ..Default::default()
            }),
            lease_id: 0,
        })
        .await
        .expect("register ephemeral");
    for args in [
        vec!["tenant", "create", "integration"],
        vec![
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"max_players\": 4}",
        ],
    ] {
        ok(d, &[&["--project", "dk"][..], &args[..]].concat()).await;
    }
}

async fn stop(mut daemon: Daemon) -> Daemon {
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(Duration::from_secs(15)).await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_wipe_import_restores_every_tenant_with_history() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = Daemon::builder().start().await;
    populate(&source, tmp.path()).await;
    let conn = connect(&source).await;
    let vega_before = fingerprint(&conn, "vega").await;
    let dk_before = fingerprint(&conn, "dk").await;
    // The scenario is what it claims: history, merge, delete and binary layers.
    let joined = vega_before.join("\n");
    for expected in [
        "history mm/server.yaml #Some(1)",
        "restored_from=version 0",
        "layer=None",
        "\"delete\"",
        "\"merge\"",
        "instance matchmaker/mm-1",
        "instance lobby/lobby-eph",
        "written by newest version: true",
    ] {
        assert!(
            joined.contains(expected),
            "scenario lacks {expected:?}:\n{joined}"
        );
    }

    let all = tmp.path().join("all.backup");
    let vega_file = tmp.path().join("vega.backup");
    let out = ok(
        &source,
        &["-o", "json", "export", "--all", "-f", all.to_str().unwrap()],
    )
    .await;
    let summary: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(summary["projects"], serde_json::json!(["dk", "vega"]));
    ok(
        &source,
        &[
            "--project",
            "vega",
            "export",
            "-f",
            vega_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!tmp.path().join("all.backup.partial").exists());
    let header = std::fs::read_to_string(&vega_file).expect("read backup");
    let first: serde_json::Value =
        serde_json::from_str(header.lines().next().expect("header")).expect("header json");
    assert_eq!(first["format"], "strata-backup");
    assert_eq!(first["version"], 1);
    assert_eq!(first["projects"], serde_json::json!(["vega"]));

    // Stop, wipe the data directory, start empty on it, import.
    let addr = source.addr;
    let data_dir = source.data_dir.clone();
    let source = stop(source).await;
    std::fs::remove_dir_all(&data_dir).expect("wipe data dir");
    let restored = Daemon::builder()
        .addr(addr)
        .data_dir(&data_dir)
        .start()
        .await;
    assert!(
        fingerprint(&connect(&restored).await, "vega")
            .await
            .is_empty(),
        "the wiped store starts empty"
    );
    let out = ok(
        &restored,
        &["-o", "json", "import", "-f", all.to_str().unwrap(), "--yes"],
    )
    .await;
    let imported: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(imported["imported"], serde_json::json!(["dk", "vega"]));
    assert_eq!(
        imported["instances"], 1,
        "only the persistent instance: {imported}"
    );

    let conn = connect(&restored).await;
    let vega_after = fingerprint(&conn, "vega").await;
    let dk_after = fingerprint(&conn, "dk").await;
    let ephemeral: Vec<&String> = vega_before
        .iter()
        .filter(|l| l.contains("lobby-eph"))
        .collect();
    let expected: Vec<String> = vega_before
        .iter()
        .filter(|l| !l.contains("lobby-eph"))
        .cloned()
        .collect();
    assert_eq!(ephemeral.len(), 1);
    assert_eq!(vega_after, expected, "vega differs after restore");
    assert_eq!(dk_after, dk_before, "dk differs after restore");

    // The restored history works: roll mm/server.yaml back to its first version.
    let versions = conn
        .config()
        .list_history(ListHistoryRequest {
            project: "vega".into(),
            tenant: "integration".into(),
            key: "mm/server.yaml".into(),
            limit: 0,
        })
        .await
        .expect("history")
        .into_inner()
        .versions;
    let oldest = versions.last().expect("versions").revision;
    ok(
        &restored,
        &[
            "--project",
            "vega",
            "config",
            "rollback",
            "integration",
            "mm/server.yaml",
            "--to",
            &oldest.to_string(),
            "--yes",
        ],
    )
    .await;
    let value = ok(
        &restored,
        &[
            "--project",
            "vega",
            "config",
            "get",
            "integration",
            "mm/server.yaml",
        ],
    )
    .await;
    assert!(value.contains("replicas: 2"), "{value}");

    // The same backup under a new name, next to the original.
    let out = ok(
        &restored,
        &[
            "-o",
            "json",
            "import",
            "-f",
            vega_file.to_str().unwrap(),
            "--as",
            "vega-copy",
            "--yes",
        ],
    )
    .await;
    assert!(out.contains("vega-copy"), "{out}");
    assert_eq!(fingerprint(&conn, "vega-copy").await, expected);

    // An existing project is refused, and nothing is written. (The store
    // revision may move: the audit log records the refused attempt.)
    let before = fingerprint(&conn, "vega").await;
    let (code, _, err) = cli(
        &restored,
        &["import", "-f", vega_file.to_str().unwrap(), "--yes"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("already has tenants"), "{err}");
    assert_eq!(
        fingerprint(&conn, "vega").await,
        before,
        "a refused import changed vega"
    );

    let restored = stop(restored).await;
    drop((source, restored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_mismatched_files_are_refused_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::builder().start().await;
    populate(&d, tmp.path()).await;
    let file = tmp.path().join("vega.backup");
    ok(
        &d,
        &["--project", "vega", "export", "-f", file.to_str().unwrap()],
    )
    .await;
    let good = std::fs::read(&file).expect("read");
    let text = String::from_utf8(good.clone()).expect("utf-8");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() * 2 / 3].to_vec(),
            "truncated",
        ),
        (
            "no end record",
            {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.pop();
                (lines.join("\n") + "\n").into_bytes()
            },
            "no end record",
        ),
        (
            "altered value",
            text.replacen("replicas: 3", "replicas: 9", 1).into_bytes(),
            "checksum",
        ),
        (
            "unknown version",
            text.replacen("\"version\":1", "\"version\":7", 1)
                .into_bytes(),
            "version 7",
        ),
        ("not a backup", b"{\"hello\":1}\n".to_vec(), "header"),
        ("empty", Vec::new(), "empty"),
    ];
    let conn = connect(&d).await;
    let vega = fingerprint(&conn, "vega").await;
    for (name, bytes, expected) in cases {
        let damaged = tmp
            .path()
            .join(format!("{}.backup", name.replace(' ', "-")));
        std::fs::write(&damaged, &bytes).expect("write");
        let (code, out, err) = cli(
            &d,
            &[
                "import",
                "-f",
                damaged.to_str().unwrap(),
                "--as",
                "vega-restored",
                "--yes",
            ],
        )
        .await;
        assert_ne!(code, 0, "{name}: accepted: {out}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains("nothing was imported"), "{name}: {err}");
        assert_eq!(fingerprint(&conn, "vega").await, vega, "{name}");
        assert!(
            fingerprint(&conn, "vega-restored").await.is_empty(),
            "{name}: wrote something"
        );
    }
    // Renaming needs a file with a single project.
    let all = tmp.path().join("all.backup");
    ok(&d, &["export", "--all", "-f", all.to_str().unwrap()]).await;
    let (code, _, err) = cli(
        &d,
        &["import", "-f", all.to_str().unwrap(), "--as", "x", "--yes"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("exactly one"), "{err}");

    // Without a terminal and without --yes, import shows the plan and refuses.
    let (code, _, err) = cli(
        &d,
        &["import", "-f", file.to_str().unwrap(), "--as", "vega-2"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("create    project vega-2 from vega"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(fingerprint(&conn, "vega-2").await.is_empty());
    // --dry-run validates and shows the plan, writing nothing.
    let (code, _, err) = cli(
        &d,
        &[
            "import",
            "-f",
            file.to_str().unwrap(),
            "--as",
            "vega-2",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("3 tenant(s): integration, feat-1, perf"),
        "{err}"
    );
    assert!(fingerprint(&conn, "vega-2").await.is_empty());

    // After all those refusals, the file imports whole under the same name
    // the damaged copies were refused under (no leftovers in the way).
    ok(
        &d,
        &[
            "import",
            "-f",
            file.to_str().unwrap(),
            "--as",
            "vega-restored",
            "--yes",
        ],
    )
    .await;
    assert_eq!(
        fingerprint(&conn, "vega-restored").await,
        fingerprint(&conn, "vega")
            .await
            .into_iter()
            .filter(|l| !l.contains("lobby-eph"))
            .collect::<Vec<_>>()
    );

    drop(stop(d).await);
}

/// A backup of the embedded store restores into an etcd-backed daemon (the
/// way from one daemon to replicas): same view, same history. On etcd every
/// import transaction must stay within its 128-operation limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backup_restores_into_an_etcd_backed_daemon() {
    if !strata_tests::etcd::etcd_available("embedded_backup_restores_into_an_etcd_backed_daemon") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = Daemon::builder().start().await;
    populate(&source, tmp.path()).await;
    // Many keys in one tenant: many staging transactions, one flip.
    let dir = tmp.path().join("many");
    for i in 0..120 {
        let path = dir.join(format!("k{i:03}.json"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(path, format!("{{\"i\": {i}}}")).expect("write");
    }
    ok(
        &source,
        &[
            "--project",
            "vega",
            "config",
            "apply",
            "-f",
            dir.to_str().unwrap(),
            "--tenant",
            "perf",
            "--yes",
        ],
    )
    .await;
    let expected: Vec<String> = fingerprint(&connect(&source).await, "vega")
        .await
        .into_iter()
        .filter(|l| !l.contains("lobby-eph"))
        .collect();
    let file = tmp.path().join("all.backup");
    ok(&source, &["export", "--all", "-f", file.to_str().unwrap()]).await;
    drop(stop(source).await);

    let etcd = strata_tests::etcd::EtcdCluster::start(1).await;
    let target = Daemon::builder()
        .args(["--etcd-endpoints", &etcd.endpoints_arg()])
        .env("STRATA_ETCD_PREFIX", "/backup-test/")
        .start()
        .await;
    ok(&target, &["import", "-f", file.to_str().unwrap(), "--yes"]).await;
    let conn = connect(&target).await;
    assert_eq!(fingerprint(&conn, "vega").await, expected);
    let listed = ok(
        &target,
        &["--project", "vega", "-o", "json", "config", "list", "perf"],
    )
    .await;
    assert!(listed.contains("k119.json"), "{listed}");
    drop(stop(target).await);
    drop(etcd);
}

/// Finding 8 of the security review: `strata export` wrote `FILE.partial` with
/// `File::create`, which follows a symlink planted there (the target was
/// overwritten with the backup), and with the umask's mode (0644: the
/// whole store readable by every local user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_export_partial_file_is_private_and_not_a_symlink_target_finding_8() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::builder().start().await;
    ok(
        &d,
        &["--project", "vega", "tenant", "create", "integration"],
    )
    .await;
    ok(
        &d,
        &[
            "--project",
            "vega",
            "config",
            "put",
            "integration",
            "game.json",
            "--value",
            "{\"secret\":1}",
        ],
    )
    .await;

    // A fresh export is 0600 (the test process's umask, 022, as it is).
    let file = tmp.path().join("vega.backup");
    ok(
        &d,
        &["--project", "vega", "export", "-f", file.to_str().unwrap()],
    )
    .await;
    let mode = std::fs::metadata(&file)
        .expect("backup")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "backup file mode {mode:o}");

    // A symlink planted at FILE.partial is not followed.
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, b"precious").expect("victim");
    let target = tmp.path().join("other.backup");
    let partial = tmp.path().join("other.backup.partial");
    std::os::unix::fs::symlink(&victim, &partial).expect("symlink");
    let (code, out, err) = cli(
        &d,
        &[
            "--project",
            "vega",
            "export",
            "-f",
            target.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    assert_ne!(
        code, 0,
        "export through a planted link succeeded: {out}{err}"
    );
    assert!(
        err.contains("other.backup.partial") && err.contains("already exists"),
        "{err}"
    );
    assert!(!target.exists(), "no backup without its partial file");
    assert!(
        std::fs::symlink_metadata(&partial)
            .expect("left alone")
            .file_type()
            .is_symlink(),
        "someone else's file is left where it was"
    );
}
