//! Soak: the real scaler binary under a mixed, KEDA-like load against the suite's real Redis,
//! RabbitMQ and SQS (moto) for `CKS_SOAK_SECONDS` (default 120): throttled pollers calling
//! GetMetricSpec, GetMetrics and IsActive on queues holding known numbers of Celery tasks, a few
//! hundred StreamIsActive streams held open on one connection, streams opened and closed
//! repeatedly, and two queues filled and purged over and over so the streams push. Every answer
//! is checked: errors and wrong values must be zero, the scaler's RSS must not grow after
//! warm-up, and the stream and shared-poll gauges must come back to their expected values.
//!
//! It prints a `SOAK ...` summary line (run with `--nocapture`), recorded in docs/RELIABILITY.md.
//! CI runs the default two minutes; the longer soak is
//! `CKS_SOAK_SECONDS=1800 cargo test --release --test soak -- --nocapture`.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_keda_scaler::grpc::PUSH_REPEATS;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::GetMetricsRequest;
use common::*;
use tonic::transport::Channel;

/// Concurrent pollers; each sleeps 10-30 ms between KEDA cycles, so the soak measures stability
/// on a 2-core machine that also runs the scaler and the brokers, not throughput.
const POLLERS: usize = 8;
/// StreamIsActive streams held open for the whole soak, on one HTTP/2 connection (as KEDA does).
const HELD_STREAMS: usize = 200;
/// Tasks that open a stream, hold it briefly and close it, over and over.
const CHURNERS: usize = 4;
/// Bound on waits for the scaler or a broker to reflect a change (a failure, not a timing goal).
const SETTLE: Duration = Duration::from_secs(30);

/// A trigger of the load and the answers it must get.
#[derive(Clone)]
struct Case {
    meta: HashMap<String, String>,
    /// GetMetrics must return exactly this (int and float).
    depth: i64,
    /// IsActive must return this.
    active: bool,
    /// GetMetricSpec must return this name.
    metric_name: String,
}

/// `base` + `extra` metadata holding `depth` tasks.
fn case(base: &[(&str, &str)], extra: &[(&str, &str)], depth: i64) -> Case {
    let mut pairs = base.to_vec();
    pairs.extend_from_slice(extra);
    let meta = meta(&pairs);
    let activation: f64 = meta
        .get("activationQueueLength")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0);
    // The queue names here are lowercase [a-z0-9]: the derived name is exact.
    let metric_name = meta
        .get("metricName")
        .cloned()
        .unwrap_or_else(|| format!("celery-{}", meta["queues"].replace(',', "-")));
    Case {
        active: depth as f64 > activation,
        meta,
        depth,
        metric_name,
    }
}

/// What shared polls are keyed by: the metadata without the per-ScaledObject keys.
fn query_key(m: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = m
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "metricName" | "activationQueueLength" | "queueLength"
            )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    pairs.join("&")
}

/// Counters of the whole soak, and the first failures for the report.
#[derive(Default)]
struct Tally {
    /// RPCs answered during the load (held-stream opens before it are not counted).
    requests: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    /// `true` messages received on all streams.
    pushes: AtomicU64,
    churned: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.note(what);
    }
    fn wrong(&self, what: String) {
        self.wrong.fetch_add(1, Ordering::Relaxed);
        self.note(what);
    }
    fn note(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

/// Polls `check` every 50 ms for at most `limit`; whether it came true (never panics, so the
/// soak can count the failure and go on).
async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One KEDA cycle for `c`: GetMetricSpec, GetMetrics, IsActive, each answer checked.
async fn poll_once(client: &mut ExternalScalerClient<Channel>, c: &Case, tally: &Tally) {
    let what = || format!("{:?}", c.meta.get("queues"));
    match client.get_metric_spec(object_ref(&c.meta)).await {
        Ok(r) => {
            tally.ok();
            let specs = r.into_inner().metric_specs;
            if specs.len() != 1 || specs[0].metric_name != c.metric_name {
                tally.wrong(format!("GetMetricSpec {}: {specs:?}", what()));
            }
        }
        Err(e) => tally.error(format!("GetMetricSpec {}: {e}", what())),
    }
    let req = GetMetricsRequest {
        scaled_object_ref: Some(object_ref(&c.meta)),
        metric_name: c.metric_name.clone(),
    };
    match client.get_metrics(req).await {
        Ok(r) => {
            tally.ok();
            let v = r.into_inner().metric_values;
            let exact = v.len() == 1
                && v[0].metric_value == c.depth
                && v[0].metric_value_float == c.depth as f64;
            if !exact {
                tally.wrong(format!("GetMetrics {}: {v:?}, want {}", what(), c.depth));
            }
        }
        Err(e) => tally.error(format!("GetMetrics {}: {e}", what())),
    }
    match client.is_active(object_ref(&c.meta)).await {
        Ok(r) => {
            tally.ok();
            if r.into_inner().result != c.active {
                tally.wrong(format!("IsActive {}: want {}", what(), c.active));
            }
        }
        Err(e) => tally.error(format!("IsActive {}: {e}", what())),
    }
}

/// Sum of the values of the metric lines starting with `prefix` whose labels pass `keep`.
fn metric_sum(body: &str, prefix: &str, keep: impl Fn(&str) -> bool) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix) && keep(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a held stream must have received by the end.
#[derive(Clone, Copy)]
enum Expect {
    /// A static queue: one `true` at open if active, then nothing.
    Static(u64),
    /// A queue the toggler fills and purges: one `true` per fill.
    Toggle(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_polls_and_streams_on_real_brokers() {
    let seconds: u64 = std::env::var("CKS_SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let duration = Duration::from_secs(seconds);

    // --- Brokers and tasks, published by real Celery.
    let redis = redis_url();
    let prefix = format!("{}:", unique("soak"));
    let mut rconf = CeleryConf::new(&redis);
    rconf.global_keyprefix = Some(prefix.clone());
    assert_eq!(rconf.publish("r1", &["--count", "7"]), 7);
    assert_eq!(
        rconf.publish("r2", &["--count", "2", "--priorities", "0-9"]),
        20
    );
    assert_eq!(rconf.publish("r3", &["--count", "4", "--priority", "9"]), 4);

    let vhost = Vhost::create().await;
    let amqp = vhost.url();
    let aconf = CeleryConf::new(&amqp);
    assert_eq!(aconf.publish("a1", &["--count", "6"]), 6);
    let mut prio = aconf.clone();
    prio.queue_args = Some(r#"{"a2": {"x-max-priority": 10}}"#.into());
    assert_eq!(
        prio.publish("a2", &["--count", "2", "--priorities", "0-4"]),
        10
    );
    vhost.declare("a3").await;
    vhost.declare("at").await;

    let sqs = sqs_broker_url();
    let sqs_prefix = format!("{}-", unique("soak"));
    let mut sconf = CeleryConf::new(&sqs);
    sconf.queue_name_prefix = Some(sqs_prefix.clone());
    assert_eq!(sconf.publish("s1", &["--count", "4"]), 4);
    assert_eq!(sconf.publish("s2", &["--count", "2"]), 2);

    let rb: &[(&str, &str)] = &[("brokerUrl", &redis), ("globalKeyprefix", &prefix)];
    let ab: &[(&str, &str)] = &[("brokerUrl", &amqp)];
    let sb: &[(&str, &str)] = &[("brokerUrl", &sqs), ("queueNamePrefix", &sqs_prefix)];
    let no_flight = ("scaleOnInFlight", "false");
    let statics = vec![
        case(rb, &[("queues", "r1")], 7),
        case(rb, &[("queues", "r2")], 20),
        case(rb, &[("queues", "r1,r2")], 27),
        case(
            rb,
            &[("queues", "r1,r2,r3"), ("scaleOnRunning", "false")],
            31,
        ),
        case(rb, &[("queues", "r3"), ("activationQueueLength", "4")], 4),
        // Same query as the first, other ScaledObjects: they share readings.
        case(rb, &[("queues", "r1"), ("metricName", "soak-a")], 7),
        case(
            rb,
            &[
                ("queues", "r1"),
                ("metricName", "soak-b"),
                ("queueLength", "2"),
            ],
            7,
        ),
        case(rb, &[("queues", "re")], 0),
        case(rb, &[("queues", "r2"), no_flight], 20),
        case(ab, &[("queues", "a1")], 6),
        case(ab, &[("queues", "a2")], 10),
        case(ab, &[("queues", "a1,a2"), no_flight], 16),
        case(ab, &[("queues", "a3")], 0),
        case(
            ab,
            &[
                ("queues", "a1"),
                ("metricName", "soak-c"),
                ("activationQueueLength", "5"),
            ],
            6,
        ),
        case(sb, &[("queues", "s1")], 4),
        case(sb, &[("queues", "s1,s2")], 6),
        case(sb, &[("queues", "s2"), no_flight], 2),
    ];
    // Streams only: a query no held stream watches, so its shared poll starts and stops.
    let churn_only = case(
        rb,
        &[("queues", "r3"), no_flight, ("scaleOnRunning", "false")],
        4,
    );
    let toggles = [
        case(rb, &[("queues", "rt")], 0).meta,
        case(ab, &[("queues", "at")], 0).meta,
    ];

    // --- The scaler.
    let scaler = ScalerProcess::spawn(&[], &[("RUST_LOG", "warn")], &["CELERY_BROKER_URL"]).await;
    let rss_start = scaler.rss_kib();
    {
        let client = scaler.client().await;
        for c in &statics {
            wait_for(
                &format!("depth {} for {:?}", c.depth, c.meta.get("queues")),
                Duration::from_secs(60),
                || {
                    let mut client = client.clone();
                    let c = c.clone();
                    async move { (depth(&mut client, &c.meta).await.ok()? == c.depth).then_some(()) }
                },
            )
            .await;
        }
    }

    let tally = Arc::new(Tally::default());
    let closing = Arc::new(AtomicBool::new(false));
    let stream_channel = scaler.channel().await;

    // --- Held streams.
    let mut held = Vec::new();
    let mut held_keys = BTreeSet::new();
    for i in 0..HELD_STREAMS {
        let (mut m, expect) = match i % 4 {
            0 => (toggles[0].clone(), Expect::Toggle(0)),
            1 => (toggles[1].clone(), Expect::Toggle(1)),
            _ => {
                let c = &statics[(i / 4 + i % 4) % statics.len()];
                (c.meta.clone(), Expect::Static(u64::from(c.active)))
            }
        };
        m.insert("metricName".into(), format!("held-{i}"));
        held_keys.insert(query_key(&m));
        let pushes = Arc::new(AtomicU64::new(0));
        let mut client = ExternalScalerClient::new(stream_channel.clone());
        let (tally, closing, count) = (tally.clone(), closing.clone(), pushes.clone());
        let task = tokio::spawn(async move {
            let mut s = match client.stream_is_active(object_ref(&m)).await {
                Ok(r) => r.into_inner(),
                Err(e) => return tally.error(format!("held stream {i} open: {e}")),
            };
            loop {
                match s.message().await {
                    Ok(Some(msg)) if msg.result => {
                        count.fetch_add(1, Ordering::Relaxed);
                        tally.pushes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) => tally.wrong(format!("held stream {i}: `false` pushed")),
                    Ok(None) if !closing.load(Ordering::Relaxed) => {
                        return tally.error(format!("held stream {i} ended"))
                    }
                    Err(e) if !closing.load(Ordering::Relaxed) => {
                        return tally.error(format!("held stream {i}: {e}"))
                    }
                    _ => return,
                }
            }
        });
        held.push((expect, pushes, task));
    }
    let expected_polls = held_keys.len() as f64;
    wait_for(
        "held streams open over their shared polls",
        SETTLE,
        || async {
            let body = scaler.metrics_text().await;
            (metric_in(&body, "celery_keda_streams ") == Some(HELD_STREAMS as f64)
                && metric_in(&body, "celery_keda_shared_polls ") == Some(expected_polls))
            .then_some(())
        },
    )
    .await;
    wait_for("held streams on active queues pushed", SETTLE, || async {
        held.iter()
            .all(|(e, n, _)| match e {
                Expect::Static(want) => n.load(Ordering::Relaxed) == *want,
                Expect::Toggle(_) => true,
            })
            .then_some(())
    })
    .await;
    let ok_rpcs = |body: &str| {
        metric_sum(body, "celery_keda_rpc_total{", |l| {
            l.contains("code=\"OK\"")
        })
    };
    let served_before = ok_rpcs(&scaler.metrics_text().await);
    let pushes_before = tally.pushes.load(Ordering::Relaxed);

    // --- The load.
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    let poll_channels = [
        stream_channel.clone(),
        scaler.channel().await,
        scaler.channel().await,
    ];
    let statics = Arc::new(statics);
    for p in 0..POLLERS {
        let mut client = ExternalScalerClient::new(poll_channels[p % poll_channels.len()].clone());
        let (statics, tally) = (statics.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while Instant::now() < end {
                poll_once(&mut client, &statics[(p * 7 + i) % statics.len()], &tally).await;
                i += 1;
                let pause = 10 + ((p * 13 + i * 7) % 21) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    let mut churn_cases: Vec<Case> = statics.to_vec();
    churn_cases.push(churn_only);
    let churn_cases = Arc::new(churn_cases);
    for k in 0..CHURNERS {
        let mut client = ExternalScalerClient::new(stream_channel.clone());
        let (cases, tally) = (churn_cases.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while Instant::now() < end {
                let c = &cases[(k * 5 + i) % cases.len()];
                match client.stream_is_active(object_ref(&c.meta)).await {
                    Ok(r) => {
                        tally.ok();
                        tally.churned.fetch_add(1, Ordering::Relaxed);
                        let mut s = r.into_inner();
                        let hold = Duration::from_millis(50 + ((k * 31 + i * 17) % 300) as u64);
                        match tokio::time::timeout(hold, s.message()).await {
                            Ok(Ok(Some(msg))) if msg.result && c.active => {
                                tally.pushes.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Ok(Some(msg))) => tally.wrong(format!(
                                "churn stream {:?} (active {}) pushed {}",
                                c.meta.get("queues"),
                                c.active,
                                msg.result
                            )),
                            Ok(Ok(None)) => tally.error("churn stream ended".into()),
                            Ok(Err(e)) => tally.error(format!("churn stream: {e}")),
                            Err(_) => {} // held without a push: expected for inactive queues
                        }
                    }
                    Err(e) => tally.error(format!("churn stream open: {e}")),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // The toggler: fill a watched empty queue with one real Celery task, wait until every held
    // stream on it got its `true`, purge it, wait until it reads inactive; Redis and RabbitMQ in
    // turn, so each queue rests inactive for a whole cycle of the other (far more than the
    // 200 ms stream poll) before it is filled again.
    let toggle_counters: [Vec<Arc<AtomicU64>>; 2] = [0, 1].map(|t| {
        held.iter()
            .filter(|(e, _, _)| matches!(e, Expect::Toggle(x) if *x == t))
            .map(|(_, n, _)| n.clone())
            .collect()
    });
    let toggler = {
        let mut client = ExternalScalerClient::new(poll_channels[1].clone());
        let tally = tally.clone();
        let confs = [rconf.clone(), aconf.clone()];
        let toggles = toggles.clone();
        let (redis, prefix) = (redis.clone(), prefix.clone());
        let rabbit = Vhost {
            name: vhost.name.clone(),
            host: vhost.host.clone(),
            port: vhost.port,
        };
        tokio::spawn(async move {
            let mut conn = raw_redis(&redis).await;
            let mut cycles = [0u64; 2];
            while Instant::now() < end {
                for t in 0..2 {
                    let conf = confs[t].clone();
                    let queue = toggles[t]["queues"].clone();
                    let published = tokio::task::spawn_blocking(move || {
                        conf.publish(&queue, &["--count", "1"])
                    })
                    .await;
                    if !matches!(published, Ok(1)) {
                        tally.error(format!("toggle {t}: publish failed: {published:?}"));
                        continue;
                    }
                    cycles[t] += 1;
                    let want = cycles[t];
                    let counters = &toggle_counters[t];
                    // Each held stream gets a new push for this fill (an activation, then up to
                    // PUSH_REPEATS.len() repeats while it stays active: counts before the fill
                    // are the baseline).
                    let baseline: Vec<u64> =
                        counters.iter().map(|n| n.load(Ordering::Relaxed)).collect();
                    let pushed = within(SETTLE, || async {
                        counters
                            .iter()
                            .zip(&baseline)
                            .all(|(n, b)| n.load(Ordering::Relaxed) > *b)
                    })
                    .await;
                    if !pushed {
                        let got: Vec<u64> =
                            counters.iter().map(|n| n.load(Ordering::Relaxed)).collect();
                        tally.error(format!("toggle {t} fill {want}: pushes {got:?}"));
                    }
                    match client.is_active(object_ref(&toggles[t])).await {
                        Ok(r) if r.get_ref().result => tally.ok(),
                        Ok(_) => {
                            tally.ok();
                            tally.wrong(format!("toggle {t} fill {want}: IsActive false"));
                        }
                        Err(e) => tally.error(format!("toggle {t} IsActive: {e}")),
                    }
                    if t == 0 {
                        let keys: Vec<String> = ["", "\x06\x163", "\x06\x166", "\x06\x169"]
                            .iter()
                            .map(|s| format!("{prefix}rt{s}"))
                            .collect();
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                    } else {
                        rabbit.purge("at").await;
                    }
                    let idle = within(SETTLE, || {
                        let mut client = client.clone();
                        let m = toggles[t].clone();
                        let tally = tally.clone();
                        async move {
                            match client.is_active(object_ref(&m)).await {
                                Ok(r) => {
                                    tally.ok();
                                    !r.into_inner().result
                                }
                                Err(e) => {
                                    tally.error(format!("toggle IsActive: {e}"));
                                    false
                                }
                            }
                        }
                    })
                    .await;
                    if !idle {
                        tally.error(format!("toggle {t} purge {want}: still active"));
                    }
                }
            }
            cycles
        })
    };

    // RSS: sampled through the run; "warm" is the sample at 20 % of the duration.
    let sampler = {
        let pid = scaler.child.id();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            for tenth in 1..=10u32 {
                let at = started + duration * tenth / 10;
                tokio::time::sleep_until(at.into()).await;
                samples.push(rss_kib(pid));
            }
            samples
        })
    };

    for t in tasks {
        t.await.unwrap();
    }
    let cycles = toggler.await.unwrap();
    let samples = sampler.await.unwrap();
    let rss_warm = samples[1];
    let rss_end = rss_kib(scaler.child.id());
    let elapsed = started.elapsed();

    // --- After the load: gauges back, every held stream saw exactly what it should.
    let gauges_back = within(SETTLE, || async {
        let body = scaler.metrics_text().await;
        metric_in(&body, "celery_keda_streams ") == Some(HELD_STREAMS as f64)
            && metric_in(&body, "celery_keda_shared_polls ") == Some(expected_polls)
    })
    .await;
    let body = scaler.metrics_text().await;
    if !gauges_back {
        tally.wrong(format!(
            "after churn: streams {:?} (want {HELD_STREAMS}), shared polls {:?} (want {expected_polls})",
            metric_in(&body, "celery_keda_streams "),
            metric_in(&body, "celery_keda_shared_polls ")
        ));
    }
    // An activation is pushed once and repeated PUSH_REPEATS.len() times while it stays active: a
    // stream held on an always-active queue gets exactly 1 + repeats, a toggled one at least one
    // push per fill and at most 1 + repeats.
    let per_activation = 1 + PUSH_REPEATS.len() as u64;
    for (i, (expect, n, _)) in held.iter().enumerate() {
        let got = n.load(Ordering::Relaxed);
        let (lo, hi) = match expect {
            Expect::Static(w) => (*w * per_activation, *w * per_activation),
            Expect::Toggle(t) => (cycles[*t], cycles[*t] * per_activation),
        };
        if got < lo || got > hi {
            tally.wrong(format!("held stream {i}: {got} pushes, want {lo}..={hi}"));
        }
    }
    let served = ok_rpcs(&body) - served_before;
    let failed_rpcs = metric_sum(&body, "celery_keda_rpc_total{", |l| {
        !l.contains("code=\"OK\"")
    });
    let broker_errors = metric_sum(&body, "celery_keda_broker_errors_total{", |_| true);
    let census_failures = metric_sum(&body, "celery_keda_census_failures_total{", |_| true);

    closing.store(true, Ordering::Relaxed);
    for (_, _, task) in &held {
        task.abort();
    }
    let drained = within(SETTLE, || async {
        let body = scaler.metrics_text().await;
        metric_in(&body, "celery_keda_streams ") == Some(0.0)
            && metric_in(&body, "celery_keda_shared_polls ") == Some(0.0)
    })
    .await;
    let exit = scaler.terminate();

    let requests = tally.requests.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed);
    let wrong = tally.wrong.load(Ordering::Relaxed);
    let warnings = exit.stderr.lines().filter(|l| l.contains("WARN")).count();
    println!(
        "SOAK profile={} duration={}s requests={requests} req/s={:.0} streams_held={HELD_STREAMS} streams_churned={} pushes={} fills={} errors={errors} wrong={wrong} rss_kib_start={rss_start} rss_kib_warm={rss_warm} rss_kib_end={rss_end}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        elapsed.as_secs(),
        requests as f64 / elapsed.as_secs_f64(),
        tally.churned.load(Ordering::Relaxed),
        tally.pushes.load(Ordering::Relaxed) - pushes_before,
        cycles[0] + cycles[1],
    );
    println!(
        "SOAK rss_kib every 10%: {samples:?}; scaler: {} OK RPCs, {} failed, {} broker errors, {} census failures, {warnings} warnings logged",
        served as u64, failed_rpcs as u64, broker_errors as u64, census_failures as u64
    );

    cleanup_redis(&redis, &prefix, &[""]).await;
    vhost.delete().await;
    let client = raw_sqs().await;
    for q in ["s1", "s2"] {
        if let Ok(u) = client
            .get_queue_url()
            .queue_name(format!("{sqs_prefix}{q}"))
            .send()
            .await
        {
            let _ = client
                .delete_queue()
                .queue_url(u.queue_url().unwrap_or_default())
                .send()
                .await;
        }
    }

    let failures = tally.failures.lock().unwrap().clone();
    assert_eq!(errors, 0, "errors during the soak: {failures:#?}");
    assert_eq!(wrong, 0, "wrong answers during the soak: {failures:#?}");
    assert!(cycles[0] > 0 && cycles[1] > 0, "the queues were filled");
    assert_eq!(served, requests as f64, "the scaler's own count of OK RPCs");
    assert_eq!(failed_rpcs, 0.0, "RPCs the scaler answered with an error");
    assert_eq!(broker_errors, 0.0, "failed broker readings");
    assert_eq!(census_failures, 0.0, "failed worker censuses");
    assert!(
        drained,
        "streams and shared polls back to 0 after the last stream closed"
    );
    assert!(
        exit.status.success(),
        "SIGTERM is a clean exit: {:?}",
        exit.status
    );
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    // A leak check, not a performance threshold: after warm-up (connections, clients, caches,
    // census loops and metric series all exist) the working set of a steady load is flat, so
    // RSS at the end must stay near the warm-up sample. The 25 % + 4 MiB slack absorbs allocator
    // fragmentation and sampling noise; a leak per request or per stream (hundreds of thousands
    // of each) would exceed it by far. The absolute footprint is a benchmark (benches/fleet.rs).
    assert!(
        rss_end <= rss_warm + rss_warm / 4 + 4096,
        "RSS grew after warm-up: {rss_warm} KiB -> {rss_end} KiB ({samples:?})"
    );
}
