//! celery-keda-scaler: a KEDA external scaler that reports exact Celery queue depth.
//!
//! # Layout
//!
//! - [`error`]: the semantic error type and its one mapping to gRPC codes.
//! - [`secret`]: credential wrapper and URL redaction.
//! - [`broker`]: the `Broker` trait, depth types, the per-broker client registry, and one folder
//!   per backend (`broker::redis`).
pub mod broker;
pub mod error;
pub mod metadata;
pub mod secret;

/// Code generated from `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/externalscaler_descriptor.bin"));
}
