//! GetMetrics latency over real gRPC against real brokers, beside the raw broker round trips the
//! answer needs, measured from the same process in the same run.
//!
//! `cargo bench --bench get_metrics` (Redis from `CKS_REDIS_URL`, RabbitMQ from `CKS_AMQP_URL`
//! and `CKS_RABBITMQ_MANAGEMENT_URL`, defaults on localhost; SQS from `CKS_SQS_ENDPOINT`, e.g.
//! after `eval "$(CKS_ENV_ONLY=1 scripts/test.sh)"`). Under `cargo test --all-targets`
//! it only checks that it was built.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::GetMetricsRequest;
use celery_keda_scaler::server::ServeSettings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tonic::transport::Channel;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{amqp_channel, meta, object_ref, Scaler};

const RUNS: usize = 2000;
const WARMUP: usize = 200;

fn summary(name: &str, mut s: Vec<Duration>, limit: &str) -> Duration {
    s.sort();
    let p = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<52} p50={:>9.1?} p90={:>9.1?} p99={:>9.1?}  {limit}",
        p(0.5),
        p(0.9),
        p(0.99)
    );
    p(0.5)
}

async fn time<F, Fut>(mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARMUP {
        f().await;
    }
    let mut out = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
}

async fn get_metrics(
    client: &ExternalScalerClient<Channel>,
    meta: &HashMap<String, String>,
) -> Vec<Duration> {
    let req = GetMetricsRequest {
        scaled_object_ref: Some(object_ref(meta)),
        metric_name: "x".into(),
    };
    time(|| {
        let mut c = client.clone();
        let r = req.clone();
        async move {
            c.get_metrics(r).await.expect("GetMetrics succeeds");
        }
    })
    .await
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("get_metrics: built; run it with `cargo bench --bench get_metrics`");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Two servers: every call reads the broker (`--result-window 0s`), and the default
        // 250 ms window that answers repeated polls of the same queues.
        let (mut scalers, mut clients) = (Vec::new(), Vec::new());
        for window in [Duration::ZERO, ServeSettings::default().result_window] {
            let settings = ServeSettings {
                result_window: window,
                ..ServeSettings::default()
            };
            let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
            let label = if window.is_zero() { "every call reads" } else { "repeated, 250 ms window" };
            clients.push((label, scaler.client().await));
            scalers.push(scaler);
        }
        // --- Redis: 4 priority lists + the unacked hash, one pipeline.
        let redis_url = std::env::var("CKS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let q = format!("bench-gm-{}", std::process::id());
        let rc = redis::Client::open(redis_url.as_str()).unwrap();
        let conn = rc.get_multiplexed_async_connection().await.unwrap();
        let raw = time(|| {
            let mut conn = conn.clone();
            let q = q.clone();
            async move {
                let mut p = redis::pipe();
                for k in [q.clone(), format!("{q}\x06\x163"), format!("{q}\x06\x166"), format!("{q}\x06\x169")] {
                    p.llen(k);
                }
                p.hvals("unacked");
                let _: Vec<redis::Value> = p.query_async(&mut conn).await.unwrap();
            }
        })
        .await;
        println!("GetMetrics latency, {RUNS} sequential calls after {WARMUP} warm-up, one client, loopback");
        let raw50 = summary("Redis raw pipeline (4 LLEN + HVALS unacked)", raw, "(baseline)");
        for (label, client) in &clients {
            let gm = get_metrics(client, &meta(&[("brokerUrl", &redis_url), ("queues", &q)])).await;
            let gm50 = summary(&format!("Redis GetMetrics ({label})"), gm, "limit: p50 <= 1.5x raw, p99 < 2 ms");
            println!("{:<44} {:.2}x", "  ratio p50 GetMetrics / raw", gm50.as_secs_f64() / raw50.as_secs_f64());
        }

        // --- RabbitMQ: passive declare over AMQP, and the management API call.
        let amqp = std::env::var("CKS_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into());
        let mgmt = std::env::var("CKS_RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
        let http = reqwest::Client::new();
        let qname = format!("bench-gm-{}", std::process::id());
        let r = http
            .put(format!("{mgmt}/api/queues/%2F/{qname}"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"durable": false, "auto_delete": false}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let (_connection, ch) = amqp_channel(&amqp).await;
        let raw_amqp = time(|| {
            let ch = ch.clone();
            let q = qname.clone();
            async move {
                let o = QueueDeclareOptions { passive: true, ..Default::default() };
                ch.queue_declare(q.as_str().into(), o, FieldTable::default()).await.unwrap();
            }
        })
        .await;
        let a50 = summary("RabbitMQ raw passive queue.declare", raw_amqp, "(baseline)");
        let url = format!("{mgmt}/api/queues/%2F/{qname}?columns=name,messages_ready,messages_unacknowledged");
        let raw_http = time(|| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(url).basic_auth("guest", Some("guest")).send().await.unwrap();
                let _: serde_json::Value = r.json().await.unwrap();
            }
        })
        .await;
        let h50 = summary("RabbitMQ raw management GET queue", raw_http, "(baseline)");
        for (label, client) in &clients {
            let off = get_metrics(client, &meta(&[("brokerUrl", &amqp), ("queues", &qname), ("scaleOnInFlight", "false"), ("scaleOnRunning", "false")])).await;
            let off50 = summary(&format!("RabbitMQ GetMetrics AMQP only ({label})"), off, "limit: p50 <= 1.5x raw declare");
            let on = get_metrics(client, &meta(&[("brokerUrl", &amqp), ("queues", &qname)])).await;
            let on50 = summary(&format!("RabbitMQ GetMetrics AMQP + HTTP ({label})"), on, "limit: p50 <= 1.5x max(raw)");
            println!("{:<44} {:.2}x", "  ratio p50 AMQP only / raw declare", off50.as_secs_f64() / a50.as_secs_f64());
            println!("{:<44} {:.2}x", "  ratio p50 AMQP + HTTP / max(raw)", on50.as_secs_f64() / a50.max(h50).as_secs_f64());
        }
        let _ = http
            .delete(format!("{mgmt}/api/queues/%2F/{qname}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;

        // --- SQS (a local moto server): one GetQueueAttributes per queue.
        let Ok(endpoint) = std::env::var("CKS_SQS_ENDPOINT") else {
            println!("SQS: CKS_SQS_ENDPOINT not set (scripts/test.sh starts moto); skipped");
            return;
        };
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "bench"))
            .endpoint_url(endpoint.clone())
            .build();
        let sqs = aws_sdk_sqs::Client::from_conf(conf);
        let name = format!("bench-gm-{}", std::process::id());
        let url = sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_string();
        let raw_sqs = time(|| {
            let sqs = sqs.clone();
            let url = url.clone();
            async move {
                sqs.get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                    .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    .send()
                    .await
                    .unwrap();
            }
        })
        .await;
        let s50 = summary("SQS (moto) raw GetQueueAttributes", raw_sqs, "(baseline)");
        let host = endpoint.trim_start_matches("http://");
        let broker = format!("sqs://testing:testing@{host}");
        for (label, client) in &clients {
            let gm = get_metrics(client, &meta(&[("brokerUrl", &broker), ("queues", &name)])).await;
            let g50 = summary(&format!("SQS (moto) GetMetrics ({label})"), gm, "limit: p50 <= 1.5x raw");
            println!("{:<44} {:.2}x", "  ratio p50 GetMetrics / raw", g50.as_secs_f64() / s50.as_secs_f64());
        }
        let _ = sqs.delete_queue().queue_url(url).send().await;
    });
}
