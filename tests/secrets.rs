//! Secrets never show: the real binary at `RUST_LOG=trace` (JSON logs once, text once) and `probe`
//! are driven through successful and failing RPCs with RabbitMQ passwords (scaler environment,
//! `brokerUrl`, `managementUrl`, `pyamqp://`, `amqps://`), SQS secret keys (in the URL, encoded
//! and not, and the scaler's `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`), KEDA TLS material
//! put in trigger metadata by mistake, and bad metadata values that contain passwords. Every log
//! line, status message, `/metrics` and `probe` output is searched for every secret in every
//! form it could take on the way out (raw, percent-encoded, form-encoded, base64 Basic auth, a
//! Rust byte-list `Debug`, and its distinctive fragments). The Redis passwords are covered by
//! `tests/service.rs`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use celery_keda_scaler::proto::external_scaler_client::ExternalScalerClient;
use celery_keda_scaler::proto::GetMetricsRequest;
use common::*;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tonic::transport::Channel;
use tonic::Code;

/// URL-encodes a credential as a user would in a broker URL.
fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// Every form in which `secret` could leave the process, in ASCII lowercase (the search ignores
/// ASCII case, which keeps byte offsets).
fn forms(secret: &str, users: &[&str]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = vec![
        secret.to_string(),
        enc(secret),
        url::form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
        // `Debug` of a byte vector (e.g. an AMQP LongString): `[82, 97, ...]`.
        secret
            .bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ];
    for user in users {
        // HTTP Basic auth, and SASL PLAIN (`\0user\0password`), base64-encoded.
        out.push(b64.encode(format!("{user}:{secret}")));
        out.push(b64.encode(format!("\0{user}\0{secret}")));
    }
    // Fragments: a secret cut at a `/`, `+` or `@` by a parser must not show in part either.
    out.extend(
        secret
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|s| s.len() >= 8)
            .map(str::to_string),
    );
    out.sort();
    out.dedup();
    out.into_iter().map(|f| f.to_ascii_lowercase()).collect()
}

/// Removes ANSI colour sequences (text logs), which could split a value.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `base` followed by `extra`.
fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = base.to_vec();
    v.extend_from_slice(extra);
    v
}

/// `text[start..end]`, both ends moved inwards to character boundaries.
fn slice(text: &str, mut start: usize, mut end: usize) -> &str {
    end = end.min(text.len());
    while start < end && !text.is_char_boundary(start) {
        start += 1;
    }
    while end > start && !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[start..end]
}

/// What a case must produce.
#[derive(Clone, Copy, Debug)]
enum Want {
    Depth(i64),
    Code(Code),
    /// Any error (a TLS handshake against a plain-text port fails in a library-specific way).
    Fails,
}

struct Case {
    label: &'static str,
    meta: HashMap<String, String>,
    want: Want,
}

fn case(label: &'static str, pairs: &[(&str, &str)], want: Want) -> Case {
    Case {
        label,
        meta: meta(pairs),
        want,
    }
}

/// Runs every case's four RPCs against one scaler; returns the text of every answer and the
/// mismatches with what the case wants.
async fn drive(scaler: &ScalerProcess, cases: &[Case]) -> (Vec<String>, Vec<String>) {
    let mut client: ExternalScalerClient<Channel> = scaler.client().await;
    let mut texts = Vec::new();
    let mut mismatches = Vec::new();
    for c in cases {
        let r = object_ref(&c.meta);
        let spec = client.get_metric_spec(r.clone()).await;
        let name = match &spec {
            Ok(s) => s.get_ref().metric_specs[0].metric_name.clone(),
            Err(e) => {
                texts.push(format!(
                    "{} GetMetricSpec {:?}: {}",
                    c.label,
                    e.code(),
                    e.message()
                ));
                "x".into()
            }
        };
        let metrics = client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(r.clone()),
                metric_name: name,
            })
            .await;
        let got = match &metrics {
            Ok(m) => {
                let v = m.get_ref().metric_values[0].metric_value;
                texts.push(format!("{} GetMetrics {v}", c.label));
                Ok(v)
            }
            Err(e) => {
                texts.push(format!(
                    "{} GetMetrics {:?}: {}",
                    c.label,
                    e.code(),
                    e.message()
                ));
                Err(e.code())
            }
        };
        let fine = match (c.want, got) {
            (Want::Depth(n), Ok(v)) => n == v,
            (Want::Code(code), Err(got)) => code == got,
            (Want::Fails, Err(_)) => true,
            _ => false,
        };
        if !fine {
            mismatches.push(format!("{}: wanted {:?}, got {got:?}", c.label, c.want));
        }
        match client.is_active(r.clone()).await {
            Ok(a) => texts.push(format!("{} IsActive {}", c.label, a.get_ref().result)),
            Err(e) => texts.push(format!(
                "{} IsActive {:?}: {}",
                c.label,
                e.code(),
                e.message()
            )),
        }
        match client.stream_is_active(r).await {
            Ok(s) => {
                let mut s = s.into_inner();
                let first = tokio::time::timeout(Duration::from_millis(400), s.message()).await;
                texts.push(format!("{} StreamIsActive {first:?}", c.label));
            }
            Err(e) => texts.push(format!(
                "{} StreamIsActive {:?}: {}",
                c.label,
                e.code(),
                e.message()
            )),
        }
    }
    (texts, mismatches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_of_rabbitmq_sqs_or_tls_shows_in_logs_errors_metrics_or_probe() {
    // Every secret is distinctive, and each is used on one path only, so a leak names its path.
    let rabbit_pw = "RabbitOkPw1/RabbitOkPw2+RabbitOkPw3@Q";
    let rabbit_wrong = "RabbitBadPw4/RabbitBadPw5+Q";
    let env_wrong = "EnvRabbitPw6+EnvRabbitPw7";
    let mgmt_wrong = "MgmtBadPw8/MgmtBadPw9+Q";
    let pyamqp_pw = "PyAmqpPwA1/PyAmqpPwA2+Q";
    let amqps_pw = "AmqpsTlsPwB1/AmqpsTlsPwB2+Q";
    let sqs_secret = "SqsUrlSecretC1/SqsUrlSecretC2+SqsUrlSecC3";
    let sqs_plus = "SqsPlusOnlyD1+SqsPlusOnlyD2";
    let aws_secret = "AwsEnvSecretE1/AwsEnvSecretE2+AwsEnvSecE3";
    let aws_token = "AwsSessionTokenF1/AwsSessionTokenF2+AwsSessionTokenF3==";
    let tls_key = "TlsClientKeyG1TlsClientKeyG2";
    let ca_cert = "CaCertSecretH1CaCertSecretH2";
    let tls_cert = "TlsClientCertI1TlsClientCertI2";
    let typo_key = "TlsTypoKeyJ1TlsTypoKeyJ2";
    let typo_url_pw = "TypoUrlPwK1/TypoUrlPwK2";
    let bad_value_pws = [
        ("queueLength", "QueueLengthPwL1"),
        ("activationQueueLength", "ActivationPwL2"),
        ("scaleOnInFlight", "InFlightPwL3xx"),
        ("scaleOnRunning", "RunningPwL4xxx"),
        ("metricName", "MetricNamePwL5"),
        ("queues", "QueuesListPwL6"),
        ("prioritySteps", "PrioStepsPwL7x"),
        ("separator", "SeparatorPwL8x"),
        ("awsRegion", "AwsRegionPwL9x"),
        ("awsEndpoint", "AwsEndpointPwM1"),
        ("managementUrl", "MgmtUrlBadPwM2"),
        ("brokerUrl", "BrokerUrlBadPwM3"),
        ("brokerUrlFromEnv", "FromEnvBadPwM4"),
    ];

    // --- Brokers: a RabbitMQ user of the test's own on a vhost of its own, tasks by Celery.
    let vhost = Vhost::create().await;
    let user = unique("cks-secret-user");
    vhost.create_user(&user, rabbit_pw, "monitoring").await;
    let (host, amqp_port) = (vhost.host.clone(), vhost.port);
    let amqp = |scheme: &str, pw: &str, port: u16| {
        format!("{scheme}://{user}:{}@{host}:{port}/{}", enc(pw), vhost.name)
    };
    let good = amqp("amqp", rabbit_pw, amqp_port);
    assert_eq!(CeleryConf::new(&good).publish("rq", &["--count", "3"]), 3);
    let mgmt = url::Url::parse(&management_base()).unwrap();
    let mgmt_with = |pw: &str| {
        format!(
            "http://{user}:{}@{}:{}",
            enc(pw),
            mgmt.host_str().unwrap(),
            mgmt.port().unwrap_or(15672)
        )
    };
    let (sqs_host, sqs_port) = sqs_endpoint();
    let moto = format!("http://{sqs_host}:{sqs_port}");
    let sqs_prefix = format!("{}-", unique("sec"));
    let mut sconf = CeleryConf::new(&sqs_broker_url());
    sconf.queue_name_prefix = Some(sqs_prefix.clone());
    assert_eq!(sconf.publish("sq", &["--count", "2"]), 2);
    let sqs_url = |secret: &str, encode: bool| {
        let secret = if encode {
            enc(secret)
        } else {
            secret.to_string()
        };
        format!("sqs://AKIACKSURLTEST000001:{secret}@{sqs_host}:{sqs_port}")
    };
    let refused = free_port();

    // --- The scaler's environment: named brokers and the AWS default credential chain.
    let env_broker = amqp("amqp", rabbit_pw, amqp_port);
    let env_bad = amqp("amqp", env_wrong, amqp_port);
    let env: Vec<(&str, &str)> = vec![
        ("RUST_LOG", "trace"),
        ("CELERY_KEDA_DEADLINE", "2s"),
        ("CELERY_KEDA_BROKER_RMQ", &env_broker),
        ("CELERY_KEDA_BROKER_RMQBAD", &env_bad),
        ("AWS_ACCESS_KEY_ID", "AKIACKSENVTEST000001"),
        ("AWS_SECRET_ACCESS_KEY", aws_secret),
        ("AWS_SESSION_TOKEN", aws_token),
        ("AWS_REGION", "us-east-1"),
        // The default-chain cases below use inline `sqs://` without keys.
        ("CELERY_KEDA_INLINE_SQS_AMBIENT_IDENTITY", "true"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    let remove = ["CELERY_BROKER_URL", "CELERY_KEDA_LOG_FORMAT"];

    // --- The cases: successes first (so clients and connections exist), then failures.
    let pem_key = format!("-----BEGIN PRIVATE KEY-----\n{tls_key}\n-----END PRIVATE KEY-----\n");
    let typo_url = format!("amqp://{user}:{}@{host}:{amqp_port}/", enc(typo_url_pw));
    let q = ("queues", "rq");
    // Refused AMQP ports: without in-flight counts the management API (which answers, with 401
    // for these passwords) does not race the AMQP error, so the AMQP client's error text is seen.
    let no_flight = ("scaleOnInFlight", "false");
    let sq = [("queues", "sq"), ("queueNamePrefix", sqs_prefix.as_str())];
    let wrong = amqp("amqp", rabbit_wrong, amqp_port);
    let py_ok = amqp("pyamqp", rabbit_pw, amqp_port);
    let py_refused = amqp("pyamqp", pyamqp_pw, refused);
    let amqps_refused = amqp("amqps", amqps_pw, refused);
    let amqps_plain = amqp("amqps", amqps_pw, amqp_port);
    let mgmt_ok = mgmt_with(rabbit_pw);
    let mgmt_bad = mgmt_with(mgmt_wrong);
    let sqs_enc = sqs_url(sqs_secret, true);
    let sqs_raw = sqs_url(sqs_secret, false);
    let sqs_raw_no_host = format!("sqs://AKIACKSURLTEST000001:{sqs_secret}@");
    let sqs_plus_url = sqs_url(sqs_plus, false);
    let moto_refused = format!("http://127.0.0.1:{refused}");
    let mut cases = vec![
        case("named broker", &[("broker", "rmq"), q], Want::Depth(3)),
        case(
            "brokerUrl + managementUrl with password",
            &[("brokerUrl", &good), ("managementUrl", &mgmt_ok), q],
            Want::Depth(3),
        ),
        case(
            "pyamqp://",
            &[("brokerUrl", &py_ok), q, ("scaleOnInFlight", "false")],
            Want::Depth(3),
        ),
        case(
            "sqs:// encoded secret",
            &with(&[("brokerUrl", &sqs_enc)], &sq),
            Want::Depth(2),
        ),
        case(
            "sqs:// secret with unencoded +",
            &with(&[("brokerUrl", &sqs_plus_url)], &sq),
            Want::Depth(2),
        ),
        case(
            "sqs:// default chain (env secret + session token)",
            &with(&[("brokerUrl", "sqs://"), ("awsEndpoint", &moto)], &sq),
            Want::Depth(2),
        ),
        case(
            "KEDA TLS keys in metadata",
            &[
                ("broker", "rmq"),
                q,
                ("scalerAddress", "celery-keda-scaler:6000"),
                ("enableTLS", "true"),
                ("tlsClientKey", &pem_key),
                ("caCert", ca_cert),
                ("tlsClientCert", tls_cert),
            ],
            Want::Depth(3),
        ),
        case(
            "wrong password",
            &[("brokerUrl", &wrong), q],
            Want::Code(Code::Unauthenticated),
        ),
        case(
            "wrong password in a named broker",
            &[("broker", "rmqbad"), q],
            Want::Code(Code::Unauthenticated),
        ),
        case(
            "managementUrl with a wrong password",
            &[("brokerUrl", &good), ("managementUrl", &mgmt_bad), q],
            Want::Code(Code::Unauthenticated),
        ),
        case(
            "pyamqp:// refused",
            &[("brokerUrl", &py_refused), q, no_flight],
            Want::Code(Code::Unavailable),
        ),
        case(
            "amqps:// refused",
            &[("brokerUrl", &amqps_refused), q, no_flight],
            Want::Code(Code::Unavailable),
        ),
        case(
            "amqps:// to the plain-text port",
            &[("brokerUrl", &amqps_plain), q, no_flight],
            Want::Fails,
        ),
        case(
            "sqs:// unencoded / in the secret",
            &with(&[("brokerUrl", &sqs_raw)], &sq),
            Want::Code(Code::InvalidArgument),
        ),
        case(
            "sqs:// unencoded / in the secret, no host",
            &[("brokerUrl", &sqs_raw_no_host)],
            Want::Code(Code::InvalidArgument),
        ),
        case(
            "sqs:// missing queue",
            &[
                ("brokerUrl", &sqs_enc),
                ("queues", "nosuch"),
                ("queueNamePrefix", &sqs_prefix),
            ],
            Want::Code(Code::NotFound),
        ),
        case(
            "sqs:// secret, endpoint refused",
            &[("brokerUrl", &sqs_enc), ("awsEndpoint", &moto_refused)],
            Want::Code(Code::Unavailable),
        ),
        case(
            "sqs:// default chain, endpoint refused",
            &[("brokerUrl", "sqs://"), ("awsEndpoint", &moto_refused)],
            Want::Code(Code::Unavailable),
        ),
        case(
            "TLS keys and misspelt keys, no broker",
            &[
                ("tlsClientKey", &pem_key),
                ("caCert", ca_cert),
                ("tlsClientCert", tls_cert),
                ("tlsClientKy", typo_key),
                ("brokerUrll", &typo_url),
                ("queus", "rq"),
            ],
            Want::Code(Code::InvalidArgument),
        ),
    ];
    // Bad values that contain a password: each key with a URL of its own.
    let bad_values: Vec<(String, String, String)> = bad_value_pws
        .iter()
        .map(|(key, pw)| {
            let value = match *key {
                "queues" => format!("amqp://u:{pw}@h,,x"),
                "separator" => format!("\\q redis://:{pw}@h"),
                "awsEndpoint" => format!("http://u:{pw}@h"),
                "managementUrl" => format!("http://u:{pw}@[bad"),
                "brokerUrl" | "brokerUrlFromEnv" => format!("amqp://u:{pw}@h:notaport/"),
                _ => format!("amqp://u:{pw}@h"),
            };
            // The broker each key belongs to.
            let broker = match *key {
                "prioritySteps" | "separator" => format!("redis://127.0.0.1:{refused}/0"),
                "awsRegion" | "awsEndpoint" => sqs_enc.clone(),
                _ => good.clone(),
            };
            (key.to_string(), value, broker)
        })
        .collect();
    for (key, value, broker) in &bad_values {
        let mut m = meta(&[("queues", "rq")]);
        if !matches!(key.as_str(), "brokerUrl" | "brokerUrlFromEnv") {
            m.insert("brokerUrl".into(), broker.clone());
        }
        m.insert(key.clone(), value.clone());
        cases.push(Case {
            label: "bad value with a password",
            meta: m,
            want: Want::Code(Code::InvalidArgument),
        });
    }

    // --- Two scalers at the most verbose level: JSON logs, then text logs.
    let mut statuses = Vec::new();
    let mut mismatches = Vec::new();
    let mut logs = Vec::new();
    let mut metrics = Vec::new();
    for format in ["json", "text"] {
        let scaler = ScalerProcess::spawn(&["--log-format", format], &env, &remove).await;
        let (texts, wrong) = drive(&scaler, &cases).await;
        statuses.extend(texts);
        mismatches.extend(wrong.into_iter().map(|w| format!("[{format}] {w}")));
        metrics.push(scaler.metrics_text().await);
        let exit = scaler.terminate();
        assert!(exit.status.success(), "{:?}", exit.status);
        if format == "json" {
            let first = exit.stderr.lines().next().unwrap_or("");
            assert!(first.starts_with('{'), "JSON logs: {first}");
        }
        logs.push(format!("{}{}", exit.stdout, exit.stderr));
    }

    // --- `probe` with the same metadata and environment, at the most verbose level.
    let mut probes = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let pairs: Vec<(&str, &str)> = c
            .meta
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut cmd = probe_command(&pairs);
        cmd.env(
            "CELERY_KEDA_LOG_FORMAT",
            if i % 2 == 0 { "json" } else { "text" },
        );
        for name in remove {
            cmd.env_remove(name);
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        probes.push(format!(
            "{} (exit {:?}):\n{}{}",
            c.label,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    // --- Not vacuous: the collected text shows the brokers, the users and the failures.
    let statuses_text = statuses.join("\n");
    let logs_text = strip_ansi(&logs.join("\n"));
    let metrics_text = metrics.join("\n");
    let probes_text = strip_ansi(&probes.join("\n"));
    for needle in [
        "Unauthenticated",
        "Unavailable",
        "NotFound",
        "InvalidArgument",
        "did you mean `brokerUrl`",
        user.as_str(),
        host.as_str(),
        "sqs://AKIACKSURLTEST000001:***@",
    ] {
        assert!(statuses_text.contains(needle), "{needle}:\n{statuses_text}");
    }
    for needle in ["Depth reading failed", "rabbitmq", "sqs", user.as_str()] {
        assert!(logs_text.contains(needle), "logs lack {needle}");
    }
    assert!(
        logs_text.len() > 100_000,
        "trace logs are short: {}",
        logs_text.len()
    );
    assert!(
        metrics_text.contains(
            "celery_keda_broker_errors_total{broker=\"rabbitmq\",kind=\"unauthenticated\"}"
        ),
        "{metrics_text}"
    );
    for needle in [
        "depth        3",
        "depth        2",
        "Unauthenticated",
        user.as_str(),
    ] {
        assert!(
            probes_text.contains(needle),
            "probe lacks {needle}:\n{probes_text}"
        );
    }

    // --- The search.
    let mut secrets: Vec<(&str, &str)> = vec![
        ("RabbitMQ password", rabbit_pw),
        ("RabbitMQ wrong password", rabbit_wrong),
        ("RabbitMQ password of a named broker", env_wrong),
        ("managementUrl password", mgmt_wrong),
        ("pyamqp:// password", pyamqp_pw),
        ("amqps:// password", amqps_pw),
        ("SQS secret key in the URL", sqs_secret),
        ("SQS secret key with +", sqs_plus),
        ("AWS_SECRET_ACCESS_KEY", aws_secret),
        ("AWS_SESSION_TOKEN", aws_token),
        ("tlsClientKey", tls_key),
        ("caCert", ca_cert),
        ("tlsClientCert", tls_cert),
        ("misspelt tlsClientKey", typo_key),
        ("password in a misspelt brokerUrl", typo_url_pw),
    ];
    secrets.extend(bad_value_pws.iter().map(|(k, pw)| (*k, *pw)));
    let sources = [
        ("logs", &logs_text),
        ("status messages", &statuses_text),
        ("/metrics", &metrics_text),
        ("probe", &probes_text),
    ];
    let lowered: Vec<(&str, String)> = sources
        .iter()
        .map(|(name, text)| (*name, text.to_ascii_lowercase()))
        .collect();
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret, &[&user]) {
            for ((source, low), (_, text)) in lowered.iter().zip(sources.iter()) {
                let mut from = 0;
                let mut shown = 0;
                while let Some(pos) = low[from..].find(&form) {
                    let at = from + pos;
                    from = at + form.len();
                    if shown < 2 {
                        let context = format!(
                            "{}XXX{}",
                            slice(text, at.saturating_sub(160), at),
                            slice(text, from, from + 80)
                        );
                        leaks.push(format!("{what} as `{form}` in {source}: ...{context}..."));
                    }
                    shown += 1;
                }
                if shown > 2 {
                    leaks.push(format!(
                        "{what} as `{form}` in {source}: {shown} times in all"
                    ));
                }
            }
        }
    }

    vhost.delete_user(&user).await;
    vhost.delete().await;
    assert!(mismatches.is_empty(), "{mismatches:#?}\n{statuses_text}");
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
}
