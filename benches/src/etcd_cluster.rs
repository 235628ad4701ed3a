//! A real etcd cluster and `stratad` replicas on top of it, for load
//! generators that compare `stratad` on etcd with etcd itself.
//!
//! - [`EtcdCluster`]: `N` members of the Debian `etcd` 3.4 binary on free
//!   loopback ports, each with a data directory under one temporary
//!   directory. Dropping the cluster kills every member (also while a panic
//!   unwinds). Should the load generator itself be killed, a small janitor
//!   shell notices that its stdin pipe closed and kills the members, so no
//!   etcd outlives the benchmark however it ends (the same approach as the
//!   test harness in `tests/src/etcd.rs`).
//! - [`Daemon`]: one `stratad` on the embedded store or on etcd (with a key
//!   prefix of its own), on a free port; dropping it kills it.
//! - [`CpuMarks`]: CPU seconds of several processes over a window.

use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxError;
use crate::daemon::{free_port, readyz};
use crate::daemon::{machine_busy_seconds, process_cpu_seconds};

/// How long a starting member or daemon may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The first line of `etcd --version`, when it runs.
pub fn etcd_version(bin: &Path) -> Option<String> {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    pid_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd cluster (see the module documentation).
pub struct EtcdCluster {
    members: Vec<Member>,
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
# Runs until the load generator closes our stdin (it exited, or dropped the
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
    /// Starts `members` members of `bin` with data directories under
    /// `parent` and etcd's default timing (heartbeat 100 ms, election 1 s),
    /// and waits until every member reports the same leader.
    pub async fn start(bin: &Path, parent: &Path, members: usize) -> Result<Self, BoxError> {
        if members == 0 {
            return Err("an etcd cluster needs at least one member".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("strata-etcdbench-")
            .tempdir_in(parent)?;
        let mut janitor = Command::new("sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("janitor")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = janitor
            .stdin
            .take()
            .ok_or("the janitor shell has no stdin pipe")?;
        let mut list = Vec::with_capacity(members);
        for i in 0..members {
            let name = format!("m{i}");
            list.push(Member {
                client_port: free_port()?,
                peer_port: free_port()?,
                pid_file: dir.path().join(format!("{name}.pid")),
                log: dir.path().join(format!("{name}.log")),
                name,
                child: None,
            });
        }
        let mut cluster = Self {
            members: list,
            janitor: Some((janitor, stdin)),
            dir,
        };
        let initial = cluster
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("strata-etcdbench-{}", std::process::id());
        for i in 0..members {
            let m = &cluster.members[i];
            let data = cluster.dir.path().join(format!("{}.etcd", m.name));
            let child = Command::new(bin)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &m.client_url()])
                .args(["--advertise-client-urls", &m.client_url()])
                .args(["--listen-peer-urls", &m.peer_url()])
                .args(["--initial-advertise-peer-urls", &m.peer_url()])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&m.log)?)
                .spawn()
                .map_err(|e| {
                    format!(
                        "cannot start {}: {e} (install Debian's etcd-server)",
                        bin.display()
                    )
                })?;
            std::fs::write(&m.pid_file, child.id().to_string())?;
            cluster.members[i].child = Some(child);
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Process ids of the running members.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// The last 20 lines member `i` logged.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// (member id, leader id) as member `i` reports them.
    async fn status(&self, i: usize) -> Result<(u64, u64), BoxError> {
        let url = self.members[i].client_url();
        let attempt = async {
            let mut client = etcd_client::Client::connect([url.as_str()], None).await?;
            let s = client.status().await?;
            Ok::<_, etcd_client::Error>((s.header().map_or(0, |h| h.member_id()), s.leader()))
        };
        Ok(tokio::time::timeout(Duration::from_secs(2), attempt).await??)
    }

    async fn wait_ready(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m.child.as_mut()
                    && let Some(status) = child.try_wait()?
                {
                    return Err(format!(
                        "etcd member {i} exited during start-up ({status}):\n{}",
                        self.log_tail(i)
                    )
                    .into());
                }
            }
            let mut leaders = Vec::new();
            for i in 0..self.members.len() {
                if let Ok((_, leader)) = self.status(i).await {
                    leaders.push(leader);
                }
            }
            if leaders.len() == self.members.len()
                && leaders[0] != 0
                && leaders.iter().all(|l| *l == leaders[0])
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd cluster not ready after {START_TIMEOUT:?}; member 0 log:\n{}",
                    self.log_tail(0)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sum of the samples of metric `name` whose label text contains
    /// `labels` (`""`: all) in member `i`'s `/metrics` (etcd serves them on
    /// the client port); 0 when absent.
    pub async fn metric(&self, i: usize, name: &str, labels: &str) -> Result<f64, BoxError> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port));
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<Vec<u8>, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), attempt).await??;
        let text = String::from_utf8_lossy(&answer);
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, v) = l.rsplit_once(' ')?;
                let (base, rest) = key.split_once('{').unwrap_or((key, ""));
                (base == name && rest.contains(labels)).then(|| v.parse::<f64>().ok())?
            })
            .sum())
    }

    /// Compacts the cluster's history up to its current revision and waits
    /// until the members applied it, so that the next measurement starts on
    /// a compacted database (and a `stratad` started next, whose compaction
    /// job runs at once, has nothing to compact inside the window).
    pub async fn compact(&self) -> Result<(), BoxError> {
        let url = self.members[0].client_url();
        let mut client = etcd_client::Client::connect([url.as_str()], None).await?;
        let revision = client
            .get("/", Some(etcd_client::GetOptions::new().with_count_only()))
            .await?
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        if revision > 1 {
            let physical = etcd_client::CompactionOptions::new().with_physical();
            match client.compact(revision, Some(physical)).await {
                Ok(_) => {}
                // Already compacted that far: nothing to do.
                Err(e) if e.to_string().contains("compacted") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Index of the member that leads, by member 0's status.
    pub async fn leader(&self) -> Result<usize, BoxError> {
        let (_, leader) = self.status(0).await?;
        for i in 0..self.members.len() {
            if self.status(i).await?.0 == leader {
                return Ok(i);
            }
        }
        Err(format!("no member has the leader's id {leader:x}").into())
    }

    /// Makes member `target` the leader (etcd's `MoveLeader`, which the
    /// current leader must receive), and waits until every member agrees.
    pub async fn make_leader(&self, target: usize) -> Result<(), BoxError> {
        let (target_id, _) = self.status(target).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let current = self.leader().await?;
            if current == target {
                let mut agree = true;
                for i in 0..self.members.len() {
                    agree &= self.status(i).await?.1 == target_id;
                }
                if agree {
                    return Ok(());
                }
            } else {
                let url = self.members[current].client_url();
                let mut client = etcd_client::Client::connect([url.as_str()], None).await?;
                client.move_leader(target_id).await?;
            }
            if Instant::now() > deadline {
                return Err(format!("member {target} did not become the leader in 10 s").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_file(&m.pid_file);
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

/// Which store a [`Daemon`] runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The embedded store in the daemon's temporary data directory.
    Embedded,
    /// etcd at these endpoints, every key under `prefix`.
    Etcd {
        /// Client URLs, in the order the daemon tries them.
        endpoints: Vec<String>,
        /// The daemon's key prefix (`etcd.prefix`).
        prefix: String,
    },
}

/// A running `stratad` with its temporary directory. Dropping it kills the
/// process, so error paths never leave a daemon behind.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    /// Starts `bin` on `backend` on a free loopback port, logging at `warn`
    /// into a temporary directory under `parent`, and waits until `/readyz`
    /// answers 200.
    pub async fn start(bin: &Path, parent: &Path, backend: &Backend) -> Result<Self, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("strata-etcdbench-stratad-")
            .tempdir_in(parent)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = dir.path().join("stratad.log");
        let mut command = Command::new(bin);
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // Load generators measure the data path; the bearer-token check
            // (one hash-map probe and a SHA-256 of the secret per call) is
            // left out so figures stay comparable across rounds.
            .args(["--auth", "off"])
            .arg("--log-level")
            .arg("warn")
            .env_clear();
        if let Backend::Etcd { endpoints, prefix } = backend {
            command
                .arg("--etcd-endpoints")
                .arg(endpoints.join(","))
                .env("STRATA_ETCD_PREFIX", prefix);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut me = Self {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = me.child.try_wait()? {
                return Err(format!(
                    "stratad exited during start-up ({status}):\n{}",
                    me.log_tail()
                )
                .into());
            }
            if readyz(me.addr).await {
                return Ok(me);
            }
            if Instant::now() > deadline {
                return Err(format!("stratad not ready after 30 s:\n{}", me.log_tail()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://` URL of the listener, for gRPC channels.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last 20 lines the daemon logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The daemon's `/metrics` text.
    pub async fn metrics(&self) -> Result<String, BoxError> {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<Vec<u8>, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), attempt).await??;
        let text = String::from_utf8(answer)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("no header end in the /metrics answer")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "/metrics answered {}",
                head.lines().next().unwrap_or_default()
            )
            .into());
        }
        Ok(body.to_owned())
    }

    /// SIGTERM, then SIGKILL when the process has not exited after 10 s
    /// (an error: the daemon should drain and exit).
    pub async fn stop(mut self) -> Result<(), BoxError> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                return Err("stratad ignored SIGTERM for 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// CPU seconds used in a window, by group of processes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuSplit {
    /// Wall-clock length of the window, seconds.
    pub wall: f64,
    /// Every etcd member together.
    pub etcd: f64,
    /// Every `stratad` together.
    pub stratad: f64,
    /// This load generator.
    pub bench: f64,
    /// Everything else, and kernel work charged to no process.
    pub other: f64,
}

/// Cumulative CPU readings of two groups of processes, this one and the
/// machine at one moment; two of them make a [`CpuSplit`].
#[derive(Clone, Copy, Debug)]
pub struct CpuMarks {
    at: Instant,
    etcd: f64,
    stratad: f64,
    bench: f64,
    machine: f64,
}

impl CpuMarks {
    /// Reads the CPU time of the `etcd` and `stratad` processes, of this
    /// process and of the machine.
    pub fn take(etcd: &[u32], stratad: &[u32]) -> Self {
        let sum = |pids: &[u32]| -> f64 {
            pids.iter()
                .filter_map(|p| process_cpu_seconds(&p.to_string()))
                .sum()
        };
        Self {
            at: Instant::now(),
            etcd: sum(etcd),
            stratad: sum(stratad),
            bench: process_cpu_seconds("self").unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// What was used between `start` and this mark.
    pub fn since(self, start: Self) -> CpuSplit {
        let etcd = self.etcd - start.etcd;
        let stratad = self.stratad - start.stratad;
        let bench = self.bench - start.bench;
        CpuSplit {
            wall: (self.at - start.at).as_secs_f64(),
            etcd,
            stratad,
            bench,
            other: (self.machine - start.machine - etcd - stratad - bench).max(0.0),
        }
    }
}
