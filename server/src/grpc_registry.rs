//! gRPC handlers of `RegistryService`: thin — decode the request into the
//! domain's terms, call [`crate::api::Api`], encode the answer; errors go through the one
//! table in [`crate::error`]. Also the conversions of registry objects to
//! and from the wire, which the services watch shares.

use std::sync::Arc;

use futures::StreamExt;
use strata_proto::v1::registry_service_server::RegistryService;
use strata_proto::v1::{
    DeregisterRequest, DeregisterResponse, DrainRequest, DrainResponse, Endpoint, HealthCheck,
    HeartbeatRequest, HeartbeatResponse, Instance, InstanceKind, ListInstancesRequest,
    ListInstancesResponse, ListServicesRequest, ListServicesResponse, Protocol as WireProtocol,
    RegisterBranchRequest, RegisterBranchResponse, RegisterRequest, RegisterResponse,
    ResolveServiceRequest, ResolveServiceResponse, ResolvedService, ResponseHeader,
    WatchServicesRequest, WatchServicesResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::api::{NewTenant, PutLayer};
use crate::auth::{Action, allow};
use crate::domain::document::{Format, Mode};
use crate::domain::registry::{CheckKind, CheckSpec, Health, InstanceSpec, Protocol};
use crate::error::ApiError;
use crate::grpc::GrpcApi;
use crate::hub::MessageStream;
use crate::registry::{BranchRegistration, InstanceInfo, Registration, ServiceResolution};

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(strata_proto::v1::ErrorReason::InvalidArgument, message)
}

fn protocol_from_wire(value: i32) -> Result<Option<Protocol>, ApiError> {
    match WireProtocol::try_from(value) {
        Ok(WireProtocol::Unspecified) => Ok(None),
        Ok(WireProtocol::Http) => Ok(Some(Protocol::Http)),
        Ok(WireProtocol::Grpc) => Ok(Some(Protocol::Grpc)),
        Ok(WireProtocol::Tcp) => Ok(Some(Protocol::Tcp)),
        Ok(WireProtocol::Udp) => Ok(Some(Protocol::Udp)),
        Err(_) => Err(bad(format!("unknown protocol value {value}"))),
    }
}

fn protocol_to_wire(name: &str) -> WireProtocol {
    match name {
        "grpc" => WireProtocol::Grpc,
        "tcp" => WireProtocol::Tcp,
        "udp" => WireProtocol::Udp,
        _ => WireProtocol::Http,
    }
}

/// A check as the wire gives it; `None` when nothing is set.
fn check_from_wire(c: &HealthCheck) -> Result<Option<CheckSpec>, ApiError> {
    let mut kinds = Vec::new();
    if c.tcp {
        kinds.push(CheckKind::Tcp);
    }
    if !c.http_path.is_empty() {
        let status = match c.http_status {
            0 => None,
            s => Some(
                u16::try_from(s)
                    .map_err(|_| bad(format!("http_status {s} is not an HTTP status")))?,
            ),
        };
        kinds.push(CheckKind::Http {
            path: c.http_path.clone(),
            status,
        });
    }
    if !c.grpc_service.is_empty() {
        let service = if c.grpc_service == "*" {
            String::new()
        } else {
            c.grpc_service.clone()
        };
        kinds.push(CheckKind::Grpc { service });
    }
    if kinds.len() > 1 {
        return Err(bad(
            "a check is exactly one of tcp, http_path or grpc_service",
        ));
    }
    Ok(kinds.pop().map(|kind| CheckSpec {
        kind,
        endpoint: (!c.endpoint.is_empty()).then(|| c.endpoint.clone()),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        failure_threshold: c.failure_threshold,
        success_threshold: c.success_threshold,
    }))
}

/// The spec of an instance from the wire (output-only fields ignored).
pub fn spec_from_wire(i: &Instance) -> Result<(Option<String>, InstanceSpec), ApiError> {
    let mut endpoints = Vec::with_capacity(i.endpoints.len());
    for (name, e) in &i.endpoints {
        endpoints.push((
            name.clone(),
            e.address.clone(),
            protocol_from_wire(e.protocol)?,
        ));
    }
    let persistent = match InstanceKind::try_from(i.kind) {
        Ok(InstanceKind::Persistent) => true,
        Ok(InstanceKind::Ephemeral | InstanceKind::Unspecified) => false,
        Err(_) => return Err(bad(format!("unknown instance kind {}", i.kind))),
    };
    let check = match &i.check {
        Some(c) => check_from_wire(c)?,
        None => None,
    };
    let spec = InstanceSpec {
        endpoints,
        protocol: protocol_from_wire(i.protocol)?,
        metadata: i.metadata.clone().into_iter().collect(),
        weight: i.weight,
        version: i.version.clone(),
        persistent,
        ttl_seconds: i.ttl_seconds,
        check,
    };
    Ok(((!i.id.is_empty()).then(|| i.id.clone()), spec))
}

/// An instance for the wire.
pub fn instance_to_proto(info: InstanceInfo) -> Instance {
    let r = &info.entry.record;
    let endpoints = r
        .endpoints
        .iter()
        .map(|(name, e)| {
            (
                name.clone(),
                Endpoint {
                    address: e.address.clone(),
                    protocol: protocol_to_wire(&e.protocol) as i32,
                },
            )
        })
        .collect();
    let check = r.check.as_ref().map(|c| HealthCheck {
        tcp: c.kind == "tcp",
        http_path: c.http_path.clone(),
        http_status: c.http_status,
        grpc_service: if c.kind == "grpc" && c.grpc_service.is_empty() {
            "*".into()
        } else {
            c.grpc_service.clone()
        },
        endpoint: c.endpoint.clone(),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        failure_threshold: c.failure_threshold,
        success_threshold: c.success_threshold,
    });
    Instance {
        id: info.id,
        endpoints,
        protocol: WireProtocol::Unspecified as i32,
        metadata: r.metadata.clone().into_iter().collect(),
        weight: r.weight,
        version: r.version.clone(),
        kind: if r.persistent {
            InstanceKind::Persistent
        } else {
            InstanceKind::Ephemeral
        } as i32,
        ttl_seconds: r.ttl_seconds,
        check,
        draining: r.draining,
        health: match info.health {
            Health::Unknown => strata_proto::v1::Health::Unknown,
            Health::Healthy => strata_proto::v1::Health::Healthy,
            Health::Unhealthy => strata_proto::v1::Health::Unhealthy,
        } as i32,
        health_detail: info.health_detail,
        lease_id: info.entry.lease,
        tenant: info.tenant,
        service: info.service,
        mod_revision: info.entry.mod_revision,
    }
}

/// What one KeepAlive stream renews with.
struct Renewer {
    api: crate::api::Api,
    member: String,
    /// The caller's one project (`None`: every project).
    scope: Option<Arc<str>>,
    token: Arc<str>,
    rate: Arc<crate::limits::RateLimiter>,
}

impl Renewer {
    /// Renews one lease. Each message counts against the token's request
    /// rate like a unary `Heartbeat`: opening one stream must not buy an
    /// unmetered stream of store writes.
    async fn renew(&self, lease: i64) -> Result<HeartbeatResponse, ApiError> {
        if &*self.token != "anonymous" {
            self.rate
                .take(&self.token, std::time::Instant::now())
                .map_err(|wait| self.rate.refusal(&self.token, wait))?;
        }
        let ttl = self.api.heartbeat(lease, self.scope.as_deref()).await?;
        Ok(HeartbeatResponse {
            header: Some(ResponseHeader {
                revision: self.api.revision(),
                member: self.member.clone(),
            }),
            lease_id: lease,
            ttl_seconds: ttl,
        })
    }
}

/// A service resolution for the wire.
pub fn resolution_to_proto(r: ServiceResolution) -> ResolvedService {
    ResolvedService {
        service: r.service,
        tenant: r.tenant.unwrap_or_default(),
        fallback: r.fallback,
        instances: r.instances.into_iter().map(instance_to_proto).collect(),
    }
}

/// A branch registration from the wire.
pub fn branch_from_wire(r: RegisterBranchRequest) -> Result<BranchRegistration, ApiError> {
    let instances = r
        .instances
        .iter()
        .map(spec_from_wire)
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = Vec::with_capacity(r.config.len());
    for c in r.config {
        let format = if c.format.is_empty() {
            None
        } else {
            Some(c.format.parse::<Format>().map_err(|e| bad(e.to_string()))?)
        };
        let mode = if c.mode.is_empty() {
            Mode::Replace
        } else {
            c.mode.parse::<Mode>().map_err(|e| bad(e.to_string()))?
        };
        config.push(PutLayer {
            project: r.project.clone(),
            tenant: r.tenant.clone(),
            key: c.key,
            value: c.value,
            format,
            mode,
            expected_revision: None,
        });
    }
    Ok(BranchRegistration {
        tenant: NewTenant {
            project: r.project,
            name: r.tenant,
            parent: r.parent,
            labels: r.labels,
            ttl_seconds: r.tenant_ttl_seconds,
            strict: r.strict,
            protected: false,
        },
        service: r.service,
        instances,
        config,
    })
}

#[tonic::async_trait]
impl RegistryService for GrpcApi {
    type KeepAliveStream = MessageStream<HeartbeatResponse>;
    type WatchServicesStream = MessageStream<WatchServicesResponse>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Register, &q.project, &q.tenant)?;
        let r = request.into_inner();
        let instance = r.instance.ok_or_else(|| bad("instance is required"))?;
        let (id, spec) = spec_from_wire(&instance)?;
        let (done, revision) = self
            .api()?
            .register(Registration {
                project: r.project,
                tenant: r.tenant,
                service: r.service,
                id,
                spec,
                lease: (r.lease_id != 0).then_some(r.lease_id),
            })
            .await?;
        Ok(Response::new(RegisterResponse {
            header: self.header(revision),
            id: done.id,
            lease_id: done.lease,
            ttl_seconds: done.ttl_seconds,
        }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Register, &q.project, &q.tenant)?;
        let r = request.into_inner();
        let revision = self
            .api()?
            .deregister(&r.project, &r.tenant, &r.service, &r.id)
            .await?;
        Ok(Response::new(DeregisterResponse {
            header: self.header(revision),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Register, &q.project, &q.tenant)?;
        let r = request.into_inner();
        let revision = self
            .api()?
            .drain(&r.project, &r.tenant, &r.service, &r.id, r.draining)
            .await?;
        Ok(Response::new(DrainResponse {
            header: self.header(revision),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        allow(&request, Action::Heartbeat, "", "")?;
        let scope = crate::auth::principal_of(request.extensions())?
            .project
            .clone();
        let lease = request.into_inner().lease_id;
        let api = self.api()?;
        let ttl = api.heartbeat(lease, scope.as_deref()).await?;
        Ok(Response::new(HeartbeatResponse {
            header: self.header(api.revision()),
            lease_id: lease,
            ttl_seconds: ttl,
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        // Authorized once, when the stream opens (like every stream); the
        // authentication layer ends it when its token is revoked.
        allow(&request, Action::Heartbeat, "", "")?;
        let principal = crate::auth::principal_of(request.extensions())?;
        let renewer = Renewer {
            api: self.api()?.clone(),
            member: self.state.member.clone(),
            scope: principal.project.clone(),
            token: Arc::clone(&principal.token_id),
            rate: Arc::clone(&self.state.rate),
        };
        let shutdown = self.state.shutdown.clone();
        let inbound = request.into_inner();
        let stream = futures::stream::unfold(
            (inbound, renewer, shutdown, false),
            |(mut inbound, renewer, shutdown, done)| async move {
                if done {
                    return None;
                }
                let next = tokio::select! {
                    () = shutdown.cancelled() => {
                        let status = Status::unavailable(
                            "stratad is shutting down; keep the lease alive through another replica",
                        );
                        return Some((Err(status), (inbound, renewer, shutdown, true)));
                    }
                    next = inbound.next() => next,
                };
                let request = match next? {
                    Ok(request) => request,
                    Err(status) => {
                        return Some((Err(status), (inbound, renewer, shutdown, true)));
                    }
                };
                let answer = renewer.renew(request.lease_id).await.map_err(Status::from);
                let failed = answer.is_err();
                Some((answer, (inbound, renewer, shutdown, failed)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_branch(
        &self,
        request: Request<RegisterBranchRequest>,
    ) -> Result<Response<RegisterBranchResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Register, &q.project, &q.tenant)?;
        let principal = crate::auth::principal_of(request.extensions())?;
        self.api()?
            .authorize_placement(principal, &q.project, &q.tenant, &q.parent)?;
        let req = branch_from_wire(request.into_inner())?;
        let (done, revision) = self.api()?.register_branch(req).await?;
        Ok(Response::new(RegisterBranchResponse {
            header: self.header(revision),
            tenant_created: done.tenant_created,
            instance_ids: done.instance_ids,
            lease_id: done.lease,
        }))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
        let principal = crate::auth::principal_of(request.extensions())?.clone();
        let r = request.into_inner();
        let (mut list, revision) = self.api()?.instances(&r.project, &r.tenant, &r.service)?;
        for instance in &mut list {
            instance.redact_for(&principal, &r.project);
        }
        Ok(Response::new(ListInstancesResponse {
            header: self.header(revision),
            instances: list.into_iter().map(instance_to_proto).collect(),
        }))
    }

    async fn resolve_service(
        &self,
        request: Request<ResolveServiceRequest>,
    ) -> Result<Response<ResolveServiceResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
        let principal = crate::auth::principal_of(request.extensions())?.clone();
        let r = request.into_inner();
        let (mut resolved, revision) = self
            .api()?
            .resolve_service(&r.project, &r.tenant, &r.service)?;
        resolved.redact_for(&principal, &r.project);
        crate::tracing_otel::record_resolution(
            &r.project,
            &r.tenant,
            &r.service,
            resolved.tenant.as_deref(),
            resolved.fallback,
        );
        Ok(Response::new(ResolveServiceResponse {
            header: self.header(revision),
            service: Some(resolution_to_proto(resolved)),
        }))
    }

    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
        let principal = crate::auth::principal_of(request.extensions())?.clone();
        let r = request.into_inner();
        let (mut list, revision) = self.api()?.list_services(&r.project, &r.tenant)?;
        for resolution in &mut list {
            resolution.redact_for(&principal, &r.project);
        }
        Ok(Response::new(ListServicesResponse {
            header: self.header(revision),
            services: list.into_iter().map(resolution_to_proto).collect(),
        }))
    }

    async fn watch_services(
        &self,
        request: Request<WatchServicesRequest>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        // Served through `grpc::watch_services_route` (encoded once per
        // group); this generated entry point shares its subscription.
        let subscription = self.subscribe_services(request).await?;
        Ok(Response::new(subscription.into_stream()))
    }
}
