//! [`Connection`]: an eager connection to the first reachable of a list of
//! endpoints, exposing the raw `strata.v1` clients. The admin CLI is built on
//! it; game servers want [`Client`](crate::Client) instead.

use std::time::Duration;

use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_proto::v1::backup_service_client::BackupServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::token_service_client::TokenServiceClient;
use tonic::transport::Channel;

use crate::Error;
use crate::endpoints::{check_plaintext_fallback, parse_endpoint};
use crate::tls::{TlsConfig, error_chain};
use crate::token::{AuthChannel, BearerToken};

/// A connection to one of several daemons, for tools that call the raw API.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: Channel,
    endpoint: String,
    token: BearerToken,
}

impl Connection {
    /// Connects to the first reachable endpoint of `endpoints`, in order.
    ///
    /// An endpoint is `host:port` or a URI (`http://host:port`,
    /// `https://host:port`).
    pub async fn connect<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, Error> {
        Self::connect_with_tls(endpoints, timeout, None).await
    }

    /// Like [`connect`](Self::connect), over TLS as `tls` says when given
    /// (see [`TlsConfig`] for which endpoints use TLS). A list mixing TLS
    /// and plaintext is refused with [`Error::PlaintextFallback`] before
    /// anything is dialled.
    pub async fn connect_with_tls<S: AsRef<str>>(
        endpoints: &[S],
        timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, Error> {
        Self::connect_checked(endpoints, timeout, tls, false).await
    }

    /// Like [`connect_with_tls`](Self::connect_with_tls), but accepts a list
    /// mixing TLS and plaintext endpoints: when the TLS ones cannot be
    /// reached, the token goes to an `http://` one in clear. For the CLI's
    /// `--allow-plaintext`; say so only where that is acceptable.
    pub async fn connect_allowing_plaintext_fallback<S: AsRef<str>>(
        endpoints: &[S],
        timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, Error> {
        Self::connect_checked(endpoints, timeout, tls, true).await
    }

    async fn connect_checked<S: AsRef<str>>(
        endpoints: &[S],
        timeout: Duration,
        tls: Option<&TlsConfig>,
        allow_plaintext_fallback: bool,
    ) -> Result<Self, Error> {
        // Every endpoint is parsed before any is dialled: whether the list
        // mixes TLS and plaintext depends on all of them.
        let parsed = endpoints
            .iter()
            .map(|e| parse_endpoint(e.as_ref(), tls))
            .collect::<Result<Vec<_>, Error>>()?;
        let uris: Vec<String> = parsed.iter().map(|(uri, _)| uri.clone()).collect();
        check_plaintext_fallback(&uris, tls.is_some(), allow_plaintext_fallback)?;
        let mut last_error = String::from("no endpoints given");
        for (uri, configured) in parsed {
            match configured
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect()
                .await
            {
                Ok(channel) => {
                    return Ok(Self {
                        channel,
                        endpoint: uri,
                        token: BearerToken::none(),
                    });
                }
                // The cause (refused, certificate not trusted, …) is in
                // the error's sources.
                Err(e) => last_error = format!("{uri}: {}", error_chain(&e)),
            }
        }
        Err(Error::Unreachable {
            endpoints: endpoints.iter().map(|e| e.as_ref().to_owned()).collect(),
            last_error,
        })
    }

    /// Sends `token` (`authorization: Bearer <token>`) with every call of
    /// the clients made from now on.
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        self.token = BearerToken::new(token)?;
        Ok(self)
    }

    fn authed(&self) -> AuthChannel {
        AuthChannel::new(self.channel.clone(), self.token.clone())
    }

    /// The endpoint this connection reached.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `AdminService` client.
    pub fn admin(&self) -> AdminServiceClient<AuthChannel> {
        AdminServiceClient::new(self.authed())
    }

    /// `TenantService` client.
    pub fn tenants(&self) -> TenantServiceClient<AuthChannel> {
        TenantServiceClient::new(self.authed())
    }

    /// `ConfigService` client.
    pub fn config(&self) -> ConfigServiceClient<AuthChannel> {
        ConfigServiceClient::new(self.authed())
    }

    /// `RegistryService` client.
    pub fn registry(&self) -> RegistryServiceClient<AuthChannel> {
        RegistryServiceClient::new(self.authed())
    }

    /// `BackupService` client (export and import; admin only).
    pub fn backup(&self) -> BackupServiceClient<AuthChannel> {
        BackupServiceClient::new(self.authed())
    }

    /// `TokenService` client (create, list, revoke tokens; admin only).
    pub fn tokens(&self) -> TokenServiceClient<AuthChannel> {
        TokenServiceClient::new(self.authed())
    }

    /// `AuditService` client (the audit log; admin only).
    pub fn audit(&self) -> strata_proto::v1::audit_service_client::AuditServiceClient<AuthChannel> {
        strata_proto::v1::audit_service_client::AuditServiceClient::new(self.authed())
    }
}
