//! The `scaleOnRunning` scenarios both broker suites run: tasks that workers run after
//! acknowledging them keep the scaler active, and the depth is what was published and not
//! finished.
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use super::celery::CeleryConf;
use super::redis::{raw_redis, redis_url};
use super::scaler::{active, depth, Scaler};
use super::scaler::{probe_command, ServeSettingsExt};
use super::wait_for;
use super::{meta, unique};

// running tasks (scaleOnRunning)

/// Waits until `marker` (incremented by each started `cks.sleep`) reaches `n`.
pub async fn wait_started(marker: &str, n: i64) {
    let url = redis_url();
    let conn = raw_redis(&url).await;
    wait_for(
        &format!("{n} tasks started ({marker})"),
        Duration::from_secs(90),
        || {
            let mut conn = conn.clone();
            async move {
                let v: Option<i64> = redis::cmd("GET")
                    .arg(marker)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (v == Some(n)).then_some(())
            }
        },
    )
    .await;
}

/// Metadata for one queue with both counters set as given.
pub fn counting(
    broker: &str,
    queue: &str,
    in_flight: bool,
    running: bool,
) -> HashMap<String, String> {
    meta(&[
        ("brokerUrl", broker),
        ("queues", queue),
        ("scaleOnInFlight", if in_flight { "true" } else { "false" }),
        ("scaleOnRunning", if running { "true" } else { "false" }),
    ])
}

/// Waits (bounded) until the scaler reports `expected` for `m`, then checks it once more and
/// checks `IsActive` against it. The wait covers the census interval and, on RabbitMQ, the
/// management statistics interval.
pub async fn expect_depth(
    scaler: &Scaler,
    m: &HashMap<String, String>,
    expected: i64,
    limit: Duration,
) {
    let client = scaler.client().await;
    let what = format!(
        "depth {expected} for queues={:?} scaleOnInFlight={:?} scaleOnRunning={:?}",
        m.get("queues"),
        m.get("scaleOnInFlight"),
        m.get("scaleOnRunning")
    );
    wait_for(&what, limit, || {
        let mut client = client.clone();
        let m = m.clone();
        async move { (depth(&mut client, &m).await.ok()? == expected).then_some(()) }
    })
    .await;
    let mut client = client.clone();
    assert_eq!(depth(&mut client, m).await.unwrap(), expected, "{what}");
    assert_eq!(
        active(&mut client, m).await.unwrap(),
        expected > 0,
        "IsActive for {what}"
    );
}

/// Two tasks running on a two-slot worker with early ack: the broker shows nothing (queue empty,
/// nothing unacknowledged), the scaler shows 2 until they finish, then 0. Running tasks of one
/// queue never count for another.
pub async fn running_tasks_keep_the_scaler_active(
    broker: &str,
    conf: CeleryConf,
    queue: &str,
    other: &str,
) {
    let marker = unique("started");
    let mut conf = conf;
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.publish(
        queue,
        &["--count", "2", "--seconds", "8", "--marker", &marker],
    );
    let worker = conf.worker(&[queue], 2);
    wait_started(&marker, 2).await;
    let settings = ServeSettingsExt::no_window();
    let scaler = Scaler::start_with(Default::default(), settings).await;
    let bound = Duration::from_secs(30);
    // What every queue-depth scaler sees: nothing.
    expect_depth(&scaler, &counting(broker, queue, true, false), 0, bound).await;
    // What this one sees.
    expect_depth(&scaler, &counting(broker, queue, true, true), 2, bound).await;
    expect_depth(&scaler, &counting(broker, queue, false, true), 2, bound).await;
    expect_depth(&scaler, &counting(broker, other, true, true), 0, bound).await;
    // `probe` shows them per worker.
    let out = probe_command(&[("brokerUrl", broker), ("queues", queue)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let running: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("running, already acknowledged"))
        .collect();
    assert_eq!(running.len(), 1, "{text}");
    assert_eq!(running[0].split_whitespace().nth(1), Some("2"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("2  on w-") && l.ends_with("@localhost")),
        "{text}"
    );
    // When they finish: back to 0 within the census bound.
    expect_depth(&scaler, &counting(broker, queue, true, true), 0, bound).await;
    drop(worker);
}

/// Ten long tasks, a two-slot worker with prefetch 1: with both counters on the depth is the
/// number of tasks published and not finished (10), for early ack and for `acks_late` alike.
/// A killed worker's running tasks stop counting within the census bound.
pub async fn depth_is_published_minus_finished(
    broker: &str,
    conf: CeleryConf,
    queue: &str,
    acks_late: bool,
    after_kill: i64,
    queue_after_kill: i64,
) {
    let marker = unique("started");
    let mut conf = conf;
    conf.marker_redis = Some(redis_url());
    conf.prefetch = Some(1);
    conf.acks_late = acks_late;
    conf.publish(
        queue,
        &["--count", "10", "--seconds", "120", "--marker", &marker],
    );
    let worker = conf.worker(&[queue], 2);
    wait_started(&marker, 2).await;
    let scaler = Scaler::start_with(Default::default(), ServeSettingsExt::no_window()).await;
    let bound = Duration::from_secs(30);
    let ready = if acks_late { 8 } else { 6 };
    expect_depth(
        &scaler,
        &counting(broker, queue, false, false),
        ready,
        bound,
    )
    .await;
    expect_depth(&scaler, &counting(broker, queue, true, true), 10, bound).await;
    let in_flight_only = if acks_late { 10 } else { 8 };
    expect_depth(
        &scaler,
        &counting(broker, queue, true, false),
        in_flight_only,
        bound,
    )
    .await;
    // A worker that stops answering (SIGSTOP) no longer reports its running tasks: they stop
    // counting at the next census; what the broker still holds keeps counting.
    let pid = worker.0.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {pid}");
    };
    signal("-STOP");
    let all = counting(broker, queue, true, true);
    expect_depth(&scaler, &all, after_kill, bound).await;
    signal("-CONT");
    expect_depth(&scaler, &all, 10, bound).await;
    // SIGKILL: early-acked running tasks are lost with the worker. On RabbitMQ what it held
    // returns to the queue (`queue_after_kill`; on Redis it stays in kombu's `unacked` hash). Wait
    // for the queue first: until then the total still reads the value before the kill, and the
    // check below would pass at once and then meet the moment when RabbitMQ's queue has the
    // returned tasks back while the management API (statistics up to 5 s old) still shows them
    // unacknowledged.
    drop(worker);
    let queue_only = counting(broker, queue, false, false);
    expect_depth(&scaler, &queue_only, queue_after_kill, bound).await;
    expect_depth(&scaler, &all, after_kill, bound).await;
}
