//! What is probed and how ([`ProbeSpec`], checked by
//! [`ProbeSpec::validate`]), and what probing found ([`Health`],
//! [`HealthChange`]).

use std::fmt;
use std::time::Duration;

use super::{FLOOR_INTERVAL, MAX_NAME_BYTES, MAX_THRESHOLD, MIN_INTERVAL};

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
    /// Success is a reply to the datagram `send` that matches `expect`.
    Udp {
        /// The datagram sent.
        send: Vec<u8>,
        /// What the reply must be.
        expect: crate::domain::registry::UdpExpect,
    },
}

impl ProbeKind {
    /// The bounded metric label for this kind: `tcp`, `http`, `grpc` or
    /// `udp`.
    pub fn label(&self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http { .. } => "http",
            ProbeKind::Grpc { .. } => "grpc",
            ProbeKind::Udp { .. } => "udp",
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
    /// A UDP check's datagram is empty or too large.
    #[error("a UDP check sends 1 to 1200 bytes, not {0}")]
    Datagram(usize),
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
            ProbeKind::Udp { send, .. } => {
                let max = crate::domain::registry::MAX_UDP_CHECK_BYTES;
                if send.is_empty() || send.len() > max {
                    return Err(ProbeSpecError::Datagram(send.len()));
                }
            }
        }
        Ok(())
    }

    /// The interval and timeout actually run: the interval is kept above a
    /// small floor and the timeout within the interval, whatever the spec
    /// says, so an unvalidated spec cannot spin or overlap probes.
    pub(super) fn effective(&self) -> (Duration, Duration) {
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

    pub(super) fn from_u8(value: u8) -> Self {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub(super) fn to_u8(self) -> u8 {
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
    /// The target, as named to [`Prober::reconcile`](super::Prober::reconcile) or [`Prober::upsert`](super::Prober::upsert).
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
