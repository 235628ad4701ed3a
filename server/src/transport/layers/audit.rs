//! The audit middleware: opens an audited call around every handler (see
//! [`crate::app::audit`]) and, after it, reads the outcome from the
//! response — the gRPC status and error detail, or the HTTP status and
//! JSON error body — for the audit log to record.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prost::Message;
use strata_proto::v1::{ErrorDetail, ErrorReason};

use crate::app::audit::{Auditor, Call};
use crate::app::auth::Principal;
use crate::error::ApiError;

/// The audit middleware. It must run inside the authentication layer,
/// which puts the caller's principal into the request.
pub async fn record(State(auditor): State<Arc<Auditor>>, request: Request, next: Next) -> Response {
    let grpc = crate::transport::grpc_methods::is_grpc(request.headers());
    let call = Call::open(
        &auditor,
        request.extensions().get::<Principal>(),
        if grpc { "grpc" } else { "http" },
    );
    let response = call.run(next.run(request)).await;
    // Reads and renewals state nothing: nothing to record.
    if !call.stated() {
        return response;
    }
    let (response, failed) = failure(grpc, response).await;
    auditor.finish(&call, failed).await;
    response
}

/// The result code and message of a failed call, from its response.
async fn failure(grpc: bool, response: Response) -> (Response, Option<(String, String)>) {
    if grpc {
        let headers = response.headers();
        let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else {
            return (response, None);
        };
        if code == "0" {
            return (response, None);
        }
        let detail = headers
            .get(strata_proto::ERROR_DETAIL_TRAILER)
            .and_then(|v| base64_engine::decode(v.as_bytes()))
            .and_then(|b| ErrorDetail::decode(b.as_slice()).ok());
        let found = match detail {
            Some(d) => (
                ApiError::new(
                    ErrorReason::try_from(d.reason).unwrap_or(ErrorReason::Internal),
                    "",
                )
                .reason_name()
                .to_owned(),
                d.message,
            ),
            None => (
                format!("grpc_{code}"),
                headers
                    .get("grpc-message")
                    .map(|v| percent_decode(&String::from_utf8_lossy(v.as_bytes())))
                    .unwrap_or_default(),
            ),
        };
        return (response, Some(found));
    }
    if response.status().as_u16() < 400 {
        return (response, None);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = json["error"]["code"]
        .as_str()
        .map_or_else(|| format!("http_{}", parts.status.as_u16()), str::to_owned);
    let message = json["error"]["message"].as_str().map_or_else(
        || String::from_utf8_lossy(&bytes).into_owned(),
        str::to_owned,
    );
    (
        Response::from_parts(parts, Body::from(bytes)),
        Some((code, message)),
    )
}

/// Minimal standard base64 (with or without padding), for the binary
/// error-detail header of gRPC answers.
mod base64_engine {
    pub(super) fn decode(input: &[u8]) -> Option<Vec<u8>> {
        let value = |c: u8| -> Option<u32> {
            Some(match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            } as u32)
        };
        let input: Vec<u8> = input.iter().copied().filter(|c| *c != b'=').collect();
        let mut out = Vec::with_capacity(input.len() * 3 / 4);
        for chunk in input.chunks(4) {
            let mut acc = 0_u32;
            for (i, c) in chunk.iter().enumerate() {
                acc |= value(*c)? << (18 - 6 * i);
            }
            let bytes = acc.to_be_bytes();
            out.extend_from_slice(&bytes[1..chunk.len()]);
        }
        Some(out)
    }
}

/// Decodes `%XX` escapes (invalid UTF-8 becomes U+FFFD: the entry still
/// says what was tried).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_engine::decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_engine::decode(b"aGVsbG8").unwrap(), b"hello");
        assert!(base64_engine::decode(b"a*").is_none());
    }

    #[test]
    fn percent_escapes_decode_and_bad_utf8_is_replaced() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("%ff%2e%2e"), "\u{fffd}..");
    }
}
