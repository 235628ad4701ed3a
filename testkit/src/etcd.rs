//! A real etcd cluster: `N` members of the Debian `etcd` binary on free
//! loopback ports, each with its own data directory, that can be stopped,
//! killed and restarted one by one. The end-to-end tests and `etcd-bench`
//! both start their clusters here.
//!
//! Every member is killed when the [`EtcdCluster`] drops. A cluster kept in
//! a `static` (one per test binary) is never dropped, and a load generator
//! may be killed, so each cluster also starts a small janitor shell that
//! waits for the starting process to go away (its stdin pipe closes) and
//! then kills the members and removes the data directories: no etcd
//! outlives the process that started it, however it ends.
//!
//! Each member also serves plain-HTTP `/health` and `/metrics` on a port of
//! its own (also when clients need TLS): readiness and leadership are read
//! there, so the kit needs no etcd client.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{BoxError, free_port, http};

/// Where the Debian `etcd-server` package installs the binary.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a starting member may take to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a member's log that [`EtcdCluster::log_tail`] returns.
const LOG_TAIL_LINES: usize = 30;

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

/// The first line of `etcd --version`, when it runs.
pub fn etcd_version(bin: &Path) -> Option<String> {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
}

/// Certificates for a TLS cluster, made by [`TestCerts::generate`].
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
    /// `openssl` command (Debian package `openssl`).
    pub fn generate(dir: &Path) -> Result<Self, BoxError> {
        let certs = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let ca_key = dir.join("ca-key.pem");
        let openssl = |args: &[&str]| -> Result<(), BoxError> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run openssl (Debian package openssl): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "openssl {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            Ok(())
        };
        let p = |path: &Path| {
            path.to_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("not UTF-8: {}", path.display()))
        };
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
            &p(&ca_key)?,
            "-out",
            &p(&certs.ca)?,
        ])?;
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        let client_ext = dir.join("client.ext");
        std::fs::write(&client_ext, "extendedKeyUsage=clientAuth\n")?;
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
                &p(key)?,
                "-out",
                &p(&csr)?,
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&csr)?,
                "-CA",
                &p(&certs.ca)?,
                "-CAkey",
                &p(&ca_key)?,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(ext)?,
                "-out",
                &p(cert)?,
            ])?;
        }
        Ok(certs)
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

impl EtcdSettings {
    /// etcd's own default timing (heartbeat 100 ms, election 1 s), for
    /// measurements that compare against etcd as it is usually run.
    pub fn etcd_defaults() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_secs(1),
            ..Self::default()
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

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
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

const JANITOR: &str = r#"
# Runs until the starting process closes our stdin (it exited, or dropped
# the cluster), then kills whatever members are still recorded and cleans up.
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
    /// Starts `members` members of `bin` with data directories and logs in
    /// `dir` (removed when the cluster goes), and waits until every one
    /// reports healthy (at most [`START_TIMEOUT`] each). The error of a
    /// member that exits or stays unhealthy carries the tail of its log.
    pub async fn start(
        bin: &Path,
        dir: TempDir,
        members: usize,
        settings: EtcdSettings,
    ) -> Result<Self, BoxError> {
        if members == 0 {
            return Err("an etcd cluster needs at least one member".into());
        }
        let mut janitor = Command::new("sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("janitor")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn the etcd janitor shell: {e}"))?;
        let Some(stdin) = janitor.stdin.take() else {
            let _ = janitor.kill();
            let _ = janitor.wait();
            return Err("the etcd janitor shell has no stdin pipe".into());
        };
        let scheme = if settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut list = Vec::with_capacity(members);
        for i in 0..members {
            let name = format!("m{i}");
            list.push(Member {
                scheme,
                client_port: free_port()?,
                peer_port: free_port()?,
                metrics_port: free_port()?,
                data_dir: dir.path().join(format!("{name}.etcd")),
                log: dir.path().join(format!("{name}.log")),
                pid_file: dir.path().join(format!("{name}.pid")),
                name,
                child: None,
            });
        }
        let initial_cluster = list
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
        // From here on, dropping the cluster cleans up whatever started.
        let mut cluster = Self {
            members: list,
            initial_cluster,
            token,
            settings,
            bin: bin.to_path_buf(),
            janitor: Some((janitor, stdin)),
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new")?;
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i, START_TIMEOUT).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), BoxError> {
        let m = &self.members[i];
        // Appended: a restarted member's log follows its earlier life.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let err = log.try_clone()?;
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
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (install Debian's etcd-server)",
                    self.bin.display()
                )
            })?;
        // Recorded before anything can fail, so the janitor finds it.
        let recorded = std::fs::write(&m.pid_file, child.id().to_string());
        self.members[i].child = Some(child);
        Ok(recorded?)
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

    /// Process id of member `i`, when started and not stopped or killed.
    pub fn pid(&self, i: usize) -> Option<Pid> {
        self.members[i]
            .child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// Process ids of the members started and not stopped or killed, for
    /// CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// The tail of member `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
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
    pub async fn restart(&mut self, i: usize) -> Result<(), BoxError> {
        if self.is_running(i) {
            return Err(format!("etcd member {i} is still running").into());
        }
        self.reap(i);
        self.spawn(i, "existing")?;
        self.wait_healthy(i, START_TIMEOUT).await
    }

    /// Waits until member `i` answers `/health` with `true` (it is part of
    /// a cluster with a leader); an error with its log when it exits or
    /// `timeout` passes.
    pub async fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + timeout;
        let addr = self.members[i].metrics_addr();
        loop {
            if let Some(child) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "etcd member {i} exited with {status} while starting; log:\n{}",
                    self.log_tail(i)
                )
                .into());
            }
            if let Ok((200, body)) = http::get(addr, "/health").await
                && body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd member {i} not healthy after {timeout:?}; log:\n{}",
                    self.log_tail(i)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Member `i`'s `/metrics` text.
    pub async fn metrics(&self, i: usize) -> Result<String, BoxError> {
        match http::get(self.members[i].metrics_addr(), "/metrics").await? {
            (200, body) => Ok(body),
            (status, _) => Err(format!("etcd member {i}: /metrics answered {status}").into()),
        }
    }

    /// Sum of the samples of metric `name` whose label text contains
    /// `labels` (`""`: all) in member `i`'s `/metrics`; 0 when absent.
    pub async fn metric(&self, i: usize, name: &str, labels: &str) -> Result<f64, BoxError> {
        Ok(http::metric_sum(&self.metrics(i).await?, name, labels))
    }

    /// Index of the member that currently leads (by each member's own
    /// `etcd_server_is_leader` metric; members stopped, killed or not
    /// answering are passed over); `None` when none does.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            if let Ok(body) = self.metrics(i).await
                && body.lines().any(|l| l.trim() == "etcd_server_is_leader 1")
            {
                return Some(i);
            }
        }
        None
    }

    /// Waits until some member leads; an error after `timeout`.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, BoxError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(format!("no etcd leader after {timeout:?}").into());
            }
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
