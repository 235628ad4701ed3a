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

use crate::settings_error::{SettingsError, Sourced};

/// The `[tls]` table of the configuration file (also `--tls-cert`,
/// `--tls-key`, `--tls-client-ca` and their `STRATA_TLS_*` variables).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA that signs client certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The TLS settings from their merged values, checked together and
    /// loaded (so a bad certificate or key stops `stratad` at startup):
    /// `None` without a certificate.
    pub fn from_settings(
        cert_setting: &Sourced<Option<PathBuf>>,
        key_setting: &Sourced<Option<PathBuf>>,
        client_ca_setting: &Sourced<Option<PathBuf>>,
    ) -> Result<Option<Self>, SettingsError> {
        let (cert, key) = match (&cert_setting.value, &key_setting.value) {
            (None, None) => {
                if client_ca_setting.value.is_some() {
                    return Err(SettingsError::invalid(
                        "tls.client_ca",
                        &client_ca_setting.source,
                        "client certificates need TLS: set tls.cert and tls.key too",
                    ));
                }
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            // Named after the setting that is set, so the source is one
            // the operator wrote.
            (Some(_), None) => {
                return Err(SettingsError::invalid(
                    "tls.cert",
                    &cert_setting.source,
                    "needs its private key in tls.key (--tls-key, STRATA_TLS_KEY)",
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::invalid(
                    "tls.key",
                    &key_setting.source,
                    "needs its certificate in tls.cert (--tls-cert, STRATA_TLS_CERT)",
                ));
            }
        };
        let files = TlsFiles {
            cert,
            key,
            client_ca: client_ca_setting.value.clone(),
        };
        ServerTls::load(files).map(Some).map_err(|e| {
            let source = match e.setting {
                "tls.cert" => &cert_setting.source,
                "tls.client_ca" => &client_ca_setting.source,
                _ => &key_setting.source,
            };
            SettingsError::invalid(e.setting, source, e.message)
        })
    }
}

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
        metrics::describe_counter!(
            HANDSHAKE_FAILURES,
            "TLS handshakes on the listener that failed (untrusted or missing client \
             certificates, plaintext clients, timeouts)."
        );
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
        (TlsIo::new(io, self.tls.acceptor(), addr), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

const HANDSHAKE_FAILURES: &str = "strata_tls_handshake_failures_total";

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The message plaintext clients get.
const PLAINTEXT_MESSAGE: &str = "This port serves HTTPS: use https:// and trust the CA that \
                                 signed stratad's certificate (curl --cacert ca.pem https://...).";

/// What a plaintext HTTP/1 client (`curl http://…`) gets from the TLS
/// port instead of a silently closed connection.
static HTTP1_REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{PLAINTEXT_MESSAGE}\n",
        PLAINTEXT_MESSAGE.len() + 1
    )
    .into_bytes()
});

/// What a plaintext HTTP/2 client (gRPC over `http://`) gets: an empty
/// SETTINGS frame (clients expect one first), then GOAWAY with
/// INADEQUATE_SECURITY and the message as debug data, which clients
/// include in their error.
static H2_REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const INADEQUATE_SECURITY: u32 = 0xc;
    let frame = |kind: u8, payload: &[u8]| -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    };
    let mut goaway = Vec::new();
    goaway.extend_from_slice(&0_u32.to_be_bytes()); // last stream id: none processed
    goaway.extend_from_slice(&INADEQUATE_SECURITY.to_be_bytes());
    goaway.extend_from_slice(PLAINTEXT_MESSAGE.as_bytes());
    let mut out = frame(SETTINGS, &[]);
    out.extend(frame(GOAWAY, &goaway));
    out
});

/// A server-side connection on the TLS port. Its first bytes tell a TLS
/// client from a plaintext one; a TLS client's handshake then runs on
/// first use, a plaintext client is told to use `https://` (an HTTP/1 400
/// or an HTTP/2 GOAWAY) and closed. Both must finish within [`HANDSHAKE_TIMEOUT`].
pub struct TlsIo<IO> {
    state: State<IO>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    peer: SocketAddr,
}

enum State<IO> {
    /// Reading the first bytes: a TLS record, or plaintext (`PRI` starts
    /// the HTTP/2 preface).
    Sniffing {
        io: IO,
        acceptor: tokio_rustls::TlsAcceptor,
        seen: [u8; 3],
        len: usize,
    },
    /// Boxed: rustls' connection state is large, and idle connections
    /// should stay small.
    Handshaking(Box<tokio_rustls::Accept<Replay<IO>>>),
    Ready(Box<tokio_rustls::server::TlsStream<Replay<IO>>>),
    /// A plaintext client: sending it `refusal`, then closing.
    Refusing {
        io: IO,
        refusal: &'static [u8],
        written: usize,
    },
    Failed,
}

/// What one turn of [`TlsIo::poll_handshake`] found.
enum Step<IO> {
    /// The first bytes tell what the client speaks.
    Sniffed,
    Done(Box<tokio_rustls::server::TlsStream<Replay<IO>>>),
    Fail(io::Error),
}

impl<IO> TlsIo<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn new(io: IO, acceptor: tokio_rustls::TlsAcceptor, peer: SocketAddr) -> Self {
        Self {
            state: State::Sniffing {
                io,
                acceptor,
                seen: [0; 3],
                len: 0,
            },
            deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            peer,
        }
    }

    /// Ends the connection with `error`, counted and logged.
    fn fail(&mut self, error: io::Error) -> io::Error {
        self.state = State::Failed;
        // Scanners and misconfigured clients cause these; they are the
        // client's problem, so not logged above debug.
        tracing::debug!(peer = %self.peer, error = %error, "TLS handshake failed");
        metrics::counter!(HANDSHAKE_FAILURES).increment(1);
        error
    }

    /// Drives the connection to an established TLS stream; `Ready(Ok)`
    /// once it can carry data.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.state {
                State::Ready(_) => return Poll::Ready(Ok(())),
                State::Failed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the TLS handshake failed",
                    )));
                }
                _ => {}
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                let timeout = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                );
                return Poll::Ready(Err(self.fail(timeout)));
            }
            let step = match &mut self.state {
                State::Sniffing { io, seen, len, .. } => {
                    let mut buf = ReadBuf::new(&mut seen[*len..]);
                    match Pin::new(io).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => Step::Fail(e),
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            Step::Fail(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "closed before the TLS handshake",
                            ))
                        }
                        Poll::Ready(Ok(())) => {
                            *len += buf.filled().len();
                            // A TLS client is known by its first byte.
                            if seen[0] == TLS_HANDSHAKE_RECORD || *len == seen.len() {
                                Step::Sniffed
                            } else {
                                continue;
                            }
                        }
                    }
                }
                State::Handshaking(accept) => match Pin::new(accept.as_mut()).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(stream)) => Step::Done(Box::new(stream)),
                    Poll::Ready(Err(e)) => Step::Fail(e),
                },
                State::Refusing {
                    io,
                    refusal,
                    written,
                } => {
                    while *written < refusal.len() {
                        match Pin::new(&mut *io).poll_write(cx, &refusal[*written..]) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                            Poll::Ready(Ok(n)) => *written += n,
                        }
                    }
                    // Delivering the refusal is a courtesy: failures to
                    // flush or close change nothing.
                    if Pin::new(&mut *io).poll_flush(cx).is_pending()
                        || Pin::new(&mut *io).poll_shutdown(cx).is_pending()
                    {
                        return Poll::Pending;
                    }
                    // Read the rest of the request until the client closes:
                    // closing with unread bytes would reset the connection
                    // and could discard the answer before the client reads
                    // it (a lingering close, bounded by the deadline).
                    let mut sink = [0_u8; 1024];
                    loop {
                        let mut buf = ReadBuf::new(&mut sink);
                        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                            Poll::Ready(_) => break,
                        }
                    }
                    Step::Fail(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a plaintext client on the TLS port (answered 400)",
                    ))
                }
                State::Ready(_) | State::Failed => continue,
            };
            match step {
                Step::Sniffed => {
                    if let State::Sniffing {
                        io,
                        acceptor,
                        seen,
                        len,
                    } = std::mem::replace(&mut self.state, State::Failed)
                    {
                        self.state = if seen[0] == TLS_HANDSHAKE_RECORD {
                            State::Handshaking(Box::new(acceptor.accept(Replay {
                                first: seen,
                                len,
                                replayed: 0,
                                io,
                            })))
                        } else {
                            let refusal: &'static [u8] = if &seen == b"PRI" {
                                &H2_REFUSAL
                            } else {
                                &HTTP1_REFUSAL
                            };
                            State::Refusing {
                                io,
                                refusal,
                                written: 0,
                            }
                        };
                    }
                }
                Step::Done(stream) => self.state = State::Ready(stream),
                Step::Fail(e) => return Poll::Ready(Err(self.fail(e))),
            }
        }
    }

    /// The TLS stream, once the handshake completed.
    fn poll_stream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Pin<&mut tokio_rustls::server::TlsStream<Replay<IO>>>>> {
        std::task::ready!(self.poll_handshake(cx))?;
        Poll::Ready(match &mut self.state {
            State::Ready(stream) => Ok(Pin::new(stream.as_mut())),
            // poll_handshake only returns Ok once the state is Ready.
            _ => Err(io::Error::new(
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
        match &mut self.get_mut().state {
            State::Ready(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            // Nothing was sent over TLS yet: there is nothing to close.
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// A connection whose first bytes, already read to tell TLS from
/// plaintext, are read again first.
pub struct Replay<IO> {
    first: [u8; 3],
    len: usize,
    replayed: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.replayed < me.len && buf.remaining() > 0 {
            let n = (me.len - me.replayed).min(buf.remaining());
            buf.put_slice(&me.first[me.replayed..me.replayed + n]);
            me.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
