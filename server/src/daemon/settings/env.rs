//! The `STRATA_*` environment variables: which setting each one sets, and
//! the layer they make.

use super::etcd::{Endpoints, EtcdLayer};
use super::*;

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

pub(super) fn env_layer(env: &[(String, String)]) -> Result<Layer, SettingsError> {
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
        log: LogFile {
            level: get("STRATA_LOG_LEVEL"),
            format: get("STRATA_LOG_FORMAT"),
        },
        compaction: CompactionFile {
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
        tls: TlsFile {
            cert: get("STRATA_TLS_CERT").map(PathBuf::from),
            key: get("STRATA_TLS_KEY").map(PathBuf::from),
            client_ca: get("STRATA_TLS_CLIENT_CA").map(PathBuf::from),
        },
        auth: AuthFile {
            mode: get("STRATA_AUTH"),
            admin_token_file: get("STRATA_ADMIN_TOKEN_FILE").map(PathBuf::from),
            metrics: get("STRATA_METRICS_AUTH"),
        },
    })
}

pub(super) fn env_name(setting: &str) -> String {
    ENV_VARS
        .iter()
        .find(|(_, s)| *s == setting)
        .map_or_else(|| setting.to_owned(), |(v, _)| (*v).to_owned())
}

pub(super) fn flag_name(setting: &str) -> String {
    // The auth flags are named for what operators type, not the file's table.
    match setting {
        "auth.mode" => return "--auth".into(),
        "auth.admin_token_file" => return "--admin-token-file".into(),
        "auth.metrics" => return "--metrics-auth".into(),
        _ => {}
    }
    format!("--{}", setting.replace(['.', '_'], "-"))
}
