//! kombu's Redis key layout: which lists hold a queue's ready messages, and how an entry of the
//! `unacked` hash is routed back to a queue. Pure logic, no I/O.

use std::collections::HashMap;

use serde::de::IgnoredAny;

use crate::broker::census::topic_matches;

/// kombu's default `priority_steps`.
pub const DEFAULT_PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// kombu's default separator between a queue name and its priority step (`sep`).
pub const DEFAULT_SEPARATOR: &str = "\x06\x16";
/// The hash in which kombu's ack emulation keeps delivered but unacknowledged messages.
pub const UNACKED_KEY: &str = "unacked";
/// Prefix of the sets that hold an exchange's bindings.
pub const BINDING_PREFIX: &str = "_kombu.binding.";

/// The key layout of one Celery app on Redis (kombu transport options).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RedisLayout {
    /// `global_keyprefix`: prepended to every key kombu touches.
    pub prefix: String,
    /// `priority_steps`, sorted and without duplicates.
    pub priority_steps: Vec<u8>,
    /// `sep`, between a queue name and its priority step.
    pub separator: String,
}

impl Default for RedisLayout {
    fn default() -> Self {
        RedisLayout {
            prefix: String::new(),
            priority_steps: DEFAULT_PRIORITY_STEPS.to_vec(),
            separator: DEFAULT_SEPARATOR.to_string(),
        }
    }
}

impl RedisLayout {
    /// The lists that hold `queue`'s ready messages, one per priority step, as kombu's
    /// `_q_for_pri` names them: the bare queue name for step 0, `queue + sep + step` otherwise.
    pub fn ready_keys(&self, queue: &str) -> Vec<(u8, String)> {
        self.priority_steps
            .iter()
            .map(|&step| {
                let key = if step == 0 {
                    format!("{}{queue}", self.prefix)
                } else {
                    format!("{}{queue}{}{step}", self.prefix, self.separator)
                };
                (step, key)
            })
            .collect()
    }

    /// The `unacked` hash, under the prefix.
    pub fn unacked_key(&self) -> String {
        format!("{}{UNACKED_KEY}", self.prefix)
    }

    /// The binding set of `exchange`, under the prefix.
    pub fn binding_key(&self, exchange: &str) -> String {
        format!("{}{BINDING_PREFIX}{exchange}", self.prefix)
    }

    /// Parses a binding set member: `routing_key + sep + pattern + sep + queue`.
    pub fn parse_binding(&self, member: &str) -> Option<Binding> {
        let mut parts = member.splitn(3, self.separator.as_str());
        let routing_key = parts.next()?.to_string();
        let pattern = parts.next()?.to_string();
        let queue = parts.next()?.to_string();
        Some(Binding {
            routing_key,
            pattern,
            queue,
        })
    }
}

/// One row of an exchange's binding table.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Binding {
    pub routing_key: String,
    pub pattern: String,
    pub queue: String,
}

/// Reads the routing of an `unacked` hash value, `[message, exchange, routing_key]`, without
/// building the message itself.
pub fn unacked_routing(value: &[u8]) -> Option<(String, String)> {
    let (_, exchange, routing_key): (IgnoredAny, Option<String>, Option<String>) =
        serde_json::from_slice(value).ok()?;
    Some((
        exchange.unwrap_or_default(),
        routing_key.unwrap_or_default(),
    ))
}

/// The queues a message published to `exchange` with `routing_key` goes back to, as kombu's
/// `_lookup` resolves them on restore: the routing key itself on the default exchange,
/// otherwise the bound queues whose binding key matches (exactly, or as an AMQP topic pattern).
pub fn route<'a>(
    exchange: &str,
    routing_key: &'a str,
    tables: &'a HashMap<String, Vec<Binding>>,
) -> Vec<&'a str> {
    if exchange.is_empty() {
        return vec![routing_key];
    }
    let Some(table) = tables.get(exchange) else {
        return Vec::new();
    };
    let exact: Vec<&str> = table
        .iter()
        .filter(|b| b.routing_key == routing_key)
        .map(|b| b.queue.as_str())
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    table
        .iter()
        .filter(|b| {
            (b.routing_key.contains('*') || b.routing_key.contains('#'))
                && topic_matches(&b.routing_key, routing_key)
        })
        .map(|b| b.queue.as_str())
        .collect()
}

/// Parses `\xHH` and `\\` escapes, so a YAML value `\x06\x16` means kombu's default separator.
pub fn unescape(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '\\' => out.push('\\'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                if hex.len() != 2 {
                    return None;
                }
                out.push(char::from(u8::from_str_radix(&hex, 16).ok()?));
            }
            't' => out.push('\t'),
            _ => return None,
        }
    }
    Some(out)
}

/// Shows a key for people: control characters as `\xHH`.
pub fn printable(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\x{:02x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ready_keys_match_kombu() {
        let l = RedisLayout::default();
        let keys: Vec<String> = l.ready_keys("celery").into_iter().map(|(_, k)| k).collect();
        assert_eq!(
            keys,
            [
                "celery",
                "celery\x06\x163",
                "celery\x06\x166",
                "celery\x06\x169"
            ]
        );
    }

    #[test]
    fn prefix_and_custom_steps_and_separator() {
        let l = RedisLayout {
            prefix: "app:".into(),
            priority_steps: vec![0, 5],
            separator: ":".into(),
        };
        let keys: Vec<String> = l.ready_keys("q").into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, ["app:q", "app:q:5"]);
        assert_eq!(l.unacked_key(), "app:unacked");
        assert_eq!(l.binding_key("q"), "app:_kombu.binding.q");
    }

    #[test]
    fn binding_members_parse() {
        let l = RedisLayout::default();
        assert_eq!(
            l.parse_binding("orders\x06\x16\x06\x16orders"),
            Some(Binding {
                routing_key: "orders".into(),
                pattern: String::new(),
                queue: "orders".into()
            })
        );
        assert_eq!(l.parse_binding("broken"), None);
    }

    #[test]
    fn unacked_values_yield_exchange_and_routing_key() {
        let v = br#"[{"body": "e30=", "headers": {"x": [1, {"y": "z"}]}}, "celery", "celery"]"#;
        assert_eq!(unacked_routing(v), Some(("celery".into(), "celery".into())));
        assert_eq!(
            unacked_routing(br#"[{}, null, "q"]"#),
            Some((String::new(), "q".into()))
        );
        assert_eq!(unacked_routing(b"not json"), None);
        assert_eq!(unacked_routing(br#"[{}, "a"]"#), None);
    }

    #[test]
    fn routing_follows_bindings() {
        let mut tables = HashMap::new();
        tables.insert(
            "celery".to_string(),
            vec![Binding {
                routing_key: "celery".into(),
                pattern: String::new(),
                queue: "celery".into(),
            }],
        );
        tables.insert(
            "tasks".to_string(),
            vec![
                Binding {
                    routing_key: "orders.*".into(),
                    pattern: String::new(),
                    queue: "orders".into(),
                },
                Binding {
                    routing_key: "mail".into(),
                    pattern: String::new(),
                    queue: "mail".into(),
                },
            ],
        );
        assert_eq!(route("celery", "celery", &tables), ["celery"]);
        assert_eq!(route("", "direct-q", &tables), ["direct-q"]);
        assert_eq!(route("tasks", "mail", &tables), ["mail"]);
        assert_eq!(route("tasks", "orders.eu", &tables), ["orders"]);
        assert!(route("tasks", "other", &tables).is_empty());
        assert!(route("unknown", "celery", &tables).is_empty());
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"\x06\x16").as_deref(), Some("\x06\x16"));
        assert_eq!(unescape("::").as_deref(), Some("::"));
        assert_eq!(unescape(r"a\\b").as_deref(), Some("a\\b"));
        assert_eq!(unescape(r"\x0"), None);
        assert_eq!(unescape(r"\q"), None);
        assert_eq!(printable("q\x06\x163"), r"q\x06\x163");
    }
}
