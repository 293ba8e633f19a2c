//! Property tests (fuzzing) of everything a client controls before any broker I/O: trigger
//! metadata and broker URLs. For generated input, parsing never panics, every error is
//! INVALID_ARGUMENT naming a metadata key, no error text contains a password from the input, and
//! the status message stays bounded.
//!
//! `CKS_FUZZ_CASES` sets the number of cases per property (default 100,000, as in CI); for a
//! longer run: `CKS_FUZZ_CASES=2000000 cargo test --release --test fuzz`.

use std::collections::HashMap;

use celery_keda_scaler::broker::url::BrokerTarget;
use celery_keda_scaler::error::{Error, MAX_STATUS_MESSAGE};
use celery_keda_scaler::metadata::{self, BrokerEnv, Limits, KEDA_KEYS, KEYS};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Keys whose values are URLs that may carry credentials.
const URL_KEYS: &[&str] = &[
    "brokerUrl",
    "brokerUrlFromEnv",
    "managementUrl",
    "awsEndpoint",
];

fn cases() -> u32 {
    std::env::var("CKS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        // Failures are reported with their minimal input; nothing is written next to the tests.
        failure_persistence: None,
        ..Config::default()
    })
}

/// Passwords carry a marker so a leak is unambiguous; some hold characters that must be
/// percent-encoded in a URL (and often are not).
fn password() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9]{6,10}",
        "[-_.~!$&'()*+,;=%/:@?#]{0,3}",
        "[A-Za-z0-9]{2,4}",
    )
        .prop_map(|(a, special, b)| format!("Pw{a}{special}{b}"))
}

fn url() -> impl Strategy<Value = (String, Option<String>)> {
    let scheme = prop_oneof![
        Just("redis"),
        Just("rediss"),
        Just("redis+socket"),
        Just("sentinel"),
        Just("amqp"),
        Just("amqps"),
        Just("pyamqp"),
        Just("sqs"),
        Just("REDIS"),
        Just("http"),
        Just(""),
    ];
    let user = prop_oneof![Just(String::new()), "[a-z]{1,6}", "[^@/:]{0,6}"];
    let host = prop_oneof![
        Just("localhost".to_string()),
        Just("127.0.0.1".to_string()),
        Just("[::1]".to_string()),
        Just("[::1".to_string()),
        Just(String::new()),
        "[a-z0-9.-]{1,20}",
        "\\PC{0,8}",
    ];
    let port = prop_oneof![
        Just(String::new()),
        Just(":6379".to_string()),
        Just(":0".to_string()),
        Just(":70000".to_string()),
        Just(":".to_string()),
        ":[0-9a-z]{1,6}",
    ];
    let path = prop_oneof![
        Just(String::new()),
        Just("/".to_string()),
        Just("/0".to_string()),
        Just("/15".to_string()),
        Just("/99999999999999999999".to_string()),
        Just("/%2f".to_string()),
        Just("//".to_string()),
        "/[a-z0-9%./-]{0,12}",
        "/\\PC{0,6}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just("?ssl_cert_reqs=required".to_string()),
        Just("?ssl_cert_reqs=none&ssl_ca_certs=/nope".to_string()),
        Just("?ssl_cert_reqs=bogus".to_string()),
        Just("?ssl_certfile=/a&ssl_keyfile=".to_string()),
        Just("?region=eu-west-1".to_string()),
        Just("?heartbeat=x".to_string()),
        "\\?[a-z_=&%]{0,16}",
    ];
    (
        scheme,
        user,
        proptest::option::of(password()),
        host,
        port,
        path,
        query,
        any::<bool>(),
    )
        .prop_map(|(scheme, user, pw, host, port, path, query, twice)| {
            let userinfo = match &pw {
                Some(p) => format!("{user}:{p}@"),
                None if !user.is_empty() => format!("{user}@"),
                None => String::new(),
            };
            let one = format!("{scheme}://{userinfo}{host}{port}{path}{query}");
            // Sentinel (and Celery's failover lists) join URLs with ';'.
            let url = if twice {
                format!("{one};{scheme}://{userinfo}{host}:26380")
            } else {
                one
            };
            (url, pw)
        })
}

/// A metadata value, with the password it holds (when it is a URL with one).
fn value() -> impl Strategy<Value = (String, Option<String>)> {
    prop_oneof![url(), plain_value().prop_map(|v| (v, None)),]
}

fn plain_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_string()),
        "-?[0-9]{0,4}(\\.[0-9]{0,3})?",
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("1e309".to_string()),
        "(true|false|TRUE|t|0|1|yes|on)",
        "[a-z0-9.,_ -]{0,40}",
        "(\\\\x[0-9a-fA-F]{0,2}|\\\\\\\\|[^\\\\]){0,6}",
        "\\PC{0,24}",
        any::<String>(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(String::from),
        1 => proptest::sample::select(KEDA_KEYS).prop_map(String::from),
        1 => "[a-zA-Z]{1,14}",
        1 => any::<String>(),
    ]
}

/// What every parse error must look like: INVALID_ARGUMENT naming a key the scaler reads (or the
/// map as a whole), no password of the input, a bounded status message.
fn check_error(e: &Error, passwords: &[String]) -> Result<(), TestCaseError> {
    let Error::InvalidMetadata { key, .. } = e else {
        return Err(TestCaseError::fail(format!("not InvalidMetadata: {e:?}")));
    };
    prop_assert!(
        KEYS.contains(&key.as_str()) || key == "metadata",
        "error names `{key}`, which is not a metadata key: {e}"
    );
    let status = tonic::Status::from(e.clone());
    prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
    prop_assert!(status.message().len() <= MAX_STATUS_MESSAGE + 20);
    let text = e.to_string();
    for p in passwords {
        prop_assert!(
            !text.contains(p.as_str()),
            "password `{}` in error: {}",
            p,
            text
        );
    }
    Ok(())
}

#[test]
fn metadata_parsing_never_panics_and_every_error_names_a_key() {
    let strategy = (
        proptest::collection::hash_map(key(), value(), 0..10),
        proptest::option::of(url()),
    );
    let limits = Limits::default();
    let env = BrokerEnv::default();
    runner()
        .run(
            &strategy,
            |(entries, extra): (HashMap<String, (String, Option<String>)>, _)| {
                // Passwords may sit under any key: errors must not show one (a URL pasted into
                // queueLength). A parsed target must not show those of the URL keys; other values
                // (a queue or vhost named like a URL) are names, shown as given.
                let mut passwords: Vec<String> = Vec::new();
                let mut url_passwords: Vec<String> = Vec::new();
                let mut meta = HashMap::new();
                for (k, (v, pw)) in entries {
                    if URL_KEYS.contains(&k.as_str()) {
                        url_passwords.extend(pw.clone());
                    }
                    meta.insert(k, v);
                    passwords.extend(pw);
                }
                if let Some((u, pw)) = extra {
                    meta.insert("brokerUrl".to_string(), u);
                    passwords.extend(pw.clone());
                    url_passwords.extend(pw);
                }
                match metadata::parse_with(&meta, &env, &limits) {
                    Ok(trigger) => {
                        prop_assert!(!trigger.query.queues.is_empty());
                        prop_assert!(
                            trigger.queue_length > 0.0 && trigger.queue_length.is_finite()
                        );
                        prop_assert!(trigger.metric_name.len() <= metadata::MAX_METRIC_NAME);
                        let shown = format!(
                            "{:?} {} {:?}",
                            trigger.query.target,
                            trigger.query.target.redacted(),
                            trigger.query.layout
                        );
                        for p in &url_passwords {
                            prop_assert!(
                                !shown.contains(p.as_str()),
                                "password in Debug: {}",
                                shown
                            );
                        }
                    }
                    Err(e) => check_error(&e, &passwords)?,
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn broker_urls_never_panic_and_never_echo_passwords() {
    runner()
        .run(&url(), |(u, pw)| {
            match BrokerTarget::parse("brokerUrl", &u) {
                Ok(target) => {
                    let shown = format!("{target:?} {}", target.redacted());
                    if let Some(p) = &pw {
                        prop_assert!(!shown.contains(p.as_str()), "password in {}", shown);
                    }
                }
                Err(e) => check_error(&e, pw.as_slice())?,
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn scaler_environment_errors_name_the_variable() {
    runner()
        .run(&(url(), "[A-Z_]{0,8}"), |((u, pw), name)| {
            let var = format!("CELERY_KEDA_BROKER_{name}");
            match BrokerEnv::from_vars([(var.clone(), u)]) {
                Ok(_) => {}
                Err(Error::InvalidMetadata { key, message }) => {
                    prop_assert_eq!(&key, &var);
                    if let Some(p) = &pw {
                        prop_assert!(!message.contains(p.as_str()), "password in {}", message);
                    }
                }
                Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
            }
            Ok(())
        })
        .unwrap();
}
