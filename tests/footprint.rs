//! What the scaler leaves on a shared broker: nothing beyond what Celery's own `inspect` leaves.
//! Real servers, real Celery workers and `celery inspect`; the scaler binary is driven through
//! readings, worker censuses and push streams, then stopped with SIGTERM and with SIGKILL, and
//! the broker's state is compared with the state before. Also: a trigger with a foreign
//! `separator` never breaks Celery remote control for anyone.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use tokio_stream::StreamExt;
use tonic::Code;

/// Where this scaler's reply ids start (`celery_keda_scaler::broker::census::OID_PREFIX`).
const OWN: &str = "celery-keda-scaler-";

/// Every key of a Redis database, with the members of every set (binding tables).
async fn redis_state(url: &str) -> BTreeMap<String, Vec<String>> {
    let mut conn = raw_redis(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut state = BTreeMap::new();
    for key in keys {
        // kombu's own short-lived lock around restoring unacknowledged messages.
        if key.ends_with("unacked_mutex") {
            continue;
        }
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut members: Vec<String> = if kind == "set" {
            redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap()
        } else {
            vec![kind]
        };
        members.sort();
        state.insert(key, members);
    }
    state
}

/// Waits until `celery inspect ping` gets an answer from a worker (real Celery remote control).
async fn ping_answered(conf: &CeleryConf) {
    wait_for(
        "`celery inspect ping` answered by a worker",
        Duration::from_secs(60),
        || async {
            let out = conf.inspect(&["ping", "--timeout", "2"]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            (out.status.success() && text.contains("pong")).then_some(())
        },
    )
    .await;
}

/// Drives the scaler binary through readings with every counter (so censuses run), IsActive and
/// a push stream, until it has completed censuses (its census metric is exported).
async fn exercise(scaler: &ScalerProcess, m: &std::collections::HashMap<String, String>) {
    let mut client = scaler.client().await;
    let mut stream = client
        .stream_is_active(object_ref(m))
        .await
        .expect("StreamIsActive opens")
        .into_inner();
    wait_for("readings with a census", Duration::from_secs(30), || {
        let mut client = client.clone();
        let m = m.clone();
        async move {
            depth(&mut client, &m).await.expect("a reading");
            active(&mut client, &m).await.expect("IsActive");
            let metrics = scaler.metrics_text().await;
            metrics
                .lines()
                .any(|l| l.starts_with("celery_keda_census_age_seconds{"))
                .then_some(())
        }
    })
    .await;
    // The stream is open and served by its shared poll; nothing is active, so no message yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), stream.next())
            .await
            .is_err(),
        "an idle queue sends no activation"
    );
    drop(stream);
}

/// The reply-table members of this scaler on a Redis.
async fn own_reply_members(url: &str) -> Vec<String> {
    let mut conn = raw_redis(url).await;
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("_kombu.binding.reply.celery.pidbox")
        .query_async(&mut conn)
        .await
        .unwrap();
    members.into_iter().filter(|m| m.contains(OWN)).collect()
}

/// The reproduction: a trigger with a foreign separator asks first (no worker yet), then
/// a real worker starts. The foreign trigger wrote nothing, so `celery inspect ping` works, and a
/// default trigger counts two running early-ack tasks; the foreign one gets its own error only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_separator_never_breaks_remote_control() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let queue = unique("steps");
    let scaler = Scaler::start_with(Default::default(), ServeSettingsExt::no_window()).await;
    let mut client = scaler.client().await;
    let foreign = meta(&[("brokerUrl", &url), ("queues", &queue), ("separator", ":")]);
    // No worker is bound to the mailbox: nobody runs anything, and nothing is written.
    assert_eq!(depth(&mut client, &foreign).await.unwrap(), 0);
    assert!(
        redis_state(&url).await.is_empty(),
        "the scaler wrote nothing"
    );

    let mut conf = CeleryConf::new(&url);
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    let worker = conf.worker(&[&queue], 2);
    ping_answered(&conf).await;
    // Now the workers' own bindings show their separator: the foreign trigger is refused.
    let err = depth(&mut client, &foreign).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`separator`"), "{}", err.message());

    let marker = unique("started");
    conf.publish(
        &queue,
        &["--count", "2", "--seconds", "20", "--marker", &marker],
    );
    wait_started(&marker, 2).await;
    let bound = Duration::from_secs(30);
    expect_depth(&scaler, &counting(&url, &queue, true, true), 2, bound).await;
    expect_depth(&scaler, &counting(&url, &queue, false, true), 2, bound).await;
    // The foreign trigger still fails alone, and Celery's own remote control still works.
    let err = depth(&mut client, &foreign).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    expect_depth(&scaler, &counting(&url, &queue, true, true), 2, bound).await;
    ping_answered(&conf).await;
    let reply_table = redis_state(&url)
        .await
        .remove("_kombu.binding.reply.celery.pidbox")
        .unwrap_or_default();
    assert!(
        reply_table.iter().all(|m| m.contains("\x06\x16")),
        "{reply_table:?}"
    );
    drop(worker);
}

/// Redis: after SIGTERM nothing of the scaler's remains; after SIGKILL in the middle of a census
/// its reply binding is removed by the next census once stale (30 s) and its reply list expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_leaves_nothing_on_redis() {
    let server = OwnRedis::start(None, None);
    let url = server.url(None);
    let queue = unique("fp");
    let conf = CeleryConf::new(&url);
    let _worker = conf.worker(&[&queue], 1);
    ping_answered(&conf).await;
    let before = redis_state(&url).await;
    assert!(
        !before.keys().any(|k| k.contains(".reply.celery.pidbox")),
        "kombu's inspect leaves no reply list: {before:?}"
    );
    let m = meta(&[("brokerUrl", &url), ("queues", &queue)]);
    let window = ["--result-window", "0s"];

    let scaler = ScalerProcess::spawn(&window, &[], &[]).await;
    exercise(&scaler, &m).await;
    let exit = scaler.terminate();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(redis_state(&url).await, before, "after SIGTERM");

    // A subscriber that never answers keeps every census waiting its whole window, with the
    // reply binding in place: the kill lands in the middle of one.
    let mut silent = redis::Client::open(url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    silent.subscribe("/0.celery.pidbox").await.unwrap();
    let scaler = ScalerProcess::spawn(&window, &[], &[]).await;
    exercise(&scaler, &m).await;
    // Frozen (SIGSTOP) while its reply binding is seen, so the SIGKILL surely lands mid-census.
    let pid = scaler.child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    loop {
        wait_for(
            "a census under way (reply binding present)",
            Duration::from_secs(30),
            || async { (!own_reply_members(&url).await.is_empty()).then_some(()) },
        )
        .await;
        signal("-STOP");
        if !own_reply_members(&url).await.is_empty() {
            break;
        }
        signal("-CONT");
    }
    scaler.kill();
    let left = own_reply_members(&url).await;
    assert_eq!(left.len(), 1, "{left:?}");
    let mut conn = raw_redis(&url).await;
    for (key, _) in redis_state(&url).await {
        if key.starts_with(OWN) {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(ttl > 0 && ttl <= 30_000, "{key} expires by itself: {ttl}");
        }
    }
    drop(silent);
    // The next scaler's census removes the leftover once it is stale (30 s).
    let scaler = ScalerProcess::spawn(&window, &[], &[]).await;
    let client = scaler.client().await;
    wait_for(
        "the killed scaler's reply binding removed",
        Duration::from_secs(60),
        || {
            let mut client = client.clone();
            let (m, url, before) = (m.clone(), url.clone(), before.clone());
            async move {
                depth(&mut client, &m).await.expect("a reading");
                (redis_state(&url).await == before).then_some(())
            }
        },
    )
    .await;
    let exit = scaler.terminate();
    assert!(exit.status.success(), "{}", exit.stderr);
    assert_eq!(
        redis_state(&url).await,
        before,
        "after the SIGKILL and a restart"
    );
}

/// A vhost's queues, exchanges and bindings.
async fn rabbit_state(vhost: &Vhost) -> BTreeSet<String> {
    let mut state = BTreeSet::new();
    for (what, columns) in [
        ("queues", "name"),
        ("exchanges", "name,type"),
        (
            "bindings",
            "source,destination,destination_type,routing_key",
        ),
    ] {
        let rows: Vec<serde_json::Value> = vhost
            .management(reqwest::Method::GET, what, &format!("?columns={columns}"))
            .await
            .json()
            .await
            .unwrap();
        for row in rows {
            state.insert(format!("{what} {row}"));
        }
    }
    state
}

/// RabbitMQ: after SIGTERM and after SIGKILL the vhost holds what it held after Celery's own
/// `inspect` (the shared `reply.celery.pidbox` exchange), and nothing else of the scaler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_leaves_nothing_on_rabbitmq() {
    let vhost = Vhost::create().await;
    let url = vhost.url();
    let queue = unique("fp");
    let conf = CeleryConf::new(&url);
    let _worker = conf.worker(&[&queue], 1);
    ping_answered(&conf).await;
    // kombu's reply queue goes with its connection.
    let before = wait_for(
        "celery inspect's reply queue gone",
        Duration::from_secs(30),
        || async {
            let s = rabbit_state(&vhost).await;
            (!s.iter().any(|r| r.contains(".reply.celery.pidbox\""))).then_some(s)
        },
    )
    .await;
    assert!(
        before.iter().any(|r| r.contains("\"reply.celery.pidbox\"")),
        "Celery's inspect leaves its reply exchange: {before:?}"
    );
    let m = meta(&[("brokerUrl", &url), ("queues", &queue)]);
    let window = ["--result-window", "0s"];
    for kill in [false, true] {
        let scaler = ScalerProcess::spawn(&window, &[], &[]).await;
        exercise(&scaler, &m).await;
        // Each census declares its own reply queue and deletes it when it ends.
        wait_for(
            "a census's own reply queue",
            Duration::from_secs(30),
            || async {
                let during = rabbit_state(&vhost).await;
                during.iter().any(|r| r.contains(OWN)).then_some(())
            },
        )
        .await;
        if kill {
            scaler.kill();
        } else {
            let exit = scaler.terminate();
            assert!(exit.status.success(), "{}", exit.stderr);
        }
        // Exclusive: RabbitMQ deletes it with the connection.
        wait_for(
            &format!("the vhost as before (kill: {kill})"),
            Duration::from_secs(15),
            || async { (rabbit_state(&vhost).await == before).then_some(()) },
        )
        .await;
    }
    vhost.delete().await;
}

/// SQS has no remote control: the scaler only reads queue attributes and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_leaves_nothing_on_sqs() {
    let moto = OwnMoto::start();
    moto.create_queue("celery");
    let queues = || {
        let script = "import sys, boto3\n\
            c = boto3.client('sqs', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                aws_access_key_id='testing', aws_secret_access_key='testing')\n\
            print(sorted(c.list_queues().get('QueueUrls', [])))\n";
        let out = std::process::Command::new(python())
            .args(["-c", script])
            .arg(format!("http://127.0.0.1:{}", moto.port))
            .output()
            .expect("python runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let before = queues();
    assert!(before.contains("/celery'"), "{before}");
    let m = meta(&[("brokerUrl", &moto.broker_url()), ("queues", "celery")]);
    for kill in [false, true] {
        let scaler = ScalerProcess::spawn(&["--result-window", "0s"], &[], &[]).await;
        let mut client = scaler.client().await;
        let mut stream = client
            .stream_is_active(object_ref(&m))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            assert_eq!(depth(&mut client, &m).await.unwrap(), 0);
        }
        assert!(!active(&mut client, &m).await.unwrap());
        assert!(
            tokio::time::timeout(Duration::from_millis(1), stream.next())
                .await
                .is_err()
        );
        if kill {
            scaler.kill();
        } else {
            assert!(scaler.terminate().status.success());
        }
        assert_eq!(queues(), before, "kill: {kill}");
    }
}
