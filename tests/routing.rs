//! Running tasks under custom Celery routing, on Redis and RabbitMQ: tasks published through a
//! topic exchange, through a direct exchange whose routing key is not the queue's name, and
//! through a fanout exchange with several queues bound, are attributed to the queue their worker
//! consumed them from, with early ack and `acks_late`; exact depths while they run, 0 after.
//! A running task no binding routes any more is shown by `probe` and a metric.

mod common;

use std::time::Duration;

use common::*;

/// How long each scenario task sleeps: long enough for every reading below.
const TASK_SECONDS: &str = "40";

/// `CKS_TASK_QUEUES` for one scenario: the topic exchange `jobs` with `reports` (`report.#`)
/// and `mail` (`*.mail`), and the direct exchange `direct` with `billing` bound by `invoice`.
struct Routing {
    direct: String,
    reports: String,
    mail: String,
    billing: String,
    json: String,
}

impl Routing {
    fn new() -> Routing {
        let (jobs, direct) = (unique("jobs"), unique("direct"));
        let (reports, mail, billing) = (unique("reports"), unique("mail"), unique("billing"));
        let json = serde_json::json!([
            {"name": reports, "exchange": jobs, "type": "topic", "routing_key": "report.#"},
            {"name": mail, "exchange": jobs, "type": "topic", "routing_key": "*.mail"},
            {"name": billing, "exchange": direct, "type": "direct", "routing_key": "invoice"},
        ])
        .to_string();
        Routing {
            direct,
            reports,
            mail,
            billing,
            json,
        }
    }
}

/// Two tasks through `jobs` as `report.daily`, two through `direct` as `invoice`, one through
/// `jobs` as `eu.mail`; one worker runs all five.
async fn custom_routing(broker: &str, acks_late: bool) {
    let r = Routing::new();
    let mut conf = CeleryConf::new(broker);
    conf.task_queues = Some(r.json.clone());
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.acks_late = acks_late;
    let marker = unique("started");
    let task = ["--seconds", TASK_SECONDS, "--marker", &marker];
    let publish = |queue: &str, count: &str, key: &str, exchange: Option<&str>| {
        let mut args = vec!["--count", count, "--routing-key", key];
        args.extend(task);
        if let Some(e) = exchange {
            args.extend(["--exchange", e]);
        }
        conf.publish(queue, &args)
    };
    assert_eq!(publish(&r.reports, "2", "report.daily", None), 2);
    // Both named, or Celery sends a direct queue's tasks through the default exchange.
    assert_eq!(publish(&r.billing, "2", "invoice", Some(&r.direct)), 2);
    assert_eq!(publish(&r.mail, "1", "eu.mail", None), 1);
    let worker = conf.worker(&[&r.reports, &r.billing, &r.mail], 5);
    wait_started(&marker, 5).await;
    let scaler = Scaler::start_with(Default::default(), ServeSettingsExt::no_window()).await;
    let bound = Duration::from_secs(30);
    let expected = [(&r.reports, 2), (&r.billing, 2), (&r.mail, 1)];
    for (queue, n) in expected {
        expect_depth(&scaler, &counting(broker, queue, true, true), n, bound).await;
        // Early ack: only the census sees them; acks_late: only the broker (in flight).
        let (running, in_flight) = if acks_late { (0, n) } else { (n, 0) };
        expect_depth(
            &scaler,
            &counting(broker, queue, false, true),
            running,
            bound,
        )
        .await;
        expect_depth(
            &scaler,
            &counting(broker, queue, true, false),
            in_flight,
            bound,
        )
        .await;
    }
    let two = format!("{},{}", r.reports, r.mail);
    expect_depth(&scaler, &counting(broker, &two, true, true), 3, bound).await;
    // When they finish: 0 everywhere.
    for (queue, _) in expected {
        expect_depth(
            &scaler,
            &counting(broker, queue, true, true),
            0,
            Duration::from_secs(90),
        )
        .await;
    }
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_custom_routing_with_early_ack() {
    let server = OwnRedis::start(None, None);
    custom_routing(&server.url(None), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_custom_routing_with_acks_late() {
    let server = OwnRedis::start(None, None);
    custom_routing(&server.url(None), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_custom_routing_with_early_ack() {
    let vhost = Vhost::create().await;
    custom_routing(&vhost.url(), false).await;
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_custom_routing_with_acks_late() {
    let vhost = Vhost::create().await;
    custom_routing(&vhost.url(), true).await;
    vhost.delete().await;
}

/// RabbitMQ fanout: `fa` and `fb` bound to one fanout exchange each get a copy of both tasks;
/// the worker consumes `fa` only and runs its two (early ack). `fa` reads 2 (running), `fb`
/// reads 2 (ready): the running copies are not counted for `fb`. A running task whose binding
/// was removed since it was routed is counted nowhere, and shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_fanout_and_unresolvable_routes() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let (fan, gone) = (unique("fan"), unique("gone"));
    let (fa, fb, hq) = (unique("fa"), unique("fb"), unique("hq"));
    let mut conf = CeleryConf::new(&url);
    conf.task_queues = Some(
        serde_json::json!([
            {"name": fa, "exchange": fan, "type": "fanout", "routing_key": fa},
            {"name": fb, "exchange": fan, "type": "fanout", "routing_key": fb},
            {"name": hq, "exchange": gone, "type": "direct", "routing_key": "k"},
        ])
        .to_string(),
    );
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    let marker = unique("started");
    let task = ["--seconds", TASK_SECONDS, "--marker", &marker];
    let mut args = vec!["--count", "2"];
    args.extend(task);
    assert_eq!(conf.publish(&fa, &args), 2);
    let mut args = vec!["--count", "1", "--exchange", &gone, "--routing-key", "k"];
    args.extend(task);
    assert_eq!(conf.publish(&hq, &args), 1);
    let worker = conf.worker(&[&fa, &hq], 3);
    wait_started(&marker, 3).await;
    vhost.unbind(&gone, &hq, "k").await;
    let scaler = Scaler::start_with(Default::default(), ServeSettingsExt::no_window()).await;
    let bound = Duration::from_secs(30);
    expect_depth(&scaler, &counting(&url, &hq, true, true), 0, bound).await;
    wait_for("the unresolved task counted", bound, || async {
        scaler
            .metric("celery_keda_census_unresolved_tasks_total{broker=\"rabbitmq\"}")
            .await
            .filter(|n| *n >= 1.0)
    })
    .await;
    let out = probe_command(&[("brokerUrl", &url), ("queues", &hq)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("unresolved"))
        .unwrap_or_else(|| panic!("probe shows the unresolved task: {text}"));
    assert_eq!(line.split_whitespace().nth(1), Some("1"), "{text}");
    assert!(
        text.contains(&format!("exchange `{gone}`, routing key `k`")),
        "{text}"
    );
    expect_depth(&scaler, &counting(&url, &fa, true, true), 2, bound).await;
    expect_depth(&scaler, &counting(&url, &fa, false, true), 2, bound).await;
    expect_depth(&scaler, &counting(&url, &fb, true, true), 2, bound).await;
    expect_depth(&scaler, &counting(&url, &fb, false, true), 2, bound).await;
    let both = format!("{fa},{fb}");
    expect_depth(&scaler, &counting(&url, &both, true, true), 4, bound).await;
    // A second layout on the same broker (the same management API under another name) runs a
    // census of its own beside the first: neither takes the other's replies.
    let mut explicit = counting(&url, &fa, false, true);
    let other_name = management_base().replace("127.0.0.1", "localhost");
    assert_ne!(other_name, management_base(), "the management API is local");
    explicit.insert("managementUrl".into(), other_name);
    for _ in 0..3 {
        expect_depth(&scaler, &explicit, 2, bound).await;
        expect_depth(&scaler, &counting(&url, &fa, false, true), 2, bound).await;
    }
    expect_depth(
        &scaler,
        &counting(&url, &both, true, true),
        2,
        Duration::from_secs(90),
    )
    .await;
    drop(worker);
    vhost.delete().await;
}
