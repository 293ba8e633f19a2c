//! What Celery workers report they are running (remote control `inspect active`), and how those
//! tasks are attributed to queues. Backends that support it gather a [`Census`]; pure logic here.

use std::collections::HashMap;

use serde::Deserialize;

/// Celery's remote-control mailbox (`celery.pidbox` exchange, `reply.celery.pidbox` replies).
pub const MAILBOX: &str = "celery.pidbox";
/// Exchange the workers reply on.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

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

    /// Resolves every task's queues with `route` (exchange, routing key) -> queues.
    pub fn resolve(&mut self, route: impl Fn(&str, &str) -> Vec<String>) {
        for t in &mut self.tasks {
            t.queues = route(&t.exchange, &t.routing_key);
        }
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

/// The body of an `inspect active` broadcast, as kombu's `Mailbox._publish` builds it.
pub fn active_request(ticket: &str, reply_routing_key: &str) -> Vec<u8> {
    serde_json::json!({
        "method": "active",
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
        let orders: Vec<&str> = c.acknowledged_in("orders").map(|t| t.id.as_str()).collect();
        assert_eq!(orders, ["a"]);
        assert_eq!(c.acknowledged_in("mail").count(), 1);
        assert_eq!(c.acknowledged_in("other").count(), 0);
    }

    #[test]
    fn request_body_is_kombu_shaped() {
        let body: serde_json::Value =
            serde_json::from_slice(&active_request("t1", "oid1")).unwrap();
        assert_eq!(body["method"], "active");
        assert_eq!(body["ticket"], "t1");
        assert_eq!(body["reply_to"]["exchange"], "reply.celery.pidbox");
        assert_eq!(body["reply_to"]["routing_key"], "oid1");
    }
}
