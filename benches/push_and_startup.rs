//! Push latency and start-up benchmark against a real Redis.
//!
//! `cargo bench --bench push_and_startup` (Redis from `CKS_REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Prints, each beside its limit:
//! - push latency: first message put on an empty queue (Redis LPUSH; RabbitMQ publish to a
//!   queue that exists) -> `true` received on an open
//!   `StreamIsActive` stream, default settings (200 ms shared poll), at a random phase;
//! - start-up: spawn of the release binary -> gRPC port accepting connections;
//! - idle RSS of the serving process.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it only checks that it was built.

use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{amqp_channel, free_port, meta, object_ref, rss_kib, Scaler};

const PUSH_RUNS: usize = 100;
const START_RUNS: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(name: &str, mut samples: Vec<Duration>, limits: &str) {
    samples.sort();
    println!(
        "{name:<28} n={:<4} p50={:>8.1?} p90={:>8.1?} p99={:>8.1?} max={:>8.1?}   limit: {limits}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
}

/// How a benchmark puts one message on an empty queue.
enum Broker {
    Redis(redis::aio::MultiplexedConnection),
    Rabbit(lapin::Channel),
}

impl Broker {
    async fn prepare(&mut self, queue: &str) {
        if let Broker::Rabbit(ch) = self {
            let opts = lapin::options::QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            };
            ch.queue_declare(queue.into(), opts, lapin::types::FieldTable::default())
                .await
                .unwrap();
        }
    }

    async fn publish(&mut self, queue: &str) {
        match self {
            Broker::Redis(conn) => {
                let _: i64 = redis::cmd("LPUSH")
                    .arg(queue)
                    .arg("{}")
                    .query_async(conn)
                    .await
                    .unwrap();
            }
            Broker::Rabbit(ch) => {
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    b"{}",
                    lapin::BasicProperties::default(),
                )
                .await
                .unwrap();
            }
        }
    }

    async fn remove(&mut self, queue: &str) {
        match self {
            Broker::Redis(conn) => {
                let _: i64 = redis::cmd("DEL")
                    .arg(queue)
                    .query_async(conn)
                    .await
                    .unwrap();
            }
            Broker::Rabbit(ch) => {
                let _ = ch
                    .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                    .await;
            }
        }
    }
}

async fn push_latency(url: &str) -> Vec<Duration> {
    let redis = redis::Client::open(url).unwrap();
    let conn = redis.get_multiplexed_async_connection().await.unwrap();
    push_latency_on(url, Broker::Redis(conn)).await
}

async fn push_latency_rabbit(amqp: &str) -> Vec<Duration> {
    let (_connection, channel) = amqp_channel(amqp).await;
    push_latency_on(amqp, Broker::Rabbit(channel)).await
}

async fn push_latency_on(url: &str, mut broker: Broker) -> Vec<Duration> {
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut samples = Vec::with_capacity(PUSH_RUNS);
    for i in 0..PUSH_RUNS {
        let queue = format!("bench-push-{}-{i}", std::process::id());
        broker.prepare(&queue).await;
        let m = meta(&[("brokerUrl", url), ("queues", queue.as_str())]);
        let mut stream = client
            .stream_is_active(object_ref(&m))
            .await
            .unwrap()
            .into_inner();
        // A random phase against the 200 ms poll, after the first (empty) reading.
        let phase = 250 + (i * 37 % 200) as u64;
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let start = Instant::now();
        broker.publish(&queue).await;
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap();
        assert!(msg.unwrap().unwrap().result);
        samples.push(start.elapsed());
        broker.remove(&queue).await;
    }
    scaler.stop().await;
    samples
}

fn startup(bin: &str) -> (Vec<Duration>, Vec<u64>) {
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..START_RUNS {
        let (port, admin) = (free_port(), free_port());
        let start = Instant::now();
        let mut child = std::process::Command::new(bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "no listener");
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        match rss_kib(child.id()) {
            0 => {}
            kib => rss.push(kib),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    (times, rss)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("push_and_startup: built; run it with `cargo bench --bench push_and_startup`");
        return;
    }
    let url = std::env::var("CKS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // Built by cargo with this benchmark, in the same profile.
    let bin = std::env::var("CKS_SCALER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_celery-keda-scaler").to_string());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let samples = rt.block_on(push_latency(&url));
    report(
        "push latency (Redis)",
        samples,
        "p50 <= 300 ms, p99 <= 600 ms (issue 6); < 1 s (issue 2)",
    );
    let amqp = std::env::var("CKS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into());
    let samples = rt.block_on(push_latency_rabbit(&amqp));
    report(
        "push latency (RabbitMQ)",
        samples,
        "p50 <= 300 ms, p99 <= 600 ms (issue 6)",
    );
    let (times, rss) = startup(&bin);
    report("start-up to listening", times, "<= 100 ms");
    let max_rss = rss.iter().max().copied().unwrap_or(0);
    println!(
        "{:<28} max={} KiB over {} runs   limit: <= 15 MB",
        "idle RSS",
        max_rss,
        rss.len()
    );
}
