//! SQS suite: a real SQS-compatible server (moto), tasks published by real Celery (kombu's SQS
//! transport) and reserved by a real Celery worker; numbers checked over real gRPC and against
//! the server's own queue attributes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use celery_keda_scaler::server::ServeSettings;
use common::*;
use tonic::Code;

fn m(queues: &str, prefix: &str, in_flight: bool) -> HashMap<String, String> {
    meta(&[
        ("brokerUrl", &sqs_broker_url()),
        ("awsRegion", "us-east-1"),
        ("queues", queues),
        ("queueNamePrefix", prefix),
        ("scaleOnInFlight", if in_flight { "true" } else { "false" }),
    ])
}

/// A queue-name prefix no other test uses (kombu's `queue_name_prefix`).
fn prefix() -> String {
    format!("{}-", unique("cks"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_queue_under_a_prefix() {
    let p = prefix();
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.queue_name_prefix = Some(p.clone());
    assert_eq!(conf.publish("celery", &["--count", "5"]), 5);
    assert_eq!(sqs_attributes(&format!("{p}celery")).await, (5, 0));

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let dflt = meta(&[("brokerUrl", &sqs_broker_url()), ("queueNamePrefix", &p)]);
    assert_eq!(depth(&mut client, &dflt).await.unwrap(), 5);
    assert!(active(&mut client, &dflt).await.unwrap());
    // Without the prefix the queue is another (missing) one.
    let err = depth(&mut client, &m("celery", "", true)).await;
    assert!(err.is_err() || err.unwrap() != 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotted_names_and_prefixes_are_translated_like_kombu() {
    let p = format!("{}.prod.", unique("cks"));
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.queue_name_prefix = Some(p.clone());
    conf.publish("orders.high", &["--count", "3"]);
    conf.publish("mail:out", &["--count", "2"]);
    // kombu: `.` -> `-`, other punctuation -> `_`, prefix included.
    let sqs_prefix = p.replace('.', "-");
    assert_eq!(
        sqs_attributes(&format!("{sqs_prefix}orders-high")).await,
        (3, 0)
    );
    assert_eq!(
        sqs_attributes(&format!("{sqs_prefix}mail_out")).await,
        (2, 0)
    );

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m("orders.high", &p, true))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        depth(&mut client, &m("orders.high,mail:out", &p, true))
            .await
            .unwrap(),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queue() {
    let p = prefix();
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.queue_name_prefix = Some(p.clone());
    conf.publish("jobs.v2.fifo", &["--count", "4"]);
    assert_eq!(sqs_attributes(&format!("{p}jobs-v2.fifo")).await, (4, 0));

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m("jobs.v2.fifo", &p, true))
            .await
            .unwrap(),
        4
    );
}

/// A worker holds reserved tasks invisible; a running task (early ack) is deleted from SQS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reserved_tasks_are_not_visible_and_counted_in_flight() {
    let p = prefix();
    let marker = unique("started");
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.queue_name_prefix = Some(p.clone());
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.publish(
        "work",
        &["--count", "6", "--seconds", "120", "--marker", &marker],
    );
    let worker = conf.worker(&["work"], 1);
    wait_started(&marker, 1).await;
    let sqs_name = format!("{p}work");
    // The worker has reserved what it wants once 5 = visible + not visible (1 running, deleted).
    let (visible, not_visible) = wait_for("reservations settle", Duration::from_secs(60), || {
        let sqs_name = sqs_name.clone();
        async move {
            let (v, n) = sqs_attributes(&sqs_name).await;
            (v + n == 5 && n > 0).then_some((v, n))
        }
    })
    .await;

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    // Published and not finished, minus the running task Celery already acknowledged.
    assert_eq!(depth(&mut client, &m("work", &p, true)).await.unwrap(), 5);
    assert_eq!(
        depth(&mut client, &m("work", &p, false)).await.unwrap(),
        visible as i64
    );
    assert!(not_visible >= 1 && visible < 5);
    drop(worker);
    cleanup_redis(&redis_url(), "", &[&marker]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_missing_queue_down_and_hanging_endpoints() {
    let scaler = Scaler::start_with(
        Default::default(),
        ServeSettings {
            deadline: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let mut client = scaler.client().await;
    let p = prefix();
    let err = depth(&mut client, &m("no.such", &p, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains(&format!("`{p}no-such`")) && err.message().contains("`no.such`"),
        "{}",
        err.message()
    );

    let down = meta(&[
        ("brokerUrl", "sqs://k:Secr3tKey@"),
        ("awsEndpoint", &format!("http://127.0.0.1:{}", free_port())),
    ]);
    let err = tokio::time::timeout(Duration::from_secs(15), depth(&mut client, &down))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(!err.message().contains("Secr3tKey"));

    let (port, _) = silent_server().await;
    let hanging = meta(&[("brokerUrl", &format!("sqs://k:Secr3tKey@127.0.0.1:{port}"))]);
    let err = tokio::time::timeout(Duration::from_secs(15), depth(&mut client, &hanging))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}
