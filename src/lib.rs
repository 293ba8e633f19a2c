//! celery-keda-scaler: a KEDA external scaler that reports exact Celery queue depth.
//!
//! # Layout
//!
//! The modules stand on floors (ARCHITECTURE.md, "Layers"; `scripts/check-layers.sh`): each
//! imports only from lower floors. From the bottom:
//!
//! - [`secret`], [`codec`], [`telemetry`], [`health`]: credentials and URL redaction; the
//!   protobuf codec (small buffers); logging; `grpc.health.v1` whose watches end at shutdown.
//! - [`error`], [`proto`]: the semantic error type (and tenancy `Refusal`s) with its one mapping
//!   to gRPC codes; code generated from `proto/externalscaler.proto`.
//! - [`allowlist`]: host rules, namespace lists and the check of a Sentinel-reported master.
//! - [`broker`]: `Backend` (a target and a trigger's layout), `DepthQuery`, the `Broker` trait,
//!   the client registry, and one folder per backend (`broker::redis`, `broker::rabbitmq`,
//!   `broker::sqs`).
//! - [`broker_env`], [`metrics`]: brokers of the scaler's own environment; Prometheus metrics.
//! - [`metadata`], [`census`], [`tls`], [`admin`]: trigger metadata (the user-facing contract)
//!   into a validated `Trigger`; the shared worker census behind `scaleOnRunning`; TLS / mTLS
//!   on the gRPC port; the admin HTTP port.
//! - [`tenancy`]: the policy: named brokers per namespace, the broker host allowlist, inline URLs
//!   off, the scaler's AWS identity only where allowed.
//! - [`scaler`]: the core: metadata to trigger, depth reading within the deadline.
//! - [`hub`], [`probe`], [`watch`]: shared background polls behind `StreamIsActive`; the
//!   `probe` command; the watch list's readings exported as gauges.
//! - [`grpc`]: the `ExternalScaler` service over the core and the hub.
//! - [`server`]: `serve`, wiring gRPC (with health and reflection) and the admin port, with
//!   shutdown passed in as a future.
pub mod admin;
pub mod allowlist;
pub mod broker;
pub mod broker_env;
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
pub mod watch;

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
