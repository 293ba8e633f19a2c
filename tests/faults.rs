//! Broker faults: real Redis, RabbitMQ and SQS (moto) servers stopped and started again under an
//! open `StreamIsActive` stream, and hostile servers (silent, garbage, cut mid-reply) in place of
//! every broker kind and of the RabbitMQ management API.
//!
//! Outages: while the broker is down every GetMetrics/IsActive fails with UNAVAILABLE or
//! DEADLINE_EXCEEDED within the deadline plus a margin (never a number, never a hang) and the
//! open stream neither pushes nor ends; once the broker is back the first reading succeeds, the
//! pending activation is pushed and GetMetrics is exact; afterwards the scaler holds as many
//! broker connections, shared polls, open streams and runtime tasks as before the outage.
//! Recovery times are printed on `RECOVERY` lines (`cargo test --test faults -- --nocapture`).
//!
//! The RabbitMQ outage stops the suite's shared node (`rabbitmqctl stop_app`). Cargo runs test
//! binaries one after another, but the tests of one binary in parallel: the tests of this file
//! that need that node hold `SHARED_RABBITMQ`, and the app is started again even when a test fails.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::IsActiveResponse;
use celery_keda_scaler::server::ServeSettings;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The scaler's deadline for one reading in these tests.
const DEADLINE: Duration = Duration::from_secs(1);
/// Round trip and scheduling on a busy 2-core machine: no answer by DEADLINE + MARGIN is a hang.
const MARGIN: Duration = Duration::from_secs(2);
/// How long an open stream is watched for a message that must not come.
const QUIET: Duration = Duration::from_millis(1500);
/// Bound for the scaler to settle back to what it held before (connections, tasks).
const SETTLE: Duration = Duration::from_secs(20);
/// Tolerated difference in runtime tasks before and after an outage (see `assert_nothing_leaked`).
const TASK_SLACK: usize = 2;
/// Tasks published once the broker is back.
const N: i64 = 3;

/// Held by the tests that stop, or need, the suite's shared RabbitMQ node.
static SHARED_RABBITMQ: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn settings() -> ServeSettings {
    ServeSettings {
        deadline: DEADLINE,
        // Every reading reaches the broker.
        result_window: Duration::ZERO,
        // A RabbitMQ census waits for its whole window, which must fit in the deadline.
        census_window: Duration::from_millis(300),
        // SQS polls are 5 s apart by default; shorter here to keep the test short.
        sqs_stream_poll_interval: Duration::from_secs(1),
        ..ServeSettings::default()
    }
}

// ---------------------------------------------------------------- panics outside the tests

/// Panics whose location is not in the tests' own files (the scaler's code or a dependency),
/// counted by a hook installed once for the whole binary.
static FOREIGN_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_foreign_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"))
            {
                FOREIGN_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------- outage helpers

/// Runs `fut`, failing the test if it takes longer than the deadline plus the margin.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let r = tokio::time::timeout(DEADLINE + MARGIN, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {:?}", DEADLINE + MARGIN));
    (r, started.elapsed())
}

/// The stream neither pushes nor ends for a while.
async fn assert_quiet(stream: &mut Streaming<IsActiveResponse>, what: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, stream.next()).await {
        panic!("{what}: the stream must stay open and push nothing, got {got:?}");
    }
}

/// The next stream message is `true`, within `limit`.
async fn expect_push(stream: &mut Streaming<IsActiveResponse>, limit: Duration, what: &str) {
    let msg = tokio::time::timeout(limit, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no push within {limit:?}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
        .unwrap_or_else(|e| panic!("{what}: the stream failed: {e:?}"));
    assert!(msg.result, "{what}: pushed false");
}

/// What the scaler holds: compared before an outage and after recovery.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Held {
    /// The scaler's connections to the broker, as the broker (or this process) sees them.
    broker_connections: usize,
    /// `celery_keda_shared_polls`.
    polls: f64,
    /// `celery_keda_streams`.
    streams: f64,
    /// Tasks alive on the test's runtime, where the in-process scaler spawns everything (polls,
    /// streams, census loops, connection drivers, HTTP pools).
    tasks: usize,
}

async fn held(scaler: &Scaler, broker_connections: usize) -> Held {
    let polls = scaler
        .metric("celery_keda_shared_polls ")
        .await
        .unwrap_or(-1.0);
    let streams = scaler.metric("celery_keda_streams ").await.unwrap_or(-1.0);
    Held {
        broker_connections,
        polls,
        streams,
        tasks: runtime_tasks(),
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// One outage scenario on one broker: three triggers on the same queue, watched and polled the
/// way KEDA does.
struct Outage {
    name: &'static str,
    client: ExternalScalerClient<Channel>,
    /// `scaleOnRunning: "false"`, with a stream open (an `external-push` trigger).
    plain: HashMap<String, String>,
    /// The defaults (the worker census behind `scaleOnRunning`), with a stream open.
    census: HashMap<String, String>,
    /// `scaleOnRunning: "false"` on another client of the same server (another database, host
    /// spelling or key), polled only, no stream: an `external` trigger between two KEDA polls.
    polled: HashMap<String, String>,
    plain_stream: Streaming<IsActiveResponse>,
    census_stream: Streaming<IsActiveResponse>,
}

impl Outage {
    /// Opens the streams and checks the healthy state: every trigger reads 0, nothing pushed.
    async fn open(
        name: &'static str,
        scaler: &Scaler,
        census: HashMap<String, String>,
        polled: HashMap<String, String>,
    ) -> Outage {
        let client = scaler.client().await;
        let mut plain = census.clone();
        plain.insert("scaleOnRunning".into(), "false".into());
        let open = |m: &HashMap<String, String>| {
            let mut c = client.clone();
            let r = object_ref(m);
            async move { c.stream_is_active(r).await.unwrap().into_inner() }
        };
        let plain_stream = open(&plain).await;
        let census_stream = open(&census).await;
        let mut o = Outage {
            name,
            client,
            plain,
            census,
            polled,
            plain_stream,
            census_stream,
        };
        for m in [&o.plain, &o.census, &o.polled] {
            let v = depth(&mut o.client.clone(), m).await;
            assert_eq!(v.unwrap(), 0, "{name}: up, empty queue: {m:?}");
        }
        assert_quiet(&mut o.plain_stream, name).await;
        assert_quiet(&mut o.census_stream, name).await;
        o
    }

    /// Waits (bounded) for the steady state before the outage: `expected` broker connections,
    /// two shared polls, two streams, and the same task count on three reads in a row.
    async fn steady<F, Fut>(&self, scaler: &Scaler, expected: usize, mut connections: F) -> Held
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = usize>,
    {
        let mut last: Option<Held> = None;
        let mut same = 0;
        let started = Instant::now();
        loop {
            let now = held(scaler, connections().await).await;
            if now.broker_connections == expected && now.polls == 2.0 && now.streams == 2.0 {
                if last == Some(now) {
                    same += 1;
                    if same == 2 {
                        return now;
                    }
                } else {
                    same = 0;
                }
                last = Some(now);
            }
            assert!(
                started.elapsed() < SETTLE,
                "{}: no steady state before the outage: {now:?} (expected {expected} connections)",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// While the broker is down: three rounds of GetMetrics and IsActive on every trigger, each an
    /// UNAVAILABLE or DEADLINE_EXCEEDED error within the deadline plus the margin; the streams
    /// stay open and push nothing.
    async fn assert_down(&mut self) {
        let what = format!("{} down", self.name);
        for _ in 0..3 {
            for m in [&self.plain, &self.census, &self.polled] {
                let mut c = self.client.clone();
                let (r, took) = bounded(&what, depth(&mut c, m)).await;
                match r {
                    Ok(v) => panic!("{what}: GetMetrics answered {v} ({m:?})"),
                    Err(e) => assert!(
                        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                        "{what}: GetMetrics after {took:?}: {e:?}"
                    ),
                }
                let (r, took) = bounded(&what, active(&mut c, m)).await;
                match r {
                    Ok(v) => panic!("{what}: IsActive answered {v} ({m:?})"),
                    Err(e) => assert!(
                        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                        "{what}: IsActive after {took:?}: {e:?}"
                    ),
                }
            }
        }
        // Also lets the last reconnect attempts of the polled trigger's client finish while the
        // broker is still down, so its first reading below is the first after the return.
        assert_quiet(&mut self.plain_stream, &what).await;
        assert_quiet(&mut self.census_stream, &what).await;
    }

    /// Once the broker is back (at `back`): the first GetMetrics of each trigger (plain, polled,
    /// and with the worker census) succeeds (0: the queue is empty). Returns when each
    /// answered, from `back`.
    async fn assert_back(&self, back: Instant) -> [Duration; 3] {
        let what = format!("{} back", self.name);
        let first = |m: &HashMap<String, String>| {
            let mut c = self.client.clone();
            let m = m.clone();
            let what = what.clone();
            async move {
                let (r, _) = bounded(&what, depth(&mut c, &m)).await;
                let v = r.unwrap_or_else(|e| {
                    panic!(
                        "{what}: the first reading after the broker returned failed: {e:?} ({m:?})"
                    )
                });
                assert_eq!(v, 0, "{what}: empty queue ({m:?})");
                back.elapsed()
            }
        };
        let plain = first(&self.plain).await;
        let polled = first(&self.polled).await;
        // With scaleOnRunning the reading also needs a worker census: the census of the outage
        // failed, so the reading asks for a new one at once and uses it.
        let census = first(&self.census).await;
        [plain, polled, census]
    }

    /// Publishes `N` tasks with real Celery (`publish`), then: both streams push `true`,
    /// GetMetrics reads `N` and IsActive is true. Returns when the publisher started and
    /// returned, and when each stream pushed, all from `back` (a push may come while the
    /// publisher is still running).
    async fn publish_and_assert_pushed(
        &mut self,
        back: Instant,
        publish: impl FnOnce(),
    ) -> [Duration; 4] {
        let what = format!("{} back, {N} tasks published", self.name);
        let started = back.elapsed();
        block_in_place(publish);
        let returned = back.elapsed();
        let limit = Duration::from_secs(10);
        expect_push(&mut self.plain_stream, limit, &what).await;
        let plain = back.elapsed();
        expect_push(&mut self.census_stream, limit, &what).await;
        let census = back.elapsed();
        for m in [&self.plain, &self.census] {
            assert_eq!(
                depth(&mut self.client.clone(), m).await.unwrap(),
                N,
                "{what}"
            );
            assert!(active(&mut self.client.clone(), m).await.unwrap(), "{what}");
        }
        [started, returned, plain, census]
    }

    fn report(&self, how: &str, back_after: Duration, first: [Duration; 3], push: [Duration; 4]) {
        eprintln!(
            "RECOVERY {} ({how}): broker back {} ms after the restart began. From then: first GetMetrics OK at {} ms (stream-watched trigger), {} ms (polled-only trigger on its own connection), {} ms (defaults, scaleOnRunning on: worker census, none on SQS); Celery publisher ran {}..{} ms; pending activation pushed at {} ms, {} ms (census trigger)",
            self.name,
            ms(back_after),
            ms(first[0]),
            ms(first[1]),
            ms(first[2]),
            ms(push[0]),
            ms(push[1]),
            ms(push[2]),
            ms(push[3]),
        );
    }
}

/// Waits (bounded) until the scaler holds what it held before the outage: as many broker
/// connections, polls and streams, and no more tasks.
async fn assert_nothing_leaked<F, Fut>(what: &str, before: Held, mut now: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Held>,
{
    let started = Instant::now();
    loop {
        let after = now().await;
        // The runtime's task count moves by one or two with the HTTP connection pool (the
        // management API's idle connection closes and a new one opens), so it may differ by
        // TASK_SLACK; a leak per connection attempt over an outage shows as tens of tasks
        // (242 against 22 before the lapin fix).
        let expected = Held {
            tasks: if after.tasks.abs_diff(before.tasks) <= TASK_SLACK {
                after.tasks
            } else {
                before.tasks
            },
            ..before
        };
        if after == expected {
            eprintln!("LEAKS {what}: before the outage {before:?}, after recovery {after:?}");
            return;
        }
        assert!(
            started.elapsed() < SETTLE,
            "{what}: before the outage {before:?}, {SETTLE:?} after recovery {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- outages of real servers

/// A Redis server of the test's own is killed (SIGKILL) and a new, empty one is started on the
/// same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    count_foreign_panics();
    let mut server = OwnRedis::start(None, None);
    let url = server.url(None);
    let q = unique("fault");
    let scaler = Scaler::start_with(Default::default(), settings()).await;
    let census = meta(&[("brokerUrl", &url), ("queues", &q)]);
    let other_db = format!("redis://127.0.0.1:{}/1", server.port);
    let polled = meta(&[
        ("brokerUrl", &other_db),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    let mut outage = Outage::open("redis", &scaler, census, polled).await;
    let clients = || async { redis_clients(&url).await.len() };
    // One multiplexed connection per client (database): readings and census share it; plus the
    // change-notification (CLIENT TRACKING) connection of the client whose sets have streams.
    let before = outage.steady(&scaler, 3, clients).await;
    let shown: Vec<String> = redis_clients(&url)
        .await
        .iter()
        .map(|c| format!("db {} last {}", c["db"], c["cmd"]))
        .collect();
    eprintln!("redis: the scaler's connections before the outage: {shown:?}");

    server.kill();
    outage.assert_down().await;

    let restart = Instant::now();
    block_in_place(|| server.restart(None));
    let back = Instant::now();
    let first = outage.assert_back(back).await;
    let push = outage
        .publish_and_assert_pushed(back, || {
            CeleryConf::new(&url).publish(&q, &["--count", &N.to_string()]);
        })
        .await;
    outage.report(
        "SIGKILL, new redis-server on the same port",
        back - restart,
        first,
        push,
    );

    assert_nothing_leaked("redis", before, || async {
        held(&scaler, redis_clients(&url).await.len()).await
    })
    .await;
    drop(outage);
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::SeqCst),
        0,
        "panics outside the tests"
    );
}

/// The suite's RabbitMQ application is stopped (`rabbitmqctl stop_app`) and started again; the
/// durable queue and the vhost survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_app_stopped_and_started() {
    count_foreign_panics();
    let _shared = SHARED_RABBITMQ.lock().await;
    let vhost = Vhost::create().await;
    vhost.declare("faults").await;
    let url = vhost.url();
    let scaler = Scaler::start_with(Default::default(), settings()).await;
    let census = meta(&[("brokerUrl", &url), ("queues", "faults")]);
    let by_name = format!("amqp://guest:guest@localhost:{}/{}", vhost.port, vhost.name);
    let polled = meta(&[
        ("brokerUrl", &by_name),
        ("queues", "faults"),
        ("scaleOnRunning", "false"),
    ]);
    let mut outage = Outage::open("rabbitmq", &scaler, census, polled).await;
    let name = vhost.name.clone();
    let connections = || {
        let name = name.clone();
        async move { scaler_amqp_connections(&name).await.unwrap_or(usize::MAX) }
    };
    // One AMQP connection per client (a depth channel and a census channel on it).
    let before = outage.steady(&scaler, 2, connections).await;

    let mut stopped = block_in_place(RabbitAppStopped::stop);
    let management = block_in_place(|| management_status_blocking("/api/overview"));
    eprintln!(
        "rabbitmq stop_app: the management API answers {management:?} (None: connection refused)"
    );
    outage.assert_down().await;

    let restart = Instant::now();
    let (amqp_listening, management_answering) = block_in_place(|| stopped.start());
    let back = Instant::now();
    eprintln!(
        "rabbitmq start_app: AMQP listening after {} ms, management API answering after {} ms",
        ms(amqp_listening),
        ms(management_answering)
    );
    let first = outage.assert_back(back).await;
    let push = outage
        .publish_and_assert_pushed(back, || {
            CeleryConf::new(&url).publish("faults", &["--count", &N.to_string()]);
        })
        .await;
    outage.report("stop_app, start_app", back - restart, first, push);

    assert_nothing_leaked("rabbitmq", before, || async {
        held(&scaler, connections().await).await
    })
    .await;
    drop(outage);
    vhost.delete().await;
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::SeqCst),
        0,
        "panics outside the tests"
    );
}

/// A moto server of the test's own is killed and started again on the same port; it comes back
/// empty, so the queue is created again before the first reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_server_killed_and_restarted() {
    count_foreign_panics();
    let mut moto = block_in_place(OwnMoto::start);
    let prefix = format!("{}-", unique("cks"));
    let sqs_name = format!("{prefix}faults");
    block_in_place(|| moto.create_queue(&sqs_name));
    let broker = moto.broker_url();
    let scaler = Scaler::start_with(Default::default(), settings()).await;
    let m = |url: &str| {
        meta(&[
            ("brokerUrl", url),
            ("awsRegion", "us-east-1"),
            ("queueNamePrefix", &prefix),
            ("queues", "faults"),
        ])
    };
    // Other credentials: another client (moto accepts any).
    let mut polled = m(&format!("sqs://other:other@127.0.0.1:{}", moto.port));
    polled.insert("scaleOnRunning".into(), "false".into());
    let mut outage = Outage::open("sqs", &scaler, m(&broker), polled).await;
    let port = moto.port;
    // moto answers `Connection: close`: the SDK's pools hold no connection between readings.
    let before = outage
        .steady(&scaler, 0, || async move { tcp_connections_to(port) })
        .await;

    block_in_place(|| moto.kill());
    outage.assert_down().await;

    let restart = Instant::now();
    block_in_place(|| {
        moto.restart();
        moto.create_queue(&sqs_name)
    });
    let back = Instant::now();
    let first = outage.assert_back(back).await;
    let mut conf = CeleryConf::new(&broker);
    conf.queue_name_prefix = Some(prefix.clone());
    let push = outage
        .publish_and_assert_pushed(back, || {
            conf.publish("faults", &["--count", &N.to_string()]);
        })
        .await;
    outage.report(
        &format!(
            "SIGKILL, new moto_server on the same port, queue created again; stream poll every {:?}",
            settings().sqs_stream_poll_interval
        ),
        back - restart,
        first,
        push,
    );

    assert_nothing_leaked("sqs", before, || async {
        held(&scaler, tcp_connections_to(port)).await
    })
    .await;
    drop(outage);
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::SeqCst),
        0,
        "panics outside the tests"
    );
}

// ---------------------------------------------------------------- hostile servers

/// How a hostile server behaves on each connection it accepts.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Accepts and never writes a byte (reads and discards).
    Silent,
    /// Writes these bytes as soon as it accepts, then only reads; never closes.
    Garbage(&'static [u8]),
    /// Answers every request (every chunk read) with these bytes: a reply of the wrong kind.
    Answer(&'static [u8]),
    /// Answers every complete RESP command with these bytes (Redis pipelines several commands
    /// per write, and waits for one reply each).
    AnswerEachCommand(&'static [u8]),
    /// Reads the first request, writes these bytes (the start of a valid reply) and closes.
    HalfThenClose(&'static [u8]),
}

/// What the hostile server stands in for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stand {
    Redis,
    Amqp,
    Sqs,
    /// The RabbitMQ management API (`managementUrl`), beside the suite's real AMQP.
    Management,
}

/// Bytes that start no reply of these protocols (no RESP type byte, no AMQP frame type or
/// header, not `HTTP/`).
const NOISE: &[u8] = b"\x9f\x03\xd2\x7f\x00\xee\x11\x80\xc4\x5a\xa5\x0f\xf0\x13\x37\x42\r\n";

const DEADLINE_EXCEEDED: &[Code] = &[Code::DeadlineExceeded];
const UNAVAILABLE: &[Code] = &[Code::Unavailable];
const INTERNAL: &[Code] = &[Code::Internal];
/// A reply cut by the server's close: a truncated reply (parse error) or a reset connection,
/// depending on whether the client had more to send when the server closed.
const CUT: &[Code] = &[Code::Unavailable, Code::Internal];

/// How long each hostile case is watched for connections piling up: more than one census cycle
/// (interval a quarter of it, plus the deadline).
const HOSTILE_WINDOW: Duration = Duration::from_secs(2);

/// The same, where the SDK retries a cut reply after a jittered backoff that may outlast the
/// deadline.
const CUT_RETRIED: &[Code] = &[Code::Unavailable, Code::DeadlineExceeded];

/// Every hostile case: what it stands in for, the server, the error codes it must give.
#[rustfmt::skip]
fn cases() -> Vec<(&'static str, Stand, Hostile, &'static [Code])> {
    use Hostile::*;
    use Stand::*;
    const JSON_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 9\r\n\r\nnot json!";
    const JSON_CUT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 200\r\n\r\n{\"QueueUrl\": \"http://127";
    const MGMT_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\nnot json!";
    const MGMT_CUT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"messages_unacknowledged\": 1";
    // connection.start: frame type 1, channel 0, size 500, class 10 method 10, version 0-9; cut.
    const START_CUT: &[u8] = b"\x01\x00\x00\x00\x00\x01\xf4\x00\x0a\x00\x0a\x00\x09";
    vec![
        ("redis: silent",                                Redis,      Silent,                                   DEADLINE_EXCEEDED),
        ("redis: garbage bytes",                         Redis,      Garbage(NOISE),                           INTERNAL),
        ("redis: +OK to every command (wrong type)",     Redis,      AnswerEachCommand(b"+OK\r\n"),             INTERNAL),
        ("redis: bulk length 99999999999, no data",      Redis,      AnswerEachCommand(b"$99999999999\r\n"),    DEADLINE_EXCEEDED),
        ("redis: half a bulk reply, then close",         Redis,      HalfThenClose(b"$5\r\nPO"),                CUT),
        ("amqp: silent",                                 Amqp,       Silent,                                   DEADLINE_EXCEEDED),
        ("amqp: garbage bytes",                          Amqp,       Garbage(NOISE),                           INTERNAL),
        ("amqp: protocol header of another version",     Amqp,       Answer(b"AMQP\x00\x00\x09\x00"),          INTERNAL),
        ("amqp: half a connection.start, then close",    Amqp,       HalfThenClose(START_CUT),                 UNAVAILABLE),
        ("sqs: silent",                                  Sqs,        Silent,                                   DEADLINE_EXCEEDED),
        ("sqs: garbage bytes",                           Sqs,        Garbage(NOISE),                           UNAVAILABLE),
        ("sqs: HTTP 200, body not JSON",                 Sqs,        Answer(JSON_200),                         INTERNAL),
        ("sqs: half a reply, then close",                Sqs,        HalfThenClose(JSON_CUT),                  CUT_RETRIED),
        ("management: silent",                           Management, Silent,                                   DEADLINE_EXCEEDED),
        ("management: garbage bytes",                    Management, Garbage(NOISE),                           UNAVAILABLE),
        ("management: HTTP 200, body not JSON",          Management, Answer(MGMT_200),                         INTERNAL),
        ("management: half a reply, then close",         Management, HalfThenClose(MGMT_CUT),                  CUT),
    ]
}

/// The length of the complete RESP command (an array of bulk strings) at the start of `b`.
fn resp_command_len(b: &[u8]) -> Option<usize> {
    // `<type><number>\r\n` at `at`: the number and where the next line starts.
    let line = |at: usize, kind: u8| -> Option<(usize, usize)> {
        if *b.get(at)? != kind {
            return None;
        }
        let end = at + b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    };
    let (count, mut at) = line(0, b'*')?;
    for _ in 0..count {
        let (len, data) = line(at, b'$')?;
        at = data + len + 2;
    }
    (at <= b.len()).then_some(at)
}

/// A hostile server on a free local port; counts the connections it holds open.
struct HostileServer {
    port: u16,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileServer {
    async fn start(behaviour: Hostile) -> HostileServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (o, a) = (open.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                conns.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    match behaviour {
                        Hostile::Silent => {
                            while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        Hostile::Garbage(bytes) => {
                            let _ = sock.write_all(bytes).await;
                            while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        Hostile::Answer(bytes) => {
                            while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {
                                if sock.write_all(bytes).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Hostile::AnswerEachCommand(bytes) => {
                            let mut pending = Vec::new();
                            while let Ok(n @ 1..) = sock.read(&mut buf).await {
                                pending.extend_from_slice(&buf[..n]);
                                while let Some(len) = resp_command_len(&pending) {
                                    pending.drain(..len);
                                    let _ = sock.write_all(bytes).await;
                                }
                            }
                        }
                        Hostile::HalfThenClose(bytes) => {
                            if matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {
                                let _ = sock.write_all(bytes).await;
                            }
                            let _ = sock.shutdown().await;
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        HostileServer {
            port,
            open,
            accepted,
            task,
        }
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every hostile case gives an error status of its expected kind within the deadline plus the
/// margin (no number, no hang, no panic), holds at most one connection open to the server once
/// settled, and leaves the scaler serving: GetMetricSpec, health, and a real broker reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_servers_are_errors_within_the_deadline() {
    count_foreign_panics();
    let hostile_settings = ServeSettings {
        census_interval: HOSTILE_WINDOW / 4,
        ..settings()
    };
    let scaler = Scaler::start_with(Default::default(), hostile_settings).await;
    let client = scaler.client().await;
    let mut health = HealthClient::new(scaler.channel().await);
    let mut rabbit: Option<(tokio::sync::MutexGuard<'static, ()>, Vhost)> = None;
    let mut report = Vec::new();
    for (name, stand, behaviour, codes) in cases() {
        let server = HostileServer::start(behaviour).await;
        let port = server.port;
        let m = match stand {
            Stand::Redis => meta(&[("brokerUrl", &format!("redis://127.0.0.1:{port}/0"))]),
            // AMQP only: the management API derived from this URL would be the real one.
            Stand::Amqp => meta(&[
                (
                    "brokerUrl",
                    &format!("amqp://guest:guest@127.0.0.1:{port}//"),
                ),
                ("scaleOnInFlight", "false"),
            ]),
            Stand::Sqs => meta(&[
                ("brokerUrl", "sqs://testing:testing@"),
                ("awsEndpoint", &format!("http://127.0.0.1:{port}")),
                ("awsRegion", "us-east-1"),
            ]),
            Stand::Management => {
                if rabbit.is_none() {
                    let guard = SHARED_RABBITMQ.lock().await;
                    let vhost = Vhost::create().await;
                    vhost.declare("celery").await;
                    rabbit = Some((guard, vhost));
                }
                let vhost = &rabbit.as_ref().unwrap().1;
                meta(&[
                    ("brokerUrl", &vhost.url()),
                    ("managementUrl", &format!("http://127.0.0.1:{port}")),
                ])
            }
        };
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let mut c = client.clone();
            let (r, took) = bounded(name, depth(&mut c, &m)).await;
            let e = match r {
                Ok(v) => panic!("{}: GetMetrics answered {v}", name),
                Err(e) => e,
            };
            assert!(codes.contains(&e.code()), "{}: GetMetrics: {e:?}", name);
            outcomes.push(format!(
                "GetMetrics {:?} in {} ms: {}",
                e.code(),
                ms(took),
                e.message()
            ));
            let (r, took) = bounded(name, active(&mut c, &m)).await;
            let e = match r {
                Ok(v) => panic!("{}: IsActive answered {v}", name),
                Err(e) => e,
            };
            assert!(codes.contains(&e.code()), "{}: IsActive: {e:?}", name);
            outcomes.push(format!("IsActive {:?} in {} ms", e.code(), ms(took)));
        }
        // Still serving: GetMetricSpec (no broker I/O) and health.
        let spec = client.clone().get_metric_spec(object_ref(&m)).await;
        assert!(
            spec.is_ok(),
            "{}: GetMetricSpec after the case: {spec:?}",
            name
        );
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{}", name);
        // No connection piles up at the server: after a window that spans a census cycle
        // (the census keeps trying in the background), at most one is held open.
        tokio::time::sleep(HOSTILE_WINDOW).await;
        let open = wait_for(
            &format!("{}: at most one connection held open", name),
            SETTLE,
            || {
                let n = server.open.load(Ordering::SeqCst);
                async move { (n <= 1).then_some(n) }
            },
        )
        .await;
        report.push(format!(
            "HOSTILE {}: {}; connections accepted {}, held open after {open}",
            name,
            outcomes.join("; "),
            server.accepted.load(Ordering::SeqCst)
        ));
    }
    // A real broker is still read normally.
    let real = meta(&[
        ("brokerUrl", &redis_url()),
        ("queues", &unique("after-hostile")),
    ]);
    assert_eq!(depth(&mut client.clone(), &real).await.unwrap(), 0);
    for line in &report {
        eprintln!("{line}");
    }
    if let Some((_guard, vhost)) = rabbit {
        vhost.delete().await;
    }
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::SeqCst),
        0,
        "panics outside the tests"
    );
}
