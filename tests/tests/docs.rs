//! Every shell block of `README.md` and `docs/*.md` runs as written.
//!
//! Each document's ```` ```sh ```` blocks run in order in one `bash`
//! (`set -euo pipefail`), in a fresh directory, against a real `stratad`
//! started there the way the README's first command starts it (data in
//! `./strata-data`, so its `admin.token` is where the docs say). What the
//! runner adapts, and nothing else:
//!
//! - the daemon listens on a free port instead of 7070: `:7070` in a block
//!   becomes that port, and `STRATA_LISTEN`/`STRATA_ENDPOINTS` point at it;
//! - `stratad`, `strata`, `strata-sidecar` and `cargo run --bin …`/
//!   `--example …` run the binaries the test command built;
//! - `curl` fails on an HTTP error (`--fail-with-body`), so a refused call
//!   fails its block.
//!
//! A document whose own blocks start `stratad` gets no daemon from the
//! runner. A block directly after `<!-- docs-test: skip — why -->` is not
//! run: only blocks that cannot run here are marked (production paths,
//! Kubernetes, systemd, Docker, an OTLP collector, commands that wait for
//! Ctrl-C or a terminal). A ```` ```text ```` block directly after
//! `<!-- docs-test: output -->` lists lines the previous block must print.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use strata_tests::{Daemon, free_port, strata_bin, stratad_bin};

/// Longest one document's blocks may take together.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What every script runs under: stop at the first failing command (also
/// inside `$(…)`), aliases as in an interactive shell, and a `curl` that
/// fails on an HTTP error status.
const PRELUDE: &str = "set -euo pipefail\nshopt -s expand_aliases inherit_errexit\n\
    curl() { command curl --fail-with-body --max-time 10 \"$@\" || return; echo; }\n";

const SKIP_MARK: &str = "<!-- docs-test: skip";
const OUTPUT_MARK: &str = "<!-- docs-test: output -->";

/// One ```` ```sh ```` block.
#[derive(Debug)]
struct Block {
    line: usize,
    code: String,
    skip: Option<String>,
    /// Lines its output must contain.
    expect: Vec<String>,
}

/// The shell blocks of a Markdown text.
fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<Block> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let info = lines[i].trim_start().strip_prefix("```").map(str::trim);
        let Some(info) = info else {
            i += 1;
            continue;
        };
        let start = i;
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            body.push(lines[i]);
            i += 1;
        }
        i += 1;
        let marker = start
            .checked_sub(1)
            .map(|j| lines[j].trim())
            .unwrap_or_default();
        let shell_like = ["bash", "shell", "console", "zsh", "shell-session"]
            .iter()
            .any(|tag| info == *tag || info.starts_with(&format!("{tag} ")))
            || (info.starts_with("sh ") || info.starts_with("sh{"));
        assert!(
            !shell_like || marker.starts_with(SKIP_MARK),
            "line {}: shell blocks are tagged `sh` (so they run), not {info:?}",
            start + 1
        );
        if info == "sh" {
            let skip = marker.strip_prefix(SKIP_MARK).map(|rest| {
                let why = rest.trim_end_matches("-->").trim().trim_start_matches('—');
                assert!(
                    !why.trim().is_empty(),
                    "line {}: a skipped block says why",
                    start + 1
                );
                why.trim().to_owned()
            });
            out.push(Block {
                line: start + 1,
                code: body.join("\n"),
                skip,
                expect: Vec::new(),
            });
        } else if info == "text" && marker == OUTPUT_MARK {
            let block = out
                .last_mut()
                .unwrap_or_else(|| panic!("line {}: output of no block", start + 1));
            block.expect = body
                .iter()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
        }
    }
    out
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// The documents whose blocks run.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

/// A directory for PATH: the built binaries under their names, and a
/// `cargo` that runs them for `cargo run --bin X` / `--example X`.
fn tools(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let stratad = stratad_bin();
    let built = stratad.parent().unwrap().to_owned();
    for name in ["stratad", "strata", "strata-sidecar"] {
        std::os::unix::fs::symlink(built.join(name), bin.join(name)).unwrap();
    }
    let cargo = format!(
        r#"#!/bin/sh
# `cargo run` in the docs runs what the test command built.
[ "$1" = run ] || {{ echo "docs test: only 'cargo run' is supported, not: cargo $*" >&2; exit 2; }}
shift
bin=; example=
while [ $# -gt 0 ]; do
  case "$1" in
    -q|--release) shift ;;
    -p) shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --example) example=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -n "$example" ]; then exec "{examples}/$example" "$@"; fi
exec "{built}/$bin" "$@"
"#,
        examples = built.join("examples").display(),
        built = built.display(),
    );
    let path = bin.join("cargo");
    std::fs::write(&path, cargo).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    assert!(strata_bin().exists(), "the strata CLI is built");
    bin
}

/// Reads a pipe to its end on its own task: a daemon a block started in
/// the background holds the pipes open after bash has exited.
fn read_all<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    pipe: Option<R>,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
        }
        bytes
    })
}

/// Runs one document's runnable blocks; panics naming the block that failed.
async fn run_document(doc: &Path, tools: &Path) -> usize {
    let text = std::fs::read_to_string(doc).unwrap();
    let name = doc.strip_prefix(repo_root()).unwrap().display().to_string();
    let runnable: Vec<Block> = blocks(&text)
        .into_iter()
        .filter(|b| b.skip.is_none())
        .collect();
    if runnable.is_empty() {
        return 0;
    }
    let work = tempfile::tempdir().unwrap();
    let starts_own_daemon = runnable.iter().any(|b| {
        b.code
            .lines()
            .any(|l| l.trim_start().starts_with("stratad "))
    });
    let (daemon, port) = if starts_own_daemon {
        (None, free_port())
    } else {
        let daemon = Daemon::builder()
            .data_dir(&work.path().join("strata-data"))
            .start()
            .await;
        let port = daemon.addr.port();
        (Some(daemon), port)
    };
    let mut script = String::from(PRELUDE);
    let mut marks = Vec::new();
    for (n, block) in runnable.iter().enumerate() {
        let code = block.code.replace(":7070", &format!(":{port}"));
        script.push_str(&format!(
            "echo '@@block {n}' >&2\n{code}\necho '@@end {n}'\n"
        ));
        marks.push((n, block));
    }
    let mut command = tokio::process::Command::new("bash");
    command
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env(
            "PATH",
            format!("{}:{}", tools.display(), std::env::var("PATH").unwrap()),
        )
        .env("STRATA_LISTEN", format!("127.0.0.1:{port}"))
        .env("STRATA_ENDPOINTS", format!("127.0.0.1:{port}"))
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so what a block starts in the background is
    // stopped with it.
    command.process_group(0);
    let mut child = command.spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let status = tokio::time::timeout(DOCUMENT_TIMEOUT, child.wait()).await;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let status = status
        .unwrap_or_else(|_| panic!("{name}: its blocks took over {DOCUMENT_TIMEOUT:?}"))
        .unwrap();
    // A process that left the group could hold the pipes; never wait on
    // them for ever.
    let pipe = |task: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .map(Result::unwrap)
            .unwrap_or_else(|_| b"(output still held open by a stray process)".to_vec())
    };
    let output = std::process::Output {
        status,
        stdout: pipe(out).await,
        stderr: pipe(err).await,
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let started = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("@@block "))
        .filter_map(|n| n.parse::<usize>().ok())
        .next_back();
    if !output.status.success() {
        let block = started.map(|n| marks[n].1);
        panic!(
            "{name}: the block at line {} failed ({}):\n{}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}{}",
            block.map_or(0, |b| b.line),
            output.status,
            block.map_or("", |b| b.code.as_str()),
            daemon
                .as_ref()
                .map(|d| format!("\n--- stratad:\n{}", d.stderr()))
                .unwrap_or_default(),
        );
    }
    for (n, block) in &marks {
        let start = format!("@@end {}", n.wrapping_sub(1));
        let from = if *n == 0 {
            0
        } else {
            stdout.find(&start).map_or(0, |i| i + start.len())
        };
        let to = stdout.find(&format!("@@end {n}")).unwrap_or(stdout.len());
        let printed = &stdout[from..to];
        for line in &block.expect {
            assert!(
                printed.contains(line.as_str()),
                "{name}: the block at line {} should print {line:?}; it printed:\n{printed}",
                block.line
            );
        }
    }
    drop(daemon);
    runnable.len()
}

#[tokio::test]
async fn every_shell_block_of_the_docs_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let tools = tools(dir.path());
    let mut ran = 0;
    let mut skipped = Vec::new();
    for doc in documents() {
        ran += run_document(&doc, &tools).await;
        let text = std::fs::read_to_string(&doc).unwrap();
        for block in blocks(&text) {
            if let Some(why) = block.skip {
                skipped.push(format!("{}:{}: {why}", doc.display(), block.line));
            }
        }
    }
    eprintln!(
        "ran {ran} blocks; skipped, as marked:\n{}",
        skipped.join("\n")
    );
    assert!(ran >= 7, "the docs have runnable blocks: ran {ran}");
}

#[test]
fn blocks_are_found_with_their_marks() {
    let text = "intro\n```sh\necho a\n```\n<!-- docs-test: output -->\n```text\na\n```\n\
                <!-- docs-test: skip — needs Kubernetes -->\n```sh\nhelm install\n```\n```toml\nx = 1\n```\n";
    let found = blocks(text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].line, found[0].code.as_str()), (2, "echo a"));
    assert_eq!(found[0].expect, ["a"]);
    assert_eq!(found[0].skip, None);
    assert_eq!(found[1].skip.as_deref(), Some("needs Kubernetes"));
}

/// Stops the dev cluster of a test, whatever happened to the test.
struct DevCluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl DevCluster {
    fn run(&self, command: &str) -> std::process::Output {
        std::process::Command::new(repo_root().join("deploy/dev-cluster.sh"))
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let out = self.run("clean");
        if !out.status.success() {
            eprintln!(
                "dev-cluster.sh clean failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An offset for the dev cluster's ports (etcd 2379/2380 + 20000/30000,
/// stratad 7071/7072) at which all of them are free now.
fn free_port_offset() -> u16 {
    let bases = [2379_u16, 2380, 22379, 22380, 32379, 32380, 7071, 7072];
    let start = u16::try_from(std::process::id() % 97).unwrap() * 300 + 1000;
    (0..50)
        .map(|i| start + i * 7)
        .find(|offset| {
            bases
                .iter()
                .all(|b| std::net::TcpListener::bind(("127.0.0.1", b + offset)).is_ok())
        })
        .expect("a free set of dev cluster ports")
}

#[test]
fn dev_cluster_prints_its_token_and_hints_that_work_as_printed() {
    if !strata_tests::etcd::etcd_available(
        "dev_cluster_prints_its_token_and_hints_that_work_as_printed",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let cluster = DevCluster {
        dir: work.path().join("cluster"),
        env: vec![
            (
                "STRATA_DEV_CLUSTER_DIR".into(),
                work.path().join("cluster").display().to_string(),
            ),
            (
                "STRATA_DEV_PORT_OFFSET".into(),
                free_port_offset().to_string(),
            ),
            ("STRATAD_BIN".into(), stratad_bin().display().to_string()),
            (
                "ETCD_BIN".into(),
                strata_tests::etcd::etcd_bin()
                    .unwrap()
                    .display()
                    .to_string(),
            ),
        ],
    };
    let started = cluster.run("start");
    let printed = String::from_utf8_lossy(&started.stdout).into_owned();
    assert!(
        started.status.success(),
        "dev-cluster.sh start failed:\n{printed}\n{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let token_file = cluster.dir.join("admin.token");
    assert!(
        printed.contains(&format!("Admin token: {}", token_file.display())),
        "{printed}"
    );
    assert!(token_file.exists(), "{printed}");
    let hints: Vec<&str> = printed
        .split("Try:\n")
        .nth(1)
        .expect("hints after `Try:`")
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .collect();
    assert!(hints.len() >= 3, "{printed}");
    let tools_dir = tempfile::tempdir().unwrap();
    let tools = tools(tools_dir.path());
    let script = format!("{PRELUDE}{}\n", hints.join("\n"));
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(repo_root())
        .env(
            "PATH",
            format!("{}:{}", tools.display(), std::env::var("PATH").unwrap()),
        )
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_ENDPOINTS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the printed hints failed:\n{script}\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The tenant created through one replica is listed by the other and by
    // the CLI.
    assert!(stdout.matches("integration").count() >= 3, "{stdout}");
    drop(cluster);
}
