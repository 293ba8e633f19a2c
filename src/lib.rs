//! celery-keda-scaler: a KEDA external scaler that reports exact Celery queue depth.
//!
//! # Layout
//!
//! - [`proto`]: code generated from `proto/externalscaler.proto`, with the [`codec`] (prost, small buffers).
//! - [`metadata`]: trigger metadata (the user-facing contract) into a validated `Trigger`.
//! - [`broker`]: the `Broker` trait, depth types, the per-broker client registry, and one folder
//!   per backend (`broker::redis`).
//! - [`scaler`]: the core: metadata to trigger, depth reading within the deadline.
//! - [`census`]: the shared background worker census (Celery `inspect active`) behind `scaleOnRunning`.
//! - [`hub`]: shared background polls behind `StreamIsActive`.
//! - [`health`]: `grpc.health.v1` whose watches end when shutdown begins.
//! - [`grpc`]: the `ExternalScaler` service over the core and the hub.
//! - [`server`]: `serve`, wiring gRPC (with health and reflection) and the admin port, with
//!   shutdown passed in as a future.
//! - [`admin`], [`metrics`], [`telemetry`]: the admin HTTP port, Prometheus metrics, logging.
//! - [`probe`]: the `probe` command's reading and rendering.
//! - [`error`]: the semantic error type and its one mapping to gRPC codes.
//! - [`secret`]: credential wrapper and URL redaction.
//! - [`tenancy`]: named brokers per namespace, the broker host allowlist, inline URLs off, the
//!   scaler's AWS identity only where allowed.
//! - [`tls`]: TLS / mTLS on the gRPC port, with certificate files reloaded when they change.
pub mod admin;
pub mod broker;
pub mod census;
pub mod codec;
pub mod error;
pub mod grpc;
pub mod health;
pub mod hub;
pub mod metadata;
pub mod metrics;
pub mod probe;
pub mod scaler;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tenancy;
pub mod tls;

/// Code generated from `proto/externalscaler.proto`.
pub mod proto {
    tonic::include_proto!("externalscaler");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/externalscaler_descriptor.bin"));
}

/// Installs rustls' ring provider as the process default, once, before any TLS is used
/// (tonic and redis both use rustls; neither may pick a provider on its own).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
