//! A real etcd cluster for tests: `N` members of the Debian `etcd` binary
//! on free loopback ports, each with its own data directory, that can be
//! stopped, killed and restarted one by one.
//!
//! Every member is killed when the [`EtcdCluster`] drops. A cluster kept in
//! a `static` (one per test binary) is never dropped, so each cluster also
//! starts a small janitor shell that waits for the test process to go away
//! (its stdin pipe closes) and then kills the members and removes the data
//! directories: no etcd outlives the test binary, however it ends.
//!
//! Without the `etcd` binary, [`etcd_available`] fails loudly under CI (the
//! `CI` variable is set) and otherwise tells the caller to skip, after
//! printing why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{free_port, http_request};

/// Where the Debian `etcd-server` package installs the binary.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a starting member may take to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd binary: `$ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on `PATH`.
pub fn etcd_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        // Named explicitly: that one or none.
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let default = PathBuf::from(DEFAULT_ETCD_BIN);
    if default.exists() {
        return Some(default);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// Whether a test that needs etcd can run. When the binary is missing this
/// panics if `CI` is set (a CI run must never skip silently), and otherwise
/// prints a loud message naming `test` and returns false so it can skip.
pub fn etcd_available(test: &str) -> bool {
    if etcd_bin().is_some() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !ci,
        "etcd not found ({DEFAULT_ETCD_BIN}, $ETCD_BIN or PATH) and CI is set: install the \
         Debian package etcd-server (./scripts/test.sh does) instead of skipping {test}"
    );
    // Straight to the stderr stream: libtest swallows `eprintln!` output of
    // passing tests, and this must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED {test}: etcd not found ({DEFAULT_ETCD_BIN}, $ETCD_BIN or PATH); \
         install etcd-server (./scripts/test.sh does) to run it !!!!!\n"
    );
    false
}

/// Certificates for a TLS test cluster, made by [`TestCerts::generate`].
#[derive(Clone, Debug)]
pub struct TestCerts {
    /// The CA that signed both certificates (PEM).
    pub ca: PathBuf,
    /// The members' server certificate, valid for 127.0.0.1 and localhost.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (CN `strata`) for `--client-cert-auth`.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TestCerts {
    /// Makes a CA, a server and a client certificate in `dir` with the
    /// `openssl` command.
    pub fn generate(dir: &Path) -> Self {
        let certs = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let ca_key = dir.join("ca-key.pem");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p = |path: &Path| path.to_str().expect("utf-8 temp path").to_owned();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=strata-test-ca",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&certs.ca),
        ]);
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write openssl extensions");
        let client_ext = dir.join("client.ext");
        std::fs::write(&client_ext, "extendedKeyUsage=clientAuth\n").expect("write extensions");
        for (cn, cert, key, ext) in [
            ("127.0.0.1", &certs.server_cert, &certs.server_key, &ext),
            ("strata", &certs.client_cert, &certs.client_key, &client_ext),
        ] {
            let csr = dir.join(format!("{cn}.csr"));
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &p(key),
                "-out",
                &p(&csr),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&csr),
                "-CA",
                &p(&certs.ca),
                "-CAkey",
                &p(&ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(ext),
                "-out",
                &p(cert),
            ]);
        }
        certs
    }
}

/// Timing and extra flags for the members.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout (leader loss is noticed after about this long).
    pub election_timeout: Duration,
    /// Serve clients over TLS with these certificates and require client
    /// certificates; client URLs become `https://`.
    pub tls: Option<TestCerts>,
    /// Extra flags for every member.
    pub extra_args: Vec<String>,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        // Twice as fast as etcd's defaults (100 ms / 1 s): failover tests
        // finish sooner, yet a loaded two-core machine does not trigger
        // spurious elections.
        Self {
            heartbeat: Duration::from_millis(50),
            election_timeout: Duration::from_millis(500),
            tls: None,
            extra_args: Vec::new(),
        }
    }
}

struct Member {
    name: String,
    scheme: &'static str,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients need TLS.
    metrics_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn metrics_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd cluster (see the module documentation).
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    settings: EtcdSettings,
    bin: PathBuf,
    janitor: Option<(Child, ChildStdin)>,
    // Last: removed after every member is gone.
    dir: TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A temporary directory on tmpfs when there is one: etcd fsyncs every
/// commit, and on tmpfs that costs nothing, which keeps tests fast.
fn temp_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("strata-etcd-")
            .tempdir_in(shm)
    {
        return dir;
    }
    tempfile::Builder::new()
        .prefix("strata-etcd-")
        .tempdir()
        .expect("temporary directory for etcd")
}

const JANITOR: &str = r#"
# Runs until the test process closes our stdin (it exited, or dropped the
# cluster), then kills whatever members are still recorded and cleans up.
cat >/dev/null
for f in "$1"/*.pid; do
  [ -e "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null
done
for _ in 1 2 3 4 5 6 7 8 9 10; do
  rm -rf "$1" 2>/dev/null && [ ! -e "$1" ] && exit 0
  sleep 0.2
done
"#;

impl EtcdCluster {
    /// Starts `members` members with default settings and waits until every
    /// one reports healthy. Panics when etcd is missing or does not start.
    pub async fn start(members: usize) -> Self {
        Self::start_with(members, EtcdSettings::default()).await
    }

    /// Starts a cluster with these settings.
    pub async fn start_with(members: usize, settings: EtcdSettings) -> Self {
        assert!(members >= 1, "an etcd cluster needs at least one member");
        let bin = etcd_bin().expect("etcd binary (check etcd_available first)");
        let dir = temp_dir();
        let mut janitor = Command::new("sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("janitor")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the etcd janitor shell");
        let stdin = janitor.stdin.take().expect("janitor stdin");
        let members: Vec<Member> = (0..members)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    scheme: if settings.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    },
                    client_port: free_port(),
                    peer_port: free_port(),
                    metrics_port: free_port(),
                    data_dir: dir.path().join(format!("{name}.etcd")),
                    log: dir.path().join(format!("{name}.log")),
                    pid_file: dir.path().join(format!("{name}.pid")),
                    name,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "strata-test-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = Self {
            members,
            initial_cluster,
            token,
            settings,
            bin,
            janitor: Some((janitor, stdin)),
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i, START_TIMEOUT).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let err = log.try_clone().expect("etcd log file");
        let heartbeat = self.settings.heartbeat.as_millis().to_string();
        let election = self.settings.election_timeout.as_millis().to_string();
        let mut command = Command::new(&self.bin);
        if let Some(tls) = &self.settings.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args([
                "--listen-metrics-urls",
                &format!("http://{}", m.metrics_addr()),
            ])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .args(["--heartbeat-interval", &heartbeat])
            .args(["--election-timeout", &election])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.settings.extra_args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn etcd");
        std::fs::write(&m.pid_file, child.id().to_string()).expect("etcd pid file");
        self.members[i].child = Some(child);
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// The members' endpoints joined with commas, as `--etcd-endpoints` takes them.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Whether member `i` is running (not stopped or killed, not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Process id of member `i`, when running.
    pub fn pid(&self, i: usize) -> Option<Pid> {
        self.members[i]
            .child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// The tail of member `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn reap(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.members[i].pid_file);
    }

    /// SIGKILLs member `i` (no chance to flush or say goodbye).
    pub fn kill(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.reap(i);
    }

    /// SIGTERMs member `i` and waits for it to exit (SIGKILL after 10 s).
    pub async fn stop(&mut self, i: usize) {
        let Some(pid) = self.pid(i) else {
            return;
        };
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_running(i) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.is_running(i) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.reap(i);
    }

    /// Starts member `i` again on its ports and data directory (after
    /// [`stop`](Self::stop) or [`kill`](Self::kill)) and waits until healthy.
    pub async fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "member {i} is still running");
        self.reap(i);
        self.spawn(i, "existing");
        self.wait_healthy(i, START_TIMEOUT).await;
    }

    /// Waits until member `i` answers `/health` with `true` (it is part of
    /// a cluster with a leader); panics with its log after `timeout`.
    pub async fn wait_healthy(&mut self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let addr = self.members[i].metrics_addr();
        loop {
            if let Some(child) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "etcd member {i} exited with {status} while starting; log:\n{}",
                    self.log_tail(i)
                );
            }
            if let Ok((200, body)) = http_request(addr, "GET", "/health", &[], b"").await
                && body.contains("\"health\":\"true\"")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} not healthy after {timeout:?}; log:\n{}",
                self.log_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of the member that currently leads (by each running member's
    /// own `etcd_server_is_leader` metric); `None` when none does.
    pub async fn leader(&mut self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                continue;
            }
            let addr = self.members[i].metrics_addr();
            if let Ok((200, body)) = http_request(addr, "GET", "/metrics", &[], b"").await
                && body.lines().any(|l| l.trim() == "etcd_server_is_leader 1")
            {
                return Some(i);
            }
        }
        None
    }

    /// Waits until some running member leads; panics after `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if let Some((mut janitor, mut stdin)) = self.janitor.take() {
            // Every pid file is gone, so the janitor only removes the
            // directory (TempDir's drop would too).
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = janitor.wait();
        }
    }
}
