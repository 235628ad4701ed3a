//! Limits beyond single-value sizes, as settings (`[limits]`) and as the
//! counts every write plans with: tenants per project, config keys and
//! instances per tenant, config bytes per project (enforced in the same
//! plan/compare loop as every write). The request rate, stream caps and
//! JSON error bodies are middleware (`transport::layers::limits`).
//!
//! **Counts.** A write that adds a tenant, a config key or an instance is
//! planned against the view, which knows the current count. To keep
//! concurrent writers from passing the limit together, such a write also
//! puts a *guard* key (`q/{project}` for tenants, `q/{project}/{tenant}/c`
//! for config keys, `q/{project}/{tenant}/i` for instances) with a compare
//! that the guard has not changed since the revision the plan saw. Two
//! guarded writers of one project or tenant therefore conflict, and the
//! loser is re-planned against a view that counts the winner. Tenants are
//! always guarded (creating one is rare); config keys and instances only
//! once the count is within [`CONFIG_GUARD_MARGIN`] / [`INSTANCE_GUARD_MARGIN`]
//! of the limit, so busy tenants far from it do not serialise their
//! registrations. Guards of a tenant are deleted with it.

use std::time::Duration;

use serde::Deserialize;
use strata_proto::v1::ErrorReason;

use crate::error::ApiError;
use crate::store::{Compare, CompareOp, Revision, Txn};

/// Writes adding a config key pin the tenant's guard once its key count
/// is this close to the limit.
pub const CONFIG_GUARD_MARGIN: usize = 256;
/// Writes adding an instance pin the tenant's guard once its instance count
/// is this close to the limit.
pub const INSTANCE_GUARD_MARGIN: usize = 1024;

/// Size limits enforced on writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest config value, in bytes.
    pub max_value_bytes: usize,
    /// Most labels on a tenant.
    pub max_labels: usize,
    /// Versions of each layer's history kept (older ones are pruned as new
    /// ones are written).
    pub history_versions: u64,
    /// Sizes of a service registration.
    pub registration: crate::domain::registry::RegistrationLimits,
    /// Counts per tenant and project, key and label sizes.
    pub counts: crate::app::limits::CountLimits,
    /// Requests per second per token.
    pub rate: crate::app::limits::RateSettings,
    /// Open connections and how fast clients must send their requests.
    pub connections: ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 1024 * 1024,
            max_labels: 64,
            history_versions: 50,
            registration: crate::domain::registry::RegistrationLimits::default(),
            counts: crate::app::limits::CountLimits::default(),
            rate: crate::app::limits::RateSettings::default(),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Count limits (0 in a setting: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountLimits {
    /// Most tenants in one project.
    pub max_tenants_per_project: usize,
    /// Most config keys (layers) in one tenant.
    pub max_config_keys_per_tenant: usize,
    /// Most service instances in one tenant.
    pub max_instances_per_tenant: usize,
    /// Longest config key, bytes (at most 512, the key syntax's own limit).
    pub max_key_bytes: usize,
    /// Longest label value, bytes.
    pub max_label_value_bytes: usize,
    /// Most bytes of config values (the current layers of every tenant)
    /// in one project.
    pub max_config_bytes_per_project: usize,
    /// Most streams (watches, keep-alives) one token holds open at once.
    pub max_streams_per_token: usize,
    /// Most distinct selections (project, tenant, keys) one token watches
    /// at once, per kind of watch.
    pub max_watch_selections_per_token: usize,
}

impl Default for CountLimits {
    fn default() -> Self {
        Self {
            max_tenants_per_project: 10_000,
            max_config_keys_per_tenant: 10_000,
            max_instances_per_tenant: 50_000,
            max_key_bytes: crate::domain::names::MAX_KEY_LEN,
            max_label_value_bytes: 256,
            max_config_bytes_per_project: 1 << 30,
            max_streams_per_token: 20_000,
            max_watch_selections_per_token: 1_000,
        }
    }
}

/// Request rate per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSettings {
    /// Sustained requests per second per token (0: unlimited).
    pub per_second: f64,
    /// Requests a token may send at once after being idle.
    pub burst: f64,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            per_second: 10_000.0,
            burst: 20_000.0,
        }
    }
}

impl Eq for RateSettings {}

/// The `[limits]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest config value, bytes (validated in `daemon::settings`).
    pub max_value_bytes: Option<i64>,
    /// Longest config key, bytes.
    pub max_key_bytes: Option<i64>,
    /// Most labels on a tenant.
    pub max_labels: Option<i64>,
    /// Longest label value, bytes.
    pub max_label_value_bytes: Option<i64>,
    /// Most metadata entries of an instance.
    pub max_metadata_entries: Option<i64>,
    /// Most bytes of an instance's metadata keys and values together.
    pub max_metadata_bytes: Option<i64>,
    /// Most endpoints of an instance.
    pub max_endpoints: Option<i64>,
    /// Most tenants per project (0: unlimited).
    pub max_tenants_per_project: Option<i64>,
    /// Most config keys per tenant (0: unlimited).
    pub max_config_keys_per_tenant: Option<i64>,
    /// Most instances per tenant (0: unlimited).
    pub max_instances_per_tenant: Option<i64>,
    /// Most config bytes per project (0: unlimited).
    pub max_config_bytes_per_project: Option<i64>,
    /// Most open streams per token (0: unlimited).
    pub max_streams_per_token: Option<i64>,
    /// Most distinct watched selections per token (0: unlimited).
    pub max_watch_selections_per_token: Option<i64>,
    /// Most open connections (0: unlimited).
    pub max_connections: Option<i64>,
    /// Longest a client may take to send a request head (`10s`).
    pub header_read_timeout: Option<String>,
    /// Requests per second per token (0: unlimited).
    pub requests_per_second: Option<f64>,
    /// Burst of requests per token.
    pub request_burst: Option<f64>,
}

/// Applies the `[limits]` tables of the sources (later ones winning) to
/// `limits`; errors name the setting and its source.
pub(crate) fn apply_layers(
    layers: &[(LimitsFile, String)],
    limits: &mut Limits,
) -> Result<(), crate::settings_error::SettingsError> {
    let invalid = |setting: &'static str, source: &str, message: String| {
        crate::settings_error::SettingsError::Invalid {
            setting,
            source_name: source.to_owned(),
            message,
        }
    };
    let count = |setting: &'static str, source: &str, v: i64, min: i64, max: i64| {
        if (min..=max).contains(&v) {
            usize::try_from(v).map_err(|e| invalid(setting, source, e.to_string()))
        } else {
            Err(invalid(
                setting,
                source,
                format!("must be between {min} and {max}, got {v}"),
            ))
        }
    };
    for (l, source) in layers {
        let s = source.as_str();
        if let Some(v) = l.max_key_bytes {
            limits.counts.max_key_bytes = count(
                "limits.max_key_bytes",
                s,
                v,
                1,
                crate::domain::names::MAX_KEY_LEN as i64,
            )?;
        }
        if let Some(v) = l.max_labels {
            limits.max_labels = count("limits.max_labels", s, v, 0, 10_000)?;
        }
        if let Some(v) = l.max_label_value_bytes {
            limits.counts.max_label_value_bytes =
                count("limits.max_label_value_bytes", s, v, 1, 1 << 20)?;
        }
        if let Some(v) = l.max_metadata_entries {
            limits.registration.max_metadata_entries =
                count("limits.max_metadata_entries", s, v, 0, 100_000)?;
        }
        if let Some(v) = l.max_metadata_bytes {
            limits.registration.max_metadata_bytes =
                count("limits.max_metadata_bytes", s, v, 0, 16 << 20)?;
        }
        if let Some(v) = l.max_endpoints {
            limits.registration.max_endpoints = count("limits.max_endpoints", s, v, 1, 10_000)?;
        }
        if let Some(v) = l.max_tenants_per_project {
            limits.counts.max_tenants_per_project =
                count("limits.max_tenants_per_project", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_config_keys_per_tenant {
            limits.counts.max_config_keys_per_tenant =
                count("limits.max_config_keys_per_tenant", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_instances_per_tenant {
            limits.counts.max_instances_per_tenant =
                count("limits.max_instances_per_tenant", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_config_bytes_per_project {
            limits.counts.max_config_bytes_per_project =
                count("limits.max_config_bytes_per_project", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_streams_per_token {
            limits.counts.max_streams_per_token =
                count("limits.max_streams_per_token", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_watch_selections_per_token {
            limits.counts.max_watch_selections_per_token =
                count("limits.max_watch_selections_per_token", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = l.max_connections {
            limits.connections.max_connections =
                count("limits.max_connections", s, v, 0, i64::MAX)?;
        }
        if let Some(v) = &l.header_read_timeout {
            let timeout = humantime::parse_duration(v.trim())
                .map_err(|e| invalid("limits.header_read_timeout", s, format!("{v:?}: {e}")))?;
            if timeout.is_zero() {
                return Err(invalid(
                    "limits.header_read_timeout",
                    s,
                    "must not be zero".into(),
                ));
            }
            limits.connections.header_read_timeout = timeout;
        }
        if let Some(v) = l.requests_per_second {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    "limits.requests_per_second",
                    s,
                    format!("must be 0 (unlimited) or positive, got {v}"),
                ));
            }
            limits.rate.per_second = v;
        }
        if let Some(v) = l.request_burst {
            if !(v.is_finite() && v >= 1.0) {
                return Err(invalid(
                    "limits.request_burst",
                    s,
                    format!("must be at least 1, got {v}"),
                ));
            }
            limits.rate.burst = v;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- counts

/// Key of the guard of a project's tenant count.
pub fn tenants_guard(project: &str) -> Vec<u8> {
    format!("q/{project}").into_bytes()
}

fn config_guard(project: &str, tenant: &str) -> Vec<u8> {
    format!("q/{project}/{tenant}/c").into_bytes()
}

fn config_bytes_guard(project: &str) -> Vec<u8> {
    format!("q/{project}/bytes").into_bytes()
}

/// Writes that grow a project's config bytes pin its guard once they are
/// this close to the limit.
pub const CONFIG_BYTES_GUARD_MARGIN: usize = 64 << 20;

/// Checks that a project holding `current` bytes of config values may grow
/// by `growth`, and guards the total near the limit (a write that shrinks
/// or keeps the total is never refused).
pub(crate) fn plan_config_bytes(
    limits: &CountLimits,
    project: &str,
    current: usize,
    growth: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let max = limits.max_config_bytes_per_project;
    if max == 0 || growth == 0 {
        return Ok(txn);
    }
    if current.saturating_add(growth) > max {
        return Err(exceeded(
            format!(
                "project {project:?} holds {current} bytes of config values and this write adds \
                 {growth}; the limit is {max} bytes"
            ),
            max,
            "limits.max_config_bytes_per_project",
        ));
    }
    if current
        .saturating_add(growth)
        .saturating_add(CONFIG_BYTES_GUARD_MARGIN)
        > max
    {
        return Ok(guard(txn, config_bytes_guard(project), seen));
    }
    Ok(txn)
}

fn instances_guard(project: &str, tenant: &str) -> Vec<u8> {
    format!("q/{project}/{tenant}/i").into_bytes()
}

/// Pins `guard` to the state the plan saw (`seen`: the view's revision).
fn guard(txn: Txn, guard: Vec<u8>, seen: Revision) -> Txn {
    txn.when(Compare::mod_revision(
        guard.clone(),
        CompareOp::Less,
        seen + 1,
    ))
    .put(guard, Vec::new())
}

pub(crate) fn exceeded(what: String, limit: usize, setting: &str) -> ApiError {
    ApiError::new(ErrorReason::LimitExceeded, format!("{what} ({setting})"))
        .with("limit", limit)
        .with("setting", setting)
}

/// Checks that a project with `current` tenants may get `adding` more, and
/// guards the count. Call from the plan of a write.
pub(crate) fn plan_tenants(
    limits: &CountLimits,
    project: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let max = limits.max_tenants_per_project;
    if max == 0 || adding == 0 {
        return Ok(txn);
    }
    if current + adding > max {
        return Err(exceeded(
            format!("project {project:?} has {current} tenants; the limit is {max}"),
            max,
            "limits.max_tenants_per_project",
        ));
    }
    Ok(guard(txn, tenants_guard(project), seen))
}

/// Checks that a tenant with `current` config keys may get `adding` new
/// ones, and guards the count near the limit.
pub(crate) fn plan_config_keys(
    limits: &CountLimits,
    project: &str,
    tenant: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let count = TenantCount {
        max: limits.max_config_keys_per_tenant,
        margin: CONFIG_GUARD_MARGIN,
        what: "config keys",
        setting: "limits.max_config_keys_per_tenant",
    };
    count.plan(
        tenant,
        current,
        adding,
        || config_guard(project, tenant),
        seen,
        txn,
    )
}

/// Checks that a tenant with `current` instances may get `adding` new ones,
/// and guards the count near the limit.
pub(crate) fn plan_instances(
    limits: &CountLimits,
    project: &str,
    tenant: &str,
    current: usize,
    adding: usize,
    seen: Revision,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let count = TenantCount {
        max: limits.max_instances_per_tenant,
        margin: INSTANCE_GUARD_MARGIN,
        what: "instances",
        setting: "limits.max_instances_per_tenant",
    };
    count.plan(
        tenant,
        current,
        adding,
        || instances_guard(project, tenant),
        seen,
        txn,
    )
}

/// One per-tenant count limit (0: unlimited) and how close to it writes
/// start guarding the count.
struct TenantCount {
    max: usize,
    margin: usize,
    what: &'static str,
    setting: &'static str,
}

impl TenantCount {
    fn plan(
        &self,
        tenant: &str,
        current: usize,
        adding: usize,
        guard_key: impl FnOnce() -> Vec<u8>,
        seen: Revision,
        txn: Txn,
    ) -> Result<Txn, ApiError> {
        let max = self.max;
        if max == 0 || adding == 0 {
            return Ok(txn);
        }
        if current + adding > max {
            return Err(exceeded(
                format!(
                    "tenant {tenant:?} has {current} {}; the limit is {max}",
                    self.what
                ),
                max,
                self.setting,
            ));
        }
        if current + adding + self.margin > max {
            return Ok(guard(txn, guard_key(), seen));
        }
        Ok(txn)
    }
}

/// Connection limits of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once (0: no limit).
    pub max_connections: usize,
    /// Longest a client may take to send its greeting and each HTTP/1.1
    /// request head.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_lists_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = crate::daemon::settings::parse_file(&path, &text).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.audit, crate::app::audit::AuditSettings::default());
    }

    #[test]
    fn bad_settings_name_the_setting_and_the_file() {
        let path = std::path::Path::new("s.toml");
        for (text, setting) in [
            ("[limits]\nmax_key_bytes = 9999\n", "limits.max_key_bytes"),
            (
                "[limits]\nmax_tenants_per_project = -1\n",
                "limits.max_tenants_per_project",
            ),
            (
                "[limits]\nrequests_per_second = -3.0\n",
                "limits.requests_per_second",
            ),
            ("[limits]\nrequest_burst = 0.5\n", "limits.request_burst"),
            ("[audit]\nmax_age = \"soon\"\n", "audit.max_age"),
            ("[audit]\nmax_entries = 0\n", "audit.max_entries"),
        ] {
            let e = crate::daemon::settings::parse_file(path, text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(setting) && e.contains("s.toml"), "{text}: {e}");
        }
        assert!(crate::daemon::settings::parse_file(path, "[limits]\nmax_colour = 1\n").is_err());
        let config = crate::daemon::settings::parse_file(
            path,
            "[limits]\nmax_instances_per_tenant = 0\nrequests_per_second = 2.5\n",
        )
        .unwrap();
        assert_eq!(config.limits.counts.max_instances_per_tenant, 0);
        assert!((config.limits.rate.per_second - 2.5).abs() < f64::EPSILON);
    }

    #[test]
    fn counts_are_refused_at_the_limit_and_guarded_near_it() {
        let limits = CountLimits {
            max_tenants_per_project: 2,
            max_instances_per_tenant: 5000,
            ..CountLimits::default()
        };
        let txn = plan_tenants(&limits, "p", 1, 1, 7, Txn::new()).unwrap();
        assert_eq!(txn.ops.len(), 1, "creating a tenant puts the guard");
        let e = plan_tenants(&limits, "p", 2, 1, 7, Txn::new()).unwrap_err();
        assert_eq!(e.reason, ErrorReason::LimitExceeded);
        let far = plan_instances(&limits, "p", "t", 10, 1, 7, Txn::new()).unwrap();
        assert!(far.ops.is_empty(), "far from the limit, no guard");
        let near = plan_instances(&limits, "p", "t", 4000, 1, 7, Txn::new()).unwrap();
        assert_eq!(near.compares.len(), 1);
    }
}
