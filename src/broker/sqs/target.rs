//! Amazon SQS broker URLs as Celery accepts them (`sqs://`, `sqs://KEY:SECRET@`, `sqs://host:port`),
//! and kombu's translation of Celery queue names into SQS queue names.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use url::Url;

use super::predefined::{self, PredefinedQueue};
use crate::broker::hosts::{pin_url, Contact, HostField};
use crate::error::{Error, Result};
use crate::secret::{at_after_host, decode, misread_char, redact_url, Secret, AT_AFTER_HOST};

/// Trigger options for SQS.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct SqsLayout {
    /// kombu's `queue_name_prefix`.
    pub queue_name_prefix: String,
    /// kombu's `predefined_queues` for the trigger's queues, by Celery queue name: each read at
    /// its URL. Empty: queues are found by name (`GetQueueUrl`).
    pub predefined: BTreeMap<String, PredefinedQueue>,
}

impl SqsLayout {
    /// The hosts of the predefined queues' URLs.
    pub fn contacts(&self) -> Vec<Contact> {
        predefined::contacts(&self.predefined)
    }

    /// Puts the checked `addr` in place of the host of predefined queue `i`'s URL.
    pub fn pin(&mut self, i: usize, addr: IpAddr) {
        predefined::pin(&mut self.predefined, i, addr);
    }

    /// Whether some queue is read with the broker URL's keys (none of its own).
    pub fn uses_broker_keys(&self) -> bool {
        self.predefined.is_empty() || self.predefined.values().any(|q| q.access_key.is_none())
    }
}

/// One SQS client: region, endpoint and credentials. Equal targets share a client.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SqsTarget {
    /// `awsRegion`; `None` means the scaler's `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// `awsEndpoint`, or `http://host:port` from the URL (as kombu builds it); `None` is AWS.
    pub endpoint: Option<String>,
    /// Static credentials from the URL; `None` means the AWS default credential chain
    /// (environment, web identity / IRSA, ECS, instance profile).
    pub access_key: Option<(String, Secret)>,
}

impl fmt::Debug for SqsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl SqsTarget {
    /// Parses a Celery SQS broker URL from metadata key (or env var) `key`.
    pub fn parse(key: &str, raw: &str) -> Result<Self> {
        // Redacted only when an error is built: parsing runs on every request.
        let bad = |why: &str| Error::invalid(key, format!("{why} in `{}`", redact_url(raw)));
        // Celery spells "credentials, AWS endpoint" as `sqs://KEY:SECRET@` (no host), which a URL
        // parser rejects: give it a placeholder host and drop it again below.
        const NO_HOST: &str = "no-host.invalid";
        let trimmed = raw.trim();
        let authority_end = trimmed
            .strip_prefix("sqs://")
            .or_else(|| trimmed.strip_prefix("SQS://"))
            .map(|rest| rest.find(['/', '?', '#']).unwrap_or(rest.len()) + "sqs://".len());
        let text = match authority_end {
            Some(end) if trimmed[..end].ends_with('@') => {
                format!("{}{NO_HOST}{}", &trimmed[..end], &trimmed[end..])
            }
            _ => trimmed.to_string(),
        };
        let url = Url::parse(&text).map_err(|e| {
            bad(&format!(
                "not a valid URL ({e}); URL-encode `/` and `+` in secret keys"
            ))
        })?;
        if !url.scheme().eq_ignore_ascii_case("sqs") {
            return Err(bad("not an sqs:// URL"));
        }
        if at_after_host(&url) {
            return Err(bad(AT_AFTER_HOST));
        }
        let access_key = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(secret)) if !user.is_empty() => {
                Some((decode(user), Secret::new(decode(secret))))
            }
            _ => {
                return Err(bad(
                    "credentials must be given as sqs://ACCESS_KEY_ID:SECRET_ACCESS_KEY@",
                ))
            }
        };
        // kombu: a host in the URL is the endpoint, http unless `is_secure` is set.
        let endpoint = url
            .host_str()
            .filter(|h| !h.is_empty() && *h != NO_HOST)
            .map(|host| match url.port() {
                Some(port) => format!("http://{host}:{port}"),
                None => format!("http://{host}"),
            });
        Ok(SqsTarget {
            region: None,
            endpoint,
            access_key,
        })
    }

    /// Every host a reading contacts: the endpoint, if one is given (without one the SDK talks
    /// to AWS's regional endpoint, not a host a trigger chooses: `awsRegion` is validated as a
    /// region name). An endpoint that does not parse here is opaque, so refused (fail closed).
    pub fn contacts(&self) -> Vec<Contact> {
        self.endpoint
            .iter()
            .map(|raw| Contact::of_url(HostField::Endpoint, Url::parse(raw).ok().as_ref(), raw))
            .collect()
    }

    /// Puts the checked `addr` in place of the endpoint's host (its only contact).
    pub fn pin(&mut self, addr: IpAddr) {
        if let Some(endpoint) = &mut self.endpoint {
            if let Ok(mut url) = Url::parse(endpoint) {
                pin_url(&mut url, addr);
                *endpoint = url.as_str().trim_end_matches('/').to_string();
            }
        }
    }

    /// A URL for people: the secret key is `***`.
    pub fn redacted(&self) -> String {
        let auth = match &self.access_key {
            Some((id, _)) => format!("{id}:***@"),
            None => String::new(),
        };
        let mut s = format!("sqs://{auth}");
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" (endpoint {e})"));
        }
        if let Some(r) = &self.region {
            s.push_str(&format!(" (region {r})"));
        }
        s
    }
}

/// Validates `awsEndpoint`: an http(s) URL with a host.
pub fn parse_endpoint(raw: &str) -> Result<String> {
    let url = Url::parse(raw.trim()).map_err(|e| {
        Error::invalid(
            "awsEndpoint",
            format!("not a valid URL ({e}): `{}`", redact_url(raw)),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || raw.contains('@')
        || misread_char(raw).is_some()
    {
        return Err(Error::invalid(
            "awsEndpoint",
            format!(
                "must be an http:// or https:// URL with a host, and no credentials, query, fragment, backslash or control character, got `{}`",
                redact_url(raw)
            ),
        ));
    }
    Ok(raw.trim().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_endpoint("http://!?:pw-in-query@localhost").unwrap_err();
        assert!(!e.to_string().contains("pw-in-query"), "{e}");
        let e = parse_endpoint("http://:pw-only@localhost:4566").unwrap_err();
        assert!(!e.to_string().contains("pw-only"), "{e}");
        let t = SqsTarget::parse("brokerUrl", "sqs://").unwrap();
        assert_eq!((t.endpoint, t.access_key), (None, None));
        let t = SqsTarget::parse("brokerUrl", "sqs://AKIAX:se%2Fcr%2Bet@").unwrap();
        let (id, secret) = t.access_key.clone().unwrap();
        assert_eq!((id.as_str(), secret.expose()), ("AKIAX", "se/cr+et"));
        assert_eq!(t.endpoint, None);
        assert_eq!(t.redacted(), "sqs://AKIAX:***@");
        let t = SqsTarget::parse("brokerUrl", "sqs://k:s@localhost:4566").unwrap();
        assert_eq!(t.endpoint.as_deref(), Some("http://localhost:4566"));
        assert!(SqsTarget::parse("brokerUrl", "sqs://onlyuser@").is_err());
        let err = SqsTarget::parse("brokerUrlFromEnv", "sqs://k:top/secret@").unwrap_err();
        assert!(!err.to_string().contains("top/secret"), "{err}");
    }

    #[test]
    fn endpoint_and_region() {
        assert_eq!(
            parse_endpoint("https://sqs.eu-west-1.amazonaws.com/").unwrap(),
            "https://sqs.eu-west-1.amazonaws.com"
        );
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("http://u:p@x").is_err());
        for raw in [
            r"http://=\;:PwaAA0aA0A@localhost",
            r"http://localhost\x",
            "http://local\thost:4566",
            "http://localhost:4566/\n/x",
        ] {
            let e = parse_endpoint(raw).unwrap_err();
            assert!(e.to_string().contains("awsEndpoint"), "{e}");
            assert!(!e.to_string().contains("PwaAA0aA0A"), "{e}");
        }
    }
}
