//! What idle push streams cost Redis, with `CLIENT TRACKING` (the default) and polling (tracking
//! off, what a broker that refuses it gets): 100 and 1,000 idle queue sets (one
//! `StreamIsActive` stream each, default trigger metadata) and one idle stream on the largest
//! trigger the limits allow (256 queues x 256 priority steps), each on a redis-server of the
//! benchmark's own, with `INFO commandstats` (commands per second, by command) and `INFO cpu`
//! (redis-server CPU) over 31 s (one safety read); and the activation latency inside each fleet
//! (a Celery message pushed onto one idle set's list -> the stream says `true`, 20 trials).
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

/// A scaler process of the benchmark's own, with `args` added to `serve`.
struct Served {
    _child: ChildGuard,
    grpc: u16,
    admin: u16,
}

fn serve(bin: &str, args: &[&str]) -> Served {
    let (grpc, admin) = (free_port(), free_port());
    let child = ChildGuard(
        Command::new(bin)
            .args(["serve", "--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(args)
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
    Served {
        _child: child,
        grpc,
        admin,
    }
}

/// Open streams: each sends `(set index, when)` for every `true` it receives.
struct Streams {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pushes: tokio::sync::mpsc::UnboundedReceiver<(usize, Instant)>,
    channel: tonic::transport::Channel,
}

impl Drop for Streams {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens one stream per metadata set and waits until the scaler holds them all and their first
/// readings are done.
async fn open(served: &Served, sets: &[std::collections::HashMap<String, String>]) -> Streams {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", served.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, m) in sets.iter().enumerate() {
        let mut c = ExternalScalerClient::new(channel.clone());
        let r = object_ref(m);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = c.stream_is_active(r).await.unwrap().into_inner();
            while let Some(Ok(msg)) = s.next().await {
                if msg.result {
                    let _ = tx.send((i, Instant::now()));
                }
            }
        }));
    }
    let t = Instant::now();
    while metric(served.admin, "celery_keda_streams ").await < sets.len() as f64 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Streams {
        tasks,
        pushes,
        channel,
    }
}

/// Redis commands per second (in all, and by command) and redis-server CPU share over `window`.
async fn cost(conn: &mut redis::Connection, window: Duration) -> (f64, BTreeMap<String, f64>, f64) {
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(conn).unwrap();
    let cpu_before = cpu(conn);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let by_command = calls(conn);
    let secs = t.elapsed().as_secs_f64();
    let cpu_share = (cpu(conn) - cpu_before) / secs;
    let per_s: BTreeMap<String, f64> = by_command
        .into_iter()
        .map(|(k, v)| (k, v as f64 / secs))
        .collect();
    (per_s.values().sum(), per_s, cpu_share)
}

/// Activation latency: `trials` times, a Celery message (`body`) is pushed onto the list of one
/// idle set of the fleet (a different set each time); the time until that set's stream says
/// `true`. The list is then emptied and KEDA's `IsActive` is imitated, so the set is idle again.
async fn activation(
    streams: &mut Streams,
    conn: &mut redis::Connection,
    sets: &[std::collections::HashMap<String, String>],
    queue_of: impl Fn(usize) -> String,
    body: &[u8],
    trials: usize,
) -> Vec<f64> {
    let mut client = ExternalScalerClient::new(streams.channel.clone());
    let mut latencies = Vec::new();
    for k in 0..trials {
        let i = (k * sets.len() / trials) % sets.len();
        while streams.pushes.try_recv().is_ok() {}
        let t = Instant::now();
        let _: () = redis::cmd("LPUSH")
            .arg(queue_of(i))
            .arg(body)
            .query(conn)
            .unwrap();
        loop {
            let (j, at) = tokio::time::timeout(Duration::from_secs(30), streams.pushes.recv())
                .await
                .expect("pushed within 30 s")
                .unwrap();
            if j == i {
                latencies.push(at.duration_since(t).as_secs_f64());
                break;
            }
        }
        let _: () = redis::cmd("DEL").arg(queue_of(i)).query(conn).unwrap();
        let active = client
            .is_active(object_ref(&sets[i]))
            .await
            .unwrap()
            .into_inner()
            .result;
        assert!(!active);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, (total, by_command, cpu): (f64, BTreeMap<String, f64>, f64)) {
    let detail: Vec<String> = by_command
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    println!(
        "{what}: {total:.2} Redis commands/s, redis-server CPU {:.2}% of a core ({})",
        cpu * 100.0,
        detail.join(", ")
    );
}

/// One real Celery message, as Celery's own publisher writes it to Redis.
fn celery_message(url: &str) -> Vec<u8> {
    let scratch = "idle-polls-scratch";
    common::CeleryConf::new(url).publish(scratch, &["--count", "1"]);
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("RPOP").arg(scratch).query(&mut conn).unwrap()
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
    // Tracking's safety read runs every 30 s: the window holds one.
    let window = Duration::from_secs(31);
    let modes: [(&str, &[&str]); 2] = [
        ("tracking", &[]),
        (
            "polling (--redis-client-tracking=false)",
            &["--redis-client-tracking=false"],
        ),
    ];

    for (mode, args) in modes {
        for n in [100usize, 1000] {
            // n idle sets, default metadata (4 priority lists each, in-flight and running
            // counted).
            let server = OwnRedis::start(None, None);
            let url = server.url(None);
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let body = celery_message(&url);
            let queue_of = |i: usize| format!("idle-set-{i}");
            let sets: Vec<_> = (0..n)
                .map(|i| meta(&[("brokerUrl", &url), ("queues", &queue_of(i))]))
                .collect();
            let served = serve(&bin, args);
            rt.block_on(async {
                let mut streams = open(&served, &sets).await;
                report(
                    &format!("{mode}, {n} idle sets, one stream each, default metadata"),
                    cost(&mut conn, window).await,
                );
                let mut lat =
                    activation(&mut streams, &mut conn, &sets, queue_of, &body, 20).await;
                lat.sort_by(f64::total_cmp);
                println!(
                    "{mode}, {n} idle sets: activation (LPUSH of a Celery message -> pushed true), 20 trials: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
                    percentile(&lat, 0.5) * 1000.0,
                    percentile(&lat, 0.9) * 1000.0,
                    lat[lat.len() - 1] * 1000.0
                );
            });
        }

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
        let served = serve(&bin, args);
        rt.block_on(async {
            let _streams = open(&served, &huge).await;
            report(
                &format!("{mode}, 1 idle stream, 256 queues x 256 priority steps"),
                cost(&mut conn, window).await,
            );
        });
    }
}
