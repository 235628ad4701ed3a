//! The watch streams: `ConfigService.Watch` and
//! `RegistryService.WatchServices` subscriptions, and the routes that serve
//! them with [`EncodedWatchCodec`], whose streams send the bytes the hub
//! encoded once per push and keep small per-stream buffers. The generated
//! trait methods (`ConfigService::watch`, `RegistryService::watch_services`)
//! are shims over the same subscriptions.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use strata_proto::v1::{WatchConfigRequest, WatchServicesRequest};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::{GrpcApi, bad};
use crate::app::auth::{Action, allow};
use crate::app::service_watch::{ServiceSelection, ServicesLens};
use crate::error::ApiError;
use crate::state::hub::{ConfigLens, Encoded, Hub, MessageStream, Selection, Subscription};

impl GrpcApi {
    /// A `ConfigService.Watch` subscription (what [`ConfigService::watch`](strata_proto::v1::config_service_server::ConfigService::watch)
    /// streams).
    pub(crate) async fn subscribe_config(
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
    let principal = crate::app::auth::principal_of(request.extensions())?;
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
/// The stream is [`ConfigService::watch`](strata_proto::v1::config_service_server::ConfigService::watch)'s, message for message.
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
