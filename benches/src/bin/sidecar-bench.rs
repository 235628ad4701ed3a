#![allow(clippy::print_stdout)]
//! `sidecar-bench`: what `strata-sidecar` adds to a call, against nginx as
//! a reverse proxy in the same run (the targets in benches/SIDECAR.md).
//!
//! One upstream (a hyper server in this process on its own single-thread
//! runtime: `GET /` answers `ok`, a gRPC POST answers a framed
//! `HealthCheckResponse{SERVING}` with `grpc-status: 0` trailers), a
//! release `stratad` with the upstream registered as `echo` (http) and
//! `grpcecho` (grpc) in `integration`, a `strata-sidecar` for
//! `integration`, and nginx (`proxy_pass` with upstream keep-alive) — the
//! sidecar and nginx with the same number of worker threads/processes.
//! All on loopback. For each round and target (direct, nginx, sidecar):
//!
//! - **latency**: `wrk -t1 -c1 --latency` (one connection, one request
//!   at a time), p50/p99 — a proxy's added latency is its p50/p99 minus
//!   direct's;
//! - **throughput**: `wrk -t1 -cN --latency`, requests/s and p50/p99;
//! - **gRPC unary**: `h2load -cN -m10` posting a
//!   `grpc.health.v1.Health/Check`, requests/s (nginx through
//!   `grpc_pass`).
//!
//! Each run also reports CPU time per request (user + system, from
//! `/proc/<pid>/stat` before and after) of the load generator, the
//! upstream thread and the proxy, and how many cores the three kept busy:
//! on a small machine they share the cores, so a proxy's throughput is
//! bounded by its CPU per request relative to theirs.
//!
//! Needs `wrk`, `h2load` (Debian `nghttp2-client`) and `nginx` on PATH or
//! given by flag. Run under the exclusive bench lock:
//!
//! ```text
//! cargo build --release -p strata-server -p strata-sidecar -p strata-benches
//! flock -x /tmp/strata/bench.lock target/release/sidecar-bench
//! ```

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use strata_benches::BoxError;
use strata_benches::daemon::{Stratad, default_stratad, free_port, readyz};
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::{
    CreateTenantRequest, Endpoint, Instance, InstanceKind, Protocol, RegisterRequest,
};

#[derive(Debug, Parser)]
#[command(about = "strata-sidecar vs nginx vs direct: added latency and throughput")]
struct Args {
    /// Seconds per wrk/h2load run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Connections for the throughput and gRPC runs.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Worker threads of the sidecar and worker processes of nginx.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Rounds (targets alternate within a round).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// stratad binary (default: next to this one).
    #[arg(long)]
    stratad: Option<PathBuf>,
    /// strata-sidecar binary (default: next to this one).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// nginx binary.
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// wrk binary.
    #[arg(long, default_value = "wrk")]
    wrk: String,
    /// h2load binary.
    #[arg(long, default_value = "h2load")]
    h2load: String,
    /// Targets to run (comma separated: direct, nginx, sidecar), e.g. to
    /// profile one of them.
    #[arg(long, value_delimiter = ',', default_value = "direct,nginx,sidecar")]
    targets: Vec<String>,
    /// Modes to run (comma separated: latency, throughput, grpc).
    #[arg(long, value_delimiter = ',', default_value = "latency,throughput,grpc")]
    modes: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// A child killed on drop.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SIGTERM first so nginx's master takes its workers along.
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        let _ = self.1;
    }
}

/// Framed `HealthCheckResponse { status: SERVING }`.
const GRPC_REPLY: &[u8] = &[0, 0, 0, 0, 2, 8, 1];

type UpBody = Either<
    Full<Bytes>,
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
>;

async fn upstream_answer(req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        // Read the request to its end before answering, as a server does.
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(GRPC_REPLY))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut response = Response::new(Either::Right(StreamBody::new(futures::stream::iter(
            frames,
        ))));
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        return Ok(response);
    }
    Ok(Response::new(Either::Left(Full::new(Bytes::from_static(
        b"ok",
    )))))
}

/// Starts the upstream on its own thread and single-thread runtime.
fn start_upstream() -> Result<SocketAddr, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service_fn(upstream_answer))
                        .into_owned();
                    tokio::spawn(conn);
                }
            });
        })?;
    Ok(addr)
}

async fn register(stratad: &Stratad, upstream: SocketAddr) -> Result<(), BoxError> {
    let channel = tonic::transport::Endpoint::from_shared(stratad.endpoint())?
        .connect()
        .await?;
    TenantServiceClient::new(channel.clone())
        .create_tenant(CreateTenantRequest {
            project: "bench".into(),
            name: "integration".into(),
            ..Default::default()
        })
        .await?;
    for (service, protocol) in [("echo", Protocol::Http), ("grpcecho", Protocol::Grpc)] {
        RegistryServiceClient::new(channel.clone())
            .register(RegisterRequest {
                project: "bench".into(),
                tenant: "integration".into(),
                service: service.into(),
                instance: Some(Instance {
                    id: format!("{service}-1"),
                    endpoints: [(
                        "main".to_owned(),
                        Endpoint {
                            address: upstream.to_string(),
                            protocol: protocol as i32,
                        },
                    )]
                    .into(),
                    kind: InstanceKind::Persistent as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

fn sibling(name: &str) -> Result<PathBuf, BoxError> {
    Ok(std::env::current_exe()?.with_file_name(name))
}

async fn start_sidecar(
    bin: &Path,
    stratad: &Stratad,
    workers: u32,
) -> Result<(Proc, SocketAddr), BoxError> {
    let outbound: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let child = Command::new(bin)
        .args(["--endpoints", &stratad.endpoint(), "--project", "bench"])
        .args(["--tenant", "integration", "--log", "warn"])
        .args([
            "--outbound",
            &outbound.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .args(["--worker-threads", &workers.to_string()])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let proc = Proc(child, "strata-sidecar");
    for _ in 0..200 {
        if readyz(admin).await {
            return Ok((proc, outbound));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("strata-sidecar not ready within 10 s".into())
}

fn start_nginx(
    bin: &str,
    dir: &Path,
    upstream: SocketAddr,
    workers: u32,
) -> Result<(Proc, SocketAddr, SocketAddr), BoxError> {
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    // gRPC: h2c prior knowledge in, `grpc_pass` out over kept-alive
    // upstream connections (nginx uses one per stream, no multiplexing) —
    // the reference for what a mature proxy costs. `keepalive_requests`
    // is raised because h2load does not reconnect after nginx's GOAWAY
    // (default: after 1000 requests per connection).
    let listen_grpc: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let d = dir.display();
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/cb;\n  proxy_temp_path {d}/pt;\n\
           fastcgi_temp_path {d}/ft;\n  uwsgi_temp_path {d}/ut;\n  scgi_temp_path {d}/st;\n\
           upstream echo {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://echo;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n\
           upstream grpcecho {{ server {upstream}; keepalive 512; }}\n\
           server {{\n    listen {listen_grpc} http2;\n    keepalive_requests 100000000;\n    location / {{ grpc_pass grpc://grpcecho; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nginx ({bin}): {e}"))?;
    let proc = Proc(child, "nginx");
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok((proc, listen, listen_grpc));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "nginx not listening; {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    )
    .into())
}

#[derive(Debug, Clone, Default, Serialize)]
struct Run {
    target: String,
    mode: String,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// CPU time (user + system) per request, µs: the load generator
    /// (wrk/h2load), the upstream thread, the proxy (nginx master and
    /// workers, or the sidecar; 0 for direct).
    cpu_client_us: f64,
    cpu_upstream_us: f64,
    cpu_proxy_us: f64,
    /// CPU seconds of those three per wall second (2.0 = both cores).
    cores_busy: f64,
}

/// CPU clock ticks (user + system) from a `/proc/.../stat` line: the
/// process's own (all its threads) and, with `children`, those of its
/// waited-for children.
fn stat_ticks(path: &Path, children: bool) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after the `(comm)`: state is index 0, utime 11, stime 12,
    // cutime 13, cstime 14.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    if children {
        at(13) + at(14)
    } else {
        at(11) + at(12)
    }
}

/// Pids whose parent is `parent` (nginx's workers).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| {
                    let (_, rest) = t.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Where each process's CPU time is read.
struct CpuProbe {
    upstream_thread: PathBuf,
    sidecar: u32,
    nginx: Vec<u32>,
    tick_us: f64,
}

/// Ticks so far of (client, upstream, proxy) for a target.
impl CpuProbe {
    fn new(sidecar: u32, nginx: u32) -> Self {
        let upstream_thread = std::fs::read_dir("/proc/self/task")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                    std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "upstream")
                })
            })
            .map(|p| p.join("stat"))
            .unwrap_or_default();
        let mut nginx_pids = vec![nginx];
        nginx_pids.extend(children_of(nginx));
        let tick_us = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map_or(10_000.0, |hz| 1e6 / hz);
        Self {
            upstream_thread,
            sidecar,
            nginx: nginx_pids,
            tick_us,
        }
    }

    fn sample(&self, target: &str) -> [u64; 3] {
        let proxy = match target {
            "sidecar" => stat_ticks(Path::new(&format!("/proc/{}/stat", self.sidecar)), false),
            "nginx" => self
                .nginx
                .iter()
                .map(|pid| stat_ticks(Path::new(&format!("/proc/{pid}/stat")), false))
                .sum(),
            _ => 0,
        };
        [
            // wrk and h2load are this process's waited-for children.
            stat_ticks(Path::new("/proc/self/stat"), true),
            stat_ticks(&self.upstream_thread, false),
            proxy,
        ]
    }

    /// Fills `run`'s CPU fields from samples before and after it.
    fn account(&self, run: &mut Run, before: [u64; 3], after: [u64; 3], seconds: u64) {
        let requests = (run.rps * seconds as f64).max(1.0);
        let us = |i: usize| after[i].saturating_sub(before[i]) as f64 * self.tick_us;
        run.cpu_client_us = us(0) / requests;
        run.cpu_upstream_us = us(1) / requests;
        run.cpu_proxy_us = us(2) / requests;
        run.cores_busy = (us(0) + us(1) + us(2)) / 1e6 / seconds as f64;
    }
}

/// `12.34us`, `1.20ms`, `2.00s` → µs.
fn parse_wrk_time(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn wrk(bin: &str, url: &str, host: &str, connections: u32, seconds: u64) -> Result<Run, BoxError> {
    let out = Command::new(bin)
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args(["-H", &format!("Host: {host}")])
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run wrk ({bin}): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut run = Run::default();
    for line in text.lines() {
        let t = line.trim();
        let mut parts = t.split_whitespace();
        match parts.next() {
            Some("50.000%") | Some("50%") => {
                run.p50_us = parts.next().and_then(parse_wrk_time).unwrap_or(0.0)
            }
            Some("99.000%") | Some("99%") => {
                run.p99_us = parts.next().and_then(parse_wrk_time).unwrap_or(0.0)
            }
            Some("Requests/sec:") => {
                run.rps = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
            }
            Some("Non-2xx") => {
                run.errors += t
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            }
            Some("Socket") => {
                run.errors += t
                    .split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if run.rps == 0.0 {
        return Err(format!(
            "wrk printed no throughput:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(run)
}

fn h2load(
    bin: &str,
    url: &str,
    authority: &str,
    body: &Path,
    connections: u32,
    seconds: u64,
) -> Result<Run, BoxError> {
    let out = Command::new(bin)
        .args([
            "-t1",
            &format!("-c{connections}"),
            "-m10",
            &format!("-D{seconds}"),
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!(":authority: {authority}")])
        .arg("-d")
        .arg(body)
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run h2load ({bin}): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut run = Run::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in") {
            // "finished in 5.00s, 12345.60 req/s, 1.2MB/s"
            run.rps = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        }
        if let Some(rest) = t.strip_prefix("requests:") {
            // "... 100 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(kind)) = (w.next(), w.next())
                    && matches!(kind, "failed" | "errored" | "timeout")
                {
                    run.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
        if let Some(rest) = t.strip_prefix("time for request:") {
            // "min max mean sd +/- sd": no percentiles from h2load; keep mean as p50 stand-in.
            run.p50_us = rest
                .split_whitespace()
                .nth(2)
                .and_then(parse_wrk_time)
                .unwrap_or(0.0);
        }
    }
    if run.rps == 0.0 {
        return Err(format!(
            "h2load printed no throughput:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(run)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let stratad_bin = match &args.stratad {
        Some(p) => p.clone(),
        None => default_stratad()?,
    };
    let sidecar_bin = match &args.sidecar {
        Some(p) => p.clone(),
        None => sibling("strata-sidecar")?,
    };
    let dir = tempfile::Builder::new().prefix("sidecar-bench").tempdir()?;
    let upstream = start_upstream()?;
    let stratad = Stratad::start(&stratad_bin, dir.path(), "stratad").await?;
    register(&stratad, upstream).await?;
    let (sidecar, sidecar_addr) = start_sidecar(&sidecar_bin, &stratad, args.workers).await?;
    let (nginx, nginx_addr, nginx_grpc) =
        start_nginx(&args.nginx, dir.path(), upstream, args.workers)?;
    let probe = CpuProbe::new(sidecar.0.id(), nginx.0.id());
    let grpc_body = dir.path().join("check.bin");
    std::fs::write(&grpc_body, [0u8, 0, 0, 0, 0])?;

    let targets = [
        (
            "direct",
            format!("http://{upstream}/"),
            upstream.to_string(),
        ),
        ("nginx", format!("http://{nginx_addr}/"), "echo".to_owned()),
        (
            "sidecar",
            format!("http://{sidecar_addr}/"),
            "echo".to_owned(),
        ),
    ];
    let path = "grpc.health.v1.Health/Check";
    let grpc_targets = [
        (
            "direct",
            format!("http://{upstream}/{path}"),
            upstream.to_string(),
        ),
        (
            "nginx",
            format!("http://{nginx_grpc}/{path}"),
            "grpcecho".to_owned(),
        ),
        (
            "sidecar",
            format!("http://{sidecar_addr}/{path}"),
            "grpcecho".to_owned(),
        ),
    ];
    // Warm-up: connections, pools, the sidecar's route.
    for (_, url, host) in &targets {
        wrk(&args.wrk, url, host, 4, 1)?;
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        let wanted = |target: &str, mode: &str| {
            args.targets.iter().any(|t| t == target) && args.modes.iter().any(|m| m == mode)
        };
        for (name, url, host) in &targets {
            if wanted(name, "latency") {
                let before = probe.sample(name);
                let mut r = wrk(&args.wrk, url, host, 1, args.seconds)?;
                probe.account(&mut r, before, probe.sample(name), args.seconds);
                r.target = (*name).into();
                r.mode = "latency c=1".into();
                runs.push(r);
            }
            if !wanted(name, "throughput") {
                continue;
            }
            let before = probe.sample(name);
            let mut r = wrk(&args.wrk, url, host, args.connections, args.seconds)?;
            probe.account(&mut r, before, probe.sample(name), args.seconds);
            r.target = (*name).into();
            r.mode = format!("throughput c={}", args.connections);
            runs.push(r);
        }
        for (name, url, authority) in &grpc_targets {
            if !wanted(name, "grpc") {
                continue;
            }
            let before = probe.sample(name);
            let mut r = h2load(
                &args.h2load,
                url,
                authority,
                &grpc_body,
                args.connections,
                args.seconds,
            )?;
            probe.account(&mut r, before, probe.sample(name), args.seconds);
            r.target = (*name).into();
            r.mode = format!("grpc unary c={} m=10", args.connections);
            runs.push(r);
        }
    }

    // Medians over rounds.
    let mut summary: Vec<Run> = Vec::new();
    for run in &runs {
        if summary
            .iter()
            .any(|s| s.target == run.target && s.mode == run.mode)
        {
            continue;
        }
        let same: Vec<&Run> = runs
            .iter()
            .filter(|r| r.target == run.target && r.mode == run.mode)
            .collect();
        summary.push(Run {
            target: run.target.clone(),
            mode: run.mode.clone(),
            rps: median(&mut same.iter().map(|r| r.rps).collect::<Vec<_>>()),
            p50_us: median(&mut same.iter().map(|r| r.p50_us).collect::<Vec<_>>()),
            p99_us: median(&mut same.iter().map(|r| r.p99_us).collect::<Vec<_>>()),
            errors: same.iter().map(|r| r.errors).sum(),
            cpu_client_us: median(&mut same.iter().map(|r| r.cpu_client_us).collect::<Vec<_>>()),
            cpu_upstream_us: median(
                &mut same.iter().map(|r| r.cpu_upstream_us).collect::<Vec<_>>(),
            ),
            cpu_proxy_us: median(&mut same.iter().map(|r| r.cpu_proxy_us).collect::<Vec<_>>()),
            cores_busy: median(&mut same.iter().map(|r| r.cores_busy).collect::<Vec<_>>()),
        });
    }
    let find = |t: &str, m: &str| {
        summary
            .iter()
            .find(|r| r.target == t && r.mode.starts_with(m))
            .cloned()
            .unwrap_or_default()
    };
    let mut out = String::new();
    let _ = writeln!(out, "| target | mode | req/s | p50 µs | p99 µs | errors |");
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: |");
    for r in &summary {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            r.target, r.mode, r.rps, r.p50_us, r.p99_us, r.errors
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| target | mode | CPU µs/req load generator | upstream | proxy | proxy ÷ (generator + upstream) | cores busy |"
    );
    let _ = writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &summary {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.target,
            r.mode,
            r.cpu_client_us,
            r.cpu_upstream_us,
            r.cpu_proxy_us,
            r.cpu_proxy_us / (r.cpu_client_us + r.cpu_upstream_us).max(f64::MIN_POSITIVE),
            r.cores_busy
        );
    }
    let (dl, nl, sl) = (
        find("direct", "latency"),
        find("nginx", "latency"),
        find("sidecar", "latency"),
    );
    let (dt, nt, st) = (
        find("direct", "throughput"),
        find("nginx", "throughput"),
        find("sidecar", "throughput"),
    );
    let (dg, ng, sg) = (
        find("direct", "grpc"),
        find("nginx", "grpc"),
        find("sidecar", "grpc"),
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "added latency over direct (c=1): sidecar p50 +{:.1} µs, p99 +{:.1} µs (target ≤ 30 / ≤ 100); nginx p50 +{:.1} µs, p99 +{:.1} µs",
        sl.p50_us - dl.p50_us,
        sl.p99_us - dl.p99_us,
        nl.p50_us - dl.p50_us,
        nl.p99_us - dl.p99_us
    );
    let _ = writeln!(
        out,
        "throughput c={}: sidecar {:.0} req/s = {:.2}x nginx ({:.0}; target ≥ 1.2x), {:.2}x direct ({:.0}); nginx {:.2}x direct",
        args.connections,
        st.rps,
        st.rps / nt.rps.max(1.0),
        nt.rps,
        st.rps / dt.rps.max(1.0),
        dt.rps,
        nt.rps / dt.rps.max(1.0)
    );
    let _ = writeln!(
        out,
        "gRPC unary: sidecar {:.0} req/s = {:.2}x direct ({:.0}; target ≥ 0.8x); nginx grpc_pass {:.0} req/s = {:.2}x direct",
        sg.rps,
        sg.rps / dg.rps.max(1.0),
        dg.rps,
        ng.rps,
        ng.rps / dg.rps.max(1.0)
    );
    let _ = writeln!(
        out,
        "workers: {} (sidecar threads = nginx processes); {} s per run; {} rounds; medians",
        args.workers, args.seconds, args.rounds
    );
    if args.json {
        eprint!("{out}");
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"summary": summary, "runs": runs}))?
        );
    } else {
        print!("{out}");
    }
    stratad.stop().await?;
    Ok(())
}
