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

/// kombu's `predefined_queues`, pasted as `predefinedQueues`: three Celery queues whose SQS
/// queues have unrelated names, one of them in another AWS account reached with its own keys
/// (moto acts in the account the keys belong to), one FIFO. Real Celery publishes with the same
/// option; the scaler reads each queue at its URL, exactly, never a same-named queue; a queue
/// missing from the map is INVALID_ARGUMENT naming it; the keys never show in an error; the same
/// map works in a named broker's configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predefined_queues_are_read_at_their_urls() {
    let u = unique("pd");
    let (celery_q, orders_q, jobs_q) = (
        format!("{u}-default"),
        format!("{u}-orders"),
        format!("{u}-jobs.fifo"),
    );
    let (own_id, own_secret) = other_account_keys("111111111111");
    let default_url = create_sqs_queue(&format!("x{u}-alpha"), None);
    let orders_url = create_sqs_queue(
        &format!("x{u}-beta"),
        Some((own_id.as_str(), own_secret.as_str())),
    );
    let jobs_url = create_sqs_queue(&format!("x{u}-gamma.fifo"), None);
    // The queue the scaler would find by name: the workers never use it.
    create_sqs_queue(&celery_q, None);
    let map = serde_json::json!({
        &celery_q: {"url": default_url},
        &orders_q: {"url": orders_url, "access_key_id": own_id, "secret_access_key": own_secret},
        &jobs_q: {"url": jobs_url},
    })
    .to_string();
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.predefined_queues = Some(map.clone());
    assert_eq!(conf.publish(&celery_q, &["--count", "3"]), 3);
    assert_eq!(conf.publish(&orders_q, &["--count", "2"]), 2);
    assert_eq!(conf.publish(&jobs_q, &["--count", "4"]), 4);
    // The orders queue exists only for its own keys.
    assert_eq!(sqs_attributes_at(&orders_url, ("testing", "testing")), None);
    assert_eq!(
        sqs_attributes_at(&orders_url, (&own_id, &own_secret)),
        Some((2, 0))
    );
    assert_eq!(sqs_attributes(&celery_q).await, (0, 0));

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let trigger = |queues: &str| {
        meta(&[
            ("brokerUrl", &sqs_broker_url()),
            ("awsRegion", "us-east-1"),
            ("queues", queues),
            ("predefinedQueues", &map),
        ])
    };
    assert_eq!(depth(&mut client, &trigger(&celery_q)).await.unwrap(), 3);
    assert_eq!(depth(&mut client, &trigger(&orders_q)).await.unwrap(), 2);
    assert_eq!(depth(&mut client, &trigger(&jobs_q)).await.unwrap(), 4);
    let all = format!("{celery_q},{orders_q},{jobs_q}");
    assert_eq!(depth(&mut client, &trigger(&all)).await.unwrap(), 9);
    // Read at its URL: a broker URL without an endpoint still reaches the queues' host.
    let mut at_url = trigger(&all);
    at_url.insert("brokerUrl".into(), "sqs://testing:testing@".into());
    assert_eq!(depth(&mut client, &at_url).await.unwrap(), 9);

    // A queue not in the map is refused, naming the key and the queue.
    let missing = format!("{u}-other");
    let err = depth(&mut client, &trigger(&format!("{celery_q},{missing}")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("predefinedQueues"), "{err:?}");
    assert!(err.message().contains(&missing), "{err:?}");
    // A failing queue with its own keys: an error, never a depth, never the secret.
    let gone = serde_json::json!({
        &orders_q: {"url": format!("{}-gone", orders_url), "access_key_id": own_id,
                    "secret_access_key": own_secret},
    })
    .to_string();
    let mut gone_trigger = trigger(&orders_q);
    gone_trigger.insert("predefinedQueues".into(), gone);
    let err = depth(&mut client, &gone_trigger).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(!err.message().contains(&own_secret), "{err:?}");
    scaler.stop().await;

    // The same map in a named broker's configuration.
    let env = celery_keda_scaler::broker_env::BrokerEnv::from_vars([
        ("CELERY_KEDA_BROKER_JOBS".to_string(), sqs_broker_url()),
        (
            "CELERY_KEDA_PREDEFINED_QUEUES_JOBS".to_string(),
            map.clone(),
        ),
    ])
    .unwrap();
    let scaler = Scaler::start_with(env, ServeSettings::default()).await;
    let mut client = scaler.client().await;
    let named = meta(&[
        ("broker", "jobs"),
        ("awsRegion", "us-east-1"),
        ("queues", &all),
    ]);
    assert_eq!(depth(&mut client, &named).await.unwrap(), 9);
    scaler.stop().await;
}
