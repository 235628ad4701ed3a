//! A one-shot HTTP/1.1 GET over a plain TCP connection, for health and
//! metrics endpoints (etcd's `/health` and `/metrics`), and the decoding of
//! a chunked body. Deliberately tiny: no client library, so the kit pulls in
//! nothing the tests and benches do not already build.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long connecting, and separately reading the whole answer, may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on `addr` with `Connection: close`: the status code and the
/// body (de-chunked when the server chunked it).
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    response(&String::from_utf8_lossy(&raw))
}

/// The status code and the body (de-chunked when the server chunked it) of
/// a whole HTTP/1.1 answer read up to the end of the connection.
pub fn response(text: &str) -> std::io::Result<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {head}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The payload of a `Transfer-Encoding: chunked` body; stops at the last
/// chunk or at the first malformed one.
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sum of the samples of metric `name` in a Prometheus text whose label
/// text contains `labels` (`""`: all); 0 when absent.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, v) = l.rsplit_once(' ')?;
            let (base, rest) = key.split_once('{').unwrap_or((key, ""));
            (base == name && rest.contains(labels)).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}
