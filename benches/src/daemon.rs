//! A real `stratad` child process for load generators that drive the daemon
//! over the network, and the CPU accounting around a measurement window.
//!
//! The same approach as `subscriber-bench`'s server handling (a free
//! loopback port, a temporary data directory, `/readyz` polling, SIGTERM on
//! stop and SIGKILL on drop); that binary keeps its own copy, which also
//! starts etcd.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_testkit::http::metric_sum;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxError;

/// `$STRATAD_BIN`, else `stratad` next to the running executable (for a
/// release bench binary: `target/release/stratad`).
pub fn default_stratad() -> Result<PathBuf, BoxError> {
    if let Some(p) = std::env::var_os("STRATAD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("stratad");
    if !bin.exists() {
        return Err(format!(
            "stratad not found at {}: build it with `cargo build --release -p strata-server` \
             or pass --stratad",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// The `stratad` binary a `--stratad` flag names, else [`default_stratad`].
pub fn stratad_or_default(flag: Option<&Path>) -> Result<PathBuf, BoxError> {
    flag.map_or_else(default_stratad, |p| Ok(p.to_path_buf()))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running `stratad` with its temporary data directory. Dropping it kills
/// the process, so error paths never leave a daemon behind; the directory is
/// removed with it.
#[derive(Debug)]
pub struct Stratad {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    dir: TempDir,
}

impl Drop for Stratad {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Stratad {
    /// Starts `bin` on a free loopback port with a fresh data directory
    /// under `parent` (named `{prefix}XXXX`), logging at `warn` to a file in
    /// that directory, and waits until `/readyz` answers 200 (at most 30 s).
    pub async fn start(bin: &Path, parent: &Path, prefix: &str) -> Result<Self, BoxError> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = dir.path().join("stratad.log");
        let child = Command::new(bin)
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
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut me = Self {
            child,
            addr,
            log,
            dir,
        };
        me.wait_ready().await?;
        Ok(me)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of the listener, for gRPC channels.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The temporary directory holding the data directory and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last 20 lines the daemon logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// An error unless the process is still running (with its log tail).
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(format!("stratad exited ({status}):\n{}", self.log_tail()).into()),
        }
    }

    async fn wait_ready(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "stratad exited during start-up ({status}):\n{}",
                    self.log_tail()
                )
                .into());
            }
            if readyz(self.addr).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("stratad not ready after 30 s:\n{}", self.log_tail()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL when the process has not exited after 10 s
    /// (which is an error: the daemon should drain and exit).
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

    /// The daemon's `/metrics` text.
    pub async fn metrics(&self) -> Result<String, BoxError> {
        let answer = http_get(self.addr, "/metrics").await?;
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
}

/// One HTTP/1.1 GET with `Connection: close`; the raw answer.
async fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, BoxError> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<Vec<u8>, std::io::Error>(answer)
    };
    Ok(tokio::time::timeout(Duration::from_secs(5), attempt).await??)
}

/// Whether `GET /readyz` answers 200.
pub async fn readyz(addr: SocketAddr) -> bool {
    http_get(addr, "/readyz")
        .await
        .is_ok_and(|a| a.starts_with(b"HTTP/1.1 200"))
}

/// Sum and count of a Prometheus histogram in a `/metrics` text, over the
/// label sets whose label text contains `labels` (`""`: all); `(0, 0)` when
/// absent.
pub fn histogram_totals(text: &str, name: &str, labels: &str) -> (f64, f64) {
    let value = |suffix: &str| metric_sum(text, &format!("{name}{suffix}"), labels);
    (value("_sum"), value("_count"))
}

/// CPU seconds used in a window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuUsage {
    /// Wall-clock length of the window, seconds.
    pub wall: f64,
    /// The daemon process.
    pub server: f64,
    /// This load generator.
    pub bench: f64,
    /// Every other process, and kernel work charged to none (`/proc/stat`
    /// busy time minus the two above).
    pub other: f64,
}

/// Cumulative CPU readings at one moment; two of them make a [`CpuUsage`].
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    at: Instant,
    server: f64,
    bench: f64,
    machine: f64,
}

impl CpuMark {
    /// Reads the CPU time of process `pid`, of this process and of the
    /// machine.
    pub fn take(pid: u32) -> Self {
        Self {
            at: Instant::now(),
            server: process_cpu_seconds(&pid.to_string()).unwrap_or(0.0),
            bench: process_cpu_seconds("self").unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// What was used between `start` and this mark.
    pub fn since(self, start: Self) -> CpuUsage {
        let server = self.server - start.server;
        let bench = self.bench - start.bench;
        CpuUsage {
            wall: (self.at - start.at).as_secs_f64(),
            server,
            bench,
            other: (self.machine - start.machine - server - bench).max(0.0),
        }
    }
}

/// utime + stime of `/proc/PID/stat`, seconds.
pub fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the line, so 11 and 12 here.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI the benchmarks run on.
    Some(ticks as f64 / 100.0)
}

/// Busy time of the whole machine from `/proc/stat`, seconds.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (idle, iowait) = (*f.get(3)?, *f.get(4)?);
    Some((f.iter().sum::<u64>() - idle - iowait) as f64 / 100.0)
}

/// Processes that would disturb a measurement: compilers, cargo, and the
/// other load generators (by `comm`, which the kernel cuts to 15 bytes).
/// Entries are `pid name`.
pub fn disturbing_processes() -> Vec<String> {
    const NAMES: &[&str] = &[
        "rustc",
        "cargo",
        "clippy-driver",
        "store-bench",
        "subscriber-benc",
        "registry-bench",
        "etcd-bench",
    ];
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n != me && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim();
            NAMES
                .contains(&comm)
                .then(|| format!("{} {comm}", e.file_name().to_string_lossy()))
        })
        .collect();
    out.sort();
    out
}
