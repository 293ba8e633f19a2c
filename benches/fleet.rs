//! Fleet-scale benchmark against the real release binary and a real Redis: GetMetrics
//! throughput with `h2load` (128 concurrent streams, repeated polls of one ScaledObject) beside a
//! trivial gRPC call on the same server, broker commands per answered request, a 1,000-ScaledObject
//! fleet over 100 distinct queue sets, and StreamIsActive streams from 1 to 10,000 on one HTTP/2
//! connection (scaler RSS, shared polls, idle broker load).
//!
//! `cargo bench --bench fleet` (Redis from `CKS_REDIS_URL`; `h2load` from Debian's nghttp2-client
//! for the throughput part). Under `cargo test --all-targets` it only checks that it was built.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::GetMetricsRequest;
use prost::Message;
use tokio_stream::StreamExt;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{admin_get_at, free_port, meta, metric_in, object_ref, rss_kib, ChildGuard};

fn redis_calls(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter(|l| {
            l.starts_with("cmdstat_llen:")
                || l.starts_with("cmdstat_hvals:")
                || l.starts_with("cmdstat_exists:")
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn redis_clients(conn: &mut redis::Connection) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(conn).unwrap();
    list.lines().count()
}

/// Trigger metadata for `queues` on `url`, with its own metric name.
fn fleet_meta(url: &str, queues: &str, name: &str) -> HashMap<String, String> {
    meta(&[("brokerUrl", url), ("queues", queues), ("metricName", name)])
}

/// A gauge or counter of the scaler's admin port (0 when absent).
async fn metric(admin: u16, prefix: &str) -> f64 {
    let body = admin_get_at(([127, 0, 0, 1], admin).into(), "/metrics")
        .await
        .1;
    metric_in(&body, prefix).unwrap_or(0.0)
}

fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

fn h2load(port: u16, path: &str, body: &[u8], n: u64) -> Option<(f64, String)> {
    let file = std::env::temp_dir().join(format!("cks-h2load-{}.bin", std::process::id()));
    std::fs::write(&file, body).unwrap();
    let out = Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", "1", "-m", "128", "-t", "1"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&file)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.trim_end_matches(" req/s").parse().ok())?;
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("")
        .to_string();
    Some((rps, requests))
}

struct Server {
    child: ChildGuard,
    grpc: u16,
    admin: u16,
}

fn start(bin: &str) -> Server {
    let (grpc, admin) = (free_port(), free_port());
    let child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    Server {
        child: ChildGuard(child),
        grpc,
        admin,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: built; run it with `cargo bench --bench fleet`");
        return;
    }
    celery_keda_scaler::install_crypto_provider();
    let url = std::env::var("CKS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // Built by cargo with this benchmark, in the same profile.
    let bin = env!("CARGO_BIN_EXE_celery-keda-scaler").to_string();
    let mut redis_conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // --- Throughput: repeated polls of one ScaledObject, 128 concurrent streams.
    {
        let server = start(&bin);
        let q = format!("bench-fleet-{}", std::process::id());
        let req = GetMetricsRequest {
            scaled_object_ref: Some(object_ref(&fleet_meta(&url, &q, "so"))),
            metric_name: "so".into(),
        };
        let body = grpc_frame(&req.encode_to_vec());
        let n = 300_000;
        let before = redis_calls(&mut redis_conn);
        match h2load(
            server.grpc,
            "/externalscaler.ExternalScaler/GetMetrics",
            &body,
            n,
        ) {
            Some((rps, line)) => {
                let cmds = redis_calls(&mut redis_conn) - before;
                let ok = rt.block_on(metric(
                    server.admin,
                    "celery_keda_rpc_total{method=\"GetMetrics\",code=\"OK\"}",
                ));
                println!("throughput GetMetrics (h2load -c1 -m128, n={n}): {rps:.0} req/s   limit: >= 30,000 req/s");
                println!("  {line}; answered OK (scaler's own count): {ok}");
                println!(
                    "  broker commands: {cmds} for {n} requests = {:.5} per request   limit: < 0.01",
                    cmds as f64 / n as f64
                );
                let health = grpc_frame(&[]);
                if let Some((hrps, _)) =
                    h2load(server.grpc, "/grpc.health.v1.Health/Check", &health, n)
                {
                    println!(
                        "  trivial gRPC call on the same server (health Check): {hrps:.0} req/s"
                    );
                }
            }
            None => {
                println!("throughput: h2load not found (apt-get install nghttp2-client); skipped")
            }
        }
    }

    // --- Fleet: 1,000 ScaledObjects over 100 distinct queue sets, KEDA's three calls each.
    rt.block_on(async {
        let clients_before = redis_clients(&mut redis_conn);
        let server = start(&bin);
        let client = ExternalScalerClient::connect(format!("http://127.0.0.1:{}", server.grpc)).await.unwrap();
        let cycles = 10;
        let t = Instant::now();
        for cycle in 0..cycles {
            let calls = (0..1000).map(|i| {
                let mut c = client.clone();
                let m = fleet_meta(
&url, &format!("bench-fleet-set-{}", i % 100), &format!("so-{i}"));
                async move {
                    c.get_metric_spec(object_ref(&m)).await.unwrap();
                    c.get_metrics(GetMetricsRequest { scaled_object_ref: Some(object_ref(&m)), metric_name: "x".into() })
                        .await
                        .unwrap();
                    c.is_active(object_ref(&m)).await.unwrap();
                }
            });
            futures::future::join_all(calls).await;
            if cycle + 1 < cycles {
                // KEDA cycles are seconds apart; leave the result window between cycles.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let elapsed = t.elapsed();
        let reads = metric(server.admin, "celery_keda_broker_read_duration_seconds_count{broker=\"redis\"}").await;
        let clients = redis_clients(&mut redis_conn) - clients_before;
        println!(
            "fleet: 1,000 ScaledObjects x 3 calls x {cycles} cycles over 100 queue sets in {elapsed:.1?}: {reads} broker readings ({:.1} per cycle; limit: grows with the 100 distinct sets, not the 1,000 objects); {clients} Redis connection(s) from the scaler",
            reads / cycles as f64
        );
    });

    // --- Streams: 1 .. 10,000 on one HTTP/2 connection.
    rt.block_on(async {
        let server = start(&bin);
        let channel =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", server.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap();
        println!("streams (one HTTP/2 connection; shared poll every 200 ms):");
        println!(
            "  {:>6} {:>6} {:>10} {:>16} {:>16}",
            "streams", "polls", "RSS KiB", "Redis cmds/s", "expected cmds/s"
        );
        let idle = rss_kib(server.child.0.id());
        println!("  {:>6} {:>6} {:>10} {:>16} {:>16}", 0, 0, idle, "-", "-");
        for n in [1usize, 10, 100, 1000, 10_000] {
            let distinct = n.min(100);
            let mut streams = Vec::with_capacity(n);
            for i in 0..n {
                let mut c = ExternalScalerClient::new(channel.clone());
                let m = fleet_meta(
                    &url,
                    &format!("bench-stream-set-{}", i % distinct),
                    &format!("s-{i}"),
                );
                streams.push(tokio::spawn(async move {
                    let mut s = c
                        .stream_is_active(object_ref(&m))
                        .await
                        .unwrap()
                        .into_inner();
                    while let Some(_msg) = s.next().await {}
                }));
            }
            let t = Instant::now();
            while metric(server.admin, "celery_keda_streams ").await < n as f64 {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "streams did not open"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let polls = metric(server.admin, "celery_keda_shared_polls ").await;
            let before = redis_calls(&mut redis_conn);
            let window = Duration::from_secs(3);
            tokio::time::sleep(window).await;
            let per_s = (redis_calls(&mut redis_conn) - before) as f64 / window.as_secs_f64();
            // Idle sets: 1 EXISTS per distinct queue set per 200 ms poll, and the `unacked`
            // hash read at most every 100 ms for all of them.
            let expected = distinct as f64 * 5.0 + 10.0;
            println!(
                "  {:>6} {:>6} {:>10} {:>16.0} {:>16.0}",
                n,
                polls,
                rss_kib(server.child.0.id()),
                per_s,
                expected
            );
            for s in streams {
                s.abort();
            }
            let t = Instant::now();
            while metric(server.admin, "celery_keda_streams ").await > 0.0 {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "streams did not close"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        println!("  limit: 10,000 streams served, RSS <= 100 MB; idle RSS <= 15 MB");
    });
}
