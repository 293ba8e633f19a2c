//! Property tests (fuzzing) of everything a client controls before any broker I/O: trigger
//! metadata and broker URLs. For generated input, parsing never panics, every error is
//! INVALID_ARGUMENT naming a metadata key, no error text contains a password from the input, and
//! the status message stays bounded. With random tenancy settings and namespaces, an admitted
//! trigger never names a host the settings refuse, and a refusal is PERMISSION_DENIED.
//!
//! `CKS_FUZZ_CASES` sets the number of cases per property (default 100,000, as in CI); for a
//! longer run: `CKS_FUZZ_CASES=2000000 cargo test --release --test fuzz`.

use std::collections::HashMap;

use celery_keda_scaler::broker::url::BrokerTarget;
use celery_keda_scaler::broker::Backend;
use celery_keda_scaler::broker_env::BrokerEnv;
use celery_keda_scaler::error::{Error, MAX_STATUS_MESSAGE};
use celery_keda_scaler::metadata::{self, Limits, Trigger, KEDA_KEYS, KEYS};
use celery_keda_scaler::metrics::Metrics;
use celery_keda_scaler::scaler::{Core, CoreSettings};
use celery_keda_scaler::tenancy::Tenancy;
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
    // WHATWG parsers (the `url` crate) read `http:\\h`, `http:/h`, `http:h` as `http://h`.
    let separator = prop_oneof![
        12 => Just("://"),
        1 => Just(":\\\\"),
        1 => Just(":/\\"),
        1 => Just(":"),
        1 => Just(":///"),
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
        (scheme, separator),
        user,
        proptest::option::of(password()),
        host,
        port,
        path,
        query,
        any::<bool>(),
    )
        .prop_map(
            |((scheme, sep), user, pw, host, port, path, query, twice)| {
                let userinfo = match &pw {
                    Some(p) => format!("{user}:{p}@"),
                    None if !user.is_empty() => format!("{user}@"),
                    None => String::new(),
                };
                let one = format!("{scheme}{sep}{userinfo}{host}{port}{path}{query}");
                // Sentinel (and Celery's failover lists) join URLs with ';'.
                let url = if twice {
                    format!("{one};{scheme}{sep}{userinfo}{host}:26380")
                } else {
                    one
                };
                (url, pw)
            },
        )
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

/// Parses `meta`: an error must pass [`check_error`] (no password of `passwords`); a trigger must
/// be sane and show no password of `url_passwords` (those under URL keys) in its `Debug` text.
fn check_metadata(
    meta: &HashMap<String, String>,
    env: &BrokerEnv,
    limits: &Limits,
    passwords: &[String],
    url_passwords: &[String],
) -> Result<(), TestCaseError> {
    match metadata::parse_with(meta, env, limits) {
        Ok(trigger) => {
            prop_assert!(!trigger.query.queues.is_empty());
            prop_assert!(trigger.queue_length > 0.0 && trigger.queue_length.is_finite());
            prop_assert!(trigger.metric_name.len() <= metadata::MAX_METRIC_NAME);
            let shown = format!(
                "{:?} {}",
                trigger.query.backend,
                trigger.query.backend.redacted(),
            );
            for p in url_passwords {
                prop_assert!(!shown.contains(p.as_str()), "password in Debug: {}", shown);
            }
        }
        Err(e) => check_error(&e, passwords)?,
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
                check_metadata(&meta, &env, &limits, &passwords, &url_passwords)
            },
        )
        .unwrap();
}

/// Inputs the properties found or that sit next to them: WHATWG parsing (the `url` crate) reads
/// `\` as `/` in http(s) URLs, drops tabs and newlines, ends the user info at the first `/`, `?`,
/// `#` (or `\`), takes the last `@`, and accepts `http:\\`, `http:/` and `http:` for `http://`;
/// none of it may carry a password into an error or a trigger's `Debug` text.
#[test]
fn whatwg_quirks_never_move_a_password_into_sight() {
    const PW: &str = "PwaAA0aA0A";
    let env = BrokerEnv::default();
    let limits = Limits::default();
    let side_urls = [
        // The case found at 100,000 cases: `\` ends the user info, the password lands in the path.
        r"http://=\;:PwaAA0aA0A@localhost",
        r"http://u\:PwaAA0aA0A@localhost",
        r"HTTPS://u\:PwaAA0aA0A@localhost:15672/",
        r"http:\\u:PwaAA0aA0A@localhost",
        r"http:/\u:PwaAA0aA0A@localhost",
        "http:u:PwaAA0aA0A@localhost",
        "http:///u:PwaAA0aA0A@localhost",
        "http://u:12/PwaAA0aA0A@localhost",
        "http://u:12/x@PwaAA0aA0A@localhost",
        "http://u?:PwaAA0aA0A@localhost",
        "http://u#:PwaAA0aA0A@localhost",
        "http://u:a@PwaAA0aA0A@localhost",
        "http://u:PwaAA0aA0A%40@localhost",
        "http://u:Pwa\tAA0aA0A@localhost",
        "http://u:Pwa\nAA0aA0A@localhost",
        "\thttp://u:PwaAA0aA0A@localhost",
    ];
    let mut cases: Vec<Vec<(&str, &str)>> = Vec::new();
    for u in side_urls {
        cases.push(vec![("brokerUrl", "amqp://"), ("managementUrl", u)]);
        cases.push(vec![("brokerUrl", "sqs://"), ("awsEndpoint", u)]);
        // A URL under a key that is not a URL key is quoted through `shown`.
        cases.push(vec![("brokerUrl", "redis://localhost"), ("queueLength", u)]);
    }
    let broker_urls = [
        r"amqp://=\;:PwaAA0aA0A@localhost",
        r"redis://u\:PwaAA0aA0A@localhost/0",
        r"sqs://u\:PwaAA0aA0A@",
        r"sentinel://u\:PwaAA0aA0A@localhost:26379",
        "amqp:u:PwaAA0aA0A@localhost",
        r"redis:\\u:PwaAA0aA0A@localhost",
        "redis:/u:PwaAA0aA0A@localhost",
        "u:PwaAA0aA0A@localhost",
        "redis://u:Pwa\tAA0aA0A@localhost",
        // No host: the user info is read as the path (a vhost, a socket path).
        "amqp:///:PwaAA0aA0A@localhost",
        "redis+socket:///:PwaAA0aA0A@localhost",
        "sentinel://h:26379;sentinel:///u:PwaAA0aA0A@localhost",
        "sqs://k:12/PwaAA0aA0A@",
        "redis://u:1/PwaAA0aA0A@localhost/0",
    ];
    for u in broker_urls {
        cases.push(vec![("brokerUrl", u)]);
        match BrokerEnv::from_vars([("CELERY_KEDA_BROKER_X".to_string(), u.to_string())]) {
            Err(Error::InvalidMetadata { message, .. }) => {
                assert!(!message.contains("AA0aA0A"), "{message}")
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => {}
        }
    }
    for case in cases {
        let meta: HashMap<String, String> = case
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Tabs and newlines split the marker; its tail must not show either.
        let pws = [PW.to_string(), "AA0aA0A".to_string()];
        let result = check_metadata(&meta, &env, &limits, &pws, &pws);
        assert!(result.is_ok(), "{case:?}: {result:?}");
    }
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

// ---------------------------------------------------------------- tenancy

/// Hosts a trigger may name: admitted and refused names, addresses inside and outside the ranges
/// below, spellings that normalise (case, trailing dot), and random names.
fn tenancy_host(local_only: bool) -> BoxedStrategy<String> {
    let fixed = proptest::sample::select(vec![
        "localhost",
        "LOCALHOST.",
        "127.0.0.1",
        "127.0.0.9",
        "10.1.2.3",
        "192.168.0.9",
        "[::1]",
        "[fd00::5]",
        "[::ffff:10.0.0.1]",
        "redis.team-a.svc",
        "REDIS.team-a.svc.",
        "x.team-a.svc.cluster.local",
        "team-a.svc.cluster.local",
        "r.team-b.svc.cluster.local",
        "evil.example",
        "2130706433",
    ])
    .prop_map(String::from);
    if local_only {
        // Only names that need no DNS server: `localhost` (hosts file) and addresses.
        proptest::sample::select(vec![
            "localhost",
            "127.0.0.1",
            "127.0.0.9",
            "10.1.2.3",
            "[::1]",
            "[fd00::5]",
        ])
        .prop_map(String::from)
        .boxed()
    } else {
        prop_oneof![4 => fixed, 1 => "[a-z0-9.-]{1,16}"].boxed()
    }
}

fn tenancy_meta(local_only: bool) -> impl Strategy<Value = HashMap<String, String>> {
    let scheme = proptest::sample::select(vec![
        "redis",
        "rediss",
        "amqp",
        "amqps",
        "sentinel",
        "sqs",
        "redis+socket",
    ]);
    let port = proptest::sample::select(vec![6379u16, 5672, 26379, 15672, 4566]);
    let broker_url = (
        scheme,
        tenancy_host(local_only),
        port.clone(),
        tenancy_host(local_only),
        any::<bool>(),
    )
        .prop_map(|(scheme, host, port, other, keys)| match scheme {
            "sentinel" => format!("sentinel://:SentPw1@{host}:{port};sentinel://{other}:26379"),
            "sqs" if keys => format!("sqs://AKIA:SqsPw2@{host}:{port}"),
            "sqs" => format!("sqs://{host}:{port}"),
            "redis+socket" => "redis+socket:///tmp/cks.sock".to_string(),
            s => format!("{s}://user:UrlPw3@{host}:{port}/0"),
        });
    let side_url = (
        proptest::sample::select(vec!["http", "https"]),
        tenancy_host(local_only),
        port,
    )
        .prop_map(|(s, h, p)| format!("{s}://{h}:{p}/"));
    (
        proptest::option::of(broker_url.clone()),
        proptest::option::of(broker_url),
        proptest::option::of(proptest::sample::select(vec![
            "team-a", "team-b", "open", "amb", "nope",
        ])),
        proptest::option::of(side_url.clone()),
        proptest::option::of(side_url),
        proptest::option::of(proptest::sample::select(vec!["", "sqs://"])),
    )
        .prop_map(|(url, from_env, broker, mgmt, endpoint, bare)| {
            let mut m = HashMap::new();
            m.insert("sentinelMaster".to_string(), "m".to_string());
            if let Some(bare) = bare {
                m.insert("brokerUrl".into(), bare.to_string());
            } else if let Some(u) = url {
                m.insert("brokerUrl".into(), u);
            }
            if let Some(u) = from_env {
                m.insert("brokerUrlFromEnv".into(), u);
            }
            if let Some(b) = broker {
                m.insert("broker".into(), b.to_string());
            }
            if let Some(u) = mgmt {
                m.insert("managementUrl".into(), u);
            }
            if let Some(u) = endpoint {
                m.insert("awsEndpoint".into(), u);
            }
            m
        })
}

fn tenancy_settings() -> impl Strategy<Value = Tenancy> {
    (
        proptest::option::of(proptest::sample::select(vec![
            "redis.team-a.svc, *.team-a.svc.cluster.local:6379",
            "10.0.0.0/8, fd00::/8",
            "127.0.0.0/8, redis.team-a.svc",
            "*.team-a.svc.cluster.local, 127.0.0.9:6379, [::1]:5672",
        ])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(hosts, named_brokers_only, inline_sqs_ambient_identity)| Tenancy {
                allowed_hosts: hosts.map(|h| h.parse().unwrap()),
                named_brokers_only,
                inline_sqs_ambient_identity,
            },
        )
}

fn tenancy_env() -> BrokerEnv {
    BrokerEnv::from_vars(
        [
            (
                "CELERY_KEDA_BROKER_TEAM_A",
                "redis://:NamedPw4@10.9.9.9:6379/0",
            ),
            ("CELERY_KEDA_NAMESPACES_TEAM_A", "team-a"),
            (
                "CELERY_KEDA_BROKER_TEAM_B",
                "amqp://u:NamedPw5@rabbit.b:5672//",
            ),
            ("CELERY_KEDA_NAMESPACES_TEAM_B", "team-b, ops-*"),
            ("CELERY_KEDA_BROKER_OPEN", "redis://open.example:6379/0"),
            ("CELERY_KEDA_BROKER_AMB", "sqs://"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap()
}

/// Every host the query makes the scaler contact that the operator did not choose, with
/// whether TLS is spoken to it (read from the query's own fields, independently of the scaler).
fn chosen_hosts(t: &Trigger, m: &HashMap<String, String>) -> Vec<(String, u16)> {
    use celery_keda_scaler::broker::redis::RedisAddr;
    let operator = t.broker_source == "broker" || t.broker_source == "CELERY_BROKER_URL";
    let bare = |h: &str| h.trim_matches(['[', ']']).to_string();
    let mut broker_hosts = Vec::new();
    let mut out = Vec::new();
    match &t.query.backend {
        Backend::Redis { target: r, .. } => match &r.addr {
            RedisAddr::Tcp { host, port } | RedisAddr::Tls { host, port, .. } => {
                broker_hosts.push((bare(host), *port))
            }
            RedisAddr::Sentinel { nodes, .. } => {
                broker_hosts.extend(nodes.iter().map(|(h, p)| (bare(h), *p)))
            }
            RedisAddr::Failover { hosts, .. } => {
                broker_hosts.extend(hosts.iter().map(|(h, p)| (bare(h), *p)))
            }
            RedisAddr::Unix { .. } => broker_hosts.push(("unix-socket".into(), 0)),
        },
        Backend::RabbitMq { target: r, .. } => {
            broker_hosts.extend(r.hosts.iter().map(|(h, p)| (bare(h), *p)))
        }
        Backend::Sqs { target: s, layout } => {
            for q in layout.predefined.values() {
                let u = url::Url::parse(&q.endpoint).unwrap();
                if m.contains_key("predefinedQueues") || !operator {
                    out.push((
                        bare(u.host_str().unwrap()),
                        u.port_or_known_default().unwrap(),
                    ));
                }
            }
            if let Some(e) = &s.endpoint {
                let u = url::Url::parse(e).unwrap();
                let h = (
                    bare(u.host_str().unwrap()),
                    u.port_or_known_default().unwrap(),
                );
                if m.contains_key("awsEndpoint") || !operator {
                    out.push(h);
                }
            }
        }
    }
    if let Backend::RabbitMq { layout: l, .. } = &t.query.backend {
        use celery_keda_scaler::broker::rabbitmq::ManagementApi;
        let apis = match &l.management {
            ManagementApi::Given(m) => vec![m],
            ManagementApi::Derived(list) => list.iter().collect(),
        };
        for api in apis {
            let u = &api.base;
            let h = (
                bare(u.host_str().unwrap()),
                u.port_or_known_default().unwrap(),
            );
            let given = m.contains_key("managementUrl");
            let same_as_operator = operator
                && broker_hosts
                    .iter()
                    .any(|(b, _)| b.eq_ignore_ascii_case(&h.0));
            if !operator || (given && !same_as_operator) {
                out.push(h);
            }
        }
    }
    if !operator {
        out.extend(broker_hosts);
    }
    out
}

/// What a refusal must look like: PERMISSION_DENIED, the namespace named, no password.
fn check_refusal(e: &Error, namespace: &str) -> Result<(), TestCaseError> {
    match e {
        Error::Refused { message, .. } => {
            prop_assert_eq!(
                tonic::Status::from(e.clone()).code(),
                tonic::Code::PermissionDenied
            );
            prop_assert!(message.contains("namespace"), "{}", message);
            if !namespace.is_empty() {
                prop_assert!(message.contains(namespace), "{}", message);
            }
            for pw in ["SentPw1", "SqsPw2", "UrlPw3", "NamedPw4", "NamedPw5"] {
                prop_assert!(!message.contains(pw), "password in {}", message);
            }
            Ok(())
        }
        Error::InvalidMetadata { .. } => check_error(e, &[]),
        other => Err(TestCaseError::fail(format!("{other:?}"))),
    }
}

/// The tenancy rules hold for an admitted trigger: its namespace may use its named broker, no
/// inline URL when they are off, no borrowed AWS identity, and every host the trigger chose is
/// admitted by a name rule, or is an address the address rules admit, or (before resolution) is
/// waiting in `unresolved` to be resolved and checked.
fn check_admitted(
    t: &Trigger,
    m: &HashMap<String, String>,
    namespace: &str,
    tenancy: &Tenancy,
    env: &BrokerEnv,
    resolved: bool,
) -> Result<(), TestCaseError> {
    if let Some(name) = &t.broker_name {
        if let Some(list) = env.namespaces.get(name) {
            prop_assert!(list.allows(namespace), "{name} admitted for {namespace:?}");
        }
    }
    let inline = t.broker_source == "brokerUrl" || t.broker_source == "brokerUrlFromEnv";
    prop_assert!(!(inline && tenancy.named_brokers_only));
    if let Backend::Sqs { target: s, .. } = &t.query.backend {
        prop_assert!(!inline || s.access_key.is_some() || tenancy.inline_sqs_ambient_identity);
    }
    if resolved {
        prop_assert!(t.unresolved.is_empty());
    }
    let Some(list) = &tenancy.allowed_hosts else {
        return Ok(());
    };
    for (host, port) in chosen_hosts(t, m) {
        let ok = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => list.admits_addr(ip, port),
            Err(_) => {
                list.admits_name(&host, port)
                    || (!resolved
                        && t.unresolved
                            .iter()
                            .any(|u| u.host == host && u.port == port))
            }
        };
        prop_assert!(
            ok,
            "{host}:{port} reached through {m:?} ({:?})",
            t.query.backend
        );
    }
    Ok(())
}

fn tenancy_core(tenancy: Tenancy) -> Core {
    Core::new(
        tenancy_env(),
        CoreSettings {
            tenancy,
            ..CoreSettings::with_deadline(std::time::Duration::from_secs(2))
        },
        std::sync::Arc::new(Metrics::new()),
    )
}

fn namespace() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec!["team-a", "team-b", "ops-1", ""]).prop_map(String::from),
        "[a-z0-9-]{1,10}",
    ]
}

#[test]
fn random_triggers_from_random_namespaces_never_reach_a_refused_host() {
    let env = tenancy_env();
    runner()
        .run(
            &(tenancy_meta(false), namespace(), tenancy_settings()),
            |(m, ns, tenancy)| {
                let core = tenancy_core(tenancy.clone());
                match core.trigger(&m, &ns) {
                    Ok(t) => check_admitted(&t, &m, &ns, &tenancy, &env, false)?,
                    Err(e) => check_refusal(&e, &ns)?,
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn resolved_triggers_connect_only_to_checked_addresses() {
    // Each case may resolve `localhost` (the hosts file, no DNS server): fewer cases.
    let cases = (cases() / 100).max(200);
    let env = tenancy_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(tenancy_meta(true), namespace(), tenancy_settings()),
            |(m, ns, tenancy)| {
                let core = tenancy_core(tenancy.clone());
                match rt.block_on(core.admit(&m, &ns)) {
                    Ok(t) => check_admitted(&t, &m, &ns, &tenancy, &env, true)?,
                    Err(e) => check_refusal(&e, &ns)?,
                }
                Ok(())
            },
        )
        .unwrap();
}
