//! Watch-delivery measurement shared by `subscriber-bench` and `etcd-bench`:
//! one key, N subscribers spread round-robin over already-open connections
//! (`stratad`'s `ConfigService.Watch`, or one etcd `Watch` stream each),
//! numbered changes put one after another, and per (subscriber, change)
//! receive times, summed up as deliveries, misses, duplicates, unexpected
//! messages, stream errors and latency from the start of the put call.
//!
//! What the binaries differ in stays with them: which servers they start,
//! which connections they open (and what they sample while the changes are
//! pushed: memory, CPU), and how they print the results.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{CreateTenantRequest, PutConfigRequest, WatchConfigRequest};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::{BoxError, LatencySummary, micros, nanos, new_histogram};

/// Project the `stratad` subscribers watch and the writers write.
pub const PROJECT: &str = "bench";
/// Tenant the `stratad` subscribers watch and the writers write.
pub const TENANT: &str = "integration";
/// Values start with this, followed by the change number.
const SEQ_PREFIX: &[u8] = b"seq=";

/// A value of `size` bytes naming change `seq`.
pub fn value_for(seq: usize, size: usize) -> Vec<u8> {
    let mut v = format!("seq={seq:08} ").into_bytes();
    v.resize(size.max(v.len()), b'x');
    v
}

/// The change number of a value written by [`value_for`].
fn parse_seq(value: &[u8]) -> Option<usize> {
    let rest = value.strip_prefix(SEQ_PREFIX)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// An HTTP/2 channel to `endpoint`, connected now.
pub async fn connect(endpoint: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?)
}

/// Creates the [`TENANT`] of [`PROJECT`] that the subscribers watch.
pub async fn create_tenant(channel: Channel) -> Result<(), BoxError> {
    TenantServiceClient::new(channel)
        .create_tenant(CreateTenantRequest {
            project: PROJECT.into(),
            name: TENANT.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The flags of a watch-delivery measurement that `subscriber-bench` and
/// `etcd-bench` both take; flattened into their `Args` (and, with serde,
/// into the `args` of their JSON reports), so the flags keep their names.
#[derive(Debug, clap::Args, Serialize)]
pub struct WatchFlags {
    /// Fewest HTTP/2 connections the subscribers are spread over.
    #[arg(long, default_value_t = 10)]
    pub min_connections: usize,
    /// Most subscription streams per connection. stratad (hyper) allows 200
    /// concurrent streams per connection and etcd 3.4 allows 2^32 - 1;
    /// a stream beyond the server's limit would wait for a free slot.
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Changes (puts) per watch measurement.
    #[arg(long, default_value_t = 30)]
    pub changes: usize,
    /// Pause after each acknowledged put, ms.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
    /// Size of each value in bytes (at least 16).
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
}

/// The timeouts and run options that `subscriber-bench` and `etcd-bench`
/// both take after their own flags; flattened like [`WatchFlags`]. A
/// binary may change a default with clap's `mut_arg`.
#[derive(Debug, clap::Args, Serialize)]
pub struct RunFlags {
    /// Longest wait for every subscriber's snapshot, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout_secs: f64,
    /// Longest wait for the last deliveries after the last put, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub delivery_timeout_secs: f64,
    /// Tokio worker threads of this load generator (default: one per CPU).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Directory for the temporary data directories of the servers it
    /// starts (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Print the results as JSON on stdout (tables go to stderr).
    #[arg(long)]
    pub json: bool,
}

impl RunFlags {
    /// The `--dir` to create the servers' data directories in (default: the
    /// system temp dir), created when missing.
    pub fn parent_dir(&self) -> Result<std::path::PathBuf, BoxError> {
        let parent = self.dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent)?;
        Ok(parent)
    }
}

impl WatchFlags {
    /// An error unless the values can name their change (`--value-size`
    /// at least 16) and the counts are positive.
    pub fn check(&self) -> Result<(), BoxError> {
        if self.value_size < 16 {
            return Err("--value-size must be at least 16".into());
        }
        if self.streams_per_connection == 0 || self.changes == 0 {
            return Err("--streams-per-connection and --changes must be positive".into());
        }
        Ok(())
    }

    /// Connections for `n` subscribers: at least `--min-connections`, and
    /// enough that none carries more than `--streams-per-connection`.
    pub fn connections(&self, n: usize) -> usize {
        self.min_connections
            .max(n.div_ceil(self.streams_per_connection.max(1)))
            .max(1)
    }
}

/// One connection the subscribers share.
pub enum WatchConn {
    /// To `stratad`.
    Stratad(ConfigServiceClient<Channel>),
    /// To etcd. Boxed: etcd's clients are large next to a tonic channel.
    Etcd(Box<etcd_client::WatchClient>),
}

/// What puts the changes, and the key it puts.
pub enum Putter {
    /// `ConfigService.PutConfig` of this config key.
    Stratad(ConfigServiceClient<Channel>, String),
    /// An etcd put of this key. Boxed as in [`WatchConn`].
    Etcd(Box<etcd_client::KvClient>, String),
}

impl Putter {
    /// Puts `value`; returns once the server acknowledged it.
    pub async fn put(&mut self, value: Vec<u8>) -> Result<(), BoxError> {
        match self {
            Self::Stratad(c, key) => {
                c.put_config(PutConfigRequest {
                    project: PROJECT.into(),
                    tenant: TENANT.into(),
                    key: key.clone(),
                    value,
                    format: "text".into(),
                    ..Default::default()
                })
                .await?;
            }
            Self::Etcd(c, key) => {
                c.put(key.as_str(), value, None).await?;
            }
        }
        Ok(())
    }
}

/// One subscriber's view of the run.
#[derive(Debug, Default)]
struct Record {
    /// Receive time per change number (index 0 unused), ns since the run's
    /// origin; 0: not received.
    received: Vec<u64>,
    duplicates: u64,
    unexpected: u64,
    error: Option<String>,
}

impl Record {
    fn new(changes: usize) -> Self {
        Self {
            received: vec![0; changes + 1],
            ..Self::default()
        }
    }

    /// Notes that change `value` names arrived at `at` ns.
    fn note(&mut self, value: &[u8], at: u64, shared: &Shared) {
        match parse_seq(value) {
            Some(seq) if seq >= 1 && seq < self.received.len() => {
                if self.received[seq] == 0 {
                    self.received[seq] = at.max(1);
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.duplicates += 1;
                }
            }
            _ => self.unexpected += 1,
        }
    }
}

/// A subscriber's record; a subscriber that panicked left it as it was.
fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State every subscriber task shares with the driver.
struct Shared {
    origin: Instant,
    /// Subscribers that have their snapshot / `created` response.
    ready: AtomicUsize,
    /// Distinct (subscriber, change) deliveries so far.
    delivered: AtomicUsize,
}

impl Shared {
    fn now(&self) -> u64 {
        nanos(self.origin.elapsed())
    }
}

/// One `stratad` subscriber of `key`: records every delivery in `record`
/// until its stream fails or the task is aborted.
async fn stratad_subscriber(
    mut client: ConfigServiceClient<Channel>,
    key: String,
    shared: Arc<Shared>,
    record: Arc<Mutex<Record>>,
) {
    let request = WatchConfigRequest {
        project: PROJECT.into(),
        tenant: TENANT.into(),
        keys: vec![key],
        ..Default::default()
    };
    let mut stream = match client.watch(request).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            lock(&record).error = Some(format!("watch: {e}"));
            return;
        }
    };
    let mut snapshot = false;
    loop {
        let message = stream.message().await;
        let at = shared.now();
        let mut record = lock(&record);
        match message {
            Ok(Some(m)) if !snapshot => {
                if m.kind == Kind::Snapshot as i32 {
                    snapshot = true;
                    shared.ready.fetch_add(1, Ordering::Relaxed);
                } else {
                    record.unexpected += 1;
                }
            }
            Ok(Some(m)) => {
                if m.kind != Kind::Change as i32 || m.reset || m.changes.is_empty() {
                    record.unexpected += 1;
                    continue;
                }
                for change in &m.changes {
                    match &change.value {
                        Some(v) => record.note(&v.value, at, &shared),
                        None => record.unexpected += 1,
                    }
                }
            }
            Ok(None) => {
                record.error = Some("stream ended".into());
                break;
            }
            Err(e) => {
                record.error = Some(format!("stream failed: {e}"));
                break;
            }
        }
    }
}

/// One etcd watcher of `key`: records every delivery in `record` until its
/// stream fails or the task is aborted.
async fn etcd_subscriber(
    mut client: etcd_client::WatchClient,
    key: String,
    shared: Arc<Shared>,
    record: Arc<Mutex<Record>>,
) {
    // The handle holds the request half of the stream; etcd ends the watch
    // when the client closes that half, so it lives as long as the task.
    let mut stream = match client.watch(key, None).await {
        Ok(s) => s,
        Err(e) => {
            lock(&record).error = Some(format!("watch: {e}"));
            return;
        }
    };
    let mut created = false;
    loop {
        let message = stream.message().await;
        let at = shared.now();
        let mut record = lock(&record);
        match message {
            Ok(Some(m)) => {
                if m.canceled() || m.compact_revision() != 0 {
                    record.unexpected += 1;
                    continue;
                }
                if m.created() && !created {
                    created = true;
                    shared.ready.fetch_add(1, Ordering::Relaxed);
                }
                for event in m.events() {
                    match event.kv() {
                        Some(kv) => record.note(kv.value(), at, &shared),
                        None => record.unexpected += 1,
                    }
                }
            }
            Ok(None) => {
                record.error = Some("stream ended".into());
                break;
            }
            Err(e) => {
                record.error = Some(format!("stream failed: {e}"));
                break;
            }
        }
    }
}

/// The changes a [`Subscribers::deliver`] made.
#[derive(Debug)]
pub struct Pushed {
    /// Start of each put call (index 0 unused), ns since the run's origin.
    sent: Vec<u64>,
    /// Put call → acknowledgement.
    put_ack: LatencySummary,
}

/// How the subscribers fared, for one measurement.
#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    /// Subscribers × changes.
    pub expected_deliveries: u64,
    /// Distinct (subscriber, change) receipts.
    pub deliveries: u64,
    /// (subscriber, change) pairs never received.
    pub missing: u64,
    /// Changes a subscriber received more than once.
    pub duplicates: u64,
    /// Messages that were neither a snapshot first nor a change with a
    /// parsable value (resets, cancellations).
    pub unexpected: u64,
    /// Subscribers whose stream failed or ended.
    pub stream_errors: u64,
    /// The first of those failures.
    pub first_error: Option<String>,
    /// Put call started → subscriber received the change.
    pub latency: LatencySummary,
}

impl Delivery {
    /// Whether every subscriber got every change exactly once and no
    /// stream failed.
    pub fn complete(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.stream_errors == 0
            && self.deliveries == self.expected_deliveries
    }

    /// The delivery columns of a results table row: deliveries, missing
    /// (`missing_width` wide), duplicates, unexpected, stream errors, then
    /// after a bar the latency p50, p99, p99.9 and max in ms.
    pub fn columns(&self, missing_width: usize) -> String {
        let l = &self.latency;
        format!(
            "{:>10} {:>missing_width$} {:>3} {:>5} {:>3} | {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            self.deliveries,
            self.missing,
            self.duplicates,
            self.unexpected,
            self.stream_errors,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        )
    }

    /// What went wrong for `system` with `subscribers` subscribers, for the
    /// final failure message.
    pub fn failure(&self, system: &str, subscribers: usize) -> String {
        format!(
            "{system} with {subscribers} subscribers: {} of {} deliveries, {} missing, {} \
             duplicate, {} unexpected, {} stream errors{}",
            self.deliveries,
            self.expected_deliveries,
            self.missing,
            self.duplicates,
            self.unexpected,
            self.stream_errors,
            self.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        )
    }
}

/// Everything one measurement's subscribers saw.
#[derive(Debug)]
pub struct Outcome {
    /// Deliveries and their latency.
    pub delivery: Delivery,
    /// Per change: put call started → first subscriber received it.
    pub first: LatencySummary,
    /// Per change: first delivery → last delivery.
    pub spread: LatencySummary,
    /// Put call → acknowledgement.
    pub put_ack: LatencySummary,
}

/// Running subscriber tasks, aborted when dropped: on every way out of a
/// measurement, no subscriber outlives it.
pub struct Subscribers {
    tasks: Vec<JoinHandle<()>>,
    // Each subscriber writes only its own record, so the lock it takes per
    // message is never contended; the driver reads the records after
    // aborting the tasks. (Subscribers wait on nothing but their stream: a
    // stop signal selected on every message would cost the load generator
    // a shared lock per delivery.)
    records: Vec<Arc<Mutex<Record>>>,
    shared: Arc<Shared>,
    started: Instant,
    changes: usize,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Subscribers {
    /// Starts `n` subscribers, subscriber i on `conns[i % conns.len()]`,
    /// each expecting changes 1 to `changes`: `stratad` ones watch config
    /// key `config_key`, etcd ones key `etcd_key`.
    pub fn spawn(
        conns: &[WatchConn],
        n: usize,
        changes: usize,
        config_key: &str,
        etcd_key: &str,
    ) -> Result<Self, BoxError> {
        if conns.is_empty() && n > 0 {
            return Err("subscribers need at least one connection".into());
        }
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            ready: AtomicUsize::new(0),
            delivered: AtomicUsize::new(0),
        });
        let started = Instant::now();
        let records: Vec<Arc<Mutex<Record>>> = (0..n)
            .map(|_| Arc::new(Mutex::new(Record::new(changes))))
            .collect();
        let tasks = records
            .iter()
            .enumerate()
            .map(|(i, record)| {
                let shared = Arc::clone(&shared);
                let record = Arc::clone(record);
                match &conns[i % conns.len()] {
                    WatchConn::Stratad(c) => tokio::spawn(stratad_subscriber(
                        c.clone(),
                        config_key.to_owned(),
                        shared,
                        record,
                    )),
                    WatchConn::Etcd(c) => tokio::spawn(etcd_subscriber(
                        (**c).clone(),
                        etcd_key.to_owned(),
                        shared,
                        record,
                    )),
                }
            })
            .collect();
        Ok(Self {
            tasks,
            records,
            shared,
            started,
            changes,
        })
    }

    /// Waits until every subscriber has its snapshot (`stratad`) or its
    /// `created` response (etcd); the seconds since [`spawn`](Self::spawn),
    /// or an error naming `system` after `timeout`.
    pub async fn wait_ready(&self, system: &str, timeout: Duration) -> Result<f64, BoxError> {
        let n = self.records.len();
        let deadline = self.started + timeout;
        while self.shared.ready.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                let failed = self.tasks.iter().filter(|t| t.is_finished()).count();
                return Err(format!(
                    "{system}: only {} of {n} subscribers got their snapshot within {} s \
                     ({failed} streams failed); is --streams-per-connection above the server's \
                     limit of concurrent streams per connection?",
                    self.shared.ready.load(Ordering::Relaxed),
                    timeout.as_secs_f64()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(self.started.elapsed().as_secs_f64())
    }

    /// Puts changes 1 to `--changes` (values of `--value-size` bytes)
    /// through `putter`, each after the previous one was acknowledged and a
    /// pause of `--interval-ms`; then waits until every subscriber received
    /// every change, or `timeout` passed (what is missing then shows in the
    /// [`Outcome`]).
    pub async fn deliver(
        &self,
        putter: &mut Putter,
        flags: &WatchFlags,
        timeout: Duration,
    ) -> Result<Pushed, BoxError> {
        let mut sent = vec![0_u64; self.changes + 1];
        let mut put_ack = new_histogram()?;
        let interval = Duration::from_millis(flags.interval_ms);
        for (seq, slot) in sent.iter_mut().enumerate().skip(1) {
            let value = value_for(seq, flags.value_size);
            let started = Instant::now();
            *slot = self.shared.now().max(1);
            putter.put(value).await?;
            put_ack.saturating_record(micros(started.elapsed()));
            tokio::time::sleep(interval).await;
        }
        let expected = self.records.len() * self.changes;
        let deadline = Instant::now() + timeout;
        while self.shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Pushed {
            sent,
            put_ack: LatencySummary::from_micros(&put_ack),
        })
    }

    /// Waits `grace` (in which duplicates would show up), stops every
    /// subscriber and sums up what they saw of the changes in `pushed`.
    pub async fn finish(mut self, pushed: &Pushed, grace: Duration) -> Result<Outcome, BoxError> {
        tokio::time::sleep(grace).await;
        for t in self.tasks.drain(..) {
            t.abort();
            // Cancelled, or ended earlier with an error it recorded.
            let _ = t.await;
        }
        let records: Vec<Record> = self
            .records
            .iter()
            .map(|r| std::mem::take(&mut *lock(r)))
            .collect();
        let changes = self.changes;
        let sent = &pushed.sent;
        let mut latency = new_histogram()?;
        let mut first_hist = new_histogram()?;
        let mut spread = new_histogram()?;
        let mut d = Delivery {
            expected_deliveries: u64::try_from(records.len() * changes)?,
            ..Delivery::default()
        };
        let mut first = vec![u64::MAX; changes + 1];
        let mut last = vec![0_u64; changes + 1];
        for r in &records {
            d.duplicates += r.duplicates;
            d.unexpected += r.unexpected;
            if let Some(e) = &r.error {
                d.stream_errors += 1;
                d.first_error.get_or_insert_with(|| e.clone());
            }
            for seq in 1..=changes {
                let at = r.received[seq];
                if at == 0 {
                    d.missing += 1;
                    continue;
                }
                d.deliveries += 1;
                latency.saturating_record(at.saturating_sub(sent[seq]) / 1000);
                first[seq] = first[seq].min(at);
                last[seq] = last[seq].max(at);
            }
        }
        for seq in 1..=changes {
            if last[seq] > 0 {
                first_hist.saturating_record(first[seq].saturating_sub(sent[seq]) / 1000);
                spread.saturating_record(last[seq].saturating_sub(first[seq]) / 1000);
            }
        }
        d.latency = LatencySummary::from_micros(&latency);
        Ok(Outcome {
            delivery: d,
            first: LatencySummary::from_micros(&first_hist),
            spread: LatencySummary::from_micros(&spread),
            put_ack: pushed.put_ack,
        })
    }
}
