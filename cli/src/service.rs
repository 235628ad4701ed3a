//! `strata service …`: registering, draining and removing service instances,
//! and seeing where a service resolves for a tenant, once or as it changes.

use std::collections::HashMap;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::json;
use strata_client::proto::{
    DeregisterRequest, DrainRequest, Endpoint, HealthCheck, HeartbeatRequest, Instance,
    InstanceKind, ListInstancesRequest, ListServicesRequest, Protocol, RegisterRequest,
    RegisterResponse, ResolveServiceRequest, UdpCheck, WatchServicesRequest,
};
use strata_client::{Code, Connection, Status};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::IntervalStream;

use crate::ctx::{Ctx, Failure, err};
use crate::watch::follow;

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Register an instance of a service in a tenant (registering an existing
    /// id again updates it in place).
    Register(Box<RegisterArgs>),
    /// Remove an instance.
    Deregister {
        /// Tenant.
        tenant: String,
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
    /// Stop routing to an instance while keeping it listed (or, with --undo,
    /// route to it again).
    Drain {
        /// Tenant.
        tenant: String,
        /// Service.
        service: String,
        /// Instance id.
        id: String,
        /// Route to the instance again.
        #[arg(long)]
        undo: bool,
    },
    /// Without SERVICE: every service visible from the tenant and where it
    /// resolves. With SERVICE: the tenant's own instances of it, routable or
    /// not.
    List {
        /// Tenant.
        tenant: String,
        /// Service.
        service: Option<String>,
    },
    /// Where a service resolves for a tenant: the nearest tenant of its chain
    /// with a routable instance, and those instances.
    Resolve {
        /// Tenant.
        tenant: String,
        /// Service.
        service: String,
    },
    /// Follow where services resolve for a tenant: a snapshot, then every
    /// change. Reconnects and resumes from the last revision seen.
    Watch {
        /// Tenant.
        tenant: String,
        /// Services to watch; none watches every service visible from the tenant.
        services: Vec<String>,
        /// Resume from this revision instead of starting with a snapshot.
        #[arg(long, default_value_t = 0)]
        start_revision: i64,
    },
}

/// Arguments of `service register`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("check").args(["check_http", "check_tcp", "check_grpc", "check_udp_send"])))]
pub(crate) struct RegisterArgs {
    /// Tenant.
    tenant: String,
    /// Service.
    service: String,
    /// Endpoint `name=host:port`, e.g. `main=10.0.0.5:7000` (repeatable; at
    /// least one).
    // Not `endpoints`: that id is the global --endpoints (the daemons).
    #[arg(
        long = "endpoint",
        required = true,
        value_name = "NAME=HOST:PORT",
        value_parser = parse_endpoint
    )]
    instance_endpoints: Vec<(String, String)>,
    /// Protocol of the endpoints [server default: http].
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// Instance id, unique within the tenant's service; generated when absent.
    #[arg(long)]
    id: Option<String>,
    /// `persistent` stays until deregistered (a CD registration);
    /// `ephemeral` lives as long as this command keeps its lease alive, and is
    /// deregistered on Ctrl-C or SIGTERM.
    #[arg(long, value_enum, default_value_t = KindArg::Persistent)]
    kind: KindArg,
    /// Ephemeral only: the lease's time to live, e.g. `10s` [server default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Relative load-balancing weight, 1-10000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
    weight: Option<u32>,
    /// Version of the running build.
    #[arg(long)]
    version: Option<String>,
    /// Metadata `key=value` (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Persistent only: probe with an HTTP GET of this path, e.g. `/healthz`.
    #[arg(long, value_name = "PATH")]
    check_http: Option<String>,
    /// Persistent only: probe with a TCP connect.
    #[arg(long)]
    check_tcp: bool,
    /// Persistent only: probe with a gRPC health check of this service name
    /// (`*` checks the server as a whole).
    #[arg(long, value_name = "SERVICE")]
    check_grpc: Option<String>,
    /// Persistent only: probe with this UDP datagram (text; `hex:0a0b…` for
    /// bytes); routable once a reply matches `--check-udp-expect[-regex]`
    /// (any reply without either).
    #[arg(long, value_name = "DATAGRAM")]
    check_udp_send: Option<String>,
    /// The reply the UDP check expects, byte for byte (text or `hex:…`).
    #[arg(
        long,
        requires = "check_udp_send",
        conflicts_with = "check_udp_expect_regex",
        value_name = "REPLY"
    )]
    check_udp_expect: Option<String>,
    /// A regular expression the UDP check's reply must match.
    #[arg(long, requires = "check_udp_send", value_name = "REGEX")]
    check_udp_expect_regex: Option<String>,
    /// HTTP status the check expects [default: any 2xx].
    #[arg(long, requires = "check_http", value_name = "STATUS")]
    check_status: Option<u32>,
    /// Endpoint the check probes [default: the first by name].
    #[arg(long, requires = "check", value_name = "NAME")]
    check_endpoint: Option<String>,
    /// Time between probes, e.g. `5s` [server default: 10s].
    #[arg(long, requires = "check", value_name = "DURATION", value_parser = humantime::parse_duration)]
    check_interval: Option<Duration>,
    /// Time a probe may take, e.g. `1s` [server default: 2s].
    #[arg(long, requires = "check", value_name = "DURATION", value_parser = humantime::parse_duration)]
    check_timeout: Option<Duration>,
    /// Consecutive failures that make the instance unhealthy [server default: 3].
    #[arg(long, requires = "check", value_name = "N")]
    check_failures: Option<u32>,
    /// Consecutive successes that make it healthy again [server default: 1].
    #[arg(long, requires = "check", value_name = "N")]
    check_successes: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Http,
    Grpc,
    Tcp,
    Udp,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Http => Protocol::Http,
            ProtocolArg::Grpc => Protocol::Grpc,
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindArg {
    Persistent,
    Ephemeral,
}

fn parse_endpoint(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, address)) if !name.is_empty() && !address.is_empty() => {
            Ok((name.to_owned(), address.to_owned()))
        }
        _ => Err(format!(
            "endpoint {s:?} is not name=host:port (e.g. main=10.0.0.5:7000)"
        )),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("metadata {s:?} is not key=value"))
}

/// Milliseconds of a duration flag, as the wire's u32.
fn millis(flag: &str, d: Option<Duration>) -> Result<u32, Failure> {
    d.map_or(Ok(0), |d| {
        u32::try_from(d.as_millis())
            .map_err(|_| Failure::Usage(format!("--{flag} {d:?} is too long")))
    })
}

impl RegisterArgs {
    /// The instance to register, or why the flags do not make one.
    fn instance(&self) -> Result<Instance, Failure> {
        let mut endpoints = HashMap::new();
        for (name, address) in &self.instance_endpoints {
            let endpoint = Endpoint {
                address: address.clone(),
                protocol: Protocol::Unspecified as i32,
            };
            if endpoints.insert(name.clone(), endpoint).is_some() {
                return Err(Failure::Usage(format!(
                    "endpoint name {name:?} is given twice"
                )));
            }
        }
        let ephemeral = self.kind == KindArg::Ephemeral;
        let checked = self.check_http.is_some()
            || self.check_tcp
            || self.check_grpc.is_some()
            || self.check_udp_send.is_some();
        if ephemeral && checked {
            return Err(Failure::Usage(
                "health checks are for persistent instances; an ephemeral one is \
                 healthy while its lease is kept alive"
                    .into(),
            ));
        }
        if !ephemeral && self.ttl.is_some() {
            return Err(Failure::Usage(
                "--ttl is for ephemeral instances (--kind ephemeral)".into(),
            ));
        }
        let ttl_seconds = match self.ttl {
            None => 0,
            // Round up: a lease shorter than asked would expire early.
            Some(d) if d > Duration::ZERO => {
                let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                i64::try_from(whole).map_err(|_| Failure::Usage("--ttl is too long".into()))?
            }
            Some(_) => return Err(Failure::Usage("--ttl must be longer than 0s".into())),
        };
        let check = checked
            .then(|| -> Result<HealthCheck, Failure> {
                Ok(HealthCheck {
                    tcp: self.check_tcp,
                    http_path: self.check_http.clone().unwrap_or_default(),
                    http_status: self.check_status.unwrap_or(0),
                    grpc_service: self.check_grpc.clone().unwrap_or_default(),
                    endpoint: self.check_endpoint.clone().unwrap_or_default(),
                    interval_ms: millis("check-interval", self.check_interval)?,
                    timeout_ms: millis("check-timeout", self.check_timeout)?,
                    failure_threshold: self.check_failures.unwrap_or(0),
                    success_threshold: self.check_successes.unwrap_or(0),
                    udp: self
                        .check_udp_send
                        .as_deref()
                        .map(|send| -> Result<UdpCheck, Failure> {
                            Ok(UdpCheck {
                                send: datagram("check-udp-send", send)?,
                                expect: self
                                    .check_udp_expect
                                    .as_deref()
                                    .map(|e| datagram("check-udp-expect", e))
                                    .transpose()?
                                    .unwrap_or_default(),
                                expect_regex: self
                                    .check_udp_expect_regex
                                    .clone()
                                    .unwrap_or_default(),
                            })
                        })
                        .transpose()?,
                })
            })
            .transpose()?;
        Ok(Instance {
            id: self.id.clone().unwrap_or_default(),
            endpoints,
            protocol: self.protocol.map_or(Protocol::Unspecified, Protocol::from) as i32,
            metadata: self.meta.iter().cloned().collect(),
            weight: self.weight.unwrap_or(0),
            version: self.version.clone().unwrap_or_default(),
            kind: if ephemeral {
                InstanceKind::Ephemeral
            } else {
                InstanceKind::Persistent
            } as i32,
            ttl_seconds,
            check,
            ..Instance::default()
        })
    }
}

/// Runs one `service` command.
pub(crate) async fn run(ctx: &Ctx, cmd: ServiceCommand) -> Result<(), Failure> {
    let out = ctx.out;
    let project = ctx.project.clone();
    match cmd {
        ServiceCommand::Register(args) => {
            let instance = args.instance()?;
            let ephemeral = args.kind == KindArg::Ephemeral;
            // Listen for signals before registering, so one that arrives
            // right after still deregisters instead of killing the process.
            let signals = if ephemeral {
                Some(Signals::new()?)
            } else {
                None
            };
            let client = ctx.connect().await?;
            let request = RegisterRequest {
                project,
                tenant: args.tenant.clone(),
                service: args.service.clone(),
                instance: Some(instance),
                lease_id: 0,
            };
            let r = client
                .registry()
                .register(request.clone())
                .await
                .map_err(err)?
                .into_inner();
            let mut fields = vec![
                ("tenant", json!(args.tenant)),
                ("service", json!(args.service)),
                ("id", json!(r.id)),
                (
                    "kind",
                    json!(if ephemeral { "ephemeral" } else { "persistent" }),
                ),
            ];
            if ephemeral {
                fields.push(("lease_id", json!(r.lease_id)));
                fields.push(("ttl_seconds", json!(r.ttl_seconds)));
            }
            fields.push((
                "revision",
                json!(r.header.as_ref().map_or(0, |h| h.revision)),
            ));
            out.record(&fields);
            if let Some(signals) = signals {
                hold(ctx, client, request, r, signals).await?;
            }
        }
        ServiceCommand::Deregister {
            tenant,
            service,
            id,
        } => {
            let client = ctx.connect().await?;
            let r = client
                .registry()
                .deregister(DeregisterRequest {
                    project,
                    tenant: tenant.clone(),
                    service: service.clone(),
                    id: id.clone(),
                })
                .await
                .map_err(err)?
                .into_inner();
            out.record(&[
                ("deregistered", json!(id)),
                ("tenant", json!(tenant)),
                ("service", json!(service)),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
        ServiceCommand::Drain {
            tenant,
            service,
            id,
            undo,
        } => {
            let client = ctx.connect().await?;
            let r = client
                .registry()
                .drain(DrainRequest {
                    project,
                    tenant: tenant.clone(),
                    service: service.clone(),
                    id: id.clone(),
                    draining: !undo,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.record(&[
                ("tenant", json!(tenant)),
                ("service", json!(service)),
                ("id", json!(id)),
                ("draining", json!(!undo)),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
        ServiceCommand::List {
            tenant,
            service: None,
        } => {
            let client = ctx.connect().await?;
            let r = client
                .registry()
                .list_services(ListServicesRequest { project, tenant })
                .await
                .map_err(err)?
                .into_inner();
            out.services(&r.services);
        }
        ServiceCommand::List {
            tenant,
            service: Some(service),
        } => {
            let client = ctx.connect().await?;
            let r = client
                .registry()
                .list_instances(ListInstancesRequest {
                    project,
                    tenant,
                    service,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.instances(&r.instances);
        }
        ServiceCommand::Resolve { tenant, service } => {
            let client = ctx.connect().await?;
            let r = client
                .registry()
                .resolve_service(ResolveServiceRequest {
                    project,
                    tenant: tenant.clone(),
                    service: service.clone(),
                })
                .await
                .map_err(err)?
                .into_inner();
            let mut resolved = r.service.unwrap_or_default();
            // An answer always names its service, even when nothing serves it.
            if resolved.service.is_empty() {
                resolved.service = service;
            }
            out.resolved(&tenant, &resolved, r.header.map_or(0, |h| h.revision));
        }
        ServiceCommand::Watch {
            tenant,
            services,
            start_revision,
        } => {
            let client = ctx.connect().await?;
            let request = WatchServicesRequest {
                project,
                tenant,
                services,
                start_revision,
            };
            follow(ctx, client, request, |m| out.service_watch_message(m)).await?;
        }
    }
    Ok(())
}

/// SIGINT and SIGTERM, listened for from creation on.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> Result<Self, Failure> {
        let listen = |kind| {
            signal(kind).map_err(|e| Failure::Server(format!("cannot listen for signals: {e}")))
        };
        Ok(Self {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// How a keep-alive stream ended.
enum LeaseEnd {
    /// The lease expired (or was revoked): the instance is gone.
    Gone,
    /// The stream broke; the lease may still be alive.
    Interrupted(String),
    /// The server refused for a reason retrying will not fix.
    Refused(Status),
}

/// Sorts a failed keep-alive call into what to do next.
fn lease_end(status: Status) -> LeaseEnd {
    match status.code() {
        Code::NotFound => LeaseEnd::Gone,
        Code::InvalidArgument
        | Code::Unimplemented
        | Code::PermissionDenied
        | Code::Unauthenticated => LeaseEnd::Refused(status),
        _ => LeaseEnd::Interrupted(status.message().to_owned()),
    }
}

/// Renews `lease_id` over one `KeepAlive` stream every third of its TTL,
/// until the stream ends. Also says whether any renewal got through.
async fn renew(client: &Connection, lease_id: i64, ttl_seconds: i64) -> (LeaseEnd, bool) {
    let ttl = Duration::from_secs(u64::try_from(ttl_seconds).unwrap_or(0).max(1));
    let mut ticks = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    // After a stall, one renewal is enough; a burst of catch-up ticks is not.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let requests = IntervalStream::new(ticks).map(move |_| HeartbeatRequest { lease_id });
    let mut responses = match client.registry().keep_alive(requests).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (lease_end(status), false),
    };
    let mut renewed = false;
    loop {
        // A connection can die without an error reaching us; by the TTL
        // without an answer the lease is at risk, so start over.
        match tokio::time::timeout(ttl, responses.message()).await {
            Ok(Ok(Some(r))) if r.ttl_seconds <= 0 => return (LeaseEnd::Gone, renewed),
            Ok(Ok(Some(_))) => renewed = true,
            Ok(Ok(None)) => {
                return (
                    LeaseEnd::Interrupted("the daemon closed the stream".into()),
                    renewed,
                );
            }
            Ok(Err(status)) => return (lease_end(status), renewed),
            Err(_) => {
                return (
                    LeaseEnd::Interrupted(format!("no renewal answered within {ttl:?}")),
                    renewed,
                );
            }
        }
    }
}

/// Keeps an ephemeral registration alive until SIGINT or SIGTERM, then
/// deregisters it. Reconnects when the stream breaks and registers the same
/// id again if its lease expired meanwhile.
async fn hold(
    ctx: &Ctx,
    mut client: Connection,
    request: RegisterRequest,
    first: RegisterResponse,
    mut signals: Signals,
) -> Result<(), Failure> {
    let id = first.id;
    let (mut lease_id, mut ttl_seconds) = (first.lease_id, first.ttl_seconds);
    eprintln!(
        "strata: keeping ephemeral instance {id} alive (lease {lease_id}, TTL {ttl_seconds}s); \
         Ctrl-C or SIGTERM deregisters it"
    );
    let mut again = request;
    if let Some(instance) = again.instance.as_mut() {
        instance.id.clone_from(&id);
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let (end, renewed) = tokio::select! {
            () = signals.recv() => break,
            ended = renew(&client, lease_id, ttl_seconds) => ended,
        };
        if renewed {
            backoff = Duration::from_millis(200);
        }
        match end {
            LeaseEnd::Gone => {
                eprintln!("strata: lease {lease_id} expired; registering {id} again");
                match client.registry().register(again.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        (lease_id, ttl_seconds) = (r.lease_id, r.ttl_seconds);
                        eprintln!("strata: registered {id} again (lease {lease_id})");
                        continue;
                    }
                    Err(status) if status.code() == Code::Unavailable => {
                        eprintln!(
                            "strata: registering again failed ({}); retrying",
                            status.message()
                        );
                    }
                    // The tenant is gone or the registration no longer
                    // valid: nothing left to keep alive.
                    Err(status) => return Err(err(status).into()),
                }
            }
            LeaseEnd::Interrupted(why) => {
                eprintln!("strata: keep-alive interrupted ({why}); reconnecting");
            }
            LeaseEnd::Refused(status) => return Err(err(status).into()),
        }
        tokio::select! {
            () = signals.recv() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if let Ok(c) = ctx.connect().await {
            client = c;
        }
    }
    let done = client
        .registry()
        .deregister(DeregisterRequest {
            project: again.project,
            tenant: again.tenant.clone(),
            service: again.service.clone(),
            id: id.clone(),
        })
        .await;
    match done {
        Ok(_) => eprintln!(
            "strata: deregistered {} instance {id} from {}",
            again.service, again.tenant
        ),
        // Its lease ran out while we could not reach the daemon: the
        // instance is gone already, which is what was asked for.
        Err(status) if status.code() == Code::NotFound => eprintln!(
            "strata: {} instance {id} in {} was already gone",
            again.service, again.tenant
        ),
        Err(status) => return Err(err(status).into()),
    }
    Ok(())
}

/// A datagram given on the command line: text, or `hex:` and hex digits.
fn datagram(flag: &str, value: &str) -> Result<Vec<u8>, Failure> {
    let Some(hex) = value.strip_prefix("hex:") else {
        return Ok(value.as_bytes().to_vec());
    };
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::Usage(format!(
            "--{flag} {value:?}: not hex after `hex:`"
        )));
    }
    Ok((0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect())
}
