//! The protobuf codec of the ExternalScaler service: prost, with small encode and decode buffers.
//!
//! tonic's default codec reserves an 8 KiB buffer per response stream. Every `StreamIsActive`
//! stream holds one for its whole life to send 2-byte messages, which made 10,000 streams cost
//! about 100 MiB. Messages here are small (metadata maps, one metric); the buffers still grow
//! when one is not.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer per call or stream; grows on demand.
const BUFFER: usize = 512;
/// tonic's default: yield to the runtime after this many buffered bytes.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost with [`BUFFER`]-sized buffers (named by `build.rs` as the service's codec).
#[derive(Debug, Clone, Copy)]
pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER, YIELD_THRESHOLD)
}

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
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
