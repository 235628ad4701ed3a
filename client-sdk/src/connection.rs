//! [`Connection`]: an eager connection to the first reachable of a list of
//! endpoints, exposing the raw `strata.v1` clients. The admin CLI is built on
//! it; game servers want [`Client`](crate::Client) instead.

use std::time::Duration;

use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

use crate::Error;
use crate::endpoints::parse_endpoint;

/// A connection to one of several daemons, for tools that call the raw API.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: Channel,
    endpoint: String,
}

impl Connection {
    /// Connects to the first reachable endpoint of `endpoints`, in order.
    ///
    /// An endpoint is `host:port` or a URI (`http://host:port`).
    pub async fn connect<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, Error> {
        let mut last_error = String::from("no endpoints given");
        for endpoint in endpoints {
            let (uri, configured) = parse_endpoint(endpoint.as_ref())?;
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
                    });
                }
                Err(e) => last_error = format!("{uri}: {e}"),
            }
        }
        Err(Error::Unreachable {
            endpoints: endpoints.iter().map(|e| e.as_ref().to_owned()).collect(),
            last_error,
        })
    }

    /// The endpoint this connection reached.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `AdminService` client.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// `TenantService` client.
    pub fn tenants(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.channel.clone())
    }

    /// `ConfigService` client.
    pub fn config(&self) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.channel.clone())
    }

    /// `RegistryService` client.
    pub fn registry(&self) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel.clone())
    }
}
