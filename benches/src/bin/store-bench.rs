#![allow(clippy::print_stdout)]
//! `store-bench`: load generator for the embedded store (`EmbeddedStore`).
//!
//! Two measurements, each on a fresh store in a temporary directory:
//!
//! - **puts**: N tokio tasks each loop `store.put(unique key, value)` for a
//!   fixed time after a warm-up; reports acknowledged (durable) puts per
//!   second, the ack latency, and how the writer thread batched them.
//! - **watch**: N watch streams on one prefix, each driven by its own task,
//!   then a series of spaced puts under that prefix; for every (watcher,
//!   put) pair the delivery latency is measured from the moment the put was
//!   sent and from the moment its commit was acknowledged. Every watcher
//!   must receive every put, or the run fails.
//! - **fanout** (only on request): the watch measurement with the store
//!   replaced by a bare broadcast channel, as a floor for the watch figures.
//!
//! Results go to stdout as tables, or as JSON with `--json` (the tables then
//! go to stderr). Run in release mode:
//!
//! ```text
//! cargo run --release -p strata-benches --bin store-bench -- --help
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde::Serialize;
use strata_benches::{
    BoxError, LatencySummary, MachineInfo, WriterMetrics, WriterSnapshot, fsync_probe, micros,
    nanos, new_histogram, print_report, process_write_bytes, runtime, secs,
};
use strata_server::store::embedded::{EmbeddedOptions, EmbeddedStore};
use strata_server::store::{KeyRange, Store, WatchBatch, WatchStream};
use tokio::sync::{broadcast, oneshot};

/// Which measurements to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Bench {
    /// Durable put throughput and latency.
    Puts,
    /// Watch delivery latency.
    Watch,
    /// Puts, then watch.
    All,
    /// Baseline for `watch`, no store involved: the same watcher tasks fed by
    /// a plain tokio broadcast channel that an OS thread publishes to, as the
    /// store's writer thread does. Shows what the fan-out costs before any
    /// store code runs.
    Fanout,
}

/// Load generator for Strata's embedded store.
#[derive(Debug, Parser, Serialize)]
#[command(version, about)]
struct Args {
    /// Directory to create the temporary stores in (default: the system temp
    /// dir). Must be on the disk under test, not tmpfs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which measurements to run.
    #[arg(long, value_enum, default_value_t = Bench::All)]
    bench: Bench,
    /// Concurrent writer counts for the put benchmark.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 16, 128])]
    writers: Vec<usize>,
    /// Warm-up before each put measurement, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Length of each put measurement, seconds.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Value size in bytes (at least 16 for the watch benchmark).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Watcher counts for the watch benchmark.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 100, 10_000])]
    watchers: Vec<usize>,
    /// Puts per watch measurement.
    #[arg(long, default_value_t = 200)]
    watch_puts: usize,
    /// Pause after each acknowledged put of the watch benchmark, ms.
    #[arg(long, default_value_t = 5)]
    watch_interval_ms: u64,
    /// How long watchers may take to receive everything after the last put
    /// before the run is declared failed, seconds.
    #[arg(long, default_value_t = 60.0)]
    watch_timeout_secs: f64,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Override `EmbeddedOptions::max_batch`.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Override `EmbeddedOptions::watch_buffer`.
    #[arg(long)]
    watch_buffer: Option<usize>,
    /// fdatasync samples of the raw disk probe (0: skip).
    #[arg(long, default_value_t = 200)]
    fsync_samples: usize,
    /// Print the results as JSON on stdout (tables go to stderr).
    #[arg(long)]
    json: bool,
}

/// Result of one put measurement.
#[derive(Debug, Serialize)]
struct PutResult {
    writers: usize,
    /// Puts acknowledged inside the measurement window.
    acked: u64,
    seconds: f64,
    puts_per_sec: f64,
    /// Put call → durable acknowledgement.
    latency: LatencySummary,
    /// Writer-thread batching during the window.
    writer: WriterSnapshot,
    /// Bytes the process wrote to storage per acknowledged put during the
    /// window (`/proc/self/io`), when known.
    disk_bytes_per_put: Option<f64>,
    /// Share of the window the writer thread spent applying and committing
    /// batches (1.0: never idle, so it is the bottleneck).
    writer_busy: f64,
}

/// Result of one watch measurement.
#[derive(Debug, Serialize)]
struct WatchResult {
    watchers: usize,
    puts: usize,
    /// Seconds to create the watch streams and spawn their tasks.
    setup_seconds: f64,
    expected_deliveries: u64,
    deliveries: u64,
    missing: u64,
    duplicates: u64,
    unexpected: u64,
    /// Watchers whose stream failed or ended, with the first error.
    stream_errors: u64,
    first_error: Option<String>,
    /// Put sent → watcher received.
    send_to_recv: LatencySummary,
    /// Put acknowledged to the putter → watcher received (0 when the watcher
    /// got it before the ack).
    ack_to_recv: LatencySummary,
    /// Deliveries that arrived before the putter's ack.
    before_ack: u64,
    /// Per put: first delivery → last delivery across all watchers.
    fanout_spread: LatencySummary,
    /// Put sent → ack, for the spaced puts.
    put_ack: LatencySummary,
    /// The puts whose last delivery came latest after the put was sent,
    /// slowest first: with N watchers every put is 1/puts of the samples, so
    /// these few decide p99.
    slowest_puts: Vec<SlowPut>,
    writer: WriterSnapshot,
}

/// Timing of one put of the watch benchmark.
#[derive(Debug, Serialize)]
struct SlowPut {
    index: usize,
    /// Put sent → acknowledged, ms.
    ack_ms: f64,
    /// Put sent → first delivery, ms.
    first_ms: f64,
    /// Put sent → last delivery, ms.
    last_ms: f64,
}

impl WatchResult {
    fn complete(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.stream_errors == 0
            && self.deliveries == self.expected_deliveries
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineInfo,
    args: Args,
    disk_fdatasync: Option<LatencySummary>,
    puts: Vec<PutResult>,
    watch: Vec<WatchResult>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run().map_err(|e| e as Box<dyn std::error::Error>)
}

fn run() -> Result<(), BoxError> {
    let args = Args::parse();
    if args.value_size < 16 && !matches!(args.bench, Bench::Puts) {
        return Err("--value-size must be at least 16 for the watch benchmark".into());
    }
    let metrics = WriterMetrics::install()?;
    let runtime = runtime(args.worker_threads)?;
    let report = runtime.block_on(bench(args, metrics))?;

    let tables = render(&report);
    print_report(&tables, &report, report.args.json)?;
    let failed: Vec<String> = report
        .watch
        .iter()
        .filter(|w| !w.complete())
        .map(|w| {
            format!(
                "{} watchers: {} of {} deliveries, {} missing, {} duplicate, {} unexpected, \
                 {} stream errors{}",
                w.watchers,
                w.deliveries,
                w.expected_deliveries,
                w.missing,
                w.duplicates,
                w.unexpected,
                w.stream_errors,
                w.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if !failed.is_empty() {
        return Err(format!("WATCH DELIVERY INCOMPLETE: {}", failed.join("; ")).into());
    }
    Ok(())
}

async fn bench(args: Args, metrics: WriterMetrics) -> Result<Report, BoxError> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)?;
    let root = tempfile::Builder::new()
        .prefix("strata-bench-")
        .tempdir_in(&parent)?;
    let machine = MachineInfo::probe(root.path());
    eprintln!(
        "store-bench: {} CPUs, stores in {} ({} on {})",
        machine.cpus,
        machine.dir.display(),
        machine.fs_type.as_deref().unwrap_or("unknown fs"),
        machine.device.as_deref().unwrap_or("unknown device"),
    );
    if machine.in_memory() {
        eprintln!(
            "WARNING: {} is in memory; fsync costs nothing here. Use --dir.",
            parent.display()
        );
    }

    let disk_fdatasync = if args.fsync_samples > 0 {
        let (dir, n) = (root.path().to_path_buf(), args.fsync_samples);
        Some(tokio::task::spawn_blocking(move || fsync_probe(&dir, n)).await??)
    } else {
        None
    };

    let mut puts = Vec::new();
    if matches!(args.bench, Bench::Puts | Bench::All) {
        for &writers in &args.writers {
            eprintln!("puts: {writers} writers ...");
            let r = put_bench(root.path(), writers, &args, &metrics).await?;
            eprintln!(
                "  {:.0} puts/s, p50 {:.2} ms, p99 {:.2} ms, mean batch {:.1}",
                r.puts_per_sec, r.latency.p50_ms, r.latency.p99_ms, r.writer.batch_size.mean
            );
            puts.push(r);
        }
    }
    let mut watch = Vec::new();
    if !matches!(args.bench, Bench::Puts) {
        let baseline = args.bench == Bench::Fanout;
        for &watchers in &args.watchers {
            let what = if baseline { "fanout baseline" } else { "watch" };
            eprintln!("{what}: {watchers} watchers x {} puts ...", args.watch_puts);
            let source = if baseline {
                Source::Fanout(Fanout::start(options(&args).watch_buffer)?)
            } else {
                let dir = root.path().join(format!("watch-{watchers}"));
                Source::Store(open_store(dir, options(&args)).await?)
            };
            let r = watch_bench(source, watchers, &args, &metrics).await?;
            eprintln!(
                "  {} / {} deliveries, send->recv p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                r.deliveries,
                r.expected_deliveries,
                r.send_to_recv.p50_ms,
                r.send_to_recv.p99_ms,
                r.send_to_recv.max_ms
            );
            watch.push(r);
        }
    }
    let root_path = root.path().to_path_buf();
    tokio::task::spawn_blocking(move || root.close())
        .await?
        .map_err(|e| format!("cannot remove {}: {e}", root_path.display()))?;
    Ok(Report {
        machine,
        args,
        disk_fdatasync,
        puts,
        watch,
    })
}

fn options(args: &Args) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::default();
    if let Some(n) = args.max_batch {
        o.max_batch = n;
    }
    if let Some(n) = args.watch_buffer {
        o.watch_buffer = n;
    }
    o
}

async fn open_store(
    dir: PathBuf,
    options: EmbeddedOptions,
) -> Result<Arc<EmbeddedStore>, BoxError> {
    let store =
        tokio::task::spawn_blocking(move || EmbeddedStore::open_with(&dir, options)).await??;
    Ok(Arc::new(store))
}

/// Drops the store off the runtime: the last handle joins the writer thread.
async fn close_store(store: Arc<EmbeddedStore>) -> Result<(), BoxError> {
    tokio::task::spawn_blocking(move || drop(store)).await?;
    Ok(())
}

async fn put_bench(
    root: &Path,
    writers: usize,
    args: &Args,
    metrics: &WriterMetrics,
) -> Result<PutResult, BoxError> {
    let store = open_store(root.join(format!("puts-{writers}")), options(args)).await?;
    let warmup = secs(args.warmup_secs, "--warmup-secs")?;
    let window = secs(args.duration_secs, "--duration-secs")?;
    let value: Arc<[u8]> = vec![b'v'; args.value_size].into();
    let start = Instant::now();
    let from = start + warmup;
    let to = from + window;

    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let store = Arc::clone(&store);
        let value = Arc::clone(&value);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram()?;
            let mut acked = 0_u64;
            let mut seq = 0_u64;
            let mut key = String::with_capacity(32);
            loop {
                let sent = Instant::now();
                if sent >= to {
                    break;
                }
                key.clear();
                write!(key, "bench/put/{w:04}/{seq:012}")?;
                seq += 1;
                store.put(key.as_bytes(), &value).await?;
                let done = Instant::now();
                if done >= from && done < to {
                    acked += 1;
                    hist.saturating_record(micros(done - sent));
                }
            }
            Ok::<_, BoxError>((acked, hist))
        }));
    }

    tokio::time::sleep_until(from.into()).await;
    metrics.reset()?;
    let written_before = process_write_bytes();
    tokio::time::sleep_until(to.into()).await;
    let writer = metrics.take()?;
    let written = process_write_bytes()
        .zip(written_before)
        .map(|(a, b)| a.saturating_sub(b));

    let mut hist = new_histogram()?;
    let mut acked = 0;
    for task in tasks {
        let (n, h) = task.await??;
        acked += n;
        hist.add(&h)?;
    }
    close_store(store).await?;
    let seconds = window.as_secs_f64();
    Ok(PutResult {
        writers,
        acked,
        seconds,
        puts_per_sec: acked as f64 / seconds,
        latency: LatencySummary::from_micros(&hist),
        writer,
        writer_busy: writer.write.count as f64 * writer.write.mean_ms / 1000.0 / seconds,
        disk_bytes_per_put: written
            .filter(|_| acked > 0)
            .map(|w| w as f64 / acked as f64),
    })
}

/// What one watcher task saw.
struct WatcherOutcome {
    /// Receive time (ns since the benchmark's base instant) per put index;
    /// `u64::MAX` when never received.
    received_at: Vec<u64>,
    received: u64,
    duplicates: u64,
    unexpected: u64,
    error: Option<String>,
}

/// Value of the `index`-th watch put: index and send time (ns since base),
/// then padding up to `size`.
fn encode_value(index: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(16));
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(&sent_ns.to_le_bytes());
    v.resize(size.max(16), b'w');
    v
}

fn decode_index(value: &[u8]) -> Option<usize> {
    let bytes: [u8; 8] = value.get(..8)?.try_into().ok()?;
    usize::try_from(u64::from_le_bytes(bytes)).ok()
}

impl WatcherOutcome {
    /// Notes that the put carried by `value` arrived at `now`.
    fn record(&mut self, value: &[u8], now: u64) {
        match decode_index(value).and_then(|i| self.received_at.get_mut(i)) {
            Some(slot) if *slot == u64::MAX => {
                *slot = now;
                self.received += 1;
            }
            Some(_) => self.duplicates += 1,
            None => self.unexpected += 1,
        }
    }
}

/// What a watcher task receives: a store watch batch, or a bare value from
/// the fan-out baseline.
enum Delivery {
    Batch(WatchBatch),
    Raw(Arc<[u8]>),
}

/// One watcher's subscription, polled directly by its task — the store's
/// `WatchStream` as a user gets it, or a bare broadcast receiver — with no
/// adapter of the benchmark's own in between.
enum Subscription {
    Store(WatchStream),
    Fanout(broadcast::Receiver<Arc<[u8]>>),
}

impl Subscription {
    /// The next delivery; `None` when the stream ended.
    async fn next(&mut self) -> Option<Result<Delivery, String>> {
        match self {
            Self::Store(stream) => stream
                .next()
                .await
                .map(|r| r.map(Delivery::Batch).map_err(|e| e.to_string())),
            Self::Fanout(rx) => Some(
                rx.recv()
                    .await
                    .map(Delivery::Raw)
                    .map_err(|e| e.to_string()),
            ),
        }
    }
}

/// The fan-out baseline: a broadcast channel fed by an OS thread.
struct Fanout {
    sender: broadcast::Sender<Arc<[u8]>>,
    requests: Option<std::sync::mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fanout {
    fn start(capacity: usize) -> Result<Self, BoxError> {
        let (sender, _) = broadcast::channel(capacity.max(16));
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<u8>, oneshot::Sender<()>)>();
        let publish = sender.clone();
        let thread = std::thread::Builder::new()
            .name("fanout-publisher".into())
            .spawn(move || {
                // Publish, then answer: the order the store's writer uses.
                while let Ok((value, reply)) = rx.recv() {
                    let _ = publish.send(value.into());
                    let _ = reply.send(());
                }
            })?;
        Ok(Self {
            sender,
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    fn subscribe(&self) -> Subscription {
        Subscription::Fanout(self.sender.subscribe())
    }

    async fn publish(&self, value: Vec<u8>) -> Result<(), BoxError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or("publisher stopped")?
            .send((value, tx))?;
        Ok(rx.await?)
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the watch benchmark's deliveries come from.
enum Source {
    Store(Arc<EmbeddedStore>),
    Fanout(Fanout),
}

impl Source {
    async fn subscribe(&self) -> Result<Subscription, BoxError> {
        Ok(match self {
            Self::Store(store) => {
                Subscription::Store(store.watch(KeyRange::prefix(WATCH_PREFIX), 0).await?)
            }
            Self::Fanout(f) => f.subscribe(),
        })
    }

    async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), BoxError> {
        match self {
            Self::Store(store) => {
                store.put(key, &value).await?;
            }
            Self::Fanout(f) => f.publish(value).await?,
        }
        Ok(())
    }

    async fn close(self) -> Result<(), BoxError> {
        match self {
            Self::Store(store) => close_store(store).await,
            Self::Fanout(f) => Ok(tokio::task::spawn_blocking(move || drop(f)).await?),
        }
    }
}

const WATCH_PREFIX: &[u8] = b"bench/watch/";

async fn watch_bench(
    source: Source,
    watchers: usize,
    args: &Args,
    metrics: &WriterMetrics,
) -> Result<WatchResult, BoxError> {
    let puts = args.watch_puts;
    let interval = Duration::from_millis(args.watch_interval_ms);
    let timeout = secs(args.watch_timeout_secs, "--watch-timeout-secs")?;
    let base = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));

    // Every stream subscribes inside `watch()`, so all of them are in place
    // before the first put, whenever their tasks first run.
    let setup_started = Instant::now();
    let mut tasks = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let mut subscription = source.subscribe().await?;
        let ready = Arc::clone(&ready);
        let finished = Arc::clone(&finished);
        tasks.push(tokio::spawn(async move {
            let mut out = WatcherOutcome {
                received_at: vec![u64::MAX; puts],
                received: 0,
                duplicates: 0,
                unexpected: 0,
                error: None,
            };
            ready.fetch_add(1, Ordering::Release);
            // Only the subscription is awaited, as in a plain consumer loop.
            // A stop signal raced against it here would cost a registration
            // on a shared waiter list each time the stream has nothing;
            // instead, a run that times out closes the source, which ends
            // every stream.
            while out.received < puts as u64 {
                match subscription.next().await {
                    Some(Ok(Delivery::Batch(batch))) => {
                        let now = nanos(base.elapsed());
                        for event in batch.events.iter() {
                            out.record(&event.kv.value, now);
                        }
                    }
                    Some(Ok(Delivery::Raw(value))) => {
                        out.record(&value, nanos(base.elapsed()));
                    }
                    Some(Err(e)) => {
                        out.error = Some(e);
                        break;
                    }
                    None => {
                        out.error = Some("watch stream ended".into());
                        break;
                    }
                }
            }
            finished.fetch_add(1, Ordering::Release);
            // The subscription is dropped later by the main task: dropping a
            // stream is not part of delivering, and done here it would delay
            // the tasks still waiting for the last put.
            (out, subscription)
        }));
    }
    // Let every task reach its stream, so the first puts do not measure
    // task start-up.
    while ready.load(Ordering::Acquire) < watchers {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(50)).await;

    metrics.reset()?;
    let mut sent_at = Vec::with_capacity(puts);
    let mut acked_at = Vec::with_capacity(puts);
    let mut put_ack = new_histogram()?;
    for i in 0..puts {
        let key = format!("bench/watch/{i:08}");
        let sent = nanos(base.elapsed());
        let value = encode_value(u64::try_from(i)?, sent, args.value_size);
        source.put(key.as_bytes(), value).await?;
        let acked = nanos(base.elapsed());
        put_ack.saturating_record(acked.saturating_sub(sent) / 1000);
        sent_at.push(sent);
        acked_at.push(acked);
        tokio::time::sleep(interval).await;
    }

    // Wait for the last deliveries by watching a counter rather than by
    // joining the tasks: a join per task (with its timeout) while the last
    // put is still fanning out would compete with that fan-out.
    let deadline = tokio::time::Instant::now() + timeout;
    while finished.load(Ordering::Acquire) < watchers && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let writer = metrics.take()?;
    // Closing the source ends every stream still waiting (after a timeout);
    // what those watchers did not receive counts as missing.
    source.close().await?;
    let mut outcomes = Vec::with_capacity(watchers);
    let mut subscriptions = Vec::with_capacity(watchers);
    for task in tasks {
        let (outcome, subscription) = task.await?;
        outcomes.push(outcome);
        subscriptions.push(subscription);
    }
    drop(subscriptions);

    let mut send_to_recv = new_histogram()?;
    let mut ack_to_recv = new_histogram()?;
    let mut spread = new_histogram()?;
    let mut first = vec![u64::MAX; puts];
    let mut last = vec![0_u64; puts];
    let (mut deliveries, mut missing, mut duplicates, mut unexpected) = (0, 0, 0, 0);
    let (mut before_ack, mut stream_errors, mut first_error) = (0, 0, None);
    for o in &outcomes {
        duplicates += o.duplicates;
        unexpected += o.unexpected;
        if let Some(e) = &o.error {
            stream_errors += 1;
            first_error.get_or_insert_with(|| e.clone());
        }
        for (i, &at) in o.received_at.iter().enumerate() {
            if at == u64::MAX {
                missing += 1;
                continue;
            }
            deliveries += 1;
            let (sent, acked) = (sent_at[i], acked_at[i]);
            send_to_recv.saturating_record(at.saturating_sub(sent) / 1000);
            if at < acked {
                before_ack += 1;
            }
            ack_to_recv.saturating_record(at.saturating_sub(acked) / 1000);
            first[i] = first[i].min(at);
            last[i] = last[i].max(at);
        }
    }
    let mut slowest_puts: Vec<SlowPut> = (0..puts)
        .filter(|&i| first[i] != u64::MAX)
        .map(|i| {
            let ms = |t: u64| t.saturating_sub(sent_at[i]) as f64 / 1e6;
            SlowPut {
                index: i,
                ack_ms: ms(acked_at[i]),
                first_ms: ms(first[i]),
                last_ms: ms(last[i]),
            }
        })
        .collect();
    slowest_puts.sort_by(|a, b| b.last_ms.total_cmp(&a.last_ms));
    slowest_puts.truncate(5);
    for (f, l) in first.iter().zip(&last) {
        if *f != u64::MAX {
            spread.saturating_record(l.saturating_sub(*f) / 1000);
        }
    }
    let expected = u64::try_from(watchers)? * u64::try_from(puts)?;
    Ok(WatchResult {
        watchers,
        puts,
        setup_seconds,
        expected_deliveries: expected,
        deliveries,
        missing,
        duplicates,
        unexpected,
        stream_errors,
        first_error,
        send_to_recv: LatencySummary::from_micros(&send_to_recv),
        ack_to_recv: LatencySummary::from_micros(&ack_to_recv),
        before_ack,
        fanout_spread: LatencySummary::from_micros(&spread),
        slowest_puts,
        put_ack: LatencySummary::from_micros(&put_ack),
        writer,
    })
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut s, r);
    s
}

fn render_into(s: &mut String, r: &Report) -> std::fmt::Result {
    let m = &r.machine;
    writeln!(s, "\nstore-bench — embedded store")?;
    writeln!(
        s,
        "machine: {} CPUs ({}); stores in {} ({} on {})",
        m.cpus,
        m.cpu_model.as_deref().unwrap_or("unknown CPU"),
        m.dir.display(),
        m.fs_type.as_deref().unwrap_or("?"),
        m.device.as_deref().unwrap_or("?"),
    )?;
    if let Some(f) = &r.disk_fdatasync {
        writeln!(
            s,
            "disk: 4 KiB write + fdatasync p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            f.p50_ms, f.p99_ms, f.max_ms, f.count
        )?;
    }
    if !r.puts.is_empty() {
        writeln!(
            s,
            "\nDurable puts ({} B values, {} s window after {} s warm-up)",
            r.args.value_size, r.args.duration_secs, r.args.warmup_secs
        )?;
        writeln!(
            s,
            "{:>7} {:>10} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>7} {:>10} {:>9} | {:>10} {:>10} | {:>6} {:>8}",
            "writers",
            "puts/s",
            "acked",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "commits",
            "mean batch",
            "max batch",
            "commit p50",
            "commit p99",
            "busy",
            "disk/put"
        )?;
        for p in &r.puts {
            writeln!(
                s,
                "{:>7} {:>10.0} {:>9} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>7} {:>10.1} {:>9} | {:>10.2} {:>10.2} | {:>5.0}% {:>8}",
                p.writers,
                p.puts_per_sec,
                p.acked,
                p.latency.p50_ms,
                p.latency.p99_ms,
                p.latency.p999_ms,
                p.latency.max_ms,
                p.writer.batch_size.count,
                p.writer.batch_size.mean,
                p.writer.batch_size.max,
                p.writer.write.p50_ms,
                p.writer.write.p99_ms,
                p.writer_busy * 100.0,
                p.disk_bytes_per_put
                    .map_or_else(|| "?".to_owned(), |b| format!("{:.1} KiB", b / 1024.0)),
            )?;
        }
    }
    if !r.puts.is_empty() {
        writeln!(
            s,
            "(commits/batch/commit: the writer thread's batches in the window, commit = apply + \
             redb commit incl. fsync; busy: share of the window spent in batches; disk/put: \
             bytes written to storage per put)"
        )?;
    }
    if !r.watch.is_empty() {
        writeln!(
            s,
            "\n{} ({} puts on one prefix, {} ms pause after each ack; latencies in ms)",
            if r.args.bench == Bench::Fanout {
                "Fan-out baseline: bare broadcast channel, no store"
            } else {
                "Watch delivery"
            },
            r.args.watch_puts,
            r.args.watch_interval_ms
        )?;
        writeln!(
            s,
            "{:>8} {:>11} {:>7} | {:>20} | {:>20} | {:>15} | {:>8} | {:>6}",
            "watchers",
            "deliveries",
            "missing",
            "send→recv p50/p99/max",
            "ack→recv p50/p99/max",
            "spread p50/p99",
            "put ack",
            "ok"
        )?;
        for w in &r.watch {
            writeln!(
                s,
                "{:>8} {:>11} {:>7} | {:>6.2} {:>6.2} {:>6.2} | {:>6.2} {:>6.2} {:>6.2} | {:>7.2} {:>7.2} | {:>8.2} | {:>6}",
                w.watchers,
                w.deliveries,
                w.missing,
                w.send_to_recv.p50_ms,
                w.send_to_recv.p99_ms,
                w.send_to_recv.max_ms,
                w.ack_to_recv.p50_ms,
                w.ack_to_recv.p99_ms,
                w.ack_to_recv.max_ms,
                w.fanout_spread.p50_ms,
                w.fanout_spread.p99_ms,
                w.put_ack.p50_ms,
                if w.complete() { "yes" } else { "NO" },
            )?;
        }
        writeln!(
            s,
            "(send→recv: put issued → watcher got it; ack→recv: put acknowledged → watcher got \
             it, 0 if earlier; spread: first → last watcher per put; put ack: p50 put latency)"
        )?;
        for w in r.watch.iter().filter(|w| w.watchers > 1) {
            let slow: Vec<String> = w
                .slowest_puts
                .iter()
                .map(|p| {
                    format!(
                        "#{} ack {:.1} first {:.1} last {:.1}",
                        p.index, p.ack_ms, p.first_ms, p.last_ms
                    )
                })
                .collect();
            writeln!(
                s,
                "slowest puts, {} watchers (ms after send): {}",
                w.watchers,
                slow.join("; ")
            )?;
        }
    }
    Ok(())
}
