//! PROXY protocol v2 on raw TCP routes, with the tenant in a TLV.
//!
//! A raw TCP byte stream has no headers to carry a tenant in, so a route
//! may opt in to HAProxy's PROXY protocol v2 on either side:
//! - `accept-proxy`: the app starts each connection with a v2 header; a TLV
//!   of type [`TENANT_TLV`] names the tenant the connection is for (without
//!   it, or with a `LOCAL` command, the sidecar's own tenant).
//! - `send-proxy`: the sidecar starts each upstream connection with a v2
//!   header naming the original client and destination addresses and, in
//!   the same TLV, the tenant the connection was routed for — so the callee
//!   knows which branch called and can call back into it.
//!
//! Parsing and encoding are `ppp`'s; this module reads a header off a
//! socket without consuming a byte of the payload behind it, and bounds
//! the time and size a client may spend on it.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::{Addresses, Builder, Command, Header, Protocol, Version};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// TLV type of the tenant name: the first of the range the PROXY protocol
/// spec reserves for application-specific data (`PP2_TYPE_MIN_CUSTOM`).
pub const TENANT_TLV: u8 = 0xE0;

/// Fixed part of a v2 header: signature, version/command, family, length.
const FIXED: usize = 16;

/// Largest address-and-TLV block accepted. The spec allows 64 KiB; real
/// headers (addresses, a tenant, maybe TLS facts) are a few hundred bytes,
/// and a client should not make the sidecar buffer more.
const MAX_BLOCK: usize = 4096;

/// What a client's header said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    /// The tenant TLV, when present.
    pub tenant: Option<String>,
    /// The original client and destination addresses (`PROXY` command
    /// over IPv4 or IPv6); `None` for `LOCAL` or other families.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why a client's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The client sent nothing complete in time.
    #[error("no complete PROXY v2 header within {0:?}")]
    Timeout(Duration),
    /// The socket failed or closed.
    #[error("reading the PROXY v2 header: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a v2 header.
    #[error("not a PROXY v2 header: {0}")]
    Malformed(String),
    /// The header's block is larger than the 4 KiB accepted.
    #[error("PROXY v2 header of {0} bytes is larger than the {MAX_BLOCK} accepted")]
    TooLarge(usize),
    /// The tenant TLV is not a tenant name.
    #[error("the tenant TLV {0:?} is not a valid tenant name")]
    BadTenant(String),
}

/// Reads exactly one v2 header from `stream` (nothing after it), within
/// `timeout`.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Accepted, HeaderError> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))?
}

async fn read(stream: &mut TcpStream) -> Result<Accepted, HeaderError> {
    let mut buf = vec![0u8; FIXED];
    stream.read_exact(&mut buf).await?;
    // Check the signature before trusting the length that follows it.
    if !buf.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(HeaderError::Malformed("wrong signature".into()));
    }
    let block = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if block > MAX_BLOCK {
        return Err(HeaderError::TooLarge(block));
    }
    buf.resize(FIXED + block, 0);
    stream.read_exact(&mut buf[FIXED..]).await?;
    parse(&buf)
}

/// Parses a complete header.
pub fn parse(bytes: &[u8]) -> Result<Accepted, HeaderError> {
    let header = Header::try_from(bytes).map_err(|e| HeaderError::Malformed(e.to_string()))?;
    let mut accepted = Accepted::default();
    if header.command == Command::Proxy {
        accepted.addresses = match header.addresses {
            Addresses::IPv4(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            Addresses::IPv6(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            Addresses::Unspecified | Addresses::Unix(_) => None,
        };
    }
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| HeaderError::Malformed(e.to_string()))?;
        if tlv.kind != TENANT_TLV {
            continue;
        }
        let name = String::from_utf8_lossy(&tlv.value).into_owned();
        if !crate::tenant::valid(&name) {
            return Err(HeaderError::BadTenant(name));
        }
        accepted.tenant = Some(name);
    }
    Ok(accepted)
}

/// A v2 `PROXY` header for a stream from `source` to `destination`
/// carrying `tenant`. Mixed address families (an IPv4 client on an IPv6
/// listener) are sent as unspecified addresses; the tenant still goes.
pub fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    tenant: &str,
) -> std::io::Result<Vec<u8>> {
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .write_tlv(TENANT_TLV, tenant.as_bytes())?
    .build()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_header_round_trips_with_its_tenant_and_addresses() {
        let source: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let destination: SocketAddr = "127.0.0.1:16001".parse().unwrap();
        let bytes = encode(source, destination, "feat-1").unwrap();
        let accepted = parse(&bytes).unwrap();
        assert_eq!(accepted.tenant.as_deref(), Some("feat-1"));
        assert_eq!(accepted.addresses, Some((source, destination)));
    }

    #[test]
    fn a_local_header_without_tenant_names_nothing() {
        let bytes = Builder::new(Version::Two | Command::Local, 0)
            .build()
            .unwrap();
        assert_eq!(parse(&bytes).unwrap(), Accepted::default());
    }

    #[test]
    fn bad_tenants_and_garbage_are_refused() {
        let source: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let bytes = encode(source, source, "no,commas").unwrap();
        assert!(matches!(parse(&bytes), Err(HeaderError::BadTenant(_))));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn reading_stops_at_the_header_and_leaves_the_payload() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut sent = encode(addr, addr, "feat-2").unwrap();
        sent.extend_from_slice(b"hello");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, &sent)
                .await
                .unwrap();
            s
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let accepted = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(accepted.tenant.as_deref(), Some("feat-2"));
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn an_oversized_or_silent_header_is_refused_in_bounded_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut fixed = ppp::v2::PROTOCOL_PREFIX.to_vec();
            fixed.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
            tokio::io::AsyncWriteExt::write_all(&mut s, &fixed)
                .await
                .unwrap();
            let silent = TcpStream::connect(addr).await.unwrap();
            (s, silent)
        });
        let (mut big, _) = listener.accept().await.unwrap();
        let (mut silent, _) = listener.accept().await.unwrap();
        assert!(matches!(
            read_header(&mut big, Duration::from_secs(5)).await,
            Err(HeaderError::TooLarge(65535))
        ));
        assert!(matches!(
            read_header(&mut silent, Duration::from_millis(100)).await,
            Err(HeaderError::Timeout(_))
        ));
        drop(client.await.unwrap());
    }
}
