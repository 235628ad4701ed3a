//! The one table that maps domain errors to gRPC status codes and HTTP
//! responses. Handlers convert their errors into [`ApiError`] and never pick
//! codes themselves, so the same failure reads the same over gRPC and HTTP.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use prost::Message;
use strata_proto::ERROR_DETAIL_TRAILER;
use strata_proto::v1::{ErrorDetail, ErrorReason};
use tonic::Code;

use crate::store::StoreError;

/// An error as the API reports it: a reason, a message, and extra facts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Machine-readable reason; fixes the gRPC code and HTTP status.
    pub reason: ErrorReason,
    /// Human-readable, specific message.
    pub message: String,
    /// Extra structured facts (for example `current_revision`).
    pub metadata: Vec<(String, String)>,
}

impl ApiError {
    /// A new error with no metadata.
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            metadata: Vec::new(),
        }
    }

    /// Adds a metadata fact.
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.push((key.to_owned(), value.to_string()));
        self
    }

    /// The same error with `prefix` before its message (to say which part
    /// of a composite request it is about).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self
    }

    /// gRPC status code and HTTP status for this reason: the table.
    pub fn codes(&self) -> (Code, StatusCode) {
        match self.reason {
            ErrorReason::InvalidArgument => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            ErrorReason::NotFound => (Code::NotFound, StatusCode::NOT_FOUND),
            ErrorReason::AlreadyExists => (Code::AlreadyExists, StatusCode::CONFLICT),
            ErrorReason::RevisionMismatch | ErrorReason::FailedPrecondition => {
                (Code::FailedPrecondition, StatusCode::CONFLICT)
            }
            ErrorReason::Compacted => (Code::OutOfRange, StatusCode::GONE),
            ErrorReason::LimitExceeded => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
            ErrorReason::Unavailable => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            ErrorReason::Unauthenticated => (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            ErrorReason::PermissionDenied => (Code::PermissionDenied, StatusCode::FORBIDDEN),
            ErrorReason::RateLimited => (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            ErrorReason::Internal | ErrorReason::Unspecified => {
                (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// Stable snake_case name of the reason, used as `error.code` in JSON.
    pub fn reason_name(&self) -> &'static str {
        match self.reason {
            ErrorReason::Unspecified | ErrorReason::Internal => "internal",
            ErrorReason::InvalidArgument => "invalid_argument",
            ErrorReason::NotFound => "not_found",
            ErrorReason::AlreadyExists => "already_exists",
            ErrorReason::RevisionMismatch => "revision_mismatch",
            ErrorReason::FailedPrecondition => "failed_precondition",
            ErrorReason::Compacted => "compacted",
            ErrorReason::LimitExceeded => "limit_exceeded",
            ErrorReason::Unavailable => "unavailable",
            ErrorReason::Unauthenticated => "unauthenticated",
            ErrorReason::PermissionDenied => "permission_denied",
            ErrorReason::RateLimited => "rate_limited",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            StoreError::Compacted { compacted, .. } => {
                Self::new(ErrorReason::Compacted, message).with("compacted_revision", compacted)
            }
            StoreError::FutureRevision { current, .. } => {
                Self::new(ErrorReason::InvalidArgument, message).with("current_revision", current)
            }
            StoreError::LeaseNotFound(_) => Self::new(ErrorReason::NotFound, message),
            StoreError::InvalidTxn(_) => Self::new(ErrorReason::InvalidArgument, message),
            StoreError::Unavailable(_) => Self::new(ErrorReason::Unavailable, message),
            StoreError::Backend(_) => Self::new(ErrorReason::Internal, message),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        let (code, _) = err.codes();
        let detail = ErrorDetail {
            reason: err.reason as i32,
            message: err.message.clone(),
            metadata: err.metadata.into_iter().collect(),
        };
        let mut status = tonic::Status::new(code, err.message);
        status.metadata_mut().insert_bin(
            ERROR_DETAIL_TRAILER,
            tonic::metadata::MetadataValue::from_bytes(&detail.encode_to_vec()),
        );
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (_, status) = self.codes();
        let metadata: serde_json::Map<String, serde_json::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let body = serde_json::json!({
            "error": { "code": self.reason_name(), "message": self.message, "metadata": metadata }
        });
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_one_code_per_reason() {
        let compacted: ApiError = StoreError::Compacted {
            requested: 3,
            compacted: 10,
        }
        .into();
        assert_eq!(compacted.codes(), (Code::OutOfRange, StatusCode::GONE));
        assert!(
            compacted
                .metadata
                .contains(&("compacted_revision".into(), "10".into()))
        );
        let unavailable: ApiError = StoreError::Unavailable("closed".into()).into();
        assert_eq!(unavailable.codes().0, Code::Unavailable);
    }

    #[test]
    fn grpc_status_carries_the_detail_trailer() {
        let status: tonic::Status =
            ApiError::new(ErrorReason::NotFound, "tenant x not found").into();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "tenant x not found");
        let bytes = status
            .metadata()
            .get_bin(ERROR_DETAIL_TRAILER)
            .unwrap()
            .to_bytes()
            .unwrap();
        let detail = ErrorDetail::decode(bytes).unwrap();
        assert_eq!(detail.reason, ErrorReason::NotFound as i32);
    }
}
