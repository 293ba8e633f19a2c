//! RabbitMQ suite: real RabbitMQ with the management plugin, each test in its own vhost, tasks
//! published by real Celery and reserved by real Celery workers; numbers checked over real gRPC.
//!
//! Ready counts come from AMQP at once; `messages_unacknowledged` comes from the management
//! API, whose statistics RabbitMQ refreshes every few seconds, so in-flight checks first wait
//! (bounded) for the statistics to catch up with the state the test created.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use celery_keda_scaler::grpc::PUSH_REPEATS;
use common::*;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(60);

fn m(url: &str, queues: &str, in_flight: bool) -> HashMap<String, String> {
    meta(&[
        ("brokerUrl", url),
        ("queues", queues),
        ("scaleOnInFlight", if in_flight { "true" } else { "false" }),
        ("scaleOnRunning", "false"),
    ])
}

/// Waits until the scaler reports `expected` for `m` (statistics catching up), then returns.
async fn settle(scaler: &Scaler, m: &HashMap<String, String>, expected: i64) {
    let client = scaler.client().await;
    wait_for(
        &format!("depth {expected} for {:?}", m.get("queues")),
        SETTLE,
        || {
            let mut client = client.clone();
            let m = m.clone();
            async move { (depth(&mut client, &m).await.ok()? == expected).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_queue_and_several_queues() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let conf = CeleryConf::new(&url);
    assert_eq!(conf.publish("celery", &["--count", "7"]), 7);
    conf.publish("emails", &["--count", "4"]);
    conf.publish("reports", &["--count", "2"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    // No `queues`: Celery's default queue.
    let dflt = meta(&[("brokerUrl", &url)]);
    assert_eq!(depth(&mut client, &dflt).await.unwrap(), 7);
    assert!(active(&mut client, &dflt).await.unwrap());
    assert_eq!(
        depth(&mut client, &m(&url, "celery,emails", true))
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        depth(&mut client, &m(&url, "reports", false))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        depth(&mut client, &m(&url, "celery,emails,reports", false))
            .await
            .unwrap(),
        13
    );
    let high = meta(&[
        ("brokerUrl", &url),
        ("queues", "reports"),
        ("activationQueueLength", "2"),
    ]);
    assert!(!active(&mut client, &high).await.unwrap(), "2 is not > 2");

    // The `vhost` key overrides the URL's vhost.
    let base = format!("amqp://guest:guest@{}:{}//", vhost.host, vhost.port);
    let over = meta(&[
        ("brokerUrl", &base),
        ("vhost", &vhost.name),
        ("queues", "emails"),
    ]);
    assert_eq!(depth(&mut client, &over).await.unwrap(), 4);
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_is_one_queue() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let mut conf = CeleryConf::new(&url);
    conf.queue_args = Some(r#"{"prio": {"x-max-priority": 10}}"#.into());
    assert_eq!(
        conf.publish("prio", &["--count", "3", "--priorities", "0-9"]),
        30
    );
    let info = vhost.queue("prio").await.expect("queue exists");
    assert_eq!(info["arguments"]["x-max-priority"], 10, "{info}");

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m(&url, "prio", true)).await.unwrap(),
        30
    );
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_with_confirmed_publishing() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let mut conf = CeleryConf::new(&url);
    conf.queue_args = Some(r#"{"orders": {"x-queue-type": "quorum"}}"#.into());
    conf.confirm_publish = true;
    assert_eq!(conf.publish("orders", &["--count", "9"]), 9);
    let info = vhost.queue("orders").await.expect("queue exists");
    assert_eq!(info["type"], "quorum", "{info}");

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m(&url, "orders", false)).await.unwrap(),
        9
    );
    assert_eq!(
        depth(&mut client, &m(&url, "orders", true)).await.unwrap(),
        9
    );
    vhost.delete().await;
}

/// Early ack: 2 running (acknowledged), 2 reserved (unacknowledged), 6 ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_early_ack() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let marker = unique("started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.publish(
        "work",
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    conf.publish("other", &["--count", "3"]);
    let worker = conf.worker(&["work"], 2);
    wait_started(&marker, 2).await;

    let scaler = Scaler::start().await;
    settle(&scaler, &m(&url, "work", false), 6).await;
    settle(&scaler, &m(&url, "work", true), 8).await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m(&url, "work", false)).await.unwrap(),
        6
    );
    assert_eq!(depth(&mut client, &m(&url, "work", true)).await.unwrap(), 8);
    assert_eq!(
        depth(&mut client, &m(&url, "other", true)).await.unwrap(),
        3
    );
    assert_eq!(
        depth(&mut client, &m(&url, "work,other", true))
            .await
            .unwrap(),
        11
    );
    assert!(active(&mut client, &m(&url, "work", false)).await.unwrap());
    drop(worker);
    vhost.delete().await;
}

/// acks_late: both running tasks stay unacknowledged; nothing else reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_acks_late() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let marker = unique("started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.acks_late = true;
    conf.publish(
        "late",
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    let worker = conf.worker(&["late"], 2);
    wait_started(&marker, 2).await;

    let scaler = Scaler::start().await;
    settle(&scaler, &m(&url, "late", false), 8).await;
    settle(&scaler, &m(&url, "late", true), 10).await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(&mut client, &m(&url, "late", false)).await.unwrap(),
        8
    );
    assert_eq!(
        depth(&mut client, &m(&url, "late", true)).await.unwrap(),
        10
    );
    drop(worker);
    vhost.delete().await;
}

/// Countdown tasks are held unacknowledged by the worker until their ETA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_tasks_held_by_a_worker() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let conf = CeleryConf::new(&url);
    conf.publish("eta", &["--count", "5", "--countdown", "600"]);
    let worker = conf.worker(&["eta"], 1);

    let scaler = Scaler::start().await;
    settle(&scaler, &m(&url, "eta", false), 0).await;
    settle(&scaler, &m(&url, "eta", true), 5).await;
    let mut client = scaler.client().await;
    assert_eq!(depth(&mut client, &m(&url, "eta", true)).await.unwrap(), 5);
    assert!(active(&mut client, &m(&url, "eta", true)).await.unwrap());
    assert_eq!(depth(&mut client, &m(&url, "eta", false)).await.unwrap(), 0);
    assert!(!active(&mut client, &m(&url, "eta", false)).await.unwrap());
    drop(worker);
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_missing_queue_wrong_password_unreachable_management() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    CeleryConf::new(&url).publish("present", &["--count", "1"]);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;

    for in_flight in [false, true] {
        let err = depth(&mut client, &m(&url, "present,absent", in_flight))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            err.message().contains("`absent`") && err.message().contains(&vhost.name),
            "{}",
            err.message()
        );
    }
    // The channel closed by the failed declare is replaced: the next reading works.
    assert_eq!(
        depth(&mut client, &m(&url, "present", false))
            .await
            .unwrap(),
        1
    );

    let wrong = format!(
        "amqp://guest:Wr0ngPass@{}:{}/{}",
        vhost.host, vhost.port, vhost.name
    );
    for in_flight in [false, true] {
        let err = depth(&mut client, &m(&wrong, "present", in_flight))
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
            "{err:?}"
        );
        assert!(!err.message().contains("Wr0ngPass"), "{}", err.message());
    }

    let closed = free_port();
    let unreachable = meta(&[
        ("brokerUrl", &url),
        ("queues", "present"),
        ("managementUrl", &format!("http://127.0.0.1:{closed}")),
    ]);
    let err = depth(&mut client, &unreachable).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("managementUrl") && err.message().contains("scaleOnInFlight"),
        "{}",
        err.message()
    );
    // Without in-flight counting the management API is not needed.
    let mut no_mgmt = unreachable.clone();
    no_mgmt.insert("scaleOnInFlight".into(), "false".into());
    assert_eq!(depth(&mut client, &no_mgmt).await.unwrap(), 1);
    vhost.delete().await;
}

/// The broker goes away mid-test (its port closes, connections are cut) and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_mid_test_is_an_error_then_recovers() {
    let vhost = Vhost::create().await;
    CeleryConf::new(&vhost.url()).publish("q", &["--count", "3"]);
    let mut proxy = Proxy::start(vhost.port).await;
    let url = vhost.url_via(proxy.port);
    // No result window: every reading below must reach the broker (or fail to).
    let settings = celery_keda_scaler::server::ServeSettings {
        deadline: Duration::from_secs(1),
        result_window: Duration::ZERO,
        ..Default::default()
    };
    let scaler = Scaler::start_with(Default::default(), settings).await;
    let mut client = scaler.client().await;
    let q = m(&url, "q", false);
    assert_eq!(depth(&mut client, &q).await.unwrap(), 3);

    proxy.stop();
    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(10), depth(&mut client, &q))
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{err:?}"
        );
        let err = active(&mut client, &q).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{err:?}"
        );
    }

    proxy.resume().await;
    wait_for(
        "recovery after the broker returns",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            let q = q.clone();
            async move { depth(&mut client, &q).await.ok() }
        },
    )
    .await;
    assert_eq!(depth(&mut client, &q).await.unwrap(), 3);
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_on_rabbitmq() {
    use tokio_stream::StreamExt;
    let vhost = Vhost::create().await;
    let url = vhost.url();
    vhost.declare("push").await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mq = m(&url, "push", true);
    let mut stream = client
        .stream_is_active(object_ref(&mq))
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(600), stream.next())
            .await
            .is_err(),
        "empty: no push"
    );

    CeleryConf::new(&url).publish("push", &["--count", "1"]);
    let published = std::time::Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("pushed");
    assert!(first.unwrap().unwrap().result);
    let latency = published.elapsed();
    assert!(latency < Duration::from_secs(1), "pushed after {latency:?}");
    // Repeated PUSH_REPEATS.len() times while active (KEDA may drop the first), then quiet.
    let all_repeats: Duration = PUSH_REPEATS.iter().sum();
    for i in 0..PUSH_REPEATS.len() {
        let repeat = tokio::time::timeout(all_repeats + Duration::from_secs(2), stream.next())
            .await
            .unwrap_or_else(|_| panic!("repeat {i}"));
        assert!(repeat.unwrap().unwrap().result);
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .is_err(),
        "no more than PUSH_REPEATS"
    );
    vhost.delete().await;
}

/// An idle stream looks with passive `queue.declare`s alone, never the management API: with the
/// management API unreachable, ten fast intervals of the idle poll fail nothing (a full reading
/// would fail at every one). Once the queue holds a message, the look finds it and the full
/// reading (and its management API call) runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_looks_without_the_management_api() {
    use tokio_stream::StreamExt;
    let vhost = Vhost::create().await;
    let url = vhost.url();
    vhost.declare("look").await;
    let mut mq = m(&url, "look", true);
    let dead = free_port();
    mq.insert("managementUrl".into(), format!("http://127.0.0.1:{dead}"));
    let errors = "celery_keda_broker_errors_total{broker=\"rabbitmq\",kind=\"unavailable\"}";
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&mq))
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .is_err(),
        "empty: no push, no error"
    );
    assert_eq!(scaler.metric(errors).await.unwrap_or(0.0), 0.0);

    CeleryConf::new(&url).publish("look", &["--count", "1"]);
    wait_for("the full reading after the publish", SETTLE, || async {
        (scaler.metric(errors).await.unwrap_or(0.0) >= 1.0).then_some(())
    })
    .await;
    vhost.delete().await;
}

// ---------------------------------------------------------------- scaleOnRunning

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_tasks_with_early_ack_keep_the_scaler_active() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    vhost.declare("other").await;
    running_tasks_keep_the_scaler_active(&url, CeleryConf::new(&url), "run", "other").await;
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_is_published_minus_finished_with_early_ack() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    // Killed: the 2 early-acked running tasks are lost, the 2 reserved return to the queue.
    depth_is_published_minus_finished(&url, CeleryConf::new(&url), "pmf", false, 8, 8).await;
    vhost.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_is_published_minus_finished_with_acks_late() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    // Killed: the 2 unacknowledged running tasks return to the queue.
    depth_is_published_minus_finished(&url, CeleryConf::new(&url), "pmf", true, 10, 10).await;
    vhost.delete().await;
}

/// A two-host failover list as Celery's `broker_url` writes it (`amqp://...;amqp://...`), its
/// hosts two proxies to the suite's node on loopback addresses of their own: the first refuses,
/// so real Celery (kombu) publishes through the second and the scaler reads it there, exactly;
/// the first comes back and the readings stay with the host that answered last (kombu keeps its
/// connection; the first proxy accepts nothing); that host goes away and the next reading moves
/// to the other one within one deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_list_reads_the_host_that_answers() {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering::SeqCst;
    let vhost = Vhost::create().await;
    let mut first = Proxy::start_on(Ipv4Addr::new(127, 0, 0, 2), vhost.port).await;
    let mut second = Proxy::start_on(Ipv4Addr::new(127, 0, 0, 3), vhost.port).await;
    first.stop();
    let url_of = |p: &Proxy| format!("amqp://guest:guest@{}/{}", p.addr(), vhost.name);
    let list = format!("{};{}", url_of(&first), url_of(&second));
    assert_eq!(CeleryConf::new(&list).publish("q", &["--count", "3"]), 3);

    let deadline = Duration::from_secs(2);
    let settings = celery_keda_scaler::server::ServeSettings {
        deadline,
        result_window: Duration::ZERO,
        ..Default::default()
    };
    let scaler = Scaler::start_with(Default::default(), settings).await;
    let mut client = scaler.client().await;
    // In-flight on: the management API derived from the host that answered is read too.
    let q = m(&list, "q", true);
    assert_eq!(depth(&mut client, &q).await.unwrap(), 3);
    assert!(active(&mut client, &q).await.unwrap());
    assert_eq!(first.accepted.load(SeqCst), 0);

    // `probe` names the host that answered.
    let pairs = [
        ("brokerUrl", list.clone()),
        ("queues", "q".to_string()),
        ("scaleOnRunning", "false".to_string()),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        probe_command(&pairs).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let answered = format!("answered by  amqp://guest:***@{}/", second.addr());
    assert!(text.contains(&answered), "{text}");
    assert!(text.contains("depth        3"), "{text}");

    // The first host comes back: the readings stay with the host that answered last.
    first.resume().await;
    for _ in 0..3 {
        assert_eq!(depth(&mut client, &q).await.unwrap(), 3);
    }
    assert_eq!(first.accepted.load(SeqCst), 0);

    // The host that answered goes away: the next reading moves to the other, in time.
    second.stop();
    let started = std::time::Instant::now();
    assert_eq!(depth(&mut client, &q).await.unwrap(), 3);
    assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
    assert!(first.accepted.load(SeqCst) >= 1);
    // ... and stays there when it returns.
    second.resume().await;
    let before = second.accepted.load(SeqCst);
    assert_eq!(depth(&mut client, &q).await.unwrap(), 3);
    assert_eq!(second.accepted.load(SeqCst), before);

    // No host answering is an error, never a depth.
    first.stop();
    second.stop();
    let err = depth(&mut client, &q).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(err.message().contains("failover list"), "{err:?}");
    assert!(!err.message().contains("guest:guest"), "{err:?}");
    scaler.stop().await;
    vhost.delete().await;
}

/// The management API derived from a failover list follows the host that answered, and an
/// explicit `managementUrl` stays as given. The node's management API listens on IPv4 only and
/// its AMQP port on both, so a list whose answering host is `[::1]` has a derived management API
/// that refuses (the reading fails, naming managementUrl), while one whose answering host is an
/// IPv4 proxy behind a refusing `[::1]` host reads exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_list_management_follows_the_host_that_answered() {
    use std::net::Ipv4Addr;
    let vhost = Vhost::create().await;
    let proxy = Proxy::start_on(Ipv4Addr::new(127, 0, 0, 3), vhost.port).await;
    let refusing = free_port();
    let v4 = format!("amqp://guest:guest@{}/{}", proxy.addr(), vhost.name);
    let v6_refusing = format!("amqp://guest:guest@[::1]:{refusing}/{}", vhost.name);
    let v6 = format!("amqp://guest:guest@[::1]:{}/{}", vhost.port, vhost.name);
    let v4_refusing = format!("amqp://guest:guest@127.0.0.2:{refusing}/{}", vhost.name);
    assert_eq!(
        CeleryConf::new(&format!("{v6_refusing};{v4}")).publish("q", &["--count", "3"]),
        3
    );
    let scaler = Scaler::start_with(
        Default::default(),
        celery_keda_scaler::server::ServeSettings {
            result_window: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let mut client = scaler.client().await;
    // [::1] refuses AMQP: the IPv4 host answers, and its derived management API is read.
    let follows = m(&format!("{v6_refusing};{v4}"), "q", true);
    assert_eq!(depth(&mut client, &follows).await.unwrap(), 3);
    // [::1] answers AMQP: its derived management API ([::1]:15672) refuses.
    let derived_v6 = m(&format!("{v4_refusing};{v6}"), "q", true);
    let err = depth(&mut client, &derived_v6).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("http://[::1]:15672/"), "{err:?}");
    assert!(err.message().contains("managementUrl"), "{err:?}");
    // Given, the management API stays as given whichever host answers.
    let mut given = derived_v6.clone();
    given.insert("managementUrl".into(), management_base());
    assert_eq!(depth(&mut client, &given).await.unwrap(), 3);
    scaler.stop().await;
    vhost.delete().await;
}

/// The watched gauges beside Flower's queue lengths on RabbitMQ, on one state made by real
/// Celery: a worker (2 threads, prefetch multiplier 1, early ack) runs two long tasks, holds an
/// ETA task and what it prefetched; ten tasks wait. The management API's settled counters are the
/// truth: Flower reports ready + unacknowledged as one number and misses the running tasks,
/// which RabbitMQ no longer holds (docs/BENCHMARKS.md, "Watched queues beside Flower").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_numbers_beside_flower() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let q = "flower";
    let marker = unique("flower-started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    conf.publish(
        q,
        &["--count", "2", "--seconds", "120", "--marker", &marker],
    );
    let worker = conf.worker(&[q], 2);
    wait_started(&marker, 2).await;
    conf.publish(q, &["--countdown", "600"]);
    conf.publish(q, &["--count", "10"]);
    // The management API's counters, once they stop changing: (ready, unacknowledged).
    let read_state = || async {
        let s = vhost.queue(q).await.expect("the queue's counters");
        (
            s["messages_ready"].as_u64().unwrap_or(u64::MAX),
            s["messages_unacknowledged"].as_u64().unwrap_or(u64::MAX),
        )
    };
    let started = std::time::Instant::now();
    let mut state = read_state().await;
    loop {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let now = read_state().await;
        if now == state && now.0 + now.1 == 11 {
            break;
        }
        assert!(
            started.elapsed() < SETTLE * 2,
            "the counters did not settle: {now:?}"
        );
        state = now;
    }
    let (ready, unacked) = state;

    let scaler = watching_until(&url, q, [ready, unacked, 2], SETTLE).await;

    let port = free_port();
    let api = management_base().replacen("://", "://guest:guest@", 1) + "/api/";
    let _flower = conf.flower(port, Some(&api));
    let flower = wait_for("Flower's queue length", SETTLE, || async move {
        flower_queue_lengths(port).await?.get(q).copied()
    })
    .await;
    eprintln!(
        "flower-comparison rabbitmq: ready {ready}, in flight {unacked}, running 2; \
         watched gauges: {ready} / {unacked} / 2; Flower /api/queues/length: {flower}"
    );
    assert_eq!(
        flower,
        ready + unacked,
        "Flower reports the management API's `messages` (ready + unacknowledged)"
    );
    scaler.stop().await;
    drop(worker);
    vhost.delete().await;
}
