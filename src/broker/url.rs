//! Parses Celery broker URLs (`broker_url` as Celery spells it) into broker targets.
//!
//! Only the scheme is looked at here; each backend parses the rest of its own URLs.

use super::rabbitmq::RabbitTarget;
use super::redis::RedisTarget;
use super::sqs::SqsTarget;
use crate::error::{Error, Result};
use crate::secret::redact_url;

/// Which broker a trigger reads, with everything needed to connect to it.
///
/// Equal targets share one connection (pool): the value is the registry key. `Debug` is
/// implemented by each target without credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BrokerTarget {
    /// A Redis server, Sentinel-managed master, or Unix socket.
    Redis(RedisTarget),
    /// A RabbitMQ virtual host.
    RabbitMq(RabbitTarget),
    /// Amazon SQS (or a compatible endpoint) in one region with one set of credentials.
    Sqs(SqsTarget),
}

impl BrokerTarget {
    /// Parses `url`, which came from metadata key (or environment variable) `key`.
    ///
    /// Errors name `key` and quote the URL with its password redacted.
    pub fn parse(key: &str, url: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::invalid(key, "the broker URL is empty"));
        }
        let scheme = url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::invalid(
                    key,
                    format!(
                        "`{}` is not a URL: expected a Celery broker URL such as redis://host:6379/0",
                        redact_url(url)
                    ),
                )
            })?;
        match scheme.as_str() {
            "redis" | "rediss" | "redis+socket" | "socket" | "sentinel" => {
                RedisTarget::parse(key, url).map(BrokerTarget::Redis)
            }
            "amqp" | "amqps" | "pyamqp" => RabbitTarget::parse(key, url).map(BrokerTarget::RabbitMq),
            "sqs" => SqsTarget::parse(key, url).map(BrokerTarget::Sqs),
            other => Err(Error::invalid(
                key,
                format!(
                    "unsupported broker scheme `{other}://` in `{}` (supported: redis://, rediss://, redis+socket://, sentinel://, amqp://, amqps://, pyamqp://, sqs://)",
                    redact_url(url)
                ),
            )),
        }
    }

    /// The URL with its password replaced by `***`, for logs and messages.
    pub fn redacted(&self) -> String {
        match self {
            BrokerTarget::Redis(t) => t.redacted(),
            BrokerTarget::RabbitMq(t) => t.redacted(),
            BrokerTarget::Sqs(t) => t.redacted(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_schemes_naming_the_key() {
        let err = BrokerTarget::parse("brokerUrl", "kafka://u:secret@h").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("metadata key `brokerUrl`"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn rejects_non_urls_and_empty() {
        assert!(matches!(
            BrokerTarget::parse("broker", "localhost:6379"),
            Err(Error::InvalidMetadata { key, .. }) if key == "broker"
        ));
        assert!(BrokerTarget::parse("brokerUrl", "  ").is_err());
    }
}
