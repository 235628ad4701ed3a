//! The Strata client SDK: connect to any of a list of `stratad` endpoints and
//! call the `strata.v1` API with typed errors.
//!
//! This crate owns client-side connection handling and the mapping of gRPC
//! failures to [`Error`]; it depends on `strata-proto` only, never on the
//! server. The CLI is a thin layer over it; typed config watches,
//! self-registration and discovery build on it next.

use std::time::Duration;

use prost::Message;
use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::{ErrorDetail, ErrorReason};
use tonic::transport::{Channel, Endpoint};

pub use strata_proto::v1 as proto;
pub use tonic::{Code, Status};

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error.
    #[error("{message}")]
    Server {
        /// gRPC status code.
        code: tonic::Code,
        /// Strata's reason, when the daemon sent one.
        reason: ErrorReason,
        /// The daemon's message.
        message: String,
    },
    /// No endpoint could be reached.
    #[error("cannot reach any of {endpoints:?}: {last_error}")]
    Unreachable {
        /// Endpoints tried.
        endpoints: Vec<String>,
        /// The last connection error.
        last_error: String,
    },
    /// An endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {message}")]
    InvalidEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let reason = status
            .metadata()
            .get_bin(strata_proto::ERROR_DETAIL_TRAILER)
            .and_then(|v| v.to_bytes().ok())
            .and_then(|b| ErrorDetail::decode(b).ok())
            .and_then(|d| ErrorReason::try_from(d.reason).ok())
            .unwrap_or(ErrorReason::Unspecified);
        Error::Server {
            code: status.code(),
            reason,
            message: status.message().to_owned(),
        }
    }
}

/// A connection to one of several daemons.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    endpoint: String,
}

impl Client {
    /// Connects to the first reachable endpoint of `endpoints`, in order.
    pub async fn connect<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, Error> {
        let mut last_error = String::from("no endpoints given");
        for endpoint in endpoints {
            let endpoint = endpoint.as_ref().trim();
            let uri = if endpoint.contains("://") {
                endpoint.to_owned()
            } else {
                format!("http://{endpoint}")
            };
            let configured = Endpoint::from_shared(uri.clone())
                .map_err(|e| Error::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    message: e.to_string(),
                })?
                .connect_timeout(timeout)
                .timeout(timeout);
            match configured.connect().await {
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

    /// The endpoint this client is connected to.
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
