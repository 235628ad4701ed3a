//! The one error type of settings: every module that owns a section of the
//! daemon's configuration (`[limits]`, `[audit]`, `[probes]`, OTLP, …)
//! reports its invalid values with it, and `config.rs` composes them. It
//! sits below every such module so none of them imports the configuration
//! that gathers them.

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
