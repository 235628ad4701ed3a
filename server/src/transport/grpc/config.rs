//! `ConfigService` over gRPC: layers, history, rollback, resolution and
//! explanation. `Watch` is a shim over the subscription in `watch.rs`.

use strata_proto::v1::config_service_server::ConfigService;
use strata_proto::v1::{
    ConfigLayer, ConfigVersion, DeleteLayerRequest, DeleteLayerResponse, ExplainRequest,
    ExplainResponse, FieldOrigin, GetLayerRequest, GetLayerResponse, ListHistoryRequest,
    ListHistoryResponse, PutConfigRequest, PutConfigResponse, ResolveRequest, ResolveResponse,
    ResolvedValue, RollbackRequest, RollbackResponse, WatchConfigRequest, WatchConfigResponse,
};
use tonic::{Request, Response, Status};

use super::{GrpcApi, bad, expected};
use crate::app::api::{LayerInfo, LayerVersion, PutLayer};
use crate::app::audit::{Operation, Target, allow as allow_change};
use crate::app::auth::{Action, allow};
use crate::domain::document::{Format, Mode};

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

#[tonic::async_trait]
impl ConfigService for GrpcApi {
    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchConfigResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchConfigRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let subscription = self.subscribe_config(request).await?;
        Ok(Response::new(subscription.into_stream()))
    }

    async fn put_config(
        &self,
        request: Request<PutConfigRequest>,
    ) -> Result<Response<PutConfigResponse>, Status> {
        let q = request.get_ref();
        let target = Target::new(Operation::PutConfig, &q.project, &q.tenant).subject(&q.key);
        allow_change(&request, Action::WriteConfig, target)?;
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
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
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
        let q = request.get_ref();
        let target = Target::new(Operation::DeleteLayer, &q.project, &q.tenant).subject(&q.key);
        allow_change(&request, Action::WriteConfig, target)?;
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
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
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
        let q = request.get_ref();
        let target = Target::new(Operation::Rollback, &q.project, &q.tenant).subject(&q.key);
        allow_change(&request, Action::WriteConfig, target)?;
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
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
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
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
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
