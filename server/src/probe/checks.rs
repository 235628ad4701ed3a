//! One probe of one target: a TCP connect, an HTTP GET whose status must
//! match, a `grpc.health.v1.Health/Check`, or a UDP datagram whose reply
//! must match — each through the probe policy, and never longer than its
//! timeout.

use std::error::Error as StdError;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::{MAX_HTTP_HEAD_BYTES, Outcome, ProbeKind, ProbeTarget};
use crate::probe::policy::{Denied, ProbePolicy};

/// Runs one probe, never longer than `timeout`.
pub(super) async fn probe(
    target: &ProbeTarget,
    timeout: Duration,
    policy: &ProbePolicy,
) -> Outcome {
    let address = target.address.as_str();
    let attempt = async {
        match &target.spec.kind {
            ProbeKind::Tcp => probe_tcp(address, policy).await,
            ProbeKind::Http {
                path,
                expected_status,
            } => probe_http(address, path, *expected_status, policy).await,
            ProbeKind::Grpc { service } => probe_grpc(address, service, timeout, policy).await,
            ProbeKind::Udp { send, expect } => probe_udp(address, send, expect, policy).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Outcome::Success,
        Ok(Err(failure)) => Outcome::Failure(failure.to_string()),
        Err(_) => Outcome::Timeout(timeout),
    }
}

/// Why one probe failed; rendered into [`HealthChange::detail`].
#[derive(Debug, thiserror::Error)]
enum ProbeFailure {
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("GET http://{address}{path}: {message}")]
    Http {
        address: String,
        path: String,
        message: String,
    },
    #[error("GET http://{address}{path}: status {status}, expected {expected}")]
    HttpStatus {
        address: String,
        path: String,
        status: u16,
        expected: String,
    },
    #[error("gRPC health check of {service:?} at {address}: {message}")]
    Grpc {
        address: String,
        service: String,
        message: String,
    },
    #[error("probe of {address} refused: {denied}")]
    Denied { address: String, denied: Denied },
    #[error("UDP check of {address}: {message}")]
    Udp { address: String, message: String },
}

/// Sends `send` to the first address `address` resolves to that `policy`
/// allows, from an ephemeral port of the same family, and waits (under the
/// probe's timeout) for a reply from that address that matches `expect`.
/// Replies that do not match fail the probe; a datagram from anyone else is
/// ignored (the socket is connected, so the kernel drops those).
async fn probe_udp(
    address: &str,
    send: &[u8],
    expect: &crate::domain::registry::UdpExpect,
    policy: &ProbePolicy,
) -> Result<(), ProbeFailure> {
    use crate::domain::registry::{MAX_UDP_CHECK_BYTES, UdpExpect};
    let failure = |message: String| ProbeFailure::Udp {
        address: address.to_owned(),
        message,
    };
    let mut denied = None;
    let mut target = None;
    for addr in tokio::net::lookup_host(address)
        .await
        .map_err(|source| ProbeFailure::Connect {
            address: address.to_owned(),
            source,
        })?
    {
        match policy.check(addr) {
            Ok(()) => {
                target = Some(addr);
                break;
            }
            Err(why) => {
                denied.get_or_insert(why);
            }
        }
    }
    let Some(target) = target else {
        return Err(match denied {
            Some(denied) => ProbeFailure::Denied {
                address: address.to_owned(),
                denied,
            },
            None => failure("the name resolves to no address".into()),
        });
    };
    let local: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| failure(format!("bind: {e}")))?;
    socket
        .connect(target)
        .await
        .map_err(|e| failure(format!("connect: {e}")))?;
    socket
        .send(send)
        .await
        .map_err(|e| failure(format!("send: {e}")))?;
    // One byte more than any expected reply tells a longer one apart.
    let mut reply = vec![0_u8; MAX_UDP_CHECK_BYTES + 1];
    let n = socket
        .recv(&mut reply)
        .await
        .map_err(|e| failure(format!("receive: {e}")))?;
    let reply = &reply[..n];
    let matched = match expect {
        UdpExpect::Any => true,
        UdpExpect::Bytes(bytes) => reply == bytes.as_slice(),
        // Validated at registration; compiled per probe within a 32 KiB
        // program and DFA bound, which keeps compiling and matching a
        // 1,201-byte reply far below the 100 ms shortest interval.
        UdpExpect::Regex(pattern) => crate::domain::registry::udp_regex(pattern)
            .map_err(|e| failure(format!("expect_regex: {e}")))?
            .is_match(reply),
    };
    if matched {
        Ok(())
    } else {
        Err(failure(format!(
            "the reply {:?} does not match",
            String::from_utf8_lossy(&reply[..reply.len().min(64)])
        )))
    }
}

/// Connects to the first address `address` resolves to that `policy`
/// allows. Resolving here, not in the connector, is what makes the policy
/// hold for names: the address checked is the address connected to.
async fn connect(address: &str, policy: &ProbePolicy) -> Result<TcpStream, ProbeFailure> {
    let connect_error = |source| ProbeFailure::Connect {
        address: address.to_owned(),
        source,
    };
    let mut denied = None;
    let mut failed = None;
    let mut stream = None;
    for addr in tokio::net::lookup_host(address)
        .await
        .map_err(connect_error)?
    {
        if let Err(why) = policy.check(addr) {
            denied.get_or_insert(why);
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => failed = Some(e),
        }
    }
    let stream = match (stream, failed, denied) {
        (Some(stream), _, _) => stream,
        (None, Some(e), _) => return Err(connect_error(e)),
        (None, None, Some(denied)) => {
            return Err(ProbeFailure::Denied {
                address: address.to_owned(),
                denied,
            });
        }
        (None, None, None) => {
            return Err(connect_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name resolves to no address",
            )));
        }
    };
    // The request head goes out in one write; never let Nagle hold it.
    // Failing to set the option only costs latency, so it is not an error.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn probe_tcp(address: &str, policy: &ProbePolicy) -> Result<(), ProbeFailure> {
    connect(address, policy).await.map(drop)
}

async fn probe_http(
    address: &str,
    path: &str,
    expected_status: Option<u16>,
    policy: &ProbePolicy,
) -> Result<(), ProbeFailure> {
    let fail = |message: String| ProbeFailure::Http {
        address: address.to_owned(),
        path: path.to_owned(),
        message,
    };
    let stream = connect(address, policy).await?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HTTP_HEAD_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    // An empty `String` is a body of known length zero, so nothing is sent
    // after the head.
    let request = Request::get(path)
        .header(header::HOST, address)
        .header(
            header::USER_AGENT,
            concat!("strata-probe/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(String::new())
        .map_err(|e| fail(error_chain(&e)))?;

    // The connection future does the I/O; drive it here rather than spawn
    // it, so nothing outlives the probe. Only the response head is awaited:
    // dropping both afterwards closes the socket without reading the body.
    let pending = sender.send_request(request);
    tokio::pin!(pending, connection);
    let response = tokio::select! {
        biased;
        answered = &mut pending => answered,
        ended = &mut connection => {
            ended.map_err(|e| fail(error_chain(&e)))?;
            // The connection finished cleanly; the response (or why there
            // is none) is already waiting.
            pending.await
        }
    }
    .map_err(|e| fail(error_chain(&e)))?;

    let status = response.status();
    let ok = match expected_status {
        Some(expected) => status.as_u16() == expected,
        None => status.is_success(),
    };
    if ok {
        return Ok(());
    }
    Err(ProbeFailure::HttpStatus {
        address: address.to_owned(),
        path: path.to_owned(),
        status: status.as_u16(),
        expected: match expected_status {
            Some(code) => StatusCode::from_u16(code)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| code.to_string()),
            None => "2xx".to_owned(),
        },
    })
}

async fn probe_grpc(
    address: &str,
    service: &str,
    timeout: Duration,
    policy: &ProbePolicy,
) -> Result<(), ProbeFailure> {
    let fail = |message: String| ProbeFailure::Grpc {
        address: address.to_owned(),
        service: service.to_owned(),
        message,
    };
    // The connection is made (and checked against the policy) here and
    // handed to the channel, which would otherwise resolve and connect on
    // its own.
    let stream = connect(address, policy).await?;
    let handed = Mutex::new(Some(stream));
    let connector = tower::service_fn(move |_: http::Uri| {
        let stream = handed.lock().unwrap_or_else(PoisonError::into_inner).take();
        async move {
            stream.map(TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "a probe connects once; its connection is gone",
                )
            })
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| fail(error_chain(&e)))?
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|status| fail(format!("{:?}: {}", status.code(), status.message())))?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(fail(format!("status {}", other.as_str_name()))),
    }
}

/// An error and its sources, `outer: inner: innermost`, for operators (the
/// outer messages of hyper and tonic errors alone say little).
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let message = inner.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = inner.source();
    }
    text
}
