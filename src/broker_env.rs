//! Brokers configured in the scaler's own environment (named brokers, the default broker, and
//! the namespaces that may use each named broker), so ScaledObjects need no secrets.

use std::collections::BTreeMap;

use crate::allowlist::NamespaceList;
use crate::broker::sqs::{parse_predefined, PredefinedQueues};
use crate::broker::BrokerTarget;
use crate::error::{Error, Result};

/// Environment variable prefix of a named broker's namespace list:
/// `CELERY_KEDA_NAMESPACES_<NAME>=team-a,team-b-*`. A different prefix from
/// `CELERY_KEDA_BROKER_<NAME>`, so no broker name can collide with it.
pub const NAMESPACES_PREFIX: &str = "CELERY_KEDA_NAMESPACES_";

/// Environment variable prefix of a named SQS broker's predefined queues (kombu's
/// `predefined_queues`, the same JSON as the `predefinedQueues` metadata key):
/// `CELERY_KEDA_PREDEFINED_QUEUES_<NAME>={"celery": {"url": "https://sqs..."}}`.
pub const PREDEFINED_QUEUES_PREFIX: &str = "CELERY_KEDA_PREDEFINED_QUEUES_";

/// Brokers configured in the scaler's own environment.
#[derive(Clone, Default)]
pub struct BrokerEnv {
    /// `CELERY_KEDA_BROKER_<NAME>=<url>`, keyed by the normalised name (lowercase, `_` as `-`).
    pub named: BTreeMap<String, BrokerTarget>,
    /// `CELERY_BROKER_URL`: used when a trigger names no broker at all.
    pub default: Option<BrokerTarget>,
    /// `CELERY_KEDA_NAMESPACES_<NAME>=team-a,team-b-*`: the namespaces that may use a named
    /// broker, keyed like `named`. A broker without a list is open to every namespace.
    pub namespaces: BTreeMap<String, NamespaceList>,
    /// `CELERY_KEDA_PREDEFINED_QUEUES_<NAME>`: a named SQS broker's predefined queues, keyed
    /// like `named`; used by triggers naming the broker without a `predefinedQueues` of their own.
    pub predefined: BTreeMap<String, PredefinedQueues>,
}

/// Environment variable prefix of named brokers.
pub const NAMED_BROKER_PREFIX: &str = "CELERY_KEDA_BROKER_";
/// The environment variable of the default broker (the one Celery users already set).
pub const DEFAULT_BROKER_VAR: &str = "CELERY_BROKER_URL";

impl BrokerEnv {
    /// Reads named brokers and the default broker from environment variables, validating each
    /// URL. An error names the variable (never its value's password).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut env = BrokerEnv::default();
        let mut lists = Vec::new();
        let mut predefined = Vec::new();
        for (name, value) in vars {
            if let Some(suffix) = name.strip_prefix(PREDEFINED_QUEUES_PREFIX) {
                if !suffix.is_empty() {
                    predefined.push((
                        normalise_name(suffix),
                        parse_predefined(&name, &value)?,
                        name,
                    ));
                }
            } else if let Some(suffix) = name.strip_prefix(NAMESPACES_PREFIX) {
                if !suffix.is_empty() {
                    lists.push((
                        normalise_name(suffix),
                        NamespaceList::parse(&name, &value)?,
                        name,
                    ));
                }
            } else if let Some(suffix) = name.strip_prefix(NAMED_BROKER_PREFIX) {
                if suffix.is_empty() {
                    continue;
                }
                env.named
                    .insert(normalise_name(suffix), BrokerTarget::parse(&name, &value)?);
            } else if name == DEFAULT_BROKER_VAR && !value.trim().is_empty() {
                env.default = Some(BrokerTarget::parse(&name, &value)?);
            }
        }
        // A list for a broker that does not exist is a typo that would leave the broker open.
        for (broker, list, var) in lists {
            if !env.named.contains_key(&broker) {
                return Err(Error::invalid(
                    var,
                    format!(
                        "names broker `{broker}`, but no {NAMED_BROKER_PREFIX}{} is configured",
                        broker.to_ascii_uppercase().replace('-', "_")
                    ),
                ));
            }
            env.namespaces.insert(broker, list);
        }
        // Predefined queues belong to a named SQS broker.
        for (broker, map, var) in predefined {
            if !matches!(env.named.get(&broker), Some(BrokerTarget::Sqs(_))) {
                return Err(Error::invalid(
                    var,
                    format!(
                        "names broker `{broker}`, but no sqs:// {NAMED_BROKER_PREFIX}{} is configured",
                        broker.to_ascii_uppercase().replace('-', "_")
                    ),
                ));
            }
            env.predefined.insert(broker, map);
        }
        Ok(env)
    }
}

/// Broker names are matched case-insensitively, with `-` and `_` equal.
pub fn normalise_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_env_broker_names_the_variable() {
        let err = BrokerEnv::from_vars([(
            "CELERY_KEDA_BROKER_X".to_string(),
            "redis://:pw@h/zz".to_string(),
        )])
        .err()
        .unwrap();
        assert!(
            matches!(&err, Error::InvalidMetadata { key, .. } if key == "CELERY_KEDA_BROKER_X"),
            "{err:?}"
        );
    }
}
