//! Active health probes for persistent service instances: TCP connect, HTTP
//! GET with an expected status, `grpc.health.v1.Health/Check`, and a UDP
//! datagram whose reply must match.
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

// The probe checks themselves: TCP connect, HTTP GET, gRPC health, UDP.
mod checks;
// Where probes may connect: the allow and deny lists, checked at every probe.
pub mod policy;
// What is probed and how, and what a probe found.
mod spec;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::probe::policy::ProbePolicy;
use checks::probe;
pub use spec::{Health, HealthChange, ProbeKind, ProbeSpec, ProbeSpecError, ProbeTarget};

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
