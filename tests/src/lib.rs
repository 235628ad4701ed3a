//! Test harness shared by the end-to-end tests in `tests/tests/`: starting
//! real `stratad` processes on free loopback ports with temporary data
//! directories, talking to them over real sockets, and stopping them with
//! signals. Every process a test starts is killed when its handle drops.
//!
//! Daemons run with authentication on, as in production: the harness reads
//! the admin token each daemon writes on first start ([`Daemon::admin_token`])
//! and its helpers send it — [`strata`] as `STRATA_TOKEN`, the `http_*`
//! helpers as `authorization: Bearer …`, [`Daemon::channel`] on every gRPC
//! call. Replicas over one etcd cluster share one admin token file.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test harness: failing loudly is the point

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub mod etcd;
pub mod sidecar;

pub use strata_client::{AuthChannel, BearerToken};

/// Admin token file of every daemon started by this process, by address,
/// so that the address-based helpers ([`http_request`], [`strata`]) find
/// the token of the daemon they talk to.
static TOKEN_FILES: LazyLock<Mutex<HashMap<SocketAddr, PathBuf>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Admin token files shared by replicas of one etcd cluster and prefix
/// (only the replica that bootstraps the store writes it), in a directory
/// that lives as long as the test process.
static SHARED_TOKEN_FILES: LazyLock<Mutex<(TempDir, HashMap<String, PathBuf>)>> =
    LazyLock::new(|| Mutex::new((tempfile::tempdir().expect("tempdir"), HashMap::new())));

/// The admin token of the daemon at `addr`, when it has one (not with
/// `--auth=off`, not for daemons this process did not start).
pub fn token_for(addr: SocketAddr) -> Option<String> {
    let path = TOKEN_FILES.lock().unwrap().get(&addr).cloned()?;
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// Path of the `stratad` binary under test: `$STRATAD_BIN`, else the one
/// cargo built next to this test binary (`target/<profile>/stratad`).
pub fn stratad_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATAD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> dir");
    let bin = profile_dir.join("stratad");
    assert!(
        bin.exists(),
        "stratad binary not found at {}: build it first with `cargo build --workspace --bins` \
         (the README's test command does this) or set STRATAD_BIN",
        bin.display()
    );
    bin
}

/// Path of the `strata` CLI binary, built next to `stratad`.
pub fn strata_bin() -> PathBuf {
    stratad_bin().with_file_name("strata")
}

/// Runs the `strata` CLI against `daemon` with `args`, sending the
/// daemon's admin token: (exit code, stdout, stderr).
pub async fn strata(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    let token = token_for(daemon.addr);
    let env: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| ("STRATA_TOKEN", t))
        .into_iter()
        .collect();
    strata_at(&daemon.endpoint(), &env, args).await
}

/// Runs the `strata` CLI with `--endpoints endpoint` and `args`, with only
/// `env` in its environment, for at most 30 s: (exit code, stdout, stderr).
pub async fn strata_at(
    endpoint: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(strata_bin())
            .arg("--endpoints")
            .arg(endpoint)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("strata should finish")
    .expect("run strata");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `stratad` child process.
pub struct Daemon {
    child: Child,
    /// Address it serves gRPC and HTTP on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Where it writes (or wrote) the admin token on first start.
    pub admin_token_file: PathBuf,
    stderr: Arc<Mutex<String>>,
    _tmp: Option<TempDir>,
    _config: Option<TempDir>,
}

/// How to start a daemon.
#[derive(Default)]
pub struct DaemonBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    addr: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
    config: Option<String>,
}

impl DaemonBuilder {
    /// Starts the daemon with this configuration file (`--config`), written
    /// to a temporary directory that lives as long as the daemon.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_owned());
        self
    }

    /// Listens on this address instead of a fresh free port (to restart a
    /// daemon where its clients expect it).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Adds command-line arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Uses this data directory instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    /// Writes the admin token of first start to `path` instead of
    /// `<data-dir>/admin.token`.
    pub fn admin_token_file(mut self, path: &Path) -> Self {
        self.admin_token_file = Some(path.to_owned());
        self
    }

    /// The value of `--name X`/`--name=X` among the arguments, else of the
    /// environment variable `env`.
    fn setting(&self, flag: &str, env: &str) -> Option<String> {
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            if arg == flag {
                return args.next().cloned();
            }
            if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                return Some(v.to_owned());
            }
        }
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == env)
            .map(|(_, v)| v.clone())
    }

    /// The admin token file: as given, else one shared by every replica of
    /// the same etcd cluster and prefix, else `<data-dir>/admin.token`.
    fn token_file(&self, data_dir: &Path) -> PathBuf {
        if let Some(path) = &self.admin_token_file {
            return path.clone();
        }
        if let Some(path) = self.setting("--admin-token-file", "STRATA_ADMIN_TOKEN_FILE") {
            return PathBuf::from(path);
        }
        if let Some(endpoints) = self.setting("--etcd-endpoints", "STRATA_ETCD_ENDPOINTS") {
            let mut members: Vec<&str> = endpoints.split(',').map(str::trim).collect();
            members.sort_unstable();
            let prefix = self
                .setting("--etcd-prefix", "STRATA_ETCD_PREFIX")
                .unwrap_or_default();
            let key = format!("{}|{prefix}", members.join(","));
            let mut shared = SHARED_TOKEN_FILES.lock().unwrap();
            let n = shared.1.len();
            let dir = shared.0.path().to_owned();
            return shared
                .1
                .entry(key)
                .or_insert_with(|| dir.join(format!("admin-{n}.token")))
                .clone();
        }
        data_dir.join("admin.token")
    }

    /// Spawns the daemon without waiting for readiness.
    pub fn spawn(self) -> Daemon {
        let (tmp, data_dir) = match self.data_dir.clone() {
            Some(dir) => (None, dir),
            None => {
                let tmp = tempfile::tempdir().expect("tempdir");
                let dir = tmp.path().join("data");
                (Some(tmp), dir)
            }
        };
        let addr: SocketAddr = self
            .addr
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let admin_token_file = self.token_file(&data_dir);
        let config = self.config.as_ref().map(|text| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("stratad.toml");
            std::fs::write(&path, text).expect("write the configuration file");
            (dir, path)
        });
        TOKEN_FILES
            .lock()
            .unwrap()
            .insert(addr, admin_token_file.clone());
        let mut command = Command::new(stratad_bin());
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            // stratad's default is <data-dir>/admin.token; only other
            // places are passed, so the default stays covered.
            .args(
                (admin_token_file != data_dir.join("admin.token"))
                    .then(|| ["--admin-token-file".as_ref(), admin_token_file.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(
                config
                    .iter()
                    .flat_map(|(_, path)| ["--config".as_ref(), path.as_os_str()]),
            )
            .args(&self.args)
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn stratad");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Daemon {
            child,
            addr,
            data_dir,
            admin_token_file,
            stderr,
            _tmp: tmp,
            _config: config.map(|(dir, _)| dir),
        }
    }

    /// Spawns the daemon and waits until `/readyz` answers 200.
    pub async fn start(self) -> Daemon {
        let mut daemon = self.spawn();
        daemon.wait_ready(Duration::from_secs(20)).await;
        daemon
    }
}

impl Daemon {
    /// A builder for a daemon on a fresh port and temporary data dir.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// Starts a daemon with defaults and waits for readiness.
    pub async fn start() -> Daemon {
        Self::builder().start().await
    }

    /// The admin token (valid for every project) this daemon — or the
    /// replica that bootstrapped its store — wrote on first start. Panics
    /// when there is none (a daemon with `--auth=off`).
    pub fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(&self.admin_token_file).unwrap_or_else(|e| {
            panic!(
                "no admin token at {}: {e}; stderr:\n{}",
                self.admin_token_file.display(),
                self.stderr()
            )
        });
        text.trim().to_owned()
    }

    /// A gRPC channel to this daemon whose calls carry the admin token
    /// (none with `--auth=off`): `XServiceClient::new(daemon.channel().await)`.
    pub async fn channel(&self) -> AuthChannel {
        self.channel_as(token_for(self.addr).as_deref()).await
    }

    /// A gRPC channel to this daemon whose calls carry `token` (or none).
    pub async fn channel_as(&self, token: Option<&str>) -> AuthChannel {
        let channel = tonic::transport::Channel::from_shared(self.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr));
        let token = match token {
            Some(t) => BearerToken::new(t).expect("token is a header value"),
            None => BearerToken::none(),
        };
        AuthChannel::new(channel, token)
    }

    /// `http://127.0.0.1:<port>`, for gRPC channels.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("running child")).unwrap())
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("send signal");
    }

    /// Polls `/readyz` until it answers 200; panics with the daemon's stderr
    /// when it exits or the timeout passes.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let stderr = Arc::clone(&self.stderr);
        poll_ready(&mut self.child, self.addr, "stratad", timeout, || {
            stderr.lock().unwrap().clone()
        })
        .await;
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for stratad"),
            Err(_) => panic!(
                "stratad still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Waits for the stderr reader to reach end of file (after exit).
    pub async fn final_stderr(&self) -> String {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.stderr()
    }
}

/// Runs `stratad` with `args` to completion (for startup failures) and
/// returns its exit status and stderr.
pub async fn run_stratad(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(stratad_bin())
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("stratad should exit on its own")
    .expect("run stratad");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"").await
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
/// Sends the admin token of the daemon at `addr` unless `headers` has an
/// `authorization` header already.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let has_auth = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
    let bearer = (!has_auth)
        .then(|| token_for(addr))
        .flatten()
        .map(|t| format!("Bearer {t}"));
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(b) = &bearer {
        all.push(("authorization", b));
    }
    http_request_as(addr, method, path, &all, body).await
}

/// [`http_request`] sending exactly `headers` (no token unless given).
pub async fn http_request_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timeout"))??;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    strata_testkit::http::response(&String::from_utf8_lossy(&raw))
}

/// An HTTP request whose answer is JSON: (status, parsed body). Panics when
/// the body is not JSON (every Strata API answer, errors included, is).
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) = http_request(addr, method, path, &[], body.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text:?}"));
    (status, json)
}

/// [`http_json`] that must succeed (2xx); returns the body.
pub async fn http_ok(addr: SocketAddr, method: &str, path: &str, body: &str) -> serde_json::Value {
    let (status, json) = http_json(addr, method, path, body).await;
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status} {json}"
    );
    json
}

/// Polls `addr`'s `/readyz` until it answers 200; panics with `stderr()`
/// when `child` exits or `timeout` passes. Shared by the process helpers.
pub(crate) async fn poll_ready(
    child: &mut Child,
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
    stderr: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited early with {status}; stderr:\n{}", stderr());
        }
        if let Ok((200, _)) = http_get(addr, "/readyz").await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready after {timeout:?}; stderr:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
