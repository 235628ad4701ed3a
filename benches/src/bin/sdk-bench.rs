#![allow(clippy::print_stdout)]
//! `sdk-bench`: the client SDK (`strata-client`) in a game-server process,
//! against a real release `stratad` (embedded store) started for the run on
//! a free loopback port. Three measurements:
//!
//! - **read**: reading a watched typed config — `Config::load()` (a
//!   borrowed guard) and `Config::get()` (an `Arc` clone) — in a tight loop
//!   on one thread, then on every CPU at once (all reading the same
//!   handle), in ns per read. The target is ≤ 50 ns.
//! - **memory**: this process's resident memory before and after watching
//!   `--keys` distinct keys (one `Config<T>` each, small JSON values), per
//!   watched key; the daemon's growth over the same step is shown too.
//! - **fan-out**: `--subscribers` handles on one key in this process (from
//!   `--clients` clients); each round one put of a new value, timed from
//!   just before the put is sent until each handle's change callback runs.
//!   Rounds start when the previous one reached every subscriber. Reports
//!   the put's acknowledgement latency, the put → callback latency over
//!   every (round, subscriber), and the put → last callback per round.
//!
//! A missing callback (30 s) or a failed call is an error; the daemon is
//! killed on every way out. Tables go to stdout, or JSON with `--json`.
//! Build in release mode, and measure with nothing else running:
//!
//! ```text
//! cargo build --release -p strata-server -p strata-benches
//! target/release/sdk-bench --help
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use strata_benches::daemon::{Stratad, default_stratad};
use strata_benches::{BoxError, LatencySummary, MachineInfo, micros, new_histogram};
use strata_client::proto::{CreateTenantRequest, PutConfigRequest};
use strata_client::{Client, Config, Connection};

const PROJECT: &str = "bench";
const TENANT: &str = "integration";

#[derive(Parser, Debug)]
#[command(
    about = "Client SDK benchmark: typed config reads, memory per watch, put-to-callback fan-out"
)]
struct Args {
    /// The stratad binary (default: $STRATAD_BIN, else next to this binary).
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// Where the daemon's temporary data directory goes.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Reads per read measurement (per thread).
    #[arg(long, default_value_t = 20_000_000)]
    read_iters: u64,
    /// Distinct keys watched for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Subscribers (handles on one key) for the fan-out measurement.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Clients the subscribers are spread over (each its own connections).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Fan-out rounds (puts).
    #[arg(long, default_value_t = 30)]
    rounds: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// A typical small game config.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // fields are read through black_box only
struct GameConfig {
    max_players: u32,
    tick_rate_hz: u32,
    map: String,
    weights: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct Seq {
    seq: u64,
}

#[derive(Debug, Default, Serialize)]
struct ReadResult {
    threads: usize,
    load_ns: f64,
    get_ns: f64,
}

#[derive(Debug, Default, Serialize)]
struct MemoryResult {
    keys: usize,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    bytes_per_key: f64,
    daemon_bytes_per_key: f64,
    watch_setup_seconds: f64,
}

#[derive(Debug, Default, Serialize)]
struct FanoutResult {
    subscribers: usize,
    clients: usize,
    rounds: u64,
    put_ack: LatencySummary,
    put_to_callback: LatencySummary,
    put_to_last_callback: LatencySummary,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineInfo,
    read: Vec<ReadResult>,
    memory: MemoryResult,
    fanout: FanoutResult,
}

fn rss_bytes(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS in /proc/<pid>/status")?;
    Ok(kb * 1024)
}

async fn put(conn: &Connection, key: &str, value: String) -> Result<(), BoxError> {
    conn.config()
        .put_config(PutConfigRequest {
            project: PROJECT.into(),
            tenant: TENANT.into(),
            key: key.into(),
            value: value.into_bytes(),
            format: "json".into(),
            mode: String::new(),
            expected_revision: 0,
        })
        .await?;
    Ok(())
}

fn client(endpoint: &str) -> Result<Client, BoxError> {
    Ok(Client::builder()
        .endpoints([endpoint])
        .project(PROJECT)
        .tenant(TENANT)
        .build()?)
}

/// ns per read of `f` over `iters` iterations on each of `threads` threads
/// (all started together); the mean over threads.
fn time_reads(threads: usize, iters: u64, f: impl Fn() -> u32 + Send + Sync) -> f64 {
    let barrier = std::sync::Barrier::new(threads);
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..iters / 10 {
                        black_box(f());
                    }
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(f());
                    }
                    start.elapsed().as_nanos() as f64 / iters as f64
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(f64::NAN))
            .collect()
    });
    per_thread.iter().sum::<f64>() / per_thread.len() as f64
}

async fn measure_reads(
    args: &Args,
    endpoint: &str,
    conn: &Connection,
) -> Result<Vec<ReadResult>, BoxError> {
    put(
        conn,
        "bench/game.json",
        r#"{"max_players":64,"tick_rate_hz":30,"map":"arena","weights":[0.5,0.25,0.25]}"#.into(),
    )
    .await?;
    let client = client(endpoint)?;
    let config: Config<GameConfig> = client.watch("bench/game.json").await?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let iters = args.read_iters;
    let handle = config.clone();
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for threads in [1, cpus] {
            let load_ns = time_reads(threads, iters, || handle.load().max_players);
            let get_ns = time_reads(threads, iters, || handle.get().max_players);
            out.push(ReadResult {
                threads,
                load_ns,
                get_ns,
            });
            if cpus == 1 {
                break;
            }
        }
        out
    })
    .await?;
    drop(config);
    Ok(results)
}

async fn measure_memory(
    args: &Args,
    endpoint: &str,
    conn: &Connection,
    daemon_pid: u32,
) -> Result<MemoryResult, BoxError> {
    // Write the keys first (64 at a time), so that only watching is measured.
    let keys: Vec<String> = (0..args.keys)
        .map(|i| format!("bench/mem/{i:06}.json"))
        .collect();
    for chunk in keys.chunks(64) {
        let writes = chunk.iter().map(|k| {
            put(
                conn,
                k,
                r#"{"max_players":64,"tick_rate_hz":30,"map":"arena","weights":[0.5,0.25,0.25]}"#
                    .into(),
            )
        });
        for result in futures::future::join_all(writes).await {
            result?;
        }
    }
    let client = client(endpoint)?;
    // One watch first, so that the connection and runtime are warm.
    let warm: Config<GameConfig> = client.watch(&keys[0]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(std::process::id())?;
    let daemon_before = rss_bytes(daemon_pid)?;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(keys.len());
    for key in &keys {
        handles.push(client.watch::<GameConfig>(key).await?);
    }
    let setup = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(std::process::id())?;
    let daemon_after = rss_bytes(daemon_pid)?;
    drop(handles);
    drop(warm);
    let n = args.keys.max(1) as f64;
    Ok(MemoryResult {
        keys: args.keys,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_key: after.saturating_sub(before) as f64 / n,
        daemon_bytes_per_key: daemon_after.saturating_sub(daemon_before) as f64 / n,
        watch_setup_seconds: setup.as_secs_f64(),
    })
}

struct Round {
    started: Mutex<Option<(u64, Instant)>>,
    arrived: AtomicUsize,
    samples: Mutex<Histogram<u64>>,
    last: Mutex<Instant>,
}

async fn measure_fanout(
    args: &Args,
    endpoint: &str,
    conn: &Connection,
) -> Result<FanoutResult, BoxError> {
    put(conn, "bench/fanout.json", r#"{"seq":0}"#.into()).await?;
    let clients: Vec<Client> = (0..args.clients.max(1))
        .map(|_| client(endpoint))
        .collect::<Result<_, _>>()?;
    let round = Arc::new(Round {
        started: Mutex::new(None),
        arrived: AtomicUsize::new(0),
        samples: Mutex::new(new_histogram()?),
        last: Mutex::new(Instant::now()),
    });
    let mut handles = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let handle: Config<Seq> = clients[i % clients.len()]
            .watch("bench/fanout.json")
            .await?;
        let round = Arc::clone(&round);
        handle.on_change(move |_, new: &Seq| {
            let now = Instant::now();
            let started = *round.started.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((seq, at)) = started
                && seq == new.seq
            {
                let _ = round
                    .samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(micros(now - at).max(1));
                let mut last = round.last.lock().unwrap_or_else(PoisonError::into_inner);
                if now > *last {
                    *last = now;
                }
                round.arrived.fetch_add(1, Ordering::AcqRel);
            }
        });
        handles.push(handle);
    }
    let mut ack = new_histogram()?;
    let mut last = new_histogram()?;
    for seq in 1..=args.rounds {
        round.arrived.store(0, Ordering::Release);
        let at = Instant::now();
        *round.started.lock().unwrap_or_else(PoisonError::into_inner) = Some((seq, at));
        put(conn, "bench/fanout.json", format!(r#"{{"seq":{seq}}}"#)).await?;
        ack.record(micros(at.elapsed()).max(1))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while round.arrived.load(Ordering::Acquire) < args.subscribers {
            if Instant::now() > deadline {
                return Err(format!(
                    "round {seq}: only {} of {} callbacks within 30 s",
                    round.arrived.load(Ordering::Acquire),
                    args.subscribers
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last_at = *round.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.record(micros(last_at - at).max(1))?;
        // Let the daemon and the process settle between rounds.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = round
        .samples
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    drop(handles);
    Ok(FanoutResult {
        subscribers: args.subscribers,
        clients: clients.len(),
        rounds: args.rounds,
        put_ack: LatencySummary::from_micros(&ack),
        put_to_callback: LatencySummary::from_micros(&samples),
        put_to_last_callback: LatencySummary::from_micros(&last),
    })
}

fn row(name: &str, s: &LatencySummary) -> String {
    format!(
        "{name:<24} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        s.count, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let bin = match &args.stratad {
        Some(p) => p.clone(),
        None => default_stratad()?,
    };
    std::fs::create_dir_all(&args.dir)?;
    let daemon = Stratad::start(&bin, &args.dir, "sdk-bench-").await?;
    let endpoint = daemon.addr().to_string();
    let conn = Connection::connect(&[&endpoint], Duration::from_secs(5)).await?;
    conn.tenants()
        .create_tenant(CreateTenantRequest {
            project: PROJECT.into(),
            name: TENANT.into(),
            ..Default::default()
        })
        .await?;

    let read = measure_reads(&args, &endpoint, &conn).await?;
    let memory = measure_memory(&args, &endpoint, &conn, daemon.pid()).await?;
    let fanout = measure_fanout(&args, &endpoint, &conn).await?;
    daemon.stop().await?;

    let report = Report {
        machine: MachineInfo::probe(&args.dir),
        read,
        memory,
        fanout,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "machine: {} CPUs, {}; daemon data on {:?} ({:?})",
        report.machine.cpus,
        report.machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        report.machine.device,
        report.machine.fs_type
    );
    println!(
        "\nread of a watched Config<GameConfig> ({} reads per thread)",
        args.read_iters
    );
    println!("{:<8} {:>12} {:>12}", "threads", "load() ns", "get() ns");
    for r in &report.read {
        println!("{:<8} {:>12.1} {:>12.1}", r.threads, r.load_ns, r.get_ns);
    }
    let m = &report.memory;
    println!(
        "\nmemory: {} watched keys: RSS {:.1} -> {:.1} MiB, {:.0} B per key in this process \
         ({:.0} B per key in the daemon); watches set up in {:.2} s",
        m.keys,
        m.rss_before_bytes as f64 / 1048576.0,
        m.rss_after_bytes as f64 / 1048576.0,
        m.bytes_per_key,
        m.daemon_bytes_per_key,
        m.watch_setup_seconds
    );
    let f = &report.fanout;
    println!(
        "\nfan-out: {} subscribers on one key over {} client(s), {} puts (ms)",
        f.subscribers, f.clients, f.rounds
    );
    println!(
        "{:<24} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "", "count", "p50", "p99", "p99.9", "max"
    );
    println!("{}", row("put acknowledged", &f.put_ack));
    println!("{}", row("put -> callback", &f.put_to_callback));
    println!("{}", row("put -> last callback", &f.put_to_last_callback));
    Ok(())
}
