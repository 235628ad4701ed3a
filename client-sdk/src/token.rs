//! Bearer tokens on raw clients: [`BearerToken`] adds
//! `authorization: Bearer <token>` to every call of a tonic client, and
//! [`AuthChannel`] is the channel type [`Connection`](crate::Connection)'s
//! clients use. ([`Client`](crate::Client) sends its token itself.)

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::Error;

/// A tonic interceptor sending a bearer token with every call (or nothing,
/// when built from `None`).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use strata_client::BearerToken;
/// use strata_client::proto::config_service_client::ConfigServiceClient;
/// let channel = tonic::transport::Channel::from_static("http://127.0.0.1:7070").connect().await?;
/// let client = ConfigServiceClient::with_interceptor(channel, BearerToken::new("strata_…")?);
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<set>)"
        } else {
            "BearerToken(<none>)"
        })
    }
}

impl BearerToken {
    /// Sends `token`. Fails when it cannot be an HTTP header value.
    pub fn new(token: &str) -> Result<Self, Error> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| Error::Config("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Sends nothing (a daemon with `--auth=off`).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The channel of [`Connection`](crate::Connection)'s clients: a channel
/// whose calls carry the connection's token.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;
