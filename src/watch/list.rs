//! The watch list (`--watch`, README "Watched queues"): which queue sets of which configured
//! brokers the scaler reads on its own, parsed and checked against the scaler's environment
//! before anything binds.
//!
//! Syntax: entries separated by `;` or newlines, each `[BROKER:]QUEUE[,QUEUE...][?KEY=VALUE&...]`.
//! `BROKER` names a named broker (`CELERY_KEDA_BROKER_<NAME>`); without it (or with an empty
//! name, for a queue whose name holds `:`) the default broker (`CELERY_BROKER_URL`). The options
//! are trigger metadata keys that shape a reading; URLs never appear here.

use std::collections::{HashMap, HashSet};

use crate::broker::DepthQuery;
use crate::broker_env::{BrokerEnv, DEFAULT_BROKER_VAR};
use crate::error::{Error, Result};
use crate::metadata::{self, InlineUrls, Limits};

/// The flag that sets the watch list, named in every error.
pub const WATCH_FLAG: &str = "--watch";

/// The `broker` label of the default broker's watched queues.
pub const DEFAULT_BROKER_LABEL: &str = "default";

/// Trigger metadata keys a watch entry may set after `?`: those that say how to read, not what
/// to scale to (`queueLength`...) nor where the broker is (named brokers only).
const OPTION_KEYS: &[&str] = &[
    "scaleOnInFlight",
    "scaleOnRunning",
    "globalKeyprefix",
    "prioritySteps",
    "separator",
    "sentinelMaster",
    "managementUrl",
    "vhost",
    "queueNamePrefix",
    "awsRegion",
    "awsEndpoint",
];

/// One watched queue set, ready to read.
#[derive(Clone, Debug, PartialEq)]
pub struct Watched {
    /// The `broker` label: the named broker's normalised name, or `default`.
    pub broker: String,
    /// The queues, in the order the entry gives them (each one's gauges carry its name).
    pub queues: Vec<String>,
    /// The reading: equal to the query of a trigger with the same broker, queues and options,
    /// so the two share readings.
    pub query: DepthQuery,
}

/// Parses `text` (the value of `--watch`) and checks every entry against `env`: each named
/// broker exists, the default broker is configured where an entry uses it, the options parse as
/// trigger metadata within `limits`, and no (broker, queue) pair is watched twice. An error names
/// `--watch` and the entry.
pub fn parse(text: &str, env: &BrokerEnv, limits: &Limits) -> Result<Vec<Watched>> {
    let mut watched = Vec::new();
    let mut seen = HashSet::new();
    for entry in text
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let w = parse_entry(entry, env, limits)?;
        for q in &w.queues {
            if !seen.insert((w.broker.clone(), q.clone())) {
                return Err(invalid(
                    entry,
                    format!(
                        "queue `{q}` of broker `{}` is already watched by an earlier entry (each queue's gauges come from one entry)",
                        w.broker
                    ),
                ));
            }
        }
        watched.push(w);
    }
    Ok(watched)
}

fn parse_entry(entry: &str, env: &BrokerEnv, limits: &Limits) -> Result<Watched> {
    let (set, options) = entry.split_once('?').unwrap_or((entry, ""));
    let (broker, queues) = match set.split_once(':') {
        Some((b, q)) => (Some(b.trim()).filter(|b| !b.is_empty()), q),
        None => (None, set),
    };
    let mut meta = HashMap::new();
    for pair in options.split('&').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(entry, format!("option `{}` must be KEY=VALUE", pair.trim())))?;
        let key = key.trim();
        if !OPTION_KEYS.contains(&key) {
            return Err(invalid(
                entry,
                format!(
                    "option `{key}` is not one a watch entry takes (these are: {}); brokers are named, never given by URL",
                    OPTION_KEYS.join(", ")
                ),
            ));
        }
        meta.insert(key.to_string(), value.trim().to_string());
    }
    meta.insert("queues".to_string(), queues.trim().to_string());
    let label = match broker {
        Some(name) => {
            meta.insert("broker".to_string(), name.to_string());
            crate::broker_env::normalise_name(name)
        }
        None => {
            if env.default.is_none() {
                return Err(invalid(
                    entry,
                    format!("it names no broker and {DEFAULT_BROKER_VAR} is not set: write BROKER:QUEUES with a named broker, or set {DEFAULT_BROKER_VAR}"),
                ));
            }
            DEFAULT_BROKER_LABEL.to_string()
        }
    };
    if broker.is_some() && label == DEFAULT_BROKER_LABEL {
        return Err(invalid(
            entry,
            format!("a named broker called `{DEFAULT_BROKER_LABEL}` cannot be watched: its gauges would look like the default broker's ({DEFAULT_BROKER_VAR}); rename it"),
        ));
    }
    // The operator's own configuration: parsed as a trigger would be, without the policy of
    // any namespace (its brokers are the operator's too).
    let trigger = metadata::parse_for(&meta, env, limits, InlineUrls::Accepted)
        .map_err(|e| invalid(entry, e.to_string()))?;
    Ok(Watched {
        broker: label,
        queues: trigger.query.queues.clone(),
        query: trigger.query,
    })
}

fn invalid(entry: &str, why: String) -> Error {
    Error::invalid(WATCH_FLAG, format!("{WATCH_FLAG} entry `{entry}`: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> BrokerEnv {
        BrokerEnv::from_vars([
            (
                DEFAULT_BROKER_VAR.to_string(),
                "redis://r:6379/0".to_string(),
            ),
            (
                "CELERY_KEDA_BROKER_ORDERS".to_string(),
                "amqp://u:secret@rabbit/".to_string(),
            ),
        ])
        .unwrap()
    }

    fn error(text: &str, env: &BrokerEnv) -> String {
        match parse(text, env, &Limits::default()) {
            Err(Error::InvalidMetadata { key, message }) => {
                assert_eq!(key, WATCH_FLAG);
                message
            }
            other => panic!("{text}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn entries_name_brokers_queues_and_options() {
        let w = parse(
            "orders:celery,emails;\n reports ; :app:jobs?globalKeyprefix=p:&scaleOnRunning=false",
            &env(),
            &Limits::default(),
        )
        .unwrap();
        let sets: Vec<(&str, Vec<&str>)> = w
            .iter()
            .map(|w| {
                (
                    w.broker.as_str(),
                    w.queues.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            sets,
            [
                ("orders", vec!["celery", "emails"]),
                ("default", vec!["reports"]),
                ("default", vec!["app:jobs"]),
            ]
        );
        assert_eq!(w[0].query.backend.kind(), "rabbitmq");
        assert!(w[1].query.running && !w[2].query.running);
        assert!(parse("  ", &env(), &Limits::default()).unwrap().is_empty());
    }

    #[test]
    fn a_watched_set_reads_what_the_same_trigger_reads() {
        let w = parse("orders:celery,emails", &env(), &Limits::default()).unwrap();
        let meta = HashMap::from([
            ("broker".to_string(), "orders".to_string()),
            ("queues".to_string(), "celery,emails".to_string()),
            ("queueLength".to_string(), "7".to_string()),
        ]);
        let trigger = metadata::parse(&meta, &env()).unwrap();
        assert_eq!(w[0].query, trigger.query);
    }

    #[test]
    fn bad_entries_name_the_flag_and_the_entry() {
        let env = env();
        let m = error("nope:celery", &env);
        assert!(
            m.contains("entry `nope:celery`") && m.contains("nope"),
            "{m}"
        );
        let m = error("celery?brokerUrl=redis://x:pw@h/0", &env);
        assert!(m.contains("option `brokerUrl`") && !m.contains("pw"), "{m}");
        let m = error("celery?prioritySteps", &env);
        assert!(m.contains("KEY=VALUE"), "{m}");
        let m = error("a,b;b", &env);
        assert!(
            m.contains("queue `b`") && m.contains("already watched"),
            "{m}"
        );
        let m = error("orders:", &env);
        assert!(m.contains("queues"), "{m}");
        let m = error("celery", &BrokerEnv::default());
        assert!(m.contains(DEFAULT_BROKER_VAR), "{m}");
        let named_default = BrokerEnv::from_vars([(
            "CELERY_KEDA_BROKER_DEFAULT".to_string(),
            "redis://r/0".to_string(),
        )])
        .unwrap();
        let m = error("default:celery", &named_default);
        assert!(m.contains("rename"), "{m}");
        // The same queue on two brokers is two series.
        assert_eq!(
            parse("celery;orders:celery", &env, &Limits::default())
                .unwrap()
                .len(),
            2
        );
    }
}
