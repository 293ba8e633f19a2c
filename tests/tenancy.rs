//! Tenancy over real gRPC against real Redis, RabbitMQ and moto: named brokers kept to their
//! namespaces, the broker host allowlist (names, globs, ports, address ranges checked on what a
//! name resolves to, masters a real Sentinel reports, first and after a failover), inline URLs
//! turned off, and the scaler's AWS identity lent only to named brokers. Every refusal is
//! PERMISSION_DENIED from every RPC (a Sentinel-reported master: from every reading), names the
//! key, host or broker and the namespace, holds no secret, is counted by reason, and opens no
//! connection to the refused host (a counting listener stays at zero; a refused master's
//! `total_connections_received` does not move); allowed triggers keep their exact depths.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::GetMetricsRequest;
use celery_keda_scaler::server::ServeSettings;
use celery_keda_scaler::tenancy::Tenancy;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

use common::object_ref_in as so;

/// GetMetricSpec then GetMetrics (and IsActive) for a ScaledObject in `namespace`.
async fn read(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    m: &HashMap<String, String>,
) -> Result<i64, tonic::Status> {
    let v = depth_in(client, namespace, m).await?;
    let active = client
        .is_active(so(namespace, m))
        .await?
        .into_inner()
        .result;
    assert_eq!(active, v > 0);
    Ok(v)
}

fn check_status(what: &str, s: &tonic::Status, needles: &[&str], secrets: &[&str]) {
    assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    for n in needles {
        assert!(
            s.message().contains(n),
            "{what}: `{n}` missing in: {}",
            s.message()
        );
    }
    for secret in secrets {
        assert!(
            !s.message().contains(secret),
            "{what}: secret in: {}",
            s.message()
        );
    }
}

/// Every RPC refuses `m` from `namespace`; `GetMetricSpec` too unless `spec_answers` (a name
/// that only an address range admits needs DNS, which GetMetricSpec never does). Returns the
/// number of refusals the scaler counted.
async fn refused(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    m: &HashMap<String, String>,
    spec_answers: bool,
    needles: &[&str],
    secrets: &[&str],
) -> u64 {
    let spec = client.get_metric_spec(so(namespace, m)).await;
    if spec_answers {
        assert!(
            spec.is_ok(),
            "GetMetricSpec must answer without DNS: {spec:?}"
        );
    } else {
        check_status("GetMetricSpec", &spec.unwrap_err(), needles, secrets);
    }
    refused_readings(client, namespace, m, needles, secrets).await;
    let s = client.stream_is_active(so(namespace, m)).await.unwrap_err();
    check_status("StreamIsActive", &s, needles, secrets);
    if spec_answers {
        3
    } else {
        4
    }
}

/// GetMetrics and IsActive both refuse `m` from `namespace`.
async fn refused_readings(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    m: &HashMap<String, String>,
    needles: &[&str],
    secrets: &[&str],
) {
    let s = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(so(namespace, m)),
            metric_name: "x".into(),
        })
        .await
        .unwrap_err();
    check_status("GetMetrics", &s, needles, secrets);
    let s = client.is_active(so(namespace, m)).await.unwrap_err();
    check_status("IsActive", &s, needles, secrets);
}

fn redis_port() -> u16 {
    url::Url::parse(&redis_url())
        .unwrap()
        .port()
        .unwrap_or(6379)
}

fn env(vars: &[(&str, &str)]) -> BrokerEnv {
    BrokerEnv::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
}

fn allowlist(text: &str) -> ServeSettings {
    ServeSettings {
        tenancy: Tenancy {
            allowed_hosts: Some(text.parse().unwrap()),
            ..Tenancy::default()
        },
        ..ServeSettings::default()
    }
}

async fn refusals(scaler: &Scaler, reason: &str) -> u64 {
    scaler
        .metric(&format!(
            "celery_keda_refusals_total{{reason=\"{reason}\"}}"
        ))
        .await
        .unwrap_or_else(|| panic!("no refusals series for {reason}")) as u64
}

/// Publishes `n` tasks with real Celery to a unique queue on the suite's Redis.
fn redis_queue(n: u64) -> String {
    let q = unique("ten");
    assert_eq!(
        CeleryConf::new(&redis_url()).publish(&q, &["--count", &n.to_string()]),
        n
    );
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_brokers_are_kept_to_their_namespaces() {
    let q = redis_queue(3);
    let (silent, accepted) = silent_server().await;
    let team_b = format!("redis://:TeamBSecret42@127.0.0.1:{silent}/0");
    let env = env(&[
        ("CELERY_KEDA_BROKER_TEAM_A", &redis_url()),
        ("CELERY_KEDA_NAMESPACES_TEAM_A", "team-a, ops-*"),
        ("CELERY_KEDA_BROKER_TEAM_B", &team_b),
        ("CELERY_KEDA_NAMESPACES_TEAM_B", "team-b"),
        ("CELERY_KEDA_BROKER_SHARED", &redis_url()),
    ]);
    let scaler = Scaler::start_with(env, ServeSettings::default()).await;
    let mut client = scaler.client().await;
    let named = |b: &str| meta(&[("broker", b), ("queues", &q), ("scaleOnRunning", "false")]);

    assert_eq!(
        read(&mut client, "team-a", &named("team-a")).await.unwrap(),
        3
    );
    assert_eq!(
        read(&mut client, "ops-eu", &named("Team_A")).await.unwrap(),
        3
    );
    // A broker without a list is open to every namespace, as before.
    assert_eq!(
        read(&mut client, "team-b", &named("shared")).await.unwrap(),
        3
    );

    let mut n = 0;
    n += refused(
        &mut client,
        "team-b",
        &named("team-a"),
        false,
        &[
            "`broker`",
            "`team-a`",
            "namespace `team-b`",
            "CELERY_KEDA_NAMESPACES_TEAM_A",
        ],
        &[],
    )
    .await;
    n += refused(
        &mut client,
        "team-a",
        &named("team-b"),
        false,
        &["`team-b`", "namespace `team-a`"],
        &["TeamBSecret42"],
    )
    .await;
    n += refused(
        &mut client,
        "",
        &named("team-b"),
        false,
        &["(none given)"],
        &[],
    )
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    assert_eq!(refusals(&scaler, "namespace").await, n);
    assert_eq!(refusals(&scaler, "host").await, 0);

    // A list for a broker that does not exist is a configuration error naming the variable.
    let err = BrokerEnv::from_vars([(
        "CELERY_KEDA_NAMESPACES_NOPE".to_string(),
        "team-a".to_string(),
    )])
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("CELERY_KEDA_NAMESPACES_NOPE"),
        "{err}"
    );
    scaler.stop().await;
    cleanup_redis(&redis_url(), "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_allowlist_admits_names_globs_and_ports_only() {
    let q = redis_queue(3);
    let vhost = Vhost::create().await;
    let rq = unique("tenq");
    assert_eq!(
        CeleryConf::new(&vhost.url()).publish(&rq, &["--count", "2"]),
        2
    );
    let prefix = format!("{}-", unique("ten"));
    let mut sqs_conf = CeleryConf::new(&sqs_broker_url());
    sqs_conf.queue_name_prefix = Some(prefix.clone());
    assert_eq!(sqs_conf.publish("celery", &["--count", "4"]), 4);
    let (_, moto_port) = sqs_endpoint();
    let (_, amqp_port) = amqp_base();
    let mgmt_port = url::Url::parse(&management_base())
        .unwrap()
        .port()
        .unwrap_or(15672);
    let (silent, accepted) = silent_server().await;

    // Name rules only, so no name is ever looked up in DNS here (address rules are the next test).
    let rules = format!(
        "localhost:{}, localhost:{amqp_port}, localhost:{mgmt_port}, localhost:{moto_port}, *.team-a.svc.cluster.local",
        redis_port(),
    );
    // The named broker's host is not on the list: the operator chose it.
    let named_rabbit = format!("amqp://guest:guest@127.0.0.1:{amqp_port}/{}", vhost.name);
    let env = env(&[
        (
            "CELERY_KEDA_BROKER_OPS",
            &format!("redis://127.0.0.1:{}/0", redis_port()),
        ),
        ("CELERY_KEDA_BROKER_RMQ", &named_rabbit),
    ]);
    let scaler = Scaler::start_with(env, allowlist(&rules)).await;
    let mut client = scaler.client().await;
    let no_run = ("scaleOnRunning", "false");

    let redis = meta(&[
        (
            "brokerUrl",
            &format!("redis://localhost:{}/0", redis_port()),
        ),
        ("queues", &q),
        no_run,
    ]);
    assert_eq!(read(&mut client, "team-a", &redis).await.unwrap(), 3);
    let named = meta(&[("broker", "ops"), ("queues", &q), no_run]);
    assert_eq!(read(&mut client, "team-a", &named).await.unwrap(), 3);
    let rabbit_url = format!("amqp://guest:guest@localhost:{amqp_port}/{}", vhost.name);
    let rabbit = meta(&[("brokerUrl", &rabbit_url), ("queues", &rq), no_run]);
    assert_eq!(read(&mut client, "team-a", &rabbit).await.unwrap(), 2);
    // Its management API (derived: 127.0.0.1:15672) is the operator's choice too.
    let rabbit = meta(&[("broker", "rmq"), ("queues", &rq), no_run]);
    assert_eq!(read(&mut client, "team-a", &rabbit).await.unwrap(), 2);
    let sqs = meta(&[
        (
            "brokerUrl",
            &format!("sqs://testing:testing@localhost:{moto_port}"),
        ),
        ("queueNamePrefix", &prefix),
    ]);
    assert_eq!(read(&mut client, "team-a", &sqs).await.unwrap(), 4);
    // A name under the glob passes the allowlist (GetMetricSpec needs no DNS for it).
    let glob = meta(&[("brokerUrl", "redis://r.team-a.svc.cluster.local:6379/0")]);
    client.get_metric_spec(so("team-a", &glob)).await.unwrap();

    let local = |path: &str| format!("127.0.0.1:{silent}{path}");
    let cases: Vec<(HashMap<String, String>, Vec<String>, &str)> = vec![
        (
            meta(&[("brokerUrl", &format!("redis://localhost:{silent}/0"))]),
            vec!["`brokerUrl`".into(), format!("`localhost:{silent}`")],
            "",
        ),
        (
            meta(&[("brokerUrl", &format!("redis://:RedisPw77@{}/0", local("")))]),
            vec![format!("`{}`", local(""))],
            "RedisPw77",
        ),
        (
            meta(&[(
                "brokerUrlFromEnv",
                "amqp://guest:AmqpPw88@evil.team-b.svc:5672//",
            )]),
            vec!["`brokerUrlFromEnv`".into(), "`evil.team-b.svc:5672`".into()],
            "AmqpPw88",
        ),
        (
            meta(&[("brokerUrl", "redis://r.team-b.svc.cluster.local:6379/0")]),
            vec!["`r.team-b.svc.cluster.local:6379`".into()],
            "",
        ),
        (
            meta(&[
                (
                    "brokerUrl",
                    &format!(
                        "sentinel://:SentPw33@localhost:{};sentinel://{}",
                        redis_port(),
                        local("")
                    ),
                ),
                ("sentinelMaster", "mymaster"),
            ]),
            vec![format!("`{}`", local(""))],
            "SentPw33",
        ),
        (
            meta(&[
                ("brokerUrl", &rabbit_url),
                (
                    "managementUrl",
                    &format!("http://mgmt:MgmtPw99@{}", local("/")),
                ),
            ]),
            vec!["`managementUrl`".into(), format!("`{}`", local(""))],
            "MgmtPw99",
        ),
        (
            meta(&[
                ("brokerUrl", "sqs://AKIATEST:SqsPw11@"),
                ("awsEndpoint", &format!("http://{}", local(""))),
            ]),
            vec!["`awsEndpoint`".into(), format!("`{}`", local(""))],
            "SqsPw11",
        ),
        (
            // A named broker's own host is exempt; a management API given in metadata is not.
            meta(&[
                ("broker", "rmq"),
                ("managementUrl", &format!("http://{}", local("/"))),
            ]),
            vec!["`managementUrl`".into()],
            "",
        ),
        (
            meta(&[("brokerUrl", "redis+socket:///tmp/cks-none.sock")]),
            vec!["Unix socket".into()],
            "",
        ),
    ];
    let mut n = 0;
    for (m, needles, secret) in &cases {
        let mut needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        needles.push("namespace `team-b`");
        needles.push("--allowed-broker-hosts");
        let secrets: Vec<&str> = [*secret].into_iter().filter(|s| !s.is_empty()).collect();
        n += refused(&mut client, "team-b", m, false, &needles, &secrets).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    assert_eq!(refusals(&scaler, "host").await, n);
    scaler.stop().await;
    vhost.delete().await;
    cleanup_redis(&redis_url(), "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_ranges_check_what_a_name_resolves_to() {
    let q = redis_queue(5);
    let vhost = Vhost::create().await;
    let rq = unique("tenq");
    assert_eq!(
        CeleryConf::new(&vhost.url()).publish(&rq, &["--count", "2"]),
        2
    );
    let (_, amqp_port) = amqp_base();
    let (_, moto_port) = sqs_endpoint();
    let prefix = format!("{}-", unique("ten"));
    let mut sqs_conf = CeleryConf::new(&sqs_broker_url());
    sqs_conf.queue_name_prefix = Some(prefix.clone());
    assert_eq!(sqs_conf.publish("celery", &["--count", "3"]), 3);
    let (silent, accepted) = silent_server().await;

    // `localhost` resolves to 127.0.0.1: outside these ranges.
    let scaler = Scaler::start_with(BrokerEnv::default(), allowlist("10.0.0.0/8, fd00::/8")).await;
    let mut client = scaler.client().await;
    let by_name = meta(&[("brokerUrl", &format!("redis://localhost:{silent}/0"))]);
    let n = refused(
        &mut client,
        "team-b",
        &by_name,
        true,
        &[
            "`brokerUrl`",
            "`localhost`",
            "127.0.0.1",
            "namespace `team-b`",
        ],
        &[],
    )
    .await;
    let by_address = meta(&[("brokerUrl", &format!("redis://127.0.0.1:{silent}/0"))]);
    let m = refused(
        &mut client,
        "team-b",
        &by_address,
        false,
        &["127.0.0.1"],
        &[],
    )
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    assert_eq!(refusals(&scaler, "address").await, n);
    assert_eq!(refusals(&scaler, "host").await, m);
    scaler.stop().await;

    // Inside the range: the name is resolved, checked, and the scaler connects to that address.
    let scaler = Scaler::start_with(BrokerEnv::default(), allowlist("127.0.0.0/8")).await;
    let mut client = scaler.client().await;
    let redis = meta(&[
        (
            "brokerUrl",
            &format!("redis://localhost:{}/0", redis_port()),
        ),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(read(&mut client, "team-a", &redis).await.unwrap(), 5);
    let rabbit = meta(&[
        (
            "brokerUrl",
            &format!("amqp://guest:guest@localhost:{amqp_port}/{}", vhost.name),
        ),
        ("queues", &rq),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(read(&mut client, "team-a", &rabbit).await.unwrap(), 2);
    let sqs = meta(&[
        (
            "brokerUrl",
            &format!("sqs://testing:testing@localhost:{moto_port}"),
        ),
        ("queueNamePrefix", &prefix),
    ]);
    assert_eq!(read(&mut client, "team-a", &sqs).await.unwrap(), 3);
    // A TLS host needs a name rule: its certificate names it, so it cannot be pinned.
    let tls = meta(&[("brokerUrl", &format!("rediss://localhost:{silent}/0"))]);
    refused(
        &mut client,
        "team-a",
        &tls,
        false,
        &["TLS", "`localhost:"],
        &[],
    )
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    scaler.stop().await;
    vhost.delete().await;
    cleanup_redis(&redis_url(), "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_urls_can_be_turned_off() {
    let q = redis_queue(2);
    let (silent, accepted) = silent_server().await;
    let env = env(&[
        ("CELERY_KEDA_BROKER_TEAM", &redis_url()),
        ("CELERY_BROKER_URL", &redis_url()),
    ]);
    let settings = ServeSettings {
        tenancy: Tenancy {
            named_brokers_only: true,
            ..Tenancy::default()
        },
        ..ServeSettings::default()
    };
    let scaler = Scaler::start_with(env, settings).await;
    let mut client = scaler.client().await;
    let no_run = ("scaleOnRunning", "false");
    assert_eq!(
        read(
            &mut client,
            "team-a",
            &meta(&[("broker", "team"), ("queues", &q), no_run])
        )
        .await
        .unwrap(),
        2
    );
    assert_eq!(
        read(&mut client, "team-a", &meta(&[("queues", &q), no_run]))
            .await
            .unwrap(),
        2,
        "the default broker stays"
    );
    let url = format!("redis://:InlinePw5@127.0.0.1:{silent}/0");
    let mut n = 0;
    for (key, value) in [
        ("brokerUrl", url.as_str()),
        ("brokerUrlFromEnv", url.as_str()),
        // Refused before the URL is even parsed.
        ("brokerUrl", "redis://:InlinePw5@h/notadb"),
    ] {
        n += refused(
            &mut client,
            "team-a",
            &meta(&[(key, value), ("broker", "team")]),
            false,
            &[
                &format!("`{key}`"),
                "broker: <name>",
                "CELERY_KEDA_BROKER_<NAME>",
                "namespace `team-a`",
            ],
            &["InlinePw5"],
        )
        .await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    assert_eq!(refusals(&scaler, "inline_url").await, n);
    scaler.stop().await;
    cleanup_redis(&redis_url(), "", &[&q]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scalers_aws_identity_is_lent_only_to_named_brokers() {
    let (moto_host, moto_port) = sqs_endpoint();
    let prefix = format!("{}-", unique("ten"));
    let mut conf = CeleryConf::new(&sqs_broker_url());
    conf.queue_name_prefix = Some(prefix.clone());
    assert_eq!(conf.publish("celery", &["--count", "3"]), 3);
    let (silent, accepted) = silent_server().await;
    let named = format!("sqs://{moto_host}:{moto_port}");
    let aws = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "AwsAmbientSecret9"),
        ("AWS_REGION", "us-east-1"),
        ("CELERY_KEDA_BROKER_SQS", named.as_str()),
    ];
    let remove = ["CELERY_BROKER_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"];
    let scaler = ScalerProcess::spawn(&[], &aws, &remove).await;
    let mut client = scaler.client().await;
    let by_name = meta(&[("broker", "sqs"), ("queueNamePrefix", &prefix)]);
    assert_eq!(read(&mut client, "team-a", &by_name).await.unwrap(), 3);
    let silent_endpoint = format!("http://127.0.0.1:{silent}");
    let silent_host = format!("sqs://127.0.0.1:{silent}");
    let mut n = 0;
    for m in [
        meta(&[("brokerUrl", "sqs://"), ("awsEndpoint", &silent_endpoint)]),
        meta(&[("brokerUrlFromEnv", &silent_host)]),
    ] {
        n += refused(
            &mut client,
            "team-b",
            &m,
            false,
            &[
                "AWS identity",
                "named broker",
                "--inline-sqs-ambient-identity",
                "namespace `team-b`",
            ],
            &["AwsAmbientSecret9"],
        )
        .await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused trigger connected"
    );
    let metrics = scaler.metrics_text().await;
    assert_eq!(
        metric_in(
            &metrics,
            "celery_keda_refusals_total{reason=\"ambient_identity\"}"
        ),
        Some(n as f64)
    );
    let exit = scaler.terminate();
    let lines: Vec<&str> = exit
        .stderr
        .lines()
        .chain(exit.stdout.lines())
        .filter(|l| l.contains("Tenancy protections"))
        .collect();
    assert_eq!(lines.len(), 1, "one start-up line: {}", exit.stderr);
    assert!(
        lines[0].contains("inline sqs:// may not use the scaler's AWS identity"),
        "{}",
        lines[0]
    );

    // The setting lends it to inline triggers too.
    let scaler = ScalerProcess::spawn(&["--inline-sqs-ambient-identity"], &aws, &remove).await;
    let mut client = scaler.client().await;
    let inline = meta(&[
        ("brokerUrl", "sqs://"),
        ("awsEndpoint", &format!("http://{moto_host}:{moto_port}")),
        ("queueNamePrefix", &prefix),
    ]);
    assert_eq!(read(&mut client, "team-b", &inline).await.unwrap(), 3);
    assert!(scaler.terminate().status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_checks_as_a_namespace_and_bad_settings_stop_the_scaler() {
    let q = redis_queue(4);
    let probe = |args: &[&str]| {
        let out = binary()
            .arg("probe")
            .args(args)
            .env("CELERY_KEDA_BROKER_TEAM_A", redis_url())
            .env("CELERY_KEDA_NAMESPACES_TEAM_A", "team-a")
            .env("CELERY_KEDA_ALLOWED_BROKER_HOSTS", "redis.team-a.svc")
            .env_remove("CELERY_BROKER_URL")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let queues = format!("queues={q}");
    let (code, out, err) = probe(&[
        "--namespace",
        "team-a",
        "broker=team-a",
        &queues,
        "scaleOnRunning=false",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("depth        4"), "{out}");
    assert!(out.contains("namespace    team-a"), "{out}");
    let (code, out, _) = probe(&[
        "broker=team-a",
        &queues,
        "--namespace",
        "team-a",
        "scaleOnRunning=false",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("depth        4"), "{out}");
    let (code, _, err) = probe(&["--namespace", "team-b", "broker=team-a", &queues]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("PermissionDenied") && err.contains("namespace `team-b`"),
        "{err}"
    );
    let (code, _, err) = probe(&[
        "--namespace",
        "team-a",
        "brokerUrl=redis://evil.example:6379/0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`evil.example:6379`"), "{err}");

    for (var, value) in [
        ("CELERY_KEDA_ALLOWED_BROKER_HOSTS", "*"),
        ("CELERY_KEDA_ALLOWED_BROKER_HOSTS", "10.0.0.0/40"),
        ("CELERY_KEDA_NAMESPACES_NOPE", "team-a"),
        ("CELERY_KEDA_NAMESPACES_TEAM_A", "Team A!"),
    ] {
        let out = serve_command("127.0.0.1:0", "127.0.0.1:0")
            .env("CELERY_KEDA_BROKER_TEAM_A", redis_url())
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        let named = if var.starts_with("CELERY_KEDA_NAMESPACES_") {
            var
        } else {
            "--allowed-broker-hosts"
        };
        assert!(err.contains(named), "{var}={value}: {err}");
    }
    cleanup_redis(&redis_url(), "", &[&q]).await;
}

// ---------------------------------------------------------------- masters reported by Sentinel

/// `total_connections_received` of the server behind `conn`: one connection kept open, so that
/// asking adds nothing to the count.
async fn connections_received(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .expect("INFO stats has total_connections_received")
        .trim()
        .parse()
        .unwrap()
}

fn is_sentinel_link(client: &HashMap<String, String>) -> bool {
    client
        .get("name")
        .is_some_and(|n| n.starts_with("sentinel-"))
}

/// Waits until the Sentinel holds its two links (commands and PUB/SUB) to the server at `url`,
/// so that connections counted from then on are someone else's.
async fn wait_for_sentinel_links(url: &str) {
    wait_for(
        "the Sentinel's links to its master",
        std::time::Duration::from_secs(15),
        || async {
            let links = redis_clients(url)
                .await
                .iter()
                .filter(|c| is_sentinel_link(c))
                .count();
            (links >= 2).then_some(())
        },
    )
    .await;
}

/// The clients of the server at `url` other than the Sentinel's links and the connection `own`.
async fn foreign_clients(url: &str, own: &mut redis::aio::MultiplexedConnection) -> usize {
    let own_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(own)
        .await
        .unwrap();
    redis_clients(url)
        .await
        .iter()
        .filter(|c| !is_sentinel_link(c) && c.get("id") != Some(&own_id.to_string()))
        .count()
}

/// GetMetricSpec answers (it never does I/O), GetMetrics and IsActive are refused once the
/// Sentinel has named the master. Returns the number of refused readings.
async fn refused_at_reading(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    m: &HashMap<String, String>,
    needles: &[&str],
    secrets: &[&str],
) -> u64 {
    client.get_metric_spec(so(namespace, m)).await.unwrap();
    refused_readings(client, namespace, m, needles, secrets).await;
    2
}

/// The two Sentinel metadata sets of these tests.
fn sentinel_meta(key: &str, url: &str, q: &str) -> HashMap<String, String> {
    meta(&[
        (key, url),
        ("sentinelMaster", "cksmaster"),
        ("queues", q),
        ("scaleOnRunning", "false"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_reported_by_sentinel_is_checked_before_any_connection() {
    let password = "SentinelMasterPw61";
    let master = OwnRedis::start(Some(password), None);
    let sentinel = OwnSentinel::start(master.port, "cksmaster", Some(password));
    let master_url = master.url(Some(password));
    let q = unique("tensent");
    assert_eq!(
        CeleryConf::new(&master_url).publish(&q, &["--count", "3"]),
        3
    );
    let url = format!("sentinel://:{password}@127.0.0.1:{}/0", sentinel.port);
    // The Sentinel's own address is on the list, the master it reports is not.
    let env = env(&[("CELERY_KEDA_BROKER_SENT", &url)]);
    let scaler = Scaler::start_with(env, allowlist(&format!("127.0.0.1:{}", sentinel.port))).await;
    let mut client = scaler.client().await;

    // The operator's named broker reads its Sentinel's master: exempt, and first, so that an
    // inline trigger sharing its client would read too.
    let named = meta(&[
        ("broker", "sent"),
        ("sentinelMaster", "cksmaster"),
        ("queues", &q),
        ("scaleOnRunning", "false"),
    ]);
    assert_eq!(read(&mut client, "team-b", &named).await.unwrap(), 3);

    wait_for_sentinel_links(&master_url).await;
    let mut own = raw_redis(&master_url).await;
    let before = connections_received(&mut own).await;
    let master_addr = format!("`127.0.0.1:{}`", master.port);
    let sentinel_addr = format!("Sentinel `127.0.0.1:{}`", sentinel.port);
    let mut n = 0;
    for key in ["brokerUrl", "brokerUrlFromEnv"] {
        n += refused_at_reading(
            &mut client,
            "team-b",
            &sentinel_meta(key, &url, &q),
            &[
                &format!("metadata key `{key}`"),
                &master_addr,
                &sentinel_addr,
                "`cksmaster`",
                "namespace `team-b`",
                "--allowed-broker-hosts",
                "did not connect",
            ],
            &[password],
        )
        .await;
    }
    assert_eq!(
        connections_received(&mut own).await,
        before,
        "a refused master was connected to"
    );
    assert_eq!(
        foreign_clients(&master_url, &mut own).await,
        1,
        "only the named broker's connection"
    );
    assert_eq!(refusals(&scaler, "host").await, n);
    assert_eq!(refusals(&scaler, "address").await, 0);
    // The named broker still reads, through its own client.
    assert_eq!(read(&mut client, "team-b", &named).await.unwrap(), 3);
    scaler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_reported_by_sentinel_is_read_when_admitted_and_checked_again_after_failover() {
    let password = "FailoverPw72";
    let mut first = OwnRedis::start(Some(password), None);
    let second = OwnRedis::start(Some(password), None);
    let sentinel = OwnSentinel::start(first.port, "cksmaster", Some(password));
    let q = unique("tenfail");
    assert_eq!(
        CeleryConf::new(&first.url(Some(password))).publish(&q, &["--count", "4"]),
        4
    );
    assert_eq!(
        CeleryConf::new(&second.url(Some(password))).publish(&q, &["--count", "7"]),
        7
    );
    let url = format!("sentinel://:{password}@127.0.0.1:{}/0", sentinel.port);
    let m = sentinel_meta("brokerUrl", &url, &q);

    // A range admits both masters; a host:port list admits the Sentinel and the first only.
    let ranged = Scaler::start_with(BrokerEnv::default(), allowlist("127.0.0.0/8")).await;
    // Without the result window, so that every reading after the failover reaches the broker.
    let exact = Scaler::start_with(
        BrokerEnv::default(),
        ServeSettings {
            result_window: std::time::Duration::ZERO,
            ..allowlist(&format!(
                "127.0.0.1:{}, 127.0.0.1:{}",
                sentinel.port, first.port
            ))
        },
    )
    .await;
    let mut ranged_client = ranged.client().await;
    let mut exact_client = exact.client().await;
    assert_eq!(read(&mut ranged_client, "team-a", &m).await.unwrap(), 4);
    assert_eq!(read(&mut exact_client, "team-a", &m).await.unwrap(), 4);

    // The Sentinel now names the second server (what a failover, or a hostile Sentinel, does),
    // and the first one goes away: both scalers look the master up again.
    let mut s = raw_redis(&format!("redis://127.0.0.1:{}", sentinel.port)).await;
    let _: () = redis::cmd("SENTINEL")
        .arg("REMOVE")
        .arg("cksmaster")
        .query_async(&mut s)
        .await
        .unwrap();
    let _: () = redis::cmd("SENTINEL")
        .arg("MONITOR")
        .arg("cksmaster")
        .arg("127.0.0.1")
        .arg(second.port)
        .arg(1)
        .query_async(&mut s)
        .await
        .unwrap();
    let _: () = redis::cmd("SENTINEL")
        .arg("SET")
        .arg("cksmaster")
        .arg("auth-pass")
        .arg(password)
        .query_async(&mut s)
        .await
        .unwrap();
    let second_url = second.url(Some(password));
    wait_for_sentinel_links(&second_url).await;
    let mut own = raw_redis(&second_url).await;
    let before = connections_received(&mut own).await;
    first.kill();

    // Until the connection to the first master fails, a reading may still fail as
    // UNAVAILABLE; every PERMISSION_DENIED is counted.
    let needles = [
        "metadata key `brokerUrl`".to_string(),
        format!("`127.0.0.1:{}`", second.port),
        format!("Sentinel `127.0.0.1:{}`", sentinel.port),
        "namespace `team-a`".to_string(),
    ];
    let mut denied = 0u64;
    let started = std::time::Instant::now();
    loop {
        let r = exact_client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(so("team-a", &m)),
                metric_name: "x".into(),
            })
            .await;
        match r {
            Err(s) if s.code() == Code::PermissionDenied => {
                let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
                check_status("GetMetrics after the failover", &s, &needles, &[password]);
                denied += 1;
                break;
            }
            Err(s) if s.code() == Code::Unavailable => {}
            other => panic!("after the failover: {other:?}"),
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "the new master was never checked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let s = exact_client.is_active(so("team-a", &m)).await.unwrap_err();
    check_status("IsActive after the failover", &s, &needles, &[password]);
    denied += 1;
    assert_eq!(refusals(&exact, "host").await, denied);
    assert_eq!(
        connections_received(&mut own).await,
        before,
        "a refused master was connected to"
    );
    assert_eq!(foreign_clients(&second_url, &mut own).await, 0);

    // The range admits the new master: the scaler follows the failover to the exact depth.
    let depth = wait_for(
        "the ranged scaler to read the new master",
        std::time::Duration::from_secs(15),
        || {
            let mut c = ranged_client.clone();
            let m = m.clone();
            async move { read(&mut c, "team-a", &m).await.ok().filter(|d| *d == 7) }
        },
    )
    .await;
    assert_eq!(depth, 7);
    assert_eq!(refusals(&ranged, "host").await, 0);
    exact.stop().await;
    ranged.stop().await;
}

/// A push stream whose Sentinel reports a master the allowlist refuses ends with
/// PERMISSION_DENIED after its first reading, and nothing polls for it: the Sentinel receives no
/// further connection over many stream intervals (each reading asks the Sentinel anew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_ends_with_the_refusal_and_polls_nothing() {
    use tokio_stream::StreamExt;
    let password = "SentinelStreamPw17";
    let master = OwnRedis::start(Some(password), None);
    let sentinel = OwnSentinel::start(master.port, "cksmaster", Some(password));
    let url = format!("sentinel://:{password}@127.0.0.1:{}/0", sentinel.port);
    let scaler = Scaler::start_with(
        BrokerEnv::default(),
        allowlist(&format!("127.0.0.1:{}", sentinel.port)),
    )
    .await;
    let mut client = scaler.client().await;
    let m = sentinel_meta("brokerUrl", &url, &unique("refstream"));
    let mut own = raw_redis(&format!("redis://127.0.0.1:{}", sentinel.port)).await;
    let mut stream = client
        .stream_is_active(so("team-b", &m))
        .await
        .expect("admitted: the master is known only from the Sentinel")
        .into_inner();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("the stream answers")
        .expect("with a message")
        .expect_err("the refusal");
    check_status("StreamIsActive", &status, &["`cksmaster`"], &[password]);
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await;
    assert!(matches!(end, Ok(None)), "the stream ended: {end:?}");

    let before = connections_received(&mut own).await;
    // Ten stream intervals (200 ms): before, each was a connection to the Sentinel.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        connections_received(&mut own).await,
        before,
        "a refused stream kept asking the Sentinel"
    );
    assert_eq!(scaler.metric("celery_keda_shared_polls ").await, Some(0.0));
    assert_eq!(scaler.metric("celery_keda_streams ").await, Some(0.0));
    scaler.stop().await;
}

/// Every host of a `;`-separated failover list (and the management API derived from each) and
/// the host of every predefined SQS queue URL is checked before any is contacted: one host the
/// allowlist does not admit refuses the trigger, while the admitted hosts of the same list (a
/// counting listener) see no connection; lists and predefined queues whose hosts are all
/// admitted keep their exact depths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_of_a_failover_list_and_predefined_queue_url_is_checked() {
    let q = redis_queue(3);
    let vhost = Vhost::create().await;
    let rq = unique("tenq");
    assert_eq!(
        CeleryConf::new(&vhost.url()).publish(&rq, &["--count", "2"]),
        2
    );
    let (_, moto_port) = sqs_endpoint();
    let (_, amqp_port) = amqp_base();
    let mgmt_port = url::Url::parse(&management_base())
        .unwrap()
        .port()
        .unwrap_or(15672);
    let u = unique("tenpd");
    let queue_url = create_sqs_queue(&format!("x{u}-any"), None);
    let path = url::Url::parse(&queue_url).unwrap().path().to_string();
    let mut sqs_conf = CeleryConf::new(&sqs_broker_url());
    let pd_q = format!("{u}-celery");
    sqs_conf.predefined_queues = Some(serde_json::json!({&pd_q: {"url": queue_url}}).to_string());
    assert_eq!(sqs_conf.publish(&pd_q, &["--count", "4"]), 4);
    let (silent, accepted) = silent_server().await;

    let rp = redis_port();
    // Names only: the listener is admitted as localhost, the brokers as localhost too.
    let rules = format!(
        "localhost:{rp}, localhost:{silent}, localhost:{amqp_port}, localhost:{mgmt_port}, localhost:{moto_port}, 127.0.0.3:{amqp_port}"
    );
    let scaler = Scaler::start_with(Default::default(), allowlist(&rules)).await;
    let mut client = scaler.client().await;
    let no_run = ("scaleOnRunning", "false");

    // Admitted: every host of each list, and the predefined queue's host.
    let redis_list = format!("redis://localhost:{silent}/0;redis://localhost:{rp}/0");
    let rabbit_list = format!(
        "amqp://guest:guest@localhost:{silent}/{0};amqp://guest:guest@localhost:{amqp_port}/{0}",
        vhost.name
    );
    let pd = |host: &str| {
        meta(&[
            ("brokerUrl", "sqs://testing:SqsPw12@"),
            ("awsRegion", "us-east-1"),
            ("queues", &pd_q),
            (
                "predefinedQueues",
                &serde_json::json!({&pd_q: {"url": format!("http://{host}{path}"),
                    "access_key_id": "testing", "secret_access_key": "testing"}})
                .to_string(),
            ),
        ])
    };
    let admitted_sqs = pd(&format!("localhost:{moto_port}"));
    assert_eq!(read(&mut client, "team-a", &admitted_sqs).await.unwrap(), 4);
    // The first host of each admitted list is the silent listener: the reading moves on to the
    // second within its share of the deadline.
    let redis = meta(&[("brokerUrl", &redis_list), ("queues", &q), no_run]);
    assert_eq!(read(&mut client, "team-a", &redis).await.unwrap(), 3);
    let rabbit = meta(&[("brokerUrl", &rabbit_list), ("queues", &rq), no_run]);
    assert_eq!(read(&mut client, "team-a", &rabbit).await.unwrap(), 2);
    let before = accepted.load(Ordering::SeqCst);
    assert!(before >= 2, "the silent first hosts were tried");

    let cases: Vec<(HashMap<String, String>, Vec<String>, &str)> = vec![
        (
            meta(&[
                (
                    "brokerUrl",
                    &format!("{redis_list};redis://127.0.0.1:{rp}/0")
                        .replace("redis://", "redis://:RedisPw78@"),
                ),
                ("queues", &q),
                no_run,
            ]),
            vec!["`brokerUrl`".into(), format!("`127.0.0.1:{rp}`")],
            "RedisPw78",
        ),
        (
            meta(&[
                (
                    "brokerUrlFromEnv",
                    &format!(
                        "amqp://guest:guest@127.0.0.2:{amqp_port}/{0};{rabbit_list}",
                        vhost.name
                    )
                    .replace("guest:guest", "guest:AmqpPw89"),
                ),
                ("queues", &rq),
                no_run,
            ]),
            vec![
                "`brokerUrlFromEnv`".into(),
                format!("`127.0.0.2:{amqp_port}`"),
            ],
            "AmqpPw89",
        ),
        (
            // An admitted AMQP host whose derived management API (port 15672) is not admitted.
            meta(&[
                (
                    "brokerUrl",
                    &format!(
                        "{rabbit_list};amqp://guest:guest@127.0.0.3:{amqp_port}/{}",
                        vhost.name
                    ),
                ),
                ("queues", &rq),
                no_run,
            ]),
            vec!["`brokerUrl`".into(), "`127.0.0.3:15672`".into()],
            "",
        ),
        (
            pd(&format!("127.0.0.1:{silent}")),
            vec!["`predefinedQueues`".into(), format!("`127.0.0.1:{silent}`")],
            "SqsPw12",
        ),
    ];
    let mut n = 0;
    for (m, needles, secret) in &cases {
        let mut needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        needles.push("namespace `team-b`");
        needles.push("--allowed-broker-hosts");
        let secrets: Vec<&str> = [*secret].into_iter().filter(|s| !s.is_empty()).collect();
        n += refused(&mut client, "team-b", m, false, &needles, &secrets).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "a refused trigger connected"
    );
    assert_eq!(refusals(&scaler, "host").await, n);
    scaler.stop().await;
    vhost.delete().await;
    cleanup_redis(&redis_url(), "", &[&q]).await;
}
