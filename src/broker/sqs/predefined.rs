//! kombu's `predefined_queues` SQS transport option, as the `predefinedQueues` key (or a named
//! broker's `CELERY_KEDA_PREDEFINED_QUEUES_<NAME>`) gives it: the same JSON object, queue name
//! -> `url` and the optional per-queue `access_key_id` / `secret_access_key` (and kombu's
//! `region`). A queue in the map is read at its URL, never looked up by name.
//!
//! kombu looks a Celery queue up in the map by its SQS name (`queue_name_prefix` + name, with
//! its character translation: `orders.high` is `orders-high`), and refuses a queue that is not
//! there; so does the scaler, before any request.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use url::Url;

use super::names::{parse_region, sqs_queue_name};
use crate::broker::hosts::{pin_url, Contact, HostField};
use crate::error::{Error, Result};
use crate::secret::{misread_char, redact_url, shown, Secret};

/// One queue of the map: where it is and, optionally, its own keys and region.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PredefinedQueue {
    /// The queue's URL as given: the `QueueUrl` of every request.
    pub url: String,
    /// Where its requests go when the broker names no endpoint: the URL's scheme, host and port
    /// (a checked address may replace the host).
    pub endpoint: String,
    /// kombu's `access_key_id` / `secret_access_key` of this queue; `None`: the broker URL's
    /// keys (or the scaler's AWS identity), as kombu falls back to the connection's.
    pub access_key: Option<(String, Secret)>,
    /// kombu's per-queue `region`: wins over everything.
    pub region: Option<String>,
    /// The region named by an AWS URL's host (`sqs.<region>.amazonaws.com`); `awsRegion` wins
    /// over it.
    pub url_region: Option<String>,
}

impl fmt::Debug for PredefinedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", redact_url(&self.url))?;
        if let Some((id, _)) = &self.access_key {
            write!(f, " (keys {id}:***)")?;
        }
        Ok(())
    }
}

/// The map as given: kombu's key (the SQS name of a Celery queue) -> queue.
pub type PredefinedQueues = BTreeMap<String, PredefinedQueue>;

/// Parses the JSON object of `predefined_queues` from metadata key (or variable) `key`. Error
/// messages never quote a value of the map (keys are secrets; a URL is quoted redacted).
pub fn parse_predefined(key: &str, raw: &str) -> Result<PredefinedQueues> {
    // Parsed as a value first: serde's type errors would quote the offending value.
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| {
        Error::invalid(
            key,
            format!(
                "is not JSON ({} at line {} column {}): give the object of kombu's predefined_queues, e.g. {{\"celery\": {{\"url\": \"https://sqs.us-east-1.amazonaws.com/123456789012/my-queue\"}}}}",
                match e.classify() {
                    serde_json::error::Category::Eof => "unexpected end",
                    _ => "syntax error",
                },
                e.line(),
                e.column()
            ),
        )
    })?;
    let serde_json::Value::Object(entries) = value else {
        return Err(Error::invalid(
            key,
            "must be a JSON object of queue name -> {\"url\": ..., \"access_key_id\": ..., \"secret_access_key\": ...}",
        ));
    };
    if entries.is_empty() {
        return Err(Error::invalid(key, "names no queue"));
    }
    let mut map = BTreeMap::new();
    for (name, entry) in entries {
        let name_shown = shown(&name);
        let serde_json::Value::Object(fields) = entry else {
            return Err(Error::invalid(
                key,
                format!("queue `{name_shown}`: must be an object with a `url`"),
            ));
        };
        let text = |field: &str| -> Result<Option<String>> {
            match fields.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                    Ok(Some(s.trim().to_string()))
                }
                Some(_) => Err(Error::invalid(
                    key,
                    format!("queue `{name_shown}`: `{field}` must be a non-empty string"),
                )),
            }
        };
        let url = text("url")?.ok_or_else(|| {
            Error::invalid(key, format!("queue `{name_shown}`: `url` is missing"))
        })?;
        let (endpoint, url_region) = parse_queue_url(key, &name_shown, &url)?;
        let access_key = match (text("access_key_id")?, text("secret_access_key")?) {
            (Some(id), Some(secret)) => Some((id, Secret::new(secret))),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    key,
                    format!(
                        "queue `{name_shown}`: give both access_key_id and secret_access_key, or neither (the broker URL's keys are used)"
                    ),
                ))
            }
        };
        let region = match text("region")? {
            Some(r) => Some(parse_region(&r).map_err(|_| {
                Error::invalid(
                    key,
                    format!(
                        "queue `{name_shown}`: `region` must be an AWS region such as us-east-1, got `{}`",
                        shown(&r)
                    ),
                )
            })?),
            None => None,
        };
        map.insert(
            name,
            PredefinedQueue {
                url,
                endpoint,
                access_key,
                region,
                url_region,
            },
        );
    }
    Ok(map)
}

/// Validates a queue URL: http(s), a host, a path, no credentials; returns its endpoint
/// (`scheme://host[:port]`) and the region an AWS host names.
fn parse_queue_url(key: &str, name: &str, raw: &str) -> Result<(String, Option<String>)> {
    let bad = || {
        Error::invalid(
            key,
            format!(
                "queue `{name}`: `url` must be an http:// or https:// queue URL with a host and a path, and no credentials, query, fragment, backslash or control character, got `{}`",
                redact_url(raw)
            ),
        )
    };
    if raw.contains('@') || misread_char(raw).is_some() {
        return Err(bad());
    }
    let url = Url::parse(raw).map_err(|_| bad())?;
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    if !matches!(url.scheme(), "http" | "https")
        || url.query().is_some()
        || url.fragment().is_some()
        || url.path().trim_matches('/').is_empty()
    {
        return Err(bad());
    }
    let endpoint = match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    Ok((endpoint, region_of_host(host)))
}

/// The region an AWS SQS host names: `sqs.<region>.amazonaws.com` (and VPC endpoint names that
/// hold `sqs.<region>`), or the legacy `<region>.queue.amazonaws.com`.
fn region_of_host(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    if !host.contains(".amazonaws.com") {
        return None;
    }
    let candidate = labels
        .windows(2)
        .find(|w| w[0] == "sqs")
        .map(|w| w[1])
        .or_else(|| (labels.get(1) == Some(&"queue")).then(|| labels[0]))?;
    parse_region(candidate).ok()
}

/// The entries of `map` for the trigger's `queues`, keyed by Celery queue name, as kombu finds
/// them: by the SQS name of `prefix` + the Celery name. A queue that is not in the map is an
/// error naming `key` and the queue (kombu raises `UndefinedQueueException` for it).
pub fn select_predefined(
    map: &PredefinedQueues,
    prefix: &str,
    queues: &[String],
    key: &str,
) -> Result<BTreeMap<String, PredefinedQueue>> {
    let mut selected = BTreeMap::new();
    for queue in queues {
        let sqs_name = sqs_queue_name(prefix, queue);
        let entry = map.get(&sqs_name).ok_or_else(|| {
            let known: Vec<String> = map.keys().map(|k| shown(k)).collect();
            Error::invalid(
                key,
                format!(
                    "queue `{}` is not predefined: kombu looks it up as `{}` (queue name prefix and character translation applied) and refuses it too; predefined: {}",
                    shown(queue),
                    shown(&sqs_name),
                    known.join(", ")
                ),
            )
        })?;
        selected.insert(queue.clone(), entry.clone());
    }
    Ok(selected)
}

/// The hosts of the selected queues' URLs, in the order of their Celery names.
pub fn contacts(selected: &BTreeMap<String, PredefinedQueue>) -> Vec<Contact> {
    selected
        .values()
        .enumerate()
        .map(|(i, q)| {
            Contact::of_url(
                HostField::QueueUrl(i),
                Url::parse(&q.endpoint).ok().as_ref(),
                &q.endpoint,
            )
        })
        .collect()
}

/// Puts the checked `addr` in place of the host of queue `i`'s endpoint.
pub fn pin(selected: &mut BTreeMap<String, PredefinedQueue>, i: usize, addr: IpAddr) {
    if let Some(q) = selected.values_mut().nth(i) {
        if let Ok(mut url) = Url::parse(&q.endpoint) {
            pin_url(&mut url, addr);
            q.endpoint = url.as_str().trim_end_matches('/').to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_json() {
        let map = parse_predefined(
            "predefinedQueues",
            r#"{"celery": {"url": "https://sqs.eu-west-1.amazonaws.com/123456789012/prod-default"},
                "orders-high": {"url": "http://127.0.0.1:4566/000000000000/x.fifo",
                                "access_key_id": "AKIAOWN", "secret_access_key": "TopSecret1",
                                "backoff_policy": {"1": 10}}}"#,
        )
        .unwrap();
        let celery = &map["celery"];
        assert_eq!(celery.endpoint, "https://sqs.eu-west-1.amazonaws.com");
        assert_eq!(celery.url_region.as_deref(), Some("eu-west-1"));
        assert!(celery.access_key.is_none());
        let orders = &map["orders-high"];
        assert_eq!(orders.endpoint, "http://127.0.0.1:4566");
        assert_eq!(orders.url_region, None);
        assert!(!format!("{orders:?}").contains("TopSecret1"));
        // kombu's lookup: the SQS name of the Celery queue.
        let queues = vec!["orders.high".to_string(), "celery".to_string()];
        let selected = select_predefined(&map, "", &queues, "predefinedQueues").unwrap();
        assert_eq!(selected["orders.high"].endpoint, "http://127.0.0.1:4566");
        let err = select_predefined(&map, "prod-", &queues, "predefinedQueues").unwrap_err();
        assert!(err.to_string().contains("`prod-orders-high`"), "{err}");
        assert!(matches!(err, Error::InvalidMetadata { ref key, .. } if key == "predefinedQueues"));
        let mut selected = selected;
        pin(&mut selected, 1, "10.1.2.3".parse().unwrap());
        assert_eq!(selected["orders.high"].endpoint, "http://10.1.2.3:4566");
        assert_eq!(contacts(&selected)[1].field, HostField::QueueUrl(1));
    }

    #[test]
    fn bad_maps_name_the_key_and_never_a_secret() {
        for raw in [
            "not json TopSecret1",
            "[]",
            "{}",
            r#"{"q": "TopSecret1"}"#,
            r#"{"q": {"access_key_id": "A", "secret_access_key": "TopSecret1"}}"#,
            r#"{"q": {"url": "http://h/1/q", "secret_access_key": "TopSecret1"}}"#,
            r#"{"q": {"url": "http://h/1/q", "access_key_id": "A", "secret_access_key": 5}}"#,
            r#"{"q": {"url": "http://A:TopSecret1@h/1/q"}}"#,
            r#"{"q": {"url": "ftp://h/1/q"}}"#,
            r#"{"q": {"url": "http://h"}}"#,
            r#"{"q": {"url": "http://h/1/q", "region": "EU WEST"}}"#,
        ] {
            let err = parse_predefined("CELERY_KEDA_PREDEFINED_QUEUES_X", raw).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("CELERY_KEDA_PREDEFINED_QUEUES_X"), "{text}");
            assert!(!text.contains("TopSecret1"), "{text}");
        }
    }

    #[test]
    fn regions_of_aws_hosts() {
        assert_eq!(
            region_of_host("sqs.us-west-2.amazonaws.com").as_deref(),
            Some("us-west-2")
        );
        assert_eq!(
            region_of_host("eu-west-1.queue.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            region_of_host("vpce-1a2b.sqs.ap-south-1.vpce.amazonaws.com").as_deref(),
            Some("ap-south-1")
        );
        assert_eq!(region_of_host("localhost"), None);
    }
}
