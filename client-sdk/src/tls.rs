//! [`TlsConfig`]: how a [`Client`](crate::Client) or
//! [`Connection`](crate::Connection) verifies `stratad` over TLS, and the
//! certificate it presents when the daemon asks for one (mutual TLS).
//!
//! Which endpoints use TLS is decided by their scheme:
//!
//! - `https://host:port` — TLS. The daemon's certificate must chain to the
//!   configured CA ([`TlsConfig::ca_file`]); without one, to the system's
//!   trusted roots.
//! - `host:port` — TLS when a `TlsConfig` is given, plaintext otherwise.
//! - `http://host:port` — plaintext, always.
//!
//! A list that mixes the two — TLS configured or an `https://` endpoint,
//! next to an `http://` one — is refused
//! ([`Error::PlaintextFallback`](crate::Error::PlaintextFallback)): failing
//! over to the plaintext endpoint would send the token in clear. Allow it
//! explicitly with
//! [`ClientBuilder::allow_plaintext_fallback`](crate::ClientBuilder::allow_plaintext_fallback).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::Error;

/// TLS settings for connections to `stratad`.
///
/// ```no_run
/// # fn run() -> Result<(), strata_client::Error> {
/// let tls = strata_client::TlsConfig::new()
///     .ca_file("/etc/strata/ca.pem")?
///     // Only when stratad runs with --tls-client-ca:
///     .identity_files("/etc/strata/client.pem", "/etc/strata/client.key")?;
/// let client = strata_client::Client::builder()
///     .endpoints(["https://strata.internal:7070"])
///     .tenant("integration")
///     .tls(tls)
///     .build()?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct TlsConfig {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

/// Never shows key material.
impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

impl TlsConfig {
    /// TLS verified against the system's trusted roots, no client
    /// certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only the CA certificate(s) in this PEM text (instead of the
    /// system's roots).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Trusts only the CA certificate(s) in this PEM file. Fails when the
    /// file cannot be read.
    pub fn ca_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let pem = read("CA file", path.as_ref())?;
        Ok(self.ca_pem(pem))
    }

    /// Presents this certificate chain and private key (PEM) when the daemon
    /// asks for a client certificate (`stratad --tls-client-ca`).
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Like [`identity_pem`](Self::identity_pem), from files.
    pub fn identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let cert = read("client certificate", cert.as_ref())?;
        let key = read("client key", key.as_ref())?;
        Ok(self.identity_pem(cert, key))
    }

    /// Verifies the daemon's certificate for this name instead of the
    /// endpoint's host (when daemons are dialled by address but their
    /// certificate names a DNS name).
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// tonic's settings for one `https://` endpoint.
    pub(crate) fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// An error and its sources on one line (tonic's transport errors say only
/// "transport error" themselves; the cause is in the chain).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}
