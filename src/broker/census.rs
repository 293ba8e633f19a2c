//! What Celery workers report they are running (remote control `inspect active`) and consuming
//! (`inspect active_queues`), and how those tasks are attributed to queues. Backends that support
//! it gather a [`Census`]; pure logic here.

use std::collections::HashMap;

use serde::Deserialize;

/// Celery's remote-control mailbox (`celery.pidbox` exchange, `reply.celery.pidbox` replies).
pub const MAILBOX: &str = "celery.pidbox";
/// Exchange the workers reply on.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// How every reply id (kombu's `oid`) of this scaler starts, so the scaler recognises what it
/// left on a broker (after a kill) and no other client's reply queue is ever touched.
pub const OID_PREFIX: &str = "celery-keda-scaler-";

/// A new reply id: [`OID_PREFIX`], the creation time (Unix seconds), and a random part. The
/// time tells a later census whether a leftover binding can still be in use.
pub fn new_oid() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{OID_PREFIX}{now}-{}", uuid::Uuid::new_v4().simple())
}

/// The creation time (Unix seconds) of a reply id made by [`new_oid`], found anywhere in `text`
/// (a queue name, a binding member); `None` when `text` names no reply queue of this scaler.
pub fn oid_created(text: &str) -> Option<u64> {
    let start = text.rfind(OID_PREFIX)? + OID_PREFIX.len();
    let rest = &text[start..];
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

/// One task a worker is executing, from its `inspect active` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningTask {
    pub worker: String,
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    /// Early ack: already acknowledged, gone from the broker. `acks_late`: still unacknowledged,
    /// so counted as in flight instead.
    pub acknowledged: bool,
    /// The queues the task was routed from, resolved by the backend.
    pub queues: Vec<String>,
}

/// The running tasks of every worker that answered one broadcast.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub tasks: Vec<RunningTask>,
    /// Workers that answered (including idle ones).
    pub workers: Vec<String>,
    /// The queues each worker consumes (its `active_queues` reply), when it answered that too:
    /// a task the broker could have routed to several queues came from one of these.
    pub consumes: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct ActiveQueue {
    name: String,
}

#[derive(Deserialize)]
struct ActiveRequest {
    #[serde(default)]
    id: String,
    #[serde(default)]
    acknowledged: bool,
    #[serde(default)]
    delivery_info: Option<DeliveryInfo>,
}

#[derive(Deserialize, Default)]
struct DeliveryInfo {
    #[serde(default)]
    exchange: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
}

impl Census {
    /// Adds one reply body, `{"worker@host": [request, ...]}`. Returns false if it is not one.
    pub fn add_reply(&mut self, body: &[u8]) -> bool {
        let Ok(map) = serde_json::from_slice::<HashMap<String, Vec<ActiveRequest>>>(body) else {
            return false;
        };
        for (worker, requests) in map {
            for r in requests {
                let info = r.delivery_info.unwrap_or_default();
                self.tasks.push(RunningTask {
                    worker: worker.clone(),
                    id: r.id,
                    exchange: info.exchange.unwrap_or_default(),
                    routing_key: info.routing_key.unwrap_or_default(),
                    acknowledged: r.acknowledged,
                    queues: Vec::new(),
                });
            }
            if !self.workers.contains(&worker) {
                self.workers.push(worker);
            }
        }
        true
    }

    /// Adds one `active_queues` reply body, `{"worker@host": [{"name": ...}, ...]}`. Returns
    /// false if it is not one.
    pub fn add_queues_reply(&mut self, body: &[u8]) -> bool {
        let Ok(map) = serde_json::from_slice::<HashMap<String, Vec<ActiveQueue>>>(body) else {
            return false;
        };
        for (worker, queues) in map {
            self.consumes
                .insert(worker, queues.into_iter().map(|q| q.name).collect());
        }
        true
    }

    /// Resolves every task's queues with `route` (exchange, routing key) -> queues the broker
    /// routes such a message to, narrowed to the queues its worker consumes when it said so.
    pub fn resolve(&mut self, route: impl Fn(&str, &str) -> Vec<String>) {
        for t in &mut self.tasks {
            let mut queues = route(&t.exchange, &t.routing_key);
            if let Some(consumed) = self.consumes.get(&t.worker) {
                queues.retain(|q| consumed.contains(q));
            }
            queues.sort();
            queues.dedup();
            t.queues = queues;
        }
    }

    /// Acknowledged running tasks that no queue could be found for: they are counted nowhere,
    /// so they are shown (`probe`, a metric) instead.
    pub fn unresolved(&self) -> impl Iterator<Item = &RunningTask> + '_ {
        self.tasks
            .iter()
            .filter(|t| t.acknowledged && t.queues.is_empty())
    }

    /// The acknowledged running tasks of `queue`.
    pub fn acknowledged_in<'a>(
        &'a self,
        queue: &'a str,
    ) -> impl Iterator<Item = &'a RunningTask> + 'a {
        self.tasks
            .iter()
            .filter(move |t| t.acknowledged && t.queues.iter().any(|q| q == queue))
    }
}

/// AMQP topic matching: `*` is one word, `#` is zero or more words, words split on `.`.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(pw), Some(kw)) if pw == kw => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

/// The remote-control commands of one census, with the reply each one gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `inspect active`: the running tasks.
    Active,
    /// `inspect active_queues`: the queues each worker consumes.
    ActiveQueues,
}

impl Command {
    /// Both, in the order they are broadcast.
    pub const ALL: [Command; 2] = [Command::Active, Command::ActiveQueues];

    fn method(self) -> &'static str {
        match self {
            Command::Active => "active",
            Command::ActiveQueues => "active_queues",
        }
    }
}

/// The tickets of one census: one per command, so replies are told apart.
#[derive(Clone, Debug)]
pub struct Tickets {
    pub active: String,
    pub queues: String,
}

impl Tickets {
    pub fn new() -> Self {
        Tickets {
            active: uuid::Uuid::new_v4().to_string(),
            queues: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The ticket of `command`.
    pub fn of(&self, command: Command) -> &str {
        match command {
            Command::Active => &self.active,
            Command::ActiveQueues => &self.queues,
        }
    }

    /// Adds a reply carrying `ticket` to `census`; replies to other tickets are ignored.
    pub fn add(&self, census: &mut Census, ticket: &str, body: &[u8]) {
        if ticket == self.active {
            census.add_reply(body);
        } else if ticket == self.queues {
            census.add_queues_reply(body);
        }
    }
}

impl Default for Tickets {
    fn default() -> Self {
        Self::new()
    }
}

/// The body of a remote-control broadcast, as kombu's `Mailbox._publish` builds it.
pub fn request(command: Command, ticket: &str, reply_routing_key: &str) -> Vec<u8> {
    serde_json::json!({
        "method": command.method(),
        "arguments": {},
        "destination": null,
        "pattern": null,
        "matcher": null,
        "ticket": ticket,
        "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": reply_routing_key},
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_count_acknowledged_tasks_per_queue() {
        let mut c = Census::default();
        assert!(c.add_reply(br#"{"w1@h": [
            {"id": "a", "acknowledged": true, "delivery_info": {"exchange": "orders", "routing_key": "orders", "priority": 0, "redelivered": false}},
            {"id": "b", "acknowledged": false, "delivery_info": {"exchange": "orders", "routing_key": "orders"}},
            {"id": "c", "acknowledged": true, "delivery_info": {"exchange": "", "routing_key": "mail"}}
        ]}"#));
        assert!(c.add_reply(br#"{"w2@h": []}"#));
        assert!(!c.add_reply(b"[1, 2]"));
        assert_eq!(c.workers.len(), 2);
        c.resolve(|_, rk| vec![rk.to_string()]);
        assert_eq!(c.unresolved().count(), 0);
        let orders: Vec<&str> = c.acknowledged_in("orders").map(|t| t.id.as_str()).collect();
        assert_eq!(orders, ["a"]);
        assert_eq!(c.acknowledged_in("mail").count(), 1);
        assert_eq!(c.acknowledged_in("other").count(), 0);
    }

    #[test]
    fn worker_queues_narrow_fanout_routes_and_unroutable_tasks_are_kept() {
        let mut c = Census::default();
        assert!(c.add_reply(br#"{"w1@h": [
            {"id": "a", "acknowledged": true, "delivery_info": {"exchange": "fan", "routing_key": ""}},
            {"id": "b", "acknowledged": true, "delivery_info": {"exchange": "lost", "routing_key": "x"}}
        ]}"#));
        assert!(c.add_queues_reply(
            br#"{"w1@h": [{"name": "fa", "exchange": {"name": "fan", "type": "fanout"}}]}"#
        ));
        c.resolve(|ex, _| match ex {
            "fan" => vec!["fb".into(), "fa".into()],
            _ => Vec::new(),
        });
        assert_eq!(c.acknowledged_in("fa").count(), 1);
        assert_eq!(c.acknowledged_in("fb").count(), 0);
        let lost: Vec<&str> = c.unresolved().map(|t| t.id.as_str()).collect();
        assert_eq!(lost, ["b"]);
    }

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("#", ""));
        assert!(!topic_matches("a.b", "a.c"));
    }

    #[test]
    fn reply_ids_carry_their_age() {
        let oid = new_oid();
        assert!(oid.starts_with(OID_PREFIX));
        let created = oid_created(&format!("{oid}\x06\x16\x06\x16{oid}.reply.celery.pidbox"));
        assert!(created.is_some_and(|t| t > 1_700_000_000));
        assert_eq!(oid_created("0b5c1a2e.reply.celery.pidbox"), None);
        assert_eq!(
            oid_created("celery-keda-scaler-x.reply.celery.pidbox"),
            None
        );
    }

    #[test]
    fn request_body_is_kombu_shaped() {
        let body: serde_json::Value =
            serde_json::from_slice(&request(Command::Active, "t1", "oid1")).unwrap();
        assert_eq!(body["method"], "active");
        assert_eq!(body["ticket"], "t1");
        assert_eq!(body["reply_to"]["exchange"], "reply.celery.pidbox");
        assert_eq!(body["reply_to"]["routing_key"], "oid1");
        let body: serde_json::Value =
            serde_json::from_slice(&request(Command::ActiveQueues, "t2", "oid1")).unwrap();
        assert_eq!(body["method"], "active_queues");
    }
}
