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
        let interval = duration("compaction.interval", &self.compaction_interval)?;
        if interval.is_zero() {
            return Err(invalid(
                "compaction.interval",
                &self.compaction_interval.source,
                "must be longer than zero".into(),
            ));
        }
        if self.retain_revisions.value < 0 {
            return Err(invalid(
                "compaction.retain_revisions",
                &self.retain_revisions.source,
                format!(
                    "must be 0 (off) or positive, got {}",
                    self.retain_revisions.value
                ),
            ));
        }
        let format = match self.log_format.value.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    &self.log_format.source,
                    format!("{other:?} is not one of: text, json"),
                ));
            }
        };
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
        let level = self.log_level.value.trim().to_owned();
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(invalid(
                "log.level",
                &self.log_level.source,
                format!("{level:?}: {e}"),
            ));
        }
        let etcd = self.etcd()?;
        let mut limits = crate::app::api::Limits {
            max_value_bytes,
            history_versions,
            ..crate::app::api::Limits::default()
        };
        crate::app::limits::apply_layers(&self.limit_layers, &mut limits)?;
        let tls = self.tls()?;
        let auth = self.auth()?;
        let probes = self.probe_policy()?;
        Ok(Config {
            listen,
            data_dir: self.data_dir.value,
            shutdown_grace,
            log: LogConfig { level, format },
            compaction: CompactionConfig {
                retain_revisions: self.retain_revisions.value,
                interval,
            },
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

    /// The auth settings: `auth.mode` on|off, `auth.metrics` open|token.
    fn auth(&self) -> Result<crate::app::auth::AuthConfig, SettingsError> {
        let invalid =
            |setting: &'static str, source: &str, message: String| SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            };
        let mode = match self.auth_mode.value.trim() {
            "on" => crate::app::auth::AuthMode::On,
            "off" => crate::app::auth::AuthMode::Off,
            other => {
                return Err(invalid(
                    "auth.mode",
                    &self.auth_mode.source,
                    format!("{other:?} is not one of: on, off"),
                ));
            }
        };
        let metrics_need_token = match self.metrics_auth.value.trim() {
            "open" => false,
            "token" => true,
            other => {
                return Err(invalid(
                    "auth.metrics",
                    &self.metrics_auth.source,
                    format!("{other:?} is not one of: open, token"),
                ));
            }
        };
        Ok(crate::app::auth::AuthConfig {
            mode,
            admin_token_file: self.admin_token_file.value.clone(),
            metrics_need_token,
        })
    }

    /// The TLS settings, checked together and loaded (so a bad certificate
    /// or key stops `stratad` at startup): `None` without a certificate.
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

    fn tls(&self) -> Result<Option<crate::daemon::tls::ServerTls>, SettingsError> {
        let invalid =
            |setting: &'static str, source: &str, message: String| SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            };
        let (cert, key) = match (&self.tls_cert.value, &self.tls_key.value) {
            (None, None) => {
                if self.tls_client_ca.value.is_some() {
                    return Err(invalid(
                        "tls.client_ca",
                        &self.tls_client_ca.source,
                        "client certificates need TLS: set tls.cert and tls.key too".into(),
                    ));
                }
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            // Named after the setting that is set, so the source is one
            // the operator wrote.
            (Some(_), None) => {
                return Err(invalid(
                    "tls.cert",
                    &self.tls_cert.source,
                    "needs its private key in tls.key (--tls-key, STRATA_TLS_KEY)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.key",
                    &self.tls_key.source,
                    "needs its certificate in tls.cert (--tls-cert, STRATA_TLS_CERT)".into(),
                ));
            }
        };
        let files = crate::daemon::tls::TlsFiles {
            cert,
            key,
            client_ca: self.tls_client_ca.value.clone(),
        };
        crate::daemon::tls::ServerTls::load(files)
            .map(Some)
            .map_err(|e| {
                let source = match e.setting {
                    "tls.cert" => &self.tls_cert.source,
                    "tls.client_ca" => &self.tls_client_ca.source,
                    _ => &self.tls_key.source,
                };
                invalid(e.setting, source, e.message)
            })
    }
}
