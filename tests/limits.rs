//! Hostile and oversized input over real gRPC: metadata maps with too many keys, huge values,
//! thousands of queues, requests over the size limit, invalid UTF-8 and malformed protobuf.
//! Each gets an error status naming what was too big (never a panic), the scaler keeps serving,
//! and label cardinality in `/metrics` stays bounded.

mod common;

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::metadata::Limits;
use celery_keda_scaler::server::ServeSettings;
use common::*;
use tokio_util::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// Sends and receives raw bytes as gRPC messages, so tests can send what no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

async fn raw_call(scaler: &Scaler, method: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(scaler.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc.unary(tonic::Request::new(body), path, RawCodec).await {
        Ok(_) => panic!("{method} accepted a malformed request"),
        Err(status) => status,
    }
}

/// The scaler still answers a valid request.
async fn still_serving(scaler: &Scaler) {
    let m = meta(&[("brokerUrl", "redis://localhost:6379/0"), ("queues", "q")]);
    scaler
        .client()
        .await
        .get_metric_spec(object_ref(&m))
        .await
        .expect("the scaler keeps serving");
}

async fn spec_error(
    scaler: &Scaler,
    m: &std::collections::HashMap<String, String>,
) -> tonic::Status {
    scaler
        .client()
        .await
        .get_metric_spec(object_ref(m))
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn oversized_metadata_is_invalid_argument_naming_the_key() {
    let scaler = Scaler::start().await;
    let url = redis_url();
    let defaults = Limits::default();

    // Too many keys: the map as a whole.
    let mut m = meta(&[("brokerUrl", url.as_str())]);
    for i in 0..defaults.max_keys {
        m.insert(format!("extra{i}"), "x".into());
    }
    let e = spec_error(&scaler, &m).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("metadata key `metadata`: has 65 keys, more than the 64"),
        "{}",
        e.message()
    );

    // A huge value in a key the scaler reads names that key; the status message stays short.
    let huge = format!(
        "redis://localhost:6379/0?x={}",
        "a".repeat(defaults.max_value_bytes)
    );
    let e = spec_error(&scaler, &meta(&[("brokerUrl", huge.as_str())])).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("metadata key `brokerUrl`: value has 8219 bytes"),
        "{}",
        e.message()
    );
    let long_number = "9".repeat(8000) + "x";
    let e = spec_error(
        &scaler,
        &meta(&[
            ("brokerUrl", url.as_str()),
            ("queueLength", long_number.as_str()),
        ]),
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e
        .message()
        .starts_with("metadata key `queueLength`: must be a number"));
    assert!(
        e.message().len() < 1100,
        "status message bounded: {} bytes",
        e.message().len()
    );

    // A large value in a key KEDA reads (a CA bundle put under metadata) is not the scaler's business.
    let ca = "-----BEGIN CERTIFICATE-----".to_string() + &"A".repeat(20_000);
    let m = meta(&[("brokerUrl", url.as_str()), ("caCert", ca.as_str())]);
    scaler
        .client()
        .await
        .get_metric_spec(object_ref(&m))
        .await
        .expect("ignored key");

    // Thousands of queues: over the value size first, and over --max-queues with a larger value limit.
    let many: Vec<String> = (0..5000).map(|i| format!("q{i}")).collect();
    let many = many.join(",");
    let e = spec_error(
        &scaler,
        &meta(&[("brokerUrl", url.as_str()), ("queues", many.as_str())]),
    )
    .await;
    assert!(
        e.message().starts_with("metadata key `queues`: value has"),
        "{}",
        e.message()
    );
    scaler.stop().await;

    let settings = ServeSettings {
        limits: Limits {
            max_value_bytes: 64 * 1024,
            ..Limits::default()
        },
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let e = spec_error(
        &scaler,
        &meta(&[("brokerUrl", url.as_str()), ("queues", many.as_str())]),
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with(
            "metadata key `queues`: names more than 256 distinct queues (--max-queues)"
        ),
        "{}",
        e.message()
    );
    let long_name = "q".repeat(300);
    let e = spec_error(
        &scaler,
        &meta(&[("brokerUrl", url.as_str()), ("queues", long_name.as_str())]),
    )
    .await;
    assert!(
        e.message().contains("a queue name of 300 bytes"),
        "{}",
        e.message()
    );
    still_serving(&scaler).await;
    scaler.stop().await;
}

#[tokio::test]
async fn the_maximum_number_of_queues_is_read_exactly() {
    let scaler = Scaler::start_with(BrokerEnv::default(), ServeSettingsExt::no_window()).await;
    let url = redis_url();
    let prefix = unique("max");
    let queues: Vec<String> = (0..Limits::default().max_queues)
        .map(|i| format!("{prefix}-{i}"))
        .collect();
    let conf = CeleryConf::new(&url);
    assert_eq!(conf.publish(&queues[0], &["--count", "2"]), 2);
    assert_eq!(conf.publish(&queues[255], &["--count", "3"]), 3);
    let joined = queues.join(",");
    let m = meta(&[("brokerUrl", url.as_str()), ("queues", joined.as_str())]);
    assert_eq!(depth(&mut scaler.client().await, &m).await.unwrap(), 5);
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    cleanup_redis(&url, "", &names).await;
    scaler.stop().await;
}

#[tokio::test]
async fn requests_over_the_size_limit_and_malformed_protobuf_are_refused() {
    let settings = ServeSettings {
        max_request_bytes: 64 * 1024,
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;

    // Over --max-request-bytes (in a key the scaler ignores, so only the size limit applies).
    let big = "x".repeat(100 * 1024);
    let m = meta(&[
        ("brokerUrl", "redis://localhost:6379/0"),
        ("padding", big.as_str()),
    ]);
    let e = spec_error(&scaler, &m).await;
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    still_serving(&scaler).await;

    const SPEC: &str = "/externalscaler.ExternalScaler/GetMetricSpec";
    // ScaledObjectRef.name (field 1, a string) holding bytes that are not UTF-8.
    let e = raw_call(&scaler, SPEC, vec![0x0a, 0x02, 0xff, 0xfe]).await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("UTF-8"), "{}", e.message());
    // A length that runs past the end of the message.
    let e = raw_call(&scaler, SPEC, vec![0x0a, 0x10, 0x41]).await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    // A varint that never ends.
    let e = raw_call(
        &scaler,
        "/externalscaler.ExternalScaler/GetMetrics",
        vec![0xff; 11],
    )
    .await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    // A map entry (scalerMetadata, field 3) whose value is not UTF-8.
    let entry = [0x0a, 0x01, b'k', 0x12, 0x01, 0xc3];
    let mut body = vec![0x1a, entry.len() as u8];
    body.extend_from_slice(&entry);
    let e = raw_call(&scaler, "/externalscaler.ExternalScaler/IsActive", body).await;
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    still_serving(&scaler).await;
    scaler.stop().await;
}

#[tokio::test]
async fn queue_depth_series_are_bounded() {
    let settings = ServeSettings {
        max_queue_series: 3,
        ..ServeSettingsExt::no_window()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let url = redis_url();
    let prefix = unique("series");
    let queues: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    let mut client = scaler.client().await;
    for q in &queues {
        let m = meta(&[("brokerUrl", url.as_str()), ("queues", q.as_str())]);
        assert_eq!(depth(&mut client, &m).await.unwrap(), 0);
    }
    let (_, body) = scaler.admin_get("/metrics").await;
    let exported = queues
        .iter()
        .filter(|q| body.contains(&format!("queue=\"{q}\",state=\"ready\"")))
        .count();
    assert_eq!(exported, 3, "{body}");
    assert_eq!(
        scaler
            .metric("celery_keda_queue_series_dropped_total")
            .await,
        Some(2.0)
    );
    // A queue already exported keeps its series; one over the bound is dropped again.
    for q in [&queues[0], &queues[4]] {
        let m = meta(&[("brokerUrl", url.as_str()), ("queues", q.as_str())]);
        assert_eq!(depth(&mut client, &m).await.unwrap(), 0);
    }
    assert_eq!(
        scaler
            .metric("celery_keda_queue_series_dropped_total")
            .await,
        Some(3.0)
    );
    scaler.stop().await;
}
