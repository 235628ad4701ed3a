//! Opening watch streams with small codec buffers.
//!
//! tonic's generated clients decode every stream into an 8 KiB buffer that
//! lives as long as the stream. A watch lives as long as the process and
//! its messages are usually a few hundred bytes, so with thousands of
//! watches that buffer was most of a watch's memory (`benches/SDK.md`). The
//! buffer still grows for a larger message.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic::transport::Channel;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial decode buffer of a watch stream.
const DECODE_BUFFER: usize = 512;
/// Encode buffer of the (single) request message.
const ENCODE_BUFFER: usize = 256;
/// tonic's default: bytes decoded before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec with small buffers.
struct SmallCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD))
    }
}

/// Calls the server-streaming method at `path` (`/package.Service/Method`).
pub(crate) async fn server_streaming<T, U>(
    channel: Channel,
    request: tonic::Request<T>,
    path: &'static str,
) -> Result<tonic::Streaming<U>, tonic::Status>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("service was not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(grpc
        .server_streaming(request, path, SmallCodec(PhantomData))
        .await?
        .into_inner())
}
