//! What idle push streams cost Redis: 100 idle queue sets (one `StreamIsActive` stream each,
//! default trigger metadata) and one idle stream on the largest trigger the limits allow
//! (256 queues x 256 priority steps), each measured on a redis-server of the benchmark's own
//! with `INFO commandstats` (commands per second, by command) and `INFO cpu` (redis-server CPU).
//!
//! `cargo bench --bench idle_polls`; `CKS_BENCH_BIN=/path/to/celery-keda-scaler` measures another
//! build of the scaler (an older commit, for a before/after). Under `cargo test --all-targets` it
//! only checks that it was built.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use tokio_stream::StreamExt;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{admin_get_at, free_port, meta, metric_in, object_ref, ChildGuard, OwnRedis};

/// Calls per command since the last `CONFIG RESETSTAT`, without the benchmark's own.
fn calls(conn: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let n = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect()
}

/// redis-server CPU seconds (user + system) so far.
fn cpu(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).unwrap();
    info.lines()
        .filter_map(|l| {
            let v = l
                .strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))?;
            v.trim().parse::<f64>().ok()
        })
        .sum()
}

async fn metric(admin: u16, prefix: &str) -> f64 {
    let body = admin_get_at(([127, 0, 0, 1], admin).into(), "/metrics")
        .await
        .1;
    metric_in(&body, prefix).unwrap_or(0.0)
}

/// Opens one stream per metadata set, waits until the scaler holds them all, lets the first
/// readings pass, then counts `window` of broker load.
async fn measure(
    bin: &str,
    conn: &mut redis::Connection,
    sets: &[std::collections::HashMap<String, String>],
    window: Duration,
) -> (f64, BTreeMap<String, f64>, f64) {
    let (grpc, admin) = (free_port(), free_port());
    let _child = ChildGuard(
        Command::new(bin)
            .args(["serve", "--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "the scaler starts");
        std::thread::sleep(Duration::from_millis(5));
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for m in sets {
        let mut c = ExternalScalerClient::new(channel.clone());
        let r = object_ref(m);
        streams.push(tokio::spawn(async move {
            let mut s = c.stream_is_active(r).await.unwrap().into_inner();
            while let Some(_msg) = s.next().await {}
        }));
    }
    let t = Instant::now();
    while metric(admin, "celery_keda_streams ").await < sets.len() as f64 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(conn).unwrap();
    let cpu_before = cpu(conn);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let by_command = calls(conn);
    let secs = t.elapsed().as_secs_f64();
    let cpu_share = (cpu(conn) - cpu_before) / secs;
    for s in streams {
        s.abort();
    }
    let per_s: BTreeMap<String, f64> = by_command
        .into_iter()
        .map(|(k, v)| (k, v as f64 / secs))
        .collect();
    (per_s.values().sum(), per_s, cpu_share)
}

fn report(what: &str, (total, by_command, cpu): (f64, BTreeMap<String, f64>, f64)) {
    let detail: Vec<String> = by_command
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    println!(
        "{what}: {total:.1} Redis commands/s, redis-server CPU {:.2}% of a core ({})",
        cpu * 100.0,
        detail.join(", ")
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("idle_polls: built; run it with `cargo bench --bench idle_polls`");
        return;
    }
    celery_keda_scaler::install_crypto_provider();
    let bin = std::env::var("CKS_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_celery-keda-scaler").to_string());
    println!("scaler: {bin}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let window = Duration::from_secs(10);

    // 100 idle sets, default metadata (4 priority lists each, in-flight and running counted).
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let sets: Vec<_> = (0..100)
        .map(|i| meta(&[("brokerUrl", &url), ("queues", &format!("idle-set-{i}"))]))
        .collect();
    report(
        "100 idle sets, one stream each, default metadata",
        rt.block_on(measure(&bin, &mut conn, &sets, window)),
    );
    let plain: Vec<_> = sets
        .iter()
        .map(|m| {
            let mut m = m.clone();
            m.insert("scaleOnRunning".into(), "false".into());
            m
        })
        .collect();
    report(
        "100 idle sets, one stream each, scaleOnRunning false (no worker census)",
        rt.block_on(measure(&bin, &mut conn, &plain, window)),
    );
    drop(server);

    // One idle stream on 256 queues x 256 priority steps: 65,536 lists.
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let queues: Vec<String> = (0..256).map(|i| format!("huge-{i}")).collect();
    let steps: Vec<String> = (0..256).map(|s| s.to_string()).collect();
    let huge = vec![meta(&[
        ("brokerUrl", &url),
        ("queues", &queues.join(",")),
        ("prioritySteps", &steps.join(",")),
        ("scaleOnRunning", "false"),
    ])];
    report(
        "1 idle stream, 256 queues x 256 priority steps",
        rt.block_on(measure(&bin, &mut conn, &huge, Duration::from_secs(26))),
    );
}
