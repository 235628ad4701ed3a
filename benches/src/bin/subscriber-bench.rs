#![allow(clippy::print_stdout)]
//! `subscriber-bench`: one config key, many subscribers, against a real
//! `stratad` and a real single-member etcd 3.4 in the same run.
//!
//! For every subscriber count N and each system (a fresh process each time,
//! on free loopback ports, with a temporary data directory):
//!
//! 1. one key is created; the server's memory is read (*idle*);
//! 2. C HTTP/2 connections are opened (C = max(`--min-connections`,
//!    ⌈N / `--streams-per-connection`⌉)) and each makes one unary call, so
//!    the connection's own buffers exist; memory is read (*connected*);
//! 3. N subscriptions are opened round-robin over those connections — for
//!    stratad `ConfigService.Watch` on the key, for etcd one `Watch` stream
//!    per watcher on the same key — and the run waits until every subscriber
//!    has its snapshot (stratad) or its `created` response (etcd), lets the
//!    server settle, and reads memory again (*streams*);
//! 4. `--changes` single puts of the key are made from a separate
//!    connection, each after the previous one was acknowledged and a pause.
//!    Every value carries its change number; every subscriber records when
//!    it received which number. Delivery latency is measured from the start
//!    of the put call, for every (subscriber, change) pair;
//! 5. memory is read once more (*after pushes*), and the server is stopped.
//!
//! Memory per stream is (RSS with streams − RSS connected) / N; the figure
//! that also charges the connections is (RSS with streams − RSS idle) / N.
//! RSS is `VmRSS` of `/proc/PID/status`; the anonymous share comes from
//! `/proc/PID/smaps_rollup`.
//!
//! The process exits non-zero if any subscriber misses, duplicates or cannot
//! parse a change, or if any stream fails. Both servers are killed when the
//! benchmark exits, also on errors. Run in release mode:
//!
//! ```text
//! cargo build --release -p strata-server -p strata-benches
//! target/release/subscriber-bench --help
//! ```

use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::Serialize;
use strata_benches::daemon::{
    free_port, machine_busy_seconds, process_cpu_seconds, readyz, stratad_or_default,
};
use strata_benches::etcd_cluster::etcd_version;
use strata_benches::watchers::{
    Delivery, Putter, RunFlags, Subscribers, WatchConn, WatchFlags, connect, create_tenant,
    value_for,
};
use strata_benches::{BoxError, LatencySummary, MachineInfo, block_on, print_report, secs};
use strata_proto::v1::StatusRequest;
use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use tempfile::TempDir;

/// The watched config key (stratad).
const KEY: &str = "svc/bench.txt";
/// The watched key (etcd).
const ETCD_KEY: &str = "/strata-bench/svc/bench.txt";

/// Which servers to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Systems {
    /// stratad, then etcd, for each subscriber count.
    Both,
    /// Only stratad.
    Stratad,
    /// Only etcd.
    Etcd,
}

/// One server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum System {
    Stratad,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Stratad => "stratad",
            Self::Etcd => "etcd",
        }
    }
}

/// Fan-out of one config change to many subscribers: stratad against etcd.
#[derive(Debug, Parser, Serialize)]
#[command(version, about)]
// Ten thousand subscribers take longer to set up than etcd-bench's thousand.
#[command(mut_arg("setup_timeout_secs", |a| a.default_value("120")))]
struct Args {
    /// The `stratad` binary (default: `$STRATAD_BIN`, else the one next to
    /// this binary, i.e. `target/release/stratad`).
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// The etcd 3.4 binary (Debian package `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Which servers to measure.
    #[arg(long, value_enum, default_value_t = Systems::Both)]
    systems: Systems,
    /// Subscriber counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_usize, 10_000])]
    subscribers: Vec<usize>,
    /// The watch-delivery flags both load generators take.
    #[command(flatten)]
    #[serde(flatten)]
    watch: WatchFlags,
    /// Pause before each memory reading, seconds.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// Timeouts and run options both load generators take.
    #[command(flatten)]
    #[serde(flatten)]
    run: RunFlags,
}

/// Memory of a process at one moment, KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Memory {
    /// `VmRSS` of `/proc/PID/status`.
    rss_kib: u64,
    /// `Anonymous` of `/proc/PID/smaps_rollup` (heap and stacks).
    anon_kib: u64,
}

impl Memory {
    fn read(pid: u32) -> Result<Self, BoxError> {
        let field = |text: &str, name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}"))
                .map_err(|e| format!("cannot read /proc/{pid}/{file} (did the server exit?): {e}"))
        };
        let status = read("status")?;
        let rollup = read("smaps_rollup")?;
        Ok(Self {
            rss_kib: field(&status, "VmRSS:").ok_or("no VmRSS in /proc/PID/status")?,
            anon_kib: field(&rollup, "Anonymous:").ok_or("no Anonymous in smaps_rollup")?,
        })
    }
}

/// Memory readings of the server during one measurement.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct MemoryResult {
    /// Key created, no client connection but the setup one.
    idle: Memory,
    /// All connections open, no subscription yet.
    connected: Memory,
    /// Every subscriber has its snapshot.
    streams: Memory,
    /// After every change was delivered.
    after_pushes: Memory,
    /// (streams − connected) RSS per stream, KiB.
    rss_kib_per_stream: f64,
    /// Same, anonymous memory.
    anon_kib_per_stream: f64,
    /// (streams − idle) RSS per stream, KiB: connections charged too.
    rss_kib_per_stream_with_connections: f64,
    /// (after pushes − connected) RSS per stream, KiB: buffers the pushes
    /// grew included.
    rss_kib_per_stream_after_pushes: f64,
}

/// CPU time spent while the changes were pushed, seconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct CpuResult {
    /// Wall-clock length of the window.
    wall: f64,
    /// The server process.
    server: f64,
    /// This load generator (its subscribers decode every push).
    bench: f64,
    /// Every other process and kernel work not charged to a process
    /// (`/proc/stat` busy time minus the two above).
    other: f64,
    /// Write system calls the server made (`syscw` of `/proc/PID/io`):
    /// how well it batches the pushes of many streams into one write.
    server_writes: u64,
}

/// Result of one (system, subscriber count) measurement.
#[derive(Debug, Serialize)]
struct RunResult {
    system: System,
    subscribers: usize,
    connections: usize,
    changes: usize,
    /// Seconds until every subscriber had its snapshot.
    setup_seconds: f64,
    /// Deliveries and their latency (fields of this object in the JSON).
    #[serde(flatten)]
    delivery: Delivery,
    /// Per change: first delivery → last delivery.
    spread: LatencySummary,
    /// Put call → acknowledgement.
    put_ack: LatencySummary,
    memory: MemoryResult,
    cpu: CpuResult,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineInfo,
    args: Args,
    etcd_version: Option<String>,
    /// Whether a `rustc` process was running when the run started or ended.
    rustc_seen: bool,
    runs: Vec<RunResult>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run().map_err(|e| e as Box<dyn std::error::Error>)
}

fn run() -> Result<(), BoxError> {
    let args = Args::parse();
    args.watch.check()?;
    let report = block_on(args.run.worker_threads, bench(args))?;

    let tables = render(&report);
    print_report(&tables, &report, report.args.run.json)?;
    let failed: Vec<String> = report
        .runs
        .iter()
        .filter(|r| !r.delivery.complete())
        .map(|r| r.delivery.failure(r.system.name(), r.subscribers))
        .collect();
    if !failed.is_empty() {
        return Err(format!("DELIVERY INCOMPLETE: {}", failed.join("; ")).into());
    }
    Ok(())
}

fn rustc_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok)
        .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "rustc"))
}

async fn bench(args: Args) -> Result<Report, BoxError> {
    let parent = args.run.parent_dir()?;
    let machine = MachineInfo::probe(&parent);
    let stratad = stratad_or_default(args.stratad.as_deref())?;
    let etcd_version = etcd_version(&args.etcd);
    eprintln!(
        "subscriber-bench: {} CPUs; stratad {}; {}",
        machine.cpus,
        stratad.display(),
        etcd_version.as_deref().unwrap_or("etcd version unknown")
    );
    let mut rustc_seen = rustc_running();
    if rustc_seen {
        eprintln!("WARNING: rustc is running; figures will be disturbed");
    }
    let systems: &[System] = match args.systems {
        Systems::Both => &[System::Stratad, System::Etcd],
        Systems::Stratad => &[System::Stratad],
        Systems::Etcd => &[System::Etcd],
    };
    let mut runs = Vec::new();
    for &n in &args.subscribers {
        for &system in systems {
            let connections = args.watch.connections(n);
            eprintln!(
                "{}: {n} subscribers over {connections} connections, {} changes ...",
                system.name(),
                args.watch.changes
            );
            let server = match system {
                System::Stratad => Server::start_stratad(&stratad, &parent).await?,
                System::Etcd => Server::start_etcd(&args.etcd, &parent).await?,
            };
            let result = measure(&server, n, connections, &args).await;
            let stopped = server.stop().await;
            let r = result?;
            stopped?;
            eprintln!(
                "  {} / {} deliveries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, \
                 {:.2} KiB/stream",
                r.delivery.deliveries,
                r.delivery.expected_deliveries,
                r.delivery.latency.p50_ms,
                r.delivery.latency.p99_ms,
                r.delivery.latency.max_ms,
                r.memory.rss_kib_per_stream
            );
            runs.push(r);
        }
    }
    if rustc_running() {
        rustc_seen = true;
        eprintln!("WARNING: rustc was running at the end of the run");
    }
    Ok(Report {
        machine,
        args,
        etcd_version,
        rustc_seen,
        runs,
    })
}

/// A server child process with its temporary data directory. Dropping it
/// kills the process, so error paths never leave a server behind.
struct Server {
    system: System,
    child: Child,
    /// Client address.
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    async fn start_stratad(bin: &Path, parent: &Path) -> Result<Self, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("strata-subbench-")
            .tempdir_in(parent)?;
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
        let mut server = Self {
            system: System::Stratad,
            child,
            addr,
            log,
            _dir: dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn start_etcd(bin: &Path, parent: &Path) -> Result<Self, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("etcd-subbench-")
            .tempdir_in(parent)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let client = format!("http://{addr}");
        let log = dir.path().join("etcd.log");
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (install Debian's etcd-server)",
                    bin.display()
                )
            })?;
        let mut server = Self {
            system: System::Etcd,
            child,
            addr,
            log,
            _dir: dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_ready(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "{} exited during start-up ({status}):\n{}",
                    self.system.name(),
                    self.log_tail()
                )
                .into());
            }
            let ready = match self.system {
                System::Stratad => readyz(self.addr).await,
                System::Etcd => etcd_ready(&self.endpoint()).await,
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not ready after 30 s:\n{}",
                    self.system.name(),
                    self.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL when the process has not exited after 10 s.
    async fn stop(mut self) -> Result<(), BoxError> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                return Err(format!("{} ignored SIGTERM for 10 s", self.system.name()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// Whether etcd answers a `Status` call (connecting alone is lazy).
async fn etcd_ready(endpoint: &str) -> bool {
    let attempt = async {
        let mut client = etcd_client::Client::connect([endpoint], None).await?;
        client.status().await?;
        Ok::<(), etcd_client::Error>(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(()))
    )
}

/// Write system calls of process `pid` so far.
fn write_syscalls(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    server: f64,
    bench: f64,
    machine: f64,
    server_writes: u64,
}

impl CpuMark {
    fn take(pid: u32) -> Self {
        Self {
            at: Instant::now(),
            server: process_cpu_seconds(&pid.to_string()).unwrap_or(0.0),
            bench: process_cpu_seconds("self").unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
            server_writes: write_syscalls(pid).unwrap_or(0),
        }
    }

    fn since(self, start: Self) -> CpuResult {
        let server = self.server - start.server;
        let bench = self.bench - start.bench;
        CpuResult {
            wall: (self.at - start.at).as_secs_f64(),
            server,
            bench,
            other: (self.machine - start.machine - server - bench).max(0.0),
            server_writes: self.server_writes.saturating_sub(start.server_writes),
        }
    }
}

async fn measure(
    server: &Server,
    n: usize,
    connections: usize,
    args: &Args,
) -> Result<RunResult, BoxError> {
    let settle = secs(args.settle_secs, "--settle-secs")?;
    let pid = server.pid();
    let endpoint = server.endpoint();

    // The key exists before anyone subscribes, so every snapshot has it.
    let mut putter = match server.system {
        System::Stratad => {
            let channel = connect(&endpoint).await?;
            create_tenant(channel.clone()).await?;
            Putter::Stratad(ConfigServiceClient::new(channel), KEY.into())
        }
        System::Etcd => Putter::Etcd(
            Box::new(
                etcd_client::Client::connect([endpoint.as_str()], None)
                    .await?
                    .kv_client(),
            ),
            ETCD_KEY.into(),
        ),
    };
    putter.put(value_for(0, args.watch.value_size)).await?;
    tokio::time::sleep(settle).await;
    let idle = Memory::read(pid)?;

    // Connections first, each used once, so their buffers are not counted
    // as the streams'.
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        match server.system {
            System::Stratad => {
                let channel = connect(&endpoint).await?;
                AdminServiceClient::new(channel.clone())
                    .status(StatusRequest::default())
                    .await?;
                conns.push(WatchConn::Stratad(ConfigServiceClient::new(channel)));
            }
            System::Etcd => {
                let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
                client.get(ETCD_KEY, None).await?;
                conns.push(WatchConn::Etcd(Box::new(client.watch_client())));
            }
        }
    }
    tokio::time::sleep(settle).await;
    let connected = Memory::read(pid)?;

    let subscribers = Subscribers::spawn(&conns, n, args.watch.changes, KEY, ETCD_KEY)?;
    let setup_seconds = subscribers
        .wait_ready(
            server.system.name(),
            secs(args.run.setup_timeout_secs, "--setup-timeout-secs")?,
        )
        .await?;
    tokio::time::sleep(settle).await;
    let streams = Memory::read(pid)?;

    let cpu_start = CpuMark::take(pid);
    let pushed = subscribers
        .deliver(
            &mut putter,
            &args.watch,
            secs(args.run.delivery_timeout_secs, "--delivery-timeout-secs")?,
        )
        .await?;
    let cpu = CpuMark::take(pid).since(cpu_start);
    let outcome = subscribers
        .finish(&pushed, Duration::from_millis(500))
        .await?;
    tokio::time::sleep(settle).await;
    let after_pushes = Memory::read(pid)?;
    drop(conns);

    let per_stream = |after: u64, before: u64| (after as f64 - before as f64) / n as f64;
    Ok(RunResult {
        system: server.system,
        subscribers: n,
        connections,
        changes: args.watch.changes,
        setup_seconds,
        delivery: outcome.delivery,
        spread: outcome.spread,
        put_ack: outcome.put_ack,
        memory: MemoryResult {
            idle,
            connected,
            streams,
            after_pushes,
            rss_kib_per_stream: per_stream(streams.rss_kib, connected.rss_kib),
            anon_kib_per_stream: per_stream(streams.anon_kib, connected.anon_kib),
            rss_kib_per_stream_with_connections: per_stream(streams.rss_kib, idle.rss_kib),
            rss_kib_per_stream_after_pushes: per_stream(after_pushes.rss_kib, connected.rss_kib),
        },
        cpu,
    })
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let a = &report.args;
    let _ = writeln!(
        out,
        "subscriber-bench — one key, N subscribers: stratad and etcd"
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}); {}",
        m.cpus,
        m.cpu_model.as_deref().unwrap_or("unknown CPU"),
        report
            .etcd_version
            .as_deref()
            .unwrap_or("etcd version unknown")
    );
    let _ = writeln!(
        out,
        "{} changes, {} ms apart, {} B values; ≤ {} streams per connection, ≥ {} connections{}",
        a.watch.changes,
        a.watch.interval_ms,
        a.watch.value_size,
        a.watch.streams_per_connection,
        a.watch.min_connections,
        if report.rustc_seen {
            "; WARNING: rustc was running"
        } else {
            ""
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Delivery (put call → subscriber received; ms)\n\
         system    subs conns | deliveries missing dup unexp err |    p50    p99  p99.9    max \
         | spread p50 | put ack p50 |    ok"
    );
    for r in &report.runs {
        let _ = writeln!(
            out,
            "{:<7} {:>6} {:>5} | {} | {:>10.2} | {:>11.2} | {:>5}",
            r.system.name(),
            r.subscribers,
            r.connections,
            r.delivery.columns(7),
            r.spread.p50_ms,
            r.put_ack.p50_ms,
            if r.delivery.complete() { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Server memory (RSS MiB; per stream in KiB)\n\
         system    subs |   idle  conns streams  after | KiB/stream anon/stream +conns \
         after pushes"
    );
    let mib = |k: u64| k as f64 / 1024.0;
    for r in &report.runs {
        let mem = &r.memory;
        let _ = writeln!(
            out,
            "{:<7} {:>6} | {:>6.1} {:>6.1} {:>7.1} {:>6.1} | {:>10.2} {:>11.2} {:>6.2} {:>12.2}",
            r.system.name(),
            r.subscribers,
            mib(mem.idle.rss_kib),
            mib(mem.connected.rss_kib),
            mib(mem.streams.rss_kib),
            mib(mem.after_pushes.rss_kib),
            mem.rss_kib_per_stream,
            mem.anon_kib_per_stream,
            mem.rss_kib_per_stream_with_connections,
            mem.rss_kib_per_stream_after_pushes,
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "CPU while the changes were pushed (CPU-seconds)\n\
         system    subs |  wall server  bench  other | server writes/change | setup s"
    );
    for r in &report.runs {
        let _ = writeln!(
            out,
            "{:<7} {:>6} | {:>5.1} {:>6.2} {:>6.2} {:>6.2} | {:>20.0} | {:>7.1}",
            r.system.name(),
            r.subscribers,
            r.cpu.wall,
            r.cpu.server,
            r.cpu.bench,
            r.cpu.other,
            r.cpu.server_writes as f64 / r.changes as f64,
            r.setup_seconds
        );
    }
    out
}
