//! The `[audit]` settings: retention and which refusals are recorded.

use std::time::Duration;

use serde::Deserialize;

/// Retention of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Most entries kept (the oldest beyond are pruned).
    pub max_entries: usize,
    /// Entries older than this are pruned.
    pub max_age: Duration,
    /// How often the leader prunes.
    pub prune_interval: Duration,
    /// Record every refused mutation, not only those refused for
    /// permission (`audit.refusals = "all"`).
    pub record_all_refusals: bool,
    /// Most refusal entries one token writes per minute; the rest are
    /// counted and summed up in its next recorded refusal (0: no limit).
    pub max_refusals_per_minute: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(10),
            record_all_refusals: false,
            max_refusals_per_minute: 60,
        }
    }
}

/// The `[audit]` table of the configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// Most entries kept.
    pub max_entries: Option<i64>,
    /// Longest an entry is kept (`30d`, `12h`).
    pub max_age: Option<String>,
    /// How often the leader prunes (`10s`).
    pub prune_interval: Option<String>,
    /// Which refused mutations are recorded: `denied` (permission denied,
    /// the default) or `all`.
    pub refusals: Option<String>,
    /// Most refusal entries one token writes per minute (0: no limit).
    pub max_refusals_per_minute: Option<i64>,
}

impl AuditSettings {
    /// Settings from the `[audit]` tables of the sources, later ones
    /// winning; errors name the setting and its source.
    pub(crate) fn from_layers(
        layers: &[(AuditFile, String)],
    ) -> Result<Self, crate::settings_error::SettingsError> {
        let mut out = Self::default();
        let invalid = |setting: &'static str, source: &str, message: String| {
            crate::settings_error::SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            }
        };
        for (layer, source) in layers {
            if let Some(n) = layer.max_entries {
                out.max_entries = usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                    invalid(
                        "audit.max_entries",
                        source,
                        format!("must be at least 1, got {n}"),
                    )
                })?;
            }
            let duration = |setting: &'static str, v: &str| {
                humantime::parse_duration(v.trim())
                    .map_err(|e| invalid(setting, source, format!("{v:?}: {e}")))
                    .and_then(|d| {
                        if d.is_zero() {
                            Err(invalid(setting, source, "must not be zero".into()))
                        } else {
                            Ok(d)
                        }
                    })
            };
            if let Some(v) = &layer.max_age {
                out.max_age = duration("audit.max_age", v)?;
            }
            if let Some(v) = &layer.prune_interval {
                out.prune_interval = duration("audit.prune_interval", v)?;
            }
            if let Some(n) = layer.max_refusals_per_minute {
                out.max_refusals_per_minute = u32::try_from(n).map_err(|_| {
                    invalid(
                        "audit.max_refusals_per_minute",
                        source,
                        format!("must be between 0 and {}, got {n}", u32::MAX),
                    )
                })?;
            }
            match layer.refusals.as_deref().map(str::trim) {
                None => {}
                Some("denied") => out.record_all_refusals = false,
                Some("all") => out.record_all_refusals = true,
                Some(other) => {
                    return Err(invalid(
                        "audit.refusals",
                        source,
                        format!("{other:?}: expected \"denied\" or \"all\""),
                    ));
                }
            }
        }
        Ok(out)
    }
}
