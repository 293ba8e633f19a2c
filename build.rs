//! Compiles `proto/externalscaler.proto` with protox (pure Rust, no `protoc`) and generates tonic code.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/externalscaler.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The descriptor set is also served by gRPC reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("externalscaler_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Small per-stream buffers (src/codec.rs): thousands of streams stay cheap.
        .codec_path("crate::codec::SmallCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
