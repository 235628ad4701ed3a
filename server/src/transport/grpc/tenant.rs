//! `TenantService` over gRPC.

use strata_proto::v1::tenant_service_server::TenantService;
use strata_proto::v1::{
    CreateTenantRequest, CreateTenantResponse, DeleteTenantRequest, DeleteTenantResponse,
    FallbackPolicy, GetTenantRequest, GetTenantResponse, ListTenantsRequest, ListTenantsResponse,
    Tenant, UpdateTenantRequest, UpdateTenantResponse,
};
use tonic::{Request, Response, Status};

use super::GrpcApi;
use crate::app::api::{NewTenant, TenantInfo};
use crate::app::audit::{Operation, Target, allow as allow_change};
use crate::app::auth::{Action, allow};

/// Converts a tenant for the wire.
pub fn tenant_to_proto(info: TenantInfo) -> Tenant {
    let r = info.entry.record;
    Tenant {
        project: info.project,
        name: info.name,
        parent: r.parent,
        labels: r.labels,
        ttl_seconds: r.ttl_seconds,
        expires_at_unix_ms: r.expires_at_unix_ms,
        fallback: if r.strict {
            FallbackPolicy::Strict
        } else {
            FallbackPolicy::Permissive
        } as i32,
        protected: r.protected,
        create_revision: info.entry.create_revision,
        mod_revision: info.entry.mod_revision,
        chain: info.chain,
    }
}

#[tonic::async_trait]
impl TenantService for GrpcApi {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let q = request.get_ref();
        let action = Action::CreateTenant {
            protected: q.protected,
        };
        let target = Target::new(Operation::CreateTenant, &q.project, &q.name);
        allow_change(&request, action, target)?;
        let principal = crate::app::auth::principal_of(request.extensions())?;
        self.api()?
            .authorize_placement(principal, &q.project, &q.name, &q.parent)?;
        let r = request.into_inner();
        let (info, revision) = self
            .api()?
            .create_tenant(NewTenant {
                project: r.project,
                name: r.name,
                parent: r.parent,
                labels: r.labels,
                ttl_seconds: r.ttl_seconds,
                strict: r.fallback == FallbackPolicy::Strict as i32,
                protected: r.protected,
            })
            .await?;
        Ok(Response::new(CreateTenantResponse {
            header: self.header(revision),
            tenant: Some(tenant_to_proto(info)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<GetTenantResponse>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.name)?;
        let r = request.into_inner();
        let (info, revision) = self.api()?.tenant(&r.project, &r.name)?;
        Ok(Response::new(GetTenantResponse {
            header: self.header(revision),
            tenant: Some(tenant_to_proto(info)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        allow(&request, Action::Read, &request.get_ref().project, "")?;
        let r = request.into_inner();
        let (tenants, revision) = self.api()?.list_tenants(&r.project);
        Ok(Response::new(ListTenantsResponse {
            header: self.header(revision),
            tenants: tenants.into_iter().map(tenant_to_proto).collect(),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<UpdateTenantRequest>,
    ) -> Result<Response<UpdateTenantResponse>, Status> {
        let q = request.get_ref();
        let target = Target::new(Operation::UpdateTenant, &q.project, &q.name);
        allow_change(&request, Action::UpdateTenant, target)?;
        if q.update_ttl && q.ttl_seconds > 0 {
            let principal = crate::app::auth::principal_of(request.extensions())?;
            self.api()?.authorize_ttl(principal, &q.project, &q.name)?;
        }
        let r = request.into_inner();
        let (info, revision) = self
            .api()?
            .update_tenant(
                &r.project,
                &r.name,
                r.update_labels.then_some(r.labels),
                r.update_ttl.then_some(r.ttl_seconds),
            )
            .await?;
        Ok(Response::new(UpdateTenantResponse {
            header: self.header(revision),
            tenant: Some(tenant_to_proto(info)),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        let q = request.get_ref();
        let target = Target::new(Operation::DeleteTenant, &q.project, &q.name);
        allow_change(&request, Action::DeleteTenant { force: q.force }, target)?;
        let r = request.into_inner();
        let (deleted_layers, revision) = self
            .api()?
            .delete_tenant(&r.project, &r.name, r.force)
            .await?;
        Ok(Response::new(DeleteTenantResponse {
            header: self.header(revision),
            deleted_layers,
        }))
    }
}
