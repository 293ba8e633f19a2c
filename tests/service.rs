//! Protocol-level suite on a real Redis: metadata errors, broker failures within the deadline,
//! push on StreamIsActive, shared polls, health, reflection, graceful shutdown, named brokers,
//! and secrets kept out of logs, errors, metrics and `probe`.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::grpc::PUSH_REPEATS;
use celery_keda_scaler::proto::GetMetricsRequest;
use celery_keda_scaler::server::ServeSettings;
use common::*;
use tokio_stream::StreamExt;
use tonic::Code;

/// The services listed by reflection `$version` (`v1`, or `v1alpha` as Python's
/// grpcio-reflection, Evans and Postman ask), over `$channel`.
macro_rules! reflection_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            resp.next().await.unwrap().unwrap().message_response
        else {
            panic!(
                "expected a service list from reflection {}",
                stringify!($version)
            )
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<String>>()
    }};
}

/// A client-side bound: an RPC that takes longer than this is a hang.
const HANG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metadata_is_invalid_argument_naming_the_key_on_every_rpc() {
    let url = redis_url();
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![], "brokerUrl"),
        (vec![("brokerUrl", "kafka://x")], "brokerUrl"),
        (
            vec![("brokerUrl", &url), ("queueLength", "0")],
            "queueLength",
        ),
        (
            vec![("brokerUrl", &url), ("queueLength", "ten")],
            "queueLength",
        ),
        (
            vec![("brokerUrl", &url), ("activationQueueLength", "-1")],
            "activationQueueLength",
        ),
        (
            vec![("brokerUrl", &url), ("scaleOnInFlight", "yes")],
            "scaleOnInFlight",
        ),
        (
            vec![("brokerUrl", &url), ("scaleOnRunning", "2")],
            "scaleOnRunning",
        ),
        (vec![("brokerUrl", &url), ("queues", "a,,b")], "queues"),
        (
            vec![("brokerUrl", &url), ("metricName", "bad name")],
            "metricName",
        ),
        (
            vec![("brokerUrl", &url), ("prioritySteps", "0,x")],
            "prioritySteps",
        ),
        (vec![("brokerUrl", &url), ("separator", "\\z")], "separator"),
        (
            vec![("brokerUrl", "sentinel://127.0.0.1:1")],
            "sentinelMaster",
        ),
        (vec![("broker", "nope")], "broker"),
        (
            vec![("brokerUrlFromEnv", "redis://h/x")],
            "brokerUrlFromEnv",
        ),
    ];
    for (pairs, key) in cases {
        let m = meta(&pairs);
        let needle = format!("`{key}`");
        let spec = client.get_metric_spec(object_ref(&m)).await.unwrap_err();
        assert_eq!(spec.code(), Code::InvalidArgument, "{pairs:?}");
        assert!(
            spec.message().contains(&needle),
            "{pairs:?}: {}",
            spec.message()
        );
        let metrics = client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object_ref(&m)),
                metric_name: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(metrics.code(), Code::InvalidArgument);
        assert!(metrics.message().contains(&needle));
        let act = client.is_active(object_ref(&m)).await.unwrap_err();
        assert_eq!(act.code(), Code::InvalidArgument);
        let stream = client.stream_is_active(object_ref(&m)).await.unwrap_err();
        assert_eq!(stream.code(), Code::InvalidArgument);
    }
    // A misspelt key is suggested.
    let err = client
        .get_metric_spec(object_ref(&meta(&[("brokerurl", &url)])))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("did you mean `brokerUrl`"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_spec_answers_without_touching_the_broker() {
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let down = format!("redis://127.0.0.1:{}/0", free_port());
    let m = meta(&[
        ("brokerUrl", &down),
        ("queues", "orders,emails"),
        ("queueLength", "2.5"),
    ]);
    let spec = client
        .get_metric_spec(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let s = &spec.metric_specs[0];
    assert_eq!(s.metric_name, "celery-orders-emails");
    assert_eq!(s.target_size_float, 2.5);
    assert_eq!(s.target_size, 3);
    let spec = client
        .get_metric_spec(object_ref(&meta(&[
            ("brokerUrl", &down),
            ("metricName", "my-metric"),
        ])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "my-metric");
    assert_eq!(spec.metric_specs[0].target_size, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_broker_is_unavailable_never_zero() {
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[(
        "brokerUrl",
        &format!("redis://:pw-down@127.0.0.1:{}/0", free_port()),
    )]);
    let err = tokio::time::timeout(HANG, depth(&mut client, &m))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!err.message().contains("pw-down"));
    let err = tokio::time::timeout(HANG, active(&mut client, &m))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_broker_fails_within_the_deadline() {
    let (port, _) = silent_server().await;
    let settings = ServeSettings {
        deadline: Duration::from_millis(500),
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &format!("redis://127.0.0.1:{port}/0"))]);
    for _ in 0..2 {
        let started = Instant::now();
        let err = tokio::time::timeout(HANG, depth(&mut client, &m))
            .await
            .expect("no hang")
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(started.elapsed() < HANG);
    }
    let err = tokio::time::timeout(HANG, active(&mut client, &m))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_and_default_brokers_come_from_the_scaler_environment() {
    let url = redis_url();
    let q = unique("named");
    CeleryConf::new(&url).publish(&q, &["--count", "3"]);
    let env = BrokerEnv::from_vars([
        ("CELERY_KEDA_BROKER_MAIN_REDIS".to_string(), url.clone()),
        ("CELERY_BROKER_URL".to_string(), url.clone()),
    ])
    .unwrap();
    let scaler = Scaler::start_with(env, ServeSettings::default()).await;
    let mut client = scaler.client().await;
    assert_eq!(
        depth(
            &mut client,
            &meta(&[("broker", "main-redis"), ("queues", &q)])
        )
        .await
        .unwrap(),
        3
    );
    assert_eq!(
        depth(&mut client, &meta(&[("queues", &q)])).await.unwrap(),
        3
    );
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_per_distinct_broker() {
    use celery_keda_scaler::metrics::Metrics;
    use celery_keda_scaler::scaler::{Core, CoreSettings};
    use std::sync::Arc;
    let url = redis_url();
    let core = Core::new(
        BrokerEnv::default(),
        CoreSettings::with_deadline(Duration::from_secs(2)),
        Arc::new(Metrics::new()),
    );
    for i in 0..50 {
        let q = format!("{}-{i}", unique("fleet"));
        let t = core
            .trigger(&meta(&[("brokerUrl", &url), ("queues", &q)]), "default")
            .unwrap();
        assert_eq!(core.read(&t.query).await.unwrap().total(), 0);
    }
    assert_eq!(core.broker_clients(), 1);
    let other_db = format!("{}/5", url.trim_end_matches('/'));
    let t = core
        .trigger(&meta(&[("brokerUrl", &other_db)]), "default")
        .unwrap();
    core.read(&t.query).await.unwrap();
    assert_eq!(core.broker_clients(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_true_on_activation_then_a_bounded_number_of_repeats() {
    let url = redis_url();
    let q = unique("push");
    let conf = CeleryConf::new(&url);
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &url), ("queues", &q)]);
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();

    // Empty queue: nothing is pushed.
    assert!(
        tokio::time::timeout(Duration::from_millis(600), stream.next())
            .await
            .is_err()
    );

    conf.publish(&q, &["--count", "1"]);
    let published = Instant::now();
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a push after the first task")
        .expect("stream open")
        .expect("no error");
    let latency = published.elapsed();
    assert!(msg.result);
    assert!(latency < Duration::from_secs(1), "pushed after {latency:?}");

    // Still active: the activation is repeated PUSH_REPEATS.len() times (KEDA drops a push that
    // arrives before the ScaledObject's metric names are in its status), then nothing more.
    conf.publish(&q, &["--count", "3"]);
    let all_repeats: Duration = PUSH_REPEATS.iter().sum();
    for i in 0..PUSH_REPEATS.len() {
        let repeat = tokio::time::timeout(all_repeats + Duration::from_secs(2), stream.next())
            .await
            .unwrap_or_else(|_| panic!("repeat {i} of the activation"))
            .expect("stream open")
            .expect("no error");
        assert!(repeat.result);
    }
    assert!(tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .is_err());

    // A stream opened while active gets `true` at once.
    let mut second = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), second.next())
        .await
        .expect("immediate push");
    assert!(first.unwrap().unwrap().result);

    // Inactive again, then active again: pushed again.
    cleanup_redis(&url, "", &[&q]).await;
    wait_for("inactive", Duration::from_secs(10), || {
        let mut client = client.clone();
        let m = m.clone();
        async move { (!active(&mut client, &m).await.ok()?).then_some(()) }
    })
    .await;
    conf.publish(&q, &["--count", "1"]);
    let again = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("pushed again");
    assert!(again.unwrap().unwrap().result);
    cleanup_redis(&url, "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_one_poll_per_query_and_polls_stop_when_watchers_leave() {
    let url = redis_url();
    let (a, b) = (unique("share-a"), unique("share-b"));
    let scaler = Scaler::start().await;
    let channel = scaler.channel().await;
    let mut streams = Vec::new();
    for i in 0..25 {
        let mut client =
            celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient::new(
                channel.clone(),
            );
        let q = if i < 20 { &a } else { &b };
        // Different activation thresholds still share the poll: it reads depth, not activity.
        let threshold = (i % 3).to_string();
        let m = meta(&[
            ("brokerUrl", &url),
            ("queues", q),
            ("activationQueueLength", &threshold),
        ]);
        streams.push(
            client
                .stream_is_active(object_ref(&m))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    wait_for(
        "25 streams over 2 polls",
        Duration::from_secs(10),
        || async {
            let polls = scaler.metric("celery_keda_shared_polls ").await?;
            let open = scaler.metric("celery_keda_streams ").await?;
            (polls == 2.0 && open == 25.0).then_some(())
        },
    )
    .await;
    drop(streams);
    wait_for("no polls left", Duration::from_secs(10), || async {
        let polls = scaler.metric("celery_keda_shared_polls ").await?;
        let open = scaler.metric("celery_keda_streams ").await?;
        (polls == 0.0 && open == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_with_ok() {
    let url = redis_url();
    let scaler = Scaler::start().await;
    let mut client = scaler.client().await;
    let m = meta(&[("brokerUrl", &url), ("queues", &unique("shut"))]);
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let (_, ready) = scaler.admin_get("/readyz").await;
    assert_eq!(ready, "ready\n");
    scaler.stop().await;
    let end = tokio::time::timeout(HANG, stream.message())
        .await
        .expect("stream ends");
    assert!(
        matches!(end, Ok(None)),
        "stream must end with status OK, got {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_admin_endpoints() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let scaler = Scaler::start().await;
    let mut health = HealthClient::new(scaler.channel().await);
    for service in ["", "externalscaler.ExternalScaler"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }

    // Both reflection versions list the same services.
    let channel = scaler.channel().await;
    for names in [
        reflection_services!(v1, channel.clone()),
        reflection_services!(v1alpha, channel),
    ] {
        for service in [
            "externalscaler.ExternalScaler",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(names.contains(&service.to_string()), "{service}: {names:?}");
        }
    }

    let mut client = scaler.client().await;
    let err = client
        .stream_metric_spec(object_ref(&meta(&[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    let (status, body) = scaler.admin_get("/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "ok\n");
    let (status, _) = scaler.admin_get("/metrics").await;
    assert!(status.contains("200"));
}

/// Runs the real binary at the most verbose log level, drives every error path with passwords
/// in play, and checks that no password shows in logs, errors, `/metrics` or `probe` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_show_in_logs_errors_metrics_or_probe() {
    let server_pw = "SrvPw-7f3a9";
    let wrong_pw = "WrongPw-1c2d3";
    let env_pw = "EnvPw-55aa1";
    let sentinel_pw = "SentPw-9911";
    let secrets = [server_pw, wrong_pw, env_pw, sentinel_pw];
    let server = OwnRedis::start(Some(server_pw), None);
    let q = unique("secret");
    CeleryConf::new(&server.url(Some(server_pw))).publish(&q, &["--count", "2"]);

    let (port, admin) = (free_port(), free_port());
    let mut child = serve_command(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{admin}"))
        .env("RUST_LOG", "trace")
        .env(
            "CELERY_KEDA_BROKER_ENVBROKER",
            format!("redis://:{server_pw}@127.0.0.1:{}/0", server.port),
        )
        .env(
            "CELERY_KEDA_BROKER_BADENV",
            format!("redis://:{env_pw}@127.0.0.1:{}/0", server.port),
        )
        .env("CELERY_KEDA_DEADLINE", "1s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    wait_for("the scaler listens", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient::new(channel);

    let mut errors = Vec::new();
    let good = meta(&[("brokerUrl", &server.url(Some(server_pw))), ("queues", &q)]);
    assert_eq!(depth(&mut client, &good).await.unwrap(), 2);
    assert_eq!(
        depth(
            &mut client,
            &meta(&[("broker", "envbroker"), ("queues", &q)])
        )
        .await
        .unwrap(),
        2
    );
    let cases = [
        meta(&[("broker", "badenv"), ("queues", &q)]),
        meta(&[("brokerUrl", &server.url(Some(wrong_pw))), ("queues", &q)]),
        meta(&[(
            "brokerUrl",
            &format!("redis://u:{wrong_pw}@127.0.0.1:{}/0", free_port()),
        )]),
        meta(&[(
            "brokerUrl",
            &format!("redis://:{wrong_pw}@127.0.0.1/notadb"),
        )]),
        meta(&[("brokerUrl", &format!("bogus://:{wrong_pw}@h"))]),
        meta(&[
            (
                "brokerUrl",
                &format!("sentinel://:{sentinel_pw}@127.0.0.1:{}", free_port()),
            ),
            ("sentinelMaster", "m"),
        ]),
        meta(&[
            ("brokerUrlFromEnv", &format!("redis://:{wrong_pw}@[::1")),
            ("queues", "x"),
        ]),
    ];
    for m in &cases {
        let err = depth(&mut client, m).await.unwrap_err();
        errors.push(format!("{:?} {}", err.code(), err.message()));
        let mut stream = client.stream_is_active(object_ref(m)).await;
        if let Ok(s) = &mut stream {
            let _ = tokio::time::timeout(Duration::from_millis(300), s.get_mut().next()).await;
        }
    }
    let metrics = {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    };
    assert!(metrics.contains("celery_keda_rpc_total"), "{metrics}");

    let probe = probe_command(&[("brokerUrl", &server.url(Some(wrong_pw))), ("queues", &q)])
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let probe_text = format!(
        "{}{}",
        String::from_utf8_lossy(&probe.stdout),
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(!probe.status.success());
    assert!(probe_text.contains("Unauthenticated"), "{probe_text}");

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit, got {status:?}");
    let logs = log.join().unwrap();
    assert!(
        logs.contains("Depth reading failed"),
        "the errors were logged"
    );
    for secret in secrets {
        for (what, text) in [
            ("logs", &logs),
            ("metrics", &metrics),
            ("probe", &probe_text),
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {what}");
        }
        for e in &errors {
            assert!(!e.contains(secret), "{secret} leaked into error {e}");
        }
    }
}

/// N identical requests that arrive while a reading is under way share it: one connection
/// attempt and one failure, seen by all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_requests_share_one_broker_reading() {
    use std::sync::atomic::Ordering;
    let (port, accepted) = silent_server().await;
    let settings = ServeSettings {
        deadline: Duration::from_secs(1),
        result_window: Duration::ZERO,
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let channel = scaler.channel().await;
    let m = meta(&[
        ("brokerUrl", &format!("redis://127.0.0.1:{port}/0")),
        ("queues", "a,b"),
    ]);
    let calls = (0..50).map(|_| {
        let mut client =
            celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient::new(
                channel.clone(),
            );
        let m = m.clone();
        async move { depth(&mut client, &m).await }
    });
    let results = futures::future::join_all(calls).await;
    for r in &results {
        assert_eq!(
            r.as_ref().unwrap_err().code(),
            Code::DeadlineExceeded,
            "{r:?}"
        );
    }
    let failures = scaler
        .metric("celery_keda_broker_errors_total{broker=\"redis\",kind=\"deadline_exceeded\"}")
        .await;
    assert_eq!(
        failures,
        Some(1.0),
        "one shared reading for 50 identical requests"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection to the broker"
    );
}

/// Within the result window, repeated polls of the same queues are answered without the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_window_absorbs_repeated_polls() {
    let url = redis_url();
    let (a, b) = (unique("win-a"), unique("win-b"));
    CeleryConf::new(&url).publish(&a, &["--count", "2"]);
    let settings = ServeSettings {
        result_window: Duration::from_secs(30),
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(BrokerEnv::default(), settings).await;
    let mut client = scaler.client().await;
    let reads =
        || scaler.metric("celery_keda_broker_read_duration_seconds_count{broker=\"redis\"}");
    for _ in 0..20 {
        // Different ScaledObjects (metric names) watching the same queues share the reading.
        let name = unique("so");
        let m = meta(&[("brokerUrl", &url), ("queues", &a), ("metricName", &name)]);
        assert_eq!(depth(&mut client, &m).await.unwrap(), 2);
        assert!(active(&mut client, &m).await.unwrap());
    }
    assert_eq!(reads().await, Some(1.0));
    assert_eq!(
        depth(&mut client, &meta(&[("brokerUrl", &url), ("queues", &b)]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(reads().await, Some(2.0));
    let (_, rpcs) = scaler.admin_get("/metrics").await;
    assert!(
        rpcs.contains("celery_keda_rpc_total{method=\"GetMetrics\",code=\"OK\"} 21"),
        "{rpcs}"
    );
    cleanup_redis(&url, "", &[&a]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flips_health_ends_streams_and_lets_inflight_rpcs_finish() {
    // A broker that accepts and never answers: a GetMetrics on it is in flight for the deadline.
    let (hang_port, _) = silent_server().await;
    let scaler = ScalerProcess::spawn(
        &["--deadline", "2s", "--shutdown-grace", "8s"],
        &[],
        &["CELERY_BROKER_URL"],
    )
    .await;
    let mut client = scaler.client().await;
    // Health is watched over a connection of its own, as a kubelet probe has.
    let mut health = tonic_health::pb::health_client::HealthClient::new(scaler.channel().await);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "externalscaler.ExternalScaler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
    let m = meta(&[("brokerUrl", &redis_url()), ("queues", &unique("term"))]);
    let mut stream = client
        .stream_is_active(object_ref(&m))
        .await
        .unwrap()
        .into_inner();
    let hanging = meta(&[("brokerUrl", &format!("redis://127.0.0.1:{hang_port}/0"))]);
    let mut inflight_client = client.clone();
    let inflight = tokio::spawn(async move {
        let started = Instant::now();
        let r = inflight_client.is_active(object_ref(&hanging)).await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    let pid = scaler.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Health reports NOT_SERVING to watchers.
    let next = tokio::time::timeout(HANG, watch.message())
        .await
        .expect("health update");
    assert_eq!(
        next.unwrap().unwrap().status,
        2,
        "NOT_SERVING after SIGTERM"
    );
    // The open stream ends with status OK.
    let end = tokio::time::timeout(HANG, stream.message())
        .await
        .expect("stream ends");
    assert!(
        matches!(end, Ok(None)),
        "stream must end with OK, got {end:?}"
    );
    // The RPC in flight is answered (its own deadline), not cut off.
    let (r, took) = inflight.await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    // And the process exits 0 within the grace period (`terminate` only collects the exit).
    let exit = scaler.terminate();
    assert!(exit.status.success(), "{:?}", exit.status);
    assert!(
        sent.elapsed() < Duration::from_secs(8),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn inconsistent_flags_exit_2_before_binding() {
    let out = serve_command("127.0.0.1:0", "127.0.0.1:0")
        .args(["--deadline", "1s", "--census-window", "1s"])
        .env_remove("CELERY_BROKER_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: --census-window (1s) must be shorter than --deadline (1s)"),
        "{stderr}"
    );
}
