//! TLS for the daemon's one listener (`tls.cert`, `tls.key`,
//! `tls.client_ca`): rustls with the `ring` provider, so gRPC and HTTP/JSON
//! keep sharing one port, each connection first completing a TLS handshake.
//!
//! - [`ServerTls`] loads the PEM files into a `rustls::ServerConfig` (a bad
//!   file is a [`TlsError`] naming the setting, which `stratad` reports as a
//!   configuration error) and can [reload](ServerTls::reload) them later, on
//!   SIGHUP: new connections get the new certificate, open ones keep theirs.
//! - [`TlsListener`] wraps the plain listener. Its accept returns at once
//!   with a [`TlsIo`] that completes the handshake when the connection is
//!   first read or written, in the connection's own task: a client that
//!   stalls mid-handshake holds only its own connection, never the accept
//!   loop, and is dropped after [`HANDSHAKE_TIMEOUT`].
//! - With `tls.client_ca`, every client must present a certificate signed by
//!   that CA (mutual TLS); one without is refused during the handshake.
//!
//! ALPN offers `h2` and `http/1.1`: gRPC clients (tonic insists on `h2`)
//! and HTTP/1.1 clients such as `curl --cacert ca.pem https://…` share the
//! port as they do without TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest time a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files TLS is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the daemon's own certificate first (`tls.cert`).
    pub cert: PathBuf,
    /// PEM private key of that certificate: PKCS#8, PKCS#1 or SEC1 (`tls.key`).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to
    /// (`tls.client_ca`); `None`: clients are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that cannot be used: which setting, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsError {
    /// The setting whose file is wrong (`tls.cert`, `tls.key`, `tls.client_ca`).
    pub setting: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

impl TlsError {
    fn new(setting: &'static str, message: String) -> Self {
        Self { setting, message }
    }
}

/// The daemon's TLS settings, loaded; clones share the current
/// configuration, so a [reload](Self::reload) reaches the listener.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<ArcSwap<rustls::ServerConfig>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Two loaded settings are the same when they name the same files.
impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// Reads and checks the certificate, key and client CA files.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: Arc::new(ArcSwap::from_pointee(config)),
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again and uses them for the next handshakes. On
    /// error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// Reloads on every SIGHUP (certificate rotation without a restart),
    /// logging the outcome. Runs for the life of the process.
    pub async fn reload_on_sighup(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install a SIGHUP handler; TLS certificates reload only on restart");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            match self.reload() {
                Ok(()) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS files not reloaded, the previous certificate stays in use"
                ),
            }
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// The crypto provider every TLS configuration of the daemon uses. Named
/// explicitly, so nothing depends on a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::new(setting, format!("cannot read {}: {e}", path.display())))
}

/// Every certificate in a PEM file; none is an error.
fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(setting, format!("{}: not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            setting,
            format!(
                "{}: no certificate (no \"BEGIN CERTIFICATE\" block) found",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Builds the rustls configuration from the files.
fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates("tls.cert", &files.cert)?;
    let key_pem = read("tls.key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError::new(
            "tls.key",
            format!(
                "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                files.key.display()
            ),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("tls.cert", format!("TLS setup failed: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls.client_ca", path)? {
                roots.add(cert).map_err(|e| {
                    TlsError::new(
                        "tls.client_ca",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| {
                    TlsError::new(
                        "tls.client_ca",
                        format!("{}: cannot verify clients with it: {e}", path.display()),
                    )
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let message = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                files.key.display(),
                files.cert.display()
            ),
            other => format!(
                "{} and {} cannot be used together: {other}",
                files.cert.display(),
                files.key.display()
            ),
        };
        TlsError::new("tls.key", message)
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A listener whose connections speak TLS: see the [module docs](self).
pub struct TlsListener<L> {
    inner: L,
    tls: ServerTls,
}

impl<L> TlsListener<L> {
    /// Wraps `inner`; every connection it accepts is served over `tls`.
    pub fn new(inner: L, tls: ServerTls) -> Self {
        Self { inner, tls }
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = TlsIo<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (TlsIo::new(self.tls.acceptor().accept(io), addr), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A server-side TLS connection whose handshake runs on first use.
pub struct TlsIo<IO> {
    state: State<IO>,
    peer: SocketAddr,
}

enum State<IO> {
    Handshaking {
        accept: tokio_rustls::Accept<IO>,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Ready(Box<tokio_rustls::server::TlsStream<IO>>),
    Failed,
}

impl<IO> TlsIo<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn new(accept: tokio_rustls::Accept<IO>, peer: SocketAddr) -> Self {
        Self {
            state: State::Handshaking {
                accept,
                deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            },
            peer,
        }
    }

    /// Drives the handshake; `Ready(Ok)` once the stream can carry data.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = match &mut self.state {
            State::Ready(_) => return Poll::Ready(Ok(())),
            State::Failed => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS handshake failed",
                )));
            }
            State::Handshaking { accept, deadline } => match Pin::new(accept).poll(cx) {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                    ))
                }
            },
        };
        match outcome {
            Ok(stream) => {
                self.state = State::Ready(Box::new(stream));
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                self.state = State::Failed;
                // Scanners and misconfigured clients cause these; they are
                // the client's problem, so not logged above debug.
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                metrics::counter!("strata_tls_handshake_failures_total").increment(1);
                Poll::Ready(Err(e))
            }
        }
    }

    /// The TLS stream, once the handshake completed.
    fn poll_stream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Pin<&mut tokio_rustls::server::TlsStream<IO>>>> {
        std::task::ready!(self.poll_handshake(cx))?;
        Poll::Ready(match &mut self.state {
            State::Ready(stream) => Ok(Pin::new(stream.as_mut())),
            // poll_handshake only returns Ok once the state is Ready.
            State::Handshaking { .. } | State::Failed => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake has not completed",
            )),
        })
    }
}

impl<IO> AsyncRead for TlsIo<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.get_mut().poll_stream(cx))?.poll_read(cx, buf)
    }
}

impl<IO> AsyncWrite for TlsIo<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.get_mut().poll_stream(cx))?.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.get_mut().poll_stream(cx))?.poll_write_vectored(cx, bufs)
    }

    /// rustls takes vectored writes as they come (hyper asks once, before
    /// the handshake, so this cannot depend on it).
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.get_mut().poll_stream(cx))?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match &mut me.state {
            State::Ready(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            // Nothing was sent over TLS yet: there is nothing to close.
            State::Handshaking { .. } | State::Failed => Poll::Ready(Ok(())),
        }
    }
}
