#![allow(clippy::print_stdout)]
//! `etcd-bench`: `stratad` on etcd against etcd itself, in one run, on one
//! real 3-member etcd 3.4 cluster (the benchmark of benches/ETCD.md).
//!
//! The cluster runs on free loopback ports with temporary data directories
//! (under `--dir`, default the system temp dir). Member 0 is made the raft
//! leader, and every client of the cluster — the raw-etcd load, the raw
//! watchers, and each `stratad` replica (its `--etcd-endpoints` list starts
//! with member 0) — talks to member 0, so no path pays a follower's forward
//! and the others do not.
//!
//! **Writes** (for every client count N in `--clients`, in this order, so a
//! slow stretch of the VM hits neighbouring rows alike):
//! 1. *raw put*: N tasks loop `Put` of their own key (`--value-size` bytes)
//!    through `etcd-client`, spread over ⌈N / `--clients-per-connection`⌉
//!    connections;
//! 2. *raw txn*: the same, but each request is the transaction a `stratad`
//!    config write sends: three compares (tenant exists, layer unchanged,
//!    version number free), a put of the history version, a put of the
//!    layer, and (past 50 versions) the delete of the oldest version;
//! 3. *stratad ×R* for each R in `--replicas`: R fresh `stratad` processes on
//!    the cluster under a key prefix of their own; N tasks loop
//!    `ConfigService.PutConfig` of their own key, client i through replica
//!    i mod R. A `stratad` write is answered after etcd committed it and
//!    the replica's own view applied it from its etcd watch.
//!
//! Each measurement has a warm-up, then a window; a request counts when its
//! answer arrives inside the window. Requests/s and key changes/s (puts and
//! deletes) are reported, with latency and the CPU each group of processes
//! used in the window.
//!
//! **Watch delivery** (one key, `--subscribers` subscribers over
//! max(`--min-connections`, ⌈N / `--streams-per-connection`⌉) connections,
//! `--changes` puts each `--interval-ms` after the previous ack; latency from
//! the start of the put call to the receipt, for every (subscriber, change);
//! the same method as `subscriber-bench`):
//! 1. raw etcd, one watcher (etcd's own watch latency, which a replica's view
//!    pays once per change);
//! 2. raw etcd, N watchers (`etcd-client` Watch, one stream each);
//! 3. `stratad` on etcd, N `ConfigService.Watch` subscribers;
//! 4. `stratad` on its embedded store (after the cluster was stopped), N
//!    subscribers.
//!
//! The process exits non-zero if any write fails or any subscriber misses,
//! duplicates or cannot parse a change, after printing the figures. Every
//! process started is killed when the benchmark exits, also on errors.
//!
//! ```text
//! cargo build --release -p strata-server -p strata-benches
//! target/release/etcd-bench --help
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use strata_benches::daemon::{disturbing_processes, histogram_totals, stratad_or_default};
use strata_benches::etcd_cluster::{
    Backend, CpuMarks, CpuSplit, Daemon, EtcdCluster, compact, etcd_version, make_leader,
    start_cluster,
};
use strata_benches::watchers::{
    Delivery, PROJECT, Putter, RunFlags, Subscribers, TENANT, WatchConn, WatchFlags, connect,
    create_tenant, value_for,
};
use strata_benches::{
    BoxError, LatencySummary, MachineInfo, block_on, fsync_probe, micros, new_histogram,
    print_report, secs,
};
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::{PutConfigRequest, WatchConfigRequest};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// History versions `stratad` keeps per layer by default (`history.versions`):
/// past this many writes of a key, each write also deletes the oldest one.
const HISTORY_KEEP: u64 = 50;

/// Which parts to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Part {
    /// Writes, then watch delivery.
    All,
    /// Only the write throughput.
    Writes,
    /// Only watch delivery.
    Watch,
}

/// `stratad` on a 3-member etcd cluster against etcd itself: writes/s and
/// watch delivery latency, in one run.
#[derive(Debug, Parser, Serialize)]
#[command(version, about)]
struct Args {
    /// The `stratad` binary (default: `$STRATAD_BIN`, else the one next to
    /// this binary, i.e. `target/release/stratad`).
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// The etcd 3.4 binary (Debian package `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// etcd cluster members.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Which parts to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// Concurrent writers.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 16, 128])]
    clients: Vec<usize>,
    /// Writers per HTTP/2 connection (to etcd for the raw rows, to
    /// `stratad` for the others).
    #[arg(long, default_value_t = 8)]
    clients_per_connection: usize,
    /// `stratad` replica counts for the write measurements.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 2])]
    replicas: Vec<usize>,
    /// Skip the raw-etcd transaction of `stratad`'s shape.
    #[arg(long)]
    no_raw_txn: bool,
    /// Warm-up before each write window, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Length of each write window, seconds.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Subscribers of the watched key.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// The watch-delivery flags both load generators take.
    #[command(flatten)]
    #[serde(flatten)]
    watch: WatchFlags,
    /// Timeouts and run options both load generators take.
    #[command(flatten)]
    #[serde(flatten)]
    run: RunFlags,
}

/// What a write measurement drove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Writer {
    /// `etcd-client` puts of one key each.
    RawPut,
    /// `etcd-client` transactions of `stratad`'s shape.
    RawTxn,
    /// The same, with one watcher on the writers' prefix (as a `stratad`
    /// replica's view watches everything it writes): what etcd's watch
    /// notification adds to each write.
    RawTxnWatched,
    /// `ConfigService.PutConfig` through `stratad` on etcd.
    Stratad,
}

/// Bytes of the audit entry a raw transaction of `stratad`'s shape carries.
const AUDIT_ENTRY_BYTES: usize = 150;

/// Result of one write measurement.
#[derive(Debug, Serialize)]
struct WriteResult {
    writer: Writer,
    /// `stratad` replicas (0 for the raw rows).
    replicas: usize,
    clients: usize,
    connections: usize,
    seconds: f64,
    requests: u64,
    requests_per_sec: f64,
    /// Puts and deletes per second (each etcd request is one revision).
    key_changes_per_sec: f64,
    latency: LatencySummary,
    /// `stratad`'s own mean time per PutConfig (from its metrics), ms.
    server_ms: Option<f64>,
    /// `stratad`'s mean time per etcd transaction request, sent to
    /// answered (one request carries a whole group-commit batch), ms.
    store_ms: Option<f64>,
    /// Watchers etcd (member 0) counted as slow at the end of the window
    /// (`etcd_debugging_mvcc_slow_watcher_total`): a watcher whose stream
    /// fell behind is fed from the backend in batches instead of at once.
    slow_watchers: f64,
    /// Events etcd (member 0) queued for watchers that could not take them
    /// at once, during the window (`etcd_debugging_mvcc_pending_events_total`).
    pending_events: f64,
    /// `Txn` calls member 0 handled in the window per request answered in
    /// it (`grpc_server_handled_total`): above 1, transactions were retried.
    txns_per_request: f64,
    cpu: CpuSplit,
    errors: u64,
    first_error: Option<String>,
    /// Compilers, cargo and load generators seen at either end of the window.
    disturbed_by: Vec<String>,
}

impl WriteResult {
    fn name(&self) -> String {
        match self.writer {
            Writer::RawPut => "etcd put".into(),
            Writer::RawTxn => "etcd txn".into(),
            Writer::RawTxnWatched => "etcd txn+w".into(),
            Writer::Stratad => format!("stratad x{}", self.replicas),
        }
    }
}

/// Which system a watch measurement drove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum WatchSystem {
    /// `etcd-client` watchers on the cluster.
    Etcd,
    /// `stratad` on the cluster.
    StratadEtcd,
    /// `stratad` on its embedded store.
    StratadEmbedded,
}

impl WatchSystem {
    fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::StratadEtcd => "stratad/etcd",
            Self::StratadEmbedded => "stratad/embedded",
        }
    }
}

/// Result of one watch measurement.
#[derive(Debug, Serialize)]
struct WatchResult {
    system: WatchSystem,
    subscribers: usize,
    connections: usize,
    changes: usize,
    setup_seconds: f64,
    /// Deliveries and their latency (fields of this object in the JSON).
    #[serde(flatten)]
    delivery: Delivery,
    /// Per change: put call started → first subscriber received it.
    first: LatencySummary,
    /// Put call → acknowledgement.
    put_ack: LatencySummary,
    cpu: CpuSplit,
}

/// The verdicts against the targets in benches/ETCD.md.
#[derive(Debug, Default, Serialize)]
struct Verdict {
    /// Per client count: (clients, stratad ×1 requests/s ÷ raw put
    /// requests/s, same ÷ raw txn requests/s).
    write_ratios: Vec<(usize, f64, Option<f64>)>,
    /// Peak requests/s over the client counts measured: (stratad ×1, raw
    /// put, raw txn of stratad's shape).
    peak: Option<(f64, f64, Option<f64>)>,
    /// p99 of stratad on etcd minus p99 of stratad embedded, ms.
    push_p99_excess_ms: Option<f64>,
    /// p99 of one raw etcd watcher, ms.
    etcd_single_watcher_p99_ms: Option<f64>,
    /// p99 of raw etcd with N watchers, ms.
    etcd_watchers_p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineInfo,
    fsync: LatencySummary,
    etcd_version: Option<String>,
    args: Args,
    writes: Vec<WriteResult>,
    watch: Vec<WatchResult>,
    verdict: Verdict,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run().map_err(|e| e as Box<dyn std::error::Error>)
}

fn run() -> Result<(), BoxError> {
    let args = Args::parse();
    args.watch.check()?;
    if args.clients_per_connection == 0 || args.replicas.contains(&0) || args.clients.contains(&0) {
        return Err("counts must be positive".into());
    }
    let report = block_on(args.run.worker_threads, bench(args))?;

    let tables = render(&report);
    print_report(&tables, &report, report.args.run.json)?;
    let mut failed: Vec<String> = report
        .watch
        .iter()
        .filter(|r| !r.delivery.complete())
        .map(|r| r.delivery.failure(r.system.name(), r.subscribers))
        .collect();
    failed.extend(report.writes.iter().filter(|w| w.errors > 0).map(|w| {
        format!(
            "{} at {} clients: {} failed requests (first: {})",
            w.name(),
            w.clients,
            w.errors,
            w.first_error.as_deref().unwrap_or("?")
        )
    }));
    if !failed.is_empty() {
        return Err(format!("FAILED: {}", failed.join("; ")).into());
    }
    Ok(())
}

async fn bench(args: Args) -> Result<Report, BoxError> {
    let parent = args.run.parent_dir()?;
    let machine = MachineInfo::probe(&parent);
    let fsync = fsync_probe(&parent, 200)?;
    let stratad = stratad_or_default(args.stratad.as_deref())?;
    let version = etcd_version(&args.etcd);
    eprintln!(
        "etcd-bench: {} CPUs; data in {} ({}); fdatasync p50 {:.2} ms; stratad {}; {}",
        machine.cpus,
        machine.dir.display(),
        machine.fs_type.as_deref().unwrap_or("?"),
        fsync.p50_ms,
        stratad.display(),
        version.as_deref().unwrap_or("etcd version unknown")
    );
    if machine.in_memory() {
        eprintln!("WARNING: the data directories are in memory; commits cost no disk time");
    }
    let busy = disturbing_processes();
    if !busy.is_empty() {
        eprintln!("WARNING: running now: {}", busy.join(", "));
    }

    let cluster = start_cluster(&args.etcd, &parent, args.members).await?;
    make_leader(&cluster, 0).await?;
    eprintln!(
        "etcd cluster of {} members up, leader: member {}",
        args.members,
        cluster.leader().await.ok_or("no etcd leader")?
    );
    let mut writes = Vec::new();
    let mut watch = Vec::new();

    if args.part != Part::Watch {
        for &n in &args.clients {
            let mut kinds = vec![Writer::RawPut];
            if !args.no_raw_txn {
                kinds.push(Writer::RawTxn);
                kinds.push(Writer::RawTxnWatched);
            }
            for kind in kinds {
                let r = measure_raw_writes(&cluster, kind, n, &args).await?;
                print_write(&r);
                writes.push(r);
            }
            for &replicas in &args.replicas {
                let r =
                    measure_stratad_writes(&cluster, &stratad, &parent, replicas, n, &args).await?;
                print_write(&r);
                writes.push(r);
            }
        }
    }

    if args.part != Part::Writes {
        for (system, n) in [
            (WatchSystem::Etcd, 1),
            (WatchSystem::Etcd, args.subscribers),
            (WatchSystem::StratadEtcd, args.subscribers),
        ] {
            let r = watch_run(system, n, Some(&cluster), &stratad, &parent, &args).await?;
            print_watch(&r);
            watch.push(r);
        }
    }
    let pids = cluster.pids();
    drop(cluster);
    // The members are gone before the embedded run, so their heartbeats do
    // not share the CPU with it.
    for pid in pids {
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if args.part != Part::Writes {
        let r = watch_run(
            WatchSystem::StratadEmbedded,
            args.subscribers,
            None,
            &stratad,
            &parent,
            &args,
        )
        .await?;
        print_watch(&r);
        watch.push(r);
    }

    let verdict = verdict(&writes, &watch, args.subscribers);
    Ok(Report {
        machine,
        fsync,
        etcd_version: version,
        args,
        writes,
        watch,
        verdict,
    })
}

fn print_write(r: &WriteResult) {
    eprintln!(
        "  {:<11} {:>4} clients: {:>8.0} req/s {:>8.0} keys/s, p50 {:.2} ms, p99 {:.2} ms{}",
        r.name(),
        r.clients,
        r.requests_per_sec,
        r.key_changes_per_sec,
        r.latency.p50_ms,
        r.latency.p99_ms,
        if r.errors > 0 { " ERRORS" } else { "" }
    );
}

fn print_watch(r: &WatchResult) {
    eprintln!(
        "  {:<16} {:>5} subscribers: {} / {} deliveries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        r.system.name(),
        r.subscribers,
        r.delivery.deliveries,
        r.delivery.expected_deliveries,
        r.delivery.latency.p50_ms,
        r.delivery.latency.p99_ms,
        r.delivery.latency.max_ms
    );
}

/// A unique tag for key prefixes, so that no measurement sees another's keys.
fn tag() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn etcd_connect(endpoint: &str) -> Result<etcd_client::Client, BoxError> {
    Ok(etcd_client::Client::connect([endpoint], None).await?)
}

/// What one writer task saw in the window.
struct WriterRecord {
    latency: Histogram<u64>,
    key_changes: u64,
    errors: u64,
    first_error: Option<String>,
}

impl WriterRecord {
    fn new() -> Result<Self, BoxError> {
        Ok(Self {
            latency: new_histogram()?,
            key_changes: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn failed(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// One writer's connection.
enum WriteClient {
    // Boxed: etcd's clients are large next to a tonic channel.
    Raw(Box<etcd_client::KvClient>),
    Stratad(ConfigServiceClient<Channel>),
}

/// Loops writes of writer `index`'s own key until `end`; records those
/// answered in `[start, end)`.
async fn writer_task(
    client: WriteClient,
    kind: Writer,
    prefix: String,
    index: usize,
    value_size: usize,
    start: Instant,
    end: Instant,
) -> Result<WriterRecord, BoxError> {
    let mut record = WriterRecord::new()?;
    let in_window = |at: Instant| at >= start && at < end;
    let layer_key = format!("{prefix}layer/k-{index:03}");
    let tenant_key = format!("{prefix}tenant");
    let config_key = format!("svc/k-{index:03}.txt");
    // The layer's last mod revision, as `stratad`'s view would know it.
    let mut layer_rev = 0_i64;
    let mut seq = 0_u64;
    let mut client = client;
    while Instant::now() < end {
        seq += 1;
        let value = value_for(usize::try_from(seq)?, value_size);
        let began = Instant::now();
        // Key changes of this request: puts (layer, history version,
        // audit entry) plus the pruning delete.
        let changes = match kind {
            Writer::RawPut => 1,
            Writer::RawTxn | Writer::RawTxnWatched | Writer::Stratad => {
                3 + u64::from(seq > HISTORY_KEEP)
            }
        };
        let outcome: Result<(), String> = match (&mut client, kind) {
            (WriteClient::Raw(kv), Writer::RawPut) => kv
                .put(layer_key.as_str(), value, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (WriteClient::Raw(kv), _) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let version_key = format!("{prefix}version/k-{index:03}/{seq:020}");
                // `stratad` puts an audit entry (~150 bytes) in every
                // mutation's transaction.
                let audit_key = format!("{prefix}audit/{index:03}-{seq:020}");
                let mut ops = vec![
                    TxnOp::put(version_key.as_str(), value.clone(), None),
                    TxnOp::put(layer_key.as_str(), value, None),
                    TxnOp::put(audit_key.as_str(), vec![b'a'; AUDIT_ENTRY_BYTES], None),
                ];
                if seq > HISTORY_KEEP {
                    let old = seq - HISTORY_KEEP;
                    ops.push(TxnOp::delete(
                        format!("{prefix}version/k-{index:03}/{old:020}"),
                        None,
                    ));
                }
                let txn = Txn::new()
                    .when([
                        Compare::version(tenant_key.as_str(), CompareOp::Greater, 0),
                        Compare::mod_revision(layer_key.as_str(), CompareOp::Equal, layer_rev),
                        Compare::version(version_key.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then(ops);
                match kv.txn(txn).await {
                    Ok(r) if r.succeeded() => {
                        layer_rev = r.header().map_or(0, |h| h.revision());
                        Ok(())
                    }
                    Ok(_) => Err("transaction compare failed".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            (WriteClient::Stratad(c), _) => c
                .put_config(PutConfigRequest {
                    project: PROJECT.into(),
                    tenant: TENANT.into(),
                    key: config_key.clone(),
                    value,
                    format: "text".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        let acked = Instant::now();
        match outcome {
            Ok(()) if in_window(acked) => {
                record.latency.saturating_record(micros(acked - began));
                record.key_changes += changes;
            }
            Ok(()) => {}
            Err(e) => {
                record.failed(e);
                // A failing server must not turn the loop into a busy spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(record)
}

/// What a write window measured.
struct Window {
    latency: Histogram<u64>,
    changes: u64,
    errors: u64,
    first_error: Option<String>,
    cpu: CpuSplit,
    server_ms: Option<f64>,
    store_ms: Option<f64>,
    slow_watchers: f64,
    pending_events: f64,
    txns: f64,
    disturbed_by: Vec<String>,
}

/// Runs `clients` writer tasks over the warm-up and the window, and sums
/// what they saw.
async fn drive_writers(
    clients: Vec<WriteClient>,
    kind: Writer,
    prefix: &str,
    cluster: &EtcdCluster,
    stratad: &[&Daemon],
    args: &Args,
) -> Result<Window, BoxError> {
    const PENDING: &str = "etcd_debugging_mvcc_pending_events_total";
    const SLOW: &str = "etcd_debugging_mvcc_slow_watcher_total";
    const HANDLED: &str = "grpc_server_handled_total";
    const TXN: &str = r#"grpc_method="Txn""#;
    let etcd_pids = cluster.pids();
    let etcd_pids = etcd_pids.as_slice();
    let mut disturbed_by = disturbing_processes();
    let warmup = secs(args.warmup_secs, "--warmup-secs")?;
    let window = secs(args.duration_secs, "--duration-secs")?;
    let start = Instant::now() + warmup;
    let end = start + window;
    let tasks: Vec<JoinHandle<Result<WriterRecord, BoxError>>> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(writer_task(
                c,
                kind,
                prefix.to_owned(),
                i,
                args.watch.value_size,
                start,
                end,
            ))
        })
        .collect();
    let stratad_pids: Vec<u32> = stratad.iter().map(|d| d.pid()).collect();
    tokio::time::sleep_until(start.into()).await;
    let cpu_start = CpuMarks::take(etcd_pids, &stratad_pids);
    let pending_start = cluster.metric(0, PENDING, "").await?;
    let txns_start = cluster.metric(0, HANDLED, TXN).await?;
    let mut server_start = ServerTimes::default();
    for d in stratad {
        server_start.add(&ServerTimes::read(d).await?);
    }
    tokio::time::sleep_until(end.into()).await;
    let cpu = CpuMarks::take(etcd_pids, &stratad_pids).since(cpu_start);
    let slow_watchers = cluster.metric(0, SLOW, "").await?;
    let pending_events = cluster.metric(0, PENDING, "").await? - pending_start;
    let txns = cluster.metric(0, HANDLED, TXN).await? - txns_start;
    let mut server_end = ServerTimes::default();
    for d in stratad {
        server_end.add(&ServerTimes::read(d).await?);
    }
    disturbed_by.extend(disturbing_processes());
    disturbed_by.sort();
    disturbed_by.dedup();
    let mut latency = new_histogram()?;
    let (mut changes, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        let r = t.await??;
        latency.add(&r.latency)?;
        changes += r.key_changes;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let mean_ms =
        |sum: f64, count: f64| (!stratad.is_empty() && count > 0.0).then(|| sum / count * 1000.0);
    let server_ms = mean_ms(
        server_end.put_sum - server_start.put_sum,
        server_end.put_count - server_start.put_count,
    );
    let store_ms = mean_ms(
        server_end.store_sum - server_start.store_sum,
        server_end.store_count - server_start.store_count,
    );
    Ok(Window {
        latency,
        changes,
        errors,
        first_error,
        cpu,
        server_ms,
        store_ms,
        slow_watchers,
        pending_events,
        txns,
        disturbed_by,
    })
}

/// `stratad`'s own PutConfig times and etcd request times so far.
#[derive(Default)]
struct ServerTimes {
    put_sum: f64,
    put_count: f64,
    store_sum: f64,
    store_count: f64,
}

impl ServerTimes {
    async fn read(d: &Daemon) -> Result<Self, BoxError> {
        let text = d.metrics().await?;
        let (put_sum, put_count) = histogram_totals(
            &text,
            "strata_rpc_duration_seconds",
            r#"op="/strata.v1.ConfigService/PutConfig""#,
        );
        let (store_sum, store_count) =
            histogram_totals(&text, "strata_store_write_duration_seconds", "");
        Ok(Self {
            put_sum,
            put_count,
            store_sum,
            store_count,
        })
    }

    fn add(&mut self, other: &Self) {
        self.put_sum += other.put_sum;
        self.put_count += other.put_count;
        self.store_sum += other.store_sum;
        self.store_count += other.store_count;
    }
}

async fn measure_raw_writes(
    cluster: &EtcdCluster,
    kind: Writer,
    n: usize,
    args: &Args,
) -> Result<WriteResult, BoxError> {
    compact(cluster).await?;
    let endpoint = cluster.endpoints()[0].clone();
    let prefix = format!("/etcd-bench/{}/", tag());
    let mut setup = etcd_connect(&endpoint).await?;
    // The tenant key the transactions' first compare asks for.
    setup.put(format!("{prefix}tenant"), "t", None).await?;
    let connections = n.div_ceil(args.clients_per_connection);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(etcd_connect(&endpoint).await?.kv_client());
    }
    let clients = (0..n)
        .map(|i| WriteClient::Raw(Box::new(conns[i % connections].clone())))
        .collect();
    // The watcher has a connection of its own, like a replica's view, and
    // reads every event as it comes.
    let watcher = if kind == Writer::RawTxnWatched {
        let mut client = etcd_connect(&endpoint).await?;
        let mut stream = client
            .watch(
                prefix.as_str(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await?;
        let drain = tokio::spawn(async move {
            let mut events = 0_u64;
            while let Ok(Some(resp)) = stream.message().await {
                events += resp.events().len() as u64;
            }
            events
        });
        Some((client, drain))
    } else {
        None
    };
    let window = drive_writers(clients, kind, &prefix, cluster, &[], args).await?;
    if let Some((_client, drain)) = watcher {
        // Ends the stream, and with it the watch.
        drain.abort();
    }
    // Later measurements start from the same (small) database.
    setup
        .delete(
            prefix.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    Ok(write_result(kind, 0, n, connections, args, window))
}

fn write_result(
    writer: Writer,
    replicas: usize,
    clients: usize,
    connections: usize,
    args: &Args,
    w: Window,
) -> WriteResult {
    let seconds = args.duration_secs;
    WriteResult {
        writer,
        replicas,
        clients,
        connections,
        seconds,
        requests: w.latency.len(),
        requests_per_sec: w.latency.len() as f64 / seconds,
        key_changes_per_sec: w.changes as f64 / seconds,
        latency: LatencySummary::from_micros(&w.latency),
        server_ms: w.server_ms,
        store_ms: w.store_ms,
        slow_watchers: w.slow_watchers,
        pending_events: w.pending_events,
        txns_per_request: if w.latency.is_empty() {
            0.0
        } else {
            w.txns / w.latency.len() as f64
        },
        cpu: w.cpu,
        errors: w.errors,
        first_error: w.first_error,
        disturbed_by: w.disturbed_by,
    }
}

/// Starts `replicas` daemons on the cluster under a fresh prefix.
async fn start_replicas(
    cluster: &EtcdCluster,
    stratad: &std::path::Path,
    parent: &std::path::Path,
    replicas: usize,
) -> Result<Vec<Daemon>, BoxError> {
    let backend = Backend::Etcd {
        endpoints: cluster.endpoints(),
        prefix: format!("/strata-bench/{}/", tag()),
    };
    let mut daemons = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        daemons.push(Daemon::start(stratad, parent, &backend).await?);
    }
    Ok(daemons)
}

/// Waits until a `ConfigService.Watch` on `endpoint` gets its snapshot, so
/// that replica's view has the tenant.
async fn wait_tenant(endpoint: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = ConfigServiceClient::new(connect(endpoint).await?);
    loop {
        let request = WatchConfigRequest {
            project: PROJECT.into(),
            tenant: TENANT.into(),
            keys: vec!["svc/none.txt".into()],
            ..Default::default()
        };
        if let Ok(r) = client.watch(request).await {
            let mut stream = r.into_inner();
            if matches!(stream.message().await, Ok(Some(_))) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("tenant not visible through {endpoint} after 10 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn measure_stratad_writes(
    cluster: &EtcdCluster,
    stratad: &std::path::Path,
    parent: &std::path::Path,
    replicas: usize,
    n: usize,
    args: &Args,
) -> Result<WriteResult, BoxError> {
    compact(cluster).await?;
    let daemons = start_replicas(cluster, stratad, parent, replicas).await?;
    create_tenant(connect(&daemons[0].endpoint()).await?).await?;
    for d in &daemons {
        wait_tenant(&d.endpoint()).await?;
    }
    // Clients i → replica i mod R; each replica gets its share of the
    // connections, `--clients-per-connection` clients each.
    let mut per_replica: Vec<Vec<Channel>> = Vec::with_capacity(replicas);
    let mut connections = 0;
    for (r, d) in daemons.iter().enumerate() {
        let share = (r..n).step_by(replicas).count();
        let count = share.div_ceil(args.clients_per_connection).max(1);
        connections += share.div_ceil(args.clients_per_connection);
        let mut channels = Vec::with_capacity(count);
        for _ in 0..count {
            channels.push(connect(&d.endpoint()).await?);
        }
        per_replica.push(channels);
    }
    let clients = (0..n)
        .map(|i| {
            let channels = &per_replica[i % replicas];
            let slot = (i / replicas) % channels.len();
            WriteClient::Stratad(ConfigServiceClient::new(channels[slot].clone()))
        })
        .collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    let outcome = drive_writers(clients, Writer::Stratad, "", cluster, &refs, args).await;
    let logs: Vec<String> = daemons.iter().map(Daemon::log_tail).collect();
    for d in daemons {
        d.stop().await?;
    }
    let mut window = outcome?;
    if window.errors > 0 {
        window.first_error = window
            .first_error
            .map(|e| format!("{e}; replica logs:\n{}", logs.join("\n---\n")));
    }
    Ok(write_result(
        Writer::Stratad,
        replicas,
        n,
        connections,
        args,
        window,
    ))
}

// ---- watch delivery (the measurement of subscriber-bench: `watchers`) ----

/// One watch measurement; `cluster` is `None` for the embedded store.
async fn watch_run(
    system: WatchSystem,
    n: usize,
    cluster: Option<&EtcdCluster>,
    stratad: &std::path::Path,
    parent: &std::path::Path,
    args: &Args,
) -> Result<WatchResult, BoxError> {
    if let Some(c) = cluster {
        compact(c).await?;
    }
    let daemon = match (system, cluster) {
        (WatchSystem::Etcd, _) => None,
        (WatchSystem::StratadEtcd, Some(c)) => start_replicas(c, stratad, parent, 1).await?.pop(),
        (WatchSystem::StratadEtcd, None) => return Err("no etcd cluster".into()),
        (WatchSystem::StratadEmbedded, _) => {
            Some(Daemon::start(stratad, parent, &Backend::Embedded).await?)
        }
    };
    let result = watch_measure(system, n, cluster, daemon.as_ref(), args).await;
    if let Some(d) = daemon {
        let tail = d.log_tail();
        d.stop().await?;
        return result.map_err(|e| format!("{e}; stratad log:\n{tail}").into());
    }
    result
}

async fn watch_measure(
    system: WatchSystem,
    n: usize,
    cluster: Option<&EtcdCluster>,
    daemon: Option<&Daemon>,
    args: &Args,
) -> Result<WatchResult, BoxError> {
    let connections = args.watch.connections(n).min(n);
    let etcd_pids = cluster.map(EtcdCluster::pids).unwrap_or_default();
    let stratad_pids: Vec<u32> = daemon.iter().map(|d| d.pid()).collect();
    let etcd_endpoint = cluster.map(|c| c.endpoints()[0].clone());
    let etcd_key = format!("/etcd-bench/{}/svc/bench.txt", tag());
    let config_key = "svc/bench.txt";

    // The key exists before anyone subscribes, so every snapshot has it.
    let mut putter = match (daemon, &etcd_endpoint) {
        (Some(d), _) => {
            let channel = connect(&d.endpoint()).await?;
            create_tenant(channel.clone()).await?;
            Putter::Stratad(ConfigServiceClient::new(channel), config_key.into())
        }
        (None, Some(e)) => Putter::Etcd(
            Box::new(etcd_connect(e).await?.kv_client()),
            etcd_key.clone(),
        ),
        (None, None) => return Err("nothing to watch".into()),
    };
    putter.put(value_for(0, args.watch.value_size)).await?;

    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        match (daemon, &etcd_endpoint) {
            (Some(d), _) => conns.push(WatchConn::Stratad(ConfigServiceClient::new(
                connect(&d.endpoint()).await?,
            ))),
            (None, Some(e)) => conns.push(WatchConn::Etcd(Box::new(
                etcd_connect(e).await?.watch_client(),
            ))),
            (None, None) => return Err("nothing to watch".into()),
        }
    }

    // Stopped on every way out of this function (dropped).
    let subscribers = Subscribers::spawn(&conns, n, args.watch.changes, config_key, &etcd_key)?;
    let setup_seconds = subscribers
        .wait_ready(
            system.name(),
            secs(args.run.setup_timeout_secs, "--setup-timeout-secs")?,
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu_start = CpuMarks::take(&etcd_pids, &stratad_pids);
    let pushed = subscribers
        .deliver(
            &mut putter,
            &args.watch,
            secs(args.run.delivery_timeout_secs, "--delivery-timeout-secs")?,
        )
        .await?;
    let cpu = CpuMarks::take(&etcd_pids, &stratad_pids).since(cpu_start);
    let outcome = subscribers
        .finish(&pushed, Duration::from_millis(300))
        .await?;
    drop(conns);
    if let Some(e) = &etcd_endpoint {
        // Later measurements start from the same (small) database.
        etcd_connect(e)
            .await?
            .delete(etcd_key.as_str(), None)
            .await?;
    }

    Ok(WatchResult {
        system,
        subscribers: n,
        connections,
        changes: args.watch.changes,
        setup_seconds,
        delivery: outcome.delivery,
        first: outcome.first,
        put_ack: outcome.put_ack,
        cpu,
    })
}

fn verdict(writes: &[WriteResult], watch: &[WatchResult], subscribers: usize) -> Verdict {
    let mut v = Verdict::default();
    let find = |writer: Writer, replicas: usize, clients: usize| {
        writes
            .iter()
            .find(|w| w.writer == writer && w.replicas == replicas && w.clients == clients)
            .map(|w| w.requests_per_sec)
    };
    let mut clients: Vec<usize> = writes.iter().map(|w| w.clients).collect();
    clients.dedup();
    for n in clients {
        if let (Some(s), Some(put)) = (find(Writer::Stratad, 1, n), find(Writer::RawPut, 0, n))
            && put > 0.0
        {
            let txn = find(Writer::RawTxn, 0, n)
                .filter(|t| *t > 0.0)
                .map(|t| s / t);
            v.write_ratios.push((n, s / put, txn));
        }
    }
    let peak = |writer: Writer, replicas: usize| {
        writes
            .iter()
            .filter(|w| w.writer == writer && w.replicas == replicas)
            .map(|w| w.requests_per_sec)
            .reduce(f64::max)
    };
    if let (Some(s), Some(put)) = (peak(Writer::Stratad, 1), peak(Writer::RawPut, 0)) {
        v.peak = Some((s, put, peak(Writer::RawTxn, 0)));
    }
    let p99 = |system: WatchSystem, n: usize| {
        watch
            .iter()
            .find(|w| w.system == system && w.subscribers == n)
            .map(|w| w.delivery.latency.p99_ms)
    };
    if let (Some(on_etcd), Some(embedded)) = (
        p99(WatchSystem::StratadEtcd, subscribers),
        p99(WatchSystem::StratadEmbedded, subscribers),
    ) {
        v.push_p99_excess_ms = Some(on_etcd - embedded);
    }
    v.etcd_single_watcher_p99_ms = p99(WatchSystem::Etcd, 1);
    v.etcd_watchers_p99_ms = p99(WatchSystem::Etcd, subscribers);
    v
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let a = &report.args;
    let _ = writeln!(
        out,
        "etcd-bench — stratad on a {}-member etcd cluster against etcd itself",
        a.members
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}); {}; data in {} ({} on {}); fdatasync p50 {:.2} ms, p99 {:.2} ms",
        m.cpus,
        m.cpu_model.as_deref().unwrap_or("unknown CPU"),
        report
            .etcd_version
            .as_deref()
            .unwrap_or("etcd version unknown"),
        m.dir.display(),
        m.fs_type.as_deref().unwrap_or("?"),
        m.device.as_deref().unwrap_or("?"),
        report.fsync.p50_ms,
        report.fsync.p99_ms,
    );
    if !report.writes.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Writes ({} s window after {} s warm-up; {} B values; ≤ {} clients per connection; \
             latency ms; CPU-seconds in the window)\n\
             writer      clients conns |    req/s   keys/s | p50     p99   | srv ms  etcd | cpu etcd \
             stratad bench other | slow pending txn/req | err",
            a.duration_secs, a.warmup_secs, a.watch.value_size, a.clients_per_connection
        );
        for w in &report.writes {
            let _ = writeln!(
                out,
                "{:<11} {:>7} {:>5} | {:>8.0} {:>8.0} | {:>6.2} {:>6.2} | {:>6} {:>5} | {:>8.2} {:>7.2} \
                 {:>5.2} {:>5.2} | {:>4.0} {:>7.0} {:>7.2} | {:>3}{}",
                w.name(),
                w.clients,
                w.connections,
                w.requests_per_sec,
                w.key_changes_per_sec,
                w.latency.p50_ms,
                w.latency.p99_ms,
                w.server_ms.map_or("-".into(), |s| format!("{s:.2}")),
                w.store_ms.map_or("-".into(), |s| format!("{s:.2}")),
                w.cpu.etcd,
                w.cpu.stratad,
                w.cpu.bench,
                w.cpu.other,
                w.slow_watchers,
                w.pending_events,
                w.txns_per_request,
                w.errors,
                if w.disturbed_by.is_empty() {
                    String::new()
                } else {
                    format!("  disturbed by: {}", w.disturbed_by.join(", "))
                }
            );
        }
    }
    if !report.watch.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Watch delivery ({} changes, {} ms apart; put call → subscriber received; ms)\n\
             system            subs conns | deliveries miss dup unexp err |    p50    p99  \
             p99.9    max | first p50 p99 | put ack p50 | cpu etcd stratad bench other",
            a.watch.changes, a.watch.interval_ms
        );
        for r in &report.watch {
            let _ = writeln!(
                out,
                "{:<16} {:>5} {:>5} | {} | {:>5.2} {:>6.2} | {:>11.2} | {:>8.2} {:>7.2} {:>5.2} {:>5.2}",
                r.system.name(),
                r.subscribers,
                r.connections,
                r.delivery.columns(4),
                r.first.p50_ms,
                r.first.p99_ms,
                r.put_ack.p50_ms,
                r.cpu.etcd,
                r.cpu.stratad,
                r.cpu.bench,
                r.cpu.other,
            );
        }
    }
    let v = &report.verdict;
    let _ = writeln!(out);
    let _ = writeln!(out, "Against the targets in benches/ETCD.md");
    for (n, put, txn) in &v.write_ratios {
        let _ = writeln!(
            out,
            "  writes, {n} clients: stratad x1 / etcd put = {put:.2} (target ≥ 0.80: {}){}",
            if *put >= 0.8 { "met" } else { "NOT met" },
            txn.map(|t| format!("; / etcd txn of the same shape = {t:.2}"))
                .unwrap_or_default()
        );
    }
    if let Some((s, put, txn)) = v.peak
        && put > 0.0
    {
        let _ = writeln!(
            out,
            "  peak writes/s over the client counts: stratad x1 {s:.0} / etcd put {put:.0} = {:.2} \
             (target ≥ 0.80: {}){}",
            s / put,
            if s / put >= 0.8 { "met" } else { "NOT met" },
            txn.filter(|t| *t > 0.0)
                .map(|t| format!("; / etcd txn of the same shape {t:.0} = {:.2}", s / t))
                .unwrap_or_default()
        );
    }
    if let Some(excess) = v.push_p99_excess_ms {
        let bound = v.etcd_single_watcher_p99_ms;
        let _ = writeln!(
            out,
            "  push p99 at {} subscribers: stratad/etcd − stratad/embedded = {excess:.2} ms; \
             etcd's own watch p99: {} (1 watcher), {} ({} watchers) → {}",
            a.subscribers,
            bound.map_or("-".into(), |b| format!("{b:.2} ms")),
            v.etcd_watchers_p99_ms
                .map_or("-".into(), |b| format!("{b:.2} ms")),
            a.subscribers,
            match (bound, v.etcd_watchers_p99_ms) {
                (Some(one), _) if excess <= one => "met (even against 1 watcher)",
                (_, Some(many)) if excess <= many => "met against etcd's p99 at the same count",
                _ => "NOT met",
            }
        );
    }
    out
}
