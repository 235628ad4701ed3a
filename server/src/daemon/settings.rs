//! Daemon configuration, layered: built-in defaults → TOML file → `STRATA_*`
//! environment → command-line flags, then validated as a whole.
//!
//! Every source is passed in explicitly ([`Config::load`] takes the parsed
//! flags and an iterator of environment pairs), so tests build configurations
//! without touching the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::daemon::telemetry::{LogConfig, LogFormat};
pub use crate::settings_error::SettingsError;

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

/// Automatic compaction of store history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Revisions of history kept behind the current one (watch resume and
    /// config history reach back this far). 0 disables automatic compaction.
    pub retain_revisions: i64,
    /// How often the compaction job runs.
    pub interval: Duration,
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
    log: LogLayer,
    #[serde(default)]
    compaction: CompactionLayer,
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
    tls: TlsLayer,
    #[serde(default)]
    auth: AuthLayer,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthLayer {
    mode: Option<String>,
    admin_token_file: Option<PathBuf>,
    metrics: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsLayer {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdLayer {
    endpoints: Option<Endpoints>,
    prefix: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

/// etcd client URLs: a TOML array, or one comma-separated string (as the
/// flag and the environment variable take them).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Endpoints {
    List(Vec<String>),
    Joined(String),
}

impl Endpoints {
    fn urls(&self) -> Vec<String> {
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match self {
            Self::List(list) => list.iter().flat_map(|s| split(s)).collect(),
            Self::Joined(s) => split(s),
        }
    }
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

/// `[limits]`: every size, count and rate limit (`limits.rs`).
type LimitsLayer = crate::app::limits::LimitsFile;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogLayer {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactionLayer {
    retain_revisions: Option<i64>,
    interval: Option<String>,
}

/// A value together with the name of the source that set it, for messages.
#[derive(Debug, Clone)]
struct Sourced<T> {
    value: T,
    source: String,
}

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
    /// (their settings are validated together in `limits.rs`/`audit.rs`).
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

/// Environment variables read by the daemon, and the setting each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("STRATA_LISTEN", "listen"),
    ("STRATA_DATA_DIR", "data_dir"),
    ("STRATA_SHUTDOWN_GRACE", "shutdown_grace"),
    ("STRATA_LOG_LEVEL", "log.level"),
    ("STRATA_LOG_FORMAT", "log.format"),
    (
        "STRATA_COMPACTION_RETAIN_REVISIONS",
        "compaction.retain_revisions",
    ),
    ("STRATA_COMPACTION_INTERVAL", "compaction.interval"),
    ("STRATA_LIMITS_MAX_VALUE_BYTES", "limits.max_value_bytes"),
    ("STRATA_WATCH_JOURNAL_REVISIONS", "watch.journal_revisions"),
    ("STRATA_HISTORY_VERSIONS", "history.versions"),
    ("STRATA_ETCD_ENDPOINTS", "etcd.endpoints"),
    ("STRATA_ETCD_PREFIX", "etcd.prefix"),
    ("STRATA_ETCD_CA_FILE", "etcd.ca_file"),
    ("STRATA_ETCD_CERT_FILE", "etcd.cert_file"),
    ("STRATA_ETCD_KEY_FILE", "etcd.key_file"),
    ("STRATA_ETCD_USERNAME", "etcd.username"),
    ("STRATA_ETCD_PASSWORD_FILE", "etcd.password_file"),
    ("STRATA_TLS_CERT", "tls.cert"),
    ("STRATA_TLS_KEY", "tls.key"),
    ("STRATA_TLS_CLIENT_CA", "tls.client_ca"),
    ("STRATA_AUTH", "auth.mode"),
    ("STRATA_ADMIN_TOKEN_FILE", "auth.admin_token_file"),
    ("STRATA_METRICS_AUTH", "auth.metrics"),
    ("STRATA_PROBES_ALLOW", "probes.allow"),
    ("STRATA_PROBES_DENY", "probes.deny"),
    ("STRATA_PROBES_DENY_PRIVATE", "probes.deny_private"),
];

fn env_layer(env: &[(String, String)]) -> Result<Layer, SettingsError> {
    let get = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let number =
        |name: &'static str, setting: &'static str| -> Result<Option<i64>, SettingsError> {
            get(name)
                .map(|v| {
                    v.trim().parse::<i64>().map_err(|e| SettingsError::Invalid {
                        setting,
                        source_name: name.into(),
                        message: format!("{v:?} is not a whole number: {e}"),
                    })
                })
                .transpose()
        };
    let retain_revisions = number(
        "STRATA_COMPACTION_RETAIN_REVISIONS",
        "compaction.retain_revisions",
    )?;
    let max_value_bytes = number("STRATA_LIMITS_MAX_VALUE_BYTES", "limits.max_value_bytes")?;
    let list = |name: &str| {
        get(name).map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    };
    let deny_private = get("STRATA_PROBES_DENY_PRIVATE")
        .map(|v| match v.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(SettingsError::Invalid {
                setting: "probes.deny_private",
                source_name: "STRATA_PROBES_DENY_PRIVATE".into(),
                message: format!("{other:?}: expected true or false"),
            }),
        })
        .transpose()?;
    Ok(Layer {
        listen: get("STRATA_LISTEN"),
        data_dir: get("STRATA_DATA_DIR").map(PathBuf::from),
        shutdown_grace: get("STRATA_SHUTDOWN_GRACE"),
        log: LogLayer {
            level: get("STRATA_LOG_LEVEL"),
            format: get("STRATA_LOG_FORMAT"),
        },
        compaction: CompactionLayer {
            retain_revisions,
            interval: get("STRATA_COMPACTION_INTERVAL"),
        },
        limits: LimitsLayer {
            max_value_bytes,
            ..LimitsLayer::default()
        },
        audit: crate::app::audit::AuditFile::default(),
        probes: crate::probe::policy::ProbesFile {
            allow: list("STRATA_PROBES_ALLOW"),
            deny: list("STRATA_PROBES_DENY"),
            deny_private,
        },
        watch: WatchLayer {
            journal_revisions: number("STRATA_WATCH_JOURNAL_REVISIONS", "watch.journal_revisions")?,
        },
        history: HistoryLayer {
            versions: number("STRATA_HISTORY_VERSIONS", "history.versions")?,
        },
        etcd: EtcdLayer {
            endpoints: get("STRATA_ETCD_ENDPOINTS").map(Endpoints::Joined),
            prefix: get("STRATA_ETCD_PREFIX"),
            ca_file: get("STRATA_ETCD_CA_FILE").map(PathBuf::from),
            cert_file: get("STRATA_ETCD_CERT_FILE").map(PathBuf::from),
            key_file: get("STRATA_ETCD_KEY_FILE").map(PathBuf::from),
            username: get("STRATA_ETCD_USERNAME"),
            password_file: get("STRATA_ETCD_PASSWORD_FILE").map(PathBuf::from),
        },
        tls: TlsLayer {
            cert: get("STRATA_TLS_CERT").map(PathBuf::from),
            key: get("STRATA_TLS_KEY").map(PathBuf::from),
            client_ca: get("STRATA_TLS_CLIENT_CA").map(PathBuf::from),
        },
        auth: AuthLayer {
            mode: get("STRATA_AUTH"),
            admin_token_file: get("STRATA_ADMIN_TOKEN_FILE").map(PathBuf::from),
            metrics: get("STRATA_METRICS_AUTH"),
        },
    })
}

fn env_name(setting: &str) -> String {
    ENV_VARS
        .iter()
        .find(|(_, s)| *s == setting)
        .map_or_else(|| setting.to_owned(), |(v, _)| (*v).to_owned())
}

fn flag_name(setting: &str) -> String {
    // The auth flags are named for what operators type, not the file's table.
    match setting {
        "auth.mode" => return "--auth".into(),
        "auth.admin_token_file" => return "--admin-token-file".into(),
        "auth.metrics" => return "--metrics-auth".into(),
        _ => {}
    }
    format!("--{}", setting.replace(['.', '_'], "-"))
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
                log: LogLayer {
                    level: flags.log_level.clone(),
                    format: flags.log_format.clone(),
                },
                compaction: CompactionLayer::default(),
                limits: LimitsLayer::default(),
                audit: crate::app::audit::AuditFile::default(),
                probes: crate::probe::policy::ProbesFile::default(),
                watch: WatchLayer::default(),
                history: HistoryLayer::default(),
                etcd: EtcdLayer {
                    endpoints: flags.etcd_endpoints.clone().map(Endpoints::Joined),
                    ..EtcdLayer::default()
                },
                tls: TlsLayer {
                    cert: flags.tls_cert.clone(),
                    key: flags.tls_key.clone(),
                    client_ca: flags.tls_client_ca.clone(),
                },
                auth: AuthLayer {
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

impl Merged {
    fn validate(self) -> Result<Config, SettingsError> {
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

    /// The etcd settings, validated together: `None` without endpoints.
    fn etcd(&self) -> Result<Option<crate::store::etcd::EtcdOptions>, SettingsError> {
        use crate::store::etcd::{EtcdAuth, EtcdOptions, EtcdTls};
        let invalid =
            |setting: &'static str, source: &str, message: String| SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            };
        let endpoints = &self.etcd_endpoints;
        if endpoints.value.is_empty() {
            // Without endpoints every other etcd setting would be ignored;
            // say so instead of silently running on the embedded store.
            let stray = [
                (
                    "etcd.ca_file",
                    &self.etcd_ca_file.source,
                    self.etcd_ca_file.value.is_some(),
                ),
                (
                    "etcd.cert_file",
                    &self.etcd_cert_file.source,
                    self.etcd_cert_file.value.is_some(),
                ),
                (
                    "etcd.key_file",
                    &self.etcd_key_file.source,
                    self.etcd_key_file.value.is_some(),
                ),
                (
                    "etcd.username",
                    &self.etcd_username.source,
                    self.etcd_username.value.is_some(),
                ),
                (
                    "etcd.password_file",
                    &self.etcd_password_file.source,
                    self.etcd_password_file.value.is_some(),
                ),
                (
                    "etcd.prefix",
                    &self.etcd_prefix.source,
                    !self.etcd_prefix.value.is_empty(),
                ),
            ];
            if let Some((setting, source, _)) = stray.into_iter().find(|(_, _, set)| *set) {
                return Err(invalid(
                    setting,
                    source,
                    "only applies with etcd.endpoints (--etcd-endpoints, STRATA_ETCD_ENDPOINTS)"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let mut https = 0;
        for url in &endpoints.value {
            let parsed = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            let Some(parsed) = parsed else {
                return Err(invalid(
                    "etcd.endpoints",
                    &endpoints.source,
                    format!(
                        "{url:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:2379)"
                    ),
                ));
            };
            if parsed.scheme_str() == Some("https") {
                https += 1;
            }
        }
        let file = |setting: &'static str, v: &Sourced<Option<PathBuf>>| match &v.value {
            Some(path) if !path.is_file() => Err(invalid(
                setting,
                &v.source,
                format!("{} is not a readable file", path.display()),
            )),
            other => Ok(other.clone()),
        };
        let ca_file = file("etcd.ca_file", &self.etcd_ca_file)?;
        let cert_file = file("etcd.cert_file", &self.etcd_cert_file)?;
        let key_file = file("etcd.key_file", &self.etcd_key_file)?;
        let tls = if https == 0 {
            if let Some((setting, v)) = [
                ("etcd.ca_file", &self.etcd_ca_file),
                ("etcd.cert_file", &self.etcd_cert_file),
                ("etcd.key_file", &self.etcd_key_file),
            ]
            .into_iter()
            .find(|(_, v)| v.value.is_some())
            {
                return Err(invalid(
                    setting,
                    &v.source,
                    "TLS needs https:// etcd endpoints".into(),
                ));
            }
            None
        } else if https < endpoints.value.len() {
            return Err(invalid(
                "etcd.endpoints",
                &endpoints.source,
                "mixes http:// and https:// URLs".into(),
            ));
        } else {
            let Some(ca_file) = ca_file else {
                return Err(invalid(
                    "etcd.ca_file",
                    &self.etcd_ca_file.source,
                    "https:// etcd endpoints need the CA certificate that signed etcd's".into(),
                ));
            };
            if cert_file.is_some() != key_file.is_some() {
                let (setting, source) = if cert_file.is_some() {
                    ("etcd.key_file", &self.etcd_key_file.source)
                } else {
                    ("etcd.cert_file", &self.etcd_cert_file.source)
                };
                return Err(invalid(
                    setting,
                    source,
                    "the client certificate and key go together".into(),
                ));
            }
            Some(EtcdTls {
                ca_file,
                cert_file,
                key_file,
            })
        };
        let auth = match (&self.etcd_username.value, &self.etcd_password_file.value) {
            (None, None) => None,
            (Some(username), Some(path)) => {
                let password = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "etcd.password_file",
                        &self.etcd_password_file.source,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(EtcdAuth {
                    username: username.clone(),
                    password: password.trim_end_matches(['\n', '\r']).to_owned(),
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "etcd.password_file",
                    &self.etcd_password_file.source,
                    "etcd.username needs a password file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "etcd.username",
                    &self.etcd_username.source,
                    "etcd.password_file needs a user name".into(),
                ));
            }
        };
        let mut options = EtcdOptions::new(endpoints.value.clone())
            .with_prefix(self.etcd_prefix.value.clone().into_bytes());
        options.tls = tls;
        options.auth = auth;
        Ok(Some(options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let config = Config::load(&Flags::default(), env(&[])).unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratad.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1000\"\ndata_dir = \"/from/file\"\nshutdown_grace = \"3s\"\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file),
            listen: Some("127.0.0.1:3000".into()),
            ..Flags::default()
        };
        let config = Config::load(
            &flags,
            env(&[
                ("STRATA_LISTEN", "127.0.0.1:2000"),
                ("STRATA_DATA_DIR", "/from/env"),
                ("HOME", "/x"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.listen,
            "127.0.0.1:3000".parse().unwrap(),
            "flag beats env and file"
        );
        assert_eq!(
            config.data_dir,
            PathBuf::from("/from/env"),
            "env beats file"
        );
        assert_eq!(
            config.shutdown_grace,
            Duration::from_secs(3),
            "file beats default"
        );
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn config_file_can_come_from_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "data_dir = \"/d\"\n").unwrap();
        let config = Config::load(
            &Flags::default(),
            env(&[("STRATA_CONFIG", file.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn errors_name_the_setting_and_its_source() {
        let flags = Flags {
            listen: Some("nonsense".into()),
            ..Flags::default()
        };
        let err = Config::load(&flags, env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("listen") && err.contains("--listen") && err.contains("nonsense"),
            "{err}"
        );

        let err = Config::load(&Flags::default(), env(&[("STRATA_LOG_FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("log.format") && err.contains("STRATA_LOG_FORMAT"),
            "{err}"
        );

        let err = Config::load(&Flags::default(), env(&[("STRATA_SHUTDOWN_GRACE", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shutdown_grace"), "{err}");
    }

    #[test]
    fn unknown_file_keys_and_bad_toml_are_rejected_with_position() {
        let path = Path::new("bad.toml");
        let err = parse_file(path, "listen = \"127.0.0.1:1\"\nlisten_addr = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listen_addr") && err.contains("line 2"),
            "{err}"
        );
        let err = parse_file(path, "listen = \n").unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_config_file_is_a_read_error() {
        let flags = Flags {
            config: Some("/nonexistent/stratad.toml".into()),
            ..Flags::default()
        };
        let err = Config::load(&flags, env(&[])).unwrap_err();
        assert!(matches!(err, SettingsError::Read { .. }), "{err}");
    }

    #[test]
    fn etcd_endpoints_select_etcd_and_layer_like_any_setting() {
        let config = Config::load(&Flags::default(), env(&[])).unwrap();
        assert_eq!(config.etcd, None, "the embedded store is the default");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratad.toml");
        std::fs::write(
            &file,
            "[etcd]\nendpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\nprefix = \"/s/\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file.clone()),
            ..Flags::default()
        };
        let etcd = Config::load(&flags, env(&[])).unwrap().etcd.unwrap();
        assert_eq!(etcd.endpoints, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        assert_eq!(etcd.prefix, b"/s/");
        assert_eq!((etcd.tls, etcd.auth), (None, None));

        let from_env = env(&[("STRATA_ETCD_ENDPOINTS", "http://a:3, http://b:4,")]);
        let etcd = Config::load(&flags, from_env.clone())
            .unwrap()
            .etcd
            .unwrap();
        assert_eq!(
            etcd.endpoints,
            ["http://a:3", "http://b:4"],
            "env beats file"
        );
        assert_eq!(etcd.prefix, b"/s/", "the file's prefix stays");

        let flags = Flags {
            etcd_endpoints: Some("http://c:5".into()),
            ..flags
        };
        let etcd = Config::load(&flags, from_env).unwrap().etcd.unwrap();
        assert_eq!(etcd.endpoints, ["http://c:5"], "flag beats env");
    }

    #[test]
    fn etcd_settings_are_checked_together() {
        let err = |flags: &Flags, pairs: &[(&str, &str)]| {
            Config::load(flags, env(pairs)).unwrap_err().to_string()
        };
        let flags = Flags {
            etcd_endpoints: Some("127.0.0.1:2379".into()),
            ..Flags::default()
        };
        let e = err(&flags, &[]);
        assert!(
            e.contains("etcd.endpoints") && e.contains("--etcd-endpoints"),
            "{e}"
        );

        let e = err(&Flags::default(), &[("STRATA_ETCD_PREFIX", "/x/")]);
        assert!(
            e.contains("etcd.prefix") && e.contains("STRATA_ETCD_PREFIX"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let ca = ca.to_str().unwrap();
        let plain = Flags {
            etcd_endpoints: Some("http://127.0.0.1:2379".into()),
            ..Flags::default()
        };
        let e = err(&plain, &[("STRATA_ETCD_CA_FILE", ca)]);
        assert!(e.contains("etcd.ca_file") && e.contains("https"), "{e}");

        let tls = Flags {
            etcd_endpoints: Some("https://127.0.0.1:2379".into()),
            ..Flags::default()
        };
        let e = err(&tls, &[]);
        assert!(e.contains("etcd.ca_file"), "{e}");
        let e = err(&tls, &[("STRATA_ETCD_CA_FILE", "/nonexistent/ca.pem")]);
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = err(
            &tls,
            &[("STRATA_ETCD_CA_FILE", ca), ("STRATA_ETCD_CERT_FILE", ca)],
        );
        assert!(e.contains("etcd.key_file"), "{e}");
        let config = Config::load(&tls, env(&[("STRATA_ETCD_CA_FILE", ca)])).unwrap();
        let etcd = config.etcd.unwrap();
        assert_eq!(etcd.tls.unwrap().ca_file, PathBuf::from(ca));

        let mixed = Flags {
            etcd_endpoints: Some("https://a:1,http://b:2".into()),
            ..Flags::default()
        };
        assert!(err(&mixed, &[("STRATA_ETCD_CA_FILE", ca)]).contains("mixes"));

        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let e = err(&plain, &[("STRATA_ETCD_USERNAME", "strata")]);
        assert!(e.contains("etcd.password_file"), "{e}");
        let config = Config::load(
            &plain,
            env(&[
                ("STRATA_ETCD_USERNAME", "strata"),
                ("STRATA_ETCD_PASSWORD_FILE", password.to_str().unwrap()),
            ]),
        )
        .unwrap();
        let auth = config.etcd.unwrap().auth.unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("strata", "s3cret")
        );
        assert!(
            !format!("{auth:?}").contains("s3cret"),
            "the password stays out of Debug"
        );
    }

    #[test]
    fn shipped_example_etcd_section_parses_when_uncommented() {
        // Settings in the example's [etcd] section are commented as `#key`
        // (prose as `# text`), so removing the `#` enables them.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_etcd = false;
        let enabled: String = text
            .lines()
            .map(|line| {
                if line.starts_with("#[") || line.starts_with('[') {
                    in_etcd = line == "#[etcd]";
                }
                let uncomment =
                    in_etcd && line.len() > 1 && line.starts_with('#') && !line.starts_with("# ");
                format!("{}\n", if uncomment { &line[1..] } else { line })
            })
            .collect();
        assert!(
            enabled.contains("\n[etcd]\n"),
            "the example documents [etcd]"
        );
        let layer = parse_layer(&path, &enabled).unwrap();
        let endpoints = layer.etcd.endpoints.unwrap().urls();
        assert!(endpoints.len() >= 2, "{endpoints:?}");
        assert!(layer.etcd.prefix.is_some());
    }

    #[test]
    fn tls_settings_layer_like_any_setting_and_are_checked_together() {
        let err = |flags: &Flags, pairs: &[(&str, &str)]| {
            Config::load(flags, env(pairs)).unwrap_err().to_string()
        };
        assert_eq!(Config::load(&Flags::default(), env(&[])).unwrap().tls, None);

        let cert_only = Flags {
            tls_cert: Some("/x/cert.pem".into()),
            ..Flags::default()
        };
        let e = err(&cert_only, &[]);
        assert!(e.contains("tls.key") && e.contains("--tls-key"), "{e}");
        let e = err(&Flags::default(), &[("STRATA_TLS_KEY", "/x/key.pem")]);
        assert!(
            e.contains("tls.cert") && e.contains("STRATA_TLS_KEY"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratad.toml");
        std::fs::write(
            &file,
            "[tls]\ncert = \"/file/cert.pem\"\nkey = \"/file/key.pem\"\n",
        )
        .unwrap();
        let from_file = Flags {
            config: Some(file.clone()),
            ..Flags::default()
        };
        let e = err(&from_file, &[]);
        assert!(
            e.contains("tls.cert") && e.contains("/file/cert.pem") && e.contains("stratad.toml"),
            "the file's unreadable certificate is named with its source: {e}"
        );
        let e = err(&from_file, &[("STRATA_TLS_CERT", "/env/cert.pem")]);
        assert!(
            e.contains("/env/cert.pem") && e.contains("STRATA_TLS_CERT"),
            "env beats file: {e}"
        );
        let flags = Flags {
            tls_cert: Some("/flag/cert.pem".into()),
            ..from_file
        };
        let e = err(&flags, &[("STRATA_TLS_CERT", "/env/cert.pem")]);
        assert!(
            e.contains("/flag/cert.pem") && e.contains("--tls-cert"),
            "flag beats env: {e}"
        );

        std::fs::write(&file, "[tls]\nclient_ca = \"/file/ca.pem\"\n").unwrap();
        let e = err(
            &Flags {
                config: Some(file),
                ..Flags::default()
            },
            &[],
        );
        assert!(
            e.contains("tls.client_ca") && e.contains("need TLS"),
            "client certificates without TLS: {e}"
        );
    }

    #[test]
    fn shipped_example_tls_section_parses_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_tls = false;
        let enabled: String = text
            .lines()
            .map(|line| {
                if line.starts_with("#[") || line.starts_with('[') {
                    in_tls = line == "#[tls]";
                }
                let uncomment =
                    in_tls && line.len() > 1 && line.starts_with('#') && !line.starts_with("# ");
                format!("{}\n", if uncomment { &line[1..] } else { line })
            })
            .collect();
        assert!(enabled.contains("\n[tls]\n"), "the example documents [tls]");
        let tls = parse_layer(&path, &enabled).unwrap().tls;
        assert!(tls.cert.is_some() && tls.key.is_some() && tls.client_ca.is_some());
    }

    #[test]
    fn shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = parse_file(&path, &text).unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.compaction.retain_revisions, 100_000);
        assert_eq!(config.limits.history_versions, 50);
    }
}
