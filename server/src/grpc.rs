//! gRPC handlers of `TenantService` and `ConfigService` (`RegistryService`'s
//! are in `grpc_registry.rs`, on the same type): thin — decode the
//! request, call [`Api`], encode the answer; errors go through the one table
//! in [`crate::error`].
//!
//! Also the watch streams' own routes ([`watch_config_route`],
//! [`watch_services_route`]): the same handlers, served with
//! [`EncodedWatchCodec`], whose streams send the bytes the hub encoded once
//! per push and keep small per-stream buffers.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use strata_proto::v1::WatchServicesRequest;
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
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::api::{Api, LayerInfo, LayerVersion, NewTenant, PutLayer, TenantInfo};
use crate::audit::{self, Operation, Target};
use crate::auth::{Action, allow};
use crate::daemon_state::DaemonState;
use crate::domain::document::{Format, Mode};
use crate::error::ApiError;
use crate::hub::{ConfigLens, Encoded, Hub, MessageStream, Selection, Subscription};
use crate::service_watch::{ServiceSelection, ServicesLens};
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
        let q = request.get_ref();
        let action = Action::CreateTenant {
            protected: q.protected,
        };
        let target = Target::new(Operation::CreateTenant, &q.project, &q.name);
        audit::allow(&request, action, target)?;
        let principal = crate::auth::principal_of(request.extensions())?;
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
        audit::allow(&request, Action::UpdateTenant, target)?;
        if q.update_ttl && q.ttl_seconds > 0 {
            let principal = crate::auth::principal_of(request.extensions())?;
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
        audit::allow(&request, Action::DeleteTenant { force: q.force }, target)?;
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

impl GrpcApi {
    /// A `ConfigService.Watch` subscription (what [`ConfigService::watch`]
    /// streams).
    async fn subscribe_config(
        &self,
        request: Request<WatchConfigRequest>,
    ) -> Result<Subscription<ConfigLens>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
        let owner = watch_owner(&request)?;
        let r = request.into_inner();
        if r.keys.len() + r.prefixes.len() > MAX_SELECTION_ITEMS {
            return Err(selection_too_large(r.keys.len() + r.prefixes.len()).into());
        }
        let hub: &Arc<Hub<ConfigLens>> = self.state.hub()?;
        Ok(hub
            .subscribe(
                r.project,
                r.tenant,
                Selection::new(r.keys, r.prefixes),
                r.start_revision,
                self.state.shutdown.clone(),
                owner,
            )
            .await?)
    }

    /// A `RegistryService.WatchServices` subscription: the service names
    /// validated, then subscribed on the services hub.
    pub(crate) async fn subscribe_services(
        &self,
        request: Request<WatchServicesRequest>,
    ) -> Result<Subscription<ServicesLens>, Status> {
        let q = request.get_ref();
        allow(&request, Action::Read, &q.project, &q.tenant)?;
        let owner = watch_owner(&request)?;
        let r = request.into_inner();
        if r.services.len() > MAX_SELECTION_ITEMS {
            return Err(selection_too_large(r.services.len()).into());
        }
        for service in &r.services {
            crate::domain::names::validate_service(service).map_err(bad)?;
        }
        let hub: &Arc<Hub<ServicesLens>> = self.state.services_hub()?;
        Ok(hub
            .subscribe(
                r.project,
                r.tenant,
                ServiceSelection::new(r.services),
                r.start_revision,
                self.state.shutdown.clone(),
                owner,
            )
            .await?)
    }
}

/// Most keys plus prefixes (or services) one watch selects: the selection
/// is kept for the stream's life and compared on every change.
pub const MAX_SELECTION_ITEMS: usize = 1_024;

fn selection_too_large(items: usize) -> ApiError {
    ApiError::new(
        strata_proto::v1::ErrorReason::LimitExceeded,
        format!(
            "a watch selects {items} keys, prefixes or services; the limit is \
             {MAX_SELECTION_ITEMS}: select a common prefix instead"
        ),
    )
    .with("limit", MAX_SELECTION_ITEMS)
}

/// The token a watch is counted against (`None` with auth off).
fn watch_owner<T>(request: &Request<T>) -> Result<Option<Arc<str>>, ApiError> {
    let principal = crate::auth::principal_of(request.extensions())?;
    Ok((&*principal.token_id != "anonymous").then(|| Arc::clone(&principal.token_id)))
}

/// Route of `ConfigService.Watch`.
pub const WATCH_CONFIG_PATH: &str = "/strata.v1.ConfigService/Watch";
/// Route of `RegistryService.WatchServices`.
pub const WATCH_SERVICES_PATH: &str = "/strata.v1.RegistryService/WatchServices";

/// Bytes each watch stream's encoder reserves when the stream opens.
/// tonic's default, 8 KiB, stays allocated for the life of the stream,
/// which with thousands of mostly idle subscribers was the largest
/// per-stream cost; a larger message grows that one stream's buffer.
const WATCH_ENCODE_BUFFER: usize = 256;

/// Encoded bytes after which a stream hands what it has to HTTP/2 even when
/// more messages are ready (tonic's default).
const WATCH_YIELD_THRESHOLD: usize = 32 * 1024;

/// Protobuf codec of the watch streams: requests are decoded as usual,
/// responses are [`Encoded`] messages copied as they are, and both
/// directions keep small buffers (see `WATCH_ENCODE_BUFFER`).
#[derive(Debug)]
pub struct EncodedWatchCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for EncodedWatchCodec<Req> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req> Clone for EncodedWatchCodec<Req> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

fn watch_buffers() -> BufferSettings {
    BufferSettings::new(WATCH_ENCODE_BUFFER, WATCH_YIELD_THRESHOLD)
}

impl<Req: prost::Message + Default + Send + 'static> Codec for EncodedWatchCodec<Req> {
    type Encode = Encoded;
    type Decode = Req;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        Self::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Self::default()
    }
}

impl<Req: Send + 'static> Encoder for EncodedWatchCodec<Req> {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item.0);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        watch_buffers()
    }
}

impl<Req: prost::Message + Default + Send + 'static> Decoder for EncodedWatchCodec<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        Req::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode the request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        watch_buffers()
    }
}

type EncodedResponse = Result<Response<MessageStream<Encoded>>, Status>;

/// `ConfigService.Watch` for [`EncodedWatchCodec`].
#[derive(Debug, Clone)]
pub struct WatchConfigMethod(pub GrpcApi);

impl ServerStreamingService<WatchConfigRequest> for WatchConfigMethod {
    type Response = Encoded;
    type ResponseStream = MessageStream<Encoded>;
    type Future = Pin<Box<dyn Future<Output = EncodedResponse> + Send>>;

    fn call(&mut self, request: Request<WatchConfigRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            let subscription = api.subscribe_config(request).await?;
            Ok(Response::new(subscription.into_encoded_stream()))
        })
    }
}

/// `RegistryService.WatchServices` for [`EncodedWatchCodec`].
#[derive(Debug, Clone)]
pub struct WatchServicesMethod(pub GrpcApi);

impl ServerStreamingService<WatchServicesRequest> for WatchServicesMethod {
    type Response = Encoded;
    type ResponseStream = MessageStream<Encoded>;
    type Future = Pin<Box<dyn Future<Output = EncodedResponse> + Send>>;

    fn call(&mut self, request: Request<WatchServicesRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            let subscription = api.subscribe_services(request).await?;
            Ok(Response::new(subscription.into_encoded_stream()))
        })
    }
}

/// A server-streaming method served with [`EncodedWatchCodec`], as an axum
/// route service.
fn encoded_route<M, Req>(
    method: M,
) -> impl tower::Service<
    axum::extract::Request,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static
where
    M: ServerStreamingService<Req, Response = Encoded> + Clone + Send + Sync + 'static,
    M::Future: Send,
    M::ResponseStream: Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    tower::service_fn(move |request: axum::extract::Request| {
        let method = method.clone();
        async move {
            let mut grpc = Grpc::new(EncodedWatchCodec::<Req>::default());
            Ok::<_, Infallible>(grpc.server_streaming(method, request).await)
        }
    })
}

/// `ConfigService.Watch` served with [`EncodedWatchCodec`]: route it at
/// [`WATCH_CONFIG_PATH`], ahead of the generated service's catch-all route.
/// The stream is [`ConfigService::watch`]'s, message for message.
pub fn watch_config_route(
    api: GrpcApi,
) -> impl tower::Service<
    axum::extract::Request,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    encoded_route::<_, WatchConfigRequest>(WatchConfigMethod(api))
}

/// `RegistryService.WatchServices` served with [`EncodedWatchCodec`]: route
/// it at [`WATCH_SERVICES_PATH`]. The stream is
/// `RegistryService::watch_services`'s, message for message.
pub fn watch_services_route(
    api: GrpcApi,
) -> impl tower::Service<
    axum::extract::Request,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    encoded_route::<_, WatchServicesRequest>(WatchServicesMethod(api))
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
        audit::allow(&request, Action::WriteConfig, target)?;
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
        audit::allow(&request, Action::WriteConfig, target)?;
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
        audit::allow(&request, Action::WriteConfig, target)?;
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
