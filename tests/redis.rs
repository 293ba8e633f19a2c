//! Redis broker suite: real Redis (and Sentinel, TLS, Unix socket), real Celery publishing and
//! real Celery workers reserving tasks; every number is checked over real gRPC.

mod common;

use std::time::Duration;

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::server::ServeSettings;
use common::*;
use tokio_stream::StreamExt;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(60);

/// Waits until the bare list `key` holds `len` messages (the worker took its share).
async fn wait_llen(url: &str, key: &str, len: i64) {
    let mut conn = raw_redis(url).await;
    wait_for(&format!("LLEN {key} == {len}"), SETTLE, || {
        let mut conn = conn.clone();
        async move {
            let n: i64 = redis::cmd("LLEN")
                .arg(key)
                .query_async(&mut conn)
                .await
                .ok()?;
            (n == len).then_some(())
        }
    })
    .await;
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_queue_is_celery() {
    let url = redis_url();
    // A unique global_keyprefix isolates Celery's default queue `celery` from other tests.
    let prefix = format!("{}:", unique("dflt"));
    let mut conf = CeleryConf::new(&url);
    conf.global_keyprefix = Some(prefix.clone());
    assert_eq!(conf.publish("celery", &["--count", "7"]), 7);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &url), ("globalKeyprefix", &prefix)]);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 7);
    assert!(active(&mut client, &m).await.unwrap());
    let m = meta(&[
        ("brokerUrl", &url),
        ("globalKeyprefix", &prefix),
        ("activationQueueLength", "7"),
    ]);
    assert!(!active(&mut client, &m).await.unwrap(), "7 is not > 7");
    cleanup_redis(&url, &prefix, &["celery"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_zero_to_nine_count_as_one_queue() {
    let url = redis_url();
    let q = unique("prio");
    let conf = CeleryConf::new(&url);
    // 10 tasks at each priority 0..=9.
    assert_eq!(
        conf.publish(&q, &["--count", "10", "--priorities", "0-9"]),
        100
    );

    // What a one-list reader sees: only priorities 0-2.
    let mut raw = raw_redis(&url).await;
    let single: i64 = redis::cmd("LLEN")
        .arg(&q)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(single, 30);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &url), ("queues", &q)]);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 100);

    // The breakdown per priority step, as `probe` shows it: kombu maps 0-2 -> 0, 3-5 -> 3, 6-8 -> 6, 9 -> 9.
    let out = probe_command(&[("brokerUrl", &url), ("queues", &q)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("ready"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts, [30, 30, 30, 10], "{text}");
    assert!(text.contains("depth        100"), "{text}");
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_queues_are_summed_and_each_counts_alone() {
    let url = redis_url();
    let (a, b, c) = (unique("sum-a"), unique("sum-b"), unique("sum-c"));
    let conf = CeleryConf::new(&url);
    conf.publish(&a, &["--count", "3"]);
    conf.publish(&b, &["--count", "4", "--priority", "6"]);
    conf.publish(&c, &["--count", "5"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let q = |queues: String| meta(&[("brokerUrl", &url), ("queues", &queues)]);
    assert_eq!(depth(&mut client, &q(format!("{a},{b}"))).await.unwrap(), 7);
    assert_eq!(depth(&mut client, &q(c.clone())).await.unwrap(), 5);
    assert_eq!(
        depth(&mut client, &q(format!("{a}, {b} ,{c}")))
            .await
            .unwrap(),
        12
    );
    assert_eq!(depth(&mut client, &q(unique("empty"))).await.unwrap(), 0);
    assert!(!active(&mut client, &q(unique("empty"))).await.unwrap());
    cleanup_redis(&url, "", &[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_keyprefix_is_followed() {
    let url = redis_url();
    let prefix = format!("{}:", unique("pfx"));
    let q = unique("pq");
    let mut conf = CeleryConf::new(&url);
    conf.global_keyprefix = Some(prefix.clone());
    conf.publish(&q, &["--count", "12", "--priorities", "0-0"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let with = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("globalKeyprefix", &prefix),
    ]);
    let without = meta(&[("brokerUrl", &url), ("queues", &q)]);
    assert_eq!(depth(&mut client, &with).await.unwrap(), 12);
    assert_eq!(depth(&mut client, &without).await.unwrap(), 0);
    cleanup_redis(&url, &prefix, &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_priority_steps_and_separator() {
    let url = redis_url();
    let q = unique("steps");
    let mut conf = CeleryConf::new(&url);
    conf.priority_steps = Some("0,5".into());
    conf.sep = Some(":".into());
    // Priorities 0-4 land in `q`, 5-9 in `q:5`.
    conf.publish(&q, &["--count", "2", "--priorities", "0-9"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    // Only ready lists are under test; the workers of the other tests on this database use
    // kombu's default separator, which a census with `:` would refuse (see the census test).
    let custom = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("prioritySteps", "0,5"),
        ("separator", ":"),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(depth(&mut client, &custom).await.unwrap(), 20);
    // With kombu's defaults only the bare list matches.
    let defaults = meta(&[("brokerUrl", &url), ("queues", &q)]);
    assert_eq!(depth(&mut client, &defaults).await.unwrap(), 10);
    cleanup_redis(&url, "", &[&q]).await;
}

/// Early ack: a two-slot worker runs 2 tasks (acknowledged, gone from the broker) and reserves
/// 2 more (prefetch 2 x 1, in `unacked`); 6 stay in the list. Reserved tasks of queue A never
/// count for queue B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reserved_tasks_are_in_flight_with_early_ack() {
    let url = redis_url();
    let (a, b) = (unique("early-a"), unique("early-b"));
    let marker = unique("started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(url.clone());
    conf.prefetch = Some(1);
    conf.publish(
        &a,
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    conf.publish(&b, &["--count", "3"]);
    let _worker = conf.worker(&[&a], 2);
    wait_started(&marker, 2).await;
    wait_llen(&url, &a, 6).await;

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = |q: &str, in_flight: &str| {
        meta(&[
            ("brokerUrl", &url),
            ("queues", q),
            ("scaleOnInFlight", in_flight),
            ("scaleOnRunning", "false"),
        ])
    };
    assert_eq!(depth(&mut client, &m(&a, "true")).await.unwrap(), 8);
    assert_eq!(depth(&mut client, &m(&a, "false")).await.unwrap(), 6);
    assert_eq!(depth(&mut client, &m(&b, "true")).await.unwrap(), 3);
    assert_eq!(
        depth(&mut client, &m(&format!("{a},{b}"), "true"))
            .await
            .unwrap(),
        11
    );
    assert!(active(&mut client, &m(&a, "false")).await.unwrap());
    drop(_worker);
    cleanup_redis(&url, "", &[&a, &b, &marker]).await;
}

/// acks_late: both running tasks stay unacknowledged and fill the prefetch window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_running_tasks_are_in_flight_with_acks_late() {
    let url = redis_url();
    let q = unique("late");
    let marker = unique("started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(url.clone());
    conf.prefetch = Some(1);
    conf.acks_late = true;
    conf.publish(
        &q,
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    let _worker = conf.worker(&[&q], 2);
    wait_started(&marker, 2).await;
    wait_llen(&url, &q, 8).await;

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = |in_flight: &str| {
        meta(&[
            ("brokerUrl", &url),
            ("queues", &q),
            ("scaleOnInFlight", in_flight),
            ("scaleOnRunning", "false"),
        ])
    };
    assert_eq!(depth(&mut client, &m("true")).await.unwrap(), 10);
    assert_eq!(depth(&mut client, &m("false")).await.unwrap(), 8);
    drop(_worker);
    cleanup_redis(&url, "", &[&q, &marker]).await;
}

/// Countdown tasks wait inside the worker, unacknowledged, until their ETA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_tasks_held_by_a_worker_are_in_flight() {
    let url = redis_url();
    let q = unique("eta");
    let conf = CeleryConf::new(&url);
    conf.publish(&q, &["--count", "5", "--countdown", "600"]);
    let _worker = conf.worker(&[&q], 1);
    wait_llen(&url, &q, 0).await;

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let on = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let off = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnInFlight", "false"),
        ("scaleOnRunning", "false"),
    ]);
    // The worker may still be moving the last message from the list into `unacked`.
    wait_for("5 ETA tasks in flight", SETTLE, || {
        let mut client = client.clone();
        let on = on.clone();
        async move { (depth(&mut client, &on).await.ok()? == 5).then_some(()) }
    })
    .await;
    assert_eq!(depth(&mut client, &on).await.unwrap(), 5);
    assert!(active(&mut client, &on).await.unwrap());
    assert_eq!(depth(&mut client, &off).await.unwrap(), 0);
    assert!(!active(&mut client, &off).await.unwrap());
    drop(_worker);
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_celery_ssl_parameters() {
    let tls = TlsFiles::generate();
    let server = OwnRedis::start(None, Some(&tls));
    let q = unique("tls");
    // Publish over the plain port, read over TLS: the same server.
    CeleryConf::new(&server.url(None)).publish(&q, &["--count", "3"]);
    let tls_port = server.tls_port.unwrap();

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let verified = format!(
        "rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={}",
        tls.ca_cert.display()
    );
    let unverified = format!("rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none");
    let untrusted = format!("rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required");
    assert_eq!(
        depth(
            &mut client,
            &meta(&[("brokerUrl", &verified), ("queues", &q)])
        )
        .await
        .unwrap(),
        3
    );
    assert_eq!(
        depth(
            &mut client,
            &meta(&[("brokerUrl", &unverified), ("queues", &q)])
        )
        .await
        .unwrap(),
        3
    );
    // The test CA is not among the system roots: the scaler must refuse, not report 0.
    let err = depth(
        &mut client,
        &meta(&[("brokerUrl", &untrusted), ("queues", &q)]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_database_number() {
    let server = OwnRedis::start(None, None);
    let q = unique("sock");
    CeleryConf::new(&format!("redis://127.0.0.1:{}/3", server.port)).publish(&q, &["--count", "4"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let socket = format!("redis+socket://{}?virtual_host=3", server.socket.display());
    if protections_on() {
        // A socket has no host an allowlist could admit: refused before any connection.
        let err = depth(
            &mut client,
            &meta(&[("brokerUrl", &socket), ("queues", &q)]),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("brokerUrl") && err.message().contains("Unix socket"),
            "{err:?}"
        );
        return;
    }
    assert_eq!(
        depth(
            &mut client,
            &meta(&[("brokerUrl", &socket), ("queues", &q)])
        )
        .await
        .unwrap(),
        4
    );
    // Database 0 of the same server has nothing.
    let db0 = format!("redis+socket://{}", server.socket.display());
    assert_eq!(
        depth(&mut client, &meta(&[("brokerUrl", &db0), ("queues", &q)]))
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_work_and_wrong_ones_are_refused_without_showing() {
    let password = "s3cr3t-Pa55word";
    let server = OwnRedis::start(Some(password), None);
    let q = unique("auth");
    CeleryConf::new(&server.url(Some(password))).publish(&q, &["--count", "2"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let good = meta(&[("brokerUrl", &server.url(Some(password))), ("queues", &q)]);
    assert_eq!(depth(&mut client, &good).await.unwrap(), 2);

    let wrong_pw = "wrong-Pa55word";
    let bad = meta(&[("brokerUrl", &server.url(Some(wrong_pw))), ("queues", &q)]);
    let err = depth(&mut client, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(!err.message().contains(wrong_pw), "{}", err.message());
    let err = active(&mut client, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let none = meta(&[("brokerUrl", &server.url(None)), ("queues", &q)]);
    let err = depth(&mut client, &none).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let (_, metrics) = scaler.admin_get("/metrics").await;
    assert!(!metrics.contains(password) && !metrics.contains(wrong_pw));
    assert!(
        metrics
            .contains("celery_keda_broker_errors_total{broker=\"redis\",kind=\"unauthenticated\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_finds_the_master() {
    let password = "sentinel-master-pw";
    let master = OwnRedis::start(Some(password), None);
    let sentinel = OwnSentinel::start(master.port, "cksmaster", Some(password));
    let q = unique("sent");
    CeleryConf::new(&master.url(Some(password))).publish(&q, &["--count", "6"]);

    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    // The first sentinel is down: the client must move on to the next.
    let dead = free_port();
    let url = format!(
        "sentinel://:{password}@127.0.0.1:{dead};sentinel://127.0.0.1:{}",
        sentinel.port
    );
    let m = meta(&[
        ("brokerUrl", &url),
        ("sentinelMaster", "cksmaster"),
        ("queues", &q),
    ]);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 6);

    let missing = meta(&[("brokerUrl", &url), ("queues", &q)]);
    let err = depth(&mut client, &missing).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("sentinelMaster"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains(password));

    let unknown = meta(&[
        ("brokerUrl", &url),
        ("sentinelMaster", "nosuchmaster"),
        ("queues", &q),
    ]);
    let err = depth(&mut client, &unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!err.message().contains(password));
}

// ---------------------------------------------------------------- scaleOnRunning

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_tasks_with_early_ack_keep_the_scaler_active() {
    let url = redis_url();
    let (q, other) = (unique("run"), unique("run-other"));
    running_tasks_keep_the_scaler_active(&url, CeleryConf::new(&url), &q, &other).await;
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_is_published_minus_finished_with_early_ack() {
    let url = redis_url();
    let q = unique("pmf-early");
    // Killed: the 2 early-acked running tasks are lost, the 2 reserved stay in `unacked`.
    depth_is_published_minus_finished(&url, CeleryConf::new(&url), &q, false, 8, 6).await;
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_is_published_minus_finished_with_acks_late() {
    let url = redis_url();
    let q = unique("pmf-late");
    // Killed: the 2 running tasks were never acknowledged and stay in `unacked`.
    depth_is_published_minus_finished(&url, CeleryConf::new(&url), &q, true, 10, 8).await;
    cleanup_redis(&url, "", &[&q]).await;
}

/// Every key of a (test-owned) Redis database.
async fn all_keys(url: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw_redis(url).await)
        .await
        .unwrap()
}

/// A census with a separator the workers do not use would break every worker's replies: the
/// separator is learned from the workers' own mailbox bindings, a trigger with another one is
/// refused with an error naming `separator`, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn census_refuses_a_separator_the_workers_do_not_use() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let mut conn = raw_redis(&url).await;
    // A worker's mailbox binding as kombu (default sep) writes it.
    let _: i64 = redis::cmd("SADD")
        .arg("_kombu.binding.celery.pidbox")
        .arg("\x06\x16\x06\x16w1@h.celery.pidbox")
        .query_async(&mut conn)
        .await
        .unwrap();
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &url), ("queues", "q"), ("separator", ":")]);
    let err = depth(&mut client, &m).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`separator`"), "{}", err.message());
    assert_eq!(
        all_keys(&url).await,
        ["_kombu.binding.celery.pidbox"],
        "nothing was added"
    );
    // The default separator works (and its census leaves nothing), and without running-task
    // counting no census is made.
    let ok = meta(&[("brokerUrl", &url), ("queues", "q")]);
    assert_eq!(depth(&mut client, &ok).await.unwrap(), 0);
    assert_eq!(
        all_keys(&url).await,
        ["_kombu.binding.celery.pidbox"],
        "nothing was left"
    );
    let off = meta(&[
        ("brokerUrl", &url),
        ("queues", "q"),
        ("separator", ":"),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(depth(&mut client, &off).await.unwrap(), 0);
}

// ------------------------------------------------------------- what push streams cost Redis

/// The fast stream interval of `ServeSettings::default()`.
const TICK: Duration = Duration::from_millis(200);

/// Waits (bounded) until `command` has been called at least `n` times on the server behind
/// `conn` since its stats were reset; returns all counts then.
async fn wait_calls(
    conn: &redis::aio::MultiplexedConnection,
    command: &str,
    n: u64,
) -> std::collections::HashMap<String, u64> {
    wait_for(&format!("{n} x {command}"), SETTLE, || {
        let mut conn = conn.clone();
        async move {
            let calls = command_calls(&mut conn).await;
            (calls.get(command).copied().unwrap_or(0) >= n).then_some(calls)
        }
    })
    .await
}

fn calls(counts: &std::collections::HashMap<String, u64>, command: &str) -> u64 {
    counts.get(command).copied().unwrap_or(0)
}

/// Settings of a scaler that polls idle Redis sets (tracking off: what a broker that refuses
/// `CLIENT TRACKING` gets).
fn polling() -> ServeSettings {
    ServeSettings {
        redis_client_tracking: false,
        ..ServeSettings::default()
    }
}

/// Polling (tracking off): an idle set is looked at with one `EXISTS` over all its lists per
/// tick, never `LLEN`; a publish is pushed at once; the set, once active, is not polled (KEDA polls it); KEDA's own
/// `IsActive` reading that finds it idle again makes the stream poll fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_costs_one_exists_per_tick_and_an_active_one_nothing() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("idle");
    // Ten priority lists.
    let steps = "0,1,2,3,4,5,6,7,8,9";
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("prioritySteps", steps),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start_with(BrokerEnv::default(), polling()).await;
    let mut client = scaler.client().await;
    reset_command_calls(&mut conn).await;
    let started = std::time::Instant::now();
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let idle = wait_calls(&conn, "exists", 5).await;
    let ticks = (started.elapsed().as_millis() / TICK.as_millis()) as u64 + 2;
    assert_eq!(
        calls(&idle, "llen"),
        0,
        "an idle set is not read list by list: {idle:?}"
    );
    assert!(
        calls(&idle, "exists") <= ticks,
        "one EXISTS per tick: {idle:?}"
    );
    // With one set on the broker, the shared `unacked` read is one per tick at most.
    assert!(calls(&idle, "hvals") <= calls(&idle, "exists"), "{idle:?}");

    let conf = CeleryConf::new(&url);
    conf.publish(&q, &["--count", "2", "--priority", "5"]);
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a push after the publish")
        .expect("stream open")
        .expect("no error");
    assert!(msg.result);

    // Active: KEDA polls the set itself; the stream's poll waits for the active interval (30 s).
    // Whatever reading was under way at the push has finished once the depth is counted.
    depth_settles(&mut client, &m, 2).await;
    reset_command_calls(&mut conn).await;
    tokio::time::sleep(TICK * 8).await;
    let active_calls = command_calls(&mut conn).await;
    assert_eq!(
        calls(&active_calls, "exists") + calls(&active_calls, "llen"),
        0,
        "an active set is not polled at the fast interval: {active_calls:?}"
    );

    // Drained; KEDA's IsActive finds it idle, and the stream's poll is fast again at once.
    cleanup_redis(&url, "", &[&q]).await;
    assert!(!active(&mut client, &m).await.unwrap());
    reset_command_calls(&mut conn).await;
    wait_for("fast again", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move { (calls(&command_calls(&mut conn).await, "exists") >= 3).then_some(()) }
    })
    .await;
    conf.publish(&q, &["--count", "1"]);
    let again = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("pushed again");
    assert!(again.unwrap().unwrap().result);
    scaler.stop().await;
}

/// Tasks a worker holds unacknowledged (ETA) are found by an idle stream's cheap look (the
/// shared `unacked` read) exactly as by the full reading: the stream pushes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_in_flight_keep_an_idle_stream_active() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("idle-eta");
    let conf = CeleryConf::new(&url);
    conf.publish(&q, &["--count", "2", "--countdown", "600"]);
    let _worker = conf.worker(&[&q], 1);
    wait_llen(&url, &q, 0).await;
    let mut conn = raw_redis(&url).await;
    wait_for("2 tasks in unacked", SETTLE, || {
        let mut conn = conn.clone();
        async move {
            let n: u64 = redis::cmd("HLEN")
                .arg("unacked")
                .query_async(&mut conn)
                .await
                .ok()?;
            (n == 2).then_some(())
        }
    })
    .await;

    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    reset_command_calls(&mut conn).await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("pushed: the set is active through its tasks in flight")
        .expect("stream open")
        .expect("no error");
    assert!(msg.result);
    let counts = command_calls(&mut conn).await;
    assert!(
        calls(&counts, "exists") >= 1,
        "looked with EXISTS first: {counts:?}"
    );
    assert_eq!(depth(&mut client, &m).await.unwrap(), 2);
    scaler.stop().await;
}

/// Polling (tracking off): idle streams over many sets of one broker share each read of the
/// `unacked` hash: at most one per 100 ms, while each set costs its own `EXISTS` per tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sets_of_one_broker_share_the_unacked_read() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start_with(BrokerEnv::default(), polling()).await;
    let client = scaler.client().await;
    let mut streams = Vec::new();
    for i in 0..20 {
        let m = meta(&[
            ("brokerUrl", &url),
            ("queues", &unique(&format!("share{i}"))),
            ("scaleOnRunning", "false"),
        ]);
        let mut client = client.clone();
        streams.push(client.stream_is_active(object_ref(&m)).await.unwrap());
    }
    reset_command_calls(&mut conn).await;
    let started = std::time::Instant::now();
    let counts = wait_calls(&conn, "exists", 200).await;
    let windows = (started.elapsed().as_millis() / 100) as u64 + 2;
    assert_eq!(calls(&counts, "llen"), 0, "{counts:?}");
    assert!(
        calls(&counts, "hvals") <= windows,
        "one unacked read per 100 ms, not one per set and tick: {counts:?}"
    );
    assert!(
        calls(&counts, "hvals") * 4 <= calls(&counts, "exists"),
        "{counts:?}"
    );
    drop(streams);
    scaler.stop().await;
}

/// Polling (tracking off): the largest trigger the limits allow, 256 queues x 256 priority steps
/// (65,536 lists), costs one `EXISTS` per 64 fast intervals (12.8 s): `MAX_SOURCES_PER_TICK`
/// lists per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_idle_set_stays_within_its_budget() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let queues: Vec<String> = (0..256).map(|i| format!("budget{i}")).collect();
    let steps: Vec<String> = (0..256).map(|s| s.to_string()).collect();
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &queues.join(",")),
        ("prioritySteps", &steps.join(",")),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start_with(BrokerEnv::default(), polling()).await;
    let mut client = scaler.client().await;
    reset_command_calls(&mut conn).await;
    let _stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    // The reading at open, then nothing for 64 ticks; watched for 10 of them.
    wait_calls(&conn, "exists", 1).await;
    tokio::time::sleep(TICK * 10).await;
    let counts = command_calls(&mut conn).await;
    assert_eq!(calls(&counts, "exists"), 1, "{counts:?}");
    assert_eq!(calls(&counts, "llen"), 0, "{counts:?}");
    scaler.stop().await;
}

// ------------------------------------------------- idle sets armed with CLIENT TRACKING

/// The scaler's change-notification connections on a server (`CLIENT LIST` flag `t`).
async fn tracking_clients(url: &str) -> Vec<std::collections::HashMap<String, String>> {
    redis_clients(url)
        .await
        .into_iter()
        .filter(|c| c.get("flags").is_some_and(|f| f.contains('t')))
        .collect()
}

/// Waits until exactly one change-notification connection is on the server; returns its id.
async fn one_tracking_client(url: &str) -> String {
    wait_for("one tracking connection", SETTLE, || async {
        let clients = tracking_clients(url).await;
        (clients.len() == 1).then(|| clients[0]["id"].clone())
    })
    .await
}

/// The push-mode gauge of the scaler for `mode` and `reason`.
async fn push_brokers(scaler: &Scaler, mode: &str, reason: &str) -> Option<f64> {
    scaler
        .metric(&format!(
            "celery_keda_push_brokers{{broker=\"redis\",mode=\"{mode}\",reason=\"{reason}\"}}"
        ))
        .await
}

/// Waits for the next message of `stream`.
async fn next_push(
    stream: &mut tonic::Streaming<celery_keda_scaler::proto::IsActiveResponse>,
    what: &str,
) -> bool {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no push within 10 s"))
        .expect("stream open")
        .expect("no error")
        .result
}

/// An armed idle set is not read at all until a Celery publish to it: the server's
/// invalidation wakes the poll, which reads once and pushes `true`. No `LLEN` or `EXISTS`
/// reaches the server between the arming and the publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_armed_idle_set_is_pushed_without_being_read() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("armed");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("prioritySteps", "0,3,6,9"),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    // The arming reads: the lists, then the `unacked` hash.
    wait_calls(&conn, "hvals", 1).await;
    assert_eq!(push_brokers(&scaler, "tracking", "none").await, Some(1.0));
    reset_command_calls(&mut conn).await;
    // Ten fast intervals: a polled set would have cost ten EXISTS.
    tokio::time::sleep(TICK * 10).await;
    let quiet = command_calls(&mut conn).await;
    assert_eq!(
        calls(&quiet, "exists") + calls(&quiet, "llen") + calls(&quiet, "hvals"),
        0,
        "an armed set is not read: {quiet:?}"
    );

    CeleryConf::new(&url).publish(&q, &["--count", "3", "--priority", "6"]);
    assert!(next_push(&mut stream, "the publish").await);
    let after = command_calls(&mut conn).await;
    assert!(
        calls(&after, "exists") >= 1,
        "read once notified: {after:?}"
    );
    depth_settles(&mut client, &m, 3).await;
    scaler.stop().await;
}

/// The notification connection killed (`CLIENT KILL`): every set is armed again on a new one,
/// and a later publish still pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_is_rearmed() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("rearm");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let first = one_tracking_client(&url).await;
    wait_calls(&conn, "exists", 1).await;
    reset_command_calls(&mut conn).await;
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&first)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Re-armed: a new tracking connection, and the set read on it.
    let second = wait_for("a new tracking connection", SETTLE, || async {
        let clients = tracking_clients(&url).await;
        (clients.len() == 1 && clients[0]["id"] != first).then(|| clients[0]["id"].clone())
    })
    .await;
    assert_ne!(first, second);
    wait_calls(&conn, "exists", 1).await;

    CeleryConf::new(&url).publish(&q, &["--count", "2"]);
    assert!(next_push(&mut stream, "the publish after the kill").await);
    depth_settles(&mut client, &m, 2).await;
    scaler.stop().await;
}

/// A Sentinel failover while a set is armed: the old master's connections are closed by the
/// Sentinel, the set is armed again on the new master, and a publish there pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_rearms_on_the_new_master() {
    let master = OwnRedis::start(None, None);
    let replica = OwnRedis::start(None, None);
    let mut rconn = raw_redis(&replica.url(None)).await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.port)
        .query_async(&mut rconn)
        .await
        .unwrap();
    let sentinel = OwnSentinel::start(master.port, "cksfail", None);
    let sentinel_url = format!("redis://127.0.0.1:{}", sentinel.port);
    let mut sconn = raw_redis(&sentinel_url).await;
    // The Sentinel learns the replica from the master's INFO (every 10 s).
    wait_for("the Sentinel knows the replica", SETTLE, || {
        let mut sconn = sconn.clone();
        async move {
            let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg("cksfail")
                .query_async(&mut sconn)
                .await
                .ok()?;
            replicas
                .iter()
                .any(|r| r.get("flags").map(String::as_str) == Some("slave"))
                .then_some(())
        }
    })
    .await;

    let q = unique("failover");
    let url = format!("sentinel://127.0.0.1:{}", sentinel.port);
    let m = meta(&[
        ("brokerUrl", &url),
        ("sentinelMaster", "cksfail"),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&master.url(None)).await;

    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("cksfail")
        .query_async(&mut sconn)
        .await
        .unwrap();
    wait_for("the replica promoted", SETTLE, || {
        let mut sconn = sconn.clone();
        async move {
            let addr: (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg("cksfail")
                .query_async(&mut sconn)
                .await
                .ok()?;
            (addr.1 == replica.port).then_some(())
        }
    })
    .await;
    // Armed again on the new master, and nothing of the scaler tracks on the old one.
    one_tracking_client(&replica.url(None)).await;
    wait_for("no tracking on the old master", SETTLE, || async {
        tracking_clients(&master.url(None))
            .await
            .is_empty()
            .then_some(())
    })
    .await;

    let mut conf = CeleryConf::new(&url);
    conf.master_name = Some("cksfail".into());
    conf.publish(&q, &["--count", "4"]);
    assert!(next_push(&mut stream, "the publish after the failover").await);
    depth_settles(&mut client, &m, 4).await;
    scaler.stop().await;
}

/// An ACL user without `CLIENT`: the broker is polled (one log line, the gauge says why), with
/// the same exact depths and pushes as with tracking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_client_falls_back_to_polling() {
    let server = OwnRedis::start(None, None);
    let admin = server.url(None);
    let mut conn = raw_redis(&admin).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("notrack")
        .arg("on")
        .arg(">notrack-pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-client")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = format!("redis://notrack:notrack-pw@127.0.0.1:{}/0", server.port);
    let q = unique("fallback");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    wait_for("the polling gauge", SETTLE, || async {
        (push_brokers(&scaler, "polling", "no_permission").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(push_brokers(&scaler, "tracking", "none").await, Some(0.0));
    assert!(tracking_clients(&admin).await.is_empty());
    // Polled: EXISTS every fast interval.
    reset_command_calls(&mut conn).await;
    wait_calls(&conn, "exists", 5).await;

    CeleryConf::new(&url).publish(&q, &["--count", "5", "--priority", "9"]);
    assert!(next_push(&mut stream, "the publish while polling").await);
    depth_settles(&mut client, &m, 5).await;
    let metrics = scaler.admin_get("/metrics").await.1;
    assert!(!metrics.contains("notrack-pw"), "{metrics}");
    scaler.stop().await;
}

/// A busy set (a producer and a consumer moving thousands of messages per second through its
/// list, which stays nearly empty) wakes the armed poll at most once per fast interval, not
/// once per write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_queue_is_not_read_once_per_write() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("busy");
    // A real Celery message to move around.
    let conf = CeleryConf::new(&url);
    conf.publish(&q, &["--count", "1"]);
    let mut conn = raw_redis(&url).await;
    let body: Vec<u8> = redis::cmd("RPOP")
        .arg(&q)
        .query_async(&mut conn)
        .await
        .unwrap();
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let _stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    wait_calls(&conn, "exists", 1).await;

    reset_command_calls(&mut conn).await;
    let started = std::time::Instant::now();
    let load = {
        let mut conn = raw_redis(&url).await;
        let (q, body) = (q.clone(), body.clone());
        tokio::spawn(async move {
            let until = std::time::Instant::now() + Duration::from_secs(3);
            let mut moved = 0u64;
            while std::time::Instant::now() < until {
                let mut pipe = redis::pipe();
                for _ in 0..50 {
                    pipe.lpush(&q, &body).ignore().rpop(&q, None).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                moved += 50;
            }
            moved
        })
    };
    let moved = load.await.unwrap();
    let counts = command_calls(&mut conn).await;
    let ticks = (started.elapsed().as_millis() / TICK.as_millis()) as u64 + 2;
    assert!(calls(&counts, "lpush") >= 1000, "a busy queue: {counts:?}");
    assert_eq!(calls(&counts, "lpush"), moved);
    assert!(
        calls(&counts, "exists") <= ticks,
        "at most one read per fast interval, not one per write ({moved} writes): {counts:?}"
    );
    scaler.stop().await;
}

/// `globalKeyprefix` and a custom separator: the set is armed on the keys Celery writes (a
/// publish under them pushes), not on the bare names (a write there wakes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixed_keys_and_a_custom_separator_are_armed() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let prefix = "tenant-a:";
    let q = unique("pfxarm");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("globalKeyprefix", prefix),
        ("prioritySteps", "0,5"),
        ("separator", ":"),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    wait_calls(&conn, "exists", 1).await;
    reset_command_calls(&mut conn).await;
    // The bare names (kombu's defaults) are not the set's keys: no wake-up, no read.
    let _: () = redis::cmd("LPUSH")
        .arg(&q)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg(format!("{q}\x06\x165"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(TICK * 5).await;
    let quiet = command_calls(&mut conn).await;
    assert_eq!(calls(&quiet, "exists"), 0, "{quiet:?}");

    let mut conf = CeleryConf::new(&url);
    conf.global_keyprefix = Some(prefix.into());
    conf.priority_steps = Some("0,5".into());
    conf.sep = Some(":".into());
    conf.publish(&q, &["--count", "1", "--priority", "7"]);
    assert!(next_push(&mut stream, "the prefixed publish").await);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 1);
    scaler.stop().await;
}

/// One idle stream on the largest trigger the limits allow (256 queues x 256 priority steps,
/// 65,536 lists): armed once, then no command at all, and a small share of a Redis core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_armed_set_costs_nothing_while_idle() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let queues: Vec<String> = (0..256).map(|i| format!("hugearm{i}")).collect();
    let steps: Vec<String> = (0..256).map(|s| s.to_string()).collect();
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &queues.join(",")),
        ("prioritySteps", &steps.join(",")),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let _stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    // The arming reads: the lists, then the `unacked` hash.
    wait_calls(&conn, "hvals", 1).await;
    reset_command_calls(&mut conn).await;
    let cpu_before = redis_cpu_seconds(&mut conn).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = command_calls(&mut conn).await;
    let cpu = redis_cpu_seconds(&mut conn).await - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    // Only this test's own INFO/CONFIG calls reach the server.
    let scaler_calls: u64 = counts
        .iter()
        .filter(|(c, _)| !matches!(c.as_str(), "info" | "config|resetstat" | "config"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(scaler_calls, 0, "{counts:?}");
    assert!(
        cpu / elapsed <= 0.01,
        "{cpu:.3} s of Redis CPU in {elapsed:.1} s"
    );
    scaler.stop().await;
}

/// `used_cpu_sys + used_cpu_user` of the server (`INFO cpu`).
async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// KEDA's own polls (`GetMetrics`, `IsActive`) of an armed idle set read none of its lists and
/// not the `unacked` hash while Redis notifies nothing, and still count what is in flight: a
/// message moved from the list into `unacked` the way kombu's worker does it, in two steps (the
/// second one without a list write), is counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_polls_of_an_armed_idle_set_skip_its_lists() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("quiet");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&url).await;
    let scaler = Scaler::start_with(BrokerEnv::default(), ServeSettingsExt::no_window()).await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    wait_calls(&conn, "exists", 2).await; // the set's lists and the unacked hash
    tokio::time::sleep(TICK).await;
    reset_command_calls(&mut conn).await;
    for _ in 0..5 {
        assert_eq!(depth(&mut client, &m).await.unwrap(), 0);
        assert!(!active(&mut client, &m).await.unwrap());
    }
    let polls = command_calls(&mut conn).await;
    assert_eq!(
        calls(&polls, "llen") + calls(&polls, "exists") + calls(&polls, "hvals"),
        0,
        "KEDA's polls of an armed idle set read nothing: {polls:?}"
    );

    // A real Celery message, taken by a "worker": the list write wakes the poll, which finds
    // nothing and arms again; then the message lands in `unacked` (no list write).
    CeleryConf::new(&url).publish(&q, &["--count", "1"]);
    assert!(next_push(&mut stream, "the publish").await);
    let body: String = redis::cmd("RPOP")
        .arg(&q)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!active(&mut client, &m).await.unwrap());
    let entry = format!("[{body}, \"\", \"{q}\"]");
    let _: () = redis::cmd("HSET")
        .arg("unacked")
        .arg(unique("tag"))
        .arg(&entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(depth(&mut client, &m).await.unwrap(), 1);
    assert!(active(&mut client, &m).await.unwrap());
    scaler.stop().await;
}

/// A two-host failover list as Celery's `broker_url` writes it (`redis://...;redis://...`), its
/// hosts two proxies to the suite's Redis on loopback addresses of their own: the first refuses,
/// so real Celery (kombu) publishes through the second and the scaler reads it there, exactly;
/// the first comes back and the readings stay with the host that answered last (the first proxy
/// accepts nothing); that host goes away and the next reading moves to the other within one
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_list_reads_the_host_that_answers() {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering::SeqCst;
    let base = redis_url();
    let port = url::Url::parse(&base).unwrap().port().unwrap_or(6379);
    let mut first = Proxy::start_on(Ipv4Addr::new(127, 0, 0, 2), port).await;
    let mut second = Proxy::start_on(Ipv4Addr::new(127, 0, 0, 3), port).await;
    first.stop();
    let list = format!("redis://{}/0;redis://{}/0", first.addr(), second.addr());
    let q = unique("fo");
    let conf = CeleryConf::new(&list);
    assert_eq!(conf.publish(&q, &["--count", "4"]), 4);
    assert_eq!(conf.publish(&q, &["--count", "2", "--priority", "9"]), 2);

    let deadline = Duration::from_secs(2);
    let settings = celery_keda_scaler::server::ServeSettings {
        deadline,
        result_window: Duration::ZERO,
        ..Default::default()
    };
    let scaler = Scaler::start_with(Default::default(), settings).await;
    let mut client = scaler.client().await;
    let m = meta(&[
        ("brokerUrl", &list),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 6);
    assert!(active(&mut client, &m).await.unwrap());
    assert_eq!(first.accepted.load(SeqCst), 0);

    let pairs = [
        ("brokerUrl", list.clone()),
        ("queues", q.clone()),
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
    assert!(
        text.contains(&format!("answered by  redis://{}/0", second.addr())),
        "{text}"
    );
    assert!(text.contains("depth        6"), "{text}");

    // The first host comes back: the readings stay with the host that answered last.
    first.resume().await;
    for _ in 0..3 {
        assert_eq!(depth(&mut client, &m).await.unwrap(), 6);
    }
    assert_eq!(first.accepted.load(SeqCst), 0);

    // The host that answered goes away: the next reading moves to the other, in time.
    second.stop();
    let started = std::time::Instant::now();
    assert_eq!(depth(&mut client, &m).await.unwrap(), 6);
    assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
    assert!(first.accepted.load(SeqCst) >= 1);
    second.resume().await;
    let before = second.accepted.load(SeqCst);
    assert_eq!(depth(&mut client, &m).await.unwrap(), 6);
    assert_eq!(second.accepted.load(SeqCst), before);

    // No host answering is an error, never a depth.
    first.stop();
    second.stop();
    let err = depth(&mut client, &m).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(err.message().contains("failover list"), "{err:?}");
    scaler.stop().await;
    cleanup_redis(&base, "", &[&q]).await;
}

/// A stream whose password Redis rejects is read again less and less often (200 ms, doubling,
/// up to 30 s) instead of knocking at every fast interval; once the password is right (here the
/// server's is changed to the trigger's, as a rotation does), the stream pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_password_is_not_tried_at_every_tick() {
    let server = OwnRedis::start(Some("old-pw"), None);
    let admin_url = server.url(Some("old-pw"));
    let url = server.url(Some("new-pw"));
    let q = unique("rotate");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let mut conn = raw_redis(&admin_url).await;
    let connections = |mut conn: redis::aio::MultiplexedConnection| async move {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
    };
    let before = connections(conn.clone()).await;
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Readings at 0, 0.2, 0.6, 1.4 and 3.0 s (each a connection attempt, and its one retry):
    // polled at every tick it would be 18 readings.
    let attempts = connections(conn.clone()).await - before;
    assert!(
        (1..=12).contains(&attempts),
        "{attempts} connections in 3.5 s"
    );

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("new-pw")
        .query_async(&mut conn)
        .await
        .unwrap();
    CeleryConf::new(&url).publish(&q, &["--count", "2"]);
    let pushed = tokio::time::timeout(Duration::from_secs(40), stream.next())
        .await
        .expect("pushed within the 30 s cap after the rotation");
    assert!(pushed.unwrap().unwrap().result);
    depth_settles(&mut client, &m, 2).await;
    scaler.stop().await;
}

/// KEDA answers a push with its own `IsActive` at once: that reading must be the one that was
/// pushed, not an older one of the result window (here 5 s long, so the idle answer given just
/// before the publish would still be in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_active_right_after_a_push_agrees_with_it() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("agree");
    let m = meta(&[
        ("brokerUrl", &url),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let settings = ServeSettings {
        result_window: Duration::from_secs(5),
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    one_tracking_client(&url).await;
    assert!(!active(&mut client, &m).await.unwrap());
    CeleryConf::new(&url).publish(&q, &["--count", "1"]);
    assert!(next_push(&mut stream, "the publish").await);
    assert!(
        active(&mut client, &m).await.unwrap(),
        "IsActive right after the push"
    );
    assert_eq!(depth(&mut client, &m).await.unwrap(), 1);
    scaler.stop().await;
}

// The watch list (--watch)

/// Watched queues are exported by state with exact counts from real Celery: ten tasks over the
/// four priority lists are ready; an ETA task a worker holds is in flight; two tasks the worker
/// runs after acknowledging them are running. A watched queue whose broker does not answer is
/// `up` 0 with no task samples (never 0 tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_queues_are_exported_by_state() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let (ready, busy) = (unique("w-ready"), unique("w-busy"));
    let marker = unique("w-started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    assert_eq!(conf.publish(&ready, &["--priorities", "0-9"]), 10);
    conf.publish(&busy, &["--countdown", "600"]);
    conf.publish(
        &busy,
        &["--count", "2", "--seconds", "60", "--marker", &marker],
    );
    let _worker = conf.worker(&[&busy], 2);
    wait_started(&marker, 2).await;
    wait_llen(&url, &busy, 0).await;

    let down = format!("redis://127.0.0.1:{}/0", free_port());
    let env = BrokerEnv::from_vars([
        ("CELERY_BROKER_URL".to_string(), url.clone()),
        ("CELERY_KEDA_BROKER_DOWN".to_string(), down),
    ])
    .unwrap();
    let scaler = watching(
        env,
        &format!("{ready},{busy}; down:lost"),
        Duration::from_millis(500),
    )
    .await;
    let expected = [
        (watched(&ready, "ready"), 10.0),
        (watched(&ready, "in_flight"), 0.0),
        (watched(&ready, "running"), 0.0),
        (watched(&busy, "ready"), 0.0),
        (watched(&busy, "in_flight"), 1.0),
        (watched(&busy, "running"), 2.0),
        (
            "celery_keda_watched_queue_up{broker=\"default\",queue=\"".to_string()
                + &ready
                + "\"} ",
            1.0,
        ),
        (
            "celery_keda_watched_queue_up{broker=\"down\",queue=\"lost\"} ".to_string(),
            0.0,
        ),
    ];
    let body = scaler
        .wait_metrics("the watched gauges", SETTLE, &expected)
        .await;
    assert!(
        !body.contains("celery_keda_watched_queue_tasks{broker=\"down\""),
        "a failed reading exports no task samples:\n{body}"
    );
    // The queue empties: its ready gauge follows at the next reading.
    let mut conn = raw_redis(&url).await;
    cleanup_redis(&url, "", &[&ready]).await;
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    wait_for("the ready gauge back to 0", SETTLE, || {
        let scaler = &scaler;
        let line = watched(&ready, "ready");
        async move { (scaler.metric(&line).await == Some(0.0)).then_some(()) }
    })
    .await;
    scaler.stop().await;
    drop(_worker);
    cleanup_redis(&url, "", &[&busy]).await;
}

/// A watched set that a trigger also reads costs the broker nothing more: while KEDA's calls
/// read it more often than the watch interval, the watch list exports their readings (every
/// `LLEN` the broker served is one of a `GetMetrics`), and follows them exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_set_a_trigger_reads_is_not_read_again() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("w-shared");
    // What the same Celery publish costs by itself (kombu sizes the queue it declares), measured
    // on a queue of its own before the scaler reads anything.
    let mut conn = raw_redis(&url).await;
    let alone = format!("{q}-alone");
    reset_command_calls(&mut conn).await;
    CeleryConf::new(&url).publish(&alone, &["--priorities", "0-6"]);
    let publisher_llen = calls(&command_calls(&mut conn).await, "llen");
    cleanup_redis(&url, "", &[&alone]).await;
    let env = BrokerEnv::from_vars([("CELERY_BROKER_URL".to_string(), url.clone())]).unwrap();
    let scaler = watching(
        env,
        &format!("{q}?scaleOnRunning=false"),
        Duration::from_secs(2),
    )
    .await;
    // The watch list's first reading, its own.
    wait_for("the first watched reading", SETTLE, || {
        let scaler = &scaler;
        let line = watched(&q, "ready");
        async move { (scaler.metric(&line).await == Some(0.0)).then_some(()) }
    })
    .await;
    reset_command_calls(&mut conn).await;
    let mut client = scaler.client().await;
    let m = meta(&[("queues", &q), ("scaleOnRunning", "false")]);
    // Real Celery publishes 7 tasks while KEDA's calls go on every 200 ms (its process start
    // takes longer than a watch interval on a loaded machine: the calls must not wait for it).
    let publisher = {
        let conf = CeleryConf::new(&url);
        let q = q.clone();
        tokio::task::spawn_blocking(move || conf.publish(&q, &["--priorities", "0-6"]))
    };
    let mut calls_made = 0;
    let mut after = 0;
    while after < 15 {
        let n = depth(&mut client, &m).await.unwrap();
        calls_made += 1;
        if n == 7 {
            after += 1;
        } else {
            assert!(n < 7, "{n}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(publisher.await.unwrap(), 7);
    // 15 calls (3 s) after the last task was written, with a 2 s watch interval: the watch list
    // ticked at least once on a trigger's reading of the 7 tasks.
    assert_eq!(scaler.metric(&watched(&q, "ready")).await, Some(7.0));
    let counts = command_calls(&mut conn).await;
    assert_eq!(
        calls(&counts, "llen"),
        calls_made * 4 + publisher_llen,
        "one LLEN per priority list per GetMetrics ({calls_made}), none for the watch list: {counts:?}"
    );
    scaler.stop().await;
    cleanup_redis(&url, "", &[&q]).await;
}

/// The watched gauges beside Flower's queue lengths, on one broker state made by real Celery: a
/// worker (2 threads, prefetch multiplier 1, early ack) runs two long tasks, holds an ETA task
/// and whatever it prefetched, and ten tasks wait over the four priority lists. The broker's own
/// numbers (`LLEN` of every priority list, `HLEN unacked`) are the truth both are held to:
/// Flower reports the ready tasks only (docs/BENCHMARKS.md, "Watched queues beside Flower").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_numbers_beside_flower() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("flower");
    let marker = unique("flower-started");
    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    conf.publish(
        &q,
        &["--count", "2", "--seconds", "120", "--marker", &marker],
    );
    let _worker = conf.worker(&[&q], 2);
    wait_started(&marker, 2).await;
    conf.publish(&q, &["--countdown", "600"]);
    conf.publish(&q, &["--priorities", "0-9"]);
    // The broker's state, once the worker has stopped taking messages: (ready, unacked).
    let mut conn = raw_redis(&url).await;
    let read_state = || {
        let mut pipe = redis::pipe();
        for suffix in ["", "\x06\x163", "\x06\x166", "\x06\x169"] {
            pipe.llen(format!("{q}{suffix}"));
        }
        pipe.hlen("unacked");
        let mut conn = conn.clone();
        async move {
            let c: Vec<u64> = pipe.query_async(&mut conn).await.unwrap();
            (c[..4].iter().sum::<u64>(), c[4])
        }
    };
    let started = std::time::Instant::now();
    let mut state = read_state().await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = read_state().await;
        if now == state {
            break;
        }
        assert!(
            started.elapsed() < SETTLE,
            "the broker state did not settle"
        );
        state = now;
    }
    let (ready, unacked) = state;
    assert_eq!(
        ready + unacked,
        11,
        "the 10 tasks and the ETA task, ready or held"
    );

    let scaler = watching_until(&url, &q, [ready, unacked, 2], SETTLE).await;

    let port = free_port();
    let _flower = conf.flower(port, None);
    let flower = wait_for("Flower's queue length", SETTLE, || {
        let q = &q;
        async move { flower_queue_lengths(port).await?.get(q.as_str()).copied() }
    })
    .await;
    eprintln!(
        "flower-comparison redis: ready {ready}, in flight {unacked}, running 2; \
         watched gauges: {ready} / {unacked} / 2; Flower /api/queues/length: {flower}"
    );
    assert_eq!(
        flower, ready,
        "Flower counts every priority list, and nothing else"
    );
    assert!(unacked >= 1, "the worker holds the ETA task: {unacked}");
    scaler.stop().await;
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

/// A watch list of 100 queues on one Redis, written as one entry, costs one pipelined round trip
/// per interval: every priority list of every queue and the `unacked` hash in one request. Round
/// trips are counted by the server (`total_writes_processed` of `INFO stats`: one reply write per
/// request batch) over the readings it served (`LLEN` calls / 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_list_of_100_queues_is_one_round_trip_per_interval() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let queues: Vec<String> = (0..100).map(|i| format!("w100-{i}")).collect();
    let env = BrokerEnv::from_vars([("CELERY_BROKER_URL".to_string(), url.clone())]).unwrap();
    let scaler = watching(
        env,
        &format!("{}?scaleOnRunning=false", queues.join(",")),
        Duration::from_millis(500),
    )
    .await;
    wait_for("the first watched reading", SETTLE, || {
        let scaler = &scaler;
        let line = watched(&queues[99], "ready");
        async move { (scaler.metric(&line).await == Some(0.0)).then_some(()) }
    })
    .await;
    let mut conn = raw_redis(&url).await;
    let writes = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_writes_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    reset_command_calls(&mut conn).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counts = command_calls(&mut conn).await;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let readings = calls(&counts, "llen") / 400;
    assert_eq!(calls(&counts, "llen"), readings * 400, "{counts:?}");
    assert!(readings >= 5, "ten intervals in 5 s: {readings} readings");
    // Our own replies written since the reset: CONFIG RESETSTAT's (written after the reset) and
    // INFO commandstats'; INFO stats' reply is written after it read the counter.
    let own = 2;
    assert_eq!(
        writes(info) - own,
        readings,
        "one round trip per reading ({readings}): {counts:?}"
    );
    scaler.stop().await;
}
