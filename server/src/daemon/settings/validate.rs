//! Checking the merged settings as a whole into a [`Config`]: each value
//! parsed and bounded, related settings checked together, errors naming
//! the setting and the source that set it.

use super::*;

impl Merged {
    pub(super) fn validate(self) -> Result<Config, SettingsError> {
        let invalid =
            |setting: &'static str, source: &str, message: String| SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            };
        let listen = self.listen.value.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                &self.listen.source,
                format!(
                    "{:?} is not an IP:port address (e.g. 127.0.0.1:7070)",
                    self.listen.value
                ),
            )
        })?;
        if self.data_dir.value.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                &self.data_dir.source,
                "must not be empty".into(),
            ));
        }
        let duration = |setting: &'static str, v: &Sourced<String>| {
            humantime::parse_duration(v.value.trim()).map_err(|e| {
                invalid(
                    setting,
                    &v.source,
                    format!("{:?} is not a duration like 10s or 5m: {e}", v.value),
                )
            })
        };
        let shutdown_grace = duration("shutdown_grace", &self.shutdown_grace)?;
        let compaction =
            CompactionConfig::from_settings(&self.retain_revisions, &self.compaction_interval)?;
        let log = LogConfig::from_settings(&self.log_level, &self.log_format)?;
        // On etcd, an unset limit defaults to what etcd's default request
        // limit takes (a write carries its value twice); stratad logs it.
        let max_value_bytes =
            if self.max_value_bytes.source == "default" && !self.etcd_endpoints.value.is_empty() {
                crate::store::etcd::DEFAULT_MAX_VALUE_BYTES
            } else {
                usize::try_from(self.max_value_bytes.value)
                    .ok()
                    .filter(|n| (1..=64 * 1024 * 1024).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            "limits.max_value_bytes",
                            &self.max_value_bytes.source,
                            format!(
                                "must be between 1 and 67108864, got {}",
                                self.max_value_bytes.value
                            ),
                        )
                    })?
            };
        let journal_revisions = usize::try_from(self.journal_revisions.value)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                invalid(
                    "watch.journal_revisions",
                    &self.journal_revisions.source,
                    format!("must be at least 1, got {}", self.journal_revisions.value),
                )
            })?;
        let history_versions = u64::try_from(self.history_versions.value)
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                invalid(
                    "history.versions",
                    &self.history_versions.source,
                    format!(
                        "must be between 1 and 10000, got {}",
                        self.history_versions.value
                    ),
                )
            })?;
        let etcd = self.etcd()?;
        let mut limits = crate::app::api::Limits {
            max_value_bytes,
            history_versions,
            ..crate::app::api::Limits::default()
        };
        crate::app::limits::apply_layers(&self.limit_layers, &mut limits)?;
        let tls = crate::daemon::tls::ServerTls::from_settings(
            &self.tls_cert,
            &self.tls_key,
            &self.tls_client_ca,
        )?;
        let auth = crate::app::auth::AuthConfig::from_settings(
            &self.auth_mode,
            &self.admin_token_file,
            &self.metrics_auth,
        )?;
        let probes = self.probe_policy()?;
        Ok(Config {
            listen,
            data_dir: self.data_dir.value,
            shutdown_grace,
            log,
            compaction,
            limits,
            audit: crate::app::audit::AuditSettings::from_layers(&self.audit_layers)?,
            probes,
            journal: crate::state::view::JournalLimits {
                max_revisions: journal_revisions,
                ..crate::state::view::JournalLimits::default()
            },
            etcd,
            tls,
            auth,
            otel: crate::transport::layers::tracing::OtelConfig::default(),
        })
    }

    /// The probe policy of the `[probes]` tables, denying the etcd
    /// endpoints too (names are resolved once, here).
    fn probe_policy(&self) -> Result<crate::probe::policy::ProbePolicy, SettingsError> {
        use std::net::ToSocketAddrs as _;
        let mut policy = crate::probe::policy::ProbePolicy::from_layers(&self.probe_layers)?;
        for url in &self.etcd_endpoints.value {
            let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            let authority = authority.split('/').next().unwrap_or(authority);
            // An endpoint that does not resolve now is reported when the
            // store connects; there is nothing here to deny yet.
            if let Ok(addrs) = authority.to_socket_addrs() {
                for addr in addrs {
                    policy.deny_own(addr);
                }
            }
        }
        Ok(policy)
    }
}
