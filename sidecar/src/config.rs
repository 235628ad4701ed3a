//! Settings: defaults → TOML file → `STRATA_*` environment → flags. The
//! sources are passed in (arguments, an environment map), never read from
//! the process inside, so tests never set environment variables.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// A local TCP port routed to a service (`--tcp 127.0.0.1:16001=matchmaker`,
/// optionally followed by `;accept-proxy` and/or `;send-proxy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRoute {
    /// Where the sidecar listens.
    pub listen: SocketAddr,
    /// The service a connection goes to.
    pub service: String,
    /// The app starts each connection with a PROXY v2 header whose tenant
    /// TLV picks the route (`accept-proxy`).
    pub accept_proxy: bool,
    /// The sidecar starts each upstream connection with a PROXY v2 header
    /// carrying the tenant (`send-proxy`).
    pub send_proxy: bool,
}

/// The optional inbound listener in front of the app
/// (`--inbound 10.1.2.3:15006=127.0.0.1:8080`). It listens exactly where it
/// is told; there is no default address (an unspecified one such as
/// `0.0.0.0` takes connections on every interface, which the sidecar logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRoute {
    /// Where the sidecar listens for calls to the app.
    pub listen: SocketAddr,
    /// The app's own address.
    pub app: SocketAddr,
}

/// Everything the sidecar runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// stratad endpoints (`host:port` or URIs).
    pub endpoints: Vec<String>,
    /// Project.
    pub project: String,
    /// The sidecar's own tenant: requests without a tenant are routed for it.
    pub tenant: String,
    /// Bearer token for stratad.
    pub token: Option<String>,
    /// TLS to stratad (`tls_ca`, `tls_cert`, `tls_key`); `None`: plaintext
    /// unless an endpoint is `https://`.
    pub tls: Option<strata_client::TlsConfig>,
    /// Outbound HTTP/1.1 + h2c proxy address.
    pub outbound: SocketAddr,
    /// Admin server address.
    pub admin: SocketAddr,
    /// Raw TCP routes.
    pub tcp: Vec<TcpRoute>,
    /// Inbound listener in front of the app, if any.
    pub inbound: Option<InboundRoute>,
    /// How long an `accept-proxy` client may take to send its header.
    pub proxy_header_timeout: Duration,
    /// Dialling one upstream instance may take this long before the next
    /// instance is tried.
    pub connect_timeout: Duration,
    /// Default per-route timeout: from the request to the upstream's
    /// response head (a streaming body may then take as long as it needs).
    pub timeout: Duration,
    /// Per-service timeouts overriding `timeout`.
    pub route_timeouts: HashMap<String, Duration>,
    /// How long the first request carrying a tenant the sidecar has not
    /// seen yet may wait for that tenant's routes.
    pub tenant_wait: Duration,
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) after
    /// which an instance is ejected.
    pub eject_after: u32,
    /// How long an ejected instance is left out.
    pub eject_for: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Most tenants whose routes the sidecar follows at once.
    pub max_tenants: usize,
    /// Tenants not followed yet that the sidecar asks stratad about per
    /// second (and at most this many at once): a caller naming random
    /// tenants costs stratad no more than this.
    pub tenant_learn_rate: usize,
    /// Most tenant names stratad said do not exist that are remembered
    /// (for 5 s, answered without asking again); the oldest go first.
    pub max_unknown_tenants: usize,
    /// An HTTP request head must arrive whole within this time of its first
    /// byte (slowloris); then the connection closes.
    pub header_read_timeout: Duration,
    /// An HTTP connection with no request for this long closes (HTTP/2:
    /// no byte either way; it gets GOAWAY and its streams finish).
    pub idle_timeout: Duration,
    /// Most connections open at once on each listener (outbound, inbound,
    /// admin, every TCP route); more are refused (HTTP: 503) and closed.
    pub max_connections: usize,
    /// `tracing` filter (`RUST_LOG` syntax).
    pub log: String,
    /// Tokio worker threads (default: one per CPU).
    pub worker_threads: Option<usize>,
    /// OpenTelemetry span export, from the standard `OTEL_*` variables
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, …); off unless an endpoint is set.
    pub tracing: strata_client::trace::TracingConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            project: "default".into(),
            tenant: String::new(),
            token: None,
            tls: None,
            outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            tcp: Vec::new(),
            inbound: None,
            proxy_header_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(15),
            route_timeouts: HashMap::new(),
            tenant_wait: Duration::from_secs(2),
            eject_after: 5,
            eject_for: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_tenants: 256,
            tenant_learn_rate: 10,
            max_unknown_tenants: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            log: "info".into(),
            worker_threads: None,
            tracing: strata_client::trace::TracingConfig::off(),
        }
    }
}

/// A setting that could not be used; the message names its source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Command line of `strata-sidecar`.
#[derive(Debug, Parser)]
#[command(
    name = "strata-sidecar",
    version,
    about = "Routes an app's outbound HTTP, gRPC and TCP calls to the nearest tenant that runs the callee."
)]
struct Cli {
    /// stratad endpoints, comma separated [env: STRATA_ENDPOINTS]
    #[arg(long, value_delimiter = ',')]
    endpoints: Option<Vec<String>>,
    /// Project [env: STRATA_PROJECT] (default `default`)
    #[arg(long)]
    project: Option<String>,
    /// The sidecar's own tenant [env: STRATA_TENANT]
    #[arg(long)]
    tenant: Option<String>,
    /// File holding the bearer token [env: STRATA_TOKEN holds the token itself]
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that stratad's certificate must chain to; endpoints without a scheme then use https:// [env: STRATA_TLS_CA]
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a stratad that requires one [env: STRATA_TLS_CLIENT_CERT]
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert [env: STRATA_TLS_CLIENT_KEY]
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Outbound proxy address [env: STRATA_SIDECAR_OUTBOUND] (default 127.0.0.1:15001)
    #[arg(long)]
    outbound: Option<SocketAddr>,
    /// Admin address [env: STRATA_SIDECAR_ADMIN] (default 127.0.0.1:15000)
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// LOCAL_ADDR=SERVICE raw TCP route, repeatable [env: STRATA_SIDECAR_TCP, comma separated]
    #[arg(long)]
    tcp: Vec<String>,
    /// LISTEN_ADDR=APP_ADDR inbound HTTP listener in front of the app [env: STRATA_SIDECAR_INBOUND]
    #[arg(long)]
    inbound: Option<String>,
    /// Default route timeout to the response head, e.g. `15s`
    #[arg(long)]
    timeout: Option<String>,
    /// SERVICE=DURATION per-route timeout, repeatable
    #[arg(long)]
    route_timeout: Vec<String>,
    /// Upstream connect timeout, e.g. `1s`
    #[arg(long)]
    connect_timeout: Option<String>,
    /// Time an HTTP request head may take from its first byte [env: STRATA_SIDECAR_HEADER_READ_TIMEOUT] (default 10s)
    #[arg(long)]
    header_read_timeout: Option<String>,
    /// Idle HTTP connections close after this [env: STRATA_SIDECAR_IDLE_TIMEOUT] (default 60s)
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Most open connections per listener [env: STRATA_SIDECAR_MAX_CONNECTIONS] (default 1024)
    #[arg(long)]
    max_connections: Option<String>,
    /// New tenants asked of stratad per second [env: STRATA_SIDECAR_TENANT_LEARN_RATE] (default 10)
    #[arg(long)]
    tenant_learn_rate: Option<String>,
    /// Unknown tenant names remembered [env: STRATA_SIDECAR_MAX_UNKNOWN_TENANTS] (default 1024)
    #[arg(long)]
    max_unknown_tenants: Option<String>,
    /// TOML settings file [env: STRATA_SIDECAR_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter [env: STRATA_LOG] (default `info`)
    #[arg(long)]
    log: Option<String>,
    /// Worker threads (default: one per CPU)
    #[arg(long)]
    worker_threads: Option<usize>,
}

/// The TOML file's shape (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    endpoints: Option<Vec<String>>,
    project: Option<String>,
    tenant: Option<String>,
    token_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    outbound: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    tcp: Option<Vec<String>>,
    inbound: Option<String>,
    proxy_header_timeout: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    tenant_wait: Option<String>,
    eject_after: Option<u32>,
    eject_for: Option<String>,
    shutdown_grace: Option<String>,
    max_tenants: Option<usize>,
    tenant_learn_rate: Option<usize>,
    max_unknown_tenants: Option<usize>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    log: Option<String>,
    worker_threads: Option<usize>,
    #[serde(default)]
    routes: BTreeMap<String, FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    timeout: Option<String>,
}

fn duration(value: &str, source: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim())
        .map_err(|e| ConfigError(format!("{source}: {value:?} is not a duration: {e}")))
}

/// A duration that must not be zero (a limit of nothing would refuse
/// everything).
fn limit_duration(value: &str, source: &str) -> Result<Duration, ConfigError> {
    let d = duration(value, source)?;
    if d.is_zero() {
        return Err(ConfigError(format!("{source}: must be more than 0")));
    }
    Ok(d)
}

/// A count of at least 1.
fn limit_count(value: usize, source: &str) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(ConfigError(format!("{source}: must be at least 1")));
    }
    Ok(value)
}

/// [`limit_count`] from text (flags and environment).
fn limit_count_text(value: &str, source: &str) -> Result<usize, ConfigError> {
    let n = value
        .trim()
        .parse()
        .map_err(|e| ConfigError(format!("{source}: {value:?} is not a count: {e}")))?;
    limit_count(n, source)
}

fn tcp_route(value: &str, source: &str) -> Result<TcpRoute, ConfigError> {
    let (listen, rest) = value.split_once('=').ok_or_else(|| {
        ConfigError(format!(
            "{source}: {value:?} is not LOCAL_ADDR=SERVICE[;accept-proxy][;send-proxy]"
        ))
    })?;
    let listen = listen
        .trim()
        .parse()
        .map_err(|e| ConfigError(format!("{source}: {listen:?} is not an address: {e}")))?;
    let mut parts = rest.split(';').map(str::trim);
    let service = parts.next().unwrap_or_default();
    if service.is_empty() {
        return Err(ConfigError(format!("{source}: {value:?} names no service")));
    }
    let mut route = TcpRoute {
        listen,
        service: service.to_owned(),
        accept_proxy: false,
        send_proxy: false,
    };
    for option in parts {
        match option {
            "accept-proxy" => route.accept_proxy = true,
            "send-proxy" => route.send_proxy = true,
            other => {
                return Err(ConfigError(format!(
                    "{source}: {other:?} in {value:?} is not a TCP route option (accept-proxy, send-proxy)"
                )));
            }
        }
    }
    Ok(route)
}

fn inbound_route(value: &str, source: &str) -> Result<InboundRoute, ConfigError> {
    let (listen, app) = value
        .split_once('=')
        .ok_or_else(|| ConfigError(format!("{source}: {value:?} is not LISTEN_ADDR=APP_ADDR")))?;
    let address = |a: &str| {
        a.trim()
            .parse()
            .map_err(|e| ConfigError(format!("{source}: {a:?} is not an address: {e}")))
    };
    Ok(InboundRoute {
        listen: address(listen)?,
        app: address(app)?,
    })
}

fn read_token(path: &PathBuf, source: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| ConfigError(format!("{source} {}: {e}", path.display())))
}

impl Settings {
    /// Builds settings from command-line `args` (the program name first) and
    /// an environment map. Returns clap's error (help, version, usage) as a
    /// `clap::Error` for the caller to print.
    pub fn load<I, T>(args: I, env: &HashMap<String, String>) -> Result<Self, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(LoadError::Usage)?;
        Self::from_sources(cli, env).map_err(LoadError::Invalid)
    }

    fn from_sources(cli: Cli, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut s = Settings::default();
        let env_get = |k: &str| env.get(k).filter(|v| !v.is_empty());

        let mut tls = TlsPaths::default();

        // File.
        let config_path = cli
            .config
            .clone()
            .or_else(|| env_get("STRATA_SIDECAR_CONFIG").map(PathBuf::from));
        if let Some(path) = &config_path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            let file: FileSettings = toml::from_str(&text)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            let src = format!("config file {}", path.display());
            if let Some(v) = file.endpoints {
                s.endpoints = v;
            }
            if let Some(v) = file.project {
                s.project = v;
            }
            if let Some(v) = file.tenant {
                s.tenant = v;
            }
            tls.set(file.tls_ca, file.tls_cert, file.tls_key, |k| {
                format!("{src}: {k}")
            });
            if let Some(p) = &file.token_file {
                s.token = Some(read_token(p, &format!("{src}: token_file"))?);
            }
            if let Some(v) = file.outbound {
                s.outbound = v;
            }
            if let Some(v) = file.admin {
                s.admin = v;
            }
            for t in file.tcp.unwrap_or_default() {
                s.tcp.push(tcp_route(&t, &format!("{src}: tcp"))?);
            }
            if let Some(v) = &file.inbound {
                s.inbound = Some(inbound_route(v, &format!("{src}: inbound"))?);
            }
            if let Some(v) = &file.proxy_header_timeout {
                s.proxy_header_timeout = duration(v, &format!("{src}: proxy_header_timeout"))?;
            }
            if let Some(v) = &file.timeout {
                s.timeout = duration(v, &format!("{src}: timeout"))?;
            }
            if let Some(v) = &file.connect_timeout {
                s.connect_timeout = duration(v, &format!("{src}: connect_timeout"))?;
            }
            if let Some(v) = &file.tenant_wait {
                s.tenant_wait = duration(v, &format!("{src}: tenant_wait"))?;
            }
            if let Some(v) = file.eject_after {
                s.eject_after = v;
            }
            if let Some(v) = &file.eject_for {
                s.eject_for = duration(v, &format!("{src}: eject_for"))?;
            }
            if let Some(v) = &file.shutdown_grace {
                s.shutdown_grace = duration(v, &format!("{src}: shutdown_grace"))?;
            }
            if let Some(v) = file.max_tenants {
                s.max_tenants = v;
            }
            if let Some(v) = file.tenant_learn_rate {
                s.tenant_learn_rate = limit_count(v, &format!("{src}: tenant_learn_rate"))?;
            }
            if let Some(v) = file.max_unknown_tenants {
                s.max_unknown_tenants = limit_count(v, &format!("{src}: max_unknown_tenants"))?;
            }
            if let Some(v) = &file.header_read_timeout {
                s.header_read_timeout = limit_duration(v, &format!("{src}: header_read_timeout"))?;
            }
            if let Some(v) = &file.idle_timeout {
                s.idle_timeout = limit_duration(v, &format!("{src}: idle_timeout"))?;
            }
            if let Some(v) = file.max_connections {
                s.max_connections = limit_count(v, &format!("{src}: max_connections"))?;
            }
            if let Some(v) = file.log {
                s.log = v;
            }
            if let Some(v) = file.worker_threads {
                s.worker_threads = Some(v);
            }
            for (service, route) in file.routes {
                if let Some(t) = &route.timeout {
                    let d = duration(t, &format!("{src}: routes.{service}.timeout"))?;
                    s.route_timeouts.insert(service, d);
                }
            }
        }

        // Environment.
        if let Some(v) = env_get("STRATA_ENDPOINTS") {
            s.endpoints = v.split(',').map(|e| e.trim().to_owned()).collect();
        }
        if let Some(v) = env_get("STRATA_PROJECT") {
            s.project = v.clone();
        }
        if let Some(v) = env_get("STRATA_TENANT") {
            s.tenant = v.clone();
        }
        tls.set(
            env_get("STRATA_TLS_CA").map(PathBuf::from),
            env_get("STRATA_TLS_CLIENT_CERT").map(PathBuf::from),
            env_get("STRATA_TLS_CLIENT_KEY").map(PathBuf::from),
            |k| match k {
                "tls_ca" => "STRATA_TLS_CA".into(),
                "tls_cert" => "STRATA_TLS_CLIENT_CERT".into(),
                _ => "STRATA_TLS_CLIENT_KEY".into(),
            },
        );
        if let Some(v) = env_get("STRATA_TOKEN") {
            s.token = Some(v.trim().to_owned());
        }
        if let Some(v) = env_get("STRATA_SIDECAR_OUTBOUND") {
            s.outbound = v.parse().map_err(|e| {
                ConfigError(format!(
                    "STRATA_SIDECAR_OUTBOUND: {v:?} is not an address: {e}"
                ))
            })?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_ADMIN") {
            s.admin = v.parse().map_err(|e| {
                ConfigError(format!(
                    "STRATA_SIDECAR_ADMIN: {v:?} is not an address: {e}"
                ))
            })?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_TCP") {
            s.tcp = v
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| tcp_route(t, "STRATA_SIDECAR_TCP"))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_INBOUND") {
            s.inbound = Some(inbound_route(v, "STRATA_SIDECAR_INBOUND")?);
        }
        if let Some(v) = env_get("STRATA_SIDECAR_TENANT_LEARN_RATE") {
            s.tenant_learn_rate = limit_count_text(v, "STRATA_SIDECAR_TENANT_LEARN_RATE")?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_MAX_UNKNOWN_TENANTS") {
            s.max_unknown_tenants = limit_count_text(v, "STRATA_SIDECAR_MAX_UNKNOWN_TENANTS")?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_HEADER_READ_TIMEOUT") {
            s.header_read_timeout = limit_duration(v, "STRATA_SIDECAR_HEADER_READ_TIMEOUT")?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_IDLE_TIMEOUT") {
            s.idle_timeout = limit_duration(v, "STRATA_SIDECAR_IDLE_TIMEOUT")?;
        }
        if let Some(v) = env_get("STRATA_SIDECAR_MAX_CONNECTIONS") {
            s.max_connections = limit_count_text(v, "STRATA_SIDECAR_MAX_CONNECTIONS")?;
        }
        if let Some(v) = env_get("STRATA_LOG") {
            s.log = v.clone();
        }

        // Flags.
        if let Some(v) = cli.endpoints {
            s.endpoints = v;
        }
        if let Some(v) = cli.project {
            s.project = v;
        }
        if let Some(v) = cli.tenant {
            s.tenant = v;
        }
        if let Some(p) = &cli.token_file {
            s.token = Some(read_token(p, "--token-file")?);
        }
        tls.set(cli.tls_ca, cli.tls_cert, cli.tls_key, |k| {
            format!("--{}", k.replace('_', "-"))
        });
        s.tls = tls.config()?;
        if let Some(v) = cli.outbound {
            s.outbound = v;
        }
        if let Some(v) = cli.admin {
            s.admin = v;
        }
        if !cli.tcp.is_empty() {
            s.tcp = cli
                .tcp
                .iter()
                .map(|t| tcp_route(t, "--tcp"))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = &cli.inbound {
            s.inbound = Some(inbound_route(v, "--inbound")?);
        }
        if let Some(v) = &cli.timeout {
            s.timeout = duration(v, "--timeout")?;
        }
        if let Some(v) = &cli.connect_timeout {
            s.connect_timeout = duration(v, "--connect-timeout")?;
        }
        if let Some(v) = &cli.tenant_learn_rate {
            s.tenant_learn_rate = limit_count_text(v, "--tenant-learn-rate")?;
        }
        if let Some(v) = &cli.max_unknown_tenants {
            s.max_unknown_tenants = limit_count_text(v, "--max-unknown-tenants")?;
        }
        if let Some(v) = &cli.header_read_timeout {
            s.header_read_timeout = limit_duration(v, "--header-read-timeout")?;
        }
        if let Some(v) = &cli.idle_timeout {
            s.idle_timeout = limit_duration(v, "--idle-timeout")?;
        }
        if let Some(v) = &cli.max_connections {
            s.max_connections = limit_count_text(v, "--max-connections")?;
        }
        for rt in &cli.route_timeout {
            let (service, d) = rt.split_once('=').ok_or_else(|| {
                ConfigError(format!("--route-timeout: {rt:?} is not SERVICE=DURATION"))
            })?;
            s.route_timeouts
                .insert(service.trim().to_owned(), duration(d, "--route-timeout")?);
        }
        if let Some(v) = cli.log {
            s.log = v;
        }
        if let Some(v) = cli.worker_threads {
            s.worker_threads = Some(v.max(1));
        }

        s.endpoints.retain(|e| !e.trim().is_empty());
        if s.endpoints.is_empty() {
            return Err(ConfigError(
                "no stratad endpoints: give --endpoints, STRATA_ENDPOINTS or `endpoints` in the config file".into(),
            ));
        }
        if s.tenant.is_empty() {
            return Err(ConfigError(
                "no tenant: give --tenant, STRATA_TENANT or `tenant` in the config file".into(),
            ));
        }
        if strata_client::propagation::Tenant::new(s.tenant.clone()).is_err() {
            return Err(ConfigError(format!(
                "tenant {:?} is not a valid tenant name",
                s.tenant
            )));
        }
        s.tracing = strata_client::trace::TracingConfig::from_env(
            env.iter().filter(|(k, _)| k.starts_with("OTEL_")),
        )
        .map_err(|e| ConfigError(e.to_string()))?;
        Ok(s)
    }

    /// The timeout for requests to `service`.
    pub fn timeout_for(&self, service: &str) -> Duration {
        self.route_timeouts
            .get(service)
            .copied()
            .unwrap_or(self.timeout)
    }
}

/// The TLS files for the connection to stratad, each with where it was set.
#[derive(Debug, Default)]
struct TlsPaths {
    ca: Option<(PathBuf, String)>,
    cert: Option<(PathBuf, String)>,
    key: Option<(PathBuf, String)>,
}

impl TlsPaths {
    /// Applies one source's values; `name(setting)` says where they came from.
    fn set(
        &mut self,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        name: impl Fn(&str) -> String,
    ) {
        for (slot, value, setting) in [
            (&mut self.ca, ca, "tls_ca"),
            (&mut self.cert, cert, "tls_cert"),
            (&mut self.key, key, "tls_key"),
        ] {
            if let Some(path) = value {
                *slot = Some((path, name(setting)));
            }
        }
    }

    /// The SDK's TLS settings (files read now); `None` when nothing is set.
    fn config(self) -> Result<Option<strata_client::TlsConfig>, ConfigError> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let mut tls = strata_client::TlsConfig::new();
        if let Some((path, source)) = &self.ca {
            tls = tls
                .ca_file(path)
                .map_err(|e| ConfigError(format!("{source}: {e}")))?;
        }
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some((cert, source)), Some((key, _))) => {
                tls = tls
                    .identity_files(cert, key)
                    .map_err(|e| ConfigError(format!("{source}: {e}")))?;
            }
            (Some((_, source)), None) => {
                return Err(ConfigError(format!(
                    "{source}: a client certificate needs its key (tls_key)"
                )));
            }
            (None, Some((_, source))) => {
                return Err(ConfigError(format!(
                    "{source}: a client key needs its certificate (tls_cert)"
                )));
            }
        }
        Ok(Some(tls))
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad usage, or `--help` / `--version` (clap renders these).
    #[error("{0}")]
    Usage(clap::Error),
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(ConfigError),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, LoadError> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load(
            std::iter::once("strata-sidecar").chain(args.iter().copied()),
            &env,
        )
    }

    #[test]
    fn flags_override_env_which_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("sidecar-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sidecar.toml");
        std::fs::write(
            &file,
            "endpoints = [\"10.0.0.1:7700\"]\nproject = \"vega\"\ntenant = \"from-file\"\n\
             tcp = [\"127.0.0.1:16001=matchmaker\"]\n[routes.matchmaker]\ntimeout = \"2s\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let s = load(&["--config", path], &[("STRATA_TENANT", "from-env")]).unwrap();
        assert_eq!(s.tenant, "from-env");
        assert_eq!(s.project, "vega");
        assert_eq!(s.endpoints, ["10.0.0.1:7700"]);
        assert_eq!(s.tcp[0].service, "matchmaker");
        assert_eq!(s.timeout_for("matchmaker"), Duration::from_secs(2));
        assert_eq!(s.timeout_for("other"), Duration::from_secs(15));
        let s = load(
            &[
                "--config",
                path,
                "--tenant",
                "from-flag",
                "--tcp",
                "127.0.0.1:1=echo",
            ],
            &[("STRATA_TENANT", "from-env")],
        )
        .unwrap();
        assert_eq!(s.tenant, "from-flag");
        assert_eq!(s.tcp.len(), 1);
        assert_eq!(s.tcp[0].service, "echo");
        assert!(!s.tcp[0].accept_proxy && !s.tcp[0].send_proxy);
        let s = load(
            &[
                "--endpoints",
                "x:1",
                "--tenant",
                "t",
                "--tcp",
                "127.0.0.1:1=mm;accept-proxy; send-proxy",
                "--inbound",
                "0.0.0.0:15006=127.0.0.1:8080",
            ],
            &[],
        )
        .unwrap();
        assert!(s.tcp[0].accept_proxy && s.tcp[0].send_proxy);
        assert_eq!(s.tcp[0].service, "mm");
        let inbound = s.inbound.unwrap();
        assert_eq!(inbound.app, "127.0.0.1:8080".parse().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_their_source() {
        let err = load(&["--tenant", "t"], &[]).unwrap_err().to_string();
        assert!(err.contains("endpoints"), "{err}");
        let err = load(
            &["--endpoints", "x:1", "--tenant", "t", "--tcp", "nope"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--tcp"), "{err}");
        let err = load(
            &[
                "--endpoints",
                "x:1",
                "--tenant",
                "t",
                "--tcp",
                "127.0.0.1:1=mm;bogus",
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bogus") && err.contains("accept-proxy"),
            "{err}"
        );
        let err = load(
            &[
                "--endpoints",
                "x:1",
                "--tenant",
                "t",
                "--inbound",
                "127.0.0.1:1",
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--inbound"), "{err}");
        let err = load(&["--endpoints", "x:1"], &[("STRATA_SIDECAR_ADMIN", "bad")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STRATA_SIDECAR_ADMIN"), "{err}");
        let err = load(&["--endpoints", "x:1", "--tenant", "a b"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid tenant"), "{err}");
    }

    #[test]
    fn listener_limits_come_from_flags_env_and_file() {
        let s = load(&["--endpoints", "x:1", "--tenant", "t"], &[]).unwrap();
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.idle_timeout, Duration::from_secs(60));
        assert_eq!(s.max_connections, 1024);

        let dir = std::env::temp_dir().join(format!("sidecar-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sidecar.toml");
        std::fs::write(
            &file,
            "endpoints = [\"x:1\"]\ntenant = \"t\"\nheader_read_timeout = \"3s\"\n\
             idle_timeout = \"30s\"\nmax_connections = 7\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let s = load(&["--config", path], &[]).unwrap();
        assert_eq!(s.header_read_timeout, Duration::from_secs(3));
        assert_eq!(s.idle_timeout, Duration::from_secs(30));
        assert_eq!(s.max_connections, 7);
        let s = load(
            &["--config", path, "--max-connections", "9"],
            &[
                ("STRATA_SIDECAR_MAX_CONNECTIONS", "8"),
                ("STRATA_SIDECAR_IDLE_TIMEOUT", "5s"),
                ("STRATA_SIDECAR_HEADER_READ_TIMEOUT", "2s"),
            ],
        )
        .unwrap();
        assert_eq!(s.max_connections, 9);
        assert_eq!(s.idle_timeout, Duration::from_secs(5));
        assert_eq!(s.header_read_timeout, Duration::from_secs(2));
        std::fs::write(
            &file,
            "endpoints = [\"x:1\"]\ntenant = \"t\"\nmax_connections = 0\n",
        )
        .unwrap();
        let err = load(&["--config", path], &[]).unwrap_err().to_string();
        assert!(
            err.contains("max_connections") && err.contains("at least 1"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let base = ["--endpoints", "x:1", "--tenant", "t"];
        let s = load(&base, &[]).unwrap();
        assert_eq!((s.tenant_learn_rate, s.max_unknown_tenants), (10, 1024));
        let s = load(
            &[&base[..], &["--tenant-learn-rate", "3"]].concat(),
            &[
                ("STRATA_SIDECAR_TENANT_LEARN_RATE", "2"),
                ("STRATA_SIDECAR_MAX_UNKNOWN_TENANTS", "50"),
            ],
        )
        .unwrap();
        assert_eq!((s.tenant_learn_rate, s.max_unknown_tenants), (3, 50));
        let err = load(&[&base[..], &["--max-unknown-tenants", "0"]].concat(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-unknown-tenants"), "{err}");
        let err = load(&[&base[..], &["--idle-timeout", "0s"]].concat(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--idle-timeout"), "{err}");
        let err = load(&base, &[("STRATA_SIDECAR_MAX_CONNECTIONS", "many")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STRATA_SIDECAR_MAX_CONNECTIONS"), "{err}");
        let err = load(
            &[&base[..], &["--header-read-timeout", "soon"]].concat(),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--header-read-timeout"), "{err}");
    }
}
