//! `strata-sidecar` end to end, with real processes: a `stratad`, test
//! HTTP, gRPC and TCP services on loopback registered in `integration`
//! (A, B, C) and `feat-1` (B only), and a sidecar per environment.
//!
//! What a feature environment relies on: a call for a service it does not
//! run falls back to `integration`; a call for one it runs stays in
//! `feat-1`; the callback chain feat-1.B → integration.A → B lands on
//! feat-1.B because the tenant travels in the baggage; deregistering
//! feat-1.B moves the next requests to integration.B; losing the daemon
//! keeps the last routing table serving; gRPC streams and trailers pass;
//! raw TCP falls back the same way.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use strata_tests::sidecar::Sidecar;
use strata_tests::{Daemon, http_ok, http_request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};

const PROJECT: &str = "vega";

/// Aborts a task when dropped, so test services stop with the test.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn create_tenant(api: SocketAddr, tenant: &str, parent: Option<&str>) {
    let body = match parent {
        Some(p) => format!(r#"{{"parent":"{p}"}}"#),
        None => "{}".to_owned(),
    };
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}"),
        &body,
    )
    .await;
}

async fn register(
    api: SocketAddr,
    tenant: &str,
    service: &str,
    id: &str,
    addr: SocketAddr,
    protocol: &str,
) {
    http_ok(
        api,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}/services/{service}/instances"),
        &format!(
            r#"{{"id":"{id}","endpoints":{{"main":"{addr}"}},"protocol":"{protocol}","kind":"persistent"}}"#
        ),
    )
    .await;
}

async fn deregister(api: SocketAddr, tenant: &str, service: &str, id: &str) {
    let (status, body) = http_request(
        api,
        "DELETE",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}/services/{service}/instances/{id}"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert!(
        (200..300).contains(&status),
        "deregister {id}: {status} {body}"
    );
}

/// One HTTP/1.1 request through `proxy` naming the callee with `host`:
/// (status, headers, body).
async fn get(
    proxy: SocketAddr,
    host: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> (u16, HeaderMap, String) {
    let stream = timeout(Duration::from_secs(5), TcpStream::connect(proxy))
        .await
        .expect("connect timeout")
        .expect("connect to the sidecar");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::get(uri).header("host", host);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("response within 10 s")
    .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// A test HTTP service answering with its name (and the baggage it got
/// in `x-baggage`). `/call/<svc>` calls `svc` through `sidecar`,
/// forwarding the incoming baggage header as an OpenTelemetry-instrumented
/// app does, and answers `<name>><callee's answer>`.
async fn http_app(name: &'static str, sidecar: Option<SocketAddr>) -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let baggage = req
                        .headers()
                        .get("baggage")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let path = req.uri().path().to_owned();
                    let body = if let Some(callee) = path.strip_prefix("/call/") {
                        let proxy = sidecar.expect("app without a sidecar");
                        let (status, _, answer) =
                            get(proxy, callee, "/", &[("baggage", baggage.as_str())]).await;
                        format!("{name}>{answer}{}", if status == 200 { "" } else { "!" })
                    } else {
                        if path == "/slow" {
                            sleep(Duration::from_millis(800)).await;
                        }
                        name.to_owned()
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response
                        .headers_mut()
                        .insert("x-baggage", baggage.parse().unwrap());
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, Task(task))
}

/// Retries `check` every 20 ms until it returns `Some`, for at most
/// `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_with_fallback_and_the_tenant_travels_across_hops() {
    let mut daemon = Daemon::start().await;
    let api = daemon.addr;
    let endpoint = daemon.endpoint();
    create_tenant(api, "integration", None).await;
    create_tenant(api, "feat-1", Some("integration")).await;

    let integration = Sidecar::start(&endpoint, PROJECT, "integration", &[], &[]).await;
    let feat = Sidecar::start(&endpoint, PROJECT, "feat-1", &[], &[]).await;

    // integration: A (calls out through integration's sidecar), B, C;
    // feat-1: B only.
    let (a, _a) = http_app("integration.a", Some(integration.outbound)).await;
    let (b, _b) = http_app("integration.b", None).await;
    let (c, _c) = http_app("integration.c", None).await;
    let (fb, _fb) = http_app("feat-1.b", None).await;
    register(api, "integration", "a", "a-int", a, "http").await;
    register(api, "integration", "b", "b-int", b, "http").await;
    register(api, "integration", "c", "c-int", c, "http").await;
    register(api, "feat-1", "b", "b-feat", fb, "http").await;

    let proxy = feat.outbound;
    eventually(Duration::from_secs(10), "feat-1 routes", || async {
        let (s, _, body) = get(proxy, "b", "/", &[]).await;
        (s == 200 && body == "feat-1.b").then_some(())
    })
    .await;

    // Fallback and own-tenant routing, by every way of naming the callee.
    for host in ["c", "c.strata", "c:8080", "C.strata:80"] {
        let (status, _, body) = get(proxy, host, "/", &[]).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "integration.c"),
            "Host {host}"
        );
    }
    let (status, _, body) = get(proxy, "b", "http://b.strata:8080/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "feat-1.b"),
        "absolute-form URI"
    );

    // The tenant is added to the baggage, other entries kept.
    let (_, headers, _) = get(proxy, "b", "/", &[("baggage", "userId=42")]).await;
    assert_eq!(headers["x-baggage"], "userId=42,strata-tenant=feat-1");

    // A request carrying a tenant routes for it, whichever sidecar it
    // passes: x-strata-tenant on integration's sidecar reaches feat-1.b.
    let (_, headers, body) = get(
        integration.outbound,
        "b",
        "/",
        &[("x-strata-tenant", "feat-1")],
    )
    .await;
    assert_eq!(body, "feat-1.b");
    assert_eq!(headers["x-baggage"], "strata-tenant=feat-1");

    // The callback chain: feat-1 calls integration.A, which calls B
    // through integration's sidecar forwarding the baggage: feat-1.B.
    let (status, _, body) = get(proxy, "a", "/call/b", &[]).await;
    assert_eq!((status, body.as_str()), (200, "integration.a>feat-1.b"));
    // Without a feature tenant on the call, A's B is integration's.
    let (_, _, body) = get(integration.outbound, "a", "/call/b", &[]).await;
    assert_eq!(body, "integration.a>integration.b");

    // Nothing routable: 503 naming the service and the tenant chain.
    let (status, _, body) = get(proxy, "nosuch", "/", &[]).await;
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["service"], "nosuch");
    assert_eq!(error["error"]["tenant"], "feat-1");
    assert_eq!(
        error["error"]["chain"],
        serde_json::json!(["feat-1", "integration"])
    );
    // An unknown tenant in the baggage is refused, not misrouted.
    let (status, _, body) = get(proxy, "b", "/", &[("baggage", "strata-tenant=nope")]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("nope"), "{body}");

    // /routes says where each service resolves and why.
    let routes = feat.routes().await;
    let feat_routes = routes["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "feat-1")
        .unwrap();
    let route_c = feat_routes["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "c")
        .unwrap();
    assert_eq!(route_c["resolves_to"], "integration");
    assert_eq!(route_c["fallback"], true);
    assert!(
        route_c["why"].as_str().unwrap().contains("feat-1"),
        "{route_c}"
    );
    assert_eq!(route_c["instances"][0]["address"], c.to_string());

    // Deregister feat-1.B: requests move to integration.B (every answer on
    // the way is a success), also on the callback chain.
    deregister(api, "feat-1", "b", "b-feat").await;
    eventually(
        Duration::from_secs(5),
        "b falls back after deregistration",
        || async {
            let (status, _, body) = get(proxy, "b", "/", &[]).await;
            assert_eq!(status, 200, "{body}");
            (body == "integration.b").then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(5), "the chain follows", || async {
        let (_, _, body) = get(proxy, "a", "/call/b", &[]).await;
        (body == "integration.a>integration.b").then_some(())
    })
    .await;

    // Lose the daemon: the last table keeps serving.
    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).await;
    sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let (_, _, body) = get(proxy, "c", "/", &[]).await;
        assert_eq!(body, "integration.c");
        let (_, _, body) = get(proxy, "a", "/call/b", &[]).await;
        assert_eq!(body, "integration.a>integration.b");
    }
    let (status, _) = strata_tests::http_get(feat.admin, "/readyz").await.unwrap();
    assert_eq!(status, 200, "still ready on the last table");

    // Metrics: requests by service, resolved tenant, fallback and status.
    let metrics = feat.metrics().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("strata_sidecar_requests_total{")
                && l.contains(r#"service="c""#)
                && l.contains(r#"tenant="integration""#)
                && l.contains(r#"fallback="true""#)
                && l.contains(r#"code="2xx""#)
        })
        .unwrap_or_else(|| panic!("no request metric for c:\n{metrics}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 7.0, "{line}");
    assert!(metrics.contains("strata_sidecar_request_duration_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    let (slow, _slow) = http_app("integration.slow", None).await;
    register(api, "integration", "slow", "slow-1", slow, "http").await;
    let mut sidecar = Sidecar::start(&daemon.endpoint(), PROJECT, "integration", &[], &[]).await;
    let proxy = sidecar.outbound;
    eventually(Duration::from_secs(10), "route", || async {
        (get(proxy, "slow", "/", &[]).await.0 == 200).then_some(())
    })
    .await;

    let in_flight = tokio::spawn(async move { get(proxy, "slow", "/slow", &[]).await });
    sleep(Duration::from_millis(200)).await;
    sidecar.signal(Signal::SIGTERM);
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "integration.slow"),
        "in-flight request finished"
    );
    let exit = sidecar.wait_exit(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit}; stderr:\n{}", sidecar.stderr());
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "no longer accepting"
    );
}

/// A gRPC test service: the standard health service reporting its own
/// identity as a SERVING service name (so a client can tell which instance
/// answered), plus server reflection (a bidirectional stream).
async fn grpc_app(identity: &str) -> (SocketAddr, tonic_health::server::HealthReporter, Task) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(identity, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, reporter, Task(task))
}

async fn grpc_channel(proxy: SocketAddr, service: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .connect()
        .await
        .unwrap()
}

async fn check(channel: &tonic::transport::Channel, name: &str) -> Result<i32, tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: name.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_through_with_streams_and_trailers() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    create_tenant(api, "feat-1", Some("integration")).await;
    let (ig, _ig_reporter, _ig) = grpc_app("integration.g").await;
    let (ih, _ih_reporter, _ih) = grpc_app("integration.h").await;
    let (fg, fg_reporter, _fg) = grpc_app("feat-1.g").await;
    register(api, "integration", "g", "g-int", ig, "grpc").await;
    register(api, "integration", "h", "h-int", ih, "grpc").await;
    register(api, "feat-1", "g", "g-feat", fg, "grpc").await;
    let feat = Sidecar::start(&daemon.endpoint(), PROJECT, "feat-1", &[], &[]).await;

    // Unary, with the status in trailers: g stays in feat-1, h falls back.
    let g = grpc_channel(feat.outbound, "g").await;
    let serving = health_check_response::ServingStatus::Serving as i32;
    eventually(Duration::from_secs(10), "g in feat-1", || async {
        (check(&g, "feat-1.g").await.ok() == Some(serving)).then_some(())
    })
    .await;
    let wrong = check(&g, "integration.g").await.unwrap_err();
    assert_eq!(
        wrong.code(),
        tonic::Code::NotFound,
        "feat-1.g answered: {wrong:?}"
    );
    let h = grpc_channel(feat.outbound, "h.strata").await;
    assert_eq!(check(&h, "integration.h").await.unwrap(), serving);

    // A streaming response: each status change arrives as it happens.
    let mut watch = HealthClient::new(g.clone())
        .watch(HealthCheckRequest {
            service: "feat-1.g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, serving);
    fg_reporter
        .set_service_status("feat-1.g", ServingStatus::NotServing)
        .await;
    let second = timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second.status,
        health_check_response::ServingStatus::NotServing as i32
    );

    // A bidirectional stream that ends: responses, then trailers with OK.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let requests = (0..2).map(|_| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    });
    let mut responses = ServerReflectionClient::new(g.clone())
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answers = 0;
    while let Some(answer) = timeout(Duration::from_secs(5), responses.message())
        .await
        .unwrap()
        .expect("stream ends with an OK status in its trailers")
    {
        assert!(answer.message_response.is_some());
        answers += 1;
    }
    assert_eq!(answers, 2);
    let trailers = responses.trailers().await.unwrap();
    assert!(trailers.is_some(), "trailers arrived");

    // Nothing routable: UNAVAILABLE.
    let nosuch = grpc_channel(feat.outbound, "nosuch").await;
    let err = check(&nosuch, "x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("nosuch"), "{err:?}");
}

/// A TCP echo service that first says who it is.
async fn echo_app(name: &'static str) -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                stream.write_all(format!("{name}\n").as_bytes()).await?;
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, Task(task))
}

/// Connects to a TCP route: (greeting, echo of "ping").
async fn tcp_call(addr: SocketAddr) -> (String, String) {
    let stream = timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    timeout(Duration::from_secs(5), stream.read_line(&mut greeting))
        .await
        .expect("greeting in time")
        .unwrap();
    stream.get_mut().write_all(b"ping\n").await.unwrap();
    let mut echo = String::new();
    timeout(Duration::from_secs(5), stream.read_line(&mut echo))
        .await
        .unwrap()
        .unwrap();
    (greeting.trim().to_owned(), echo.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_fall_back_like_http() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    create_tenant(api, "feat-1", Some("integration")).await;
    let (ie, _ie) = echo_app("integration.echo").await;
    let (fe, _fe) = echo_app("feat-1.echo").await;
    register(api, "integration", "echo", "echo-int", ie, "tcp").await;
    let feat = Sidecar::start(&daemon.endpoint(), PROJECT, "feat-1", &["echo"], &[]).await;
    let port = feat.tcp[0];

    assert_eq!(
        tcp_call(port).await,
        ("integration.echo".to_owned(), "ping".to_owned()),
        "falls back to integration"
    );
    register(api, "feat-1", "echo", "echo-feat", fe, "tcp").await;
    eventually(Duration::from_secs(5), "feat-1.echo takes over", || async {
        (tcp_call(port).await.0 == "feat-1.echo").then_some(())
    })
    .await;
    deregister(api, "feat-1", "echo", "echo-feat").await;
    eventually(Duration::from_secs(5), "back to integration", || async {
        (tcp_call(port).await.0 == "integration.echo").then_some(())
    })
    .await;

    // A dead instance next to a live one: connects move on to the live
    // one, every time.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    register(api, "integration", "echo", "echo-dead", dead, "tcp").await;
    eventually(Duration::from_secs(5), "two instances routed", || async {
        let routes = feat.routes().await;
        let n = routes["tenants"][0]["services"][0]["instances"]
            .as_array()
            .map_or(0, Vec::len);
        (n == 2).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(tcp_call(port).await.0, "integration.echo");
    }
}

/// An HTTP/1.1 service that accepts any upgrade and then echoes bytes.
async fn upgrade_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|mut req: Request<Incoming>| async move {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(upgraded) = upgrade.await {
                            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    let response = Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, Task(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upgrades_become_a_tunnel() {
    use tokio::io::AsyncReadExt;
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    let (ws, _ws) = upgrade_app().await;
    register(api, "integration", "ws", "ws-1", ws, "http").await;
    let sidecar = Sidecar::start(&daemon.endpoint(), PROJECT, "integration", &[], &[]).await;

    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("response head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in [&b"hello"[..], b"through the sidecar"] {
        stream.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(echo, message);
    }
}

/// A response as read off the wire by [`Wire`].
#[derive(Debug)]
struct WireResponse {
    status: u16,
    /// Lowercased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl WireResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection, so a test controls exactly what
/// reaches the proxy (split heads, chunked bodies, pipelining) and checks
/// the response framing byte by byte, as a strict client would.
struct Wire(BufReader<TcpStream>);

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let stream = timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        Wire(BufReader::new(stream))
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.0.get_mut().write_all(bytes).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = timeout(Duration::from_secs(10), self.0.read_line(&mut line))
            .await
            .expect("line within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response");
        assert!(line.ends_with("\r\n"), "line without CRLF: {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; n];
        timeout(Duration::from_secs(10), self.0.read_exact(&mut buf))
            .await
            .expect("body within 10 s")
            .unwrap();
        buf
    }

    /// The next final response head (1xx skipped): status and headers.
    async fn head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            let status_line = self.line().await;
            let status: u16 = status_line
                .strip_prefix("HTTP/1.1 ")
                .and_then(|s| s.get(..3))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let mut headers = Vec::new();
            loop {
                let line = self.line().await;
                if line.is_empty() {
                    break;
                }
                let (n, v) = line.split_once(':').expect("header line");
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            if !(100..200).contains(&status) {
                return (status, headers);
            }
        }
    }

    /// One chunk of a chunked body: its data (empty for the last one,
    /// whose trailer section is consumed too).
    async fn chunk(&mut self) -> Vec<u8> {
        let size_line = self.line().await;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
        if size == 0 {
            while !self.line().await.is_empty() {}
            return Vec::new();
        }
        let data = self.exact(size).await;
        assert_eq!(self.line().await, "", "CRLF after chunk data");
        data
    }

    /// Reads a whole response to a request (`head_request`: a HEAD, whose
    /// response has no body whatever its headers say).
    async fn response(&mut self, head_request: bool) -> WireResponse {
        use tokio::io::AsyncReadExt;
        let (status, headers) = self.head().await;
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if head_request || status == 204 || status == 304 {
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let data = self.chunk().await;
                if data.is_empty() {
                    break;
                }
                body.extend(data);
            }
        } else if let Some(n) = get("content-length") {
            body = self.exact(n.parse().unwrap()).await;
        } else {
            timeout(Duration::from_secs(10), self.0.read_to_end(&mut body))
                .await
                .expect("close-delimited body within 10 s")
                .unwrap();
        }
        WireResponse {
            status,
            headers,
            body,
        }
    }

    /// Whether the peer closed the connection (within 5 s).
    async fn closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        matches!(
            timeout(Duration::from_secs(5), self.0.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// An HTTP/1.1 upstream for the wire cases: `/echo` answers the request
/// body with the framing it arrived with in `x-te` / `x-len` and its
/// baggage in `x-baggage`; `/204`, `/304`; `/close` answers with
/// `connection: close`; `/stream` sends a first chunk and the rest only
/// once `go` is notified; `/slow` answers after 3 s; anything else answers
/// `wire` (a GET body a HEAD must not get).
async fn wire_app(go: std::sync::Arc<tokio::sync::Notify>) -> (SocketAddr, Task) {
    use http_body_util::StreamBody;
    use http_body_util::combinators::BoxBody;
    type Body = BoxBody<Bytes, Infallible>;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let go = go.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let go = go.clone();
                    async move {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let (te, len, baggage) = (
                            header("transfer-encoding"),
                            header("content-length"),
                            header("baggage"),
                        );
                        let full = |b: Bytes| -> Body { Full::new(b).boxed() };
                        let mut response = match req.uri().path() {
                            "/echo" => {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                Response::new(full(body))
                            }
                            "/204" => Response::builder()
                                .status(204)
                                .body(full(Bytes::new()))
                                .unwrap(),
                            "/304" => Response::builder()
                                .status(304)
                                .header("etag", "\"v1\"")
                                .body(full(Bytes::new()))
                                .unwrap(),
                            "/close" => Response::builder()
                                .header("connection", "close")
                                .body(full(Bytes::from_static(b"closing")))
                                .unwrap(),
                            "/stream" => {
                                let frames = futures::stream::unfold(0u8, move |step| {
                                    let go = go.clone();
                                    async move {
                                        let data: &'static [u8] = match step {
                                            0 => b"first",
                                            1 => {
                                                go.notified().await;
                                                b"second"
                                            }
                                            _ => return None,
                                        };
                                        Some((
                                            Ok::<_, Infallible>(hyper::body::Frame::data(
                                                Bytes::from_static(data),
                                            )),
                                            step + 1,
                                        ))
                                    }
                                });
                                Response::new(BodyExt::boxed(StreamBody::new(frames)))
                            }
                            "/slow" => {
                                sleep(Duration::from_secs(3)).await;
                                Response::new(full(Bytes::from_static(b"slow")))
                            }
                            _ => Response::new(full(Bytes::from_static(b"wire"))),
                        };
                        let h = response.headers_mut();
                        h.insert("x-te", te.parse().unwrap());
                        h.insert("x-len", len.parse().unwrap());
                        h.insert("x-baggage", baggage.parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, Task(task))
}

/// A hand-written upstream: an Early Hints interim response, then a final
/// one with neither length nor chunking — its body ends when the upstream
/// closes.
async fn close_delimited_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    if stream.read_line(&mut line).await? == 0 || line == "\r\n" {
                        break;
                    }
                }
                let stream = stream.get_mut();
                stream
                    .write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
                    .await?;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
                    .await?;
                sleep(Duration::from_millis(50)).await;
                stream.write_all(b"the close").await?;
                stream.shutdown().await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, Task(task))
}

/// The outbound proxy's HTTP/1.1 framing on the wire: bodies split across
/// writes, chunked request bodies with trailers, large bodies streamed
/// both ways, pipelined requests, HEAD / 204 / 304 without a body, an
/// upstream closing its connection, a close-delimited response after an
/// interim one, a response streamed before it ends, the route timeout,
/// and a dead instance next to a live one (retries, ejection). Each case
/// then checks the same connection still serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_framing_pipelining_timeouts_and_retries_on_the_wire() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let (app, _app) = wire_app(go.clone()).await;
    let (raw, _raw) = close_delimited_app().await;
    register(api, "integration", "wire", "wire-1", app, "http").await;
    register(api, "integration", "raw", "raw-1", raw, "http").await;
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "integration",
        &[],
        &["--route-timeout", "wire=1s"],
    )
    .await;
    let proxy = sidecar.outbound;
    eventually(Duration::from_secs(10), "route", || async {
        (get(proxy, "wire", "/", &[]).await.0 == 200).then_some(())
    })
    .await;

    let mut c = Wire::connect(proxy).await;
    // A head split mid-line and a body arriving later.
    c.send(b"POST /echo HTTP/1.1\r\nho").await;
    sleep(Duration::from_millis(50)).await;
    c.send(b"st: wire\r\ncontent-length: 11\r\nbaggage: k=v\r\n\r\nhello")
        .await;
    sleep(Duration::from_millis(50)).await;
    c.send(b" world").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(r.header("x-len"), Some("11"));
    assert_eq!(r.header("x-baggage"), Some("k=v,strata-tenant=integration"));

    // A chunked body in pieces, with an extension and a trailer: it
    // arrives whole and still chunked.
    c.send(b"POST /echo HTTP/1.1\r\nhost: wire\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhel")
        .await;
    sleep(Duration::from_millis(50)).await;
    c.send(b"lo\r\n6\r\n world\r\n").await;
    sleep(Duration::from_millis(50)).await;
    c.send(b"0\r\nx-sum: 1\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    assert_eq!(r.header("x-te"), Some("chunked"));

    // 1 MiB each way, more than any buffer: streamed.
    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut request = format!(
        "PUT /echo HTTP/1.1\r\nhost: wire\r\ncontent-length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    request.extend_from_slice(&big);
    // The echo app reads the whole body before answering, so one write
    // cannot deadlock.
    c.send(&request).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body == big,
        "1 MiB echoed intact ({} bytes back)",
        r.body.len()
    );

    // Pipelined: three requests in one write, answers in order.
    c.send(
        b"GET /a HTTP/1.1\r\nhost: wire\r\n\r\nHEAD /b HTTP/1.1\r\nhost: wire\r\n\r\nGET /204 HTTP/1.1\r\nhost: wire\r\n\r\n",
    )
    .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "wire"));
    let r = c.response(true).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some("4"),
        "HEAD keeps the length"
    );
    let r = c.response(false).await;
    assert_eq!(r.status, 204);
    c.send(b"GET /304 HTTP/1.1\r\nhost: wire\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("etag")), (304, Some("\"v1\"")));

    // The upstream closes after its answer: the caller's connection is
    // not affected and its next request gets a new upstream connection.
    for _ in 0..2 {
        c.send(b"GET /close HTTP/1.1\r\nhost: wire\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!((r.status, r.text().as_str()), (200, "closing"));
        assert_eq!(
            r.header("connection"),
            None,
            "connection-scoped: not passed on"
        );
    }

    // A response streams before it ends.
    c.send(b"GET /stream HTTP/1.1\r\nhost: wire\r\n\r\n").await;
    let (status, headers) = c.head().await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v == "chunked"),
        "{headers:?}"
    );
    assert_eq!(
        c.chunk().await,
        b"first",
        "first chunk before the rest exists"
    );
    go.notify_one();
    assert_eq!(c.chunk().await, b"second");
    assert_eq!(c.chunk().await, b"", "last chunk");

    // The route timeout (1 s for wire): 504 naming the service; the
    // connection keeps serving.
    let started = Instant::now();
    c.send(b"GET /slow HTTP/1.1\r\nhost: wire\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_millis(2500));
    let error: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(error["error"]["service"], "wire");
    assert_eq!(error["error"]["code"], "deadline_exceeded");
    c.send(b"GET / HTTP/1.1\r\nhost: wire\r\n\r\n").await;
    assert_eq!(c.response(false).await.text(), "wire");

    // Close-delimited after an interim response: the caller gets all of
    // it (framed as the proxy sees fit: chunked, or up to its own close).
    c.send(b"GET / HTTP/1.1\r\nhost: raw\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (200, "until the close"));

    // connection: close from the caller: answered, then closed.
    let mut c = Wire::connect(proxy).await;
    c.send(b"GET / HTTP/1.1\r\nhost: wire\r\nconnection: close\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.closed().await, "closed after the answer");

    // A dead instance next to the live one: every request succeeds (a
    // failed connect moves on), and the dead one gets ejected.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    register(api, "integration", "wire", "wire-dead", dead, "http").await;
    eventually(Duration::from_secs(5), "two instances routed", || async {
        let routes = sidecar.routes().await;
        let n = routes["tenants"][0]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["service"] == "wire"))
            .and_then(|s| s["instances"].as_array())
            .map_or(0, Vec::len);
        (n == 2).then_some(())
    })
    .await;
    let mut c = Wire::connect(proxy).await;
    for _ in 0..40 {
        c.send(b"GET / HTTP/1.1\r\nhost: wire\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!((r.status, r.text().as_str()), (200, "wire"));
    }
    let metrics = sidecar.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("strata_sidecar_upstream_retries_total") >= 1.0,
        "{metrics}"
    );
    assert!(value("strata_sidecar_ejections_total") >= 1.0, "{metrics}");
}

impl Wire {
    /// The next response, or `None` when the proxy closed the connection
    /// instead (within 10 s).
    async fn maybe_response(&mut self) -> Option<WireResponse> {
        let more = timeout(Duration::from_secs(10), self.0.fill_buf())
            .await
            .expect("response or close within 10 s")
            .map(|b| !b.is_empty())
            .unwrap_or(false);
        if more {
            Some(self.response(false).await)
        } else {
            None
        }
    }
}

/// An HTTP/1.1 upstream that ends lines at a bare LF (a CR before it is
/// dropped) and takes an unparsable `Content-Length` for 0, as lenient
/// servers do. It records every request line it sees and answers each
/// with its path as the body; the answer to `/x` (the smuggled request of
/// the finding 9 cases) comes 200 ms late, as a real handler's might, so
/// that on a pooled connection it would reach whoever sends next.
async fn lenient_app() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    Task,
) {
    use tokio::io::{AsyncBufRead, AsyncReadExt};
    async fn line<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
        let mut raw = Vec::new();
        if r.read_until(b'\n', &mut raw).await.ok()? == 0 {
            return None;
        }
        while matches!(raw.last(), Some(b'\n' | b'\r')) {
            raw.pop();
        }
        Some(String::from_utf8_lossy(&raw).into_owned())
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                while let Some(request_line) = line(&mut r).await {
                    if request_line.is_empty() {
                        continue;
                    }
                    let path = request_line
                        .split(' ')
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    log.lock().unwrap().push(request_line.clone());
                    let (mut chunked, mut length) = (false, 0usize);
                    loop {
                        let Some(h) = line(&mut r).await else { return };
                        if h.is_empty() {
                            break;
                        }
                        let (n, v) = h.split_once(':').unwrap_or((h.as_str(), ""));
                        let (n, v) = (n.trim().to_ascii_lowercase(), v.trim());
                        if n == "transfer-encoding" && v.contains("chunked") {
                            chunked = true;
                        } else if n == "content-length" {
                            // Digits only, anything else is 0.
                            length = v
                                .parse::<usize>()
                                .ok()
                                .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                                .unwrap_or(0);
                        }
                    }
                    if chunked {
                        loop {
                            let Some(size) = line(&mut r).await else {
                                return;
                            };
                            let hex = size.split(';').next().unwrap_or_default().trim();
                            let n = usize::from_str_radix(hex, 16).unwrap_or(0);
                            if n == 0 {
                                while line(&mut r).await.is_some_and(|t| !t.is_empty()) {}
                                break;
                            }
                            let mut data = vec![0u8; n];
                            if r.read_exact(&mut data).await.is_err() {
                                return;
                            }
                            let _ = line(&mut r).await;
                        }
                    } else if length > 0 {
                        let mut data = vec![0u8; length];
                        if r.read_exact(&mut data).await.is_err() {
                            return;
                        }
                    }
                    if path == "/x" {
                        sleep(Duration::from_millis(200)).await;
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                        path.len()
                    );
                    if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, Task(task))
}

/// Finding 9: request smuggling through the HTTP/1.1 fast path. Each case
/// hides `GET /x` where hyper (and the fast path) see body or trailer
/// bytes but a server that ends lines at LF, or reads `Content-Length`
/// digits only, sees a second request. The fast path must never pass such
/// bytes on: `/x` never reaches the (lenient) upstream, and the next
/// caller on the pooled upstream connection gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_fast_smuggled_requests_never_reach_the_upstream_finding_9() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    let (app, seen, _app) = lenient_app().await;
    register(api, "integration", "lenient", "lenient-1", app, "http").await;
    let sidecar = Sidecar::start(&daemon.endpoint(), PROJECT, "integration", &[], &[]).await;
    let proxy = sidecar.outbound;
    eventually(Duration::from_secs(10), "route", || async {
        (get(proxy, "lenient", "/", &[]).await.0 == 200).then_some(())
    })
    .await;

    let smuggled = "GET /x HTTP/1.1\r\nhost: lenient\r\n\r\n";
    let head = "POST /p HTTP/1.1\r\nhost: lenient\r\ntransfer-encoding: chunked\r\n\r\n";
    // (name, pieces sent 50 ms apart)
    let cases: Vec<(&str, Vec<String>)> = vec![
        // The finding's body: an empty trailer line that is a bare LF.
        (
            "bare LF ends the trailer section",
            vec![format!("{head}0\r\n\n{smuggled}")],
        ),
        // The same with the body already flowing upstream when the bare
        // LF arrives.
        (
            "bare LF ends the trailer section, mid-body",
            vec![
                format!("{head}5\r\nhello\r\n0\r\n"),
                format!("\n{smuggled}"),
            ],
        ),
        (
            "bare LF after a trailer",
            vec![format!("{head}0\r\nx-t: 1\r\n\n{smuggled}")],
        ),
        // A bare LF ends the chunk-size line (and its extension).
        (
            "bare LF in a chunk extension",
            vec![format!("{head}0;ext\n\n{smuggled}")],
        ),
        (
            "bare LF after a chunk size",
            vec![format!("{head}0\n\n{smuggled}")],
        ),
        // `+29` is 29 to Rust's `u64::from_str`, nothing to a digits-only
        // reader: the body is the next request.
        (
            "signed Content-Length",
            vec![format!(
                "POST /p HTTP/1.1\r\nhost: lenient\r\ncontent-length: +{}\r\n\r\n{smuggled}",
                smuggled.len()
            )],
        ),
    ];
    // Every case runs; the failures are reported together.
    let mut problems = Vec::new();
    for (name, pieces) in &cases {
        seen.lock().unwrap().clear();
        let mut c = Wire::connect(proxy).await;
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                sleep(Duration::from_millis(50)).await;
            }
            c.send(piece.as_bytes()).await;
        }
        // The caller gets an answer to its own request (or a refusal, or
        // the connection closes) — never `/x`'s.
        if let Some(r) = c.maybe_response().await {
            if r.text() == "/x" {
                problems.push(format!("{name}: the caller got /x's answer"));
            }
            if r.status == 400 {
                let error: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(error["error"]["code"], "invalid_argument", "{name}");
            }
        }
        // The next caller, while `/x`'s late answer is still on its way
        // through the pooled upstream connection.
        let mut victim = Wire::connect(proxy).await;
        victim
            .send(b"GET /victim HTTP/1.1\r\nhost: lenient\r\n\r\n")
            .await;
        let r = victim.response(false).await;
        if (r.status, r.text().as_str()) != (200, "/victim") {
            problems.push(format!(
                "{name}: the next caller got another request's answer: {} {:?}",
                r.status,
                r.text()
            ));
        }
        let lines = seen.lock().unwrap().clone();
        if lines.iter().any(|l| l.starts_with("GET /x")) {
            problems.push(format!(
                "{name}: the smuggled request reached the upstream: {lines:?}"
            ));
        }
        // A late answer of this case lands before the next case starts (a
        // pooled socket with stray bytes is then dropped, not reused).
        sleep(Duration::from_millis(300)).await;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The calls the sidecar made to `daemon` to learn tenants so far:
/// `WatchServices` and `GetTenant` requests in the daemon's metrics.
async fn learn_calls(daemon: SocketAddr) -> f64 {
    let (_, text) = strata_tests::http_get(daemon, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("strata_rpc_requests_total{"))
        .filter(|l| l.contains("WatchServices") || l.contains("GetTenant"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Finding 5: a caller naming hundreds of random tenants (baggage
/// `strata-tenant=ghost-N`, none of which exists) costs stratad at most
/// `tenant_learn_rate` learns per second, the sidecar remembers at most
/// `max_unknown_tenants` of the names, requests past the budget get a 429
/// naming the setting, and a tenant the sidecar follows keeps being
/// routed throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenants_are_bounded_finding_5() {
    let daemon = Daemon::start().await;
    let api = daemon.addr;
    create_tenant(api, "integration", None).await;
    create_tenant(api, "feat-1", Some("integration")).await;
    let (svc, _svc) = http_app("svc", None).await;
    register(api, "integration", "svc", "svc-1", svc, "http").await;
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "integration",
        &[],
        &["--tenant-learn-rate", "20", "--max-unknown-tenants", "4"],
    )
    .await;
    let proxy = sidecar.outbound;
    let feat = [("baggage", "strata-tenant=feat-1")];
    // feat-1 is followed before the flood.
    eventually(Duration::from_secs(10), "feat-1 routed", || async {
        (get(proxy, "svc", "/", &feat).await.0 == 200).then_some(())
    })
    .await;

    let before = learn_calls(api).await;
    let started = Instant::now();
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    let mut rate_message = None;
    let mut feat_failures = Vec::new();
    // 400 distinct unknown names, 20 at a time, with a request of the
    // followed tenant in every batch.
    for batch in 0..20 {
        let ghosts = (0..20).map(|i| {
            let baggage = format!("strata-tenant=ghost-{batch}-{i}");
            async move { get(proxy, "svc", "/", &[("baggage", baggage.as_str())]).await }
        });
        let (ghosts, followed) = tokio::join!(
            futures::future::join_all(ghosts),
            get(proxy, "svc", "/", &feat)
        );
        for (status, _, body) in ghosts {
            *codes.entry(status).or_default() += 1;
            if status == 429 {
                rate_message.get_or_insert(body);
            }
        }
        if followed.0 != 200 {
            feat_failures.push((followed.0, followed.2));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Learns that were under way when the flood ended reach the daemon
    // within tenant_wait.
    sleep(Duration::from_millis(500)).await;
    let calls = learn_calls(api).await - before;
    // At most 20 learns (a burst) plus 20 per second, each at most a
    // WatchServices and a GetTenant call (and slack for a retry).
    let bound = 2.0 * (20.0 + 20.0 * (elapsed + 0.5)) + 10.0;
    assert!(
        calls <= bound,
        "400 unknown tenants cost {calls} learn calls in {elapsed:.2} s (bound {bound}); answers {codes:?}"
    );
    assert!(
        feat_failures.is_empty(),
        "the followed tenant was refused: {feat_failures:?}"
    );
    assert_eq!(
        codes.values().sum::<usize>(),
        400,
        "every unknown tenant answered: {codes:?}"
    );
    assert!(
        codes.keys().all(|c| *c == 503 || *c == 429),
        "unknown tenants are refused: {codes:?}"
    );
    let message = rate_message.unwrap_or_else(|| panic!("no 429 for the budget: {codes:?}"));
    assert!(message.contains("tenant_learn_rate"), "{message}");

    let routes = sidecar.routes().await;
    let remembered = routes["unknown_tenants"].as_u64();
    assert!(
        remembered.is_some_and(|n| n <= 4),
        "remembered unknown tenants: {remembered:?}"
    );
    let metrics = sidecar.metrics().await;
    for limit in ["tenant_learn_rate", "max_unknown_tenants"] {
        let hits: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("strata_sidecar_limit_hits_total")
                    && l.contains(&format!("limit=\"{limit}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(hits >= 1.0, "{limit} not counted:\n{metrics}");
    }
}
