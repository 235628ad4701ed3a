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

/// A TCP callee that echoes what it reads.
async fn tcp_echo() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, Task(task))
}

/// Reads one HTTP/1.1 response with a `content-length` off `stream`:
/// status and body, or `None` when the connection closes first (within
/// 5 s).
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            Ok(_) => return None,
            Err(_) => panic!("no response and no close within 5 s"),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    timeout(Duration::from_secs(5), stream.read_exact(&mut body))
        .await
        .ok()?
        .ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Whether the peer closed `stream` (EOF or reset) within `limit`,
/// discarding what it sends first.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A slowloris client: sends `head` then one more byte every 200 ms
/// (never finishing the head), until the sidecar closes the connection
/// or 6 s pass. Returns how long after the first byte the connection
/// was closed, and what the sidecar sent before closing.
async fn slowloris(addr: SocketAddr, head: &str) -> (Option<Duration>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let (mut r, mut w) = stream.split();
    let mut answer = Vec::new();
    let reader = async {
        let mut sink = [0u8; 1024];
        loop {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&sink[..n]),
            }
        }
    };
    let writer = async {
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        // At most 30 more bytes (6 s): bounded whatever the sidecar does.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if w.write_all(b"a").await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    let closed = tokio::select! {
        () = reader => Some(started.elapsed()),
        () = writer => None,
        () = tokio::time::sleep(Duration::from_secs(7)) => None,
    };
    (closed, String::from_utf8_lossy(&answer).into_owned())
}

/// Finding 10: a client that sends its request head a byte at a time
/// (each byte well within the idle timeout, the whole head never) is cut
/// off once the head has taken `header_read_timeout`, on every HTTP
/// listener: the outbound fast path (408 naming the setting), the
/// inbound listener (the hyper path) and the admin port; a connection
/// that sends nothing, or nothing more after a response, closes after
/// `idle_timeout`. Timeouts are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_and_idle_connections_are_cut_off_finding_10() {
    let daemon = Daemon::start().await;
    create_tenant(&daemon, "integration", None).await;
    let (app, _app) = baggage_echo_app().await;
    register(&daemon, "integration", "echo", app, "http").await;
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "integration",
        &[],
        &[
            "--inbound",
            &format!("{inbound}={app}"),
            "--header-read-timeout",
            "1s",
            "--idle-timeout",
            "2s",
        ],
    )
    .await;
    // The route is there, and a normal request on each listener works.
    for _ in 0..100 {
        let mut s = TcpStream::connect(sidecar.outbound).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
            .await
            .unwrap();
        if read_response(&mut s)
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let head = "GET / HTTP/1.1\r\nhost: echo\r\nx-slow: ";
    let mut problems = Vec::new();
    for (name, addr) in [
        ("outbound", sidecar.outbound),
        ("inbound", inbound),
        ("admin", sidecar.admin),
    ] {
        let (closed, answer) = slowloris(addr, head).await;
        match closed {
            // 1 s plus scheduling slack; never the 2 s idle timeout.
            Some(after) if after < Duration::from_millis(1900) => {}
            other => problems.push(format!(
                "{name}: slowloris head not cut off after 1 s (closed after {other:?})"
            )),
        }
        if name == "outbound"
            && !(answer.starts_with("HTTP/1.1 408") && answer.contains("header_read_timeout"))
        {
            problems.push(format!(
                "outbound: no 408 naming header_read_timeout: {answer:?}"
            ));
        }

        // Nothing sent at all.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        if !closed_within(&mut idle, Duration::from_secs(4)).await {
            problems.push(format!("{name}: a silent connection stayed open 4 s"));
        }
    }
    // After a response, a keep-alive connection that stays quiet closes.
    for (name, addr, host) in [
        ("outbound", sidecar.outbound, "echo"),
        ("inbound", inbound, "game-server"),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_response(&mut s).await;
        if answer.as_ref().map(|a| a.0) != Some(200) {
            problems.push(format!("{name}: request before idling: {answer:?}"));
        }
        if !closed_within(&mut s, Duration::from_secs(4)).await {
            problems.push(format!(
                "{name}: an idle keep-alive connection stayed open 4 s"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let metrics = sidecar.metrics().await;
    for limit in ["header_read_timeout", "idle_timeout"] {
        assert!(
            metric(
                &metrics,
                "strata_sidecar_limit_hits_total",
                &[&format!("limit=\"{limit}\"")]
            ) >= 1.0,
            "{limit} not counted:\n{metrics}"
        );
    }
}

/// Finding 10: with `max_connections` 3, a fourth and fifth connection to
/// each listener are refused at once — HTTP listeners answer 503 naming
/// the setting, a TCP route closes — and counted; the three held ones
/// keep working, and once one closes a new connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused_finding_10() {
    let daemon = Daemon::start().await;
    create_tenant(&daemon, "integration", None).await;
    let (app, _app) = baggage_echo_app().await;
    let (echo, _echo) = tcp_echo().await;
    register(&daemon, "integration", "web", app, "http").await;
    register(&daemon, "integration", "echo", echo, "tcp").await;
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "integration",
        &["echo"],
        &[
            "--inbound",
            &format!("{inbound}={app}"),
            "--max-connections",
            "3",
        ],
    )
    .await;
    let tcp = sidecar.tcp[0];

    /// One request on `s`: its status (`None`: closed instead).
    async fn request(s: &mut TcpStream, host: &str) -> Option<(u16, String)> {
        s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        read_response(s).await
    }
    /// One echo round trip on a TCP route connection.
    async fn ping(s: &mut TcpStream) -> bool {
        if s.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut back = [0u8; 4];
        matches!(
            timeout(Duration::from_secs(5), s.read_exact(&mut back)).await,
            Ok(Ok(_))
        ) && &back == b"ping"
    }

    // The route is there before the test starts counting connections.
    for _ in 0..100 {
        let mut s = TcpStream::connect(sidecar.outbound).await.unwrap();
        if request(&mut s, "web")
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            break;
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the probe connections' ends reach the sidecar.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut problems = Vec::new();
    for (name, addr, host) in [
        ("outbound", sidecar.outbound, "web"),
        ("inbound", inbound, "game-server"),
    ] {
        let mut held = Vec::new();
        for i in 0..3 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let answer = request(&mut s, host).await;
            if answer.as_ref().map(|a| a.0) != Some(200) {
                problems.push(format!("{name}: held connection {i}: {answer:?}"));
            }
            held.push(s);
        }
        for i in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let answer = request(&mut s, host).await;
            match &answer {
                Some((503, body)) if body.contains("max_connections") => {}
                other => problems.push(format!(
                    "{name}: connection {} beyond the cap: {other:?}",
                    3 + i
                )),
            }
            if !closed_within(&mut s, Duration::from_secs(2)).await {
                problems.push(format!("{name}: a refused connection stayed open"));
            }
        }
        // The held ones still work.
        for s in &mut held {
            if request(s, host).await.map(|a| a.0) != Some(200) {
                problems.push(format!("{name}: a held connection stopped working"));
            }
        }
        // One ends: a new connection is served (bounded wait for the
        // sidecar to notice).
        held.pop();
        let mut served = false;
        for _ in 0..50 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if request(&mut s, host)
                .await
                .is_some_and(|(status, _)| status == 200)
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !served {
            problems.push(format!("{name}: no connection served after one closed"));
        }
    }

    // A TCP route: the excess connections close without reaching a callee.
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        if !ping(&mut s).await {
            problems.push(format!("tcp: held connection {i} not routed"));
        }
        held.push(s);
    }
    for i in 0..2 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        let _ = s.write_all(b"ping").await;
        if !closed_within(&mut s, Duration::from_secs(2)).await {
            problems.push(format!(
                "tcp: connection {} beyond the cap stayed open",
                3 + i
            ));
        }
    }
    held.pop();
    let mut served = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(tcp).await.unwrap();
        if ping(&mut s).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !served {
        problems.push("tcp: no connection served after one closed".to_owned());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let metrics = sidecar.metrics().await;
    assert!(
        metric(
            &metrics,
            "strata_sidecar_limit_hits_total",
            &["limit=\"max_connections\""]
        ) >= 6.0,
        "{metrics}"
    );
}
