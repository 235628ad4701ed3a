//! The global TLS flags: the CA that `stratad`'s certificate must chain to,
//! and the client certificate to present when the daemon requires one.

use std::path::PathBuf;

use clap::Args;
use strata_client::TlsConfig;

/// `--tls-ca`, `--tls-cert`, `--tls-key`.
#[derive(Debug, Args)]
pub(crate) struct TlsArgs {
    /// CA certificate (PEM) that stratad's certificate must chain to; with
    /// it, endpoints without a scheme mean https:// (`https://` endpoints
    /// without it trust the system's roots).
    #[arg(long, env = "STRATA_TLS_CA", value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for daemons that require one (mutual TLS).
    #[arg(
        long,
        env = "STRATA_TLS_CLIENT_CERT",
        value_name = "FILE",
        global = true
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(
        long,
        env = "STRATA_TLS_CLIENT_KEY",
        value_name = "FILE",
        global = true
    )]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The SDK's TLS settings; `None` when no TLS flag is given. An
    /// unreadable file or a certificate without its key is a usage error.
    pub(crate) fn config(&self) -> Result<Option<TlsConfig>, String> {
        if self.tls_ca.is_none() && self.tls_cert.is_none() && self.tls_key.is_none() {
            return Ok(None);
        }
        let mut tls = TlsConfig::new();
        if let Some(ca) = &self.tls_ca {
            tls = tls.ca_file(ca).map_err(|e| format!("--tls-ca: {e}"))?;
        }
        tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => tls,
            (Some(cert), Some(key)) => tls
                .identity_files(cert, key)
                .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?,
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
        };
        Ok(Some(tls))
    }
}
