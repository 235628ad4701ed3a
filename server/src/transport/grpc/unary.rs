//! The registry's hot unary calls (`Register`, `Deregister`, `Heartbeat`:
//! what CD steps and SDK keep-alives call at high rates) on their own
//! routes, served exactly as the generated server serves them — the
//! handler is still the `RegistryService` method — but with small codec
//! buffers.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::GrpcApi;
use crate::transport::state::DaemonState;

/// `RegistryService.Register` (with the two below, what CD steps and SDK
/// keep-alives call at high rates).
pub const REGISTER_PATH: &str = "/strata.v1.RegistryService/Register";
/// `RegistryService.Deregister`.
pub const DEREGISTER_PATH: &str = "/strata.v1.RegistryService/Deregister";
/// `RegistryService.Heartbeat`.
pub const HEARTBEAT_PATH: &str = "/strata.v1.RegistryService/Heartbeat";

/// Bytes a unary registry call's decoder and encoder reserve. tonic's
/// default, 8 KiB each, is allocated and freed on every call, while these
/// requests and answers are a few hundred bytes; a larger message grows
/// its buffer as needed.
const UNARY_BUFFER: usize = 1024;

/// What a unary handler returns.
pub type UnaryFuture<Res> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Res>, tonic::Status>> + Send>>;

/// One unary `RegistryService` method served exactly as the generated
/// server serves it (the handler is still the [`RegistryService`] method),
/// but with [`SmallCodec`]'s buffers.
struct UnaryMethod<Req, Res> {
    api: GrpcApi,
    handler: fn(GrpcApi, tonic::Request<Req>) -> UnaryFuture<Res>,
}

impl<Req, Res> Clone for UnaryMethod<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            api: self.api.clone(),
            handler: self.handler,
        }
    }
}

impl<Req, Res> tonic::server::UnaryService<Req> for UnaryMethod<Req, Res> {
    type Response = Res;
    type Future = UnaryFuture<Res>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        (self.handler)(self.api.clone(), request)
    }
}

/// The axum route of one unary registry method (served by a `UnaryMethod`).
pub fn unary_route<Req, Res>(
    state: &Arc<DaemonState>,
    handler: fn(GrpcApi, tonic::Request<Req>) -> UnaryFuture<Res>,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static
where
    Req: Message + Default + Send + 'static,
    Res: Message + Send + 'static,
{
    let method = UnaryMethod {
        api: GrpcApi::new(Arc::clone(state)),
        handler,
    };
    tower::service_fn(move |request: axum::extract::Request| {
        let method = method.clone();
        async move {
            let mut grpc = tonic::server::Grpc::new(SmallCodec::<Res, Req>::default());
            Ok::<_, std::convert::Infallible>(grpc.unary(method, request).await)
        }
    })
}

/// Protobuf codec with [`UNARY_BUFFER`]-byte buffers: encodes `E`, decodes `D`.
struct SmallCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for SmallCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The encoding or decoding half of a [`SmallCodec`].
struct SmallHalf<T>(PhantomData<fn() -> T>);

fn unary_buffers() -> BufferSettings {
    BufferSettings::new(UNARY_BUFFER, YIELD_THRESHOLD)
}

impl<E, D> Codec for SmallCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = SmallHalf<E>;
    type Decoder = SmallHalf<D>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallHalf(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallHalf(PhantomData)
    }
}

impl<T: Message> Encoder for SmallHalf<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        // tonic reserves the message's length before encoding, so this only
        // fails if the message changed size meanwhile.
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("cannot encode the answer: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        unary_buffers()
    }
}

impl<T: Message + Default> Decoder for SmallHalf<T> {
    type Item = T;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        T::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("cannot decode the request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        unary_buffers()
    }
}

/// Encoded bytes after which a unary response is handed to HTTP/2 (tonic's
/// default; a unary call has one message, so it never applies in practice).
const YIELD_THRESHOLD: usize = 32 * 1024;
