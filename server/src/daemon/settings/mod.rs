//! Daemon configuration, layered: built-in defaults → TOML file → `STRATA_*`
//! environment → command-line flags, then validated as a whole.
//!
//! Every source is passed in explicitly ([`Config::load`] takes the parsed
//! flags and an iterator of environment pairs), so tests build configurations
//! without touching the process environment.
//!
//! This folder only merges the sources and composes the result: each
//! section's file table and checks live with the module that uses it
//! (`[limits]` in `app::limits`, `[audit]` in `app::audit`, `[auth]` in
//! `app::auth`, `[probes]` in `probe::policy`, `[tls]` in `daemon::tls`,
//! `[log]` in `daemon::telemetry`, `[compaction]` in `daemon::compaction`),
//! all reporting with the one `SettingsError`. `[etcd]` is checked here
//! (`etcd.rs`): the store backend takes typed `EtcdOptions` and never
//! reads settings files, flags or the environment. `[watch]` and
//! `[history]` are single numbers checked in `validate.rs`.

// Environment variables and their settings.
mod env;
// The `[etcd]` section, checked together.
mod etcd;
// Checking the merged settings as a whole.
mod validate;

pub use env::ENV_VARS;
use env::{env_layer, env_name, flag_name};
use etcd::{Endpoints, EtcdLayer};

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::app::auth::AuthFile;
pub use crate::daemon::compaction::CompactionConfig;
use crate::daemon::compaction::CompactionFile;
use crate::daemon::telemetry::LogFile;
pub use crate::daemon::telemetry::{LogConfig, LogFormat};
use crate::daemon::tls::TlsFile;
pub use crate::settings_error::SettingsError;
use crate::settings_error::Sourced;

/// Default gRPC + HTTP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default data directory of the embedded store.
pub const DEFAULT_DATA_DIR: &str = "./strata-data";

/// Command-line flags of `stratad`. Every flag is optional: unset flags leave
/// the lower layers (env, file, defaults) in force.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "stratad",
    version,
    about = "Strata daemon: layered configuration and service registry"
)]
pub struct Flags {
    /// Configuration file (TOML). Also `STRATA_CONFIG`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC and HTTP on [default: 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the embedded store [default: ./strata-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `strata_server=debug,info` [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// How long SIGTERM waits for in-flight requests, e.g. `10s` [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Store data in etcd at these client URLs (comma-separated) instead of
    /// the embedded store, e.g. `http://10.0.0.1:2379,http://10.0.0.2:2379`.
    #[arg(long, value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// Serve gRPC and HTTP over TLS with this PEM certificate chain (with
    /// `--tls-key`).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mutual TLS).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require a bearer token on every call: `on` (default) or `off` (local
    /// experiments only; every caller may do everything).
    #[arg(long, value_name = "on|off")]
    pub auth: Option<String>,
    /// Where first start writes the admin token [default: admin.token in the data directory].
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Whether `/metrics` needs a token: `open` (default) or `token`.
    #[arg(long, value_name = "open|token")]
    pub metrics_auth: Option<String>,
}

/// The validated configuration of one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// gRPC + HTTP listen address.
    pub listen: SocketAddr,
    /// Data directory of the embedded store.
    pub data_dir: PathBuf,
    /// Longest graceful drain after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Logging.
    pub log: LogConfig,
    /// History compaction.
    pub compaction: CompactionConfig,
    /// Size and count limits on writes.
    pub limits: crate::app::api::Limits,
    /// Retention of the audit log.
    pub audit: crate::app::audit::AuditSettings,
    /// Where health probes may connect (the etcd endpoints are denied
    /// already; the listener is added when it is bound).
    pub probes: crate::probe::policy::ProbePolicy,
    /// How much recent history the view keeps for resuming watches.
    pub journal: crate::state::view::JournalLimits,
    /// The etcd cluster to store data in; `None`: the embedded store in
    /// `data_dir`.
    pub etcd: Option<crate::store::etcd::EtcdOptions>,
    /// TLS for the listener, loaded; `None`: plaintext.
    pub tls: Option<crate::daemon::tls::ServerTls>,
    /// Tokens: enforcement, the admin token file, `/metrics`.
    pub auth: crate::app::auth::AuthConfig,
    /// OpenTelemetry trace export, from the standard `OTEL_*` variables
    /// (not the file or flags); off unless an endpoint is set.
    pub otel: crate::transport::layers::tracing::OtelConfig,
}

/// One layer of settings as found in a source: every field optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    shutdown_grace: Option<String>,
    #[serde(default)]
    log: LogFile,
    #[serde(default)]
    compaction: CompactionFile,
    #[serde(default)]
    limits: LimitsLayer,
    #[serde(default)]
    audit: crate::app::audit::AuditFile,
    #[serde(default)]
    probes: crate::probe::policy::ProbesFile,
    #[serde(default)]
    watch: WatchLayer,
    #[serde(default)]
    history: HistoryLayer,
    #[serde(default)]
    etcd: EtcdLayer,
    #[serde(default)]
    tls: TlsFile,
    #[serde(default)]
    auth: AuthFile,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryLayer {
    versions: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchLayer {
    journal_revisions: Option<i64>,
}

/// `[limits]`: every size, count and rate limit (`app::limits`).
type LimitsLayer = crate::app::limits::LimitsFile;

/// Settings after merging, before validation.
#[derive(Debug, Clone)]
struct Merged {
    listen: Sourced<String>,
    data_dir: Sourced<PathBuf>,
    shutdown_grace: Sourced<String>,
    log_level: Sourced<String>,
    log_format: Sourced<String>,
    retain_revisions: Sourced<i64>,
    compaction_interval: Sourced<String>,
    max_value_bytes: Sourced<i64>,
    /// Every `[limits]` and `[audit]` table seen, in order, with its source
    /// (their settings are validated together in `app::limits`/`app::audit`).
    limit_layers: Vec<(LimitsLayer, String)>,
    audit_layers: Vec<(crate::app::audit::AuditFile, String)>,
    probe_layers: Vec<(crate::probe::policy::ProbesFile, String)>,
    journal_revisions: Sourced<i64>,
    history_versions: Sourced<i64>,
    etcd_endpoints: Sourced<Vec<String>>,
    etcd_prefix: Sourced<String>,
    etcd_ca_file: Sourced<Option<PathBuf>>,
    etcd_cert_file: Sourced<Option<PathBuf>>,
    etcd_key_file: Sourced<Option<PathBuf>>,
    etcd_username: Sourced<Option<String>>,
    etcd_password_file: Sourced<Option<PathBuf>>,
    tls_cert: Sourced<Option<PathBuf>>,
    tls_key: Sourced<Option<PathBuf>>,
    tls_client_ca: Sourced<Option<PathBuf>>,
    auth_mode: Sourced<String>,
    admin_token_file: Sourced<Option<PathBuf>>,
    metrics_auth: Sourced<String>,
}

fn set<T>(slot: &mut Sourced<T>, value: Option<T>, source: impl FnOnce() -> String) {
    if let Some(value) = value {
        *slot = Sourced {
            value,
            source: source(),
        };
    }
}

impl Merged {
    fn defaults() -> Self {
        let d = |v: &str| Sourced {
            value: v.to_owned(),
            source: "default".into(),
        };
        fn none<T>() -> Sourced<Option<T>> {
            Sourced {
                value: None,
                source: "default".into(),
            }
        }
        Self {
            listen: d(DEFAULT_LISTEN),
            data_dir: Sourced {
                value: PathBuf::from(DEFAULT_DATA_DIR),
                source: "default".into(),
            },
            shutdown_grace: d("10s"),
            log_level: d("info"),
            log_format: d("text"),
            retain_revisions: Sourced {
                value: 100_000,
                source: "default".into(),
            },
            compaction_interval: d("5m"),
            max_value_bytes: Sourced {
                value: 1024 * 1024,
                source: "default".into(),
            },
            limit_layers: Vec::new(),
            audit_layers: Vec::new(),
            probe_layers: Vec::new(),
            journal_revisions: Sourced {
                value: 100_000,
                source: "default".into(),
            },
            history_versions: Sourced {
                value: 50,
                source: "default".into(),
            },
            etcd_endpoints: Sourced {
                value: Vec::new(),
                source: "default".into(),
            },
            etcd_prefix: d(""),
            etcd_ca_file: none(),
            etcd_cert_file: none(),
            etcd_key_file: none(),
            etcd_username: none(),
            etcd_password_file: none(),
            tls_cert: none(),
            tls_key: none(),
            tls_client_ca: none(),
            auth_mode: d("on"),
            admin_token_file: none(),
            metrics_auth: d("open"),
        }
    }

    /// Applies a layer; `name(setting)` says where a setting came from.
    fn apply(&mut self, layer: Layer, name: impl Fn(&str) -> String) {
        set(&mut self.listen, layer.listen, || name("listen"));
        set(&mut self.data_dir, layer.data_dir, || name("data_dir"));
        set(&mut self.shutdown_grace, layer.shutdown_grace, || {
            name("shutdown_grace")
        });
        set(&mut self.log_level, layer.log.level, || name("log.level"));
        set(&mut self.log_format, layer.log.format, || {
            name("log.format")
        });
        set(
            &mut self.retain_revisions,
            layer.compaction.retain_revisions,
            || name("compaction.retain_revisions"),
        );
        set(
            &mut self.compaction_interval,
            layer.compaction.interval,
            || name("compaction.interval"),
        );
        set(
            &mut self.max_value_bytes,
            layer.limits.max_value_bytes,
            || name("limits.max_value_bytes"),
        );
        self.limit_layers
            .push((layer.limits.clone(), name("limits")));
        self.audit_layers.push((layer.audit.clone(), name("audit")));
        self.probe_layers
            .push((layer.probes.clone(), name("probes")));
        set(
            &mut self.journal_revisions,
            layer.watch.journal_revisions,
            || name("watch.journal_revisions"),
        );
        set(&mut self.history_versions, layer.history.versions, || {
            name("history.versions")
        });
        let etcd = layer.etcd;
        set(
            &mut self.etcd_endpoints,
            etcd.endpoints.as_ref().map(Endpoints::urls),
            || name("etcd.endpoints"),
        );
        set(&mut self.etcd_prefix, etcd.prefix, || name("etcd.prefix"));
        set(&mut self.etcd_ca_file, etcd.ca_file.map(Some), || {
            name("etcd.ca_file")
        });
        set(&mut self.etcd_cert_file, etcd.cert_file.map(Some), || {
            name("etcd.cert_file")
        });
        set(&mut self.etcd_key_file, etcd.key_file.map(Some), || {
            name("etcd.key_file")
        });
        set(&mut self.etcd_username, etcd.username.map(Some), || {
            name("etcd.username")
        });
        set(
            &mut self.etcd_password_file,
            etcd.password_file.map(Some),
            || name("etcd.password_file"),
        );
        let tls = layer.tls;
        set(&mut self.tls_cert, tls.cert.map(Some), || name("tls.cert"));
        set(&mut self.tls_key, tls.key.map(Some), || name("tls.key"));
        set(&mut self.tls_client_ca, tls.client_ca.map(Some), || {
            name("tls.client_ca")
        });
        let auth = layer.auth;
        set(&mut self.auth_mode, auth.mode, || name("auth.mode"));
        set(
            &mut self.admin_token_file,
            auth.admin_token_file.map(Some),
            || name("auth.admin_token_file"),
        );
        set(&mut self.metrics_auth, auth.metrics, || {
            name("auth.metrics")
        });
    }
}

/// Parses a configuration file's text (used for `--config` and by tests of
/// the shipped example in `deploy/`).
pub fn parse_file(path: &Path, text: &str) -> Result<Config, SettingsError> {
    let mut merged = Merged::defaults();
    merged.apply(parse_layer(path, text)?, |s| {
        format!("{} ({s})", path.display())
    });
    merged.validate()
}

fn parse_layer(path: &Path, text: &str) -> Result<Layer, SettingsError> {
    toml::from_str(text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

impl Config {
    /// Builds the configuration from flags and environment pairs (pass
    /// `std::env::vars()` in production). The file comes from `--config`,
    /// else `STRATA_CONFIG`, else none.
    pub fn load(
        flags: &Flags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let otel = crate::transport::layers::tracing::OtelConfig::from_env(
            env.iter()
                .filter(|(k, _)| k.starts_with("OTEL_"))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )?;
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("STRATA_"))
            .collect();
        let mut merged = Merged::defaults();
        let file = flags.config.clone().or_else(|| {
            env.iter()
                .rev()
                .find(|(k, _)| k == "STRATA_CONFIG")
                .map(|(_, v)| PathBuf::from(v))
        });
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Read {
                path: path.clone(),
                source,
            })?;
            let layer = parse_layer(&path, &text)?;
            merged.apply(layer, |s| format!("{} ({s})", path.display()));
        }
        merged.apply(env_layer(&env)?, env_name);
        merged.apply(
            Layer {
                listen: flags.listen.clone(),
                data_dir: flags.data_dir.clone(),
                shutdown_grace: flags.shutdown_grace.clone(),
                log: LogFile {
                    level: flags.log_level.clone(),
                    format: flags.log_format.clone(),
                },
                compaction: CompactionFile::default(),
                limits: LimitsLayer::default(),
                audit: crate::app::audit::AuditFile::default(),
                probes: crate::probe::policy::ProbesFile::default(),
                watch: WatchLayer::default(),
                history: HistoryLayer::default(),
                etcd: EtcdLayer {
                    endpoints: flags.etcd_endpoints.clone().map(Endpoints::Joined),
                    ..EtcdLayer::default()
                },
                tls: TlsFile {
                    cert: flags.tls_cert.clone(),
                    key: flags.tls_key.clone(),
                    client_ca: flags.tls_client_ca.clone(),
                },
                auth: AuthFile {
                    mode: flags.auth.clone(),
                    admin_token_file: flags.admin_token_file.clone(),
                    metrics: flags.metrics_auth.clone(),
                },
            },
            flag_name,
        );
        let mut config = merged.validate()?;
        config.otel = otel;
        Ok(config)
    }
}
