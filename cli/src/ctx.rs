//! What every command shares: the global settings (endpoints, project,
//! timeout, TLS, token, output format) as a [`Ctx`], connecting to a daemon
//! with them, how a command fails ([`Failure`], which decides the exit
//! code), and the few calls several command groups make.

use std::time::Duration;

use strata_client::proto::{ResolveRequest, ResolvedValue};
use strata_client::{Connection, Error, Status};

use crate::output::Output;

/// Why a command failed; decides the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server refused, no daemon was reachable, or the user declined:
    /// exit 1.
    Server(String),
    /// The command line cannot work as given: exit 2, like clap's own errors.
    Usage(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Server(message)
    }
}

/// What every command needs besides its own arguments.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) endpoints: Vec<String>,
    pub(crate) timeout: Duration,
    pub(crate) project: String,
    pub(crate) out: Output,
    /// TLS settings from `--tls-ca`/`--tls-cert`/`--tls-key`.
    pub(crate) tls: Option<strata_client::TlsConfig>,
    /// Bearer token from `STRATA_TOKEN` or `--token-file`.
    pub(crate) token: Option<String>,
    /// `--allow-plaintext` / `STRATA_ALLOW_PLAINTEXT`.
    pub(crate) allow_plaintext: bool,
}

impl Ctx {
    /// Connects to the first reachable daemon.
    pub(crate) async fn connect(&self) -> Result<Connection, Failure> {
        let tls = self.tls.as_ref();
        let connected = if self.allow_plaintext {
            Connection::connect_allowing_plaintext_fallback(&self.endpoints, self.timeout, tls)
                .await
        } else {
            Connection::connect_with_tls(&self.endpoints, self.timeout, tls).await
        };
        let connection = connected.map_err(|e| match e {
            // The command line cannot work as given, whatever the daemons do.
            Error::PlaintextFallback { .. } => Failure::Usage(format!("--endpoints: {e}")),
            _ => Failure::Server(e.to_string()),
        })?;
        match &self.token {
            Some(token) => connection
                .with_token(token)
                .map_err(|e| Failure::Usage(format!("STRATA_TOKEN / --token-file: {e}"))),
            None => Ok(connection),
        }
    }
}

/// The server's message for a failed call.
pub(crate) fn err(status: Status) -> String {
    Error::from(status).to_string()
}

/// Every resolved value of `tenant` under `prefix` (`config list`, `config
/// diff`, `config apply`'s plan and `tenant delete`'s preview use it).
pub(crate) async fn resolve_all(
    client: &Connection,
    project: &str,
    tenant: &str,
    prefix: &str,
) -> Result<Vec<ResolvedValue>, String> {
    Ok(client
        .config()
        .resolve(ResolveRequest {
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            keys: vec![],
            prefixes: vec![prefix.to_owned()],
        })
        .await
        .map_err(err)?
        .into_inner()
        .values)
}
