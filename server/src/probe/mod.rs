//! Active health probes for persistent service instances: TCP connect, HTTP
//! GET with an expected status, and `grpc.health.v1.Health/Check`.
//!
//! A [`Prober`] runs one task per target. The registry owns *what* is probed
//! — it hands the prober the desired set of targets ([`Prober::reconcile`],
//! [`Prober::upsert`], [`Prober::remove`]) — and learns the results from the
//! [`HealthChange`] channel it passed to [`Prober::new`].
//!
//! Health follows a readiness-probe state machine: a target starts
//! [`Health::Unknown`]; its first successful probe makes it
//! [`Health::Healthy`]; afterwards `failure_threshold` consecutive failures
//! make it [`Health::Unhealthy`] and `success_threshold` consecutive
//! successes make it healthy again. A target that never succeeds becomes
//! unhealthy after `failure_threshold` failures. A target whose address or
//! spec changes starts over from unknown, since what was learnt about the
//! old check says nothing about the new one. Every change of
//! [`Prober::health`] is sent on the channel, in order per target, and only
//! changes are sent.
//!
//! Scheduling: each probe is bounded by its timeout, and each target has its
//! own task, so a slow target never delays another. The first probe of a
//! target added or changed by [`Prober::reconcile`] is delayed by a random
//! fraction of its interval (fixed per id for the prober's life), so loading
//! 10,000 targets at once does not fire 10,000 probes at once;
//! [`Prober::upsert`], meant for single registrations, probes at once.

// Where probes may connect: the allow and deny lists, checked at every probe.
pub mod policy;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::probe::policy::{Denied, ProbePolicy};

/// The shortest probe interval [`ProbeSpec::validate`] accepts.
///
/// Only `validate` enforces it, so tests can probe faster; the prober itself
/// only guards against intervals that would make a task spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The largest failure or success threshold [`ProbeSpec::validate`] accepts.
pub const MAX_THRESHOLD: u32 = 100;

/// The longest HTTP path or gRPC service name [`ProbeSpec::validate`] accepts.
pub const MAX_NAME_BYTES: usize = 1024;

/// Floor under any interval the prober runs, so an unvalidated zero interval
/// cannot turn a task into a busy loop.
const FLOOR_INTERVAL: Duration = Duration::from_millis(10);

/// Bound on the bytes buffered while reading an HTTP response head; the
/// body is never read.
const MAX_HTTP_HEAD_BYTES: usize = 64 * 1024;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// Success is a TCP connection established within the timeout.
    Tcp,
    /// Success is an HTTP/1.1 `GET http://{address}{path}` answered with the
    /// expected status (redirects are not followed).
    Http {
        /// Path and optional query, starting with `/`.
        path: String,
        /// The status that counts as success; `None` accepts any 2xx.
        expected_status: Option<u16>,
    },
    /// Success is `grpc.health.v1.Health/Check` answering `SERVING`.
    Grpc {
        /// The service name to check; empty checks the server as a whole.
        service: String,
    },
}

impl ProbeKind {
    /// The bounded metric label for this kind: `tcp`, `http` or `grpc`.
    pub fn label(&self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http { .. } => "http",
            ProbeKind::Grpc { .. } => "grpc",
        }
    }
}

/// How and how often a target is probed, as given at registration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    /// What each probe does.
    pub kind: ProbeKind,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// Bound on one probe, connection included; at most `interval`.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy (or unknown) target unhealthy.
    pub failure_threshold: u32,
    /// Consecutive successes that make an unhealthy target healthy again.
    pub success_threshold: u32,
}

/// Why a [`ProbeSpec`] was rejected by [`ProbeSpec::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeSpecError {
    /// The interval is shorter than [`MIN_INTERVAL`].
    #[error("probe interval {0:?} is shorter than the minimum of {MIN_INTERVAL:?}")]
    IntervalTooShort(Duration),
    /// The timeout is zero.
    #[error("probe timeout must be greater than zero")]
    ZeroTimeout,
    /// The timeout is longer than the interval.
    #[error("probe timeout {timeout:?} is longer than the probe interval {interval:?}")]
    TimeoutOverInterval {
        /// The rejected timeout.
        timeout: Duration,
        /// The interval it exceeds.
        interval: Duration,
    },
    /// A threshold is outside `1..=MAX_THRESHOLD`.
    #[error("probe {which} threshold {value} must be between 1 and {MAX_THRESHOLD}")]
    Threshold {
        /// `failure` or `success`.
        which: &'static str,
        /// The rejected value.
        value: u32,
    },
    /// The HTTP path does not start with `/`, is not a valid path and query,
    /// or is too long.
    #[error(
        "probe HTTP path {0:?} must start with '/', be a valid URL path, and be at most \
         {MAX_NAME_BYTES} bytes"
    )]
    Path(String),
    /// The expected HTTP status is not a valid status code.
    #[error("expected HTTP status {0} is not a status code (100..=599)")]
    Status(u16),
    /// The gRPC service name is too long.
    #[error("probe gRPC service name is {0} bytes; at most {MAX_NAME_BYTES} are allowed")]
    ServiceName(usize),
}

impl ProbeSpec {
    /// Checks the spec as registration must: interval ≥ [`MIN_INTERVAL`],
    /// 0 < timeout ≤ interval, thresholds in `1..=MAX_THRESHOLD`, an HTTP
    /// path that starts with `/` and a valid expected status.
    pub fn validate(&self) -> Result<(), ProbeSpecError> {
        if self.interval < MIN_INTERVAL {
            return Err(ProbeSpecError::IntervalTooShort(self.interval));
        }
        if self.timeout.is_zero() {
            return Err(ProbeSpecError::ZeroTimeout);
        }
        if self.timeout > self.interval {
            return Err(ProbeSpecError::TimeoutOverInterval {
                timeout: self.timeout,
                interval: self.interval,
            });
        }
        for (which, value) in [
            ("failure", self.failure_threshold),
            ("success", self.success_threshold),
        ] {
            if !(1..=MAX_THRESHOLD).contains(&value) {
                return Err(ProbeSpecError::Threshold { which, value });
            }
        }
        match &self.kind {
            ProbeKind::Tcp => {}
            ProbeKind::Http {
                path,
                expected_status,
            } => {
                let valid = path.starts_with('/')
                    && path.len() <= MAX_NAME_BYTES
                    && path.parse::<http::uri::PathAndQuery>().is_ok();
                if !valid {
                    return Err(ProbeSpecError::Path(path.clone()));
                }
                if let Some(status) = *expected_status
                    && !(100..=599).contains(&status)
                {
                    return Err(ProbeSpecError::Status(status));
                }
            }
            ProbeKind::Grpc { service } => {
                if service.len() > MAX_NAME_BYTES {
                    return Err(ProbeSpecError::ServiceName(service.len()));
                }
            }
        }
        Ok(())
    }

    /// The interval and timeout actually run: the interval is kept above a
    /// small floor and the timeout within the interval, whatever the spec
    /// says, so an unvalidated spec cannot spin or overlap probes.
    fn effective(&self) -> (Duration, Duration) {
        let interval = self.interval.max(FLOOR_INTERVAL);
        (interval, self.timeout.min(interval))
    }
}

/// One thing to probe: an address and how to probe it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    /// `host:port` (`[v6]:port` for IPv6 literals).
    pub address: String,
    /// How and how often.
    pub spec: ProbeSpec,
}

/// The health of a target as far as the probes know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Health {
    /// No probe has decided yet (or the target was changed since).
    #[default]
    Unknown,
    /// The last probes succeeded (see the module docs for the thresholds).
    Healthy,
    /// The last probes failed.
    Unhealthy,
}

impl Health {
    /// A lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of one target's health, sent on the prober's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange<Id = String> {
    /// The target, as named to [`Prober::reconcile`] or [`Prober::upsert`].
    pub id: Id,
    /// The health before this change.
    pub previous: Health,
    /// The health now.
    pub health: Health,
    /// For operators: the last probe error when the target turned
    /// unhealthy, why it turned unknown, empty when it turned healthy.
    pub detail: String,
    /// The target as probed. A receiver can compare it with the target it
    /// would build now and drop a change decided under an older spec (a
    /// change already in the channel when the target was changed).
    pub target: ProbeTarget,
}

/// What a task probes, and when to probe first after taking it.
#[derive(Debug, Clone)]
struct Assignment {
    target: ProbeTarget,
    first_delay: Duration,
}

/// Runs active health probes, one task per target; see the module docs.
///
/// `Id` names targets (the registry formats it, e.g. from project, tenant,
/// service and instance). Dropping the prober, or cancelling the shutdown
/// token it was built with, stops every task.
pub struct Prober<Id = String> {
    changes: mpsc::Sender<HealthChange<Id>>,
    root: CancellationToken,
    _stop_all: DropGuard,
    jitter: RandomState,
    targets: Mutex<HashMap<Id, Running>>,
    policy: Arc<ProbePolicy>,
}

/// The prober's handle on one target's task.
struct Running {
    /// The task follows this; a new value restarts it.
    assignment: watch::Sender<Assignment>,
    /// Written by the task, read by [`Prober::health`].
    health: Arc<AtomicU8>,
    /// Cancels the task when the target is removed or the prober dropped.
    _stop: DropGuard,
}

impl<Id> Prober<Id>
where
    Id: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// Creates a prober with no targets. Health changes go to `changes`; a
    /// task whose change does not fit waits (it stops probing meanwhile), so
    /// the receiver must keep reading. `shutdown` stops every task.
    pub fn new(changes: mpsc::Sender<HealthChange<Id>>, shutdown: CancellationToken) -> Self {
        describe_metrics();
        let root = shutdown.child_token();
        Prober {
            changes,
            _stop_all: root.clone().drop_guard(),
            root,
            jitter: RandomState::new(),
            targets: Mutex::new(HashMap::new()),
            policy: Arc::new(ProbePolicy::default()),
        }
    }

    /// Probes connect only where `policy` allows (the default policy
    /// denies link-local and metadata addresses); set before adding
    /// targets.
    #[must_use]
    pub fn with_policy(mut self, policy: ProbePolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Makes the probed set exactly `targets`: starts new targets, stops
    /// targets not in the set, and restarts changed targets from
    /// [`Health::Unknown`] (sending that change if they were not unknown).
    /// The first probe of a new or changed target is spread over its
    /// interval. An unchanged target keeps its schedule, counters and
    /// health.
    ///
    /// Must be called within a Tokio runtime. Cost is one hash lookup per
    /// target plus a task spawn per new target.
    pub fn reconcile(&self, mut targets: HashMap<Id, ProbeTarget>) {
        let mut running = self.lock();
        running.retain(|id, _| targets.contains_key(id));
        for (id, target) in targets.drain() {
            let delay = self.first_delay(&id, &target);
            self.apply(&mut running, id, target, delay);
        }
        set_target_gauge(running.len());
    }

    /// Adds or updates one target, as one entry of [`Prober::reconcile`]
    /// would, except that a new or changed target is probed at once: this
    /// is the path for a single registration, which should not wait up to
    /// an interval for its first verdict.
    ///
    /// Must be called within a Tokio runtime.
    pub fn upsert(&self, id: Id, target: ProbeTarget) {
        let mut running = self.lock();
        self.apply(&mut running, id, target, Duration::ZERO);
        set_target_gauge(running.len());
    }

    /// Stops probing one target. Returns whether it was probed.
    pub fn remove(&self, id: &Id) -> bool {
        let mut running = self.lock();
        let removed = running.remove(id).is_some();
        set_target_gauge(running.len());
        removed
    }

    /// The current health of a target, or `None` if it is not probed.
    pub fn health(&self, id: &Id) -> Option<Health> {
        self.lock()
            .get(id)
            .map(|r| Health::from_u8(r.health.load(Ordering::Acquire)))
    }

    /// How many targets are probed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no target is probed.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Id, Running>> {
        // The map is never left half-updated by a panic, so a poisoned
        // lock is still consistent.
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply(
        &self,
        running: &mut HashMap<Id, Running>,
        id: Id,
        target: ProbeTarget,
        first_delay: Duration,
    ) {
        if let Some(existing) = running.get(&id) {
            // The task notices the new value and restarts; an identical
            // target is not a change and keeps its schedule and counters.
            existing.assignment.send_if_modified(|current| {
                if current.target == target {
                    return false;
                }
                *current = Assignment {
                    target,
                    first_delay,
                };
                true
            });
            return;
        }
        let cancel = self.root.child_token();
        let health = Arc::new(AtomicU8::new(Health::Unknown.to_u8()));
        let (assignment_tx, assignment_rx) = watch::channel(Assignment {
            target,
            first_delay,
        });
        let task = Task {
            id: id.clone(),
            assignment: assignment_rx,
            health: Arc::clone(&health),
            changes: self.changes.clone(),
            cancel: cancel.clone(),
            policy: Arc::clone(&self.policy),
        };
        tokio::spawn(task.run());
        running.insert(
            id,
            Running {
                assignment: assignment_tx,
                health,
                _stop: cancel.drop_guard(),
            },
        );
    }

    fn first_delay(&self, id: &Id, target: &ProbeTarget) -> Duration {
        let (interval, _) = target.spec.effective();
        jitter(self.jitter.hash_one(id), interval)
    }
}

/// A point in `[0, interval)` picked by `seed`.
fn jitter(seed: u64, interval: Duration) -> Duration {
    let nanos = interval.as_nanos().max(1);
    Duration::from_nanos(u64::try_from(u128::from(seed) % nanos).unwrap_or(0))
}

/// The consecutive-result counters and the health they decide.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Tracker {
    health: Health,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// Counts one probe result; returns the new health if it changed.
    fn observe(&mut self, success: bool, spec: &ProbeSpec) -> Option<Health> {
        let next = if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            match self.health {
                // Like a readiness probe: the first success is enough.
                Health::Unknown => Health::Healthy,
                Health::Unhealthy if self.successes >= spec.success_threshold.max(1) => {
                    Health::Healthy
                }
                other => other,
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            match self.health {
                Health::Unknown | Health::Healthy
                    if self.failures >= spec.failure_threshold.max(1) =>
                {
                    Health::Unhealthy
                }
                other => other,
            }
        };
        if next == self.health {
            return None;
        }
        self.health = next;
        Some(next)
    }
}

/// The result of one probe.
#[derive(Debug)]
enum Outcome {
    Success,
    Failure(String),
    Timeout(Duration),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure(_) => "failure",
            Outcome::Timeout(_) => "timeout",
        }
    }
}

/// Why a task woke up.
enum Wake {
    Stop,
    Retarget,
    Due,
}

/// How a probe in flight ended.
enum Probed {
    Stop,
    Retarget,
    Done(Outcome),
}

/// One target's probing loop.
struct Task<Id> {
    id: Id,
    assignment: watch::Receiver<Assignment>,
    health: Arc<AtomicU8>,
    changes: mpsc::Sender<HealthChange<Id>>,
    cancel: CancellationToken,
    policy: Arc<ProbePolicy>,
}

impl<Id: Clone + fmt::Debug> Task<Id> {
    async fn run(mut self) {
        let Assignment {
            mut target,
            first_delay,
        } = self.assignment.borrow_and_update().clone();
        let mut tracker = Tracker::default();
        let mut next = Instant::now() + first_delay;
        loop {
            let wake = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Wake::Stop,
                changed = self.assignment.changed() => retarget_or_stop(changed),
                () = tokio::time::sleep_until(next) => Wake::Due,
            };
            match wake {
                Wake::Stop => return,
                Wake::Retarget => {
                    if !self.retarget(&mut target, &mut tracker, &mut next).await {
                        return;
                    }
                    continue;
                }
                Wake::Due => {}
            }

            let (interval, timeout) = target.spec.effective();
            let kind = target.spec.kind.label();
            let started = Instant::now();
            // A new target abandons the probe in flight: its result would
            // describe the old one.
            let probed = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Probed::Stop,
                changed = self.assignment.changed() => match retarget_or_stop(changed) {
                    Wake::Retarget => Probed::Retarget,
                    _ => Probed::Stop,
                },
                outcome = probe(&target, timeout, &self.policy) => Probed::Done(outcome),
            };
            let outcome = match probed {
                Probed::Stop => return,
                Probed::Retarget => {
                    if !self.retarget(&mut target, &mut tracker, &mut next).await {
                        return;
                    }
                    continue;
                }
                Probed::Done(outcome) => outcome,
            };
            metrics::counter!(
                "strata_probe_results_total",
                "kind" => kind,
                "result" => outcome.label()
            )
            .increment(1);
            metrics::histogram!("strata_probe_duration_seconds", "kind" => kind)
                .record(started.elapsed().as_secs_f64());

            let previous = tracker.health;
            if let Some(health) = tracker.observe(matches!(outcome, Outcome::Success), &target.spec)
            {
                let detail = match outcome {
                    Outcome::Success => String::new(),
                    Outcome::Failure(detail) => detail,
                    Outcome::Timeout(after) => {
                        format!(
                            "{kind} probe of {} timed out after {after:?}",
                            target.address
                        )
                    }
                };
                if !self.announce(previous, health, detail, &target).await {
                    return;
                }
            }

            next += interval;
            let now = Instant::now();
            // Behind schedule (the change channel was full): skip the missed
            // slots rather than probing back to back.
            if next <= now {
                next = now + interval;
            }
        }
    }

    /// Takes a new assignment and starts over from unknown. Returns false
    /// if the task must stop.
    async fn retarget(
        &mut self,
        target: &mut ProbeTarget,
        tracker: &mut Tracker,
        next: &mut Instant,
    ) -> bool {
        let assignment = self.assignment.borrow_and_update().clone();
        *target = assignment.target;
        *next = Instant::now() + assignment.first_delay;
        let previous = std::mem::take(tracker).health;
        if previous == Health::Unknown {
            return true;
        }
        let detail = "probe target changed".to_owned();
        self.announce(previous, Health::Unknown, detail, target)
            .await
    }

    /// Publishes a change. Returns false if the task was cancelled while
    /// waiting for room in the channel.
    async fn announce(
        &self,
        previous: Health,
        health: Health,
        detail: String,
        target: &ProbeTarget,
    ) -> bool {
        self.health.store(health.to_u8(), Ordering::Release);
        metrics::counter!("strata_probe_health_changes_total", "health" => health.as_str())
            .increment(1);
        if health == Health::Unhealthy {
            tracing::warn!(
                id = ?self.id, address = %target.address, %previous, %health, %detail,
                "probe health changed"
            );
        } else {
            tracing::info!(
                id = ?self.id, address = %target.address, %previous, %health,
                "probe health changed"
            );
        }
        let change = HealthChange {
            id: self.id.clone(),
            previous,
            health,
            detail,
            target: target.clone(),
        };
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => false,
            // A closed receiver means nobody listens; keep probing so that
            // `Prober::health` stays current.
            _ = self.changes.send(change) => true,
        }
    }
}

fn retarget_or_stop(changed: Result<(), watch::error::RecvError>) -> Wake {
    match changed {
        Ok(()) => Wake::Retarget,
        // The prober dropped its handle: the target is gone.
        Err(_) => Wake::Stop,
    }
}

/// Runs one probe, never longer than `timeout`.
async fn probe(target: &ProbeTarget, timeout: Duration, policy: &ProbePolicy) -> Outcome {
    let address = target.address.as_str();
    let attempt = async {
        match &target.spec.kind {
            ProbeKind::Tcp => probe_tcp(address, policy).await,
            ProbeKind::Http {
                path,
                expected_status,
            } => probe_http(address, path, *expected_status, policy).await,
            ProbeKind::Grpc { service } => probe_grpc(address, service, timeout, policy).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Outcome::Success,
        Ok(Err(failure)) => Outcome::Failure(failure.to_string()),
        Err(_) => Outcome::Timeout(timeout),
    }
}

/// Why one probe failed; rendered into [`HealthChange::detail`].
#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("GET http://{address}{path}: {message}")]
    Http {
        address: String,
        path: String,
        message: String,
    },
    #[error("GET http://{address}{path}: status {status}, expected {expected}")]
    HttpStatus {
        address: String,
        path: String,
        status: u16,
        expected: String,
    },
    #[error("gRPC health check of {service:?} at {address}: {message}")]
    Grpc {
        address: String,
        service: String,
        message: String,
    },
    #[error("probe of {address} refused: {denied}")]
    Denied { address: String, denied: Denied },
}

/// Connects to the first address `address` resolves to that `policy`
/// allows. Resolving here, not in the connector, is what makes the policy
/// hold for names: the address checked is the address connected to.
async fn connect(address: &str, policy: &ProbePolicy) -> Result<TcpStream, ProbeFailure> {
    let connect_error = |source| ProbeFailure::Connect {
        address: address.to_owned(),
        source,
    };
    let mut denied = None;
    let mut failed = None;
    let mut stream = None;
    for addr in tokio::net::lookup_host(address)
        .await
        .map_err(connect_error)?
    {
        if let Err(why) = policy.check(addr) {
            denied.get_or_insert(why);
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => failed = Some(e),
        }
    }
    let stream = match (stream, failed, denied) {
        (Some(stream), _, _) => stream,
        (None, Some(e), _) => return Err(connect_error(e)),
        (None, None, Some(denied)) => {
            return Err(ProbeFailure::Denied {
                address: address.to_owned(),
                denied,
            });
        }
        (None, None, None) => {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolves to no address",
            )));
        }
    };
    // The request head goes out in one write; never let Nagle hold it.
    // Failing to set the option only costs latency, so it is not an error.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn probe_tcp(address: &str, policy: &ProbePolicy) -> Result<(), ProbeFailure> {
    connect(address, policy).await.map(drop)
}

async fn probe_http(
    address: &str,
    path: &str,
    expected_status: Option<u16>,
    policy: &ProbePolicy,
) -> Result<(), ProbeFailure> {
    let fail = |message: String| ProbeFailure::Http {
        address: address.to_owned(),
        path: path.to_owned(),
        message,
    };
    let stream = connect(address, policy).await?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HTTP_HEAD_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    // An empty `String` is a body of known length zero, so nothing is sent
    // after the head.
    let request = Request::get(path)
        .header(header::HOST, address)
        .header(
            header::USER_AGENT,
            concat!("strata-probe/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(String::new())
        .map_err(|e| fail(error_chain(&e)))?;

    // The connection future does the I/O; drive it here rather than spawn
    // it, so nothing outlives the probe. Only the response head is awaited:
    // dropping both afterwards closes the socket without reading the body.
    let pending = sender.send_request(request);
    tokio::pin!(pending, connection);
    let response = tokio::select! {
        biased;
        answered = &mut pending => answered,
        ended = &mut connection => {
            ended.map_err(|e| fail(error_chain(&e)))?;
            // The connection finished cleanly; the response (or why there
            // is none) is already waiting.
            pending.await
        }
    }
    .map_err(|e| fail(error_chain(&e)))?;

    let status = response.status();
    let ok = match expected_status {
        Some(expected) => status.as_u16() == expected,
        None => status.is_success(),
    };
    if ok {
        return Ok(());
    }
    Err(ProbeFailure::HttpStatus {
        address: address.to_owned(),
        path: path.to_owned(),
        status: status.as_u16(),
        expected: match expected_status {
            Some(code) => StatusCode::from_u16(code)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| code.to_string()),
            None => "2xx".to_owned(),
        },
    })
}

async fn probe_grpc(
    address: &str,
    service: &str,
    timeout: Duration,
    policy: &ProbePolicy,
) -> Result<(), ProbeFailure> {
    let fail = |message: String| ProbeFailure::Grpc {
        address: address.to_owned(),
        service: service.to_owned(),
        message,
    };
    // The connection is made (and checked against the policy) here and
    // handed to the channel, which would otherwise resolve and connect on
    // its own.
    let stream = connect(address, policy).await?;
    let handed = Mutex::new(Some(stream));
    let connector = tower::service_fn(move |_: http::Uri| {
        let stream = handed.lock().unwrap_or_else(PoisonError::into_inner).take();
        async move {
            stream.map(TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "a probe connects once; its connection is gone",
                )
            })
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| fail(error_chain(&e)))?
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|status| fail(format!("{:?}: {}", status.code(), status.message())))?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(fail(format!("status {}", other.as_str_name()))),
    }
}

/// An error and its sources, `outer: inner: innermost`, for operators (the
/// outer messages of hyper and tonic errors alone say little).
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let message = inner.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = inner.source();
    }
    text
}

fn set_target_gauge(count: usize) {
    metrics::gauge!("strata_probe_targets").set(count as f64);
}

/// Describes the probe metrics to the installed recorder. [`Prober::new`]
/// calls it; calling it again is harmless.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "strata_probe_results_total",
        "Active health probes run, by kind (tcp, http, grpc) and result (success, failure, \
         timeout)."
    );
    describe_histogram!(
        "strata_probe_duration_seconds",
        Unit::Seconds,
        "Time one active health probe took, by kind."
    );
    describe_counter!(
        "strata_probe_health_changes_total",
        "Health changes decided by active probes, by the new health."
    );
    describe_gauge!(
        "strata_probe_targets",
        "Targets the active health prober is probing."
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::convert::Infallible;
    use std::net::SocketAddr;

    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::routing::get;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    type Changes = mpsc::Receiver<HealthChange<String>>;

    fn spec(kind: ProbeKind, interval_ms: u64, failures: u32, successes: u32) -> ProbeSpec {
        ProbeSpec {
            kind,
            interval: Duration::from_millis(interval_ms),
            // As long as validate allows: loaded test machines are slow.
            timeout: Duration::from_millis(interval_ms),
            failure_threshold: failures,
            success_threshold: successes,
        }
    }

    fn target(address: impl ToString, spec: ProbeSpec) -> ProbeTarget {
        ProbeTarget {
            address: address.to_string(),
            spec,
        }
    }

    fn http(path: &str, expected_status: Option<u16>) -> ProbeKind {
        ProbeKind::Http {
            path: path.to_owned(),
            expected_status,
        }
    }

    fn grpc(service: &str) -> ProbeKind {
        ProbeKind::Grpc {
            service: service.to_owned(),
        }
    }

    fn prober() -> (Prober<String>, Changes, CancellationToken) {
        let (tx, rx) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        (Prober::new(tx, shutdown.clone()), rx, shutdown)
    }

    async fn next_change(rx: &mut Changes, within: Duration) -> HealthChange<String> {
        tokio::time::timeout(within, rx.recv())
            .await
            .expect("no health change in time")
            .expect("change channel closed")
    }

    /// Collects exactly `n` changes, keyed by id (each id changes once).
    async fn changes_by_id(rx: &mut Changes, n: usize) -> HashMap<String, HealthChange<String>> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            let change = next_change(rx, Duration::from_secs(3)).await;
            assert!(
                seen.insert(change.id.clone(), change).is_none(),
                "one change per id expected"
            );
        }
        seen
    }

    /// A port nothing listens on (bound, then released).
    async fn dead_address() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Accepts and immediately closes connections.
    fn accept_and_close(listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            }
        })
    }

    async fn tcp_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (address, accept_and_close(listener))
    }

    /// Stops a server task and waits until its listener is closed.
    async fn stop(server: JoinHandle<()>) {
        server.abort();
        let _ = server.await;
    }

    #[test]
    fn thresholds_are_exact() {
        let spec = spec(ProbeKind::Tcp, 100, 3, 2);
        let mut t = Tracker::default();
        // Unknown needs failure_threshold failures to turn unhealthy.
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
        assert_eq!(t.observe(false, &spec), None);
        // Unhealthy needs success_threshold successes; a failure restarts the count.
        assert_eq!(t.observe(true, &spec), None);
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(true, &spec), None);
        assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
        // Healthy: two failures do not flip, a success in between resets them.
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(true, &spec), None);
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
    }

    #[test]
    fn first_success_makes_unknown_healthy() {
        let spec = spec(ProbeKind::Tcp, 100, 3, 5);
        let mut t = Tracker::default();
        assert_eq!(t.observe(false, &spec), None);
        assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
        assert_eq!(t.health, Health::Healthy);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let spec = spec(ProbeKind::Tcp, 100, 0, 0);
        let mut t = Tracker::default();
        assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
        assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
    }

    #[test]
    fn validate_accepts_good_specs_and_names_each_problem() {
        let good = ProbeSpec {
            kind: http("/healthz?full=1", Some(204)),
            interval: MIN_INTERVAL,
            timeout: MIN_INTERVAL,
            failure_threshold: 1,
            success_threshold: MAX_THRESHOLD,
        };
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(
            ProbeSpec {
                kind: grpc(""),
                ..good.clone()
            }
            .validate(),
            Ok(())
        );

        let check = |spec: ProbeSpec, expected: ProbeSpecError| {
            let err = spec.validate().unwrap_err();
            assert!(!err.to_string().is_empty());
            assert_eq!(err, expected);
        };
        let ms = Duration::from_millis;
        check(
            ProbeSpec {
                interval: ms(99),
                timeout: ms(50),
                ..good.clone()
            },
            ProbeSpecError::IntervalTooShort(ms(99)),
        );
        check(
            ProbeSpec {
                timeout: Duration::ZERO,
                ..good.clone()
            },
            ProbeSpecError::ZeroTimeout,
        );
        check(
            ProbeSpec {
                timeout: ms(101),
                ..good.clone()
            },
            ProbeSpecError::TimeoutOverInterval {
                timeout: ms(101),
                interval: ms(100),
            },
        );
        check(
            ProbeSpec {
                failure_threshold: 0,
                ..good.clone()
            },
            ProbeSpecError::Threshold {
                which: "failure",
                value: 0,
            },
        );
        check(
            ProbeSpec {
                success_threshold: 101,
                ..good.clone()
            },
            ProbeSpecError::Threshold {
                which: "success",
                value: 101,
            },
        );
        for path in [
            "healthz",
            "",
            "/a b",
            &format!("/{}", "x".repeat(MAX_NAME_BYTES)),
        ] {
            check(
                ProbeSpec {
                    kind: http(path, None),
                    ..good.clone()
                },
                ProbeSpecError::Path(path.to_owned()),
            );
        }
        check(
            ProbeSpec {
                kind: http("/", Some(600)),
                ..good.clone()
            },
            ProbeSpecError::Status(600),
        );
        check(
            ProbeSpec {
                kind: grpc(&"s".repeat(MAX_NAME_BYTES + 1)),
                ..good.clone()
            },
            ProbeSpecError::ServiceName(MAX_NAME_BYTES + 1),
        );
    }

    #[test]
    fn jitter_stays_within_the_interval_and_spreads() {
        let interval = Duration::from_secs(1);
        let hasher = RandomState::new();
        let mut buckets = [0usize; 10];
        for i in 0..1000 {
            let delay = jitter(hasher.hash_one(format!("target-{i}")), interval);
            assert!(delay < interval);
            buckets[(delay.as_millis() / 100) as usize] += 1;
        }
        // Uniform would be 100 per bucket; anything near all-in-one fails.
        assert!(buckets.iter().all(|&n| n > 30), "{buckets:?}");
        assert_eq!(jitter(u64::MAX, Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_target_follows_its_listener() {
        let (prober, mut rx, _shutdown) = prober();
        let (address, server) = tcp_server().await;
        let id = "tcp".to_owned();
        prober.upsert(id.clone(), target(address, spec(ProbeKind::Tcp, 50, 3, 2)));
        assert_eq!(prober.health(&id), Some(Health::Unknown));

        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (change.id.as_str(), change.previous, change.health),
            ("tcp", Health::Unknown, Health::Healthy)
        );
        assert_eq!(prober.health(&id), Some(Health::Healthy));

        // Three consecutive refused connects, one interval apart.
        stop(server).await;
        let stopped = Instant::now();
        let change = next_change(&mut rx, Duration::from_secs(2)).await;
        let took = stopped.elapsed();
        assert_eq!(
            (change.previous, change.health),
            (Health::Healthy, Health::Unhealthy)
        );
        assert!(
            change.detail.contains(&address.to_string()),
            "{}",
            change.detail
        );
        assert!(
            took >= Duration::from_millis(95) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(prober.health(&id), Some(Health::Unhealthy));

        // Back on the same port: two successes, one interval apart.
        let listener = TcpListener::bind(address).await.unwrap();
        let restarted = Instant::now();
        let _server = accept_and_close(listener);
        let change = next_change(&mut rx, Duration::from_secs(2)).await;
        let took = restarted.elapsed();
        assert_eq!(
            (change.previous, change.health, change.detail.as_str()),
            (Health::Unhealthy, Health::Healthy, "")
        );
        assert!(
            took >= Duration::from_millis(45) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    async fn http_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let host = address.to_string();
        let app = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/down",
                get(|| async { http::StatusCode::SERVICE_UNAVAILABLE }),
            )
            .route("/teapot", get(|| async { http::StatusCode::IM_A_TEAPOT }))
            .route(
                "/host",
                get(move |headers: http::HeaderMap| async move {
                    match headers.get(header::HOST) {
                        Some(h) if h.as_bytes() == host.as_bytes() => http::StatusCode::OK,
                        _ => http::StatusCode::BAD_REQUEST,
                    }
                }),
            )
            .route(
                "/endless",
                get(|| async {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    Body::from_stream(futures::stream::repeat_with(move || {
                        Ok::<_, Infallible>(chunk.clone())
                    }))
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_status_decides_health() {
        let (prober, mut rx, _shutdown) = prober();
        let address = http_server().await;
        let cases = [
            ("ok", http("/ok", None), Health::Healthy),
            ("down", http("/down", None), Health::Unhealthy),
            ("missing", http("/missing", None), Health::Unhealthy),
            ("teapot", http("/teapot", Some(418)), Health::Healthy),
            ("wrong-expected", http("/ok", Some(204)), Health::Unhealthy),
            ("host-header", http("/host", None), Health::Healthy),
            ("endless-body", http("/endless", None), Health::Healthy),
        ];
        // Long timeouts and two failures to flip, so that a slow (loaded)
        // test machine cannot fake a verdict.
        for (id, kind, _) in &cases {
            prober.upsert(
                id.to_string(),
                target(address, spec(kind.clone(), 300, 2, 1)),
            );
        }

        let seen = changes_by_id(&mut rx, cases.len()).await;
        for (id, _, expected) in &cases {
            assert_eq!(seen[*id].health, *expected, "{id}: {:?}", seen[*id]);
            assert_eq!(prober.health(&id.to_string()), Some(*expected));
        }
        assert!(
            seen["down"]
                .detail
                .contains("/down: status 503, expected 2xx"),
            "{}",
            seen["down"].detail
        );
        assert!(
            seen["wrong-expected"]
                .detail
                .contains("status 200, expected 204 No Content"),
            "{}",
            seen["wrong-expected"].detail
        );
        // Steady state: no further changes.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), rx.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hanging_server_times_out_without_delaying_others() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let (healthy, _server) = tcp_server().await;

        let (prober, mut rx, _shutdown) = prober();
        let slow = |kind| ProbeSpec {
            timeout: Duration::from_millis(100),
            ..spec(kind, 100, 2, 1)
        };
        let started = Instant::now();
        prober.upsert("http".to_owned(), target(hanging, slow(http("/", None))));
        prober.upsert("grpc".to_owned(), target(hanging, slow(grpc(""))));
        prober.upsert(
            "tcp".to_owned(),
            target(healthy, spec(ProbeKind::Tcp, 100, 2, 1)),
        );

        let first = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!((first.id.as_str(), first.health), ("tcp", Health::Healthy));
        // (The hanging targets cannot decide before two 100 ms timeouts.)

        let seen = changes_by_id(&mut rx, 2).await;
        for id in ["http", "grpc"] {
            assert_eq!(seen[id].health, Health::Unhealthy);
            assert!(
                seen[id].detail.ends_with("timed out after 100ms"),
                "{}",
                seen[id].detail
            );
        }
        // Two timed-out probes, one interval apart.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_health_follows_serving_status() {
        use tonic_health::ServingStatus as Reported;

        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("strata.Test", Reported::Serving)
            .await;
        // Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to some
        // answers, a good part of the timeout used here.
        let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
            .unwrap()
            .with_nodelay(Some(true));
        let address = incoming.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );

        let (prober, mut rx, _shutdown) = prober();
        for (id, service) in [("svc", "strata.Test"), ("server", ""), ("unknown", "nope")] {
            prober.upsert(
                id.to_owned(),
                target(address, spec(grpc(service), 250, 2, 1)),
            );
        }
        let seen = changes_by_id(&mut rx, 3).await;
        assert_eq!(seen["svc"].health, Health::Healthy, "{:?}", seen["svc"]);
        assert_eq!(seen["server"].health, Health::Healthy);
        assert_eq!(seen["unknown"].health, Health::Unhealthy);
        assert!(
            seen["unknown"].detail.contains("NotFound"),
            "{}",
            seen["unknown"].detail
        );

        reporter
            .set_service_status("strata.Test", Reported::NotServing)
            .await;
        let change = next_change(&mut rx, Duration::from_secs(2)).await;
        assert_eq!(
            (change.id.as_str(), change.health),
            ("svc", Health::Unhealthy)
        );
        assert!(
            change.detail.ends_with("status NOT_SERVING"),
            "{}",
            change.detail
        );

        reporter
            .set_service_status("strata.Test", Reported::Serving)
            .await;
        let change = next_change(&mut rx, Duration::from_secs(2)).await;
        assert_eq!(
            (change.id.as_str(), change.health),
            ("svc", Health::Healthy)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconcile_adds_removes_and_changes_targets() {
        let (prober, mut rx, _shutdown) = prober();
        let (up, _server) = tcp_server().await;
        let (other, other_server) = tcp_server().await;
        let tcp = |address, interval| target(address, spec(ProbeKind::Tcp, interval, 2, 1));

        let all = HashMap::from([
            ("a".to_owned(), tcp(up, 50)),
            ("b".to_owned(), tcp(other, 50)),
        ]);
        prober.reconcile(all);
        let seen = changes_by_id(&mut rx, 2).await;
        assert!(seen.values().all(|c| c.health == Health::Healthy));

        // Remove b, add c; b's server going away must not be reported.
        prober.reconcile(HashMap::from([
            ("a".to_owned(), tcp(up, 50)),
            ("c".to_owned(), tcp(up, 50)),
        ]));
        assert_eq!(prober.health(&"b".to_owned()), None);
        assert_eq!(prober.len(), 2);
        stop(other_server).await;
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!((change.id.as_str(), change.health), ("c", Health::Healthy));

        // Any change of the target starts over from unknown, even one of
        // timing only: the registry drops its verdict on any check change.
        prober.reconcile(HashMap::from([
            ("a".to_owned(), tcp(up, 60)),
            ("c".to_owned(), tcp(up, 50)),
        ]));
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (change.id.as_str(), change.previous, change.health),
            ("a", Health::Healthy, Health::Unknown)
        );
        assert_eq!(change.target, tcp(up, 60));
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (change.id.as_str(), change.previous, change.health),
            ("a", Health::Unknown, Health::Healthy)
        );
        // The same set again changes nothing.
        prober.reconcile(HashMap::from([
            ("a".to_owned(), tcp(up, 60)),
            ("c".to_owned(), tcp(up, 50)),
        ]));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "no change expected"
        );

        // A new address: unknown, then what the new address says.
        let dead = dead_address().await;
        prober.reconcile(HashMap::from([
            ("a".to_owned(), tcp(dead, 60)),
            ("c".to_owned(), tcp(up, 50)),
        ]));
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (change.id.as_str(), change.previous, change.health),
            ("a", Health::Healthy, Health::Unknown)
        );
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (change.id.as_str(), change.previous, change.health),
            ("a", Health::Unknown, Health::Unhealthy)
        );

        assert!(prober.remove(&"a".to_owned()));
        assert!(!prober.remove(&"a".to_owned()));
        prober.reconcile(HashMap::new());
        assert!(prober.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upsert_probes_new_and_changed_targets_at_once() {
        let (prober, mut rx, _shutdown) = prober();
        let (address, _server) = tcp_server().await;
        let id = "slow-interval".to_owned();
        // Intervals far longer than the test: only an immediate first probe
        // can decide in time.
        let long = |secs: u64| ProbeSpec {
            timeout: Duration::from_secs(1),
            ..spec(ProbeKind::Tcp, secs * 1000, 3, 1)
        };
        prober.upsert(id.clone(), target(address, long(60)));
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(change.health, Health::Healthy);

        prober.upsert(id.clone(), target(address, long(120)));
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(change.health, Health::Unknown);
        let change = next_change(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(change.health, Health::Healthy);
        assert_eq!(change.target, target(address, long(120)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unchanged_targets_keep_schedule_and_counters() {
        let (prober, mut rx, _shutdown) = prober();
        let dead = dead_address().await;
        let targets = HashMap::from([(
            "dead".to_owned(),
            target(dead, spec(ProbeKind::Tcp, 50, 3, 1)),
        )]);
        // Re-reconciling more often than the interval: if that restarted the
        // target, three failures in a row would never be counted.
        let deadline = Instant::now() + Duration::from_secs(2);
        let change = loop {
            prober.reconcile(targets.clone());
            if let Ok(change) = rx.try_recv() {
                break change;
            }
            assert!(Instant::now() < deadline, "never turned unhealthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(change.health, Health::Unhealthy);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_or_cancelling_stops_every_task() {
        for cancel in [false, true] {
            let (prober, mut rx, shutdown) = prober();
            let (address, _server) = tcp_server().await;
            let targets = (0..50)
                .map(|i| {
                    (
                        format!("t{i}"),
                        target(address, spec(ProbeKind::Tcp, 50, MAX_THRESHOLD, 1)),
                    )
                })
                .collect();
            prober.reconcile(targets);
            changes_by_id(&mut rx, 50).await;

            // Every task holds a sender (dropped with its probe in flight),
            // the prober one more.
            let tasks_left = if cancel {
                shutdown.cancel();
                1
            } else {
                drop(prober);
                0
            };
            let deadline = Instant::now() + Duration::from_secs(2);
            while rx.sender_strong_count() > tasks_left {
                assert!(
                    Instant::now() < deadline,
                    "tasks still running (cancel={cancel})"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconciling_ten_thousand_targets_is_cheap() {
        let (prober, _rx, _shutdown) = prober();
        // An hour-long interval: the first probes are spread over the hour,
        // so this measures bookkeeping, not probing.
        let targets: HashMap<String, ProbeTarget> = (0..10_000)
            .map(|i| {
                let t = target("127.0.0.1:9", spec(ProbeKind::Tcp, 3_600_000, 3, 1));
                (format!("project/tenant/svc/{i}"), t)
            })
            .collect();

        let started = std::time::Instant::now();
        prober.reconcile(targets.clone());
        let first = started.elapsed();
        assert_eq!(prober.len(), 10_000);

        let started = std::time::Instant::now();
        prober.reconcile(targets);
        let again = started.elapsed();
        assert_eq!(
            prober.health(&"project/tenant/svc/7".to_owned()),
            Some(Health::Unknown)
        );

        let started = std::time::Instant::now();
        prober.reconcile(HashMap::new());
        let cleared = started.elapsed();
        assert!(prober.is_empty());
        eprintln!("10k targets: added {first:?}, unchanged {again:?}, cleared {cleared:?}");
        // Generous bounds (debug build, loaded machine; typical figures are
        // tens of milliseconds) that still catch quadratic work.
        assert!(
            first < Duration::from_secs(10)
                && again < Duration::from_secs(5)
                && cleared < Duration::from_secs(5),
            "first {first:?}, unchanged {again:?}, cleared {cleared:?}"
        );
    }
}
