//! The SDK's error types: [`Error`] for failed calls and [`WatchError`] for
//! problems a running watch reports without stopping.

use prost::Message;
use strata_proto::v1::{ErrorDetail, ErrorReason};

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
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
    /// The endpoint list would fail over between TLS and plaintext: TLS is
    /// configured or an endpoint is `https://`, yet others are `http://`.
    /// Failing over to those would send the bearer token and every config
    /// value in clear, so it is refused unless explicitly allowed
    /// ([`ClientBuilder::allow_plaintext_fallback`](crate::ClientBuilder::allow_plaintext_fallback),
    /// [`Connection::connect_allowing_plaintext_fallback`](crate::Connection::connect_allowing_plaintext_fallback)).
    #[error(
        "the endpoint list mixes TLS and plaintext: {} would be used in clear \
         (sending the token) when a TLS endpoint fails; make every endpoint https://, \
         or allow the fallback explicitly (SDK: ClientBuilder::allow_plaintext_fallback(true); \
         CLI: --allow-plaintext or STRATA_ALLOW_PLAINTEXT=1)",
        .plaintext.join(", ")
    )]
    PlaintextFallback {
        /// The `http://` endpoints.
        plaintext: Vec<String>,
    },
    /// The client was configured wrongly (no endpoints, bad token, …).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A watched key does not exist, and no earlier value of it is cached on
    /// disk.
    #[error("config key {key:?} does not exist in tenant {tenant:?}")]
    MissingKey {
        /// The key.
        key: String,
        /// The tenant it was resolved for.
        tenant: String,
    },
    /// A config value could not be turned into the requested type.
    #[error("config key {key:?} ({format}): {message}")]
    Decode {
        /// The key.
        key: String,
        /// The value's format (`json`, `yaml`, …).
        format: String,
        /// The deserializer's message.
        message: String,
    },
    /// A tenant name cannot be carried in a `baggage` header.
    #[error("invalid tenant {0:?} for propagation")]
    InvalidTenant(String),
}

impl Error {
    /// The gRPC status code for server errors, `Unavailable` for unreachable
    /// daemons, `None` for local errors.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Unreachable { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }

    /// Strata's reason for a server error.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Error::Server { reason, .. } => *reason,
            Error::Unreachable { .. } => ErrorReason::Unavailable,
            _ => ErrorReason::Unspecified,
        }
    }

    /// Whether the call may succeed against another endpoint or later: the
    /// daemon could not be reached, was shutting down, timed out, or rate
    /// limited the caller. A size or count limit (`LIMIT_EXCEEDED`, also
    /// `RESOURCE_EXHAUSTED`) fails the same way on every retry.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Server { code, reason, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) || (*code == tonic::Code::ResourceExhausted
                    && *reason != ErrorReason::LimitExceeded)
                    || *reason == ErrorReason::Unavailable
            }
            Error::Unreachable { .. } => true,
            _ => false,
        }
    }
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

/// A problem a running watch met and survived: it keeps the last good value
/// and goes on. Delivered on a watch's error stream (see
/// [`Config::errors`](crate::Config::errors)), logged, and counted in
/// `strata_sdk_watch_errors_total{project,tenant,kind}`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// A new value did not deserialize; the last good value is kept.
    #[error(
        "config key {key:?} at revision {revision}: bad {format} value, keeping the last good one: {message}"
    )]
    Decode {
        /// The key.
        key: String,
        /// The revision that brought the bad value.
        revision: i64,
        /// The value's format.
        format: String,
        /// The deserializer's message.
        message: String,
    },
    /// A watched key was removed; the last value is kept.
    #[error("config key {key:?} was removed at revision {revision}; keeping the last value")]
    Removed {
        /// The key.
        key: String,
        /// The revision that removed it.
        revision: i64,
    },
    /// The watch lost its daemon and is reconnecting (to the next endpoint,
    /// after a backoff); values stay as they are meanwhile.
    #[error("watch disconnected from {endpoint}: {message}; reconnecting")]
    Disconnected {
        /// The endpoint that failed.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The watched tenant was deleted; values stay as they are.
    #[error("tenant {tenant:?} was deleted; keeping the last values")]
    TenantDeleted {
        /// The tenant.
        tenant: String,
    },
}

impl WatchError {
    /// The `kind` label of the error metric.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            WatchError::Decode { .. } => "decode",
            WatchError::Removed { .. } => "removed",
            WatchError::Disconnected { .. } => "disconnected",
            WatchError::TenantDeleted { .. } => "tenant_deleted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: tonic::Code, reason: ErrorReason) -> Error {
        Error::Server {
            code,
            reason,
            message: String::new(),
        }
    }

    #[test]
    fn rate_limits_are_retried_and_size_limits_and_refusals_are_not() {
        use tonic::Code;
        assert!(server(Code::ResourceExhausted, ErrorReason::RateLimited).is_transient());
        assert!(server(Code::Unavailable, ErrorReason::Unspecified).is_transient());
        assert!(!server(Code::ResourceExhausted, ErrorReason::LimitExceeded).is_transient());
        assert!(!server(Code::Unauthenticated, ErrorReason::Unauthenticated).is_transient());
        assert!(!server(Code::PermissionDenied, ErrorReason::PermissionDenied).is_transient());
    }
}
