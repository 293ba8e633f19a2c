//! A vhost's exchanges and bindings (from the management API), and RabbitMQ's routing rules over
//! them: which queues a message published to an exchange with a routing key reaches. Pure logic.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use crate::broker::census::topic_matches;

/// Exchange-to-exchange hops followed at most (RabbitMQ allows cycles; routing visits each
/// exchange once).
const MAX_HOPS: usize = 16;

/// One row of `GET /api/bindings/{vhost}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BindingRow {
    pub source: String,
    pub destination: String,
    pub destination_type: String,
    #[serde(default)]
    pub routing_key: String,
}

/// One row of `GET /api/exchanges/{vhost}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ExchangeRow {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// The routing table of one vhost.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// Exchange name -> type (`direct`, `topic`, `fanout`, `headers`, plugin types).
    kinds: HashMap<String, String>,
    /// Exchange name -> its bindings.
    bindings: HashMap<String, Vec<BindingRow>>,
}

impl Routes {
    pub fn new(exchanges: Vec<ExchangeRow>, bindings: Vec<BindingRow>) -> Self {
        let kinds = exchanges.into_iter().map(|e| (e.name, e.kind)).collect();
        let mut by_source: HashMap<String, Vec<BindingRow>> = HashMap::new();
        for b in bindings {
            by_source.entry(b.source.clone()).or_default().push(b);
        }
        Routes {
            kinds,
            bindings: by_source,
        }
    }

    /// Whether `exchange` is known.
    pub fn knows(&self, exchange: &str) -> bool {
        exchange.is_empty() || self.kinds.contains_key(exchange)
    }

    /// The queues RabbitMQ routes a message published to `exchange` with `routing_key` to:
    /// the default exchange delivers to the queue named by the key; `direct` to bindings whose
    /// key equals it; `topic` to bindings whose pattern matches it (`*` one word, `#` zero or
    /// more); `fanout` to every binding. Exchange-to-exchange bindings are followed. `headers`
    /// and unknown types route nowhere here (the message's headers are not in the census).
    pub fn route(&self, exchange: &str, routing_key: &str) -> Vec<String> {
        if exchange.is_empty() {
            return vec![routing_key.to_string()];
        }
        let mut queues = Vec::new();
        let mut seen = HashSet::new();
        let mut todo = vec![exchange.to_string()];
        while let Some(ex) = todo.pop() {
            if !seen.insert(ex.clone()) || seen.len() > MAX_HOPS {
                continue;
            }
            let kind = self.kinds.get(&ex).map(String::as_str).unwrap_or("");
            for b in self.bindings.get(&ex).into_iter().flatten() {
                let hit = match kind {
                    "direct" => b.routing_key == routing_key,
                    "topic" => topic_matches(&b.routing_key, routing_key),
                    "fanout" => true,
                    _ => false,
                };
                if !hit {
                    continue;
                }
                match b.destination_type.as_str() {
                    "queue" => queues.push(b.destination.clone()),
                    "exchange" => todo.push(b.destination.clone()),
                    _ => {}
                }
            }
        }
        queues.sort();
        queues.dedup();
        queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(source: &str, dest: &str, key: &str) -> BindingRow {
        BindingRow {
            source: source.into(),
            destination: dest.into(),
            destination_type: if dest.starts_with("ex-") {
                "exchange"
            } else {
                "queue"
            }
            .into(),
            routing_key: key.into(),
        }
    }

    fn e(name: &str, kind: &str) -> ExchangeRow {
        ExchangeRow {
            name: name.into(),
            kind: kind.into(),
        }
    }

    #[test]
    fn rabbitmq_rules_for_each_exchange_type() {
        let routes = Routes::new(
            vec![
                e("jobs", "topic"),
                e("direct", "direct"),
                e("fan", "fanout"),
                e("ex-inner", "direct"),
                e("hdr", "headers"),
            ],
            vec![
                b("", "reports", "reports"),
                b("jobs", "reports", "report.#"),
                b("jobs", "mail", "*.mail"),
                b("direct", "billing", "invoice"),
                b("direct", "billing-eu", "invoice"),
                b("fan", "fa", ""),
                b("fan", "fb", "anything"),
                b("fan", "ex-inner", ""),
                b("ex-inner", "inner", "k"),
                b("hdr", "h", ""),
            ],
        );
        assert_eq!(routes.route("jobs", "report.daily"), ["reports"]);
        assert_eq!(routes.route("jobs", "report"), ["reports"]);
        assert_eq!(routes.route("jobs", "eu.mail"), ["mail"]);
        assert!(routes.route("jobs", "eu.x.mail").is_empty());
        assert_eq!(routes.route("direct", "invoice"), ["billing", "billing-eu"]);
        assert!(routes.route("direct", "billing").is_empty());
        assert_eq!(routes.route("fan", "k"), ["fa", "fb", "inner"]);
        assert_eq!(routes.route("fan", "x"), ["fa", "fb"]);
        assert_eq!(routes.route("", "celery"), ["celery"]);
        assert!(routes.route("hdr", "").is_empty());
        assert!(routes.route("missing", "k").is_empty());
        assert!(routes.knows("jobs") && !routes.knows("missing"));
    }

    #[test]
    fn exchange_cycles_end() {
        let routes = Routes::new(
            vec![e("ex-a", "fanout"), e("ex-b", "fanout")],
            vec![
                b("ex-a", "ex-b", ""),
                b("ex-b", "ex-a", ""),
                b("ex-b", "q", ""),
            ],
        );
        assert_eq!(routes.route("ex-a", ""), ["q"]);
    }
}
