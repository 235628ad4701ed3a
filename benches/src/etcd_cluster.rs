//! A real etcd cluster and `stratad` replicas on top of it, for load
//! generators that compare `stratad` on etcd with etcd itself.
//!
//! - the cluster is the shared harness [`strata_testkit::etcd::EtcdCluster`]
//!   (the end-to-end tests start theirs there too): `N` members of the
//!   Debian `etcd` 3.4 binary on free loopback ports, killed when it drops
//!   and, should the load generator itself be killed, by the kit's janitor;
//!   [`start_cluster`] starts one with etcd's default timing, and
//!   [`compact`] and [`make_leader`] drive it through `etcd-client` (which
//!   the kit does without);
//! - [`Daemon`]: one `stratad` on the embedded store or on etcd (with a key
//!   prefix of its own), on a free port; dropping it kills it;
//! - [`CpuMarks`]: CPU seconds of several processes over a window.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_testkit::etcd::EtcdSettings;
pub use strata_testkit::etcd::{EtcdCluster, etcd_version};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxError;
use crate::daemon::{free_port, readyz};
use crate::daemon::{machine_busy_seconds, process_cpu_seconds};

/// How long a starting daemon may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `members` members of `bin` with data directories under `parent`
/// and etcd's default timing (heartbeat 100 ms, election 1 s), and waits
/// until every member is healthy.
pub async fn start_cluster(
    bin: &Path,
    parent: &Path,
    members: usize,
) -> Result<EtcdCluster, BoxError> {
    let dir = tempfile::Builder::new()
        .prefix("strata-etcdbench-")
        .tempdir_in(parent)?;
    EtcdCluster::start(bin, dir, members, EtcdSettings::etcd_defaults()).await
}

/// A client of member `i` alone.
async fn client(cluster: &EtcdCluster, i: usize) -> Result<etcd_client::Client, BoxError> {
    Ok(etcd_client::Client::connect([cluster.endpoint(i)], None).await?)
}

/// (member id, leader id) as member `i` reports them.
async fn status(cluster: &EtcdCluster, i: usize) -> Result<(u64, u64), BoxError> {
    let attempt = async {
        let s = client(cluster, i).await?.status().await?;
        Ok::<_, BoxError>((s.header().map_or(0, |h| h.member_id()), s.leader()))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await?
}

/// Index of the member that leads, by member 0's status.
async fn leader_by_status(cluster: &EtcdCluster) -> Result<usize, BoxError> {
    let (_, leader) = status(cluster, 0).await?;
    for i in 0..cluster.len() {
        if status(cluster, i).await?.0 == leader {
            return Ok(i);
        }
    }
    Err(format!("no member has the leader's id {leader:x}").into())
}

/// Compacts the cluster's history up to its current revision and waits
/// until the members applied it, so that the next measurement starts on a
/// compacted database (and a `stratad` started next, whose compaction job
/// runs at once, has nothing to compact inside the window).
pub async fn compact(cluster: &EtcdCluster) -> Result<(), BoxError> {
    let mut client = client(cluster, 0).await?;
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

/// Makes member `target` the leader (etcd's `MoveLeader`, which the current
/// leader must receive), and waits until every member agrees.
pub async fn make_leader(cluster: &EtcdCluster, target: usize) -> Result<(), BoxError> {
    let (target_id, _) = status(cluster, target).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let current = leader_by_status(cluster).await?;
        if current == target {
            let mut agree = true;
            for i in 0..cluster.len() {
                agree &= status(cluster, i).await?.1 == target_id;
            }
            if agree {
                return Ok(());
            }
        } else {
            client(cluster, current)
                .await?
                .move_leader(target_id)
                .await?;
        }
        if Instant::now() > deadline {
            return Err(format!("member {target} did not become the leader in 10 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
