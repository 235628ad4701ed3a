//! `strata-sidecar`'s PROXY protocol v2 TCP routes and its inbound
//! listener, end to end with real processes.
//!
//! What a studio relies on:
//! - one local TCP port serves every branch: a test harness in `feat-2`
//!   names `feat-1` in a PROXY v2 tenant TLV and lands on feat-1's
//!   matchmaker; with no tenant it gets its own tenant's route (falling
//!   back to `integration`), and the callee learns the original client
//!   address and the tenant from the header the sidecar sends;
//! - a connection without a valid header never reaches a callee;
//! - the inbound listener hands the app the caller's tenant as baggage,
//!   refuses a malformed tenant, and `/inbound` and the metrics say which
//!   branches called.
//!
//! The callee side parses headers with the `ppp` crate, independently of
//! the sidecar's own code.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ppp::v2::{Addresses, Builder, Command, Header, Protocol, Version};
use strata_tests::sidecar::Sidecar;
use strata_tests::{Daemon, free_port, http_get, http_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const PROJECT: &str = "vega";
const TENANT_TLV: u8 = 0xE0;

/// Aborts a task when dropped, so test services stop with the test.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn create_tenant(daemon: &Daemon, tenant: &str, parent: Option<&str>) {
    let body = match parent {
        Some(p) => format!(r#"{{"parent":"{p}"}}"#),
        None => "{}".to_owned(),
    };
    http_ok(
        daemon.addr,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}"),
        &body,
    )
    .await;
}

async fn register(daemon: &Daemon, tenant: &str, service: &str, addr: SocketAddr, protocol: &str) {
    http_ok(
        daemon.addr,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}/services/{service}/instances"),
        &format!(
            r#"{{"id":"{tenant}-1","endpoints":{{"main":"{addr}"}},"protocol":"{protocol}","kind":"persistent"}}"#
        ),
    )
    .await;
}

/// A TCP callee that reads the PROXY v2 header the sidecar sends and
/// answers one line: `<name> tenant=<TLV> src=<client address>`.
async fn proxy_aware_callee(name: &'static str) -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if stream.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
                let mut header = fixed.to_vec();
                header.resize(16 + len, 0);
                if stream.read_exact(&mut header[16..]).await.is_err() {
                    return;
                }
                let line = match Header::try_from(header.as_slice()) {
                    Ok(h) => {
                        let tenant = h
                            .tlvs()
                            .filter_map(Result::ok)
                            .find(|t| t.kind == TENANT_TLV)
                            .map(|t| String::from_utf8_lossy(&t.value).into_owned())
                            .unwrap_or_default();
                        let src = match h.addresses {
                            Addresses::IPv4(a) => format!("{}:{}", a.source_address, a.source_port),
                            other => format!("{other:?}"),
                        };
                        format!("{name} tenant={tenant} src={src}\n")
                    }
                    Err(e) => format!("{name} bad header: {e}\n"),
                };
                let _ = stream.write_all(line.as_bytes()).await;
            });
        }
    });
    (addr, Task(task))
}

/// Connects to `port`, sends `preamble`, and reads the callee's line
/// (empty when the sidecar closed the connection instead).
async fn exchange(port: SocketAddr, preamble: &[u8]) -> String {
    let mut stream = timeout(Duration::from_secs(5), TcpStream::connect(port))
        .await
        .expect("connect timeout")
        .expect("connect to the sidecar");
    stream.write_all(preamble).await.unwrap();
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the connection ends within 10 s")
        .unwrap_or_default();
    String::from_utf8_lossy(&answer).into_owned()
}

fn proxy_header(source: SocketAddr, destination: SocketAddr, tenant: Option<&str>) -> Vec<u8> {
    let builder = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    );
    match tenant {
        Some(t) => builder.write_tlv(TENANT_TLV, t.as_bytes()).unwrap(),
        None => builder,
    }
    .build()
    .unwrap()
}

fn metric(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_tenant_tlv_picks_the_branch_and_reaches_the_callee() {
    let daemon = Daemon::start().await;
    create_tenant(&daemon, "integration", None).await;
    create_tenant(&daemon, "feat-1", Some("integration")).await;
    create_tenant(&daemon, "feat-2", Some("integration")).await;
    let (integration, _i) = proxy_aware_callee("integration").await;
    let (feat1, _f) = proxy_aware_callee("feat-1").await;
    register(&daemon, "integration", "matchmaker", integration, "tcp").await;
    register(&daemon, "feat-1", "matchmaker", feat1, "tcp").await;

    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "feat-2",
        &["matchmaker;accept-proxy;send-proxy"],
        &[],
    )
    .await;
    let port = sidecar.tcp[0];
    let client: SocketAddr = "10.9.8.7:4242".parse().unwrap();

    // A TLV naming feat-1 lands on feat-1's instance, which learns the
    // original client and the tenant.
    let answer = exchange(port, &proxy_header(client, port, Some("feat-1"))).await;
    assert_eq!(answer, "feat-1 tenant=feat-1 src=10.9.8.7:4242\n");

    // No TLV: the sidecar's own tenant, which runs no matchmaker, falls
    // back to integration; the callee still hears feat-2 asked.
    let answer = exchange(port, &proxy_header(client, port, None)).await;
    assert_eq!(answer, "integration tenant=feat-2 src=10.9.8.7:4242\n");

    // A LOCAL header (a health check) carries no addresses: the callee
    // gets the real peer address.
    let local = Builder::new(Version::Two | Command::Local, 0)
        .build()
        .unwrap();
    let answer = exchange(port, &local).await;
    assert!(
        answer.starts_with("integration tenant=feat-2 src=127.0.0.1:"),
        "{answer}"
    );

    // No header, or a tenant that is no tenant name: closed before any
    // callee is dialled.
    assert_eq!(
        exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        ""
    );
    assert_eq!(
        exchange(port, &proxy_header(client, port, Some("a,b"))).await,
        ""
    );
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(&metrics, "strata_sidecar_proxy_header_errors_total", &[]),
        2.0,
        "{metrics}"
    );
}

/// A test app answering with the baggage and `x-strata-tenant` it got.
async fn baggage_echo_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let body = format!("baggage={}", header("baggage"));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, Task(task))
}

async fn call(inbound: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::get("/whoami").header("host", "game-server");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("answer within 10 s")
    .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_listener_hands_the_app_the_callers_tenant_and_records_it() {
    let daemon = Daemon::start().await;
    create_tenant(&daemon, "integration", None).await;
    create_tenant(&daemon, "feat-1", Some("integration")).await;
    let (app, _app) = baggage_echo_app().await;
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "feat-1",
        &[],
        &["--inbound", &format!("{inbound}={app}")],
    )
    .await;

    // x-strata-tenant becomes the baggage entry the SDK reads.
    let (status, body) = call(inbound, &[("x-strata-tenant", "feat-1")]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "baggage=strata-tenant=feat-1")
    );
    // Baggage that already names it passes untouched, other entries kept.
    let (status, body) = call(
        inbound,
        &[("baggage", "userId=7,strata-tenant=integration")],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "baggage=userId=7,strata-tenant=integration")
    );
    // A call naming no tenant reaches the app as it came.
    let (status, body) = call(inbound, &[]).await;
    assert_eq!((status, body.as_str()), (200, "baggage=-"));
    // A malformed tenant never reaches the app.
    let (status, body) = call(inbound, &[("x-strata-tenant", "a b")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a valid tenant name"), "{body}");

    let (status, view) = http_get(sidecar.admin, "/inbound").await.unwrap();
    assert_eq!(status, 200, "{view}");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["app"], app.to_string());
    let requests = |tenant: serde_json::Value| {
        view["callers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["tenant"] == tenant)
            .map(|c| c["requests"].as_u64().unwrap())
    };
    assert_eq!(requests("feat-1".into()), Some(1), "{view}");
    assert_eq!(requests("integration".into()), Some(1), "{view}");
    assert_eq!(requests(serde_json::Value::Null), Some(2), "{view}");

    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "strata_sidecar_inbound_requests_total",
            &["tenant=\"feat-1\"", "code=\"2xx\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "strata_sidecar_inbound_requests_total",
            &["tenant=\"_none\"", "code=\"4xx\""]
        ),
        1.0,
        "{metrics}"
    );

    // Without --inbound the admin server says so.
    let plain = Sidecar::start(&daemon.endpoint(), PROJECT, "feat-1", &[], &[]).await;
    let (status, _) = http_get(plain.admin, "/inbound").await.unwrap();
    assert_eq!(status, 404);
}
