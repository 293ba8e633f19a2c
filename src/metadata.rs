//! Trigger metadata (the user-facing contract, README "Trigger metadata"): parsed from KEDA's string
//! map into a validated [`Trigger`], with errors that name the key.

use std::collections::HashMap;

use crate::allowlist::ns_shown;
use crate::broker::rabbitmq::{Management, ManagementApi, RabbitLayout};
use crate::broker::redis::{unescape, RedisAddr, RedisLayout, DEFAULT_PRIORITY_STEPS};
use crate::broker::sqs;
use crate::broker::{Backend, BrokerTarget, DepthQuery, HostField, Unresolved};
use crate::broker_env::{
    normalise_name, BrokerEnv, DEFAULT_BROKER_VAR, NAMED_BROKER_PREFIX, NAMESPACES_PREFIX,
    PREDEFINED_QUEUES_PREFIX,
};
use crate::error::{Error, Refusal, Result};
use crate::secret::shown;

/// Every metadata key this scaler reads (others, like KEDA's `scalerAddress`, are ignored).
pub const KEYS: &[&str] = &[
    "brokerUrl",
    "brokerUrlFromEnv",
    "broker",
    "queues",
    "queueLength",
    "activationQueueLength",
    "scaleOnInFlight",
    "scaleOnRunning",
    "metricName",
    "globalKeyprefix",
    "prioritySteps",
    "separator",
    "sentinelMaster",
    "managementUrl",
    "vhost",
    "queueNamePrefix",
    "awsRegion",
    "awsEndpoint",
    "predefinedQueues",
];

/// Keys of a trigger's metadata that KEDA's `external` / `external-push` scaler reads itself
/// (address and TLS to this scaler; `tlsCertFile` in older KEDA). KEDA passes all metadata on, so
/// these arrive too; this scaler ignores them and never echoes their values (`tlsClientKey` put
/// under `metadata:` instead of a TriggerAuthentication is a private key).
pub const KEDA_KEYS: &[&str] = &[
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "tlsCertFile",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
];

/// Bounds on what one trigger's metadata may hold, checked before anything else is parsed, so a
/// hostile or broken client cannot make the scaler hold or echo unbounded input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries in the metadata map (KEDA's own keys included).
    pub max_keys: usize,
    /// Bytes in the value of a key the scaler reads.
    pub max_value_bytes: usize,
    /// Distinct queue names in `queues`.
    pub max_queues: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_keys: 64,
            max_value_bytes: 8 * 1024,
            max_queues: 256,
        }
    }
}

/// Longest queue name accepted (RabbitMQ's limit; Redis and SQS names are shorter in practice).
pub const MAX_QUEUE_NAME_BYTES: usize = 255;

/// Default `queueLength`: target tasks per replica.
pub const DEFAULT_QUEUE_LENGTH: f64 = 5.0;
/// Longest metric name KEDA and Kubernetes handle comfortably.
pub const MAX_METRIC_NAME: usize = 63;

/// A validated trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// What to read and how; equal queries share readings.
    pub query: DepthQuery,
    /// Which metadata key (or environment variable) the broker came from.
    pub broker_source: String,
    /// The named broker's normalised name, when the broker came from `broker`.
    pub broker_name: Option<String>,
    /// Hosts named by a metadata key of their own (`managementUrl`, `awsEndpoint`) rather than
    /// by the broker's source, with that key (named in a refusal).
    pub host_keys: Vec<(HostField, &'static str)>,
    /// Hosts admitted only by an address range of the host allowlist: resolved, checked and
    /// replaced by the checked address before any reading (`Core::admit`); empty otherwise.
    pub unresolved: Vec<Unresolved>,
    /// `queueLength`: target tasks per replica.
    pub queue_length: f64,
    /// `activationQueueLength`: active when depth is strictly greater.
    pub activation_queue_length: f64,
    /// The metric name returned by `GetMetricSpec`.
    pub metric_name: String,
}

impl Trigger {
    /// The metadata key (or environment variable) that named the host of `field`.
    pub fn key_of(&self, field: &HostField) -> &str {
        self.host_keys
            .iter()
            .find(|(f, _)| f == field)
            .map_or(self.broker_source.as_str(), |(_, key)| key)
    }

    /// Whether `depth` makes the scale target active (0 -> 1).
    pub fn is_active(&self, depth: u64) -> bool {
        depth as f64 > self.activation_queue_length
    }
}

/// Whether a trigger may give its broker's URL inline (`brokerUrl`, `brokerUrlFromEnv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InlineUrls<'a> {
    Accepted,
    /// `--named-brokers-only`: refused for a trigger from this namespace, before the URL is read.
    Refused {
        namespace: &'a str,
    },
}

/// Parses trigger metadata with the default [`Limits`], inline URLs accepted. `env` supplies
/// named and default brokers.
pub fn parse(meta: &HashMap<String, String>, env: &BrokerEnv) -> Result<Trigger> {
    parse_with(meta, env, &Limits::default())
}

/// Parses trigger metadata within `limits`, inline URLs accepted.
pub fn parse_with(
    meta: &HashMap<String, String>,
    env: &BrokerEnv,
    limits: &Limits,
) -> Result<Trigger> {
    parse_for(meta, env, limits, InlineUrls::Accepted)
}

/// Parses trigger metadata within `limits`; `inline` says whether a broker URL may be given in
/// the metadata (a refusal is decided before the URL is read).
pub fn parse_for(
    meta: &HashMap<String, String>,
    env: &BrokerEnv,
    limits: &Limits,
    inline: InlineUrls,
) -> Result<Trigger> {
    let get = |key: &str| meta.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    if let InlineUrls::Refused { namespace } = inline {
        if let Some(key) = ["brokerUrl", "brokerUrlFromEnv"]
            .into_iter()
            .find(|k| get(k).is_some())
        {
            return Err(Error::refused(
                Refusal::InlineUrl,
                format!(
                    "metadata key `{key}`: inline broker URLs are turned off in this scaler (--named-brokers-only), namespace {}: remove `{key}` and use `broker: <name>` with a broker the scaler's operator configures for your namespace ({NAMED_BROKER_PREFIX}<NAME> and {NAMESPACES_PREFIX}<NAME> in the scaler's environment)",
                    ns_shown(namespace)
                ),
            ));
        }
    }
    check_limits(meta, limits)?;

    let mut broker_name = None;
    let (broker_source, target) = if let Some(url) = get("brokerUrl") {
        (
            "brokerUrl".to_string(),
            BrokerTarget::parse("brokerUrl", url)?,
        )
    } else if let Some(url) = get("brokerUrlFromEnv") {
        (
            "brokerUrlFromEnv".to_string(),
            BrokerTarget::parse("brokerUrlFromEnv", url)?,
        )
    } else if let Some(name) = get("broker") {
        let target = env.named.get(&normalise_name(name)).cloned().ok_or_else(|| {
            // Only the brokers open to every namespace are listed: the name of a broker
            // reserved to other teams is theirs to know (the trigger's namespace is not known
            // here, and the message reaches whoever wrote the trigger).
            let open: Vec<&str> = env
                .named
                .keys()
                .filter(|k| !env.namespaces.contains_key(*k))
                .map(String::as_str)
                .collect();
            let reserved = env.named.len() - open.len();
            Error::invalid(
                "broker",
                format!(
                    "no broker named `{}` is configured in the scaler's environment (set {NAMED_BROKER_PREFIX}{}); open to every namespace: {}{}",
                    shown(name),
                    name.trim().to_ascii_uppercase().replace('-', "_"),
                    if open.is_empty() { "none".to_string() } else { open.join(", ") },
                    if reserved > 0 { "; brokers reserved to namespaces are not listed" } else { "" },
                ),
            )
        })?;
        broker_name = Some(normalise_name(name));
        ("broker".to_string(), target)
    } else if let Some(target) = &env.default {
        (DEFAULT_BROKER_VAR.to_string(), target.clone())
    } else {
        let mut message = format!(
            "no broker given: set one of brokerUrl, brokerUrlFromEnv (e.g. brokerUrlFromEnv: CELERY_BROKER_URL) or broker (a name from the scaler's {NAMED_BROKER_PREFIX}<NAME> variables), or give the scaler a default broker in {DEFAULT_BROKER_VAR}"
        );
        if meta.contains_key("brokerUrlFromEnv") {
            message.push_str("; brokerUrlFromEnv is empty: KEDA could not resolve the variable in the scale target's container");
        }
        message.push_str(&suggestions(meta));
        return Err(Error::invalid("brokerUrl", message));
    };

    let queues = parse_queues(meta.get("queues").map(String::as_str), limits.max_queues)?;
    let queue_length = match get("queueLength") {
        None => DEFAULT_QUEUE_LENGTH,
        Some(v) => parse_number("queueLength", v, false)?,
    };
    let activation_queue_length = match get("activationQueueLength") {
        None => 0.0,
        Some(v) => parse_number("activationQueueLength", v, true)?,
    };
    let in_flight = parse_bool(meta, "scaleOnInFlight", true)?;
    let running = parse_bool(meta, "scaleOnRunning", true)?;
    let metric_name = match get("metricName") {
        Some(name) => validate_metric_name(name)?,
        None => derive_metric_name(&queues),
    };

    let mut host_keys = Vec::new();
    let backend = match target {
        BrokerTarget::Redis(mut t) => {
            if let RedisAddr::Sentinel { master, .. } = &mut t.addr {
                let name = get("sentinelMaster").ok_or_else(|| {
                    Error::invalid(
                        "sentinelMaster",
                        "is required with a sentinel:// broker URL: the name Sentinel monitors the master under (kombu's master_name)",
                    )
                })?;
                *master = Some(name.to_string());
            }
            Backend::Redis {
                target: t,
                layout: parse_redis_layout(meta)?,
            }
        }
        BrokerTarget::RabbitMq(mut t) => {
            if let Some(vhost) = get("vhost") {
                t.vhost = vhost.to_string();
            }
            let management = match get("managementUrl") {
                Some(raw) => {
                    host_keys.push((HostField::Management, "managementUrl"));
                    ManagementApi::Given(Management::parse(raw, &t)?)
                }
                None => t.derived_management()?,
            };
            Backend::RabbitMq {
                target: t,
                layout: RabbitLayout { management },
            }
        }
        BrokerTarget::Sqs(mut t) => {
            if let Some(region) = get("awsRegion") {
                t.region = Some(sqs::parse_region(region)?);
            }
            if let Some(endpoint) = get("awsEndpoint") {
                host_keys.push((HostField::Endpoint, "awsEndpoint"));
                t.endpoint = Some(sqs::parse_endpoint(endpoint)?);
            }
            let queue_name_prefix = meta.get("queueNamePrefix").cloned().unwrap_or_default();
            // kombu's predefined_queues: the trigger's own map, else its named broker's.
            let predefined = match get("predefinedQueues") {
                Some(raw) => {
                    let map = sqs::parse_predefined("predefinedQueues", raw)?;
                    let selected = sqs::select_predefined(
                        &map,
                        &queue_name_prefix,
                        &queues,
                        "predefinedQueues",
                    )?;
                    for i in 0..selected.len() {
                        host_keys.push((HostField::QueueUrl(i), "predefinedQueues"));
                    }
                    selected
                }
                None => match broker_name.as_ref().and_then(|n| env.predefined.get(n)) {
                    Some(map) => sqs::select_predefined(map, &queue_name_prefix, &queues, "queues")
                        .map_err(|e| match e {
                            Error::InvalidMetadata { key, message } => Error::invalid(
                                key,
                                format!(
                                    "{message} (the predefined queues of broker `{}`, {PREDEFINED_QUEUES_PREFIX}{})",
                                    broker_name.as_deref().unwrap_or_default(),
                                    broker_name
                                        .as_deref()
                                        .unwrap_or_default()
                                        .to_ascii_uppercase()
                                        .replace('-', "_")
                                ),
                            ),
                            other => other,
                        })?,
                    None => Default::default(),
                },
            };
            Backend::Sqs {
                target: t,
                layout: sqs::SqsLayout {
                    queue_name_prefix,
                    predefined,
                },
            }
        }
    };

    Ok(Trigger {
        query: DepthQuery {
            backend,
            queues,
            in_flight,
            running,
        },
        broker_source,
        broker_name,
        host_keys,
        unresolved: Vec::new(),
        queue_length,
        activation_queue_length,
        metric_name,
    })
}

/// "Did you mean" hints for keys that look like ours but are not.
fn suggestions(meta: &HashMap<String, String>) -> String {
    let mut hints: Vec<String> = meta
        .keys()
        .filter(|k| !KEYS.contains(&k.as_str()))
        .filter_map(|k| {
            KEYS.iter()
                .map(|ours| {
                    (
                        ours,
                        strsim::damerau_levenshtein(&k.to_lowercase(), &ours.to_lowercase()),
                    )
                })
                .filter(|(ours, d)| *d <= 2 || k.eq_ignore_ascii_case(ours))
                .min_by_key(|(_, d)| *d)
                .map(|(ours, _)| format!("`{k}` (did you mean `{ours}`?)"))
        })
        .collect();
    hints.sort();
    if hints.is_empty() {
        String::new()
    } else {
        format!("; unrecognised keys: {}", hints.join(", "))
    }
}

/// The size checks of [`Limits`]; errors name the key (the map as a whole is `metadata`).
fn check_limits(meta: &HashMap<String, String>, limits: &Limits) -> Result<()> {
    if meta.len() > limits.max_keys {
        return Err(Error::invalid(
            "metadata",
            format!(
                "has {} keys, more than the {} this scaler accepts (--max-metadata-keys)",
                meta.len(),
                limits.max_keys
            ),
        ));
    }
    // Sorted so the same input always names the same key.
    let mut oversized: Vec<(&String, usize)> = meta
        .iter()
        .filter(|(k, v)| KEYS.contains(&k.as_str()) && v.len() > limits.max_value_bytes)
        .map(|(k, v)| (k, v.len()))
        .collect();
    oversized.sort();
    if let Some((key, len)) = oversized.first() {
        return Err(Error::invalid(
            key.as_str(),
            format!(
                "value has {len} bytes, more than the {} this scaler accepts (--max-metadata-value-bytes)",
                limits.max_value_bytes
            ),
        ));
    }
    Ok(())
}

fn parse_queues(raw: Option<&str>, max_queues: usize) -> Result<Vec<String>> {
    let Some(raw) = raw else {
        return Ok(vec!["celery".to_string()]);
    };
    if raw.trim().is_empty() {
        return Err(Error::invalid(
            "queues",
            "is empty: give at least one queue name, e.g. `celery`",
        ));
    }
    let mut queues: Vec<String> = Vec::new();
    for part in raw.split(',') {
        let name = part.trim();
        if name.is_empty() {
            return Err(Error::invalid(
                "queues",
                format!("has an empty queue name in `{}`", shown(raw)),
            ));
        }
        if name.len() > MAX_QUEUE_NAME_BYTES {
            return Err(Error::invalid(
                "queues",
                format!(
                    "has a queue name of {} bytes, longer than {MAX_QUEUE_NAME_BYTES}",
                    name.len()
                ),
            ));
        }
        if !queues.iter().any(|q| q == name) {
            if queues.len() == max_queues {
                return Err(Error::invalid(
                    "queues",
                    format!(
                        "names more than {max_queues} distinct queues (--max-queues); split the trigger"
                    ),
                ));
            }
            queues.push(name.to_string());
        }
    }
    Ok(queues)
}

fn parse_number(key: &str, value: &str, zero_ok: bool) -> Result<f64> {
    let n: f64 = value
        .parse()
        .map_err(|_| Error::invalid(key, format!("must be a number, got `{}`", shown(value))))?;
    if !n.is_finite() || n < 0.0 || (!zero_ok && n == 0.0) {
        let bound = if zero_ok { ">= 0" } else { "> 0" };
        return Err(Error::invalid(
            key,
            format!("must be a finite number {bound}, got `{}`", shown(value)),
        ));
    }
    Ok(n)
}

/// Booleans as KEDA (Go's strconv.ParseBool) reads them.
fn parse_bool(meta: &HashMap<String, String>, key: &str, default: bool) -> Result<bool> {
    match meta.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(Error::invalid(
            key,
            format!("must be true or false, got `{}`", shown(other)),
        )),
    }
}

fn validate_metric_name(name: &str) -> Result<String> {
    let ok = name.len() <= MAX_METRIC_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(Error::invalid(
            "metricName",
            format!(
                "must be at most {MAX_METRIC_NAME} characters of [A-Za-z0-9._-], got `{}`",
                shown(name)
            ),
        ))
    }
}

/// `celery-` + the queue names, lowercase `[a-z0-9-]`, stable across runs and versions, at most
/// 63 characters; a long or lossy name ends in a CRC-32 of the exact queue list so different
/// queue sets keep different names.
pub fn derive_metric_name(queues: &[String]) -> String {
    let joined = queues.join(",");
    let mut name = String::from("celery");
    let mut lossy = false;
    for q in queues {
        name.push('-');
        for c in q.chars() {
            let lower = c.to_ascii_lowercase();
            if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
                lossy |= lower != c;
                name.push(lower);
            } else if c == '-' && !name.ends_with('-') {
                name.push('-');
            } else {
                lossy = true;
                if !name.ends_with('-') {
                    name.push('-');
                }
            }
        }
    }
    let name = name.trim_end_matches('-').to_string();
    if !lossy && name.len() <= MAX_METRIC_NAME {
        return name;
    }
    let hash = format!("{:08x}", crc32fast::hash(joined.as_bytes()));
    let keep = MAX_METRIC_NAME - hash.len() - 1;
    let head: String = name.chars().take(keep).collect();
    format!("{}-{hash}", head.trim_end_matches('-'))
}

fn parse_redis_layout(meta: &HashMap<String, String>) -> Result<RedisLayout> {
    let prefix = meta.get("globalKeyprefix").cloned().unwrap_or_default();
    let priority_steps = match meta.get("prioritySteps").map(|v| v.trim()) {
        None | Some("") => DEFAULT_PRIORITY_STEPS.to_vec(),
        Some(raw) => {
            let mut steps = Vec::new();
            for part in raw.split(',') {
                let step: u8 = part.trim().parse().map_err(|_| {
                    Error::invalid(
                        "prioritySteps",
                        format!("must be comma-separated integers 0-255 (kombu priority_steps), got `{}`", shown(raw)),
                    )
                })?;
                steps.push(step);
            }
            steps.sort_unstable();
            steps.dedup();
            steps
        }
    };
    let separator = match meta.get("separator") {
        None => crate::broker::redis::DEFAULT_SEPARATOR.to_string(),
        Some(raw) => {
            let sep = unescape(raw).ok_or_else(|| {
                Error::invalid(
                    "separator",
                    format!("has a bad escape in `{}`: use \\xHH for control characters, e.g. \\x06\\x16", shown(raw)),
                )
            })?;
            if sep.is_empty() {
                return Err(Error::invalid("separator", "must not be empty"));
            }
            sep
        }
    };
    Ok(RedisLayout {
        prefix,
        priority_steps,
        separator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key_of(err: Error) -> String {
        match err {
            Error::InvalidMetadata { key, .. } => key,
            other => panic!("expected InvalidMetadata, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let t = parse(
            &meta(&[("brokerUrl", "redis://h:6379/0")]),
            &BrokerEnv::default(),
        )
        .unwrap();
        assert_eq!(t.query.queues, ["celery"]);
        assert_eq!(t.queue_length, 5.0);
        assert_eq!(t.activation_queue_length, 0.0);
        assert!(t.query.in_flight && t.query.running);
        assert_eq!(t.metric_name, "celery-celery");
        assert_eq!(t.broker_source, "brokerUrl");
        assert!(
            matches!(&t.query.backend, Backend::Redis { layout, .. } if *layout == RedisLayout::default())
        );
    }

    #[test]
    fn broker_source_order() {
        let env = BrokerEnv::from_vars([
            (
                "CELERY_KEDA_BROKER_ORDERS_REDIS".to_string(),
                "redis://named:6379/1".to_string(),
            ),
            (
                "CELERY_BROKER_URL".to_string(),
                "redis://default:6379/2".to_string(),
            ),
        ])
        .unwrap();
        let host = |t: &Trigger| t.query.backend.redacted();
        let all = meta(&[
            ("brokerUrl", "redis://a/0"),
            ("brokerUrlFromEnv", "redis://b/0"),
            ("broker", "orders-redis"),
        ]);
        assert_eq!(host(&parse(&all, &env).unwrap()), "redis://a:6379/0");
        let t = parse(
            &meta(&[
                ("brokerUrlFromEnv", "redis://b/0"),
                ("broker", "orders-redis"),
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(
            (host(&t), t.broker_source.as_str()),
            ("redis://b:6379/0".into(), "brokerUrlFromEnv")
        );
        let t = parse(&meta(&[("broker", "Orders_Redis")]), &env).unwrap();
        assert_eq!(host(&t), "redis://named:6379/1");
        let t = parse(&meta(&[]), &env).unwrap();
        assert_eq!(
            (host(&t), t.broker_source.as_str()),
            ("redis://default:6379/2".into(), "CELERY_BROKER_URL")
        );
    }

    #[test]
    fn missing_broker_lists_keys_and_suggests_misspellings() {
        let err = parse(
            &meta(&[("brokerURL", "redis://x"), ("scalerAddress", "s:6000")]),
            &BrokerEnv::default(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("brokerUrlFromEnv"), "{text}");
        assert!(
            text.contains("`brokerURL` (did you mean `brokerUrl`?)"),
            "{text}"
        );
        assert!(!text.contains("scalerAddress"), "{text}");
        assert_eq!(key_of(err), "brokerUrl");
    }

    #[test]
    fn unknown_named_broker_names_the_key() {
        let err = parse(&meta(&[("broker", "nope")]), &BrokerEnv::default()).unwrap_err();
        assert!(err.to_string().contains("CELERY_KEDA_BROKER_NOPE"), "{err}");
        assert_eq!(key_of(err), "broker");
    }

    #[test]
    fn unknown_named_broker_lists_only_brokers_open_to_every_namespace() {
        let env = BrokerEnv::from_vars([
            (
                "CELERY_KEDA_BROKER_SHARED".into(),
                "redis://shared:6379".into(),
            ),
            (
                "CELERY_KEDA_BROKER_PAYROLL".into(),
                "redis://payroll:6379".into(),
            ),
            ("CELERY_KEDA_NAMESPACES_PAYROLL".into(), "payroll".into()),
        ])
        .unwrap();
        let text = parse(&meta(&[("broker", "nope")]), &env)
            .unwrap_err()
            .to_string();
        assert!(text.contains("open to every namespace: shared;"), "{text}");
        assert!(
            text.contains("reserved to namespaces are not listed"),
            "{text}"
        );
        assert!(!text.contains("payroll"), "{text}");
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let cases = [
            ("queueLength", "0"),
            ("queueLength", "-1"),
            ("queueLength", "abc"),
            ("queueLength", "NaN"),
            ("queueLength", "inf"),
            ("activationQueueLength", "-0.5"),
            ("activationQueueLength", "x"),
            ("scaleOnInFlight", "yes"),
            ("scaleOnRunning", "maybe"),
            ("queues", ""),
            ("queues", "a,,b"),
            ("metricName", "has space"),
            ("prioritySteps", "0,3,x"),
            ("prioritySteps", "0,300"),
            ("separator", "\\q"),
            ("separator", ""),
        ];
        for (key, value) in cases {
            let err = parse(
                &meta(&[("brokerUrl", "redis://h/0"), (key, value)]),
                &BrokerEnv::default(),
            )
            .expect_err(&format!("{key}={value:?} must fail"));
            assert_eq!(key_of(err), key, "{key}={value:?}");
        }
    }

    #[test]
    fn bad_url_names_its_key_without_password() {
        for key in ["brokerUrl", "brokerUrlFromEnv"] {
            let err = parse(
                &meta(&[(key, "redis://:s3cret@h/notadb")]),
                &BrokerEnv::default(),
            )
            .unwrap_err();
            assert!(!err.to_string().contains("s3cret"), "{err}");
            assert_eq!(key_of(err), key);
        }
    }

    #[test]
    fn sentinel_requires_master() {
        let err = parse(
            &meta(&[("brokerUrl", "sentinel://s1:26379")]),
            &BrokerEnv::default(),
        )
        .unwrap_err();
        assert_eq!(key_of(err), "sentinelMaster");
        let t = parse(
            &meta(&[
                ("brokerUrl", "sentinel://s1:26379"),
                ("sentinelMaster", "mymaster"),
            ]),
            &BrokerEnv::default(),
        )
        .unwrap();
        assert!(t.query.backend.redacted().contains("master mymaster"));
    }

    #[test]
    fn values_parse() {
        let t = parse(
            &meta(&[
                ("brokerUrl", "redis://h/0"),
                ("queues", " orders , emails,orders "),
                ("queueLength", "2.5"),
                ("activationQueueLength", "3"),
                ("scaleOnInFlight", "false"),
                ("scaleOnRunning", "0"),
                ("globalKeyprefix", "app:"),
                ("prioritySteps", "9, 0,5"),
                ("separator", ":"),
            ]),
            &BrokerEnv::default(),
        )
        .unwrap();
        assert_eq!(t.query.queues, ["orders", "emails"]);
        assert_eq!(t.queue_length, 2.5);
        assert!(!t.is_active(3) && t.is_active(4));
        assert!(!t.query.in_flight && !t.query.running);
        let expected = RedisLayout {
            prefix: "app:".into(),
            priority_steps: vec![0, 5, 9],
            separator: ":".into(),
        };
        assert!(matches!(&t.query.backend, Backend::Redis { layout, .. } if *layout == expected));
    }

    #[test]
    fn derived_metric_names() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(derive_metric_name(&q(&["celery"])), "celery-celery");
        assert_eq!(
            derive_metric_name(&q(&["orders", "emails2"])),
            "celery-orders-emails2"
        );
        let a = derive_metric_name(&q(&["orders.high"]));
        let b = derive_metric_name(&q(&["orders_high"]));
        assert_ne!(a, b);
        assert!(a.starts_with("celery-orders-high-"), "{a}");
        let long = derive_metric_name(&q(&[&"x".repeat(200)]));
        assert!(long.len() <= MAX_METRIC_NAME, "{long}");
        assert_eq!(long, derive_metric_name(&q(&[&"x".repeat(200)])));
        for name in [a, b, long] {
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
    }
}
