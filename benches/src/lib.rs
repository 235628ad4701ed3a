//! Shared helpers of Strata's benchmarks and load generators.
//!
//! - [`LatencySummary`] and [`new_histogram`]: latency recording in
//!   microseconds on top of `hdrhistogram`;
//! - [`WriterMetrics`]: a `metrics` recorder that captures the embedded
//!   store's own write-path histograms (batch size, commit duration), so a
//!   benchmark can show how the writer thread grouped the load;
//! - [`MachineInfo`] and [`fsync_probe`]: what the figures were measured on;
//! - [`daemon`]: a real `stratad` child process and CPU accounting, for load
//!   generators that drive the daemon over the network;
//! - [`etcd_cluster`]: a real etcd cluster and `stratad` replicas on it;
//! - [`watchers`]: watch-delivery measurement (N subscribers of one key).

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use metrics::{Counter, Gauge, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde::Serialize;

pub mod daemon;
pub mod etcd_cluster;
pub mod watchers;

/// Error type of the helpers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A multi-threaded Tokio runtime with every driver enabled, and
/// `worker_threads` workers (at least one; default: one per CPU), for a load
/// generator's `--worker-threads`.
pub fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, BoxError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = worker_threads {
        builder.worker_threads(n.max(1));
    }
    Ok(builder.build()?)
}

/// Runs `future` to its end on a [`runtime`] of `worker_threads` workers,
/// then shuts the runtime down without waiting for tasks still running
/// (those of a failed measurement may still hold connections).
pub fn block_on<T>(
    worker_threads: Option<usize>,
    future: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    let runtime = runtime(worker_threads)?;
    let result = runtime.block_on(future);
    runtime.shutdown_background();
    result
}

/// Writes a load generator's results: `tables` on stdout, or with `json`
/// the report as pretty JSON on stdout and the tables on stderr (so stdout
/// stays machine-readable).
#[allow(clippy::print_stdout)] // the results are the program's output
pub fn print_report(tables: &str, report: &impl Serialize, json: bool) -> Result<(), BoxError> {
    if json {
        eprint!("{tables}");
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{tables}");
    }
    Ok(())
}

/// `s` seconds, from command-line flag `what`; an error naming the flag
/// when `s` is negative or not finite.
pub fn secs(s: f64, what: &str) -> Result<Duration, BoxError> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("bad {what} {s}: {e}").into())
}

/// Largest latency a histogram of [`new_histogram`] records exactly (in
/// microseconds: two minutes); larger values are clamped.
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// A histogram of microseconds from 1 µs to [`MAX_LATENCY_US`] with three
/// significant digits.
pub fn new_histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

/// Whole microseconds of `d`, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Whole nanoseconds of `d`, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Count and percentiles of a latency histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Largest sample, ms.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Count and percentiles of a histogram of plain numbers (batch sizes).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CountSummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample.
    pub max: u64,
}

impl CountSummary {
    /// Summarises a histogram.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

/// Name of the embedded store's batch-size histogram.
const BATCH_SIZE: &str = "strata_store_write_batch_size";
/// Name of the embedded store's batch write+commit duration histogram.
const WRITE_DURATION: &str = "strata_store_write_duration_seconds";

#[derive(Default)]
struct Captured {
    batch_size: Option<Histogram<u64>>,
    write_us: Option<Histogram<u64>>,
}

/// What the store's writer thread did during a measurement window.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WriterSnapshot {
    /// Requests per committed batch (one batch = one redb transaction and
    /// one fsync).
    pub batch_size: CountSummary,
    /// Time the writer spent applying and committing one batch (includes the
    /// fsync), ms.
    pub write: LatencySummary,
}

/// A `metrics` recorder that keeps the embedded store's write-path
/// histograms and ignores everything else. Install it once per process with
/// [`WriterMetrics::install`].
#[derive(Clone, Default)]
pub struct WriterMetrics {
    inner: Arc<Mutex<Captured>>,
}

impl std::fmt::Debug for WriterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterMetrics").finish_non_exhaustive()
    }
}

impl WriterMetrics {
    /// Installs a new capture as the global `metrics` recorder.
    pub fn install() -> Result<Self, BoxError> {
        let me = Self::default();
        me.reset()?;
        metrics::set_global_recorder(me.clone())
            .map_err(|_| "a global metrics recorder is already installed")?;
        Ok(me)
    }

    /// Forgets everything recorded so far.
    pub fn reset(&self) -> Result<(), BoxError> {
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        c.batch_size = Some(new_histogram()?);
        c.write_us = Some(new_histogram()?);
        Ok(())
    }

    /// Summarises what was recorded since the last reset, and resets.
    pub fn take(&self) -> Result<WriterSnapshot, BoxError> {
        let (batch, write) = {
            let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            (
                c.batch_size.replace(new_histogram()?),
                c.write_us.replace(new_histogram()?),
            )
        };
        Ok(WriterSnapshot {
            batch_size: batch
                .as_ref()
                .map(CountSummary::from_histogram)
                .unwrap_or_default(),
            write: write
                .as_ref()
                .map(LatencySummary::from_micros)
                .unwrap_or_default(),
        })
    }
}

#[derive(Clone, Copy)]
enum Which {
    BatchSize,
    WriteDuration,
}

struct Sink {
    which: Which,
    inner: Arc<Mutex<Captured>>,
}

impl metrics::HistogramFn for Sink {
    fn record(&self, value: f64) {
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (h, v) = match self.which {
            Which::BatchSize => (c.batch_size.as_mut(), value),
            Which::WriteDuration => (c.write_us.as_mut(), value * 1e6),
        };
        if let Some(h) = h {
            // Float-to-int `as` saturates; negative and NaN become 0.
            h.saturating_record((v.round() as u64).max(1));
        }
    }
}

impl Recorder for WriterMetrics {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
        let which = match key.name() {
            BATCH_SIZE => Which::BatchSize,
            WRITE_DURATION => Which::WriteDuration,
            _ => return metrics::Histogram::noop(),
        };
        metrics::Histogram::from_arc(Arc::new(Sink {
            which,
            inner: Arc::clone(&self.inner),
        }))
    }
}

/// The machine and file system a benchmark ran on.
#[derive(Clone, Debug, Serialize)]
pub struct MachineInfo {
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Directory the stores were created in.
    pub dir: PathBuf,
    /// Device of the file system holding `dir`, from `/proc/mounts`.
    pub device: Option<String>,
    /// Type of that file system (`ext4`, `tmpfs`, ...).
    pub fs_type: Option<String>,
    /// Where that file system is mounted.
    pub mount_point: Option<PathBuf>,
}

impl MachineInfo {
    /// Describes this machine and the file system holding `dir` (which must
    /// exist).
    pub fn probe(dir: &Path) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        });
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mut best: Option<(PathBuf, String, String)> = None;
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            for line in mounts.lines() {
                let mut fields = line.split_whitespace();
                let (Some(device), Some(point), Some(fs)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let point = PathBuf::from(point);
                let longer = best
                    .as_ref()
                    .is_none_or(|(b, _, _)| point.as_os_str().len() >= b.as_os_str().len());
                if dir.starts_with(&point) && longer {
                    best = Some((point, device.to_owned(), fs.to_owned()));
                }
            }
        }
        let (mount_point, device, fs_type) = match best {
            Some((p, d, f)) => (Some(p), Some(d), Some(f)),
            None => (None, None, None),
        };
        Self {
            cpus,
            cpu_model,
            dir,
            device,
            fs_type,
            mount_point,
        }
    }

    /// Whether the stores live in memory rather than on a disk.
    pub fn in_memory(&self) -> bool {
        matches!(self.fs_type.as_deref(), Some("tmpfs" | "ramfs"))
    }
}

/// Latency of the disk itself: rewrites one 4 KiB block of a scratch file in
/// `dir` and `fdatasync`s it `samples` times. A lower bound for one durable
/// commit.
pub fn fsync_probe(dir: &Path, samples: usize) -> Result<LatencySummary, BoxError> {
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5a_u8; 4096];
    file.write_all(&block)?;
    file.sync_all()?;
    let mut h = new_histogram()?;
    for _ in 0..samples {
        let started = Instant::now();
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&block)?;
        file.sync_data()?;
        h.saturating_record(micros(started.elapsed()));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(LatencySummary::from_micros(&h))
}

/// Bytes this process has caused to be written to storage so far
/// (`write_bytes` of `/proc/self/io`), when the kernel reports it.
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}
