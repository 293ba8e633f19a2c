# syntax=docker/dockerfile:1
#
# celery-keda-scaler container image.
#
#   docker build -t ghcr.io/example/celery-keda-scaler:0.1.0 .
#
# Builder: the official Rust image (no protoc needed: build.rs compiles the .proto with protox).
# Runtime: distroless cc (glibc + libgcc, CA certificates, no shell, no package manager), uid 65532.
# TLS everywhere is rustls, so no OpenSSL is needed at run time.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Only what `cargo build` reads: the manifest and lock file, build.rs and its .proto, the sources,
# and benches/ (Cargo.toml declares [[bench]] targets, and Cargo checks their files exist even
# when it does not build them). tests/ is not needed (see .dockerignore).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY benches ./benches
COPY src ./src
# BuildKit cache mounts keep the registry and target/ between builds; the binary is copied out of
# the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin celery-keda-scaler \
    && install -D -m 0755 target/release/celery-keda-scaler /out/celery-keda-scaler

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/example/celery-keda-scaler
LABEL org.opencontainers.image.title="celery-keda-scaler" \
      org.opencontainers.image.description="KEDA external scaler for Celery queue depth on Redis, RabbitMQ and Amazon SQS" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/celery-keda-scaler /usr/local/bin/celery-keda-scaler
# 6000: gRPC (externalscaler.ExternalScaler, grpc.health.v1, reflection); 9090: /metrics, /healthz, /readyz.
EXPOSE 6000 9090
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/celery-keda-scaler"]
CMD ["serve"]
