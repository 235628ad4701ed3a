//! gRPC handlers of `RegistryService`: thin — decode the request into the
//! domain's terms (`registry_wire.rs`), call [`crate::app::api::Api`], encode the
//! answer; errors go through the one table in [`crate::error`].

use std::sync::Arc;

use futures::StreamExt;
use strata_proto::v1::registry_service_server::RegistryService;
use strata_proto::v1::{
    DeregisterRequest, DeregisterResponse, DrainRequest, DrainResponse, HeartbeatRequest,
    HeartbeatResponse, ListInstancesRequest, ListInstancesResponse, ListServicesRequest,
    ListServicesResponse, RegisterBranchRequest, RegisterBranchResponse, RegisterRequest,
    RegisterResponse, ResolveServiceRequest, ResolveServiceResponse, ResponseHeader,
    WatchServicesRequest, WatchServicesResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::app::audit::{self, Operation, Target};
use crate::app::auth::{Action, allow};
use crate::app::registry::Registration;
use crate::app::registry_wire::{
    bad, branch_from_wire, instance_to_proto, resolution_to_proto, spec_from_wire,
};
use crate::error::ApiError;
use crate::state::hub::MessageStream;
use crate::transport::grpc::GrpcApi;

/// What one KeepAlive stream renews with.
struct Renewer {
    api: crate::app::api::Api,
    member: String,
    /// The caller's one project (`None`: every project).
    scope: Option<Arc<str>>,
    token: Arc<str>,
    rate: Arc<crate::transport::layers::limits::RateLimiter>,
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

#[tonic::async_trait]
impl RegistryService for GrpcApi {
    type KeepAliveStream = MessageStream<HeartbeatResponse>;
    type WatchServicesStream = MessageStream<WatchServicesResponse>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let q = request.get_ref();
        let target = Target::new(Operation::Register, &q.project, &q.tenant).subject(&q.service);
        audit::allow(&request, Action::Register, target)?;
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
        let target = Target::new(Operation::Deregister, &q.project, &q.tenant)
            .subject(format!("{}/{}", q.service, q.id));
        audit::allow(&request, Action::Register, target)?;
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
        let target = Target::new(Operation::Drain, &q.project, &q.tenant)
            .subject(format!("{}/{}", q.service, q.id));
        audit::allow(&request, Action::Register, target)?;
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
        let scope = crate::app::auth::principal_of(request.extensions())?
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
        let principal = crate::app::auth::principal_of(request.extensions())?;
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
        let target =
            Target::new(Operation::RegisterBranch, &q.project, &q.tenant).subject(&q.service);
        audit::allow(&request, Action::Register, target)?;
        let principal = crate::app::auth::principal_of(request.extensions())?;
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
        let principal = crate::app::auth::principal_of(request.extensions())?.clone();
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
        let principal = crate::app::auth::principal_of(request.extensions())?.clone();
        let r = request.into_inner();
        let (mut resolved, revision) = self
            .api()?
            .resolve_service(&r.project, &r.tenant, &r.service)?;
        resolved.redact_for(&principal, &r.project);
        crate::transport::layers::tracing::record_resolution(
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
        let principal = crate::app::auth::principal_of(request.extensions())?.clone();
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
