#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;
use http::header;

type Changes = mpsc::Receiver<HealthChange<String>>;

fn spec(kind: ProbeKind, interval_ms: u64, failures: u32, successes: u32) -> ProbeSpec {
    ProbeSpec {
        kind,
        interval: Duration::from_millis(interval_ms),
        // As long as validate allows: loaded test machines are slow.
        timeout: Duration::from_millis(interval_ms),
        failure_threshold: failures,
        success_threshold: successes,
    }
}

fn target(address: impl ToString, spec: ProbeSpec) -> ProbeTarget {
    ProbeTarget {
        address: address.to_string(),
        spec,
    }
}

fn http(path: &str, expected_status: Option<u16>) -> ProbeKind {
    ProbeKind::Http {
        path: path.to_owned(),
        expected_status,
    }
}

fn grpc(service: &str) -> ProbeKind {
    ProbeKind::Grpc {
        service: service.to_owned(),
    }
}

fn prober() -> (Prober<String>, Changes, CancellationToken) {
    let (tx, rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    (Prober::new(tx, shutdown.clone()), rx, shutdown)
}

async fn next_change(rx: &mut Changes, within: Duration) -> HealthChange<String> {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("no health change in time")
        .expect("change channel closed")
}

/// Collects exactly `n` changes, keyed by id (each id changes once).
async fn changes_by_id(rx: &mut Changes, n: usize) -> HashMap<String, HealthChange<String>> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let change = next_change(rx, Duration::from_secs(3)).await;
        assert!(
            seen.insert(change.id.clone(), change).is_none(),
            "one change per id expected"
        );
    }
    seen
}

/// A port nothing listens on (bound, then released).
async fn dead_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Accepts and immediately closes connections.
fn accept_and_close(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        }
    })
}

async fn tcp_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (address, accept_and_close(listener))
}

/// Stops a server task and waits until its listener is closed.
async fn stop(server: JoinHandle<()>) {
    server.abort();
    let _ = server.await;
}

#[test]
fn thresholds_are_exact() {
    let spec = spec(ProbeKind::Tcp, 100, 3, 2);
    let mut t = Tracker::default();
    // Unknown needs failure_threshold failures to turn unhealthy.
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
    assert_eq!(t.observe(false, &spec), None);
    // Unhealthy needs success_threshold successes; a failure restarts the count.
    assert_eq!(t.observe(true, &spec), None);
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(true, &spec), None);
    assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
    // Healthy: two failures do not flip, a success in between resets them.
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(true, &spec), None);
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
}

#[test]
fn first_success_makes_unknown_healthy() {
    let spec = spec(ProbeKind::Tcp, 100, 3, 5);
    let mut t = Tracker::default();
    assert_eq!(t.observe(false, &spec), None);
    assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
    assert_eq!(t.health, Health::Healthy);
}

#[test]
fn zero_thresholds_act_as_one() {
    let spec = spec(ProbeKind::Tcp, 100, 0, 0);
    let mut t = Tracker::default();
    assert_eq!(t.observe(false, &spec), Some(Health::Unhealthy));
    assert_eq!(t.observe(true, &spec), Some(Health::Healthy));
}

#[test]
fn validate_accepts_good_specs_and_names_each_problem() {
    let good = ProbeSpec {
        kind: http("/healthz?full=1", Some(204)),
        interval: MIN_INTERVAL,
        timeout: MIN_INTERVAL,
        failure_threshold: 1,
        success_threshold: MAX_THRESHOLD,
    };
    assert_eq!(good.validate(), Ok(()));
    assert_eq!(
        ProbeSpec {
            kind: grpc(""),
            ..good.clone()
        }
        .validate(),
        Ok(())
    );

    let check = |spec: ProbeSpec, expected: ProbeSpecError| {
        let err = spec.validate().unwrap_err();
        assert!(!err.to_string().is_empty());
        assert_eq!(err, expected);
    };
    let ms = Duration::from_millis;
    check(
        ProbeSpec {
            interval: ms(99),
            timeout: ms(50),
            ..good.clone()
        },
        ProbeSpecError::IntervalTooShort(ms(99)),
    );
    check(
        ProbeSpec {
            timeout: Duration::ZERO,
            ..good.clone()
        },
        ProbeSpecError::ZeroTimeout,
    );
    check(
        ProbeSpec {
            timeout: ms(101),
            ..good.clone()
        },
        ProbeSpecError::TimeoutOverInterval {
            timeout: ms(101),
            interval: ms(100),
        },
    );
    check(
        ProbeSpec {
            failure_threshold: 0,
            ..good.clone()
        },
        ProbeSpecError::Threshold {
            which: "failure",
            value: 0,
        },
    );
    check(
        ProbeSpec {
            success_threshold: 101,
            ..good.clone()
        },
        ProbeSpecError::Threshold {
            which: "success",
            value: 101,
        },
    );
    for path in [
        "healthz",
        "",
        "/a b",
        &format!("/{}", "x".repeat(MAX_NAME_BYTES)),
    ] {
        check(
            ProbeSpec {
                kind: http(path, None),
                ..good.clone()
            },
            ProbeSpecError::Path(path.to_owned()),
        );
    }
    check(
        ProbeSpec {
            kind: http("/", Some(600)),
            ..good.clone()
        },
        ProbeSpecError::Status(600),
    );
    check(
        ProbeSpec {
            kind: grpc(&"s".repeat(MAX_NAME_BYTES + 1)),
            ..good.clone()
        },
        ProbeSpecError::ServiceName(MAX_NAME_BYTES + 1),
    );
}

#[test]
fn jitter_stays_within_the_interval_and_spreads() {
    let interval = Duration::from_secs(1);
    let hasher = RandomState::new();
    let mut buckets = [0usize; 10];
    for i in 0..1000 {
        let delay = jitter(hasher.hash_one(format!("target-{i}")), interval);
        assert!(delay < interval);
        buckets[(delay.as_millis() / 100) as usize] += 1;
    }
    // Uniform would be 100 per bucket; anything near all-in-one fails.
    assert!(buckets.iter().all(|&n| n > 30), "{buckets:?}");
    assert_eq!(jitter(u64::MAX, Duration::ZERO), Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_target_follows_its_listener() {
    let (prober, mut rx, _shutdown) = prober();
    let (address, server) = tcp_server().await;
    let id = "tcp".to_owned();
    prober.upsert(id.clone(), target(address, spec(ProbeKind::Tcp, 50, 3, 2)));
    assert_eq!(prober.health(&id), Some(Health::Unknown));

    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (change.id.as_str(), change.previous, change.health),
        ("tcp", Health::Unknown, Health::Healthy)
    );
    assert_eq!(prober.health(&id), Some(Health::Healthy));

    // Three consecutive refused connects, one interval apart.
    stop(server).await;
    let stopped = Instant::now();
    let change = next_change(&mut rx, Duration::from_secs(2)).await;
    let took = stopped.elapsed();
    assert_eq!(
        (change.previous, change.health),
        (Health::Healthy, Health::Unhealthy)
    );
    assert!(
        change.detail.contains(&address.to_string()),
        "{}",
        change.detail
    );
    assert!(
        took >= Duration::from_millis(95) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(prober.health(&id), Some(Health::Unhealthy));

    // Back on the same port: two successes, one interval apart.
    let listener = TcpListener::bind(address).await.unwrap();
    let restarted = Instant::now();
    let _server = accept_and_close(listener);
    let change = next_change(&mut rx, Duration::from_secs(2)).await;
    let took = restarted.elapsed();
    assert_eq!(
        (change.previous, change.health, change.detail.as_str()),
        (Health::Unhealthy, Health::Healthy, "")
    );
    assert!(
        took >= Duration::from_millis(45) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let host = address.to_string();
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/down",
            get(|| async { http::StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route("/teapot", get(|| async { http::StatusCode::IM_A_TEAPOT }))
        .route(
            "/host",
            get(move |headers: http::HeaderMap| async move {
                match headers.get(header::HOST) {
                    Some(h) if h.as_bytes() == host.as_bytes() => http::StatusCode::OK,
                    _ => http::StatusCode::BAD_REQUEST,
                }
            }),
        )
        .route(
            "/endless",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                Body::from_stream(futures::stream::repeat_with(move || {
                    Ok::<_, Infallible>(chunk.clone())
                }))
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_decides_health() {
    let (prober, mut rx, _shutdown) = prober();
    let address = http_server().await;
    let cases = [
        ("ok", http("/ok", None), Health::Healthy),
        ("down", http("/down", None), Health::Unhealthy),
        ("missing", http("/missing", None), Health::Unhealthy),
        ("teapot", http("/teapot", Some(418)), Health::Healthy),
        ("wrong-expected", http("/ok", Some(204)), Health::Unhealthy),
        ("host-header", http("/host", None), Health::Healthy),
        ("endless-body", http("/endless", None), Health::Healthy),
    ];
    // Long timeouts and two failures to flip, so that a slow (loaded)
    // test machine cannot fake a verdict.
    for (id, kind, _) in &cases {
        prober.upsert(
            id.to_string(),
            target(address, spec(kind.clone(), 300, 2, 1)),
        );
    }

    let seen = changes_by_id(&mut rx, cases.len()).await;
    for (id, _, expected) in &cases {
        assert_eq!(seen[*id].health, *expected, "{id}: {:?}", seen[*id]);
        assert_eq!(prober.health(&id.to_string()), Some(*expected));
    }
    assert!(
        seen["down"]
            .detail
            .contains("/down: status 503, expected 2xx"),
        "{}",
        seen["down"].detail
    );
    assert!(
        seen["wrong-expected"]
            .detail
            .contains("status 200, expected 204 No Content"),
        "{}",
        seen["wrong-expected"].detail
    );
    // Steady state: no further changes.
    assert!(
        tokio::time::timeout(Duration::from_millis(400), rx.recv())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_server_times_out_without_delaying_others() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let (healthy, _server) = tcp_server().await;

    let (prober, mut rx, _shutdown) = prober();
    let slow = |kind| ProbeSpec {
        timeout: Duration::from_millis(100),
        ..spec(kind, 100, 2, 1)
    };
    let started = Instant::now();
    prober.upsert("http".to_owned(), target(hanging, slow(http("/", None))));
    prober.upsert("grpc".to_owned(), target(hanging, slow(grpc(""))));
    prober.upsert(
        "tcp".to_owned(),
        target(healthy, spec(ProbeKind::Tcp, 100, 2, 1)),
    );

    let first = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!((first.id.as_str(), first.health), ("tcp", Health::Healthy));
    // (The hanging targets cannot decide before two 100 ms timeouts.)

    let seen = changes_by_id(&mut rx, 2).await;
    for id in ["http", "grpc"] {
        assert_eq!(seen[id].health, Health::Unhealthy);
        assert!(
            seen[id].detail.ends_with("timed out after 100ms"),
            "{}",
            seen[id].detail
        );
    }
    // Two timed-out probes, one interval apart.
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_serving_status() {
    use tonic_health::ServingStatus as Reported;

    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("strata.Test", Reported::Serving)
        .await;
    // Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to some
    // answers, a good part of the timeout used here.
    let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
        .unwrap()
        .with_nodelay(Some(true));
    let address = incoming.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );

    let (prober, mut rx, _shutdown) = prober();
    for (id, service) in [("svc", "strata.Test"), ("server", ""), ("unknown", "nope")] {
        prober.upsert(
            id.to_owned(),
            target(address, spec(grpc(service), 250, 2, 1)),
        );
    }
    let seen = changes_by_id(&mut rx, 3).await;
    assert_eq!(seen["svc"].health, Health::Healthy, "{:?}", seen["svc"]);
    assert_eq!(seen["server"].health, Health::Healthy);
    assert_eq!(seen["unknown"].health, Health::Unhealthy);
    assert!(
        seen["unknown"].detail.contains("NotFound"),
        "{}",
        seen["unknown"].detail
    );

    reporter
        .set_service_status("strata.Test", Reported::NotServing)
        .await;
    let change = next_change(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        (change.id.as_str(), change.health),
        ("svc", Health::Unhealthy)
    );
    assert!(
        change.detail.ends_with("status NOT_SERVING"),
        "{}",
        change.detail
    );

    reporter
        .set_service_status("strata.Test", Reported::Serving)
        .await;
    let change = next_change(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        (change.id.as_str(), change.health),
        ("svc", Health::Healthy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_adds_removes_and_changes_targets() {
    let (prober, mut rx, _shutdown) = prober();
    let (up, _server) = tcp_server().await;
    let (other, other_server) = tcp_server().await;
    let tcp = |address, interval| target(address, spec(ProbeKind::Tcp, interval, 2, 1));

    let all = HashMap::from([
        ("a".to_owned(), tcp(up, 50)),
        ("b".to_owned(), tcp(other, 50)),
    ]);
    prober.reconcile(all);
    let seen = changes_by_id(&mut rx, 2).await;
    assert!(seen.values().all(|c| c.health == Health::Healthy));

    // Remove b, add c; b's server going away must not be reported.
    prober.reconcile(HashMap::from([
        ("a".to_owned(), tcp(up, 50)),
        ("c".to_owned(), tcp(up, 50)),
    ]));
    assert_eq!(prober.health(&"b".to_owned()), None);
    assert_eq!(prober.len(), 2);
    stop(other_server).await;
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!((change.id.as_str(), change.health), ("c", Health::Healthy));

    // Any change of the target starts over from unknown, even one of
    // timing only: the registry drops its verdict on any check change.
    prober.reconcile(HashMap::from([
        ("a".to_owned(), tcp(up, 60)),
        ("c".to_owned(), tcp(up, 50)),
    ]));
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (change.id.as_str(), change.previous, change.health),
        ("a", Health::Healthy, Health::Unknown)
    );
    assert_eq!(change.target, tcp(up, 60));
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (change.id.as_str(), change.previous, change.health),
        ("a", Health::Unknown, Health::Healthy)
    );
    // The same set again changes nothing.
    prober.reconcile(HashMap::from([
        ("a".to_owned(), tcp(up, 60)),
        ("c".to_owned(), tcp(up, 50)),
    ]));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "no change expected"
    );

    // A new address: unknown, then what the new address says.
    let dead = dead_address().await;
    prober.reconcile(HashMap::from([
        ("a".to_owned(), tcp(dead, 60)),
        ("c".to_owned(), tcp(up, 50)),
    ]));
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (change.id.as_str(), change.previous, change.health),
        ("a", Health::Healthy, Health::Unknown)
    );
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (change.id.as_str(), change.previous, change.health),
        ("a", Health::Unknown, Health::Unhealthy)
    );

    assert!(prober.remove(&"a".to_owned()));
    assert!(!prober.remove(&"a".to_owned()));
    prober.reconcile(HashMap::new());
    assert!(prober.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_probes_new_and_changed_targets_at_once() {
    let (prober, mut rx, _shutdown) = prober();
    let (address, _server) = tcp_server().await;
    let id = "slow-interval".to_owned();
    // Intervals far longer than the test: only an immediate first probe
    // can decide in time.
    let long = |secs: u64| ProbeSpec {
        timeout: Duration::from_secs(1),
        ..spec(ProbeKind::Tcp, secs * 1000, 3, 1)
    };
    prober.upsert(id.clone(), target(address, long(60)));
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(change.health, Health::Healthy);

    prober.upsert(id.clone(), target(address, long(120)));
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(change.health, Health::Unknown);
    let change = next_change(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(change.health, Health::Healthy);
    assert_eq!(change.target, target(address, long(120)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_targets_keep_schedule_and_counters() {
    let (prober, mut rx, _shutdown) = prober();
    let dead = dead_address().await;
    let targets = HashMap::from([(
        "dead".to_owned(),
        target(dead, spec(ProbeKind::Tcp, 50, 3, 1)),
    )]);
    // Re-reconciling more often than the interval: if that restarted the
    // target, three failures in a row would never be counted.
    let deadline = Instant::now() + Duration::from_secs(2);
    let change = loop {
        prober.reconcile(targets.clone());
        if let Ok(change) = rx.try_recv() {
            break change;
        }
        assert!(Instant::now() < deadline, "never turned unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(change.health, Health::Unhealthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_cancelling_stops_every_task() {
    for cancel in [false, true] {
        let (prober, mut rx, shutdown) = prober();
        let (address, _server) = tcp_server().await;
        let targets = (0..50)
            .map(|i| {
                (
                    format!("t{i}"),
                    target(address, spec(ProbeKind::Tcp, 50, MAX_THRESHOLD, 1)),
                )
            })
            .collect();
        prober.reconcile(targets);
        changes_by_id(&mut rx, 50).await;

        // Every task holds a sender (dropped with its probe in flight),
        // the prober one more.
        let tasks_left = if cancel {
            shutdown.cancel();
            1
        } else {
            drop(prober);
            0
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while rx.sender_strong_count() > tasks_left {
            assert!(
                Instant::now() < deadline,
                "tasks still running (cancel={cancel})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_ten_thousand_targets_is_cheap() {
    let (prober, _rx, _shutdown) = prober();
    // An hour-long interval: the first probes are spread over the hour,
    // so this measures bookkeeping, not probing.
    let targets: HashMap<String, ProbeTarget> = (0..10_000)
        .map(|i| {
            let t = target("127.0.0.1:9", spec(ProbeKind::Tcp, 3_600_000, 3, 1));
            (format!("project/tenant/svc/{i}"), t)
        })
        .collect();

    let started = std::time::Instant::now();
    prober.reconcile(targets.clone());
    let first = started.elapsed();
    assert_eq!(prober.len(), 10_000);

    let started = std::time::Instant::now();
    prober.reconcile(targets);
    let again = started.elapsed();
    assert_eq!(
        prober.health(&"project/tenant/svc/7".to_owned()),
        Some(Health::Unknown)
    );

    let started = std::time::Instant::now();
    prober.reconcile(HashMap::new());
    let cleared = started.elapsed();
    assert!(prober.is_empty());
    eprintln!("10k targets: added {first:?}, unchanged {again:?}, cleared {cleared:?}");
    // Generous bounds (debug build, loaded machine; typical figures are
    // tens of milliseconds) that still catch quadratic work.
    assert!(
        first < Duration::from_secs(10)
            && again < Duration::from_secs(5)
            && cleared < Duration::from_secs(5),
        "first {first:?}, unchanged {again:?}, cleared {cleared:?}"
    );
}

/// A UDP server answering every datagram with `reply`.
async fn udp_server(reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0_u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(reply, from).await;
        }
    });
    (address, task)
}

fn udp(send: &[u8], expect: crate::domain::registry::UdpExpect) -> ProbeKind {
    ProbeKind::Udp {
        send: send.to_vec(),
        expect,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_targets_are_healthy_only_when_the_reply_matches() {
    use crate::domain::registry::UdpExpect;
    let (prober, mut rx, _shutdown) = prober();
    let (right, _right_server) = udp_server(b"pong v1").await;
    let (wrong, _wrong_server) = udp_server(b"nope").await;
    let (silent, silent_server) = udp_server(b"").await;
    stop(silent_server).await;
    let kinds = [
        (
            "bytes-right",
            right,
            udp(b"ping", UdpExpect::Bytes(b"pong v1".to_vec())),
        ),
        (
            "regex-right",
            right,
            udp(b"ping", UdpExpect::Regex("^pong v[0-9]+$".into())),
        ),
        ("any-right", right, udp(b"ping", UdpExpect::Any)),
        (
            "bytes-wrong",
            wrong,
            udp(b"ping", UdpExpect::Bytes(b"pong v1".to_vec())),
        ),
        (
            "regex-wrong",
            wrong,
            udp(b"ping", UdpExpect::Regex("^pong".into())),
        ),
        ("silent", silent, udp(b"ping", UdpExpect::Any)),
    ];
    for (id, address, kind) in kinds {
        let mut spec = spec(kind, 50, 2, 1);
        spec.timeout = Duration::from_millis(40);
        prober.upsert(id.to_owned(), target(address, spec));
    }
    let changes = changes_by_id(&mut rx, 6).await;
    for (id, want) in [
        ("bytes-right", Health::Healthy),
        ("regex-right", Health::Healthy),
        ("any-right", Health::Healthy),
        ("bytes-wrong", Health::Unhealthy),
        ("regex-wrong", Health::Unhealthy),
        ("silent", Health::Unhealthy),
    ] {
        assert_eq!(changes[id].health, want, "{id}: {:?}", changes[id]);
    }
    assert!(
        changes["bytes-wrong"].detail.contains("does not match"),
        "{}",
        changes["bytes-wrong"].detail
    );
}

#[test]
fn udp_specs_are_bounded() {
    use crate::domain::registry::UdpExpect;
    assert!(
        spec(udp(b"", UdpExpect::Any), 100, 1, 1)
            .validate()
            .is_err()
    );
    assert!(
        spec(udp(&[0; 1201], UdpExpect::Any), 100, 1, 1)
            .validate()
            .is_err()
    );
    assert!(
        spec(udp(b"ping", UdpExpect::Any), 100, 1, 1)
            .validate()
            .is_ok()
    );
}
