//! TLS end to end, with a test CA generated here: `stratad --tls-cert
//! --tls-key` serves gRPC and HTTP/JSON on its one port over TLS, and the
//! CLI, the SDK, the sidecar and a plain HTTPS client (as `curl --cacert`)
//! reach it with the CA file; with `--tls-client-ca` only clients holding a
//! certificate from that CA get through the handshake.
//!
//! What an operator relies on: nothing talks to a TLS daemon without
//! trusting its CA (plaintext clients and clients trusting another CA are
//! refused); health checks work over TLS; a bad certificate or key stops
//! the daemon at startup with one line and exit 64; SIGHUP picks up a
//! renewed certificate without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use strata_client::{Client, TlsConfig};
use strata_tests::sidecar::Sidecar;
use strata_tests::{Daemon, run_stratad};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PROJECT: &str = "vega";

/// A test PKI in a temporary directory: the cluster's CA with a server
/// certificate (for `localhost` and `127.0.0.1`) and a client certificate,
/// and an unrelated CA with its own server and client certificates.
struct Pki {
    dir: TempDir,
}

/// A new CA, self-signed.
fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn new_leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).unwrap();
        for (prefix, ca_name) in [("", "Strata test CA"), ("other-", "Unrelated CA")] {
            let ca = new_ca(ca_name);
            write(&format!("{prefix}ca.pem"), &ca.pem());
            let (cert, key) = new_leaf(
                &ca,
                "stratad",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            write(&format!("{prefix}server.pem"), &cert);
            write(&format!("{prefix}server.key"), &key);
            let (cert, key) = new_leaf(
                &ca,
                "game-server-42",
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            write(&format!("{prefix}client.pem"), &cert);
            write(&format!("{prefix}client.key"), &key);
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }
}

/// A rustls client configuration: trusts the CA in `ca`, presents
/// `identity` (certificate, key files) when given, offers HTTP/1.1 like
/// `curl --http1.1`.
fn https_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTP/1.1 request over TLS to `addr` (verified as `localhost`):
/// (status, body), or why the connection failed.
async fn https(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = sender
            .send_request(
                request
                    .body(Full::new(Bytes::from(body.to_owned())))
                    .unwrap(),
            )
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// A request that must succeed with a 2xx status; returns the body.
async fn https_ok(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> String {
    let (status, answer) = https(addr, config, method, path, token, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {answer}"
    );
    answer
}

/// Starts `stratad` with TLS (`args` add to `--tls-cert`/`--tls-key`) and
/// waits until `/readyz` answers 200 over TLS.
async fn start_tls_daemon(pki: &Pki, args: &[String]) -> Daemon {
    let daemon = Daemon::builder()
        .args([
            "--tls-cert".to_owned(),
            pki.s("server.pem"),
            "--tls-key".to_owned(),
            pki.s("server.key"),
        ])
        .args(args.iter().cloned())
        .spawn();
    let config = https_config(
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = https(daemon.addr, &config, "GET", "/readyz", None, "").await {
            return daemon;
        }
        assert!(
            Instant::now() < deadline,
            "stratad not ready over TLS within 20 s; stderr:\n{}",
            daemon.stderr()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the CLI with `args` after `--endpoints endpoint`, with only `env`
/// in its environment: (exit code, stdout, stderr).
async fn cli(endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut all = vec!["--project", PROJECT, "--timeout", "3s"];
    all.extend_from_slice(args);
    strata_tests::strata_at(endpoint, env, &all).await
}

/// An SDK client for `tenant` over `tls`, quick to give up.
fn sdk(endpoint: &str, tls: TlsConfig, token: &str) -> Client {
    Client::builder()
        .endpoints([endpoint])
        .project(PROJECT)
        .tenant("integration")
        .tls(tls)
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(3))
        .startup_timeout(Duration::from_secs(2))
        .token(token)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sdk_and_https_clients_work_over_tls_and_untrusting_clients_are_refused() {
    let pki = Pki::new();
    let daemon = start_tls_daemon(&pki, &[]).await;
    let token = daemon.admin_token();
    let https_endpoint = format!("https://{}", daemon.addr);
    let ca = pki.s("ca.pem");
    let env = vec![("STRATA_TLS_CA", ca.as_str()), ("STRATA_TOKEN", &token)];

    // The CLI with the CA (from STRATA_TLS_CA) over https://.
    let (code, out, err) = cli(&https_endpoint, &["tenant", "create", "integration"], &env).await;
    assert_eq!(code, 0, "tenant create over TLS: {out}{err}");
    let (code, out, err) = cli(
        &https_endpoint,
        &[
            "config",
            "put",
            "integration",
            "game/settings.json",
            "--value",
            r#"{"max_players":16}"#,
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "config put over TLS: {out}{err}");
    // `host:port` with a CA means https://; the flag works like the env.
    let mut flag_env: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "STRATA_TLS_CA")
        .collect();
    let (code, out, err) = cli(
        &daemon.addr.to_string(),
        &[
            "--tls-ca",
            &ca,
            "config",
            "get",
            "integration",
            "game/settings.json",
        ],
        &flag_env,
    )
    .await;
    assert_eq!(code, 0, "config get with --tls-ca: {out}{err}");
    assert!(out.contains("16"), "{out}");

    // Refused: no CA (the system's roots do not know the test CA), a CA
    // that did not sign the daemon's certificate, and plaintext.
    let (code, out, err) = cli(&https_endpoint, &["status"], &flag_env).await;
    assert_eq!(code, 1, "without the CA: {out}{err}");
    assert!(err.contains("certificate"), "names the problem: {err}");
    let other_ca = pki.s("other-ca.pem");
    flag_env.push(("STRATA_TLS_CA", &other_ca));
    let (code, out, err) = cli(&https_endpoint, &["status"], &flag_env).await;
    assert_eq!(code, 1, "trusting another CA: {out}{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    let plain_endpoint = format!("http://{}", daemon.addr);
    // With a CA configured, an http:// endpoint is refused before dialling
    // (security review, finding 10; docs/security.md): it would carry the token in clear.
    let (code, out, err) = cli(&plain_endpoint, &["status"], &env).await;
    assert_eq!(code, 2, "http:// next to --tls-ca: {out}{err}");
    assert!(err.contains("--allow-plaintext"), "{err}");
    let plain_env = [("STRATA_TOKEN", token.as_str())];
    let (code, out, err) = cli(&plain_endpoint, &["status"], &plain_env).await;
    assert_eq!(code, 1, "plaintext to a TLS port: {out}{err}");

    // The SDK reads and follows a key over TLS.
    let client = sdk(
        &https_endpoint,
        TlsConfig::new().ca_file(pki.path("ca.pem")).unwrap(),
        &token,
    );
    let settings = client
        .watch::<serde_json::Value>("game/settings.json")
        .await
        .expect("SDK watch over TLS");
    assert_eq!(settings.get()["max_players"], 16);
    let mut changes = settings.changes();
    let config = https_config(&pki.path("ca.pem"), None);
    https_ok(
        daemon.addr,
        &config,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration/config/game/settings.json"),
        Some(&token),
        r#"{"max_players":32}"#,
    )
    .await;
    timeout(Duration::from_secs(10), async {
        while changes.borrow_and_update()["max_players"] != 32 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the SDK sees the HTTP write within 10 s");

    // An SDK client trusting another CA gets nothing.
    let untrusting = sdk(
        &https_endpoint,
        TlsConfig::new().ca_file(pki.path("other-ca.pem")).unwrap(),
        &token,
    );
    let refused = untrusting
        .watch::<serde_json::Value>("game/settings.json")
        .await;
    assert!(refused.is_err(), "{:?}", refused.map(|c| c.get()));

    // HTTP/JSON and the health endpoints over TLS, as `curl --cacert`.
    for path in ["/healthz", "/readyz"] {
        let (status, _) = https(daemon.addr, &config, "GET", path, None, "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{path} over TLS");
    }
    let value = https_ok(
        daemon.addr,
        &config,
        "GET",
        &format!("/v1/projects/{PROJECT}/tenants/integration/config/game/settings.json"),
        Some(&token),
        "",
    )
    .await;
    assert_eq!(value, r#"{"max_players":32}"#);
    let other = https_config(&pki.path("other-ca.pem"), None);
    let refused = https(daemon.addr, &other, "GET", "/healthz", None, "").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("TLS handshake")),
        "{refused:?}"
    );
    // A plaintext HTTP client is told how to connect, and served nothing.
    let (status, body) = strata_tests::http_get(daemon.addr, "/healthz")
        .await
        .expect("plaintext clients get an answer");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("https://") && body.contains("--cacert"),
        "{body}"
    );

    // A plaintext HTTP/2 client (gRPC over http://) gets SETTINGS, then a
    // GOAWAY (type 7) with INADEQUATE_SECURITY (12) and the same advice.
    let mut tcp = TcpStream::connect(daemon.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the refusal ends the connection")
        .unwrap();
    assert!(answer.len() > 26, "{answer:?}");
    assert_eq!((answer[3], answer[9 + 3]), (0x4, 0x7), "{answer:?}");
    assert_eq!(answer[9 + 9 + 4..9 + 9 + 8], [0, 0, 0, 12]);
    assert!(String::from_utf8_lossy(&answer).contains("https://"));

    // Every refused client was counted.
    let metrics = https_ok(daemon.addr, &config, "GET", "/metrics", None, "").await;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("strata_tls_handshake_failures_total "))
        .unwrap_or_else(|| panic!("no handshake failure counter in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    // The CLI without the CA, trusting another CA and in plaintext, the
    // SDK trusting another CA, HTTPS trusting another CA, plain HTTP/1 and
    // HTTP/2.
    assert!(failures >= 7.0, "{failures} handshake failures counted");

    // gRPC health over TLS.
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
        std::fs::read(pki.path("ca.pem")).unwrap(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(https_endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("gRPC channel over TLS");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("gRPC health over TLS")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_holding_its_certificates_get_through() {
    let pki = Pki::new();
    let daemon = start_tls_daemon(&pki, &["--tls-client-ca".to_owned(), pki.s("ca.pem")]).await;
    let token = daemon.admin_token();
    let https_endpoint = format!("https://{}", daemon.addr);
    let ca = pki.s("ca.pem");
    let env = vec![("STRATA_TLS_CA", ca.as_str()), ("STRATA_TOKEN", &token)];

    // HTTP: no certificate, or one from another CA, fails the handshake.
    let anonymous = https_config(&pki.path("ca.pem"), None);
    let refused = https(daemon.addr, &anonymous, "GET", "/healthz", None, "").await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let stranger = https_config(
        &pki.path("ca.pem"),
        Some((&pki.path("other-client.pem"), &pki.path("other-client.key"))),
    );
    let refused = https(daemon.addr, &stranger, "GET", "/healthz", None, "").await;
    assert!(refused.is_err(), "certificate from another CA: {refused:?}");
    let member = https_config(
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    );
    https_ok(
        daemon.addr,
        &member,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration"),
        Some(&token),
        "{}",
    )
    .await;

    // The CLI: refused without --tls-cert/--tls-key, served with them.
    let (code, out, err) = cli(&https_endpoint, &["tenant", "list"], &env).await;
    assert_eq!(code, 1, "CLI without a client certificate: {out}{err}");
    let (cert, key) = (pki.s("client.pem"), pki.s("client.key"));
    let (code, out, err) = cli(
        &https_endpoint,
        &["--tls-cert", &cert, "--tls-key", &key, "tenant", "list"],
        &env,
    )
    .await;
    assert_eq!(code, 0, "CLI with a client certificate: {out}{err}");
    assert!(out.contains("integration"), "{out}");
    let mut cert_env = env.clone();
    cert_env.extend([
        ("STRATA_TLS_CLIENT_CERT", cert.as_str()),
        ("STRATA_TLS_CLIENT_KEY", key.as_str()),
    ]);
    let (code, out, err) = cli(
        &https_endpoint,
        &[
            "config",
            "put",
            "integration",
            "motd.txt",
            "--value",
            "hello",
        ],
        &cert_env,
    )
    .await;
    assert_eq!(code, 0, "certificate from the environment: {out}{err}");
    let (code, out, err) = cli(&https_endpoint, &["--tls-cert", &cert, "status"], &env).await;
    assert_eq!(
        code, 2,
        "a certificate without its key is a usage error: {out}{err}"
    );

    // The SDK: refused without an identity, served with one.
    let ca_only = TlsConfig::new().ca_file(pki.path("ca.pem")).unwrap();
    let refused = sdk(&https_endpoint, ca_only.clone(), &token)
        .watch::<String>("motd.txt")
        .await;
    assert!(refused.is_err(), "SDK without a client certificate");
    let with_identity = ca_only
        .identity_files(pki.path("client.pem"), pki.path("client.key"))
        .unwrap();
    let motd = sdk(&https_endpoint, with_identity, &token)
        .watch::<String>("motd.txt")
        .await
        .expect("SDK with a client certificate");
    assert_eq!(motd.get().as_str(), "hello");
}

/// A test HTTP service answering with its name.
async fn http_app(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// One HTTP/1.1 GET through the sidecar's outbound proxy for `service`.
async fn through_sidecar(proxy: SocketAddr, service: &str) -> Result<(u16, String), String> {
    let stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::get("/")
        .header("host", service)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_a_tls_daemon_and_routes() {
    let pki = Pki::new();
    // Mutual TLS, so the sidecar's CA and client certificate both matter.
    let daemon = start_tls_daemon(&pki, &["--tls-client-ca".to_owned(), pki.s("ca.pem")]).await;
    let token = daemon.admin_token();
    let member = https_config(
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    );
    let (app, app_task) = http_app("integration.matchmaker").await;
    https_ok(
        daemon.addr,
        &member,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration"),
        Some(&token),
        "{}",
    )
    .await;
    https_ok(
        daemon.addr,
        &member,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/integration/services/matchmaker/instances"),
        Some(&token),
        &format!(
            r#"{{"id":"mm-1","endpoints":{{"main":"{app}"}},"protocol":"http","kind":"persistent"}}"#
        ),
    )
    .await;

    let (ca, cert, key) = (pki.s("ca.pem"), pki.s("client.pem"), pki.s("client.key"));
    let mut extra = vec!["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let token_file = daemon.admin_token_file.to_str().unwrap();
    extra.extend(["--token-file", token_file]);
    let sidecar = Sidecar::start(
        &format!("https://{}", daemon.addr),
        PROJECT,
        "integration",
        &[],
        &extra,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match through_sidecar(sidecar.outbound, "matchmaker").await {
            Ok((200, body)) => {
                assert_eq!(body, "integration.matchmaker");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "no route through the sidecar within 10 s: {other:?}; sidecar stderr:\n{}",
                sidecar.stderr()
            ),
        }
        sleep(Duration::from_millis(50)).await;
    }
    app_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_stratad_with_one_line_and_exit_64() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let data = data.to_str().unwrap();
    let (cert, key, other_key) = (
        pki.s("server.pem"),
        pki.s("server.key"),
        pki.s("other-server.key"),
    );
    let garbage = garbage.to_str().unwrap();
    let base = ["--listen", "127.0.0.1:0", "--data-dir", data];
    // (flags, environment, what the one line must contain)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a [&'a str]);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--tls-cert", "/nonexistent/server.pem", "--tls-key", &key],
            vec![],
            &["tls.cert", "--tls-cert", "/nonexistent/server.pem"],
        ),
        (
            vec!["--tls-cert", garbage, "--tls-key", &key],
            vec![],
            &["tls.cert", "no certificate"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", garbage],
            vec![],
            &["tls.key", "private key"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            vec![],
            &["tls.key", "does not belong"],
        ),
        (vec!["--tls-cert", &cert], vec![], &["tls.key", "--tls-key"]),
        (
            vec![],
            vec![("STRATA_TLS_CLIENT_CA", key.as_str())],
            &["tls.client_ca", "STRATA_TLS_CLIENT_CA"],
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                garbage,
            ],
            vec![],
            &["tls.client_ca", "no certificate"],
        ),
    ];
    for (args, env, expected) in cases {
        let mut all = base.to_vec();
        all.extend(&args);
        let (status, stderr) = run_stratad(&all, &env).await;
        assert_eq!(status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        for needle in expected {
            assert!(stderr.contains(needle), "{args:?}: {needle:?} in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_renewed_certificate_for_new_connections() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(pki.path("server.pem"), &cert).unwrap();
    std::fs::copy(pki.path("server.key"), &key).unwrap();
    let mut daemon = Daemon::builder()
        .args([
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .spawn();
    let first = https_config(&pki.path("ca.pem"), None);
    let second = https_config(&pki.path("other-ca.pem"), None);
    let ready = |config: Arc<rustls::ClientConfig>, addr: SocketAddr| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = https(addr, &config, "GET", "/readyz", None, "").await {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        ready(Arc::clone(&first), daemon.addr).await,
        "{}",
        daemon.stderr()
    );

    // A broken file on SIGHUP keeps the current certificate.
    std::fs::write(&cert, "truncated").unwrap();
    daemon.signal(Signal::SIGHUP);
    sleep(Duration::from_millis(300)).await;
    https_ok(daemon.addr, &first, "GET", "/healthz", None, "").await;

    // The renewed certificate (here: from another CA) serves the next
    // connections once SIGHUP arrives.
    std::fs::copy(pki.path("other-server.pem"), &cert).unwrap();
    std::fs::copy(pki.path("other-server.key"), &key).unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        ready(Arc::clone(&second), daemon.addr).await,
        "renewed certificate not served; stderr:\n{}",
        daemon.stderr()
    );
    let old = https(daemon.addr, &first, "GET", "/healthz", None, "").await;
    assert!(old.is_err(), "the old CA no longer verifies: {old:?}");
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("TLS files not reloaded") && stderr.contains("TLS certificate reloaded"),
        "{stderr}"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).await.success());
}

/// The `- name: X` / `value: Y` environment pairs and the `mountPath`s of
/// the first manifest of `kind` in a rendered chart.
fn rendered_env_and_mounts(rendered: &str, kind: &str) -> (Vec<(String, String)>, Vec<String>) {
    let doc = rendered
        .split("\n---\n")
        .find(|d| d.contains(&format!("\nkind: {kind}\n")))
        .unwrap_or_else(|| panic!("no {kind} in the render"));
    let lines: Vec<&str> = doc.lines().map(str::trim).collect();
    let mut env = Vec::new();
    let mut mounts = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("- name: ")
            && let Some(value) = lines.get(i + 1).and_then(|l| l.strip_prefix("value: "))
        {
            env.push((name.to_owned(), value.trim_matches('"').to_owned()));
        }
        if let Some(path) = line.strip_prefix("mountPath: ") {
            mounts.push(path.to_owned());
        }
    }
    (env, mounts)
}

/// Issue 16, finding 10's deploy gap: the chart's TLS values
/// (`deploy/helm/rendered/tls.yaml`: TLS with mutual TLS) give `stratad` and
/// the chart's clients settings the real binaries accept. The Secrets'
/// files are laid out under a temporary root as Kubernetes mounts them;
/// `stratad` starts with the StatefulSet's environment, and the CLI with the
/// backup CronJob's reaches it over mutual TLS (and is refused without the
/// client certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_tls_render_serves_mutual_tls_to_its_clients_finding_10() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rendered = std::fs::read_to_string(root.join("deploy/helm/rendered/tls.yaml")).unwrap();
    let pki = Pki::new();
    let fs = tempfile::tempdir().unwrap();
    // Each Secret's keys as files in its mount directory.
    let secrets = [
        ("/etc/strata/tls/tls.crt", "server.pem"),
        ("/etc/strata/tls/tls.key", "server.key"),
        ("/etc/strata/tls-client-ca/ca.crt", "ca.pem"),
        ("/etc/strata/tls-ca/ca.crt", "ca.pem"),
        ("/etc/strata/tls-client/tls.crt", "client.pem"),
        ("/etc/strata/tls-client/tls.key", "client.key"),
    ];
    let local = |path: &str| fs.path().join(path.trim_start_matches('/'));
    for (mounted, source) in secrets {
        std::fs::create_dir_all(local(mounted).parent().unwrap()).unwrap();
        std::fs::copy(pki.path(source), local(mounted)).unwrap();
    }
    // Every TLS path a container is given is under one of its mounts.
    let check_paths = |kind: &str, env: &[(String, String)], mounts: &[String]| {
        let tls: Vec<_> = env
            .iter()
            .filter(|(k, _)| k.starts_with("STRATA_TLS_"))
            .collect();
        assert!(!tls.is_empty(), "{kind}: no STRATA_TLS_* settings");
        for (key, value) in tls {
            let dir = Path::new(value).parent().unwrap().to_str().unwrap();
            assert!(
                mounts.iter().any(|m| m == dir),
                "{kind}: {key}={value} is not under a mount ({mounts:?})"
            );
            assert!(
                local(value).exists(),
                "{kind}: {key}={value}: no such Secret key"
            );
        }
    };

    let (stratad_env, stratad_mounts) = rendered_env_and_mounts(&rendered, "StatefulSet");
    check_paths("StatefulSet", &stratad_env, &stratad_mounts);
    let mut builder = Daemon::builder();
    for (key, value) in &stratad_env {
        let value = if key.starts_with("STRATA_TLS_") {
            local(value).to_str().unwrap().to_owned()
        } else {
            value.clone()
        };
        builder = builder.env(key, &value);
    }
    let daemon = builder.spawn();
    let config = https_config(
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        https(daemon.addr, &config, "GET", "/readyz", None, "").await,
        Ok((200, _))
    ) {
        assert!(
            Instant::now() < deadline,
            "stratad with the chart's TLS environment not ready over mutual TLS; stderr:\n{}",
            daemon.stderr()
        );
        sleep(Duration::from_millis(50)).await;
    }

    let (backup_env, backup_mounts) = rendered_env_and_mounts(&rendered, "CronJob");
    check_paths("CronJob", &backup_env, &backup_mounts);
    let endpoint = backup_env
        .iter()
        .find(|(k, _)| k == "STRATA_ENDPOINTS")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let here = format!("https://localhost:{}", daemon.addr.port());
    let token = daemon.admin_token();
    let mut env: Vec<(String, String)> = backup_env
        .iter()
        .filter(|(k, _)| k.starts_with("STRATA_TLS_"))
        .map(|(k, v)| (k.clone(), local(v).to_str().unwrap().to_owned()))
        .collect();
    env.push(("STRATA_TOKEN".into(), token));
    let run = |env: Vec<(String, String)>| {
        let here = here.clone();
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            strata_tests::strata_at(&here, &env, &["status"]).await
        }
    };
    let (code, out, err) = run(env.clone()).await;
    assert_eq!(code, 0, "the backup job's TLS settings: {out}{err}");
    let without_client_cert: Vec<_> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("STRATA_TLS_CLIENT_"))
        .cloned()
        .collect();
    let (code, out, err) = run(without_client_cert).await;
    assert_eq!(code, 1, "mutual TLS is enforced: {out}{err}");
}
