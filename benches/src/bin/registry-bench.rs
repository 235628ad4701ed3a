#![allow(clippy::print_stdout)]
//! `registry-bench`: the service registry under CD load, against a real
//! release `stratad` (embedded store, data directory on the disk under
//! test) started for the run on a free loopback port.
//!
//! Two measurements:
//!
//! - **register**: N concurrent CD clients (1, 16, 128 by default) each loop
//!   *register a persistent instance with a unique id, then deregister it*,
//!   for a fixed window after a warm-up, over gRPC (N clients spread over
//!   ⌈N / `--clients-per-connection`⌉ HTTP/2 connections) and over the
//!   HTTP/JSON API (one keep-alive HTTP/1.1 connection per client, as a
//!   curl-based CD step would hold). An operation counts when its
//!   acknowledgement — which stratad sends only after the write is durable
//!   and applied to its view — falls inside the window. Reports
//!   registrations/s and deregistrations/s, p50/p99 latency of each, the
//!   store's group commits during the window (from the daemon's
//!   `/metrics`), and CPU used by the daemon, this load generator and
//!   everything else. A fresh daemon per measurement.
//! - **env**: time to make a feature environment ready. `integration` holds
//!   the same services (one instance each, plus base config). Each round
//!   makes a fresh tenant (parent `integration`) by registering 20 services
//!   with `RegisterBranch` (1–2 persistent instances and 2 config layers
//!   each; the first call creates the tenant) — the 20 calls made one after
//!   another (*sequential*) or all at once (*concurrent*), alternating per
//!   round. Measured from the first call: *acked*, until the last call was
//!   acknowledged; *seen*, until a `WatchServices` subscriber on the new
//!   tenant has seen all 20 services resolve to it. The subscriber joins as
//!   soon as the tenant exists (after the first acknowledgement) with
//!   `start_revision` just after the round's starting revision, so it
//!   replays anything it joined too late for and misses nothing. The tenant
//!   is deleted between rounds (not timed).
//!
//! Any failed call, missing push or timeout is an error: the figures are
//! still printed, then the process exits non-zero. The daemon is killed on
//! every way out. Results go to stdout as tables, or as JSON with `--json`
//! (the tables then go to stderr). Run in release mode:
//!
//! ```text
//! cargo build --release -p strata-server -p strata-benches
//! target/release/registry-bench --help
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use strata_benches::daemon::{
    CpuMark, CpuUsage, Stratad, default_stratad, disturbing_processes, histogram_totals,
};
use strata_benches::{
    BoxError, LatencySummary, MachineInfo, block_on, fsync_probe, micros, new_histogram,
    print_report, secs,
};
use strata_proto::v1::admin_service_client::AdminServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::watch_services_response::Kind as WatchKind;
use strata_proto::v1::{
    BranchConfig, CreateTenantRequest, DeleteTenantRequest, DeregisterRequest, Endpoint, Instance,
    InstanceKind, Protocol, RegisterBranchRequest, RegisterRequest, StatusRequest,
    WatchServicesRequest,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Project every measurement works in.
const PROJECT: &str = "bench";
/// The shared environment (parent of every feature tenant).
const INTEGRATION: &str = "integration";

/// Which measurements to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Bench {
    /// Register, then env.
    All,
    /// Registrations and deregistrations per second.
    Register,
    /// Time to make a feature environment ready.
    Env,
}

/// Kind of the instances the register measurement registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// Stays until deregistered (what a CD step registers).
    Persistent,
    /// Under a lease granted per registration.
    Ephemeral,
}

/// How the register measurement talks to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    Grpc,
    Http,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Grpc => "gRPC",
            Self::Http => "HTTP",
        }
    }
}

/// How the 20 calls of an environment round are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum EnvMode {
    Sequential,
    Concurrent,
}

/// Service registry load: CD registrations and feature environments.
#[derive(Debug, Parser, Serialize)]
#[command(version, about)]
struct Args {
    /// The `stratad` binary (default: `$STRATAD_BIN`, else the one next to
    /// this binary, i.e. `target/release/stratad`).
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// Directory for the daemons' temporary data dirs (default: the system
    /// temp dir). Must be on the disk under test, not tmpfs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which measurements to run.
    #[arg(long, value_enum, default_value_t = Bench::All)]
    bench: Bench,
    /// Concurrent CD client counts over gRPC.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 16, 128])]
    clients: Vec<usize>,
    /// Concurrent CD client counts over HTTP/JSON (0: skip).
    #[arg(long, value_delimiter = ',', default_values_t = [128_usize])]
    http_clients: Vec<usize>,
    /// gRPC clients per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    clients_per_connection: usize,
    /// Warm-up before each register measurement, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Length of each register measurement, seconds.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Kind of instance the register measurement registers.
    #[arg(long, value_enum, default_value_t = Kind::Persistent)]
    kind: Kind,
    /// Measured rounds per environment mode.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Unmeasured rounds per mode before them.
    #[arg(long, default_value_t = 3)]
    warmup_rounds: usize,
    /// Services registered per environment (at most 1000).
    #[arg(long, default_value_t = 20)]
    services: usize,
    /// Longest a round may take until the subscriber has seen everything,
    /// seconds.
    #[arg(long, default_value_t = 10.0)]
    env_timeout_secs: f64,
    /// Tokio worker threads of this load generator (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Print the results as JSON on stdout (tables go to stderr).
    #[arg(long)]
    json: bool,
}

/// The store's group commits during a window, from the daemon's metrics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct StoreStats {
    /// Batches committed (one redb transaction and one fsync each).
    commits: u64,
    /// Mean requests per batch.
    mean_batch: f64,
    /// Mean time to apply and commit one batch, ms.
    mean_commit_ms: f64,
    /// Share of the window the writer thread spent committing.
    writer_busy: f64,
}

/// Server-side mean time per request, from `strata_rpc_duration_seconds`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct ServerTimes {
    register_ms: f64,
    deregister_ms: f64,
}

/// Result of one register measurement.
#[derive(Debug, Serialize)]
struct RegisterResult {
    transport: Transport,
    clients: usize,
    connections: usize,
    seconds: f64,
    /// Acknowledged inside the window.
    registrations: u64,
    deregistrations: u64,
    registrations_per_sec: f64,
    deregistrations_per_sec: f64,
    /// Both together: durable writes per second.
    ops_per_sec: f64,
    /// Call → acknowledgement, as the client sees it.
    register: LatencySummary,
    deregister: LatencySummary,
    /// Same, as the daemon's request metrics see it (mean only).
    server: ServerTimes,
    store: StoreStats,
    errors: u64,
    first_error: Option<String>,
    cpu: CpuUsage,
    /// Compilers and other benchmarks running at the start or the end.
    disturbed_by: Vec<String>,
}

/// Result of one environment mode over all measured rounds.
#[derive(Debug, Serialize)]
struct EnvResult {
    mode: EnvMode,
    services: usize,
    rounds: usize,
    /// First call → last acknowledgement.
    acked: LatencySummary,
    /// First call → the subscriber has seen every service resolve to the new
    /// tenant.
    seen: LatencySummary,
    /// Each `RegisterBranch` call.
    call: LatencySummary,
    /// Revisions written per round (mean): concurrent calls that lost the
    /// race to create the tenant are re-planned, not retried by the client.
    revisions_per_round: f64,
    errors: u64,
    first_error: Option<String>,
    cpu: CpuUsage,
    disturbed_by: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: MachineInfo,
    /// 4 KiB write + fdatasync in the data directory's file system, before
    /// the measurements: the floor of one durable commit at that moment.
    disk_fdatasync: LatencySummary,
    stratad: PathBuf,
    args: Args,
    register: Vec<RegisterResult>,
    env: Vec<EnvResult>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    run().map_err(|e| e as Box<dyn std::error::Error>)
}

fn run() -> Result<(), BoxError> {
    let args = Args::parse();
    if args.clients_per_connection == 0 || args.services == 0 || args.services > 1000 {
        return Err("--clients-per-connection must be positive, --services 1..=1000".into());
    }
    let report = block_on(args.worker_threads, bench(args))?;

    let tables = render(&report);
    print_report(&tables, &report, report.args.json)?;
    let mut failed = Vec::new();
    for r in report.register.iter().filter(|r| r.errors > 0) {
        failed.push(format!(
            "{} with {} clients: {} errors (first: {})",
            r.transport.name(),
            r.clients,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
    for r in report.env.iter().filter(|r| r.errors > 0) {
        failed.push(format!(
            "env {:?}: {} errors (first: {})",
            r.mode,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
    if !failed.is_empty() {
        return Err(format!("ERRORS: {}", failed.join("; ")).into());
    }
    Ok(())
}

async fn bench(args: Args) -> Result<Report, BoxError> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)?;
    let machine = MachineInfo::probe(&parent);
    let stratad = match &args.stratad {
        Some(p) => p.clone(),
        None => default_stratad()?,
    };
    eprintln!(
        "registry-bench: {} CPUs; stratad {}; data in {} ({} on {})",
        machine.cpus,
        stratad.display(),
        machine.dir.display(),
        machine.fs_type.as_deref().unwrap_or("?"),
        machine.device.as_deref().unwrap_or("?"),
    );
    if machine.in_memory() {
        eprintln!("WARNING: the data directory is in memory; pass --dir on a disk");
    }
    let disk_fdatasync = fsync_probe(&parent, 200)?;
    eprintln!(
        "disk: 4 KiB write + fdatasync p50 {:.2} ms, p99 {:.2} ms",
        disk_fdatasync.p50_ms, disk_fdatasync.p99_ms
    );
    let busy = disturbing_processes();
    if !busy.is_empty() {
        eprintln!("WARNING: running now: {}", busy.join(", "));
    }
    let mut register = Vec::new();
    let mut env = Vec::new();
    if matches!(args.bench, Bench::All | Bench::Register) {
        let runs = args
            .clients
            .iter()
            .map(|&n| (Transport::Grpc, n))
            .chain(args.http_clients.iter().map(|&n| (Transport::Http, n)))
            .filter(|(_, n)| *n > 0);
        for (transport, n) in runs {
            eprintln!(
                "register/deregister: {} clients over {} ...",
                n,
                transport.name()
            );
            let mut daemon = Stratad::start(&stratad, &parent, "strata-regbench-").await?;
            let result = measure_register(&daemon, transport, n, &args).await;
            daemon.check_alive()?;
            let stopped = daemon.stop().await;
            let r = result?;
            stopped?;
            eprintln!(
                "  {:.0} registrations/s, {:.0} deregistrations/s; register p50 {:.2} ms p99 \
                 {:.2} ms; {} errors",
                r.registrations_per_sec,
                r.deregistrations_per_sec,
                r.register.p50_ms,
                r.register.p99_ms,
                r.errors
            );
            register.push(r);
        }
    }
    if matches!(args.bench, Bench::All | Bench::Env) {
        eprintln!(
            "environment ready: {} services, {} rounds per mode ...",
            args.services, args.rounds
        );
        let mut daemon = Stratad::start(&stratad, &parent, "strata-envbench-").await?;
        let result = measure_env(&daemon, &args).await;
        daemon.check_alive()?;
        let stopped = daemon.stop().await;
        env = result?;
        stopped?;
        for r in &env {
            eprintln!(
                "  {:?}: acked p50 {:.1} ms p99 {:.1} ms; seen p50 {:.1} ms p99 {:.1} ms",
                r.mode, r.acked.p50_ms, r.acked.p99_ms, r.seen.p50_ms, r.seen.p99_ms
            );
        }
    }
    Ok(Report {
        machine,
        disk_fdatasync,
        stratad,
        args,
        register,
        env,
    })
}

async fn connect(endpoint: &str) -> Result<Channel, BoxError> {
    Ok(
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?,
    )
}

async fn create_tenant(channel: &Channel, name: &str, parent: &str) -> Result<(), BoxError> {
    TenantServiceClient::new(channel.clone())
        .create_tenant(CreateTenantRequest {
            project: PROJECT.into(),
            name: name.into(),
            parent: parent.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// The instance a CD client registers: two endpoints, a little metadata, no
/// check (a check would start a prober per instance and measure that too).
fn instance(id: String, kind: Kind, n: usize) -> Instance {
    let host = format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
    Instance {
        id,
        endpoints: HashMap::from([
            (
                "main".to_owned(),
                Endpoint {
                    address: format!("{host}:7000"),
                    protocol: Protocol::Grpc as i32,
                },
            ),
            (
                "metrics".to_owned(),
                Endpoint {
                    address: format!("{host}:9100"),
                    protocol: Protocol::Http as i32,
                },
            ),
        ]),
        protocol: Protocol::Http as i32,
        metadata: HashMap::from([
            ("commit".to_owned(), "3f9c2ab".to_owned()),
            ("zone".to_owned(), "eu-1a".to_owned()),
        ]),
        version: "1.42.0".into(),
        kind: match kind {
            Kind::Persistent => InstanceKind::Persistent,
            Kind::Ephemeral => InstanceKind::Ephemeral,
        } as i32,
        ttl_seconds: if kind == Kind::Ephemeral { 30 } else { 0 },
        ..Default::default()
    }
}

/// The same instance as the HTTP/JSON body of a registration.
fn instance_json(id: &str, kind: Kind, n: usize) -> String {
    let host = format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
    let kind = match kind {
        Kind::Persistent => r#""kind":"persistent""#,
        Kind::Ephemeral => r#""kind":"ephemeral","ttl_seconds":30"#,
    };
    format!(
        r#"{{"id":"{id}","endpoints":{{"main":{{"address":"{host}:7000","protocol":"grpc"}},"metrics":"{host}:9100"}},"protocol":"http",{kind},"metadata":{{"commit":"3f9c2ab","zone":"eu-1a"}},"version":"1.42.0"}}"#
    )
}

/// A keep-alive HTTP/1.1 connection, as one curl-based CD step holds.
struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<String>,
    host: String,
    _driver: JoinHandle<()>,
}

impl HttpConn {
    async fn open(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        // As curl does: requests are small and answered one at a time.
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
            _driver: driver,
        })
    }

    /// One request; the status and the body.
    async fn call(
        &mut self,
        method: http::Method,
        path: &str,
        body: String,
    ) -> Result<(u16, Vec<u8>), BoxError> {
        self.sender.ready().await?;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                out.extend_from_slice(&data);
            }
        }
        Ok((status, out))
    }
}

/// One CD client's connection to the daemon.
enum Client {
    Grpc(RegistryServiceClient<Channel>),
    Http(HttpConn),
}

impl Client {
    async fn register(
        &mut self,
        service: &str,
        id: &str,
        kind: Kind,
        n: usize,
    ) -> Result<(), BoxError> {
        match self {
            Self::Grpc(c) => {
                c.register(RegisterRequest {
                    project: PROJECT.into(),
                    tenant: INTEGRATION.into(),
                    service: service.into(),
                    instance: Some(instance(id.to_owned(), kind, n)),
                    lease_id: 0,
                })
                .await?;
            }
            Self::Http(c) => {
                let path = format!(
                    "/v1/projects/{PROJECT}/tenants/{INTEGRATION}/services/{service}/instances"
                );
                let (status, body) = c
                    .call(http::Method::POST, &path, instance_json(id, kind, n))
                    .await?;
                if status != 201 {
                    return Err(format!(
                        "POST {path}: {status} {}",
                        String::from_utf8_lossy(&body)
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    async fn deregister(&mut self, service: &str, id: &str) -> Result<(), BoxError> {
        match self {
            Self::Grpc(c) => {
                c.deregister(DeregisterRequest {
                    project: PROJECT.into(),
                    tenant: INTEGRATION.into(),
                    service: service.into(),
                    id: id.into(),
                })
                .await?;
            }
            Self::Http(c) => {
                let path = format!(
                    "/v1/projects/{PROJECT}/tenants/{INTEGRATION}/services/{service}/instances/{id}"
                );
                let (status, body) = c.call(http::Method::DELETE, &path, String::new()).await?;
                if status != 200 {
                    return Err(format!(
                        "DELETE {path}: {status} {}",
                        String::from_utf8_lossy(&body)
                    )
                    .into());
                }
            }
        }
        Ok(())
    }
}

/// What one client task saw in the window.
struct ClientRecord {
    register: Histogram<u64>,
    deregister: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Loops register → deregister until `end`; records operations
/// acknowledged in `[start, end)`.
async fn cd_client(
    mut client: Client,
    index: usize,
    kind: Kind,
    start: Instant,
    end: Instant,
) -> Result<ClientRecord, BoxError> {
    let mut record = ClientRecord {
        register: new_histogram()?,
        deregister: new_histogram()?,
        errors: 0,
        first_error: None,
    };
    let service = format!("svc-{index:03}");
    let mut seq = 0_usize;
    let in_window = |at: Instant| at >= start && at < end;
    while Instant::now() < end {
        seq += 1;
        let id = format!("c{index:03}-{seq}");
        let began = Instant::now();
        let registered = client
            .register(&service, &id, kind, index * 65_536 + seq)
            .await;
        let acked = Instant::now();
        if let Err(e) = registered {
            record.errors += 1;
            record
                .first_error
                .get_or_insert_with(|| format!("register: {e}"));
            // A failing daemon must not turn the loop into a busy spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if in_window(acked) {
            record.register.saturating_record(micros(acked - began));
        }
        let began = Instant::now();
        let deregistered = client.deregister(&service, &id).await;
        let acked = Instant::now();
        match deregistered {
            Ok(()) if in_window(acked) => {
                record.deregister.saturating_record(micros(acked - began));
            }
            Ok(()) => {}
            Err(e) => {
                record.errors += 1;
                record
                    .first_error
                    .get_or_insert_with(|| format!("deregister: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(record)
}

/// The daemon's metrics that describe a window, read at its start and end.
struct MetricsMark {
    batch: (f64, f64),
    write: (f64, f64),
    register: (f64, f64),
    deregister: (f64, f64),
}

impl MetricsMark {
    async fn take(daemon: &Stratad, transport: Transport) -> Result<Self, BoxError> {
        let text = daemon.metrics().await?;
        let (register, deregister) = match transport {
            Transport::Grpc => (
                r#"op="/strata.v1.RegistryService/Register""#,
                r#"op="/strata.v1.RegistryService/Deregister""#,
            ),
            Transport::Http => (
                r#"op="POST /v1/projects/{project}/tenants/{tenant}/services/{service}/instances""#,
                r#"op="DELETE /v1/projects/{project}/tenants/{tenant}/services/{service}/instances/{id}""#,
            ),
        };
        Ok(Self {
            batch: histogram_totals(&text, "strata_store_write_batch_size", ""),
            write: histogram_totals(&text, "strata_store_write_duration_seconds", ""),
            register: histogram_totals(&text, "strata_rpc_duration_seconds", register),
            deregister: histogram_totals(&text, "strata_rpc_duration_seconds", deregister),
        })
    }

    fn since(&self, start: &Self, seconds: f64) -> (StoreStats, ServerTimes) {
        let delta = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
        let mean = |(sum, count): (f64, f64)| if count > 0.0 { sum / count } else { 0.0 };
        let batch = delta(self.batch, start.batch);
        let write = delta(self.write, start.write);
        let store = StoreStats {
            commits: batch.1.max(0.0) as u64,
            mean_batch: mean(batch),
            mean_commit_ms: mean(write) * 1000.0,
            writer_busy: if seconds > 0.0 {
                write.0 / seconds
            } else {
                0.0
            },
        };
        let server = ServerTimes {
            register_ms: mean(delta(self.register, start.register)) * 1000.0,
            deregister_ms: mean(delta(self.deregister, start.deregister)) * 1000.0,
        };
        (store, server)
    }
}

async fn measure_register(
    daemon: &Stratad,
    transport: Transport,
    n: usize,
    args: &Args,
) -> Result<RegisterResult, BoxError> {
    let endpoint = daemon.endpoint();
    let setup = connect(&endpoint).await?;
    create_tenant(&setup, INTEGRATION, "").await?;

    let connections = match transport {
        Transport::Grpc => n.div_ceil(args.clients_per_connection),
        Transport::Http => n,
    };
    let mut clients = Vec::with_capacity(n);
    match transport {
        Transport::Grpc => {
            let mut channels = Vec::with_capacity(connections);
            for _ in 0..connections {
                channels.push(connect(&endpoint).await?);
            }
            for i in 0..n {
                clients.push(Client::Grpc(RegistryServiceClient::new(
                    channels[i % connections].clone(),
                )));
            }
        }
        Transport::Http => {
            for _ in 0..n {
                clients.push(Client::Http(HttpConn::open(daemon.addr()).await?));
            }
        }
    }

    let mut disturbed_by = disturbing_processes();
    let warmup = secs(args.warmup_secs, "--warmup-secs")?;
    let window = secs(args.duration_secs, "--duration-secs")?;
    let start = Instant::now() + warmup;
    let end = start + window;
    let tasks: Vec<JoinHandle<Result<ClientRecord, BoxError>>> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(cd_client(c, i, args.kind, start, end)))
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let cpu_start = CpuMark::take(daemon.pid());
    let metrics_start = MetricsMark::take(daemon, transport).await?;
    tokio::time::sleep_until(end.into()).await;
    let cpu = CpuMark::take(daemon.pid()).since(cpu_start);
    let metrics_end = MetricsMark::take(daemon, transport).await?;
    disturbed_by.extend(disturbing_processes());
    disturbed_by.sort();
    disturbed_by.dedup();

    let mut register = new_histogram()?;
    let mut deregister = new_histogram()?;
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let r = t.await??;
        register.add(&r.register)?;
        deregister.add(&r.deregister)?;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let seconds = window.as_secs_f64();
    let (store, server) = metrics_end.since(&metrics_start, seconds);
    Ok(RegisterResult {
        transport,
        clients: n,
        connections,
        seconds,
        registrations: register.len(),
        deregistrations: deregister.len(),
        registrations_per_sec: register.len() as f64 / seconds,
        deregistrations_per_sec: deregister.len() as f64 / seconds,
        ops_per_sec: (register.len() + deregister.len()) as f64 / seconds,
        register: LatencySummary::from_micros(&register),
        deregister: LatencySummary::from_micros(&deregister),
        server,
        store,
        errors,
        first_error,
        cpu,
        disturbed_by,
    })
}

/// Name of the `i`th service of an environment.
fn env_service(i: usize) -> String {
    format!("svc-{i:03}")
}

/// The branch registration of service `i` in `tenant`.
fn branch_request(tenant: &str, parent: &str, i: usize) -> RegisterBranchRequest {
    let service = env_service(i);
    // 1 or 2 instances, alternating.
    let instances = (0..1 + i % 2)
        .map(|k| {
            let mut inst = instance(
                format!("{service}-{tenant}-{k}"),
                Kind::Persistent,
                i * 2 + k,
            );
            inst.metadata.insert("branch".into(), tenant.into());
            inst
        })
        .collect();
    let features = if parent.is_empty() {
        format!(r#"{{"flags":{{"new_matchmaking":false,"fast_login":true}},"build":"{tenant}"}}"#)
    } else {
        format!(r#"{{"flags":{{"new_matchmaking":true}},"build":"{tenant}"}}"#)
    };
    RegisterBranchRequest {
        project: PROJECT.into(),
        tenant: tenant.into(),
        service: service.clone(),
        parent: parent.into(),
        instances,
        config: vec![
            BranchConfig {
                key: format!("{service}/server.yaml"),
                value: format!(
                    "host: {service}.{tenant}.svc\nport: 7000\nreplicas: 2\nlog_level: debug\n\
                     database:\n  url: postgres://db.{tenant}.svc/{service}\n  pool: 16\n"
                )
                .into_bytes(),
                format: "yaml".into(),
                mode: "replace".into(),
            },
            BranchConfig {
                key: format!("{service}/features.json"),
                value: features.into_bytes(),
                format: "json".into(),
                mode: if parent.is_empty() {
                    "replace"
                } else {
                    "merge"
                }
                .into(),
            },
        ],
        ..Default::default()
    }
}

/// What one environment round measured.
struct EnvSample {
    acked: Duration,
    seen: Duration,
    calls: Vec<Duration>,
    revisions: i64,
}

/// Subscribes to `tenant` once `exists` fires, from `start_revision`, and
/// returns when every service of `expected` (name → instance count)
/// resolves to `tenant` with that many instances.
async fn env_watcher(
    mut registry: RegistryServiceClient<Channel>,
    tenant: String,
    expected: HashMap<String, usize>,
    start_revision: i64,
    exists: Arc<Notify>,
    t0: Instant,
) -> Result<Duration, BoxError> {
    exists.notified().await;
    let mut stream = registry
        .watch_services(WatchServicesRequest {
            project: PROJECT.into(),
            tenant: tenant.clone(),
            services: Vec::new(),
            start_revision,
        })
        .await?
        .into_inner();
    let mut resolved: HashMap<String, (String, usize)> = HashMap::new();
    while let Some(message) = stream.next().await {
        let m = message?;
        if m.kind == WatchKind::Snapshot as i32 || m.reset {
            resolved.clear();
        }
        for s in m.services {
            if s.tenant.is_empty() {
                resolved.remove(&s.service);
            } else {
                resolved.insert(s.service, (s.tenant, s.instances.len()));
            }
        }
        let ready = expected.iter().all(|(service, count)| {
            resolved
                .get(service)
                .is_some_and(|(t, n)| *t == tenant && n == count)
        });
        if ready {
            return Ok(t0.elapsed());
        }
    }
    Err("the services watch ended before every service resolved to the new tenant".into())
}

async fn env_round(
    channels: &[Channel],
    admin: &mut AdminServiceClient<Channel>,
    tenant: &str,
    mode: EnvMode,
    services: usize,
    timeout: Duration,
) -> Result<EnvSample, BoxError> {
    let before = admin
        .status(StatusRequest::default())
        .await?
        .into_inner()
        .revision;
    let expected: HashMap<String, usize> =
        (0..services).map(|i| (env_service(i), 1 + i % 2)).collect();
    let exists = Arc::new(Notify::new());
    let t0 = Instant::now();
    let watcher = tokio::spawn(env_watcher(
        RegistryServiceClient::new(channels[0].clone()),
        tenant.to_owned(),
        expected,
        before + 1,
        Arc::clone(&exists),
        t0,
    ));
    // Aborts the watcher on every way out; a no-op once it has finished.
    let abort = watcher.abort_handle();
    let _abort = scopeguard(move || abort.abort());

    let call = |i: usize| {
        let mut client = RegistryServiceClient::new(channels[i % channels.len()].clone());
        let request = branch_request(tenant, INTEGRATION, i);
        let exists = Arc::clone(&exists);
        async move {
            let began = Instant::now();
            client.register_branch(request).await?;
            // A stored permit, so the watcher wakes even if it is not
            // waiting yet; later acks add nothing.
            exists.notify_one();
            Ok::<Duration, BoxError>(began.elapsed())
        }
    };
    let calls: Vec<Duration> = match mode {
        EnvMode::Sequential => {
            let mut out = Vec::with_capacity(services);
            for i in 0..services {
                out.push(call(i).await?);
            }
            out
        }
        EnvMode::Concurrent => {
            let tasks: Vec<JoinHandle<Result<Duration, BoxError>>> =
                (0..services).map(|i| tokio::spawn(call(i))).collect();
            let mut out = Vec::with_capacity(services);
            for t in tasks {
                out.push(t.await??);
            }
            out
        }
    };
    let acked = t0.elapsed();
    let seen = tokio::time::timeout(timeout, watcher)
        .await
        .map_err(|_| {
            format!("{tenant}: the subscriber had not seen every service after {timeout:?}")
        })???;
    let after = admin
        .status(StatusRequest::default())
        .await?
        .into_inner()
        .revision;
    Ok(EnvSample {
        acked,
        seen,
        calls,
        revisions: after - before,
    })
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

async fn measure_env(daemon: &Stratad, args: &Args) -> Result<Vec<EnvResult>, BoxError> {
    let endpoint = daemon.endpoint();
    let connections = args.services.div_ceil(args.clients_per_connection).max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&endpoint).await?);
    }
    let mut admin = AdminServiceClient::new(channels[0].clone());
    let mut tenants = TenantServiceClient::new(channels[0].clone());
    let mut registry = RegistryServiceClient::new(channels[0].clone());
    // `integration` runs every service, so each starts out resolving there
    // by fallback and switches when the feature tenant registers it.
    for i in 0..args.services {
        registry
            .register_branch(branch_request(INTEGRATION, "", i))
            .await?;
    }
    let timeout = secs(args.env_timeout_secs, "--env-timeout-secs")?;
    let modes = [EnvMode::Sequential, EnvMode::Concurrent];
    let mut acked: Vec<Histogram<u64>> = Vec::new();
    let mut seen: Vec<Histogram<u64>> = Vec::new();
    let mut calls: Vec<Histogram<u64>> = Vec::new();
    for _ in modes {
        acked.push(new_histogram()?);
        seen.push(new_histogram()?);
        calls.push(new_histogram()?);
    }
    let mut revisions = [0_i64; 2];
    let mut errors = [0_u64; 2];
    let mut first_error: [Option<String>; 2] = [None, None];
    let mut disturbed_by = disturbing_processes();
    let cpu_start = CpuMark::take(daemon.pid());
    for round in 0..args.warmup_rounds + args.rounds {
        let measured = round >= args.warmup_rounds;
        for (m, mode) in modes.iter().enumerate() {
            let tenant = format!(
                "feat-{round}-{}",
                match mode {
                    EnvMode::Sequential => "seq",
                    EnvMode::Concurrent => "con",
                }
            );
            let sample = env_round(
                &channels,
                &mut admin,
                &tenant,
                *mode,
                args.services,
                timeout,
            )
            .await;
            match sample {
                Ok(s) if measured => {
                    acked[m].saturating_record(micros(s.acked));
                    seen[m].saturating_record(micros(s.seen));
                    for c in s.calls {
                        calls[m].saturating_record(micros(c));
                    }
                    revisions[m] += s.revisions;
                }
                Ok(_) => {}
                Err(e) => {
                    errors[m] += 1;
                    first_error[m].get_or_insert_with(|| format!("{tenant}: {e}"));
                }
            }
            // Not timed: keeps the daemon's state the same size every round.
            let deleted = tenants
                .delete_tenant(DeleteTenantRequest {
                    project: PROJECT.into(),
                    name: tenant.clone(),
                    force: true,
                })
                .await;
            if let Err(e) = deleted
                && e.code() != tonic::Code::NotFound
            {
                errors[m] += 1;
                first_error[m].get_or_insert_with(|| format!("delete {tenant}: {e}"));
            }
        }
    }
    let cpu = CpuMark::take(daemon.pid()).since(cpu_start);
    disturbed_by.extend(disturbing_processes());
    disturbed_by.sort();
    disturbed_by.dedup();
    Ok(modes
        .iter()
        .enumerate()
        .map(|(m, mode)| EnvResult {
            mode: *mode,
            services: args.services,
            rounds: acked[m].len() as usize,
            acked: LatencySummary::from_micros(&acked[m]),
            seen: LatencySummary::from_micros(&seen[m]),
            call: LatencySummary::from_micros(&calls[m]),
            revisions_per_round: if acked[m].is_empty() {
                0.0
            } else {
                revisions[m] as f64 / acked[m].len() as f64
            },
            errors: errors[m],
            first_error: first_error[m].take(),
            cpu,
            disturbed_by: disturbed_by.clone(),
        })
        .collect())
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let a = &report.args;
    let _ = writeln!(
        out,
        "registry-bench — stratad service registry under CD load"
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}); data in {} ({} on {}){}",
        m.cpus,
        m.cpu_model.as_deref().unwrap_or("unknown CPU"),
        m.dir.display(),
        m.fs_type.as_deref().unwrap_or("?"),
        m.device.as_deref().unwrap_or("?"),
        if m.in_memory() { " — IN MEMORY" } else { "" }
    );
    let d = &report.disk_fdatasync;
    let _ = writeln!(
        out,
        "disk: 4 KiB write + fdatasync p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        d.p50_ms, d.p99_ms, d.max_ms, d.count
    );
    if !report.register.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Register → deregister loops ({:?} instances; {} s window after {} s warm-up; \
             latencies in ms; CPU in CPU-seconds over the window)",
            a.kind, a.duration_secs, a.warmup_secs
        );
        let _ = writeln!(
            out,
            "transport clients conns |  reg/s dereg/s   ops/s | reg p50  p99 | dereg p50  p99 \
             | srv reg dereg | commits batch commit |  cpu srv bench other | err"
        );
        for r in &report.register {
            let _ = writeln!(
                out,
                "{:<9} {:>7} {:>5} | {:>6.0} {:>7.0} {:>7.0} | {:>7.2} {:>4.1} | {:>9.2} {:>4.1} \
                 | {:>7.2} {:>5.2} | {:>7} {:>5.1} {:>6.2} | {:>8.1} {:>5.1} {:>5.1} | {:>3}{}",
                r.transport.name(),
                r.clients,
                r.connections,
                r.registrations_per_sec,
                r.deregistrations_per_sec,
                r.ops_per_sec,
                r.register.p50_ms,
                r.register.p99_ms,
                r.deregister.p50_ms,
                r.deregister.p99_ms,
                r.server.register_ms,
                r.server.deregister_ms,
                r.store.commits,
                r.store.mean_batch,
                r.store.mean_commit_ms,
                r.cpu.server,
                r.cpu.bench,
                r.cpu.other,
                r.errors,
                if r.disturbed_by.is_empty() {
                    String::new()
                } else {
                    format!("  (disturbed: {})", r.disturbed_by.join(", "))
                }
            );
        }
    }
    if !report.env.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Feature environment ready ({} services, RegisterBranch each with 1–2 instances + 2 \
             config layers; ms)",
            a.services
        );
        let _ = writeln!(
            out,
            "mode        rounds | acked p50   p99   max |  seen p50   p99   max | call p50  p99 \
             | revs/round | err"
        );
        for r in &report.env {
            let _ = writeln!(
                out,
                "{:<11} {:>6} | {:>9.1} {:>5.1} {:>5.1} | {:>9.1} {:>5.1} {:>5.1} | {:>8.2} \
                 {:>4.1} | {:>10.1} | {:>3}",
                format!("{:?}", r.mode).to_lowercase(),
                r.rounds,
                r.acked.p50_ms,
                r.acked.p99_ms,
                r.acked.max_ms,
                r.seen.p50_ms,
                r.seen.p99_ms,
                r.seen.max_ms,
                r.call.p50_ms,
                r.call.p99_ms,
                r.revisions_per_round,
                r.errors
            );
        }
        if let Some(r) = report.env.first() {
            let _ = writeln!(
                out,
                "CPU over all rounds: {:.1} s wall, stratad {:.1}, bench {:.1}, other {:.1}{}",
                r.cpu.wall,
                r.cpu.server,
                r.cpu.bench,
                r.cpu.other,
                if r.disturbed_by.is_empty() {
                    String::new()
                } else {
                    format!("  (disturbed: {})", r.disturbed_by.join(", "))
                }
            );
        }
    }
    out
}
