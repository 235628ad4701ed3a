//! [`Client`] and [`ClientBuilder`]: the daemons to talk to, who is asking
//! (project, tenant, token), timeouts, and the retry loop every one-shot
//! call goes through.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::Error;
use crate::cache::DiskCache;
use crate::endpoints::{Backoff, Pool};

/// How to build a [`Client`]. Start with [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    project: String,
    tenant: String,
    token: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    startup_timeout: Duration,
    backoff: Backoff,
    cache_dir: Option<PathBuf>,
    tls: Option<crate::tls::TlsConfig>,
    allow_plaintext_fallback: bool,
    tracing: crate::trace::TracingConfig,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            project: "default".into(),
            tenant: String::new(),
            token: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(3),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            cache_dir: None,
            tls: None,
            allow_plaintext_fallback: false,
            tracing: crate::trace::TracingConfig::off(),
        }
    }
}

impl ClientBuilder {
    /// A builder configured from environment variables — pass
    /// `std::env::vars()` (tests pass their own pairs):
    ///
    /// - `STRATA_ENDPOINTS` — daemons, comma separated;
    /// - `STRATA_PROJECT`, `STRATA_TENANT`;
    /// - `STRATA_TOKEN`, or `STRATA_TOKEN_FILE` naming a file that holds it
    ///   (surrounding whitespace ignored; setting both is an error);
    /// - `STRATA_CACHE_DIR` — see [`cache_dir`](Self::cache_dir);
    /// - `STRATA_TLS_CA` — PEM CA file: TLS to the daemons (see
    ///   [`tls`](Self::tls)); with `STRATA_TLS_CLIENT_CERT` and
    ///   `STRATA_TLS_CLIENT_KEY`, a client certificate too;
    /// - `OTEL_*` — trace export, as [`TracingConfig::from_env`](crate::trace::TracingConfig::from_env).
    ///
    /// Unset or empty variables leave the defaults. Calls made on the
    /// returned builder win over the environment, so a program can fix what
    /// must not vary and let operators set the rest. Errors name the
    /// variable (an unreadable token or CA file, a certificate without its
    /// key).
    pub fn from_env<I, K, V>(vars: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().trim().to_owned()))
            .collect();
        let get = |name: &str| {
            vars.iter()
                .rev()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        let mut builder = Self::default();
        if let Some(endpoints) = get("STRATA_ENDPOINTS") {
            builder = builder.endpoints(
                endpoints
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty()),
            );
        }
        if let Some(project) = get("STRATA_PROJECT") {
            builder = builder.project(project);
        }
        if let Some(tenant) = get("STRATA_TENANT") {
            builder = builder.tenant(tenant);
        }
        match (get("STRATA_TOKEN"), get("STRATA_TOKEN_FILE")) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "STRATA_TOKEN and STRATA_TOKEN_FILE are both set; set one".into(),
                ));
            }
            (Some(token), None) => builder = builder.token(token),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(&path).map_err(|e| {
                    Error::Config(format!("STRATA_TOKEN_FILE={path:?}: cannot read it: {e}"))
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(Error::Config(format!(
                        "STRATA_TOKEN_FILE={path:?}: the file is empty"
                    )));
                }
                builder = builder.token(token);
            }
            (None, None) => {}
        }
        if let Some(dir) = get("STRATA_CACHE_DIR") {
            builder = builder.cache_dir(dir);
        }
        let (cert, key) = (get("STRATA_TLS_CLIENT_CERT"), get("STRATA_TLS_CLIENT_KEY"));
        match (get("STRATA_TLS_CA"), &cert, &key) {
            (None, None, None) => {}
            (None, _, _) => {
                return Err(Error::Config(
                    "STRATA_TLS_CLIENT_CERT and STRATA_TLS_CLIENT_KEY need STRATA_TLS_CA".into(),
                ));
            }
            (Some(ca), _, _) => {
                let mut tls = crate::tls::TlsConfig::new()
                    .ca_file(&ca)
                    .map_err(|e| Error::Config(format!("STRATA_TLS_CA={ca:?}: {e}")))?;
                match (cert, key) {
                    (None, None) => {}
                    (Some(cert), Some(key)) => {
                        tls = tls.identity_files(&cert, &key).map_err(|e| {
                            Error::Config(format!(
                                "STRATA_TLS_CLIENT_CERT={cert:?}, STRATA_TLS_CLIENT_KEY={key:?}: {e}"
                            ))
                        })?;
                    }
                    _ => {
                        return Err(Error::Config(
                            "STRATA_TLS_CLIENT_CERT and STRATA_TLS_CLIENT_KEY go together".into(),
                        ));
                    }
                }
                builder = builder.tls(tls);
            }
        }
        Ok(builder.tracing(crate::trace::TracingConfig::from_env(vars)?))
    }

    /// The daemons, as `host:port` or `http://host:port`. Calls and watches
    /// go to one of them and move to the next when it fails. Required.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The project (default `default`).
    pub fn project(mut self, project: impl Into<String>) -> Self {
        self.project = project.into();
        self
    }

    /// The tenant this game server runs in: config resolves along its chain,
    /// registrations land in it, discovery falls back from it. Required.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// A bearer token sent with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long dialling one daemon may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one call to one daemon may take before the next endpoint is
    /// tried (default 5 s). Also bounds how long a watch waits for its first
    /// message.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long starting a watch keeps trying the daemons before it falls
    /// back to the disk cache (default 3 s; every endpoint is tried at least
    /// once).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Backoff between rounds over every endpoint: starts at `initial`,
    /// doubles up to `max`, each pause drawn at random from its upper half
    /// (defaults 100 ms and 5 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff {
            initial,
            max: max.max(initial),
        };
        self
    }

    /// Keeps the last resolved value of every config key and service this
    /// client watches (not `watch_tenant_services`, whose users need live
    /// data) in `<dir>/<project>/<tenant>.json`, so a game server started
    /// while every daemon is down starts from it. Off unless set.
    ///
    /// The directory may be shared: directories the cache creates are 0700,
    /// its files 0600, written through a randomly named temporary file that
    /// is never a symlink's target. With a cache, [`build`](Self::build)
    /// refuses a project or tenant that is not a DNS label (the daemon's
    /// rule), so neither can lead outside `dir`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Exports spans of this client's calls over OTLP/gRPC and sends their
    /// W3C `traceparent` to the daemon (see [`crate::trace`]); usually
    /// `TracingConfig::from_env(std::env::vars())?`. Off by default, and
    /// when off it costs nothing. When on, [`ClientBuilder::build`] must run
    /// inside a Tokio runtime.
    pub fn tracing(mut self, config: crate::trace::TracingConfig) -> Self {
        self.tracing = config;
        self
    }

    /// Talks to the daemons over TLS, verified and authenticated as `tls`
    /// says: `host:port` endpoints then mean `https://host:port`.
    /// `https://` endpoints use TLS without this too, trusting the system's
    /// roots. An explicit `http://` endpoint next to TLS is refused unless
    /// [`allow_plaintext_fallback`](Self::allow_plaintext_fallback) is set.
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Allows an endpoint list that mixes TLS and plaintext (default
    /// `false`): TLS configured or an `https://` endpoint, next to an
    /// `http://` one. Without it [`build`](Self::build) refuses such a list
    /// with [`Error::PlaintextFallback`], because failing over to the
    /// plaintext endpoint sends the token and config in clear. Only for
    /// migrations, on networks where that is acceptable.
    pub fn allow_plaintext_fallback(mut self, allow: bool) -> Self {
        self.allow_plaintext_fallback = allow;
        self
    }

    /// Builds the client. Nothing is dialled yet: the first call or watch
    /// connects. Fails on an empty endpoint list, an invalid endpoint, a
    /// list mixing TLS and plaintext (see
    /// [`allow_plaintext_fallback`](Self::allow_plaintext_fallback)), a
    /// missing tenant or a token that cannot be sent as a header.
    pub fn build(self) -> Result<Client, Error> {
        if self.tenant.is_empty() {
            return Err(Error::Config("a tenant is required".into()));
        }
        if self.project.is_empty() {
            return Err(Error::Config("the project must not be empty".into()));
        }
        let pool = Pool::new(
            &self.endpoints,
            self.connect_timeout,
            self.backoff,
            self.tls.as_ref(),
        )?;
        crate::endpoints::check_plaintext_fallback(
            &pool.uris(),
            self.tls.is_some(),
            self.allow_plaintext_fallback,
        )?;
        let token = self
            .token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| Error::Config("the token is not a valid header value".into()))
            })
            .transpose()?;
        let cache = self
            .cache_dir
            .map(|dir| DiskCache::open(&dir, &self.project, &self.tenant).map(Arc::new))
            .transpose()?;
        let trace = self.tracing.start("strata-client")?;
        Ok(Client {
            inner: Arc::new(Inner {
                pool,
                project: self.project,
                tenant: self.tenant,
                token,
                request_timeout: self.request_timeout,
                startup_timeout: self.startup_timeout,
                cache,
                trace,
            }),
        })
    }
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) project: String,
    pub(crate) tenant: String,
    token: Option<MetadataValue<Ascii>>,
    pub(crate) request_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) cache: Option<Arc<DiskCache>>,
    /// The span exporter, when tracing is on.
    pub(crate) trace: Option<crate::trace::Exporter>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last clone of the client is gone: export what is queued
        // without blocking the thread that dropped it.
        if let Some(exporter) = self.trace.take() {
            exporter.shutdown_in_background();
        }
    }
}

/// A client of a set of `stratad` daemons, for one project and tenant.
///
/// Cheap to clone (clones share connections, the disk cache and the
/// current endpoint). Everything it starts — watches, registrations — runs
/// on the Tokio runtime it was started from.
///
/// ```no_run
/// # async fn run() -> Result<(), strata_client::Error> {
/// let client = strata_client::Client::builder()
///     .endpoints(["10.0.0.1:7700", "10.0.0.2:7700"])
///     .project("vega")
///     .tenant("feat-login")
///     .cache_dir("/var/cache/strata")
///     .build()?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.pool)
            .field("project", &self.inner.project)
            .field("tenant", &self.inner.tenant)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// A client configured from this process's environment: the `STRATA_*`
    /// (and `OTEL_*`) variables [`ClientBuilder::from_env`] reads, then
    /// built. For settings the program fixes itself, call
    /// `ClientBuilder::from_env(std::env::vars())?` and set them on the
    /// builder: explicit calls win.
    pub fn from_env() -> Result<Client, Error> {
        // `vars()` panics on a variable that is not Unicode; such a variable
        // is none of ours, so it is skipped.
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        ClientBuilder::from_env(vars)?.build()
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.inner.project
    }

    /// The tenant.
    pub fn tenant(&self) -> &str {
        &self.inner.tenant
    }

    /// The daemon endpoints, as URIs, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.pool.uris()
    }

    /// The disk cache file, when a cache directory was set.
    pub fn cache_path(&self) -> Option<&Path> {
        self.inner.cache.as_deref().map(DiskCache::path)
    }

    /// Exports the spans of finished calls now (when tracing is on). Call
    /// it before the process exits: spans are otherwise sent in batches.
    pub async fn flush_traces(&self) {
        if let Some(exporter) = &self.inner.trace {
            exporter.flush().await;
        }
    }

    /// Starts the client span of one call to `method` (the gRPC path
    /// without its leading `/`) about `service`, a child of the caller's
    /// current OpenTelemetry context; `None` when tracing is off.
    pub(crate) fn start_call_span(
        &self,
        method: &'static str,
        service: &str,
    ) -> Option<opentelemetry::Context> {
        let exporter = self.inner.trace.as_ref()?;
        Some(crate::trace::start_call_span(
            exporter,
            method,
            &self.inner.project,
            &self.inner.tenant,
            service,
        ))
    }

    /// [`Client::request`] carrying `span`'s `traceparent`.
    pub(crate) fn traced_request<T>(
        &self,
        message: T,
        span: Option<&opentelemetry::Context>,
    ) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Some(cx) = span {
            crate::trace::inject_metadata(cx, request.metadata_mut());
        }
        request
    }

    /// Wraps a message with the token.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.inner.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// Runs a one-shot call with failover: on a transient failure (daemon
    /// unreachable, shutting down, timed out) the next endpoint is tried,
    /// pausing with backoff after each full round, until `budget` has
    /// passed. Other errors return at once. Callers only pass calls that are
    /// safe to repeat.
    pub(crate) async fn call<T, F, Fut>(&self, budget: Duration, mut f: F) -> Result<T, Error>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let pool = &self.inner.pool;
        let deadline = Instant::now() + budget;
        let mut failures: u32 = 0;
        loop {
            let picked = pool.pick();
            let timeout = self.inner.request_timeout;
            let outcome = match tokio::time::timeout(timeout, f(picked.channel, timeout)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(status)) => Error::from(status),
                Err(_) => Error::Server {
                    code: tonic::Code::DeadlineExceeded,
                    reason: strata_proto::v1::ErrorReason::Unavailable,
                    message: format!("no answer within {timeout:?}"),
                },
            };
            if !outcome.is_transient() {
                return Err(outcome);
            }
            tracing::debug!(endpoint = %picked.uri, error = %outcome, "call failed; trying the next endpoint");
            pool.failed(picked.index);
            failures += 1;
            let rounds = failures / pool.len() as u32;
            let pause = if failures.is_multiple_of(pool.len() as u32) {
                pool.backoff.delay(rounds.saturating_sub(1))
            } else {
                Duration::ZERO
            };
            if Instant::now() + pause >= deadline {
                return Err(Error::Unreachable {
                    endpoints: pool.uris(),
                    last_error: format!("{}: {outcome}", picked.uri),
                });
            }
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_configures_a_builder_and_explicit_calls_win() {
        let vars = [
            ("STRATA_ENDPOINTS", "10.0.0.1:7070, 10.0.0.2:7070,"),
            ("STRATA_PROJECT", "vega"),
            ("STRATA_TENANT", "feat-1"),
            ("STRATA_TOKEN", " strata_0123456789abcdef_secret \n"),
            ("STRATA_CACHE_DIR", ""),
            ("PATH", "/usr/bin"),
        ];
        let builder = ClientBuilder::from_env(vars).unwrap();
        assert_eq!(builder.endpoints, ["10.0.0.1:7070", "10.0.0.2:7070"]);
        assert_eq!(
            (builder.project.as_str(), builder.tenant.as_str()),
            ("vega", "feat-1")
        );
        assert_eq!(
            builder.token.as_deref(),
            Some("strata_0123456789abcdef_secret")
        );
        assert_eq!(builder.cache_dir, None, "an empty variable is unset");
        let client = builder.tenant("feat-2").build().unwrap();
        assert_eq!((client.project(), client.tenant()), ("vega", "feat-2"));
        assert_eq!(client.endpoints().len(), 2);
        // Nothing set: the defaults, and build says what is missing.
        let bare = ClientBuilder::from_env(std::iter::empty::<(&str, &str)>()).unwrap();
        assert_eq!(bare.project, "default");
        assert!(bare.build().is_err());
    }

    #[test]
    fn token_files_are_read_and_bad_variables_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        std::fs::write(&file, "strata_00000000000000aa_s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let builder = ClientBuilder::from_env([("STRATA_TOKEN_FILE", path)]).unwrap();
        assert_eq!(
            builder.token.as_deref(),
            Some("strata_00000000000000aa_s3cret")
        );
        let both = ClientBuilder::from_env([("STRATA_TOKEN_FILE", path), ("STRATA_TOKEN", "x")])
            .unwrap_err();
        assert!(both.to_string().contains("both set"), "{both}");
        let missing = dir.path().join("nope").to_str().unwrap().to_owned();
        let err = ClientBuilder::from_env([("STRATA_TOKEN_FILE", missing.as_str())]).unwrap_err();
        assert!(err.to_string().contains("STRATA_TOKEN_FILE"), "{err}");
        let err = ClientBuilder::from_env([("STRATA_TLS_CLIENT_CERT", path)]).unwrap_err();
        assert!(err.to_string().contains("STRATA_TLS_CA"), "{err}");
        let err = ClientBuilder::from_env([("STRATA_TLS_CA", missing.as_str())]).unwrap_err();
        assert!(err.to_string().contains("STRATA_TLS_CA"), "{err}");
    }

    #[test]
    fn build_checks_what_it_can_without_dialling() {
        let err = Client::builder()
            .endpoints(["127.0.0.1:1"])
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "tenant required: {err}");
        let err = Client::builder().tenant("t").build().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "endpoints required: {err}");
        let err = Client::builder()
            .endpoints(["http://[::1"])
            .tenant("t")
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidEndpoint { .. }), "{err}");
        let err = Client::builder()
            .endpoints(["127.0.0.1:1"])
            .tenant("t")
            .token("line\nbreak")
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    #[test]
    fn every_request_carries_the_token() {
        let client = Client::builder()
            .endpoints(["127.0.0.1:1", "http://127.0.0.1:2"])
            .tenant("feat-1")
            .token("s3cret")
            .build()
            .unwrap();
        assert_eq!(
            client.endpoints(),
            ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert_eq!(client.project(), "default");
        let request = client.request(());
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
    }

    #[tokio::test]
    async fn a_call_to_dead_endpoints_gives_up_after_its_budget() {
        let client = Client::builder()
            .endpoints(["127.0.0.1:1", "127.0.0.1:2"])
            .tenant("t")
            .backoff(Duration::from_millis(10), Duration::from_millis(20))
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let mut attempts = 0;
        let outcome: Result<(), Error> = client
            .call(Duration::from_millis(300), |_, _| {
                attempts += 1;
                async { Err(tonic::Status::unavailable("down")) }
            })
            .await;
        assert!(
            matches!(outcome, Err(Error::Unreachable { .. })),
            "{outcome:?}"
        );
        assert!(attempts >= 4, "kept rotating: {attempts}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A non-transient error returns at once.
        let mut attempts = 0;
        let outcome: Result<(), Error> = client
            .call(Duration::from_secs(5), |_, _| {
                attempts += 1;
                async { Err(tonic::Status::not_found("no such tenant")) }
            })
            .await;
        assert_eq!(outcome.unwrap_err().code(), Some(tonic::Code::NotFound));
        assert_eq!(attempts, 1);
    }

    /// docs/security.md, "Plaintext fallback in endpoint lists": an endpoint
    /// list mixing `https://` and `http://` (or TLS settings with an explicit
    /// `http://` endpoint) was accepted, and failing over to the plaintext
    /// endpoint sent the bearer token in clear.
    #[test]
    fn sdk_refuses_a_mixed_https_and_http_endpoint_list_finding_10() {
        let tls = crate::TlsConfig::new;
        let refused: Vec<(Vec<&str>, Option<crate::TlsConfig>)> = vec![
            (vec!["https://127.0.0.1:1", "http://127.0.0.1:2"], None),
            (vec!["http://127.0.0.1:1", "https://127.0.0.1:2"], None),
            (vec!["http://127.0.0.1:1"], Some(tls())),
            (vec!["127.0.0.1:1", "http://127.0.0.1:2"], Some(tls())),
            (vec!["https://127.0.0.1:1", "127.0.0.1:2"], None),
        ];
        for (endpoints, tls) in refused {
            let mut builder = Client::builder()
                .endpoints(endpoints.clone())
                .tenant("t")
                .token("s3cret");
            if let Some(tls) = tls {
                builder = builder.tls(tls);
            }
            match builder.build() {
                Ok(client) => panic!("{endpoints:?} accepted as {:?}", client.endpoints()),
                Err(e) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("allow_plaintext_fallback") && text.contains("http://"),
                        "names the setting and the endpoint: {text}"
                    );
                }
            }
        }
        // The override lets a mixed list through.
        let client = Client::builder()
            .endpoints(["https://127.0.0.1:1", "http://127.0.0.1:2"])
            .tenant("t")
            .allow_plaintext_fallback(true)
            .build()
            .unwrap();
        assert_eq!(client.endpoints().len(), 2);
        // Lists that do not mix are fine.
        let accepted: Vec<(Vec<&str>, Option<crate::TlsConfig>)> = vec![
            (vec!["https://127.0.0.1:1", "https://127.0.0.1:2"], None),
            (vec!["https://127.0.0.1:1", "127.0.0.1:2"], Some(tls())),
            (vec!["127.0.0.1:1", "http://127.0.0.1:2"], None),
        ];
        for (endpoints, tls) in accepted {
            let mut builder = Client::builder().endpoints(endpoints.clone()).tenant("t");
            if let Some(tls) = tls {
                builder = builder.tls(tls);
            }
            assert!(builder.build().is_ok(), "{endpoints:?}");
        }
    }

    /// Finding 10: the raw [`crate::Connection`] (the CLI's) refuses a mixed
    /// list before dialling anything.
    #[tokio::test]
    async fn connection_refuses_a_mixed_https_and_http_endpoint_list_finding_10() {
        let err = crate::Connection::connect_with_tls(
            &["https://127.0.0.1:1", "http://127.0.0.1:2"],
            Duration::from_millis(200),
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, Error::PlaintextFallback { .. })
                && err.to_string().contains("allow_plaintext_fallback"),
            "refused, not dialled: {err}"
        );
        // Allowed explicitly, it dials (and finds nothing there).
        let err = crate::Connection::connect_allowing_plaintext_fallback(
            &["https://127.0.0.1:1", "http://127.0.0.1:2"],
            Duration::from_millis(200),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    }
}
