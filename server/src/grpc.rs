//! gRPC handlers of `TenantService` and `ConfigService` (`RegistryService`'s
//! are in `grpc_registry.rs`, on the same type): thin — decode the
//! request, call [`Api`], encode the answer; errors go through the one table
//! in [`crate::error`].

use std::sync::Arc;

use strata_proto::v1::config_service_server::ConfigService;
use strata_proto::v1::tenant_service_server::TenantService;
use strata_proto::v1::{
    ConfigLayer, ConfigVersion, CreateTenantRequest, CreateTenantResponse, DeleteLayerRequest,
    DeleteLayerResponse, DeleteTenantRequest, DeleteTenantResponse, ExplainRequest,
    ExplainResponse, FallbackPolicy, FieldOrigin, GetLayerRequest, GetLayerResponse,
    GetTenantRequest, GetTenantResponse, ListHistoryRequest, ListHistoryResponse,
    ListTenantsRequest, ListTenantsResponse, PutConfigRequest, PutConfigResponse, ResolveRequest,
    ResolveResponse, ResolvedValue, ResponseHeader, RollbackRequest, RollbackResponse, Tenant,
    UpdateTenantRequest, UpdateTenantResponse, WatchConfigRequest, WatchConfigResponse,
};
use tonic::{Request, Response, Status};

use crate::api::{Api, LayerInfo, LayerVersion, NewTenant, PutLayer, TenantInfo};
use crate::domain::document::{Format, Mode};
use crate::error::ApiError;
use crate::hub::Selection;
use crate::server::DaemonState;
use crate::store::Revision;

/// Handler of the daemon's domain services.
#[derive(Debug, Clone)]
pub struct GrpcApi {
    pub(crate) state: Arc<DaemonState>,
}

impl GrpcApi {
    /// Handlers over the daemon's state (they answer `UNAVAILABLE` until the
    /// view is loaded).
    pub fn new(state: Arc<DaemonState>) -> Self {
        Self { state }
    }

    pub(crate) fn api(&self) -> Result<&Api, Status> {
        Ok(self.state.api()?)
    }

    pub(crate) fn header(&self, revision: Revision) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            member: self.state.member.clone(),
        })
    }
}

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

fn layer_to_proto(info: LayerInfo) -> ConfigLayer {
    ConfigLayer {
        tenant: info.tenant,
        key: info.key,
        value: info.entry.value.to_vec(),
        format: info.entry.format.name().to_owned(),
        mode: info.entry.mode.name().to_owned(),
        mod_revision: info.entry.mod_revision,
    }
}

fn version_to_proto(tenant: &str, key: &str, v: LayerVersion) -> ConfigVersion {
    ConfigVersion {
        revision: v.revision,
        layer: v.layer.map(|entry| {
            layer_to_proto(LayerInfo {
                tenant: tenant.to_owned(),
                key: key.to_owned(),
                entry,
            })
        }),
        written_at_unix_ms: v.written_at_unix_ms,
        restored_from: v.restored_from.unwrap_or(0),
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    ApiError::new(
        strata_proto::v1::ErrorReason::InvalidArgument,
        e.to_string(),
    )
    .into()
}

fn expected(revision: i64) -> Option<Revision> {
    (revision != 0).then_some(revision)
}

#[tonic::async_trait]
impl TenantService for GrpcApi {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
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

#[tonic::async_trait]
impl ConfigService for GrpcApi {
    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchConfigResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchConfigRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        let hub = self.state.hub()?;
        let subscription = hub
            .subscribe(
                r.project,
                r.tenant,
                Selection::new(r.keys, r.prefixes),
                r.start_revision,
                self.state.shutdown.clone(),
            )
            .await?;
        Ok(Response::new(subscription.into_stream()))
    }

    async fn put_config(
        &self,
        request: Request<PutConfigRequest>,
    ) -> Result<Response<PutConfigResponse>, Status> {
        let r = request.into_inner();
        let format = if r.format.is_empty() {
            None
        } else {
            Some(r.format.parse::<Format>().map_err(bad)?)
        };
        let mode = if r.mode.is_empty() {
            Mode::Replace
        } else {
            r.mode.parse::<Mode>().map_err(bad)?
        };
        let (info, revision) = self
            .api()?
            .put_layer(PutLayer {
                project: r.project,
                tenant: r.tenant,
                key: r.key,
                value: r.value,
                format,
                mode,
                expected_revision: expected(r.expected_revision),
            })
            .await?;
        Ok(Response::new(PutConfigResponse {
            header: self.header(revision),
            layer: Some(layer_to_proto(info)),
        }))
    }

    async fn get_layer(
        &self,
        request: Request<GetLayerRequest>,
    ) -> Result<Response<GetLayerResponse>, Status> {
        let r = request.into_inner();
        let (info, revision) = self.api()?.layer(&r.project, &r.tenant, &r.key)?;
        Ok(Response::new(GetLayerResponse {
            header: self.header(revision),
            layer: Some(layer_to_proto(info)),
        }))
    }

    async fn delete_layer(
        &self,
        request: Request<DeleteLayerRequest>,
    ) -> Result<Response<DeleteLayerResponse>, Status> {
        let r = request.into_inner();
        let revision = self
            .api()?
            .delete_layer(&r.project, &r.tenant, &r.key, expected(r.expected_revision))
            .await?;
        Ok(Response::new(DeleteLayerResponse {
            header: self.header(revision),
        }))
    }

    async fn list_history(
        &self,
        request: Request<ListHistoryRequest>,
    ) -> Result<Response<ListHistoryResponse>, Status> {
        let r = request.into_inner();
        let limit = (r.limit > 0).then_some(r.limit as usize);
        let (versions, revision) = self
            .api()?
            .history(&r.project, &r.tenant, &r.key, limit)
            .await?;
        Ok(Response::new(ListHistoryResponse {
            header: self.header(revision),
            versions: versions
                .into_iter()
                .map(|v| version_to_proto(&r.tenant, &r.key, v))
                .collect(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let r = request.into_inner();
        let (done, revision) = self
            .api()?
            .rollback(
                &r.project,
                &r.tenant,
                &r.key,
                r.revision,
                expected(r.expected_revision),
            )
            .await?;
        Ok(Response::new(RollbackResponse {
            header: self.header(revision),
            restored: Some(version_to_proto(&r.tenant, &r.key, done.restored)),
            layer: done.layer.map(layer_to_proto),
        }))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let r = request.into_inner();
        let (explained, revision) = self.api()?.explain(&r.project, &r.tenant, &r.key)?;
        let v = explained.resolved;
        Ok(Response::new(ExplainResponse {
            header: self.header(revision),
            value: Some(ResolvedValue {
                key: r.key,
                value: v.value,
                format: v.format.name().to_owned(),
                origin: v.origin,
                mod_revision: v.mod_revision,
            }),
            fields: explained
                .fields
                .into_iter()
                .map(|(path, tenant)| FieldOrigin { path, tenant })
                .collect(),
        }))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let r = request.into_inner();
        let (values, revision) =
            self.api()?
                .resolve(&r.project, &r.tenant, &r.keys, &r.prefixes)?;
        Ok(Response::new(ResolveResponse {
            header: self.header(revision),
            values: values
                .into_iter()
                .map(|(key, v)| ResolvedValue {
                    key,
                    value: v.value,
                    format: v.format.name().to_owned(),
                    origin: v.origin,
                    mod_revision: v.mod_revision,
                })
                .collect(),
        }))
    }
}
