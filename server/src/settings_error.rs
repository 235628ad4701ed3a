//! What every section of the daemon's settings shares: the one error type
//! and [`Sourced`] values. Each module that owns a section (`[limits]`,
//! `[audit]`, `[probes]`, `[auth]`, `[tls]`, `[log]`, `[compaction]`, OTLP)
//! defines its file table and checks its values with these, and
//! `daemon::settings` composes them. It sits below every such module so
//! none of them imports the settings that gather them.

use std::path::PathBuf;

/// A configuration problem, reported as one line; `stratad` exits with 64.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message with line and column.
        message: String,
    },
    /// A setting has an invalid value.
    #[error("invalid {setting} (from {source_name}): {message}")]
    Invalid {
        /// Setting name as written in the file (`log.format`).
        setting: &'static str,
        /// Where the value came from (`--listen`, `STRATA_LISTEN`, the file, …).
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

impl SettingsError {
    /// `setting` has an invalid value, set by `source`.
    pub fn invalid(setting: &'static str, source: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            setting,
            source_name: source.to_owned(),
            message: message.into(),
        }
    }
}

/// A setting's value together with the name of the source that set it
/// (`default`, the file, `STRATA_…`, `--…`), for messages.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Who set it.
    pub source: String,
}
