//! Service instances: validation of a registration into its stored record,
//! and which instances are routable.
//!
//! An instance is *routable* when it is not draining and, for a persistent
//! instance with an active check, its last probe verdict is healthy (before
//! the first verdict it is not routable, like a Kubernetes readiness probe).
//! Persistent instances without a check and ephemeral instances (alive as
//! long as their lease) are routable.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::domain::names;
use crate::domain::records::{CheckRecord, EndpointRecord, HealthRecord, InstanceRecord};

/// A registration that breaks a rule; the message says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RegistrationError(pub String);

/// A size limit a registration exceeds (reported as "limit exceeded").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TooLarge(pub String);

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInstance {
    /// A rule is broken.
    #[error(transparent)]
    Invalid(#[from] RegistrationError),
    /// A size limit is exceeded.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

/// Transport of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2.
    Http,
    /// gRPC (HTTP/2).
    Grpc,
    /// Raw TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 4] = [Protocol::Http, Protocol::Grpc, Protocol::Tcp, Protocol::Udp];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = RegistrationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                RegistrationError(format!(
                    "unknown protocol {s:?} (use http, grpc, tcp or udp)"
                ))
            })
    }
}

/// What an active check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// TCP connect.
    Tcp,
    /// HTTP GET of `path`, expecting `status` (`None`: any 2xx).
    Http {
        /// Path, starting with `/`.
        path: String,
        /// Expected status.
        status: Option<u16>,
    },
    /// gRPC health check of `service` (empty: the whole server).
    Grpc {
        /// Health service name.
        service: String,
    },
    /// One datagram `send` to the endpoint; a reply matching `expect`.
    Udp {
        /// The datagram sent (1 to [`MAX_UDP_CHECK_BYTES`] bytes).
        send: Vec<u8>,
        /// What the reply must be.
        expect: UdpExpect,
    },
}

/// What a UDP check's reply must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UdpExpect {
    /// Any reply.
    Any,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// Bytes a regular expression matches (searched, not anchored).
    Regex(String),
}

impl UdpExpect {
    /// The expectation a stored check holds.
    pub fn of_record(record: &CheckRecord) -> Self {
        if !record.udp_expect_regex.is_empty() {
            Self::Regex(record.udp_expect_regex.clone())
        } else if !record.udp_expect.is_empty() {
            Self::Bytes(record.udp_expect.clone())
        } else {
            Self::Any
        }
    }
}

/// Largest datagram a UDP check sends or expects: one that fits an
/// Ethernet frame's payload without fragmenting.
pub const MAX_UDP_CHECK_BYTES: usize = 1200;

/// Longest regular expression a UDP check takes.
pub const MAX_UDP_REGEX_CHARS: usize = 512;

/// Compiled-size bound of a UDP check's regular expression (and of its
/// lazy DFA's cache), so a pattern cannot make each probe expensive.
pub const UDP_REGEX_SIZE_LIMIT: usize = 32 * 1024;

/// At most the first 64 characters of `text`, for error messages that echo
/// what a caller sent.
pub fn truncated(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The compiled form of a UDP check's expression, within the size bound.
pub fn udp_regex(pattern: &str) -> Result<regex::bytes::Regex, String> {
    if pattern.chars().count() > MAX_UDP_REGEX_CHARS {
        return Err(format!(
            "the expression is over {MAX_UDP_REGEX_CHARS} characters"
        ));
    }
    regex::bytes::RegexBuilder::new(pattern)
        .size_limit(UDP_REGEX_SIZE_LIMIT)
        .dfa_size_limit(UDP_REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| truncated(&e.to_string()))
}

/// An active check as registered (zero numbers take the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// What to do.
    pub kind: CheckKind,
    /// Endpoint to probe, by name; `None`: the first by name.
    pub endpoint: Option<String>,
    /// Probe interval, ms (default [`DEFAULT_INTERVAL_MS`]).
    pub interval_ms: u32,
    /// Probe timeout, ms (default [`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: u32,
    /// Consecutive failures that make the instance unhealthy (default 3).
    pub failure_threshold: u32,
    /// Consecutive successes that make it healthy again (default 1).
    pub success_threshold: u32,
}

/// Default probe interval.
pub const DEFAULT_INTERVAL_MS: u32 = 10_000;
/// Default probe timeout.
pub const DEFAULT_TIMEOUT_MS: u32 = 2_000;
/// Shortest probe interval accepted: probes are cheap, but thousands of
/// instances probed every few ms would be a load test, not a health check.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Default lease TTL of an ephemeral instance.
pub const DEFAULT_TTL_SECONDS: i64 = 10;
/// Longest lease TTL of an ephemeral instance.
pub const MAX_TTL_SECONDS: i64 = 3600;
/// Default load-balancing weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest load-balancing weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// A registration as a caller sends it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceSpec {
    /// Endpoints as (name, `host:port`, protocol) in the order given, so
    /// duplicate names can be reported.
    pub endpoints: Vec<(String, String, Option<Protocol>)>,
    /// Protocol of endpoints that do not name theirs (default http).
    pub protocol: Option<Protocol>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Weight; 0 takes the default.
    pub weight: u32,
    /// Software version.
    pub version: String,
    /// Persistent (probed) rather than ephemeral (lease-bound).
    pub persistent: bool,
    /// Ephemeral lease TTL; 0 takes the default.
    pub ttl_seconds: i64,
    /// Active check (persistent instances only).
    pub check: Option<CheckSpec>,
}

/// Size limits of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationLimits {
    /// Most endpoints.
    pub max_endpoints: usize,
    /// Most metadata entries.
    pub max_metadata_entries: usize,
    /// Most bytes of metadata keys and values together.
    pub max_metadata_bytes: usize,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            max_endpoints: 16,
            max_metadata_entries: 64,
            max_metadata_bytes: 16 * 1024,
        }
    }
}

fn invalid(message: String) -> InvalidInstance {
    RegistrationError(message).into()
}

/// Checks `host:port`: a DNS name, an IPv4 address or a bracketed IPv6
/// address, and a port from 1 to 65535.
pub fn validate_address(address: &str) -> Result<(), RegistrationError> {
    let bad = |why: &str| {
        RegistrationError(format!(
            "invalid endpoint address {address:?}: {why} (expected host:port)"
        ))
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("port must be 1-65535")),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address"))?;
        return Ok(());
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() || host.len() > 253 {
        return Err(bad("host must be 1-253 characters"));
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad("host is not a DNS name or IP address"));
        }
    }
    Ok(())
}

fn check_record(
    check: &CheckSpec,
    endpoints: &BTreeMap<String, EndpointRecord>,
) -> Result<CheckRecord, InvalidInstance> {
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let interval_ms = or(check.interval_ms, DEFAULT_INTERVAL_MS);
    let timeout_ms = or(check.timeout_ms, DEFAULT_TIMEOUT_MS.min(interval_ms));
    let failure_threshold = or(check.failure_threshold, 3);
    let success_threshold = or(check.success_threshold, 1);
    if interval_ms < MIN_INTERVAL_MS {
        return Err(invalid(format!(
            "check interval {interval_ms} ms is below the minimum of {MIN_INTERVAL_MS} ms"
        )));
    }
    if timeout_ms > interval_ms {
        return Err(invalid(format!(
            "check timeout {timeout_ms} ms must not exceed its interval {interval_ms} ms"
        )));
    }
    for (name, value) in [
        ("failure_threshold", failure_threshold),
        ("success_threshold", success_threshold),
    ] {
        if value > 100 {
            return Err(invalid(format!("check {name} must be 1-100, got {value}")));
        }
    }
    let endpoint = match &check.endpoint {
        Some(name) if !endpoints.contains_key(name) => {
            return Err(invalid(format!(
                "check names endpoint {name:?}, which the instance does not have"
            )));
        }
        Some(name) => name.clone(),
        None => endpoints.keys().next().cloned().unwrap_or_default(),
    };
    let mut record = CheckRecord {
        endpoint,
        interval_ms,
        timeout_ms,
        failure_threshold,
        success_threshold,
        ..CheckRecord::default()
    };
    match &check.kind {
        CheckKind::Tcp => record.kind = "tcp".into(),
        CheckKind::Http { path, status } => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
                return Err(invalid(format!(
                    "check HTTP path {path:?} must start with '/' and contain no spaces"
                )));
            }
            if let Some(s) = status
                && !(100..=599).contains(s)
            {
                return Err(invalid(format!(
                    "check HTTP status {s} is not an HTTP status"
                )));
            }
            record.kind = "http".into();
            record.http_path = path.clone();
            record.http_status = status.map_or(0, u32::from);
        }
        CheckKind::Grpc { service } => {
            record.kind = "grpc".into();
            record.grpc_service = service.clone();
        }
        CheckKind::Udp { send, expect } => {
            if send.is_empty() || send.len() > MAX_UDP_CHECK_BYTES {
                return Err(invalid(format!(
                    "check UDP datagram is {} bytes; it must be 1-{MAX_UDP_CHECK_BYTES}",
                    send.len()
                )));
            }
            record.kind = "udp".into();
            record.udp_send = send.clone();
            match expect {
                UdpExpect::Any => {}
                UdpExpect::Bytes(bytes) => {
                    if bytes.is_empty() || bytes.len() > MAX_UDP_CHECK_BYTES {
                        return Err(invalid(format!(
                            "check UDP expected reply is {} bytes; it must be 1-{MAX_UDP_CHECK_BYTES}",
                            bytes.len()
                        )));
                    }
                    record.udp_expect = bytes.clone();
                }
                UdpExpect::Regex(pattern) => {
                    udp_regex(pattern).map_err(|e| {
                        invalid(format!(
                            "check UDP expect_regex {:?}: {e}",
                            truncated(pattern)
                        ))
                    })?;
                    record.udp_expect_regex = pattern.clone();
                }
            }
        }
    }
    Ok(record)
}

/// Validates a registration and builds the record to store.
pub fn build_record(
    spec: &InstanceSpec,
    limits: &RegistrationLimits,
    now_unix_ms: i64,
) -> Result<InstanceRecord, InvalidInstance> {
    if spec.endpoints.is_empty() {
        return Err(invalid("an instance needs at least one endpoint".into()));
    }
    if spec.endpoints.len() > limits.max_endpoints {
        return Err(TooLarge(format!(
            "{} endpoints; the limit is {}",
            spec.endpoints.len(),
            limits.max_endpoints
        ))
        .into());
    }
    let default_protocol = spec.protocol.unwrap_or(Protocol::Http);
    let mut endpoints = BTreeMap::new();
    for (name, address, protocol) in &spec.endpoints {
        names::validate_id("endpoint name", name).map_err(|e| invalid(e.to_string()))?;
        validate_address(address)?;
        let record = EndpointRecord {
            address: address.clone(),
            protocol: protocol.unwrap_or(default_protocol).name().to_owned(),
        };
        if endpoints.insert(name.clone(), record).is_some() {
            return Err(invalid(format!("endpoint name {name:?} is given twice")));
        }
    }
    if spec.metadata.len() > limits.max_metadata_entries {
        return Err(TooLarge(format!(
            "{} metadata entries; the limit is {}",
            spec.metadata.len(),
            limits.max_metadata_entries
        ))
        .into());
    }
    let metadata_bytes: usize = spec.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if metadata_bytes > limits.max_metadata_bytes {
        return Err(TooLarge(format!(
            "metadata is {metadata_bytes} bytes; the limit is {} bytes",
            limits.max_metadata_bytes
        ))
        .into());
    }
    if spec.metadata.keys().any(|k| k.is_empty() || k.len() > 253) {
        return Err(invalid("metadata keys must be 1-253 bytes".into()));
    }
    let weight = match spec.weight {
        0 => DEFAULT_WEIGHT,
        w if w > MAX_WEIGHT => {
            return Err(invalid(format!("weight {w} exceeds {MAX_WEIGHT}")));
        }
        w => w,
    };
    if spec.version.len() > 128 {
        return Err(invalid("version must be at most 128 bytes".into()));
    }
    let ttl_seconds = if spec.persistent {
        if spec.ttl_seconds != 0 {
            return Err(invalid(
                "ttl_seconds is for ephemeral instances; a persistent one stays until deregistered"
                    .into(),
            ));
        }
        0
    } else {
        match spec.ttl_seconds {
            0 => DEFAULT_TTL_SECONDS,
            t if (1..=MAX_TTL_SECONDS).contains(&t) => t,
            t => {
                return Err(invalid(format!(
                    "ttl_seconds must be 1-{MAX_TTL_SECONDS}, got {t}"
                )));
            }
        }
    };
    let check = match (&spec.check, spec.persistent) {
        (None, _) => None,
        (Some(_), false) => {
            return Err(invalid(
                "checks are for persistent instances; an ephemeral one is kept alive by its owner's lease"
                    .into(),
            ));
        }
        (Some(check), true) => Some(check_record(check, &endpoints)?),
    };
    Ok(InstanceRecord {
        endpoints,
        metadata: spec.metadata.clone(),
        weight,
        version: spec.version.clone(),
        persistent: spec.persistent,
        ttl_seconds,
        check,
        draining: false,
        registered_at_unix_ms: now_unix_ms,
    })
}

/// Health of an instance as reported to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Checked, no verdict yet.
    Unknown,
    /// Healthy (or not checked).
    Healthy,
    /// Failing its check.
    Unhealthy,
}

/// The health of an instance given its record and probe verdict.
pub fn health(record: &InstanceRecord, verdict: Option<&HealthRecord>) -> Health {
    match (&record.check, verdict) {
        (None, _) => Health::Healthy,
        (Some(_), None) => Health::Unknown,
        (Some(_), Some(v)) if v.healthy => Health::Healthy,
        (Some(_), Some(_)) => Health::Unhealthy,
    }
}

/// Whether traffic may be sent to the instance.
pub fn routable(record: &InstanceRecord, verdict: Option<&HealthRecord>) -> bool {
    !record.draining && health(record, verdict) == Health::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(endpoints: &[(&str, &str)]) -> InstanceSpec {
        InstanceSpec {
            endpoints: endpoints
                .iter()
                .map(|(n, a)| ((*n).to_owned(), (*a).to_owned(), None))
                .collect(),
            ..InstanceSpec::default()
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.5:7000",
            "mm-1.vega.svc:80",
            "[::1]:8080",
            "localhost:1",
        ] {
            validate_address(ok).unwrap();
        }
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:70000",
            ":80",
            "[::1:80",
            "bad host:80",
            "-a:80",
            "a..b:80",
        ] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_endpoint_names_and_limits() {
        let limits = RegistrationLimits::default();
        let dup = spec(&[("main", "a:1"), ("main", "b:2")]);
        let err = build_record(&dup, &limits, 0).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        assert!(build_record(&spec(&[]), &limits, 0).is_err());
        let mut big = spec(&[("main", "a:1")]);
        big.metadata.insert("k".into(), "x".repeat(20_000));
        assert!(matches!(
            build_record(&big, &limits, 0),
            Err(InvalidInstance::TooLarge(_))
        ));
    }

    #[test]
    fn defaults_and_kind_rules() {
        let limits = RegistrationLimits::default();
        let r = build_record(&spec(&[("main", "a:1")]), &limits, 5).unwrap();
        assert_eq!(
            (r.weight, r.ttl_seconds, r.persistent),
            (DEFAULT_WEIGHT, DEFAULT_TTL_SECONDS, false)
        );
        assert_eq!(r.endpoints["main"].protocol, "http");
        let mut checked = spec(&[("main", "a:1")]);
        checked.check = Some(CheckSpec {
            kind: CheckKind::Tcp,
            endpoint: None,
            interval_ms: 0,
            timeout_ms: 0,
            failure_threshold: 0,
            success_threshold: 0,
        });
        // A check on an ephemeral instance is refused…
        assert!(build_record(&checked, &limits, 0).is_err());
        // …and on a persistent one gets defaults and the first endpoint.
        checked.persistent = true;
        let r = build_record(&checked, &limits, 0).unwrap();
        let c = r.check.clone().unwrap();
        assert_eq!(
            (
                c.interval_ms,
                c.timeout_ms,
                c.failure_threshold,
                c.endpoint.as_str()
            ),
            (DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS, 3, "main")
        );
        assert_eq!(health(&r, None), Health::Unknown);
        assert!(!routable(&r, None));
        let healthy = HealthRecord {
            healthy: true,
            ..HealthRecord::default()
        };
        assert!(routable(&r, Some(&healthy)));
        let drained = InstanceRecord {
            draining: true,
            ..r
        };
        assert!(!routable(&drained, Some(&healthy)));
    }
}
